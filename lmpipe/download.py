"""The `download` stage's library: sources -> verified raw files -> documents -> splits.

`run(params)` does the whole stage except tracking: it fetches the corpus (`url`, `hf` or
`local` source) and the instruction data, checks every pinned sha256, decodes strictly,
splits, and only then publishes `data/corpus/` and `data/instruct/` (each written to a
temporary sibling folder and renamed into place), so a failed or killed run leaves the
previous outputs as they were.

The pieces live in sibling modules: `download_fetch` (mirror, cache, HTTP with retry and
resume), `download_archive` (safe tar/zip/gz extraction), `download_text` (decoding,
documents, contiguous splits), `download_instruct` (prompt/response rows).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lmpipe.config import DownloadParams, HFSource, InstructParams, Params, RemoteFile
from lmpipe.download_archive import TEXT_SUFFIXES, archive_kind, extract
from lmpipe.download_fetch import DownloadError, Fetched, cache_dir, fetch, mirror_dir, say
from lmpipe.download_instruct import Row, read_records, split_records
from lmpipe.download_text import (
    SPLITS,
    normalize_newlines,
    read_documents,
    split_documents,
    split_stats,
    truncate_documents,
)
from lmpipe.errors import InputError
from lmpipe.io import atomic_dir, md5_file, sha256_file
from lmpipe.paths import corpus_dir, instruct_dir, project_root

__all__ = [
    "DownloadError",
    "DownloadResult",
    "InputError",
    "cache_dir",
    "mirror_dir",
    "split_digest",
    "load_corpus",
    "load_instruct",
    "run",
]

INSTRUCT_SPLITS = ("train", "val")


@dataclass
class DownloadResult:
    metrics: dict  # what goes to metrics/download.json
    corpus: dict[str, Path]  # split -> published parquet
    instruct: dict[str, Path]  # split -> published parquet
    source: dict  # what went to data/corpus/source.json
    origins: dict[str, str] = field(default_factory=dict)  # raw file -> mirror/cache/network


def _display(path: Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(project_root()))
    except ValueError:
        return str(path)


def _expand(path: Path, label: str, work: Path, members: str | None) -> list[tuple[Path, str]]:
    """A text file as itself; an archive as its extracted text members."""
    if archive_kind(label) or archive_kind(path.name):
        return [(m.path, m.label) for m in extract(path, work, label, members)]
    return [(path, label)]


def combined_sha256(inputs: list[dict]) -> str:
    """The input's sha256, or for several inputs the sha256 of their `sha256  name` lines."""
    if len(inputs) == 1:
        return inputs[0]["sha256"]
    lines = "".join(f"{i['sha256']}  {i['name']}\n" for i in inputs)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _fetch_all(files: list[RemoteFile], dl: DownloadParams, mirror: Path | None) -> list[Fetched]:
    return [
        fetch(f, mirror=mirror, retries=dl.retries, backoff_s=dl.backoff_s, timeout_s=dl.timeout_s)
        for f in files
    ]


def _record(f: Fetched) -> dict:
    return {"name": f.name, "url": f.url, "sha256": f.sha256, "bytes": f.bytes}


# ----------------------------------------------------------------------------- corpus
def _local_files(pattern: str) -> list[Path]:
    """The files a `download.local` path, folder or glob names (relative to the project root)."""
    base = Path(pattern).expanduser()
    if not base.is_absolute():
        base = project_root() / base
    if base.is_dir():
        found = [p for p in base.rglob("*") if p.is_file() and
                 (p.name.lower().endswith(TEXT_SUFFIXES) or archive_kind(p.name))]
    elif glob.has_magic(str(base)):
        found = [Path(p) for p in glob.glob(str(base), recursive=True) if Path(p).is_file()]
    else:
        found = [base] if base.is_file() else []
    if not found:
        raise InputError(f"download.local: no file matches {pattern!r}")
    return sorted(found)


