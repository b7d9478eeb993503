"""The mount table: ``/proc/self/mountinfo``, parsed by one parser and cached in one place.

:func:`parse_mountinfo` is the one reading of proc(5)'s format: the memory budget finds
cgroup hierarchies with it (:mod:`preloader.planning.budget`) and :func:`mount_types`
names each device's filesystem. :func:`filesystem_type` answers "what filesystem is this
device on" from one process-wide table: the walk reads the table afresh when it starts
(:func:`refresh_mounts`, so a plan sees the mounts of its time), and a device the table
does not list (a mount made since) has the table read again, at most once per device.
The readers, the schedule and the prefetch rule ask by the device a file was planned on,
so no question touches the file itself: a hung mount cannot block them.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass

from .procfs import read_text

__all__ = [
    "MOUNTINFO",
    "Mount",
    "filesystem_type",
    "mount_types",
    "parse_mountinfo",
    "refresh_mounts",
]

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``.

    :ivar device: ``st_dev`` of the files on it (from ``major:minor``); ``None`` when the
        line's field is malformed.
    """

    root: str
    mount_point: str
    fstype: str
    super_options: tuple[str, ...]
    device: int | None = None


def _unescape(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _device(field: str) -> int | None:
    major, _, minor = field.partition(":")
    if major.isdigit() and minor.isdigit():
        return os.makedev(int(major), int(minor))
    return None


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse ``/proc/self/mountinfo`` (see proc(5)); malformed lines are ignored.

    A line is ``id parent major:minor root mount-point options [optional...] - fstype
    source super-options``.
    """
    mounts = []
    for line in text.splitlines():
        # 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) < sep + 3:
            continue
        mounts.append(
            Mount(
                root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                fstype=fields[sep + 1],
                super_options=tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3 else (),
                device=_device(fields[2]),
            )
        )
    return mounts


def mount_types(mountinfo: str = MOUNTINFO) -> dict[int, str]:
    """Filesystem type (``ext4``, ``fuse.s3fs``, ``proc``) of every mounted device, by ``st_dev``.

    Read from the kernel's mount table now, so it names what the kernel mounted, not what
    a path looks like; empty when the table cannot be read. The first mount of a device
    names it (a bind mount repeats the device).
    """
    types: dict[int, str] = {}
    for mount in parse_mountinfo(read_text(mountinfo) or ""):
        if mount.device is not None:
            types.setdefault(mount.device, mount.fstype)
    return types


_lock = threading.Lock()
_tables: dict[str, dict[int, str]] = {}
_asked: dict[str, set[int]] = {}


def refresh_mounts(mountinfo: str = MOUNTINFO) -> dict[int, str]:
    """Read the mount table now and make it the one :func:`filesystem_type` answers from.

    :return: the fresh table, filesystem type by device.
    """
    types = mount_types(mountinfo)
    with _lock:
        _asked[mountinfo] = set()  # first: a reader that finds the table finds this too
        _tables[mountinfo] = types
    return types


def filesystem_type(dev: int, mountinfo: str = MOUNTINFO) -> str | None:
    """The type of the filesystem on device ``dev``, or ``None`` when no mount lists it.

    From the cached table; a device it does not list has the table read again, once.
    Safe from any thread; a known device costs two dictionary lookups (the schedule asks
    once per planned file).
    """
    types = _tables.get(mountinfo)
    if types is not None:
        kind = types.get(dev)
        if kind is not None or dev in _asked[mountinfo]:
            return kind
    types = mount_types(mountinfo)
    with _lock:
        asked = _asked.setdefault(mountinfo, set())
        if dev not in types:
            asked.add(dev)
        _tables[mountinfo] = types
    return types.get(dev)
