"""Settings from the environment (docs/configuration.md). Invalid values stop start-up with one line naming the fix.

Every variable has the prefix ``CCAT_WORKFLOW_MANAGER_`` except the ops-db URL (``CCAT_OPS_DB_URL``) and the
local data directory (``CCAT_DAGSTER_DATA_DIR``) that the laptop defaults live under.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ccat_dagster.errors import CcatError

PREFIX = "CCAT_WORKFLOW_MANAGER_"
OPS_DB_URL_VAR = "CCAT_OPS_DB_URL"
DATA_DIR_VAR = "CCAT_DAGSTER_DATA_DIR"

HPC_BACKENDS = ("local", "slurm", "kubernetes")
CONTAINER_RUNTIMES = ("apptainer", "bubblewrap", "oci")
STAGERS = ("local", "external")
IMAGE_CHANGE_POLICIES = ("refuse", "new_build")


class SettingsError(CcatError, ValueError):
    """A setting ccat-dagster cannot use; the message names the variable and the allowed values."""


def default_container_runtime(which: Callable[[str], str | None] | None = None) -> str:
    """``apptainer`` (production), or ``bubblewrap`` on a machine that has ``bwrap`` but no Apptainer, so that a
    first try (the demo) runs without settings; a machine with neither gets ``apptainer`` and its clear error."""
    import shutil

    which = which or shutil.which
    if which("apptainer") is None and which("bwrap") is not None:
        return "bubblewrap"
    return "apptainer"


def _choice(allowed: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise SettingsError(f"{name}={raw!r} is invalid: allowed values are {', '.join(allowed)}")
        return value

    return parse


@dataclass(frozen=True)
class WholeNumber:
    """The parser of a whole-number setting with its documented range (every one has an upper bound: a value
    past it would overflow an ops-db column, a timedelta or a sleep, at every tick instead of at start-up)."""

    minimum: int
    maximum: int

    def __call__(self, name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:  # also a number of more than 4300 digits
            value = None
        if value is None or not self.minimum <= value <= self.maximum:
            shown = raw if len(raw) <= 40 else raw[:40] + "…"
            raise SettingsError(
                f"{name}={shown!r} is invalid: expected a whole number from {self.minimum} to {self.maximum}"
            )
        return value

    @property
    def allowed(self) -> str:
        """The range as the configuration reference shows it."""
        return f"{self.minimum}–{self.maximum}"


# Ids of ops-db rows are 32-bit integers.
MAX_ROW_ID = 2_147_483_647
_PROCESSING_LOCATION_ID = WholeNumber(1, MAX_ROW_ID)


def _optional_int(name: str, raw: str) -> int | None:
    return None if raw.strip() == "" else _PROCESSING_LOCATION_ID(name, raw)


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


def _http_url(name: str, raw: str) -> str:
    value = raw.strip().rstrip("/")
    if not value.startswith(("http://", "https://")) or len(value) <= len("https://"):
        raise SettingsError(f"{name}={raw!r} is invalid: give the webserver's base URL, e.g. http://127.0.0.1:3000")
    return value


def _redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url


def _bounded_int(minimum: int, maximum: int) -> WholeNumber:
    return WholeNumber(minimum, maximum)


# The whole-number settings besides the runner's: key → parser with its range.
WHOLE_NUMBER_SETTINGS: dict[str, WholeNumber] = {
    "MAX_CONCURRENT_JOBS": WholeNumber(1, 100_000),
    "LOCAL_MAX_RUNNING": WholeNumber(1, 4096),
    "MAX_PARTITIONS_PER_RUN": WholeNumber(1, 10_000),
    "POLL_INTERVAL_SECONDS": WholeNumber(1, 3600),
    "STAGING_TIMEOUT_SECONDS": WholeNumber(1, 604_800),
    "SENSOR_BATCH_LIMIT": WholeNumber(1, 1_000_000),
    "SENSOR_INTERVAL_SECONDS": WholeNumber(1, 86_400),
    "WATERMARK_OVERLAP_SECONDS": WholeNumber(0, 86_400),
    "RETENTION_DAYS": WholeNumber(0, 36_500),
}


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
    # Auto by default: short CPU steps pack. A batch's allocations are bounded in all (PACKED_ALLOCATIONS_PER_BATCH),
    # and the engine keeps Parsl from releasing allocations still waiting for their workers (see packed/engine.py).
    "PACKED_EXECUTION": (
        "auto",
        _choice(("auto", "off")),
        "off, or auto (steps with execution mode auto pack when short and Parsl is installed; HPC_BACKEND=slurm)",
    ),
    "PACKED_MAX_TASK_MINUTES": (
        "30",
        _bounded_int(1, 10_080),
        "steps of execution mode auto whose time_hours is at most this many minutes run packed, 1–10080",
    ),
    "PACKED_MAX_ALLOCATIONS": ("2", _bounded_int(1, 1_000), "Slurm allocations one packed batch may hold, 1–1000"),
    "PACKED_ALLOCATIONS_PER_BATCH": (
        "10",
        _bounded_int(1, 100_000),
        "Slurm allocations one packed batch may ask for in all, replacements of ended ones included, 1–100000",
    ),
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
    packed_allocations_per_batch: int
    packed_cores_per_allocation: int
    packed_walltime_minutes: int
    packed_idle_seconds: int
    ops_db_tolerance_seconds: int
    max_memory_gb: int
    max_time_hours: int
    max_products_per_attempt: int
    kubernetes: KubernetesSettings
    image_change_policy: str
    api_max_body_bytes: int
    dagster_webserver_url: str
    # As given (validated by registry_settings, which is what reads them where a digest is resolved).
    registry_auth_file: str = ""
    registry_plain_http: str = ""

    @property
    def redacted_ops_db_url(self) -> str:
        return _redact_url(self.ops_db_url)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        data_dir = _path(DATA_DIR_VAR, env.get(DATA_DIR_VAR, ".data"))
        defaults: dict[str, str] = {
            "HPC_BACKEND": "local",
            "CONTAINER_RUNTIME": default_container_runtime(),
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
            "API_MAX_BODY_BYTES": "1048576",
            "DAGSTER_WEBSERVER_URL": "http://127.0.0.1:3000",
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
            **WHOLE_NUMBER_SETTINGS,
            "IMAGE_CHANGE_POLICY": _choice(IMAGE_CHANGE_POLICIES),
            "API_MAX_BODY_BYTES": _bounded_int(1024, 1_073_741_824),
            "DAGSTER_WEBSERVER_URL": _http_url,
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
        registry_settings(env)  # checked at start-up; read where an image's digest is resolved
        values["registry_auth_file"] = env.get(REGISTRY_AUTH_FILE_VAR, "").strip()
        values["registry_plain_http"] = env.get(REGISTRY_PLAIN_HTTP_VAR, "").strip()
        if values["container_runtime"] == "oci" and values["hpc_backend"] != "kubernetes":
            raise SettingsError(
                f"{PREFIX}CONTAINER_RUNTIME=oci runs each step's image as a Kubernetes Job's container, but "
                f"{PREFIX}HPC_BACKEND={values['hpc_backend']!r}: set HPC_BACKEND=kubernetes, or use apptainer"
            )
        if values["hpc_backend"] == "kubernetes":
            values["kubernetes"].require_usable(
                pipeline_base_dir=values["pipeline_base_dir"],
                namespace=values["k8s_namespace"],
                runtime=values["container_runtime"],
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


_WHOLE_NUMBER_MEANINGS = (
    ("MAX_CONCURRENT_JOBS", "100", "jobs in flight per backend from this location"),
    ("LOCAL_MAX_RUNNING", "(number of CPUs)", "local backend: jobs running at once"),
    ("MAX_PARTITIONS_PER_RUN", "200", "sub-groups one Dagster run materializes"),
    ("POLL_INTERVAL_SECONDS", "2", "longest pause between job status polls (first 0.2 s)"),
    ("STAGING_TIMEOUT_SECONDS", "3600", "seconds a run waits for staging"),
    ("SENSOR_BATCH_LIMIT", "5000", "changed packages read per sensor tick"),
    ("SENSOR_INTERVAL_SECONDS", "30", "least seconds between two ticks of a pipeline's sensor"),
    ("WATERMARK_OVERLAP_SECONDS", "300", "re-read window of the change watermark"),
    ("RETENTION_DAYS", "30", "days before consumed intermediates may be deleted"),
)


def variable_reference() -> list[tuple[str, str, str]]:
    """(variable, default, allowed values) for the configuration reference and ``doctor``."""
    return (
        [
            (DATA_DIR_VAR, "./.data", "a directory"),
            (OPS_DB_URL_VAR, "sqlite:///<data dir>/opsdb.sqlite", "postgresql://… or sqlite:///…"),
            (PREFIX + "HPC_BACKEND", "local", ", ".join(HPC_BACKENDS)),
            (
                PREFIX + "CONTAINER_RUNTIME",
                "apptainer (bubblewrap where only bwrap is installed)",
                ", ".join(CONTAINER_RUNTIMES),
            ),
            (PREFIX + "PIPELINE_BASE_DIR", "<data dir>/pipelines", "a writable directory"),
            (
                PREFIX + "PROCESSING_LOCATION_ID",
                "(the only processing location)",
                f"a DataLocation id, {_PROCESSING_LOCATION_ID.allowed}",
            ),
            (PREFIX + "SLURM_PARTITION", "(cluster default)", "a Slurm partition name"),
            (PREFIX + "K8S_NAMESPACE", "ccat", "a Kubernetes namespace"),
            (PREFIX + "SIF_CACHE_DIR", "<data dir>/sif-cache", "a writable directory"),
            (PREFIX + "STAGER", "local", ", ".join(STAGERS)),
            *(
                (PREFIX + key, default, f"{meaning}, {WHOLE_NUMBER_SETTINGS[key].allowed}")
                for key, default, meaning in _WHOLE_NUMBER_MEANINGS
            ),
            (
                PREFIX + "IMAGE_CHANGE_POLICY",
                "refuse",
                "refuse, new_build: what a changed image under one version does",
            ),
            (
                REGISTRY_AUTH_FILE_VAR,
                "$DOCKER_CONFIG/config.json, else ~/.docker/config.json",
                "a docker config.json with the registries' credentials",
            ),
            (REGISTRY_PLAIN_HTTP_VAR, "(empty)", "comma-separated registry host[:port] reached over HTTP, not HTTPS"),
            (PREFIX + "API_MAX_BODY_BYTES", "1048576", "largest request body the REST API reads, 1024–1073741824"),
            (
                PREFIX + "DAGSTER_WEBSERVER_URL",
                "http://127.0.0.1:3000",
                "the Dagster webserver whose GraphQL launches, terminates and re-executes runs",
            ),
        ]
        + [(PREFIX + key, default, allowed) for key, (default, _, allowed) in RUNNER_SETTINGS.items()]
        + kubernetes_variable_reference()
    )


# --------------------------------------------------------------------------------------------- Kubernetes

_K8S_TTL_SECONDS = WholeNumber(0, 31_536_000)
_K8S_PULL_GRACE_SECONDS = WholeNumber(0, 86_400)
# name → (default, allowed values for the reference). K8S_NAMESPACE stays with the general settings above.
_K8S_VARIABLES: dict[str, tuple[str, str]] = {
    "K8S_AUTH": ("auto", "auto (in-cluster inside a pod, else kubeconfig), in-cluster, kubeconfig"),
    "K8S_KUBECONFIG": ("", "kubeconfig file (empty: $KUBECONFIG, else ~/.kube/config)"),
    "K8S_CONTEXT": ("", "kubeconfig context (empty: its current context)"),
    "K8S_JOB_IMAGE": (
        "",
        "image of the Job's container, which runs the Apptainer command; required unless CONTAINER_RUNTIME=oci",
    ),
    "K8S_IMAGE_PULL_POLICY": ("IfNotPresent", "IfNotPresent, Always, Never"),
    "K8S_IMAGE_PULL_CREDENTIALS": ("", "comma-separated Secret names (empty: none)"),
    "K8S_SERVICE_ACCOUNT": ("", "service account of the Job pods (empty: the namespace's default)"),
    "K8S_VOLUMES": ("", "comma-separated pvc:<claim>:<mount path>[:ro] or host:<node path>:<mount path>[:ro]"),
    "K8S_TTL_SECONDS_AFTER_FINISHED": (
        "86400",
        f"seconds Kubernetes keeps a finished Job and its pod log, {_K8S_TTL_SECONDS.allowed}",
    ),
    "K8S_GPU_RESOURCE": ("nvidia.com/gpu", "extended resource name that `gpus` asks for"),
    "K8S_IMAGE_PULL_GRACE_SECONDS": (
        "300",
        f"seconds a pod may fail to pull its image before the attempt fails, {_K8S_PULL_GRACE_SECONDS.allowed}",
    ),
    "K8S_RUN_AS_USER": (
        "",
        "CONTAINER_RUNTIME=oci: uid[:gid] the step's container runs as (empty: the image's user, never root)",
    ),
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
    run_as_user: str = ""

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
        run_as = raw("K8S_RUN_AS_USER")
        if run_as and not re.fullmatch(r"[0-9]{1,10}(:[0-9]{1,10})?", run_as):
            raise SettingsError(
                f"{PREFIX}K8S_RUN_AS_USER={run_as!r} is invalid: give a numeric uid or uid:gid (e.g. 1000:1000)"
            )
        return cls(
            auth=auth,
            kubeconfig=raw("K8S_KUBECONFIG"),
            context=raw("K8S_CONTEXT"),
            job_image=raw("K8S_JOB_IMAGE"),
            image_pull_policy=policy,
            image_pull_secrets=tuple(p.strip() for p in raw("K8S_IMAGE_PULL_CREDENTIALS").split(",") if p.strip()),
            service_account=raw("K8S_SERVICE_ACCOUNT"),
            volumes_spec=raw("K8S_VOLUMES"),
            ttl_seconds_after_finished=_K8S_TTL_SECONDS(
                PREFIX + "K8S_TTL_SECONDS_AFTER_FINISHED", raw("K8S_TTL_SECONDS_AFTER_FINISHED")
            ),
            gpu_resource=raw("K8S_GPU_RESOURCE"),
            image_pull_grace_seconds=_K8S_PULL_GRACE_SECONDS(
                PREFIX + "K8S_IMAGE_PULL_GRACE_SECONDS", raw("K8S_IMAGE_PULL_GRACE_SECONDS")
            ),
            run_as_user=run_as,
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
                run_as_user=self.run_as_user,
            )
        except KubernetesConfigError as error:
            raise SettingsError(f"HPC_BACKEND=kubernetes: {error} (see docs/configuration.md, Kubernetes)") from None

    def require_usable(self, *, pipeline_base_dir: Path, namespace: str, runtime: str = "apptainer") -> None:
        """With HPC_BACKEND=kubernetes: the Job image is set (unless the runtime is oci: each step's image is the
        container) and PIPELINE_BASE_DIR is on one of the volumes."""
        if not self.job_image and runtime != "oci":
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
            "K8S_RUN_AS_USER": self.run_as_user,
        }
        return {PREFIX + key: value for key, value in values.items()}


def kubernetes_variable_reference() -> list[tuple[str, str, str]]:
    return [(PREFIX + key, default or "(empty)", allowed) for key, (default, allowed) in _K8S_VARIABLES.items()]


def image_change_policy(environ: Mapping[str, str] | None = None) -> str:
    """``IMAGE_CHANGE_POLICY`` alone, for the run worker's image check (it needs no other setting)."""
    env = os.environ if environ is None else environ
    name = PREFIX + "IMAGE_CHANGE_POLICY"
    return _choice(IMAGE_CHANGE_POLICIES)(name, env.get(name, "refuse"))