def _load_hf(hf: HFSource) -> tuple[list[str], list[dict], dict]:
    """Documents of a `datasets` split; local data_files are pinned by their sha256."""
    import datasets

    data_files = None
    inputs: list[dict] = []
    if hf.data_files:
        data_files = []
        for entry in hf.data_files:
            p = Path(entry).expanduser()
            p = p if p.is_absolute() else project_root() / p
            found = glob.glob(str(p), recursive=True) if glob.has_magic(str(p)) else [str(p)]
            matches = sorted(Path(m) for m in found if Path(m).is_file())
            if not matches:
                raise InputError(f"download.hf.data_files: no file matches {entry!r}")
            for m in matches:
                data_files.append(str(m))
                inputs.append({"name": _display(m), "sha256": sha256_file(m), "bytes": m.stat().st_size})
    kwargs = {"path": hf.path, "name": hf.name, "split": hf.split, "revision": hf.revision,
              "cache_dir": str(project_root() / ".lmpipe" / "cache" / "hf")}
    if data_files:
        kwargs["data_files"] = data_files
    say(f"loading Hugging Face dataset {hf.path!r} (config {hf.name!r}, split {hf.split!r})")
    try:
        ds = datasets.load_dataset(**kwargs)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise InputError(f"download.hf: cannot load {hf.path!r}: {type(err).__name__}: {err}") from None
    if hf.text_field not in ds.column_names:
        raise InputError(
            f"download.hf.text_field: {hf.path!r} has no column {hf.text_field!r} "
            f"(columns: {', '.join(ds.column_names)})"
        )
    docs = []
    content = hashlib.sha256()
    for i, value in enumerate(ds[hf.text_field]):
        if value is None:
            continue
        if not isinstance(value, str):
            raise InputError(f"download.hf: {hf.path!r} row {i}: {hf.text_field!r} is not text")
        text = normalize_newlines(value)
        content.update(text.encode("utf-8") + b"\0")
        docs.append(text)
    if not inputs:  # a Hub dataset: pin what was read, the text itself
        name = f"{hf.path}" + (f"/{hf.name}" if hf.name else "") + f":{hf.split}"
        inputs.append({"name": name, "sha256": content.hexdigest(),
                       "bytes": sum(len(d.encode("utf-8")) for d in docs)})
    info = {"hf": hf.model_dump(mode="json")}
    return [d for d in docs if d.strip()], inputs, info


def load_corpus(
    dl: DownloadParams, mirror: Path | None, work: Path
) -> tuple[list[str], list[dict], dict, dict[str, str]]:
    """(documents, raw inputs with sha256 and bytes, source details, origins)."""
    files: list[tuple[Path, str]] = []
    origins: dict[str, str] = {}
    if dl.source == "hf":
        assert dl.hf is not None
        docs, inputs, info = _load_hf(dl.hf)
        return docs, inputs, info, {i["name"]: "hf" for i in inputs}
    if dl.source == "url":
        fetched = _fetch_all(dl.files, dl, mirror)
        inputs = [_record(f) for f in fetched]
        info = {"urls": [f.url for f in fetched]}
        for i, (f, remote) in enumerate(zip(fetched, dl.files)):
            origins[f.name] = f.origin
            files += _expand(f.path, _display(f.path) if f.origin == "mirror" else f.name,
                             work / f"corpus-{i}", remote.members)
    else:
        assert dl.local is not None
        paths = _local_files(dl.local)
        inputs = []
        for i, p in enumerate(paths):
            inputs.append({"name": _display(p), "sha256": sha256_file(p), "bytes": p.stat().st_size})
            origins[_display(p)] = "local"
            files += _expand(p, _display(p), work / f"corpus-{i}", None)
        info = {"local": dl.local}
    docs: list[str] = []
    for path, label in files:
        docs += read_documents(
            path, label, encoding=dl.encoding, text_field=dl.text_field,
            separator=dl.document_separator, gutenberg=dl.strip_gutenberg,
        )
    return docs, inputs, info, origins


# ----------------------------------------------------------------------------- instruct
def load_instruct(
    ip: InstructParams, dl: DownloadParams, mirror: Path | None, work: Path
) -> tuple[list[list[Row]], list[dict], dict[str, str]]:
    """(records of prompt/response rows, raw inputs, origins)."""
    fetched = _fetch_all(ip.files, dl, mirror)
    records: list[list[Row]] = []
    for i, (f, remote) in enumerate(zip(fetched, ip.files)):
        label = _display(f.path) if f.origin == "mirror" else f.name
        for path, member in _expand(f.path, label, work / f"instruct-{i}", remote.members):
            records += read_records(path, member, ip.format)
    return records, [_record(f) for f in fetched], {f.name: f.origin for f in fetched}


