"""From raw bytes to text: strict decoding, LF newlines, Project Gutenberg boilerplate.

Decoding is strict: a byte sequence that is not valid in the configured encoding is an
error naming the file and the byte offset, never a silent replacement character. Newlines
are normalised to LF. lmpipe/data/reading.py applies the same rules a block at a time.
"""

from __future__ import annotations

import codecs
import re

from lmpipe.core.errors import InputError

_START = re.compile(r"^\*\*\*\s*START OF[^\n]*(?:\n|$)", re.MULTILINE | re.IGNORECASE)
_END = re.compile(r"^\*\*\*\s*END OF", re.MULTILINE | re.IGNORECASE)


# ----------------------------------------------------------------------------- decoding
def normalize_newlines(text: str) -> str:
    """CRLF (and a lone CR) -> LF."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def decode(data: bytes, encoding: str, label: str) -> str:
    """Strictly decode `data`; a NUL byte or an invalid sequence names `label` and the offset."""
    codec = codecs.lookup(encoding).name
    if not codec.startswith(("utf-16", "utf-32")):
        nul = data.find(b"\x00")
        if nul != -1:
            raise InputError(
                f"{label}: looks like a binary file (NUL byte at byte offset {nul}), not {encoding} text"
            )
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        bad = data[err.start : min(err.end, err.start + 4)].hex(" ")
        hint = (
            "; if the file uses another encoding, name it in download.encoding (e.g. latin-1)"
            if codec == "utf-8"
            else ""
        )
        raise InputError(
            f"{label}: not valid {encoding} at byte offset {err.start} (byte(s) {bad}: {err.reason}){hint}"
        ) from None
    return normalize_newlines(text.removeprefix("\ufeff"))


def strip_gutenberg(text: str) -> str:
    """Keep what lies between '*** START OF ...' and '*** END OF ...' (when present)."""
    if m := _START.search(text):
        text = text[m.end() :]
    if m := _END.search(text):
        text = text[: m.start()]
    text = text.strip("\n")
    return text + "\n" if text else ""
