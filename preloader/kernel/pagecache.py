"""The kernel layer: page-cache syscalls on open file descriptors.

Everything here is synchronous, does exactly one kind of kernel call, and returns plain
values. The async engine runs these functions in worker threads; the front ends never
call them directly.

Residency is answered by ``cachestat(2)`` (Linux >= 6.5) and, only where the kernel lacks
it (``ENOSYS``), by ``mmap`` + ``mincore(2)``. Both calls lie or refuse for a file the
process neither owns nor may write: ``cachestat`` fails with ``EPERM`` and ``mincore``
claims every page is resident. This module never turns such an answer into a number: it
raises :class:`ResidencyUnknownError` instead, and the caller reports "unknown".
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..units import PAGE_SIZE
from .identity import is_planned
from .procfs import parse_cap_eff, read_text

__all__ = [
    "CacheStat",
    "ResidencyUnknownError",
    "cached_pages",
    "cachestat",
    "cachestat_pages",
    "evict",
    "fd_residency",
    "mincore_flags",
    "mincore_resident_pages",
    "planned_and_whole",
    "range_resident_pages",
    "read_bypasses_cache",
    "require_mincore_trust",
    "resident_bytes_from_pages",
    "whole_file_counter",
]


# cachestat(2) has the same number on every architecture that uses the generic syscall
# table (x86_64, aarch64, riscv64, ...) since it was added in 6.5.
_SYS_CACHESTAT = 451
_CAP_FOWNER = 3


class ResidencyUnknownError(Exception):
    """The kernel cannot tell this process the truth about a file's residency.

    :ivar reason: one line, for a human, saying why and what to do about it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class CacheStat:
    """Counts from ``cachestat(2)``, in pages."""

    cached: int
    dirty: int
    writeback: int
    evicted: int
    recently_evicted: int


class _CachestatRange(ctypes.Structure):
    _fields_ = (("off", ctypes.c_uint64), ("len", ctypes.c_uint64))


class _Cachestat(ctypes.Structure):
    _fields_ = (
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    )


# The C library the interpreter itself is linked against (dlopen(NULL)): no
# ctypes.util.find_library, whose import and ld.so.cache lookup were ~10 ms of start-up.
_libc = ctypes.CDLL(None, use_errno=True)

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_mmap = _libc.mmap
_mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
)
_mmap.restype = ctypes.c_void_p

_munmap = _libc.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_munmap.restype = ctypes.c_int

_mlock = _libc.mlock
_mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_mlock.restype = ctypes.c_int

_munlock = _libc.munlock
_munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_munlock.restype = ctypes.c_int

_mincore = _libc.mincore
_mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
_mincore.restype = ctypes.c_int

_MAP_FAILED = ctypes.c_void_p(-1).value

_cachestat_missing = False  # set once the kernel answered ENOSYS
_cachestat_lock = threading.Lock()

_NOT_TRUSTED = (
    "the kernel hides page-cache residency from a process that neither owns the file nor "
    "may write it; run as the files' owner (uid {uid}) or with CAP_FOWNER for a true figure"
)


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def map_shared(fd: int, length: int, offset: int = 0) -> int:
    """``mmap`` ``length`` bytes of an open file read-only and shared; return the address.

    :raises OSError: from ``mmap``.
    """
    addr = _mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if addr == _MAP_FAILED or addr is None:
        _raise_errno("mmap")
    return int(addr)


def unmap(addr: int, length: int) -> None:
    """Undo :func:`map_shared`."""
    _munmap(addr, length)


def lock_range(addr: int, length: int) -> None:
    """``mlock`` a mapping: its pages are read in and cannot be reclaimed until unlocked.

    :raises OSError: from ``mlock`` (``ENOMEM``/``EPERM``/``EAGAIN`` when
        ``RLIMIT_MEMLOCK`` or a missing ``CAP_IPC_LOCK`` forbids it).
    """
    if _mlock(addr, length) != 0:
        _raise_errno("mlock")


def unlock_range(addr: int, length: int) -> None:
    """Undo :func:`lock_range`."""
    _munlock(addr, length)


