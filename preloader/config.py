"""Settings objects, built once at the edge (the CLI) from flags and environment.

Every command-line option has a ``PRELOADER_*`` environment twin (declared on the click
option); a flag on the command line wins over its environment variable. ``MODEL_DIR``
and ``PRELOADER_CONC`` keep the names of the reference postStart one-liner. Nothing
below the CLI reads ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from .budget import DEFAULT_HEADROOM, Headroom
from .engine import AUTO_CONCURRENCY, WarmOptions
from .errors import UsageError
from .startgate import parse_start_lead

__all__ = [
    "Selection",
    "ServeConfig",
    "WaitConfig",
    "WarmConfig",
    "parse_concurrency",
    "resolve_selection",
]

DEFAULT_CONCURRENCY = 4
DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024


@dataclass(frozen=True)
class Selection:
    """Which paths to act on.

    :ivar paths: existing roots to walk.
    :ivar skip_reason: set when there is nothing to do and that is fine (the reference
        one-liner's behaviour for an unset or missing ``MODEL_DIR``).
    """

    paths: tuple[str, ...]
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_reason: str | None = None
    all_formats: bool = False


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
    on_overflow: str = "trim"
    headroom: Headroom = DEFAULT_HEADROOM
    lock: bool = False


TIMEOUT_POLICIES = ("ready", "unready")


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
        opens (see :mod:`preloader.startgate`); 0 opens it with ``/readyz``.
    :ivar recheck_seconds: keep-warm interval; 0 turns keep-warm off.
    :ivar max_backoff_seconds: longest keep-warm interval after repeated losses.
    :ivar shutdown_seconds: how long a stop waits for reads and requests to finish.
    """

    selection: Selection
    options: WarmOptions = field(default_factory=WarmOptions)
    host: str = "0.0.0.0"  # noqa: S104 - a sidecar's probes and scrapes come from outside the pod
    port: int = 9400
    ready_ratio: float = 0.99
    ready_latch: bool = True
    timeout: float | None = None
    timeout_policy: str = "ready"
    start_lead: float = 0.0
    recheck_seconds: float = 30.0
    max_backoff_seconds: float = 900.0
    shutdown_seconds: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ready_ratio <= 1.0:
            raise UsageError(f"ready ratio {self.ready_ratio}: must be between 0 and 1")
        if self.timeout_policy not in TIMEOUT_POLICIES:
            choices = ", ".join(TIMEOUT_POLICIES)
            raise UsageError(f"timeout policy {self.timeout_policy!r}: must be one of {choices}")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"port {self.port}: must be between 0 and 65535")
        parse_start_lead(self.start_lead)
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

    def selection(paths: tuple[str, ...], skip_reason: str | None = None) -> Selection:
        return Selection(paths, tuple(include), tuple(exclude), skip_reason, all_formats)

    if args:
        for path in args:
            if _missing(path):
                raise UsageError(f"{path}: no such file or directory")
        return selection(tuple(args))
    candidates = [p for p in [model_dir or "", *env_paths] if p]
    if not candidates:
        return selection((), "MODEL_DIR is not set and no PATH was given")
    existing = tuple(dict.fromkeys(p for p in candidates if not _missing(p, follow=True)))
    if not existing:
        return selection((), f"{', '.join(candidates)}: does not exist")
    return selection(existing)
