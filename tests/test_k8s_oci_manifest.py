"""Golden Job manifests for CONTAINER_RUNTIME=oci: the step's own image as the Job's container (CPU, GPU, fan-in),
validated against the official OpenAPI schemas with kubernetes-validate as the Apptainer ones are; the mapping
of the contract's mounts onto volumes (subPath, read-only), the security context, the refusals; and the
reserved CPU hours of a finished pod. No cluster runs here: these pin what the API server would be sent.

``CCAT_UPDATE_GOLDEN=1`` rewrites the golden files instead of comparing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ccat_dagster.doctor import CheckStatus, check_container_runtime
from ccat_dagster.execution.contract import ContainerContractError, attempt_layout, build_environment, build_mounts
from ccat_dagster.execution.hpc.base import InvalidJobSpecError, JobResources, JobSpec
from ccat_dagster.execution.hpc.kubernetes.config import KubernetesConfig, parse_volume_specs
from ccat_dagster.execution.hpc.kubernetes.job_status import parse_job_status
from ccat_dagster.execution.hpc.kubernetes.manifest import build_job_manifest
from ccat_dagster.execution.images import ImageKind, ResolvedImage
from ccat_dagster.execution.runtimes import ContainerInvocation, OciRuntime, get_runtime
from ccat_dagster.settings import Settings, SettingsError

from .k8s_standin import SCHEMA_VERSIONS
from .test_k8s_job_status import BACKOFF, NOW, job, pod, terminated
from .test_k8s_manifest import BASE, assert_golden, assert_golden_validates, cpu_case, fan_in_case, gpu_case

DIGEST = "sha256:" + "cd" * 32
IMAGE = ResolvedImage(
    path=None, digest=DIGEST, kind=ImageKind.OCI, reference=f"registry.example.org/ccat/chai@{DIGEST}"
)
CONFIG = KubernetesConfig(
    namespace="ccat-workflows",
    job_image="",  # no Apptainer image: every job brings its own
    volumes=parse_volume_specs("pvc:ccat-pipelines:/data/pipelines,pvc:ccat-staged:/data/staged:ro"),
    image_pull_secrets=("ccat-registry",),
    service_account="ccat-jobs",
    ttl_seconds_after_finished=3600,
    run_as_user="4100:4100",
)


def _spec(*, step: str, key: str, attempt: int, is_final: bool, resources: JobResources, upstream=(), packages=()):
    layout = attempt_layout(
        base_dir=BASE, pipeline="chai-co43", sub_group_key=key, step=step, attempt_id=attempt, is_final=is_final
    )
    invocation = ContainerInvocation(
        image=IMAGE,
        mounts=build_mounts(layout=layout, input_packages=list(packages), upstream_products=list(upstream)),
        env=build_environment(layout=layout),
        args=["/usr/bin/python3", f"/opt/software/bin/chai_{step}.py"],
        gpus=resources.gpus,
    )
    runtime = OciRuntime()
    return JobSpec(
        command=runtime.command(invocation),
        resources=resources,
        env=dict(invocation.env),
        job_name=f"ccat-chai-co43-{step}-{attempt}-0a1b2c3d",
        log_dir=layout.logs_dir,
        container=runtime.job_container(invocation),
    )


def cpu_spec() -> JobSpec:
    return _spec(**cpu_case())


def gpu_spec() -> JobSpec:
    return _spec(**gpu_case())


def fan_in_spec(scans: int = 24) -> JobSpec:
    return _spec(**fan_in_case(scans))


CASES = {"oci_cpu": cpu_spec, "oci_gpu": gpu_spec, "oci_fan_in": fan_in_spec}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_oci_job_manifest(case):
    assert_golden(build_job_manifest(CASES[case](), CONFIG), case)


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_oci_manifests_validate_against_the_official_schema(case, version):
    assert_golden_validates(case, version)


def test_the_container_is_the_step_image_by_digest_with_the_contract_mounts_and_environment():
    spec = cpu_spec()
    pod_spec = build_job_manifest(spec, CONFIG)["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    assert container["image"] == f"registry.example.org/ccat/chai@{DIGEST}"
    assert container["command"] == ["/usr/bin/python3", "/opt/software/bin/chai_calibrate.py"]
    assert container["workingDir"] == "/workflow"
    assert {e["name"]: e["value"] for e in container["env"]} == spec.env and "WORKFLOW_CONFIG_DIR" in spec.env
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    staged = mounts["/workflow/input/chai_scan_0042_lfa"]
    assert (staged["name"], staged["subPath"], staged["readOnly"]) == ("data-1", "chai/chai_scan_0042_lfa", True)
    for path, read_only in (("/workflow/config", True), ("/workflow/logs", False), ("/tmp", False)):
        assert mounts[path]["readOnly"] is read_only, path
    workspace = [m for m in container["volumeMounts"] if m["mountPath"].startswith("/workflow/workspace/")]
    assert workspace and all(m["subPath"].startswith("chai-co43/executed_obs_unit=0042/") for m in workspace)
    # Only the contract's directories: no volume is mounted whole.
    assert all("subPath" in m for m in container["volumeMounts"] if m["name"].startswith("data-"))
    assert [v["name"] for v in pod_spec["volumes"]] == ["data-0", "data-1", "tmp"]
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 4100,
        "runAsGroup": 4100,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def test_fan_in_mounts_every_upstream_sub_group_read_only():
    (container,) = build_job_manifest(fan_in_spec(24), CONFIG)["spec"]["template"]["spec"]["containers"]
    upstream = [m for m in container["volumeMounts"] if m["mountPath"].startswith("/workflow/workspace/baseline/")]
    assert len(upstream) == 24 and all(m["readOnly"] for m in upstream)
    assert (
        "nvidia.com/gpu"
        in build_job_manifest(gpu_spec(), CONFIG)["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )


def test_a_contract_write_onto_a_read_only_volume_or_outside_the_volumes_is_refused():
    read_only = KubernetesConfig(
        namespace="ccat", job_image="", volumes=parse_volume_specs("pvc:all:/data:ro,pvc:staged:/data/staged:ro")
    )
    with pytest.raises(InvalidJobSpecError, match="the contract writes to /workflow/.* read-only volume all"):
        build_job_manifest(cpu_spec(), read_only)
    partial = KubernetesConfig(
        namespace="ccat", job_image="", volumes=parse_volume_specs("pvc:pipelines:/data/pipelines")
    )
    with pytest.raises(InvalidJobSpecError, match=r"/data/staged/chai/chai_scan_0042_lfa .* is on no volume"):
        build_job_manifest(cpu_spec(), partial)


def test_a_host_command_without_a_job_image_is_refused_naming_the_setting():
    spec = cpu_spec()
    host_command = JobSpec(
        command=["apptainer", "exec", "x.sif"], resources=spec.resources, env={}, job_name=spec.job_name,
        log_dir=spec.log_dir,
    )  # fmt: skip
    with pytest.raises(InvalidJobSpecError, match="K8S_JOB_IMAGE is empty"):
        build_job_manifest(host_command, CONFIG)


def test_the_oci_runtime_refuses_local_images_and_others_refuse_registry_images():
    layout = attempt_layout(base_dir=BASE, pipeline="p", sub_group_key="all", step="s", attempt_id=1, is_final=True)
    local = ResolvedImage(path=Path("/images/chai.sif"), digest=DIGEST, kind=ImageKind.SIF)
    invocation = ContainerInvocation(image=local, mounts=[], env=build_environment(layout=layout), args=["run"])
    with pytest.raises(ContainerContractError, match="CONTAINER_RUNTIME=oci runs registry images"):
        get_runtime("oci").command(invocation)
    remote = ContainerInvocation(image=IMAGE, mounts=[], env={}, args=["run"])
    for name in ("apptainer", "bubblewrap"):
        assert get_runtime(name).job_container(remote) is None
        with pytest.raises(ContainerContractError, match="is in a registry only; set CONTAINER_RUNTIME=oci"):
            get_runtime(name).command(remote)


# ---------------------------------------------------------------------------------------------- accounting


def _pod_with_cpu(state: dict, cpu: str | None) -> dict:
    obj = pod("Succeeded", state)
    if cpu is not None:
        obj["spec"]["containers"][0]["resources"] = {"requests": {"cpu": cpu}, "limits": {"cpu": cpu}}
    return obj


COMPLETE = ("Complete", "CompletionsReached", "Reached expected number of succeeded pods")


def test_cpu_hours_are_the_reserved_cpus_times_the_pod_run_time():
    # 18:00:05 → 18:20:05 is 1/3 h; 4 CPUs reserved (whatever the payload used).
    done = job(COMPLETE, status={"succeeded": 1})
    info = parse_job_status(done, [_pod_with_cpu(terminated(0, "Completed"), "4")], now=NOW, image_pull_grace_seconds=1)
    assert info.info.cpu_hours == pytest.approx(4 / 3)
    millis = parse_job_status(
        done, [_pod_with_cpu(terminated(0, "Completed"), "1500m")], now=NOW, image_pull_grace_seconds=1
    )
    assert millis.info.cpu_hours == pytest.approx(0.5)
    failed = parse_job_status(
        job(BACKOFF), [_pod_with_cpu(terminated(137, "OOMKilled"), "2")], now=NOW, image_pull_grace_seconds=1
    )
    assert failed.info.cpu_hours == pytest.approx(2 / 3)


def test_cpu_hours_are_absent_without_timestamps_or_a_request():
    done = job(COMPLETE, status={"succeeded": 1, "completionTime": "2026-12-02T18:20:07Z"})
    no_request = parse_job_status(done, [_pod_with_cpu(terminated(0, "Completed"), None)], now=NOW,
                                  image_pull_grace_seconds=1)  # fmt: skip
    assert no_request.info.cpu_hours is None
    state = terminated(0, "Completed")
    del state["terminated"]["finishedAt"]
    assert (
        parse_job_status(done, [_pod_with_cpu(state, "4")], now=NOW, image_pull_grace_seconds=1).info.cpu_hours is None
    )
    deadline = job(("Failed", "DeadlineExceeded", "Job was active longer than specified deadline"))
    assert parse_job_status(deadline, [], now=NOW, image_pull_grace_seconds=1).info.cpu_hours is None, "pod gone"


# ---------------------------------------------------------------------------------------------- settings


def _env(**values: str) -> dict[str, str]:
    base = {
        "CCAT_DAGSTER_DATA_DIR": "/srv/ccat",
        "CCAT_WORKFLOW_MANAGER_HPC_BACKEND": "kubernetes",
        "CCAT_WORKFLOW_MANAGER_CONTAINER_RUNTIME": "oci",
        "CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR": "/data/pipelines",
        "CCAT_WORKFLOW_MANAGER_K8S_VOLUMES": "pvc:ccat-pipelines:/data/pipelines",
    }
    return {**base, **{f"CCAT_WORKFLOW_MANAGER_{key}": value for key, value in values.items()}}


def test_oci_settings_need_kubernetes_but_no_job_image_and_check_the_user():
    settings = Settings.from_env(_env(K8S_RUN_AS_USER="4100:4100"))
    config = settings.kubernetes.backend_config(namespace=settings.k8s_namespace)
    assert (config.job_image, config.run_as_user) == ("", "4100:4100")
    assert check_container_runtime(settings=settings).status is CheckStatus.OK
    with pytest.raises(SettingsError, match="CONTAINER_RUNTIME=oci runs each step's image as a Kubernetes Job's"):
        Settings.from_env(_env(HPC_BACKEND="slurm"))
    with pytest.raises(SettingsError, match="K8S_JOB_IMAGE is empty"):
        Settings.from_env(_env(CONTAINER_RUNTIME="apptainer"))
    with pytest.raises(SettingsError, match="K8S_RUN_AS_USER='root' is invalid: give a numeric uid"):
        Settings.from_env(_env(K8S_RUN_AS_USER="root"))


def test_the_local_backend_refuses_a_job_that_brings_its_own_image(tmp_path):
    from ccat_dagster.execution.hpc.local import LocalBackend

    backend = LocalBackend(state_dir=tmp_path / "jobs", max_concurrent_jobs=1)
    with pytest.raises(InvalidJobSpecError, match="only HPC_BACKEND=kubernetes does; set CONTAINER_RUNTIME=apptainer"):
        backend.submit(cpu_spec())
    assert not any((tmp_path / "jobs").glob("*.spec.json")), "nothing was queued"
