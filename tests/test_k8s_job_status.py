"""Parsing Job and pod objects into JobInfo, on objects shaped as the API returns them (``kubectl get -o
json``): completed, exit code, OOMKilled, DeadlineExceeded, Evicted, ImagePullBackOff, unschedulable, deleted."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import pytest

from ccat_dagster.execution.hpc.base import JobState
from ccat_dagster.execution.hpc.kubernetes.job_status import parse_job_status
from ccat_dagster.opsdb.enums import FailureKind

NAME = "ccat-chai-co43-calibrate-17-0a1b2c3d"
IMAGE = "registry.example.org/ccat/apptainer-runner:1.3"
CREATED = "2026-12-02T18:00:00Z"
NOW = datetime(2026, 12, 2, 18, 30, tzinfo=UTC)
GRACE = 300.0


def job(*conditions: tuple[str, str, str], status: dict | None = None, deleting: bool = False) -> dict:
    obj = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": NAME,
            "namespace": "ccat-workflows",
            "uid": "4f1c7b0e-2a39-4d0e-9c55-0b6f3c1e8a11",
            "resourceVersion": "918273",
            "creationTimestamp": CREATED,
            "labels": {"app.kubernetes.io/managed-by": "ccat-dagster", "data.ccat.uni-koeln.de/job": NAME},
        },
        "spec": {"backoffLimit": 0, "activeDeadlineSeconds": 7080, "completions": 1, "parallelism": 1},
        "status": {"startTime": "2026-12-02T18:00:01Z", **(status or {})},
    }
    if conditions:
        obj["status"]["conditions"] = [
            {
                "type": kind,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastProbeTime": "2026-12-02T18:20:00Z",
                "lastTransitionTime": "2026-12-02T18:20:00Z",
            }
            for kind, reason, message in conditions
        ]
    if deleting:
        obj["metadata"]["deletionTimestamp"] = "2026-12-02T18:25:00Z"
        obj["metadata"]["finalizers"] = ["foregroundDeletion"]
    return obj


def pod(phase: str, state: dict | None = None, *, reason: str | None = None, message: str | None = None) -> dict:
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{NAME}-x7k2q",
            "namespace": "ccat-workflows",
            "creationTimestamp": CREATED,
            "labels": {"batch.kubernetes.io/job-name": NAME, "data.ccat.uni-koeln.de/job": NAME},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": NAME, "controller": True}],
        },
        "spec": {"containers": [{"name": "step", "image": IMAGE}], "restartPolicy": "Never"},
        "status": {
            "phase": phase,
            "qosClass": "Guaranteed",
            "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": CREATED}],
        },
    }
    if state is not None:
        obj["status"]["containerStatuses"] = [
            {
                "name": "step",
                "image": IMAGE,
                "imageID": "",
                "ready": "running" in state,
                "restartCount": 0,
                "started": "running" in state,
                "state": state,
            }
        ]
    if reason:
        obj["status"]["reason"] = reason
        obj["status"]["message"] = message
    return obj


def terminated(exit_code: int, reason: str, *, signal: int | None = None) -> dict:
    value = {
        "exitCode": exit_code,
        "reason": reason,
        "startedAt": "2026-12-02T18:00:05Z",
        "finishedAt": "2026-12-02T18:20:05Z",
        "containerID": "containerd://9f2e",
    }
    if signal is not None:
        value["signal"] = signal
    return {"terminated": value}


def parse(job_obj: dict, pods: list[dict], *, now: datetime = NOW):
    return parse_job_status(job_obj, pods, now=now, image_pull_grace_seconds=GRACE)


BACKOFF = ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")


def test_completed_job_has_exit_code_zero_and_wall_time_from_the_container():
    reading = parse(
        job(
            ("Complete", "CompletionsReached", "Reached expected number of succeeded pods"),
            status={"succeeded": 1, "completionTime": "2026-12-02T18:20:07Z"},
        ),
        [pod("Succeeded", terminated(0, "Completed"))],
    )
    info = reading.info
    assert (info.state, info.exit_code, info.wall_time_seconds) == (JobState.COMPLETED, 0, 1200.0)
    assert info.failure_kind is None and info.peak_memory_gb is None and info.cpu_hours is None
    assert not reading.give_up


def test_non_zero_exit_fails_with_its_exit_code():
    info = parse(job(BACKOFF, status={"failed": 1}), [pod("Failed", terminated(3, "Error"))]).info
    assert (info.state, info.exit_code, info.failure_kind) == (JobState.FAILED, 3, FailureKind.EXIT_CODE)
    assert info.reason == "exit code 3" and info.wall_time_seconds == 1200.0


def test_killed_by_a_signal_is_a_signal_failure():
    info = parse(job(BACKOFF), [pod("Failed", terminated(143, "Error"))]).info
    assert (info.exit_code, info.failure_kind) == (143, FailureKind.SIGNAL)


def test_oomkilled_is_out_of_memory_with_137():
    info = parse(job(BACKOFF, status={"failed": 1}), [pod("Failed", terminated(137, "OOMKilled"))]).info
    assert (info.state, info.exit_code, info.reason) == (JobState.FAILED, 137, "OUT_OF_MEMORY")
    assert info.failure_kind is FailureKind.OOM and info.out_of_memory


def test_deadline_exceeded_is_walltime_and_hides_the_kill_exit_code():
    info = parse(
        job(("Failed", "DeadlineExceeded", "Job was active longer than specified deadline"), status={"failed": 1}),
        [pod("Failed", terminated(137, "Error"))],
    ).info
    assert info.state is JobState.FAILED and info.failure_kind is FailureKind.WALLTIME
    assert info.reason.startswith("TIMEOUT") and "longer than specified deadline" in info.reason
    assert info.exit_code is None  # not 137: that would read as out of memory


def test_deadline_exceeded_after_the_pod_is_gone_uses_the_job_times():
    info = parse(job(("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")), []).info
    assert info.failure_kind is FailureKind.WALLTIME and info.wall_time_seconds == 1199.0


def test_evicted_pod_is_a_node_failure_not_out_of_memory():
    evicted = pod(
        "Failed",
        terminated(137, "ContainerStatusUnknown"),
        reason="Evicted",
        message="The node was low on resource: memory. Threshold quantity: 100Mi, available: 91260Ki.",
    )
    info = parse(job(BACKOFF), [evicted]).info
    assert info.state is JobState.FAILED and info.failure_kind is FailureKind.NODE_FAILURE
    assert info.exit_code is None and "The node was low on resource: memory" in info.reason
    assert not info.out_of_memory


@pytest.mark.parametrize("waiting_reason", ["ErrImagePull", "ImagePullBackOff"])
def test_image_pull_failure_is_pending_within_the_grace_then_fails_naming_the_image(waiting_reason):
    message = f'Back-off pulling image "{IMAGE}": not found'
    pending = pod("Pending", {"waiting": {"reason": waiting_reason, "message": message}})
    early = parse(job(), [pending], now=datetime(2026, 12, 2, 18, 1, tzinfo=UTC))
    assert early.info.state is JobState.PENDING and IMAGE in early.info.reason and not early.give_up
    late = parse(job(), [pending], now=datetime(2026, 12, 2, 18, 0, tzinfo=UTC) + timedelta(seconds=GRACE))
    assert late.info.state is JobState.FAILED and late.give_up
    assert f"image {IMAGE!r} cannot be pulled ({waiting_reason}, for 300 s)" in late.info.reason
    assert "K8S_IMAGE_PULL_CREDENTIALS" in late.info.reason


def test_invalid_image_name_fails_at_once():
    bad = pod("Pending", {"waiting": {"reason": "InvalidImageName", "message": 'couldn\'t parse image "Bad Image"'}})
    reading = parse(job(), [bad], now=datetime(2026, 12, 2, 18, 0, 1, tzinfo=UTC))
    assert reading.info.state is JobState.FAILED and reading.give_up and "InvalidImageName" in reading.info.reason


def test_unschedulable_pod_is_pending_with_the_scheduler_message():
    unschedulable = pod("Pending")
    unschedulable["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        }
    ]
    info = parse(job(), [unschedulable]).info
    assert info.state is JobState.PENDING and info.reason == (
        "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    )


def test_running_and_not_yet_created_pods():
    assert parse(job(status={"active": 1}), [pod("Running", {"running": {"startedAt": CREATED}})]).info.state is (
        JobState.RUNNING
    )
    none_yet = parse(job(), []).info
    assert none_yet.state is JobState.PENDING and none_yet.reason == "no pod yet"


def test_a_pod_that_ended_before_the_job_condition_is_still_running():
    """The Job controller writes Complete / Failed a moment after the pod ends: not terminal yet."""
    info = parse(job(status={"active": 1}), [pod("Failed", terminated(1, "Error"))]).info
    assert info.state is JobState.RUNNING


def test_a_job_being_deleted_is_cancelled():
    info = parse(job(deleting=True, status={"active": 1}), [pod("Running", {"running": {"startedAt": CREATED}})]).info
    assert info.state is JobState.CANCELLED and info.failure_kind is FailureKind.CANCELLED


def test_the_newest_pod_decides():
    old = pod("Failed", terminated(137, "OOMKilled"))
    new = copy.deepcopy(pod("Failed", terminated(3, "Error")))
    new["metadata"]["creationTimestamp"] = "2026-12-02T18:10:00Z"
    assert parse(job(BACKOFF), [new, old]).info.exit_code == 3
