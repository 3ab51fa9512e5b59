"""Build a pipeline's Dagster assets: one asset per ReductionStep, partitioned by sub_group_key.

Key ``[pipeline, step]``; dynamic partitions shared by the steps of a pipeline with the same ``group_by`` (so
identity mapping holds between them); a non-data dependency per ``depends_on`` (identity mapping when the
group_by is equal, all-partitions otherwise: Dagster cannot express "the per-scan sub-groups inside this
per-night sub-group", so the UI shows a dependency on all upstream partitions while ops-db keeps the exact
sub-group lineage); an external asset ``[pipeline, raw_data]`` stands for the grouping's raw data.

One run of a step asset handles many sub-groups (a backfill range, or the keys a sensor put in the run
config): each completed sub-group is reported as its own materialization (data version = input fingerprint);
failed sub-groups fail the run after the others are reported, and a re-execution only re-runs what is not
up to date.
"""

# No `from __future__ import annotations`: Dagster reads the config class from the real annotation.

import os

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.data_version import DATA_VERSION_TAG
from dagster._core.events import DagsterEvent, DagsterEventBatchMetadata, generate_event_batch_id
from dagster._core.storage.tags import PARENT_RUN_ID_TAG

from ccat_dagster.assets.metadata import materialization_metadata, qa_check_evaluation, qa_check_specs
from ccat_dagster.assets.snapshot import PipelineSnapshot, StepSnapshot
from ccat_dagster.execution.qa import (
    QaCheckOutcome,
    QaThreshold,
    evaluate_qa_checks,
    is_qa_file,
    read_qa_reports,
)
from ccat_dagster.execution.runner import OutcomeKind, RunnerConfig, StepRunner, SubGroupOutcome
from ccat_dagster.opsdb.states import ObservedTransition, observe_transitions

# Batched event-log writes (see _AssetEventBatch); inherited by the run workers this code location starts.
os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", "1000")

TRIGGER_TAG = "ccat/trigger"
PIPELINE_TAG = "ccat/pipeline"
STEP_TAG = "ccat/step"
BACKEND_TAG = "ccat/backend"
TRANSITION_TAG = "ccat/run_status"
# Set by a trigger on runs that re-create intermediates a consumer needs after retention deleted them.
REBUILD_TAG = "ccat/rebuild"


class StepRunConfig(dg.Config):
    """Run configuration of a step asset. Sensors list the sub-groups here; the UI/CLI use partitions instead."""

    sub_group_keys: list[str] = []
    force: bool | None = None


def partitions_name(pipeline: str, group_by: tuple[str, ...]) -> str:
    return f"{pipeline}__{'__'.join(group_by) if group_by else 'all'}"


def partitions_def(pipeline: str, group_by: tuple[str, ...]) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=partitions_name(pipeline, group_by))


def pipeline_pool(pipeline: str) -> str:
    """The Dagster concurrency pool shared by a pipeline's step assets."""
    return f"ccat/{pipeline}"


def step_asset_key(pipeline: str, step: str) -> dg.AssetKey:
    return dg.AssetKey([pipeline, step])


def step_asset_keys(pipeline: PipelineSnapshot) -> list[dg.AssetKey]:
    """What a pipeline's trigger may request. Runs target Dagster's implicit asset job with one step selected.

    No job is defined per step: each costs the code location ~10-15 ms to build and snapshot on every load
    (run-config schema), which is most of a large location's load time (docs/benchmarks.md, Code location
    load), while a run on the implicit asset job with ``asset_selection=[step]`` is the same run, the one
    Dagster's UI and backfills launch anyway.
    """
    return [step_asset_key(pipeline.name, step.name) for step in pipeline.steps]


def raw_data_key(pipeline: str) -> dg.AssetKey:
    return dg.AssetKey([pipeline, "raw_data"])


