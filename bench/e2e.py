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
``engine-prefetch`` (no warm-up; each rank prefetches
``sorted(shards)[rank::ranks]`` in 16 MiB blocks on 4 background threads from the
moment it starts loading, as vLLM's ``--safetensors-load-strategy prefetch`` and
SGLang's ``--weight-loader-prefetch-checkpoints`` do: :class:`bench.loader.Prefetcher`);
``sidecar-readyz`` (``preloader serve``; the server starts once ``/readyz`` is
200, as a native sidecar's startupProbe would hold it); ``sidecar-startz``
(``preloader serve --start-lead S``; the server starts once ``/startz`` is 200);
``sidecar-startz+engine-prefetch`` (both); ``sidecar-startz+lock`` (``serve --lock``
beside the same sidecar unpinned, in the same run; ``--e2e-serve-lock`` pins every
sidecar instead). A ``/startz`` mode may name its own lead,
``sidecar-startz:19``. The probes are polled every ``--e2e-probe-interval`` seconds
(a kubelet probes every ``periodSeconds``, 1 s at least; a finer poll leaves the
gate's own cost).

The physical bound, measured in the same run (modes ``resident`` and
``fastest-read``, rotated with the others): ``resident`` is the server's start-up
plus its load of a model made fully resident before t0; ``fastest-read`` reads the
whole model as fast as the storage allows (parallel range GETs straight from the S3
server behind s3fs, :mod:`bench.s3get`; 8 MiB ranges on 16 threads through a FUSE
mount or from local disk). The bound of a cell is max(``resident``, the fastest full
read: the best of ``fastest-read``, the one-liner's and ``warm``'s warm-ups): no
mode can end before either. Every mode is reported as a ratio to it.

Shapes (``--e2e-shape``, :data:`SHAPES`): named presets of the model, start-up, lead,
storages and modes, so that one command gives one row of the docs' tables; the other
``--e2e-*`` flags still override a preset.

Storages: ``local`` (the sharded model on local disk), ``s3fs`` (s3fs
``kernel_cache`` over the loopback S3 server serving the same files),
``fuse-gguf`` and ``fuse-sharded`` (the parallel-stream FUSE fixture serving a
single-file GGUF-like model, and the sharded model). Mounted fixtures serve the
real files (``--backing``); cold means those files and the mount's pages are
evicted (``vmtouch -e``, i.e. ``POSIX_FADV_DONTNEED``, only our files). During a
run the backing files are dropped again every 0.5 s: a real store's copy does not
sit in the client's page cache, and on a model of a third of the memory it would
push the mount's pages out (:class:`_BackingDropper`).
"""

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import resource
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
MODES = (
    "cold",
    "one-liner",
    "warm",
    "engine-prefetch",
    "sidecar-readyz",
    "sidecar-startz",
    "sidecar-startz+engine-prefetch",
    "sidecar-startz+lock",
)
BOUND_MODES = ("resident", "fastest-read")  # the physical bound's two halves
ALL_MODES = MODES + BOUND_MODES
DEFAULT_MODES = tuple(m for m in ALL_MODES if m != "sidecar-startz+lock")  # asked for by name
STORAGES = ("local", "s3fs", "fuse-gguf", "fuse-sharded")
PRELOADER_MODES = (
    "warm",
    "sidecar-readyz",
    "sidecar-startz",
    "sidecar-startz+engine-prefetch",
    "sidecar-startz+lock",
)
NO_START_LEAD = "skipped: this preloader has no --start-lead"
MODE_LABELS = {
    "cold": "cold (no warm-up)",
    "one-liner": "one-liner as postStart",
    "warm": "`preloader warm` as postStart",
    "engine-prefetch": "engines' prefetch",
    "sidecar-readyz": "sidecar, gate /readyz",
    "sidecar-startz": "sidecar, gate /startz + lead",
    "sidecar-startz+engine-prefetch": "sidecar /startz + engines' prefetch",
    "sidecar-startz+lock": "sidecar, gate /startz + lead, `--lock`",
    "resident": "server on a resident model",
    "fastest-read": "fastest full read",
}
FASTEST_READ_THREADS = 16
FASTEST_READ_BLOCK = 8 * MiB
STORAGE_LABELS = {
    "local": "local disk, sharded",
    "s3fs": "s3fs over loopback S3, sharded",
    "fuse-gguf": "parallel-stream FUSE, one GGUF file",
    "fuse-sharded": "parallel-stream FUSE, sharded",
}


def split_mode(mode: str) -> tuple[str, float | None]:
    """Split ``sidecar-startz:19`` into its base mode and its own lead (``None``: none).

    :param mode: a mode as given to ``--e2e-modes``.
    :return: the base (one of :data:`ALL_MODES`) and the lead in seconds, or ``None``.
    :raises ValueError: for an unknown base, a lead on a mode without ``/startz`` or a
        lead that is not a number >= 0.
    """
    base, sep, lead = mode.partition(":")
    if base not in ALL_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {list(ALL_MODES)}")
    if not sep:
        return base, None
    if not base.startswith("sidecar-startz"):
        raise ValueError(f"mode {mode!r}: only a sidecar-startz mode takes a lead (:SECONDS)")
    try:
        seconds = float(lead)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"mode {mode!r}: the lead after ':' must be seconds >= 0")
    return base, seconds


def mode_label(mode: str) -> str:
    """The tables' name of *mode* (its own lead, if any, in brackets).

    :param mode: a mode as recorded.
    :return: the label.
    """
    base, lead = split_mode(mode)
    return MODE_LABELS[base] + (f" (lead {lead:g})" if lead is not None else "")


def uses_engine_prefetch(mode: str) -> bool:
    """Whether the ranks prefetch their share as the engines do in *mode*.

    :param mode: a mode as recorded.
    :return: True for ``engine-prefetch`` and ``sidecar-startz+engine-prefetch``.
    """
    return split_mode(mode)[0].endswith("engine-prefetch")


@dataclass(frozen=True)
class E2EConfig:
    """Everything one end-to-end run needs (sizes, fixtures, loader)."""

    storages: tuple[str, ...] = STORAGES
    modes: tuple[str, ...] = DEFAULT_MODES
    ranks: tuple[int, ...] = (4,)
    reps: int = 1  # one round is ~12 minutes on 2 cores; -n 3 for medians
    startup_s: float = 8.0
    lead_s: float | None = None  # None: the start-up delay
    start_min_rate: int | None = None  # serve --start-min-rate, bytes a second (None: none)
    serve_lock: bool = False  # serve --lock: every sidecar pins what it warmed
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
    hold: bool = True  # ranks keep their slices (False: dropped once copied, as on a GPU)
    prefetch_threads: int = 4  # the engines' prefetch: SGLang's default (vLLM's is 8)
    shape: str = "default"

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

    def lead_of(self, mode: str) -> float | None:
        """The lead *mode* runs ``serve`` with: its own, else :attr:`lead`; ``None``
        for a mode without ``/startz``.

        :param mode: a mode as recorded.
        :return: seconds, or ``None``.
        """
        base, own = split_mode(mode)
        if not base.startswith("sidecar-startz"):
            return None
        return self.lead if own is None else own


_LONG_WARMUP_MODES = (
    "cold",
    "one-liner",
    "engine-prefetch",
    "sidecar-startz",
    "sidecar-startz:28",
    "sidecar-startz+engine-prefetch",
    *BOUND_MODES,
)
# Named shapes: what one row of the docs' tables runs. Fields not named keep
# E2EConfig's defaults; --e2e-* flags override either.
SHAPES: dict[str, dict[str, Any]] = {
    # 4 x 512 MiB, 8 s start-up: the warm-up (~5 s through s3fs) is shorter than the start-up.
    "default": {},
    # 8 x 1 GiB through s3fs and the parallel-stream FUSE fixture: the warm-up (~30 s
    # through s3fs) several times the 8 s start-up. Lead 18 = start-up + the resident
    # load (the docs' rule), and 28 as a longer one. Slices are dropped once copied
    # (a GPU holds them, not the host): host memory holds the page cache only.
    "long-warmup": {
        "storages": ("s3fs", "fuse-sharded"),
        "shards": 8,
        "shard_bytes": 1024 * MiB,
        "startup_s": 8.0,
        "lead_s": 18.0,
        "modes": _LONG_WARMUP_MODES,
        "hold": False,
    },
    # 4 x 512 MiB with 30 s of start-up (a large server's imports, CUDA graphs, NCCL).
    "long-startup": {
        "storages": ("s3fs", "fuse-sharded"),
        "startup_s": 30.0,
        "lead_s": 34.0,
        "modes": (
            "cold",
            "one-liner",
            "engine-prefetch",
            "sidecar-startz",
            "sidecar-startz+engine-prefetch",
            *BOUND_MODES,
        ),
        "timeout_s": 400.0,
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the e2e scenario's flags (``--e2e-*``) to the bench's parser.

    :param parser: ``python -m bench``'s parser.
    """
    group = parser.add_argument_group(
        "e2e scenario (--scenarios e2e): time to a loaded model with a real loader"
    )
    group.add_argument(
        "--e2e-shape",
        choices=sorted(SHAPES),
        help="a named preset of model, start-up, lead, storages and modes (default: default)",
    )
    group.add_argument("--e2e-storage", help="comma list from: " + ", ".join(STORAGES))
    group.add_argument(
        "--e2e-modes",
        help="comma list from: " + ", ".join(ALL_MODES) + "; a sidecar-startz mode may name "
        "its own lead, sidecar-startz:19",
    )
    group.add_argument("--e2e-ranks", help="comma list of rank counts (default 4; 1,4,8 for all)")
    group.add_argument("--e2e-startup", type=float, help="server start-up seconds (default 8)")
    group.add_argument("--e2e-lead", type=float, help="serve --start-lead (default: start-up)")
    group.add_argument(
        "--e2e-start-min-rate",
        type=_size,
        help="serve --start-min-rate, bytes a second (200MiB), for every /startz mode",
    )
    group.add_argument(
        "--e2e-serve-lock",
        action="store_true",
        default=None,
        help="serve --lock for every sidecar: the warmed pages are pinned (mlock) until it "
        "stops; the resident mode's model is held by vmtouch -dl",
    )
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


def _modes(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    for value in values:
        split_mode(value)
    return values


def config_from_args(args: argparse.Namespace) -> E2EConfig:
    """Build the configuration from parsed flags (``--smoke`` picks toy defaults).

    A shape (``--e2e-shape``) is applied first, then the flags: with ``--smoke`` only
    its storages and modes are kept (toy sizes and times stay).

    :param args: from the bench's parser.
    :return: the configuration.
    :raises ValueError: for an unknown storage, mode, shape or rank count.
    """
    base = E2EConfig.smoke() if args.smoke else E2EConfig()
    shape = getattr(args, "e2e_shape", None) or "default"
    preset = SHAPES[shape]
    if args.smoke:
        preset = {k: v for k, v in preset.items() if k in ("storages", "modes")}
    base = dataclasses.replace(base, shape=shape, **preset)
    ranks = None
    if args.e2e_ranks:
        ranks = tuple(int(v) for v in args.e2e_ranks.split(",") if v.strip())
        if not ranks or min(ranks) < 1:
            raise ValueError(f"--e2e-ranks must be positive integers, got {args.e2e_ranks!r}")
    overrides = {
        "storages": _csv(args.e2e_storage, STORAGES, "storage"),
        "modes": _modes(args.e2e_modes),
        "ranks": ranks,
        "reps": args.reps,
        "startup_s": args.e2e_startup,
        "lead_s": args.e2e_lead,
        "start_min_rate": getattr(args, "e2e_start_min_rate", None),
        "serve_lock": getattr(args, "e2e_serve_lock", None),
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


def _serve_flags_note(config: dict[str, Any]) -> str:
    rate = config.get("start_min_rate")
    note = f", `--start-min-rate {rate / MiB:g}MiB`" if rate else ""
    locked = ", `--lock` (the resident model held by `vmtouch -dl`)"
    return note + (locked if config.get("serve_lock") else "")


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
    # A shape's model lives in its own folder: switching shapes does not rewrite gigabytes.
    root = data_dir / ("e2e" if config.shape == "default" else f"e2e-{config.shape}")
    sharded = root / "bucket" / "model"  # bucket/ is the S3 server's backing
    gguf_dir = root / "gguf"
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
    target: Target,
    ranks: int,
    config: E2EConfig,
    framework: str,
    env: dict[str, str],
    prefetch: bool = False,
) -> list[subprocess.Popen[str]]:
    not_before = time.monotonic() + config.startup_s
    count = 1 if target.load_path.suffix == ".gguf" else ranks
    procs = []
    for rank in range(count):
        argv = [sys.executable, "-m", "bench.loader", str(target.load_path)]
        argv += ["--rank", str(rank), "--ranks", str(count), "--framework", framework]
        argv += ["--device", config.device, "--not-before", f"{not_before:.6f}"]
        if prefetch:
            argv += ["--prefetch", "--prefetch-threads", str(config.prefetch_threads)]
        if not config.hold:
            argv.append("--discard")
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


class _BackingDropper(threading.Thread):
    """Drop the fixture's backing files from the page cache every *interval_s* seconds.

    The S3 server and the FUSE fixture read the model from local backing files, whose
    pages would sit in this machine's page cache beside the mount's own: twice the
    model, where a real object store keeps its copy on another machine. On a model
    near half the memory the kernel then reclaims the mount's pages (the warm-up's
    oldest) and the storage is asked for them again. ``POSIX_FADV_DONTNEED`` on the
    backing files only (never the mount's) keeps the fixture's copy off the machine.
    """

    def __init__(self, paths: list[Path], interval_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="backing-dropper")
        self.paths = paths
        self.interval_s = interval_s
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            for path in self.paths:
                with contextlib.suppress(OSError):
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)


def _backing_files(target: Target) -> list[Path]:
    """The fixture's backing files (none for local disk, where they are the model)."""
    if target.storage == "local":
        return []
    files: list[Path] = []
    for root in target.evict[1:]:
        files += [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else [root]
    return files


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
    base, _ = split_mode(mode)
    if base == "one-liner":
        script = f'MODEL_DIR="$1" PRELOADER_CONC=4; {ONE_LINER}'
        return ["sh", "-c", script, "sh", str(target.model_dir)]
    if base == "warm":
        return preloader_argv(target.model_dir, None)
    if base == "fastest-read":
        if target.s3_url:  # straight from the S3 server: no FUSE, no page cache
            argv = [sys.executable, "-m", "bench.s3get", target.s3_url, "models", "model/"]
            argv += ["--connections", str(FASTEST_READ_THREADS)]
            return [*argv, "--range-size", str(FASTEST_READ_BLOCK)]
        argv = [sys.executable, "-m", "bench.loader", str(target.model_dir), "--read-all"]
        argv += ["--prefetch-threads", str(FASTEST_READ_THREADS)]
        return [*argv, "--prefetch-block", str(FASTEST_READ_BLOCK)]
    if base.startswith("sidecar"):
        argv = [sys.executable, "-m", "preloader", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(port)]
        lead = config.lead_of(mode)
        if lead is not None:
            argv += ["--start-lead", f"{lead:g}"]
            if config.start_min_rate:
                argv += ["--start-min-rate", str(config.start_min_rate)]
        if config.serve_lock or base.endswith("+lock"):
            argv.append("--lock")
        return argv
    return None


_BUSY = (0, 1, 2, 5, 6, 7)  # /proc/stat cpu: user nice system (idle iowait) irq softirq steal


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``).

    :return: seconds (user, nice, system, irq, softirq and steal, all CPUs).
    """
    with open("/proc/stat") as handle:
        fields = handle.readline().split()[1:]
    return sum(int(fields[i]) for i in _BUSY if i < len(fields)) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _serve_events(log: IO[str], t0_wall: float) -> list[list[Any]]:
    """``[event, seconds from t0, detail]`` for each line of ``serve``'s JSON log."""
    log.seek(0)
    events: list[list[Any]] = []
    for line in log.read().splitlines():
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError, KeyError, TypeError):
            entry = json.loads(line)
            stamp = datetime.datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00"))
            events.append(
                [entry["event"], round(stamp.timestamp() - t0_wall, 3), entry.get("detail", "")]
            )
    return events[:40]


def complete_at(
    gets: list[s3trace.Get], sizes: dict[str, int], fraction: float = 1.0
) -> dict[str, float]:
    """When each object had first been sent whole (or *fraction* of it): the end of the
    GET that got it there.

    :param gets: the S3 server's GET log.
    :param sizes: object name (the key's last part) to size.
    :param fraction: of the object's bytes, 1.0 for all.
    :return: name to ``time.monotonic()``; an object never sent so far gets the end of
        its last GET.
    """
    by_key: dict[str, list[s3trace.Get]] = {}
    for get in gets:
        by_key.setdefault(get.key.rsplit("/", 1)[-1], []).append(get)
    found: dict[str, float] = {}
    for name, mine in by_key.items():
        covered: list[tuple[int, int]] = []  # merged [first, end) ranges
        found[name] = max(g.end for g in mine)
        for get in sorted(mine, key=lambda g: g.end):
            covered = _merge([*covered, (get.first, get.first + get.sent)])
            if sum(end - first for first, end in covered) >= fraction * sizes.get(name, 0) > 0:
                found[name] = get.end
                break
    return found


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for first, end in sorted(ranges):
        if merged and first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((first, end))
    return merged


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
    :param mode: one of :data:`ALL_MODES`, a ``/startz`` mode perhaps with its lead.
    :param ranks: tensor-parallel rank processes.
    :param rep: repetition number, for the record.
    :param config: the run's configuration.
    :param framework: ``pt`` or ``np``.
    :param env: the children's environment.
    :return: a JSON-ready record (times in seconds from t0).
    """
    base, _ = split_mode(mode)
    for path in target.evict:
        measure.evict(path)
    pinned: int | None = None  # a vmtouch -dl daemon's pid
    if base == "resident" and config.serve_lock:
        # Fetched before t0 and held, as the sidecars' --lock holds theirs: the load alone.
        with tempfile.TemporaryDirectory() as scratch:
            pinned = measure.pin(target.model_dir, Path(scratch) / "vmtouch.pid")
    elif base == "resident":
        measure.touch(target.model_dir)  # fetched before t0: the load alone is timed
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
        "lead_s": config.lead_of(mode),
        "framework": framework,
        "device": config.device,
        "load_avg": list(os.getloadavg()),
        "ok": False,
        "error": "",
    }
    warmer: subprocess.Popen[str] | None = None
    exited: _Exit | None = None
    logs = (tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+"))  # noqa: SIM115
    probes: list[_Probe] = []
    procs: list[subprocess.Popen[str]] = []
    dropper = _BackingDropper(_backing_files(target))
    dropper.start()
    busy_before, children_before = machine_busy_s(), _children_cpu_s()
    t0 = time.monotonic()
    t0_wall = time.time()
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
        if base.startswith("sidecar"):
            url = f"http://127.0.0.1:{port}"
            probes = [_Probe(url + "/readyz", config.probe_interval_s)]
            if base.startswith("sidecar-startz"):
                probes.append(_Probe(url + "/startz", config.probe_interval_s))
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
        if base != "fastest-read":
            procs = _spawn_ranks(
                target, ranks, config, framework, env, prefetch=uses_engine_prefetch(mode)
            )
        done: list[dict[str, Any]] = []
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            line = (out.strip().splitlines() or [""])[-1]
            if proc.returncode != 0 or not line.startswith("{"):
                raise RuntimeError(f"rank exited {proc.returncode}: {err.strip()[-600:]}")
            done.append(json.loads(line))
        if done:
            record["loaded_s"] = max(r["done"] for r in done) - t0
            record["first_read_s"] = min(r["start"] for r in done) - t0
            record["ranks_ready_s"] = max(r["ready"] for r in done) - t0
            record["copied_bytes"] = sum(r["bytes"] for r in done)
            record["ranks_cpu_s"] = sum(r.get("cpu_s", 0.0) for r in done)
            # When each rank finished each shard: the load's order against the warm-up's.
            record["rank_shards"] = [
                [[name, round(at - t0, 3)] for name, at in r.get("shards", [])] for r in done
            ]
            prefetched = [r["prefetch"] for r in done if "prefetch" in r]
            if prefetched:
                record["prefetch"] = [
                    {
                        "files": p["files"],
                        "bytes": p["bytes"],
                        "done_s": None if p["done"] is None else round(p["done"] - t0, 3),
                    }
                    for p in prefetched
                ]
        if warmer is not None and exited is not None and not base.startswith("sidecar"):
            exited.join(max(1.0, deadline - time.monotonic()))
            if exited.at is None:
                raise RuntimeError(f"the warm-up ran past {config.timeout_s:.0f} s")
            record["warmup_s"] = exited.at - t0
            record["warmup_exit"] = warmer.returncode
            if base == "warm":
                logs[0].seek(0)
                lines = [ln for ln in logs[0].read().splitlines() if ln.startswith("{")]
                report = json.loads(lines[-1]) if lines else {}
                record["preloader"] = {
                    k: report.get(k) for k in ("files", "bytes", "resident_bytes", "seconds")
                }
            if warmer.returncode != 0:
                raise RuntimeError(f"warm-up exited {warmer.returncode}: {_tail(logs[1])}")
        if base.startswith("sidecar"):
            ready = probes[0]
            if not ready.opened.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("/readyz never opened")
            record["warmup_s"] = (ready.opened_at or time.monotonic()) - t0
        record["ok"] = True
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as err:
        record["error"] = str(err)[-800:]
    finally:
        dropper.stop.set()
        for probe in probes:
            probe.stop.set()
        for proc in procs:
            _kill(proc)
        _kill(warmer)
        if pinned is not None:
            measure.unpin(pinned)
        # CPU over the run: every process on the machine (the FUSE client, the fixture,
        # other sessions), and our children alone (the ranks and the warm-up).
        record["machine_cpu_s"] = machine_busy_s() - busy_before
        record["children_cpu_s"] = _children_cpu_s() - children_before
        record["wall_s"] = time.monotonic() - t0
        if base.startswith("sidecar"):
            record["serve_events"] = _serve_events(logs[1], t0_wall)
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
        gets = s3trace.fetch_gets(target.s3_url)
        if gets:
            # When each object had first been sent whole, the last of those (the model's
            # last byte, refetches aside), and the end of the last GET of all.
            sizes = {p.name: p.stat().st_size for p in target.model_dir.iterdir() if p.is_file()}
            arrived = complete_at(gets, sizes)
            record["fetch_end"] = {k: round(v - t0, 3) for k, v in sorted(arrived.items())}
            record["last_byte_s"] = max(arrived.values()) - t0
            record["last_get_s"] = max(g.end for g in gets) - t0
            # When half of each had arrived: the warm-up's order (a stream per file).
            half = complete_at(gets, sizes, 0.5)
            record["fetch_half"] = {k: round(v - t0, 3) for k, v in sorted(half.items())}
            # The first 3 s of GETs: what the warm-up's start asked the storage for.
            record["early_gets"] = [
                [g.key.rsplit("/", 1)[-1], g.first, g.sent, round(g.start - t0, 3)]
                for g in gets
                if g.start - t0 < 3.0
            ][:80]
        found = s3trace.overlaps(gets)
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
    modes = [m for m in config.modes if start_lead or config.lead_of(m) is None]
    skipped: dict[str, str] = {}
    for mode in config.modes:
        if mode not in modes:
            skipped[mode] = NO_START_LEAD
            say(f"e2e: {mode} {NO_START_LEAD}")
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
    # One llama.cpp-like process maps the GGUF file: no engine prefetch there.
    gguf_modes = [m for m in modes if not uses_engine_prefetch(m)]
    total = sum(
        config.reps * (len(gguf_modes) if s == "fuse-gguf" else len(modes) * len(config.ranks))
        for s in storages
    )
    started = time.monotonic()
    for storage in storages:
        with _storage(storage, config, data_dir, say) as target:
            rank_counts = (1,) if storage == "fuse-gguf" else config.ranks
            here = gguf_modes if storage == "fuse-gguf" else modes
            for rep in range(config.reps):
                for ranks in rank_counts:
                    order = here[rep % len(here) :] + here[: rep % len(here)]
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
                            f"{record.get('loaded_s', float('nan')):.2f}s warm-up "
                            f"{record.get('warmup_s', float('nan')):.2f}s resident "
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
    last_byte_s: float | None = None
    after_last_byte_s: float | None = None
    ranks_cpu_s: float | None = None
    machine_cpu_s: float | None = None
    fetched_max: float | None = None
    startup_s: float | None = None


@dataclass(frozen=True)
class Bound:
    """The physical bound of one storage x ranks: no mode can end before it."""

    resident_s: float | None  # start-up + the server's load of a resident model
    startup_s: float | None
    fastest_read_s: float | None  # the best full read of the model
    fastest_by: str | None  # the mode that read it so fast
    bound_s: float | None  # max(resident_s, fastest_read_s)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _mode_order(mode: str) -> tuple[int, float]:
    base, lead = split_mode(mode)
    return ALL_MODES.index(base), -1.0 if lead is None else lead


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
                _median([r["loaded_s"] for r in ok if "loaded_s" in r]),
                _median([r["gate_s"] for r in ok if "gate_s" in r]),
                _median([r["first_read_s"] for r in ok if "first_read_s" in r]),
                _median([r["warmup_s"] for r in ok if "warmup_s" in r]),
                min(r["resident_after"] for r in runs),
                _median(fetched),
                _median([r["last_byte_s"] for r in ok if "last_byte_s" in r]),
                _median(
                    [
                        r["loaded_s"] - r["last_byte_s"]
                        for r in ok
                        if "loaded_s" in r and "last_byte_s" in r
                    ]
                ),
                _median([r["ranks_cpu_s"] for r in ok if "ranks_cpu_s" in r]),
                _median([r["machine_cpu_s"] for r in ok if "machine_cpu_s" in r]),
                max(fetched) if fetched else None,
                _median([r["startup_s"] for r in ok if "startup_s" in r]),
            )
        )
    return sorted(cells, key=lambda c: (STORAGES.index(c.storage), c.ranks, _mode_order(c.mode)))


def _find(cells: list[Cell], storage: str, ranks: int, mode: str) -> Cell | None:
    return next((c for c in cells if (c.storage, c.ranks, c.mode) == (storage, ranks, mode)), None)


def _ratio(cell: Cell | None, base: Cell | None) -> float | None:
    if cell and base and cell.loaded_s and base.loaded_s:
        return cell.loaded_s / base.loaded_s
    return None


def bound_of(cells: list[Cell], storage: str, ranks: int) -> Bound:
    """The physical bound of one row, from the same run's cells.

    bound = max(start-up + the server's load of a resident model, the fastest full
    read of the model: the best warm-up of ``fastest-read``, the one-liner and
    ``warm``). Either half is ``None`` when its cells did not run; the bound is
    ``None`` unless both ran.

    :param cells: from :func:`summarize`.
    :param storage: the row's storage.
    :param ranks: the row's rank count.
    :return: the bound and its parts.
    """
    resident = _find(cells, storage, ranks, "resident")
    resident_s = resident.loaded_s if resident else None
    reads = [
        (cell.warmup_s, mode)
        for mode in ("fastest-read", "one-liner", "warm")
        if (cell := _find(cells, storage, ranks, mode)) is not None and cell.warmup_s
    ]
    fastest_s, by = min(reads) if reads else (None, None)
    bound = max(resident_s, fastest_s) if resident_s and fastest_s else None
    startup = resident.startup_s if resident else None
    return Bound(resident_s, startup, fastest_s, by, bound)


def _vs_bound(cell: Cell | None, bound: Bound) -> float | None:
    if cell and cell.loaded_s and bound.bound_s:
        return cell.loaded_s / bound.bound_s
    return None


def _fmt(value: float | None, suffix: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _timed_modes(cells: list[Cell], modes: tuple[str, ...] | None) -> list[str]:
    present = sorted(
        {c.mode for c in cells if split_mode(c.mode)[0] != "fastest-read"}, key=_mode_order
    )
    if modes is not None:
        present = [m for m in present if split_mode(m)[0] in modes]
    return present


def summary_table(cells: list[Cell], modes: tuple[str, ...] | None = None) -> list[str]:
    """The README table: one row per storage and rank count, one column per mode.

    Each cell: median time to loaded, then its ratios: to the one-liner (bare ``x``),
    to the engines' prefetch (``x prefetch``) and to the physical bound (``x bound``),
    each where this run has it.

    :param cells: from :func:`summarize`.
    :param modes: the base modes to show (default: every mode this run has).
    :return: Markdown lines.
    """
    present = _timed_modes(cells, modes)
    lines = [
        "| storage | TP | " + " | ".join(mode_label(m) for m in present) + " | bound |",
        "|---|--:|" + "--:|" * len(present) + "--:|",
    ]
    rows = dict.fromkeys((c.storage, c.ranks) for c in cells)
    for storage, ranks in rows:
        one = _find(cells, storage, ranks, "one-liner")
        pre = _find(cells, storage, ranks, "engine-prefetch")
        bound = bound_of(cells, storage, ranks)
        parts = []
        for mode in present:
            cell = _find(cells, storage, ranks, mode)
            if cell is None or cell.loaded_s is None:
                parts.append("failed" if cell else "-")
                continue
            ratios = []
            if mode != "one-liner" and (r := _ratio(cell, one)) is not None:
                ratios.append(f"{r:.2f} x")
            if mode != "engine-prefetch" and (r := _ratio(cell, pre)) is not None:
                ratios.append(f"{r:.2f} x prefetch")
            if (r := _vs_bound(cell, bound)) is not None:
                ratios.append(f"{r:.2f} x bound")
            text = f"{cell.loaded_s:.1f} s"
            parts.append(text + (f" ({', '.join(ratios)})" if ratios else ""))
        parts.append(_fmt(bound.bound_s, " s"))
        lines.append(f"| {STORAGE_LABELS[storage]} | {ranks} | " + " | ".join(parts) + " |")
    return lines


def bound_table(cells: list[Cell]) -> list[str]:
    """Per row: the two halves of the bound, and what set each.

    :param cells: from :func:`summarize`.
    :return: Markdown lines (none when no row has a half of the bound).
    """
    rows = dict.fromkeys((c.storage, c.ranks) for c in cells)
    lines = []
    for storage, ranks in rows:
        bound = bound_of(cells, storage, ranks)
        if bound.resident_s is None and bound.fastest_read_s is None:
            continue
        direct = _find(cells, storage, ranks, "fastest-read")
        one = _find(cells, storage, ranks, "one-liner")
        warm = _find(cells, storage, ranks, "warm")
        load = (
            bound.resident_s - bound.startup_s
            if bound.resident_s is not None and bound.startup_s is not None
            else None
        )
        lines.append(
            f"| {STORAGE_LABELS[storage]} | {ranks} | {_fmt(bound.startup_s)} | {_fmt(load)} "
            f"| {_fmt(bound.resident_s)} | {_fmt(direct.warmup_s if direct else None)} "
            f"| {_fmt(one.warmup_s if one else None)} | {_fmt(warm.warmup_s if warm else None)} "
            f"| {_fmt(bound.fastest_read_s)} ({bound.fastest_by or '-'}) "
            f"| **{_fmt(bound.bound_s)}** |"
        )
    if not lines:
        return []
    return [
        "| storage | TP | start-up s | resident load s | start-up + load s | parallel read "
        "straight from the storage s | one-liner's warm-up s | `warm` s | fastest full read s "
        "| bound s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        *lines,
    ]


def detail_table(cells: list[Cell]) -> list[str]:
    """Every cell with its gate, first read, warm-up end, last byte, residency, fetched
    bytes and CPU.

    :param cells: from :func:`summarize`.
    :return: Markdown lines.
    """
    lines = [
        "| storage | TP | mode | runs | loaded s | vs one-liner | vs engines' prefetch "
        "| vs bound | vs cold | gate open s | first read s | warm-up done s | last byte s "
        "| loaded after last byte s | resident after (min) | fetched / model (median, max) "
        "| ranks' CPU s | machine CPU s |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for cell in cells:
        one = _find(cells, cell.storage, cell.ranks, "one-liner")
        pre = _find(cells, cell.storage, cell.ranks, "engine-prefetch")
        cold = _find(cells, cell.storage, cell.ranks, "cold")
        bound = bound_of(cells, cell.storage, cell.ranks)
        runs = f"{cell.runs}" + (f" ({cell.failed} failed)" if cell.failed else "")
        fetched = _fmt(cell.fetched_ratio, " x", 2)
        if cell.fetched_max is not None and cell.fetched_ratio is not None:
            fetched += f", {cell.fetched_max:.2f} x"
        lines.append(
            f"| {cell.storage} | {cell.ranks} | {mode_label(cell.mode)} | {runs} "
            f"| {_fmt(cell.loaded_s, digits=2)} | {_fmt(_ratio(cell, one), ' x', 2)} "
            f"| {_fmt(_ratio(cell, pre), ' x', 2)} | {_fmt(_vs_bound(cell, bound), ' x', 2)} "
            f"| {_fmt(_ratio(cell, cold), ' x', 2)} | {_fmt(cell.gate_s)} "
            f"| {_fmt(cell.first_read_s)} | {_fmt(cell.warmup_s)} | {_fmt(cell.last_byte_s)} "
            f"| {_fmt(cell.after_last_byte_s)} | {cell.resident_min * 100:.2f}% "
            f"| {fetched} | {_fmt(cell.ranks_cpu_s)} | {_fmt(cell.machine_cpu_s)} |"
        )
    return lines


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def target_checks(cells: list[Cell]) -> list[str]:
    """The targets, as ratios of medians in this run.

    :param cells: from :func:`summarize`.
    :return: Markdown bullet lines (only the checks this run has data for).
    """
    lines = []

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
                    f"<= 0.6 x cold: {_verdict(vs_one <= 0.95 and vs_cold <= 0.6)} "
                    f"({vs_one:.2f} x, {vs_cold:.2f} x)"
                )
    vs_one = ratio("fuse-gguf", 1, "sidecar-startz", "one-liner")
    if vs_one is not None:
        lines.append(
            f"- parallel-stream FUSE, one GGUF file: sidecar on /startz <= 0.5 x one-liner: "
            f"{_verdict(vs_one <= 0.5)} ({vs_one:.2f} x)"
        )
    for storage in ("fuse-sharded", "local"):
        for ranks in sorted({c.ranks for c in cells if c.storage == storage}):
            worst = [
                (r, c.mode)
                for c in cells
                if (c.storage, c.ranks) == (storage, ranks)
                and split_mode(c.mode)[0] in PRELOADER_MODES
                and (r := ratio(storage, ranks, c.mode, "one-liner")) is not None
            ]
            if worst:
                value, mode = max(worst)
                lines.append(
                    f"- {STORAGE_LABELS[storage]}, TP {ranks}: no preloader mode slower than "
                    f"the one-liner: {_verdict(value <= 1.0)} (slowest: {mode_label(mode)}, "
                    f"{value:.2f} x)"
                )
    lines += _prefetch_checks(cells)
    pre = [c for c in cells if split_mode(c.mode)[0] in PRELOADER_MODES]
    if pre:
        low = min(pre, key=lambda c: c.resident_min)
        lines.append(
            f"- >= 99.9% resident after every preloader mode (vmtouch): "
            f"{_verdict(low.resident_min >= 0.999)} (lowest {low.resident_min * 100:.2f}%, "
            f"{low.storage} {mode_label(low.mode)})"
        )
        fetched = [c for c in pre if c.fetched_max is not None]
        if fetched:
            high = max(fetched, key=lambda c: c.fetched_max or 0.0)
            lines.append(
                f"- <= 1.02 x the model fetched in every preloader run: "
                f"{_verdict((high.fetched_max or 0.0) <= 1.02)} (highest "
                f"{high.fetched_max:.2f} x, {high.storage} {mode_label(high.mode)})"
            )
    return lines


def _prefetch_checks(cells: list[Cell]) -> list[str]:
    """The checks against the engines' prefetch and the one-liner on long warm-ups."""
    lines = []
    for storage, ranks in dict.fromkeys((c.storage, c.ranks) for c in cells):
        here = [c for c in cells if (c.storage, c.ranks) == (storage, ranks)]
        pre = _find(cells, storage, ranks, "engine-prefetch")
        one = _find(cells, storage, ranks, "one-liner")
        bound = bound_of(cells, storage, ranks)
        name = f"{STORAGE_LABELS[storage]}, TP {ranks}"
        startz = [c for c in here if split_mode(c.mode)[0] == "sidecar-startz"]
        for cell in startz:
            if (r := _ratio(cell, pre)) is not None:
                lines.append(
                    f"- {name}: {mode_label(cell.mode)} <= 0.80 x the engines' prefetch: "
                    f"{_verdict(r <= 0.80)} ({r:.2f} x)"
                )
        both = _find(cells, storage, ranks, "sidecar-startz+engine-prefetch")
        alone = _find(cells, storage, ranks, "sidecar-startz")
        if (r := _ratio(both, alone)) is not None:
            lines.append(
                f"- {name}: sidecar + the engines' prefetch <= 1.05 x the sidecar alone: "
                f"{_verdict(r <= 1.05)} ({r:.2f} x)"
            )
        startup = one.startup_s if one else None
        if one and one.warmup_s and startup and one.warmup_s >= 2 * startup:
            for cell in startz:
                if (r := _ratio(cell, one)) is not None:
                    vs = _vs_bound(cell, bound)
                    lines.append(
                        f"- {name} (warm-up {one.warmup_s:.0f} s >= 2 x the {startup:g} s "
                        f"start-up): {mode_label(cell.mode)} <= 0.90 x the one-liner: "
                        f"{_verdict(r <= 0.90)} ({r:.2f} x; {_fmt(vs, ' x', 2)} the bound)"
                    )
    return lines


_COLORS = {
    "cold": "#bbbbbb",
    "one-liner": "#888888",
    "warm": "#7fc79b",
    "engine-prefetch": "#4c72b0",
    "sidecar-readyz": "#c9a227",
    "sidecar-startz": "#2a9d5c",
    "sidecar-startz+engine-prefetch": "#1d6b40",
    "sidecar-startz+lock": "#5fbf8a",
    "resident": "#dddddd",
}


def write_chart(cells: list[Cell], path: Path) -> str | None:
    """Draw time to loaded per mode, one panel per storage and rank count, with the bound.

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
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 0.5 + 2.0 * len(rows)), squeeze=False)
    for axis, (storage, ranks) in zip(axes[:, 0], rows, strict=True):
        here = [c for c in cells if (c.storage, c.ranks) == (storage, ranks) and c.loaded_s]
        one = _find(cells, storage, ranks, "one-liner")
        bound = bound_of(cells, storage, ranks)
        labels = [mode_label(c.mode).replace("`", "") for c in here]
        values = [c.loaded_s or 0.0 for c in here]
        axis.barh(labels, values, color=[_COLORS[split_mode(c.mode)[0]] for c in here])
        axis.invert_yaxis()
        if bound.bound_s:
            axis.axvline(bound.bound_s, color="#c0392b", linestyle="--", linewidth=1)
            axis.text(bound.bound_s, -0.6, " bound", color="#c0392b", fontsize=7)
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
    loads = [r["load_avg"][0] for r in payload["records"] if r.get("load_avg")]
    held = (
        "held"
        if config.get("hold", True)
        else "dropped once copied (a GPU would hold them, not the host)"
    )
    lines = [
        "# preloader end-to-end: time to a loaded model",
        "",
        f"Shape `{config.get('shape', 'default')}`. Run {payload['run_at']}, median of "
        f"{config['reps']} cold-cache run(s) per cell, modes interleaved and rotated each "
        "round. Ratios are against the one-liner, the engines' prefetch and the physical "
        "bound in the same run.",
        "",
        f"Loader: `bench.loader`, safetensors {payload['safetensors']} `safe_open` with "
        f"framework `{framework}` ({loader}), slices on `{config['device']}`, {held}; server "
        f"start-up {config['startup_s']:g} s; `serve --start-lead {lead:g}` unless the mode "
        f"names its own{_serve_flags_note(config)}; the engines' prefetch on "
        f"{config.get('prefetch_threads', 4)} threads "
        f"per rank in 16 MiB blocks; safetensors {config['shards']} x "
        f"{config['shard_bytes'] / MiB:.0f} MiB; GGUF "
        f"{config['gguf_bytes'] / MiB:.0f} MiB; S3 {config['s3_latency_ms']:g} ms first byte, "
        f"{config['s3_conn_mibps'] * MiB / 1e6:.0f} MB/s per connection; FUSE "
        f"{config['fuse_stream_mibps']:g} MiB/s per stream, {config['fuse_link_mibps']:g} MiB/s "
        f"in all, {config['fuse_latency_ms']:g} ms per new stream.",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()) + ".",
    ]
    if loads:
        lines.append(
            f"Load average (1 min) at the runs' starts: {min(loads):.1f}-{max(loads):.1f} "
            f"(median {statistics.median(loads):.1f})."
        )
    lines += [
        "",
        "## Targets",
        "",
        *target_checks(cells),
        "",
        "## Time to loaded (median)",
        "",
        "x: ratio to the one-liner; x prefetch: to the engines' prefetch; x bound: to the "
        "physical bound, max(start-up + the load of a resident model, the fastest full read).",
        "",
        *summary_table(cells),
        "",
    ]
    bounds = bound_table(cells)
    if bounds:
        lines += ["## The physical bound", "", *bounds, ""]
    lines += [
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
