"""A Job and its pods (the API's JSON, as listed) → JobInfo. Pure: tested on recorded objects.

Kubernetes says why a pod ended in several places; the mapping, in order of precedence:

* Job condition ``Failed`` / reason ``DeadlineExceeded``: the time limit → FAILED, ``TIMEOUT``, walltime.
* pod ``status.reason: Evicted`` (the kubelet reclaimed the node's memory or disk): FAILED, node_failure.
* container ``terminated.reason: OOMKilled``: FAILED, exit code 137, ``OUT_OF_MEMORY``, oom.
* container terminated with a non-zero exit code: FAILED, exit_code (or signal for 128 + N).
* Job condition ``Complete``: COMPLETED with the container's exit code (0).
* pod waiting with ``ErrImagePull`` / ``ImagePullBackOff`` longer than the grace period, or with
  ``InvalidImageName`` / ``ErrImageNeverPull`` at once: FAILED naming the image (the Job would wait forever).
* a Job that is being deleted (``metadata.deletionTimestamp``) and has not finished: CANCELLED.

Wall time is the container's ``startedAt`` → ``finishedAt`` (else the Job's ``startTime`` →
``completionTime``). CPU hours are the *reserved* CPU time: the container's CPU request × its ``startedAt`` →
``finishedAt`` (Kubernetes records no used CPU time in these objects); absent (None, not zero) when the pod or
either timestamp is missing, e.g. a pod deleted at its deadline. Peak memory is not in these objects (see
``metrics``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from ccat_dagster.execution.hpc.base import JobInfo, JobState, describe_exit_code
from ccat_dagster.execution.hpc.kubernetes.manifest import CONTAINER_NAME
from ccat_dagster.opsdb.enums import FailureKind

__all__ = ["IMAGE_PULL_WAITING_REASONS", "JobReading", "parse_job_status", "parse_timestamp"]

IMAGE_PULL_WAITING_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff"})
# Waiting reasons Kubernetes never recovers from by itself.
HOPELESS_WAITING_REASONS = frozenset({"InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError"})

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class JobReading:
    """The JobInfo, and whether the backend should delete the Job (it can never start: its image)."""

    info: JobInfo
    give_up: bool = False


def parse_timestamp(value: str | None) -> datetime | None:
    """An RFC 3339 timestamp as the API writes it (``2026-12-02T18:30:00Z``)."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _seconds_between(start: str | None, end: str | None) -> float | None:
    begin, finish = parse_timestamp(start), parse_timestamp(end)
    if begin is None or finish is None:
        return None
    return max(0.0, (finish - begin).total_seconds())


def _condition(job: Obj, kind: str) -> Obj | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def _container_status(pod: Obj) -> Obj:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == CONTAINER_NAME:
            return status
    return statuses[0] if statuses else {}


def _newest(pods: Sequence[Obj]) -> Obj | None:
    """The Job's latest pod (backoffLimit 0 makes one, but a replacement after an eviction is possible)."""
    return max(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "", default=None)


def _wall_time(job: Obj, terminated: Obj) -> float | None:
    seconds = _seconds_between(terminated.get("startedAt"), terminated.get("finishedAt"))
    if seconds is None:
        status = job.get("status") or {}
        end = status.get("completionTime") or (_condition(job, "Failed") or {}).get("lastTransitionTime")
        seconds = _seconds_between(status.get("startTime"), end)
    return seconds


def _cpu_hours(pod: Obj | None, terminated: Obj) -> float | None:
    """The container's CPU request (else limit) × its run time, in hours; None when either is unknown."""
    seconds = _seconds_between(terminated.get("startedAt"), terminated.get("finishedAt"))
    if pod is None or seconds is None:
        return None
    containers = (pod.get("spec") or {}).get("containers") or []
    container = next((c for c in containers if c.get("name") == CONTAINER_NAME), containers[0] if containers else {})
    resources = container.get("resources") or {}
    cpu = (resources.get("requests") or {}).get("cpu") or (resources.get("limits") or {}).get("cpu")
    if cpu is None:
        return None
    try:
        cores = float(parse_quantity(cpu))
    except ValueError:
        return None
    return cores * seconds / 3600


def _image_of(pod: Obj) -> str:
    containers = (pod.get("spec") or {}).get("containers") or []
    for container in containers:
        if container.get("name") == CONTAINER_NAME:
            return str(container.get("image", "?"))
    return str(containers[0].get("image", "?")) if containers else "?"