def build_pipeline_assets(
    pipeline: PipelineSnapshot, *, backend: str, runtime: str = "apptainer", max_partitions_per_run: int
) -> list[dg.AssetsDefinition | dg.AssetSpec]:
    raw = dg.AssetSpec(
        key=raw_data_key(pipeline.name),
        group_name=pipeline.name,
        description=(
            f"Archived RawDataPackages selected by the data grouping {pipeline.grouping_name!r} "
            "(ops-db; written by data-transfer, watched by the pipeline's sensor)."
        ),
        kinds={"postgres"},
        metadata={
            "grouping": pipeline.grouping_name,
            "filter_rules": dg.MetadataValue.json(pipeline.grouping_rules),
        },
    )
    assets: list[dg.AssetsDefinition | dg.AssetSpec] = [raw]
    for step in pipeline.steps:
        assets.append(
            _step_asset(pipeline, step, backend=backend, runtime=runtime, max_partitions_per_run=max_partitions_per_run)
        )
    return assets


def _step_asset(
    pipeline: PipelineSnapshot, step: StepSnapshot, *, backend: str, runtime: str, max_partitions_per_run: int
) -> dg.AssetsDefinition:
    deps: list[dg.AssetDep] = []
    if not step.depends_on:
        deps.append(dg.AssetDep(raw_data_key(pipeline.name)))
    for upstream_name in step.depends_on:
        upstream = pipeline.step(upstream_name)
        mapping = dg.IdentityPartitionMapping() if upstream.group_by == step.group_by else dg.AllPartitionMapping()
        deps.append(dg.AssetDep(step_asset_key(pipeline.name, upstream_name), partition_mapping=mapping))
    is_final = not pipeline.downstream_of(step.name)
    description = (
        f"{step.description or step.name} — software {step.software} ({step.version_policy} {step.version_spec}), "
        f"one partition per sub-group of group_by {list(step.group_by) or '[] (everything)'}, "
        f"cooldown {step.cooldown_seconds}s, max_retries {step.max_retries}"
        + ("; final step: products under output/" if is_final else "; intermediate step: products in workspace/")
    )

    key = step_asset_key(pipeline.name, step.name)
    partitions = partitions_def(pipeline.name, step.group_by)
    check_specs = qa_check_specs(key, step.qa_checks, partitions)

    @dg.asset(
        key=key,
        partitions_def=partitions,
        check_specs=check_specs,
        deps=deps,
        group_name=pipeline.name,
        description=description,
        code_version=step.code_version,
        kinds={runtime, backend},
        tags={"ccat/software": _tag_value(step.software)},
        op_tags={PIPELINE_TAG: pipeline.name, STEP_TAG: step.name, BACKEND_TAG: backend},
        output_required=False,
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=max_partitions_per_run),
        # Per-pipeline limit on steps executing at once, whatever launched the run (dagster.yaml concurrency.pools).
        pool=pipeline_pool(pipeline.name),
        metadata={"group_by": dg.MetadataValue.json(list(step.group_by)), "resources": step.resources},
        required_resource_keys={"opsdb", "hpc", "container_runtime", "stager", "execution"},
    )
    def _step(context: dg.AssetExecutionContext, config: StepRunConfig):  # type: ignore[no-untyped-def]
        selected = context.selected_asset_check_keys
        run_step(
            context,
            config,
            pipeline_name=pipeline.name,
            step_name=step.name,
            trigger_type=pipeline.trigger_type,
            qa_checks=tuple(t for t in step.qa_checks if dg.AssetCheckKey(key, t.check_name) in selected),
        )
        # No asset output (output_required=False): the sub-groups were materialized one by one, and their QA
        # checks evaluated per sub-group; the check outputs only tell Dagster the step delivered them.
        for spec in check_specs:
            if spec.key in selected:
                yield dg.Output(None, output_name=spec.get_python_identifier())

    return _step


