"""Container runtimes: the same contract as an Apptainer or a bubblewrap command line (docs/container-contract.md,
section 7), or as the step's own OCI image run directly by the Kubernetes backend (``oci``).

Both build an argument list, never a shell string. Apptainer is the production runtime. Bubblewrap runs
the same ``/workflow`` mounts on machines without Apptainer (the demo, the tests): its root is either a
sandbox directory's file system or, for a *software directory*, the host's ``/usr`` and ``/etc`` read-only
with the software mounted read-only at ``/opt/software``.

Signals: the payload must see the scheduler's pre-walltime SIGTERM (and a cancel's) to save its work.
Apptainer's starter passes the signals it receives on to the container's process. bwrap does not: a TERM kills
it, and ``--die-with-parent`` then SIGKILLs the sandbox. So the bubblewrap command starts bwrap under a small
fixed bash script (``BWRAP_SIGNAL_FORWARDER``) that receives the signals in bwrap's place and sends them to the
sandbox's main process (the child of bwrap's init inside the PID namespace), then waits for bwrap and exits
with its status.

The ``oci`` runtime builds no host command: the Job's container is the step's image, pinned by digest, and
``job_container`` hands the backend the contract's mounts, environment and working directory for it; the
command is the payload's entrypoint. Only the Kubernetes backend runs such jobs.
"""

from __future__ import annotations

import abc
import posixpath
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ccat_dagster.execution.contract import (
    CONTAINER_ROOT,
    ContainerContractError,
    Mount,
    validate_env_name,
)
from ccat_dagster.execution.hpc.base import JobContainer, JobMount
from ccat_dagster.execution.images import RUNTIME_NAMES, ImageKind, ResolvedImage

SOFTWARE_DIR_MOUNT = "/opt/software"
# Apptainer's --cleanenv still gives the container a PATH; bubblewrap's --clearenv does not, so it sets this.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_HOST_BASE_DIRS = ("usr", "etc")
_HOST_BASE_TOP_LEVEL = ("bin", "lib", "lib32", "lib64", "libx32", "sbin")
# Provided by bubblewrap itself (or by the contract) rather than taken from a sandbox image.
_SANDBOX_SKIPPED = frozenset({"dev", "proc", "sys", "tmp", "workflow"})
_CHECK_TIMEOUT_SECONDS = 30
# Runs bwrap in its own process group (`set -m`), so a signal to the job's group reaches this script but not bwrap
# itself, and forwards TERM / INT / HUP / USR1 / USR2 to the sandbox's main process: the grandchild of the outer
# bwrap (outer bwrap -> bwrap's init, PID 1 inside -> the payload). A fixed text: every value is an argument.
BWRAP_SIGNAL_FORWARDER = """\
set -m
"$@" &
sandbox=$!
set +m
forward() {
  interrupted=1
  for init in $(cat "/proc/$sandbox/task/$sandbox/children" 2>/dev/null); do
    for main in $(cat "/proc/$init/task/$init/children" 2>/dev/null); do
      kill -s "$1" "$main" 2>/dev/null
    done
  done
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP
trap 'forward USR1' USR1
trap 'forward USR2' USR2
while :; do
  interrupted=0
  wait "$sandbox"
  status=$?
  [ "$interrupted" = 1 ] || break
done
exit "$status"
"""
BWRAP_FORWARDER_NAME = "ccat-bwrap-signals"


class UnknownContainerRuntime(ContainerContractError):
    """CONTAINER_RUNTIME names no runtime this project has."""


