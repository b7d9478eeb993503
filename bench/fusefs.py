"""A FUSE filesystem that reads like ossfs 2.0 or Mountpoint for S3.

Those clients serve concurrent reads of one file in parallel, but each
sequential stream is capped (one object GET at a time per stream, a first-byte
latency whenever a new stream starts). Concurrency inside one big file is the
only way to go fast through them, which is what this fixture measures.

The model, per file: a read that starts within ``window`` bytes of where an
existing stream left off continues that stream; any other read starts a new
stream and pays the first-byte latency. Each stream has its own bandwidth cap;
all streams share a link cap. Files are synthetic (:mod:`bench.pattern`), or real
files under ``--backing`` (:mod:`bench.content`), the
mount is read-only, and the kernel page cache is kept (``kernel_cache`` and
``keep_cache`` on every open), so a warm-up through this mount stays warm.

A tiny HTTP endpoint on loopback (``GET /stats``, ``GET /stats?reset=1``)
returns bytes and streams served, so the bench can prove a cold run really read
through the mount.

Run: ``python -m bench.fusefs MOUNTPOINT --manifest files.json``; prints
``READY <stats-port>`` once mounted and serves until unmounted or SIGTERM.
"""

import argparse
import errno
import json
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .content import Content
from .throttle import Pacer, wait_for_slots

__all__ = ["FuseConfig", "StreamTable", "main", "read_only_tree"]

_MTIME_NS = 1_700_000_000 * 10**9


@dataclass(frozen=True)
class FuseConfig:
    """What the fixture serves and how slowly."""

    files: dict[str, int]
    stream_bytes_per_s: float | None = 64 * 2**20
    link_bytes_per_s: float | None = 400 * 2**20
    first_byte_latency_s: float = 0.02
    window: int = 4 * 2**20
    idle_stream_s: float = 2.0
    backing: Path | None = None  # serve BACKING/path instead of synthetic bytes


@dataclass
class _Stream:
    next_offset: int
    last_used: float
    pacer: Pacer


@dataclass
class StreamTable:
    """Tracks the sequential streams open on each file and counts what was served."""

    config: FuseConfig
    lock: threading.Lock = field(default_factory=threading.Lock)
    streams: dict[str, list[_Stream]] = field(default_factory=dict)
    bytes_served: int = 0
    streams_started: int = 0
    reads: int = 0
    peak_streams: int = 0

    def stream_for(self, path: str, offset: int, size: int) -> tuple[Pacer, bool]:
        """Find the stream a read belongs to, or start one.

        :param path: file path inside the mount.
        :param offset: where the read starts.
        :param size: how many bytes it asks for.
        :return: the stream's pacer and whether the stream is new (pays latency).
        """
        now = time.monotonic()
        with self.lock:
            self.reads += 1
            self.bytes_served += size
            live = [
                stream
                for stream in self.streams.get(path, [])
                if now - stream.last_used < self.config.idle_stream_s
            ]
            for stream in live:
                if abs(offset - stream.next_offset) <= self.config.window:
                    stream.next_offset = max(stream.next_offset, offset + size)
                    stream.last_used = now
                    self.streams[path] = live
                    return stream.pacer, False
            stream = _Stream(offset + size, now, Pacer(self.config.stream_bytes_per_s))
            live.append(stream)
            self.streams[path] = live
            self.streams_started += 1
            self.peak_streams = max(self.peak_streams, sum(map(len, self.streams.values())))
            return stream.pacer, True

    def snapshot(self, reset: bool) -> dict[str, int]:
        """Return the counters, optionally zeroing them.

        :param reset: zero the counters and forget open streams afterwards.
        :return: bytes_served, streams_started, reads, peak_streams.
        """
        with self.lock:
            values = {
                "bytes_served": self.bytes_served,
                "streams_started": self.streams_started,
                "reads": self.reads,
                "peak_streams": self.peak_streams,
            }
            if reset:
                self.bytes_served = self.streams_started = self.reads = self.peak_streams = 0
                self.streams.clear()
        return values


class _Tree:
    """Directory structure derived from the manifest's file paths."""

    def __init__(self, files: dict[str, int]) -> None:
        self.files = {"/" + path.strip("/"): size for path, size in files.items()}
        self.dirs: dict[str, set[str]] = {"/": set()}
        for path in self.files:
            parts = path.strip("/").split("/")
            for depth in range(len(parts)):
                parent = "/" + "/".join(parts[:depth])
                parent = parent if parent != "/" else "/"
                self.dirs.setdefault(parent, set()).add(parts[depth])
                if depth < len(parts) - 1:
                    self.dirs.setdefault("/" + "/".join(parts[: depth + 1]), set())


