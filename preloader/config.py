"""Settings objects, built once at the edge (the CLI) from flags and environment.

Every command-line option has a ``PRELOADER_*`` environment twin (declared on the click
option); a flag on the command line wins over its environment variable. ``MODEL_DIR``
and ``PRELOADER_CONC`` keep the names of the reference postStart one-liner. Nothing
below the CLI reads ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from .engine import AUTO_CONCURRENCY, WarmOptions
from .errors import UsageError

__all__ = ["Selection", "WarmConfig", "parse_concurrency", "resolve_selection"]

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


def resolve_selection(
    args: Sequence[str],
    model_dir: str | None,
    env_paths: Sequence[str],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> Selection:
    """Decide which roots to walk.

    Paths given on the command line must exist (a typo is an error). Without them, the
    roots come from ``MODEL_DIR`` and ``PRELOADER_PATHS``; when those are unset or point
    nowhere, the result says why it skips, and the caller exits 0 as the one-liner does.

    :raises UsageError: for a command-line path that does not exist.
    """

    def selection(paths: tuple[str, ...], skip_reason: str | None = None) -> Selection:
        return Selection(paths, tuple(include), tuple(exclude), skip_reason)

    if args:
        for path in args:
            if not os.path.lexists(path):
                raise UsageError(f"{path}: no such file or directory")
        return selection(tuple(args))
    candidates = [p for p in [model_dir or "", *env_paths] if p]
    if not candidates:
        return selection((), "MODEL_DIR is not set and no PATH was given")
    existing = tuple(dict.fromkeys(p for p in candidates if os.path.exists(p)))
    if not existing:
        return selection((), f"{', '.join(candidates)}: does not exist")
    return selection(existing)
