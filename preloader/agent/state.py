"""What the serve agent's parts are handed: the served paths and the agent's voice.

:class:`ServedPath` is one served path as the agent knows it (plan, progress, the last
measured residency per file, keep-warm bookkeeping) with the arithmetic over it: warm
bytes, file states, and settling its state after a report or a measurement.
:class:`AgentEvents` is how every part speaks: emit an event, fail a path, wake whoever
waits for a change. The :class:`~preloader.agent.agent.Agent` makes one of each and passes
them to its collaborators (:class:`~preloader.agent.firstpass.FirstPass`,
:class:`~preloader.agent.keepwarm.KeepWarm`). Everything here runs on the agent's event
loop; :meth:`~preloader.agent.agent.Agent.snapshot` only reads these attributes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
import anyio.to_thread

from ..engine.events import Emitter, EngineEvent, ErrorReason, EventKind
from ..engine.keepwarm import ChunkResidency
from ..engine.reports import WarmProgress, WarmReport
from ..planning.planner import Plan
from ..settings import ServeConfig, WarmOptions
from ..units import printable
from .serverdrop import ServerDrops

__all__ = ["AgentEvents", "FileView", "PassContext", "ServedPath"]

_ERROR_DETAILS = 20  # per path in /status; the log has every one


@dataclass(frozen=True)
class FileView:
    """One file's last known residency, from a warm pass or a keep-warm measurement."""

    resident_bytes: int | None
    unknown_reason: str | None = None
    error: str | None = None


class ServedPath:
    """One served path; touched only on the event loop."""

    def __init__(self, root: str, interval: float, ready_ratio: float) -> None:
        self.root = root
        self.ready_ratio = ready_ratio
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
        self.drops = ServerDrops()

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
        """Warm share of the path's whole model: bytes a trim left cold count as cold."""
        total = self.plan.total_bytes + self.cold_bytes
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

    def apply_report(self, report: WarmReport) -> None:
        """Take a warm pass's per-file outcome as the path's residency, and settle."""
        views = []
        for index, result in enumerate(report.files):
            self.read_in_full[index] = result.error is None and result.read_bytes >= result.size
            views.append(
                FileView(result.residency.resident_bytes, result.residency.reason, result.error)
            )
        self.views = views
        self.settle()

    def apply_measurement(self, measured: Sequence[ChunkResidency], settle: bool = True) -> None:
        """Take a keep-warm measurement as the path's residency; settle unless told not to."""
        self.views = [FileView(m.resident_bytes, m.reason, m.error) for m in measured]
        self.last_check = time.time()
        if settle:
            self.settle()

    def settle(self) -> None:
        """``failed`` when every file failed, ``degraded`` below the ready ratio (or while
        keep-warm says so), else ``ready``."""
        states = self.file_states()
        if self.plan.files and states["error"] == len(self.plan.files):
            self.state = "failed"
        elif self.degraded_reason is not None or self.warm_ratio() < self.ready_ratio:
            self.state = "degraded"
        else:
            self.state = "ready"


class AgentEvents:
    """How the agent's parts report: events to the callback, a change to the waiters.

    :param on_event: called on the event loop for every event (see
        :class:`~preloader.agent.agent.Agent`).
    """

    def __init__(self, on_event: Callable[[EngineEvent], None] | None = None) -> None:
        self.emit = Emitter(on_event)
        self.change = anyio.Event()
        """Set (and replaced by a fresh one) at every change a snapshot would show."""

    def changed(self) -> None:
        """Wake everyone waiting on :attr:`change`."""
        change, self.change = self.change, anyio.Event()
        change.set()

    def fail(
        self,
        model: ServedPath,
        cause: str,
        reason: ErrorReason = "internal",
        where: str | None = None,
    ) -> None:
        """Mark a whole path failed, say why, and count it under ``reason``."""
        model.state = "failed"
        model.failed_reason = cause
        model.errors[reason] += 1
        model.error_details.append((where or model.root, cause))
        self.emit(EventKind.FAILED, model.root, cause, reason)
        self.changed()

    def engine_event(self, model: ServedPath, event: EngineEvent) -> None:
        """Count a per-file error of ``model``'s pass and pass the event on."""
        if event.kind == EventKind.FILE_ERROR:
            model.errors[event.reason or "read"] += 1
            model.error_details.append((event.path, event.detail))
        if event.kind != EventKind.STATE:
            self.emit(event.kind, event.path, event.detail, event.reason)
        self.changed()


@dataclass(frozen=True)
class PassContext:
    """What the agent hands each of its parts: the same objects, never copies.

    :ivar config: the serve settings.
    :ivar models: the served paths, in order.
    :ivar events: where events and changes go.
    :ivar options: how the agent's passes read (no overall timeout, always verified).
    :ivar readers: threads for the agent's own measuring.
    :ivar chunk_size: the plain chunk size (keep-warm's cut, the start gate's slack).
    :ivar stop: set to end reading early (from any thread).
    :ivar stopping: set on the event loop when the agent stops.
    """

    config: ServeConfig
    models: Sequence[ServedPath]
    events: AgentEvents
    options: WarmOptions
    readers: int
    chunk_size: int
    stop: threading.Event
    stopping: anyio.Event
