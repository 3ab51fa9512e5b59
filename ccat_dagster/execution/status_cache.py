"""One status query for all jobs of a processing location, shared by every run worker that watches jobs there.

Each run worker (one per Dagster run) polls its own jobs; without sharing, N runs of a location would send N
squeue/sacct pairs per poll interval to the same slurmctld. ``SharedStatusCache`` lets them share one query
through a small directory on the pipeline file system, one per backend and location:

- ``watch/<watcher>.json``: the job ids one poller waits for, rewritten at each of its polls with the time it
  did so. A watcher that dies leaves its file behind; it counts for ``watch_ttl_seconds``, then the next query
  deletes it.
- ``answers.json``: the last query's answer for the union of every live watcher's jobs, when it was asked,
  whether it failed, and how many scheduler calls each recent query cost (the last minute).
- ``query.lock``: held (``flock``) only by the one worker sending the query. A worker that finds it held does
  not wait for it: it takes whatever the last answer says about its jobs and looks again at its next poll.

A poller asks the scheduler only when the last answer is older than ``max_age_seconds`` and the location's
budget of ``queries_per_minute`` allows another query; otherwise it reads the answer file. So at steady state
the location sends at most the budget, whatever the number of runs, and each answer is at most one poll
interval old (a state that is a few seconds late delays a collection; it never changes an outcome, because
the terminal state a job reaches is the one cached next).

Crash safety: the lock is the kernel's and goes with the process; answers are replaced atomically
(write-then-rename), so a reader sees the old answer or the new one, never a mix; a damaged file reads as "no
answer yet" and the next query rewrites it. Nothing here decides an outcome: an answer is only what the
scheduler said, the same as the poller would have heard asking alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ccat_dagster.execution.hpc.base import JobInfo, JobState
from ccat_dagster.opsdb.enums import FailureKind

__all__ = ["CachedAnswer", "SharedStatusCache", "StatusQuery", "cache_directory"]

log = logging.getLogger(__name__)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
WINDOW_SECONDS = 60.0

StatusQuery = Callable[[list[str], int], dict[str, JobInfo]]
"""Asks the scheduler about the given jobs in at most the given number of calls (what the location's budget has
left this minute); returns an answer for each, or raises (the scheduler's trouble)."""


def cache_directory(root: Path, *, backend: str, processing_location_id: int) -> Path:
    """The cache of one backend at one processing location, under ``root``; the name is checked, not trusted."""
    name = f"{backend}-{processing_location_id}"
    if not _SAFE_NAME.fullmatch(name):
        raise ValueError(f"backend name {backend!r}: a status cache name must match {_SAFE_NAME.pattern}")
    return root / name


@dataclass(frozen=True)
class CachedAnswer:
    """What the last query said about the asked jobs (those it covered), and whether it was this worker's own."""

    infos: dict[str, JobInfo]
    asked_at: float | None
    error: str | None
    queried: bool
    """True when this call sent the query itself."""
    calls: int = 0
    """Scheduler calls the query behind this answer cost (0: none recorded yet)."""


class SharedStatusCache:
    """The status of a location's jobs, asked of the scheduler at most once per ``max_age_seconds`` by all workers.

    ``clock`` is wall time shared by all processes (``time.time``); tests inject one clock for all their
    workers. ``queries_per_minute`` bounds the scheduler calls all workers of the location send in any minute;
    ``count_calls`` is the backend's running count of scheduler calls (``HpcBackend.scheduler_queries``), so a
    query that cost squeue and sacct counts two (a backend that counts nothing counts one per query).
    """

    def __init__(
        self,
        directory: Path,
        *,
        clock: Callable[[], float],
        queries_per_minute: float,
        count_calls: Callable[[], int] = lambda: 0,
        watch_ttl_seconds: float = 600.0,
        watcher: str | None = None,
    ) -> None:
        if queries_per_minute <= 0:
            raise ValueError(f"queries_per_minute={queries_per_minute!r}: must be > 0")
        self.directory = directory
        self.clock = clock
        self.queries_per_minute = queries_per_minute
        self.count_calls = count_calls
        self.watch_ttl_seconds = watch_ttl_seconds
        self.watcher = watcher or uuid.uuid4().hex
        if not _SAFE_NAME.fullmatch(self.watcher):
            raise ValueError(f"watcher={self.watcher!r}: must match {_SAFE_NAME.pattern}")
        self._watch_dir = directory / "watch"
        self._answers = directory / "answers.json"
        self._lock = directory / "query.lock"
        self._watch_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # ------------------------------------------------------------------ the one entry point

    def fetch(self, job_ids: Sequence[str], query: StatusQuery, *, max_age_seconds: float) -> CachedAnswer:
        """The freshest answer about ``job_ids``: the cached one while it is younger than ``max_age_seconds``
        (or while another worker is asking, or the budget is spent), else a new query for every watched job.

        The query's exceptions propagate (after the failure is recorded for the other workers)."""
        self._watch(job_ids)
        answer = self._read()
        if self._fresh(answer, max_age_seconds):
            return self._answer_for(job_ids, answer, queried=False)
        with _query_lock(self._lock) as locked:
            if not locked:
                return self._answer_for(job_ids, answer, queried=False)
            answer = self._read()  # someone may have answered while this worker waited for the lock
            if self._fresh(answer, max_age_seconds) or not self._budget_allows(answer):
                return self._answer_for(job_ids, answer, queried=False)
            return self._query(job_ids, query, answer)

    def close(self) -> None:
        """This watcher waits for nothing any more (its batch ended)."""
        (self._watch_dir / f"{self.watcher}.json").unlink(missing_ok=True)

    # ------------------------------------------------------------------ parts

    def _query(self, job_ids: Sequence[str], query: StatusQuery, previous: dict[str, Any]) -> CachedAnswer:
        wanted = self._watched(extra=job_ids)
        now = self.clock()
        recent = [e for e in _recent(previous) if now - e[0] < WINDOW_SECONDS]
        before = self.count_calls()
        allowance = max(1, int(self.queries_per_minute - sum(calls for _, calls in recent)))
        try:
            infos = query(wanted, allowance)
        except BaseException as error:
            calls = max(1, self.count_calls() - before)
            self._write({"asked_at": now, "error": _one_line(error), "infos": {}, "recent": [*recent, [now, calls]]})
            raise
        # A query that had to leave a job for later costs what it skipped too: the next one gets room for it.
        calls = max(1, self.count_calls() - before) + any(info.deferred for info in infos.values())
        self._write(
            {
                "asked_at": now,
                "error": None,
                "infos": {job_id: _encode(info) for job_id, info in infos.items()},
                "recent": [*recent, [now, calls]],
            }
        )
        return CachedAnswer(
            infos={k: infos[k] for k in job_ids if k in infos}, asked_at=now, error=None, queried=True, calls=calls
        )

    def _watch(self, job_ids: Sequence[str]) -> None:
        _write_json(self._watch_dir / f"{self.watcher}.json", {"seen": self.clock(), "jobs": list(job_ids)})

    def _watched(self, *, extra: Sequence[str]) -> list[str]:
        """Every job a live watcher waits for (this one's first); the files of dead watchers are removed."""
        now = self.clock()
        jobs: dict[str, None] = dict.fromkeys(extra)
        for path in sorted(self._watch_dir.glob("*.json")):
            data = _read_json(path)
            seen = data.get("seen") if isinstance(data, dict) else None
            if not isinstance(seen, int | float) or now - seen > self.watch_ttl_seconds:
                path.unlink(missing_ok=True)
                continue
            listed = data.get("jobs")
            if isinstance(listed, list):
                jobs.update(dict.fromkeys(j for j in listed if isinstance(j, str)))
        return list(jobs)

    def _fresh(self, answer: dict[str, Any], max_age_seconds: float) -> bool:
        asked_at = answer.get("asked_at")
        return isinstance(asked_at, int | float) and 0 <= self.clock() - asked_at < max_age_seconds

    def _budget_allows(self, answer: dict[str, Any]) -> bool:
        """Whether one more query of the last one's cost stays within the location's calls per minute."""
        now = self.clock()
        window = [calls for at, calls in _recent(answer) if now - at < WINDOW_SECONDS]
        expected = window[-1] if window else 1
        return sum(window) + expected <= self.queries_per_minute

    def _answer_for(self, job_ids: Sequence[str], answer: dict[str, Any], *, queried: bool) -> CachedAnswer:
        stored = answer.get("infos") if isinstance(answer.get("infos"), dict) else {}
        infos: dict[str, JobInfo] = {}
        for job_id in job_ids:
            info = _decode(job_id, stored.get(job_id))
            if info is not None:
                infos[job_id] = info
        asked_at = answer.get("asked_at")
        recent = _recent(answer)
        return CachedAnswer(
            infos=infos,
            asked_at=asked_at if isinstance(asked_at, int | float) else None,
            error=answer.get("error") if isinstance(answer.get("error"), str) else None,
            queried=queried,
            calls=recent[-1][1] if recent else 0,
        )

    def _read(self) -> dict[str, Any]:
        data = _read_json(self._answers)
        return data if isinstance(data, dict) else {}

    def _write(self, answer: dict[str, Any]) -> None:
        _write_json(self._answers, answer)


# ---------------------------------------------------------------------------------------------- files


@contextlib.contextmanager
def _query_lock(path: Path) -> Iterator[bool]:
    """Yields True while holding an exclusive flock on ``path``, False at once when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:  # a damaged file is "no answer yet"; the next query rewrites it
        log.warning("status cache file %s is unreadable (%s); ignoring it", path, error)
        return None


def _write_json(path: Path, data: Any) -> None:
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, separators=(",", ":"))
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _recent(answer: dict[str, Any]) -> list[tuple[float, int]]:
    entries = answer.get("recent")
    if not isinstance(entries, list):
        return []
    return [
        (float(e[0]), int(e[1]))
        for e in entries
        if isinstance(e, list) and len(e) == 2 and all(isinstance(v, int | float) for v in e)
    ]


def _encode(info: JobInfo) -> dict[str, Any]:
    return {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(info).items()}


def _decode(job_id: str, data: Any) -> JobInfo | None:
    if not isinstance(data, dict) or data.get("job_id") != job_id:
        return None
    try:
        return JobInfo(
            job_id=job_id,
            state=JobState(data["state"]),
            exit_code=data.get("exit_code"),
            wall_time_seconds=data.get("wall_time_seconds"),
            cpu_hours=data.get("cpu_hours"),
            peak_memory_gb=data.get("peak_memory_gb"),
            reason=data.get("reason"),
            failure_kind=FailureKind(data["failure_kind"]) if data.get("failure_kind") else None,
            deferred=bool(data.get("deferred")),
        )
    except (KeyError, ValueError):
        return None


def _one_line(error: BaseException) -> str:
    return (str(error).strip() or repr(error)).splitlines()[0]
