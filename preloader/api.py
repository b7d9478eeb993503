"""The public async API: plan, warm, measure and evict paths.

Another program can warm a model without the CLI::

    report = await preloader.warm(["/models/qwen"], concurrency=8)
    assert report.resident_ratio is None or report.resident_ratio > 0.99
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

import anyio
import anyio.to_thread

from .engine.events import EngineEvent
from .engine.reports import ResidencyReport, WarmProgress, WarmReport
from .engine.residency import evict_plan, measure_residency
from .engine.warm import warm_plan
from .errors import LockRefusedError
from .kernel.pinning import PinSet, memlock_permission
from .planning.budget import BudgetCheck, MemoryBudget, check_plan
from .planning.budget import read_memory_budget as _read_memory_budget
from .planning.planner import Plan, build_plan
from .settings import DEFAULT_HEADROOM, Headroom, OnOverflow, ReadMethod, WarmOptions
from .units import printable

__all__ = [
    "check_budget",
    "evict",
    "memory_budget",
    "pin",
    "plan",
    "residency",
    "warm",
]


def plan(
    paths: Iterable[str],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    all_formats: bool = False,
) -> Plan:
    """Walk ``paths`` into a warm plan (see :func:`preloader.planning.planner.build_plan`).

    :param all_formats: keep PyTorch pickles beside safetensors, safetensors an index
        does not name, and every GGUF model of a folder.
    """
    return build_plan(
        [str(p) for p in paths], include=include, exclude=exclude, all_formats=all_formats
    )


def memory_budget() -> MemoryBudget:
    """This process's memory budget right now (cgroup limit and usage, MemAvailable).

    Synchronous and cheap (a few small reads of ``/proc`` and ``/sys``); a sidecar may
    call it for every ``/status`` or metrics scrape, from a worker thread.
    """
    return _read_memory_budget()


async def check_budget(
    the_plan: Plan,
    *,
    on_overflow: OnOverflow = "trim",
    headroom: Headroom = DEFAULT_HEADROOM,
    budget: MemoryBudget | None = None,
) -> BudgetCheck:
    """Compare a plan with the memory budget; under ``trim``, cut it to fit.

    Bytes already resident cost nothing: when the plan is larger than the allowance, the
    residency of its files is measured first, so re-warming a warm model does not trim it.

    :param on_overflow: ``warn``, ``trim`` or ``fail`` (see :func:`~.planning.budget.check_plan`;
        raising for ``fail`` is the caller's business).
    :param budget: a budget read earlier; read now when omitted.
    :return: the check; :attr:`BudgetCheck.plan` is what to warm.
    """
    the_budget = (
        budget if budget is not None else await anyio.to_thread.run_sync(_read_memory_budget)
    )
    allowance = the_budget.allowance(headroom)
    resident: list[int | None] | None = None
    if allowance is not None and the_plan.total_bytes > allowance:
        measured = await measure_residency(the_plan)
        resident = [item.resident_bytes for item in measured.files]
    return check_plan(the_plan, the_budget, on_overflow, headroom, resident)


async def pin(the_plan: Plan) -> PinSet:
    """Lock every planned file's pages into memory (``mmap`` + ``mlock``); keep them there.

    Pages not cached yet are read by ``mlock`` itself. Call :meth:`PinSet.release` (or
    exit) to let the kernel reclaim them again.

    :raises LockRefusedError: before locking anything when ``RLIMIT_MEMLOCK`` is too small
        and the process lacks ``CAP_IPC_LOCK``, or when a lock fails (whatever was pinned
        is released again before it is raised).
    """
    refusal = memlock_permission().refusal(the_plan.total_bytes)
    if refusal is not None:
        raise LockRefusedError(refusal)
    pins = PinSet()

    def pin_all() -> str | None:
        for spec in the_plan.files:
            try:
                pins.pin(spec.path, spec.size, spec.dev, spec.ino, spec.mtime_ns)
            except OSError as err:
                pinned = pins.release()
                return (
                    f"{printable(spec.path)}: cannot pin: {err.strerror or err} "
                    f"(released the {pinned} bytes pinned before it)"
                )
        return None

    failure = await anyio.to_thread.run_sync(pin_all)
    if failure is not None:
        raise LockRefusedError(failure)
    return pins


async def warm(
    paths: Iterable[str] | Plan,
    *,
    concurrency: int = 4,
    chunk_size: int = 64 * 1024 * 1024,
    method: ReadMethod = "auto",
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
