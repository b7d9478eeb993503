"""``preloader wait`` against real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from preloader import errors
from preloader.cli.readiness import poll_once, wait_ready
from preloader.errors import UsageError
from preloader.settings import WaitConfig

from ..lib.cli import run_cli
from ..lib.net import free_port
from ..lib.serve import REPO, start_serve


class _Gate:
    """A /readyz that answers ``closed`` (503) until it has been asked ``closed_for`` times."""

    def __init__(self, closed_for: int, closed: int = 503) -> None:
        self.closed_for = closed_for
        self.closed = closed
        self.requests = 0
        self.lock = threading.Lock()

    def answer(self) -> int:
        with self.lock:
            self.requests += 1
            return self.closed if self.requests <= self.closed_for else 200


@pytest.fixture
def gate(request: pytest.FixtureRequest) -> Iterator[tuple[_Gate, str]]:
    param = getattr(request, "param", 3)
    state = _Gate(*param) if isinstance(param, tuple) else _Gate(param)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = state.answer()
            body = json.dumps({"ready": code == 200, "reason": f"answer {state.requests}"})
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/readyz"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_wait_polls_until_200_then_exits_0(gate: tuple[_Gate, str]) -> None:
    state, url = gate
    done = run_cli("wait", "--url", url, "--interval", "0.05", "--timeout", "60")
    assert done.returncode == errors.EXIT_OK, done.stderr
    assert state.requests == state.closed_for + 1
    assert "answer 1" in done.stderr  # the 503 reason is logged
    assert '"event": "ready"' in done.stderr


@pytest.mark.parametrize("gate", [10**9], indirect=True)
def test_wait_gives_up_at_the_timeout_with_exit_5(gate: tuple[_Gate, str]) -> None:
    _, url = gate
    done = run_cli("wait", env={"PRELOADER_WAIT_URL": url, "PRELOADER_WAIT_TIMEOUT": "0.3"})
    assert done.returncode == errors.EXIT_TIMEOUT == 5
    assert "not ready before the timeout" in done.stderr


@pytest.mark.parametrize("gate", [(10**9, 404), (10**9, 403), (10**9, 400)], indirect=True)
def test_a_4xx_is_a_wrong_url_and_exits_2_at_once(gate: tuple[_Gate, str]) -> None:
    # The default timeout is 0 (for ever): before, a URL typo waited for ever.
    state, url = gate
    done = run_cli("wait", "--url", url)
    assert done.returncode == errors.EXIT_USAGE == 2, done.stderr
    errors_logged = [line for line in done.stderr.splitlines() if '"level": "error"' in line]
    assert len(errors_logged) == 1
    assert url in errors_logged[0] and f"HTTP {state.closed}" in errors_logged[0]
    assert state.requests == 1


@pytest.mark.parametrize("gate", [(10**9, 408), (10**9, 429), (10**9, 500)], indirect=True)
def test_408_429_and_5xx_mean_not_yet(gate: tuple[_Gate, str]) -> None:
    state, url = gate
    done = run_cli("wait", "--url", url, "--interval", "0.05", "--timeout", "0.3")
    assert done.returncode == errors.EXIT_TIMEOUT, done.stderr
    assert state.requests >= 1


@pytest.mark.parametrize("gate", [10**9], indirect=True)
def test_the_default_interval_polls_gently(gate: tuple[_Gate, str]) -> None:
    # A run ended by --timeout: about one poll a second, not a busy loop.
    state, url = gate
    done = run_cli("wait", "--url", url, "--timeout", "2")
    assert done.returncode == errors.EXIT_TIMEOUT, done.stderr
    assert 1 <= state.requests <= 4


def test_nothing_listening_counts_as_not_yet() -> None:
    url = f"http://127.0.0.1:{free_port()}/readyz"
    answer = poll_once(url)
    assert answer.status is None and not answer.ready
    done = run_cli("wait", "--url", url, "--timeout", "0.2", "--interval", "0.05")
    assert done.returncode == errors.EXIT_TIMEOUT


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://x/readyz", "127.0.0.1:9400"])
def test_only_http_urls_are_polled(url: str) -> None:
    with pytest.raises(UsageError, match="not an http"):
        wait_ready(WaitConfig(url=url, timeout=1))
    done = run_cli("wait", "--url", url, "--timeout", "1")
    assert done.returncode == errors.EXIT_USAGE
    assert "not an http" in done.stderr and "Traceback" not in done.stderr


def test_wait_ready_reports_each_change_once(gate: tuple[_Gate, str]) -> None:
    _, url = gate
    seen: list[int | None] = []
    answer = wait_ready(
        WaitConfig(url=url, timeout=60, interval=0.01), lambda a: seen.append(a.status)
    )
    assert answer is not None and answer.ready
    assert seen == [503, 503, 503, 200]  # each reason differs ("answer N")


def test_wait_on_a_real_sidecar(model_dir: Path) -> None:
    server = start_serve(env={"MODEL_DIR": str(model_dir)})
    try:
        url = f"http://127.0.0.1:{server.port}/readyz"
        done = run_cli("wait", "--url", url, "--interval", "0.05", "--timeout", "60")
        assert done.returncode == 0, done.stderr
        assert server.json("/readyz")[0] == 200
        assert server.stop()[0] == 0
    finally:
        server.kill()


@pytest.mark.parametrize("gate", [10**9], indirect=True)
def test_sigterm_while_waiting_exits_130(gate: tuple[_Gate, str]) -> None:
    _, url = gate
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRELOADER_")}
    env["PRELOADER_LOG_FORMAT"] = "json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "preloader", "wait", "--url", url, "--interval", "0.05"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # the first "waiting" line: it is polling
        assert '"event": "waiting"' in first
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == errors.EXIT_INTERRUPTED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
