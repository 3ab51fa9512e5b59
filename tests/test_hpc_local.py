"""LocalBackend: real subprocesses, state in files, bounded concurrency, process-group cancel,
re-attach from another process, clean environment, time limit. Also the JobSpec validation every
backend relies on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ccat_dagster.execution.hpc.base import (
    InvalidJobSpecError,
    JobInfo,
    JobResources,
    JobSpec,
    JobState,
    JobSubmissionError,
    UnknownJobError,
    describe_exit_code,
)
from ccat_dagster.execution.hpc.local import LocalBackend, job_record, local_failure_kind
from ccat_dagster.execution.hpc.local_wrapper import kernel_oom_kills
from ccat_dagster.opsdb.enums import FailureKind

# Generous: these bound how long a broken test hangs, they are not timing assertions.
WAIT_SECONDS = 30


def spec(tmp_path: Path, name: str, command: list[str], **overrides) -> JobSpec:
    values = dict(
        command=command,
        resources=JobResources(cpu=1, memory_gb=0.5, time_hours=1.0),
        env={"CCAT_JOB": name},
        job_name=name,
        log_dir=tmp_path / "logs" / name,
    )
    values.update(overrides)
    return JobSpec(**values)


def wait_for(backend: LocalBackend, job_ids: list[str], predicate, *, what: str) -> dict[str, JobInfo]:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        infos = backend.status_many(job_ids)
        if predicate(infos):
            return infos
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}: {infos}")
        time.sleep(0.1)


def wait_terminal(backend: LocalBackend, job_id: str) -> JobInfo:
    return wait_for(backend, [job_id], lambda infos: infos[job_id].is_terminal, what="a terminal state")[job_id]


def wait_until(condition, *, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def process_gone(pid: int) -> bool:
    """Not running: no such process, or a zombie nobody has collected (this machine's pid 1 does not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


@pytest.fixture
def backend(tmp_path) -> LocalBackend:
    return LocalBackend(tmp_path / "state", max_concurrent_jobs=2, kill_grace_seconds=1.0)


# --- basic lifecycle --------------------------------------------------------------------------------


def test_completed_job_reports_usage_and_logs(backend, tmp_path):
    job_id = backend.submit(
        spec(
            tmp_path,
            "ok",
            [
                sys.executable,
                "-c",
                "x = bytearray(64 * 2**20); print('hello'); import sys; print('warn', file=sys.stderr)",
            ],
        )
    )
    info = wait_terminal(backend, job_id)
    assert info.state is JobState.COMPLETED
    assert info.exit_code == 0
    assert info.reason is None
    assert info.wall_time_seconds is not None and info.wall_time_seconds > 0
    assert info.cpu_hours is not None and info.cpu_hours > 0
    assert info.peak_memory_gb is not None and info.peak_memory_gb > 0.06
    logs = backend.logs(job_id)
    assert "==> job.out <==\nhello" in logs
    assert "==> job.err <==\nwarn" in logs
    assert (tmp_path / "logs" / "ok" / "job.out").read_text() == "hello\n"


def test_failing_job_fails_with_its_exit_code(backend, tmp_path):
    job_id = backend.submit(spec(tmp_path, "fail", ["bash", "-c", "exit 3"]))
    info = wait_terminal(backend, job_id)
    assert info.state is JobState.FAILED
    assert info.exit_code == 3
    assert info.reason == "exit code 3"
    assert info.failure_kind is FailureKind.EXIT_CODE


def test_job_killed_by_sigkill_reports_137(backend, tmp_path):
    oom_kills = kernel_oom_kills()
    job_id = backend.submit(spec(tmp_path, "kill9", ["bash", "-c", "kill -9 $$"]))
    info = wait_terminal(backend, job_id)
    assert info.state is JobState.FAILED
    assert info.exit_code == 137
    assert "signal 9" in info.reason and "out of memory" in info.reason
    # Not the kernel's OOM killer (unless it ran on this shared host meanwhile): a plain signal death.
    assert info.failure_kind is (FailureKind.OOM if kernel_oom_kills() != oom_kills else FailureKind.SIGNAL)


def test_missing_command_fails_with_127(backend, tmp_path):
    job_id = backend.submit(spec(tmp_path, "missing", ["/nonexistent/program"]))
    info = wait_terminal(backend, job_id)
    assert info.state is JobState.FAILED
    assert info.exit_code == 127
    assert "/nonexistent/program" in info.reason


def test_logs_tail_lines(backend, tmp_path):
    job_id = backend.submit(spec(tmp_path, "many", ["bash", "-c", "for i in $(seq 1 100); do echo line$i; done"]))
    wait_terminal(backend, job_id)
    logs = backend.logs(job_id, tail_lines=3)
    assert "line98\nline99\nline100\n" in logs
    assert "line97" not in logs


# --- environment / workdir ----------------------------------------------------------------------


def test_job_sees_only_its_env_plus_path(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("CCAT_MUST_NOT_LEAK", "secret")
    # `env` itself, not Python (which would add LC_CTYPE by locale coercion).
    job_id = backend.submit(spec(tmp_path, "env", ["env", "-0"], env={"A": "1", "B": "two words"}))
    assert wait_terminal(backend, job_id).state is JobState.COMPLETED
    output = (tmp_path / "logs" / "env" / "job.out").read_text()
    seen = dict(entry.split("=", 1) for entry in output.split("\0") if entry)
    assert seen == {"A": "1", "B": "two words", "PATH": os.environ["PATH"]}


def test_env_path_overrides_inherited_path(backend, tmp_path):
    job_id = backend.submit(
        spec(tmp_path, "path", ["/bin/sh", "-c", 'echo "$PATH"'], env={"PATH": "/custom/bin:/usr/bin:/bin"})
    )
    wait_terminal(backend, job_id)
    assert (tmp_path / "logs" / "path" / "job.out").read_text() == "/custom/bin:/usr/bin:/bin\n"


def test_workdir_is_the_cwd(backend, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    job_id = backend.submit(spec(tmp_path, "cwd", ["pwd"], workdir=workdir))
    wait_terminal(backend, job_id)
    assert (tmp_path / "logs" / "cwd" / "job.out").read_text() == f"{workdir}\n"


def test_missing_workdir_is_refused_at_submit(backend, tmp_path):
    with pytest.raises(InvalidJobSpecError, match="does not exist"):
        backend.submit(spec(tmp_path, "nowork", ["true"], workdir=tmp_path / "absent"))


# --- concurrency ------------------------------------------------------------------------------


def test_jobs_beyond_the_bound_stay_pending_until_a_slot_frees(backend, tmp_path):
    gate = tmp_path / "gate"
    wait_gate = ["bash", "-c", f'while [ ! -e "{gate}" ]; do sleep 0.05; done']
    job_ids = [backend.submit(spec(tmp_path, f"gated{n}", wait_gate)) for n in range(4)]
    infos = wait_for(
        backend, job_ids, lambda infos: sum(i.state is JobState.RUNNING for i in infos.values()) == 2, what="2 running"
    )
    states = [infos[job_id].state for job_id in job_ids]
    # Oldest first: the first two run, the last two wait.
    assert states == [JobState.RUNNING, JobState.RUNNING, JobState.PENDING, JobState.PENDING]
    assert "max_concurrent_jobs=2" in infos[job_ids[2]].reason
    # A second look (and a fresh instance counting from the files) must not start a third job.
    again = LocalBackend(backend.state_dir, max_concurrent_jobs=2).status_many(job_ids)
    assert sum(info.state is JobState.RUNNING for info in again.values()) == 2
    gate.touch()
    final = wait_for(backend, job_ids, lambda infos: all(i.is_terminal for i in infos.values()), what="all done")
    assert all(info.state is JobState.COMPLETED for info in final.values())


def test_submit_many_is_all_or_nothing(backend, tmp_path):
    good = spec(tmp_path, "good", ["sleep", "30"])
    bad = spec(tmp_path, "bad", ["true"], workdir=tmp_path / "absent")
    with pytest.raises(JobSubmissionError):
        backend.submit_many([good, bad])
    job_ids = [path.name.removesuffix(".spec.json") for path in backend.state_dir.glob("*.spec.json")]
    assert len(job_ids) == 1
    assert wait_terminal(backend, job_ids[0]).state is JobState.CANCELLED


def _records(backend: LocalBackend, job_ids: list[str], kind: str = "") -> list[dict]:
    return [json.loads((backend.state_dir / f"{job_id}{kind}.json").read_text()) for job_id in job_ids]


def test_a_finishing_wrapper_takes_the_next_queued_job_itself(tmp_path):
    """One interpreter per slot, not per job: the wrapper of a finished job runs the next queued one."""
    backend = LocalBackend(tmp_path / "state", max_concurrent_jobs=1, kill_grace_seconds=1.0)
    # Each job burns a different, measurable amount of CPU: its record must hold its own usage only.
    burn = 'i=0; while [ "$i" -lt "$1" ]; do i=$((i+1)); done'
    loops = [200_000, 1, 200_000, 1]
    job_ids = backend.submit_many(
        [spec(tmp_path, f"seq{n}", ["bash", "-c", burn, "burn", str(count)]) for n, count in enumerate(loops)]
    )
    final = wait_for(backend, job_ids, lambda infos: all(i.is_terminal for i in infos.values()), what="all done")
    assert all(info.state is JobState.COMPLETED for info in final.values())
    statuses = _records(backend, job_ids)
    launches = _records(backend, job_ids, ".launch")
    assert {record["wrapper_pid"] for record in statuses} == {statuses[0]["wrapper_pid"]}  # one wrapper ran all four
    assert all(launch["wrapper_pid"] == statuses[0]["wrapper_pid"] for launch in launches)
    # Queue order, one after the other.
    assert [r["started_at"] for r in statuses] == sorted(r["started_at"] for r in statuses)
    assert all(a["finished_at"] <= b["started_at"] for a, b in zip(statuses, statuses[1:], strict=False))
    # Per-job usage: the short jobs do not carry the long jobs' CPU time.
    cpu = [record["cpu_seconds"] for record in statuses]
    assert cpu[1] < cpu[0] / 2 and cpu[3] < cpu[2] / 2, cpu
    # Each job's wrapper messages go to its own wrapper log, and nothing is left queued.
    assert all((backend.state_dir / f"{job_id}.wrapper.log").exists() for job_id in job_ids)
    assert os.listdir(backend.state_dir / "queued") == [] and os.listdir(backend.state_dir / "active") == []


def test_cancel_reaches_a_job_run_by_a_wrapper_that_took_it_over(tmp_path):
    backend = LocalBackend(tmp_path / "state", max_concurrent_jobs=1, kill_grace_seconds=1.0)
    first = backend.submit(spec(tmp_path, "first", ["true"]))
    second = backend.submit(spec(tmp_path, "second", ["sleep", "300"]))
    third = backend.submit(spec(tmp_path, "third", ["true"]))
    status_file = backend.state_dir / f"{second}.json"
    wait_until(lambda: status_file.exists() and "pid" in json.loads(status_file.read_text()), what="the payload")
    first_record, second_record = _records(backend, [first, second])
    assert second_record["wrapper_pid"] == first_record["wrapper_pid"]
    wrapper = second_record["wrapper_pid"]

    # A cancel signal for a job the wrapper ran before (no cancel marker on the current job) is ignored.
    os.kill(wrapper, signal.SIGUSR1)
    time.sleep(0.5)
    assert backend.status(second).state is JobState.RUNNING

    backend.cancel(second)
    assert wait_terminal(backend, second).state is JobState.CANCELLED
    wait_until(lambda: process_gone(second_record["pgid"]), what="the payload to die")
    # The wrapper goes on with the queue.
    assert wait_terminal(backend, third).state is JobState.COMPLETED
    assert _records(backend, [third])[0]["wrapper_pid"] == wrapper


def test_a_wrapper_asked_to_stop_ends_its_job_and_takes_no_other(tmp_path):
    backend = LocalBackend(tmp_path / "state", max_concurrent_jobs=1, kill_grace_seconds=1.0)
    running = backend.submit(spec(tmp_path, "running", ["sleep", "300"]))
    queued = backend.submit(spec(tmp_path, "queued", ["true"]))
    status_file = backend.state_dir / f"{running}.json"
    wait_until(lambda: status_file.exists() and "pid" in json.loads(status_file.read_text()), what="the payload")
    wrapper = _records(backend, [running])[0]["wrapper_pid"]
    os.kill(wrapper, signal.SIGTERM)  # e.g. the host shuts down
    wait_until(lambda: process_gone(wrapper), what="the wrapper to exit")
    record = _records(backend, [running])[0]
    assert record["state"] == "finished" and record["reason"] == "cancelled"
    # The queued job was not taken by the stopping wrapper: the next scheduling pass starts it in a new one.
    assert wait_terminal(backend, queued).state is JobState.COMPLETED
    assert _records(backend, [queued])[0]["wrapper_pid"] != wrapper


def test_a_state_dir_without_a_queue_index_is_indexed_in_order(tmp_path):
    """A state directory written before ``queued/`` existed: its queued jobs start, oldest first."""
    state = tmp_path / "state"
    backend = LocalBackend(state, max_concurrent_jobs=1, kill_grace_seconds=1.0)
    gate = tmp_path / "gate"
    blocker = backend.submit(spec(tmp_path, "blocker", ["bash", "-c", f'while [ ! -e "{gate}" ]; do sleep 0.05; done']))
    order = tmp_path / "order"
    later = [backend.submit(spec(tmp_path, f"later{n}", ["bash", "-c", f"echo {n} >> {order}"])) for n in range(3)]
    for path in (state / "queued").iterdir():
        path.unlink()
    (state / "queued").rmdir()
    gate.touch()
    final = wait_for(
        LocalBackend(state, max_concurrent_jobs=1),
        [blocker, *later],
        lambda i: all(x.is_terminal for x in i.values()),
        what="all done",
    )
    assert all(info.state is JobState.COMPLETED for info in final.values())
    assert order.read_text().split() == ["0", "1", "2"]


# --- cancel -----------------------------------------------------------------------------------


def test_cancel_kills_the_whole_process_group(backend, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    # bash (the payload) starts a grandchild and waits; both must die on cancel.
    job_id = backend.submit(spec(tmp_path, "tree", ["bash", "-c", f'sleep 300 & echo $! > "{pid_file}"; wait']))
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), what="the grandchild pid")
    grandchild = int(pid_file.read_text())
    assert not process_gone(grandchild)
    assert backend.status(job_id).state is JobState.RUNNING
    backend.cancel(job_id)
    info = wait_terminal(backend, job_id)
    assert info.state is JobState.CANCELLED
    wait_until(lambda: process_gone(grandchild), what="the grandchild to die")
    status_record = json.loads((backend.state_dir / f"{job_id}.json").read_text())
    wait_until(lambda: process_gone(status_record["pgid"]), what="the payload to die")


def test_cancel_a_queued_job_means_it_never_starts(tmp_path):
    backend = LocalBackend(tmp_path / "state", max_concurrent_jobs=1, kill_grace_seconds=1.0)
    marker = tmp_path / "started"
    blocker = backend.submit(spec(tmp_path, "blocker", ["sleep", "30"]))
    queued = backend.submit(spec(tmp_path, "queued", ["touch", str(marker)]))
    assert backend.status(queued).state is JobState.PENDING
    backend.cancel(queued)
    backend.cancel(blocker)
    assert wait_terminal(backend, blocker).state is JobState.CANCELLED
    assert backend.status(queued).state is JobState.CANCELLED
    backend.status_many([queued, blocker])  # a scheduling pass with a free slot
    assert not marker.exists()


def test_cancel_after_completion_is_a_no_op(backend, tmp_path):
    job_id = backend.submit(spec(tmp_path, "quick", ["true"]))
    wait_terminal(backend, job_id)
    backend.cancel(job_id)
    assert backend.status(job_id).state is JobState.COMPLETED


# --- time limit -------------------------------------------------------------------------------


def test_time_limit_kills_with_timeout_after_the_warning_signal(backend, tmp_path):
    # The payload ignores SIGTERM (it only logs it), so the wrapper must escalate to SIGKILL.
    job_id = backend.submit(
        spec(
            tmp_path,
            "slow",
            ["bash", "-c", 'trap "echo got TERM" TERM; while true; do sleep 0.1; done'],
            resources=JobResources(time_hours=1.5 / 3600),
        )
    )
    info = wait_terminal(backend, job_id)
    assert info.state is JobState.FAILED
    assert info.reason == "TIMEOUT"
    assert info.exit_code == 137
    assert info.failure_kind is FailureKind.WALLTIME
    # The pre-walltime SIGTERM (half the limit before the end) reached the payload.
    assert "got TERM" in backend.logs(job_id)


@pytest.mark.parametrize(
    "payload",
    [
        # Saves its work on the pre-walltime SIGTERM and exits non-zero, before the limit ...
        'trap "echo saved; exit 143" TERM; while true; do sleep 0.1; done',
        # ... or takes SIGTERM's default action.
        "exec sleep 30",
    ],
    ids=["saves-and-exits", "dies-of-sigterm"],
)
def test_end_by_the_pre_walltime_signal_is_walltime(backend, tmp_path, payload):
    job_id = backend.submit(
        spec(tmp_path, "warned", ["bash", "-c", payload], resources=JobResources(time_hours=4 / 3600))
    )
    info = wait_terminal(backend, job_id)
    assert info.state is JobState.FAILED
    assert info.failure_kind is FailureKind.WALLTIME
    assert "pre-walltime signal" in info.reason
    assert info.wall_time_seconds is not None and info.wall_time_seconds < 4  # before the limit itself
    if "saved" in payload:
        assert "saved" in backend.logs(job_id)


@pytest.mark.parametrize(
    ("record", "kind"),
    [
        ({"exit_code": 3, "signal": 0, "reason": "exit code 3"}, FailureKind.EXIT_CODE),
        ({"exit_code": 137, "signal": 9, "reason": "killed by signal 9"}, FailureKind.SIGNAL),
        # A shell or container runtime reports its child's signal death as 128+N.
        ({"exit_code": 134, "signal": 0}, FailureKind.SIGNAL),
        ({"exit_code": 137, "signal": 9, "oom_killed": True}, FailureKind.OOM),
        ({"exit_code": 137, "signal": 9, "timed_out": True, "reason": "TIMEOUT"}, FailureKind.WALLTIME),
        ({"exit_code": 143, "signal": 15, "cancel_requested": True, "reason": "cancelled"}, FailureKind.CANCELLED),
        ({"exit_code": 1, "signal": 0, "warning_sent_at": 1.0}, FailureKind.WALLTIME),
        ({"exit_code": 1, "signal": 0, "disk_full": "/pipeline/logs"}, FailureKind.DISK_FULL),
        ({"exit_code": 0, "signal": 0, "disk_full": "/state/x.json"}, FailureKind.DISK_FULL),
        # Written by a wrapper of an earlier version: the reason stands in for the evidence.
        ({"exit_code": 137, "signal": 9, "reason": "TIMEOUT"}, FailureKind.WALLTIME),
    ],
)
def test_local_failure_kind_from_the_wrapper_record(record, kind):
    assert local_failure_kind(record) is kind


# --- re-attach from another process -------------------------------------------------------------


def run_in_other_process(state_dir: Path, code: str) -> dict:
    """Run `code` in a fresh interpreter with `backend` = LocalBackend(state_dir); it prints JSON."""
    program = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from ccat_dagster.execution.hpc.local import LocalBackend\n"
        f"backend = LocalBackend(Path({str(state_dir)!r}))\n" + code
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_another_process_can_status_logs_and_cancel(backend, tmp_path):
    job_id = backend.submit(spec(tmp_path, "attach", ["bash", "-c", "echo started; sleep 300"]))
    wait_until(lambda: "started" in backend.logs(job_id), what="the job's first output")
    seen = run_in_other_process(
        backend.state_dir,
        f"info = backend.status({job_id!r})\n"
        f"print(json.dumps({{'state': info.state.value, 'logs': backend.logs({job_id!r})}}))\n",
    )
    assert seen["state"] == "running"
    assert "started" in seen["logs"]
    run_in_other_process(backend.state_dir, f"backend.cancel({job_id!r})\nprint('{{}}')\n")
    assert wait_terminal(backend, job_id).state is JobState.CANCELLED


def test_job_outlives_the_process_that_submitted_it(tmp_path):
    state_dir = tmp_path / "state"
    log_dir = tmp_path / "logs" / "orphan"
    submitted = run_in_other_process(
        state_dir,
        "from ccat_dagster.execution.hpc.base import JobResources, JobSpec\n"
        f"job_id = backend.submit(JobSpec(command=['bash', '-c', 'sleep 0.5; echo survived'], resources=JobResources(),"
        f" env={{}}, job_name='orphan', log_dir=Path({str(log_dir)!r})))\n"
        "print(json.dumps({'job_id': job_id}))\n",
    )
    fresh = LocalBackend(state_dir)
    info = wait_terminal(fresh, submitted["job_id"])
    assert info.state is JobState.COMPLETED
    assert "survived" in fresh.logs(submitted["job_id"])


def test_dead_wrapper_without_exit_status_is_failed(backend, tmp_path):
    job_id = backend.submit(spec(tmp_path, "orphaned", ["sleep", "300"]))
    status_file = backend.state_dir / f"{job_id}.json"
    wait_until(status_file.exists, what="the wrapper's first record")
    record = json.loads(status_file.read_text())
    os.kill(record["wrapper_pid"], signal.SIGKILL)
    try:
        info = wait_terminal(backend, job_id)
        assert info.state is JobState.FAILED
        assert info.exit_code is None
        assert "without recording an exit status" in info.reason
        assert info.failure_kind is FailureKind.LOST
    finally:
        os.killpg(record["pgid"], signal.SIGKILL)


# --- ids and specs ----------------------------------------------------------------------------


def test_unknown_and_malformed_job_ids(backend):
    with pytest.raises(UnknownJobError) as unknown:
        backend.status("0" * 32)
    assert unknown.value.job_ids == ("0" * 32,)
    for bad in ("../../etc/passwd", "abc"):
        with pytest.raises(UnknownJobError, match="not local job ids"):
            backend.status(bad)
        with pytest.raises(UnknownJobError):
            backend.logs(bad)


@pytest.mark.parametrize("name", ["", "has space", "semi;colon", "slash/name", "-leading-dash", "x" * 129, "new\nline"])
def test_job_name_must_be_safe(tmp_path, name):
    with pytest.raises(InvalidJobSpecError, match="job_name"):
        spec(tmp_path, "x", ["true"], job_name=name)


@pytest.mark.parametrize("name", ["1ABC", "A-B", "A B", "A=B", ""])
def test_env_names_must_be_valid(tmp_path, name):
    with pytest.raises(InvalidJobSpecError, match="env name"):
        spec(tmp_path, "x", ["true"], env={name: "v"})


@pytest.mark.parametrize(
    "resources",
    [dict(cpu=0), dict(memory_gb=0), dict(time_hours=-1), dict(gpus=-1), dict(cpu=1.5)],
)
def test_resources_must_be_positive(resources):
    with pytest.raises(InvalidJobSpecError):
        JobResources(**resources)


def test_command_must_be_an_argument_list(tmp_path):
    with pytest.raises(InvalidJobSpecError, match="argument list"):
        spec(tmp_path, "x", "echo hello")  # type: ignore[arg-type]
    with pytest.raises(InvalidJobSpecError):
        spec(tmp_path, "x", [])


def test_exit_code_137_is_spelled_out():
    assert "out of memory" in describe_exit_code(137)
    assert describe_exit_code(0) is None
    assert describe_exit_code(2) == "exit code 2"
    assert describe_exit_code(143, signal_number=15) == "killed by signal 15"


# --- a full file system (ENOSPC) --------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs, unmounted afterwards whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill_up(mount_point: Path) -> None:
    """Write zeros into the small tmpfs until it is full (head fails with ENOSPC, as it should)."""
    subprocess.run(["bash", "-c", f'head -c 3M /dev/zero > "{mount_point}/fill"'], check=False)


@pytest.mark.parametrize("exit_code", [0, 1])
def test_a_disk_that_fills_up_during_the_job_is_reported_as_disk_full(small_tmpfs, tmp_path, exit_code):
    # State and logs on the tmpfs, as under PIPELINE_BASE_DIR; the payload fills it, so the wrapper cannot write
    # its final record the usual way (a temporary file, then a rename).
    backend = LocalBackend(small_tmpfs / "state", kill_grace_seconds=1.0)
    fill = small_tmpfs / "fill"
    job_id = backend.submit(
        spec(
            tmp_path,
            "filler",
            # Waits for the wrapper's running record (written right after the start); a disk full before that is
            # the case of the dead-wrapper test below.
            [
                "bash",
                "-c",
                f'until grep -qs running "{small_tmpfs}"/state/*.json; do sleep 0.02; done; '
                f'head -c 3M /dev/zero > "{fill}"; exit {exit_code}',
            ],
            log_dir=small_tmpfs / "logs",
        )
    )
    info = wait_terminal(backend, job_id)
    assert info.state is JobState.FAILED
    assert info.failure_kind is FailureKind.DISK_FULL
    assert "no space left on device" in info.reason
    assert str(backend.state_dir / f"{job_id}.json") in info.reason
    assert info.exit_code == exit_code  # the job's own outcome is kept
    fill.unlink()  # space again: the record stays what it is
    assert backend.status(job_id) == info


def test_a_job_failing_on_a_full_output_disk_is_disk_full(small_tmpfs, tmp_path, backend):
    # The state directory has space; the job's log directory (its output file system) is full.
    fill_up(small_tmpfs)
    job_id = backend.submit(
        spec(
            tmp_path,
            "writer",
            ["bash", "-c", f'head -c 1M /dev/zero > "{small_tmpfs}/out.dat" || exit 2'],
            log_dir=small_tmpfs / "logs",
        )
    )
    info = wait_terminal(backend, job_id)
    assert (info.state, info.exit_code) == (JobState.FAILED, 2)
    assert info.failure_kind is FailureKind.DISK_FULL
    assert f"no space left on device (ENOSPC): the file system of {small_tmpfs / 'logs'} is full" in info.reason


def test_a_wrapper_dead_on_a_full_disk_is_disk_full_not_lost(small_tmpfs, tmp_path):
    backend = LocalBackend(small_tmpfs / "state", kill_grace_seconds=1.0)
    job_id = backend.submit(spec(tmp_path, "orphan", ["sleep", "300"], log_dir=small_tmpfs / "logs"))
    status_file = backend.state_dir / f"{job_id}.json"
    wait_until(status_file.exists, what="the wrapper's first record")
    record = json.loads(status_file.read_text())
    fill_up(small_tmpfs)
    os.kill(record["wrapper_pid"], signal.SIGKILL)
    try:
        info = wait_terminal(backend, job_id)
        assert info.failure_kind is FailureKind.DISK_FULL
        assert f"no space left on device (ENOSPC): the file system of {backend.state_dir} is full" in info.reason
    finally:
        os.killpg(record["pgid"], signal.SIGKILL)


# --- the kernel's OOM killer ------------------------------------------------------------------


@pytest.fixture
def memory_cgroup(tmp_path):
    """A memory cgroup (v1 or v2) limited to 50 MiB below this process's own, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("creating a memory cgroup needs root (CI runs as root)")
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    v1 = Path("/sys/fs/cgroup/memory")
    if "memory" in own and v1.is_dir():
        group, limit_file = v1 / own["memory"].lstrip("/") / f"ccat-oom-{os.getpid()}", "memory.limit_in_bytes"
    elif "" in own and (Path("/sys/fs/cgroup") / "cgroup.controllers").exists():
        group, limit_file = Path("/sys/fs/cgroup") / own[""].lstrip("/") / f"ccat-oom-{os.getpid()}", "memory.max"
    else:
        pytest.skip(f"no memory cgroup controller found ({own})")
    group.mkdir()
    try:
        (group / limit_file).write_text(str(50 * 1024 * 1024))
        yield group
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def test_a_job_killed_by_the_kernels_oom_killer_is_oom(backend, tmp_path, memory_cgroup):
    allocate = "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); print('survived')"
    job_id = backend.submit(
        spec(
            tmp_path,
            "hungry",
            ["bash", "-c", f'echo $$ > "{memory_cgroup}/cgroup.procs"; exec python3 -c "{allocate}"'],
        )
    )
    info = wait_terminal(backend, job_id)
    assert (info.state, info.exit_code) == (JobState.FAILED, 137), info
    assert info.failure_kind is FailureKind.OOM
    assert info.out_of_memory
    assert "OOM killer" in info.reason
    assert "survived" not in backend.logs(job_id)


def test_the_memory_watchdog_ends_a_payload_tree_over_its_memory_even_in_another_session(tmp_path):
    """A spec with enforce_memory (a packed task) is held to its memory_gb: the resident memory of the payload and
    of every process below it, also one that left its process group (setsid, as a sandbox does)."""
    from ccat_dagster.execution.hpc import local_wrapper

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    pid_file = tmp_path / "hungry.pid"
    hungry = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
        "b = bytearray(150 * 2**20); time.sleep(60)"
    )
    job = spec(tmp_path, "hungry", ["/bin/sh", "-c", 'setsid "$0" -c "$1" & wait', sys.executable, hungry])
    job = JobSpec(**{**job.__dict__, "resources": JobResources(cpu=1, memory_gb=0.1, time_hours=1.0)})
    record = job_record(job, "a" * 32, kill_grace_seconds=1)
    record["enforce_memory"] = True
    local_wrapper.write_json_atomically(local_wrapper.spec_path(state_dir, "a" * 32), record)
    done = subprocess.run(
        [sys.executable, "-m", "ccat_dagster.execution.hpc.local_wrapper", "--state-dir", str(state_dir)]
        + ["--job-id", "a" * 32],
        timeout=WAIT_SECONDS,
        check=False,
    )
    assert done.returncode == 0
    status = json.loads(local_wrapper.status_path(state_dir, "a" * 32).read_text())
    assert status["oom_killed"] is True and "memory watchdog" in status["reason"], status
    assert status["max_rss_kib"] > 100 * 1024
    assert local_failure_kind(status) is FailureKind.OOM
    wait_until(lambda: process_gone(int(pid_file.read_text())), what="the payload's own session to be killed")


def test_without_enforce_memory_the_wrapper_leaves_memory_to_the_scheduler(tmp_path):
    """The local backend's and a Slurm job's memory are not the wrapper's business: no watchdog."""
    from ccat_dagster.execution.hpc import local_wrapper

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    hold = "import time; b = bytearray(150 * 2**20); time.sleep(1.5)"
    job = spec(tmp_path, "big", [sys.executable, "-c", hold])
    job = JobSpec(**{**job.__dict__, "resources": JobResources(cpu=1, memory_gb=0.1, time_hours=1.0)})
    local_wrapper.write_json_atomically(
        local_wrapper.spec_path(state_dir, "b" * 32), job_record(job, "b" * 32, kill_grace_seconds=1)
    )
    assert local_wrapper.main(["--state-dir", str(state_dir), "--job-id", "b" * 32]) == 0
    status = json.loads(local_wrapper.status_path(state_dir, "b" * 32).read_text())
    assert status["exit_code"] == 0 and not status["oom_killed"], status


def test_the_wrapper_wakes_at_its_payloads_exit_not_at_its_next_look():
    """The pidfd wait returns when the child exits, long before the pause it was given."""
    from ccat_dagster.execution.hpc import local_wrapper

    child = subprocess.Popen(["/bin/sleep", "0.2"])
    notifier = local_wrapper._exit_notifier(child.pid)
    if notifier is None:
        pytest.skip("this kernel has no pidfd_open: the wrapper falls back to its timed looks")
    began = time.monotonic()
    local_wrapper._wait_for_exit(notifier, WAIT_SECONDS)
    woke_after = time.monotonic() - began
    os.close(notifier)
    child.wait()
    assert woke_after < WAIT_SECONDS / 2
