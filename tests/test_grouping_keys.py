"""sub_group_key encoding: readable, reversible, injective, safe as partition key and directory name."""

from __future__ import annotations

import random
import re

import pytest

from ccat_dagster.grouping.catalog import DIMENSIONS
from ccat_dagster.grouping.keys import (
    ALL_KEY,
    MAX_KEY_LENGTH,
    SubGroupKeyError,
    decode_sub_group_key,
    encode_sub_group_key,
    is_hashed_key,
)

SAFE_KEY = re.compile(r"[A-Za-z0-9._%=+~-]+")
# Dagster 1.13 rejects these in partition keys (dagster/_core/definitions/partitions/utils/base.py).
DAGSTER_FORBIDDEN = ["...", "\a", "\b", "\f", "\n", "\r", "\t", "\v", "\0"]


def assert_safe(key: str) -> None:
    assert SAFE_KEY.fullmatch(key), key
    assert len(key) <= MAX_KEY_LENGTH
    assert len(key.encode("utf-8")) <= 255  # one path component on Linux
    assert "/" not in key and ".." not in key and key not in (".", "..")
    assert not any(bad in key for bad in DAGSTER_FORBIDDEN)
    assert not key.startswith("-")


@pytest.mark.parametrize(
    ("dims", "key"),
    [
        ([], "all"),
        ([("source", "ngc253"), ("line", "co43")], "source=ngc253+line=co43"),
        ([("source", "NGC253"), ("line", "CO43")], "source=NGC253+line=CO43"),  # case is kept
        ([("source", "Orion-KL")], "source=Orion-KL"),
        (
            [("executed_obs_unit", "0f8fad5b-d9cb-469f-a165-70867728950e")],
            "executed_obs_unit=0f8fad5b-d9cb-469f-a165-70867728950e",
        ),
        (
            [("obs_date", "2026-10-01"), ("instrument_module", "CHAI.LFA")],
            "obs_date=2026-10-01+instrument_module=CHAI.LFA",
        ),
        ([("source", "a/b")], "source=a%2Fb"),
        ([("source", "a b")], "source=a%20b"),
        ([("source", "a=b+c")], "source=a%3Db%2Bc"),
        ([("source", "50%")], "source=50%25"),
        ([("source", "ρ Oph")], "source=%CF%81%20Oph"),
        ([("source", "a..b")], "source=a.%2Eb"),
        ([("source", "...")], "source=.%2E%2E"),
        ([("source", "..")], "source=.%2E"),
        ([("source", ".")], "source=."),
        ([("line", None)], "line=~"),
        ([("line", "~")], "line=%7E"),
        ([("line", "")], "line="),
        ([("source", "tab\there\nnl")], "source=tab%09here%0Anl"),
        ([("source", "a|b,c[d]")], "source=a%7Cb%2Cc%5Bd%5D"),
    ],
)
def test_encoding_examples(dims, key):
    assert encode_sub_group_key(dims) == key
    assert decode_sub_group_key(key) == dims
    assert_safe(key)


def test_all_is_the_key_of_no_dimensions():
    assert ALL_KEY == "all" and encode_sub_group_key(()) == "all" and decode_sub_group_key("all") == []


def test_case_is_never_folded():
    assert encode_sub_group_key([("source", "NGC253")]) != encode_sub_group_key([("source", "ngc253")])


def test_long_keys_get_a_hash_suffix():
    long_value = "x" * 300
    key = encode_sub_group_key([("source", long_value)])
    assert len(key) <= MAX_KEY_LENGTH and is_hashed_key(key)
    assert key.startswith("source=xxxx") and re.search(r"~[0-9a-f]{32}$", key)
    assert_safe(key)
    other = encode_sub_group_key([("source", long_value + "y")])
    assert other != key and other[:-33] == key[:-33]
    with pytest.raises(SubGroupKeyError, match="hash suffix"):
        decode_sub_group_key(key)
    # The readable prefix never ends inside a %XX escape.
    for n in range(200, 240):
        escaped = encode_sub_group_key([("source", "a" * n + "/" * 50)])
        assert re.fullmatch(r"source=a*(%2F)*~[0-9a-f]{32}", escaped), escaped
    exactly = encode_sub_group_key([("source", "y" * (MAX_KEY_LENGTH - len("source=")))])
    assert len(exactly) == MAX_KEY_LENGTH and not is_hashed_key(exactly)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "source",
        "source=a/b",
        "source=a b",
        "Source=NGC253",
        "source=%2f",  # lower-case hex is not canonical
        "source=%41",  # an unnecessary escape is not canonical
        "source=a..b",
        "source=%FF",  # not UTF-8
        "source=NGC253+",
        "=x",
    ],
)
def test_decode_rejects_what_encode_never_produces(bad):
    with pytest.raises(SubGroupKeyError):
        decode_sub_group_key(bad)


@pytest.mark.parametrize("dimension", ["Source", "a-b", "", "x=y", "a+b"])
def test_bad_dimension_names_are_refused(dimension):
    with pytest.raises(SubGroupKeyError):
        encode_sub_group_key([(dimension, "v")])


_ALPHABET = list("aAzZ09-_.%=+/ ~|,[]\\:'\"é€ρ𝄞\t\n\x00") + ["..", "...", "%2F", "%25", "~"]


def _random_value(rng: random.Random) -> str | None:
    if rng.random() < 0.08:
        return None
    length = rng.choice([0, 1, 2, 3, 5, 8, 20, 90, 140])
    return "".join(rng.choice(_ALPHABET) for _ in range(length))


def test_random_dimension_lists_never_share_a_key():
    """Seeded property test: many random (and deliberately similar) dimension lists, all keys distinct."""
    rng = random.Random(20261001)
    names = list(DIMENSIONS)
    seen: dict[str, tuple[tuple[str, str | None], ...]] = {}
    for _ in range(12000):
        dims = tuple((rng.choice(names), _random_value(rng)) for _ in range(rng.randint(0, 3)))
        variants = [dims]
        if dims:
            # Near-collisions: the same text split differently, case changed, a trailing dot added.
            name, value = dims[0]
            if value:
                cut = rng.randint(0, len(value))
                variants.append(((name, value[:cut]), (name, value[cut:])) + dims[1:])
                variants.append(((name, value.swapcase()),) + dims[1:])
                variants.append(((name, value + "."),) + dims[1:])
            variants.append(((name, None if value is not None else ""),) + dims[1:])
        for candidate in variants:
            key = encode_sub_group_key(candidate)
            assert_safe(key)
            assert seen.setdefault(key, candidate) == candidate, f"{candidate!r} and {seen[key]!r} share {key!r}"
            if not is_hashed_key(key):
                assert tuple(decode_sub_group_key(key)) == candidate
    assert len(seen) > 20000


def test_keys_are_valid_dagster_partition_keys():
    dagster_base = pytest.importorskip("dagster._core.definitions.partitions.utils.base")
    rng = random.Random(7)
    keys = [encode_sub_group_key([("source", _random_value(rng)), ("line", _random_value(rng))]) for _ in range(2000)]
    assert dagster_base.INVALID_PARTITION_SUBSTRINGS == DAGSTER_FORBIDDEN
    dagster_base.raise_error_on_invalid_partition_key_substring(keys)
