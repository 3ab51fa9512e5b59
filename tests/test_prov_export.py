"""PROV-JSON export: the document validates against the W3C PROV-JSON schema, uses IVOA ProvDM
naming, covers every record of the lineage, and the validator rejects broken documents."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
from sqlalchemy.orm import Session

from ccat_dagster.cli import main
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.opsdb.lineage import ancestors
from ccat_dagster.provenance.prov import (
    SCHEMA_PATH,
    VOPROV_NS,
    ProvJsonError,
    lineage_to_prov_json,
    load_prov_json_schema,
    prov_json_problems,
    validate_prov_json,
)

from .test_lineage import build_graph


def _export(engine, tmp_path, product="mosaic", **options):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
    with Session(engine) as session:
        lineage = ancestors(session, product_id=graph.products[product])
    return graph, lineage, lineage_to_prov_json(lineage, **options)


def _qname_values(value):
    values = value if isinstance(value, list) else [value]
    return {v["$"] for v in values if isinstance(v, dict) and v.get("type") == "prov:QUALIFIED_NAME"}


def test_the_stored_schema_is_the_w3c_prov_json_schema():
    schema = load_prov_json_schema()
    jsonschema.Draft4Validator.check_schema(schema)
    assert schema["id"] == "http://provenance.ecs.soton.ac.uk/prov-json/schema#"
    assert schema["description"] == "Schema for a PROV-JSON document"
    assert schema["additionalProperties"] is False
    # Kept as published (the submission spells this key "wasEndedby").
    assert "wasEndedby" in schema["properties"] and "wasEndedBy" not in schema["properties"]
    assert set(schema["definitions"]["generation"]["required"]) == {"prov:entity"}
    assert SCHEMA_PATH.name == "prov-json.schema.json"


def test_export_validates_and_covers_the_whole_lineage(engine, tmp_path):
    graph, lineage, document = _export(engine, tmp_path)
    validate_prov_json(document)
    assert prov_json_problems(document) == []

    assert document["prefix"]["voprov"] == VOPROV_NS
    entities, activities, agents = document["entity"], document["activity"], document["agent"]
    for package_id in graph.packages:
        package = entities[f"ccat:raw_data_package/{package_id}"]
        assert {"prov:Collection", "voprov:Entity"} <= _qname_values(package["prov:type"])
        assert package["voprov:name"] in graph.package_names
    for files in lineage.files.values():
        for file in files:
            assert entities[f"ccat:raw_data_file/{file.id}"]["voprov:name"] == file.relative_path
    for product_id in lineage.products:
        assert f"ccat:data_product/{product_id}" in entities
    assert set(activities) == {f"ccat:executed_reduction_step/{r}" for r in lineage.runs}
    assert set(agents) == {f"ccat:reduction_software_version/{v}" for v in lineage.software}
    assert _qname_values(next(iter(agents.values()))["prov:type"]) == {"prov:SoftwareAgent"}

    used = {(u["prov:activity"], u["prov:entity"]) for u in document["used"].values()}
    for run_id, product_ids in lineage.used_products.items():
        for product_id in product_ids:
            assert (f"ccat:executed_reduction_step/{run_id}", f"ccat:data_product/{product_id}") in used
    for run_id, package_ids in lineage.used_packages.items():
        for package_id in package_ids:
            assert (f"ccat:executed_reduction_step/{run_id}", f"ccat:raw_data_package/{package_id}") in used
    generated = {g["prov:entity"]: g["prov:activity"] for g in document["wasGeneratedBy"].values()}
    assert generated == {
        f"ccat:data_product/{p.id}": f"ccat:executed_reduction_step/{p.run_id}" for p in lineage.products.values()
    }
    members = {(h["prov:collection"], h["prov:entity"]) for h in document["hadMember"].values()}
    assert len([m for m in members if m[0].startswith("ccat:raw_data_package/")]) == sum(
        len(f) for f in lineage.files.values()
    )
    associations = list(document["wasAssociatedWith"].values())
    assert len(associations) == len(lineage.runs)
    assert all(a["prov:plan"].startswith("ccat:reduction_step/") for a in associations)
    plan = entities[associations[0]["prov:plan"]]
    assert {"prov:Plan", "voprov:ActivityDescription"} == _qname_values(plan["prov:type"])
    root = f"ccat:data_product/{graph.products['mosaic']}"
    derived = {d["prov:usedEntity"] for d in document["wasDerivedFrom"].values() if d["prov:generatedEntity"] == root}
    assert derived == {f"ccat:data_product/{graph.products[n]}" for n in ("g_cube", "g_pair")} | {
        f"ccat:raw_data_package/{p}" for p in graph.packages
    }
    # Config parameters as ProvDM Parameters, members of their ConfigFile.
    parameters = [e for e in entities.values() if _qname_values(e.get("prov:type")) == {"voprov:Parameter"}]
    assert [(p["voprov:name"], p["voprov:value"]) for p in parameters] == [("calibration_mode", "hot_cold")]


def test_export_options(engine, tmp_path):
    _graph, lineage, document = _export(engine, tmp_path, product="c1", include_derivations=False)
    assert "wasDerivedFrom" not in document
    validate_prov_json(document)
    other = lineage_to_prov_json(lineage, namespace="https://archive.example.org/ccat/")
    assert other["prefix"]["ccat"] == "https://archive.example.org/ccat/"
    validate_prov_json(other)
    with pytest.raises(ProvJsonError, match="namespace 'not a uri' is not an absolute URI"):
        lineage_to_prov_json(lineage, namespace="not a uri")


def _broken(document, change):
    broken = copy.deepcopy(document)
    change(broken)
    return prov_json_problems(broken)


def test_validation_rejects_broken_documents(engine, tmp_path):
    _graph, _lineage, document = _export(engine, tmp_path, product="g_pair")
    first_used = next(iter(document["used"]))
    first_activity = next(iter(document["activity"]))
    first_generation = next(iter(document["wasGeneratedBy"]))

    assert any("'wasEndedBy' was unexpected" in p for p in _broken(document, lambda d: d.update(wasEndedBy={})))
    assert any(
        "'prov:entity' is a required property" in p
        for p in _broken(document, lambda d: d["wasGeneratedBy"][first_generation].pop("prov:entity"))
    )
    assert any(
        "is not a declared entity" in p
        for p in _broken(document, lambda d: d["used"][first_used].update({"prov:entity": "ccat:nothing/1"}))
    )
    assert any(
        "is not a 'date-time'" in p
        for p in _broken(document, lambda d: d["activity"][first_activity].update({"prov:startTime": "yesterday"}))
    )
    assert any(
        "is not a 'date-time'" in p
        for p in _broken(document, lambda d: d["wasGeneratedBy"][first_generation].update({"prov:time": "soon"}))
    )
    assert any("undeclared prefix 'voprov'" in p for p in _broken(document, lambda d: d["prefix"].pop("voprov")))
    assert any(
        "is not of type 'string'" in p or "is not valid under any of the given schemas" in p
        for p in _broken(document, lambda d: d["activity"][first_activity].update({"ccat:bad": {"x": 1}}))
    )
    with pytest.raises(ProvJsonError, match="not valid PROV-JSON"):
        validate_prov_json({"entity": {"e": {"prov:label": {"no-dollar": 1}}}})


def test_cli_writes_a_valid_document(db_url, engine, tmp_path, monkeypatch, capsys):
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
    monkeypatch.setenv("CCAT_OPS_DB_URL", db_url)
    monkeypatch.setenv("CCAT_DAGSTER_DATA_DIR", str(tmp_path / "data"))
    target = tmp_path / "mosaic.prov.json"
    assert main(["lineage", str(graph.products["mosaic"]), "--prov-json", "--output", str(target)]) == 0
    document = json.loads(target.read_text())
    validate_prov_json(document)
    assert {f"ccat:raw_data_package/{p}" for p in graph.packages} <= set(document["entity"])

    assert main(["lineage", str(graph.products["c0"]), "--prov-json", "--no-derivations"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "wasDerivedFrom" not in printed and prov_json_problems(printed) == []
    assert main(["lineage", str(graph.products["c0"]), "--no-derivations"]) == 2
    assert "apply to --prov-json only" in capsys.readouterr().err
