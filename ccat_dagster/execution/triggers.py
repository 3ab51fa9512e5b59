"""One trigger evaluation of a pipeline (SPEC §5): what a sensor tick or a schedule tick requests.

A continuous pipeline's sensor calls ``evaluate_tick`` with its cursor. The cost of a tick grows with what
changed since the last one, never with the archive:

- changed packages: read by a change watermark ``(updated_at, id)`` with ``LIMIT``; rows that commit late with an
  older ``updated_at`` are caught by re-reading an overlap window, de-duplicated by the ids already seen there;
- finished attempts: read by their ``status_changed_at`` watermark, to start dependent steps;
- sub-groups held back by a cooldown are remembered in the cursor with their due time.

Only sub-groups touched by one of those are planned. A requested (step, sub-group, fingerprint) is remembered for
the overlap window so a repeated tick does not emit it again (each emitted run key costs Dagster one storage
query).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from ccat_dagster.execution.planning import Planner, Readiness, SubGroupPlan
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import RunStatus

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass
class TickCursor:
    package_ts: dt.datetime = EPOCH
    package_id: int = 0
    package_window: dict[int, float] = field(default_factory=dict)
    attempt_ts: dt.datetime = EPOCH
    attempt_window: dict[int, float] = field(default_factory=dict)
    deferred: dict[str, dict[str, float]] = field(default_factory=dict)
    recent: dict[str, float] = field(default_factory=dict)

    @classmethod
    def loads(cls, text: str | None) -> TickCursor:
        if not text:
            return cls()
        raw = json.loads(text)
        return cls(
            package_ts=dt.datetime.fromisoformat(raw["package_ts"]),
            package_id=int(raw["package_id"]),
            package_window={int(k): v for k, v in raw.get("package_window", {}).items()},
            attempt_ts=dt.datetime.fromisoformat(raw["attempt_ts"]),
            attempt_window={int(k): v for k, v in raw.get("attempt_window", {}).items()},
            deferred=raw.get("deferred", {}),
            recent=raw.get("recent", {}),
        )

    def dumps(self) -> str:
        return json.dumps(
            {
                "package_ts": self.package_ts.isoformat(),
                "package_id": self.package_id,
                "package_window": self.package_window,
                "attempt_ts": self.attempt_ts.isoformat(),
                "attempt_window": self.attempt_window,
                "deferred": self.deferred,
                "recent": self.recent,
            },
            sort_keys=True,
        )


@dataclass(frozen=True)
class StepRequest:
    """Sub-groups of one step to run now (the Dagster layer cuts them into runs)."""

    step_name: str
    plans: tuple[SubGroupPlan, ...]

    @property
    def sub_group_keys(self) -> list[str]:
        return [p.sub_group_key for p in self.plans]


@dataclass
class TickResult:
    requests: list[StepRequest]
    partitions: dict[str, list[str]]
    cursor: TickCursor
    changed_packages: int = 0
    finished_attempts: int = 0
    more_pending: bool = False
    skipped: dict[str, int] = field(default_factory=dict)


def evaluate_tick(
    session: Session,
    pipeline: m.Pipeline,
    cursor: TickCursor,
    *,
    now: dt.datetime,
    batch_limit: int = 5000,
    overlap_seconds: int = 300,
) -> TickResult:
    """Evaluate gaps for what changed since ``cursor``; returns the requests and the next cursor."""
    overlap = dt.timedelta(seconds=overlap_seconds)
    changed, more = _changed_packages(session, cursor, batch_limit, overlap)
    finished = _finished_attempts(session, pipeline, cursor, batch_limit, overlap)
    planner = Planner(session, pipeline, now=now)
    steps = _topological(pipeline.steps)

    touched: dict[str, dict[str, Any]] = defaultdict(dict)
    if changed:
        member_ids = set(changed) | _packages_covered_by_consumers(session, pipeline, changed)
        for step in steps:
            touched[step.name].update(planner.sub_groups(step.name, changed_package_ids=member_ids))
    if finished:
        covered = _covered_packages(session, finished)
        done_steps = {
            a.step.name
            for a in session.scalars(select(m.ExecutedReductionStep).where(m.ExecutedReductionStep.id.in_(finished)))
        }
        for step in steps:
            if any(u.name in done_steps for u in step.depends_on):
                touched[step.name].update(planner.sub_groups(step.name, changed_package_ids=covered))
    now_epoch = now.timestamp()
    for step_name, due_keys in list(cursor.deferred.items()):
        ready = [k for k, due in due_keys.items() if due <= now_epoch]
        if ready and any(s.name == step_name for s in steps):
            touched[step_name].update(planner.sub_groups(step_name, keys=ready))
            for key in ready:
                due_keys.pop(key, None)
        if not due_keys:
            cursor.deferred.pop(step_name, None)

    requests: list[StepRequest] = []
    partitions: dict[str, list[str]] = {}
    skipped: dict[str, int] = defaultdict(int)
    cursor.recent = {k: v for k, v in cursor.recent.items() if v > now_epoch}
    for step in steps:
        groups = touched.get(step.name)
        if not groups:
            continue
        partitions[step.name] = sorted(groups)
        wanted = []
        for plan in planner.plan(step.name, groups.values()):
            if plan.readiness is Readiness.GAP:
                memo = f"{step.name}|{plan.sub_group_key}|{plan.fingerprint}"
                if memo in cursor.recent:
                    skipped["already_requested"] += 1
                    continue
                cursor.recent[memo] = now_epoch + overlap_seconds + 3600
                wanted.append(plan)
            elif plan.readiness is Readiness.COOLDOWN and plan.due_at is not None:
                cursor.deferred.setdefault(step.name, {})[plan.sub_group_key] = plan.due_at.timestamp()
                skipped["cooldown"] += 1
            else:
                skipped[plan.readiness.value] += 1
        if wanted:
            requests.append(StepRequest(step.name, tuple(wanted)))
    return TickResult(
        requests=requests,
        partitions=partitions,
        cursor=cursor,
        changed_packages=len(changed),
        finished_attempts=len(finished),
        more_pending=more,
        skipped=dict(skipped),
    )


def evaluate_all(session: Session, pipeline: m.Pipeline, *, now: dt.datetime) -> TickResult:
    """A full evaluation of every step and sub-group (CRON schedules, manual `ccat-dagster pipelines gaps`)."""
    planner = Planner(session, pipeline, now=now)
    requests, partitions, skipped = [], {}, defaultdict(int)
    for step in _topological(pipeline.steps):
        groups = planner.sub_groups(step.name)
        partitions[step.name] = sorted(groups)
        plans = planner.plan(step.name, groups.values())
        wanted = [p for p in plans if p.readiness is Readiness.GAP]
        for plan in plans:
            if plan.readiness is not Readiness.GAP:
                skipped[plan.readiness.value] += 1
        if wanted:
            requests.append(StepRequest(step.name, tuple(wanted)))
    return TickResult(requests=requests, partitions=partitions, cursor=TickCursor(), skipped=dict(skipped))


# ---------------------------------------------------------------------------------------------- watermarks


def _changed_packages(
    session: Session, cursor: TickCursor, limit: int, overlap: dt.timedelta
) -> tuple[list[int], bool]:
    pkg = m.RawDataPackage
    window_start = cursor.package_ts - overlap
    late = [
        (pid, ts)
        for pid, ts in session.execute(
            select(pkg.id, pkg.updated_at)
            .where(pkg.updated_at > window_start)
            .where(
                or_(
                    pkg.updated_at < cursor.package_ts,
                    and_(pkg.updated_at == cursor.package_ts, pkg.id <= cursor.package_id),
                )
            )
            .limit(limit)
        )
        if pid not in cursor.package_window
    ]
    new = session.execute(
        select(pkg.id, pkg.updated_at)
        .where(
            or_(
                pkg.updated_at > cursor.package_ts,
                and_(pkg.updated_at == cursor.package_ts, pkg.id > cursor.package_id),
            )
        )
        .order_by(pkg.updated_at, pkg.id)
        .limit(limit)
    ).all()
    if new:
        cursor.package_ts, cursor.package_id = new[-1][1], new[-1][0]
    horizon = (cursor.package_ts - overlap).timestamp()
    window = {pid: ts for pid, ts in cursor.package_window.items() if ts > horizon}
    for pid, ts in [*late, *new]:
        if ts.timestamp() > horizon:
            window[pid] = ts.timestamp()
    cursor.package_window = window
    return sorted({pid for pid, _ in late} | {pid for pid, _ in new}), len(new) == limit


def _finished_attempts(
    session: Session, pipeline: m.Pipeline, cursor: TickCursor, limit: int, overlap: dt.timedelta
) -> list[int]:
    attempt = m.ExecutedReductionStep
    step_ids = [s.id for s in pipeline.steps]
    if not step_ids:
        return []
    rows = session.execute(
        select(attempt.id, attempt.status_changed_at)
        .where(attempt.reduction_step_id.in_(step_ids))
        .where(attempt.status == RunStatus.COMPLETED)
        .where(attempt.status_changed_at > cursor.attempt_ts - overlap)
        .order_by(attempt.status_changed_at, attempt.id)
        .limit(limit)
    ).all()
    fresh = [(aid, ts) for aid, ts in rows if aid not in cursor.attempt_window]
    if rows:
        cursor.attempt_ts = max(cursor.attempt_ts, rows[-1][1])
    horizon = (cursor.attempt_ts - overlap).timestamp()
    window = {aid: ts for aid, ts in cursor.attempt_window.items() if ts > horizon}
    for aid, ts in fresh:
        window[aid] = ts.timestamp()
    cursor.attempt_window = window
    return [aid for aid, _ in fresh]


# ---------------------------------------------------------------------------------------------- lineage walks


def _covered_packages(session: Session, attempt_ids: Iterable[int]) -> set[int]:
    """Raw packages an attempt's sub-group covers: its own inputs, or through upstream products, recursively."""
    packages: set[int] = set()
    frontier = set(attempt_ids)
    seen: set[int] = set()
    while frontier:
        seen |= frontier
        ids = list(frontier)
        packages |= set(
            session.scalars(
                select(m.run_input_package.c.raw_data_package_id).where(
                    m.run_input_package.c.executed_reduction_step_id.in_(ids)
                )
            )
        )
        parents = set(
            session.scalars(
                select(m.DataProduct.executed_reduction_step_id)
                .join(m.run_input_product, m.run_input_product.c.data_product_id == m.DataProduct.id)
                .where(m.run_input_product.c.executed_reduction_step_id.in_(ids))
            )
        )
        frontier = parents - seen
    return packages


