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
"""

from __future__ import annotations

import logging
import shlex
import sys
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from ccat_dagster.execution.hpc.base import HpcError
from ccat_dagster.execution.hpc.packed.task import run_task

__all__ = ["PackedEngineMissing", "ParslEngine", "PilotEngine", "PilotSettings", "run_task"]

log = logging.getLogger(__name__)


class PackedEngineMissing(HpcError):
    """The packed execution mode needs its pilot-job engine, which is not installed here."""


@dataclass(frozen=True)
class PilotSettings:
    """How large and how long-lived the engine's Slurm allocations may be (see docs/configuration.md)."""

    max_allocations: int = 2
    cores_per_allocation: int = 2
    walltime_minutes: int = 60
    idle_seconds: int = 60
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


class ParslEngine(PilotEngine):
    """Parsl HighThroughputExecutor + SlurmProvider; one DataFlowKernel per engine, started on the first task."""

    def __init__(self, settings: PilotSettings) -> None:
        self.settings = settings
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._dfk = None
        self._app = None
        self._shape: tuple[int, float] | None = None
        self._allocations: set[str] = set()

    def _ensure_started(self, cpu: int, memory_gb: float) -> None:
        if self._dfk is not None:
            if self._shape != (cpu, memory_gb):
                raise HpcError(
                    f"a packed engine sizes its allocations for one task shape ({self._shape}); got cpu={cpu}, "
                    f"memory_gb={memory_gb}: run steps with different resources in different batches"
                )
            return
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
        cores = max(self.settings.cores_per_allocation, cpu)
        workers = max(1, cores // cpu)
        memory_mb = int(workers * memory_gb * 1024) + 256  # the workers' own processes need a little too
        hours, minutes = divmod(self.settings.walltime_minutes, 60)
        provider = SlurmProvider(
            partition=self.settings.partition or None,
            nodes_per_block=1,
            cores_per_node=cores,
            mem_per_node=None,
            init_blocks=0,
            min_blocks=0,
            max_blocks=self.settings.max_allocations,
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
        executor = HighThroughputExecutor(
            label="ccat_packed",
            address=self.settings.address or None,
            cores_per_worker=cpu,
            max_workers_per_node=workers,
            provider=provider,
            # Workers whose interchange is gone (the run worker was killed) end within ~25 s, and their
            # allocation with them; a heartbeat is a few bytes.
            heartbeat_period=5,
            heartbeat_threshold=20,
            interchange_launch_cmd=[sys.executable, "-m", "parsl.executors.high_throughput.interchange"],
            launch_cmd=DEFAULT_LAUNCH_CMD.replace(
                "process_worker_pool.py", f"{python} -m parsl.executors.high_throughput.process_worker_pool", 1
            ),
        )
        config = Config(
            executors=[executor],
            strategy="htex_auto_scale",
            max_idletime=float(self.settings.idle_seconds),
            run_dir=str(self.settings.run_dir),
            strategy_period=0.2,  # how soon a first allocation is asked for; squeue is polled on its own clock (60 s)
            initialize_logging=False,
            retries=0,
        )
        self._dfk = DataFlowKernel(config=config)  # not parsl.load: several engines may live in one process
        self._app = parsl.python_app(run_task, executors=["ccat_packed"], data_flow_kernel=self._dfk)
        self._shape = (cpu, memory_gb)

    def start(self, task_id: str, state_dir: Path, *, cpu: int, memory_gb: float) -> None:
        with self._lock:
            self._ensure_started(cpu, memory_gb)
            self._futures[task_id] = self._app(str(state_dir), task_id)

    def allocation_ids(self) -> list[str]:
        """The Slurm job ids of the allocations this engine asked for so far (running or ended)."""
        if self._dfk is None and not self._allocations:
            return []
        if self._dfk is not None:
            executor = self._dfk.executors["ccat_packed"]
            self._allocations.update(str(job_id) for job_id in executor.blocks_to_job_id.values())
        return sorted(self._allocations)

    def holds(self, task_id: str) -> bool:
        future = self._futures.get(task_id)
        return future is not None and not future.done()

    def cancel(self, task_id: str) -> None:
        # Parsl's app futures cannot be cancelled (NotImplementedError): the task's cancel marker, which the job
        # wrapper reads before it starts the payload and about once a second while it runs, ends it instead.
        self._futures.pop(task_id, None)

    def shutdown(self) -> None:
        with self._lock:
            if self._dfk is not None:
                self.allocation_ids()
                self._dfk.cleanup()  # cancels the blocks: scancel of every allocation
                self._dfk = None
