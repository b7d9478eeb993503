"""Progress display for the CLI: a tqdm bar on a terminal, periodic log lines elsewhere.

It only reads :class:`~preloader.engine.reports.WarmProgress`; the engine never prints.
"""

from __future__ import annotations

import sys
from typing import Any

import anyio

from ..engine.reports import WarmProgress

__all__ = ["show_progress"]


async def _bar(progress: WarmProgress) -> None:
    from tqdm import tqdm

    bar: Any = tqdm(
        total=progress.bytes_total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="warming",
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    try:
        while True:
            bar.total = progress.bytes_total
            bar.update(progress.bytes_read - bar.n)
            bar.set_postfix(files=f"{progress.files_done}/{progress.files_total}", refresh=False)
            await anyio.sleep(0.25)
    finally:
        bar.update(progress.bytes_read - bar.n)
        bar.close()


async def _log_lines(progress: WarmProgress, log: Any, interval: float) -> None:
    while True:
        await anyio.sleep(interval)
        total = progress.bytes_total or 1
        rate = progress.rate
        remaining = progress.bytes_total - progress.bytes_read
        log.info(
            "progress",
            state=progress.state,
            files_done=progress.files_done,
            files_total=progress.files_total,
            bytes_read=progress.bytes_read,
            bytes_total=progress.bytes_total,
            percent=round(100 * progress.bytes_read / total, 1),
            rate_bytes_per_second=round(rate),
            eta_seconds=round(remaining / rate, 1) if rate > 0 else None,
            concurrency=progress.concurrency,
            errors=progress.errors,
        )


async def show_progress(
    progress: WarmProgress, log: Any, bar: bool | None, interval: float
) -> None:
    """Run until cancelled, displaying ``progress``.

    :param bar: ``True`` for a bar, ``False`` for log lines, ``None`` to pick a bar when
        stderr is a terminal.
    :param interval: seconds between log lines.
    """
    if bar is None:
        bar = sys.stderr.isatty()
    if bar:
        await _bar(progress)
    elif interval > 0:
        await _log_lines(progress, log, interval)
