"""docs/configuration.md and deploy/ agree with the code: every setting documented, the generated table
current, the deployment files naming only real variables, carrying no secrets, and wired to each other.

``CCAT_UPDATE_DOCS=1`` rewrites the generated table in docs/configuration.md instead of failing on a change.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import yaml

from ccat_dagster.settings import DATA_DIR_VAR, OPS_DB_URL_VAR, Settings, variable_reference

REPO = Path(__file__).resolve().parents[1]
CONFIG_DOC = REPO / "docs" / "configuration.md"
DEPLOY = REPO / "deploy"
BEGIN = "<!-- BEGIN generated variable table -->"
END = "<!-- END generated variable table -->"
# A URL with a password in it: scheme://user:password@host
URL_WITH_PASSWORD = re.compile(r"://[^/@:\s]+:(?!\$\{)[^@\s]+@")


def render_variable_table() -> str:
    lines = ["| variable | default | allowed values |", "|---|---|---|"]
    for name, default, allowed in variable_reference():
        lines.append(f"| `{name}` | `{default}` | {allowed} |")
    return "\n".join(lines)


def test_the_configuration_doc_has_the_current_variable_table():
    text = CONFIG_DOC.read_text()
    head, found_begin, rest = text.partition(BEGIN)
    body, found_end, tail = rest.partition(END)
    assert found_begin and found_end, f"{CONFIG_DOC} lacks the {BEGIN} … {END} markers"
    expected = "\n" + render_variable_table() + "\n"
    if os.environ.get("CCAT_UPDATE_DOCS") == "1" and body != expected:
        CONFIG_DOC.write_text(head + BEGIN + expected + END + tail)
        body = expected
    assert body == expected, (
        "docs/configuration.md's variable table differs from ccat_dagster.settings.variable_reference(); "
        "regenerate it: CCAT_UPDATE_DOCS=1 .venv/bin/pytest tests/test_configuration_reference.py"
    )


def test_every_setting_is_in_the_reference_and_described():
    """A new Settings field without a variable_reference() row (or without prose in the doc) fails here."""
    documented = {name for name, _, _ in variable_reference()}
    settings_vars = set(Settings.from_env({DATA_DIR_VAR: "/tmp/x"}).as_environment())
    assert settings_vars == documented, (
        f"only in Settings: {sorted(settings_vars - documented)}; "
        f"only in variable_reference(): {sorted(documented - settings_vars)}"
    )
    prose = CONFIG_DOC.read_text().partition(END)[2]
    for name in sorted(documented):
        assert f"`{name}`" in prose, f"{name} has no description under 'What each one does'"


def _env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), f"{path}:{number}: not NAME=VALUE: {raw!r}"
        values[name] = value
    return values


def test_env_template_names_real_variables_and_no_secrets():
    template = DEPLOY / "ccat-dagster.env.example"
    values = _env_file(template)
    known = {name for name, _, _ in variable_reference()} | {"DAGSTER_HOME", "DAGSTER_PG_URL"}
    assert set(values) <= known, f"unknown variables in {template.name}: {sorted(set(values) - known)}"
    assert {name for name, _, _ in variable_reference()} <= set(values), "the template should list every setting"
    for name, value in values.items():
        assert not URL_WITH_PASSWORD.search(value), f"{name} in {template.name} carries a password"
        assert "password" not in name.lower() and "secret" not in name.lower(), name
    # The values must be valid settings as they stand (empty = default).
    Settings.from_env({k: v for k, v in values.items() if k not in ("DAGSTER_HOME", "DAGSTER_PG_URL")})


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values in order]}} (keys such as EnvironmentFile repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _workspace_grpc(path: Path) -> dict:
    (entry,) = yaml.safe_load(path.read_text())["load_from"]
    return entry["grpc_server"]


def test_systemd_units_are_wired_to_one_code_server():
    units = {path.name: _unit(path) for path in sorted((DEPLOY / "systemd").glob("*.service"))}
    assert set(units) == {
        "ccat-dagster-code-server.service",
        "ccat-dagster-webserver.service",
        "ccat-dagster-daemon.service",
        "ccat-dagster-api.service",
    }
    (exec_start,) = units["ccat-dagster-code-server.service"]["Service"]["ExecStart"]
    code_server = shlex.split(exec_start)
    port = code_server[code_server.index("--port") + 1]
    grpc = _workspace_grpc(DEPLOY / "workspace.yaml")
    assert str(grpc["port"]) == port and grpc["host"] == "127.0.0.1"
    assert grpc["location_name"] == code_server[code_server.index("--location-name") + 1] == "ccat_dagster"
    for name in ("ccat-dagster-webserver.service", "ccat-dagster-daemon.service"):
        command = shlex.split(units[name]["Service"]["ExecStart"][0])
        assert command[command.index("--workspace") + 1] == "/opt/ccat-dagster/deploy/workspace.yaml", name
        assert "ccat-dagster-code-server.service" in units[name]["Unit"]["After"][0], name
    for name, unit in units.items():
        files = unit["Service"]["EnvironmentFile"]
        assert files == ["/etc/ccat-dagster/ccat-dagster.env", "-/etc/ccat-dagster/secrets.env"], name
        assert unit["Service"]["User"] == ["ccat"], name


def test_compose_file_has_the_four_services_and_no_secrets():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "code-server", "webserver", "daemon"} <= set(services)
    text = (DEPLOY / "docker-compose.yaml").read_text()
    assert not URL_WITH_PASSWORD.search(text.replace("${POSTGRES_PASSWORD:?", "${")), "a literal password"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    grpc = _workspace_grpc(DEPLOY / "workspace.compose.yaml")
    assert grpc["host"] == "code-server"
    command = services["code-server"]["command"]
    assert f"--port={grpc['port']}" in command and "--location-name=ccat_dagster" in command
    for name in ("webserver", "daemon"):
        assert "--workspace=/opt/ccat-dagster/deploy/workspace.compose.yaml" in services[name]["command"], name
    for name in ("code-server", "webserver", "daemon"):
        env = services[name]["environment"]
        assert env[OPS_DB_URL_VAR].startswith("postgresql://") and "DAGSTER_PG_URL" in env, name
        assert "healthcheck" in services[name], name
    # The code server exits with code 2 on an invalid setting: restarted a bounded number of times, not forever.
    assert services["code-server"]["restart"] == "on-failure:5"
    assert compose["x-ccat-service"]["restart"] == "unless-stopped"
