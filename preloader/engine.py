"""The async engine: read a plan's chunks on worker threads, then verify residency.

The event loop only schedules: every blocking call (open, sendfile, cachestat, close)
runs in a worker thread through :func:`anyio.to_thread.run_sync` with a
:class:`anyio.CapacityLimiter`. The engine never prints; it updates a
:class:`WarmProgress` that front ends poll and calls an optional event callback.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import anyio.to_thread

from . import pagecache
from .planner import Chunk, FileSpec, Plan, Skipped, iter_chunks
from .schedule import SPLIT_MODES, Schedule, Stream, split_rule

__all__ = [
    "AUTO_CONCURRENCY",
    "STOP_GRACE_SECONDS",
    "ChunkResidency",
    "EngineEvent",
    "FileResidency",
    "FileResult",
    "ResidencyReport",
    "RewarmReport",
    "WarmOptions",
    "WarmProgress",
    "WarmReport",
    "cancel_after_stop",
    "effective_chunk_size",
    "evict_plan",
    "measure_chunks",
    "measure_residency",
    "rewarm_chunks",
    "warm_plan",
]

AUTO_CONCURRENCY = 0
"""``concurrency`` value that asks the engine to find the knee itself."""

# errnos with which a filesystem says "not this way"; the engine then tries the next
# read method for that file instead of counting an error.
_REFUSALS = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENODEV, errno.EXDEV})
_FALLBACK = {"sendfile": "read", "mmap": "read"}

_T = TypeVar("_T")
_I = TypeVar("_I")
_R = TypeVar("_R")

# auto starts at the fixed default, so it never reads slower than leaving -c alone, and
# doubles from there.
_AUTO_START = 4
_AUTO_MAX = 64
# auto cuts the plan into at least this many chunks (down to _AUTO_MIN_CHUNK each), so
# the tuner sees enough chunks complete to measure a rate before the plan runs out.
_AUTO_MIN_CHUNKS = 64
_AUTO_MIN_CHUNK = 16 * 1024 * 1024
_AUTO_MIN_GAIN = 1.10
_AUTO_WINDOW_SECONDS = 0.5

# A file counts as resident when at least this share of it is; the last page and races
# with concurrent eviction make exact equality too strict.
_RESIDENT_SHARE = 0.999

# Once stop is set (a signal, or --timeout), reads notice it within one 8 MiB step; one
# stuck in the kernel (storage that stopped answering) is abandoned after this long.
STOP_GRACE_SECONDS = 1.0
_STOP_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class WarmOptions:
    """How the engine reads.

    :ivar concurrency: parallel chunk reads; :data:`AUTO_CONCURRENCY` to tune it.
    :ivar chunk_size: bytes per chunk (rounded to whole pages).
    :ivar method: ``auto`` (= ``sendfile``), ``sendfile``, ``mmap`` or ``read``.
    :ivar timeout: seconds for the whole read pass; ``None`` for no limit.
    :ivar read_timeout: seconds one chunk may take before its file is given up as stalled.
    :ivar verify: re-open every file after the pass and measure residency.
    :ivar split: when one file may be read by several workers at once (only ever at the
        tail of a pass, see :mod:`preloader.schedule`): ``auto`` (where the storage gains
        from it), ``always`` or ``never``.
    """

    concurrency: int = 4
    chunk_size: int = 64 * 1024 * 1024
    method: str = "auto"
    timeout: float | None = None
    read_timeout: float | None = None
    verify: bool = True
    split: str = "auto"

    def __post_init__(self) -> None:
        if self.concurrency < 0:
            raise ValueError("concurrency must be >= 1 (or 0 for auto)")
        if self.chunk_size < pagecache.PAGE_SIZE:
            raise ValueError(f"chunk_size must be at least one page ({pagecache.PAGE_SIZE})")
        if self.method not in ("auto", "sendfile", "mmap", "read"):
            raise ValueError(f"unknown read method {self.method!r}")
        if self.split not in SPLIT_MODES:
            raise ValueError(f"unknown split mode {self.split!r}")


@dataclass
class WarmProgress:
    """Live counters, written by the engine on the event loop, read by front ends."""

    state: str = "planning"
    files_total: int = 0
    bytes_total: int = 0
    files_done: int = 0
    bytes_read: int = 0
    errors: int = 0
    concurrency: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Bytes per second since the start."""
        elapsed = self.elapsed
        return self.bytes_read / elapsed if elapsed > 0 else 0.0