def has_capability(bit: int) -> bool:
    """Whether this process holds capability ``bit`` in its effective set."""
    return bool(parse_cap_eff(read_text("/proc/self/status") or "") >> bit & 1)


def cachestat(fd: int, offset: int = 0, length: int = 0) -> CacheStat:
    """Ask the kernel how many pages of ``[offset, offset+length)`` are cached.

    :param fd: an open file descriptor.
    :param offset: first byte of the range.
    :param length: bytes in the range; 0 means to the end of the file.
    :return: the kernel's page counts.
    :raises OSError: ``ENOSYS`` where the kernel lacks cachestat, ``EPERM`` where it will
        not answer for this file (not owner, not writable, or a seccomp filter).
    """
    rng = _CachestatRange(offset, length)
    out = _Cachestat()
    rc = _syscall(
        ctypes.c_long(_SYS_CACHESTAT),
        ctypes.c_int(fd),
        ctypes.byref(rng),
        ctypes.byref(out),
        ctypes.c_uint(0),
    )
    if rc != 0:
        _raise_errno("cachestat")
    return CacheStat(
        out.nr_cache, out.nr_dirty, out.nr_writeback, out.nr_evicted, out.nr_recently_evicted
    )


# Per-thread cachestat arguments, built once: the keep-warm recheck and the verification
# pass ask cachestat once per file, 100,000 times for a big tree.
_cachestat_buffers = threading.local()
_CACHESTAT_NR = ctypes.c_long(_SYS_CACHESTAT)


def cached_pages(fd: int, offset: int = 0, length: int = 0) -> int:
    """cachestat's count of cached pages of ``[offset, offset+length)``, and nothing else.

    The same call as :func:`cachestat` without building its result.

    :raises OSError: as :func:`cachestat`.
    """
    buffers = getattr(_cachestat_buffers, "value", None)
    if buffers is None:
        rng, out = _CachestatRange(), _Cachestat()
        buffers = (rng, out, ctypes.byref(rng), ctypes.byref(out))
        _cachestat_buffers.value = buffers
    rng, out, rng_ref, out_ref = buffers
    rng.off = offset
    rng.len = length
    if _syscall(_CACHESTAT_NR, fd, rng_ref, out_ref, 0) != 0:
        _raise_errno("cachestat")
    return int(out.nr_cache)


# Maps a mincore(2) flag byte to its "resident" bit: the other bits are reserved.
_RESIDENT_BIT = bytes(flag & 1 for flag in range(256))


def whole_file_counter() -> Callable[[int, int], int] | None:
    """A cachestat of ``[0, length)`` of an open file, as fast as Python calls it.

    For one thread (it owns its argument buffers): the keep-warm recheck measures every
    planned file with it. ``None`` where the kernel lacks cachestat.

    :return: ``count(fd, length)``, cached pages; raises ``OSError`` as :func:`cachestat`.
    """
    if _cachestat_missing:
        return None
    rng, out = _CachestatRange(), _Cachestat()
    rng_ref, out_ref = ctypes.byref(rng), ctypes.byref(out)

    def count(fd: int, length: int) -> int:
        rng.len = length
        if _syscall(_CACHESTAT_NR, fd, rng_ref, out_ref, 0) != 0:
            _raise_errno("cachestat")
        return int(out.nr_cache)

    return count


