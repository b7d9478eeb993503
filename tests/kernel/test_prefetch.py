"""Small files opened ahead and prefetched (POSIX_FADV_WILLNEED): only on local block
filesystems, never on FUSE, and a file replaced after its ahead-open is ``changed``."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from preloader.engine import prefetch
from preloader.engine.events import EngineEvent
from preloader.engine.warm import rewarm_chunks, warm_plan
from preloader.kernel import fileread
from preloader.planning.planner import Plan, build_plan
from preloader.planning.specs import FileSpec, iter_chunks
from preloader.settings import WarmOptions

from ..lib.fusefs import FuseMount
from ..lib.marks import needs_fuse
from ..lib.residency import evict_tree, fincore_resident_bytes, vmtouch_resident

pytestmark = pytest.mark.anyio

FILES = 40
SIZE = 64 * 1024


def _small_tree(root: Path, count: int = FILES) -> Path:
    root.mkdir()
    for index in range(count):
        (root / f"blob-{index:03d}.bin").write_bytes(os.urandom(SIZE))
    os.sync()  # eviction keeps dirty pages
    evict_tree(root)
    return root


def _path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture
def willneed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths preloader asked ``POSIX_FADV_WILLNEED`` for, in order."""
    asked: list[str] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            asked.append(_path_of(fd))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    yield asked


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths preloader read (``fileread.read_range``), in order."""
    done: list[str] = []
    real = fileread.read_range

    def counting(
        fd: int, offset: int, length: int, method: str, stop: Any, on_step: Any = None
    ) -> int:
        done.append(_path_of(fd))
        return real(fd, offset, length, method, stop, on_step)

    monkeypatch.setattr(fileread, "read_range", counting)
    yield done


def _replace_at_its_prefetch(
    monkeypatch: pytest.MonkeyPatch, victim: str, scratch: Path
) -> list[str]:
    """Replace ``victim`` (a new file renamed over it) when preloader prefetches it: opened
    ahead, not read yet, the moment the ahead-open widens. Returns what was replaced."""
    replaced: list[str] = []
    real = os.posix_fadvise

    def replace_then_advise(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED and _path_of(fd) == victim and not replaced:
            fresh = scratch / "fresh.bin"
            fresh.write_bytes(os.urandom(SIZE))
            os.replace(fresh, victim)
            replaced.append(victim)
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", replace_then_advise)
    return replaced


def _local_disk(path: Path) -> None:
    spec = build_plan([str(path)]).files[0]
    if not prefetch.may_prefetch(spec):
        pytest.skip(f"{path} is not on a local block filesystem here")


def _local_plan(root: Path, count: int = FILES) -> tuple[Path, Plan]:
    """A fresh evicted tree of small files and its plan; skipped off a local disk."""
    tree = _small_tree(root, count)
    _local_disk(tree)
    return tree, build_plan([str(tree)])


async def test_small_files_on_local_disk_are_prefetched_read_and_resident(
    shared_tmp: Path, willneed: list[str], reads: list[str]
) -> None:
    tree, plan = _local_plan(shared_tmp / "small")
    report = await warm_plan(plan)
    assert sorted(willneed) == sorted(spec.path for spec in plan.files)
    # Read after the prefetch, never skipped: cachestat counts pages still in flight.
    assert sorted(reads) == sorted(willneed)
    assert all(f.error is None for f in report.files)
    # Outside witnesses, not preloader's own count.
    assert vmtouch_resident(tree) == (FILES * SIZE // 4096, FILES * SIZE // 4096)
    assert fincore_resident_bytes(*(spec.path for spec in plan.files)) == FILES * SIZE


@pytest.mark.parametrize("verify", [False, True], ids=["no-verify", "verify"])
async def test_a_file_replaced_after_its_ahead_open_is_changed_never_warm(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch, verify: bool
) -> None:
    _tree, plan = _local_plan(shared_tmp / "small")
    victim = plan.files[FILES // 2].path
    replaced = _replace_at_its_prefetch(monkeypatch, victim, shared_tmp)
    events: list[EngineEvent] = []
    report = await warm_plan(plan, WarmOptions(verify=verify), on_event=events.append)
    assert replaced == [victim]  # the ahead-open did happen before the replacement
    result = next(f for f in report.files if f.path == victim)
    assert result.error is not None and "replaced" in result.error
    assert result.read_bytes == 0  # nothing of it counts as warmed
    assert [(e.path, e.reason) for e in events if e.kind == "file_error"] == [(victim, "changed")]
    assert all(f.error is None for f in report.files if f.path != victim)


async def test_rewarm_reports_a_replaced_file_too(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tree, plan = _local_plan(shared_tmp / "small")
    victim = plan.files[3].path
    replaced = _replace_at_its_prefetch(monkeypatch, victim, shared_tmp)
    chunks = [c for c in iter_chunks(plan.files, 64 << 20) if c.length]
    report = await rewarm_chunks(plan, chunks)
    assert replaced == [victim]
    assert [path for path, _ in report.errors] == [victim]
    assert report.read_bytes == (FILES - 1) * SIZE


async def test_a_stopped_pass_leaves_no_descriptor_opened_ahead(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree, plan = _local_plan(shared_tmp / "small")
    stop = threading.Event()
    real = os.posix_fadvise

    def stop_at_the_fifth(fd: int, offset: int, length: int, advice: int) -> None:
        if _path_of(fd) == plan.files[4].path:
            stop.set()
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", stop_at_the_fifth)
    before = set(os.listdir("/proc/self/fd"))
    report = await warm_plan(plan, WarmOptions(verify=False), stop=stop)
    assert report.interrupted
    leaked = [_path_of(int(fd)) for fd in set(os.listdir("/proc/self/fd")) - before if fd.isdigit()]
    assert not [path for path in leaked if path.startswith(str(tree))]


@needs_fuse
async def test_no_prefetch_on_a_fuse_mount(
    fuse_fs: Callable[[dict[str, Any]], FuseMount], willneed: list[str]
) -> None:
    files = {f"blob-{index:03d}.bin": {"size": SIZE} for index in range(FILES)}
    fs = fuse_fs({"cache": "keep", "files": files})
    plan = build_plan([str(fs.mountpoint)])
    assert len(plan.files) == FILES
    assert not any(prefetch.may_prefetch(spec) for spec in plan.files)
    report = await warm_plan(plan)
    assert willneed == []
    assert all(f.error is None and f.read_bytes == SIZE for f in report.files)
    assert vmtouch_resident(fs.mountpoint) == (FILES * SIZE // 4096, FILES * SIZE // 4096)


def test_the_rule_reads_the_mount_table(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(
        "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "40 22 0:41 / /mnt/s3 rw - fuse.s3fs s3fs rw,user_id=0\n"
        "41 22 0:42 / /mnt/nfs rw - nfs4 host:/export rw\n"
        "42 22 8:17 / /mnt/ntfs rw - fuseblk /dev/sdb1 rw\n"
        "43 22 0:44 / /mnt/xfs rw - xfs /dev/sdc rw\n"
    )

    def on(major: int, minor: int) -> FileSpec:
        return FileSpec("/x", 1, os.makedev(major, minor), 1)

    allowed = [
        prefetch.may_prefetch(on(*dev), str(table))
        for dev in [(254, 0), (0, 41), (0, 42), (8, 17), (0, 44), (7, 7)]
    ]
    assert allowed == [True, False, False, False, True, False]


def _evict_last_page(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, SIZE - 4096, 4096, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def test_cached_small_files_are_not_read_again_and_count_resident(
    shared_tmp: Path, willneed: list[str], reads: list[str]
) -> None:
    # The ahead-open's cachestat decides: a file cached whole is neither prefetched nor
    # read, one that lost a single page is both.
    tree, plan = _local_plan(shared_tmp / "small")
    first = await warm_plan(plan, WarmOptions(verify=False))
    assert all(f.error is None for f in first.files)
    partly = [spec.path for spec in plan.files][::7]
    for path in partly:
        _evict_last_page(path)
    assert fincore_resident_bytes(*partly) == len(partly) * (SIZE - 4096)
    willneed.clear()
    reads.clear()
    report = await warm_plan(plan)
    assert sorted(reads) == sorted(willneed) == sorted(partly)
    assert all(f.error is None and f.read_bytes == SIZE for f in report.files)
    assert all(f.resident_after_read == SIZE for f in report.files)
    assert report.resident_bytes == FILES * SIZE
    assert vmtouch_resident(tree) == (FILES * SIZE // 4096, FILES * SIZE // 4096)


async def test_prefetched_batches_are_read_one_at_a_time(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many batches (4 files of 64 KiB each, cut by the chunk size) for 8 readers: on a
    # local disk the prefetch queues each batch's reads, so one thread keeps the disk
    # busy and more would only contend for the interpreter.
    from preloader.engine import readpass

    _tree, plan = _local_plan(shared_tmp / "small", count=160)
    lock = threading.Lock()
    active = [0]
    most = [0]
    real = readpass.whole_files_in_thread

    def counted(*args: Any) -> bool:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return real(*args)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(readpass, "whole_files_in_thread", counted)
    report = await warm_plan(plan, WarmOptions(concurrency=8, chunk_size=4 * SIZE))
    assert most[0] == 1
    assert all(f.error is None for f in report.files)
    assert report.resident_bytes == 160 * SIZE


async def test_verification_and_status_measure_local_files_in_one_thread(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from preloader.engine import residency as verify

    _tree, plan = _local_plan(shared_tmp / "small")
    threads: set[int] = set()
    real = verify.residency_of
    real_measurer = verify._measurer

    def recorded(spec: FileSpec, after_read: bool = False) -> Any:
        threads.add(threading.get_ident())
        return real(spec, after_read)

    def recorded_measurer(files: Any, after_read: bool) -> Any:
        measure = real_measurer(files, after_read)

        def measured(index: int) -> Any:
            threads.add(threading.get_ident())
            return measure(index)

        return measured

    monkeypatch.setattr(verify, "residency_of", recorded)
    monkeypatch.setattr(verify, "_measurer", recorded_measurer)
    report = await warm_plan(plan, WarmOptions(concurrency=8))
    assert len(threads) == 1
    assert report.resident_bytes == FILES * SIZE
    threads.clear()  # `status` measures the same way
    status = await verify.measure_residency(plan, concurrency=8)
    assert len(threads) == 1
    assert status.resident_bytes == FILES * SIZE


async def test_the_keep_warm_recheck_measures_local_files_in_one_thread(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from preloader.engine import keepwarm

    _tree, plan = _local_plan(shared_tmp / "small", count=3 * keepwarm._RUN_FILES)
    await warm_plan(plan)
    threads: set[int] = set()
    real = keepwarm._measure_run

    def recorded(*args: Any) -> Any:
        threads.add(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(keepwarm, "_measure_run", recorded)
    measured = await keepwarm.measure_chunks(plan, 64 << 20, concurrency=8)
    assert len(threads) == 1
    assert [m.resident_bytes for m in measured] == [SIZE] * len(plan.files)
    assert not any(m.lost for m in measured)


def test_all_local_reads_the_mount_table(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(
        "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "40 22 0:41 / /mnt/s3 rw - fuse.s3fs s3fs rw,user_id=0\n"
        "43 22 0:44 / /mnt/xfs rw - xfs /dev/sdc rw\n"
    )
    local, s3, xfs = os.makedev(254, 0), os.makedev(0, 41), os.makedev(0, 44)
    assert prefetch.all_local([local, xfs], str(table))
    assert not prefetch.all_local([local, s3], str(table))
    assert not prefetch.all_local([os.makedev(7, 7)], str(table))  # not in the table


async def test_plans_on_local_disks_alone_take_bigger_batches(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from preloader.engine import readpass

    tree = shared_tmp / "tiny"
    tree.mkdir()
    for index in range(300):
        (tree / f"t-{index:03d}.bin").write_bytes(b"x" * 4096)
    _local_disk(tree)
    sizes: list[int] = []
    real = readpass.whole_files_in_thread

    def recorded(specs: Any, batch: Any, *args: Any) -> bool:
        sizes.append(len(batch))
        return bool(real(specs, batch, *args))

    monkeypatch.setattr(readpass, "whole_files_in_thread", recorded)
    report = await warm_plan(build_plan([str(tree)]), WarmOptions(concurrency=1))
    assert sizes == [256, 44]
    assert report.resident_bytes == 300 * 4096
