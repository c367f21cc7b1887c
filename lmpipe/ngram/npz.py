"""The model file: an uncompressed .npz, written deterministically, readable memory-mapped.

An uncompressed (ZIP_STORED) member of a zip archive is the .npy file byte for byte at a
fixed offset, so it can be memory-mapped where it lies: a model far larger than memory is
opened at once and scored with only the pages its lookups touch (KenLM's mmap loading).
The writer stamps no timestamps, so the same model gives a byte-identical file (DVC), and
streams each array in slices (a memory-mapped level is never read into memory whole).
"""

from __future__ import annotations

import mmap
import struct
import zipfile
from pathlib import Path

import numpy as np

_LOCAL_HEADER = 30   # bytes of a zip local file header before the name and extra field


def _mapping(arr: np.ndarray) -> mmap.mmap | None:
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base


def release(arr: np.ndarray) -> None:
    """Drop the resident pages of a memory-mapped array: they stay in the page cache (a
    later read maps them again at no I/O cost) but no longer count as this process's RSS."""
    mapping = _mapping(arr)
    if mapping is not None:
        mapping.madvise(mmap.MADV_DONTNEED)


def prefetch(arr: np.ndarray) -> None:
    """Ask the kernel to read a memory-mapped array ahead, in large sequential reads: random
    lookups would otherwise fault its pages in one at a time."""
    mapping = _mapping(arr)
    if mapping is not None:
        mapping.madvise(mmap.MADV_WILLNEED)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez without timestamps and without compression. A memory-mapped 1-D array is
    copied a slice at a time and its pages released as it goes, so saving a model far
    larger than memory does not grow the RSS (the bytes written are write_array's)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                if _mapping(arr) is None or arr.ndim != 1:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
                    continue
                np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
                step = max(1, (16 << 20) // arr.itemsize)
                for i, a in enumerate(range(0, arr.shape[0], step)):
                    f.write(np.ascontiguousarray(arr[a:a + step]).tobytes())
                    if i % 16 == 15:
                        release(arr)
                release(arr)


def _member_memmap(path: Path, info: zipfile.ZipInfo) -> np.ndarray:
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(_LOCAL_HEADER)
        if header[:4] != b"PK\x03\x04":
            raise ValueError(f"member {info.filename}: no local file header")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        f.seek(info.header_offset + _LOCAL_HEADER + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"member {info.filename}: object arrays are refused")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                     order="F" if fortran else "C")


def read_npz(path: Path, mmap: bool = False) -> dict[str, np.ndarray]:
    """Every array of an .npz file by name; memory-mapped where stored uncompressed when
    `mmap`, else read into memory (np.load, no pickles)."""
    out: dict[str, np.ndarray] = {}
    if mmap:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
        for info in members:
            name = info.filename.removesuffix(".npy")
            if info.compress_type == zipfile.ZIP_STORED:
                out[name] = _member_memmap(path, info)
        if len(out) == len(members):
            return out
    with np.load(path, allow_pickle=False) as z:
        for name in z.files:
            if name not in out:
                out[name] = z[name]
    return out
