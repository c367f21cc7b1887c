"""The download stage: HTTP fetch (checksum, retry, resume), mirror, archives, decoding,
splits, instruction rows, atomic publication, and the stage end to end."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import stages.download as stage
from lmpipe.core.errors import InputError
from lmpipe.core.files import md5_file
from lmpipe.core.params import SELF_INSTRUCT, Params, RemoteFile, validate_params
from lmpipe.core.profiles import deep_merge, default_params_dict, profile_dict
from lmpipe.core.records import read_stage_metrics
from lmpipe.data import sources
from lmpipe.data.archive import extract
from lmpipe.data.fetch import DownloadError, cache_dir, fetch, mirror_dir
from lmpipe.data import reading
from lmpipe.data.corpus import iter_texts, split_digest, split_shards
from lmpipe.data.instruct import read_records, split_records
from lmpipe.data.reading import iter_documents
from lmpipe.data.splits import lines_of, publish_splits, spool
from lmpipe.data.text import decode, strip_gutenberg

REPO = Path(__file__).resolve().parent.parent
TS_SHA = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def run_download(p) -> dict:
    """The download stage's work in this process; its metrics/download.json."""
    stage.run(p)
    return read_stage_metrics("download")


def load_corpus(dl, mirror, work) -> tuple:
    """(documents, inputs, info, origins) of the corpus source, its stream read to the end."""
    got = sources.open_corpus(dl, mirror, work)
    docs = list(got.documents())
    return docs, got.inputs, got.info, got.origins


def split_texts(corpus: Path) -> dict[str, list[str]]:
    """The rows of each published corpus split, its shards read in order."""
    return {s: list(iter_texts(corpus / s)) for s in ("train", "val", "test")}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- HTTP server
class _State:
    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, bytes] = {}  # extra files served by path
        self.faults: dict[str, list[str]] = {}  # path -> actions for the next requests
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.lock = threading.Lock()

    def reset(self):
        with self.lock:
            self.files.clear()
            self.faults.clear()
            self.requests.clear()


