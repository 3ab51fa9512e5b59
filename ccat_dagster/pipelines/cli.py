"""``ccat-dagster pipelines …``: check pipeline YAML files, store them in ops-db, list, show, enable, disable,
and ``gaps``: what would run now and why.

Exit codes: 0 everything worked; 1 a file or name was rejected (every problem is printed on stderr);
2 ops-db could not be used at all (unreachable, not migrated) or bad settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ccat_dagster.errors import CcatError
from ccat_dagster.opsdb.engine import make_engine, session_scope
from ccat_dagster.pipelines.apply import (
    ApplyResult,
    PipelineApplyError,
    PipelineNotFoundError,
    apply_pipeline_spec,
    export_pipeline,
    get_pipeline,
    list_pipelines,
    set_pipeline_enabled,
)
from ccat_dagster.pipelines.spec import PipelineSpec, PipelineSpecError, load_pipeline_spec
from ccat_dagster.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]

EXIT_OK, EXIT_REJECTED, EXIT_OPSDB = 0, 1, 2


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``pipelines`` command group to the ``ccat-dagster`` parser."""
    group = commands.add_parser(
        "pipelines",
        help="pipeline YAML files: validate, apply to ops-db, list, show, enable, disable",
        description="Pipelines are YAML files (docs/pipeline-yaml.md) stored in ops-db by `apply`.",
    )
    sub = group.add_subparsers(dest="pipelines_command", required=True, metavar="COMMAND")

    validate = sub.add_parser(
        "validate",
        help="check files; also checks them against ops-db (read only) unless --offline",
        description="Check pipeline files as `apply` would, writing nothing. Exit 1 if any is invalid.",
    )
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    validate.add_argument(
        "--offline",
        action="store_true",
        help="check the files only (schema and meaning); skip the ops-db checks (locations, modules, "
        "presets, registered software versions)",
    )
    validate.set_defaults(handler=_validate)

    apply = sub.add_parser(
        "apply",
        help="create or update pipelines from files (each file in its own transaction)",
        description="Create or update the pipeline in each file. A rejected file changes nothing; the others "
        "are still applied. Exit 1 if any file was rejected.",
    )
    apply.add_argument("files", nargs="+", type=Path, metavar="FILE")
    apply.set_defaults(handler=_apply)

    list_cmd = sub.add_parser("list", help="the stored pipelines")
    list_cmd.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    list_cmd.set_defaults(handler=_list)

    show = sub.add_parser("show", help="a stored pipeline as pipeline YAML (re-appliable)")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")
    show.set_defaults(handler=_show)

    disable = sub.add_parser("disable", help="stop sensors and schedules from evaluating a pipeline")
    disable.add_argument("name", metavar="NAME")
    disable.set_defaults(handler=_toggle, enabled=False)

    enable = sub.add_parser("enable", help="let sensors and schedules evaluate a pipeline again")
    enable.add_argument("name", metavar="NAME")
    enable.set_defaults(handler=_toggle, enabled=True)

    gaps = sub.add_parser(
        "gaps",
        help="what would run now and why (new data, changes, retries, deleted intermediates); runs nothing",
        description="Evaluate every step and sub-group of a pipeline as a full trigger evaluation would and print "
        "the sub-groups that are not up to date, each with its state and why. Reads ops-db only.",
    )
    gaps.add_argument("name", metavar="NAME")
    gaps.add_argument("--step", metavar="STEP", help="only this step (its upstream steps are still evaluated)")
    gaps.add_argument("--json", action="store_true", help="one JSON document instead of text")
    gaps.set_defaults(handler=_gaps)

    run = sub.add_parser(
        "run",
        help="launch the Dagster run(s) a sensor would, now, and wait for them with progress",
        description="Launch runs of a step through the Dagster webserver "
        "(CCAT_WORKFLOW_MANAGER_DAGSTER_WEBSERVER_URL), "
        "tagged like sensor runs (ccat/trigger=manual), visible in the UI. Without --sub-group: the sub-groups "
        "with a gap; with it: exactly those, re-run even when up to date. Without --step: every step in "
        "dependency order, each after the one before has finished. Needs DAGSTER_HOME (the instance).",
    )
    run.add_argument("name", metavar="NAME")
    run.add_argument("--step", metavar="STEP", help="only this step")
    run.add_argument(
        "--sub-group", dest="sub_groups", action="append", default=[], metavar="KEY", help="a sub_group_key (repeat)"
    )
    run.add_argument("--no-wait", action="store_true", help="launch and return; do not wait for the runs")
    run.set_defaults(handler=_run)


