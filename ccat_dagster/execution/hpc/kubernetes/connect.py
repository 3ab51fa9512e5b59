"""Authentication: an ``ApiClient`` from the pod's service account (in-cluster) or from a kubeconfig file.

``auto`` uses the service account when running in a pod (``KUBERNETES_SERVICE_HOST`` is set), else the
kubeconfig (``K8S_KUBECONFIG``, else ``$KUBECONFIG``, else ``~/.kube/config``). The client's own urllib3
retries are switched off: ``KubernetesClient`` owns the retries and knows which failures are transient.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.config.config_exception import ConfigException

from ccat_dagster.execution.hpc.kubernetes.client import KubernetesClient
from ccat_dagster.execution.hpc.kubernetes.config import AUTH_MODES, KubernetesConfigError

__all__ = ["api_client", "kubernetes_client"]


def api_client(
    *, auth: str, kubeconfig: str = "", context: str = "", environ: Mapping[str, str] | None = None
) -> k8s.ApiClient:
    env = os.environ if environ is None else environ
    if auth not in AUTH_MODES:
        raise KubernetesConfigError(f"Kubernetes auth {auth!r} is unknown: use {', '.join(AUTH_MODES)}")
    configuration = k8s.Configuration()
    mode = auth
    if mode == "auto":
        mode = "in-cluster" if env.get("KUBERNETES_SERVICE_HOST") else "kubeconfig"
    try:
        if mode == "in-cluster":
            k8s_config.load_incluster_config(client_configuration=configuration)
        else:
            path = kubeconfig or env.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
            k8s_config.load_kube_config(
                config_file=path, context=context or None, client_configuration=configuration, persist_config=False
            )
    except (ConfigException, OSError) as error:
        where = "the pod's service account" if mode == "in-cluster" else f"kubeconfig {path}"
        raise KubernetesConfigError(
            f"cannot load Kubernetes credentials from {where}: {error}; set CCAT_WORKFLOW_MANAGER_K8S_AUTH / "
            "CCAT_WORKFLOW_MANAGER_K8S_KUBECONFIG"
        ) from None
    configuration.retries = 0
    return k8s.ApiClient(configuration=configuration)


def kubernetes_client(api: k8s.ApiClient, **options: float) -> KubernetesClient:
    """The wrapper over the three APIs the backend and ``doctor`` use."""
    return KubernetesClient(
        batch_api=k8s.BatchV1Api(api),
        core_api=k8s.CoreV1Api(api),
        authorization_api=k8s.AuthorizationV1Api(api),
        version_api=k8s.VersionApi(api),
        custom_api=k8s.CustomObjectsApi(api),
        **options,  # type: ignore[arg-type]
    )
