"""The registry digest of an OCI tag: against a REAL registry (the CNCF distribution registry, pushed to over
its own API) for the lookup and a moved tag refused at the next submit; the authentication challenge, the
credentials file and the retries through an in-process transport (a stand-in: no token service runs here).
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from requests.adapters import BaseAdapter
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ccat_dagster.execution.images import (
    BuildCheck,
    ImageChangedError,
    ImageChangePolicy,
    ImageKind,
    ImageRebuiltError,
    oci_manifest_digest,
    parse_oci_reference,
    recorded_builds,
    resolve_image,
)
from ccat_dagster.execution.registry import (
    MANIFEST_MEDIA_TYPES,
    RegistryClient,
    RegistryCredentials,
    RegistryNotFoundError,
    RegistryUnauthorizedError,
    RegistryUnreachableError,
    load_docker_credentials,
    registry_client_from_environment,
)
from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import make_engine
from ccat_dagster.settings import SettingsError, registry_settings

from .oci_registry import TEST_PASSWORD, TEST_USER, RealRegistry, _free_port, start_registry

DIGEST_A = "sha256:" + "a" * 64


# ---------------------------------------------------------------------------------------------- real registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[RealRegistry]:
    running = start_registry(tmp_path_factory.mktemp("registry"))
    yield running
    running.stop()


def _client(registry: RealRegistry, **options) -> RegistryClient:
    return RegistryClient(plain_http=frozenset({registry.host}), cache_seconds=0, **options)


def test_real_registry_gives_the_digest_of_a_tag(registry: RealRegistry) -> None:
    pushed = registry.push_image("ccat/chai", "1.0.0", payload=b"layer one")
    reference = parse_oci_reference(f"docker://{registry.host}/ccat/chai:1.0.0")
    assert _client(registry).manifest_digest(reference) == pushed
    pinned = parse_oci_reference(f"docker://{registry.host}/ccat/chai@{DIGEST_A}")
    assert _client(registry).manifest_digest(pinned) == DIGEST_A, "a pin is the digest; nothing is asked"


def test_real_registry_unknown_tag_or_repository_is_not_found(registry: RealRegistry) -> None:
    registry.push_image("ccat/known", "1", payload=b"x")
    for ref in (f"docker://{registry.host}/ccat/known:2", f"docker://{registry.host}/ccat/never:1"):
        with pytest.raises(RegistryNotFoundError, match=r"has no image .* \(HTTP 404\); check the repository and tag"):
            _client(registry).manifest_digest(parse_oci_reference(ref))


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    """The session's PostgreSQL ops-db (each test registers its own software name)."""
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def version(engine, registry: RealRegistry) -> tuple[str, str]:
    name = f"sw-{uuid.uuid4().hex[:6]}"
    image_ref = f"docker://{registry.host}/ccat/{name}:1.0.0"
    with Session(engine) as session, session.begin():
        software = m.ReductionSoftware(name=name)
        session.add(software)
        session.flush()
        session.add(m.ReductionSoftwareVersion(reduction_software_id=software.id, version="1.0.0", image_ref=image_ref))
    return name, image_ref


def _never_pull(ref: str, destination: Path) -> None:
    raise AssertionError(f"{ref} must not be pulled: the check comes first")


def test_a_moved_tag_is_refused_at_the_next_submit(engine, registry: RealRegistry, version, tmp_path: Path) -> None:
    name, image_ref = version
    first = registry.push_image(f"ccat/{name}", "1.0.0", payload=b"build one")
    check = BuildCheck(engine, name, "1.0.0", policy=ImageChangePolicy.REFUSE)
    image = resolve_image(
        image_ref=image_ref,
        image_digest=None,
        sif_cache_dir=tmp_path,
        runtime_name="oci",
        check=check,
        registry=_client(registry),
    )
    assert (image.kind, image.digest, image.path) == (ImageKind.OCI, first, None)
    assert image.reference == f"{registry.host}/ccat/{name}@{first}", "the Job runs the image by digest"
    assert [
        (b.build, b.image_digest, b.image_path) for b in recorded_builds(engine, software=name, version="1.0.0")
    ] == [(1, first, image_ref)]

    moved = registry.push_image(f"ccat/{name}", "1.0.0", payload=b"build two, same tag")
    assert moved != first
    for runtime in ("oci", "apptainer"):
        with pytest.raises(ImageChangedError) as caught:
            resolve_image(
                image_ref=image_ref,
                image_digest=None,
                sif_cache_dir=tmp_path,
                runtime_name=runtime,
                pull=_never_pull,
                check=check,
                registry=_client(registry),
            )
        for fragment in (f"{name} 1.0.0", image_ref, first, moved, "build 1"):
            assert fragment in str(caught.value)

    with pytest.raises(ImageRebuiltError, match="registered as build 2"):
        resolve_image(
            image_ref=image_ref,
            image_digest=None,
            sif_cache_dir=tmp_path,
            runtime_name="oci",
            check=BuildCheck(engine, name, "1.0.0", policy=ImageChangePolicy.NEW_BUILD),
            registry=_client(registry),
        )
    builds = recorded_builds(engine, software=name, version="1.0.0")
    assert [(b.build, b.image_digest) for b in builds] == [(1, first), (2, moved)]
    again = resolve_image(
        image_ref=image_ref, image_digest=moved, sif_cache_dir=tmp_path, runtime_name="oci", check=check,
        registry=_client(registry),
    )  # fmt: skip
    assert again.digest == moved, "the new build passes; the tag is still asked (a declared digest is compared)"


