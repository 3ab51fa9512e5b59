"""Gap evaluation: which sub-groups of a step need a run now, with which inputs.

Used by the sensors and schedules (to request runs) and by the step asset (to decide, at run time, what each
requested sub-group consumes). A sub-group of a step has a *gap* when no COMPLETED attempt has the current
input fingerprint and no attempt is in flight. Dependent steps are planned only when every upstream sub-group
feeding them is itself up to date (recursively), so a fan-in step waits for in-flight upstream work.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.errors import CcatError
from ccat_dagster.execution.fingerprint import canonical_json, config_sha256, input_fingerprint, resolve_version
from ccat_dagster.grouping import sql
from ccat_dagster.grouping.engine import SubGroup, resolve, resolve_touched
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.enums import TERMINAL_RUN_STATUSES, PhysicalCopyStatus, RunStatus


class PlanningError(CcatError):
    """A pipeline or step cannot be planned (unknown name, no software version, …)."""


class GapReason(enum.StrEnum):
    """Why a sub-group needs (or, waiting, will need) a run: what ``ccat-dagster pipelines gaps`` prints."""

    NEW = "new"  # no attempt of this sub-group completed yet
    INPUTS_CHANGED = "inputs_changed"  # raw data joined or left the sub-group (new data, an invalidation)
    UPSTREAM_CHANGED = "upstream_changed"  # an upstream sub-group re-ran with different output bytes
    CONFIG_CHANGED = "config_changed"
    SOFTWARE_CHANGED = "software_changed"  # another version under the version policy, or another image
    RETRY = "retry"  # the last attempt with these inputs failed; retries are left
    MISSING_INTERMEDIATE = "missing_intermediate"  # a consumer needs a product whose copy retention deleted
    FORCED = "forced"


class Readiness(enum.StrEnum):
    GAP = "gap"
    UP_TO_DATE = "up_to_date"
    IN_FLIGHT = "in_flight"
    COOLDOWN = "cooldown"
    EXHAUSTED = "exhausted"
    UPSTREAM_NOT_READY = "upstream_not_ready"
    EMPTY = "empty"


@dataclass(frozen=True)
class UpstreamProductRef:
    product_id: int
    sha256: str
    step_name: str
    sub_group_key: str
    relative_path: str
    product_type: str
    size_bytes: int


@dataclass(frozen=True)
class SubGroupPlan:
    """Everything one attempt of one step for one sub-group consumes, and the decision about it."""

    step_id: int
    step_name: str
    sub_group_key: str
    readiness: Readiness
    package_ids: tuple[int, ...] = ()
    upstream_products: tuple[UpstreamProductRef, ...] = ()
    upstream_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    software_version_id: int | None = None
    config_id: int | None = None
    fingerprint: str | None = None
    due_at: dt.datetime | None = None
    detail: str = ""
    total_bytes: int = 0
    # Attempts of this step and sub-group so far: part of the run key, so that a retry after a failure or the
    # re-creation of a deleted intermediate (same fingerprint as before) is a new run, not a duplicate.
    attempts_so_far: int = 0
    reason: GapReason | None = None


# (all upstream sub-groups up to date, their current products, their keys, why not ready, the keys among them
# whose current products have no present copy at the processing location)
_UpstreamInputs = tuple[bool, list[UpstreamProductRef], tuple[str, ...], str, tuple[str, ...]]

# Ids per statement, bound as ONE array parameter (grouping.sql.id_list_param), not one parameter each.
_IDS_PER_STATEMENT = 50_000


@dataclass
class _StepInfo:
    step: m.ReductionStep
    version: m.ReductionSoftwareVersion
    config_sha: str
    upstream: list[m.ReductionStep]


class Planner:
    """Plans the sub-groups of one pipeline's steps. One instance per session and evaluation (it memoizes)."""

    def __init__(self, session: Session, pipeline: m.Pipeline, *, now: dt.datetime) -> None:
        self.session = session
        self.pipeline = pipeline
        self.now = now
        self._steps: dict[str, _StepInfo] = {}
        self._memo: dict[tuple[int, str], SubGroupPlan] = {}
        # Per step id: changed packages of sub-groups that plan_changed found not ready without reading them.
        self._not_ready_changed: dict[int, dict[int, tuple[str, SubGroupPlan]]] = defaultdict(dict)
        grouping = pipeline.data_grouping
        self._rules = list(grouping.filter_rules or [])
        self._module_id = grouping.instrument_module_id
        # Per step name: upstream sub-groups to re-run because a consumer with a gap needs their deleted
        # intermediates (plans with readiness GAP, reason MISSING_INTERMEDIATE), and the consumers waiting.
        self.rebuilds: dict[str, dict[str, SubGroupPlan]] = defaultdict(dict)
        self.waiting_for_rebuild: dict[str, dict[str, SubGroupPlan]] = defaultdict(dict)

    # ------------------------------------------------------------------ public

    def step_info(self, step_name: str) -> _StepInfo:
        if step_name not in self._steps:
            step = next((s for s in self.pipeline.steps if s.name == step_name), None)
            if step is None:
                names = ", ".join(s.name for s in self.pipeline.steps)
                raise PlanningError(f"pipeline {self.pipeline.name!r} has no step {step_name!r}; its steps: {names}")
            versions = {v.version: v for v in step.software.versions}
            chosen = resolve_version(
                policy=step.version_policy.value,
                spec=step.version_spec,
                available=list(versions),
                software=step.software.name,
            )
            self._steps[step_name] = _StepInfo(
                step=step,
                version=versions[chosen],
                config_sha=step.config.parameters_sha256 or config_sha256(step.config.parameters),
                upstream=list(step.depends_on),
            )
        return self._steps[step_name]

    def step_signature(self, step_name: str) -> str:
        """A hash of everything in a step's definition that decides its sub-groups and fingerprints: config,
        resolved software version and image digest, group_by, upstream steps and the pipeline's grouping.

        A trigger that sees it change evaluates every sub-group of the step once (``triggers._sweep_pages``).
        """
        info = self.step_info(step_name)
        return hashlib.sha256(
            canonical_json(
                {
                    "config": info.config_sha,
                    "software": f"{info.step.software.name}=={info.version.version}",
                    "image_digest": info.version.image_digest or "",
                    "group_by": list(info.step.group_by or []),
                    "upstream": sorted(u.name for u in info.upstream),
                    "rules": self._rules,
                    "instrument_module_id": self._module_id,
                }
            ).encode()
        ).hexdigest()

    def sub_groups(
        self,
        step_name: str,
        *,
        keys: Collection[str] | None = None,
        changed_package_ids: Collection[int] | None = None,
    ) -> dict[str, SubGroup]:
        """Current sub-groups of a step: all, those named, or those touching changed packages."""
        group_by = list(self.step_info(step_name).step.group_by or [])
        if changed_package_ids is not None:
            if not changed_package_ids:
                return {}
            found = resolve_touched(
                self.session,
                filter_rules=self._rules,
                group_by=group_by,
                instrument_module_id=self._module_id,
                changed_package_ids=list(changed_package_ids),
            )
        else:
            found = resolve(
                self.session,
                filter_rules=self._rules,
                group_by=group_by,
                instrument_module_id=self._module_id,
            )
        groups = {g.key: g for g in found}
        if keys is not None:
            groups = {k: g for k, g in groups.items() if k in set(keys)}
        return groups

    def plan(
        self,
        step_name: str,
        sub_groups: Iterable[SubGroup],
        *,
        respect_cooldown: bool = True,
        force: bool = False,
        rebuild: bool = False,
    ) -> list[SubGroupPlan]:
        """Decide each sub-group of ``step_name``. ``force`` plans up-to-date sub-groups as gaps too.

        ``rebuild`` plans up-to-date sub-groups whose products a consumer needs again (their copies were deleted)
        as gaps with reason MISSING_INTERMEDIATE; unlike ``force`` it respects exhausted retries.

        A fixed number of statements for any number of sub-groups (attempts, input checksums, upstream
        sub-groups and products are each read for all of them at once): a sensor tick touching a thousand
        sub-groups must not cost a thousand round trips.
        """
        groups = list(sub_groups)
        info = self.step_info(step_name)
        attempts = self._attempts(info.step.id, [g.key for g in groups])
        upstream = {u.name: self._upstream_inputs(u, groups) for u in info.upstream}
        contents = {} if info.upstream else self._package_contents([i for g in groups for i in g.package_ids])
        plans = []
        for group in groups:
            plan = self._plan_one(
                info,
                group,
                attempts.get(group.key, []),
                [upstream[u.name][group.key] for u in info.upstream],
                contents,
                respect_cooldown,
                force,
                rebuild,
            )
            self._memo[(info.step.id, group.key)] = plan
            plans.append(plan)
        return plans

    def changed_members(self, step_name: str, changed_package_ids: Collection[int]) -> dict[str, tuple[int, ...]]:
        """The keys of the sub-groups of a step that hold changed packages, each with only its changed members.

        Cheap whatever the size of those sub-groups (the statement reads the changed packages only); see
        ``plan_changed``.
        """
        if not changed_package_ids:
            return {}
        found = resolve(
            self.session,
            filter_rules=self._rules,
            group_by=list(self.step_info(step_name).step.group_by or []),
            instrument_module_id=self._module_id,
            package_ids=list(changed_package_ids),
        )
        return {g.key: g.package_ids for g in found}

    def plan_changed(self, step_name: str, changed: dict[str, tuple[int, ...]]) -> list[SubGroupPlan]:
        """Plan the sub-groups named by ``changed_members``.

        A sub-group of a dependent step with a changed package in an upstream sub-group already planned here and
        not up to date is UPSTREAM_NOT_READY at once, without reading its members (its plan has no package ids):
        a fan-in sub-group may hold a large part of the archive, and new data makes its upstream sub-groups gaps
        first. The others are read in full and planned as by ``plan``.
        """
        info = self.step_info(step_name)
        blocking = [(upstream, self._blocking(upstream)) for upstream in info.upstream]
        decided: list[SubGroupPlan] = []
        undecided: set[int] = set()
        for key, package_ids in changed.items():
            for upstream, not_ready in blocking:
                hits = dict(not_ready[i] for i in package_ids if i in not_ready)
                if hits:
                    first = min(hits)
                    plan = SubGroupPlan(
                        step_id=info.step.id,
                        step_name=step_name,
                        sub_group_key=key,
                        readiness=Readiness.UPSTREAM_NOT_READY,
                        software_version_id=info.version.id,
                        config_id=info.step.reduction_step_config_id,
                        detail=(
                            f"{len(hits)} upstream sub-group(s) of {upstream.name!r} are not complete, e.g. "
                            f"{first!r}: {hits[first].readiness.value} {hits[first].detail}".rstrip()
                        ),
                    )
                    self._memo[(info.step.id, key)] = plan
                    for i in package_ids:
                        self._not_ready_changed[info.step.id][i] = (key, plan)
                    decided.append(plan)
                    break
            else:
                undecided.update(package_ids)
        groups = self.sub_groups(step_name, changed_package_ids=undecided) if undecided else {}
        return decided + self.plan(step_name, groups.values())

    def plan_keys(self, step_name: str, keys: Sequence[str], **kwargs: bool) -> list[SubGroupPlan]:
        """Plan named sub-groups; a key with no current members is reported EMPTY."""
        groups = self.sub_groups(step_name, keys=keys)
        plans = {p.sub_group_key: p for p in self.plan(step_name, groups.values(), **kwargs)}
        step_id = self.step_info(step_name).step.id
        return [
            plans.get(key)
            or SubGroupPlan(
                step_id=step_id,
                step_name=step_name,
                sub_group_key=key,
                readiness=Readiness.EMPTY,
                detail="no archived raw data package of the grouping falls in this sub-group",
            )
            for key in keys
        ]

    def recreation_order(self, consumer: str) -> list[tuple[str, list[str]]]:
        """What must run again, upstream step first, before the sub-groups of ``consumer`` that wait for deleted
        intermediates can run: (step name, sub-group keys) per step, from the plans made so far.

        A step whose own inputs were deleted too is listed after the step that re-creates those.
        """
        keys: dict[str, set[str]] = defaultdict(set)
        for name, plans in self.rebuilds.items():
            keys[name].update(plans)
        for name, plans in self.waiting_for_rebuild.items():
            if name != consumer:
                keys[name].update(plans)
        return [(name, sorted(keys[name])) for name in _upstream_first(self.pipeline.steps) if keys.get(name)]

    # ------------------------------------------------------------------ internals

    def _attempts(self, step_id: int, keys: Sequence[str]) -> dict[str, list[m.ExecutedReductionStep]]:
        by_key: dict[str, list[m.ExecutedReductionStep]] = defaultdict(list)
        if not keys:
            return by_key
        for chunk_start in range(0, len(keys), 1000):
            chunk = keys[chunk_start : chunk_start + 1000]
            rows = self.session.scalars(
                select(m.ExecutedReductionStep)
                .where(m.ExecutedReductionStep.reduction_step_id == step_id)
                .where(m.ExecutedReductionStep.sub_group_key.in_(chunk))
                .order_by(m.ExecutedReductionStep.attempt)
            )
            for row in rows:
                by_key[row.sub_group_key].append(row)
        return by_key

    def _package_contents(self, package_ids: Sequence[int]) -> dict[int, tuple[str, str]]:
        """Package id → (name, checksum): what a fingerprint hashes of a raw package (its content, not its id)."""
        contents: dict[int, tuple[str, str]] = {}
        for start in range(0, len(package_ids), _IDS_PER_STATEMENT):
            chunk = package_ids[start : start + _IDS_PER_STATEMENT]
            rows = self.session.execute(
                select(m.RawDataPackage.id, m.RawDataPackage.name, m.RawDataPackage.checksum).where(
                    sql.id_in_list(m.RawDataPackage.id, sql.id_list_param(chunk))
                )
            )
            contents.update({pid: (name, checksum) for pid, name, checksum in rows})
        return contents

    def _plan_one(
        self,
        info: _StepInfo,
        group: SubGroup,
        attempts: list[m.ExecutedReductionStep],
        upstream_inputs: list[_UpstreamInputs],
        contents: dict[int, tuple[str, str]],
        respect_cooldown: bool,
        force: bool,
        rebuild: bool = False,
    ) -> SubGroupPlan:
        step = info.step
        base = dict(
            step_id=step.id,
            step_name=step.name,
            sub_group_key=group.key,
            package_ids=tuple(group.package_ids),
            software_version_id=info.version.id,
            config_id=step.reduction_step_config_id,
            total_bytes=group.total_bytes,
            attempts_so_far=len(attempts),
        )
        upstream_products: list[UpstreamProductRef] = []
        upstream_keys: dict[str, tuple[str, ...]] = {}
        missing: dict[str, tuple[str, ...]] = {}
        for upstream, (ready, products, keys, detail, gone) in zip(info.upstream, upstream_inputs, strict=True):
            if not ready:
                return SubGroupPlan(**base, readiness=Readiness.UPSTREAM_NOT_READY, detail=detail)
            upstream_products.extend(products)
            upstream_keys[upstream.name] = keys
            if gone:
                missing[upstream.name] = gone
        packages = [contents[i] for i in group.package_ids if i in contents] if not info.upstream else []
        fingerprint = input_fingerprint(
            packages=packages,
            upstream_products=[(p.step_name, p.sub_group_key, p.relative_path, p.sha256) for p in upstream_products],
            software_version=f"{step.software.name}=={info.version.version}",
            image_digest=info.version.image_digest,
            config_sha=info.config_sha,
        )
        plan = dict(
            base,
            upstream_products=tuple(upstream_products),
            upstream_keys=upstream_keys,
            fingerprint=fingerprint,
        )
        in_flight = [a for a in attempts if a.status not in TERMINAL_RUN_STATUSES]
        if in_flight:
            return SubGroupPlan(
                **plan,
                readiness=Readiness.IN_FLIGHT,
                detail=f"attempt {in_flight[-1].id} is {in_flight[-1].status.value}",
            )
        done = [a for a in attempts if a.status is RunStatus.COMPLETED and a.input_fingerprint == fingerprint]
        if done and not force and not rebuild:
            return SubGroupPlan(**plan, readiness=Readiness.UP_TO_DATE, detail=f"attempt {done[-1].id} is current")
        same_inputs_failed = [
            a
            for a in attempts
            if a.input_fingerprint == fingerprint and a.status in (RunStatus.FAILED, RunStatus.CANCELLED)
        ]
        if len(same_inputs_failed) > step.max_retries and not force:
            return SubGroupPlan(
                **plan,
                readiness=Readiness.EXHAUSTED,
                detail=f"{len(same_inputs_failed)} attempts with these inputs failed (max_retries {step.max_retries}); "
                "materialize the partition by hand to try again",
                reason=GapReason.RETRY,
            )
        reason = _gap_reason(info, attempts, fingerprint, same_inputs_failed, force=force, rebuild=bool(done))
        if missing:
            return self._wait_for_rebuild(info, SubGroupPlan(**plan, readiness=Readiness.UPSTREAM_NOT_READY), missing)
        if respect_cooldown and attempts and step.cooldown_seconds > 0:
            due = attempts[-1].created_at + dt.timedelta(seconds=step.cooldown_seconds)
            if due > self.now:
                return SubGroupPlan(
                    **plan,
                    readiness=Readiness.COOLDOWN,
                    due_at=due,
                    detail=f"cooldown until {due.isoformat()}",
                    reason=reason,
                )
        return SubGroupPlan(**plan, readiness=Readiness.GAP, reason=reason, detail=_REASON_TEXT[reason])

    def _wait_for_rebuild(
        self, info: _StepInfo, waiting: SubGroupPlan, missing: dict[str, tuple[str, ...]]
    ) -> SubGroupPlan:
        """``waiting`` needs upstream products whose copies are gone: re-plan their producers as rebuilds.

        The producers are planned with ``rebuild`` (recursively: a producer whose own inputs are gone waits in
        turn), and the consumer is UPSTREAM_NOT_READY until they completed again.
        """
        parts = []
        for upstream_name, keys in missing.items():
            groups = self.sub_groups(upstream_name, keys=keys)
            for plan in self.plan(upstream_name, groups.values(), respect_cooldown=False, rebuild=True):
                if plan.readiness is Readiness.GAP:
                    self.rebuilds[upstream_name][plan.sub_group_key] = plan
            parts.append(f"{len(keys)} sub-group(s) of {upstream_name!r} (e.g. {keys[0]!r})")
        plan = replace(
            waiting,
            reason=GapReason.MISSING_INTERMEDIATE,
            detail="waiting for upstream intermediates to be re-created (their copies were deleted by retention): "
            + ", ".join(parts),
        )
        self.waiting_for_rebuild[info.step.name][plan.sub_group_key] = plan
        return plan

    def _upstream_inputs(self, upstream: m.ReductionStep, groups: Sequence[SubGroup]) -> dict[str, _UpstreamInputs]:
        """Per sub-group key of ``groups``: the upstream sub-groups inside it, whether all are up to date, and
        their current products (or why not ready).

        Each package belongs to at most one sub-group of a step, so the upstream sub-groups touching the union
        of the members, mapped back through their members, are exactly those touching each group.
        """
        result: dict[str, _UpstreamInputs] = {}
        # Upstream sub-groups already planned in this evaluation and not up to date (typically those new data just
        # touched) settle the sub-groups holding them at once: a fan-in sub-group may hold thousands of upstream
        # sub-groups, and planning all of them on every tick would cost in proportion to the archive.
        blocking = self._blocking(upstream)
        undecided = []
        for group in groups:
            blocked = dict(blocking[i] for i in group.package_ids if i in blocking)
            if not blocked:
                undecided.append(group)
                continue
            key = min(blocked)
            plan = blocked[key]
            result[group.key] = (
                False,
                [],
                (),
                (
                    f"{len(blocked)} upstream sub-group(s) of {upstream.name!r} are not complete, e.g. {key!r}: "
                    f"{plan.readiness.value} {plan.detail}".rstrip()
                ),
                (),
            )
        groups = undecided
        member_ids = {i for g in groups for i in g.package_ids}
        upstream_groups = self.sub_groups(upstream.name, changed_package_ids=member_ids) if member_ids else {}
        pending = [g for g in upstream_groups.values() if (upstream.id, g.key) not in self._memo]
        if pending:
            self.plan(upstream.name, pending, respect_cooldown=False)
        key_of = {i: g.key for g in upstream_groups.values() for i in g.package_ids}
        inside = {g.key: sorted({key_of[i] for i in g.package_ids if i in key_of}) for g in groups}
        ready_keys = {
            key
            for keys in inside.values()
            for key in keys
            if self._memo[(upstream.id, key)].readiness is Readiness.UP_TO_DATE
        }
        products = self._current_products(upstream, sorted(ready_keys))
        gone = self._without_present_copy(products)
        for group in groups:
            keys = inside[group.key]
            not_ready = [(key, self._memo[(upstream.id, key)]) for key in keys if key not in ready_keys]
            if not_ready:
                key, plan = not_ready[0]
                result[group.key] = (
                    False,
                    [],
                    (),
                    (
                        f"{len(not_ready)} of {len(keys)} upstream sub-group(s) of {upstream.name!r} are not "
                        f"complete, e.g. {key!r}: {plan.readiness.value} {plan.detail}".rstrip()
                    ),
                    (),
                )
                continue
            result[group.key] = (
                True,
                [p for key in keys for p in products.get(key, [])],
                tuple(keys),
                "",
                tuple(key for key in keys if key in gone),
            )
        return result

    def _without_present_copy(self, products: dict[str, list[UpstreamProductRef]]) -> set[str]:
        """The sub-group keys among ``products`` with a product that has no present copy at the pipeline's
        processing location (retention deleted it, or marked it for deletion)."""
        ids = [p.product_id for refs in products.values() for p in refs]
        present: set[int] = set()
        for start in range(0, len(ids), _IDS_PER_STATEMENT):
            chunk = ids[start : start + _IDS_PER_STATEMENT]
            present.update(
                self.session.scalars(
                    select(m.PhysicalCopy.data_product_id)
                    .where(m.PhysicalCopy.data_location_id == self.pipeline.processing_location_id)
                    .where(m.PhysicalCopy.status == PhysicalCopyStatus.PRESENT)
                    .where(sql.id_in_list(m.PhysicalCopy.data_product_id, sql.id_list_param(chunk)))
                )
            )
        return {key for key, refs in products.items() if any(p.product_id not in present for p in refs)}

    def _blocking(self, upstream: m.ReductionStep) -> dict[int, tuple[str, SubGroupPlan]]:
        """Package id → (key, plan) of the sub-groups of ``upstream`` planned so far that are not up to date."""
        blocking = {
            i: (key, plan)
            for (step_id, key), plan in self._memo.items()
            if step_id == upstream.id and plan.readiness is not Readiness.UP_TO_DATE
            for i in plan.package_ids
        }
        blocking.update(self._not_ready_changed[upstream.id])
        return blocking

    def _current_products(self, upstream: m.ReductionStep, keys: Sequence[str]) -> dict[str, list[UpstreamProductRef]]:
        """The current (not superseded, from a COMPLETED attempt) products per sub-group key, by relative path."""
        products: dict[str, list[UpstreamProductRef]] = defaultdict(list)
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            rows = self.session.scalars(
                select(m.DataProduct)
                .join(
                    m.ExecutedReductionStep,
                    m.DataProduct.executed_reduction_step_id == m.ExecutedReductionStep.id,
                )
                .where(m.DataProduct.reduction_step_id == upstream.id)
                .where(m.DataProduct.sub_group_key.in_(chunk))
                .where(m.DataProduct.superseded_by_id.is_(None))
                .where(m.ExecutedReductionStep.status == RunStatus.COMPLETED)
                .order_by(m.DataProduct.sub_group_key, m.DataProduct.relative_path)
            )
            for p in rows:
                products[p.sub_group_key].append(
                    UpstreamProductRef(
                        product_id=p.id,
                        sha256=p.sha256,
                        step_name=upstream.name,
                        sub_group_key=p.sub_group_key,
                        relative_path=p.relative_path,
                        product_type=p.product_type.value,
                        size_bytes=p.size_bytes,
                    )
                )
        return products


