"""Dagster resources: thin, typed wrappers that hand the domain objects (engine, backend, runtime, stager) to assets."""

from ccat_dagster.resources.ccat import (
    ContainerRuntimeResource,
    ExecutionSettingsResource,
    HpcBackendResource,
    OpsDbResource,
    StagerResource,
    resources_from_settings,
)

__all__ = [
    "ContainerRuntimeResource",
    "ExecutionSettingsResource",
    "HpcBackendResource",
    "OpsDbResource",
    "StagerResource",
    "resources_from_settings",
]
