"""``PRELOADER_*`` variables that no option declares: a misspelling is told, not ignored.

The known names are read from the click declarations themselves (every option's
environment twin, in every command), so a new option is known without a list to keep.
Kubernetes' service links for a Service called ``preloader`` (``PRELOADER_SERVICE_HOST``,
``PRELOADER_PORT_9400_TCP...``) are not ours and are passed over; the one that collides
with an option, ``PRELOADER_PORT=tcp://...``, is dropped by ``serve``'s port type
(:class:`~preloader.cli.paramtypes.ListenPort`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping

import click

__all__ = ["declared_variables", "unknown_variables"]

PREFIX = "PRELOADER_"
_SERVICE_LINKS = re.compile(r"^PRELOADER_(SERVICE_(HOST|PORT)\w*|PORT_\d+_(TCP|UDP|SCTP)\w*)$")


def declared_variables(command: click.Command) -> set[str]:
    """Every environment variable an option of ``command`` (and its subcommands) reads."""
    return set(_walk(command))


def _walk(command: click.Command) -> Iterator[str]:
    for param in command.params:
        envvar = param.envvar
        if isinstance(envvar, str):
            yield envvar
        elif envvar:
            yield from envvar
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            yield from _walk(sub)


def unknown_variables(
    command: click.Command, environ: Mapping[str, str]
) -> list[tuple[str, str | None]]:
    """``(name, closest known name or None)`` for each ``PRELOADER_*`` nobody declares."""
    known = sorted(declared_variables(command))
    found = []
    for name in sorted(environ):
        if not name.startswith(PREFIX) or name in known or _SERVICE_LINKS.match(name):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        found.append((name, close[0] if close else None))
    return found
