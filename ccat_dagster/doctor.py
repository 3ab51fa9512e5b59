"""``ccat-dagster doctor``: is this deployment able to run pipelines? One line per check, non-zero on failure.

Checks, in order: ops-db reachable, ops-db schema at the migration head, the processing location, the Dagster
instance (DAGSTER_HOME, its storage answers a query, the daemon's heartbeat), ``PIPELINE_BASE_DIR``
and ``SIF_CACHE_DIR`` writable, the chosen HPC backend (Slurm: ``sbatch``/``squeue``/``sinfo`` present, the
partition exists and is up), the chosen container runtime (a real sandbox start for bubblewrap,
``apptainer --version``) and the Dagster code location (the definitions build and pass Dagster's own
validation, exactly what ``dagster-webserver`` and ``dagster-daemon`` load).

A check that depends on an earlier failed one is reported ``skip`` with the reason. ``warn`` never changes the
exit code (a stopped daemon is normal on a machine that only runs the CLI); ``FAIL`` does.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select, text

from ccat_dagster.errors import CcatError
from ccat_dagster.settings import Settings

DAGSTER_HOME_VAR = "DAGSTER_HOME"
# A daemon heartbeat older than this means no daemon is running against this instance.
DAEMON_HEARTBEAT_MAX_AGE_SECONDS = 120
_COMMAND_TIMEOUT_SECONDS = 30


class CheckStatus(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"
    SKIP = "skip"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check; ``detail`` is one line a person can act on."""

    name: str
    status: CheckStatus
    detail: str

    @property
    def failed(self) -> bool:
        return self.status is CheckStatus.FAIL

    def line(self) -> str:
        return f"{self.status.value:<4}  {self.name:<20} {self.detail}"


@dataclass(frozen=True)
class SlurmPartition:
    name: str
    is_default: bool
    available: str  # sinfo's %a: up / down / drain / inact


class DoctorError(CcatError):
    """A check could not be carried out at all (a command that hangs or cannot be parsed)."""


