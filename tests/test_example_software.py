"""The CHAI example reduction software (examples/software/chai) under the container contract.

Three fake scans go through calibrate -> baseline -> grid_map, each program run by Debian's
/usr/bin/python3 with an empty environment apart from the contract's variables, so nothing from the
project venv can leak in. The chain runs twice: natively (the manifest lists host paths and
WORKFLOW_CONFIG_DIR points at it) and inside bubblewrap with the real /workflow mounts and the
software read-only at /opt/software.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
import subprocess
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from ccat_dagster.execution.qa import qa_schema

REPO = Path(__file__).resolve().parents[1]
SOFTWARE_DIR = REPO / "examples" / "software" / "chai"
GENERATOR = SOFTWARE_DIR / "tools" / "make_fake_scan.py"
DEBIAN_PYTHON = Path("/usr/bin/python3")
MANIFEST_SCHEMA = REPO / "ccat_dagster" / "execution" / "manifest.schema.json"
SPEED_OF_LIGHT_KMS = 299_792.458

LINE_VELOCITY_KMS = 10.0
NOISE_K = 0.1
# Three overlapping 5 x 2 rasters: rows y = -10/0, 0/10 and 10/20 arcsec, x = -20 ... 20 arcsec.
SCAN_ROWS_Y0 = (-10.0, 0.0, 10.0)
# Off the map centre and off (0, 0), so a flipped or shifted grid axis moves the peak.
SOURCE_OFFSET_ARCSEC = (10.0, 10.0)


def _debian_science_stack_missing() -> str | None:
    if not DEBIAN_PYTHON.exists():
        return "Debian's /usr/bin/python3 is missing (apt-get install python3)"
    probe = subprocess.run(
        [str(DEBIAN_PYTHON), "-c", "import numpy, astropy, matplotlib"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    if probe.returncode != 0:
        return (
            "Debian's python3-numpy, python3-astropy or python3-matplotlib is missing (apt-get install "
            f"python3-numpy python3-astropy python3-matplotlib): {probe.stderr.strip()[-200:]}"
        )
    return None


_MISSING = _debian_science_stack_missing()
needs_debian_stack = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_float32(path: Path) -> list[float]:
    data = path.read_bytes()
    return list(struct.unpack(f"<{len(data) // 4}f", data))


@dataclass
class Sandbox:
    """One sub-group's host directories, as the orchestrator would lay them out for one attempt."""

    input_dir: Path
    workspace_dir: Path
    output_dir: Path
    config_dir: Path
    logs_dir: Path

    @classmethod
    def create(cls, *, root: Path, input_dir: Path) -> Sandbox:
        sandbox = cls(
            input_dir=input_dir,
            workspace_dir=root / "workspace",
            output_dir=root / "output",
            config_dir=root / "attempt" / "config",
            logs_dir=root / "attempt" / "logs",
        )
        for path in (sandbox.workspace_dir, sandbox.output_dir, sandbox.config_dir, sandbox.logs_dir):
            path.mkdir(parents=True, exist_ok=True)
        return sandbox


