"""Golden Job manifests of the Kubernetes backend (CPU, GPU, fan-in with many upstream mounts), validated
against the official OpenAPI schemas of supported Kubernetes versions with kubernetes-validate (offline: the
package ships the schemas). No cluster runs here; these pin what the API server would be sent.

``CCAT_UPDATE_GOLDEN=1`` rewrites the golden files instead of comparing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest

from ccat_dagster.execution.contract import UpstreamProduct, attempt_layout, build_environment, build_mounts
from ccat_dagster.execution.hpc.base import InvalidJobSpecError, JobResources, JobSpec
from ccat_dagster.execution.hpc.kubernetes.config import (
    KubernetesConfig,
    KubernetesConfigError,
    parse_volume_specs,
)
from ccat_dagster.execution.hpc.kubernetes.manifest import (
    build_job_manifest,
    job_object_name,
    label_value,
    quantity_memory,
)
from ccat_dagster.execution.images import ImageKind, ResolvedImage
from ccat_dagster.execution.runtimes import ApptainerRuntime, ContainerInvocation

from .k8s_standin import SCHEMA_VERSIONS

GOLDEN = Path(__file__).parent / "data" / "k8s"
BASE = Path("/data/pipelines")
SIF = ResolvedImage(
    path=Path(f"/data/sif-cache/sha256-{'ab' * 32}.sif"), digest="sha256:" + "ab" * 32, kind=ImageKind.SIF
)
CONFIG = KubernetesConfig(
    namespace="ccat-workflows",
    job_image="registry.example.org/ccat/apptainer-runner:1.3",
    volumes=parse_volume_specs(
        "pvc:ccat-pipelines:/data/pipelines,pvc:ccat-staged:/data/staged:ro,host:/data/sif-cache:/data/sif-cache:ro"
    ),
    image_pull_secrets=("ccat-registry",),
    service_account="ccat-jobs",
    ttl_seconds_after_finished=3600,
)


def _spec(*, step: str, key: str, attempt: int, is_final: bool, resources: JobResources, upstream=(), packages=()):
    layout = attempt_layout(
        base_dir=BASE, pipeline="chai-co43", sub_group_key=key, step=step, attempt_id=attempt, is_final=is_final
    )
    mounts = build_mounts(layout=layout, input_packages=list(packages), upstream_products=list(upstream))
    invocation = ContainerInvocation(
        image=SIF,
        mounts=mounts,
        env=build_environment(layout=layout),
        args=["/usr/bin/python3", f"/opt/software/bin/chai_{step}.py"],
        gpus=resources.gpus,
    )
    return JobSpec(
        command=ApptainerRuntime().command(invocation),
        resources=resources,
        env={},
        job_name=f"ccat-chai-co43-{step}-{attempt}-0a1b2c3d",
        log_dir=layout.logs_dir,
    )


# The three golden cases as the arguments of a runtime's ``_spec`` (here Apptainer; test_k8s_oci_manifest builds
# the same cases with the step's own image).
def cpu_case() -> dict[str, Any]:
    return {
        "step": "calibrate",
        "key": "executed_obs_unit=0042",
        "attempt": 17,
        "is_final": False,
        "resources": JobResources(cpu=4, memory_gb=16, time_hours=2),
        "packages": [("chai_scan_0042_lfa", Path("/data/staged/chai/chai_scan_0042_lfa"))],
    }


def gpu_case() -> dict[str, Any]:
    return {
        "step": "baseline",
        "key": "executed_obs_unit=0042",
        "attempt": 18,
        "is_final": False,
        "resources": JobResources(cpu=8, memory_gb=30.5, time_hours=0.5, gpus=2),
        "upstream": [_product("calibrate", "executed_obs_unit=0042", 1)],
    }


def fan_in_case(scans: int = 24) -> dict[str, Any]:
    return {
        "step": "grid_map",
        "key": "all",
        "attempt": 301,
        "is_final": True,
        "resources": JobResources(cpu=16, memory_gb=64, time_hours=12),
        "upstream": [_product("baseline", f"executed_obs_unit={n:04d}", n) for n in range(scans)],
    }


def cpu_spec() -> JobSpec:
    return _spec(**cpu_case())


def gpu_spec() -> JobSpec:
    return _spec(**gpu_case())


def fan_in_spec(scans: int = 24) -> JobSpec:
    return _spec(**fan_in_case(scans))


def _product(step: str, key: str, product_id: int) -> UpstreamProduct:
    return UpstreamProduct(
        product_id=product_id,
        step=step,
        sub_group_key=key,
        product_type="intermediate",
        relative_path=f"{key}.fits",
        size=10,
        sha256="0" * 64,
    )


CASES = {"cpu": cpu_spec, "gpu": gpu_spec, "fan_in": fan_in_spec}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_job_manifest(case):
    assert_golden(build_job_manifest(CASES[case](), CONFIG), case)


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_manifests_validate_against_the_official_schema(case, version):
    assert_golden_validates(case, version)


def assert_golden(manifest: dict[str, Any], case: str) -> None:
    """``manifest`` is ``data/k8s/job_<case>.json`` to the letter (``CCAT_UPDATE_GOLDEN=1`` rewrites it)."""
    path = GOLDEN / f"job_{case}.json"
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    if os.environ.get("CCAT_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} differs; CCAT_UPDATE_GOLDEN=1 rewrites it after a deliberate change"


def assert_golden_validates(case: str, version: str) -> None:
    """The golden ``job_<case>.json`` is a valid Job of Kubernetes ``version`` (strict: no unknown field)."""
    manifest = json.loads((GOLDEN / f"job_{case}.json").read_text())
    assert kubernetes_validate.validate(manifest, version, strict=True) == version.rsplit(".", 1)[0]


def test_the_validator_catches_a_broken_manifest():
    """The schema check above can fail: a misspelt field and a wrong type are refused in strict mode."""
    manifest = build_job_manifest(cpu_spec(), CONFIG)
    manifest["spec"]["backofLimit"] = 0
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifest, SCHEMA_VERSIONS[-1], strict=True)
    manifest = build_job_manifest(cpu_spec(), CONFIG)
    manifest["spec"]["activeDeadlineSeconds"] = "2h"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifest, SCHEMA_VERSIONS[-1], strict=True)


def test_cpu_manifest_maps_resources_deadline_and_retries():
    manifest = build_job_manifest(cpu_spec(), CONFIG)
    spec = manifest["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    # 2 h = 7200 s: SIGTERM at 7080 s, SIGKILL 120 s later, both within the limit.
    assert spec["activeDeadlineSeconds"] + pod["terminationGracePeriodSeconds"] == 7200
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi"},
        "limits": {"cpu": "4", "memory": "16Gi"},
    }
    assert container["command"][:2] == ["apptainer", "exec"] and container["image"] == CONFIG.job_image
    assert pod["serviceAccountName"] == "ccat-jobs" and pod["imagePullSecrets"] == [{"name": "ccat-registry"}]
    assert pod["automountServiceAccountToken"] is False
    labels = manifest["metadata"]["labels"]
    assert labels["data.ccat.uni-koeln.de/pipeline"] == "chai-co43"
    assert labels["data.ccat.uni-koeln.de/step"] == "calibrate"
    assert labels["data.ccat.uni-koeln.de/attempt"] == "17"
    assert manifest["metadata"]["annotations"]["data.ccat.uni-koeln.de/sub-group"] == "executed_obs_unit=0042"
    assert spec["template"]["metadata"]["labels"] == labels


def test_gpu_manifest_asks_for_the_gpu_resource_in_requests_and_limits():
    (container,) = build_job_manifest(gpu_spec(), CONFIG)["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"cpu": "8", "memory": "31232Mi", "nvidia.com/gpu": "2"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert "--nv" in container["command"]


def test_fan_in_binds_every_upstream_sub_group_and_every_bind_source_is_on_a_volume():
    manifest = build_job_manifest(fan_in_spec(24), CONFIG)
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    binds = [container["command"][i + 1] for i, arg in enumerate(container["command"]) if arg == "--bind"]
    upstream = [b for b in binds if ":/workflow/workspace/baseline/" in b]
    assert len(upstream) == 24 and all(b.endswith(":ro") for b in upstream)
    for bind in binds:
        assert CONFIG.volume_for(PurePosixPath(bind.split(":")[0])) is not None, bind
    # The pod's own volumes stay the configured three, whatever the number of upstream sub-groups.
    assert [v["name"] for v in manifest["spec"]["template"]["spec"]["volumes"]] == ["data-0", "data-1", "data-2"]


def test_a_log_directory_on_no_volume_is_refused_naming_the_setting():
    config = KubernetesConfig(
        namespace="ccat", job_image="runner:1", volumes=parse_volume_specs("pvc:staged:/data/staged")
    )
    with pytest.raises(InvalidJobSpecError, match="CCAT_WORKFLOW_MANAGER_K8S_VOLUMES"):
        build_job_manifest(cpu_spec(), config)


def test_job_names_are_dns_labels_deterministic_and_distinct():
    long = "ccat-" + "Very_Long.Pipeline" * 6 + "-grid_map-301-0a1b2c3d"
    name = job_object_name(long)
    assert len(name) <= 63 and name == job_object_name(long) and name.islower()
    assert job_object_name(long) != job_object_name(long.replace("301", "302"))
    assert job_object_name("ccat-chai-calibrate-17-0a1b2c3d") == "ccat-chai-calibrate-17-0a1b2c3d"
    assert job_object_name("ccat-A") != job_object_name("ccat-a")
    assert label_value("executed_obs_unit=0042").startswith("executed_obs_unit_0042_")
    assert label_value("all") == "all"


def test_memory_quantities():
    assert [quantity_memory(v) for v in (16, 1.5, 0.1, 30.5)] == ["16Gi", "1536Mi", "103Mi", "31232Mi"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("pvc:Bad_Name:/data", "is not a Kubernetes name"),
        ("nfs:server:/data", "volume kind 'nfs' is unknown"),
        ("pvc:claim:data", "must be an absolute, normalised path"),
        ("pvc:claim:/data:rw", "is not <pvc|host>"),
        ("pvc:a:/data,pvc:b:/data", "several volumes are mounted at /data"),
    ],
)
def test_bad_volume_settings_name_the_value(raw, message):
    with pytest.raises(KubernetesConfigError, match=message):
        parse_volume_specs(raw)
