"""Running Slurm's client commands, with transient trouble retried.

slurmctld is restarted routinely (upgrades, configuration changes, a fail-over), and while it is away or
overloaded every squeue / sacct / sbatch / scontrol / scancel fails ("Unable to contact slurm controller",
"Socket timed out on send/recv operation") or hangs until the command timeout. Such a failure says nothing about
the jobs, so each call is retried with exponential back-off and jitter (tenacity) for a short budget
(`SlurmCommandRunner.retry_seconds`, default 30 s); only then does it raise SchedulerCommandError, which the
caller (the runner) tolerates for much longer. A command that times out counts as transient.

Which answers are final is the caller's to say (`accept`): squeue's "Invalid job id specified" and sacct's
"accounting storage is disabled" are answers, not trouble. sbatch is the exception: it is not idempotent, so it
is retried only when `transient_sbatch_failure` says the controller could not be reached, and never blindly (see
`SlurmBackend.submit`, which looks the job up by its name before submitting it again).
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import tenacity

from ccat_dagster.execution.hpc.base import SchedulerCommandError

__all__ = [
    "CommandRun",
    "SlurmCommandRunner",
    "TransientCommandError",
    "transient_sbatch_failure",
]

log = logging.getLogger(__name__)

CommandRun = Callable[..., "subprocess.CompletedProcess[str]"]

# What Slurm's clients print when slurmctld (or slurmdbd) cannot be reached or is too busy to answer: the
# request may not have arrived, so asking again is right. Anything else from sbatch is the controller's verdict
# on the job (bad partition, impossible request, ...) and asking again would give the same answer.
_TRANSIENT_MESSAGES = (
    "unable to contact slurm controller",
    "socket timed out on send/recv operation",
    "slurm temporarily unable to accept job",
    "zero bytes were transmitted or received",
    "communication connection failure",
    "connection refused",
    "connection timed out",
    "connection reset by peer",
    "resource temporarily unavailable",
    "in standby mode",
    "unable to establish connection",
)


def transient_sbatch_failure(stderr: str) -> bool:
    """True when sbatch failed because the controller could not be reached, not because it refused the job."""
    text = stderr.lower()
    return any(message in text for message in _TRANSIENT_MESSAGES)


class TransientCommandError(Exception):
    """One failed try of a command (internal: what the retry loop retries)."""

    def __init__(self, error: SchedulerCommandError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class SlurmCommandRunner:
    """Runs one Slurm client command at a time, retrying transient failures.

    `timeout_seconds`: how long one try may take. `retry_seconds` / `retry_attempts`: the budget of one call,
    whichever ends first (a try that times out uses `timeout_seconds` of it). `run` and `sleep` are injected
    so tests drive the retries with fake commands and no waiting.
    """

    timeout_seconds: float = 60.0
    retry_seconds: float = 30.0
    retry_attempts: int = 8
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 8.0
    run: CommandRun = subprocess.run
    sleep: Callable[[float], None] = time.sleep
    tries: Counter[str] = field(default_factory=Counter)
    """How often each command (by its first argument) was run, every retry included: what the controller felt."""

    def __post_init__(self) -> None:
        if self.retry_attempts < 1:
            raise ValueError(f"retry_attempts={self.retry_attempts}: must be >= 1")
        if self.retry_seconds < 0:
            raise ValueError(f"retry_seconds={self.retry_seconds}: must be >= 0")

    def __call__(
        self,
        command: Sequence[str],
        *,
        accept: Callable[[subprocess.CompletedProcess[str]], bool] = lambda result: result.returncode == 0,
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` until `accept(result)` holds; SchedulerCommandError once the budget is spent.

        A missing command is not retried (it will not appear by itself).
        """

        def attempt() -> subprocess.CompletedProcess[str]:
            result = self.once(command)
            if not accept(result):
                raise TransientCommandError(command_failed(result))
            return result

        return self.retrying(attempt)

    def retrying(self, attempt: Callable[[], subprocess.CompletedProcess[str]]) -> subprocess.CompletedProcess[str]:
        """Call `attempt` until it returns; it raises TransientCommandError (or a timeout's SchedulerCommandError
        wrapped in one) for a try worth repeating. The last error is raised once the budget is spent."""
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.retry_attempts) | tenacity.stop_after_delay(self.retry_seconds),
            wait=tenacity.wait_exponential_jitter(
                multiplier=self.backoff_initial_seconds,
                max=self.backoff_max_seconds,
                jitter=self.backoff_initial_seconds,
            ),
            retry=tenacity.retry_if_exception_type(TransientCommandError),
            sleep=self.sleep,
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except TransientCommandError as exc:
            attempts = retrying.statistics.get("attempt_number", 1)
            error = exc.error
            raise SchedulerCommandError(
                f"{error} (tried {attempts} time(s) over "
                f"{retrying.statistics.get('delay_since_first_attempt', 0):.0f} s; the scheduler may be restarting)",
                command=error.command,
                returncode=error.returncode,
                stderr=error.stderr,
            ) from error

    def once(self, command: Sequence[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """One try: the finished process, or TransientCommandError when it timed out. A missing command raises
        SchedulerCommandError at once. `env`: the command's whole environment (None: this process's)."""
        command = list(command)
        self.tries[command[0]] += 1
        try:
            return self.run(
                command,
                capture_output=True,
                text=True,
                timeout=self.timeout_seconds,
                check=False,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except FileNotFoundError as exc:
            raise SchedulerCommandError(
                f"{command[0]!r} not found: install the Slurm client commands or pass its path to SlurmBackend",
                command=command,
                returncode=None,
                stderr=str(exc),
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise TransientCommandError(
                SchedulerCommandError(
                    f"{' '.join(command[:2])} ... did not answer within {self.timeout_seconds} s "
                    "(slurmctld overloaded or down?)",
                    command=command,
                    returncode=None,
                    stderr="",
                )
            ) from exc


def command_failed(result: subprocess.CompletedProcess[str]) -> SchedulerCommandError:
    command = [str(part) for part in result.args]
    return SchedulerCommandError(
        f"{command[0]} failed (exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}",
        command=command,
        returncode=result.returncode,
        stderr=result.stderr,
    )


def _log_retry(state: tenacity.RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning("%s; retrying in %.1f s (try %d)", error, wait, state.attempt_number + 1)
