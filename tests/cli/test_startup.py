"""Start-up: each command imports what it uses and nothing more.

A behaviour, not a timing: ``python -X importtime`` names every module a real CLI run
imports (on stderr, one ``import time: ... | name`` line each), and the short commands
must never have loaded the HTTP server, Prometheus, the Kubernetes client or a progress
bar library; ``--version`` not even click.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..lib.cli import cli_env

# (rich is not listed: structlog tries it, and -X importtime reports the failed attempt.)
SERVER_SIDE = ("uvicorn", "starlette", "prometheus_client", "lightkube", "httpx2", "tqdm")


def imported_by(*args: str, env: dict[str, str] | None = None) -> tuple[int, set[str], str]:
    """Run ``preloader ARGS`` with ``-X importtime``: exit code, top-level packages, stdout."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "preloader", *args],
        capture_output=True,
        text=True,
        env=cli_env(env),
        timeout=120,
    )
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return proc.returncode, modules, proc.stdout


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


@pytest.fixture
def tiny_tree(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    root.mkdir()
    (root / "model.safetensors").write_bytes(b"\0" * 8192)
    (root / "config.json").write_text("{}")
    return root


@pytest.mark.parametrize("command", ["warm", "status", "evict", "plan"])
def test_short_commands_never_load_the_server_side(tiny_tree: Path, command: str) -> None:
    code, modules, _ = imported_by(command, str(tiny_tree))
    assert code == 0
    assert "preloader" in top_level(modules), "the run imported nothing: the probe is broken"
    assert not top_level(modules) & set(SERVER_SIDE)


def test_warm_loads_only_its_own_command(tiny_tree: Path) -> None:
    code, modules, _ = imported_by("warm", "--json", str(tiny_tree))
    assert code == 0
    assert "preloader.cli.warm" in modules
    assert not {"preloader.cli.serve", "preloader.cli.demo", "preloader.serve"} & modules
    assert "preloader.agent" not in modules


def test_an_unknown_variable_is_still_told_when_it_needs_every_command(tiny_tree: Path) -> None:
    # The misspelling check loads the other commands only when a name is left over.
    proc = subprocess.run(
        [sys.executable, "-m", "preloader", "status", str(tiny_tree)],
        capture_output=True,
        text=True,
        env=cli_env({"PRELOADER_PORTT": "9400", "PRELOADER_CONC": "2"}),
        timeout=120,
    )
    assert proc.returncode == 0
    assert '"did_you_mean": "PRELOADER_PORT"' in proc.stderr
    assert "PRELOADER_CONC" not in proc.stderr.replace('"PRELOADER_PORTT"', "")


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_imports_no_click(flag: str) -> None:
    code, modules, out = imported_by(flag)
    assert code == 0
    assert out.startswith("preloader, version ")
    assert "click" not in top_level(modules)
    assert not top_level(modules) & {"structlog", "anyio", "asyncio"}


def test_version_after_a_group_option_is_click_s_answer() -> None:
    code, modules, out = imported_by("--log-level", "debug", "--version")
    assert code == 0
    assert out == imported_by("--version")[2]
    assert "click" in top_level(modules)


def test_importing_the_package_loads_only_its_version() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys, preloader; print(json.dumps(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        check=True,
        timeout=60,
    ).stdout
    loaded = {name for name in json.loads(out) if name.startswith("preloader")}
    assert loaded == {"preloader", "preloader._version"}


def test_the_lazy_package_names_resolve() -> None:
    import preloader

    for name in preloader.__all__:
        assert getattr(preloader, name) is not None, name
    assert os.path.basename(preloader.warm.__code__.co_filename) == "api.py"


@pytest.mark.parametrize("command", ["warm", "status"])
def test_garbage_is_collected_again_once_the_command_runs(tiny_tree: Path, command: str) -> None:
    # main() turns collection off for the imports; the command's own work (a serve that
    # runs for weeks) must run with it back on, everything made during start-up frozen.
    # finish() leaves by os._exit while a worker thread lingers (more likely on a busy
    # machine), which skips atexit: the probe reports on whichever way out is taken.
    probe = (
        "import atexit, gc, os, sys\n"
        "import preloader.cli as cli\n"
        "report = lambda: print('gc', gc.isenabled(), gc.get_freeze_count() > 0,"
        " file=sys.stderr, flush=True)\n"
        "atexit.register(report)\n"
        "real_exit = os._exit\n"
        "def _exit(code):\n"
        "    report()\n"
        "    real_exit(code)\n"
        "os._exit = _exit\n"
        f"sys.argv = ['preloader', {command!r}, {str(tiny_tree)!r}]\n"
        "cli.main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=cli_env(), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("gc ")] == ["gc True True"]


def test_collection_left_on_by_an_embedder_is_not_frozen() -> None:
    # click's test runner (and any embedding) calls the group without main(): collection
    # is on when the command starts, and end_startup must leave it as it is. (In-process:
    # a real command would end in finish(), which exits the whole test process.)
    import gc

    from preloader.cli.outcome import end_startup

    frozen = gc.get_freeze_count()
    assert gc.isenabled()
    end_startup()
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen
