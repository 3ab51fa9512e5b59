"""deploy/kubernetes/ is valid for supported Kubernetes versions (kubernetes-validate, offline) and agrees with
the backend: the Role grants exactly what the backend and doctor need, to the service account it binds, and
the PVCs are the claims of the K8S_VOLUMES value the folder documents."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from ccat_dagster.doctor import K8S_OPTIONAL_PERMISSIONS, K8S_REQUIRED_PERMISSIONS
from ccat_dagster.execution.hpc.kubernetes.config import parse_volume_specs

from .k8s_standin import SCHEMA_VERSIONS

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


def objects() -> list[dict]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        found.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


def by_kind(kind: str) -> list[dict]:
    return [obj for obj in objects() if obj["kind"] == kind]


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_object_validates_against_the_official_schema(version):
    kinds = set()
    for obj in objects():
        kubernetes_validate.validate(obj, version, strict=True)
        kinds.add(obj["kind"])
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim"} <= kinds


def test_the_role_grants_exactly_what_the_backend_needs_to_the_bound_service_account():
    (role,) = by_kind("Role")
    granted = {
        (verb, group, resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == set(K8S_REQUIRED_PERMISSIONS + K8S_OPTIONAL_PERMISSIONS)
    (binding,) = by_kind("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    accounts = {sa["metadata"]["name"] for sa in by_kind("ServiceAccount")}
    assert {s["name"] for s in binding["subjects"]} <= accounts
    (namespace,) = by_kind("Namespace")
    namespaced = [obj for obj in objects() if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding")]
    assert {obj["metadata"]["namespace"] for obj in namespaced} == {namespace["metadata"]["name"]}


def test_the_pvcs_are_the_claims_of_the_documented_volumes_setting():
    text = (DEPLOY / "pvcs.yaml").read_text()
    (value,) = re.findall(r"^# CCAT_WORKFLOW_MANAGER_K8S_VOLUMES=(\S+)$", text, flags=re.MULTILINE)
    claims = {volume.source for volume in parse_volume_specs(value) if volume.kind == "pvc"}
    assert claims == {pvc["metadata"]["name"] for pvc in by_kind("PersistentVolumeClaim")}