def run_step(
    context: dg.AssetExecutionContext,
    config: StepRunConfig,
    *,
    pipeline_name: str,
    step_name: str,
    trigger_type: str = "continuous",
    qa_checks: tuple[QaThreshold, ...] = (),
) -> None:
    """The asset body: hand the requested sub-groups to the StepRunner and mirror the outcomes into Dagster.

    Each completed sub-group is logged as its materialization when it completes; failed ones fail the step at
    the end with one ``dg.Failure`` naming them.
    """
    keys = _requested_keys(context, config)
    if not keys:
        raise dg.Failure(
            f"no sub-group requested for {pipeline_name}/{step_name}: materialize a partition "
            "(--partition KEY), a range, or pass run config sub_group_keys"
        )
    # A manual run redoes up-to-date sub-groups; a sensor / schedule run only does what has no completed attempt
    # for its current inputs; a re-execution or run retry of any run redoes exactly its failed sub-groups.
    retry_failed = PARENT_RUN_ID_TAG in context.run.tags
    automatic = context.run.tags.get(TRIGGER_TAG) in ("sensor", "schedule") or retry_failed
    # A re-creation of deleted intermediates redoes sub-groups that are up to date by their fingerprint.
    rebuild = REBUILD_TAG in context.run.tags
    force = config.force if config.force is not None else (not automatic or rebuild)
    res = context.resources
    execution = res.execution
    instance = context.instance
    events = _AssetEventBatch(context)

    def is_run_alive(run_id: str) -> bool:
        run = instance.get_run_by_id(run_id)
        return run is not None and not run.is_finished

    runner = StepRunner(
        engine=res.opsdb.engine(),
        backend=res.hpc.get(),
        backend_for_step=res.hpc.for_step,
        runtime=res.container_runtime.get(),
        stager=res.stager.get(),
        config=RunnerConfig(
            pipeline_base_dir=_path(execution.pipeline_base_dir),
            processing_location_id=execution.processing_location_id,
            sif_cache_dir=_path(execution.sif_cache_dir),
            max_in_flight=execution.max_in_flight,
            poll_interval_seconds=execution.poll_interval_seconds,
            staging_timeout_seconds=execution.staging_timeout_seconds,
            scheduler_tolerance_seconds=execution.scheduler_tolerance_seconds,
            scheduler_queries_per_minute=execution.scheduler_queries_per_minute,
            # The runs of this location share one status query per poll through the pipeline file system.
            status_cache_dir=_path(execution.pipeline_base_dir) / ".status-cache",
            opsdb_tolerance_seconds=execution.ops_db_tolerance_seconds,
            max_memory_gb=execution.max_memory_gb,
            max_time_hours=execution.max_time_hours,
            max_products_per_attempt=execution.max_products_per_attempt,
        ),
        report=context.log.info,
        is_run_alive=is_run_alive,
        # Each sub-group is materialized in the round it completes, so a long batch shows its progress.
        on_outcome=lambda outcome: events.add_outcome(outcome, qa_checks),
        on_round_end=events.flush,
    )
    with observe_transitions(lambda change: events.add(_transition_observation(context.asset_key, change))):
        outcomes = runner.run(
            pipeline_name=pipeline_name,
            step_name=step_name,
            sub_group_keys=keys,
            dagster_run_id=context.run.run_id,
            force=force,
            retry_failed=retry_failed,
            by_hand=not automatic,
        )
    events.flush()
    failed = [o for o in outcomes if o.kind in (OutcomeKind.FAILED, OutcomeKind.CANCELLED)]
    done = sum(1 for o in outcomes if o.kind is OutcomeKind.COMPLETED)
    skipped = sum(1 for o in outcomes if o.kind is OutcomeKind.SKIPPED)
    context.log.info(
        f"{pipeline_name}/{step_name}: {done} completed, {len(failed)} failed, {skipped} skipped "
        f"of {len(outcomes)} sub-group(s); {runner.waited_seconds:.2f} s waiting for jobs between polls, "
        f"{runner.status_query_seconds:.2f} s in status queries, {runner.submit_seconds:.2f} s submitting"
    )
    waiting = [
        o for o in outcomes if o.kind is OutcomeKind.SKIPPED and (o.detail or "").startswith("upstream_not_ready")
    ]
    stranded = [o for o in waiting if o.waits_for_recreation]
    if stranded and not automatic and not failed:
        # A run by hand never re-creates deleted intermediates behind the operator's back (docs/provenance.md).
        keys = ", ".join(o.sub_group_key for o in stranded[:3]) + (" …" if len(stranded) > 3 else "")
        raise dg.Failure(
            description=f"{len(stranded)} sub-group(s) of {pipeline_name}/{step_name} did not run ({keys}): "
            + stranded[0].detail.partition(": ")[2],
            metadata={
                "waiting_sub_groups": dg.MetadataValue.json([o.sub_group_key for o in stranded]),
                "recreate_first": dg.MetadataValue.json(dict(runner.recreate_first)),
            },
        )
    if waiting and not done and not failed:
        raise dg.Failure(description=_waiting_message(pipeline_name, step_name, trigger_type, waiting, len(outcomes)))
    if failed:
        lines = [
            f"{o.sub_group_key}: {o.kind.value}{f' ({o.failure_kind.value})' if o.failure_kind else ''} "
            f"(attempt {o.attempt_id}): {(o.detail or '').partition(chr(10))[0]}"
            for o in failed[:20]
        ]
        raise dg.Failure(
            description=f"{len(failed)} of {len(outcomes)} sub-group(s) of {pipeline_name}/{step_name} failed:\n"
            + "\n".join(lines),
            metadata={
                "failed_sub_groups": dg.MetadataValue.json([o.sub_group_key for o in failed]),
                "failure_kinds": dg.MetadataValue.json(
                    {o.sub_group_key: o.failure_kind.value if o.failure_kind else None for o in failed}
                ),
                "completed": done,
            },
        )


