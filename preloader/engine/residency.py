"""Residency after a pass, and eviction: measure each file, explain what is not cached.

Each file is opened, measured (cachestat, or mincore where the kernel lacks it) and
closed in a worker thread; a file whose residency the kernel will not reveal truthfully
is reported unknown with the reason, never guessed.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, TypeVar

import anyio
import anyio.to_thread

from ..kernel import pagecache, reclaim
from ..kernel.fileread import OPEN_FLAGS
from ..planning.planner import Plan
from ..planning.specs import FileSpec
from ..units import PAGE_SIZE, format_bytes
from .prefetch import measuring_threads
from .reading import Handoff, cancel_after_stop, describe, open_regular, slide_deadline
from .reports import FileResidency, Residencies, ResidencyColumns, ResidencyReport

if TYPE_CHECKING:
    from ..planning.filetable import FileTable

__all__ = [
    "Probe",
    "bypass_probe",
    "evict_plan",
    "eviction_causes",
    "explain",
    "map_files",
    "map_files_into",
    "measure_residency",
    "residency_of",
    "unknown_residency",
]

_T = TypeVar("_T")
_I = TypeVar("_I")
_R = TypeVar("_R")

# Fewest threads measuring residency side by side after a read pass: verifying is an
# open, a cachestat and a close per file, bound by the open's round trip on network
# filesystems (a HEAD request on s3fs), not by bandwidth (on local disks alone, one:
# see measuring_threads).
_VERIFY_WORKERS = 16

# A file counts as resident when at least this share of it is; the last page and races
# with concurrent eviction make exact equality too strict.
_RESIDENT_SHARE = 0.999


Probe = Literal["bypass", "invalidates", "keeps"]
"""What a one-page probe of a file not resident after the pass found
(:func:`bypass_probe`)."""


def explain(
    spec: FileSpec, after_read: int | None, now: int, probe: Probe | None = None
) -> str | None:
    """Why a file that was read in full is not resident now, or ``None`` if it is.

    Each cause is told by evidence, never assumed: a bypass of the page cache only where a
    fresh one-page read was not cached, a filesystem dropping the cache at open only
    where that page went at the next open, and otherwise eviction.

    :param after_read: resident bytes right after its last chunk, on the read descriptor.
    :param probe: :func:`bypass_probe`'s finding; ``None`` when not probed or unknown.
    """
    if spec.size == 0 or now >= spec.size * _RESIDENT_SHARE:
        return None
    share = now / spec.size
    if probe == "bypass":
        return (
            "reads bypass the page cache (FUSE direct_io or a similar mount: a fresh read "
            "was not cached): a server reading this file goes to the storage every time; "
            "warming cannot help here"
        )
    if after_read is not None and after_read < spec.size * _RESIDENT_SHARE:
        if after_read > 0 or probe is not None:  # the cache does hold this file's pages
            return (
                f"only {after_read / spec.size:.1%} resident right after reading, "
                f"{share:.1%} now: pages were reclaimed while the pass ran "
                f"({eviction_causes()})"
            )
        return (
            "not resident right after reading: the filesystem bypasses the page cache, or "
            f"pages were reclaimed at once ({eviction_causes()}); a probe could not tell"
        )
    if after_read is not None and now == 0 and probe == "invalidates":
        return (
            "resident after reading but dropped when the file was opened again: the "
            "filesystem invalidates the page cache at open (FUSE without kernel_cache/"
            "keep_cache, e.g. rclone mount); warming cannot help here"
        )
    if after_read is not None and now == 0:
        return (
            "resident right after reading, none of it after the pass: dropped or evicted "
            f"meanwhile (a cache drop, {eviction_causes()})"
        )
    return f"{share:.1%} resident: pages were evicted after reading ({eviction_causes()})"


def eviction_causes() -> str:
    """What evicts pages that were read, as far as this process can tell: memory
    pressure, a cgroup limit, and this machine's proactive reclaim where there is one."""
    proactive = reclaim.note()
    if proactive is None:
        return "memory pressure or a cgroup limit"
    return f"memory pressure, a cgroup limit, or {proactive}"


_CHANGED = {
    errno.ENOENT: "deleted since it was read",
    errno.ESTALE: "replaced by another file since it was read",
    errno.EINVAL: "no longer a regular file since it was read",
}


