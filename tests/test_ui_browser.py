"""The Dagster UI on the demo, checked in a real browser (headless Debian Chromium driven by Playwright).

The module builds the demo world in a temporary directory exactly as ``scripts/demo`` does (``ccat-dagster db
upgrade``, ``demo seed``, ``demo run``: the pipeline's sensor runs calibrate → baseline → grid_map), starts
``dagster dev`` on a free localhost port against that instance, and checks the real pages against what ops-db
recorded: the asset graph (three steps and the raw-data source), the partitions of the per-scan step (one per
demo sub-group, with readable keys), the map's materialization (product count, HPC job id, data version, the
products table with ops-db's paths and sha256, the moment-0 thumbnail), the map's failed QA asset check (the
demo seeds one scan in poor weather), and a completed run with its materialization metadata. A page that lacks
any of it fails the test.

Screenshots: every page checked is saved under the test's tmp directory and into ``docs/img/`` (used by the docs
and the README) on every run, so the pictures always show what the current code shows; a run that changes one
leaves the file modified in the work tree: look at it and commit it with the change that caused it.

Needs Debian's ``chromium`` (``scripts/setup.sh --with-browser``) and the ``playwright`` Python package (the
``dev`` extra); no browser is downloaded. Without them the test skips, except in CI (``CI`` set): there it
fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select

from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine, session_scope
from ccat_dagster.opsdb.enums import RunStatus

from .dagster_fixtures import require_bwrap_and_numpy

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT_DIR = REPO / "docs" / "img"
PIPELINE = "chai_ngc253_co43"
LOCATION = "ccat_dagster"
CHROMIUM = Path("/usr/bin/chromium")
# As root on a closed network: no sandbox, and none of Chromium's background connections (they are refused).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Generous bounds for a 2-core machine; they only limit how long a broken run hangs.
SERVER_START_SECONDS = 180
PAGE_TIMEOUT_MS = 60_000
STOP_GRACE_SECONDS = 20
VIEWPORT = {"width": 1280, "height": 720}
GRAPH_VIEWPORT = {"width": 1200, "height": 560}
# localStorage keys of the Dagster UI: the one-time "join the community" dialog, the collapsed navigation, the
# run page's step chart without a time axis (the timed one scrolls with the run's duration).
UI_PREFERENCES = "window.localStorage.setItem('communityNux', JSON.stringify('1'));"
UI_PREFERENCES += "window.localStorage.setItem('dagster-nav-collapsed', 'true');"
UI_PREFERENCES += "window.localStorage.setItem('GanttChartModePreference', JSON.stringify('waterfall'));"


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# --------------------------------------------------------------------------------------------- the demo world


@dataclass(frozen=True)
class Attempt:
    sub_group_key: str
    dagster_run_id: str
    hpc_job_id: str
    input_fingerprint: str
    product_count: int
    products: tuple[tuple[str, str], ...] = ()
    """(relative_path, sha256) of each product."""


@dataclass(frozen=True)
class DemoFacts:
    """What ops-db recorded for the demo: the pages must show exactly this."""

    calibrate: list[Attempt]
    baseline: list[Attempt]
    grid_map: Attempt


@dataclass(frozen=True)
class DemoUi:
    base_url: str
    facts: DemoFacts
    artifacts: Path
    server_log: Path


def _environment(data_dir: Path, dagster_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCAT_", "DAGSTER_"))}
    env.update(
        {
            "CCAT_DAGSTER_DATA_DIR": str(data_dir),
            "DAGSTER_HOME": str(dagster_home),
            "CCAT_WORKFLOW_MANAGER_CONTAINER_RUNTIME": "bubblewrap",
            "CCAT_WORKFLOW_MANAGER_POLL_INTERVAL_SECONDS": "1",
        }
    )
    return env


def _ccat(args: list[str], *, env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "ccat_dagster.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(
            f"ccat-dagster {' '.join(args)} failed with exit code {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result.stdout


def _read_facts(ops_db_url: str) -> DemoFacts:
    engine = make_engine(ops_db_url)
    try:
        with session_scope(engine) as session:
            rows = session.execute(
                select(m.ReductionStep.name, m.ExecutedReductionStep, func.count(m.DataProduct.id))
                .join(m.ReductionStep, m.ExecutedReductionStep.reduction_step_id == m.ReductionStep.id)
                .join(m.Pipeline, m.ReductionStep.pipeline_id == m.Pipeline.id)
                .outerjoin(m.DataProduct, m.DataProduct.executed_reduction_step_id == m.ExecutedReductionStep.id)
                .where(m.Pipeline.name == PIPELINE, m.ExecutedReductionStep.status == RunStatus.COMPLETED)
                .group_by(m.ReductionStep.name, m.ExecutedReductionStep.id)
                .order_by(m.ExecutedReductionStep.sub_group_key)
            ).all()
            by_step: dict[str, list[Attempt]] = {}
            for step, attempt, products in rows:
                by_step.setdefault(step, []).append(
                    Attempt(
                        sub_group_key=attempt.sub_group_key,
                        dagster_run_id=attempt.dagster_run_id or "",
                        hpc_job_id=attempt.hpc_job_id or "",
                        input_fingerprint=attempt.input_fingerprint,
                        product_count=products,
                    )
                )
            for attempts in by_step.values():
                for index, attempt in enumerate(attempts):
                    products = session.execute(
                        select(m.DataProduct.relative_path, m.DataProduct.sha256)
                        .join(m.ExecutedReductionStep)
                        .where(m.ExecutedReductionStep.dagster_run_id == attempt.dagster_run_id)
                        .where(m.ExecutedReductionStep.sub_group_key == attempt.sub_group_key)
                        .order_by(m.DataProduct.relative_path)
                    ).all()
                    attempts[index] = dataclasses.replace(attempt, products=tuple(map(tuple, products)))
    finally:
        engine.dispose()
    assert set(by_step) == {"calibrate", "baseline", "grid_map"}, f"completed attempts per step: {by_step}"
    assert len(by_step["calibrate"]) > 1, "the demo should produce several per-scan sub-groups"
    assert len(by_step["grid_map"]) == 1, by_step["grid_map"]
    return DemoFacts(calibrate=by_step["calibrate"], baseline=by_step["baseline"], grid_map=by_step["grid_map"][0])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _default_signals() -> None:
    # The parent may have been started with SIGINT/SIGTERM ignored (CI runners, nohup); an ignored SIGINT is
    # inherited and would make dagster dev deaf to the graceful stop below.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGINT (dagster dev's own shutdown of webserver, daemon and code server), then SIGKILL what is left."""
    pgid = process.pid  # start_new_session: the leader's pid is the group id
    try:
        os.killpg(pgid, signal.SIGINT)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)  # children outlive a leader that exited first
    except ProcessLookupError:
        pass
    process.wait(timeout=STOP_GRACE_SECONDS)