def _waiting_message(
    pipeline_name: str, step_name: str, trigger_type: str, waiting: list[SubGroupOutcome], total: int
) -> str:
    """A run whose sub-groups all wait for upstream work did nothing: say so, and what will happen next."""
    next_step = {
        "continuous": "the pipeline's sensor requests them once the upstream sub-groups have completed",
        "cron": "the pipeline's cron sensor requests them once the upstream sub-groups have completed",
    }.get(
        trigger_type,
        "this pipeline is MANUAL: materialize the upstream partitions named above first, then this one again",
    )
    lines = [f"  {o.sub_group_key}: {(o.detail or '').partition(chr(10))[0]}" for o in waiting[:20]]
    return (
        f"nothing ran: {len(waiting)} of {total} sub-group(s) of {pipeline_name}/{step_name} wait for upstream "
        f"work; {next_step}\n" + "\n".join(lines)
    )


def _materialization(asset_key: dg.AssetKey, outcome: SubGroupOutcome) -> dg.AssetMaterialization | None:
    """A completed sub-group as its own materialization (data version = input fingerprint)."""
    if outcome.kind is not OutcomeKind.COMPLETED:
        return None
    return dg.AssetMaterialization(
        asset_key=asset_key,
        partition=outcome.sub_group_key,
        metadata=materialization_metadata(outcome.metadata, outcome.products),
        tags={DATA_VERSION_TAG: outcome.fingerprint or ""},
    )


