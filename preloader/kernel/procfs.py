"""The one reader of ``/proc`` and ``/sys`` files (as psutil's ``_common.bcat``).

Bytes decoded as UTF-8 by hand: no codec import, which may be impossible after a process
dropped privileges (setuid). Parsing lives with the callers' pure functions, except for
the capability mask, which several modules read; the mount table is :mod:`.mounts`.
"""

from __future__ import annotations

__all__ = ["parse_cap_eff", "read_text", "vmstat_counter"]


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


def vmstat_counter(name: str, text: str | None = None) -> int | None:
    """One counter of ``/proc/vmstat`` (or of ``text``, its contents), ``None`` when absent.

    :param name: the counter, as ``workingset_nodereclaim``.
    :param text: the file's text; read now when not given.
    :return: its value, or ``None`` where the file or the counter is missing.
    """
    body = read_text("/proc/vmstat") if text is None else text
    for line in (body or "").splitlines():
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return None
