"""Training the BPE model: deterministic, exact round trip, errors that name the param.

The settings that make the model lossless are fixed (FIXED_TRAINER_OPTIONS in
lmpipe/tokenizer/model.py's docstring explains each); what a user tunes is in
`tokenizer:` of params.yaml.
"""

from __future__ import annotations

import heapq
import io
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from lmpipe.core.errors import InputError
from lmpipe.data.corpus import iter_text_batches, iter_texts
from lmpipe.tokenizer.model import (
    FIXED_TRAINER_OPTIONS,
    N_RESERVED,
    NEWLINE,
    Tokenizer,
    save_tokenizer,
)


def _read_documents(source: str | os.PathLike) -> Iterator[str]:
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: training text not found")
    if path.suffix == ".parquet" or path.is_dir():
        yield from iter_texts(path)
    else:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{path}: not UTF-8 (byte offset {err.start})") from None


def sample_documents(corpus: str | os.PathLike, sample_bytes: int | None, seed: int) -> list[str]:
    """A seeded sample of a corpus split's documents, about `sample_bytes` of text, in order.

    Every document gets a random key from a generator seeded with `seed`; the sample is the
    documents of smallest key, as many as fit in `sample_bytes` (the longest prefix of the
    key order that fits), returned in corpus order. One pass, and memory holds only the
    sample: a 100 GB split costs no more than a 100 MB one. Deterministic; the whole split,
    in order, when it fits (or `sample_bytes` is None), so a small corpus trains exactly as
    it did before sampling existed. Sampling whole documents keeps their lines together.
    """
    rng = np.random.default_rng(seed)
    heap: list[tuple[float, int, str, int]] = []  # (-key, index, document, bytes)
    total, blocked, index = 0, float("inf"), 0
    for batch in iter_text_batches(corpus):
        keys = rng.random(len(batch)).tolist()
        for key, doc in zip(keys, batch):
            index += 1
            if key >= blocked:  # a document of smaller key did not fit: this one is out
                continue
            size = len(doc.encode("utf-8"))
            heapq.heappush(heap, (-key, index, doc, size))
            total += size
            while sample_bytes is not None and total > sample_bytes:
                neg_key, _, _, dropped = heapq.heappop(heap)
                blocked, total = -neg_key, total - dropped
    return [doc for _, _, doc, _ in sorted(heap, key=lambda e: e[1])]


def _training_lines(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Non-empty lines of every document; a line longer than `max_bytes` UTF-8 bytes (which
    sentencepiece would silently drop) is cut into pieces, preferably before a space."""
    max_chars = max(1, max_bytes // 4)  # a character is at most 4 UTF-8 bytes
    for doc in docs:
        for line in doc.split(NEWLINE):
            if not line:
                continue
            if len(line) <= max_chars or len(line.encode("utf-8")) <= max_bytes:
                yield line
                continue
            start = 0
            while start < len(line):
                end = min(start + max_chars, len(line))
                if end < len(line):
                    cut = line.rfind(" ", start + 1, end)
                    if cut > start:
                        end = cut
                yield line[start:end]
                start = end


def train_tokenizer(
    texts_or_file: Iterable[str] | str | os.PathLike,
    vocab_size: int,
    num_threads: int = 1,
    model_prefix: str | os.PathLike | None = None,
    *,
    character_coverage: float = 1.0,
    max_sentence_length: int = 16384,
    input_sentence_size: int = 0,
    vocab_param: str = "tokenizer.vocab_size",
) -> Tokenizer:
    """Train the BPE model on documents (an iterable of str) or a file (.txt read whole as
    UTF-8, or .parquet with a `text` column; a str is always a path).

    Deterministic: the same input and arguments give a byte-identical model. With
    `model_prefix`, writes ``<prefix>.model`` and ``<prefix>.vocab`` atomically. A vocabulary
    size the corpus cannot support raises InputError naming `vocab_param`.
    """
    if isinstance(texts_or_file, (str, os.PathLike)):
        docs: Iterable[str] = _read_documents(texts_or_file)
    else:
        docs = texts_or_file
    if vocab_size < N_RESERVED:
        raise InputError(
            f"{vocab_param}: must be >= {N_RESERVED} ({N_RESERVED - 256} special pieces + 256 "
            f"byte pieces) plus one piece per distinct character of the corpus, got {vocab_size}"
        )
    n_lines = 0
    failure: list[BaseException] = []

    def sentences() -> Iterator[str]:
        # An error raised inside sentencepiece's reading loop would be reported as a bare
        # RuntimeError: keep it and re-raise it after training returns.
        nonlocal n_lines
        try:
            for line in _training_lines(docs, max_sentence_length):
                n_lines += 1
                yield line
        except Exception as err:
            failure.append(err)

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=buf,
            vocab_size=int(vocab_size),
            num_threads=int(num_threads),
            character_coverage=float(character_coverage),
            max_sentence_length=int(max_sentence_length),
            input_sentence_size=int(input_sentence_size),
            minloglevel=2,
            **FIXED_TRAINER_OPTIONS,
        )
    except RuntimeError as err:
        if failure:
            raise failure[0]
        raise _training_error(str(err), vocab_size, vocab_param, n_lines) from None
    if failure:
        raise failure[0]
    tok = Tokenizer(_strip_thread_count(buf.getvalue()), num_threads=num_threads)
    if model_prefix is not None:
        prefix = Path(model_prefix)
        save_tokenizer(tok, prefix.with_name(prefix.name + ".model"))
        tok.path = prefix.with_name(prefix.name + ".model")
    return tok


def _strip_thread_count(proto: bytes) -> bytes:
    """Drop the thread count sentencepiece records in the model's trainer spec.

    The learned pieces do not depend on it (tested), so the model file is then the same on a
    2-core laptop and a 16-core worker, and changing `tokenizer.num_threads` alone re-runs
    the stage without invalidating anything downstream (DVC sees identical outputs).
    """
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    model.trainer_spec.ClearField("num_threads")
    return model.SerializeToString(deterministic=True)


def _training_error(msg: str, vocab_size: int, vocab_param: str, n_lines: int) -> Exception:
    if n_lines == 0:
        return InputError("tokenizer: the training text is empty (no non-empty line)")
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if m:
        return InputError(
            f"{vocab_param}: {vocab_size} is too large for this training corpus: sentencepiece "
            f"can build at most {m.group(2)} pieces from it; lower {vocab_param} to <= "
            f"{m.group(2)} or train on more text"
        )
    m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:
        need = int(m.group(2))
        return InputError(
            f"{vocab_param}: must be >= {need} for this corpus ({N_RESERVED} reserved pieces + "
            f"{need - N_RESERVED} distinct characters), got {vocab_size}; raise {vocab_param} "
            f"or lower tokenizer.character_coverage"
        )
    return RuntimeError(f"sentencepiece training failed: {msg}")


