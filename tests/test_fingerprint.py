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
    packages=[(1, "aa"), (2, "bb")],
    upstream_products=[],
    software_version="chai-calibration==1.0.0",
    image_digest="sha256:1",
    config_sha=config_sha256({"calibration_mode": "hot_cold"}),
)


def test_fingerprint_ignores_order():
    assert input_fingerprint(**BASE) == input_fingerprint(**{**BASE, "packages": [(2, "bb"), (1, "aa")]})


@pytest.mark.parametrize(
    "change",
    [
        {"packages": [(1, "aa"), (2, "bb"), (3, "cc")]},  # new data joins the sub-group
        {"packages": [(1, "aa"), (2, "bX")]},  # a package was re-archived with other content
        {"upstream_products": [(9, "ff")]},
        {"software_version": "chai-calibration==1.0.1"},
        {"image_digest": "sha256:2"},
        {"config_sha": config_sha256({"calibration_mode": "sky"})},
    ],
)
def test_any_input_change_changes_the_fingerprint(change):
    assert input_fingerprint(**BASE) != input_fingerprint(**{**BASE, **change})


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
