"""The serve agent: plan, warm, decide readiness, keep the pages warm.

A small state machine that lives on the event loop, on top of the engine: it plans each
path, warms the paths one after the other, decides when the gate opens (``/readyz``),
then re-checks residency chunk by chunk every ``recheck_seconds`` and re-reads only the
chunks that lost pages. While the first pass runs it also decides the start gate
(``/startz``, :mod:`preloader.startgate`), which opens ``start_lead`` seconds before the
pass's estimated end and at the latest with ``/readyz``. Threading contract: everything
runs on the agent's event loop except :meth:`Agent.snapshot`, which the front ends (the
HTTP handlers, the metrics collector) call from uvicorn's thread; it does no I/O, only
reads plain attributes and builds a fresh immutable :class:`AgentSnapshot`. The agent
never prints; it reports through an :class:`~preloader.engine.EngineEvent` callback.

Readiness, per path: the first warm pass is over and the *warm share* is at least
``ready_ratio``. The warm share counts resident bytes as measured; a file whose residency
the kernel will not reveal (see :mod:`preloader.pagecache`) counts as warm once it was read
in full, and the path is then flagged unverified.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
import anyio.to_thread

from .budget import DEFAULT_HEADROOM, BudgetCheck, MemoryBudget, check_plan, read_memory_budget
from .engine import (
    ChunkResidency,
    EngineEvent,
    WarmProgress,
    WarmReport,
    effective_chunk_size,
    measure_chunks,
    measure_residency,
    rewarm_chunks,
    warm_plan,
)
from .events import ERROR_REASONS as ERROR_REASONS
from .events import ErrorReason, EventKind
from .planner import Chunk, Plan, Skipped, build_plan, iter_chunks, printable, sparse_note
from .settings import ServeConfig
from .snapshot import FILE_STATES as FILE_STATES
from .snapshot import STATES as STATES
from .snapshot import AgentSnapshot as AgentSnapshot
from .snapshot import PathSnapshot as PathSnapshot
from .startgate import AHEAD_CHECK_SECONDS, TICK_SECONDS, StartGate
from .units import format_bytes

__all__ = [
    "DEGRADE_AFTER",
    "ERROR_REASONS",
    "FILE_STATES",
    "STATES",
    "Agent",
    "AgentSnapshot",
    "PathSnapshot",
]

DEGRADE_AFTER = 2
"""Checks in a row that find pages lost again after they were read: then ``degraded``."""

_ERROR_DETAILS = 20  # per path in /status; the log has every one


@dataclass(frozen=True)
class _FileView:
    """One file's last known residency, from a warm pass or a keep-warm measurement."""

    resident_bytes: int | None
    unknown_reason: str | None = None
    error: str | None = None


class _Model:
    """One served path; touched only on the event loop."""

    def __init__(self, root: str, interval: float) -> None:
        self.root = root
        self.state = "planning"
        self.plan = Plan((root,), ())
        self.progress = WarmProgress()
        self.warm_started: float | None = None
        self.warm_seconds: float | None = None
        self.read_in_full: list[bool] = []
        self.views: list[_FileView] | None = None
        self.rewarm_bytes = 0
        self.errors: Counter[str] = Counter()
        self.error_details: deque[tuple[str, str]] = deque(maxlen=_ERROR_DETAILS)
        self.evictions = 0
        self.strikes = 0
        self.degraded_reason: str | None = None
        self.interval = interval
        self.next_check = 0.0
        self.last_check: float | None = None
        # Chunks read since the last check that found nothing lost; None: all of them
        # (the first pass read every chunk).
        self.read_since_clean: set[tuple[int, int]] | None = None
        self.cold_bytes = 0
        self.failed_reason: str | None = None

    @property
    def warmed(self) -> bool:
        return self.state in ("ready", "degraded", "failed")

    @property
    def kept_warm(self) -> bool:
        """Keep-warm measures it: warmed, with files, and not refused as a whole."""
        return self.warmed and bool(self.plan.files) and self.failed_reason is None

    def warm_bytes(self) -> int:
        if self.views is None:
            return 0
        total = 0
        for spec, view, full in zip(self.plan.files, self.views, self.read_in_full, strict=True):
            if view.error is not None:
                continue
            if view.resident_bytes is not None:
                total += view.resident_bytes
            elif full:
                total += spec.size
        return total

    def warm_ratio(self) -> float:
        total = self.plan.total_bytes
        return self.warm_bytes() / total if total else 1.0

    def file_states(self) -> Counter[str]:
        if self.views is None:
            done = self.progress.files_done
            errors = min(self.progress.errors, done)
            return Counter(
                {
                    "pending": len(self.plan.files) - done,
                    "read": done - errors,
                    "error": errors,
                }
            )
        states: Counter[str] = Counter()
        for spec, view in zip(self.plan.files, self.views, strict=True):
            if view.error is not None:
                states["error"] += 1
            elif view.resident_bytes is None:
                states["unknown"] += 1
            elif view.resident_bytes >= spec.size:
                states["resident"] += 1
            else:
                states["not_resident"] += 1
        return states

    def resident(self) -> tuple[int | None, str | None]:
        if self.views is None:
            return None, None
        for spec, view in zip(self.plan.files, self.views, strict=True):
            if view.resident_bytes is None and view.error is None:
                return None, f"{printable(spec.path)}: {view.unknown_reason}"
        return sum(v.resident_bytes or 0 for v in self.views), None


