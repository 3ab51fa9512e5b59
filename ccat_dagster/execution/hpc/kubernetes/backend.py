"""KubernetesBackend: one ``batch/v1`` Job per attempt; a status poll lists Jobs and pods, 100 Jobs a call.

Job ids are the Jobs' names (``manifest.job_object_name``), deterministic from the attempt, in the configured
namespace. Every Job and pod carries the labels ``app.kubernetes.io/managed-by=ccat-dagster`` and
``data.ccat.uni-koeln.de/job=<name>``; a poll lists both by these labels (``job in (...)``, up to 100 names a
call), so a restarted orchestrator finds the jobs of the attempts in ops-db by name without having submitted
them (reattach). Construction of the manifest is ``manifest``, reading the answers is
``job_status``, the API calls and their retries are ``client``.

A Job that disappears while this process watches it (``kubectl delete job``, or a deletion by another
process) is reported CANCELLED, "deleted outside ccat-dagster"; one this process never saw and the API no
longer has (deleted, or removed by ``ttlSecondsAfterFinished`` while the orchestrator was down) is unknown
to the scheduler (``UnknownJobError``): the runner fails that attempt as lost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from ccat_dagster.execution.hpc.base import (
    HpcBackend,
    JobInfo,
    JobSpec,
    JobState,
    JobSubmissionError,
    UnknownJobError,
)
from ccat_dagster.execution.hpc.kubernetes.client import KubernetesApiError, KubernetesClient
from ccat_dagster.execution.hpc.kubernetes.config import DNS_LABEL, KubernetesConfig
from ccat_dagster.execution.hpc.kubernetes.job_status import parse_job_status
from ccat_dagster.execution.hpc.kubernetes.manifest import (
    CONTAINER_NAME,
    LABEL_PREFIX,
    MANAGED_BY_SELECTOR,
    build_job_manifest,
)
from ccat_dagster.execution.hpc.kubernetes.metrics import memory_bytes_by_job
from ccat_dagster.opsdb.enums import FailureKind

__all__ = ["KubernetesBackend"]

log = logging.getLogger(__name__)
# Job names per list call: at most 63 characters each, so a selector stays under ~7 kB of URL.
SELECTOR_CHUNK = 100


class KubernetesBackend(HpcBackend):
    """Runs each JobSpec as one Kubernetes Job in ``config.namespace`` through ``client``.

    ``clock`` returns the current time (aware); it decides when a pod that cannot pull its image is given up.
    """

    name = "kubernetes"

    def __init__(
        self,
        *,
        config: KubernetesConfig,
        client: KubernetesClient,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.client = client
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._cancelled: set[str] = set()
        self._final: dict[str, JobInfo] = {}
        self._peak_bytes: dict[str, int] = {}
        # None until asked once; False on clusters without metrics-server (then never asked again).
        self._metrics_available: bool | None = None

    # --- submission -----------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> str:
        manifest = build_job_manifest(spec, self.config)
        name = manifest["metadata"]["name"]
        try:
            self.client.create_job(self.config.namespace, manifest)
        except KubernetesApiError as error:
            if error.status == 409 and self._is_same_attempt(name, spec):
                # A create repeated after a lost answer: the first one went through.
                pass
            else:
                raise JobSubmissionError(f"Kubernetes refused Job {name} for {spec.job_name!r}: {error}") from error
        with self._lock:
            self._seen.add(name)
        return name

    def _is_same_attempt(self, name: str, spec: JobSpec) -> bool:
        try:
            existing = self.client.read_job(self.config.namespace, name)
        except KubernetesApiError:
            return False
        annotations = (existing.get("metadata") or {}).get("annotations") or {}
        return annotations.get(f"{LABEL_PREFIX}job-name") == spec.job_name

    # --- status ---------------------------------------------------------------------------------

    def status_many(self, job_ids: Sequence[str]) -> dict[str, JobInfo]:
        wanted = list(dict.fromkeys(job_ids))
        invalid = [job_id for job_id in wanted if not DNS_LABEL.fullmatch(job_id)]
        if invalid:
            raise UnknownJobError(f"{invalid!r} are not Kubernetes Job names", job_ids=invalid)
        with self._lock:
            infos = {job_id: self._final[job_id] for job_id in wanted if job_id in self._final}
        open_ids = [job_id for job_id in wanted if job_id not in infos]
        if not open_ids:
            return infos
        namespace = self.config.namespace
        jobs: dict[str, dict] = {}
        pods_by_job: dict[str, list[dict]] = {}
        for selector in _selectors(open_ids):
            jobs.update((job["metadata"]["name"], job) for job in self.client.list_jobs(namespace, selector))
            for pod in self.client.list_pods(namespace, selector):
                owner = ((pod.get("metadata") or {}).get("labels") or {}).get(f"{LABEL_PREFIX}job")
                if owner:
                    pods_by_job.setdefault(owner, []).append(pod)
            self._sample_memory(namespace, selector)
        now = self.clock()
        missing: list[str] = []
        for job_id in open_ids:
            job = jobs.get(job_id)
            if job is None:
                info = self._vanished(job_id)
                if info is None:
                    missing.append(job_id)
                else:
                    infos[job_id] = info
                continue
            reading = parse_job_status(
                job, pods_by_job.get(job_id, []), now=now, image_pull_grace_seconds=self.config.image_pull_grace_seconds
            )
            info = reading.info
            if job_id in self._peak_bytes:
                info = replace(info, peak_memory_gb=self._peak_bytes[job_id] / 2**30)
            if reading.give_up:
                self._delete(job_id, propagation_policy="Background")
            with self._lock:
                self._seen.add(job_id)
                if job_id in self._cancelled and info.state is not JobState.COMPLETED:
                    info = _cancelled(job_id, "cancelled by ccat-dagster")
                if info.is_terminal:
                    self._final[job_id] = info
            infos[job_id] = info
        if missing:
            raise UnknownJobError(
                f"Kubernetes has no Jobs {missing!r} in namespace {namespace!r}: never created there, deleted, "
                "or removed after ttlSecondsAfterFinished (CCAT_WORKFLOW_MANAGER_K8S_TTL_SECONDS_AFTER_FINISHED)",
                job_ids=missing,
            )
        return {job_id: infos[job_id] for job_id in wanted}

    def _sample_memory(self, namespace: str, selector: str) -> None:
        """Keep the largest memory sample per Job (see ``metrics``); one list call, skipped without metrics."""
        if self._metrics_available is False:
            return
        try:
            items = self.client.list_pod_metrics(namespace, selector)
        except KubernetesApiError as error:
            if error.status in (403, 404):  # no metrics-server, or not allowed: never ask again
                log.info("no pod metrics from the cluster (%s): peak memory stays unknown", error)
                self._metrics_available = False
            return
        self._metrics_available = True
        for job_id, used in memory_bytes_by_job(items).items():
            self._peak_bytes[job_id] = max(self._peak_bytes.get(job_id, 0), used)

    def _vanished(self, job_id: str) -> JobInfo | None:
        """A Job the API no longer lists: cancelled (by us, or deleted while we watched) or unknown (None)."""
        with self._lock:
            if job_id in self._cancelled:
                info = _cancelled(job_id, "cancelled by ccat-dagster")
            elif job_id in self._seen:
                info = _cancelled(job_id, "the Job was deleted outside ccat-dagster")
            else:
                return None
            self._final[job_id] = info
            return info

    # --- cancel / logs --------------------------------------------------------------------------

    def cancel(self, job_id: str) -> None:
        """Delete the Job with foreground propagation (its pod goes first); a finished or gone Job is left."""
        if not DNS_LABEL.fullmatch(job_id):
            raise UnknownJobError(f"{job_id!r} is not a Kubernetes Job name", job_ids=[job_id])
        with self._lock:
            if job_id in self._final:
                return
        try:
            job = self.client.read_job(self.config.namespace, job_id)
        except KubernetesApiError as error:
            if error.status == 404:
                return
            raise
        reading = parse_job_status(job, [], now=self.clock(), image_pull_grace_seconds=float("inf"))
        if reading.info.state in (JobState.COMPLETED, JobState.FAILED):
            return
        with self._lock:
            self._cancelled.add(job_id)
        self._delete(job_id, propagation_policy="Foreground")

    def _delete(self, job_id: str, *, propagation_policy: str) -> None:
        try:
            self.client.delete_job(self.config.namespace, job_id, propagation_policy=propagation_policy)
        except KubernetesApiError as error:
            if error.status != 404:
                raise

    def logs(self, job_id: str, *, tail_lines: int = 50) -> str:
        """The pod's log (its container's stdout and stderr, interleaved as Kubernetes keeps them).

        Empty when the pod never started or is gone; a note instead of an error when the API cannot say.
        """
        if tail_lines < 0:
            raise ValueError(f"tail_lines={tail_lines}: must be >= 0")
        if not DNS_LABEL.fullmatch(job_id):
            raise UnknownJobError(f"{job_id!r} is not a Kubernetes Job name", job_ids=[job_id])
        namespace = self.config.namespace
        try:
            pods = self.client.list_pods(namespace, f"{MANAGED_BY_SELECTOR},{LABEL_PREFIX}job={job_id}")
            if not pods or tail_lines == 0:
                return ""
            pod = max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "")
            pod_name = pod["metadata"]["name"]
            text = self.client.pod_log(namespace, pod_name, container=CONTAINER_NAME, tail_lines=tail_lines)
        except KubernetesApiError as error:
            if error.status in (400, 404):  # the container never started, or the pod is gone
                return ""
            return f"(the pod log of Job {job_id} is not available: {error})"
        return f"==> pod {pod_name} <==\n{text}" if text else ""


def _selectors(job_ids: Sequence[str]) -> list[str]:
    """Label selectors for these Jobs (and their pods), ``SELECTOR_CHUNK`` names each.

    Selecting by name keeps a poll's answer to the Jobs asked about: the namespace also holds other runs' Jobs and
    finished ones kept for ``ttlSecondsAfterFinished``, thousands on a busy day.
    """
    return [
        f"{MANAGED_BY_SELECTOR},{LABEL_PREFIX}job in ({','.join(job_ids[start : start + SELECTOR_CHUNK])})"
        for start in range(0, len(job_ids), SELECTOR_CHUNK)
    ]


def _cancelled(job_id: str, reason: str) -> JobInfo:
    return JobInfo(job_id=job_id, state=JobState.CANCELLED, reason=reason, failure_kind=FailureKind.CANCELLED)