@dataclass(frozen=True)
class ContainerInvocation:
    """One container run: image, bind mounts, environment, command (``args[0]`` is the program)."""

    image: ResolvedImage
    mounts: list[Mount]
    env: dict[str, str]
    args: list[str]
    gpus: int = 0
    workdir: str = CONTAINER_ROOT

    def __post_init__(self) -> None:
        if not self.args or not all(isinstance(arg, str) for arg in self.args):
            raise ContainerContractError(
                f"container arguments {self.args!r} must be a non-empty list of strings, entrypoint first"
            )
        for arg in self.args:
            if "\0" in arg:
                raise ContainerContractError(f"container argument {arg!r} contains a NUL character")
        for name, value in self.env.items():
            validate_env_name(name)
            if not isinstance(value, str) or "\0" in value:
                raise ContainerContractError(f"environment variable {name}={value!r} must be a string without NUL")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise ContainerContractError(f"gpus={self.gpus!r} must be a whole number ≥ 0")
        if not self.workdir.startswith("/") or posixpath.normpath(self.workdir) != self.workdir:
            raise ContainerContractError(f"workdir {self.workdir!r} must be an absolute, normalised container path")
        targets = [mount.container for mount in self.mounts]
        duplicates = sorted({target for target in targets if targets.count(target) > 1})
        if duplicates:
            raise ContainerContractError(f"several mounts target {', '.join(duplicates)}; each target may appear once")


def build_apptainer_command(inv: ContainerInvocation, *, apptainer: str = "apptainer") -> list[str]:
    """``apptainer exec --cleanenv --containall --no-home [--nv] --pwd W --bind ... --env ... IMAGE ARGS``.

    Mounts keep their order; environment variables are sorted by name.
    """
    if inv.image.kind is ImageKind.SOFTWARE_DIR:
        raise ContainerContractError(
            f"{inv.image.path} is a software directory, which Apptainer cannot run; use a SIF or sandbox "
            "image, or the bubblewrap runtime"
        )
    _require_local_image(inv, "apptainer")
    command = [apptainer, "exec", "--cleanenv", "--containall", "--no-home"]
    if inv.gpus > 0:
        command.append("--nv")
    command += ["--pwd", inv.workdir]
    for mount in inv.mounts:
        for value, what in ((str(mount.host), "source"), (mount.container, "target")):
            # apptainer --bind is a comma-separated list of src:dest[:opts] and cannot quote these.
            if ":" in value or "," in value:
                raise ContainerContractError(
                    f"bind {what} {value!r} contains ':' or ',', which apptainer --bind cannot express; "
                    "rename the directory (for a sub_group_key: choose a key without ':' and ',')"
                )
        command += ["--bind", f"{mount.host}:{mount.container}" + (":ro" if mount.read_only else "")]
    for name in sorted(inv.env):
        value = inv.env[name]
        # apptainer parses --env as key=value pairs: '"' is stripped or rejected, and a value holding both
        # '=' and ',' is split into several variables.
        if '"' in value or "\n" in value or "\r" in value or ("=" in value and "," in value):
            raise ContainerContractError(
                f"environment variable {name}={value!r} cannot be passed with apptainer --env (it holds "
                "'\"', a line break, or both '=' and ','); pass the value in the step's config (the "
                "manifest) instead"
            )
        command += ["--env", f"{name}={value}"]
    command.append(str(inv.image.path))
    command += inv.args
    return command


