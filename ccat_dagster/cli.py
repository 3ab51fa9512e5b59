"""The ``ccat-dagster`` command line: ops-db migrations, demo data, groupings, pipelines, lineage, health.

Exit codes: 0 ok, 1 checked and found a problem, 2 bad input, 3 environment or connection, 130 interrupted,
141 closed pipe (``ccat_dagster.cli_errors``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from ccat_dagster import cli_errors
from ccat_dagster.settings import Settings, unknown_variables

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
    from ccat_dagster.demo.console import progress_bar
    from ccat_dagster.demo.seed import seed_demo
    from ccat_dagster.opsdb.engine import make_engine, session_scope

    engine = make_engine(settings.ops_db_url)
    with session_scope(engine) as session, progress_bar("seeding scans", args.scans) as update:
        summary = seed_demo(session, data_dir=settings.data_dir, scans=args.scans, seed=args.seed, progress=update)
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
    from ccat_dagster.demo.console import progress_bar
    from ccat_dagster.demo.examples import example_pipeline
    from ccat_dagster.demo.run import run_demo

    return run_demo(settings, example=example_pipeline(args.pipeline), progress=progress_bar)


def _settings_show(args: argparse.Namespace, settings: Settings) -> int:
    env = settings.as_environment()
    env["CCAT_OPS_DB_URL"] = settings.redacted_ops_db_url
    if args.json:
        print(json.dumps(env, indent=2, sort_keys=True))
    else:
        for name, value in sorted(env.items()):
            print(f"{name}={value}")
    return 0


def _code_server(args: argparse.Namespace, settings: Settings) -> int:
    # main() has read the settings: an invalid one has ended the command already, before any server started.
    argv = code_server_argv(
        host=args.host, port=args.port, location_name=args.location_name, log_format=args.log_format
    )
    sys.stdout.flush()
    os.execv(argv[0], argv)
    return 0  # not reached: execv replaces the process


def code_server_argv(*, host: str, port: int, location_name: str, log_format: str) -> list[str]:
    """Dagster's code server for this code location, run by the Python of this environment."""
    return [
        sys.executable,
        "-m",
        "dagster",
        "code-server",
        "start",
        "--module-name",
        "ccat_dagster.definitions",
        "--attribute",
        "defs",
        "--location-name",
        location_name,
        "--host",
        host,
        "--port",
        str(port),
        "--log-format",
        log_format,
    ]


def _tcp_port(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a TCP port: give a whole number from 1 to 65535")
    return int(raw)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"ccat-dagster {of('ccat-dagster')} (dagster {of('dagster')}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccat-dagster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
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
        default=None,
        metavar="YAML",
        help="pipeline YAML file, or the name of a bundled example, to apply and run "
        "(default: the bundled CHAI NGC253 CO(4-3) example)",
    )
    run.set_defaults(handler=_demo_run)

    settings_cmd = commands.add_parser("settings", help="show the effective settings (secrets redacted)")
    settings_cmd.add_argument("--json", action="store_true")
    settings_cmd.set_defaults(handler=_settings_show)

    code_server = commands.add_parser(
        "code-server",
        help="check the settings, then run Dagster's code server for this code location (exits 2 on a bad setting)",
    )
    code_server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    code_server.add_argument("--port", type=_tcp_port, default=4000, help="gRPC port (default 4000)")
    code_server.add_argument(
        "--location-name", default="ccat_dagster", help="code location name (default ccat_dagster)"
    )
    code_server.add_argument("--log-format", choices=("colored", "json", "rich"), default="colored")
    code_server.set_defaults(handler=_code_server)

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
_EXTRA_COMMANDS.append(lambda c: __import__("ccat_dagster.provenance.products", fromlist=["_"]).register(c))
_EXTRA_COMMANDS.append(lambda c: __import__("ccat_dagster.api.cli", fromlist=["_"]).register(c))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every expected failure ends as one line on stderr and an exit code (cli_errors)."""
    ops_db = "(not configured)"
    try:
        for name, close in unknown_variables():
            cli_errors.print_warning(
                f"{name} is not a ccat-dagster setting and is ignored"
                + (f": did you mean {close}?" if close else " (`ccat-dagster settings` lists them)")
            )
        args = build_parser().parse_args(argv)
        settings = Settings.from_env()
        ops_db = settings.redacted_ops_db_url
        code = args.handler(args, settings)
        # Flushed here, not at exit, so that a reader that went away is handled below like any other write.
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        cli_errors.print_interrupted()
        return cli_errors.EXIT_INTERRUPTED
    except BrokenPipeError:
        cli_errors.silence_stdout()
        return cli_errors.EXIT_CLOSED_PIPE
    except Exception as error:
        described = cli_errors.describe_failure(error, ops_db=ops_db)
        if described is None:
            raise
        code, message = described
        cli_errors.print_error(message)
        return code


if __name__ == "__main__":
    sys.exit(main())
