"""SlurmBackend: submit with sbatch, poll with squeue then sacct (or scontrol / jobcomp), cancel with scancel.

The side-effecting calls live here and stay thin; building the script is `submit_script`, reading
Slurm's answers is `job_status`. A status poll asks the scheduler once for all jobs of the call:
one squeue for everything, then one sacct for the jobs squeue no longer lists. Clusters without
slurmdbd answer sacct with "accounting storage is disabled"; then one `scontrol show job` (finished
jobs stay there for MinJobAge seconds) and finally the jobcomp/filetxt file take its place.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from ccat_dagster.execution.hpc.base import (
    HpcBackend,
    HpcError,
    JobInfo,
    JobSpec,
    JobState,
    JobSubmissionError,
    SchedulerCommandError,
    UnknownJobError,
    read_log_tail,
    require_host_command,
)
from ccat_dagster.execution.hpc.slurm.commands import (
    CommandRun,
    SlurmCommandRunner,
    TransientCommandError,
    command_failed,
    transient_sbatch_failure,
)
from ccat_dagster.execution.hpc.slurm.job_status import (
    accounting_disabled,
    is_valid_job_id,
    job_ids_by_name_command,
    parse_job_ids_by_name,
    parse_jobcomp,
    parse_sacct,
    parse_scontrol_show_job,
    parse_squeue,
    sacct_command,
    scontrol_show_jobs_command,
    squeue_command,
    squeue_reports_no_such_job,
)
from ccat_dagster.execution.hpc.slurm.submit_script import (
    SBATCH_SCRIPT_NAME,
    build_sbatch_script,
    parse_sbatch_parsable,
    sbatch_command,
    sbatch_environment,
    slurm_log_paths,
)

__all__ = ["SlurmBackend"]


class SlurmBackend(HpcBackend):
    """Runs each JobSpec as one Slurm batch job.

    `partition`: the `--partition` of every job (None: the cluster's default partition).
    `sbatch` ... `scancel`: the commands to run (names on PATH or absolute paths).
    `extra_sbatch_args`: extra sbatch options for every job (e.g. `("--account=ccat",)`), passed as
    arguments, never through a shell. `jobcomp_path`: the jobcomp/filetxt file to read when accounting
    is disabled; None asks `scontrol show config` for it. `accounting_grace_seconds`: how long a
    finished job is reported as still COMPLETING while slurmdbd has not recorded its end (see
    `_await_accounting`).
    `command_timeout_seconds`: how long one try of a command may take; `command_retry_seconds` /
    `command_retry_attempts`: how long (and how often) a command that fails transiently is retried before
    SchedulerCommandError (see `commands`); `run_command` / `sleep` replace subprocess.run / time.sleep in tests.
    The job's stdout/stderr go to `<log_dir>/slurm-<job id>.out|.err`, the script to `<log_dir>/job.sbatch`.
    """

    name = "slurm"
    shares_a_scheduler = True

    def __init__(
        self,
        partition: str | None = None,
        *,
        sbatch: str = "sbatch",
        squeue: str = "squeue",
        sacct: str = "sacct",
        scontrol: str = "scontrol",
        scancel: str = "scancel",
        extra_sbatch_args: Sequence[str] = (),
        jobcomp_path: Path | None = None,
        command_timeout_seconds: float = 60.0,
        max_parallel_submissions: int = 8,
        accounting_grace_seconds: float = 30.0,
        command_retry_seconds: float = 30.0,
        command_retry_attempts: int = 8,
        run_command: CommandRun = subprocess.run,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.partition = partition
        self.sbatch = sbatch
        self.squeue = squeue
        self.sacct = sacct
        self.scontrol = scontrol
        self.scancel = scancel
        self.extra_sbatch_args = tuple(extra_sbatch_args)
        self.command_timeout_seconds = command_timeout_seconds
        self.max_parallel_submissions = max(1, max_parallel_submissions)
        self.accounting_grace_seconds = accounting_grace_seconds
        self._commands = SlurmCommandRunner(
            timeout_seconds=command_timeout_seconds,
            retry_seconds=command_retry_seconds,
            retry_attempts=command_retry_attempts,
            run=run_command,
            sleep=sleep,
        )
        self._jobcomp_path = jobcomp_path
        self._jobcomp_looked_up = jobcomp_path is not None
        # None until sacct has answered once; True on clusters without slurmdbd (then skip sacct).
        self._accounting_disabled: bool | None = None
        self._log_dirs: dict[str, Path] = {}
        # job id -> monotonic time it was first seen finished by scontrol but not yet by sacct.
        self._awaiting_accounting: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def scheduler_queries(self) -> int:
        """squeue, sacct and scontrol calls so far (sbatch and scancel are not status queries)."""
        tries = self._commands.tries
        return sum(tries[command] for command in {self.squeue, self.sacct, self.scontrol})

    # --- submission -----------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> str:
        require_host_command(spec, backend=self.name)
        log_dir = spec.log_dir.absolute()
        spec = replace(spec, log_dir=log_dir, workdir=spec.workdir.absolute() if spec.workdir is not None else None)
        script = build_sbatch_script(spec=spec, partition=self.partition)
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            script_path = log_dir / SBATCH_SCRIPT_NAME
            _write_atomically(script_path, script, mode=0o600)
        except OSError as exc:
            raise JobSubmissionError(f"cannot write the sbatch script for job {spec.job_name!r}: {exc}") from exc
        command = sbatch_command(sbatch=self.sbatch, script_path=script_path, extra_args=self.extra_sbatch_args)
        job_id = self._sbatch(command, job_name=spec.job_name, script_path=script_path)
        with self._lock:
            self._log_dirs[job_id] = log_dir
        return job_id

    def _sbatch(self, command: list[str], *, job_name: str, script_path: Path) -> str:
        """sbatch, retried while the controller cannot be reached, and never submitting a job twice.

        After a try whose outcome is unknown (it timed out, or the connection failed, possibly after slurmctld
        took the job), the job is looked up by its name before the next try; the caller's job names are unique
        (one per attempt), so a job of that name is this submission and its id is returned. Only a lookup that
        answered "none" lets sbatch run again; a failed lookup counts as one more transient failure.
        """
        outcome_unknown = False

        def attempt() -> subprocess.CompletedProcess[str]:
            nonlocal outcome_unknown
            if outcome_unknown:
                lookup = self._commands.once(job_ids_by_name_command(self.squeue, job_name))
                if lookup.returncode != 0:
                    raise TransientCommandError(command_failed(lookup))
                found = parse_job_ids_by_name(lookup.stdout)
                if found:
                    return subprocess.CompletedProcess(command, 0, stdout=found[0], stderr="")
            outcome_unknown = True
            result = self._commands.once(command, env=sbatch_environment(os.environ))
            if result.returncode != 0 and transient_sbatch_failure(result.stderr):
                raise TransientCommandError(command_failed(result))
            return result

        try:
            result = self._commands.retrying(attempt)
        except SchedulerCommandError as exc:
            raise JobSubmissionError(f"could not submit job {job_name!r}: {exc}") from exc
        if result.returncode != 0:
            raise JobSubmissionError(
                f"sbatch refused job {job_name!r} (exit {result.returncode}): {result.stderr.strip()} "
                f"[script: {script_path}]"
            )
        return parse_sbatch_parsable(result.stdout)

    def submit_many(self, specs: Sequence[JobSpec]) -> list[str]:
        """Submits concurrently (sbatch takes a few ms each); all or nothing, ids in `specs` order."""
        if not specs:
            return []
        workers = min(len(specs), self.max_parallel_submissions)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sbatch") as pool:
            futures = [pool.submit(self.submit, spec) for spec in specs]
        submitted: list[str] = []
        errors: list[HpcError] = []
        for future in futures:
            exc = future.exception()
            if exc is None:
                submitted.append(future.result())
            elif isinstance(exc, HpcError):
                errors.append(exc)
            else:
                raise exc
        if errors:
            for job_id in submitted:
                try:
                    self.cancel(job_id)
                except HpcError:
                    pass  # best effort: the submission error is what the caller must see
            raise JobSubmissionError(
                f"{len(errors)} of {len(specs)} jobs were refused, the {len(submitted)} accepted ones were "
                f"cancelled again; first error: {errors[0]}"
            ) from errors[0]
        return submitted

    # --- status ---------------------------------------------------------------------------------

    def status_many(self, job_ids: Sequence[str]) -> dict[str, JobInfo]:
        return self._status(job_ids, max_calls=None)

    def status_within(self, job_ids: Sequence[str], *, max_calls: int) -> dict[str, JobInfo]:
        """squeue, then sacct / scontrol only while ``max_calls`` allows: a job that left the queue but could not
        be asked about within the budget is reported RUNNING (reason says so) and settled at the next poll."""
        return self._status(job_ids, max_calls=max(1, max_calls))

    def _status(self, job_ids: Sequence[str], *, max_calls: int | None) -> dict[str, JobInfo]:
        wanted = list(dict.fromkeys(job_ids))
        invalid = [job_id for job_id in wanted if not is_valid_job_id(job_id)]
        if invalid:
            raise UnknownJobError(
                f"{invalid!r} are not Slurm job ids (digits, or <job>_<task> for array tasks)", job_ids=invalid
            )
        if not wanted:
            return {}
        infos: dict[str, JobInfo] = {}
        calls_before = self.scheduler_queries
        for job_id, info in self._query_squeue(wanted).items():
            # squeue lists only unfinished jobs; a finished one's exit code and usage come from below.
            if job_id in wanted and not info.is_terminal:
                infos[job_id] = info
        # Jobs squeue does not list have finished. A non-terminal answer for them from sacct is stale
        # (slurmdbd lags slurmctld by up to seconds), so such jobs are asked of the next source too.
        unresolved = [job_id for job_id in wanted if job_id not in infos]
        answered_by_fallback: set[str] = set()
        for query in (self._query_sacct, self._query_scontrol, self._query_jobcomp):
            if not unresolved:
                break
            skipped = query == self._query_jobcomp or (query == self._query_sacct and self._accounting_disabled)
            if not skipped and max_calls is not None and self.scheduler_queries - calls_before >= max_calls:
                for job_id in unresolved:
                    known = infos.get(job_id)
                    infos[job_id] = replace(known, deferred=True) if known else _left_the_queue(job_id)
                break
            found = query(unresolved)
            for job_id in unresolved:
                if job_id in found:
                    infos[job_id] = found[job_id]
                    if query != self._query_sacct:
                        answered_by_fallback.add(job_id)
            unresolved = [job_id for job_id in unresolved if job_id not in infos or not infos[job_id].is_terminal]
        missing = [job_id for job_id in wanted if job_id not in infos]
        if missing:
            raise UnknownJobError(
                f"Slurm knows nothing of jobs {missing!r} (not in squeue, sacct, scontrol or the jobcomp "
                "file): never submitted on this cluster, or purged",
                job_ids=missing,
                known={
                    job_id: self._await_accounting(infos[job_id], job_id in answered_by_fallback)
                    for job_id in wanted
                    if job_id in infos
                },
            )
        return {job_id: self._await_accounting(infos[job_id], job_id in answered_by_fallback) for job_id in wanted}

    def _await_accounting(self, info: JobInfo, answered_by_fallback: bool) -> JobInfo:
        """Hold back a finished job that only scontrol/jobcomp know about while sacct works.

        slurmdbd records a job's end a moment after slurmctld (seen: up to seconds); reporting the job
        finished from scontrol would lose its CPU time and peak memory for good. So for up to
        `accounting_grace_seconds` it is reported as still finishing (RUNNING, reason COMPLETING).
        """
        job_id = info.job_id
        if not info.is_terminal or not answered_by_fallback or self._accounting_disabled is not False:
            self._awaiting_accounting.pop(job_id, None)
            return info
        now = time.monotonic()
        first_seen = self._awaiting_accounting.setdefault(job_id, now)
        if now - first_seen >= self.accounting_grace_seconds:
            self._awaiting_accounting.pop(job_id, None)
            return info
        return JobInfo(
            job_id=job_id,
            state=JobState.RUNNING,
            wall_time_seconds=info.wall_time_seconds,
            reason="COMPLETING (finished; waiting for slurmdbd to record its usage)",
        )

    def _query_squeue(self, job_ids: list[str]) -> dict[str, JobInfo]:
        result = self._run(
            squeue_command(self.squeue, job_ids),
            accept=lambda result: result.returncode == 0 or squeue_reports_no_such_job(result.stderr),
        )
        if result.returncode != 0:
            return {}  # every id unknown
        return parse_squeue(result.stdout)

    def _query_sacct(self, job_ids: list[str]) -> dict[str, JobInfo]:
        if self._accounting_disabled:
            return {}
        result = self._run(
            sacct_command(self.sacct, job_ids),
            accept=lambda result: result.returncode == 0 or _says_accounting_disabled(result),
        )
        if _says_accounting_disabled(result):
            self._accounting_disabled = True
            return {}
        self._accounting_disabled = False
        return parse_sacct(result.stdout)

    def _query_scontrol(self, job_ids: list[str]) -> dict[str, JobInfo]:
        # One call for all jobs slurmctld holds; per-id calls would be one query per job.
        result = self._run(scontrol_show_jobs_command(self.scontrol))
        return parse_scontrol_show_job(result.stdout)

    def _query_jobcomp(self, job_ids: list[str]) -> dict[str, JobInfo]:
        path = self._find_jobcomp_path()
        if path is None:
            return {}
        try:
            with path.open(encoding="utf-8", errors="replace") as handle:
                return parse_jobcomp(handle, job_ids=job_ids)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise SchedulerCommandError(
                f"cannot read the Slurm job-completion file {path}: {exc}",
                command=("read", str(path)),
                returncode=None,
                stderr=str(exc),
            ) from exc

    def _find_jobcomp_path(self) -> Path | None:
        if self._jobcomp_looked_up:
            return self._jobcomp_path
        result = self._run([self.scontrol, "show", "config"])
        settings: dict[str, str] = {}
        for line in result.stdout.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                settings[key.strip()] = value.strip()
        if settings.get("JobCompType") == "jobcomp/filetxt" and settings.get("JobCompLoc"):
            self._jobcomp_path = Path(settings["JobCompLoc"])
        self._jobcomp_looked_up = True
        return self._jobcomp_path

    # --- cancel / logs --------------------------------------------------------------------------

    def cancel(self, job_id: str) -> None:
        """scancel; Slurm ignores finished and unknown jobs silently, and so does this."""
        _require_job_id(job_id)
        self._run([self.scancel, job_id])

    def logs(self, job_id: str, *, tail_lines: int = 50) -> str:
        _require_job_id(job_id)
        stdout_path, stderr_path = self._log_paths(job_id)
        return read_log_tail([stdout_path, stderr_path], tail_lines=tail_lines)

    def _log_paths(self, job_id: str) -> tuple[Path, Path]:
        with self._lock:
            log_dir = self._log_dirs.get(job_id)
        if log_dir is not None:
            return slurm_log_paths(log_dir, job_id)
        # A job submitted by another process: slurmctld knows its paths while it holds the job ...
        # Finding the files is best effort (the caller wants a log tail for a message): a failed lookup is not
        # retried, the next source is asked instead; only a timeout is tried again.
        result = self._run([self.scontrol, "--oneliner", "show", "job", job_id], accept=_any_answer)
        if result.returncode == 0:
            for line in result.stdout.splitlines():
                fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
                if fields.get("StdOut") and fields.get("StdErr"):
                    # scontrol expands %j but shows our '%%' escapes (for '%' in the path) as written.
                    return Path(fields["StdOut"].replace("%%", "%")), Path(fields["StdErr"].replace("%%", "%"))
        # ... and accounting keeps the submit line, whose last argument is <log_dir>/job.sbatch.
        if not self._accounting_disabled:
            result = self._run(
                [self.sacct, "--noheader", "--parsable2", f"--jobs={job_id}", "--format=SubmitLine"],
                accept=_any_answer,
            )
            for line in result.stdout.splitlines():
                script = line.strip().rsplit(" ", 1)[-1]
                if script.endswith("/" + SBATCH_SCRIPT_NAME):
                    return slurm_log_paths(Path(script).parent, job_id)
        raise UnknownJobError(
            f"cannot find the log files of Slurm job {job_id}: neither scontrol nor sacct knows its "
            "submit script; read <log_dir>/slurm-<job id>.out directly",
            job_ids=[job_id],
        )

    # --- plumbing -------------------------------------------------------------------------------

    def _run(
        self,
        command: list[str],
        *,
        accept: Callable[[subprocess.CompletedProcess[str]], bool] = lambda result: result.returncode == 0,
    ) -> subprocess.CompletedProcess[str]:
        """A query or scancel, retried until `accept` holds (see `commands`)."""
        return self._commands(command, accept=accept)


def _left_the_queue(job_id: str) -> JobInfo:
    """A job squeue no longer lists, not asked about further within this poll's scheduler calls."""
    return JobInfo(
        job_id=job_id,
        state=JobState.RUNNING,
        reason="left the queue; its end is asked of accounting at the next poll (scheduler call budget)",
        deferred=True,
    )


def _any_answer(_result: subprocess.CompletedProcess[str]) -> bool:
    return True


def _says_accounting_disabled(result: subprocess.CompletedProcess[str]) -> bool:
    return accounting_disabled(result.stderr) or accounting_disabled(result.stdout)


def _require_job_id(job_id: str) -> None:
    if not is_valid_job_id(job_id):
        raise UnknownJobError(f"{job_id!r} is not a Slurm job id (digits, or <job>_<task>)", job_ids=[job_id])


def _write_atomically(path: Path, text: str, *, mode: int) -> None:
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(temp_name, mode)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
