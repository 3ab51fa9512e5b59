"""Write one fake CHAI scan package (scan.json, sky.f32, hot.f32, cold.f32) for tests and demos.

    /usr/bin/python3 make_fake_scan.py --out DIR --scan-id SCAN [options]

The sky is, per spectrum, a Gaussian line whose peak follows a Gaussian source (centred on offset 0,0
unless --source-x-arcsec / --source-y-arcsec say otherwise), plus a baseline (offset, slope and a slow
ripple, different per spectrum) plus Gaussian noise, all in K.
Counts are ``gain * (T + T_rx)`` with a channel-dependent gain; the loads give ``gain * (t_hot + T_rx)``
and ``gain * (t_cold + T_rx)``, so hot/cold calibration recovers T exactly apart from the noise.

Prints a JSON object with the truth a test needs (line channel, noise, baseline values) to stdout.
Only the package files are written to --out; the truth is not part of the package.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SPEED_OF_LIGHT_KMS = 299_792.458
T_HOT_K = 290.0
T_COLD_K = 77.0


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="package directory to create")
    parser.add_argument("--scan-id", required=True)
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    parser.add_argument("--source", default="NGC253")
    parser.add_argument("--line", default="CO43")
    parser.add_argument("--instrument-module", default="CHAI")
    parser.add_argument("--n-channels", type=int, default=512)
    parser.add_argument("--rest-freq-ghz", type=float, default=461.040768)
    parser.add_argument("--channel-width-mhz", type=float, default=1.0)
    parser.add_argument(
        "--rest-channel",
        type=float,
        default=None,
        help="channel at the rest frequency (default n_channels/2)",
    )
    parser.add_argument("--raster-cols", type=int, default=5, help="spectra per raster row")
    parser.add_argument("--raster-rows", type=int, default=2)
    parser.add_argument("--spacing-arcsec", type=float, default=10.0)
    parser.add_argument("--x0-arcsec", type=float, default=-20.0, help="x offset of the first column")
    parser.add_argument("--y0-arcsec", type=float, default=0.0, help="y offset of the first row")
    parser.add_argument("--line-peak-k", type=float, default=3.0, help="line peak at offset (0, 0)")
    parser.add_argument("--line-velocity-kms", type=float, default=0.0)
    parser.add_argument("--line-fwhm-kms", type=float, default=20.0)
    parser.add_argument("--source-fwhm-arcsec", type=float, default=40.0)
    parser.add_argument("--source-x-arcsec", type=float, default=0.0, help="offset of the source centre")
    parser.add_argument("--source-y-arcsec", type=float, default=0.0)
    parser.add_argument("--noise-k", type=float, default=0.1)
    parser.add_argument("--baseline-offset-k", type=float, default=2.0, help="mean baseline level")
    parser.add_argument("--baseline-slope-k", type=float, default=1.0, help="baseline change across the band")
    parser.add_argument(
        "--ripple-k", type=float, default=0.02, help="amplitude of a slow standing-wave ripple"
    )
    parser.add_argument("--t-rx-k", type=float, default=150.0, help="receiver temperature")
    parser.add_argument(
        "--dead-channels",
        type=int,
        nargs="*",
        default=[],
        help="channels whose hot and cold loads read the same (a dead channel that calibrates to NaN)",
    )
    parser.add_argument("--obs-start", default="2026-01-15T03:00:00+00:00")
    parser.add_argument("--ra-deg", type=float, default=11.888002, help="ICRS RA of offset (0, 0) (NGC 253)")
    parser.add_argument("--dec-deg", type=float, default=-25.288220, help="ICRS Dec of offset (0, 0)")
    return parser.parse_args(argv)


def make_scan(arguments: argparse.Namespace) -> dict:
    rng = np.random.default_rng(arguments.seed)
    n_channels = arguments.n_channels
    rest_channel = n_channels / 2 if arguments.rest_channel is None else arguments.rest_channel
    width_ghz = arguments.channel_width_mhz / 1000.0
    freq_start_ghz = arguments.rest_freq_ghz - rest_channel * width_ghz
    frequencies = freq_start_ghz + np.arange(n_channels) * width_ghz
    velocities = SPEED_OF_LIGHT_KMS * (1.0 - frequencies / arguments.rest_freq_ghz)

    columns, rows = np.meshgrid(np.arange(arguments.raster_cols), np.arange(arguments.raster_rows))
    offsets = np.column_stack(
        [
            arguments.x0_arcsec + columns.ravel() * arguments.spacing_arcsec,
            arguments.y0_arcsec + rows.ravel() * arguments.spacing_arcsec,
        ]
    )
    n_spectra = len(offsets)

    source_sigma = arguments.source_fwhm_arcsec / np.sqrt(8 * np.log(2))
    line_sigma = arguments.line_fwhm_kms / np.sqrt(8 * np.log(2))
    source_centre = np.array([arguments.source_x_arcsec, arguments.source_y_arcsec])
    distance_squared = np.sum((offsets - source_centre) ** 2, axis=1)
    amplitude = arguments.line_peak_k * np.exp(-0.5 * distance_squared / source_sigma**2)
    line = amplitude[:, None] * np.exp(-0.5 * ((velocities - arguments.line_velocity_kms) / line_sigma) ** 2)

    x = np.linspace(-0.5, 0.5, n_channels)
    levels = arguments.baseline_offset_k * (1.0 + 0.2 * rng.standard_normal(n_spectra))
    slopes = arguments.baseline_slope_k * (1.0 + 0.2 * rng.standard_normal(n_spectra))
    phases = rng.uniform(0, 2 * np.pi, n_spectra)
    baseline = (
        levels[:, None]
        + slopes[:, None] * x
        + arguments.ripple_k * np.sin(2 * np.pi * 1.5 * x[None, :] + phases[:, None])
    )
    noise = arguments.noise_k * rng.standard_normal((n_spectra, n_channels))
    temperature = line + baseline + noise

    channel = np.arange(n_channels)
    gain = 1000.0 * (1.0 + 0.3 * np.sin(2 * np.pi * channel / n_channels * 3.0)) + 50.0 * rng.random(
        n_channels
    )
    sky = gain * (temperature + arguments.t_rx_k)
    hot = gain * (T_HOT_K + arguments.t_rx_k)
    cold = gain * (T_COLD_K + arguments.t_rx_k)
    cold[arguments.dead_channels] = hot[arguments.dead_channels]

    out: Path = arguments.out
    out.mkdir(parents=True, exist_ok=True)
    header = {
        "scan_id": arguments.scan_id,
        "source": arguments.source,
        "line": arguments.line,
        "instrument_module": arguments.instrument_module,
        "n_spectra": int(n_spectra),
        "n_channels": int(n_channels),
        "rest_freq_ghz": arguments.rest_freq_ghz,
        "freq_start_ghz": float(freq_start_ghz),
        "channel_width_mhz": arguments.channel_width_mhz,
        "t_hot_k": T_HOT_K,
        "t_cold_k": T_COLD_K,
        "offsets_arcsec": [[float(dx), float(dy)] for dx, dy in offsets],
        "obs_start": arguments.obs_start,
        "ra_deg": arguments.ra_deg,
        "dec_deg": arguments.dec_deg,
    }
    (out / "scan.json").write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
    for name, array in (("sky.f32", sky), ("hot.f32", hot), ("cold.f32", cold)):
        (out / name).write_bytes(np.ascontiguousarray(array, dtype="<f4").tobytes())

    expected_channel = int(np.argmin(np.abs(velocities - arguments.line_velocity_kms)))
    return {
        "scan_id": arguments.scan_id,
        "package_dir": str(out),
        "line_channel": expected_channel,
        "line_peak_k": arguments.line_peak_k,
        "line_amplitude_k": [float(a) for a in amplitude],
        "noise_k": arguments.noise_k,
        "baseline_level_k": [float(v) for v in levels],
        "channel_width_kms": float(abs(velocities[1] - velocities[0])),
    }


def main(argv: list[str]) -> int:
    truth = make_scan(parse_arguments(argv))
    print(json.dumps(truth))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
