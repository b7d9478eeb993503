"""Around click: what the raw command line and environment ask for, and usage errors.

Before click has parsed anything (and when parsing fails) the process must still know
two things: whether ``--best-effort`` was asked for (flag or environment), because then
it exits 0 whatever goes wrong, bad input included; and whether ``--json`` was, because
then a usage error is a JSON document on stdout as well. :class:`Intent` reads them from
the raw input; :func:`usage_error` turns any click error into one log line naming the
flag or the environment variable the bad value came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import click
from click.core import ParameterSource

from .. import errors
from ..logs import FORMATS, LEVELS, configure, get_logger
from .outcome import Outcome, print_json

__all__ = ["Intent", "usage_error"]

_FALSE = frozenset({"", "0", "false", "f", "no", "n", "off"})
_GROUP_VALUES = frozenset({"--log-level", "--log-format"})  # group options with a value


def _asked(args: Sequence[str], flag: str, value: str | None) -> bool:
    """``flag`` among the options, or its environment twin set to anything but false.

    Lenient on purpose: ``PRELOADER_BEST_EFFORT=maybe`` is not a boolean click accepts,
    but nobody sets it to be strict; it counts as asked for.
    """
    options = list(args[: args.index("--")] if "--" in args else args)
    return flag in options or (value is not None and value.strip().lower() not in _FALSE)


def _command(group: click.Group, args: Sequence[str]) -> click.Command | None:
    """The subcommand the raw arguments name (after the group's own options), if any."""
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in _GROUP_VALUES:
            index += 2
            continue
        if arg.startswith("-"):
            index += 1
            continue
        return group.get_command(click.Context(group), arg)
    return None


def _raw_value(args: Sequence[str], flag: str, environ: Mapping[str, str], name: str) -> str:
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return environ.get(name, "")


@dataclass(frozen=True)
class Intent:
    """What the raw input asks for, read without click.

    :ivar best_effort: the command declares ``--best-effort`` and it (or its environment
        twin) was given: exit 0 whatever happens.
    :ivar json: the command declares ``--json`` and it was given.
    """

    best_effort: bool = False
    json: bool = False
    log_level: str = "info"
    log_format: str = "auto"

    @classmethod
    def read(cls, group: click.Group, args: Sequence[str], environ: Mapping[str, str]) -> Intent:
        command = _command(group, args)
        declared = {param.name for param in command.params} if command is not None else set()
        level = _raw_value(args, "--log-level", environ, "PRELOADER_LOG_LEVEL")
        fmt = _raw_value(args, "--log-format", environ, "PRELOADER_LOG_FORMAT")
        return cls(
            best_effort="best_effort" in declared
            and _asked(args, "--best-effort", environ.get("PRELOADER_BEST_EFFORT")),
            json="as_json" in declared and _asked(args, "--json", environ.get("PRELOADER_JSON")),
            log_level=level if level in LEVELS else "info",
            log_format=fmt if fmt in FORMATS else "auto",
        )


def describe(err: click.ClickException) -> str:
    """One line for a click error, naming where a bad value came from.

    click words a bad value as ``Invalid value for '--timeout' (env var:
    'PRELOADER_TIMEOUT')`` whether it came from the flag or from the variable; this names
    the one it came from.
    """
    if isinstance(err, click.BadParameter) and err.param is not None and err.ctx is not None:
        param = err.param
        source = err.ctx.get_parameter_source(param.name) if param.name else None
        if source == ParameterSource.ENVIRONMENT and isinstance(param.envvar, str):
            where = param.envvar
        elif isinstance(param, click.Option):
            where = max(param.opts, key=len)
        else:
            where = (param.human_readable_name or "argument").upper()
        return f"invalid value for {where}: {err.message}"
    return err.format_message()


def usage_error(err: click.ClickException, intent: Intent) -> int:
    """Report a click error (bad option, bad value) as one log line; return the exit code.

    Logging is set up here too: the error may come before the group's own options were
    parsed (a bad ``PRELOADER_LOG_LEVEL`` is one). ``preloader`` with no command is the
    exception: click's help goes to stderr as text, not as a log line, and the exit code
    is click's for a missing command (2).

    :param err: the error click raised.
    :param intent: what the raw input asked for (``--best-effort``, ``--json``, logging).
    :return: the exit code.
    """
    configure(intent.log_level, intent.log_format)
    if isinstance(err, click.exceptions.NoArgsIsHelpError):
        # ``preloader`` alone: the help as text on stderr and exit 2, as click prints it.
        err.show()
        return Outcome(err.exit_code, intent.best_effort).exit_code
    message = describe(err)
    fields: dict[str, object] = {"error": message}
    if isinstance(err, click.UsageError) and err.ctx is not None:
        fields["hint"] = f"see: {err.ctx.command_path} --help"
    get_logger().error("bad input", **fields)
    outcome = Outcome(err.exit_code if err.exit_code else errors.EXIT_USAGE, intent.best_effort)
    outcome.announce()
    if intent.json:
        print_json({"error": message, "exit_code": outcome.exit_code})
    return outcome.exit_code
