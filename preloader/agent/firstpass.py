"""The serve agent's first pass: plan every path, trim to the memory budget, warm.

:class:`FirstPass` plans each served path in a worker thread (a file reached from two
paths is served under the first), cuts the plans to the memory budget as ``warm``'s
``--on-overflow trim`` does, then warms the paths one after the other through
:func:`~preloader.engine.warm.warm_plan`. While that pass runs,
:meth:`FirstPass.watch_start_gate` samples its progress for the start gate
(:mod:`.startgate`) and, once the gate is open, measures whether the server's own reads
caught up with the warm-up. Runs on the agent's event loop; see
:class:`~preloader.agent.agent.Agent` for the whole.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.to_thread

from ..engine.events import EventKind
from ..engine.reports import WarmProgress
from ..engine.residency import measure_residency
from ..engine.warm import warm_plan
from ..planning.budget import BudgetCheck, MemoryBudget, check_plan
from ..planning.planner import Plan, build_plan
from ..planning.specs import FileSpec, Skipped, sparse_note
from ..settings import DEFAULT_HEADROOM
from ..units import format_bytes, printable
from .estimate import MountProgress
from .startgate import AHEAD_CHECK_SECONDS, TICK_SECONDS, StartGate
from .state import PassContext, ServedPath

__all__ = ["FirstPass"]


class FirstPass:
    """Plan, trim and warm every path once; watch the start gate meanwhile.

    :param context: the served paths, settings, events and stop signals (see
        :class:`~.state.PassContext`).
    :param gate: the start gate the pass's progress feeds.
    :param is_ready: whether ``/readyz`` is open now (for the gate's snapshot).
    :param on_start: called when the estimate opens the start gate.
    :param known_unready: why ``/readyz`` cannot open when the pass ends, if that is known
        already (a path failed as a whole, a missing root); it keeps the estimate from
        opening the start gate.
    :param planned_again: awaited when a path was planned again, before it is warmed again
        (``--lock`` releases the pins of the files no longer planned).
    :param on_file_read: handed to the pass (see :func:`~preloader.engine.warm.warm_plan`):
        ``--lock`` pins each shard as soon as it is read.
    """

    def __init__(
        self,
        context: PassContext,
        gate: StartGate,
        is_ready: Callable[[], bool],
        on_start: Callable[[], None],
        known_unready: Callable[[], str | None] = lambda: None,
        planned_again: Callable[[], Awaitable[None]] | None = None,
        on_file_read: Callable[[FileSpec], None] | None = None,
    ) -> None:
        self._context = context
        self._emit = context.events.emit
        self._gate = gate
        self._is_ready = is_ready
        self._on_start = on_start
        self._known_unready = known_unready
        self._planned_again = planned_again
        self._on_file_read = on_file_read

    async def plan_all(self) -> None:
        seen: dict[tuple[int, int], str] = {}
        for model in self._context.models:
            if self._context.stop.is_set() or not await self._plan_one(model, seen):
                return

    async def replan_if_changed(self, model: ServedPath, files_failed: bool) -> bool:
        """Plan ``model`` again and warm it when its root now holds another revision.

        Another revision: the root resolves elsewhere (a link switched to another snapshot
        folder), or, when ``files_failed`` (a keep-warm measurement could not open some
        planned files, or found one grown), a fresh walk finds a planned file's path with
        another size or modification time (files replaced, or grown). A file only removed
        is not a new revision: it stays a counted error, retried. Metadata only.

        :return: whether it planned and warmed the path again.
        """
        target = await anyio.to_thread.run_sync(
            os.path.realpath, model.root, abandon_on_cancel=True
        )
        if model.target is not None and target != model.target:
            was = printable(model.target)
            await self._replan(model, f"now resolves to {printable(target)} (was {was})")
            return True
        if not files_failed:
            return False
        walked = await self._walk(model.root)
        if walked is None:
            return False
        found = {spec.path: (spec.size, spec.mtime_ns) for spec in walked[0].files}
        replaced = [
            (spec, found[spec.path][0])
            for spec in model.plan.files
            if found.get(spec.path, (spec.size, spec.mtime_ns)) != (spec.size, spec.mtime_ns)
        ]
        if not replaced:  # a file only gone stays a counted error, retried
            return False
        first, size_now = replaced[0]
        how = f"grew from {first.size} to {size_now} bytes" if size_now > first.size else "replaced"
        await self._replan(
            model,
            f"{len(replaced)} planned files changed (first {printable(first.path)}: {how})",
        )
        return True

    async def _replan(self, model: ServedPath, why: str) -> None:
        """Forget ``model``'s plan, plan it again and warm it (the other paths' files stay
        theirs: a file reached from two paths is served under the first). The new plan is
        not trimmed to the memory budget again."""
        self._emit(EventKind.REPLANNED, model.root, f"{why}: planning and warming it again")
        model.replace_plan()
        self._context.events.changed()
        seen = {
            (spec.dev, spec.ino): other.root
            for other in self._context.models
            if other is not model
            for spec in other.plan.files
        }
        if not await self._plan_one(model, seen):
            return
        if self._planned_again is not None:
            await self._planned_again()
        if not self._context.stop.is_set():
            await self.warm(model)

    async def _plan_one(self, model: ServedPath, seen: dict[tuple[int, int], str]) -> bool:
        """Plan one path (files in ``seen`` are another path's); False when stopped."""
        try:
            walked = await self._walk(model.root)
        except Exception as err:  # a bug must not take the other paths down
            self._context.events.fail(model, f"planning failed: {type(err).__name__}: {err}")
            return True
        if walked is None:  # stopped while walking
            return False
        plan, model.target = walked
        files = []
        skipped = list(plan.skipped)
        for spec in plan.files:
            first = seen.setdefault((spec.dev, spec.ino), model.root)
            if first == model.root:
                files.append(spec)
            else:
                skipped.append(
                    Skipped(spec.path, f"same file already served under {printable(first)}")
                )
        model.plan = Plan(plan.roots, tuple(files), tuple(skipped), plan.choices, plan.problems)
        model.read_in_full = [False] * len(files)
        model.state = "warming"
        for item in skipped:
            self._emit(EventKind.SKIPPED, item.path, item.reason)
        for spec in files:
            note = sparse_note(spec)
            if note is not None:
                self._emit(EventKind.SPARSE_FILE, spec.path, note)
        for problem in plan.problems:
            if not problem.fatal:
                self._emit(EventKind.ODD_LAYOUT, problem.path, problem.message)
        fatal = [problem for problem in plan.problems if problem.fatal]
        if fatal:
            # As `warm` refuses it (exit 8): an incomplete model never opens the gate.
            for problem in fatal:
                self._emit(EventKind.INCOMPLETE_MODEL, problem.path, problem.message)
            cause = f"incomplete model: {printable(fatal[0].path)}: {fatal[0].message}"
            self._context.events.fail(model, cause, reason="incomplete", where=fatal[0].path)
            return True
        self._emit(
            EventKind.PLANNED,
            model.root,
            f"{len(files)} files, {format_bytes(model.plan.total_bytes)}, {len(skipped)} skipped",
        )
        self._context.events.changed()
        return True

    async def _walk(self, root: str) -> tuple[Plan, str] | None:
        """Plan one path in a worker thread, with what the root resolves to; ``None``
        when a stop came first.

        Abandoned on stop: a ``readdir`` stuck on storage that stopped answering cannot be
        interrupted, and a stop must not wait for it (nor for a walk of 200,000 files).
        """
        selection = self._context.config.selection
        plans: list[tuple[Plan, str]] = []
        async with anyio.create_task_group() as group:

            async def cancel_on_stop() -> None:
                await self._context.stopping.wait()
                group.cancel_scope.cancel()

            group.start_soon(cancel_on_stop)
            plans.append(
                await anyio.to_thread.run_sync(
                    lambda: (
                        build_plan(
                            [root], selection.include, selection.exclude, selection.all_formats
                        ),
                        os.path.realpath(root),
                    ),
                    abandon_on_cancel=True,
                )
            )
            group.cancel_scope.cancel()
        return plans[0] if plans else None

    def trim_to_budget(self, budget: MemoryBudget | None) -> None:
        """Cut the plans to the memory budget as ``warm`` does (``--on-overflow trim``).

        The paths' plans are taken together, in order: a sparse 1 TiB file or a model
        larger than the pod's memory is warmed as far as it fits, and the rest stays cold
        (``cold_bytes`` in ``/status``), instead of reading pages that would only evict
        each other.
        """
        if budget is None:
            return
        models = [m for m in self._context.models if m.state != "failed"]
        combined = Plan(tuple(m.root for m in models), (f for m in models for f in m.plan.files))
        check: BudgetCheck = check_plan(combined, budget, "trim", DEFAULT_HEADROOM)
        if not check.over_budget:
            return
        kept = check.plan.files  # a prefix of the combined plan, in order
        offset = 0
        for model in models:
            count = len(model.plan.files)
            mine = kept[offset : offset + count]
            offset += count
            model.cold_bytes = model.plan.total_bytes - sum(spec.size for spec in mine)
            model.plan = dataclasses.replace(model.plan, files=mine)
            model.read_in_full = [False] * len(mine)
        self._emit(
            EventKind.TRIMMED,
            detail=f"over memory budget: {check.message()}; warming "
            f"{format_bytes(check.plan.total_bytes)}, {format_bytes(check.cold_bytes)} "
            "stay cold",
        )
        self._context.events.changed()

    async def warm(self, model: ServedPath) -> None:
        if model.state == "failed":
            return
        model.progress = WarmProgress()
        model.warm_started = time.monotonic()
        self._context.events.changed()
        try:
            report = await warm_plan(
                model.plan,
                self._context.options,
                progress=model.progress,
                on_event=lambda event: self._context.events.engine_event(model, event),
                stop=self._context.stop,
                on_file_read=self._on_file_read,
            )
        except Exception as err:  # a bug must not take the other paths down
            self._context.events.fail(model, f"warm pass failed: {type(err).__name__}: {err}")
            return
        model.warm_seconds = time.monotonic() - model.warm_started
        model.apply_report(report)
        model.next_check = time.monotonic() + model.interval
        self._emit(
            EventKind.WARMED,
            model.root,
            f"{format_bytes(report.read_bytes)} read in {report.seconds:.1f} s, "
            f"{model.warm_ratio():.1%} warm, {len(report.errors)} errors",
        )
        self._context.events.changed()

    # -- the start gate -----------------------------------------------------------------

    def _first_pass_bytes(self) -> tuple[int, int]:
        done = sum(min(m.progress.bytes_arrived, m.plan.total_bytes) for m in self._context.models)
        return done, sum(m.plan.total_bytes for m in self._context.models)

    def _mounts(self) -> list[MountProgress]:
        """The pass's progress per mount (a path's mount: the device of its first file);
        paths failed as a whole are left out, nothing more of them will be read."""
        mounts: dict[object, list[int]] = {}
        for model in self._context.models:
            if model.state == "failed" and model.warm_started is None:
                continue
            files = model.plan.files
            key: object = files[0].dev if files else model.root
            entry = mounts.setdefault(key, [0, 0, 0])
            entry[0] += min(model.progress.bytes_arrived, model.plan.total_bytes)
            entry[1] += model.plan.total_bytes
            entry[2] |= model.warm_started is not None
        return [
            MountProgress(key, done, total, bool(started))
            for key, (done, total, started) in mounts.items()
        ]

    async def watch_start_gate(self) -> None:
        """Sample the first pass, open the start gate by the estimate, watch for reads ahead.

        The residency checks run beside the sampling, never in its way: a check that waits
        on a stalled FUSE mount must not freeze the estimate.
        """
        async with anyio.create_task_group() as group:
            group.start_soon(self._watch_ahead)
            while True:
                cause = self._known_unready()
                if cause is not None:
                    self._gate.block(cause)
                if self._gate.observe_mounts(time.monotonic(), self._mounts()):
                    self._on_start()
                await anyio.sleep(TICK_SECONDS)

    async def _watch_ahead(self) -> None:
        while True:
            if self._gate.watching_ahead:
                await self._check_ahead()
                await anyio.sleep(AHEAD_CHECK_SECONDS)
            else:
                await anyio.sleep(TICK_SECONDS)

    async def check_ahead_now(self) -> None:
        """One residency check now, if the gate opened early and nothing is ahead yet
        (at a path's end: the next path's reads would hide what got ahead)."""
        if self._gate.watching_ahead:
            await self._check_ahead()

    async def _check_ahead(self) -> None:
        concurrency = self._context.readers
        resident: int | None = 0
        for model in self._context.models:
            if not model.plan.files:
                continue
            try:
                measured = (await measure_residency(model.plan, concurrency)).resident_bytes
            except Exception:  # a bug here must not stop the warm-up: the verdict is unknown
                measured = None
            resident = None if resident is None or measured is None else resident + measured
        # Read after measuring: reads that finished meanwhile count against what is ahead.
        done, _ = self._first_pass_bytes()
        in_flight = max([concurrency, *(m.progress.concurrency for m in self._context.models)])
        slack = (in_flight + 1) * self._context.chunk_size
        if self._gate.measured(resident, done, slack):
            snap = self._gate.snapshot(time.monotonic(), self._is_ready())
            self._emit(
                EventKind.START_LEAD_TOO_LONG,
                detail=(
                    f"{format_bytes(snap.ahead_bytes or 0)} resident ahead of the warm-up after "
                    f"the start gate opened: the server caught up with it (start lead "
                    f"{self._gate.lead:g} s is longer than the server's start-up)"
                ),
            )
        self._context.events.changed()
