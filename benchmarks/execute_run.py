"""Create and execute one run of a step asset in this process, as ``dagster job execute`` does for a job.

A sensor's or a backfill's run of a step is a run of Dagster's implicit asset job with the step selected; the
``dagster job execute`` command cannot select assets and ``dagster asset materialize --partition-range`` refuses
assets with a multi-run backfill policy, so the benchmarks launch a run with this instead. It loads the code
location from ``ccat_dagster.definitions`` (as a run worker does), creates the run with the given tags
(partition or partition range) and executes it.

Usage: python benchmarks/execute_run.py PIPELINE/STEP 'TAGS_JSON'   (exit code 0 when the run succeeded)
"""

import json
import sys
from pathlib import Path

import dagster as dg
from dagster._core.definitions.assets.job.asset_job import IMPLICIT_ASSET_JOB_NAME
from dagster._core.definitions.reconstruct import ReconstructableRepository

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    asset, tags = argv
    repository = ReconstructableRepository.for_module("ccat_dagster.definitions", "defs", working_directory=str(REPO))
    job = repository.get_reconstructable_job(IMPLICIT_ASSET_JOB_NAME)
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(
            job, instance, tags=json.loads(tags), asset_selection=[dg.AssetKey(asset.split("/"))], raise_on_error=False
        )
        return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
