"""How a sweep uses Prefect: its deployment, the zombie automation, one flow run per point,
watched until every point has ended, each crash or failure retried (pipeline/sweep.py).

- One deployment per sweep (`lmpipe-sweep-point/NAME`) of the point flow
  (pipeline/sweep_point.py) on the work pool; its `git_clone` pull step checks out the
  sweep's commit in a fresh folder of whichever worker takes a run. One flow run per point
  (`run_deployment`, named after the point). The base (the shared stages) runs first; the
  points after it, all at once, as many at a time as workers take them.
- A worker that dies takes its flow run's heartbeats with it. An automation owned by the
  deployment (Prefect's zombie-flow recipe: a heartbeat, or a Pending state, not followed by
  another heartbeat or a final state within `crash_after` seconds) marks that run Crashed.
  The sweep then reschedules it (the same flow run, a new attempt, any worker), as it does
  a run that failed for any reason but bad input, up to `retries` times.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from datetime import timedelta
from uuid import UUID

from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelling, Scheduled

from lmpipe.core.console import note
from lmpipe.core.errors import InputError
from lmpipe.tracking import sweep as tracking
from pipeline.sweep_plan import SweepPlan
from pipeline.sweep_point import ENTRYPOINT, POINT_FLOW, lmpipe_sweep_point

SWEEP_TAG = "lmpipe-sweep"
# Added to the environment the worker gives each flow run.
JOB_ENV = {"DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


# ----------------------------------------------------------------------------- Prefect
def check_pool(client, pool: str) -> None:
    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        raise InputError(f"--pool: no work pool {pool!r} on the Prefect API; create it with "
                         f"`prefect work-pool create {pool} --type process` and start workers "
                         f"(`prefect worker start --pool {pool}`), or use --local N") from None


def deploy(client, plan: SweepPlan, pool: str, url: str) -> UUID:
    """The sweep's deployment: the point flow at the sweep's commit, on `pool`."""
    check_pool(client, pool)
    flow_id = client.create_flow_from_name(POINT_FLOW)
    return client.create_deployment(
        flow_id, plan.name, entrypoint=ENTRYPOINT, work_pool_name=pool,
        pull_steps=[{"prefect.deployments.steps.git_clone": {
            "repository": url, "commit_sha": plan.commit}}],
        parameter_openapi_schema=lmpipe_sweep_point.parameters.model_dump_for_openapi(),
        enforce_parameter_schema=True, tags=["lmpipe", SWEEP_TAG],
        description=f"lmpipe sweep {plan.name}: one DVC experiment per point, at commit "
                    f"{plan.commit[:12]} of {url}",
        job_variables={"env": JOB_ENV})


def crash_automation(client, deployment_id: UUID, name: str, within_s: float) -> UUID:
    """Mark a flow run of the deployment Crashed when its heartbeats stop (Prefect's
    zombie-flow recipe); a pending run must start running within the same time."""
    done = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    return client.create_automation(AutomationCore(
        name=f"lmpipe sweep {name}: crash points without heartbeats",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat", "prefect.flow-run.Pending"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Running"} | done,
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "deployment",
                           "prefect.resource.id": f"prefect.deployment.{deployment_id}"},
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=within_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=(
            f"no heartbeat for {within_s:.0f} s: the worker or its machine is gone"))],
        owner_resource=f"prefect.deployment.{deployment_id}"))


# ----------------------------------------------------------------------------- watching
@dataclass
class Tracked:
    point: str
    flow_run_id: UUID
    attempts: int = 1
    state: str = "SCHEDULED"
    outcome: str | None = None   # done | failed | bad-input
    message: str = ""
    started: float | None = None
    seconds: float | None = None


def decide(state: str, message: str, attempts: int, retries: int) -> str:
    """What the sweep does about a flow run in `state`: wait, done, retry, failed, bad-input.

    Bad input (a stage exited 2) is final; a crash or any other failure is retried while
    attempts remain (`retries` beyond the first)."""
    if state == "COMPLETED":
        return "done"
    if state == "CANCELLED":
        return "failed"
    if state not in ("FAILED", "CRASHED"):
        return "wait"
    if "PointInputError" in (message or ""):
        return "bad-input"
    return "retry" if attempts <= retries else "failed"


@dataclass
class Watch:
    client: object
    retries: int
    poll_s: float = 3.0
    tracked: list[Tracked] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def _progress(self) -> None:
        done = [t for t in self.tracked if t.outcome]
        running = sum(1 for t in self.tracked if not t.outcome and t.state == "RUNNING")
        elapsed = time.monotonic() - self.started
        line = (f"sweep: {len(done)}/{len(self.tracked)} finished, {running} running, "
                f"{len(self.tracked) - len(done) - running} waiting for a worker; "
                f"{elapsed / 60:.1f} min")
        if done and len(done) < len(self.tracked):
            rate = len(done) / elapsed
            line += f", ETA {(len(self.tracked) - len(done)) / rate / 60:.1f} min"
        note(line)

    def _update(self, t: Tracked, run) -> None:
        state, message = run.state.type.value, run.state.message or ""
        if state != t.state:
            note(f"  {t.point}: {state.lower()}" + (f" (attempt {t.attempts})" if
                                                   t.attempts > 1 else ""))
            t.state = state
        if state == "RUNNING" and t.started is None:
            t.started = time.monotonic()
        action = decide(state, message, t.attempts, self.retries)
        if action == "retry":
            t.attempts += 1
            why = message.partition("\n")[0][:200]
            note(f"  {t.point}: {state.lower()} ({why}); "
                 f"rescheduled, attempt {t.attempts} of {self.retries + 1}")
            self.client.set_flow_run_state(run.id, Scheduled(
                message=f"lmpipe sweep: attempt {t.attempts} after {state.lower()}"), force=True)
            t.state, t.started = "SCHEDULED", None
        elif action != "wait":
            t.outcome, t.message = action, message
            if t.started is not None:
                t.seconds = round(time.monotonic() - t.started, 1)

    def until_done(self) -> None:
        last = 0.0
        while any(t.outcome is None for t in self.tracked):
            ids = [t.flow_run_id for t in self.tracked if t.outcome is None]
            runs = self.client.read_flow_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=ids)))
            by_id = {t.flow_run_id: t for t in self.tracked}
            for run in runs:
                self._update(by_id[run.id], run)
            if time.monotonic() - last >= 30:
                self._progress()
                last = time.monotonic()
            if any(t.outcome is None for t in self.tracked):
                time.sleep(self.poll_s)

    def cancel(self) -> None:
        for t in self.tracked:
            if t.outcome is None:
                with contextlib.suppress(Exception):
                    self.client.set_flow_run_state(t.flow_run_id, Cancelling(), force=True)
                t.outcome, t.message = "failed", "cancelled (lmpipe sweep interrupted)"


def submit(deployment: str, plan: SweepPlan, point: str, overrides: list[str],
           targets: list[str] | None, base: str | None, run_id: str | None,
           git_remote: str = "origin") -> UUID:
    flow_run = run_deployment(
        deployment, timeout=0, flow_run_name=point, tags=[SWEEP_TAG, plan.name],
        parameters={"sweep": plan.name, "point": point, "commit": plan.commit,
                    "overrides": overrides, "targets": targets, "base": base,
                    "mlflow_run_id": run_id, "git_remote": git_remote})
    return flow_run.id


def run_points(client, plan: SweepPlan, runs: tracking.SweepRuns, deployment: str,
               retries: int, ended: list[Tracked]) -> None:
    """The base, then every good point; `ended` gets how each one ended (also when the
    sweep is interrupted: what had not ended is cancelled)."""
    watch = Watch(client, retries)
    try:
        if plan.base:
            note(f"sweep {plan.name}: base {plan.base} runs the shared stages "
                 f"({', '.join(plan.shared)}) once")
            watch.tracked = [Tracked(plan.base, submit(
                deployment, plan, plan.base, [], plan.shared, None,
                runs.children.get(plan.base)))]
            watch.until_done()
            ended += watch.tracked
            if watch.tracked[0].outcome != "done":
                return
        note(f"sweep {plan.name}: {len(plan.good)} point(s) submitted; they run "
             f"{', '.join(plan.affected)}")
        watch.tracked = [
            Tracked(p.name, submit(deployment, plan, p.name, list(p.overrides), plan.targets,
                                   plan.base, runs.children.get(p.name)))
            for p in plan.good]
        watch.started = time.monotonic()
        watch.until_done()
        ended += watch.tracked
    except KeyboardInterrupt:
        watch.cancel()
        ended += [t for t in watch.tracked if t not in ended]
        raise
