"""CHAI scan format and spectral axis, shared by the three programs.

A raw scan package holds ``scan.json`` (header), ``sky.f32`` (little-endian float32, shape
n_spectra x n_channels, counts) and ``hot.f32`` / ``cold.f32`` (float32, n_channels, counts).
Intermediate products keep the same layout: ``<name>.cal.f32`` / ``<name>.base.f32`` hold
float32 spectra in K next to a JSON header with the scan header's keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from chai_contract import DataFormatError, UpstreamProduct, read_json_object

SPEED_OF_LIGHT_KMS = 299_792.458
FLOAT32_LE = np.dtype("<f4")

_HEADER_NUMBERS = ("rest_freq_ghz", "freq_start_ghz", "channel_width_mhz", "t_hot_k", "t_cold_k")
_HEADER_COUNTS = ("n_spectra", "n_channels")
_HEADER_TEXTS = ("scan_id", "source", "line", "instrument_module", "obs_start")


@dataclass(frozen=True)
class SpectralAxis:
    """Channel i is at ``freq_start_ghz + i * channel_width_mhz / 1000`` GHz."""

    n_channels: int
    freq_start_ghz: float
    channel_width_mhz: float
    rest_freq_ghz: float

    def frequencies_ghz(self) -> np.ndarray:
        return self.freq_start_ghz + np.arange(self.n_channels) * (self.channel_width_mhz / 1000.0)

    def velocities_kms(self) -> np.ndarray:
        """Radio-convention velocity relative to the rest frequency: v = c (1 - f / f_rest)."""
        return SPEED_OF_LIGHT_KMS * (1.0 - self.frequencies_ghz() / self.rest_freq_ghz)

    def channel_width_kms(self) -> float:
        return abs(self.channel_width_mhz / 1000.0 / self.rest_freq_ghz) * SPEED_OF_LIGHT_KMS

    def matches(self, other: SpectralAxis) -> bool:
        # A thousandth of a channel is far below anything a frequency setting can differ by.
        tolerance_ghz = abs(self.channel_width_mhz) / 1000.0 * 1e-3
        return (
            self.n_channels == other.n_channels
            and abs(self.freq_start_ghz - other.freq_start_ghz) <= tolerance_ghz
            and abs(self.channel_width_mhz - other.channel_width_mhz) <= abs(self.channel_width_mhz) * 1e-6
            and abs(self.rest_freq_ghz - other.rest_freq_ghz) <= tolerance_ghz
        )


def validate_scan_header(*, header: dict[str, Any], source: Path) -> dict[str, Any]:
    """Check the keys every program relies on; returns the header unchanged."""
    for key in _HEADER_TEXTS:
        if not isinstance(header.get(key), str):
            raise DataFormatError(f"{source}: '{key}' must be a string, found {header.get(key)!r}")
    for key in _HEADER_COUNTS:
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise DataFormatError(f"{source}: '{key}' must be a positive integer, found {value!r}")
    for key in _HEADER_NUMBERS:
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise DataFormatError(f"{source}: '{key}' must be a finite number, found {value!r}")
    if header["rest_freq_ghz"] <= 0 or header["channel_width_mhz"] == 0:
        raise DataFormatError(
            f"{source}: rest_freq_ghz must be positive and channel_width_mhz non-zero, found "
            f"{header['rest_freq_ghz']!r} and {header['channel_width_mhz']!r}"
        )
    if header["t_hot_k"] <= header["t_cold_k"]:
        raise DataFormatError(
            f"{source}: t_hot_k ({header['t_hot_k']}) must exceed t_cold_k ({header['t_cold_k']})"
        )
    offsets = header.get("offsets_arcsec")
    if not isinstance(offsets, list) or len(offsets) != header["n_spectra"]:
        raise DataFormatError(
            f"{source}: 'offsets_arcsec' must list one [dx, dy] pair per spectrum "
            f"({header['n_spectra']}), found {len(offsets) if isinstance(offsets, list) else offsets!r}"
        )
    for index, pair in enumerate(offsets):
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in pair
            )
        ):
            raise DataFormatError(
                f"{source}: offsets_arcsec[{index}] must be [dx, dy] in arcsec, found {pair!r}"
            )
    return header


def spectral_axis(*, header: dict[str, Any]) -> SpectralAxis:
    return SpectralAxis(
        n_channels=int(header["n_channels"]),
        freq_start_ghz=float(header["freq_start_ghz"]),
        channel_width_mhz=float(header["channel_width_mhz"]),
        rest_freq_ghz=float(header["rest_freq_ghz"]),
    )


def read_float32(*, path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Read a little-endian float32 file whose size must match ``shape`` exactly."""
    expected = int(np.prod(shape)) * FLOAT32_LE.itemsize
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataFormatError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) != expected:
        raise DataFormatError(
            f"{path} has {len(data)} bytes; the header's shape {shape} of float32 needs {expected}"
        )
    return np.frombuffer(data, dtype=FLOAT32_LE).reshape(shape).astype(np.float64)


def float32_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=FLOAT32_LE).tobytes()


def line_mask(*, axis: SpectralAxis, center_kms: float, half_width_kms: float) -> np.ndarray:
    """True for channels whose velocity lies within ``half_width_kms`` of ``center_kms``."""
    return np.abs(axis.velocities_kms() - center_kms) <= half_width_kms


@dataclass(frozen=True)
class ProductPair:
    """An intermediate product: a JSON header and the float32 file it describes."""

    name: str
    header: UpstreamProduct
    data: UpstreamProduct


def find_product_pairs(
    *, products: tuple[UpstreamProduct, ...], header_suffix: str, data_suffix: str, producer: str
) -> list[ProductPair]:
    """Pair ``<name><header_suffix>`` with ``<name><data_suffix>`` in the same directory, sorted by name.

    Products with other suffixes are ignored; a header without its data file, or two products of the
    same name (the same scan twice), is an error because the result would silently lose or double data.
    """
    by_path = {item.path: item for item in products}
    pairs: dict[str, ProductPair] = {}
    for item in products:
        if not item.path.name.endswith(header_suffix):
            continue
        name = item.path.name[: -len(header_suffix)]
        data = by_path.get(item.path.with_name(name + data_suffix))
        if data is None:
            raise DataFormatError(
                f"upstream product {item.path} has no {name + data_suffix} next to it in the manifest's "
                f"upstream_products; the {producer} step writes both"
            )
        if name in pairs:
            raise DataFormatError(
                f"two upstream products are named {name + header_suffix} ({pairs[name].header.path} and "
                f"{item.path}); the same scan would be counted twice"
            )
        pairs[name] = ProductPair(name=name, header=item, data=data)
    if not pairs:
        raise DataFormatError(
            f"the manifest's upstream_products hold no *{header_suffix} file; this step needs the "
            f"{producer} step's products"
        )
    return [pairs[name] for name in sorted(pairs)]


def read_product(*, pair: ProductPair) -> tuple[dict[str, Any], np.ndarray]:
    """Header (validated as a scan header) and spectra of an intermediate product."""
    header = validate_scan_header(header=read_json_object(path=pair.header.path), source=pair.header.path)
    spectra = read_float32(path=pair.data.path, shape=(header["n_spectra"], header["n_channels"]))
    return header, spectra
