"""The names every part of lmpipe agrees on, defined once (see ../shared/CONVENTIONS.md).

Stages, models, splits and file names appear in dvc.yaml, params.yaml, metrics files, MLflow
runs and the command line; a name changed here changes everywhere that imports it, and the
places that cannot import it (dvc.yaml, the README) are checked against it by the tests.
"""

from __future__ import annotations

# The DVC stages, upstream first. The same word names the params.yaml section, the dvc.yaml
# stage, the module stages/<name>.py, the MLflow run and metrics/<name>.json.
STAGES = ("download", "tokenizer", "ngram", "rnn", "pretrain", "sft", "lora", "evaluate")
# The stage before all of them: it checks params.yaml whole and opens the pipeline's MLflow
# run (stages/params.py). It has no section, metrics file or model of its own.
CHECK_STAGE = "params"

# The models, by the names users type (`lmpipe eval --model transformer`), each with the
# stage that trains it (its metrics file and loss curve are that stage's).
MODEL_STAGE = {"ngram": "ngram", "rnn": "rnn", "transformer": "pretrain", "sft": "sft",
               "lora": "lora"}
MODELS = tuple(MODEL_STAGE)
NEURAL_MODELS = ("rnn", "transformer", "sft", "lora")
CHAT_MODELS = ("sft", "lora")              # instruction-tuned: asked through the chat template

SPLITS = ("train", "val", "test")          # the corpus and its token files
INSTRUCT_SPLITS = ("train", "val")         # the instruction data (val is held out)

# Targets with this value are left out of a loss (padding, the prompt part in SFT).
IGNORE_INDEX = -100

# The system line of the chat template when params do not set another one.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Files inside the DVC outs.
WEIGHTS_FILE = "model.safetensors"         # a neural model's weights (safetensors)
MODEL_CONFIG_FILE = "config.json"          # what rebuilds the model around them
TOKENIZER_FILE = "tokenizer.model"         # the sentencepiece model
TOKENIZER_VOCAB_FILE = "tokenizer.vocab"   # a readable listing of its pieces
TOKENS_META_FILE = "meta.json"             # dtype, special ids and sizes of the token files
NGRAM_FILE = "model.npz"                   # the n-gram model, compact
ARPA_FILE = "model.arpa.gz"                # the same model in ARPA form (KenLM, SRILM)
SOURCE_FILE = "source.json"                # where the raw data came from, with checksums
LOSS_CSV = "loss.csv"                      # per-step loss of a training stage (DVC plots)
LOSS_PNG = "loss.png"

# The metrics keys (and checkpoint state fields) that measure wall-clock time or memory: they
# differ between two runs of the same params by nature. Every other value a stage writes is
# a function of the params and the data (tests/test_reproducible.py holds the pipeline to it).
TIMING_FIELD_SUFFIXES = ("_seconds", "per_second", "peak_rss_mb", "elapsed")

# Environment variables.
PARENT_RUN_ENV = "LMPIPE_PARENT_RUN_ID"    # the MLflow run the stage runs are children of
MIRROR_ENV = "LMPIPE_MIRROR"               # the offline mirror folder
DVC_STAGE_ENV = "DVC_STAGE"                # set by DVC for the stage command it runs
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"          # set by `dvc exp run`: the experiment's name
