"""Starting and terminating step runs by hand: ``ccat-dagster pipelines run`` and the API's
``POST /pipelines/{id}/trigger``, ``…/runs/{id}/cancel`` and ``…/runs/{id}/retry`` all go through here.

A run started by hand is the run a sensor would request: the implicit asset job with one step selected, one
partition or a contiguous partition range of at most ``MAX_PARTITIONS_PER_RUN`` sub-groups, and the sensor's tags
(``ccat/pipeline``, ``ccat/step``, ``ccat/backend``, ``dagster/priority``) with ``ccat/trigger`` = ``manual`` (CLI)
or ``api``. The runs are built by the sensors' own ``step_run_requests`` and launched through the Dagster
webserver's GraphQL API (``launchRun``), so the instance's run coordinator queues them, the daemon or
webserver launches them, and they show in the UI like any other run. A retry of an attempt is a new run
of its one sub-group. Termination (``terminateRun``) interrupts
the run worker, whose step runner cancels the HPC jobs and marks the attempts CANCELLED.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import dagster as dg
import httpx
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_dagster.assets.factory import partitions_name, step_asset_key
from ccat_dagster.assets.partitions import add_missing_partitions
from ccat_dagster.assets.snapshot import PipelineSnapshot, pipeline_snapshot
from ccat_dagster.errors import CcatError
from ccat_dagster.execution.planning import Planner, Readiness, SubGroupPlan, load_pipeline
from ccat_dagster.execution.triggers import StepRequest
from ccat_dagster.opsdb import models as m
from ccat_dagster.sensors.gaps import step_run_requests
from ccat_dagster.settings import Settings

MANUAL_TRIGGER = "manual"
API_TRIGGER = "api"
PARTITION_TAG = "dagster/partition"
ASSET_JOB = "__ASSET_JOB"


class LaunchError(CcatError, ValueError):
    """A run that cannot be started as asked (unknown step or sub-group, nothing to run, disabled pipeline)."""


class LaunchUnavailable(CcatError):
    """The Dagster webserver did not answer or refused the request."""


# ------------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class StepLaunchPlan:
    """The sub-groups of one step a run started by hand covers, and why the others are left out."""

    pipeline: PipelineSnapshot
    step_name: str
    partitions_name: str
    plans: tuple[SubGroupPlan, ...]
    # readiness → number of sub-groups not run (up_to_date, in_flight, upstream_not_ready, …)
    left_out: dict[str, int] = field(default_factory=dict)

    @property
    def sub_group_keys(self) -> list[str]:
        return [p.sub_group_key for p in self.plans]


def pipeline_step_order(session: Session, pipeline_name: str) -> list[str]:
    """The pipeline's step names in dependency order (upstream first)."""
    from ccat_dagster.execution.triggers import _topological  # the one ordering the triggers use

    return [s.name for s in _topological(load_pipeline(session, pipeline_name).steps)]


