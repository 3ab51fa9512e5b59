"""Input fingerprints and software version policies (pure functions)."""

from __future__ import annotations

import pytest

from ccat_dagster.execution.fingerprint import (
    VersionResolutionError,
    config_sha256,
    input_fingerprint,
    resolve_version,
)

BASE = dict(
    packages=[("scan-1", "aa"), ("scan-2", "bb")],
    upstream_products=[],
    software_version="chai-calibration==1.0.0",
    image_digest="sha256:1",
    config_sha=config_sha256({"calibration_mode": "hot_cold"}),
)


def test_fingerprint_ignores_order():
    assert input_fingerprint(**BASE) == input_fingerprint(**{**BASE, "packages": [("scan-2", "bb"), ("scan-1", "aa")]})


@pytest.mark.parametrize(
    "change",
    [
        {"packages": [("scan-1", "aa"), ("scan-2", "bb"), ("scan-3", "cc")]},  # new data joins the sub-group
        {"packages": [("scan-1", "aa"), ("scan-2", "bX")]},  # a package was re-archived with other content
        {"upstream_products": [("calibrate", "all", "cal.fits", "ff")]},
        {"software_version": "chai-calibration==1.0.1"},
        {"image_digest": "sha256:2"},
        {"config_sha": config_sha256({"calibration_mode": "sky"})},
    ],
)
def test_any_input_change_changes_the_fingerprint(change):
    assert input_fingerprint(**BASE) != input_fingerprint(**{**BASE, **change})


UPSTREAM = dict(BASE, packages=[], upstream_products=[("baseline", "scan=1", "spec.fits", "aa")])


def test_identical_upstream_bytes_give_the_same_fingerprint_whatever_the_product_row():
    # An upstream re-run registers new DataProduct rows; only the content and where the consumer reads it count.
    again = dict(UPSTREAM, upstream_products=[("baseline", "scan=1", "spec.fits", "aa")])
    assert input_fingerprint(**UPSTREAM) == input_fingerprint(**again)


@pytest.mark.parametrize(
    "products",
    [
        [("baseline", "scan=1", "spec.fits", "ab")],  # other bytes
        [("baseline", "scan=1", "other.fits", "aa")],  # same bytes under another name
        [("baseline", "scan=2", "spec.fits", "aa")],  # from another upstream sub-group
        [("calibrate", "scan=1", "spec.fits", "aa")],  # from another upstream step
    ],
)
def test_upstream_content_or_place_changes_the_fingerprint(products):
    assert input_fingerprint(**UPSTREAM) != input_fingerprint(**dict(UPSTREAM, upstream_products=products))


def test_config_hash_is_canonical():
    assert config_sha256({"a": 1, "b": [1, 2]}) == config_sha256({"b": [1, 2], "a": 1})


AVAILABLE = ["0.9.0", "1.0.0", "1.2.0", "1.10.1", "2.0.0", "2.1.0-rc.1"]


@pytest.mark.parametrize(
    ("policy", "spec", "expected"),
    [
        ("exact", "1.2.0", "1.2.0"),
        ("compatible", "1.0.0", "1.10.1"),  # newest 1.x, numeric not lexical order
        ("compatible", "1.10.1", "1.10.1"),
        ("compatible", "0.9.0", "0.9.0"),
        ("latest", "1.0.0", "2.0.0"),  # pre-releases only when named exactly
        ("exact", "2.1.0-rc.1", "2.1.0-rc.1"),
    ],
)
def test_version_policies(policy, spec, expected):
    assert resolve_version(policy=policy, spec=spec, available=AVAILABLE, software="chai") == expected


@pytest.mark.parametrize(
    ("policy", "spec", "message"),
    [
        ("exact", "1.1.0", "no version '1.1.0'"),
        ("compatible", "3.0.0", "no version of 'chai' satisfies compatible '3.0.0'"),
        ("compatible", "one", "is not semantic"),
        ("newest", "1.0.0", "version_policy 'newest' is unknown"),
    ],
)
def test_unsatisfiable_versions_name_the_problem(policy, spec, message):
    with pytest.raises(VersionResolutionError, match=message):
        resolve_version(policy=policy, spec=spec, available=AVAILABLE, software="chai")
