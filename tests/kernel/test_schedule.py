"""The read schedule: one stream per file, parallel across files, split only at the tail.

The schedule alone (pure), then the engine on real files (which chunks it reads in which
order, recorded at ``fileread.read_range``), then the splitting rule on a real FUSE mount.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from hypothesis import given
from hypothesis import strategies as st

from preloader.engine import reading, schedule
from preloader.engine.schedule import Schedule, Stream, solo_rule, split_rule
from preloader.engine.warm import rewarm_chunks, warm_plan
from preloader.kernel import fileread
from preloader.kernel.mounts import filesystem_type
from preloader.planning.filetable import FileTable
from preloader.planning.planner import build_plan
from preloader.planning.specs import Chunk, FileSpec, iter_chunks
from preloader.settings import WarmOptions

from ..lib.fusefs import FuseMount
from ..lib.marks import needs_fuse

MiB = 1024 * 1024


def _specs(*sizes: int) -> list[FileSpec]:
    return [FileSpec(f"/m/f{i}", size, 1, i) for i, size in enumerate(sizes)]


def _drive(plan: Schedule, workers: int) -> list[tuple[int, Chunk]]:
    """Run ``workers`` imaginary workers in turn, one batch each per round: who got what."""
    streams: dict[int, Stream | None] = dict.fromkeys(range(workers))
    active = set(range(workers))
    taken: list[tuple[int, Chunk]] = []
    while active:
        for worker in sorted(active):
            got = plan.take(streams[worker])
            if got is None:
                active.discard(worker)
                continue
            batch, streams[worker] = got
            taken.extend((worker, chunk) for chunk in batch)
    return taken


def test_each_file_is_one_stream_and_workers_go_across_files_in_plan_order() -> None:
    files = _specs(4 * MiB, 4 * MiB, 4 * MiB, 4 * MiB)
    taken = _drive(Schedule(files, MiB, may_split=lambda spec: False), workers=2)
    assert sorted((c.file_index, c.index) for _, c in taken) == [
        (f, i) for f in range(4) for i in range(4)
    ]
    for file_index in range(4):
        readers = {w for w, c in taken if c.file_index == file_index}
        assert len(readers) == 1  # one worker reads a file
        indexes = [c.index for _, c in taken if c.file_index == file_index]
        assert indexes == sorted(indexes)  # front to back
    # Files are started in plan order.
    firsts = [next(n for n, (_, c) in enumerate(taken) if c.file_index == f) for f in range(4)]
    assert firsts == sorted(firsts)


def test_a_file_is_split_only_when_no_file_is_left_unstarted() -> None:
    files = _specs(8 * MiB, 8 * MiB, 8 * MiB)
    taken = _drive(Schedule(files, MiB), workers=2)
    readers = {f: {w for w, c in taken if c.file_index == f} for f in range(3)}
    assert readers[0] != readers[1] and len(readers[0]) == len(readers[1]) == 1
    assert len(readers[2]) == 2  # the last file, when a worker ran out of files
    # The helper took the back half; each worker still reads one ascending range.
    for worker in readers[2]:
        mine = [c.index for w, c in taken if w == worker and c.file_index == 2]
        assert mine == list(range(mine[0], mine[0] + len(mine)))


def test_one_big_file_is_cut_into_one_ascending_range_per_worker() -> None:
    files = _specs(32 * MiB)
    taken = _drive(Schedule(files, MiB), workers=4)
    assert sorted(c.index for _, c in taken) == list(range(32))
    ranges = {}
    for worker in range(4):
        mine = [c.index for w, c in taken if w == worker]
        assert mine == list(range(mine[0], mine[0] + len(mine)))
        ranges[worker] = (mine[0], mine[-1])
    assert ranges[0][0] == 0
    assert len(set(ranges.values())) == 4


def test_no_split_where_it_does_not_pay() -> None:
    files = _specs(32 * MiB, MiB)
    taken = _drive(Schedule(files, MiB, may_split=lambda spec: spec.ino != 0), workers=4)
    assert len({w for w, c in taken if c.file_index == 0}) == 1


def test_runs_of_whole_small_files_come_as_one_batch() -> None:
    files = _specs(*([100_000] * 10), 3 * MiB, *([100_000] * 3))
    plan = Schedule(files, MiB, max_files=4)
    batches = []
    stream = None
    while (got := plan.take(stream)) is not None:
        batch, stream = got
        batches.append([(c.file_index, c.index) for c in batch])
    assert batches[:3] == [
        [(0, 0), (1, 0), (2, 0), (3, 0)],
        [(4, 0), (5, 0), (6, 0), (7, 0)],
        [(8, 0), (9, 0)],
    ]
    assert batches[3:6] == [[(10, 0)], [(10, 1)], [(10, 2)]]
    assert batches[6:] == [[(11, 0), (12, 0), (13, 0)]]


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
    chunk_size=st.integers(min_value=1, max_value=4096),
    max_files=st.integers(min_value=1, max_value=8),
)
def test_one_worker_reads_every_chunk_in_plan_order_and_batches_only_whole_small_files(
    sizes: list[int], chunk_size: int, max_files: int
) -> None:
    files = tuple(FileSpec(f"f{i}", size, 1, i) for i, size in enumerate(sizes))
    batches = _batches(Schedule(files, chunk_size, max_files=max_files))
    assert [chunk for batch in batches for chunk in batch] == list(iter_chunks(files, chunk_size))
    # The plan as columns, and every chunk given as a selection (the long way of batching
    # whole files), make the same batches.
    table = FileTable.of(files)
    assert _batches(Schedule(table, chunk_size, max_files=max_files)) == batches
    every = list(iter_chunks(files, chunk_size))
    assert _batches(Schedule(table, chunk_size, chunks=every, max_files=max_files)) == batches
    for batch in batches:
        assert 1 <= len(batch) <= max_files
        if len(batch) > 1:
            assert all(files[c.file_index].size <= chunk_size for c in batch)
            assert sum(c.length for c in batch) <= chunk_size


def _batches(plan: Schedule) -> list[tuple[Chunk, ...]]:
    """What one worker takes, batch by batch, until nothing is left."""
    batches = []
    stream = None
    while (got := plan.take(stream)) is not None:
        batch, stream = got
        batches.append(tuple(batch))
    return batches


def test_a_selection_reads_only_the_chunks_given() -> None:
    files = _specs(8 * MiB, 8 * MiB, MiB)
    chosen = [Chunk(1, 5, 5 * MiB, MiB), Chunk(0, 2, 2 * MiB, MiB), Chunk(1, 1, MiB, MiB)]
    plan = Schedule(files, MiB, chunks=chosen)
    assert plan.counts() == [1, 2, 0]
    taken = _drive(plan, workers=3)
    assert {c for _, c in taken} == set(chosen) and len(taken) == len(chosen)


def test_a_file_of_two_to_the_32_chunks_is_never_listed() -> None:
    plan = Schedule(_specs(2**32 * 4096), 4096)
    batch, stream = plan.take(None) or ((), None)
    assert batch == (Chunk(0, 0, 0, 4096),)
    assert stream is not None and stream.left == 2**32 - 1
    batch, _ = plan.take(None) or ((), None)
    assert batch[0].index == 2**31 + 1


def test_split_modes_and_the_auto_rule_by_the_planned_device(tmp_path: Path) -> None:
    here = FileSpec(str(tmp_path), 0, os.stat(tmp_path).st_dev, 0)
    assert split_rule("always")(here) and not split_rule("never")(here)
    assert split_rule("auto")(here)  # a local filesystem, not a no-split client
    with pytest.raises(ValueError, match="split mode"):
        split_rule("sometimes")


# ------------------------------------------------------------------ the engine, real files


def _write(path: Path, size: int) -> None:
    with open(path, "wb") as handle:
        handle.write(os.urandom(size))
        os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


Record = list[tuple[str, int]]


def _record_reads(
    monkeypatch: pytest.MonkeyPatch, before: Callable[[str, int], None] | None = None
) -> Record:
    """Every ``read_range`` call the engine makes, in call order, as (path, offset)."""
    calls: Record = []
    lock = threading.Lock()
    real_read = fileread.read_range

    def recording_read(
        fd: int, offset: int, length: int, method: str, stop: object, on_step: object = None
    ) -> int:
        path = os.readlink(f"/proc/self/fd/{fd}")
        with lock:
            calls.append((path, offset))
        if before is not None:
            before(path, offset)
        return real_read(fd, offset, length, method, stop, on_step)  # type: ignore[arg-type]

    monkeypatch.setattr(fileread, "read_range", recording_read)
    # Chunks of 1 MiB fit in the kernel's readahead of the one before (8 MiB on this VM's
    # disk), and a chunk already cached is rightly skipped: these tests are about the
    # order, so every chunk must reach read_range.
    monkeypatch.setattr(reading, "_all_cached", lambda fd, chunk: False)
    return calls


@pytest.mark.anyio
async def test_the_engine_reads_file_major_in_plan_order(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = shared_tmp / "model"
    root.mkdir()
    names = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    for name in names:
        _write(root / name, 4 * MiB)
    plan = build_plan([str(root)])
    calls = _record_reads(monkeypatch)
    options = WarmOptions(concurrency=2, chunk_size=MiB, split="never", verify=False)
    report = await warm_plan(plan, options)
    assert report.errors == ()
    paths = [str(root / name) for name in names]
    for path in paths:
        offsets = [offset for p, offset in calls if p == path]
        assert offsets == [0, MiB, 2 * MiB, 3 * MiB]  # one stream, front to back
    first = {p: next(n for n, (q, _) in enumerate(calls) if q == p) for p in paths}
    last = {p: max(n for n, (q, _) in enumerate(calls) if q == p) for p in paths}
    assert first[paths[0]] < first[paths[2]] and first[paths[1]] < first[paths[2]]
    # Two workers: the third file starts only once one of the first two is done.
    assert first[paths[2]] > min(last[paths[0]], last[paths[1]])
    assert first[paths[3]] > sorted([last[paths[0]], last[paths[1]], last[paths[2]]])[1]


@pytest.mark.anyio
async def test_the_engine_splits_the_last_file_between_idle_workers(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = shared_tmp / "model.gguf"
    _write(path, 8 * MiB)
    back_half = threading.Event()

    def hold_the_front(_: str, offset: int) -> None:
        # The first chunk waits until another worker reads in the back half: only a
        # split can release it (the wait is bounded, so a regression fails, not hangs).
        if offset >= 4 * MiB:
            back_half.set()
        elif offset == 0:
            back_half.wait(timeout=30)

    calls = _record_reads(monkeypatch, hold_the_front)
    report = await warm_plan(
        build_plan([str(path)]), WarmOptions(concurrency=2, chunk_size=MiB, split="always")
    )
    assert back_half.is_set()
    assert report.errors == () and report.resident_ratio == 1.0
    assert sorted(offset for _, offset in calls) == [i * MiB for i in range(8)]
    # Each worker reads one ascending range: the front from 0, the back from 5 MiB.
    assert calls[1][1] == 5 * MiB or calls[0][1] == 5 * MiB


@pytest.mark.anyio
async def test_rewarm_still_reads_just_the_chunks_asked_for(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = shared_tmp / "model.gguf"
    _write(path, 8 * MiB)
    plan = build_plan([str(path)])
    calls = _record_reads(monkeypatch)
    chunks = [Chunk(0, 6, 6 * MiB, MiB), Chunk(0, 1, MiB, MiB), Chunk(0, 2, 2 * MiB, MiB)]
    report = await rewarm_chunks(plan, chunks, WarmOptions(concurrency=4, chunk_size=MiB))
    assert report.errors == () and report.read_bytes == 3 * MiB
    assert sorted(offset for _, offset in calls) == [MiB, 2 * MiB, 6 * MiB]


# --------------------------------------------------------------- the rule, on a FUSE mount


@needs_fuse
@pytest.mark.anyio
async def test_auto_splits_a_fuse_file_unless_its_client_is_a_no_split_one(
    fuse_fs: Callable[..., FuseMount], monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = fuse_fs({"cache": "keep", "files": {"big.bin": {"size": 8 * MiB}}})
    assert filesystem_type(os.stat(fs.path("big.bin")).st_dev) == "fuse.failingfs"
    plan = build_plan([str(fs.path("big.bin"))])
    options = WarmOptions(concurrency=2, chunk_size=MiB)

    # A client known to want one stream per file: one worker reads it front to back.
    monkeypatch.setattr(schedule, "NO_SPLIT_FILESYSTEMS", frozenset({"fuse.failingfs"}))
    report = await warm_plan(plan, options)
    assert report.errors == () and report.resident_ratio == 1.0
    reads = [(int(e[2]), int(e[3])) for e in fs.events("READ")]
    last_front = max(n for n, (offset, _) in enumerate(reads) if offset < 2 * MiB)
    first_back = min(n for n, (offset, _) in enumerate(reads) if offset >= 4 * MiB)
    assert first_back > last_front

    # Any other client: the idle worker takes the back half, while the front still waits.
    monkeypatch.setattr(schedule, "NO_SPLIT_FILESYSTEMS", frozenset())
    gated = fuse_fs(
        {"cache": "keep", "files": {"big.bin": {"size": 8 * MiB, "gate_from": MiB}}},
        name="gated",
    )
    async with anyio.create_task_group() as group:
        group.start_soon(warm_plan, build_plan([str(gated.path("big.bin"))]), options)
        await anyio.to_thread.run_sync(gated.wait_for, f"GATE read /big.bin {5 * MiB}")
        gated.release()


# ------------------------------------------------------------- solo files (s3fs, big files)


def test_solo_files_are_read_at_most_solo_streams_at_once_in_plan_order() -> None:
    # Two small files, then four big ones: the small ones go as one batch, and the big
    # ones (solo) two at a time, each front to back, by the workers that began them.
    files = _specs(1000, 2000, 4 * MiB, 4 * MiB, 4 * MiB, 4 * MiB)
    plan = Schedule(
        files, MiB, may_split=lambda spec: False, solo=lambda spec: spec.size >= 4 * MiB
    )
    taken = _drive(plan, workers=4)
    big = [(worker, c.file_index, c.index) for worker, c in taken if c.file_index >= 2]
    assert schedule.SOLO_STREAMS == 2
    assert len({worker for worker, _, _ in big}) == 2  # the others retired
    order = [f for _, f, _ in big]
    first = {f: order.index(f) for f in (2, 3, 4, 5)}
    last = {f: len(order) - 1 - order[::-1].index(f) for f in (2, 3, 4, 5)}
    assert first[4] > min(last[2], last[3]) and first[5] > min(last[3], last[4])
    for f in (2, 3, 4, 5):
        assert [i for _, g, i in big if g == f] == [0, 1, 2, 3]  # front to back
    assert sorted(c.file_index for _, c in taken if c.file_index < 2) == [0, 1]


def test_a_solo_file_does_not_hold_back_the_files_that_are_not_solo() -> None:
    files = _specs(4 * MiB, 4 * MiB, 4 * MiB)
    plan = Schedule(files, MiB, may_split=lambda spec: False, solo=lambda spec: spec.ino == 0)
    taken = _drive(plan, workers=3)
    workers_per_file = {f: {w for w, c in taken if c.file_index == f} for f in range(3)}
    assert len(set().union(*workers_per_file.values())) == 3  # read side by side
    assert sorted((c.file_index, c.index) for _, c in taken) == [
        (f, i) for f in range(3) for i in range(4)
    ]


def test_solo_rule_by_size_and_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = os.stat(tmp_path).st_dev
    big = FileSpec(str(tmp_path / "big"), schedule.SOLO_MIN_BYTES, dev, 0)
    small = FileSpec(str(tmp_path / "small"), schedule.SOLO_MIN_BYTES - 1, dev, 1)
    assert not solo_rule("auto")(big)  # a local filesystem reads files side by side
    here = filesystem_type(dev)
    assert here is not None
    monkeypatch.setattr(schedule, "NO_SPLIT_FILESYSTEMS", frozenset({here}))
    assert solo_rule("auto")(big) and not solo_rule("auto")(small)
    assert not solo_rule("always")(big) and not solo_rule("never")(big)
    with pytest.raises(ValueError, match="split mode"):
        solo_rule("sometimes")


@needs_fuse
@pytest.mark.anyio
async def test_big_files_on_a_one_stream_client_are_fetched_file_by_file_each_byte_once(
    fuse_fs: Callable[..., FuseMount], monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    fs = fuse_fs({"cache": "keep", "files": {name: {"size": 4 * MiB} for name in names}})
    monkeypatch.setattr(schedule, "NO_SPLIT_FILESYSTEMS", frozenset({"fuse.failingfs"}))
    monkeypatch.setattr(schedule, "SOLO_MIN_BYTES", 4 * MiB)
    plan = build_plan([str(fs.path(""))])
    report = await warm_plan(plan, WarmOptions(concurrency=4, chunk_size=MiB))
    assert report.errors == () and report.resident_ratio == 1.0
    order = [event[1].lstrip("/") for event in fs.events("READ")]
    first = {name: order.index(name) for name in names}
    last = {name: len(order) - 1 - order[::-1].index(name) for name in names}
    # Two shards at a time, in order: the third only once one of the first two is read.
    assert first[names[2]] > min(last[names[0]], last[names[1]])
    assert first[names[3]] > sorted(last[n] for n in names[:3])[1]
    for name in names:
        assert fs.bytes_served(name) == 4 * MiB  # every byte fetched once