def plan_step_launch(
    session: Session, *, pipeline_name: str, step_name: str, sub_group_keys: Sequence[str] = ()
) -> StepLaunchPlan:
    """What a run of ``step_name`` started now would do.

    Without ``sub_group_keys``: the sub-groups with a gap (as ``pipelines gaps`` shows them, cooldowns ignored:
    a person asked). With keys: exactly those, re-run even when up to date; an unknown key, or one whose upstream
    is not ready or that is in flight, is refused (LaunchError naming each key and why).
    """
    pipeline = load_pipeline(session, pipeline_name)
    if not pipeline.enabled:
        raise LaunchError(
            f"pipeline {pipeline_name!r} is disabled, so the code location does not load its steps: "
            f"enable it first (`ccat-dagster pipelines enable {pipeline_name}`)"
        )
    steps = {s.name: s for s in pipeline.steps}
    if step_name not in steps:
        raise LaunchError(f"pipeline {pipeline_name!r} has no step {step_name!r}; its steps: {', '.join(steps)}")
    planner = Planner(session, pipeline, now=m.utcnow())
    left_out: dict[str, int] = {}
    if sub_group_keys:
        keys = list(dict.fromkeys(sub_group_keys))
        plans = planner.plan_keys(step_name, keys, respect_cooldown=False, force=True)
        refused = [p for p in plans if p.readiness is not Readiness.GAP]
        if refused:
            raise LaunchError(
                f"cannot run {len(refused)} sub-group(s) of {pipeline_name}/{step_name}: "
                + "; ".join(
                    f"{p.sub_group_key!r} is {p.readiness.value}" + (f" ({p.detail})" if p.detail else "")
                    for p in refused[:10]
                )
            )
    else:
        plans = planner.plan(step_name, planner.sub_groups(step_name).values(), respect_cooldown=False)
        for plan in plans:
            if plan.readiness is not Readiness.GAP:
                left_out[plan.readiness.value] = left_out.get(plan.readiness.value, 0) + 1
        plans = [p for p in plans if p.readiness is Readiness.GAP]
    step = steps[step_name]
    return StepLaunchPlan(
        pipeline=pipeline_snapshot(pipeline),
        step_name=step_name,
        partitions_name=partitions_name(pipeline.name, tuple(step.group_by or [])),
        plans=tuple(sorted(plans, key=lambda p: p.sub_group_key)),
        left_out=dict(sorted(left_out.items())),
    )


# ------------------------------------------------------------------------------------------------ launching


class RunLauncher(Protocol):
    """Starts, terminates and re-executes Dagster runs (the webserver's GraphQL in production)."""

    def launch(self, *, asset_path: Sequence[str], tags: Mapping[str, str]) -> str: ...

    def terminate(self, run_id: str) -> None: ...


@dataclass(frozen=True)
class LaunchedRun:
    run_id: str
    step_name: str
    sub_group_keys: tuple[str, ...]


def launch_step(
    plan: StepLaunchPlan,
    *,
    instance: dg.DagsterInstance,
    launcher: RunLauncher,
    settings: Settings,
    trigger: str,
) -> list[LaunchedRun]:
    """Launch the runs of ``plan`` (none when it has no sub-groups): add the partitions they need to the
    instance, cut the sub-groups into runs exactly as the sensor does, launch each."""
    if not plan.plans:
        return []
    keys = set(plan.sub_group_keys)
    add_missing_partitions(instance, {plan.partitions_name: keys})
    positions = {key: i for i, key in enumerate(instance.get_dynamic_partitions(plan.partitions_name))}
    requests = step_run_requests(
        plan.pipeline,
        StepRequest(plan.step_name, plan.plans),
        positions=positions,
        settings=settings,
        trigger=trigger,
    )
    ordered = sorted(keys, key=positions.__getitem__)
    launched = []
    for request in requests:
        tags = dict(request.tags)
        if request.partition_key is not None:
            tags[PARTITION_TAG] = request.partition_key
            covered: tuple[str, ...] = (request.partition_key,)
        else:
            start, end = tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"]
            covered = tuple(ordered[ordered.index(start) : ordered.index(end) + 1])
        run_id = launcher.launch(asset_path=step_asset_key(plan.pipeline.name, plan.step_name).path, tags=tags)
        launched.append(LaunchedRun(run_id, plan.step_name, covered))
    return launched


def attempt_counts(session: Session, *, pipeline_name: str, dagster_run_ids: Sequence[str]) -> dict[str, int]:
    """status → number of attempts of these Dagster runs (the progress ``pipelines run`` prints)."""
    E = m.ExecutedReductionStep
    rows = session.execute(
        select(E.status, func.count()).where(E.dagster_run_id.in_(list(dagster_run_ids))).group_by(E.status)
    ).all()
    return {status.value: count for status, count in sorted(rows, key=lambda r: r[0].value)}