class _Handler(BaseHTTPRequestHandler):
    """Serves the mirror folder (plus extra files) with Range support and injected faults:
    '503' answers 503; 'drop:N' sends the full Content-Length, then N bytes, then closes;
    'norange' ignores a Range header (200 with the whole file)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        st_ = self.server.state
        path = unquote(urlparse(self.path).path)
        rng = self.headers.get("Range")
        with st_.lock:
            st_.requests.append((path, rng))
            plan = st_.faults.get(path)
            action = plan.pop(0) if plan else None
            data = st_.files.get(path)
        if action == "503":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if data is None:
            file = (st_.root / path.lstrip("/")).resolve()
            if not file.is_relative_to(st_.root) or not file.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = file.read_bytes()
        start = 0
        if rng and rng.startswith("bytes=") and action != "norange":
            start = int(rng[len("bytes="):].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if action and action.startswith("drop:"):
            self.wfile.write(body[: int(action.split(":")[1])])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def http(mirror):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.state = _State(mirror)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def srv(http):
    """The server with a clean request log; `srv.url(path)` builds a URL."""
    http.state.reset()
    http.url = lambda p: f"http://127.0.0.1:{http.server_address[1]}/{p.lstrip('/')}"
    return http


@pytest.fixture
def online(project, monkeypatch):
    """A project with no offline mirror: every file comes over HTTP (or the cache)."""
    monkeypatch.delenv("LMPIPE_MIRROR", raising=False)
    monkeypatch.setenv("LMPIPE_TRACKING", "off")
    return project


def remote(srv, name: str, sha: str, filename: str | None = None, **kw) -> RemoteFile:
    return RemoteFile(url=srv.url(name), sha256=sha, filename=filename or Path(name).name, **kw)


def params_with(overlay: dict) -> Params:
    return validate_params(deep_merge(default_params_dict(), overlay))


def served_instruct(srv) -> list[dict]:
    """The default Self-Instruct files, fetched from the test server instead of GitHub."""
    return [
        {"url": srv.url(f.filename), "sha256": f.sha256, "filename": f.filename}
        for f in SELF_INSTRUCT
    ]


# ----------------------------------------------------------------------------- fetch
def test_good_file_is_downloaded_verified_and_cached(online, srv, mirror):
    f = fetch(remote(srv, "tinyshakespeare.txt", TS_SHA), mirror=None, backoff_s=0)
    assert f.origin == "network" and f.sha256 == TS_SHA
    assert f.path == cache_dir() / "tinyshakespeare.txt"
    assert f.path.read_bytes() == (mirror / "tinyshakespeare.txt").read_bytes()
    assert not list(cache_dir().glob("*.part"))
    assert srv.state.requests == [("/tinyshakespeare.txt", None)]
    again = fetch(remote(srv, "tinyshakespeare.txt", TS_SHA), mirror=None)
    assert again.origin == "cache" and len(srv.state.requests) == 1  # no second request


def test_wrong_checksum_is_clear_and_publishes_nothing(online, srv):
    bad = "0" * 64
    p = params_with({"download": {
        "files": [{"url": srv.url("tinyshakespeare.txt"), "sha256": bad, "filename": "ts.txt"}],
        "instruct": {"files": served_instruct(srv)},
    }})
    with pytest.raises(InputError) as err:
        run_download(p)
    msg = str(err.value)
    assert "sha256 mismatch" in msg and srv.url("tinyshakespeare.txt") in msg
    assert bad in msg and TS_SHA in msg
    assert not (online / "data" / "corpus").exists() and not (online / "data" / "instruct").exists()
    assert not (cache_dir() / "ts.txt").exists() and not (cache_dir() / "ts.txt.part").exists()


def test_dropped_connection_is_retried_and_resumed_with_range(online, srv, mirror, monkeypatch):
    delays = []
    monkeypatch.setattr("lmpipe.data.fetch._sleep", delays.append)
    srv.state.faults["/tinyshakespeare.txt"] = ["drop:300000"]
    f = fetch(remote(srv, "tinyshakespeare.txt", TS_SHA), mirror=None, backoff_s=0.25)
    assert f.sha256 == TS_SHA and f.bytes == (mirror / "tinyshakespeare.txt").stat().st_size
    reqs = srv.state.requests
    assert len(reqs) == 2 and reqs[0][1] is None
    assert reqs[1][1] is not None and reqs[1][1].startswith("bytes=")
    resumed_at = int(reqs[1][1][len("bytes="):].rstrip("-"))
    assert 0 < resumed_at <= 300000  # only the missing tail was fetched again
    assert delays == [0.25]


def test_partial_file_from_a_killed_run_is_resumed(online, srv, mirror):
    full = (mirror / "tinyshakespeare.txt").read_bytes()
    part = cache_dir() / "tinyshakespeare.txt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(full[:100_000])
    f = fetch(remote(srv, "tinyshakespeare.txt", TS_SHA), mirror=None, backoff_s=0)
    assert f.path.read_bytes() == full and not part.exists()
    assert srv.state.requests == [("/tinyshakespeare.txt", "bytes=100000-")]


def test_server_ignoring_range_restarts_the_file(online, srv, mirror):
    part = cache_dir() / "tinyshakespeare.txt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes((mirror / "tinyshakespeare.txt").read_bytes()[:5000])
    srv.state.faults["/tinyshakespeare.txt"] = ["norange"]
    f = fetch(remote(srv, "tinyshakespeare.txt", TS_SHA), mirror=None, backoff_s=0)
    assert f.sha256 == TS_SHA and f.bytes == 1115394
    assert srv.state.requests == [("/tinyshakespeare.txt", "bytes=5000-")]


def test_corrupt_partial_file_is_discarded_and_fetched_again(online, srv, mirror):
    part = cache_dir() / "tinyshakespeare.txt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage" * 1000)
    f = fetch(remote(srv, "tinyshakespeare.txt", TS_SHA), mirror=None, backoff_s=0)
    assert f.sha256 == TS_SHA
    assert srv.state.requests == [("/tinyshakespeare.txt", "bytes=7000-"), ("/tinyshakespeare.txt", None)]


def test_transient_errors_back_off_exponentially_then_succeed(online, srv, monkeypatch):
    delays = []
    monkeypatch.setattr("lmpipe.data.fetch._sleep", delays.append)
    srv.state.faults["/self_instruct_seed_tasks.jsonl"] = ["503", "503", "503"]
    f = fetch(remote(srv, "self_instruct_seed_tasks.jsonl", SELF_INSTRUCT[0].sha256),
              mirror=None, retries=3, backoff_s=0.5)
    assert f.origin == "network"
    assert delays == [0.5, 1.0, 2.0]
    assert len(srv.state.requests) == 4


def test_retries_exhausted_is_a_download_error(online, srv, monkeypatch):
    monkeypatch.setattr("lmpipe.data.fetch._sleep", lambda s: None)
    srv.state.faults["/tinyshakespeare.txt"] = ["503"] * 5
    with pytest.raises(DownloadError, match="giving up after 3 attempt.*set LMPIPE_MIRROR"):
        fetch(remote(srv, "tinyshakespeare.txt", TS_SHA), mirror=None, retries=2)
    assert len(srv.state.requests) == 3


def test_missing_file_is_an_input_error_without_retry(online, srv):
    with pytest.raises(InputError, match=r"nope\.txt: HTTP 404"):
        fetch(remote(srv, "nope.txt", TS_SHA), mirror=None, backoff_s=0)
    assert len(srv.state.requests) == 1


def test_mirror_hit_makes_no_network_request(online, srv, mirror, tmp_path, monkeypatch):
    # found by filename
    f = fetch(remote(srv, "tinyshakespeare.txt", TS_SHA), mirror=mirror)
    assert f.origin == "mirror" and f.path == mirror / "tinyshakespeare.txt"
    # found by the URL's base name when the filename differs
    f = fetch(remote(srv, "tinyshakespeare.txt", TS_SHA, filename="shakespeare/input.txt"), mirror=mirror)
    assert f.origin == "mirror"
    assert srv.state.requests == []
    # LMPIPE_MIRROR overrides data.mirror
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    monkeypatch.setenv("LMPIPE_MIRROR", str(mirror))
    assert mirror_dir(str(empty)) == mirror.resolve()
    monkeypatch.delenv("LMPIPE_MIRROR")
    assert mirror_dir(str(empty)) == empty.resolve()
    assert mirror_dir(None) is None
    with pytest.raises(InputError, match="data.mirror: .*not a folder"):
        mirror_dir(str(tmp_path / "missing"))


def test_mirror_copy_still_has_to_match_its_checksum(online, srv, tmp_path):
    fake = tmp_path / "mirror"
    fake.mkdir()
    (fake / "tinyshakespeare.txt").write_text("not the real thing\n")
    with pytest.raises(InputError, match=r"offline mirror copy of tinyshakespeare.txt.*sha256 mismatch"):
        fetch(remote(srv, "tinyshakespeare.txt", TS_SHA), mirror=fake)
    assert srv.state.requests == []


# ----------------------------------------------------------------------------- archives
def _tar(path: Path, members: list[tuple[str, bytes | None, str | None]]) -> Path:
    """members: (name, data, symlink target); data None + target -> a symlink."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data, target in members:
            info = tarfile.TarInfo(name)
            if target is not None:
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "members, needle",
    [
        ([("ok.txt", b"fine\n", None), ("../evil.txt", b"x\n", None)], "'../evil.txt' would be written outside"),
        ([("/tmp/evil.txt", b"x\n", None)], "'/tmp/evil.txt' would be written outside"),
        ([("a/../../evil.txt", b"x\n", None)], "would be written outside"),
        ([("link", None, "/etc"), ("link/passwd", b"x\n", None)], "link member 'link' -> '/etc'"),
        ([("d/link", None, "../../outside"), ("ok.txt", b"x\n", None)], "points outside"),
    ],
)
def test_archive_path_traversal_is_refused(tmp_path, members, needle):
    archive = _tar(tmp_path / "bad.tar.gz", members)
    dest = tmp_path / "x" / "out"
    with pytest.raises(InputError, match=needle):
        extract(archive, dest, "bad.tar.gz")
    assert not (tmp_path / "x" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not any(dest.rglob("*.txt"))  # refused before anything was written


def test_zip_traversal_refused_and_good_archives_read(project, tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../../evil.txt", "x")
    with pytest.raises(InputError, match="bad.zip: member '../../evil.txt'"):
        extract(bad, tmp_path / "out", "bad.zip")
    src = project / "src"
    src.mkdir()
    with zipfile.ZipFile(src / "a.zip", "w") as zf:
        zf.writestr("docs/one.txt", "first document\n")
        zf.writestr("docs/two.jsonl", json.dumps({"text": "second"}) + "\n")
        zf.writestr("docs/skip.bin", b"\x00\x01")
        zf.writestr("__MACOSX/docs/._one.txt", "junk")
    _tar(src / "b.tar.gz", [("three.txt", b"third document\n", None)])
    (src / "c.txt.gz").write_bytes(gzip.compress(b"fourth document\n"))
    p = params_with({"download": {"source": "local", "local": "src/*"}})
    docs, inputs, _, _ = load_corpus(p.download, None, tmp_path / "work")
    assert docs == ["first document\n", "second", "third document\n", "fourth document\n"]
    assert [i["name"] for i in inputs] == ["src/a.zip", "src/b.tar.gz", "src/c.txt.gz"]


def test_url_archive_with_member_glob(online, srv, tmp_path):
    buf = tmp_path / "corpus.tar.gz"
    _tar(buf, [("c/train.txt", b"a line\n" * 50, None), ("c/other.txt", b"ignored\n", None)])
    data = buf.read_bytes()
    srv.state.files["/corpus.tar.gz"] = data
    p = params_with({"download": {"files": [{"url": srv.url("corpus.tar.gz"), "sha256": sha256(data),
                                             "filename": "corpus.tar.gz", "members": "*/train.txt"}]}})
    docs, inputs, info, origins = load_corpus(p.download, None, tmp_path / "work")
    assert docs == ["a line\n" * 50]
    assert inputs[0]["sha256"] == sha256(data) and origins == {"corpus.tar.gz": "network"}


# ----------------------------------------------------------------------------- decoding
def test_latin1_without_encoding_names_file_and_offset(project, mirror, tmp_path):
    raw = (mirror / "gutenberg" / "shakespeare-caesar.txt").read_bytes()
    with pytest.raises(UnicodeDecodeError) as ref:
        raw.decode("utf-8")
    p = params_with({"download": {"source": "local", "local": str(mirror / "gutenberg" / "shakespeare-caesar.txt")}})
    with pytest.raises(InputError) as err:
        load_corpus(p.download, None, tmp_path)
    msg = str(err.value)
    assert "shakespeare-caesar.txt" in msg and f"byte offset {ref.value.start}" in msg
    assert "download.encoding" in msg
    p = params_with({"download": {"source": "local", "encoding": "latin-1",
                                  "local": str(mirror / "gutenberg" / "shakespeare-caesar.txt")}})
    docs, *_ = load_corpus(p.download, None, tmp_path)
    assert docs == [raw.decode("latin-1").replace("\r\n", "\n")]


def test_crlf_becomes_lf(project, mirror, tmp_path):
    raw = (mirror / "gutenberg" / "melville-moby_dick.txt").read_bytes()
    assert b"\r\n" in raw
    p = params_with({"download": {"source": "local", "local": str(mirror / "gutenberg" / "melville-moby_dick.txt")}})
    (doc,), *_ = load_corpus(p.download, None, tmp_path)
    assert "\r" not in doc
    assert doc.encode("utf-8") == raw.replace(b"\r\n", b"\n")
    assert decode(b"a\r\nb\rc\n", "utf-8", "x") == "a\nb\nc\n"


def test_binary_empty_and_missing_inputs_are_input_errors(project, tmp_path):
    (project / "bin.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    (project / "empty.txt").write_text("\n\n  \n")
    cases = {"bin.txt": "bin.txt: looks like a binary file (NUL byte at byte offset 4)",
             "empty.txt": "the corpus is empty: empty.txt",
             "missing/*.txt": "download.local: no file matches 'missing/*.txt'"}
    for local, needle in cases.items():
        p = params_with({"download": {"source": "local", "local": local}})
        with pytest.raises(InputError, match=re.escape(needle)):
            run_download(p)
    assert not (project / "data" / "corpus").exists()


def test_strip_gutenberg_and_document_separator(project, tmp_path):
    text = "Header junk\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\nBody line\nmore\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicense\n"
    assert strip_gutenberg(text) == "Body line\nmore\n"
    assert strip_gutenberg("no markers\n") == "no markers\n"
    (project / "g.txt").write_text(text)
    (project / "stories.txt").write_text("one story\n\nwith two paragraphs\n<|endoftext|>\nsecond story\n<|endoftext|>\n")
    p = params_with({"download": {"source": "local", "local": "g.txt", "strip_gutenberg": True}})
    assert load_corpus(p.download, None, tmp_path)[0] == ["Body line\nmore\n"]
    p = params_with({"download": {"source": "local", "local": "stories.txt",
                                  "document_separator": "<|endoftext|>"}})
    docs = load_corpus(p.download, None, tmp_path)[0]
    assert docs == ["one story\n\nwith two paragraphs", "second story"]


# ----------------------------------------------------------------------------- splitting
@dataclass
class Stats:
    bytes: int
    lines: int
    documents: int


def split_stats(rows: list[str]) -> Stats:
    return Stats(sum(len(r.encode()) for r in rows),
                 sum(r.count("\n") + (not r.endswith("\n")) for r in rows), len(rows))


def reference_split(docs: list[str], fractions) -> dict[str, list[str]]:
    """The split rule written out plainly, over every line of the corpus held in memory."""
    lines = [(d, line) for d, doc in enumerate(docs) for line in lines_of(doc)]
    boundary = [0]
    for _, line in lines:
        boundary.append(boundary[-1] + len(line.encode()))
    n, total = len(lines), boundary[-1]

    def cut(target, lo, hi):
        k = next(i for i, b in enumerate(boundary) if b >= target)
        ok = [c for c in (k - 1, k) if lo <= c <= hi]
        return min(ok, key=lambda c: abs(boundary[c] - target)) if ok else (lo if k < lo else hi)

    k1 = cut(total * fractions[0], 1, n - 2)
    k2 = cut(total * (fractions[0] + fractions[1]), k1 + 1, n - 1)
    out = {}
    for s, (a, b) in {"train": (0, k1), "val": (k1, k2), "test": (k2, n)}.items():
        rows, last = [], None
        for d, line in lines[a:b]:
            if d == last:
                rows[-1] += line
            else:
                rows.append(line)
            last = d
        out[s] = rows
    return out


def split_documents(docs: list[str], fractions, shard_bytes: int = 1 << 20) -> dict[str, list[str]]:
    """The published rows of each split when `docs` stream through spool + publish_splits."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spooled = spool(iter(docs), Path(tmp) / ".spool", shard_bytes=shard_bytes)
        stats = publish_splits(spooled, Path(tmp), fractions)
        rows = {s: list(iter_texts(Path(tmp) / s)) for s in ("train", "val", "test")}
        assert {s: vars(stats[s]) for s in rows} == {s: vars(split_stats(rows[s])) for s in rows}
        assert not any((Path(tmp) / ".spool").iterdir())  # every shard moved or rewritten
    return rows


def _check_split(docs: list[str], fractions: tuple[float, float, float]) -> dict[str, list[str]]:
    splits = split_documents(docs, fractions)
    rows = splits["train"] + splits["val"] + splits["test"]
    assert all(splits[s] for s in splits)  # no empty split
    # contiguous and lossless: the rows, in order, are the documents' lines in order
    assert "".join(rows) == "".join(docs)
    # no line in two splits: every split but the last ends at a line or document end
    for s in ("train", "val"):
        last = splits[s][-1]
        assert last.endswith("\n") or any(d.endswith(last) for d in docs)
    # every row is a contiguous piece of one document
    it = iter(docs)
    doc, pos = next(it), 0
    for row in rows:
        if pos == len(doc):
            doc, pos = next(it), 0
        assert doc.startswith(row, pos)
        pos += len(row)
    return splits


def test_splits_are_contiguous_line_blocks_at_the_fractions():
    docs = [f"doc {d} " + "".join(f"line {i} {'x' * (i % 17)}\n" for i in range(200 + 13 * d)) for d in range(7)]
    total = sum(len(d.encode()) for d in docs)
    longest = max(len(line) + 1 for d in docs for line in d.split("\n"))
    for fractions in [(0.9, 0.05, 0.05), (0.6, 0.3, 0.1)]:
        splits = _check_split(docs, fractions)
        for s, f in zip(("train", "val", "test"), fractions):
            got = split_stats(splits[s]).bytes
            assert abs(got - f * total) <= 2 * longest, (s, got, f * total)
    # a document that straddles a cut is one row in each split
    one = _check_split(["".join(f"{i:03d}\n" for i in range(100))], (0.8, 0.1, 0.1))
    assert [split_stats(one[s]).documents for s in ("train", "val", "test")] == [1, 1, 1]
    assert [split_stats(one[s]).lines for s in ("train", "val", "test")] == [80, 10, 10]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.text(alphabet=st.sampled_from("ab \n\u00e9\U0001f600"), min_size=1, max_size=40),
             min_size=1, max_size=8),
    st.floats(0.05, 0.9),
)
def test_split_property_any_documents(docs, train):
    docs = [d for d in docs if d.strip()]
    n_lines = sum(len(d.split("\n")) - (1 if d.endswith("\n") else 0) for d in docs)
    if n_lines < 3:
        with pytest.raises(InputError, match="needs at least 3"):
            split_documents(docs, (train, (1 - train) / 2, (1 - train) / 2))
        return
    _check_split(docs, (train, (1 - train) / 2, (1 - train) / 2))


def test_max_bytes_cuts_at_a_line_boundary(tmp_path):
    docs = ["aaaa\nbbbb\n", "cccc\ndddd\n"]

    def spooled(max_bytes):
        folder = tmp_path / f"spool-{max_bytes}"
        got = spool(iter(docs), folder, shard_bytes=1024, max_bytes=max_bytes)
        return [t for s in got.shards for t in iter_texts(s.path)], got.truncated

    assert spooled(12) == (["aaaa\nbbbb\n"], True)
    assert spooled(17) == (["aaaa\nbbbb\n", "cccc\n"], True)
    assert spooled(1000) == (docs, False)
    assert spooled(2) == (["aaaa\n"], True)  # at least one line
    # the source is read no further than the cut: a stream that would fail later is fine
    def failing():
        yield "x" * 10 + "\n"
        raise AssertionError("read past max_bytes")

    got = spool(failing(), tmp_path / "early", shard_bytes=1024, max_bytes=5)
    assert got.truncated and got.bytes == 11 and got.documents_read == 1


# ----------------------------------------------------------------------------- streaming
SEP = "<|endoftext|>"


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.sampled_from(["a", " ", "\n", "\r", "\r\n", "\u00e9", "\U0001f600", SEP, "<|",
                              "endof", "\ufeff"]), max_size=30).map("".join),
    st.integers(1, 9),
    st.sampled_from(["utf-8", "utf-16", "latin-1"]),
)
def test_block_reader_gives_what_a_whole_read_gives(tmp_path_factory, text, block, encoding):
    """Any text, any block size: documents, lines and JSON lines equal a whole-file read,
    also with a CR/LF pair, a multi-byte character or the separator cut by a block edge."""
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        data = text.encode("utf-8")
        encoding = "utf-8"
    path = tmp_path_factory.mktemp("blocks") / "s.txt"
    path.write_bytes(data)
    whole = decode(data, encoding, "s.txt")
    original = reading.BLOCK_BYTES
    reading.BLOCK_BYTES = block
    try:
        docs = list(iter_documents(path, "s.txt", encoding=encoding, separator=SEP))
        lines = list(reading.iter_lines(reading.iter_decoded(path, encoding, "s.txt")))
    finally:
        reading.BLOCK_BYTES = original
    assert docs == [d.strip("\n") for d in whole.split(SEP) if d.strip()]
    assert lines == whole.split("\n")


def test_block_reader_errors_name_the_offset_in_the_whole_file(tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "BLOCK_BYTES", 8)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("x\u00e9".encode() * 10 + b"\xff tail" + b"<|endoftext|>more")
    with pytest.raises(InputError, match=r"bad.txt: not valid utf-8 at byte offset 30 \(byte\(s\) ff"):
        list(iter_documents(bad, "bad.txt", separator=SEP))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"a" * 21 + b"\x00" + b"b" * 10)
    with pytest.raises(InputError, match="NUL byte at byte offset 21"):
        list(iter_documents(binary, "bin.txt", separator=SEP))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)) + "{oops\n")
    with pytest.raises(InputError, match=r"rows.jsonl:6: not valid JSON"):
        list(iter_documents(rows, "rows.jsonl"))


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.text(alphabet=st.sampled_from("ab \n\u00e9"), min_size=1, max_size=40),
             min_size=1, max_size=12),
    st.floats(0.05, 0.9),
    st.integers(1, 60),
)
def test_sharded_splits_follow_the_split_rule_for_any_shard_size(docs, train, shard_bytes):
    """Whatever the shard size (one document per shard up to all in one), the published
    splits hold exactly the rows of the split rule applied to the whole corpus at once."""
    docs = [d for d in docs if d.strip()]
    fractions = (train, (1 - train) / 2, (1 - train) / 2)
    if sum(len(lines_of(d)) for d in docs) < 3:
        return
    assert split_documents(docs, fractions, shard_bytes) == reference_split(docs, fractions)


def _big_corpus(folder: Path, n_bytes: int) -> int:
    """About `n_bytes` of text: distinct documents separated by SEP in .txt files and the same
    documents as rows of .parquet files (the two shapes of a large corpus)."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(5000)] + [".", ",", "\n"])
    base = [" ".join(words[rng.integers(0, words.size, 500)]).replace(" \n ", "\n").strip()
            for _ in range(1000)]
    folder.mkdir(parents=True)
    written, part, i = 0, 0, 0
    while written < n_bytes:
        docs = [f"doc {i + j} {base[(i + j) % len(base)]}" for j in range(10_000)]
        i += len(docs)
        (folder / f"part-{part}.txt").write_text("".join(d + SEP + "\n" for d in docs))
        pq.write_table(pa.table({"text": docs}), folder / f"part-{part}.parquet", row_group_size=1000)
        written += sum(len(d) for d in docs)
        part += 1
    return written


def _download_peak(project: Path, source: str, parts: str) -> tuple[int, float, str]:
    """Run the download stage on the `big/part-<parts>` files of one shape; return the corpus
    bytes it published, its peak RSS in MiB (VmHWM) and its stderr."""
    download = {"shard_bytes": 4_000_000, "instruct": {"max_rows": 50}}
    if source == "local":
        download.update(source="local", local=f"big/part-{parts}.txt", document_separator=SEP)
    else:
        download.update(source="hf", hf={"path": "parquet", "data_files": [f"big/part-{parts}.parquet"]})
    (project / "params.yaml").write_text(yaml.safe_dump(deep_merge(default_params_dict(),
                                                                   {"download": download})))
    env = {**os.environ, "PYTHONPATH": str(REPO), "LMPIPE_TRACKING": "off"}
    proc = subprocess.run([sys.executable, "-m", "stages.download"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = read_stage_metrics("download")
    return sum(m[f"{s}_bytes"] for s in ("train", "val", "test")), m["peak_rss_mb"], proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("source", ["local", "hf"])
def test_download_peak_memory_does_not_grow_with_the_corpus(project, source):
    """Documents stream into shards, so the stage's peak RSS does not grow with the corpus:
    four times the text (a quarter of the parts, then all of them) adds under 40 MiB to it,
    and the whole corpus is larger than the stage's peak.

    The difference, not one absolute figure, is what is asserted: the RSS of the imports alone
    (pyarrow, `datasets`) differs between machines by tens of MiB (an absolute 350 MiB limit
    passed here at 317 and failed on a CI machine at 380)."""
    size = _big_corpus(project / "big", 440 * 2**20)
    parts = len(list((project / "big").glob("part-*.txt")))
    assert parts >= 12
    quarter, quarter_peak, _ = _download_peak(project, source, f"[0-{parts // 4 - 1}]")
    whole, whole_peak, err = _download_peak(project, source, "*")
    assert whole == size and quarter < size / 3.5, (quarter, whole, size)
    print(f"download ({source}): peak RSS {quarter_peak:.0f} MiB on {quarter / 2**20:.0f} MiB of "
          f"corpus, {whole_peak:.0f} MiB on {whole / 2**20:.0f} MiB")
    assert whole_peak - quarter_peak < 40, (quarter_peak, whole_peak, err[-2000:])
    assert whole_peak * 2**20 < whole, (whole_peak, whole)
    shards = {s: split_shards(project / "data" / "corpus" / s) for s in ("train", "val", "test")}
    assert len(shards["train"]) >= 80  # 4 MB shards of the ~390 MB train split
    first = next(iter_texts(shards["train"][0]))
    assert first.startswith("doc 0 w") and SEP not in first


# ----------------------------------------------------------------------------- instruct
def test_self_instruct_rows_normalised(mirror):
    seed = read_records(mirror / "self_instruct_seed_tasks.jsonl", "seed.jsonl", "self_instruct")
    user = read_records(mirror / "self_instruct_user_oriented_instructions.jsonl", "u.jsonl", "self_instruct")
    assert (len(seed), len(user)) == (175, 252)
    raw = [json.loads(l) for l in (mirror / "self_instruct_seed_tasks.jsonl").read_text().splitlines()]
    assert sum(len(r) for r in seed) == sum(len(r["instances"]) for r in raw)
    for rec, obj in zip(seed, raw):
        for (prompt, response), inst in zip(rec, obj["instances"]):
            expected = obj["instruction"].strip()
            if inst["input"].strip():
                expected += "\n\n" + inst["input"].strip()
            assert prompt == expected and response == inst["output"]
    with_input = [r for rec in seed for r in rec if "\n\n" in r[0]]
    assert len(with_input) == sum(1 for o in raw for i in o["instances"] if i["input"].strip())


def test_gsm8k_rows_and_missing_response_names_file_and_line(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "answer": "2\n#### 2"}) + "\n"
                 + json.dumps({"question": "2+2?", "answer": "4\r\n#### 4"}) + "\n")
    assert read_records(f, "g.jsonl", "gsm8k") == [[("1+1?", "2\n#### 2")], [("2+2?", "4\n#### 4")]]
    f.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(InputError, match=r"g.jsonl:2: no 'answer' field \(the response\)"):
        read_records(f, "g.jsonl", "gsm8k")
    s = tmp_path / "s.jsonl"
    s.write_text("\n".join([
        json.dumps({"instruction": "Do", "instances": [{"input": "", "output": "done"}]}),
        json.dumps({"instruction": "Do", "instances": [{"input": "x"}]}),
    ]) + "\n")
    with pytest.raises(InputError, match=r"s.jsonl:2 \(instance 0\): no 'output' field \(the response\)"):
        read_records(s, "s.jsonl", "self_instruct")
    s.write_text('{"instruction": "a", "instances": [}\n')
    with pytest.raises(InputError, match=r"s.jsonl:1: not valid JSON"):
        read_records(s, "s.jsonl", "self_instruct")
    s.write_text(json.dumps({"instruction": "Do", "instances": [{"input": "", "output": " "}]}) + "\n")
    with pytest.raises(InputError, match=r"s.jsonl:1 \(instance 0\): 'output' is empty"):
        read_records(s, "s.jsonl", "self_instruct")


def test_instruct_split_is_seeded_and_by_record():
    records = [[(f"p{i}", f"r{i}.{j}") for j in range(1 + i % 3)] for i in range(50)]
    train, val = split_records(records, 0.2, seed=7)
    assert split_records(records, 0.2, seed=7) == (train, val)
    assert split_records(records, 0.2, seed=8) != (train, val)
    assert len({p for p, _ in val}) == 10 and not {p for p, _ in val} & {p for p, _ in train}
    assert len(train) + len(val) == sum(len(r) for r in records)
    train, val = split_records(records, 0.5, seed=1, max_rows=10)
    assert len(train) + len(val) == 10


def test_gsm8k_format_switch_follows_default_files():
    p = params_with({"download": {"instruct": {"format": "gsm8k"}}})
    assert [f.filename for f in p.download.instruct.files] == ["gsm8k_train.jsonl"]
    assert [f.filename for f in Params().download.instruct.files] == [f.filename for f in SELF_INSTRUCT]


def test_gsm8k_selected_by_format_end_to_end(project, mirror, monkeypatch):
    monkeypatch.setenv("LMPIPE_TRACKING", "off")
    p = params_with({"download": {"max_bytes": 5_000,
                                  "instruct": {"format": "gsm8k", "max_rows": 50, "val_fraction": 0.2}}})
    m = run_download(p)
    assert (m["instruct_train_rows"], m["instruct_val_rows"]) == (40, 10)
    raw = [json.loads(line) for line in (mirror / "gsm8k_train.jsonl").read_text().splitlines()[:50]]
    rows = []
    for s in ("train", "val"):
        t = pq.read_table(project / "data" / "instruct" / f"{s}.parquet")
        rows += list(zip(t.column("prompt").to_pylist(), t.column("response").to_pylist()))
    assert sorted(rows) == sorted((r["question"], r["answer"]) for r in raw)
    source = json.loads((project / "data" / "instruct" / "source.json").read_text())
    assert source["format"] == "gsm8k" and source["sha256"] == p.download.instruct.files[0].sha256


# ----------------------------------------------------------------------------- hf source
@pytest.mark.parametrize("builder", ["parquet", "json"])
def test_hf_source_loads_offline_with_a_builder(project, tmp_path, builder):
    rows = {"text": ["first doc\r\nline two\n", None, "second doc\n"], "n": [1, 2, 3]}
    if builder == "parquet":
        pq.write_table(pa.table(rows), project / "shard.parquet")
        shard = "shard.parquet"
    else:
        shard = "shard.jsonl"
        (project / shard).write_text("".join(json.dumps({"text": t, "n": n}) + "\n"
                                             for t, n in zip(rows["text"], rows["n"])))
    p = params_with({"download": {"source": "hf", "hf": {"path": builder, "data_files": [shard]}}})
    docs, inputs, info, _ = load_corpus(p.download, None, tmp_path)
    assert docs == ["first doc\nline two\n", "second doc\n"]
    assert inputs == [{"name": shard, "sha256": sha256((project / shard).read_bytes()),
                       "bytes": (project / shard).stat().st_size}]
    assert info["hf"]["path"] == builder
    p = params_with({"download": {"source": "hf", "hf": {"path": builder, "data_files": [shard],
                                                          "text_field": "body"}}})
    with pytest.raises(InputError, match=r"download.hf.text_field: .* no column 'body' \(columns: text, n\)"):
        load_corpus(p.download, None, tmp_path)


# ----------------------------------------------------------------------------- publication
def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): md5_file(p) for p in sorted((root / "data").rglob("*")) if p.is_file()}


def test_full_run_outputs_and_a_failed_run_keeps_them(project, mirror, monkeypatch):
    monkeypatch.setenv("LMPIPE_TRACKING", "off")
    p = params_with({"download": {"max_bytes": 50_000, "instruct": {"max_rows": 100}}})
    m = run_download(p)
    corpus = project / "data" / "corpus"
    texts = split_texts(corpus)
    original = (mirror / "tinyshakespeare.txt").read_text()
    joined = "".join(texts["train"] + texts["val"] + texts["test"])
    assert original.startswith(joined) and 49_900 < len(joined.encode()) <= 50_000
    assert m["train_bytes"] + m["val_bytes"] + m["test_bytes"] == len(joined.encode())
    assert m["train_lines"] + m["val_lines"] + m["test_lines"] == joined.count("\n")
    assert m["sha256"] == TS_SHA and m["source"] == "url"
    assert m["instruct_train_rows"] + m["instruct_val_rows"] == 100
    instr = pq.read_table(project / "data" / "instruct" / "train.parquet")
    assert instr.column_names == ["prompt", "response"] and instr.num_rows == m["instruct_train_rows"]
    source = json.loads((corpus / "source.json").read_text())
    assert source["inputs"] == [{"name": "tinyshakespeare.txt", "sha256": TS_SHA, "bytes": 1115394,
                                 "url": p.download.files[0].url}]
    assert source["urls"] == [p.download.files[0].url] and source["bytes"] == 1115394
    before = _snapshot(project)
    # same params -> byte-identical outputs
    run_download(p)
    assert _snapshot(project) == before
    # a failing run (wrong pinned checksum) leaves every previous output untouched
    bad = params_with({"download": {"max_bytes": 50_000, "files": [
        {**p.download.files[0].model_dump(), "sha256": "f" * 64}]}})
    with pytest.raises(InputError, match="sha256 mismatch"):
        run_download(bad)
    assert _snapshot(project) == before
    assert sorted(x.name for x in (project / "data").iterdir()) == ["corpus", "instruct"]  # no temp left


def test_crash_while_writing_outputs_keeps_the_previous_ones(project, monkeypatch):
    monkeypatch.setenv("LMPIPE_TRACKING", "off")
    p = params_with({"download": {"max_bytes": 5_000, "instruct": {"max_rows": 20}}})
    run_download(p)
    before = _snapshot(project)
    calls = []

    def failing_write(path, columns):
        calls.append(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stage, "write_columns", failing_write)
    with pytest.raises(OSError, match="No space left"):
        run_download(params_with({"download": {"max_bytes": 9_000, "instruct": {"max_rows": 20}}}))
    # the corpus shards were already written in the temporary folder when the write failed
    assert calls and calls[0].name == "train.parquet"
    assert _snapshot(project) == before
    assert sorted(x.name for x in (project / "data").iterdir()) == ["corpus", "instruct"]


def test_download_params_errors_name_the_key():
    cases = {
        "download.split: train + val + test must sum to 1": {"download": {"split": {"train": 0.5}}},
        "download.fles: unknown key": {"download": {"fles": []}},
        "download.files.0.sha256": {"download": {"files": [{"url": "https://x/y", "sha256": "abc", "filename": "y"}]}},
        "download.encoding: unknown text encoding": {"download": {"encoding": "klingon"}},
        "download.instruct.val_fraction: must be < 1": {"download": {"instruct": {"val_fraction": 1.5}}},
        "download: source 'hf' needs download.hf": {"download": {"source": "hf"}},
    }
    for needle, overlay in cases.items():
        with pytest.raises(InputError) as err:
            params_with(overlay)
        assert needle in str(err.value), str(err.value)


def test_smoke_profile_is_small():
    smoke = validate_params(profile_dict("smoke")).download
    assert smoke.max_bytes is not None and smoke.max_bytes <= 300_000
    assert smoke.instruct.max_rows is not None


# ----------------------------------------------------------------------------- stage
def test_stage_end_to_end_subprocess(project, mlflow_uri):
    (project / "params.yaml").write_text(yaml.safe_dump(
        deep_merge(default_params_dict(), {"download": {"max_bytes": 20_000, "instruct": {"max_rows": 40}},
                                           "tracking": {"experiment": "test-download"}})))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "stages.download"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((project / "metrics" / "download.json").read_text())
    assert metrics["sha256"] == TS_SHA and metrics["val_documents"] == 1
    assert {f"{s}_{k}" for s in ("train", "val", "test") for k in ("bytes", "lines", "documents")} <= set(metrics)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("test-download")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "download" and run.info.status == "FINISHED"
    assert run.data.metrics["train_bytes"] == metrics["train_bytes"]
    assert run.data.params["download.max_bytes"] == "20000"
    inputs = {d.dataset.name: (d.dataset.digest, d.tags[0].value) for d in run.inputs.dataset_inputs}
    corpus = project / "data" / "corpus"
    assert inputs["corpus-train"] == (md5_file(corpus / "train" / "part-00000.parquet"), "train")
    assert inputs["corpus-test"] == (split_digest(corpus / "test"), "test")
    assert set(inputs) == {"corpus-train", "corpus-val", "corpus-test", "instruct-train", "instruct-val"}

    (project / "params.yaml").write_text(yaml.safe_dump({"download": {"split": {"train": 0.95}}}))
    proc = subprocess.run([sys.executable, "-m", "stages.download"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "stage download: error:" in proc.stderr and "download.split" in proc.stderr
