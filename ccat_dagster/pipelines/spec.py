"""Pipeline specs: one YAML file per pipeline, read into frozen dataclasses and checked before ops-db sees it.

Checks run in three passes, each reporting every problem it finds: (1) the YAML itself (syntax, duplicate
keys, values JSON can hold), (2) ``schema.json`` (keys, types, ranges), (3) meaning (unique step names, known
dependencies, no cycles, cron and time zone, filter rules and group_by through the filter engine, fan-in
granularity, software versions consistent within the file, local image paths). A problem names the file, the
line, the YAML path (``steps[1].resources.memory_gb``), the bad value and what is expected.

Nothing here touches ops-db: presets, locations and instrument modules are resolved by ``apply``.
"""

from __future__ import annotations

import calendar
import difflib
import hashlib
import json
import math
import re
import zoneinfo
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema.exceptions import ValidationError, best_match

from ccat_dagster.errors import CcatError
from ccat_dagster.execution.hpc.base import JobResources
from ccat_dagster.execution.qa import QaThreshold, thresholds_from_dict, thresholds_to_dict
from ccat_dagster.grouping.rules import FilterRuleError, parse_rules, rules_to_json, validate_group_by
from ccat_dagster.opsdb.enums import TriggerType, VersionPolicy
from ccat_dagster.safe_yaml import BoundedSafeLoader, YamlLimitError, read_limited_text

__all__ = [
    "DETERMINED_DIMENSIONS",
    "GroupingSpec",
    "PipelineSpec",
    "PipelineSpecError",
    "ResourceSpec",
    "SoftwareSpec",
    "StepSpec",
    "TriggerSpec",
    "canonical_json",
    "cron_problem",
    "fan_in_problems",
    "is_coarser_or_equal",
    "load_pipeline_spec",
    "load_schema",
    "parse_pipeline_spec",
    "parse_semver",
    "sha256_of",
    "spec_sha256",
    "spec_to_dict",
]

SCHEMA_PATH = Path(__file__).with_name("schema.json")
IDENTIFIER = re.compile(r"[a-z][a-z0-9_]{0,62}")
URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)

# A sub-group of the key dimension holds packages that all share one value of each listed dimension: every
# package of one scan belongs to one ObsUnit and one night; an ObsUnit has one source, program and line; a
# module belongs to one instrument. (A scan can span several modules: a scan does not determine the module.)
DETERMINED_DIMENSIONS: Mapping[str, frozenset[str]] = {
    "executed_obs_unit": frozenset({"obs_unit", "obs_date", "scan"}),
    # The same scan under its readable name: each determines the other.
    "scan": frozenset({"executed_obs_unit", "obs_unit", "obs_date"}),
    "obs_unit": frozenset({"source", "observing_program", "line"}),
    "instrument_module": frozenset({"instrument"}),
}