def _pending(job_id: str, pod: Obj | None, *, now: datetime, image_pull_grace_seconds: float) -> JobReading:
    if pod is None:
        return JobReading(JobInfo(job_id=job_id, state=JobState.PENDING, reason="no pod yet"))
    waiting = (_container_status(pod).get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason")
    if reason in IMAGE_PULL_WAITING_REASONS | HOPELESS_WAITING_REASONS:
        created = parse_timestamp((pod.get("metadata") or {}).get("creationTimestamp"))
        waited = (now - created).total_seconds() if created is not None else float("inf")
        if reason in HOPELESS_WAITING_REASONS or waited >= image_pull_grace_seconds:
            image = _image_of(pod)
            what = (
                f"the container cannot be created ({reason})"
                if reason == "CreateContainerConfigError"
                else f"image {image!r} cannot be pulled ({reason}, for {waited:.0f} s)"
            )
            message = (waiting.get("message") or "").strip()
            return JobReading(
                JobInfo(
                    job_id=job_id,
                    state=JobState.FAILED,
                    reason=(f"{what}: {message}" if message else what)
                    + "; check the image name, the registry and CCAT_WORKFLOW_MANAGER_K8S_IMAGE_PULL_CREDENTIALS",
                ),
                give_up=True,
            )
        return JobReading(JobInfo(job_id=job_id, state=JobState.PENDING, reason=f"{reason}: {_image_of(pod)}"))
    if reason:
        return JobReading(JobInfo(job_id=job_id, state=JobState.PENDING, reason=reason))
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            detail = condition.get("reason") or "not scheduled"
            message = (condition.get("message") or "").strip()
            return JobReading(
                JobInfo(job_id=job_id, state=JobState.PENDING, reason=f"{detail}: {message}" if message else detail)
            )
    return JobReading(JobInfo(job_id=job_id, state=JobState.PENDING))


def _failed(job_id: str, job: Obj, pod: Obj | None, failed: Obj) -> JobInfo:
    container = _container_status(pod) if pod is not None else {}
    terminated = (container.get("state") or {}).get("terminated") or {}
    wall = _wall_time(job, terminated)
    cpu_hours = _cpu_hours(pod, terminated)
    exit_code = terminated.get("exitCode")
    if failed.get("reason") == "DeadlineExceeded":
        # The exit code of a pod stopped at its deadline (143, or 137 after the grace period) says only that;
        # left out so it is not read as an out-of-memory kill.
        return JobInfo(
            job_id=job_id,
            state=JobState.FAILED,
            wall_time_seconds=wall,
            cpu_hours=cpu_hours,
            reason=f"TIMEOUT (DeadlineExceeded: {failed.get('message', 'active longer than its deadline')})",
            failure_kind=FailureKind.WALLTIME,
        )
    pod_status = (pod or {}).get("status") or {}
    if pod_status.get("reason") == "Evicted":
        return JobInfo(
            job_id=job_id,
            state=JobState.FAILED,
            wall_time_seconds=wall,
            cpu_hours=cpu_hours,
            reason=f"pod evicted from its node: {pod_status.get('message', '').strip() or 'no message'}",
            failure_kind=FailureKind.NODE_FAILURE,
        )
    if terminated.get("reason") == "OOMKilled":
        return JobInfo(
            job_id=job_id,
            state=JobState.FAILED,
            exit_code=137 if exit_code is None else exit_code,
            wall_time_seconds=wall,
            cpu_hours=cpu_hours,
            reason="OUT_OF_MEMORY",
            failure_kind=FailureKind.OOM,
        )
    if exit_code is not None and exit_code != 0:
        signal_number = terminated.get("signal") or (exit_code - 128 if exit_code > 128 else None)
        return JobInfo(
            job_id=job_id,
            state=JobState.FAILED,
            exit_code=exit_code,
            wall_time_seconds=wall,
            cpu_hours=cpu_hours,
            reason=describe_exit_code(exit_code),
            failure_kind=FailureKind.SIGNAL if signal_number else FailureKind.EXIT_CODE,
        )
    # Failed without a container verdict: the pod vanished (node lost) or was never admitted.
    detail = failed.get("message") or failed.get("reason") or "the Job failed"
    if pod is None:
        detail += " (its pod is gone: deleted, or its node was lost)"
    return JobInfo(
        job_id=job_id,
        state=JobState.FAILED,
        exit_code=exit_code,
        wall_time_seconds=wall,
        cpu_hours=cpu_hours,
        reason=f"{failed.get('reason', 'Failed')}: {detail}",
        failure_kind=FailureKind.NODE_FAILURE,
    )


def parse_job_status(job: Obj, pods: Sequence[Obj], *, now: datetime, image_pull_grace_seconds: float) -> JobReading:
    """What ``job`` (with its ``pods``) says, as of ``now`` (an aware datetime)."""
    job_id = str(job["metadata"]["name"])
    pod = _newest(pods)
    complete = _condition(job, "Complete")
    failed = _condition(job, "Failed")
    if complete is not None:
        terminated = ((_container_status(pod) if pod else {}).get("state") or {}).get("terminated") or {}
        return JobReading(
            JobInfo(
                job_id=job_id,
                state=JobState.COMPLETED,
                exit_code=terminated.get("exitCode", 0),
                wall_time_seconds=_wall_time(job, terminated),
                cpu_hours=_cpu_hours(pod, terminated),
            )
        )
    if failed is not None:
        return JobReading(_failed(job_id, job, pod, failed))
    if (job.get("metadata") or {}).get("deletionTimestamp"):
        return JobReading(
            JobInfo(
                job_id=job_id,
                state=JobState.CANCELLED,
                reason="the Job is being deleted",
                failure_kind=FailureKind.CANCELLED,
            )
        )
    phase = ((pod or {}).get("status") or {}).get("phase")
    if phase in ("Running", "Succeeded", "Failed"):
        # Succeeded/Failed before the Job controller wrote its condition: finishing, reported next poll.
        return JobReading(JobInfo(job_id=job_id, state=JobState.RUNNING, reason=None if phase == "Running" else phase))
    return _pending(job_id, pod, now=now, image_pull_grace_seconds=image_pull_grace_seconds)
