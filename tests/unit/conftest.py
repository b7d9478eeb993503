"""tests/unit/ holds pure logic: a test here that starts a process, mounts or opens a
network socket fails, naming what it did and where such a test belongs instead."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from typing import Any, NoReturn

import pytest


def _refuse(what: str) -> Callable[..., NoReturn]:
    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError(
            f"tests/unit/ is for pure logic, and this test called {what}: move it to the "
            "folder of what it touches (tests/kernel/, tests/cli/, tests/serve/, tests/fuse/ ...)"
        )

    return refuse


@pytest.fixture(autouse=True)
def _no_processes_mounts_or_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way to start a process (a mount helper among them) or use a network
    socket raise for the duration of each unit test."""
    monkeypatch.setattr(subprocess, "Popen", _refuse("subprocess.Popen"))
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "execv", "execve"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, _refuse(f"os.{name}"))
    for name in ("bind", "connect", "connect_ex", "listen"):
        monkeypatch.setattr(socket.socket, name, _refuse(f"socket.{name}"))
