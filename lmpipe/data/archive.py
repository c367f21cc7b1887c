"""Safe extraction of tar / zip / gz sources.

Every member is checked before anything is written: an absolute path, a `..` component, a
drive letter, or a link pointing outside the extraction folder refuses the whole archive
with an InputError. Only regular files are written (links, devices and FIFOs are never
created), so a symlink member cannot redirect a later member either.
"""

from __future__ import annotations

import fnmatch
import gzip
import posixpath
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from lmpipe.core.errors import InputError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def archive_kind(name: str) -> str | None:
    """'tar', 'zip', 'gz' or None, from the file name."""
    low = name.lower()
    if low.endswith(_TAR_SUFFIXES):
        return "tar"
    if low.endswith(".zip"):
        return "zip"
    if low.endswith(".gz"):
        return "gz"
    return None


@dataclass(frozen=True)
class Member:
    path: Path  # the extracted file
    label: str  # "archive.tar.gz:dir/file.txt", for error messages


def _check_name(name: str, label: str) -> str:
    """The member's normalised relative path, or InputError if it would escape."""
    norm = name.replace("\\", "/")
    parts = norm.split("/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or ".." in parts:
        raise InputError(
            f"{label}: member {name!r} would be written outside the extraction folder; "
            "refusing the archive"
        )
    rel = posixpath.normpath(norm)
    return "" if rel == "." else rel


def _check_link(name: str, target: str, label: str, *, hard: bool = False) -> None:
    """A link member is never created, but one that points outside marks a hostile archive."""
    base = "" if hard else posixpath.dirname(name.replace("\\", "/"))
    dest = posixpath.normpath(posixpath.join(base, target.replace("\\", "/")))
    if target.startswith("/") or re.match(r"^[A-Za-z]:", target) or dest == ".." or dest.startswith("../"):
        raise InputError(
            f"{label}: link member {name!r} -> {target!r} points outside the extraction folder; "
            "refusing the archive"
        )


def _wanted(rel: str, pattern: str | None) -> bool:
    parts = rel.split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    if pattern is not None:
        return fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(parts[-1], pattern)
    return rel.lower().endswith(TEXT_SUFFIXES)


def _target(dest: Path, rel: str, label: str, name: str) -> Path:
    out = (dest / rel).resolve()
    if not out.is_relative_to(dest.resolve()):
        raise InputError(f"{label}: member {name!r} resolves outside the extraction folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def extract(archive: Path, dest: Path, label: str, pattern: str | None = None) -> list[Member]:
    """Extract the text members of `archive` into `dest`; returns them sorted by path."""
    kind = archive_kind(label) or archive_kind(archive.name)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "tar":
            members = _extract_tar(archive, dest, label, pattern)
        elif kind == "zip":
            members = _extract_zip(archive, dest, label, pattern)
        elif kind == "gz":
            members = _extract_gz(archive, dest, label)
        else:
            raise InputError(f"{label}: not an archive (.tar, .tar.gz, .tgz, .zip, .gz)")
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise InputError(f"{label}: not a readable {kind} archive ({err})") from None
    if not members:
        what = f"matching {pattern!r}" if pattern else "with a .txt/.jsonl/.parquet name"
        raise InputError(f"{label}: the archive has no member {what}")
    return sorted(members, key=lambda m: m.label)


def _extract_tar(archive: Path, dest: Path, label: str, pattern: str | None) -> list[Member]:
    out = []
    with tarfile.open(archive, "r:*") as tar:
        infos = tar.getmembers()
        for info in infos:  # validate everything before writing anything
            _check_name(info.name, label)
            if info.issym() or info.islnk():
                _check_link(info.name, info.linkname, label, hard=info.islnk())
        for info in infos:
            rel = _check_name(info.name, label)
            if not info.isfile() or not rel or not _wanted(rel, pattern):
                continue
            src = tar.extractfile(info)
            if src is None:
                continue
            with src, open(_target(dest, rel, label, info.name), "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
            out.append(Member(dest / rel, f"{label}:{rel}"))
    return out


def _extract_zip(archive: Path, dest: Path, label: str, pattern: str | None) -> list[Member]:
    out = []
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            _check_name(info.filename, label)
            if stat.S_ISLNK(info.external_attr >> 16):
                _check_link(info.filename, zf.read(info).decode("utf-8", "replace"), label)
        for info in infos:
            rel = _check_name(info.filename, label)
            mode = info.external_attr >> 16
            if info.is_dir() or stat.S_ISLNK(mode) or not rel or not _wanted(rel, pattern):
                continue
            with zf.open(info) as src, open(_target(dest, rel, label, info.filename), "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
            out.append(Member(dest / rel, f"{label}:{rel}"))
    return out


def _extract_gz(archive: Path, dest: Path, label: str) -> list[Member]:
    name = Path(label).name
    rel = name[: -len(".gz")] or "data"
    with gzip.open(archive, "rb") as src, open(_target(dest, rel, label, rel), "wb") as f:
        shutil.copyfileobj(src, f, 1 << 20)
    return [Member(dest / rel, f"{label}:{rel}")]
