"""Keep-warm measurement: residency chunk by chunk, so only lost chunks are read again.

The re-read itself is :func:`preloader.engine.warm.rewarm_chunks` (the engine's workers).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import NamedTuple

import anyio
import anyio.to_thread

from ..kernel import pagecache
from ..kernel.fileread import OPEN_FLAGS
from ..planning.filetable import FileTable
from ..planning.planner import Plan
from ..planning.specs import Chunk, FileSpec, iter_chunks
from ..settings import WarmOptions
from ..units import PAGE_SIZE
from .prefetch import measuring_threads
from .reading import describe, open_regular

__all__ = ["ChunkResidency", "measure_chunks"]

# Files measured in one thread hand-off: few hand-offs for 100,000 files.
_RUN_FILES = 512
# Bytes of a file mapped at a time for mincore (rounded to whole chunks): a 128 KiB vector
# per 512 MiB.
_MINCORE_WINDOW = 1 << 30


class ChunkResidency(NamedTuple):
    """Residency of one planned file, with the chunks that lost pages.

    A named tuple, not a dataclass: a recheck builds one per planned file, 100,000 for a
    big tree, and a tuple is built several times faster.

    :ivar file_index: index into :attr:`Plan.files`.
    :ivar resident_bytes: resident bytes of the whole file; ``None`` when unknown.
    :ivar lost: chunks with at least one page out of the cache, in file order. When the
        file cannot be opened or measured, every chunk (a re-read will retry it).
    :ivar reason: why the kernel will not tell residency (the file itself is fine).
    :ivar error: why the file could not be opened or measured.
    :ivar evicted_pages: for a file with pages missing, measured by ``cachestat``: the
        pages of it the kernel counts as evicted (``nr_evicted``: reclaim leaves a shadow
        entry for each page it takes; ``POSIX_FADV_DONTNEED``, truncation and
        ``drop_caches`` leave none). ``None`` where not measured (a whole file, mincore).
    :ivar grown_to: the file's size now, where it grew since planning (the same file,
        larger, with another modification time: still being written, or appended to);
        only the planned bytes are measured. ``None`` otherwise.
    """

    file_index: int
    path: str
    size: int
    resident_bytes: int | None
    lost: tuple[Chunk, ...] = ()
    reason: str | None = None
    error: str | None = None
    evicted_pages: int | None = None
    grown_to: int | None = None


def _file_chunks(file_index: int, spec: FileSpec, chunk_size: int) -> tuple[Chunk, ...]:
    return tuple(
        Chunk(file_index, chunk.index, chunk.offset, chunk.length)
        for chunk in iter_chunks([spec], chunk_size)
        if chunk.length > 0
    )


def _lost(index: int, spec: FileSpec, chunk_size: int, counts: Sequence[int]) -> tuple[Chunk, ...]:
    """Chunks whose count of cached pages is short of their length; only those become
    objects."""
    size, page = spec.size, PAGE_SIZE
    return tuple(
        Chunk(index, number, number * chunk_size, min(chunk_size, size - number * chunk_size))
        for number, count in enumerate(counts)
        if count < -(-min(chunk_size, size - number * chunk_size) // page)
    )


def _by_cachestat(fd: int, index: int, spec: FileSpec, chunk_size: int) -> ChunkResidency:
    """A file with pages missing: one cachestat per chunk, and one for its evicted pages."""
    resident = pagecache.fd_residency(fd, spec.size)
    counts = [
        pagecache.cached_pages(fd, start, chunk_size) for start in range(0, spec.size, chunk_size)
    ]
    try:
        evicted: int | None = pagecache.cachestat(fd, 0, spec.size).evicted
    except OSError:  # answered just above; should it refuse now, the count stays unknown
        evicted = None
    lost = _lost(index, spec, chunk_size, counts)
    return ChunkResidency(index, spec.path, spec.size, resident, lost, evicted_pages=evicted)


def _by_mincore(fd: int, index: int, spec: FileSpec, chunk_size: int) -> ChunkResidency:
    """One residency vector per window of whole chunks (about 1 GiB), counted per chunk."""
    pagecache.require_mincore_trust(fd)
    size, page = spec.size, PAGE_SIZE
    per_chunk = chunk_size // page
    window = max(1, _MINCORE_WINDOW // chunk_size) * chunk_size
    counts: list[int] = []
    last = False
    for offset in range(0, size, window):
        flags = pagecache.mincore_flags(fd, offset, min(window, size - offset))
        counts.extend(flags.count(1, at, at + per_chunk) for at in range(0, len(flags), per_chunk))
        last = flags[-1] == 1
    resident = pagecache.resident_bytes_from_pages(sum(counts), size, last)
    lost = () if resident >= size else _lost(index, spec, chunk_size, counts)
    return ChunkResidency(index, spec.path, spec.size, resident, lost)


def _measure_file(index: int, spec: FileSpec, chunk_size: int) -> ChunkResidency:
    try:
        fd = open_regular(spec, blocking=False)  # measured, never read
    except OSError as err:
        return _unmeasured(index, spec, chunk_size, f"cannot open: {describe(err)}")
    try:
        return _measure_open(fd, index, spec, chunk_size)
    finally:
        os.close(fd)


def _measure_open(fd: int, index: int, spec: FileSpec, chunk_size: int) -> ChunkResidency:
    """Measure the planned file open as ``fd`` (its planned bytes), and say whether it
    grew since planning; the caller closes it."""
    measured = _measure_planned(fd, index, spec, chunk_size)
    if measured.error is not None:
        return measured
    try:
        st = os.fstat(fd)
    except OSError:
        return measured
    # Larger with the planned mtime: the plan covers a prefix (a trim to the memory budget
    # cut it there), not a file that grew.
    if st.st_size > spec.size and st.st_mtime_ns != spec.mtime_ns:
        return measured._replace(grown_to=st.st_size)
    return measured


def _measure_planned(fd: int, index: int, spec: FileSpec, chunk_size: int) -> ChunkResidency:
    """Measure the planned bytes of the file open as ``fd``; the caller closes it."""
    try:
        if spec.size == 0:
            return ChunkResidency(index, spec.path, 0, 0)
        # One call per file while everything is cached; chunk by chunk only where not.
        pages = pagecache.cachestat_pages(fd, 0, spec.size)
        if pages is None:  # a kernel without cachestat
            return _by_mincore(fd, index, spec, chunk_size)
        if pages >= -(-spec.size // PAGE_SIZE):
            return ChunkResidency(index, spec.path, spec.size, spec.size)
        return _by_cachestat(fd, index, spec, chunk_size)
    except pagecache.ResidencyUnknownError as unknown:
        return ChunkResidency(index, spec.path, spec.size, None, reason=unknown.reason)
    except OSError as err:
        return _unmeasured(index, spec, chunk_size, f"cannot measure: {describe(err)}")


def _unmeasured(index: int, spec: FileSpec, chunk_size: int, cause: str) -> ChunkResidency:
    """Not measurable: every chunk counts as lost, so keep-warm tries it again."""
    chunks = _file_chunks(index, spec, chunk_size)
    return ChunkResidency(index, spec.path, spec.size, None, chunks, error=cause)


_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _measure_run(files: FileTable, first: int, end: int, chunk_size: int) -> list[ChunkResidency]:
    """Measure ``files[first:end]`` in this thread.

    A file is opened relative to its folder (``openat``; the folder is opened once per run
    of files in it), checked to be the planned file (``fstat``: a regular file, same
    ``(dev, ino)``), asked one ``cachestat`` and closed. A file that is not cached in full,
    cannot be opened that way or is no longer the planned file goes the way of
    :func:`_measure_file`, which names the cause.
    """
    count = pagecache.whole_file_counter()
    if count is None:  # a kernel without cachestat: mincore needs a mapping anyway
        return [_measure_file(index, files[index], chunk_size) for index in range(first, end)]
    results: list[ChunkResidency] = []
    append = results.append
    folder, folder_fd = "", -1
    try:
        for index in range(first, end):
            # No FileSpec for a file that turns out cached whole (the common case).
            path, size, dev, ino, mtime_ns = files.identity(index)
            parent, _, name = path.rpartition("/")
            if parent != folder or folder_fd < 0:
                if folder_fd >= 0:
                    os.close(folder_fd)
                    folder_fd = -1
                folder = parent
                with contextlib.suppress(OSError):
                    folder_fd = os.open(parent or "/", _FOLDER_FLAGS)
            if folder_fd < 0:
                append(_measure_file(index, files[index], chunk_size))
                continue
            try:
                fd = os.open(name, OPEN_FLAGS, dir_fd=folder_fd)
            except OSError:  # _measure_file names the cause
                append(_measure_file(index, files[index], chunk_size))
                continue
            try:
                planned, whole = pagecache.planned_and_whole(fd, size, dev, ino, mtime_ns, count)
                if whole:
                    append(ChunkResidency(index, path, size, size))
                elif planned:
                    append(_measure_open(fd, index, files[index], chunk_size))
                else:
                    append(_measure_file(index, files[index], chunk_size))  # says what it is now
            except OSError:
                append(_measure_open(fd, index, files[index], chunk_size))
            finally:
                os.close(fd)
    finally:
        if folder_fd >= 0:
            os.close(folder_fd)
    return results


async def measure_chunks(
    plan: Plan, chunk_size: int, concurrency: int = 4
) -> tuple[ChunkResidency, ...]:
    """Residency of every planned file and the chunks of it that lost pages.

    A fully cached file costs an open, a ``cachestat`` and a close; only a file with pages
    missing is measured chunk by chunk. Chunks are cut as :func:`~.warm.warm_plan` cuts
    them for the same ``chunk_size``, so :func:`~.warm.rewarm_chunks` can re-read exactly
    the lost ones.
    Files are measured in runs of :data:`_RUN_FILES` per thread hand-off, up to
    ``concurrency`` runs side by side (an open on a network filesystem is a round trip),
    one at a time where every file is on a local disk (:func:`measuring_threads`: 100,000
    resident files took 1.1 CPU-s with one thread, 3.4-3.7 with four).

    :return: one entry per planned file, in plan order.
    """
    size = WarmOptions(chunk_size=chunk_size).chunk_size_for()
    files = plan.files
    limiter = anyio.CapacityLimiter(measuring_threads(files, concurrency))
    runs: list[list[ChunkResidency]] = [[] for _ in range(0, len(files), _RUN_FILES)]

    async def measure(number: int) -> None:
        first = number * _RUN_FILES
        end = min(len(files), first + _RUN_FILES)
        runs[number] = await anyio.to_thread.run_sync(
            _measure_run, files, first, end, size, limiter=limiter
        )

    async with anyio.create_task_group() as group:
        for number in range(len(runs)):
            group.start_soon(measure, number)
    return tuple(item for run in runs for item in run)
