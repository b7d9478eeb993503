"""The read schedule: which chunks a worker reads next.

One sequential stream per file first: a worker takes the next file in plan order and reads
it front to back, chunk by chunk, so workers run in parallel across files and every file is
read the way its storage reads fastest (s3fs, for one, serves one stream per file well and
several concurrent ranges of the same file badly). A file is split between workers only at
the tail, when a worker is idle and no file is left unstarted (one GGUF file, the last
shards of a pass), and only where the file's storage gains from it (:func:`split_rule`):
the idle worker then takes the back half of the largest stream still running, so every
worker still reads one sequential range.

A big file on a filesystem whose one stream already fetches in parallel (s3fs) is read
*solo* (:func:`solo_rule`): at most :data:`SOLO_STREAMS` such files at once, in plan order.
There one stream gets most of the mount's throughput, so the pass takes about as long as
with four files at once, but the first shards finish first, and a loader that reads the
shards in index order (every tensor-parallel rank does) reads behind the warm-up, from
memory, instead of waiting on four half-read files. The second stream keeps the mount
busy while a loader that caught up funnels its reads and the warm-up's through one file
(s3fs serialises the reads of one file under its lock). A worker that finds the next file
solo while :data:`SOLO_STREAMS` solo files are running retires.

Runs of whole small files go to one worker as one batch (up to one chunk's bytes or
``max_files`` files), so 100,000 small files cost a few thousand thread hand-offs.

Pure bookkeeping: no I/O but the filesystem types :func:`split_rule` and
:func:`solo_rule` ask :mod:`preloader.kernel.mounts` for (its cached mount table).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..kernel.mounts import filesystem_type
from ..planning.filetable import FileTable
from ..planning.specs import Chunk, FileSpec, chunk_count
from ..settings import SPLIT_MODES

__all__ = [
    "NO_SPLIT_FILESYSTEMS",
    "SOLO_MIN_BYTES",
    "SOLO_STREAMS",
    "Schedule",
    "Stream",
    "filesystem_type",
    "solo_rule",
    "split_rule",
]

# FUSE clients whose fast path is one sequential stream per file: s3fs already fetches a
# stream's ranges in parallel (parallel_count), and concurrent reads of one file at other
# offsets contend on its per-file cache and discard its prefetch. Measured through s3fs over
# the bench's loopback S3 (4 x 512 MiB): one stream per file 1.62 s per file, four
# concurrent 64 MiB chunks of it 2.27 s.
NO_SPLIT_FILESYSTEMS = frozenset({"fuse.s3fs"})

# From this size a file on one of NO_SPLIT_FILESYSTEMS is read solo. Measured through s3fs
# over the bench's loopback S3, 4 x 512 MiB: the pass took 14.5 s one file at a time and
# 14.2 s four at once, and the first file was resident after a quarter of it instead of at
# its end. Smaller files pay a round trip per open and a prefetch window (multipart_size x
# parallel_count, 50 MB) per file, which reading them side by side hides.
SOLO_MIN_BYTES = 512 * 2**20

# Solo files read at once. 1 measured even with four streams alone (above), but 9% slower
# than the one-liner's four with four loader ranks copying beside it on a loaded 2-core VM.
SOLO_STREAMS = 2


@dataclass(slots=True)
class Stream:
    """One worker's sequential range of one file: positions ``[next, end)`` of its chunks."""

    file_index: int
    next: int
    end: int

    @property
    def left(self) -> int:
        return self.end - self.next


