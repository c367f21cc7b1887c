"""The project's tokenizer: a sentencepiece BPE model that round-trips any text exactly.

Why the sentencepiece settings look the way they do
---------------------------------------------------
sentencepiece's defaults lose information: NFKC normalisation rewrites characters, whitespace
runs are collapsed, a dummy space is prefixed, newlines cannot be represented (training reads
one line at a time) and unseen characters become `<unk>`. Here:

* normalisation is the identity, extra whitespace is kept and no dummy prefix is added;
* `byte_fallback` spells any character that has no piece as its UTF-8 bytes (`<0xNN>`), so
  there is never an `<unk>`;
* `"\\n"` is a user-defined symbol: one piece of its own, never merged with anything, so a
  text can be encoded line by line (in parallel) and give the same ids as encoding it whole;
* a literal U+2581 (``▁``, sentencepiece's internal stand-in for a space) in the text would
  come back as a space, so the wrapper encodes it as its three UTF-8 byte pieces instead.

With these, ``decode(encode(text)) == text`` for every Python string that has a UTF-8 form
(every string without lone surrogates; all text read from UTF-8 files qualifies).

Special tokens
--------------
Fixed ids, the same for every vocabulary size::

    0 <unk>   1 <s> (BOS)   2 </s> (EOS)   3 <pad>   4 <|im_start|>   5 <|im_end|>   6 "\\n"

followed by the 256 byte pieces (7..262) and the learned merges. `<s>`, `</s>`, `<pad>`,
`<|im_start|>` and `<|im_end|>` are sentencepiece *control* symbols: ``encode`` never
produces them from text. A user's message that contains the literal string ``<|im_end|>``
is encoded as ordinary pieces (``<``, ``|``, ``im``, ...), so it cannot close a chat turn or
forge a role. Code that builds prompts inserts the ids itself (``[tok.im_start_id] +
tok.encode("user\\n" + msg) + [tok.im_end_id]``) or, for a *trusted* template string only,
passes ``allow_special=True`` to ``encode`` (the tiktoken convention). ``decode`` drops
control tokens by default and renders them as their literal text with ``skip_special=False``.

Training the model is lmpipe/tokenizer/training.py; the token files it produces are
lmpipe/data/tokens.py.
"""

from __future__ import annotations

import json
import os
import re
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import sentencepiece as spm

from lmpipe.core.errors import InputError
from lmpipe.core.files import atomic_path
from lmpipe.core.names import TOKENIZER_FILE
from lmpipe.core.paths import tokenizer_dir
from lmpipe.data.tokens import token_dtype

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
NEWLINE = "\n"
CONTROL_SYMBOLS = (IM_START, IM_END)  # after unk/bos/eos/pad, which sentencepiece places itself
USER_SYMBOLS = (NEWLINE,)
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID, NEWLINE_ID = range(7)
# Pieces every model has before any learned merge: the 7 above and the 256 byte pieces.
N_RESERVED = 7 + 256

SPACE_SYMBOL = "\u2581"  # sentencepiece's escaped space; a literal one is byte-encoded
_SPACE_SYMBOL_BYTES = tuple(f"<0x{b:02X}>" for b in SPACE_SYMBOL.encode("utf-8"))

# Settings that are part of the format, not tunable params (see the module docstring).
FIXED_TRAINER_OPTIONS: dict[str, Any] = dict(
    model_type="bpe",
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    byte_fallback=True,
    split_digits=True,  # numbers as digit sequences (arithmetic data in SFT)
    allow_whitespace_only_pieces=True,  # runs of spaces (indentation) may become pieces
    split_by_whitespace=True,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    pad_id=PAD_ID,
    control_symbols=list(CONTROL_SYMBOLS),
    user_defined_symbols=list(USER_SYMBOLS),
    # Determinism: no sampling or shuffling of the input; a sample (input_sentence_size > 0)
    # takes the first lines. Training reads sentences from an iterator and writes the model
    # to memory, so no file name or path is recorded in the model.
    shuffle_input_sentence=False,
    hard_vocab_limit=True,
)


