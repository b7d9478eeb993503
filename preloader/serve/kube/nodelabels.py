"""Warm nodes the scheduler can see: node labels and Events from ``preloader serve``.

Opt-in (``--node-label``), for the node warm-up DaemonSet. While ``serve`` runs, one
label per served path says on the Node object that the path is warm on this node::

    preloader.dev/<name>=warm

``<name>`` is the model name given with ``--model-name PATH=NAME``, else the path's last
component, made to fit a label name (see :func:`label_name`). The label is set when the
path turns ``ready``; it is removed when the path has been ``degraded`` for
``grace_seconds``, at once when it ``failed``, and when the agent stops (SIGTERM):
:meth:`NodeLabeler.withdraw`, bounded in time by the caller. A SIGKILL leaves the labels
behind; the next start reconciles: every label of this scheme (prefix ``preloader.dev/``,
value ``warm``) that is not warm now is removed from the node before anything else.
A request the stop interrupts (the PATCH in flight when SIGTERM comes) leaves the node's
labels unknown: the stop reads the node again and removes every label of the scheme,
and the keys that PATCH was setting, so one SIGTERM never leaves a label behind.

Every ``resync_seconds`` the node is read again and its labels put right: a label someone
else removed (or set) comes back (or goes) as the agent's state says, counted in
``preloader_node_label_repairs_total``. After a failed request the labeler waits out its
back-off before the next one, whatever the agent does meanwhile.

Each transition of a path into ``ready``, ``degraded`` or ``failed`` is also posted as a
core/v1 Event about the Node (namespace ``default``, as the kubelet posts node events),
with the figures: bytes, resident share, seconds.

The Kubernetes API is never in the way of warming or of ``/readyz``: the labeler runs as
a task of its own beside the agent, reads only :meth:`~preloader.agent.agent.Agent.snapshot`,
and an API server that is down or refuses (403) is logged, counted
(``preloader_kube_api_errors_total``) and retried with back-off.

The client is lightkube (the ``k8s`` extra: ``pip install 'preloader[k8s]'``), imported
only by :func:`connect`, so ``warm`` and the zipapp never load it.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ...errors import UsageError
from ...labels import LABEL_PREFIX, LABEL_VALUE, NodeLabelConfig
from ...logs import get_logger
from ...units import format_bytes, printable
from .api import KubeError, NodeApi, NodeEvent

if TYPE_CHECKING:
    from ...agent.agent import Agent
    from ...agent.snapshot import AgentSnapshot, PathSnapshot

__all__ = [
    "EVENT_NAMESPACE",
    "OPERATIONS",
    "STOP_SECONDS",
    "NodeLabeler",
    "connect",
]

EVENT_NAMESPACE = "default"
"""Where Events about a Node go: the API server accepts a cluster-scoped object's Events
only in ``default`` (the kubelet's choice too)."""
STOP_SECONDS = 5.0
"""The longest a stop waits for the labels to be removed (the DaemonSet's
``terminationGracePeriodSeconds`` is 10)."""
MIN_BACKOFF_SECONDS = 1.0
"""The wait after the first failed try; it doubles with each failure after it."""
MAX_BACKOFF_SECONDS = 60.0
"""The longest wait between two tries while the API server fails."""
REQUEST_SECONDS = 5.0
"""Timeout of one API request."""
OPERATIONS = ("get", "patch", "event")
"""Label values of ``preloader_kube_api_errors_total{operation}``."""

_MAX_QUEUED_EVENTS = 32


def connect(config: NodeLabelConfig) -> NodeApi:
    """A lightkube client for ``config``, configured but not yet connected.

    Reads the in-cluster service account (token, CA, ``KUBERNETES_SERVICE_HOST``), or the
    kubeconfig file when one is given. Call at start-up: problems are usage errors.

    :raises UsageError: lightkube is not installed, or there is no configuration.
    """
    try:
        from .client import LightkubeNodeApi, load_config
    except ImportError as err:
        raise UsageError(
            f"--node-label needs the Kubernetes client ({err.name} is not installed): "
            "pip install 'preloader[k8s]'"
        ) from None
    try:
        kube_config = load_config(config.kubeconfig, config.service_account)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"--node-label: {err}") from None
    return LightkubeNodeApi(kube_config, config.node_name, EVENT_NAMESPACE, REQUEST_SECONDS)


@dataclass
class _PathWatch:
    """What the labeler last saw of one path."""

    key: str
    state: str = "planning"
    degraded_since: float | None = None