class Schedule:
    """Hands batches to workers: a stream per file, split only at the tail of a pass.

    Used from one thread (the engine's event loop); not thread-safe.

    :param files: the plan's files, in plan order.
    :param chunk_size: bytes per chunk (already rounded to whole pages).
    :param may_split: whether a file may be read by several workers at once.
    :param chunks: read only these chunks (keep-warm re-reads what lost pages), in any
        order; a file with none is skipped. ``None``: every chunk of every file.
    :param max_files: most whole small files in one batch.
    :param solo: whether a file is read with at most :data:`SOLO_STREAMS` solo files at
        once (see :func:`solo_rule`); a worker offered one beyond that gets ``None``.
    """

    def __init__(
        self,
        files: Sequence[FileSpec],
        chunk_size: int,
        may_split: Callable[[FileSpec], bool] = lambda spec: True,
        chunks: Sequence[Chunk] | None = None,
        max_files: int = 64,
        solo: Callable[[FileSpec], bool] = lambda spec: False,
    ) -> None:
        self._files = files
        self._size: Callable[[int], int] = (
            files.sizer() if isinstance(files, FileTable) else lambda index: files[index].size
        )
        self._solo = solo
        self._chunk_size = chunk_size
        self._may_split = may_split
        self._max_files = max_files
        self._selected: dict[int, list[Chunk]] | None = None
        if chunks is not None:
            selected: dict[int, list[Chunk]] = {}
            for chunk in sorted(chunks, key=lambda c: (c.file_index, c.index)):
                selected.setdefault(chunk.file_index, []).append(chunk)
            self._selected = selected
            self._order: Sequence[int] = sorted(selected)
        else:
            self._order = range(len(files))
        self._next_file = 0  # position in self._order of the next unstarted file
        self._running: list[Stream] = []
        self._split_ok: dict[int, bool] = {}

    def counts(self) -> list[int]:
        """Chunks each planned file will be read in (0 for a file not selected)."""
        return [self.total(i) for i in range(len(self._files))]

    def file_count(self) -> int:
        """Files the pass reads (each has at least one chunk)."""
        return len(self._order)

    def take(self, stream: Stream | None) -> tuple[tuple[Chunk, ...], Stream | None] | None:
        """The next batch for a worker, and the stream it continues.

        :param stream: the stream the worker read last (``None`` for a new worker).
        :return: ``(batch, stream)``, or ``None`` when nothing is left to read.
        """
        if stream is not None and stream.left > 0:
            return (self._chunk(stream),), stream
        if stream is not None:
            self._running.remove(stream)
        if self._next_file < len(self._order):
            if self._solo_waits():
                return None  # retire: the worker reading the solo file goes on alone
            return self._start_next()
        return self._split()

    def _solo_waits(self) -> bool:
        """Whether the next file is solo while :data:`SOLO_STREAMS` solo files are read."""
        following = self._order[self._next_file]
        if self._whole_chunk(following) is not None or not self._solo(self._files[following]):
            return False
        running = sum(1 for s in self._running if self._solo(self._files[s.file_index]))
        return running >= SOLO_STREAMS

    def total(self, file_index: int) -> int:
        """Chunks file ``file_index`` is read in (0 for a file not selected)."""
        if self._selected is None:
            return chunk_count(self._size(file_index), self._chunk_size)
        return len(self._selected.get(file_index, ()))

    def _at(self, file_index: int, position: int) -> Chunk:
        if self._selected is not None:
            return self._selected[file_index][position]
        size = self._size(file_index)
        offset = position * self._chunk_size
        return Chunk(file_index, position, offset, max(0, min(self._chunk_size, size - offset)))

    def _chunk(self, stream: Stream) -> Chunk:
        chunk = self._at(stream.file_index, stream.next)
        stream.next += 1
        return chunk

    def _whole_chunk(self, file_index: int) -> Chunk | None:
        """The one chunk of a file read whole, in one hand-off (it opens, reads and closes
        there), else ``None``. One size lookup where every chunk is read: scheduling
        20,000 small files took 0.12 s when this looked each file up four times."""
        size = self._size(file_index)
        if size > self._chunk_size:
            return None
        if self._selected is None:
            return Chunk(file_index, 0, 0, size)
        chunks = self._selected.get(file_index, ())
        return chunks[0] if len(chunks) == 1 and chunks[0].index == 0 else None

    def _start_next(self) -> tuple[tuple[Chunk, ...], Stream | None]:
        file_index = self._order[self._next_file]
        self._next_file += 1
        first = self._whole_chunk(file_index)
        if first is None:
            stream = Stream(file_index, 0, self.total(file_index))
            self._running.append(stream)
            return (self._chunk(stream),), stream
        batch = [first]
        batch_bytes = first.length
        order, limit = self._order, self._chunk_size
        position, end = self._next_file, min(len(order), self._next_file + self._max_files - 1)
        while position < end:
            chunk = self._whole_chunk(order[position])
            if chunk is None or batch_bytes + chunk.length > limit:
                break
            batch.append(chunk)
            batch_bytes += chunk.length
            position += 1
        self._next_file = position
        return tuple(batch), None

    def _splittable(self, file_index: int) -> bool:
        allowed = self._split_ok.get(file_index)
        if allowed is None:
            allowed = self._split_ok[file_index] = self._may_split(self._files[file_index])
        return allowed

    def _split(self) -> tuple[tuple[Chunk, ...], Stream | None] | None:
        candidates = [s for s in self._running if s.left >= 2 and self._splittable(s.file_index)]
        if not candidates:
            return None
        # The largest range left; on a tie the earliest file, which a loader reads first.
        widest = max(candidates, key=lambda s: (s.left, -s.file_index))
        middle = widest.next + (widest.left + 1) // 2
        stream = Stream(widest.file_index, middle, widest.end)
        widest.end = middle
        self._running.append(stream)
        return (self._chunk(stream),), stream


def solo_rule(mode: str = "auto") -> Callable[[FileSpec], bool]:
    """Whether a planned file should be read with at most :data:`SOLO_STREAMS` such files.

    Under ``auto``: files of at least :data:`SOLO_MIN_BYTES` on the filesystems of
    :data:`NO_SPLIT_FILESYSTEMS`, by the planned device (no I/O but the mount table's,
    :func:`~preloader.kernel.mounts.filesystem_type`). ``always`` and ``never`` (a split
    forced by the user) read files side by side.
    """
    if mode not in SPLIT_MODES:
        raise ValueError(f"unknown split mode {mode!r}")
    if mode != "auto":
        return lambda spec: False

    def solo(spec: FileSpec) -> bool:
        return spec.size >= SOLO_MIN_BYTES and filesystem_type(spec.dev) in NO_SPLIT_FILESYSTEMS

    return solo


def split_rule(mode: str = "auto") -> Callable[[FileSpec], bool]:
    """Whether reading a planned file with several workers at once should beat one stream.

    The answer goes by the device the file was planned on (:attr:`FileSpec.dev`), so it
    touches no file: a hung mount cannot block the caller (the mount table is
    :func:`~preloader.kernel.mounts.filesystem_type`'s).

    :param mode: ``always``, ``never``, or ``auto``: yes except on the filesystems of
        :data:`NO_SPLIT_FILESYSTEMS`.
    """
    if mode not in SPLIT_MODES:
        raise ValueError(f"unknown split mode {mode!r}")
    if mode != "auto":
        return lambda spec: mode == "always"

    def pays(spec: FileSpec) -> bool:
        return filesystem_type(spec.dev) not in NO_SPLIT_FILESYSTEMS

    return pays
