"""FUSE filesystems that fail the way real model storage does, for the reliability matrix.

The filesystem runs in its own process (``python tests/lib/fusefs.py MOUNTPOINT SPEC``) on
mfusepy (ctypes over libfuse3), so a read that never returns blocks that process, never
the test. It serves synthetic files from a JSON spec and misbehaves on request (the
read-only tree and the bytes are the bench fixture's, :func:`bench.fusefs.read_only_tree`):

- ``cache``: ``keep`` (the page cache survives every open, as a warm-up needs), ``drop``
  (no ``keep_cache``: the kernel invalidates the file's cache at each open, as
  ``rclone mount`` without a cache does) or ``direct`` (``direct_io``: reads bypass the
  page cache entirely).
- per file ``eio``: ``[[start, end], ...]`` byte ranges whose reads fail with EIO.
- per file ``stall_from``: reads at or past this offset never return.
- per file ``stall_open``: the Nth open of the file (1-based) never returns.
- per file ``gate_from``: reads at or past this offset wait until the test calls
  :meth:`FuseMount.release` (so it can change other files at a known moment).
- per file ``rate``: bytes per second the file is served at, all its readers together
  (:class:`bench.throttle.Pacer`), so a warm-up through it lasts long enough to watch.
- per file ``retime_at_open``: from the Nth open of the file (1-based) on, its
  modification time is a second later (the file was replaced under the same name).
- ``stall_readdir``: listing these directories never returns.
- ``fresh_inodes``: every ``getattr`` gives a new inode number (mounted with ``use_ino``
  and no attribute or entry caching), as libfuse's high-level API does for a file whose
  dentry the kernel forgot (s3fs, ossfs): the inode a file was planned with is gone by
  the next ``stat``, while its size and modification time stay the same.

It speaks one line per event on stdout, which the test side collects and waits on
(synchronising on what happened, never on sleeps): ``READY``, ``OPEN path``,
``READ path offset size``, ``STALL <op> path [offset]`` when an operation starts to hang,
and ``MUTATE <op> path`` for any attempt to change the tree (always refused with EROFS):
the proof that preloader never writes.

:class:`FuseMount` mounts it for a test and always unmounts (lazily when something still
hangs) and kills the process, whatever the test did.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["FuseMount", "served_bytes"]


def served_bytes(name: str, offset: int, size: int) -> bytes:
    """What the filesystem serves for file ``name`` (the bench fixtures' synthetic bytes)."""
    from bench.content import Content

    path = "/" + name.strip("/")
    return Content([path]).read(path, offset, size)


class FuseMount:
    """A running fixture filesystem, mounted at ``mountpoint``.

    :param mountpoint: an empty directory.
    :param spec: ``{"cache": ..., "files": {name: {"size": N, ...}}, "stall_readdir": [...]}``.
    """

    def __init__(self, mountpoint: Path, spec: dict[str, Any]) -> None:
        self.mountpoint = mountpoint
        self.spec = spec
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def path(self, name: str) -> Path:
        return self.mountpoint / name

    def __enter__(self) -> FuseMount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [sys.executable, __file__, str(self.mountpoint), json.dumps(self.spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        try:
            self.wait_for("READY", timeout=20)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        # Lazy: a preloader thread may still hang in this mount; detach it anyway.
        subprocess.run(
            ["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True, check=False
        )
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)  # aborts the connection: hung reads fail
        if self._proc is not None:
            self._proc.wait(timeout=20)
        if self._reader is not None:
            self._reader.join(timeout=20)
        if self._proc is not None:
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    pipe.close()

    def release(self) -> None:
        """Let reads waiting at a ``gate_from`` go on."""
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write("RELEASE\n")
        self._proc.stdin.flush()

    def _collect(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("EXITED")
            self._changed.notify_all()

    def wait_for(self, prefix: str, timeout: float = 30) -> str:
        """Block until the filesystem printed a line starting with ``prefix``; return it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                if "EXITED" in self.lines:
                    raise AssertionError(f"fuse fixture exited before {prefix!r}: {self.lines}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {prefix!r} from the fuse fixture: {self.lines}")
                self._changed.wait(left)

    def events(self, kind: str) -> list[list[str]]:
        """Every event line of ``kind`` (``READ``, ``OPEN``, ``MUTATE`` ...), split."""
        with self._changed:
            return [line.split(" ") for line in self.lines if line.split(" ")[0] == kind]

    def bytes_served(self, name: str) -> int:
        return sum(int(event[3]) for event in self.events("READ") if event[1] == "/" + name)


# ---------------------------------------------------------------- the filesystem process


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _operations(spec: dict[str, Any]) -> Any:
    import mfusepy  # type: ignore[import-untyped]  # only the filesystem process needs it

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the bench package
    from bench.fusefs import read_only_tree
    from bench.throttle import Pacer, wait_for_slots

    files: dict[str, dict[str, Any]] = {"/" + k.strip("/"): v for k, v in spec["files"].items()}
    stall_readdir = {"/" + p.strip("/") for p in spec.get("stall_readdir", [])}
    cache = spec.get("cache", "keep")
    pacers = {path: Pacer(entry.get("rate")) for path, entry in files.items()}
    opens: dict[str, int] = {}
    lock = threading.Lock()
    never = threading.Event()  # waited on by hung operations; nobody ever sets it
    gate = threading.Event()
    fresh_inodes = bool(spec.get("fresh_inodes"))
    inodes = iter(range(1000, 2**62))

    def listen() -> None:
        for line in sys.stdin:
            if line.strip() == "RELEASE":
                gate.set()

    threading.Thread(target=listen, daemon=True).start()

    def refuse(op: str) -> Callable[..., Any]:
        def refused(self: Any, path: str, *args: object) -> Any:
            _say(f"MUTATE {op} {path}")
            raise mfusepy.FuseOSError(errno.EROFS)

        return refused

    class FailingFS(read_only_tree({p: int(e["size"]) for p, e in files.items()})):  # type: ignore[misc]
        def init(self, path: str) -> None:
            _say("READY")

        def getattr(self, path: str, fh: object = None) -> dict[str, int]:
            attrs: dict[str, int] = super().getattr(path, fh)
            retime = files.get(path, {}).get("retime_at_open")
            if retime is not None and opens.get(path, 0) >= retime:
                attrs["st_mtime"] += 10**9
                attrs["st_ctime"] += 10**9
            if fresh_inodes:
                with lock:
                    attrs["st_ino"] = next(inodes)
            return attrs

        def readdir(self, path: str, fh: int) -> list[str]:
            if path in stall_readdir:
                _say(f"STALL readdir {path}")
                never.wait()
            names: list[str] = super().readdir(path, fh)
            if not fresh_inodes:
                return names
            with lock:  # an entry without an inode number is skipped by readdir(3)
                return [(name, {"st_ino": next(inodes)}, 0) for name in names]  # type: ignore[misc]

        def open(self, path: str, fi: Any) -> int:
            if path not in files:
                raise mfusepy.FuseOSError(errno.ENOENT)
            if fi.flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                _say(f"MUTATE open-for-write {path}")
                raise mfusepy.FuseOSError(errno.EROFS)
            with lock:
                opens[path] = opens.get(path, 0) + 1
                count = opens[path]
            _say(f"OPEN {path} {count}")
            if files[path].get("stall_open") == count:
                _say(f"STALL open {path}")
                never.wait()
            fi.keep_cache = 1 if cache == "keep" else 0
            fi.direct_io = 1 if cache == "direct" else 0
            return 0

        def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
            entry = files.get(path)
            if entry is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            size = max(0, min(size, int(entry["size"]) - offset))
            stall_from = entry.get("stall_from")
            if stall_from is not None and offset + size > stall_from:
                _say(f"STALL read {path} {offset}")
                never.wait()
            gate_from = entry.get("gate_from")
            if gate_from is not None and offset + size > gate_from and not gate.is_set():
                _say(f"GATE read {path} {offset}")
                gate.wait()
            for start, end in entry.get("eio", []):
                if offset < end and offset + size > start:
                    _say(f"EIO {path} {offset}")
                    raise mfusepy.FuseOSError(errno.EIO)
            wait_for_slots(size, pacers[path])
            _say(f"READ {path} {offset} {size}")
            data: bytes = self.content.read(path, offset, size)
            return data

        chmod = refuse("chmod")
        chown = refuse("chown")
        truncate = refuse("truncate")
        utimens = refuse("utimens")
        write = refuse("write")
        create = refuse("create")
        unlink = refuse("unlink")
        mkdir = refuse("mkdir")
        rmdir = refuse("rmdir")
        rename = refuse("rename")
        symlink = refuse("symlink")
        link = refuse("link")
        mknod = refuse("mknod")
        setxattr = refuse("setxattr")
        removexattr = refuse("removexattr")

    return FailingFS()


def main(argv: list[str]) -> int:
    import mfusepy

    mountpoint, spec_text = argv
    spec = json.loads(spec_text)
    # Inode numbers renumbered at every lookup: the kernel must ask each time.
    renumber: dict[str, Any] = (
        {"use_ino": True, "attr_timeout": 0, "entry_timeout": 0} if spec.get("fresh_inodes") else {}
    )
    # Die with the test run: a parent that vanished must not leave a mount behind.
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    mfusepy.FUSE(
        _operations(spec),
        mountpoint,
        raw_fi=True,
        foreground=True,
        fsname="preloader-test",
        subtype="failingfs",
        **renumber,
    )
    return 0


def _exit_with_parent(parent: int) -> None:
    # Polls the parent's pid: a test run that died must not leave a mount behind.
    while True:
        select.select([], [], [], 1.0)
        if os.getppid() != parent:
            subprocess.run(["fusermount3", "-u", "-z", sys.argv[1]], check=False)
            os._exit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
