"""Exit codes and the errors a front end turns into one line for the user."""

from __future__ import annotations

__all__ = [
    "EXIT_INCOMPLETE_MODEL",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_LOCK_REFUSED",
    "EXIT_NOT_RESIDENT",
    "EXIT_OK",
    "EXIT_OVER_BUDGET",
    "EXIT_READ_ERRORS",
    "EXIT_TIMEOUT",
    "EXIT_UNVERIFIED",
    "EXIT_USAGE",
    "IncompleteModelError",
    "LockRefusedError",
    "OverBudgetError",
    "PreloaderError",
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
EXIT_OVER_BUDGET = 7
"""``--on-overflow fail`` and the plan does not fit the memory budget (nothing was read)."""
EXIT_INCOMPLETE_MODEL = 8
"""The model folder is incomplete: an index or a split set names files that are missing."""
EXIT_LOCK_REFUSED = 9
"""``--lock`` and the kernel will not pin the pages (``RLIMIT_MEMLOCK``, no ``CAP_IPC_LOCK``)."""
EXIT_INTERRUPTED = 130
"""Stopped by SIGINT or SIGTERM (a summary is still printed)."""


class PreloaderError(Exception):
    """An error a front end reports as one line and turns into :attr:`exit_code`."""

    exit_code = EXIT_INTERNAL


class UsageError(PreloaderError):
    """Bad input from the user; the message is one line naming the path and the cause."""

    exit_code = EXIT_USAGE


class OverBudgetError(PreloaderError):
    """The plan does not fit the memory budget and ``--on-overflow fail`` was asked for."""

    exit_code = EXIT_OVER_BUDGET


class IncompleteModelError(PreloaderError):
    """The model folder lacks files its index or split names promise (a broken download)."""

    exit_code = EXIT_INCOMPLETE_MODEL


class LockRefusedError(PreloaderError):
    """Pinning with ``mlock`` is not permitted (``RLIMIT_MEMLOCK`` or ``CAP_IPC_LOCK``)."""

    exit_code = EXIT_LOCK_REFUSED
