"""The pilot-job engine behind the packed backend: what it must do, and Parsl's HighThroughputExecutor doing it.

``PilotEngine`` is the seam: start a task (an argument list) somewhere inside the engine's allocations, say
whether this engine still holds a task, cancel it, shut down (releasing every allocation). The engine's memory
is never the record of a task: each task is the local backend's job wrapper, which writes the task's status
(exit code, wall time, peak memory, the evidence of its failure kind) into the task's state directory on the
shared file system. An engine that is gone (the run worker killed) only means that the tasks it had not
finished are lost.

``ParslEngine`` runs the tasks as Parsl apps on a HighThroughputExecutor whose blocks are Slurm allocations
(``SlurmProvider``): at most ``max_allocations`` blocks of one node each, ``cores_per_allocation`` cores and
``memory_gb`` per task-sized worker, each for ``walltime_minutes``, released after ``idle_seconds`` without
work and at shutdown. Parsl is imported on first use only: a site without it gets ``PackedEngineMissing``
naming the extra (``pip install 'ccat-dagster[packed]'``) when a step asks for packing, and nothing else
changes for it.

Two bounds are the engine's own, on top of Parsl's scaling:

- Parsl's HTEX scale-in, asked to release 0 blocks "idle longer than max_idletime", releases every block
  whose workers have not connected yet (a block without workers counts as idle forever), and the next
  strategy tick asks for a new one: whenever a batch had fewer queued tasks than one block's workers, it
  asked for and cancelled an allocation about every two strategy periods, for as long as the batch lived
  (seen after an allocation's walltime ended a task: dozens of allocations a minute). A scale-in of
  nothing now releases nothing.
- ``allocations_per_batch`` bounds the allocations one engine ever asks for, replacements of ended ones
  included. Once they are all spent and none is alive, a queued task can never run: the engine lets it go
  (``holds`` is False, ``lost_reason`` says why) and refuses new tasks, so the runner fails them (lost,
  retried within ``max_retries``; a retry is then refused) instead of waiting for an allocation that will
  never be asked for. Shutdown scancels, after Parsl's own clean-up, any allocation of the engine that Slurm
  still lists.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from ccat_dagster.execution.hpc.base import HpcError
from ccat_dagster.execution.hpc.packed.task import run_task

__all__ = ["PackedEngineMissing", "ParslEngine", "PilotEngine", "PilotSettings", "run_task"]

log = logging.getLogger(__name__)

# An allocation's --mem beyond what its tasks ask for: Parsl's manager process, and per worker the worker process
# and its launcher (resident sizes measured on this machine, with room to spare).
ALLOCATION_BASE_MB = 256
WORKER_OVERHEAD_MB = 160


class PackedEngineMissing(HpcError):
    """The packed execution mode needs its pilot-job engine, which is not installed here."""


@dataclass(frozen=True)
class PilotSettings:
    """How large and how long-lived the engine's Slurm allocations may be (see docs/configuration.md)."""

    max_allocations: int = 2
    allocations_per_batch: int = 10
    """All the allocations one engine (one batch) may ask for, at once or one after another."""
    cores_per_allocation: int = 2
    walltime_minutes: int = 60
    idle_seconds: int = 60
    status_poll_seconds: int = 60
    """How often Parsl asks Slurm about the allocations (how soon an ended one is replaced); Parsl's own default."""
    partition: str = ""
    address: str = ""
    """The address the allocations reach the run worker's interchange at (empty: Parsl picks one)."""
    run_dir: Path = Path(".")
    worker_init: str = ""
    """Shell lines run in the allocation before the workers start (e.g. activating the site's environment)."""


