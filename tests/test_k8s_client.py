"""KubernetesClient retries only known-transient failures, with back-off, within its deadline (fake API and
fake clock: milliseconds). The same retries over real HTTP are in test_k8s_standin_backend.py."""

from __future__ import annotations

import json

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from ccat_dagster.execution.hpc.kubernetes.client import TRANSIENT_STATUS_CODES, KubernetesApiError, KubernetesClient


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def time(self) -> float:
        return self.now


class Raw:
    def __init__(self, body: dict) -> None:
        self.data = json.dumps(body).encode()


def api_error(status: int, reason: str = "", headers: dict | None = None) -> ApiException:
    error = ApiException(status=status, reason=reason)
    error.body = json.dumps({"kind": "Status", "reason": reason, "message": f"{reason} from the fake"})
    error.headers = headers or {}
    return error


class FakeBatchApi:
    """``list_namespaced_job`` answers from a script: an exception to raise or a body to return."""

    def __init__(self, *script) -> None:
        self.script = list(script)
        self.calls: list[dict] = []

    def list_namespaced_job(self, **kwargs):
        self.calls.append(kwargs)
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return Raw(step)


def client(batch, clock: FakeClock, **options) -> KubernetesClient:
    return KubernetesClient(batch_api=batch, core_api=None, sleeper=clock.sleep, timer=clock.time, **options)


@pytest.mark.parametrize("status", sorted(TRANSIENT_STATUS_CODES))
def test_transient_statuses_are_retried_with_exponential_back_off(status):
    clock = FakeClock()
    batch = FakeBatchApi(api_error(status, "Busy"), api_error(status, "Busy"), {"items": [{"metadata": {"name": "a"}}]})
    assert client(batch, clock).list_jobs("ccat", "x=y") == [{"metadata": {"name": "a"}}]
    assert clock.sleeps == [0.5, 1.0] and len(batch.calls) == 3
    assert batch.calls[0]["_preload_content"] is False and batch.calls[0]["label_selector"] == "x=y"


def test_connection_failures_are_retried():
    clock = FakeClock()
    refused = urllib3.exceptions.MaxRetryError(None, "/apis", urllib3.exceptions.NewConnectionError(None, "refused"))
    batch = FakeBatchApi(refused, {"items": []})
    assert client(batch, clock).list_jobs("ccat", "") == [] and clock.sleeps == [0.5]


def test_retry_after_is_honoured():
    clock = FakeClock()
    batch = FakeBatchApi(api_error(429, "TooManyRequests", {"Retry-After": "3"}), {"items": []})
    client(batch, clock).list_jobs("ccat", "")
    assert clock.sleeps == [3.0]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_other_statuses_are_raised_at_once_with_the_api_message(status):
    clock = FakeClock()
    batch = FakeBatchApi(api_error(status, "Refused"))
    with pytest.raises(KubernetesApiError, match=f"list jobs failed with HTTP {status} Refused: Refused from the fake"):
        client(batch, clock).list_jobs("ccat", "")
    assert clock.sleeps == [] and len(batch.calls) == 1


def test_gives_up_after_max_attempts_naming_the_last_error():
    clock = FakeClock()
    batch = FakeBatchApi(*[api_error(503, "ServiceUnavailable")] * 3)
    with pytest.raises(KubernetesApiError, match="still failing after 3 attempt") as raised:
        client(batch, clock, max_attempts=3).list_jobs("ccat", "")
    assert raised.value.status == 503 and clock.sleeps == [0.5, 1.0]


def test_gives_up_when_the_next_wait_would_pass_the_deadline():
    clock = FakeClock()
    batch = FakeBatchApi(*[api_error(500, "InternalError")] * 10)
    with pytest.raises(KubernetesApiError, match="still failing"):
        client(batch, clock, max_attempts=10, deadline_seconds=4.0).list_jobs("ccat", "")
    assert clock.sleeps == [0.5, 1.0, 2.0] and clock.now <= 4.0
