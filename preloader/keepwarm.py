"""Keep-warm measurement: residency chunk by chunk, so only lost chunks are read again.

The re-read itself is :func:`preloader.engine.rewarm_chunks` (the engine's workers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import pagecache
from .planner import Chunk, FileSpec, Plan, iter_chunks
from .reading import describe, open_regular
from .settings import WarmOptions
from .verify import map_files

__all__ = ["ChunkResidency", "measure_chunks"]


@dataclass(frozen=True)
class ChunkResidency:
    """Residency of one planned file, with the chunks that lost pages.

    :ivar file_index: index into :attr:`Plan.files`.
    :ivar resident_bytes: resident bytes of the whole file; ``None`` when unknown.
    :ivar lost: chunks with at least one page out of the cache, in file order. When the
        file cannot be opened or measured, every chunk (a re-read will retry it).
    :ivar reason: why the kernel will not tell residency (the file itself is fine).
    :ivar error: why the file could not be opened or measured.
    """

    file_index: int
    path: str
    size: int
    resident_bytes: int | None
    lost: tuple[Chunk, ...] = ()
    reason: str | None = None
    error: str | None = None


def _file_chunks(file_index: int, spec: FileSpec, chunk_size: int) -> tuple[Chunk, ...]:
    return tuple(
        Chunk(file_index, chunk.index, chunk.offset, chunk.length)
        for chunk in iter_chunks([spec], chunk_size)
        if chunk.length > 0
    )


def _chunk_residency_of(item: tuple[int, FileSpec], chunk_size: int) -> ChunkResidency:
    index, spec = item

    def failed(cause: str) -> ChunkResidency:
        # Not measurable: every chunk counts as lost, so keep-warm tries it again.
        return ChunkResidency(
            index, spec.path, spec.size, None, _file_chunks(index, spec, chunk_size), error=cause
        )

    try:
        fd = open_regular(spec)
    except OSError as err:
        return failed(f"cannot open: {describe(err)}")
    try:
        resident = pagecache.fd_residency(fd, spec.size)
        if resident >= spec.size:
            return ChunkResidency(index, spec.path, spec.size, resident)
        # One call per file while everything is cached; chunk by chunk only where not.
        lost = tuple(
            chunk
            for chunk in _file_chunks(index, spec, chunk_size)
            if pagecache.range_resident_pages(fd, chunk.offset, chunk.length)
            < -(-chunk.length // pagecache.PAGE_SIZE)
        )
        return ChunkResidency(index, spec.path, spec.size, resident, lost)
    except pagecache.ResidencyUnknownError as unknown:
        return ChunkResidency(index, spec.path, spec.size, None, reason=unknown.reason)
    except OSError as err:
        return failed(f"cannot measure: {describe(err)}")
    finally:
        os.close(fd)


async def measure_chunks(
    plan: Plan, chunk_size: int, concurrency: int = 4
) -> tuple[ChunkResidency, ...]:
    """Residency of every planned file and the chunks of it that lost pages.

    A fully cached file costs one ``cachestat`` call; only a file with pages missing is
    measured chunk by chunk. Chunks are cut as :func:`warm_plan` cuts them for the same
    ``chunk_size``, so :func:`rewarm_chunks` can re-read exactly the lost ones.

    :return: one entry per planned file, in plan order.
    """
    size = WarmOptions(chunk_size=chunk_size).chunk_size_for()
    results = await map_files(
        lambda item: _chunk_residency_of(item, size), list(enumerate(plan.files)), concurrency
    )
    return tuple(results)
