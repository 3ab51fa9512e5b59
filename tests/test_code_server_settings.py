"""A code server started with an invalid setting exits (code 2, one line naming the setting) instead of serving a
load error: Dagster's own gRPC server for the code location, and ``ccat-dagster code-server``, which checks the
settings before it becomes ``dagster code-server start``. Real processes, no ops-db needed: settings come first."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ccat_dagster import cli

BAD = "CCAT_WORKFLOW_MANAGER_WATERMARK_OVERLAP_SECONDS"
BAD_VALUE = "99999999999"
EXPECTED = f"{BAD}='{BAD_VALUE}' is invalid: expected a whole number from 0 to 86400"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CCAT_", "DAGSTER_"))}
    env.update({"CCAT_DAGSTER_DATA_DIR": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path / "home"), **extra})
    (tmp_path / "home").mkdir(exist_ok=True)
    return env


def _stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_dagster_grpc_server_of_the_code_location_exits_on_an_invalid_setting(tmp_path):
    """What ``dagster code-server start`` runs for each (re)load, and what the webserver runs for workspace.yaml."""
    result = subprocess.run(
        [str(BIN / "dagster"), "api", "grpc", "-m", "ccat_dagster.definitions", "-a", "defs"]
        + ["--host", "127.0.0.1", "--port", str(_free_port())],
        env=_environment(tmp_path, **{BAD: BAD_VALUE}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert _stderr_lines(result) == [f"ccat-dagster code location: {EXPECTED}"]


def test_ccat_dagster_code_server_exits_before_any_server_starts(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ccat_dagster.cli", "code-server", "--port", str(_free_port())],
        env=_environment(tmp_path, **{BAD: BAD_VALUE}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert _stderr_lines(result) == [f"ccat-dagster: error: {EXPECTED}"]


def test_with_valid_settings_it_becomes_dagsters_code_server_for_this_location(tmp_path, monkeypatch):
    for key, value in _environment(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(BAD, raising=False)
    replaced: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: replaced.append((path, argv)))
    assert cli.main(["code-server", "--host", "0.0.0.0", "--port", "4001", "--log-format", "json"]) == 0
    assert replaced == [
        (
            sys.executable,
            [sys.executable, "-m", "dagster", "code-server", "start"]
            + ["--module-name", "ccat_dagster.definitions", "--attribute", "defs", "--location-name", "ccat_dagster"]
            + ["--host", "0.0.0.0", "--port", "4001", "--log-format", "json"],
        )
    ]


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_a_bad_port_is_refused_by_the_command(port, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["code-server", "--port", port])
    assert raised.value.code == 2 and "is not a TCP port" in capsys.readouterr().err
