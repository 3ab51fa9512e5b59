"""The packed backend with a pilot engine of threads on this machine: the task records, not the engine, decide.

``ThreadEngine`` runs each task (the real job wrapper, a real payload) in a thread, as an allocation's worker
would; "killing the run worker" is dropping the engine, so a new backend with a new engine must find every task
from its records alone. Through the real StepRunner (in-memory attempt store): one failing sub-group fails alone
and is retried; each completed one has its exit code, wall time and peak memory. Then reattach (a finished
task collected, an unfinished one lost and re-run), cancel, and a site without Parsl.
The same on the real Slurm with Parsl's HighThroughputExecutor: tests/test_packed_slurm.py.
"""

from __future__ import annotations

import builtins
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import yaml

from ccat_dagster.execution import contract
from ccat_dagster.execution.attempts import InMemoryAttemptStore
from ccat_dagster.execution.hpc.base import JobResources, JobSpec, JobState
from ccat_dagster.execution.hpc.packed.backend import PackedBackend
from ccat_dagster.execution.hpc.packed.engine import (
    PackedEngineMissing,
    ParslEngine,
    PilotEngine,
    PilotSettings,
    run_task,
)
from ccat_dagster.execution.runner import OutcomeKind, RunnerConfig, StepRunner
from ccat_dagster.execution.step import ExecutionMode, chooses_packing
from ccat_dagster.opsdb.enums import FailureKind, RunStatus
from ccat_dagster.pipelines.apply import stored_resources
from ccat_dagster.pipelines.spec import parse_pipeline_spec, spec_to_dict
from ccat_dagster.resources.ccat import HpcBackendResource

from .loop_fakes import STEP, FakePreparation, plan

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipelines" / "chai_ngc253_co43.yaml"


