"""A real ``preloader serve`` in a child process, spoken to over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .cli import AS_USER, REPO, cli_env

DEADLINE = 60.0  # seconds; a bound against hangs, never a synchronisation
_T = TypeVar("_T")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Served:
    """The child process, its JSON log lines (stderr) and its port."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.logs: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        serving = self.wait_for_log(lambda line: line.get("event") == "serving")
        self.port = int(serving["port"])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._seen:
                self.raw.append(line)
                if line.startswith("{"):
                    self.logs.append(json.loads(line))
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_for_log(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        end = time.monotonic() + DEADLINE
        with self._seen:
            while True:
                for line in self.logs:
                    if predicate(line):
                        return line
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"serve exited {self.proc.returncode}: {self.raw}")
                if not self._seen.wait(timeout=max(0.0, end - time.monotonic())):
                    raise AssertionError(f"no such log line within {DEADLINE} s: {self.raw}")

    def request(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.port}{path}"
        request = urllib.request.Request(url, method=method)
        try:
            with _DIRECT.open(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.read()

    def json(self, path: str) -> tuple[int, Any]:
        status, body = self.request(path)
        return status, json.loads(body)

    def poll(self, probe: Callable[[], _T | None]) -> _T:
        """Call ``probe`` until it returns something other than None (bounded)."""
        end = time.monotonic() + DEADLINE
        while True:
            value = probe()
            if value is not None:
                return value
            if time.monotonic() > end:
                raise AssertionError(f"condition not met within {DEADLINE} s: {self.raw[-5:]}")
            time.sleep(0.05)  # the polling period, not a synchronisation

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, float]:
        """Send ``signum``; return the exit code and the seconds it took to exit."""
        started = time.monotonic()
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout=DEADLINE)
        seconds = time.monotonic() - started
        self._reader.join(timeout=DEADLINE)
        return code, seconds

    def kill(self) -> None:
        """Kill the child if it still runs, and close its pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=DEADLINE)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def start_serve(
    *args: str,
    env: dict[str, str] | None = None,
    user: int | None = None,
    cgroup: str | None = None,
    wrap: Sequence[str] = (),
) -> Served:
    """Start ``preloader serve ARGS`` on 127.0.0.1 and an ephemeral port (as ``user``; in
    the memory ``cgroup``, a directory the process moves itself into first; under
    ``wrap``, a command that execs the rest, such as ``prlimit --memlock=N:N``)."""
    base_env = cli_env({"PRELOADER_HOST": "127.0.0.1", "PRELOADER_PORT": "0", **(env or {})})
    prefix = (
        [sys.executable, "-m", "preloader"]
        if user is None
        else [
            sys.executable,
            AS_USER,
            str(user),
        ]
    )
    if cgroup is not None:
        prefix = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup, *prefix]
    proc = subprocess.Popen(
        [*wrap, *prefix, "serve", *args],
        cwd=REPO,  # `python -m preloader` imports this checkout's package
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=base_env,
    )
    try:
        return Served(proc)
    except BaseException:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        raise


def track(started: list[Served], *args: str, **kwargs: Any) -> Served:
    """:func:`start_serve`, remembered in the ``served`` fixture's list for clean-up."""
    server = start_serve(*args, **kwargs)
    started.append(server)
    return server


def ready_body(server: Served) -> dict[str, Any] | None:
    """The ``/readyz`` body once it answers 200, else ``None`` (for :meth:`Served.poll`)."""
    status, body = server.json("/readyz")
    return body if status == 200 else None
