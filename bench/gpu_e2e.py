"""End to end on a GPU: does warming the page cache first pay for itself?

Writes a synthetic sharded safetensors model, then times, on a cold cache:

1. cold load: P processes at once (tensor parallelism) each load every shard
   onto the GPU with ``safetensors.torch.load_file(..., device="cuda")``;
2. warm-up: ``python -m preloader warm DIR --json``;
3. warm load: the same P-process load again, now from the page cache.

and reports cold load against warm-up + warm load. Worker processes import
torch and initialise CUDA before the clock starts (a GO line on stdin), so the
timings hold only reading and copying.

Needs ``torch`` (with CUDA) and ``safetensors`` on the machine. Without torch it
rehearses on the CPU with ``safetensors.numpy`` (``--rehearse``), which is how
this script is tested on machines without a GPU.

Run: ``python -m bench.gpu_e2e --size-gb 24 --shards 6 --procs 4 --out e2e.json``.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
_TENSOR_BYTES = 256 * 2**20  # like a big projection matrix in bf16


def _have_torch_cuda() -> bool:
    try:
        import torch  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _write_model(directory: Path, size_bytes: int, shards: int, rehearse: bool) -> list[Path]:
    """Write *shards* safetensors files totalling *size_bytes*, unless already there."""
    directory.mkdir(parents=True, exist_ok=True)
    per_shard = size_bytes // shards
    note = directory.parent / (directory.name + ".layout.json")
    paths = [directory / f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    wanted = json.dumps({"size": size_bytes, "shards": shards})
    if note.exists() and note.read_text() == wanted and all(p.exists() for p in paths):
        return paths
    for path in paths:
        tensors: dict[str, Any] = {}
        remaining, index = per_shard, 0
        while remaining > 0:
            count = min(_TENSOR_BYTES, remaining) // 2
            if rehearse:
                import numpy

                tensors[f"layer.{index}.weight"] = numpy.random.default_rng(index).integers(
                    0, 2**15, size=count, dtype=numpy.int16
                )
            else:
                import torch  # type: ignore[import-not-found, unused-ignore]

                tensors[f"layer.{index}.weight"] = torch.randn(count, dtype=torch.bfloat16)
            remaining -= count * 2
            index += 1
        if rehearse:
            from safetensors.numpy import save_file  # type: ignore[import-not-found, unused-ignore]
        else:
            from safetensors.torch import save_file  # type: ignore[import-not-found, assignment, unused-ignore]
        save_file(tensors, str(path))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    (directory / "config.json").write_text(json.dumps({"architectures": ["Synthetic"]}))
    note.write_text(wanted)
    return paths


def _evict(directory: Path) -> None:
    for path in sorted(directory.iterdir()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _worker(paths: list[str], rehearse: bool) -> None:
    """One rank: get ready, wait for GO, load every shard, print DONE seconds."""
    if rehearse:
        from safetensors.numpy import load_file  # type: ignore[import-not-found, unused-ignore]

        def load(path: str) -> int:
            return sum(int(t.nbytes) for t in load_file(path).values())

        def sync() -> None:
            return None
    else:
        import torch  # type: ignore[import-not-found, unused-ignore]
        from safetensors.torch import load_file as torch_load  # type: ignore[import-not-found, unused-ignore]

        torch.cuda.init()
        torch.empty(1, device="cuda")

        def load(path: str) -> int:
            tensors = torch_load(path, device="cuda")
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
            return int(size)

        def sync() -> None:
            torch.cuda.synchronize()

    print("READY", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    loaded = sum(load(path) for path in paths)
    sync()
    print(f"DONE {time.perf_counter() - start:.6f} {loaded}", flush=True)


def _parallel_load(paths: list[Path], procs: int, rehearse: bool) -> dict[str, float]:
    """Start *procs* ranks, release them together, and time until the last is done."""
    argv = [sys.executable, "-m", "bench.gpu_e2e", "--worker"]
    argv += ["--rehearse"] if rehearse else []
    argv += [str(p) for p in paths]
    ranks = [
        subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
        )
        for _ in range(procs)
    ]
    for rank in ranks:
        assert rank.stdout is not None
        line = rank.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"a rank failed to start: {line!r}")
    start = time.perf_counter()
    for rank in ranks:
        assert rank.stdin is not None
        rank.stdin.write("GO\n")
        rank.stdin.flush()
    per_rank = []
    for rank in ranks:
        assert rank.stdout is not None
        done = rank.stdout.readline().split()
        if rank.wait() != 0 or not done or done[0] != "DONE":
            raise RuntimeError(f"a rank failed: {done}")
        per_rank.append(float(done[1]))
    return {"wall_s": time.perf_counter() - start, "slowest_rank_s": max(per_rank)}


def main(argv: list[str] | None = None) -> int:
    """Run the end-to-end measurement and print (and optionally save) its JSON.

    :param argv: command line, without the program name.
    :return: exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_e2e", description=__doc__)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/preloader-gpu-e2e/model"))
    parser.add_argument("--size-gb", type=float, default=24.0)
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--procs", type=int, default=4, help="ranks loading at once")
    parser.add_argument("--rehearse", action="store_true", help="CPU + numpy, no torch/GPU")
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.paths, args.rehearse)
        return 0
    if not args.rehearse and not _have_torch_cuda():
        print("gpu_e2e: torch with CUDA is not available; use --rehearse", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    paths = _write_model(args.dir, int(args.size_gb * 1e9), args.shards, args.rehearse)
    write_s = time.perf_counter() - t0
    _evict(args.dir)
    cold = _parallel_load(paths, args.procs, args.rehearse)
    _evict(args.dir)
    warm_cmd = [sys.executable, "-m", "preloader", "warm", str(args.dir), "--json"]
    t0 = time.perf_counter()
    warmed = subprocess.run(warm_cmd, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    warmup_s = time.perf_counter() - t0
    report = json.loads(warmed.stdout.strip().splitlines()[-1]) if warmed.stdout.strip() else {}
    warm = _parallel_load(paths, args.procs, args.rehearse)
    _evict(args.dir)
    result = {
        "size_bytes": sum(p.stat().st_size for p in paths),
        "shards": args.shards,
        "procs": args.procs,
        "device": "cpu (rehearsal)" if args.rehearse else "cuda",
        "write_s": write_s,
        "cold_load_s": cold["wall_s"],
        "warmup_s": warmup_s,
        "warmup_exit": warmed.returncode,
        "warmup_resident_ratio": report.get("resident_ratio"),
        "warm_load_s": warm["wall_s"],
        "warmup_plus_warm_load_s": warmup_s + warm["wall_s"],
        "speedup_vs_cold": cold["wall_s"] / (warmup_s + warm["wall_s"]),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
