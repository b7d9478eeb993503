"""The keep-warm recheck: reads nothing while all is resident, names exactly the chunks
that lost pages (cachestat and mincore alike), and the re-read reads just those."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from preloader.engine.keepwarm import measure_chunks
from preloader.engine.warm import rewarm_chunks, warm_plan
from preloader.kernel import pagecache
from preloader.planning.planner import Plan, build_plan
from preloader.settings import WarmOptions

from ..lib.residency import evict_tree, vmtouch_resident

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
CHUNK = MiB
SMALL = 4096


@pytest.fixture(params=[False, True], ids=["cachestat", "mincore"])
def way(request: pytest.FixtureRequest) -> Iterator[str]:
    pagecache.force_mincore(request.param)
    try:
        yield "mincore" if request.param else "cachestat"
    finally:
        pagecache.force_mincore(False)


@pytest.fixture
def tree(shared_tmp: Path) -> Path:
    """Three folders of 4 KiB files and one 5.5 MiB file (several 1 MiB chunks)."""
    root = shared_tmp / "model"
    for folder in range(3):
        (root / f"part-{folder}").mkdir(parents=True)
        for index in range(50):
            (root / f"part-{folder}" / f"f{index:02d}.bin").write_bytes(os.urandom(SMALL))
    (root / "model.gguf").write_bytes(os.urandom(5 * MiB + MiB // 2))
    os.sync()  # eviction keeps dirty pages
    evict_tree(root)
    return root


def rchar() -> tuple[int, int]:
    """``rchar`` of this process, and what this one read of /proc/self/io added to it."""
    fd = os.open("/proc/self/io", os.O_RDONLY)
    try:
        text = os.read(fd, 4096)
    finally:
        os.close(fd)
    line = next(line for line in text.decode().splitlines() if line.startswith("rchar:"))
    return int(line.split()[1]), len(text)


async def bytes_read_by(work: object) -> int:
    before, own = rchar()
    await work  # type: ignore[misc]
    return rchar()[0] - before - own


def drop(path: str, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(10):  # a fresh page can sit in a per-CPU LRU batch for one call
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
            if pagecache.cachestat(fd, offset, length or os.fstat(fd).st_size).cached == 0:
                return
        raise AssertionError(f"{path}: pages at {offset}+{length} would not go")
    finally:
        os.close(fd)


async def warmed(root: Path) -> Plan:
    plan = build_plan([str(root)])
    report = await warm_plan(plan, WarmOptions(chunk_size=CHUNK))
    assert report.resident_bytes == plan.total_bytes
    return plan


async def test_a_recheck_reads_nothing_while_all_is_resident(tree: Path, way: str) -> None:
    plan = await warmed(tree)
    found: list[object] = []

    async def recheck() -> None:
        found.extend(await measure_chunks(plan, CHUNK))

    assert await bytes_read_by(recheck()) == 0
    assert len(found) == len(plan.files)
    assert all(
        item.lost == () and item.resident_bytes == item.size and item.error is None  # type: ignore[attr-defined]
        for item in found
    )


async def test_the_recheck_names_and_the_rewarm_reads_exactly_the_evicted_chunks(
    tree: Path, way: str
) -> None:
    plan = await warmed(tree)
    index = {spec.path: number for number, spec in enumerate(plan.files)}
    big = str(tree / "model.gguf")
    evicted_small = [str(tree / f"part-{folder}" / "f07.bin") for folder in range(3)]
    for path in evicted_small:
        drop(path, 0, 0)
    drop(big, 2 * MiB, MiB)  # chunk 2
    drop(big, 5 * MiB, 0)  # the half-chunk tail, chunk 5
    measured = await measure_chunks(plan, CHUNK)
    lost = [chunk for item in measured for chunk in item.lost]
    assert sorted((chunk.file_index, chunk.index, chunk.length) for chunk in lost) == sorted(
        [(index[path], 0, SMALL) for path in evicted_small]
        + [(index[big], 2, MiB), (index[big], 5, MiB // 2)]
    )
    assert measured[index[big]].resident_bytes == 5 * MiB + MiB // 2 - MiB - MiB // 2

    read = await bytes_read_by(rewarm_chunks(plan, lost, WarmOptions(chunk_size=CHUNK)))
    # Nothing resident is read. The kernel's readahead of chunk 2 (read_ahead_kb is 8 MiB
    # on the bench VM) may bring the tail back before its own read asks: then it is
    # cached, and skipped.
    assert 3 * SMALL + MiB <= read <= 3 * SMALL + MiB + MiB // 2
    assert vmtouch_resident(tree)[0] == vmtouch_resident(tree)[1]
    after = await measure_chunks(plan, CHUNK)
    assert all(item.lost == () for item in after)


async def test_a_file_replaced_since_planning_is_an_error_not_resident(tree: Path) -> None:
    plan = await warmed(tree)
    victim = tree / "part-1" / "f03.bin"
    fresh = tree / "fresh.tmp"
    fresh.write_bytes(victim.read_bytes())  # same bytes, and cached: only the inode differs
    os.replace(fresh, victim)
    measured = await measure_chunks(plan, CHUNK)
    [item] = [item for item in measured if item.path == str(victim)]
    assert item.error is not None and "replaced" in item.error
    assert item.resident_bytes is None and [c.length for c in item.lost] == [SMALL]
    assert all(other.lost == () for other in measured if other.path != str(victim))
