"""The command line never dumps a traceback for an expected failure: one line on stderr and a documented exit code.

In process (``main(argv)``) where the failure is the same there; the real ``ccat-dagster`` entry point in a
subprocess for what only a process shows: Ctrl-C (SIGINT) and a reader that closed the pipe.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from ccat_dagster import cli_errors
from ccat_dagster.cli import main
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.settings import unknown_variables

CLI = Path(sys.executable).parent / "ccat-dagster"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_main(capsys, monkeypatch, argv: list[str], **env: str) -> tuple[int, list[str], str]:
    for name in [n for n in os.environ if n.startswith("CCAT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(argv)
    out, err = capsys.readouterr()
    return code, err.splitlines(), out


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCAT_")}
    env.update(extra)
    return env


def test_unreachable_ops_db_is_one_line_and_exit_3(capsys, monkeypatch):
    url = f"postgresql://ccat:secret@127.0.0.1:{_free_port()}/opsdb"
    code, err, out = _run_main(capsys, monkeypatch, ["products", "list"], CCAT_OPS_DB_URL=url)
    assert code == cli_errors.EXIT_ENVIRONMENT == 3
    assert len(err) == 1 and out == ""
    assert err[0].startswith("ccat-dagster: error: ops-db at postgresql://ccat:***@127.0.0.1:")
    assert "cannot be reached" in err[0] and "CCAT_OPS_DB_URL" in err[0] and "secret" not in err[0]


def test_ops_db_without_schema_names_db_upgrade(tmp_path, capsys, monkeypatch):
    url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    code, err, _ = _run_main(capsys, monkeypatch, ["lineage", "1"], CCAT_OPS_DB_URL=url)
    assert code == 3 and len(err) == 1
    assert "has no ccat-dagster schema" in err[0] and err[0].endswith("run `ccat-dagster db upgrade`")


@pytest.mark.skipif(os.geteuid() != 0, reason="uses /sys, where only root gets EPERM instead of EACCES")
def test_permission_denied_is_one_line_and_exit_3(sqlite_url, capsys, monkeypatch):
    # /sys refuses new directories even to root: a real PermissionError from the seeding's mkdir.
    code, err, _ = _run_main(
        capsys,
        monkeypatch,
        ["demo", "seed", "--scans", "1"],
        CCAT_OPS_DB_URL=sqlite_url,
        CCAT_DAGSTER_DATA_DIR="/sys/ccat",
    )
    assert code == 3 and len(err) == 1
    assert err[0].startswith("ccat-dagster: error: /sys/ccat: Operation not permitted:")
    assert "CCAT_DAGSTER_DATA_DIR" in err[0]


def test_bad_input_is_one_line_and_exit_2(sqlite_url, capsys, monkeypatch):
    code, err, _ = _run_main(
        capsys, monkeypatch, ["demo", "run", "--pipeline", "no_such_pipeline"], CCAT_OPS_DB_URL=sqlite_url
    )
    assert code == cli_errors.EXIT_BAD_INPUT == 2 and len(err) == 1
    assert "--pipeline no_such_pipeline: no such file and no bundled example" in err[0]
    assert "chai_ngc253_co43" in err[0]  # the names that would work
    code, err, _ = _run_main(
        capsys, monkeypatch, ["db", "current"], CCAT_WORKFLOW_MANAGER_HPC_BACKEND="slurmm", CCAT_OPS_DB_URL=sqlite_url
    )
    assert code == 2 and err == [
        "ccat-dagster: error: CCAT_WORKFLOW_MANAGER_HPC_BACKEND='slurmm' is invalid: allowed values are "
        "local, slurm, kubernetes"
    ]


def test_checked_and_failed_is_exit_1(tmp_path, capsys, monkeypatch):
    code, err, out = _run_main(capsys, monkeypatch, ["db", "current"], CCAT_OPS_DB_URL=f"sqlite:///{tmp_path}/e.db")
    assert code == cli_errors.EXIT_CHECK_FAILED == 1 and err == [] and out.startswith("current: (empty database)")


def test_unknown_variables_get_a_did_you_mean():
    env = {
        "CCAT_WORKFLOW_MANAGER_HPC_BAKEND": "slurm",  # typo under the owned prefix
        "CCAT_WORKFLOW_MANAGER_FROBNICATE": "1",  # unknown, nothing close
        "CCAT_OPS_DB_ULR": "postgresql://x",  # typo of a setting outside the prefix
        "CCAT_UPDATE_DOCS": "1",  # another tool's variable: not reported
        "CCAT_WORKFLOW_MANAGER_HPC_BACKEND": "local",
    }
    assert unknown_variables(env) == [
        ("CCAT_OPS_DB_ULR", "CCAT_OPS_DB_URL"),
        ("CCAT_WORKFLOW_MANAGER_FROBNICATE", None),
        ("CCAT_WORKFLOW_MANAGER_HPC_BAKEND", "CCAT_WORKFLOW_MANAGER_HPC_BACKEND"),
    ]


def test_the_warning_is_one_line_and_the_command_still_runs(tmp_path, capsys, monkeypatch):
    code, err, out = _run_main(
        capsys,
        monkeypatch,
        ["settings"],
        CCAT_WORKFLOW_MANAGER_HPC_BAKEND="slurm",
        CCAT_DAGSTER_DATA_DIR=str(tmp_path),
    )
    assert code == 0 and "CCAT_WORKFLOW_MANAGER_HPC_BACKEND=local" in out
    assert err == [
        "ccat-dagster: warning: CCAT_WORKFLOW_MANAGER_HPC_BAKEND is not a ccat-dagster setting and is ignored: "
        "did you mean CCAT_WORKFLOW_MANAGER_HPC_BACKEND?"
    ]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("ccat-dagster 0.") and "(dagster 1.13." in out


def test_ctrl_c_is_one_line_and_exit_130(sqlite_url, tmp_path):
    """SIGINT to the real entry point in the middle of a long seeding: one line, exit 130, nothing committed."""
    # The warning is printed first thing inside main: once it is on stderr the command is under way.
    env = _clean_env(
        CCAT_OPS_DB_URL=sqlite_url, CCAT_DAGSTER_DATA_DIR=str(tmp_path / "data"), CCAT_WORKFLOW_MANAGER_X="1"
    )
    process = subprocess.Popen(
        [str(CLI), "demo", "seed", "--scans", "100000"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    first = process.stderr.readline()
    assert first.startswith("ccat-dagster: warning: CCAT_WORKFLOW_MANAGER_X")
    time.sleep(0.5)  # into the imports or the seeding itself: both must end the same way
    process.send_signal(signal.SIGINT)
    out, rest = process.communicate(timeout=60)
    assert process.returncode == cli_errors.EXIT_INTERRUPTED == 130
    assert rest.splitlines() == [
        "ccat-dagster: error: interrupted; ops-db keeps what was committed (re-run the command to go on)"
    ]
    assert "Traceback" not in out
    engine = make_engine(sqlite_url)
    with engine.connect() as connection:  # the seeding's one transaction was rolled back
        assert connection.scalar(select(func.count()).select_from(m.ExecutedObsUnit)) == 0
    engine.dispose()


def test_closed_pipe_is_silent_and_exit_141(tmp_path):
    """``ccat-dagster settings | head -0``: the reader is gone before the first write."""
    process = subprocess.Popen(
        [str(CLI), "settings"],
        env=_clean_env(CCAT_DAGSTER_DATA_DIR=str(tmp_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    err = process.stderr.read().decode()
    process.wait(timeout=60)
    assert process.returncode == cli_errors.EXIT_CLOSED_PIPE == 141
    assert err == ""