class ThreadEngine(PilotEngine):
    def __init__(self, workers: int = 4) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.futures: dict[str, Future] = {}
        self.started: list[tuple[str, int, float]] = []

    def start(self, task_id, state_dir, *, cpu, memory_gb):
        self.started.append((task_id, cpu, memory_gb))
        self.futures[task_id] = self.pool.submit(run_task, str(state_dir), task_id)

    def holds(self, task_id):
        future = self.futures.get(task_id)
        return future is not None and not future.done()

    def cancel(self, task_id):
        if task_id in self.futures:
            self.futures[task_id].cancel()

    def shutdown(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def packed_runner(tmp_path: Path, backend, store: InMemoryAttemptStore, preparation, **config) -> StepRunner:  # type: ignore[no-untyped-def]
    """The real StepRunner on ``backend``, with the in-memory attempt store and no containers."""
    return StepRunner(
        engine=None,
        backend=backend,
        runtime=None,
        stager=None,
        config=RunnerConfig(pipeline_base_dir=tmp_path, processing_location_id=0, sif_cache_dir=tmp_path, **config),
        store=store,
        preparation=preparation,
    )


def spec(tmp_path: Path, name: str, command: list[str], **resources) -> JobSpec:
    return JobSpec(
        command=command,
        resources=JobResources(**{"cpu": 1, "memory_gb": 0.5, "time_hours": 0.1, **resources}),
        env={},
        job_name=name,
        log_dir=tmp_path / name,
    )


def wait_for(backend: PackedBackend, job_id: str, *, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while True:
        info = backend.status(job_id)
        if info.is_terminal or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


@dataclass
class ShellPreparation(FakePreparation):
    """Sub-group ``fail-once`` exits 3 on its first attempt; every other attempt prints and exits 0."""

    base: Path = Path("/nonexistent")

    def layout(self, sub_group_key, attempt_id):
        return contract.attempt_layout(
            base_dir=self.base,
            pipeline="p",
            sub_group_key=sub_group_key,
            step="reduce",
            attempt_id=attempt_id,
            is_final=True,
        )

    def prepare(self, plan, attempt, *, resources, staged, run_id):
        marker = self.base / f"{plan.sub_group_key}.tried"
        script = (
            f"if [ ! -e {marker} ] && [ {plan.sub_group_key} = fail-once ]; then touch {marker}; exit 3; fi; echo ok"
        )
        return JobSpec(
            command=["/bin/sh", "-c", script],
            resources=resources,
            env={},
            job_name=f"a{attempt.attempt_id}",
            log_dir=self.layout(plan.sub_group_key, attempt.attempt_id).attempt_dir / "logs",
        )


def test_each_packed_sub_group_has_its_own_outcome_failure_and_retry(tmp_path):
    engine = ThreadEngine()
    backend = PackedBackend(tmp_path / "tasks", engine, max_task_hours=1)
    store = InMemoryAttemptStore()
    runner = packed_runner(tmp_path, backend, store, ShellPreparation(base=tmp_path), max_in_flight=20)
    keys = ["scan-1", "scan-2", "fail-once", "scan-3"]
    outcomes = runner.execute(step=STEP, plans=[plan(k) for k in keys], dagster_run_id="run-1")
    engine.shutdown()
    assert {k: o.kind for k, o in outcomes.items()} == {k: OutcomeKind.COMPLETED for k in keys}
    first, second = store.attempts_of("fail-once")
    assert (first.status, first.failure_kind) == (RunStatus.FAILED, FailureKind.EXIT_CODE)
    assert second.status is RunStatus.COMPLETED and second.job_id != first.job_id
    for key in keys:
        assert len(store.attempts_of(key)) == (2 if key == "fail-once" else 1)
        metadata = outcomes[key].metadata
        assert metadata["hpc_backend"] == "packed" and metadata["wall_time_seconds"] is not None
        assert metadata["peak_memory_gb"] and metadata["peak_memory_gb"] > 0
    assert len(engine.started) == 5 and {cpu for _, cpu, _ in engine.started} == {1}


def test_a_restart_collects_written_results_once_and_reports_unfinished_tasks_lost(tmp_path):
    engine = ThreadEngine()
    backend = PackedBackend(tmp_path / "tasks", engine, max_task_hours=1)
    done = backend.submit(spec(tmp_path, "done", ["/bin/sh", "-c", "echo result; exit 0"]))
    assert wait_for(backend, done).state is JobState.COMPLETED
    # The run worker dies before its engine ran this task: the engine and its queue are gone.
    dying = ThreadEngine()
    dying.start = lambda task_id, state_dir, *, cpu, memory_gb: None
    queued = PackedBackend(tmp_path / "tasks", dying, max_task_hours=1).submit(
        spec(tmp_path, "never-ran", ["/bin/true"])
    )
    restarted = PackedBackend(tmp_path / "tasks", ThreadEngine(), max_task_hours=1)
    infos = restarted.status_many([done, queued])
    assert infos[done].state is JobState.COMPLETED and infos[done].exit_code == 0
    assert (infos[queued].state, infos[queued].failure_kind) == (JobState.FAILED, FailureKind.LOST)
    assert "result" in restarted.logs(done)
    engine.shutdown()


def test_cancel_ends_a_running_task_through_its_marker(tmp_path):
    engine = ThreadEngine()
    backend = PackedBackend(tmp_path / "tasks", engine, max_task_hours=1, kill_grace_seconds=1)
    job_id = backend.submit(spec(tmp_path, "long", ["/bin/sleep", "60"]))
    deadline = time.monotonic() + 10
    while backend.status(job_id).state is not JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    began = time.monotonic()
    backend.cancel(job_id)
    info = wait_for(backend, job_id)
    assert info.state is JobState.CANCELLED and time.monotonic() - began < 5
    engine.shutdown()


class EndingAllocationEngine(ThreadEngine):
    """Every task's "allocation" ends under it once the payload runs: SIGTERM to the job wrapper, as Slurm sends
    every process of an allocation at its walltime (the wrapper takes any SIGTERM for a cancel)."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__()
        self.state_dir = state_dir

    def start(self, task_id, state_dir, *, cpu, memory_gb):
        super().start(task_id, state_dir, cpu=cpu, memory_gb=memory_gb)
        self.pool.submit(self._end_allocation, task_id)

    def _end_allocation(self, task_id):
        import json
        import os
        import signal

        record = self.state_dir / f"{task_id}.json"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                status = json.loads(record.read_text())
            except (OSError, ValueError):
                status = {}
            if status.get("state") == "running" and status.get("wrapper_pid"):
                os.kill(status["wrapper_pid"], signal.SIGTERM)
                return
            time.sleep(0.05)


def test_a_task_its_allocation_ends_is_lost_not_cancelled_and_retried_within_max_retries(tmp_path):
    engine = EndingAllocationEngine(tmp_path / "tasks")
    backend = PackedBackend(tmp_path / "tasks", engine, max_task_hours=1, kill_grace_seconds=1)
    store = InMemoryAttemptStore()
    runner = packed_runner(tmp_path, backend, store, SleepPreparation(base=tmp_path), max_in_flight=20)
    outcomes = runner.execute(step=STEP, plans=[plan("ended")], dagster_run_id="run-1")
    engine.shutdown()
    assert outcomes["ended"].kind is OutcomeKind.FAILED
    attempts = store.attempts_of("ended")
    assert len(attempts) == 1 + STEP.max_retries  # every attempt lost, and no more than max_retries allow
    for attempt in attempts:
        assert (attempt.status, attempt.failure_kind) == (RunStatus.FAILED, FailureKind.LOST), attempt.error
        assert "allocation ended" in attempt.error and "time limit" in attempt.error


def test_a_task_its_allocation_ends_after_its_own_time_limit_is_a_walltime_failure(tmp_path):
    import json

    never = ThreadEngine()
    never.start = lambda task_id, state_dir, *, cpu, memory_gb: None
    backend = PackedBackend(tmp_path / "tasks", never, max_task_hours=1)
    job_id = backend.submit(spec(tmp_path, "slow", ["/bin/true"]))
    limit = json.loads((tmp_path / "tasks" / f"{job_id}.spec.json").read_text())["time_limit_seconds"]
    record = {"state": "finished", "cancel_requested": True, "reason": "cancelled", "exit_code": 143}
    (tmp_path / "tasks" / f"{job_id}.json").write_text(json.dumps({**record, "wall_time_seconds": limit + 1}))
    info = backend.status(job_id)
    assert (info.state, info.failure_kind) == (JobState.FAILED, FailureKind.WALLTIME), info.reason
    (tmp_path / "tasks" / f"{job_id}.json").write_text(json.dumps({**record, "wall_time_seconds": 5}))
    assert backend.status(job_id).failure_kind is FailureKind.LOST


@dataclass
class SleepPreparation(ShellPreparation):
    def prepare(self, plan, attempt, *, resources, staged, run_id):
        made = super().prepare(plan, attempt, resources=resources, staged=staged, run_id=run_id)
        return JobSpec(**{**made.__dict__, "command": ["/bin/sleep", "30"]})


def test_steps_that_do_not_fit_an_allocation_are_refused_with_the_fix(tmp_path):
    backend = PackedBackend(tmp_path / "tasks", ThreadEngine(), max_task_hours=1)
    with pytest.raises(Exception, match=r"time_hours=2.*job_per_sub_group"):
        backend.submit(spec(tmp_path, "long", ["/bin/true"], time_hours=2))
    with pytest.raises(Exception, match=r"gpus=1.*job_per_sub_group"):
        backend.submit(spec(tmp_path, "gpu", ["/bin/true"], gpus=1))


def test_a_site_without_parsl_gets_the_extra_named(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_parsl(name, *args, **kwargs):
        if name == "parsl" or name.startswith("parsl."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_parsl)
    backend = PackedBackend(tmp_path / "tasks", ParslEngine(PilotSettings(run_dir=tmp_path)), max_task_hours=1)
    with pytest.raises(PackedEngineMissing, match=r"ccat-dagster\[packed\]"):
        backend.submit(spec(tmp_path, "a", ["/bin/true"]))
    assert list((tmp_path / "tasks").glob("*.spec.json")) == []


def test_auto_packs_short_cpu_steps_only_where_the_site_enables_it():
    short, long_ = JobResources(time_hours=0.25), JobResources(time_hours=2)
    assert chooses_packing(ExecutionMode.AUTO, short, enabled=True, max_task_minutes=30)
    assert not chooses_packing(ExecutionMode.AUTO, long_, enabled=True, max_task_minutes=30)
    assert not chooses_packing(
        ExecutionMode.AUTO, JobResources(time_hours=0.25, gpus=1), enabled=True, max_task_minutes=30
    )
    assert not chooses_packing(ExecutionMode.AUTO, short, enabled=False, max_task_minutes=30)
    assert chooses_packing(ExecutionMode.PACKED, long_, enabled=False, max_task_minutes=30)
    assert not chooses_packing(ExecutionMode.JOB_PER_SUB_GROUP, short, enabled=True, max_task_minutes=30)


def test_the_hpc_resource_packs_on_slurm_and_keeps_one_job_per_sub_group_elsewhere(tmp_path):
    step = STEP.__class__(**{**STEP.__dict__, "resources": JobResources(time_hours=0.25)})
    by_default = HpcBackendResource(kind="slurm", packed_state_dir=str(tmp_path)).for_step(step)
    assert isinstance(by_default, PackedBackend)  # auto by default
    slurm = HpcBackendResource(kind="slurm", packed_execution="auto", packed_state_dir=str(tmp_path))
    packed = slurm.for_step(step)
    assert isinstance(packed, PackedBackend) and packed.state_dir == tmp_path / "tasks"
    assert (
        slurm.for_step(STEP.__class__(**{**step.__dict__, "execution_mode": ExecutionMode.JOB_PER_SUB_GROUP})) is None
    )
    assert HpcBackendResource(kind="slurm", packed_execution="off").for_step(step) is None
    assert HpcBackendResource(kind="local", state_dir=str(tmp_path)).for_step(step) is None


def test_a_step_that_packs_runs_on_the_packed_backend_and_releases_it(tmp_path):
    engine = ThreadEngine()
    packed = PackedBackend(tmp_path / "tasks", engine, max_task_hours=1)
    closed = []
    packed.close = lambda: closed.append(True) or engine.shutdown()
    runner = StepRunner(
        engine=None,
        backend=HpcBackendResource(kind="local", state_dir=str(tmp_path / "local")).get(),
        runtime=None,
        stager=None,
        config=RunnerConfig(pipeline_base_dir=tmp_path, processing_location_id=0, sif_cache_dir=tmp_path),
        store=InMemoryAttemptStore(),
        preparation=ShellPreparation(base=tmp_path),
        backend_for_step=lambda step: packed,
    )
    outcomes = runner.execute(step=STEP, plans=[plan("scan-1")], dagster_run_id="run-1")
    assert outcomes["scan-1"].metadata["hpc_backend"] == "packed" and closed == [True]


def test_the_execution_mode_round_trips_through_the_pipeline_yaml():
    data = yaml.safe_load(EXAMPLE.read_text())
    data["steps"][0]["execution"] = {"mode": "packed"}
    spec = parse_pipeline_spec(data, base_dir=EXAMPLE.parent)
    calibrate, baseline = spec.steps[0], spec.steps[1]
    assert (calibrate.execution_mode, baseline.execution_mode) == ("packed", "auto")
    assert stored_resources(calibrate)["execution_mode"] == "packed"
    assert "execution_mode" not in stored_resources(baseline)  # unchanged definition for steps that leave it
    assert spec_to_dict(spec)["steps"][0]["execution"] == {"mode": "packed"}
    assert "execution" not in spec_to_dict(spec)["steps"][1]
    data["steps"][0]["execution"] = {"mode": "pilot"}
    with pytest.raises(Exception, match=r"steps\[0\]\.execution\.mode.*auto, packed, job_per_sub_group"):
        parse_pipeline_spec(data, base_dir=EXAMPLE.parent)


@dataclass
class HungryPreparation(ShellPreparation):
    """Every attempt holds 150 MiB for two seconds: over a 0.1 GiB task, within the 0.2 GiB of its retry."""

    def prepare(self, plan, attempt, *, resources, staged, run_id):
        hold = "import time; block = bytearray(150 * 2**20); time.sleep(2)"
        return replace(
            super().prepare(plan, attempt, resources=resources, staged=staged, run_id=run_id),
            command=[sys.executable, "-c", hold],
        )


def test_a_task_over_its_memory_is_ended_as_oom_and_retried_with_more(tmp_path):
    """The allocation's --mem covers all its tasks; the wrapper holds each task to its own memory_gb."""
    engine = ThreadEngine()
    store = InMemoryAttemptStore()
    small = replace(STEP, resources=replace(STEP.resources, memory_gb=0.1))
    runner = packed_runner(
        tmp_path, PackedBackend(tmp_path / "tasks", engine, max_task_hours=1), store, HungryPreparation(base=tmp_path)
    )
    outcomes = runner.execute(step=small, plans=[plan("scan-1")], dagster_run_id="run-1")
    engine.shutdown()
    assert outcomes["scan-1"].kind is OutcomeKind.COMPLETED
    first, second = store.attempts_of("scan-1")
    assert (first.status, first.failure_kind) == (RunStatus.FAILED, FailureKind.OOM)
    assert "memory watchdog" in (first.error or "") and "memory_gb=0.1" in first.error
    assert second.status is RunStatus.COMPLETED
    assert [memory for _, _, memory in engine.started] == [0.1, 0.2]


def test_the_task_body_reports_a_wrapper_that_could_not_run(tmp_path):
    """run_task forks the wrapper; a task without its spec ends the wrapper with its usage error (exit 2)."""
    (tmp_path / "tasks").mkdir()
    assert run_task(str(tmp_path / "tasks"), "0" * 32) == 2


def test_a_dead_launcher_is_replaced_and_the_task_it_ran_is_not_run_again(tmp_path):
    """Each worker keeps a small launcher that forks the wrappers; one that died is replaced on the next task, and
    the task it was running when it died is left to its record (here: none, so the backend says lost)."""
    backend = PackedBackend(tmp_path / "tasks", ThreadEngine(workers=1), max_task_hours=1)
    first = backend.submit(spec(tmp_path, "first", ["/bin/true"]))
    assert wait_for(backend, first).state is JobState.COMPLETED
    (launcher,) = _launchers(backend.engine)
    launcher.kill()
    launcher.wait()
    second = backend.submit(spec(tmp_path, "second", ["/bin/true"]))
    assert wait_for(backend, second).state is JobState.COMPLETED
    (replacement,) = _launchers(backend.engine)
    assert replacement.pid != launcher.pid

    # The launcher dies while a task runs (its payload kills it): run_task returns, nothing starts the task again,
    # and the orphaned wrapper still records its end, which is collected as usual.
    kill_launcher = 'read -r _ _ _ launcher _ < /proc/$PPID/stat; kill -9 "$launcher"; sleep 0.5; echo survived'
    third = backend.submit(spec(tmp_path, "third", ["/bin/sh", "-c", kill_launcher]))
    info = wait_for(backend, third)
    assert info.state is JobState.COMPLETED and "survived" in backend.logs(third)
    assert replacement.poll() is not None
    fourth = backend.submit(spec(tmp_path, "fourth", ["/bin/true"]))
    assert wait_for(backend, fourth).state is JobState.COMPLETED
    assert len(list((tmp_path / "tasks").glob("*.spec.json"))) == 4
    backend.engine.shutdown()


def _launchers(engine: ThreadEngine) -> list:
    """The launchers of the engine's worker threads (one thread here)."""
    from ccat_dagster.execution.hpc.packed import task

    found = engine.pool.submit(lambda: getattr(task._local, "launcher", None)).result()
    return [found] if found is not None else []


def test_the_engine_is_started_before_the_first_round_is_staged(tmp_path):
    """The packed engine's first allocation comes up while the data is staged, not after."""
    events: list[str] = []

    class WarmEngine(ThreadEngine):
        def warm_up(self, *, cpu, memory_gb):
            events.append(f"warm_up cpu={cpu} memory_gb={memory_gb}")

    @dataclass
    class RecordingPreparation(ShellPreparation):
        def stage(self, plans):
            events.append("stage")
            return super().stage(plans)

    engine = WarmEngine()
    runner = packed_runner(
        tmp_path,
        PackedBackend(tmp_path / "tasks", engine, max_task_hours=1),
        InMemoryAttemptStore(),
        RecordingPreparation(base=tmp_path),
    )
    outcomes = runner.execute(step=STEP, plans=[plan("scan-1"), plan("scan-2")], dagster_run_id="run-1")
    engine.shutdown()
    assert all(o.kind is OutcomeKind.COMPLETED for o in outcomes.values())
    assert events[:2] == [f"warm_up cpu=1 memory_gb={STEP.resources.memory_gb}", "stage"]
    assert events.count(events[0]) == 1
