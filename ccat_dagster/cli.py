"""The ``ccat-dagster`` command line: ops-db migrations, demo data, groupings, pipelines, lineage, health."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ccat_dagster.errors import CcatError
from ccat_dagster.settings import Settings, SettingsError

Handler = Callable[[argparse.Namespace, Settings], int]


def _db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.opsdb.migrate import current_revision, upgrade

    upgrade(settings.ops_db_url)
    print(f"ops-db at {settings.redacted_ops_db_url} is at revision {current_revision(settings.ops_db_url)}")
    return 0


def _db_current(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.opsdb.migrate import current_revision, head_revision

    current = current_revision(settings.ops_db_url)
    print(f"current: {current or '(empty database)'}  head: {head_revision()}")
    return 0 if current == head_revision() else 1


def _demo_seed(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.demo.seed import seed_demo
    from ccat_dagster.opsdb.engine import make_engine, session_scope

    engine = make_engine(settings.ops_db_url)
    with session_scope(engine) as session:
        summary = seed_demo(session, data_dir=settings.data_dir, scans=args.scans, seed=args.seed)
    engine.dispose()
    if summary.already_seeded:
        print("ops-db already holds the demo observatory; nothing changed")
    print(
        f"demo observatory: {summary.scans} scans, {summary.packages} raw data packages "
        f"({', '.join(f'{n} {s}' for s, n in summary.packages_by_state.items())}), "
        f"{summary.raw_files} raw files in {summary.archive_dir}"
    )
    return 0


def _demo_archive(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.demo.seed import archive_waiting_packages
    from ccat_dagster.opsdb.engine import make_engine, session_scope

    engine = make_engine(settings.ops_db_url)
    with session_scope(engine) as session:
        names = archive_waiting_packages(session, limit=args.limit)
    engine.dispose()
    print(f"archived {len(names)} package(s): {', '.join(names) or '-'}")
    return 0


def _demo_run(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.demo.run import run_demo

    return run_demo(settings, example=args.pipeline.resolve())


def _settings_show(args: argparse.Namespace, settings: Settings) -> int:
    env = settings.as_environment()
    env["CCAT_OPS_DB_URL"] = settings.redacted_ops_db_url
    if args.json:
        print(json.dumps(env, indent=2, sort_keys=True))
    else:
        for name, value in sorted(env.items()):
            print(f"{name}={value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccat-dagster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = commands.add_parser("db", help="ops-db schema").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="migrate ops-db to the newest schema (safe to repeat)").set_defaults(
        handler=_db_upgrade
    )
    db.add_parser("current", help="show the schema revision; exit 1 unless at head").set_defaults(handler=_db_current)

    demo = commands.add_parser("demo", help="the demo observatory").add_subparsers(dest="demo_command", required=True)
    seed = demo.add_parser("seed", help="create the synthetic observatory and its raw data files")
    seed.add_argument("--scans", type=int, default=20, help="number of executed obs units (default 20)")
    seed.add_argument("--seed", type=int, default=253, help="random seed (default 253)")
    seed.set_defaults(handler=_demo_seed)
    archive = demo.add_parser("archive", help="play data-transfer: archive waiting/transferring packages")
    archive.add_argument("--limit", type=int, default=None)
    archive.set_defaults(handler=_demo_archive)
    run = demo.add_parser("run", help="apply the CHAI example and let its sensor run it end to end")
    run.add_argument(
        "--pipeline",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "examples" / "pipelines" / "chai_ngc253_co43.yaml",
        help="pipeline YAML to apply and run (default: the CHAI NGC253 CO(4-3) example)",
    )
    run.set_defaults(handler=_demo_run)

    settings_cmd = commands.add_parser("settings", help="show the effective settings (secrets redacted)")
    settings_cmd.add_argument("--json", action="store_true")
    settings_cmd.set_defaults(handler=_settings_show)

    for register in _EXTRA_COMMANDS:
        register(commands)
    return parser


# Feature modules add their sub-commands here (see the ``register`` functions they export).
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []
_EXTRA_COMMANDS.append(lambda c: __import__("ccat_dagster.grouping.cli", fromlist=["_"]).register(c))
_EXTRA_COMMANDS.append(lambda c: __import__("ccat_dagster.pipelines.cli", fromlist=["_"]).register(c))
_EXTRA_COMMANDS.append(lambda c: __import__("ccat_dagster.provenance.cli", fromlist=["_"]).register(c))
_EXTRA_COMMANDS.append(lambda c: __import__("ccat_dagster.doctor", fromlist=["_"]).register(c))
_EXTRA_COMMANDS.append(lambda c: __import__("ccat_dagster.execution.cli", fromlist=["_"]).register(c))
_EXTRA_COMMANDS.append(lambda c: __import__("ccat_dagster.provenance.reproduce", fromlist=["_"]).register(c))
_EXTRA_COMMANDS.append(lambda c: __import__("ccat_dagster.api.cli", fromlist=["_"]).register(c))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        return args.handler(args, settings)
    except (SettingsError, CcatError) as error:
        print(f"ccat-dagster: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
