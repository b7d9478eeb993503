"""``preloader status``, ``evict`` and ``plan``: look at the plan and the page cache."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.to_thread
import click

from .. import api, errors
from ..engine.reports import ResidencyReport
from ..logs import get_logger
from ..planning.budget import BudgetCheck, check_plan
from ..planning.planner import Plan, plan_selection
from ..settings import DEFAULT_HEADROOM, Selection
from ..signals import StopSignals
from ..units import printable
from . import render
from .options import BudgetArgs, SelectionArgs, budget_options, json_option, selection_options
from .outcome import (
    PLAN_EXIT_CODES_HELP,
    RESIDENCY_EXIT_CODES_HELP,
    JsonItems,
    execute,
    print_json,
)

__all__ = ["evict", "plan_command", "status"]

_T = TypeVar("_T")


def _until_signal(body: Callable[[], Awaitable[_T]]) -> _T | None:
    """Run ``body``; ``None`` when SIGINT or SIGTERM came first.

    Walks and measurements run in worker threads, abandoned at the signal: a ``readdir``
    or an ``open`` hanging on storage that stopped answering cannot be interrupted, and
    the command must not wait for it. A further signal is ignored until the exit.
    """
    signals = StopSignals(grace=0.0, hold_after=True)
    results: list[_T] = []

    async def run() -> None:
        async with signals.capture():
            results.append(await body())

    anyio.run(run)
    if not results:
        get_logger().error("stopped before finishing", exit_code=errors.EXIT_INTERRUPTED)
        return None
    return results[0]


async def _plan(selection: Selection) -> Plan:
    return await anyio.to_thread.run_sync(plan_selection, selection, abandon_on_cancel=True)


@click.command(epilog=RESIDENCY_EXIT_CODES_HELP)
@selection_options
@json_option
@click.option("--summary", is_flag=True, help="Print only the total line, not one line a file.")
@click.pass_context
def status(ctx: click.Context, selection: SelectionArgs, as_json: bool, summary: bool) -> None:
    """Show how much of each file under PATH is in the page cache (like fincore).

    Residency the kernel will not reveal truthfully (files the process neither owns nor
    may write) is shown as unknown, never guessed. The last line is the memory budget
    (cgroup limit and usage, MemAvailable) and whether the cold rest would fit in it.
    """
    execute(ctx, selection.resolve, lambda s: _run_residency(s, as_json, summary, evict=False))


@click.command(epilog=RESIDENCY_EXIT_CODES_HELP)
@selection_options
@json_option
@click.pass_context
def evict(ctx: click.Context, selection: SelectionArgs, as_json: bool) -> None:
    """Drop the cached pages of every file under PATH (POSIX_FADV_DONTNEED).

    Pages that are dirty or mapped by a running process stay; the files are not changed.
    """
    execute(ctx, selection.resolve, lambda s: _run_residency(s, as_json, True, evict=True))


@click.command("plan", epilog=PLAN_EXIT_CODES_HELP)
@selection_options
@json_option
@budget_options
@click.pass_context
def plan_command(
    ctx: click.Context, selection: SelectionArgs, as_json: bool, budget: BudgetArgs
) -> None:
    """Dry run: what `warm` would read under PATH, in which order, what it skips and why.

    Nothing is read but the safetensors index. Shows sizes, the GGUF model chosen in a
    folder of several, shards an index names but the folder lacks (exit 8), and the
    memory budget with what would stay cold under --on-overflow trim.
    """
    execute(ctx, selection.resolve, lambda s: _run_plan(s, as_json, budget))


def _run_plan(selection: Selection, as_json: bool, budget: BudgetArgs) -> int:
    nothing: dict[str, object] = {"files": [], "bytes": 0, "skipped_reason": None}
    if render.skipped(selection, as_json, nothing):
        return errors.EXIT_OK
    planned = _until_signal(lambda: _plan(selection))
    if planned is None:
        return errors.EXIT_INTERRUPTED
    the_plan = planned
    render.log_sparse(the_plan, get_logger())
    check: BudgetCheck = anyio.run(
        lambda: api.check_budget(the_plan, on_overflow=budget.on_overflow, headroom=budget.headroom)
    )
    code = (
        errors.EXIT_INCOMPLETE_MODEL if any(p.fatal for p in the_plan.problems) else errors.EXIT_OK
    )
    if as_json:
        document: dict[str, object] = {
            "paths": list(selection.paths),
            "files": JsonItems(
                lambda: (
                    {
                        "path": f.path,
                        "bytes": f.size,
                        "allocated_bytes": f.allocated,
                        "metadata": f.metadata,
                    }
                    for f in check.plan.files
                )
            ),
            "bytes": check.plan.total_bytes,
            "skipped": JsonItems(
                lambda: (
                    {"path": s.path, "reason": s.reason, "bytes": s.size} for s in the_plan.skipped
                )
            ),
        }
        document.update(render.plan_extras(the_plan, check))
        document["exit_code"] = code
        print_json(document)
        return code
    for line in render.plan_lines(the_plan, check):
        click.echo(line)
    return code


def _run_residency(selection: Selection, as_json: bool, summary: bool, evict: bool) -> int:
    log = get_logger()
    nothing: dict[str, object] = {
        "files": 0,
        "bytes": 0,
        "resident_bytes": 0,
        "skipped_reason": None,
        "per_file": [],
    }
    if render.skipped(selection, as_json, nothing):
        return errors.EXIT_OK
    action = api.evict if evict else api.residency

    async def plan_and_measure() -> tuple[Plan, ResidencyReport]:
        plan = await _plan(selection)
        render.log_plan_problems(plan, log)
        return plan, await action(plan)

    done = _until_signal(plan_and_measure)
    if done is None:
        return errors.EXIT_INTERRUPTED
    plan, report = done
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
        document = report.to_json(per_file=False)
        document["per_file"] = JsonItems(lambda: (f.to_json() for f in report.files))
        if check is not None:
            document["budget"] = check.to_json()
        print_json(document)
    else:
        for line in render.residency_lines(report, per_file=not summary):
            click.echo(line)
        if check is not None:
            click.echo(render.budget_line(check, known=report.resident_bytes is not None))
    if evict:
        for item in report.files:
            if item.resident_bytes and item.reason:
                log.warning("pages stayed", path=printable(item.path), reason=item.reason)
        log.info(
            "evicted",
            files=len(report.files),
            bytes=report.bytes,
            resident_bytes_after=report.resident_bytes,
        )
    failures = [f for f in report.files if f.reason and f.reason.startswith("cannot")]
    walk_errors = [s for s in plan.skipped if s.error]
    return errors.EXIT_READ_ERRORS if failures or walk_errors else errors.EXIT_OK
