"""Memory samples from ``metrics.k8s.io`` PodMetrics (metrics-server): the current working set of each pod.

Kubernetes keeps no peak: the backend keeps the largest sample it saw per Job while polling, a lower bound of
the true peak (a short spike between two polls, or a job shorter than one poll, is not seen). Without
metrics-server the peak stays None.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from ccat_dagster.execution.hpc.kubernetes.manifest import LABEL_PREFIX

__all__ = ["memory_bytes_by_job"]


def memory_bytes_by_job(items: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """PodMetrics items → Job name → memory in use (bytes, summed over the pod's containers)."""
    usage: dict[str, int] = {}
    for item in items:
        job = ((item.get("metadata") or {}).get("labels") or {}).get(f"{LABEL_PREFIX}job")
        if not job:
            continue
        total = sum(
            int(parse_quantity((container.get("usage") or {}).get("memory", "0")))
            for container in item.get("containers") or []
        )
        usage[job] = max(usage.get(job, 0), total)
    return usage
