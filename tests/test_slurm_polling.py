"""The scheduler calls of two concurrent runs on the real single-node Slurm, counted through shims on PATH.

Two run workers of one processing location (two StepRunners in threads, each with its own SlurmBackend as in
two processes) run four one-second jobs each at the production pacing (20 calls per minute) and share the
location's status cache. ``squeue``, ``sacct`` and ``scontrol`` on PATH are shims that log each call and run
the real command. The attempt store and the preparation are the loop's in-memory fakes: what is measured is
the traffic to slurmctld, not ops-db (tests/test_runner_slurm.py runs the same backend against PostgreSQL).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ccat_dagster.execution import contract
from ccat_dagster.execution.attempts import InMemoryAttemptStore
from ccat_dagster.execution.hpc.base import JobResources, JobSpec
from ccat_dagster.execution.hpc.slurm.backend import SlurmBackend
from ccat_dagster.execution.runner import OutcomeKind, RunnerConfig, StepRunner

from .conftest import require_slurm
from .loop_fakes import STEP, FakePreparation, plan

pytestmark = [pytest.mark.slurm]
COMMANDS = ("squeue", "sacct", "scontrol")


@dataclass
class SleepPreparation(FakePreparation):
    """Each attempt is a real Slurm job running ``sleep 1``, its logs under ``base``."""

    base: Path = Path("/nonexistent")
    run_name: str = "run"

    def layout(self, sub_group_key: str, attempt_id: int) -> contract.AttemptLayout:
        return contract.attempt_layout(
            base_dir=self.base,
            pipeline="p",
            sub_group_key=sub_group_key,
            step="reduce",
            attempt_id=attempt_id,
            is_final=True,
        )

    def prepare(self, plan, attempt, *, resources, staged, run_id):
        log_dir = self.layout(plan.sub_group_key, attempt.attempt_id).attempt_dir / "logs"
        return JobSpec(
            command=["/bin/sleep", "1"],
            resources=JobResources(cpu=1, memory_gb=0.25, time_hours=0.1),
            env={"SUB_GROUP_KEY": plan.sub_group_key},
            job_name=f"ccat-polling-{self.run_name}-{attempt.attempt_id}",
            log_dir=log_dir,
        )


def _shims(directory: Path, log: Path) -> Path:
    directory.mkdir()
    for name in COMMANDS:
        real = shutil.which(name)
        assert real, f"{name} not on PATH"
        shim = directory / name
        shim.write_text(f'#!/bin/sh\necho "$(date +%s.%N) {name} $*" >> "{log}"\nexec "{real}" "$@"\n')
        shim.chmod(0o755)
    return directory


def test_two_runs_share_one_status_query_and_stay_within_twenty_calls_a_minute(tmp_path, monkeypatch):
    require_slurm()
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{_shims(tmp_path / 'bin', log)}{os.pathsep}{os.environ['PATH']}")
    runners: dict[str, StepRunner] = {}
    outcomes: dict[str, dict] = {}
    for name in ("run-a", "run-b"):
        runners[name] = StepRunner(
            engine=None,
            backend=SlurmBackend(),
            runtime=None,
            stager=None,
            config=RunnerConfig(
                pipeline_base_dir=tmp_path,
                processing_location_id=1,
                sif_cache_dir=tmp_path,
                max_in_flight=8,
                status_cache_dir=tmp_path / "status-cache",
            ),
            store=InMemoryAttemptStore(),
            preparation=SleepPreparation(base=tmp_path / name, run_name=name),
        )

    def run(name: str) -> None:
        keys = [f"{name}-scan-{i}" for i in range(4)]
        outcomes[name] = runners[name].execute(step=STEP, plans=[plan(k) for k in keys], dagster_run_id=name)

    began = time.monotonic()
    threads = [threading.Thread(target=run, args=(name,)) for name in runners]
    for thread in threads:
        thread.start()
        time.sleep(0.5)  # the second run starts while the first one's jobs are queued
    for thread in threads:
        thread.join(timeout=120)
    elapsed = time.monotonic() - began
    assert all(not t.is_alive() for t in threads)
    for name in runners:
        assert {o.kind for o in outcomes[name].values()} == {OutcomeKind.COMPLETED}, outcomes[name]

    calls = [line.split(" ", 2) for line in log.read_text().splitlines()]
    times = [float(at) for at, _, _ in calls]
    in_any_minute = max(sum(1 for u in times if t <= u < t + 60) for t in times)
    assert in_any_minute <= 20, f"{in_any_minute} scheduler calls in a minute: {calls}"
    job_ids = {name: {o.metadata["hpc_job_id"] for o in outcomes[name].values()} for name in runners}
    squeue_lists = [set(args.split("--jobs=", 1)[1].split()[0].split(",")) for _, c, args in calls if "--jobs=" in args]
    assert any(jobs & job_ids["run-a"] and jobs & job_ids["run-b"] for jobs in squeue_lists), (
        "no squeue asked for both runs' jobs at once"
    )
    polls = sum(r.poller.polls for r in runners.values())
    queries = sum(r.poller.queries_sent for r in runners.values())
    assert queries < polls, f"every one of {polls} polls asked the scheduler itself"
    assert len(squeue_lists) >= queries
    print(f"{len(calls)} scheduler calls in {elapsed:.1f} s for {polls} polls of two runs ({queries} queries)")