# ----------------------------------------------------------------------------- output
def _write_parquet(path: Path, columns: dict[str, list[str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: pa.array(v, type=pa.string()) for k, v in columns.items()})
    pq.write_table(table, path)


def _usual_mode(*folders: Path) -> None:
    """mkdtemp folders are 0700; published ones get the mode a plain mkdir would give."""
    umask = os.umask(0)
    os.umask(umask)
    for folder in folders:
        os.chmod(folder, 0o777 & ~umask)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def run(params: Params) -> DownloadResult:
    """Fetch, verify, decode, split and publish; returns the stage's metrics and outputs."""
    dl = params.download
    mirror = mirror_dir(params.data.mirror)
    if mirror is not None:
        say(f"offline mirror: {mirror}")
    scratch = project_root() / ".lmpipe" / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=scratch) as tmp:
        work = Path(tmp)
        docs, inputs, info, origins = load_corpus(dl, mirror, work)
        if not docs:
            names = ", ".join(i["name"] for i in inputs)
            raise InputError(f"the corpus is empty: {names} hold(s) no text")
        n_docs = len(docs)
        if dl.max_bytes is not None:
            docs = truncate_documents(docs, dl.max_bytes)
        splits = split_documents(docs, (dl.split.train, dl.split.val, dl.split.test))
        records, i_inputs, i_origins = load_instruct(dl.instruct, dl, mirror, work)
        i_train, i_val = split_records(records, dl.instruct.val_fraction, params.seed,
                                       dl.instruct.max_rows)
    origins.update(i_origins)
    instruct_rows = {"train": i_train, "val": i_val}
    stats = {s: split_stats(splits[s]) for s in SPLITS}
    corpus_sha = combined_sha256(inputs)
    instruct_sha = combined_sha256(i_inputs)
    source = {
        "source": dl.source,
        **info,
        "inputs": inputs,
        "sha256": corpus_sha,
        "bytes": sum(i["bytes"] for i in inputs),
        "encoding": dl.encoding,
        "documents": n_docs,
        "splits": {s: vars(stats[s]) for s in SPLITS},
    }
    instruct_source = {
        "format": dl.instruct.format,
        "urls": [i["url"] for i in i_inputs],
        "inputs": i_inputs,
        "sha256": instruct_sha,
        "bytes": sum(i["bytes"] for i in i_inputs),
        "seed": params.seed,
        "val_fraction": dl.instruct.val_fraction,
        "rows": {s: len(instruct_rows[s]) for s in INSTRUCT_SPLITS},
    }

    with atomic_dir(corpus_dir()) as c_tmp, atomic_dir(instruct_dir()) as i_tmp:
        _usual_mode(c_tmp, i_tmp)
        for s in SPLITS:
            _write_parquet(c_tmp / f"{s}.parquet", {"text": splits[s]})
        _write_json(c_tmp / "source.json", source)
        for s in INSTRUCT_SPLITS:
            rows = instruct_rows[s]
            _write_parquet(i_tmp / f"{s}.parquet",
                           {"prompt": [p for p, _ in rows], "response": [r for _, r in rows]})
        _write_json(i_tmp / "source.json", instruct_source)

    metrics: dict = {"source": dl.source, "sha256": corpus_sha, "raw_bytes": source["bytes"],
                     "documents": n_docs}
    for s in SPLITS:
        metrics[f"{s}_bytes"] = stats[s].bytes
        metrics[f"{s}_lines"] = stats[s].lines
        metrics[f"{s}_documents"] = stats[s].documents
    for s in INSTRUCT_SPLITS:
        metrics[f"instruct_{s}_rows"] = len(instruct_rows[s])
    metrics["instruct_sha256"] = instruct_sha
    say(
        "published data/corpus ("
        + ", ".join(f"{s} {stats[s].bytes:,} B / {stats[s].lines:,} lines" for s in SPLITS)
        + f") and data/instruct (train {len(i_train):,} / val {len(i_val):,} rows)"
    )
    return DownloadResult(
        metrics=metrics,
        corpus={s: corpus_dir() / f"{s}.parquet" for s in SPLITS},
        instruct={s: instruct_dir() / f"{s}.parquet" for s in INSTRUCT_SPLITS},
        source=source,
        origins=origins,
    )


def split_digest(path: Path) -> str:
    """md5 of a published file: the digest DVC records for it, and MLflow's dataset digest."""
    return md5_file(path)