def test_real_registry_with_basic_auth_takes_the_credentials_from_a_docker_config(
    tmp_path_factory, tmp_path: Path, monkeypatch, caplog
) -> None:
    """The registry's own challenge (htpasswd: ``WWW-Authenticate: Basic``) answered from a config.json named by
    REGISTRY_AUTH_FILE, as the runner's default client reads it; wrong or no credentials are refused clearly."""
    secured = start_registry(tmp_path_factory.mktemp("registry-auth"), basic_auth=True)
    try:
        pushed = secured.push_image("ccat/private", "2.0", payload=b"private layer")
        reference = parse_oci_reference(f"docker://{secured.host}/ccat/private:2.0")
        plain = {"CCAT_WORKFLOW_MANAGER_REGISTRY_PLAIN_HTTP": secured.host}
        config = tmp_path / "config.json"
        pair = base64.b64encode(f"{TEST_USER}:{TEST_PASSWORD}".encode()).decode()
        config.write_text(json.dumps({"auths": {secured.host: {"auth": pair}}}))
        with caplog.at_level(logging.DEBUG):
            client = registry_client_from_environment(
                {**plain, "CCAT_WORKFLOW_MANAGER_REGISTRY_AUTH_FILE": str(config)}
            )
            assert client.manifest_digest(reference) == pushed
        assert TEST_PASSWORD not in caplog.text
        with pytest.raises(RegistryUnauthorizedError, match="no credentials for it were found"):
            registry_client_from_environment(
                {**plain, "CCAT_WORKFLOW_MANAGER_REGISTRY_AUTH_FILE": str(tmp_path / "none")}
            ).manifest_digest(reference)
        wrong = {secured.host: RegistryCredentials(TEST_USER, "not-the-password")}
        with pytest.raises(RegistryUnauthorizedError, match="credentials found for it were refused"):
            RegistryClient(credentials=wrong, plain_http=frozenset({secured.host})).manifest_digest(reference)
    finally:
        secured.stop()


def test_unreachable_registry_is_retried_then_a_clear_error() -> None:
    waits: list[float] = []
    port = _free_port()  # nothing listens there
    client = RegistryClient(plain_http=frozenset({f"127.0.0.1:{port}"}), sleep=waits.append, timeout_seconds=2)
    with pytest.raises(RegistryUnreachableError, match=rf"registry 127.0.0.1:{port} did not answer .* after 4 tries"):
        client.manifest_digest(parse_oci_reference(f"docker://127.0.0.1:{port}/ccat/chai:1"))
    assert len(waits) == 3, "four tries, three back-off waits"


# ---------------------------------------------------------------------------------------------- stand-in transport


class _Transport(BaseAdapter):
    """Answers requests with ``handler(request) -> (status, headers, body)``; records what was sent."""

    def __init__(self, handler: Callable[[requests.PreparedRequest], tuple[int, dict[str, str], bytes]]) -> None:
        super().__init__()
        self.handler = handler
        self.sent: list[requests.PreparedRequest] = []

    def send(self, request, **kwargs):
        self.sent.append(request)
        status, headers, body = self.handler(request)
        response = requests.Response()
        response.status_code = status
        response.headers.update(headers)
        response._content = body
        response.url = request.url
        response.request = request
        return response

    def close(self) -> None:
        pass


def _session(transport: _Transport) -> requests.Session:
    session = requests.Session()
    session.mount("https://", transport)
    session.mount("http://", transport)
    return session


MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}'
CHALLENGE = (
    'Bearer realm="https://auth.example.org/token",service="registry.example.org",scope="repository:ccat/chai:pull"'
)


def _token_registry(*, user: str, password: str, digest_header: bool = True):
    expected_basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def handler(request: requests.PreparedRequest):
        if request.url.startswith("https://auth.example.org/token"):
            if request.headers.get("Authorization") != expected_basic:
                return 401, {}, b"{}"
            assert (
                "scope=repository%3Accat%2Fchai%3Apull" in request.url and "service=registry.example.org" in request.url
            )
            return 200, {}, b'{"token": "t0k3n"}'
        assert request.url == "https://registry.example.org/v2/ccat/chai/manifests/1.0.0"
        assert request.headers["Accept"] == ", ".join(MANIFEST_MEDIA_TYPES)
        if request.headers.get("Authorization") != "Bearer t0k3n":
            return 401, {"WWW-Authenticate": CHALLENGE}, b""
        headers = {"Docker-Content-Digest": oci_manifest_digest(MANIFEST)} if digest_header else {}
        return 200, headers, MANIFEST if request.method == "GET" else b""

    return handler


