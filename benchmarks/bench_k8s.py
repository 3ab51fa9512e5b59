"""The Kubernetes backend's own costs, measured against the local HTTP stand-in of the API (tests/k8s_standin.py).

No cluster runs here, so these are the orchestrator's side only: what a real API server adds (its latency, its
list cost for many Jobs) is not in them. Measured:

- importing the official client and building the backend, in a fresh process (what every Dagster run worker
  with HPC_BACKEND=kubernetes pays once);
- ``submit_many`` of N Jobs (one create call each: manifest construction, JSON, HTTP);
- one ``status_many`` poll of N active Jobs (one list of Jobs and one of pods per 100 Jobs, then the parsing).

Run:  .venv/bin/python benchmarks/bench_k8s.py [--repeat 5] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_common import write_section  # noqa: E402

from ccat_dagster.execution.hpc.base import JobResources, JobSpec  # noqa: E402
from ccat_dagster.execution.hpc.kubernetes.backend import KubernetesBackend  # noqa: E402
from ccat_dagster.execution.hpc.kubernetes.config import KubernetesConfig, parse_volume_specs  # noqa: E402
from ccat_dagster.execution.hpc.kubernetes.connect import api_client, kubernetes_client  # noqa: E402
from tests.k8s_standin import KubernetesStandIn  # noqa: E402

SECTION = "## Kubernetes backend, against the local API stand-in"
SIZES = (10, 100, 500)
IMPORT_PROBE = """
import time
t0 = time.perf_counter()
from ccat_dagster.execution.hpc.kubernetes.connect import api_client, kubernetes_client
kubernetes_client(api_client(auth="kubeconfig", kubeconfig={kubeconfig!r}))
print(time.perf_counter() - t0)
"""


def _spec(base: Path, attempt: int) -> JobSpec:
    return JobSpec(
        command=["/bin/true"],
        resources=JobResources(cpu=2, memory_gb=8, time_hours=2),
        env={},
        job_name=f"ccat-bench-reduce-{attempt}-0a1b2c3d",
        log_dir=base / "bench" / f"executed_obs_unit={attempt}" / "attempts" / "reduce" / str(attempt) / "logs",
    )


def _median(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms (min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp, KubernetesStandIn(execute=False) as standin:
        base = Path(tmp)
        kubeconfig = standin.kubeconfig(base / "kubeconfig")
        imports = [
            float(
                subprocess.run(
                    [sys.executable, "-c", IMPORT_PROBE.format(kubeconfig=str(kubeconfig))],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=REPO,
                ).stdout
            )
            for _ in range(args.repeat)
        ]
        rows.append(("import the client and build the backend (fresh process)", _median(imports)))
        config = KubernetesConfig(
            namespace="ccat", job_image="runner:1", volumes=parse_volume_specs(f"host:{base}:{base}")
        )
        for size in SIZES:
            submits, polls = [], []
            for repeat in range(args.repeat):
                standin.jobs.clear()
                standin.pods.clear()
                backend = KubernetesBackend(
                    config=config, client=kubernetes_client(api_client(auth="kubeconfig", kubeconfig=str(kubeconfig)))
                )
                specs = [_spec(base, repeat * 10_000 + n) for n in range(size)]
                began = time.perf_counter()
                ids = backend.submit_many(specs)
                submits.append(time.perf_counter() - began)
                backend.status_many(ids)  # the first poll also asks for pod metrics once (absent here)
                began = time.perf_counter()
                infos = backend.status_many(ids)
                polls.append(time.perf_counter() - began)
                assert len(infos) == size
            rows.append((f"`submit_many` of {size} Jobs", _median(submits)))
            rows.append((f"one `status_many` poll of {size} Jobs", _median(polls)))
    load_after = os.getloadavg()
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    from bench_common import machine

    table = "\n".join(["| measurement | median (min, max) |", "|---|---:|"] + [f"| {a} | {b} |" for a, b in rows])
    report = (
        f"{SECTION}\n\n"
        f"Run on {now} with `.venv/bin/python benchmarks/bench_k8s.py --repeat {args.repeat} --write-docs` "
        f"(load average before / after: {' '.join(f'{x:.2f}' for x in load_before)} / "
        f"{' '.join(f'{x:.2f}' for x in load_after)}).\n\n{machine()}\n\n{table}\n\n"
        "Notes:\n"
        "- The stand-in answers from memory on 127.0.0.1: these are the orchestrator's costs (manifest, JSON, the "
        "official client's HTTP and model handling, parsing), not a cluster's. A real API server adds its latency "
        "per create and the cost of listing many Jobs and pods.\n"
        "- A poll is two list calls per 100 Jobs (selected by name, so other runs' Jobs and the finished ones "
        "Kubernetes keeps are not in the answers), not a call per job.\n"
        "- The client import is paid once per process that builds the backend (each Dagster run worker with "
        "`HPC_BACKEND=kubernetes`); the other backends do not import it. Most of it is the package importing "
        "all of its API and model classes (pydantic models since release 37; release 36 took as long here).\n"
    )
    print(report)
    if args.write_docs:
        write_section(SECTION, report)


if __name__ == "__main__":
    main()
