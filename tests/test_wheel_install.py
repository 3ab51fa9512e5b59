"""The built wheel is self-contained: installed into a fresh venv it runs ``db upgrade``, ``demo seed`` and
``demo run`` from a directory that is not the checkout, with no variables set, and the demo stays quiet.

Kept cheap: the wheel is built without build isolation from a copy of the sources, installed with
``--no-deps`` into a venv without pip, and the dependencies come from the project venv's site-packages
through a ``.pth`` line (the resolved set ``constraints.txt`` pins). ``ccat_dagster`` itself, the examples
and every data file come from the wheel only: the checkout is not on the venv's path (the project venv's
editable-install hooks are ``.pth`` files, which Python reads only in site directories), and the demo's
stored software path must lie inside the fresh venv.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from sqlalchemy import select

from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine, session_scope

from .dagster_fixtures import REPO, require_bwrap_and_numpy

pytestmark = pytest.mark.slow
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "ccat_dagster", "examples")


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, working directory, outputs of db upgrade / demo seed / demo run)."""
    require_bwrap_and_numpy()
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(REPO / name, source / name)
    build = _run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), str(source)]
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert not re.search(r"deprecat|BuildBackendWarning", build.stdout + build.stderr, re.IGNORECASE)
    (wheel,) = (tmp / "dist").glob("ccat_dagster-*.whl")

    venv = tmp / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)]).returncode == 0
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)])
    assert install.returncode == 0, install.stdout + install.stderr

    work = tmp / "work"  # not the checkout: nothing may be found relative to the current directory but .data
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCAT_", "DAGSTER_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}/usr/local/bin:/usr/bin:/bin"
    cli = str(venv / "bin" / "ccat-dagster")
    outputs = {}
    for name, command in {
        "upgrade": [cli, "db", "upgrade"],
        "seed": [cli, "demo", "seed", "--scans", "2"],
        "run": [cli, "demo", "run"],
    }.items():
        outputs[name] = _run(command, cwd=work, env=env)
    return venv, work, outputs


def test_the_installed_wheel_runs_the_demo(installed):
    venv, work, outputs = installed
    for name, result in outputs.items():
        assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr}"
    assert "is at revision" in outputs["upgrade"].stdout
    assert outputs["seed"].stdout.splitlines()[-1].startswith("demo observatory: 2 scans")
    # The example software the demo ran is the wheel's copy, not the checkout's.
    engine = make_engine(f"sqlite:///{work / '.data' / 'opsdb.sqlite'}")
    with session_scope(engine) as session:
        refs = set(session.scalars(select(m.ReductionSoftwareVersion.image_ref)))
        completed = session.scalars(select(m.ExecutedReductionStep.status)).all()
    engine.dispose()
    assert refs and all(
        ref.startswith(str(venv)) and ref.endswith("ccat_dagster/examples/software/chai") for ref in refs
    )
    assert len(completed) == 5 and {s.value for s in completed} == {"completed"}  # 2 + 2 scans, 1 map


def test_the_demo_is_quiet_and_ends_with_products_lineage_and_the_ui(installed):
    _venv, _work, outputs = installed
    run = outputs["run"]
    lines = (run.stdout + run.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert run.stderr == ""
    assert not [line for line in lines if re.search(r"DEBUG|INFO|Warning|WARNING|Traceback", line)], "\n".join(lines)
    state_lines = [line for line in lines if re.match(r"  run [0-9a-f]{8} ", line)]
    assert [line.rsplit(": ", 1)[1].split(" in ")[0] for line in state_lines] == ["started", "success"] * 3
    assert sum(1 for line in lines if re.search(r"━.* \d+/\d+ ", line)) == 3  # one progress bar per run
    assert any(line.startswith("final products of chai_ngc253_co43/grid_map (6;") for line in lines)
    assert any(line.startswith("  from 2 scan(s) (") for line in lines)
    assert lines[-1].startswith("open the UI: DAGSTER_HOME=") and lines[-1].endswith(
        "dagster dev -m ccat_dagster.definitions"
    )
    seed = outputs["seed"].stdout.splitlines()
    assert len(seed) == 2 and "2/2" in seed[0]  # the seeding's progress bar, then its summary
