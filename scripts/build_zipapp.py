#!/usr/bin/env python3
"""Build ``dist/preloader.pyz``: the preloader and its pure-Python dependencies in one file.

The zipapp is how the preloader runs inside an inference server's image that does not
contain it (the postStart and ``preloader wait`` deployments in ``deploy/``): an
initContainer copies it into a shared ``emptyDir`` and the server image's own ``python3``
(3.10 or newer) runs it straight from the archive, with no install step and no writes.

Dependencies come from ``[project].dependencies`` in ``pyproject.toml``; they are fetched
as pure-Python wheels (``py3-none-any``) with ``pip install --target``. Compiled ones
(psutil) cannot be imported from a zip file, so they are left out and the preloader
treats them as optional at run time. The archive is reproducible: entries are sorted and
every timestamp is ``SOURCE_DATE_EPOCH`` (default 2000-01-01).

Usage::

    python scripts/build_zipapp.py [--output dist/preloader.pyz] [--python-version 3.10]
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipapp
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the build runs on 3.11+ here and in the Dockerfile
    tomllib = None

__all__ = [
    "COMPILED_OPTIONAL",
    "build",
    "main",
    "missing_marker_requirements",
    "runtime_requirements",
]

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "preloader"

#: Dependencies with compiled extensions: an extension module cannot be imported from a
#: zip file, so these stay out of the archive and the code imports them optionally.
COMPILED_OPTIONAL = frozenset({"psutil"})

#: Interpreters the archive must run on. pip evaluates environment markers against the
#: interpreter that runs it, not ``--python-version``, so requirements such as
#: ``exceptiongroup; python_version < "3.11"`` are resolved here for each of these.
TARGET_PYTHONS = ("3.10", "3.11", "3.12", "3.13", "3.14")

# Timestamps before 1980 cannot be stored in a zip file.
_DEFAULT_EPOCH = 946684800  # 2000-01-01T00:00:00Z

_MAIN = '''\
"""Entry point of preloader.pyz: ``python3 preloader.pyz COMMAND ...``."""

import runpy
import sys

if sys.version_info < (3, 10):
    sys.exit(
        "preloader.pyz needs Python 3.10 or newer; this is "
        + sys.version.split()[0]
        + " at "
        + sys.executable
    )
sys.argv[0] = "preloader"
runpy.run_module("preloader", run_name="__main__", alter_sys=True)
'''


def _requirement_name(requirement: str) -> str:
    """Return the normalised distribution name of a PEP 508 requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot parse requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def runtime_requirements(pyproject: Path) -> list[str]:
    """Return the dependencies to vendor: ``[project].dependencies`` minus compiled ones.

    :param pyproject: path of ``pyproject.toml``
    :return: requirement strings, in file order
    :raises RuntimeError: when run on Python < 3.11 (no ``tomllib``)
    """
    if tomllib is None:
        raise RuntimeError("building the zipapp needs Python 3.11+ (tomllib)")
    with pyproject.open("rb") as handle:
        project = tomllib.load(handle)["project"]
    return [
        requirement
        for requirement in project.get("dependencies", [])
        if _requirement_name(requirement) not in COMPILED_OPTIONAL
    ]


def _marker_class() -> Any:
    # The Docker build stage has no packaging, but pip vendors it.
    for module_name in ("packaging.markers", "pip._vendor.packaging.markers"):
        try:
            return importlib.import_module(module_name).Marker
        except ImportError:
            continue
    raise RuntimeError("evaluating markers needs packaging (or pip)")


def _dist_requirements(site: Path) -> Iterator[tuple[str, str]]:
    """Yield ``(requirement, marker)`` for every ``Requires-Dist`` in ``site``."""
    for metadata in sorted(site.glob("*.dist-info/METADATA")):
        for line in metadata.read_text(encoding="utf-8").splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            requirement, _, marker = line[len("Requires-Dist:") :].partition(";")
            yield requirement.strip(), marker.strip()


def _installed(site: Path) -> set[str]:
    names = set()
    for dist_info in site.glob("*.dist-info"):
        names.add(_requirement_name(dist_info.name.removesuffix(".dist-info").rsplit("-", 1)[0]))
    return names


def missing_marker_requirements(site: Path, pythons: Iterable[str]) -> list[str]:
    """Requirements that some target Python needs but that are not installed in ``site``.

    Extras (``extra == "..."``) are never wanted; platform markers are evaluated for
    Linux. Compiled optional packages are skipped.

    :param site: the ``pip install --target`` folder
    :param pythons: ``"3.10"``-style versions the archive must support
    :return: requirement strings to install as well
    """
    marker_class = _marker_class()
    installed = _installed(site)
    wanted: dict[str, str] = {}
    for requirement, marker in _dist_requirements(site):
        name = _requirement_name(requirement)
        if name in installed or name in COMPILED_OPTIONAL or name in wanted:
            continue
        if not marker:
            wanted[name] = requirement
            continue
        parsed = marker_class(marker)
        for python in pythons:
            environment = {
                "python_version": python,
                "python_full_version": python + ".0",
                "sys_platform": "linux",
                "platform_system": "Linux",
                "os_name": "posix",
                "implementation_name": "cpython",
                "platform_python_implementation": "CPython",
                "extra": "",
            }
            if parsed.evaluate(environment):
                wanted[name] = requirement
                break
    return sorted(wanted.values())