REF = parse_oci_reference("docker://registry.example.org/ccat/chai:1.0.0")


def test_bearer_challenge_is_answered_with_a_token_and_credentials_are_never_logged(caplog) -> None:
    transport = _Transport(_token_registry(user="robot", password="s3cret-pw"))
    credentials = {"registry.example.org": RegistryCredentials("robot", "s3cret-pw")}
    client = RegistryClient(credentials=credentials, session=_session(transport))
    with caplog.at_level(logging.DEBUG):
        assert client.manifest_digest(REF) == oci_manifest_digest(MANIFEST)
    assert [r.method for r in transport.sent] == ["HEAD", "GET", "HEAD"], "challenge, token, answer"
    assert "s3cret-pw" not in caplog.text and "s3cret-pw" not in repr(credentials)
    assert client.manifest_digest(REF) == oci_manifest_digest(MANIFEST)
    assert len(transport.sent) == 3, "the answer is reused for cache_seconds"


def test_a_registry_without_the_digest_header_is_asked_for_the_body() -> None:
    transport = _Transport(_token_registry(user="u", password="p", digest_header=False))
    client = RegistryClient(
        credentials={"registry.example.org": RegistryCredentials("u", "p")}, session=_session(transport)
    )
    assert client.manifest_digest(REF) == oci_manifest_digest(MANIFEST)
    assert transport.sent[-1].method == "GET"


def test_unauthorised_says_whether_credentials_were_found() -> None:
    handler = _token_registry(user="robot", password="right")
    client = RegistryClient(session=_session(_Transport(handler)))
    with pytest.raises(
        RegistryUnauthorizedError, match="no credentials for it were found: log in .*REGISTRY_AUTH_FILE"
    ):
        client.manifest_digest(REF)
    wrong = {"registry.example.org": RegistryCredentials("robot", "wrong-pw")}
    client = RegistryClient(credentials=wrong, session=_session(_Transport(handler)))
    with pytest.raises(RegistryUnauthorizedError, match="credentials found for it were refused") as caught:
        client.manifest_digest(REF)
    assert "wrong-pw" not in str(caught.value)


def test_credentials_are_not_sent_to_a_token_service_without_tls() -> None:
    def handler(request):
        return 401, {"WWW-Authenticate": 'Bearer realm="http://evil.example.org/token",service="x"'}, b""

    transport = _Transport(handler)
    client = RegistryClient(
        credentials={"registry.example.org": RegistryCredentials("u", "pw")}, session=_session(transport)
    )
    with pytest.raises(RegistryUnauthorizedError, match="without TLS; credentials are not sent there"):
        client.manifest_digest(REF)
    assert [r.url for r in transport.sent] == ["https://registry.example.org/v2/ccat/chai/manifests/1.0.0"]


def test_transient_answers_are_retried() -> None:
    answers = iter([(503, {}, b""), (429, {}, b""), (200, {"Docker-Content-Digest": DIGEST_A}, b"")])
    waits: list[float] = []
    client = RegistryClient(session=_session(_Transport(lambda request: next(answers))), sleep=waits.append)
    assert client.manifest_digest(REF) == DIGEST_A
    assert len(waits) == 2


def test_docker_hub_names_go_to_its_api_host() -> None:
    transport = _Transport(lambda request: (200, {"Docker-Content-Digest": DIGEST_A}, b""))
    RegistryClient(session=_session(transport)).manifest_digest(parse_oci_reference("docker://debian:12"))
    assert transport.sent[0].url == "https://registry-1.docker.io/v2/library/debian/manifests/12"


def test_docker_config_credentials(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw1").decode()},
                    "ghcr.io": {"username": "gh", "password": "pw2"},
                    "quay.io": {"identitytoken": "refresh"},
                },
                "credsStore": "desktop",
            }
        )
    )
    found = load_docker_credentials(config)
    assert (found["docker.io"].username, found["docker.io"].password) == ("hub", "pw1")
    assert (found["ghcr.io"].username, found["ghcr.io"].password) == ("gh", "pw2")
    assert found["quay.io"].identity_token == "refresh"
    assert load_docker_credentials(tmp_path / "absent.json") == {}


def test_registry_settings() -> None:
    assert registry_settings({}) == (None, frozenset())
    auth, hosts = registry_settings(
        {"CCAT_WORKFLOW_MANAGER_REGISTRY_AUTH_FILE": "/etc/ccat/registries.json",
         "CCAT_WORKFLOW_MANAGER_REGISTRY_PLAIN_HTTP": "localhost:5000, Registry.local"}
    )  # fmt: skip
    assert (auth, hosts) == (Path("/etc/ccat/registries.json"), frozenset({"localhost:5000", "registry.local"}))
    with pytest.raises(SettingsError, match="REGISTRY_PLAIN_HTTP: 'http://x' is not a registry host"):
        registry_settings({"CCAT_WORKFLOW_MANAGER_REGISTRY_PLAIN_HTTP": "http://x"})
