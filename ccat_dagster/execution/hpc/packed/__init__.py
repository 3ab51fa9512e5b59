"""Packed execution: many sub-groups per Slurm allocation through a pilot-job engine (Parsl HTEX).

``backend.PackedBackend`` is an ``HpcBackend`` whose jobs are tasks of ``engine.PilotEngine``; Parsl is
imported only when a step asks for packing (``pip install 'ccat-dagster[packed]'``).
"""
