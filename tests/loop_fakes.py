"""Fakes for the step runner's loop: a clock, a scripted HPC backend, an attempt preparation without files.

With these and ``InMemoryAttemptStore`` a batch of many polls, back-offs and retries runs in milliseconds: the
clock only moves when the loop sleeps. The backend plays a script per sub-group: one entry per attempt, each
saying how the job ends (``"ok"``, a ``FailureKind`` value, ``"cancelled"``, ``"unknown"`` = forgotten by the
scheduler) after how many polls.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ccat_dagster.execution import contract
from ccat_dagster.execution.attempts import AttemptRef, InMemoryAttemptStore
from ccat_dagster.execution.discovery import DiscoveredProduct
from ccat_dagster.execution.hpc.base import (
    HpcBackend,
    JobInfo,
    JobResources,
    JobSpec,
    JobState,
    JobSubmissionError,
    UnknownJobError,
)
from ccat_dagster.execution.planning import Readiness, SubGroupPlan
from ccat_dagster.execution.preparation import AttemptPreparation, PreparationFailure
from ccat_dagster.execution.runner import RunnerConfig, StepRunner
from ccat_dagster.execution.step import StepDefinition
from ccat_dagster.opsdb.enums import FailureKind

BASE = Path("/nonexistent/ccat-loop-test")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class _Job:
    key: str
    spec: JobSpec
    ending: str
    polls_left: int
    cancelled: bool = False


class ScriptedBackend(HpcBackend):
    """Jobs end as ``script[key][attempt index]`` says, after ``polls`` status queries each."""

    name = "fake"

    def __init__(self, script: dict[str, Sequence[str]] | None = None, *, polls: int = 2) -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.polls = polls
        self.jobs: dict[str, _Job] = {}
        self.submitted: list[tuple[str, JobSpec]] = []
        self.cancelled: list[str] = []
        self.status_errors: list[BaseException] = []
        """Raised by the next status queries, one each, before the scheduler answers again."""
        self.refuse: set[str] = set()
        """Sub-group keys whose submission the scheduler refuses."""
        self.on_status: Callable[[], None] = lambda: None
        self._ids = itertools.count(1)
        self._tries: dict[str, int] = {}

    def add_job(self, job_id: str, key: str, ending: str = "ok", polls: int = 1) -> None:
        """A job submitted by someone else (a run that died), for adoption tests."""
        spec = JobSpec(command=["true"], resources=JobResources(), env={}, job_name="adopted", log_dir=BASE)
        self.jobs[job_id] = _Job(key, spec, ending, polls)

    def submit(self, spec: JobSpec) -> str:
        key = spec.env["SUB_GROUP_KEY"]
        if key in self.refuse:
            raise JobSubmissionError(f"sbatch refused job {spec.job_name!r}: Invalid account or partition")
        try_number = self._tries.get(key, 0)
        self._tries[key] = try_number + 1
        endings = self.script.get(key, ["ok"])
        ending = endings[min(try_number, len(endings) - 1)]
        job_id = f"job-{next(self._ids)}"
        self.jobs[job_id] = _Job(key, spec, ending, self.polls)
        self.submitted.append((key, spec))
        return job_id

    def status_many(self, job_ids: Sequence[str]) -> dict[str, JobInfo]:
        self.on_status()
        if self.status_errors:
            raise self.status_errors.pop(0)
        unknown = [
            j
            for j in job_ids
            if j not in self.jobs or self.jobs[j].ending == "unknown" and self.jobs[j].polls_left <= 0
        ]
        if unknown:
            raise UnknownJobError(f"unknown job(s) {unknown}", job_ids=unknown)
        return {job_id: self._info(job_id) for job_id in job_ids}

    def _info(self, job_id: str) -> JobInfo:
        job = self.jobs[job_id]
        if job.cancelled:
            return JobInfo(job_id, JobState.CANCELLED, reason="cancelled")
        if job.polls_left > 0:
            job.polls_left -= 1
            return JobInfo(job_id, JobState.RUNNING)
        if job.ending == "ok":
            return JobInfo(job_id, JobState.COMPLETED, exit_code=0, wall_time_seconds=1.0)
        if job.ending == "cancelled":
            return JobInfo(job_id, JobState.CANCELLED, reason="cancelled")
        kind = FailureKind(job.ending)
        exit_code = {FailureKind.OOM: 137, FailureKind.WALLTIME: 143, FailureKind.EXIT_CODE: 3}.get(kind, 1)
        return JobInfo(job_id, JobState.FAILED, exit_code=exit_code, reason=kind.value.upper(), failure_kind=kind)

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)
        self.jobs[job_id].cancelled = True

    def logs(self, job_id: str, *, tail_lines: int = 50) -> str:
        return f"log of {job_id}\n"

    def specs_of(self, key: str) -> list[JobSpec]:
        return [spec for k, spec in self.submitted if k == key]


@dataclass
class FakePreparation(AttemptPreparation):
    """No files: staging, preparation and discovery fail for the keys listed, and succeed otherwise."""

    staging_fails: set[str] = field(default_factory=set)
    disk_full: set[str] = field(default_factory=set)
    refused_output: set[str] = field(default_factory=set)
    full_output: set[str] = field(default_factory=set)
    """Keys whose output directory is on a full file system (their failed jobs hit ENOSPC)."""
    staged_rounds: list[list[str]] = field(default_factory=list)

    def layout(self, sub_group_key: str, attempt_id: int) -> contract.AttemptLayout:
        return contract.attempt_layout(
            base_dir=BASE,
            pipeline="p",
            sub_group_key=sub_group_key,
            step="reduce",
            attempt_id=attempt_id,
            is_final=True,
        )

    def stage(self, plans):
        self.staged_rounds.append([p.sub_group_key for p in plans])
        return {
            p.sub_group_key: (
                PreparationFailure(f"staging failed: {p.sub_group_key}.tar is corrupt", kind=FailureKind.STAGING)
                if p.sub_group_key in self.staging_fails
                else {}
            )
            for p in plans
        }

    def prepare(self, plan, attempt: AttemptRef, *, resources, staged, run_id):
        if plan.sub_group_key in self.disk_full:
            raise PreparationFailure("the disk is full (ENOSPC): no space left writing /x", kind=FailureKind.DISK_FULL)
        return JobSpec(
            command=["true"],
            resources=resources,
            env={"SUB_GROUP_KEY": plan.sub_group_key},
            job_name=f"a{attempt.attempt_id}",
            log_dir=BASE,
        )

    def full_file_system(self, layout):
        return layout.products_dir if layout.sub_group_key in self.full_output else None

    def discover(self, layout):
        if layout.sub_group_key in self.refused_output:
            raise PreparationFailure("output collection refused: science/pipe: named pipe", kind=FailureKind.CONTRACT)
        return [
            DiscoveredProduct(
                relative_path="science/result.txt",
                product_type="science",
                size=10,
                sha256="0" * 64,
                host_path=layout.products_dir / "science" / "result.txt",
            )
        ]


STEP = StepDefinition(
    pipeline_name="p",
    step_name="reduce",
    step_id=1,
    is_final=True,
    software_name="s",
    software_version="1.0.0",
    image_ref="/img",
    image_digest=None,
    entrypoint=("run",),
    resources=JobResources(cpu=1, memory_gb=2.0, time_hours=1.0),
    max_retries=2,
)


def plan(key: str, readiness: Readiness = Readiness.GAP) -> SubGroupPlan:
    return SubGroupPlan(
        step_id=STEP.step_id,
        step_name=STEP.step_name,
        sub_group_key=key,
        readiness=readiness,
        package_ids=(abs(hash(key)) % 1000,),
        software_version_id=1,
        config_id=1,
        fingerprint=f"fp-{key}",
    )


@dataclass
class Loop:
    """A runner wired to fakes; ``run`` executes plans for ``keys`` and returns the outcomes by key."""

    clock: FakeClock
    backend: ScriptedBackend
    store: InMemoryAttemptStore
    preparation: FakePreparation
    runner: StepRunner
    reports: list[str]

    def run(self, keys: Sequence[str], *, step: StepDefinition = STEP, run_id: str = "run-1", plans=None):
        return self.runner.execute(step=step, plans=plans or [plan(k) for k in keys], dagster_run_id=run_id)


def make_loop(backend: ScriptedBackend | None = None, *, store=None, **config) -> Loop:
    clock = FakeClock()
    backend = backend or ScriptedBackend()
    store = store or InMemoryAttemptStore()
    preparation = FakePreparation()
    reports: list[str] = []
    runner = StepRunner(
        engine=None,
        backend=backend,
        runtime=None,
        stager=None,
        config=RunnerConfig(
            pipeline_base_dir=BASE, processing_location_id=0, sif_cache_dir=BASE, **{"max_in_flight": 10, **config}
        ),
        report=reports.append,
        store=store,
        preparation=preparation,
        clock=clock,
        sleep=clock.sleep,
    )
    return Loop(clock, backend, store, preparation, runner, reports)