def read_only_tree(files: dict[str, int]) -> Any:
    """The part every fixture filesystem shares: the tree of ``files``, read-only.

    An ``mfusepy.Operations`` class with ``getattr``, ``readdir`` and ``statfs`` for the
    files (path -> size) and the folders their paths imply, owned by root, modes 0444 and
    0555, one fixed mtime; subclasses add ``open`` and ``read`` (this fixture's parallel
    streams, tests/lib/fusefs.py's failures). ``self.files`` and ``self.content`` (the
    synthetic bytes of :class:`bench.content.Content`) are there for them.

    :param files: path inside the mount (with or without a leading ``/``) -> size.
    :return: the class (mfusepy is imported here: only the filesystem process needs it).
    """
    import mfusepy  # type: ignore[import-untyped]  # only the fixture process needs libfuse

    tree = _Tree(files)

    class ReadOnlyTree(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def __init__(self, backing: Path | None = None) -> None:
            self.files = tree.files
            self.content = Content(list(tree.files), backing)

        def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
            common = {"st_uid": 0, "st_gid": 0, "st_atime": _MTIME_NS}
            common.update(st_mtime=_MTIME_NS, st_ctime=_MTIME_NS)
            if path in tree.files:
                size = tree.files[path]
                return {
                    **common,
                    "st_mode": stat.S_IFREG | 0o444,
                    "st_nlink": 1,
                    "st_size": size,
                    "st_blocks": (size + 511) // 512,
                }
            if path in tree.dirs:
                return {**common, "st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
            raise mfusepy.FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh: int) -> list[str]:
            if path not in tree.dirs:
                raise mfusepy.FuseOSError(errno.ENOENT)
            return [".", "..", *sorted(tree.dirs[path])]

        def statfs(self, path: str) -> dict[str, int]:
            return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    return ReadOnlyTree


def _make_operations(config: FuseConfig, table: StreamTable) -> Any:
    import mfusepy

    link = Pacer(config.link_bytes_per_s)

    class ParallelStreamFS(read_only_tree(config.files)):  # type: ignore[misc]
        def open(self, path: str, fi: Any) -> int:
            if path not in self.files:
                raise mfusepy.FuseOSError(errno.ENOENT)
            if fi.flags & 3:  # O_WRONLY or O_RDWR
                raise mfusepy.FuseOSError(errno.EROFS)
            fi.keep_cache = 1  # keep the page cache across opens, as a warm-up needs
            return 0

        def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
            file_size = self.files.get(path)
            if file_size is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            size = max(0, min(size, file_size - offset))
            if size == 0:
                return b""
            pacer, new_stream = table.stream_for(path, offset, size)
            if new_stream:
                time.sleep(config.first_byte_latency_s)
            wait_for_slots(size, pacer, link)
            return self.content.read(path, offset, size)

    return ParallelStreamFS(config.backing)


def _serve_stats(table: StreamTable) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(table.snapshot(reset="reset" in self.path)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    """Mount the fixture in the foreground until unmounted.

    :param argv: command line, without the program name.
    :return: exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.fusefs", description=__doc__)
    parser.add_argument("mountpoint")
    parser.add_argument("--manifest", required=True, help="JSON: {files: {path: size}}")
    parser.add_argument("--stream-mibps", type=float, default=64.0, help="per-stream cap, 0=none")
    parser.add_argument("--link-mibps", type=float, default=400.0, help="all streams, 0=none")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="first byte of a stream")
    parser.add_argument("--backing", type=Path, help="serve BACKING/PATH, not synthetic bytes")
    args = parser.parse_args(argv)
    with open(args.manifest) as handle:
        manifest = json.load(handle)
    config = FuseConfig(
        files={str(path): int(size) for path, size in manifest["files"].items()},
        stream_bytes_per_s=args.stream_mibps * 2**20 or None,
        link_bytes_per_s=args.link_mibps * 2**20 or None,
        first_byte_latency_s=args.latency_ms / 1000,
        backing=args.backing,
    )
    table = StreamTable(config)
    stats = _serve_stats(table)
    operations = _make_operations(config, table)

    import mfusepy

    class _Ready(threading.Thread):
        def run(self) -> None:
            # FUSE() blocks in the main thread; announce readiness once the mount answers.
            import os

            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if os.path.ismount(args.mountpoint):
                    print(f"READY {stats.server_address[1]}", flush=True)
                    return
                time.sleep(0.02)
            print("FAILED mount did not appear", flush=True)

    _Ready(daemon=True).start()
    mfusepy.FUSE(
        operations,
        args.mountpoint,
        foreground=True,
        raw_fi=True,
        ro=True,
        kernel_cache=True,
        attr_timeout=3600,
        entry_timeout=3600,
        fsname="bench-parallel-streams",
    )
    stats.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
