"""Data groupings: filter rules → sub-groups of raw data packages, sub-group keys, presets (docs/groupings.md).

Knows nothing of Dagster or of running jobs: ``engine.resolve`` and ``engine.resolve_touched`` take a
SQLAlchemy session and return ``SubGroup`` values.
"""
