"""SlurmBackend against the real single-node Slurm of scripts/slurm-single-node.sh.

The time-limit job is submitted when the module starts and checked by the last test: Slurm's
smallest limit is one minute and slurmctld checks limits every 30 s, so it takes 60-90 s and the
other tests run meanwhile on the node's remaining CPU(s). `-m "slurm and not slow"` skips it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from ccat_dagster.execution.contract import Mount
from ccat_dagster.execution.hpc.base import (
    JobInfo,
    JobResources,
    JobSpec,
    JobState,
    JobSubmissionError,
    UnknownJobError,
)
from ccat_dagster.execution.hpc.slurm.backend import SlurmBackend
from ccat_dagster.execution.images import ImageKind, ResolvedImage
from ccat_dagster.execution.runtimes import BubblewrapRuntime, ContainerInvocation
from ccat_dagster.opsdb.enums import FailureKind

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        shutil.which("sinfo") is None,
        reason="Slurm client commands not installed (sinfo not found); run scripts/slurm-single-node.sh as root",
    ),
]

SMALL = JobResources(cpu=1, memory_gb=1, time_hours=0.25)
POLL_SECONDS = 0.3
# Bounds on how long a broken test hangs, not timing assertions. The module's long jobs (the time-limit job and
# the two pre-walltime jobs, one after the other) hold both CPUs of the node for about a minute at the start, so
# a job of the first tests may queue that long before it runs.
WAIT_SECONDS = 150
TIMEOUT_WAIT_SECONDS = 180


@pytest.fixture(scope="module", autouse=True)
def slurm_is_up() -> None:
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False)
    if "is UP" not in ping.stdout:
        pytest.fail(
            f"Slurm is installed but slurmctld does not answer ({ping.stdout.strip()}): "
            "run scripts/slurm-single-node.sh as root"
        )


@pytest.fixture(scope="module")
def accounting_enabled() -> bool:
    """scripts/slurm-single-node.sh falls back to no accounting when slurmdbd will not start."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    return "accounting_storage/slurmdbd" in config


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    # Paths go into #SBATCH lines, which accept only plain characters: no parametrized test ids here.
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def backend() -> SlurmBackend:
    return SlurmBackend()


def make_spec(work_dir: Path, name: str, command: list[str], **overrides) -> JobSpec:
    values = dict(command=command, resources=SMALL, env={"CCAT_JOB": name}, job_name=name, log_dir=work_dir / name)
    values.update(overrides)
    return JobSpec(**values)


def wait_for(
    backend: SlurmBackend,
    job_ids: list[str],
    predicate: Callable[[dict[str, JobInfo]], bool],
    *,
    what: str,
    seconds: float = WAIT_SECONDS,
) -> dict[str, JobInfo]:
    deadline = time.monotonic() + seconds
    while True:
        infos = backend.status_many(job_ids)
        if predicate(infos):
            return infos
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}: {infos}")
        time.sleep(POLL_SECONDS)


def wait_state(backend: SlurmBackend, job_id: str, state: JobState, **kwargs) -> JobInfo:
    return wait_for(backend, [job_id], lambda infos: infos[job_id].state is state, what=f"{state}", **kwargs)[job_id]


def wait_terminal(backend: SlurmBackend, job_id: str, **kwargs) -> JobInfo:
    return wait_for(backend, [job_id], lambda infos: infos[job_id].is_terminal, what="a terminal state", **kwargs)[
        job_id
    ]


def gate_command(gate: Path, then: str = "echo passed") -> list[str]:
    return ["bash", "-c", f'while [ ! -e "{gate}" ]; do sleep 0.1; done; {then}']


