"""MLflow model registry: register trained models and move the `champion` alias on merit.

A model is the folder a neural stage publishes (`data/models/<name>/`: model.safetensors +
config.json). It is logged as plain artifacts of the pipeline's parent run and registered as
a version of `<prefix><name>` with `create_model_version(source=...)` - no pickled model
flavour. The alias moves only when the new version's bits per byte beat the champion's;
either way the decision and its reason are tags on the version.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmpipe.core.metric_logger import default_tracking_uri
from lmpipe.core.names import MODEL_STAGE
from lmpipe.core.records import lock_out_md5, read_lock, read_metrics

# The models the registry holds (the neural ones a user would load and serve).
REGISTERED = ("transformer", "sft", "lora")


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
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:
        return None


def _ensure_registered(client, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException  # deferred: mlflow is slow to import

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:
            pass  # created concurrently


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
) -> Decision:
    name = f"{prefix}{model}"
    score = model_bpb(metrics, model)
    if score is None:
        return Decision(model, name, "skipped", f"no bpb for {model} in metrics/*.json")
    bpb, source = score
    rel = os.path.relpath(folder, root)
    model_md5 = lock_out_md5(read_lock(root, required=False), rel) or "unknown"
    _ensure_registered(client, name, f"lmpipe {model} (safetensors + config.json)")
    champion = _get_champion(client, name, alias)
    champ_bpb = _number(champion.tags.get("bpb")) if champion else None
    champ_v = str(champion.version) if champion else None

    latest = _latest_version(client, name)
    if latest is not None and model_md5 != "unknown" and latest.tags.get("model_md5") == model_md5:
        return Decision(model, name, "unchanged",
                        f"model files unchanged since version {latest.version} ({model_md5})",
                        version=str(latest.version), bpb=bpb, bpb_source=source,
                        champion_version=champ_v, champion_bpb=champ_bpb)

    artifact_path = f"models/{model}"
    client.log_artifacts(run_id, str(folder), artifact_path)
    source_uri = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    tags = {"bpb": f"{bpb:.6f}", "bpb_source": source, "model_md5": model_md5,
            "dvc_path": rel, **(extra_tags or {})}
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
    """Register every model folder that exists under data/models/ and decide on its alias."""
    from mlflow.tracking import MlflowClient  # deferred: mlflow takes seconds to import

    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri(),
                          registry_uri=tracking_uri or default_tracking_uri())
    metrics = read_metrics(root)
    decisions = []
    for model in models:
        folder = root / "data" / "models" / model
        if not (folder / "model.safetensors").exists():
            continue
        decisions.append(register_and_promote(client, run_id, model, folder, metrics, root,
                                              prefix, alias, min_improvement, extra_tags))
    return decisions
