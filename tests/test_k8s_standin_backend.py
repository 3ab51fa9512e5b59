"""KubernetesBackend through the official client against the local HTTP stand-in of the API (tests/k8s_standin.py).

The stand-in is not a cluster: it keeps Jobs and pods in memory and either runs a pod's command as a local
process or lets the test drive the pod. What this proves: the calls the backend makes, their paths, bodies and
label selectors, and what the backend makes of the answers (submit, one list per poll, cancel, logs, reattach,
retries over HTTP, Jobs deleted from outside).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ccat_dagster.execution.hpc.base import JobResources, JobSpec, JobState, JobSubmissionError, UnknownJobError
from ccat_dagster.execution.hpc.kubernetes.backend import KubernetesBackend
from ccat_dagster.execution.hpc.kubernetes.config import KubernetesConfig, parse_volume_specs
from ccat_dagster.execution.hpc.kubernetes.connect import api_client, kubernetes_client
from ccat_dagster.opsdb.enums import FailureKind

from .k8s_standin import KubernetesStandIn

JOBS, PODS = "/apis/batch/v1/namespaces/ccat/jobs", "/api/v1/namespaces/ccat/pods"
METRICS = "/apis/metrics.k8s.io/v1beta1/namespaces/ccat/pods"


def selector(job_ids) -> str:
    return f"app.kubernetes.io/managed-by=ccat-dagster,data.ccat.uni-koeln.de/job in ({','.join(job_ids)})"


@pytest.fixture
def standin() -> Iterator[KubernetesStandIn]:
    with KubernetesStandIn(execute=False) as server:
        yield server


def make_backend(standin: KubernetesStandIn, tmp_path: Path, *, clock=None, **client_options) -> KubernetesBackend:
    api = api_client(auth="kubeconfig", kubeconfig=str(standin.kubeconfig(tmp_path / "kubeconfig")))
    config = KubernetesConfig(
        namespace="ccat",
        job_image="registry.example.org/ccat/runner:1",
        volumes=parse_volume_specs(f"host:{tmp_path}:{tmp_path}"),
    )
    options = {"initial_backoff_seconds": 0.01, **client_options}
    return KubernetesBackend(
        config=config, client=kubernetes_client(api, **options), **({"clock": clock} if clock else {})
    )


def spec(tmp_path: Path, attempt: int, command: list[str] | None = None, **resources) -> JobSpec:
    return JobSpec(
        command=command or ["/bin/sh", "-c", "echo hello"],
        resources=JobResources(**resources),
        env={"GREETING": "hi"},
        job_name=f"ccat-t-reduce-{attempt}-0a1b2c3d",
        log_dir=tmp_path / "t" / "executed_obs_unit=7" / "attempts" / "reduce" / str(attempt) / "logs",
    )


def test_standin_submit_creates_the_manifest_job_and_polls_with_one_list_each(standin, tmp_path):
    backend = make_backend(standin, tmp_path)
    ids = backend.submit_many([spec(tmp_path, n) for n in (1, 2, 3)])
    assert ids == [f"ccat-t-reduce-{n}-0a1b2c3d" for n in (1, 2, 3)]
    created = standin.job(ids[0])
    assert created["metadata"]["labels"]["data.ccat.uni-koeln.de/attempt"] == "1"
    assert created["spec"]["template"]["spec"]["containers"][0]["env"] == [{"name": "GREETING", "value": "hi"}]
    standin.requests.clear()
    standin.run_pod(ids[0])
    standin.finish_pod(ids[1], 0)
    infos = backend.status_many(ids)
    assert [infos[i].state for i in ids] == [JobState.RUNNING, JobState.COMPLETED, JobState.PENDING]
    # One list of Jobs and one of pods for all three; the pod metrics, asked once, are absent here (404).
    lists = [("GET", f"{path}?{selector(ids)}") for path in (JOBS, PODS, METRICS)]
    assert standin.requests == lists
    assert all(info.peak_memory_gb is None for info in infos.values())
    standin.requests.clear()
    backend.status_many(ids)
    # Only the unfinished Jobs are asked about again, and no metrics-server: not asked again.
    assert standin.requests == [("GET", f"{path}?{selector([ids[0], ids[2]])}") for path in (JOBS, PODS)]


def test_standin_a_poll_of_many_jobs_lists_them_a_hundred_at_a_time(standin, tmp_path):
    backend = make_backend(standin, tmp_path)
    ids = backend.submit_many([spec(tmp_path, n) for n in range(250)])
    standin.requests.clear()
    assert len(backend.status_many(ids)) == 250
    job_lists = [path for method, path in standin.requests if path.startswith(JOBS + "?")]
    assert job_lists == [f"{JOBS}?{selector(ids[i : i + 100])}" for i in (0, 100, 200)]


def test_standin_peak_memory_is_the_largest_metrics_sample(standin, tmp_path):
    standin.memory_usage = {}
    backend = make_backend(standin, tmp_path)
    job_id = backend.submit(spec(tmp_path, 1))
    standin.run_pod(job_id)
    assert backend.status(job_id).peak_memory_gb is None  # no sample yet: absent, not zero
    for used in ("512Mi", "3Gi", "1Gi"):
        standin.memory_usage[job_id] = used
        backend.status(job_id)
    standin.finish_pod(job_id, 0)
    info = backend.status(job_id)
    assert info.state is JobState.COMPLETED and info.peak_memory_gb == 3.0


def test_standin_failure_kinds_from_pod_evidence(standin, tmp_path):
    later = datetime.now(UTC) + timedelta(hours=1)  # past the image-pull grace
    backend = make_backend(standin, tmp_path, clock=lambda: later)
    oom, evicted, image, ok = backend.submit_many([spec(tmp_path, n) for n in (1, 2, 3, 4)])
    standin.run_pod(oom)
    standin.finish_pod(oom, 137, reason="OOMKilled")
    standin.evict(evicted, "The node was low on resource: memory.")
    standin.image_pull_failure(image, "ImagePullBackOff", 'Back-off pulling image "registry.example.org/ccat/runner:1"')
    infos = backend.status_many([oom, evicted, image, ok])
    assert (infos[oom].failure_kind, infos[oom].exit_code) == (FailureKind.OOM, 137)
    assert infos[evicted].failure_kind is FailureKind.NODE_FAILURE
    assert infos[image].state is JobState.FAILED and "registry.example.org/ccat/runner:1" in infos[image].reason
    assert standin.job(image) is None  # given up: deleted, so it does not wait forever
    assert backend.status(image).state is JobState.FAILED  # remembered after the Job is gone
    assert infos[ok].state is JobState.PENDING


def test_standin_cancel_deletes_with_foreground_propagation_and_ends_cancelled(standin, tmp_path):
    backend = make_backend(standin, tmp_path)
    job_id = backend.submit(spec(tmp_path, 1))
    standin.run_pod(job_id)
    backend.cancel(job_id)
    assert standin.delete_bodies == [{"name": job_id, "propagationPolicy": "Foreground"}]
    assert backend.status(job_id).state is JobState.CANCELLED
    deadline = time.monotonic() + 10
    while standin.job(job_id) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert standin.job(job_id) is None
    assert backend.status(job_id).state is JobState.CANCELLED


def test_standin_cancelling_a_finished_job_leaves_it(standin, tmp_path):
    backend = make_backend(standin, tmp_path)
    job_id = backend.submit(spec(tmp_path, 1))
    standin.finish_pod(job_id, 0)
    backend.cancel(job_id)
    assert standin.delete_bodies == [] and backend.status(job_id).state is JobState.COMPLETED
    backend.cancel("ccat-never-submitted")  # 404: nothing to do


def test_standin_job_deleted_outside_is_cancelled_if_watched_else_unknown(standin, tmp_path):
    backend = make_backend(standin, tmp_path)
    watched, unwatched = backend.submit_many([spec(tmp_path, 1), spec(tmp_path, 2)])
    assert backend.status(watched).state is JobState.PENDING
    standin.delete_outside(watched)
    info = backend.status(watched)
    assert info.state is JobState.CANCELLED and info.failure_kind is FailureKind.CANCELLED
    assert "deleted outside ccat-dagster" in info.reason
    restarted = make_backend(standin, tmp_path)  # another process: it never saw either Job
    standin.delete_outside(unwatched)
    with pytest.raises(UnknownJobError) as raised:
        restarted.status_many([unwatched])
    assert raised.value.job_ids == (unwatched,) and "ttlSecondsAfterFinished" in str(raised.value)


def test_standin_reattach_a_new_backend_finds_jobs_by_label(standin, tmp_path):
    job_id = make_backend(standin, tmp_path).submit(spec(tmp_path, 1))
    standin.run_pod(job_id)
    standin.finish_pod(job_id, 3, log="step output\nFATAL: diverged\n")
    restarted = make_backend(standin, tmp_path)
    info = restarted.status(job_id)
    assert (info.state, info.exit_code) == (JobState.FAILED, 3)
    assert restarted.logs(job_id, tail_lines=1).endswith("FATAL: diverged\n")


def test_standin_logs_of_a_pod_that_never_started_are_empty(standin, tmp_path):
    backend = make_backend(standin, tmp_path)
    job_id = backend.submit(spec(tmp_path, 1))
    assert backend.logs(job_id) == ""


def test_standin_a_repeated_create_adopts_its_own_job_but_refuses_a_foreign_one(standin, tmp_path):
    backend = make_backend(standin, tmp_path)
    first = backend.submit(spec(tmp_path, 1))
    assert backend.submit(spec(tmp_path, 1)) == first  # the answer to the first create was "lost"
    standin.job(first)["metadata"]["annotations"]["data.ccat.uni-koeln.de/job-name"] = "someone-else"
    with pytest.raises(JobSubmissionError, match="409 AlreadyExists"):
        backend.submit(spec(tmp_path, 1))


def test_standin_transient_errors_are_retried_over_http(standin, tmp_path):
    backend = make_backend(standin, tmp_path)
    job_id = backend.submit(spec(tmp_path, 1))
    standin.fail_next(2, 503)
    assert backend.status(job_id).state is JobState.PENDING
    standin.fail_next(5, 503)
    with pytest.raises(JobSubmissionError, match="still failing after 5 attempt"):
        backend.submit(spec(tmp_path, 2))


def test_standin_runs_a_pod_command_and_reports_exit_code_and_log(tmp_path):
    with KubernetesStandIn(execute=True) as standin:
        backend = make_backend(standin, tmp_path)
        job_id = backend.submit(spec(tmp_path, 1, ["/bin/sh", "-c", 'echo "$GREETING from the pod"; exit 4']))
        deadline = time.monotonic() + 20
        while not (info := backend.status(job_id)).is_terminal and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (info.state, info.exit_code, info.failure_kind) == (JobState.FAILED, 4, FailureKind.EXIT_CODE)
        assert backend.logs(job_id) == f"==> pod {standin.pod_of(job_id)['metadata']['name']} <==\nhi from the pod\n"


def test_standin_the_dagster_resource_builds_the_kubernetes_backend(standin, tmp_path, monkeypatch):
    from ccat_dagster.resources.ccat import HpcBackendResource

    for name, value in {
        "CCAT_DAGSTER_DATA_DIR": str(tmp_path),
        "CCAT_WORKFLOW_MANAGER_HPC_BACKEND": "kubernetes",
        "CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR": str(tmp_path / "pipelines"),
        "CCAT_WORKFLOW_MANAGER_K8S_AUTH": "kubeconfig",
        "CCAT_WORKFLOW_MANAGER_K8S_KUBECONFIG": str(standin.kubeconfig(tmp_path / "kubeconfig")),
        "CCAT_WORKFLOW_MANAGER_K8S_JOB_IMAGE": "registry.example.org/ccat/runner:1",
        "CCAT_WORKFLOW_MANAGER_K8S_VOLUMES": f"host:{tmp_path}:{tmp_path}",
    }.items():
        monkeypatch.setenv(name, value)
    backend = HpcBackendResource(kind="kubernetes").get()
    assert isinstance(backend, KubernetesBackend) and backend.config.namespace == "ccat"
    job_id = backend.submit(spec(tmp_path / "pipelines", 1))
    assert (
        standin.job(job_id)["spec"]["template"]["spec"]["containers"][0]["image"]
        == "registry.example.org/ccat/runner:1"
    )


def test_standin_a_pod_past_its_deadline_fails_as_walltime(tmp_path):
    with KubernetesStandIn(execute=True) as standin:
        backend = make_backend(standin, tmp_path)
        # A 2 s limit: SIGTERM at the 1 s deadline, SIGKILL a 1 s grace later.
        job_id = backend.submit(spec(tmp_path, 1, ["/bin/sleep", "30"], time_hours=2 / 3600))
        assert standin.job(job_id)["spec"]["activeDeadlineSeconds"] == 1
        deadline = time.monotonic() + 20
        while not (info := backend.status(job_id)).is_terminal and time.monotonic() < deadline:
            time.sleep(0.1)
        assert info.state is JobState.FAILED and info.failure_kind is FailureKind.WALLTIME
        assert info.reason.startswith("TIMEOUT") and info.exit_code is None
