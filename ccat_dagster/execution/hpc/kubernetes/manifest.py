"""A JobSpec as a ``batch/v1`` Job manifest: pure construction, no API calls (golden-tested).

One Job per attempt, named deterministically from the attempt's job name, so a create that is repeated after a
lost answer finds the same Job instead of starting a second one. ``backoffLimit: 0`` and ``restartPolicy: Never``:
retries belong to the step runner. The time limit is ``activeDeadlineSeconds`` minus the pre-walltime warning,
which becomes the pod's ``terminationGracePeriodSeconds``: at the deadline Kubernetes sends SIGTERM, and SIGKILL
that long afterwards, so the payload gets its warning and the whole attempt stays within its limit.

Two shapes of container:

* a host command (Apptainer): the container is ``K8S_JOB_IMAGE``, its command the runtime's command line, and it
  mounts every configured volume at its own path, so the command's host paths exist inside it;
* the step's own image (``JobSpec.container``, ``CONTAINER_RUNTIME=oci``): the container is that image by digest,
  its command the payload's entrypoint, its environment the contract's; it mounts only the contract's
  ``/workflow`` directories, each a ``subPath`` of the volume holding its host path, read-only where the contract
  says so, and an empty ``/tmp``. It runs as a non-root user without privilege escalation or capabilities, on a
  read-only root file system, with the runtime's default seccomp profile (the contract allows writes only to
  its read-write mounts and ``/tmp``).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from ccat_dagster.execution.contract import short_hash
from ccat_dagster.execution.hpc.base import InvalidJobSpecError, JobContainer, JobResources, JobSpec
from ccat_dagster.execution.hpc.kubernetes.config import KubernetesConfig, VolumeSpec

__all__ = [
    "CONTAINER_NAME",
    "LABEL_PREFIX",
    "MANAGED_BY_SELECTOR",
    "AttemptIdentity",
    "attempt_identity",
    "build_job_manifest",
    "job_object_name",
    "label_value",
    "quantity_cpu",
    "quantity_memory",
]

CONTAINER_NAME = "step"
LABEL_PREFIX = "data.ccat.uni-koeln.de/"
MANAGED_BY = ("app.kubernetes.io/managed-by", "ccat-dagster")
MANAGED_BY_SELECTOR = f"{MANAGED_BY[0]}={MANAGED_BY[1]}"
_NAME_MAX = 63
_INVALID_NAME_CHARS = re.compile(r"[^a-z0-9-]+")
_INVALID_LABEL_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class AttemptIdentity:
    """Which attempt a job belongs to, read from its log directory (the contract's attempt layout)."""

    pipeline: str
    sub_group_key: str
    step: str
    attempt_id: str


def attempt_identity(spec: JobSpec) -> AttemptIdentity | None:
    """``<base>/<pipeline>/<sub_group_key>/attempts/<step>/<attempt id>/logs`` → its parts; None otherwise."""
    parts = PurePosixPath(spec.log_dir).parts
    if len(parts) < 7 or parts[-1] != "logs" or parts[-4] != "attempts":
        return None
    return AttemptIdentity(pipeline=parts[-6], sub_group_key=parts[-5], step=parts[-3], attempt_id=parts[-2])


def job_object_name(job_name: str) -> str:
    """The Job's name: ``job_name`` as an RFC 1123 label of at most 63 characters.

    A name that had to change (case, characters, length) gets a hash of the original, so two job names never
    map to one Job.
    """
    cleaned = _INVALID_NAME_CHARS.sub("-", job_name.lower()).strip("-")
    if cleaned == job_name and len(cleaned) <= _NAME_MAX:
        return cleaned
    digest = short_hash(job_name)
    head = cleaned[: _NAME_MAX - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}" if head else f"ccat-{digest}"


def label_value(value: str) -> str:
    """``value`` as a label value (at most 63 of ``A-Za-z0-9_.-``, alphanumeric at both ends); a changed
    value gets a hash of the original. The unchanged value is always in the annotations."""
    cleaned = _INVALID_LABEL_CHARS.sub("_", value).strip("_.-")
    if cleaned == value and len(cleaned) <= _NAME_MAX:
        return cleaned
    digest = short_hash(value)
    head = cleaned[: _NAME_MAX - len(digest) - 1].strip("_.-")
    return f"{head}_{digest}" if head else digest


def quantity_cpu(cpu: int) -> str:
    return str(cpu)


def quantity_memory(memory_gb: float) -> str:
    """GiB as a Kubernetes quantity: whole GiB as ``<n>Gi``, otherwise whole MiB rounded up."""
    mebibytes = memory_gb * 1024
    if float(memory_gb).is_integer():
        return f"{int(memory_gb)}Gi"
    return f"{int(-(-round(mebibytes, 6) // 1))}Mi"


def _resources(resources: JobResources, config: KubernetesConfig) -> dict[str, Any]:
    # Requests equal limits: the pod gets the Guaranteed QoS class, as a Slurm allocation is guaranteed.
    amounts: dict[str, str] = {"cpu": quantity_cpu(resources.cpu), "memory": quantity_memory(resources.memory_gb)}
    if resources.gpus:
        amounts[config.gpu_resource] = str(resources.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _deadline(spec: JobSpec) -> tuple[int, int]:
    """(activeDeadlineSeconds, terminationGracePeriodSeconds) that together stay within the time limit."""
    limit = spec.resources.time_limit_seconds
    warning = min(spec.pre_walltime_signal_seconds, limit // 2)
    return max(1, limit - warning), warning


def _labels(spec: JobSpec, name: str, config: KubernetesConfig) -> tuple[dict[str, str], dict[str, str]]:
    labels = {MANAGED_BY[0]: MANAGED_BY[1], **config.extra_labels, f"{LABEL_PREFIX}job": name}
    annotations = {f"{LABEL_PREFIX}job-name": spec.job_name, f"{LABEL_PREFIX}log-dir": str(spec.log_dir)}
    identity = attempt_identity(spec)
    if identity is not None:
        for key, value in (
            ("pipeline", identity.pipeline),
            ("step", identity.step),
            ("sub-group", identity.sub_group_key),
            ("attempt", identity.attempt_id),
        ):
            labels[LABEL_PREFIX + key] = label_value(value)
            annotations[LABEL_PREFIX + key] = value
    return labels, annotations


def _volumes(spec: JobSpec, config: KubernetesConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    for path, what in ((spec.log_dir, "log directory"), (spec.workdir, "working directory")):
        if path is not None and config.volume_for(PurePosixPath(path)) is None:
            raise InvalidJobSpecError(
                f"job {spec.job_name!r}: its {what} {path} is on no volume of the Job, so the pod could not "
                "see it; add a volume for it to CCAT_WORKFLOW_MANAGER_K8S_VOLUMES (e.g. "
                "pvc:<claim>:<PIPELINE_BASE_DIR>)"
            )
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    for index, volume in enumerate(config.volumes):
        volume_name = f"data-{index}"
        volumes.append(_volume_source(volume_name, volume))
        mounts.append({"name": volume_name, "mountPath": volume.mount_path, "readOnly": volume.read_only})
    return volumes, mounts


TMP_VOLUME = "tmp"


def _own_image_volumes(
    spec: JobSpec, job: JobContainer, config: KubernetesConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The contract's mounts as ``subPath`` mounts of the configured volumes, and an empty ``/tmp``."""
    used: dict[int, VolumeSpec] = {}
    mounts: list[dict[str, Any]] = []
    for mount in job.mounts:
        host = posixpath.normpath(str(mount.host))
        volume = config.volume_for(PurePosixPath(host))
        if volume is None:
            raise InvalidJobSpecError(
                f"job {spec.job_name!r}: {host} (mounted at {mount.container}) is on no volume of the Job; add "
                "the volume that holds it to CCAT_WORKFLOW_MANAGER_K8S_VOLUMES (e.g. pvc:<claim>:<PIPELINE_BASE_DIR>)"
            )
        if volume.read_only and not mount.read_only:
            raise InvalidJobSpecError(
                f"job {spec.job_name!r}: the contract writes to {mount.container}, but its host path {host} is on "
                f"the read-only volume {volume.source} ({volume.mount_path}); mount that volume read-write"
            )
        index = config.volumes.index(volume)
        used[index] = volume
        entry: dict[str, Any] = {"name": f"data-{index}", "mountPath": mount.container, "readOnly": mount.read_only}
        relative = posixpath.relpath(host, volume.mount_path)
        if relative != ".":
            entry["subPath"] = relative
        mounts.append(entry)
    volumes = [_volume_source(f"data-{index}", config.volumes[index]) for index in sorted(used)]
    volumes.append({"name": TMP_VOLUME, "emptyDir": {}})
    mounts.append({"name": TMP_VOLUME, "mountPath": "/tmp", "readOnly": False})
    return volumes, mounts


def _volume_source(name: str, volume: VolumeSpec) -> dict[str, Any]:
    if volume.kind == "pvc":
        return {"name": name, "persistentVolumeClaim": {"claimName": volume.source, "readOnly": volume.read_only}}
    return {"name": name, "hostPath": {"path": volume.source, "type": "Directory"}}


def _security_context(config: KubernetesConfig) -> dict[str, Any]:
    context: dict[str, Any] = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if config.run_as_user:
        uid, _, gid = config.run_as_user.partition(":")
        context["runAsUser"] = int(uid)
        if gid:
            context["runAsGroup"] = int(gid)
    return context


def build_job_manifest(spec: JobSpec, config: KubernetesConfig) -> dict[str, Any]:
    """The Job for ``spec`` as the API's JSON (camelCase keys), ready for ``create_namespaced_job``."""
    name = job_object_name(spec.job_name)
    labels, annotations = _labels(spec, name, config)
    volumes, mounts = _volumes(spec, config)
    deadline, grace = _deadline(spec)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": config.job_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": list(spec.command),
        "env": [{"name": key, "value": spec.env[key]} for key in sorted(spec.env)],
        "resources": _resources(spec.resources, config),
        "volumeMounts": mounts,
    }
    if spec.workdir is not None:
        container["workingDir"] = str(spec.workdir)
    if spec.container is not None:
        volumes, container["volumeMounts"] = _own_image_volumes(spec, spec.container, config)
        # Pinned by digest: the node's copy is the image, so it is pulled only when absent.
        container.update(
            image=spec.container.image,
            imagePullPolicy="IfNotPresent",
            workingDir=spec.container.workdir,
            securityContext=_security_context(config),
        )
        annotations[f"{LABEL_PREFIX}image"] = spec.container.image
    elif not config.job_image:
        raise InvalidJobSpecError(
            f"job {spec.job_name!r} is a host command (CONTAINER_RUNTIME apptainer or bubblewrap) and "
            "CCAT_WORKFLOW_MANAGER_K8S_JOB_IMAGE is empty: set it to the image that carries Apptainer, or use "
            "CONTAINER_RUNTIME=oci"
        )
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": grace,
        # The payload never talks to the Kubernetes API: no token in its file system.
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": volumes,
    }
    if config.service_account:
        pod_spec["serviceAccountName"] = config.service_account
    if config.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": secret} for secret in config.image_pull_secrets]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": config.namespace, "labels": labels, "annotations": annotations},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": deadline,
            "ttlSecondsAfterFinished": config.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": dict(labels), "annotations": dict(annotations)}, "spec": pod_spec},
        },
    }
