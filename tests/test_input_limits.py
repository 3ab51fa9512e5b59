"""Unbounded input is refused before it costs anything. The one YAML loader: alias bombs, oversized, too deep and
recursive documents are refused while being read, with one line naming the file and the limit, while ordinary
anchors and aliases still work. Whole numbers past their bound are refused naming the key, not by ops-db."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.cli import main
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.pipelines.spec import PipelineSpecError, load_pipeline_spec
from ccat_dagster.safe_yaml import (
    MAX_YAML_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    YamlLimitError,
    read_limited_text,
    safe_load,
)

from .opsdb_factories import make_world

PIPELINE = """\
pipeline: aliased
processing_location: ramses-processing
grouping: {name: aliased-grouping}
steps:
  - name: calibrate
    software: &soft {name: soft-a, version: "1.0.0", image_ref: "docker://example.org/a:1", entrypoint: [/bin/a]}
    group_by: [executed_obs_unit]
    resources: &big {cpu: 4, memory_gb: 8}
  - name: grid_map
    depends_on: [calibrate]
    software: *soft
    group_by: []
    resources: {<<: *big, gpus: 1}
"""


def billion_laughs(levels: int = 9) -> str:
    """The classic bomb: 9 levels of 9 aliases each stand for 9¹⁰ ≈ 3.5 billion strings in 10 short lines."""
    lines = ['lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def merge_bomb(levels: int = 12) -> str:
    """The same through merge keys (``<<: [*m, *m, …]``), which validation would walk expanded."""
    lines = ["m0: &m0 {x: 1, y: 2}"]
    lines += [f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 10)}]}}" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_a_billion_laughs_pipeline_file_is_refused_naming_the_file_and_the_limit(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs(), encoding="utf-8")
    with pytest.raises(PipelineSpecError) as raised:
        load_pipeline_spec(path)
    (problem,) = raised.value.problems
    assert problem.startswith(f"{path}:")  # file and line
    assert f"more than {MAX_YAML_NODES} nodes" in problem and "aliases" in problem and "\n" not in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (billion_laughs(), f"expands to more than {MAX_YAML_NODES} nodes"),
        (merge_bomb(), f"expands to more than {MAX_YAML_NODES} nodes"),
        ("a: &a [1, *a]\n", "alias *a refers to a node that contains it"),
        ("k: &m {self: *m}\n", "alias *m refers to a node that contains it"),
        ("[" * 500, f"nested deeper than {MAX_YAML_DEPTH} levels"),
        ("- " * (MAX_YAML_DEPTH + 1) + "x\n", f"nested deeper than {MAX_YAML_DEPTH} levels"),
        ("x" * (MAX_YAML_BYTES + 1), f"larger than {MAX_YAML_BYTES} bytes"),
    ],
    ids=["billion-laughs", "merge-keys", "recursive-list", "recursive-mapping", "deep-flow", "deep-block", "size"],
)
def test_unbounded_documents_are_refused_while_being_read(text, expected):
    with pytest.raises(YamlLimitError) as raised:
        safe_load(text, origin="input.yaml")
    message = str(raised.value)
    assert message.startswith("input.yaml") and expected in message and "\n" not in message


def test_just_within_the_limits_loads():
    # 9 * 9 * 9 * 9 = 6561 strings (plus the lists holding them): under the limit, so it is an ordinary document.
    data = safe_load(billion_laughs(levels=3), origin="small.yaml")
    assert len(data["lol3"]) == 9 and data["lol3"][0][0][0][0] == "lol"
    nested = safe_load("[" * MAX_YAML_DEPTH + "]" * MAX_YAML_DEPTH, origin="deep.yaml")
    depth = 0
    while isinstance(nested, list) and nested:
        nested, depth = nested[0], depth + 1
    assert depth == MAX_YAML_DEPTH - 1


def test_ordinary_anchors_aliases_and_merges_still_work_in_a_pipeline(tmp_path):
    path = tmp_path / "aliased.yaml"
    path.write_text(PIPELINE, encoding="utf-8")
    first, second = load_pipeline_spec(path).steps
    assert (first.resources.cpu, first.resources.memory_gb) == (4, 8)
    assert (second.resources.cpu, second.resources.memory_gb, second.resources.gpus) == (4, 8, 1)
    assert first.software == second.software


def test_an_oversized_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.yaml"
    with path.open("wb") as stream:
        stream.truncate(64 * 2**30)  # a sparse 64 GiB file: reading it would take minutes and all memory
    with pytest.raises(PipelineSpecError) as raised:
        load_pipeline_spec(path)
    assert list(raised.value.problems) == [
        f"{path}: the file is larger than {MAX_YAML_BYTES} bytes, the limit for YAML input: split it or remove what "
        "it does not need"
    ]
    path.write_bytes(b"a: 1\n")
    assert read_limited_text(path) == "a: 1\n"


def test_the_cli_refuses_a_bomb_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CCAT_DAGSTER_DATA_DIR", str(tmp_path / "data"))
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs(), encoding="utf-8")
    assert main(["pipelines", "validate", "--offline", str(bomb)]) == 1
    err = capsys.readouterr().err
    assert f"{bomb}:" in err and f"more than {MAX_YAML_NODES} nodes" in err

    rules = tmp_path / "rules.yaml"
    rules.write_text(merge_bomb(), encoding="utf-8")
    assert main(["groupings", "preview", "--rules", str(rules)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"rules file {rules}:" in err[0] and f"more than {MAX_YAML_NODES} nodes" in err[0]

    big_json = tmp_path / "rules.json"
    with big_json.open("wb") as stream:
        stream.truncate(MAX_YAML_BYTES + 1)
    assert main(["groupings", "preview", "--rules", str(big_json)]) != 0
    assert f"larger than {MAX_YAML_BYTES} bytes" in capsys.readouterr().err


def test_a_huge_cooldown_is_refused_naming_the_key_and_the_largest_one_fits_ops_db(
    pg_url, tmp_path, capsys, monkeypatch
):
    """Before the bound, ops-db refused 10¹² with "integer out of range; check CCAT_OPS_DB_URL"."""
    suffix = uuid.uuid4().hex[:8]
    engine = make_engine(pg_url)
    with Session(engine) as session, session.begin():
        make_world(session, suffix=f"-{suffix}")
    monkeypatch.setenv("CCAT_OPS_DB_URL", pg_url)
    monkeypatch.setenv("CCAT_DAGSTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    spec = yaml.safe_load(PIPELINE.replace("aliased", f"bounded_{suffix}"))
    spec["processing_location"] = f"processing-{suffix}"
    path = tmp_path / "pipe.yaml"
    for step in spec["steps"]:
        step["cooldown_seconds"] = 10**12
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    assert main(["pipelines", "apply", str(path)]) == 1
    err = capsys.readouterr().err
    assert (
        "steps[0].cooldown_seconds: 1000000000000 is invalid: expected a whole number of seconds from 0 to 31536000"
        in err
    )
    assert "integer out of range" not in err and "CCAT_OPS_DB_URL" not in err
    for step in spec["steps"]:
        step["cooldown_seconds"] = 31_536_000
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    assert main(["pipelines", "apply", str(path)]) == 0, capsys.readouterr().err
    with Session(engine) as session:
        cooldowns = session.scalars(
            select(m.ReductionStep.cooldown_seconds)
            .join(m.Pipeline, m.Pipeline.id == m.ReductionStep.pipeline_id)
            .where(m.Pipeline.name == f"bounded_{suffix}")
        ).all()
    engine.dispose()
    assert cooldowns == [31_536_000, 31_536_000]


def test_the_documented_limits_are_the_loaders():
    limits = (Path(__file__).resolve().parents[1] / "docs" / "pipeline-yaml.md").read_text().partition("## Limits")[2]
    assert f"| file size | {MAX_YAML_BYTES} bytes" in limits
    assert f"| nodes, aliases expanded | {MAX_YAML_NODES} |" in limits
    assert f"| nesting of mappings and lists | {MAX_YAML_DEPTH} levels |" in limits


def test_no_module_reads_yaml_around_the_bounded_loader():
    package = Path(__file__).resolve().parents[1] / "ccat_dagster"
    unbounded = re.compile(r"yaml\.(safe_load|load|full_load|unsafe_load|load_all|safe_load_all|compose)\(")
    offenders = [
        f"{path.relative_to(package)}:{number}"
        for path in sorted(package.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if unbounded.search(line)
    ]
    assert offenders == [], "read YAML through ccat_dagster.safe_yaml (its limits), not PyYAML directly"
