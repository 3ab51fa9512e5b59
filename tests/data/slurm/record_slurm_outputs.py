"""Record real squeue / sacct / scontrol / jobcomp output for tests/test_slurm_parsing.py.

Run on a machine with the single-node Slurm of scripts/slurm-single-node.sh (takes about 90 s,
the time-limit job dominates):

    .venv/bin/python tests/data/slurm/record_slurm_outputs.py

Jobs are submitted through SlurmBackend (so the scripts are the real ones) and the queries are the
exact argument lists the backend runs (job_status.*_command). Writes into this directory:
jobs.json (scenario -> job id), sacct_just_submitted.txt, squeue_active.txt, squeue_completing.txt
(if caught), sacct_active.txt, sacct_finished.txt, scontrol_show_job.txt, jobcomp.txt,
sbatch_parsable.txt, and the stderr of sacct on a cluster without accounting and of squeue for an
unknown job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ccat_dagster.execution.hpc.base import JobResources, JobSpec
from ccat_dagster.execution.hpc.slurm.backend import SlurmBackend
from ccat_dagster.execution.hpc.slurm.job_status import (
    sacct_command,
    scontrol_show_jobs_command,
    squeue_command,
)

HERE = Path(__file__).resolve().parent
ONE_MINUTE = JobResources(cpu=1, memory_gb=1, time_hours=1 / 60)


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="ccat-slurm-record-"))
    backend = SlurmBackend()
    delayed = SlurmBackend(extra_sbatch_args=["--begin=now+600"])

    def spec(name: str, command: list[str], resources: JobResources = ONE_MINUTE) -> JobSpec:
        return JobSpec(
            command=command,
            resources=resources,
            env={"CCAT_SCENARIO": name},
            job_name=name,
            log_dir=work / name,
            pre_walltime_signal_seconds=20,
        )

    jobs: dict[str, str] = {}
    # The time-limit job first: it needs 60 s + up to 30 s (slurmctld checks limits every 30 s).
    jobs["timeout"] = backend.submit(
        spec("timeout", ["bash", "-c", 'trap "echo got TERM" TERM; while true; do sleep 1; done'])
    )
    jobs["cancelled_running"] = backend.submit(spec("cancelled_running", ["sleep", "300"]))
    jobs["completed"] = backend.submit(
        spec("completed", ["python3", "-c", "import time; x = bytearray(200 * 2**20); time.sleep(3); print('done')"])
    )
    jobs["failed_exit_3"] = backend.submit(spec("failed_exit_3", ["bash", "-c", "echo failing >&2; exit 3"]))
    jobs["killed_signal_9"] = backend.submit(spec("killed_signal_9", ["bash", "-c", "sleep 1; kill -9 $$"]))
    jobs["out_of_memory"] = backend.submit(
        spec(
            "out_of_memory",
            [
                "python3",
                "-c",
                "import time; x = bytearray(1536 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(20)",
            ],
        )
    )
    jobs["cancelled_pending"] = delayed.submit(spec("cancelled_pending", ["true"]))
    # Ended by the pre-walltime signal (--signal=B:TERM@20) before the limit: one saves its work and exits 143,
    # the other takes SIGTERM's default action (dies of signal 15).
    jobs["pre_walltime_saved"] = backend.submit(
        spec("pre_walltime_saved", ["bash", "-c", 'trap "echo saved; exit 143" TERM; while true; do sleep 1; done'])
    )
    jobs["pre_walltime_killed"] = backend.submit(
        spec("pre_walltime_killed", ["python3", "-c", "import time; time.sleep(300)"])
    )
    ids = list(jobs.values())
    parsable = run(["sbatch", "--parsable", "--begin=now+600", "--wrap=true"]).stdout
    (HERE / "sbatch_parsable.txt").write_text(parsable)
    run(["scancel", parsable.strip()])
    # Right after submission slurmdbd has not caught up yet: sacct lags behind squeue.
    (HERE / "sacct_just_submitted.txt").write_text(run(sacct_command("sacct", ids)).stdout)
    time.sleep(3)
    (HERE / "squeue_active.txt").write_text(run(squeue_command("squeue", ids)).stdout)
    (HERE / "sacct_active.txt").write_text(run(sacct_command("sacct", ids)).stdout)
    run(["scancel", jobs["cancelled_running"], jobs["cancelled_pending"]])
    print("waiting for the time-limit and pre-walltime jobs (up to 150 s)", file=sys.stderr)
    deadline = time.monotonic() + 240
    caught_completing = False
    while time.monotonic() < deadline:
        text = run(squeue_command("squeue", [jobs["timeout"]])).stdout
        if "COMPLETING" in text and not caught_completing:
            (HERE / "squeue_completing.txt").write_text(text)
            caught_completing = True
        if not text.strip() and not run(squeue_command("squeue", ids)).stdout.strip():
            break
        time.sleep(0.5)
    time.sleep(2)
    (HERE / "sacct_finished.txt").write_text(run(sacct_command("sacct", ids)).stdout)
    wanted = {f"JobId={job_id} " for job_id in ids}
    scontrol = run(scontrol_show_jobs_command("scontrol")).stdout
    (HERE / "scontrol_show_job.txt").write_text(
        "".join(line + "\n" for line in scontrol.splitlines() if any(line.startswith(w) for w in wanted))
    )
    jobcomp = Path("/var/log/slurm/jobcomp.log").read_text().splitlines()
    (HERE / "jobcomp.txt").write_text(
        "".join(line + "\n" for line in jobcomp if any(line.startswith(w) for w in wanted))
    )
    (HERE / "squeue_invalid_job.stderr").write_text(run(squeue_command("squeue", ["999999"])).stderr)
    # A copy of the configuration with accounting switched off shows what sacct says on such clusters.
    conf = Path("/etc/slurm/slurm.conf").read_text().splitlines()
    conf = [line for line in conf if not line.startswith("AccountingStorage")]
    conf.append("AccountingStorageType=accounting_storage/none")
    alt = work / "slurm-no-accounting.conf"
    alt.write_text("\n".join(conf) + "\n")
    disabled = run(sacct_command("sacct", ids), env={"SLURM_CONF": str(alt), "PATH": "/usr/bin:/bin"})
    (HERE / "sacct_accounting_disabled.stderr").write_text(disabled.stderr)
    (HERE / "jobs.json").write_text(json.dumps(jobs, indent=2) + "\n")
    print(json.dumps(jobs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
