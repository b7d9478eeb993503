"""How a command ends: the exit code, ``--best-effort``, unexpected errors, the exit.

Every command builds its settings, runs, and hands back an :class:`Outcome`;
:func:`execute` owns what happens around that: a bad flag is one log line and exit 2,
a refusal its own code, a bug one line and exit 1 (the traceback with ``--debug``), and
the process never waits on a worker thread stuck in a stalled read.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import click

from .. import errors
from .._version import __version__
from ..logs import get_logger

__all__ = [
    "DEMO_EXIT_CODES_HELP",
    "EXIT_CODES_HELP",
    "PLAN_EXIT_CODES_HELP",
    "RESIDENCY_EXIT_CODES_HELP",
    "SERVE_EXIT_CODES_HELP",
    "WAIT_EXIT_CODES_HELP",
    "Outcome",
    "end_startup",
    "execute",
    "finish",
    "print_json",
    "refuse",
    "request_best_effort",
]

_S = TypeVar("_S")


def end_startup() -> None:
    """Collect garbage again, leaving everything made so far out of every collection.

    Called once a command's modules and the logger are loaded and its settings built,
    before it runs; does nothing unless :func:`~preloader.cli.main` turned collection
    off (click's test runner calls the group directly).
    """
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


EXIT_CODES_HELP = (
    "Exit codes: 0 ok or nothing to do (MODEL_DIR unset or missing), 1 internal error, "
    "2 bad usage or input, 3 read errors, 4 resident share below --min-resident, "
    "5 --timeout reached, 6 residency unverifiable with --require-verified, "
    "7 over the memory budget with --on-overflow fail, 8 incomplete model (missing shards), "
    "9 --lock not permitted, 130 interrupted by SIGINT/SIGTERM."
)
RESIDENCY_EXIT_CODES_HELP = (
    "Exit codes: 0 ok or nothing to do, 1 internal error, 2 bad usage or input, "
    "130 interrupted by SIGINT/SIGTERM."
)
"""``status`` and ``evict``: they neither read the model nor judge residency."""
PLAN_EXIT_CODES_HELP = (
    "Exit codes: 0 ok or nothing to do, 1 internal error, 2 bad usage or input, "
    "8 incomplete model (missing shards), 130 interrupted by SIGINT/SIGTERM."
)
DEMO_EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 internal error, 2 bad usage or input (a --dir that exists), "
    "3 read errors, 130 interrupted by SIGINT/SIGTERM."
)
SERVE_EXIT_CODES_HELP = (
    "Exit codes: 0 stopped by SIGTERM/SIGINT (in-flight requests answered), 1 internal "
    "error, 2 bad usage or input (including an address it cannot listen on, and "
    "--node-label without a node name, the k8s extra or in-cluster config)."
)
WAIT_EXIT_CODES_HELP = (
    "Exit codes: 0 the URL answered 200, 2 bad usage (not an http(s) URL, or it answered "
    "a 4xx other than 408/429: a wrong URL), 5 --timeout reached first, 130 interrupted "
    "by SIGINT/SIGTERM."
)


_best_effort: list[bool] = [False]  # asked for on the raw command line or environment


def request_best_effort(asked: bool) -> None:
    """``--best-effort`` was asked for (see :class:`preloader.cli.entry.Intent`): from
    here on every exit is 0, bugs and bad input included, each logged with its code."""
    _best_effort[0] = asked


@dataclass(frozen=True)
class Outcome:
    """What a command found, and the exit code that follows from it.

    :ivar code: the code the finding deserves (see :mod:`preloader.errors`).
    :ivar best_effort: ``--best-effort``: exit 0 whatever was found (it is logged).
    """

    code: int
    best_effort: bool = False

    @property
    def exit_code(self) -> int:
        """The code the process exits with: :attr:`code`, or 0 under ``--best-effort``."""
        return errors.EXIT_OK if self.best_effort else self.code

    def announce(self) -> None:
        """Log that ``--best-effort`` hides a failure, if it does."""
        if self.best_effort and self.code != errors.EXIT_OK:
            get_logger().warning("best effort: exiting 0", would_exit=self.code)


class JsonItems:
    """A list in a ``--json`` document that is written item by item, never built whole.

    :func:`print_json` writes ``[item, item, ...]`` exactly as :func:`json.dumps` would
    write the list, so a per-file list of a million files costs one item's memory.

    :param items: a callable returning a fresh iterator of JSON-able items.
    """

    def __init__(self, items: Callable[[], Iterable[object]]) -> None:
        self.items = items


_FLUSH_EVERY = 1024  # items per write


def print_json(document: Mapping[str, object]) -> None:
    """The ``--json`` document: one object on one line of stdout.

    Values that are :class:`JsonItems` are streamed; the line is the one
    ``json.dumps(document)`` would give with those lists built.
    """
    if not any(isinstance(value, JsonItems) for value in document.values()):
        click.echo(json.dumps(document, sort_keys=False))
        return
    parts: list[str] = ["{"]
    for position, (key, value) in enumerate(document.items()):
        parts.append(f"{', ' if position else ''}{json.dumps(key)}: ")
        if not isinstance(value, JsonItems):
            parts.append(json.dumps(value))
            continue
        parts.append("[")
        for index, item in enumerate(value.items()):
            parts.append(f"{', ' if index else ''}{json.dumps(item)}")
            if len(parts) >= _FLUSH_EVERY:
                click.echo("".join(parts), nl=False)
                parts.clear()
        parts.append("]")
    parts.append("}")
    click.echo("".join(parts))


def execute(
    ctx: click.Context,
    build: Callable[[], _S],
    run: Callable[[_S], Outcome | int],
    *,
    best_effort: bool = False,
    json_errors: bool = False,
) -> NoReturn:
    """Build a command's settings, run it, exit with its code.

    :param build: resolves and validates the settings; a :class:`errors.UsageError` or
        ``ValueError`` here is bad input: one line, exit 2 (0 with ``best_effort``), and
        with ``json_errors`` a JSON document that says so.
    :param run: does the work and returns the outcome (or a bare exit code); garbage is
        collected again from here on (:func:`end_startup`).
    """
    try:
        settings = build()
    except (errors.UsageError, ValueError) as err:
        get_logger().error("bad input", error=str(err))
        outcome = Outcome(errors.EXIT_USAGE, best_effort)
        outcome.announce()
        code = outcome.exit_code
        if json_errors:
            print_json({"error": str(err), "exit_code": code})
        finish(code)
    end_startup()
    finish(_guard(ctx, lambda: run(settings)))


def refuse(err: errors.PreloaderError, outcome: Outcome, as_json: bool) -> None:
    """Report a refusal before any work: one line, the ``--json`` document."""
    get_logger().error("refused", error=str(err), exit_code=err.exit_code)
    outcome.announce()
    if as_json:
        print_json({"error": str(err), "exit_code": outcome.exit_code, "version": __version__})


def _guard(ctx: click.Context, func: Callable[[], Outcome | int]) -> int:
    """Turn unexpected exceptions into one log line and exit 1 (traceback with --debug)."""
    try:
        result = func()
    except errors.UsageError as err:
        get_logger().error("bad input", error=str(err))
        return err.exit_code
    except errors.PreloaderError as err:
        get_logger().error("refused", error=str(err), exit_code=err.exit_code)
        return err.exit_code
    except Exception as err:
        if ctx.obj and ctx.obj.get("debug"):
            raise
        get_logger().error(
            "internal error", error=f"{type(err).__name__}: {err}", hint="rerun with --debug"
        )
        return errors.EXIT_INTERNAL
    return result.exit_code if isinstance(result, Outcome) else result


def finish(code: int) -> NoReturn:
    """Exit with ``code`` (0 under ``--best-effort``, the code logged); never wait on a
    worker thread stuck in a stalled read."""
    if _best_effort[0] and code != errors.EXIT_OK:
        # Outcome.announce said so already where the command itself decided the code.
        get_logger().warning("best effort: exiting 0", exit_code=code)
        code = errors.EXIT_OK
    sys.stdout.flush()
    sys.stderr.flush()
    if threading.active_count() > 1:
        os._exit(code)
    sys.exit(code)
