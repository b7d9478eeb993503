"""The public async API: plan, warm, measure and evict paths.

Another program can warm a model without the CLI::

    report = await preloader.warm(["/models/qwen"], concurrency=8)
    assert report.resident_ratio is None or report.resident_ratio > 0.99
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

from .engine import (
    EngineEvent,
    ResidencyReport,
    WarmOptions,
    WarmProgress,
    WarmReport,
    evict_plan,
    measure_residency,
    warm_plan,
)
from .planner import Plan, build_plan

__all__ = ["evict", "plan", "residency", "warm"]


def plan(paths: Iterable[str], *, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Plan:
    """Walk ``paths`` into a warm plan (see :func:`preloader.planner.build_plan`)."""
    return build_plan([str(p) for p in paths], include=include, exclude=exclude)


async def warm(
    paths: Iterable[str] | Plan,
    *,
    concurrency: int = 4,
    chunk_size: int = 64 * 1024 * 1024,
    method: str = "auto",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    timeout: float | None = None,
    read_timeout: float | None = None,
    progress: WarmProgress | None = None,
    on_event: Callable[[EngineEvent], None] | None = None,
    stop: threading.Event | None = None,
) -> WarmReport:
    """Make every regular file under ``paths`` resident in the page cache, then verify.

    :param paths: files and directories, or a ready :class:`Plan`.
    :param concurrency: parallel chunk reads; 0 tunes it automatically.
    :param chunk_size: bytes per chunk; big files are split so all workers share them.
    :param method: ``auto``, ``sendfile``, ``mmap`` or ``read``.
    :param timeout: seconds for the read pass; ``None`` for none.
    :param read_timeout: seconds one chunk may stall before its file is given up.
    :param progress: live counters to update, for a progress display.
    :param on_event: callback for per-file errors, fallbacks and state changes.
    :param stop: set it to end the pass early (the report says ``interrupted``).
    :return: the report; per-file failures are inside it, never raised.
    :raises ValueError: for invalid options.
    """
    the_plan = paths if isinstance(paths, Plan) else plan(paths, include=include, exclude=exclude)
    options = WarmOptions(
        concurrency=concurrency,
        chunk_size=chunk_size,
        method=method,
        timeout=timeout,
        read_timeout=read_timeout,
    )
    return await warm_plan(the_plan, options, progress=progress, on_event=on_event, stop=stop)


async def residency(
    paths: Iterable[str] | Plan, *, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> ResidencyReport:
    """How much of each file under ``paths`` is in the page cache right now.

    Files whose residency the kernel will not reveal truthfully are reported with
    ``resident_bytes=None`` and a reason, never guessed.
    """
    the_plan = paths if isinstance(paths, Plan) else plan(paths, include=include, exclude=exclude)
    return await measure_residency(the_plan)


async def evict(
    paths: Iterable[str] | Plan, *, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> ResidencyReport:
    """Drop the clean cached pages of every file under ``paths``; return residency after."""
    the_plan = paths if isinstance(paths, Plan) else plan(paths, include=include, exclude=exclude)
    return await evict_plan(the_plan)
