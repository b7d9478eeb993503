"""The end-to-end scenario: time from pod start until a real loader holds its weights.

``python -m bench --scenario e2e`` (issue 11). Per storage, per rank count and
per mode, on a cold cache, modes interleaved and rotated each repetition:

- t0 is "pod start": the warm-up (if any) and the server's start-up begin;
- the server is N rank processes (:mod:`bench.loader`) that spend
  ``--e2e-startup`` seconds starting (imports, then a sleep standing for CUDA and
  NCCL init), then each open every shard in index order and copy their 1/N of
  every tensor (a GGUF file: one process maps it and copies it in file order);
- time to loaded is t0 until the last rank holds all its slices.

Modes: ``cold`` (no warm-up); ``one-liner`` and ``warm`` (the reference
postStart one-liner / ``preloader warm`` started beside the server);
``sidecar-readyz`` (``preloader serve``; the server starts once ``/readyz`` is
200, as a native sidecar's startupProbe would hold it); ``sidecar-startz``
(``preloader serve --start-lead S``; the server starts once ``/startz`` is 200).
The probes are polled every ``--e2e-probe-interval`` seconds (a kubelet probes
every ``periodSeconds``, 1 s at least; a finer poll leaves the gate's own cost).

Storages: ``local`` (the sharded model on local disk), ``s3fs`` (s3fs
``kernel_cache`` over the loopback S3 server serving the same files),
``fuse-gguf`` and ``fuse-sharded`` (the parallel-stream FUSE fixture serving a
single-file GGUF-like model, and the sharded model). Mounted fixtures serve the
real files (``--backing``); cold means those files and the mount's pages are
evicted (``vmtouch -e``, i.e. ``POSIX_FADV_DONTNEED``, only our files).
"""

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import measure, s3trace
from .models import write_gguf_like, write_safetensors_model
from .scenarios import fuse_available, fuse_mount, s3fs_available, s3fs_mount
from .tools import ONE_LINER, preloader_argv

__all__ = [
    "MODES",
    "STORAGES",
    "E2EConfig",
    "add_arguments",
    "config_from_args",
    "render",
    "run",
]

MiB = 2**20
REPO_ROOT = Path(__file__).resolve().parent.parent
MODES = ("cold", "one-liner", "warm", "sidecar-readyz", "sidecar-startz")
STORAGES = ("local", "s3fs", "fuse-gguf", "fuse-sharded")
PRELOADER_MODES = ("warm", "sidecar-readyz", "sidecar-startz")
NO_START_LEAD = "skipped: this preloader has no --start-lead"
MODE_LABELS = {
    "cold": "cold (no warm-up)",
    "one-liner": "one-liner as postStart",
    "warm": "`preloader warm` as postStart",
    "sidecar-readyz": "sidecar, gate /readyz",
    "sidecar-startz": "sidecar, gate /startz + lead",
}
STORAGE_LABELS = {
    "local": "local disk, sharded",
    "s3fs": "s3fs over loopback S3, sharded",
    "fuse-gguf": "parallel-stream FUSE, one GGUF file",
    "fuse-sharded": "parallel-stream FUSE, sharded",
}


