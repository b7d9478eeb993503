"""A server-like weight loader: one tensor-parallel rank, as vLLM or sglang runs it.

``python -m bench.loader MODEL --rank R --ranks N --not-before T`` imports its
framework (the part of a server's start-up that is ours to imitate), sleeps
until ``time.monotonic()`` reaches *T* (the rest of the start-up: CUDA and NCCL
init), then loads:

- a safetensors model (a directory with ``model.safetensors.index.json``):
  opens every shard in index order with ``safetensors.safe_open`` and copies its
  1/N slice (rows ``R*n/N`` to ``(R+1)*n/N`` of dim 0, through ``get_slice``, as
  tensor-parallel loaders shard a column-parallel weight) of every tensor, with
  ``.clone()`` (torch) or ``numpy.array(copy=True)`` (numpy), moved to
  ``--device`` (``cuda:R`` in the GPU variant);
- a GGUF-like single file (:func:`write_gguf_like` in :mod:`bench.models`):
  ``mmap`` of the whole file, ``MADV_WILLNEED`` on it (llama.cpp's prefetch),
  and a copy of every tensor in file order, as llama.cpp loads one.

With ``--prefetch`` the rank also warms its share of the checkpoint the way the
engines' own prefetch does (vLLM ``--safetensors-load-strategy prefetch``, SGLang
``--weight-loader-prefetch-checkpoints``): from the moment it starts loading, a
background pool of ``--prefetch-threads`` threads (4, SGLang's default; vLLM's is 8)
reads ``sorted(weight files)[rank::ranks]`` sequentially in ``--prefetch-block``
blocks (16 MiB, both engines), one file per thread, bytes discarded, while the
rank loads in the foreground. With ``--discard`` each slice is dropped once copied
(on a GPU it would live in device memory, not in the host's): the copy still costs
its CPU, and host memory holds only the page cache.

Prints one JSON line: ``rank``, ``ready`` (imports done), ``start`` (first
read), ``done`` (last slice held), all ``time.monotonic()`` (one clock for every
process on the machine), ``bytes`` copied, the ``framework`` used, ``cpu_s``
(this process's user + system seconds), ``shards`` (``[name, time the rank finished
it]`` in load order) and, with ``--prefetch``, ``prefetch`` (``files``, ``bytes``,
``done``: when its last file was read, or ``None`` if the load ended first).
"""

import argparse
import concurrent.futures
import json
import mmap
import os
import resource
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Prefetcher", "framework_available", "main", "prefetch_share", "read_ranges"]

INDEX = "model.safetensors.index.json"
PREFETCH_BLOCK = 16 * 2**20  # both engines read 16 MiB at a time
PREFETCH_THREADS = 4  # SGLang's --weight-loader-prefetch-num-threads default (vLLM: 8)


def prefetch_share(files: Sequence[Path], rank: int, ranks: int) -> list[Path]:
    """The files rank *rank* of *ranks* prefetches: ``sorted(files)[rank::ranks]``.

    As vLLM's and SGLang's ``_prefetch_all_checkpoints`` split them: every file goes to
    exactly one rank, so across the ranks of one node each is read once.

    :param files: the checkpoint's weight files.
    :param rank: this rank, 0 <= rank < ranks.
    :param ranks: the ranks on the node.
    :return: this rank's files, in name order.
    :raises ValueError: for a rank outside ``range(ranks)``.
    """
    if not 0 <= rank < ranks:
        raise ValueError(f"rank {rank} is not in 0..{ranks - 1}")
    return sorted(files)[rank::ranks]


def _read_file(path: Path, block: int) -> int:
    got = 0
    with open(path, "rb", buffering=0) as handle:
        while piece := handle.read(block):
            got += len(piece)
    return got


class Prefetcher(threading.Thread):
    """Read *files* sequentially in *block* reads on a pool of *threads*, one file a task.

    A daemon thread, as the engines run it: it does not hold the load (or the process)
    up. ``read`` maps each file to the bytes read from it; ``done_at`` is when the last
    file was read (``time.monotonic()``), ``None`` until then.
    """

    def __init__(self, files: Sequence[Path], threads: int, block: int) -> None:
        super().__init__(daemon=True, name="prefetch")
        self.files = list(files)
        self.threads = threads
        self.block = block
        self.read: dict[str, int] = {}
        self.done_at: float | None = None

    def run(self) -> None:
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            futures = {path: pool.submit(_read_file, path, self.block) for path in self.files}
            for path, future in futures.items():
                self.read[path.name] = future.result()
        self.done_at = time.monotonic()


def read_ranges(files: Sequence[Path], threads: int, block: int) -> int:
    """Read every byte of *files* as ranges of *block* bytes on *threads* threads.

    The fastest full read of a mount the bench knows: every file cut into ranges,
    all of them in flight at once up to *threads*, in file order.

    :param files: what to read.
    :param threads: ranges in flight.
    :param block: bytes per range.
    :return: bytes read.
    :raises OSError: when a file cannot be read.
    """

    def one(path: Path, offset: int) -> int:
        fd = os.open(path, os.O_RDONLY)
        try:
            return len(os.pread(fd, block, offset))
        finally:
            os.close(fd)

    work = [(path, offset) for path in files for offset in range(0, path.stat().st_size, block)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(lambda item: one(*item), work))


def framework_available(framework: str) -> bool:
    """Whether *framework* (``pt`` or ``np``) can be imported here.

    :param framework: ``pt`` (torch) or ``np`` (numpy).
    :return: True when its module imports.
    """
    try:
        __import__("torch" if framework == "pt" else "numpy")
    except ImportError:
        return False
    return True


