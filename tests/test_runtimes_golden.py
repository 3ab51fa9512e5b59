"""Golden command lines: the exact Apptainer invocation, and the shape of the bubblewrap one."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccat_dagster import settings
from ccat_dagster.execution.contract import (
    ContainerContractError,
    Mount,
    UpstreamProduct,
    attempt_layout,
    build_environment,
    build_mounts,
)
from ccat_dagster.execution.images import RUNTIME_NAMES, ImageKind, ResolvedImage
from ccat_dagster.execution.runtimes import (
    BWRAP_SIGNAL_FORWARDER,
    DEFAULT_PATH,
    ApptainerRuntime,
    BubblewrapRuntime,
    ContainerInvocation,
    UnknownContainerRuntime,
    build_apptainer_command,
    build_bwrap_command,
    get_runtime,
)

BASE = Path("/data/pipelines")
DIGEST = "sha256:" + "ab" * 32
SIF = ResolvedImage(path=Path(f"/data/sif-cache/sha256-{'ab' * 32}.sif"), digest=DIGEST, kind=ImageKind.SIF)
CALIBRATE = ["/usr/bin/python3", "/opt/software/bin/chai_calibrate.py"]


def _product(step: str, key: str, name: str, product_id: int) -> UpstreamProduct:
    return UpstreamProduct(
        product_id=product_id,
        step=step,
        sub_group_key=key,
        product_type="intermediate",
        relative_path=name,
        size=10,
        sha256="0" * 64,
    )


def intermediate_invocation(*, image: ResolvedImage = SIF) -> ContainerInvocation:
    layout = attempt_layout(
        base_dir=BASE,
        pipeline="chai-co43",
        sub_group_key="eou=0042",
        step="calibrate",
        attempt_id=17,
        is_final=False,
    )
    mounts = build_mounts(
        layout=layout,
        input_packages=[
            ("chai_scan_0042_lfa", Path("/data/staged/chai/chai_scan_0042_lfa")),
            ("chai_scan_0042_hfa", Path("/data/staged/chai/chai_scan_0042_hfa")),
        ],
    )
    return ContainerInvocation(image=image, mounts=mounts, env=build_environment(layout=layout), args=CALIBRATE)


def test_golden_intermediate_per_scan_step_with_two_packages() -> None:
    assert build_apptainer_command(intermediate_invocation()) == [
        "apptainer", "exec", "--cleanenv", "--containall", "--no-home",
        "--pwd", "/workflow",
        "--bind", "/data/staged/chai/chai_scan_0042_lfa:/workflow/input/chai_scan_0042_lfa:ro",
        "--bind", "/data/staged/chai/chai_scan_0042_hfa:/workflow/input/chai_scan_0042_hfa:ro",
        "--bind", "/data/pipelines/chai-co43/eou=0042/workspace/calibrate:/workflow/workspace/calibrate",
        "--bind", "/data/pipelines/chai-co43/eou=0042/attempts/calibrate/17/config:/workflow/config:ro",
        "--bind", "/data/pipelines/chai-co43/eou=0042/attempts/calibrate/17/logs:/workflow/logs",
        "--env", "WORKFLOW_CONFIG_DIR=/workflow/config",
        "--env", "WORKFLOW_INPUT_DIR=/workflow/input",
        "--env", "WORKFLOW_LOGS_DIR=/workflow/logs",
        "--env", "WORKFLOW_MANIFEST=/workflow/config/manifest.json",
        "--env", "WORKFLOW_OUTPUT_DIR=/workflow/workspace/calibrate/",
        "--env", "WORKFLOW_WORKSPACE_DIR=/workflow/workspace",
        f"/data/sif-cache/sha256-{'ab' * 32}.sif",
        "/usr/bin/python3", "/opt/software/bin/chai_calibrate.py",
    ]  # fmt: skip


def test_golden_fan_in_final_step_with_gpu() -> None:
    layout = attempt_layout(
        base_dir=BASE,
        pipeline="chai-co43",
        sub_group_key="all",
        step="grid_map",
        attempt_id="9",
        is_final=True,
    )
    upstream = [
        _product("baseline", key, f"{key}.base.f32", index)
        for index, key in enumerate(["eou=0043", "eou=0041", "eou=0042"], start=1)
    ]
    mounts = build_mounts(layout=layout, input_packages=[], upstream_products=upstream)
    invocation = ContainerInvocation(
        image=SIF,
        mounts=mounts,
        env=build_environment(layout=layout, extra={"OMP_NUM_THREADS": "4"}),
        args=["/usr/bin/python3", "/opt/software/bin/chai_grid_map.py", "--pixel", "10"],
        gpus=1,
    )
    assert build_apptainer_command(invocation) == [
        "apptainer", "exec", "--cleanenv", "--containall", "--no-home", "--nv",
        "--pwd", "/workflow",
        "--bind", "/data/pipelines/chai-co43/eou=0041/workspace/baseline:"
                  "/workflow/workspace/baseline/eou=0041:ro",
        "--bind", "/data/pipelines/chai-co43/eou=0042/workspace/baseline:"
                  "/workflow/workspace/baseline/eou=0042:ro",
        "--bind", "/data/pipelines/chai-co43/eou=0043/workspace/baseline:"
                  "/workflow/workspace/baseline/eou=0043:ro",
        "--bind", "/data/pipelines/chai-co43/all/workspace/grid_map:/workflow/workspace/grid_map",
        "--bind", "/data/pipelines/chai-co43/all/output:/workflow/output",
        "--bind", "/data/pipelines/chai-co43/all/attempts/grid_map/9/config:/workflow/config:ro",
        "--bind", "/data/pipelines/chai-co43/all/attempts/grid_map/9/logs:/workflow/logs",
        "--env", "OMP_NUM_THREADS=4",
        "--env", "WORKFLOW_CONFIG_DIR=/workflow/config",
        "--env", "WORKFLOW_INPUT_DIR=/workflow/input",
        "--env", "WORKFLOW_LOGS_DIR=/workflow/logs",
        "--env", "WORKFLOW_MANIFEST=/workflow/config/manifest.json",
        "--env", "WORKFLOW_OUTPUT_DIR=/workflow/output/",
        "--env", "WORKFLOW_WORKSPACE_DIR=/workflow/workspace",
        f"/data/sif-cache/sha256-{'ab' * 32}.sif",
        "/usr/bin/python3", "/opt/software/bin/chai_grid_map.py", "--pixel", "10",
    ]  # fmt: skip


def test_golden_sandbox_directory_image() -> None:
    sandbox = ResolvedImage(path=Path("/data/images/chai-1.0.0.sandbox"), digest=None, kind=ImageKind.SANDBOX)
    command = build_apptainer_command(intermediate_invocation(image=sandbox), apptainer="/opt/apptainer/bin/apptainer")
    assert command == [
        "/opt/apptainer/bin/apptainer", "exec", "--cleanenv", "--containall", "--no-home",
        "--pwd", "/workflow",
        "--bind", "/data/staged/chai/chai_scan_0042_lfa:/workflow/input/chai_scan_0042_lfa:ro",
        "--bind", "/data/staged/chai/chai_scan_0042_hfa:/workflow/input/chai_scan_0042_hfa:ro",
        "--bind", "/data/pipelines/chai-co43/eou=0042/workspace/calibrate:/workflow/workspace/calibrate",
        "--bind", "/data/pipelines/chai-co43/eou=0042/attempts/calibrate/17/config:/workflow/config:ro",
        "--bind", "/data/pipelines/chai-co43/eou=0042/attempts/calibrate/17/logs:/workflow/logs",
        "--env", "WORKFLOW_CONFIG_DIR=/workflow/config",
        "--env", "WORKFLOW_INPUT_DIR=/workflow/input",
        "--env", "WORKFLOW_LOGS_DIR=/workflow/logs",
        "--env", "WORKFLOW_MANIFEST=/workflow/config/manifest.json",
        "--env", "WORKFLOW_OUTPUT_DIR=/workflow/workspace/calibrate/",
        "--env", "WORKFLOW_WORKSPACE_DIR=/workflow/workspace",
        "/data/images/chai-1.0.0.sandbox",
        "/usr/bin/python3", "/opt/software/bin/chai_calibrate.py",
    ]  # fmt: skip


def test_identity_upstream_is_mounted_without_the_sub_group_key() -> None:
    layout = attempt_layout(
        base_dir=BASE, pipeline="p", sub_group_key="eou=7", step="baseline", attempt_id=3, is_final=False
    )
    mounts = build_mounts(
        layout=layout, input_packages=[], upstream_products=[_product("calibrate", "eou=7", "a.cal", 1)]
    )
    command = build_apptainer_command(ContainerInvocation(image=SIF, mounts=mounts, env={}, args=["/bin/true"]))
    assert "/data/pipelines/p/eou=7/workspace/calibrate:/workflow/workspace/calibrate:ro" in command


@pytest.mark.parametrize(
    ("mount", "bad"),
    [
        (Mount(Path("/data/staged/a:b"), "/workflow/input/a", read_only=True), "/data/staged/a:b"),
        (Mount(Path("/data/staged/a,b"), "/workflow/input/a", read_only=True), "/data/staged/a,b"),
        (Mount(Path("/data/staged/a"), "/workflow/input/a:b", read_only=True), "/workflow/input/a:b"),
    ],
)
def test_bind_paths_apptainer_cannot_express_are_refused(mount: Mount, bad: str) -> None:
    invocation = ContainerInvocation(image=SIF, mounts=[mount], env={}, args=["/bin/true"])
    with pytest.raises(ContainerContractError, match="apptainer --bind") as caught:
        build_apptainer_command(invocation)
    assert repr(bad) in str(caught.value)


def test_sub_group_key_with_a_colon_is_refused_for_apptainer() -> None:
    layout = attempt_layout(
        base_dir=BASE,
        pipeline="p",
        sub_group_key="obs=2024-05-01T10:00",
        step="s",
        attempt_id=1,
        is_final=False,
    )
    mounts = build_mounts(layout=layout, input_packages=[])
    with pytest.raises(ContainerContractError, match="sub_group_key"):
        build_apptainer_command(ContainerInvocation(image=SIF, mounts=mounts, env={}, args=["/bin/true"]))


@pytest.mark.parametrize("value", ['say "hi"', "a=b,c", "two\nlines"])
def test_env_values_apptainer_would_mangle_are_refused(value: str) -> None:
    invocation = ContainerInvocation(image=SIF, mounts=[], env={"X": value}, args=["/bin/true"])
    with pytest.raises(ContainerContractError, match="apptainer --env"):
        build_apptainer_command(invocation)


def test_env_values_apptainer_keeps_are_passed() -> None:
    invocation = ContainerInvocation(image=SIF, mounts=[], env={"A": "x,y", "B": "k=v", "C": ""}, args=["/bin/true"])
    command = build_apptainer_command(invocation)
    assert command[command.index("--env") :][:6] == ["--env", "A=x,y", "--env", "B=k=v", "--env", "C="]


def test_apptainer_refuses_a_software_directory() -> None:
    software = ResolvedImage(path=Path("/opt/chai"), digest=None, kind=ImageKind.SOFTWARE_DIR)
    with pytest.raises(ContainerContractError, match="software directory"):
        build_apptainer_command(ContainerInvocation(image=software, mounts=[], env={}, args=["/bin/true"]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"args": []}, "non-empty list"),
        ({"gpus": -1}, "gpus"),
        ({"env": {"1BAD": "x"}}, "invalid"),
        ({"workdir": "workflow"}, "workdir"),
        (
            {
                "mounts": [
                    Mount(Path("/a"), "/workflow/input/x", read_only=True),
                    Mount(Path("/b"), "/workflow/input/x", read_only=True),
                ]
            },
            "several mounts target /workflow/input/x",
        ),
    ],
)
def test_invalid_invocations_are_refused(kwargs: dict, match: str) -> None:
    fields = {"image": SIF, "mounts": [], "env": {}, "args": ["/bin/true"], **kwargs}
    with pytest.raises(ContainerContractError, match=match):
        ContainerInvocation(**fields)


# ---------------------------------------------------------------------------------------------------------
# bubblewrap


@pytest.fixture
def fake_host(tmp_path: Path) -> Path:
    """A host root with merged /usr (bin, lib, sbin are links), a real lib64 directory and no lib32."""
    root = tmp_path / "host"
    for name in ("usr/bin", "usr/lib", "usr/sbin", "etc", "lib64"):
        (root / name).mkdir(parents=True)
    for name in ("bin", "lib", "sbin"):
        (root / name).symlink_to(f"usr/{name}")
    return root


# bwrap runs under the fixed signal-forwarding script (the payload must see the pre-walltime SIGTERM).
FORWARDER = ["bash", "-c", BWRAP_SIGNAL_FORWARDER, "ccat-bwrap-signals"]


def test_bwrap_forwarder_takes_every_value_as_an_argument() -> None:
    # A fixed script: the user's values (paths, env, args) follow it as positional arguments, never inside it.
    software = ResolvedImage(path=Path("/srv/chai"), digest=None, kind=ImageKind.SOFTWARE_DIR)
    invocation = ContainerInvocation(image=software, mounts=[], env={"EVIL": "$(touch x)"}, args=["run", "'; x"])
    command = build_bwrap_command(invocation, shell="/bin/bash")
    assert command[:4] == ["/bin/bash", "-c", BWRAP_SIGNAL_FORWARDER, "ccat-bwrap-signals"]
    assert "$(touch x)" not in command[2] and "'; x" not in command[2]
    assert command[-2:] == ["run", "'; x"]


def test_bwrap_command_for_a_software_directory(fake_host: Path) -> None:
    software = ResolvedImage(path=Path("/srv/software/chai"), digest=None, kind=ImageKind.SOFTWARE_DIR)
    invocation = intermediate_invocation(image=software)
    assert build_bwrap_command(invocation, host_root=fake_host) == [
        *FORWARDER,
        "bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
        "--setenv", "PATH", DEFAULT_PATH,
        "--setenv", "WORKFLOW_CONFIG_DIR", "/workflow/config",
        "--setenv", "WORKFLOW_INPUT_DIR", "/workflow/input",
        "--setenv", "WORKFLOW_LOGS_DIR", "/workflow/logs",
        "--setenv", "WORKFLOW_MANIFEST", "/workflow/config/manifest.json",
        "--setenv", "WORKFLOW_OUTPUT_DIR", "/workflow/workspace/calibrate/",
        "--setenv", "WORKFLOW_WORKSPACE_DIR", "/workflow/workspace",
        "--ro-bind", f"{fake_host}/usr", "/usr",
        "--ro-bind", f"{fake_host}/etc", "/etc",
        "--symlink", "usr/bin", "/bin",
        "--symlink", "usr/lib", "/lib",
        "--ro-bind", f"{fake_host}/lib64", "/lib64",
        "--symlink", "usr/sbin", "/sbin",
        "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--dir", "/workflow",
        "--ro-bind", "/srv/software/chai", "/opt/software",
        "--ro-bind", "/data/staged/chai/chai_scan_0042_lfa", "/workflow/input/chai_scan_0042_lfa",
        "--ro-bind", "/data/staged/chai/chai_scan_0042_hfa", "/workflow/input/chai_scan_0042_hfa",
        "--bind", "/data/pipelines/chai-co43/eou=0042/workspace/calibrate", "/workflow/workspace/calibrate",
        "--ro-bind", "/data/pipelines/chai-co43/eou=0042/attempts/calibrate/17/config", "/workflow/config",
        "--bind", "/data/pipelines/chai-co43/eou=0042/attempts/calibrate/17/logs", "/workflow/logs",
        "--remount-ro", "/",
        "--chdir", "/workflow",
        "--", "/usr/bin/python3", "/opt/software/bin/chai_calibrate.py",
    ]  # fmt: skip


def test_bwrap_and_apptainer_mount_the_same_workflow_paths() -> None:
    software = ResolvedImage(path=Path("/srv/software/chai"), digest=None, kind=ImageKind.SOFTWARE_DIR)
    bwrap = build_bwrap_command(intermediate_invocation(image=software))
    apptainer = build_apptainer_command(intermediate_invocation())
    bwrap_binds = [
        (bwrap[i + 1], bwrap[i + 2], bwrap[i] == "--ro-bind")
        for i, arg in enumerate(bwrap)
        if arg in ("--bind", "--ro-bind") and bwrap[i + 2].startswith("/workflow")
    ]
    apptainer_binds = []
    for i, arg in enumerate(apptainer):
        if arg == "--bind":
            host, container, *mode = apptainer[i + 1].split(":")
            apptainer_binds.append((host, container, mode == ["ro"]))
    assert bwrap_binds == apptainer_binds


def test_bwrap_command_for_a_sandbox_binds_its_top_level_entries(tmp_path: Path) -> None:
    sandbox = tmp_path / "chai.sandbox"
    for name in ("usr/bin", "etc", "opt/chai", "dev", "proc", "tmp", "workflow"):
        (sandbox / name).mkdir(parents=True)
    (sandbox / "bin").symlink_to("usr/bin")
    (sandbox / "environment").write_text("")
    image = ResolvedImage(path=sandbox, digest=None, kind=ImageKind.SANDBOX)
    invocation = ContainerInvocation(image=image, mounts=[], env={}, args=["/opt/chai/run"])
    assert build_bwrap_command(invocation) == [
        *FORWARDER,
        "bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
        "--setenv", "PATH", DEFAULT_PATH,
        "--symlink", "usr/bin", "/bin",
        "--ro-bind", f"{sandbox}/environment", "/environment",
        "--ro-bind", f"{sandbox}/etc", "/etc",
        "--ro-bind", f"{sandbox}/opt", "/opt",
        "--ro-bind", f"{sandbox}/usr", "/usr",
        "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--dir", "/workflow",
        "--remount-ro", "/",
        "--chdir", "/workflow",
        "--", "/opt/chai/run",
    ]  # fmt: skip


def test_bwrap_keeps_a_path_the_caller_passes() -> None:
    software = ResolvedImage(path=Path("/srv/chai"), digest=None, kind=ImageKind.SOFTWARE_DIR)
    invocation = ContainerInvocation(image=software, mounts=[], env={"PATH": "/opt/software/bin"}, args=["run"])
    command = build_bwrap_command(invocation)
    assert command[9:12] == ["--setenv", "PATH", "/opt/software/bin"]
    assert command.count("--setenv") == 1


def test_bwrap_refuses_gpus_and_sif_images() -> None:
    with pytest.raises(ContainerContractError, match="GPUs"):
        build_bwrap_command(ContainerInvocation(image=SIF, mounts=[], env={}, args=["x"], gpus=2))
    with pytest.raises(ContainerContractError, match="cannot run the SIF image"):
        build_bwrap_command(ContainerInvocation(image=SIF, mounts=[], env={}, args=["x"]))


# ---------------------------------------------------------------------------------------------------------
# Runtime selection


def test_get_runtime_knows_the_configurable_runtimes() -> None:
    assert get_runtime("apptainer") == ApptainerRuntime()
    assert get_runtime("bubblewrap", bwrap="/usr/local/bin/bwrap") == BubblewrapRuntime(bwrap="/usr/local/bin/bwrap")
    assert RUNTIME_NAMES == settings.CONTAINER_RUNTIMES
    for name in settings.CONTAINER_RUNTIMES:
        assert get_runtime(name).name == name


def test_get_runtime_refuses_unknown_names_and_options() -> None:
    with pytest.raises(UnknownContainerRuntime, match=r"'docker'.*apptainer, bubblewrap"):
        get_runtime("docker")
    with pytest.raises(ContainerContractError, match="invalid options for the apptainer runtime"):
        get_runtime("apptainer", bwrap="x")


def test_runtime_command_matches_the_builder() -> None:
    invocation = intermediate_invocation()
    assert get_runtime("apptainer", apptainer="/usr/bin/apptainer").command(invocation) == build_apptainer_command(
        invocation, apptainer="/usr/bin/apptainer"
    )


def test_check_names_a_missing_binary(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-binary")
    apptainer_problem = ApptainerRuntime(apptainer=missing).check()
    assert apptainer_problem is not None and "not on PATH" in apptainer_problem and "Apptainer" in apptainer_problem
    bwrap_problem = BubblewrapRuntime(bwrap=missing).check()
    assert bwrap_problem is not None and "apt-get install bubblewrap" in bwrap_problem
