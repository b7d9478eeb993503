"""The start gate (``/startz``): when the server container may start, and whether the lead
was right.

``/readyz`` means the model is resident. A server spends tens of seconds on its own
start-up (imports, CUDA and NCCL init) before it reads the first weight, so holding it
back until the last byte is warm adds that start-up to the warm-up. The start gate opens
``lead`` seconds before the first pass's estimated end instead, so the two overlap; it
also opens whenever ``/readyz`` does (at lead 0 only then), and once open it stays open.

The estimate is the first pass's time left, summed over the mounts it reads from, each
mount's bytes left over that mount's own read rate (:mod:`.estimate`), sampled every
:data:`TICK_SECONDS`. Bytes count as they arrive, every read step of a chunk (8 MiB; see
:attr:`.WarmProgress.bytes_arrived`), not when the chunk completes: a pass of a few 64 MiB
chunks per stream would otherwise show nothing for a second and then a jump. There is no
estimate that opens the gate while a mount with bytes left has no rate past the guards
(:data:`~.estimate.MIN_SECONDS` and :func:`~.estimate.estimate_guard_bytes`) and no floor
rate stands in for it, nor while a mount stalls (a stall is no reason to start the
server). While ``/readyz`` is known not to open (:meth:`StartGate.block`), nothing but
``/readyz`` or the deadline opens it.

Whether the lead was right (:func:`lead_verdict`): a server that starts early reads the
shards in the order the warm-up reads them, behind it, from memory. If its start-up was
shorter than the lead it catches up and reads pages the warm-up has not read yet, from
storage: the lead was too long. That shows as planned bytes resident beyond what the
warm-up has read, measured every :data:`AHEAD_CHECK_SECONDS` between the start gate and
the end of the first pass (:func:`ahead_bytes`). If nothing got ahead, the server stayed
behind (the lead was right or too short: then ``start_to_ready_seconds`` is the overlap
won, to be compared with the server's own start-up time).

This module holds the arithmetic and the latch; the agent feeds it from the event loop and
front ends read :meth:`StartGate.snapshot`, which does no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..units import format_bytes
from .estimate import MIN_SECONDS, MountProgress, MountRates

__all__ = [
    "AHEAD_CHECK_SECONDS",
    "EARLY",
    "OPENED_BY",
    "TICK_SECONDS",
    "VERDICTS",
    "StartGate",
    "StartGateSnapshot",
    "ahead_bytes",
    "lead_verdict",
]

TICK_SECONDS = 0.1
"""How often the agent samples the first pass's progress and decides the gate."""

AHEAD_CHECK_SECONDS = 2.0
"""How often residency is measured between the start gate and the first pass's end."""

OPENED_BY = ("estimate", "floor", "ready", "timeout")
"""What opened the start gate: the estimate fell to the lead (``floor``: with the
operator's floor rate standing in for a mount not measured yet, so possibly before the
first measured estimate), ``/readyz`` opened, or the ``PRELOADER_TIMEOUT`` deadline passed
under the ``ready`` policy."""

EARLY = ("estimate", "floor")
"""The openings before ``/readyz``: the server may start beside the warm-up."""

VERDICTS = ("pending", "together", "behind", "caught_up", "unknown", "unready")
"""Label values of ``preloader_start_lead_verdict``; see :func:`lead_verdict`."""


def ahead_bytes(resident_bytes: int, read_bytes: int, baseline: int) -> int:
    """Planned bytes resident beyond what the warm-up has read, since the start gate.

    ``resident - read`` is what someone else made resident (or what was resident before,
    or what the warm-up's reads in flight hold but have not counted yet); ``baseline`` is
    that difference when the start gate opened, so pages resident before the server could
    start do not count.
    """
    return resident_bytes - read_bytes - baseline


def lead_verdict(
    opened_by: str | None,
    ready_open: bool,
    caught_up: bool,
    measurable: bool,
    pass_over: bool = False,
) -> str:
    """Whether the lead was right, one of :data:`VERDICTS`.

    - ``pending``: the first pass runs, and the start gate is closed, or it opened early
      and ``/readyz`` is still closed with nothing ahead seen yet;
    - ``unready``: the same once the first pass is over (``pass_over``): ``/readyz`` did
      not open with it, so there is no overlap to judge (``/startz`` names the cause);
    - ``together``: the gates opened at once (lead 0, a pass shorter than the guard, or
      the timeout): there was no overlap to judge;
    - ``caught_up``: reads got ahead of the warm-up after the start gate opened: the lead
      was too long (or the storage slowed down after the estimate);
    - ``behind``: ``/readyz`` opened and nothing got ahead: the lead was right or too short;
    - ``unknown``: the start gate opened early but residency cannot be measured here.
    """
    waiting = "unready" if pass_over else "pending"
    if opened_by is None:
        return waiting
    if opened_by not in EARLY:
        return "together"
    if caught_up:
        return "caught_up"
    if not measurable:
        return "unknown"
    return "behind" if ready_open else waiting


