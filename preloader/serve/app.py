"""``preloader serve``'s ASGI app: five read-only endpoints over the agent's snapshot.

``/healthz``, ``/startz``, ``/readyz``, ``/status`` and ``/metrics`` (Starlette), GET and
HEAD only. Handlers only read the agent's in-memory snapshot; they never touch the
filesystem. ``/healthz`` reads nothing at all; the others share one snapshot and one
rendering of each body per agent change (:mod:`.renderings`). The process around it
(binding, signals, shutdown) is :mod:`.server`'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..agent.agent import Agent
from .renderings import Renderings, encode_json

__all__ = ["MAX_REQUEST_HEAD", "create_app"]

_NO_STORE = {"Cache-Control": "no-store"}


class _JSON(JSONResponse):
    """JSON that always encodes: snapshots carry printable paths, and should a string
    that is not valid Unicode (a surrogate from an undecodable name) still slip in, it is
    sent escaped rather than failing the request with a 500."""

    def render(self, content: Any) -> bytes:
        return encode_json(content)


# The most bytes of request line and headers a request may have. h11 refuses more only
# while the head is still incomplete in its buffer, so a head that arrives in one read
# (up to 256 KiB from asyncio) gets past it; the app refuses it instead.
MAX_REQUEST_HEAD = 16 * 1024


class _LimitRequest:
    """Bound what a client can make the server hold.

    A request whose target and headers exceed :data:`MAX_REQUEST_HEAD` gets 431. A
    request that announces a body (none of the paths takes one) gets its answer and
    then the connection is closed: otherwise uvicorn would go on discarding the body for
    as long as the client sends, keeping the connection open.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string", b""))
        size += sum(len(name) + len(value) + 4 for name, value in headers)
        has_body = any(
            (name == b"content-length" and value.strip() not in (b"", b"0"))
            or name == b"transfer-encoding"
            for name, value in headers
        )

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"connection", b"close")]}
            await send(message)

        if size > MAX_REQUEST_HEAD:
            response = PlainTextResponse(
                "request header fields too large\n", status_code=431, headers=_NO_STORE
            )
            await response(scope, receive, send_closing)
        else:
            await self.app(scope, receive, send_closing if has_body else send)


def create_app(
    agent: Agent, collectors: Iterable[Collector] = (), renderings: Renderings | None = None
) -> Starlette:
    """The ASGI app over ``agent``: GET (and HEAD) on five paths, nothing else.

    :param collectors: more metric families for ``/metrics`` (the node labeler's).
    :param renderings: the shared renderings (default: a new one over ``agent`` and
        ``collectors``; tests pass theirs to count what was built).
    """
    shared = renderings if renderings is not None else Renderings(agent, collectors)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n", headers=_NO_STORE)

    async def readyz(request: Request) -> Response:
        snap = await shared.snapshot()
        return _JSON(snap.readyz_json(), status_code=200 if snap.ready else 503, headers=_NO_STORE)

    async def startz(request: Request) -> Response:
        snap = await shared.snapshot()
        gate = snap.start_gate
        assert gate is not None  # the agent always reports its start gate
        return JSONResponse(
            {**gate.startz_json(), "state": snap.state, "ready": snap.ready},
            status_code=200 if gate.open else 503,
            headers=_NO_STORE,
        )

    async def status(request: Request) -> Response:
        body = await shared.body("status")
        return Response(body, media_type="application/json", headers=_NO_STORE)

    async def metrics(request: Request) -> Response:
        body = await shared.body("metrics")
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST, **_NO_STORE})

    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/startz", startz, methods=["GET"]),
            Route("/status", status, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        middleware=[Middleware(_LimitRequest)],
    )
    # Starlette answers `/healthz/` with a 307 to `http://<Host header>/healthz`: a path
    # that is not one of them must be 404, and the Host header must reach no answer.
    app.router.redirect_slashes = False
    return app