def build_bwrap_command(
    inv: ContainerInvocation, *, bwrap: str = "bwrap", host_root: Path = Path("/"), shell: str = "bash"
) -> list[str]:
    """The same contract with bubblewrap; ``host_root`` is read for a software directory's base system.

    The command is ``shell -c BWRAP_SIGNAL_FORWARDER ccat-bwrap-signals bwrap ...`` (see the module docstring).
    bwrap's order: namespaces and environment, the read-only root (sandbox or host base), ``/dev /proc /tmp
    /workflow``, the software directory, the contract mounts in order, then the root is made read-only so
    a write outside the read-write mounts and ``/tmp`` fails with "Read-only file system".
    """
    if inv.gpus > 0:
        raise ContainerContractError(
            f"the bubblewrap runtime does not pass GPUs (gpus={inv.gpus}); run GPU steps with "
            "CONTAINER_RUNTIME=apptainer"
        )
    if inv.image.kind is ImageKind.SIF:
        raise ContainerContractError(
            f"the bubblewrap runtime cannot run the SIF image {inv.image.path}; use a sandbox or software directory"
        )
    _require_local_image(inv, "bubblewrap")
    command = [shell, "-c", BWRAP_SIGNAL_FORWARDER, BWRAP_FORWARDER_NAME]
    command += [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv"]
    env = {"PATH": DEFAULT_PATH, **inv.env}
    for name in sorted(env):
        command += ["--setenv", name, env[name]]
    if inv.image.kind is ImageKind.SANDBOX:
        command += _sandbox_root_args(inv.image.path)
    else:
        command += _host_base_args(host_root)
    command += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--dir", CONTAINER_ROOT]
    if inv.image.kind is ImageKind.SOFTWARE_DIR:
        command += ["--ro-bind", str(inv.image.path), SOFTWARE_DIR_MOUNT]
    for mount in inv.mounts:
        command += ["--ro-bind" if mount.read_only else "--bind", str(mount.host), mount.container]
    command += ["--remount-ro", "/", "--chdir", inv.workdir, "--", *inv.args]
    return command


def _require_local_image(inv: ContainerInvocation, runtime: str) -> None:
    if inv.image.path is None:
        raise ContainerContractError(
            f"the {runtime} runtime runs images on this host, and {inv.image.location} is in a registry only; "
            "set CONTAINER_RUNTIME=oci (with HPC_BACKEND=kubernetes) or point image_ref at a local image"
        )


def build_oci_container(inv: ContainerInvocation) -> JobContainer:
    """The Job container of ``inv`` for the ``oci`` runtime: its image by digest and the contract's mounts."""
    if inv.image.kind is not ImageKind.OCI or inv.image.reference is None:
        raise ContainerContractError(
            f"CONTAINER_RUNTIME=oci runs registry images, and {inv.image.location} is a local {inv.image.kind.value}; "
            "set image_ref to docker://registry/repository:tag, or use CONTAINER_RUNTIME=apptainer"
        )
    mounts = tuple(JobMount(host=m.host, container=m.container, read_only=m.read_only) for m in inv.mounts)
    return JobContainer(image=inv.image.reference, mounts=mounts, workdir=inv.workdir)


def _host_base_args(host_root: Path) -> list[str]:
    """The host's /usr and /etc read-only, and its top-level bin/lib/... as the host has them."""
    args: list[str] = []
    for name in _HOST_BASE_DIRS:
        if (host_root / name).is_dir():
            args += ["--ro-bind", str(host_root / name), f"/{name}"]
    for name in _HOST_BASE_TOP_LEVEL:
        path = host_root / name
        if path.is_symlink():
            args += ["--symlink", str(path.readlink()), f"/{name}"]
        elif path.is_dir():
            args += ["--ro-bind", str(path), f"/{name}"]
    return args


def _sandbox_root_args(sandbox: Path) -> list[str]:
    """The sandbox's top-level entries, one by one: binding it at / would leave no room for /workflow."""
    args: list[str] = []
    for entry in sorted(sandbox.iterdir(), key=lambda p: p.name):
        if entry.name in _SANDBOX_SKIPPED:
            continue
        if entry.is_symlink():
            args += ["--symlink", str(entry.readlink()), f"/{entry.name}"]
        elif entry.is_dir() or entry.is_file():
            args += ["--ro-bind", str(entry), f"/{entry.name}"]
    return args


class ContainerRuntime(abc.ABC):
    """Turns a ``ContainerInvocation`` into a command line; ``check()`` says whether it can run here."""

    name: ClassVar[str]

    @abc.abstractmethod
    def command(self, inv: ContainerInvocation) -> list[str]:
        """The argument list that runs ``inv``."""

    @abc.abstractmethod
    def check(self) -> str | None:
        """None when this runtime is usable on this host, else a message naming what is missing."""

    def job_container(self, inv: ContainerInvocation) -> JobContainer | None:
        """The container the backend itself must start for ``inv``; None when ``command`` runs on the host."""
        return None


@dataclass(frozen=True)
class ApptainerRuntime(ContainerRuntime):
    """Production runtime: ``apptainer exec`` with a clean environment and contained file systems."""

    name: ClassVar[str] = "apptainer"
    apptainer: str = "apptainer"

    def command(self, inv: ContainerInvocation) -> list[str]:
        return build_apptainer_command(inv, apptainer=self.apptainer)

    def check(self) -> str | None:
        if shutil.which(self.apptainer) is None:
            return (
                f"{self.apptainer!r} is not on PATH; install Apptainer, or set CONTAINER_RUNTIME=bubblewrap "
                "to run software directories"
            )
        return _probe([self.apptainer, "--version"], what="apptainer")


@dataclass(frozen=True)
class BubblewrapRuntime(ContainerRuntime):
    """Runtime for hosts without Apptainer: bubblewrap with the same /workflow mounts."""

    name: ClassVar[str] = "bubblewrap"
    bwrap: str = "bwrap"
    host_root: Path = field(default=Path("/"))
    shell: str = "bash"

    def command(self, inv: ContainerInvocation) -> list[str]:
        return build_bwrap_command(inv, bwrap=self.bwrap, host_root=self.host_root, shell=self.shell)

    def check(self) -> str | None:
        if shutil.which(self.bwrap) is None:
            return f"{self.bwrap!r} is not on PATH; install bubblewrap (apt-get install bubblewrap)"
        # A real sandbox start: bwrap may be installed yet unable to create namespaces here.
        probe = [
            self.bwrap,
            "--unshare-all",
            "--die-with-parent",
            "--clearenv",
            *_host_base_args(self.host_root),
            "--dev", "/dev",
            "--proc", "/proc",
            "--tmpfs", "/tmp",
            "--dir", CONTAINER_ROOT,
            "--remount-ro", "/",
            "--",
            "/usr/bin/true",
        ]  # fmt: skip
        return _probe(probe, what="bubblewrap")


@dataclass(frozen=True)
class OciRuntime(ContainerRuntime):
    """The step's OCI image as the Kubernetes Job's container: no runtime on this host, nothing pulled here.

    ``command`` is the payload's entrypoint (``args``); the environment, the ``/workflow`` mounts and the working
    directory go with ``job_container``. GPUs are the Job's resource request (the device plugin mounts them).
    """

    name: ClassVar[str] = "oci"

    def command(self, inv: ContainerInvocation) -> list[str]:
        build_oci_container(inv)  # the same refusal as job_container, whichever is asked first
        return list(inv.args)

    def job_container(self, inv: ContainerInvocation) -> JobContainer:
        return build_oci_container(inv)

    def check(self) -> str | None:
        return None  # the cluster's nodes pull and run the images; `doctor` checks the Kubernetes API


def _probe(command: Sequence[str], *, what: str) -> str | None:
    try:
        result = subprocess.run(
            list(command), capture_output=True, text=True, check=False, timeout=_CHECK_TIMEOUT_SECONDS
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{what} cannot be started ({exc}); check the installation"
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-300:]
        return f"{what} does not work on this host (exit code {result.returncode}): {tail}"
    return None


_RUNTIMES: dict[str, type[ContainerRuntime]] = {
    ApptainerRuntime.name: ApptainerRuntime,
    BubblewrapRuntime.name: BubblewrapRuntime,
    OciRuntime.name: OciRuntime,
}


def get_runtime(name: str, **opts: Any) -> ContainerRuntime:
    """The runtime called ``name`` (``apptainer``, ``bubblewrap`` or ``oci``), built with ``opts``."""
    runtime_class = _RUNTIMES.get(name)
    if runtime_class is None:
        raise UnknownContainerRuntime(
            f"CONTAINER_RUNTIME={name!r} is not a container runtime; allowed: {', '.join(RUNTIME_NAMES)}"
        )
    try:
        return runtime_class(**opts)
    except TypeError as exc:
        raise ContainerContractError(f"invalid options for the {name} runtime: {exc}") from None
