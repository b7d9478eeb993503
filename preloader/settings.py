"""Settings: what the front ends resolve from flags and environment and pass down.

Frozen dataclasses, their defaults stated once, and the parsing of the values that need
it. A shared leaf: it imports only the other leaves (:mod:`.errors`, :mod:`.units`,
:mod:`.labels`), so every layer, from the kernel readers to the front ends, can depend
on it.

Every command-line option has a ``PRELOADER_*`` environment twin (declared once, in
:mod:`preloader.cli.options`); a flag on the command line wins over its environment
variable. ``MODEL_DIR`` and ``PRELOADER_CONC`` keep the names of the reference postStart
one-liner. Nothing below the CLI reads ``os.environ``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from .errors import UsageError
from .units import PAGE_SIZE, format_bytes, parse_size

if TYPE_CHECKING:  # only serve builds one, so warm does not load it
    from .labels import NodeLabelConfig

__all__ = [
    "AUTO_CONCURRENCY",
    "AUTO_START_CONCURRENCY",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_HEADROOM",
    "ON_OVERFLOW_POLICIES",
    "READ_METHODS",
    "SERVER_DROP_POLICIES",
    "TIMEOUT_POLICIES",
    "Headroom",
    "OnOverflow",
    "ReadMethod",
    "Selection",
    "ServeConfig",
    "ServerDropPolicy",
    "TimeoutPolicy",
    "WaitConfig",
    "WarmConfig",
    "WarmOptions",
    "parse_concurrency",
    "parse_headroom",
    "parse_start_lead",
    "resolve_selection",
]

AUTO_CONCURRENCY = 0
"""``concurrency`` value that asks the engine to find the knee itself."""

AUTO_START_CONCURRENCY = 4
"""Where ``-c auto`` starts (the reference one-liner's ``-P 4``), so it never reads
slower than four readers; it doubles from there while throughput grows."""

DEFAULT_CONCURRENCY = AUTO_CONCURRENCY
"""Parallel chunk reads when ``-c`` is not given: ``auto``. A fixed four left a storage
that caps each stream (ossfs 2.0, Mountpoint, the parallel-stream FUSE fixture) at four
streams' pace: 8 x 1 GiB through the fixture, 4 readers 32.4 s, auto 21.2 s (it settled
at 8)."""

DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024
"""Bytes per chunk when ``--chunk-size`` is not given."""

AUTO_MIN_CHUNKS = 64
"""With ``-c auto`` a pass is cut into at least this many chunks (down to
:data:`AUTO_MIN_CHUNK` each), so the tuner sees enough of them complete to measure a rate
before the plan runs out."""

AUTO_MIN_CHUNK = 16 * 1024 * 1024

ReadMethod = Literal["auto", "sendfile", "mmap", "read"]
"""``--method``: ``auto`` starts with ``sendfile`` and falls back to ``read`` where a
filesystem refuses it; the others are :func:`preloader.kernel.fileread.read_range`'s
methods, one of which every read uses."""
READ_METHODS: tuple[ReadMethod, ...] = get_args(ReadMethod)

OnOverflow = Literal["warn", "trim", "fail"]
ON_OVERFLOW_POLICIES: tuple[OnOverflow, ...] = get_args(OnOverflow)

SplitMode = Literal["auto", "always", "never"]
SPLIT_MODES: tuple[SplitMode, ...] = get_args(SplitMode)
"""When one file may be read by several workers at once (see :mod:`preloader.engine.schedule`)."""

TimeoutPolicy = Literal["ready", "unready"]
TIMEOUT_POLICIES: tuple[TimeoutPolicy, ...] = get_args(TimeoutPolicy)
ServerDropPolicy = Literal["hold", "rewarm"]
"""What keep-warm does with files the server dropped from the page cache after reading
them: ``hold`` leaves them out until they are resident again, ``rewarm`` reads them again."""
SERVER_DROP_POLICIES: tuple[ServerDropPolicy, ...] = get_args(ServerDropPolicy)


@dataclass(frozen=True)
class WarmOptions:
    """How the engine reads; validated here, once.

    :ivar concurrency: parallel chunk reads; :data:`AUTO_CONCURRENCY` to tune it.
    :ivar chunk_size: bytes per chunk (rounded to whole pages).
    :ivar method: ``auto`` (= ``sendfile``), ``sendfile``, ``mmap`` or ``read``.
    :ivar timeout: seconds for the whole read pass; ``None`` for no limit.
    :ivar read_timeout: seconds one chunk may take before its file is given up as stalled.
    :ivar verify: re-open every file after the pass and measure residency.
    :ivar split: when one file may be read by several workers at once (only ever at the
        tail of a pass, see :mod:`preloader.engine.schedule`): ``auto`` (where the storage gains
        from it), ``always`` or ``never``.
    :raises ValueError: for a negative concurrency, a chunk under one page, an unknown
        method or split mode.
    """

    concurrency: int = DEFAULT_CONCURRENCY
    chunk_size: int = DEFAULT_CHUNK_SIZE
    method: ReadMethod = "auto"
    timeout: float | None = None
    read_timeout: float | None = None
    verify: bool = True
    split: SplitMode = "auto"

    def __post_init__(self) -> None:
        if self.concurrency < 0:
            raise ValueError("concurrency must be >= 1 (or 0 for auto)")
        if self.chunk_size < PAGE_SIZE:
            raise ValueError(f"chunk_size must be at least one page ({PAGE_SIZE})")
        if self.method not in READ_METHODS:
            raise ValueError(f"unknown read method {self.method!r}")
        if self.split not in SPLIT_MODES:
            raise ValueError(f"unknown split mode {self.split!r}")

    def chunk_size_for(self, total_bytes: int | None = None) -> int:
        """The chunk size reads are cut at: the one rule the engine and keep-warm share.

        :attr:`chunk_size` rounded down to whole pages. For a full pass over
        ``total_bytes`` with ``-c auto``, smaller where the plan would otherwise make fewer
        than :data:`AUTO_MIN_CHUNKS` chunks. Keep-warm measures and re-reads lost chunks
        at the plain size (``total_bytes`` omitted), whatever the first pass used.
        """
        size = self.chunk_size
        if total_bytes is not None and self.concurrency == AUTO_CONCURRENCY:
            size = min(size, max(AUTO_MIN_CHUNK, total_bytes // AUTO_MIN_CHUNKS))
        return max(PAGE_SIZE, size - size % PAGE_SIZE)


@dataclass(frozen=True)
class Headroom:
    """Bytes kept free below the memory budget: a fixed size, or a share of the limit.

    The process's own memory grows while it warms, the kernel starts reclaiming before a
    limit is reached (v2 ``memory.high``), and in a postStart hook the server shares the
    container's cgroup; the headroom leaves room for all that.

    The share is capped: what the agent itself needs does not grow with the model, and a
    deployment sized as model + 256 MiB + 5% must not see its last shards trimmed.

    :ivar fixed_bytes: an absolute headroom, or ``None`` for a share.
    :ivar fraction: share of the binding limit (the cgroup's, or the node's memory).
    :ivar minimum_bytes: floor for a share.
    :ivar maximum_bytes: cap for a share, ``None`` for none.
    """

    fixed_bytes: int | None = None
    fraction: float = 0.05
    minimum_bytes: int = 64 * 1024 * 1024
    maximum_bytes: int | None = 1024 * 1024 * 1024

    def bytes_for(self, limit_bytes: int | None) -> int:
        """Headroom in bytes when the binding limit is ``limit_bytes`` (``None``: unknown)."""
        if self.fixed_bytes is not None:
            return self.fixed_bytes
        share = int(self.fraction * limit_bytes) if limit_bytes else 0
        if self.maximum_bytes is not None:
            share = min(share, self.maximum_bytes)
        return max(self.minimum_bytes, share)

    def describe(self) -> str:
        if self.fixed_bytes is not None:
            return format_bytes(self.fixed_bytes)
        text = f"{self.fraction:.0%} of the limit, at least {format_bytes(self.minimum_bytes)}"
        if self.maximum_bytes is not None:
            text += f", at most {format_bytes(self.maximum_bytes)}"
        return text


DEFAULT_HEADROOM = Headroom()
"""5% of the binding limit, at least 64 MiB, at most 1 GiB."""


def parse_headroom(text: str) -> Headroom:
    """``"256MiB"`` -> a fixed headroom; ``"10%"`` -> a share of the limit (no floor).

    :raises ValueError: naming the text, for anything else.
    """
    stripped = text.strip()
    if stripped.endswith("%"):
        try:
            percent = float(stripped[:-1])
        except ValueError:
            raise ValueError(f"headroom {text!r}: not a size or a percentage") from None
        if not 0 <= percent < 100:
            raise ValueError(f"headroom {text!r}: a percentage must be in [0, 100)")
        return Headroom(fraction=percent / 100, minimum_bytes=0, maximum_bytes=None)
    try:
        return Headroom(fixed_bytes=parse_size(stripped))
    except ValueError:
        raise ValueError(
            f"headroom {text!r}: not a size or a percentage (examples: 256MiB, 1G, 5%)"
        ) from None


@dataclass(frozen=True)
class Selection:
    """Which paths to act on.

    :ivar paths: existing roots to walk.
    :ivar include: globs a file must match (none: every file).
    :ivar exclude: globs of files and directories to skip.
    :ivar skip_reason: set when there is nothing to do and that is fine (the reference
        one-liner's behaviour for an unset or missing ``MODEL_DIR``).
    :ivar all_formats: warm every format, not only what the servers load.
    :ivar missing: ``MODEL_DIR`` and ``PRELOADER_PATHS`` entries that do not exist (not
        in :attr:`paths`): ``warm`` skips them, ``serve`` is not ready while any is
        missing unless :attr:`ServeConfig.allow_missing`.
    """

    paths: tuple[str, ...]
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_reason: str | None = None
    all_formats: bool = False
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class WarmConfig:
    """Everything ``preloader warm`` needs, resolved and validated."""

    selection: Selection
    options: WarmOptions
    min_resident: float = 0.99
    best_effort: bool = False
    require_verified: bool = False
    json: bool = False
    progress: bool | None = None
    progress_interval: float = 10.0
    on_overflow: OnOverflow = "trim"
    headroom: Headroom = DEFAULT_HEADROOM
    lock: bool = False


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``preloader serve`` needs, resolved and validated.

    :ivar options: how to read (``timeout`` unused: the serve deadline is :attr:`timeout`).
    :ivar ready_ratio: share of each path's bytes that must be resident for ``/readyz``.
    :ivar ready_latch: once ready, stay ready (the server has loaded its weights by then).
    :ivar timeout: seconds from start after which :attr:`timeout_policy` decides
        readiness; ``None`` for no deadline. Reading goes on either way.
    :ivar timeout_policy: ``ready`` (become ready, loudly) or ``unready`` (stay unready).
    :ivar start_lead: seconds before the first pass's estimated end at which ``/startz``
        opens (see :mod:`preloader.agent.startgate`); 0 opens it with ``/readyz``.
    :ivar start_min_rate: bytes per second the node's storage never reads below
        (``--start-min-rate``): a mount not measured yet is estimated at it, so
        ``/startz`` may open before the first measured estimate; ``None``: no floor.
    :ivar recheck_seconds: keep-warm interval; 0 turns keep-warm off.
    :ivar max_backoff_seconds: longest keep-warm interval after repeated losses.
    :ivar on_server_drop: what keep-warm does with files the server dropped after reading
        them (see :mod:`preloader.agent.serverdrop`).
    :ivar shutdown_seconds: how long a stop waits for reads and requests to finish.
    :ivar node_labels: label the node per warm path and post Events (``--node-label``);
        ``None``: off.
    :ivar allow_missing: a ``MODEL_DIR`` or ``PRELOADER_PATHS`` entry that does not exist
        is skipped, as ``warm`` does; by default ``/readyz`` stays closed and names it.
    :ivar lock: pin the warmed files with ``mmap`` + ``mlock`` (each shard once read, the
        rest after the first pass) until the agent stops (``--lock``; without the
        permission it serves unpinned).
    """

    selection: Selection
    options: WarmOptions = field(default_factory=WarmOptions)
    host: str = "0.0.0.0"  # noqa: S104 - a sidecar's probes and scrapes come from outside the pod
    port: int = 9400
    ready_ratio: float = 0.99
    ready_latch: bool = True
    timeout: float | None = None
    timeout_policy: TimeoutPolicy = "ready"
    start_lead: float = 0.0
    start_min_rate: float | None = None
    recheck_seconds: float = 30.0
    max_backoff_seconds: float = 900.0
    on_server_drop: ServerDropPolicy = "rewarm"
    shutdown_seconds: float = 1.0
    node_labels: NodeLabelConfig | None = None
    allow_missing: bool = False
    lock: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.ready_ratio <= 1.0:
            raise UsageError(f"ready ratio {self.ready_ratio}: must be between 0 and 1")
        if self.timeout_policy not in TIMEOUT_POLICIES:
            choices = ", ".join(TIMEOUT_POLICIES)
            raise UsageError(f"timeout policy {self.timeout_policy!r}: must be one of {choices}")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"port {self.port}: must be between 0 and 65535")
        if self.on_server_drop not in SERVER_DROP_POLICIES:
            choices = ", ".join(SERVER_DROP_POLICIES)
            raise UsageError(
                f"server drop policy {self.on_server_drop!r}: must be one of {choices}"
            )
        parse_start_lead(self.start_lead)
        if self.start_min_rate is not None and not (
            math.isfinite(self.start_min_rate) and self.start_min_rate > 0
        ):
            raise UsageError(
                f"start min rate {self.start_min_rate!r}: must be a finite number of bytes "
                "per second > 0 (PRELOADER_START_MIN_RATE / --start-min-rate)"
            )
        if self.recheck_seconds < 0 or self.max_backoff_seconds < 0:
            raise UsageError("recheck and back-off seconds must not be negative")


