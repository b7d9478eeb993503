"""Exit codes and the errors a front end turns into one line for the user."""

from __future__ import annotations

__all__ = [
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_RESIDENT",
    "EXIT_OK",
    "EXIT_READ_ERRORS",
    "EXIT_TIMEOUT",
    "EXIT_UNVERIFIED",
    "EXIT_USAGE",
    "UsageError",
]

EXIT_OK = 0
"""Done (or nothing to do: ``MODEL_DIR`` unset or missing; or ``--best-effort``)."""
EXIT_INTERNAL = 1
"""A bug: an unexpected exception. Run with ``--debug`` for the traceback."""
EXIT_USAGE = 2
"""Bad command line or input: unknown option, missing explicit PATH, bad size."""
EXIT_READ_ERRORS = 3
"""Some files could not be read (each named in the log and in ``error_details``)."""
EXIT_NOT_RESIDENT = 4
"""The resident share after warming is below ``--min-resident``."""
EXIT_TIMEOUT = 5
"""``--timeout`` ran out before the read pass finished."""
EXIT_UNVERIFIED = 6
"""``--require-verified`` and the kernel would not tell residency for some files."""
EXIT_INTERRUPTED = 130
"""Stopped by SIGINT or SIGTERM (a summary is still printed)."""


class UsageError(Exception):
    """Bad input from the user; the message is one line naming the path and the cause."""

    exit_code = EXIT_USAGE
