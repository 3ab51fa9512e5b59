"""The registry digest of an OCI tag, asked of the registry through the OCI distribution API.

``RegistryClient.manifest_digest`` sends ``HEAD /v2/<repository>/manifests/<tag>`` with the Accept headers of
the OCI and Docker manifests and indexes, and reads ``Docker-Content-Digest`` (a registry that leaves it out is
asked again with GET, and the digest is the sha256 of the body's exact bytes). A ``401`` answer's
``WWW-Authenticate`` challenge is followed: ``Bearer realm=…,service=…,scope=…`` gets a token from the realm
(with the registry's credentials, when there are any), ``Basic`` sends the credentials themselves. Credentials
come from a docker ``config.json`` (``auths.<registry>.auth`` or ``username``/``password``, or
``identitytoken``), never from the reference, and are never logged or put in an error message. Connection
failures, timeouts, 429 and 5xx answers are retried with back-off (tenacity); what remains is one clear error:
not found, unauthorised, or unreachable.

A hand-written client on ``requests`` rather than oras-py: oras-py's manifest call returns the parsed body and
checks it against its own manifest schema (an image index or a Docker manifest list is refused), it does not
expose the ``Docker-Content-Digest`` the registry gives, and it does not tell not-found from unauthorised in a
way a caller can act on. The part of the distribution API needed here is one request and its challenge.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import requests
import tenacity

from ccat_dagster.execution.images import ImageError, OciReference, oci_manifest_digest

__all__ = [
    "MANIFEST_MEDIA_TYPES",
    "RegistryClient",
    "RegistryCredentials",
    "RegistryError",
    "RegistryNotFoundError",
    "RegistryUnauthorizedError",
    "RegistryUnreachableError",
    "load_docker_credentials",
]

log = logging.getLogger(__name__)

# What a runnable image's reference may resolve to: an image manifest, or an index (multi-platform image).
MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
# Docker Hub's API is not at its name.
_API_HOSTS = {"docker.io": "registry-1.docker.io"}
_DOCKER_CONFIG_KEYS = {"docker.io": ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")}
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(ImageError):
    """The registry could not say which image a tag names; the message names the reference and the fix."""


class RegistryNotFoundError(RegistryError):
    """The registry has no such repository or tag."""


class RegistryUnauthorizedError(RegistryError):
    """The registry refused the request (401 / 403), with or without credentials."""


class RegistryUnreachableError(RegistryError):
    """No answer from the registry (or only errors) after the retries."""


class _Transient(Exception):
    """One failed try that may succeed when repeated (connection error, timeout, 429, 5xx)."""


@dataclass(frozen=True)
class RegistryCredentials:
    """A user name and password (or an identity token) for one registry; ``repr`` shows neither."""

    username: str = field(repr=False, default="")
    password: str = field(repr=False, default="")
    identity_token: str = field(repr=False, default="")


def load_docker_credentials(path: Path) -> dict[str, RegistryCredentials]:
    """Registry host → credentials from a docker ``config.json``; a missing file holds none.

    Credential helpers (``credsStore``, ``credHelpers``) are programs and are not run: log in with
    ``docker login`` / ``apptainer registry login`` into a file-backed config, or give the file's path.
    """
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise RegistryError(f"registry credentials file {path} cannot be read: {error}; fix or remove it") from None
    auths = document.get("auths") if isinstance(document, dict) else None
    found: dict[str, RegistryCredentials] = {}
    for key, entry in (auths or {}).items():
        if not isinstance(entry, dict):
            continue
        username, password = str(entry.get("username") or ""), str(entry.get("password") or "")
        if entry.get("auth"):
            try:
                username, _, password = base64.b64decode(str(entry["auth"])).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise RegistryError(
                    f"registry credentials file {path}: the 'auth' of {key!r} is not base64 of user:password; "
                    "log in again"
                ) from None
        credentials = RegistryCredentials(username, password, str(entry.get("identitytoken") or ""))
        host = re.sub(r"^https?://", "", key).split("/", 1)[0]
        found[host] = credentials
    for registry, aliases in _DOCKER_CONFIG_KEYS.items():
        for alias in aliases:
            host = re.sub(r"^https?://", "", alias).split("/", 1)[0]
            if registry not in found and host in found:
                found[registry] = found[host]
    return found


def default_docker_config() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json`` (where ``docker login`` writes)."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


@dataclass
class RegistryClient:
    """Asks registries for the digest a tag names now.

    ``plain_http``: registries (``host[:port]``) reached over HTTP instead of HTTPS, e.g. a local test registry.
    ``cache_seconds``: how long an answer is reused for the same tag in this process (one lookup per run, not
    one per attempt); 0 asks every time. ``sleep``/``clock`` are injected by tests.
    """

    credentials: Mapping[str, RegistryCredentials] = field(default_factory=dict)
    plain_http: frozenset[str] = frozenset()
    timeout_seconds: float = 10.0
    attempts: int = 4
    cache_seconds: float = 60.0
    session: requests.Session = field(default_factory=requests.Session)
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, str], tuple[float, str]] = {}
        self._tokens: dict[tuple[str, str], str] = {}

    def manifest_digest(self, reference: OciReference) -> str:
        """The ``sha256:…`` digest the registry gives ``reference``'s tag (or its pinned digest, unasked)."""
        if reference.digest is not None:
            return reference.digest
        tag = reference.tag or "latest"
        key = (reference.registry, reference.repository, tag)
        now = self.clock()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and now - cached[0] < self.cache_seconds:
            return cached[1]
        name = f"{reference.registry}/{reference.repository}:{tag}"
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Transient),
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential(multiplier=0.5, max=8),
            sleep=self.sleep,
            reraise=True,
        )
        try:
            digest = retrying(self._ask, reference, tag, name)
        except _Transient as error:
            raise RegistryUnreachableError(
                f"registry {reference.registry} did not answer for {name} after {self.attempts} tries ({error}); "
                "check the network and the registry's status, or pin the image by digest (…@sha256:<64 hex>)"
            ) from None
        with self._lock:
            self._cache[key] = (now, digest)
        return digest

    # --- one try ----------------------------------------------------------------------------------

    def _ask(self, reference: OciReference, tag: str, name: str) -> str:
        url = f"{self._base(reference.registry)}/v2/{reference.repository}/manifests/{tag}"
        headers = {"Accept": ", ".join(MANIFEST_MEDIA_TYPES)}
        scope = f"repository:{reference.repository}:pull"
        response = self._request("HEAD", url, headers, reference.registry, scope)
        if response.status_code == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            authorization = self._authorize(challenge, reference.registry, scope, name)
            if authorization is not None:
                headers["Authorization"] = authorization
                response = self._request("HEAD", url, headers, reference.registry, scope)
        if response.status_code == 200:
            digest = response.headers.get("Docker-Content-Digest", "").strip().lower()
            if _DIGEST.fullmatch(digest):
                return digest
            # No digest header (allowed by the spec): the digest is that of the manifest's exact bytes.
            body = self._request("GET", url, headers, reference.registry, scope)
            if body.status_code == 200:
                return oci_manifest_digest(body.content)
            response = body
        self._refuse(response, reference, name)
        raise AssertionError("unreachable")  # _refuse always raises

    def _request(self, method: str, url: str, headers: Mapping[str, str], registry: str, scope: str):
        try:
            response = self.session.request(
                method, url, headers=dict(headers), timeout=self.timeout_seconds, allow_redirects=True
            )
        except (requests.ConnectionError, requests.Timeout) as error:
            raise _Transient(type(error).__name__) from None
        if response.status_code == 429 or response.status_code >= 500:
            raise _Transient(f"HTTP {response.status_code}")
        return response

    def _authorize(self, challenge: str, registry: str, scope: str, name: str) -> str | None:
        """The Authorization header that answers ``challenge``; None when there is nothing to answer with."""
        scheme, _, params_text = challenge.strip().partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        credentials = self.credentials.get(registry)
        if scheme.lower() == "basic":
            if credentials is None or not credentials.username:
                return None
            pair = f"{credentials.username}:{credentials.password}".encode()
            return "Basic " + base64.b64encode(pair).decode()
        if scheme.lower() != "bearer" or not params.get("realm"):
            raise RegistryUnauthorizedError(
                f"registry {registry} asks for an authentication this client does not speak for {name} "
                f"({scheme or 'no challenge'}); pin the image by digest or use a registry with token or basic auth"
            )
        cache_key = (registry, params.get("scope") or scope)
        with self._lock:
            token = self._tokens.get(cache_key)
        if token is None:
            token = self._token(params, credentials, registry, scope, name)
            with self._lock:
                self._tokens[cache_key] = token
        return f"Bearer {token}"

    def _token(
        self, params: Mapping[str, str], credentials: RegistryCredentials | None, registry: str, scope: str, name: str
    ) -> str:
        realm = params["realm"]
        realm_host = re.sub(r"^https?://", "", realm).split("/", 1)[0]
        if credentials is not None and not (realm.startswith("https://") or realm_host in self.plain_http):
            # Credentials go to a token service only over TLS (or to a host explicitly allowed plain HTTP).
            raise RegistryUnauthorizedError(
                f"registry {registry} sends its token requests for {name} to {realm_host} without TLS; "
                "credentials are not sent there (allow it in CCAT_WORKFLOW_MANAGER_REGISTRY_PLAIN_HTTP)"
            )
        query = {"service": params.get("service", ""), "scope": params.get("scope") or scope}
        auth = None
        if credentials is not None and credentials.identity_token:
            # OAuth2 refresh token (what 'docker login' stores for some registries).
            query.update(grant_type="refresh_token", refresh_token=credentials.identity_token)
        elif credentials is not None and credentials.username:
            auth = (credentials.username, credentials.password)
        try:
            response = self.session.get(realm, params=query, auth=auth, timeout=self.timeout_seconds)
        except (requests.ConnectionError, requests.Timeout) as error:
            raise _Transient(f"token service {realm_host}: {type(error).__name__}") from None
        if response.status_code == 429 or response.status_code >= 500:
            raise _Transient(f"token service {realm_host}: HTTP {response.status_code}")
        if response.status_code in (401, 403):
            raise RegistryUnauthorizedError(self._unauthorized(registry, name, what="its token service refused"))
        try:
            document = response.json()
            token = document.get("token") or document.get("access_token")
        except ValueError:
            token = None
        if response.status_code != 200 or not isinstance(token, str) or not token:
            raise RegistryUnauthorizedError(
                f"the token service of registry {registry} ({realm_host}) answered HTTP {response.status_code} "
                f"without a token for {name}; check the registry"
            )
        return token

    def _refuse(self, response: requests.Response, reference: OciReference, name: str) -> None:
        status = response.status_code
        if status == 404:
            raise RegistryNotFoundError(
                f"registry {reference.registry} has no image {name} (HTTP 404); check the repository and tag in "
                "image_ref, or push the image"
            )
        if status in (401, 403):
            raise RegistryUnauthorizedError(self._unauthorized(reference.registry, name, what=f"HTTP {status}"))
        raise RegistryError(
            f"registry {reference.registry} answered HTTP {status} for {name}; check image_ref and the registry"
        )

    def _unauthorized(self, registry: str, name: str, what: str) -> str:
        has = registry in self.credentials
        fix = (
            "the credentials found for it were refused: log in again"
            if has
            else "no credentials for it were found: log in (docker login / apptainer registry login) or set "
            "CCAT_WORKFLOW_MANAGER_REGISTRY_AUTH_FILE to a docker config.json that has them"
        )
        return f"registry {registry} refused access to {name} ({what}); {fix}"

    def _base(self, registry: str) -> str:
        host = _API_HOSTS.get(registry, registry)
        return f"{'http' if registry in self.plain_http else 'https'}://{host}"


_shared_clients: dict[tuple[object, ...], RegistryClient] = {}
_shared_lock = threading.Lock()


def registry_client_from_environment(environ: Mapping[str, str] | None = None) -> RegistryClient:
    """A client with the credentials and plain-HTTP registries the settings name (``REGISTRY_*``).

    One client per settings and credentials file version in a process, so its answers are reused for
    ``cache_seconds`` across the attempts of a run; a new ``docker login`` (a changed file) makes a new one.
    """
    from ccat_dagster.settings import registry_settings

    auth_file, plain_http = registry_settings(environ)
    path = auth_file or default_docker_config()
    try:
        info = path.stat()
        version: tuple[object, ...] = (info.st_mtime_ns, info.st_size, info.st_ino)
    except OSError:
        version = ()
    key = (str(path), plain_http, *version)
    with _shared_lock:
        client = _shared_clients.get(key)
        if client is None:
            client = RegistryClient(credentials=load_docker_credentials(path), plain_http=plain_http)
            _shared_clients.clear()  # only the current settings' client is kept
            _shared_clients[key] = client
        return client
