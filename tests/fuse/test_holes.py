"""Holes a pass left in a file are re-read on its descriptor before it is closed.

On real files and a real FUSE mount: pages are dropped with ``POSIX_FADV_DONTNEED`` after
they were read, and the fixture counts the bytes it served and the opens.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from preloader.engine.holes import HOLE_WINDOW, fill_holes
from preloader.engine.warm import warm_plan
from preloader.kernel import fileread, pagecache
from preloader.planning.planner import build_plan
from preloader.settings import WarmOptions
from preloader.units import PAGE_SIZE

from ..lib.fusefs import FuseMount
from ..lib.marks import needs_fuse

MiB = 1024 * 1024


def _drop(fd: int, offset: int, length: int) -> None:
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def test_fill_holes_rereads_only_the_windows_with_pages_missing(shared_tmp: Path) -> None:
    path = shared_tmp / "shard.safetensors"
    size = 3 * HOLE_WINDOW + 5000
    with open(path, "wb") as handle:
        handle.write(os.urandom(size))
        os.fsync(handle.fileno())  # clean pages: DONTNEED drops only those
    fd = os.open(path, os.O_RDONLY)
    try:
        fileread.read_range(fd, 0, size, "sendfile")
        assert fill_holes(fd, size, "sendfile") == 0  # nothing missing: nothing read
        # Whole 2 MiB ranges: the kernel keeps a large folio that a drop only partly covers.
        _drop(fd, HOLE_WINDOW + 2 * MiB, 2 * MiB)
        _drop(fd, 3 * HOLE_WINDOW, 0)  # the tail, with its partial last page
        holes = [
            min(HOLE_WINDOW, size - offset)
            for offset in range(0, size, HOLE_WINDOW)
            if pagecache.cachestat(fd, offset, min(HOLE_WINDOW, size - offset)).cached
            < -(-min(HOLE_WINDOW, size - offset) // PAGE_SIZE)
        ]
        if not holes:
            pytest.skip("the kernel kept the pages (DONTNEED refused here)")
        assert len(holes) < 4  # the first window kept its pages
        assert fill_holes(fd, size, "sendfile") == sum(holes)
        assert pagecache.fd_residency(fd, size) == size
    finally:
        os.close(fd)


@needs_fuse
@pytest.mark.anyio
async def test_a_page_lost_during_the_pass_is_fetched_again_once_on_the_same_open(
    fuse_fs: Callable[..., FuseMount], monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = fuse_fs({"cache": "keep", "files": {"shard.bin": {"size": 8 * MiB}}})
    dropped = threading.Event()
    real_read = fileread.read_range

    def read_then_lose_a_page(
        fd: int,
        offset: int,
        length: int,
        method: str,
        stop: object = lambda: False,
        on_step: object = None,
    ) -> int:
        done = real_read(fd, offset, length, method, stop, on_step)  # type: ignore[arg-type]
        if offset == 7 * MiB and not dropped.is_set():
            _drop(fd, 3 * MiB, 4096)  # as a page lost under the pass would be
            dropped.set()
        return done

    monkeypatch.setattr(fileread, "read_range", read_then_lose_a_page)
    plan = build_plan([str(fs.path("shard.bin"))])
    report = await warm_plan(plan, WarmOptions(concurrency=1, chunk_size=MiB))
    assert dropped.is_set()
    assert report.errors == () and report.resident_ratio == 1.0
    served = fs.bytes_served("shard.bin")
    assert 8 * MiB < served <= 8 * MiB + HOLE_WINDOW  # the hole came back, not the file
    # Re-read before the pass closed the file: its second open (verification) came after.
    lines = list(fs.lines)
    opens = [n for n, line in enumerate(lines) if line.startswith("OPEN /shard.bin")]
    reads = [n for n, line in enumerate(lines) if line.startswith(f"READ /shard.bin {3 * MiB} ")]
    assert len(reads) == 2 and (len(opens) == 1 or reads[1] < opens[1])


@needs_fuse
@pytest.mark.anyio
async def test_a_stopped_pass_leaves_what_it_did_not_read_unread(
    fuse_fs: Callable[..., FuseMount], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stop comes at the first read step of the file's last chunk: that chunk ends
    # short, the file is finished, and the holes of a stopped pass are everything it did
    # not read. They must stay unread, or a stop (SIGTERM, --timeout) waits for the rest
    # of the file at the storage's pace.
    size = 64 * MiB
    fs = fuse_fs({"cache": "keep", "files": {"shard.bin": {"size": size}}})
    stop = threading.Event()
    real_read = fileread.read_range

    def stop_in_the_last_chunk(
        fd: int,
        offset: int,
        length: int,
        method: str,
        stop_requested: object = lambda: False,
        on_step: object = None,
    ) -> int:
        def step(done: int) -> None:
            if callable(on_step):
                on_step(done)
            if offset == size - 32 * MiB:
                stop.set()

        return real_read(fd, offset, length, method, stop_requested, step)  # type: ignore[arg-type]

    monkeypatch.setattr(fileread, "read_range", stop_in_the_last_chunk)
    plan = build_plan([str(fs.path("shard.bin"))])
    report = await warm_plan(plan, WarmOptions(concurrency=2, chunk_size=32 * MiB), stop=stop)
    assert stop.is_set() and report.interrupted
    assert report.read_bytes < size
    assert fs.bytes_served("shard.bin") < size
