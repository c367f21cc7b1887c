"""The params.yaml schema, one typed section per stage, and the loader that checks a file.

Unknown keys are errors, not silently ignored; every problem is reported as
`key.path: problem, got VALUE`. The schema's defaults are the default profile
(lmpipe/core/profiles.py). One concept, hence one file over 400 lines: every section is here
so that a reader sees the whole of params.yaml in one place.
"""

from __future__ import annotations

import codecs
import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lmpipe.core.errors import InputError
from lmpipe.core.names import DEFAULT_SYSTEM_PROMPT, MODELS
from lmpipe.models.configs import RNNConfig, TransformerConfig


class Section(BaseModel):
    """Base for every params section: typos are errors, not silently ignored keys."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- shared
class DataParams(Section):
    mirror: str | None = Field(
        default=None,
        description="Folder searched by file name before any network access "
        "(LMPIPE_MIRROR overrides it).",
    )


class TrackingParams(Section):
    experiment: str = "lmpipe"


# ----------------------------------------------------------------------------- download
class RemoteFile(Section):
    """One file fetched by URL; the pinned sha256 is checked before anything uses it."""

    url: str = Field(description="http(s) URL of the file")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the file's bytes")
    filename: str = Field(
        min_length=1,
        description="Name in the mirror and the download cache (a relative path: "
        "'gutenberg/austen-emma.txt' is allowed, '..' is not)",
    )
    members: str | None = Field(
        default=None,
        description="Archives only: glob of the members to read "
        "(default: every .txt/.jsonl/.parquet member)",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.fullmatch(r"https?://[^\s/]+/\S*", v):
            raise ValueError("must be an http:// or https:// URL")
        return v

    @field_validator("filename")
    @classmethod
    def _relative_name(cls, v: str) -> str:
        parts = v.replace("\\", "/").split("/")
        if v.startswith("/") or "\\" in v or ".." in parts or "" in parts or ":" in v:
            raise ValueError("must be a relative path without '..', '\\' or ':'")
        return v


class HFSource(Section):
    """A Hugging Face `datasets` source: a Hub id, or a packaged builder with data_files."""

    path: str = Field(
        min_length=1,
        description="Hub dataset id (roneneldan/TinyStories) or a builder "
        "(parquet, json, text, csv) used with data_files",
    )
    name: str | None = Field(default=None, description="dataset config name")
    split: str = Field(default="train", description="split, slicing allowed: 'train[:10%]'")
    text_field: str = "text"
    data_files: list[str] | None = Field(
        default=None, description="files for a builder (relative to the project root)"
    )
    revision: str | None = Field(default=None, description="Hub revision (a commit to pin)")
    streaming: bool = Field(
        default=True,
        description="Read the split as a stream (datasets' streaming=True: no Arrow cache "
        "copy, flat memory, plain splits only); false = load_dataset's cached, memory-mapped "
        "table (split slicing such as 'train[:10%]' allowed)")


class SplitFractions(Section):
    train: float = Field(default=0.9, gt=0, lt=1)
    val: float = Field(default=0.05, gt=0, lt=1)
    test: float = Field(default=0.05, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitFractions":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:.6g}")
        return self


TINYSHAKESPEARE = RemoteFile(
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    filename="tinyshakespeare.txt",
)
SELF_INSTRUCT = [
    RemoteFile(
        url="https://raw.githubusercontent.com/yizhongw/self-instruct/main/data/seed_tasks.jsonl",
        sha256="7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48",
        filename="self_instruct_seed_tasks.jsonl",
    ),
    RemoteFile(
        url="https://raw.githubusercontent.com/yizhongw/self-instruct/main/human_eval/"
        "user_oriented_instructions.jsonl",
        sha256="81d60a117db495cecedecd9193504fd07c5b5a42f6699ef6b0f9da10fc22f42e",
        filename="self_instruct_user_oriented_instructions.jsonl",
    ),
]


GSM8K = [
    RemoteFile(
        url="https://raw.githubusercontent.com/openai/grade-school-math/master/"
        "grade_school_math/data/train.jsonl",
        sha256="17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
        filename="gsm8k_train.jsonl",
    ),
]

INSTRUCT_DEFAULT_FILES = {"self_instruct": SELF_INSTRUCT, "gsm8k": GSM8K}


def _as_plain(item: Any) -> Any:
    return item.model_dump() if isinstance(item, BaseModel) else item


class InstructParams(Section):
    """Instruction data for SFT/LoRA, normalised to prompt/response rows."""

    format: Literal["self_instruct", "gsm8k"] = "self_instruct"
    files: list[RemoteFile] = Field(
        default_factory=lambda: copy.deepcopy(SELF_INSTRUCT),
        min_length=1,
        description="Left at one format's standard files, they follow `format` "
        "(so `-S download.instruct.format=gsm8k` alone switches to GSM8K)",
    )
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    max_rows: int | None = Field(
        default=None, ge=2, description="Keep only the first N rows (before the split); null = all"
    )

    @model_validator(mode="before")
    @classmethod
    def _files_follow_format(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fmt = data.get("format", "self_instruct")
        if fmt not in INSTRUCT_DEFAULT_FILES:
            return data
        files = data.get("files")
        standard = [[f.model_dump() for f in v] for v in INSTRUCT_DEFAULT_FILES.values()]
        if files is None or (
            isinstance(files, list)
            and [_as_plain(f) for f in files] in standard
        ):
            data = {**data, "files": [f.model_dump() for f in INSTRUCT_DEFAULT_FILES[fmt]]}
        return data


class DownloadParams(Section):
    source: Literal["url", "hf", "local"] = "url"
    files: list[RemoteFile] = Field(default_factory=lambda: [TINYSHAKESPEARE.model_copy()])
    hf: HFSource | None = None
    local: str | None = Field(
        default=None,
        description="Path or glob (relative to the project root) of .txt/.jsonl/.parquet "
        "files or archives of them",
    )
    text_field: str = Field(default="text", description="Text column of .jsonl/.parquet inputs")
    encoding: str = Field(default="utf-8", description="Text encoding, decoded strictly")
    document_separator: str | None = Field(
        default=None,
        description="Splits a .txt file into documents ('<|endoftext|>', '\\n\\n'); "
        "null = one document per file",
    )
    strip_gutenberg: bool = Field(
        default=False, description="Drop what lies outside '*** START OF' / '*** END OF'"
    )
    max_bytes: int | None = Field(
        default=None, ge=64,
        description="Keep only the first N bytes of text (cut at a line boundary); null = all. "
        "The source is read no further than that",
    )
    shard_bytes: int = Field(
        default=64_000_000, ge=1024,
        description="Text per Parquet shard of data/corpus/<split>/ (the unit the tokenizer "
        "encodes in parallel, and the most the download stage holds in memory)",
    )
    split: SplitFractions = Field(default_factory=SplitFractions)
    retries: int = Field(default=4, ge=0, le=20)
    backoff_s: float = Field(
        default=1.0, ge=0, le=60, description="First retry delay; doubles on each retry"
    )
    timeout_s: float = Field(default=30.0, gt=0)
    instruct: InstructParams = Field(default_factory=InstructParams)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError("unknown text encoding (a Python codec name: utf-8, latin-1, ...)") from None
        return v

    @field_validator("document_separator")
    @classmethod
    def _non_empty_separator(cls, v: str | None) -> str | None:
        if v is not None and not v:
            raise ValueError("must be a non-empty string or null")
        return v

    @model_validator(mode="after")
    def _source_has_its_settings(self) -> "DownloadParams":
        if self.source == "url" and not self.files:
            raise ValueError("source 'url' needs at least one entry in download.files")
        if self.source == "hf" and self.hf is None:
            raise ValueError("source 'hf' needs download.hf (path, name, split, text_field)")
        if self.source == "local" and not self.local:
            raise ValueError("source 'local' needs download.local (a path or glob)")
        return self


# ----------------------------------------------------------------------------- tokenizer
class TokenizerParams(Section):
    vocab_size: int = Field(
        default=1024, ge=256, le=262144,
        description="BPE vocabulary; >= 256 because byte fallback needs the 256 byte pieces",
    )
    num_threads: int = Field(
        default=2, ge=1, le=256,
        description="sentencepiece's training threads, and the processes that encode the "
        "corpus shards in parallel")
    character_coverage: float = Field(default=1.0, gt=0, le=1)
    max_sentence_length: int = Field(default=16384, ge=64)
    input_sentence_size: int = Field(
        default=0, ge=0, description="sentencepiece's cap on training lines (the first ones); "
        "0 = every line of the sample")
    sample_bytes: int | None = Field(
        default=100_000_000, ge=1000,
        description="Train on a seeded sample of whole train documents of about this much text "
        "(sentencepiece holds its input in memory: ~5x the sample at the peak); null or a "
        "smaller train split = all of it, in order")
    sample_seed: int = Field(default=0, ge=0, description="seed of that sample")


# ----------------------------------------------------------------------------- ngram
class NgramParams(Section):
    """The count-based baseline (lmpipe/ngram/)."""

    order: int = Field(
        default=4, ge=1, le=10,
        description="n-gram order; 4 is the best on TinyShakespeare val at vocab 1024 "
        "(orders 5-6 are no better and 1.7-2.5x larger); KenLM reads ARPA up to 6")
    method: Literal["kneser_ney", "add_k"] = Field(
        default="kneser_ney",
        description="interpolated modified Kneser-Ney, or add-k (Lidstone) on the longest seen context")
    k: float = Field(default=0.01, gt=0, le=100, description="add-k pseudo-count (method add_k)")
    arpa: bool = Field(
        default=True, description="also write model.arpa.gz (Kneser-Ney only: add-k has no ARPA form)")
    chunk_tokens: int = Field(
        default=1 << 23, ge=1024,
        description="tokens counted per chunk: memory is O(distinct n-grams + chunk)")
    memory_gb: float = Field(
        default=4.0, gt=0, le=4096,
        description="GiB the stage may hold (its peak RSS stays about within it): when the "
        "in-memory estimator could need more, counts spill to disk as sorted runs merged per "
        "order (KenLM lmplz's -S); the model is the same either way")
    threads: int = Field(
        default=1, ge=1, le=256,
        description="threads for estimation and scoring (in memory, 2 did not pay on a loaded "
        "2-core machine; on disk, chunks are counted and key ranges merged in parallel)")
    sample_tokens: int = Field(
        default=200, ge=0, le=100_000, description="length of the sample logged to MLflow (0: none)")
    temperature: float = Field(default=1.0, ge=0, le=100, description="sampling temperature (0: greedy)")
    top_k: int | None = Field(default=None, ge=1, description="sample among the k most likely tokens")


# ----------------------------------------------------------------------------- training
class TrainParams(Section):
    """The shared trainer's settings (lmpipe/train/trainer.py), for every neural stage.

    Budget: the smaller of max_steps and max_tokens (global tokens: all ranks and micro-
    batches). Nothing that shapes the weights reads the clock: the schedule, the evaluations
    and the checkpoints are functions of the step, so the same params give the same model on
    any machine under any load. max_seconds is only a guard a user may set: a run it stops is
    recorded as such (`stopped_by: max_seconds`, with a warning) and is not reproducible; the
    shipped profiles leave it null. With `select: best` the published weights are those of
    the lowest periodic val loss (nanoGPT practice).
    """

    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto = CUDA when present (under torchrun: the local rank's)")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto",
        description="auto = bf16 autocast where the hardware has it (CUDA, or a CPU with "
        "AVX512-BF16/AMX), else fp32; weights and optimizer state stay fp32")
    compile: bool = Field(default=False, description="torch.compile the model")
    threads: int = Field(
        default=0, ge=0, description="CPU threads per process; 0 = all cores, split over local ranks")
    nproc_per_node: int = Field(
        default=1, ge=1, le=64,
        description="processes (devices) on this machine; > 1 re-launches the stage under "
        "torchrun with DistributedDataParallel (multi-node: run torchrun yourself)")
    optimizer: Literal["adamw", "muon"] = Field(
        default="adamw",
        description="muon: torch.optim.Muon for the 2-D hidden matrices, AdamW for the rest")
    lr: float = Field(default=1e-3, gt=0, le=10, description="peak learning rate")
    min_lr: float = Field(default=1e-4, ge=0, description="where the cosine decay ends")
    muon_lr: float | None = Field(
        default=None, gt=0, description="Muon's peak lr; null = lr (Muon matches AdamW's RMS)")
    muon_momentum: float = Field(default=0.95, ge=0, lt=1)
    warmup_steps: int = Field(default=100, ge=0)
    weight_decay: float = Field(
        default=0.1, ge=0, description="decoupled; matrices only (no embeddings, gains, biases)")
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float = Field(default=1.0, ge=0, description="max global grad norm; 0 = off")
    batch_size: int = Field(default=16, ge=1, description="sequences per micro-batch per process")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step")
    max_steps: int | None = Field(default=1000, ge=1, description="optimizer steps")
    max_tokens: int | None = Field(default=None, ge=1, description="training tokens, all ranks")
    max_seconds: float | None = Field(
        default=None, gt=0,
        description="a wall-clock guard: stops the run (recorded as stopped_by: max_seconds, "
        "not reproducible) without changing the schedule; null in every shipped profile")
    eval_every: int = Field(default=100, ge=1, description="val loss every N steps (and at the end)")
    eval_batches: int | None = Field(
        default=8, ge=1,
        description="fixed val batches per evaluation; null = every window of the val split")
    select: Literal["best", "last"] = Field(
        default="best",
        description="publish the weights of the lowest periodic val loss (best) or of the last "
        "step; metrics record best_step and best_val_loss either way")
    log_every: int = Field(default=10, ge=1, description="MLflow train-loss logging interval")
    checkpoint_every: int = Field(default=200, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    progress: bool = Field(default=True, description="tqdm progress bar on stderr")

    @model_validator(mode="after")
    def _consistent(self) -> "TrainParams":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: must be <= lr ({self.lr}), got {self.min_lr}")
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("set max_steps or max_tokens (max_seconds is a guard, not a budget)")
        return self


class RnnParams(Section):
    model: RNNConfig = Field(default_factory=RNNConfig)
    context_length: int = Field(
        default=64, ge=1, description="tokens per training window (truncated BPTT) and per "
        "scoring window, each from a zero state")
    # Sized for 2 CPU cores: 3M tokens (about 7 epochs of TinyShakespeare at vocab 1024) with
    # dropout 0.2 in the GRU; the published weights are the best on validation (`select`).
    train: TrainParams = Field(default_factory=lambda: TrainParams(
        lr=3e-3, min_lr=3e-4, warmup_steps=50, weight_decay=0.0, batch_size=32,
        max_steps=None, max_tokens=3_000_000, max_seconds=None, eval_every=100,
        checkpoint_every=200))


class PretrainParams(Section):
    # dropout 0.05 with the weight decay below: the lowest val loss of the sweep (0.0 and 0.1
    # were worse at weight decay 3.0; README, "Why these defaults").
    model: TransformerConfig = Field(default_factory=lambda: TransformerConfig(dropout=0.05))
    # Sized for 2 CPU cores: 3M tokens (~7 epochs; about 5 minutes at ~10k tokens/s on the
    # quiet reference machine, bf16 autocast), Muon for the hidden matrices (lower val loss
    # than AdamW at every step count tried here); the published weights are the best on
    # validation (`select`), so the epochs past the best cost time, not quality.
    # 16 windows per step as 2 micro-batches of 8: the same windows and the same gradient
    # (up to rounding) as one batch of 16, 13% less CPU time per step (activations that stay
    # in cache; benchmarks/train.py); 16 val batches of 8 are the same val windows as 8 of 16.
    # lr 3e-3 and weight decay 3.0: the lowest val loss of the QK-norm sweep (README, "Why
    # these defaults"; benchmarks/points/transformer.yaml): val loss 2.956 at 0.5, 2.922 at 3.0,
    # 2.938 at 4.0 (dropout 0.1), 2.918 with dropout 0.05. Muon decays by lr x wd per step;
    # the gpu and large profiles keep 0.1.
    train: TrainParams = Field(default_factory=lambda: TrainParams(
        optimizer="muon", lr=3e-3, min_lr=3e-4, warmup_steps=30, weight_decay=3.0,
        batch_size=8, grad_accum=2, max_steps=None, max_tokens=3_000_000, max_seconds=None,
        eval_every=100, eval_batches=16, checkpoint_every=200))


# ----------------------------------------------------------------------------- sft / lora
class InstructTuneParams(Section):
    """What `sft` and `lora` share: the data rule (lmpipe/finetune/examples.py), the budget in epochs,
    the held-out samples, and the shared trainer's settings."""

    epochs: float | None = Field(
        default=3.0, gt=0, le=1000,
        description="Passes over the train examples; sets train.max_steps (null = use "
        "train.max_steps / train.max_tokens instead)")
    max_seq_len: int = Field(
        default=512, ge=8,
        description="Ids per templated example, capped at the model's context_length + 1")
    overflow: Literal["truncate", "drop"] = Field(
        default="truncate",
        description="A longer example: truncate the end of its response, or drop it")
    min_response_tokens: int = Field(
        default=8, ge=1, description="A truncated example keeps at least this many response "
        "tokens, else it is dropped")
    truncate_prompt: bool = Field(
        default=False, description="overflow truncate: cut the end of a prompt too long to "
        "leave min_response_tokens, instead of dropping the example")
    system_prompt: str | None = Field(
        default=DEFAULT_SYSTEM_PROMPT, description="The template's system line (null = none)")
    eval_batch_size: int = Field(default=16, ge=1, description="Examples per forward when scoring")
    samples: int = Field(
        default=4, ge=0, le=100,
        description="Held-out prompts answered by the base and the tuned model (MLflow text)")
    sample_tokens: int = Field(default=96, ge=1)
    sample_temperature: float = Field(default=0.0, ge=0, description="0 = greedy")


