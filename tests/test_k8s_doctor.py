"""``ccat-dagster doctor`` with HPC_BACKEND=kubernetes against the local HTTP stand-in of the Kubernetes API:
API reachable, namespace exists, and permissions to create/list/get/delete Jobs and read pods and their logs
by SelfSubjectAccessReview. Also the start-up validation of the K8S_* settings (one line each)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccat_dagster.doctor import CheckStatus, check_hpc_backend, check_kubernetes
from ccat_dagster.settings import Settings, SettingsError

from .k8s_standin import SERVER_VERSION, KubernetesStandIn


@pytest.fixture
def standin() -> Iterator[KubernetesStandIn]:
    with KubernetesStandIn(namespaces=("ccat",), execute=False) as server:
        yield server


def settings_for(tmp_path: Path, kubeconfig: Path, **extra: str) -> Settings:
    env = {
        "CCAT_DAGSTER_DATA_DIR": str(tmp_path),
        "CCAT_WORKFLOW_MANAGER_HPC_BACKEND": "kubernetes",
        "CCAT_WORKFLOW_MANAGER_PIPELINE_BASE_DIR": "/data/pipelines",
        "CCAT_WORKFLOW_MANAGER_K8S_AUTH": "kubeconfig",
        "CCAT_WORKFLOW_MANAGER_K8S_KUBECONFIG": str(kubeconfig),
        "CCAT_WORKFLOW_MANAGER_K8S_JOB_IMAGE": "registry.example.org/ccat/apptainer-runner:1.3",
        "CCAT_WORKFLOW_MANAGER_K8S_VOLUMES": "pvc:ccat-pipelines:/data/pipelines",
        **{f"CCAT_WORKFLOW_MANAGER_{k}": v for k, v in extra.items()},
    }
    return Settings.from_env(env)


def lines(results) -> dict[str, tuple[CheckStatus, str]]:
    return {r.name: (r.status, r.detail) for r in results}


def test_standin_doctor_all_ok(standin, tmp_path):
    results = lines(check_hpc_backend(settings=settings_for(tmp_path, standin.kubeconfig(tmp_path / "kc"))))
    assert results["hpc backend"] == (CheckStatus.OK, f"kubernetes: API server {SERVER_VERSION} answers")
    assert results["k8s namespace"] == (CheckStatus.OK, "namespace 'ccat' exists")
    status, detail = results["k8s permissions"]
    assert status is CheckStatus.OK and "create jobs" in detail and "delete jobs" in detail and "get pods/log" in detail
    assert "not allowed" not in detail
    reviews = [path for method, path in standin.requests if path.endswith("selfsubjectaccessreviews")]
    assert len(reviews) == 7


def test_standin_doctor_missing_metrics_permission_is_a_note_not_a_failure(standin, tmp_path):
    standin.denied = {("list", "metrics.k8s.io", "pods")}
    results = lines(check_kubernetes(settings=settings_for(tmp_path, standin.kubeconfig(tmp_path / "kc"))))
    status, detail = results["k8s permissions"]
    assert status is CheckStatus.OK and "not allowed: list pods.metrics.k8s.io (peak memory stays unknown)" in detail


def test_standin_doctor_missing_namespace_fails_and_skips_permissions(standin, tmp_path):
    settings = settings_for(tmp_path, standin.kubeconfig(tmp_path / "kc"), K8S_NAMESPACE="ccat-staging")
    results = lines(check_kubernetes(settings=settings))
    status, detail = results["k8s namespace"]
    assert status is CheckStatus.FAIL and "namespace 'ccat-staging' does not exist" in detail
    assert results["k8s permissions"][0] is CheckStatus.SKIP


def test_standin_doctor_names_the_denied_permissions(standin, tmp_path):
    standin.denied = {("delete", "batch", "jobs"), ("get", "", "pods/log")}
    results = lines(check_kubernetes(settings=settings_for(tmp_path, standin.kubeconfig(tmp_path / "kc"))))
    status, detail = results["k8s permissions"]
    assert status is CheckStatus.FAIL
    assert "not allowed in namespace 'ccat': delete jobs, get pods/log" in detail and "rbac.yaml" in detail


def test_standin_doctor_warns_when_the_namespace_cannot_be_read(standin, tmp_path):
    standin.forbid_namespace_read = True
    results = lines(check_kubernetes(settings=settings_for(tmp_path, standin.kubeconfig(tmp_path / "kc"))))
    assert results["k8s namespace"][0] is CheckStatus.WARN and "ClusterRole" in results["k8s namespace"][1]
    assert results["k8s permissions"][0] is CheckStatus.OK


def test_doctor_unreachable_api_server_fails_in_one_line(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with KubernetesStandIn() as standin:
        kubeconfig = standin.kubeconfig(tmp_path / "kc")
    kubeconfig.write_text(kubeconfig.read_text().replace(standin.url, f"http://127.0.0.1:{port}"))
    results = lines(check_kubernetes(settings=settings_for(tmp_path, kubeconfig)))
    status, detail = results["hpc backend"]
    assert status is CheckStatus.FAIL and "API server unreachable" in detail and "\n" not in detail
    assert results["k8s namespace"][0] is CheckStatus.SKIP


def test_doctor_missing_kubeconfig_names_the_file(tmp_path):
    results = lines(check_kubernetes(settings=settings_for(tmp_path, tmp_path / "no-such-kubeconfig")))
    status, detail = results["hpc backend"]
    assert status is CheckStatus.FAIL and "no-such-kubeconfig" in detail


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"K8S_JOB_IMAGE": ""}, "K8S_JOB_IMAGE is empty"),
        ({"K8S_VOLUMES": "pvc:ccat-staged:/data/staged"}, "mounts nothing at PIPELINE_BASE_DIR=/data/pipelines"),
        ({"K8S_VOLUMES": "pvc:claim:/data/pipelines:rw"}, "K8S_VOLUMES: volume 'pvc:claim:/data/pipelines:rw'"),
        ({"K8S_AUTH": "token"}, "K8S_AUTH='token' is invalid"),
        ({"K8S_IMAGE_PULL_POLICY": "always"}, "K8S_IMAGE_PULL_POLICY='always' is invalid"),
        ({"K8S_TTL_SECONDS_AFTER_FINISHED": "-1"}, "K8S_TTL_SECONDS_AFTER_FINISHED='-1' is invalid"),
        ({"K8S_NAMESPACE": "CCAT"}, "namespace 'CCAT' is not a Kubernetes namespace name"),
        ({"K8S_IMAGE_PULL_CREDENTIALS": "Bad_Secret"}, "'Bad_Secret' is not a Kubernetes object name"),
    ],
)
def test_bad_kubernetes_settings_stop_start_up_in_one_line(tmp_path, extra, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
        settings_for(tmp_path, tmp_path / "kc", **extra)
    assert "\n" not in str(raised.value)


def test_kubernetes_settings_are_not_required_for_other_backends(tmp_path):
    settings = Settings.from_env({"CCAT_DAGSTER_DATA_DIR": str(tmp_path), "CCAT_WORKFLOW_MANAGER_HPC_BACKEND": "slurm"})
    assert settings.kubernetes.job_image == "" and settings.kubernetes.ttl_seconds_after_finished == 86400


def test_in_cluster_authentication_outside_a_pod_says_what_is_missing(tmp_path):
    from ccat_dagster.execution.hpc.kubernetes.config import KubernetesConfigError
    from ccat_dagster.execution.hpc.kubernetes.connect import api_client

    for auth, environ in (("in-cluster", {}), ("auto", {"KUBERNETES_SERVICE_HOST": "10.0.0.1"})):
        with pytest.raises(KubernetesConfigError, match="from the pod's service account"):
            api_client(auth=auth, environ=environ)
    with pytest.raises(KubernetesConfigError, match="kubeconfig .*elsewhere"):
        api_client(auth="auto", environ={"KUBECONFIG": str(tmp_path / "elsewhere")})
