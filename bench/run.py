"""Run the benchmark: every scenario, every competitor, cold cache, A B A B.

``python -m bench --help`` lists the flags; ``python -m bench --smoke`` runs
everything at toy sizes in seconds. Results go to ``bench/results/reads/`` (or ``e2e/``,
``warm-cache/``, ``smoke/``): ``results.md`` (tables, target check, machine),
``results.png`` (chart) and ``raw/`` (every run as JSON, not committed).
"""

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from preloader.kernel import reclaim

from . import e2e, measure, report
from .scenarios import SCENARIOS, Prepared, Scenario, Sizes, fuse_available, prepare, s3fs_available
from .tools import ONE_LINER, Tool, build_tools

__all__ = ["main", "parse_size", "render"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = Path("/var/tmp/preloader-bench")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``65536``, ``64KiB``, ``512M`` or ``2GiB`` into bytes (binary units).

    :param text: the size.
    :return: bytes.
    :raises argparse.ArgumentTypeError: when it is not a size.
    """
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MiB or 2GiB)")
    power = " kmgt".index(match.group(2).lower() or " ")
    return int(float(match.group(1)) * 1024**power)


class Progress:
    """One status line on stderr: rewritten in place on a terminal, appended otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()

    def say(self, text: str) -> None:
        """Print a message on its own line."""
        if self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def step(self, text: str) -> None:
        """Report one finished run."""
        self.done += 1
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        line = f"[{self.done}/{self.total}] {text}  elapsed {elapsed:.0f}s eta {eta:.0f}s"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[: shutil.get_terminal_size().columns - 1])
            if self.done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _child_env(preloader_src: Path) -> dict[str, str]:
    """Our environment minus anything that would change preloader's defaults."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PRELOADER_") and key != "MODEL_DIR"
    }
    env["PYTHONPATH"] = os.pathsep.join(
        part
        for part in (str(preloader_src), str(REPO_ROOT), os.environ.get("PYTHONPATH", ""))
        if part
    )
    # `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH: run
    # from a checkout, the children would import that checkout's preloader, whatever
    # --preloader-src says (PYTHONSAFEPATH: Python 3.11 and later). The bench's own
    # modules come from REPO_ROOT above.
    env["PYTHONSAFEPATH"] = "1"
    return env


def _compile_bytecode(preloader_src: Path) -> None:
    """Write the measured preloader's bytecode before any run, as installing it does.

    Where ``PYTHONDONTWRITEBYTECODE`` is set, every run would otherwise compile again each
    module changed since its last ``.pyc`` and count that as start-up.
    """
    package = preloader_src / "preloader"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(package)],
        check=False,
        stdout=subprocess.DEVNULL,
        env=env,
    )


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _fio_read(text: str) -> tuple[int, float] | None:
    """Return (bytes read, bandwidth in bytes/s) from fio's JSON output."""
    try:
        read = json.loads(text[text.index("{") :])["jobs"][0]["read"]
        return int(read["io_bytes"]), float(read["bw_bytes"])
    except (ValueError, KeyError, IndexError):
        return None


def measure_startup(env: dict[str, str], reps: int, scratch: Path) -> dict[str, float]:
    """Time what every preloader run pays before it reads a byte.

    Two probes: ``python -m preloader --version`` (the interpreter and the CLI)
    and ``python -m preloader warm EMPTY_DIR --json`` (plus the engine's imports,
    settings, logging and an empty plan). The second is the fixed cost that
    "CPU per GB excluding start-up" subtracts.

    :param env: environment for the child.
    :param reps: how many times each (medians are reported).
    :param scratch: a directory where an empty model directory may be made.
    :return: ``wall_s``, ``cpu_s``, ``max_rss_mib`` of the empty warm, and
        ``version_wall_s``, ``version_cpu_s`` of ``--version``.
    :raises RuntimeError: when preloader cannot be started at all.
    """
    empty = scratch / "empty-model"
    empty.mkdir(parents=True, exist_ok=True)
    probes = {
        "version": [sys.executable, "-m", "preloader", "--version"],
        "empty": [sys.executable, "-m", "preloader", "warm", str(empty), "--json"],
    }
    results: dict[str, list[measure.ChildResult]] = {name: [] for name in probes}
    for _ in range(reps):
        for name, argv in probes.items():
            result = measure.run_child(argv, env=env)
            if result.returncode != 0:
                raise RuntimeError(
                    f"`{' '.join(argv[1:])}` failed (exit {result.returncode}); is preloader "
                    f"installed or on --preloader-src? {result.stderr.strip()[-500:]}"
                )
            results[name].append(result)
    return {
        "wall_s": statistics.median(r.wall_s for r in results["empty"]),
        "cpu_s": statistics.median(r.cpu_s for r in results["empty"]),
        "max_rss_mib": max(r.max_rss_kib for r in results["empty"]) / 1024,
        "version_wall_s": statistics.median(r.wall_s for r in results["version"]),
        "version_cpu_s": statistics.median(r.cpu_s for r in results["version"]),
    }