def wait_for_runs(
    instance: dg.DagsterInstance,
    run_ids: Sequence[str],
    *,
    progress: Callable[[dict[str, str]], None],
    poll_seconds: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, str]:
    """Wait until every run has finished; ``progress`` hears run id → Dagster status whenever one changes.
    Returns the final statuses (SUCCESS, FAILURE, CANCELED)."""
    last: dict[str, str] = {}
    while True:
        current = {}
        for run_id in run_ids:
            run = instance.get_run_by_id(run_id)
            current[run_id] = run.status.value if run is not None else "NOT_FOUND"
        if current != last:
            progress(current)
            last = current
        if all(status in ("SUCCESS", "FAILURE", "CANCELED", "NOT_FOUND") for status in current.values()):
            return current
        sleep(poll_seconds)


# ------------------------------------------------------------------------------------------------ GraphQL

_ASSET_REPOSITORY = """
query CcatAssetRepository($assetKey: AssetKeyInput!) {
  assetNodeOrError(assetKey: $assetKey) {
    __typename
    ... on AssetNode { repository { name location { name } } }
    ... on Error { message }
  }
}
"""

_LAUNCH_RUN = """
mutation CcatLaunchRun($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on Error { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""

_TERMINATE_RUN = """
mutation CcatTerminateRun($runId: String!) {
  terminateRun(runId: $runId) {
    __typename
    ... on TerminateRunSuccess { run { runId } }
    ... on Error { message }
  }
}
"""


class GraphQLRunLauncher:
    """``RunLauncher`` over the Dagster webserver's GraphQL endpoint (``<url>/graphql``), Dagster's public API
    for launching and terminating runs from outside the instance's processes."""

    def __init__(self, url: str, *, timeout_seconds: float = 30.0, transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/") + "/graphql"
        self.timeout_seconds = timeout_seconds
        self.transport = transport

    def _call(self, query: str, variables: dict[str, Any], field_name: str) -> dict[str, Any]:
        try:
            with httpx.Client(timeout=self.timeout_seconds, transport=self.transport) as client:
                response = client.post(self.url, json={"query": query, "variables": variables})
        except httpx.HTTPError as error:
            raise LaunchUnavailable(
                f"the Dagster webserver at {self.url} did not answer ({type(error).__name__}): start it, or set "
                "CCAT_WORKFLOW_MANAGER_DAGSTER_WEBSERVER_URL"
            ) from None
        if response.status_code != 200:
            raise LaunchUnavailable(f"the Dagster webserver at {self.url} answered HTTP {response.status_code}")
        document = response.json()
        if document.get("errors"):
            raise LaunchUnavailable(f"Dagster GraphQL refused the request: {document['errors'][0].get('message')}")
        return document["data"][field_name]

    @staticmethod
    def _run_id(result: dict[str, Any], what: str) -> str:
        if result.get("__typename") == "LaunchRunSuccess":
            return str(result["run"]["runId"])
        message = (
            result.get("message") or "; ".join(e["message"] for e in result.get("errors", [])) or "no reason given"
        )
        raise LaunchError(f"Dagster did not {what} ({result.get('__typename')}): {message}")

    def launch(self, *, asset_path: Sequence[str], tags: Mapping[str, str]) -> str:
        node = self._call(_ASSET_REPOSITORY, {"assetKey": {"path": list(asset_path)}}, "assetNodeOrError")
        if node.get("__typename") != "AssetNode":
            raise LaunchError(
                f"the code location has no asset {'/'.join(asset_path)} ({node.get('message', 'not found')}): "
                "reload the code location after `pipelines apply`"
            )
        selector = {
            "repositoryLocationName": node["repository"]["location"]["name"],
            "repositoryName": node["repository"]["name"],
            "pipelineName": ASSET_JOB,
            "assetSelection": [{"path": list(asset_path)}],
        }
        params = {
            "selector": selector,
            "mode": "default",
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
        }
        return self._run_id(self._call(_LAUNCH_RUN, {"executionParams": params}, "launchRun"), "launch the run")

    def terminate(self, run_id: str) -> None:
        result = self._call(_TERMINATE_RUN, {"runId": run_id}, "terminateRun")
        if result.get("__typename") != "TerminateRunSuccess":
            raise LaunchError(
                f"Dagster did not terminate run {run_id}: {result.get('message', result.get('__typename'))}"
            )
