"""structlog set-up: readable on a terminal, one JSON object a line everywhere else.

structlog (and the asyncio it imports) is loaded on first use, not at import: the option
declarations import this module for :data:`LEVELS` and :data:`FORMATS`, and
``preloader --version`` must not pay for a logger it never uses.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["configure", "get_logger", "human"]

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "console", "json")

_human = False  # the format configure chose is console: people read stderr


def human() -> bool:
    """Whether the logs are for people (console), not one JSON object a line."""
    return _human


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog once, at the edge; logs go to stderr.

    :param level: ``debug``, ``info``, ``warning`` or ``error``.
    :param fmt: ``console``, ``json``, or ``auto`` (console on a TTY, JSON otherwise).
    """
    import logging

    import structlog

    global _human
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    _human = fmt == "console"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger() -> Any:
    """The project's logger (a structlog bound logger)."""
    import structlog

    return structlog.get_logger("preloader")
