"""``preloader serve``'s process lifecycle: bind, run the agent and uvicorn, stop.

The ASGI app (:mod:`.app`) is served by uvicorn on an event loop of its own, in a thread
beside the :class:`~preloader.agent.agent.Agent`'s; this module owns everything around it,
as uvicorn's ``server.py`` does around an app.

Lifecycle: bind and listen first (so ``/healthz`` answers while the model is still being
planned), then run the agent and the server side by side. The first SIGTERM or SIGINT
stops reading, lets uvicorn answer the requests in flight (at most
``shutdown_seconds``), and exits 0; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Iterator

import anyio
import anyio.abc
import uvicorn

from .. import errors
from ..agent.agent import Agent
from ..agent.snapshot import AgentSnapshot
from ..engine.events import log_event
from ..logs import get_logger
from ..settings import ServeConfig
from ..signals import StopSignals
from ..units import printable
from .app import MAX_REQUEST_HEAD, create_app
from .kube.api import NodeApi
from .kube.nodelabels import STOP_SECONDS, NodeLabeler

__all__ = ["bind", "serve"]


def bind(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host:port`` (port 0: any free port).

    Listening before the event loop starts means probes queue instead of being refused.

    :raises errors.UsageError: naming the address and the cause when it cannot listen.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise errors.UsageError(f"{host}: cannot resolve the bind address: {err}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise errors.UsageError(f"{host}:{port}: cannot listen: {err.strerror}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: :func:`serve` owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _ToStructlog(logging.Handler):
    """uvicorn logs through the standard library; pass its warnings on to our logs."""

    def emit(self, record: logging.LogRecord) -> None:
        get_logger().log(record.levelno, record.getMessage(), logger=record.name)


async def serve(config: ServeConfig, sock: socket.socket, node_api: NodeApi | None = None) -> int:
    """Run the agent and the HTTP server on ``sock`` until SIGTERM/SIGINT; return 0.

    :param sock: a listening socket from :func:`bind`.
    :param node_api: with ``config.node_labels``, the API the node labeler uses
        (:func:`preloader.serve.kube.nodelabels.connect`); the labels are removed before it returns.
    """
    log = get_logger()
    agent = Agent(config, on_event=log_event)
    labeler = None
    if config.node_labels is not None and node_api is not None:
        labeler = NodeLabeler(config.node_labels, node_api)
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(_ToStructlog(logging.WARNING))
    uvicorn_log.propagate = False
    server = _Server(
        uvicorn.Config(
            create_app(agent, [labeler.collector()] if labeler else []),
            log_config=None,
            access_log=False,
            lifespan="off",
            http="h11",
            h11_max_incomplete_event_size=MAX_REQUEST_HEAD,
            ws="none",
            loop="asyncio",
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=max(1, round(config.shutdown_seconds)),
        )
    )

    def ask_to_stop() -> None:
        agent.stop()
        server.should_exit = True

    def force_exit() -> None:
        server.force_exit = True

    # The work bounds its own shutdown (shutdown_seconds below): no grace timer.
    signals = StopSignals(ask_to_stop, on_force=force_exit, level=logging.INFO)
    async with signals.capture(), anyio.create_task_group() as group:
        host, port = sock.getsockname()[:2]
        log.info(
            "serving",
            host=host,
            port=port,
            paths=[printable(p) for p in config.selection.paths],
            ready_ratio=config.ready_ratio,
            recheck_seconds=config.recheck_seconds,
            start_lead=config.start_lead,
            lock=config.lock,
        )
        missing = [printable(p) for p in config.selection.missing]
        if missing and not config.allow_missing:
            log.error(
                "path does not exist; not ready while it is missing",
                paths=missing,
                hint="PRELOADER_ALLOW_MISSING=1 serves without it",
            )
        elif config.selection.skip_reason is not None:
            log.warning("nothing to warm; ready at once", reason=config.selection.skip_reason)
        group.start_soon(agent.run)
        if labeler is not None:
            group.start_soon(labeler.run, agent)
        await _serve_http_in_thread(server, sock)
        agent.stop()
        # Reads notice the stop within one step; a read stuck in the kernel is abandoned.
        with anyio.move_on_after(config.shutdown_seconds):
            await agent.stopped.wait()
        group.cancel_scope.cancel()
    if labeler is not None and node_api is not None:
        await _withdraw_labels(labeler, node_api, skip=len(signals.received) > 1)
    log.info("stopped", **_summary(agent.snapshot()))
    return errors.EXIT_OK


async def _withdraw_labels(labeler: NodeLabeler, node_api: NodeApi, skip: bool) -> None:
    """Take this agent's labels off the node, in at most :data:`STOP_SECONDS`."""
    log = get_logger()
    if skip:
        log.warning("node labels left on the node (second signal); the next start removes them")
    else:
        with anyio.move_on_after(STOP_SECONDS) as scope:
            await labeler.withdraw()
        if scope.cancelled_caught:
            log.warning(
                "node labels not removed in time; the next start removes them",
                seconds=STOP_SECONDS,
            )
    with anyio.move_on_after(STOP_SECONDS, shield=True):
        await node_api.aclose()


async def _serve_http_in_thread(server: uvicorn.Server, sock: socket.socket) -> None:
    """Run uvicorn on an event loop of its own, in a thread, until it exits.

    Parsing and answering a burst of probes then never queues the engine's hand-offs
    behind it on one event loop: 1,000 concurrent ``/readyz`` slowed a one-second warm-up
    by a sixth when both shared a loop. Handlers only read :meth:`Agent.snapshot`, which
    builds a fresh immutable object from plain attributes; the signal watcher asks the
    server to stop through ``should_exit``/``force_exit``, which uvicorn polls.
    """
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
        except BaseException as err:  # handed to the agent's loop below
            failure.append(err)

    thread = threading.Thread(target=run, name="preloader-http", daemon=True)
    thread.start()
    await anyio.to_thread.run_sync(thread.join, abandon_on_cancel=True)
    if failure:
        raise failure[0]


def _summary(snap: AgentSnapshot) -> dict[str, object]:
    return {
        "state": snap.state,
        "ready": snap.ready,
        "bytes": snap.bytes,
        "read_bytes": snap.read_bytes,
        "resident_bytes": snap.resident_bytes,
    }
