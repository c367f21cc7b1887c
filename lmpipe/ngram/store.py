"""An n-gram model folder: data/models/ngram/ holds model.npz and, for Kneser-Ney, the same
model as model.arpa.gz (for KenLM or SRILM). A folder with only an ARPA file (built by
another toolkit over the same token ids) loads too."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lmpipe.core.errors import InputError
from lmpipe.core.files import atomic_dir
from lmpipe.core.names import ARPA_FILE, NGRAM_FILE
from lmpipe.ngram.arpa import read_arpa, write_arpa
from lmpipe.ngram.model import NgramModel


def is_ngram_folder(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / NGRAM_FILE).exists() or (folder / ARPA_FILE).exists()


def load_ngram(folder: str | os.PathLike) -> NgramModel:
    """The model of a folder, memory-mapped (model.npz), or read from its ARPA file."""
    folder = Path(folder)
    if folder.is_dir() and not (folder / NGRAM_FILE).exists() and (folder / ARPA_FILE).exists():
        return read_arpa(folder / ARPA_FILE)
    if folder.is_dir() and not (folder / NGRAM_FILE).exists():
        raise InputError(f"{folder}: no n-gram model here ({NGRAM_FILE} or {ARPA_FILE}); "
                         "run `dvc repro ngram`")
    return NgramModel.load(folder, mmap=True)


def save_ngram(model: NgramModel, folder: str | os.PathLike, arpa: bool = True) -> float:
    """Publish the folder atomically: model.npz, plus model.arpa.gz when `arpa` and the model
    has back-off weights (Kneser-Ney). Returns the seconds spent writing ARPA."""
    arpa_seconds = 0.0
    with atomic_dir(folder) as tmp:
        model.save(tmp)
        if arpa and model.backoff:
            t0 = time.perf_counter()
            write_arpa(model, tmp / ARPA_FILE)
            arpa_seconds = time.perf_counter() - t0
    return arpa_seconds
