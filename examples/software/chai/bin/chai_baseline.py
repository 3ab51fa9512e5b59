"""CHAI step `baseline` (one run per scan): polynomial baseline subtraction outside the line window.

Entrypoint: ``/usr/bin/python3 /opt/software/bin/chai_baseline.py`` (no arguments).
Reads:  manifest ``upstream_products`` ``<name>.cal.json`` + ``<name>.cal.f32`` (the calibrate step's).
Config: ``baseline_order`` (int 0-10, default 1), ``line_window_kms`` (default 50: channels within
        this many km/s of the line centre are excluded from the fit), ``line_center_kms`` (default 0,
        radio velocity relative to the rest frequency).
Writes: ``$WORKFLOW_OUTPUT_DIR/<name>.base.f32`` (float32 K) and ``<name>.base.json`` (the calibrated
        header plus ``rms_k``, the off-line rms of each spectrum after subtraction).
"""

from __future__ import annotations

import sys

# The software directory is mounted read-only in the container; do not try to write bytecode there.
sys.dont_write_bytecode = True

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from chai_contract import (  # noqa: E402
    SOFTWARE_VERSION,
    ConfigError,
    DataFormatError,
    Progress,
    config_float,
    config_int,
    config_positive_float,
    finite_or_none,
    load_manifest,
    output_dir,
    run_program,
    safe_file_stem,
    verify_checksums,
    warn_unknown_config,
    write_bytes,
    write_json,
)
from chai_spectral import (  # noqa: E402
    ProductPair,
    find_product_pairs,
    float32_bytes,
    line_mask,
    read_product,
    spectral_axis,
)

PROGRAM = "chai_baseline"
CONFIG_KEYS = ("baseline_order", "line_window_kms", "line_center_kms")


def subtract_baselines(
    *, spectra: np.ndarray, fit_channels: np.ndarray, order: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fit and subtract a polynomial per spectrum using ``fit_channels``; returns (residuals, rms).

    A spectrum with fewer finite fit channels than order + 2 cannot give a fit and an rms, so it
    becomes NaN.
    """
    n_channels = spectra.shape[1]
    # Channel numbers scaled to [-1, 1] keep the least-squares problem well conditioned at any order.
    x = np.linspace(-1.0, 1.0, n_channels)
    residuals = np.full(spectra.shape, np.nan)
    rms = np.full(spectra.shape[0], np.nan)
    for index, spectrum in enumerate(spectra):
        use = fit_channels & np.isfinite(spectrum)
        if np.count_nonzero(use) < order + 2:
            continue
        coefficients = np.polynomial.polynomial.polyfit(x[use], spectrum[use], order)
        residual = spectrum - np.polynomial.polynomial.polyval(x, coefficients)
        residuals[index] = residual
        rms[index] = float(np.sqrt(np.mean(residual[use] ** 2)))
    return residuals, rms


def baseline_product(
    *, pair: ProductPair, out_dir: Path, order: int, window_kms: float, center_kms: float, progress: Progress
) -> None:
    header, spectra = read_product(pair=pair)
    axis = spectral_axis(header=header)
    in_line = line_mask(axis=axis, center_kms=center_kms, half_width_kms=window_kms)
    if np.count_nonzero(~in_line) < order + 2:
        raise ConfigError(
            f"{pair.header.path}: only {np.count_nonzero(~in_line)} of {axis.n_channels} channels lie "
            f"outside line_window_kms={window_kms} around {center_kms} km/s, too few for a baseline of order "
            f"{order}; reduce line_window_kms or baseline_order"
        )
    residuals, rms = subtract_baselines(spectra=spectra, fit_channels=~in_line, order=order)
    unfitted = int(np.count_nonzero(~np.isfinite(rms)))
    if unfitted == len(rms):
        raise DataFormatError(f"{pair.data.path}: no spectrum has enough finite channels for a baseline fit")
    if unfitted:
        progress.warn(f"{pair.name}: {unfitted} spectra without enough finite channels set to NaN")

    stem = safe_file_stem(name=pair.name, what="upstream product name")
    data_path = out_dir / f"{stem}.base.f32"
    document = dict(header)
    document.update(
        units="K",
        baseline_order=order,
        line_window_kms=window_kms,
        line_center_kms=center_kms,
        n_line_channels=int(np.count_nonzero(in_line)),
        rms_k=[finite_or_none(value) for value in rms],
        data_file=data_path.name,
        dtype="<f4",
        shape=list(residuals.shape),
        software={"program": PROGRAM, "version": SOFTWARE_VERSION},
    )
    write_bytes(path=data_path, data=float32_bytes(residuals), progress=progress)
    write_json(path=out_dir / f"{stem}.base.json", document=document, progress=progress)
    progress.say(f"{pair.name}: median off-line rms {np.nanmedian(rms):.4f} K over {len(rms)} spectra")


def main() -> None:
    progress = Progress(program=PROGRAM)
    manifest = load_manifest()
    progress.say(f"step {manifest.step!r}, sub-group {manifest.sub_group_key!r}, version {SOFTWARE_VERSION}")
    order = config_int(config=manifest.config, key="baseline_order", default=1, minimum=0, maximum=10)
    window_kms = config_positive_float(config=manifest.config, key="line_window_kms", default=50.0)
    center_kms = config_float(config=manifest.config, key="line_center_kms", default=0.0)
    warn_unknown_config(config=manifest.config, known=CONFIG_KEYS, progress=progress)
    pairs = find_product_pairs(
        products=manifest.upstream_products,
        header_suffix=".cal.json",
        data_suffix=".cal.f32",
        producer="calibrate",
    )
    out_dir = output_dir(manifest=manifest)
    verify_checksums(files=[*manifest.inputs, *manifest.upstream_products], progress=progress)
    for pair in pairs:
        baseline_product(
            pair=pair,
            out_dir=out_dir,
            order=order,
            window_kms=window_kms,
            center_kms=center_kms,
            progress=progress,
        )
    progress.say("done")


if __name__ == "__main__":
    run_program(program=PROGRAM, main=main)
