"""Image digests for every kind of image and the per-version build check behind ``resolve_image``.

Pure digests (SIF, directory trees, OCI references) in milliseconds; the build check on both ops-db dialects;
and the real path: a StepRunner run with bubblewrap and the local backend whose image is edited under the same
version, so the next submit is refused (and, under ``new_build``, registered and fingerprinted anew).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_dagster.execution import images
from ccat_dagster.execution.images import (
    BuildCheck,
    ImageChangedError,
    ImageChangePolicy,
    ImageError,
    ImageKind,
    ImageRebuiltError,
    ResolvedImage,
    check_build,
    oci_manifest_digest,
    oci_reference_digest,
    parse_oci_reference,
    resolve_image,
    tree_digest,
)
from ccat_dagster.execution.runner import OutcomeKind
from ccat_dagster.opsdb import models as m
from ccat_dagster.settings import SettingsError, image_change_policy

from .dagster_fixtures import require_bwrap_and_numpy
from .runner_fixtures import STEP, RunnerWorld, dispose_runner_world, make_runner_world

HEX = "0123456789abcdef" * 4
OLD = time.time() - 3600


def _tree(root: Path) -> Path:
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho 1\n")
    (root / "usr" / "bin" / "tool").chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc" / "conf").write_text("a = 1\n")
    (root / "usr" / "bin" / "link").symlink_to("tool")
    return root


def _age(root: Path) -> None:
    """Give every file an old mtime, so the digest cache may keep it (fresh files are never cached)."""
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.utime(path, (OLD, OLD))


# ---------------------------------------------------------------------------------------------- tree digest


def test_tree_digest_is_deterministic_and_sees_contents_modes_links_and_names(tmp_path: Path) -> None:
    first = tree_digest(_tree(tmp_path / "a"))
    assert first.startswith("sha256:") and len(first) == 71
    assert tree_digest(_tree(tmp_path / "b")) == first, "same tree elsewhere, created again: same digest"

    changes = {
        "content": lambda r: (r / "etc" / "conf").write_text("a = 2\n"),
        "mode": lambda r: (r / "usr" / "bin" / "tool").chmod(0o700),
        "link target": lambda r: ((r / "usr" / "bin" / "link").unlink(), (r / "usr" / "bin" / "link").symlink_to("x")),
        "rename": lambda r: (r / "etc" / "conf").rename(r / "etc" / "conf2"),
        "new empty dir": lambda r: (r / "opt").mkdir(),
        "new empty file": lambda r: (r / "etc" / "empty").write_bytes(b""),
    }
    seen = {first}
    for name, change in changes.items():
        root = _tree(tmp_path / name.replace(" ", "_"))
        change(root)
        digest = tree_digest(root)
        assert digest not in seen, f"a change of {name} must change the digest"
        seen.add(digest)


def test_tree_digest_does_not_follow_links_and_skips_bytecode_caches(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t")
    outside = tmp_path / "outside.txt"
    outside.write_text("one")
    (root / "etc" / "out").symlink_to(outside)
    before = tree_digest(root)
    outside.write_text("two")
    assert tree_digest(root) == before, "a link is hashed as its target text, never followed"
    (root / "usr" / "bin" / "__pycache__").mkdir()
    (root / "usr" / "bin" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"bytecode")
    assert tree_digest(root) == before, "__pycache__ is derived by running the software, not part of it"


def test_tree_digest_entries_cannot_imitate_each_other(tmp_path: Path) -> None:
    """Length-prefixed names: a file named like another entry's record gives a different digest."""
    a = tmp_path / "a"
    (a / "x").mkdir(parents=True)
    (a / "x" / "y").write_text("")
    b = tmp_path / "b"
    b.mkdir()
    (b / "x y").write_text("")
    assert tree_digest(a) != tree_digest(b)


