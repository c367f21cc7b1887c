"""Loading a registered model: `models:/NAME@ALIAS`, `models:/NAME/VERSION` or an MLflow run id,
resolved to a local folder that holds exactly the registered bytes.

The registry (lmpipe/tracking/registry.py) tags every version with the md5 of each file it
holds (`files_md5`). Resolving downloads the version's artifacts into
`.lmpipe/registry/<name>/<version>/` (published atomically, reused while every file still
matches) and checks the folder against that manifest: the same set of files, each with its
registered md5. A file that differs, is missing or is extra fails with exit 2 naming the URI
and the file, so `lmpipe generate --model models:/lmpipe-transformer@champion` either runs the
champion's own bytes or nothing.

A run id names the pipeline run that registered versions (the flow's parent run), or the MLflow
run of the stage that trained one (a child of that run); it must lead to exactly one model the
command accepts, else the error lists the `models:/NAME/VERSION` URIs to choose from.

Reading never creates a store: a SQLite store that does not exist is an error naming its path,
not an empty registry written into the project.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lmpipe.core.errors import InputError
from lmpipe.core.files import atomic_dir, md5_file
from lmpipe.core.metric_logger import default_tracking_uri
from lmpipe.core.names import MODEL_STAGE, TOKENIZER_FILE
from lmpipe.core.paths import scratch_dir
from lmpipe.tracking.registry import FILES_TAG, MODEL_TAG, TOKENIZER_SUBDIR

MODELS_SCHEME = "models:/"
RUN_ID = re.compile(r"[0-9a-f]{32}")
STAGE_TAG = "dvc_stage"                     # set on every stage run (metric_logger)
PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class RegisteredModel:
    uri: str                  # what the user typed
    name: str                 # registered model name
    version: str
    model: str                # lmpipe's name for it (transformer, sft, lora)
    folder: Path              # local copy, md5-checked
    tokenizer: Path | None    # the tokenizer registered with it, if any


def is_registry_ref(text: str) -> bool:
    """`models:/...` or a bare MLflow run id (32 hex digits)."""
    return text.startswith(MODELS_SCHEME) or bool(RUN_ID.fullmatch(text))


def _client(ref: str, tracking_uri: str | None):
    from mlflow.tracking import MlflowClient  # deferred: mlflow takes seconds to import

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and "mode=ro" not in uri:
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        if not db.is_file():
            raise InputError(f"{ref}: no MLflow store at {db} (MLFLOW_TRACKING_URI); nothing "
                             "is registered there")
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _not_found(err) -> bool:
    return getattr(err, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST",
                                                "INVALID_PARAMETER_VALUE")


def _by_uri(client, ref: str):
    """models:/NAME@ALIAS or models:/NAME/VERSION -> the model version."""
    from mlflow.exceptions import MlflowException  # deferred: mlflow is slow to import

    body = ref[len(MODELS_SCHEME):]
    if "@" in body:
        name, alias = body.split("@", 1)
        fetch = lambda: client.get_model_version_by_alias(name, alias)  # noqa: E731
    elif body.count("/") == 1 and body.split("/")[1].isdigit():
        name, version = body.split("/")
        fetch = lambda: client.get_model_version(name, version)  # noqa: E731
    else:
        raise InputError(f"{ref}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if not name:
        raise InputError(f"{ref}: no registered model name")
    try:
        return fetch()
    except MlflowException as err:
        if _not_found(err):
            raise InputError(f"{ref}: does not resolve: {err.message}") from None
        raise


def _by_run(client, run_id: str, choices: tuple[str, ...]):
    """The one version of an accepted model that run `run_id` registered (or, for a stage's
    run, that its parent pipeline run registered from the stage's model)."""
    from mlflow.exceptions import MlflowException  # deferred: mlflow is slow to import

    versions = client.search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            if _not_found(err):
                raise InputError(f"{run_id}: no MLflow run with this id") from None
            raise
        stage, parent = run.data.tags.get(STAGE_TAG), run.data.tags.get(PARENT_TAG)
        if parent:
            versions = [v for v in client.search_model_versions(f"run_id = '{parent}'")
                        if MODEL_STAGE.get(v.tags.get(MODEL_TAG, "")) == stage]
    usable = [v for v in versions if v.tags.get(MODEL_TAG) in choices]
    if len(usable) == 1:
        return usable[0]
    listed = ", ".join(f"models:/{v.name}/{v.version}" for v in (usable or versions))
    if not usable:
        found = f" (it registered {listed})" if listed else ""
        raise InputError(f"{run_id}: this run registered no model of {', '.join(choices)}"
                         f"{found}")
    raise InputError(f"{run_id}: this run registered several models; name one: {listed}")


def manifest_of(version, ref: str) -> dict[str, str]:
    text = version.tags.get(FILES_TAG)
    if not text:
        raise InputError(f"{ref}: version {version.version} of {version.name} records no file "
                         f"checksums ({FILES_TAG}); register it again with `lmpipe run "
                         "--retrain`")
    return json.loads(text)


def check_files(folder: Path, manifest: dict[str, str], ref: str) -> None:
    """Exactly the registered files, each with its registered md5 (else InputError)."""
    present = {f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file()}
    for rel in sorted(set(manifest) - present):
        raise InputError(f"{ref}: {rel}: registered but missing from the downloaded version")
    for rel in sorted(present - set(manifest)):
        raise InputError(f"{ref}: {rel}: not part of the registered version (unexpected file)")
    for rel, want in sorted(manifest.items()):
        got = md5_file(folder / rel)
        if got != want:
            raise InputError(f"{ref}: {rel}: md5 {got} is not the registered {want}; the "
                             "artifact store no longer holds the registered bytes")


def _verified(folder: Path, manifest: dict[str, str], ref: str) -> bool:
    try:
        check_files(folder, manifest, ref)
        return True
    except InputError:
        return False


def download_version(version, ref: str, tracking_uri: str, cache: Path) -> Path:
    """The version's files in `cache/<name>/<version>/`, downloaded unless a verified copy
    is there; raises InputError when the downloaded bytes are not the registered ones."""
    import mlflow.artifacts  # deferred: mlflow takes seconds to import

    manifest = manifest_of(version, ref)
    target = cache / version.name / str(version.version)
    if target.is_dir() and _verified(target, manifest, ref):
        return target
    with atomic_dir(target) as tmp:
        got = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=version.source, dst_path=str(tmp / ".download"),
            tracking_uri=tracking_uri))
        for item in got.iterdir():
            shutil.move(str(item), tmp / item.name)
        shutil.rmtree(tmp / ".download", ignore_errors=True)
        check_files(tmp, manifest, ref)
    return target


def resolve(ref: str, choices: tuple[str, ...], tracking_uri: str | None = None,
            cache: Path | None = None) -> RegisteredModel:
    """`ref` (models:/NAME@ALIAS, models:/NAME/VERSION or a run id) -> the registered files."""
    client, uri = _client(ref, tracking_uri)
    version = _by_uri(client, ref) if ref.startswith(MODELS_SCHEME) else \
        _by_run(client, ref, choices)
    model = version.tags.get(MODEL_TAG)
    if model not in choices:
        what = f"the registered {model!r} model" if model else "not an lmpipe model"
        raise InputError(f"{ref}: {version.name} version {version.version} is {what}; this "
                         f"command takes one of {', '.join(choices)}")
    folder = download_version(version, ref, uri, cache or scratch_dir() / "registry")
    tok = folder / TOKENIZER_SUBDIR / TOKENIZER_FILE
    return RegisteredModel(ref, version.name, str(version.version), model, folder,
                           tok if tok.is_file() else None)
