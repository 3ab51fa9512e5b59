"""The retention cleanup as a Dagster job on a daily schedule (docs/provenance.md, Retention), a thin wrapper around
``ccat_dagster.provenance.cleanup.run_retention_cleanup``.

Job ``ccat_retention_cleanup`` with one op ``retention_cleanup`` (config ``dry_run``, ``retention_days``:
defaults from the settings);
schedule ``ccat_retention_cleanup_daily`` at 04:00 UTC, STOPPED by default (an operator turns deletion on
deliberately). The op logs every marked, deleted and refused path; a real run in which a file could not be
removed fails after everything else was done, so the failure is visible in the UI.
"""

# No `from __future__ import annotations`: Dagster reads the config class from the real annotation.

from pathlib import Path

import dagster as dg

from ccat_dagster.execution.retention import DeletionAction
from ccat_dagster.opsdb.engine import shared_engine
from ccat_dagster.provenance.cleanup import run_retention_cleanup
from ccat_dagster.provenance.report import recreation_text
from ccat_dagster.settings import Settings

RETENTION_JOB = "ccat_retention_cleanup"
# Dagster wants op names distinct from job (graph) names within a code location.
RETENTION_OP = "retention_cleanup"
RETENTION_SCHEDULE = "ccat_retention_cleanup_daily"
RETENTION_CRON = "0 4 * * *"


class RetentionCleanupConfig(dg.Config):
    """``dry_run``: list what would be marked and deleted, change nothing. ``retention_days``: days after the
    last consuming attempt finished before an intermediate may go (negative = the deployment's setting)."""

    dry_run: bool = False
    retention_days: float = -1.0


def build_retention_definitions(
    settings: Settings,
) -> tuple[list[dg.JobDefinition], list[dg.ScheduleDefinition]]:
    """The cleanup job and its daily schedule for this deployment's settings."""

    @dg.op(name=RETENTION_OP, description="Mark deletable intermediates, then delete deletion_possible files.")
    def _cleanup(context: dg.OpExecutionContext, config: RetentionCleanupConfig) -> dg.Output[None]:
        retention_days = settings.retention_days if config.retention_days < 0 else config.retention_days
        report = run_retention_cleanup(
            shared_engine(settings.ops_db_url),
            pipeline_base_dir=Path(settings.pipeline_base_dir),
            processing_location_id=settings.processing_location_id,
            retention_days=retention_days,
            dry_run=config.dry_run,
        )
        verb = "would mark" if report.dry_run else "marked"
        for marked in report.marked:
            context.log.info(f"{verb} copy {marked.copy_id} deletion_possible: {marked.path} ({marked.reason})")
        for outcome in report.outcomes:
            line = (
                f"copy {outcome.copy_id}: {outcome.action.value} {outcome.path} ({outcome.reason}; "
                f"{recreation_text(outcome)})"
            )
            (context.log.warning if outcome.action is DeletionAction.FAILED else context.log.info)(line)
        context.log.info(report.summary())
        failed = [o for o in report.outcomes if o.action is DeletionAction.FAILED]
        if failed and not report.dry_run:
            raise dg.Failure(
                description=f"{len(failed)} file(s) could not be deleted (copies now deletion_failed); fix "
                "the cause, set the copies back to deletion_possible and run the job again",
                metadata={"failed_paths": dg.MetadataValue.json([str(o.path) for o in failed])},
            )
        return dg.Output(
            None,
            metadata={
                "dry_run": report.dry_run,
                "retention_days": retention_days,
                "marked": len(report.marked),
                "deleted": report.count(DeletionAction.DELETED),
                "would_delete": report.count(DeletionAction.WOULD_DELETE),
                "failed": len(failed),
            },
        )

    @dg.job(
        name=RETENTION_JOB,
        description="Retention cleanup of intermediate products; final products are never deleted.",
        tags={"ccat/maintenance": "retention"},
    )
    def _job() -> None:
        _cleanup()

    schedule = dg.ScheduleDefinition(
        name=RETENTION_SCHEDULE,
        job=_job,
        cron_schedule=RETENTION_CRON,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Daily retention cleanup (stopped by default: start it when deletion is wanted).",
    )
    return [_job], [schedule]
