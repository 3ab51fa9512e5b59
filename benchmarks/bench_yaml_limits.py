"""What unbounded YAML input costs with and without the loader's limits.

    .venv/bin/python benchmarks/bench_yaml_limits.py [--repeat 5] [--write-docs]

Times (CPU time of this process, median of ``--repeat``) how long ``load_pipeline_spec`` takes to refuse a
billion-laughs file, a merge-key bomb, a file nested a million levels deep and a sparse 64 GiB file, next to
what loading an ordinary pipeline costs. For scale, it also times what the unbounded path did with a small
bomb (plain ``yaml.safe_load`` then ``json.dumps``, as the JSON check and the fingerprint walk the document):
each further level multiplies that by nine, so the 9-level bomb would cost 9^(9 - levels) times as much.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_common import write_section

from ccat_dagster.pipelines.spec import PipelineSpecError, load_pipeline_spec

SECTION = "## YAML input limits"
REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "pipelines" / "chai_ngc253_co43.yaml"


def billion_laughs(levels: int) -> str:
    lines = ['lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def merge_bomb(levels: int) -> str:
    lines = ["m0: &m0 {x: 1, y: 2}"]
    lines += [f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 10)}]}}" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def cpu_seconds(call, repeat: int) -> float:
    seconds = []
    for _ in range(repeat):
        began = time.process_time()
        call()
        seconds.append(time.process_time() - began)
    return statistics.median(seconds)


def refused(path: Path) -> None:
    try:
        load_pipeline_spec(path)
    except PipelineSpecError:
        return
    raise AssertionError(f"{path} was not refused")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--small-levels", type=int, default=5, help="levels of the bomb loaded without limits")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    rows: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        files = {
            "billion laughs, 9 levels (9¹⁰ ≈ 3.5 billion strings)": billion_laughs(9),
            "merge-key bomb, 12 levels of 10 merges each": merge_bomb(12),
            "nested 1,000,000 levels deep": "[" * 1_000_000,
        }
        for name, text in files.items():
            path = root / f"{len(rows)}.yaml"
            path.write_text(text, encoding="utf-8")
            rows.append(
                (name, f"{len(text.encode()):,} bytes: refused", cpu_seconds(lambda p=path: refused(p), args.repeat))
            )
        sparse = root / "sparse.yaml"
        with sparse.open("wb") as stream:
            stream.truncate(64 * 2**30)
        rows.append(("sparse 64 GiB file", "refused by size", cpu_seconds(lambda: refused(sparse), args.repeat)))
        rows.append(
            (
                f"the example pipeline ({EXAMPLE.name})",
                "loaded",
                cpu_seconds(lambda: load_pipeline_spec(EXAMPLE), args.repeat),
            )
        )
        small = billion_laughs(args.small_levels)
        strings = 9 ** (args.small_levels + 1)
        unbounded = cpu_seconds(lambda: json.dumps(yaml.safe_load(small)), args.repeat)
        rows.append(
            (
                f"without limits: billion laughs, {args.small_levels} levels ({strings:,} strings), "
                "yaml.safe_load + json.dumps",
                f"≥ {9 ** (9 - args.small_levels) * unbounded:,.0f} s extrapolated to 9 levels",
                unbounded,
            )
        )
    table = ["| input | result | CPU time (median) |", "|---|---|---:|"]
    table += [f"| {name} | {result} | {seconds * 1000:,.1f} ms |" for name, result, seconds in rows]
    report = "\n".join(
        [
            SECTION,
            "",
            f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `.venv/bin/python "
            f"benchmarks/bench_yaml_limits.py --repeat {args.repeat} --write-docs` (load average when it started: "
            f"{', '.join(f'{v:.2f}' for v in load)}; 2 cores shared with other work, hence CPU time, not wall time).",
            "",
            f"- CPU: `nproc` = {os.cpu_count()}; Python {sys.version.split()[0]}, PyYAML {yaml.__version__} "
            "(pure-Python SafeLoader, as ccat_dagster.safe_yaml uses it)",
            "",
            *table,
            "",
            "Notes:",
            "- Refusals happen while the file is read: the bombs at the node where the expanded size passes 50,000, "
            "the deep file at level 65 (PyYAML's scanner reads at most 1,024 characters ahead of that), the big file "
            "after its first MiB.",
            "- The unbounded row is what a bomb cost before the limits: PyYAML itself shares aliased nodes, but the "
            "JSON check, the schema validation and JSON encoding walk the document expanded (json.dumps, in C, is "
            "the cheapest of them, so the extrapolation is a lower bound; the 9-level text alone would be ~25 GB).",
            "",
        ]
    )
    print(report)
    if args.write_docs:
        write_section(SECTION, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