def test_tree_digest_cache_skips_unchanged_files_and_sees_edits(tmp_path: Path, monkeypatch) -> None:
    root = _tree(tmp_path / "t")
    _age(root)
    cache = tmp_path / "cache"
    hashed: list[Path] = []
    real = images._sha256_of
    monkeypatch.setattr(images, "_sha256_of", lambda path: hashed.append(Path(path)) or real(path))

    # Hashing "a minute later": the files' ctimes (set by utime just now) are outside the racy window.
    def later() -> float:
        return time.time() + 60

    first = tree_digest(root, cache_dir=cache, now=later)
    assert len(hashed) == 2 and len(list(cache.iterdir())) == 1
    hashed.clear()
    assert tree_digest(root, cache_dir=cache, now=later) == first
    assert hashed == [], "an unchanged tree is only stat'ed"

    # Same size, mtime put back: the inode's ctime still changes, so the edit is seen.
    conf = root / "etc" / "conf"
    time.sleep(0.05)  # past the kernel's timestamp tick, so the ctime differs from the cached one
    conf.write_text("a = 9\n")
    os.utime(conf, (OLD, OLD))
    assert tree_digest(root, cache_dir=cache, now=later) != first
    assert hashed == [conf]


def test_tree_digest_does_not_cache_files_modified_just_now(tmp_path: Path, monkeypatch) -> None:
    root = _tree(tmp_path / "t")  # fresh mtimes: within the racy window
    hashed: list[Path] = []
    real = images._sha256_of
    monkeypatch.setattr(images, "_sha256_of", lambda path: hashed.append(Path(path)) or real(path))
    tree_digest(root, cache_dir=tmp_path / "cache")
    tree_digest(root, cache_dir=tmp_path / "cache")
    assert len(hashed) == 4, "files written within the last seconds are hashed again each time"


