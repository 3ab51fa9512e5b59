"""Pipeline YAML: loading, schema errors, meaning checks, hashing. No database."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ccat_dagster.errors import CcatError
from ccat_dagster.opsdb.enums import TriggerType, VersionPolicy
from ccat_dagster.pipelines.spec import (
    PipelineSpecError,
    cron_problem,
    find_cycle,
    is_coarser_or_equal,
    load_pipeline_spec,
    load_schema,
    parse_pipeline_spec,
    parse_semver,
    spec_sha256,
    spec_to_dict,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "pipelines" / "chai_ngc253_co43.yaml"


def base_spec() -> dict[str, Any]:
    """A small valid pipeline: per-scan → all data."""
    return {
        "pipeline": "demo_pipe",
        "processing_location": "ramses-processing",
        "trigger": {"type": "continuous"},
        "grouping": {
            "name": "demo-grouping",
            "instrument_module": "LFA",
            "rules": [{"table": "Source", "column": "name", "operator": "eq", "value": "NGC253"}],
        },
        "steps": [
            {
                "name": "calibrate",
                "software": {
                    "name": "soft-a",
                    "version": "1.0.0",
                    "image_ref": "docker://example.org/a:1.0.0",
                    "entrypoint": ["/bin/a"],
                },
                "group_by": ["executed_obs_unit"],
                "cooldown_seconds": 60,
            },
            {
                "name": "baseline",
                "depends_on": ["calibrate"],
                "software": {
                    "name": "soft-b",
                    "version": "1.0.0",
                    "image_ref": "docker://example.org/b:1.0.0",
                    "entrypoint": ["/bin/b"],
                },
                "group_by": ["executed_obs_unit"],
                "resources": {"cpu": 2, "memory_gb": 4, "time_hours": 1, "gpus": 0},
            },
            {
                "name": "grid_map",
                "depends_on": ["baseline"],
                "software": {
                    "name": "soft-c",
                    "version": "1.0.0",
                    "image_ref": "docker://example.org/c:1.0.0",
                    "entrypoint": ["/bin/c"],
                },
                "group_by": [],
            },
        ],
    }


def write(tmp_path: Path, data: Any, name: str = "pipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def problems_of(tmp_path: Path, data: Any) -> list[str]:
    path = write(tmp_path, data)
    with pytest.raises(PipelineSpecError) as caught:
        load_pipeline_spec(path)
    assert isinstance(caught.value, CcatError)
    return list(caught.value.problems)


def only_problem(tmp_path: Path, data: Any) -> str:
    problems = problems_of(tmp_path, data)
    assert len(problems) == 1, problems
    return problems[0]


# ------------------------------------------------------------------------------------------ the example


def test_example_file_loads_as_the_chai_pipeline():
    spec = load_pipeline_spec(EXAMPLE)
    assert spec.name == "chai_ngc253_co43"
    assert spec.processing_location == "ramses-processing"
    assert spec.trigger.type is TriggerType.CONTINUOUS
    assert spec.grouping.instrument_module == "LFA"
    assert [dict(rule) for rule in spec.grouping.rules] == [
        {"table": "Source", "column": "name", "operator": "eq", "value": "NGC253"},
        {"table": "ObsUnit", "column": "line_id", "operator": "eq", "value": "CO43"},
    ]
    assert [s.name for s in spec.steps] == ["calibrate", "baseline", "grid_map"]
    assert [s.group_by for s in spec.steps] == [("scan",), ("scan",), ()]
    assert [s.cooldown_seconds for s in spec.steps] == [60, 60, 86400]
    assert [s.depends_on for s in spec.steps] == [(), ("calibrate",), ("baseline",)]
    assert [s.software.name for s in spec.steps] == ["chai-calibration", "chai-baseline", "chai-gridding"]
    assert {s.software.version for s in spec.steps} == {"1.0.0"}
    assert {s.software.version_policy for s in spec.steps} == {VersionPolicy.COMPATIBLE}
    # Relative to the YAML file's directory, stored absolute.
    assert {s.software.image_ref for s in spec.steps} == {str(REPO / "examples" / "software" / "chai")}
    assert [s.software.entrypoint for s in spec.steps] == [
        ("/usr/bin/python3", "/opt/software/bin/chai_calibrate.py"),
        ("/usr/bin/python3", "/opt/software/bin/chai_baseline.py"),
        ("/usr/bin/python3", "/opt/software/bin/chai_grid_map.py"),
    ]
    assert [dict(s.config) for s in spec.steps] == [
        {"calibration_mode": "hot_cold"},
        {"baseline_order": 1, "line_window_kms": 50},
        {"pixel_arcsec": 10, "max_rms_k": 0.5},
    ]
    assert [[t.check_name for t in s.qa_checks] for s in spec.steps] == [[], [], ["qa_flagged_scans", "qa_rms_k"]]


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(load_schema())


def test_defaults_are_filled_in(tmp_path):
    data = base_spec()
    del data["trigger"]
    spec = load_pipeline_spec(write(tmp_path, data))
    assert spec.trigger.type is TriggerType.MANUAL and spec.trigger.to_config() == {}
    assert spec.enabled is True and spec.priority == 0 and spec.description == ""
    step = spec.steps[0]
    assert step.software.version_policy is VersionPolicy.EXACT
    assert step.software.image_digest is None
    assert step.resources.to_dict() == {"cpu": 1, "memory_gb": 2, "time_hours": 1, "gpus": 0}
    assert step.max_retries == 0 and step.config == {}
    assert spec.steps[2].cooldown_seconds == 0


# ------------------------------------------------------------------------------------------ schema errors


def _set(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    target = data
    for item in path[:-1]:
        target = target[item]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "fragments"),
    [
        (
            ("steps", 1, "resources", "memory_gb"),
            -2,
            ["steps[1].resources.memory_gb", "-2", "greater than 0"],
        ),
        (
            ("steps", 1, "resources", "memory_gb"),
            "lots",
            ["steps[1].resources.memory_gb", '"lots"', "number"],
        ),
        (("steps", 1, "resources", "cpu"), 0, ["steps[1].resources.cpu", "0", "whole number of CPU cores"]),
        (("steps", 1, "resources", "cpu"), 1.5, ["steps[1].resources.cpu", "1.5", "whole number"]),
        (("steps", 1, "resources", "time_hours"), 0, ["steps[1].resources.time_hours", "greater than 0"]),
        (("steps", 1, "resources", "gpus"), -1, ["steps[1].resources.gpus", "-1", "GPUs"]),
        (("steps", 0, "cooldown_seconds"), -5, ["steps[0].cooldown_seconds", "-5", "from 0 to"]),
        (("steps", 0, "cooldown_seconds"), "1m", ["steps[0].cooldown_seconds", '"1m"', "seconds"]),
        (("steps", 0, "cooldown_seconds"), 10**12, ["steps[0].cooldown_seconds", "1000000000000", "0 to 31536000"]),
        (("steps", 0, "max_retries"), 10**30, ["steps[0].max_retries", "0 to 10"]),
        (("steps", 1, "resources", "cpu"), 2**63, ["steps[1].resources.cpu", "1 to 1024"]),
        (("steps", 1, "resources", "memory_gb"), 1e300, ["steps[1].resources.memory_gb", "at most 65536"]),
        (("priority",), -(10**20), ["priority", "-1000 to 1000"]),
        (("processing_location",), 2**31, ["processing_location", "2147483648", "1 to 2147483647"]),
        (("steps", 0, "max_retries"), True, ["steps[0].max_retries", "true", "whole number"]),
        (("pipeline",), "Chai-Pipe", ["pipeline:", '"Chai-Pipe"', "lower-case"]),
        (("pipeline",), "x" * 64, ["pipeline:", "at most 63"]),
        (("steps", 2, "name"), "grid+map", ["steps[2].name", '"grid+map"', "lower-case"]),
        (("priority",), "high", ["priority", '"high"', "whole number"]),
        (("enabled",), "sometimes", ["enabled", '"sometimes"', "true or false"]),
        (("trigger", "type"), "weekly", ["trigger.type", '"weekly"', "continuous, cron, manual"]),
        (
            ("steps", 0, "software", "version_policy"),
            "newest",
            ["version_policy", '"newest"', "exact, compatible, latest"],
        ),
        (("steps", 0, "software", "version"), 1.0, ["steps[0].software.version", "1.0", "semantic version"]),
        (
            ("steps", 0, "software", "version"),
            "v1.0.0",
            ["steps[0].software.version", '"v1.0.0"', "semantic version"],
        ),
        (("steps", 0, "software", "version"), "1.0", ["steps[0].software.version", '"1.0"', '"1.0.0"']),
        (("steps", 0, "software", "image_digest"), "abc", ["image_digest", '"abc"', "sha256:"]),
        (("steps", 0, "software", "entrypoint"), "python3 run.py", ["entrypoint", "list of arguments"]),
        (("steps", 0, "software", "entrypoint"), [], ["entrypoint", "[]", "non-empty"]),
        (
            ("steps", 0, "group_by"),
            "executed_obs_unit",
            ["steps[0].group_by", '"executed_obs_unit"', "list of dimension"],
        ),
        (("steps", 0, "group_by"), {"preset": 3}, ["steps[0].group_by.preset", "3", "preset name"]),
        (("steps", 0, "depends_on"), "calibrate", ["steps[0].depends_on", "list of step names"]),
        (("steps", 0, "config"), [1, 2], ["steps[0].config", "mapping"]),
        (("processing_location",), 0, ["processing_location", "0", "DataLocation name"]),
        (("processing_location",), [], ["processing_location", "DataLocation name"]),
        (("steps",), [], ["steps", "[]", "1 to 100 steps"]),
        (("grouping", "name"), "bad name/with slash", ["grouping.name", "letters, digits"]),
        (("grouping", "instrument_module"), "a/b/c", ["grouping.instrument_module", "CHAI/LFA"]),
        (("steps", 0, "software", "image_ref"), "", ["image_ref", '""', "image URI"]),
    ],
)
def test_schema_errors_name_file_line_path_value_and_expectation(tmp_path, path, value, fragments):
    message = only_problem(tmp_path, _set(base_spec(), path, value))
    assert message.startswith(str(tmp_path / "pipe.yaml") + ":"), message
    assert message.split(":")[1].isdigit(), f"no line number in {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_every_number_in_the_schema_has_an_upper_bound():
    """A whole number without a maximum reaches ops-db (integer columns) or timedelta and fails there instead."""
    unbounded = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") in ("integer", "number") and "maximum" not in node:
                unbounded.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}")

    walk(load_schema(), "#")
    assert unbounded == []


def test_the_line_number_points_at_the_bad_value(tmp_path):
    path = write(tmp_path, _set(base_spec(), ("steps", 1, "resources", "memory_gb"), -2))
    bad_line = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if "memory_gb: -2" in line)
    with pytest.raises(PipelineSpecError) as caught:
        load_pipeline_spec(path)
    assert f"pipe.yaml:{bad_line}: steps[1].resources.memory_gb: -2 is invalid" in str(caught.value)


@pytest.mark.parametrize(
    ("path", "fragments"),
    [
        (("pipeline",), ["(top level)", "missing required key 'pipeline'", "lower-case"]),
        (("steps", 0, "software", "image_ref"), ["steps[0].software", "missing required key 'image_ref'"]),
        (
            ("steps", 1, "group_by"),
            ["steps[1]", "missing required key 'group_by'", "list of dimension names"],
        ),
        (("grouping",), ["missing required key 'grouping'"]),
    ],
)
def test_missing_keys_are_named(tmp_path, path, fragments):
    message = only_problem(tmp_path, _set(base_spec(), path, _DELETE))
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_key_suggests_the_close_one(tmp_path):
    data = base_spec()
    data["steps"][1]["dependson"] = data["steps"][1].pop("depends_on")
    message = only_problem(tmp_path, data)
    assert "steps[1].dependson: unknown key 'dependson' (did you mean 'depends_on'?)" in message
    assert "allowed keys here are" in message


def test_every_schema_problem_is_reported_at_once(tmp_path):
    data = _set(base_spec(), ("steps", 0, "cooldown_seconds"), -1)
    data = _set(data, ("steps", 2, "resources"), {"cpu": 0})
    data = _set(data, ("trigger", "type"), "hourly")
    problems = problems_of(tmp_path, data)
    assert len(problems) == 3
    assert any("trigger.type" in p for p in problems)
    assert any("steps[0].cooldown_seconds" in p for p in problems)
    assert any("steps[2].resources.cpu" in p for p in problems)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("pipeline: p\nsteps: [\n  {name: a\n", encoding="utf-8")
    with pytest.raises(PipelineSpecError) as caught:
        load_pipeline_spec(path)
    assert str(caught.value).startswith(f"{path}:")
    assert "invalid YAML" in str(caught.value)


def test_duplicate_yaml_keys_are_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("pipeline: a\npipeline: b\n", encoding="utf-8")
    with pytest.raises(
        PipelineSpecError, match=r"dup.yaml:2: invalid YAML: .*'pipeline' appears twice \(first on line 1\)"
    ):
        load_pipeline_spec(path)


def test_two_documents_are_rejected(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("pipeline: a\n---\npipeline: b\n", encoding="utf-8")
    with pytest.raises(PipelineSpecError, match="invalid YAML.*single document"):
        load_pipeline_spec(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(PipelineSpecError, match="no such file"):
        load_pipeline_spec(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(PipelineSpecError, match="expected a mapping with the keys pipeline"):
        load_pipeline_spec(path)


def test_config_must_be_json(tmp_path):
    path = tmp_path / "nan.yaml"
    text = yaml.safe_dump(base_spec(), sort_keys=False).replace(
        "  cooldown_seconds: 60\n", "  cooldown_seconds: 60\n  config: {threshold: .nan, 1: one}\n", 1
    )
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PipelineSpecError) as caught:
        load_pipeline_spec(path)
    message = str(caught.value)
    assert "steps[0].config.threshold: nan is not a finite number" in message
    assert "steps[0].config: key 1 is a int: keys must be text" in message


def test_dates_in_config_stay_text(tmp_path):
    path = tmp_path / "date.yaml"
    text = yaml.safe_dump(base_spec(), sort_keys=False).replace(
        "  cooldown_seconds: 60\n", "  cooldown_seconds: 60\n  config: {since: 2026-10-01}\n", 1
    )
    path.write_text(text, encoding="utf-8")
    assert load_pipeline_spec(path).steps[0].config == {"since": "2026-10-01"}


# ------------------------------------------------------------------------------------------ meaning


def test_duplicate_step_names(tmp_path):
    data = _set(base_spec(), ("steps", 2, "name"), "calibrate")
    data["steps"][2]["depends_on"] = []
    message = only_problem(tmp_path, data)
    assert "steps[2].name: step name 'calibrate' is used twice (steps[0] and steps[2])" in message


def test_unknown_dependency_lists_the_steps(tmp_path):
    message = only_problem(tmp_path, _set(base_spec(), ("steps", 1, "depends_on"), ["calibrat"]))
    assert "steps[1].depends_on[0]: 'calibrat' is not a step of this pipeline (did you mean 'calibrate'?)" in message
    assert "steps are calibrate, baseline, grid_map" in message


def test_self_dependency(tmp_path):
    message = only_problem(tmp_path, _set(base_spec(), ("steps", 1, "depends_on"), ["baseline"]))
    assert "steps[1].depends_on[0]: step 'baseline' depends on itself" in message


def test_cycle_is_named(tmp_path):
    data = _set(base_spec(), ("steps", 0, "depends_on"), ["grid_map"])
    for step in data["steps"]:
        step["group_by"] = []
    message = only_problem(tmp_path, data)
    assert "steps[0].depends_on: dependency cycle calibrate → grid_map → baseline → calibrate" in message
    assert "remove one of these depends_on entries" in message


def test_find_cycle():
    assert find_cycle({"a": [], "b": ["a"], "c": ["a", "b"]}) is None
    assert find_cycle({"a": ["b"], "b": ["a"]}) == ["a", "b", "a"]
    assert find_cycle({"x": [], "a": ["c"], "b": ["a"], "c": ["b"]}) == ["a", "c", "b", "a"]


def test_forward_references_are_allowed_without_a_cycle(tmp_path):
    data = base_spec()
    data["steps"].reverse()
    spec = load_pipeline_spec(write(tmp_path, data))
    assert [s.name for s in spec.steps] == ["grid_map", "baseline", "calibrate"]


@pytest.mark.parametrize(
    ("trigger", "fragments"),
    [
        ({"type": "cron"}, ["trigger", "missing required key 'cron'"]),
        ({"type": "cron", "cron": "0 25 * * *"}, ["trigger.cron", '"0 25 * * *"', "hour field", "0-23"]),
        ({"type": "cron", "cron": "every day"}, ["trigger.cron", "expected 5 fields"]),
        ({"type": "cron", "cron": "0 0 30 2 *"}, ["trigger.cron", "February"]),
        (
            {"type": "cron", "cron": "0 0 * * *", "timezone": "Mars/Olympus"},
            ["trigger.timezone", "Mars/Olympus", "IANA"],
        ),
        ({"type": "manual", "cron": "0 0 * * *"}, ["trigger.cron", "belong to type cron only"]),
        ({"type": "continuous", "timezone": "UTC"}, ["trigger.timezone", "belong to type cron only"]),
    ],
)
def test_trigger_errors(tmp_path, trigger, fragments):
    message = only_problem(tmp_path, _set(base_spec(), ("trigger",), trigger))
    for fragment in fragments:
        assert fragment in message, message


def test_cron_trigger_config(tmp_path):
    spec = load_pipeline_spec(write(tmp_path, _set(base_spec(), ("trigger",), {"type": "cron", "cron": "0 12 * * *"})))
    assert spec.trigger.to_config() == {"cron": "0 12 * * *", "timezone": "UTC"}
    data = _set(base_spec(), ("trigger",), {"type": "cron", "cron": "@daily", "timezone": "America/Santiago"})
    assert load_pipeline_spec(write(tmp_path, data)).trigger.to_config() == {
        "cron": "@daily",
        "timezone": "America/Santiago",
    }


CRON_EXPRESSIONS = [
    "0 12 * * *",
    "*/5 * * * *",
    "5/15 * * * *",
    "0 0 30 2 *",
    "0 0 31 feb *",
    "0 0 * * mon-fri",
    "0 0 * * fri-mon",
    "0 0 * * 7",
    "0 0 * * 8",
    "0 0 L * *",
    "0 0 * * 1#2",
    "0 * * * * *",
    "60 * * * *",
    "0 24 * * *",
    "0-59/0 * * * *",
    "0 0 1-31/2 * *",
    "0 0 * JAN *",
    "0 0 * jan-mar *",
    "0 0 5-1 * *",
    "* * * *",
    "1,2,3 * * * *",
    "1,,2 * * * *",
    "0 0 0 * *",
    "0 0 * 13 *",
    "0 0 30 2,3 *",
    "@daily",
    "@hourly",
    "@weekly",
    "@monthly",
    "@yearly",
    "@annually",
    "@midnight",
    "@reboot",
    "0 9-17/2 * * 1-5",
]


@pytest.mark.parametrize("expression", CRON_EXPRESSIONS)
def test_every_cron_expression_accepted_here_is_accepted_by_dagster(expression):
    # A spec that passes must build a Dagster schedule; being stricter than Dagster is fine.
    from dagster._utils.schedules import is_valid_cron_string

    if cron_problem(expression) is None:
        assert is_valid_cron_string(expression)


def test_cron_problem_accepts_the_usual_forms():
    for expression in [
        "0 12 * * *",
        "*/15 * * * *",
        "0 0 * * mon-fri",
        "30 2 1 jan,jul *",
        "@daily",
        "0 0 * * 7",
    ]:
        assert cron_problem(expression) is None, expression
    assert "runs backwards" in cron_problem("0 0 * * fri-mon")
    assert "at least 1" in cron_problem("*/0 * * * *")


def test_bad_group_by_dimension(tmp_path):
    message = only_problem(tmp_path, _set(base_spec(), ("steps", 0, "group_by"), ["executed_obs_unit", "nite"]))
    assert "steps[0].group_by[1]: 'nite' is not a dimension" in message
    assert "valid names: executed_obs_unit" in message


def test_bad_rules_are_reported_by_index(tmp_path):
    data = _set(
        base_spec(),
        ("grouping", "rules"),
        [
            {"table": "Source", "column": "name", "operator": "eq", "value": "NGC253"},
            {"table": "Sauce", "column": "name", "operator": "eq", "value": "x"},
            {"table": "ObsUnit", "column": "line_id", "operator": "in", "value": []},
        ],
    )
    problems = problems_of(tmp_path, data)
    assert len(problems) == 2
    assert "grouping.rules[1]:" in problems[0] and "unknown table" in problems[0] and "Source" in problems[0]
    assert "grouping.rules[2]:" in problems[1] and "non-empty list" in problems[1]


def test_rules_are_normalised_by_the_filter_engine(tmp_path):
    rule = {"table": "ExecutedObsUnit", "column": "start_time", "operator": "gte", "value": "2026-10-01"}
    spec = load_pipeline_spec(write(tmp_path, _set(base_spec(), ("grouping", "rules"), [rule])))
    assert spec.grouping.rules[0]["value"] == "2026-10-01T00:00:00+00:00"


@pytest.mark.parametrize(
    ("upstream", "downstream", "ok"),
    [
        (["executed_obs_unit"], [], True),
        (["executed_obs_unit"], ["executed_obs_unit"], True),
        (["executed_obs_unit"], ["source"], True),
        (["executed_obs_unit"], ["obs_date", "line"], True),
        (["source", "line"], ["source"], True),
        (["instrument_module"], ["instrument"], True),
        ([], ["executed_obs_unit"], False),
        (["source"], ["source", "line"], False),
        (["executed_obs_unit"], ["instrument"], False),
        (["source"], ["obs_unit"], False),
    ],
)
def test_fan_in_granularity(upstream, downstream, ok):
    assert is_coarser_or_equal(downstream, upstream) is ok


def test_finer_step_after_all_data_is_rejected(tmp_path):
    data = base_spec()
    data["steps"][2]["group_by"] = []
    data["steps"].append(
        {
            "name": "per_scan_qa",
            "depends_on": ["grid_map"],
            "software": dict(data["steps"][0]["software"]),
            "group_by": ["executed_obs_unit"],
        }
    )
    message = only_problem(tmp_path, data)
    assert "steps[3].group_by: step 'per_scan_qa' groups by ['executed_obs_unit']" in message
    assert "upstream step 'grid_map' groups by []" in message
    assert "fan-in" in message


def test_fan_in_is_checked_against_every_upstream(tmp_path):
    data = base_spec()
    data["steps"][1]["group_by"] = ["source"]
    data["steps"][2]["depends_on"] = ["calibrate", "baseline"]
    data["steps"][2]["group_by"] = ["executed_obs_unit"]
    message = only_problem(tmp_path, data)
    assert "step 'grid_map'" in message and "upstream step 'baseline' groups by ['source']" in message


def test_one_software_version_is_one_image(tmp_path):
    data = base_spec()
    data["steps"][1]["software"] = dict(data["steps"][0]["software"], entrypoint=["/bin/other"])
    message = only_problem(tmp_path, data)
    assert "steps[1].software: software soft-a 1.0.0 is also used by steps[0] with a different entrypoint" in message


def test_same_software_version_in_two_steps_is_fine(tmp_path):
    data = base_spec()
    data["steps"][1]["software"] = dict(data["steps"][0]["software"])
    assert load_pipeline_spec(write(tmp_path, data)).steps[1].software.name == "soft-a"


def test_image_ref_paths(tmp_path):
    image_dir = tmp_path / "software" / "chai"
    image_dir.mkdir(parents=True)
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    data = base_spec()
    data["steps"][0]["software"]["image_ref"] = "../software/chai"
    data["steps"][1]["software"]["image_ref"] = "/cluster/images/b-1.0.0.sif"
    spec = load_pipeline_spec(write(pipelines, data))
    assert spec.steps[0].software.image_ref == str(image_dir.resolve())
    assert spec.steps[1].software.image_ref == "/cluster/images/b-1.0.0.sif"  # absolute: not checked
    assert spec.steps[2].software.image_ref == "docker://example.org/c:1.0.0"

    data["steps"][0]["software"]["image_ref"] = "../software/chia"
    message = only_problem(pipelines, data)
    assert "steps[0].software.image_ref" in message and '"../software/chia"' in message
    assert str(tmp_path / "software" / "chia") in message and "does not exist" in message


def test_relative_image_ref_without_a_file_is_rejected():
    data = base_spec()
    data["steps"][0]["software"]["image_ref"] = "software/chai"
    with pytest.raises(PipelineSpecError, match="relative path, but the spec was not read from a file"):
        parse_pipeline_spec(data)


# ------------------------------------------------------------------------------------------ hashing


def test_spec_sha256_ignores_formatting_and_follows_content(tmp_path):
    data = base_spec()
    first = load_pipeline_spec(write(tmp_path, data, "a.yaml"))
    flow = tmp_path / "b.yaml"
    flow.write_text(yaml.safe_dump(data, default_flow_style=True, sort_keys=True), encoding="utf-8")
    second = load_pipeline_spec(flow)
    assert first == second
    assert spec_sha256(first) == spec_sha256(second)
    # Defaults written out give the same spec as defaults left out.
    explicit = copy.deepcopy(data)
    explicit["enabled"] = True
    explicit["steps"][0]["resources"] = {"cpu": 1}
    explicit["steps"][0]["software"]["version_policy"] = "exact"
    assert spec_sha256(load_pipeline_spec(write(tmp_path, explicit, "c.yaml"))) == spec_sha256(first)

    changed = _set(data, ("steps", 0, "config"), {"calibration_mode": "sky"})
    assert spec_sha256(load_pipeline_spec(write(tmp_path, changed, "d.yaml"))) != spec_sha256(first)


def test_spec_to_dict_round_trips(tmp_path):
    spec = load_pipeline_spec(EXAMPLE)
    again = parse_pipeline_spec(spec_to_dict(spec))
    assert again == spec


def test_semver_precedence():
    ordered = [
        "0.9.0",
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.2.0",
        "1.10.0",
        "2.0.0",
    ]
    assert sorted(ordered, key=parse_semver) == ordered
    assert parse_semver("1.0.0+build.5") == parse_semver("1.0.0")
    with pytest.raises(ValueError):
        parse_semver("1.0")


def test_the_reference_shows_the_example_file_verbatim():
    reference = (REPO / "docs" / "pipeline-yaml.md").read_text(encoding="utf-8")
    shown = reference.split("```yaml\n", 1)[1].split("```", 1)[0]
    example = "".join(line for line in EXAMPLE.read_text(encoding="utf-8").splitlines(True) if not line.startswith("#"))
    assert shown == example


# ------------------------------------------------------------------------------------------ qa_checks


def test_qa_checks_are_read_validated_and_kept_in_the_definition(tmp_path):
    data = base_spec()
    data["steps"][2]["qa_checks"] = {"rms_k": {"max": 0.2}, "flagged_scans": {"max": 0, "severity": "warn"}}
    spec = load_pipeline_spec(write(tmp_path, data))
    checks = {t.metric: t for t in spec.steps[2].qa_checks}
    assert (checks["rms_k"].max, checks["rms_k"].min, checks["rms_k"].severity) == (0.2, None, "error")
    assert checks["flagged_scans"].severity == "warn" and checks["flagged_scans"].describe("scans") == "≤ 0 scans"
    assert spec_to_dict(spec)["steps"][2]["qa_checks"] == {
        "flagged_scans": {"max": 0.0, "severity": "warn"},
        "rms_k": {"max": 0.2},
    }
    # A pipeline without qa_checks keeps the definition (and its hash) it had before the key existed.
    assert "qa_checks" not in spec_to_dict(spec)["steps"][1]


@pytest.mark.parametrize(
    ("step", "value", "fragments"),
    [
        (1, {"rms_k": {"max": 1}}, ["steps[1].qa_checks", "'baseline' is not a final step", "move qa_checks"]),
        (2, {"rms_k": {"min": 2, "max": 1}}, ["steps[2].qa_checks.rms_k", "min 2 is above max 1", "swap"]),
        (2, {"rms_k": {"severity": "warn"}}, ["steps[2].qa_checks.rms_k", "min and/or max"]),
        (2, {"rms_k": {"max": "high"}}, ["steps[2].qa_checks.rms_k.max", '"high"', "a number"]),
        (2, {"rms_k": {"max": 1, "severity": "fatal"}}, ["qa_checks.rms_k.severity", '"fatal"', "error, warn"]),
        (2, {"RMS K": {"max": 1}}, ["steps[2].qa_checks", "lower-case letters"]),
        (2, {"rms_k": {"maximum": 1}}, ["steps[2].qa_checks.rms_k.maximum", "unknown key"]),
    ],
)
def test_bad_qa_checks_name_the_yaml_path_and_the_fix(tmp_path, step, value, fragments):
    data = base_spec()
    data["steps"][step]["qa_checks"] = value
    message = "\n".join(problems_of(tmp_path, data))
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
