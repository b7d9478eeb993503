"""The one signal scope of warm, serve and wait, with real signals to this process."""

from __future__ import annotations

import os
import signal

import anyio
import pytest

from preloader.signals import StopSignals

pytestmark = pytest.mark.anyio
DEADLINE = 30  # seconds; a bound against hangs, never a synchronisation


async def test_first_signal_stops_second_cancels_and_handlers_come_back() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stopping = anyio.Event()
    forced: list[bool] = []
    signals = StopSignals(stopping.set, on_force=lambda: forced.append(True), grace=None)
    finished = False
    with anyio.fail_after(DEADLINE):
        async with signals.capture():
            os.kill(os.getpid(), signal.SIGTERM)
            await stopping.wait()
            assert not forced  # the first signal only asks to stop
            os.kill(os.getpid(), signal.SIGINT)
            await anyio.sleep_forever()
            finished = True
    assert not finished and forced == [True]
    assert signals.received == [signal.SIGTERM, signal.SIGINT]
    assert signals.first == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in before} == before


async def test_the_grace_timer_cancels_after_one_signal() -> None:
    stopping = anyio.Event()
    signals = StopSignals(stopping.set, grace=0)
    with anyio.fail_after(DEADLINE):
        async with signals.capture():
            os.kill(os.getpid(), signal.SIGTERM)
            await anyio.sleep_forever()
    assert stopping.is_set() and signals.received == [signal.SIGTERM]


async def test_hold_after_ignores_signals_until_exit() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        async with StopSignals(hold_after=True).capture():
            pass
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: the test process lives on
        assert signal.getsignal(signal.SIGTERM) not in (before[signal.SIGTERM], signal.SIG_DFL)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


async def test_without_a_signal_the_block_runs_to_its_end() -> None:
    signals = StopSignals()
    result = None
    async with signals.capture():
        result = 42
    assert result == 42 and signals.first is None
