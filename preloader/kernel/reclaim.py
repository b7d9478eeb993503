"""Proactive reclaim: whether this machine drops cached pages that sit idle, with no
memory pressure at all.

DAMON, the kernel's data access monitor, can run schemes that act on memory it sees
idle. A scheme with the action ``pageout`` on physical addresses (``paddr``) drops page
cache that no process maps once its memory region has been idle for the scheme's minimum
age: warmed pages the server has not mapped yet go, and on a FUSE mount of an object
store they are fetched again. Ages are kept per region of physical memory, not per page,
so pages read a few seconds ago can go with the region they landed in. Some VM hosts
run such a scheme to take unused guest memory back (measured on the bench VM: a 512 MiB
file read and left unmapped lost 0.4-1.4% of its pages in 10 s and 10-16% in 90 s; a
mapped one none).

Read from ``/sys/kernel/mm/damon/admin`` (the sysfs interface) and
``/sys/module/damon_reclaim`` (the DAMON_RECLAIM module). Both are root-only; a process
that may not read them learns nothing, and nothing is said.

Part of the kernel layer: synchronous, plain values, no logging.
"""

from __future__ import annotations

import functools
import os
import stat
import tempfile
from dataclasses import dataclass

from ..units import format_bytes
from .procfs import read_text

__all__ = ["ReclaimScheme", "describe", "find_schemes", "first_this_boot", "headline", "note"]

_KDAMONDS = "kernel/mm/damon/admin/kdamonds"
_DAMON_RECLAIM = "module/damon_reclaim/parameters"


@dataclass(frozen=True)
class ReclaimScheme:
    """One scheme that drops idle page cache.

    :ivar where: ``DAMON kdamond 0, scheme 0`` or ``DAMON_RECLAIM``.
    :ivar min_idle_seconds: how long a region must be idle, ``None`` if unknown.
    :ivar mapped_too: the scheme takes mapped file pages as well, so a server's
        mapping (or ``--lock``'s) does not shield them; ``None`` when its filters
        depend on what cannot be told from here (a memory cgroup, an address range).
    :ivar bytes_per_second: its quota, ``None`` for none.
    :ivar watermarks: ``""``, or when it is active (``while free memory is ...``).
    """

    where: str
    min_idle_seconds: float | None
    mapped_too: bool | None
    bytes_per_second: float | None = None
    watermarks: str = ""

    def describe(self) -> str:
        idle = (
            f"in memory idle for {self.min_idle_seconds:g} s or more"
            if self.min_idle_seconds is not None
            else "in memory it sees idle"
        )
        what = {
            True: "page cache",
            False: "page cache that no process maps",
            None: "page cache its filters select",
        }[self.mapped_too]
        text = f"{self.where} pages out {what} {idle} (idle is measured per region of memory)"
        if self.bytes_per_second:
            text += f", up to {format_bytes(int(self.bytes_per_second))}/s"
        if self.watermarks:
            text += f", {self.watermarks}"
        return text


def _read(path: str) -> str | None:
    """One sysfs value, ``None`` for root-only files or a kernel without DAMON."""
    text = read_text(path)
    return None if text is None else text.strip()


def _number(path: str) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _entries(path: str) -> list[str]:
    """The numbered subfolders ``0``, ``1``, ... of a DAMON sysfs folder, in order."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted((n for n in names if n.isdigit()), key=int)


def _applies(filters: list[dict[str, str]], mapped: bool) -> bool | None:
    """Whether a scheme's filters let it act on a file-backed page (mapped or not).

    A filter matches by type (``matching`` N inverts it); the first that matches decides
    (``allow`` Y: act, N: leave alone; kernels before 6.14 have no ``allow``: leave
    alone). A page no filter matches gets the opposite of the last filter's ``allow``,
    and is acted on where there are no filters. ``None``: a filter of a type that
    depends on more than the page's kind (memcg, address, young, ...) came first.
    """
    for item in filters:
        kind = item.get("type", "")
        if kind == "anon":
            hit = False
        elif kind == "unmapped":
            hit = not mapped
        else:
            return None
        if item.get("matching", "Y") != "Y":
            hit = not hit
        if hit:
            return item.get("allow", "N") == "Y"
    return not filters or filters[-1].get("allow", "N") != "Y"


def _filters(scheme: str) -> list[dict[str, str]]:
    """A scheme's page filters, the core layer's first, then the operations layer's."""
    found = []
    for layer in ("core_filters", "filters", "ops_filters"):
        base = os.path.join(scheme, layer)
        for index in _entries(base):
            fields = {}
            for name in ("type", "matching", "allow"):
                value = _read(os.path.join(base, index, name))
                if value is not None:
                    fields[name] = value
            found.append(fields)
    return found