@dataclass(frozen=True)
class E2EConfig:
    """Everything one end-to-end run needs (sizes, fixtures, loader)."""

    storages: tuple[str, ...] = STORAGES
    modes: tuple[str, ...] = MODES
    ranks: tuple[int, ...] = (4,)
    reps: int = 1  # one round is ~12 minutes on 2 cores; -n 3 for medians
    startup_s: float = 8.0
    lead_s: float | None = None  # None: the start-up delay
    shards: int = 4
    shard_bytes: int = 512 * MiB
    gguf_bytes: int = 2048 * MiB
    framework: str = "auto"  # pt, np or auto (pt where torch imports)
    device: str = "cpu"  # cpu, or cuda (rank R on cuda:R mod the GPU count)
    s3_latency_ms: float = 10.0
    s3_conn_mibps: float = 100e6 / MiB  # 100 MB/s per connection
    fuse_stream_mibps: float = 64.0
    fuse_link_mibps: float = 400.0
    fuse_latency_ms: float = 20.0
    probe_interval_s: float = 0.1
    timeout_s: float = 300.0

    @classmethod
    def smoke(cls) -> "E2EConfig":
        """Toy sizes: seconds per run."""
        return cls(
            ranks=(2,),
            reps=1,
            startup_s=0.5,
            shards=2,
            shard_bytes=4 * MiB,
            gguf_bytes=8 * MiB,
            s3_conn_mibps=64.0,
            fuse_latency_ms=5.0,
            timeout_s=60.0,
        )

    @property
    def lead(self) -> float:
        """The start lead given to ``serve --start-lead``."""
        return self.startup_s if self.lead_s is None else self.lead_s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the e2e scenario's flags (``--e2e-*``) to the bench's parser.

    :param parser: ``python -m bench``'s parser.
    """
    group = parser.add_argument_group(
        "e2e scenario (--scenarios e2e): time to a loaded model with a real loader"
    )
    group.add_argument("--e2e-storage", help="comma list from: " + ", ".join(STORAGES))
    group.add_argument("--e2e-modes", help="comma list from: " + ", ".join(MODES))
    group.add_argument("--e2e-ranks", help="comma list of rank counts (default 4; 1,4,8 for all)")
    group.add_argument("--e2e-startup", type=float, help="server start-up seconds (default 8)")
    group.add_argument("--e2e-lead", type=float, help="serve --start-lead (default: start-up)")
    group.add_argument("--e2e-shards", type=int, help="safetensors shards (default 4)")
    group.add_argument("--e2e-shard-size", type=_size, help="bytes per shard (default 512MiB)")
    group.add_argument("--e2e-gguf-size", type=_size, help="the GGUF file (default 2GiB)")
    group.add_argument(
        "--e2e-framework", choices=["auto", "pt", "np"], help="loader tensors (auto: pt if torch)"
    )
    group.add_argument("--e2e-device", choices=["cpu", "cuda"], help="where ranks put slices")
    group.add_argument("--e2e-s3-conn-mibps", type=float, help="S3 per-connection cap (95.4)")
    group.add_argument("--e2e-fuse-stream-mibps", type=float, help="FUSE per-stream cap (64)")
    group.add_argument("--e2e-probe-interval", type=float, help="gate poll seconds (0.1)")


def _size(text: str) -> int:
    from .run import parse_size

    return parse_size(text)


def _csv(text: str | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return values


def config_from_args(args: argparse.Namespace) -> E2EConfig:
    """Build the configuration from parsed flags (``--smoke`` picks toy defaults).

    :param args: from the bench's parser.
    :return: the configuration.
    :raises ValueError: for an unknown storage, mode or rank count.
    """
    base = E2EConfig.smoke() if args.smoke else E2EConfig()
    ranks = None
    if args.e2e_ranks:
        ranks = tuple(int(v) for v in args.e2e_ranks.split(",") if v.strip())
        if not ranks or min(ranks) < 1:
            raise ValueError(f"--e2e-ranks must be positive integers, got {args.e2e_ranks!r}")
    overrides = {
        "storages": _csv(args.e2e_storage, STORAGES, "storage"),
        "modes": _csv(args.e2e_modes, MODES, "mode"),
        "ranks": ranks,
        "reps": args.reps,
        "startup_s": args.e2e_startup,
        "lead_s": args.e2e_lead,
        "shards": args.e2e_shards,
        "shard_bytes": args.e2e_shard_size,
        "gguf_bytes": args.e2e_gguf_size,
        "framework": args.e2e_framework,
        "device": args.e2e_device,
        "s3_conn_mibps": args.e2e_s3_conn_mibps,
        "fuse_stream_mibps": args.e2e_fuse_stream_mibps,
        "probe_interval_s": args.e2e_probe_interval,
        "timeout_s": args.timeout if args.timeout != 600.0 else None,
    }
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def resolve_framework(wanted: str) -> str:
    """Return ``pt`` or ``np``: *wanted*, or for ``auto`` torch where it is installed.

    :param wanted: ``auto``, ``pt`` or ``np``.
    :return: the framework the loader uses.
    :raises RuntimeError: for ``pt`` without torch.
    """
    has_torch = importlib.util.find_spec("torch") is not None
    if wanted == "auto":
        return "pt" if has_torch else "np"
    if wanted == "pt" and not has_torch:
        raise RuntimeError("--e2e-framework pt needs torch (pip install torch==2.13.0, CPU)")
    return wanted


# --- storages -------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One storage ready to load from."""

    storage: str
    model_dir: Path  # MODEL_DIR: what the warm-ups read
    load_path: Path  # what the loader opens (the directory, or the .gguf file)
    evict: tuple[Path, ...]  # through the mount, and the backing files
    files: int
    bytes: int
    stats: Callable[[bool], dict[str, int]] | None = None
    s3_url: str | None = None  # the S3 server behind s3fs: its GET log (bench.s3trace)


