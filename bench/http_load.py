"""How much probe traffic slows the serve agent's first pass: ``python -m bench.http_load``.

A real ``preloader serve`` warms a cold model (4 shards written once under ``--data-dir``
and evicted before each run: POSIX_FADV_DONTNEED on these files only) while a client on
the same machine sends waves of ``--probes`` concurrent ``/readyz`` requests, one per
connection, until the gate opens. Quiet and loaded runs alternate, so drift in the
machine hits both alike; the warm-up time is the first pass's own ``warm_seconds`` from
``/status``. Prints one JSON document: each run's seconds, the medians and the slowdown
in percent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .run import parse_size

__all__ = ["main", "measure", "write_model"]

DEFAULT_DATA_DIR = Path("/var/tmp/preloader-bench/http-load")
DEADLINE = 120.0  # seconds; a bound against hangs, never a synchronisation
SHARDS = 4
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def write_model(root: Path, size: int) -> Path:
    """Four safetensors-named shards of ``size`` bytes together, reused when complete.

    :param root: the folder to write under.
    :param size: total bytes (a multiple of 4 MiB keeps the shards equal).
    :return: the model folder.
    """
    model = root / f"model-{size}"
    done = model / ".complete"
    if done.exists():
        return model
    model.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    for shard in range(SHARDS):
        left = size // SHARDS
        with open(model / f"model-{shard + 1:05d}-of-{SHARDS:05d}.safetensors", "wb") as handle:
            while left > 0:
                left -= handle.write(block[: min(left, len(block))])
            os.fsync(handle.fileno())
    done.touch()
    return model


def _evict(model: Path) -> None:
    for path in model.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class _Serve:
    """``preloader serve MODEL [ARGS]`` on 127.0.0.1 and an ephemeral port, its port read
    from the ``serving`` log line; keep-warm off unless ``recheck`` says otherwise."""

    def __init__(
        self, model: Path, args: tuple[str, ...] | list[str] = (), recheck: str = "0"
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRELOADER_")}
        env.update(PRELOADER_LOG_FORMAT="json", PRELOADER_HOST="127.0.0.1", PRELOADER_PORT="0")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "preloader",
                "serve",
                str(model),
                "--recheck-seconds",
                recheck,
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # ends when serve exits: no hang on a failed start
            if line.startswith("{") and json.loads(line).get("event") == "serving":
                self.port = int(json.loads(line)["port"])
                break
        else:
            raise RuntimeError(f"preloader serve exited {self.proc.wait()} before serving")
        # The rest of the log is read and dropped, so serve never blocks on a full pipe.
        self._drain = threading.Thread(target=self.proc.stderr.read, daemon=True)
        self._drain.start()

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with _DIRECT.open(f"http://127.0.0.1:{self.port}{path}", timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as err:
            with err:
                return err.code, json.loads(err.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(timeout=DEADLINE)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


async def _probe(port: int) -> int | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else None


async def _wave(port: int, count: int) -> list[int | None]:
    probes = [_probe(port) for _ in range(count)]
    return await asyncio.wait_for(asyncio.gather(*probes), timeout=DEADLINE)


def warm_seconds(model: Path, probes: int) -> tuple[float, int]:
    """One cold first pass: its ``warm_seconds``, and the probes answered meanwhile.

    :param model: the model folder (evicted first).
    :param probes: requests per wave; 0 for a quiet run.
    :return: (seconds, probes answered).
    :raises RuntimeError: when serve fails, a probe goes unanswered or the gate stays shut.
    """
    _evict(model)
    server = _Serve(model)
    try:
        answered, end = 0, time.monotonic() + DEADLINE
        while server.get("/readyz")[0] != 200:
            if time.monotonic() > end:
                raise RuntimeError(f"/readyz not 200 within {DEADLINE} s")
            if probes:
                codes = asyncio.run(_wave(server.port, probes))
                if None in codes:
                    raise RuntimeError("a /readyz probe got no answer")
                answered += len(codes)
            else:
                time.sleep(0.05)  # the polling period of a quiet run
        [path] = server.get("/status")[1]["paths"]
        return float(path["warm_seconds"]), answered
    finally:
        server.stop()


def measure(model: Path, runs: int, probes: int) -> dict[str, Any]:
    """``runs`` quiet and ``runs`` loaded first passes, alternating; medians and slowdown.

    :param model: the model folder.
    :param runs: runs of each kind.
    :param probes: concurrent ``/readyz`` per wave in the loaded runs.
    :return: the result document.
    """
    quiet: list[float] = []
    loaded: list[float] = []
    answered = 0
    for _ in range(runs):
        quiet.append(warm_seconds(model, 0)[0])
        seconds, count = warm_seconds(model, probes)
        loaded.append(seconds)
        answered += count
    base, busy = statistics.median(quiet), statistics.median(loaded)
    return {
        "bytes": sum(p.stat().st_size for p in model.iterdir() if p.name != ".complete"),
        "probes_per_wave": probes,
        "probes_answered": answered,
        "quiet_seconds": quiet,
        "loaded_seconds": loaded,
        "quiet_median": base,
        "loaded_median": busy,
        "slowdown_percent": 100 * (busy - base) / base if base else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, measure, print the JSON document.

    :param argv: the arguments (default: ``sys.argv[1:]``).
    :return: the exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.http_load", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="model folder")
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="model size")
    parser.add_argument("-n", "--runs", type=int, default=5, help="runs of each kind")
    parser.add_argument("--probes", type=int, default=1000, help="concurrent /readyz per wave")
    args = parser.parse_args(argv)
    model = write_model(args.data_dir, args.size)
    json.dump(measure(model, args.runs, args.probes), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
