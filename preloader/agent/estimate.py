"""The first pass's estimated time left, per mount, for the start gate (:mod:`.startgate`).

Paths are warmed one after the other, and paths on different storage read at different
rates (a local disk at 2 GiB/s, then a FUSE mount at 24 MiB/s): one rate for the whole
pass would promise the slow mount the fast one's speed. So each mount (the device of a
path's files) has its own samples, and the time left is the sum over the mounts with
bytes left of their bytes left over their own read rate (:class:`MountRates`).

A mount's rate is the bytes it read over its last :data:`WINDOW_SECONDS` (since its first
path started while it is younger), sampled every tick: a sliding-window mean
(:func:`estimate_seconds_left`). There is no rate before the mount has been read for
:data:`MIN_SECONDS` and brought in :func:`estimate_guard_bytes`, nor while no byte arrived
in the window (a stall). A mount with bytes left and no rate leaves the pass without an
estimate that may open the gate, unless the operator set a floor (``--start-min-rate``):
the rate no read of the node's storage falls below, so its bytes left over the floor are
an upper bound on its time left. During a stall the estimate shown is the mount's bytes
left over its mean rate since it started: it grows while no byte arrives, and it never
opens the gate.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

__all__ = [
    "MIN_SECONDS",
    "WINDOW_SECONDS",
    "Estimate",
    "MountProgress",
    "MountRates",
    "RateSample",
    "estimate_guard_bytes",
    "estimate_seconds_left",
]

WINDOW_SECONDS = 20.0
"""The read rate is the mean over this many seconds of the first pass."""

MIN_SECONDS = 0.25
"""No estimate before a mount has been read this long. Short on purpose: a gate that
opens too early starts the server beside the warm-up, which is what a postStart hook does
anyway, while one that waits for a long guard adds the guard to a short warm-up (local
disk: 2 GiB in 0.5-1 s) and to the server's start after it."""


@dataclass(frozen=True)
class RateSample:
    """The first pass's progress at one moment: monotonic seconds, bytes read."""

    seconds: float
    bytes_done: int


def estimate_seconds_left(
    samples: Sequence[RateSample],
    bytes_left: int,
    *,
    window: float = WINDOW_SECONDS,
    min_seconds: float = MIN_SECONDS,
    min_bytes: int = 0,
) -> float | None:
    """Seconds the first pass has left: ``bytes_left`` over the windowed read rate.

    :param samples: progress samples in time order; the first is the pass's start.
    :param bytes_left: planned bytes not read yet.
    :param window: the rate is measured from the newest sample back to the newest sample
        at least this many seconds older (to the first sample while the pass is younger).
    :param min_seconds: no estimate until the samples span this long.
    :param min_bytes: nor until this many bytes arrived over them.
    :return: the estimate, 0 when nothing is left, or ``None`` when there is too little
        data (the samples span less than ``min_seconds`` or ``min_bytes``) or no byte
        arrived in the window.
    """
    if len(samples) < 2:
        return None
    newest = samples[-1]
    if newest.seconds - samples[0].seconds < min_seconds:
        return None
    if bytes_left > 0 and newest.bytes_done - samples[0].bytes_done < min_bytes:
        return None
    oldest = _window_start(samples, window)
    span = newest.seconds - oldest.seconds
    if span <= 0:
        return None
    if bytes_left <= 0:
        return 0.0
    rate = (newest.bytes_done - oldest.bytes_done) / span
    if rate <= 0:
        return None
    return bytes_left / rate


def estimate_guard_bytes(concurrency: int, chunk_size: int) -> int:
    """Bytes a mount must have brought in before its rate is trusted: one chunk per
    worker and one more, of the chunks the pass cuts (``-c auto`` cuts a plan under 4 GiB
    finer: 2 GiB in 32 MiB chunks, a guard of 160 MiB instead of 320 MiB, which through
    the parallel-stream fixture or s3fs arrive about 0.6 s sooner).

    Each stream's first bytes come in a burst on storage that fetches ahead (s3fs loads
    50 MB with parallel GETs at the first read of a file): with the 0.25 s guard alone,
    the s3fs end-to-end runs opened ``/startz`` at lead 8 s 8.1-12.3 s before the warm-up's
    end (8.0-9.6 s with this guard, then counted per chunk). On a local disk this many
    bytes take less than the time guard.
    """
    return (max(1, concurrency) + 1) * chunk_size


@dataclass(frozen=True)
class MountProgress:
    """One mount's share of the first pass now.

    :ivar key: the mount (the device number of its paths' files).
    :ivar bytes_done: bytes its paths brought in so far.
    :ivar bytes_total: bytes its paths plan to read.
    :ivar started: whether one of its paths has started reading (samples start then).
    """

    key: Hashable
    bytes_done: int
    bytes_total: int
    started: bool