def recreation_hint(pipeline: str, order: Sequence[tuple[str, Sequence[str]]], *, shown: int = 3) -> str:
    """One line for an operator whose manual run needs intermediates that retention deleted: which upstream
    sub-groups to materialize first, in which order, and the command that does it."""

    def keys(found: Sequence[str]) -> str:
        more = f" and {len(found) - shown} more" if len(found) > shown else ""
        return ", ".join(found[:shown]) + more

    steps = "; then ".join(f"{name} ({len(found)} sub-group(s): {keys(found)})" for name, found in order)
    first, first_keys = order[0]
    return (
        f"retention deleted upstream intermediates it reads and a manual run does not re-create them: materialize "
        f"first {steps}, e.g. `dagster asset materialize -m ccat_dagster.definitions --select {pipeline}/{first} "
        f"--partition {first_keys[0]}` (all of them: the run failure's metadata `recreate_first`), then this one again"
    )


def _upstream_first(steps: Iterable[m.ReductionStep]) -> list[str]:
    """Step names with every step after the steps it depends on."""
    ordered: list[str] = []

    def visit(step: m.ReductionStep) -> None:
        if step.name in ordered:
            return
        for upstream in step.depends_on:
            visit(upstream)
        ordered.append(step.name)

    for step in sorted(steps, key=lambda s: s.position):
        visit(step)
    return ordered