def _tree_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


@contextlib.contextmanager
def _storage(
    storage: str, config: E2EConfig, data_dir: Path, log: Callable[[str], None]
) -> Iterator[Target]:
    sharded = data_dir / "e2e" / "bucket" / "model"  # bucket/ is the S3 server's backing
    gguf_dir = data_dir / "e2e" / "gguf"
    if storage == "fuse-gguf":
        log(f"e2e: GGUF-like model, {config.gguf_bytes / 2**30:.2f} GiB (written once)")
        write_gguf_like(gguf_dir / "model-Q8_0.gguf", config.gguf_bytes)
        backing = gguf_dir
    else:
        log(
            f"e2e: safetensors model, {config.shards} x {config.shard_bytes / MiB:.0f} MiB "
            "(written once)"
        )
        write_safetensors_model(sharded, config.shards, config.shard_bytes)
        backing = sharded
    files, total = _tree_size(backing)
    if storage == "local":
        yield Target(storage, sharded, sharded, (sharded,), files, total)
        return
    listing = {p.name: p.stat().st_size for p in sorted(backing.iterdir()) if p.is_file()}
    if storage == "s3fs":
        objects = {f"model/{name}": size for name, size in listing.items()}
        urls: list[str] = []
        with s3fs_mount(
            data_dir,
            objects,
            config.s3_latency_ms,
            config.s3_conn_mibps,
            0.0,
            backing=backing.parent,  # keys are model/NAME
            name="e2e-s3",
            on_server=urls.append,
        ) as (mountpoint, stats):
            model = mountpoint / "model"
            yield Target(storage, model, model, (model, backing), files, total, stats, urls[0])
        return
    with fuse_mount(
        data_dir,
        listing,
        config.fuse_stream_mibps,
        config.fuse_link_mibps,
        config.fuse_latency_ms,
        backing=backing,
        name=f"e2e-{storage}",
    ) as (mountpoint, stats):
        load = mountpoint / "model-Q8_0.gguf" if storage == "fuse-gguf" else mountpoint
        yield Target(storage, mountpoint, load, (mountpoint, backing), files, total, stats)


def storage_unavailable(storage: str) -> str | None:
    """Say why *storage* cannot run here, or ``None``.

    :param storage: one of :data:`STORAGES`.
    :return: the reason, or ``None``.
    """
    if storage == "s3fs":
        reason = s3fs_available()
    elif storage.startswith("fuse"):
        reason = fuse_available()
    else:
        return None
    if reason is None and os.geteuid() != 0:
        reason = "mounting FUSE needs root here"
    return reason


# --- one run --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Probe(threading.Thread):
    """Poll one URL until it answers 200; remember when (``time.monotonic()``)."""

    def __init__(self, url: str, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.interval_s = interval_s
        self.opened_at: float | None = None
        self.opened = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(self.url, timeout=2) as reply,
            ):
                if reply.status == 200:
                    self.opened_at = time.monotonic()
                    self.opened.set()
                    return
            self.stop.wait(self.interval_s)


