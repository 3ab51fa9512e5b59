"""Applying pipeline specs to ops-db (PostgreSQL and SQLite): upserts, immutability, all-or-nothing, reads."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from ccat_dagster.demo.seed import seed_demo
from ccat_dagster.grouping.presets import save_preset
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.opsdb.enums import TriggerType, VersionPolicy
from ccat_dagster.pipelines.apply import (
    ApplyOutcome,
    PipelineApplyError,
    PipelineNotFoundError,
    apply_pipeline_spec,
    disable_pipeline,
    enable_pipeline,
    export_pipeline,
    get_pipeline,
    list_pipelines,
)
from ccat_dagster.pipelines.spec import load_pipeline_spec, parse_pipeline_spec
from ccat_dagster.pipelines.versions import SoftwareVersionError, choose_version, resolve_software_version

from .test_pipeline_spec import EXAMPLE, REPO, base_spec


@pytest.fixture
def seeded(engine: Engine, tmp_path: Path) -> Engine:
    with session_scope(engine) as session:
        seed_demo(session, data_dir=tmp_path / "data", scans=4)
    return engine


def apply(engine: Engine, data: dict[str, Any] | Path):
    spec = load_pipeline_spec(data) if isinstance(data, Path) else parse_pipeline_spec(data)
    with session_scope(engine) as session:
        return apply_pipeline_spec(session, spec)


def rejected(engine: Engine, data: dict[str, Any] | Path) -> str:
    with pytest.raises(PipelineApplyError) as caught:
        apply(engine, data)
    return str(caught.value)


def snapshot(engine: Engine) -> dict[str, list[tuple[str, ...]]]:
    """Every row of every ops-db table, as text: equal snapshots mean nothing was written."""
    with engine.connect() as connection:
        return {
            table.name: sorted(tuple(map(str, row)) for row in connection.execute(table.select()))
            for table in m.Base.metadata.sorted_tables
        }


def count(engine: Engine, model: type) -> int:
    with session_scope(engine) as session:
        return session.scalar(select(func.count()).select_from(model))


def changed(data: dict[str, Any], **edits: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for dotted, value in edits.items():
        *parents, last = dotted.split("__")
        target: Any = data
        for item in parents:
            target = target[int(item)] if item.isdigit() else target[item]
        target[int(last) if last.isdigit() else last] = value
    return data


# ------------------------------------------------------------------------------------------ the example


def test_example_file_applies_cleanly_on_the_demo_seed(engine, tmp_path):
    with session_scope(engine) as session:
        seed_demo(session, data_dir=tmp_path / "data")
    result = apply(engine, EXAMPLE)
    assert result.outcome is ApplyOutcome.CREATED and result.pipeline_name == "chai_ngc253_co43"

    with session_scope(engine) as session:
        pipeline = get_pipeline(session, "chai_ngc253_co43")
        assert pipeline.id == result.pipeline_id
        assert pipeline.processing_location.name == "ramses-processing"
        assert pipeline.trigger_type is TriggerType.CONTINUOUS and pipeline.trigger_config == {}
        assert pipeline.enabled is True and pipeline.priority == 10
        assert len(pipeline.spec_sha256) == 64
        grouping = pipeline.data_grouping
        assert grouping.name == "ngc253-co43-lfa"
        assert (grouping.instrument_module.instrument.name, grouping.instrument_module.name) == (
            "CHAI",
            "LFA",
        )
        assert grouping.filter_rules == [
            {"table": "Source", "column": "name", "operator": "eq", "value": "NGC253"},
            {"table": "ObsUnit", "column": "line_id", "operator": "eq", "value": "CO43"},
        ]
        steps = pipeline.steps
        assert [(s.name, s.position) for s in steps] == [("calibrate", 0), ("baseline", 1), ("grid_map", 2)]
        assert [s.group_by for s in steps] == [["scan"], ["scan"], []]
        assert [s.qa_checks for s in steps] == [
            {},
            {},
            {
                "flagged_scans": {"max": 0.0, "description": "scans noisier than max_rms_k"},
                "rms_k": {"max": 0.2, "description": "off-line rms of the map cube"},
            },
        ]
        assert [s.cooldown_seconds for s in steps] == [60, 60, 86400]
        assert [[u.name for u in s.depends_on] for s in steps] == [[], ["calibrate"], ["baseline"]]
        assert [s.software.name for s in steps] == ["chai-calibration", "chai-baseline", "chai-gridding"]
        assert {(s.version_spec, s.version_policy) for s in steps} == {("1.0.0", VersionPolicy.COMPATIBLE)}
        assert [s.config.name for s in steps] == [
            "chai_ngc253_co43.calibrate",
            "chai_ngc253_co43.baseline",
            "chai_ngc253_co43.grid_map",
        ]
        assert steps[1].config.parameters == {"baseline_order": 1, "line_window_kms": 50}
        assert steps[0].resources == {"cpu": 1, "memory_gb": 2, "time_hours": 1, "gpus": 0}
        assert [s.max_retries for s in steps] == [2, 2, 1]
        versions = [resolve_software_version(session, step=s) for s in steps]
        assert {v.image_ref for v in versions} == {str(REPO / "examples" / "software" / "chai")}
        assert versions[2].entrypoint == ["/usr/bin/python3", "/opt/software/bin/chai_grid_map.py"]

    before = snapshot(engine)
    again = apply(engine, EXAMPLE)
    assert (again.outcome, again.changes, again.pipeline_id) == (
        ApplyOutcome.UNCHANGED,
        (),
        result.pipeline_id,
    )
    assert snapshot(engine) == before  # not even updated_at moved


def test_export_round_trips_to_unchanged(seeded):
    apply(seeded, base_spec())
    with session_scope(seeded) as session:
        exported = export_pipeline(session, "demo_pipe")
    assert exported["grouping"]["instrument_module"] == "CHAI/LFA"
    assert apply(seeded, exported).outcome is ApplyOutcome.UNCHANGED


# ------------------------------------------------------------------------------------------ updates


def test_config_change_makes_a_new_row_and_keeps_the_old(seeded):
    apply(seeded, base_spec())
    with session_scope(seeded) as session:
        old_id = get_pipeline(session, "demo_pipe").steps[0].reduction_step_config_id
    configs = count(seeded, m.ReductionStepConfig)

    result = apply(seeded, changed(base_spec(), steps__0__config={"calibration_mode": "sky"}))
    assert result.outcome is ApplyOutcome.UPDATED
    assert len(result.changes) == 1 and result.changes[0].startswith("step 'calibrate': config #")
    assert count(seeded, m.ReductionStepConfig) == configs + 1
    with session_scope(seeded) as session:
        step = get_pipeline(session, "demo_pipe").steps[0]
        assert step.reduction_step_config_id != old_id
        assert step.config.parameters == {"calibration_mode": "sky"}
        assert session.get(m.ReductionStepConfig, old_id).parameters == {}

    # Back to the first parameters: the old row is reused, no third row.
    assert apply(seeded, base_spec()).outcome is ApplyOutcome.UPDATED
    assert count(seeded, m.ReductionStepConfig) == configs + 1
    with session_scope(seeded) as session:
        assert get_pipeline(session, "demo_pipe").steps[0].reduction_step_config_id == old_id


def test_field_changes_are_listed(seeded):
    apply(seeded, base_spec())
    data = changed(base_spec(), steps__0__cooldown_seconds=120, priority=5, description="new")
    data["steps"][2]["depends_on"] = ["baseline", "calibrate"]
    data["steps"].append(
        {
            "name": "qa",
            "depends_on": ["grid_map"],
            "software": dict(data["steps"][2]["software"]),
            "group_by": [],
        }
    )
    result = apply(seeded, data)
    assert result.outcome is ApplyOutcome.UPDATED
    assert set(result.changes) == {
        "pipeline 'demo_pipe': description '' → 'new'",
        "pipeline 'demo_pipe': priority 0 → 5",
        "step 'calibrate': cooldown_seconds 60 → 120",
        "step 'qa' added",
        "step 'grid_map': depends_on ['baseline'] → ['baseline', 'calibrate']",
    }
    with session_scope(seeded) as session:
        steps = get_pipeline(session, "demo_pipe").steps
        assert [s.name for s in steps] == ["calibrate", "baseline", "grid_map", "qa"]
        assert sorted(u.name for u in steps[2].depends_on) == ["baseline", "calibrate"]
    assert apply(seeded, data).outcome is ApplyOutcome.UNCHANGED


def test_enabled_and_trigger_are_stored(seeded):
    data = changed(base_spec(), enabled=False, trigger={"type": "cron", "cron": "0 12 * * *"})
    apply(seeded, data)
    with session_scope(seeded) as session:
        pipeline = get_pipeline(session, "demo_pipe")
        assert pipeline.enabled is False
        assert pipeline.trigger_type is TriggerType.CRON
        assert pipeline.trigger_config == {"cron": "0 12 * * *", "timezone": "UTC"}


def test_step_without_attempts_is_removed(seeded):
    apply(seeded, base_spec())
    data = base_spec()
    del data["steps"][1]
    data["steps"][1]["depends_on"] = ["calibrate"]
    result = apply(seeded, data)
    assert "step 'baseline' removed" in result.changes
    with session_scope(seeded) as session:
        steps = get_pipeline(session, "demo_pipe").steps
        assert [(s.name, s.position) for s in steps] == [("calibrate", 0), ("grid_map", 1)]
        assert [u.name for u in steps[1].depends_on] == ["calibrate"]
        assert session.scalar(select(func.count()).select_from(m.reduction_step_dependency)) == 1


def test_step_with_attempts_cannot_be_removed(seeded):
    apply(seeded, base_spec())
    with session_scope(seeded) as session:
        step = get_pipeline(session, "demo_pipe").steps[1]
        session.add(
            m.ExecutedReductionStep(
                step=step,
                sub_group_key="all",
                input_fingerprint="f" * 64,
                software_version=resolve_software_version(session, step=step),
                config=step.config,
            )
        )
    before = snapshot(seeded)
    data = base_spec()
    del data["steps"][1]
    data["steps"][1]["depends_on"] = ["calibrate"]
    message = rejected(seeded, data)
    assert "step 'baseline' is missing from the file but has 1 recorded attempt(s)" in message
    assert "keep the step in the file" in message and "pipelines disable demo_pipe" in message
    assert snapshot(seeded) == before


# ------------------------------------------------------------------------------------------ immutability


def test_software_versions_are_immutable(seeded):
    apply(seeded, base_spec())
    before = snapshot(seeded)
    moved = changed(base_spec(), steps__0__software__image_ref="docker://example.org/a:other")
    message = rejected(seeded, moved)
    assert "steps[0].software: software soft-a 1.0.0 is already registered with image_ref" in message
    assert "'docker://example.org/a:1.0.0' (file: 'docker://example.org/a:other')" in message
    assert "Versions are immutable" in message and "new version" in message
    assert snapshot(seeded) == before

    message = rejected(seeded, changed(base_spec(), steps__0__software__entrypoint=["/bin/other"]))
    assert "entrypoint ['/bin/a'] (file: ['/bin/other'])" in message

    bumped = changed(moved, steps__0__software__version="1.0.1")
    result = apply(seeded, bumped)
    assert result.outcome is ApplyOutcome.UPDATED
    assert "software soft-a 1.0.1 registered (docker://example.org/a:other)" in result.changes
    with session_scope(seeded) as session:
        versions = session.scalars(
            select(m.ReductionSoftwareVersion.version)
            .join(m.ReductionSoftware)
            .where(m.ReductionSoftware.name == "soft-a")
            .order_by(m.ReductionSoftwareVersion.version)
        ).all()
        assert versions == ["1.0.0", "1.0.1"]
        assert get_pipeline(session, "demo_pipe").steps[0].version_spec == "1.0.1"


def test_a_file_without_digest_accepts_the_stored_digest(seeded):
    digest = "sha256:" + "a" * 64
    apply(seeded, changed(base_spec(), steps__0__software__image_digest=digest))
    assert apply(seeded, base_spec()).outcome is ApplyOutcome.UNCHANGED
    message = rejected(seeded, changed(base_spec(), steps__0__software__image_digest="sha256:" + "b" * 64))
    assert f"image_digest '{digest}'" in message


def test_two_pipelines_share_a_software_version(seeded):
    apply(seeded, base_spec())
    other = changed(base_spec(), pipeline="other_pipe")
    result = apply(seeded, other)
    assert result.outcome is ApplyOutcome.CREATED
    assert not any("registered" in change for change in result.changes)
    assert count(seeded, m.ReductionSoftwareVersion) == 3


# ------------------------------------------------------------------------------------------ all or nothing


def test_a_bad_third_step_leaves_ops_db_unchanged_on_create(seeded):
    # Register soft-c 1.0.0 with another image through another pipeline; then a new pipeline whose third step
    # declares soft-c 1.0.0 differently must write nothing at all (no grouping, no software, no configs).
    apply(seeded, changed(base_spec(), pipeline="first", steps__2__software__image_ref="docker://elsewhere/c"))
    before = snapshot(seeded)
    data = changed(base_spec(), grouping__name="fresh-grouping")
    data["steps"][0]["software"]["name"] = "brand-new-software"
    message = rejected(seeded, data)
    assert "steps[2].software: software soft-c 1.0.0 is already registered" in message
    assert snapshot(seeded) == before


def test_a_bad_third_step_leaves_ops_db_unchanged_on_update(seeded):
    apply(seeded, base_spec())
    before = snapshot(seeded)
    data = changed(
        base_spec(),
        steps__0__config={"a": 1},
        steps__1__config={"b": 2},
        steps__1__cooldown_seconds=5,
        steps__2__group_by={"preset": "no-such-preset"},
    )
    message = rejected(seeded, data)
    assert "steps[2].group_by.preset: no grouping preset 'no-such-preset'" in message
    assert "per-scan" in message  # the available presets are listed
    assert snapshot(seeded) == before  # not even the built-in presets written on the way


# ------------------------------------------------------------------------------------------ references


def test_processing_location_by_name_or_id_and_errors(seeded):
    with session_scope(seeded) as session:
        ramses = session.scalars(select(m.DataLocation).where(m.DataLocation.name == "ramses-processing")).one()
        ramses_id = ramses.id
    message = rejected(seeded, changed(base_spec(), processing_location="ramses"))
    assert "processing_location: 'ramses' is not a DataLocation" in message
    assert f"processing locations: ramses-processing (id {ramses_id})" in message

    message = rejected(seeded, changed(base_spec(), processing_location="cologne-archive"))
    assert "'cologne-archive' is a long_term_archive location, not a processing location" in message

    message = rejected(seeded, changed(base_spec(), processing_location=9999))
    assert "9999 is not a DataLocation" in message

    result = apply(seeded, changed(base_spec(), processing_location=ramses_id))
    with session_scope(seeded) as session:
        assert session.get(m.Pipeline, result.pipeline_id).processing_location_id == ramses_id


def test_instrument_module_names(seeded):
    message = rejected(seeded, changed(base_spec(), grouping__instrument_module="XFA"))
    assert "grouping.instrument_module: 'XFA' is not an instrument module" in message
    assert "CHAI/HFA, CHAI/LFA, Prime-Cam/PCAM280" in message

    with session_scope(seeded) as session:
        session.add(m.InstrumentModule(name="LFA", instrument=m.Instrument(name="CHAI2")))
    message = rejected(seeded, base_spec())
    assert "'LFA' is ambiguous: write one of CHAI/LFA, CHAI2/LFA" in message

    result = apply(seeded, changed(base_spec(), grouping__instrument_module="CHAI/LFA"))
    with session_scope(seeded) as session:
        module = session.get(m.Pipeline, result.pipeline_id).data_grouping.instrument_module
        assert (module.instrument.name, module.name) == ("CHAI", "LFA")


def test_a_shared_grouping_is_not_changed_behind_another_pipeline(seeded):
    apply(seeded, base_spec())
    other = changed(base_spec(), pipeline="other_pipe")
    other["grouping"]["rules"] = [{"table": "Source", "column": "name", "operator": "eq", "value": "Orion-KL"}]
    message = rejected(seeded, other)
    assert "data grouping 'demo-grouping' is shared with pipeline(s) demo_pipe" in message
    assert "Give this grouping a new name" in message
    # The same rules may be shared; and the owner alone may change its grouping.
    assert apply(seeded, changed(base_spec(), pipeline="other_pipe")).outcome is ApplyOutcome.CREATED
    own = changed(base_spec(), pipeline="third", grouping__name="third-grouping")
    apply(seeded, own)
    own["grouping"]["rules"] = other["grouping"]["rules"]
    assert apply(seeded, own).outcome is ApplyOutcome.UPDATED


def test_presets_are_resolved_and_stored_expanded(seeded):
    with session_scope(seeded) as session:
        save_preset(
            session,
            name="archived-geco",
            filter_rules=[{"table": "ObservingProgram", "column": "short_name", "operator": "eq", "value": "GEco"}],
            group_by=["source"],
        )
    data = changed(base_spec(), grouping__preset="archived-geco")
    data["steps"][0]["group_by"] = {"preset": "per-scan"}
    data["steps"][1]["group_by"] = {"preset": "per-source-line"}
    apply(seeded, data)
    with session_scope(seeded) as session:
        pipeline = get_pipeline(session, "demo_pipe")
        assert [s.group_by for s in pipeline.steps] == [["executed_obs_unit"], ["source", "line"], []]
        assert [r["table"] for r in pipeline.data_grouping.filter_rules] == ["ObservingProgram", "Source"]
    assert apply(seeded, data).outcome is ApplyOutcome.UNCHANGED


def test_fan_in_is_checked_after_resolving_presets(seeded):
    data = base_spec()
    data["steps"][1]["group_by"] = []
    data["steps"][2]["group_by"] = {"preset": "per-scan"}
    message = rejected(seeded, data)
    assert "steps[2].group_by: step 'grid_map' groups by ['executed_obs_unit']" in message
    assert "(after resolving presets)" in message


# ------------------------------------------------------------------------------------------ read, toggle


def test_list_disable_enable(seeded):
    apply(seeded, base_spec())
    apply(seeded, changed(base_spec(), pipeline="another", enabled=False))
    with session_scope(seeded) as session:
        summaries = list_pipelines(session)
        assert [(s.name, s.enabled, s.steps) for s in summaries] == [
            ("another", False, ("calibrate", "baseline", "grid_map")),
            ("demo_pipe", True, ("calibrate", "baseline", "grid_map")),
        ]
        assert summaries[1].processing_location == "ramses-processing"
        assert summaries[1].to_json()["trigger_type"] == "continuous"
        assert disable_pipeline(session, "demo_pipe") is True
        assert disable_pipeline(session, "demo_pipe") is False
        assert enable_pipeline(session, "another") is False
        with pytest.raises(PipelineNotFoundError, match="stored pipelines: another, demo_pipe"):
            disable_pipeline(session, "nope")
    with session_scope(seeded) as session:
        assert [(s.name, s.enabled) for s in list_pipelines(session)] == [
            ("another", True),
            ("demo_pipe", False),
        ]
    # The file is the declared state: applying it again restores enabled: true.
    result = apply(seeded, base_spec())
    assert result.changes == ("pipeline 'demo_pipe': enabled False → True",)


def test_disable_does_not_change_the_definition_hash(seeded):
    apply(seeded, base_spec())
    with session_scope(seeded) as session:
        first = get_pipeline(session, "demo_pipe").spec_sha256
        disable_pipeline(session, "demo_pipe")
    with session_scope(seeded) as session:
        assert get_pipeline(session, "demo_pipe").spec_sha256 == first


# ------------------------------------------------------------------------------------------ versions


def test_version_policies(seeded):
    apply(seeded, base_spec())
    for version in ["1.2.0", "1.3.0-rc.1", "2.0.0"]:
        apply(
            seeded,
            changed(
                base_spec(),
                pipeline=f"v{version.replace('.', '_').replace('-', '_')}",
                steps__0__software__version=version,
                steps__0__software__image_ref=f"docker://example.org/a:{version}",
            ),
        )
    with session_scope(seeded) as session:
        step = get_pipeline(session, "demo_pipe").steps[0]
        versions = session.scalars(
            select(m.ReductionSoftwareVersion).where(
                m.ReductionSoftwareVersion.reduction_software_id == step.reduction_software_id
            )
        ).all()

        def pick(spec: str, policy: VersionPolicy) -> str | None:
            chosen = choose_version(versions, version_spec=spec, policy=policy)
            return chosen.version if chosen else None

        assert pick("1.0.0", VersionPolicy.EXACT) == "1.0.0"
        assert pick("1.0.0", VersionPolicy.COMPATIBLE) == "1.2.0"
        assert pick("1.0.0", VersionPolicy.LATEST) == "2.0.0"
        assert pick("1.3.0-rc.1", VersionPolicy.EXACT) == "1.3.0-rc.1"
        assert pick("1.3.0-rc.1", VersionPolicy.COMPATIBLE) == "1.3.0-rc.1"
        assert pick("2.1.0", VersionPolicy.COMPATIBLE) is None
        assert pick("1.1.0", VersionPolicy.EXACT) is None

        assert resolve_software_version(session, step=step).version == "1.0.0"  # the file said exact
        step.version_policy = VersionPolicy.COMPATIBLE
        assert resolve_software_version(session, step=step).version == "1.2.0"
        step.version_spec = "3.0.0"
        with pytest.raises(SoftwareVersionError, match=r"registered: 1.0.0, 1.2.0, 1.3.0-rc.1, 2.0.0"):
            resolve_software_version(session, step=step)


def test_a_failure_after_the_first_writes_rolls_everything_back(seeded, monkeypatch):
    # Phase 1 finds every problem it can before writing; this forces a failure in the middle of the writes
    # (third step) to show that the caller's transaction, not luck, keeps a file all-or-nothing.
    import ccat_dagster.pipelines.apply as apply_module

    apply(seeded, base_spec())
    before = snapshot(seeded)
    real = apply_module._config_row

    def failing_config_row(session, pipeline, step):
        if step.name == "grid_map":
            raise PipelineApplyError(["simulated failure while writing step grid_map"])
        return real(session, pipeline, step)

    monkeypatch.setattr(apply_module, "_config_row", failing_config_row)
    data = changed(base_spec(), steps__0__config={"x": 1}, steps__1__cooldown_seconds=7, description="changed")
    with pytest.raises(PipelineApplyError, match="simulated failure"):
        apply(seeded, data)
    assert snapshot(seeded) == before
