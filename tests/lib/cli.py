"""The real ``preloader`` CLI in child processes: one-shot runs and background runs.

Child processes import this checkout's preloader, even where another checkout is
pip-installed in editable mode (several worktrees share one interpreter here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

NOBODY = 65534
AS_USER = str(Path(__file__).with_name("as_user.py"))
REPO = str(Path(__file__).resolve().parents[2])


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment run_cli uses: no PRELOADER_* or MODEL_DIR leaking in, JSON logs."""
    base = {
        k: v for k, v in os.environ.items() if not k.startswith("PRELOADER_") and k != "MODEL_DIR"
    }
    base["PRELOADER_LOG_FORMAT"] = "json"
    base["PYTHONPATH"] = REPO
    base.update(env or {})
    return base


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    user: int | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``preloader`` CLI in a new process (as another uid when asked)."""
    base_env = cli_env(env)
    if user is None:
        cmd = [sys.executable, "-m", "preloader", *args]
    else:
        cmd = [sys.executable, AS_USER, str(user), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=base_env, check=check, timeout=120
    )


class CliProcess:
    """The real CLI running in the background, its JSON log lines collected as they come.

    Tests synchronise on log lines (:meth:`wait_for`), never on sleeps; every wait is
    bounded, so a hang fails the test instead of stalling the run.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "preloader", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(env),
        )
        self.stderr_lines: list[str] = []
        self.stdout_text = ""
        self._stderr_closed = False
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.stderr_lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._stderr_closed = True
            self._changed.notify_all()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        self.stdout_text = self.proc.stdout.read()

    @property
    def logs(self) -> list[dict[str, Any]]:
        with self._changed:
            return [json.loads(line) for line in self.stderr_lines if line.startswith("{")]

    def wait_for(self, *events: str, timeout: float = 60) -> dict[str, Any]:
        """Block until a log line with one of these ``event`` values appears; return it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.stderr_lines:
                    if line.startswith("{") and json.loads(line).get("event") in events:
                        return dict(json.loads(line))
                left = deadline - time.monotonic()
                if left <= 0 or self._stderr_closed:
                    raise AssertionError(f"no {events} log line: {self.stderr_lines}")
                self._changed.wait(left)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        """Wait for the exit; return the exit code and stdout."""
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=timeout)
        return code, self.stdout_text

    def close(self) -> None:
        """Kill the process if it still runs (a failed test), and release its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        finally:
            for reader in self._readers:
                reader.join(timeout=30)
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()


def run_cli_in_cgroup(
    cgroup: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a process that first moves itself into ``cgroup``."""
    wrapper = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
    base_env = cli_env(env)
    return subprocess.run(
        ["sh", "-c", wrapper, cgroup, sys.executable, "-m", "preloader", *args],
        capture_output=True,
        text=True,
        env=base_env,
        timeout=120,
    )
