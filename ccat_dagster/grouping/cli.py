"""``ccat-dagster groupings``: preview the sub-groups of a grouping, list and install presets.

``preview`` runs nothing and changes nothing but the built-in presets (installed when ``--preset`` is used).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccat_dagster.errors import CcatError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from ccat_dagster.grouping.engine import SubGroup
    from ccat_dagster.settings import Settings

DEFAULT_TABLE_ROWS = 100


class GroupingInputError(CcatError, ValueError):
    """A rules file, grouping or option of ``groupings preview`` that cannot be used."""


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    groupings = commands.add_parser("groupings", help="data groupings: preview sub-groups, presets")
    sub = groupings.add_subparsers(dest="groupings_command", required=True, metavar="COMMAND")

    preview = sub.add_parser(
        "preview",
        help="print the sub-groups (package counts and sizes) a grouping resolves to; runs nothing",
        description="Resolve filter rules + group_by against ops-db and print the sub-groups. "
        "Rules come from --rules FILE, a stored grouping (NAME or --grouping NAME) and/or --preset NAME "
        "(their rules are ANDed). group_by comes from --group-by, else the preset, else the rules file, "
        "else [] (one sub-group 'all').",
    )
    preview.add_argument("name", nargs="?", help="a stored DataGrouping name (same as --grouping)")
    source = preview.add_mutually_exclusive_group()
    source.add_argument("--rules", type=Path, metavar="FILE", help="JSON or YAML list of filter rules")
    source.add_argument("--grouping", metavar="NAME", help="a stored DataGrouping (its rules and module scope)")
    preview.add_argument("--preset", metavar="NAME", help="a grouping preset (its group_by and rules)")
    preview.add_argument(
        "--group-by", metavar="DIMS", help="comma-separated dimensions, e.g. source,line ('' for one group)"
    )
    preview.add_argument("--instrument-module-id", type=int, metavar="ID", help="scope to one instrument module")
    preview.add_argument("--include-unarchived", action="store_true", help="also count packages not yet archived")
    preview.add_argument("--json", action="store_true", help="machine-readable output with member package ids")
    preview.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help=f"print at most N sub-groups (default {DEFAULT_TABLE_ROWS}; JSON: all)",
    )
    preview.set_defaults(handler=_preview)

    presets = sub.add_parser("presets", help="list the grouping presets stored in ops-db")
    presets.add_argument("--install", action="store_true", help="install / refresh the built-in presets first")
    presets.add_argument("--json", action="store_true")
    presets.set_defaults(handler=_presets)


# ---------------------------------------------------------------------------------------------- handlers


def _preview(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.grouping.engine import resolve
    from ccat_dagster.grouping.rules import FilterRuleError, parse_rules, rules_to_json, validate_group_by
    from ccat_dagster.opsdb.engine import make_engine, session_scope

    if args.name and (args.grouping or args.rules):
        raise GroupingInputError("give the grouping either as NAME, --grouping NAME or --rules FILE, not several")
    if args.limit is not None and args.limit < 0:
        raise GroupingInputError(f"--limit {args.limit} is invalid: give 0 or more")
    grouping_name = args.name or args.grouping

    raw_rules: list[Any] = []
    group_by: Any = None
    module_id: int | None = args.instrument_module_id
    described: list[str] = []
    # Check the rules file and --group-by together, so one run reports every problem of both.
    problems: list[str] = []
    if args.rules is not None:
        file_rules, file_group_by = _read_rules_file(args.rules)
        raw_rules.extend(file_rules)
        group_by = file_group_by
        described.append(f"rules file {args.rules}")
        try:
            parse_rules(file_rules)
        except FilterRuleError as error:
            problems.extend(f"--rules {args.rules}: {problem}" for problem in error.problems)
    if args.group_by is not None:
        group_by = [part.strip() for part in args.group_by.split(",") if part.strip()]
        try:
            validate_group_by(group_by)
        except FilterRuleError as error:
            problems.extend(f"--group-by {args.group_by!r}: {problem}" for problem in error.problems)
    if problems:
        raise FilterRuleError(problems)

    engine = make_engine(settings.ops_db_url)
    try:
        with session_scope(engine) as session:
            if grouping_name:
                grouping_rules, grouping_module = _stored_grouping(session, grouping_name)
                try:
                    parse_rules(grouping_rules)
                except FilterRuleError as error:
                    raise FilterRuleError(error.problems, context=f"grouping {grouping_name!r}") from None
                raw_rules.extend(grouping_rules)
                if module_id is None:
                    module_id = grouping_module
                described.append(f"grouping {grouping_name}")
            if args.preset:
                from ccat_dagster.grouping.presets import ensure_builtin_presets, get_preset

                ensure_builtin_presets(session)
                preset = get_preset(session, args.preset)
                raw_rules.extend(rules_to_json(preset.filter_rules))
                if args.group_by is None:
                    group_by = list(preset.group_by)
                described.append(f"preset {preset.name}")
            dims = validate_group_by([] if group_by is None else group_by)
            rules = parse_rules(raw_rules)
            sub_groups = resolve(
                session,
                filter_rules=rules,
                group_by=dims,
                instrument_module_id=module_id,
                only_archived=not args.include_unarchived,
            )
    finally:
        engine.dispose()

    summary = {
        "source": ", ".join(described) or "no rules (every package)",
        "filter_rules": rules_to_json(rules),
        "group_by": dims,
        "instrument_module_id": module_id,
        "only_archived": not args.include_unarchived,
    }
    if args.json:
        _print_json(summary, sub_groups, args.limit)
    else:
        _print_table(summary, sub_groups, DEFAULT_TABLE_ROWS if args.limit is None else args.limit)
    return 0


def _presets(args: argparse.Namespace, settings: Settings) -> int:
    from ccat_dagster.grouping.presets import ensure_builtin_presets, list_presets
    from ccat_dagster.grouping.rules import rules_to_json
    from ccat_dagster.opsdb.engine import make_engine, session_scope

    engine = make_engine(settings.ops_db_url)
    try:
        with session_scope(engine) as session:
            written = ensure_builtin_presets(session) if args.install else []
            presets = list_presets(session)
    finally:
        engine.dispose()
    if args.json:
        rows = [
            {
                "name": p.name,
                "description": p.description,
                "group_by": list(p.group_by),
                "filter_rules": rules_to_json(p.filter_rules),
            }
            for p in presets
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if args.install:
        print(f"installed/updated {len(written)} built-in preset(s): {', '.join(written) or '-'}")
    if not presets:
        print("ops-db holds no grouping presets (install the built-in ones with --install)")
    for p in presets:
        rules = f", {len(p.filter_rules)} rule(s)" if p.filter_rules else ""
        print(f"{p.name:<20} group_by [{', '.join(p.group_by)}]{rules}  {p.description}")
    return 0


# ---------------------------------------------------------------------------------------------- helpers


def _read_rules_file(path: Path) -> tuple[list[Any], Any]:
    """Rules from a JSON or YAML file: a list of rules, or a mapping with filter_rules (and group_by)."""
    import yaml

    from ccat_dagster.safe_yaml import YamlLimitError, read_limited_text, safe_load

    origin = f"rules file {path}"
    try:
        text = read_limited_text(path, origin=origin)
        data = json.loads(text) if path.suffix.lower() == ".json" else safe_load(text, origin=origin)
    except YamlLimitError as error:
        raise GroupingInputError(str(error)) from None
    except UnicodeDecodeError:
        raise GroupingInputError(f"cannot read rules file {path}: it is not UTF-8 text") from None
    except OSError as error:
        raise GroupingInputError(f"cannot read rules file {path}: {error.strerror or error}") from None
    except RecursionError:  # json.loads on absurdly nested input
        raise GroupingInputError(f"rules file {path} is nested too deeply to be a list of rules") from None
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise GroupingInputError(f"rules file {path} is not valid {_format_of(path)}: {error}") from None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"filter_rules", "group_by"})
        if "filter_rules" not in data or unknown:
            raise GroupingInputError(
                f"rules file {path} must hold a list of rules, or a mapping with filter_rules (and optional "
                f"group_by); found keys {', '.join(map(str, data)) or '(none)'}"
            )
        return _as_rule_list(path, data["filter_rules"]), data.get("group_by")
    return _as_rule_list(path, data), None


def _as_rule_list(path: Path, rules: Any) -> list[Any]:
    if rules is None:
        return []
    if not isinstance(rules, list):
        raise GroupingInputError(f"rules file {path}: filter_rules must be a list of rules, got {type(rules).__name__}")
    return rules


def _format_of(path: Path) -> str:
    return "JSON" if path.suffix.lower() == ".json" else "YAML"


def _stored_grouping(session: Session, name: str) -> tuple[list[Any], int | None]:
    from sqlalchemy import select

    from ccat_dagster.opsdb.models import DataGrouping

    row = session.scalars(select(DataGrouping).where(DataGrouping.name == name)).one_or_none()
    if row is None:
        names = list(session.scalars(select(DataGrouping.name).order_by(DataGrouping.name).limit(21)))
        listing = ", ".join(names[:20]) + (", …" if len(names) > 20 else "") if names else "(none stored)"
        raise GroupingInputError(f"no data grouping {name!r} in ops-db; stored groupings: {listing}")
    return list(row.filter_rules or []), row.instrument_module_id


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _print_table(summary: dict[str, Any], sub_groups: list[SubGroup], limit: int) -> None:
    total_packages = sum(g.package_count for g in sub_groups)
    total_bytes = sum(g.total_bytes for g in sub_groups)
    scope = f"instrument module {summary['instrument_module_id']}" if summary["instrument_module_id"] else ""
    states = "archived packages only" if summary["only_archived"] else "packages in every state"
    print(
        f"{summary['source']}; {len(summary['filter_rules'])} rule(s); "
        f"group_by [{', '.join(summary['group_by'])}]; {states}{'; ' + scope if scope else ''}"
    )
    shown = sub_groups[:limit]
    width = max([len("SUB-GROUP KEY"), *(len(g.key) for g in shown)])
    print(f"{'SUB-GROUP KEY':<{width}}  {'PACKAGES':>8}  {'SIZE':>10}")
    for group in shown:
        print(f"{group.key:<{width}}  {group.package_count:>8}  {_human_bytes(group.total_bytes):>10}")
    if len(sub_groups) > len(shown):
        print(f"… {len(sub_groups) - len(shown)} more sub-group(s) not shown (use --limit)")
    print(f"{len(sub_groups)} sub-group(s), {total_packages} package(s), {_human_bytes(total_bytes)}")


def _print_json(summary: dict[str, Any], sub_groups: list[SubGroup], limit: int | None) -> None:
    shown = sub_groups if limit is None else sub_groups[:limit]
    document = {
        **summary,
        "sub_group_count": len(sub_groups),
        "package_count": sum(g.package_count for g in sub_groups),
        "total_bytes": sum(g.total_bytes for g in sub_groups),
        "truncated": len(shown) < len(sub_groups),
        "sub_groups": [
            {
                "key": g.key,
                "dimensions": [{"dimension": d, "value": v} for d, v in g.dimensions],
                "package_count": g.package_count,
                "total_bytes": g.total_bytes,
                "package_ids": list(g.package_ids),
            }
            for g in shown
        ],
    }
    print(json.dumps(document, indent=2, ensure_ascii=False))
