"""The kernel layer on real files, checked against vmtouch and fincore."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from preloader.kernel import fileread, pagecache
from preloader.kernel.pagecache import ResidencyUnknownError
from preloader.units import PAGE_SIZE

from ..lib.cli import NOBODY
from ..lib.marks import needs_root, needs_vmtouch
from ..lib.residency import evict_tree, fincore_resident_bytes, vmtouch_resident


@pytest.fixture
def cachestat_then_restore() -> object:
    yield
    pagecache.force_mincore(False)


def _residency(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return pagecache.fd_residency(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _read_all(path: Path, method: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return fileread.read_range(fd, 0, os.fstat(fd).st_size, method)
    finally:
        os.close(fd)


def test_an_evicted_file_has_no_cached_pages(big_file: Path) -> None:
    fd = os.open(big_file, os.O_RDONLY)
    try:
        assert pagecache.cachestat(fd).cached == 0
    finally:
        os.close(fd)
    assert _residency(big_file) == 0
    assert fincore_resident_bytes(big_file) == 0


@pytest.mark.parametrize("method", ["sendfile", "mmap", "read"])
def test_each_read_method_makes_the_whole_file_resident(big_file: Path, method: str) -> None:
    size = big_file.stat().st_size
    assert _read_all(big_file, method) == size
    assert _residency(big_file) == size
    assert fincore_resident_bytes(big_file) >= size - PAGE_SIZE


@needs_vmtouch
def test_residency_agrees_with_vmtouch_for_a_partly_read_file(big_file: Path) -> None:
    fd = os.open(big_file, os.O_RDONLY)
    try:
        # The tail: readahead cannot run past the end, so every cached page is up to date
        # by the time the read returns and both witnesses see the same pages.
        size = os.fstat(fd).st_size
        offset = size - size % PAGE_SIZE - 8 * 1024 * 1024
        got = fileread.read_range(fd, offset, size - offset, "sendfile")
        assert got == size - offset
        resident = pagecache.fd_residency(fd, size)
    finally:
        os.close(fd)
    pages, total = vmtouch_resident(big_file)
    assert resident == size - offset
    assert pages == -(-resident // PAGE_SIZE)  # whole pages, the last one partial
    assert pages < total


def test_mincore_path_agrees_with_cachestat(big_file: Path, cachestat_then_restore: object) -> None:
    fd = os.open(big_file, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        fileread.read_range(fd, size - 12 * 1024 * 1024, 12 * 1024 * 1024, "sendfile")
        by_cachestat = pagecache.fd_residency(fd, os.fstat(fd).st_size)
        pagecache.force_mincore(True)
        by_mincore = pagecache.fd_residency(fd, os.fstat(fd).st_size)
        pages, last = pagecache.mincore_resident_pages(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    assert by_cachestat == by_mincore == pagecache.resident_bytes_from_pages(pages, size, last)
    assert 12 * 1024 * 1024 <= by_cachestat < size


def test_evict_drops_the_pages_it_read(big_file: Path) -> None:
    _read_all(big_file, "sendfile")
    fd = os.open(big_file, os.O_RDONLY)
    try:
        pagecache.evict(fd)
        assert pagecache.cachestat(fd).cached == 0
    finally:
        os.close(fd)


def test_a_read_stops_early_when_asked(big_file: Path) -> None:
    fd = os.open(big_file, os.O_RDONLY)
    try:
        assert fileread.read_range(fd, 0, 16 * 1024 * 1024, "sendfile", stop=lambda: True) == 0
    finally:
        os.close(fd)


def test_reading_past_the_end_returns_what_exists(shared_tmp: Path) -> None:
    path = shared_tmp / "small"
    path.write_bytes(b"x" * 5000)
    for method in ("sendfile", "mmap", "read"):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert fileread.read_range(fd, 0, 1 << 20, method) == 5000
        finally:
            os.close(fd)


def test_an_empty_file_is_trivially_resident(shared_tmp: Path) -> None:
    path = shared_tmp / "empty"
    path.write_bytes(b"")
    assert _residency(path) == 0


def test_resident_bytes_count_the_partial_last_page_as_partial() -> None:
    from_pages = pagecache.resident_bytes_from_pages
    assert from_pages(2, PAGE_SIZE + 1, last_page_resident=True) == PAGE_SIZE + 1
    assert from_pages(1, PAGE_SIZE + 1, last_page_resident=True) == 1
    assert from_pages(1, PAGE_SIZE + 1, last_page_resident=False) == PAGE_SIZE
    assert from_pages(3, 3 * PAGE_SIZE, last_page_resident=True) == 3 * PAGE_SIZE
    assert from_pages(0, 10, last_page_resident=False) == 0


def _in_child_as(uid: int, func: object, *args: object) -> tuple[str, object]:
    """Run func(*args) in a forked child after dropping to uid; return ('ok'|'error', x)."""
    import pickle

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result: tuple[str, object] = ("ok", func(*args))  # type: ignore[operator]
        except BaseException as err:  # report everything to the parent
            result = ("error", f"{type(err).__name__}: {err}")
        os.write(write_end, pickle.dumps(result))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)  # type: ignore[no-any-return]


def _measure(path: str, force_mincore: bool) -> int:
    pagecache.force_mincore(force_mincore)
    return _residency(Path(path))


@needs_root
@pytest.mark.parametrize("force_mincore", [False, True], ids=["cachestat", "mincore"])
def test_a_non_owner_gets_unknown_not_a_lie(big_file: Path, force_mincore: bool) -> None:
    """As uid 65534 on an evicted root-owned 0644 file: never report it resident."""
    big_file.chmod(0o644)
    evict_tree(big_file)
    status, value = _in_child_as(NOBODY, _measure, str(big_file), force_mincore)
    assert status == "error"
    assert isinstance(value, str)
    assert value.startswith(ResidencyUnknownError.__name__)
    assert "uid 0" in value and "CAP_FOWNER" in value
    # and the truth, seen by the owner, is 0
    assert _residency(big_file) == 0


@needs_root
def test_an_owner_gets_the_truth_without_privileges(big_file: Path) -> None:
    os.chown(big_file, NOBODY, NOBODY)
    evict_tree(big_file)
    assert _in_child_as(NOBODY, _measure, str(big_file), False) == ("ok", 0)
    assert _in_child_as(NOBODY, _measure, str(big_file), True) == ("ok", 0)


@needs_vmtouch
@pytest.mark.parametrize("force_mincore", [False, True], ids=["cachestat", "mincore"])
def test_range_residency_counts_only_that_range_like_vmtouch(
    big_file: Path, force_mincore: bool, cachestat_then_restore: object
) -> None:
    mib = 1024 * 1024
    pagecache.force_mincore(force_mincore)
    fd = os.open(big_file, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        # The tail again: readahead cannot run past the end of the file.
        tail = size - size % PAGE_SIZE - 8 * mib
        fileread.read_range(fd, tail, size - tail, "sendfile")
        tail_pages = pagecache.range_resident_pages(fd, tail, size - tail)
        head_pages = pagecache.range_resident_pages(fd, 0, 8 * mib)
        with pytest.raises(ValueError, match="page size"):
            pagecache.range_resident_pages(fd, 1, PAGE_SIZE)
    finally:
        os.close(fd)
    assert tail_pages == -(-(size - tail) // PAGE_SIZE)
    assert head_pages == 0
    out = subprocess.run(
        ["vmtouch", "-p", f"{tail}-{size}", str(big_file)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"Resident Pages: {tail_pages}/{tail_pages}" in out


@needs_root
def test_range_residency_of_a_non_owner_is_unknown(big_file: Path) -> None:
    def measure_range(path: str) -> int:
        fd = os.open(path, os.O_RDONLY)
        try:
            return pagecache.range_resident_pages(fd, 0, PAGE_SIZE)
        finally:
            os.close(fd)

    big_file.chmod(0o644)
    status, value = _in_child_as(NOBODY, measure_range, str(big_file))
    assert status == "error"
    assert isinstance(value, str) and value.startswith(ResidencyUnknownError.__name__)
