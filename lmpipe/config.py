"""The params.yaml schema: one typed section per stage, unknown keys rejected.

The schema's defaults *are* the default profile: `params.yaml` is their dump, and the other
profiles (`profiles/<name>.yaml`) are small overlays on top of them. `lmpipe profile NAME`
writes the merged result to `params.yaml`, so DVC sees ordinary params changes and records
them in `dvc.lock` (lineage is kept whichever profile ran).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmpipe.errors import InputError

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


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
    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    filename: str = Field(min_length=1, description="Name in the mirror and the download cache")


class HFSource(Section):
    path: str
    name: str | None = None
    split: str = "train"
    text_field: str = "text"


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


class InstructParams(Section):
    format: Literal["self_instruct", "gsm8k"] = "self_instruct"
    files: list[RemoteFile] = Field(default_factory=lambda: copy.deepcopy(SELF_INSTRUCT))
    val_fraction: float = Field(default=0.1, gt=0, lt=1)


class DownloadParams(Section):
    source: Literal["url", "hf", "local"] = "url"
    files: list[RemoteFile] = Field(default_factory=lambda: [TINYSHAKESPEARE.model_copy()])
    hf: HFSource | None = None
    local: str | None = Field(default=None, description="Path or glob of .txt/.jsonl/.parquet")
    encoding: str = "utf-8"
    strip_gutenberg: bool = False
    split: SplitFractions = Field(default_factory=SplitFractions)
    retries: int = Field(default=4, ge=0, le=20)
    timeout_s: float = Field(default=30.0, gt=0)
    instruct: InstructParams = Field(default_factory=InstructParams)

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
    num_threads: int = Field(default=2, ge=1, le=256)
    character_coverage: float = Field(default=1.0, gt=0, le=1)
    max_sentence_length: int = Field(default=16384, ge=64)
    input_sentence_size: int = Field(default=0, ge=0, description="0 = use every line")


# ----------------------------------------------------------------------------- root
class Params(Section):
    seed: int = Field(default=1337, ge=0)
    data: DataParams = Field(default_factory=DataParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    download: DownloadParams = Field(default_factory=DownloadParams)
    tokenizer: TokenizerParams = Field(default_factory=TokenizerParams)


# ----------------------------------------------------------------------------- loading
_BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def _format_error(err: ValidationError) -> str:
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
        raise InputError(f"{source}: {_format_error(err)}") from None


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


def default_params_dict() -> dict:
    return Params().model_dump(mode="json")


def deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def available_profiles() -> list[str]:
    return ["default"] + sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_dict(name: str) -> dict:
    """The full params of a profile: schema defaults, then the profile's overlay."""
    base = default_params_dict()
    if name == "default":
        return base
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.exists():
        raise InputError(f"unknown profile {name!r}; available: {', '.join(available_profiles())}")
    overlay = read_yaml(path) or {}
    merged = deep_merge(base, overlay)
    validate_params(merged, str(path))
    return merged


def dump_params(params: dict) -> str:
    header = (
        "# lmpipe params: one section per stage (see README). Validated by lmpipe/config.py;\n"
        "# regenerate a profile with `lmpipe profile default|smoke|gpu`.\n"
    )
    return header + yaml.safe_dump(params, sort_keys=False, default_flow_style=False, width=100)
