"""The async engine on real files and the real page cache."""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

import anyio
import pytest

from preloader.engine.events import EngineEvent
from preloader.engine.keepwarm import measure_chunks
from preloader.engine.reports import WarmProgress
from preloader.engine.residency import evict_plan, measure_residency
from preloader.engine.warm import rewarm_chunks, warm_plan
from preloader.kernel import fileread, pagecache
from preloader.planning.planner import build_plan
from preloader.planning.specs import FileSpec
from preloader.settings import AUTO_CONCURRENCY, WarmOptions

from ..lib.marks import needs_vmtouch
from ..lib.residency import evict_tree, vmtouch_resident

MiB = 1024 * 1024

pytestmark = pytest.mark.anyio


@needs_vmtouch
async def test_warm_makes_a_cold_model_fully_resident(model_dir: Path) -> None:
    plan = build_plan([str(model_dir)])
    assert (await measure_residency(plan)).resident_bytes == 0
    progress = WarmProgress()
    report = await warm_plan(plan, WarmOptions(concurrency=3, chunk_size=MiB), progress=progress)
    assert report.errors == ()
    assert report.read_bytes == report.bytes == plan.total_bytes
    assert report.resident_bytes == report.bytes
    assert report.resident_ratio == 1.0
    assert progress.bytes_read == plan.total_bytes
    assert progress.files_done == len(plan.files)
    pages, total = vmtouch_resident(model_dir)
    assert pages == total


