"""W3C PROV-JSON export of a product's lineage, named after the IVOA Provenance Data Model (ProvDM).

``lineage_to_prov_json`` turns ``ccat_dagster.opsdb.lineage.ProductLineage`` into a PROV-JSON document (the
W3C member submission of 2013, https://www.w3.org/Submission/2013/SUBM-prov-json-20130424/);
``validate_prov_json`` checks a document against that submission's JSON schema (``prov-json.schema.json`` next
to this module) and checks what the schema cannot: every relation points at a declared record and every
qualified name uses a declared prefix.

Mapping (docs/provenance.md has the full table):

=============================  ===============================  ==============================================
ops-db                         PROV-JSON record                 ProvDM naming (``voprov:`` attributes/types)
=============================  ===============================  ==============================================
RawDataPackage                 entity, ``prov:Collection``      Entity: voprov:name, voprov:comment (reason
                                                                when invalidated)
RawDataFile                    entity + hadMember(package)      Entity: voprov:name (relative path)
DataProduct                    entity                           Entity: voprov:name, voprov:location,
                                                                voprov:generatedAtTime
ExecutedReductionStep          activity                         Activity: voprov:name, prov:startTime/EndTime
ReductionSoftwareVersion       agent, ``prov:SoftwareAgent``    Agent: voprov:name, voprov:type SoftwareAgent
ReductionStep                  entity, ``prov:Plan``            ActivityDescription (prov:type), the plan of
                                                                wasAssociatedWith
ReductionStepConfig            entity + used(role config)       ConfigFile (prov:type), its parameters as
                                                                Parameter entities (voprov:name/voprov:value)
run_input_package/_product     used                             Usage: voprov:role
DataProduct.executed_...       wasGeneratedBy                   Generation: voprov:role = product type
=============================  ===============================  ==============================================

ProvDM's description and configuration classes (ActivityDescription, ConfigFile, Parameter) and its own
relations (isDescribedBy, wasConfiguredBy) have no record type in PROV-JSON, whose schema admits only the W3C
relations; they are written as typed entities linked by W3C relations (plan of an association, usage with
role ``configuration``, membership), so the document stays valid W3C PROV and a ProvDM reader finds the
ProvDM class in ``prov:type``. Identifiers are qualified names ``ccat:<table>/<id>``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jsonschema

from ccat_dagster.errors import CcatError
from ccat_dagster.opsdb.lineage import LineageRun, ProductLineage

SCHEMA_PATH = Path(__file__).with_name("prov-json.schema.json")
PROV_NS = "http://www.w3.org/ns/prov#"
XSD_NS = "http://www.w3.org/2001/XMLSchema#"
# The prefix and namespace the IVOA ProvDM recommendation uses for its terms.
VOPROV_NS = "http://www.ivoa.net/documents/ProvenanceDM/ns/voprov/"
DEFAULT_CCAT_NS = "urn:ccat:ops-db:"
# RFC 3986 absolute URI (scheme ":" rest, no whitespace); a qualified name ``ccat:x/1`` has this form too.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:[^\s]*$")
# RFC 3339 date-time (what the schema's "date-time" format means).
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+\-]\d{2}:\d{2})$")


class ProvJsonError(CcatError, ValueError):
    """A PROV-JSON document that is not valid; the message lists the first problems with their JSON paths."""


# ---------------------------------------------------------------------------------------------- export


def lineage_to_prov_json(
    lineage: ProductLineage, *, namespace: str = DEFAULT_CCAT_NS, include_derivations: bool = True
) -> dict[str, Any]:
    """The PROV-JSON document of ``lineage`` (a JSON-serializable dict; see the module docstring for the
    mapping). ``namespace`` is the URI the ``ccat:`` prefix stands for; ``include_derivations`` adds one
    ``wasDerivedFrom`` per (product, input of its generating attempt) pair: implied by used + wasGeneratedBy,
    but it is what most PROV tools draw."""
    if not _URI.match(namespace):
        raise ProvJsonError(f"namespace {namespace!r} is not an absolute URI: give e.g. {DEFAULT_CCAT_NS!r}")
    doc = _Document(namespace)
    for package in lineage.packages.values():
        attributes: dict[str, Any] = {
            "prov:type": [_qn("prov:Collection"), _qn("voprov:Entity")],
            "prov:label": package.name,
            "voprov:name": package.name,
            "ccat:entityKind": "raw_data_package",
            "ccat:registeredAt": _time(package.created_at),
            "ccat:state": package.state.value,
            "ccat:sizeBytes": package.size_bytes,
            "ccat:checksum": package.checksum,
            "ccat:executedObsUnit": str(package.executed_obs_unit_id),
            "ccat:scanStart": _time(package.scan_start),
            "ccat:obsUnit": package.obs_unit,
            "ccat:source": package.source,
            "ccat:instrument": package.instrument,
            "ccat:instrumentModule": package.instrument_module,
        }
        if package.line_id:
            attributes["ccat:line"] = package.line_id
        if package.invalidated_reason:
            attributes["ccat:invalidatedReason"] = package.invalidated_reason
            attributes["voprov:comment"] = f"invalidated: {package.invalidated_reason}"
        doc.entity(_id("raw_data_package", package.id), attributes)
        for file in lineage.files.get(package.id, ()):
            file_id = _id("raw_data_file", file.id)
            doc.entity(
                file_id,
                {
                    "prov:type": _qn("voprov:Entity"),
                    "prov:label": file.relative_path,
                    "voprov:name": file.relative_path,
                    "ccat:entityKind": "raw_data_file",
                    "ccat:sizeBytes": file.size_bytes,
                    "ccat:checksum": file.checksum,
                },
            )
            doc.relation("hadMember", {"prov:collection": _id("raw_data_package", package.id), "prov:entity": file_id})

    for product in lineage.products.values():
        attributes = {
            "prov:type": _qn("voprov:Entity"),
            "prov:label": product.relative_path,
            "voprov:name": product.relative_path,
            "voprov:generatedAtTime": _time(product.created_at),
            "ccat:entityKind": "data_product",
            "ccat:productType": product.product_type.value,
            "ccat:sizeBytes": product.size_bytes,
            "ccat:sha256": product.sha256,
            "ccat:subGroupKey": product.sub_group_key,
            "ccat:current": product.is_current,
        }
        if product.id in lineage.locations:
            attributes["voprov:location"] = lineage.locations[product.id]
        if product.superseded_by_id is not None:
            attributes["ccat:supersededBy"] = _qn(_id("data_product", product.superseded_by_id))
        if product.invalidated:
            attributes["voprov:comment"] = f"derived from invalidated raw data: {product.invalidated.get('reason')}"
        doc.entity(_id("data_product", product.id), attributes)
        run = lineage.runs.get(product.run_id)
        doc.relation(
            "wasGeneratedBy",
            {
                "prov:entity": _id("data_product", product.id),
                "prov:activity": _id("executed_reduction_step", product.run_id),
                "prov:time": _time(product.created_at)["$"],
                "voprov:role": product.product_type.value,
            },
        )
        if include_derivations and run is not None:
            inputs = [_id("data_product", p) for p in lineage.used_products.get(run.id, ())]
            inputs += [_id("raw_data_package", p) for p in lineage.used_packages.get(run.id, ())]
            for used in inputs:
                doc.relation(
                    "wasDerivedFrom",
                    {
                        "prov:generatedEntity": _id("data_product", product.id),
                        "prov:usedEntity": used,
                        "prov:activity": _id("executed_reduction_step", run.id),
                    },
                )

    for step in lineage.steps.values():
        doc.entity(
            _id("reduction_step", step.id),
            {
                "prov:type": [_qn("prov:Plan"), _qn("voprov:ActivityDescription")],
                "prov:label": f"{step.pipeline}/{step.name}",
                "voprov:name": step.name,
                "voprov:description": step.description or step.name,
                "ccat:pipeline": step.pipeline,
                "ccat:groupBy": json.dumps(list(step.group_by)),
            },
        )
    for version in lineage.software.values():
        attributes = {
            "prov:type": _qn("prov:SoftwareAgent"),
            "prov:label": f"{version.software} {version.version}",
            "voprov:name": f"{version.software} {version.version}",
            "voprov:type": "SoftwareAgent",
            "ccat:software": version.software,
            "ccat:version": version.version,
            "ccat:imageRef": version.image_ref,
        }
        if version.image_digest:
            attributes["ccat:imageDigest"] = version.image_digest
        doc.agent(_id("reduction_software_version", version.id), attributes)
    for config in lineage.configs.values():
        config_id = _id("reduction_step_config", config.id)
        doc.entity(
            config_id,
            {
                "prov:type": [_qn("prov:Collection"), _qn("voprov:ConfigFile")],
                "prov:label": config.name,
                "voprov:name": config.name,
                "ccat:parametersSha256": config.parameters_sha256,
                "ccat:parameters": json.dumps(config.parameters, sort_keys=True),
            },
        )
        for name, value in sorted(config.parameters.items()):
            parameter_id = f"{config_id}/{quote(str(name), safe='')}"
            doc.entity(
                parameter_id,
                {
                    "prov:type": _qn("voprov:Parameter"),
                    "prov:label": f"{name}={_literal_text(value)}",
                    "voprov:name": str(name),
                    "voprov:value": _literal_text(value),
                },
            )
            doc.relation("hadMember", {"prov:collection": config_id, "prov:entity": parameter_id})

    for run in lineage.runs.values():
        run_id = _id("executed_reduction_step", run.id)
        doc.activity(run_id, _activity_attributes(run))
        started = _time(run.started_at)["$"] if run.started_at else None
        for product_id in lineage.used_products.get(run.id, ()):
            doc.relation("used", _usage(run_id, _id("data_product", product_id), "upstream_product", started))
        for package_id in lineage.used_packages.get(run.id, ()):
            doc.relation("used", _usage(run_id, _id("raw_data_package", package_id), "raw_data", started))
        if run.config_id in lineage.configs:
            doc.relation("used", _usage(run_id, _id("reduction_step_config", run.config_id), "configuration", started))
        association = {
            "prov:activity": run_id,
            "prov:agent": _id("reduction_software_version", run.software_version_id),
            "voprov:role": "reduction software",
        }
        if run.step_id in lineage.steps:
            association["prov:plan"] = _id("reduction_step", run.step_id)
        doc.relation("wasAssociatedWith", association)
    _add_provdm_descriptions(doc, lineage)
    return doc.as_dict()


def _add_provdm_descriptions(doc: _Document, lineage: ProductLineage) -> None:
    """ProvDM's description and configuration relations, as W3C ``wasInfluencedBy`` records typed with them.

    PROV-JSON admits only W3C relation kinds, so ProvDM's ``isDescribedBy`` (an activity by its
    ActivityDescription, the step; an entity by its EntityDescription, the product type) and ``wasConfiguredBy``
    (an activity by its ConfigFile and each Parameter, ``voprov:artefactType`` saying which) are influences
    whose ``prov:type`` names the ProvDM relation: valid W3C PROV, and a ProvDM reader finds its relations.
    """
    described: set[str] = set()
    for product in lineage.products.values():
        description = _id("product_type", product.product_type.value)
        if description not in described:
            described.add(description)
            doc.entity(
                description,
                {
                    "prov:type": _qn("voprov:EntityDescription"),
                    "prov:label": f"{product.product_type.value} product",
                    "voprov:name": product.product_type.value,
                    "voprov:description": _PRODUCT_TYPE_DESCRIPTIONS.get(product.product_type.value, ""),
                },
            )
        _influence(doc, _id("data_product", product.id), description, "voprov:isDescribedBy")
    for run in lineage.runs.values():
        run_id = _id("executed_reduction_step", run.id)
        if run.step_id in lineage.steps:
            _influence(doc, run_id, _id("reduction_step", run.step_id), "voprov:isDescribedBy")
        config = lineage.configs.get(run.config_id)
        if config is None:
            continue
        config_id = _id("reduction_step_config", config.id)
        _influence(doc, run_id, config_id, "voprov:wasConfiguredBy", artefact="ConfigFile")
        for name in sorted(config.parameters):
            _influence(
                doc, run_id, f"{config_id}/{quote(str(name), safe='')}", "voprov:wasConfiguredBy", artefact="Parameter"
            )


def _influence(doc: _Document, influencee: str, influencer: str, kind: str, *, artefact: str | None = None) -> None:
    attributes: dict[str, Any] = {"prov:influencee": influencee, "prov:influencer": influencer, "prov:type": _qn(kind)}
    if artefact is not None:
        attributes["voprov:artefactType"] = artefact
    doc.relation("wasInfluencedBy", attributes)


_PRODUCT_TYPE_DESCRIPTIONS = {
    "science": "a science product of a final step (output/science/)",
    "qa_metric": "a quality-assessment metric (output/qa/)",
    "plot": "a plot (output/plots/)",
    "statistics": "statistics of the data (output/statistics/)",
    "log": "a log of the reduction (output/logs/)",
    "intermediate": "an intermediate product of a step, input of the next (workspace/<step>/)",
}


def _activity_attributes(run: LineageRun) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "prov:type": _qn("voprov:Activity"),
        "prov:label": run.label,
        "voprov:name": f"{run.step} [{run.sub_group_key}]",
        "ccat:pipeline": run.pipeline,
        "ccat:step": run.step,
        "ccat:subGroupKey": run.sub_group_key,
        "ccat:attempt": run.attempt,
        "ccat:status": run.status.value,
        "ccat:inputFingerprint": run.input_fingerprint,
    }
    if run.started_at:
        attributes["prov:startTime"] = _time(run.started_at)["$"]
    if run.finished_at:
        attributes["prov:endTime"] = _time(run.finished_at)["$"]
    optional = {
        "ccat:dagsterRunId": run.dagster_run_id,
        "ccat:hpcBackend": run.hpc_backend,
        "ccat:hpcJobId": run.hpc_job_id,
        "ccat:exitCode": run.exit_code,
        "ccat:wallTimeSeconds": run.wall_time_seconds,
    }
    attributes.update({k: v for k, v in optional.items() if v is not None})
    return attributes


def _usage(activity: str, entity: str, role: str, time: str | None) -> dict[str, Any]:
    usage: dict[str, Any] = {"prov:activity": activity, "prov:entity": entity, "voprov:role": role}
    if time:
        usage["prov:time"] = time
    return usage


class _Document:
    def __init__(self, namespace: str) -> None:
        self.prefix = {"prov": PROV_NS, "xsd": XSD_NS, "voprov": VOPROV_NS, "ccat": namespace}
        self.records: dict[str, dict[str, Any]] = {}
        self.counters: dict[str, int] = {}

    def entity(self, identifier: str, attributes: dict[str, Any]) -> None:
        self.records.setdefault("entity", {})[identifier] = attributes

    def agent(self, identifier: str, attributes: dict[str, Any]) -> None:
        self.records.setdefault("agent", {})[identifier] = attributes

    def activity(self, identifier: str, attributes: dict[str, Any]) -> None:
        self.records.setdefault("activity", {})[identifier] = attributes

    def relation(self, kind: str, attributes: dict[str, Any]) -> None:
        # Relations get document-local blank-node ids, as in the PROV-JSON submission's examples.
        number = self.counters[kind] = self.counters.get(kind, 0) + 1
        self.records.setdefault(kind, {})[f"_:{_RELATION_PREFIX[kind]}{number}"] = attributes

    def as_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, **self.records}


_RELATION_PREFIX = {
    "used": "u",
    "wasGeneratedBy": "g",
    "wasDerivedFrom": "d",
    "wasAssociatedWith": "a",
    "hadMember": "m",
    "wasInfluencedBy": "i",
}


def _id(table: str, key: object) -> str:
    return f"ccat:{table}/{key}"


def _qn(name: str) -> dict[str, str]:
    return {"$": name, "type": "prov:QUALIFIED_NAME"}


def _time(value: dt.datetime) -> dict[str, str]:
    return {"$": value.astimezone(dt.UTC).isoformat(), "type": "xsd:dateTime"}


def _literal_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


# ---------------------------------------------------------------------------------------------- validation

# Record kinds whose attributes reference other records (attribute → kinds it may point at).
_REFERENCES: dict[str, dict[str, tuple[str, ...]]] = {
    "wasGeneratedBy": {"prov:entity": ("entity",), "prov:activity": ("activity",)},
    "used": {"prov:entity": ("entity",), "prov:activity": ("activity",)},
    "wasDerivedFrom": {
        "prov:generatedEntity": ("entity",),
        "prov:usedEntity": ("entity",),
        "prov:activity": ("activity",),
    },
    "wasAssociatedWith": {"prov:activity": ("activity",), "prov:agent": ("agent",), "prov:plan": ("entity",)},
    "wasAttributedTo": {"prov:entity": ("entity",), "prov:agent": ("agent", "entity")},
    "hadMember": {"prov:collection": ("entity",), "prov:entity": ("entity",)},
    "wasInformedBy": {"prov:informed": ("activity",), "prov:informant": ("activity",)},
}


@lru_cache(maxsize=1)
def load_prov_json_schema() -> dict[str, Any]:
    """The PROV-JSON schema of the W3C member submission (2013), as stored next to this module."""
    return json.loads(SCHEMA_PATH.read_text())


def _format_checker() -> jsonschema.FormatChecker:
    """Draft 4's checker plus ``uri`` and ``date-time`` (jsonschema checks them only with extra packages)."""
    checker = jsonschema.FormatChecker(formats=jsonschema.Draft4Validator.FORMAT_CHECKER.checkers)
    checker.checks("uri")(lambda value: not isinstance(value, str) or bool(_URI.match(value)))
    checker.checks("date-time")(lambda value: not isinstance(value, str) or bool(_DATE_TIME.match(value)))
    return checker


