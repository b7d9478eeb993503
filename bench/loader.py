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

Prints one JSON line: ``rank``, ``ready`` (imports done), ``start`` (first
read), ``done`` (last slice held), all ``time.monotonic()`` (one clock for every
process on the machine), ``bytes`` copied and the ``framework`` used.
"""

import argparse
import json
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["framework_available", "main"]

INDEX = "model.safetensors.index.json"


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
    model: Path, rank: int, ranks: int, framework: str, device: str
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
                held.append(part)
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
    args = parser.parse_args(argv)
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
    if args.model.is_dir():
        copied, start = _load_safetensors(
            args.model, args.rank, args.ranks, args.framework, args.device
        )
    else:
        copied, start = _load_gguf_like(args.model, args.device, args.framework)
    done = time.monotonic()
    record = {
        "rank": args.rank,
        "pid": os.getpid(),
        "ready": ready,
        "start": start,
        "done": done,
        "bytes": copied,
        "framework": args.framework,
        "device": args.device,
    }
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
