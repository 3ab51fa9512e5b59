"""How the ``ccat-dagster`` command line ends: exit codes and one-line messages for every expected failure.

An operator runs these commands at night, in cron jobs and pipes: an expected failure (bad input, an
unreachable ops-db, a permission problem, Ctrl-C, a reader that stopped reading) ends with ONE line on stderr
that names the problem and the fix, and an exit code a script can test. Only a bug shows a traceback.

Exit codes (README and docs/operations.md list the same):

====  ===========================================================================================
0     success
1     the command ran and found a problem (``db current`` not at head, a failed demo run, ...)
2     bad input: an option, a setting, a pipeline YAML, an id that does not exist
3     the environment: ops-db unreachable or without schema, permission denied, a missing directory
130   interrupted (Ctrl-C, SIGINT)
141   the reader of stdout went away (``ccat-dagster … | head``); nothing is printed
====  ===========================================================================================
"""

from __future__ import annotations

import errno
import os
import signal
import sys

from ccat_dagster.errors import CcatError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERRUPTED = 130
EXIT_CLOSED_PIPE = 141

PROGRAM = "ccat-dagster"


def one_line(text: object, *, limit: int = 300) -> str:
    """The first line of ``text`` with runs of whitespace collapsed, at most ``limit`` characters."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    first = " ".join(lines[0].split()) if lines else type(text).__name__
    return first if len(first) <= limit else first[: limit - 1] + "…"


def describe_failure(error: BaseException, *, ops_db: str) -> tuple[int, str] | None:
    """(exit code, message) for an expected failure, None for anything else (a bug: let it show its traceback).

    ``ops_db`` is the ops-db URL without its password, named in database messages.
    """
    from sqlalchemy import exc as sa_exc

    if isinstance(error, CcatError):
        # Written for this: one line, or a deliberate list (every problem of a pipeline YAML), kept as it is.
        return EXIT_BAD_INPUT, str(error).strip()
    if isinstance(error, sa_exc.DBAPIError | sa_exc.OperationalError):
        detail = one_line(getattr(error, "orig", None) or error)
        lowered = detail.lower()
        if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
            return EXIT_ENVIRONMENT, (
                f"ops-db at {ops_db} has no ccat-dagster schema ({detail}): run `ccat-dagster db upgrade`"
            )
        if isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
            return EXIT_ENVIRONMENT, (
                f"ops-db at {ops_db} cannot be reached ({detail}): check CCAT_OPS_DB_URL and that the database "
                "server runs (`pg_isready`; `ccat-dagster doctor` checks the whole setup)"
            )
        return None
    if isinstance(error, sa_exc.ArgumentError | sa_exc.NoSuchModuleError):
        return EXIT_BAD_INPUT, f"CCAT_OPS_DB_URL={ops_db} is not usable ({one_line(error)}): fix the URL"
    if isinstance(error, PermissionError):
        where = error.filename or "a file"
        return EXIT_ENVIRONMENT, (
            f"{where}: {error.strerror or 'permission denied'}: give this user access to it, or point "
            "CCAT_DAGSTER_DATA_DIR / CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR at a directory it may write"
        )
    if isinstance(error, FileNotFoundError) and error.filename:
        return EXIT_BAD_INPUT, f"{error.filename}: no such file or directory: check the path"
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
        return EXIT_ENVIRONMENT, f"{error.filename or 'a write'} failed: {error.strerror}: free space or fix the mount"
    return None


def print_error(message: str) -> None:
    print(f"{PROGRAM}: error: {message}", file=sys.stderr, flush=True)


def print_warning(message: str) -> None:
    print(f"{PROGRAM}: warning: {message}", file=sys.stderr, flush=True)


def print_interrupted() -> None:
    """The Ctrl-C line; a second Ctrl-C while it is printed must not show a traceback either."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals cannot arrive here anyway
        previous = None
    try:
        print_error("interrupted; ops-db keeps what was committed (re-run the command to go on)")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def silence_stdout() -> None:
    """After stdout's reader has gone (``| head``): leave quietly, as coreutils do.

    Python flushes stdout once more at exit; pointing it at /dev/null first keeps that flush from raising a
    second BrokenPipeError (the recipe in Python's ``signal`` documentation).
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
