"""What the image check before every submit costs: the tree digest of a sandbox, cold and cached, and a SIF digest.

    .venv/bin/python benchmarks/bench_image_digest.py [--files 20000] [--repeat 5] [--write-docs]

Builds a synthetic sandbox (a ``usr/`` tree of ``--files`` files of 1-64 KiB in directories of 100, plus a few
symlinks) and a 256 MiB SIF-like file under a temporary directory, then times ``tree_digest`` without a cache
(every file read), with a cold cache (read and cached) and with a warm cache (an unchanged tree: one lstat per
entry), and ``sif_digest``. The tree's files get mtimes an hour old, so the cache may keep them.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_common import machine, write_section

from ccat_dagster.execution.images import sif_digest, tree_digest

SECTION = "## Image digests"


def build_sandbox(root: Path, *, files: int, seed: int = 16) -> int:
    rng = random.Random(seed)
    total = 0
    old = time.time() - 3600
    for index in range(files):
        directory = root / "usr" / "lib" / f"pkg{index // 100:04d}"
        directory.mkdir(parents=True, exist_ok=True)
        size = rng.randint(1, 64) * 1024
        path = directory / f"file{index:06d}.py"
        path.write_bytes(rng.randbytes(size))
        os.utime(path, (old, old))
        total += size
        if index % 1000 == 0:
            (directory / f"link{index:06d}").symlink_to(path.name)
    return total


def timed(call, repeat: int) -> tuple[float, float, float]:
    seconds = []
    for _ in range(repeat):
        began = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds), min(seconds), max(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-image-digest-") as scratch:
        root = Path(scratch) / "sandbox"
        total = build_sandbox(root, files=args.files)
        sif = Path(scratch) / "image.sif"
        with sif.open("wb") as handle:
            for _ in range(256):
                handle.write(os.urandom(1 << 20))
        cache = Path(scratch) / "cache"
        rows = []
        rows.append(("tree_digest, no cache (every file read)", *timed(lambda: tree_digest(root), args.repeat)))

        def cold() -> None:
            for entry in cache.glob("*"):
                entry.unlink()
            tree_digest(root, cache_dir=cache)

        rows.append(("tree_digest, cold cache (read, then cached)", *timed(cold, args.repeat)))
        tree_digest(root, cache_dir=cache)
        rows.append(
            (
                "tree_digest, warm cache (unchanged tree)",
                *timed(lambda: tree_digest(root, cache_dir=cache), args.repeat),
            )
        )
        rows.append(("sif_digest of a 256 MiB file, no cache", *timed(lambda: sif_digest(sif), args.repeat)))
        os.utime(sif, (time.time() - 3600, time.time() - 3600))
        time.sleep(2.5)  # past the racy window of the ctime utime just set, so the cache may keep it
        sif_digest(sif, cache_dir=cache)
        rows.append(
            ("sif_digest of a 256 MiB file, cached", *timed(lambda: sif_digest(sif, cache_dir=cache), args.repeat))
        )
    lines = [
        SECTION,
        "",
        f"Run on {started} with `.venv/bin/python benchmarks/bench_image_digest.py --files {args.files} "
        f"--repeat {args.repeat} --write-docs` (median of {args.repeat}; page cache warm after the first call).",
        "",
        machine(),
        f"- load average (1, 5, 15 min) when the run started: {', '.join(f'{v:.2f}' for v in load)}",
        f"- Data: a synthetic sandbox of {args.files:,} files ({total / 2**20:,.0f} MiB) in "
        f"{(args.files + 99) // 100:,} directories plus {(args.files + 999) // 1000} symlinks; a 256 MiB file as SIF.",
        "",
        "| measurement | median | min | max |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {median * 1000:.0f} ms | {low * 1000:.0f} ms | {high * 1000:.0f} ms |"
            for name, median, low, high in rows
        ),
        "",
        "Notes:",
        "- The check runs before every submit (`images.resolve_image` with a `BuildCheck`); with the cache in "
        "`SIF_CACHE_DIR/.tree-digests/` an unchanged sandbox costs the warm-cache figure per attempt, a changed "
        "one re-reads only the changed files. A SIF's digest is cached the same way (one stat per check). The "
        "figures scale with the machine's load: see the load average above (2 cores shared with other work).",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write_docs:
        write_section(SECTION, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