def _watermarks(scheme: str) -> str:
    metric = _read(os.path.join(scheme, "watermarks", "metric"))
    if metric in (None, "none"):
        return ""
    low = _number(os.path.join(scheme, "watermarks", "low"))
    high = _number(os.path.join(scheme, "watermarks", "high"))
    return f"while {metric} is between {low} and {high} per mille"


def _kdamond_schemes(sys_root: str) -> list[ReclaimScheme]:
    base = os.path.join(sys_root, _KDAMONDS)
    found = []
    for kdamond in _entries(base):
        folder = os.path.join(base, kdamond)
        if _read(os.path.join(folder, "state")) != "on":
            continue
        for context in _entries(os.path.join(folder, "contexts")):
            ctx = os.path.join(folder, "contexts", context)
            if _read(os.path.join(ctx, "operations")) != "paddr":
                continue  # vaddr schemes act on processes' mappings, not on page cache
            aggr_us = _number(os.path.join(ctx, "monitoring_attrs", "intervals", "aggr_us"))
            for index in _entries(os.path.join(ctx, "schemes")):
                scheme = os.path.join(ctx, "schemes", index)
                if _read(os.path.join(scheme, "action")) != "pageout":
                    continue
                filters = _filters(scheme)
                if _applies(filters, mapped=False) is False:
                    continue
                age = _number(os.path.join(scheme, "access_pattern", "age", "min"))
                quota = _number(os.path.join(scheme, "quotas", "bytes"))
                reset_ms = _number(os.path.join(scheme, "quotas", "reset_interval_ms"))
                found.append(
                    ReclaimScheme(
                        where=f"DAMON kdamond {kdamond}, scheme {index}",
                        min_idle_seconds=age * aggr_us / 1e6
                        if age is not None and aggr_us
                        else None,
                        mapped_too=_applies(filters, mapped=True),
                        bytes_per_second=quota * 1000 / reset_ms if quota and reset_ms else None,
                        watermarks=_watermarks(scheme),
                    )
                )
    return found


def _damon_reclaim(sys_root: str) -> list[ReclaimScheme]:
    base = os.path.join(sys_root, _DAMON_RECLAIM)
    if _read(os.path.join(base, "enabled")) != "Y":
        return []
    min_age_us = _number(os.path.join(base, "min_age"))
    return [
        ReclaimScheme(
            where="DAMON_RECLAIM",
            min_idle_seconds=min_age_us / 1e6 if min_age_us is not None else None,
            mapped_too=True,
        )
    ]


def find_schemes(sys_root: str = "/sys") -> tuple[ReclaimScheme, ...]:
    """Every active scheme on this machine that drops idle page cache."""
    return tuple(_kdamond_schemes(sys_root) + _damon_reclaim(sys_root))


def describe(schemes: tuple[ReclaimScheme, ...]) -> str | None:
    """One line for a log or a cause: what drops pages and what keeps them."""
    if not schemes:
        return None
    lines = "; ".join(scheme.describe() for scheme in schemes)
    kept = "pages locked with --lock stay"
    if all(s.mapped_too is False for s in schemes):
        kept += ", and so do pages a process maps (a server's mmap)"
    return (
        f"this machine's proactive reclaim drops idle page cache: {lines}; {kept}; "
        "`preloader serve` reads back what goes"
    )


@functools.lru_cache(maxsize=1)
def note() -> str | None:
    """:func:`describe` of this machine's schemes, read once per process."""
    return describe(find_schemes())


def headline(schemes: tuple[ReclaimScheme, ...]) -> str | None:
    """A short line for the log: which scheme drops idle page cache, and what keeps pages
    (:func:`describe` has the details, in ``--json`` and ``/status``)."""
    if not schemes:
        return None
    where = ", ".join(scheme.where for scheme in schemes)
    return f"{where} drops idle page cache on this machine; --lock (or a server's mmap) keeps it"


_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def first_this_boot(directory: str | None = None, boot_id_path: str = _BOOT_ID) -> bool:
    """Whether this is the first call on this boot for this user, remembered in a marker
    file outside any model directory (``directory``, default the temporary folder).

    A marker that cannot be read or written counts as the first call: saying a warning
    twice is better than never.
    """
    boot = read_text(boot_id_path)
    if boot is None:
        return True
    marker = os.path.join(
        directory or tempfile.gettempdir(), f"preloader-proactive-reclaim-{os.getuid()}"
    )
    if read_text(marker) == boot:
        return False
    _write_marker(marker, boot)
    return True


def _write_marker(path: str, text: str) -> None:
    """Write ``text`` to ``path`` in a shared temporary folder, safely: never through a
    symbolic link, and only into a plain file of this user's with no other name."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_nlink == 1:
            os.ftruncate(fd, 0)
            os.write(fd, text.encode("ascii", "replace"))
    except OSError:
        pass
    finally:
        os.close(fd)
