"""A stand-in Kubernetes API server on 127.0.0.1 for the node-label tests.

There is no API server on these machines. This one speaks the few endpoints the node
labeler uses, with the API server's JSON shapes:

- ``GET /api/v1/nodes/{name}``: the Node (``metadata.name``, ``uid``,
  ``resourceVersion``, ``labels``), or a 404 ``Status``;
- ``PATCH /api/v1/nodes/{name}``: the body applied as the API server applies it for
  ``application/merge-patch+json`` (RFC 7386: objects merge key by key, ``null``
  removes) and ``application/strategic-merge-patch+json`` (the same for
  ``metadata.labels``, a plain map); any other content type is a 415 ``Status``; answers
  the patched Node;
- ``POST /api/v1/namespaces/{ns}/events``: a core/v1 Event, checked as the API server's
  legacy validation does for a cluster-scoped object (namespace ``default``,
  ``involvedObject`` and ``reason`` present); ``generateName`` gets a suffix; answers 201
  with the Event, 409 ``Status`` for a name that exists.

A bearer token is required (401 ``Status`` otherwise). :attr:`KubeApi.refuse` makes
every request answer a 403 ``Status`` as RBAC does; :meth:`KubeApi.down` closes the
listening socket so that connections are refused. :meth:`KubeApi.hold_next` keeps the
answer to the next request of a method (applied and recorded, as the API server has done
by the time its reply is on the way) until :meth:`KubeApi.release`: a request in flight
at a moment the test chooses, synchronised on the stand-in having seen it.
:meth:`KubeApi.remove_label` changes the node out of band, as ``kubectl label`` would.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import ssl
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["KubeApi", "Request", "merge_patch"]

MERGE = "application/merge-patch+json"
_HOLD_SECONDS = 60.0  # a bound against a test that never releases, not a synchronisation
STRATEGIC = "application/strategic-merge-patch+json"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    """A ``Status`` object as the API server sends it with an error."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    }


@dataclass
class Request:
    method: str
    path: str
    content_type: str
    body: Any
    code: int


