"""Fill the holes a read pass left in a file, before its descriptor is closed.

A pass can end with a few pages of a file not resident (seen through s3fs on a busy
machine: 1.3 MB of 2 GiB after ``warm``). Re-reading them later costs far more than the
pages: s3fs keeps what it fetched only while the file is open, and a read at an offset
it has not loaded fetches ``multipart_size x parallel_count`` (50 MiB) from there on,
whatever the kernel holds. Measured over the bench's loopback S3 on a 512 MiB object:
one 4 KiB page dropped and read again after the file was closed fetched 50 MiB in 5
GETs; the same page read again while a descriptor was still open fetched nothing. A
loader that touches each of those holes pays 50 MiB for it (1.3x the model's bytes in
one e2e run), so the engine fills them on the descriptor it read with, before closing it
(:func:`fill_holes`).

Synchronous and small: one ``cachestat`` per file when nothing is missing, one per window
otherwise; no ``mincore`` fallback (a file whose residency cannot be measured is left as
it is).
"""

from __future__ import annotations

from collections.abc import Callable

from ..kernel import fileread, pagecache
from ..units import PAGE_SIZE

__all__ = ["HOLE_WINDOW", "fill_holes"]

HOLE_WINDOW = 8 * 2**20
"""Missing pages are looked for, and re-read, in windows of this many bytes."""


def fill_holes(
    fd: int,
    size: int,
    method: str,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Re-read every window of ``[0, size)`` that has pages missing from the page cache.

    :param fd: the descriptor the pass read the file with, still open.
    :param size: the planned bytes of the file.
    :param method: the pass's read method (resident pages cost no I/O to read again).
    :param stop: the pass's stop request, polled before every window and inside its read:
        a stopped pass leaves the rest of the file unread, holes included (the holes of a
        pass stopped mid-file are all it did not read).
    :return: bytes of the windows re-read (0 when every page was resident, or when
        ``cachestat`` is not available or refused).
    """
    if size <= 0:
        return 0
    pages = -(-size // PAGE_SIZE)
    try:
        if pagecache.cachestat(fd, 0, size).cached >= pages:
            return 0
    except (OSError, pagecache.ResidencyUnknownError):
        return 0
    reread = 0
    for offset in range(0, size, HOLE_WINDOW):
        if stop():
            break
        length = min(HOLE_WINDOW, size - offset)
        want = -(-length // PAGE_SIZE)
        try:
            if pagecache.cachestat(fd, offset, length).cached >= want:
                continue
            reread += fileread.read_range(fd, offset, length, method, stop)
        except OSError:
            return reread  # a real read error was reported by the pass already
    return reread
