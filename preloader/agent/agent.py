"""The serve agent: plan, warm, decide readiness, keep the pages warm.

A small state machine that lives on the event loop, on top of the engine: it plans each
path, warms the paths one after the other, decides when the gate opens (``/readyz``),
then re-checks residency chunk by chunk every ``recheck_seconds`` and re-reads only the
chunks that lost pages. While the first pass runs it also decides the start gate
(``/startz``, :mod:`.startgate`), which opens ``start_lead`` seconds before the pass's
estimated end and at the latest with ``/readyz``. Threading contract: everything
runs on the agent's event loop except :meth:`Agent.snapshot`, which the front ends (the
HTTP handlers, the metrics collector) call from uvicorn's thread; it does no I/O, only
reads plain attributes and builds a fresh immutable :class:`AgentSnapshot`. The agent
never prints; it reports through an :class:`~preloader.engine.events.EngineEvent` callback.

One :class:`Agent`, composed of parts with one job each, which own their state and are
handed what they share: :mod:`.state` (the served paths and :class:`~.state.AgentEvents`,
the agent's voice), :class:`~.firstpass.FirstPass` (plan, trim to the budget, the first
pass and the start gate's watch), :class:`~.keepwarm.KeepWarm` (the keep-warm loop),
:class:`~.pins.PinKeeper` (``--lock``: pin what was warmed, release at the stop). The
agent itself keeps the lifecycle, readiness, the start gate's latch and the memory budget,
and builds the snapshot front ends read.

Readiness, per path: the first warm pass is over and the *warm share* is at least
``ready_ratio``. The warm share counts resident bytes as measured; a file whose residency
the kernel will not reveal (see :mod:`preloader.kernel.pagecache`) counts as warm once it
was read in full, and the path is then flagged unverified.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

import anyio
import anyio.to_thread

from ..engine.events import ERROR_REASONS, EngineEvent, EventKind
from ..kernel import reclaim
from ..planning.budget import MemoryBudget, read_memory_budget
from ..settings import AUTO_START_CONCURRENCY, ServeConfig
from ..units import format_bytes, printable
from .estimate import estimate_guard_bytes
from .firstpass import FirstPass
from .keepwarm import KeepWarm
from .pins import PinKeeper
from .snapshot import FILE_STATES, AgentSnapshot, PathSnapshot, trim_reason
from .startgate import StartGate
from .state import AgentEvents, PassContext, ServedPath

__all__ = [
    "Agent",
]


class Agent:
    """Warm the configured paths, decide readiness, keep them warm.

    Construction does no I/O. :meth:`run` does the work until :meth:`stop`; tests may
    drive the phases themselves with :meth:`start_up` and :meth:`recheck`.

    :param config: the serve settings (paths, read options, readiness, keep-warm).
    :param on_event: called on the event loop for engine events (per-file errors, ...) and
        the agent's own: ``planned``, ``skipped``, ``warmed``, ``start``, ``ready``,
        ``unready``, ``timeout``, ``start_lead_too_long``, ``first pass over`` (both
        gates decided), ``rewarmed``, ``replanned``, ``degraded``, ``recovered``,
        ``failed``, and with ``--lock`` ``pinned``, ``cannot lock``, ``released pinned
        pages``. ``path`` is the file for engine events and the served path for the
        agent's.
    """

    def __init__(
        self, config: ServeConfig, on_event: Callable[[EngineEvent], None] | None = None
    ) -> None:
        self.config = config
        self._events = AgentEvents(on_event)
        self._emit = self._events.emit
        options = dataclasses.replace(config.options, timeout=None, verify=True)
        chunk_size = config.options.chunk_size_for()
        # Readers for the agent's own measuring and the start gate's guard (-c auto: where
        # it starts).
        readers = max(1, config.options.concurrency or AUTO_START_CONCURRENCY)
        self._models = [
            ServedPath(root, config.recheck_seconds, config.ready_ratio)
            for root in dict.fromkeys(config.selection.paths)
        ]
        self._stop = threading.Event()
        # Held while the first pass's end is decided and while a snapshot is taken, so the
        # HTTP thread never sees one gate decided and the state not yet (or the reverse).
        self._deciding = threading.RLock()
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        self._started = time.monotonic()
        # The first pass finished (it read every path) / ended (finished or stopped).
        self._first_pass_done = not self._models
        self._pass_ended = not self._models
        # Roots that do not exist keep /readyz closed, unless asked to skip them.
        self._missing = () if config.allow_missing else config.selection.missing
        self._ready = not self._models and not self._missing
        self._forced_ready = False
        self._timed_out = False
        self._budget: MemoryBudget | None = None
        self._proactive_reclaim: str | None = None  # read at start-up (reclaim.note)
        self._gate = StartGate(
            config.start_lead,
            self._started,
            # The guard is in the chunks a pass cuts (-c auto: finer for small plans), not
            # the plain size keep-warm uses; sized by the mount's planned bytes, so a mount
            # that several paths share gets the coarser chunks and so the larger guard.
            lambda total: estimate_guard_bytes(readers, options.chunk_size_for(total)),
            policy=self._gate_policy(),
            floor=config.start_min_rate,
        )
        if self._ready:
            self._gate.ready_opened(self._started)
        elif not self._models:  # no pass to wait for: decided now
            self._gate.pass_over(self._gate_policy())
        elif self._missing:  # /readyz cannot open: no estimate may open /startz
            self._gate.block(self._reason(()))
        context = PassContext(
            config,
            self._models,
            self._events,
            options,
            readers,
            chunk_size,
            self._stop,
            self._stopping,
        )
        self._pins = PinKeeper(context)
        self._first_pass = FirstPass(
            context,
            self._gate,
            is_ready=lambda: self._ready,
            on_start=self._emit_start,
            known_unready=self._known_unready,
            planned_again=self._pins.sync,
            on_file_read=self._pins.pin_read if self.config.lock else None,
        )
        self._keep_warm = KeepWarm(
            context,
            checked=self._update_ready,
            round_done=self._round_done,
            replan_if_changed=self._first_pass.replan_if_changed,
        )

    # -- what front ends read ---------------------------------------------------------

    @property
    def stopped(self) -> anyio.Event:
        """Set once :meth:`run` has returned."""
        return self._stopped

    @property
    def generation(self) -> int:
        """A number that grows at every change a snapshot would show (not the progress of
        bytes read, which moves between changes). Read from any thread."""
        return self._events.generation

    def snapshot(self) -> AgentSnapshot:
        """The agent's state now, from memory only.

        Called from the HTTP server's thread while the agent's loop runs: it reads plain
        attributes into a new frozen object, never mutates, never awaits; the end of the
        first pass is decided under the same lock, so a snapshot sees all of it or none.
        """
        with self._deciding:
            return self._take_snapshot()

    def _take_snapshot(self) -> AgentSnapshot:
        paths = tuple(self._path_snapshot(model) for model in self._models)
        rate = sum(p.rate for p, m in zip(paths, self._models, strict=True) if not m.warmed)
        remaining = sum(max(0, p.bytes - p.cold_bytes - p.read_bytes) for p in paths)
        if not self._first_pass_done and self._models:
            eta = remaining / rate if rate > 0 else None
        else:
            eta = 0.0
        reason = self._reason(paths)
        return AgentSnapshot(
            state=self._state(),
            ready=self._ready,
            reason=reason,
            timed_out=self._timed_out,
            ready_ratio=self.config.ready_ratio,
            paths=paths,
            uptime_seconds=time.monotonic() - self._started,
            rate=rate,
            eta_seconds=eta,
            skip_reason=self.config.selection.skip_reason,
            missing_paths=tuple(printable(p) for p in self._missing),
            memory_budget=self._budget,
            start_gate=self._gate.snapshot(time.monotonic(), self._ready, reason),
            proactive_reclaim=self._proactive_reclaim,
            lock=self._pins.snapshot(),
        )

    async def wait_until(self, predicate: Callable[[AgentSnapshot], bool]) -> AgentSnapshot:
        """Return the first snapshot for which ``predicate`` holds (re-checked on changes).

        Wrap it in :func:`anyio.fail_after` to bound the wait.
        """
        while True:
            change = self._events.change
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
                await self._pins.sync()  # after the gates: readiness never waits for a pin
                if self.config.recheck_seconds > 0 and self._models:
                    await self._keep_warm.run()
                else:
                    await self._stopping.wait()
                group.cancel_scope.cancel()
        finally:
            await self._pins.release()
            self._stopped.set()

    async def start_up(self) -> None:
        """Plan every path, then warm them one after the other and decide readiness."""
        if not self._models:
            if not self._missing:
                self._emit(EventKind.READY, detail=self._reason(()))
            self._emit_pass_over()
            self._events.changed()
            return
        # Small reads of /sys, on a worker thread as the memory budget's are.
        self._proactive_reclaim = await anyio.to_thread.run_sync(reclaim.note)
        if self._proactive_reclaim is not None:
            self._emit(EventKind.PROACTIVE_RECLAIM, detail=self._proactive_reclaim)
        await self._first_pass.plan_all()
        await self._read_budget()
        self._first_pass.trim_to_budget(self._budget)
        await self._pins.prepare(self._budget)
        async with anyio.create_task_group() as group:
            group.start_soon(self._first_pass.watch_start_gate)
            for model in self._models:
                if self._stop.is_set():
                    break
                await self._first_pass.warm(model)
                # Reads ahead of the warm-up that ended since the last check would go
                # unseen once the next path (or the pass's end) reads over them.
                await self._first_pass.check_ahead_now()
            group.cancel_scope.cancel()
        with self._deciding:
            self._first_pass_done = not self._stop.is_set()
            self._gate.pass_over(self._gate_policy() if self._first_pass_done else None)
            self._pass_ended = True
            self._update_ready()
        if self._first_pass_done:  # after the decision: the line says what the gates say
            self._emit_pass_over()
        self._events.changed()

    async def recheck(self) -> None:
        """One keep-warm round over every path now, due or not."""
        for model in self._models:
            if self._stop.is_set():
                return
            if model.warmed:
                await self._keep_warm.check(model)
        await self._read_budget()
        self._update_ready()
        self._events.changed()

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
        self._events.changed()

    async def _round_done(self) -> None:
        await self._read_budget()
        await self._pins.sync()  # a path planned again: its new files, now warm

    async def _read_budget(self) -> None:
        # A few small reads of /proc and /sys, on a worker thread, on the agent's schedule.
        self._budget = await anyio.to_thread.run_sync(read_memory_budget)

    # -- readiness and state ------------------------------------------------------------

    def _gate_policy(self) -> str:
        """What decides the start gate once the first pass is over and it is still shut."""
        timeout, policy = self.config.timeout, self.config.timeout_policy
        if timeout is None:
            return "no PRELOADER_TIMEOUT is set: it opens only with /readyz"
        if policy == "ready":
            return f"PRELOADER_TIMEOUT {timeout:g} s (policy 'ready') opens it at the deadline"
        return f"PRELOADER_TIMEOUT {timeout:g} s has policy 'unready': it opens only with /readyz"

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
        self._events.changed()

    def _known_unready(self) -> str | None:
        """Why ``/readyz`` cannot open when the first pass ends, known already (a missing
        root, a path failed as a whole: an incomplete model, a planning failure, every
        file failed), or ``None``."""
        failed = [m for m in self._models if m.state == "failed"]
        if not self._missing and not failed:
            return None
        if failed and not self._missing:
            model = failed[0]
            return model.failed_reason or f"{printable(model.root)}: every file failed to read"
        return self._reason(())

    def _emit_pass_over(self) -> None:
        """Say that the first pass is over and how both gates were decided (logged once,
        after the decision: what a reader of ``/readyz`` and ``/startz`` now sees)."""
        snap = self.snapshot()
        gate = self._gate.snapshot(time.monotonic(), snap.ready, snap.reason)
        self._emit(
            EventKind.FIRST_PASS_OVER,
            detail=f"/readyz: {snap.reason}; /startz: {gate.reason}",
            fields=(
                ("ready", snap.ready),
                ("startz", gate.open),
                ("opened_by", gate.opened_by),
                ("verdict", gate.verdict),
            ),
        )

    def _condition(self) -> bool:
        if self._missing:
            return False
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
            return "failed" if self._missing else "ready"
        states = [self._model_state(m) for m in self._models]
        for phase in ("planning", "warming", "verifying"):
            if phase in states:
                return phase
        if not self._pass_ended:
            # Every path is read and verified; the pass's end is not decided yet.
            return "verifying"
        if all(state == "failed" for state in states):
            return "failed"
        if "failed" in states or "degraded" in states or self._missing:
            return "degraded"
        return "ready"

    @staticmethod
    def _model_state(model: ServedPath) -> str:
        if model.state == "warming" and model.progress.state == "verifying":
            return "verifying"
        return model.state

    def _reason(self, paths: Sequence[PathSnapshot]) -> str:
        text = self._ready_reason(paths)
        if self._missing:
            missing = ", ".join(printable(p) for p in self._missing)
            gone = (
                f"{missing}: does not exist (MODEL_DIR / PRELOADER_PATHS); not ready while "
                "a root is missing (PRELOADER_ALLOW_MISSING=1 serves without it)"
            )
            return gone if not paths else f"{gone}; {text}"
        return text

    def _ready_reason(self, paths: Sequence[PathSnapshot]) -> str:
        skip = self.config.selection.skip_reason
        if skip is not None:
            return f"nothing to warm: {skip}"
        if not paths:
            return "nothing to warm"
        state = self._state()
        if state == "planning":
            text = "planning: walking " + ", ".join(printable(p.path) for p in paths)
        elif state in ("warming", "verifying"):
            done = sum(min(p.read_bytes, p.bytes - p.cold_bytes) for p in paths)
            total = sum(p.bytes - p.cold_bytes for p in paths)
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
            trimmed = [p for p in paths if p.cold_bytes]
            if trimmed:
                text += "; " + trim_reason(trimmed[0], self.config.ready_ratio)
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

    def _path_snapshot(self, model: ServedPath) -> PathSnapshot:
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
            bytes=model.plan.total_bytes + model.cold_bytes,  # the model, before a trim
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
            server_drop_policy=self.config.on_server_drop,
            server_dropped_files=model.drops.files,
            server_dropped_bytes=model.drops.bytes,
            server_drop_held_files=len(model.drops.held),
            server_drop_held_bytes=model.drops.held_bytes(),
        )
