"""Text of generated ids, as `chat` and `generate` print it: never a U+FFFD for a character
whose bytes were cut.

The tokenizer spells a character it has no piece for as its UTF-8 bytes, one token each
(`<0xE2>` `<0x80>` `<0x94>`). A model that stops after `<0xE2>` (the token budget ran out,
or it sampled another piece next) leaves bytes that are no character; decoded at once they
print as U+FFFD. Here bytes are held until they complete a character; bytes that never do
are dropped, and counted so the caller can say so.
"""

from __future__ import annotations

from typing import Iterable

SPACE = "\u2581"   # sentencepiece's stand-in for a space inside a piece


class Utf8Holder:
    """An incremental UTF-8 decoder that holds an unfinished character and drops bytes that
    can never be one (instead of printing U+FFFD)."""

    def __init__(self) -> None:
        self._held = b""
        self.dropped = 0

    def feed(self, data: bytes) -> str:
        buf, out = self._held + data, []
        while buf:
            try:
                out.append(buf.decode("utf-8"))
                buf = b""
            except UnicodeDecodeError as err:
                out.append(buf[:err.start].decode("utf-8"))
                if err.reason == "unexpected end of data" and err.end == len(buf):
                    buf = buf[err.start:]          # an unfinished character: hold it
                    break
                self.dropped += err.end - err.start
                buf = buf[err.end:]
        self._held = buf
        return "".join(out)

    def finish(self) -> str:
        """End of the text: held bytes will never complete a character."""
        self.dropped += len(self._held)
        self._held = b""
        return ""


def token_bytes(tok, token_id: int) -> bytes:
    """The UTF-8 bytes one token stands for (nothing for control tokens)."""
    if tok.is_special(token_id):
        return b""
    piece = tok.id_to_piece(token_id)
    if tok.is_byte(token_id):                      # `<0xE2>`
        return bytes([int(piece[3:5], 16)])
    return piece.replace(SPACE, " ").encode("utf-8")


def display_text(tok, ids: Iterable[int]) -> tuple[str, int]:
    """(the text of `ids`, bytes dropped because they formed no character)."""
    holder = Utf8Holder()
    text = "".join(holder.feed(token_bytes(tok, int(i))) for i in ids) + holder.finish()
    return text, holder.dropped


class HoldingTokenizer:
    """A tokenizer whose decode() goes through display_text; everything else is the
    tokenizer's own (`generate_reply` encodes the chat template with it)."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.dropped = 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def decode(self, ids, **_) -> str:
        text, dropped = display_text(self._tok, ids)
        self.dropped += dropped
        return text


def dropped_note(dropped: int) -> str:
    return (f"({dropped} byte(s) of an unfinished character left out)" if dropped else "")


def clean_continuation(text: str, prompt: str) -> tuple[str, int]:
    """`text` (prompt + continuation, decoded at once) without the U+FFFD of bytes that never
    formed a character. Decoding the whole id list already holds bytes across tokens, so a
    U+FFFD left in the continuation stands for such bytes; the prompt, which the user typed,
    is kept as it is. Returns (text, replacement characters removed)."""
    if not text.startswith(prompt):
        return text, 0
    rest = text[len(prompt):]
    kept = rest.replace("\ufffd", "")
    return prompt + kept, len(rest) - len(kept)
