"""CHAI step `calibrate` (one run per scan): hot/cold chopper-wheel calibration of raw counts to K.

Entrypoint: ``/usr/bin/python3 /opt/software/bin/chai_calibrate.py`` (no arguments).
Reads:  manifest ``inputs`` (per package: scan.json, sky.f32, hot.f32, cold.f32).
Config: ``calibration_mode`` = "hot_cold" (the default and the only mode).
Writes: ``$WORKFLOW_OUTPUT_DIR/<package_name>.cal.f32`` (float32 K, n_spectra x n_channels) and
        ``<package_name>.cal.json`` (scan.json's keys plus units "K").

T = t_cold + (sky - cold) / (hot - cold) * (t_hot - t_cold), channel by channel; channels where
hot <= cold (dead or saturated) become NaN and are counted in ``n_bad_channels``.
"""

from __future__ import annotations

import sys

# The software directory is mounted read-only in the container; do not try to write bytecode there.
sys.dont_write_bytecode = True

from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from chai_contract import (  # noqa: E402
    SOFTWARE_VERSION,
    DataFormatError,
    InputFile,
    Progress,
    config_choice,
    load_manifest,
    output_dir,
    read_json_object,
    run_program,
    safe_file_stem,
    verify_checksums,
    warn_unknown_config,
    write_bytes,
    write_json,
)
from chai_spectral import float32_bytes, read_float32, validate_scan_header  # noqa: E402

PROGRAM = "chai_calibrate"
CONFIG_KEYS = ("calibration_mode",)
PACKAGE_FILES = ("scan.json", "sky.f32", "hot.f32", "cold.f32")


def hot_cold_calibrate(
    *, sky: np.ndarray, hot: np.ndarray, cold: np.ndarray, t_hot_k: float, t_cold_k: float
) -> np.ndarray:
    """Counts to antenna temperature; NaN where the load difference is not positive."""
    difference = hot - cold
    usable = np.isfinite(difference) & (difference > 0)
    safe_difference = np.where(usable, difference, 1.0)
    temperature = t_cold_k + (sky - cold) / safe_difference * (t_hot_k - t_cold_k)
    return np.where(usable, temperature, np.nan)


def _package_files(*, inputs: tuple[InputFile, ...]) -> dict[str, dict[str, InputFile]]:
    """Group the manifest's inputs by package and index each package's files by name."""
    packages: dict[str, dict[str, InputFile]] = defaultdict(dict)
    for item in inputs:
        name = item.path.name
        if name in packages[item.package_name]:
            raise DataFormatError(
                f"package {item.package_name!r} lists two files named {name!r} "
                f"({packages[item.package_name][name].path} and {item.path}); expected one of each"
            )
        packages[item.package_name][name] = item
    return packages


def calibrate_package(
    *, package_name: str, files: dict[str, InputFile], out_dir: Path, mode: str, progress: Progress
) -> None:
    missing = [name for name in PACKAGE_FILES if name not in files]
    if missing:
        raise DataFormatError(
            f"package {package_name!r} lacks {', '.join(missing)} in the manifest's inputs; a CHAI scan "
            f"package needs {', '.join(PACKAGE_FILES)}"
        )
    header_path = files["scan.json"].path
    header = validate_scan_header(header=read_json_object(path=header_path), source=header_path)
    n_spectra, n_channels = header["n_spectra"], header["n_channels"]
    sky = read_float32(path=files["sky.f32"].path, shape=(n_spectra, n_channels))
    hot = read_float32(path=files["hot.f32"].path, shape=(n_channels,))
    cold = read_float32(path=files["cold.f32"].path, shape=(n_channels,))

    temperature = hot_cold_calibrate(
        sky=sky, hot=hot, cold=cold, t_hot_k=float(header["t_hot_k"]), t_cold_k=float(header["t_cold_k"])
    )
    bad_channels = int(np.count_nonzero(~np.isfinite(hot - cold) | (hot - cold <= 0)))
    if bad_channels == n_channels:
        raise DataFormatError(
            f"package {package_name!r}: hot <= cold in every channel, so no channel can be calibrated; "
            "check hot.f32 and cold.f32"
        )
    if bad_channels:
        progress.warn(f"package {package_name!r}: {bad_channels} channels with hot <= cold set to NaN")

    stem = safe_file_stem(name=package_name, what="package_name")
    data_path = out_dir / f"{stem}.cal.f32"
    document = dict(header)
    document.update(
        units="K",
        package_name=package_name,
        package_id=files["scan.json"].package_id,
        calibration_mode=mode,
        n_bad_channels=bad_channels,
        data_file=data_path.name,
        dtype="<f4",
        shape=[n_spectra, n_channels],
        software={"program": PROGRAM, "version": SOFTWARE_VERSION},
    )
    write_bytes(path=data_path, data=float32_bytes(temperature), progress=progress)
    write_json(path=out_dir / f"{stem}.cal.json", document=document, progress=progress)


def main() -> None:
    progress = Progress(program=PROGRAM)
    manifest = load_manifest()
    progress.say(f"step {manifest.step!r}, sub-group {manifest.sub_group_key!r}, version {SOFTWARE_VERSION}")
    mode = config_choice(
        config=manifest.config, key="calibration_mode", allowed=("hot_cold",), default="hot_cold"
    )
    warn_unknown_config(config=manifest.config, known=CONFIG_KEYS, progress=progress)
    if not manifest.inputs:
        raise DataFormatError("the manifest lists no inputs; the calibrate step needs a CHAI scan package")
    out_dir = output_dir(manifest=manifest)
    verify_checksums(files=manifest.inputs, progress=progress)
    for package_name, files in sorted(_package_files(inputs=manifest.inputs).items()):
        calibrate_package(
            package_name=package_name, files=files, out_dir=out_dir, mode=mode, progress=progress
        )
    progress.say("done")


if __name__ == "__main__":
    run_program(program=PROGRAM, main=main)
