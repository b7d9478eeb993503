"""The plan's parts: one file to warm, one path skipped, one chunk, and how files are cut.

Pure: frozen dataclasses and arithmetic over them. The walk (:mod:`.walk`) makes
:class:`FileSpec` and :class:`Skipped` values, :mod:`.filetable` stores specs as columns,
and the engine reads :class:`Chunk` ranges.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "SPARSE_MIN_HOLE",
    "Chunk",
    "FileSpec",
    "Skipped",
    "chunk_count",
    "iter_chunks",
    "sparse_note",
]


@dataclass(frozen=True, slots=True)
class FileSpec:
    """One regular file to warm.

    :ivar path: the path to open (as walked; may pass through symlinks).
    :ivar size: bytes at planning time.
    :ivar dev: device of the file the path resolved to.
    :ivar ino: inode of that file; ``(dev, ino)`` identifies it across links and mounts.
    :ivar metadata: a small config/tokenizer/index file, warmed before weights.
    :ivar allocated: bytes the file occupies on its filesystem (``st_blocks`` x 512);
        far below :attr:`size` for a sparse file. ``None`` when not known.
    :ivar mtime_ns: ``st_mtime_ns`` at planning time, ``None`` when not known: with
        ``dev`` and ``ino``, what :func:`preloader.kernel.identity.is_planned` compares.
    """

    path: str
    size: int
    dev: int
    ino: int
    metadata: bool = False
    allocated: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class Skipped:
    """A path the plan will not read, and why (with its size, when it is a file).

    :ivar error: the walk failed here (a folder that cannot be listed, a path that cannot
        be stat'ed): what lies below was not read, which is a read error, not a choice.
    """

    path: str
    reason: str
    size: int | None = None
    error: bool = False


@dataclass(frozen=True, slots=True)
class Chunk:
    """A byte range of one planned file.

    :ivar file_index: index into :attr:`Plan.files`.
    :ivar index: position of this chunk within its file (0-based).
    """

    file_index: int
    index: int
    offset: int
    length: int


SPARSE_MIN_HOLE = 64 * 1024 * 1024


def sparse_note(spec: FileSpec) -> str | None:
    """A warning for a sparse file (allocated far below its apparent size), else ``None``.

    Holes are read like any other byte (a loader reads them too, as zeros), so the page
    cache and the memory budget count the apparent size: a 1 TiB sparse file is trimmed
    to the budget, never read whole. Filesystems that report no blocks at all (some FUSE
    clients) are not called sparse.
    """
    allocated = spec.allocated
    if not allocated or spec.size - allocated < max(SPARSE_MIN_HOLE, spec.size // 2):
        return None
    return (
        f"sparse: {spec.size} bytes apparent, {allocated} allocated; the holes read as "
        "zeros and take page cache like data (the memory budget counts the apparent size)"
    )


def chunk_count(size: int, chunk_size: int) -> int:
    """Chunks a file of ``size`` bytes is cut into; an empty file still has one."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    return max(1, -(-size // chunk_size))


def iter_chunks(files: Sequence[FileSpec], chunk_size: int) -> Iterator[Chunk]:
    """Every byte range of every file, exactly once, in plan order.

    The engine cuts files the same way; which worker reads which chunk when is
    :mod:`preloader.engine.schedule`'s business.
    """
    for file_index, spec in enumerate(files):
        for index in range(chunk_count(spec.size, chunk_size)):
            offset = index * chunk_size
            yield Chunk(file_index, index, offset, max(0, min(chunk_size, spec.size - offset)))
