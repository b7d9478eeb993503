"""What the commands print: text tables on stdout, ``--json`` documents, summary lines.

Pure translation of reports into text and JSON; nothing here decides an exit code (the
:class:`~preloader.cli.outcome.Outcome` does) or does I/O beyond printing and logging.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Mapping
from typing import Any

import click

from .. import errors
from .._version import __version__
from ..engine.reports import ResidencyReport, WarmProgress, WarmReport
from ..logs import get_logger, human
from ..planning.budget import BudgetCheck
from ..planning.planner import Plan
from ..planning.specs import sparse_note
from ..settings import Selection, WarmConfig
from ..units import format_bytes, printable
from .outcome import Outcome, print_json

__all__ = [
    "budget_line",
    "log_budget",
    "log_plan_problems",
    "plan_extras",
    "plan_lines",
    "ratio_text",
    "residency_lines",
    "skipped",
    "summarise",
    "summarise_stopped",
    "summary_line",
    "trim_note",
]


def skipped(selection: Selection, as_json: bool, document: Mapping[str, object]) -> bool:
    """Log and print that there is nothing to do; ``False`` when there is.

    :param document: the command's ``--json`` shape for an empty run (``skipped_reason``
        is added).
    """
    if selection.skip_reason is None:
        return False
    get_logger().info("skipped", reason=selection.skip_reason)
    if as_json:
        reason = selection.skip_reason
        print_json({k: reason if k == "skipped_reason" else v for k, v in document.items()})
    return True


def log_plan_problems(plan: Plan, log: Any) -> None:
    for skipped in plan.skipped:
        if skipped.error:
            log.error("cannot read", path=printable(skipped.path), cause=skipped.reason)
        else:
            log.warning("skipped", path=printable(skipped.path), reason=skipped.reason)
    log_sparse(plan, log)
    if not plan.files:
        log.warning("no files found", paths=[printable(p) for p in plan.roots])


def log_sparse(plan: Plan, log: Any) -> None:
    for spec in plan.files:
        note = sparse_note(spec)
        if note is not None:
            log.warning("sparse file", path=printable(spec.path), detail=note)


def summarise_stopped(
    progress: WarmProgress, config: WarmConfig, outcome: Outcome, signum: int | None
) -> None:
    """The summary when a stop cut the run short of a report: what the counters saw."""
    counted: dict[str, object] = {  # what both the log line and --json say
        "files": progress.files_total,
        "bytes": progress.bytes_total,
        "read_bytes": progress.bytes_read,
        "errors": progress.errors,
        "state": progress.state,
        "exit_code": outcome.exit_code,
    }
    get_logger().error(
        "stopped before the pass could finish; residency not measured",
        files_done=progress.files_done,
        seconds=round(progress.elapsed, 2),
        signal=signal.Signals(signum).name if signum else None,
        **counted,
    )
    if config.json:
        print_json(
            {
                **counted,
                "resident_bytes": None,
                "resident_ratio": None,
                "residency_unknown_reason": f"stopped while {progress.state}, before "
                "residency was measured",
                "seconds": round(progress.elapsed, 6),
                "error_details": [],
                "timed_out": False,
                "interrupted": True,
                "paths": list(config.selection.paths),
                "version": __version__,
            }
        )


def log_budget(check: BudgetCheck, log: Any) -> None:
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


def plan_extras(the_plan: Plan, check: BudgetCheck) -> dict[str, object]:
    """The ``--json`` keys this module adds about formats and the budget."""
    return {
        "budget": check.to_json(),
        "cold": [c.to_json() for c in check.cold],
        "cold_bytes": check.cold_bytes,
        "choices": [c.to_json() for c in the_plan.choices],
        "problems": [p.to_json() for p in the_plan.problems],
    }


def summarise(
    report: WarmReport,
    config: WarmConfig,
    outcome: Outcome,
    extras: dict[str, object],
) -> None:
    """The warm summary: one log line, and the ``--json`` document."""
    log = get_logger()
    code = outcome.code
    rate = report.read_bytes / report.seconds if report.seconds > 0 else 0.0
    ratio = report.resident_ratio
    fields: dict[str, object] = {
        "files": len(report.files),
        "bytes": report.bytes,
        "size": format_bytes(report.bytes),
        "resident": _share(ratio, len(report.files)),
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
    if extras.get("cold_bytes"):
        fields["trimmed"] = trim_note(report)
    fields["summary"] = summary_line(report)
    if ratio is None:
        fields["unverified"] = report.residency_unknown_reason
        log.warning("warm finished, residency unverified", **fields)
    elif code == errors.EXIT_OK:
        log.info("warm finished", **fields)
    else:
        log.error("warm finished with problems", **fields)
    outcome.announce()
    if human():  # JSON logs carry the same words as the summary field above
        click.echo(fields["summary"], err=True)
    if config.json:
        document = report.to_json()
        document.update(extras)
        document["exit_code"] = outcome.exit_code
        document["paths"] = list(config.selection.paths)
        document["version"] = __version__
        print_json(document)


def trim_note(report: WarmReport) -> str:
    """What ``--on-overflow trim`` left out, in words."""
    return (
        f"trimmed to the memory budget: {format_bytes(report.bytes)} of "
        f"{format_bytes(report.bytes + report.cold_bytes)} planned were warmed, "
        f"{format_bytes(report.cold_bytes)} stay cold"
    )


def summary_line(report: WarmReport) -> str:
    """The warm summary for people: ``warmed N files, X, Y% resident in Z s``.

    The share is of the whole planned model: a trim's cold bytes count as not resident.
    """
    ratio = report.resident_ratio
    share = f"{ratio:.1%} of the model resident" if ratio is not None else "residency unknown"
    line = (
        f"warmed {len(report.files)} files, {format_bytes(report.bytes)}, {share} "
        f"in {report.seconds:.1f} s"
    )
    if report.cold_bytes:
        line += f" ({format_bytes(report.cold_bytes)} left cold by the memory budget)"
    return line


def residency_lines(report: ResidencyReport, per_file: bool) -> Iterator[str]:
    """The ``status`` table, a line at a time (a million files are not held as lines)."""
    if per_file:
        yield f"{'RESIDENT':>12} {'SIZE':>12} {'%':>7}  FILE"
        for item in report.files:
            ratio = item.resident_ratio
            resident = format_bytes(item.resident_bytes) if item.resident_bytes is not None else "?"
            percent = f"{ratio:.1%}" if ratio is not None else "unknown"
            size = format_bytes(item.size)
            yield f"{resident:>12} {size:>12} {percent:>7}  {printable(item.path)}"
    total = report.resident_bytes
    ratio = report.resident_ratio
    yield (
        f"{format_bytes(total) if total is not None else '?':>12} {format_bytes(report.bytes):>12} "
        f"{f'{ratio:.1%}' if ratio is not None else 'unknown':>7}  "
        f"total ({len(report.files)} files)"
    )
    if report.residency_unknown_reason:
        yield f"residency unknown: {report.residency_unknown_reason}"


def plan_lines(the_plan: Plan, check: BudgetCheck) -> Iterator[str]:
    """The ``plan`` listing, a line at a time."""
    yield from _warm_lines(the_plan, check)
    yield from _rest_lines(the_plan, check)


def _warm_lines(the_plan: Plan, check: BudgetCheck) -> Iterator[str]:
    warm_files = check.plan.files
    yield f"warm {len(warm_files)} files, {format_bytes(check.plan.total_bytes)}, in this order:"
    # The budget's plan is a prefix of the walked one, in order; only its last file may
    # be cut short.
    full = the_plan.files
    for number, (path, size) in enumerate(
        zip(warm_files.paths(), warm_files.sizes(), strict=True), 1
    ):
        whole = full.size(number - 1) if number <= len(full) else size
        part = f" (first {format_bytes(size)} of {format_bytes(whole)})" if whole != size else ""
        yield f"{number:>5} {format_bytes(size):>12}  {printable(path)}{part}"


def _rest_lines(the_plan: Plan, check: BudgetCheck) -> list[str]:
    lines = []
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


def budget_line(check: BudgetCheck, known: bool = True) -> str:
    """The ``status`` budget line; ``known``: the residency it was given is measured (when
    not, how much is missing is unknown too, and no verdict is claimed)."""
    allowance = check.allowance_bytes
    if not known:
        verdict = (
            "residency is unknown, so what is missing is unknown (the whole model, "
            f"{format_bytes(check.planned_bytes)}, would "
            f"{'fit' if allowance is not None and check.planned_bytes <= allowance else 'not fit'})"
        )
        if allowance is None:
            verdict = "residency and the budget are unknown"
    elif allowance is None:
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


def ratio_text(report: ResidencyReport) -> str:
    return _share(report.resident_ratio, len(report.files))


def _share(ratio: float | None, files: int) -> str:
    """A resident share for people: never "100.0%" of nothing."""
    if not files:
        return "no files"
    return f"{ratio:.1%}" if ratio is not None else "unknown"
