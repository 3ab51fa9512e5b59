"""Settings: laptop defaults, and one clear line naming the variable, the value and the allowed values."""

from __future__ import annotations

import re

import pytest

from ccat_dagster.cli import main
from ccat_dagster.settings import Settings, SettingsError, variable_reference


def test_defaults_work_on_a_laptop(tmp_path):
    settings = Settings.from_env({"CCAT_DAGSTER_DATA_DIR": str(tmp_path)})
    assert settings.hpc_backend == "local"
    assert settings.stager == "local"
    assert settings.ops_db_url == f"sqlite:///{tmp_path / 'opsdb.sqlite'}"
    assert settings.pipeline_base_dir == tmp_path / "pipelines"
    assert settings.processing_location_id is None


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("CCAT_WORKFLOW_MANAGER_HPC_BACKEND", "pbs", "allowed values are local, slurm, kubernetes"),
        ("CCAT_WORKFLOW_MANAGER_CONTAINER_RUNTIME", "docker", "allowed values are apptainer, bubblewrap"),
        ("CCAT_WORKFLOW_MANAGER_STAGER", "ftp", "allowed values are local, external"),
        ("CCAT_WORKFLOW_MANAGER_PROCESSING_LOCATION_ID", "ramses", "expected a whole number"),
        ("CCAT_WORKFLOW_MANAGER_MAX_CONCURRENT_JOBS", "0", "expected a whole number from 1 to 100000"),
        ("CCAT_WORKFLOW_MANAGER_WATERMARK_OVERLAP_SECONDS", "9" * 12, "expected a whole number from 0 to 86400"),
        ("CCAT_WORKFLOW_MANAGER_PROCESSING_LOCATION_ID", str(2**31), "expected a whole number from 1 to 2147483647"),
        ("CCAT_OPS_DB_URL", "mysql://u:secret@h/db", "expected a SQLAlchemy URL"),
    ],
)
def test_invalid_values_name_variable_value_and_fix(variable, value, expected):
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({variable: value})
    message = str(raised.value)
    assert variable in message and expected in message
    assert "\n" not in message
    assert "secret" not in message  # a password never reaches a message


def _whole_number_variables() -> list[str]:
    """Every variable whose default is a whole number (or, for two, whose value is one)."""
    names = [name for name, default, _ in variable_reference() if default.lstrip("-").isdigit()]
    return [*names, "CCAT_WORKFLOW_MANAGER_PROCESSING_LOCATION_ID", "CCAT_WORKFLOW_MANAGER_LOCAL_MAX_RUNNING"]


@pytest.mark.parametrize("variable", _whole_number_variables())
def test_every_whole_number_setting_has_a_documented_upper_bound(tmp_path, variable):
    """A value past the bound would otherwise pass start-up and overflow a timedelta, a sleep or an ops-db
    column later (a huge WATERMARK_OVERLAP_SECONDS crashed every sensor tick)."""
    allowed = dict((name, text) for name, _, text in variable_reference())[variable]
    bounds = re.search(r"(-?\d+)–(\d+)$", allowed)
    assert bounds, f"the reference of {variable} does not end with its range: {allowed!r}"
    low, high = int(bounds[1]), int(bounds[2])
    env = {"CCAT_DAGSTER_DATA_DIR": str(tmp_path)}
    Settings.from_env({**env, variable: str(high)})
    for bad in (str(high + 1), str(low - 1), "9" * 5000):
        with pytest.raises(SettingsError) as raised:
            Settings.from_env({**env, variable: bad})
        message = str(raised.value)
        assert message.startswith(f"{variable}=") and f"from {low} to {high}" in message and "\n" not in message
        assert len(message) < 200


def test_cli_stops_with_one_line_on_a_bad_setting(monkeypatch, capsys):
    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_HPC_BACKEND", "Nope")
    assert main(["db", "current"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CCAT_WORKFLOW_MANAGER_HPC_BACKEND='Nope'" in err[0]


def test_redacted_url_hides_the_password():
    settings = Settings.from_env({"CCAT_OPS_DB_URL": "postgresql://ccat:hunter2@db:5432/ops"})
    assert settings.redacted_ops_db_url == "postgresql://ccat:***@db:5432/ops"