def _graphql(base_url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{base_url}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


LOCATION_QUERY = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def _wait_for_code_location(process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    """Until the webserver answers and the code location is loaded; a load error fails at once."""
    deadline = time.monotonic() + SERVER_START_SECONDS
    last = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"dagster dev exited with code {process.returncode}:\n{_tail(log)}")
        try:
            answer = _graphql(base_url, LOCATION_QUERY)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            last = str(error)
            time.sleep(1)
            continue
        entries = answer.get("data", {}).get("workspaceOrError", {}).get("locationEntries", [])
        entry = next((e for e in entries if e["name"] == LOCATION), None)
        if entry is not None and entry["loadStatus"] == "LOADED":
            loaded = entry["locationOrLoadError"] or {}
            if loaded.get("__typename") == "PythonError":
                pytest.fail(f"code location {LOCATION!r} failed to load in dagster dev: {loaded['message']}")
            return
        last = json.dumps(answer)[:500]
        time.sleep(1)
    pytest.fail(f"dagster dev did not load {LOCATION!r} within {SERVER_START_SECONDS} s ({last}):\n{_tail(log)}")


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@pytest.fixture(scope="module")
def demo_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoUi]:
    if not CHROMIUM.exists():
        _missing(f"needs Debian's chromium at {CHROMIUM}: run scripts/setup.sh --with-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("needs the playwright Python package: .venv/bin/pip install -e '.[dev]'")
    require_bwrap_and_numpy()

    root = tmp_path_factory.mktemp("ui-demo")
    data_dir, dagster_home = root / "data", root / "dagster-home"
    env = _environment(data_dir, dagster_home)
    for command in (["db", "upgrade"], ["demo", "seed"], ["demo", "run"]):
        _ccat(command, env=env, cwd=root)
    facts = _read_facts(f"sqlite:///{data_dir / 'opsdb.sqlite'}")

    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = root / "dagster-dev.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "dagster", "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1"]
            + ["-p", str(port)],
            env=env,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_signals,
        )
    try:
        _wait_for_code_location(process, base_url, log)
        artifacts = root / "screenshots"
        artifacts.mkdir()
        yield DemoUi(base_url=base_url, facts=facts, artifacts=artifacts, server_log=log)
    finally:
        _stop_process_group(process)