class SftParams(InstructTuneParams):
    """Full finetuning of every weight of the pretrained Transformer."""

    train: TrainParams = Field(default_factory=lambda: TrainParams(
        lr=3e-4, min_lr=3e-5, warmup_steps=10, weight_decay=0.0, batch_size=16,
        max_steps=1000, eval_every=25, eval_batches=4, log_every=5, checkpoint_every=100))


class LoraParams(InstructTuneParams):
    """Low-rank adapters (peft LoRA) on the pretrained Transformer, base weights frozen."""

    r: int = Field(default=8, ge=1, le=1024, description="adapter rank")
    alpha: float = Field(default=16.0, gt=0, description="scale alpha / r on the update B A")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[Literal["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]] = Field(
        default_factory=lambda: ["attn.qkv", "attn.proj"], min_length=1,
        description="Linear layers to adapt (suffixes of the module names)")
    include_mlp: bool = Field(default=False, description="also adapt mlp.fc and mlp.proj")
    train: TrainParams = Field(default_factory=lambda: TrainParams(
        lr=2e-3, min_lr=2e-4, warmup_steps=10, weight_decay=0.0, batch_size=16,
        max_steps=1000, eval_every=25, eval_batches=4, log_every=5, checkpoint_every=100))


# ----------------------------------------------------------------------------- evaluate
class EvaluateParams(Section):
    """Every model on the same held-out split (lmpipe/evaluation/scoring.py), plus the report card."""

    models: list[Literal["ngram", "rnn", "transformer", "sft", "lora"]] = Field(
        default_factory=lambda: list(MODELS), min_length=1,
        description="Models to score and report (dvc.yaml depends on all five folders)",
    )
    stride: int | None = Field(
        default=None, ge=1,
        description="Sliding-window stride for the Transformers (<= context_length); "
        "null = half the model's context length; the context length = non-overlapping windows",
    )
    rnn_context: int | None = Field(
        default=None, ge=1,
        description="Score the RNN in windows of this many tokens from a zero state; "
        "null = carry the hidden state through the whole split",
    )
    rnn_chunk: int = Field(default=256, ge=1, description="Tokens per RNN forward when carrying state")
    batch_size: int = Field(default=8, ge=1, description="Windows per forward pass")
    max_tokens: int | None = Field(
        default=None, ge=1,
        description="Score only N tokens of the split: whole documents spread over it, drawn "
        "by a fixed permutation (the same for every model and run); null = all",
    )
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="Transformer scoring precision: auto = bfloat16 autocast where the device "
        "has native bf16 (its bits per byte stay within 1e-3 of float32), else float32; "
        "recurrent models score in float32 under auto")
    samples_per_model: int = Field(default=2, ge=0, le=20)
    sample_tokens: int = Field(default=80, ge=1)
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["ROMEO:", "First Citizen:\n"], min_length=1,
        description="Prompts for the report's samples, used in turn",
    )
    instruct_prompts: list[str] = Field(
        default_factory=lambda: ["Give three tips for staying healthy.",
                                 "Write a short poem about the sea."],
        min_length=1, description="Prompts for the SFT/LoRA samples (asked through the chat template)",
    )
    temperature: float = Field(default=0.8, ge=0)
    top_k: int | None = Field(default=50, ge=1)


