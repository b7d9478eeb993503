"""Pure parsers of the files that locate and size this process's memory cgroup.

``/proc/self/cgroup``, cgroup v1/v2 limit files and ``/proc/meminfo``, and which mounts
(:func:`~.mounts.parse_mountinfo`) hold this process's memory cgroup: text in, simple
values out, so each can be tested alone; the reads
are :func:`preloader.kernel.procfs.read_text`, called from :mod:`preloader.planning.budget`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from .mounts import Mount

__all__ = [
    "memory_cgroup_dirs",
    "parse_limit",
    "parse_meminfo",
    "parse_proc_cgroup",
]

# cgroup v1 says "no limit" with PAGE_COUNTER_MAX pages in bytes (9223372036854771712 on
# 4 KiB pages); anything this large is no limit on any real machine.
_UNLIMITED = 1 << 62


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """Parse ``/proc/self/cgroup``.

    :return: v1 controller (and ``name=`` hierarchy) -> cgroup path, and the v2 path
        (the ``0::`` line) or ``None``.
    """
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
            continue
        for controller in controllers.split(","):
            if controller:
                v1[controller] = path
    return v1, v2


def _join_cgroup(mount: Mount, cgroup_path: str) -> str | None:
    """The directory of ``cgroup_path`` under ``mount``, or ``None`` when outside it."""
    root = mount.root.rstrip("/")
    if root and cgroup_path != root and not cgroup_path.startswith(root + "/"):
        return None
    relative = cgroup_path[len(root) :].lstrip("/")
    return os.path.join(mount.mount_point, relative) if relative else mount.mount_point


def memory_cgroup_dirs(
    v1: Mapping[str, str], v2: str | None, mounts: Sequence[Mount]
) -> list[tuple[int, str, str]]:
    """Where this process's memory cgroup may live, best guess first.

    :return: ``(version, cgroup directory, mount point)`` candidates: the v1 ``memory``
        hierarchy when mounted, then the v2 unified hierarchy (whose memory controller may
        or may not be enabled; the reader checks for ``memory.max``).
    """
    candidates: list[tuple[int, str, str]] = []
    if "memory" in v1:
        for mount in mounts:
            if mount.fstype == "cgroup" and "memory" in mount.super_options:
                directory = _join_cgroup(mount, v1["memory"])
                if directory is not None:
                    candidates.append((1, directory, mount.mount_point))
                    break
    if v2 is not None:
        for mount in mounts:
            if mount.fstype == "cgroup2":
                directory = _join_cgroup(mount, v2)
                if directory is not None:
                    candidates.append((2, directory, mount.mount_point))
                    break
    return candidates


def parse_limit(text: str) -> int | None:
    """A cgroup limit file's content in bytes; ``None`` for no limit (``max``, or huge)."""
    value = text.strip()
    if value == "max":
        return None
    number = int(value)
    return None if number >= _UNLIMITED else number


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` as bytes per field (``MemAvailable``, ``MemTotal``, ...)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
        values[name.strip()] = int(parts[0]) * scale
    return values