def test_a_corrupt_cache_is_ignored(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t")
    _age(root)
    cache = tmp_path / "cache"
    digest = tree_digest(root, cache_dir=cache, now=lambda: time.time() + 60)
    for entry in cache.iterdir():
        entry.write_text("{not json")
    assert tree_digest(root, cache_dir=cache, now=lambda: time.time() + 60) == digest


# ---------------------------------------------------------------------------------------------- SIF and OCI


def test_sif_digest_is_the_sha256_of_the_file(tmp_path: Path) -> None:
    sif = tmp_path / "chai.sif"
    sif.write_bytes(b"SIF bytes" * 1000)
    resolved = resolve_image(image_ref=str(sif), image_digest=None, sif_cache_dir=tmp_path, runtime_name="apptainer")
    expected = "sha256:" + hashlib.sha256(sif.read_bytes()).hexdigest()
    assert images.image_digest_of(resolved, image_ref=str(sif)) == expected


def test_sif_digest_is_cached_until_the_file_changes(tmp_path: Path, monkeypatch) -> None:
    sif = tmp_path / "chai.sif"
    sif.write_bytes(b"A" * 4096)
    hashed: list[Path] = []
    real = images._sha256_of
    monkeypatch.setattr(images, "_sha256_of", lambda path: hashed.append(Path(path)) or real(path))
    cache = tmp_path / "cache"

    def later() -> float:
        return time.time() + 60

    first = images.sif_digest(sif, cache_dir=cache, now=later)
    assert images.sif_digest(sif, cache_dir=cache, now=later) == first and len(hashed) == 1
    time.sleep(0.05)
    sif.write_bytes(b"B" * 4096)
    assert images.sif_digest(sif, cache_dir=cache, now=later) == "sha256:" + hashlib.sha256(b"B" * 4096).hexdigest()
    assert len(hashed) == 2


@pytest.mark.parametrize(
    ("image_ref", "registry", "repository", "tag", "digest"),
    [
        ("docker://ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("docker://ccat/chai:1.0.0", "docker.io", "ccat/chai", "1.0.0", None),
        ("docker://ghcr.io/ccat-obs/chai:1.0.0", "ghcr.io", "ccat-obs/chai", "1.0.0", None),
        ("docker://localhost:5000/chai@sha256:" + HEX, "localhost:5000", "chai", None, "sha256:" + HEX),
        ("oras://ghcr.io/a/b/c:v1@sha256:" + HEX, "ghcr.io", "a/b/c", "v1", "sha256:" + HEX),
        ("docker://index.docker.io/library/debian:12", "docker.io", "library/debian", "12", None),
    ],
)
def test_oci_references_are_parsed_as_the_distribution_spec_does(
    image_ref: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    assert parse_oci_reference(image_ref) == images.OciReference(registry, repository, tag, digest)


@pytest.mark.parametrize("image_ref", ["docker://Ghcr.io/UPPER/case:1", "docker://a//b", "docker://x@sha256:abc"])
def test_invalid_oci_references_are_refused(image_ref: str) -> None:
    with pytest.raises(ImageError, match="not a valid OCI reference"):
        parse_oci_reference(image_ref)


def test_oci_manifest_digest_golden() -> None:
    """The digest of a manifest is sha256 over its exact bytes; pinned with a fixed manifest."""
    manifest = (
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        b'"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'
        + b"a" * 64
        + b'","size":7023},"layers":[]}'
    )
    assert oci_manifest_digest(manifest) == "sha256:168f062ed35135dc9b7483ee5718ccf405d41d9b0fc104a2cbbfce40f60b070c"
    assert oci_manifest_digest(manifest + b" ") != oci_manifest_digest(manifest), "bytes, not parsed JSON"


def test_oci_reference_digest_is_the_pin_or_the_declared_digest() -> None:
    pinned = "docker://ghcr.io/ccat/chai@sha256:" + HEX
    assert oci_reference_digest(pinned, declared=None) == "sha256:" + HEX
    assert oci_reference_digest("docker://ghcr.io/ccat/chai:1", declared=HEX.upper()) == "sha256:" + HEX
    with pytest.raises(ImageError, match="names no digest; pin it"):
        oci_reference_digest("docker://ghcr.io/ccat/chai:1", declared=None)
    with pytest.raises(ImageError, match="make them agree"):
        oci_reference_digest(pinned, declared="f" * 64)


def test_a_tagged_reference_is_pulled_by_its_digest(tmp_path: Path) -> None:
    """Golden: what apptainer pull is given for a tag with a declared digest (the tag may have moved)."""
    calls: list[str] = []

    def pull(ref: str, destination: Path) -> None:
        calls.append(ref)
        destination.write_bytes(b"SIF")

    resolve_image(
        image_ref="docker://ghcr.io/ccat/chai:1.0.0",
        image_digest=HEX,
        sif_cache_dir=tmp_path,
        runtime_name="apptainer",
        pull=pull,
    )
    assert calls == [f"docker://ghcr.io/ccat/chai@sha256:{HEX}"]


def test_image_change_policy_setting() -> None:
    assert image_change_policy({}) == "refuse"
    assert image_change_policy({"CCAT_WORKFLOW_MANAGER_IMAGE_CHANGE_POLICY": "NEW_BUILD"}) == "new_build"
    with pytest.raises(SettingsError, match="IMAGE_CHANGE_POLICY='sometimes' is invalid: allowed values are refuse"):
        image_change_policy({"CCAT_WORKFLOW_MANAGER_IMAGE_CHANGE_POLICY": "sometimes"})


# ---------------------------------------------------------------------------------------------- build check


@pytest.fixture
def version(engine) -> tuple[str, str]:
    with Session(engine) as session, session.begin():
        software = m.ReductionSoftware(name=f"sw-{uuid.uuid4().hex[:6]}")
        session.add(software)
        session.flush()
        session.add(m.ReductionSoftwareVersion(reduction_software_id=software.id, version="1.0.0", image_ref="/x"))
        return software.name, "1.0.0"


def _image(digest_hex: str) -> ResolvedImage:
    return ResolvedImage(path=Path("/images/chai"), digest="sha256:" + digest_hex, kind=ImageKind.SOFTWARE_DIR)


def _builds(engine, name: str) -> list[tuple[int, str]]:
    return [(b.build, b.image_digest) for b in images.recorded_builds(engine, software=name, version="1.0.0")]


def test_first_use_records_build_one_and_the_same_image_passes(engine, version) -> None:
    name, number = version
    check = BuildCheck(engine, name, number, policy=ImageChangePolicy.REFUSE)
    assert check_build(check, image=_image("a" * 64)) == 1
    assert check_build(check, image=_image("a" * 64)) == 1
    assert _builds(engine, name) == [(1, "sha256:" + "a" * 64)]


def test_a_changed_image_is_refused_naming_version_digests_and_fix(engine, version) -> None:
    name, number = version
    check = BuildCheck(engine, name, number, policy=ImageChangePolicy.REFUSE)
    check_build(check, image=_image("a" * 64))
    with pytest.raises(ImageChangedError) as caught:
        check_build(check, image=_image("b" * 64))
    message = str(caught.value)
    for fragment in (f"{name} 1.0.0", "sha256:" + "a" * 64, "sha256:" + "b" * 64, "build 1", "new version"):
        assert fragment in message
    assert _builds(engine, name) == [(1, "sha256:" + "a" * 64)], "a refusal writes nothing"


def test_new_build_policy_registers_the_change_and_fingerprints_it(engine, version) -> None:
    name, number = version
    check_build(BuildCheck(engine, name, number, policy=ImageChangePolicy.REFUSE), image=_image("a" * 64))
    with pytest.raises(ImageRebuiltError, match="registered as build 2"):
        check_build(BuildCheck(engine, name, number, policy=ImageChangePolicy.NEW_BUILD), image=_image("b" * 64))
    assert _builds(engine, name) == [(1, "sha256:" + "a" * 64), (2, "sha256:" + "b" * 64)]
    with Session(engine) as session:
        row = session.scalars(
            select(m.ReductionSoftwareVersion).join(m.ReductionSoftware).where(m.ReductionSoftware.name == name)
        ).one()
        assert row.image_digest == "sha256:" + "b" * 64, "the new build's digest enters the input fingerprint"
    refuse = BuildCheck(engine, name, number, policy=ImageChangePolicy.REFUSE)
    assert check_build(refuse, image=_image("b" * 64)) == 2
    with pytest.raises(ImageChangedError, match="build 2"):
        check_build(refuse, image=_image("a" * 64))


def test_a_declared_digest_must_match_on_first_use(engine, version) -> None:
    name, number = version
    with Session(engine) as session, session.begin():
        row = session.scalars(
            select(m.ReductionSoftwareVersion).join(m.ReductionSoftware).where(m.ReductionSoftware.name == name)
        ).one()
        row.image_digest = "sha256:" + "c" * 64
    with pytest.raises(ImageChangedError, match="image_digest declared for it"):
        check_build(BuildCheck(engine, name, number, policy=ImageChangePolicy.REFUSE), image=_image("d" * 64))


def test_an_unknown_version_is_a_clear_error(engine) -> None:
    with pytest.raises(ImageError, match="software nope 9.9.9 is not registered in ops-db"):
        check_build(BuildCheck(engine, "nope", "9.9.9", policy=ImageChangePolicy.REFUSE), image=_image("a" * 64))


# ---------------------------------------------------------------------------------------------- real runner


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[RunnerWorld]:
    require_bwrap_and_numpy()
    world = make_runner_world(tmp_path_factory.mktemp("images"), scans=4)
    yield world
    dispose_runner_world(world)


@pytest.mark.postgres
@pytest.mark.bwrap
def test_editing_the_image_under_the_same_version_refuses_the_next_submit(world: RunnerWorld, monkeypatch) -> None:
    pipeline = world.apply(behaviour="ok")
    first, second, third = world.scan_keys[:3]

    def run(key: str):
        runner = world.runner()
        (outcome,) = runner.run(
            pipeline_name=pipeline, step_name=STEP, sub_group_keys=[key], dagster_run_id=uuid.uuid4().hex
        )
        return outcome

    monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_IMAGE_CHANGE_POLICY", "refuse")
    done = run(first)
    assert done.kind is OutcomeKind.COMPLETED, done.detail
    recorded = tree_digest(world.software_dir)
    (attempt,) = world.attempts(pipeline, first)
    assert attempt.image_digest == recorded, "the attempt records the digest it was submitted with"

    script = world.software_dir / "bin" / "behave.py"
    original = script.read_text()
    script.write_text(original + "\n# edited in place, version unchanged\n")
    try:
        refused = run(second)
        assert refused.kind is OutcomeKind.FAILED
        assert "the image of software behave 1.0.0" in refused.detail and recorded in refused.detail
        (attempt,) = world.attempts(pipeline, second)
        assert attempt.hpc_job_id is None, "refused before the submit"
        assert world.registered_counts([attempt.id])["products"] == 0

        monkeypatch.setenv("CCAT_WORKFLOW_MANAGER_IMAGE_CHANGE_POLICY", "new_build")
        rebuilt = run(third)
        assert rebuilt.kind is OutcomeKind.FAILED and "registered as build 2" in rebuilt.detail
        again = run(third)
        assert again.kind is OutcomeKind.COMPLETED, again.detail
        assert again.fingerprint != rebuilt.fingerprint, "the new build is part of the input fingerprint"
        assert world.attempts(pipeline, third)[-1].image_digest == tree_digest(world.software_dir)
    finally:
        script.write_text(original)