@dataclass
class ContractRunner:
    """Runs one program the way a runtime would: native (host paths) or bubblewrap (/workflow paths)."""

    mode: str
    calls: list[list[str]] = field(default_factory=list)

    def container_path(self, *, sandbox: Sandbox, host_path: Path) -> str:
        if self.mode == "native":
            return str(host_path)
        for host_root, container_root in self._mounts(sandbox):
            if host_path == host_root or host_root in host_path.parents:
                return str(Path(container_root) / host_path.relative_to(host_root))
        raise AssertionError(f"{host_path} is under no mount of {sandbox}")

    @staticmethod
    def _mounts(sandbox: Sandbox) -> list[tuple[Path, str]]:
        return [
            (sandbox.input_dir, "/workflow/input"),
            (sandbox.workspace_dir, "/workflow/workspace"),
            (sandbox.output_dir, "/workflow/output"),
            (sandbox.config_dir, "/workflow/config"),
            (sandbox.logs_dir, "/workflow/logs"),
        ]

    def run(
        self,
        *,
        program: str,
        sandbox: Sandbox,
        step: str,
        sub_group_key: str,
        is_final_step: bool,
        config: dict[str, Any],
        inputs: Sequence[tuple[Path, str]] = (),
        upstream: Sequence[tuple[Path, str, str]] = (),
        sha256_override: dict[Path, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``inputs``: (host path, package name); ``upstream``: (host path, step, upstream sub-group key)."""
        overrides = sha256_override or {}

        def where(path: Path) -> str:
            return self.container_path(sandbox=sandbox, host_path=path)

        host_output = sandbox.output_dir if is_final_step else sandbox.workspace_dir / step
        output_env = where(host_output) + "/"
        manifest = {
            "manifest_version": 1,
            "run_id": 1,
            "attempt_id": 1,
            "pipeline": "chai-ngc253-co43",
            "step": step,
            "sub_group_key": sub_group_key,
            "is_final_step": is_final_step,
            "software": {
                "name": "chai",
                "version": "1.0.0",
                "image_ref": "chai-1.0.0.sif",
                "image_digest": None,
            },
            "config": config,
            "inputs": [
                {
                    "path": where(path),
                    "size": path.stat().st_size,
                    "sha256": overrides.get(path, sha256_of(path)),
                    "package_id": f"id-{package}",
                    "package_name": package,
                    "raw_file_id": index + 1,
                }
                for index, (path, package) in enumerate(inputs)
            ],
            "upstream_products": [
                {
                    "path": where(path),
                    "product_type": "intermediate",
                    "sha256": overrides.get(path, sha256_of(path)),
                    "size": path.stat().st_size,
                    "product_id": index + 1,
                    "step": upstream_step,
                    "sub_group_key": upstream_key,
                }
                for index, (path, upstream_step, upstream_key) in enumerate(upstream)
            ],
            "paths": {
                "input": where(sandbox.input_dir),
                "workspace": where(sandbox.workspace_dir),
                "output_dir": output_env,
                "config": where(sandbox.config_dir),
                "logs": where(sandbox.logs_dir),
                "manifest": where(sandbox.config_dir / "manifest.json"),
            },
        }
        if self.mode == "bwrap":
            # With real container paths the manifest must be one the orchestrator could have written.
            jsonschema.validate(manifest, json.loads(MANIFEST_SCHEMA.read_text(encoding="utf-8")))
        (sandbox.config_dir / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if self.mode == "native":
            command = [str(DEBIAN_PYTHON), str(SOFTWARE_DIR / "bin" / program)]
            env = {
                "PATH": "/usr/bin:/bin",
                "HOME": str(sandbox.logs_dir),
                "WORKFLOW_OUTPUT_DIR": output_env,
                "WORKFLOW_CONFIG_DIR": str(sandbox.config_dir),
            }
        else:
            command = [
                "bwrap",
                "--ro-bind", "/usr", "/usr",
                "--ro-bind", "/etc", "/etc",
                "--symlink", "usr/bin", "/bin",
                "--symlink", "usr/lib", "/lib",
                "--symlink", "usr/lib64", "/lib64",
                "--symlink", "usr/sbin", "/sbin",
                "--dev", "/dev",
                "--proc", "/proc",
                "--tmpfs", "/tmp",
                "--dir", "/workflow",
                "--ro-bind", str(SOFTWARE_DIR), "/opt/software",
                "--ro-bind", str(sandbox.input_dir), "/workflow/input",
                "--bind", str(sandbox.workspace_dir), "/workflow/workspace",
                "--bind", str(sandbox.output_dir), "/workflow/output",
                "--ro-bind", str(sandbox.config_dir), "/workflow/config",
                "--bind", str(sandbox.logs_dir), "/workflow/logs",
                "--unshare-all",
                "--die-with-parent",
                "--clearenv",
                "--setenv", "PATH", "/usr/bin:/bin",
                "--setenv", "WORKFLOW_OUTPUT_DIR", output_env,
                str(DEBIAN_PYTHON),
                f"/opt/software/bin/{program}",
            ]  # fmt: skip
            env = {"PATH": "/usr/bin:/bin"}
        self.calls.append(command)
        return subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=300)


def make_scans(*, staged_dir: Path, count: int, extra_arguments: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    truths = []
    for index in range(count):
        package = f"chai_scan_{index:03d}"
        arguments = {
            "--out": str(staged_dir / package),
            "--scan-id": f"scan-{index}",
            "--seed": str(index + 1),
            "--y0-arcsec": str(SCAN_ROWS_Y0[index]),
            "--line-velocity-kms": str(LINE_VELOCITY_KMS),
            "--noise-k": str(NOISE_K),
            "--source-x-arcsec": str(SOURCE_OFFSET_ARCSEC[0]),
            "--source-y-arcsec": str(SOURCE_OFFSET_ARCSEC[1]),
        }
        result = subprocess.run(
            [
                str(DEBIAN_PYTHON),
                str(GENERATOR),
                *(item for pair in arguments.items() for item in pair),
                *extra_arguments,
            ],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin"},
            check=True,
        )
        truth = json.loads(result.stdout)
        truth["package"] = package
        truths.append(truth)
    return truths


def package_inputs(*, staged_dir: Path, package: str) -> list[tuple[Path, str]]:
    return [(path, package) for path in sorted((staged_dir / package).iterdir())]


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@dataclass
class ChainResult:
    truths: list[dict[str, Any]]
    scan_sandboxes: dict[str, Sandbox]
    final: Sandbox
    final_stdout: str
    runner: ContractRunner
    baseline_products: list[tuple[Path, str, str]]


def run_chain(
    *, root: Path, runner: ContractRunner, final_config: dict[str, Any] | None = None, final_key: str = "all"
) -> ChainResult:
    staged = root / "staged"
    truths = make_scans(staged_dir=staged, count=3)
    sandboxes: dict[str, Sandbox] = {}
    for truth in truths:
        key = f"eou-{truth['package']}"
        sandbox = Sandbox.create(root=root / "pipelines" / key, input_dir=staged)
        sandboxes[key] = sandbox
        result = runner.run(
            program="chai_calibrate.py",
            sandbox=sandbox,
            step="calibrate",
            sub_group_key=key,
            is_final_step=False,
            config={"calibration_mode": "hot_cold"},
            inputs=package_inputs(staged_dir=staged, package=truth["package"]),
        )
        assert_ok(result)
        calibrated = sorted((sandbox.workspace_dir / "calibrate").iterdir())
        result = runner.run(
            program="chai_baseline.py",
            sandbox=sandbox,
            step="baseline",
            sub_group_key=key,
            is_final_step=False,
            config={"baseline_order": 1, "line_window_kms": 50},
            upstream=[(path, "calibrate", key) for path in calibrated],
        )
        assert_ok(result)

    # Fan-in: the final step's workspace shows each scan's baseline output under baseline/<scan key>/.
    final = Sandbox.create(root=root / "pipelines" / "all", input_dir=staged)
    baseline_products = []
    for key, sandbox in sandboxes.items():
        target = final.workspace_dir / "baseline" / key
        shutil.copytree(sandbox.workspace_dir / "baseline", target)
        baseline_products += [(path, "baseline", key) for path in sorted(target.iterdir())]
    result = runner.run(
        program="chai_grid_map.py",
        sandbox=final,
        step="grid_map",
        sub_group_key=final_key,
        is_final_step=True,
        config=final_config or {"pixel_arcsec": 10, "max_rms_k": 5},
        upstream=baseline_products,
    )
    assert_ok(result)
    return ChainResult(
        truths=truths,
        scan_sandboxes=sandboxes,
        final=final,
        final_stdout=result.stdout,
        runner=runner,
        baseline_products=baseline_products,
    )


def _bwrap_works() -> str | None:
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    probe = subprocess.run(
        ["bwrap", "--ro-bind", "/", "/", "--unshare-all", "/bin/true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"bubblewrap cannot create a sandbox here: {probe.stderr.strip()[-200:]}"
    return None


@pytest.fixture(
    scope="module",
    params=["native", pytest.param("bwrap", marks=pytest.mark.bwrap)],
)
def chain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChainResult]:
    if _MISSING is not None:
        pytest.skip(_MISSING)
    if request.param == "bwrap" and (reason := _bwrap_works()) is not None:
        pytest.skip(reason)
    yield run_chain(root=tmp_path_factory.mktemp(f"chain-{request.param}"), runner=ContractRunner(mode=request.param))


def inspect_fits(paths: list[Path]) -> list[dict[str, Any]]:
    """Read FITS files with Debian's astropy (the venv has none) and return what the tests check."""
    script = (
        "import json, sys\n"
        "import numpy as np\n"
        "from astropy.io import fits\n"
        "from astropy.wcs import WCS\n"
        "out = []\n"
        "for path in sys.argv[1:]:\n"
        "    with fits.open(path) as hdus:\n"
        "        data, header = hdus[0].data, hdus[0].header\n"
        "        wcs = WCS(header)\n"
        "        index = np.unravel_index(np.nanargmax(data), data.shape)\n"
        "        pixel = [float(i) for i in reversed(index)]\n"
        "        out.append({'shape': list(data.shape), 'bunit': header['BUNIT'],\n"
        "                    'ctype': [header[f'CTYPE{i}'] for i in range(1, header['NAXIS'] + 1)],\n"
        "                    'argmax': [int(i) for i in index],\n"
        "                    'argmax_world': [float(v) for v in wcs.wcs_pix2world([pixel], 0)[0]],\n"
        "                    'n_finite': int(np.isfinite(data).sum()), 'size': int(data.size)})\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [str(DEBIAN_PYTHON), "-c", script, *map(str, paths)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def velocities_kms(header: dict[str, Any]) -> list[float]:
    return [
        SPEED_OF_LIGHT_KMS
        * (1.0 - (header["freq_start_ghz"] + i * header["channel_width_mhz"] / 1000.0) / header["rest_freq_ghz"])
        for i in range(header["n_channels"])
    ]


# ---------------------------------------------------------------------------------------------- full chain


def test_final_products_are_written_in_the_typed_subdirectories(chain: ChainResult) -> None:
    found = sorted(str(path.relative_to(chain.final.output_dir)) for path in chain.final.output_dir.rglob("*"))
    assert found == [
        "logs",
        "logs/all_grid_map.log",
        "plots",
        "plots/all_mom0.png",
        "qa",
        "qa/all_qa.json",
        "science",
        "science/all_cube.fits",
        "science/all_mom0.fits",
        "statistics",
        "statistics/all_stats.json",
    ]
    assert (chain.final.output_dir / "plots" / "all_mom0.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    log = (chain.final.output_dir / "logs" / "all_grid_map.log").read_text()
    assert "[chai_grid_map] done" in log


def test_intermediate_products_are_named_after_the_package(chain: ChainResult) -> None:
    for truth in chain.truths:
        sandbox = chain.scan_sandboxes[f"eou-{truth['package']}"]
        names = sorted(p.name for p in sandbox.workspace_dir.rglob("*") if p.is_file())
        package = truth["package"]
        assert names == [
            f"{package}.base.f32",
            f"{package}.base.json",
            f"{package}.cal.f32",
            f"{package}.cal.json",
        ]
        assert (sandbox.workspace_dir / "calibrate" / f"{package}.cal.json").is_file()
        header = json.loads((sandbox.workspace_dir / "calibrate" / f"{package}.cal.json").read_text())
        assert header["units"] == "K" and header["scan_id"] == truth["scan_id"]
        assert header["package_name"] == package


def test_cube_has_the_gridded_shape_and_an_offset_wcs(chain: ChainResult) -> None:
    cube, mom0 = inspect_fits(
        [
            chain.final.output_dir / "science" / "all_cube.fits",
            chain.final.output_dir / "science" / "all_mom0.fits",
        ]
    )
    # x from -20 to 20 arcsec and y from -10 to 20 arcsec in 10 arcsec pixels: 5 x 4 pixels, all covered.
    assert cube["shape"] == [512, 4, 5]
    assert cube["bunit"] == "K"
    assert cube["ctype"] == ["RA---SIN", "DEC--SIN", "FREQ"]
    assert cube["n_finite"] == cube["size"]
    assert mom0["shape"] == [4, 5]
    assert mom0["bunit"] == "K km/s"
    # Both maps peak at the source: the scan position (make_fake_scan's default, NGC 253) plus its offset.
    ra0, dec0 = 11.888002, -25.288220
    expected = [
        ra0 + SOURCE_OFFSET_ARCSEC[0] / 3600.0 / math.cos(math.radians(dec0)),
        dec0 + SOURCE_OFFSET_ARCSEC[1] / 3600.0,
    ]
    assert mom0["argmax_world"] == pytest.approx(expected, abs=1e-6)
    assert cube["argmax_world"][:2] == pytest.approx(expected, abs=1e-6)


def test_line_peak_is_found_at_the_expected_channel(chain: ChainResult) -> None:
    stats = json.loads((chain.final.output_dir / "statistics" / "all_stats.json").read_text())
    expected_channel = chain.truths[0]["line_channel"]
    assert expected_channel != 256, "the test line must sit off the band centre to tell channels apart"
    # The line is about 31 channels wide (FWHM); noise can move the maximum by a few channels, not more.
    assert abs(stats["peak_channel"] - expected_channel) <= 5
    assert stats["peak_velocity_kms"] == pytest.approx(LINE_VELOCITY_KMS, abs=5 * chain.truths[0]["channel_width_kms"])
    assert stats["peak_offset_arcsec"] == list(SOURCE_OFFSET_ARCSEC)
    assert stats["peak_k"] == pytest.approx(3.0, abs=0.3)
    assert stats["n_scans"] == 3
    assert stats["n_spectra"] == 30
    assert stats["rms_k"] < 2 * NOISE_K


def test_calibration_recovers_the_antenna_temperature(chain: ChainResult) -> None:
    truth = chain.truths[1]
    sandbox = chain.scan_sandboxes[f"eou-{truth['package']}"]
    header = json.loads((sandbox.workspace_dir / "calibrate" / f"{truth['package']}.cal.json").read_text())
    values = read_float32(sandbox.workspace_dir / "calibrate" / f"{truth['package']}.cal.f32")
    n_channels = header["n_channels"]
    velocities = velocities_kms(header)
    off_line = [i for i, v in enumerate(velocities) if abs(v) > 50.0]
    for spectrum, level in enumerate(truth["baseline_level_k"]):
        row = values[spectrum * n_channels : (spectrum + 1) * n_channels]
        off_line_mean = sum(row[i] for i in off_line) / len(off_line)
        # The band is symmetric about the window, so slope and ripple average out: the mean is the level.
        assert off_line_mean == pytest.approx(level, abs=0.05)
        line_channel = truth["line_channel"]
        line_value = sum(row[line_channel - 1 : line_channel + 2]) / 3 - level
        assert line_value == pytest.approx(truth["line_amplitude_k"][spectrum], abs=0.3)


def test_baseline_is_removed_outside_the_line_window(chain: ChainResult) -> None:
    for truth in chain.truths:
        sandbox = chain.scan_sandboxes[f"eou-{truth['package']}"]
        header = json.loads((sandbox.workspace_dir / "baseline" / f"{truth['package']}.base.json").read_text())
        values = read_float32(sandbox.workspace_dir / "baseline" / f"{truth['package']}.base.f32")
        n_channels = header["n_channels"]
        off_line = [i for i, v in enumerate(velocities_kms(header)) if abs(v) > 50.0]
        assert header["n_line_channels"] == n_channels - len(off_line)
        for spectrum in range(header["n_spectra"]):
            row = values[spectrum * n_channels : (spectrum + 1) * n_channels]
            residual = [row[i] for i in off_line]
            mean = sum(residual) / len(residual)
            rms = math.sqrt(sum(v * v for v in residual) / len(residual))
            # Before subtraction the off-line mean is the baseline level, about 2 K.
            assert abs(mean) < 5 * NOISE_K / math.sqrt(len(residual))
            assert rms < 1.5 * NOISE_K
            assert header["rms_k"][spectrum] == pytest.approx(rms, rel=1e-3)


def test_quality_report_lists_every_scan_and_flags_none_at_the_default_limit(chain: ChainResult) -> None:
    qa = json.loads((chain.final.output_dir / "qa" / "all_qa.json").read_text())
    assert [scan["scan_id"] for scan in qa["scans"]] == ["scan-0", "scan-1", "scan-2"]
    assert qa["flagged_scans"] == []
    for scan in qa["scans"]:
        assert scan["median_rms_k"] == pytest.approx(NOISE_K, rel=0.3)
    # The QA contract: the published schema, and the metrics a pipeline's qa_checks name.
    jsonschema.validate(qa, qa_schema())
    metrics = qa["metrics"]
    assert (metrics["flagged_scans"]["value"], metrics["flagged_scans"]["items"]) == (0, [])
    assert metrics["rms_k"]["value"] == pytest.approx(qa_stats_rms(chain)) and metrics["rms_k"]["unit"] == "K"
    assert metrics["max_scan_rms_k"]["value"] == max(scan["median_rms_k"] for scan in qa["scans"])


def qa_stats_rms(chain: ChainResult) -> float:
    return json.loads((chain.final.output_dir / "statistics" / "all_stats.json").read_text())["rms_k"]


def test_every_input_file_gets_a_progress_line(chain: ChainResult) -> None:
    verified = re.findall(r"^\[chai_grid_map\] verified (\S+) ", chain.final_stdout, flags=re.MULTILINE)
    assert len(verified) == len(chain.baseline_products) == 6  # 3 scans x (.base.json + .base.f32)


# ---------------------------------------------------------------------------------------------- failures


@pytest.fixture
def one_scan(tmp_path: Path) -> tuple[Sandbox, list[tuple[Path, str]]]:
    if _MISSING is not None:
        pytest.skip(_MISSING)
    staged = tmp_path / "staged"
    truth = make_scans(staged_dir=staged, count=1)[0]
    sandbox = Sandbox.create(root=tmp_path / "pipelines" / "scan", input_dir=staged)
    return sandbox, package_inputs(staged_dir=staged, package=truth["package"])


def test_corrupt_input_fails_with_exit_2_and_writes_nothing(
    one_scan: tuple[Sandbox, list[tuple[Path, str]]],
) -> None:
    sandbox, inputs = one_scan
    sky = next(path for path, _ in inputs if path.name == "sky.f32")
    manifest_sha256 = sha256_of(sky)
    data = bytearray(sky.read_bytes())
    data[100] ^= 0xFF
    sky.write_bytes(bytes(data))
    result = ContractRunner(mode="native").run(
        program="chai_calibrate.py",
        sandbox=sandbox,
        step="calibrate",
        sub_group_key="scan",
        is_final_step=False,
        config={"calibration_mode": "hot_cold"},
        inputs=inputs,
        sha256_override={sky: manifest_sha256},
    )
    assert result.returncode == 2, result.stderr
    assert "sha256 mismatch" in result.stderr and "sky.f32" in result.stderr
    assert list(sandbox.workspace_dir.iterdir()) == []


def test_bad_upstream_checksum_fails_with_exit_2(one_scan: tuple[Sandbox, list[tuple[Path, str]]]) -> None:
    sandbox, inputs = one_scan
    runner = ContractRunner(mode="native")
    common = {"sandbox": sandbox, "sub_group_key": "scan", "is_final_step": False}
    assert_ok(runner.run(program="chai_calibrate.py", step="calibrate", config={}, inputs=inputs, **common))
    calibrated = sorted((sandbox.workspace_dir / "calibrate").iterdir())
    result = runner.run(
        program="chai_baseline.py",
        step="baseline",
        config={},
        upstream=[(path, "calibrate", "scan") for path in calibrated],
        sha256_override={calibrated[0]: "0" * 64},
        **common,
    )
    assert result.returncode == 2
    assert "sha256 mismatch" in result.stderr
    assert not (sandbox.workspace_dir / "baseline").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"calibration_mode": "sky_hot_cold"}, "calibration_mode='sky_hot_cold' is not supported"),
        ({"calibration_mode": None}, "calibration_mode=None is not supported"),
    ],
)
def test_unknown_calibration_mode_fails_with_exit_2(
    one_scan: tuple[Sandbox, list[tuple[Path, str]]], config: dict[str, Any], message: str
) -> None:
    sandbox, inputs = one_scan
    result = ContractRunner(mode="native").run(
        program="chai_calibrate.py",
        sandbox=sandbox,
        step="calibrate",
        sub_group_key="scan",
        is_final_step=False,
        config=config,
        inputs=inputs,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "hot_cold" in result.stderr
    assert list(sandbox.workspace_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("program", "config", "message"),
    [
        ("chai_baseline.py", {"baseline_order": "2"}, "baseline_order='2' is invalid"),
        ("chai_baseline.py", {"line_window_kms": 10_000}, "too few for a baseline"),
        ("chai_grid_map.py", {"pixel_arcsec": 0}, "pixel_arcsec=0 is invalid"),
    ],
)
def test_bad_parameters_fail_with_exit_2(
    one_scan: tuple[Sandbox, list[tuple[Path, str]]], program: str, config: dict[str, Any], message: str
) -> None:
    sandbox, inputs = one_scan
    runner = ContractRunner(mode="native")
    common = {"sandbox": sandbox, "sub_group_key": "scan", "is_final_step": False}
    assert_ok(runner.run(program="chai_calibrate.py", step="calibrate", config={}, inputs=inputs, **common))
    upstream_step = "calibrate"
    if program == "chai_grid_map.py":
        calibrated = sorted((sandbox.workspace_dir / "calibrate").iterdir())
        upstream = [(path, "calibrate", "scan") for path in calibrated]
        assert_ok(runner.run(program="chai_baseline.py", step="baseline", config={}, upstream=upstream, **common))
        upstream_step = "baseline"
    products = sorted((sandbox.workspace_dir / upstream_step).iterdir())
    result = runner.run(
        program=program,
        step="next",
        config=config,
        upstream=[(path, upstream_step, "scan") for path in products],
        **common,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_dead_channels_become_nan_and_the_other_channels_are_reduced(tmp_path: Path) -> None:
    if _MISSING is not None:
        pytest.skip(_MISSING)
    staged = tmp_path / "staged"
    dead = (3, 4, 400)
    truth = make_scans(staged_dir=staged, count=1, extra_arguments=("--dead-channels", *map(str, dead)))[0]
    sandbox = Sandbox.create(root=tmp_path / "pipelines" / "scan", input_dir=staged)
    runner = ContractRunner(mode="native")
    common = {"sandbox": sandbox, "sub_group_key": "scan", "is_final_step": False}
    inputs = package_inputs(staged_dir=staged, package=truth["package"])
    result = runner.run(program="chai_calibrate.py", step="calibrate", config={}, inputs=inputs, **common)
    assert_ok(result)
    assert "3 channels with hot <= cold set to NaN" in result.stderr
    calibrated = sorted((sandbox.workspace_dir / "calibrate").iterdir())
    upstream = [(path, "calibrate", "scan") for path in calibrated]
    assert_ok(runner.run(program="chai_baseline.py", step="baseline", config={}, upstream=upstream, **common))
    header = json.loads((sandbox.workspace_dir / "baseline" / f"{truth['package']}.base.json").read_text())
    assert header["n_bad_channels"] == 3
    assert all(rms is not None and rms < 1.5 * NOISE_K for rms in header["rms_k"])
    values = read_float32(sandbox.workspace_dir / "baseline" / f"{truth['package']}.base.f32")
    n_channels = header["n_channels"]
    nan_channels = {i % n_channels for i, v in enumerate(values) if math.isnan(v)}
    assert nan_channels == set(dead)

    products = sorted((sandbox.workspace_dir / "baseline").iterdir())
    final = Sandbox.create(root=tmp_path / "pipelines" / "all", input_dir=staged)
    result = runner.run(
        program="chai_grid_map.py",
        sandbox=final,
        step="grid_map",
        sub_group_key="all",
        is_final_step=True,
        config={},
        upstream=[(path, "baseline", "scan") for path in products],
    )
    assert_ok(result)
    (cube,) = inspect_fits([final.output_dir / "science" / "all_cube.fits"])
    assert cube["shape"] == [512, 2, 5]
    assert cube["n_finite"] == cube["size"] - len(dead) * 2 * 5


def test_missing_manifest_fails_with_exit_2(tmp_path: Path) -> None:
    if _MISSING is not None:
        pytest.skip(_MISSING)
    result = subprocess.run(
        [str(DEBIAN_PYTHON), str(SOFTWARE_DIR / "bin" / "chai_calibrate.py")],
        capture_output=True,
        text=True,
        env={
            "PATH": "/usr/bin:/bin",
            "WORKFLOW_CONFIG_DIR": str(tmp_path),
            "WORKFLOW_OUTPUT_DIR": str(tmp_path),
        },
        check=False,
    )
    assert result.returncode == 2
    assert f"cannot read the manifest {tmp_path / 'manifest.json'}" in result.stderr


def test_flagging_threshold_and_file_names_come_from_the_manifest(tmp_path: Path) -> None:
    if _MISSING is not None:
        pytest.skip(_MISSING)
    key = "source=NGC253+line=CO%2843~"
    result = run_chain(
        root=tmp_path, runner=ContractRunner(mode="native"), final_config={"max_rms_k": 0.01}, final_key=key
    )
    qa = json.loads((result.final.output_dir / "qa" / f"{key}_qa.json").read_text())
    assert qa["sub_group_key"] == key
    assert qa["flagged_scans"] == ["scan-0", "scan-1", "scan-2"]
    assert qa["metrics"]["flagged_scans"] == {
        "value": 3,
        "unit": "scans",
        "items": ["scan-0", "scan-1", "scan-2"],
        "description": "scans whose median rms is above max_rms_k 0.01 K (still gridded)",
    }
    assert all("> max_rms_k 0.01" in scan["reason"] for scan in qa["scans"])
    assert (result.final.output_dir / "science" / f"{key}_cube.fits").is_file()


def _load_contract_module() -> types.ModuleType:
    """chai_contract needs only the standard library, so the venv's Python can load it for unit tests.

    Compiled from source rather than imported so no __pycache__ appears in the software directory; registered
    in sys.modules only while it runs, because dataclasses look their module up there.
    """
    path = SOFTWARE_DIR / "bin" / "chai_contract.py"
    module = types.ModuleType("chai_contract_under_test")
    sys.modules[module.__name__] = module
    try:
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module


def test_file_stems_keep_sub_group_key_characters_and_fit_a_file_name() -> None:
    contract = _load_contract_module()
    assert contract.safe_file_stem(name="source=NGC253+line=CO43", what="key") == "source=NGC253+line=CO43"
    assert contract.safe_file_stem(name="a/b c", what="key") == "a_b_c"
    assert contract.safe_file_stem(name="..hidden", what="key") == "hidden"
    long_a, long_b = "x" * 254 + "a", "x" * 254 + "b"
    stem_a = contract.safe_file_stem(name=long_a, what="key")
    stem_b = contract.safe_file_stem(name=long_b, what="key")
    assert len(stem_a) == contract.MAX_STEM_LENGTH and len(f"{stem_a}_grid_map.log") <= 255
    assert stem_a != stem_b
    with pytest.raises(contract.InputRejected, match="gives an empty file name"):
        contract.safe_file_stem(name="..", what="key")


# ---------------------------------------------------------------------------------------------- packaging


def test_version_is_the_same_in_the_version_file_the_code_and_the_definition() -> None:
    version = (SOFTWARE_DIR / "VERSION").read_text().strip()
    assert version == "1.0.0"
    contract = (SOFTWARE_DIR / "bin" / "chai_contract.py").read_text()
    assert f'SOFTWARE_VERSION = "{version}"' in contract
    definition = (SOFTWARE_DIR / "chai.def").read_text()
    assert re.search(rf"^\s*Version\s+{re.escape(version)}\s*$", definition, flags=re.MULTILINE)
    for program in ("chai_calibrate.py", "chai_baseline.py", "chai_grid_map.py"):
        assert (SOFTWARE_DIR / "bin" / program).is_file()
        assert f"/opt/software/bin/{program}" in definition
