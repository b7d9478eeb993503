"""The shell around the zipapp in the manifests, run for real.

The postStart hook must never fail (a failing hook kills the server container), must
warm the model with the server image's python3, and must say why when it cannot. The
`preloader wait` prefix of deploy/sidecar-wait must hold the server until /readyz.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import pytest

from ..lib import manifests as dm
from ..lib.net import free_port
from ..lib.residency import fincore_resident_bytes

MiB = 1024 * 1024
MANIFEST_PYZ = "/opt/preloader-bin/preloader.pyz"


def _server(folder: str) -> dict[str, Any]:
    for _, spec in dm.pod_specs(dm.render(folder)):
        for container in spec["containers"]:
            if container["name"] == "sglang":
                return dict(container)
    raise AssertionError(folder)


def _hook_script(container_log: str) -> list[str]:
    """The hook, with the zipapp and the container's stderr (PID 1's) moved here."""
    command = _server("poststart")["lifecycle"]["postStart"]["exec"]["command"]
    assert "/proc/1/fd/2" in command[-1]
    return [
        part.replace(MANIFEST_PYZ, str(dm.zipapp())).replace("/proc/1/fd/2", container_log)
        for part in command
    ]


def _bin_dir(with_python: bool) -> Path:
    """A PATH folder with the shell tools, and python3 only when asked."""
    folder = dm.shared_tmpdir("preloader-bin-")
    for tool in ("sh", "cat", "echo"):
        found = shutil.which(tool)
        if found:
            (folder / tool).symlink_to(found)
    if with_python:
        python = dm.system_python()
        if python is None:
            pytest.skip(dm.NO_SYSTEM_PYTHON)
        (folder / "python3").symlink_to(python)
    return folder


def _run_hook(env: dict[str, str], container_log: Path | None = None) -> tuple[int, str]:
    """Run the hook; return its exit status and what reached the container's log.

    With ``container_log`` None the log target is not writable, so the hook's output
    stays on its own stderr, which is returned instead.
    """
    target = str(container_log) if container_log else "/nonexistent/container-stderr"
    script = _hook_script(target)
    result = subprocess.run(
        ["/bin/sh", *script[1:]],
        capture_output=True,
        text=True,
        env={"LANG": "C.UTF-8", **env},
        timeout=120,
        check=False,
    )
    if container_log is None:
        return result.returncode, result.stderr
    assert result.stderr == "", "everything goes to the container's log"
    return result.returncode, container_log.read_text()


def _cold_model(tmp_path: Path) -> Path:
    model = tmp_path / "DeepSeek-R1-0528"
    model.mkdir()
    for index in range(2):
        (model / f"model-0000{index + 1}-of-00002.safetensors").write_bytes(os.urandom(2 * MiB))
    for path in model.iterdir():
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return model


def test_hook_warms_the_model_with_the_servers_python(tmp_path: Path) -> None:
    model = _cold_model(tmp_path)
    env = _server("poststart")["env"]
    log = tmp_path / "container.log"
    log.touch()
    status, logged = _run_hook(
        {
            "PATH": str(_bin_dir(with_python=True)),
            **{e["name"]: e["value"] for e in env},
            "MODEL_DIR": str(model),
        },
        container_log=log,
    )
    assert status == 0, logged
    assert fincore_resident_bytes(*model.iterdir()) == sum(
        p.stat().st_size for p in model.iterdir()
    )
    # PRELOADER_LOG_FORMAT=json in the manifest: the container log gets JSON lines.
    lines = [line for line in logged.splitlines() if line.strip()]
    assert lines, "the warm-up logged nothing to the container's log"
    for line in lines:
        json.loads(line)


def test_hook_skips_when_model_dir_is_unset_or_missing(tmp_path: Path) -> None:
    bin_dir = str(_bin_dir(with_python=True))
    assert _run_hook({"PATH": bin_dir})[0] == 0
    status, logged = _run_hook({"PATH": bin_dir, "MODEL_DIR": str(tmp_path / "absent")})
    assert status == 0, logged


def test_hook_never_fails_without_python3(tmp_path: Path) -> None:
    log = tmp_path / "container.log"
    log.touch()
    env = {"PATH": str(_bin_dir(with_python=False)), "MODEL_DIR": str(tmp_path)}
    status, logged = _run_hook(env, container_log=log)
    assert status == 0
    assert "python3 not found" in logged


def test_hook_never_fails_when_the_preloader_crashes(tmp_path: Path) -> None:
    broken = _bin_dir(with_python=False)
    (broken / "python3").write_text("#!/bin/sh\necho boom >&2\nexit 1\n")
    (broken / "python3").chmod(0o755)
    status, logged = _run_hook({"PATH": str(broken), "MODEL_DIR": str(tmp_path)})
    assert status == 0
    assert "boom" in logged
    assert "the server loads cold" in logged


def test_wait_prefix_holds_the_server_until_ready(tmp_path: Path) -> None:
    from preloader import cli as cli_module

    commands = cli_module.cli.list_commands(click.Context(cli_module.cli))
    assert "serve" in commands, f"`preloader serve` is not a command of the CLI: {commands}"
    model = _cold_model(tmp_path)
    port = free_port()
    script = _server("sidecar-wait")["command"][-1]
    script = script.replace(MANIFEST_PYZ, str(dm.zipapp()))
    script = script.replace(":9400/", f":{port}/").replace("--timeout 7200", "--timeout 60")
    script = script.replace("exec python3 -m sglang.launch_server", "exec echo server-started; : ")
    agent = subprocess.Popen(
        [sys.executable, "-m", "preloader", "serve"],
        env={**os.environ, "MODEL_DIR": str(model), "PRELOADER_PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        started = time.monotonic()
        result = subprocess.run(
            ["/bin/sh", "-c", script],
            capture_output=True,
            text=True,
            env={"PATH": f"{_bin_dir(with_python=True)}:/usr/bin:/bin"},
            timeout=90,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "server-started"
        assert time.monotonic() - started < 60
        assert fincore_resident_bytes(*model.iterdir()) == sum(
            p.stat().st_size for p in model.iterdir()
        )
    finally:
        agent.terminate()
        agent.wait(timeout=10)
