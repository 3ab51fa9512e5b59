"""Ops-db that is briefly unavailable is waited out, not treated as the attempts' failure.

``ResilientAttemptStore`` wraps any ``AttemptStore``: a call that fails because the database connection failed
(PostgreSQL restarting, a network blip, a fail-over) is retried with exponential back-off (tenacity) until it
succeeds or ``tolerance_seconds`` have passed since its first failure; then the error propagates, and the
attempts stay as ops-db last recorded them (non-terminal, with their job ids) for a later run to adopt. Every
``AttemptStore`` method is safe to repeat (see ``execution.attempts``). Only connection errors are retried: a
constraint violation or a refused registration is an answer, not an outage.

Time is injected (``clock``, ``sleep``) so that tests run the back-off in milliseconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import tenacity
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from ccat_dagster.execution.attempts import AttemptStore

log = logging.getLogger(__name__)


def is_transient_db_error(error: BaseException) -> bool:
    """True for errors that say the connection failed, not that the statement was wrong."""
    if isinstance(error, OperationalError | InterfaceError):
        return True
    return isinstance(error, DBAPIError) and bool(error.connection_invalidated)


class ResilientAttemptStore(AttemptStore):
    """Retries the wrapped store's calls through ops-db outages of up to ``tolerance_seconds``."""

    def __init__(
        self,
        inner: AttemptStore,
        *,
        tolerance_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        report: Callable[[str], None] = lambda _message: None,
        max_backoff_seconds: float = 30.0,
    ) -> None:
        self.inner = inner
        self.tolerance_seconds = tolerance_seconds
        self.clock = clock
        self.sleep = sleep
        self.report = report
        self.max_backoff_seconds = max_backoff_seconds

    def through_outages(self, name: str, action: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``action(*args, **kwargs)``, retried while ops-db connections fail, for up to the tolerance.

        Also for callers outside the store that read ops-db before they write anything (staging, preparation).
        """
        try:  # the common case without tenacity's per-call set-up, which costs more than a fast ops-db call
            return action(*args, **kwargs)
        except Exception as error:
            if not is_transient_db_error(error):
                raise
        began = self.clock()

        def out_of_patience(_state: tenacity.RetryCallState) -> bool:
            return self.clock() - began >= self.tolerance_seconds

        def say(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            first_line = str(error).strip().splitlines()[0] if error and str(error).strip() else repr(error)
            message = (
                f"waiting for ops-db ({name}, try {state.attempt_number}, {self.clock() - began:.0f} s of "
                f"{self.tolerance_seconds:.0f} s): {first_line}"
            )
            log.warning(message)
            self.report(message)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient_db_error),
            stop=out_of_patience,
            wait=tenacity.wait_exponential(multiplier=0.5, max=self.max_backoff_seconds),
            sleep=self.sleep,
            before_sleep=say,
            reraise=True,
        )
        return retrying(action, *args, **kwargs)

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.through_outages(name, getattr(self.inner, name), *args, **kwargs)

    def create_round(self, *args, **kwargs):
        return self._call("create_round", *args, **kwargs)

    def mark_submitted(self, *args, **kwargs):
        return self._call("mark_submitted", *args, **kwargs)

    def mark_running(self, *args, **kwargs):
        return self._call("mark_running", *args, **kwargs)

    def mark_collecting(self, *args, **kwargs):
        return self._call("mark_collecting", *args, **kwargs)

    def register_round(self, *args, **kwargs):
        return self._call("register_round", *args, **kwargs)

    def fail(self, *args, **kwargs):
        return self._call("fail", *args, **kwargs)

    def adopt(self, *args, **kwargs):
        return self._call("adopt", *args, **kwargs)

    def _hold_in_flight(self, plan):
        # Not reached through adopt above (the inner store's adopt holds its own attempt); there for completeness.
        return self.inner._hold_in_flight(plan)

    def count_in_flight(self, *args, **kwargs):
        return self._call("count_in_flight", *args, **kwargs)

    def last_failures(self, *args, **kwargs):
        return self._call("last_failures", *args, **kwargs)
