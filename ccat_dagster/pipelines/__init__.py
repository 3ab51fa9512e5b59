"""Pipelines as YAML files: load and check them (``spec``), store them in ops-db (``apply``), CLI (``cli``).

No Dagster here: the Dagster code location reads the stored pipelines from ops-db.
"""

from ccat_dagster.pipelines.apply import (
    ApplyOutcome,
    ApplyResult,
    PipelineApplyError,
    PipelineNotFoundError,
    PipelineSummary,
    apply_pipeline_spec,
    disable_pipeline,
    enable_pipeline,
    export_pipeline,
    get_pipeline,
    list_pipelines,
)
from ccat_dagster.pipelines.spec import PipelineSpec, PipelineSpecError, load_pipeline_spec, spec_sha256
from ccat_dagster.pipelines.versions import SoftwareVersionError, resolve_software_version

__all__ = [
    "ApplyOutcome",
    "ApplyResult",
    "PipelineApplyError",
    "PipelineNotFoundError",
    "PipelineSpec",
    "PipelineSpecError",
    "PipelineSummary",
    "SoftwareVersionError",
    "apply_pipeline_spec",
    "disable_pipeline",
    "enable_pipeline",
    "export_pipeline",
    "get_pipeline",
    "list_pipelines",
    "load_pipeline_spec",
    "resolve_software_version",
    "spec_sha256",
]