def residency_of(spec: FileSpec, after_read: bool = False) -> FileResidency:
    """Measure one planned file; ``after_read``: the warm pass verifying what it read,
    where a file deleted, replaced or shrunk since is a change (``changed``), not an
    unknown residency."""
    try:
        fd = open_regular(spec, blocking=False)  # measured, never read
    except OSError as err:
        if after_read and err.errno in _CHANGED:
            # Its planned bytes are in no file a loader can open: none of them count.
            cause = f"{_CHANGED[err.errno]} ({describe(err)})"
            return FileResidency(spec.path, spec.size, 0, cause, changed=True)
        return FileResidency(spec.path, spec.size, None, f"cannot open: {describe(err)}")
    return _on_open_file(spec, fd, "measure", lambda: _measure_open(spec, fd, after_read))


def _measurer(files: FileTable, after_read: bool) -> Callable[[int], int | FileResidency]:
    """``residency_of(files[index], after_read)``, with the common case made short.

    A file that is still the planned one (:func:`.is_planned`, and its size) and cached whole
    costs an open, an ``fstat``, a ``cachestat`` and a close, and gives its size: no
    :class:`FileSpec`, no :class:`FileResidency` (verifying 20,000 cached files took
    0.36-0.44 s through :func:`residency_of` alone, 0.21-0.24 s so). One that is the
    planned file but not cached whole is measured on the same descriptor, as
    :func:`residency_of` would after its open (no second open: a round trip on s3fs);
    one that cannot be opened or is another file now takes :func:`residency_of`'s way,
    which names what is wrong with it. Without cachestat every file does.
    """
    if pagecache.whole_file_counter() is None:
        return lambda index: residency_of(files[index], after_read)
    cached_pages = pagecache.cached_pages  # per-thread buffers: any worker may call it

    def count(fd: int, length: int) -> int:
        return cached_pages(fd, 0, length)

    def measure(index: int) -> int | FileResidency:
        path, size, dev, ino, mtime_ns = files.identity(index)
        try:
            fd = os.open(path, OPEN_FLAGS)  # as open_regular, left non-blocking
        except OSError:
            return residency_of(files[index], after_read)
        try:
            planned, whole = pagecache.planned_and_whole(fd, size, dev, ino, mtime_ns, count)
        except OSError:
            planned = whole = False  # measured again below, where the error is named
        if whole or not planned:
            os.close(fd)
            return size if whole else residency_of(files[index], after_read)
        spec = files[index]
        return _on_open_file(spec, fd, "measure", lambda: _measure_open(spec, fd, after_read))

    return measure


def _put_into(
    columns: ResidencyColumns, indices: Sequence[int]
) -> Callable[[int, int | FileResidency], None]:
    """``put(position, result)`` of :func:`map_files_into` over ``indices`` for what a
    :func:`_measurer` gives: file ``indices[position]``'s residency into ``columns``."""

    def put(position: int, result: int | FileResidency) -> None:
        if isinstance(result, int):
            columns.put_resident(indices[position], result)
        else:
            columns.put(indices[position], result)

    return put


def _measure_open(spec: FileSpec, fd: int, after_read: bool) -> FileResidency:
    resident = pagecache.fd_residency(fd, spec.size)
    stat = os.fstat(fd)
    size_now = stat.st_size
    if after_read and size_now < spec.size:
        return FileResidency(
            spec.path,
            spec.size,
            min(resident, size_now),
            f"shrank from {spec.size} to {size_now} bytes since it was read",
            changed=True,
        )
    # Larger with the planned mtime: the plan covers a prefix (a trim to the memory budget
    # cut it there), not a file that grew.
    prefix = spec.mtime_ns is not None and stat.st_mtime_ns == spec.mtime_ns
    if size_now > spec.size and not prefix:  # still being written (a download in progress)
        return FileResidency(
            spec.path,
            spec.size,
            resident,
            f"grew from {spec.size} to {size_now} bytes since planning; the bytes "
            "after the planned size were not read (warm again once it is complete)",
        )
    return FileResidency(spec.path, spec.size, resident)