def run_once(
    prepared: Prepared,
    tool: Tool,
    env: dict[str, str],
    rep: int,
    timeout_s: float,
    warm_cache: bool = False,
) -> dict[str, Any]:
    """Evict (or, with ``warm_cache``, cache) the tree, run *tool* once on it, and say
    what it achieved.

    :param prepared: the scenario's tree (and fixture counters, if any).
    :param tool: the competitor.
    :param env: the child's environment.
    :param rep: repetition number, for the record.
    :param timeout_s: longest a run may take.
    :param warm_cache: start with every page resident: what a second warm-up costs.
    :return: a JSON-ready record.
    """
    target = prepared.target
    if warm_cache:
        measure.touch(target)
    else:
        measure.evict(target)
    before = measure.residency(target)
    if prepared.fixture_stats:
        prepared.fixture_stats(True)
    argv = tool.argv(target, prepared.median_file_bytes, prepared.s3_url)
    try:
        result = measure.run_child(argv, env=env, timeout_s=timeout_s)
    except subprocess.TimeoutExpired:
        result = measure.ChildResult(tuple(argv), -9, timeout_s, 0.0, 0.0, 0, "", "timed out")
    after = measure.residency(target)
    fixture = prepared.fixture_stats(False) if prepared.fixture_stats else None
    record: dict[str, Any] = {
        "scenario": prepared.scenario.name,
        "tool": tool.name,
        "label": tool.label,
        "family": tool.family,
        "rep": rep,
        "argv": list(argv),
        "files": prepared.files,
        "bytes": prepared.bytes,
        "returncode": result.returncode,
        "ok": result.returncode == 0,
        "wall_s": result.wall_s,
        "user_s": result.user_s,
        "sys_s": result.sys_s,
        "max_rss_kib": result.max_rss_kib,
        "rss_exact": result.rss_exact,
        "resident_before": before.ratio,
        "resident_after": after.ratio,
        "fixture": fixture,
        "fixture_bytes": None,
        "preloader": None,
        "stderr_tail": result.stderr[-2000:] if result.returncode != 0 else "",
    }
    if fixture is not None:
        record["fixture_bytes"] = fixture.get("bytes_sent", fixture.get("bytes_served"))
    if tool.family == "preloader":
        record["preloader"] = _last_json(result.stdout)
    if tool.family == "fio":
        # fio skips files smaller than its block: count what it really read.
        fio = _fio_read(result.stdout)
        if fio:
            record["bytes"], record["fio_bw_bytes"] = fio
    return record


