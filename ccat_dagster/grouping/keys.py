"""``sub_group_key``: the name of one sub-group, used as Dagster partition key and as a directory name.

Encoding (documented in docs/groupings.md, "Sub-group keys"):

* no dimensions (``group_by: []``) → ``all``;
* otherwise ``<dim>=<value>`` pairs in group_by order, joined with ``+``: ``source=NGC253+line=CO43``;
* a value keeps ``A-Z a-z 0-9 - _ .`` as they are, case preserved (lower-casing would merge NGC253, ngc253);
  every other character is written as ``%XX`` per UTF-8 byte, upper-case hex (``/`` → ``%2F``, space →
  ``%20``, ``=`` → ``%3D``, ``+`` → ``%2B``, ``%`` → ``%25``, ``é`` → ``%C3%A9``); a ``.`` right after another
  ``.`` is written ``%2E``, so a key never contains ``..`` (nor Dagster's forbidden ``...``);
* a missing value (NULL, e.g. a scan without a spectral line) is ``~``; the empty string is the empty text;
* a key longer than 255 characters is cut to at most 222 characters (never inside a ``%XX``) and gets
  ``~`` plus the first 32 hex digits of the SHA-256 of the full key: ``<prefix>~<hash>``.

Every key is therefore ASCII from ``A-Z a-z 0-9 - _ . % = + ~``: no ``/``, no control characters, at most 255
bytes (one directory-name component on Linux), never ``.`` or ``..``. Keys are case-sensitive, like
Dagster partition keys and Linux file systems. Different dimension lists give different keys: the encoding is
reversible (``decode_sub_group_key``) except for hashed keys, which differ from each other by their hash.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from urllib.parse import unquote_to_bytes

from ccat_dagster.errors import CcatError

ALL_KEY = "all"
NULL_VALUE = "~"
MAX_KEY_LENGTH = 255
HASH_HEX_DIGITS = 32

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.-]*")
_DIMENSION_NAME = re.compile(r"[a-z][a-z0-9_]*")
_ENCODED_VALUE = re.compile(r"(?:[A-Za-z0-9_.-]|%[0-9A-F]{2})*")
_HASHED_SUFFIX = re.compile(rf"~[0-9a-f]{{{HASH_HEX_DIGITS}}}\Z")


class SubGroupKeyError(CcatError, ValueError):
    """A text that is not a sub_group_key this module produces, or dimensions that cannot be encoded."""


def encode_value(value: str | None) -> str:
    """One dimension value as it appears in a key (see the module docstring)."""
    if value is None:
        return NULL_VALUE
    if _PLAIN_VALUE.fullmatch(value) and ".." not in value:
        return value
    parts: list[str] = []
    previous = ""
    for char in value:
        if char in _SAFE and not (char == "." and previous == "."):
            parts.append(char)
        else:
            parts.append("".join(f"%{byte:02X}" for byte in char.encode("utf-8")))
        previous = char
    return "".join(parts)


def encode_sub_group_key(dims: Sequence[tuple[str, str | None]]) -> str:
    """The key of the sub-group with these (dimension, value) pairs, in group_by order; ``all`` for none."""
    if not dims:
        return ALL_KEY
    parts = []
    for dimension, value in dims:
        if not isinstance(dimension, str) or not _DIMENSION_NAME.fullmatch(dimension):
            raise SubGroupKeyError(
                f"dimension name {dimension!r} cannot be used in a sub_group_key: use lower-case letters, "
                "digits and _ (e.g. source, obs_date)"
            )
        if value is not None and not isinstance(value, str):
            raise SubGroupKeyError(f"value {value!r} of dimension {dimension} must be text or None")
        parts.append(f"{dimension}={encode_value(value)}")
    key = "+".join(parts)
    if len(key) <= MAX_KEY_LENGTH:
        return key
    digest = hashlib.sha256(key.encode("ascii")).hexdigest()[:HASH_HEX_DIGITS]
    cut = MAX_KEY_LENGTH - 1 - HASH_HEX_DIGITS
    # Never end the readable prefix inside a %XX escape.
    escape_start = key.rfind("%", cut - 2, cut)
    if escape_start != -1:
        cut = escape_start
    return f"{key[:cut]}~{digest}"


def is_hashed_key(key: str) -> bool:
    """True for a key shortened with a hash suffix (its full values are not recoverable from the key)."""
    return len(key) <= MAX_KEY_LENGTH and bool(_HASHED_SUFFIX.search(key))


def decode_sub_group_key(key: str) -> list[tuple[str, str | None]]:
    """The (dimension, value) pairs of ``key``; ``[]`` for ``all``. Raises SubGroupKeyError otherwise.

    A hashed (shortened) key cannot be decoded: the sub-group's members in ops-db hold its values.
    """
    if key == ALL_KEY:
        return []
    if is_hashed_key(key):
        raise SubGroupKeyError(
            f"sub_group_key {key!r} was shortened with a hash suffix and cannot be decoded; "
            "read its dimension values from the sub-group's packages in ops-db"
        )
    pairs: list[tuple[str, str | None]] = []
    for part in key.split("+"):
        dimension, sep, encoded = part.partition("=")
        if not sep or not _DIMENSION_NAME.fullmatch(dimension):
            raise SubGroupKeyError(
                f"{key!r} is not a sub_group_key: expected 'all' or <dimension>=<value> pairs joined by '+'"
            )
        if encoded == NULL_VALUE:
            pairs.append((dimension, None))
            continue
        if not _ENCODED_VALUE.fullmatch(encoded):
            raise SubGroupKeyError(f"{key!r} is not a sub_group_key: value {encoded!r} is not %-encoded text")
        try:
            value = unquote_to_bytes(encoded).decode("utf-8")
        except UnicodeDecodeError:
            raise SubGroupKeyError(f"{key!r} is not a sub_group_key: {encoded!r} is not UTF-8") from None
        pairs.append((dimension, value))
    if encode_sub_group_key(pairs) != key:
        raise SubGroupKeyError(
            f"{key!r} is not in canonical form (expected {encode_sub_group_key(pairs)!r}): "
            "sub_group_keys must be produced by encode_sub_group_key"
        )
    return pairs
