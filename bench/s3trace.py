"""Which object bytes a client fetched more than once, from the S3 server's GET log.

The loopback S3 server (:mod:`bench.s3server`) logs every object GET: key, first and last
byte asked for, bytes sent, start and end (``time.monotonic()``). :func:`overlaps` turns
that log into the bytes fetched twice or more, range by range, with the times of every
fetch that covered them, so a duplicate can be placed: at the warm-up's frontier, behind
it, or in a retry.

``python -m bench.s3trace`` is the harness that reproduces a run of the e2e scenario in
small: objects served through s3fs (``kernel_cache``, the e2e fixture's options), a
warm-up (``preloader warm``, ``preloader serve``, the one-liner or none) started at t0,
and a reader (the e2e loader's ranks, ``dd`` or an ``mmap`` walk) started at a given
time or when ``/startz`` opens. It prints what was fetched twice, and when.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Get", "Overlap", "duplicate_bytes", "fetch_gets", "overlaps", "vm_counters"]

MiB = 2**20


@dataclass(frozen=True)
class Get:
    """One object GET as the server saw it: bytes ``[first, first + sent)`` of ``key``."""

    key: str
    first: int
    last: int
    sent: int
    start: float
    end: float

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> "Get":
        """One entry of ``/_bench/gets``."""
        return cls(
            str(entry["key"]),
            int(entry["first"]),
            int(entry["last"]),
            int(entry["sent"]),
            float(entry["start"]),
            float(entry.get("end", entry["start"])),
        )


@dataclass(frozen=True)
class Overlap:
    """Bytes ``[first, end)`` of ``key`` that ``count`` GETs fetched (count >= 2)."""

    key: str
    first: int
    end: int
    count: int
    starts: tuple[float, ...]  # when each covering GET started, in time order

    @property
    def extra_bytes(self) -> int:
        """Bytes fetched beyond the first time."""
        return (self.end - self.first) * (self.count - 1)


def fetch_gets(stats_url: str, reset: bool = False) -> list[Get]:
    """The server's GET log (``/_bench/gets``), optionally clearing it.

    :param stats_url: the server's base URL (``http://127.0.0.1:PORT``).
    :param reset: clear the log after reading it.
    :return: the GETs in arrival order.
    """
    url = f"{stats_url}/_bench/gets" + ("?reset=1" if reset else "")
    with urllib.request.urlopen(url, timeout=10) as reply:
        payload = json.load(reply)
    return [Get.from_json(entry) for entry in payload["gets"]]


def overlaps(gets: Iterable[Get]) -> list[Overlap]:
    """Every byte range fetched more than once, per key, merged where counts agree.

    Pure interval arithmetic over the bytes each GET actually sent.

    :param gets: the log.
    :return: overlaps ordered by key and offset.
    """
    by_key: dict[str, list[Get]] = {}
    for get in gets:
        if get.sent > 0:
            by_key.setdefault(get.key, []).append(get)
    found: list[Overlap] = []
    for key in sorted(by_key):
        items = by_key[key]
        edges = sorted({g.first for g in items} | {g.first + g.sent for g in items})
        current: Overlap | None = None
        for lo, hi in itertools.pairwise(edges):
            covering = sorted(g.start for g in items if g.first <= lo and g.first + g.sent >= hi)
            if len(covering) < 2:
                if current is not None:
                    found.append(current)
                    current = None
                continue
            starts = tuple(covering)
            if current is not None and current.end == lo and current.starts == starts:
                current = Overlap(key, current.first, hi, current.count, starts)
                continue
            if current is not None:
                found.append(current)
            current = Overlap(key, lo, hi, len(covering), starts)
        if current is not None:
            found.append(current)
    return found


def duplicate_bytes(gets: Iterable[Get]) -> int:
    """Bytes fetched beyond the first fetch of each byte, over the whole log."""
    return sum(o.extra_bytes for o in overlaps(gets))


VM_COUNTERS = ("drop_pagecache", "pgsteal_file", "workingset_refault_file", "pgscan_direct")
"""Machine-wide ``/proc/vmstat`` counters that tell whether pages were taken away during a
run: another process's ``drop_caches``, reclaim, refaults."""


def vm_counters(path: str = "/proc/vmstat") -> dict[str, int]:
    """The :data:`VM_COUNTERS` now (those the kernel has)."""
    values: dict[str, int] = {}
    with open(path) as table:
        for line in table:
            name, _, value = line.partition(" ")
            if name in VM_COUNTERS:
                values[name] = int(value)
    return values


# --- the harness ------------------------------------------------------------------


def _evict(paths: Sequence[Path]) -> None:
    from . import measure

    for path in paths:
        measure.evict(path)


def _reader_argv(
    kind: str, model: Path, files: Sequence[Path], rank: int, ranks: int, framework: str
) -> list[str]:
    if kind == "loader":
        argv = [sys.executable, "-m", "bench.loader", str(model), "--rank", str(rank)]
        return [*argv, "--ranks", str(ranks), "--framework", framework]
    shard = files[rank % len(files)]
    if kind == "dd":
        return ["dd", f"if={shard}", "of=/dev/null", "bs=1M", "status=none"]
    walk = (
        "import mmap,sys\n"
        "f=open(sys.argv[1],'rb'); m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\n"
        "s=0\n"
        "for o in range(0,len(m),4096): s+=m[o]\n"
    )
    return [sys.executable, "-c", walk, str(shard)]


