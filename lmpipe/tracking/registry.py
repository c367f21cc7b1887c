"""MLflow model registry: register trained models and move the `champion` alias on merit.

A model is the folder it is loaded from (`lmpipe.core.paths.model_dir`: model.safetensors +
config.json; LoRA's is its merged weights). It is logged as plain artifacts of the pipeline's
parent run, with the tokenizer it was trained with (`tokenizer/`) and, for LoRA, the adapter
(`adapter/`), and registered as a version of `<prefix><name>` with
`create_model_version(source=...)` - no pickled model flavour. The tokenizer travels with the
weights because a champion may predate the checkout's tokenizer: loading it with another one
would decode wrong pieces silently when the vocabulary sizes happen to agree.

Every version carries the md5 of each file it holds (`files_md5`), so that whoever loads it
(lmpipe/tracking/registered.py) can prove it got exactly the registered bytes, whatever the
artifact store (local, S3, an MLflow server) did in between.

Every model in `REGISTERED` gets a decision, "skipped" included (no model folder, no bpb):
a model silently left out of the registry reads, in the promotion report, like one that was
never meant to be there. The alias moves only when the new version's bits per byte beat the
champion's; either way the decision and its reason are tags on the version. Reading the
current champion is strict: only a registered model without the alias means "no champion yet";
any other error of the registry fails the promotion before anything is written, because an
outage read as "no champion" would crown whatever version came next.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmpipe.core.files import md5_file
from lmpipe.core.metric_logger import default_tracking_uri
from lmpipe.core.names import MODEL_STAGE, TOKENIZER_FILE, WEIGHTS_FILE
from lmpipe.core.paths import lora_adapter_dir, model_dir, project_root, tokenizer_dir
from lmpipe.core.records import lock_out_md5, read_lock, read_metrics

# The models the registry holds (the neural ones a user would load and serve).
REGISTERED = ("transformer", "sft", "lora")

# Version tags that the loading side (lmpipe/tracking/registered.py) reads.
MODEL_TAG = "lmpipe_model"        # the model's name in lmpipe (transformer, sft, lora)
FILES_TAG = "files_md5"           # JSON {path inside the version: md5} of every file it holds
# Folders inside a version, beside the model's own files.
TOKENIZER_SUBDIR = "tokenizer"
ADAPTER_SUBDIR = "adapter"


@dataclass
class Decision:
    model: str
    registered_model: str
    action: str  # "promoted" | "kept" | "unchanged" | "skipped"
    reason: str
    version: str | None = None
    bpb: float | None = None
    bpb_source: str | None = None
    champion_version: str | None = None
    champion_bpb: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    try:
        f = float(v)
        return f if math.isfinite(f) else None
    except (TypeError, ValueError):
        return None


def model_bpb(metrics: dict[str, Any], model: str) -> tuple[float, str] | None:
    """The score a model is judged on: test bpb from evaluate, else its own stage's metrics
    (test_bpb, then val_bpb) while there is no evaluate stage."""
    ev = metrics.get("evaluate")
    if isinstance(ev, dict) and isinstance(ev.get(model), dict):
        value = _number(ev[model].get("test_bpb"))
        if value is not None:
            return value, "evaluate.test_bpb"
    stage = MODEL_STAGE.get(model, model)
    own = metrics.get(stage)
    if isinstance(own, dict):
        for key in ("test_bpb", "val_bpb"):
            value = _number(own.get(key))
            if value is not None:
                return value, f"{stage}.{key}"
    return None


def decide(new_bpb: float, champion_bpb: float | None, min_improvement: float = 0.0,
           champion_version: str | None = None) -> tuple[bool, str]:
    """Promote when there is no champion, or the new bpb beats it by more than the margin."""
    if champion_bpb is None:
        who = f"champion v{champion_version} has no bpb tag" if champion_version else \
            "no champion yet"
        return True, f"{who}; new bpb {new_bpb:.4f}"
    if new_bpb < champion_bpb - min_improvement:
        return True, (f"bpb {new_bpb:.4f} improves on champion v{champion_version} "
                      f"({champion_bpb:.4f}) by {champion_bpb - new_bpb:.4f}")
    margin = f" by more than {min_improvement:g}" if min_improvement else ""
    return False, (f"bpb {new_bpb:.4f} does not improve{margin} on champion "
                   f"v{champion_version} ({champion_bpb:.4f}); champion kept")


def _get_champion(client, name: str, alias: str):
    """The version holding `alias`, or None when the registered model has no such alias.

    Read from the registered model's alias map rather than by catching the error of
    `get_model_version_by_alias`: "alias not found" has no error code of its own there
    (INVALID_PARAMETER_VALUE), so any failure would have to be guessed at. Every error here
    propagates and fails the promotion.
    """
    version = (client.get_registered_model(name).aliases or {}).get(alias)
    return client.get_model_version(name, str(version)) if version is not None else None


def _ensure_registered(client, name: str, description: str) -> None:
    """Create the registered model when it does not exist; any other error propagates."""
    from mlflow.exceptions import MlflowException  # deferred: mlflow is slow to import

    try:
        client.get_registered_model(name)
        return
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":   # else: created concurrently
            raise


def version_files(folder: Path, extras: dict[str, Path]) -> dict[str, Path]:
    """Every file a version holds, by its path inside the version: the model folder's files,
    then each extra folder's under its own name (tokenizer/, adapter/)."""
    files = {f.relative_to(folder).as_posix(): f for f in sorted(folder.rglob("*")) if f.is_file()}
    for sub, path in extras.items():
        files.update({f"{sub}/{f.relative_to(path).as_posix()}": f
                      for f in sorted(path.rglob("*")) if f.is_file()})
    return files


