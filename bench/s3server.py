"""A loopback S3-compatible server that behaves like a remote object store.

Just enough of the S3 REST API for ``s3fs`` (path-style requests, signatures
ignored): ``HEAD``/``GET`` object with ``Range``, ListObjects v1 and v2 with
prefix, delimiter and paging, bucket ``HEAD`` and ``?location``. Every request
waits a first-byte latency; every connection's body bytes are capped in
bandwidth, and so is the whole server (the "link"). Object bytes are synthetic
(:mod:`bench.pattern`), so nothing of the fixture sits in the page cache, unless
``--backing DIR`` serves real files (:mod:`bench.content`; the e2e scenario's model).

``GET /_bench/stats`` returns JSON counters (bytes and requests served since
the last ``GET /_bench/stats?reset=1``) so the bench can prove every cold run
really went to the "network". ``GET /_bench/gets`` (``?reset=1`` clears it too)
returns every object GET since, in arrival order: key, first and last byte asked
for, bytes sent, and start and end as ``time.monotonic()`` (one clock for every
process on the machine), so :mod:`bench.s3trace` can tell which ranges a client
fetched twice, and when.

Run: ``python -m bench.s3server --manifest objects.json [--port 0]``; it prints
``READY <port>`` on stdout once listening and serves until SIGTERM/SIGINT.
"""

import argparse
import email.utils
import hashlib
import json
import signal
import socket
import sys
import threading
import time
import types
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

from .content import Content
from .throttle import Pacer, wait_for_slots

__all__ = ["S3Config", "S3Server", "main", "parse_range"]

_SEND_PIECE = 64 * 1024
_LAST_MODIFIED = email.utils.formatdate(1_700_000_000, usegmt=True)
_ISO_MODIFIED = "2023-11-14T22:13:20.000Z"
_LOG_LIMIT = 200_000  # GETs kept for /_bench/gets (a 2 GiB model in 10 MB parts is ~200)


@dataclass(frozen=True)
class S3Config:
    """What the fake object store serves and how slowly."""

    bucket: str
    objects: dict[str, int]
    first_byte_latency_s: float = 0.02
    connection_bytes_per_s: float | None = 32 * 2**20
    link_bytes_per_s: float | None = None
    backing: Path | None = None  # serve BACKING/key instead of synthetic bytes


@dataclass
class _Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    bytes_sent: int = 0
    requests: int = 0
    gets: int = 0
    connections: int = 0
    log: list[dict[str, object]] = field(default_factory=list)

    def record(self, entry: dict[str, object]) -> None:
        with self.lock:
            if len(self.log) < _LOG_LIMIT:
                self.log.append(entry)

    def get_log(self, reset: bool) -> list[dict[str, object]]:
        with self.lock:
            entries = list(self.log)
            if reset:
                self.log.clear()
        return entries

    def snapshot(self, reset: bool) -> dict[str, int]:
        with self.lock:
            values = {
                "bytes_sent": self.bytes_sent,
                "requests": self.requests,
                "gets": self.gets,
                "connections": self.connections,
            }
            if reset:
                self.bytes_sent = self.requests = self.gets = self.connections = 0
        return values


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Parse an HTTP ``Range`` header into an inclusive ``(first, last)`` byte pair.

    :param header: the header value, e.g. ``bytes=0-1023``, or ``None``.
    :param size: the object's size.
    :return: the range clipped to the object, or ``None`` for the whole object.
    :raises ValueError: for a range that cannot be satisfied or parsed.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise ValueError(f"unsupported range {header!r}")
    first_text, _, last_text = spec.strip().partition("-")
    if not first_text:
        length = int(last_text)
        if length <= 0:
            raise ValueError(f"empty suffix range {header!r}")
        return max(0, size - length), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if first >= size or last < first:
        raise ValueError(f"range {header!r} outside object of {size} bytes")
    return first, min(last, size - 1)


