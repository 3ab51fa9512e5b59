"""A real OCI registry for tests: the CNCF distribution registry (Debian's ``docker-registry``) on a free port.

``RealRegistry`` starts ``docker-registry serve`` with a temporary configuration and storage directory, and
pushes small images over the distribution API itself (blob uploads and a manifest PUT), so no Docker daemon
is needed. Tests that use it are skipped, saying why, when the binary is not installed (scripts/setup.sh
installs it); in CI (``CI`` or ``CCAT_REQUIRE_ALL_BACKENDS`` set) they fail instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

REGISTRY_BINARY = "docker-registry"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
# A test-only account for a registry started with basic authentication (htpasswd). The hash is bcrypt with the
# lowest cost (2^4), so the registry's check of every request stays fast.
TEST_USER, TEST_PASSWORD = "ccat-robot", "ccat-test-only-pw"
TEST_HTPASSWD = f"{TEST_USER}:$2b$04$5thI86JVD4p87G7glj.MnujnO6gpf.qA37/F3FLBlZNfT3khrRCsS\n"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RealRegistry:
    """A running registry; ``host`` is ``127.0.0.1:<port>`` (plain HTTP)."""

    process: subprocess.Popen
    host: str
    root: Path
    auth: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def push_blob(self, repository: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        started = requests.post(f"{self.url}/v2/{repository}/blobs/uploads/", auth=self.auth, timeout=10)
        assert started.status_code == 202, started.text
        location = started.headers["Location"]
        if location.startswith("/"):
            location = self.url + location
        separator = "&" if "?" in location else "?"
        done = requests.put(
            f"{location}{separator}digest={digest}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            auth=self.auth,
            timeout=10,
        )
        assert done.status_code == 201, done.text
        return digest

    def push_image(self, repository: str, tag: str, *, payload: bytes) -> str:
        """A one-layer image whose layer holds ``payload``, tagged ``tag``; returns the manifest digest."""
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "config": {"User": "1000"}, "rootfs": {"type": "layers"}}
        ).encode()
        config_digest = self.push_blob(repository, config)
        layer_digest = self.push_blob(repository, payload)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": len(payload)}],
            },
            separators=(",", ":"),
        ).encode()
        put = requests.put(
            f"{self.url}/v2/{repository}/manifests/{tag}",
            data=manifest,
            headers={"Content-Type": OCI_MANIFEST},
            auth=self.auth,
            timeout=10,
        )
        assert put.status_code == 201, put.text
        assert put.headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(manifest).hexdigest()
        return put.headers["Docker-Content-Digest"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_registry(root: Path, *, basic_auth: bool = False) -> RealRegistry:
    """Start a registry; with ``basic_auth`` it requires ``TEST_USER`` / ``TEST_PASSWORD`` (htpasswd)."""
    binary = shutil.which(REGISTRY_BINARY)
    if binary is None:
        message = f"{REGISTRY_BINARY} is not installed (apt-get install docker-registry; scripts/setup.sh does)"
        if os.environ.get("CI") or os.environ.get("CCAT_REQUIRE_ALL_BACKENDS"):
            pytest.fail(message)  # CI never skips the real registry
        pytest.skip(message)
    last_error = ""
    for _ in range(3):  # a free port can be taken between choosing and binding it
        port = _free_port()
        storage = root / f"storage-{port}"
        config = root / f"config-{port}.yml"
        auth = ""
        if basic_auth:
            htpasswd = root / "htpasswd"
            htpasswd.write_text(TEST_HTPASSWD)
            auth = f"auth:\n  htpasswd:\n    realm: ccat-test\n    path: {htpasswd}\n"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n  secret: test-only-upload-secret\n" + auth
        )
        log = (root / f"registry-{port}.log").open("w")
        process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
        registry = RealRegistry(
            process=process,
            host=f"127.0.0.1:{port}",
            root=root,
            auth=(TEST_USER, TEST_PASSWORD) if basic_auth else None,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if requests.get(f"{registry.url}/v2/", auth=registry.auth, timeout=1).status_code == 200:
                    return registry
            except requests.ConnectionError:
                time.sleep(0.05)
        registry.stop()
        last_error = (root / f"registry-{port}.log").read_text()[-500:]
    raise RuntimeError(f"docker-registry did not start: {last_error}")
