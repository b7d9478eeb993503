"""Verification after a read pass: open every file again and measure what stayed resident.

Builds on :mod:`.residency` (the measuring) for :mod:`.warm`; :class:`~.ledger.Ledger`
then turns what was measured into the report (:func:`~.ledger.assemble`).
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Sequence

from .ledger import Ledger, Verification
from .prefetch import measuring_threads
from .reports import ResidencyColumns
from .residency import _VERIFY_WORKERS, _measure_into, bypass_probe, map_files

__all__ = ["verify_pass"]


async def verify_pass(
    ledger: Ledger,
    concurrency: int,
    *,
    timeout: float | None = None,
    stop: threading.Event | None = None,
) -> Verification:
    """Re-open every file of a finished read pass and measure what stayed resident.

    :param concurrency: the pass's readers; at least 16 threads measure side by side,
        one where every file is on a local disk (:func:`~.prefetch.measuring_threads`).
    :param timeout: the per-read timeout, applied to each open and measurement.
    """
    files = ledger.files
    workers = measuring_threads(files, max(_VERIFY_WORKERS, concurrency))
    # A file whose read stalled is not opened again: on a filesystem that invalidates the
    # cache at open, that open waits for the stuck read's locked page, for ever.
    healthy: Sequence[int] = range(len(files))
    if ledger.stalled:
        healthy = array("i", (i for i in healthy if i not in ledger.stalled))
    residency = ResidencyColumns(len(files))
    await _measure_into(
        residency, files, healthy, workers, after_read=True, timeout=timeout, stop=stop
    )
    # Read in full and none of it resident now: one page tells a filesystem whose reads
    # bypass the cache (direct_io) from one that drops it at open, and both from eviction.
    suspects = [
        index
        for index in healthy
        if residency.resident_bytes(index) == 0
        and index not in ledger.errors
        and ledger.resident_after_read(index) is not None
        and not residency.changed(index)
    ]
    probed = await map_files(
        lambda index: bypass_probe(files[index]),
        suspects,
        workers,
        lambda index, why: None,
        timeout=timeout,
        stop=stop,
    )
    return Verification(residency, dict(zip(suspects, probed, strict=True)))
