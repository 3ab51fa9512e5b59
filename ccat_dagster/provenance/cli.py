"""``ccat-dagster lineage | impact | invalidate | retention``: provenance and retention from the command line.

- ``lineage PRODUCT_ID``: what a product derives from, as a tree down to the raw data packages when the
  lineage has at most ``TREE_MAX_ATTEMPTS`` attempts, else summarized per step with the first scans
  (``--tree`` / ``--summary`` force either; ``--files``: the tree with each package's files;
  ``--packages-only``: only the scans; ``--prov-json``: a W3C PROV-JSON document, validated against the
  PROV-JSON schema before it is written).
- ``impact PACKAGE`` (id or name) or ``impact --product ID``: what derives from it and which sub-groups would
  have to be redone.
- ``invalidate PACKAGE --reason TEXT [--dry-run]``: mark a raw package bad (see ``provenance.invalidate``).
- ``retention run [--dry-run] [--retention-days N]``: the retention cleanup (see ``provenance.cleanup``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ccat_dagster.errors import CcatError

if TYPE_CHECKING:
    from ccat_dagster.settings import Settings


# Above this many attempts ``lineage`` prints the per-step summary instead of the attempt-by-attempt tree:
# a tree of 20,000 attempts is neither readable nor quick to load (docs/benchmarks.md, Provenance).
TREE_MAX_ATTEMPTS = 200
SUMMARY_PACKAGES = 50
# ``lineage --json`` lists the packages too; a lineage of more scans says so with ``packages_complete: false``.
JSON_MAX_PACKAGES = 100_000


class ProvenanceCliError(CcatError, ValueError):
    """An option combination of the provenance commands that cannot be used."""


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    lineage = commands.add_parser(
        "lineage",
        help="what a data product derives from, down to the raw data packages (tree or W3C PROV-JSON)",
        description="Print the ancestors of a data product: the attempts that produced it and its upstream "
        "products (with software versions and configs), down to the raw data packages and their files.",
    )
    lineage.add_argument("product_id", type=int, metavar="PRODUCT_ID", help="the DataProduct id")
    output = lineage.add_mutually_exclusive_group()
    output.add_argument(
        "--prov-json",
        action="store_true",
        help="write W3C PROV-JSON (IVOA ProvDM naming), validated against the PROV-JSON schema",
    )
    output.add_argument(
        "--json",
        action="store_true",
        help="the per-step summary with every raw data package as JSON (for scripts)",
    )
    output.add_argument("--packages-only", action="store_true", help="list only the raw data packages (scans)")
    output.add_argument(
        "--tree",
        action="store_true",
        help=f"print the attempt-by-attempt tree even for lineages of more than {TREE_MAX_ATTEMPTS} attempts",
    )
    output.add_argument(
        "--summary",
        action="store_true",
        help=f"print the per-step summary (the default above {TREE_MAX_ATTEMPTS} attempts)",
    )
    lineage.add_argument("--files", action="store_true", help="list the raw files of each package in the tree")
    lineage.add_argument("--output", "-o", type=Path, metavar="FILE", help="write to FILE instead of stdout")
    lineage.add_argument(
        "--namespace",
        metavar="URI",
        help="URI of the ccat: prefix in PROV-JSON identifiers (default urn:ccat:ops-db:)",
    )
    lineage.add_argument(
        "--no-derivations",
        action="store_true",
        help="PROV-JSON without wasDerivedFrom (smaller for huge graphs)",
    )
    lineage.set_defaults(handler=_lineage)

    impact = commands.add_parser(
        "impact",
        help="what derives from a raw data package (or product): products and sub-groups to redo",
    )
    impact.add_argument("package", nargs="?", metavar="PACKAGE", help="RawDataPackage id or name")
    impact.add_argument("--product", type=int, metavar="PRODUCT_ID", help="the impact of a data product instead")
    impact.add_argument("--json", action="store_true", help="machine-readable output")
    impact.set_defaults(handler=_impact)

    invalidate = commands.add_parser(
        "invalidate",
        help="mark a raw data package bad: mark derived products, re-run the affected sub-groups without it",
        description="Set the package's invalidated_reason (it leaves every sub-group), mark the current "
        "products derived from it, retire the sub-groups left without members; the other affected sub-groups "
        "re-run as their pipeline's trigger decides (CONTINUOUS: next sensor tick; CRON: next cron tick; "
        "MANUAL: by hand). One ops-db transaction.",
    )
    invalidate.add_argument("package", metavar="PACKAGE", help="RawDataPackage id or name")
    invalidate.add_argument("--reason", required=True, help="why the package is bad (stored in ops-db)")
    invalidate.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    invalidate.set_defaults(handler=_invalidate)

    retention = commands.add_parser("retention", help="retention of intermediate products")
    retention_sub = retention.add_subparsers(dest="retention_command", required=True, metavar="COMMAND")
    run = retention_sub.add_parser(
        "run",
        help="mark deletable intermediates, then delete the files of deletion_possible copies",
        description="Superseded intermediates, and intermediates whose consumers all completed more than "
        "RETENTION_DAYS ago, become deletion_possible; the files of deletion_possible intermediate copies "
        "under the processing location or PIPELINE_BASE_DIR are deleted. Final products are never deleted.",
    )
    run.add_argument("--dry-run", action="store_true", help="list what would be marked and deleted; change nothing")
    run.add_argument(
        "--retention-days",
        type=float,
        metavar="DAYS",
        help="override CCAT_WORKFLOW_MANAGER_RETENTION_DAYS for this run",
    )
    run.set_defaults(handler=_retention_run)


# ---------------------------------------------------------------------------------------------- handlers


def _emit(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    output.write_text(text if text.endswith("\n") else text + "\n")
    print(f"written to {output}", file=sys.stderr)


def _lineage(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.opsdb.engine import make_engine, session_scope
    from ccat_dagster.opsdb.lineage import ancestor_package_ids, ancestors, lineage_summary, load_packages
    from ccat_dagster.provenance.prov import DEFAULT_CCAT_NS, dumps, lineage_to_prov_json, validate_prov_json
    from ccat_dagster.provenance.report import (
        lineage_summary_as_json,
        render_lineage,
        render_lineage_summary,
        render_packages,
    )

    if (args.namespace or args.no_derivations) and not args.prov_json:
        raise ProvenanceCliError("--namespace and --no-derivations apply to --prov-json only")
    if args.files and args.summary:
        raise ProvenanceCliError("--files lists files in the tree: use it without --summary")
    engine = make_engine(settings.ops_db_url)
    try:
        with session_scope(engine) as session:
            if args.packages_only:
                packages = load_packages(session, ancestor_package_ids(session, product_id=args.product_id))
                text = "\n".join(
                    render_packages(packages, title=f"raw data packages (scans) of product #{args.product_id}")
                )
            elif args.json:
                summary = lineage_summary(session, product_id=args.product_id, package_limit=JSON_MAX_PACKAGES)
                text = json.dumps(lineage_summary_as_json(summary), indent=2)
            elif args.prov_json:
                lineage = ancestors(session, product_id=args.product_id, include_files=True)
                document = lineage_to_prov_json(
                    lineage,
                    namespace=args.namespace or DEFAULT_CCAT_NS,
                    include_derivations=not args.no_derivations,
                )
                validate_prov_json(document)
                text = dumps(document)
            else:
                summary = lineage_summary(session, product_id=args.product_id, package_limit=SUMMARY_PACKAGES)
                if args.summary or (summary.attempt_count > TREE_MAX_ATTEMPTS and not (args.tree or args.files)):
                    text = "\n".join(render_lineage_summary(summary))
                else:
                    lineage = ancestors(session, product_id=args.product_id, include_files=args.files)
                    text = "\n".join(render_lineage(lineage, show_files=args.files))
    finally:
        engine.dispose()
    _emit(text, args.output)
    return 0


def _impact(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.opsdb.engine import make_engine, session_scope
    from ccat_dagster.opsdb.lineage import descendants_of_package, descendants_of_product, find_package
    from ccat_dagster.provenance.invalidate import pipeline_next_run_notes
    from ccat_dagster.provenance.report import impact_as_json, render_impact

    if (args.package is None) == (args.product is None):
        raise ProvenanceCliError("give either a raw data package (id or name) or --product PRODUCT_ID")
    engine = make_engine(settings.ops_db_url)
    try:
        with session_scope(engine) as session:
            if args.product is not None:
                impact = descendants_of_product(session, product_id=args.product)
            else:
                impact = descendants_of_package(session, package_id=find_package(session, args.package).id)
            notes = pipeline_next_run_notes(session, {g.pipeline for g in impact.sub_groups})
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(impact_as_json(impact), indent=2))
    else:
        print("\n".join(render_impact(impact, notes)))
    return 0


class _DryRun(Exception):
    """Raised inside the transaction of a dry run so that everything is rolled back."""


def _invalidate(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.opsdb.engine import make_engine, session_scope
    from ccat_dagster.provenance.invalidate import invalidate_package
    from ccat_dagster.provenance.report import render_invalidation

    engine = make_engine(settings.ops_db_url)
    result = None
    try:
        with session_scope(engine) as session:
            result = invalidate_package(session, package=args.package, reason=args.reason)
            if args.dry_run:
                raise _DryRun
    except _DryRun:
        pass
    finally:
        engine.dispose()
    assert result is not None
    print("\n".join(render_invalidation(result, dry_run=args.dry_run)))
    return 0


def _retention_run(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.execution.retention import DeletionAction
    from ccat_dagster.opsdb.engine import make_engine
    from ccat_dagster.provenance.cleanup import run_retention_cleanup
    from ccat_dagster.provenance.report import render_cleanup

    if args.retention_days is not None and args.retention_days < 0:
        raise ProvenanceCliError(f"--retention-days {args.retention_days:g} is invalid: give 0 or more days")
    engine = make_engine(settings.ops_db_url)
    try:
        report = run_retention_cleanup(
            engine,
            pipeline_base_dir=settings.pipeline_base_dir,
            processing_location_id=settings.processing_location_id,
            retention_days=settings.retention_days if args.retention_days is None else args.retention_days,
            dry_run=args.dry_run,
        )
    finally:
        engine.dispose()
    print("\n".join(render_cleanup(report)))
    # Exit 1 when a real run could not delete a file: a scheduler or operator should notice.
    return 1 if not args.dry_run and report.count(DeletionAction.FAILED) else 0
