"""Pure Slurm text handling: parsing what squeue / sacct / scontrol / jobcomp print (fed with output
recorded from a real Slurm 22.05, see tests/data/slurm/record_slurm_outputs.py) and building the
sbatch script (including running it through bash to prove quoting)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ccat_dagster.execution.hpc.base import InvalidJobSpecError, JobResources, JobSpec, JobState, JobSubmissionError
from ccat_dagster.execution.hpc.slurm.job_status import (
    SlurmOutputError,
    accounting_disabled,
    is_valid_job_id,
    map_slurm_state,
    parse_duration_seconds,
    parse_exit_code,
    parse_jobcomp,
    parse_memory_gib,
    parse_sacct,
    parse_scontrol_show_job,
    parse_squeue,
    sacct_command,
    squeue_command,
    squeue_reports_no_such_job,
)
from ccat_dagster.execution.hpc.slurm.submit_script import (
    build_sbatch_script,
    format_time_limit,
    memory_request,
    parse_sbatch_parsable,
    pre_walltime_signal_seconds,
    sbatch_command,
)
from ccat_dagster.opsdb.enums import FailureKind

DATA = Path(__file__).parent / "data" / "slurm"
JOBS: dict[str, str] = json.loads((DATA / "jobs.json").read_text())


def recorded(name: str) -> str:
    return (DATA / name).read_text()


def by_scenario(infos: dict, scenario: str):
    return infos[JOBS[scenario]]


# --- recorded sacct (slurmdbd accounting) ---------------------------------------------------------


@pytest.fixture(scope="module")
def sacct_finished():
    return parse_sacct(recorded("sacct_finished.txt"))


def test_sacct_completed_job_has_exit_code_and_usage(sacct_finished):
    info = by_scenario(sacct_finished, "completed")
    assert info.state is JobState.COMPLETED
    assert info.exit_code == 0
    assert info.reason is None
    assert info.wall_time_seconds is not None and info.wall_time_seconds >= 3
    assert info.cpu_hours is not None and info.cpu_hours > 0
    # The job held a 200 MiB bytearray; MaxRSS comes from the batch step line.
    assert info.peak_memory_gb is not None and 0.15 < info.peak_memory_gb < 0.5


def test_sacct_failed_job_keeps_its_exit_code(sacct_finished):
    info = by_scenario(sacct_finished, "failed_exit_3")
    assert info.state is JobState.FAILED
    assert info.exit_code == 3
    assert info.reason == "exit code 3"


def test_sacct_signal_becomes_128_plus_signal(sacct_finished):
    info = by_scenario(sacct_finished, "killed_signal_9")
    assert info.state is JobState.FAILED
    assert info.exit_code == 137
    assert info.reason is not None and info.reason.startswith("killed by signal 9")
    assert not info.out_of_memory  # a tiny RSS: killed, not out of memory


def test_sacct_memory_kill_is_recognised_as_out_of_memory(sacct_finished):
    # Without cgroups Slurm's OverMemoryKill leaves FAILED 0:9; the peak above --mem=1G says why.
    info = by_scenario(sacct_finished, "out_of_memory")
    assert info.state is JobState.FAILED
    assert info.exit_code == 137
    assert info.reason == "OUT_OF_MEMORY"
    assert info.out_of_memory
    assert info.peak_memory_gb is not None and info.peak_memory_gb > 1.0


def test_sacct_timeout(sacct_finished):
    info = by_scenario(sacct_finished, "timeout")
    assert info.state is JobState.FAILED
    assert info.reason == "TIMEOUT"
    assert info.wall_time_seconds is not None and info.wall_time_seconds >= 60


def test_sacct_cancelled_running_job_takes_the_batch_step_signal(sacct_finished):
    info = by_scenario(sacct_finished, "cancelled_running")
    assert info.state is JobState.CANCELLED
    # The job line says 0:0, the batch step 0:15 (SIGTERM from scancel).
    assert info.exit_code == 143
    assert info.is_terminal


def test_sacct_cancelled_pending_job_has_no_exit_code(sacct_finished):
    info = by_scenario(sacct_finished, "cancelled_pending")
    assert info.state is JobState.CANCELLED
    assert info.exit_code is None
    assert info.wall_time_seconds == 0


def test_sacct_covers_every_recorded_job(sacct_finished):
    assert set(sacct_finished) == set(JOBS.values())
    assert all(info.is_terminal for info in sacct_finished.values())


def test_sacct_live_jobs_have_no_cpu_hours_yet():
    infos = parse_sacct(recorded("sacct_active.txt"))
    running = [info for info in infos.values() if info.state is JobState.RUNNING]
    assert running, "the recording holds running jobs"
    assert all(info.cpu_hours is None and info.exit_code is None for info in running)


def test_sacct_right_after_submission_lags_behind():
    # Recorded: right after sbatch, slurmdbd had not received the jobs yet (empty answer) ...
    infos = parse_sacct(recorded("sacct_just_submitted.txt"))
    assert set(infos) <= set(JOBS.values())
    assert all(not info.is_terminal for info in infos.values())
    # ... and in an earlier recording (2 s after sbatch) the job line was still PENDING with ReqMem
    # "16?" and AllocCPUS 0 while the batch step and squeue already said RUNNING.
    lagging = "9|PENDING|0:0|00:00:02|00:00:00||16?|0|None|00:01:00\n9.batch|RUNNING|0:0|00:00:02|00:00:00|||1||\n"
    info = parse_sacct(lagging)["9"]
    assert info.state is JobState.PENDING
    assert info.exit_code is None


# --- recorded squeue ---------------------------------------------------------------------------


def test_squeue_running_and_pending_with_reasons():
    infos = parse_squeue(recorded("squeue_active.txt"))
    assert by_scenario(infos, "timeout").state is JobState.RUNNING
    assert by_scenario(infos, "cancelled_running").state is JobState.RUNNING
    assert by_scenario(infos, "timeout").wall_time_seconds is not None
    pending = by_scenario(infos, "cancelled_pending")
    assert pending.state is JobState.PENDING
    assert pending.reason == "BeginTime"
    assert pending.wall_time_seconds is None
    waiting = [
        info for info in infos.values() if info.state is JobState.PENDING and info.reason in {"Resources", "Priority"}
    ]
    assert waiting, "jobs queued behind the two running ones"


def test_squeue_completing_job_is_not_terminal():
    infos = parse_squeue(recorded("squeue_completing.txt"))
    info = by_scenario(infos, "timeout")
    assert info.state is JobState.RUNNING
    assert not info.is_terminal
    assert info.reason == "TimeLimit"


def test_squeue_error_for_unknown_jobs_is_recognised():
    assert squeue_reports_no_such_job(recorded("squeue_invalid_job.stderr"))
    assert not squeue_reports_no_such_job("slurm_load_jobs error: Unable to contact slurm controller")


# --- recorded scontrol / jobcomp (clusters without accounting) ---------------------------------


def test_sacct_disabled_message_is_recognised():
    assert accounting_disabled(recorded("sacct_accounting_disabled.stderr"))
    assert not accounting_disabled("")


def test_scontrol_show_job_states_and_exit_codes():
    infos = parse_scontrol_show_job(recorded("scontrol_show_job.txt"))
    assert by_scenario(infos, "completed").state is JobState.COMPLETED
    assert by_scenario(infos, "completed").exit_code == 0
    assert by_scenario(infos, "failed_exit_3").exit_code == 3
    assert by_scenario(infos, "killed_signal_9").exit_code == 137
    assert by_scenario(infos, "timeout").reason == "TIMEOUT"
    assert by_scenario(infos, "cancelled_running").state is JobState.CANCELLED
    assert by_scenario(infos, "cancelled_pending").state is JobState.CANCELLED
    assert by_scenario(infos, "completed").wall_time_seconds is not None


def test_jobcomp_file_states_and_wall_time():
    lines = recorded("jobcomp.txt").splitlines(keepends=True)
    infos = parse_jobcomp(lines)
    assert by_scenario(infos, "completed").state is JobState.COMPLETED
    assert by_scenario(infos, "completed").wall_time_seconds is not None
    assert by_scenario(infos, "failed_exit_3").exit_code == 3
    assert by_scenario(infos, "timeout").reason == "TIMEOUT"
    assert by_scenario(infos, "cancelled_pending").state is JobState.CANCELLED
    only = parse_jobcomp(lines, job_ids=[JOBS["completed"]])
    assert set(only) == {JOBS["completed"]}


def test_jobcomp_last_record_of_a_job_wins():
    first = "JobId=7 UserId=root(0) Name=x JobState=NODE_FAIL StartTime=Unknown EndTime=Unknown ExitCode=0:0\n"
    second = (
        "JobId=7 UserId=root(0) Name=x JobState=COMPLETED StartTime=2026-01-01T00:00:00 "
        "EndTime=2026-01-01T00:00:05 ExitCode=0:0\n"
    )
    info = parse_jobcomp([first, second])["7"]
    assert info.state is JobState.COMPLETED
    assert info.wall_time_seconds == 5


# --- values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0:00", 0),
        ("1:23", 83),
        ("00:00:05", 5),
        ("00:03.831", 3.831),
        ("01:02:03", 3723),
        ("1-00:00:00", 86400),
        ("2-03:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5),
        ("1-02", 86400 + 7200),
        ("INVALID", None),
        ("UNLIMITED", None),
        ("", None),
    ],
)
def test_parse_duration(text, seconds):
    assert (
        parse_duration_seconds(text) == pytest.approx(seconds)
        if seconds is not None
        else parse_duration_seconds(text) is None
    )


def test_parse_duration_rejects_garbage():
    with pytest.raises(SlurmOutputError, match="not a Slurm time"):
        parse_duration_seconds("ab:cd")


@pytest.mark.parametrize(
    ("text", "gib"),
    [("1048576K", 1.0), ("1024M", 1.0), ("1G", 1.0), ("1.5G", 1.5), ("4000Mc", 4000 / 1024), ("0", 0.0), ("", None)],
)
def test_parse_memory(text, gib):
    assert parse_memory_gib(text) == (pytest.approx(gib) if gib is not None else None)


def test_parse_memory_rejects_garbage():
    with pytest.raises(SlurmOutputError, match="16\\?"):
        parse_memory_gib("16?")


def test_parse_exit_code():
    assert parse_exit_code("3:0").exit_code == 3
    assert parse_exit_code("0:9").exit_code == 137
    assert parse_exit_code("0:15").signal == 15
    assert parse_exit_code("") is None
    with pytest.raises(SlurmOutputError):
        parse_exit_code("3")


@pytest.mark.parametrize(
    ("raw", "state", "reason"),
    [
        ("PENDING", JobState.PENDING, None),
        ("CONFIGURING", JobState.PENDING, "CONFIGURING"),
        ("RUNNING", JobState.RUNNING, None),
        ("COMPLETING", JobState.RUNNING, "COMPLETING"),
        ("COMPLETED", JobState.COMPLETED, None),
        ("FAILED", JobState.FAILED, None),
        ("CANCELLED by 0", JobState.CANCELLED, None),
        ("TIMEOUT", JobState.FAILED, "TIMEOUT"),
        ("OUT_OF_MEMORY", JobState.FAILED, "OUT_OF_MEMORY"),
        ("NODE_FAIL", JobState.FAILED, "NODE_FAIL"),
        ("PREEMPTED", JobState.FAILED, "PREEMPTED"),
        ("BOOT_FAIL", JobState.FAILED, "BOOT_FAIL"),
        ("DEADLINE", JobState.FAILED, "DEADLINE"),
        ("REQUEUED", JobState.PENDING, "REQUEUED"),
        ("SUSPENDED", JobState.RUNNING, "SUSPENDED"),
    ],
)
def test_map_slurm_state(raw, state, reason):
    assert map_slurm_state(raw) == (state, reason)


def test_unknown_state_is_an_error_naming_it():
    with pytest.raises(SlurmOutputError, match="FROBNICATED"):
        map_slurm_state("FROBNICATED")


def test_oom_state_from_cgroup_clusters():
    line = (
        "42|OUT_OF_MEMORY|0:125|00:01:00|00:00:30||1G|1|None|00:10:00\n"
        "42.batch|OUT_OF_MEMORY|0:125|00:01:00|00:00:30|1100M||1||\n"
    )
    info = parse_sacct(line)["42"]
    assert info.state is JobState.FAILED and info.reason == "OUT_OF_MEMORY"


def test_sacct_line_with_wrong_field_count_is_an_error():
    with pytest.raises(SlurmOutputError, match="fields"):
        parse_sacct("42|COMPLETED|0:0\n")


def test_job_id_validation():
    assert is_valid_job_id("123")
    assert is_valid_job_id("123_4")
    assert not is_valid_job_id("123;rm")
    assert not is_valid_job_id("")
    assert not is_valid_job_id("-1")


def test_query_commands_ask_once_for_all_jobs():
    assert squeue_command("squeue", ["1", "2"]) == ["squeue", "--jobs=1,2", "--noheader", "--format=%i|%T|%r|%M"]
    command = sacct_command("sacct", ["1", "2"])
    assert command[:4] == ["sacct", "--parsable2", "--noheader", "--jobs=1,2"]


def test_sbatch_parsable():
    assert parse_sbatch_parsable(recorded("sbatch_parsable.txt")).isdigit()
    assert parse_sbatch_parsable("123;cluster\n") == "123"
    with pytest.raises(JobSubmissionError):
        parse_sbatch_parsable("sbatch: error: something\n")


# --- sbatch script -----------------------------------------------------------------------------


def make_spec(tmp_path: Path, **overrides) -> JobSpec:
    values = dict(
        command=["echo", "hello"],
        resources=JobResources(cpu=4, memory_gb=7.5, time_hours=2.5, gpus=0),
        env={"WORKFLOW_OUTPUT_DIR": "/workflow/output"},
        job_name="reduce-step.1",
        log_dir=tmp_path / "logs",
    )
    values.update(overrides)
    return JobSpec(**values)


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_script_directives(tmp_path):
    script = build_sbatch_script(spec=make_spec(tmp_path, workdir=tmp_path / "work"), partition="debug")
    assert script.startswith("#!/bin/bash\n")
    assert directives(script) == [
        "--job-name=reduce-step.1",
        "--nodes=1",
        "--ntasks=1",
        "--cpus-per-task=4",
        "--mem=8G",
        "--time=02:30:00",
        "--partition=debug",
        f"--output={tmp_path}/logs/slurm-%j.out",
        f"--error={tmp_path}/logs/slurm-%j.err",
        "--signal=B:TERM@120",
        f"--chdir={tmp_path}/work",
        "--export=ALL",
    ]
    assert "export WORKFLOW_OUTPUT_DIR=/workflow/output\n" in script
    assert script.rstrip().endswith("exec echo hello")


def test_script_gpus_only_when_asked_and_no_partition_when_unset(tmp_path):
    without = directives(build_sbatch_script(spec=make_spec(tmp_path)))
    assert not any(d.startswith(("--gres", "--partition", "--chdir")) for d in without)
    with_gpu = directives(build_sbatch_script(spec=make_spec(tmp_path, resources=JobResources(gpus=2))))
    assert "--gres=gpu:2" in with_gpu


def test_time_and_memory_formatting():
    assert format_time_limit(59) == "00:00:59"
    assert format_time_limit(3600 * 50 + 61) == "50:01:01"
    assert memory_request(JobResources(memory_gb=0.2)) == "1G"
    assert memory_request(JobResources(memory_gb=2.0)) == "2G"
    assert memory_request(JobResources(memory_gb=2.01)) == "3G"
    assert JobResources(time_hours=0.1).time_limit_seconds == 360


def test_pre_walltime_signal_is_clamped_to_half_the_limit(tmp_path):
    short = make_spec(tmp_path, resources=JobResources(time_hours=1 / 60))
    assert pre_walltime_signal_seconds(short) == 30
    assert "--signal=B:TERM@30" in directives(build_sbatch_script(spec=short))
    no_signal = make_spec(tmp_path, pre_walltime_signal_seconds=0)
    assert not any(d.startswith("--signal") for d in directives(build_sbatch_script(spec=no_signal)))


def test_percent_in_log_dir_is_escaped_for_slurm_patterns(tmp_path):
    # sub_group_keys are %XX-encoded; in --output a single '%' would start a Slurm pattern.
    log_dir = tmp_path / "source=NGC%20253+line=CO43" / "logs"
    found = directives(build_sbatch_script(spec=make_spec(tmp_path, log_dir=log_dir, workdir=log_dir.parent)))
    assert f"--output={tmp_path}/source=NGC%%20253+line=CO43/logs/slurm-%j.out" in found
    assert f"--chdir={tmp_path}/source=NGC%20253+line=CO43" in found


@pytest.mark.parametrize("bad", ["relative/logs", "/tmp/with space", "/tmp/new\nline", "/tmp/q'uote", "/tmp/a$b"])
def test_unsafe_log_dir_is_refused(tmp_path, bad):
    with pytest.raises(InvalidJobSpecError, match="log_dir"):
        build_sbatch_script(spec=make_spec(tmp_path, log_dir=Path(bad)))


def test_unsafe_partition_is_refused(tmp_path):
    with pytest.raises(InvalidJobSpecError, match="partition"):
        build_sbatch_script(spec=make_spec(tmp_path), partition="debug\n#SBATCH --uid=0")


def test_sbatch_command_passes_extra_args_as_arguments(tmp_path):
    assert sbatch_command(sbatch="sbatch", script_path=tmp_path / "job.sbatch", extra_args=["--account=a b"]) == [
        "sbatch",
        "--parsable",
        "--account=a b",
        str(tmp_path / "job.sbatch"),
    ]


HOSTILE = [
    "'; rm -rf /",
    "$(touch PWNED)",
    "`touch PWNED`",
    'double " quote',
    "back\\slash",
    "new\nline",
    "*",
    "~",
    "",
    "--option=value with spaces",
    "ümlaut ☃",
]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash to run the generated script")
def test_script_quoting_survives_bash(tmp_path):
    """Every argument and env value reaches the payload as exactly one unchanged string."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    payload = (
        "import json, os, sys; "
        "print(json.dumps({'argv': sys.argv[1:], 'env': {k: os.environ[k] for k in ('EVIL', 'EMPTY', 'MULTI')}}))"
    )
    spec = make_spec(
        tmp_path,
        command=[sys.executable, "-c", payload, *HOSTILE],
        env={"EVIL": "'; rm -rf /", "EMPTY": "", "MULTI": "a\nb $(touch PWNED) `touch PWNED`"},
    )
    script_path = tmp_path / "job.sbatch"
    script_path.write_text(build_sbatch_script(spec=spec))
    # The #SBATCH lines are comments to bash: this runs exactly what the batch step would run.
    result = subprocess.run(
        ["bash", str(script_path)],
        cwd=workdir,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        check=True,
    )
    seen = json.loads(result.stdout)
    assert seen["argv"] == HOSTILE
    assert seen["env"] == {"EVIL": "'; rm -rf /", "EMPTY": "", "MULTI": "a\nb $(touch PWNED) `touch PWNED`"}
    assert not (workdir / "PWNED").exists()
    assert list(workdir.iterdir()) == []


