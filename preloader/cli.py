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
import click

from . import api, errors
from ._version import __version__
from .config import (
    DEFAULT_CHUNK_SIZE,
    Selection,
    WarmConfig,
    parse_concurrency,
    resolve_selection,
)
from .engine import EngineEvent, ResidencyReport, WarmOptions, WarmProgress, WarmReport
from .logs import FORMATS, LEVELS, configure, get_logger
from .planner import printable
from .progress import show_progress
from .units import format_bytes, parse_size

__all__ = ["cli", "main", "warm_exit_code"]

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

EXIT_CODES_HELP = (
    "Exit codes: 0 ok or nothing to do (MODEL_DIR unset or missing), 1 internal error, "
    "2 bad usage or input, 3 read errors, 4 resident share below --min-resident, "
    "5 --timeout reached, 6 residency unverifiable with --require-verified, "
    "130 interrupted by SIGINT/SIGTERM."
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
        click.argument("paths", nargs=-1, type=click.Path(), metavar="[PATH]..."),
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
            type=click.Path(),
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
) -> Selection:
    return resolve_selection(paths, model_dir, env_paths, include, exclude)


def _print_json(document: dict[str, object]) -> None:
    click.echo(json.dumps(document, sort_keys=False))


async def _run_with_signals(
    body: Callable[[threading.Event], Awaitable[_T]], stop: threading.Event
) -> tuple[_T | None, int | None]:
    """Run ``body(stop)``; the first SIGINT/SIGTERM sets ``stop``, a second one cancels.

    :return: the body's result (``None`` if cancelled) and the signal received, if any.
    """
    received: list[int] = []
    result: list[_T] = []

    async def watch(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                received.append(signum)
                log = get_logger()
                if len(received) == 1:
                    log.warning("stopping", signal=signal.Signals(signum).name)
                    stop.set()
                else:
                    log.warning("stopping now", signal=signal.Signals(signum).name)
                    scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(watch, group.cancel_scope)
        result.append(await body(stop))
        group.cancel_scope.cancel()
    return (result[0] if result else None), (received[0] if received else None)


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
    if report.errors:
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


@cli.command(epilog=EXIT_CODES_HELP)
@_selection_options
@click.option(
    "-c",
    "--concurrency",
    envvar="PRELOADER_CONC",
    show_envvar=True,
    default="4",
    show_default=True,
    metavar="N|auto",
    help="Chunks read in parallel; 'auto' raises it while throughput still grows.",
)
@click.option(
    "--chunk-size",
    type=_Size(),
    default=DEFAULT_CHUNK_SIZE,
    show_default="64MiB",
    envvar="PRELOADER_CHUNK_SIZE",
    show_envvar=True,
    help="Bytes per chunk (1048576, 64MiB, 1G); files larger than this are read by "
    "several workers at once.",
)
@click.option(
    "--method",
    type=click.Choice(["auto", "sendfile", "mmap", "read"]),
    default="auto",
    show_default=True,
    envvar="PRELOADER_METHOD",
    show_envvar=True,
    help="How to read: sendfile to /dev/null (zero-copy, the default), mmap + "
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
    "--read-timeout",
    type=click.FloatRange(min=0),
    default=600,
    show_default=True,
    envvar="PRELOADER_READ_TIMEOUT",
    show_envvar=True,
    help="Give up a file whose chunk read stalls this many seconds (0: never).",
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
) -> None:
    """Read every file under PATH (default $MODEL_DIR) into the page cache and verify.

    Files are read in plan order (config and tokenizer first, then shards front to
    back), cut into chunks so one huge file gets every worker. Residency is checked
    afterwards with cachestat(2); files that did not stay cached are named with the cause.
    """
    log = get_logger()
    try:
        config = WarmConfig(
            selection=_selection(paths, model_dir, env_paths, include, exclude),
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

    async def body(stop: threading.Event) -> WarmReport:
        plan = api.plan(selection.paths, include=selection.include, exclude=selection.exclude)
        for skipped in plan.skipped:
            log.warning("skipped", path=printable(skipped.path), reason=skipped.reason)
        log.info(
            "warming",
            paths=[printable(p) for p in selection.paths],
            files=len(plan.files),
            bytes=plan.total_bytes,
            size=format_bytes(plan.total_bytes),
        )
        async with anyio.create_task_group() as display:
            display.start_soon(
                show_progress, progress, log, config.progress, config.progress_interval
            )
            report = await api.warm(
                plan,
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
        return report

    report, signum = anyio.run(_run_with_signals, body, threading.Event())
    if report is None:
        log.error("stopped before a report could be made", signal=signum)
        return errors.EXIT_OK if config.best_effort else errors.EXIT_INTERRUPTED
    code = warm_exit_code(report, config)
    _summarise(report, config, code, log)
    return errors.EXIT_OK if config.best_effort else code


def _summarise(report: WarmReport, config: WarmConfig, code: int, log: Any) -> None:
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
        "errors": len(report.errors),
        "exit_code": code,
    }
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
) -> None:
    """Show how much of each file under PATH is in the page cache (like fincore).

    Residency the kernel will not reveal truthfully (files the process neither owns nor
    may write) is shown as unknown, never guessed.
    """
    _finish(
        _guard(
            ctx,
            lambda: _run_residency(
                paths, model_dir, env_paths, include, exclude, as_json, summary, evict=False
            ),
        )
    )


@cli.command(epilog=EXIT_CODES_HELP)
@_selection_options
@_json_option
@click.pass_context
def evict(
    ctx: click.Context,
    paths: tuple[str, ...],
    model_dir: str | None,
    env_paths: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    as_json: bool,
) -> None:
    """Drop the cached pages of every file under PATH (POSIX_FADV_DONTNEED).

    Pages that are dirty or mapped by a running process stay; the files are not changed.
    """
    _finish(
        _guard(
            ctx,
            lambda: _run_residency(
                paths, model_dir, env_paths, include, exclude, as_json, True, evict=True
            ),
        )
    )


def _run_residency(
    paths: Sequence[str],
    model_dir: str | None,
    env_paths: Sequence[str],
    include: Sequence[str],
    exclude: Sequence[str],
    as_json: bool,
    summary: bool,
    evict: bool,
) -> int:
    log = get_logger()
    selection = _selection(paths, model_dir, env_paths, include, exclude)
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
    plan = api.plan(selection.paths, include=selection.include, exclude=selection.exclude)
    for skipped in plan.skipped:
        log.warning("skipped", path=printable(skipped.path), reason=skipped.reason)
    action = api.evict if evict else api.residency
    report: ResidencyReport = anyio.run(lambda: action(plan))
    if as_json:
        _print_json(report.to_json())
    else:
        for line in _residency_lines(report, per_file=not summary):
            click.echo(line)
    if evict:
        log.info(
            "evicted",
            files=len(report.files),
            bytes=report.bytes,
            resident_bytes_after=report.resident_bytes,
        )
    failures = [f for f in report.files if f.reason and f.reason.startswith("cannot")]
    return errors.EXIT_READ_ERRORS if failures else errors.EXIT_OK


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


def _ratio_text(report: ResidencyReport) -> str:
    ratio = report.resident_ratio
    return f"{ratio:.1%}" if ratio is not None else "unknown"


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="preloader")
