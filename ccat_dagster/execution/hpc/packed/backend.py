"""PackedBackend: many sub-groups per Slurm allocation, each still its own job to the runner.

The runner sees the usual interface: one job id per attempt, its state, exit code, wall time, peak memory and
failure kind, its logs, its cancel. Underneath, a job is one task of a pilot-job engine (``engine``: Parsl's
HighThroughputExecutor on a SlurmProvider), whose few allocations run all the tasks of a batch.

Every task is the local backend's job wrapper (``local_wrapper``), run inside an allocation on the task's
spec in ``state_dir`` (on the file system the compute nodes share), in a child forked by the worker
(``task.run_task``). The wrapper holds the task to its ``memory_gb`` (the allocation's ``--mem`` covers all its
tasks: a task over its own share is ended as out of memory and retried with more, not left to end the
allocation under its neighbours). It writes the task's status record there, so what the runner learns never
depends on the engine's memory:

- a record that says finished is the task's outcome, read by any process, before or after a restart: a task
  whose result was written is collected once (its attempt ends with it);
- no record, or a running one, while this process's engine holds the task: PENDING / RUNNING;
- no finished record and no engine holding the task (the run worker that started it was killed, its engine
  and allocations went with it; or the allocation died under the task): FAILED with ``failure_kind`` lost,
  which the runner retries as a new attempt. A lost task never counts twice: its attempt is over.
- a record that says cancelled while no cancel marker exists: Slurm ended the allocation under the task (at its
  walltime, or a scancel of the allocation) and its SIGTERM reached the wrapper, which records any SIGTERM as a
  cancel. FAILED, walltime when the task had used its own time limit, else lost (it started too late in the
  allocation's life); either way retried within the runner's ``max_retries``, never cancelled.

Cancel writes the cancel marker (the wrapper looks for it about once a second and ends the payload, then
records it as cancelled) and drops the task from the engine's queue; ``shutdown`` releases the allocations.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from ccat_dagster.execution.hpc.base import (
    HpcBackend,
    HpcError,
    InvalidJobSpecError,
    JobInfo,
    JobResources,
    JobSpec,
    JobState,
    JobSubmissionError,
    UnknownJobError,
)
from ccat_dagster.execution.hpc.local import finished_job_info, job_record, wrapper_job_logs
from ccat_dagster.execution.hpc.local_wrapper import (
    JOB_ID_PATTERN,
    cancel_marker_path,
    read_json,
    spec_path,
    status_path,
    write_json_atomically,
)
from ccat_dagster.execution.hpc.packed.engine import PilotEngine
from ccat_dagster.opsdb.enums import FailureKind

__all__ = ["PackedBackend"]

log = logging.getLogger(__name__)


class PackedBackend(HpcBackend):
    """Runs each JobSpec as one task of ``engine``; task records live in ``state_dir`` (shared with the nodes).

    ``max_task_hours``: the longest task an allocation can hold (its walltime); a longer step is refused with
    a message to run it one job per sub-group. ``kill_grace_seconds``: SIGTERM to SIGKILL on cancel and at the
    task's time limit.
    """

    name = "packed"

    def __init__(
        self,
        state_dir: Path,
        engine: PilotEngine,
        *,
        max_task_hours: float,
        kill_grace_seconds: float = 10.0,
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.engine = engine
        self.max_task_hours = max_task_hours
        self.kill_grace_seconds = kill_grace_seconds

    def _refusal(self, resources: JobResources) -> str | None:
        """Why a task of ``resources`` cannot be packed, with the fix (None: it can)."""
        if resources.time_hours > self.max_task_hours:
            return (
                f"time_hours={resources.time_hours} is longer than a packed allocation lives "
                f"({self.max_task_hours:g} h, PACKED_WALLTIME_MINUTES): give the step "
                "execution: {mode: job_per_sub_group}, or raise the setting"
            )
        if resources.gpus:
            return (
                f"gpus={resources.gpus}: packed allocations hold CPU tasks only; give the step "
                "execution: {mode: job_per_sub_group}"
            )
        return None

    def submit(self, spec: JobSpec) -> str:
        if (refusal := self._refusal(spec.resources)) is not None:
            raise InvalidJobSpecError(refusal)
        job_id = uuid.uuid4().hex
        record = job_record(spec, job_id, kill_grace_seconds=self.kill_grace_seconds)
        record["cancel_by_marker"] = True  # the task may run on a node this process cannot signal
        # The allocation's --mem covers all its tasks: the wrapper holds each to its own memory_gb.
        record["enforce_memory"] = True
        try:
            write_json_atomically(spec_path(self.state_dir, job_id), record)
        except OSError as exc:
            raise JobSubmissionError(f"cannot record task {spec.job_name!r} in {self.state_dir}: {exc}") from exc
        try:
            self.engine.start(job_id, self.state_dir, cpu=spec.resources.cpu, memory_gb=spec.resources.memory_gb)
        except HpcError:
            spec_path(self.state_dir, job_id).unlink(missing_ok=True)
            raise
        except Exception as exc:  # noqa: BLE001 - the engine's own errors, typed for the runner
            spec_path(self.state_dir, job_id).unlink(missing_ok=True)
            raise JobSubmissionError(f"the pilot engine refused task {spec.job_name!r}: {exc}") from exc
        return job_id

    def prepare_for(self, resources: JobResources) -> None:
        """Start the engine and ask for its first allocation now, before the batch's data is staged."""
        if self._refusal(resources) is not None:
            return  # submit refuses these tasks, with the fix
        try:
            self.engine.warm_up(cpu=resources.cpu, memory_gb=resources.memory_gb)
        except HpcError as error:  # the first submission reports it, per sub-group
            log.info("packed engine not started ahead of the batch: %s", error)

    def status_many(self, job_ids: Sequence[str]) -> dict[str, JobInfo]:
        wanted = list(dict.fromkeys(job_ids))
        _check(wanted)
        infos: dict[str, JobInfo] = {}
        unknown: list[str] = []
        for job_id in wanted:
            # The engine is asked first: a task it no longer holds has ended, and then its record is final.
            held = self.engine.holds(job_id)
            status = read_json(status_path(self.state_dir, job_id))
            finished = status is not None and status.get("state") == "finished"
            if cancel_marker_path(self.state_dir, job_id).exists() and (not held or finished):
                infos[job_id] = JobInfo(
                    job_id=job_id,
                    state=JobState.CANCELLED,
                    exit_code=(status or {}).get("exit_code") if finished else None,
                    wall_time_seconds=(status or {}).get("wall_time_seconds"),
                    reason="cancelled",
                    failure_kind=FailureKind.CANCELLED,
                )
            elif finished and status.get("cancel_requested"):
                # Terminated, and not by this backend (it writes the marker first): the allocation ended under the
                # task, and Slurm's SIGTERM reached the wrapper, which takes any SIGTERM for a cancel.
                infos[job_id] = self._ended_with_allocation(job_id, status)
            elif finished:
                infos[job_id] = finished_job_info(job_id, status)
            elif held:
                running = status is not None and status.get("state") == "running"
                started_at = (status or {}).get("started_at")
                infos[job_id] = JobInfo(
                    job_id=job_id,
                    state=JobState.RUNNING if running else JobState.PENDING,
                    wall_time_seconds=time.time() - started_at if running and started_at else None,
                    reason=None if running else "queued for a packed allocation",
                )
            elif read_json(spec_path(self.state_dir, job_id)) is None:
                unknown.append(job_id)
            else:
                infos[job_id] = JobInfo(
                    job_id=job_id,
                    state=JobState.FAILED,
                    reason=self.engine.lost_reason(job_id)
                    or (
                        "the packed task ended without recording an exit status: its pilot engine or allocation "
                        "is gone (the run worker restarted, or the allocation ended)"
                    ),
                    failure_kind=FailureKind.LOST,
                )
        if unknown:
            raise UnknownJobError(f"no packed tasks {unknown!r} in {self.state_dir}", job_ids=unknown)
        return infos

    def _ended_with_allocation(self, job_id: str, status: dict) -> JobInfo:
        """A task its allocation's end terminated: walltime if the task had used its own time limit, else lost.

        Lost, not walltime, when the task was within its own limit: it started too late in the allocation's life,
        nothing about it needs more time, and a walltime retry would ask for more than an allocation holds. Either
        way the runner's retries (``max_retries``) bound what follows.
        """
        spec = read_json(spec_path(self.state_dir, job_id)) or {}
        wall = status.get("wall_time_seconds")
        limit = spec.get("time_limit_seconds")
        ended = self.engine.walltime_endings()
        cause = (
            f"its packed allocation reached its walltime (Slurm job {', '.join(ended)} ended in TIMEOUT)"
            if ended
            else "its packed allocation ended (walltime, scancel or node failure)"
        )
        own_limit_used = wall is not None and limit is not None and wall >= limit
        return JobInfo(
            job_id=job_id,
            state=JobState.FAILED,
            exit_code=status.get("exit_code"),
            wall_time_seconds=wall,
            reason=(
                f"the packed task was terminated after {wall or 0:.0f} s because {cause}; "
                + (
                    "the task had used its own time limit"
                    if own_limit_used
                    else f"its own time limit ({limit} s) was not reached "
                    "(a retry, within max_retries, starts it in a new allocation)"
                )
            ),
            failure_kind=FailureKind.WALLTIME if own_limit_used else FailureKind.LOST,
        )

    def cancel(self, job_id: str) -> None:
        _check([job_id])
        status = read_json(status_path(self.state_dir, job_id))
        if status is not None and status.get("state") == "finished":
            return
        write_json_atomically(cancel_marker_path(self.state_dir, job_id), {"cancelled_at": time.time()})
        self.engine.cancel(job_id)

    def logs(self, job_id: str, *, tail_lines: int = 50) -> str:
        _check([job_id])
        return wrapper_job_logs(self.state_dir, job_id, what="packed task", tail_lines=tail_lines)

    def close(self) -> None:
        """Release the engine's allocations (the batch is over, or was cancelled)."""
        self.engine.shutdown()


def _check(job_ids: Sequence[str]) -> None:
    invalid = [job_id for job_id in job_ids if not JOB_ID_PATTERN.fullmatch(job_id)]
    if invalid:
        raise UnknownJobError(f"{invalid!r} are not packed task ids (32 hex digits)", job_ids=invalid)