def load_pipeline(session: Session, name: str) -> m.Pipeline:
    pipeline = session.scalars(select(m.Pipeline).where(m.Pipeline.name == name)).one_or_none()
    if pipeline is None:
        known = ", ".join(session.scalars(select(m.Pipeline.name).order_by(m.Pipeline.name))) or "none"
        raise PlanningError(f"pipeline {name!r} is not in ops-db (known: {known}); apply its YAML first")
    return pipeline


_REASON_TEXT = {
    GapReason.NEW: "no attempt of this sub-group has completed yet",
    GapReason.INPUTS_CHANGED: "its raw data changed since the last completed attempt (new data or an invalidation)",
    GapReason.UPSTREAM_CHANGED: "an upstream sub-group re-ran with different output since the last completed attempt",
    GapReason.CONFIG_CHANGED: "the step config changed since the last completed attempt",
    GapReason.SOFTWARE_CHANGED: "the resolved software version or image changed since the last completed attempt",
    GapReason.RETRY: "the last attempt with these inputs failed; retries are left",
    GapReason.MISSING_INTERMEDIATE: "a consumer needs its products again and their copies were deleted",
    GapReason.FORCED: "run by hand",
}


def _gap_reason(
    info: _StepInfo,
    attempts: Sequence[m.ExecutedReductionStep],
    fingerprint: str,
    failed_same_inputs: Sequence[m.ExecutedReductionStep],
    *,
    force: bool,
    rebuild: bool,
) -> GapReason:
    """Why a sub-group that is not up to date needs a run, from its attempts (no further reads)."""
    if rebuild:
        return GapReason.FORCED if force else GapReason.MISSING_INTERMEDIATE
    if force:
        return GapReason.FORCED
    if failed_same_inputs and attempts and attempts[-1].input_fingerprint == fingerprint:
        return GapReason.RETRY
    completed = [a for a in attempts if a.status is RunStatus.COMPLETED]
    if not completed:
        return GapReason.RETRY if failed_same_inputs else GapReason.NEW
    last = completed[-1]
    if last.reduction_software_version_id != info.version.id:
        return GapReason.SOFTWARE_CHANGED
    if last.reduction_step_config_id != info.step.reduction_step_config_id:
        return GapReason.CONFIG_CHANGED
    return GapReason.UPSTREAM_CHANGED if info.upstream else GapReason.INPUTS_CHANGED
