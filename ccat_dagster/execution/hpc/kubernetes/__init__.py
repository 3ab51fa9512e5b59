"""The Kubernetes backend: one ``batch/v1`` Job per attempt, on the official ``kubernetes`` client.

One concern a module: ``config`` (settings as a typed value), ``manifest`` (pure Job construction),
``job_status`` (pure parsing of Jobs and pods), ``client`` (the API calls and their retries), ``connect``
(in-cluster or kubeconfig authentication), ``backend`` (the HpcBackend), ``doctor`` (health checks).
The client library is imported only when a backend is built, not with this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ccat_dagster.execution.hpc.kubernetes.backend import KubernetesBackend
    from ccat_dagster.settings import Settings

__all__ = ["backend_from_settings"]


def backend_from_settings(settings: Settings) -> KubernetesBackend:
    """The backend as the settings describe it (namespace, image, volumes, authentication)."""
    from ccat_dagster.execution.hpc.kubernetes.backend import KubernetesBackend
    from ccat_dagster.execution.hpc.kubernetes.connect import api_client, kubernetes_client

    k8s = settings.kubernetes
    config = k8s.backend_config(namespace=settings.k8s_namespace)
    api = api_client(auth=k8s.auth, kubeconfig=k8s.kubeconfig, context=k8s.context)
    return KubernetesBackend(config=config, client=kubernetes_client(api))
