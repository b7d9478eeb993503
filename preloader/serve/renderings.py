"""What ``/status``, ``/metrics`` and the gates answer, rendered once and shared.

A snapshot of 50 served paths and its ``/status`` JSON or Prometheus text take
milliseconds to build; 200 scrapers that each build their own keep uvicorn's one event
loop busy long enough to push ``/healthz`` past a liveness probe's timeout. So the
snapshot, the ``/status`` body and the ``/metrics`` body are built at most once per
*key*: the agent's change counter (:attr:`~preloader.agent.agent.Agent.generation`) and
the current :data:`MAX_AGE` window (bytes read move between changes). Every request that
asks meanwhile gets the same bytes. They are built on a worker thread, one at a time (a
miss waits for the rendering in flight instead of starting its own), so the event loop
only parses requests and copies bytes, and ``/healthz`` never waits behind a rendering.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.to_thread
from prometheus_client import generate_latest
from prometheus_client.registry import Collector

from ..agent.agent import Agent
from ..agent.snapshot import AgentSnapshot
from .metrics import make_registry

__all__ = ["MAX_AGE", "Renderings", "encode_json"]

MAX_AGE = 1.0
"""Seconds a rendering may be reused while the agent reports no change."""

Body = Literal["status", "metrics"]


def encode_json(content: object) -> bytes:
    """Compact JSON; a string that is not valid Unicode (a surrogate from an undecodable
    name) is sent escaped rather than failing the request."""
    try:
        return json.dumps(
            content, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


@dataclass
class _Entry:
    key: tuple[int, int]
    snapshot: AgentSnapshot
    bodies: dict[str, bytes] = field(default_factory=dict)


class Renderings:
    """The agent's snapshot and the bodies rendered from it, shared per key.

    Use from one event loop (uvicorn's). :attr:`counts` says how many of each were built
    (``snapshot``, ``status``, ``metrics``).

    :param agent: the agent whose state is rendered.
    :param collectors: more metric families for ``/metrics`` (the node labeler's).
    :param max_age: seconds a rendering may be reused while nothing changed.
    :param clock: the monotonic clock (seconds).
    """

    def __init__(
        self,
        agent: Agent,
        collectors: Iterable[Collector] = (),
        max_age: float = MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._agent = agent
        self._max_age = max_age
        self._clock = clock
        self._entry: _Entry | None = None
        self._lock: anyio.Lock | None = None
        self.counts: Counter[str] = Counter()
        self._registry = make_registry(self._rendering_snapshot)
        for collector in collectors:
            self._registry.register(collector)

    def _rendering_snapshot(self) -> AgentSnapshot:
        assert self._entry is not None  # only called while a metrics body is rendered
        return self._entry.snapshot

    def _key(self) -> tuple[int, int]:
        # The generation is read before the snapshot is built: a change in between makes
        # the snapshot newer than its key, never older.
        return self._agent.generation, int(self._clock() // self._max_age)

    async def snapshot(self) -> AgentSnapshot:
        """The agent's snapshot, built at most once per key."""
        return (await self._current(None)).snapshot

    async def body(self, name: Body) -> bytes:
        """The ``/status`` JSON or the ``/metrics`` text, rendered at most once per key."""
        return (await self._current(name)).bodies[name]

    async def _current(self, name: Body | None) -> _Entry:
        entry = self._entry
        if entry is not None and entry.key == self._key() and (name in entry.bodies or not name):
            return entry
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            entry, key = self._entry, self._key()
            if entry is None or entry.key != key:
                snapshot = await anyio.to_thread.run_sync(self._agent.snapshot)
                self.counts["snapshot"] += 1
                entry = self._entry = _Entry(key, snapshot)
            if name is not None and name not in entry.bodies:
                render = self._render_status if name == "status" else self._render_metrics
                entry.bodies[name] = await anyio.to_thread.run_sync(render, entry)
                self.counts[name] += 1
            return entry

    @staticmethod
    def _render_status(entry: _Entry) -> bytes:
        return encode_json(entry.snapshot.to_json())

    def _render_metrics(self, entry: _Entry) -> bytes:
        del entry  # the collector reads self._entry, set under the lock
        return generate_latest(self._registry)