class _AssetEventBatch:
    """The asset events of one runner round, written to the event log as one batch per kind.

    One event per sub-group and per transition, written one by one, would cost two event-log round trips each.
    Dagster writes a batch in one INSERT when ``DAGSTER_EVENT_BATCH_SIZE`` > 0 (set below, unless the
    deployment sets it) and one by one otherwise; either way each event is logged for its own partition.
    """

    def __init__(self, context: dg.AssetExecutionContext) -> None:
        self.context = context
        self.pending: list[dg.AssetObservation | dg.AssetMaterialization] = []
        self.checks: list[tuple[str, QaCheckOutcome]] = []

    def add(self, event: dg.AssetObservation | dg.AssetMaterialization | None) -> None:
        if event is not None:
            self.pending.append(event)

    def add_outcome(self, outcome: SubGroupOutcome, qa_checks: tuple[QaThreshold, ...]) -> None:
        """A sub-group's materialization and, when it completed, its QA checks (after the materialization)."""
        self.add(_materialization(self.context.asset_key, outcome))
        if qa_checks and outcome.kind is OutcomeKind.COMPLETED:
            self.checks.extend((outcome.sub_group_key, check) for check in _qa_outcomes(qa_checks, outcome))

    def flush(self) -> None:
        if not self.pending and not self.checks:
            return
        pending, self.pending = self.pending, []
        checks, self.checks = self.checks, []
        step_context = self.context.get_step_execution_context()
        # Transitions first: a sub-group's COMPLETED observation precedes its materialization.
        for kind, to_event in (
            (dg.AssetObservation, DagsterEvent.asset_observation),
            (dg.AssetMaterialization, DagsterEvent.asset_materialization),
        ):
            batch = [e for e in pending if isinstance(e, kind)]
            batch_id = generate_event_batch_id()
            for index, event in enumerate(batch):
                to_event(step_context, event, DagsterEventBatchMetadata(batch_id, index == len(batch) - 1))
        # Checks judge the materialization just written: one look-up per checked sub-group (final steps only).
        targets: dict[str, AssetCheckEvaluationTargetMaterializationData | None] = {}
        for sub_group_key, check in checks:
            if sub_group_key not in targets:
                targets[sub_group_key] = self._target(sub_group_key)
            evaluation = qa_check_evaluation(
                self.context.asset_key, sub_group_key, check, target=targets[sub_group_key]
            )
            DagsterEvent.asset_check_evaluation(step_context, evaluation)

    def _target(self, sub_group_key: str) -> AssetCheckEvaluationTargetMaterializationData | None:
        records = self.context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=self.context.asset_key, asset_partitions=[sub_group_key]), limit=1
        ).records
        if not records:
            return None
        record = records[0]
        return AssetCheckEvaluationTargetMaterializationData(
            run_id=record.run_id, storage_id=record.storage_id, timestamp=record.timestamp
        )


def _qa_outcomes(qa_checks: tuple[QaThreshold, ...], outcome: SubGroupOutcome) -> list[QaCheckOutcome]:
    """The step's QA checks on the sub-group's qa/*.json products; unreadable reports fail checks, not the step."""
    files = [(p.relative_path, p.host_path) for p in outcome.products if is_qa_file(p.relative_path, p.product_type)]
    return evaluate_qa_checks(qa_checks, read_qa_reports(files))


def _transition_observation(asset_key: dg.AssetKey, change: ObservedTransition) -> dg.AssetObservation:
    """One RunStatus transition of an attempt as a structured event on the sub-group's partition."""
    metadata = {
        "attempt_id": change.attempt_id,
        "attempt": change.attempt,
        "status_from": change.from_status.value,
        "status_to": change.to_status.value,
        "at": change.at.isoformat(),
        "hpc_job_id": change.hpc_job_id or "",
        "message": (change.message or "")[:2000],
    }
    if change.failure_kind is not None:
        metadata["failure_kind"] = change.failure_kind.value
    return dg.AssetObservation(
        asset_key=asset_key,
        partition=change.sub_group_key,
        description=f"attempt {change.attempt_id}: {change.from_status.value} → {change.to_status.value}",
        metadata=metadata,
        tags={TRANSITION_TAG: change.to_status.value},
    )


def _requested_keys(context: dg.AssetExecutionContext, config: StepRunConfig) -> list[str]:
    if config.sub_group_keys:
        return list(config.sub_group_keys)
    if context.has_partition_key_range:
        return list(context.partition_keys)
    if context.has_partition_key:
        return [context.partition_key]
    return []


def _tag_value(value: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in value)[:63]


def _path(value: str):  # type: ignore[no-untyped-def]
    from pathlib import Path

    return Path(value)
