"""The bad-input catalogue: every case a user can get wrong, driven like a user would.

Each case edits params.yaml or a file of a scratch project (LMPIPE_ROOT), runs the real
command (`python -m stages.<name>` or `lmpipe ...`) as a subprocess and asserts three things:
exit code 2, a message that names the thing at fault (key path, file, offset), and that no
file the project already held was touched (every file under the project hashed before and
after). The upstream artifacts (corpus, tokenizer, a tiny trained Transformer with its
checkpoints) are built once per module.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from lmpipe.core.profiles import deep_merge, dump_params, profile_dict

# Heavy: real stages, DVC repos or a Prefect server (`make test-fast` leaves them out).
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CAESAR = "gutenberg/shakespeare-caesar.txt"   # Latin-1 (byte 0xe6 in "C\xe6sar"), in the mirror

# The smoke profile, made smaller still: the catalogue needs artifacts, not good models.
TINY = {
    "download": {"max_bytes": 60000, "instruct": {"max_rows": 40}},
    "pretrain": {
        "model": {"context_length": 32, "n_layer": 1, "n_head": 2, "d_model": 32},
        "train": {"batch_size": 4, "max_steps": 4, "warmup_steps": 1, "eval_every": 2,
                  "eval_batches": 1, "checkpoint_every": 2, "log_every": 1,
                  "progress": False},
    },
}


def tiny_params() -> dict:
    return deep_merge(profile_dict("smoke"), TINY)


def project_env(root: Path, mirror: Path) -> dict[str, str]:
    """The environment a user's shell would have: the project root, the mirror, no MLflow."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMPIPE_", "MLFLOW_TRACKING"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        LMPIPE_ROOT=str(root),
        LMPIPE_MIRROR=str(mirror),
        LMPIPE_TRACKING="off",   # tracking has its own tests; here it would only cost seconds
    )
    return env