def _rows(length: int, rank: int, ranks: int) -> tuple[int, int]:
    return length * rank // ranks, length * (rank + 1) // ranks


def _load_safetensors(
    model: Path,
    rank: int,
    ranks: int,
    framework: str,
    device: str,
    hold: bool,
    finished: list[tuple[str, float]],
) -> tuple[int, float]:
    from safetensors import safe_open

    index = json.loads((model / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))  # model-00001-of-0000N first
    held: list[Any] = []
    copied = 0
    start = time.monotonic()
    for shard in shards:
        with safe_open(str(model / shard), framework=framework) as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                view = handle.get_slice(name)
                lo, hi = _rows(view.get_shape()[0], rank, ranks)
                if framework == "pt":
                    part = view[lo:hi].clone()
                    if device != "cpu":
                        part = part.to(device)
                    copied += part.numel() * part.element_size()
                else:
                    import numpy

                    part = numpy.array(view[lo:hi], copy=True)
                    copied += part.nbytes
                if hold:
                    held.append(part)
        finished.append((shard, time.monotonic()))
    if framework == "pt" and device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
    return copied, start


def _load_gguf_like(path: Path, device: str, framework: str) -> tuple[int, float]:
    from .models import read_gguf_like_table

    table, data_start = read_gguf_like_table(path)
    held: list[Any] = []
    copied = 0
    start = time.monotonic()
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        mapped.madvise(mmap.MADV_WILLNEED)  # llama.cpp's prefetch of the whole mapping
        for _, offset, size in table:
            view = memoryview(mapped)[data_start + offset : data_start + offset + size]
            if framework == "pt":
                import torch

                part = torch.frombuffer(bytearray(view), dtype=torch.uint8)
                if device != "cpu":
                    part = part.to(device)
            else:
                part = bytearray(view)
            view.release()
            held.append(part)
            copied += size
    if framework == "pt" and device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
    return copied, start


def main(argv: list[str] | None = None) -> int:
    """Load one rank's share and print its JSON line.

    :param argv: command line, without the program name.
    :return: exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__)
    parser.add_argument("model", type=Path, help="model directory, or one .gguf file")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--framework", choices=["pt", "np"], default="np")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (rank R on cuda:R mod GPUs)")
    parser.add_argument(
        "--not-before", type=float, default=0.0, help="time.monotonic() to start reading at"
    )
    parser.add_argument(
        "--prefetch",
        action="store_true",
        help="prefetch sorted(shards)[rank::ranks] as the engines do",
    )
    parser.add_argument("--prefetch-threads", type=int, default=PREFETCH_THREADS)
    parser.add_argument("--prefetch-block", type=int, default=PREFETCH_BLOCK)
    parser.add_argument(
        "--discard", action="store_true", help="drop each slice once copied (host memory)"
    )
    parser.add_argument(
        "--read-all",
        action="store_true",
        help="load nothing: read every file under MODEL as ranges of --prefetch-block on "
        "--prefetch-threads threads (the storage's fastest full read) and print the bytes",
    )
    parser.add_argument(
        "--prefetch-only",
        action="store_true",
        help="load nothing: prefetch every file under MODEL as the engines do (one file a "
        "thread, --prefetch-block reads) for rank --rank of --ranks, wait, print the bytes",
    )
    args = parser.parse_args(argv)
    if args.read_all or args.prefetch_only:
        files = sorted(p for p in args.model.rglob("*") if p.is_file())
        if args.read_all:
            got = read_ranges(files, args.prefetch_threads, args.prefetch_block)
        else:
            share = prefetch_share(files, args.rank, args.ranks)
            prefetcher = Prefetcher(share, args.prefetch_threads, args.prefetch_block)
            prefetcher.run()  # in the foreground: nothing else to wait for
            files, got = share, sum(prefetcher.read.values())
        print(json.dumps({"files": len(files), "bytes": got}), flush=True)
        return 0
    if args.framework == "pt":
        import torch

        if args.device.startswith("cuda"):
            args.device = f"cuda:{args.rank % torch.cuda.device_count()}"
            torch.empty(1, device=args.device)  # CUDA context: part of start-up
    else:
        import numpy  # noqa: F401
    import safetensors  # noqa: F401

    ready = time.monotonic()
    if args.not_before > ready:
        time.sleep(args.not_before - ready)
    prefetcher = None
    if args.prefetch and args.model.is_dir():
        weights = [p for p in args.model.iterdir() if p.name.endswith(".safetensors")]
        share = prefetch_share(weights, args.rank, args.ranks)
        prefetcher = Prefetcher(share, args.prefetch_threads, args.prefetch_block)
        prefetcher.start()  # the engines start it as weight loading starts
    finished: list[tuple[str, float]] = []
    if args.model.is_dir():
        copied, start = _load_safetensors(
            args.model,
            args.rank,
            args.ranks,
            args.framework,
            args.device,
            not args.discard,
            finished,
        )
    else:
        copied, start = _load_gguf_like(args.model, args.device, args.framework)
    done = time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record: dict[str, Any] = {
        "rank": args.rank,
        "pid": os.getpid(),
        "ready": ready,
        "start": start,
        "done": done,
        "bytes": copied,
        "framework": args.framework,
        "device": args.device,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "shards": [[name, at] for name, at in finished],
    }
    if prefetcher is not None:
        record["prefetch"] = {
            "files": [p.name for p in prefetcher.files],
            "bytes": sum(prefetcher.read.values()),
            "done": prefetcher.done_at,
        }
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
