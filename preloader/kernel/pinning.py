"""Pinning: keep files' pages resident with ``mmap`` + ``mlock(2)``, as ``vmtouch -l`` does.

Part of the kernel layer: synchronous, one kind of call, plain values. A pinned page
cannot be reclaimed, neither by memory pressure nor by ``POSIX_FADV_DONTNEED``, for as
long as the mapping lives; the pages stay charged to the memory cgroup that read them.
Locking needs ``CAP_IPC_LOCK`` or room under ``RLIMIT_MEMLOCK`` (often only 8 MiB in a
container), so :func:`memlock_permission` is asked first and a refusal is explained.

A mapping keeps its file referenced after the descriptor is closed: no descriptor stays
open while pages are pinned, but on a FUSE mount the client keeps the file open until the
pin is released. Whatever the client keeps for an open stays that long: s3fs writes what
it fetches for an open to a temporary file on its disk, shared by every open of the file
at the time, so a file is pinned through an open of its own, made after the read, which
fetches nothing (its temporary file stays empty unless another open of the file, a
server's, holds the copy the read made).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import threading
from collections.abc import Collection
from dataclasses import dataclass

from ..units import format_bytes
from . import pagecache
from .fileread import open_planned
from .procfs import parse_cap_eff, read_text

__all__ = [
    "MemlockPermission",
    "Pin",
    "PinSet",
    "lock_file",
    "lowest_cpu_priority",
    "memlock_permission",
    "parse_vm_locked",
    "unlock",
]

_CAP_IPC_LOCK = 14

_HOW_TO_ALLOW = (
    "raise RLIMIT_MEMLOCK (ulimit -l; the container runtime's memlock ulimit) or grant "
    "CAP_IPC_LOCK (Kubernetes: securityContext.capabilities.add: [IPC_LOCK])"
)


def parse_vm_locked(status_text: str) -> int:
    """Bytes this process has locked (``VmLck``) from ``/proc/self/status`` text."""
    for line in status_text.splitlines():
        if line.startswith("VmLck:"):
            parts = line.split()
            return int(parts[1]) * (1024 if len(parts) > 2 and parts[2] == "kB" else 1)
    return 0


@dataclass(frozen=True)
class MemlockPermission:
    """Whether this process may lock memory, and how much.

    :ivar cap_ipc_lock: the process holds ``CAP_IPC_LOCK`` (no limit applies).
    :ivar soft_limit: ``RLIMIT_MEMLOCK`` soft limit in bytes, ``None`` for unlimited.
    :ivar locked_bytes: bytes this process has locked already.
    """

    cap_ipc_lock: bool
    soft_limit: int | None
    locked_bytes: int = 0

    def refusal(self, nbytes: int) -> str | None:
        """Why locking ``nbytes`` more would fail, or ``None`` when it is allowed."""
        if self.cap_ipc_lock or self.soft_limit is None:
            return None
        if self.locked_bytes + nbytes <= self.soft_limit:
            return None
        return (
            f"pinning {format_bytes(nbytes)} needs CAP_IPC_LOCK or RLIMIT_MEMLOCK of at "
            f"least that, but RLIMIT_MEMLOCK is {format_bytes(self.soft_limit)} and the "
            f"process lacks CAP_IPC_LOCK: {_HOW_TO_ALLOW}"
        )


def memlock_permission() -> MemlockPermission:
    """Read this process's ``CAP_IPC_LOCK``, ``RLIMIT_MEMLOCK`` and ``VmLck``."""
    text = read_text("/proc/self/status") or ""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return MemlockPermission(
        cap_ipc_lock=bool(parse_cap_eff(text) >> _CAP_IPC_LOCK & 1),
        soft_limit=None if soft == resource.RLIM_INFINITY else soft,
        locked_bytes=parse_vm_locked(text),
    )


def lowest_cpu_priority() -> None:
    """Run the calling thread, and only it, at nice 19 (on Linux a thread has its own nice
    value), so the work it does takes only CPU time nothing else wants. Best effort: a
    refusal leaves the priority as it was.

    Locking is CPU work (every page of the file is mapped and moved to the unevictable
    list, ~0.15 s per GiB from local disk) that nothing waits for.
    """
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def lock_file(fd: int, length: int) -> int:
    """Map the first ``length`` bytes of an open file and lock them into memory.

    Pages not yet cached are read in by ``mlock`` itself.

    :return: the mapping's address, for :func:`unlock`.
    :raises OSError: ``ENOMEM``/``EPERM``/``EAGAIN`` from ``mlock`` when the limit or the
        missing capability forbids it (the message says which and what to do), or an
        ``mmap`` error.
    """
    addr = pagecache.map_shared(fd, length)
    try:
        pagecache.lock_range(addr, length)
    except OSError as err:
        pagecache.unmap(addr, length)
        detail = os.strerror(err.errno) if err.errno else str(err)
        if err.errno in (errno.ENOMEM, errno.EPERM, errno.EAGAIN):
            detail += f": RLIMIT_MEMLOCK or a missing CAP_IPC_LOCK forbids it; {_HOW_TO_ALLOW}"
        raise OSError(err.errno, f"mlock: {detail}") from err
    return addr


def unlock(addr: int, length: int) -> None:
    """Unlock and unmap a mapping made by :func:`lock_file`."""
    pagecache.unlock_range(addr, length)
    pagecache.unmap(addr, length)


@dataclass(frozen=True)
class Pin:
    """One locked mapping: the first ``length`` bytes of ``path``."""

    path: str
    addr: int
    length: int


class PinSet:
    """The mappings this process holds locked; :meth:`release` unlocks them all.

    Thread-safe: worker threads :meth:`add` while a front end reads :attr:`pinned_bytes`.
    """

    def __init__(self) -> None:
        self._pins: list[Pin] = []
        self._lock = threading.Lock()

    def pin(
        self,
        path: str,
        length: int,
        dev: int | None = None,
        ino: int | None = None,
        mtime_ns: int | None = None,
    ) -> Pin:
        """Open ``path`` read-only, lock its first ``length`` bytes, close it again.

        :raises OSError: when it cannot be opened, is no longer the planned file, or
            cannot be locked.
        """
        fd = open_planned(path, dev, ino, mtime_ns, blocking=False)
        try:
            length = min(length, os.fstat(fd).st_size)
            addr = lock_file(fd, length) if length > 0 else 0
        finally:
            os.close(fd)
        pin = Pin(path, addr, length)
        with self._lock:
            self._pins.append(pin)
        return pin

    @property
    def pins(self) -> tuple[Pin, ...]:
        with self._lock:
            return tuple(self._pins)

    @property
    def pinned_bytes(self) -> int:
        with self._lock:
            return sum(p.length for p in self._pins)

    def release(self, only: Collection[Pin] | None = None) -> int:
        """Unlock everything, or only the pins in ``only``; return the bytes released."""
        with self._lock:
            if only is None:
                pins, self._pins = self._pins, []
            else:
                pins = [p for p in self._pins if p in only]
                self._pins = [p for p in self._pins if p not in only]
        for pin in pins:
            if pin.length:
                unlock(pin.addr, pin.length)
        return sum(p.length for p in pins)