async def test_a_big_file_is_read_by_several_workers_once_per_chunk_with_one_open(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chunks of 16 MiB, four workers: the four whole chunks are read at once, so none
    # can be cached by another's readahead first. The tail chunk may be: a disk with a
    # large read_ahead_kb caches it while the chunk before it is read, and a chunk
    # whose every page is cached is rightly skipped, never read twice.
    big_file = shared_tmp / "model.gguf"
    with open(big_file, "wb") as handle:
        handle.write(os.urandom(4 * 16 * MiB + 9 * MiB + 123))  # a tail chunk too
        handle.flush()
        os.fsync(handle.fileno())  # dirty pages cannot be evicted
    evict_tree(big_file)
    reads: Counter[tuple[int, int]] = Counter()
    threads: set[int] = set()
    opens: Counter[str] = Counter()
    real_read, real_open = fileread.read_range, os.open

    def counting_read(
        fd: int, offset: int, length: int, method: str, stop: object, on_step: object = None
    ) -> int:
        reads[(offset, length)] += 1
        threads.add(threading.get_ident())
        return real_read(fd, offset, length, method, stop, on_step)  # type: ignore[arg-type]

    def counting_open(path: str, flags: int, *args: int) -> int:
        opens[os.fspath(path)] += 1
        return real_open(path, flags, *args)

    plan = build_plan([str(big_file)])
    monkeypatch.setattr(fileread, "read_range", counting_read)
    monkeypatch.setattr(os, "open", counting_open)
    report = await warm_plan(plan, WarmOptions(concurrency=4, chunk_size=16 * MiB, verify=False))
    monkeypatch.undo()
    size = big_file.stat().st_size
    chunks = [(o, min(16 * MiB, size - o)) for o in range(0, size, 16 * MiB)]
    assert set(chunks[:4]) <= set(reads) <= set(chunks)
    assert set(reads.values()) == {1}
    assert len(threads) > 1
    assert opens[str(big_file)] == 1
    assert report.read_bytes == size


async def test_a_file_of_several_chunks_is_handed_over_once_all_of_it_is_read(
    shared_tmp: Path,
) -> None:
    model = shared_tmp / "handover"
    model.mkdir()
    (model / "config.json").write_text("{}")
    shard = model / "model.safetensors"
    with open(shard, "wb") as handle:
        handle.write(os.urandom(3 * MiB + 4096))
        os.fsync(handle.fileno())  # dirty pages cannot be evicted
    evict_tree(model)
    plan = build_plan([str(model)])
    handed: list[tuple[str, int, int, list[str]]] = []

    def on_file_read(spec: FileSpec) -> None:
        # Every page of the file is read by now, and the pass's descriptor closed.
        fd = os.open(spec.path, os.O_RDONLY)
        try:
            resident = pagecache.fd_residency(fd, spec.size)
            ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        fds = Path("/proc/self/fd")
        held = [str(fd) for fd in fds.iterdir() if os.path.realpath(fd) == spec.path]
        handed.append((spec.path, ino, resident, held))

    options = WarmOptions(concurrency=3, chunk_size=MiB)
    report = await warm_plan(plan, options, on_file_read=on_file_read)
    assert report.errors == ()
    assert handed == [(str(shard), shard.stat().st_ino, shard.stat().st_size, [])]


async def test_auto_concurrency_warms_and_reports_what_it_settled_on(model_dir: Path) -> None:
    plan = build_plan([str(model_dir)])
    report = await warm_plan(plan, WarmOptions(concurrency=AUTO_CONCURRENCY, chunk_size=MiB))
    assert report.errors == ()
    assert report.resident_ratio == 1.0
    assert report.concurrency >= 4  # starts at the fixed default and only goes up
    # The report says how it settled: a model this small ends before the first window.
    assert report.autotune is not None
    assert report.autotune.settled == report.concurrency
    assert all(readers >= 4 for readers, _ in report.autotune.steps)
    assert report.autotune.why
    document = report.to_json()["autotune"]
    assert isinstance(document, dict) and document["settled"] == report.concurrency
    fixed = await warm_plan(plan, WarmOptions(concurrency=4, chunk_size=MiB))
    assert fixed.autotune is None and fixed.to_json()["autotune"] is None


@pytest.mark.parametrize("method", ["sendfile", "mmap", "read"])
async def test_every_method_warms(model_dir: Path, method: str) -> None:
    report = await warm_plan(
        build_plan([str(model_dir)]), WarmOptions(method=method, chunk_size=MiB)
    )
    assert report.method == method
    assert report.resident_ratio == 1.0


async def test_evict_plan_leaves_nothing_resident(model_dir: Path) -> None:
    plan = build_plan([str(model_dir)])
    await warm_plan(plan)
    after = await evict_plan(plan)
    assert after.resident_bytes == 0
    assert (await measure_residency(plan)).resident_ratio == 0.0


async def test_a_file_truncated_after_planning_is_an_error_not_a_hang(big_file: Path) -> None:
    plan = build_plan([str(big_file)])
    os.truncate(big_file, 5 * MiB)
    report = await warm_plan(plan, WarmOptions(chunk_size=4 * MiB))
    [result] = report.files
    assert result.error is not None and "shrank" in result.error


async def test_a_file_replaced_by_a_fifo_after_planning_is_never_read(shared_tmp: Path) -> None:
    path = shared_tmp / "w.bin"
    path.write_bytes(b"x" * 100)
    plan = build_plan([str(shared_tmp)])
    path.unlink()
    os.mkfifo(path)
    report = await warm_plan(plan)
    [result] = report.files
    assert result.error == "no longer a regular file"


async def test_a_file_replaced_after_planning_is_refused(shared_tmp: Path) -> None:
    path = shared_tmp / "w.bin"
    path.write_bytes(b"x" * 100)
    plan = build_plan([str(shared_tmp)])
    replacement = shared_tmp / "w.bin.new"
    replacement.write_bytes(b"y" * 100)  # a new inode while the old one still exists
    replacement.replace(path)
    events: list[EngineEvent] = []
    [result] = (await warm_plan(plan, on_event=events.append)).files
    assert result.error == "replaced by another file since planning"
    assert [e.reason for e in events if e.kind == "file_error"] == ["changed"]


async def test_a_deleted_file_is_an_error_and_the_rest_is_warmed(model_dir: Path) -> None:
    plan = build_plan([str(model_dir)])
    victim = plan.files[-1].path
    os.unlink(victim)
    events: list[EngineEvent] = []
    report = await warm_plan(plan, WarmOptions(chunk_size=MiB), on_event=events.append)
    assert [(f.path, f.error) for f in report.errors] == [(victim, "No such file or directory")]
    assert ("file_error", victim, "read") in [(e.kind, e.path, e.reason) for e in events]
    others = [f for f in report.files if f.path != victim]
    assert all(f.residency.resident_bytes == f.size for f in others)


async def test_a_stop_request_ends_the_pass_and_says_interrupted(big_file: Path) -> None:
    stop = threading.Event()
    stop.set()
    report = await warm_plan(build_plan([str(big_file)]), WarmOptions(chunk_size=MiB), stop=stop)
    assert report.interrupted
    assert report.read_bytes == 0
    [result] = report.files
    assert result.cause == "not read: the pass was stopped before this file"


async def test_timeout_stops_the_pass_and_says_timed_out(shared_tmp: Path) -> None:
    # Eight chunks read one at a time through the copying path cannot all finish before a
    # deadline that fires at the first scheduling point.
    path = shared_tmp / "big"
    with open(path, "wb") as handle:
        handle.truncate(64 * MiB)
    report = await warm_plan(
        build_plan([str(path)]),
        WarmOptions(concurrency=1, chunk_size=8 * MiB, method="read", timeout=0.0),
    )
    assert report.timed_out and not report.interrupted
    assert report.read_bytes < 64 * MiB


async def test_progress_is_updated_on_the_event_loop(model_dir: Path) -> None:
    progress = WarmProgress()
    seen: list[int] = []

    async def watch() -> None:
        while progress.state != "done":
            seen.append(progress.bytes_read)
            await anyio.sleep(0)

    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        await warm_plan(
            build_plan([str(model_dir)]), WarmOptions(chunk_size=MiB), progress=progress
        )
    assert progress.files_total == len(build_plan([str(model_dir)]).files)
    assert seen == sorted(seen)


async def test_bytes_arrive_with_every_read_step_and_never_count_twice(big_file: Path) -> None:
    progress = WarmProgress()
    seen: list[tuple[int, int]] = []

    async def watch() -> None:
        while progress.state != "done":
            seen.append((progress.bytes_arrived, progress.bytes_read))
            await anyio.sleep(0)

    plan = build_plan([str(big_file)])
    async with anyio.create_task_group() as group:
        group.start_soon(watch)
        await warm_plan(plan, WarmOptions(chunk_size=16 * MiB), progress=progress)
    arrived = [a for a, _ in seen]
    # A chunk's bytes move from arriving to read in one step of the loop: never a dip.
    assert arrived == sorted(arrived)
    assert all(a >= r for a, r in seen)
    assert not progress.reading
    assert progress.bytes_arrived == progress.bytes_read == plan.total_bytes


@pytest.mark.parametrize("method", ["sendfile", "mmap", "read"])
def test_a_read_tells_its_bytes_after_every_step(big_file: Path, method: str) -> None:
    steps: list[int] = []
    length = 20 * MiB
    fd = os.open(big_file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert fileread.read_range(fd, 0, length, method, on_step=steps.append) == length
    finally:
        os.close(fd)
    assert len(steps) >= 3 and steps == sorted(steps) and steps[-1] == length


def test_options_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="method"):
        WarmOptions(method="cat")
    with pytest.raises(ValueError, match="chunk_size"):
        WarmOptions(chunk_size=10)
    with pytest.raises(ValueError, match="concurrency"):
        WarmOptions(concurrency=-1)


def _drop_range(path: Path, offset: int, length: int) -> None:
    """DONTNEED on one range; again while pages remain (a fresh page can sit in a per-CPU
    LRU batch, where one call misses it, as pagecache.evict notes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(10):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
            if pagecache.cachestat(fd, offset, length).cached == 0:
                return
        raise AssertionError(f"{path}: pages at {offset}+{length} would not go")
    finally:
        os.close(fd)


async def test_measure_chunks_names_exactly_the_chunks_that_lost_pages(big_file: Path) -> None:
    plan = build_plan([str(big_file)])
    await warm_plan(plan, WarmOptions(chunk_size=4 * MiB))
    [whole] = await measure_chunks(plan, 4 * MiB)
    assert whole.lost == () and whole.resident_bytes == whole.size

    _drop_range(big_file, 4 * MiB, 4 * MiB)  # chunk 1
    # Part of chunk 3, 2 MiB aligned: the kernel drops whole (large) folios only.
    _drop_range(big_file, 14 * MiB, 2 * MiB)
    [measured] = await measure_chunks(plan, 4 * MiB)
    assert [(c.index, c.offset, c.length) for c in measured.lost] == [
        (1, 4 * MiB, 4 * MiB),
        (3, 12 * MiB, 4 * MiB),
    ]
    assert measured.resident_bytes == measured.size - 6 * MiB
    assert measured.error is None and measured.reason is None


async def test_rewarm_reads_only_the_lost_chunks(
    big_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = build_plan([str(big_file)])
    await warm_plan(plan, WarmOptions(chunk_size=4 * MiB))
    _drop_range(big_file, 4 * MiB, 4 * MiB)
    _drop_range(big_file, 20 * MiB, 8 * MiB)  # the last two chunks, the 123-byte tail too
    [measured] = await measure_chunks(plan, 4 * MiB)

    reads: Counter[tuple[int, int]] = Counter()
    real_read = fileread.read_range

    def counting_read(
        fd: int, offset: int, length: int, method: str, stop: object, on_step: object = None
    ) -> int:
        reads[(offset, length)] += 1
        return real_read(fd, offset, length, method, stop, on_step)  # type: ignore[arg-type]

    monkeypatch.setattr(fileread, "read_range", counting_read)
    report = await rewarm_chunks(plan, measured.lost, WarmOptions(chunk_size=4 * MiB))
    monkeypatch.undo()
    size = big_file.stat().st_size
    assert dict(reads) == {(4 * MiB, 4 * MiB): 1, (20 * MiB, 4 * MiB): 1, (24 * MiB, 123): 1}
    assert report.read_bytes == 8 * MiB + 123 == size - 16 * MiB
    assert report.errors == () and report.chunks == 3
    [after] = await measure_chunks(plan, 4 * MiB)
    assert after.lost == () and after.resident_bytes == size


async def test_a_file_that_cannot_be_opened_is_all_lost_and_its_rewarm_fails(
    model_dir: Path,
) -> None:
    plan = build_plan([str(model_dir)])
    await warm_plan(plan, WarmOptions(chunk_size=MiB))
    victim = plan.files[-1]
    os.unlink(victim.path)
    measured = await measure_chunks(plan, MiB)
    gone = measured[-1]
    assert gone.error is not None and gone.error.startswith("cannot open")
    assert sum(c.length for c in gone.lost) == victim.size
    assert all(m.lost == () for m in measured[:-1])
    events: list[EngineEvent] = []
    report = await rewarm_chunks(
        plan, gone.lost, WarmOptions(chunk_size=MiB), on_event=events.append
    )
    assert report.errors == ((victim.path, "No such file or directory"),)
    assert [e.kind for e in events if e.kind == "file_error"] == ["file_error"]


async def test_warming_a_warm_file_reads_only_the_chunks_that_lost_pages(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = shared_tmp / "model.bin"
    path.write_bytes(os.urandom(4 * 16 * MiB))
    plan = build_plan([str(path)])
    options = WarmOptions(concurrency=2, chunk_size=16 * MiB)
    assert (await warm_plan(plan, options)).resident_bytes == 4 * 16 * MiB
    reads: list[tuple[int, int]] = []
    real_read = fileread.read_range

    def counting_read(
        fd: int, offset: int, length: int, method: str, stop: object, on_step: object = None
    ) -> int:
        reads.append((offset, length))
        return real_read(fd, offset, length, method, stop, on_step)  # type: ignore[arg-type]

    monkeypatch.setattr(fileread, "read_range", counting_read)
    again = await warm_plan(plan, options)
    assert again.resident_bytes == again.read_bytes == 4 * 16 * MiB
    assert reads == []  # every chunk was cached: nothing read, no I/O, no copy
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be evicted
        os.posix_fadvise(fd, 16 * MiB, 16 * MiB, os.POSIX_FADV_DONTNEED)  # chunk 1
    finally:
        os.close(fd)
    third = await warm_plan(plan, options)
    assert third.resident_bytes == third.read_bytes == 4 * 16 * MiB
    assert reads == [(16 * MiB, 16 * MiB)]