class PilotEngine(ABC):
    @abstractmethod
    def start(self, task_id: str, state_dir: Path, *, cpu: int, memory_gb: float) -> None:
        """Queue ``run_task(state_dir, task_id)`` (the job wrapper on the task's spec) as one task of ``cpu``
        cores and ``memory_gb``; raises HpcError when it cannot."""

    @abstractmethod
    def holds(self, task_id: str) -> bool:
        """True while this engine has the task queued or running (False: finished, or never this engine's)."""

    @abstractmethod
    def cancel(self, task_id: str) -> None:
        """Forget the task (its cancel marker, written first by the backend, is what ends it)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop taking tasks and release every allocation."""

    def warm_up(self, *, cpu: int, memory_gb: float) -> None:  # noqa: B027 - optional: an engine may start lazily
        """Start now for tasks of this shape and ask for a first allocation, before any task is queued."""

    def lost_reason(self, task_id: str) -> str | None:
        """Why the engine let go of a task it never finished (None: no reason known beyond its record)."""
        return None

    def walltime_endings(self) -> list[str]:
        """The allocations of this engine that Slurm ended at their walltime (their job ids)."""
        return []


@dataclass
class _Shape:
    """The executor (its own Slurm allocations) and the app of the tasks of one (cpu, memory_gb)."""

    label: str
    executor: object
    app: object