@dataclass(frozen=True)
class EngineEvent:
    """Something a front end may want to log as it happens.

    :ivar kind: ``file_error``, ``method_fallback``, ``not_resident``, ``state`` or
        ``concurrency``.
    """

    kind: str
    path: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class FileResidency:
    """Residency of one file: bytes, or ``None`` with the reason it is unknown."""

    path: str
    size: int
    resident_bytes: int | None
    reason: str | None = None

    @property
    def resident_ratio(self) -> float | None:
        if self.resident_bytes is None:
            return None
        return self.resident_bytes / self.size if self.size else 1.0

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "bytes": self.size,
            "resident_bytes": self.resident_bytes,
            "resident_ratio": self.resident_ratio,
            "reason": self.reason,
        }


def _total_resident(items: Sequence[FileResidency]) -> tuple[int | None, str | None]:
    unknown = [item for item in items if item.resident_bytes is None]
    if unknown:
        first = unknown[0]
        return (
            None,
            f"{len(unknown)} of {len(items)} files unknown; first {first.path}: {first.reason}",
        )
    return sum(item.resident_bytes or 0 for item in items), None


@dataclass(frozen=True)
class ResidencyReport:
    """Residency of a plan's files, as ``preloader status`` shows it."""

    files: tuple[FileResidency, ...]
    skipped: tuple[Skipped, ...] = ()

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def resident_bytes(self) -> int | None:
        return _total_resident(self.files)[0]

    @property
    def residency_unknown_reason(self) -> str | None:
        return _total_resident(self.files)[1]

    @property
    def resident_ratio(self) -> float | None:
        resident = self.resident_bytes
        if resident is None:
            return None
        return resident / self.bytes if self.bytes else 1.0

    def to_json(self) -> dict[str, object]:
        resident, reason = _total_resident(self.files)
        return {
            "files": len(self.files),
            "bytes": self.bytes,
            "resident_bytes": resident,
            "resident_ratio": self.resident_ratio,
            "residency_unknown_reason": reason,
            "skipped": len(self.skipped),
            "per_file": [f.to_json() for f in self.files],
        }


@dataclass(frozen=True, slots=True)
class FileResult:
    """What warming did to one file.

    :ivar read_bytes: bytes the read pass brought in.
    :ivar resident_after_read: residency measured on the same descriptor right after the
        last chunk (``None`` when unknown or not measured).
    :ivar residency: residency measured by re-opening the file after the whole pass.
    :ivar error: why reading failed, or ``None``.
    :ivar cause: why the file is not resident, when it is not.
    """

    path: str
    size: int
    read_bytes: int
    method: str
    residency: FileResidency
    resident_after_read: int | None = None
    error: str | None = None
    cause: str | None = None


@dataclass(frozen=True)
class WarmReport:
    """The outcome of a warm pass; :meth:`to_json` is the ``--json`` contract."""

    files: tuple[FileResult, ...]
    skipped: tuple[Skipped, ...]
    seconds: float
    cpu_seconds: float
    concurrency: int
    chunk_size: int
    method: str
    timed_out: bool = False
    interrupted: bool = False
    verified: bool = True

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def read_bytes(self) -> int:
        return sum(f.read_bytes for f in self.files)

    @property
    def errors(self) -> tuple[FileResult, ...]:
        return tuple(f for f in self.files if f.error is not None)

    @property
    def walk_errors(self) -> tuple[Skipped, ...]:
        """Folders that could not be listed, paths that could not be stat'ed."""
        return tuple(s for s in self.skipped if s.error)

    @property
    def not_resident(self) -> tuple[FileResult, ...]:
        return tuple(f for f in self.files if f.error is None and f.cause is not None)

    @property
    def resident_bytes(self) -> int | None:
        if not self.verified:
            return None
        return _total_resident([f.residency for f in self.files])[0]

    @property
    def residency_unknown_reason(self) -> str | None:
        if not self.verified:
            return "residency was not verified (verify=False)"
        return _total_resident([f.residency for f in self.files])[1]

    @property
    def resident_ratio(self) -> float | None:
        resident = self.resident_bytes
        if resident is None:
            return None
        return resident / self.bytes if self.bytes else 1.0

    def to_json(self) -> dict[str, object]:
        return {
            "files": len(self.files),
            "bytes": self.bytes,
            "read_bytes": self.read_bytes,
            "resident_bytes": self.resident_bytes,
            "resident_ratio": self.resident_ratio,
            "residency_unknown_reason": self.residency_unknown_reason,
            "seconds": round(self.seconds, 6),
            "cpu_seconds": round(self.cpu_seconds, 6),
            "errors": len(self.errors) + len(self.walk_errors),
            "error_details": [{"path": f.path, "cause": f.error} for f in self.errors]
            + [{"path": s.path, "cause": s.reason} for s in self.walk_errors],
            "not_resident": [
                {
                    "path": f.path,
                    "bytes": f.size,
                    "resident_bytes": f.residency.resident_bytes,
                    "cause": f.cause,
                }
                for f in self.not_resident
            ],
            "skipped": len(self.skipped) - len(self.walk_errors),
            "skipped_details": [
                {"path": s.path, "reason": s.reason} for s in self.skipped if not s.error
            ],
            "concurrency": self.concurrency,
            "chunk_size": self.chunk_size,
            "method": self.method,
            "timed_out": self.timed_out,
            "interrupted": self.interrupted,
        }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _open_regular(spec: FileSpec) -> int:
    """Open a planned file read-only, refusing anything that is no longer that file.

    ``O_NONBLOCK`` keeps a FIFO swapped in since planning from blocking the open; the
    ``(dev, ino)`` check refuses a file replaced under the same name.
    """
    fd = os.open(spec.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "no longer a regular file")
        if (st.st_dev, st.st_ino) != (spec.dev, spec.ino):
            raise OSError(errno.ESTALE, "replaced by another file since planning")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _describe(err: OSError) -> str:
    return err.strerror or str(err)