class Agent:
    """Warm the configured paths, decide readiness, keep them warm.

    Construction does no I/O. :meth:`run` does the work until :meth:`stop`; tests may
    drive the phases themselves with :meth:`start_up` and :meth:`recheck`.

    :param config: the serve settings (paths, read options, readiness, keep-warm).
    :param on_event: called on the event loop for engine events (per-file errors, ...) and
        the agent's own: ``planned``, ``skipped``, ``warmed``, ``start``, ``ready``,
        ``unready``, ``timeout``, ``start_lead_too_long``, ``rewarmed``, ``degraded``,
        ``recovered``, ``failed``. ``path`` is the file for engine events and the served
        path for the agent's.
    """

    def __init__(
        self, config: ServeConfig, on_event: Callable[[EngineEvent], None] | None = None
    ) -> None:
        self.config = config
        self._on_event = on_event
        self._options = dataclasses.replace(config.options, timeout=None, verify=True)
        self._chunk_size = effective_chunk_size(config.options.chunk_size)
        self._models = [
            _Model(root, config.recheck_seconds) for root in dict.fromkeys(config.selection.paths)
        ]
        self._stop = threading.Event()
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        self._change = anyio.Event()
        self._started = time.monotonic()
        self._first_pass_done = False
        self._ready = not self._models
        self._forced_ready = False
        self._timed_out = False
        self._budget: MemoryBudget | None = None
        self._gate = StartGate(config.start_lead, self._started)
        if self._ready:
            self._gate.ready_opened(self._started)

    # -- what front ends read ---------------------------------------------------------

    @property
    def stopped(self) -> anyio.Event:
        """Set once :meth:`run` has returned."""
        return self._stopped

    def snapshot(self) -> AgentSnapshot:
        """The agent's state now, from memory only.

        Called from the HTTP server's thread while the agent's loop runs: it reads plain
        attributes (each read atomic under the GIL) into a new frozen object, never
        mutates, never awaits.
        """
        paths = tuple(self._path_snapshot(model) for model in self._models)
        rate = sum(p.rate for p, m in zip(paths, self._models, strict=True) if not m.warmed)
        remaining = sum(max(0, p.bytes - p.read_bytes) for p in paths)
        if not self._first_pass_done and self._models:
            eta = remaining / rate if rate > 0 else None
        else:
            eta = 0.0
        return AgentSnapshot(
            state=self._state(),
            ready=self._ready,
            reason=self._reason(paths),
            timed_out=self._timed_out,
            ready_ratio=self.config.ready_ratio,
            paths=paths,
            uptime_seconds=time.monotonic() - self._started,
            rate=rate,
            eta_seconds=eta,
            skip_reason=self.config.selection.skip_reason,
            memory_budget=self._budget,
            start_gate=self._gate.snapshot(time.monotonic(), self._ready),
        )

    async def wait_until(self, predicate: Callable[[AgentSnapshot], bool]) -> AgentSnapshot:
        """Return the first snapshot for which ``predicate`` holds (re-checked on changes).

        Wrap it in :func:`anyio.fail_after` to bound the wait.
        """
        while True:
            change = self._change
            snap = self.snapshot()
            if predicate(snap):
                return snap
            await change.wait()

    # -- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop reading and end :meth:`run` soon (call on the event loop)."""
        self._stop.set()
        self._stopping.set()

    async def run(self) -> None:
        """Plan, warm, then keep warm until :meth:`stop`."""
        try:
            async with anyio.create_task_group() as group:
                if self.config.timeout is not None:
                    group.start_soon(self._deadline, self.config.timeout)
                await self.start_up()
                if self.config.recheck_seconds > 0 and self._models:
                    await self._keep_warm()
                else:
                    await self._stopping.wait()
                group.cancel_scope.cancel()
        finally:
            self._stopped.set()

    async def start_up(self) -> None:
        """Plan every path, then warm them one after the other and decide readiness."""
        if not self._models:
            self._emit(EventKind.READY, detail=self._reason(()))
            self._changed()
            return
        await self._plan_all()
        await self._read_budget()
        self._trim_to_budget()
        async with anyio.create_task_group() as group:
            group.start_soon(self._watch_start_gate)
            for model in self._models:
                if self._stop.is_set():
                    break
                await self._warm(model)
            group.cancel_scope.cancel()
        self._gate.pass_over()
        self._first_pass_done = not self._stop.is_set()
        self._update_ready()
        self._changed()

    async def recheck(self) -> None:
        """One keep-warm round over every path now, due or not."""
        for model in self._models:
            if self._stop.is_set():
                return
            if model.kept_warm:
                await self._check(model)
        await self._read_budget()
        self._update_ready()
        self._changed()

    # -- phases -------------------------------------------------------------------------

    async def _plan_all(self) -> None:
        seen: dict[tuple[int, int], str] = {}
        for model in self._models:
            if self._stop.is_set():
                return
            try:
                plan = await self._walk(model.root)
            except Exception as err:  # a bug must not take the other paths down
                self._fail(model, f"planning failed: {type(err).__name__}: {err}")
                continue
            if plan is None:  # stopped while walking
                return
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
                self._fail(model, cause, reason="incomplete", where=fatal[0].path)
                continue
            self._emit(
                EventKind.PLANNED,
                model.root,
                f"{len(files)} files, {format_bytes(model.plan.total_bytes)}, "
                f"{len(skipped)} skipped",
            )
            self._changed()

    async def _walk(self, root: str) -> Plan | None:
        """Plan one path in a worker thread; ``None`` when a stop came first.

        Abandoned on stop: a ``readdir`` stuck on storage that stopped answering cannot be
        interrupted, and a stop must not wait for it (nor for a walk of 200,000 files).
        """
        selection = self.config.selection
        plans: list[Plan] = []
        async with anyio.create_task_group() as group:

            async def cancel_on_stop() -> None:
                await self._stopping.wait()
                group.cancel_scope.cancel()

            group.start_soon(cancel_on_stop)
            plans.append(
                await anyio.to_thread.run_sync(
                    lambda: build_plan(
                        [root], selection.include, selection.exclude, selection.all_formats
                    ),
                    abandon_on_cancel=True,
                )
            )
            group.cancel_scope.cancel()
        return plans[0] if plans else None

    def _trim_to_budget(self) -> None:
        """Cut the plans to the memory budget as ``warm`` does (``--on-overflow trim``).

        The paths' plans are taken together, in order: a sparse 1 TiB file or a model
        larger than the pod's memory is warmed as far as it fits, and the rest stays cold
        (``cold_bytes`` in ``/status``), instead of reading pages that would only evict
        each other.
        """
        if self._budget is None:
            return
        models = [m for m in self._models if m.state != "failed"]
        combined = Plan(
            tuple(m.root for m in models), tuple(f for m in models for f in m.plan.files)
        )
        check: BudgetCheck = check_plan(combined, self._budget, "trim", DEFAULT_HEADROOM)
        if not check.over_budget:
            return
        kept = check.plan.files  # a prefix of the combined plan, in order
        offset = 0
        for model in models:
            count = len(model.plan.files)
            mine = kept[offset : offset + count]
            offset += count
            model.cold_bytes = model.plan.total_bytes - sum(spec.size for spec in mine)
            model.plan = dataclasses.replace(model.plan, files=tuple(mine))
            model.read_in_full = [False] * len(mine)
        self._emit(
            EventKind.TRIMMED,
            detail=f"over memory budget: {check.message()}; warming "
            f"{format_bytes(check.plan.total_bytes)}, {format_bytes(check.cold_bytes)} "
            "stay cold",
        )
        self._changed()

    async def _warm(self, model: _Model) -> None:
        if model.state == "failed":
            return
        model.progress = WarmProgress()
        model.warm_started = time.monotonic()
        self._changed()
        try:
            report = await warm_plan(
                model.plan,
                self._options,
                progress=model.progress,
                on_event=lambda event: self._engine_event(model, event),
                stop=self._stop,
            )
        except Exception as err:  # a bug must not take the other paths down
            self._fail(model, f"warm pass failed: {type(err).__name__}: {err}")
            return
        model.warm_seconds = time.monotonic() - model.warm_started
        self._apply_report(model, report)
        model.next_check = time.monotonic() + model.interval
        self._emit(
            EventKind.WARMED,
            model.root,
            f"{format_bytes(report.read_bytes)} read in {report.seconds:.1f} s, "
            f"{model.warm_ratio():.1%} warm, {len(report.errors)} errors",
        )
        self._changed()

    def _apply_report(self, model: _Model, report: WarmReport) -> None:
        views = []
        for index, result in enumerate(report.files):
            model.read_in_full[index] = result.error is None and result.read_bytes >= result.size
            views.append(
                _FileView(result.residency.resident_bytes, result.residency.reason, result.error)
            )
        model.views = views
        self._settle(model)

    def _apply_measurement(
        self, model: _Model, measured: Sequence[ChunkResidency], settle: bool = True
    ) -> None:
        model.views = [_FileView(m.resident_bytes, m.reason, m.error) for m in measured]
        model.last_check = time.time()
        if settle:
            self._settle(model)

    def _settle(self, model: _Model) -> None:
        states = model.file_states()
        if model.plan.files and states["error"] == len(model.plan.files):
            model.state = "failed"
        elif model.degraded_reason is not None or model.warm_ratio() < self.config.ready_ratio:
            model.state = "degraded"
        else:
            model.state = "ready"

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

    async def _check(self, model: _Model) -> None:
        concurrency = max(1, self._options.concurrency or 4)
        measured = await measure_chunks(model.plan, self._chunk_size, concurrency)
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

    async def _rewarm(self, model: _Model, lost: Sequence[Chunk], evicted: int) -> None:
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
                "(memory pressure or a cgroup limit below the model size?); next check in "
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
            concurrency = max(1, self._options.concurrency or 4)
            measured = await measure_chunks(model.plan, self._chunk_size, concurrency)
            self._apply_measurement(model, measured)

    async def _read_budget(self) -> None:
        # A few small reads of /proc and /sys, on a worker thread, on the agent's schedule.
        self._budget = await anyio.to_thread.run_sync(read_memory_budget)

    def _all_chunks(self, model: _Model, index: int) -> list[Chunk]:
        spec = model.plan.files[index]
        return [
            Chunk(index, chunk.index, chunk.offset, chunk.length)
            for chunk in iter_chunks([spec], self._chunk_size)
            if chunk.length > 0
        ]

    async def _deadline(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, self._started + seconds - time.monotonic()))
        if self._ready:
            return
        self._timed_out = True
        if self.config.timeout_policy == "ready":
            self._forced_ready = True
            self._ready = True
            self._open_start_gate("timeout")
            detail = (
                f"not warm after {seconds:g} s: READY ANYWAY (timeout policy 'ready'); "
                "the server may load cold weights"
            )
        else:
            detail = f"not warm after {seconds:g} s: staying unready (timeout policy 'unready')"
        self._emit(EventKind.TIMEOUT, detail=detail)
        self._changed()

    # -- the start gate -----------------------------------------------------------------

    def _first_pass_bytes(self) -> tuple[int, int]:
        done = sum(min(m.progress.bytes_read, m.plan.total_bytes) for m in self._models)
        return done, sum(m.plan.total_bytes for m in self._models)

    async def _watch_start_gate(self) -> None:
        """Sample the first pass, open the start gate by the estimate, watch for reads ahead."""
        next_check = 0.0
        while True:
            now = time.monotonic()
            done, total = self._first_pass_bytes()
            if self._gate.observe(now, done, total):
                self._emit_start()
            if self._gate.watching_ahead and now >= next_check:
                await self._check_ahead()
                next_check = time.monotonic() + AHEAD_CHECK_SECONDS
            await anyio.sleep(TICK_SECONDS)

    async def _check_ahead(self) -> None:
        concurrency = max(1, self._options.concurrency or 4)
        resident: int | None = 0
        for model in self._models:
            if not model.plan.files:
                continue
            try:
                measured = (await measure_residency(model.plan, concurrency)).resident_bytes
            except Exception:  # a bug here must not stop the warm-up: the verdict is unknown
                measured = None
            resident = None if resident is None or measured is None else resident + measured
        # Read after measuring: reads that finished meanwhile count against what is ahead.
        done, _ = self._first_pass_bytes()
        in_flight = max([concurrency, *(m.progress.concurrency for m in self._models)])
        slack = (in_flight + 1) * self._chunk_size
        if self._gate.measured(resident, done, slack):
            snap = self._gate.snapshot(time.monotonic(), self._ready)
            self._emit(
                EventKind.START_LEAD_TOO_LONG,
                detail=(
                    f"{format_bytes(snap.ahead_bytes or 0)} resident ahead of the warm-up after "
                    f"the start gate opened: the server caught up with it (start lead "
                    f"{self._gate.lead:g} s is longer than the server's start-up)"
                ),
            )
        self._changed()

    def _open_start_gate(self, by: str) -> None:
        now = time.monotonic()
        was_open = self._gate.is_open
        if by == "timeout":
            self._gate.open(now, "timeout")
        self._gate.ready_opened(now)
        if not was_open:
            self._emit_start()

    def _emit_start(self) -> None:
        self._emit(
            EventKind.START, detail=self._gate.snapshot(time.monotonic(), self._ready).reason
        )
        self._changed()

    # -- readiness and state ------------------------------------------------------------

    def _condition(self) -> bool:
        if not self._models:
            return True
        if not self._first_pass_done:
            return False
        return all(
            m.state != "failed" and m.warm_ratio() >= self.config.ready_ratio for m in self._models
        )

    def _update_ready(self) -> None:
        condition = self._condition()
        if self._forced_ready or (self._ready and self.config.ready_latch):
            return
        if condition and not self._ready:
            self._ready = True
            self._open_start_gate("ready")
            self._emit(EventKind.READY, detail=self._reason(self.snapshot().paths))
        elif not condition and self._ready:
            self._ready = False
            self._emit(EventKind.UNREADY, detail=self._reason(self.snapshot().paths))

    def _state(self) -> str:
        if not self._models:
            return "ready"
        states = [self._model_state(m) for m in self._models]
        for phase in ("planning", "warming", "verifying"):
            if phase in states:
                return phase
        if all(state == "failed" for state in states):
            return "failed"
        if "failed" in states or "degraded" in states:
            return "degraded"
        return "ready"

    @staticmethod
    def _model_state(model: _Model) -> str:
        if model.state == "warming" and model.progress.state == "verifying":
            return "verifying"
        return model.state

    def _reason(self, paths: Sequence[PathSnapshot]) -> str:
        skip = self.config.selection.skip_reason
        if skip is not None:
            return f"nothing to warm: {skip}"
        if not paths:
            return "nothing to warm"
        state = self._state()
        if state == "planning":
            text = "planning: walking " + ", ".join(printable(p.path) for p in paths)
        elif state in ("warming", "verifying"):
            done = sum(min(p.read_bytes, p.bytes) for p in paths)
            total = sum(p.bytes for p in paths)
            text = f"{state}: {format_bytes(done)} of {format_bytes(total)} read"
        else:
            weak = [p for p in paths if p.warm_ratio < self.config.ready_ratio]
            failed = [p for p in paths if p.state == "failed"]
            if failed:
                text = failed[0].failed_reason or f"{failed[0].path}: every file failed to read"
            elif weak:
                text = (
                    f"{weak[0].path}: {weak[0].warm_ratio:.1%} warm, below the ready ratio "
                    f"{self.config.ready_ratio:g}"
                )
            else:
                text = "warm: " + ", ".join(f"{p.path} {p.warm_ratio:.1%}" for p in paths)
            broken = [(p, detail) for p in paths for detail in p.error_details[:1]]
            if broken and not failed:
                count = sum(p.errors for p in paths)
                where, cause = broken[0][1]
                text += f"; {count} files failed (first {where}: {cause})"
            unverified = [p for p in paths if not p.verified]
            if unverified:
                text += (
                    "; residency unverified (read pass finished, the kernel will not tell "
                    "residency to this process)"
                )
        if self._timed_out:
            policy = self.config.timeout_policy
            text += f"; deadline of {self.config.timeout:g} s passed (timeout policy '{policy}')"
        return text

    def _path_snapshot(self, model: _Model) -> PathSnapshot:
        resident, unknown = model.resident()
        warming = model.warm_started is not None and model.warm_seconds is None
        if model.warm_seconds is not None:
            warm_seconds: float | None = model.warm_seconds
        elif model.warm_started is not None:
            warm_seconds = time.monotonic() - model.warm_started
        else:
            warm_seconds = None
        rate = model.progress.bytes_read / warm_seconds if warm_seconds else 0.0
        states = model.file_states()
        return PathSnapshot(
            path=printable(model.root),
            state=self._model_state(model),
            files=len(model.plan.files),
            bytes=model.plan.total_bytes,
            read_bytes=model.progress.bytes_read + model.rewarm_bytes,
            rewarm_bytes=model.rewarm_bytes,
            resident_bytes=resident,
            residency_unknown_reason=unknown,
            warm_bytes=model.warm_bytes(),
            files_by_state=tuple((state, states[state]) for state in FILE_STATES),
            errors_by_reason=tuple((reason, model.errors[reason]) for reason in ERROR_REASONS),
            error_details=tuple((printable(p), c) for p, c in model.error_details),
            skipped=len(model.plan.skipped),
            warm_seconds=warm_seconds,
            rate=rate if warming or model.warm_seconds else 0.0,
            evictions_detected=model.evictions,
            degraded_reason=model.degraded_reason,
            recheck_seconds=model.interval,
            last_check=model.last_check,
            cold_bytes=model.cold_bytes,
            failed_reason=model.failed_reason,
        )

    # -- events -------------------------------------------------------------------------

    def _fail(
        self,
        model: _Model,
        cause: str,
        reason: ErrorReason = "internal",
        where: str | None = None,
    ) -> None:
        model.state = "failed"
        model.failed_reason = cause
        model.errors[reason] += 1
        model.error_details.append((where or model.root, cause))
        self._emit(EventKind.FAILED, model.root, cause, reason)
        self._changed()

    def _engine_event(self, model: _Model, event: EngineEvent) -> None:
        if event.kind == EventKind.FILE_ERROR:
            model.errors[event.reason or "read"] += 1
            model.error_details.append((event.path, event.detail))
        if event.kind != EventKind.STATE:
            self._emit(event.kind, event.path, event.detail, event.reason)
        self._changed()

    def _emit(
        self,
        kind: EventKind,
        path: str = "",
        detail: str = "",
        reason: ErrorReason | None = None,
    ) -> None:
        if self._on_event is not None:
            self._on_event(EngineEvent(kind, path, detail, reason))

    def _changed(self) -> None:
        change, self._change = self._change, anyio.Event()
        change.set()