# ----------------------------------------------------------------------------- pipeline
class PipelineParams(Section):
    """How the Prefect flow runs the DVC stages (pipeline/flow.py); no stage reads it.

    The schedule and the work pool live in prefect.yaml (the deployment), not here.
    """

    retries: int = Field(default=2, ge=0, le=10, description="Retries of a stage that exits 1")
    retry_delay_s: float = Field(
        default=30.0, ge=0, le=3600, description="First retry delay; doubles each retry"
    )
    log_tail_lines: int = Field(default=40, ge=1, le=1000)
    lock_wait_s: float = Field(
        default=0.0, ge=-1, description="Wait for another run's checkout lock: 0 fail, -1 forever"
    )
    task_runner: Literal["sequential", "thread", "dask", "ray"] = "sequential"
    recheck_source: bool = Field(
        default=True, description="Retraining re-runs `download` so DVC re-checks the source"
    )
    promote: bool = Field(default=True, description="Retraining registers and promotes models")
    registry_prefix: str = Field(default="lmpipe-", description="Registered model = prefix+name")
    champion_alias: str = Field(default="champion", min_length=1)
    min_improvement_bpb: float = Field(
        default=0.0, ge=0, description="A challenger must beat the champion by more than this"
    )
    dvc_remote: str | None = Field(
        default=None,
        description="DVC remote URL (e.g. s3://bucket/lmpipe); LMPIPE_DVC_REMOTE overrides. "
        "None = push only when the repo already has a default remote",
    )
    push: bool = Field(default=True, description="Retraining runs `dvc push` when a remote exists")
    commit_branch: str | None = Field(
        default=None, description="Retraining commits dvc.lock to this git branch (None = no)"
    )


