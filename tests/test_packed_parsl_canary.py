"""Canary: the Parsl behaviour the packed engine's bounded executor works around, pinned without Slurm.

Parsl's HighThroughputExecutor, asked by its htex_auto_scale strategy to scale in 0 blocks idle longer than
max_idletime (which it does whenever fewer tasks are queued than one block has workers), releases every block
whose workers have not connected yet: a block without managers counts as idle forever. The strategy then asks
for a new block, and the cycle repeats for as long as the batch lives. ``bounded_executor_class`` makes a
scale-in of nothing release nothing and caps the blocks one executor ever asks for. If Parsl changes either
behaviour, these tests say so (the workaround may then go, or need changing).
"""

from __future__ import annotations

import pytest

parsl = pytest.importorskip("parsl")

from parsl.executors import HighThroughputExecutor  # noqa: E402
from parsl.jobs.states import JobState, JobStatus  # noqa: E402
from parsl.providers import LocalProvider  # noqa: E402

from ccat_dagster.execution.hpc.packed.engine import bounded_executor_class  # noqa: E402


class CountingProvider(LocalProvider):
    """Submits nothing: hands out job ids and records what was cancelled."""

    def __init__(self) -> None:
        super().__init__(init_blocks=0, min_blocks=0, max_blocks=1)
        self.submitted: list[str] = []
        self.cancelled: list[str] = []

    def submit(self, command, tasks_per_node, job_name="parsl.localprovider"):
        job_id = str(1000 + len(self.submitted))
        self.submitted.append(job_id)
        return job_id

    def cancel(self, job_ids):
        self.cancelled.extend(job_ids)
        return [True for _ in job_ids]


def executor(cls, **kwargs):
    """An executor not started (no interchange): its view of the workers is that none has connected."""
    provider = CountingProvider()
    made = cls(label="canary", provider=provider, **kwargs)
    made.connected_managers = lambda: []
    made._hold_block = lambda block_id: None
    made._get_launch_command = lambda block_id: "true"
    return made, provider


def pending_block(made) -> None:
    made.scale_out_facade(1)
    for block_id in made.blocks_to_job_id:
        assert made.status_facade[block_id].state is JobState.PENDING


def test_parsl_scale_in_of_zero_idle_blocks_releases_a_block_still_waiting_for_its_workers():
    made, provider = executor(HighThroughputExecutor)
    pending_block(made)
    assert made.scale_in(0, max_idletime=30.0) == ["0"]  # the behaviour worked around: a 0 that kills
    assert provider.cancelled == provider.submitted


def test_the_bounded_executor_releases_nothing_when_asked_to_release_nothing():
    made, provider = executor(bounded_executor_class(HighThroughputExecutor), allocations_per_batch=5)
    pending_block(made)
    assert made.scale_in(0, max_idletime=30.0) == []
    assert provider.cancelled == []
    made._status["0"] = JobStatus(JobState.RUNNING)
    assert made.scale_in(1, max_idletime=30.0) == ["0"]  # a real scale-in still releases an idle block


def test_the_bounded_executor_never_asks_for_more_blocks_than_its_batch_may_have():
    made, provider = executor(bounded_executor_class(HighThroughputExecutor), allocations_per_batch=3)
    asked = [made.scale_out_facade(2) for _ in range(4)]
    assert [len(ids) for ids in asked] == [2, 1, 0, 0]
    assert len(provider.submitted) == 3 and made.launched == 3
