"""The evaluate stage: scoring windows, ppl/bpb against independent computations, the report."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmpipe.core.errors import InputError
from lmpipe.core.params import Params
from lmpipe.data.tokens import tokens_meta
from lmpipe.evaluation.metrics import bits_per_byte, perplexity
from lmpipe.evaluation.neural import score_recurrent, score_windows, windows
from lmpipe.evaluation.scoring import (
    Score,
    ids_and_bytes,
    load_for_scoring,
    resolve_dtype,
    sample_documents,
    score_ids,
    score_text,
    token_byte_lengths,
)
from lmpipe.models.store import build_model, save_model

CTX = 64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- assets
def _tiny_transformer(vocab: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, context_length=CTX, n_layer=1, n_head=2, d_model=16)
    return build_model("transformer", cfg), cfg


def build_assets(root: Path, mirror: Path) -> Path:
    """A scratch project: corpus, tokenizer + tokens, four tiny random neural models, the
    training stages' metrics and loss curves (and the n-gram when lmpipe.ngram exists)."""
    from stages.tokenizer import run as tokenizer_stage

    text = (mirror / "tinyshakespeare.txt").read_text(encoding="utf-8")[:24_000]
    docs = text.split("\n\n")
    n = len(docs)
    parts = {"train": docs[: n * 8 // 10], "val": docs[n * 8 // 10: n * 9 // 10],
             "test": docs[n * 9 // 10:]}
    corpus = root / "data" / "corpus"
    for split, rows in parts.items():
        (corpus / split).mkdir(parents=True)
        pq.write_table(pa.table({"text": rows}), corpus / split / "part-00000.parquet")
    (corpus / "source.json").write_text(json.dumps(     # the download stage's layout
        {"source": "url", "urls": ["https://example.invalid/tinyshakespeare.txt"],
         "inputs": [{"name": "tinyshakespeare.txt", "sha256": "ab" * 32, "bytes": 24_000}],
         "sha256": "cd" * 32, "encoding": "utf-8", "documents": len(docs),
         "splits": {s: {"lines": 7 + i, "bytes": 1, "documents": 1}
                    for i, s in enumerate(("train", "val", "test"))}}))
    saved = os.environ.get("LMPIPE_ROOT")
    os.environ["LMPIPE_ROOT"] = str(root)   # the stage writes under the project root
    try:
        tokenizer_stage(Params.model_validate({"tokenizer": {"vocab_size": 400,
                                                             "num_threads": 1}}))
    finally:
        os.environ.pop("LMPIPE_ROOT") if saved is None else os.environ.update(LMPIPE_ROOT=saved)
    vocab = tokens_meta(root)["vocab_size"]
    models = root / "data" / "models"
    for name, seed in (("transformer", 1), ("sft", 2)):
        model, cfg = _tiny_transformer(vocab, seed)
        save_model(model, models / name, "transformer", cfg)
    model, cfg = _tiny_transformer(vocab, 3)
    save_model(model, models / "lora" / "merged", "transformer", cfg)
    torch.manual_seed(4)
    rcfg = dict(vocab_size=vocab, d_embed=16, d_hidden=24, n_layer=1)
    save_model(build_model("rnn", rcfg), models / "rnn", "rnn", rcfg)

    metrics = root / "metrics"
    metrics.mkdir(exist_ok=True)
    for stage, extra in (("rnn", {}), ("pretrain", {}),
                         ("sft", {"val_response_ppl": 11.5, "base_val_response_ppl": 30.25,
                                  "trainable_params": 9000}),
                         ("lora", {"val_response_ppl": 13.75, "base_val_response_ppl": 30.25,
                                   "trainable_params": 512})):
        (metrics / f"{stage}.json").write_text(json.dumps(
            {"train_loss": 3.0, "val_loss": 3.2, "val_ppl": 24.5, "params": 1234,
             "tokens_seen": 65536, "train_seconds": 12.5, **extra}))
        plots = root / "plots" / stage
        plots.mkdir(parents=True)
        (plots / "loss.csv").write_text(
            "step,tokens,train_loss,val_loss,lr\n0,0,6.0,6.1,0.001\n10,1280,4.0,,0.001\n"
            "20,2560,3.0,3.2,0.0005\n")
    (metrics / "download.json").write_text(json.dumps({"train_documents": len(parts["train"])}))
    _maybe_ngram(root)
    return root


def _maybe_ngram(root: Path) -> None:
    """Train a small n-gram through lmpipe.ngram when that module is there."""
    try:
        from lmpipe.ngram.estimate import estimate
    except ModuleNotFoundError:
        return
    from lmpipe.data.tokens import load_tokens, tokens_meta

    ids = np.asarray(load_tokens("train", root / "data" / "tokens"))
    meta = tokens_meta(root / "data" / "tokens")
    model = estimate(ids, vocab_size=meta["vocab_size"], eos_id=meta["eos_id"], order=3,
                     bos_id=meta["bos_id"], unk_id=meta["unk_id"])
    model.save(root / "data" / "models" / "ngram")


@pytest.fixture(scope="session")
def assets(tmp_path_factory, mirror) -> Path:
    return build_assets(tmp_path_factory.mktemp("eval_assets"), mirror)


@pytest.fixture
def eval_project(project, assets, monkeypatch) -> Path:
    for sub in ("data", "metrics", "plots"):
        shutil.copytree(assets / sub, project / sub)
    return project


@pytest.fixture(scope="session")
def tok(assets):
    from lmpipe.tokenizer.model import Tokenizer

    return Tokenizer.load(assets / "data" / "tokenizer" / "tokenizer.model")


@pytest.fixture(scope="session")
def test_ids(assets):
    from lmpipe.data.tokens import load_tokens

    return np.asarray(load_tokens("test", assets / "data" / "tokens")).astype(np.int64)


def _load(assets, name):
    from lmpipe.models.store import load_model

    folder = assets / "data" / "models" / name
    return load_model(folder / "merged" if (folder / "merged").exists() else folder)[0]


# ----------------------------------------------------------------------------- windows
@pytest.mark.parametrize("n,ctx,stride", [(1, 4, None), (40, 16, None), (40, 16, 16), (40, 16, 5),
                                          (40, 16, 1), (7, 3, 2), (33, 8, 8)])
def test_windows_score_every_target_once_within_the_context(n, ctx, stride):
    seen = []
    for start, end, first in windows(n, ctx, stride):
        assert 0 <= start < first <= end + 1 and end - start <= ctx
        seen.extend(range(first, end + 1))
        # each target has at least ctx - stride + 1 tokens of context (or all of the past)
        assert first - start >= min(first, ctx - (stride or ctx) + 1)
    assert seen == list(range(1, n + 1))


def test_stride_must_fit_the_context():
    with pytest.raises(InputError, match=r"evaluate\.stride: must be in \[1, context_length=16\]"):
        windows(10, 16, 17)


def test_stride_equal_to_context_gives_exactly_the_non_overlapping_figure(assets, test_ids):
    model = _load(assets, "transformer")
    ids = test_ids[:300]
    plain = score_windows(model, ids, CTX, eos_id=2, batch_size=3)
    same = score_windows(model, ids, CTX, eos_id=2, stride=CTX, batch_size=3)
    assert same == plain                        # the very same windows, bit for bit
    # the batch size only regroups windows (right padding never changes real positions)
    assert score_windows(model, ids, CTX, eos_id=2, batch_size=64) == pytest.approx(plain, rel=1e-6)
    # a sliding window gives the later tokens more context: a different (here better) figure
    sliding = score_windows(model, ids, CTX, eos_id=2, stride=4)
    assert sliding != plain


def test_sliding_window_equals_scoring_each_token_from_its_window(assets, test_ids):
    model = _load(assets, "transformer")
    ids, stride = test_ids[:90], 40
    s = torch.tensor(np.concatenate([[2], ids]))
    expected = 0.0
    with torch.no_grad():
        for p in range(1, ids.size + 1):
            chunk_first = (p - 1) // stride * stride + 1       # first target of p's chunk
            start = max(0, chunk_first - 1 - (CTX - stride))
            logits = model(s[start:p][None])[0][0, -1]
            expected -= float(F.log_softmax(logits.double(), -1)[s[p]])
    got = score_windows(model, ids, CTX, eos_id=2, stride=stride, batch_size=4)
    assert got == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- precision
def _trained_transformer(tok, mirror, steps: int = 100) -> tuple[nn.Module, np.ndarray, int]:
    """A Transformer trained by the project's trainer (Muon, bf16 autocast, as `pretrain`)
    on 400 kB of TinyShakespeare, with the next 40 kB as its held-out split and their bytes."""
    from lmpipe.core.params import TrainParams
    from lmpipe.data.batches import TokenBatches
    from lmpipe.train.runtime import Runtime
    from lmpipe.train.trainer import Trainer

    text = (mirror / "tinyshakespeare.txt").read_text(encoding="utf-8")
    train_text, held_out = text[:400_000], text[400_000:440_000]
    torch.manual_seed(0)
    model = build_model("transformer", dict(vocab_size=tok.vocab_size, context_length=128,
                                            n_layer=2, n_head=4, d_model=128))
    if steps:
        cfg = TrainParams(optimizer="muon", lr=6e-3, min_lr=6e-4, warmup_steps=10,
                          batch_size=16, max_steps=steps, eval_every=1000, progress=False,
                          precision="bf16")
        batches = TokenBatches(tok.encode_documents([train_text]), 128, 16, seed=0)
        rt = Runtime(torch.device("cpu"), torch.bfloat16, threads=torch.get_num_threads())
        Trainer(model, cfg, batches=batches, rt=rt).fit()
    return model.eval(), tok.encode_documents([held_out]), len(held_out.encode("utf-8"))


def test_bf16_scoring_stays_within_1e3_bits_per_byte_of_fp32(tok, mirror, tmp_path):
    """evaluate.dtype auto scores Transformers in bf16 where the hardware has it: allowed only
    because a trained model's bits per byte move by less than 1e-3 (issue 13)."""
    scores = {}
    for name, steps in (("untrained", 0), ("trained", 100)):
        model, ids, n_bytes = _trained_transformer(tok, mirror, steps)
        save_model(model, tmp_path / name, "transformer", model.config.model_dump(mode="json"))
        loaded = load_for_scoring(tmp_path / name)
        scores[name] = [score_ids(loaded, ids, n_bytes, eos_id=tok.eos_id, dtype=dtype)
                        for dtype in ("float32", "bfloat16")]
    fp32, bf16 = scores["trained"]
    assert (fp32.dtype, bf16.dtype) == ("float32", "bfloat16")
    assert fp32.bpb < scores["untrained"][0].bpb - 0.5     # it learned: sharp predictions
    assert bf16.bpb != fp32.bpb                            # bf16 really ran
    assert abs(bf16.bpb - fp32.bpb) < 1e-3, (fp32.bpb, bf16.bpb)


@pytest.mark.parametrize("native,want", [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_is_bf16_only_where_the_cpu_has_it_and_never_for_recurrent_models(
        monkeypatch, assets, test_ids, native, want):
    from lmpipe.evaluation import scoring

    monkeypatch.setattr(scoring, "cpu_supports_bf16", lambda: native)
    assert scoring.resolve_dtype("auto", "cpu") == want
    assert scoring.resolve_dtype("float32", "cpu") == "float32"
    ids = test_ids[:200]
    tf = score_ids(load_for_scoring(assets / "data" / "models" / "transformer"), ids, 500,
                   eos_id=2, dtype="auto")
    rnn = score_ids(load_for_scoring(assets / "data" / "models" / "rnn"), ids, 500,
                    eos_id=2, dtype="auto")
    assert (tf.dtype, rnn.dtype) == (want, "float32")


# ----------------------------------------------------------------------------- neural ppl
def test_transformer_ppl_is_exp_of_the_mean_token_loss(eval_project, assets, tok, test_ids):
    """Independent: plain forward over consecutive context-length windows + cross-entropy."""
    model = _load(assets, "transformer")
    s = torch.tensor(np.concatenate([[tok.eos_id], test_ids]))
    losses = []
    with torch.no_grad():
        for k in range(0, test_ids.size, CTX):
            x, y = s[k:k + CTX], s[k + 1:k + CTX + 1]
            logits, _ = model(x[None, : y.numel()])
            losses.append(F.cross_entropy(logits[0], y, reduction="none"))
    mean_loss = torch.cat(losses).double().mean().item()

    ids, n_bytes = ids_and_bytes("test", None)
    loaded = load_for_scoring(eval_project / "data" / "models" / "transformer")
    score = score_ids(loaded, ids, n_bytes, eos_id=tok.eos_id, stride=CTX, batch_size=5)
    assert score.n_tokens == test_ids.size
    assert score.ppl == pytest.approx(math.exp(mean_loss), rel=1e-5)
    meta = json.loads((eval_project / "data" / "tokens" / "meta.json").read_text())
    assert score.n_bytes == meta["splits"]["test"]["bytes"]
    assert score.bpb == pytest.approx(mean_loss * test_ids.size / math.log(2) / score.n_bytes,
                                      rel=1e-5)


def test_rnn_carries_its_state_through_the_whole_split(assets, tok, test_ids):
    model = _load(assets, "rnn")
    s = torch.tensor(np.concatenate([[tok.eos_id], test_ids]))
    with torch.no_grad():
        logits, _ = model(s[None, :-1])
        mean_loss = F.cross_entropy(logits[0], s[1:]).item()
    total = score_recurrent(model, test_ids, eos_id=tok.eos_id, chunk=97)
    assert math.exp(total / test_ids.size) == pytest.approx(math.exp(mean_loss), rel=1e-5)
    # windowed RNN scoring (rnn_context) restarts from a zero state per window
    windowed = score_windows(model, test_ids, 32, eos_id=tok.eos_id)
    with torch.no_grad():
        first, _ = model(s[None, :32])
        rest, _ = model(s[None, 32:64])
    manual = F.cross_entropy(torch.cat([first[0], rest[0]]), s[1:65], reduction="sum").item()
    assert score_windows(model, test_ids[:64], 32, eos_id=tok.eos_id) == pytest.approx(manual, rel=1e-5)
    assert windowed != pytest.approx(total, rel=1e-9)


class Uniform(nn.Module):
    """Every token equally likely: NLL is exactly ln V per token."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"context_length": 8, "vocab_size": vocab})()

    def forward(self, idx, targets=None):
        return torch.zeros(*idx.shape, self.vocab) + 0 * self.w, None


def test_bits_per_byte_on_a_hand_computed_example():
    # 3 tokens at p = 1/4 each over 4 bytes: 3 * 2 bits = 6 bits / 4 bytes = 1.5 bpb, ppl 4
    nll = 3 * math.log(4)
    assert bits_per_byte(nll, 4) == pytest.approx(1.5, abs=1e-12)
    assert perplexity(nll, 3) == pytest.approx(4.0, abs=1e-12)
    score = Score(nll, 3, 4, seconds=0.5)
    assert (score.bpb, score.ppl, score.tokens_per_second) == (pytest.approx(1.5), pytest.approx(4.0), 6.0)
    m = score.metrics("test")
    assert m["test_bpb"] == 1.5 and m["test_ppl"] == 4.0 and m["test_tokens"] == 3
    # the same through the scoring code: a uniform model over 4 tokens, 10 ids covering 5 bytes
    from lmpipe.evaluation.scoring import LoadedModel

    loaded = LoadedModel("transformer", Uniform(4), 1, 8, Path("."))
    score = score_ids(loaded, np.arange(10) % 4, 5, eos_id=0, stride=3)
    assert score.ppl == pytest.approx(4.0, rel=1e-6)             # fp32 logits
    assert score.bpb == pytest.approx(10 * 2 / 5, rel=1e-6)        # 10 tokens x 2 bits / 5 bytes
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_byte_lengths_of_tokens_add_up_to_the_split_bytes(assets, tok):
    from lmpipe.data.tokens import load_tokens, tokens_meta

    lengths = token_byte_lengths(tok)
    meta = tokens_meta(assets / "data" / "tokens")
    for split in ("train", "val", "test"):
        ids = np.asarray(load_tokens(split, assets / "data" / "tokens")).astype(np.int64)
        assert int(lengths[ids].sum()) == meta["splits"][split]["bytes"]
    assert lengths[tok.eos_id] == 0 and lengths[tok.newline_id] == 1


def test_capped_split_counts_the_bytes_of_its_prefix(eval_project, tok):
    ids, n_bytes = ids_and_bytes("test", 100, tok)
    assert ids.size == 100
    text = tok.decode(list(map(int, ids)))
    assert n_bytes == len(text.encode("utf-8"))


def test_capped_split_is_the_same_whole_documents_spread_over_it():
    """A cap takes whole documents (the last one cut) from all over the split, the same ones
    every time, read from one array or from shards alike."""
    from lmpipe.data.tokens import ShardedTokens

    rng = np.random.default_rng(0)
    eos = 2
    docs = [np.append(rng.integers(10, 90, int(rng.integers(5, 60))), eos) for _ in range(300)]
    stream = np.concatenate(docs).astype(np.uint16)
    picked = sample_documents(stream, 1000, eos)
    assert picked.size == 1000
    assert picked.tolist() == sample_documents(ShardedTokens(np.array_split(stream, 7)), 1000, eos).tolist()
    # whole documents in split order: every piece between EOS is one of the documents
    pieces = np.split(picked, np.flatnonzero(picked == eos) + 1)
    index = {tuple(d.tolist()): i for i, d in enumerate(docs)}
    found = [index[tuple(p.tolist())] for p in pieces[:-1]]
    assert found == sorted(found) and len(found) >= 15
    assert found[0] < 60 and found[-1] > 240  # spread over the split, not its head
    assert tuple(pieces[-1].tolist()) == tuple(docs[index_after(found, docs, pieces[-1])][:pieces[-1].size].tolist())
    # one document: its first tokens, as before
    assert sample_documents(docs[0], 3, eos).tolist() == docs[0][:3].tolist()


def index_after(found, docs, tail) -> int:
    """The document the cut tail comes from: the first picked one after `found`, by prefix."""
    for i in range(len(docs)):
        if i not in found and docs[i][:tail.size].tolist() == tail.tolist():
            return i
    raise AssertionError("the cut document is not a prefix of any document")


def test_score_text_is_the_split_scoring_of_one_document(eval_project, tok):
    folder = eval_project / "data" / "models" / "transformer"
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
    score = score_text(folder, text, tokenizer=tok, dtype="float32")
    ids = tok.encode_documents([text])
    assert ids[-1] == tok.eos_id and score.n_tokens == ids.size
    direct = score_windows(load_for_scoring(folder).model, ids, CTX, eos_id=tok.eos_id)
    assert score.total_nll == pytest.approx(direct, rel=1e-12)
    # by default in evaluate's precision (auto: bf16 where the CPU has it), as the stage
    auto = score_text(folder, text, tokenizer=tok)
    assert auto.dtype == resolve_dtype("auto", "cpu")
    assert auto.total_nll == score_ids(load_for_scoring(folder), ids, score.n_bytes,
                                       eos_id=tok.eos_id, dtype="auto").total_nll
    assert score.n_bytes == len(text.encode("utf-8"))


# ----------------------------------------------------------------------------- n-gram
def test_ngram_ppl_equals_what_lmpipe_ngram_computes(eval_project, assets, tok, test_ids):
    from lmpipe.ngram.model import NgramModel

    folder = eval_project / "data" / "models" / "ngram"
    assert folder.exists(), "the n-gram asset was not built: see _maybe_ngram"
    direct, n = NgramModel.load(folder).score(test_ids)      # what the ngram stage reports
    assert n == test_ids.size
    ids, n_bytes = ids_and_bytes("test", None)
    loaded = load_for_scoring(folder)
    assert loaded.kind == "ngram" and loaded.params == sum(loaded.model.ngram_counts())
    score = score_ids(loaded, ids, n_bytes, eos_id=tok.eos_id)
    assert score.ppl == pytest.approx(perplexity(direct, n), rel=1e-12)
    assert score.bpb == pytest.approx(bits_per_byte(direct, n_bytes), rel=1e-12)
    # a uniform 1/V model would score ppl V: the trained n-gram must do much better
    assert score.ppl < 0.5 * tok.vocab_size


# ----------------------------------------------------------------------------- the stage
NEURAL = ["rnn", "transformer", "sft", "lora"]
ALL = ["ngram", *NEURAL]


def _params(**evaluate) -> Params:
    base = dict(models=ALL, samples_per_model=1, sample_tokens=8, batch_size=4,
                max_tokens=400, instruct_prompts=["Hi"])
    return Params.model_validate({"evaluate": {**base, **evaluate}})


def test_stage_writes_nested_metrics_report_and_plots(eval_project, tok, mlflow_uri):
    from stages.evaluate import run

    run(_params())
    metrics = json.loads((eval_project / "metrics" / "evaluate.json").read_text())
    assert list(metrics) == sorted(ALL)
    t = metrics["transformer"]
    for split in ("val", "test"):   # both splits, the same way: windows sliding by half the context
        ids, n_bytes = ids_and_bytes(split, 400, tok)
        expected = score_ids(load_for_scoring(eval_project / "data" / "models" / "transformer"),
                             ids, n_bytes, eos_id=tok.eos_id, stride=CTX // 2,
                             dtype=Params().evaluate.dtype)
        assert t[f"{split}_ppl"] == pytest.approx(expected.ppl, rel=1e-5)
        assert t[f"{split}_bpb"] == pytest.approx(expected.bpb, rel=1e-5)
        assert (t[f"{split}_tokens"], t[f"{split}_bytes"]) == (ids.size, n_bytes)
    assert t["context_length"] == CTX and t["stride"] == CTX // 2
    assert t["val_bpb"] != t["test_bpb"]
    assert t["tokens_per_second"] > 0 and t["params"] > 0
    assert metrics["rnn"]["context_length"] == 0
    assert metrics["ngram"]["test_tokens"] == 400 and metrics["ngram"]["params"] > 0
    assert metrics["sft"]["val_response_ppl"] == 11.5
    assert metrics["lora"]["base_val_response_ppl"] == 30.25
    assert metrics["lora"]["trainable_params"] == 512

    report = (eval_project / "reports" / "report.md").read_text()
    assert ("| model | stage | parameters | train time (s) | tokens seen | stopped by | "
            "published step | temperature | val bpb | test ppl | test bpb |") in report
    for name in ALL:
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert f"{metrics[name]['val_bpb']:,.3f}" in row and f"{metrics[name]['test_bpb']:,.3f}" in row
    assert "The course's order, Transformer < RNN < n-gram in bits per byte, " in report
    assert ("Transformers: sliding windows, stride half the context length" in report
            and "the RNN carries its hidden state through the whole split" in report)
    assert "## SFT versus LoRA" in report and "| lora | 512 |" in report
    assert f"input `tinyshakespeare.txt`: 24,000 bytes, sha256 `{'ab' * 32}`" in report
    assert f"sha256 of all inputs: `{'cd' * 32}`" in report and "git commit" in report
    assert "| split | documents | lines | bytes | tokens | bytes per token |" in report
    meta = json.loads((eval_project / "data" / "tokens" / "meta.json").read_text())
    test_split = meta["splits"]["test"]
    assert (f"| test | {test_split['documents']} | 9 | {test_split['bytes']:,} | "
            f"{test_split['tokens']:,} |") in report
    assert "## Samples" in report and "### transformer" in report and "ROMEO:" in report
    what = report.split("## What these models are")[1].split("\n## ")[0]   # said plainly
    for name in ALL:
        assert f"- {name}: a" in what
    assert "small demonstration model" in what and "instruction examples" in what
    bpb_csv = (eval_project / "plots" / "evaluate" / "bits_per_byte.csv").read_text().splitlines()
    assert bpb_csv[0] == "model,val_bpb,test_bpb" and len(bpb_csv) == 1 + len(ALL)   # DVC plot
    t_row = next(r for r in bpb_csv if r.startswith("transformer,"))
    val_bpb, test_bpb = map(float, t_row.split(",")[1:])   # evaluate's own val figure
    assert (val_bpb, test_bpb) == (pytest.approx(t["val_bpb"], rel=1e-5),
                                   pytest.approx(t["test_bpb"], rel=1e-5))
    assert "### ngram" in report and "[no sample" not in report
    for png in ("loss_curves.png", "bits_per_byte.png"):
        data = (eval_project / "reports" / png).read_bytes()
        assert data.startswith(PNG_MAGIC)
        import matplotlib.image

        img = matplotlib.image.imread(eval_project / "reports" / png)
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert f"]({png})" in report

    # MLflow: one run with <model>.<metric> keys and the report as artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("lmpipe")
    run_ = client.search_runs([exp.experiment_id], "tags.`lmpipe.stage` = 'evaluate'",
                              order_by=["attributes.start_time DESC"])[0]
    assert run_.data.metrics["transformer.test_bpb"] == pytest.approx(t["test_bpb"])
    arts = {a.path for a in client.list_artifacts(run_.info.run_id, "report")}
    assert {"report/report.md", "report/loss_curves.png", "report/bits_per_byte.png"} <= arts


def test_stage_with_stride_and_cap(eval_project, tok, monkeypatch):
    from stages.evaluate import run

    monkeypatch.setenv("LMPIPE_TRACKING", "off")
    run(_params(models=["transformer"], stride=CTX, max_tokens=200, samples_per_model=0))
    t = json.loads((eval_project / "metrics" / "evaluate.json").read_text())["transformer"]
    assert t["test_tokens"] == 200 and t["stride"] == CTX
    ids, n_bytes = ids_and_bytes("test", 200, tok)
    loaded = load_for_scoring(eval_project / "data" / "models" / "transformer")
    plain = score_ids(loaded, ids, n_bytes, eos_id=tok.eos_id, stride=CTX)
    assert t["test_ppl"] == pytest.approx(plain.ppl, rel=1e-5)
    # stride null (the default) is half the context: every token reads at least CTX/2 tokens
    half = score_ids(loaded, ids, n_bytes, eos_id=tok.eos_id)
    assert half.extra["stride"] == CTX // 2
    assert half.total_nll == score_ids(loaded, ids, n_bytes, eos_id=tok.eos_id,
                                       stride=CTX // 2).total_nll
    assert half.ppl != pytest.approx(plain.ppl, rel=1e-5)
    assert "## Samples" not in (eval_project / "reports" / "report.md").read_text()


def test_stage_names_every_missing_model_folder(eval_project, monkeypatch):
    from lmpipe.core.stage import run_stage
    from stages.evaluate import run

    monkeypatch.setenv("LMPIPE_TRACKING", "off")
    shutil.rmtree(eval_project / "data" / "models" / "sft")
    shutil.rmtree(eval_project / "data" / "models" / "lora")
    with pytest.raises(InputError) as err:
        run(_params())
    msg = str(err.value)
    assert "sft (" in msg and "`dvc repro sft`" in msg and "lora (" in msg
    assert "transformer (" not in msg
    (eval_project / "params.yaml").write_text("evaluate:\n  models: [transformer]\n  stride: 999\n")
    assert run_stage("evaluate", run) == 2


def test_metrics_file_is_readable_by_dvc_metrics_show(eval_project, monkeypatch):
    import subprocess
    import sys

    from stages.evaluate import run

    monkeypatch.setenv("LMPIPE_TRACKING", "off")
    run(_params(models=["transformer", "rnn"], samples_per_model=0, max_tokens=64))
    (eval_project / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: 'true'\n    metrics:\n      - metrics/evaluate.json:\n"
        "          cache: false\n")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=eval_project, check=True)
    out = subprocess.run([*dvc, "metrics", "show", "--json"], cwd=eval_project, check=True,
                         capture_output=True, text=True).stdout
    shown = json.loads(out)
    data = next(iter(shown.values()))["data"]["metrics/evaluate.json"]["data"]
    expected = json.loads((eval_project / "metrics" / "evaluate.json").read_text())
    assert data["transformer"]["test_bpb"] == expected["transformer"]["test_bpb"]


def test_report_says_where_the_course_order_holds_with_the_ratios():
    from lmpipe.evaluation.metrics import family_order
    from lmpipe.evaluation.report import ReportData, render_markdown

    results = {"ngram": {"val_bpb": 2.0, "test_bpb": 2.4},
               "rnn": {"val_bpb": 1.9, "test_bpb": 2.2},
               "transformer": {"val_bpb": 1.8, "test_bpb": 2.3}}
    assert family_order(results, "val") == {"holds": True, "rnn_vs_ngram": pytest.approx(0.95),
                                            "transformer_vs_ngram": pytest.approx(0.9)}
    assert family_order(results, "test")["holds"] is False   # Transformer behind the RNN
    report = render_markdown(ReportData(results=results))
    assert ("The course's order, Transformer < RNN < n-gram in bits per byte, holds on val "
            "(RNN 0.950x, Transformer 0.900x the n-gram's bits per byte); **does not hold** on "
            "test (RNN 0.917x, Transformer 0.958x the n-gram's bits per byte).") in report
    # ties do not count as in order, and a missing model means no claim at all
    results["transformer"]["val_bpb"] = 1.9
    assert family_order(results, "val")["holds"] is False
    del results["rnn"]
    assert family_order(results, "val") is None
    assert "course's order" not in render_markdown(ReportData(results=results))


def test_report_names_the_best_model_and_the_gap_and_plots_without_curves(tmp_path):
    from lmpipe.evaluation.report import ReportData, write_report

    data = ReportData(
        results={"ngram": {"test_bpb": 2.0, "test_ppl": 30.0, "params": 5000},
                 "transformer": {"test_bpb": 1.5, "test_ppl": 12.0, "params": 100}},
        stage_metrics={"transformer": {"train_seconds": 60.0, "tokens_seen": 1_000_000,
                                       "stopped_by": "max_tokens", "selected_step": 300,
                                       "temperature": 1.1172}},
    )
    files = write_report(tmp_path / "reports", data)
    report = files["report"].read_text()
    assert "Best model on the test split: **transformer** at 1.5000 bits per byte." in report
    assert "| ngram | ngram | 5,000 | - | - | - | - | - | - | 30.000 | 2.000 | +33.3% |" in report
    assert ("| transformer | pretrain | 100 | 60.000 | 1,000,000 | max_tokens | 300 | 1.117 | - | "
            "12.000 | 1.500 | best |") in report
    assert "max_seconds" not in report
    # a model stopped by the wall clock is flagged: it is not reproducible
    data.stage_metrics["transformer"]["stopped_by"] = "max_seconds"
    report = write_report(tmp_path / "again", data)["report"].read_text()
    assert "**Warning**: transformer stopped on train.max_seconds" in report
    assert "SFT versus LoRA" not in report
    for key in ("loss", "bpb"):
        assert files[key].read_bytes().startswith(PNG_MAGIC)


def test_a_model_trained_with_another_tokenizer_is_an_input_error(tmp_path, tok):
    from lmpipe.models.store import save_model

    model, cfg = _tiny_transformer(50, 0)                  # 50 ids; the tokenizer has 400
    save_model(model, tmp_path / "small", "transformer", cfg)
    with pytest.raises(InputError, match=r"small: the model knows 50 token ids but the text has id"):
        score_text(tmp_path / "small", "hello world, hello world", tokenizer=tok)
