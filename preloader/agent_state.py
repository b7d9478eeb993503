"""The serve agent's shared state: the served paths, the agent-wide flags and its events.

:class:`ServedPath` is one served path as the agent knows it (plan, progress, the last
measured residency per file, keep-warm bookkeeping) with the arithmetic over it: warm
bytes, file states. :class:`AgentState` holds everything the agent's parts share (the
paths, the stop and change events, readiness flags, the memory budget, the start gate)
and the helpers they all use: apply a report or a measurement to a path, open the start
gate, fail a path, emit an event, wake the waiters. The parts on top of it:
:mod:`preloader.agent_pass` (plan, trim, the first pass, the start gate's watch),
:mod:`preloader.agent_keepwarm` (the keep-warm loop) and :class:`preloader.agent.Agent`
(lifecycle, readiness, what front ends read). Everything here runs on the agent's event
loop; :meth:`preloader.agent.Agent.snapshot` only reads these attributes.
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

from .budget import MemoryBudget, read_memory_budget
from .engine import (
    ChunkResidency,
    EngineEvent,
    WarmProgress,
    WarmReport,
)
from .events import Emitter, ErrorReason, EventKind
from .planner import Plan, printable
from .settings import DEFAULT_CONCURRENCY, ServeConfig
from .startgate import StartGate, estimate_guard_bytes

__all__ = ["AgentState", "FileView", "ServedPath"]

_ERROR_DETAILS = 20  # per path in /status; the log has every one


@dataclass(frozen=True)
class FileView:
    """One file's last known residency, from a warm pass or a keep-warm measurement."""

    resident_bytes: int | None
    unknown_reason: str | None = None
    error: str | None = None


class ServedPath:
    """One served path; touched only on the event loop."""

    def __init__(self, root: str, interval: float) -> None:
        self.root = root
        self.state = "planning"
        self.plan = Plan((root,), ())
        self.progress = WarmProgress()
        self.warm_started: float | None = None
        self.warm_seconds: float | None = None
        self.read_in_full: list[bool] = []
        self.views: list[FileView] | None = None
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


class AgentState:
    """What the agent's parts share; construction does no I/O.

    :param config: the serve settings (paths, read options, readiness, keep-warm).
    :param on_event: called on the event loop for every event (see
        :class:`~preloader.agent.Agent`).
    """

    def __init__(
        self, config: ServeConfig, on_event: Callable[[EngineEvent], None] | None = None
    ) -> None:
        self.config = config
        self._emit = Emitter(on_event)
        self._options = dataclasses.replace(config.options, timeout=None, verify=True)
        self._chunk_size = config.options.chunk_size_for()
        # Readers for the agent's own measuring and the start gate's guard (-c auto: the
        # default it starts at).
        self._readers = max(1, config.options.concurrency or DEFAULT_CONCURRENCY)
        self._models = [
            ServedPath(root, config.recheck_seconds)
            for root in dict.fromkeys(config.selection.paths)
        ]
        self._stop = threading.Event()
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        self._change = anyio.Event()
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
            estimate_guard_bytes(self._readers, self._chunk_size),
        )
        if self._ready:
            self._gate.ready_opened(self._started)
        elif not self._models:  # no pass to wait for: decided now
            self._gate.pass_over(self._gate_policy())

    def _update_ready(self) -> None:
        """Decide readiness again after a change (:class:`~preloader.agent.Agent` does)."""
        raise NotImplementedError

    async def _read_budget(self) -> None:
        # A few small reads of /proc and /sys, on a worker thread, on the agent's schedule.
        self._budget = await anyio.to_thread.run_sync(read_memory_budget)

    # -- a path's residency -------------------------------------------------------------

    def _apply_report(self, model: ServedPath, report: WarmReport) -> None:
        views = []
        for index, result in enumerate(report.files):
            model.read_in_full[index] = result.error is None and result.read_bytes >= result.size
            views.append(
                FileView(result.residency.resident_bytes, result.residency.reason, result.error)
            )
        model.views = views
        self._settle(model)

    def _apply_measurement(
        self, model: ServedPath, measured: Sequence[ChunkResidency], settle: bool = True
    ) -> None:
        model.views = [FileView(m.resident_bytes, m.reason, m.error) for m in measured]
        model.last_check = time.time()
        if settle:
            self._settle(model)

    def _settle(self, model: ServedPath) -> None:
        states = model.file_states()
        if model.plan.files and states["error"] == len(model.plan.files):
            model.state = "failed"
        elif model.degraded_reason is not None or model.warm_ratio() < self.config.ready_ratio:
            model.state = "degraded"
        else:
            model.state = "ready"

    # -- the start gate -----------------------------------------------------------------

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
        self._changed()

    # -- events -------------------------------------------------------------------------

    def _fail(
        self,
        model: ServedPath,
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

    def _engine_event(self, model: ServedPath, event: EngineEvent) -> None:
        if event.kind == EventKind.FILE_ERROR:
            model.errors[event.reason or "read"] += 1
            model.error_details.append((event.path, event.detail))
        if event.kind != EventKind.STATE:
            self._emit(event.kind, event.path, event.detail, event.reason)
        self._changed()

    def _changed(self) -> None:
        change, self._change = self._change, anyio.Event()
        change.set()
