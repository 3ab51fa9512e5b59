"""A world for StepRunner tests: seeded PostgreSQL ops-db, real local staging, bubblewrap, a scripted step.

The step's software is a *software directory* holding ``bin/behave.py``; what the container does is chosen
by the step's config (``behaviour``, and ``fail_keys`` for the sub-groups that must fail), so each test
applies its own one-step pipeline and drives the real runner, backend and runtime through it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from ccat_dagster.demo.seed import PROCESSING_LOCATION, seed_demo
from ccat_dagster.execution.hpc.base import HpcBackend
from ccat_dagster.execution.hpc.local import LocalBackend
from ccat_dagster.execution.runner import RunnerConfig, StepRunner
from ccat_dagster.execution.runtimes import BubblewrapRuntime, ContainerRuntime
from ccat_dagster.execution.staging import LocalStager
from ccat_dagster.execution.step import StepDefinition
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.opsdb.migrate import upgrade
from ccat_dagster.pipelines.apply import apply_pipeline_spec
from ccat_dagster.pipelines.spec import parse_pipeline_spec

from .conftest import create_pg_database, drop_pg_database
from .dagster_fixtures import archived_example_scan_ids

# Runs inside the container (host /usr/bin/python3, standard library only). It times its own payload and
# prints it, so a benchmark can subtract the payload from the attempt's wall time.
BEHAVE = r"""
import json, os, signal, sys, time
t0 = time.time()
sys.dont_write_bytecode = True
manifest = json.load(open("/workflow/config/manifest.json"))
config = manifest["config"]
key = manifest["sub_group_key"]
out = os.environ["WORKFLOW_OUTPUT_DIR"]
behaviour = config.get("fail_behaviour", "exit3") if key in config.get("fail_keys", []) else config["behaviour"]
counter = os.path.join("/workflow/workspace", manifest["step"], "runs.txt")
runs = (int(open(counter).read()) if os.path.exists(counter) else 0) + 1
open(counter, "w").write(str(runs))
print(f"behave: {behaviour} for {key}, run {runs}", flush=True)
product_dir = os.path.join(out, "science") if out.rstrip("/") == "/workflow/output" else out


def product():
    os.makedirs(product_dir, exist_ok=True)
    with open(os.path.join(product_dir, "result.txt"), "w") as f:
        f.write(f"{key} {len(manifest['inputs'])} inputs\n")


if behaviour == "ok":
    held = bytearray(int(config.get("allocate_mb", 0)) * 2**20)  # noqa: F841 - held for the memory sampler
    time.sleep(float(config.get("hold_seconds", 0)))
    product()
elif behaviour == "sleep":
    time.sleep(float(config.get("seconds", 3)))
    product()
elif behaviour == "write_input":
    product()
    name = manifest["inputs"][0]["path"]
    open(name, "a").write("corrupted")
elif behaviour == "write_root":
    product()
    open("/workflow/sneaky.txt", "w").write("outside")
elif behaviour == "symlink_out":
    product()
    os.symlink("/workflow/config/manifest.json", os.path.join(product_dir, "manifest-link.json"))
elif behaviour == "fifo":
    product()
    os.mkfifo(os.path.join(product_dir, "pipe"))
elif behaviour == "empty":
    pass
elif behaviour == "many":
    os.makedirs(product_dir, exist_ok=True)
    for i in range(int(config["files"])):
        open(os.path.join(product_dir, f"part-{i}.txt"), "w").write(str(i))
elif behaviour == "exit3":
    for i in range(40):
        print(f"progress line {i}", flush=True)
    print("FATAL: calibration diverged", file=sys.stderr, flush=True)
    sys.exit(3)