@pytest.fixture(scope="module")
def browser(demo_ui: DemoUi):  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=PAGE_TIMEOUT_MS)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, demo_ui: DemoUi, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport=VIEWPORT, base_url=demo_ui.base_url)
    context.add_init_script(UI_PREFERENCES)
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = context.new_page()
    failures_before = request.session.testsfailed
    yield page
    if request.session.testsfailed > failures_before:
        # Keep what the browser saw, next to the server log, for the failure report.
        shot = demo_ui.artifacts / f"FAILED-{request.node.name}.png"
        page.screenshot(path=str(shot))
        print(f"browser screenshot: {shot}\ndagster dev log: {demo_ui.server_log}")
    context.close()


def _save_screenshot(page, demo_ui: DemoUi, name: str) -> Path:  # type: ignore[no-untyped-def]
    """Into the test's artifacts and into docs/img (every run: the docs show what the code shows now)."""
    shot = demo_ui.artifacts / name
    page.screenshot(path=str(shot), animations="disabled")  # a dialog mid-fade would come out translucent
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT_DIR / name)
    return shot


def _section(text: str, start: str, end: str) -> str:
    """The part of a page's text between two headings."""
    _, found, rest = text.partition(start)
    assert found, f"{start!r} not on the page"
    return rest.partition(end)[0]


# --------------------------------------------------------------------------------------------- the pages


def test_asset_graph_shows_the_three_steps_and_the_raw_data_source(page, demo_ui: DemoUi):
    from playwright.sync_api import expect

    page.set_viewport_size(GRAPH_VIEWPORT)
    page.goto(f"/locations/{LOCATION}/asset-groups/{PIPELINE}/lineage")

    expect(page.get_by_text(PIPELINE, exact=True).first).to_be_visible()
    for asset in ("raw_data", "calibrate", "baseline", "grid_map"):
        expect(page.get_by_text(asset, exact=True)).to_be_visible()
    per_scan = len(demo_ui.facts.calibrate)
    # calibrate and baseline: one partition per scan; grid_map: one for everything; all of them materialized
    expect(page.get_by_text(f"{per_scan} partitions", exact=True)).to_have_count(2)
    expect(page.get_by_text("1 partition", exact=True)).to_have_count(1)
    expect(page.get_by_text("100% filled", exact=True)).to_have_count(3)
    expect(page.get_by_text("Postgres", exact=True)).to_be_visible()  # the raw-data source's kind: ops-db
    _save_screenshot(page, demo_ui, "asset-graph.png")

    # The edges of the graph: raw_data → calibrate → baseline → grid_map, as each asset page lists them.
    for asset, upstream, downstream in (
        ("calibrate", "raw_data", "baseline"),
        ("baseline", "calibrate", "grid_map"),
        ("grid_map", "baseline", None),
    ):
        page.goto(f"/assets/{PIPELINE}/{asset}")
        expect(page.get_by_text(f"{PIPELINE} / {upstream}", exact=True).first).to_be_visible()
        text = page.locator("body").inner_text()
        lineage = _section(text, "Upstream assets", "Definition")
        up, _, down = lineage.partition("Downstream assets")
        assert f"{PIPELINE} / {upstream}" in up, lineage
        if downstream is None:
            assert PIPELINE not in down, lineage
        else:
            assert f"{PIPELINE} / {downstream}" in down, lineage