def prov_json_problems(document: Mapping[str, Any], *, limit: int = 20) -> list[str]:
    """Every problem found (at most ``limit``): schema violations, then references to undeclared records and
    qualified names with undeclared prefixes. Empty when the document is valid."""
    validator = jsonschema.Draft4Validator(load_prov_json_schema(), format_checker=_format_checker())
    problems = [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(document)'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    ]
    # The 2013 schema lists an activity's start and end times beside, not inside, "properties", so it never
    # checks them; the submission's text requires xsd:dateTime values.
    for activity_id, attributes in dict(document.get("activity", {})).items():
        for name in ("prov:startTime", "prov:endTime"):
            value = attributes.get(name) if isinstance(attributes, dict) else None
            if value is not None and not (isinstance(value, str) and _DATE_TIME.match(value)):
                problems.append(f"activity/{activity_id}/{name}: {value!r} is not a 'date-time'")
    prefix_map = document.get("prefix", {})
    prefixes = {"prov", "xsd", *(prefix_map if isinstance(prefix_map, dict) else {})}
    declared = {kind: set(dict(document.get(kind, {}))) for kind in ("entity", "activity", "agent")}
    for kind, references in _REFERENCES.items():
        for relation_id, attributes in dict(document.get(kind, {})).items():
            for attribute, targets in references.items():
                value = attributes.get(attribute) if isinstance(attributes, dict) else None
                if value is not None and not any(value in declared[t] for t in targets):
                    problems.append(f"{kind}/{relation_id}: {attribute} {value!r} is not a declared {targets[0]}")
    for identifier in _qualified_names(document):
        prefix = identifier.split(":", 1)[0]
        if prefix != "_" and prefix not in prefixes:
            problems.append(f"qualified name {identifier!r} uses the undeclared prefix {prefix!r}")
    return problems[:limit]


def validate_prov_json(document: Mapping[str, Any]) -> None:
    """Raise ``ProvJsonError`` naming the problems when ``document`` is not valid PROV-JSON (see
    ``prov_json_problems``)."""
    problems = prov_json_problems(document)
    if problems:
        raise ProvJsonError(
            "the document is not valid PROV-JSON (W3C submission schema + reference checks):\n  "
            + "\n  ".join(problems)
        )


def _qualified_names(document: Mapping[str, Any]) -> Iterator[str]:
    """Record ids, attribute names, qualified-name values and the references of relations."""
    for kind, records in document.items():
        if kind == "prefix" or not isinstance(records, dict):
            continue
        references = _REFERENCES.get(kind, {})
        for identifier, attributes in records.items():
            yield identifier
            if not isinstance(attributes, dict):
                continue
            for name, value in attributes.items():
                yield name
                if name in references and isinstance(value, str):
                    yield value
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, dict) and item.get("type") == "prov:QUALIFIED_NAME":
                        yield str(item.get("$", ""))


def dumps(document: Mapping[str, Any]) -> str:
    """The document as indented JSON text (stable key order for diffs)."""
    return json.dumps(document, indent=2, ensure_ascii=False)
