"""``preloader warm``: plan, check the budget, read, verify, and with ``--lock`` hold."""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
import click

from .. import api, errors
from ..engine.events import log_event
from ..engine.reading import cancel_after_stop
from ..engine.reports import WarmProgress, WarmReport
from ..engine.warm import warm_plan
from ..kernel import reclaim
from ..kernel.pinning import memlock_permission
from ..logs import get_logger
from ..planning.budget import BudgetCheck
from ..planning.planner import Plan, plan_selection
from ..settings import WarmConfig
from ..signals import StopSignals
from ..units import format_bytes, printable
from . import render
from .options import (
    BudgetArgs,
    ReadArgs,
    SelectionArgs,
    best_effort_option,
    budget_options,
    bundle,
    flag_option,
    json_option,
    lock_option,
    number_option,
    option,
    read_options,
    selection_options,
    timeout_option,
)
from .outcome import EXIT_CODES_HELP, Outcome, execute, refuse
from .progress import show_progress

__all__ = ["SHUTDOWN_GRACE_SECONDS", "WarmResult", "warm", "warm_exit_code"]

# After the first SIGINT/SIGTERM, the run has this long to return its report before it
# is cancelled; a second signal cancels at once. Well inside Kubernetes' default 30 s
# termination grace period.
SHUTDOWN_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class WarmFlags:
    """The warm options that are neither selection, reading nor budget."""

    min_resident: float
    require_verified: bool
    timeout: float
    best_effort: bool
    as_json: bool
    progress: bool | None
    progress_interval: float
    lock: bool


@click.command(epilog=EXIT_CODES_HELP)
@selection_options
@read_options(
    chunk_help="Bytes per chunk (1048576, 64MiB, 1G); files larger than this are read by "
    "several workers at once.",
    method_help="How to read: sendfile to /dev/null (zero-copy, the default), mmap + "
    "MADV_POPULATE_READ (zero-copy), or read (copies; works everywhere). A filesystem "
    "that refuses one falls back to read.",
)
@number_option(
    "--min-resident",
    "PRELOADER_MIN_RESIDENT",
    0.99,
    "Exit 4 when less than this share of the bytes read is resident after warming (what "
    "--on-overflow trim leaves cold is not counted; the reported ratios still are).",
    least=0.0,
    most=1.0,
)
@flag_option(
    "--require-verified",
    envvar="PRELOADER_REQUIRE_VERIFIED",
    help="Exit 6 when residency cannot be measured truthfully (the process neither owns "
    "the files nor holds CAP_FOWNER). Without it, a finished read pass counts, flagged "
    "as unverified.",
)
@timeout_option(
    "Stop the read pass after this many seconds (0: never) and exit 5 with a "
    "summary. Kubernetes gives exec hooks no timeout of their own."
)
@best_effort_option
@json_option
@option(
    "--progress/--no-progress",
    envvar="PRELOADER_PROGRESS",
    default=None,
    help="Progress bar on stderr. Default: a bar on a terminal, else a log line every "
    "--progress-interval seconds.",
)
@number_option(
    "--progress-interval",
    "PRELOADER_PROGRESS_INTERVAL",
    10.0,
    "Seconds between progress log lines when there is no bar (0: none).",
)
@budget_options
@lock_option(
    "After warming, pin the pages with mmap + mlock (like vmtouch -l) and keep running "
    "until SIGTERM/SIGINT, then release them and exit. Never in a postStart hook; exit 9 "
    "when it may not pin."
)
@click.pass_context
@bundle("flags", WarmFlags)
def warm(
    ctx: click.Context,
    selection: SelectionArgs,
    read: ReadArgs,
    budget: BudgetArgs,
    flags: WarmFlags,
) -> None:
    """Read every file under PATH (default $MODEL_DIR) into the page cache and verify.

    Files are read in plan order (config and tokenizer first, then shards front to
    back), cut into chunks so one huge file gets every worker. Residency is checked
    afterwards with cachestat(2); files that did not stay cached are named with the cause.
    """

    def build() -> WarmConfig:
        if flags.lock and flags.best_effort:
            # --best-effort is for a postStart hook, which --lock would hold for ever.
            raise errors.UsageError(
                "--lock with --best-effort: --lock holds until SIGTERM, which a postStart "
                "hook never sends; run --lock as a sidecar, without --best-effort"
            )
        return WarmConfig(
            selection=selection.resolve(),
            options=read.options(timeout=flags.timeout or None),
            min_resident=flags.min_resident,
            best_effort=flags.best_effort,
            require_verified=flags.require_verified,
            json=flags.as_json,
            progress=flags.progress,
            progress_interval=flags.progress_interval,
            on_overflow=budget.on_overflow,
            headroom=budget.headroom,
            lock=flags.lock,
        )

    execute(ctx, build, run_warm, best_effort=flags.best_effort, json_errors=flags.as_json)


