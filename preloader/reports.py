"""The reports the engine returns and the live counters it updates.

Frozen dataclasses with their JSON form; totals over files come from one helper.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .planner import Skipped

__all__ = [
    "FileResidency",
    "FileResult",
    "ResidencyReport",
    "WarmProgress",
    "WarmReport",
    "resident_share",
]


@dataclass
class WarmProgress:
    """Live counters, written by the engine on the event loop, read by front ends."""

    state: str = "planning"
    files_total: int = 0
    bytes_total: int = 0
    files_done: int = 0
    bytes_read: int = 0
    errors: int = 0
    concurrency: int = 0
    started: float = field(default_factory=time.monotonic)

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


def _total_resident(items: Sequence[FileResidency]) -> tuple[int | None, str | None]:
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

    files: tuple[FileResidency, ...]
    skipped: tuple[Skipped, ...] = ()

    @property
    def bytes(self) -> int:
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

    files: tuple[FileResult, ...]
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

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def read_bytes(self) -> int:
        return sum(f.read_bytes for f in self.files)

    @property
    def errors(self) -> tuple[FileResult, ...]:
        return tuple(f for f in self.files if f.error is not None)

    @property
    def walk_errors(self) -> tuple[Skipped, ...]:
        """Folders that could not be listed, paths that could not be stat'ed."""
        return tuple(s for s in self.skipped if s.error)

    @property
    def not_resident(self) -> tuple[FileResult, ...]:
        return tuple(f for f in self.files if f.error is None and f.cause is not None)

    @property
    def resident_bytes(self) -> int | None:
        if not self.verified:
            return None
        return _total_resident([f.residency for f in self.files])[0]

    @property
    def residency_unknown_reason(self) -> str | None:
        if not self.verified:
            return "residency was not verified (verify=False)"
        return _total_resident([f.residency for f in self.files])[1]

    @property
    def resident_ratio(self) -> float | None:
        return resident_share(self.resident_bytes, self.bytes)

    def to_json(self) -> dict[str, object]:
        return {
            "files": len(self.files),
            "bytes": self.bytes,
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
        }
