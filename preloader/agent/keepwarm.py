"""The serve agent's keep-warm loop: measure chunk by chunk, re-read what was lost.

After the first pass, :class:`KeepWarm` measures each warmed path every
``recheck_seconds`` (:func:`~preloader.engine.keepwarm.measure_chunks`), re-reads only the
chunks that lost pages (:func:`~preloader.engine.warm.rewarm_chunks`), and backs off while
the same pages keep being lost (``degraded`` after :data:`DEGRADE_AFTER` checks in a row,
the interval doubling up to ``max_backoff_seconds``). Files a reader dropped on purpose
(:mod:`~preloader.agent.serverdrop`) are said, and under ``--on-server-drop hold`` left
alone until they are resident again. Runs on the agent's event loop; see
:class:`~preloader.agent.agent.Agent` for the whole.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

import anyio

from ..engine.events import EventKind
from ..engine.keepwarm import ChunkResidency, measure_chunks
from ..engine.residency import eviction_causes
from ..engine.warm import RewarmReport, rewarm_chunks
from ..planning.specs import Chunk, iter_chunks
from ..units import format_bytes
from .serverdrop import describe, dropped_by_reader, shadow_prunes
from .state import PassContext, ServedPath

__all__ = ["DEGRADE_AFTER", "KeepWarm"]

DEGRADE_AFTER = 2
"""Checks in a row that find pages lost again after they were read: then ``degraded``."""


class KeepWarm:
    """Re-check warmed paths on their schedule and re-read the chunks that lost pages.

    :param context: the served paths, settings, events and stop signals (see
        :class:`~.state.PassContext`).
    :param checked: called after each path's check (the agent decides readiness again).
    :param round_done: awaited after a round that checked a path (the agent reads the
        memory budget again).
    :param replan_if_changed: awaited at each check, before measuring (``False``) and
        when files could not be measured or grew (``True``): plans and warms the path
        again when it holds another revision now, and says whether it did.
    """

    def __init__(
        self,
        context: PassContext,
        checked: Callable[[], None],
        round_done: Callable[[], Awaitable[None]],
        replan_if_changed: Callable[[ServedPath, bool], Awaitable[bool]] | None = None,
    ) -> None:
        self._context = context
        self._emit = context.events.emit
        self._checked = checked
        self._round_done = round_done
        self._replan_if_changed = replan_if_changed

    async def run(self) -> None:
        """Check each warmed path when it is due, until the agent stops."""
        mark = shadow_prunes()
        for model in self._context.models:
            model.drops.shadow_mark = mark
        while not self._context.stopping.is_set():
            due = [m for m in self._context.models if m.kept_warm or self._watched(m)]
            if not due:
                await self._context.stopping.wait()
                return
            checked = False
            for model in due:
                if model.next_check <= time.monotonic() and not self._context.stop.is_set():
                    await self.check(model)
                    checked = True
                    self._checked()
                    self._context.events.changed()
            if checked:
                await self._round_done()
            delay = min(m.next_check for m in due) - time.monotonic()
            with anyio.move_on_after(max(0.0, delay)):
                await self._context.stopping.wait()

    def _watched(self, model: ServedPath) -> bool:
        """A warmed path refused as a whole (incomplete) is still watched for a new revision."""
        return self._replan_if_changed is not None and model.warmed and model.target is not None

    async def check(self, model: ServedPath) -> None:
        """Plan ``model`` again if it holds another revision now; else measure it, re-read
        the chunks that lost pages, and settle its state."""
        replan = self._replan_if_changed
        replanned = replan is not None and await replan(model, False)
        if replanned or not model.kept_warm:
            # Also after a re-plan that failed (an incomplete revision, a walk that
            # raised): the next look is an interval away, never at once.
            model.next_check = time.monotonic() + model.interval
            return
        measured = await measure_chunks(model.plan, self._context.chunk_size, self._context.readers)
        # A planned file that grew (still being written, or appended to) is planned and
        # warmed again with its new size, as a file replaced in place is; while it keeps
        # growing, each check does so again ("warm again once it is complete").
        changed = any(item.error is not None or item.grown_to is not None for item in measured)
        if changed and replan is not None and await replan(model, True):
            model.next_check = time.monotonic() + model.interval
            return
        self._find_drops(model, measured)
        held = model.drops.held
        lost: list[Chunk] = []
        evicted = 0
        for item in measured:
            if item.file_index in held:
                if item.resident_bytes is not None and item.resident_bytes >= item.size:
                    del held[item.file_index]  # read again: watched as any file from now on
                continue
            if item.reason is not None and not model.read_in_full[item.file_index]:
                lost.extend(self._all_chunks(model, item.file_index))  # never read in full
            else:
                lost.extend(item.lost)
                if item.error is None:
                    evicted += len(item.lost)
        # The state is settled once the lost chunks are read again: pages the kernel
        # dropped and this check restores are not a degradation (node labels follow it).
        model.apply_measurement(measured, settle=False)
        if not lost:
            if model.degraded_reason is not None:
                self._emit(EventKind.RECOVERED, model.root, "no pages lost since the last check")
            model.strikes = 0
            model.degraded_reason = None
            model.interval = self._context.config.recheck_seconds
            model.read_since_clean = set()
        else:
            await self._rewarm(model, lost, evicted)
        model.settle()
        model.next_check = time.monotonic() + model.interval

    def _find_drops(self, model: ServedPath, measured: Sequence[ChunkResidency]) -> None:
        """Say which files a reader dropped since the last check; hold them under ``hold``."""
        drops = model.drops
        mark = shadow_prunes()
        kept = mark is not None and mark == drops.shadow_mark
        drops.shadow_mark = mark
        previous = None if model.views is None else [v.resident_bytes for v in model.views]
        found = [
            item
            for item in dropped_by_reader(previous, measured, kept)
            if item.file_index not in drops.held
        ]
        if not found:
            return
        hold = self._context.config.on_server_drop == "hold"
        drops.files += len(found)
        drops.bytes += sum(item.size for item in found)
        if hold:
            drops.held.update((item.file_index, item.size) for item in found)
        self._emit(EventKind.SERVER_DROP, model.root, describe(found, hold))

    async def _rewarm(self, model: ServedPath, lost: Sequence[Chunk], evicted: int) -> None:
        keys = {(chunk.file_index, chunk.index) for chunk in lost}
        again = model.read_since_clean is None or not keys.isdisjoint(model.read_since_clean)
        model.evictions += evicted
        model.strikes = model.strikes + 1 if again else 0
        base = self._context.config.recheck_seconds
        if model.strikes >= DEGRADE_AFTER:
            model.interval = min(
                self._context.config.max_backoff_seconds,
                base * 2 ** (model.strikes - DEGRADE_AFTER + 1),
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
            self._context.options,
            on_event=lambda event: self._context.events.engine_event(model, event),
            stop=self._context.stop,
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
        if not self._context.stop.is_set():
            measured = await measure_chunks(
                model.plan, self._context.chunk_size, self._context.readers
            )
            if model.degraded_reason is not None and _restored(measured, keys, report):
                # The node held what was read again: the path is whole now, so it is not
                # degraded (nor unlabelled) for the backed-off interval. The strikes and
                # the interval stay: the next loss of these pages degrades it again.
                model.degraded_reason = None
                self._emit(
                    EventKind.RECOVERED,
                    model.root,
                    "every lost page is resident again after the re-read; next check in "
                    f"{model.interval:g} s",
                )
            model.apply_measurement(measured)

    def _all_chunks(self, model: ServedPath, index: int) -> list[Chunk]:
        spec = model.plan.files[index]
        return [
            Chunk(index, chunk.index, chunk.offset, chunk.length)
            for chunk in iter_chunks([spec], self._context.chunk_size)
            if chunk.length > 0
        ]


def _restored(
    measured: Sequence[ChunkResidency], keys: set[tuple[int, int]], report: RewarmReport
) -> bool:
    """Whether the re-read brought back every chunk in ``keys``, as measured just after it.

    :param measured: the measurement taken right after the re-read.
    :param keys: ``(file_index, chunk_index)`` of the chunks that were re-read.
    :param report: the re-read's report (an error or an interruption restores nothing).
    :return: ``True`` when each re-read file is measured and none of those chunks lacks a page.
    """
    if report.errors or report.interrupted:
        return False
    files = {file_index for file_index, _ in keys}
    for item in measured:
        if item.file_index not in files:
            continue
        if item.error is not None or item.resident_bytes is None:
            return False
        if any((chunk.file_index, chunk.index) in keys for chunk in item.lost):
            return False
    return True