# --- failure kinds: from Slurm's own evidence ---------------------------------------------------

EXPECTED_KINDS = {
    "timeout": FailureKind.WALLTIME,
    "cancelled_running": FailureKind.CANCELLED,
    "cancelled_pending": FailureKind.CANCELLED,
    "completed": None,
    "failed_exit_3": FailureKind.EXIT_CODE,
    "killed_signal_9": FailureKind.SIGNAL,
    "out_of_memory": FailureKind.OOM,
    # Ended by --signal=B:TERM@20 about 30 s into a 1-minute limit: saved and exited 143 / died of SIGTERM.
    "pre_walltime_saved": FailureKind.WALLTIME,
    "pre_walltime_killed": FailureKind.WALLTIME,
}


@pytest.mark.parametrize("source", ["sacct", "scontrol", "jobcomp"])
def test_recorded_jobs_have_the_failure_kind_slurm_shows(source):
    if source == "sacct":
        infos = parse_sacct(recorded("sacct_finished.txt"))
    elif source == "scontrol":
        infos = parse_scontrol_show_job(recorded("scontrol_show_job.txt"))
    else:
        infos = parse_jobcomp(recorded("jobcomp.txt").splitlines(keepends=True))
    expected = dict(EXPECTED_KINDS)
    if source != "sacct":
        # scontrol and the jobcomp file know no memory figures: a SIGKILL is all they show.
        expected["out_of_memory"] = FailureKind.SIGNAL
    assert set(expected) == set(JOBS), "every recorded scenario has an expected kind"
    got = {scenario: by_scenario(infos, scenario).failure_kind for scenario in expected}
    assert got == expected
    for scenario in ("pre_walltime_saved", "pre_walltime_killed"):
        assert "pre-walltime signal" in by_scenario(infos, scenario).reason