class PipelineSpecError(CcatError, ValueError):
    """A pipeline file that cannot be used; ``problems`` holds one line per problem, naming file and line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class TriggerSpec:
    type: TriggerType = TriggerType.MANUAL
    cron: str | None = None
    timezone: str | None = None

    def to_config(self) -> dict[str, Any]:
        """``Pipeline.trigger_config``: ``{"cron": ..., "timezone": ...}`` for cron, else ``{}``."""
        if self.type is TriggerType.CRON:
            return {"cron": self.cron, "timezone": self.timezone or "UTC"}
        return {}


@dataclass(frozen=True)
class SoftwareSpec:
    name: str
    version: str
    image_ref: str
    entrypoint: tuple[str, ...]
    version_policy: VersionPolicy = VersionPolicy.EXACT
    image_digest: str | None = None


@dataclass(frozen=True)
class ResourceSpec:
    """A step's ``resources:``; a key left out takes ``JobResources``' default (defaults are written once)."""

    cpu: int = JobResources.cpu
    memory_gb: float = JobResources.memory_gb
    time_hours: float = JobResources.time_hours
    gpus: int = JobResources.gpus

    def to_dict(self) -> dict[str, Any]:
        """``ReductionStep.resources`` as HpcBackend.submit expects it."""
        return {
            "cpu": self.cpu,
            "memory_gb": self.memory_gb,
            "time_hours": self.time_hours,
            "gpus": self.gpus,
        }


@dataclass(frozen=True)
class GroupingSpec:
    name: str
    description: str = ""
    preset: str | None = None
    instrument_module: str | None = None
    # Validated and normalised by the filter engine (``rules_to_json(parse_rules(...))``).
    rules: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class StepSpec:
    """One step. Exactly one of ``group_by`` (dimension names) and ``group_by_preset`` is set."""

    name: str
    software: SoftwareSpec
    group_by: tuple[str, ...] | None
    group_by_preset: str | None = None
    description: str = ""
    depends_on: tuple[str, ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)
    cooldown_seconds: int = 0
    resources: ResourceSpec = ResourceSpec()
    max_retries: int = 0
    # What retention may do with the step's intermediates: auto, keep or recreate (opsdb.enums.StepRetention).
    retention: str = "auto"
    # How the sub-groups reach the cluster: auto, packed or job_per_sub_group (execution.step.ExecutionMode).
    execution_mode: str = "auto"
    # Thresholds on the QA metrics of a final step's qa/*.json (execution.qa), checked as Dagster asset checks.
    qa_checks: tuple[QaThreshold, ...] = ()


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    processing_location: str | int
    grouping: GroupingSpec
    steps: tuple[StepSpec, ...]
    description: str = ""
    trigger: TriggerSpec = TriggerSpec()
    enabled: bool = True
    priority: int = 0
    # Where the spec was read from: for messages only, never part of the spec's identity.
    source_path: Path | None = field(default=None, compare=False)

    def step(self, name: str) -> StepSpec:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)


# ------------------------------------------------------------------------------------------------ loading


def load_pipeline_spec(path: str | Path) -> PipelineSpec:
    """Read, check and return the pipeline in the YAML file ``path``; PipelineSpecError lists all problems.

    Relative ``image_ref`` paths are resolved against the file's directory here and kept absolute.
    """
    path = Path(path)
    origin = str(path)
    try:
        text = read_limited_text(path, origin=origin)
    except YamlLimitError as error:
        raise PipelineSpecError([str(error)]) from None
    except FileNotFoundError:
        raise PipelineSpecError([f"{origin}: no such file: give the path of a pipeline YAML file"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise PipelineSpecError([f"{origin}: cannot read the file ({error}): give a UTF-8 text file"]) from None
    node, data = _load_yaml(text, origin)
    locator = _Locator(origin, node)
    return _parse(data, locator=locator, base_dir=path.resolve().parent, source_path=path)


def parse_pipeline_spec(data: Any, *, origin: str = "<pipeline spec>", base_dir: Path | None = None) -> PipelineSpec:
    """Check already-parsed YAML/JSON data (e.g. from a test or an API) like ``load_pipeline_spec`` does.

    Without ``base_dir`` a relative image_ref path is a problem, since there is nothing to resolve it against.
    """
    return _parse(data, locator=_Locator(origin, None), base_dir=base_dir, source_path=None)


def _parse(data: Any, *, locator: _Locator, base_dir: Path | None, source_path: Path | None) -> PipelineSpec:
    problems = _Problems(locator)
    _check_json_compatible(data, [], problems)
    problems.raise_if_any()
    if not isinstance(data, Mapping):
        problems.add(
            [],
            f"the file holds {_show(data)}: expected a mapping with the keys pipeline, "
            "processing_location, grouping and steps (see docs/pipeline-yaml.md)",
        )
        problems.raise_if_any()
    for error in _validator().iter_errors(data):
        problems.add(*_describe_schema_error(error))
    problems.raise_if_any()
    spec = _build(data, problems, base_dir=base_dir, source_path=source_path)
    problems.raise_if_any()
    return spec


class _SpecLoader(BoundedSafeLoader):
    """Safe YAML within the input limits that rejects duplicate keys and keeps dates as text (a config value must
    survive JSON)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        seen: dict[Any, yaml.Node] = {}
        for key_node, _value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # unhashable key: SafeLoader reports it below
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"key {key!r} appears twice (first on line {first.start_mark.line + 1}): keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _load_yaml(text: str, origin: str) -> tuple[yaml.Node | None, Any]:
    try:
        loader = _SpecLoader(text, origin=origin)
    except YamlLimitError as error:
        raise PipelineSpecError([str(error)]) from None
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except YamlLimitError as error:
        raise PipelineSpecError([str(error)]) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}" if mark is not None else origin
        problem = getattr(error, "problem", None) or str(error)
        context = getattr(error, "context", None)
        detail = f"{context}: {problem}" if context else problem
        raise PipelineSpecError([f"{where}: invalid YAML: {detail}"]) from None
    finally:
        loader.dispose()
    return node, data


