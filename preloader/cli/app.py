"""The ``preloader`` click group; each subcommand's module is imported when it runs.

:class:`LazyGroup` keeps ``warm`` from ever loading the HTTP server, Prometheus or the
Kubernetes client, and ``status`` from loading the engine's reading path.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from typing import Any

import click

from .._version import __version__
from .environment import unknown_variables
from .options import log_options
from .outcome import EXIT_CODES_HELP

__all__ = ["COMMANDS", "LazyGroup", "cli"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# name -> (module under preloader.cli, attribute); `--help` lists them by name, as click does.
COMMANDS = {
    "warm": ("warm", "warm"),
    "status": ("residency", "status"),
    "evict": ("residency", "evict"),
    "plan": ("residency", "plan_command"),
    "demo": ("demo", "demo"),
    "serve": ("serve", "serve"),
    "wait": ("wait", "wait"),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported the first time they are asked for.

    :attr:`commands` holds those loaded so far; :meth:`get_command` and
    :meth:`list_commands` see them all.
    """

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.lazy) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            module, attribute = self.lazy[cmd_name]
            # __import__, not importlib.import_module: only the import statement's path is
            # seen by `python -X importtime`, and start-up cost is measured with it.
            name = f"{__package__}.{module}"
            __import__(name)
            command = getattr(sys.modules[name], attribute)
            self.add_command(command, cmd_name)
        return self.commands.get(cmd_name)

    def load_all(self) -> MutableMapping[str, click.Command]:
        """Every subcommand, imported: for walks over the whole tree (``--help``, tests)."""
        ctx = click.Context(self)
        for name in self.lazy:
            self.get_command(ctx, name)
        return self.commands


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings=CONTEXT, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, "-V", "--version", prog_name="preloader")
@log_options
@click.pass_context
def cli(ctx: click.Context, log_level: str, log_format: str, debug: bool) -> None:
    """Make model weight files resident in the Linux page cache, and prove it.

    A drop-in for the postStart one-liner `find $MODEL_DIR -type f | xargs -P
    $PRELOADER_CONC cat > /dev/null`: zero-copy chunked reads, residency verified by
    cachestat(2), progress, clear errors.
    """
    from ..logs import configure, get_logger

    configure(log_level, log_format)
    ctx.obj = {"debug": debug}
    log = get_logger()
    for name, close in unknown_variables(ctx.command, os.environ, ctx.invoked_subcommand):
        log.warning("unknown environment variable; ignored", name=name, did_you_mean=close)
