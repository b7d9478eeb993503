"""The servers' own prefetch beside the preloader fetches nothing twice (real FUSE mount).

The prefetch is emulated as vLLM's ``--safetensors-load-strategy prefetch`` and SGLang's
``--weight-loader-prefetch-checkpoints`` do it: each rank reads its share of the shards
(``files[rank::ranks]``) in 16 MiB blocks on 4 threads. The fixture counts the bytes it
served per file.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import pytest

from preloader.engine.warm import warm_plan
from preloader.planning.planner import build_plan
from preloader.settings import WarmOptions

from ..lib.fusefs import FuseMount
from ..lib.marks import needs_fuse

MiB = 1024 * 1024
_BLOCK = 16 * MiB
_NAMES = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
_SIZE = 24 * MiB + 4096


def _read_block(path: Path, offset: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, _BLOCK, offset)
    finally:
        os.close(fd)


def _engine_prefetch(files: list[Path], ranks: int = 2) -> None:
    """Every rank's prefetch at once: its shards in 16 MiB blocks on 4 threads."""
    with ThreadPoolExecutor(max_workers=4 * ranks) as pool:
        blocks = [
            pool.submit(_read_block, path, offset)
            for rank in range(ranks)
            for path in files[rank::ranks]
            for offset in range(0, path.stat().st_size, _BLOCK)
        ]
        for block in blocks:
            block.result()


def _mount(fuse_fs: Callable[..., FuseMount]) -> tuple[FuseMount, list[Path]]:
    fs = fuse_fs({"cache": "keep", "files": {name: {"size": _SIZE} for name in _NAMES}})
    return fs, [fs.path(name) for name in _NAMES]


async def _warm(files: list[Path]) -> None:
    plan = build_plan([str(files[0].parent)])
    report = await warm_plan(plan, WarmOptions(concurrency=4, chunk_size=8 * MiB))
    assert report.errors == () and report.resident_ratio == 1.0


@needs_fuse
@pytest.mark.anyio
async def test_prefetch_of_a_resident_model_reads_memory_not_the_storage(
    fuse_fs: Callable[..., FuseMount],
) -> None:
    fs, files = _mount(fuse_fs)
    await _warm(files)
    await anyio.to_thread.run_sync(_engine_prefetch, files)
    assert [fs.bytes_served(name) for name in _NAMES] == [_SIZE] * len(_NAMES)


@needs_fuse
@pytest.mark.anyio
async def test_prefetch_beside_a_running_warm_up_fetches_each_byte_once(
    fuse_fs: Callable[..., FuseMount],
) -> None:
    fs, files = _mount(fuse_fs)
    started = threading.Event()

    def prefetch() -> None:
        started.set()
        _engine_prefetch(list(reversed(files)))  # the other end first: they meet midway

    async with anyio.create_task_group() as group:
        group.start_soon(anyio.to_thread.run_sync, prefetch)
        await _warm(files)
    assert started.is_set()
    served = [fs.bytes_served(name) for name in _NAMES]
    assert sum(served) <= 1.02 * _SIZE * len(_NAMES), served
