"""The PROV export in IVOA ProvDM terms, loaded and round-tripped by the ``prov`` library (W3C PROV validity).

ProvDM's description and configuration relations are W3C influences typed with the ProvDM relation; the
``prov`` library must read them back unchanged from PROV-JSON and from PROV-XML.
"""

from __future__ import annotations

import json

import pytest
from prov.model import ProvDocument, ProvInfluence
from sqlalchemy.orm import Session

from ccat_dagster.opsdb import models as m
from ccat_dagster.opsdb.engine import session_scope
from ccat_dagster.opsdb.lineage import ancestors
from ccat_dagster.provenance.prov import VOPROV_NS, lineage_to_prov_json, validate_prov_json

from .test_lineage import build_graph


@pytest.fixture
def exported(engine, tmp_path) -> tuple[dict, object]:
    with session_scope(engine) as session:
        graph = build_graph(session, tmp_path)
        session.execute(m.ReductionSoftwareVersion.__table__.update().values(image_digest="sha256:" + "ab" * 32))
    with Session(engine) as session:
        lineage = ancestors(session, product_id=graph.products["mosaic"])
    document = lineage_to_prov_json(lineage)
    validate_prov_json(document)
    return document, lineage


def _influences(document: ProvDocument, kind: str) -> list[ProvInfluence]:
    wanted = f"{{{VOPROV_NS}}}{kind}"
    found = []
    for record in document.get_records(ProvInfluence):
        types = {str(t.uri) for t in record.get_asserted_types() if hasattr(t, "uri")}
        if wanted.replace("{", "").replace("}", "") in types:
            found.append(record)
    return found


def test_the_provdm_export_round_trips_through_the_prov_library(exported) -> None:
    document, _lineage = exported
    loaded = ProvDocument.deserialize(content=json.dumps(document), format="json")
    again = ProvDocument.deserialize(content=loaded.serialize(format="json"), format="json")
    assert again == loaded, "PROV-JSON → prov → PROV-JSON → prov changes nothing"
    from_xml = ProvDocument.deserialize(content=loaded.serialize(format="xml"), format="xml")
    assert from_xml == loaded, "and so does PROV-XML"
    assert len(list(loaded.get_records())) == sum(len(v) for k, v in document.items() if k != "prefix"), (
        "every record of the export is a PROV record the library understands"
    )


def test_configuration_descriptions_and_the_software_digest_are_expressed(exported) -> None:
    document, lineage = exported
    loaded = ProvDocument.deserialize(content=json.dumps(document), format="json")
    configured = _influences(loaded, "wasConfiguredBy")
    n_parameters = sum(len(lineage.configs[r.config_id].parameters) + 1 for r in lineage.runs.values())
    assert len(configured) == n_parameters, "one per ConfigFile and one per Parameter of every attempt"
    artefacts = {
        str(value) for record in configured for key, value in record.attributes if key.localpart == "artefactType"
    }
    assert artefacts == {"ConfigFile", "Parameter"}
    described = _influences(loaded, "isDescribedBy")
    assert len(described) == len(lineage.runs) + len(lineage.products)
    descriptions = [
        e
        for e in document["entity"].values()
        if e["prov:type"] == {"$": "voprov:EntityDescription", "type": "prov:QUALIFIED_NAME"}
    ]
    assert {d["voprov:name"] for d in descriptions} == {p.product_type.value for p in lineage.products.values()}
    agents = document["agent"].values()
    assert agents and all(a["ccat:imageDigest"] == "sha256:" + "ab" * 32 for a in agents)