def test_partitions_of_the_per_scan_step_are_the_demo_sub_groups(page, demo_ui: DemoUi):
    from playwright.sync_api import expect

    calibrate = demo_ui.facts.calibrate
    page.goto(f"/assets/{PIPELINE}/calibrate?view=partitions")

    expect(page.get_by_text(f"Materialized ({len(calibrate)})", exact=True)).to_be_visible()
    expect(page.get_by_text("Missing (0)", exact=True)).to_be_visible()
    expect(page.get_by_text("Failed (0)", exact=True)).to_be_visible()
    for attempt in calibrate:
        # Readable keys: scan=<UTC start minute>_<id prefix>.
        assert re.fullmatch(r"scan=\d{8}T\d{4}_[0-9a-f]{8}", attempt.sub_group_key), attempt.sub_group_key
        # The list cuts long keys in the middle (the full key is the entry's title); the date always shows.
        entry = page.get_by_title(attempt.sub_group_key, exact=True)
        expect(entry).to_be_visible()
        assert entry.inner_text().startswith(attempt.sub_group_key[: len("scan=20261001")]), entry.inner_text()

    chosen = calibrate[0]
    page.get_by_title(chosen.sub_group_key, exact=True).click()
    expect(page.get_by_text(chosen.hpc_job_id, exact=True)).to_be_visible()
    expect(_metadata_row(page, "product_count")).to_contain_text(str(chosen.product_count))
    expect(_metadata_row(page, "input_fingerprint")).to_contain_text(chosen.input_fingerprint)
    expect(page.get_by_text(chosen.dagster_run_id[:8], exact=True).first).to_be_visible()
    page.mouse.move(VIEWPORT["width"] - 5, VIEWPORT["height"] - 5)  # no tooltip over the list
    _save_screenshot(page, demo_ui, "partitions.png")


def test_materialization_carries_product_count_job_id_and_data_version(page, demo_ui: DemoUi):
    from playwright.sync_api import expect

    grid_map = demo_ui.facts.grid_map
    page.goto(f"/assets/{PIPELINE}/grid_map?view=partitions&partition={grid_map.sub_group_key}")

    expect(_metadata_row(page, "product_count")).to_contain_text(str(grid_map.product_count))
    expect(_metadata_row(page, "hpc_job_id")).to_contain_text(grid_map.hpc_job_id)
    expect(page.get_by_text(grid_map.dagster_run_id[:8], exact=True).first).to_be_visible()
    # Rounded, unit-labelled figures.
    expect(_metadata_row(page, "cpu_time_s")).to_be_visible()
    assert len(_metadata_row(page, "wall_time_s").inner_text().split()[-1]) <= 8
    # The products table: every product ops-db registered, with its sha256.
    products = _metadata_row(page, "products")
    assert grid_map.products, "the map attempt registered no products"
    for relative_path, sha256 in grid_map.products:
        expect(products.get_by_text(relative_path, exact=True).first).to_be_visible()
        expect(products.get_by_text(sha256, exact=True).first).to_be_attached()
    # The moment-0 thumbnail, embedded as a data URI (markdown metadata opens in a dialog).
    _metadata_row(page, "preview").get_by_text("[Show Markdown]", exact=True).click()
    thumbnail = page.get_by_role("dialog").locator('img[src^="data:image/png;base64,"]').first
    expect(thumbnail).to_be_visible()
    box = thumbnail.bounding_box()
    assert box is not None and 0 < box["width"] <= 320 and 0 < box["height"] <= 240, box
    expect(page.get_by_text("plots/all_mom0.png", exact=True).first).to_be_visible()
    _save_screenshot(page, demo_ui, "materialization-preview.png")
    page.get_by_role("dialog").get_by_role("button", name="Close").click()
    expect(page.get_by_role("dialog")).to_have_count(0)
    page.get_by_text("Show tags", exact=False).first.click()
    expect(_metadata_row(page, "data_version")).to_contain_text(grid_map.input_fingerprint)
    products.scroll_into_view_if_needed()
    _save_screenshot(page, demo_ui, "materialization.png")