def planned_and_whole(
    fd: int,
    size: int,
    dev: int,
    ino: int,
    mtime_ns: int | None,
    count: Callable[[int, int], int],
) -> tuple[bool, bool]:
    """The common case of every residency check: still the planned file, cached whole?

    One ``fstat`` and one cachestat of an open file: whether it is still the planned file
    (a regular file, and the planned one by :func:`~.identity.is_planned`), and whether it
    is that file at its planned size with every page cached. The verification after a
    pass and keep-warm's measurement both take this short way first, and the long way
    for anything else.

    :param count: cached pages of ``[0, length)`` of a descriptor: ``count(fd, length)``
        (:func:`whole_file_counter`'s, or :func:`cached_pages` over the range).
    :return: ``(planned, whole)``.
    :raises OSError: as ``fstat`` and :func:`cachestat`.
    """
    st = os.fstat(fd)
    planned = stat.S_ISREG(st.st_mode) and is_planned(st, dev, ino, mtime_ns)
    whole = planned and st.st_size == size and count(fd, size) >= -(-size // PAGE_SIZE)
    return planned, whole


def mincore_flags(fd: int, offset: int, length: int) -> bytes:
    """One byte per page of ``[offset, offset+length)``: 1 where resident, else 0.

    ``mmap`` + ``mincore(2)``; only truthful when the caller may see the file's residency
    (see :func:`_mincore_trusted`). A 512 MiB range needs a 128 KiB vector.

    :param offset: a multiple of :data:`PAGE_SIZE`.
    :param length: bytes (> 0), not past the end of the file.
    :raises OSError: when mmap or mincore fails.
    """
    addr = map_shared(fd, length, offset)
    try:
        vec = (ctypes.c_ubyte * ((length + PAGE_SIZE - 1) // PAGE_SIZE))()
        if _mincore(addr, length, vec) != 0:
            _raise_errno("mincore")
        return bytes(vec).translate(_RESIDENT_BIT)
    finally:
        unmap(addr, length)


def mincore_resident_pages(fd: int, size: int, window: int = 1 << 30) -> tuple[int, bool]:
    """Count resident pages of an open file with ``mmap`` + ``mincore(2)``.

    Only truthful when the caller may see the file's residency (see
    :func:`_mincore_trusted`); :func:`fd_residency` checks that first.

    :param fd: an open, readable file descriptor.
    :param size: the file's size in bytes.
    :param window: bytes mapped at a time, so the residency vector stays small.
    :return: number of resident pages, and whether the file's last page is one of them.
    :raises OSError: when mmap or mincore fails.
    """
    resident = 0
    last = False
    offset = 0
    window -= window % PAGE_SIZE
    while offset < size:
        length = min(window, size - offset)
        flags = mincore_flags(fd, offset, length)
        resident += flags.count(1)
        last = flags[-1] == 1
        offset += length
    return resident, last


def _mincore_trusted(st: os.stat_result, fd: int) -> bool:
    """Mirror the kernel's ``can_do_mincore``: owner, CAP_FOWNER, or write permission."""
    if os.geteuid() == st.st_uid or has_capability(_CAP_FOWNER):
        return True
    return os.access(f"/proc/self/fd/{fd}", os.W_OK, effective_ids=True)


def resident_bytes_from_pages(pages: int, size: int, last_page_resident: bool) -> int:
    """Convert a resident page count to resident bytes of a file of ``size`` bytes.

    The last page of a file is partial: when it is resident it holds only
    ``size % PAGE_SIZE`` bytes of the file, so a fully cached file reports exactly its size.
    """
    resident = pages * PAGE_SIZE
    tail = size % PAGE_SIZE
    if tail and last_page_resident and pages:
        resident -= PAGE_SIZE - tail
    return max(0, min(resident, size))


def fd_residency(fd: int, size: int) -> int:
    """Resident bytes of an open file, measured truthfully or not at all.

    :param fd: an open, readable file descriptor.
    :param size: the file's size in bytes.
    :return: resident bytes (0 <= result <= size).
    :raises ResidencyUnknownError: when the kernel will not tell the truth about this file.
    :raises OSError: for other failures (EIO, ...).
    """
    if size == 0:
        return 0
    # The range, not the whole file: a plan may cover only a file's first bytes
    # (a budget-trimmed plan), and residency is of what was planned.
    pages = cachestat_pages(fd, 0, size)
    if pages is not None:
        tail = size % PAGE_SIZE
        # Every page cached includes the last; only a partial count needs a second look.
        whole = pages >= -(-size // PAGE_SIZE)
        last = whole or (bool(pages) and bool(tail) and cachestat(fd, size - tail, tail).cached > 0)
        return resident_bytes_from_pages(pages, size, last)
    require_mincore_trust(fd)
    pages, last = mincore_resident_pages(fd, size)
    return resident_bytes_from_pages(pages, size, last)


def cachestat_pages(fd: int, offset: int, length: int) -> int | None:
    """cachestat's cached pages of a range; ``None`` where the kernel lacks cachestat.

    :raises ResidencyUnknownError: on ``EPERM`` (never followed by a ``mincore`` guess).
    """
    global _cachestat_missing
    if _cachestat_missing:
        return None
    try:
        return cached_pages(fd, offset, length)
    except OSError as err:
        if err.errno == errno.EPERM:
            raise ResidencyUnknownError(
                "cachestat refused (EPERM): "
                + _NOT_TRUSTED.format(uid=os.fstat(fd).st_uid)
                + " (older seccomp profiles also block cachestat)"
            ) from err
        if err.errno != errno.ENOSYS:
            raise
        with _cachestat_lock:
            _cachestat_missing = True
        return None


def require_mincore_trust(fd: int) -> os.stat_result:
    """The file's stat, after checking that ``mincore`` would tell this process the truth.

    :raises ResidencyUnknownError: when it would not.
    """
    st = os.fstat(fd)
    if not _mincore_trusted(st, fd):
        raise ResidencyUnknownError("mincore would lie: " + _NOT_TRUSTED.format(uid=st.st_uid))
    return st


def range_resident_pages(fd: int, offset: int, length: int) -> int:
    """Cached pages of ``[offset, offset+length)`` of an open file, truthfully or not at all.

    The keep-warm loop asks this chunk by chunk to find the ranges that lost pages. The same
    rules as :func:`fd_residency` apply: ``cachestat`` first, ``mmap`` + ``mincore`` only
    where the kernel lacks it, and never a number the kernel would fake.

    :param offset: first byte; a multiple of :data:`PAGE_SIZE`.
    :param length: bytes in the range (> 0); it may run past the end of the file.
    :return: pages of the range that are in the page cache.
    :raises ResidencyUnknownError: when the kernel will not tell the truth about this file.
    :raises OSError: for other failures.
    """
    if offset % PAGE_SIZE:
        raise ValueError(f"offset {offset} is not a multiple of the page size")
    pages = cachestat_pages(fd, offset, length)
    if pages is not None:
        return pages
    st = require_mincore_trust(fd)
    length = min(length, st.st_size - offset)
    if length <= 0:
        return 0
    return mincore_flags(fd, offset, length).count(1)


def force_mincore(enabled: bool) -> None:
    """Make :func:`fd_residency` use ``mincore`` as on a kernel without cachestat.

    For tests and for kernels whose cachestat is known broken; not for normal use.
    """
    global _cachestat_missing
    with _cachestat_lock:
        _cachestat_missing = enabled


def evict(fd: int) -> None:
    """Drop the file's clean pages from the page cache (``POSIX_FADV_DONTNEED``).

    Dirty pages and pages mapped by other processes stay; that is the kernel's rule.
    Freshly written pages can still sit in another CPU's LRU batch, where the first
    DONTNEED misses them; one more call, when cachestat still sees pages, gets them.
    """
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        remaining = cachestat(fd).cached
    except OSError:
        return
    if remaining:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def read_bypasses_cache(fd: int, size: int) -> bool | None:
    """Whether a plain read of this file leaves the page cache untouched.

    FUSE ``direct_io`` files read straight from the filesystem daemon, so the cache
    never holds what a server reads. Reads one byte of the first page, only when that
    page is not cached already.

    :return: ``True`` when the page is still not cached after the read, ``False`` when
        reading cached it, ``None`` when this cannot tell (empty file, page cached
        already, residency refused).
    :raises OSError: when the read fails.
    """
    if size == 0:
        return None
    try:
        if cachestat(fd, 0, PAGE_SIZE).cached:
            return None
    except OSError:
        return None
    # No readahead: one page from the storage is all this question costs.
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    os.pread(fd, 1, 0)
    return cachestat(fd, 0, PAGE_SIZE).cached == 0