def counting_shims(directory: Path) -> tuple[dict[str, str], Path]:
    """Scripts that log their name to calls.log, then exec the real Slurm command."""
    directory.mkdir(parents=True, exist_ok=True)
    calls = directory / "calls.log"
    calls.touch()
    paths: dict[str, str] = {}
    for name in ("sbatch", "squeue", "sacct", "scontrol", "scancel"):
        real = shutil.which(name)
        assert real, f"{name} not found"
        shim = directory / name
        shim.write_text(f'#!/bin/sh\necho {name} >> "{calls}"\nexec "{real}" "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
        paths[name] = str(shim)
    return paths, calls


def calls_of(calls: Path) -> list[str]:
    return calls.read_text().split()


@pytest.fixture(scope="module")
def timeout_job(backend, work_dir) -> str:
    """Submitted first, checked last (see module docstring). Its payload logs the TERMs it gets and
    keeps running, so only the time limit can end it."""
    spec = make_spec(
        work_dir,
        "timeout",
        ["bash", "-c", 'trap "echo got TERM" TERM; while true; do sleep 1; done'],
        resources=JobResources(cpu=1, memory_gb=1, time_hours=1 / 60),
        pre_walltime_signal_seconds=20,
    )
    return backend.submit(spec)


# Traps the pre-walltime TERM, writes a file and exits 143 (before the limit itself).
SAVES_ON_TERM = 'trap "echo saved > $CCAT_SAVED; exit 143" TERM; while true; do sleep 0.2; done'


@pytest.fixture(scope="module")
def pre_walltime_jobs(backend, work_dir) -> dict[str, tuple[str, Path]]:
    """Submitted early, checked last (like `timeout_job`): a 1-minute limit with the SIGTERM 30 s before it, once
    for a plain payload and once for the same payload in the bubblewrap runtime (the signal must get into the
    sandbox). name -> (job id, the file the payload writes)."""
    jobs: dict[str, tuple[str, Path]] = {}
    plain_saved = work_dir / "pre-walltime-plain.saved"
    plain = make_spec(
        work_dir,
        "prewalltime-plain",
        ["bash", "-c", SAVES_ON_TERM],
        env={"CCAT_SAVED": str(plain_saved)},
        resources=JobResources(cpu=1, memory_gb=1, time_hours=1 / 60),
        pre_walltime_signal_seconds=30,
    )
    jobs["plain"] = (backend.submit(plain), plain_saved)
    out = work_dir / "pre-walltime-bwrap-out"
    out.mkdir()
    invocation = ContainerInvocation(
        image=ResolvedImage(path=Path("/usr/share/doc"), digest=None, kind=ImageKind.SOFTWARE_DIR),
        mounts=[Mount(host=out, container="/workflow/output", read_only=False)],
        env={"CCAT_SAVED": "/workflow/output/saved"},
        args=["/usr/bin/bash", "-c", SAVES_ON_TERM],
    )
    sandboxed = make_spec(
        work_dir,
        "prewalltime-bwrap",
        BubblewrapRuntime().command(invocation),
        resources=JobResources(cpu=1, memory_gb=1, time_hours=1 / 60),
        pre_walltime_signal_seconds=30,
    )
    jobs["bwrap"] = (backend.submit(sandboxed), out / "saved")
    return jobs


@pytest.mark.slow
def test_timeout_job_starts(backend, timeout_job, pre_walltime_jobs):
    # Requesting the fixtures here starts the clock for the last tests.
    info = backend.status(timeout_job)
    assert info.state in (JobState.PENDING, JobState.RUNNING)


# --- submission and completion ------------------------------------------------------------------


def test_job_completes_with_usage_logs_and_only_its_own_env(backend, work_dir, monkeypatch, accounting_enabled):
    monkeypatch.setenv("CCAT_MUST_NOT_LEAK", "secret")
    hostile = "'; rm -rf / $(touch PWNED)"
    payload = (
        "import os, sys, time; x = bytearray(100 * 2**20); "
        "print('argv', sys.argv[1:]); print('env', os.environ.get('EVIL')); "
        "print('leak', os.environ.get('CCAT_MUST_NOT_LEAK')); print('job', os.environ['SLURM_JOB_ID']); "
        # Slurm samples memory once a second (JobAcctGatherFrequency=task=1): hold it long enough.
        "time.sleep(3)"
    )
    workdir = work_dir / "completed-work"
    workdir.mkdir()
    spec = make_spec(
        work_dir,
        "completed",
        [sys.executable, "-c", payload, hostile, "two words"],
        env={"EVIL": hostile},
        workdir=workdir,
    )
    job_id = backend.submit(spec)
    assert job_id.isdigit()
    assert (work_dir / "completed" / "job.sbatch").is_file()
    info = wait_terminal(backend, job_id)
    assert info.state is JobState.COMPLETED, info
    assert info.exit_code == 0
    assert info.wall_time_seconds is not None
    if accounting_enabled:
        assert info.cpu_hours is not None and info.cpu_hours > 0
        assert info.peak_memory_gb is not None and info.peak_memory_gb > 0.09
    else:
        # scontrol and the jobcomp file know nothing of CPU time or memory.
        assert info.cpu_hours is None and info.peak_memory_gb is None
    logs = backend.logs(job_id)
    assert f"argv [{hostile!r}, 'two words']" in logs
    assert f"env {hostile}" in logs
    assert "leak None" in logs
    assert f"job {job_id}" in logs
    assert (work_dir / "completed" / f"slurm-{job_id}.out").is_file()
    assert list(workdir.iterdir()) == []  # no PWNED: nothing was interpreted by a shell


def test_pending_then_running_then_completed(backend, work_dir):
    gate_a, gate_b = work_dir / "gate-a", work_dir / "gate-b"
    first = backend.submit(make_spec(work_dir, "first", gate_command(gate_a)))
    wait_state(backend, first, JobState.RUNNING)
    after_first = SlurmBackend(extra_sbatch_args=[f"--dependency=afterok:{first}"])
    second = after_first.submit(make_spec(work_dir, "second", gate_command(gate_b)))
    infos = backend.status_many([first, second])
    assert infos[first].state is JobState.RUNNING
    assert infos[second].state is JobState.PENDING
    assert infos[second].reason == "Dependency"
    gate_a.touch()
    assert wait_state(backend, second, JobState.RUNNING).state is JobState.RUNNING
    assert backend.status(first).state is JobState.COMPLETED
    gate_b.touch()
    assert wait_terminal(backend, second).state is JobState.COMPLETED


def test_failing_job_fails_with_its_exit_code(backend, work_dir):
    job_id = backend.submit(make_spec(work_dir, "failing", ["bash", "-c", "echo oops >&2; exit 3"]))
    info = wait_terminal(backend, job_id)
    assert info.state is JobState.FAILED
    assert info.exit_code == 3
    assert info.reason == "exit code 3"
    assert "oops" in backend.logs(job_id)


def test_cancel_running_job(backend, work_dir):
    job_id = backend.submit(make_spec(work_dir, "cancelme", ["sleep", "300"]))
    wait_state(backend, job_id, JobState.RUNNING)
    backend.cancel(job_id)
    info = wait_terminal(backend, job_id)
    assert info.state is JobState.CANCELLED
    backend.cancel(job_id)  # cancelling a finished job is a no-op


def test_impossible_request_is_refused_at_submit(backend, work_dir):
    # EnforcePartLimits=ALL: more CPUs than the node has is an error, not an eternal PENDING.
    with pytest.raises(JobSubmissionError, match="sbatch refused"):
        backend.submit(make_spec(work_dir, "toobig", ["true"], resources=JobResources(cpu=4096)))


def test_submit_many_is_all_or_nothing(backend, work_dir):
    # Unique name: slurmctld still holds jobs of earlier test runs for MinJobAge.
    name = f"many-good-{uuid.uuid4().hex[:8]}"
    good = make_spec(work_dir, name, ["sleep", "300"])
    bad = make_spec(work_dir, "many-bad", ["true"], resources=JobResources(cpu=4096))
    with pytest.raises(JobSubmissionError, match="1 of 2 jobs were refused"):
        backend.submit_many([good, bad])
    assert (work_dir / name / "job.sbatch").is_file()
    accepted = subprocess.run(
        ["squeue", "--noheader", "--states=all", f"--name={name}", "--format=%i"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(accepted) == 1
    assert wait_terminal(backend, accepted[0]).state is JobState.CANCELLED


# --- polling: one scheduler query per call ------------------------------------------------------


def test_status_many_asks_squeue_once_and_sacct_at_most_once(work_dir, accounting_enabled):
    shims, calls = counting_shims(work_dir / "shims")
    backend = SlurmBackend(**shims)
    specs = [make_spec(work_dir, f"batch{n}", ["bash", "-c", f"exit {n}"]) for n in range(3)]
    job_ids = backend.submit_many(specs)
    assert calls_of(calls).count("sbatch") == 3
    polls = 0
    while True:
        before = len(calls_of(calls))
        infos = backend.status_many(job_ids)
        made = calls_of(calls)[before:]
        polls += 1
        # squeue once; sacct once for the jobs squeue no longer lists; scontrol once at most, for
        # finished jobs slurmdbd has not caught up with yet.
        assert made.count("squeue") == 1, made
        assert made.count("sacct") <= 1, made
        assert made.count("scontrol") <= 1, made
        assert set(made) <= {"squeue", "sacct", "scontrol"}, made
        if all(info.is_terminal for info in infos.values()):
            break
        assert polls < WAIT_SECONDS / POLL_SECONDS, infos
        time.sleep(POLL_SECONDS)
    if accounting_enabled:
        assert made[:2] == ["squeue", "sacct"]
    else:
        # sacct said "disabled" on the first poll and is not asked again.
        assert made == ["squeue", "scontrol"]
        assert calls_of(calls).count("sacct") == 1
    assert [infos[job_id].exit_code for job_id in job_ids] == [0, 1, 2]
    assert [infos[job_id].state for job_id in job_ids] == [JobState.COMPLETED, JobState.FAILED, JobState.FAILED]


def test_unknown_and_malformed_job_ids(backend):
    with pytest.raises(UnknownJobError, match="not Slurm job ids"):
        backend.status("12; rm -rf /")
    with pytest.raises(UnknownJobError) as unknown:
        backend.status("999999999")
    assert unknown.value.job_ids == ("999999999",)


# --- clusters without accounting, and re-attaching -----------------------------------------------


def test_without_accounting_status_comes_from_scontrol_then_jobcomp(backend, work_dir):
    """sacct runs against a copy of slurm.conf with accounting_storage/none, so it answers exactly as
    on a cluster without slurmdbd; then scontrol (and, with scontrol told to know nothing, the
    jobcomp file) must give the state."""
    shims, calls = counting_shims(work_dir / "shims-noacct")
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text().splitlines()
    conf = [line for line in conf if not line.startswith("AccountingStorage")]
    no_accounting = work_dir / "slurm-no-accounting.conf"
    no_accounting.write_text("\n".join([*conf, "AccountingStorageType=accounting_storage/none"]) + "\n")
    sacct_shim = Path(shims["sacct"])
    sacct_shim.write_text(sacct_shim.read_text().replace("exec ", f'SLURM_CONF="{no_accounting}" exec ', 1))

    job_id = backend.submit(make_spec(work_dir, "noacct", ["bash", "-c", "exit 4"]))
    wait_terminal(backend, job_id)
    fresh = SlurmBackend(**shims)
    info = fresh.status(job_id)
    assert (info.state, info.exit_code) == (JobState.FAILED, 4)
    assert calls_of(calls) == ["squeue", "sacct", "scontrol"]
    fresh.status(job_id)
    assert calls_of(calls)[3:] == ["squeue", "scontrol"], "sacct is not asked again once it said 'disabled'"

    # scontrol forgets jobs after MinJobAge; pretend it has, so the jobcomp file must answer.
    scontrol_shim = Path(shims["scontrol"])
    scontrol_shim.write_text(
        scontrol_shim.read_text().replace(
            "exec ", 'case "$*" in *"show job"*) echo "No jobs in the system"; exit 0;; esac\nexec ', 1
        )
    )
    info = SlurmBackend(**shims).status(job_id)
    assert (info.state, info.exit_code) == (JobState.FAILED, 4)


def test_finished_job_waits_for_slurmdbd_before_it_is_reported_finished(backend, work_dir):
    """While sacct works but has not recorded a job's end, the job is held back as COMPLETING (its CPU
    time and memory would otherwise be lost); after the grace period scontrol's answer is used."""
    job_id = backend.submit(make_spec(work_dir, "lagging", ["bash", "-c", "exit 5"]))
    wait_terminal(backend, job_id)
    shims, _ = counting_shims(work_dir / "shims-lag")
    sacct_shim = Path(shims["sacct"])
    # What sacct printed, as recorded, right after submission: nothing yet (tests/data/slurm).
    sacct_shim.write_text(sacct_shim.read_text().replace("exec ", "exit 0\nexec ", 1))
    held = SlurmBackend(**shims).status(job_id)
    assert held.state is JobState.RUNNING
    assert held.reason.startswith("COMPLETING")
    released = SlurmBackend(**shims, accounting_grace_seconds=0).status(job_id)
    assert (released.state, released.exit_code) == (JobState.FAILED, 5)


def test_logs_from_a_backend_that_did_not_submit(backend, work_dir, accounting_enabled):
    # A log directory named like an encoded sub_group_key: '%' must survive Slurm's filename patterns.
    log_dir = work_dir / "source=NGC%20253+line=~" / "logs"
    job_id = backend.submit(
        make_spec(work_dir, "logs", ["bash", "-c", "echo to-stdout; echo to-stderr >&2"], log_dir=log_dir)
    )
    wait_terminal(backend, job_id)
    assert (log_dir / f"slurm-{job_id}.out").read_text() == "to-stdout\n"
    logs = SlurmBackend().logs(job_id)  # finds the files through scontrol
    assert "to-stdout" in logs and "to-stderr" in logs
    shims, _ = counting_shims(work_dir / "shims-logs")
    scontrol_shim = Path(shims["scontrol"])
    scontrol_shim.write_text(scontrol_shim.read_text().replace("exec ", "exit 1\nexec ", 1))
    without_scontrol = SlurmBackend(**shims)
    if not accounting_enabled:
        with pytest.raises(UnknownJobError, match="cannot find the log files"):
            without_scontrol.logs(job_id)
        return
    # Then only sacct's SubmitLine can tell; slurmdbd records it a few seconds after the job ends
    # (seen: 4-5 s), which is fine for its purpose: jobs scontrol has already forgotten.
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        try:
            logs = without_scontrol.logs(job_id, tail_lines=1)
            break
        except UnknownJobError:
            assert time.monotonic() < deadline, "sacct never reported the SubmitLine"
            time.sleep(POLL_SECONDS)
    assert "to-stdout" in logs and "to-stderr" in logs


# --- last: the time limit ---------------------------------------------------------------------


@pytest.mark.slow
def test_job_exceeding_its_time_limit_is_timeout(backend, timeout_job):
    info = wait_terminal(backend, timeout_job, seconds=TIMEOUT_WAIT_SECONDS)
    assert info.state is JobState.FAILED
    assert info.reason == "TIMEOUT"
    assert info.wall_time_seconds is not None and info.wall_time_seconds >= 60
    assert info.failure_kind is FailureKind.WALLTIME
    # `exec` made the payload the batch step's main process, so Slurm's TERMs reached its trap.
    assert "got TERM" in backend.logs(timeout_job)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["plain", "bwrap"])
def test_a_job_ended_by_the_pre_walltime_signal_saved_its_work_and_is_walltime(
    backend, pre_walltime_jobs, runtime, accounting_enabled
):
    if runtime == "bwrap" and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)")
    job_id, saved = pre_walltime_jobs[runtime]
    info = wait_terminal(backend, job_id, seconds=TIMEOUT_WAIT_SECONDS)
    assert saved.read_text() == "saved\n", backend.logs(job_id)
    assert info.state is JobState.FAILED, info
    # Ended before the limit by the payload itself: Slurm says FAILED (143; sacct prints 15), not TIMEOUT.
    assert info.exit_code == (15 if accounting_enabled else 143), info
    assert info.failure_kind is FailureKind.WALLTIME, info
    assert "pre-walltime signal" in info.reason
