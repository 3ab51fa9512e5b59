"""The Kubernetes API calls the backend makes, with retries of known-transient failures only.

``KubernetesClient`` takes its API objects (``BatchV1Api``, ``CoreV1Api``, ``AuthorizationV1Api`` or fakes
with the same methods), a sleeper and a timer, so its tests drive it in milliseconds. Every call asks for the
raw response (``_preload_content=False``) and returns the API's own JSON, which the pure parsers read.

Retried, with exponential back-off up to ``max_attempts`` and within ``deadline_seconds``: HTTP 429 (honouring
``Retry-After``), 500, 502, 503, 504, and failures to reach the server at all (connection refused or reset,
timeouts). Anything else (400, 401, 403, 404, 409, 422, ...) is raised at once: retrying cannot fix it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from ccat_dagster.execution.hpc.base import SchedulerCommandError

__all__ = ["TRANSIENT_STATUS_CODES", "KubernetesApiError", "KubernetesClient"]

TRANSIENT_STATUS_CODES = frozenset({429, 500, 502, 503, 504})
_TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


class KubernetesApiError(SchedulerCommandError):
    """The API answered with an error (or could not be reached after the retries); ``status`` is the HTTP
    status (None when the server was not reached) and ``api_reason`` the Status object's reason."""

    def __init__(self, message: str, *, operation: str, status: int | None, api_reason: str, body: str) -> None:
        super().__init__(message, command=("kubernetes", operation), returncode=status, stderr=body)
        self.status = status
        self.api_reason = api_reason


def _status_message(error: ApiException) -> tuple[str, str]:
    """(reason, message) from the ``Status`` object in an error response body."""
    try:
        status = json.loads(error.body or "{}")
    except (TypeError, ValueError):
        return str(error.reason or ""), str(error.body or "").strip()[:300]
    if not isinstance(status, dict):
        return str(error.reason or ""), str(status)[:300]
    return str(status.get("reason") or error.reason or ""), str(status.get("message") or error.reason or "")


