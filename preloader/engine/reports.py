"""The reports the engine returns and the live counters it updates.

Frozen dataclasses with their JSON form; totals over files come from one helper. Per-file
results are kept as columns (:class:`ResidencyColumns`) and shown as sequences whose
items are made on access (:class:`Residencies`), so a report of a million files holds
arrays, not a million objects.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, overload

from ..planning.filetable import FileTable, optional
from ..planning.specs import Skipped

__all__ = [
    "ChunkProgress",
    "FileResidency",
    "FileResult",
    "FileResults",
    "PassColumns",
    "Residencies",
    "ResidencyColumns",
    "ResidencyReport",
    "WarmProgress",
    "WarmReport",
    "resident_share",
]


class ChunkProgress:
    """The bytes one chunk being read has brought in so far.

    Made and dropped on the event loop; only the worker thread reading the chunk writes
    :attr:`bytes` (it is the read's ``on_step``), so the loop may sum it at any time.
    """

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self, done: int) -> None:
        self.bytes = done


@dataclass
class WarmProgress:
    """Live counters, written by the engine on the event loop, read by front ends.

    :ivar bytes_read: bytes of the chunks read to the end.
    :ivar reading: the chunks of big files being read now (see :attr:`bytes_arrived`).
    """

    state: str = "planning"
    files_total: int = 0
    bytes_total: int = 0
    files_done: int = 0
    bytes_read: int = 0
    errors: int = 0
    concurrency: int = 0
    started: float = field(default_factory=time.monotonic)
    reading: set[ChunkProgress] = field(default_factory=set)

    @property
    def bytes_arrived(self) -> int:
        """:attr:`bytes_read` and what the chunks being read have brought in so far.

        It moves every read step (8 MiB) rather than every chunk (64 MiB or more), which
        is what a rate measured over a second or two needs. Read it on the event loop.
        """
        return self.bytes_read + sum(chunk.bytes for chunk in self.reading)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Bytes per second since the start."""
        elapsed = self.elapsed
        return self.bytes_read / elapsed if elapsed > 0 else 0.0


@dataclass(frozen=True, slots=True)
class FileResidency:
    """Residency of one file: bytes, or ``None`` with the reason it is unknown.

    :ivar changed: the file was deleted, replaced or shrank since it was read (the
        reason says which): a read error of the pass, not an unknown residency.
    """

    path: str
    size: int
    resident_bytes: int | None
    reason: str | None = None
    changed: bool = False

    @property
    def resident_ratio(self) -> float | None:
        return resident_share(self.resident_bytes, self.size)

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "bytes": self.size,
            "resident_bytes": self.resident_bytes,
            "resident_ratio": self.resident_ratio,
            "reason": self.reason,
        }


def resident_share(resident: int | None, total: int) -> float | None:
    """``resident`` as a share of ``total`` bytes; ``None`` when unknown, 1.0 for nothing."""
    if resident is None:
        return None
    return resident / total if total else 1.0


class ResidencyColumns:
    """The residency of each of ``count`` files as columns, filled in any order.

    The reasons and changes are kept only where there are any.
    """

    __slots__ = ("_changed", "_reasons", "_resident", "_unset")

    def __init__(self, count: int, unset: str | None = None) -> None:
        """:param unset: the reason of a file not put (unknown residency)."""
        self._resident = array("q", [-1]) * count  # -1: unknown
        self._reasons: dict[int, str] = {}
        self._changed: set[int] = set()
        self._unset = unset

    def __len__(self) -> int:
        return len(self._resident)

    def put(self, index: int, measured: FileResidency) -> None:
        resident = measured.resident_bytes
        self._resident[index] = -1 if resident is None else resident
        if measured.reason is None:
            self._reasons.pop(index, None)
        else:
            self._reasons[index] = measured.reason
        if measured.changed:
            self._changed.add(index)

    def put_resident(self, index: int, resident: int) -> None:
        """:meth:`put` of a file measured with nothing to say: ``resident`` bytes."""
        self._resident[index] = resident
        self._reasons.pop(index, None)

    def resident_bytes(self, index: int) -> int | None:
        return optional(self._resident[index])

    def changed(self, index: int) -> bool:
        return index in self._changed

    def get(self, index: int, path: str, size: int) -> FileResidency:
        return FileResidency(
            path, size, self.resident_bytes(index), self.reason(index), index in self._changed
        )

    def reason(self, index: int) -> str | None:
        return self._reasons.get(index, self._unset)

    def total(self, files: FileTable) -> tuple[int | None, str | None]:
        """Total resident bytes of ``files`` (aligned), or ``None`` and why not."""
        resident = self._resident
        unknown = resident.count(-1)
        if unknown:
            first = resident.index(-1)
            return (
                None,
                f"{unknown} of {len(resident)} files unknown; first {files.path(first)}: "
                f"{self.reason(first)}",
            )
        return sum(resident), None


