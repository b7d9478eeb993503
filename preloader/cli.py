"""The command line: translate flags and environment into settings, run, report.

Only this module (and the other front ends) print. Every option has a ``PRELOADER_*``
environment twin; the command line wins over the environment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.to_thread
import click

from . import api, errors
from ._version import __version__
from .budget import (
    DEFAULT_HEADROOM,
    ON_OVERFLOW_POLICIES,
    BudgetCheck,
    Headroom,
    check_plan,
    parse_headroom,
)
from .config import (
    DEFAULT_CHUNK_SIZE,
    Selection,
    ServeConfig,
    WaitConfig,
    WarmConfig,
    parse_concurrency,
    resolve_selection,
)
from .engine import (
    EngineEvent,
    ResidencyReport,
    WarmOptions,
    WarmProgress,
    WarmReport,
    cancel_after_stop,
)
from .logs import FORMATS, LEVELS, configure, get_logger
from .pinning import memlock_permission
from .planner import Plan, printable
from .progress import show_progress
from .startgate import parse_start_lead
from .units import format_bytes, parse_size

__all__ = ["cli", "main", "warm_exit_code"]

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

EXIT_CODES_HELP = (
    "Exit codes: 0 ok or nothing to do (MODEL_DIR unset or missing), 1 internal error, "
    "2 bad usage or input, 3 read errors, 4 resident share below --min-resident, "
    "5 --timeout reached, 6 residency unverifiable with --require-verified, "
    "7 over the memory budget with --on-overflow fail, 8 incomplete model (missing shards), "
    "9 --lock not permitted, 130 interrupted by SIGINT/SIGTERM."
)


class _Size(click.ParamType):  # type: ignore[type-arg]
    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


def _selection_options(func: _F) -> _F:
    """PATH arguments plus the options every command uses to pick files."""
    decorators = [
        # readable=False: an unreadable PATH is a read error the walk names (exit 3),
        # as for MODEL_DIR, not a usage error with click's multi-line usage text.
        click.argument("paths", nargs=-1, type=click.Path(readable=False), metavar="[PATH]..."),
        click.option(
            "--model-dir",
            envvar="MODEL_DIR",
            hidden=True,
            help="Default root when no PATH is given (the reference name).",
        ),
        click.option(
            "--path",
            "env_paths",
            multiple=True,
            type=click.Path(readable=False),
            envvar="PRELOADER_PATHS",
            show_envvar=True,
            help="Extra root, repeatable; in the environment ':'-separated. Used, with "
            "MODEL_DIR, only when no PATH argument is given.",
        ),
        click.option(
            "--include",
            multiple=True,
            envvar="PRELOADER_INCLUDE",
            show_envvar=True,
            metavar="GLOB",
            help="Only files matching GLOB (repeatable; whitespace-separated in the "
            "environment). A GLOB without '/' matches the file name, with '/' the path "
            "relative to the root.",
        ),
        click.option(
            "--exclude",
            multiple=True,
            envvar="PRELOADER_EXCLUDE",
            show_envvar=True,
            metavar="GLOB",
            help="Skip files and directories matching GLOB (repeatable).",
        ),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


class _HeadroomType(click.ParamType):  # type: ignore[type-arg]
    name = "SIZE|PCT"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Headroom:
        if isinstance(value, Headroom):
            return value
        try:
            return parse_headroom(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


def _formats_option(func: _F) -> _F:
    return click.option(
        "--all-formats",
        is_flag=True,
        envvar="PRELOADER_ALL_FORMATS",
        show_envvar=True,
        help="Warm every format: PyTorch .bin/.pt/.pth beside safetensors, safetensors "
        "the index does not name, and every GGUF model of a folder (default: only what "
        "sglang, vLLM and llama.cpp load).",
    )(func)


def _budget_options(func: _F) -> _F:
    decorators = [
        click.option(
            "--on-overflow",
            type=click.Choice(ON_OVERFLOW_POLICIES),
            default="trim",
            show_default=True,
            envvar="PRELOADER_ON_OVERFLOW",
            show_envvar=True,
            help="When the plan needs more page cache than the memory budget (cgroup limit "
            "minus usage, capped by MemAvailable, minus --headroom) allows: trim warms the "
            "plan in order up to the budget and reports what stays cold; fail exits 7 "
            "before reading; warn reads everything.",
        ),
        click.option(
            "--headroom",
            type=_HeadroomType(),
            default=None,
            show_default="5% of the limit, 64MiB to 1GiB",
            envvar="PRELOADER_HEADROOM",
            show_envvar=True,
            help="Memory kept free below the budget: a size (256MiB) or a share of the "
            "limit (10%).",
        ),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def _json_option(func: _F) -> _F:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        envvar="PRELOADER_JSON",
        show_envvar=True,
        help="Print one JSON object on stdout at the end.",
    )(func)


def _selection(
    paths: Sequence[str],
    model_dir: str | None,
    env_paths: Sequence[str],
    include: Sequence[str],
    exclude: Sequence[str],
    all_formats: bool = False,
) -> Selection:
    return resolve_selection(paths, model_dir, env_paths, include, exclude, all_formats)


def _print_json(document: dict[str, object]) -> None:
    click.echo(json.dumps(document, sort_keys=False))


# After the first SIGINT/SIGTERM, the body has this long to return its report before it
# is cancelled; a second signal cancels at once. Well inside Kubernetes' default 30 s
# termination grace period.
SHUTDOWN_GRACE_SECONDS = 5.0


def _ignore_signal(signum: int, frame: object) -> None:
    """A signal after the run: the process is about to exit with its summary anyway."""


async def _run_with_signals(
    body: Callable[[threading.Event], Awaitable[_T]], stop: threading.Event
) -> tuple[_T | None, int | None]:
    """Run ``body(stop)``; the first SIGINT/SIGTERM sets ``stop``, a second one cancels.

    The body is also cancelled :data:`SHUTDOWN_GRACE_SECONDS` after the first signal, so a
    stop always ends in bounded time whatever the storage does.

    :return: the body's result (``None`` if cancelled) and the signal received, if any.
    """
    received: list[int] = []
    result: list[_T] = []

    async def cancel_later(scope: anyio.CancelScope) -> None:
        await anyio.sleep(SHUTDOWN_GRACE_SECONDS)
        get_logger().error("stop grace ran out", seconds=SHUTDOWN_GRACE_SECONDS)
        scope.cancel()

    async def watch(scope: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                task_status.started()
                async for signum in signals:
                    received.append(signum)
                    log = get_logger()
                    if len(received) == 1:
                        log.warning("stopping", signal=signal.Signals(signum).name)
                        stop.set()
                        group.start_soon(cancel_later, scope)
                    else:
                        log.warning("stopping now", signal=signal.Signals(signum).name)
                        scope.cancel()
        finally:
            # The receiver put back the default dispositions (die; KeyboardInterrupt).
            # Until the process exits, a further signal must not cut the summary short.
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, _ignore_signal)

    async with anyio.create_task_group() as group:
        # Handlers in place before the body starts: a signal during planning counts.
        await group.start(watch, group.cancel_scope)
        result.append(await body(stop))
        group.cancel_scope.cancel()
    return (result[0] if result else None), (received[0] if received else None)


async def _plan_until_stopped(selection: Selection, stop: threading.Event) -> Plan | None:
    """Walk the selection in a worker thread; ``None`` when a stop came first.

    In a thread, so signals are seen while a walk waits on slow storage; abandoned on
    stop, because a ``readdir`` stuck in the kernel cannot be interrupted.
    """
    plan: list[Plan] = []
    async with anyio.create_task_group() as group:
        group.start_soon(cancel_after_stop, stop, group.cancel_scope, 0.0)
        plan.append(
            await anyio.to_thread.run_sync(
                lambda: api.plan(
                    selection.paths,
                    include=selection.include,
                    exclude=selection.exclude,
                    all_formats=selection.all_formats,
                ),
                abandon_on_cancel=True,
            )
        )
        group.cancel_scope.cancel()
    return plan[0] if plan else None


def _log_plan_problems(plan: Plan, log: Any) -> None:
    for skipped in plan.skipped:
        if skipped.error:
            log.error("cannot read", path=printable(skipped.path), cause=skipped.reason)
        else:
            log.warning("skipped", path=printable(skipped.path), reason=skipped.reason)
    if not plan.files:
        log.warning("no files found", paths=[printable(p) for p in plan.roots])


def _finish(code: int) -> None:
    """Exit with ``code``; never wait on a worker thread stuck in a stalled read."""
    sys.stdout.flush()
    sys.stderr.flush()
    if threading.active_count() > 1:
        os._exit(code)
    sys.exit(code)


def warm_exit_code(report: WarmReport, config: WarmConfig) -> int:
    """The exit code for a finished warm pass, before ``--best-effort`` applies.

    The first that applies wins: interrupted, timed out, read errors, residency
    unverifiable (only with ``--require-verified``), resident share too low.
    """
    if report.interrupted:
        return errors.EXIT_INTERRUPTED
    if report.timed_out:
        return errors.EXIT_TIMEOUT
    if report.errors or report.walk_errors:
        return errors.EXIT_READ_ERRORS
    ratio = report.resident_ratio
    if ratio is None:
        return errors.EXIT_UNVERIFIED if config.require_verified else errors.EXIT_OK
    if ratio < config.min_resident:
        return errors.EXIT_NOT_RESIDENT
    return errors.EXIT_OK


def _log_event(log: Any, event: EngineEvent) -> None:
    if event.kind == "file_error":
        log.error("read failed", path=printable(event.path), cause=event.detail)
    elif event.kind == "not_resident":
        log.warning("not resident", path=printable(event.path), cause=event.detail)
    elif event.kind == "method_fallback":
        log.info("read method fallback", path=printable(event.path), detail=event.detail)
    elif event.kind == "concurrency":
        log.info("concurrency", detail=event.detail)
    elif event.kind == "state":
        log.debug("state", state=event.detail)


@click.group(context_settings=CONTEXT, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, "-V", "--version", prog_name="preloader")
@click.option(
    "--log-level",
    type=click.Choice(LEVELS),
    default="info",
    show_default=True,
    envvar="PRELOADER_LOG_LEVEL",
    show_envvar=True,
    help="Least severe log level to print (logs go to stderr).",
)
@click.option(
    "--log-format",
    type=click.Choice(FORMATS),
    default="auto",
    show_default=True,
    envvar="PRELOADER_LOG_FORMAT",
    show_envvar=True,
    help="console (human), json (one object a line), auto (console on a TTY).",
)
@click.option(
    "--debug",
    is_flag=True,
    envvar="PRELOADER_DEBUG",
    show_envvar=True,
    help="Show Python tracebacks for unexpected errors.",
)
@click.pass_context
def cli(ctx: click.Context, log_level: str, log_format: str, debug: bool) -> None:
    """Make model weight files resident in the Linux page cache, and prove it.

    A drop-in for the postStart one-liner `find $MODEL_DIR -type f | xargs -P
    $PRELOADER_CONC cat > /dev/null`: zero-copy chunked reads, residency verified by
    cachestat(2), progress, clear errors.
    """
    configure(log_level, log_format)
    ctx.obj = {"debug": debug}


def _read_options(chunk_help: str, method_help: str) -> Callable[[_F], _F]:
    """How to read: ``-c``, ``--chunk-size``, ``--method``, ``--read-timeout`` (warm, serve)."""
    decorators = [
        click.option(
            "-c",
            "--concurrency",
            envvar="PRELOADER_CONC",
            show_envvar=True,
            default="4",
            show_default=True,
            metavar="N|auto",
            help="Chunks read in parallel; 'auto' raises it while throughput still grows.",
        ),
        click.option(
            "--chunk-size",
            type=_Size(),
            default=DEFAULT_CHUNK_SIZE,
            show_default="64MiB",
            envvar="PRELOADER_CHUNK_SIZE",
            show_envvar=True,
            help=chunk_help,
        ),
        click.option(
            "--method",
            type=click.Choice(["auto", "sendfile", "mmap", "read"]),
            default="auto",
            show_default=True,
            envvar="PRELOADER_METHOD",
            show_envvar=True,
            help=method_help,
        ),
        click.option(
            "--read-timeout",
            type=click.FloatRange(min=0),
            default=600,
            show_default=True,
            envvar="PRELOADER_READ_TIMEOUT",
            show_envvar=True,
            help="Give up a file whose chunk read stalls this many seconds (0: never).",
        ),
    ]

    def apply(func: _F) -> _F:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


@cli.command(epilog=EXIT_CODES_HELP)
@_selection_options
@_read_options(
    chunk_help="Bytes per chunk (1048576, 64MiB, 1G); files larger than this are read by "
    "several workers at once.",
    method_help="How to read: sendfile to /dev/null (zero-copy, the default), mmap + "
    "MADV_POPULATE_READ (zero-copy), or read (copies; works everywhere). A filesystem "
    "that refuses one falls back to read.",
)
@click.option(
    "--min-resident",
    type=click.FloatRange(0.0, 1.0),
    default=0.99,
    show_default=True,
    envvar="PRELOADER_MIN_RESIDENT",
    show_envvar=True,
    help="Exit 4 when less than this share of the bytes is resident after warming.",
)
@click.option(
    "--require-verified",
    is_flag=True,
    envvar="PRELOADER_REQUIRE_VERIFIED",
    show_envvar=True,
    help="Exit 6 when residency cannot be measured truthfully (the process neither owns "
    "the files nor holds CAP_FOWNER). Without it, a finished read pass counts, flagged "
    "as unverified.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    envvar="PRELOADER_TIMEOUT",
    show_envvar=True,
    help="Stop the read pass after this many seconds (0: never) and exit 5 with a "
    "summary. Kubernetes gives exec hooks no timeout of their own.",
)
@click.option(
    "--best-effort",
    is_flag=True,
    envvar="PRELOADER_BEST_EFFORT",
    show_envvar=True,
    help="Always exit 0 (log what went wrong): a failing postStart hook kills the container.",
)
@_json_option
@click.option(
    "--progress/--no-progress",
    default=None,
    envvar="PRELOADER_PROGRESS",
    show_envvar=True,
    help="Progress bar on stderr. Default: a bar on a terminal, else a log line every "
    "--progress-interval seconds.",
)
@click.option(
    "--progress-interval",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    envvar="PRELOADER_PROGRESS_INTERVAL",
    show_envvar=True,
    help="Seconds between progress log lines when there is no bar (0: none).",
)
@_formats_option
@_budget_options
@click.option(
    "--lock",
    is_flag=True,
    envvar="PRELOADER_LOCK",
    show_envvar=True,
    help="After warming, pin the pages with mmap + mlock (like vmtouch -l) and keep "
    "running until SIGTERM/SIGINT, then release them and exit. Needs CAP_IPC_LOCK or "
    "RLIMIT_MEMLOCK above the plan's size (exit 9 otherwise). Never in a postStart hook.",
)
@click.pass_context
def warm(
    ctx: click.Context,
    paths: tuple[str, ...],
    model_dir: str | None,
    env_paths: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    concurrency: str,
    chunk_size: int,
    method: str,
    min_resident: float,
    require_verified: bool,
    timeout: float,
    read_timeout: float,
    best_effort: bool,
    as_json: bool,
    progress: bool | None,
    progress_interval: float,
    all_formats: bool,
    on_overflow: str,
    headroom: Headroom | None,
    lock: bool,
) -> None:
    """Read every file under PATH (default $MODEL_DIR) into the page cache and verify.

    Files are read in plan order (config and tokenizer first, then shards front to
    back), cut into chunks so one huge file gets every worker. Residency is checked
    afterwards with cachestat(2); files that did not stay cached are named with the cause.
    """
    log = get_logger()
    try:
        config = WarmConfig(
            selection=_selection(paths, model_dir, env_paths, include, exclude, all_formats),
            options=WarmOptions(
                concurrency=parse_concurrency(concurrency),
                chunk_size=chunk_size,
                method=method,
                timeout=timeout or None,
                read_timeout=read_timeout or None,
            ),
            min_resident=min_resident,
            best_effort=best_effort,
            require_verified=require_verified,
            json=as_json,
            progress=progress,
            progress_interval=progress_interval,
            on_overflow=on_overflow,
            headroom=headroom or DEFAULT_HEADROOM,
            lock=lock,
        )
    except (errors.UsageError, ValueError) as err:
        _usage_failure(log, str(err), best_effort, as_json)
        return
    _finish(_guard(ctx, lambda: _run_warm(config, log)))


def _usage_failure(log: Any, message: str, best_effort: bool, as_json: bool) -> None:
    log.error("bad input", error=message)
    code = errors.EXIT_OK if best_effort else errors.EXIT_USAGE
    if as_json:
        _print_json({"error": message, "exit_code": code})
    _finish(code)


def _guard(ctx: click.Context, func: Callable[[], int]) -> int:
    """Turn unexpected exceptions into one log line and exit 1 (traceback with --debug)."""
    try:
        return func()
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


def _run_warm(config: WarmConfig, log: Any) -> int:
    selection = config.selection
    if selection.skip_reason is not None:
        log.info("skipped", reason=selection.skip_reason)
        if config.json:
            _print_json(
                {
                    "files": 0,
                    "bytes": 0,
                    "resident_bytes": 0,
                    "seconds": 0.0,
                    "errors": 0,
                    "skipped_reason": selection.skip_reason,
                    "exit_code": 0,
                }
            )
        return errors.EXIT_OK

    progress = WarmProgress()
    held: list[int] = []  # the exit code, once a --lock run printed its summary
    refused: list[int] = []  # the exit code of a refusal before reading
    extras: dict[str, object] = {}

    async def body(stop: threading.Event) -> WarmReport | None:
        # Planning and the budget check run inside the signal window: a stop while a walk
        # hangs on storage ends the run instead of waiting for it.
        log.info("planning", paths=[printable(p) for p in selection.paths])
        the_plan = await _plan_until_stopped(selection, stop)
        if the_plan is None:
            return None
        try:
            check = await _prepare(the_plan, config.on_overflow, config.headroom, log)
            if check.over_budget and config.on_overflow == "fail":
                raise errors.OverBudgetError(
                    check.message() + "; raise the memory limit, narrow the plan with "
                    "--include, or use --on-overflow trim"
                )
            if config.lock:
                refusal = memlock_permission().refusal(check.plan.total_bytes)
                if refusal is not None:
                    raise errors.LockRefusedError(refusal)
        except errors.PreloaderError as err:
            refused.append(_refuse(err, config, log))
            return None
        extras.update(_plan_extras(the_plan, check))
        warm_plan = check.plan
        log.info(
            "warming",
            paths=[printable(p) for p in selection.paths],
            files=len(warm_plan.files),
            bytes=warm_plan.total_bytes,
            size=format_bytes(warm_plan.total_bytes),
        )
        async with anyio.create_task_group() as display:
            display.start_soon(
                show_progress, progress, log, config.progress, config.progress_interval
            )
            report = await api.warm(
                warm_plan,
                concurrency=config.options.concurrency,
                chunk_size=config.options.chunk_size,
                method=config.options.method,
                timeout=config.options.timeout,
                read_timeout=config.options.read_timeout,
                progress=progress,
                on_event=lambda event: _log_event(log, event),
                stop=stop,
            )
            display.cancel_scope.cancel()
        if config.lock and not stop.is_set():
            await _hold_pinned(report, warm_plan, config, extras, held, stop, log)
        return report

    report, signum = anyio.run(_run_with_signals, body, threading.Event())
    if refused:
        return refused[0]
    if report is None:
        _summarise_stopped(progress, config, log, signum)
        return errors.EXIT_OK if config.best_effort else errors.EXIT_INTERRUPTED
    if held:
        return errors.EXIT_OK if config.best_effort else held[0]
    code = warm_exit_code(report, config)
    if config.lock and "lock_error" in extras:
        code = code or errors.EXIT_LOCK_REFUSED
    _summarise(report, config, code, log, extras)
    return errors.EXIT_OK if config.best_effort else code


def _summarise_stopped(
    progress: WarmProgress, config: WarmConfig, log: Any, signum: int | None
) -> None:
    """The summary when a stop cut the run short of a report: what the counters saw."""
    code = errors.EXIT_OK if config.best_effort else errors.EXIT_INTERRUPTED
    fields: dict[str, object] = {
        "state": progress.state,
        "files": progress.files_total,
        "files_done": progress.files_done,
        "bytes": progress.bytes_total,
        "read_bytes": progress.bytes_read,
        "errors": progress.errors,
        "seconds": round(progress.elapsed, 2),
        "signal": signal.Signals(signum).name if signum else None,
        "exit_code": code,
    }
    log.error("stopped before the pass could finish; residency not measured", **fields)
    if config.json:
        _print_json(
            {
                "files": progress.files_total,
                "bytes": progress.bytes_total,
                "read_bytes": progress.bytes_read,
                "resident_bytes": None,
                "resident_ratio": None,
                "residency_unknown_reason": f"stopped while {progress.state}, before "
                "residency was measured",
                "seconds": round(progress.elapsed, 6),
                "errors": progress.errors,
                "error_details": [],
                "state": progress.state,
                "timed_out": False,
                "interrupted": True,
                "exit_code": code,
                "paths": list(config.selection.paths),
                "version": __version__,
            }
        )


async def _prepare(the_plan: Plan, on_overflow: str, headroom: Headroom, log: Any) -> BudgetCheck:
    """Log what the plan skipped and chose, refuse an incomplete model, check the budget.

    :raises errors.IncompleteModelError: when an index or split set names missing files.
    """
    _log_plan_problems(the_plan, log)
    for choice in the_plan.choices:
        log.warning(
            "several models in one folder",
            directory=printable(choice.directory),
            chosen=printable(choice.chosen),
            candidates=[printable(c) for c in choice.candidates],
            reason=choice.reason,
        )
    for problem in the_plan.problems:
        if not problem.fatal:
            log.warning("odd model layout", path=printable(problem.path), problem=problem.message)
    fatal = [problem for problem in the_plan.problems if problem.fatal]
    if fatal:
        for problem in fatal:
            log.error("incomplete model", path=printable(problem.path), problem=problem.message)
        raise errors.IncompleteModelError(f"{printable(fatal[0].path)}: {fatal[0].message}")
    check = await api.check_budget(the_plan, on_overflow=on_overflow, headroom=headroom)
    _log_budget(check, log)
    return check


def _log_budget(check: BudgetCheck, log: Any) -> None:
    budget = check.budget
    fields: dict[str, object] = {
        "need_bytes": check.need_bytes,
        "allowance_bytes": check.allowance_bytes,
        "headroom_bytes": check.headroom_bytes,
        "limited_by": budget.limited_by,
        "budget": budget.describe(),
    }
    if check.allowance_bytes is None:
        log.info("memory budget unknown", notes=list(budget.notes), **fields)
    elif not check.over_budget:
        log.info("memory budget", **fields)
    elif check.policy == "trim":
        for cold in check.cold:
            log.info("stays cold", path=printable(cold.path), offset=cold.offset, bytes=cold.length)
        log.warning(
            "over memory budget: trimming the plan",
            warming_bytes=check.plan.total_bytes,
            cold_bytes=check.cold_bytes,
            cold_files=len(check.cold),
            **fields,
        )
    elif check.policy == "warn":
        log.warning(
            "over memory budget: reading everything (--on-overflow warn); pages read first "
            "may be reclaimed before the server loads them",
            **fields,
        )


def _plan_extras(the_plan: Plan, check: BudgetCheck) -> dict[str, object]:
    """The ``--json`` keys this module adds about formats and the budget."""
    return {
        "budget": check.to_json(),
        "cold": [c.to_json() for c in check.cold],
        "cold_bytes": check.cold_bytes,
        "choices": [c.to_json() for c in the_plan.choices],
        "problems": [p.to_json() for p in the_plan.problems],
    }


def _refuse(err: errors.PreloaderError, config: WarmConfig, log: Any) -> int:
    """Report a refusal before reading: one line, ``--json``, the exit code."""
    log.error("refused", error=str(err), exit_code=err.exit_code)
    code = errors.EXIT_OK if config.best_effort else err.exit_code
    if config.best_effort:
        log.warning("best effort: exiting 0", would_exit=err.exit_code)
    if config.json:
        _print_json({"error": str(err), "exit_code": code, "version": __version__})
    return code


async def _hold_pinned(
    report: WarmReport,
    warm_plan: Plan,
    config: WarmConfig,
    extras: dict[str, object],
    held: list[int],
    stop: threading.Event,
    log: Any,
) -> None:
    """Pin the warmed pages, print the summary, hold them until a signal, release."""
    try:
        pins = await api.pin(warm_plan)
    except errors.LockRefusedError as err:
        log.error("cannot lock", error=str(err), exit_code=err.exit_code)
        extras["lock_error"] = str(err)
        extras["pinned_bytes"] = 0
        return
    code = warm_exit_code(report, config)
    extras["pinned_bytes"] = pins.pinned_bytes
    extras["pinned_files"] = len(pins.pins)
    _summarise(report, config, code, log, extras)
    held.append(code)
    log.info(
        "pinned: holding the pages until SIGTERM or SIGINT",
        pinned_bytes=pins.pinned_bytes,
        size=format_bytes(pins.pinned_bytes),
        files=len(pins.pins),
        pid=os.getpid(),
    )
    try:
        await anyio.to_thread.run_sync(stop.wait, abandon_on_cancel=True)
    finally:
        released = pins.release()
        log.info("released pinned pages", bytes=released)


def _summarise(
    report: WarmReport,
    config: WarmConfig,
    code: int,
    log: Any,
    extras: dict[str, object] | None = None,
) -> None:
    extras = extras or {}
    rate = report.read_bytes / report.seconds if report.seconds > 0 else 0.0
    ratio = report.resident_ratio
    fields: dict[str, object] = {
        "files": len(report.files),
        "bytes": report.bytes,
        "size": format_bytes(report.bytes),
        "resident": f"{ratio:.1%}" if ratio is not None else "unknown",
        "seconds": round(report.seconds, 2),
        "rate": f"{format_bytes(rate)}/s",
        "cpu_seconds": round(report.cpu_seconds, 2),
        "concurrency": report.concurrency,
        "errors": len(report.errors) + len(report.walk_errors),
        "exit_code": code,
    }
    if extras.get("cold_bytes"):
        fields["cold_bytes"] = extras["cold_bytes"]
    if "pinned_bytes" in extras:
        fields["pinned_bytes"] = extras["pinned_bytes"]
    if ratio is None:
        fields["unverified"] = report.residency_unknown_reason
        log.warning("warm finished, residency unverified", **fields)
    elif code == errors.EXIT_OK:
        log.info("warm finished", **fields)
    else:
        log.error("warm finished with problems", **fields)
    if config.best_effort and code != errors.EXIT_OK:
        log.warning("best effort: exiting 0", would_exit=code)
    if config.json:
        document = report.to_json()
        document.update(extras)
        document["exit_code"] = errors.EXIT_OK if config.best_effort else code
        document["paths"] = list(config.selection.paths)
        document["version"] = __version__
        _print_json(document)


def _residency_lines(report: ResidencyReport, per_file: bool) -> list[str]:
    lines = []
    if per_file:
        lines.append(f"{'RESIDENT':>12} {'SIZE':>12} {'%':>7}  FILE")
        for item in report.files:
            ratio = item.resident_ratio
            resident = format_bytes(item.resident_bytes) if item.resident_bytes is not None else "?"
            percent = f"{ratio:.1%}" if ratio is not None else "unknown"
            lines.append(
                f"{resident:>12} {format_bytes(item.size):>12} {percent:>7}  {printable(item.path)}"
            )
    total = report.resident_bytes
    ratio = report.resident_ratio
    lines.append(
        f"{format_bytes(total) if total is not None else '?':>12} {format_bytes(report.bytes):>12} "
        f"{f'{ratio:.1%}' if ratio is not None else 'unknown':>7}  "
        f"total ({len(report.files)} files)"
    )
    if report.residency_unknown_reason:
        lines.append(f"residency unknown: {report.residency_unknown_reason}")
    return lines


@cli.command(epilog=EXIT_CODES_HELP)
@_selection_options
@_json_option
@click.option("--summary", is_flag=True, help="Print only the total line, not one line a file.")
@_formats_option
@click.pass_context
def status(
    ctx: click.Context,
    paths: tuple[str, ...],
    model_dir: str | None,
    env_paths: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    as_json: bool,
    summary: bool,
    all_formats: bool,
) -> None:
    """Show how much of each file under PATH is in the page cache (like fincore).

    Residency the kernel will not reveal truthfully (files the process neither owns nor
    may write) is shown as unknown, never guessed. The last line is the memory budget
    (cgroup limit and usage, MemAvailable) and whether the cold rest would fit in it.
    """
    _finish(
        _guard(
            ctx,
            lambda: _run_residency(
                _selection(paths, model_dir, env_paths, include, exclude, all_formats),
                as_json,
                summary,
                evict=False,
            ),
        )
    )


@cli.command(epilog=EXIT_CODES_HELP)
@_selection_options
@_json_option
@_formats_option
@click.pass_context
def evict(
    ctx: click.Context,
    paths: tuple[str, ...],
    model_dir: str | None,
    env_paths: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    as_json: bool,
    all_formats: bool,
) -> None:
    """Drop the cached pages of every file under PATH (POSIX_FADV_DONTNEED).

    Pages that are dirty or mapped by a running process stay; the files are not changed.
    """
    _finish(
        _guard(
            ctx,
            lambda: _run_residency(
                _selection(paths, model_dir, env_paths, include, exclude, all_formats),
                as_json,
                True,
                evict=True,
            ),
        )
    )


@cli.command("plan", epilog=EXIT_CODES_HELP)
@_selection_options
@_json_option
@_formats_option
@_budget_options
@click.pass_context
def plan_command(
    ctx: click.Context,
    paths: tuple[str, ...],
    model_dir: str | None,
    env_paths: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    as_json: bool,
    all_formats: bool,
    on_overflow: str,
    headroom: Headroom | None,
) -> None:
    """Dry run: what `warm` would read under PATH, in which order, what it skips and why.

    Nothing is read but the safetensors index. Shows sizes, the GGUF model chosen in a
    folder of several, shards an index names but the folder lacks (exit 8), and the
    memory budget with what would stay cold under --on-overflow trim.
    """
    _finish(
        _guard(
            ctx,
            lambda: _run_plan(
                _selection(paths, model_dir, env_paths, include, exclude, all_formats),
                as_json,
                on_overflow,
                headroom or DEFAULT_HEADROOM,
            ),
        )
    )


def _run_plan(selection: Selection, as_json: bool, on_overflow: str, headroom: Headroom) -> int:
    if selection.skip_reason is not None:
        get_logger().info("skipped", reason=selection.skip_reason)
        if as_json:
            _print_json({"files": [], "bytes": 0, "skipped_reason": selection.skip_reason})
        return errors.EXIT_OK
    the_plan = api.plan(
        selection.paths,
        include=selection.include,
        exclude=selection.exclude,
        all_formats=selection.all_formats,
    )
    check: BudgetCheck = anyio.run(
        lambda: api.check_budget(the_plan, on_overflow=on_overflow, headroom=headroom)
    )
    code = (
        errors.EXIT_INCOMPLETE_MODEL if any(p.fatal for p in the_plan.problems) else errors.EXIT_OK
    )
    if as_json:
        document: dict[str, object] = {
            "paths": list(selection.paths),
            "files": [
                {"path": f.path, "bytes": f.size, "metadata": f.metadata} for f in check.plan.files
            ],
            "bytes": check.plan.total_bytes,
            "skipped": [
                {"path": s.path, "reason": s.reason, "bytes": s.size} for s in the_plan.skipped
            ],
        }
        document.update(_plan_extras(the_plan, check))
        document["exit_code"] = code
        _print_json(document)
        return code
    for line in _plan_lines(the_plan, check):
        click.echo(line)
    return code


def _plan_lines(the_plan: Plan, check: BudgetCheck) -> list[str]:
    warm_files = check.plan.files
    lines = [
        f"warm {len(warm_files)} files, {format_bytes(check.plan.total_bytes)}, in this order:"
    ]
    full = {f.path: f.size for f in the_plan.files}
    for number, spec in enumerate(warm_files, 1):
        part = (
            f" (first {format_bytes(spec.size)} of {format_bytes(full[spec.path])})"
            if (full.get(spec.path, spec.size) != spec.size)
            else ""
        )
        lines.append(f"{number:>5} {format_bytes(spec.size):>12}  {printable(spec.path)}{part}")
    if the_plan.skipped:
        lines.append(f"skip {len(the_plan.skipped)}:")
        for skipped in the_plan.skipped:
            size = format_bytes(skipped.size) if skipped.size is not None else "-"
            lines.append(f"      {size:>12}  {printable(skipped.path)}: {skipped.reason}")
    for choice in the_plan.choices:
        lines.append(
            f"chose {printable(choice.chosen)} of {len(choice.candidates)} models in "
            f"{printable(choice.directory)}: {choice.reason}"
        )
    for problem in the_plan.problems:
        label = "INCOMPLETE" if problem.fatal else "WARNING"
        lines.append(f"{label} {printable(problem.path)}: {problem.message}")
    lines.append(
        f"memory budget: {check.budget.describe()}; needs {format_bytes(check.need_bytes)}, "
        + (
            f"allows {format_bytes(check.allowance_bytes)} after "
            f"{format_bytes(check.headroom_bytes)} headroom"
            if check.allowance_bytes is not None
            else "budget unknown"
        )
    )
    if check.cold:
        lines.append(
            f"stays cold under --on-overflow trim: {format_bytes(check.cold_bytes)} in "
            f"{len(check.cold)} files:"
        )
        for cold in check.cold:
            where = f" from byte {cold.offset}" if cold.offset else ""
            lines.append(f"      {format_bytes(cold.length):>12}  {printable(cold.path)}{where}")
    elif check.over_budget:
        action = "exit 7 before reading" if check.policy == "fail" else "read everything anyway"
        lines.append(f"over budget: --on-overflow {check.policy} would {action}")
    return lines


def _run_residency(selection: Selection, as_json: bool, summary: bool, evict: bool) -> int:
    log = get_logger()
    if selection.skip_reason is not None:
        log.info("skipped", reason=selection.skip_reason)
        if as_json:
            _print_json(
                {
                    "files": 0,
                    "bytes": 0,
                    "resident_bytes": 0,
                    "skipped_reason": selection.skip_reason,
                    "per_file": [],
                }
            )
        return errors.EXIT_OK
    plan = api.plan(
        selection.paths,
        include=selection.include,
        exclude=selection.exclude,
        all_formats=selection.all_formats,
    )
    _log_plan_problems(plan, log)
    action = api.evict if evict else api.residency
    report: ResidencyReport = anyio.run(lambda: action(plan))
    check = None
    if not evict:
        # What the rest of the model would cost, against the budget right now.
        check = check_plan(
            plan,
            api.memory_budget(),
            "warn",
            DEFAULT_HEADROOM,
            [item.resident_bytes for item in report.files],
        )
    if as_json:
        document = report.to_json()
        if check is not None:
            document["budget"] = check.to_json()
        _print_json(document)
    else:
        for line in _residency_lines(report, per_file=not summary):
            click.echo(line)
        if check is not None:
            click.echo(_budget_line(check))
    if evict:
        log.info(
            "evicted",
            files=len(report.files),
            bytes=report.bytes,
            resident_bytes_after=report.resident_bytes,
        )
    failures = [f for f in report.files if f.reason and f.reason.startswith("cannot")]
    walk_errors = [s for s in plan.skipped if s.error]
    return errors.EXIT_READ_ERRORS if failures or walk_errors else errors.EXIT_OK


@cli.command(epilog=EXIT_CODES_HELP)
@click.option(
    "--size",
    type=_Size(),
    default="1GiB",
    show_default=True,
    envvar="PRELOADER_DEMO_SIZE",
    show_envvar=True,
    help="Total bytes of the synthetic model.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    envvar="PRELOADER_DEMO_DIR",
    show_envvar=True,
    help="Where to write it (default: a new folder under /var/tmp, which is disk-backed "
    "where /tmp may be tmpfs and always resident).",
)
@click.option("--keep", is_flag=True, help="Keep the demo model instead of deleting it.")
@click.option(
    "-c",
    "--concurrency",
    default="4",
    show_default=True,
    metavar="N|auto",
    envvar="PRELOADER_CONC",
    show_envvar=True,
    help="As for warm.",
)
@click.pass_context
def demo(
    ctx: click.Context, size: int, directory: str | None, keep: bool, concurrency: str
) -> None:
    """Build a synthetic safetensors model, evict it, warm it, show residency, clean up."""
    _finish(_guard(ctx, lambda: _run_demo(size, directory, keep, concurrency)))


def _run_demo(size: int, directory: str | None, keep: bool, concurrency: str) -> int:
    from .demo import write_demo_model

    log = get_logger()
    conc = parse_concurrency(concurrency)
    if directory is None:
        base = "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()
        directory = tempfile.mkdtemp(prefix="preloader-demo-", dir=base)
        created = True
    else:
        created = not os.path.exists(directory)
    try:
        log.info("writing demo model", dir=directory, size=format_bytes(size))
        write_demo_model(directory, size)
        before = anyio.run(lambda: api.evict([directory]))
        click.echo(f"after evict: {_ratio_text(before)} resident")
        report = anyio.run(lambda: api.warm([directory], concurrency=conc))
        rate = report.read_bytes / report.seconds if report.seconds > 0 else 0.0
        after = anyio.run(lambda: api.residency([directory]))
        click.echo(
            f"warmed {len(report.files)} files, {format_bytes(report.bytes)} in "
            f"{report.seconds:.2f} s ({format_bytes(rate)}/s, {report.cpu_seconds:.2f} CPU-s)"
        )
        click.echo(f"after warm:  {_ratio_text(after)} resident")
        for line in _residency_lines(after, per_file=True):
            click.echo(line)
        return errors.EXIT_OK if not report.errors else errors.EXIT_READ_ERRORS
    finally:
        if keep:
            click.echo(f"kept demo model in {directory}")
        elif created:
            shutil.rmtree(directory, ignore_errors=True)


def _budget_line(check: BudgetCheck) -> str:
    allowance = check.allowance_bytes
    if allowance is None:
        verdict = "the budget is unknown"
    elif check.over_budget:
        verdict = (
            f"the {format_bytes(check.need_bytes)} not resident exceed it "
            f"(allowance {format_bytes(allowance)} after headroom)"
        )
    else:
        verdict = (
            f"the {format_bytes(check.need_bytes)} not resident fit "
            f"(allowance {format_bytes(allowance)} after headroom)"
        )
    return f"memory budget: {check.budget.describe()}; {verdict}"


def _ratio_text(report: ResidencyReport) -> str:
    ratio = report.resident_ratio
    return f"{ratio:.1%}" if ratio is not None else "unknown"


SERVE_EXIT_CODES_HELP = (
    "Exit codes: 0 stopped by SIGTERM/SIGINT (in-flight requests answered), 1 internal "
    "error, 2 bad usage or input (including an address it cannot listen on)."
)
WAIT_EXIT_CODES_HELP = (
    "Exit codes: 0 the URL answered 200, 2 bad usage (not an http(s) URL), 5 --timeout "
    "reached first, 130 interrupted by SIGINT/SIGTERM."
)


@cli.command(epilog=SERVE_EXIT_CODES_HELP)
@_selection_options
@_read_options(
    chunk_help="Bytes per chunk; also the unit keep-warm measures and re-reads.",
    method_help="How to read (see warm --help).",
)
@click.option(
    "--host",
    default="0.0.0.0",  # noqa: S104 - probes and scrapes come from outside the pod
    show_default=True,
    envvar="PRELOADER_HOST",
    show_envvar=True,
    help="Address to listen on (127.0.0.1 for the pod only, :: for IPv6).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=9400,
    show_default=True,
    envvar="PRELOADER_PORT",
    show_envvar=True,
    help="Port to listen on (0: any free port, logged at start).",
)
@click.option(
    "--ready-ratio",
    type=click.FloatRange(0.0, 1.0),
    default=0.99,
    show_default=True,
    envvar="PRELOADER_READY_RATIO",
    show_envvar=True,
    help="/readyz answers 200 once the first pass is over and at least this share of "
    "every path's bytes is resident.",
)
@click.option(
    "--ready-latch/--no-ready-latch",
    default=True,
    show_default=True,
    envvar="PRELOADER_READY_LATCH",
    show_envvar=True,
    help="Once ready, stay ready even if pages are lost later (the server has loaded "
    "its weights by then). --no-ready-latch makes /readyz follow residency.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    envvar="PRELOADER_TIMEOUT",
    show_envvar=True,
    help="Seconds from start after which --timeout-policy decides readiness (0: no "
    "deadline). Reading goes on either way.",
)
@click.option(
    "--timeout-policy",
    type=click.Choice(["ready", "unready"]),
    default="ready",
    show_default=True,
    envvar="PRELOADER_TIMEOUT_POLICY",
    show_envvar=True,
    help="At the deadline: 'ready' opens the gate anyway (an error log line and "
    "preloader_timed_out 1), so slow storage never blocks a rollout for ever; 'unready' "
    "keeps it closed.",
)
@click.option(
    "--start-lead",
    metavar="SECONDS",
    default="0",
    show_default=True,
    envvar="PRELOADER_START_LEAD",
    show_envvar=True,
    help="/startz (the server container's startupProbe) opens once the first pass's "
    "estimated time left (bytes left over the read rate of the last 20 s; no estimate "
    "before 2 s of reading) is at most this, so the server's own start-up overlaps the "
    "warm-up's tail; it also opens with /readyz, and at --timeout under policy 'ready'. "
    "0: together with /readyz. Set it to about the server's start-up time.",
)
@click.option(
    "--recheck-seconds",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    envvar="PRELOADER_RECHECK_SECONDS",
    show_envvar=True,
    help="Keep-warm: measure residency chunk by chunk this often and re-read only the "
    "chunks that lost pages (0: keep-warm off).",
)
@click.option(
    "--max-backoff",
    type=click.FloatRange(min=0),
    default=900.0,
    show_default=True,
    envvar="PRELOADER_MAX_BACKOFF_SECONDS",
    show_envvar=True,
    help="Longest keep-warm interval: while the same pages keep being lost, the interval "
    "doubles up to this (state 'degraded').",
)
@click.pass_context
def serve(
    ctx: click.Context,
    paths: tuple[str, ...],
    model_dir: str | None,
    env_paths: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    concurrency: str,
    chunk_size: int,
    method: str,
    read_timeout: float,
    host: str,
    port: int,
    ready_ratio: float,
    ready_latch: bool,
    timeout: float,
    timeout_policy: str,
    start_lead: str,
    recheck_seconds: float,
    max_backoff: float,
) -> None:
    """Sidecar: warm PATH (default $MODEL_DIR and --path), gate /startz and /readyz, keep warm.

    Serves /healthz (200 while the process serves), /startz (503 with a JSON reason until
    the server may start, then 200: see --start-lead), /readyz (503 with a JSON reason
    until the paths are warm, then 200), /status (JSON progress) and /metrics
    (Prometheus) on --host:--port. Without any path to warm it serves and is ready at once (logged).
    SIGTERM or SIGINT stops reading, answers requests in flight and exits 0.
    """

    def run() -> int:
        from . import server

        log = get_logger()
        if not paths:
            for candidate in [model_dir or "", *env_paths]:
                if candidate and not os.path.exists(candidate):
                    log.warning("path does not exist; not served", path=printable(candidate))
        try:
            options = WarmOptions(
                concurrency=parse_concurrency(concurrency),
                chunk_size=chunk_size,
                method=method,
                read_timeout=read_timeout or None,
            )
        except ValueError as err:
            raise errors.UsageError(str(err)) from None
        config = ServeConfig(
            selection=_selection(paths, model_dir, env_paths, include, exclude),
            options=options,
            host=host,
            port=port,
            ready_ratio=ready_ratio,
            ready_latch=ready_latch,
            timeout=timeout or None,
            timeout_policy=timeout_policy,
            start_lead=parse_start_lead(start_lead),
            recheck_seconds=recheck_seconds,
            max_backoff_seconds=max_backoff,
        )
        sock = server.bind(config.host, config.port)
        return anyio.run(server.serve, config, sock)

    _finish(_guard(ctx, run))


@cli.command(epilog=WAIT_EXIT_CODES_HELP)
@click.option(
    "--url",
    default="http://127.0.0.1:9400/readyz",
    show_default=True,
    envvar="PRELOADER_WAIT_URL",
    show_envvar=True,
    help="The URL to poll (http or https): /readyz to start once the model is resident, "
    "/startz to start when the sidecar's start gate opens (PRELOADER_START_LEAD).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    envvar="PRELOADER_WAIT_TIMEOUT",
    show_envvar=True,
    help="Give up after this many seconds and exit 5 (0: wait for ever).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    envvar="PRELOADER_WAIT_INTERVAL",
    show_envvar=True,
    help="Seconds between polls.",
)
@click.pass_context
def wait(ctx: click.Context, url: str, timeout: float, interval: float) -> None:
    """Block until URL (default the local sidecar's /readyz) answers 200, then exit 0.

    For a server container that must not start before the model is warm, where native
    sidecars are not available: `preloader wait && exec python3 -m sglang.launch_server ...`.
    With --url .../startz the server starts when the sidecar's start gate opens
    (PRELOADER_START_LEAD seconds before the warm-up's estimated end), so its own start-up
    overlaps the warm-up; exit 0 then means "may start", not "resident". Connection
    refused and 503 both mean "not yet".
    """
    from .wait import wait_ready

    log = get_logger()

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def on_change(answer: Any) -> None:
        log.info("waiting", url=url, status=answer.status, detail=answer.detail)

    def run() -> int:
        config = WaitConfig(url=url, timeout=timeout or None, interval=interval)
        signal.signal(signal.SIGTERM, interrupted)
        try:
            answer = wait_ready(config, on_change)
        except KeyboardInterrupt:
            log.warning("interrupted", url=url)
            return errors.EXIT_INTERRUPTED
        if answer is None:
            log.error("not ready before the timeout", url=url, timeout=timeout)
            return errors.EXIT_TIMEOUT
        log.info("ready", url=url, detail=answer.detail)
        return errors.EXIT_OK

    _finish(_guard(ctx, run))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="preloader")
