"""CHAI step `grid_map` (final step, fan-in over all scans): grid spectra into a cube and a moment-0 map.

Entrypoint: ``/usr/bin/python3 /opt/software/bin/chai_grid_map.py`` (no arguments).
Reads:  manifest ``upstream_products`` ``<name>.base.json`` + ``<name>.base.f32`` (the baseline step's,
        one pair per scan, usually under /workflow/workspace/baseline/<upstream_sub_group_key>/).
Config: ``pixel_arcsec`` (default 10), ``max_rms_k`` (default 5; scans with a larger median rms are
        flagged in the QA file, not dropped), ``line_window_kms`` (default 50) and ``line_center_kms``
        (default 0) choose the channels integrated into moment 0 and excluded from the rms.
Writes, under ``$WORKFLOW_OUTPUT_DIR`` (``<key>`` = the sub-group key made file-name safe):
        science/<key>_cube.fits, science/<key>_mom0.fits, plots/<key>_mom0.png,
        statistics/<key>_stats.json, qa/<key>_qa.json, logs/<key>_grid_map.log.

Each spectrum goes to the pixel nearest its offset on a grid whose pixel centres are whole multiples
of ``pixel_arcsec`` (offset 0,0 is a pixel centre); a pixel holds the mean of its spectra, channel by
channel over finite values. Spatial axes are celestial (CTYPE RA---SIN / DEC--SIN, ICRS, degrees) around the
scan's ``ra_deg`` / ``dec_deg`` (offset 0,0); the x offset runs east, so CDELT1 is positive. A scan without a
position is refused: a map without celestial axes cannot be combined with any other.
"""

from __future__ import annotations

import sys

# The software directory is mounted read-only in the container; do not try to write bytecode there.
sys.dont_write_bytecode = True

import io  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import matplotlib  # noqa: E402

# Containers have no display; select the file-only backend before pyplot is imported.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from astropy.io import fits  # noqa: E402
from astropy.wcs import WCS  # noqa: E402
from chai_contract import (  # noqa: E402
    SOFTWARE_VERSION,
    ConfigError,
    DataFormatError,
    Progress,
    UpstreamProduct,
    config_float,
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
    SpectralAxis,
    find_product_pairs,
    line_mask,
    read_product,
    spectral_axis,
)

PROGRAM = "chai_grid_map"
TELESCOPE = "FYST"
CONFIG_KEYS = ("pixel_arcsec", "max_rms_k", "line_window_kms", "line_center_kms")
# A cube beyond this many voxels means a pixel size far below the sampling, not a real map.
MAX_CUBE_VOXELS = 200_000_000


@dataclass(frozen=True)
class ScanSpectra:
    name: str
    header: dict[str, Any]
    spectra: np.ndarray
    offsets_arcsec: np.ndarray
    rms_k: list[float | None]


@dataclass(frozen=True)
class GriddedMap:
    cube: np.ndarray  # (n_channels, ny, nx), K, NaN where no spectrum fell
    hits: np.ndarray  # (ny, nx), number of spectra per pixel
    x_min_index: int  # pixel (0, 0) is at offset (x_min_index, y_min_index) * pixel_arcsec
    y_min_index: int
    pixel_arcsec: float


def load_scans(
    *, products: tuple[UpstreamProduct, ...], progress: Progress
) -> tuple[list[ScanSpectra], SpectralAxis]:
    pairs = find_product_pairs(
        products=products, header_suffix=".base.json", data_suffix=".base.f32", producer="baseline"
    )
    scans: list[ScanSpectra] = []
    axis: SpectralAxis | None = None
    for pair in pairs:
        header, spectra = read_product(pair=pair)
        this_axis = spectral_axis(header=header)
        if axis is None:
            axis = this_axis
        elif not axis.matches(this_axis):
            raise DataFormatError(
                f"{pair.header.path} has spectral axis {this_axis}, unlike {scans[0].name} ({axis}); "
                "this gridder needs all scans on one frequency setting, so group them by line and setting"
            )
        rms = header.get("rms_k")
        if not isinstance(rms, list) or len(rms) != header["n_spectra"]:
            raise DataFormatError(f"{pair.header.path}: 'rms_k' must list one value per spectrum")
        scans.append(
            ScanSpectra(
                name=pair.name,
                header=header,
                spectra=spectra,
                offsets_arcsec=np.asarray(header["offsets_arcsec"], dtype=np.float64),
                rms_k=rms,
            )
        )
        progress.say(f"read {pair.data.path}: {spectra.shape[0]} spectra of {spectra.shape[1]} channels")
    assert axis is not None  # find_product_pairs never returns an empty list
    return scans, axis


