"""What the Kubernetes backend is configured with: namespace, Job image, volumes, pod options (no I/O here).

The Job's container runs the command the container runtime built on the orchestrator's host (an
``apptainer exec --bind <host path>:/workflow/... ...`` line), so every host path in it must exist at the same
path inside the Job's container. The volumes say how: each mounts a PersistentVolumeClaim or a node's host path
at an absolute path, normally ``PIPELINE_BASE_DIR``, the staged-data directory and ``SIF_CACHE_DIR``.

With ``CONTAINER_RUNTIME=oci`` the Job's container is the step's own image instead, and it mounts only the
contract's ``/workflow`` directories, each a ``subPath`` of the volume that holds its host path.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from ccat_dagster.execution.hpc.base import HpcError

__all__ = [
    "AUTH_MODES",
    "DNS_LABEL",
    "KubernetesConfig",
    "KubernetesConfigError",
    "VolumeSpec",
    "parse_volume_specs",
]

# RFC 1123 label (namespaces, Job and container names) and subdomain (claims, secrets, service accounts).
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# An extended resource name such as nvidia.com/gpu or amd.com/gpu.
RESOURCE_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
PULL_POLICIES = ("IfNotPresent", "Always", "Never")
AUTH_MODES = ("auto", "in-cluster", "kubeconfig")
VOLUME_KINDS = ("pvc", "host")


class KubernetesConfigError(HpcError, ValueError):
    """A Kubernetes backend setting that cannot work; the message names the value and the fix."""


@dataclass(frozen=True)
class VolumeSpec:
    """One volume of every Job: a PVC (``kind="pvc"``, ``source`` = claim name) or a node directory
    (``kind="host"``, ``source`` = absolute path on the node), mounted at ``mount_path`` in the container."""

    kind: str
    source: str
    mount_path: str
    read_only: bool = False

    def __post_init__(self) -> None:
        if self.kind not in VOLUME_KINDS:
            raise KubernetesConfigError(f"volume kind {self.kind!r} is unknown: use pvc or host")
        if self.kind == "pvc" and not DNS_SUBDOMAIN.fullmatch(self.source):
            raise KubernetesConfigError(
                f"PVC name {self.source!r} is not a Kubernetes name: lower-case letters, digits, '-' and '.'"
            )
        if self.kind == "host":
            _require_absolute(self.source, "host path")
        _require_absolute(self.mount_path, "mount path")

    def covers(self, path: str | PurePosixPath) -> bool:
        """True when ``path`` is this volume's mount path or below it."""
        return PurePosixPath(path).is_relative_to(PurePosixPath(self.mount_path))


def _require_absolute(path: str, what: str) -> None:
    if not path.startswith("/") or posixpath.normpath(path) != path or any(c in path for c in ",:\0"):
        raise KubernetesConfigError(
            f"{what} {path!r} must be an absolute, normalised path without ',' or ':' (e.g. /data/pipelines)"
        )


def parse_volume_specs(raw: str) -> tuple[VolumeSpec, ...]:
    """``pvc:<claim>:<mount path>[:ro]`` or ``host:<node path>:<mount path>[:ro]``, comma-separated."""
    volumes: list[VolumeSpec] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        parts = item.split(":")
        read_only = len(parts) == 4 and parts[3] == "ro"
        if len(parts) not in (3, 4) or (len(parts) == 4 and not read_only):
            raise KubernetesConfigError(
                f"volume {item!r} is not <pvc|host>:<claim or node path>:<mount path>[:ro] "
                "(e.g. pvc:ccat-pipelines:/data/pipelines)"
            )
        volumes.append(VolumeSpec(kind=parts[0], source=parts[1], mount_path=parts[2], read_only=read_only))
    mount_paths = [volume.mount_path for volume in volumes]
    duplicates = sorted({path for path in mount_paths if mount_paths.count(path) > 1})
    if duplicates:
        raise KubernetesConfigError(f"several volumes are mounted at {', '.join(duplicates)}; give each its own path")
    return tuple(volumes)


@dataclass(frozen=True)
class KubernetesConfig:
    """Everything a Job manifest needs besides the JobSpec itself.

    ``job_image``: the image of the Job's container, which runs the runtime's command (it carries Apptainer);
    empty when every job brings its own image (``CONTAINER_RUNTIME=oci``).
    ``run_as_user``: ``uid[:gid]`` a job's own image runs as; empty: the image's user, which must not be root.
    ``ttl_seconds_after_finished``: how long Kubernetes keeps a finished Job and its pod (and their logs).
    ``image_pull_grace_seconds``: how long a pod may fail to pull its image (Kubernetes keeps retrying)
    before the attempt is failed.
    """

    namespace: str
    job_image: str
    volumes: tuple[VolumeSpec, ...] = ()
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    service_account: str = ""
    ttl_seconds_after_finished: int = 86400
    gpu_resource: str = "nvidia.com/gpu"
    image_pull_grace_seconds: float = 300.0
    extra_labels: dict[str, str] = field(default_factory=dict)
    run_as_user: str = ""

    def __post_init__(self) -> None:
        if not DNS_LABEL.fullmatch(self.namespace):
            raise KubernetesConfigError(
                f"namespace {self.namespace!r} is not a Kubernetes namespace name: 1-63 lower-case letters, "
                "digits and '-', starting and ending with a letter or digit"
            )
        if self.job_image != self.job_image.strip() or any(c.isspace() for c in self.job_image):
            raise KubernetesConfigError(
                f"Job image {self.job_image!r} holds spaces: name the image that carries Apptainer, "
                "e.g. registry.example.org/ccat/apptainer-runner:1.3"
            )
        if self.run_as_user and not re.fullmatch(r"[0-9]{1,10}(:[0-9]{1,10})?", self.run_as_user):
            raise KubernetesConfigError(f"run as user {self.run_as_user!r} is not a numeric uid or uid:gid")
        if self.image_pull_policy not in PULL_POLICIES:
            raise KubernetesConfigError(
                f"image pull policy {self.image_pull_policy!r} is invalid: use one of {', '.join(PULL_POLICIES)}"
            )
        for name in (*self.image_pull_secrets, *([self.service_account] if self.service_account else [])):
            if not DNS_SUBDOMAIN.fullmatch(name):
                raise KubernetesConfigError(
                    f"{name!r} is not a Kubernetes object name (secret / service account): lower-case letters, "
                    "digits, '-' and '.'"
                )
        if self.ttl_seconds_after_finished < 0:
            raise KubernetesConfigError(
                f"ttlSecondsAfterFinished={self.ttl_seconds_after_finished}: must be >= 0 seconds"
            )
        if not RESOURCE_NAME.fullmatch(self.gpu_resource):
            raise KubernetesConfigError(
                f"GPU resource {self.gpu_resource!r} is not a resource name such as nvidia.com/gpu"
            )

    def volume_for(self, path: str | PurePosixPath) -> VolumeSpec | None:
        """The volume whose mount holds ``path`` (the deepest one), or None."""
        holding = [volume for volume in self.volumes if volume.covers(path)]
        return max(holding, key=lambda volume: len(volume.mount_path), default=None)