class ParslEngine(PilotEngine):
    """Parsl HighThroughputExecutor + SlurmProvider; one DataFlowKernel per engine, started on the first task.

    Allocations are sized for one task shape (cores and memory per worker). A task of another shape (the retry
    of an out-of-memory task asks for more) gets an executor of its own in the same DataFlowKernel, with
    allocations sized for it, at most one at a time.
    """

    def __init__(self, settings: PilotSettings) -> None:
        self.settings = settings
        self._futures: dict[str, Future] = {}
        self._task_shape: dict[str, _Shape] = {}
        self._lock = threading.Lock()
        self._dfk = None
        self._shapes: dict[tuple[int, float], _Shape] = {}
        self._allocations: set[str] = set()

    def _ensure_started(self, cpu: int, memory_gb: float, *, first_allocation_now: bool = False) -> _Shape:
        shape = self._shapes.get((cpu, memory_gb))
        if shape is not None:
            return shape
        try:
            import parsl
            from parsl.config import Config
            from parsl.dataflow.dflow import DataFlowKernel
            from parsl.executors import HighThroughputExecutor
            from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD
            from parsl.launchers import SingleNodeLauncher
            from parsl.providers import SlurmProvider
        except ImportError as error:
            raise PackedEngineMissing(
                f"packed execution needs Parsl ({error}): install it with pip install 'ccat-dagster[packed]', or "
                "give the step execution: {mode: job_per_sub_group}"
            ) from None
        first = not self._shapes
        cores = max(self.settings.cores_per_allocation, cpu)
        workers = max(1, cores // cpu)
        # Parsl's manager and each worker are Python processes of ~80-100 MB resident, each worker's wrapper
        # launcher ~15 MB: what the tasks may use comes on top of that.
        memory_mb = int(workers * memory_gb * 1024) + ALLOCATION_BASE_MB + workers * WORKER_OVERHEAD_MB
        hours, minutes = divmod(self.settings.walltime_minutes, 60)
        provider = polled_provider_class(SlurmProvider, self.settings.status_poll_seconds)(
            partition=self.settings.partition or None,
            nodes_per_block=1,
            cores_per_node=cores,
            mem_per_node=None,
            init_blocks=1 if first_allocation_now else 0,
            min_blocks=0,
            # A further shape is the odd retry: one allocation of it at a time.
            max_blocks=self.settings.max_allocations if first else 1,
            walltime=f"{hours:02d}:{minutes:02d}:00",
            exclusive=False,
            scheduler_options=f"#SBATCH --mem={memory_mb}M",
            worker_init=self.settings.worker_init,
            launcher=SingleNodeLauncher(),
            cmd_timeout=60,
        )
        # Interchange and workers run by this interpreter, not found on PATH (a run worker's PATH may lack the
        # venv); the allocation inherits this process's environment, as sbatch does by default.
        python = shlex.quote(sys.executable)
        label = "ccat_packed" if first else f"ccat_packed_{len(self._shapes)}"
        executor = bounded_executor_class(HighThroughputExecutor)(
            allocations_per_batch=self.settings.allocations_per_batch,
            label=label,
            address=self.settings.address or None,
            cores_per_worker=cpu,
            max_workers_per_node=workers,
            provider=provider,
            # Workers whose interchange is gone (the run worker was killed) end within ~25 s, and their
            # allocation with them; a heartbeat is a few bytes.
            heartbeat_period=5,
            heartbeat_threshold=20,
            # Parsl's default handler puts the executor in a bad state (every task failed, none ever run again)
            # once its allocations have all failed, here after the first one ended badly. An allocation that
            # dies costs its running tasks (lost, retried by the runner); allocations_per_batch bounds the rest.
            block_error_handler=False,
            interchange_launch_cmd=[sys.executable, "-m", "parsl.executors.high_throughput.interchange"],
            launch_cmd=DEFAULT_LAUNCH_CMD.replace(
                "process_worker_pool.py", f"{python} -m parsl.executors.high_throughput.process_worker_pool", 1
            ),
        )
        if first:
            config = Config(
                executors=[executor],
                strategy="htex_auto_scale",
                max_idletime=float(self.settings.idle_seconds),
                run_dir=str(self.settings.run_dir),
                # How soon an allocation is asked for; squeue is polled on its own clock (status_poll_seconds).
                strategy_period=0.2,
                initialize_logging=False,
                retries=0,
            )
            self._dfk = DataFlowKernel(config=config)  # not parsl.load: several engines may live in one process
        else:
            log.info("packed batch: tasks of cpu=%s memory_gb=%s get allocations of their own", cpu, memory_gb)
            self._dfk.add_executors([executor])  # type: ignore[attr-defined]
        shape = _Shape(label, executor, parsl.python_app(run_task, executors=[label], data_flow_kernel=self._dfk))
        self._shapes[(cpu, memory_gb)] = shape
        return shape

    def warm_up(self, *, cpu: int, memory_gb: float) -> None:
        # The DataFlowKernel's start (~1-2 s) overlaps the staging. Its first allocation is still asked for by the
        # strategy once tasks are queued (0.2 s later): an initial block, counted against allocations_per_batch
        # before its status was known, made a batch whose allocation ended under it give up too early.
        with self._lock:
            if not self._shapes:
                self._ensure_started(cpu, memory_gb)

    def start(self, task_id: str, state_dir: Path, *, cpu: int, memory_gb: float) -> None:
        with self._lock:
            shape = self._ensure_started(cpu, memory_gb)
            if self._stranded(shape):
                raise HpcError(self._spent_message(shape))
            self._futures[task_id] = shape.app(str(state_dir), task_id)  # type: ignore[operator]
            self._task_shape[task_id] = shape

    def allocation_ids(self) -> list[str]:
        """The Slurm job ids of the allocations this engine asked for so far (running or ended)."""
        if self._dfk is not None:
            for shape in self._shapes.values():
                self._allocations.update(str(job_id) for job_id in shape.executor.blocks_to_job_id.values())  # type: ignore[attr-defined]
        return sorted(self._allocations)

    def holds(self, task_id: str) -> bool:
        future = self._futures.get(task_id)
        return future is not None and not future.done() and not self._stranded(self._task_shape.get(task_id))

    def lost_reason(self, task_id: str) -> str | None:
        future = self._futures.get(task_id)
        shape = self._task_shape.get(task_id)
        if future is not None and not future.done() and self._stranded(shape):
            return self._spent_message(shape)
        return None

    def walltime_endings(self) -> list[str]:
        # Asked of Slurm's accounting, not of Parsl: HTEX reports an ended block whose workers are gone as
        # MISSING, whatever ended it. One sacct call, made only when a task was terminated from outside.
        job_ids = self.allocation_ids()
        if not job_ids:
            return []
        try:
            out = subprocess.run(
                [
                    "sacct",
                    "--noheader",
                    "--allocations",
                    "--parsable2",
                    "--format=JobID,State",
                    f"--jobs={','.join(job_ids)}",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return []
        rows = (line.split("|") for line in out.splitlines() if "|" in line)
        return sorted(job_id for job_id, state, *_ in rows if state.startswith("TIMEOUT"))

    def _stranded(self, shape: _Shape | None) -> bool:
        """All allocations the shape may ask for spent and none alive: nothing queued of it can ever run."""
        executor = shape.executor if shape is not None else None
        if executor is None or executor.launched < self.settings.allocations_per_batch:  # type: ignore[attr-defined]
            return False
        try:
            statuses = list(executor.status_facade.values())  # type: ignore[attr-defined]
        except RuntimeError:  # Parsl's poller thread updated the statuses meanwhile: ask again next time
            return False
        # No status yet (a block just asked for, not polled): it may well come up, so the shape is not stranded.
        return bool(statuses) and all(status.terminal for status in statuses)

    def _spent_message(self, shape: _Shape | None) -> str:
        return (
            f"the packed batch has used all {self.settings.allocations_per_batch} Slurm allocations it may ask "
            f"for (PACKED_ALLOCATIONS_PER_BATCH, per task shape; allocations {', '.join(self.allocation_ids())}) "
            "and none is alive: the task cannot run in this batch"
        )

    def cancel(self, task_id: str) -> None:
        # Parsl's app futures cannot be cancelled (NotImplementedError): the task's cancel marker, which the job
        # wrapper reads before it starts the payload and about once a second while it runs, ends it instead.
        self._futures.pop(task_id, None)

    def shutdown(self) -> None:
        with self._lock:
            if self._dfk is not None:
                self.allocation_ids()
                try:
                    self._dfk.cleanup()  # cancels the blocks of every executor: scancel of every allocation
                finally:
                    self._dfk = None
                    self._shapes.clear()
                    # Whatever cleanup missed (a block Parsl had already written off, a failed scancel): the
                    # batch is over, none of its allocations may outlive it.
                    release_allocations(self.allocation_ids())


def release_allocations(job_ids: Sequence[str]) -> None:
    """scancel the allocations among ``job_ids`` that Slurm still has (one squeue, one scancel)."""
    if not job_ids:
        return
    try:
        listed = subprocess.run(
            ["squeue", "--noheader", "--format=%i", f"--jobs={','.join(job_ids)}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout.split()
        if listed:
            log.warning("packed allocations %s outlived their engine's shutdown: cancelling them", listed)
            subprocess.run(["scancel", *listed], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("could not make sure the packed allocations %s are released: %s", list(job_ids), error)


def polled_provider_class(base: type, seconds: int) -> type:
    """``base`` (Parsl's SlurmProvider) asking Slurm about its blocks every ``seconds`` (its public property)."""

    class PolledSlurmProvider(base):
        @property
        def status_polling_interval(self) -> int:
            return seconds

    return PolledSlurmProvider


def bounded_executor_class(base: type) -> type:
    """``base`` (Parsl's HighThroughputExecutor) with the engine's two bounds on its scaling.

    Only public methods are overridden (``scale_out_facade``, which the strategy calls to ask for blocks, and
    ``scale_in``); ``tests/test_packed_parsl_canary.py`` pins the Parsl behaviour each works around.
    """

    class BoundedHighThroughputExecutor(base):
        def __init__(self, *, allocations_per_batch: int, **kwargs) -> None:
            super().__init__(**kwargs)
            self.allocations_per_batch = allocations_per_batch
            self.launched = 0
            self._told_spent = False

        def scale_out_facade(self, n: int) -> list[str]:
            allowed = max(0, min(n, self.allocations_per_batch - self.launched))
            if allowed < n and not self._told_spent:
                self._told_spent = True
                log.warning(
                    "packed batch: all %d allocations it may ask for are used; no more are asked for",
                    self.allocations_per_batch,
                )
            if allowed <= 0:
                return []
            self.launched += allowed  # a block whose sbatch failed counts too: it was asked for
            return super().scale_out_facade(allowed)

        def scale_in(self, blocks: int, max_idletime: float | None = None) -> list[str]:
            if blocks <= 0:
                return []  # Parsl would release every block whose workers have not connected yet
            return super().scale_in(blocks, max_idletime=max_idletime)

    return BoundedHighThroughputExecutor