elif behaviour == "sigkill":
    print("allocating a very large cube", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
elif behaviour == "oom_once":
    if runs == 1:
        print("allocating a very large cube", flush=True)
        sys.exit(137)
    product()
elif behaviour == "timeout_once":
    if runs == 1:
        time.sleep(3600)
    product()
else:
    sys.exit(f"unknown behaviour {behaviour}")
print(f"behave: payload_seconds={time.time() - t0:.6f}", flush=True)
"""

STEP = "reduce"


@dataclass
class RunnerWorld:
    url: str
    engine: Engine
    data_dir: Path
    software_dir: Path
    base_dir: Path
    processing_location_id: int
    scan_keys: list[str]
    reports: list[str] = field(default_factory=list)

    @property
    def processing_dir(self) -> Path:
        return self.data_dir / "processing"

    def apply(
        self,
        *,
        behaviour: str,
        resources: dict[str, Any] | None = None,
        max_retries: int = 0,
        extra_config: dict[str, Any] | None = None,
        software: dict[str, Any] | None = None,
    ) -> str:
        """Apply a one-step (final) pipeline, per executed_obs_unit, whose container does ``behaviour``."""
        name = f"t_{behaviour}_{uuid.uuid4().hex[:8]}"
        spec = parse_pipeline_spec(
            {
                "pipeline": name,
                "processing_location": PROCESSING_LOCATION,
                "trigger": {"type": "continuous"},
                "grouping": {
                    "name": f"{name}-grouping",
                    "instrument_module": "LFA",
                    "rules": [
                        {"table": "Source", "column": "name", "operator": "eq", "value": "NGC253"},
                        {"table": "ObsUnit", "column": "line_id", "operator": "eq", "value": "CO43"},
                    ],
                },
                "steps": [
                    {
                        "name": STEP,
                        "software": {
                            "name": "behave",
                            "version": "1.0.0",
                            "image_ref": str(self.software_dir),
                            "entrypoint": ["/usr/bin/python3", "/opt/software/bin/behave.py"],
                            **(software or {}),
                        },
                        "config": {"behaviour": behaviour, **(extra_config or {})},
                        "group_by": ["executed_obs_unit"],
                        "resources": {"cpu": 1, "memory_gb": 1, "time_hours": 1},
                        "max_retries": max_retries,
                    }
                ],
            }
        )
        with Session(self.engine) as session, session.begin():
            apply_pipeline_spec(session, spec)
            if resources is not None:
                # Below what a pipeline file accepts (seconds-long time limits), so set on the row directly.
                step = session.scalars(select(m.ReductionStep).join(m.Pipeline).where(m.Pipeline.name == name)).one()
                step.resources = {**step.resources, **resources}
        return name

    def runner(
        self,
        backend: HpcBackend | None = None,
        *,
        runtime: ContainerRuntime | None = None,
        backend_for_step: Callable[[StepDefinition], HpcBackend | None] | None = None,
        **config: Any,
    ) -> StepRunner:
        """A runner on this world; ``backend_for_step`` is the per-step backend choice (packed execution)."""
        return StepRunner(
            engine=self.engine,
            backend=backend or self.local_backend(),
            runtime=runtime or BubblewrapRuntime(),
            stager=LocalStager(),
            config=RunnerConfig(
                pipeline_base_dir=self.base_dir,
                processing_location_id=self.processing_location_id,
                sif_cache_dir=self.data_dir / "sif-cache",
                **{"poll_interval_seconds": 0.2, **config},
            ),
            report=self.reports.append,
            **({"backend_for_step": backend_for_step} if backend_for_step is not None else {}),
        )

    def local_backend(self) -> LocalBackend:
        return LocalBackend(state_dir=self.base_dir / ".local-jobs", max_concurrent_jobs=2, kill_grace_seconds=2)

    def attempts(self, pipeline: str, key: str | None = None) -> list[m.ExecutedReductionStep]:
        """The step's attempts (oldest first) with their transitions loaded, detached from any session."""
        return pipeline_attempts(self.engine, pipeline, key=key)

    def registered_counts(self, attempt_ids: list[int]) -> dict[str, int]:
        """DataProduct rows of these attempts, their PhysicalCopy rows, and the attempts' input-lineage rows
        (written once when an attempt is created, whatever its outcome)."""
        with Session(self.engine) as session:
            products = select(m.DataProduct.id).where(m.DataProduct.executed_reduction_step_id.in_(attempt_ids))
            lineage = m.run_input_package.c.executed_reduction_step_id.in_(attempt_ids)
            return {
                "products": session.scalar(select(func.count()).select_from(products.subquery())) or 0,
                "copies": session.scalar(
                    select(func.count()).select_from(m.PhysicalCopy).where(m.PhysicalCopy.data_product_id.in_(products))
                )
                or 0,
                "input_lineage": session.scalar(select(func.count()).select_from(m.run_input_package).where(lineage))
                or 0,
            }

    def staged_snapshot(self) -> dict[str, tuple[int, float]]:
        """Every staged raw file of the processing location: relative path → (size, mtime)."""
        root = self.processing_dir
        return {
            str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime)
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_relative_to(self.base_dir)
        }