class S3Server(ThreadingHTTPServer):
    """The HTTP server; one handler thread per connection, as S3 clients expect."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], config: S3Config) -> None:
        super().__init__(address, _Handler)
        self.config = config
        self.stats = _Stats()
        self.link = Pacer(config.link_bytes_per_s)
        self.keys = sorted(config.objects)
        self.content = Content(list(config.objects), config.backing)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: S3Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pacer = Pacer(self.server.config.connection_bytes_per_s)
        with self.server.stats.lock:
            self.server.stats.connections += 1

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet: a request log would cost the CPU the bench measures."""

    # --- helpers -----------------------------------------------------------
    def _count(self, get: bool = False) -> None:
        with self.server.stats.lock:
            self.server.stats.requests += 1
            self.server.stats.gets += int(get)

    def _split(self) -> tuple[str, str, dict[str, str]]:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        bucket, _, key = urllib.parse.unquote(url.path).lstrip("/").partition("/")
        return bucket, key, query

    def _reply(self, status: int, body: bytes, content_type: str = "application/xml") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", "bench")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{escape(message)}</Message></Error>"
        ).encode()
        self._reply(status, body)

    def _object_headers(self, key: str, size: int) -> None:
        etag = hashlib.md5(f"{key}:{size}".encode(), usedforsecurity=False).hexdigest()
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Last-Modified", _LAST_MODIFIED)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("x-amz-request-id", "bench")

    # --- verbs --------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._count()
        time.sleep(self.server.config.first_byte_latency_s)
        bucket, key, _ = self._split()
        if bucket != self.server.config.bucket:
            self._error(404, "NoSuchBucket", bucket)
            return
        if not key:
            self._reply(200, b"")
            return
        size = self.server.config.objects.get(key)
        if size is None:
            self._error(404, "NoSuchKey", key)
            return
        self.send_response(200)
        self._object_headers(key, size)
        self.send_header("Content-Length", str(size))
        self.end_headers()

    def do_GET(self) -> None:
        bucket, key, query = self._split()
        if bucket == "_bench" and key == "stats":
            snapshot = self.server.stats.snapshot(reset="reset" in query)
            self._reply(200, json.dumps(snapshot).encode(), "application/json")
            return
        if bucket == "_bench" and key == "gets":
            gets = self.server.stats.get_log(reset="reset" in query)
            self._reply(200, json.dumps({"gets": gets}).encode(), "application/json")
            return
        self._count(get=True)
        time.sleep(self.server.config.first_byte_latency_s)
        if bucket != self.server.config.bucket:
            self._error(404, "NoSuchBucket", bucket)
        elif not key and "location" in query:
            self._reply(
                200,
                b'<?xml version="1.0" encoding="UTF-8"?>\n'
                b'<LocationConstraint xmlns="http://s3.amazonaws.com/doc/2006-03-01/"/>',
            )
        elif not key:
            self._list(query)
        else:
            self._get_object(key)

    def do_PUT(self) -> None:
        """Refuse writes: the mount is read-only and so is the store."""
        self._count()
        self._error(403, "AccessDenied", "the bench object store is read-only")

    def do_POST(self) -> None:
        """Refuse writes."""
        self.do_PUT()

    def do_DELETE(self) -> None:
        """Refuse writes."""
        self.do_PUT()

    def _get_object(self, key: str) -> None:
        size = self.server.config.objects.get(key)
        if size is None:
            self._error(404, "NoSuchKey", key)
            return
        try:
            byte_range = parse_range(self.headers.get("Range"), size)
        except ValueError as err:
            self._error(416, "InvalidRange", str(err))
            return
        first, last = byte_range if byte_range else (0, size - 1)
        entry: dict[str, object] = {"key": key, "first": first, "last": last, "sent": 0}
        entry["start"] = time.monotonic()
        try:
            self._send_object(key, size, byte_range is not None, first, last, entry)
        finally:
            entry["end"] = time.monotonic()
            self.server.stats.record(entry)

    def _send_object(
        self,
        key: str,
        size: int,
        partial: bool,
        first: int,
        last: int,
        entry: dict[str, object],
    ) -> None:
        length = last - first + 1 if size else 0
        self.send_response(206 if partial else 200)
        self._object_headers(key, size)
        self.send_header("Content-Length", str(length))
        if partial:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        offset = first
        end = first + length
        while offset < end:
            piece = min(_SEND_PIECE, end - offset)
            wait_for_slots(piece, self.pacer, self.server.link)
            try:
                self.wfile.write(self.server.content.read(key, offset, piece))
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                return
            offset += piece
            entry["sent"] = offset - first
            with self.server.stats.lock:
                self.server.stats.bytes_sent += piece

    def _list(self, query: dict[str, str]) -> None:
        version2 = query.get("list-type") == "2"
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        max_keys = int(query.get("max-keys", "1000") or 1000)
        after = query.get("continuation-token" if version2 else "marker", "")
        after = after or query.get("start-after", "")
        contents: list[str] = []
        prefixes: list[str] = []
        last_seen = ""
        truncated = False
        for key in self.server.keys:
            if not key.startswith(prefix) or (after and key <= after):
                continue
            entry = key
            if delimiter:
                cut = key.find(delimiter, len(prefix))
                if cut >= 0:
                    entry = key[: cut + len(delimiter)]
                    if prefixes and prefixes[-1] == entry:
                        continue
                    if after and entry <= after:
                        continue
            if len(contents) + len(prefixes) >= max_keys:
                truncated = True
                break
            if entry != key:
                prefixes.append(entry)
                last_seen = entry
            else:
                contents.append(key)
                last_seen = key
        out = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
            f"<Name>{escape(self.server.config.bucket)}</Name>",
            f"<Prefix>{escape(prefix)}</Prefix>",
            f"<MaxKeys>{max_keys}</MaxKeys>",
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>",
        ]
        if delimiter:
            out.append(f"<Delimiter>{escape(delimiter)}</Delimiter>")
        if version2:
            out.append(f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount>")
            if truncated:
                out.append(f"<NextContinuationToken>{escape(last_seen)}</NextContinuationToken>")
        else:
            out.append(f"<Marker>{escape(after)}</Marker>")
            if truncated:
                out.append(f"<NextMarker>{escape(last_seen)}</NextMarker>")
        for key in contents:
            size = self.server.config.objects[key]
            etag = hashlib.md5(f"{key}:{size}".encode(), usedforsecurity=False).hexdigest()
            out.append(
                f"<Contents><Key>{escape(key)}</Key><LastModified>{_ISO_MODIFIED}</LastModified>"
                f"<ETag>&quot;{etag}&quot;</ETag><Size>{size}</Size>"
                "<StorageClass>STANDARD</StorageClass></Contents>"
            )
        for entry in prefixes:
            out.append(f"<CommonPrefixes><Prefix>{escape(entry)}</Prefix></CommonPrefixes>")
        out.append("</ListBucketResult>")
        self._reply(200, "\n".join(out).encode())


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.s3server", description=__doc__)
    parser.add_argument("--manifest", required=True, help="JSON: {bucket, objects: {key: size}}")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="first-byte latency")
    parser.add_argument("--conn-mibps", type=float, default=32.0, help="per-connection cap, 0=none")
    parser.add_argument("--link-mibps", type=float, default=0.0, help="whole-server cap, 0=none")
    parser.add_argument("--backing", type=Path, help="serve BACKING/KEY instead of synthetic bytes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT.

    :param argv: command line, without the program name.
    :return: exit status.
    """
    args = _parse_args(argv)
    with open(args.manifest) as handle:
        manifest = json.load(handle)
    config = S3Config(
        bucket=manifest["bucket"],
        objects={str(key): int(size) for key, size in manifest["objects"].items()},
        first_byte_latency_s=args.latency_ms / 1000,
        connection_bytes_per_s=args.conn_mibps * 2**20 or None,
        link_bytes_per_s=args.link_mibps * 2**20 or None,
        backing=args.backing,
    )
    server = S3Server((args.host, args.port), config)

    def _stop(signum: int, frame: types.FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"READY {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
