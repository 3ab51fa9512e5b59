"""Output discovery by convention and its refusals."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from ccat_dagster.execution.contract import AttemptLayout, OutputContractError, attempt_layout
from ccat_dagster.execution.discovery import DiscoveredProduct, discover_products


def _layout(tmp_path: Path, *, is_final: bool) -> AttemptLayout:
    layout = attempt_layout(
        base_dir=tmp_path / "pipelines",
        pipeline="chai",
        sub_group_key="all" if is_final else "eou=1",
        step="grid" if is_final else "calibrate",
        attempt_id=1,
        is_final=is_final,
    )
    layout.create()
    return layout


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _refusal(layout: AttemptLayout) -> OutputContractError:
    with pytest.raises(OutputContractError) as caught:
        discover_products(layout=layout)
    return caught.value


def test_final_step_products_are_typed_by_directory(tmp_path: Path) -> None:
    layout = _layout(tmp_path, is_final=True)
    out = layout.output_dir
    files = {
        "science/cube.fits": b"cube",
        "science/maps/deep/map.fits": b"map" * 1000,
        "qa/rms.json": b"{}",
        "plots/map.png": b"png",
        "statistics/summary.json": b"[]",
        "logs/grid.log": b"log line\n",
    }
    for relative, data in files.items():
        _write(out / relative, data)
    (out / "plots" / "empty-subdir").mkdir()
    _write(layout.step_workspace_dir / "scratch.tmp", b"ignored: the final step's products are in output/")

    products = discover_products(layout=layout)

    assert [p.relative_path for p in products] == sorted(files)
    types = {p.relative_path: p.product_type for p in products}
    assert types == {
        "science/cube.fits": "science",
        "science/maps/deep/map.fits": "science",
        "qa/rms.json": "qa_metric",
        "plots/map.png": "plot",
        "statistics/summary.json": "statistics",
        "logs/grid.log": "log",
    }
    big = next(p for p in products if p.relative_path == "science/maps/deep/map.fits")
    assert big == DiscoveredProduct(
        relative_path="science/maps/deep/map.fits",
        product_type="science",
        size=3000,
        sha256=hashlib.sha256(b"map" * 1000).hexdigest(),
        host_path=out / "science" / "maps" / "deep" / "map.fits",
    )


def test_intermediate_step_products(tmp_path: Path) -> None:
    layout = _layout(tmp_path, is_final=False)
    _write(layout.step_workspace_dir / "scan.cal.f32", b"\x00" * 2_500_000)
    _write(layout.step_workspace_dir / "meta" / "scan.cal.json", b'{"units": "K"}')
    _write(layout.output_dir / "science" / "not-mine.fits", b"an intermediate step's output is workspace/<step>/")

    products = discover_products(layout=layout)

    assert [(p.relative_path, p.product_type, p.size) for p in products] == [
        ("meta/scan.cal.json", "intermediate", 14),
        ("scan.cal.f32", "intermediate", 2_500_000),
    ]
    assert products[1].sha256 == hashlib.sha256(b"\x00" * 2_500_000).hexdigest()


def test_symlink_out_of_the_run_is_refused(tmp_path: Path) -> None:
    layout = _layout(tmp_path, is_final=True)
    _write(layout.output_dir / "science" / "good.fits", b"ok")
    (layout.output_dir / "science" / "passwd.fits").symlink_to("/etc/passwd")
    error = _refusal(layout)
    assert [p.relative_path for p in error.problems] == ["science/passwd.fits"]
    assert "science/passwd.fits" in str(error) and "/etc/passwd" in str(error) and "symbolic link" in str(error)


def test_every_symlink_is_refused_even_inside_the_output(tmp_path: Path) -> None:
    layout = _layout(tmp_path, is_final=False)
    _write(layout.step_workspace_dir / "real.dat", b"x")
    (layout.step_workspace_dir / "alias.dat").symlink_to("real.dat")
    (layout.step_workspace_dir / "linked-dir").symlink_to(layout.step_workspace_dir)
    error = _refusal(layout)
    assert [p.relative_path for p in error.problems] == ["alias.dat", "linked-dir"]


def test_fifo_is_refused(tmp_path: Path) -> None:
    layout = _layout(tmp_path, is_final=False)
    _write(layout.step_workspace_dir / "ok.dat", b"x")
    os.mkfifo(layout.step_workspace_dir / "pipe")
    error = _refusal(layout)
    assert [(p.relative_path, p.reason.split(";")[0]) for p in error.problems] == [("pipe", "named pipe (FIFO)")]


def test_socket_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = _layout(tmp_path, is_final=True)
    _write(layout.output_dir / "qa" / "ok.json", b"{}")
    monkeypatch.chdir(layout.output_dir / "qa")  # a relative name: AF_UNIX paths are limited to ~100 bytes
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("control.sock")
    error = _refusal(layout)
    assert error.problems[0].relative_path == "qa/control.sock" and "socket" in error.problems[0].reason


def test_stray_file_and_unknown_directory_in_output_are_refused(tmp_path: Path) -> None:
    layout = _layout(tmp_path, is_final=True)
    _write(layout.output_dir / "science" / "ok.fits", b"ok")
    _write(layout.output_dir / "README.txt", b"stray")
    _write(layout.output_dir / "misc" / "thing.dat", b"unknown type")
    error = _refusal(layout)
    assert [p.relative_path for p in error.problems] == ["README.txt", "misc/"]
    assert "file directly in output/" in error.problems[0].reason
    assert "unknown output directory" in error.problems[1].reason and "science/, qa/" in error.problems[1].reason


def test_all_offending_paths_are_listed_together(tmp_path: Path) -> None:
    layout = _layout(tmp_path, is_final=True)
    _write(layout.output_dir / "stray.txt", b"x")
    (layout.output_dir / "plots" / "deep").mkdir(parents=True)
    (layout.output_dir / "plots" / "deep" / "out.png").symlink_to("/tmp/elsewhere.png")
    os.mkfifo(layout.output_dir / "logs")
    error = _refusal(layout)
    assert [p.relative_path for p in error.problems] == ["logs", "plots/deep/out.png", "stray.txt"]
    message = str(error)
    assert "nothing of this attempt may be registered" in message
    assert all(f"  - {p.relative_path}: " in message for p in error.problems)


def test_final_step_writing_nothing_is_refused(tmp_path: Path) -> None:
    layout = _layout(tmp_path, is_final=True)
    (layout.output_dir / "science").mkdir()
    error = _refusal(layout)
    assert [p.relative_path for p in error.problems] == ["."]
    assert "wrote no file" in str(error) and str(layout.output_dir) in str(error)


def test_intermediate_step_writing_nothing_is_refused(tmp_path: Path) -> None:
    layout = _layout(tmp_path, is_final=False)
    (layout.step_workspace_dir / "empty").mkdir()
    error = _refusal(layout)
    assert "wrote no file" in error.problems[0].reason and "WORKFLOW_OUTPUT_DIR" in error.problems[0].reason
    assert str(layout.step_workspace_dir) in str(error)


def test_missing_output_directory_is_refused(tmp_path: Path) -> None:
    layout = attempt_layout(base_dir=tmp_path, pipeline="p", sub_group_key="k", step="s", attempt_id=1, is_final=False)
    assert "missing" in _refusal(layout).problems[0].reason


def test_names_with_control_characters_or_invalid_utf8_are_refused(tmp_path: Path) -> None:
    layout = _layout(tmp_path, is_final=False)
    _write(layout.step_workspace_dir / "line\nbreak.dat", b"x")
    with open(os.path.join(os.fsencode(layout.step_workspace_dir), b"latin1-\xe9.dat"), "wb") as handle:
        handle.write(b"x")
    error = _refusal(layout)
    reasons = sorted(p.reason for p in error.problems)
    assert len(reasons) == 2
    assert "control characters" in reasons[0] and "not valid UTF-8" in reasons[1]
