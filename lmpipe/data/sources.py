"""The raw data of the download stage: corpus and instruction sources, read and verified.

A corpus comes from `url` files (pinned sha256, offline mirror first), a Hugging Face
`datasets` split (`hf`), or `local` files; archives are expanded safely (data/archive.py);
text is decoded strictly and cut into documents as it streams (data/reading.py), so a corpus
larger than memory passes through. What was read is described with its checksums
(`inputs`), so source.json and lineage can name the exact bytes. The instruction data is
small and read whole.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmpipe.core.errors import InputError
from lmpipe.core.files import sha256_file
from lmpipe.core.params import DownloadParams, HFSource, InstructParams, RemoteFile
from lmpipe.core.paths import project_root, scratch_dir
from lmpipe.data.archive import TEXT_SUFFIXES, archive_kind, extract
from lmpipe.data.fetch import Fetched, fetch, say
from lmpipe.data.instruct import Row, read_records
from lmpipe.data.reading import iter_documents
from lmpipe.data.text import normalize_newlines

HF_BATCH_ROWS = 1000  # rows of a `datasets` split read at a time


class _PinnedInputs:
    """`inputs` ({"name", "sha256", "bytes"} each) summed up: one sha256 and one size, the
    figures source.json pins a source by."""

    inputs: list[dict]

    @property
    def sha256(self) -> str:
        return combined_sha256(self.inputs)

    @property
    def bytes(self) -> int:
        return sum(i["bytes"] for i in self.inputs)


@dataclass
class Loaded(_PinnedInputs):
    """What the instruction source gave: its records, the raw inputs with their sha256 and
    size, details for source.json, and where each input came from."""

    items: list               # instruction records (each a list of rows)
    inputs: list[dict]        # {"name", "sha256", "bytes" (, "url")}
    info: dict
    origins: dict[str, str]   # input name -> mirror / cache / network / local / hf


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


class Corpus(_PinnedInputs):
    """A corpus source opened for reading: its documents as a stream, and what was read.

    `documents()` yields the non-blank documents one at a time (no source is held in
    memory). `inputs` names each raw input with its sha256 and size; a Hub dataset has no
    files to pin, so its entry is the sha256 of the text read so far, complete once the
    stream has been consumed (or stopped early at `download.max_bytes`).
    """

    def __init__(self, inputs: list[dict], info: dict, origins: dict[str, str], docs):
        self._inputs = inputs
        self.info = info
        self.origins = origins
        self._docs = docs
        self._content: hashlib._Hash | None = None
        self._content_bytes = 0
        self._content_name: str | None = None

    def documents(self) -> Iterator[str]:
        return self._docs(self)

    def _hash_content(self, name: str, text: str) -> None:
        if self._content is None:
            self._content, self._content_name = hashlib.sha256(), name
        self._content.update(text.encode("utf-8") + b"\0")
        self._content_bytes += len(text.encode("utf-8"))

    @property
    def inputs(self) -> list[dict]:
        if self._content is None:
            return self._inputs
        return [{"name": self._content_name, "sha256": self._content.hexdigest(),
                 "bytes": self._content_bytes}]


def _hf_data_files(hf: HFSource) -> tuple[list[str], list[dict]]:
    data_files: list[str] = []
    inputs: list[dict] = []
    for entry in hf.data_files or []:
        p = Path(entry).expanduser()
        p = p if p.is_absolute() else project_root() / p
        found = glob.glob(str(p), recursive=True) if glob.has_magic(str(p)) else [str(p)]
        matches = sorted(Path(m) for m in found if Path(m).is_file())
        if not matches:
            raise InputError(f"download.hf.data_files: no file matches {entry!r}")
        for m in matches:
            data_files.append(str(m))
            inputs.append({"name": _display(m), "sha256": sha256_file(m), "bytes": m.stat().st_size})
    return data_files, inputs


def _open_hf(hf: HFSource) -> Corpus:
    """A `datasets` split read in batches: streamed (`download.hf.streaming`, no Arrow cache
    copy, memory flat) or from load_dataset's memory-mapped cache. Local data_files are
    pinned by their sha256; a Hub dataset by the sha256 of its text.

    USE_TORCH=0 (unless set): a streamed `datasets` split imports torch when it can, for
    its PyTorch data-loader support; this stage needs none, and torch costs ~200 MB of RSS.
    """
    os.environ.setdefault("USE_TORCH", "0")
    import datasets  # deferred: `datasets` takes seconds to import and only `hf` needs it

    data_files, inputs = _hf_data_files(hf)
    kwargs = {"path": hf.path, "name": hf.name, "split": hf.split, "revision": hf.revision,
              "streaming": hf.streaming}
    if not hf.streaming:
        kwargs["cache_dir"] = str(scratch_dir() / "cache" / "hf")
    if data_files:
        kwargs["data_files"] = data_files
    say(f"loading Hugging Face dataset {hf.path!r} (config {hf.name!r}, split {hf.split!r}"
        f"{', streaming' if hf.streaming else ''})")
    try:
        ds = datasets.load_dataset(**kwargs)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise InputError(f"download.hf: cannot load {hf.path!r}: {type(err).__name__}: {err}") from None
    columns = ds.column_names
    if columns is not None and hf.text_field not in columns:
        raise InputError(f"download.hf.text_field: {hf.path!r} has no column {hf.text_field!r} "
                         f"(columns: {', '.join(columns)})")
    hub_name = None if inputs else f"{hf.path}" + (f"/{hf.name}" if hf.name else "") + f":{hf.split}"

    def docs(corpus: Corpus) -> Iterator[str]:
        row = 0
        for batch in ds.select_columns([hf.text_field]).iter(batch_size=HF_BATCH_ROWS):
            for value in batch[hf.text_field]:
                if value is not None and not isinstance(value, str):
                    raise InputError(f"download.hf: {hf.path!r} row {row}: {hf.text_field!r} is not text")
                row += 1
                if value is None:
                    continue
                text = normalize_newlines(value)
                if hub_name is not None:  # a Hub dataset: pin what was read, the text itself
                    corpus._hash_content(hub_name, text)
                if text.strip():
                    yield text

    return Corpus(inputs, {"hf": hf.model_dump(mode="json")}, {i["name"]: "hf" for i in inputs}, docs)


def open_corpus(dl: DownloadParams, mirror: Path | None, work: Path) -> Corpus:
    """The corpus of `download.source`, ready to stream; archives are extracted under `work`."""
    if dl.source == "hf":
        assert dl.hf is not None
        return _open_hf(dl.hf)
    files: list[tuple[Path, str]] = []
    origins: dict[str, str] = {}
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

    def docs(corpus: Corpus) -> Iterator[str]:
        for path, label in files:
            yield from iter_documents(path, label, encoding=dl.encoding, text_field=dl.text_field,
                                      separator=dl.document_separator, gutenberg=dl.strip_gutenberg)

    return Corpus(inputs, info, origins, docs)


# ----------------------------------------------------------------------------- instruct
def load_instruct(ip: InstructParams, dl: DownloadParams, mirror: Path | None,
                  work: Path) -> Loaded:
    """The instruction records (each a list of prompt/response rows) of `download.instruct`."""
    fetched = _fetch_all(ip.files, dl, mirror)
    records: list[list[Row]] = []
    for i, (f, remote) in enumerate(zip(fetched, ip.files)):
        label = _display(f.path) if f.origin == "mirror" else f.name
        for path, member in _expand(f.path, label, work / f"instruct-{i}", remote.members):
            records += read_records(path, member, ip.format)
    return Loaded(records, [_record(f) for f in fetched], {"urls": [f.url for f in fetched]},
                  {f.name: f.origin for f in fetched})
