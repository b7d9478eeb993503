"""Typed events from the engine and the agent, and the one table that logs them.

The engine and the agent never print: they report :class:`EngineEvent` objects through a
callback. A failure carries its :data:`ErrorReason` from where it happened, so metrics
label errors from the reason, never from the message text. :func:`log_event` is the one
mapping from an event to a log line, with one level per kind (:data:`LEVELS`).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..logs import get_logger
from ..units import printable

__all__ = [
    "ERROR_REASONS",
    "LEVELS",
    "Emitter",
    "EngineEvent",
    "ErrorReason",
    "EventKind",
    "log_event",
]

ErrorReason = Literal["read", "stalled", "changed", "incomplete", "internal"]
"""Why a file or a path failed: the ``reason`` label of ``preloader_errors_total``
(``incomplete``: the model folder lacks files its index or split set names, so the path
failed before reading)."""
ERROR_REASONS: tuple[ErrorReason, ...] = get_args(ErrorReason)


class EventKind(str, enum.Enum):
    """What happened. The value is the event's name in ``serve``'s log."""

    # from the engine
    FILE_ERROR = "file_error"
    METHOD_FALLBACK = "method_fallback"
    NOT_RESIDENT = "not_resident"
    CONCURRENCY = "concurrency"
    STATE = "state"
    # from the agent
    PLANNED = "planned"
    SKIPPED = "skipped"
    WARMED = "warmed"
    REWARMED = "rewarmed"
    REPLANNED = "replanned"
    START = "start"
    START_LEAD_TOO_LONG = "start_lead_too_long"
    FIRST_PASS_OVER = "first pass over"  # noqa: S105 - an event name, not a secret
    READY = "ready"
    UNREADY = "unready"
    TIMEOUT = "timeout"
    DEGRADED = "degraded"
    RECOVERED = "recovered"
    FAILED = "failed"
    INCOMPLETE_MODEL = "incomplete model"
    ODD_LAYOUT = "odd model layout"
    SPARSE_FILE = "sparse file"
    TRIMMED = "trimmed"
    PROACTIVE_RECLAIM = "proactive reclaim"
    SERVER_DROP = "server drop"
    PINNED = "pinned"
    UNPINNED = "released pinned pages"
    LOCK_REFUSED = "cannot lock"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class EngineEvent:
    """Something a front end may want to log as it happens.

    :ivar kind: what happened (compares equal to its string value).
    :ivar path: the file or served path it is about, if any.
    :ivar detail: the human-readable cause or state.
    :ivar reason: for ``file_error`` and ``failed``: why, as a metric label.
    :ivar fields: more structured fields for ``serve``'s log line (name, JSON value).
    """

    kind: EventKind
    path: str = ""
    detail: str = ""
    reason: ErrorReason | None = None
    fields: tuple[tuple[str, object], ...] = ()


class Emitter:
    """Builds an :class:`EngineEvent` and hands it to ``on_event``; nothing without one.

    :param on_event: the front end's callback, called where the event happens (on the
        event loop).
    """

    def __init__(self, on_event: Callable[[EngineEvent], None] | None) -> None:
        self.on_event = on_event

    def __call__(
        self,
        kind: EventKind,
        path: str = "",
        detail: str = "",
        reason: ErrorReason | None = None,
        fields: tuple[tuple[str, object], ...] = (),
    ) -> None:
        if self.on_event is not None:
            self.on_event(EngineEvent(kind, path, detail, reason, fields))


LEVELS: dict[EventKind, int] = {
    EventKind.FILE_ERROR: logging.ERROR,
    EventKind.FAILED: logging.ERROR,
    EventKind.INCOMPLETE_MODEL: logging.ERROR,
    EventKind.ODD_LAYOUT: logging.WARNING,
    EventKind.SPARSE_FILE: logging.WARNING,
    EventKind.PROACTIVE_RECLAIM: logging.WARNING,
    EventKind.SERVER_DROP: logging.WARNING,
    EventKind.LOCK_REFUSED: logging.ERROR,
    EventKind.TRIMMED: logging.WARNING,
    EventKind.TIMEOUT: logging.ERROR,
    EventKind.DEGRADED: logging.WARNING,
    EventKind.NOT_RESIDENT: logging.WARNING,
    EventKind.SKIPPED: logging.WARNING,
    EventKind.UNREADY: logging.WARNING,
    EventKind.START_LEAD_TOO_LONG: logging.WARNING,
    EventKind.STATE: logging.DEBUG,
}
"""The log level of each kind; every other kind logs at INFO."""

# ``warm`` words its lines for a person at a terminal (these names are part of its log
# contract): kind -> (event name, whether the path is a field, the detail's field name).
_WARM_WORDING: dict[EventKind, tuple[str, bool, str]] = {
    EventKind.FILE_ERROR: ("read failed", True, "cause"),
    EventKind.NOT_RESIDENT: ("not resident", True, "cause"),
    EventKind.METHOD_FALLBACK: ("read method fallback", True, "detail"),
    EventKind.CONCURRENCY: ("concurrency", False, "detail"),
    EventKind.STATE: ("state", False, "state"),
}


def log_event(event: EngineEvent, *, worded: bool = False) -> None:
    """Log ``event`` as one structured line at its kind's level.

    :param worded: ``warm``'s wording (``read failed``, ``not resident``, ...), which
        logs only the engine's kinds; else the kind is the event name, as ``serve`` logs.
    """
    level = LEVELS.get(event.kind, logging.INFO)
    fields: dict[str, Any] = {}
    if worded:
        if event.kind not in _WARM_WORDING:
            return
        name, with_path, detail_key = _WARM_WORDING[event.kind]
        if with_path:
            fields["path"] = printable(event.path)
        fields[detail_key] = event.detail
    else:
        name = event.kind.value
        if event.path:
            fields["path"] = printable(event.path)
        if event.detail:
            fields["detail"] = event.detail
        fields.update(event.fields)
    get_logger().log(level, name, **fields)
