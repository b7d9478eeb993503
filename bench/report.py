"""Turn raw run records into the Markdown table, the target check and the PNG chart."""

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Summary", "markdown", "summarize", "target_checks", "write_chart"]

GB = 1e9


@dataclass(frozen=True)
class Summary:
    """One scenario x tool cell: medians over its repetitions."""

    scenario: str
    tool: str
    label: str
    family: str
    runs: int
    failed_runs: int
    bytes: int
    wall_s: float
    cpu_s: float
    max_rss_mib: float
    rss_exact: bool
    resident_after: float  # median over runs
    resident_after_min: float
    fixture_bytes_ratio: float | None
    auto_concurrency: str | None

    @property
    def gb_per_s(self) -> float:
        """Throughput in decimal GB per second of median wall time."""
        return self.bytes / GB / self.wall_s if self.wall_s else 0.0

    @property
    def cpu_s_per_gb(self) -> float:
        """CPU seconds (user+sys, start-up included) per decimal GB."""
        return self.cpu_s / (self.bytes / GB) if self.bytes else 0.0


def summarize(records: Iterable[dict[str, Any]]) -> list[Summary]:
    """Group raw records by scenario and tool, in first-seen order.

    :param records: one dict per timed run (see ``bench.run``).
    :return: one summary per scenario x tool.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["scenario"], record["tool"]), []).append(record)
    summaries = []
    for (scenario, tool), runs in groups.items():
        fixture = [
            r["fixture_bytes"] / r["bytes"] for r in runs if r.get("fixture_bytes") is not None
        ]
        autos = sorted({str(r["preloader"]["concurrency"]) for r in runs if r.get("preloader")})
        summaries.append(
            Summary(
                scenario=scenario,
                tool=tool,
                label=runs[0]["label"],
                family=runs[0]["family"],
                runs=len(runs),
                failed_runs=sum(1 for r in runs if not r["ok"]),
                bytes=runs[0]["bytes"],
                wall_s=statistics.median(r["wall_s"] for r in runs),
                cpu_s=statistics.median(r["user_s"] + r["sys_s"] for r in runs),
                max_rss_mib=max(r["max_rss_kib"] for r in runs) / 1024,
                rss_exact=all(r.get("rss_exact", True) for r in runs),
                resident_after=statistics.median(r["resident_after"] for r in runs),
                resident_after_min=min(r["resident_after"] for r in runs),
                fixture_bytes_ratio=min(fixture) if fixture else None,
                auto_concurrency=",".join(autos) if tool.endswith("auto") and autos else None,
            )
        )
    return summaries


def _by_scenario(summaries: Sequence[Summary]) -> dict[str, list[Summary]]:
    grouped: dict[str, list[Summary]] = {}
    for summary in summaries:
        grouped.setdefault(summary.scenario, []).append(summary)
    return grouped


def _find(cells: Sequence[Summary], family: str, tool: str | None = None) -> Summary | None:
    for cell in cells:
        if cell.family == family and (tool is None or cell.tool == tool):
            return cell
    return None


def markdown(
    summaries: Sequence[Summary],
    titles: dict[str, str],
    startup: dict[str, float] | None,
) -> str:
    """Render one Markdown table per scenario.

    :param summaries: from :func:`summarize`.
    :param titles: scenario name to its title.
    :param startup: preloader's interpreter start-up (``wall_s``, ``cpu_s``, ``max_rss_mib``).
    :return: Markdown text.
    """
    startup_cpu = startup["cpu_s"] if startup else 0.0
    lines: list[str] = []
    for scenario, cells in _by_scenario(summaries).items():
        one_liner = _find(cells, "one-liner")
        # The limit: the device (fio) on local disk, the network (range GETs) behind s3fs.
        fio = _find(cells, "fio") or _find(cells, "s3-direct")
        size = cells[0].bytes
        lines += [
            f"### {titles.get(scenario, scenario)} ({size / 2**30:.2f} GiB)",
            "",
            "| tool | wall s (median) | GB/s | vs one-liner | vs engines' prefetch | vs limit "
            "| CPU s/GB | CPU s/GB excl. start-up | peak RSS MB | resident after (median / min) |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        prefetch = _find(cells, "engine-prefetch")
        for cell in cells:
            speedup = f"{one_liner.wall_s / cell.wall_s:.2f}x" if one_liner and cell.wall_s else "-"
            vs_prefetch = (
                f"{prefetch.wall_s / cell.wall_s:.2f}x" if prefetch and cell.wall_s else "-"
            )
            vs_fio = f"{cell.gb_per_s / fio.gb_per_s:.2f}" if fio and fio.gb_per_s else "-"
            excl = "-"
            if cell.family == "preloader" and cell.bytes:
                excl = f"{max(0.0, cell.cpu_s - startup_cpu) / (cell.bytes / GB):.3f}"
            label = cell.label
            if cell.auto_concurrency:
                label += f" (settled at {cell.auto_concurrency})"
            if cell.failed_runs:
                label += f" **{cell.failed_runs}/{cell.runs} runs failed**"
            lines.append(
                f"| {label} | {cell.wall_s:.2f} | {cell.gb_per_s:.2f} | {speedup} | {vs_prefetch} "
                f"| {vs_fio} "
                f"| {cell.cpu_s_per_gb:.3f} | {excl} "
                f"| {'' if cell.rss_exact else '<= '}{cell.max_rss_mib:.0f} "
                f"| {cell.resident_after * 100:.2f}% / {cell.resident_after_min * 100:.2f}% |"
            )
        lines.append("")
    if startup:
        lines.append(
            "preloader start-up, median: `python -m preloader --version` "
            f"{startup['version_wall_s']:.2f} s wall / {startup['version_cpu_s']:.2f} s CPU; "
            f"`preloader warm EMPTY_DIR --json` {startup['wall_s']:.2f} s wall / "
            f"{startup['cpu_s']:.2f} s CPU / {startup['max_rss_mib']:.0f} MB peak RSS. "
            '"excl. start-up" subtracts the latter\'s CPU.'
        )
        lines.append("")
    return "\n".join(lines)


def target_checks(summaries: Sequence[Summary], startup: dict[str, float] | None) -> list[str]:
    """Check issue 5's targets against the medians and say met / missed with the numbers.

    :param summaries: from :func:`summarize`.
    :param startup: preloader's interpreter start-up, to exclude from CPU per GB.
    :return: Markdown bullet lines.
    """
    startup_cpu = startup["cpu_s"] if startup else 0.0
    lines: list[str] = []
    grouped = _by_scenario(summaries)

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    sharded = grouped.get("sharded", [])
    pre = _find(sharded, "preloader", "preloader")
    fio = _find(sharded, "fio")
    one = _find(sharded, "one-liner")
    if pre and fio and one:
        ratio = pre.gb_per_s / fio.gb_per_s
        wall = pre.wall_s / one.wall_s
        lines.append(
            f"- Local sharded >= 0.95 x fio and <= 1.0 x one-liner wall: "
            f"{verdict(ratio >= 0.95 and wall <= 1.0)} "
            f"({ratio:.2f} x fio, {wall:.2f} x one-liner wall)"
        )
    small = grouped.get("small-files", [])
    pre, one, vmt = (
        _find(small, "preloader", "preloader"),
        _find(small, "one-liner"),
        _find(small, "vmtouch"),
    )
    if pre and one and vmt:
        vs_one, vs_vmt = one.wall_s / pre.wall_s, vmt.wall_s / pre.wall_s
        lines.append(
            f"- Many small files >= 8 x one-liner and >= 1.5 x vmtouch: "
            f"{verdict(vs_one >= 8 and vs_vmt >= 1.5)} ({vs_one:.1f} x, {vs_vmt:.1f} x)"
        )
    fuse = grouped.get("fuse-parallel", [])
    pre, one = _find(fuse, "preloader", "preloader"), _find(fuse, "one-liner")
    if pre and one:
        speed = one.wall_s / pre.wall_s
        lines.append(
            f"- Parallel-read FUSE >= 3 x one-liner: {verdict(speed >= 3)} ({speed:.2f} x)"
        )
    for name in ("s3fs", "s3fs-large"):
        s3 = grouped.get(name, [])
        pre, one = _find(s3, "preloader", "preloader"), _find(s3, "one-liner")
        direct = _find(s3, "s3-direct")
        if pre and one:
            ok = pre.wall_s <= one.wall_s and pre.resident_after >= 0.999
            limit = ""
            if direct:
                limit = f", {pre.wall_s / direct.wall_s:.2f} x the direct fetch's wall"
            lines.append(
                f"- {name} no slower than one-liner, >= 99.9% resident: {verdict(ok)} "
                f"({pre.wall_s / one.wall_s:.2f} x one-liner wall{limit}, "
                f"{pre.resident_after * 100:.2f}% resident, median)"
            )
    for name in ("sharded", "big-file"):
        local = grouped.get(name, [])
        pre, vmt = _find(local, "preloader", "preloader"), _find(local, "vmtouch")
        fio = _find(local, "fio")
        if pre and vmt and fio:
            vs_vmt, vs_fio = vmt.wall_s / pre.wall_s, pre.gb_per_s / fio.gb_per_s
            lines.append(
                f"- {name} >= 1.0 x vmtouch -t and >= 0.95 x fio: "
                f"{verdict(vs_vmt >= 1.0 and vs_fio >= 0.95)} "
                f"({vs_vmt:.2f} x vmtouch, {vs_fio:.2f} x fio)"
            )
    defaults = [cell for cell in summaries if cell.tool == "preloader"]
    if defaults:

        def cpu_per_gb(cell: Summary) -> float:
            return max(0.0, cell.cpu_s - startup_cpu) / (cell.bytes / GB) if cell.bytes else 0.0

        worst_cpu = max(cpu_per_gb(cell) for cell in defaults)
        detail = ", ".join(f"{cell.scenario} {cpu_per_gb(cell):.3f}" for cell in defaults)
        worst_rss = max(defaults, key=lambda cell: cell.max_rss_mib)
        lines.append(
            f"- CPU <= 0.05 s/GB excl. start-up: {verdict(worst_cpu <= 0.05)} (s/GB: {detail})"
        )
        lines.append(
            f"- Peak RSS <= 80 MB: {verdict(worst_rss.max_rss_mib <= 80)} "
            f"(worst {worst_rss.max_rss_mib:.0f} MB in {worst_rss.scenario})"
        )
    auto_lines = []
    for scenario, cells in grouped.items():
        auto = _find(cells, "preloader", "preloader-auto")
        fixed = [c for c in cells if c.family == "preloader" and c.tool != "preloader-auto"]
        if auto and fixed:
            best = min(fixed, key=lambda c: c.wall_s)
            ratio = auto.wall_s / best.wall_s
            auto_lines.append((scenario, ratio, best.label))
    if auto_lines:
        ok = all(ratio <= 1.10 for _, ratio, _ in auto_lines)
        detail = "; ".join(f"{s}: {r:.2f} x best ({b})" for s, r, b in auto_lines)
        lines.append(f"- `-c auto` within 10% of the best fixed setting: {verdict(ok)} ({detail})")
    return lines


def write_chart(summaries: Sequence[Summary], titles: dict[str, str], path: Path) -> str | None:
    """Draw GB/s per tool, one panel per scenario, into a PNG.

    :param summaries: from :func:`summarize`.
    :param titles: scenario name to its title.
    :param path: the PNG to write.
    :return: ``None`` when written, else why not (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]'); chart skipped"
    grouped = _by_scenario(summaries)
    heights = [0.9 + 0.32 * len(cells) for cells in grouped.values()]
    fig, axes = plt.subplots(
        len(grouped),
        1,
        figsize=(9, sum(heights) + 0.6),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    colors = {
        "one-liner": "#888888",
        "vmtouch": "#c9a227",
        "fio": "#4c72b0",
        "s3-direct": "#4c72b0",
        "engine-prefetch": "#8172b2",
        "preloader": "#2a9d5c",
    }
    for axis, (scenario, cells) in zip(axes[:, 0], grouped.items(), strict=True):
        one = _find(cells, "one-liner")
        labels = [cell.label for cell in cells]
        values = [cell.gb_per_s for cell in cells]
        axis.barh(labels, values, color=[colors.get(cell.family, "#2a9d5c") for cell in cells])
        axis.invert_yaxis()
        for index, cell in enumerate(cells):
            note = f" {cell.gb_per_s:.2f} GB/s"
            if one and cell.wall_s:
                note += f"  ({one.wall_s / cell.wall_s:.1f}x one-liner)"
            axis.text(cell.gb_per_s, index, note, va="center", fontsize=7)
        axis.set_title(
            f"{titles.get(scenario, scenario)} - {cells[0].bytes / 2**30:.2f} GiB",
            fontsize=9,
            loc="left",
        )
        axis.set_xlim(0, max([*values, 0.001]) * 1.45)
        axis.tick_params(labelsize=7)
        axis.set_xlabel("GB/s (median wall)", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
