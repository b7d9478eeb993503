"""How scrape load delays the liveness probe: ``python -m bench.healthz_load``.

A real ``preloader serve`` warms ``--paths`` small models (each its own served path, written
once under ``--data-dir``) and keeps them warm; once ``/readyz`` answers 200, ``--clients``
concurrent clients fetch ``/status`` and ``/metrics`` (half each, a new connection per
request, as Prometheus and dashboards do) for ``--seconds``, while one more client asks
``/healthz`` every 50 ms and records how long each answer took. The DaemonSet's liveness
probe allows 2 s (``timeoutSeconds: 2``). Prints one JSON document per run set: each run's
``/healthz`` p50, p99 and worst latency in seconds, scrapes answered, and the medians.

With ``--runs N`` the measurement repeats N times; to compare two builds, alternate them
(``PYTHONPATH=<other checkout>`` runs the other one's ``preloader``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .http_load import DEADLINE, _Serve

__all__ = ["main", "measure", "write_models"]

DEFAULT_DATA_DIR = Path("/var/tmp/preloader-bench/healthz-load")
PROBE_PERIOD = 0.05  # seconds between /healthz probes


def write_models(root: Path, paths: int, files: int, size: int) -> list[Path]:
    """``paths`` folders of ``files`` safetensors shards of ``size`` bytes, reused when there.

    :param root: the folder to write under.
    :param paths: how many served paths.
    :param files: shards per path.
    :param size: bytes per shard.
    :return: the model folders.
    """
    models = []
    block = os.urandom(size)
    for index in range(paths):
        model = root / f"m{paths}x{files}x{size}" / f"model-{index:03d}"
        done = model / ".complete"
        if not done.exists():
            model.mkdir(parents=True, exist_ok=True)
            for shard in range(files):
                name = f"model-{shard + 1:05d}-of-{files:05d}.safetensors"
                (model / name).write_bytes(block)
            done.touch()
        models.append(model)
    return models


async def _get(port: int, path: str) -> float:
    """One request on a new connection; the seconds until its whole answer arrived."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{path} answered {answer[:40]!r}")
    return time.perf_counter() - start


async def _load(port: int, clients: int, seconds: float) -> tuple[list[float], int]:
    end = time.monotonic() + seconds
    scrapes = 0

    async def scraper(path: str) -> None:
        nonlocal scrapes
        while time.monotonic() < end:
            await _get(port, path)
            scrapes += 1

    async def prober() -> list[float]:
        latencies = []
        while time.monotonic() < end:
            latencies.append(await _get(port, "/healthz"))
            await asyncio.sleep(PROBE_PERIOD)
        return latencies

    paths = ["/status", "/metrics"]
    tasks = [asyncio.create_task(scraper(paths[i % 2])) for i in range(clients)]
    latencies = await asyncio.wait_for(prober(), timeout=seconds + DEADLINE)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=DEADLINE)
    return latencies, scrapes


def _quantile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run_once(models: list[Path], clients: int, seconds: float) -> dict[str, Any]:
    """Serve ``models``, wait until ready, load it and probe ``/healthz``.

    :param models: the served paths.
    :param clients: concurrent scrapers.
    :param seconds: how long the load lasts.
    :return: the run's latencies (p50, p99, max) and scrapes answered.
    :raises RuntimeError: when serve fails or a request is not answered 200.
    """
    server = _Serve(models[0], [f"--path={m}" for m in models[1:]], recheck="5")
    try:
        end = time.monotonic() + DEADLINE
        while server.get("/readyz")[0] != 200:
            if time.monotonic() > end:
                raise RuntimeError(f"/readyz not 200 within {DEADLINE} s")
            time.sleep(0.1)
        latencies, scrapes = asyncio.run(_load(server.port, clients, seconds))
    finally:
        server.stop()
    return {
        "healthz_p50": _quantile(latencies, 0.50),
        "healthz_p99": _quantile(latencies, 0.99),
        "healthz_max": max(latencies),
        "probes": len(latencies),
        "scrapes": scrapes,
    }


def measure(models: list[Path], runs: int, clients: int, seconds: float) -> dict[str, Any]:
    """``runs`` loaded runs; each run's figures and the medians.

    :param models: the served paths.
    :param runs: how many runs.
    :param clients: concurrent scrapers per run.
    :param seconds: how long each run's load lasts.
    :return: the result document.
    """
    results = [run_once(models, clients, seconds) for _ in range(runs)]
    return {
        "paths": len(models),
        "clients": clients,
        "seconds": seconds,
        "runs": results,
        "healthz_p99_median": statistics.median(r["healthz_p99"] for r in results),
        "healthz_max_median": statistics.median(r["healthz_max"] for r in results),
        "scrapes_per_second_median": statistics.median(r["scrapes"] / seconds for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, measure, print the JSON document.

    :param argv: the arguments (default: ``sys.argv[1:]``).
    :return: the exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.healthz_load", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="model folders")
    parser.add_argument("--paths", type=int, default=50, help="served paths")
    parser.add_argument("--files", type=int, default=8, help="shards per path")
    parser.add_argument("--size", type=int, default=1 << 16, help="bytes per shard")
    parser.add_argument("--clients", type=int, default=200, help="concurrent scrapers")
    parser.add_argument("--seconds", type=float, default=10.0, help="load per run")
    parser.add_argument("-n", "--runs", type=int, default=3, help="runs")
    args = parser.parse_args(argv)
    models = write_models(args.data_dir, args.paths, args.files, args.size)
    json.dump(measure(models, args.runs, args.clients, args.seconds), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
