"""The engine's entry points: warm a plan (read, then verify), re-read lost chunks.

The event loop only schedules: every blocking call (open, sendfile, cachestat, close)
runs in a worker thread through :func:`anyio.to_thread.run_sync` with a
:class:`anyio.CapacityLimiter` (:class:`~.readpass.ReadPass`). The engine never prints; it
updates a :class:`~.reports.WarmProgress` that front ends poll and calls an optional
event callback.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..kernel import reclaim
from ..planning.planner import Plan
from ..planning.specs import Chunk, FileSpec
from ..settings import WarmOptions
from .events import EngineEvent
from .ledger import assemble
from .reading import STOP_GRACE_SECONDS
from .readpass import ReadPass
from .reports import WarmProgress, WarmReport
from .verify import verify_pass

__all__ = ["RewarmReport", "rewarm_chunks", "warm_plan"]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _verify_timeout(engine: ReadPass, options: WarmOptions) -> float | None:
    """The read timeout, for each verification open and measurement; once a read was given
    up as stalled, the stop grace instead: the storage has already been waited on for a
    whole read timeout, and a storage that stopped answering would hang every open for
    another one. Healthy storage answers an open in far less."""
    timeout = options.read_timeout
    if timeout is not None and engine.ledger.stalled:
        return min(timeout, STOP_GRACE_SECONDS)
    return timeout


async def warm_plan(
    plan: Plan,
    options: WarmOptions | None = None,
    *,
    progress: WarmProgress | None = None,
    on_event: Callable[[EngineEvent], None] | None = None,
    stop: threading.Event | None = None,
    on_file_read: Callable[[FileSpec], None] | None = None,
) -> WarmReport:
    """Read every chunk of ``plan`` into the page cache, then verify residency.

    :param options: how to read; defaults to :class:`WarmOptions`.
    :param progress: live counters to update (a fresh one when omitted).
    :param on_event: called on the event loop for errors, fallbacks and state changes.
    :param stop: set it (from any thread or a signal handler) to end the read pass early;
        the report then says ``interrupted``.
    :param on_file_read: called in a worker thread with a file's spec as soon as every
        chunk of the file has been read without an error (after its residency was
        measured and the pass's descriptor closed: a FUSE client frees what it kept for
        that open), so a caller can act on one shard while the pass reads the next
        (``serve --lock`` pins it). A file of a single chunk (read whole, in a batch) is
        not handed over. It must not raise.
    :return: the report; per-file errors are in it, never raised.
    """
    options = options or WarmOptions()
    progress = progress or WarmProgress()
    stop = stop or threading.Event()
    cpu_before = _cpu_seconds()
    started = time.monotonic()
    engine = ReadPass(plan, options, progress, on_event, stop, on_file_read=on_file_read)
    await engine.run()  # 1. the read pass
    verification = None
    if options.verify:  # 2. what stayed resident
        engine.set_state("verifying")
        verification = await verify_pass(
            engine.ledger, options.concurrency, timeout=_verify_timeout(engine, options), stop=stop
        )
    # 3. the report's files, with the cause of what is not resident
    results = assemble(engine.ledger, verification, engine.fail_after, engine.emit)
    engine.set_state("done")
    interrupted = stop.is_set() and not engine.timed_out  # a signal while verifying counts
    return WarmReport(
        files=results,
        skipped=plan.skipped,
        seconds=time.monotonic() - started,
        cpu_seconds=_cpu_seconds() - cpu_before,
        concurrency=progress.concurrency,
        chunk_size=engine.chunk_size,
        method=engine.method,
        timed_out=engine.timed_out,
        interrupted=interrupted,
        verified=options.verify,
        autotune=engine.autotune(),
        proactive_reclaim=reclaim.note(),
    )


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
    engine = ReadPass(plan, options, WarmProgress(), on_event, stop, chunks=chunks)
    await engine.run()
    return RewarmReport(
        chunks=len(chunks),
        read_bytes=engine.progress.bytes_read,
        seconds=time.monotonic() - started,
        errors=tuple(
            (plan.files.path(index), error) for index, error in sorted(engine.ledger.errors.items())
        ),
        interrupted=stop.is_set(),
    )