def files_manifest(files: dict[str, Path]) -> str:
    """The `files_md5` tag: sorted JSON, so equal files give an equal tag (the "unchanged" test)."""
    return json.dumps({rel: md5_file(f) for rel, f in sorted(files.items())}, sort_keys=True,
                      separators=(",", ":"))


def _under(root: Path, path: Path) -> Path:
    """`path` (from lmpipe.core.paths, under the current project root) under `root`."""
    return root / path.relative_to(project_root())


def version_extras(model: str, root: Path) -> dict[str, Path]:
    """What a version holds besides the model folder: the tokenizer, LoRA's adapter."""
    extras = {TOKENIZER_SUBDIR: _under(root, tokenizer_dir())}
    if model == "lora":
        extras[ADAPTER_SUBDIR] = _under(root, lora_adapter_dir())
    return {sub: path for sub, path in extras.items()
            if (path / TOKENIZER_FILE).is_file() or (sub != TOKENIZER_SUBDIR and path.is_dir())}


def _latest_version(client, name: str):
    versions = client.search_model_versions(f"name = '{name}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def register_and_promote(
    client,
    run_id: str,
    model: str,
    folder: Path,
    metrics: dict[str, Any],
    root: Path,
    prefix: str = "lmpipe-",
    alias: str = "champion",
    min_improvement: float = 0.0,
    extra_tags: dict[str, str] | None = None,
    extras: dict[str, Path] | None = None,
) -> Decision:
    """Register `folder` (plus `extras`: {folder name inside the version: local folder}) as a
    new version of `<prefix><model>` unless its files equal the latest version's, and move
    `alias` to it when its bpb beats the champion's by more than `min_improvement`."""
    name = f"{prefix}{model}"
    rel = os.path.relpath(folder, root)
    if not (folder / WEIGHTS_FILE).exists():
        return Decision(model, name, "skipped", f"no model at {rel} (stage "
                        f"{MODEL_STAGE.get(model, model)!r} has not published one)")
    score = model_bpb(metrics, model)
    if score is None:
        return Decision(model, name, "skipped", f"no bpb for {model} in metrics/*.json")
    bpb, source = score
    lock = read_lock(root, required=False)
    model_md5 = lock_out_md5(lock, rel) or "unknown"
    extras = extras or {}
    manifest = files_manifest(version_files(folder, extras))
    _ensure_registered(client, name, f"lmpipe {model} (safetensors + config.json)")
    champion = _get_champion(client, name, alias)
    champ_bpb = _number(champion.tags.get("bpb")) if champion else None
    champ_v = str(champion.version) if champion else None

    latest = _latest_version(client, name)
    if latest is not None and latest.tags.get(FILES_TAG) == manifest:
        return Decision(model, name, "unchanged",
                        f"model files unchanged since version {latest.version} ({model_md5})",
                        version=str(latest.version), bpb=bpb, bpb_source=source,
                        champion_version=champ_v, champion_bpb=champ_bpb)

    artifact_path = f"models/{model}"
    client.log_artifacts(run_id, str(folder), artifact_path)
    for sub, path in extras.items():
        client.log_artifacts(run_id, str(path), f"{artifact_path}/{sub}")
    source_uri = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    tags = {"bpb": f"{bpb:.6f}", "bpb_source": source, "model_md5": model_md5,
            "dvc_path": rel, MODEL_TAG: model, FILES_TAG: manifest, **(extra_tags or {})}
    for sub, path in extras.items():
        tags[f"{sub}_md5"] = lock_out_md5(lock, os.path.relpath(path, root)) or "unknown"
    mv = client.create_model_version(name, source=source_uri, run_id=run_id, tags=tags,
                                     description=f"{model}: {source} = {bpb:.4f}")
    promote, reason = decide(bpb, champ_bpb, min_improvement, champ_v)
    if promote:
        client.set_registered_model_alias(name, alias, mv.version)
    action = "promoted" if promote else "kept"
    client.set_model_version_tag(name, mv.version, "promotion", action)
    client.set_model_version_tag(name, mv.version, "promotion_reason", reason)
    client.set_registered_model_tag(name, "last_decision", f"v{mv.version} {action}: {reason}")
    return Decision(model, name, action, reason, version=str(mv.version), bpb=bpb,
                    bpb_source=source,
                    champion_version=champ_v, champion_bpb=champ_bpb)


def promote_models(
    root: Path,
    run_id: str,
    tracking_uri: str | None = None,
    prefix: str = "lmpipe-",
    alias: str = "champion",
    min_improvement: float = 0.0,
    models: tuple[str, ...] = REGISTERED,
    extra_tags: dict[str, str] | None = None,
) -> list[Decision]:
    """A decision for every model in `models`: registered (promoted or kept), unchanged, or
    skipped with the reason (no model folder, no bpb). Registry errors propagate."""
    from mlflow.tracking import MlflowClient  # deferred: mlflow takes seconds to import

    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri(),
                          registry_uri=tracking_uri or default_tracking_uri())
    metrics = read_metrics(root)
    return [register_and_promote(client, run_id, model, _under(root, model_dir(model)), metrics, root, prefix,
                                 alias, min_improvement, extra_tags,
                                 extras=version_extras(model, root))
            for model in models]
