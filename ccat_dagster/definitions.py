"""The Dagster code location. Built from ops-db when it loads (pipelines are wired in by the asset factory)."""

import dagster as dg

defs = dg.Definitions()
