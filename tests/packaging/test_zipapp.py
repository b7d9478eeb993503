"""scripts/build_zipapp.py: one file that runs under any python3 >= 3.10 with nothing installed.

The postStart and `preloader wait` deployments copy dist/preloader.pyz into a server
image and run it with that image's python3, so these tests run it the same way: with the
system python3 in a fresh virtual environment that has none of our dependencies.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from ..lib import manifests as dm

MiB = 1024 * 1024


def _build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_zipapp_under_test", dm.REPO / "scripts" / "build_zipapp.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_zipapp = _build_module()


def _write_dist_info(site: Path, name: str, requires: list[str]) -> None:
    dist_info = site / f"{name}-1.0.dist-info"
    dist_info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (dist_info / "METADATA").write_text("\n".join(lines) + "\n")


def test_vendors_the_declared_dependencies_but_not_compiled_ones() -> None:
    requirements = build_zipapp.runtime_requirements(dm.REPO / "pyproject.toml")
    names = {build_zipapp._requirement_name(r) for r in requirements}
    assert {"anyio", "click"} <= names
    assert "psutil" not in names


def test_marker_requirements_are_resolved_for_every_target_python(tmp_path: Path) -> None:
    # pip evaluates markers for the interpreter running it only; the archive must still
    # carry what 3.10 needs.
    _write_dist_info(
        tmp_path,
        "anyio",
        [
            'exceptiongroup>=1.0.2; python_version < "3.11"',
            "idna>=2.8",
            'trio>=0.32; extra == "trio"',
            'colorama; platform_system == "Windows"',
            "psutil>=5",
        ],
    )
    _write_dist_info(tmp_path, "idna", [])
    assert build_zipapp.missing_marker_requirements(tmp_path, ["3.10", "3.12"]) == [
        "exceptiongroup>=1.0.2"
    ]
    assert build_zipapp.missing_marker_requirements(tmp_path, ["3.11", "3.12"]) == []


def test_zip_writing_is_reproducible(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg" / "b.py").write_text("B = 1\n")
    (site / "a.py").write_text("A = 1\n")
    first, second = tmp_path / "1.zip", tmp_path / "2.zip"
    build_zipapp._write_zip(site, first, 946684800)
    os.utime(site / "a.py", (0, 0))
    build_zipapp._write_zip(site, second, 946684800)
    assert first.read_bytes() == second.read_bytes()
    assert zipfile.ZipFile(first).namelist() == ["a.py", "pkg/b.py"]


def test_archive_holds_pure_python_only() -> None:
    archive = dm.zipapp()
    assert archive.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    names = zipfile.ZipFile(archive).namelist()
    assert "__main__.py" in names
    assert "preloader/cli/__init__.py" in names
    assert not [n for n in names if n.endswith((".so", ".pyd", ".pyc"))]
    assert not [n for n in names if n.startswith(("psutil", "bin/"))]
    assert any(n.startswith("exceptiongroup/") for n in names), "needed on Python 3.10"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv of the system python3, without pip and without our dependencies."""
    base = dm.system_python()
    if base is None:
        pytest.skip(dm.NO_SYSTEM_PYTHON)
    venv = tmp_path_factory.mktemp("bare-venv")
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv / "bin" / "python"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    for index, size in enumerate((3 * MiB, 1 * MiB + 123)):
        (model / f"model-0000{index + 1}-of-00002.safetensors").write_bytes(os.urandom(size))
    (model / "config.json").write_text('{"architectures": ["Demo"]}\n')
    return model


def _run(
    python: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base_env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run(
        [str(python), str(dm.zipapp()), *args],
        capture_output=True,
        text=True,
        env={**base_env, **(env or {})},
        timeout=60,
        check=False,
    )


def test_bare_venv_really_lacks_our_dependencies(bare_python: Path) -> None:
    for module in ("anyio", "click", "structlog", "prometheus_client", "tqdm", "psutil"):
        probe = subprocess.run(
            [str(bare_python), "-c", f"import {module}"], capture_output=True, check=False
        )
        assert probe.returncode != 0, module


def test_version(bare_python: Path) -> None:
    result = _run(bare_python, "--version")
    assert result.returncode == 0, result.stderr
    version = build_zipapp._read_version(dm.REPO / "preloader")
    assert version in result.stdout


def test_warm_then_status_report_the_real_bytes(bare_python: Path, model_dir: Path) -> None:
    total = sum(p.stat().st_size for p in model_dir.iterdir())
    warm = _run(bare_python, "warm", "--json", str(model_dir))
    assert warm.returncode == 0, warm.stderr
    report = json.loads(warm.stdout)
    assert report["files"] == 3
    assert report["bytes"] == total
    assert report["errors"] == 0
    # Run as root on root's files: residency is measured, and the files were just read.
    assert report["resident_bytes"] == total

    status = _run(bare_python, "status", "--json", str(model_dir))
    assert status.returncode == 0, status.stderr
    residency = json.loads(status.stdout)
    assert residency["files"] == 3
    assert residency["bytes"] == total
    assert residency["resident_bytes"] == total


def test_model_dir_from_env_and_skip_when_unset(bare_python: Path, model_dir: Path) -> None:
    warm = _run(bare_python, "warm", "--json", env={"MODEL_DIR": str(model_dir)})
    assert warm.returncode == 0, warm.stderr
    assert json.loads(warm.stdout)["files"] == 3
    skipped = _run(bare_python, "warm", "--best-effort")
    assert skipped.returncode == 0, skipped.stderr
    assert "skip" in (skipped.stdout + skipped.stderr).lower()
