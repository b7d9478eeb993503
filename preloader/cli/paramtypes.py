"""The value types of the command-line options: what a flag or its variable may hold.

Each turns the text into the value the settings take, or fails with click's one-line
"invalid value for ..." (see :func:`preloader.cli.entry.describe`); the ``checked_*``
callbacks check text that is parsed later, while click still knows its flag or variable.
"""

from __future__ import annotations

import math
import re
from typing import Any

import click
from click.core import ParameterSource

from .. import errors
from ..logs import get_logger
from ..settings import Headroom, parse_concurrency, parse_headroom
from ..units import parse_size

__all__ = [
    "HeadroomType",
    "ListenPort",
    "Number",
    "Size",
    "checked_concurrency",
    "checked_model_names",
]


class _Parsed(click.ParamType):  # type: ignore[type-arg]
    """A value parsed from its text by :meth:`parse`; a value already of :attr:`kind`
    (a default) passes as it is, and a ``ValueError`` is click's one-line failure."""

    kind: type

    def parse(self, text: str) -> Any:
        raise NotImplementedError

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, self.kind):
            return value
        try:
            return self.parse(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


class Size(_Parsed):
    """A byte count: ``1048576``, ``64MiB``, ``1G``."""

    name = "SIZE"
    kind = int

    def parse(self, text: str) -> int:
        return parse_size(text)


class Number(click.FloatRange):
    """A finite number in a range: every float option is one, so ``nan`` and ``inf``
    (which Python's ``float`` accepts, and every comparison with ``nan`` is false) are
    refused as bad input instead of disabling a check or reaching the engine."""

    name = "NUMBER"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                self.fail(f"{value!r} is not a number", param, ctx)
            if not math.isfinite(number):
                self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(value, param, ctx)


class HeadroomType(_Parsed):
    """A headroom: a size (``256MiB``) or a share of the limit (``10%``)."""

    name = "SIZE|PCT"
    kind = Headroom

    def parse(self, text: str) -> Headroom:
        return parse_headroom(text)


_SERVICE_LINK = re.compile(r"(tcp|udp|sctp)://[^\s/]+:\d+")


class ListenPort(click.IntRange):
    """A TCP port, 0 to 65535; from the environment, Kubernetes' service-link form is
    passed over.

    In a namespace with a Service named ``preloader``, Kubernetes puts
    ``PRELOADER_PORT=tcp://10.0.0.1:9400`` (the Service's address) into every pod
    (``enableServiceLinks``, on by default). That value names someone else's socket, not a
    port to listen on: it is ignored with one warning and the default applies. On the
    command line it stays bad input.
    """

    def __init__(self) -> None:
        super().__init__(0, 65535)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if (
            isinstance(value, str)
            and _SERVICE_LINK.fullmatch(value.strip())
            and param is not None
            and param.name is not None
            and ctx is not None
            and ctx.get_parameter_source(param.name) == ParameterSource.ENVIRONMENT
        ):
            get_logger().warning(
                "service link in the port variable; ignored",
                name=param.envvar,
                value=value,
                port=param.default,
                hint="a Kubernetes Service named preloader injects it: set the port "
                "explicitly or enableServiceLinks: false in the pod spec",
            )
            return param.default
        return super().convert(value, param, ctx)


def checked_concurrency(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Check ``value`` while click knows where it came from, so the error names the flag
    or ``PRELOADER_CONC``; the text itself is kept (:meth:`ReadArgs.options` parses it).

    :raises click.BadParameter: not a whole number from 1 to 1024 or ``auto``.
    """
    try:
        parse_concurrency(value)
    except errors.UsageError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None
    return value


def checked_model_names(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    """Check each ``PATH=NAME`` while click knows whether it came from ``--model-name``
    or ``PRELOADER_MODEL_NAMES``.

    :raises click.BadParameter: an item without ``=`` or with an empty side.
    """
    if value:
        from ..labels import parse_model_names  # only when names are given

        try:
            parse_model_names(value)
        except errors.UsageError as err:
            raise click.BadParameter(str(err), ctx=ctx, param=param) from None
    return value
