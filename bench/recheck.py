"""Keep-warm recheck cost (issue 13): CPU-seconds and bytes read by one recheck.

``python -m bench --recheck`` measures what the serve agent's keep-warm loop does every
``PRELOADER_RECHECK_SECONDS``: :func:`preloader.engine.measure_chunks` over the whole plan
(which chunks lost pages), and the re-read of just those (:func:`rewarm_chunks`). Two trees:

- ``files``: 100,000 files of 4 KiB (the tree of ``--scale``), all read into the cache;
  a recheck with everything resident, then one after evicting every 100th file.
- ``sparse``: 1,400 sparse files of 512 MiB (700 GB of "model" that occupies no disk;
  cachestat and mincore answer for them without reading), with the first chunk of every
  50th file read into the cache (zero pages) and the rest not resident.

Per recheck: CPU-seconds of this process (``getrusage``, every thread), bytes read
(``rchar`` of ``/proc/self/io``: ``read`` and ``sendfile`` both count), and whether the
chunks named lost are exactly the ones not resident (by cachestat before and after it).
``--mincore`` also measures the path for kernels without cachestat. Medians of ``-n``
runs; run it as root or as the files' owner.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from preloader.engine.keepwarm import measure_chunks
from preloader.engine.warm import rewarm_chunks, warm_plan
from preloader.kernel import fileread, pagecache
from preloader.planning.planner import Plan, build_plan
from preloader.settings import WarmOptions

from .scale import DEFAULT_DATA_DIR, make_tree

MiB = 1024 * 1024
CHUNK = 64 * MiB


def make_sparse(root: Path, files: int, size: int) -> Path:
    """``files`` sparse files of ``size`` bytes each: no data blocks, reused when complete."""
    tree = root / f"sparse-{files}-{size}"
    done = tree / ".complete"
    if not done.exists():
        tree.mkdir(parents=True, exist_ok=True)
        for index in range(files):
            with open(tree / f"model-{index + 1:05d}-of-{files:05d}.safetensors", "wb") as handle:
                handle.truncate(size)
        done.touch()
    return tree


def rchar() -> tuple[int, int]:
    """``rchar`` of ``/proc/self/io``, and the bytes this read of it added to ``rchar``."""
    fd = os.open("/proc/self/io", os.O_RDONLY)
    try:
        text = os.read(fd, 4096)  # one read: the kernel counts exactly these bytes
    finally:
        os.close(fd)
    for line in text.decode("ascii").splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1]), len(text)
    raise RuntimeError("/proc/self/io has no rchar")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measured(work: Callable[[], Any]) -> tuple[Any, float, float, int]:
    """``work()``'s result, wall and CPU seconds, and bytes it read."""
    (before_io, own), before_cpu, started = rchar(), _cpu(), time.perf_counter()
    result = work()
    wall, cpu = time.perf_counter() - started, _cpu() - before_cpu
    return result, wall, cpu, rchar()[0] - before_io - own


