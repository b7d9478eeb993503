"""The verification pass after reading: files measured side by side, in plan order.

An open on a network filesystem is a round trip (a HEAD request on s3fs), so the pass
measures up to ``concurrency`` files at once; shown with real threads that can only all
finish together, and on a real FUSE mount where one file's reopen never returns.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from preloader.engine import residency as verify
from preloader.engine.reports import FileResidency, WarmReport
from preloader.engine.residency import map_files
from preloader.engine.warm import warm_plan
from preloader.kernel import pagecache
from preloader.planning.planner import build_plan
from preloader.settings import WarmOptions

from ..lib.fusefs import FuseMount
from ..lib.marks import needs_fuse
from ..lib.residency import fincore_resident_bytes

MiB = 1024 * 1024


@pytest.mark.anyio
async def test_map_files_runs_concurrency_files_at_once_and_keeps_their_order() -> None:
    # Each call waits until four calls are in flight: one at a time, the barrier breaks
    # (its timeout only bounds a regression, it never decides a pass).
    barrier = threading.Barrier(4, timeout=30)
    finished: list[int] = []

    def measure(item: int) -> int:
        barrier.wait()
        finished.append(item)
        return item * 10

    items = list(range(8))
    assert await map_files(measure, items, concurrency=4) == [item * 10 for item in items]
    assert sorted(finished) == items


@pytest.mark.anyio
async def test_map_files_gives_up_only_the_item_that_stalls() -> None:
    release = threading.Event()

    def measure(item: int) -> str:
        if item == 0:
            release.wait(timeout=30)  # stuck until the test ends
        return f"measured {item}"

    try:
        results = await map_files(
            measure, [0, 1, 2], concurrency=1, unmeasured=lambda i, why: why, timeout=0.5
        )
    finally:
        release.set()
    assert results == ["stalled for more than 0.5 s", "measured 1", "measured 2"]


@pytest.mark.anyio
async def test_map_files_timeout_is_per_item_not_per_batch() -> None:
    # Ten items of 0.2 s run in one thread's batch (2 s) under a 0.8 s timeout: each
    # item is well inside it, so none may be given up however long the batch runs.
    def measure(item: int) -> str:
        threading.Event().wait(0.2)  # the work itself: a slow open, not a synchronisation
        return f"measured {item}"

    items = list(range(10))
    results = await map_files(
        measure, items, concurrency=1, unmeasured=lambda i, why: why, timeout=0.8
    )
    assert results == [f"measured {item}" for item in items]


@needs_fuse
@pytest.mark.anyio
async def test_read_timeout_is_per_file_in_a_batch_of_small_files(
    fuse_fs: Callable[..., FuseMount],
) -> None:
    # One worker reads twelve 64 KiB files served at 256 KiB/s (0.25 s each) in one
    # batch: 3 s in all, against a 1.5 s read timeout that each file is well inside.
    files = {f"f{index:02}.bin": {"size": 64 * 1024, "rate": 256 * 1024} for index in range(12)}
    fs = fuse_fs({"cache": "keep", "files": files})
    plan = build_plan([str(fs.mountpoint)])
    options = WarmOptions(concurrency=1, chunk_size=MiB, read_timeout=1.5)
    report = await warm_plan(plan, options)
    assert [result.error for result in report.files] == [None] * 12
    assert report.read_bytes == 12 * 64 * 1024


@needs_fuse
@pytest.mark.anyio
async def test_a_reopen_that_hangs_does_not_hold_up_measuring_the_other_files(
    fuse_fs: Callable[..., FuseMount], shared_tmp: Path
) -> None:
    # The second open of a.bin (the verification's) never returns; b.bin's reopen must
    # come while a.bin's still hangs, long before the read timeout would give it up.
    files = {"a.bin": {"size": MiB, "stall_open": 2}, "b.bin": {"size": MiB}}
    fs = fuse_fs({"cache": "keep", "files": files})
    plan = build_plan([str(fs.path("a.bin")), str(fs.path("b.bin"))])
    stop = threading.Event()
    reports: list[WarmReport] = []

    async def warm() -> None:
        options = WarmOptions(concurrency=2, chunk_size=MiB, read_timeout=600)
        reports.append(await warm_plan(plan, options, stop=stop))

    async with anyio.create_task_group() as group:
        group.start_soon(warm)
        await anyio.to_thread.run_sync(fs.wait_for, "STALL open /a.bin")
        await anyio.to_thread.run_sync(fs.wait_for, "OPEN /b.bin 2")
        stop.set()
    (report,) = reports
    by_name = {Path(result.path).name: result for result in report.files}
    assert by_name["b.bin"].residency.resident_bytes == MiB
    assert by_name["a.bin"].residency.resident_bytes is None
    assert report.interrupted


@pytest.fixture(params=[False, True], ids=["cachestat", "mincore"])
def kernel_api(request: pytest.FixtureRequest) -> Iterator[bool]:
    pagecache.force_mincore(request.param)
    try:
        yield request.param
    finally:
        pagecache.force_mincore(False)


@pytest.mark.parametrize("after_read", [True, False], ids=["verification", "status"])
def test_the_short_way_of_measuring_gives_what_residency_of_does(
    shared_tmp: Path, kernel_api: bool, after_read: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every kind of file the verification (after the read pass) and `status` meet: the
    measurer's answer is :func:`residency_of`'s, and only a wholly cached, unchanged file
    (or an empty one) takes the short way, where there is cachestat."""
    model = shared_tmp / "model"
    model.mkdir()
    sizes = {"whole": 3 * MiB + 5, "empty": 0, "half": 2 * MiB, "grown": MiB, "shrunk": MiB}
    sizes |= {"replaced": MiB, "deleted": MiB, "evicted": 100_000}
    for name, size in sizes.items():
        (model / name).write_bytes(os.urandom(size))
    os.sync()  # dirty pages cannot be evicted
    plan = build_plan([str(model)])
    for spec in plan.files:
        (Path(spec.path)).read_bytes()  # the read pass: every page cached
    fd = os.open(model / "half", os.O_RDONLY)  # its first half cached, no readahead
    pagecache.evict(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    os.pread(fd, MiB, 0)
    os.close(fd)
    fd = os.open(model / "evicted", os.O_RDONLY)
    pagecache.evict(fd)
    os.close(fd)
    with open(model / "grown", "ab") as grown:
        grown.write(b"g" * 4096)
    os.truncate(model / "shrunk", 4096)
    (model / "new").write_bytes(b"n" * MiB)
    (model / "new").replace(model / "replaced")
    (model / "deleted").unlink()

    measure = verify._measurer(plan.files, after_read)
    short = set()
    opens: dict[str, int] = {}
    real_open = os.open

    def counted(path: Any, *args: Any, **kwargs: Any) -> int:
        opens[os.fsdecode(path)] = opens.get(os.fsdecode(path), 0) + 1
        return real_open(path, *args, **kwargs)

    for index, spec in enumerate(plan.files):
        monkeypatch.setattr(os, "open", counted)
        got = measure(index)
        monkeypatch.setattr(os, "open", real_open)
        full = verify.residency_of(spec, after_read)
        if isinstance(got, int):
            short.add(Path(spec.path).name)
            got = FileResidency(spec.path, spec.size, got)
        assert got == full, spec.path
    assert short == (set() if kernel_api else {"whole", "empty"})
    # Still the planned file: opened once, whatever it holds (an open is a round trip on
    # s3fs); another file now, or none: opened again the long way, which names it.
    once = {"whole", "empty", "half", "grown", "shrunk", "evicted"}
    expected = {name: 1 for name in once} | {"replaced": 2, "deleted": 2}
    if kernel_api:  # without cachestat every file takes residency_of's one open
        expected = dict.fromkeys(expected, 1)
    assert {Path(path).name: count for path, count in opens.items()} == expected
    # The outside witness for the two measured the long way.
    by_name = {Path(s.path).name: i for i, s in enumerate(plan.files)}
    half = measure(by_name["half"])
    assert isinstance(half, FileResidency) and half.resident_bytes is not None
    assert MiB <= half.resident_bytes < 2 * MiB
    assert fincore_resident_bytes(model / "half") == half.resident_bytes
    evicted = measure(by_name["evicted"])
    assert isinstance(evicted, FileResidency) and evicted.resident_bytes == 0