def pipeline_attempts(
    engine: Engine,
    pipeline: str,
    *,
    step: str | None = None,
    key: str | None = None,
    with_transitions: bool = True,
) -> list[m.ExecutedReductionStep]:
    """A pipeline's attempts (of one step, of one sub-group), oldest first, detached from any session (with their
    transitions loaded unless told not to): the step runner tests and the fault suite read ops-db through this."""
    with Session(engine, expire_on_commit=False) as session:
        query = (
            select(m.ExecutedReductionStep)
            .join(m.ReductionStep)
            .join(m.Pipeline)
            .where(m.Pipeline.name == pipeline)
            .order_by(m.ExecutedReductionStep.id)
        )
        if step is not None:
            query = query.where(m.ReductionStep.name == step)
        if key is not None:
            query = query.where(m.ExecutedReductionStep.sub_group_key == key)
        rows = session.scalars(query).all()
        for row in rows if with_transitions else ():
            _ = list(row.transitions)
        session.expunge_all()
        return list(rows)


def make_runner_world(tmp_path: Path, *, scans: int = 12) -> RunnerWorld:
    url = create_pg_database("ccat_test_runner")
    upgrade(url)
    data_dir = tmp_path / "data"
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        seed_demo(session, data_dir=data_dir, scans=scans)
        location_id = session.scalar(select(m.DataLocation.id).where(m.DataLocation.name == PROCESSING_LOCATION))
        eous = archived_example_scan_ids(session)
    software_dir = tmp_path / "behave-software"
    (software_dir / "bin").mkdir(parents=True)
    (software_dir / "bin" / "behave.py").write_text(BEHAVE)
    return RunnerWorld(
        url=url,
        engine=engine,
        data_dir=data_dir,
        software_dir=software_dir,
        base_dir=data_dir / "processing" / "pipelines",
        processing_location_id=location_id,
        scan_keys=sorted(f"executed_obs_unit={eou}" for eou in set(eous)),
    )


def dispose_runner_world(world: RunnerWorld) -> None:
    world.engine.dispose()
    drop_pg_database(world.url)


def wait_until(predicate: Callable[[], Any], *, what: str, seconds: float = 60, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; a bound on a broken test, not a timing check."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(interval)


def processes_mentioning(text: str) -> list[int]:
    """Pids of the processes whose command line contains ``text`` (e.g. an attempt directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def run_in_thread(runner: StepRunner, *, pipeline: str, keys: list[str], run_id: str, step: str = STEP):
    """Start ``runner.run`` for ``keys`` in a daemon thread; returns the thread and the list its outcomes fill."""
    import threading

    outcomes: list = []
    thread = threading.Thread(
        target=lambda: outcomes.extend(
            runner.run(pipeline_name=pipeline, step_name=step, sub_group_keys=keys, dagster_run_id=run_id)
        ),
        daemon=True,
    )
    thread.start()
    return thread, outcomes
