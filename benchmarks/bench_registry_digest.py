"""What asking a registry for a tag's digest costs per attempt: a real registry on this host, asked over HTTP.

    .venv/bin/python benchmarks/bench_registry_digest.py [--lookups 200] [--write-docs]

Starts the CNCF distribution registry (Debian's ``docker-registry``) twice on free ports, one open and one with
basic authentication (htpasswd), pushes one small image to each, and times ``RegistryClient.manifest_digest``
for ``--lookups`` lookups of the tag: each one asking the registry (``cache_seconds=0``, what every attempt
would cost without the cache), and with the default 60 s cache (what a run's attempts cost after the first).
The registry is local, so the numbers are the client's and the registry's work without network latency: a
remote registry adds one round trip per uncached lookup (two with a token challenge).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench_common import machine, write_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccat_dagster.execution.images import parse_oci_reference  # noqa: E402
from ccat_dagster.execution.registry import RegistryClient, RegistryCredentials  # noqa: E402
from tests.oci_registry import TEST_PASSWORD, TEST_USER, start_registry  # noqa: E402

SECTION = "## Registry digests of image tags"


def _show(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-4 else f"{seconds * 1000:.2f} ms"


def _time(client: RegistryClient, ref: str, lookups: int) -> list[float]:
    reference = parse_oci_reference(ref)
    seconds = []
    for _ in range(lookups):
        started = time.perf_counter()
        client.manifest_digest(reference)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for auth in (False, True):
            root = Path(scratch) / ("auth" if auth else "open")
            root.mkdir()
            registry = start_registry(root, basic_auth=auth)
            try:
                registry.push_image("ccat/bench", "1.0.0", payload=b"benchmark layer")
                ref = f"docker://{registry.host}/ccat/bench:1.0.0"
                credentials = {registry.host: RegistryCredentials(TEST_USER, TEST_PASSWORD)} if auth else {}
                for cache in (0.0, 60.0):
                    client = RegistryClient(
                        credentials=credentials, plain_http=frozenset({registry.host}), cache_seconds=cache
                    )
                    seconds = _time(client, ref, args.lookups)
                    rows.append((auth, cache, seconds))
            finally:
                registry.stop()
    uncached_open = statistics.median(rows[0][2])
    lines = [
        SECTION,
        "",
        f"Run on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `.venv/bin/python benchmarks/bench_registry_digest.py "
        f"--lookups {args.lookups}{' --write-docs' if args.write_docs else ''}`; the machine was shared with other "
        "work, so compare the rows of this run with each other, not with other runs.",
        "",
        machine(),
        "- docker-registry 2.8 (Debian 12) on 127.0.0.1, filesystem storage; plain HTTP",
        "",
        "| registry | cache | lookups | median | p90 | max | median ÷ open, uncached |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for auth, cache, seconds in rows:
        ordered = sorted(seconds)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        median = statistics.median(seconds)
        lines.append(
            f"| {'basic auth (htpasswd, bcrypt cost 4)' if auth else 'open'} | "
            f"{'none (every lookup asks)' if cache == 0 else '60 s (default)'} | {len(seconds)} | "
            f"{_show(median)} | {_show(p90)} | {_show(max(seconds))} | {median / uncached_open:.4f} |"
        )
    lines += [
        "",
        "Notes:",
        "- An uncached lookup is one HEAD of the manifest (with basic auth: the 401 challenge, then the HEAD with "
        "the credentials, two requests). With the cache, a run's attempts after the first cost a dictionary "
        "look-up; the first lookup of a run is the uncached one.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write_docs:
        write_section(SECTION, report)


if __name__ == "__main__":
    main()
