"""A real ``dagster-daemon`` over a demo world, shared by the tests of a module, and the helpers around it.

The daemon is expensive (a process, its code server, one run worker process per run), so a module starts one
and gives each test its own pipeline: a variant of the example pipeline under another name, applied to the
same ops-db (same grouping, same scans), with its own partitions, sensor and attempts. Waiting is on
conditions (ops-db rows, Dagster runs and ticks), never fixed sleeps; intervals are short through settings
(the pipeline sensors' interval) and the instance config (the run queue's dequeue interval).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import dagster as dg
import yaml
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_dagster.assets.factory import PIPELINE_TAG
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.enums import RunStatus
from ccat_dagster.pipelines.apply import apply_pipeline_spec
from ccat_dagster.pipelines.spec import load_pipeline_spec

from .dagster_fixtures import EXAMPLE, REPO, DemoWorld

T = TypeVar("T")

# The instance config of a daemon test: the run queue is read every second (default 5 s); at most 3 runs at a
# time (more only make the run workers' start-up compete for the 2 cores); a run whose launch timed out on a busy
# machine is launched again, as dagster.yaml has it in production.
FAST_RUN_QUEUE = (
    "run_coordinator:\n"
    "  module: dagster.core.run_coordinator\n"
    "  class: QueuedRunCoordinator\n"
    "  config:\n"
    "    dequeue_interval_seconds: 1\n"
    "    max_concurrent_runs: 3\n"
    "    max_user_code_failure_retries: 5\n"
    "    user_code_failure_retry_delay: 5\n"
)
# The pipeline sensors' least interval (the setting's minimum); Dagster's sensor loop runs every 5 s at most.
FAST_SENSOR_ENV = {"CCAT_WORKFLOW_MANAGER_SENSOR_INTERVAL_SECONDS": "1"}
WAIT_SECONDS = 300


def dagster_bin(name: str) -> str:
    """A console script of this virtualenv (``dagster``, ``dagster-daemon``, ``ccat-dagster``)."""
    return str(Path(sys.executable).with_name(name))


def write_variant(
    directory: Path, name: str, *, trigger: dict | None = None, steps: dict[str, dict] | None = None
) -> Path:
    """The example pipeline renamed to ``name``, with ``trigger`` and, per step name, keys to set."""
    document = yaml.safe_load(EXAMPLE.read_text())
    document["pipeline"] = name
    for step in document["steps"]:
        step["software"]["image_ref"] = str((EXAMPLE.parent / step["software"]["image_ref"]).resolve())
        step.update((steps or {}).get(step["name"], {}))
    if trigger is not None:
        document["trigger"] = trigger
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def apply_file(world: DemoWorld, path: Path) -> None:
    """``pipelines apply`` in process (the CLI itself is tested where the test is about it)."""
    engine = make_engine(world.ops_db_url)
    with Session(engine) as session, session.begin():
        apply_pipeline_spec(session, load_pipeline_spec(path), source_path=path)
    engine.dispose()


def run_cli(world: DemoWorld, *argv: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(argv),
        env={**os.environ, **world.env, "PYTHONPATH": str(REPO), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def completed_steps(url: str, pipeline: str) -> dict[str, int]:
    """COMPLETED attempts per step name of one pipeline."""
    engine = make_engine(url)
    with Session(engine) as session:
        rows = session.execute(
            select(m.ReductionStep.name, func.count())
            .join(m.ExecutedReductionStep.step)
            .join(m.ReductionStep.pipeline)
            .where(m.Pipeline.name == pipeline)
            .where(m.ExecutedReductionStep.status == RunStatus.COMPLETED)
            .group_by(m.ReductionStep.name)
        ).all()
    engine.dispose()
    return dict(rows)


def pipeline_runs(instance: dg.DagsterInstance, pipeline: str) -> list[dg.DagsterRun]:
    """The Dagster runs of one pipeline (by its tag), oldest first."""
    return list(reversed(instance.get_runs(filters=dg.RunsFilter(tags={PIPELINE_TAG: pipeline}))))


class Daemon:
    """``dagster sensor start`` for the named sensors, then ``dagster-daemon run``, on a world's instance."""

    def __init__(self, world: DemoWorld, directory: Path) -> None:
        self.world = world
        self.workspace = directory / "workspace.yaml"
        self.workspace.write_text(
            "load_from:\n  - python_module:\n      module_name: ccat_dagster.definitions\n      attribute: defs\n"
            f"      location_name: ccat_dagster\n      working_directory: {REPO}\n"
        )
        self.log = directory / "daemon.log"
        self.env = {**os.environ, **world.env, "PYTHONPATH": str(REPO), **FAST_SENSOR_ENV}
        self.process: subprocess.Popen | None = None
        self.instance = world.instance()

    def start(self, sensors: Iterable[str] | None = None) -> None:
        """Start ``sensors`` (one CLI call each: the command takes one name), or all of them in one call."""
        for name in sensors if sensors is not None else [None]:
            which = [name] if name is not None else ["--start-all"]
            started = subprocess.run(
                [dagster_bin("dagster"), "sensor", "start", *which, "-w", str(self.workspace)],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            assert started.returncode == 0, started.stdout + started.stderr
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [dagster_bin("dagster-daemon"), "run", "-w", str(self.workspace)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def tail(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""

    def wait_until(self, condition: Callable[[], T], what: str, *, timeout: float = WAIT_SECONDS) -> T:
        """Poll ``condition`` until it returns something truthy; fail with the daemon's log if it never does."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            assert self.process is not None and self.process.poll() is None, (
                f"dagster-daemon exited while waiting for {what}:\n{self.tail()}"
            )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.5)

    def sensor_ticks(self, sensor: str, *, after: float = 0.0) -> list:
        """The sensor's ticks (newest first) that started after the timestamp ``after``."""
        states = [s for s in self.instance.all_instigator_state() if s.instigator_name == sensor]
        ticks = []
        for state in states:
            ticks += self.instance.get_ticks(state.instigator_origin_id, state.selector_id, after=after, limit=50)
        return sorted(ticks, key=lambda tick: tick.timestamp, reverse=True)

    def stop(self) -> None:
        self.instance.dispose()
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