def test_sacct_prints_exit_143_as_15():
    # Recorded: the payload trapped TERM and ran `exit 143`; sacct says 15:0, scontrol 143:0.
    assert by_scenario(parse_sacct(recorded("sacct_finished.txt")), "pre_walltime_saved").exit_code == 15
    assert (
        by_scenario(parse_scontrol_show_job(recorded("scontrol_show_job.txt")), "pre_walltime_saved").exit_code == 143
    )


def sacct_line(state: str, exit_code: str, elapsed: str = "00:05:00", limit: str = "01:00:00") -> str:
    return f"50|{state}|{exit_code}|{elapsed}|00:00:01||1G|1|None|{limit}\n"


@pytest.mark.parametrize(
    ("state", "exit_code", "elapsed", "kind"),
    [
        ("NODE_FAIL", "0:0", "00:05:00", FailureKind.NODE_FAILURE),
        ("BOOT_FAIL", "0:0", "00:00:00", FailureKind.NODE_FAILURE),
        ("PREEMPTED", "0:15", "00:05:00", FailureKind.NODE_FAILURE),
        ("DEADLINE", "0:0", "00:05:00", FailureKind.WALLTIME),
        ("OUT_OF_MEMORY", "0:125", "00:05:00", FailureKind.OOM),
        ("CANCELLED by 1000", "0:15", "00:59:00", FailureKind.CANCELLED),
        # SIGTERM early in a one-hour limit: somebody else's signal, not the pre-walltime one.
        ("FAILED", "0:15", "00:05:00", FailureKind.SIGNAL),
        ("FAILED", "15:0", "00:05:00", FailureKind.EXIT_CODE),
        ("FAILED", "0:15", "00:58:00", FailureKind.WALLTIME),
        ("FAILED", "15:0", "00:58:00", FailureKind.WALLTIME),
        ("FAILED", "0:6", "00:58:00", FailureKind.SIGNAL),
        ("FAILED", "2:0", "00:58:00", FailureKind.EXIT_CODE),
        ("SPECIAL_EXIT", "1:0", "00:01:00", FailureKind.EXIT_CODE),
        ("COMPLETED", "0:0", "00:05:00", None),
    ],
)
def test_failure_kind_per_state(state, exit_code, elapsed, kind):
    info = parse_sacct(sacct_line(state, exit_code, elapsed))["50"]
    assert info.failure_kind is kind


def test_live_jobs_have_no_failure_kind():
    infos = parse_squeue(recorded("squeue_active.txt")) | parse_sacct(recorded("sacct_active.txt"))
    assert infos and all(info.failure_kind is None for info in infos.values() if not info.is_terminal)


def test_scontrol_walltime_by_exit_143_without_the_sacct_quirk():
    line = "JobId=77 JobName=x JobState=FAILED ExitCode=143:0 RunTime=00:00:40 TimeLimit=00:01:00 Reason=None\n"
    info = parse_scontrol_show_job(line)["77"]
    assert (info.exit_code, info.failure_kind) == (143, FailureKind.WALLTIME)
    early = line.replace("TimeLimit=00:01:00", "TimeLimit=02:00:00")
    assert parse_scontrol_show_job(early)["77"].failure_kind is FailureKind.SIGNAL