def evict_range(path: str, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def touch_range(path: str, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        fileread.read_range(fd, offset, length, "sendfile")
    finally:
        os.close(fd)


def not_resident(plan: Plan) -> set[tuple[int, int]]:
    """``(file, chunk)`` of every chunk with a page out of the cache, by cachestat."""
    missing: set[tuple[int, int]] = set()
    for index, spec in enumerate(plan.files):
        fd = os.open(spec.path, os.O_RDONLY)
        try:
            for number, start in enumerate(range(0, spec.size, CHUNK)):
                length = min(CHUNK, spec.size - start)
                if pagecache.cachestat(fd, start, length).cached < -(-length // 4096):
                    missing.add((index, number))
        finally:
            os.close(fd)
    return missing


def recheck(plan: Plan, reps: int) -> dict[str, Any]:
    """Medians of ``reps`` rechecks, and whether they named exactly the lost chunks.

    The kernel may reclaim more pages while a recheck runs (proactive reclaim, other
    work's memory): a recheck is exact when the chunks it names include every chunk not
    resident before it and only chunks not resident after it.
    """
    runs = []
    exact = True
    for _ in range(reps):
        before = not_resident(plan)
        found, wall, cpu, read = measured(lambda: anyio.run(measure_chunks, plan, CHUNK))
        after = not_resident(plan)
        lost = {(chunk.file_index, chunk.index) for item in found for chunk in item.lost}
        exact = exact and before <= lost <= after
        runs.append(
            {
                "wall_s": wall,
                "cpu_s": cpu,
                "read_bytes": read,
                "lost_chunks": len(lost),
                "expected_lost_chunks": len(before),
            }
        )
    result: dict[str, Any] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    result["exact"] = exact
    return result


def rewarm(plan: Plan) -> dict[str, Any]:
    """One recheck that finds lost chunks, the re-read of them, and the recheck after."""
    found = anyio.run(measure_chunks, plan, CHUNK)
    lost = [chunk for item in found for chunk in item.lost]
    wanted = sum(chunk.length for chunk in lost)
    options = WarmOptions(chunk_size=CHUNK)
    report, wall, cpu, read = measured(lambda: anyio.run(rewarm_chunks, plan, lost, options))
    after = anyio.run(measure_chunks, plan, CHUNK)
    return {
        "chunks": len(lost),
        "lost_bytes": wanted,
        "read_bytes": read,
        "reported_bytes": report.read_bytes,
        "wall_s": wall,
        "cpu_s": cpu,
        "lost_after": sum(len(item.lost) for item in after),
    }


def files_case(tree: Path, reps: int) -> dict[str, Any]:
    os.sync()  # a tree just written is dirty, and eviction keeps dirty pages
    plan = build_plan([str(tree)], exclude=[".complete"])
    anyio.run(warm_plan, plan, WarmOptions(verify=False))
    out: dict[str, Any] = {"files": len(plan.files), "bytes": plan.total_bytes}
    out["all resident"] = recheck(plan, reps)
    for spec in plan.files[::100]:
        evict_range(spec.path, 0, 0)
    out["every 100th file evicted"] = recheck(plan, reps)
    out["re-read"] = rewarm(plan)
    return out


def sparse_case(tree: Path, reps: int) -> dict[str, Any]:
    plan = build_plan([str(tree)], exclude=[".complete"])
    for spec in plan.files:
        evict_range(spec.path, 0, 0)
    for spec in plan.files[::50]:
        touch_range(spec.path, 0, CHUNK)
    out: dict[str, Any] = {"files": len(plan.files), "bytes": plan.total_bytes}
    out["first chunk of every 50th file resident"] = recheck(plan, reps)
    for spec in plan.files:
        evict_range(spec.path, 0, 0)
    return out


def _table(name: str, case: dict[str, Any]) -> list[str]:
    lines = [
        f"### {name}: {case['files']:,} files, {case['bytes'] / 1e9:,.1f} GB",
        "",
        "| recheck | CPU s | wall s | bytes read | chunks lost (named / not resident before) |",
        "|---|--:|--:|--:|--:|",
    ]
    for label, found in case.items():
        if isinstance(found, dict) and "exact" in found:
            mark = "" if found["exact"] else " **MISMATCH**"
            lines.append(
                f"| {label} | {found['cpu_s']:.3f} | {found['wall_s']:.3f} | "
                f"{found['read_bytes']:,} | {found['lost_chunks']:,} / "
                f"{found['expected_lost_chunks']:,}{mark} |"
            )
    again = case.get("re-read")
    if again:
        lines += [
            "",
            f"Re-read of the {again['chunks']:,} lost chunks: {again['read_bytes']:,} bytes read "
            f"for {again['lost_bytes']:,} lost, {again['cpu_s']:.3f} CPU s; "
            f"{again['lost_after']} chunks lost after.",
        ]
    return [*lines, ""]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench --recheck", description=__doc__)
    parser.add_argument("--recheck", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--files", type=int, default=100_000, help="small files (0: skip)")
    parser.add_argument("--file-size", type=int, default=4096, help="bytes per small file")
    parser.add_argument("--sparse-files", type=int, default=1400, help="sparse files (0: skip)")
    parser.add_argument("--sparse-size", type=int, default=512 * MiB, help="bytes per sparse file")
    parser.add_argument("--mincore", action="store_true", help="also measure without cachestat")
    parser.add_argument("-n", "--reps", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, help="write recheck.md and recheck.json here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    lines = [f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", ""]
    payload: dict[str, Any] = {"load_average": load, "cases": {}}
    modes = [False, True] if args.mincore else [False]
    for use_mincore in modes:
        pagecache.force_mincore(use_mincore)
        way = "mincore" if use_mincore else "cachestat"
        try:
            if args.files:
                tree = make_tree(args.data_dir, args.files, args.file_size)
                name = f"files, {way}"
                payload["cases"][name] = files_case(tree, args.reps)
                lines += _table(name, payload["cases"][name])
            if args.sparse_files:
                tree = make_sparse(args.data_dir, args.sparse_files, args.sparse_size)
                name = f"sparse, {way}"
                payload["cases"][name] = sparse_case(tree, args.reps)
                lines += _table(name, payload["cases"][name])
        finally:
            pagecache.force_mincore(False)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "recheck.md").write_text(text + "\n")
        (args.out / "recheck.json").write_text(json.dumps(payload, indent=1))
    exact = all(
        found.get("exact", True)
        for case in payload["cases"].values()
        for found in case.values()
        if isinstance(found, dict)
    )
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
