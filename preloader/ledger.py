"""What a read pass did to each planned file, kept as columns, and the report's files.

The engine needs a :class:`~preloader.reading.FileState` (descriptor, chunks in flight)
only while a file is being read: :class:`Ledger` makes one when a file's first chunk is
taken and folds it into arrays when the file is done, so a pass over a million files
holds a few states and a handful of arrays. :class:`~preloader.reports.FileResults`
shows the outcome as the report's ``Sequence[FileResult]``, an item made per access.

Touched only on the event loop (the states' own contract is :class:`FileState`'s).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from .filetable import FileTable
from .reading import FileState

__all__ = ["Ledger"]


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
        value = self.after_read[index]
        return None if value < 0 else value

    def method_of(self, index: int) -> str:
        return self.methods.get(index, self.method)