class KubernetesClient:
    """Thin wrapper over the official client: one method per call the backend needs."""

    def __init__(
        self,
        *,
        batch_api: Any,
        core_api: Any,
        authorization_api: Any | None = None,
        version_api: Any | None = None,
        custom_api: Any | None = None,
        sleeper: Callable[[float], None] = time.sleep,
        timer: Callable[[], float] = time.monotonic,
        max_attempts: int = 5,
        initial_backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 8.0,
        deadline_seconds: float = 60.0,
        request_timeout_seconds: float = 30.0,
    ) -> None:
        self.batch_api = batch_api
        self.core_api = core_api
        self.authorization_api = authorization_api
        self.version_api = version_api
        self.custom_api = custom_api
        self.sleeper = sleeper
        self.timer = timer
        self.max_attempts = max(1, max_attempts)
        self.initial_backoff_seconds = initial_backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.deadline_seconds = deadline_seconds
        self.request_timeout_seconds = request_timeout_seconds

    # --- the calls ----------------------------------------------------------------------------

    def create_job(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        return self._json(
            "create job", lambda **kw: self.batch_api.create_namespaced_job(namespace=namespace, body=manifest, **kw)
        )

    def read_job(self, namespace: str, name: str) -> dict[str, Any]:
        return self._json(
            "read job", lambda **kw: self.batch_api.read_namespaced_job(name=name, namespace=namespace, **kw)
        )

    def list_jobs(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        answer = self._json(
            "list jobs",
            lambda **kw: self.batch_api.list_namespaced_job(namespace=namespace, label_selector=label_selector, **kw),
        )
        return list(answer.get("items") or [])

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        answer = self._json(
            "list pods",
            lambda **kw: self.core_api.list_namespaced_pod(namespace=namespace, label_selector=label_selector, **kw),
        )
        return list(answer.get("items") or [])

    def list_pod_metrics(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """``metrics.k8s.io/v1beta1`` PodMetrics (current usage, from metrics-server); raises on clusters
        without it (404)."""
        if self.custom_api is None:
            raise ValueError("KubernetesClient was built without a custom-objects API")
        answer = self._json(
            "list pod metrics",
            lambda **kw: self.custom_api.list_namespaced_custom_object(
                group="metrics.k8s.io",
                version="v1beta1",
                namespace=namespace,
                plural="pods",
                label_selector=label_selector,
                **kw,
            ),
        )
        return list(answer.get("items") or [])

    def delete_job(self, namespace: str, name: str, *, propagation_policy: str = "Foreground") -> None:
        """Delete the Job and (``Foreground``) its pods before the Job itself disappears."""
        self._json(
            "delete job",
            lambda **kw: self.batch_api.delete_namespaced_job(
                name=name, namespace=namespace, propagation_policy=propagation_policy, **kw
            ),
        )

    def pod_log(self, namespace: str, pod: str, *, container: str, tail_lines: int) -> str:
        response = self._call(
            "read pod log",
            lambda **kw: self.core_api.read_namespaced_pod_log(
                name=pod, namespace=namespace, container=container, tail_lines=tail_lines, **kw
            ),
        )
        return response.data.decode("utf-8", errors="replace")

    def server_version(self) -> str:
        """The API server's version (``/version``), e.g. ``v1.33.2``."""
        if self.version_api is None:
            raise ValueError("KubernetesClient was built without a version API")
        answer = self._json("read version", lambda **kw: self.version_api.get_code(**kw))
        return str(answer.get("gitVersion") or "unknown")

    def read_namespace(self, name: str) -> dict[str, Any]:
        return self._json("read namespace", lambda **kw: self.core_api.read_namespace(name=name, **kw))

    def may(self, *, namespace: str, verb: str, group: str, resource: str) -> tuple[bool, str]:
        """SelfSubjectAccessReview: may this identity ``verb`` ``resource`` in ``namespace``? (allowed, reason)"""
        if self.authorization_api is None:
            raise ValueError("KubernetesClient was built without an authorization API")
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {"namespace": namespace, "verb": verb, "group": group, "resource": resource}
            },
        }
        answer = self._json(
            "access review",
            lambda **kw: self.authorization_api.create_self_subject_access_review(body=body, **kw),
        )
        status = answer.get("status") or {}
        return bool(status.get("allowed")), str(status.get("reason") or status.get("evaluationError") or "")

    # --- retries ------------------------------------------------------------------------------

    def _json(self, operation: str, call: Callable[..., Any]) -> dict[str, Any]:
        response = self._call(operation, call)
        data = response.data
        return json.loads(data) if data else {}

    def _call(self, operation: str, call: Callable[..., Any]) -> Any:
        began = self.timer()
        backoff = self.initial_backoff_seconds
        attempt = 0
        while True:
            attempt += 1
            try:
                return call(_preload_content=False, _request_timeout=self.request_timeout_seconds)
            except ApiException as error:
                reason, message = _status_message(error)
                status = error.status or None
                if status not in TRANSIENT_STATUS_CODES:
                    raise KubernetesApiError(
                        f"Kubernetes API: {operation} failed with HTTP {error.status} {reason}: {message}",
                        operation=operation,
                        status=status,
                        api_reason=reason,
                        body=str(error.body or ""),
                    ) from None
                wait = _retry_after(error) or backoff
                last = f"HTTP {error.status} {reason}: {message}"
            except _TRANSPORT_ERRORS as error:
                wait, last, status = backoff, f"{type(error).__name__}: {error}", None
            elapsed = self.timer() - began
            if attempt >= self.max_attempts or elapsed + wait > self.deadline_seconds:
                raise KubernetesApiError(
                    f"Kubernetes API: {operation} still failing after {attempt} attempt(s) in {elapsed:.1f} s: "
                    f"{last}; is the API server reachable (CCAT_WORKFLOW_MANAGER_K8S_AUTH, kubeconfig)?",
                    operation=operation,
                    status=status,
                    api_reason="",
                    body=last,
                )
            self.sleeper(wait)
            backoff = min(backoff * 2, self.max_backoff_seconds)


def _retry_after(error: ApiException) -> float | None:
    headers = error.headers or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