@dataclass(frozen=True)
class WaitConfig:
    """Everything ``preloader wait`` needs.

    :ivar timeout: seconds to wait in all; ``None`` to wait for ever.
    :ivar interval: seconds between polls.
    """

    url: str = "http://127.0.0.1:9400/readyz"
    timeout: float | None = None
    interval: float = 1.0


def parse_concurrency(text: str | int | None) -> int:
    """``"8"`` -> 8, ``"auto"`` -> :data:`AUTO_CONCURRENCY`, ``None``/``""`` -> default."""
    if text is None or text == "":
        return DEFAULT_CONCURRENCY
    if isinstance(text, str) and text.strip().lower() == "auto":
        return AUTO_CONCURRENCY
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"concurrency {text!r}: not a whole number or 'auto'") from None
    if not 1 <= value <= 1024:
        raise UsageError(f"concurrency {value}: must be between 1 and 1024, or 'auto'")
    return value


def _missing(path: str, follow: bool = False) -> bool:
    """Whether ``path`` does not exist; a path that cannot be examined (EACCES on a
    folder above it, EIO) exists as far as this goes, so the walk reports the real cause
    instead of a misleading "does not exist"."""
    try:
        if follow:
            os.stat(path)
        else:
            os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def resolve_selection(
    args: Sequence[str],
    model_dir: str | None,
    env_paths: Sequence[str],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    all_formats: bool = False,
) -> Selection:
    """Decide which roots to walk.

    Paths given on the command line must exist (a typo is an error). Without them, the
    roots come from ``MODEL_DIR`` and ``PRELOADER_PATHS``; when those are unset or point
    nowhere, the result says why it skips, and the caller exits 0 as the one-liner does.

    :raises UsageError: for a command-line path that does not exist.
    """

    def selection(
        paths: tuple[str, ...], skip_reason: str | None = None, missing: tuple[str, ...] = ()
    ) -> Selection:
        return Selection(paths, tuple(include), tuple(exclude), skip_reason, all_formats, missing)

    if args:
        for path in args:
            if _missing(path):
                raise UsageError(f"{path}: no such file or directory")
        return selection(tuple(args))
    candidates = [p for p in [model_dir or "", *env_paths] if p]
    if not candidates:
        return selection((), "MODEL_DIR is not set and no PATH was given")
    existing = tuple(dict.fromkeys(p for p in candidates if not _missing(p, follow=True)))
    missing = tuple(dict.fromkeys(p for p in candidates if p not in existing))
    if not existing:
        return selection((), f"{', '.join(candidates)}: does not exist", missing)
    return selection(existing, missing=missing)


def parse_start_lead(value: str | float) -> float:
    """The lead in seconds from a flag or ``PRELOADER_START_LEAD``.

    :raises UsageError: for text that is not a number, a negative number, ``nan`` or
        ``inf``.
    """
    try:
        lead = float(value)
    except (TypeError, ValueError):
        raise UsageError(
            f"start lead {value!r}: not a number of seconds (PRELOADER_START_LEAD / --start-lead)"
        ) from None
    if not math.isfinite(lead) or lead < 0:
        raise UsageError(
            f"start lead {value!r}: must be a finite number of seconds >= 0 "
            "(PRELOADER_START_LEAD / --start-lead)"
        )
    return lead
