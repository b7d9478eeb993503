"""What the serve agent shows: immutable snapshots of its state, and their JSON.

Threading contract: :meth:`preloader.agent.agent.Agent.snapshot` builds these from plain
attributes; the HTTP handlers and the metrics collector read them from uvicorn's thread
(see :mod:`preloader.serve.server`). They are frozen and hold no reference to live state.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._version import __version__
from ..engine.reports import resident_share
from ..planning.budget import MemoryBudget
from ..units import format_bytes
from .pins import LockSnapshot
from .startgate import StartGateSnapshot

__all__ = ["FILE_STATES", "STATES", "AgentSnapshot", "PathSnapshot", "trim_reason"]

STATES = ("planning", "warming", "verifying", "ready", "degraded", "failed")
"""What the agent (and each path) is doing; ``/status`` ``state``."""

FILE_STATES = ("pending", "read", "resident", "not_resident", "unknown", "error")
"""Label values of ``preloader_files{state}``: ``pending``/``read`` during the first pass,
then as last measured (``unknown``: the kernel will not tell)."""


@dataclass(frozen=True)
class PathSnapshot:
    """One served path (``MODEL_DIR`` or a ``--path``), as of the snapshot.

    :ivar bytes: the model's planned bytes, before a trim to the memory budget
        (``preloader_target_bytes``): every ratio is over these.
    :ivar read_bytes: bytes read so far, first pass and re-reads together.
    :ivar resident_bytes: resident bytes at the last measurement; ``None`` before the first
        one or when the kernel will not tell for some file (:attr:`residency_unknown_reason`).
    :ivar warm_bytes: the bytes that count for readiness (see the module docstring).
    :ivar warm_seconds: the first pass's duration; while it runs, the time so far.
    :ivar recheck_seconds: the current keep-warm interval (grows while degraded).
    :ivar last_check: wall-clock time of the last keep-warm measurement.
    :ivar cold_bytes: bytes left out of the plan to stay within the memory budget.
    :ivar failed_reason: why the path failed as a whole (an incomplete model).
    """

    path: str
    state: str
    files: int
    bytes: int
    read_bytes: int
    rewarm_bytes: int
    resident_bytes: int | None
    residency_unknown_reason: str | None
    warm_bytes: int
    files_by_state: tuple[tuple[str, int], ...]
    errors_by_reason: tuple[tuple[str, int], ...]
    error_details: tuple[tuple[str, str], ...]
    skipped: int
    warm_seconds: float | None
    rate: float
    evictions_detected: int
    degraded_reason: str | None
    recheck_seconds: float
    last_check: float | None
    cold_bytes: int = 0
    failed_reason: str | None = None
    server_drop_policy: str = "hold"
    server_dropped_files: int = 0
    server_dropped_bytes: int = 0
    server_drop_held_files: int = 0
    server_drop_held_bytes: int = 0

    @property
    def server_drop_detected(self) -> bool:
        return self.server_dropped_files > 0

    @property
    def warm_ratio(self) -> float:
        return self.warm_bytes / self.bytes if self.bytes else 1.0

    @property
    def resident_ratio(self) -> float | None:
        return resident_share(self.resident_bytes, self.bytes)

    @property
    def verified(self) -> bool:
        return self.residency_unknown_reason is None

    @property
    def errors(self) -> int:
        return sum(count for _, count in self.errors_by_reason)

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "state": self.state,
            "files": self.files,
            "bytes": self.bytes,
            "read_bytes": self.read_bytes,
            "rewarm_bytes": self.rewarm_bytes,
            "resident_bytes": self.resident_bytes,
            "resident_ratio": self.resident_ratio,
            "residency_unknown_reason": self.residency_unknown_reason,
            "verified": self.verified,
            "warm_bytes": self.warm_bytes,
            "warm_ratio": round(self.warm_ratio, 6),
            "files_by_state": dict(self.files_by_state),
            "errors": self.errors,
            "errors_by_reason": dict(self.errors_by_reason),
            "error_details": [{"path": p, "cause": c} for p, c in self.error_details],
            "skipped": self.skipped,
            "warm_seconds": None if self.warm_seconds is None else round(self.warm_seconds, 3),
            "rate_bytes_per_second": round(self.rate),
            "evictions_detected": self.evictions_detected,
            "degraded_reason": self.degraded_reason,
            "recheck_seconds": self.recheck_seconds,
            "last_check": self.last_check,
            "cold_bytes": self.cold_bytes,
            "failed_reason": self.failed_reason,
            "server_drop": {
                "detected": self.server_drop_detected,
                "policy": self.server_drop_policy,
                "files": self.server_dropped_files,
                "bytes": self.server_dropped_bytes,
                "held_files": self.server_drop_held_files,
                "held_bytes": self.server_drop_held_bytes,
            },
        }


def trim_reason(path: PathSnapshot, ready_ratio: float) -> str:
    """The words for a path the memory budget trimmed, for the ready reason.

    A trimmed model is judged like any other, over all its bytes: it is ready only when
    the ready ratio is at most the share that fits, which only an explicitly lowered
    ``PRELOADER_READY_RATIO`` allows.
    """
    text = (
        f"{path.path} trimmed to the memory budget: {format_bytes(path.bytes - path.cold_bytes)} "
        f"of {format_bytes(path.bytes)} warmed, {format_bytes(path.cold_bytes)} stay cold"
    )
    if path.warm_ratio < ready_ratio:
        text += " (raise the memory limit, or lower PRELOADER_READY_RATIO to accept it)"
    return text


@dataclass(frozen=True)
class AgentSnapshot:
    """The whole agent, as ``/readyz``, ``/status`` and ``/metrics`` show it.

    :ivar ready: what ``/readyz`` answers.
    :ivar reason: one line saying why it is (not) ready.
    :ivar timed_out: the deadline passed before the model was warm.
    :ivar skip_reason: set when there is nothing to serve (``MODEL_DIR`` unset or missing).
    :ivar missing_paths: roots that do not exist and keep ``/readyz`` closed (empty with
        ``--allow-missing``).
    :ivar memory_budget: this process's memory budget as last read by the agent (at start
        and after each keep-warm round), or ``None`` before the first reading.
    :ivar start_gate: what ``/startz`` answers, and whether its lead was right.
    :ivar proactive_reclaim: what on this machine drops idle page cache with no memory
        pressure (a DAMON ``pageout`` scheme), ``None`` when nothing this process can see.
    :ivar lock: what ``--lock`` holds pinned, and why not when it may not; ``None``
        without ``--lock``.
    """

    state: str
    ready: bool
    reason: str
    timed_out: bool
    ready_ratio: float
    paths: tuple[PathSnapshot, ...]
    uptime_seconds: float
    rate: float
    eta_seconds: float | None
    skip_reason: str | None = None
    memory_budget: MemoryBudget | None = None
    start_gate: StartGateSnapshot | None = None
    proactive_reclaim: str | None = None
    missing_paths: tuple[str, ...] = ()
    lock: LockSnapshot | None = None
    version: str = __version__

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.paths)

    @property
    def read_bytes(self) -> int:
        return sum(p.read_bytes for p in self.paths)

    @property
    def warm_bytes(self) -> int:
        return sum(p.warm_bytes for p in self.paths)

    @property
    def resident_bytes(self) -> int | None:
        if any(p.resident_bytes is None for p in self.paths):
            return None
        return sum(p.resident_bytes or 0 for p in self.paths)

    @property
    def verified(self) -> bool:
        return all(p.verified for p in self.paths)

    @property
    def bytes_done(self) -> int:
        """Bytes read while the first pass runs, then the bytes that count as warm."""
        if self.state in ("planning", "warming", "verifying"):
            return sum(min(p.read_bytes, p.bytes) for p in self.paths)
        return self.warm_bytes

    def readyz_json(self) -> dict[str, object]:
        return {
            "ready": self.ready,
            "state": self.state,
            "reason": self.reason,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes,
            "verified": self.verified,
            "timed_out": self.timed_out,
        }

    def to_json(self) -> dict[str, object]:
        resident = self.resident_bytes
        return {
            "version": self.version,
            "state": self.state,
            "ready": self.ready,
            "reason": self.reason,
            "timed_out": self.timed_out,
            "verified": self.verified,
            "skip_reason": self.skip_reason,
            "missing_paths": list(self.missing_paths),
            "ready_ratio": self.ready_ratio,
            "uptime_seconds": round(self.uptime_seconds, 3),
            "files": sum(p.files for p in self.paths),
            "bytes": self.bytes,
            "bytes_done": self.bytes_done,
            "read_bytes": self.read_bytes,
            "resident_bytes": resident,
            "resident_ratio": resident_share(resident, self.bytes),
            "warm_bytes": self.warm_bytes,
            "rate_bytes_per_second": round(self.rate),
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
            "errors": sum(p.errors for p in self.paths),
            "memory_budget": None if self.memory_budget is None else self.memory_budget.to_json(),
            "start_gate": None if self.start_gate is None else self.start_gate.to_json(),
            "proactive_reclaim": self.proactive_reclaim,
            "lock": None if self.lock is None else self.lock.to_json(),
            "paths": [p.to_json() for p in self.paths],
        }
