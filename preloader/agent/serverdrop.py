"""Files a reader dropped from the page cache on purpose, told apart from reclaim.

Some inference servers drop a checkpoint's pages once they have loaded it: sglang's
``--weight-loader-drop-cache-after-load`` opens each safetensors shard after its tensors
were copied out and calls ``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`` on the whole
file (pages another process still maps stay). Keep-warm would read every such file again
at its next check, and on a mount of an object store fetch the whole model once more after
every load. :func:`dropped_by_reader` finds those files in a keep-warm measurement, and
:class:`ServerDrops` keeps what keep-warm does about them (``--on-server-drop``).

The rule: at a check, a file counts as dropped by a reader when

1. it was resident in full at the previous measurement (after the first pass or a re-read);
2. at most 1% of it is resident now: it went whole, as ``DONTNEED`` on a file takes it;
3. ``cachestat`` counts none of its pages as evicted. Reclaim (kswapd, direct reclaim, a
   memory cgroup's limit, DAMON ``pageout``) leaves a shadow entry for each page it takes
   and ``nr_evicted`` counts them; an invalidation (``POSIX_FADV_DONTNEED``, truncation,
   ``drop_caches``) leaves none;
4. the kernel pruned no shadow entries since the path's previous check
   (``workingset_nodereclaim`` in ``/proc/vmstat`` unchanged): under memory pressure it
   frees them, and a file reclaimed then would look invalidated.

Where ``cachestat`` is missing (kernels before 6.5, the mincore fallback) or
``/proc/vmstat`` cannot be read, nothing is ever found: keep-warm re-reads as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..engine.keepwarm import ChunkResidency
from ..kernel.procfs import vmstat_counter
from ..units import format_bytes, printable

__all__ = ["RESIDENT_LEFT", "ServerDrops", "dropped_by_reader", "shadow_prunes"]

RESIDENT_LEFT = 0.01
"""The most of a file that may still be resident for it to count as dropped whole."""


@dataclass
class ServerDrops:
    """What keep-warm knows of one path's files dropped by a reader.

    :ivar held: file index -> size of the files left alone under ``hold``, until they are
        resident in full again (the server, or anything, read them).
    :ivar files: files found dropped, counted at each finding.
    :ivar bytes: their bytes, counted likewise.
    :ivar shadow_mark: ``workingset_nodereclaim`` at the path's previous check.
    """

    held: dict[int, int] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    shadow_mark: int | None = None

    def held_bytes(self) -> int:
        """Bytes keep-warm leaves out while they are held."""
        return sum(self.held.values())


def shadow_prunes() -> int | None:
    """How many times the kernel freed shadow entries under memory pressure (a counter).

    :return: ``workingset_nodereclaim`` from ``/proc/vmstat``; ``None`` when unreadable.
    """
    return vmstat_counter("workingset_nodereclaim")


def dropped_by_reader(
    previous: Sequence[int | None] | None,
    measured: Sequence[ChunkResidency],
    shadows_kept: bool,
) -> list[ChunkResidency]:
    """The files of ``measured`` that a reader dropped, by the rule of this module.

    :param previous: each file's resident bytes at the previous measurement (``None``
        where unknown), in plan order; ``None`` before any measurement.
    :param measured: this check's measurement, in plan order.
    :param shadows_kept: no shadow entries were pruned since the previous check.
    :return: the files found dropped, in plan order.
    """
    if previous is None or not shadows_kept:
        return []
    found = []
    for item, before in zip(measured, previous, strict=True):
        if item.evicted_pages != 0 or item.resident_bytes is None or before is None:
            continue  # reclaimed (shadow entries), or not measured by cachestat
        if item.size and before >= item.size and item.resident_bytes <= item.size * RESIDENT_LEFT:
            found.append(item)
    return found


def describe(found: Sequence[ChunkResidency], hold: bool) -> str:
    """The log line's detail for files found dropped, naming the settings that matter.

    :param found: the files found dropped at one check (at least one).
    :param hold: whether keep-warm holds them (``--on-server-drop hold``).
    :return: one line.
    """
    size = format_bytes(sum(item.size for item in found))
    what = (
        f"{len(found)} files ({size}; first {printable(found[0].path)}) left the page cache "
        "whole right after being resident, with no sign of reclaim (no evicted pages, no "
        "shadow entries pruned): a reader dropped them, as a server does with sglang's "
        "--weight-loader-drop-cache-after-load"
    )
    if hold:
        return (
            f"{what}; keep-warm holds them (no re-read until they are resident again); "
            "--on-server-drop rewarm (PRELOADER_ON_SERVER_DROP=rewarm) re-reads them, "
            "leaving out the server's flag keeps the model cached"
        )
    return (
        f"{what}; re-reading them, so the storage serves them again after every load; "
        "--on-server-drop hold (PRELOADER_ON_SERVER_DROP=hold) stops the re-warm"
    )