def warm_exit_code(report: WarmReport, config: WarmConfig) -> int:
    """The exit code for a finished warm pass, before ``--best-effort`` applies.

    The first that applies wins: interrupted, timed out, read errors, residency
    unverifiable (only with ``--require-verified``), resident share too low (of the
    bytes read: a trim's cold bytes are the ``--on-overflow trim`` policy's, not a failure).
    """
    if report.interrupted:
        return errors.EXIT_INTERRUPTED
    if report.timed_out:
        return errors.EXIT_TIMEOUT
    if report.errors or report.walk_errors:
        return errors.EXIT_READ_ERRORS
    # Under --on-overflow trim the share judged is of what the trim kept: the policy
    # accepts a model warmed only as far as the budget allows (the figures reported are
    # still over the whole model, with the trim named).
    ratio = report.warmed_ratio
    if ratio is None:
        return errors.EXIT_UNVERIFIED if config.require_verified else errors.EXIT_OK
    if ratio < config.min_resident:
        return errors.EXIT_NOT_RESIDENT
    return errors.EXIT_OK


@dataclass
class WarmResult:
    """What the signal-guarded part of a warm run found.

    :ivar report: the read pass's report; ``None`` when a stop or a refusal came first.
    :ivar refused: the refusal before reading (budget, incomplete model, ``--lock``).
    :ivar held: the exit code of a ``--lock`` run that printed its summary and held.
    :ivar extras: the ``--json`` keys about formats, the budget and pinning.
    """

    report: WarmReport | None = None
    refused: errors.PreloaderError | None = None
    held: int | None = None
    extras: dict[str, object] = field(default_factory=dict)


def run_warm(config: WarmConfig) -> Outcome:
    """Run ``warm`` with its settings resolved; print its summary."""
    selection = config.selection
    nothing = {
        "files": 0,
        "bytes": 0,
        "resident_bytes": 0,
        "seconds": 0.0,
        "errors": 0,
        "skipped_reason": None,
        "exit_code": 0,
    }
    if render.skipped(selection, config.json, nothing):
        return Outcome(errors.EXIT_OK)

    progress = WarmProgress()
    stop = threading.Event()
    signals = StopSignals(stop.set, grace=SHUTDOWN_GRACE_SECONDS, hold_after=True)

    async def guarded() -> WarmResult | None:
        result = None
        async with signals.capture():
            result = await _warm(config, progress, stop)
        return result

    result = anyio.run(guarded)
    if result is not None and result.refused is not None:
        outcome = Outcome(result.refused.exit_code, config.best_effort)
        refuse(result.refused, outcome, config.json)
        return outcome
    if result is None or result.report is None:
        outcome = Outcome(errors.EXIT_INTERRUPTED, config.best_effort)
        render.summarise_stopped(progress, config, outcome, signals.first)
        return outcome
    if result.held is not None:
        return Outcome(result.held, config.best_effort)
    code = warm_exit_code(result.report, config)
    if config.lock and "lock_error" in result.extras:
        code = code or errors.EXIT_LOCK_REFUSED
    outcome = Outcome(code, config.best_effort)
    render.summarise(result.report, config, outcome, result.extras)
    return outcome


