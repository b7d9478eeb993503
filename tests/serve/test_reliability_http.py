"""Reliability matrix, HTTP surface: the real ``preloader serve`` under hostile clients.

Every test runs the real CLI (tests/lib/serve.py) on 127.0.0.1 and an ephemeral port and
talks to it over real sockets: odd methods and paths, oversized requests, a thousand
probes at once while warming, clients that stall half-way through a request, and an
unprivileged user over a read-only tree. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from ..lib.cli import NOBODY
from ..lib.fusefs import FuseMount
from ..lib.marks import needs_fuse, needs_root
from ..lib.serve import DEADLINE, Served, ready_body, track

PATHS = ("/healthz", "/startz", "/readyz", "/status", "/metrics")


def _raw(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send ``request`` as is on a new connection; return all the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        # The server may close before reading it all; its answer still counts.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(request)
        chunks = []
        try:
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def _code(answer: bytes) -> int | None:
    """The status code of a raw HTTP answer; None for a closed connection without one."""
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


def _get(target: str, method: str = "GET") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


# ------------------------------------------------------------ a filesystem witness

_IN_OPEN, _IN_ACCESS, _IN_NONBLOCK = 0x20, 0x01, 0o4000


class _Opens:
    """inotify on some directories: which entries anyone opened or read since ``mark``.

    The directories are the test's own, so any event there came from the server.
    """

    def __init__(self, *directories: Path) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = self._libc.inotify_init1(_IN_NONBLOCK)
        assert self._fd >= 0, os.strerror(ctypes.get_errno())
        for directory in directories:
            wd = self._libc.inotify_add_watch(
                self._fd, os.fsencode(directory), _IN_OPEN | _IN_ACCESS
            )
            assert wd >= 0, os.strerror(ctypes.get_errno())

    def events(self) -> list[str]:
        seen: list[str] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return seen
            offset = 0
            while offset < len(data):
                _, mask, _, size = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16 : offset + 16 + size].rstrip(b"\0").decode()
                seen.append(f"{mask:#x} {name}")
                offset += 16 + size

    def close(self) -> None:
        os.close(self._fd)


# ------------------------------------------------------------ methods and paths

HOSTILE_TARGETS = [
    "/",
    "/../../etc/passwd",
    "/status/../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "//etc/passwd",
    "/metrics/x",
    "/healthz/",
    "/metrics/",
    "/readyz/..",
    "/status/model.safetensors",
    "/model.safetensors",
    "http://127.0.0.1/etc/passwd",
    "*",
]


def test_only_get_and_head_on_the_four_paths_and_nothing_touches_the_filesystem(
    model_dir: Path, shared_tmp: Path, served: list[Served], unchanged: Callable[[Path], Path]
) -> None:
    secret = shared_tmp / "secret"
    secret.write_text("root:x:0:0\n")
    unchanged(shared_tmp)
    server = track(served, str(model_dir), "--recheck-seconds", "0")
    server.poll(lambda: ready_body(server))
    before = server.json("/status")[1]
    opens = _Opens(model_dir, shared_tmp)
    try:
        for path in PATHS:
            assert _code(_raw(server.port, _get(path, "HEAD"))) == 200
            for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"):
                assert _code(_raw(server.port, _get(path, method))) == 405, (path, method)
        for target in [*HOSTILE_TARGETS, "/../secret", f"/{secret}"]:
            answer = _raw(server.port, _get(target))
            assert _code(answer) in (400, 404), (target, answer[:200])
            assert b"root:" not in answer
        for query in (f"path={secret}", "path=/etc", "file=../../etc/passwd", "x=" + "/" * 500):
            for path in PATHS:
                answer = _raw(server.port, _get(f"{path}?{query}"))
                assert _code(answer) == 200, (path, query)
                assert b"root:" not in answer and os.fsencode(secret) not in answer
        assert opens.events() == []
        secret.read_text()  # the witness sees an open when there is one
        assert any(event.endswith(" secret") for event in opens.events())
    finally:
        opens.close()
    after = server.json("/status")[1]
    for key in ("files", "bytes", "read_bytes", "errors"):
        assert after[key] == before[key], key
    assert after["paths"][0]["rewarm_bytes"] == before["paths"][0]["rewarm_bytes"]
    assert server.stop()[0] == 0


# ------------------------------------------------------------ request size limits


def test_oversized_headers_and_bodies_are_refused_and_the_server_goes_on(
    model_dir: Path, served: list[Served]
) -> None:
    server = track(served, str(model_dir), "--recheck-seconds", "0")
    huge_header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    many_headers = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 20_000 + b"\r\n"
    huge_line = b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    for request in (huge_header, many_headers, huge_line):
        code = _code(_raw(server.port, request))
        assert code is None or 400 <= code < 500, code
        assert server.request("/healthz") == (200, b"ok\n")
    body = b"x" * (8 << 20)
    for path, method in (("/healthz", "GET"), ("/status", "POST"), ("/nope", "PUT")):
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 40}\r\n\r\n".encode()
        code = _code(_raw(server.port, head + body))
        assert code is None or code in (200, 404, 405, 413), (path, code)
        assert server.request("/healthz") == (200, b"ok\n")
    assert server.stop()[0] == 0


# ------------------------------------------------------------ many probes, slow clients


async def _probe(port: int, target: str) -> int | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_get(target))
        await writer.drain()
        return _code(await reader.read())
    finally:
        writer.close()


async def _probe_all(port: int, count: int, target: str = "/readyz") -> list[int | None]:
    """``count`` requests on ``count`` connections, all in flight at once (bounded)."""
    probes = [_probe(port, target) for _ in range(count)]
    return await asyncio.wait_for(asyncio.gather(*probes), timeout=DEADLINE)


@needs_fuse
def test_a_thousand_readyz_while_warming_are_all_answered(
    fuse_fs: Callable[..., FuseMount], served: list[Served]
) -> None:
    # A gated read holds the agent in `warming` for as long as the test needs.
    fs = fuse_fs({"files": {"model.safetensors": {"size": 4 << 20, "gate_from": 1 << 20}}})
    server = track(served, str(fs.mountpoint), "--chunk-size", "1MiB", "--recheck-seconds", "0")
    fs.wait_for("GATE read")
    codes = asyncio.run(_probe_all(server.port, 1000))
    assert codes == [503] * 1000
    assert server.json("/readyz")[1]["state"] == "warming"
    fs.release()
    assert server.poll(lambda: ready_body(server))["bytes_done"] == 4 << 20
    assert server.stop()[0] == 0


def test_slow_clients_do_not_block_others(model_dir: Path, served: list[Served]) -> None:
    server = track(served, str(model_dir), "--recheck-seconds", "0")
    stalled = []
    try:
        for partial in (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"GE", b"POST /status HTTP/1.1"):
            for _ in range(10):
                conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                conn.sendall(partial)
                stalled.append(conn)
        long_body = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        stalled.append(long_body)
        long_body.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab")
        for _ in range(3):
            assert server.request("/healthz") == (200, b"ok\n")
        assert asyncio.run(_probe_all(server.port, 50, "/healthz")) == [200] * 50
    finally:
        for conn in stalled:
            conn.close()
    assert server.request("/healthz") == (200, b"ok\n")
    assert server.stop()[0] == 0


# ------------------------------------------------------------ unprivileged, read-only


@needs_root
def test_nobody_over_a_read_only_tree_serves_and_turns_ready_unverified(
    model_dir: Path, served: list[Served], unchanged: Callable[[Path], Path]
) -> None:
    for path in [model_dir, *model_dir.iterdir()]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    unchanged(model_dir)
    server = track(served, env={"MODEL_DIR": str(model_dir)}, user=NOBODY)
    assert server.request("/healthz") == (200, b"ok\n")
    body = server.poll(lambda: ready_body(server))
    assert body["bytes_done"] == body["bytes_total"] > 0
    assert body["verified"] is False  # root's files: the kernel hides residency (EPERM)
    assert server.stop()[0] == 0
    assert not [line for line in server.raw if "Traceback" in line]
