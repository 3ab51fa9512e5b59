"""One trigger evaluation of a pipeline: what a sensor tick or a schedule tick requests.

A continuous pipeline's sensor calls ``evaluate_tick`` with its cursor. The cost of a tick grows with what
changed since the last one, never with the archive:

- changed packages: read by a change watermark ``(updated_at, id)`` with ``LIMIT`` (an index range scan of
  ``ix_raw_data_package_updated_at_id``); the rest of a large change set is left to the next ticks;
- rows that commit late with an older ``updated_at`` are caught by re-reading an overlap window: the rows of the
  last ``overlap`` seconds before the previous tick (a row can only commit late if its transaction was open when
  the tick read past it, so the overlap must exceed the longest writing transaction plus clock skew). The ids
  already seen there are remembered in the cursor and excluded in SQL, so the cursor holds at most the changes
  of one overlap window, however large a backlog is being worked off;
- finished attempts: read by their ``status_changed_at`` watermark: a COMPLETED one starts dependent steps, a
  FAILED one puts its own sub-group up for planning again (a retry while retries are left: a run that died must
  not leave a gap that nothing ever plans again);
- changes of a step's definition (config, resolved software version or image, group_by, the grouping): each
  step's signature is kept in the cursor, and a changed one starts a *sweep* of that step, which walks the raw
  packages by id, ``batch_limit`` per tick, and plans the sub-groups they fall in. So a change is evaluated
  once, in pages, and a tick without changes costs nothing more than before;
- sub-groups waiting for deleted intermediates to be re-created (``Planner.rebuilds``) are remembered with one
  member and planned again whenever attempts finished;
- sub-groups held back by a cooldown are remembered in the cursor with their due time and one member package,
  through which they are found again.

Only sub-groups touched by one of those are planned. A dependent step's sub-groups touched by changed packages
are first known by key only, and read in full only if their upstream work may be complete (a fan-in sub-group
can hold much of the archive; see ``Planner.plan_changed``). A requested (step, sub-group, fingerprint) is
remembered for the overlap window so a repeated tick does not emit it again (each emitted run key costs Dagster
one storage query).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from ccat_dagster.execution.planning import GapReason, Planner, Readiness, SubGroupPlan
from ccat_dagster.grouping import sql
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import PackageState, RunStatus

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# Requested (step, sub-group, fingerprint) entries the cursor remembers at most (about 100 bytes each).
RECENT_MEMO_LIMIT = 5000


@dataclass
class TickCursor:
    package_ts: dt.datetime = EPOCH
    package_id: int = 0
    package_window: dict[int, float] = field(default_factory=dict)
    package_read_ts: dt.datetime | None = None
    attempt_ts: dt.datetime = EPOCH
    attempt_window: dict[int, float] = field(default_factory=dict)
    deferred: dict[str, dict[str, float]] = field(default_factory=dict)
    # One member package per deferred sub-group: finds it again without reading the whole grouping.
    deferred_members: dict[str, dict[str, int]] = field(default_factory=dict)
    recent: dict[str, float] = field(default_factory=dict)
    # Step name → signature of its definition (step_signature) as last seen by a tick.
    signatures: dict[str, str] = field(default_factory=dict)
    # Step name → {"signature", "after": last package id walked, "seen": keys already planned in this sweep}.
    sweeps: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Step name → {sub_group_key: one member package}: consumers waiting for re-created intermediates.
    rebuild_waiting: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def loads(cls, text: str | None) -> TickCursor:
        if not text:
            return cls()
        raw = json.loads(text)
        return cls(
            package_ts=dt.datetime.fromisoformat(raw["package_ts"]),
            package_id=int(raw["package_id"]),
            package_window={int(k): v for k, v in raw.get("package_window", {}).items()},
            package_read_ts=dt.datetime.fromisoformat(raw["package_read_ts"]) if raw.get("package_read_ts") else None,
            attempt_ts=dt.datetime.fromisoformat(raw["attempt_ts"]),
            attempt_window={int(k): v for k, v in raw.get("attempt_window", {}).items()},
            deferred=raw.get("deferred", {}),
            deferred_members=raw.get("deferred_members", {}),
            recent=raw.get("recent", {}),
            signatures=raw.get("signatures", {}),
            sweeps=raw.get("sweeps", {}),
            rebuild_waiting=raw.get("rebuild_waiting", {}),
        )

    def dumps(self) -> str:
        return json.dumps(
            {
                "package_ts": self.package_ts.isoformat(),
                "package_id": self.package_id,
                "package_window": self.package_window,
                "package_read_ts": self.package_read_ts.isoformat() if self.package_read_ts else None,
                "attempt_ts": self.attempt_ts.isoformat(),
                "attempt_window": self.attempt_window,
                "deferred": self.deferred,
                "deferred_members": self.deferred_members,
                "recent": self.recent,
                "signatures": self.signatures,
                "sweeps": self.sweeps,
                "rebuild_waiting": self.rebuild_waiting,
            },
            sort_keys=True,
        )


@dataclass(frozen=True)
class StepRequest:
    """Sub-groups of one step to run now (the Dagster layer cuts them into runs)."""

    step_name: str
    plans: tuple[SubGroupPlan, ...]
    # Re-creating deleted intermediates that a consumer needs: the runs must redo up-to-date sub-groups.
    rebuild: bool = False

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
    # Steps whose definition changed and that this tick swept (some or all of their sub-groups).
    swept_steps: tuple[str, ...] = ()


def evaluate_tick(
    session: Session,
    pipeline: m.Pipeline,
    cursor: TickCursor,
    *,
    now: dt.datetime,
    batch_limit: int = 5000,
    overlap_seconds: int = 300,
    read_packages: bool = True,
) -> TickResult:
    """Evaluate gaps for what changed since ``cursor``; returns the requests and the next cursor.

    ``read_packages=False`` follows only finished upstream attempts and due cooldowns (a CRON pipeline between
    two cron ticks: new raw data waits for the next tick, but a step whose upstream just finished starts now).
    """
    overlap = dt.timedelta(seconds=overlap_seconds)
    changed, more = _changed_packages(session, cursor, batch_limit, overlap, now) if read_packages else ([], False)
    finished, failed = _finished_attempts(session, pipeline, cursor, batch_limit, overlap)
    planner = Planner(session, pipeline, now=now)
    steps = _topological(pipeline.steps)
    sweep_pages = _sweep_pages(session, planner, steps, cursor, batch_limit) if read_packages else {}

    touched: dict[str, dict[str, Any]] = defaultdict(dict)
    # Dependent steps: the keys of the sub-groups holding changed packages; read in full only when planned and
    # not already known to wait for upstream work (Planner.plan_changed).
    touched_keys: dict[str, dict[str, tuple[int, ...]]] = {}
    if changed:
        member_ids = set(changed) | _packages_covered_by_consumers(session, pipeline, changed)
        for step in steps:
            if step.depends_on:
                touched_keys[step.name] = planner.changed_members(step.name, member_ids)
            else:
                touched[step.name].update(planner.sub_groups(step.name, changed_package_ids=member_ids))
    for step in steps:
        page = sweep_pages.get(step.name)
        if not page:
            continue
        seen = set(cursor.sweeps[step.name].get("seen", []))
        if step.depends_on:
            found = planner.changed_members(step.name, page)
            touched_keys.setdefault(step.name, {}).update({k: v for k, v in found.items() if k not in seen})
        else:
            groups = planner.sub_groups(step.name, changed_package_ids=page)
            touched[step.name].update({k: g for k, g in groups.items() if k not in seen})
    completed = [aid for aid in finished if aid not in failed]
    if completed:
        covered = _covered_packages(session, completed)
        done_steps = {
            a.step.name
            for a in session.scalars(select(m.ExecutedReductionStep).where(m.ExecutedReductionStep.id.in_(completed)))
        }
        for step in steps:
            if any(u.name in done_steps for u in step.depends_on):
                touched[step.name].update(planner.sub_groups(step.name, changed_package_ids=covered))
    if failed:
        # A failed attempt's own sub-group: planned again (a retry, or EXHAUSTED once max_retries are used).
        for step_name, attempt_ids in _attempts_by_step(session, failed).items():
            if any(s.name == step_name for s in steps):
                covered = _covered_packages(session, attempt_ids)
                touched[step_name].update(planner.sub_groups(step_name, changed_package_ids=covered))
    if finished:
        for step_name, members in list(cursor.rebuild_waiting.items()):
            if any(s.name == step_name for s in steps) and members:
                touched[step_name].update(_deferred_sub_groups(planner, step_name, list(members), members))
            cursor.rebuild_waiting.pop(step_name, None)
    now_epoch = now.timestamp()
    for step_name, due_keys in list(cursor.deferred.items()):
        ready = [k for k, due in due_keys.items() if due <= now_epoch]
        members = cursor.deferred_members.get(step_name, {})
        if ready and any(s.name == step_name for s in steps):
            touched[step_name].update(_deferred_sub_groups(planner, step_name, ready, members))
            for key in ready:
                due_keys.pop(key, None)
                members.pop(key, None)
        if not due_keys:
            cursor.deferred.pop(step_name, None)
            cursor.deferred_members.pop(step_name, None)

    requests: list[StepRequest] = []
    partitions: dict[str, list[str]] = {}
    skipped: dict[str, int] = defaultdict(int)
    planned: dict[str, list[SubGroupPlan]] = {}
    cursor.recent = {k: v for k, v in cursor.recent.items() if v > now_epoch}
    for step in steps:
        groups = touched.get(step.name, {})
        by_keys = {k: ids for k, ids in touched_keys.get(step.name, {}).items() if k not in groups}
        if not groups and not by_keys:
            continue
        partitions[step.name] = sorted({*groups, *by_keys})
        wanted = []
        plans = planner.plan(step.name, groups.values()) if groups else []
        if by_keys:
            plans += planner.plan_changed(step.name, by_keys)
        for plan in plans:
            if plan.readiness is Readiness.GAP:
                if not _remember(cursor, plan, now_epoch + overlap_seconds + 3600):
                    skipped["already_requested"] += 1
                    continue
                wanted.append(plan)
            elif plan.readiness is Readiness.COOLDOWN and plan.due_at is not None:
                cursor.deferred.setdefault(step.name, {})[plan.sub_group_key] = plan.due_at.timestamp()
                if plan.package_ids:
                    cursor.deferred_members.setdefault(step.name, {})[plan.sub_group_key] = plan.package_ids[0]
                skipped["cooldown"] += 1
            else:
                skipped[plan.readiness.value] += 1
        if wanted:
            requests.append(StepRequest(step.name, tuple(wanted)))
        planned[step.name] = plans
    for step_name, page in sweep_pages.items():
        # Also for a page that touched nothing: the last page of a sweep ends it.
        _note_swept(cursor, step_name, page, planned.get(step_name, []))
    requests.extend(_rebuild_requests(planner, cursor, steps, now_epoch + overlap_seconds + 3600))
    if len(cursor.recent) > RECENT_MEMO_LIMIT:
        # Working off a large backlog would grow the cursor without bound. Keeping the newest entries is safe:
        # a forgotten one only costs Dagster a run-key lookup, which still refuses the duplicate run.
        newest = sorted(cursor.recent.items(), key=lambda item: item[1])[-RECENT_MEMO_LIMIT:]
        cursor.recent = dict(newest)
    return TickResult(
        requests=requests,
        partitions=partitions,
        cursor=cursor,
        changed_packages=len(changed),
        finished_attempts=len(finished),
        more_pending=more or any(name in cursor.sweeps for name in sweep_pages),
        skipped=dict(skipped),
        swept_steps=tuple(sweep_pages),
    )


def plan_all(session: Session, pipeline: m.Pipeline, *, now: dt.datetime) -> dict[str, list[SubGroupPlan]]:
    """Every current sub-group of every step, planned (in the order of the steps' dependencies).

    An up-to-date sub-group whose products a planned consumer needs again after retention deleted them is
    returned as its re-creation (a GAP with reason MISSING_INTERMEDIATE) instead.
    """
    planner = Planner(session, pipeline, now=now)
    plans: dict[str, list[SubGroupPlan]] = {}
    for step in _topological(pipeline.steps):
        plans[step.name] = planner.plan(step.name, planner.sub_groups(step.name).values())
    for step_name, rebuilt in planner.rebuilds.items():
        plans[step_name] = [rebuilt.get(p.sub_group_key, p) for p in plans.get(step_name, [])]
    return plans


def evaluate_all(session: Session, pipeline: m.Pipeline, *, now: dt.datetime) -> TickResult:
    """A full evaluation of every step and sub-group (CRON schedules, ``ccat-dagster pipelines gaps``)."""
    requests, partitions, skipped = [], {}, defaultdict(int)
    for step_name, plans in plan_all(session, pipeline, now=now).items():
        partitions[step_name] = sorted(p.sub_group_key for p in plans)
        gaps = [p for p in plans if p.readiness is Readiness.GAP]
        for rebuild in (False, True):
            wanted = [p for p in gaps if (p.reason is GapReason.MISSING_INTERMEDIATE) is rebuild]
            if wanted:
                requests.append(StepRequest(step_name, tuple(wanted), rebuild=rebuild))
        for plan in plans:
            if plan.readiness is not Readiness.GAP:
                skipped[plan.readiness.value] += 1
    return TickResult(requests=requests, partitions=partitions, cursor=TickCursor(), skipped=dict(skipped))


def new_partition_keys(
    session: Session,
    pipeline: m.Pipeline,
    cursor: TickCursor,
    *,
    now: dt.datetime,
    batch_limit: int = 5000,
    overlap_seconds: int = 300,
) -> tuple[dict[str, list[str]], bool]:
    """Keys of the sub-groups, per step, that packages changed since ``cursor`` fall in; (keys, more pending).

    What keeps a MANUAL or CRON pipeline's partitions current as data arrives, without planning anything: the
    same change watermark as ``evaluate_tick``, and only the changed packages are read (never a fan-in's
    members). Advances ``cursor``.
    """
    overlap = dt.timedelta(seconds=overlap_seconds)
    changed, more = _changed_packages(session, cursor, batch_limit, overlap, now)
    if not changed:
        return {}, more
    planner = Planner(session, pipeline, now=now)
    keys = {step.name: sorted(planner.changed_members(step.name, changed)) for step in pipeline.steps}
    return {name: found for name, found in keys.items() if found}, more


# ---------------------------------------------------------------------------------------------- watermarks


def _changed_packages(
    session: Session, cursor: TickCursor, limit: int, overlap: dt.timedelta, now: dt.datetime
) -> tuple[list[int], bool]:
    pkg = m.RawDataPackage
    # The row comparison is what lets PostgreSQL seek the (updated_at, id) index; an OR of the two conditions
    # made it walk the index from its start, a cost growing with the archive.
    position = tuple_(pkg.updated_at, pkg.id)
    watermark = (cursor.package_ts, cursor.package_id)
    # Only rows changed within the overlap before the previous read can have committed after it. While a backlog
    # is worked off the watermark lags far behind that and there is nothing to re-read. (Cursors written before
    # package_read_ts existed count back from the watermark.)
    window_start = (cursor.package_read_ts or cursor.package_ts) - overlap
    seen = [pid for pid, ts in cursor.package_window.items() if ts > window_start.timestamp()]
    late_query = (
        select(pkg.id, pkg.updated_at)
        .where(pkg.updated_at > window_start, position <= watermark)
        .order_by(pkg.updated_at, pkg.id)
        .limit(limit)
    )
    if seen:
        late_query = late_query.where(~sql.id_in_list(pkg.id, sql.id_list_param(seen)))
    late = session.execute(late_query).all() if window_start < cursor.package_ts else []
    new = session.execute(
        select(pkg.id, pkg.updated_at).where(position > watermark).order_by(pkg.updated_at, pkg.id).limit(limit)
    ).all()
    if new:
        cursor.package_ts, cursor.package_id = new[-1][1], new[-1][0]
    cursor.package_read_ts = now
    # What the next tick's late read can see again: rows changed within the overlap before this read.
    horizon = (now - overlap).timestamp()
    window = {pid: ts for pid, ts in cursor.package_window.items() if ts > horizon}
    for pid, ts in [*late, *new]:
        if ts.timestamp() > horizon:
            window[pid] = ts.timestamp()
    cursor.package_window = window
    return sorted({pid for pid, _ in late} | {pid for pid, _ in new}), len(new) == limit


def _finished_attempts(
    session: Session, pipeline: m.Pipeline, cursor: TickCursor, limit: int, overlap: dt.timedelta
) -> tuple[list[int], set[int]]:
    """Attempts that became COMPLETED or FAILED since the cursor: (all of them, the failed ones)."""
    attempt = m.ExecutedReductionStep
    step_ids = [s.id for s in pipeline.steps]
    if not step_ids:
        return [], set()
    rows = session.execute(
        select(attempt.id, attempt.status_changed_at, attempt.status)
        .where(attempt.reduction_step_id.in_(step_ids))
        .where(attempt.status.in_([RunStatus.COMPLETED, RunStatus.FAILED]))
        .where(attempt.status_changed_at > cursor.attempt_ts - overlap)
        .order_by(attempt.status_changed_at, attempt.id)
        .limit(limit)
    ).all()
    fresh = [(aid, ts) for aid, ts, _ in rows if aid not in cursor.attempt_window]
    failed = {aid for aid, _, status in rows if status is RunStatus.FAILED and aid not in cursor.attempt_window}
    if rows:
        cursor.attempt_ts = max(cursor.attempt_ts, rows[-1][1])
    horizon = (cursor.attempt_ts - overlap).timestamp()
    window = {aid: ts for aid, ts in cursor.attempt_window.items() if ts > horizon}
    for aid, ts in fresh:
        window[aid] = ts.timestamp()
    cursor.attempt_window = window
    return [aid for aid, _ in fresh], failed


def _attempts_by_step(session: Session, attempt_ids: Iterable[int]) -> dict[str, list[int]]:
    rows = session.execute(
        select(m.ReductionStep.name, m.ExecutedReductionStep.id)
        .join(m.ExecutedReductionStep.step)
        .where(m.ExecutedReductionStep.id.in_(list(attempt_ids)))
    ).all()
    by_step: dict[str, list[int]] = defaultdict(list)
    for name, aid in rows:
        by_step[name].append(aid)
    return by_step


# ---------------------------------------------------------------------------------------------- changes


def _sweep_pages(
    session: Session, planner: Planner, steps: Sequence[m.ReductionStep], cursor: TickCursor, limit: int
) -> dict[str, list[int]]:
    """Start a sweep for each step whose definition changed since the last tick; the next page of each sweep.

    A cursor without signatures (the first tick, or one written before they existed) records them and starts
    nothing: the first tick reads every package anyway.
    """
    signatures = {step.name: planner.step_signature(step.name) for step in steps}
    if cursor.signatures:
        for name, signature in signatures.items():
            if cursor.signatures.get(name) != signature:
                cursor.sweeps[name] = {"signature": signature, "after": 0, "seen": []}
    cursor.signatures = signatures
    for name in [n for n in cursor.sweeps if n not in signatures]:
        cursor.sweeps.pop(name)
    pages: dict[str, list[int]] = {}
    for name, sweep in cursor.sweeps.items():
        pkg = m.RawDataPackage
        ids = list(session.scalars(select(pkg.id).where(pkg.id > int(sweep["after"])).order_by(pkg.id).limit(limit)))
        pages[name] = ids
        sweep["after"] = ids[-1] if ids else sweep["after"]
        sweep["done"] = len(ids) < limit
    return pages


def _note_swept(cursor: TickCursor, step_name: str, page: list[int], plans: Sequence[SubGroupPlan]) -> None:
    """After a sweep page was planned: remember sub-groups that reach past the page (a fan-in is planned once
    per sweep, not once per page), and end the sweep after its last page."""
    sweep = cursor.sweeps[step_name]
    if sweep.pop("done", False):
        cursor.sweeps.pop(step_name)
        return
    end = page[-1] if page else 0
    seen = set(sweep.get("seen", []))
    seen.update(p.sub_group_key for p in plans if p.package_ids and max(p.package_ids) > end)
    sweep["seen"] = sorted(seen)


def _remember(cursor: TickCursor, plan: SubGroupPlan, until: float) -> bool:
    """Record a requested gap in the cursor; False if this tick or a recent one already requested it."""
    memo = f"{plan.step_name}|{plan.sub_group_key}|{plan.fingerprint}|{plan.attempts_so_far}"
    if memo in cursor.recent:
        return False
    cursor.recent[memo] = until
    return True


def _rebuild_requests(
    planner: Planner, cursor: TickCursor, steps: Sequence[m.ReductionStep], until: float
) -> list[StepRequest]:
    """Runs re-creating deleted intermediates that planned consumers need; the consumers are remembered."""
    for step_name, waiting in planner.waiting_for_rebuild.items():
        members = cursor.rebuild_waiting.setdefault(step_name, {})
        for key, plan in waiting.items():
            if plan.package_ids:
                members[key] = plan.package_ids[0]
    requests = []
    for step in steps:
        plans = [p for p in planner.rebuilds.get(step.name, {}).values() if _remember(cursor, p, until)]
        if plans:
            requests.append(StepRequest(step.name, tuple(plans), rebuild=True))
    return requests


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
    """One current member of each sub-group, at any step, that consumed a changed package (it may have left
    the sub-group, e.g. invalidated: then the sub-group is found through this member).

    Consumers are the attempts of this pipeline whose lineage closure (``run_ancestor_package``, written by
    registration) holds a changed package: first steps and dependent steps alike. One representative per
    consumer, the lowest-id archived, valid package of its closure, is enough to map the consumer's sub-group
    again, so a tick costs a few sub-groups per consumer rather than every member of a fan-in (a 10,000-scan
    ``all`` sub-group adds one package, not 10,000). ONE statement; a consumer with no valid member left
    (the bad scan's own per-scan attempts) contributes nothing.
    """
    step_ids = [s.id for s in pipeline.steps]
    if not step_ids or not changed:
        return set()
    rap, attempt, package = m.run_ancestor_package, m.ExecutedReductionStep, m.RawDataPackage
    consumers = (
        select(rap.c.executed_reduction_step_id)
        .join(attempt, attempt.id == rap.c.executed_reduction_step_id)
        .where(attempt.reduction_step_id.in_(step_ids))
        .where(rap.c.raw_data_package_id.in_(list(changed)))
        .distinct()
        .subquery("consumers")
    )
    member = rap.alias("member")
    representative = (
        select(member.c.raw_data_package_id)
        .join(package, package.id == member.c.raw_data_package_id)
        .where(member.c.executed_reduction_step_id == consumers.c.executed_reduction_step_id)
        .where(package.state == PackageState.ARCHIVED)
        .where(package.invalidated_reason.is_(None))
        .order_by(member.c.raw_data_package_id)
        .limit(1)
        .scalar_subquery()
    )
    return {p for p in session.scalars(select(representative).select_from(consumers)) if p is not None}


def _deferred_sub_groups(
    planner: Planner, step_name: str, keys: Sequence[str], members: dict[str, int]
) -> dict[str, Any]:
    """The current sub-groups of ``keys``, found through their remembered member (a read of those sub-groups only).

    Keys without one (a cursor from before ``deferred_members``) or whose member left them are read by key, which
    reads the whole grouping.
    """
    wanted = set(keys)
    known = [members[k] for k in keys if k in members]
    groups = (
        {k: g for k, g in planner.sub_groups(step_name, changed_package_ids=known).items() if k in wanted}
        if known
        else {}
    )
    missing = [k for k in keys if k not in groups]
    if missing:
        groups.update(planner.sub_groups(step_name, keys=missing))
    return groups


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
