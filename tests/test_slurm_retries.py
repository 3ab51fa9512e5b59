"""Transient scheduler trouble is retried, with back-off, for a short budget; sbatch never submits twice.

The fast tests drive SlurmBackend with fake Slurm commands (shell scripts that fail a given number of times with
the messages recorded from the real Slurm while slurmctld was down, then answer with recorded output) and an
injected sleep, so no test waits for a back-off. The last test stops the real slurmctld for a few seconds while a
job runs and shows a status call waiting it out.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ccat_dagster.execution.hpc.base import (
    JobResources,
    JobSpec,
    JobState,
    JobSubmissionError,
    SchedulerCommandError,
)
from ccat_dagster.execution.hpc.slurm.backend import SlurmBackend
from ccat_dagster.execution.hpc.slurm.commands import transient_sbatch_failure

DATA = Path(__file__).parent / "data" / "slurm"
CONTROLLER_DOWN_SQUEUE = (DATA / "squeue_controller_down.stderr").read_text()
CONTROLLER_DOWN_SBATCH = (DATA / "sbatch_controller_down.stderr").read_text()


class Sleeps(list):
    """An injected sleep: remembers the back-off pauses instead of taking them."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def fake_command(directory: Path, name: str, *, fail_times: int, stderr: str, stdout: str, hang: float = 0) -> Path:
    """A script that, on its first `fail_times` calls, writes `stderr` and exits 1 (after sleeping `hang` s, for
    a command that hangs until the timeout), and afterwards prints `stdout`. Every call is logged in calls.log."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.stderr").write_text(stderr)
    (directory / f"{name}.stdout").write_text(stdout)
    count = directory / f"{name}.count"
    script = directory / name
    script.write_text(
        "#!/bin/bash\n"
        f'echo "{name} $*" >> "{directory}/calls.log"\n'
        f'n=$(cat "{count}" 2>/dev/null || echo 0); echo $((n + 1)) > "{count}"\n'
        f'if [ "$n" -lt {fail_times} ]; then sleep {hang}; cat "{directory}/{name}.stderr" >&2; exit 1; fi\n'
        f'cat "{directory}/{name}.stdout"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def calls(directory: Path) -> list[str]:
    log = directory / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def job_spec(tmp_path: Path, name: str = "job-1") -> JobSpec:
    return JobSpec(
        command=["true"],
        resources=JobResources(cpu=1, memory_gb=1, time_hours=0.1),
        env={},
        job_name=name,
        log_dir=tmp_path / "logs",
    )


def backend_with(tmp_path: Path, sleeps: Sleeps, **commands: Path) -> SlurmBackend:
    return SlurmBackend(
        **{name: str(path) for name, path in commands.items()},
        sleep=sleeps,
        command_timeout_seconds=5,
        command_retry_attempts=5,
    )


# --- queries -------------------------------------------------------------------------------------


def test_status_waits_out_a_controller_that_is_down_twice(tmp_path, caplog):
    squeue = fake_command(
        tmp_path, "squeue", fail_times=2, stderr=CONTROLLER_DOWN_SQUEUE, stdout=(DATA / "squeue_active.txt").read_text()
    )
    sleeps = Sleeps()
    with caplog.at_level(logging.WARNING, logger="ccat_dagster.execution.hpc.slurm.commands"):
        infos = backend_with(tmp_path, sleeps, squeue=squeue).status_many(["1", "3"])
    assert (infos["1"].state, infos["3"].state) == (JobState.RUNNING, JobState.PENDING)
    assert len(calls(tmp_path)) == 3
    # Exponential back-off with jitter: the second pause is longer than the first's base.
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 1.5
    assert "Unable to contact slurm controller" in caplog.text and "retrying in" in caplog.text


def test_status_gives_up_after_the_budget_with_a_scheduler_command_error(tmp_path):
    squeue = fake_command(tmp_path, "squeue", fail_times=99, stderr=CONTROLLER_DOWN_SQUEUE, stdout="")
    sleeps = Sleeps()
    with pytest.raises(SchedulerCommandError, match=r"Unable to contact slurm controller.*tried 5 time") as error:
        backend_with(tmp_path, sleeps, squeue=squeue).status_many(["1"])
    assert error.value.returncode == 1
    assert len(calls(tmp_path)) == 5 and len(sleeps) == 4


def test_a_command_that_times_out_is_retried(tmp_path):
    squeue = fake_command(
        tmp_path, "squeue", fail_times=1, stderr="", stdout=(DATA / "squeue_active.txt").read_text(), hang=10
    )
    backend = SlurmBackend(squeue=str(squeue), sleep=Sleeps(), command_timeout_seconds=0.5)
    assert backend.status("2").state is JobState.RUNNING
    assert len(calls(tmp_path)) == 2


def test_an_answer_is_not_retried(tmp_path):
    # "Invalid job id specified" says the jobs are unknown: an answer, asked of sacct next, not retried.
    squeue = fake_command(
        tmp_path, "squeue", fail_times=99, stderr=(DATA / "squeue_invalid_job.stderr").read_text(), stdout=""
    )
    sacct = fake_command(tmp_path, "sacct", fail_times=0, stderr="", stdout=(DATA / "sacct_finished.txt").read_text())
    sleeps = Sleeps()
    info = backend_with(tmp_path, sleeps, squeue=squeue, sacct=sacct).status("4")
    assert (info.state, info.exit_code) == (JobState.FAILED, 3)
    assert [call.split()[0] for call in calls(tmp_path)] == ["squeue", "sacct"]
    assert sleeps == []


def test_a_status_within_one_call_leaves_a_job_that_left_the_queue_for_the_next_poll(tmp_path):
    # squeue no longer lists job 4; asking sacct would be a second call, which the budget does not allow.
    squeue = fake_command(
        tmp_path, "squeue", fail_times=99, stderr=(DATA / "squeue_invalid_job.stderr").read_text(), stdout=""
    )
    sacct = fake_command(tmp_path, "sacct", fail_times=0, stderr="", stdout=(DATA / "sacct_finished.txt").read_text())
    backend = backend_with(tmp_path, Sleeps(), squeue=squeue, sacct=sacct)
    info = backend.status_within(["4"], max_calls=1)["4"]
    assert (info.state, info.deferred) == (JobState.RUNNING, True) and "scheduler call budget" in info.reason
    assert [call.split()[0] for call in calls(tmp_path)] == ["squeue"]
    info = backend.status_within(["4"], max_calls=2)["4"]
    assert (info.state, info.exit_code, info.deferred) == (JobState.FAILED, 3, False)
    assert [call.split()[0] for call in calls(tmp_path)] == ["squeue", "squeue", "sacct"]


def test_a_missing_command_is_not_retried(tmp_path):
    sleeps = Sleeps()
    with pytest.raises(SchedulerCommandError, match="not found"):
        backend_with(tmp_path, sleeps, squeue=tmp_path / "no-such-squeue").status("1")
    assert sleeps == []


def test_scancel_is_retried(tmp_path):
    scancel = fake_command(tmp_path, "scancel", fail_times=2, stderr=CONTROLLER_DOWN_SQUEUE, stdout="")
    backend_with(tmp_path, Sleeps(), scancel=scancel).cancel("7")
    assert calls(tmp_path) == ["scancel 7"] * 3


# --- sbatch: retried only when the controller was not reached, and never twice ---------------------------------


def test_sbatch_retries_while_the_controller_is_down_and_looks_before_resubmitting(tmp_path):
    sbatch = fake_command(tmp_path, "sbatch", fail_times=2, stderr=CONTROLLER_DOWN_SBATCH, stdout="41\n")
    squeue = fake_command(tmp_path, "squeue", fail_times=0, stderr="", stdout="")  # no job of that name
    job_id = backend_with(tmp_path, Sleeps(), sbatch=sbatch, squeue=squeue).submit(job_spec(tmp_path))
    assert job_id == "41"
    made = [call.split()[0] for call in calls(tmp_path)]
    assert made == ["sbatch", "squeue", "sbatch", "squeue", "sbatch"]
    assert "--name=job-1" in calls(tmp_path)[1] and "--states=all" in calls(tmp_path)[1]


def test_sbatch_that_timed_out_after_the_controller_took_the_job_is_not_submitted_again(tmp_path):
    # The first sbatch hangs past the timeout, but slurmctld had accepted the job: squeue finds it by its name.
    sbatch = fake_command(tmp_path, "sbatch", fail_times=1, stderr="", stdout="99\n", hang=10)
    squeue = fake_command(tmp_path, "squeue", fail_times=0, stderr="", stdout="57\n")
    backend = SlurmBackend(sbatch=str(sbatch), squeue=str(squeue), sleep=Sleeps(), command_timeout_seconds=0.5)
    assert backend.submit(job_spec(tmp_path)) == "57"
    assert [call.split()[0] for call in calls(tmp_path)] == ["sbatch", "squeue"]


def test_sbatch_is_not_run_again_until_the_lookup_answered(tmp_path):
    # The controller stays away for the lookup too: each failed lookup is one more transient failure, and sbatch
    # runs again only after squeue could say that no such job exists.
    sbatch = fake_command(tmp_path, "sbatch", fail_times=1, stderr=CONTROLLER_DOWN_SBATCH, stdout="42\n")
    squeue = fake_command(tmp_path, "squeue", fail_times=2, stderr=CONTROLLER_DOWN_SQUEUE, stdout="")
    assert backend_with(tmp_path, Sleeps(), sbatch=sbatch, squeue=squeue).submit(job_spec(tmp_path)) == "42"
    assert [call.split()[0] for call in calls(tmp_path)] == ["sbatch", "squeue", "squeue", "squeue", "sbatch"]


def test_sbatch_refusal_is_final(tmp_path):
    refusal = "sbatch: error: Batch job submission failed: Invalid partition name specified\n"
    sbatch = fake_command(tmp_path, "sbatch", fail_times=9, stderr=refusal, stdout="")
    sleeps = Sleeps()
    with pytest.raises(JobSubmissionError, match="sbatch refused job 'job-1'.*Invalid partition name"):
        backend_with(tmp_path, sleeps, sbatch=sbatch).submit(job_spec(tmp_path))
    assert len(calls(tmp_path)) == 1 and sleeps == []


def test_sbatch_gives_up_after_the_budget_with_a_submission_error(tmp_path):
    sbatch = fake_command(tmp_path, "sbatch", fail_times=99, stderr=CONTROLLER_DOWN_SBATCH, stdout="")
    squeue = fake_command(tmp_path, "squeue", fail_times=0, stderr="", stdout="")
    with pytest.raises(JobSubmissionError, match=r"could not submit job 'job-1'.*tried 5 time"):
        backend_with(tmp_path, Sleeps(), sbatch=sbatch, squeue=squeue).submit(job_spec(tmp_path))


@pytest.mark.parametrize(
    ("stderr", "transient"),
    [
        (CONTROLLER_DOWN_SBATCH, True),
        ("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation", True),
        ("sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying", True),
        ("sbatch: error: Batch job submission failed: Requested node configuration is not available", False),
        ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination", False),
    ],
)
def test_transient_sbatch_failures(stderr, transient):
    assert transient_sbatch_failure(stderr) is transient


# --- the real slurmctld, stopped for a few seconds -----------------------------------------------------------

CTLD_PID_FILE = Path("/run/slurmctld.pid")


def slurmctld_pid() -> int | None:
    try:
        pid = int(CTLD_PID_FILE.read_text().strip())
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return pid if state not in ("Z", "X") else None


def controller_up() -> bool:
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False)
    return "is UP" in ping.stdout


def wait(condition, *, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("slurmctld") is None, reason="Slurm not installed (run scripts/slurm-single-node.sh)")
def test_status_waits_out_a_real_slurmctld_restart(tmp_path, caplog):
    if os.geteuid() != 0:
        pytest.skip("stopping slurmctld needs root (CI runs as root)")
    if not controller_up() or slurmctld_pid() is None:
        pytest.fail("slurmctld is not running: run scripts/slurm-single-node.sh as root")
    # Short tries, so that it is this backend's retry loop (not squeue's own) that waits out the outage.
    backend = SlurmBackend(command_timeout_seconds=2, command_retry_seconds=60, command_retry_attempts=30)
    gate = tmp_path / "gate"
    job_id = backend.submit(
        JobSpec(
            command=["bash", "-c", f'while [ ! -e "{gate}" ]; do sleep 0.2; done'],
            resources=JobResources(cpu=1, memory_gb=1, time_hours=0.1),
            env={},
            job_name=f"outage-{os.getpid()}",
            log_dir=tmp_path / "logs",
        )
    )
    wait(lambda: backend.status(job_id).state is JobState.RUNNING, seconds=60, what="the job to run")
    outage_seconds = 4.0
    restarted = threading.Event()

    def restart_later() -> None:
        time.sleep(outage_seconds)
        subprocess.run(["slurmctld"], check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        restarted.set()

    pid = slurmctld_pid()
    os.kill(pid, 15)
    restarter = threading.Thread(target=restart_later)
    try:
        wait(lambda: slurmctld_pid() is None, seconds=15, what="slurmctld to stop")
        restarter.start()
        with caplog.at_level(logging.WARNING, logger="ccat_dagster.execution.hpc.slurm.commands"):
            info = backend.status(job_id)
        returned_after_the_restart = restarted.is_set()
    finally:
        if restarter.is_alive():
            restarter.join()
        if slurmctld_pid() is None:
            subprocess.run(["slurmctld"], check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        wait(controller_up, seconds=60, what="slurmctld to answer again")
        gate.touch()
    assert returned_after_the_restart, "the status call answered while slurmctld was down"
    assert info.state is JobState.RUNNING, info
    assert "retrying in" in caplog.text
    final = backend.status(job_id)
    deadline = time.monotonic() + 60
    while not final.is_terminal and time.monotonic() < deadline:
        time.sleep(0.3)
        final = backend.status(job_id)
    assert final.state is JobState.COMPLETED, "the job ran through the controller's restart"


def test_sbatch_runs_with_a_clean_environment(tmp_path, monkeypatch):
    # The script says --export=ALL: what sbatch sees is what the job starts with, so only PATH and SLURM_CONF.
    monkeypatch.setenv("CCAT_OPS_DB_URL", "postgresql://user:secret@db/ops")
    monkeypatch.setenv("SBATCH_PARTITION", "not-this-one")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/slurm.conf")
    sbatch = tmp_path / "sbatch"
    sbatch.write_text(f'#!/bin/bash\nenv > "{tmp_path}/sbatch.env"\necho 7\n')
    sbatch.chmod(0o755)
    assert SlurmBackend(sbatch=str(sbatch), sleep=Sleeps()).submit(job_spec(tmp_path)) == "7"
    names = {line.split("=", 1)[0] for line in (tmp_path / "sbatch.env").read_text().splitlines()}
    # bash adds its own few (PWD, SHLVL, _); nothing of this process's environment but PATH and SLURM_CONF.
    assert names - {"PWD", "SHLVL", "_", "OLDPWD"} == {"PATH", "SLURM_CONF"}
    assert "#SBATCH --export=ALL\n" in (tmp_path / "logs" / "job.sbatch").read_text()
