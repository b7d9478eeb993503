"""The one reader of ``/proc`` and ``/sys`` files (as psutil's ``_common.bcat``).

Bytes decoded as UTF-8 by hand: no codec import, which may be impossible after a process
dropped privileges (setuid). Parsing lives with the callers' pure functions, except for
the few small tables that several modules read (capabilities, the mount table's types).
"""

from __future__ import annotations

import os

__all__ = ["mount_types", "parse_cap_eff", "read_text"]


def read_text(path: str) -> str | None:
    """The whole file as text, or ``None`` when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return None


def parse_cap_eff(status_text: str) -> int:
    """The effective capability mask from ``/proc/self/status`` text (0 when absent)."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def mount_types(mountinfo: str = "/proc/self/mountinfo") -> dict[int, str]:
    """Filesystem type (``ext4``, ``fuse.s3fs``, ``proc``) of every mounted device, by ``st_dev``.

    Read from the kernel's mount table, so it names what the kernel mounted, not what a
    path looks like; empty when the table cannot be read.
    """
    types: dict[int, str] = {}
    for line in (read_text(mountinfo) or "").splitlines():
        # 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
        fields = line.split()
        if len(fields) < 3 or "-" not in fields[3:]:
            continue
        major, _, minor = fields[2].partition(":")
        after = fields[fields.index("-", 3) + 1 :]
        if after and major.isdigit() and minor.isdigit():
            types.setdefault(os.makedev(int(major), int(minor)), after[0])
    return types