@dataclass
class KubeApi:
    """The server's state; use as a context manager (it serves in a thread)."""

    node_name: str = "gpu-node-1"
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    labels: dict[str, str] = field(
        default_factory=lambda: {"kubernetes.io/hostname": "gpu-node-1", "team": "ml"}
    )
    refuse: bool = False
    requests: list[Request] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    #: (certificate, key) files to serve HTTPS with, as the real API server does.
    tls: tuple[Path, Path] | None = None

    def __post_init__(self) -> None:
        self.uid = str(uuid.uuid4())
        self._version = itertools.count(100)
        self.resource_version = str(next(self._version))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._hold: str | None = None
        self._released = threading.Event()
        #: Requests whose answer was held (see :meth:`hold_next`).
        self.held: list[Request] = []
        self.port = 0

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> KubeApi:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Listen (again) on the same port."""
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        server.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def hold_next(self, method: str) -> None:
        """Hold the answer to the next ``method`` request until :meth:`release`."""
        with self.changed:
            self._hold = method
            self._released.clear()

    def release(self) -> None:
        """Answer the held request (and hold nothing more)."""
        with self.changed:
            self._hold = None
        self._released.set()

    def remove_label(self, key: str) -> None:
        """Take a label off the node behind the agent's back."""
        with self.changed:
            del self.labels[key]
            self.resource_version = str(next(self._version))

    def down(self) -> None:
        """Stop listening and drop open connections: refused until :meth:`up`."""
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for connection in list(self._connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def service_account(self, folder: Path, ca: Path) -> Path:
        """A service-account folder as the kubelet mounts it: token, ca.crt, namespace."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "token").write_text(self.token)
        (folder / "ca.crt").write_bytes(ca.read_bytes())
        (folder / "namespace").write_text("default")
        return folder

    def kubeconfig(self, folder: Path) -> Path:
        """A kubeconfig file pointing at this server with its token."""
        path = folder / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "preloader", "user": {"token": self.token}}],
            "contexts": [
                {"name": "stand-in", "context": {"cluster": "stand-in", "user": "preloader"}}
            ],
            "current-context": "stand-in",
        }
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    # -- what tests read ----------------------------------------------------------------

    def node(self) -> dict[str, Any]:
        return {
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": {
                "name": self.node_name,
                "uid": self.uid,
                "resourceVersion": self.resource_version,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": dict(self.labels),
            },
            "spec": {},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }

    def ours(self) -> dict[str, str]:
        """The node's ``preloader.dev/`` labels."""
        with self.changed:
            return {k: v for k, v in self.labels.items() if k.startswith("preloader.dev/")}

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> None:
        """Block until ``predicate(self)`` holds after some request (or it already does)."""
        with self.changed:
            if not self.changed.wait_for(lambda: predicate(self), timeout):
                raise AssertionError(f"stand-in API: condition not met; requests {self.calls()}")

    def calls(self) -> list[tuple[str, str, int]]:
        return [(r.method, r.path, r.code) for r in self.requests]

    def event_reasons(self) -> list[str]:
        return [e["reason"] for e in self.events]

    # -- serving ------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: Any, raw: bytes) -> tuple[int, Any]:
        if headers.get("Authorization") != f"Bearer {self.token}":
            return 401, status(401, "Unauthorized", "Unauthorized")
        if self.refuse:
            verb = {"GET": "get", "PATCH": "patch", "POST": "create"}.get(method, method)
            return 403, status(
                403,
                "Forbidden",
                f'"{path}" is forbidden: User "system:serviceaccount:default:preloader" '
                f"cannot {verb} resource at the cluster scope",
            )
        parts = path.split("?")[0].strip("/").split("/")
        if parts[:3] == ["api", "v1", "nodes"] and len(parts) == 4:
            return self._node(method, parts[3], headers, raw)
        events = parts[:3] == ["api", "v1", "namespaces"] and parts[4:] == ["events"]
        if events and len(parts) == 5 and method == "POST":
            return self._event(parts[3], raw)
        return 404, status(404, "NotFound", "the server could not find the requested resource")

    def _node(self, method: str, name: str, headers: Any, raw: bytes) -> tuple[int, Any]:
        if name != self.node_name:
            message = f'nodes "{name}" not found'
            return 404, status(404, "NotFound", message, name=name, kind="nodes")
        if method == "GET":
            return 200, self.node()
        if method != "PATCH":
            return 405, status(405, "MethodNotAllowed", "the server does not allow this method")
        content_type = headers.get("Content-Type", "").split(";")[0].strip()
        if content_type not in (MERGE, STRATEGIC):
            message = f"the body of the request was in an unknown format: {content_type}"
            return 415, status(415, "UnsupportedMediaType", message)
        body = json.loads(raw)
        patched = merge_patch(self.node(), body)
        self.labels = dict(patched["metadata"].get("labels") or {})
        self.resource_version = str(next(self._version))
        return 200, self.node()

    def _event(self, namespace: str, raw: bytes) -> tuple[int, Any]:
        event = json.loads(raw)
        meta = event.get("metadata") or {}
        involved = event.get("involvedObject") or {}
        problems = []
        if not involved.get("kind") or not involved.get("name"):
            problems.append("involvedObject: Required value")
        if not involved.get("namespace") and namespace not in ("", "default"):
            problems.append("involvedObject.namespace: does not match event.namespace")
        if meta.get("namespace", namespace) != namespace:
            problems.append("metadata.namespace: does not match the namespace of the request")
        if not event.get("reason"):
            problems.append("reason: Required value")
        if event.get("type") not in ("Normal", "Warning"):
            problems.append("type: Unsupported value")
        if problems:
            return 422, status(422, "Invalid", "Event is invalid: " + ", ".join(problems))
        name = meta.get("name") or meta.get("generateName", "") + uuid.uuid4().hex[:5]
        if any(e["metadata"]["name"] == name for e in self.events):
            return 409, status(409, "AlreadyExists", f'events "{name}" already exists', name=name)
        stored = {
            **event,
            "kind": "Event",
            "apiVersion": "v1",
            "metadata": {**meta, "name": name, "namespace": namespace, "uid": str(uuid.uuid4())},
        }
        self.events.append(stored)
        return 201, stored


def _handler(api: KubeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            api._connections.add(self.connection)

        def finish(self) -> None:
            api._connections.discard(self.connection)
            with contextlib.suppress(OSError):
                super().finish()

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            with api.changed:
                code, body = api.handle(self.command, self.path, self.headers, raw)
                api.requests.append(
                    Request(
                        self.command,
                        self.path,
                        self.headers.get("Content-Type", ""),
                        json.loads(raw) if raw else None,
                        code,
                    )
                )
                held = api._hold == self.command
                if held:
                    api._hold = None
                    api.held.append(api.requests[-1])
                api.changed.notify_all()
            if held:
                api._released.wait(_HOLD_SECONDS)
            data = json.dumps(body).encode()
            with contextlib.suppress(OSError):  # the client may have gone while held
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        do_GET = do_PATCH = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815 - http.server's names

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