# --------------------------------------------------------------------------------------------- registries
REGISTRY_AUTH_FILE_VAR = PREFIX + "REGISTRY_AUTH_FILE"
REGISTRY_PLAIN_HTTP_VAR = PREFIX + "REGISTRY_PLAIN_HTTP"


def registry_settings(environ: Mapping[str, str] | None = None) -> tuple[Path | None, frozenset[str]]:
    """``REGISTRY_AUTH_FILE`` (None: docker's default ``config.json``) and ``REGISTRY_PLAIN_HTTP`` (hosts).

    Read on their own, as ``image_change_policy`` is, by whatever resolves an image's digest.
    """
    env = os.environ if environ is None else environ
    auth_file = env.get(REGISTRY_AUTH_FILE_VAR, "").strip()
    hosts = frozenset(h.strip().lower() for h in env.get(REGISTRY_PLAIN_HTTP_VAR, "").split(",") if h.strip())
    for host in hosts:
        if not re.fullmatch(r"[a-z0-9.-]+(:[0-9]{1,5})?", host):
            raise SettingsError(
                f"{REGISTRY_PLAIN_HTTP_VAR}: {host!r} is not a registry host[:port] (e.g. localhost:5000)"
            )
    return (_path(REGISTRY_AUTH_FILE_VAR, auth_file) if auth_file else None), hosts


