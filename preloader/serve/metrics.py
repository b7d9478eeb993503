"""Prometheus metrics: a custom collector over the agent's in-memory snapshot.

Nothing is registered at import time: :func:`make_registry` builds a fresh
:class:`~prometheus_client.CollectorRegistry` holding one :class:`AgentCollector`.
``collect()`` runs during a scrape in the HTTP server's thread (uvicorn runs on an event
loop of its own, see :mod:`preloader.serve.server`), not on the agent's loop; it only calls
the snapshot function and does no I/O. Residency is refreshed by the agent on its own
schedule, never by a scrape.

Series that cannot be known truthfully are left out rather than guessed:
``preloader_resident_bytes`` is absent for a path whose residency the kernel will not
reveal (``preloader_residency_known`` says so).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..agent.snapshot import STATES, AgentSnapshot
from ..agent.startgate import VERDICTS

__all__ = ["METRIC_NAMES", "AgentCollector", "make_registry"]

Family = GaugeMetricFamily | CounterMetricFamily

# (name, type, help, labels); counters are named without "_total", which the exposition adds.
_METRICS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("preloader_build_info", "gauge", "Version of the preloader; always 1.", ("version", "python")),
    ("preloader_ready", "gauge", "1 when /readyz answers 200.", ()),
    ("preloader_state", "gauge", "1 for the agent's current state.", ("state",)),
    ("preloader_start_gate_open", "gauge", "1 when /startz answers 200.", ()),
    (
        "preloader_start_lead_seconds",
        "gauge",
        "The start lead: /startz opens when the first pass's estimated time left is this.",
        (),
    ),
    (
        "preloader_start_gate_open_seconds",
        "gauge",
        "Seconds from the agent's start until /startz opened; absent while it is closed.",
        (),
    ),
    (
        "preloader_start_estimate_seconds",
        "gauge",
        "The first pass's estimated time left (bytes left over the windowed read rate); "
        "absent without an estimate.",
        (),
    ),
    (
        "preloader_start_to_ready_seconds",
        "gauge",
        "Seconds from /startz opening until /readyz opened (the time so far while /readyz "
        "is closed): the overlap won; absent while /startz is closed.",
        (),
    ),
    (
        "preloader_start_ahead_bytes",
        "gauge",
        "Most planned bytes seen resident ahead of the warm-up after /startz opened early; "
        "absent when not measured.",
        (),
    ),
    (
        "preloader_start_lead_verdict",
        "gauge",
        "1 for whether the start lead was right: caught_up (too long), behind (right or too "
        "short), together (no lead used), pending, unknown, unready (the first pass is over "
        "and /readyz did not open: nothing to judge).",
        ("verdict",),
    ),
    (
        "preloader_timed_out",
        "gauge",
        "1 when PRELOADER_TIMEOUT passed before the paths were warm.",
        (),
    ),
    (
        "preloader_missing_paths",
        "gauge",
        "Roots (MODEL_DIR, PRELOADER_PATHS) that do not exist and keep /readyz closed "
        "(0 with --allow-missing).",
        (),
    ),
    (
        "preloader_proactive_reclaim",
        "gauge",
        "1 when this machine pages out idle page cache with no memory pressure (a DAMON "
        "pageout scheme, read at start-up; 0 also when the process may not read it).",
        (),
    ),
    (
        "preloader_pinned_bytes",
        "gauge",
        "Bytes serve --lock holds pinned (mmap + mlock); 0 without --lock.",
        (),
    ),
    (
        "preloader_lock_error",
        "gauge",
        "1 when --lock may not pin (no CAP_IPC_LOCK, RLIMIT_MEMLOCK too small) or a lock "
        "failed: the model is served unpinned (/status lock.error says why).",
        (),
    ),
    (
        "preloader_memory_available_bytes",
        "gauge",
        "Room for page cache: the least of the memory cgroup's free bytes and MemAvailable.",
        (),
    ),
    (
        "preloader_target_bytes",
        "gauge",
        "Bytes of the model as planned, before a trim to the memory budget.",
        ("path",),
    ),
    (
        "preloader_resident_bytes",
        "gauge",
        "Planned bytes in the page cache at the last measurement; absent when unknown.",
        ("path",),
    ),
    (
        "preloader_residency_known",
        "gauge",
        "1 when residency is measured truthfully for every file of the path.",
        ("path",),
    ),
    (
        "preloader_warm_bytes",
        "gauge",
        "Bytes that count for readiness: resident, or read in full where residency is unknown.",
        ("path",),
    ),
    ("preloader_read_bytes", "counter", "Bytes read, first pass and re-reads.", ("path",)),
    (
        "preloader_rewarm_bytes",
        "counter",
        "Bytes re-read by keep-warm after pages were lost.",
        ("path",),
    ),
    ("preloader_files", "gauge", "Planned files by state.", ("path", "state")),
    ("preloader_errors", "counter", "Per-file errors by reason.", ("path", "reason")),
    (
        "preloader_warm_duration_seconds",
        "gauge",
        "Duration of the first warm pass (the time so far while it runs).",
        ("path",),
    ),
    (
        "preloader_evictions_detected",
        "counter",
        "Chunks found with pages lost at a keep-warm check.",
        ("path",),
    ),
    (
        "preloader_server_drop_detected",
        "gauge",
        "1 once a reader (the server) was seen dropping whole files of the path from the "
        "page cache with no memory pressure (--on-server-drop).",
        ("path",),
    ),
    (
        "preloader_server_dropped_files",
        "counter",
        "Files found dropped whole by a reader, not by reclaim, at keep-warm checks.",
        ("path",),
    ),
    (
        "preloader_server_drop_held_bytes",
        "gauge",
        "Bytes of dropped files keep-warm leaves alone until they are resident again "
        "(--on-server-drop hold).",
        ("path",),
    ),
    (
        "preloader_degraded",
        "gauge",
        "1 while pages keep being lost after re-reading (keep-warm backs off).",
        ("path",),
    ),
    (
        "preloader_recheck_interval_seconds",
        "gauge",
        "Current keep-warm interval; grows while degraded.",
        ("path",),
    ),
    (
        "preloader_last_check_timestamp_seconds",
        "gauge",
        "Unix time of the last keep-warm measurement.",
        ("path",),
    ),
)

METRIC_NAMES = tuple(
    name + ("_total" if kind == "counter" else "") for name, kind, _, _ in _METRICS
)
"""Every series name the collector can expose."""


def _families() -> dict[str, Family]:
    families: dict[str, Family] = {}
    for name, kind, documentation, labels in _METRICS:
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        families[name] = cls(name, documentation, labels=list(labels))
    return families


class AgentCollector(Collector):
    """Yield the preloader's metric families from a snapshot function.

    :param snapshot: returns the agent's current :class:`AgentSnapshot`; called once a
        scrape, from the HTTP server's thread, so it must not do I/O and must be safe to
        call while the agent's loop runs (:meth:`~preloader.agent.agent.Agent.snapshot` is).
    """

    def __init__(self, snapshot: Callable[[], AgentSnapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterator[Family]:
        """The families without samples: registering does not call :meth:`collect`."""
        yield from _families().values()

    def collect(self) -> Iterator[Family]:
        snap = self._snapshot()
        f = _families()
        f["preloader_build_info"].add_metric([snap.version, platform.python_version()], 1)
        f["preloader_ready"].add_metric([], 1 if snap.ready else 0)
        for state in STATES:
            f["preloader_state"].add_metric([state], 1 if snap.state == state else 0)
        f["preloader_timed_out"].add_metric([], 1 if snap.timed_out else 0)
        f["preloader_missing_paths"].add_metric([], len(snap.missing_paths))
        gate = snap.start_gate
        if gate is not None:
            f["preloader_start_gate_open"].add_metric([], 1 if gate.open else 0)
            f["preloader_start_lead_seconds"].add_metric([], gate.lead_seconds)
            if gate.open_seconds is not None:
                f["preloader_start_gate_open_seconds"].add_metric([], gate.open_seconds)
            if gate.estimate_seconds is not None:
                f["preloader_start_estimate_seconds"].add_metric([], gate.estimate_seconds)
            if gate.start_to_ready_seconds is not None:
                f["preloader_start_to_ready_seconds"].add_metric([], gate.start_to_ready_seconds)
            if gate.ahead_bytes is not None:
                f["preloader_start_ahead_bytes"].add_metric([], gate.ahead_bytes)
            for verdict in VERDICTS:
                f["preloader_start_lead_verdict"].add_metric(
                    [verdict], 1 if gate.verdict == verdict else 0
                )
        f["preloader_proactive_reclaim"].add_metric([], 1 if snap.proactive_reclaim else 0)
        lock = snap.lock
        f["preloader_pinned_bytes"].add_metric([], lock.pinned_bytes if lock else 0)
        f["preloader_lock_error"].add_metric([], 1 if lock and lock.error else 0)
        available = snap.memory_budget.available_bytes if snap.memory_budget else None
        if available is not None:
            f["preloader_memory_available_bytes"].add_metric([], available)
        for p in snap.paths:
            label = [p.path]
            f["preloader_target_bytes"].add_metric(label, p.bytes)
            if p.resident_bytes is not None:
                f["preloader_resident_bytes"].add_metric(label, p.resident_bytes)
            f["preloader_residency_known"].add_metric(label, 1 if p.verified else 0)
            f["preloader_warm_bytes"].add_metric(label, p.warm_bytes)
            f["preloader_read_bytes"].add_metric(label, p.read_bytes)
            f["preloader_rewarm_bytes"].add_metric(label, p.rewarm_bytes)
            for state, count in p.files_by_state:
                f["preloader_files"].add_metric([p.path, state], count)
            for reason, count in p.errors_by_reason:
                f["preloader_errors"].add_metric([p.path, reason], count)
            if p.warm_seconds is not None:
                f["preloader_warm_duration_seconds"].add_metric(label, p.warm_seconds)
            f["preloader_evictions_detected"].add_metric(label, p.evictions_detected)
            f["preloader_degraded"].add_metric(label, 1 if p.degraded_reason else 0)
            f["preloader_server_drop_detected"].add_metric(
                label, 1 if p.server_drop_detected else 0
            )
            f["preloader_server_dropped_files"].add_metric(label, p.server_dropped_files)
            f["preloader_server_drop_held_bytes"].add_metric(label, p.server_drop_held_bytes)
            f["preloader_recheck_interval_seconds"].add_metric(label, p.recheck_seconds)
            if p.last_check is not None:
                f["preloader_last_check_timestamp_seconds"].add_metric(label, p.last_check)
        yield from f.values()


def make_registry(snapshot: Callable[[], AgentSnapshot]) -> CollectorRegistry:
    """A new registry with only the preloader's collector (no process or GC metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(snapshot))
    return registry
