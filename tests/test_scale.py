"""Large corpora: the `large` profile end to end on a stand-in for its Hub dataset, and the
benchmark scripts the README shows (benchmarks/corpus.py, benchmarks/scale.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from lmpipe.core.params import validate_params
from lmpipe.core.profiles import deep_merge, profile_dict
from lmpipe.core.records import read_stage_metrics
from tests.conftest import REPO


def _stories(mirror: Path, folder: Path, n_files: int = 3, rows: int = 5000) -> list[Path]:
    """Parquet files shaped like the Hub's TinyStories shards (a `text` column, row groups)."""
    text = (mirror / "tinystories_train_head_1k.txt").read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("\n\n") if s.strip()]
    folder.mkdir(parents=True)
    paths = []
    for i in range(n_files):
        docs = [f"{stories[(i * rows + j) % len(stories)]} ({i}.{j})" for j in range(rows)]
        paths.append(folder / f"train-{i:05d}-of-{n_files:05d}.parquet")
        pq.write_table(pa.table({"text": docs}), paths[-1], row_group_size=500)
    return paths


def test_lmpipe_profile_large_writes_valid_params(tmp_path):
    out = tmp_path / "params.yaml"
    proc = subprocess.run([sys.executable, "-m", "lmpipe.cli", "profile", "large", "--output", str(out)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    params = validate_params(yaml.safe_load(out.read_text()))
    assert params.download.hf.path == "roneneldan/TinyStories" and params.ngram.memory_gb == 24


def test_large_profile_runs_download_tokenizer_ngram_on_a_hub_shaped_dataset(project, mirror,
                                                                           monkeypatch):
    """The large profile as it is, but its Hub dataset replaced by local Parquet files of the
    same shape (this machine reaches no hub) and its sizes cut to a test: the corpus streams
    into shards, the tokenizer trains on a sample and encodes shards in parallel, and the
    5-gram is counted on disk under the memory budget."""
    import lmpipe.tokenizer.encoding as encoding
    from stages import download, ngram, tokenizer

    monkeypatch.setenv("LMPIPE_TRACKING", "off")
    monkeypatch.setattr(encoding, "POOL_MIN_BYTES", 0)
    large = validate_params(profile_dict("large"))
    assert large.download.source == "hf" and large.download.hf.path == "roneneldan/TinyStories"
    assert large.download.hf.streaming and large.ngram.order == 5 and not large.ngram.arpa
    assert large.tokenizer.sample_bytes < 1e9 and large.pretrain.train.max_tokens >= 1e8
    _stories(mirror, project / "hub")
    overlay = {"download": {"hf": {"path": "parquet", "data_files": ["hub/*.parquet"]},
                            "shard_bytes": 200_000, "instruct": {"max_rows": 50}},
               "tokenizer": {"vocab_size": 512, "num_threads": 2, "sample_bytes": 400_000},
               "ngram": {"memory_gb": 0.01, "threads": 2, "sample_tokens": 0}}
    params = validate_params(deep_merge(profile_dict("large"), overlay))
    (project / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    for stage in (download, tokenizer, ngram):
        stage.run(params)
    d, t, g = (read_stage_metrics(s) for s in ("download", "tokenizer", "ngram"))
    assert d["train_bytes"] > 1_000_000 and len(list((project / "data/corpus/train").iterdir())) >= 5
    assert t["train_shards"] >= 5 and 350_000 < t["train_sample_bytes"] <= 400_000
    assert g["estimated_on_disk"] == 1 and g["ngrams_order_5"] > 0
    assert 1 < g["val_ppl"] < 512


@pytest.mark.slow
def test_the_benchmark_scripts_of_the_readme(tmp_path):
    """The README's `python benchmarks/corpus.py ... --mb 2 --compare` and
    `python benchmarks/scale.py --mb 2` (in a scratch folder; 1 MB shards so that the
    tokenizer's shards are several)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "benchmarks/corpus.py", "--out", str(tmp_path / "c"),
                           "--mb", "2", "--seed", "3", "--compare"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert 1_900_000 < manifest["bytes"] <= 2_000_000 and manifest["seed"] == 3
    table = [line.split() for line in proc.stdout.splitlines() if line.split()[:2] in (["1", "books"],
                                                                                        ["1", "sample"])]
    assert len(table) == 2  # distinct n-grams of 1 MB of the books and of the sample, side by side
    books, sample = ([int(v.replace(",", "")) for v in row[2:]] for row in table)
    assert all(0.7 < s / b < 1.3 for s, b in zip(sample[1:], books[1:])), (books, sample)
    assert (tmp_path / "c" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    proc = subprocess.run([sys.executable, "benchmarks/scale.py", "--mb", "2", "--work",
                           str(tmp_path / "w"), "--shard-mb", "1", "--json", str(tmp_path / "scale.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    rows = {line.split()[0]: line for line in lines if line.split()[:1] in (["download"], ["tokenizer"], ["ngram"])}
    assert set(rows) == {"download", "tokenizer", "ngram"}
    assert "of sentencepiece's" in rows["tokenizer"] and "M tok/s" in rows["ngram"]
    results = json.loads((tmp_path / "scale.json").read_text())["results"]
    assert results["tokenizer"]["metrics"]["train_shards"] >= 2
    assert results["sentencepiece"]["bytes"] > 1_500_000