# ------------------------------------------------------------------------------------------ unknown names

# Prefixes ccat-dagster owns: every variable under them is a setting, so an unknown one is a typo.
OWNED_PREFIXES = (PREFIX, "CCAT_DAGSTER_")


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """(variable, closest known name or None) for each environment variable that looks like a setting but is none.

    Under ``CCAT_WORKFLOW_MANAGER_`` and ``CCAT_DAGSTER_`` every unknown name is reported; other ``CCAT_*``
    names (tools and tests use their own) only when they are one typo away from a setting, e.g.
    ``CCAT_OPS_DB_ULR``. Settings are read as before: this only tells the operator.
    """
    import difflib

    env = os.environ if environ is None else environ
    known = [name for name, _, _ in variable_reference()]
    found = []
    for name in sorted(env):
        if not name.startswith("CCAT_") or name in known:
            continue
        owned = next((prefix for prefix in OWNED_PREFIXES if name.startswith(prefix)), None)
        if owned is None:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
            if close:
                found.append((name, close[0]))
            continue
        # Compared without the shared prefix, which would make every name look alike.
        suffixes = {k[len(owned) :]: k for k in known if k.startswith(owned)}
        close = difflib.get_close_matches(name[len(owned) :], list(suffixes), n=1, cutoff=0.75)
        found.append((name, suffixes[close[0]] if close else None))
    return found