# ----------------------------------------------------------------------------- root
class Params(Section):
    seed: int = Field(default=1337, ge=0)
    data: DataParams = Field(default_factory=DataParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    download: DownloadParams = Field(default_factory=DownloadParams)
    tokenizer: TokenizerParams = Field(default_factory=TokenizerParams)
    ngram: NgramParams = Field(default_factory=NgramParams)
    rnn: RnnParams = Field(default_factory=RnnParams)
    pretrain: PretrainParams = Field(default_factory=PretrainParams)
    sft: SftParams = Field(default_factory=SftParams)
    lora: LoraParams = Field(default_factory=LoraParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    pipeline: PipelineParams = Field(default_factory=PipelineParams)


# ----------------------------------------------------------------------------- loading
_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def format_validation_error(err: ValidationError) -> str:
    """One `key.path: problem, got VALUE` clause per error (the CONVENTIONS format)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        kind, ctx = e["type"], e.get("ctx") or {}
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind in _BOUNDS:
            op, name = _BOUNDS[kind]
            msg = f"must be {op} {ctx[name]}, got {e['input']!r}"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], (dict, list)):
                msg = f"{msg}, got {e['input']!r}"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def validate_params(raw: Any, source: str = "params.yaml") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"{source}: the top level must be a mapping of sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise InputError(f"{source}: {format_validation_error(err)}") from None


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: params file not found") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}:{where} not valid YAML: {getattr(err, 'problem', err)}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raises InputError naming the key path on any problem."""
    return validate_params(read_yaml(path), str(path))


def tracking_experiment(root: Path) -> str:
    """`tracking.experiment` of the checkout's params.yaml, for tools that read no other
    section (lineage, sync-mlflow); the default when the file or the section is absent."""
    path = root / "params.yaml"
    raw = read_yaml(path) if path.exists() else None
    section = raw.get("tracking") if isinstance(raw, dict) else None
    try:
        return TrackingParams.model_validate(section or {}).experiment
    except ValidationError as err:
        raise InputError(f"{path}: tracking.{format_validation_error(err)}") from None