_T = TypeVar("_T")


class _Made(Sequence[_T]):
    """A sequence whose items are made per access by :meth:`_item`; a slice is a list."""

    __slots__ = ()

    def __len__(self) -> int:
        raise NotImplementedError

    def _item(self, index: int) -> _T:
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> _T: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[_T]: ...
    def __getitem__(self, index: int | slice) -> _T | Sequence[_T]:
        if isinstance(index, slice):
            return [self._item(i) for i in range(len(self))[index]]
        return self._item(range(len(self))[index])

    def __iter__(self) -> Iterator[_T]:
        return (self._item(i) for i in range(len(self)))


class Residencies(_Made[FileResidency]):
    """The residency of a plan's files: a :class:`FileResidency` made per access."""

    __slots__ = ("columns", "files")

    def __init__(self, files: FileTable, columns: ResidencyColumns) -> None:
        self.files = files
        self.columns = columns

    def __len__(self) -> int:
        return len(self.files)

    def _item(self, index: int) -> FileResidency:
        return self.columns.get(index, self.files.path(index), self.files.size(index))

    def __iter__(self) -> Iterator[FileResidency]:
        get = self.columns.get
        return (
            get(i, path, size)
            for i, (path, size) in enumerate(
                zip(self.files.paths(), self.files.sizes(), strict=True)
            )
        )


def _total_resident(items: Sequence[FileResidency]) -> tuple[int | None, str | None]:
    if isinstance(items, Residencies):
        return items.columns.total(items.files)
    unknown = [item for item in items if item.resident_bytes is None]
    if unknown:
        first = unknown[0]
        return (
            None,
            f"{len(unknown)} of {len(items)} files unknown; first {first.path}: {first.reason}",
        )
    return sum(item.resident_bytes or 0 for item in items), None


@dataclass(frozen=True)
class ResidencyReport:
    """Residency of a plan's files, as ``preloader status`` shows it."""

    files: Sequence[FileResidency]
    skipped: tuple[Skipped, ...] = ()

    @property
    def bytes(self) -> int:
        if isinstance(self.files, Residencies):
            return self.files.files.total_bytes
        return sum(f.size for f in self.files)

    @property
    def resident_bytes(self) -> int | None:
        return _total_resident(self.files)[0]

    @property
    def residency_unknown_reason(self) -> str | None:
        return _total_resident(self.files)[1]

    @property
    def resident_ratio(self) -> float | None:
        return resident_share(self.resident_bytes, self.bytes)

    def to_json(self, per_file: bool = True) -> dict[str, object]:
        """The report as JSON; ``per_file=False`` leaves ``per_file`` out (a front end
        that streams it)."""
        resident, reason = _total_resident(self.files)
        document: dict[str, object] = {
            "files": len(self.files),
            "bytes": self.bytes,
            "resident_bytes": resident,
            "resident_ratio": self.resident_ratio,
            "residency_unknown_reason": reason,
            "skipped": len(self.skipped),
        }
        if per_file:
            document["per_file"] = [f.to_json() for f in self.files]
        return document


@dataclass(frozen=True, slots=True)
class FileResult:
    """What warming did to one file.

    :ivar read_bytes: bytes the read pass brought in.
    :ivar resident_after_read: residency measured on the same descriptor right after the
        last chunk (``None`` when unknown or not measured).
    :ivar residency: residency measured by re-opening the file after the whole pass.
    :ivar error: why reading failed, or ``None``.
    :ivar cause: why the file is not resident, when it is not.
    """

    path: str
    size: int
    read_bytes: int
    method: str
    residency: FileResidency
    resident_after_read: int | None = None
    error: str | None = None
    cause: str | None = None


class PassColumns(Protocol):
    """What a read pass recorded per file (:class:`preloader.engine.ledger.Ledger`)."""

    files: FileTable
    read_bytes: array[int]
    errors: dict[int, str]

    def method_of(self, index: int) -> str: ...
    def resident_after_read(self, index: int) -> int | None: ...


class FileResults(_Made[FileResult]):
    """A finished pass's files as the report shows them: a :class:`FileResult` per access.

    :param residency: residency after the pass of each file.
    :param causes: why a file is not resident, where it is not.
    """

    def __init__(
        self, ledger: PassColumns, residency: ResidencyColumns, causes: dict[int, str]
    ) -> None:
        self.ledger = ledger
        self.residency = residency
        self.causes = causes

    def __len__(self) -> int:
        return len(self.ledger.files)

    def residency_of(self, index: int) -> FileResidency:
        files = self.ledger.files
        return self.residency.get(index, files.path(index), files.size(index))

    def _item(self, index: int) -> FileResult:
        ledger = self.ledger
        return FileResult(
            path=ledger.files.path(index),
            size=ledger.files.size(index),
            read_bytes=ledger.read_bytes[index],
            method=ledger.method_of(index),
            residency=self.residency_of(index),
            resident_after_read=ledger.resident_after_read(index),
            error=ledger.errors.get(index),
            cause=self.causes.get(index),
        )

    def errors(self) -> tuple[FileResult, ...]:
        return tuple(self._item(i) for i in sorted(self.ledger.errors))

    def not_resident(self) -> tuple[FileResult, ...]:
        errors = self.ledger.errors
        return tuple(self._item(i) for i in sorted(self.causes) if i not in errors)

    def residencies(self) -> Residencies:
        return Residencies(self.ledger.files, self.residency)