# ------------------------------------------------------------------------------------------------ problems

PathItem = str | int


def format_path(path: Sequence[PathItem]) -> str:
    """``["steps", 1, "resources", "memory_gb"]`` → ``steps[1].resources.memory_gb``."""
    text = ""
    for item in path:
        if isinstance(item, int):
            text += f"[{item}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", item):
            text += f".{item}" if text else item
        else:
            text += f"[{json.dumps(item, ensure_ascii=False)}]"
    return text or "(top level)"


class _Locator:
    """Finds the line of a YAML path in the composed node tree, so messages point into the file."""

    def __init__(self, origin: str, root: yaml.Node | None) -> None:
        self.origin = origin
        self.root = root

    def line(self, path: Sequence[PathItem]) -> int | None:
        node = self.root
        if node is None:
            return None
        for item in path:
            child = None
            if isinstance(node, yaml.MappingNode) and isinstance(item, str):
                for key_node, value_node in node.value:
                    if isinstance(key_node, yaml.ScalarNode) and key_node.value == item:
                        child = value_node
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(item, int) and 0 <= item < len(node.value):
                child = node.value[item]
            if child is None:
                break
            node = child
        return node.start_mark.line + 1

    def where(self, path: Sequence[PathItem]) -> str:
        line = self.line(path)
        return f"{self.origin}:{line}" if line is not None else self.origin


class _Problems:
    def __init__(self, locator: _Locator) -> None:
        self.locator = locator
        self.items: list[tuple[int, str]] = []

    def add(self, path: Sequence[PathItem], message: str) -> None:
        line = self.locator.line(path) or 0
        self.items.append((line, f"{self.locator.where(path)}: {format_path(path)}: {message}"))

    def raise_if_any(self) -> None:
        if self.items:
            ordered = sorted(self.items, key=lambda item: item[0])
            raise PipelineSpecError(list(dict.fromkeys(message for _line, message in ordered)))


