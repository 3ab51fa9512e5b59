"""Exit codes in words: the ONE place that says what an exit code or a killing signal means.

Standard library only: the local job wrapper imports it once per job. ``describe_exit_code`` is the short
reason a backend records for a job (``JobInfo.reason``); ``explain_exit_code`` is the sentence the container
contract documents for a container author (``contract.describe_exit_code``). Both follow the shell convention
(128 + N for a process killed by signal N) and accept Python's negative codes (-N) too.
"""

from __future__ import annotations

import signal

SIGKILL_EXIT_CODE = 137
SIGTERM_EXIT_CODE = 143


def signal_of(exit_code: int | None) -> int | None:
    """The number of the signal that killed the process, from a shell-style (128 + N) or negative code."""
    if exit_code is None or exit_code == 0:
        return None
    if exit_code < 0:
        return -exit_code
    if 128 < exit_code < 160:
        return exit_code - 128
    return None


def signal_name(signal_number: int) -> str:
    try:
        return signal.Signals(signal_number).name
    except ValueError:
        return f"signal {signal_number}"


def describe_exit_code(exit_code: int | None, *, signal_number: int | None = None) -> str | None:
    """A short human reason for a non-zero exit, or None for success / unknown.

    137 is spelled out because it is the usual face of an out-of-memory kill.
    """
    if signal_number:
        if signal_number == 9:
            return "killed by signal 9 (SIGKILL: killed, or out of memory)"
        return f"killed by signal {signal_number}"
    if exit_code is None or exit_code == 0:
        return None
    if exit_code == SIGKILL_EXIT_CODE:
        return "exit code 137 (killed by SIGKILL: killed, or out of memory)"
    if exit_code > 128:
        return f"exit code {exit_code} (killed by signal {exit_code - 128})"
    return f"exit code {exit_code}"


def explain_exit_code(exit_code: int) -> str:
    """What a container's exit code means under the contract (0 = success, anything else fails the attempt)."""
    if exit_code == 0:
        return "exit code 0: success"
    number = signal_of(exit_code)
    if number == 9:
        return (
            f"exit code {exit_code}: killed (SIGKILL), most often out of memory or cancelled; "
            "check the job's peak memory and raise the step's memory request if it hit the limit"
        )
    if number == 15:
        return (
            f"exit code {exit_code}: killed by SIGTERM, most often the pre-walltime warning or a cancel; "
            "a payload that handles SIGTERM can save its work before the time limit"
        )
    if number is not None:
        return f"exit code {exit_code}: killed by {signal_name(number)}"
    return f"exit code {exit_code}: the software reported failure (see its logs)"