def _machine(data_dir: Path, preloader_src: Path, env: dict[str, str]) -> dict[str, str]:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        mem_kib = int(handle.readline().split()[1])
    best = ("", "", "")
    with open("/proc/mounts") as handle:
        for line in handle:
            device, mountpoint, fstype = line.split()[:3]
            if str(data_dir.resolve()).startswith(mountpoint) and len(mountpoint) > len(best[1]):
                best = (device, mountpoint, fstype)
    commit = subprocess.run(
        ["git", "-C", str(preloader_src), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    package_commit = subprocess.run(
        ["git", "-C", str(preloader_src), "log", "-1", "--format=%h", "--", "preloader"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if package_commit:
        commit += f", preloader/ last changed in {package_commit}"
    version = subprocess.run(
        [sys.executable, "-m", "preloader", "--version"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    ).stdout.strip()

    def first_line(argv: list[str]) -> str:
        if not shutil.which(argv[0]):
            return "absent"
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        return ((done.stdout or done.stderr).strip().splitlines() or ["?"])[0]

    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{mem_kib / 2**20:.1f} GiB",
        "kernel": platform.release(),
        "disk": f"{best[0]} ({best[2]}) at {best[1]}",
        "python": platform.python_version(),
        "preloader": f"{version or 'not found'} (commit {commit or 'unknown'})",
        "fio": first_line(["fio", "--version"]),
        "s3fs": first_line(["s3fs", "--version"]),
        "vmtouch": next(
            (line.strip() for line in first_line_all(["vmtouch", "-h"]) if "vmtouch v" in line),
            "present",
        ),
        # Left running: what it drops shows in the residency columns (docs/residency.md).
        "proactive reclaim": "; ".join(s.describe() for s in reclaim.find_schemes()) or "none seen",
    }


def first_line_all(argv: list[str]) -> list[str]:
    """Return every output line of *argv* (stdout and stderr), or nothing if it is absent."""
    if not shutil.which(argv[0]):
        return []
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).splitlines()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark preloader against the postStart one-liner, vmtouch and fio "
        "on a cold page cache (issue 5).",
        epilog="Two more benches take their own flags: python -m bench --scale -h (start-up "
        "and planning of 100,000 / 1,000,000 files) and python -m bench --recheck -h (the "
        "keep-warm recheck's CPU-seconds and bytes read).",
    )
    parser.add_argument("--smoke", action="store_true", help="toy sizes, 1 repetition, no sweep")
    parser.add_argument(
        "-n",
        "--reps",
        type=int,
        help="repetitions per tool (default 3, smoke 1; e2e: rounds, default 1)",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(s.name for s in SCENARIOS),
        help="comma list from: " + ", ".join(s.name for s in SCENARIOS) + "; and e2e (time to "
        "a loaded model with a real loader, not in the default list; see the --e2e-* flags)",
    )
    parser.add_argument(
        "--tools",
        help="comma list of families (one-liner, vmtouch, fio, s3-direct, engine-prefetch, "
        "preloader) or tool names "
        "(preloader-c8, preloader-auto); default all",
    )
    parser.add_argument(
        "--sweep", help="extra preloader -c values, comma list (default 1,2,8,16; smoke none)"
    )
    parser.add_argument("--no-auto", action="store_true", help="leave out preloader -c auto")
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="start every run with the tree resident (vmtouch -t), not evicted: what a "
        "second warm-up of a warm model costs (results go to --out; default "
        "bench/results/warm-cache)",
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument(
        "--out",
        type=Path,
        help="results directory (default bench/results/reads, bench/results/e2e for "
        "--scenarios e2e alone; with --smoke bench/results/smoke)",
    )
    parser.add_argument(
        "--preloader-src",
        type=Path,
        default=Path(os.environ.get("BENCH_PRELOADER_SRC") or REPO_ROOT),
        help="directory put first on PYTHONPATH for `python -m preloader` "
        "(env BENCH_PRELOADER_SRC; default: this repo)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--clean", action="store_true", help="delete the generated data afterwards")
    parser.add_argument(
        "--from-raw",
        type=Path,
        metavar="JSON",
        help="only redraw results.md and results.png from a saved raw/*.json",
    )
    sizes = parser.add_argument_group("sizes (binary units: 64KiB, 512MiB, 2GiB)")
    sizes.add_argument("--shards", type=int)
    sizes.add_argument("--shard-size", type=parse_size)
    sizes.add_argument("--big-size", type=parse_size)
    sizes.add_argument("--small-count", type=int)
    sizes.add_argument("--small-size", type=parse_size)
    sizes.add_argument("--s3-shards", type=int)
    sizes.add_argument("--s3-shard-size", type=parse_size)
    sizes.add_argument("--s3-large-shards", type=int)
    sizes.add_argument("--s3-large-shard-size", type=parse_size)
    sizes.add_argument("--s3-latency-ms", type=float)
    sizes.add_argument("--s3-conn-mibps", type=float, help="per-connection cap (0: none)")
    sizes.add_argument("--s3-link-mibps", type=float, help="whole-server cap (0: none)")
    sizes.add_argument("--fuse-size", type=parse_size)
    sizes.add_argument("--fuse-stream-mibps", type=float, help="per-stream cap (0: none)")
    sizes.add_argument("--fuse-link-mibps", type=float, help="all-streams cap (0: none)")
    sizes.add_argument("--fuse-latency-ms", type=float)
    e2e.add_arguments(parser)
    return parser.parse_args(argv)


def _sizes(args: argparse.Namespace) -> Sizes:
    base = Sizes.smoke() if args.smoke else Sizes()
    overrides = {
        "shards": args.shards,
        "shard_bytes": args.shard_size,
        "big_bytes": args.big_size,
        "small_count": args.small_count,
        "small_bytes": args.small_size,
        "s3_shards": args.s3_shards,
        "s3_shard_bytes": args.s3_shard_size,
        "s3_large_shards": args.s3_large_shards,
        "s3_large_shard_bytes": args.s3_large_shard_size,
        "s3_latency_ms": args.s3_latency_ms,
        "s3_conn_mibps": args.s3_conn_mibps,
        "s3_link_mibps": args.s3_link_mibps,
        "fuse_bytes": args.fuse_size,
        "fuse_stream_mibps": args.fuse_stream_mibps,
        "fuse_link_mibps": args.fuse_link_mibps,
        "fuse_latency_ms": args.fuse_latency_ms,
    }
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _save_raw(out: Path, payload: dict[str, Any]) -> None:
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"results-{stamp}.json", "latest.json"):
        (raw / name).write_text(json.dumps(payload, indent=1))


def render(out: Path, payload: dict[str, Any]) -> Path:
    """Write ``results.md`` and ``results.png`` under *out* from a raw payload.

    :param out: the results directory.
    :param payload: what ``raw/latest.json`` holds (machine, sizes, startup, records...).
    :return: the Markdown file's path.
    """
    cache = payload.get("cache", "cold")
    titles = {s.name: f"{s.title}, {cache} cache" for s in SCENARIOS}
    summaries = report.summarize(payload["records"])
    startup = payload.get("startup")
    out.mkdir(parents=True, exist_ok=True)
    chart_note = report.write_chart(summaries, titles, out / "results.png")
    machine: dict[str, str] = payload["machine"]
    lines = [
        "# preloader benchmark results",
        "",
        f"Run {payload.get('run_at', '?')}, median of {payload.get('reps', '?')} {cache}-cache "
        "run(s) per tool, tools alternating A B C A B C (order rotated each round).",
        "",
        "Machine: " + "; ".join(f"{key} {value}" for key, value in machine.items()) + ".",
        "",
        "One-liner: `" + ONE_LINER + "` with PRELOADER_CONC=4.",
        "",
        "## Targets (issue 5)",
        "",
        *report.target_checks(summaries, startup),
        "",
        "## Tables",
        "",
        report.markdown(summaries, titles, startup),
    ]
    skipped: dict[str, str] = payload.get("skipped") or {}
    if skipped:
        lines += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()), ""]
    lines.append(chart_note or "![throughput per scenario](results.png)")
    lines.append("")
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def _run_e2e(args: argparse.Namespace) -> int:
    """Run the end-to-end scenario (:mod:`bench.e2e`) and write ``e2e.md``, ``e2e.png``."""
    # SIGTERM unwinds like Ctrl-C, so the mounts and child processes are cleaned up.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    _compile_bytecode(args.preloader_src.resolve())
    env = _child_env(args.preloader_src.resolve())
    machine = _machine(args.data_dir, args.preloader_src.resolve(), env)
    raw = args.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def save(payload: dict[str, Any]) -> None:
        payload["machine"] = machine
        for name in (f"e2e-{stamp}.json", "e2e-latest.json"):
            (raw / name).write_text(json.dumps(payload, indent=1))

    try:
        config = e2e.config_from_args(args)
        payload = e2e.run(config, args.data_dir, env, Progress(0).say, save)
    except (ValueError, RuntimeError) as err:
        print(f"bench: e2e: {err}", file=sys.stderr)
        return 2
    save(payload)
    path = e2e.render(args.out, payload, machine)
    print(f"bench: wrote {path} and {path.with_suffix('.png').name}", file=sys.stderr)
    print(path.read_text())
    failed = [r for r in payload["records"] if not r["ok"]]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run the bench and write its results.

    :param argv: command line, without the program name.
    :return: 0 on success, 2 when the bench cannot run here, 1 when a tool failed.
    """
    if "--scale" in (sys.argv[1:] if argv is None else argv):
        from . import scale  # cost at scale: its own flags (python -m bench --scale -h)

        return scale.main(argv)
    if "--recheck" in (sys.argv[1:] if argv is None else argv):
        from . import recheck  # keep-warm recheck cost: its own flags (--recheck -h)

        return recheck.main(argv)
    args = _parse_args(argv)
    redraw = json.loads(args.from_raw.read_text()) if args.from_raw else {}
    if args.out is None:
        # One folder per kind of result (bench/results/README.md); a smoke run must not
        # overwrite the committed full-size results.
        only_e2e = redraw.get("kind") == "e2e" or args.scenarios.replace(" ", "") == "e2e"
        kind = (
            "smoke"
            if args.smoke
            else "warm-cache"
            if args.warm_cache
            else "e2e"
            if only_e2e
            else "reads"
        )
        args.out = REPO_ROOT / "bench" / "results" / kind
    if args.from_raw:
        if redraw.get("kind") == "e2e":
            path = e2e.render(args.out, redraw, redraw.get("machine", {}))
        else:
            path = render(args.out, redraw)
        print(path.read_text())
        return 0
    if os.geteuid() != 0:
        print("bench: warning: not root; s3fs/FUSE mounts and eviction may fail", file=sys.stderr)
    if shutil.which("vmtouch") is None:
        print("bench: vmtouch is required (apt-get install vmtouch)", file=sys.stderr)
        return 2
    sizes = _sizes(args)
    reps = args.reps or (1 if args.smoke else 3)
    sweep_text = args.sweep if args.sweep is not None else ("" if args.smoke else "1,2,8,16")
    sweep = [value.strip() for value in sweep_text.split(",") if value.strip()]
    only = {name.strip() for name in args.tools.split(",")} if args.tools else None
    tools = build_tools(sweep, with_auto=not args.no_auto, only=only)
    by_name = {s.name: s for s in SCENARIOS}
    wanted = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    if "e2e" in wanted:
        wanted.remove("e2e")
        code = _run_e2e(args)
        if code or not wanted:
            return code
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        print(f"bench: unknown scenario(s) {unknown}; choose from {list(by_name)}", file=sys.stderr)
        return 2
    _compile_bytecode(args.preloader_src.resolve())
    env = _child_env(args.preloader_src.resolve())
    skipped: dict[str, str] = {}
    scenarios: list[Scenario] = []
    for name in wanted:
        scenario = by_name[name]
        reason = {"s3fs": s3fs_available, "fuse": fuse_available}.get(scenario.kind, lambda: None)()
        if reason:
            skipped[name] = reason
            print(f"bench: skipping {name}: {reason}", file=sys.stderr)
        else:
            scenarios.append(scenario)
    startup = None
    if any(tool.family == "preloader" for tool in tools):
        try:
            startup = measure_startup(env, max(3, reps), args.data_dir)
        except RuntimeError as err:
            print(f"bench: {err}", file=sys.stderr)
            return 2
    total = sum(reps * len([t for t in tools if t.applies_to(s)]) for s in scenarios)
    progress = Progress(total)
    records: list[dict[str, Any]] = []
    for scenario in scenarios:
        here = [tool for tool in tools if tool.applies_to(scenario)]
        progress.say(f"== {scenario.name}: {scenario.title}")
        with prepare(scenario, args.data_dir, sizes, progress.say) as prepared:
            for rep in range(reps):
                order = here[rep % len(here) :] + here[: rep % len(here)]
                for tool in order:
                    record = run_once(
                        prepared, tool, env, rep, args.timeout, warm_cache=args.warm_cache
                    )
                    records.append(record)
                    status = "" if record["ok"] else f" FAILED rc={record['returncode']}"
                    progress.step(
                        f"{scenario.name} rep {rep + 1}/{reps} {tool.label}: "
                        f"{record['wall_s']:.2f}s "
                        f"{prepared.bytes / 1e9 / max(record['wall_s'], 1e-9):.2f} GB/s "
                        f"resident {record['resident_after'] * 100:.1f}%{status}"
                    )
            measure.evict(prepared.target)  # leave the shared page cache as we found it
    payload = {
        "run_at": time.strftime("%Y-%m-%d %H:%M %Z"),
        "reps": reps,
        "machine": _machine(args.data_dir, args.preloader_src.resolve(), env),
        "sizes": dataclasses.asdict(sizes),
        "cache": "warm" if args.warm_cache else "cold",
        "startup": startup,
        "skipped": skipped,
        "records": records,
    }
    _save_raw(args.out, payload)
    path = render(args.out, payload)
    print(f"bench: wrote {path} and {path.with_suffix('.png').name}", file=sys.stderr)
    print(path.read_text())
    if args.clean:
        for scenario in scenarios:
            if scenario.local:
                shutil.rmtree(args.data_dir / scenario.name, ignore_errors=True)
                (args.data_dir / f"{scenario.name}.layout.json").unlink(missing_ok=True)
    failed = [r for r in records if not r["ok"]]
    for record in failed[:5]:
        print(
            f"bench: {record['scenario']} {record['tool']} exited {record['returncode']}: "
            f"{record['stderr_tail'][-300:]}",
            file=sys.stderr,
        )
    return 1 if failed else 0