def _show(value: Any, limit: int = 120) -> str:
    """A value as the user wrote it, roughly (JSON spelling: null, true, "text")."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except ValueError:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_json_compatible(value: Any, path: list[PathItem], problems: _Problems) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                problems.add(path, f"key {_show(key)} is a {type(key).__name__}: keys must be text (quote it)")
                continue
            _check_json_compatible(item, [*path, key], problems)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_compatible(item, [*path, index], problems)
    elif isinstance(value, float) and not math.isfinite(value):
        problems.add(path, f"{value} is not a finite number: JSON cannot store it")
    elif not (value is None or isinstance(value, str | bool | int | float)):
        problems.add(
            path,
            f"a {type(value).__name__} value cannot be stored as JSON: use text, numbers, lists and mappings",
        )


@cache
def load_schema() -> dict[str, Any]:
    """The JSON Schema of a pipeline file (``ccat_dagster/pipelines/schema.json``)."""
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _describe_schema_error(error: ValidationError) -> tuple[list[PathItem], str]:
    path: list[PathItem] = list(error.absolute_path)
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    expected = schema.get("x-expected")
    value = error.instance
    kind = error.validator
    if kind in ("anyOf", "oneOf"):
        # A problem inside the value (e.g. group_by: {preset: 3}) says more than "none of the forms matched".
        deeper = [sub for sub in error.context or () if len(sub.absolute_path) > len(error.absolute_path)]
        if deeper:
            return _describe_schema_error(best_match(deeper))
        return path, f"{_show(value)} is invalid: expected {expected or 'another form'}"
    if kind == "required":
        missing = [key for key in error.validator_value if key not in value]
        key = missing[0] if missing else "?"
        hint = schema.get("properties", {}).get(key, {}).get("x-expected") or _ref_expected(schema, key)
        return path, f"missing required key {key!r}" + (f": expected {hint}" if hint else "")
    if kind == "additionalProperties":
        allowed = list(schema.get("properties", {}))
        unknown = [key for key in value if key not in allowed]
        key = unknown[0] if unknown else "?"
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        suggestion = f" (did you mean {close[0]!r}?)" if close else ""
        return [*path, key], f"unknown key {key!r}{suggestion}: allowed keys here are {', '.join(allowed)}"
    if kind == "enum":
        return (
            path,
            f"{_show(value)} is invalid: expected one of {', '.join(map(str, error.validator_value))}",
        )
    if kind == "uniqueItems":
        return path, f"{_show(value)} lists an item twice: expected {expected or 'each item once'}"
    if kind == "type" and expected is None:
        wanted = error.validator_value
        wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
        return path, f"{_show(value)} is invalid: expected a value of type {wanted}"
    if expected is not None:
        return path, f"{_show(value)} is invalid: expected {expected}"
    return path, f"{_show(value)} is invalid: {error.message}"


def _ref_expected(schema: Mapping[str, Any], key: str) -> str | None:
    ref = schema.get("properties", {}).get(key, {}).get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/$defs/"):
        return None
    definition = load_schema()["$defs"].get(ref.removeprefix("#/$defs/"), {})
    return definition.get("x-expected")


# ----------------------------------------------------------------------------------------- building + meaning


def _build(
    data: Mapping[str, Any], problems: _Problems, *, base_dir: Path | None, source_path: Path | None
) -> PipelineSpec:
    trigger_data = data.get("trigger", {"type": "manual"})
    trigger = TriggerSpec(
        type=TriggerType(trigger_data["type"]),
        cron=trigger_data.get("cron"),
        timezone=trigger_data.get("timezone", "UTC") if trigger_data["type"] == "cron" else None,
    )
    if trigger.cron is not None:
        reason = cron_problem(trigger.cron)
        if reason:
            problems.add(["trigger", "cron"], f"{_show(trigger.cron)} is not a valid cron expression: {reason}")
    if trigger.timezone is not None and not _is_timezone(trigger.timezone):
        problems.add(
            ["trigger", "timezone"],
            f"{_show(trigger.timezone)} is not a known time zone: expected an IANA name such as UTC, "
            "Europe/Berlin or America/Santiago",
        )

    grouping = _build_grouping(data["grouping"], problems)
    steps = tuple(_build_step(index, raw, problems, base_dir=base_dir) for index, raw in enumerate(data["steps"]))
    _check_steps(steps, problems)
    return PipelineSpec(
        name=data["pipeline"],
        description=data.get("description", ""),
        processing_location=data["processing_location"],
        trigger=trigger,
        enabled=data.get("enabled", True),
        priority=int(data.get("priority", 0)),
        grouping=grouping,
        steps=steps,
        source_path=source_path,
    )


def _build_grouping(data: Mapping[str, Any], problems: _Problems) -> GroupingSpec:
    rules: tuple[Mapping[str, Any], ...] = ()
    try:
        rules = tuple(rules_to_json(parse_rules(data.get("rules", []))))
    except FilterRuleError as error:
        for problem in error.problems:
            index = re.match(r"filter_rules\[(\d+)\] ", problem)
            path: list[PathItem] = ["grouping", "rules"] + ([int(index.group(1))] if index else [])
            problems.add(path, problem[index.end() :] if index else problem)
    return GroupingSpec(
        name=data["name"],
        description=data.get("description", ""),
        preset=data.get("preset"),
        instrument_module=data.get("instrument_module"),
        rules=rules,
    )


def _build_step(index: int, data: Mapping[str, Any], problems: _Problems, *, base_dir: Path | None) -> StepSpec:
    here: list[PathItem] = ["steps", index]
    software_data = data["software"]
    image_ref = software_data["image_ref"]
    resolved, reason = resolve_image_ref(image_ref, base_dir=base_dir)
    if reason:
        problems.add([*here, "software", "image_ref"], f"{_show(image_ref)} {reason}")
    software = SoftwareSpec(
        name=software_data["name"],
        version=software_data["version"],
        version_policy=VersionPolicy(software_data.get("version_policy", "exact")),
        image_ref=resolved,
        image_digest=software_data.get("image_digest"),
        entrypoint=tuple(software_data["entrypoint"]),
    )

    raw_group_by = data["group_by"]
    group_by: tuple[str, ...] | None = None
    preset: str | None = None
    if isinstance(raw_group_by, Mapping):
        preset = raw_group_by["preset"]
    else:
        try:
            group_by = tuple(validate_group_by(list(raw_group_by)))
        except FilterRuleError as error:
            for problem in error.problems:
                item = re.match(r"group_by\[(\d+)\] ", problem)
                path = [*here, "group_by"] + ([int(item.group(1))] if item else [])
                problems.add(path, problem[item.end() :] if item else problem)
            group_by = None  # skipped by the fan-in check; the spec is rejected anyway

    resources = {**ResourceSpec().to_dict(), **data.get("resources", {})}
    return StepSpec(
        name=data["name"],
        description=data.get("description", ""),
        software=software,
        group_by=group_by,
        group_by_preset=preset,
        depends_on=tuple(data.get("depends_on", ())),
        config=dict(data.get("config", {})),
        cooldown_seconds=int(data.get("cooldown_seconds", 0)),
        resources=ResourceSpec(
            cpu=int(resources["cpu"]),
            memory_gb=resources["memory_gb"],
            time_hours=resources["time_hours"],
            gpus=int(resources["gpus"]),
        ),
        max_retries=int(data.get("max_retries", 0)),
        retention=str(data.get("retention", "auto")),
        execution_mode=str(data.get("execution", {}).get("mode", "auto")),
        qa_checks=thresholds_from_dict(data.get("qa_checks")),
    )


def resolve_image_ref(image_ref: str, *, base_dir: Path | None) -> tuple[str, str | None]:
    """(image_ref as stored, problem or None). URIs and absolute paths stay; relative paths become absolute.

    A relative path must exist (it was written relative to the file being read, so a missing one is a typo);
    an absolute path is not checked, since it may name the HPC cluster's file system.
    """
    if URI.match(image_ref) or Path(image_ref).is_absolute():
        return image_ref, None
    if base_dir is None:
        return (
            image_ref,
            "is a relative path, but the spec was not read from a file: give an absolute path or URI",
        )
    resolved = (base_dir / image_ref).resolve()
    if not resolved.exists():
        return image_ref, (
            f"resolves to {resolved}, which does not exist: relative image paths are read from the YAML "
            "file's directory; fix the path, or give a URI such as docker://… or an absolute path"
        )
    if len(str(resolved)) > 1024:
        return image_ref, f"resolves to a path of {len(str(resolved))} characters: at most 1024 fit in ops-db"
    return str(resolved), None


def _check_steps(steps: Sequence[StepSpec], problems: _Problems) -> None:
    first_index: dict[str, int] = {}
    for index, step in enumerate(steps):
        if step.name in first_index:
            problems.add(
                ["steps", index, "name"],
                f"step name {step.name!r} is used twice (steps[{first_index[step.name]}] and "
                f"steps[{index}]): step names must be unique within a pipeline",
            )
        else:
            first_index[step.name] = index
    known = list(first_index)
    for index, step in enumerate(steps):
        for position, upstream in enumerate(step.depends_on):
            if upstream == step.name:
                problems.add(
                    ["steps", index, "depends_on", position],
                    f"step {step.name!r} depends on itself: remove {upstream!r} from its depends_on",
                )
            elif upstream not in first_index:
                close = difflib.get_close_matches(upstream, known, n=1, cutoff=0.6)
                suggestion = f" (did you mean {close[0]!r}?)" if close else ""
                problems.add(
                    ["steps", index, "depends_on", position],
                    f"{upstream!r} is not a step of this pipeline{suggestion}: steps are {', '.join(known)}",
                )

    graph: dict[str, Sequence[str]] = {}
    for step in steps:
        graph.setdefault(step.name, step.depends_on)
    cycle = find_cycle(graph)
    if cycle:
        index = first_index[cycle[0]]
        problems.add(
            ["steps", index, "depends_on"],
            f"dependency cycle {' → '.join(cycle)}: steps must form a DAG; remove one of these depends_on entries",
        )

    by_software: dict[tuple[str, str], tuple[int, SoftwareSpec]] = {}
    for index, step in enumerate(steps):
        key = (step.software.name, step.software.version)
        if key not in by_software:
            by_software[key] = (index, step.software)
            continue
        first, other = by_software[key]
        fields_differ = [
            name
            for name in ("image_ref", "image_digest", "entrypoint")
            if getattr(other, name) != getattr(step.software, name)
        ]
        if fields_differ:
            problems.add(
                ["steps", index, "software"],
                f"software {key[0]} {key[1]} is also used by steps[{first}] with a different "
                f"{', '.join(fields_differ)}: one version is one image and one entrypoint; register a "
                "separate software name (e.g. chai-baseline) or version for this step",
            )

    upstream_names = {upstream for step in steps for upstream in step.depends_on}
    for index, step in enumerate(steps):
        if step.qa_checks and step.name in upstream_names:
            problems.add(
                ["steps", index, "qa_checks"],
                f"step {step.name!r} is not a final step (other steps depend on it): only a final step writes "
                "qa/*.json reports; move qa_checks to the step whose software writes them",
            )
        for threshold in step.qa_checks:
            if threshold.min is not None and threshold.max is not None and threshold.min > threshold.max:
                problems.add(
                    ["steps", index, "qa_checks", threshold.metric],
                    f"min {threshold.min:g} is above max {threshold.max:g}: no value could pass; swap them",
                )

    # Granularity is only comparable once names identify steps and the graph is a DAG.
    if not cycle and len(first_index) == len(steps):
        for index, problem in fan_in_problems(
            {s.name: s.group_by for s in steps if s.group_by_preset is None},
            {s.name: s.depends_on for s in steps},
            order=[s.name for s in steps],
        ):
            problems.add(["steps", index, "group_by"], problem)


def find_cycle(depends_on: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A dependency cycle as ``[a, b, …, a]`` (a depends on b …), or None. Unknown names are ignored."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for upstream in depends_on.get(name, ()):
            if upstream not in depends_on or upstream == name:
                continue
            if state.get(upstream) == 1:
                return [*path[path.index(upstream) :], upstream]
            if upstream not in state:
                found = visit(upstream)
                if found:
                    return found
        path.pop()
        state[name] = 2
        return None

    for name in depends_on:
        if name not in state:
            found = visit(name)
            if found:
                return found
    return None


def _dimension_closure(dimensions: Iterable[str]) -> set[str]:
    closure = set(dimensions)
    pending = list(closure)
    while pending:
        for implied in DETERMINED_DIMENSIONS.get(pending.pop(), ()):
            if implied not in closure:
                closure.add(implied)
                pending.append(implied)
    return closure


def is_coarser_or_equal(downstream: Sequence[str], upstream: Sequence[str]) -> bool:
    """True when every upstream sub-group falls into exactly one downstream sub-group (fan-in, never fan-out).

    That holds when each downstream dimension is one of the upstream dimensions or determined by them
    (``DETERMINED_DIMENSIONS``): ``[source]`` after ``[executed_obs_unit]`` is fine, ``[executed_obs_unit]``
    after ``[]`` is not.
    """
    return set(downstream) <= _dimension_closure(upstream)


def fan_in_problems(
    group_by: Mapping[str, Sequence[str] | None],
    depends_on: Mapping[str, Sequence[str]],
    *,
    order: Sequence[str],
) -> list[tuple[int, str]]:
    """(step index in ``order``, message) for each step finer than one of its upstream steps.

    Steps missing from ``group_by`` (not yet resolved presets) are skipped.
    """
    found = []
    for index, name in enumerate(order):
        mine = group_by.get(name)
        if mine is None:
            continue
        for upstream in depends_on.get(name, ()):
            theirs = group_by.get(upstream)
            if theirs is None or is_coarser_or_equal(mine, theirs):
                continue
            closure = _dimension_closure(theirs)
            extra = [dimension for dimension in mine if dimension not in closure]
            allowed = f"only by dimensions among {sorted(closure)} ([] always works)" if closure else "by [] as well"
            found.append(
                (
                    index,
                    f"step {name!r} groups by {list(mine)} but its upstream step {upstream!r} groups by "
                    f"{list(theirs)}: {', '.join(extra)} would split one upstream sub-group across several "
                    "runs. A step must be as coarse as each upstream step or coarser (fan-in, e.g. per-scan "
                    f"→ all data []): group {name!r} {allowed}, or make {upstream!r} finer",
                )
            )
    return found


# --------------------------------------------------------------------------------------------- cron, semver

_CRON_ALIASES = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
_MONTH_NAMES = {name.lower(): number for number, name in enumerate(calendar.month_abbr) if name}
_DAY_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_CRON_FIELDS = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTH_NAMES),
    ("day of week", 0, 7, _DAY_NAMES),
)
_CRON_ITEM = re.compile(r"(?:(\*)|([A-Za-z0-9]+)(?:-([A-Za-z0-9]+))?)(?:/(\d+))?")


def cron_problem(expression: str) -> str | None:
    """Why ``expression`` is not a cron expression this project accepts, or None when it is fine.

    Accepted: five fields (minute hour day-of-month month day-of-week) made of ``*``, numbers, month and day
    names, ranges ``a-b`` (a ≤ b), lists ``a,b`` and steps ``/n``; or one of the @hourly … @annually aliases.
    A subset of what Dagster schedules accept (no L, #, ?, or wrapping ranges), so a valid spec always loads.
    """
    text = _CRON_ALIASES.get(expression.strip().lower(), expression)
    parts = text.split()
    if len(parts) != 5:
        return (
            f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}; "
            'e.g. "0 12 * * *" for every day at 12:00'
        )
    expanded: list[set[int]] = []
    for part, (label, low, high, names) in zip(parts, _CRON_FIELDS, strict=True):
        values: set[int] = set()
        for item in part.split(","):
            match = _CRON_ITEM.fullmatch(item)
            if not match:
                return f"{label} field {part!r}: {item!r} is not *, a value, a range a-b or a step /n"
            star, first, last, step = match.groups()
            if step is not None and int(step) < 1:
                return f"{label} field {part!r}: the step /{step} must be at least 1"
            if star:
                start, end = low, high
            else:
                start = _cron_value(first, low, high, names)
                end = _cron_value(last, low, high, names) if last is not None else start
                if start is None or end is None:
                    bad = first if start is None else last
                    allowed = f"{low}-{high}" + (f" or {', '.join(names)}" if names else "")
                    return f"{label} field {part!r}: {bad!r} is out of range (allowed {allowed})"
                if end < start:
                    return f"{label} field {part!r}: range {item!r} runs backwards; write low-high"
                if step is not None and last is None:
                    end = high
            values.update(range(start, end + 1, int(step or 1)))
        expanded.append(values)
    if expanded[3] == {2} and len(expanded[2]) == 1 and expanded[2] <= {30, 31}:
        return "February has no 30th or 31st day, so the schedule would never run"
    return None


def _cron_value(text: str, low: int, high: int, names: Mapping[str, int]) -> int | None:
    value = names.get(text.lower()) if not text.isdigit() else int(text)
    if value is None or not low <= value <= high:
        return None
    return value


def _is_timezone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def parse_semver(version: str) -> tuple[int, int, int, tuple[tuple[int, int | str], ...]]:
    """A sort key with semver precedence: release > pre-release, numeric identifiers < alphanumeric ones.

    Build metadata (``+…``) is ignored, as semver.org specifies. Raises ValueError for a non-semver text.
    """
    match = SEMVER.fullmatch(version)
    if not match:
        raise ValueError(f"{version!r} is not a semantic version such as 1.0.0")
    major, minor, patch, pre, _build = match.groups()
    if pre is None:
        # A release sorts after every pre-release of the same version.
        return int(major), int(minor), int(patch), ((2, 0),)
    identifiers: list[tuple[int, int | str]] = []
    for identifier in pre.split("."):
        identifiers.append((0, int(identifier)) if identifier.isdigit() else (1, identifier))
    return int(major), int(minor), int(patch), tuple(identifiers)


# ------------------------------------------------------------------------------------------- serialising


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal data gives equal text (and equal hashes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_of(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def spec_to_dict(spec: PipelineSpec) -> dict[str, Any]:
    """The spec as YAML-shaped data with every default filled in (the input of ``spec_sha256``)."""
    trigger: dict[str, Any] = {"type": spec.trigger.type.value, **spec.trigger.to_config()}
    grouping: dict[str, Any] = {"name": spec.grouping.name, "description": spec.grouping.description}
    if spec.grouping.preset is not None:
        grouping["preset"] = spec.grouping.preset
    if spec.grouping.instrument_module is not None:
        grouping["instrument_module"] = spec.grouping.instrument_module
    grouping["rules"] = [dict(rule) for rule in spec.grouping.rules]
    return {
        "pipeline": spec.name,
        "description": spec.description,
        "processing_location": spec.processing_location,
        "trigger": trigger,
        "enabled": spec.enabled,
        "priority": spec.priority,
        "grouping": grouping,
        "steps": [_step_to_dict(step) for step in spec.steps],
    }


def _step_to_dict(step: StepSpec) -> dict[str, Any]:
    software = step.software
    return {
        "name": step.name,
        "description": step.description,
        "depends_on": list(step.depends_on),
        "software": {
            "name": software.name,
            "version": software.version,
            "version_policy": software.version_policy.value,
            "image_ref": software.image_ref,
            "image_digest": software.image_digest,
            "entrypoint": list(software.entrypoint),
        },
        "config": dict(step.config),
        "group_by": {"preset": step.group_by_preset} if step.group_by is None else list(step.group_by),
        "cooldown_seconds": step.cooldown_seconds,
        "resources": step.resources.to_dict(),
        "max_retries": step.max_retries,
        # Only when set, so that the stored definition hash of pipelines without it stays what it was.
        **({"retention": step.retention} if step.retention != "auto" else {}),
        **({"execution": {"mode": step.execution_mode}} if step.execution_mode != "auto" else {}),
        **({"qa_checks": thresholds_to_dict(step.qa_checks)} if step.qa_checks else {}),
    }


def spec_sha256(spec: PipelineSpec) -> str:
    """SHA-256 of the canonical JSON of ``spec_to_dict(spec)``: equal specs, equal hashes."""
    return sha256_of(spec_to_dict(spec))
