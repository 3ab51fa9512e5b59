"""A local HTTP stand-in for the parts of the Kubernetes API the backend uses (no cluster can run here).

It serves, on 127.0.0.1, ``/version``, ``core/v1`` namespaces / pods / pod logs, ``batch/v1`` Jobs and
``authorization.k8s.io/v1`` SelfSubjectAccessReviews, with bodies in the API's own JSON schema, keeping Jobs and
pods in memory. It is a stand-in, not a cluster: no scheduler, no kubelet, no admission. Two ways to "run" a pod:

* ``execute=True``: the pod's container command is run as a local process (the volumes are the same paths
  here), its stdout/stderr become the pod log and its exit status the container's ``terminated`` state;
  ``activeDeadlineSeconds`` is enforced (SIGTERM, then SIGKILL after the grace period → DeadlineExceeded).
* ``execute=False``: the pod stays Pending until the test drives it (``run_pod``, ``finish_pod``, ``evict``,
  ``image_pull_failure``).

A pod whose image the test lists in ``images`` (reference → a local sandbox or software directory) is run as a
kubelet would run that image: in bubblewrap (the project's own bwrap command builder), with the pod's
``volumeMounts`` (hostPath + subPath at mountPath, read-only as marked), its env and working directory, and
nothing else of the host; an emptyDir becomes a tmpfs. The image itself is not pulled: the test names its root.

It records every request (``requests``) so tests can count list calls, and can answer the next requests with
an injected error (``fail_next``) to exercise the client's retries over real HTTP.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
SERVER_VERSION = "v1.33.0-standin"
# Kubernetes versions manifests are validated against (kubernetes-validate ships their OpenAPI schemas): the
# oldest and the newest minor version this backend supports.
SCHEMA_VERSIONS = ("1.30.0", "1.37.0")


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


_SELECTOR_TERM = re.compile(r"\s*([^,=\s]+)\s*(?:in\s*\(([^)]*)\)|=([^,]*))\s*(?:,|$)")


def _matches(labels: dict[str, str], selector: str) -> bool:
    """Equality (``k=v``) and set (``k in (a,b)``) terms, ANDed, as the API server reads them."""
    for key, values, value in _SELECTOR_TERM.findall(selector):
        allowed = [v.strip() for v in values.split(",")] if values else [value]
        if labels.get(key) not in allowed:
            return False
    return True


@dataclass
class _Process:
    popen: subprocess.Popen
    output: list[str] = field(default_factory=list)
    deadline_hit: bool = False


class KubernetesStandIn:
    """The stand-in server; ``url`` is its base URL, ``kubeconfig(path)`` writes a kubeconfig pointing at it."""

    def __init__(self, *, namespaces: tuple[str, ...] = ("ccat",), execute: bool = True) -> None:
        self.namespaces = set(namespaces)
        self.execute = execute
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.logs: dict[tuple[str, str], str] = {}
        self.denied: set[tuple[str, str, str]] = set()  # (verb, group, resource) an access review refuses
        self.forbid_namespace_read = False
        # Job name → memory in use (a quantity such as "1536Mi"); None: no metrics-server (the API answers 404).
        self.memory_usage: dict[str, str] | None = None
        # Image reference → local root the "kubelet" runs it from (see the module docstring).
        self.images: dict[str, Path] = {}
        self.requests: list[tuple[str, str]] = []
        self.delete_bodies: list[dict[str, Any]] = []
        self._failures: list[tuple[int, dict[str, str]]] = []
        self._processes: dict[tuple[str, str], _Process] = {}
        self._lock = threading.RLock()
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k8s-standin-kubelet")
        handler = type("Handler", (_Handler,), {"standin": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="k8s-standin", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> KubernetesStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            processes = list(self._processes.values())
        for process in processes:
            _kill(process.popen, signal.SIGKILL)
        self._server.shutdown()
        self._server.server_close()
        self._launcher.shutdown(wait=False)

    def kubeconfig(self, path: Path, *, namespace: str = "ccat") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": "standin-token"}}],
            "contexts": [
                {"name": "standin", "context": {"cluster": "standin", "user": "standin", "namespace": namespace}}
            ],
            "current-context": "standin",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def fail_next(self, count: int, status: int, headers: dict[str, str] | None = None) -> None:
        """Answer the next ``count`` requests with HTTP ``status`` (a Status body) instead of serving them."""
        with self._lock:
            self._failures.extend([(status, headers or {})] * count)

    # --- what tests look at and drive -----------------------------------------------------------

    def job(self, name: str, namespace: str = "ccat") -> dict[str, Any] | None:
        with self._lock:
            return self.jobs.get((namespace, name))

    def pod_of(self, job_name: str, namespace: str = "ccat") -> dict[str, Any]:
        with self._lock:
            (pod,) = [
                p
                for (ns, _), p in self.pods.items()
                if ns == namespace and p["metadata"]["labels"].get(JOB_NAME_LABEL) == job_name
            ]
            return pod

    def run_pod(self, job_name: str) -> None:
        with self._lock:
            pod = self.pod_of(job_name)
            pod["status"].update({"phase": "Running", "startTime": now_rfc3339()})
            pod["status"]["containerStatuses"] = [_container_status(pod, running={"startedAt": now_rfc3339()})]
            self.jobs[("ccat", job_name)]["status"].update({"active": 1, "startTime": now_rfc3339()})

    def finish_pod(self, job_name: str, exit_code: int, *, reason: str | None = None, log: str = "") -> None:
        with self._lock:
            pod = self.pod_of(job_name)
            started = (pod["status"].get("containerStatuses") or [{}])[0].get("state", {}).get("running", {})
            terminated = {
                "exitCode": exit_code,
                "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                "startedAt": started.get("startedAt", now_rfc3339()),
                "finishedAt": now_rfc3339(),
            }
            pod["status"]["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            pod["status"]["containerStatuses"] = [_container_status(pod, terminated=terminated)]
            self.logs[("ccat", pod["metadata"]["name"])] = log
            self._finish_job(("ccat", job_name), succeeded=exit_code == 0)

    def evict(self, job_name: str, message: str) -> None:
        with self._lock:
            pod = self.pod_of(job_name)
            pod["status"].update({"phase": "Failed", "reason": "Evicted", "message": message})
            self._finish_job(("ccat", job_name), succeeded=False)

    def image_pull_failure(self, job_name: str, reason: str, message: str) -> None:
        with self._lock:
            pod = self.pod_of(job_name)
            pod["status"]["containerStatuses"] = [
                _container_status(pod, waiting={"reason": reason, "message": message})
            ]

    def delete_outside(self, job_name: str) -> None:
        """``kubectl delete job`` by someone else: the Job and its pods vanish."""
        self._remove_job(("ccat", job_name))

    # --- the API --------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            self.requests.append((method, path + (f"?{query['labelSelector']}" if "labelSelector" in query else "")))
            if self._failures:
                status, headers = self._failures.pop(0)
                return status, _status(status, "ServiceUnavailable", "injected by the stand-in"), headers
            return self._route(method, path.rstrip("/").split("/")[1:], query, body)

    def _route(self, method: str, parts: list[str], query: dict[str, str], body: Any) -> tuple[int, Any, dict]:
        if parts == ["version"]:
            return 200, {"major": "1", "minor": "33", "gitVersion": SERVER_VERSION, "platform": "linux/amd64"}, {}
        if parts == ["apis", "authorization.k8s.io", "v1", "selfsubjectaccessreviews"] and method == "POST":
            attributes = body["spec"]["resourceAttributes"]
            allowed = (attributes["verb"], attributes.get("group", ""), attributes["resource"]) not in self.denied
            return 201, {**body, "status": {"allowed": allowed, **({} if allowed else {"reason": "no RBAC rule"})}}, {}
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 4 and method == "GET":
            if self.forbid_namespace_read:
                return 403, _status(403, "Forbidden", f'namespaces "{parts[3]}" is forbidden'), {}
            if parts[3] not in self.namespaces:
                return 404, _status(404, "NotFound", f'namespaces "{parts[3]}" not found'), {}
            return (
                200,
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": parts[3]},
                    "status": {"phase": "Active"},
                },
                {},
            )
        if parts[:3] == ["apis", "metrics.k8s.io", "v1beta1"] and parts[-1] == "pods" and method == "GET":
            return self._pod_metrics(parts[4], query)
        if parts[:3] == ["apis", "batch", "v1"] and len(parts) >= 6 and parts[5] == "jobs":
            return self._jobs(method, parts[4], parts[6] if len(parts) > 6 else None, query, body)
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) >= 5 and parts[4] == "pods":
            namespace = parts[3]
            if len(parts) == 5 and method == "GET":
                items = [
                    p
                    for (ns, _), p in sorted(self.pods.items())
                    if ns == namespace and _matches(p["metadata"]["labels"], query.get("labelSelector", ""))
                ]
                return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}, {}
            if len(parts) == 7 and parts[6] == "log" and method == "GET":
                return self._log(namespace, parts[5], query)
        return 404, _status(404, "NotFound", f"the stand-in does not serve {method} /{'/'.join(parts)}"), {}

    def _jobs(self, method: str, namespace: str, name: str | None, query: dict, body: Any) -> tuple[int, Any, dict]:
        if namespace not in self.namespaces:
            return 404, _status(404, "NotFound", f'namespaces "{namespace}" not found'), {}
        key = (namespace, name or "")
        if method == "POST" and name is None:
            return self._create_job(namespace, body)
        if method == "GET" and name is None:
            items = [
                j
                for (ns, _), j in sorted(self.jobs.items())
                if ns == namespace and _matches(j["metadata"]["labels"], query.get("labelSelector", ""))
            ]
            return 200, {"apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": items}, {}
        if key not in self.jobs:
            return 404, _status(404, "NotFound", f'jobs.batch "{name}" not found'), {}
        if method == "GET":
            return 200, self.jobs[key], {}
        if method == "DELETE":
            policy = query.get("propagationPolicy") or (body or {}).get("propagationPolicy") or "Background"
            self.delete_bodies.append({"name": name, "propagationPolicy": policy})
            job = self.jobs[key]
            if policy == "Foreground":
                # The Job stays, marked for deletion, until its pods are gone (a moment later, off this thread).
                job["metadata"]["deletionTimestamp"] = now_rfc3339()
                job["metadata"]["finalizers"] = ["foregroundDeletion"]
                threading.Thread(target=self._remove_job, args=(key,), daemon=True).start()
            else:
                self._remove_job(key)
            return 200, job, {}
        return 405, _status(405, "MethodNotAllowed", f"{method} on a Job"), {}

    def _create_job(self, namespace: str, job: dict[str, Any]) -> tuple[int, Any, dict]:
        name = job["metadata"]["name"]
        if (namespace, name) in self.jobs:
            return 409, _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists'), {}
        uid = str(uuid.uuid4())
        job = json.loads(json.dumps(job))
        job["metadata"].update(
            {"uid": uid, "creationTimestamp": now_rfc3339(), "resourceVersion": "1", "generation": 1}
        )
        job["status"] = {}
        self.jobs[(namespace, name)] = job
        template = job["spec"]["template"]
        pod_name = f"{name[:57]}-{uuid.uuid4().hex[:5]}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": now_rfc3339(),
                "labels": {
                    **template["metadata"]["labels"],
                    JOB_NAME_LABEL: name,
                    "job-name": name,
                    "batch.kubernetes.io/controller-uid": uid,
                },
                "annotations": dict(template["metadata"].get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": name,
                        "uid": uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": {**template["spec"], "nodeName": "standin-node"},
            "status": {"phase": "Pending", "qosClass": "Guaranteed"},
        }
        self.pods[(namespace, pod_name)] = pod
        if self.execute:
            self._start(namespace, name, pod)
        return 201, job, {}

    def _pod_metrics(self, namespace: str, query: dict) -> tuple[int, Any, dict]:
        if self.memory_usage is None:
            return 404, _status(404, "NotFound", "the server could not find the requested resource"), {}
        items = []
        for (ns, _), pod in sorted(self.pods.items()):
            job_name = pod["metadata"]["labels"].get(JOB_NAME_LABEL)
            if ns != namespace or job_name not in self.memory_usage:
                continue
            if not _matches(pod["metadata"]["labels"], query.get("labelSelector", "")):
                continue
            items.append(
                {
                    "metadata": {
                        "name": pod["metadata"]["name"],
                        "namespace": ns,
                        "labels": pod["metadata"]["labels"],
                        "creationTimestamp": now_rfc3339(),
                    },
                    "timestamp": now_rfc3339(),
                    "window": "15.01s",
                    "containers": [{"name": "step", "usage": {"cpu": "250m", "memory": self.memory_usage[job_name]}}],
                }
            )
        return (
            200,
            {"kind": "PodMetricsList", "apiVersion": "metrics.k8s.io/v1beta1", "metadata": {}, "items": items},
            {},
        )

    def _log(self, namespace: str, pod_name: str, query: dict) -> tuple[int, Any, dict]:
        pod = self.pods.get((namespace, pod_name))
        if pod is None:
            return 404, _status(404, "NotFound", f'pods "{pod_name}" not found'), {}
        process = self._processes.get((namespace, pod_name))
        text = "".join(process.output) if process else self.logs.get((namespace, pod_name))
        if text is None:
            return 400, _status(400, "BadRequest", f'container "step" in pod "{pod_name}" is waiting to start'), {}
        tail = int(query.get("tailLines", "0") or 0)
        lines = text.splitlines(keepends=True)
        return 200, "".join(lines[-tail:] if tail else lines), {"Content-Type": "text/plain"}

    # --- executing pods -------------------------------------------------------------------------

    def _start(self, namespace: str, job_name: str, pod: dict[str, Any]) -> None:
        container = pod["spec"]["containers"][0]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        env.update({item["name"]: item["value"] for item in container.get("env") or []})
        command, cwd = container["command"], container.get("workingDir") or "/"
        root = self.images.get(container["image"])
        if root is not None:
            command, cwd = _kubelet_command(pod["spec"], container, root), "/"
        # Started from one long-lived thread: a process asking for PR_SET_PDEATHSIG (bwrap --die-with-parent)
        # dies with the thread that started it, and request threads end with their connection.
        popen = self._launcher.submit(
            subprocess.Popen,
            command,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            text=True,
        ).result()
        process = _Process(popen)
        self._processes[(namespace, pod["metadata"]["name"])] = process
        started = now_rfc3339()
        pod["status"].update({"phase": "Running", "startTime": started, "podIP": "10.0.0.1"})
        pod["status"]["containerStatuses"] = [_container_status(pod, running={"startedAt": started})]
        self.jobs[(namespace, job_name)]["status"].update({"active": 1, "startTime": started})
        job = self.jobs[(namespace, job_name)]
        deadline = float(job["spec"].get("activeDeadlineSeconds") or 0)
        grace = float(pod["spec"].get("terminationGracePeriodSeconds", 30))
        threading.Thread(
            target=self._watch, args=(namespace, job_name, pod, process, started, deadline, grace), daemon=True
        ).start()

    def _watch(self, namespace, job_name, pod, process: _Process, started, deadline, grace) -> None:  # noqa: ANN001
        reader = threading.Thread(
            target=lambda: process.output.extend(iter(process.popen.stdout.readline, "")), daemon=True
        )
        reader.start()
        try:
            code = process.popen.wait(timeout=deadline or None)
        except subprocess.TimeoutExpired:
            process.deadline_hit = True
            _kill(process.popen, signal.SIGTERM)
            try:
                code = process.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _kill(process.popen, signal.SIGKILL)
                code = process.popen.wait()
        reader.join(5)
        exit_code = code if code >= 0 else 128 - code
        with self._lock:
            key = (namespace, job_name)
            self.logs[(namespace, pod["metadata"]["name"])] = "".join(process.output)
            self._processes.pop((namespace, pod["metadata"]["name"]), None)
            if key not in self.jobs or self.jobs[key]["metadata"].get("deletionTimestamp"):
                return
            terminated = {
                "exitCode": exit_code,
                "reason": "Completed" if exit_code == 0 else "Error",
                "startedAt": started,
                "finishedAt": now_rfc3339(),
            }
            pod["status"]["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            pod["status"]["containerStatuses"] = [_container_status(pod, terminated=terminated)]
            if process.deadline_hit:
                self._finish_job(
                    key,
                    succeeded=False,
                    reason="DeadlineExceeded",
                    message="Job was active longer than specified deadline",
                )
            else:
                self._finish_job(key, succeeded=exit_code == 0)

    def _finish_job(self, key: tuple[str, str], *, succeeded: bool, reason: str = "", message: str = "") -> None:
        job = self.jobs[key]
        at = now_rfc3339()
        status = job["status"]
        status.pop("active", None)
        if succeeded:
            status.update({"succeeded": 1, "completionTime": at})
            conditions = [
                ("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods"),
                ("Complete", "CompletionsReached", "Reached expected number of succeeded pods"),
            ]
        else:
            status["failed"] = 1
            reason = reason or "BackoffLimitExceeded"
            message = message or "Job has reached the specified backoff limit"
            conditions = [("FailureTarget", reason, message), ("Failed", reason, message)]
        status["conditions"] = [
            {
                "type": kind,
                "status": "True",
                "reason": why,
                "message": text,
                "lastProbeTime": at,
                "lastTransitionTime": at,
            }
            for kind, why, text in conditions
        ]

    def _remove_job(self, key: tuple[str, str]) -> None:
        with self._lock:
            pods = [
                k
                for k, p in self.pods.items()
                if k[0] == key[0] and p["metadata"]["labels"].get(JOB_NAME_LABEL) == key[1]
            ]
            processes = [self._processes.get(k) for k in pods]
        for process in processes:
            if process is not None:
                _kill(process.popen, signal.SIGKILL)
                process.popen.wait(10)
        with self._lock:
            for pod_key in pods:
                self.pods.pop(pod_key, None)
                self._processes.pop(pod_key, None)
            self.jobs.pop(key, None)

    def running_processes(self) -> Iterator[int]:
        with self._lock:
            return iter([p.popen.pid for p in self._processes.values() if p.popen.poll() is None])


def _kubelet_command(pod_spec: dict[str, Any], container: dict[str, Any], root: Path) -> list[str]:
    """What running ``container`` of its own image rooted at ``root`` looks like here: a bwrap command line."""
    from ccat_dagster.execution.contract import Mount
    from ccat_dagster.execution.images import ImageKind, ResolvedImage
    from ccat_dagster.execution.runtimes import ContainerInvocation, build_bwrap_command

    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes") or []}
    mounts = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            if mount["mountPath"] != "/tmp":  # bwrap gives every sandbox a tmpfs /tmp already
                raise NotImplementedError(f"the stand-in mounts emptyDir only at /tmp, not {mount['mountPath']}")
            continue
        host = Path(volume["hostPath"]["path"]) / mount.get("subPath", "")
        mounts.append(Mount(host, mount["mountPath"], read_only=bool(mount.get("readOnly"))))
    kind = ImageKind.SANDBOX if (root / "usr").is_dir() else ImageKind.SOFTWARE_DIR
    invocation = ContainerInvocation(
        image=ResolvedImage(path=root, digest=None, kind=kind),
        mounts=mounts,
        env={item["name"]: item["value"] for item in container.get("env") or []},
        args=list(container["command"]),
        workdir=container.get("workingDir") or "/",
    )
    return build_bwrap_command(invocation)


def _container_status(pod: dict[str, Any], **state: dict[str, Any]) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    running = "running" in state
    return {
        "name": container["name"],
        "image": container["image"],
        "imageID": "",
        "ready": running,
        "restartCount": 0,
        "started": running,
        "state": state,
    }


def _kill(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Handler(BaseHTTPRequestHandler):
    standin: KubernetesStandIn
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm the body waits for the client's delayed
    # ACK (40 ms a response on Linux), which real API servers do not cost.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def _serve(self, method: str) -> None:
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        status, answer, headers = self.standin.handle(method, url.path, query, body)
        data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")