def _warmer_argv(kind: str, model: Path, port: int, lead: float) -> list[str] | None:
    from .tools import ONE_LINER

    if kind == "warm":
        return [sys.executable, "-m", "preloader", "warm", "--json", str(model)]
    if kind == "serve":
        argv = [sys.executable, "-m", "preloader", "serve", "--host", "127.0.0.1"]
        return [*argv, "--port", str(port), "--start-lead", f"{lead:g}", str(model)]
    if kind == "one-liner":
        return ["sh", "-c", f'MODEL_DIR="$1" PRELOADER_CONC=4; {ONE_LINER}', "sh", str(model)]
    return None


def _wait_open(url: str, deadline: float) -> float:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return time.monotonic()
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not open")


def trace_once(
    args: argparse.Namespace, model: Path, backing: Path, base_url: str
) -> dict[str, Any]:
    """One run: evict, start the warm-up at t0 and the readers later; read the GET log."""
    from .e2e import _free_port

    files = sorted(model.glob("*.safetensors"))
    _evict([model, backing])
    fetch_gets(base_url, reset=True)
    before = vm_counters()
    port = _free_port()
    env = dict(os.environ)
    warmer_argv = _warmer_argv(args.warmer, model, port, args.start_lead)
    t0 = time.monotonic()
    warmer = None
    if warmer_argv:
        warmer = subprocess.Popen(
            warmer_argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
    if args.reader_at.startswith("startz"):
        delay = float(args.reader_at.partition("+")[2] or 0)
        reader_at = _wait_open(f"http://127.0.0.1:{port}/startz", t0 + 300) - t0 + delay
        time.sleep(max(0.0, t0 + reader_at - time.monotonic()))
    else:
        reader_at = float(args.reader_at)
        time.sleep(max(0.0, t0 + reader_at - time.monotonic()))
    readers = []
    if args.reader != "none":
        for rank in range(args.ranks):
            argv = _reader_argv(args.reader, model, files, rank, args.ranks, args.framework)
            readers.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=env))
    for reader in readers:
        reader.wait()
    readers_done = time.monotonic() - t0
    warm_done = None
    if warmer is not None:
        if args.warmer == "serve":
            _wait_open(f"http://127.0.0.1:{port}/readyz", t0 + 300)
            warm_done = time.monotonic() - t0
            warmer.terminate()
        warmer.wait()
        warm_done = warm_done if warm_done is not None else time.monotonic() - t0
    gets = fetch_gets(base_url)
    found = overlaps(gets)
    from . import measure

    resident = measure.residency(model)
    vmstat = {k: v - before[k] for k, v in vm_counters().items() if v != before.get(k)}
    fetched = sum(g.sent for g in gets)
    total = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
    return {
        "warmer": args.warmer,
        "reader": args.reader,
        "ranks": args.ranks,
        "reader_at_s": round(reader_at, 2),
        "readers_done_s": round(readers_done, 2),
        "warm_done_s": None if warm_done is None else round(warm_done, 2),
        "model_bytes": total,
        "fetched_bytes": fetched,
        "duplicate_bytes": sum(o.extra_bytes for o in found),
        "gets": len(gets),
        "resident_after": round(resident.ratio, 5),
        "missing_pages": resident.total_pages - resident.resident_pages,
        "vmstat": vmstat,
        "overlaps": [
            {
                "key": o.key,
                "first_mib": round(o.first / MiB, 2),
                "end_mib": round(o.end / MiB, 2),
                "count": o.count,
                "starts_s": [round(s - t0, 2) for s in o.starts],
            }
            for o in found
        ],
        "log": [
            [
                g.key.rsplit("/", 1)[-1],
                g.first,
                g.sent,
                round(g.start - t0, 3),
                round(g.end - t0, 3),
            ]
            for g in gets
        ],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the harness; print one JSON object per run.

    :param argv: command line, without the program name.
    :return: exit status.
    """
    from .e2e import MiB as _MiB
    from .models import write_safetensors_model
    from .run import parse_size
    from .scenarios import s3fs_mount

    parser = argparse.ArgumentParser(prog="python -m bench.s3trace", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("/var/tmp/preloader-s3trace"))
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--shard-size", type=parse_size, default=512 * _MiB)
    parser.add_argument("--warmer", choices=["warm", "serve", "one-liner", "none"], default="warm")
    parser.add_argument("--start-lead", type=float, default=8.0, help="serve --start-lead")
    parser.add_argument("--reader", choices=["loader", "dd", "mmap", "none"], default="loader")
    parser.add_argument("--ranks", type=int, default=4, help="reader processes")
    parser.add_argument("--framework", choices=["pt", "np"], default="np", help="loader tensors")
    parser.add_argument("--reader-at", default="2", help="seconds after t0, 'startz' or 'startz+S'")
    parser.add_argument("-n", "--reps", type=int, default=1)
    parser.add_argument("--conn-mibps", type=float, default=100e6 / MiB)
    parser.add_argument("--latency-ms", type=float, default=10.0)
    parser.add_argument("--log", action="store_true", help="include every GET in the output")
    args = parser.parse_args(argv)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    backing = args.data_dir / "bucket" / "model"
    write_safetensors_model(backing, args.shards, args.shard_size)
    objects = {f"model/{p.name}": p.stat().st_size for p in sorted(backing.iterdir())}
    urls: list[str] = []
    with s3fs_mount(
        args.data_dir,
        objects,
        args.latency_ms,
        args.conn_mibps,
        0.0,
        backing=backing.parent,
        name="s3trace",
        on_server=urls.append,
    ) as (mountpoint, _):
        for _ in range(args.reps):
            result = trace_once(args, mountpoint / "model", backing, urls[0])
            if not args.log:
                result.pop("log")
            print(json.dumps(result), flush=True)
        _evict([mountpoint / "model", backing])
    return 0


if __name__ == "__main__":
    sys.exit(main())
