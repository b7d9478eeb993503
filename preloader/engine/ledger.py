"""What a read pass did to each planned file, kept as columns, and the report's files.

The engine needs a :class:`~preloader.engine.reading.FileState` (descriptor, chunks in flight)
only while a file is being read: :class:`Ledger` makes one when a file's first chunk is
taken and folds it into arrays when the file is done, so a pass over a million files
holds a few states and a handful of arrays. :class:`~preloader.engine.reports.FileResults`
shows the outcome as the report's ``Sequence[FileResult]``, an item made per access;
:func:`assemble` works out, once, why each file read in full is not resident.

Touched only on the event loop (the states' own contract is :class:`FileState`'s).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass

from ..planning.filetable import FileTable, optional
from .events import Emitter, ErrorReason, EventKind
from .reading import FileState
from .reports import FileResults, ResidencyColumns
from .residency import Probe, explain, unknown_residency

__all__ = ["Ledger", "Verification", "assemble"]


@dataclass(frozen=True)
class Verification:
    """What :func:`~.verify.verify_pass` measured, by the file's index in the pass.

    :ivar residency: residency now of every file opened again (not of stalled ones).
    :ivar bypass: for a file read in full and not resident at all now, what a one-page
        probe found (:func:`~.residency.bypass_probe`).
    """

    residency: ResidencyColumns
    bypass: dict[int, Probe | None]


class Ledger:
    """Per-file outcome of a read pass: live states for files in flight, columns after.

    :param count: chunks the pass reads of file ``index`` (0: not read at all).
    """

    def __init__(self, files: FileTable, method: str, count: Callable[[int], int]) -> None:
        self.files = files
        self.method = method
        self._count = count
        self.live: dict[int, FileState] = {}
        total = len(files)
        self.read_bytes = array("q", [0]) * total
        self.after_read = array("q", [-1]) * total  # resident right after reading; -1: None
        self.methods: dict[int, str] = {}  # where a file fell back from the pass's method
        self.errors: dict[int, str] = {}
        self.stalled: set[int] = set()

    def state(self, index: int) -> FileState:
        """The live state of file ``index``, made when its first chunk is taken."""
        state = self.live.get(index)
        if state is None:
            state = self.live[index] = FileState(self.files[index], self._count(index), self.method)
        return state

    def retire(self, index: int) -> None:
        """Fold a file's state into the columns (its reads are over, or abandoned)."""
        state = self.live.pop(index, None)
        if state is None:
            return
        self.read_bytes[index] = state.read_bytes
        if state.resident_after_read is not None:
            self.after_read[index] = state.resident_after_read
        if state.method != self.method:
            self.methods[index] = state.method
        if state.error is not None:
            self.errors.setdefault(index, state.error)
        if state.stalled:
            self.stalled.add(index)

    def resident_after_read(self, index: int) -> int | None:
        return optional(self.after_read[index])

    def method_of(self, index: int) -> str:
        return self.methods.get(index, self.method)


def assemble(
    ledger: Ledger,
    verification: Verification | None,
    fail: Callable[[int, str, ErrorReason], None],
    emit: Emitter,
) -> FileResults:
    """The report's files once the pass (and its verification) ended: what each file's
    residency is, and why one read in full is not resident (an event each).

    :param fail: records a read error found now (a file changed since it was read).
    """
    files = ledger.files
    if verification is None:
        residency = ResidencyColumns(len(files), "not verified")
        bypass: dict[int, Probe | None] = {}
    else:
        residency, bypass = verification.residency, verification.bypass
    for index in ledger.stalled if verification is not None else ():
        residency.put(
            index,
            unknown_residency(
                files[index], "its read stalled, and opening it again could hang too"
            ),
        )
    causes: dict[int, str] = {}
    errors = ledger.errors
    for index, size in enumerate(files.sizes()):
        stalled = index in ledger.stalled
        if not stalled and residency.changed(index) and index not in errors:
            reason = residency.reason(index)
            if reason is not None:
                fail(index, reason, "changed")
        if index in errors:
            continue
        read_bytes = ledger.read_bytes[index]
        complete = read_bytes >= size
        now = residency.resident_bytes(index)
        cause = None
        if complete and now is not None:
            if now < size:
                cause = explain(
                    files[index],
                    ledger.resident_after_read(index),
                    now,
                    bypass.get(index),
                )
            if cause is None:
                cause = residency.reason(index)  # measured, with a caveat (it grew)
            if cause is not None:
                emit(EventKind.NOT_RESIDENT, files.path(index), cause)
        elif stalled:
            cause = "not read in full: its read did not return before the pass stopped"
        elif not complete:
            cause = "not read: the pass was stopped before this file"
        if cause is not None:
            causes[index] = cause
    return FileResults(ledger, residency, causes)
