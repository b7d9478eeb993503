"""The worker-thread side of a read pass: open, read with fallback, hand results back.

Everything here runs in a worker thread (or is the bookkeeping it shares with the event
loop, as :class:`FileState` documents); the scheduling lives in :mod:`.readpass` and
:mod:`.schedule`, the syscalls in :mod:`preloader.kernel.fileread`.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio

from ..kernel import fileread, pagecache
from ..planning.specs import Chunk, FileSpec
from ..units import PAGE_SIZE
from .events import ErrorReason
from .prefetch import may_prefetch, prefetch

__all__ = [
    "STOP_GRACE_SECONDS",
    "FileState",
    "Handoff",
    "Outcome",
    "after_read",
    "cancel_after_stop",
    "describe",
    "open_regular",
    "read_with_fallback",
    "record_failure",
    "slide_deadline",
    "still_planned",
    "whole_files_in_thread",
]

# errnos with which a filesystem says "not this way"; the engine then tries the next
# read method for that file instead of counting an error.
_REFUSALS = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENODEV, errno.EXDEV})
_FALLBACK = {"sendfile": "read", "mmap": "read"}

# Once stop is set (a signal, or --timeout), reads notice it within one 8 MiB step; one
# stuck in the kernel (storage that stopped answering) is abandoned after this long.
STOP_GRACE_SECONDS = 1.0
_STOP_POLL_SECONDS = 0.05
# When each stop event was first seen set (see cancel_after_stop); gone with the event.
_STOP_SEEN: weakref.WeakKeyDictionary[threading.Event, float] = weakref.WeakKeyDictionary()

# What the ahead-open of a small file found (see _open_ahead).
_PREFETCHED = "prefetched"
_CACHED = "cached"


def open_regular(spec: FileSpec, blocking: bool = True) -> int:
    """Open a planned file read-only, refusing anything that is no longer that file.

    :func:`~preloader.kernel.fileread.open_planned` for a :class:`FileSpec`: the identity
    check (:func:`~preloader.kernel.identity.is_planned`) refuses a file replaced under the
    same name.

    :param blocking: clear ``O_NONBLOCK`` once it is known to be the planned file (for
        reading); ``False`` leaves it set, for a descriptor only measured.
    """
    return fileread.open_planned(spec.path, spec.dev, spec.ino, spec.mtime_ns, blocking)


def describe(err: OSError) -> str:
    return err.strerror or str(err)


def record_failure(outcome: Outcome, err: OSError) -> None:
    """Note a failed chunk in ``outcome``, with the reason named where it happened."""
    outcome.error = describe(err)
    outcome.reason = "changed" if isinstance(err, fileread.FileChangedError) else "read"


class FileState:
    """Per-file bookkeeping; touched only on the event loop (except the fd open)."""

    # One of these per planned file: slots keep 100,000 of them small.
    __slots__ = (
        "_open_lock",
        "chunks_left",
        "chunks_total",
        "error",
        "fd",
        "in_flight",
        "method",
        "read_bytes",
        "resident_after_read",
        "spec",
        "stalled",
    )

    def __init__(self, spec: FileSpec, chunks: int, method: str) -> None:
        self.spec = spec
        self.chunks_total = chunks
        self.chunks_left = chunks
        self.in_flight = 0
        self.method = method
        self.fd: int | None = None
        self.read_bytes = 0
        self.error: str | None = None
        self.resident_after_read: int | None = None
        self.stalled = False
        # Only a file read in several chunks shares its descriptor between threads.
        self._open_lock = threading.Lock() if chunks > 1 else None

    def ensure_open(self) -> int:
        """Runs in a worker thread: the first chunk's worker opens, the others share."""
        assert self._open_lock is not None, "whole small files open their own descriptor"
        with self._open_lock:
            if self.fd is None:
                self.fd = open_regular(self.spec)
            return self.fd


@dataclass(slots=True)
class Outcome:
    """What a worker thread did with one chunk; applied to the file on the event loop."""

    read_bytes: int = 0
    method: str = ""
    fallback: str | None = None
    resident_after_read: int | None = None
    error: str | None = None
    reason: ErrorReason = "read"