def _pip_install(site: Path, requirements: list[str], python_version: str) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-compile",
        "--target",
        str(site),
        # Pure-Python wheels only: a compiled dependency makes this fail loudly, so it
        # gets added to COMPILED_OPTIONAL (and made optional in the code) on purpose.
        "--only-binary=:all:",
        "--platform",
        "any",
        "--implementation",
        "py",
        "--abi",
        "none",
        "--python-version",
        python_version,
        "--upgrade",
        *requirements,
    ]
    subprocess.run(command, check=True)


def _copy_package(source: Path, destination: Path) -> None:
    shutil.copytree(
        source,
        destination,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"),
    )


def _read_version(package_dir: Path) -> str:
    text = (package_dir / "_version.py").read_text(encoding="utf-8")
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    if match is None:
        raise RuntimeError(f"no __version__ in {package_dir / '_version.py'}")
    return match.group(1)


def _write_dist_info(site: Path, version: str, license_file: Path) -> None:
    # Lets importlib.metadata.version("preloader") answer inside the archive too, and
    # carries the license as a wheel's dist-info does (licenses/LICENSE).
    dist_info = site / f"{PACKAGE}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "licenses").mkdir()
    shutil.copyfile(license_file, dist_info / "licenses" / "LICENSE")
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {version}\n", encoding="utf-8"
    )
    (dist_info / "INSTALLER").write_text("build_zipapp\n", encoding="utf-8")


def _prune(site: Path) -> None:
    for path in [site / "bin", *site.rglob("__pycache__")]:
        if path.exists():
            shutil.rmtree(path)
    for path in site.rglob("*"):
        if path.suffix in {".so", ".pyd", ".pyc"} and path.is_file():
            path.unlink()


def _write_zip(site: Path, target: Path, epoch: int) -> None:
    """Zip ``site`` reproducibly: sorted entries, one timestamp, fixed permissions."""
    date_time = time.gmtime(epoch)[:6]
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in site.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(site).as_posix(), date_time=date_time)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes())


def build(
    output: Path,
    *,
    root: Path = ROOT,
    python_version: str = TARGET_PYTHONS[0],
    epoch: int | None = None,
) -> Path:
    """Build the zipapp.

    :param output: path of the ``.pyz`` to write (its folder is created)
    :param root: the source checkout (holds ``pyproject.toml``, ``LICENSE`` and ``preloader/``)
    :param python_version: oldest Python the archive must run on
    :param epoch: timestamp for every entry; default ``$SOURCE_DATE_EPOCH`` or 2000-01-01
    :return: ``output``
    """
    if epoch is None:
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", _DEFAULT_EPOCH))
    pythons = [p for p in TARGET_PYTHONS if _version_key(p) >= _version_key(python_version)]
    with tempfile.TemporaryDirectory(prefix="preloader-zipapp-") as tmp:
        site = Path(tmp) / "app"
        site.mkdir()
        _pip_install(site, runtime_requirements(root / "pyproject.toml"), python_version)
        # Close the set over every target interpreter's markers (pip only used its own).
        for _ in range(10):
            missing = missing_marker_requirements(site, pythons)
            if not missing:
                break
            _pip_install(site, missing, python_version)
        else:  # pragma: no cover - a dependency cycle through markers
            raise RuntimeError(f"marker requirements did not settle: {missing}")
        _prune(site)
        _copy_package(root / PACKAGE, site / PACKAGE)
        _write_dist_info(site, _read_version(root / PACKAGE), root / "LICENSE")
        (site / "__main__.py").write_text(_MAIN, encoding="utf-8")
        plain_zip = Path(tmp) / "app.zip"
        _write_zip(site, plain_zip, epoch)
        output.parent.mkdir(parents=True, exist_ok=True)
        # Given an archive, zipapp copies it behind the shebang line.
        zipapp.create_archive(plain_zip, target=output, interpreter="/usr/bin/env python3")
    output.chmod(0o755)
    return output


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def main(argv: list[str] | None = None) -> int:
    """Command line: build the archive and print its path and size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "dist" / "preloader.pyz")
    parser.add_argument(
        "--python-version",
        default=TARGET_PYTHONS[0],
        help="oldest Python the archive must run on (default %(default)s)",
    )
    args = parser.parse_args(argv)
    output = build(args.output, python_version=args.python_version)
    print(f"{output} ({output.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
