"""Cost at scale (issue 13): start-up, and peak memory and planning time per planned file.

``python -m bench --scale`` (or ``python -m bench.scale``) builds trees of many small
files (100,000 empty, 100,000 of 4 KiB and 1,000,000 empty by default: ``--trees``) and
runs, alternating, ``find -type f | wc -l`` (the floor: a walk with no per-file state) and
``preloader plan`` / ``plan --json`` / ``status`` / ``status --json`` / ``warm --json``,
each in a fresh process; it reports the median wall and CPU seconds and the peak RSS
(``ru_maxrss`` of the child). Start-up is measured the same way on
``preloader --version`` and ``warm`` of an empty folder. The trees are made once and kept
under ``--data-dir`` (``--clean`` deletes them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = Path("/var/tmp/preloader-bench-scale")
FILES_PER_FOLDER = 1000


def make_tree(root: Path, files: int, file_bytes: int) -> Path:
    """``files`` files of ``file_bytes`` each, 1,000 a folder; reused when complete."""
    tree = root / f"tree-{files}-{file_bytes}"
    done = tree / ".complete"
    if done.exists():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    data = b"\0" * file_bytes
    for index in range(files):
        folder = tree / f"d{index // FILES_PER_FOLDER:05d}"
        if index % FILES_PER_FOLDER == 0:
            folder.mkdir(parents=True)
        with open(folder / f"shard-{index % FILES_PER_FOLDER}.bin", "wb") as handle:
            handle.write(data)
    done.touch()
    return tree


_WRAPPER = (
    "import resource, subprocess, sys, json; "
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
    "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print(json.dumps({'rc': r.returncode, 'cpu_s': u.ru_utime + u.ru_stime, "
    "'rss_mib': u.ru_maxrss / 1024}))"
)


def run_once(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall and CPU seconds and peak RSS of one fresh run of ``argv``."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *argv],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    wall = time.perf_counter() - start
    found: dict[str, Any] = json.loads(out)
    if found["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {found['rc']}")
    return {"wall_s": wall, "cpu_s": float(found["cpu_s"]), "rss_mib": float(found["rss_mib"])}


def contenders(tree: Path) -> dict[str, list[str]]:
    preloader = [sys.executable, "-m", "preloader"]
    return {
        "find -type f \\| wc -l": ["sh", "-c", f"find '{tree}' -type f | wc -l"],
        "preloader plan": [*preloader, "plan", str(tree)],
        "preloader plan --json": [*preloader, "plan", "--json", str(tree)],
        "preloader status": [*preloader, "status", str(tree)],
        "preloader status --json": [*preloader, "status", "--json", str(tree)],
        "preloader warm --json": [*preloader, "warm", "--json", str(tree)],
    }


def startup_contenders(empty: Path) -> dict[str, list[str]]:
    preloader = [sys.executable, "-m", "preloader"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "preloader --version": [*preloader, "--version"],
        "preloader warm (empty folder)": [*preloader, "warm", str(empty)],
        "preloader status (empty folder)": [*preloader, "status", str(empty)],
    }


def alternate(
    groups: dict[str, list[str]], reps: int, env: dict[str, str]
) -> dict[str, dict[str, float]]:
    """Every contender once per round, ``reps`` rounds; the medians."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in groups}
    for _ in range(reps):
        for name, argv in groups.items():
            runs[name].append(run_once(argv, env))
    return {
        name: {key: statistics.median(r[key] for r in found) for key in found[0]}
        for name, found in runs.items()
    }


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRELOADER_")}
    env.pop("MODEL_DIR", None)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["PRELOADER_LOG_FORMAT"] = "json"
    # Bytecode as an installed package has it: a process that compiles every module it
    # imports measures the compiler, not the start-up.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _table(title: str, results: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"### {title}", "", "| run | wall s | CPU s | peak RSS MiB |", "|---|--:|--:|--:|"]
    for name, found in results.items():
        lines.append(
            f"| {name} | {found['wall_s']:.2f} | {found['cpu_s']:.3f} | {found['rss_mib']:.0f} |"
        )
    return [*lines, ""]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench --scale", description=__doc__)
    parser.add_argument("--scale", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--trees",
        default="100000x0,100000x4096,1000000x0",
        help="comma list of trees, FILESxBYTES each (bytes per file)",
    )
    parser.add_argument("-n", "--reps", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, help="write the Markdown table and JSON here")
    parser.add_argument("--clean", action="store_true", help="delete the trees afterwards")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = _env()
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(REPO_ROOT / "preloader")],
        check=True,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    args.data_dir.mkdir(parents=True, exist_ok=True)
    empty = args.data_dir / "empty"
    empty.mkdir(exist_ok=True)
    load = os.getloadavg()
    payload: dict[str, Any] = {"load_average": load, "startup": {}, "trees": {}}
    lines = [f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", ""]
    payload["startup"] = alternate(startup_contenders(empty), max(args.reps, 5), env)
    lines += _table("start-up (medians)", payload["startup"])
    for spec in args.trees.split(","):
        count, _, size = spec.partition("x")
        tree = make_tree(args.data_dir, int(count), int(size or 0))
        found = alternate(contenders(tree), args.reps, env)
        payload["trees"][spec] = found
        lines += _table(f"{int(count):,} files of {int(size or 0)} B (medians)", found)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scale.md").write_text(text + "\n")
        (args.out / "scale.json").write_text(json.dumps(payload, indent=1))
    if args.clean:
        shutil.rmtree(args.data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