def read_with_fallback(
    fd: int,
    chunk: Chunk,
    method: str,
    stop: Callable[[], bool],
    outcome: Outcome,
    skip_cached: bool = True,
    on_step: fileread.Step | None = None,
) -> None:
    """Bring ``chunk`` into the page cache with ``method``, falling back where refused.

    A chunk whose every page is cached already is not read again (one ``cachestat``):
    warming a warm model costs no I/O and almost no CPU. Its bytes count as read.

    :param skip_cached: ``False`` for a chunk just prefetched: cachestat counts pages
        whose read is still in flight (or failed), so only the read tells it is there.
    :param on_step: told the bytes read so far after every step (see
        :func:`.fileread.read_range`); a fallback starts again from 0.
    """
    if skip_cached and _all_cached(fd, chunk):
        outcome.read_bytes = chunk.length
        outcome.method = method
        return
    while True:
        try:
            outcome.read_bytes = fileread.read_range(
                fd, chunk.offset, chunk.length, method, stop, on_step
            )
            outcome.method = method
            return
        except OSError as err:
            if err.errno in _REFUSALS and method in _FALLBACK:
                outcome.fallback = f"{method} -> {_FALLBACK[method]}: {describe(err)}"
                method = _FALLBACK[method]
                continue
            # Which range failed tells a bad object or disk region from a dead mount.
            last = chunk.offset + max(chunk.length, 1) - 1
            raise OSError(
                err.errno, f"{describe(err)} reading bytes {chunk.offset}-{last}"
            ) from err


