"""Settings from the environment (SPEC §9). Invalid values stop start-up with one line naming the fix.

Every variable has the prefix ``CCAT_WORKFLOW_MANAGER_`` except the ops-db URL (``CCAT_OPS_DB_URL``) and the
local data directory (``CCAT_DAGSTER_DATA_DIR``) that the laptop defaults live under.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ccat_dagster.errors import CcatError

PREFIX = "CCAT_WORKFLOW_MANAGER_"
OPS_DB_URL_VAR = "CCAT_OPS_DB_URL"
DATA_DIR_VAR = "CCAT_DAGSTER_DATA_DIR"

HPC_BACKENDS = ("local", "slurm", "kubernetes")
CONTAINER_RUNTIMES = ("apptainer", "bubblewrap")
STAGERS = ("local", "external")
IMAGE_CHANGE_POLICIES = ("refuse", "new_build")


class SettingsError(CcatError, ValueError):
    """A setting ccat-dagster cannot use; the message names the variable and the allowed values."""


def _choice(allowed: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise SettingsError(f"{name}={raw!r} is invalid: allowed values are {', '.join(allowed)}")
        return value

    return parse


def _int(minimum: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is invalid: expected a whole number ≥ {minimum}") from None
        if value < minimum:
            raise SettingsError(f"{name}={raw!r} is invalid: expected a whole number ≥ {minimum}")
        return value

    return parse


def _optional_int(name: str, raw: str) -> int | None:
    return None if raw.strip() == "" else _int(1)(name, raw)


def _path(name: str, raw: str) -> Path:
    if not raw.strip():
        raise SettingsError(f"{name} is empty: give an absolute or relative directory path")
    return Path(raw).expanduser().resolve()


def _str(_name: str, raw: str) -> str:
    return raw.strip()


def _db_url(name: str, raw: str) -> str:
    value = raw.strip()
    if not value.startswith(("postgresql", "sqlite")):
        raise SettingsError(
            f"{name}={_redact_url(value)!r} is invalid: expected a SQLAlchemy URL starting with "
            "postgresql:// (production) or sqlite:/// (first-run demo)"
        )
    return value


def _redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


def _bounded_int(minimum: int, maximum: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        value = _int(minimum)(name, raw)
        if value > maximum:
            raise SettingsError(f"{name}={raw!r} is invalid: expected a whole number from {minimum} to {maximum}")
        return value

    return parse


# The step runner's tolerances and bounds: key → (default, parser, allowed values as documented).
RUNNER_SETTINGS: dict[str, tuple[str, Callable[[str, str], Any], str]] = {
    "SCHEDULER_TOLERANCE_SECONDS": (
        "900",
        _bounded_int(0, 86_400),
        "seconds status queries may fail before waiting attempts fail as scheduler_unavailable, 0–86400",
    ),
    "SCHEDULER_QUERIES_PER_MINUTE": (
        "20",
        _bounded_int(1, 6_000),
        "Slurm status calls (squeue, sacct) per minute all runs of this location may send together, 1–6000",
    ),
    "PACKED_EXECUTION": (
        "auto",
        _choice(("auto", "off")),
        "auto (steps with execution mode auto pack when short and Parsl is installed; HPC_BACKEND=slurm), off",
    ),
    "PACKED_MAX_TASK_MINUTES": (
        "30",
        _bounded_int(1, 10_080),
        "steps of execution mode auto whose time_hours is at most this many minutes run packed, 1–10080",
    ),
    "PACKED_MAX_ALLOCATIONS": ("2", _bounded_int(1, 1_000), "Slurm allocations one packed batch may hold, 1–1000"),
    "PACKED_CORES_PER_ALLOCATION": (
        "2",
        _bounded_int(1, 4_096),
        "cores of one packed allocation (tasks of `cpu` cores each share it), 1–4096",
    ),
    "PACKED_WALLTIME_MINUTES": (
        "60",
        _bounded_int(1, 10_080),
        "time limit of one packed allocation; longer tasks are refused, 1–10080",
    ),
    "PACKED_IDLE_SECONDS": (
        "60",
        _bounded_int(1, 86_400),
        "an allocation without work for this long is released, 1–86400",
    ),
    "OPS_DB_TOLERANCE_SECONDS": (
        "300",
        _bounded_int(0, 86_400),
        "seconds an ops-db call is retried through connection failures, 0–86400",
    ),
    "MAX_MEMORY_GB": ("512", _bounded_int(1, 65_536), "most memory (GiB) a retry after oom may ask for, 1–65536"),
    "MAX_TIME_HOURS": ("48", _bounded_int(1, 8_760), "most time (hours) a retry after walltime may ask for, 1–8760"),
    "MAX_PRODUCTS_PER_ATTEMPT": (
        "10000",
        _bounded_int(1, 1_000_000),
        "more output files than this fail the attempt (contract), 1–1000000",
    ),
}


@dataclass(frozen=True)
class Settings:
    """All configuration of one ccat-dagster deployment (one processing location)."""

    data_dir: Path
    ops_db_url: str
    hpc_backend: str
    container_runtime: str
    pipeline_base_dir: Path
    processing_location_id: int | None
    slurm_partition: str
    k8s_namespace: str
    sif_cache_dir: Path
    stager: str
    max_concurrent_jobs: int
    local_max_running: int
    max_partitions_per_run: int
    poll_interval_seconds: int
    staging_timeout_seconds: int
    sensor_batch_limit: int
    sensor_interval_seconds: int
    watermark_overlap_seconds: int
    retention_days: int
    # The step runner's tolerances and bounds (RUNNER_SETTINGS below).
    scheduler_tolerance_seconds: int
    scheduler_queries_per_minute: int
    packed_execution: str
    packed_max_task_minutes: int
    packed_max_allocations: int
    packed_cores_per_allocation: int
    packed_walltime_minutes: int
    packed_idle_seconds: int
    ops_db_tolerance_seconds: int
    max_memory_gb: int
    max_time_hours: int
    max_products_per_attempt: int
    kubernetes: KubernetesSettings
    image_change_policy: str

    @property
    def redacted_ops_db_url(self) -> str:
        return _redact_url(self.ops_db_url)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        data_dir = _path(DATA_DIR_VAR, env.get(DATA_DIR_VAR, ".data"))
        defaults: dict[str, str] = {
            "HPC_BACKEND": "local",
            "CONTAINER_RUNTIME": "apptainer",
            "PIPELINE_BASE_DIR": str(data_dir / "pipelines"),
            "PROCESSING_LOCATION_ID": "",
            "SLURM_PARTITION": "",
            "K8S_NAMESPACE": "ccat",
            "SIF_CACHE_DIR": str(data_dir / "sif-cache"),
            "STAGER": "local",
            "MAX_CONCURRENT_JOBS": "100",
            "LOCAL_MAX_RUNNING": str(os.cpu_count() or 1),
            "MAX_PARTITIONS_PER_RUN": "200",
            "POLL_INTERVAL_SECONDS": "2",
            "STAGING_TIMEOUT_SECONDS": "3600",
            "SENSOR_BATCH_LIMIT": "5000",
            "SENSOR_INTERVAL_SECONDS": "30",
            "WATERMARK_OVERLAP_SECONDS": "300",
            "RETENTION_DAYS": "30",
            "IMAGE_CHANGE_POLICY": "refuse",
        }
        parsers: dict[str, Callable[[str, str], Any]] = {
            "HPC_BACKEND": _choice(HPC_BACKENDS),
            "CONTAINER_RUNTIME": _choice(CONTAINER_RUNTIMES),
            "PIPELINE_BASE_DIR": _path,
            "PROCESSING_LOCATION_ID": _optional_int,
            "SLURM_PARTITION": _str,
            "K8S_NAMESPACE": _str,
            "SIF_CACHE_DIR": _path,
            "STAGER": _choice(STAGERS),
            "MAX_CONCURRENT_JOBS": _int(1),
            "LOCAL_MAX_RUNNING": _int(1),
            "MAX_PARTITIONS_PER_RUN": _int(1),
            "POLL_INTERVAL_SECONDS": _int(1),
            "STAGING_TIMEOUT_SECONDS": _int(1),
            "SENSOR_BATCH_LIMIT": _int(1),
            "SENSOR_INTERVAL_SECONDS": _int(1),
            "WATERMARK_OVERLAP_SECONDS": _int(0),
            "RETENTION_DAYS": _int(0),
            "IMAGE_CHANGE_POLICY": _choice(IMAGE_CHANGE_POLICIES),
        }
        defaults.update({key: default for key, (default, _, _) in RUNNER_SETTINGS.items()})
        parsers.update({key: parse for key, (_, parse, _) in RUNNER_SETTINGS.items()})
        values: dict[str, Any] = {"data_dir": data_dir}
        for key, parse in parsers.items():
            name = PREFIX + key
            values[key.lower()] = parse(name, env.get(name, defaults[key]))
        values["ops_db_url"] = _db_url(
            OPS_DB_URL_VAR, env.get(OPS_DB_URL_VAR, f"sqlite:///{data_dir / 'opsdb.sqlite'}")
        )
        values["kubernetes"] = KubernetesSettings.from_env(env)
        if values["hpc_backend"] == "kubernetes":
            values["kubernetes"].require_usable(
                pipeline_base_dir=values["pipeline_base_dir"], namespace=values["k8s_namespace"]
            )
        return cls(**values)

    def as_environment(self) -> dict[str, str]:
        """The settings as environment variables (for child processes such as the Dagster code server)."""
        env = {DATA_DIR_VAR: str(self.data_dir), OPS_DB_URL_VAR: self.ops_db_url}
        for field in fields(self):
            if field.name in ("data_dir", "ops_db_url", "kubernetes"):
                continue
            value = getattr(self, field.name)
            env[PREFIX + field.name.upper()] = "" if value is None else str(value)
        env.update(self.kubernetes.as_environment())
        return env


def variable_reference() -> list[tuple[str, str, str]]:
    """(variable, default, allowed values) for the configuration reference and ``doctor``."""
    return (
        [
            (DATA_DIR_VAR, "./.data", "a directory"),
            (OPS_DB_URL_VAR, "sqlite:///<data dir>/opsdb.sqlite", "postgresql://… or sqlite:///…"),
            (PREFIX + "HPC_BACKEND", "local", ", ".join(HPC_BACKENDS)),
            (PREFIX + "CONTAINER_RUNTIME", "apptainer", ", ".join(CONTAINER_RUNTIMES)),
            (PREFIX + "PIPELINE_BASE_DIR", "<data dir>/pipelines", "a writable directory"),
            (PREFIX + "PROCESSING_LOCATION_ID", "(the only processing location)", "a DataLocation id"),
            (PREFIX + "SLURM_PARTITION", "(cluster default)", "a Slurm partition name"),
            (PREFIX + "K8S_NAMESPACE", "ccat", "a Kubernetes namespace"),
            (PREFIX + "SIF_CACHE_DIR", "<data dir>/sif-cache", "a writable directory"),
            (PREFIX + "STAGER", "local", ", ".join(STAGERS)),
            (PREFIX + "MAX_CONCURRENT_JOBS", "100", "jobs in flight per backend from this location, ≥ 1"),
            (PREFIX + "LOCAL_MAX_RUNNING", "(number of CPUs)", "local backend: jobs running at once, ≥ 1"),
            (PREFIX + "MAX_PARTITIONS_PER_RUN", "200", "sub-groups one Dagster run materializes, ≥ 1"),
            (PREFIX + "POLL_INTERVAL_SECONDS", "2", "longest pause between job status polls (first 0.2 s), ≥ 1"),
            (PREFIX + "STAGING_TIMEOUT_SECONDS", "3600", "seconds a run waits for staging, ≥ 1"),
            (PREFIX + "SENSOR_BATCH_LIMIT", "5000", "changed packages read per sensor tick, ≥ 1"),
            (PREFIX + "SENSOR_INTERVAL_SECONDS", "30", "least seconds between two ticks of a pipeline's sensor, ≥ 1"),
            (PREFIX + "WATERMARK_OVERLAP_SECONDS", "300", "re-read window of the change watermark, ≥ 0"),
            (PREFIX + "RETENTION_DAYS", "30", "days before consumed intermediates may be deleted, ≥ 0"),
            (
                PREFIX + "IMAGE_CHANGE_POLICY",
                "refuse",
                "refuse, new_build: what a changed image under one version does",
            ),
        ]
        + [(PREFIX + key, default, allowed) for key, (default, _, allowed) in RUNNER_SETTINGS.items()]
        + kubernetes_variable_reference()
    )


# --------------------------------------------------------------------------------------------- Kubernetes

# name → (default, allowed values for the reference). K8S_NAMESPACE stays with the general settings above.
_K8S_VARIABLES: dict[str, tuple[str, str]] = {
    "K8S_AUTH": ("auto", "auto (in-cluster inside a pod, else kubeconfig), in-cluster, kubeconfig"),
    "K8S_KUBECONFIG": ("", "kubeconfig file (empty: $KUBECONFIG, else ~/.kube/config)"),
    "K8S_CONTEXT": ("", "kubeconfig context (empty: its current context)"),
    "K8S_JOB_IMAGE": ("", "image of the Job's container, which runs the Apptainer command; required"),
    "K8S_IMAGE_PULL_POLICY": ("IfNotPresent", "IfNotPresent, Always, Never"),
    "K8S_IMAGE_PULL_CREDENTIALS": ("", "comma-separated Secret names (empty: none)"),
    "K8S_SERVICE_ACCOUNT": ("", "service account of the Job pods (empty: the namespace's default)"),
    "K8S_VOLUMES": ("", "comma-separated pvc:<claim>:<mount path>[:ro] or host:<node path>:<mount path>[:ro]"),
    "K8S_TTL_SECONDS_AFTER_FINISHED": ("86400", "seconds Kubernetes keeps a finished Job and its pod log, ≥ 0"),
    "K8S_GPU_RESOURCE": ("nvidia.com/gpu", "extended resource name that `gpus` asks for"),
    "K8S_IMAGE_PULL_GRACE_SECONDS": ("300", "seconds a pod may fail to pull its image before the attempt fails, ≥ 0"),
}


@dataclass(frozen=True)
class KubernetesSettings:
    """The ``K8S_*`` settings of the Kubernetes backend (read for every backend, checked in full when chosen)."""

    auth: str
    kubeconfig: str
    context: str
    job_image: str
    image_pull_policy: str
    image_pull_secrets: tuple[str, ...]
    service_account: str
    volumes_spec: str
    ttl_seconds_after_finished: int
    gpu_resource: str
    image_pull_grace_seconds: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KubernetesSettings:
        from ccat_dagster.execution.hpc.kubernetes.config import (
            AUTH_MODES,
            PULL_POLICIES,
            KubernetesConfigError,
            parse_volume_specs,
        )

        def raw(key: str) -> str:
            return env.get(PREFIX + key, _K8S_VARIABLES[key][0]).strip()

        auth = _choice(AUTH_MODES)(PREFIX + "K8S_AUTH", raw("K8S_AUTH"))
        policy = raw("K8S_IMAGE_PULL_POLICY")
        if policy not in PULL_POLICIES:
            raise SettingsError(
                f"{PREFIX}K8S_IMAGE_PULL_POLICY={policy!r} is invalid: allowed values are {', '.join(PULL_POLICIES)}"
            )
        try:
            parse_volume_specs(raw("K8S_VOLUMES"))
        except KubernetesConfigError as error:
            raise SettingsError(f"{PREFIX}K8S_VOLUMES: {error}") from None
        return cls(
            auth=auth,
            kubeconfig=raw("K8S_KUBECONFIG"),
            context=raw("K8S_CONTEXT"),
            job_image=raw("K8S_JOB_IMAGE"),
            image_pull_policy=policy,
            image_pull_secrets=tuple(p.strip() for p in raw("K8S_IMAGE_PULL_CREDENTIALS").split(",") if p.strip()),
            service_account=raw("K8S_SERVICE_ACCOUNT"),
            volumes_spec=raw("K8S_VOLUMES"),
            ttl_seconds_after_finished=_int(0)(
                PREFIX + "K8S_TTL_SECONDS_AFTER_FINISHED", raw("K8S_TTL_SECONDS_AFTER_FINISHED")
            ),
            gpu_resource=raw("K8S_GPU_RESOURCE"),
            image_pull_grace_seconds=_int(0)(
                PREFIX + "K8S_IMAGE_PULL_GRACE_SECONDS", raw("K8S_IMAGE_PULL_GRACE_SECONDS")
            ),
        )

    def backend_config(self, *, namespace: str) -> Any:
        """The backend's ``KubernetesConfig``; raises SettingsError (one line) when it cannot work."""
        from ccat_dagster.execution.hpc.kubernetes.config import (
            KubernetesConfig,
            KubernetesConfigError,
            parse_volume_specs,
        )

        try:
            return KubernetesConfig(
                namespace=namespace,
                job_image=self.job_image,
                volumes=parse_volume_specs(self.volumes_spec),
                image_pull_policy=self.image_pull_policy,
                image_pull_secrets=self.image_pull_secrets,
                service_account=self.service_account,
                ttl_seconds_after_finished=self.ttl_seconds_after_finished,
                gpu_resource=self.gpu_resource,
                image_pull_grace_seconds=float(self.image_pull_grace_seconds),
            )
        except KubernetesConfigError as error:
            raise SettingsError(f"HPC_BACKEND=kubernetes: {error} (see docs/configuration.md, Kubernetes)") from None

    def require_usable(self, *, pipeline_base_dir: Path, namespace: str) -> None:
        """With HPC_BACKEND=kubernetes: the Job image is set and PIPELINE_BASE_DIR is on one of the volumes."""
        if not self.job_image:
            raise SettingsError(
                f"{PREFIX}K8S_JOB_IMAGE is empty: HPC_BACKEND=kubernetes needs the image its Jobs run the Apptainer "
                "command in (e.g. registry.example.org/ccat/apptainer-runner:1.3)"
            )
        config = self.backend_config(namespace=namespace)
        if config.volume_for(str(pipeline_base_dir)) is None:
            raise SettingsError(
                f"{PREFIX}K8S_VOLUMES mounts nothing at PIPELINE_BASE_DIR={pipeline_base_dir}: the Jobs could not "
                f"see their attempt directories; add e.g. pvc:ccat-pipelines:{pipeline_base_dir}"
            )

    def as_environment(self) -> dict[str, str]:
        values = {
            "K8S_AUTH": self.auth,
            "K8S_KUBECONFIG": self.kubeconfig,
            "K8S_CONTEXT": self.context,
            "K8S_JOB_IMAGE": self.job_image,
            "K8S_IMAGE_PULL_POLICY": self.image_pull_policy,
            "K8S_IMAGE_PULL_CREDENTIALS": ",".join(self.image_pull_secrets),
            "K8S_SERVICE_ACCOUNT": self.service_account,
            "K8S_VOLUMES": self.volumes_spec,
            "K8S_TTL_SECONDS_AFTER_FINISHED": str(self.ttl_seconds_after_finished),
            "K8S_GPU_RESOURCE": self.gpu_resource,
            "K8S_IMAGE_PULL_GRACE_SECONDS": str(self.image_pull_grace_seconds),
        }
        return {PREFIX + key: value for key, value in values.items()}


def kubernetes_variable_reference() -> list[tuple[str, str, str]]:
    return [(PREFIX + key, default or "(empty)", allowed) for key, (default, allowed) in _K8S_VARIABLES.items()]


def image_change_policy(environ: Mapping[str, str] | None = None) -> str:
    """``IMAGE_CHANGE_POLICY`` alone, for the run worker's image check (it needs no other setting)."""
    env = os.environ if environ is None else environ
    name = PREFIX + "IMAGE_CHANGE_POLICY"
    return _choice(IMAGE_CHANGE_POLICIES)(name, env.get(name, "refuse"))
