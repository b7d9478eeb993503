"""The documentation site builds strictly and its generated pages cover the code.

``mkdocs build --strict`` fails on a dead link, a missing anchor or a page left out of the
navigation. The command line page is generated from the click group and the API page from
``preloader.__all__``; a command or a public name that the generators skipped (the group
loads its commands lazily, the package imports its names lazily) would leave a page that
builds and says less than the code, so both are checked against the code here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

import preloader
from preloader.cli.app import cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert built.returncode == 0, built.stderr[-4000:]
    return out


def test_the_cli_page_shows_every_command_with_its_help(site: Path) -> None:
    page = (site / "cli" / "index.html").read_text()
    ids = set(re.findall(r'<h[23] id="([^"]+)"', page))
    with click.Context(cli) as ctx:
        names = cli.list_commands(ctx)
    assert len(names) >= 7, names
    for name in names:
        assert f"preloader-{name}" in ids, name
    for variable in ("PRELOADER_CONC", "PRELOADER_START_LEAD", "PRELOADER_WAIT_URL"):
        assert variable in page, variable  # --help's own text, env twins included


def test_the_api_page_documents_every_public_name(site: Path) -> None:
    page = (site / "api" / "index.html").read_text()
    ids = set(re.findall(r'id="(preloader\.[A-Za-z_]+)"', page))
    for name in preloader.__all__:
        if name != "__version__":
            assert f"preloader.{name}" in ids, name


def test_the_reliability_page_states_the_grace_periods_the_code_uses() -> None:
    from preloader import cli
    from preloader.engine import reading

    page = (REPO / "docs" / "reliability.md").read_text()
    signals = " ".join(page.split("## Signals", 1)[1].split("\n## ", 1)[0].split())
    assert f"abandoned {reading.STOP_GRACE_SECONDS:g} s after the first signal" in signals
    assert f"cancelled {cli.SHUTDOWN_GRACE_SECONDS:g} s after it" in signals