def _on_open_file(
    spec: FileSpec, fd: int, action: str, body: Callable[[], FileResidency]
) -> FileResidency:
    """``body()`` on the open ``fd``, then close it: the kernel refusing to tell residency
    and an ``OSError`` (``cannot <action>: ...``) become an unknown residency."""
    try:
        return body()
    except pagecache.ResidencyUnknownError as unknown:
        return FileResidency(spec.path, spec.size, None, unknown.reason)
    except OSError as err:
        return FileResidency(spec.path, spec.size, None, f"cannot {action}: {describe(err)}")
    finally:
        os.close(fd)


def bypass_probe(spec: FileSpec) -> Probe | None:
    """Read one byte of a file not resident after the pass, and tell what its filesystem
    does with the page: ``bypass`` (the read left it uncached: FUSE ``direct_io``),
    ``invalidates`` (cached, then gone at the next open), ``keeps`` (still cached: the
    file's pages went some other way), ``None`` when this cannot tell."""
    try:
        fd = open_regular(spec)
    except OSError:
        return None
    try:
        bypass = pagecache.read_bypasses_cache(fd, spec.size)
    except OSError:
        return None
    finally:
        os.close(fd)
    if bypass is None:
        return None
    if bypass:
        return "bypass"
    try:
        fd = open_regular(spec)  # the page is cached now: does an open drop it?
    except OSError:
        return None
    try:
        cached = pagecache.cachestat(fd, 0, PAGE_SIZE).cached
    except OSError:
        return None
    finally:
        os.close(fd)
    return "keeps" if cached else "invalidates"


async def map_files(
    func: Callable[[_I], _R],
    files: Sequence[_I],
    concurrency: int,
    unmeasured: Callable[[_I, str], _R] | None = None,
    *,
    timeout: float | None = None,
    stop: threading.Event | None = None,
) -> list[_R]:
    """``func`` over ``files`` in up to ``concurrency`` worker threads at once.

    Results come back in the order of ``files``; see :func:`map_files_into`.
    """
    results: list[_R | None] = [None] * len(files)

    def put(index: int, result: _R) -> None:
        results[index] = result

    await map_files_into(func, files, concurrency, put, unmeasured, timeout=timeout, stop=stop)
    return results  # type: ignore[return-value]  # every index was put