def test_the_map_s_qa_checks_show_the_flagged_scan_as_a_failed_check(page, demo_ui: DemoUi):
    from playwright.sync_api import expect

    page.goto(f"/assets/{PIPELINE}/grid_map?view=checks")
    expect(page.get_by_text("Checks (2)", exact=True)).to_be_visible()
    # The check list: each check with the status of its latest evaluation; the first one is shown.
    expect(page.get_by_text("qa_rms_k", exact=True).first).to_be_visible()
    text = page.locator("body").inner_text()
    assert re.search(r"qa_flagged_scans\s+Failed", text), text[:2000]
    assert re.search(r"qa_rms_k\s+Succeeded", text), text[:2000]
    # The evaluation says why: the value, the limit and the flagged scan's package; on the map's partition.
    expect(
        page.get_by_text("flagged_scans = 1 scans is above the limit (≤ 0 scans): chai-lfa-", exact=False)
    ).to_be_visible()
    expect(_metadata_row(page, "qa_file")).to_contain_text("qa/all_qa.json")
    expect(_metadata_row(page, "limit")).to_contain_text("≤ 0 scans")
    page.mouse.move(VIEWPORT["width"] - 5, VIEWPORT["height"] - 5)
    _save_screenshot(page, demo_ui, "asset-check.png")


def test_completed_run_shows_its_materialization_metadata(page, demo_ui: DemoUi):
    from playwright.sync_api import expect

    grid_map = demo_ui.facts.grid_map
    page.goto("/runs")
    run_link = page.locator(f'a[href="/runs/{grid_map.dagster_run_id}"]').first  # the run list's id column
    expect(run_link).to_have_text(grid_map.dagster_run_id[:8])
    run_link.click()

    expect(page).to_have_url(f"{demo_ui.base_url}/runs/{grid_map.dagster_run_id}")
    expect(page.get_by_text("RUN_SUCCESS", exact=True)).to_be_visible()
    expect(page.get_by_text(f"partition: {grid_map.sub_group_key}", exact=True)).to_be_visible()
    # The event log, filtered to the materialization: one event, with the metadata ops-db has for the attempt.
    page.get_by_placeholder("Filter…").fill("type:ASSET_MATERIALIZATION")
    expect(page.get_by_text("RUN_SUCCESS", exact=True)).to_have_count(0)
    expect(page.get_by_text("ASSET_MATERIALIZATION", exact=True)).to_have_count(1)
    expect(_metadata_row(page, "product_count")).to_contain_text(str(grid_map.product_count))
    page.mouse.move(VIEWPORT["width"] - 5, VIEWPORT["height"] - 5)
    _save_screenshot(page, demo_ui, "run.png")

    page.get_by_text("View full message", exact=True).first.click()
    message = page.get_by_role("dialog")
    expect(message.get_by_text("ASSET_MATERIALIZATION", exact=True)).to_be_visible()
    expect(_metadata_row(page, "partition", within=message)).to_contain_text(grid_map.sub_group_key)
    expect(_metadata_row(page, "product_count", within=message)).to_contain_text(str(grid_map.product_count))
    expect(_metadata_row(page, "hpc_job_id", within=message)).to_contain_text(grid_map.hpc_job_id)
    expect(_metadata_row(page, "input_fingerprint", within=message)).to_contain_text(grid_map.input_fingerprint)
    _save_screenshot(page, demo_ui, "run-materialization.png")


def _metadata_row(page, key: str, *, within=None):  # type: ignore[no-untyped-def]
    """The table row of a metadata (or tag) key: the Dagster UI renders both as two-column tables."""
    return (within or page).locator("tr", has=page.get_by_text(key, exact=True)).first