@dataclass(frozen=True)
class Estimate:
    """The pass's time left and whether it may open the gate.

    :ivar seconds: the time left shown (``None`` without one).
    :ivar trusted: every mount with bytes left has a measured rate past the guards, or
        none yet and a floor; false during a stall (the seconds shown then grow).
    :ivar floor: the floor stood in for a mount with no rate yet.
    """

    seconds: float | None
    trusted: bool
    floor: bool = False


class MountRates:
    """Samples per mount, and the pass's time left as the sum of the mounts'.

    :param min_bytes: the guard (:func:`estimate_guard_bytes`), at most a quarter of a
        mount's bytes: a number, or a function of the mount's planned bytes.
    :param floor: bytes per second no read of this node's storage falls below
        (``--start-min-rate``), or ``None``.
    """

    def __init__(
        self, min_bytes: int | Callable[[int], int] = 0, floor: float | None = None
    ) -> None:
        self._guard = min_bytes if callable(min_bytes) else lambda total: min_bytes
        self._floor = floor if floor else None
        self._samples: dict[Hashable, deque[RateSample]] = {}
        self._first: dict[Hashable, RateSample] = {}
        self._last: dict[Hashable, tuple[float, float]] = {}  # the last measured estimate

    @property
    def sampled(self) -> bool:
        """Whether any mount has been sampled."""
        return bool(self._samples)

    def observe(self, now: float, mounts: Sequence[MountProgress]) -> Estimate:
        """Sample every started mount; :return: the pass's time left now."""
        total = 0.0
        trusted, floor = True, False
        for mount in mounts:
            samples = self._samples.get(mount.key)
            if mount.started:
                if samples is None:
                    samples = self._samples[mount.key] = deque()
                sample = RateSample(now, mount.bytes_done)
                self._first.setdefault(mount.key, sample)
                samples.append(sample)
                # One sample older than the window, so the window always has its span.
                while len(samples) > 2 and now - samples[1].seconds > WINDOW_SECONDS:
                    samples.popleft()
            left = mount.bytes_total - mount.bytes_done
            if left <= 0:
                continue
            seconds = None
            first = self._first.get(mount.key)
            guard = min(self._guard(mount.bytes_total), mount.bytes_total // 4)
            # The guards count from the mount's first sample, not the oldest one kept.
            if samples and first is not None and samples[-1].bytes_done - first.bytes_done >= guard:
                seconds = estimate_seconds_left(samples, left, min_seconds=0.0)
                if samples[-1].seconds - first.seconds < MIN_SECONDS:
                    seconds = None
            if seconds is not None:
                self._last[mount.key] = (now, seconds)
            elif samples and first is not None and _stalled(first, samples):
                trusted = False
                seconds = self._stall_estimate(mount.key, first, samples[-1], left)
            elif seconds is None and self._floor is not None:
                seconds, floor = left / self._floor, True
            if seconds is None:
                return Estimate(None, False)
            total += seconds
        return Estimate(total, trusted, floor)

    def _stall_estimate(
        self, key: Hashable, first: RateSample, newest: RateSample, left: int
    ) -> float | None:
        """What a stalled mount shows: the larger of its last measured estimate plus the
        time since, and its bytes left over its mean rate since it started; both grow
        while no byte arrives."""
        candidates = []
        if key in self._last:
            at, seconds = self._last[key]
            candidates.append(seconds + newest.seconds - at)
        span, moved = newest.seconds - first.seconds, newest.bytes_done - first.bytes_done
        if span > 0 and moved > 0:
            candidates.append(left * span / moved)
        return max(candidates) if candidates else None


def _stalled(first: RateSample, samples: Sequence[RateSample]) -> bool:
    """No byte arrived over the last window, after bytes did (or for a whole window): a
    mount that has not brought its first byte yet is still starting (the floor may stand
    in for it), not stalled."""
    newest = samples[-1]
    if newest.seconds - first.seconds < MIN_SECONDS:
        return False
    if newest.bytes_done == first.bytes_done and newest.seconds - first.seconds < WINDOW_SECONDS:
        return False
    return newest.bytes_done == _window_start(samples, WINDOW_SECONDS).bytes_done


def _window_start(samples: Sequence[RateSample], window: float) -> RateSample:
    """The newest sample at least *window* seconds older than the newest (the first one
    when none is that old): where a sliding window over *samples* begins."""
    newest = samples[-1]
    oldest = samples[0]
    for sample in samples:
        if newest.seconds - sample.seconds < window:
            break
        oldest = sample
    return oldest
