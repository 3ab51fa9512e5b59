"""Provenance and retention on top of ops-db lineage: PROV-JSON export (IVOA ProvDM naming), invalidation of
raw data packages, retention cleanup, and their ``ccat-dagster`` commands (``lineage``, ``impact``,
``invalidate``, ``retention``). Nothing here imports Dagster; ``ccat_dagster.assets.retention`` wires the
cleanup into a Dagster job."""