def has_start_lead(env: dict[str, str]) -> bool:
    """Whether the preloader under test knows ``serve --start-lead``.

    :param env: the children's environment (its PYTHONPATH picks the checkout).
    :return: True when ``serve --help`` lists it.
    """
    done = subprocess.run(
        [sys.executable, "-m", "preloader", "serve", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    return "--start-lead" in done.stdout


def _spawn_ranks(
    target: Target, ranks: int, config: E2EConfig, framework: str, env: dict[str, str]
) -> list[subprocess.Popen[str]]:
    not_before = time.monotonic() + config.startup_s
    count = 1 if target.load_path.suffix == ".gguf" else ranks
    procs = []
    for rank in range(count):
        argv = [sys.executable, "-m", "bench.loader", str(target.load_path)]
        argv += ["--rank", str(rank), "--ranks", str(count), "--framework", framework]
        argv += ["--device", config.device, "--not-before", f"{not_before:.6f}"]
        procs.append(
            subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        )
    return procs


class _Exit(threading.Thread):
    """Wait for a child and remember when it exited (``time.monotonic()``)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.at: float | None = None

    def run(self) -> None:
        self.proc.wait()
        self.at = time.monotonic()


def _tail(log: IO[str]) -> str:
    log.seek(0)
    return log.read().strip()[-600:]


def _kill(proc: subprocess.Popen[str] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def _warmer(
    mode: str, target: Target, config: E2EConfig, env: dict[str, str], port: int
) -> list[str] | None:
    if mode == "one-liner":
        script = f'MODEL_DIR="$1" PRELOADER_CONC=4; {ONE_LINER}'
        return ["sh", "-c", script, "sh", str(target.model_dir)]
    if mode == "warm":
        return preloader_argv(target.model_dir, None)
    if mode.startswith("sidecar"):
        argv = [sys.executable, "-m", "preloader", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(port)]
        if mode == "sidecar-startz":
            argv += ["--start-lead", f"{config.lead:g}"]
        return argv
    return None


def run_once(
    target: Target,
    mode: str,
    ranks: int,
    rep: int,
    config: E2EConfig,
    framework: str,
    env: dict[str, str],
) -> dict[str, Any]:
    """Evict, start the warm-up and the server as *mode* says, and time it to loaded.

    :param target: the storage.
    :param mode: one of :data:`MODES`.
    :param ranks: tensor-parallel rank processes.
    :param rep: repetition number, for the record.
    :param config: the run's configuration.
    :param framework: ``pt`` or ``np``.
    :param env: the children's environment.
    :return: a JSON-ready record (times in seconds from t0).
    """
    for path in target.evict:
        measure.evict(path)
    before = measure.residency(target.model_dir).ratio
    if target.stats:
        target.stats(True)
    if target.s3_url:
        s3trace.fetch_gets(target.s3_url, reset=True)
    vm_before = s3trace.vm_counters()
    port = _free_port()
    argv = _warmer(mode, target, config, env, port)
    child_env = dict(env, MODEL_DIR=str(target.model_dir))
    record: dict[str, Any] = {
        "storage": target.storage,
        "mode": mode,
        "ranks": 1 if target.load_path.suffix == ".gguf" else ranks,
        "rep": rep,
        "bytes": target.bytes,
        "files": target.files,
        "startup_s": config.startup_s,
        "lead_s": config.lead if mode == "sidecar-startz" else None,
        "framework": framework,
        "device": config.device,
        "ok": False,
        "error": "",
    }
    warmer: subprocess.Popen[str] | None = None
    exited: _Exit | None = None
    logs = (tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+"))  # noqa: SIM115
    probes: list[_Probe] = []
    procs: list[subprocess.Popen[str]] = []
    t0 = time.monotonic()
    deadline = t0 + config.timeout_s
    try:
        if argv is not None:
            warmer = subprocess.Popen(
                argv,
                stdout=logs[0],
                stderr=logs[1],
                text=True,
                env=child_env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
            exited = _Exit(warmer)
            exited.start()
        gate = None
        if mode.startswith("sidecar"):
            base = f"http://127.0.0.1:{port}"
            probes = [_Probe(base + "/readyz", config.probe_interval_s)]
            if mode == "sidecar-startz":
                probes.append(_Probe(base + "/startz", config.probe_interval_s))
            for probe in probes:
                probe.start()
            gate = probes[-1]
            while not gate.opened.wait(0.05):
                assert warmer is not None
                if warmer.poll() is not None:
                    raise RuntimeError(f"serve exited {warmer.returncode}: {_tail(logs[1])}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{gate.url} did not open in {config.timeout_s:.0f} s")
            record["gate_s"] = (gate.opened_at or time.monotonic()) - t0
        procs = _spawn_ranks(target, ranks, config, framework, env)
        done: list[dict[str, Any]] = []
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            line = (out.strip().splitlines() or [""])[-1]
            if proc.returncode != 0 or not line.startswith("{"):
                raise RuntimeError(f"rank exited {proc.returncode}: {err.strip()[-600:]}")
            done.append(json.loads(line))
        record["loaded_s"] = max(r["done"] for r in done) - t0
        record["first_read_s"] = min(r["start"] for r in done) - t0
        record["ranks_ready_s"] = max(r["ready"] for r in done) - t0
        record["copied_bytes"] = sum(r["bytes"] for r in done)
        if warmer is not None and exited is not None and not mode.startswith("sidecar"):
            exited.join(max(1.0, deadline - time.monotonic()))
            if exited.at is None:
                raise RuntimeError(f"the warm-up ran past {config.timeout_s:.0f} s")
            record["warmup_s"] = exited.at - t0
            record["warmup_exit"] = warmer.returncode
            if mode == "warm":
                logs[0].seek(0)
                lines = [ln for ln in logs[0].read().splitlines() if ln.startswith("{")]
                report = json.loads(lines[-1]) if lines else {}
                record["preloader"] = {
                    k: report.get(k) for k in ("files", "bytes", "resident_bytes", "seconds")
                }
            if warmer.returncode != 0:
                raise RuntimeError(f"warm-up exited {warmer.returncode}: {_tail(logs[1])}")
        if mode.startswith("sidecar"):
            ready = probes[0]
            if not ready.opened.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("/readyz never opened")
            record["warmup_s"] = (ready.opened_at or time.monotonic()) - t0
        record["ok"] = True
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as err:
        record["error"] = str(err)[-800:]
    finally:
        for probe in probes:
            probe.stop.set()
        for proc in procs:
            _kill(proc)
        _kill(warmer)
        for log in logs:
            log.close()
    record["resident_after"] = measure.residency(target.model_dir).ratio
    record["resident_before"] = before
    # Machine-wide: another session's drop_caches or reclaim during the run shows here.
    record["vmstat"] = {k: v - vm_before.get(k, 0) for k, v in s3trace.vm_counters().items()}
    if target.stats:
        fetched = target.stats(False)
        record["fetched_bytes"] = fetched.get("bytes_sent", fetched.get("bytes_served"))
    if target.s3_url:
        found = s3trace.overlaps(s3trace.fetch_gets(target.s3_url))
        record["duplicate_bytes"] = sum(o.extra_bytes for o in found)
        record["duplicates"] = [
            [
                o.key.rsplit("/", 1)[-1],
                o.first,
                o.end,
                o.count,
                [round(t - t0, 2) for t in o.starts],
            ]
            for o in found
            if o.end - o.first >= 4096
        ][:50]
    return record


# --- the whole scenario ---------------------------------------------------------


def run(
    config: E2EConfig,
    data_dir: Path,
    env: dict[str, str],
    say: Callable[[str], None],
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every storage x ranks x mode, ``reps`` times, modes rotated each round.

    :param config: sizes, fixtures, loader.
    :param data_dir: where the models and mounts live.
    :param env: the children's environment.
    :param say: progress lines.
    :param checkpoint: called with the payload so far after every run (a long run
        stopped half-way still leaves its results).
    :return: the raw payload (``kind`` ``e2e``; records, skipped, config).
    """
    framework = resolve_framework(config.framework)
    if config.device == "cuda" and framework != "pt":
        raise RuntimeError("--e2e-device cuda needs the torch loader (--e2e-framework pt)")
    start_lead = has_start_lead(env)
    modes = [m for m in config.modes if m != "sidecar-startz" or start_lead]
    skipped: dict[str, str] = {}
    if "sidecar-startz" in config.modes and not start_lead:
        skipped["sidecar-startz"] = NO_START_LEAD
        say(f"e2e: sidecar-startz {NO_START_LEAD}")
    storages = []
    for storage in config.storages:
        reason = storage_unavailable(storage)
        if reason:
            skipped[storage] = reason
            say(f"e2e: skipping {storage}: {reason}")
        else:
            storages.append(storage)
    records: list[dict[str, Any]] = []
    import safetensors

    payload: dict[str, Any] = {
        "kind": "e2e",
        "run_at": time.strftime("%Y-%m-%d %H:%M %Z"),
        "config": dataclasses.asdict(config),
        "framework": framework,
        "safetensors": safetensors.__version__,
        "torch": _torch_version() if framework == "pt" else None,
        "skipped": skipped,
        "records": records,
    }
    total = sum(
        config.reps * len(modes) * (1 if s == "fuse-gguf" else len(config.ranks)) for s in storages
    )
    started = time.monotonic()
    for storage in storages:
        with _storage(storage, config, data_dir, say) as target:
            rank_counts = (1,) if storage == "fuse-gguf" else config.ranks
            for rep in range(config.reps):
                for ranks in rank_counts:
                    order = modes[rep % len(modes) :] + modes[: rep % len(modes)]
                    for mode in order:
                        record = run_once(target, mode, ranks, rep, config, framework, env)
                        records.append(record)
                        if checkpoint:
                            checkpoint(payload)
                        elapsed = time.monotonic() - started
                        status = "" if record["ok"] else f" FAILED: {record['error'][-200:]}"
                        say(
                            f"[{len(records)}/{total}] e2e {storage} tp{record['ranks']} "
                            f"rep {rep + 1}/{config.reps} {mode}: loaded "
                            f"{record.get('loaded_s', float('nan')):.2f}s resident "
                            f"{record['resident_after'] * 100:.1f}%{status}  elapsed "
                            f"{elapsed:.0f}s"
                        )
            for path in target.evict:
                measure.evict(path)  # leave the shared page cache as we found it
    return payload


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


# --- report ---------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One storage x ranks x mode: medians over its repetitions."""

    storage: str
    ranks: int
    mode: str
    runs: int
    failed: int
    loaded_s: float | None
    gate_s: float | None
    first_read_s: float | None
    warmup_s: float | None
    resident_min: float
    fetched_ratio: float | None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(records: list[dict[str, Any]]) -> list[Cell]:
    """Group records by storage, ranks and mode (first-seen order) and take medians.

    :param records: from :func:`run`.
    :return: the cells.
    """
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for record in records:
        key = (record["storage"], record["ranks"], record["mode"])
        groups.setdefault(key, []).append(record)
    cells = []
    for (storage, ranks, mode), runs in groups.items():
        ok = [r for r in runs if r["ok"]]
        fetched = [r["fetched_bytes"] / r["bytes"] for r in ok if r.get("fetched_bytes")]
        cells.append(
            Cell(
                storage,
                ranks,
                mode,
                len(runs),
                len(runs) - len(ok),
                _median([r["loaded_s"] for r in ok]),
                _median([r["gate_s"] for r in ok if "gate_s" in r]),
                _median([r["first_read_s"] for r in ok]),
                _median([r["warmup_s"] for r in ok if "warmup_s" in r]),
                min(r["resident_after"] for r in runs),
                _median(fetched),
            )
        )
    order = {m: i for i, m in enumerate(MODES)}
    return sorted(cells, key=lambda c: (STORAGES.index(c.storage), c.ranks, order[c.mode]))


def _find(cells: list[Cell], storage: str, ranks: int, mode: str) -> Cell | None:
    return next((c for c in cells if (c.storage, c.ranks, c.mode) == (storage, ranks, mode)), None)


def _ratio(cell: Cell | None, base: Cell | None) -> float | None:
    if cell and base and cell.loaded_s and base.loaded_s:
        return cell.loaded_s / base.loaded_s
    return None


def _fmt(value: float | None, suffix: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def summary_table(cells: list[Cell], modes: tuple[str, ...] = MODES) -> list[str]:
    """The README table: one row per storage and rank count, one column per mode.

    Each cell: median time to loaded, and its ratio to the one-liner's.

    :param cells: from :func:`summarize`.
    :param modes: the columns.
    :return: Markdown lines.
    """
    present = [m for m in modes if any(c.mode == m for c in cells)]
    lines = [
        "| storage | TP | " + " | ".join(MODE_LABELS[m] for m in present) + " |",
        "|---|--:|" + "--:|" * len(present),
    ]
    rows = dict.fromkeys((c.storage, c.ranks) for c in cells)
    for storage, ranks in rows:
        one = _find(cells, storage, ranks, "one-liner")
        parts = []
        for mode in present:
            cell = _find(cells, storage, ranks, mode)
            if cell is None or cell.loaded_s is None:
                parts.append("failed" if cell else "-")
                continue
            ratio = _ratio(cell, one)
            text = f"{cell.loaded_s:.1f} s"
            if ratio is not None and mode != "one-liner":
                text += f" ({ratio:.2f} x)"
            parts.append(text)
        lines.append(f"| {STORAGE_LABELS[storage]} | {ranks} | " + " | ".join(parts) + " |")
    return lines


def detail_table(cells: list[Cell]) -> list[str]:
    """Every cell with its gate, warm-up end, residency and fetched bytes.

    :param cells: from :func:`summarize`.
    :return: Markdown lines.
    """
    lines = [
        "| storage | TP | mode | runs | loaded s | vs one-liner | vs cold | gate open s "
        "| first read s | warm-up done s | resident after (min) | fetched / model |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for cell in cells:
        one = _find(cells, cell.storage, cell.ranks, "one-liner")
        cold = _find(cells, cell.storage, cell.ranks, "cold")
        runs = f"{cell.runs}" + (f" ({cell.failed} failed)" if cell.failed else "")
        lines.append(
            f"| {cell.storage} | {cell.ranks} | {MODE_LABELS[cell.mode]} | {runs} "
            f"| {_fmt(cell.loaded_s, digits=2)} | {_fmt(_ratio(cell, one), ' x', 2)} "
            f"| {_fmt(_ratio(cell, cold), ' x', 2)} | {_fmt(cell.gate_s)} "
            f"| {_fmt(cell.first_read_s)} | {_fmt(cell.warmup_s)} | {cell.resident_min * 100:.2f}% "
            f"| {_fmt(cell.fetched_ratio, ' x', 2)} |"
        )
    return lines


def target_checks(cells: list[Cell]) -> list[str]:
    """Issue 11's done-when, as ratios of medians in this run.

    :param cells: from :func:`summarize`.
    :return: Markdown bullet lines (only the checks this run has data for).
    """
    lines = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    def ratio(storage: str, ranks: int, mode: str, base: str) -> float | None:
        return _ratio(_find(cells, storage, ranks, mode), _find(cells, storage, ranks, base))

    for ranks in sorted({c.ranks for c in cells if c.storage == "s3fs"}):
        found = {
            (m, b): ratio("s3fs", ranks, m, b)
            for m in ("sidecar-startz", "warm")
            for b in ("one-liner", "cold")
        }
        for mode in ("sidecar-startz", "warm"):
            vs_one, vs_cold = found[(mode, "one-liner")], found[(mode, "cold")]
            if vs_one is not None and vs_cold is not None:
                lines.append(
                    f"- s3fs, TP {ranks}: {MODE_LABELS[mode]} <= 0.95 x one-liner and "
                    f"<= 0.6 x cold: {verdict(vs_one <= 0.95 and vs_cold <= 0.6)} "
                    f"({vs_one:.2f} x, {vs_cold:.2f} x)"
                )
    vs_one = ratio("fuse-gguf", 1, "sidecar-startz", "one-liner")
    if vs_one is not None:
        lines.append(
            f"- parallel-stream FUSE, one GGUF file: sidecar on /startz <= 0.5 x one-liner: "
            f"{verdict(vs_one <= 0.5)} ({vs_one:.2f} x)"
        )
    for storage in ("fuse-sharded", "local"):
        for ranks in sorted({c.ranks for c in cells if c.storage == storage}):
            worst = [
                (r, m)
                for m in PRELOADER_MODES
                if (r := ratio(storage, ranks, m, "one-liner")) is not None
            ]
            if worst:
                value, mode = max(worst)
                lines.append(
                    f"- {STORAGE_LABELS[storage]}, TP {ranks}: no preloader mode slower than "
                    f"the one-liner: {verdict(value <= 1.0)} (slowest: {MODE_LABELS[mode]}, "
                    f"{value:.2f} x)"
                )
    pre = [c for c in cells if c.mode in PRELOADER_MODES]
    if pre:
        low = min(pre, key=lambda c: c.resident_min)
        lines.append(
            f"- >= 99.9% resident after every preloader mode (vmtouch): "
            f"{verdict(low.resident_min >= 0.999)} (lowest {low.resident_min * 100:.2f}%, "
            f"{low.storage} {low.mode})"
        )
    return lines


def write_chart(cells: list[Cell], path: Path) -> str | None:
    """Draw time to loaded per mode, one panel per storage and rank count.

    :param cells: from :func:`summarize`.
    :param path: the PNG.
    :return: ``None`` when written, else why not.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]'); chart skipped"
    rows = list(dict.fromkeys((c.storage, c.ranks) for c in cells))
    if not rows:
        return "no results to draw"
    colors = {
        "cold": "#bbbbbb",
        "one-liner": "#888888",
        "warm": "#7fc79b",
        "sidecar-readyz": "#c9a227",
        "sidecar-startz": "#2a9d5c",
    }
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 0.5 + 1.7 * len(rows)), squeeze=False)
    for axis, (storage, ranks) in zip(axes[:, 0], rows, strict=True):
        here = [c for c in cells if (c.storage, c.ranks) == (storage, ranks) and c.loaded_s]
        one = _find(cells, storage, ranks, "one-liner")
        labels = [MODE_LABELS[c.mode].replace("`", "") for c in here]
        values = [c.loaded_s or 0.0 for c in here]
        axis.barh(labels, values, color=[colors[c.mode] for c in here])
        axis.invert_yaxis()
        for index, cell in enumerate(here):
            note = f" {cell.loaded_s:.1f} s"
            ratio = _ratio(cell, one)
            if ratio is not None and cell.mode != "one-liner":
                note += f" ({ratio:.2f} x one-liner)"
            axis.text(cell.loaded_s or 0.0, index, note, va="center", fontsize=7)
        axis.set_title(f"{STORAGE_LABELS[storage]}, TP {ranks}", fontsize=9, loc="left")
        axis.set_xlim(0, max([*values, 0.001]) * 1.45)
        axis.tick_params(labelsize=7)
        axis.set_xlabel("seconds from pod start to loaded (median, lower is better)", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def render(out: Path, payload: dict[str, Any], machine: dict[str, str]) -> Path:
    """Write ``e2e.md`` and ``e2e.png`` under *out* from a raw payload.

    :param out: results directory.
    :param payload: from :func:`run`.
    :param machine: the machine description (as the bench's other results).
    :return: the Markdown file.
    """
    cells = summarize(payload["records"])
    out.mkdir(parents=True, exist_ok=True)
    chart_note = write_chart(cells, out / "e2e.png")
    config = payload["config"]
    lead = config["startup_s"] if config["lead_s"] is None else config["lead_s"]
    framework = payload["framework"]
    loader = f"torch {payload['torch']}" if framework == "pt" else "numpy (torch is not installed)"
    lines = [
        "# preloader end-to-end: time to a loaded model",
        "",
        f"Run {payload['run_at']}, median of {config['reps']} cold-cache run(s) per cell, modes "
        "interleaved and rotated each round. Ratios are against the one-liner in the same run.",
        "",
        f"Loader: `bench.loader`, safetensors {payload['safetensors']} `safe_open` with "
        f"framework `{framework}` ({loader}), slices on `{config['device']}`; server start-up "
        f"{config['startup_s']:g} s; `serve --start-lead {lead:g}`; "
        f"safetensors {config['shards']} x {config['shard_bytes'] / MiB:.0f} MiB; GGUF "
        f"{config['gguf_bytes'] / MiB:.0f} MiB; S3 {config['s3_latency_ms']:g} ms first byte, "
        f"{config['s3_conn_mibps'] * MiB / 1e6:.0f} MB/s per connection; FUSE "
        f"{config['fuse_stream_mibps']:g} MiB/s per stream, {config['fuse_link_mibps']:g} MiB/s "
        f"in all, {config['fuse_latency_ms']:g} ms per new stream.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()) + ".",
        "",
        "## Targets (issue 11)",
        "",
        *target_checks(cells),
        "",
        "## Time to loaded (median; x: ratio to the one-liner)",
        "",
        *summary_table(cells),
        "",
        "## Every cell",
        "",
        *detail_table(cells),
        "",
    ]
    skipped: dict[str, str] = payload.get("skipped") or {}
    if skipped:
        lines += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()), ""]
    failed = [r for r in payload["records"] if not r["ok"]]
    for record in failed[:5]:
        lines.append(
            f"- failed: {record['storage']} TP {record['ranks']} {record['mode']} "
            f"rep {record['rep']}: {record['error'][-300:]}"
        )
    lines += [chart_note or "![time to loaded per mode and storage](e2e.png)", ""]
    path = out / "e2e.md"
    path.write_text("\n".join(lines))
    return path