# ---------------------------------------------------------------------------------------------- handlers


class _OpsDbUnusable(Exception):
    """Internal: ops-db raised a database error; reported once as exit code 2."""


@contextmanager
def _engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.ops_db_url)
    try:
        yield engine
    except SQLAlchemyError as error:
        detail = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        print(
            f"ccat-dagster: error: cannot use ops-db at {settings.redacted_ops_db_url}: {detail}; "
            "check CCAT_OPS_DB_URL and run `ccat-dagster db upgrade`",
            file=sys.stderr,
        )
        raise _OpsDbUnusable from error
    finally:
        engine.dispose()


def _report_rejected(path: Path, error: PipelineSpecError | PipelineApplyError | PipelineNotFoundError) -> None:
    problems = getattr(error, "problems", None) or (str(error),)
    print(f"rejected {path}: {len(problems)} problem(s)", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def _print_result(result: ApplyResult, path: Path, *, dry_run: bool = False) -> None:
    verb = f"would be {result.outcome.value}" if dry_run else result.outcome.value
    ident = f" (id {result.pipeline_id})" if not (dry_run and result.outcome.value == "created") else ""
    print(f"{verb}: pipeline {result.pipeline_name}{ident} from {path}")
    for change in result.changes:
        print(f"  - {change}")


def _validate(args: argparse.Namespace, settings: Settings) -> int:
    specs: list[tuple[Path, PipelineSpec]] = []
    rejected = 0
    for path in args.files:
        try:
            specs.append((path, load_pipeline_spec(path)))
        except PipelineSpecError as error:
            _report_rejected(path, error)
            rejected += 1
    if args.offline:
        for path, spec in specs:
            print(f"valid: pipeline {spec.name} ({len(spec.steps)} steps) in {path} (ops-db not consulted)")
        return EXIT_REJECTED if rejected else EXIT_OK
    try:
        with _engine(settings) as engine:
            for path, spec in specs:
                # The whole apply runs and is rolled back: every ops-db check, nothing written.
                session = Session(engine)
                try:
                    result = apply_pipeline_spec(session, spec, source_path=path)
                except PipelineApplyError as error:
                    _report_rejected(path, error)
                    rejected += 1
                    continue
                finally:
                    session.rollback()
                    session.close()
                _print_result(result, path, dry_run=True)
    except _OpsDbUnusable:
        return EXIT_OPSDB
    return EXIT_REJECTED if rejected else EXIT_OK


def _apply(args: argparse.Namespace, settings: Settings) -> int:
    rejected = 0
    seen: dict[str, Path] = {}
    try:
        with _engine(settings) as engine:
            for path in args.files:
                try:
                    spec = load_pipeline_spec(path)
                    if spec.name in seen:
                        raise PipelineApplyError(
                            [
                                f"{path}: pipeline: {spec.name!r} is also defined by {seen[spec.name]} in "
                                "this command; one pipeline, one file"
                            ]
                        )
                    seen[spec.name] = path
                    with session_scope(engine) as session:
                        result = apply_pipeline_spec(session, spec, source_path=path)
                except (PipelineSpecError, PipelineApplyError) as error:
                    _report_rejected(path, error)
                    rejected += 1
                    continue
                _print_result(result, path)
                _sync_dagster_partitions(engine, result.pipeline_name)
    except _OpsDbUnusable:
        return EXIT_OPSDB
    return EXIT_REJECTED if rejected else EXIT_OK


def _list(args: argparse.Namespace, settings: Settings) -> int:
    try:
        with _engine(settings) as engine, session_scope(engine) as session:
            summaries = list_pipelines(session)
    except _OpsDbUnusable:
        return EXIT_OPSDB
    if args.json:
        print(json.dumps([summary.to_json() for summary in summaries], indent=2))
        return EXIT_OK
    if not summaries:
        print("no pipelines in ops-db (apply one with `ccat-dagster pipelines apply FILE`)")
        return EXIT_OK
    rows = [("NAME", "ENABLED", "TRIGGER", "LOCATION", "GROUPING", "PRIORITY", "STEPS")]
    for s in summaries:
        trigger = s.trigger_type + (f" {s.trigger_config['cron']!r}" if s.trigger_type == "cron" else "")
        rows.append(
            (
                s.name,
                "yes" if s.enabled else "no",
                trigger,
                s.processing_location,
                s.data_grouping,
                str(s.priority),
                " → ".join(s.steps),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return EXIT_OK


def _show(args: argparse.Namespace, settings: Settings) -> int:
    try:
        with _engine(settings) as engine, session_scope(engine) as session:
            try:
                exported = export_pipeline(session, args.name)
                pipeline = get_pipeline(session, args.name)
            except PipelineNotFoundError as error:
                print(f"ccat-dagster: error: {error}", file=sys.stderr)
                return EXIT_REJECTED
            header = (
                f"# pipeline id {pipeline.id}; stored definition sha256 {pipeline.spec_sha256}; "
                f"updated {pipeline.updated_at:%Y-%m-%d %H:%M:%S} UTC\n"
                + "".join(
                    f"# step {step.name}: id {step.id}, config ReductionStepConfig #{step.config.id}\n"
                    for step in pipeline.steps
                )
            )
    except _OpsDbUnusable:
        return EXIT_OPSDB
    if args.json:
        print(json.dumps(exported, indent=2, ensure_ascii=False))
    else:
        print(header + yaml.safe_dump(exported, sort_keys=False, allow_unicode=True, width=110), end="")
    return EXIT_OK


def _toggle(args: argparse.Namespace, settings: Settings) -> int:
    try:
        with _engine(settings) as engine, session_scope(engine) as session:
            try:
                previous = set_pipeline_enabled(session, args.name, enabled=args.enabled)
            except PipelineNotFoundError as error:
                print(f"ccat-dagster: error: {error}", file=sys.stderr)
                return EXIT_REJECTED
    except _OpsDbUnusable:
        return EXIT_OPSDB
    state = "enabled" if args.enabled else "disabled"
    if previous == args.enabled:
        print(f"pipeline {args.name} was already {state}")
    else:
        print(f"pipeline {args.name} {state}")
    return EXIT_OK


def _sync_dagster_partitions(engine: Engine, pipeline_name: str) -> None:
    """After an apply: the pipeline's current sub-groups as partitions of the Dagster instance (DAGSTER_HOME),
    so that a MANUAL or CRON pipeline can be materialized by hand at once. Without DAGSTER_HOME, or if the
    instance cannot be used, the apply stands and the partitions sensor adds them later."""
    import os

    if not os.environ.get("DAGSTER_HOME"):
        print("  partitions: DAGSTER_HOME is not set; the pipeline's sensor adds them once the code location runs")
        return
    # The Dagster layer, imported only here: the rest of this package knows nothing of Dagster.
    import dagster as dg

    from ccat_dagster.assets.partitions import sync_partitions

    try:
        with dg.DagsterInstance.get() as instance, session_scope(engine) as session:
            added = sync_partitions(instance, session, pipeline_name)
    except Exception as error:  # noqa: BLE001 - the apply is committed; a partition sync failure must not hide it
        print(f"  partitions: not synced with the Dagster instance ({error}); the sensor adds them later")
        return
    total = sum(len(keys) for keys in added.values())
    print(f"  partitions: {total} added" + "".join(f"; {name}: {len(keys)}" for name, keys in added.items()))


# ---------------------------------------------------------------------------------------------- gaps

# What happens to a pipeline's gaps without anyone doing anything, per trigger type.
_NEXT_BY_TRIGGER = {
    "continuous": "the pipeline's sensor requests the gaps at its next tick (once their cooldown has passed)",
    "cron": "the pipeline's cron sensor requests the gaps at its next cron tick; dependent steps as soon as "
    "their upstream sub-groups complete",
    "manual": "nothing runs by itself (MANUAL pipeline): materialize the gaps in the UI or with "
    "`dagster asset materialize --select PIPELINE/STEP --partition KEY`",
}
_SHOWN_PER_STEP = 50


def _gaps(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.errors import CcatError
    from ccat_dagster.execution.planning import Readiness, load_pipeline
    from ccat_dagster.execution.triggers import plan_all
    from ccat_dagster.opsdb.models import utcnow

    now = utcnow()
    try:
        with _engine(settings) as engine, session_scope(engine) as session:
            try:
                pipeline = load_pipeline(session, args.name)
                if args.step is not None and args.step not in {s.name for s in pipeline.steps}:
                    names = ", ".join(s.name for s in pipeline.steps)
                    raise PipelineNotFoundError(f"pipeline {args.name!r} has no step {args.step!r}; its steps: {names}")
                plans = plan_all(session, pipeline, now=now)
            except (CcatError, PipelineNotFoundError) as error:
                print(f"ccat-dagster: error: {error}", file=sys.stderr)
                return EXIT_REJECTED
            trigger = pipeline.trigger_type.value
            next_step = _NEXT_BY_TRIGGER[trigger] if pipeline.enabled else "nothing runs: the pipeline is disabled"
    except _OpsDbUnusable:
        return EXIT_OPSDB
    if args.step is not None:
        plans = {args.step: plans.get(args.step, [])}
    rows = {
        step: [p for p in step_plans if p.readiness is not Readiness.UP_TO_DATE] for step, step_plans in plans.items()
    }
    if args.json:
        document = {
            "pipeline": args.name,
            "trigger": trigger,
            "enabled": pipeline.enabled,
            "evaluated_at": now.isoformat(),
            "what_happens_next": next_step,
            "steps": [
                {
                    "step": step,
                    "sub_groups": len(plans[step]),
                    "counts": _counts(plans[step]),
                    "not_up_to_date": [_plan_json(p) for p in rows[step]],
                }
                for step in plans
            ],
        }
        print(json.dumps(document, indent=2))
        return EXIT_OK
    print(f"pipeline {args.name} ({trigger}{'' if pipeline.enabled else ', disabled'}) at {now:%Y-%m-%d %H:%M:%S} UTC")
    for step, step_plans in plans.items():
        counts = ", ".join(f"{n} {state}" for state, n in _counts(step_plans).items()) or "no sub-groups"
        print(f"step {step}: {len(step_plans)} sub-group(s): {counts}")
        for plan in rows[step][:_SHOWN_PER_STEP]:
            print(f"  {_plan_line(plan)}")
        if len(rows[step]) > _SHOWN_PER_STEP:
            print(f"  … {len(rows[step]) - _SHOWN_PER_STEP} more (--json lists all)")
    print(f"next: {next_step}")
    return EXIT_OK


def _counts(plans: list) -> dict[str, int]:  # type: ignore[type-arg]
    counts: dict[str, int] = {}
    for plan in plans:
        counts[plan.readiness.value] = counts.get(plan.readiness.value, 0) + 1
    return dict(sorted(counts.items()))


def _plan_json(plan) -> dict[str, object]:  # type: ignore[no-untyped-def]
    return {
        "sub_group_key": plan.sub_group_key,
        "state": plan.readiness.value,
        "reason": plan.reason.value if plan.reason else None,
        "detail": plan.detail,
        "due_at": plan.due_at.isoformat() if plan.due_at else None,
        "fingerprint": plan.fingerprint,
    }


def _plan_line(plan) -> str:  # type: ignore[no-untyped-def]
    reason = f" [{plan.reason.value}]" if plan.reason else ""
    return f"{plan.readiness.value:<18} {plan.sub_group_key}{reason}: {plan.detail}".rstrip(": ")


# ---------------------------------------------------------------------------------------------- run


def _run(args: argparse.Namespace, settings: Settings) -> int:
    import dagster as dg

    from ccat_dagster.launch import (
        MANUAL_TRIGGER,
        GraphQLRunLauncher,
        attempt_counts,
        launch_step,
        pipeline_step_order,
        plan_step_launch,
        wait_for_runs,
    )

    launcher = GraphQLRunLauncher(settings.dagster_webserver_url)
    engine = make_engine(settings.ops_db_url)
    failed = False
    try:
        with session_scope(engine) as session:
            steps = [args.step] if args.step else pipeline_step_order(session, args.name)
        if args.sub_groups and len(steps) > 1:
            print(
                "ccat-dagster: error: --sub-group needs --step (a sub_group_key belongs to one step)", file=sys.stderr
            )
            return EXIT_REJECTED
        if args.no_wait and len(steps) > 1:
            steps = steps[:1]
            print(f"--no-wait: launching the first step only ({steps[0]}); later steps need its results")
        with dg.DagsterInstance.get() as instance:
            for step in steps:
                with session_scope(engine) as session:
                    plan = plan_step_launch(
                        session, pipeline_name=args.name, step_name=step, sub_group_keys=args.sub_groups
                    )
                left = ", ".join(f"{n} {state}" for state, n in plan.left_out.items())
                if not plan.plans:
                    print(f"{args.name}/{step}: nothing to run" + (f" ({left})" if left else ""))
                    continue
                runs = launch_step(
                    plan, instance=instance, launcher=launcher, settings=settings, trigger=MANUAL_TRIGGER
                )
                print(
                    f"{args.name}/{step}: launched {len(runs)} run(s) for {len(plan.plans)} sub-group(s)"
                    + (f"; not run: {left}" if left else "")
                )
                for run in runs:
                    more = " …" if len(run.sub_group_keys) > 3 else ""
                    print(f"  run {run.run_id} [{', '.join(run.sub_group_keys[:3])}{more}]")
                if args.no_wait:
                    continue
                run_ids = [r.run_id for r in runs]

                def progress(statuses: dict[str, str], step: str = step, run_ids: list[str] = run_ids) -> None:
                    with session_scope(engine) as session:
                        counts = attempt_counts(session, pipeline_name=args.name, dagster_run_ids=run_ids)
                    runs_text = ", ".join(f"{n} {s.lower()}" for s, n in _tally(statuses.values()).items())
                    attempts = ", ".join(f"{n} {s}" for s, n in counts.items()) or "none yet"
                    print(f"  {step}: runs {runs_text}; attempts {attempts}", flush=True)

                final = wait_for_runs(instance, run_ids, progress=progress)
                if any(status != "SUCCESS" for status in final.values()):
                    failed = True
                    print(f"{args.name}/{step}: not every run succeeded; later steps are not started", file=sys.stderr)
                    break
    except CcatError as error:
        print(f"ccat-dagster: error: {error}", file=sys.stderr)
        return EXIT_REJECTED
    finally:
        engine.dispose()
    return EXIT_REJECTED if failed else EXIT_OK


def _tally(values) -> dict[str, int]:  # type: ignore[no-untyped-def]
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items()))
