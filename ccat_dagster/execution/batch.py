"""The sub-groups of one batch while the step runner works on them: waiting for a slot, or in flight."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ccat_dagster.execution import contract
from ccat_dagster.execution.attempts import AttemptRef
from ccat_dagster.execution.hpc.base import JobResources
from ccat_dagster.execution.planning import GapReason, Readiness, SubGroupPlan
from ccat_dagster.opsdb.enums import FailureKind

log = logging.getLogger(__name__)


@dataclass
class Queued:
    """A sub-group waiting for a submission slot: its next attempt's retry number and resources."""

    plan: SubGroupPlan
    retry: int
    resources: JobResources
    earlier: tuple[FailureKind, ...] = ()


@dataclass
class Active:
    """One attempt in flight inside this batch."""

    plan: SubGroupPlan
    ref: AttemptRef
    layout: contract.AttemptLayout
    resources: JobResources
    job_id: str | None = None
    running: bool = False
    earlier: tuple[FailureKind, ...] = ()

    @property
    def attempt_id(self) -> int:
        return self.ref.attempt_id


def waits_for_recreation(plan: SubGroupPlan) -> bool:
    return plan.readiness is Readiness.UPSTREAM_NOT_READY and plan.reason is GapReason.MISSING_INTERMEDIATE


def best_effort(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except Exception:  # noqa: BLE001 - cleanup on the way out must not hide the error that got us here
        log.warning("best-effort action failed", exc_info=True)
        return None
