"""Scrapes share one rendering per agent change, so ``/healthz`` never queues behind them.

A real agent over a real model, the app served by uvicorn on a real socket, and 200
clients at once on ``/status``, ``/metrics`` and ``/readyz``: the snapshot and each body
are built once, not once per client, and built again only after the agent changes or the
reuse window passes. The clock is the test's, so no assertion depends on timing.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn

from preloader.agent.agent import Agent
from preloader.agent.snapshot import AgentSnapshot
from preloader.serve.app import create_app
from preloader.serve.renderings import Renderings
from preloader.settings import Selection, ServeConfig, WarmOptions

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
CLIENTS = 200


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class _Harness:
    def __init__(self, agent: Agent, renderings: Renderings, port: int) -> None:
        self.agent = agent
        self.renderings = renderings
        self.port = port
        self.snapshots = 0

    async def burst(self, paths: list[str]) -> list[tuple[int, bytes]]:
        return await asyncio.wait_for(
            asyncio.gather(*(_get(self.port, p) for p in paths)), timeout=60
        )


@pytest.fixture
async def harness(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[_Harness]:
    agent = Agent(
        ServeConfig(selection=Selection((str(model_dir),)), options=WarmOptions(chunk_size=MiB))
    )
    await agent.start_up()
    renderings = Renderings(agent, clock=_Clock())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    harness = _Harness(agent, renderings, sock.getsockname()[1])
    build = agent.snapshot

    def counted() -> AgentSnapshot:
        harness.snapshots += 1
        return build()

    monkeypatch.setattr(agent, "snapshot", counted)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(agent, renderings=renderings),
            log_config=None,
            access_log=False,
            lifespan="off",
            http="h11",
            backlog=1024,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield harness
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=60)
        sock.close()


async def test_concurrent_scrapes_share_one_snapshot_and_one_body_each(harness: _Harness) -> None:
    paths = ["/status", "/metrics", "/readyz", "/startz"] * (CLIENTS // 4)
    answers = await harness.burst(paths)
    assert {status for status, _ in answers} == {200}
    bodies = {
        path: {body for p, (_, body) in zip(paths, answers, strict=True) if p == path}
        for path in paths
    }
    assert all(len(seen) == 1 for seen in bodies.values()), "clients saw different renderings"
    assert json.loads(next(iter(bodies["/status"])))["ready"] is True
    assert b"preloader_ready 1.0" in next(iter(bodies["/metrics"]))
    assert harness.snapshots == 1
    assert harness.renderings.counts == {"snapshot": 1, "status": 1, "metrics": 1}


async def test_an_agent_change_renders_again_and_shows_it(harness: _Harness) -> None:
    await harness.burst(["/status", "/metrics"] * 10)
    before = json.loads((await _get(harness.port, "/status"))[1])["paths"][0]["last_check"]
    await harness.agent.recheck()  # a keep-warm round: measures and reports a change
    answers = await harness.burst(["/status", "/metrics"] * 10)
    after = json.loads(answers[0][1])["paths"][0]["last_check"]
    assert before is None and after is not None
    assert harness.snapshots == 2
    assert harness.renderings.counts == {"snapshot": 2, "status": 2, "metrics": 2}


async def test_the_reuse_window_bounds_how_stale_a_rendering_gets(harness: _Harness) -> None:
    await harness.burst(["/status"] * 10)
    clock = harness.renderings._clock
    assert isinstance(clock, _Clock)
    clock.now += 1.0  # the next window: bytes read may have moved without a change
    await harness.burst(["/status"] * 10)
    assert harness.renderings.counts == {"snapshot": 2, "status": 2}


async def test_healthz_builds_nothing(harness: _Harness) -> None:
    answers = await harness.burst(["/healthz"] * 20)
    assert {status for status, _ in answers} == {200}
    assert harness.snapshots == 0
    assert not harness.renderings.counts
