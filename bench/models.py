"""The end-to-end scenario's models: real files a real loader can parse.

- :func:`write_safetensors_model`: a Hugging Face style directory of N
  safetensors shards (2-D float16 tensors, written with ``safetensors.numpy``),
  a real ``model.safetensors.index.json`` and a ``config.json``.
- :func:`write_gguf_like`: one file laid out like a GGUF (magic, a tensor table,
  aligned tensor data in file order) that :mod:`bench.loader` maps and copies
  tensor by tensor, as llama.cpp does.

Each is written once and reused while its layout matches (a note beside it,
never inside the model directory), fsynced and dropped from the page cache.
"""

import json
import os
import struct
from pathlib import Path

__all__ = ["read_gguf_like_table", "write_gguf_like", "write_safetensors_model"]

MiB = 2**20
_COLS = 2048  # float16: 4 KiB per row
_ALIGN = 32
_MAGIC = b"GGUF"


def _tensor_bytes(file_bytes: int) -> int:
    """About eight tensors per file, at most 64 MiB each (a large projection in bf16)."""
    rows = max(1, min(64 * MiB, file_bytes // 8) // (_COLS * 2))
    return rows * _COLS * 2


def _block(seed: int, nbytes: int) -> bytes:
    # One random megabyte tiled, stamped per tensor: distinct bytes, written fast.
    base = os.urandom(MiB)
    stamp = seed.to_bytes(8, "little")
    tiles = (nbytes + MiB - 1) // MiB
    return b"".join(stamp + base[8:] for _ in range(tiles))[:nbytes]


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _reuse(note: Path, layout: dict[str, object]) -> bool:
    wanted = json.dumps(layout, sort_keys=True)
    return note.exists() and note.read_text() == wanted


def write_safetensors_model(directory: Path, shards: int, shard_bytes: int) -> list[Path]:
    """Write (or reuse) *shards* safetensors files of about *shard_bytes* each.

    :param directory: the model directory (created; its contents are replaced).
    :param shards: how many shards.
    :param shard_bytes: tensor bytes per shard (the header adds a few hundred bytes).
    :return: every file of the model, shards first in index order.
    """
    import numpy
    from safetensors.numpy import save_file

    note = directory.parent / f"{directory.name}.layout.json"
    layout: dict[str, object] = {"format": "safetensors", "shards": shards, "bytes": shard_bytes}
    names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    extra = ["config.json", "model.safetensors.index.json"]
    paths = [directory / name for name in names + extra]
    if _reuse(note, layout) and all(path.exists() for path in paths):
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.iterdir():
        stale.unlink()
    per_tensor = _tensor_bytes(shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    layer = 0
    for name in names:
        tensors = {}
        left = shard_bytes
        while left >= _COLS * 2:
            nbytes = min(per_tensor, left - left % (_COLS * 2))
            key = f"model.layers.{layer}.mlp.weight"
            tensors[key] = numpy.frombuffer(_block(layer, nbytes), dtype=numpy.float16).reshape(
                -1, _COLS
            )
            weight_map[key] = name
            total += nbytes
            left -= nbytes
            layer += 1
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        _drop(directory / name)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (directory / "config.json").write_text(
        json.dumps({"architectures": ["BenchForCausalLM"], "torch_dtype": "float16"})
    )
    for path in paths[-2:]:
        _drop(path)
    note.write_text(json.dumps(layout, sort_keys=True))
    return paths


def write_gguf_like(path: Path, total_bytes: int) -> Path:
    """Write (or reuse) one GGUF-like file of about *total_bytes*.

    Layout: ``GGUF``, uint32 version, uint64 table length, a JSON table of
    ``[name, offset, size]`` (offsets from the data start), zero padding to 32
    bytes, then the tensors back to back in table order.

    :param path: the file (its directory is created).
    :param total_bytes: tensor bytes in all.
    :return: *path*.
    """
    note = path.parent.parent / f"{path.parent.name}.layout.json"
    layout: dict[str, object] = {"format": "gguf-like", "bytes": total_bytes, "name": path.name}
    if _reuse(note, layout) and path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.iterdir():
        stale.unlink()
    per_tensor = _tensor_bytes(total_bytes)
    table: list[tuple[str, int, int]] = []
    offset = 0
    while offset < total_bytes:
        size = min(per_tensor, total_bytes - offset)
        table.append((f"blk.{len(table)}.ffn.weight", offset, size))
        offset += size
    header = json.dumps(table).encode()
    head = _MAGIC + struct.pack("<IQ", 3, len(header)) + header
    head += b"\0" * (-len(head) % _ALIGN)
    with open(path, "wb") as handle:
        handle.write(head)
        for index, (_, _, size) in enumerate(table):
            handle.write(_block(index, size))
    _drop(path)
    note.write_text(json.dumps(layout, sort_keys=True))
    return path


def read_gguf_like_table(path: Path) -> tuple[list[tuple[str, int, int]], int]:
    """Read the tensor table of a file from :func:`write_gguf_like`.

    :param path: the file.
    :return: ``[(name, offset, size)]`` and the file offset where tensor data starts.
    :raises ValueError: when the file is not one of ours.
    """
    with open(path, "rb") as handle:
        fixed = handle.read(16)
        if len(fixed) < 16 or fixed[:4] != _MAGIC:
            raise ValueError(f"{path}: not a GGUF-like file (bad magic)")
        _, length = struct.unpack("<IQ", fixed[4:])
        table = [(str(n), int(o), int(s)) for n, o, s in json.loads(handle.read(length))]
    start = 16 + length
    return table, start + (-start % _ALIGN)