class _FileState:
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
                self.fd = _open_regular(self.spec)
            return self.fd


@dataclass(slots=True)
class _Outcome:
    """What a worker thread did with one chunk; applied to the file on the event loop."""

    read_bytes: int = 0
    method: str = ""
    fallback: str | None = None
    resident_after_read: int | None = None
    error: str | None = None


def _read_with_fallback(
    fd: int, chunk: Chunk, method: str, stop: Callable[[], bool], outcome: _Outcome
) -> None:
    while True:
        try:
            outcome.read_bytes = pagecache.read_range(fd, chunk.offset, chunk.length, method, stop)
            outcome.method = method
            return
        except OSError as err:
            if err.errno in _REFUSALS and method in _FALLBACK:
                outcome.fallback = f"{method} -> {_FALLBACK[method]}: {_describe(err)}"
                method = _FALLBACK[method]
                continue
            # Which range failed tells a bad object or disk region from a dead mount.
            last = chunk.offset + max(chunk.length, 1) - 1
            raise OSError(
                err.errno, f"{_describe(err)} reading bytes {chunk.offset}-{last}"
            ) from err


def _after_read(fd: int, size: int) -> int | None:
    # Measured on the same descriptor: a filesystem that drops the cache at every open
    # would otherwise hide that reading did populate it.
    try:
        return pagecache.fd_residency(fd, size)
    except (pagecache.ResidencyUnknownError, OSError):
        return None


