"""``/pipelines/software/``: ReductionSoftware CRUD and its versions (``…/{id}/versions``).

A registered version is immutable (attempts and fingerprints refer to it): it can be added and, while nothing
uses it, deleted, never changed; a new image is a new version (as ``pipelines apply`` insists).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from ccat_dagster.api.auth import ReadCaller, WriteCaller
from ccat_dagster.api.pagination import Page, PageParams, keyset, page_of, page_params
from ccat_dagster.api.problems import ApiProblem
from ccat_dagster.api.routers.common import RowId, count_of, get_or_404, transaction
from ccat_dagster.opsdb import models as m
from ccat_dagster.pipelines.spec import parse_semver

router = APIRouter(prefix="/pipelines/software", tags=["software"])


class SoftwareIn(BaseModel):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = Field(default="", max_length=10_000)


class SoftwareUpdate(BaseModel):
    description: str = Field(max_length=10_000)


class VersionIn(BaseModel):
    version: str = Field(min_length=1, max_length=64, description="semantic version, e.g. 1.2.0")
    image_ref: str = Field(min_length=1, max_length=1024, description="docker://…, oras://…, a .sif or a sandbox dir")
    image_digest: str | None = Field(default=None, max_length=128, pattern=r"^sha256:[0-9a-f]{64}$")
    entrypoint: list[str] = Field(default_factory=list, max_length=100)


class VersionOut(BaseModel):
    id: int
    software_id: RowId
    version: str
    image_ref: str
    image_digest: str | None
    entrypoint: list[str]
    created_at: dt.datetime


class SoftwareOut(BaseModel):
    id: int
    name: str
    description: str
    versions: list[VersionOut]


def _version_out(v: m.ReductionSoftwareVersion) -> VersionOut:
    return VersionOut(
        id=v.id,
        software_id=v.reduction_software_id,
        version=v.version,
        image_ref=v.image_ref,
        image_digest=v.image_digest,
        entrypoint=[str(part) for part in v.entrypoint or []],
        created_at=v.created_at,
    )


def _out(row: m.ReductionSoftware) -> SoftwareOut:
    return SoftwareOut(
        id=row.id, name=row.name, description=row.description, versions=[_version_out(v) for v in row.versions]
    )


@router.get("/", response_model=Page[SoftwareOut], summary="reduction software, newest first")
def list_software(
    request: Request, caller: ReadCaller, page: Annotated[PageParams, Depends(page_params)]
) -> dict[str, Any]:
    with transaction(request) as session:
        rows = list(session.scalars(keyset(select(m.ReductionSoftware), m.ReductionSoftware.id, page)))
        return page_of(rows, page, item_id=lambda r: r.id, convert=_out)


@router.post("/", response_model=SoftwareOut, status_code=201, summary="register reduction software")
def create_software(request: Request, body: SoftwareIn, caller: WriteCaller) -> SoftwareOut:
    with transaction(request) as session:
        if session.scalar(select(m.ReductionSoftware.id).where(m.ReductionSoftware.name == body.name)) is not None:
            raise ApiProblem(409, f"reduction software {body.name!r} exists", errors=[("body.name", "taken")])
        row = m.ReductionSoftware(name=body.name, description=body.description)
        session.add(row)
        session.flush()
        return _out(row)


@router.get("/{software_id}", response_model=SoftwareOut, summary="one reduction software with its versions")
def get_software(request: Request, software_id: RowId, caller: ReadCaller) -> SoftwareOut:
    with transaction(request) as session:
        return _out(get_or_404(session, m.ReductionSoftware, software_id, "reduction software"))


@router.put("/{software_id}", response_model=SoftwareOut, summary="change the description")
def update_software(request: Request, software_id: RowId, body: SoftwareUpdate, caller: WriteCaller) -> SoftwareOut:
    with transaction(request) as session:
        row = get_or_404(session, m.ReductionSoftware, software_id, "reduction software")
        row.description = body.description
        session.flush()
        return _out(row)


@router.delete("/{software_id}", status_code=204, summary="delete software no step uses")
def delete_software(request: Request, software_id: RowId, caller: WriteCaller) -> Response:
    with transaction(request) as session:
        row = get_or_404(session, m.ReductionSoftware, software_id, "reduction software")
        steps = count_of(session, m.ReductionStep.reduction_software_id, row.id)
        if steps or row.versions:
            raise ApiProblem(
                409, f"reduction software {row.name!r} has versions or is used by {steps} step(s): delete those first"
            )
        session.delete(row)
    return Response(status_code=204)


@router.get("/{software_id}/versions", response_model=list[VersionOut], summary="the versions of a software")
def list_versions(request: Request, software_id: RowId, caller: ReadCaller) -> list[VersionOut]:
    with transaction(request) as session:
        return [
            _version_out(v)
            for v in get_or_404(session, m.ReductionSoftware, software_id, "reduction software").versions
        ]


@router.post("/{software_id}/versions", response_model=VersionOut, status_code=201, summary="register a version")
def create_version(request: Request, software_id: RowId, body: VersionIn, caller: WriteCaller) -> VersionOut:
    try:
        parse_semver(body.version)
    except ValueError as error:
        raise ApiProblem(422, str(error), errors=[("body.version", str(error))]) from None
    with transaction(request) as session:
        software = get_or_404(session, m.ReductionSoftware, software_id, "reduction software")
        if any(v.version == body.version for v in software.versions):
            raise ApiProblem(
                409,
                f"{software.name} {body.version} is registered already; versions are immutable: register a new one",
                errors=[("body.version", "taken")],
            )
        row = m.ReductionSoftwareVersion(
            reduction_software_id=software.id,
            version=body.version,
            image_ref=body.image_ref,
            image_digest=body.image_digest,
            entrypoint=list(body.entrypoint),
        )
        session.add(row)
        session.flush()
        return _version_out(row)


@router.get("/{software_id}/versions/{version_id}", response_model=VersionOut, summary="one version")
def get_version(request: Request, software_id: RowId, version_id: RowId, caller: ReadCaller) -> VersionOut:
    with transaction(request) as session:
        row = get_or_404(session, m.ReductionSoftwareVersion, version_id, "software version")
        if row.reduction_software_id != software_id:
            raise ApiProblem(404, f"software {software_id} has no version {version_id}")
        return _version_out(row)


@router.delete("/{software_id}/versions/{version_id}", status_code=204, summary="delete a version nothing used")
def delete_version(request: Request, software_id: RowId, version_id: RowId, caller: WriteCaller) -> Response:
    with transaction(request) as session:
        row = get_or_404(session, m.ReductionSoftwareVersion, version_id, "software version")
        if row.reduction_software_id != software_id:
            raise ApiProblem(404, f"software {software_id} has no version {version_id}")
        used = count_of(session, m.ExecutedReductionStep.reduction_software_version_id, row.id)
        builds = count_of(session, m.ReductionSoftwareBuild.reduction_software_version_id, row.id)
        if used or builds:
            raise ApiProblem(409, f"version {row.version} was used by {used} attempt(s): it is part of provenance")
        session.delete(row)
    return Response(status_code=204)