class NodeLabeler:
    """Keep the node's ``preloader.dev/`` labels true to the agent's paths; post Events.

    :param config: node name, label keys, grace.
    :param api: the API calls (:func:`connect`).
    """

    def __init__(self, config: NodeLabelConfig, api: NodeApi) -> None:
        self.config = config
        self._api = api
        self._paths = {path: _PathWatch(key) for path, key in config.keys}
        # Labels of our scheme on the node as last read or written; None: not known.
        self._on_node: set[str] | None = None
        self._node_uid: str | None = None
        # Keys a PATCH that was interrupted was setting: they may be on the node.
        self._maybe_set: set[str] = set()
        self._events: deque[NodeEvent] = deque(maxlen=_MAX_QUEUED_EVENTS)
        self._errors: Counter[str] = Counter(dict.fromkeys(OPERATIONS, 0))
        self._repairs = 0
        self._backoff = 0.0
        self._next_resync = time.monotonic() + config.resync_seconds
        self._log = get_logger()

    # -- what front ends read ---------------------------------------------------------

    def labels(self) -> dict[str, bool]:
        """``{path: whether its label is on the node}``, as last read or written."""
        on_node = self._on_node or set()
        return {path: watch.key in on_node for path, watch in self._paths.items()}

    def api_errors(self) -> dict[str, int]:
        """Failed API requests so far, by operation (:data:`OPERATIONS`)."""
        return dict(self._errors)

    def repairs(self) -> int:
        """Times a periodic read found the node's labels changed by someone else."""
        return self._repairs

    def collector(self) -> Collector:
        """Prometheus families: ``preloader_node_label{path,label}``, the error and repair
        counters."""
        return _LabelCollector(self)

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, agent: Agent) -> None:
        """Follow ``agent`` until cancelled; failures of the API are retried, never raised."""
        while True:
            snap = agent.snapshot()
            resync = time.monotonic() >= self._next_resync
            if resync:
                self._next_resync = time.monotonic() + self.config.resync_seconds
            try:
                self._observe(snap.paths)
                await self._reconcile(resync)
            except Exception as err:  # a bug here must not take the agent down
                self._backoff = MAX_BACKOFF_SECONDS
                self._log.error("node labeler failed", error=f"{type(err).__name__}: {err}")
            if self._backoff:
                # A failing API server is not asked again before the back-off is over, however
                # often the agent's state moves meanwhile; the next try sees the latest state.
                await anyio.sleep(self._backoff)
                continue
            seen = self._states(snap)

            def moved(now: AgentSnapshot, seen: tuple[str, ...] = seen) -> bool:
                return self._states(now) != seen

            with anyio.move_on_after(self._next_wake()):
                await agent.wait_until(moved)

    async def withdraw(self) -> bool:
        """Remove every label of this scheme from the node; whether that worked.

        For the stop: one try (a read of the node first when its labels are not known),
        logged either way; bound it with a timeout.
        """
        try:
            if self._maybe_set:
                self._log.warning(
                    "a node label request was interrupted by the stop; reading the node again",
                    node=self.config.node_name,
                    labels=sorted(self._maybe_set),
                )
            if self._on_node is None:
                await self._read_node()
            # A merge patch that removes a key the node does not have changes nothing.
            stale = sorted((self._on_node or set()) | self._maybe_set)
            if stale:
                labels = await self._patch(dict.fromkeys(stale))
                self._on_node = _ours(labels)
                self._maybe_set.clear()
                self._log.info("node labels removed", node=self.config.node_name, labels=stale)
        except KubeError as err:
            self._failed(err, "could not remove the node labels before exit")
            return False
        return True

    # -- inside ---------------------------------------------------------------------------

    def _states(self, snap: AgentSnapshot) -> tuple[str, ...]:
        return tuple(p.state for p in snap.paths)

    def _observe(self, paths: Sequence[PathSnapshot]) -> None:
        now = time.monotonic()
        for path in paths:
            watch = self._paths.get(path.path)
            if watch is None or path.state == watch.state:
                continue
            watch.state = path.state
            watch.degraded_since = now if path.state == "degraded" else None
            event = _event_for(path, watch.key)
            if event is not None:
                if len(self._events) == self._events.maxlen:
                    self._log.warning("event dropped: too many queued", reason=event.reason)
                self._events.append(event)

    def _wanted(self) -> set[str]:
        now = time.monotonic()
        wanted = set()
        for watch in self._paths.values():
            if watch.state == "ready" or (
                watch.state == "degraded"
                and watch.degraded_since is not None
                and now - watch.degraded_since < self.config.grace_seconds
                and watch.key in (self._on_node or ())
            ):
                wanted.add(watch.key)
        return wanted

    def _next_wake(self) -> float:
        now = time.monotonic()
        ends = [self._next_resync - now]
        ends += [
            watch.degraded_since + self.config.grace_seconds - now
            for watch in self._paths.values()
            if watch.degraded_since is not None
            and watch.key in (self._on_node or ())
            and now - watch.degraded_since < self.config.grace_seconds
        ]
        return max(0.0, min(ends))

    async def _reconcile(self, resync: bool = False) -> None:
        try:
            known = self._on_node
            if resync or self._on_node is None:
                await self._read_node()
            on_node = self._on_node or set()
            wanted = self._wanted()
            changes: dict[str, str | None] = dict.fromkeys(sorted(on_node - wanted))
            changes.update(dict.fromkeys(sorted(wanted - on_node), LABEL_VALUE))
            if resync and known is not None and known != on_node:
                self._repairs += 1
                self._log.warning(
                    "node labels changed by someone else; putting them right",
                    node=self.config.node_name,
                    expected=sorted(known),
                    found=sorted(on_node),
                )
            if changes:
                labels = await self._patch(changes)
                self._on_node = _ours(labels)
                for key, value in changes.items():
                    self._log.info(
                        "node label set" if value else "node label removed",
                        node=self.config.node_name,
                        label=key,
                    )
            while self._events:
                await self._post(self._events[0])
                self._events.popleft()
        except KubeError as err:
            self._backoff = min(MAX_BACKOFF_SECONDS, max(MIN_BACKOFF_SECONDS, self._backoff * 2))
            self._failed(err, f"Kubernetes API failed; next try in {self._backoff:g} s")
        else:
            self._backoff = 0.0

    async def _read_node(self) -> None:
        try:
            uid, labels = await self._api.get_node()
        except KubeError:
            raise
        except Exception as err:  # whatever the client raises beyond its API errors
            raise KubeError("get", _describe(err)) from err
        self._node_uid = uid
        self._on_node = _ours(labels)

    async def _patch(self, changes: Mapping[str, str | None]) -> dict[str, str]:
        try:
            return await self._api.patch_labels(changes)
        except KubeError:
            self._on_node = None  # read the node again before the next patch
            raise
        except Exception as err:
            self._on_node = None
            raise KubeError("patch", _describe(err)) from err
        except BaseException:
            # Cancelled (the stop) while the request was in flight: the API server may have
            # applied it. The node's labels are unknown until read again, and the keys
            # this patch was setting may be there (see withdraw).
            self._on_node = None
            self._maybe_set.update(k for k, v in changes.items() if v is not None)
            raise

    async def _post(self, event: NodeEvent) -> None:
        try:
            await self._api.post_event(event, self._node_uid or self.config.node_name)
        except KubeError:
            raise
        except Exception as err:
            raise KubeError("event", _describe(err)) from err

    def _failed(self, err: KubeError, what: str) -> None:
        self._errors[err.operation] += 1
        self._log.warning(what, node=self.config.node_name, operation=err.operation, cause=str(err))