class _Handoff:
    """Results a worker thread hands back one by one, so a stall blames only its file.

    Once the event loop gives up on the thread (:meth:`abandon`), the thread hands back
    nothing more and stops at its next file.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._results: list[object] = []

    def put(self, result: object) -> bool:
        with self._lock:
            if not self._abandoned:
                self._results.append(result)
            return not self._abandoned

    def abandon(self) -> list[object]:
        with self._lock:
            self._abandoned = True
            return list(self._results)

    @property
    def abandoned(self) -> bool:
        return self._abandoned


def _whole_files_in_thread(
    specs: Sequence[FileSpec],
    batch: Sequence[Chunk],
    method: str,
    stop: Callable[[], bool],
    handoff: _Handoff,
) -> bool:
    """Open, read, measure and close each small file in one thread hand-off.

    :return: ``True`` once every file of the batch was handed back.
    """
    for chunk in batch:
        outcome = _Outcome(method=method)
        if not stop() and not handoff.abandoned:
            spec = specs[chunk.file_index]
            try:
                fd = _open_regular(spec)
                try:
                    _read_with_fallback(fd, chunk, method, stop, outcome)
                    outcome.resident_after_read = _after_read(fd, spec.size)
                finally:
                    os.close(fd)
            except OSError as err:
                outcome.error = _describe(err)
        if not handoff.put(outcome):
            return False
    return True


class _Engine:
    def __init__(
        self,
        plan: Plan,
        options: WarmOptions,
        progress: WarmProgress,
        on_event: Callable[[EngineEvent], None] | None,
        stop: threading.Event,
        chunks: Sequence[Chunk] | None = None,
    ) -> None:
        self.plan = plan
        self.options = options
        self.progress = progress
        self.on_event = on_event
        self.stop = stop
        self.method = "sendfile" if options.method == "auto" else options.method
        auto = options.concurrency == AUTO_CONCURRENCY
        chunk_size = options.chunk_size
        if auto and chunks is None:  # a selection of chunks keeps the size they were cut at
            wanted = plan.total_bytes // _AUTO_MIN_CHUNKS
            chunk_size = min(chunk_size, max(_AUTO_MIN_CHUNK, wanted))
        self.chunk_size = effective_chunk_size(chunk_size)
        # A selection of chunks (keep-warm re-reads what lost pages): a file with none
        # selected is never opened.
        self.schedule = Schedule(
            plan.files,
            self.chunk_size,
            split_rule(options.split),
            chunks=chunks,
        )
        counts = self.schedule.counts()
        if chunks is None:
            self.bytes_total = plan.total_bytes
        else:
            self.bytes_total = sum(chunk.length for chunk in chunks)
        self.files = [
            _FileState(spec, count, self.method)
            for spec, count in zip(plan.files, counts, strict=True)
        ]
        self.max_workers = _AUTO_MAX if auto else options.concurrency
        # Readers: a worker takes work only while it holds one of these, so the schedule
        # never hands out more streams than may run (auto raises and lowers it).
        self.limiter = anyio.CapacityLimiter(_AUTO_START if auto else options.concurrency)
        # Threads: one per worker at most, whatever the readers' limit is now.
        self.threads = anyio.CapacityLimiter(self.max_workers)
        self.progress.concurrency = int(self.limiter.total_tokens)
        self.timed_out = False

    def emit(self, kind: str, path: str = "", detail: str = "") -> None:
        if self.on_event is not None:
            self.on_event(EngineEvent(kind, path, detail))

    def set_state(self, state: str) -> None:
        self.progress.state = state
        self.emit("state", detail=state)

    async def run(self) -> None:
        self.progress.files_total = sum(1 for state in self.files if state.chunks_total)
        self.progress.bytes_total = self.bytes_total
        self.set_state("warming")
        async with anyio.create_task_group() as workers:
            workers.start_soon(cancel_after_stop, self.stop, workers.cancel_scope)
            if self.options.timeout is not None:
                workers.start_soon(self._deadline, self.options.timeout)
            if self.options.concurrency == AUTO_CONCURRENCY:
                workers.start_soon(self._autotune)
            async with anyio.create_task_group() as pool:
                for _ in range(self.max_workers):
                    pool.start_soon(self._worker)
            workers.cancel_scope.cancel()  # the pool is done: stop deadline and tuner
        self._close_leftovers()

    async def _deadline(self, seconds: float) -> None:
        await anyio.sleep(seconds)
        self.timed_out = True
        self.stop.set()  # cancel_after_stop abandons reads still stuck after the grace

    async def _autotune(self) -> None:
        """Raise concurrency while throughput still grows by 10%; settle at the knee."""
        best_rate = 0.0
        best_tokens = int(self.limiter.total_tokens)
        while True:
            tokens = int(self.limiter.total_tokens)
            before_bytes = self.progress.bytes_read
            before = time.monotonic()
            # A window must span a few chunks per reader to measure anything.
            while (
                self.progress.bytes_read - before_bytes < 2 * self.chunk_size * tokens
                and time.monotonic() - before < 8 * _AUTO_WINDOW_SECONDS
            ) or time.monotonic() - before < _AUTO_WINDOW_SECONDS:
                await anyio.sleep(_AUTO_WINDOW_SECONDS / 2)
            rate = (self.progress.bytes_read - before_bytes) / (time.monotonic() - before)
            if rate > best_rate * _AUTO_MIN_GAIN and tokens < _AUTO_MAX:
                best_rate, best_tokens = rate, tokens
                self.limiter.total_tokens = min(_AUTO_MAX, tokens * 2)
                self.progress.concurrency = int(self.limiter.total_tokens)
                continue
            if rate > best_rate:
                best_tokens = tokens
            self.limiter.total_tokens = best_tokens
            self.progress.concurrency = best_tokens
            self.emit("concurrency", detail=f"settled at {best_tokens}")
            return

    async def _worker(self) -> None:
        stream: Stream | None = None
        while not self.stop.is_set():
            async with self.limiter:
                if self.stop.is_set():
                    return
                taken = self.schedule.take(stream)
                if taken is None:
                    return
                batch, stream = taken
                await self._read_batch(batch)

    async def _read_batch(self, batch: Sequence[Chunk]) -> None:
        states = [self.files[chunk.file_index] for chunk in batch]
        for state in states:
            state.in_flight += 1
        try:
            if len(batch) == 1 and states[0].chunks_total > 1:
                await self._big_file_chunk(states[0], batch[0])
            else:
                await self._whole_files(states, batch)
        finally:
            for state in states:
                state.in_flight -= 1
        for state in states:
            state.chunks_left -= 1
            if state.chunks_left == 0:
                await self._finish_file(state)

    async def _in_thread(self, func: Callable[..., _T], *args: object) -> _T | None:
        """Run ``func`` on a worker thread under the per-read deadline; ``None`` if stalled."""
        with anyio.CancelScope() as scope:
            if self.options.read_timeout is not None:
                scope.deadline = anyio.current_time() + self.options.read_timeout
            return await anyio.to_thread.run_sync(
                func, *args, limiter=self.threads, abandon_on_cancel=True
            )
        return None

    def _stalled(self, states: Sequence[_FileState]) -> None:
        for state in states:
            state.stalled = True
            if not self.stop.is_set():
                self._fail(
                    state,
                    f"read stalled for more than {self.options.read_timeout:g} s; file given up",
                )

    def _apply(self, state: _FileState, chunk: Chunk, outcome: _Outcome) -> None:
        if outcome.fallback is not None and state.method != outcome.method:
            state.method = outcome.method
            self.emit("method_fallback", state.spec.path, outcome.fallback)
        if outcome.error is not None:
            self._fail(state, outcome.error)
            return
        state.read_bytes += outcome.read_bytes
        self.progress.bytes_read += outcome.read_bytes
        if outcome.read_bytes < chunk.length and not self.stop.is_set():
            self._fail(
                state,
                f"file shrank while being read (got {outcome.read_bytes} of {chunk.length} "
                f"bytes at offset {chunk.offset})",
            )

    async def _whole_files(self, states: Sequence[_FileState], batch: Sequence[Chunk]) -> None:
        while batch:
            handoff = _Handoff()
            try:
                finished = await self._in_thread(
                    _whole_files_in_thread,
                    self.plan.files,
                    batch,
                    self.method,
                    self.stop.is_set,
                    handoff,
                )
            except anyio.get_cancelled_exc_class():
                # What the thread finished still counts; only the file in hand may still
                # be in the kernel (never re-opened: that could hang too).
                done = self._take(states, batch, handoff)
                for state in states[done : done + 1]:
                    state.stalled = True
                raise
            done = self._take(states, batch, handoff)
            if finished is not None or self.stop.is_set():
                return
            # Only the file in hand stalled: blame it, and read the rest of the batch anew.
            self._stalled(states[done : done + 1])
            states, batch = states[done + 1 :], batch[done + 1 :]

    def _take(self, states: Sequence[_FileState], batch: Sequence[Chunk], handoff: _Handoff) -> int:
        """Apply what a small-file thread handed back; return how many files that was."""
        outcomes = handoff.abandon()
        for state, chunk, outcome in zip(states, batch, outcomes, strict=False):
            assert isinstance(outcome, _Outcome)
            self._apply(state, chunk, outcome)
            if state.error is None:
                state.resident_after_read = outcome.resident_after_read
        return len(outcomes)

    async def _big_file_chunk(self, state: _FileState, chunk: Chunk) -> None:
        if state.error is not None:
            return
        try:
            outcome = await self._in_thread(self._chunk_in_thread, state, chunk, state.method)
        except anyio.get_cancelled_exc_class():
            state.stalled = True  # its thread may still be using the descriptor
            raise
        if outcome is None:
            self._stalled([state])
            return
        self._apply(state, chunk, outcome)

    def _chunk_in_thread(self, state: _FileState, chunk: Chunk, method: str) -> _Outcome:
        outcome = _Outcome(method=method)
        try:
            _read_with_fallback(state.ensure_open(), chunk, method, self.stop.is_set, outcome)
        except OSError as err:
            outcome.error = _describe(err)
        return outcome

    def _fail(self, state: _FileState, cause: str) -> None:
        if state.error is None:
            state.error = cause
            self.progress.errors += 1
            self.emit("file_error", state.spec.path, cause)

    async def _finish_file(self, state: _FileState) -> None:
        self.progress.files_done += 1
        if state.fd is None or state.stalled:
            return
        fd, size = state.fd, state.spec.size
        state.fd = None
        verify = state.error is None and self.options.verify

        def finish() -> int | None:
            try:
                return _after_read(fd, size) if verify else None
            finally:
                os.close(fd)

        state.resident_after_read = await anyio.to_thread.run_sync(finish, limiter=self.threads)

    def _close_leftovers(self) -> None:
        for state in self.files:
            if state.fd is not None and state.in_flight == 0 and not state.stalled:
                fd, state.fd = state.fd, None
                os.close(fd)


def _explain(
    spec: FileSpec, after_read: int | None, now: int, bypass: bool | None = None
) -> str | None:
    """Why a file that was read in full is not resident now, or ``None`` if it is.

    :param bypass: a fresh plain read left the page cache untouched (see
        :func:`pagecache.read_bypasses_cache`); ``None`` when not probed or unknown.
    """
    if spec.size == 0 or now >= spec.size * _RESIDENT_SHARE:
        return None
    share = now / spec.size
    if after_read is not None and after_read < spec.size * _RESIDENT_SHARE:
        return (
            f"only {after_read / spec.size:.1%} resident right after reading: the filesystem "
            "bypasses the page cache (FUSE direct_io, some network mounts) or memory is short"
        )
    if after_read is not None and now == 0 and bypass:
        return (
            "reads bypass the page cache (FUSE direct_io or a similar mount): a server "
            "reading this file goes to the storage every time; warming cannot help here"
        )
    if after_read is not None and now == 0:
        return (
            "resident after reading but dropped when the file was opened again: the "
            "filesystem invalidates the page cache at open (FUSE without kernel_cache/"
            "keep_cache, e.g. rclone mount); warming cannot help here"
        )
    return (
        f"{share:.1%} resident: pages were evicted after reading "
        "(memory pressure or a cgroup limit)"
    )


def _residency_of(spec: FileSpec) -> FileResidency:
    try:
        fd = _open_regular(spec)
    except OSError as err:
        return FileResidency(spec.path, spec.size, None, f"cannot open: {_describe(err)}")
    try:
        resident = pagecache.fd_residency(fd, spec.size)
        size_now = os.fstat(fd).st_size
        if size_now > spec.size:  # still being written (a download in progress)
            return FileResidency(
                spec.path,
                spec.size,
                resident,
                f"grew from {spec.size} to {size_now} bytes since planning; the bytes "
                "after the planned size were not read (warm again once it is complete)",
            )
        return FileResidency(spec.path, spec.size, resident)
    except pagecache.ResidencyUnknownError as unknown:
        return FileResidency(spec.path, spec.size, None, unknown.reason)
    except OSError as err:
        return FileResidency(spec.path, spec.size, None, f"cannot measure: {_describe(err)}")
    finally:
        os.close(fd)


def _bypass_probe(spec: FileSpec) -> bool | None:
    try:
        fd = _open_regular(spec)
    except OSError:
        return None
    try:
        return pagecache.read_bypasses_cache(fd, spec.size)
    except OSError:
        return None
    finally:
        os.close(fd)


async def cancel_after_stop(
    stop: threading.Event, scope: anyio.CancelScope, grace: float = STOP_GRACE_SECONDS
) -> None:
    """Cancel ``scope`` once ``stop`` has been set for ``grace`` seconds.

    Work that polls ``stop`` ends on its own well within the grace; this bounds the rest
    (a read or an open stuck in the kernel on storage that stopped answering).
    """
    while not stop.is_set():
        await anyio.sleep(_STOP_POLL_SECONDS)
    await anyio.sleep(grace)
    scope.cancel()


async def _map_files(
    func: Callable[[_I], _R],
    files: Sequence[_I],
    concurrency: int,
    unmeasured: Callable[[_I, str], _R] | None = None,
    *,
    timeout: float | None = None,
    stop: threading.Event | None = None,
) -> list[_R]:
    """``func`` over ``files`` in worker threads, bounded when asked.

    :param unmeasured: the result for a file ``func`` did not finish, given the reason
        (needed with ``timeout`` or ``stop``).
    :param timeout: seconds one file may take; a file that takes longer is given up (its
        thread abandoned) and the rest go on.
    :param stop: once set, the remaining files are given up after the stop grace.
    """
    # Batches keep thread hand-offs few for 100,000 small files and the loop responsive.
    results: list[_R] = []
    limiter = anyio.CapacityLimiter(max(1, concurrency))
    batch = 256

    def run_batch(specs: Sequence[_I], handoff: _Handoff) -> None:
        for spec in specs:
            if handoff.abandoned or not handoff.put(func(spec)):
                return

    def take(handoff: _Handoff) -> None:
        results.extend(handoff.abandon())  # type: ignore[arg-type]  # only _R were put

    async with anyio.create_task_group() as group:
        if stop is not None:
            group.start_soon(cancel_after_stop, stop, group.cancel_scope)
        while len(results) < len(files):
            handoff = _Handoff()
            with anyio.CancelScope() as deadline:
                if timeout is not None:
                    deadline.deadline = anyio.current_time() + timeout
                try:
                    await anyio.to_thread.run_sync(
                        run_batch,
                        files[len(results) : len(results) + batch],
                        handoff,
                        limiter=limiter,
                        abandon_on_cancel=True,
                    )
                finally:
                    take(handoff)
            if deadline.cancelled_caught and len(results) < len(files):
                assert unmeasured is not None
                stuck = files[len(results)]
                results.append(unmeasured(stuck, f"stalled for more than {timeout:g} s"))
        group.cancel_scope.cancel()
    if len(results) < len(files):
        assert unmeasured is not None
        results.extend(unmeasured(item, "the pass was stopped") for item in files[len(results) :])
    return results


def _unknown(spec: FileSpec, why: str) -> FileResidency:
    return FileResidency(spec.path, spec.size, None, f"not measured: {why}")


async def measure_residency(plan: Plan, concurrency: int = 4) -> ResidencyReport:
    """Residency of every planned file, opened read-only one at a time.

    :return: per-file and total residency; unknown entries carry their reason.
    """
    files = await _map_files(_residency_of, plan.files, concurrency, _unknown)
    return ResidencyReport(tuple(files), plan.skipped)


def _evict_one(spec: FileSpec) -> FileResidency:
    try:
        fd = _open_regular(spec)
    except OSError as err:
        return FileResidency(spec.path, spec.size, None, f"cannot open: {_describe(err)}")
    try:
        pagecache.evict(fd)
        try:
            return FileResidency(spec.path, spec.size, pagecache.fd_residency(fd, spec.size))
        except pagecache.ResidencyUnknownError as unknown:
            return FileResidency(spec.path, spec.size, None, unknown.reason)
    except OSError as err:
        return FileResidency(spec.path, spec.size, None, f"cannot evict: {_describe(err)}")
    finally:
        os.close(fd)


async def evict_plan(plan: Plan, concurrency: int = 4) -> ResidencyReport:
    """Drop the clean cached pages of every planned file (``POSIX_FADV_DONTNEED``).

    :return: residency measured right after eviction (pages mapped or dirty elsewhere stay).
    """
    files = await _map_files(_evict_one, plan.files, concurrency, _unknown)
    return ResidencyReport(tuple(files), plan.skipped)


async def warm_plan(
    plan: Plan,
    options: WarmOptions | None = None,
    *,
    progress: WarmProgress | None = None,
    on_event: Callable[[EngineEvent], None] | None = None,
    stop: threading.Event | None = None,
) -> WarmReport:
    """Read every chunk of ``plan`` into the page cache, then verify residency.

    :param options: how to read; defaults to :class:`WarmOptions`.
    :param progress: live counters to update (a fresh one when omitted).
    :param on_event: called on the event loop for errors, fallbacks and state changes.
    :param stop: set it (from any thread or a signal handler) to end the read pass early;
        the report then says ``interrupted``.
    :return: the report; per-file errors are in it, never raised.
    """
    options = options or WarmOptions()
    progress = progress or WarmProgress()
    stop = stop or threading.Event()
    cpu_before = _cpu_seconds()
    started = time.monotonic()
    engine = _Engine(plan, options, progress, on_event, stop)
    await engine.run()

    workers = max(1, options.concurrency or 4)
    residency: dict[FileSpec, FileResidency] = {}
    bypass: dict[FileSpec, bool | None] = {}
    if options.verify:
        engine.set_state("verifying")
        # A file whose read stalled is not opened again: on a filesystem that invalidates
        # the cache at open, that open waits for the stuck read's locked page, for ever.
        healthy = [state.spec for state in engine.files if not state.stalled]
        measured_list = await _map_files(
            _residency_of,
            healthy,
            workers,
            _unknown,
            timeout=options.read_timeout,
            stop=stop,
        )
        residency = dict(zip(healthy, measured_list, strict=True))
        # Read in full, resident then, gone at the next open: tell a filesystem that drops
        # the cache at open from one whose reads bypass it (direct_io), with one page.
        suspects = [
            state.spec
            for state in engine.files
            if state.error is None
            and state.resident_after_read
            and state.spec in residency
            and residency[state.spec].resident_bytes == 0
        ]
        probed = await _map_files(
            _bypass_probe,
            suspects,
            workers,
            lambda spec, why: None,
            timeout=options.read_timeout,
            stop=stop,
        )
        bypass = dict(zip(suspects, probed, strict=True))

    results = []
    for state in engine.files:
        spec = state.spec
        if not options.verify:
            measured = FileResidency(spec.path, spec.size, None, "not verified")
        elif state.stalled:
            measured = _unknown(spec, "its read stalled, and opening it again could hang too")
        else:
            measured = residency[spec]
        cause = None
        complete = state.error is None and state.read_bytes >= spec.size
        if options.verify and complete and measured.resident_bytes is not None:
            cause = _explain(
                spec, state.resident_after_read, measured.resident_bytes, bypass.get(spec)
            )
            if cause is None and measured.reason is not None:
                cause = measured.reason  # measured, with a caveat (it grew)
            if cause is not None:
                engine.emit("not_resident", spec.path, cause)
        elif state.error is None and state.stalled:
            cause = "not read in full: its read did not return before the pass stopped"
        elif state.error is None and not complete:
            cause = "not read: the pass was stopped before this file"
        results.append(
            FileResult(
                path=spec.path,
                size=spec.size,
                read_bytes=state.read_bytes,
                method=state.method,
                residency=measured,
                resident_after_read=state.resident_after_read,
                error=state.error,
                cause=cause,
            )
        )
    engine.set_state("done")
    interrupted = stop.is_set() and not engine.timed_out  # a signal while verifying counts
    return WarmReport(
        files=tuple(results),
        skipped=plan.skipped,
        seconds=time.monotonic() - started,
        cpu_seconds=_cpu_seconds() - cpu_before,
        concurrency=progress.concurrency,
        chunk_size=engine.chunk_size,
        method=engine.method,
        timed_out=engine.timed_out,
        interrupted=interrupted,
        verified=options.verify,
    )


def effective_chunk_size(chunk_size: int) -> int:
    """The chunk size the engine really uses: ``chunk_size`` rounded down to whole pages."""
    return max(pagecache.PAGE_SIZE, chunk_size - chunk_size % pagecache.PAGE_SIZE)


@dataclass(frozen=True)
class ChunkResidency:
    """Residency of one planned file, with the chunks that lost pages.

    :ivar file_index: index into :attr:`Plan.files`.
    :ivar resident_bytes: resident bytes of the whole file; ``None`` when unknown.
    :ivar lost: chunks with at least one page out of the cache, in file order. When the
        file cannot be opened or measured, every chunk (a re-read will retry it).
    :ivar reason: why the kernel will not tell residency (the file itself is fine).
    :ivar error: why the file could not be opened or measured.
    """

    file_index: int
    path: str
    size: int
    resident_bytes: int | None
    lost: tuple[Chunk, ...] = ()
    reason: str | None = None
    error: str | None = None


def _file_chunks(file_index: int, spec: FileSpec, chunk_size: int) -> tuple[Chunk, ...]:
    return tuple(
        Chunk(file_index, chunk.index, chunk.offset, chunk.length)
        for chunk in iter_chunks([spec], chunk_size)
        if chunk.length > 0
    )


def _chunk_residency_of(item: tuple[int, FileSpec], chunk_size: int) -> ChunkResidency:
    index, spec = item

    def failed(cause: str) -> ChunkResidency:
        # Not measurable: every chunk counts as lost, so keep-warm tries it again.
        return ChunkResidency(
            index, spec.path, spec.size, None, _file_chunks(index, spec, chunk_size), error=cause
        )

    try:
        fd = _open_regular(spec)
    except OSError as err:
        return failed(f"cannot open: {_describe(err)}")
    try:
        resident = pagecache.fd_residency(fd, spec.size)
        if resident >= spec.size:
            return ChunkResidency(index, spec.path, spec.size, resident)
        # One call per file while everything is cached; chunk by chunk only where not.
        lost = tuple(
            chunk
            for chunk in _file_chunks(index, spec, chunk_size)
            if pagecache.range_resident_pages(fd, chunk.offset, chunk.length)
            < -(-chunk.length // pagecache.PAGE_SIZE)
        )
        return ChunkResidency(index, spec.path, spec.size, resident, lost)
    except pagecache.ResidencyUnknownError as unknown:
        return ChunkResidency(index, spec.path, spec.size, None, reason=unknown.reason)
    except OSError as err:
        return failed(f"cannot measure: {_describe(err)}")
    finally:
        os.close(fd)


async def measure_chunks(
    plan: Plan, chunk_size: int, concurrency: int = 4
) -> tuple[ChunkResidency, ...]:
    """Residency of every planned file and the chunks of it that lost pages.

    A fully cached file costs one ``cachestat`` call; only a file with pages missing is
    measured chunk by chunk. Chunks are cut as :func:`warm_plan` cuts them for the same
    ``chunk_size``, so :func:`rewarm_chunks` can re-read exactly the lost ones.

    :return: one entry per planned file, in plan order.
    """
    size = effective_chunk_size(chunk_size)
    results = await _map_files(
        lambda item: _chunk_residency_of(item, size), list(enumerate(plan.files)), concurrency
    )
    return tuple(results)


@dataclass(frozen=True)
class RewarmReport:
    """What :func:`rewarm_chunks` re-read.

    :ivar errors: ``(path, cause)`` of files that could not be read again.
    """

    chunks: int
    read_bytes: int
    seconds: float
    errors: tuple[tuple[str, str], ...] = ()
    interrupted: bool = False


async def rewarm_chunks(
    plan: Plan,
    chunks: Sequence[Chunk],
    options: WarmOptions | None = None,
    *,
    on_event: Callable[[EngineEvent], None] | None = None,
    stop: threading.Event | None = None,
) -> RewarmReport:
    """Read only ``chunks`` of ``plan`` into the page cache again; no verification.

    The same workers, limiter and per-file descriptor sharing as :func:`warm_plan`.

    :param chunks: chunks from :func:`measure_chunks` with the same chunk size.
    :param on_event: called for per-file errors and read method fallbacks.
    :param stop: set it to end the re-read early.
    :return: the report; per-file errors are in it, never raised.
    """
    options = options or WarmOptions()
    stop = stop or threading.Event()
    started = time.monotonic()
    engine = _Engine(plan, options, WarmProgress(), on_event, stop, chunks=chunks)
    await engine.run()
    return RewarmReport(
        chunks=len(chunks),
        read_bytes=engine.progress.bytes_read,
        seconds=time.monotonic() - started,
        errors=tuple(
            (state.spec.path, state.error) for state in engine.files if state.error is not None
        ),
        interrupted=stop.is_set(),
    )