async def _warm(config: WarmConfig, progress: WarmProgress, stop: threading.Event) -> WarmResult:
    """Plan, check, read and (``--lock``) hold, inside the signal scope.

    Planning and the budget check run inside it too: a stop while a walk hangs on
    storage ends the run instead of waiting for it.
    """
    log = get_logger()
    selection = config.selection
    log.info("planning", paths=[printable(p) for p in selection.paths])
    the_plan = await _plan_until_stopped(config, stop)
    if the_plan is None:
        return WarmResult()
    try:
        check = await _prepare(the_plan, config)
    except errors.PreloaderError as err:
        return WarmResult(refused=err)
    result = WarmResult(extras=render.plan_extras(the_plan, check))
    plan = check.plan
    log.info(
        "warming",
        paths=[printable(p) for p in selection.paths],
        files=len(plan.files),
        bytes=plan.total_bytes,
        size=format_bytes(plan.total_bytes),
    )
    async with anyio.create_task_group() as display:
        display.start_soon(show_progress, progress, log, config.progress, config.progress_interval)
        report = await warm_plan(
            plan,
            config.options,
            progress=progress,
            on_event=lambda event: log_event(event, worded=True),
            stop=stop,
        )
        display.cancel_scope.cancel()
    # Every figure is over the model as planned: what the trim left cold counts as cold.
    result.report = dataclasses.replace(report, cold_bytes=check.cold_bytes)
    if config.lock and not stop.is_set():
        await _hold_pinned(result, plan, config, stop)
    return result


async def _plan_until_stopped(config: WarmConfig, stop: threading.Event) -> Plan | None:
    """Walk the selection in a worker thread; ``None`` when a stop came first.

    In a thread, so signals are seen while a walk waits on slow storage; abandoned on
    stop, because a ``readdir`` stuck in the kernel cannot be interrupted.
    """
    plan: Plan | None = None
    async with anyio.create_task_group() as group:
        group.start_soon(cancel_after_stop, stop, group.cancel_scope, 0.0)
        plan = await anyio.to_thread.run_sync(
            plan_selection, config.selection, abandon_on_cancel=True
        )
        group.cancel_scope.cancel()
    return plan


async def _prepare(the_plan: Plan, config: WarmConfig) -> BudgetCheck:
    """Log what the plan skipped and chose, then refuse what cannot go ahead.

    :raises errors.IncompleteModelError: when an index or split set names missing files.
    :raises errors.OverBudgetError: over the budget with ``--on-overflow fail``.
    :raises errors.LockRefusedError: ``--lock`` without the permission to pin the plan.
    """
    log = get_logger()
    render.log_plan_problems(the_plan, log)
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
    check = await api.check_budget(
        the_plan, on_overflow=config.on_overflow, headroom=config.headroom
    )
    render.log_budget(check, log)
    proactive = reclaim.headline(reclaim.find_schemes())
    if proactive is not None:  # a warning once a boot; the details are in --json
        (log.warning if reclaim.first_this_boot() else log.info)(
            "proactive reclaim", detail=proactive
        )
    if check.over_budget and config.on_overflow == "fail":
        raise errors.OverBudgetError(
            check.message() + "; raise the memory limit, narrow the plan with "
            "--include, or use --on-overflow trim"
        )
    if config.lock:
        refusal = memlock_permission().refusal(check.plan.total_bytes)
        if refusal is not None:
            raise errors.LockRefusedError(refusal)
    return check


async def _hold_pinned(
    result: WarmResult, plan: Plan, config: WarmConfig, stop: threading.Event
) -> None:
    """Pin the warmed pages, print the summary, hold them until a signal, release."""
    log = get_logger()
    assert result.report is not None
    try:
        pins = await api.pin(plan)
    except errors.LockRefusedError as err:
        log.error("cannot lock", error=str(err), exit_code=err.exit_code)
        result.extras["lock_error"] = str(err)
        result.extras["pinned_bytes"] = 0
        return
    code = warm_exit_code(result.report, config)
    result.extras["pinned_bytes"] = pins.pinned_bytes
    result.extras["pinned_files"] = len(pins.pins)
    render.summarise(result.report, config, Outcome(code, config.best_effort), result.extras)
    result.held = code
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