def _packages_covered_by_consumers(session: Session, pipeline: m.Pipeline, changed: Sequence[int]) -> set[int]:
    """Other members of sub-groups that consumed a changed package (it may have left them, e.g. invalidated)."""
    step_ids = [s.id for s in pipeline.steps if not s.depends_on]
    if not step_ids or not changed:
        return set()
    attempts = session.scalars(
        select(m.run_input_package.c.executed_reduction_step_id)
        .join(
            m.ExecutedReductionStep,
            m.ExecutedReductionStep.id == m.run_input_package.c.executed_reduction_step_id,
        )
        .where(m.ExecutedReductionStep.reduction_step_id.in_(step_ids))
        .where(m.run_input_package.c.raw_data_package_id.in_(list(changed)))
    ).all()
    if not attempts:
        return set()
    return set(
        session.scalars(
            select(m.run_input_package.c.raw_data_package_id).where(
                m.run_input_package.c.executed_reduction_step_id.in_(list(set(attempts)))
            )
        )
    )


def _topological(steps: Sequence[m.ReductionStep]) -> list[m.ReductionStep]:
    ordered: list[m.ReductionStep] = []
    placed: set[int] = set()
    remaining = sorted(steps, key=lambda s: s.position)
    while remaining:
        progress = [s for s in remaining if all(u.id in placed for u in s.depends_on)]
        if not progress:  # a cycle: apply rejects these; keep the rest evaluable
            progress = remaining[:1]
        for step in progress:
            ordered.append(step)
            placed.add(step.id)
        remaining = [s for s in remaining if s.id not in placed]
    return ordered
