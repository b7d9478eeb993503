"""The README's first two commands, copied verbatim, on Debian's own python3 (PEP 668).

Debian's and Ubuntu's ``/usr/bin/python3`` carry an ``EXTERNALLY-MANAGED`` marker: a
plain ``python3 -m pip install .`` stops with "externally-managed-environment". Each
test runs the commands in a copy of this checkout (what ``git ls-files`` lists, as a
clone has it) with ``python3`` on ``PATH`` being the interpreter under test, and no
``VIRTUAL_ENV``, ``PYTHONPATH`` or ``PIP_BREAK_SYSTEM_PACKAGES`` leaking in.

The install-and-demo command runs as written, the demo shrunk through its documented
``PRELOADER_DEMO_SIZE``. The test command runs with ``--setup-only``: its Debian-package
check, its virtual environment and its install, then it stops, so the suite does not run
itself again. Where ``python3`` is not externally managed, the test command is what CI
runs (``.ci/run``) on every change, so only the first command is repeated here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from preloader import __version__

from ..lib import manifests as dm

DEBIAN_PYTHON = "/usr/bin/python3"
INSTALL_SECONDS = 900  # a bound for pip on a loaded machine, never a synchronisation


def readme_commands() -> tuple[str, str]:
    """The two indented command lines at the top of the README, before its contents."""
    top = (dm.REPO / "README.md").read_text().split("\n## ", 1)[0]
    commands = re.findall(r"^ {4}(\S.*)$", top, flags=re.MULTILINE)
    assert len(commands) == 2, commands
    return commands[0], commands[1]


def _probe(python: str, code: str) -> str:
    return subprocess.run(
        [python, "-c", code], cwd="/", capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()  # cwd /: `python -c` imports from its working directory


def externally_managed(python: str) -> bool:
    """Whether ``python`` refuses pip installs outside a virtual environment (PEP 668)."""
    code = (
        "import os, sys, sysconfig; print(sys.prefix == sys.base_prefix and "
        "os.path.isfile(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))"
    )
    return _probe(python, code) == "True"


@dataclass(frozen=True)
class Checkout:
    """A copy of the checkout and the environment in which ``python3`` is ``python``."""

    root: Path
    python: str
    env: dict[str, str]

    def run(self, command: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", command],
            cwd=self.root,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=INSTALL_SECONDS,
            check=False,
        )


def make_checkout(python: str, workdir: Path) -> Checkout:
    """Copy the checkout's files to ``workdir/checkout``; put ``python`` on PATH as python3."""
    if shutil.which("git") is None or not (dm.REPO / ".git").exists():
        pytest.skip("needs a git checkout to copy its files")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=dm.REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    root = workdir / "checkout"
    for name in filter(None, listed.split("\0")):
        source = dm.REPO / name
        if source.is_file():  # not a file deleted in the work tree but still in the index
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    bindir = workdir / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(python)
    leaking = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PIP_BREAK_SYSTEM_PACKAGES", "MODEL_DIR"}
    env = {
        k: v for k, v in os.environ.items() if k not in leaking and not k.startswith("PRELOADER_")
    }
    env["PATH"] = f"{bindir}:/usr/bin:/bin"
    return Checkout(root, python, env)


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    """A folder on disk (a virtual environment with the dev extra is hundreds of MB, and
    /tmp may be memory), deleted afterwards."""
    path = Path(tempfile.mkdtemp(prefix="preloader-quickstart-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _needs_venv(python: str) -> None:
    if subprocess.run([python, "-m", "ensurepip", "--version"], capture_output=True).returncode:
        pytest.skip(f"{python} has no ensurepip (Debian: apt-get install python3-venv)")


def _assert_first_command_worked(
    checkout: Checkout, result: subprocess.CompletedProcess[str]
) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "externally-managed-environment" not in output
    assert re.search(r"^after warm:\s+100\.0% resident$", result.stdout, re.MULTILINE), output
    base = _probe(
        str(checkout.root / ".venv" / "bin" / "python"), "import sys; print(sys.base_prefix)"
    )
    assert base == _probe(checkout.python, "import sys; print(sys.base_prefix)")


@pytest.fixture(scope="module")
def debian_checkout() -> Iterator[tuple[Checkout, subprocess.CompletedProcess[str]]]:
    """A checkout after the first README command ran with Debian's python3."""
    if not os.access(DEBIAN_PYTHON, os.X_OK) or not externally_managed(DEBIAN_PYTHON):
        pytest.skip(f"{DEBIAN_PYTHON} is not an externally managed Python here")
    _needs_venv(DEBIAN_PYTHON)
    with _scratch() as workdir:
        checkout = make_checkout(DEBIAN_PYTHON, workdir)
        first, _ = readme_commands()
        yield checkout, checkout.run(first, PRELOADER_DEMO_SIZE="16MiB")


@pytest.mark.timeout(INSTALL_SECONDS)
def test_the_old_command_is_refused_by_debians_python(
    debian_checkout: tuple[Checkout, subprocess.CompletedProcess[str]],
) -> None:
    """The premise: on this interpreter a plain pip install fails (PEP 668)."""
    checkout, _ = debian_checkout
    old = checkout.run("python3 -m pip install --dry-run --no-deps .")
    assert old.returncode != 0
    assert "externally-managed-environment" in old.stdout + old.stderr


@pytest.mark.timeout(INSTALL_SECONDS)
def test_install_and_demo_on_debians_python(
    debian_checkout: tuple[Checkout, subprocess.CompletedProcess[str]],
) -> None:
    checkout, result = debian_checkout
    _assert_first_command_worked(checkout, result)


@pytest.mark.timeout(INSTALL_SECONDS)
def test_install_and_demo_on_a_python_that_is_not_managed() -> None:
    python = getattr(sys, "_base_executable", sys.executable)
    if externally_managed(python):
        pytest.skip(f"{python} is externally managed too")
    _needs_venv(python)
    with _scratch() as workdir:
        checkout = make_checkout(python, workdir)
        first, _ = readme_commands()
        _assert_first_command_worked(checkout, checkout.run(first, PRELOADER_DEMO_SIZE="16MiB"))


@pytest.mark.timeout(INSTALL_SECONDS)
def test_the_test_command_sets_up_on_debians_python(
    debian_checkout: tuple[Checkout, subprocess.CompletedProcess[str]],
) -> None:
    """After the first command, as a reader goes on: the dev extra joins the same .venv."""
    checkout, _ = debian_checkout
    _, second = readme_commands()
    result = checkout.run(f"{second} --setup-only")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "externally-managed-environment" not in output
    assert "== pytest" not in output  # set-up only: the suite does not run itself
    venv = checkout.root / ".venv" / "bin"
    version = subprocess.run(
        [str(venv / "preloader"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.stdout.split()[-1] == __version__, version
    for tool in ("pytest", "ruff", "mypy"):  # the dev extra the checks need
        assert subprocess.run([str(venv / tool), "--version"], capture_output=True).returncode == 0
    # Editable: the venv imports the copy's package, so the checks test the checkout.
    where = _probe(str(venv / "python"), "import preloader; print(preloader.__file__)")
    assert Path(where).is_relative_to(checkout.root)
