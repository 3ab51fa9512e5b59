"""Slurm backend: `submit_script` builds the sbatch script, `job_status` parses what Slurm answers,
`backend` runs the commands."""

from ccat_dagster.execution.hpc.slurm.backend import SlurmBackend

__all__ = ["SlurmBackend"]
