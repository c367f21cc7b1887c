"""Getting a pinned raw file: offline mirror, then the local cache, then HTTP.

Every path ends in the same check: the file's sha256 must equal the pinned one before any
caller sees it. The HTTP path streams to `<cache>/<filename>.part` with a progress bar,
retries transient failures with exponential backoff and resumes the partial file with an
HTTP Range request, so a dropped connection costs only the bytes not yet received.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

from lmpipe.core.console import note
from lmpipe.core.errors import InputError
from lmpipe.core.files import sha256_file
from lmpipe.core.names import MIRROR_ENV
from lmpipe.core.params import RemoteFile
from lmpipe.core.paths import project_root, scratch_dir

CHUNK = 1 << 16
MAX_DELAY_S = 60.0
USER_AGENT = "lmpipe-download/0.1 (+python-requests)"


class DownloadError(RuntimeError):
    """The network failed after every retry (exit 1: a later retry may succeed)."""


class _Transient(Exception):
    """A failure worth retrying (5xx, 429, a connection dropped mid-file)."""


@dataclass(frozen=True)
class Fetched:
    """A verified local copy of one pinned file."""

    path: Path
    name: str  # the RemoteFile's filename
    url: str
    sha256: str
    bytes: int
    origin: str  # "mirror" | "cache" | "network"


def say(msg: str) -> None:
    note(f"download: {msg}")


def _sleep(seconds: float) -> None:  # a seam for tests
    time.sleep(seconds)


# ----------------------------------------------------------------------------- locations
def mirror_dir(configured: str | None = None) -> Path | None:
    """The offline mirror: LMPIPE_MIRROR if set (non-empty), else `data.mirror`, else None."""
    env = os.environ.get(MIRROR_ENV, "").strip()
    if env:
        path, label = Path(env).expanduser(), f"{MIRROR_ENV}={env}"
    elif configured:
        path, label = Path(configured).expanduser(), f"data.mirror: {configured}"
        if not path.is_absolute():
            path = project_root() / path
    else:
        return None
    if not path.is_dir():
        raise InputError(f"{label}: the offline mirror is not a folder")
    return path.resolve()


def cache_dir() -> Path:
    """Verified downloads and resumable `.part` files (outside data/, so DVC never deletes them)."""
    return scratch_dir() / "cache" / "downloads"


def mirror_candidates(remote: RemoteFile) -> list[str]:
    """Names looked up in the mirror: the filename, its base name, the URL's base name."""
    url_name = unquote(PurePosixPath(urlparse(remote.url).path).name)
    names = [remote.filename, PurePosixPath(remote.filename).name, url_name]
    return [n for i, n in enumerate(names) if n and n not in names[:i]]


def find_in_mirror(mirror: Path, remote: RemoteFile) -> Path | None:
    for name in mirror_candidates(remote):
        candidate = mirror / name
        if candidate.is_file():
            return candidate
    return None


def _mismatch(what: str, expected: str, actual: str) -> InputError:
    return InputError(
        f"{what}: sha256 mismatch: expected {expected}, got {actual} "
        "(the file changed upstream or is corrupt; fix the pinned sha256 in params only if you "
        "trust the new file)"
    )


# ----------------------------------------------------------------------------- fetch
def fetch(
    remote: RemoteFile,
    *,
    mirror: Path | None,
    retries: int = 4,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
    cache: Path | None = None,
) -> Fetched:
    """A verified local copy of `remote`: mirror, then cache, then the network."""
    cache = cache or cache_dir()
    if mirror is not None:
        hit = find_in_mirror(mirror, remote)
        if hit is not None:
            actual = sha256_file(hit)
            if actual != remote.sha256:
                raise _mismatch(f"{hit} (offline mirror copy of {remote.filename})", remote.sha256, actual)
            say(f"{remote.filename}: offline mirror hit {hit}")
            return Fetched(hit, remote.filename, remote.url, actual, hit.stat().st_size, "mirror")

    final = cache / remote.filename
    if final.is_file():
        if sha256_file(final) == remote.sha256:
            say(f"{remote.filename}: cached at {final}")
            return Fetched(final, remote.filename, remote.url, remote.sha256, final.stat().st_size, "cache")
        say(f"{remote.filename}: cached copy has the wrong sha256; downloading again")
        final.unlink()

    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    for fresh in (False, True):
        if fresh and part.exists():
            part.unlink()
        try:
            resumed = http_download(
                remote.url, part, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s,
                label=remote.filename,
            )
        except DownloadError as err:
            raise DownloadError(
                f"{err} (working offline? set {MIRROR_ENV} to a folder holding {remote.filename})"
            ) from None
        actual = sha256_file(part)
        if actual == remote.sha256:
            os.replace(part, final)
            say(f"{remote.filename}: downloaded {final.stat().st_size:,} bytes from {remote.url}")
            return Fetched(final, remote.filename, remote.url, actual, final.stat().st_size, "network")
        part.unlink()
        if not resumed or fresh:
            raise _mismatch(remote.url, remote.sha256, actual)
        say(f"{remote.filename}: resumed file fails its checksum; downloading it from the start")
    raise AssertionError("unreachable")


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def http_download(
    url: str,
    part: Path,
    *,
    retries: int = 4,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
    label: str | None = None,
    session=None,
) -> bool:
    """Stream `url` into `part`, resuming what is already there. Returns whether it resumed.

    4xx answers (other than 408/429) are the user's problem: InputError, no retry. Dropped
    connections, timeouts, 5xx, 408 and 429 are retried `retries` times, waiting
    `backoff_s * 2**attempt` seconds (at most 60) between tries.
    """
    label = label or url
    session = session or requests.Session()
    resumed = False
    attempt = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with session.get(url, stream=True, timeout=timeout_s, headers=headers) as resp:
                code = resp.status_code
                if code == 416 and offset:
                    part.unlink()  # the partial file is not a prefix the server recognises
                    raise _Transient(f"HTTP 416 for a resume at byte {offset}; restarting")
                if code in (408, 429) or code >= 500:
                    raise _Transient(f"HTTP {code} {resp.reason}")
                if code >= 400:
                    raise InputError(f"{url}: HTTP {code} {resp.reason} (file missing or not public)")
                if code == 206 and offset:
                    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != offset:
                        part.unlink()
                        raise _Transient(
                            f"server resumed at the wrong offset ({resp.headers.get('Content-Range')!r}"
                            f" for byte {offset}); restarting"
                        )
                    mode, resumed = "ab", True
                else:  # 200: the server sent the whole file (it may ignore Range)
                    mode, offset = "wb", 0
                length = resp.headers.get("Content-Length")
                total = offset + int(length) if length and length.isdigit() else None
                with open(part, mode) as out, tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=f"download {label}", mininterval=0.5, leave=False,
                ) as bar:
                    for chunk in resp.iter_content(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
                size = part.stat().st_size
                if total is not None and size < total:
                    raise _Transient(f"connection closed after {size} of {total} bytes")
                return resumed
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                _Transient) as err:
            if attempt >= retries:
                raise DownloadError(
                    f"{url}: giving up after {attempt + 1} attempt(s): {type(err).__name__}: {err}"
                ) from None
            delay = min(backoff_s * 2**attempt, MAX_DELAY_S)
            have = part.stat().st_size if part.exists() else 0
            say(
                f"{label}: {type(err).__name__}: {err}; retry {attempt + 1}/{retries} in {delay:.2g}s"
                + (f", resuming at byte {have}" if have else "")
            )
            _sleep(delay)
            attempt += 1