def _run_command(command: Sequence[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            check=False,
            timeout=_COMMAND_TIMEOUT_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise DoctorError(
            f"{command[0]} did not answer within {_COMMAND_TIMEOUT_SECONDS} s (is slurmctld up and reachable?)"
        ) from None


# --------------------------------------------------------------------------------------------- ops-db


def check_ops_db(*, settings: Settings) -> list[CheckResult]:
    """Reachability, migration head, and the processing location this deployment serves."""
    from ccat_dagster.opsdb.engine import make_engine
    from ccat_dagster.opsdb.migrate import head_revision

    url = settings.redacted_ops_db_url
    sqlite_file = _sqlite_file(settings.ops_db_url)
    if sqlite_file is not None and not sqlite_file.is_file():
        # Connecting would create an empty file; say what to run instead.
        return [
            CheckResult(
                "ops-db",
                CheckStatus.FAIL,
                f"{url}: the SQLite file does not exist; create it with `ccat-dagster db upgrade` or set "
                "CCAT_OPS_DB_URL",
            ),
            CheckResult("ops-db schema", CheckStatus.SKIP, "ops-db unreachable"),
            CheckResult("processing location", CheckStatus.SKIP, "ops-db unreachable"),
        ]
    engine = make_engine(settings.ops_db_url)
    try:
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
                server = _server_version(connection)
                current = MigrationContext.configure(connection).get_current_revision()
        except Exception as error:  # noqa: BLE001 - any driver error means "not reachable"; say which
            return [
                CheckResult("ops-db", CheckStatus.FAIL, f"cannot connect to {url}: {_one_line(error)}"),
                CheckResult("ops-db schema", CheckStatus.SKIP, "ops-db unreachable"),
                CheckResult("processing location", CheckStatus.SKIP, "ops-db unreachable"),
            ]
        results = [CheckResult("ops-db", CheckStatus.OK, f"reachable at {url} ({server})")]
        head = head_revision()
        if current != head:
            found = "an empty database" if current is None else f"revision {current}"
            results.append(
                CheckResult(
                    "ops-db schema",
                    CheckStatus.FAIL,
                    f"{found}, migration head is {head}: run `ccat-dagster db upgrade`",
                )
            )
            results.append(CheckResult("processing location", CheckStatus.SKIP, "ops-db schema not at head"))
            return results
        results.append(CheckResult("ops-db schema", CheckStatus.OK, f"at migration head {head}"))
        results.append(_check_processing_location(engine, settings))
        return results
    finally:
        engine.dispose()


def _sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL; None for other databases and in-memory SQLite."""
    if not url.startswith("sqlite"):
        return None
    _, sep, path = url.partition(":///")
    path = path.split("?", 1)[0]
    return Path(path) if sep and path and path != ":memory:" else None


def _server_version(connection) -> str:  # type: ignore[no-untyped-def]
    dialect = connection.dialect
    version = ".".join(str(part) for part in (dialect.server_version_info or ()))
    return f"{dialect.name} {version}".strip()


def _check_processing_location(engine, settings: Settings) -> CheckResult:  # type: ignore[no-untyped-def]
    from ccat_dagster.opsdb import models as m
    from ccat_dagster.opsdb.engine import session_scope
    from ccat_dagster.opsdb.enums import LocationType

    with session_scope(engine) as session:
        locations = session.execute(
            select(m.DataLocation.id, m.DataLocation.name)
            .where(m.DataLocation.location_type == LocationType.PROCESSING)
            .order_by(m.DataLocation.id)
        ).all()
        enabled = dict(
            session.execute(
                select(m.Pipeline.processing_location_id, func.count(m.Pipeline.id))
                .where(m.Pipeline.enabled.is_(True))
                .group_by(m.Pipeline.processing_location_id)
            ).all()
        )
    listing = ", ".join(f"#{lid} {name}" for lid, name in locations) or "none"
    wanted = settings.processing_location_id
    if wanted is not None:
        chosen = [(lid, name) for lid, name in locations if lid == wanted]
        if not chosen:
            return CheckResult(
                "processing location",
                CheckStatus.FAIL,
                f"CCAT_WORKFLOW_MANAGER_PROCESSING_LOCATION_ID={wanted} is not a processing DataLocation; "
                f"processing locations in ops-db: {listing}",
            )
    elif len(locations) == 1:
        chosen = locations
    else:
        return CheckResult(
            "processing location",
            CheckStatus.FAIL,
            f"ops-db has {len(locations)} processing locations ({listing}): set "
            "CCAT_WORKFLOW_MANAGER_PROCESSING_LOCATION_ID to the one this deployment serves"
            + ("" if locations else " (or create one; the demo: `ccat-dagster demo seed`)"),
        )
    location_id, name = chosen[0]
    count = enabled.get(location_id, 0)
    return CheckResult(
        "processing location",
        CheckStatus.OK,
        f"#{location_id} {name}, {count} enabled pipeline(s)",
    )


# --------------------------------------------------------------------------------------------- Dagster


def check_dagster_instance(*, environ: Mapping[str, str]) -> list[CheckResult]:
    """DAGSTER_HOME, its storage (a real query), and whether a daemon heartbeats against it."""
    home = environ.get(DAGSTER_HOME_VAR, "").strip()
    if not home:
        return [
            CheckResult(
                "dagster instance",
                CheckStatus.FAIL,
                f"{DAGSTER_HOME_VAR} is not set: point it at the directory holding dagster.yaml (docs/operations.md)",
            ),
            CheckResult("dagster daemon", CheckStatus.SKIP, "no Dagster instance"),
        ]
    home_path = Path(home)
    if not home_path.is_dir():
        return [
            CheckResult(
                "dagster instance",
                CheckStatus.FAIL,
                f"{DAGSTER_HOME_VAR}={home} is not a directory: create it and put dagster.yaml there",
            ),
            CheckResult("dagster daemon", CheckStatus.SKIP, "no Dagster instance"),
        ]
    import dagster as dg

    config_note = "dagster.yaml" if (home_path / "dagster.yaml").is_file() else "no dagster.yaml: defaults"
    try:
        instance = dg.DagsterInstance.from_config(str(home_path))
    except Exception as error:  # noqa: BLE001 - Dagster raises several types for a bad instance config
        return [
            CheckResult(
                "dagster instance",
                CheckStatus.FAIL,
                f"{home_path}/dagster.yaml cannot be loaded: {_one_line(error)}",
            ),
            CheckResult("dagster daemon", CheckStatus.SKIP, "no Dagster instance"),
        ]
    try:
        try:
            runs = instance.get_runs_count()
        except Exception as error:  # noqa: BLE001 - storage drivers raise their own types
            return [
                CheckResult(
                    "dagster instance",
                    CheckStatus.FAIL,
                    f"storage of {home_path} does not answer: {_one_line(error)}",
                ),
                CheckResult("dagster daemon", CheckStatus.SKIP, "Dagster storage unreachable"),
            ]
        storage = type(instance.run_storage).__name__
        coordinator = type(instance.run_coordinator).__name__
        results = [
            CheckResult(
                "dagster instance",
                CheckStatus.OK,
                f"{home_path} ({config_note}): {storage}, {coordinator}, {runs} run(s)",
            )
        ]
        results.append(_check_daemon(instance))
        return results
    finally:
        instance.dispose()


def _check_daemon(instance) -> CheckResult:  # type: ignore[no-untyped-def]
    heartbeats = instance.get_daemon_heartbeats()
    if not heartbeats:
        return CheckResult(
            "dagster daemon",
            CheckStatus.WARN,
            "no daemon has ever run against this instance: sensors, schedules and queued runs need "
            "`dagster-daemon run` (or `dagster dev`)",
        )
    newest = max(heartbeat.timestamp for heartbeat in heartbeats.values())
    age = time.time() - newest
    if age > DAEMON_HEARTBEAT_MAX_AGE_SECONDS:
        return CheckResult(
            "dagster daemon",
            CheckStatus.WARN,
            f"last heartbeat {age:.0f} s ago: the daemon is not running (sensors, schedules and queued runs "
            "wait for it)",
        )
    return CheckResult(
        "dagster daemon",
        CheckStatus.OK,
        f"heartbeat {age:.0f} s ago from {len(heartbeats)} daemon(s): {', '.join(sorted(heartbeats))}",
    )


def check_code_location(*, settings: Settings) -> CheckResult:
    """Build the definitions and run Dagster's own validation on them (what the code server does)."""
    import dagster as dg

    from ccat_dagster.definitions import build_definitions

    try:
        with warnings.catch_warnings():
            # Dagster's notes on beta/preview parameters are for the code's authors, not for this report.
            for category in (dg.BetaWarning, dg.PreviewWarning, dg.SupersessionWarning):
                warnings.simplefilter("ignore", category)
            definitions = build_definitions(settings)
            repository = definitions.get_repository_def()
            repository.load_all_definitions()
    except Exception as error:  # noqa: BLE001 - any load error is what the UI would show; report it
        return CheckResult("code location", CheckStatus.FAIL, f"does not load: {_one_line(error)}")
    specs = list(repository.asset_graph.get_all_asset_keys())
    broken = sorted(key.path[0] for key in specs if key.path[-1] == "load_error")
    pipelines = sorted({key.path[0] for key in specs} - set(broken))
    summary = (
        f"{len(pipelines)} pipeline(s) ({', '.join(pipelines) or 'none'}), {len(specs)} asset(s), "
        f"{len(repository.sensor_defs)} sensor(s), {len(repository.schedule_defs)} schedule(s)"
    )
    if broken:
        return CheckResult(
            "code location",
            CheckStatus.FAIL,
            f"pipeline(s) skipped because they cannot be built: {', '.join(broken)} (see the "
            f"<pipeline>/load_error asset in the UI); {summary}",
        )
    return CheckResult("code location", CheckStatus.OK, f"loads: {summary}")


# --------------------------------------------------------------------------------------------- directories


def check_writable_directory(*, name: str, variable: str, path: Path) -> CheckResult:
    """``path`` exists (or can be created under its nearest existing parent) and accepts a file."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return CheckResult(name, CheckStatus.FAIL, f"{variable}={path}: {existing} is not a directory")
    probe_dir = existing
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".ccat-doctor-"):
            pass
    except OSError as error:
        return CheckResult(
            name,
            CheckStatus.FAIL,
            f"{variable}={path}: cannot write in {probe_dir} ({error.strerror}); fix the permissions or "
            "choose another directory",
        )
    free = shutil.disk_usage(probe_dir).free / 1024**3
    state = "writable" if existing == path else f"does not exist yet, will be created under {existing}"
    return CheckResult(name, CheckStatus.OK, f"{path} {state}, {free:.1f} GiB free")


def check_sif_cache(*, settings: Settings) -> CheckResult:
    result = check_writable_directory(
        name="SIF cache", variable="CCAT_WORKFLOW_MANAGER_SIF_CACHE_DIR", path=settings.sif_cache_dir
    )
    if result.failed:
        return result
    images = sorted(settings.sif_cache_dir.glob("*.sif")) if settings.sif_cache_dir.is_dir() else []
    size = sum(image.stat().st_size for image in images) / 1024**3
    note = "" if settings.container_runtime == "apptainer" else " (used only by the apptainer runtime)"
    return CheckResult(
        result.name, CheckStatus.OK, f"{result.detail}; {len(images)} cached image(s), {size:.2f} GiB{note}"
    )


# --------------------------------------------------------------------------------------------- HPC backend


def parse_sinfo_partitions(output: str) -> list[SlurmPartition]:
    """Parse ``sinfo --noheader --format=%P|%a``: a partition per line, the default one marked ``*``."""
    partitions: dict[str, SlurmPartition] = {}
    for raw in output.splitlines():
        line = raw.strip()
        if not line:
            continue
        name, sep, available = line.partition("|")
        if not sep or not name:
            raise DoctorError(f"unexpected sinfo line {raw!r}: expected 'PARTITION|AVAIL'")
        is_default = name.endswith("*")
        name = name.rstrip("*")
        # sinfo prints one line per partition and node state group; keep the first.
        partitions.setdefault(name, SlurmPartition(name=name, is_default=is_default, available=available.strip()))
    return list(partitions.values())


def check_hpc_backend(*, settings: Settings) -> CheckResult | list[CheckResult]:
    backend = settings.hpc_backend
    if backend == "local":
        return CheckResult(
            "hpc backend",
            CheckStatus.OK,
            f"local: subprocesses on this host, at most {settings.local_max_running} at a time "
            f"(job state under {settings.pipeline_base_dir / '.local-jobs'})",
        )
    if backend == "slurm":
        return _check_slurm(settings)
    if backend == "kubernetes":
        return check_kubernetes(settings=settings)
    return CheckResult(
        "hpc backend",
        CheckStatus.FAIL,
        f"CCAT_WORKFLOW_MANAGER_HPC_BACKEND={backend}: the step runner has no {backend} backend yet; use "
        "local or slurm",
    )


def _check_slurm(settings: Settings) -> CheckResult:
    missing = [tool for tool in ("sbatch", "squeue", "sacct", "scancel", "sinfo") if shutil.which(tool) is None]
    if missing:
        return CheckResult(
            "hpc backend",
            CheckStatus.FAIL,
            f"slurm: {', '.join(missing)} not on PATH; install the Slurm client commands (Debian: slurm-client)",
        )
    result = _run_command(["sinfo", "--noheader", "--format=%P|%a"])
    if result.returncode != 0:
        return CheckResult(
            "hpc backend",
            CheckStatus.FAIL,
            f"slurm: sinfo failed (exit code {result.returncode}): "
            f"{_one_line(result.stderr or result.stdout)}; is slurmctld reachable from this host?",
        )
    return evaluate_slurm_partitions(parse_sinfo_partitions(result.stdout), wanted=settings.slurm_partition)


def evaluate_slurm_partitions(partitions: Sequence[SlurmPartition], *, wanted: str) -> CheckResult:
    """The partition jobs go to (``wanted``, or the cluster default when empty) must exist and be up."""
    names = ", ".join(p.name + ("*" if p.is_default else "") for p in partitions) or "none"
    if wanted:
        chosen = next((p for p in partitions if p.name == wanted), None)
        if chosen is None:
            return CheckResult(
                "hpc backend",
                CheckStatus.FAIL,
                f"slurm: partition CCAT_WORKFLOW_MANAGER_SLURM_PARTITION={wanted!r} does not exist; "
                f"partitions: {names}",
            )
    else:
        chosen = next((p for p in partitions if p.is_default), None)
        if chosen is None:
            return CheckResult(
                "hpc backend",
                CheckStatus.FAIL,
                f"slurm: the cluster has no default partition; set CCAT_WORKFLOW_MANAGER_SLURM_PARTITION "
                f"(partitions: {names})",
            )
    if chosen.available != "up":
        return CheckResult(
            "hpc backend",
            CheckStatus.FAIL,
            f"slurm: partition {chosen.name!r} is {chosen.available}, jobs would stay pending; ask the "
            "cluster admins or choose another partition",
        )
    how = "" if wanted else " (the cluster default)"
    return CheckResult("hpc backend", CheckStatus.OK, f"slurm: partition {chosen.name!r}{how} is up")


# --------------------------------------------------------------------------------------------- Kubernetes

# (verb, API group, resource) the backend needs in its namespace: Jobs for submit / poll / cancel, pods and
# their logs for the exit codes and log tails.
K8S_REQUIRED_PERMISSIONS = (
    ("create", "batch", "jobs"),
    ("list", "batch", "jobs"),
    ("get", "batch", "jobs"),
    ("delete", "batch", "jobs"),
    ("list", "", "pods"),
    ("get", "", "pods/log"),
)
# Without it the backend works, but peak memory stays unknown (metrics-server's PodMetrics).
K8S_OPTIONAL_PERMISSIONS = (("list", "metrics.k8s.io", "pods"),)


def check_kubernetes(*, settings: Settings, client: object | None = None) -> list[CheckResult]:
    """The API server answers, the namespace exists, and this identity may do what the backend does
    (one SelfSubjectAccessReview per permission). ``client``: a KubernetesClient (default: from the settings)."""
    from ccat_dagster.execution.hpc.kubernetes.client import KubernetesApiError, KubernetesClient
    from ccat_dagster.execution.hpc.kubernetes.connect import api_client, kubernetes_client

    namespace = settings.k8s_namespace
    skipped = [
        CheckResult("k8s namespace", CheckStatus.SKIP, "Kubernetes API unreachable"),
        CheckResult("k8s permissions", CheckStatus.SKIP, "Kubernetes API unreachable"),
    ]
    if client is None:
        k8s = settings.kubernetes
        try:
            api = api_client(auth=k8s.auth, kubeconfig=k8s.kubeconfig, context=k8s.context)
        except CcatError as error:
            return [CheckResult("hpc backend", CheckStatus.FAIL, f"kubernetes: {error}"), *skipped]
        # Few, short retries: doctor reports an unreachable server, it does not wait it out.
        client = kubernetes_client(api, max_attempts=2, deadline_seconds=10.0, request_timeout_seconds=10.0)
    assert isinstance(client, KubernetesClient)
    try:
        version = client.server_version()
    except KubernetesApiError as error:
        return [CheckResult("hpc backend", CheckStatus.FAIL, f"kubernetes: API server unreachable: {error}"), *skipped]
    results = [CheckResult("hpc backend", CheckStatus.OK, f"kubernetes: API server {version} answers")]
    try:
        client.read_namespace(namespace)
        results.append(CheckResult("k8s namespace", CheckStatus.OK, f"namespace {namespace!r} exists"))
    except KubernetesApiError as error:
        if error.status == 403:
            # Namespaces are cluster-scoped: a namespaced Role cannot grant reading one, and listing in a
            # missing namespace answers an empty list, so without this permission existence cannot be told.
            results.append(
                CheckResult(
                    "k8s namespace",
                    CheckStatus.WARN,
                    f"cannot tell whether namespace {namespace!r} exists (HTTP 403 reading it): grant get on it "
                    "(the ClusterRole in deploy/kubernetes/rbac.yaml)",
                )
            )
        else:
            detail = (
                f"namespace {namespace!r} does not exist: create it (deploy/kubernetes/namespace.yaml) or set "
                "CCAT_WORKFLOW_MANAGER_K8S_NAMESPACE"
                if error.status == 404
                else f"cannot read namespace {namespace!r}: {error}"
            )
            results.append(CheckResult("k8s namespace", CheckStatus.FAIL, detail))
            results.append(CheckResult("k8s permissions", CheckStatus.SKIP, "no namespace"))
            return results
    try:
        answers = [
            (verb, group, resource, *client.may(namespace=namespace, verb=verb, group=group, resource=resource))
            for verb, group, resource in K8S_REQUIRED_PERMISSIONS + K8S_OPTIONAL_PERMISSIONS
        ]
    except KubernetesApiError as error:
        results.append(CheckResult("k8s permissions", CheckStatus.FAIL, f"SelfSubjectAccessReview failed: {error}"))
        return results
    results.append(evaluate_k8s_permissions(answers, namespace=namespace))
    return results


def evaluate_k8s_permissions(answers: Sequence[tuple[str, str, str, bool, str]], *, namespace: str) -> CheckResult:
    """(verb, group, resource, allowed, reason) per permission → one line; optional ones only add a note."""
    optional = {(verb, group, resource) for verb, group, resource in K8S_OPTIONAL_PERMISSIONS}
    missing_optional = [f"{v} {r}.{g}" for v, g, r, allowed, _ in answers if not allowed and (v, g, r) in optional]
    answers = [answer for answer in answers if answer[:3] not in optional]
    denied = [f"{verb} {resource}" for verb, _group, resource, allowed, _reason in answers if not allowed]
    if denied:
        return CheckResult(
            "k8s permissions",
            CheckStatus.FAIL,
            f"not allowed in namespace {namespace!r}: {', '.join(denied)}; bind the Role in "
            "deploy/kubernetes/rbac.yaml to this service account",
        )
    granted = ", ".join(f"{verb} {resource}" for verb, _g, resource, _a, _r in answers)
    note = f"; not allowed: {', '.join(missing_optional)} (peak memory stays unknown)" if missing_optional else ""
    return CheckResult("k8s permissions", CheckStatus.OK, f"allowed in {namespace!r}: {granted}{note}")


# --------------------------------------------------------------------------------------------- runtime


def check_container_runtime(*, settings: Settings) -> CheckResult:
    from ccat_dagster.execution.runtimes import get_runtime

    runtime = get_runtime(settings.container_runtime)
    problem = runtime.check()
    if problem:
        return CheckResult("container runtime", CheckStatus.FAIL, f"{runtime.name}: {problem}")
    how = {
        "bubblewrap": "a test sandbox started",
        "apptainer": "apptainer --version answered",
        "oci": "nothing runs on this host; the cluster's nodes pull and run each step's image by digest",
    }[runtime.name]
    return CheckResult("container runtime", CheckStatus.OK, f"{runtime.name}: {how}")


# --------------------------------------------------------------------------------------------- all


def run_checks(
    *,
    settings: Settings,
    environ: Mapping[str, str] | None = None,
) -> list[CheckResult]:
    """Every check, in order. A check that cannot run is reported as failed, never raised."""
    env = os.environ if environ is None else environ
    results: list[CheckResult] = []

    def guarded(name: str, check: Callable[[], CheckResult | list[CheckResult]]) -> list[CheckResult]:
        try:
            outcome = check()
        except Exception as error:  # noqa: BLE001 - one broken check must not hide the others
            outcome = CheckResult(name, CheckStatus.FAIL, f"{type(error).__name__}: {_one_line(error)}")
        return outcome if isinstance(outcome, list) else [outcome]

    results += guarded("ops-db", lambda: check_ops_db(settings=settings))
    results += guarded("dagster instance", lambda: check_dagster_instance(environ=env))
    results += guarded(
        "pipeline base dir",
        lambda: check_writable_directory(
            name="pipeline base dir",
            variable="CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR",
            path=settings.pipeline_base_dir,
        ),
    )
    results += guarded("SIF cache", lambda: check_sif_cache(settings=settings))
    results += guarded("hpc backend", lambda: check_hpc_backend(settings=settings))
    results += guarded("container runtime", lambda: check_container_runtime(settings=settings))
    location_ok = all(r.status is CheckStatus.OK for r in results if r.name.startswith(("ops-db", "processing")))
    if location_ok:
        results += guarded("code location", lambda: check_code_location(settings=settings))
    else:
        results.append(CheckResult("code location", CheckStatus.SKIP, "ops-db or processing location not ready"))
    return results


def _one_line(value: object) -> str:
    text_value = str(value).strip()
    return text_value.splitlines()[0] if text_value else type(value).__name__


# --------------------------------------------------------------------------------------------- CLI


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    doctor = commands.add_parser(
        "doctor",
        help="check ops-db, the Dagster instance, directories, HPC backend, container runtime, code location",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    doctor.add_argument("--json", action="store_true", help="print the results as a JSON list")
    doctor.set_defaults(handler=_doctor)


def _doctor(args: argparse.Namespace, settings: Settings) -> int:
    results = run_checks(settings=settings)
    if args.json:
        print(json.dumps([{**asdict(r), "status": r.status.value} for r in results], indent=2))
    else:
        print(
            f"ccat-dagster doctor: backend {settings.hpc_backend}, runtime {settings.container_runtime}, "
            f"stager {settings.stager}"
        )
        for result in results:
            print(result.line())
        failed = sum(1 for r in results if r.failed)
        print(f"{failed} check(s) failed" if failed else "all checks passed")
    return 1 if any(r.failed for r in results) else 0
