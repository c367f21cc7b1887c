"""Scheduled retraining: re-check the source, repro, evaluate, promote, push, commit.

1. `download` is forced (`pipeline.recheck_source`): it fetches the source again and verifies
   its pinned checksum. Unchanged bytes give the same outs, and DVC then skips every
   downstream stage by md5; a changed source re-runs the chain from `tokenizer` on.
2. Every stage in dvc.yaml (so `evaluate` too, when it exists) under one MLflow parent run.
3. Promotion (`pipeline.promote`): the Transformer, SFT and LoRA models (LoRA: its merged
   weights, with the adapter) are registered as MLflow model versions, and the alias
   `champion` moves to a version only when its test bits per byte beat the champion's
   (lmpipe/tracking/registry.py); otherwise the version is tagged `promotion=kept` with the
   reason. Each of the three gets a decision in the report, `skipped` with its reason when
   there is no model or no score; a registry error fails this step and moves nothing.
4. `dvc push` when a DVC remote is configured (`pipeline.push`, pipeline/remote.py).
5. dvc.lock (and the uncached outs DVC leaves to git: metrics) committed to
   `pipeline.commit_branch` when set.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from lmpipe.core.git import git_state
from lmpipe.core.paths import project_root
from lmpipe.tracking.registry import promote_models
from pipeline.flow import (
    load_flow_params,
    pipeline_body,
    publish_markdown,
    root_env,
    run_logger,
)
from pipeline.graph import read_stage_graph
from pipeline.lock import RunLock
from pipeline.remote import commit_to_branch, dvc_push, git_tracked_outs


@task(name="promote-models", cache_policy=NO_CACHE)
def promote_task(root: str, run_id: str, prefix: str, alias: str, min_improvement: float,
                 extra_tags: dict[str, str]) -> list[dict]:
    decisions = promote_models(Path(root), run_id, prefix=prefix, alias=alias,
                               min_improvement=min_improvement, extra_tags=extra_tags)
    for d in decisions:
        run_logger().info("%s: %s (%s)", d.registered_model, d.action, d.reason)
    return [d.as_dict() for d in decisions]


@task(name="dvc-push", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[10, 60])
def push_task(root: str, params_remote: str | None) -> str:
    return dvc_push(Path(root), params_remote)


@task(name="commit-dvc-lock", cache_policy=NO_CACHE)
def commit_task(root: str, branch: str, message: str) -> str:
    return commit_to_branch(Path(root), branch, git_tracked_outs(Path(root)), message)


def promotion_markdown(decisions: list[dict]) -> str:
    lines = ["## lmpipe promotion", "", "| model | version | bpb | action | reason |",
             "|---|---|---|---|---|"]
    for d in decisions:
        bpb = f"{d['bpb']:.4f}" if d.get("bpb") is not None else ""
        lines.append(f"| {d['registered_model']} | {d.get('version') or ''} | {bpb} | "
                     f"{d['action']} | {d['reason']} |")
    if not decisions:
        lines.append("| - | | | skipped | no model folder under data/models/ |")
    return "\n".join(lines) + "\n"


def retrain_body(stages=None, root=None, task_runner=None, lock_wait_s=None) -> dict:
    root_path = Path(root).resolve() if root else project_root()
    with root_env(root_path):
        params = load_flow_params(root_path)
        pp = params.pipeline
        wait = pp.lock_wait_s if lock_wait_s is None else lock_wait_s
        with RunLock(root_path, wait_s=wait, stages=stages):
            graph = read_stage_graph(root_path)
            force = ["download"] if pp.recheck_source and "download" in graph.upstream else None
            pipe = pipeline_body(stages=stages, force=force, root=str(root_path),
                                 task_runner=task_runner)
            report: dict = {"pipeline": pipe, "promotion": [], "push": None, "commit": None}
            summary = []
            run_id = pipe.get("parent_run_id")
            if pp.promote and run_id:
                extra = {"dvc_lock_md5": pipe.get("dvc_lock_md5", ""),
                         "git_commit": git_state(root_path)["git_commit"]}
                report["promotion"] = promote_task(str(root_path), run_id, pp.registry_prefix,
                                                   pp.champion_alias, pp.min_improvement_bpb,
                                                   extra)
                publish_markdown(promotion_markdown(report["promotion"]), "lmpipe-promotion")
                summary += [f"{d['registered_model']}: {d['action']} ({d['reason']})"
                            for d in report["promotion"]]
            elif pp.promote:
                summary.append("promotion skipped: MLflow unavailable (no parent run)")
            if pp.push:
                report["push"] = push_task(str(root_path), pp.dvc_remote)
                summary.append(report["push"])
            if pp.commit_branch:
                msg = (f"lmpipe retrain: dvc.lock {pipe.get('dvc_lock_md5', '')[:12]}\n\n"
                       f"MLflow parent run {run_id}")
                report["commit"] = commit_task(str(root_path), pp.commit_branch, msg)
                summary.append(report["commit"])
            report["summary"] = summary
            return report


@flow(name="lmpipe-retrain", log_prints=True)
def lmpipe_retrain(
    stages: list[str] | None = None,
    root: str | None = None,
    task_runner: str | None = None,
    lock_wait_s: float | None = None,
) -> dict:
    """Nightly retraining: the pipeline with the source re-checked, then promote/push/commit."""
    return retrain_body(stages, root, task_runner, lock_wait_s)
