"""The serve agent's keep-warm loop: measure chunk by chunk, re-read what was lost.

After the first pass, :class:`KeepWarm` measures each warmed path every
``recheck_seconds`` (:func:`preloader.engine.measure_chunks`), re-reads only the chunks
that lost pages (:func:`preloader.engine.rewarm_chunks`), and backs off while the same
pages keep being lost (``degraded`` after :data:`DEGRADE_AFTER` checks in a row, the
interval doubling up to ``max_backoff_seconds``). Runs on the agent's event loop; see
:class:`preloader.agent.Agent` for the whole.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio

from .agent_state import AgentState, ServedPath
from .engine import measure_chunks, rewarm_chunks
from .events import EventKind
from .planner import Chunk, iter_chunks
from .units import format_bytes
from .verify import eviction_causes

__all__ = ["DEGRADE_AFTER", "KeepWarm"]

DEGRADE_AFTER = 2
"""Checks in a row that find pages lost again after they were read: then ``degraded``."""


class KeepWarm(AgentState):
    """Re-check warmed paths on their schedule and re-read the chunks that lost pages."""

    async def _keep_warm(self) -> None:
        while not self._stopping.is_set():
            due = [m for m in self._models if m.kept_warm]
            if not due:
                await self._stopping.wait()
                return
            checked = False
            for model in due:
                if model.next_check <= time.monotonic() and not self._stop.is_set():
                    await self._check(model)
                    checked = True
                    self._update_ready()
                    self._changed()
            if checked:
                await self._read_budget()
            delay = min(m.next_check for m in due) - time.monotonic()
            with anyio.move_on_after(max(0.0, delay)):
                await self._stopping.wait()

    async def _check(self, model: ServedPath) -> None:
        measured = await measure_chunks(model.plan, self._chunk_size, self._readers)
        lost: list[Chunk] = []
        evicted = 0
        for item in measured:
            if item.reason is not None and not model.read_in_full[item.file_index]:
                lost.extend(self._all_chunks(model, item.file_index))  # never read in full
            else:
                lost.extend(item.lost)
                if item.error is None:
                    evicted += len(item.lost)
        # The state is settled once the lost chunks are read again: pages the kernel
        # dropped and this check restores are not a degradation (node labels follow it).
        self._apply_measurement(model, measured, settle=False)
        if not lost:
            if model.degraded_reason is not None:
                self._emit(EventKind.RECOVERED, model.root, "no pages lost since the last check")
            model.strikes = 0
            model.degraded_reason = None
            model.interval = self.config.recheck_seconds
            model.read_since_clean = set()
        else:
            await self._rewarm(model, lost, evicted)
        self._settle(model)
        model.next_check = time.monotonic() + model.interval

    async def _rewarm(self, model: ServedPath, lost: Sequence[Chunk], evicted: int) -> None:
        keys = {(chunk.file_index, chunk.index) for chunk in lost}
        again = model.read_since_clean is None or not keys.isdisjoint(model.read_since_clean)
        model.evictions += evicted
        model.strikes = model.strikes + 1 if again else 0
        base = self.config.recheck_seconds
        if model.strikes >= DEGRADE_AFTER:
            model.interval = min(
                self.config.max_backoff_seconds, base * 2 ** (model.strikes - DEGRADE_AFTER + 1)
            )
            model.degraded_reason = (
                f"pages lost again after re-reading them, {model.strikes} checks in a row "
                f"({eviction_causes()}); next check in "
                f"{model.interval:g} s"
            )
            self._emit(EventKind.DEGRADED, model.root, model.degraded_reason)
        else:
            model.interval = base
        report = await rewarm_chunks(
            model.plan,
            lost,
            self._options,
            on_event=lambda event: self._engine_event(model, event),
            stop=self._stop,
        )
        model.rewarm_bytes += report.read_bytes
        failed = {path for path, _ in report.errors}
        for index in {chunk.file_index for chunk in lost}:
            if model.plan.files[index].path not in failed and not report.interrupted:
                model.read_in_full[index] = True
        if model.read_since_clean is not None:
            model.read_since_clean |= keys
        self._emit(
            EventKind.REWARMED,
            model.root,
            f"{len(lost)} chunks had lost pages; {format_bytes(report.read_bytes)} re-read in "
            f"{report.seconds:.2f} s, {len(report.errors)} errors",
        )
        if not self._stop.is_set():
            measured = await measure_chunks(model.plan, self._chunk_size, self._readers)
            self._apply_measurement(model, measured)

    def _all_chunks(self, model: ServedPath, index: int) -> list[Chunk]:
        spec = model.plan.files[index]
        return [
            Chunk(index, chunk.index, chunk.offset, chunk.length)
            for chunk in iter_chunks([spec], self._chunk_size)
            if chunk.length > 0
        ]
