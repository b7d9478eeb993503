"""The release artefacts, built as a release builds them: sdist, wheel and zipapp.

`python -m build` makes the sdist and the wheel (in an isolated build environment, as a
release does), `twine check --strict` holds their metadata to what PyPI accepts, and
scripts/build_zipapp.py makes preloader.pyz. Each artefact carries the Apache-2.0 LICENSE
that pyproject.toml names, and each reports the package's own version.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from ..lib import manifests as dm

LICENSE = dm.REPO / "LICENSE"


def _version() -> str:
    text = (dm.REPO / "preloader" / "_version.py").read_text()
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    assert match is not None
    return match.group(1)


def test_license_is_the_full_apache_2_text() -> None:
    text = LICENSE.read_text()
    assert 'license = "Apache-2.0"' in (dm.REPO / "pyproject.toml").read_text()
    assert "Apache License\n" in text and "Version 2.0, January 2004" in text
    # All nine sections of the terms, the end marker and the appendix: the whole text.
    for number, title in enumerate(
        (
            "Definitions",
            "Grant of Copyright License",
            "Grant of Patent License",
            "Redistribution",
            "Submission of Contributions",
            "Trademarks",
            "Disclaimer of Warranty",
            "Limitation of Liability",
            "Accepting Warranty or Additional Liability",
        ),
        start=1,
    ):
        assert f"{number}. {title}." in text, title
    assert "END OF TERMS AND CONDITIONS" in text
    assert "APPENDIX: How to apply the Apache License to your work." in text


@pytest.fixture(scope="module")
def dist() -> Path:
    """sdist, wheel and zipapp in one folder, as a release job would upload them."""
    out = dm.shared_tmpdir("preloader-release-")
    env = {**os.environ, "SOURCE_DATE_EPOCH": "946684800"}
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(dm.REPO)],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    subprocess.run(
        [
            sys.executable,
            str(dm.REPO / "scripts" / "build_zipapp.py"),
            "--output",
            str(out / "preloader.pyz"),
        ],
        check=True,
        env=env,
        timeout=300,
    )
    return out


def test_build_makes_one_sdist_and_one_wheel_that_twine_accepts(dist: Path) -> None:
    version = _version()
    assert sorted(p.name for p in dist.iterdir()) == sorted(
        [
            f"preloader-{version}.tar.gz",
            f"preloader-{version}-py3-none-any.whl",
            "preloader.pyz",
        ]
    )
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "twine",
            "check",
            "--strict",
            str(dist / f"preloader-{version}.tar.gz"),
            str(dist / f"preloader-{version}-py3-none-any.whl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("PASSED") == 2, check.stdout


def test_wheel_carries_the_package_license_and_entry_point(dist: Path) -> None:
    version = _version()
    with zipfile.ZipFile(dist / f"preloader-{version}-py3-none-any.whl") as wheel:
        names = set(wheel.namelist())
        info = f"preloader-{version}.dist-info"
        assert f"{info}/licenses/LICENSE" in names
        assert wheel.read(f"{info}/licenses/LICENSE") == LICENSE.read_bytes()
        metadata = wheel.read(f"{info}/METADATA").decode()
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata
    assert "preloader = preloader.cli:main" in entry_points
    # Every module of the package, and its type marker.
    sources = {
        p.relative_to(dm.REPO).as_posix()
        for p in (dm.REPO / "preloader").rglob("*")
        if p.suffix == ".py" or p.name == "py.typed"
    }
    assert sources and sources <= names, sorted(sources - names)
    assert not any(n.startswith(("tests/", "bench/", "deploy/")) for n in names)


def test_sdist_carries_the_license_and_builds_from_itself(dist: Path) -> None:
    version = _version()
    with tarfile.open(dist / f"preloader-{version}.tar.gz") as sdist:
        names = set(sdist.getnames())
        member = sdist.extractfile(f"preloader-{version}/LICENSE")
        assert member is not None
        assert member.read() == LICENSE.read_bytes()
    assert f"preloader-{version}/pyproject.toml" in names
    assert f"preloader-{version}/preloader/__main__.py" in names


def test_zipapp_reports_the_release_version_and_carries_the_license(dist: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(dist / "preloader.pyz"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert version_of(result.stdout) == _version()
    with zipfile.ZipFile(dist / "preloader.pyz") as archive:
        license_text = archive.read(f"preloader-{_version()}.dist-info/licenses/LICENSE")
    assert license_text == LICENSE.read_bytes()


def version_of(output: str) -> str:
    """The version number in a ``--version`` line."""
    match = re.search(r"\d+\.\d+\.\d+\S*", output)
    assert match is not None, output
    return match.group(0)
