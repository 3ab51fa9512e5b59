"""Image resolution: local images as they are, remote ones pulled once into the SIF cache."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest

from ccat_dagster.execution import images
from ccat_dagster.execution.images import (
    ImageError,
    ImageKind,
    ImagePullError,
    ResolvedImage,
    apptainer_pull,
    resolve_image,
)

HEX = "0123456789abcdef" * 4
DIGEST = f"sha256:{HEX}"


class FakePull:
    """Stands in for ``apptainer pull``: records each call and writes ``content`` to the destination."""

    def __init__(self, content: bytes = b"SIF image bytes") -> None:
        self.calls: list[tuple[str, Path]] = []
        self.content = content

    def __call__(self, image_ref: str, destination: Path) -> None:
        assert not destination.exists(), "apptainer pull refuses an existing destination"
        self.calls.append((image_ref, destination))
        destination.write_bytes(self.content)


def test_local_sif_sandbox_and_software_directory(tmp_path: Path) -> None:
    sif = tmp_path / "chai.sif"
    sif.write_bytes(b"sif")
    sandbox = tmp_path / "chai.sandbox"
    (sandbox / "usr" / "bin").mkdir(parents=True)
    software = tmp_path / "software" / "chai"
    (software / "bin").mkdir(parents=True)
    cache = tmp_path / "cache"

    assert resolve_image(
        image_ref=str(sif), image_digest=HEX, sif_cache_dir=cache, runtime_name="apptainer"
    ) == ResolvedImage(path=sif, digest=DIGEST, kind=ImageKind.SIF)
    assert resolve_image(
        image_ref=str(sandbox), image_digest=None, sif_cache_dir=cache, runtime_name="bubblewrap"
    ) == ResolvedImage(path=sandbox, digest=None, kind=ImageKind.SANDBOX)
    assert resolve_image(
        image_ref="software/chai",
        image_digest=None,
        sif_cache_dir=cache,
        runtime_name="bubblewrap",
        base_dir=tmp_path,
    ) == ResolvedImage(path=software, digest=None, kind=ImageKind.SOFTWARE_DIR)
    assert not cache.exists(), "local images never touch the SIF cache"


@pytest.mark.parametrize(
    ("image_ref", "runtime", "fragment"),
    [
        ("chai.sif", "apptainer", "relative path and no base directory"),
        ("/nonexistent/chai.sif", "apptainer", "does not exist"),
        ("{tmp}/chai.tar", "apptainer", "neither a .sif file nor a directory"),
        ("{tmp}/chai.sif", "bubblewrap", "bubblewrap runtime cannot run the SIF"),
        ("{tmp}/software", "apptainer", "software directory"),
        ("ftp://example.org/chai.sif", "apptainer", "unsupported scheme"),
        ("{tmp}/chai.sif", "docker", "runtime 'docker' is unknown"),
        ("", "apptainer", "empty"),
    ],
)
def test_local_images_that_cannot_run_are_refused(tmp_path: Path, image_ref: str, runtime: str, fragment: str) -> None:
    (tmp_path / "chai.sif").write_bytes(b"sif")
    (tmp_path / "chai.tar").write_bytes(b"tar")
    (tmp_path / "software").mkdir()
    with pytest.raises(ImageError, match=fragment):
        resolve_image(
            image_ref=image_ref.format(tmp=tmp_path),
            image_digest=None,
            sif_cache_dir=tmp_path / "cache",
            runtime_name=runtime,
        )


def test_remote_image_is_pulled_once_into_the_cache(tmp_path: Path) -> None:
    pull = FakePull()
    cache = tmp_path / "sif-cache"
    ref = "docker://ghcr.io/ccat/chai:1.0.0"
    first = resolve_image(image_ref=ref, image_digest=DIGEST, sif_cache_dir=cache, runtime_name="apptainer", pull=pull)
    assert first == ResolvedImage(path=cache / f"sha256-{HEX}.sif", digest=DIGEST, kind=ImageKind.SIF)
    assert first.path.read_bytes() == b"SIF image bytes"
    # Pulled by the digest, not the tag: a tag can have moved since the digest was recorded.
    assert len(pull.calls) == 1 and pull.calls[0][0] == f"docker://ghcr.io/ccat/chai@{DIGEST}"
    assert pull.calls[0][1].parent.parent == cache, "pulled next to the cache file, so the rename is atomic"

    second = resolve_image(image_ref=ref, image_digest=HEX, sif_cache_dir=cache, runtime_name="apptainer", pull=pull)
    assert second == first
    assert len(pull.calls) == 1, "a cache hit must not pull again"
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [f"sha256-{HEX}.sif"]


class FakeRegistry:
    def __init__(self, digest: str) -> None:
        self.digest, self.asked = digest, []

    def manifest_digest(self, reference: images.OciReference) -> str:
        self.asked.append(reference)
        return self.digest


def test_a_remote_tag_without_a_digest_is_asked_of_the_registry_and_pulled_by_the_answer(tmp_path: Path) -> None:
    pull, registry = FakePull(), FakeRegistry(DIGEST)
    resolved = resolve_image(
        image_ref="oras://ghcr.io/ccat/chai:1",
        image_digest=None,
        sif_cache_dir=tmp_path,
        runtime_name="apptainer",
        pull=pull,
        registry=registry,
    )
    assert [(r.registry, r.repository, r.tag) for r in registry.asked] == [("ghcr.io", "ccat/chai", "1")]
    assert resolved.digest == DIGEST and [ref for ref, _ in pull.calls] == [f"oras://ghcr.io/ccat/chai@{DIGEST}"]


def test_a_remote_reference_no_registry_can_be_asked_about_needs_a_digest(tmp_path: Path) -> None:
    pull = FakePull()
    with pytest.raises(ImageError, match="names no digest; pin it .* or set image_digest") as caught:
        resolve_image(
            image_ref="library://ccat/chai:1",
            image_digest=None,
            sif_cache_dir=tmp_path,
            runtime_name="apptainer",
            pull=pull,
        )
    assert "library://ccat/chai:1" in str(caught.value)
    assert pull.calls == []


@pytest.mark.parametrize(
    ("image_ref", "digest", "runtime", "fragment"),
    [
        ("docker://ghcr.io/ccat/chai:1", DIGEST, "bubblewrap", "bubblewrap runtime cannot pull"),
        ("docker://ghcr.io/ccat/chai:1", "md5:abc", "apptainer", "not a sha256 digest"),
        (f"docker://ghcr.io/ccat/chai@sha256:{'f' * 64}", DIGEST, "apptainer", "make them agree"),
    ],
)
def test_remote_images_that_cannot_be_used_are_refused(
    tmp_path: Path, image_ref: str, digest: str, runtime: str, fragment: str
) -> None:
    pull = FakePull()
    with pytest.raises(ImageError, match=fragment):
        resolve_image(image_ref=image_ref, image_digest=digest, sif_cache_dir=tmp_path, runtime_name=runtime, pull=pull)
    assert pull.calls == []


def test_failed_pull_leaves_no_cache_entry(tmp_path: Path) -> None:
    def failing_pull(image_ref: str, destination: Path) -> None:
        destination.write_bytes(b"half an image")
        raise ImagePullError(f"network down while pulling {image_ref}")

    cache = tmp_path / "cache"
    with pytest.raises(ImagePullError, match="network down"):
        resolve_image(
            image_ref="library://ccat/chai:1",
            image_digest=DIGEST,
            sif_cache_dir=cache,
            runtime_name="apptainer",
            pull=failing_pull,
        )
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []

    with pytest.raises(ImagePullError, match="produced no image file"):
        resolve_image(
            image_ref="library://ccat/chai:1",
            image_digest=DIGEST,
            sif_cache_dir=cache,
            runtime_name="apptainer",
            pull=lambda ref, destination: None,
        )


def test_https_download_must_match_the_digest(tmp_path: Path) -> None:
    content = b"a SIF file served over https"
    right = "sha256:" + hashlib.sha256(content).hexdigest()
    resolved = resolve_image(
        image_ref="https://example.org/chai.sif",
        image_digest=right,
        sif_cache_dir=tmp_path,
        runtime_name="apptainer",
        pull=FakePull(content),
    )
    assert resolved.path.read_bytes() == content
    with pytest.raises(ImagePullError, match="not image_digest"):
        resolve_image(
            image_ref="https://example.org/other.sif",
            image_digest=DIGEST,
            sif_cache_dir=tmp_path / "other",
            runtime_name="apptainer",
            pull=FakePull(content),
        )


def _fake_apptainer(tmp_path: Path, *, exit_code: int) -> Path:
    """An executable that records its argv as JSON and, like apptainer pull, writes the destination."""
    script = tmp_path / "apptainer"
    record = tmp_path / "argv.json"
    script.write_text(
        "#!/usr/bin/python3\n"
        "import json, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        f"if {exit_code}:\n"
        "    sys.stderr.write('FATAL: could not reach the registry')\n"
        f"    sys.exit({exit_code})\n"
        "open(sys.argv[2], 'wb').write(b'SIF')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_apptainer_pull_command(tmp_path: Path) -> None:
    apptainer = _fake_apptainer(tmp_path, exit_code=0)
    destination = tmp_path / "out.sif"
    apptainer_pull("docker://ghcr.io/ccat/chai:1", destination, apptainer=str(apptainer))
    assert json.loads((tmp_path / "argv.json").read_text()) == [
        "pull",
        str(destination),
        "docker://ghcr.io/ccat/chai:1",
    ]
    assert destination.read_bytes() == b"SIF"


def test_apptainer_pull_failures(tmp_path: Path) -> None:
    apptainer = _fake_apptainer(tmp_path, exit_code=255)
    with pytest.raises(ImagePullError, match="exit code 255: FATAL: could not reach the registry"):
        apptainer_pull("docker://x/y:1", tmp_path / "out.sif", apptainer=str(apptainer))
    with pytest.raises(ImagePullError, match="was not found; install Apptainer"):
        apptainer_pull("docker://x/y:1", tmp_path / "out.sif", apptainer=str(tmp_path / "missing"))


def test_cache_file_name() -> None:
    assert images.sif_cache_path(sif_cache_dir=Path("/data/sif-cache"), image_digest=HEX.upper()) == Path(
        f"/data/sif-cache/sha256-{HEX}.sif"
    )
