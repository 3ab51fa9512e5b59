"""The REST API over real HTTP: uvicorn on 127.0.0.1, once per database (PostgreSQL, SQLite), seeded with the demo
observatory and the CHAI pipeline. Auth, problem details, the grouping engine behind ``resolve``, pipeline apply
behind the CRUD, lineage and impact, the dashboard, trigger / cancel / retry (with a recording launcher)."""

from __future__ import annotations

import copy

import pytest

from ccat_dagster.opsdb import models as m

from .api_fixtures import PIPELINE, api_world, count_rows
from .conftest import create_pg_database, drop_pg_database

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def world(request, tmp_path_factory):
    from ccat_dagster.opsdb.migrate import upgrade

    tmp = tmp_path_factory.mktemp(f"api-{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'opsdb.sqlite'}"
        upgrade(url)
    else:
        url = create_pg_database("ccat_test_api")
        upgrade(url)
    generator = api_world(url, tmp)
    yield next(generator)
    generator.close()
    if request.param == "postgresql":
        drop_pg_database(url)


def _operations(client):
    document = client.get("/openapi.json").json()
    for path, methods in document["paths"].items():
        for method in methods:
            concrete = path
            for name in (
                "pipeline_id",
                "grouping_id",
                "software_id",
                "version_id",
                "config_id",
                "attempt_id",
                "product_id",
            ):
                concrete = concrete.replace("{" + name + "}", "1")
            yield method.upper(), concrete.replace("{package}", "1")


def _problem(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


# ---------------------------------------------------------------------------------------------- auth


def test_every_endpoint_refuses_a_request_without_a_token(world):
    with world.client() as anonymous:
        operations = list(_operations(anonymous))
        assert len(operations) >= 30
        for method, path in operations:
            response = anonymous.request(method, path, json={})
            body = _problem(response, 401)
            assert response.headers["www-authenticate"] == "Bearer", (method, path)
            assert "bearer token" in body["detail"]
        bad = world.client("ccat_not-a-token").get("/pipelines/")
        _problem(bad, 401)
        revoked = world.client(world.revoked_token).get("/pipelines/")
        assert "revoked" in _problem(revoked, 401)["detail"]


def test_a_read_token_reads_but_cannot_write(world):
    before = {model: count_rows(world.ops_db_url, model) for model in (m.DataGrouping, m.Pipeline, m.ReductionSoftware)}
    with world.reader() as reader:
        assert reader.get("/pipelines/").status_code == 200
        writes = [(method, path) for method, path in _operations(reader) if method != "GET"]
        # resolve previews sub-groups: a POST that writes nothing, open to read tokens.
        writes = [(method, path) for method, path in writes if not path.endswith("/resolve")]
        assert len(writes) >= 15
        for method, path in writes:
            body = _problem(reader.request(method, path, json={}), 403)
            assert "write token" in body["detail"], (method, path)
    assert before == {model: count_rows(world.ops_db_url, model) for model in before}


def test_no_response_carries_a_token_secret_or_its_hash(world):
    with world.writer() as writer:
        texts = [writer.get(path).text for path in ("/pipelines/", "/pipelines/runs/", "/ux/pipeline-dashboard")]
        texts.append(writer.get("/openapi.json").text)
    for text in texts:
        assert world.write_token not in text and world.read_token not in text
        assert "token_sha256" not in text


def test_request_bodies_are_size_limited(world):
    with world.writer() as writer:
        response = writer.post(
            "/pipelines/configs/", content=b"{" + b" " * 70_000 + b"}", headers={"content-type": "application/json"}
        )
    assert "larger than 65536 bytes" in _problem(response, 413)["detail"]


# ---------------------------------------------------------------------------------------------- groupings


def test_a_bad_grouping_rule_is_422_naming_the_rule_and_nothing_is_written(world):
    before = count_rows(world.ops_db_url, m.DataGrouping)
    rules = [
        {"table": "Source", "column": "name", "operator": "eq", "value": "NGC253"},
        {"table": "ObsUnit", "column": "line_id", "operator": "matches", "value": "CO43"},
    ]
    with world.writer() as writer:
        response = writer.post("/pipelines/groupings/", json={"name": "bad-rules", "filter_rules": rules})
        body = _problem(response, 422)
        assert body["errors"][0]["field"] == "body.filter_rules[1]"
        assert '"matches"' in body["errors"][0]["message"] and "operator" in body["errors"][0]["message"]
        assert count_rows(world.ops_db_url, m.DataGrouping) == before
        assert writer.get("/pipelines/groupings/", params={"limit": 500}).json()["items"]
        names = [g["name"] for g in writer.get("/pipelines/groupings/", params={"limit": 500}).json()["items"]]
        assert "bad-rules" not in names


def test_grouping_crud_and_resolve_use_the_filter_engine(world):
    from ccat_dagster.grouping.engine import resolve
    from ccat_dagster.opsdb.engine import make_engine, session_scope

    rules = [{"table": "Source", "column": "name", "operator": "eq", "value": "NGC253"}]
    with world.writer() as writer:
        created = writer.post("/pipelines/groupings/", json={"name": "ngc253-any", "filter_rules": rules})
        assert created.status_code == 201, created.text
        grouping_id = created.json()["id"]
        assert (
            _problem(writer.post("/pipelines/groupings/", json={"name": "ngc253-any"}), 409)["errors"][0]["field"]
            == "body.name"
        )
        resolved = writer.post(f"/pipelines/groupings/{grouping_id}/resolve", json={"group_by": ["executed_obs_unit"]})
        assert resolved.status_code == 200, resolved.text
        doc = resolved.json()
        engine = make_engine(world.ops_db_url)
        with session_scope(engine) as session:
            expected = resolve(session, filter_rules=rules, group_by=["executed_obs_unit"])
        engine.dispose()
        assert [g["key"] for g in doc["sub_groups"]] == [g.key for g in expected]
        assert doc["package_count"] == sum(g.package_count for g in expected) > 0
        assert doc["total_bytes"] == sum(g.total_bytes for g in expected)
        bad_dim = writer.post(f"/pipelines/groupings/{grouping_id}/resolve", json={"group_by": ["no_such_dimension"]})
        assert _problem(bad_dim, 422)["errors"][0]["field"] == "body.group_by[0]"
        # A bad update leaves the stored rules as they were.
        bad = writer.put(
            f"/pipelines/groupings/{grouping_id}",
            json={
                "name": "ngc253-any",
                "filter_rules": [{"table": "Nope", "column": "x", "operator": "eq", "value": 1}],
            },
        )
        _problem(bad, 422)
        assert writer.get(f"/pipelines/groupings/{grouping_id}").json()["filter_rules"] == rules
        presets = writer.get("/pipelines/groupings/presets").json()
        assert isinstance(presets, list)
        custom = writer.post("/pipelines/groupings/presets", json={"name": "per-line", "group_by": ["line"]})
        assert custom.status_code == 201 and custom.json()["builtin"] is False
        assert writer.delete(f"/pipelines/groupings/{grouping_id}").status_code == 204
        assert writer.get(f"/pipelines/groupings/{grouping_id}").status_code == 404


# ---------------------------------------------------------------------------------------------- pipelines


def test_pipeline_crud_goes_through_apply_all_or_nothing(world):
    with world.writer() as writer:
        listing = writer.get("/pipelines/").json()["items"]
        (chai,) = [p for p in listing if p["name"] == PIPELINE]
        detail = writer.get(f"/pipelines/{chai['id']}").json()
        assert [s["name"] for s in detail["definition"]["steps"]] == ["calibrate", "baseline", "grid_map"]

        # The stored definition (image_ref absolute) is a valid document: copy it under a new name.
        document = copy.deepcopy(detail["definition"])
        document["pipeline"] = "chai_copy"
        document["grouping"]["name"] = "chai-copy-grouping"
        before = count_rows(world.ops_db_url, m.Pipeline)
        dry = writer.post("/pipelines/", params={"dry_run": "true"}, json=document)
        assert dry.status_code == 200 and dry.json()["outcome"] == "created" and dry.json()["dry_run"] is True
        assert count_rows(world.ops_db_url, m.Pipeline) == before
        created = writer.post("/pipelines/", json=document)
        assert created.status_code == 201, created.text
        new_id = created.json()["pipeline_id"]
        assert _problem(writer.post("/pipelines/", json=document), 409)["errors"][0]["field"] == "body.pipeline"

        # A bad step changes nothing: the problem names the field, the stored definition stays.
        broken = copy.deepcopy(document)
        broken["steps"][1]["depends_on"] = ["no_such_step"]
        broken["steps"][0]["cooldown_seconds"] = 999
        body = _problem(writer.put(f"/pipelines/{new_id}", json=broken), 422)
        assert any(e["field"].startswith("body.steps[1].depends_on") for e in body["errors"]), body
        assert writer.get(f"/pipelines/{new_id}").json()["definition"]["steps"][0]["cooldown_seconds"] != 999

        changed = copy.deepcopy(document)
        changed["steps"][0]["cooldown_seconds"] = 120
        updated = writer.put(f"/pipelines/{new_id}", json=changed)
        assert updated.json()["outcome"] == "updated" and any(
            "cooldown_seconds" in c for c in updated.json()["changes"]
        )
        renamed = {**changed, "pipeline": "other_name"}
        assert _problem(writer.put(f"/pipelines/{new_id}", json=renamed), 422)["errors"][0]["field"] == "body.pipeline"

        assert writer.post(f"/pipelines/{new_id}/disable").json()["enabled"] is False
        assert writer.get("/pipelines/", params={"enabled": "false"}).json()["items"][0]["name"] == "chai_copy"
        assert writer.post(f"/pipelines/{new_id}/enable").json()["enabled"] is True
        assert _problem(writer.delete(f"/pipelines/{chai['id']}"), 409)  # it has attempts: provenance
        assert writer.delete(f"/pipelines/{new_id}").status_code == 204
        assert writer.get(f"/pipelines/{new_id}").status_code == 404


def test_software_versions_and_configs(world):
    with world.writer() as writer:
        software = writer.post("/pipelines/software/", json={"name": "new-tool", "description": "test"})
        assert software.status_code == 201, software.text
        sid = software.json()["id"]
        bad = writer.post(f"/pipelines/software/{sid}/versions", json={"version": "one", "image_ref": "docker://x"})
        assert _problem(bad, 422)["errors"][0]["field"] == "body.version"
        version = writer.post(
            f"/pipelines/software/{sid}/versions", json={"version": "1.0.0", "image_ref": "docker://x:1"}
        )
        assert version.status_code == 201
        again = writer.post(f"/pipelines/software/{sid}/versions", json={"version": "1.0.0", "image_ref": "docker://y"})
        assert "immutable" in _problem(again, 409)["detail"]
        assert [v["version"] for v in writer.get(f"/pipelines/software/{sid}").json()["versions"]] == ["1.0.0"]
        assert _problem(writer.delete(f"/pipelines/software/{sid}"), 409)
        assert writer.delete(f"/pipelines/software/{sid}/versions/{version.json()['id']}").status_code == 204
        assert writer.delete(f"/pipelines/software/{sid}").status_code == 204

        config = writer.post("/pipelines/configs/", json={"name": "x.y", "parameters": {"a": 1}})
        assert config.status_code == 201
        same = writer.post("/pipelines/configs/", json={"name": "x.y", "parameters": {"a": 1}})
        assert same.status_code == 200 and same.json()["id"] == config.json()["id"]
        assert writer.get("/pipelines/configs/", params={"name": "x.y"}).json()["items"][0]["parameters"] == {"a": 1}
        assert writer.delete(f"/pipelines/configs/{config.json()['id']}").status_code == 204


# ---------------------------------------------------------------------------------------------- runs


def test_attempt_listing_filters_and_pages(world):
    with world.reader() as reader:
        everything = reader.get("/pipelines/runs/", params={"pipeline": PIPELINE, "limit": 500}).json()["items"]
        assert {a["id"] for a in everything} >= set(world.attempts.values())
        assert [a["id"] for a in everything] == sorted((a["id"] for a in everything), reverse=True)
        failed = reader.get("/pipelines/runs/", params={"status": "failed"}).json()["items"]
        assert [a["id"] for a in failed] == [world.attempts["failed"]]
        assert failed[0]["error"] == "exit code 3: calibration failed"
        several = reader.get("/pipelines/runs/", params=[("status", "failed"), ("status", "running")]).json()["items"]
        assert {a["id"] for a in several} == {world.attempts["failed"], world.attempts["running"]}
        grid = reader.get("/pipelines/runs/", params={"step": "grid_map", "sub_group": "all"}).json()["items"]
        assert [a["id"] for a in grid] == [world.attempts["grid"]]
        assert reader.get("/pipelines/runs/", params={"pipeline": "nope"}).json()["items"] == []
        assert reader.get("/pipelines/runs/", params={"created_after": "2999-01-01T00:00:00Z"}).json()["items"] == []
        bad = reader.get("/pipelines/runs/", params={"status": "exploded"})
        assert _problem(bad, 422)["errors"][0]["field"] == "query.status[0]"
        assert _problem(reader.get("/pipelines/runs/", params={"limit": 0}), 422)["errors"][0]["field"] == "query.limit"

        pages, cursor = [], None
        while True:
            params = {"pipeline": PIPELINE, "limit": 2, **({"cursor": cursor} if cursor else {})}
            page = reader.get("/pipelines/runs/", params=params).json()
            pages.extend(a["id"] for a in page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == [a["id"] for a in everything]

        detail = reader.get(f"/pipelines/runs/{world.attempts['grid']}").json()
        assert detail["input_product_ids"] == sorted([world.products["cal0"], world.products["cal1"]])
        assert detail["product_ids"] == [world.products["map"]]
        assert reader.get(f"/pipelines/runs/{world.attempts['grid']}/logs").json()["files"] == []
        assert _problem(reader.get("/pipelines/runs/999999"), 404)


def test_trigger_cancel_and_retry_use_the_launch_module(world):
    with world.writer() as writer:
        pipeline_id = [p for p in writer.get("/pipelines/").json()["items"] if p["name"] == PIPELINE][0]["id"]
        key = world.calibrate_keys[0]
        triggered = writer.post(f"/pipelines/{pipeline_id}/trigger", json={"step": "calibrate", "sub_groups": [key]})
        assert triggered.status_code == 202, triggered.text
        (run,) = triggered.json()["runs"]
        assert run["sub_group_keys"] == [key]
        asset_path, tags = world.launcher.launched[-1]
        assert asset_path == (PIPELINE, "calibrate")
        assert tags["ccat/pipeline"] == PIPELINE and tags["ccat/step"] == "calibrate"
        assert tags["ccat/trigger"] == "api" and tags["dagster/partition"] == key and "dagster/priority" in tags

        unknown = writer.post(f"/pipelines/{pipeline_id}/trigger", json={"step": "calibrate", "sub_groups": ["nope"]})
        assert "'nope'" in _problem(unknown, 422)["detail"]
        assert (
            "no step 'x'"
            in _problem(writer.post(f"/pipelines/{pipeline_id}/trigger", json={"step": "x"}), 422)["detail"]
        )

        cancelled = writer.post(f"/pipelines/runs/{world.attempts['running']}/cancel")
        assert cancelled.status_code == 202 and world.launcher.terminated[-1] == "dagster-running"
        assert _problem(writer.post(f"/pipelines/runs/{world.attempts['grid']}/cancel"), 409)

        retried = writer.post(f"/pipelines/runs/{world.attempts['failed']}/retry")
        assert retried.status_code == 202, retried.text
        assert world.launcher.launched[-1][1]["ccat/step"] == "calibrate"
        assert _problem(writer.post(f"/pipelines/runs/{world.attempts['grid']}/retry"), 409)


# ---------------------------------------------------------------------------------------------- products


def test_products_lineage_and_impact(world):
    with world.reader() as reader:
        science = reader.get("/data-products/", params={"product_type": "science", "pipeline": PIPELINE}).json()[
            "items"
        ]
        assert [p["id"] for p in science] == [world.products["map"]]
        intermediates = reader.get("/data-products/", params={"step": "calibrate", "current": "true"}).json()["items"]
        assert {p["id"] for p in intermediates} == {world.products["cal0"], world.products["cal1"]}
        detail = reader.get(f"/data-products/{world.products['map']}").json()
        assert detail["input_product_ids"] == sorted([world.products["cal0"], world.products["cal1"]])

        summary = reader.get(f"/data-products/{world.products['map']}/lineage").json()
        assert summary["view"] == "summary" and summary["attempt_count"] == 3
        assert {s["step"] for s in summary["steps"]} == {"calibrate", "grid_map"}
        assert summary["package_count"] == len(summary["packages"]) > 0
        tree = reader.get(f"/data-products/{world.products['map']}/lineage", params={"view": "tree"}).json()
        assert {a["id"] for a in tree["attempts"]} == {
            world.attempts["cal0"],
            world.attempts["cal1"],
            world.attempts["grid"],
        }
        prov = reader.get(f"/data-products/{world.products['map']}/lineage", params={"view": "prov-json"}).json()
        assert "entity" in prov and "activity" in prov and "wasGeneratedBy" in prov
        assert _problem(reader.get("/data-products/999999/lineage"), 404)

        impact = reader.get(f"/data-products/raw-packages/{world.package_id}/impact").json()
        impacted = {(g["step"], g["sub_group_key"]) for g in impact["sub_groups"]}
        assert ("grid_map", "all") in impacted and impact["package_id"] == world.package_id
        assert world.products["map"] in {p["id"] for p in impact["products"]}
        assert _problem(reader.get("/data-products/raw-packages/no-such-package/impact"), 404)


def test_pipeline_dashboard_aggregates(world):
    with world.reader() as reader:
        dashboard = reader.get("/ux/pipeline-dashboard").json()
    (chai,) = [p for p in dashboard["pipelines"] if p["name"] == PIPELINE]
    day = chai["windows"]["24h"]
    assert day["runs_by_status"]["completed"] == 3 and day["runs_by_status"]["failed"] == 1
    assert day["failures"] == 1 and day["cpu_hours"] == pytest.approx(3.0)
    assert chai["in_flight"] == 1 and chai["current_products"] == 3
    assert chai["recent_failures"][0]["attempt_id"] == world.attempts["failed"]


# ---------------------------------------------------------------------------------------------- fuzzing

# Examples per operation: enough to reach every parameter's bounds and types, few enough for the CI budget.
FUZZ_EXAMPLES = 3


def test_schemathesis_fuzzes_every_operation_without_5xx_and_within_the_schema(world):
    """Property-based requests built from the OpenAPI document, with the write token: no 5xx, and every
    response (problem details included) conforms to its documented status, content type and schema. Runs last
    in the module: its writes do not disturb the tests above."""
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{world.base_url}/openapi.json")
    headers = {"Authorization": f"Bearer {world.write_token}"}
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30

    for operation in operations:

        @hypothesis.settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        @hypothesis.given(case=operation.as_strategy())
        def fuzz(case):
            case.call_and_validate(base_url=world.base_url, headers=headers, checks=checks)

        fuzz()