def grid_spectra(*, offsets_arcsec: np.ndarray, spectra: np.ndarray, pixel_arcsec: float) -> GriddedMap:
    """Average spectra into the nearest pixel, ignoring NaN channels."""
    x_index = np.rint(offsets_arcsec[:, 0] / pixel_arcsec).astype(np.int64)
    y_index = np.rint(offsets_arcsec[:, 1] / pixel_arcsec).astype(np.int64)
    x_min, y_min = int(x_index.min()), int(y_index.min())
    nx, ny = int(x_index.max()) - x_min + 1, int(y_index.max()) - y_min + 1
    n_channels = spectra.shape[1]
    if nx * ny * n_channels > MAX_CUBE_VOXELS:
        raise ConfigError(
            f"pixel_arcsec={pixel_arcsec} gives a {nx} x {ny} x {n_channels} cube for offsets spanning "
            f"{np.ptp(offsets_arcsec[:, 0]):.0f} x {np.ptp(offsets_arcsec[:, 1]):.0f} arcsec; "
            "use larger pixels"
        )
    columns, rows = x_index - x_min, y_index - y_min
    finite = np.isfinite(spectra)
    sums = np.zeros((ny, nx, n_channels))
    counts = np.zeros((ny, nx, n_channels))
    np.add.at(sums, (rows, columns), np.where(finite, spectra, 0.0))
    np.add.at(counts, (rows, columns), finite.astype(np.float64))
    hits = np.zeros((ny, nx), dtype=np.int64)
    np.add.at(hits, (rows, columns), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / counts, np.nan)
    return GriddedMap(
        cube=np.moveaxis(mean, 2, 0),
        hits=hits,
        x_min_index=x_min,
        y_min_index=y_min,
        pixel_arcsec=pixel_arcsec,
    )


def map_wcs(*, grid: GriddedMap, axis: SpectralAxis | None, position_deg: tuple[float, float]) -> WCS:
    """Celestial SIN axes with offset 0,0 at ``position_deg`` (ICRS), plus FREQ in Hz for the cube."""
    wcs = WCS(naxis=2 if axis is None else 3)
    ctype = ["RA---SIN", "DEC--SIN"]
    cunit = ["deg", "deg"]
    # FITS pixels count from 1, so offset 0 sits at pixel 1 - min_index.
    crpix = [1.0 - grid.x_min_index, 1.0 - grid.y_min_index]
    crval = [position_deg[0], position_deg[1]]
    cdelt = [grid.pixel_arcsec / 3600.0, grid.pixel_arcsec / 3600.0]
    if axis is not None:
        ctype.append("FREQ")
        cunit.append("Hz")
        crpix.append(1.0)
        crval.append(axis.freq_start_ghz * 1e9)
        cdelt.append(axis.channel_width_mhz * 1e6)
        wcs.wcs.restfrq = axis.rest_freq_ghz * 1e9
    wcs.wcs.ctype = ctype
    wcs.wcs.cunit = cunit
    wcs.wcs.crpix = crpix
    wcs.wcs.crval = crval
    wcs.wcs.cdelt = cdelt
    wcs.wcs.radesys = "ICRS"
    return wcs


def source_position(header: dict[str, Any]) -> tuple[float, float]:
    """The scan's ICRS position of offset 0,0 in degrees; a clear error when the scan has none."""
    ra, dec = header.get("ra_deg"), header.get("dec_deg")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in (ra, dec)):
        raise DataFormatError(
            f"scan {header.get('scan_id')!r} has no position (ra_deg / dec_deg, ICRS degrees, found {ra!r} / "
            f"{dec!r}); the map needs one for its celestial axes: add them to the scan header"
        )
    if not (0.0 <= ra < 360.0 and -90.0 <= dec <= 90.0):
        raise DataFormatError(f"scan {header.get('scan_id')!r}: ra_deg {ra} / dec_deg {dec} are out of range")
    return float(ra), float(dec)


