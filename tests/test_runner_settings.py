"""The step runner's tolerances and bounds: read from the environment, bounded, and handed to the runner."""

from __future__ import annotations

import pytest

from ccat_dagster.resources.ccat import resources_from_settings
from ccat_dagster.settings import DATA_DIR_VAR, PREFIX, Settings, SettingsError


def test_defaults_reach_the_execution_resource(tmp_path):
    settings = Settings.from_env({DATA_DIR_VAR: str(tmp_path)})
    execution = resources_from_settings(settings, processing_location_id=1)["execution"]
    assert (execution.scheduler_tolerance_seconds, execution.ops_db_tolerance_seconds) == (900.0, 300.0)
    assert (execution.max_memory_gb, execution.max_time_hours, execution.max_products_per_attempt) == (512, 48, 10_000)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("SCHEDULER_TOLERANCE_SECONDS", "86401", "from 0 to 86400"),
        ("OPS_DB_TOLERANCE_SECONDS", "-1", "from 0 to 86400"),
        ("MAX_MEMORY_GB", "9" * 30, "from 1 to 65536"),
        ("MAX_TIME_HOURS", "0", "from 1 to 8760"),
        ("MAX_PRODUCTS_PER_ATTEMPT", "1000001", "from 1 to 1000000"),
        ("MAX_PRODUCTS_PER_ATTEMPT", "lots", "whole number"),
    ],
)
def test_out_of_bounds_values_stop_start_up_naming_the_variable(tmp_path, key, value, expected):
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({DATA_DIR_VAR: str(tmp_path), PREFIX + key: value})
    message = str(raised.value)
    assert message.startswith(f"{PREFIX}{key}=") and expected in message and "\n" not in message