def _all_cached(fd: int, chunk: Chunk) -> bool:
    """Whether every page of ``chunk`` is in the page cache; ``False`` when unknown.

    A file that no longer reaches the chunk's end is never "cached": reading it is what
    tells that it shrank (cachestat may still count the pages a truncate left behind).
    """
    if chunk.length <= 0:
        return False
    try:
        if os.fstat(fd).st_size < chunk.offset + chunk.length:
            return False
        cached = pagecache.range_resident_pages(fd, chunk.offset, chunk.length)
    except (pagecache.ResidencyUnknownError, OSError):
        return False
    return cached >= -(-chunk.length // PAGE_SIZE)


def after_read(fd: int, size: int) -> int | None:
    # Measured on the same descriptor: a filesystem that drops the cache at every open
    # would otherwise hide that reading did populate it.
    try:
        return pagecache.fd_residency(fd, size)
    except (pagecache.ResidencyUnknownError, OSError):
        return None


class Handoff:
    """Results a worker thread hands back one by one, so a stall blames only its file.

    Once the event loop gives up on the thread (:meth:`abandon`), the thread hands back
    nothing more and stops at its next file.

    :ivar last_put: :func:`time.monotonic` of the last result handed back (of the
        hand-off's creation before the first): a per-file deadline runs from it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._results: list[object] = []
        self.last_put = time.monotonic()

    def put(self, result: object) -> bool:
        with self._lock:
            if not self._abandoned:
                self._results.append(result)
                self.last_put = time.monotonic()
            return not self._abandoned

    def abandon(self) -> list[object]:
        with self._lock:
            self._abandoned = True
            return list(self._results)

    @property
    def abandoned(self) -> bool:
        return self._abandoned


def still_planned(spec: FileSpec) -> None:
    """Refuse a file whose path now names another file than the planned one.

    For a descriptor opened ahead of its read: the check :func:`open_regular` made at the
    open, made again once the file has been read, so a file replaced in between is
    ``changed`` and never counted warm.

    :raises ~preloader.kernel.fileread.FileChangedError: replaced, or no longer a regular
        file.
    :raises OSError: the path is gone (deleted since).
    """
    fileread.check_planned(os.stat(spec.path), spec.dev, spec.ino, spec.mtime_ns)


def _open_ahead(
    specs: Sequence[FileSpec], batch: Sequence[Chunk], stop: Callable[[], bool]
) -> tuple[list[int | OSError | None], list[str | None]]:
    """Open and prefetch every file of ``batch`` that :func:`may_prefetch` allows.

    A file whose pages are all cached already is opened but not prefetched, and its read
    is skipped without asking again.

    :return: per file, its open descriptor, why it could not be opened, or ``None``
        (not looked at: opened when its turn comes); and per file :data:`_PREFETCHED`,
        :data:`_CACHED` or ``None``.
    """
    ahead: list[int | OSError | None] = [None] * len(batch)
    looked: list[str | None] = [None] * len(batch)
    for position, chunk in enumerate(batch):
        spec = specs[position]
        if stop() or not may_prefetch(spec):
            continue
        try:
            fd = open_regular(spec)
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE):  # out of descriptors: no more ahead
                break
            ahead[position] = err
            continue
        ahead[position] = fd
        if _all_cached(fd, chunk):
            looked[position] = _CACHED
        else:
            prefetch(fd, chunk.offset, chunk.length)
            looked[position] = _PREFETCHED
    return ahead, looked


async def slide_deadline(scope: anyio.CancelScope, handoff: Handoff, seconds: float) -> None:
    """Keep ``scope``'s deadline ``seconds`` after ``handoff``'s last result, for ever.

    Start it inside ``scope`` beside a thread that works through a batch of files: the
    scope is cancelled once one file has taken ``seconds``, however long the batch runs.
    """
    while True:
        left = handoff.last_put + seconds - time.monotonic()
        scope.deadline = anyio.current_time() + left
        # Wake before the deadline, to move it if a result came in meanwhile.
        await anyio.sleep(max(0.0, min(left, seconds / 4)))


def whole_files_in_thread(
    specs: Sequence[FileSpec],
    batch: Sequence[Chunk],
    method: str,
    stop: Callable[[], bool],
    handoff: Handoff,
) -> bool:
    """Open, read, measure and close each small file in one thread hand-off.

    Where :mod:`preloader.engine.prefetch` allows it, the files of the batch are opened and
    prefetched first, then read one by one; a file opened ahead is checked again after
    its read (:func:`still_planned`).

    :param specs: the files of ``batch``, in its order (made once, on the event loop).
    :return: ``True`` once every file of the batch was handed back.
    """
    if len(batch) > 1:
        ahead, looked = _open_ahead(specs, batch, stop)
    else:
        ahead, looked = [None], [None]
    try:
        for position, chunk in enumerate(batch):
            outcome = Outcome(method=method)
            if not stop() and not handoff.abandoned:
                spec = specs[position]
                opened, ahead[position] = ahead[position], None
                try:
                    if isinstance(opened, OSError):
                        raise opened
                    fd = open_regular(spec) if opened is None else opened
                    try:
                        _read_whole(fd, spec, chunk, method, stop, outcome, looked[position])
                        if opened is not None:
                            still_planned(spec)
                    finally:
                        os.close(fd)
                except OSError as err:
                    record_failure(outcome, err)
            if not handoff.put(outcome):
                return False
        return True
    finally:
        for left in ahead:  # a stop or an abandoned hand-off leaves some unread
            if isinstance(left, int):
                os.close(left)


def _read_whole(
    fd: int,
    spec: FileSpec,
    chunk: Chunk,
    method: str,
    stop: Callable[[], bool],
    outcome: Outcome,
    looked: str | None,
) -> None:
    """Read one whole small file and measure it, on what :func:`_open_ahead` found."""
    if looked == _CACHED and os.fstat(fd).st_size >= chunk.offset + chunk.length:
        # Every page was cached at the ahead-open, and the file still reaches the chunk's
        # end (one that shrank since is read, and the read says so): no read, and a chunk
        # of the whole file is resident whole.
        outcome.read_bytes = chunk.length
        if chunk.offset == 0 and chunk.length >= spec.size:
            outcome.resident_after_read = spec.size
            return
    else:
        read_with_fallback(fd, chunk, method, stop, outcome, skip_cached=looked is None)
    outcome.resident_after_read = after_read(fd, spec.size)


async def cancel_after_stop(
    stop: threading.Event, scope: anyio.CancelScope, grace: float = STOP_GRACE_SECONDS
) -> None:
    """Cancel ``scope`` once ``stop`` has been set for ``grace`` seconds.

    Work that polls ``stop`` ends on its own well within the grace; this bounds the rest
    (a read or an open stuck in the kernel on storage that stopped answering). The grace
    runs from when the stop was first seen, by this call or an earlier stage's: a
    verification that starts after a stopped read pass gets what is left of it, not a
    grace of its own, so a stop waits one grace in all.
    """
    while not stop.is_set():
        await anyio.sleep(_STOP_POLL_SECONDS)
    seen = _STOP_SEEN.setdefault(stop, time.monotonic())
    await anyio.sleep(max(0.0, seen + grace - time.monotonic()))
    scope.cancel()
