"""Builds the sbatch script for one JobSpec, and the sbatch call that submits it. Pure functions.

The script is the one place where a shell sees user values, so every value in it is either checked
against a strict pattern (`#SBATCH` lines: names, partition, paths) or passed through shlex.quote
(environment values, every command argument).

The payload is started with `exec`, so it replaces the batch shell and becomes the batch step's main
process: `--signal=B:TERM@<s>` (sent to the batch shell only) and Slurm's TERM at the time limit or on
scancel then reach the payload itself rather than a shell that would not forward them.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from ccat_dagster.execution.hpc.base import InvalidJobSpecError, JobResources, JobSpec, JobSubmissionError

__all__ = [
    "SBATCH_SCRIPT_NAME",
    "build_sbatch_script",
    "format_time_limit",
    "memory_request",
    "parse_sbatch_parsable",
    "pre_walltime_signal_seconds",
    "sbatch_command",
    "sbatch_environment",
    "slurm_log_paths",
]

SBATCH_SCRIPT_NAME = "job.sbatch"
# Slurm stores --signal's lead time in 16 bits.
_MAX_SIGNAL_SECONDS = 65535
_PARTITION = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# `#SBATCH` lines are split by sbatch, not by a shell: allow only characters that need no quoting.
# '%' is allowed (sub_group_keys are %XX-encoded) and written as '%%' in --output/--error, where a
# single '%' starts a Slurm filename pattern.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_./+,=@:~%-]*$")


def format_time_limit(seconds: int) -> str:
    """Seconds -> "HH:MM:SS" (hours may exceed 24; Slurm rounds the limit up to whole minutes)."""
    if seconds < 1:
        raise InvalidJobSpecError(f"time limit {seconds} s: must be at least 1 s")
    hours, remainder = divmod(seconds, 3600)
    minutes, secs = divmod(remainder, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def memory_request(resources: JobResources) -> str:
    """`--mem` value: whole GiB, rounded up (1.5 -> "2G")."""
    return f"{max(1, math.ceil(round(resources.memory_gb, 6)))}G"


def pre_walltime_signal_seconds(spec: JobSpec) -> int:
    """Lead time of the pre-walltime SIGTERM, at most half of the (minute-rounded) time limit.

    Without the clamp a short job would get its "time is nearly up" signal right at the start.
    """
    effective_limit = math.ceil(spec.resources.time_limit_seconds / 60) * 60
    return min(spec.pre_walltime_signal_seconds, effective_limit // 2, _MAX_SIGNAL_SECONDS)


def slurm_log_paths(log_dir: Path, job_id: str) -> tuple[Path, Path]:
    """Where Slurm writes the job's stdout and stderr (`--output` / `--error` with %j expanded)."""
    return log_dir / f"slurm-{job_id}.out", log_dir / f"slurm-{job_id}.err"


def _checked_path(path: Path, *, what: str) -> str:
    text = str(path)
    if not _SAFE_PATH.fullmatch(text):
        raise InvalidJobSpecError(
            f"{what}={text!r}: must be an absolute path of letters, digits and _ . / + , = @ : ~ % - only "
            "(it is written into an #SBATCH line)"
        )
    return text


def build_sbatch_script(*, spec: JobSpec, partition: str | None = None) -> str:
    """The complete sbatch script for `spec` (see module docstring for why `exec`)."""
    if partition is not None and not _PARTITION.fullmatch(partition):
        raise InvalidJobSpecError(f"partition={partition!r}: use letters, digits, _ . - only")
    log_dir = _checked_path(spec.log_dir, what="log_dir")
    resources = spec.resources
    directives = [
        f"--job-name={spec.job_name}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={resources.cpu}",
        f"--mem={memory_request(resources)}",
        f"--time={format_time_limit(resources.time_limit_seconds)}",
    ]
    if resources.gpus > 0:
        directives.append(f"--gres=gpu:{resources.gpus}")
    if partition is not None:
        directives.append(f"--partition={partition}")
    log_pattern = log_dir.replace("%", "%%")
    directives += [f"--output={log_pattern}/slurm-%j.out", f"--error={log_pattern}/slurm-%j.err"]
    signal_seconds = pre_walltime_signal_seconds(spec)
    if signal_seconds > 0:
        directives.append(f"--signal=B:TERM@{signal_seconds}")
    if spec.workdir is not None:
        directives.append(f"--chdir={_checked_path(spec.workdir, what='workdir')}")
    # sbatch itself runs with `sbatch_environment` (PATH, SLURM_CONF), so ALL exports just that: the submitting
    # process's environment does not leak into the job. (--export=NONE would load the user's login environment
    # on the node first, which delays every job's start; see docs/benchmarks.md.)
    directives.append("--export=ALL")

    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {directive}" for directive in directives]
    lines.append("# Written by ccat-dagster. The job sees Slurm's SLURM_* variables, the PATH (and SLURM_CONF)")
    lines.append("# of the submitting process, and the variables exported here.")
    # JobSpec already validated the names; values are quoted, so any byte but NUL is fine.
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(spec.env.items())]
    lines.append("exec " + " ".join(shlex.quote(argument) for argument in spec.command))
    return "\n".join(lines) + "\n"


def sbatch_command(*, sbatch: str, script_path: Path, extra_args: Sequence[str] = ()) -> list[str]:
    """The sbatch call; `--parsable` makes it print just "<job id>[;<cluster>]"."""
    return [sbatch, "--parsable", *extra_args, str(script_path)]


# What sbatch needs of the submitting process's environment; everything else (SBATCH_* input variables, the
# SLURM_* of an allocation the orchestrator may run in, secrets) stays out of sbatch and so out of the job.
SBATCH_ENVIRONMENT_NAMES = ("PATH", "SLURM_CONF")


def sbatch_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment sbatch runs with: PATH (a default one if unset) and SLURM_CONF from `environ`.

    The script says `--export=ALL`, so this is also what the job starts with, before the script's exports.
    """
    env = {name: environ[name] for name in SBATCH_ENVIRONMENT_NAMES if name in environ}
    env.setdefault("PATH", os.defpath)
    return env


def parse_sbatch_parsable(stdout: str) -> str:
    """`sbatch --parsable` output -> job id. Raises JobSubmissionError on anything else."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise JobSubmissionError("sbatch --parsable printed no job id")
    job_id = lines[-1].split(";", 1)[0]
    if not re.fullmatch(r"\d+", job_id):
        raise JobSubmissionError(f"sbatch --parsable printed {stdout!r}, expected '<job id>[;<cluster>]'")
    return job_id
