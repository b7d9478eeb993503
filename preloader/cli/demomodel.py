"""A synthetic safetensors-style model for ``preloader demo`` and for tests.

The shards carry real safetensors headers (an 8-byte little-endian length, a JSON table
of tensors, then the data), an index, a config and a tokenizer file, laid out as a
Hugging Face snapshot is.
"""

from __future__ import annotations

import json
import os
import struct

from ..errors import UsageError

__all__ = ["claim_directory", "write_demo_model"]

_BLOCK = 8 * 1024 * 1024


def _write_random(handle: int, count: int) -> None:
    # Random bytes: a filesystem that compresses or deduplicates must not shrink the demo.
    block = os.urandom(min(_BLOCK, count))
    remaining = count
    while remaining > 0:
        step = min(len(block), remaining)
        os.write(handle, block[:step])
        remaining -= step


def _write_shard(path: str, tensors: list[tuple[str, int]]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, nbytes in tensors:
        elements = nbytes // 2
        header[name] = {
            "dtype": "BF16",
            "shape": [elements],
            "data_offsets": [offset, offset + elements * 2],
        }
        offset += elements * 2
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    # O_EXCL: the demo creates every file it writes and never overwrites one.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, struct.pack("<Q", len(raw)) + raw)
        _write_random(fd, offset)
        os.fsync(fd)  # dirty pages cannot be evicted; the demo starts cold
    finally:
        os.close(fd)


def _write_json(path: str, content: object) -> None:
    with open(path, "x", encoding="utf-8") as handle:
        json.dump(content, handle)
        handle.flush()
        os.fsync(handle.fileno())


def claim_directory(directory: str) -> None:
    """Create ``directory`` (and its parents) for the demo, refusing one that exists.

    The demo writes only into a folder it created itself: a folder given with ``--dir``
    that already exists may hold a real model, and is never written to.

    :raises UsageError: naming the folder when it exists (or cannot be created).
    """
    try:
        os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
        os.mkdir(directory, 0o755)
    except FileExistsError:
        what = "not empty" if os.path.isdir(directory) and os.listdir(directory) else "exists"
        raise UsageError(
            f"{directory}: {what}; the demo writes only into a folder it creates "
            "(give a path that does not exist yet)"
        ) from None
    except OSError as err:
        raise UsageError(f"{directory}: cannot create the demo folder: {err.strerror}") from None


def write_demo_model(directory: str, total_bytes: int, shards: int = 4) -> list[str]:
    """Write a model of about ``total_bytes`` into ``directory`` (created if needed).

    Every file is created with ``O_EXCL``: a file of that name already there is an error
    (``FileExistsError``), never overwritten.

    :return: the paths written, metadata first.
    """
    os.makedirs(directory, exist_ok=True)
    shards = max(1, shards)
    per_shard = max(2, total_bytes // shards)
    per_tensor = max(2, min(per_shard, 64 * 1024 * 1024))
    written: list[str] = []
    weight_map: dict[str, str] = {}
    meta = {
        "config.json": {"architectures": ["DemoForCausalLM"], "model_type": "demo"},
        "tokenizer_config.json": {"model_max_length": 4096},
        "generation_config.json": {"do_sample": False},
    }
    for name, content in meta.items():
        path = os.path.join(directory, name)
        _write_json(path, content)
        written.append(path)
    for shard in range(1, shards + 1):
        name = f"model-{shard:05d}-of-{shards:05d}.safetensors"
        tensors = []
        remaining = per_shard
        index = 0
        while remaining > 0:
            size = min(per_tensor, remaining)
            tensors.append((f"model.layers.{shard}.w{index}", size))
            weight_map[f"model.layers.{shard}.w{index}"] = name
            remaining -= size
            index += 1
        path = os.path.join(directory, name)
        _write_shard(path, tensors)
        written.append(path)
    index_path = os.path.join(directory, "model.safetensors.index.json")
    _write_json(
        index_path, {"metadata": {"total_size": per_shard * shards}, "weight_map": weight_map}
    )
    written.insert(len(meta), index_path)
    return written