def fits_bytes(*, data: np.ndarray, wcs: WCS, bunit: str, first: dict[str, Any], history: list[str]) -> bytes:
    header = wcs.to_header()
    header["BUNIT"] = bunit
    header["OBJECT"] = str(first.get("source", ""))
    header["LINE"] = str(first.get("line", ""))
    header["INSTRUME"] = str(first.get("instrument_module", ""))
    header["ORIGIN"] = f"{PROGRAM} {SOFTWARE_VERSION}"
    header["TELESCOP"] = (TELESCOPE, "Fred Young Submillimeter Telescope")
    # The scan's start, never the time of the reduction: the same inputs must give the same bytes.
    obs_start = str(first.get("obs_start", ""))
    if obs_start:
        header["DATE-OBS"] = (_fits_date(obs_start), "start of the first scan (UTC)")
    for line in history:
        header.add_history(line)
    hdu = fits.PrimaryHDU(data=data.astype(np.float32), header=header)
    # CHECKSUM/DATASUM with a fixed comment: astropy's default comment is the time of writing.
    hdu.add_checksum(when="HDU checksum (FITS checksum convention)")
    buffer = io.BytesIO()
    hdu.writeto(buffer, checksum=False)
    return buffer.getvalue()


def _fits_date(value: str) -> str:
    """ISO 8601 with an offset (scan.json) as FITS's DATE-OBS: UTC, no offset."""
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise DataFormatError(f"obs_start {value!r} is not an ISO 8601 time") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="seconds")