@dataclass(frozen=True)
class StartGateSnapshot:
    """The start gate as ``/startz``, ``/status`` and ``/metrics`` show it.

    :ivar open: what ``/startz`` answers (200 when true).
    :ivar lead_seconds: the configured lead.
    :ivar opened_by: one of :data:`OPENED_BY`, ``None`` while closed.
    :ivar open_seconds: seconds from the agent's start to the gate's opening.
    :ivar estimate_seconds: the first pass's estimated time left at the last sample
        (``None`` without an estimate); at the opening, see ``estimate_at_open_seconds``.
    :ivar start_to_ready_seconds: from the start gate's opening to ``/readyz``'s (the time
        so far while ``/readyz`` is still closed); ``None`` while the start gate is closed.
    :ivar ahead_bytes: the most bytes seen resident ahead of the warm-up (see
        :func:`ahead_bytes`), ``None`` before the first measurement or when unmeasurable.
    :ivar ahead_slack_bytes: what the warm-up's own reads in flight can explain; more
        than this ahead means the server caught up.
    """

    open: bool
    lead_seconds: float
    opened_by: str | None
    open_seconds: float | None
    estimate_seconds: float | None
    estimate_at_open_seconds: float | None
    start_to_ready_seconds: float | None
    ahead_bytes: int | None
    ahead_slack_bytes: int
    verdict: str
    reason: str

    def startz_json(self) -> dict[str, object]:
        """``/startz``'s body."""
        return {
            "open": self.open,
            "reason": self.reason,
            "opened_by": self.opened_by,
            "lead_seconds": self.lead_seconds,
            "estimate_seconds": _round(self.estimate_seconds),
        }

    def to_json(self) -> dict[str, object]:
        """``/status``'s ``start_gate``: what ``/startz`` says, and how the lead fared."""
        return {
            **self.startz_json(),
            "open_seconds": _round(self.open_seconds),
            "estimate_at_open_seconds": _round(self.estimate_at_open_seconds),
            "start_to_ready_seconds": _round(self.start_to_ready_seconds),
            "ahead_bytes": self.ahead_bytes,
            "ahead_slack_bytes": self.ahead_slack_bytes,
            "verdict": self.verdict,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class StartGate:
    """The latch behind ``/startz``; touched only on the agent's event loop.

    :param lead: seconds before the first pass's estimated end to open (0: with
        ``/readyz`` only).
    :param started: the agent's start (monotonic seconds).
    :param min_bytes: no estimate for a mount before the first pass has read this much
        of it (at most a quarter of it): a number, or a function of the mount's planned
        bytes; see :func:`estimate_guard_bytes`.
    :param floor: bytes per second the node's storage never reads below
        (``--start-min-rate``): it stands in for a mount with no measured rate yet, see
        :class:`~.estimate.MountRates`.
    :param policy: what decides the gate when ``/readyz`` cannot open (the
        ``PRELOADER_TIMEOUT`` policy), named in the reason of a gate :meth:`block` keeps
        shut.
    """

    def __init__(
        self,
        lead: float,
        started: float,
        min_bytes: int | Callable[[int], int] = 0,
        policy: str | None = None,
        floor: float | None = None,
    ) -> None:
        self.lead = lead
        self._decides = policy or "it opens only with /readyz"
        self._started = started
        self._rates = MountRates(min_bytes, floor)
        self._floor = floor
        self._estimate: float | None = None
        self._opened_by: str | None = None
        self._opened_at: float | None = None
        self._estimate_at_open: float | None = None
        self._ready_at: float | None = None
        self._baseline: int | None = None
        self._ahead: int | None = None
        self._slack = 0
        self._measurable = True
        self._caught_up = False
        self._policy: str | None = None  # set when the first pass is over
        self._blocked: str | None = None  # why /readyz cannot open, known before the end

    @property
    def is_open(self) -> bool:
        return self._opened_by is not None

    @property
    def opened_by(self) -> str | None:
        return self._opened_by

    @property
    def watching_ahead(self) -> bool:
        """Whether the start gate opened early and nothing has been seen ahead yet."""
        return self._opened_by in EARLY and not self._caught_up and self._measurable

    def observe(self, now: float, bytes_done: int, bytes_total: int) -> bool:
        """:meth:`observe_mounts` for a pass on one mount, started."""
        return self.observe_mounts(now, [MountProgress("", bytes_done, bytes_total, True)])

    def observe_mounts(self, now: float, mounts: Sequence[MountProgress]) -> bool:
        """Sample the first pass, per mount; open the gate when the estimate is at most
        the lead.

        :return: whether this call opened the gate.
        """
        estimate = self._rates.observe(now, mounts)
        self._estimate = estimate.seconds
        if self._blocked is not None or not estimate.trusted or estimate.seconds is None:
            return False
        if self.lead > 0 and not self.is_open and estimate.seconds <= self.lead:
            self._estimate_at_open = estimate.seconds
            return self.open(now, "floor" if estimate.floor else "estimate")
        return False

    def block(self, cause: str) -> None:
        """``/readyz`` is known not to open when the pass ends (a path failed, an
        incomplete model, a missing root): no estimate opens the gate from now on, and
        the reason names ``cause``. ``/readyz`` and the deadline still open it.
        """
        self._blocked = cause

    def open(self, now: float, by: str) -> bool:
        """Open the gate (it stays open); :return: whether it was closed."""
        if self.is_open:
            return False
        self._opened_by = by
        self._opened_at = now
        return True

    def ready_opened(self, now: float) -> None:
        """``/readyz`` opened (the first time): the start gate opens too if still closed."""
        self.open(now, "ready")
        if self._ready_at is None:
            self._ready_at = now

    def pass_over(self, policy: str | None = None) -> None:
        """The first pass ended: nothing more to estimate or to see ahead of it.

        :param policy: what will decide the gate from now on if it is still closed (the
            ``PRELOADER_TIMEOUT`` policy), named in the reason; ``None`` when the pass was
            stopped rather than finished.
        """
        self._estimate = 0.0 if self._rates.sampled else None
        self._policy = policy

    def measured(self, resident_bytes: int | None, read_bytes: int, slack: int) -> bool:
        """A residency measurement since the gate opened early.

        :param resident_bytes: planned bytes resident now; ``None`` when unmeasurable.
        :param read_bytes: bytes the first pass has read now.
        :param slack: bytes the warm-up's reads in flight may hold uncounted.
        :return: whether this measurement found the server caught up (the first time).
        """
        if resident_bytes is None:
            self._measurable = False
            return False
        self._slack = slack
        if self._baseline is None:
            self._baseline = resident_bytes - read_bytes
            self._ahead = 0
            return False
        ahead = ahead_bytes(resident_bytes, read_bytes, self._baseline)
        self._ahead = max(self._ahead or 0, ahead)
        if ahead > slack and not self._caught_up:
            self._caught_up = True
            return True
        return False

    def snapshot(self, now: float, ready: bool, cause: str | None = None) -> StartGateSnapshot:
        """The gate now, from memory only.

        :param cause: why ``/readyz`` is closed (its reason), named once the first pass is
            over and the gate still shut.
        """
        open_seconds = None if self._opened_at is None else self._opened_at - self._started
        if self._opened_at is None:
            start_to_ready = None
        elif self._ready_at is not None:
            start_to_ready = max(0.0, self._ready_at - self._opened_at)
        else:
            start_to_ready = now - self._opened_at
        verdict = lead_verdict(
            self._opened_by,
            self._ready_at is not None,
            self._caught_up,
            self._measurable,
            pass_over=self._policy is not None,
        )
        return StartGateSnapshot(
            open=self.is_open,
            lead_seconds=self.lead,
            opened_by=self._opened_by,
            open_seconds=open_seconds,
            estimate_seconds=self._estimate,
            estimate_at_open_seconds=self._estimate_at_open,
            start_to_ready_seconds=start_to_ready,
            ahead_bytes=self._ahead if self._measurable else None,
            ahead_slack_bytes=self._slack,
            verdict=verdict,
            reason=self._reason(ready, cause),
        )

    def _reason(self, ready: bool, cause: str | None) -> str:
        if self._opened_by == "estimate":
            return (
                f"open: the first pass's estimated time left was "
                f"{self._estimate_at_open or 0.0:.1f} s, within the lead of {self.lead:g} s"
            )
        if self._opened_by == "floor":
            return (
                f"open: the first pass's estimated time left was "
                f"{self._estimate_at_open or 0.0:.1f} s at most (mounts not measured yet at "
                f"the floor rate of {format_bytes(int(self._floor or 0))}/s, "
                "PRELOADER_START_MIN_RATE), "
                f"within the lead of {self.lead:g} s"
            )
        if self._opened_by == "ready":
            return "open: /readyz opened"
        if self._opened_by == "timeout":
            return "open: the deadline passed (timeout policy 'ready')"
        if self._policy is not None:
            # The pass is over: no estimate will open it, only /readyz or the deadline.
            why = cause or "/readyz is closed"
            return f"closed: the first pass is over and /readyz is closed ({why}); {self._policy}"
        if self._blocked is not None:
            return f"closed: /readyz cannot open ({self._blocked}); {self._decides}"
        if self.lead <= 0:
            return "closed: opens with /readyz (start lead 0)"
        if self._estimate is None:
            return (
                f"closed: no estimate of the time left yet (needs {MIN_SECONDS:g} s of "
                "reading with bytes arriving); opens with /readyz at the latest"
            )
        return (
            f"closed: estimated {self._estimate:.1f} s left, more than the lead of {self.lead:g} s"
        )