def sh(cmd: list[str], root: Path, env: dict[str, str], timeout: int = 600):
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def must(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def snapshot(root: Path, skip: tuple[str, ...] = ("params.yaml", "inputs", ".lmpipe")) -> dict[str, str]:
    """sha256 of every file under the project (the inputs the cases edit excluded)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(skip):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def proj(tmp_path_factory, mirror):
    """download + tokenizer + a 4-step pretrain (checkpoints at steps 2 and 4), once."""
    root = tmp_path_factory.mktemp("badinput")
    env = project_env(root, mirror)
    (root / "params.yaml").write_text(dump_params(tiny_params()))
    for stage in ("download", "tokenizer", "pretrain"):
        must(sh([sys.executable, "-m", f"stages.{stage}"], root, env))
    assert sorted(p.name for p in (root / "data/checkpoints/pretrain").iterdir()) == [
        "step-00000002", "step-00000004"]
    (root / "inputs").mkdir()
    return root, env


# ----------------------------------------------------------------------------- the cases
@dataclass
class Case:
    id: str
    cmd: list[str]
    message: str                                   # regex searched in stderr
    params: dict = field(default_factory=dict)     # overlay on the module's params
    raw_params: str | None = None                  # params.yaml text, verbatim
    setup: Callable[[Path], None] | None = None    # breaks a file (restored afterwards)
    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[Path], None] | None = None    # extra assertion after the run
    backup: tuple[str, ...] = ()                   # files/folders setup() changes


def stage(name: str) -> list[str]:
    return [sys.executable, "-m", f"stages.{name}"]


def lmpipe(*args: str) -> list[str]:
    return [str(BIN / "lmpipe"), *args]


def _write(rel: str, data: bytes) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return setup


def _copy_caesar(root: Path) -> None:
    mirror = Path(os.environ.get("LMPIPE_MIRROR") or REPO.parent / "shared" / "data")
    shutil.copy(mirror / CAESAR, root / "inputs" / "caesar.txt")


def _evil_tar(root: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("ok.txt", b"fine text\n" * 20), ("../escaped.txt", b"owned\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (root / "inputs" / "evil.tar.gz").write_bytes(buf.getvalue())


def _nothing_escaped(root: Path) -> None:
    assert not list(root.parent.rglob("escaped.txt")), "an archive member escaped its folder"


INSTRUCT_ROWS = [
    {"instruction": "Say hi.", "instances": [{"input": "", "output": "Hi."}]},
    {"instruction": "Name a colour.", "instances": [{"input": "", "outptu": "Blue."}]},  # typo
]


def _bad_instruct(root: Path) -> None:
    mirror = root / "inputs" / "mirror"
    mirror.mkdir(parents=True, exist_ok=True)
    src = Path(os.environ.get("LMPIPE_MIRROR") or REPO.parent / "shared" / "data")
    shutil.copy(src / "tinyshakespeare.txt", mirror / "tinyshakespeare.txt")
    (mirror / "bad_instruct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in INSTRUCT_ROWS))


def _instruct_params() -> dict:
    data = "".join(json.dumps(r) + "\n" for r in INSTRUCT_ROWS).encode()
    return {"download": {"instruct": {"files": [{
        "url": "https://example.invalid/bad_instruct.jsonl",
        "sha256": hashlib.sha256(data).hexdigest(), "filename": "bad_instruct.jsonl"}]}}}


MODEL = "data/models/transformer"
CKPT = "data/checkpoints/pretrain/step-00000004"


def _truncate(rel: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        path = root / rel
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return setup


def _garble_header(rel: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        path = root / rel
        data = bytearray(path.read_bytes())
        data[8:40] = b"\xff" * 32                 # the JSON header: no longer JSON
        path.write_bytes(bytes(data))
    return setup


def _config_edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        path = root / MODEL / "config.json"
        info = json.loads(path.read_text())
        change(info)
        path.write_text(json.dumps(info))
    return setup


def _other_vocab_model(root: Path) -> None:
    """A complete, loadable model folder whose vocabulary is not the tokenizer's."""
    from lmpipe.models.store import build_model, save_model

    info = json.loads((root / MODEL / "config.json").read_text())
    cfg = {**info["config"], "vocab_size": info["config"]["vocab_size"] + 16}
    save_model(build_model("transformer", cfg), root / MODEL, "transformer", cfg,
               extra={k: v for k, v in info.items() if k not in ("model_type", "config")})


class Marker:
    """Unpickling this creates the marker file: proof that a pickle was executed."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _marker(root: Path) -> Path:
    return root.parent / f"{root.name}-PWNED"


def _pickle_as(rel: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        (root / rel).write_bytes(pickle.dumps({"weights": Marker(_marker(root))}))
    return setup


def _torch_pickle_as(rel: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        import torch

        torch.save([{"state": Marker(_marker(root))}], root / rel)
    return setup


def _no_marker(root: Path) -> None:
    assert not _marker(root).exists(), "a pickle offered as weights was executed"


def _text_file(name: str, data: bytes) -> Callable[[Path], None]:
    return _write(f"inputs/{name}", data)


CASES = [
    # ---- params.yaml (validated before any work)
    Case("unknown-params-key", stage("tokenizer"), r"tokenizer\.vocab_sise: unknown key",
         params={"tokenizer": {"vocab_sise": 512}}),
    Case("wrong-type", stage("pretrain"),
         r"pretrain\.train\.batch_size: .*integer.*got 'eight'",
         params={"pretrain": {"train": {"batch_size": "eight"}}}),
    Case("negative-learning-rate", stage("pretrain"),
         r"pretrain\.train\.lr: must be > 0(\.0)?, got -0\.001",
         params={"pretrain": {"train": {"lr": -0.001}}}),
    Case("context-length-0", stage("pretrain"),
         r"pretrain\.model\.context_length: must be >= 1, got 0",
         params={"pretrain": {"model": {"context_length": 0}}}),
    Case("rnn-context-length-0", stage("rnn"), r"rnn\.context_length: must be >= 1, got 0",
         params={"rnn": {"context_length": 0}}),
    Case("min-lr-above-lr", stage("pretrain"), r"pretrain\.train: min_lr: must be <= lr",
         params={"pretrain": {"train": {"min_lr": 0.5}}}),
    Case("heads-do-not-divide-width", stage("pretrain"),
         r"pretrain\.model: n_head: must divide d_model \(32\), got 3",
         params={"pretrain": {"model": {"n_head": 3}}}),
    Case("split-fractions-not-summing-to-1", stage("download"),
         r"download\.split: train \+ val \+ test must sum to 1, got 0\.9",
         params={"download": {"split": {"train": 0.8}}}),
    Case("unknown-encoding", stage("download"), r"download\.encoding: unknown text encoding",
         params={"download": {"encoding": "latin-99"}}),
    Case("params-not-yaml", stage("ngram"), r"params\.yaml: line [34] not valid YAML",
         raw_params="seed: 1\nngram:\n  order: [3\n"),
    Case("vocab-larger-than-corpus-supports", stage("tokenizer"),
         r"tokenizer\.vocab_size: 60000 is too large for this training corpus",
         params={"tokenizer": {"vocab_size": 60000}}),
    # ---- the corpus and the instruction data
    Case("missing-corpus-file", stage("download"),
         r"download\.local: no file matches 'inputs/nope\.txt'",
         params={"download": {"source": "local", "local": "inputs/nope.txt"}}),
    Case("wrong-sha256", stage("download"),
         r"tinyshakespeare\.txt.*sha256 mismatch: expected 0{64}, got 86c4e6aa",
         params={"download": {"files": [{
             "url": "https://example.invalid/input.txt", "sha256": "0" * 64,
             "filename": "tinyshakespeare.txt"}]}}),
    Case("empty-corpus", stage("download"), r"the corpus is empty: .*empty\.txt",
         params={"download": {"source": "local", "local": "inputs/empty.txt"}},
         setup=_text_file("empty.txt", b"")),
    Case("latin-1-without-encoding", stage("download"),
         r"caesar\.txt: not valid utf-8 at byte offset \d+ .*download\.encoding",
         params={"download": {"source": "local", "local": "inputs/caesar.txt"}},
         setup=_copy_caesar),
    Case("binary-file", stage("download"),
         r"blob\.txt: looks like a binary file \(NUL byte at byte offset 4\)",
         params={"download": {"source": "local", "local": "inputs/blob.txt"}},
         setup=_text_file("blob.txt", b"\x89PNG\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)),
    Case("archive-member-escaping", stage("download"),
         r"evil\.tar\.gz: member '\.\./escaped\.txt' would be written outside",
         params={"download": {"source": "local", "local": "inputs/evil.tar.gz"}},
         setup=_evil_tar, check=_nothing_escaped),
    Case("instruction-row-without-response", stage("download"),
         r"bad_instruct\.jsonl:2 \(instance 0\): no 'output' field \(the response\)",
         params=_instruct_params(), setup=_bad_instruct, env={"LMPIPE_MIRROR": "inputs/mirror"}),
    # ---- models and checkpoints offered to the commands
    Case("truncated-weights", lmpipe("generate", "--model", "transformer", "--prompt", "ROMEO:"),
         r"data/models/transformer/model\.safetensors: cannot load weights",
         setup=_truncate(f"{MODEL}/model.safetensors"), backup=(MODEL,)),
    Case("corrupted-weights-header", lmpipe("eval", "--model", "transformer", "--text", "inputs/t.txt"),
         r"data/models/transformer/model\.safetensors: cannot load weights",
         setup=lambda r: (_garble_header(f"{MODEL}/model.safetensors")(r),
                          _text_file("t.txt", b"ROMEO: hello\n")(r)),
         backup=(MODEL,)),
    Case("checkpoint-of-another-shape", lmpipe("generate", "--model", "transformer"),
         r"model\.safetensors: cannot load weights into the transformer described by config\.json",
         setup=_config_edit(lambda i: i["config"].update(d_model=64)), backup=(MODEL,)),
    Case("tokenizer-model-vocab-mismatch", lmpipe("generate", "--model", "transformer", "--prompt", "A"),
         r"data/models/transformer: the model's vocabulary \(400\) is not the tokenizer's \(384\)",
         setup=_other_vocab_model, backup=(MODEL,)),
    Case("tokenizer-model-vocab-mismatch-in-eval",
         lmpipe("eval", "--model", "transformer", "--text", "inputs/t.txt"),
         r"data/models/transformer: the model's vocabulary \(400\) is not the tokenizer's \(384\)",
         setup=lambda r: (_other_vocab_model(r), _text_file("t.txt", b"ROMEO: hello\n")(r)),
         backup=(MODEL,)),
    Case("pickle-renamed-safetensors", lmpipe("generate", "--model", "transformer"),
         r"data/models/transformer/model\.safetensors: cannot load weights",
         setup=_pickle_as(f"{MODEL}/model.safetensors"), check=_no_marker, backup=(MODEL,)),
    Case("malicious-optimizer-pickle-in-checkpoint", stage("pretrain"),
         r"step-00000004/optimizer\.pt.*(refus|unsafe|weights_only)",
         setup=_torch_pickle_as(f"{CKPT}/optimizer.pt"), check=_no_marker,
         backup=("data/checkpoints/pretrain",)),
    Case("truncated-checkpoint", stage("pretrain"), r"step-00000004/model\.safetensors",
         setup=_truncate(f"{CKPT}/model.safetensors"), backup=("data/checkpoints/pretrain",)),
    # ---- command-line arguments
    Case("prompt-longer-than-context",
         lmpipe("generate", "--model", "transformer", "--prompt", "ROMEO: " * 40),
         r"the prompt is \d+ tokens .* the model's context is 32 tokens"),
    Case("unknown-model-in-eval", lmpipe("eval", "--model", "gpt5", "--text", "inputs/t.txt"),
         r"--model: unknown model 'gpt5'; choose one of ngram, rnn, transformer, sft, lora",
         setup=_text_file("t.txt", b"ROMEO: hello\n")),
    Case("eval-text-missing", lmpipe("eval", "--model", "transformer", "--text", "inputs/gone.txt"),
         r"--text: inputs/gone\.txt: file not found"),
    Case("eval-text-latin-1", lmpipe("eval", "--model", "transformer", "--text", "inputs/caesar.txt"),
         r"caesar\.txt.*byte offset \d+", setup=_copy_caesar),
    Case("generate-zero-new-tokens", lmpipe("generate", "--model", "rnn", "--max-new-tokens", "0"),
         r"--max-new-tokens: must be >= 1, got 0"),
    Case("model-not-trained-yet", lmpipe("generate", "--model", "sft", "--prompt", "Hi"),
         r"model 'sft' not found at .*data/models/sft; run `dvc repro sft` first"),
    Case("registered-model-without-a-store",
         lmpipe("generate", "--model", "models:/lmpipe-transformer@champion"),
         r"models:/lmpipe-transformer@champion: no MLflow store at .*mlflow\.db"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_names_the_fault_and_overwrites_nothing(proj, case: Case):
    root, env = proj
    params_file = root / "params.yaml"
    params_text = params_file.read_text()
    saved = root.parent / f"{root.name}-backup"
    shutil.rmtree(saved, ignore_errors=True)
    for rel in case.backup:
        shutil.copytree(root / rel, saved / rel)
    try:
        if case.raw_params is not None:
            params_file.write_text(case.raw_params)
        elif case.params:
            merged = deep_merge(yaml.safe_load(params_text), case.params)
            params_file.write_text(yaml.safe_dump(merged, sort_keys=False))
        if case.setup:
            case.setup(root)
        extra = {k: str(root / v) if v.startswith("inputs/") else v for k, v in case.env.items()}
        before = snapshot(root)
        proc = sh(case.cmd, root, {**env, **extra})
        after = snapshot(root)
    finally:
        params_file.write_text(params_text)
        for rel in case.backup:
            shutil.rmtree(root / rel)
            shutil.copytree(saved / rel, root / rel)
        shutil.rmtree(saved, ignore_errors=True)
    detail = f"\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    print(f"{case.id}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:300]}")
    assert proc.returncode == 2, f"exit {proc.returncode}{detail}"
    assert re.search(case.message, proc.stderr), f"message does not match {case.message!r}{detail}"
    assert "Traceback" not in proc.stderr, detail
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files written or changed by a failed run: {changed}"
    if case.check:
        case.check(root)


def test_readme_states_what_the_catalogue_tries():
    """The README's table and its count describe this catalogue: a case added without them,
    or a row left after its case went, makes the documentation wrong."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    count = re.search(r"\*\*Bad inputs tried: (\d+)\.\*\*", readme)
    assert count, "README.md lost its 'Bad inputs tried: N.' line"
    assert int(count.group(1)) == len(CASES) == len({c.id for c in CASES})