@dataclass(frozen=True)
class Autotune:
    """How ``-c auto`` settled.

    :ivar steps: ``(readers, bytes per second)`` of every window it measured, in order.
    :ivar settled: the readers it kept.
    :ivar why: why it stopped there, in words.
    """

    steps: tuple[tuple[int, float], ...]
    settled: int
    why: str

    def to_json(self) -> dict[str, object]:
        return {
            "steps": [
                {"concurrency": readers, "bytes_per_second": round(rate)}
                for readers, rate in self.steps
            ],
            "settled": self.settled,
            "why": self.why,
        }


@dataclass(frozen=True)
class WarmReport:
    """The outcome of a warm pass; :meth:`to_json` is the ``--json`` contract."""

    files: Sequence[FileResult]
    skipped: tuple[Skipped, ...]
    seconds: float
    cpu_seconds: float
    concurrency: int
    chunk_size: int
    method: str
    timed_out: bool = False
    interrupted: bool = False
    verified: bool = True
    autotune: Autotune | None = None
    proactive_reclaim: str | None = None
    cold_bytes: int = 0  # planned bytes a trim left out: every ratio counts them as cold

    @property
    def bytes(self) -> int:
        if isinstance(self.files, FileResults):
            return self.files.ledger.files.total_bytes
        return sum(f.size for f in self.files)

    @property
    def read_bytes(self) -> int:
        if isinstance(self.files, FileResults):
            return sum(self.files.ledger.read_bytes)
        return sum(f.read_bytes for f in self.files)

    @property
    def errors(self) -> tuple[FileResult, ...]:
        if isinstance(self.files, FileResults):
            return self.files.errors()
        return tuple(f for f in self.files if f.error is not None)

    @property
    def walk_errors(self) -> tuple[Skipped, ...]:
        """Folders that could not be listed, paths that could not be stat'ed."""
        return tuple(s for s in self.skipped if s.error)

    @property
    def not_resident(self) -> tuple[FileResult, ...]:
        if isinstance(self.files, FileResults):
            return self.files.not_resident()
        return tuple(f for f in self.files if f.error is None and f.cause is not None)

    def _residencies(self) -> Sequence[FileResidency]:
        if isinstance(self.files, FileResults):
            return self.files.residencies()
        return [f.residency for f in self.files]

    @property
    def resident_bytes(self) -> int | None:
        if not self.verified:
            return None
        return _total_resident(self._residencies())[0]

    @property
    def residency_unknown_reason(self) -> str | None:
        if not self.verified:
            return "residency was not verified (verify=False)"
        return _total_resident(self._residencies())[1]

    @property
    def resident_ratio(self) -> float | None:
        return resident_share(self.resident_bytes, self.bytes + self.cold_bytes)

    @property
    def warmed_ratio(self) -> float | None:  # of what was read: the part a trim kept
        return resident_share(self.resident_bytes, self.bytes)

    def to_json(self) -> dict[str, object]:
        return {
            "files": len(self.files),
            "bytes": self.bytes,
            "model_bytes": self.bytes + self.cold_bytes,
            "read_bytes": self.read_bytes,
            "resident_bytes": self.resident_bytes,
            "resident_ratio": self.resident_ratio,
            "residency_unknown_reason": self.residency_unknown_reason,
            "seconds": round(self.seconds, 6),
            "cpu_seconds": round(self.cpu_seconds, 6),
            "errors": len(self.errors) + len(self.walk_errors),
            "error_details": [{"path": f.path, "cause": f.error} for f in self.errors]
            + [{"path": s.path, "cause": s.reason} for s in self.walk_errors],
            "not_resident": [
                {
                    "path": f.path,
                    "bytes": f.size,
                    "resident_bytes": f.residency.resident_bytes,
                    "cause": f.cause,
                }
                for f in self.not_resident
            ],
            "skipped": len(self.skipped) - len(self.walk_errors),
            "skipped_details": [
                {"path": s.path, "reason": s.reason} for s in self.skipped if not s.error
            ],
            "concurrency": self.concurrency,
            "autotune": None if self.autotune is None else self.autotune.to_json(),
            "chunk_size": self.chunk_size,
            "method": self.method,
            "timed_out": self.timed_out,
            "interrupted": self.interrupted,
            "proactive_reclaim": self.proactive_reclaim,
        }
