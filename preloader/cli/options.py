"""Every command-line option, declared once.

Their value types (sizes, finite numbers, headrooms, the listening port) are in
:mod:`.paramtypes`.

Each option carries its ``PRELOADER_*`` environment twin (shown in ``--help``); a flag
on the command line wins over its environment variable. Options that belong together
come as one decorator that hands the command one object instead of loose values:
:func:`selection_options` gives ``selection`` (a :class:`SelectionArgs`),
:func:`read_options` gives ``read`` (a :class:`ReadArgs`), :func:`budget_options` gives
``budget`` (a :class:`BudgetArgs`), :func:`node_label_options` gives ``node_labels``
(a :class:`NodeLabelArgs`). To add an option to a command, declare it here and
list it in that command's decorators.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from .. import errors
from ..logs import FORMATS, LEVELS, get_logger
from ..settings import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_HEADROOM,
    ON_OVERFLOW_POLICIES,
    READ_METHODS,
    Headroom,
    OnOverflow,
    ReadMethod,
    Selection,
    WarmOptions,
    parse_concurrency,
    resolve_selection,
)
from .paramtypes import HeadroomType, Number, Size, checked_concurrency, checked_model_names

if TYPE_CHECKING:
    from ..labels import NodeLabelConfig

__all__ = [
    "BudgetArgs",
    "NodeLabelArgs",
    "ReadArgs",
    "SelectionArgs",
    "allow_missing_option",
    "best_effort_option",
    "budget_options",
    "bundle",
    "concurrency_option",
    "json_option",
    "lock_option",
    "log_options",
    "node_label_options",
    "read_options",
    "selection_options",
    "start_min_rate_option",
    "timeout_option",
]

_F = TypeVar("_F", bound=Callable[..., Any])


def _stack(decorators: Sequence[Callable[[Any], Any]]) -> Callable[[_F], _F]:
    def apply(func: _F) -> _F:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


def _bundle(target: str, fields: Sequence[str], build: Callable[..., object]) -> Callable[[_F], _F]:
    """Hand the command ``target=build(**fields)`` instead of the separate ``fields``."""

    def apply(func: _F) -> _F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in fields}
            kwargs[target] = build(**values)
            return func(*args, **kwargs)

        return cast(_F, wrapper)

    return apply


def bundle(target: str, cls: type[object]) -> Callable[[_F], _F]:
    """Hand the command ``target=cls(...)`` built from the options named as its fields.

    For a command's own options: declare them, then list ``bundle("flags", Flags)``
    last (nearest the function), so the command takes one settings object.
    """
    return _bundle(target, [f.name for f in dataclasses.fields(cls)], cls)  # type: ignore[arg-type]


def option(*names: str, envvar: str | list[str], **attrs: Any) -> Callable[[_F], _F]:
    """A click option with its environment twin (or twins, first set wins) in ``--help``."""
    return click.option(*names, envvar=envvar, show_envvar=True, **attrs)


def number_option(
    name: str, envvar: str, default: float, help: str, least: float = 0, most: float | None = None
) -> Callable[[_F], _F]:
    """A finite number from ``least`` to ``most`` (seconds, a share), default shown."""
    return option(
        name, envvar=envvar, type=Number(least, most), default=default, show_default=True, help=help
    )


def choice_option(
    name: str, envvar: str, choices: Sequence[str], default: str, help: str
) -> Callable[[_F], _F]:
    """One of ``choices``, default shown."""
    kind = click.Choice(choices)
    return option(name, envvar=envvar, type=kind, default=default, show_default=True, help=help)


def flag_option(*names: str, envvar: str, help: str) -> Callable[[_F], _F]:
    """An on-only flag (``--json``); for on/off pairs use :func:`option` with ``A/B``."""
    return option(*names, envvar=envvar, is_flag=True, help=help)


# -- selection ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionArgs:
    """The selection options as given; :meth:`resolve` checks them against the disk."""

    paths: tuple[str, ...]
    model_dir: str | None
    env_paths: tuple[str, ...]
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    all_formats: bool

    def resolve(self) -> Selection:
        """:raises errors.UsageError: for a command-line path that does not exist.

        A ``MODEL_DIR`` or ``PRELOADER_PATHS`` entry that does not exist is a warning
        (the others are still used; with none left the command skips, exit 0).
        """
        from ..units import printable

        if not self.paths:
            for candidate in [self.model_dir or "", *self.env_paths]:
                if candidate and not os.path.exists(candidate):
                    get_logger().warning("path does not exist; skipped", path=printable(candidate))
        return resolve_selection(
            self.paths, self.model_dir, self.env_paths, self.include, self.exclude, self.all_formats
        )


def allow_missing_option(func: _F) -> _F:
    """``--allow-missing`` (serve): skip a root that does not exist instead of staying
    unready."""
    return flag_option(
        "--allow-missing",
        envvar="PRELOADER_ALLOW_MISSING",
        help="Serve without a MODEL_DIR or --path root that does not exist (ready once the "
        "others are warm, ready at once with none). Default: /readyz stays 503 and names it.",
    )(func)


def selection_options(func: _F) -> _F:
    """PATH arguments plus the options every command uses to pick files: ``selection``."""
    return _stack(
        [
            # readable=False: an unreadable PATH is a read error the walk names (exit 3),
            # as for MODEL_DIR, not a usage error with click's multi-line usage text.
            click.argument("paths", nargs=-1, type=click.Path(readable=False), metavar="[PATH]..."),
            click.option(
                "--model-dir",
                envvar="MODEL_DIR",
                hidden=True,
                help="Default root when no PATH is given (the reference name).",
            ),
            option(
                "--path",
                "env_paths",
                envvar="PRELOADER_PATHS",
                multiple=True,
                type=click.Path(readable=False),
                help="Extra root, repeatable; in the environment ':'-separated. Used, with "
                "MODEL_DIR, only when no PATH argument is given.",
            ),
            option(
                "--include",
                envvar="PRELOADER_INCLUDE",
                multiple=True,
                metavar="GLOB",
                help="Only files matching GLOB (repeatable; whitespace-separated in the "
                "environment). A GLOB without '/' matches the file name, with '/' the path "
                "relative to the root.",
            ),
            option(
                "--exclude",
                envvar="PRELOADER_EXCLUDE",
                multiple=True,
                metavar="GLOB",
                help="Skip files and directories matching GLOB (repeatable).",
            ),
            flag_option(
                "--all-formats",
                envvar="PRELOADER_ALL_FORMATS",
                help="Warm every format: PyTorch .bin/.pt/.pth beside safetensors, "
                "safetensors the index does not name, and every GGUF model of a folder "
                "(default: only what sglang, vLLM and llama.cpp load).",
            ),
            _bundle(
                "selection",
                ("paths", "model_dir", "env_paths", "include", "exclude", "all_formats"),
                SelectionArgs,
            ),
        ]
    )(func)


# -- reading -----------------------------------------------------------------------------


def concurrency_option(help: str) -> Callable[[_F], _F]:
    """``-c``/``--concurrency``/``PRELOADER_CONC``: chunks read in parallel."""
    return option(
        "-c",
        "--concurrency",
        envvar="PRELOADER_CONC",
        default="auto",
        show_default=True,
        metavar="N|auto",
        callback=checked_concurrency,
        help=help,
    )


@dataclass(frozen=True)
class ReadArgs:
    """The read options as given; :meth:`options` validates them into :class:`WarmOptions`."""

    concurrency: str
    chunk_size: int
    method: ReadMethod
    read_timeout: float

    def options(self, timeout: float | None = None) -> WarmOptions:
        """:raises errors.UsageError: for a bad concurrency or chunk size."""
        try:
            return WarmOptions(
                concurrency=parse_concurrency(self.concurrency),
                chunk_size=self.chunk_size,
                method=self.method,
                timeout=timeout,
                read_timeout=self.read_timeout or None,
            )
        except ValueError as err:
            raise errors.UsageError(str(err)) from None


def read_options(chunk_help: str, method_help: str) -> Callable[[_F], _F]:
    """How to read: ``-c``, ``--chunk-size``, ``--method``, ``--read-timeout``: ``read``."""
    return _stack(
        [
            concurrency_option(
                "Parallel readers, each reading one file front to back; at the end of a "
                "pass idle readers split the files left (not on s3fs, where files of "
                "512 MiB or more are read two at a time, in order). 'auto' starts at 4 "
                "and doubles while throughput still grows by 10%."
            ),
            option(
                "--chunk-size",
                envvar="PRELOADER_CHUNK_SIZE",
                type=Size(),
                default=DEFAULT_CHUNK_SIZE,
                show_default="64MiB",
                help=chunk_help,
            ),
            choice_option("--method", "PRELOADER_METHOD", READ_METHODS, "auto", method_help),
            number_option(
                "--read-timeout",
                "PRELOADER_READ_TIMEOUT",
                600,
                "Give up a file whose chunk read stalls this many seconds (0: never).",
            ),
            _bundle("read", ("concurrency", "chunk_size", "method", "read_timeout"), ReadArgs),
        ]
    )


# -- memory budget -----------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetArgs:
    """What to do when the plan does not fit the memory budget."""

    on_overflow: OnOverflow
    headroom: Headroom


def _budget(on_overflow: OnOverflow, headroom: Headroom | None) -> BudgetArgs:
    return BudgetArgs(on_overflow, headroom or DEFAULT_HEADROOM)


budget_options: Callable[[_F], _F] = _stack(
    [
        choice_option(
            "--on-overflow",
            "PRELOADER_ON_OVERFLOW",
            ON_OVERFLOW_POLICIES,
            "trim",
            "When the plan needs more page cache than the memory budget (cgroup limit "
            "minus usage, capped by MemAvailable, minus --headroom) allows: trim warms the "
            "plan in order up to the budget and reports what stays cold; fail exits 7 "
            "before reading; warn reads everything.",
        ),
        option(
            "--headroom",
            envvar="PRELOADER_HEADROOM",
            type=HeadroomType(),
            default=None,
            show_default="5% of the limit, 64MiB to 1GiB",
            help="Memory kept free below the budget: a size (256MiB) or a share of the "
            "limit (10%).",
        ),
        _bundle("budget", ("on_overflow", "headroom"), _budget),
    ]
)
"""``--on-overflow`` and ``--headroom``: ``budget``."""


# -- node labels (serve) ------------------------------------------------------------------


@dataclass(frozen=True)
class NodeLabelArgs:
    """``--node-label`` and its settings as given; :meth:`resolve` checks them."""

    node_label: bool
    node_name: str | None
    model_names: tuple[str, ...]
    label_grace: float
    kubeconfig: str | None
    label_resync: float

    def resolve(self, paths: Sequence[str]) -> NodeLabelConfig | None:
        """The labeler's settings for the served ``paths``; ``None`` when off.

        :raises errors.UsageError: no node name, a bad ``PATH=NAME``, two paths that would
            share a label.
        """
        if not self.node_label:
            return None
        from ..labels import NodeLabelConfig

        return NodeLabelConfig.resolve(
            self.node_name,
            paths,
            self.model_names,
            self.label_grace,
            self.kubeconfig,
            resync_seconds=self.label_resync,
        )


node_label_options: Callable[[_F], _F] = _stack(
    [
        option(
            "--node-label/--no-node-label",
            envvar="PRELOADER_NODE_LABEL",
            default=False,
            show_default=True,
            help="Label this Kubernetes node preloader.dev/<model>=warm while a path is warm, "
            "and post an Event about the node when a path turns ready, degraded or failed. "
            "Needs the k8s extra (pip install 'preloader[k8s]'), --node-name and RBAC to "
            "get and patch the node and create events (deploy/node-warmup).",
        ),
        option(
            "--node-name",
            envvar=["PRELOADER_NODE_NAME", "NODE_NAME"],
            help="The node to label; in a pod, NODE_NAME from the downward API "
            "(fieldRef spec.nodeName).",
        ),
        option(
            "--model-name",
            "model_names",
            envvar="PRELOADER_MODEL_NAMES",
            multiple=True,
            callback=checked_model_names,
            metavar="PATH=NAME",
            help="The label name for a served path (repeatable; whitespace-separated in the "
            "environment); default: the path's last component. Characters a label cannot "
            "hold become '-', and a name over 63 characters is cut to 52 plus '-' and 10 hex "
            "digits of its SHA-256.",
        ),
        number_option(
            "--label-grace",
            "PRELOADER_LABEL_GRACE_SECONDS",
            60.0,
            "Seconds a path may stay degraded before its node label is removed (a "
            "failed path loses it at once).",
        ),
        number_option(
            "--label-resync",
            "PRELOADER_LABEL_RESYNC_SECONDS",
            60.0,
            "Seconds between two reads of the node that put back (or take off) labels "
            "someone else changed.",
            least=0.1,
        ),
        option(
            "--kubeconfig",
            envvar="KUBECONFIG",
            type=click.Path(dir_okay=False),
            help="A kubeconfig file for --node-label instead of the in-cluster service "
            "account (outside a cluster, and for tests).",
        ),
        _bundle(
            "node_labels",
            ("node_label", "node_name", "model_names", "label_grace", "kubeconfig", "label_resync"),
            NodeLabelArgs,
        ),
    ]
)
"""``--node-label``, ``--node-name``, ``--model-name``, ``--label-grace``, ``--kubeconfig``,
``--label-resync``: ``node_labels`` (a :class:`NodeLabelArgs`)."""


# -- output and exit ---------------------------------------------------------------------

json_option: Callable[[_F], _F] = flag_option(
    "--json", "as_json", envvar="PRELOADER_JSON", help="Print one JSON object on stdout at the end."
)

best_effort_option: Callable[[_F], _F] = flag_option(
    "--best-effort",
    envvar="PRELOADER_BEST_EFFORT",
    help="Always exit 0 (log what went wrong): a failing postStart hook kills the container.",
)


start_min_rate_option: Callable[[_F], _F] = option(
    "--start-min-rate",
    envvar="PRELOADER_START_MIN_RATE",
    type=Size(),
    default="0",
    metavar="BYTES_PER_S",
    help="A rate (bytes a second: 200MiB) the node's storage never reads below; a mount not "
    "measured yet is estimated at it, so /startz opens at once if the plan could not take "
    "longer than --start-lead at it (opened_by 'floor'). Default 0: no floor.",
)


def lock_option(what: str) -> Callable[[_F], _F]:
    """``--lock``/``PRELOADER_LOCK``: ``what`` the command pins and when, then the cost."""
    return flag_option(
        "--lock",
        envvar="PRELOADER_LOCK",
        help=what + " Pinned pages count against the container's memory limit. Needs "
        "CAP_IPC_LOCK (Kubernetes: securityContext.capabilities.add: [IPC_LOCK]) or "
        "RLIMIT_MEMLOCK above the plan's bytes.",
    )


def timeout_option(help: str, envvar: str = "PRELOADER_TIMEOUT") -> Callable[[_F], _F]:
    """``--timeout`` in seconds, 0 for none."""
    return number_option("--timeout", envvar, 0, help)


log_options: Callable[[_F], _F] = _stack(
    [
        choice_option(
            "--log-level",
            "PRELOADER_LOG_LEVEL",
            LEVELS,
            "info",
            "Least severe log level to print (logs go to stderr).",
        ),
        choice_option(
            "--log-format",
            "PRELOADER_LOG_FORMAT",
            FORMATS,
            "auto",
            "console (human), json (one object a line), auto (console on a TTY).",
        ),
        flag_option(
            "--debug",
            envvar="PRELOADER_DEBUG",
            help="Show Python tracebacks for unexpected errors.",
        ),
    ]
)
"""The group's ``--log-level``, ``--log-format`` and ``--debug``."""
