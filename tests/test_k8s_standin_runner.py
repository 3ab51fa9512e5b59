"""A real StepRunner batch with HPC_BACKEND=kubernetes, against PostgreSQL, through the local HTTP stand-in of
the Kubernetes API (tests/k8s_standin.py), which runs each pod's command (the bubblewrap container) as a local
process. Submit, status, logs, cancel and reattach after the orchestrator died, end to end; the backend is built
from the settings exactly as the Dagster resource builds it (kubeconfig authentication, K8S_* variables).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccat_dagster.execution.hpc.kubernetes import backend_from_settings
from ccat_dagster.execution.runner import OutcomeKind
from ccat_dagster.execution.runtimes import get_runtime
from ccat_dagster.opsdb.enums import RunStatus
from ccat_dagster.settings import Settings

from .dagster_fixtures import require_bwrap_and_numpy
from .k8s_standin import KubernetesStandIn
from .oci_registry import start_registry
from .runner_fixtures import (
    STEP,
    RunnerWorld,
    dispose_runner_world,
    make_runner_world,
    processes_mentioning,
    run_in_thread,
    wait_until,
)

pytestmark = [pytest.mark.postgres, pytest.mark.bwrap, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
POLL = {"poll_interval_seconds": 0.5, "min_poll_interval_seconds": 0.1}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[RunnerWorld]:
    require_bwrap_and_numpy()
    world = make_runner_world(tmp_path_factory.mktemp("k8s_runner"))
    yield world
    dispose_runner_world(world)


@pytest.fixture(scope="module")
def standin() -> Iterator[KubernetesStandIn]:
    with KubernetesStandIn(execute=True) as server:
        yield server


@pytest.fixture(scope="module")
def environment(world, standin, tmp_path_factory) -> dict[str, str]:
    kubeconfig = standin.kubeconfig(tmp_path_factory.mktemp("kube") / "config")
    return {
        "CCAT_DAGSTER_DATA_DIR": str(world.data_dir),
        "CCAT_OPS_DB_URL": world.url,
        "CCAT_WORKFLOW_MANAGER_HPC_BACKEND": "kubernetes",
        "CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR": str(world.base_dir),
        "CCAT_WORKFLOW_MANAGER_K8S_AUTH": "kubeconfig",
        "CCAT_WORKFLOW_MANAGER_K8S_KUBECONFIG": str(kubeconfig),
        "CCAT_WORKFLOW_MANAGER_K8S_NAMESPACE": "ccat",
        "CCAT_WORKFLOW_MANAGER_K8S_JOB_IMAGE": "registry.example.org/ccat/apptainer-runner:1.3",
        # The stand-in's "node" is this host: the volumes are the same directories.
        "CCAT_WORKFLOW_MANAGER_K8S_VOLUMES": ",".join(
            [f"host:{world.data_dir}:{world.data_dir}", f"host:{world.software_dir}:{world.software_dir}:ro"]
        ),
    }


def k8s_backend(environment: dict[str, str]):
    return backend_from_settings(Settings.from_env(environment))


def test_standin_runner_batch_submits_polls_and_reads_logs(world, standin, environment):
    keys = world.scan_keys[:3]
    pipeline = world.apply(behaviour="ok", extra_config={"fail_keys": [keys[1]]})
    standin.requests.clear()
    runner = world.runner(k8s_backend(environment), **POLL)
    outcomes = runner.run(pipeline_name=pipeline, step_name=STEP, sub_group_keys=keys, dagster_run_id="k-1")
    assert [o.kind for o in outcomes] == [OutcomeKind.COMPLETED, OutcomeKind.FAILED, OutcomeKind.COMPLETED]
    ok_first, failed, ok_last = (world.attempts(pipeline, key)[0] for key in keys)
    for attempt in (ok_first, failed, ok_last):
        job = standin.job(attempt.hpc_job_id)
        assert attempt.hpc_backend == "kubernetes" and job is not None
        labels = job["metadata"]["labels"]
        assert labels["data.ccat.uni-koeln.de/attempt"] == str(attempt.id)
        assert labels["data.ccat.uni-koeln.de/pipeline"] == pipeline
        assert job["metadata"]["annotations"]["data.ccat.uni-koeln.de/sub-group"] == attempt.sub_group_key
        # The bubblewrap runtime's command: its signal forwarder (bash) starting bwrap.
        command = job["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[0] == "bash" and "bwrap" in command
    assert failed.status is RunStatus.FAILED and failed.exit_code == 3
    assert failed.error.startswith("job failed with exit code 3") and "FATAL: calibration diverged" in failed.error
    for attempt in (ok_first, ok_last):
        assert attempt.status is RunStatus.COMPLETED and attempt.wall_time_seconds is not None
        assert attempt.peak_memory_gb is None  # no metrics from pod objects: absent, not zero
    assert world.registered_counts([ok_first.id, ok_last.id])["products"] == 2
    # Status came from list calls only (one of Jobs and one of pods per poll), never a read per Job.
    job_reads = [path for method, path in standin.requests if method == "GET" and "/jobs/" in path]
    job_lists = [
        path
        for method, path in standin.requests
        if method == "GET" and "/jobs?app.kubernetes.io/managed-by=ccat-dagster," in path
    ]
    assert job_reads == [] and len(job_lists) >= 1


def test_standin_cancelled_batch_deletes_its_job_in_the_foreground(world, standin, environment):
    pipeline = world.apply(behaviour="sleep", extra_config={"seconds": 300})
    runner = world.runner(k8s_backend(environment), **POLL)
    thread, outcomes = run_in_thread(runner, pipeline=pipeline, keys=world.scan_keys[:1], run_id="k-2")
    running = wait_until(
        lambda: next((a for a in world.attempts(pipeline) if a.status is RunStatus.RUNNING), None),
        what="the Job's pod to run",
    )
    runner.cancel()
    thread.join(60)
    assert not thread.is_alive() and [o.kind for o in outcomes] == [OutcomeKind.CANCELLED]
    (attempt,) = world.attempts(pipeline)
    assert attempt.status is RunStatus.CANCELLED and attempt.hpc_job_id == running.hpc_job_id
    assert {"name": attempt.hpc_job_id, "propagationPolicy": "Foreground"} in standin.delete_bodies
    wait_until(lambda: standin.job(attempt.hpc_job_id) is None, what="the Job to be deleted", seconds=20)
    wait_until(lambda: not processes_mentioning(attempt.attempt_dir), what="the pod's process to be gone", seconds=20)


_CHILD = """
import json, sys
from ccat_dagster.execution.hpc.kubernetes import backend_from_settings
from ccat_dagster.execution.runner import RunnerConfig, StepRunner
from ccat_dagster.execution.runtimes import BubblewrapRuntime
from ccat_dagster.execution.staging import LocalStager
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.settings import Settings
a = json.loads(sys.argv[1])
settings = Settings.from_env(a["env"])
StepRunner(
    engine=make_engine(a["env"]["CCAT_OPS_DB_URL"]),
    backend=backend_from_settings(settings),
    runtime=BubblewrapRuntime(),
    stager=LocalStager(),
    config=RunnerConfig(
        pipeline_base_dir=settings.pipeline_base_dir,
        processing_location_id=a["location"],
        sif_cache_dir=settings.sif_cache_dir,
        poll_interval_seconds=3600,  # it polls once right after submitting, then is killed while waiting
    ),
).run(pipeline_name=a["pipeline"], step_name=a["step"], sub_group_keys=a["keys"], dagster_run_id="k-dies")
"""


def test_standin_a_restarted_runner_reattaches_to_its_job_by_label(world, standin, environment):
    pipeline = world.apply(behaviour="sleep", extra_config={"seconds": 3})
    keys = world.scan_keys[:1]
    args = {
        "env": environment,
        "location": world.processing_location_id,
        "pipeline": pipeline,
        "step": STEP,
        "keys": keys,
    }
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)], cwd=REPO)
    try:
        submitted = wait_until(
            lambda: next((a for a in world.attempts(pipeline) if a.hpc_job_id), None) or child.poll() is not None,
            what="the first runner to submit",
            seconds=120,
        )
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert submitted is not True, f"the first runner exited with {child.returncode} before submitting"
    creates = [r for r in standin.requests if r[0] == "POST" and r[1].endswith("/jobs")]
    world.reports.clear()
    runner = world.runner(k8s_backend(environment), **POLL)  # a new backend: it never saw this Job
    runner.is_run_alive = lambda run_id: False
    (outcome,) = runner.run(pipeline_name=pipeline, step_name=STEP, sub_group_keys=keys, dagster_run_id="k-3")
    assert outcome.kind is OutcomeKind.COMPLETED, outcome.detail
    (attempt,) = world.attempts(pipeline)
    assert attempt.id == submitted.id and attempt.hpc_job_id == submitted.hpc_job_id and attempt.dagster_run_id == "k-3"
    assert any(f"reattached to kubernetes job {submitted.hpc_job_id}" in line for line in world.reports)
    assert [r for r in standin.requests if r[0] == "POST" and r[1].endswith("/jobs")] == creates  # no new Job
    assert world.registered_counts([attempt.id])["products"] == 1


def test_standin_oci_runtime_runs_the_step_image_by_its_registry_digest(
    world, standin, environment, tmp_path_factory, monkeypatch
):
    """CONTAINER_RUNTIME=oci end to end: the tag's digest from a real registry, the Job's container that image
    by digest with only the contract's mounts (the stand-in's kubelet runs it in bubblewrap from the software
    directory the test names for that digest), products collected, reserved CPU hours recorded."""
    registry = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        digest = registry.push_image("ccat/behave", "1.0.0", payload=b"behave 1.0.0")
        standin.images[f"{registry.host}/ccat/behave@{digest}"] = world.software_dir
        monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_REGISTRY_PLAIN_HTTP", registry.host)
        env = {
            **environment,
            "CCAT_WORKFLOW_MANAGER_CONTAINER_RUNTIME": "oci",
            "CCAT_WORKFLOW_MANAGER_K8S_JOB_IMAGE": "",
        }
        settings = Settings.from_env(env)
        pipeline = world.apply(
            behaviour="ok",
            software={"name": "behave-oci", "image_ref": f"docker://{registry.host}/ccat/behave:1.0.0"},
        )
        runner = world.runner(backend_from_settings(settings), runtime=get_runtime(settings.container_runtime), **POLL)
        keys = world.scan_keys[:1]
        (outcome,) = runner.run(pipeline_name=pipeline, step_name=STEP, sub_group_keys=keys, dagster_run_id="k-oci")
    finally:
        registry.stop()
    assert outcome.kind is OutcomeKind.COMPLETED, outcome.detail
    (attempt,) = world.attempts(pipeline)
    assert attempt.image_digest == digest
    (container,) = standin.job(attempt.hpc_job_id)["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"{registry.host}/ccat/behave@{digest}"
    assert container["command"] == ["/usr/bin/python3", "/opt/software/bin/behave.py"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["readOnly"] for m in container["volumeMounts"]}
    assert mounts["/workflow/config"] is True and mounts["/workflow/output"] is False
    assert all(path.startswith("/workflow/") or path == "/tmp" for path in mounts)
    assert world.registered_counts([attempt.id])["products"] == 1
    # One CPU reserved for the pod's run time (the stand-in's timestamps have whole seconds).
    assert attempt.cpu_hours is not None and attempt.cpu_hours == pytest.approx(
        attempt.wall_time_seconds / 3600, abs=1e-9
    )
