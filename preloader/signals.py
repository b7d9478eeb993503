"""One signal lifecycle for the long-running commands (warm, serve, wait).

Modelled on uvicorn's ``Server.capture_signals``/``handle_exit``: the first SIGINT or
SIGTERM asks the work to stop and starts a grace timer; a second signal, or the timer
running out, cancels. Handlers are in place before the work starts (a signal during
planning counts) and are put back afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from types import FrameType

import anyio
import anyio.abc

from .logs import get_logger

__all__ = ["SIGNALS", "StopSignals"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A signal after the work: the process is about to exit with its summary anyway."""


class StopSignals:
    """Capture SIGINT/SIGTERM around a block of async work.

    :param on_stop: called on the first signal (set a stop event, ask a server to exit).
    :param on_force: called on the second signal, before the block is cancelled.
    :param grace: seconds from the first signal until the block is cancelled; ``None``
        for no timer (the work bounds its own shutdown), 0 to cancel at once.
    :param level: log level of the "stopping" line; ``None`` logs nothing.
    :param hold_after: after the block, ignore these signals until the process exits
        (the summary must not be cut short) instead of restoring the handlers before.
    :ivar received: the signals received, in order.
    """

    def __init__(
        self,
        on_stop: Callable[[], None] = lambda: None,
        *,
        on_force: Callable[[], None] = lambda: None,
        grace: float | None = None,
        level: int | None = logging.WARNING,
        hold_after: bool = False,
    ) -> None:
        self.on_stop = on_stop
        self.on_force = on_force
        self.grace = grace
        self.level = level
        self.hold_after = hold_after
        self.received: list[int] = []

    @property
    def first(self) -> int | None:
        """The first signal received, if any."""
        return self.received[0] if self.received else None

    @contextlib.asynccontextmanager
    async def capture(self) -> AsyncIterator[anyio.CancelScope]:
        """Run the block with the signals captured; yields the scope a signal cancels.

        The block's result is whatever it sets before leaving; when a second signal or
        the grace timer cancels it, the ``async with`` ends without an exception.
        """
        before = {signum: signal.getsignal(signum) for signum in SIGNALS}
        try:
            async with anyio.create_task_group() as group:
                await group.start(self._watch, group)
                yield group.cancel_scope
                group.cancel_scope.cancel()
        finally:
            for signum, handler in before.items():
                signal.signal(signum, _ignore if self.hold_after else handler)

    async def _watch(
        self, group: anyio.abc.TaskGroup, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        with anyio.open_signal_receiver(*SIGNALS) as signals:
            task_status.started()
            async for signum in signals:
                self.received.append(signum)
                name = signal.Signals(signum).name
                log = get_logger()
                if len(self.received) == 1:
                    if self.level is not None:
                        log.log(self.level, "stopping", signal=name)
                    self.on_stop()
                    if self.grace is not None:
                        group.start_soon(self._cancel_later, group.cancel_scope)
                else:
                    log.warning("stopping now", signal=name)
                    self.on_force()
                    group.cancel_scope.cancel()

    async def _cancel_later(self, scope: anyio.CancelScope) -> None:
        assert self.grace is not None
        if self.grace > 0:
            await anyio.sleep(self.grace)
            get_logger().error("stop grace ran out", seconds=self.grace)
        scope.cancel()