def _ours(labels: Mapping[str, str]) -> set[str]:
    return {k for k, v in labels.items() if k.startswith(LABEL_PREFIX) and v == LABEL_VALUE}


def _describe(err: BaseException) -> str:
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _event_for(path: PathSnapshot, key: str) -> NodeEvent | None:
    where = printable(path.path)
    seconds = "" if path.warm_seconds is None else f", first pass {path.warm_seconds:.1f} s"
    ratio = path.resident_ratio
    if ratio is not None:
        resident = f"{ratio:.1%} resident"
    else:
        resident = f"{path.warm_ratio:.1%} read (residency unverified)"
    figures = f"{format_bytes(path.bytes)} ({path.bytes} bytes), {resident}{seconds}"
    if path.state == "ready":
        return NodeEvent("ModelWarm", f"{where} warm: {figures}; label {key}={LABEL_VALUE}")
    if path.state == "degraded":
        why = path.degraded_reason or "below the ready ratio"
        return NodeEvent("ModelDegraded", f"{where} degraded: {figures}; {why}", "Warning")
    if path.state == "failed":
        detail = f"; {path.error_details[-1][1]}" if path.error_details else ""
        return NodeEvent(
            "ModelFailed", f"{where} failed: {figures}, {path.errors} errors{detail}", "Warning"
        )
    return None


class _LabelCollector(Collector):
    def __init__(self, labeler: NodeLabeler) -> None:
        self._labeler = labeler

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield from self._families()

    def _families(self) -> tuple[GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily]:
        return (
            GaugeMetricFamily(
                "preloader_node_label",
                "1 while the path's preloader.dev/ label is on the node (as last written).",
                labels=["path", "label"],
            ),
            CounterMetricFamily(
                "preloader_kube_api_errors",
                "Failed Kubernetes API requests of the node labeler, by operation.",
                labels=["operation"],
            ),
            CounterMetricFamily(
                "preloader_node_label_repairs",
                "Periodic reads of the node that found its preloader.dev/ labels changed by "
                "someone else (and put them right).",
            ),
        )

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gauge, counter, repairs = self._families()
        labels = self._labeler.labels()
        for path, key in self._labeler.config.keys:
            gauge.add_metric([path, key], 1 if labels.get(path) else 0)
        for operation, count in sorted(self._labeler.api_errors().items()):
            counter.add_metric([operation], count)
        repairs.add_metric([], self._labeler.repairs())
        yield gauge
        yield counter
        yield repairs
