"""The read methods: bring a byte range of an open file into the page cache.

One function, :func:`read_range`, with three ways of reading that each leave the pages
cached: ``sendfile`` to ``/dev/null`` and ``mmap`` with ``MADV_POPULATE_READ`` (both
zero-copy), and ``preadv`` into a per-thread buffer for filesystems that refuse the
other two. Synchronous; the engine runs it in worker threads, each of which keeps its own
``/dev/null`` descriptor and buffer. Residency questions live in :mod:`.pagecache`.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
from collections.abc import Callable

from .identity import is_planned

__all__ = [
    "OPEN_FLAGS",
    "FileChangedError",
    "Step",
    "check_planned",
    "open_planned",
    "read_range",
]

OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
"""How a planned file is opened: read-only, and an open that cannot block on a FIFO or
take a terminal swapped in since planning (see :func:`open_planned`)."""

_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)

# sendfile moves at most this much per call; smaller steps also let a stop request
# interrupt a chunk promptly.
_STEP_BYTES = 8 * 1024 * 1024


class FileChangedError(OSError):
    """The planned file is no longer that file (replaced, or not a regular file)."""


def check_planned(
    st: os.stat_result, dev: int | None, ino: int | None, mtime_ns: int | None = None
) -> None:
    """Refuse a status that is not the planned file's: not a regular file, or (when
    ``dev`` and ``ino`` are given) another file by :func:`~.identity.is_planned`.

    :raises FileChangedError: with ``EINVAL`` or ``ESTALE``.
    """
    if not stat.S_ISREG(st.st_mode):
        raise FileChangedError(errno.EINVAL, "no longer a regular file")
    if dev is not None and ino is not None and not is_planned(st, dev, ino, mtime_ns):
        raise FileChangedError(errno.ESTALE, "replaced by another file since planning")


def open_planned(
    path: str,
    dev: int | None = None,
    ino: int | None = None,
    mtime_ns: int | None = None,
    blocking: bool = True,
) -> int:
    """Open a planned file read-only, refusing anything that is no longer that file.

    ``O_NONBLOCK`` keeps a FIFO swapped in since planning from blocking the open; the
    identity check (:func:`check_planned`) refuses a file replaced under the same name.

    :param dev: the planned file's device; ``None``: any regular file will do.
    :param ino: the planned file's inode (with ``dev``; see :func:`~.identity.is_planned`).
    :param mtime_ns: the planned modification time, where inodes are not stable.
    :param blocking: clear ``O_NONBLOCK`` once it is known to be the planned file (for
        reading); ``False`` leaves it set, for a descriptor only measured or locked.
    :return: the descriptor; the caller closes it.
    :raises FileChangedError: no longer a regular file, or another file now.
    :raises OSError: when it cannot be opened.
    """
    fd = os.open(path, OPEN_FLAGS)
    try:
        check_planned(os.fstat(fd), dev, ino, mtime_ns)
        if blocking:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


Step = Callable[[int], None]
"""Told the bytes one :func:`read_range` call has brought in so far, after every step."""


def _no_step(done: int) -> None:
    pass


def _read_sendfile(
    fd: int, offset: int, length: int, sink: int, stop: Callable[[], bool], on_step: Step
) -> int:
    done = 0
    while done < length:
        if stop():
            break
        sent = os.sendfile(sink, fd, offset + done, min(_STEP_BYTES, length - done))
        if sent == 0:  # the file shrank under us
            break
        done += sent
        on_step(done)
    return done


def _read_mmap(fd: int, offset: int, length: int, stop: Callable[[], bool], on_step: Step) -> int:
    size = os.fstat(fd).st_size
    end = min(offset + length, size)
    done = 0
    position = offset
    while position < end:
        if stop():
            break
        # Map one step at a time: populated pages of a live mapping count towards RSS,
        # so a whole-chunk mapping would make the process look chunk-size x workers big.
        aligned = position - position % mmap.ALLOCATIONGRANULARITY
        step_end = min(end, aligned + _STEP_BYTES)
        with mmap.mmap(
            fd, step_end - aligned, mmap.MAP_SHARED, mmap.PROT_READ, offset=aligned
        ) as mm:
            mm.madvise(_MADV_POPULATE_READ, 0, step_end - aligned)
        done += step_end - position
        position = step_end
        on_step(done)
    return done


def _read_plain(
    fd: int, offset: int, length: int, buffer: bytearray, stop: Callable[[], bool], on_step: Step
) -> int:
    view = memoryview(buffer)
    done = 0
    while done < length:
        if stop():
            break
        want = min(len(buffer), length - done)
        got = os.preadv(fd, [view[:want]], offset + done)
        if got == 0:
            break
        done += got
        on_step(done)
    return done


_thread_state = threading.local()


def _sink() -> int:
    sink = getattr(_thread_state, "devnull", None)
    if sink is None:
        sink = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        _thread_state.devnull = sink
    return int(sink)


def _buffer() -> bytearray:
    buf = getattr(_thread_state, "buffer", None)
    if buf is None:
        buf = bytearray(1024 * 1024)
        _thread_state.buffer = buf
    assert isinstance(buf, bytearray)
    return buf


def read_range(
    fd: int,
    offset: int,
    length: int,
    method: str,
    stop: Callable[[], bool] = lambda: False,
    on_step: Step | None = None,
) -> int:
    """Bring ``[offset, offset+length)`` of an open file into the page cache.

    :param fd: an open, readable file descriptor (shared between threads is fine: every
        method here takes explicit offsets).
    :param method: ``sendfile`` (to /dev/null, zero-copy), ``mmap`` (``MADV_POPULATE_READ``,
        zero-copy) or ``read`` (``preadv`` into a per-thread 1 MiB buffer).
    :param stop: polled between steps of at most 8 MiB; a true result ends the read early.
    :param on_step: called on this thread after every step with the bytes brought in so
        far (the ``read`` method's steps are its 1 MiB buffer).
    :return: bytes brought in (less than ``length`` at end of file or after a stop).
    :raises OSError: from the kernel; ``EINVAL``/``ENOSYS``/``EOPNOTSUPP`` mean "this
        filesystem refuses the method", other codes are real read errors.
    """
    step = _no_step if on_step is None else on_step
    if method == "sendfile":
        return _read_sendfile(fd, offset, length, _sink(), stop, step)
    if method == "mmap":
        return _read_mmap(fd, offset, length, stop, step)
    if method == "read":
        return _read_plain(fd, offset, length, _buffer(), stop, step)
    raise ValueError(f"unknown read method {method!r}")