async def map_files_into(
    func: Callable[[_I], _R],
    files: Sequence[_I],
    concurrency: int,
    put: Callable[[int, _R], None],
    unmeasured: Callable[[_I, str], _R] | None = None,
    *,
    timeout: float | None = None,
    stop: threading.Event | None = None,
) -> None:
    """``func`` over ``files`` in up to ``concurrency`` worker threads at once; each result
    goes to ``put(index, result)`` on the event loop, once per file (no list is built, so
    a column can take it).

    The threads run side by side: an open on a network filesystem is a round trip (a
    HEAD request on s3fs), so measuring one file after another would add every round trip up.

    :param unmeasured: the result for a file ``func`` did not finish, given the reason
        (needed with ``timeout`` or ``stop``).
    :param timeout: seconds one file may take; the file in hand when it runs out is given
        up (its thread abandoned) and the rest of its batch goes on in a fresh thread.
    :param stop: once set, the remaining files are given up after the stop grace.
    """
    done = bytearray(len(files))
    workers = max(1, min(concurrency, len(files)))
    # Batches keep thread hand-offs few for 100,000 small files and the loop responsive;
    # a short list is cut so every worker gets a share.
    batch = max(1, min(256, -(-len(files) // workers)))
    limiter = anyio.CapacityLimiter(workers)
    cursor = 0

    def run_batch(first: int, end: int, handoff: Handoff) -> None:
        for index in range(first, end):
            if handoff.abandoned or not handoff.put(func(files[index])):
                return

    def take(index: int, result: _R) -> None:
        done[index] = 1
        put(index, result)

    async def worker() -> None:
        nonlocal cursor
        while cursor < len(files):
            first, end = cursor, min(len(files), cursor + batch)
            cursor = end
            while first < end:
                handoff = Handoff()
                with anyio.CancelScope() as deadline:
                    try:
                        async with anyio.create_task_group() as batch_group:
                            if timeout is not None:
                                batch_group.start_soon(slide_deadline, deadline, handoff, timeout)
                            await anyio.to_thread.run_sync(
                                run_batch,
                                first,
                                end,
                                handoff,
                                limiter=limiter,
                                abandon_on_cancel=True,
                            )
                            batch_group.cancel_scope.cancel()
                    finally:
                        for result in handoff.abandon():
                            take(first, result)  # type: ignore[arg-type]  # only _R put
                            first += 1
                if deadline.cancelled_caught and first < end:
                    assert unmeasured is not None
                    take(first, unmeasured(files[first], f"stalled for more than {timeout:g} s"))
                    first += 1

    async with anyio.create_task_group() as group:
        if stop is not None:
            group.start_soon(cancel_after_stop, stop, group.cancel_scope)
        async with anyio.create_task_group() as pool:
            for _ in range(workers):
                pool.start_soon(worker)
        group.cancel_scope.cancel()
    missing = done.find(0)
    while missing >= 0:
        assert unmeasured is not None
        put(missing, unmeasured(files[missing], "the pass was stopped"))
        missing = done.find(0, missing + 1)


def unknown_residency(spec: FileSpec, why: str) -> FileResidency:
    return FileResidency(spec.path, spec.size, None, f"not measured: {why}")


async def measure_residency(plan: Plan, concurrency: int = 4) -> ResidencyReport:
    """Residency of every planned file, opened read-only one at a time.

    :return: per-file and total residency; unknown entries carry their reason.
    """
    files = plan.files
    columns = ResidencyColumns(len(files))
    threads = measuring_threads(files, concurrency)  # one on local disks
    await _measure_into(columns, files, range(len(files)), threads, after_read=False)
    return ResidencyReport(Residencies(files, columns), plan.skipped)


async def _measure_into(
    columns: ResidencyColumns,
    files: FileTable,
    indices: Sequence[int],
    threads: int,
    *,
    after_read: bool,
    timeout: float | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Measure ``files[i]`` for each ``i`` of ``indices`` into ``columns`` (the short way
    where it applies: :func:`_measurer`), in up to ``threads`` threads; see
    :func:`map_files_into` for ``timeout`` and ``stop``."""
    await map_files_into(
        _measurer(files, after_read),
        indices,
        threads,
        _put_into(columns, indices),
        lambda index, why: unknown_residency(files[index], why),
        timeout=timeout,
        stop=stop,
    )


async def _residency_report(
    func: Callable[[FileSpec], FileResidency], plan: Plan, concurrency: int
) -> ResidencyReport:
    columns = ResidencyColumns(len(plan.files))
    await map_files_into(func, plan.files, concurrency, columns.put, unknown_residency)
    return ResidencyReport(Residencies(plan.files, columns), plan.skipped)


def _evict_one(spec: FileSpec) -> FileResidency:
    try:
        fd = open_regular(spec)
    except OSError as err:
        return FileResidency(spec.path, spec.size, None, f"cannot open: {describe(err)}")

    def evict_and_measure() -> FileResidency:
        pagecache.evict(fd)
        resident = pagecache.fd_residency(fd, spec.size)
        return FileResidency(spec.path, spec.size, resident, _kept_why(fd) if resident else None)

    return _on_open_file(spec, fd, "evict", evict_and_measure)


def _kept_why(fd: int) -> str:
    """Why pages of an evicted file stayed cached: dirty ones (cachestat counts them), or
    pages in use, which ``POSIX_FADV_DONTNEED`` leaves alone."""
    try:
        stat = pagecache.cachestat(fd)
    except OSError:
        return "kept by the kernel: dirty pages and pages a process maps or locks stay"
    unwritten = stat.dirty + stat.writeback
    if unwritten:
        return (
            f"{format_bytes(unwritten * PAGE_SIZE)} dirty: the kernel drops a page only once "
            "it is written back (sync, then evict again)"
        )
    return "kept by the kernel: pages a process maps or locks stay"


async def evict_plan(plan: Plan, concurrency: int = 4) -> ResidencyReport:
    """Drop the clean cached pages of every planned file (``POSIX_FADV_DONTNEED``).

    :return: residency measured right after eviction (pages mapped or dirty elsewhere stay).
    """
    return await _residency_report(_evict_one, plan, concurrency)
