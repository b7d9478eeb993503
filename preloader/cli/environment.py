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


def _own(command: click.Command) -> Iterator[str]:
    for param in command.params:
        envvar = param.envvar
        if isinstance(envvar, str):
            yield envvar
        elif envvar:
            yield from envvar


def _walk(command: click.Command) -> Iterator[str]:
    yield from _own(command)
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None:
                yield from _walk(sub)


def unknown_variables(
    command: click.Command, environ: Mapping[str, str], invoked: str | None = None
) -> list[tuple[str, str | None]]:
    """``(name, closest known name or None)`` for each ``PRELOADER_*`` nobody declares.

    :param invoked: the subcommand being run, if any. The names it and the group declare
        are checked first; the other subcommands (each an import) are loaded only when a
        name is left over, so the common case costs no imports and the answer is the same.
    """
    ours = sorted(
        name for name in environ if name.startswith(PREFIX) and not _SERVICE_LINKS.match(name)
    )
    if not ours:
        return []
    near = set(_own(command))
    if invoked is not None and isinstance(command, click.Group):
        sub = command.get_command(click.Context(command), invoked)
        if sub is not None:
            near |= declared_variables(sub)
    if all(name in near for name in ours):
        return []
    known = sorted(declared_variables(command))
    found = []
    for name in ours:
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        found.append((name, close[0] if close else None))
    return found