# ----------------------------------------------------------------------------- the wrapper
class Tokenizer:
    """A loaded sentencepiece model with the project's special tokens and exact round trip."""

    def __init__(self, model_proto: bytes, path: str | os.PathLike | None = None,
                 num_threads: int | None = None):
        self._proto = bytes(model_proto)
        self.path = Path(path) if path is not None else None
        self.num_threads = int(num_threads or min(os.cpu_count() or 1, 16))
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(self._proto)
        except Exception as err:
            where = f"{self.path}: " if self.path else ""
            raise InputError(f"{where}not a sentencepiece model ({err})") from None
        self._sp = sp
        self._check_layout()
        self.vocab_size: int = sp.get_piece_size()
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = UNK_ID, BOS_ID, EOS_ID, PAD_ID
        self.im_start_id, self.im_end_id, self.newline_id = IM_START_ID, IM_END_ID, NEWLINE_ID
        self._space_symbol_ids = [sp.piece_to_id(p) for p in _SPACE_SYMBOL_BYTES]
        self._control_ids = frozenset(i for i in range(self.vocab_size) if sp.is_control(i))
        self.special_tokens: dict[str, int] = {
            BOS: BOS_ID, EOS: EOS_ID, PAD: PAD_ID, IM_START: IM_START_ID, IM_END: IM_END_ID,
        }
        self._special_re = re.compile(
            "(" + "|".join(re.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)) + ")"
        )

    def _check_layout(self) -> None:
        sp = self._sp
        expected = [UNK, BOS, EOS, PAD, IM_START, IM_END, NEWLINE]
        found = [sp.id_to_piece(i) for i in range(min(len(expected), sp.get_piece_size()))]
        bytes_ok = sp.get_piece_size() >= N_RESERVED and all(
            sp.is_byte(7 + b) for b in range(256)
        )
        if found != expected or not bytes_ok:
            where = f"{self.path}: " if self.path else ""
            raise InputError(
                f"{where}not an lmpipe tokenizer (expected the reserved pieces {expected!r} "
                f"and 256 byte pieces first, found {found!r}); retrain it with `dvc repro tokenizer`"
            )

    # -- construction
    @classmethod
    def load(cls, path: str | os.PathLike | None = None, num_threads: int | None = None) -> "Tokenizer":
        """Load a model file (default: data/tokenizer/tokenizer.model under the project root)."""
        path = Path(path) if path is not None else tokenizer_dir() / TOKENIZER_FILE
        try:
            proto = path.read_bytes()
        except FileNotFoundError:
            raise InputError(f"{path}: tokenizer model not found; run `dvc repro tokenizer`") from None
        return cls(proto, path=path, num_threads=num_threads)

    @property
    def model_proto(self) -> bytes:
        """The serialized model (the exact bytes of tokenizer.model)."""
        return self._proto

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={str(self.path) if self.path else None!r})"

    # -- encoding
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Ids of `text`; ``decode`` gives back exactly `text`.

        With ``allow_special=True`` the literal strings ``<s>``, ``</s>``, ``<pad>``,
        ``<|im_start|>`` and ``<|im_end|>`` become their control ids: use it only for trusted
        template text, never for user input.
        """
        return self.encode_batch([text], allow_special=allow_special)[0]

    def encode_batch(self, texts: Iterable[str], *, allow_special: bool = False,
                     num_threads: int | None = None) -> list[list[int]]:
        """``[encode(t) for t in texts]``, encoded in parallel by sentencepiece."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode expects str, got {type(t).__name__} at index {i}")
        if allow_special:
            return [self._encode_with_special(t, num_threads) for t in texts]
        return self._encode_plain(texts, num_threads)

    def _encode_plain(self, texts: list[str], num_threads: int | None) -> list[list[int]]:
        if not texts:
            return []
        threads = num_threads or self.num_threads
        try:
            out = self._sp.encode(texts, out_type=int, num_threads=threads)
        except (TypeError, UnicodeError):
            for t in texts:  # name the culprit: a lone surrogate has no UTF-8 form
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise ValueError(
                        f"text has no UTF-8 form ({err.reason} at character {err.start}); "
                        "only valid Unicode text can be tokenized"
                    ) from None
            raise
        for i, t in enumerate(texts):
            if SPACE_SYMBOL in t:  # rare: a literal U+2581 would decode as a space
                parts = self._sp.encode(t.split(SPACE_SYMBOL), out_type=int, num_threads=1)
                ids = list(parts[0])
                for part in parts[1:]:
                    ids.extend(self._space_symbol_ids)
                    ids.extend(part)
                out[i] = ids
        return out

    def _encode_with_special(self, text: str, num_threads: int | None) -> list[int]:
        chunks = self._special_re.split(text)  # odd positions are the special strings
        plain = self._encode_plain(chunks[0::2], num_threads)
        ids: list[int] = list(plain[0])
        for special, part in zip(chunks[1::2], plain[1:]):
            ids.append(self.special_tokens[special])
            ids.extend(part)
        return ids

    # -- decoding
    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special: bool = True) -> str:
        """Text of `ids`. Control tokens (BOS, EOS, PAD, chat markers) are dropped, or shown
        as their literal text with ``skip_special=False``."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        else:
            ids = [int(i) for i in ids]
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is out of range for a vocabulary of {n}")
        if skip_special or not self._control_ids.intersection(ids):
            return self._sp.decode(ids)
        out, run = [], []
        for i in ids:
            if i in self._control_ids:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    # -- vocabulary
    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        """Id of a piece string (the unk id when it is not in the vocabulary)."""
        return self._sp.piece_to_id(piece)

    def is_special(self, i: int) -> bool:
        """True for control tokens (BOS, EOS, PAD, chat markers) and UNK."""
        return int(i) in self._control_ids or int(i) == self.unk_id

    def is_byte(self, i: int) -> bool:
        return self._sp.is_byte(int(i))

    def pieces(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def vocab_tsv(self) -> str:
        """A readable vocabulary: id, piece (as a JSON string), score, kind."""
        sp = self._sp
        lines = ["id\tpiece\tscore\tkind"]
        for i in range(self.vocab_size):
            kind = (
                "unknown" if sp.is_unknown(i) else "control" if sp.is_control(i)
                else "byte" if sp.is_byte(i) else "user" if i == NEWLINE_ID else "normal"
            )
            lines.append(f"{i}\t{json.dumps(sp.id_to_piece(i), ensure_ascii=False)}\t{sp.get_score(i):g}\t{kind}")
        return "\n".join(lines) + "\n"

    def special_ids(self) -> dict[str, int]:
        return {
            "unk_id": self.unk_id, "bos_id": self.bos_id, "eos_id": self.eos_id,
            "pad_id": self.pad_id, "im_start_id": self.im_start_id, "im_end_id": self.im_end_id,
            "newline_id": self.newline_id,
        }

    # -- bulk encoding of documents
    def encode_documents(self, docs: Sequence[str], *, num_threads: int | None = None) -> np.ndarray:
        """One flat array: each document's ids followed by EOS.

        Documents are cut at newlines and the lines encoded as one batch: since ``"\\n"`` is
        a piece of its own that never merges, this equals ``encode(doc) + [eos]`` per document.
        Lines are also cheaper for sentencepiece than whole documents (about 20% less CPU
        per byte, measured) and spread one long document over every thread.
        """
        lines: list[str] = []
        counts: list[int] = []
        for doc in docs:
            parts = doc.split(NEWLINE)
            lines.extend(parts)
            counts.append(len(parts))
        encoded = self._encode_plain(lines, num_threads or self.num_threads)
        # every line is followed by one separator: "\n" inside its document, EOS at its end
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        dtype = token_dtype(self.vocab_size)
        out = np.empty(int(lengths.sum()) + len(lines), dtype=dtype)
        sep = np.cumsum(lengths + 1) - 1
        is_token = np.ones(out.shape[0], dtype=bool)
        is_token[sep] = False
        out[is_token] = np.fromiter(chain.from_iterable(encoded), dtype=dtype, count=int(lengths.sum()))
        out[sep] = self.newline_id
        out[sep[np.cumsum(np.asarray(counts, dtype=np.int64)) - 1]] = self.eos_id
        return out


def save_tokenizer(tok: Tokenizer, model_path: str | os.PathLike, vocab: bool = True) -> Path:
    """Write the model (and a readable .vocab beside it) atomically."""
    model_path = Path(model_path)
    with atomic_path(model_path) as tmp:
        tmp.write_bytes(tok.model_proto)
    if vocab:
        with atomic_path(model_path.with_suffix(".vocab")) as tmp:
            tmp.write_text(tok.vocab_tsv(), encoding="utf-8")
    return model_path