def mom0_png(*, mom0: np.ndarray, grid: GriddedMap, title: str) -> bytes:
    half = grid.pixel_arcsec / 2.0
    ny, nx = mom0.shape
    x0, y0 = grid.x_min_index * grid.pixel_arcsec, grid.y_min_index * grid.pixel_arcsec
    extent = (
        x0 - half,
        x0 + (nx - 1) * grid.pixel_arcsec + half,
        y0 - half,
        y0 + (ny - 1) * grid.pixel_arcsec + half,
    )
    figure, axes = plt.subplots(figsize=(6, 5))
    image = axes.imshow(mom0, origin="lower", extent=extent, cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="integrated intensity [K km/s]")
    axes.set_xlabel("offset x [arcsec]")
    axes.set_ylabel("offset y [arcsec]")
    axes.set_title(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def scan_rms(values: list[float | None]) -> float | None:
    finite = [v for v in values if isinstance(v, int | float) and np.isfinite(v)]
    return float(np.median(finite)) if finite else None


def main() -> None:
    progress = Progress(program=PROGRAM)
    manifest = load_manifest()
    progress.say(f"step {manifest.step!r}, sub-group {manifest.sub_group_key!r}, version {SOFTWARE_VERSION}")
    pixel_arcsec = config_positive_float(config=manifest.config, key="pixel_arcsec", default=10.0)
    max_rms_k = config_positive_float(config=manifest.config, key="max_rms_k", default=5.0)
    window_kms = config_positive_float(config=manifest.config, key="line_window_kms", default=50.0)
    center_kms = config_float(config=manifest.config, key="line_center_kms", default=0.0)
    warn_unknown_config(config=manifest.config, known=CONFIG_KEYS, progress=progress)
    key = safe_file_stem(name=manifest.sub_group_key or "all", what="sub_group_key")
    out_dir = output_dir(manifest=manifest)
    verify_checksums(files=[*manifest.inputs, *manifest.upstream_products], progress=progress)

    scans, axis = load_scans(products=manifest.upstream_products, progress=progress)
    offsets = np.concatenate([scan.offsets_arcsec for scan in scans])
    spectra = np.concatenate([scan.spectra for scan in scans])
    grid = grid_spectra(offsets_arcsec=offsets, spectra=spectra, pixel_arcsec=pixel_arcsec)
    n_channels, ny, nx = grid.cube.shape
    progress.say(f"gridded {len(spectra)} spectra from {len(scans)} scans into {nx} x {ny} pixels")

    in_line = line_mask(axis=axis, center_kms=center_kms, half_width_kms=window_kms)
    covered = grid.hits > 0
    with np.errstate(invalid="ignore"):
        mom0 = np.nansum(grid.cube[in_line], axis=0) * axis.channel_width_kms()
    mom0 = np.where(covered, mom0, np.nan)
    off_line = grid.cube[~in_line]
    finite_off_line = off_line[np.isfinite(off_line)]
    cube_rms = float(np.sqrt(np.mean(finite_off_line**2))) if finite_off_line.size else float("nan")
    if not np.isfinite(grid.cube).any():
        raise DataFormatError("every gridded value is NaN; the baseline products hold no usable data")
    peak_channel, peak_y, peak_x = (
        int(i) for i in np.unravel_index(np.nanargmax(grid.cube), grid.cube.shape)
    )
    velocities = axis.velocities_kms()

    first = scans[0].header
    position = source_position(first)
    history = [
        f"{scan.name}: scan {scan.header['scan_id']}, {scan.spectra.shape[0]} spectra" for scan in scans
    ]
    science, plots = out_dir / "science", out_dir / "plots"
    write_bytes(
        path=science / f"{key}_cube.fits",
        data=fits_bytes(
            data=grid.cube,
            wcs=map_wcs(grid=grid, axis=axis, position_deg=position),
            bunit="K",
            first=first,
            history=history,
        ),
        progress=progress,
    )
    write_bytes(
        path=science / f"{key}_mom0.fits",
        data=fits_bytes(
            data=mom0,
            wcs=map_wcs(grid=grid, axis=None, position_deg=position),
            bunit="K km/s",
            first=first,
            history=history,
        ),
        progress=progress,
    )
    title = f"{first['source']} {first['line']}: moment 0, {center_kms:g} ± {window_kms:g} km/s"
    write_bytes(
        path=plots / f"{key}_mom0.png", data=mom0_png(mom0=mom0, grid=grid, title=title), progress=progress
    )

    statistics = {
        "sub_group_key": manifest.sub_group_key,
        "n_scans": len(scans),
        "n_spectra": int(len(spectra)),
        "map_shape": {"n_channels": n_channels, "ny": ny, "nx": nx},
        "pixel_arcsec": pixel_arcsec,
        "n_pixels_with_data": int(np.count_nonzero(covered)),
        "rms_k": finite_or_none(cube_rms),
        "peak_k": float(grid.cube[peak_channel, peak_y, peak_x]),
        "peak_channel": peak_channel,
        "peak_velocity_kms": float(velocities[peak_channel]),
        "peak_frequency_ghz": float(axis.frequencies_ghz()[peak_channel]),
        "peak_pixel": {"x": peak_x, "y": peak_y},
        "peak_offset_arcsec": [
            (grid.x_min_index + peak_x) * pixel_arcsec,
            (grid.y_min_index + peak_y) * pixel_arcsec,
        ],
        "mom0_peak_k_kms": finite_or_none(float(np.nanmax(mom0))),
        "line_window_kms": window_kms,
        "line_center_kms": center_kms,
        "software": {"program": PROGRAM, "version": SOFTWARE_VERSION},
    }
    write_json(path=out_dir / "statistics" / f"{key}_stats.json", document=statistics, progress=progress)

    per_scan = []
    for scan in scans:
        rms = scan_rms(scan.rms_k)
        flagged = rms is None or rms > max_rms_k
        per_scan.append(
            {
                "name": scan.name,
                "scan_id": scan.header["scan_id"],
                "n_spectra": int(scan.spectra.shape[0]),
                "median_rms_k": rms,
                "flagged": flagged,
                "reason": ("no finite rms" if rms is None else f"rms {rms:.3f} K > max_rms_k {max_rms_k:g}")
                if flagged
                else None,
            }
        )
    flagged_scans = [entry["scan_id"] for entry in per_scan if entry["flagged"]]
    scan_rms_values = [entry["median_rms_k"] for entry in per_scan if entry["median_rms_k"] is not None]
    qa = {
        # The QA contract (docs/container-contract.md): named metrics ccat-dagster checks against qa_checks.
        "qa_version": 1,
        "metrics": {
            "rms_k": {
                "value": finite_or_none(cube_rms),
                "unit": "K",
                "description": "off-line rms of the gridded cube",
            },
            "max_scan_rms_k": {
                "value": max(scan_rms_values) if scan_rms_values else None,
                "unit": "K",
                "description": "largest median per-spectrum rms of a scan",
            },
            "flagged_scans": {
                "value": len(flagged_scans),
                "unit": "scans",
                "description": f"scans whose median rms is above max_rms_k {max_rms_k:g} K (still gridded)",
                "items": flagged_scans,
            },
        },
        "sub_group_key": manifest.sub_group_key,
        "max_rms_k": max_rms_k,
        "scans": per_scan,
        "flagged_scans": flagged_scans,
        "software": {"program": PROGRAM, "version": SOFTWARE_VERSION},
    }
    write_json(path=out_dir / "qa" / f"{key}_qa.json", document=qa, progress=progress)
    if qa["flagged_scans"]:
        progress.warn(f"flagged scans (rms above {max_rms_k:g} K): {', '.join(qa['flagged_scans'])}")
    progress.say("done")
    log_text = "\n".join(progress.lines) + "\n"
    write_bytes(
        path=out_dir / "logs" / f"{key}_grid_map.log", data=log_text.encode("utf-8"), progress=progress
    )


if __name__ == "__main__":
    run_program(program=PROGRAM, main=main)
