"""One read pass: a plan's chunks (or a selection of them) read on worker threads.

The event loop only schedules: every blocking call (open, sendfile, cachestat, close)
runs in a worker thread through :func:`anyio.to_thread.run_sync` with a
:class:`anyio.CapacityLimiter`. The engine never prints; it updates a
:class:`WarmProgress` that front ends poll and calls an optional event callback.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import anyio
import anyio.to_thread

from ..planning.planner import Plan
from ..planning.specs import Chunk, FileSpec
from ..settings import AUTO_CONCURRENCY, AUTO_START_CONCURRENCY, WarmOptions
from .events import Emitter, EngineEvent, ErrorReason, EventKind
from .holes import fill_holes
from .ledger import Ledger
from .prefetch import all_local, may_prefetch
from .reading import (
    FileState,
    Handoff,
    Outcome,
    after_read,
    cancel_after_stop,
    read_with_fallback,
    record_failure,
    slide_deadline,
    whole_files_in_thread,
)
from .reports import (
    Autotune,
    ChunkProgress,
    WarmProgress,
)
from .schedule import Schedule, Stream, solo_rule, split_rule

__all__ = ["ReadPass"]

_T = TypeVar("_T")

_AUTO_MAX = 64
_AUTO_MIN_GAIN = 1.10
_AUTO_WINDOW_SECONDS = 0.5
_AUTO_WINDOW_BYTES = 32 * 1024 * 1024  # per reader: four read steps
_PREFETCHED_THREADS = 1  # threads reading prefetched batches at once (see ReadPass)
# Whole small files per batch. On local disks alone more: a batch's prefetch queues its
# reads, and the disk idles between one batch and the next (20,000 x 64 KiB, every cache
# dropped, read and verified in-process, 5 alternated runs: 64 files 2.32 s median, 256
# files 1.95 s). Elsewhere each open is a round trip, and small batches spread a short
# list of files over every worker.
_BATCH_FILES = 64
_LOCAL_BATCH_FILES = 256


class ReadPass:
    """The read pass behind :func:`~.warm.warm_plan` and :func:`~.warm.rewarm_chunks`:
    streams, workers, the ``-c auto`` tuner, prefetch, hole filling and the ledger."""

    def __init__(
        self,
        plan: Plan,
        options: WarmOptions,
        progress: WarmProgress,
        on_event: Callable[[EngineEvent], None] | None,
        stop: threading.Event,
        chunks: Sequence[Chunk] | None = None,
        on_file_read: Callable[[FileSpec], None] | None = None,
    ) -> None:
        self.plan = plan
        self.on_file_read = on_file_read
        self.options = options
        self.progress = progress
        self.emit = Emitter(on_event)
        self.stop = stop
        self.method = "sendfile" if options.method == "auto" else options.method
        auto = options.concurrency == AUTO_CONCURRENCY
        # A selection of chunks (keep-warm's) was cut at the plain size.
        self.chunk_size = options.chunk_size_for(plan.total_bytes if chunks is None else None)
        # A selection of chunks (keep-warm re-reads what lost pages): a file with none
        # selected is never opened.
        self.schedule = Schedule(
            plan.files,
            self.chunk_size,
            split_rule(options.split),
            chunks=chunks,
            max_files=_LOCAL_BATCH_FILES if all_local(plan.files.devices()) else _BATCH_FILES,
            solo=solo_rule(options.split),
        )
        self.every_chunk = chunks is None
        if chunks is None:
            self.bytes_total = plan.total_bytes
        else:
            self.bytes_total = sum(chunk.length for chunk in chunks)
        # A FileState only for a file being read; the rest is columns.
        self.ledger = Ledger(plan.files, self.method, self.schedule.total)
        self.max_workers = _AUTO_MAX if auto else options.concurrency
        # Readers: a worker takes work only while it holds one of these, so the schedule
        # never hands out more streams than may run (auto raises and lowers it).
        self.limiter = anyio.CapacityLimiter(
            AUTO_START_CONCURRENCY if auto else options.concurrency
        )
        # Threads: one per worker at most, whatever the readers' limit is now.
        self.threads = anyio.CapacityLimiter(self.max_workers)
        # Batches of small files that are prefetched (a local disk) are read by one thread
        # at a time: the prefetch queues a batch's reads in the kernel, so one keeps the
        # disk busy, and more only contend for the interpreter at every open and read
        # (20,000 x 64 KiB, every cache dropped, read and verified in-process: 4 threads
        # 2.4 s and 2.8 CPU-s, 2 threads 2.1 s and 2.3, one 2.1 s and 1.7).
        self.prefetched_threads = anyio.CapacityLimiter(_PREFETCHED_THREADS)
        self.progress.concurrency = int(self.limiter.total_tokens)
        self.timed_out = False
        # -c auto: (readers, bytes per second) of every window measured, and why it settled.
        self.tuning: list[tuple[int, float]] = []
        self.tuned: str | None = None

    def set_state(self, state: str) -> None:
        self.progress.state = state
        self.emit(EventKind.STATE, detail=state)

    async def run(self) -> None:
        self.progress.files_total = self.schedule.file_count()
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
            before_bytes = self.progress.bytes_arrived
            before = time.monotonic()
            # A window must span a few read steps per reader to measure anything. Bytes
            # count as they arrive, not as chunks end: a window of two 64 MiB chunks per
            # reader spent seconds at a losing doubling.
            while (
                self.progress.bytes_arrived - before_bytes < _AUTO_WINDOW_BYTES * tokens
                and time.monotonic() - before < 8 * _AUTO_WINDOW_SECONDS
            ) or time.monotonic() - before < _AUTO_WINDOW_SECONDS:
                await anyio.sleep(_AUTO_WINDOW_SECONDS / 4)
            rate = (self.progress.bytes_arrived - before_bytes) / (time.monotonic() - before)
            self.tuning.append((tokens, rate))
            if rate > best_rate * _AUTO_MIN_GAIN and tokens < _AUTO_MAX:
                best_rate, best_tokens = rate, tokens
                self.limiter.total_tokens = min(_AUTO_MAX, tokens * 2)
                self.progress.concurrency = int(self.limiter.total_tokens)
                continue
            if tokens >= _AUTO_MAX and rate > best_rate * _AUTO_MIN_GAIN:
                why = f"throughput still grew at {tokens} readers, the most auto uses"
                best_tokens = tokens
            else:
                why = (
                    f"{tokens} readers read {rate / max(best_rate, 1.0):.2f} x what "
                    f"{best_tokens} did: less than the {_AUTO_MIN_GAIN:.2f} x a doubling "
                    "must gain"
                )
            # The knee: a doubling that gained less than the minimum is not worth its
            # threads and CPU (16 readers at 1.01 x what 8 read cost 6.3 CPU-s against 4.8
            # over 8 GiB through the parallel-stream fixture).
            self.limiter.total_tokens = best_tokens
            self.progress.concurrency = best_tokens
            self.tuned = why
            self.emit(EventKind.CONCURRENCY, detail=f"settled at {best_tokens}: {why}")
            return

    def autotune(self) -> Autotune | None:
        """How ``-c auto`` settled, for the report; ``None`` for a fixed ``-c``."""
        if self.options.concurrency != AUTO_CONCURRENCY:
            return None
        readers = int(self.limiter.total_tokens)
        why = self.tuned or f"the pass ended while it measured {readers} readers"
        return Autotune(tuple(self.tuning), readers, why)

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
        states = [self.ledger.state(chunk.file_index) for chunk in batch]
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
        for chunk, state in zip(batch, states, strict=True):
            state.chunks_left -= 1
            if state.chunks_left == 0:
                await self._finish_file(state)
                if state.fd is None:  # a stalled read may still hold it
                    self.ledger.retire(chunk.file_index)

    async def _in_thread(
        self,
        func: Callable[..., _T],
        *args: object,
        handoff: Handoff | None = None,
        threads: anyio.CapacityLimiter | None = None,
    ) -> _T | None:
        """Run ``func`` on a worker thread under the per-read deadline; ``None`` if stalled.

        :param handoff: the thread hands back one result per file: the deadline then runs
            from the last one, so it is per file however many the batch holds.
        :param threads: the limiter to take a thread from (:attr:`threads` by default).
        """
        timeout = self.options.read_timeout
        limiter = threads or self.threads
        with anyio.CancelScope() as scope:
            if timeout is None:
                return await anyio.to_thread.run_sync(
                    func, *args, limiter=limiter, abandon_on_cancel=True
                )
            async with anyio.create_task_group() as group:
                if handoff is None:
                    scope.deadline = anyio.current_time() + timeout
                else:
                    group.start_soon(slide_deadline, scope, handoff, timeout)
                result = await anyio.to_thread.run_sync(
                    func, *args, limiter=limiter, abandon_on_cancel=True
                )
                group.cancel_scope.cancel()
            return result
        return None

    def _stalled(self, states: Sequence[FileState]) -> None:
        for state in states:
            state.stalled = True
            if not self.stop.is_set():
                self._fail(
                    state,
                    f"read stalled for more than {self.options.read_timeout:g} s; file given up",
                    "stalled",
                )

    def _apply(self, state: FileState, chunk: Chunk, outcome: Outcome) -> None:
        if outcome.fallback is not None and state.method != outcome.method:
            state.method = outcome.method
            self.emit(EventKind.METHOD_FALLBACK, state.spec.path, outcome.fallback)
        if outcome.error is not None:
            self._fail(state, outcome.error, outcome.reason)
            return
        state.read_bytes += outcome.read_bytes
        self.progress.bytes_read += outcome.read_bytes
        if outcome.read_bytes < chunk.length and not self.stop.is_set():
            self._fail(
                state,
                f"file shrank while being read (got {outcome.read_bytes} of {chunk.length} "
                f"bytes at offset {chunk.offset})",
                "changed",
            )

    async def _whole_files(self, states: Sequence[FileState], batch: Sequence[Chunk]) -> None:
        specs = [state.spec for state in states]
        prefetched = all(map(may_prefetch, specs))
        while batch:
            handoff = Handoff()
            try:
                finished = await self._in_thread(
                    whole_files_in_thread,
                    specs,
                    batch,
                    self.method,
                    self.stop.is_set,
                    handoff,
                    handoff=handoff,
                    threads=self.prefetched_threads if prefetched else None,
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
            states, batch, specs = states[done + 1 :], batch[done + 1 :], specs[done + 1 :]

    def _take(self, states: Sequence[FileState], batch: Sequence[Chunk], handoff: Handoff) -> int:
        """Apply what a small-file thread handed back; return how many files that was."""
        outcomes = handoff.abandon()
        for state, chunk, outcome in zip(states, batch, outcomes, strict=False):
            assert isinstance(outcome, Outcome)
            self._apply(state, chunk, outcome)
            if state.error is None:
                state.resident_after_read = outcome.resident_after_read
        return len(outcomes)

    async def _big_file_chunk(self, state: FileState, chunk: Chunk) -> None:
        if state.error is not None:
            return
        # Its bytes count as they arrive; once the read returns, they move to bytes_read
        # in _apply, with no await in between.
        arrived = ChunkProgress()
        self.progress.reading.add(arrived)
        try:
            outcome = await self._in_thread(
                self._chunk_in_thread, state, chunk, state.method, arrived
            )
        except anyio.get_cancelled_exc_class():
            state.stalled = True  # its thread may still be using the descriptor
            raise
        finally:
            self.progress.reading.discard(arrived)
        if outcome is None:
            self._stalled([state])
            return
        self._apply(state, chunk, outcome)

    def _chunk_in_thread(
        self, state: FileState, chunk: Chunk, method: str, arrived: ChunkProgress
    ) -> Outcome:
        outcome = Outcome(method=method)
        try:
            read_with_fallback(
                state.ensure_open(), chunk, method, self.stop.is_set, outcome, on_step=arrived
            )
        except OSError as err:
            record_failure(outcome, err)
        return outcome

    def _fail(self, state: FileState, cause: str, reason: ErrorReason = "read") -> None:
        if state.error is None:
            state.error = cause
            self.progress.errors += 1
            self.emit(EventKind.FILE_ERROR, state.spec.path, cause, reason)

    async def _finish_file(self, state: FileState) -> None:
        self.progress.files_done += 1
        if state.fd is None or state.stalled:
            return
        fd, size, method = state.fd, state.spec.size, state.method
        state.fd = None
        verify = state.error is None and self.options.verify
        whole = verify and self.every_chunk  # a keep-warm selection leaves the rest alone

        # Only a whole first pass hands a file over, and only one read without an error.
        hand_over = self.on_file_read if self.every_chunk and state.error is None else None
        spec = state.spec

        def finish() -> int | None:
            try:
                if whole:
                    # While the FUSE client still holds the data; not after a stop.
                    fill_holes(fd, size, method, self.stop.is_set)
                resident = after_read(fd, size) if verify else None
            finally:
                os.close(fd)
            # After the close: a FUSE client frees what it kept for this open (s3fs: its
            # temporary copy of the file), which a pin through this descriptor would hold.
            if hand_over is not None and not self.stop.is_set():
                hand_over(spec)
            return resident

        state.resident_after_read = await anyio.to_thread.run_sync(finish, limiter=self.threads)

    def fail_after(self, index: int, cause: str, reason: ErrorReason) -> None:
        """:meth:`_fail` for a file whose state is folded into the ledger already."""
        if index not in self.ledger.errors:
            self.ledger.errors[index] = cause
            self.progress.errors += 1
            self.emit(EventKind.FILE_ERROR, self.ledger.files.path(index), cause, reason)

    def _close_leftovers(self) -> None:
        for index, state in list(self.ledger.live.items()):
            if state.fd is not None and state.in_flight == 0 and not state.stalled:
                fd, state.fd = state.fd, None
                os.close(fd)
            self.ledger.retire(index)
