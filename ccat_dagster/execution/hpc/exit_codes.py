"""Exit codes in words. Standard library only: the local job wrapper imports it once per job."""

SIGKILL_EXIT_CODE = 137


def describe_exit_code(exit_code: int | None, *, signal_number: int | None = None) -> str | None:
    """A human reason for a non-zero exit, or None for success / unknown.

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
