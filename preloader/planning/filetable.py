"""The plan's files as columns: arrays of sizes, inodes and interned path parts.

A plan of a million files must not hold a million objects: :class:`FileColumns` keeps one
array entry per file and column (size, device, inode, allocated bytes, a metadata flag,
the folder) and the base names as one byte string, with a table of folders for the rest
of each path. :class:`FileTable` is a read-only view of some of those files in an order
of its own (the warm order); it is a ``Sequence[FileSpec]`` whose items are made on
access, so a consumer that needs a :class:`FileSpec` gets one, and a hot loop reads the
columns (:meth:`FileTable.size`, :meth:`FileTable.path`, :meth:`FileTable.sizes`).
"""

from __future__ import annotations

import functools
import os
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, overload

if TYPE_CHECKING:
    from .specs import FileSpec

__all__ = ["FileColumns", "FileTable", "optional"]

# os.fsencode/os.fsdecode, without their per-call overhead (a million names).
_ENCODING = sys.getfilesystemencoding()
_ERRORS = sys.getfilesystemencodeerrors()


NO_MTIME = -(2**63)
"""The ``mtimes`` column's value for a file whose modification time is not known."""


def _mtime(value: int) -> int | None:
    return None if value == NO_MTIME else value


def optional(value: int) -> int | None:
    """A column's value, where a negative one stands for ``None``."""
    return None if value < 0 else value


@functools.cache
def _spec_type() -> type[FileSpec]:
    """:class:`FileSpec`, imported once, on first use (the planner imports this module)."""
    from .specs import FileSpec

    return FileSpec


class FileColumns:
    """Append-only columns of walked files; the walk adds, a :class:`FileTable` reads.

    :ivar prefixes: per folder, what goes before a base name to make the path (``""`` for
        files added with their whole path as the name).
    :ivar rels: per folder, the prefix of its files' paths relative to their root.
    """

    __slots__ = (
        "allocated",
        "devs",
        "dir_of",
        "inos",
        "metadata",
        "mtimes",
        "name_ends",
        "names",
        "prefixes",
        "rels",
        "sizes",
    )

    def __init__(self) -> None:
        self.prefixes: list[str] = []
        self.rels: list[str] = []
        self.dir_of = array("i")
        self.names = bytearray()
        self.name_ends = array("q")
        self.sizes = array("q")
        self.devs = array("q")
        self.inos = array("Q")
        self.allocated = array("q")  # -1: not known
        self.metadata = bytearray()
        self.mtimes = array("q")  # NO_MTIME: not known

    def __len__(self) -> int:
        return len(self.sizes)

    def add_dir(self, prefix: str, rel: str) -> int:
        """A folder whose files are ``prefix + name``; its id."""
        self.prefixes.append(prefix)
        self.rels.append(rel)
        return len(self.prefixes) - 1

    def add(
        self,
        folder: int,
        name: str,
        size: int,
        dev: int,
        ino: int,
        metadata: bool,
        allocated: int | None,
        mtime_ns: int | None = None,
    ) -> int:
        """One file; its index in the columns."""
        self.dir_of.append(folder)
        self.names += name.encode(_ENCODING, _ERRORS)
        self.name_ends.append(len(self.names))
        self.sizes.append(size)
        self.devs.append(dev)
        self.inos.append(ino)
        self.allocated.append(-1 if allocated is None else allocated)
        self.metadata.append(metadata)
        self.mtimes.append(NO_MTIME if mtime_ns is None else mtime_ns)
        return len(self.sizes) - 1

    def extend(
        self,
        folder: int,
        names: Sequence[str],
        stats: Sequence[os.stat_result],
        metadata: Sequence[bool],
    ) -> None:
        """Files of one folder from their ``stat`` results, in the given order."""
        self.dir_of.extend([folder] * len(names))
        blob, ends = self.names, self.name_ends
        for name in names:
            blob += name.encode(_ENCODING, _ERRORS)
            ends.append(len(blob))
        self.sizes.extend([st.st_size for st in stats])
        self.devs.extend([st.st_dev for st in stats])
        self.inos.extend([st.st_ino for st in stats])
        self.allocated.extend([st.st_blocks * 512 for st in stats])
        self.metadata.extend(metadata)
        self.mtimes.extend([st.st_mtime_ns for st in stats])

    def name(self, index: int) -> str:
        start = self.name_ends[index - 1] if index else 0
        return self.names[start : self.name_ends[index]].decode(_ENCODING, _ERRORS)

    def path(self, index: int) -> str:
        return self.prefixes[self.dir_of[index]] + self.name(index)

    def relpath(self, index: int) -> str:
        """The path relative to its root, ``/``-separated."""
        return self.rels[self.dir_of[index]] + self.name(index)

    def spec(self, index: int) -> FileSpec:
        # specs() for one file, without a generator: the engine makes one per file read.
        start = self.name_ends[index - 1] if index else 0
        return _spec_type()(
            self.prefixes[self.dir_of[index]]
            + self.names[start : self.name_ends[index]].decode(_ENCODING, _ERRORS),
            self.sizes[index],
            self.devs[index],
            self.inos[index],
            self.metadata[index] == 1,
            optional(self.allocated[index]),
            _mtime(self.mtimes[index]),
        )

    def specs(self, indices: Iterable[int]) -> Iterator[FileSpec]:
        """The files at ``indices``, each a fresh :class:`FileSpec`."""
        make = _spec_type()
        names, ends, prefixes, dir_of = self.names, self.name_ends, self.prefixes, self.dir_of
        sizes, devs, inos, allocated, metadata, mtimes = (
            self.sizes,
            self.devs,
            self.inos,
            self.allocated,
            self.metadata,
            self.mtimes,
        )
        for i in indices:
            start = ends[i - 1] if i else 0
            yield make(
                prefixes[dir_of[i]] + names[start : ends[i]].decode(_ENCODING, _ERRORS),
                sizes[i],
                devs[i],
                inos[i],
                metadata[i] == 1,
                optional(allocated[i]),
                _mtime(mtimes[i]),
            )

    @classmethod
    def of(cls, specs: Iterable[FileSpec]) -> FileColumns:
        """Columns holding ``specs`` (each name is its whole path), in their order."""
        columns = cls()
        whole = columns.add_dir("", "")
        for spec in specs:
            columns.add(
                whole,
                spec.path,
                spec.size,
                spec.dev,
                spec.ino,
                spec.metadata,
                spec.allocated,
                spec.mtime_ns,
            )
        return columns


class FileTable(Sequence["FileSpec"]):
    """Some of a :class:`FileColumns`' files, in an order: the plan's ``files``.

    Indexing gives a :class:`FileSpec` made on access; two tables (or a table and any
    sequence of specs) are equal when they hold equal specs in the same order.
    """

    __slots__ = ("_columns", "_order", "_total")

    def __init__(self, columns: FileColumns, order: Sequence[int] | None = None) -> None:
        self._columns = columns
        # None: every file of the columns, in column order.
        self._order = order
        self._total: int | None = None  # total_bytes, once asked

    @classmethod
    def of(cls, specs: Iterable[FileSpec]) -> FileTable:
        if isinstance(specs, FileTable):
            return specs
        return cls(FileColumns.of(specs))

    def __len__(self) -> int:
        return len(self._columns) if self._order is None else len(self._order)

    def _at(self, index: int) -> int:
        """The column index of the file at ``index``."""
        return index if self._order is None else self._order[index]

    @overload
    def __getitem__(self, index: int) -> FileSpec: ...
    @overload
    def __getitem__(self, index: slice) -> FileTable: ...
    def __getitem__(self, index: int | slice) -> FileSpec | FileTable:
        if isinstance(index, slice):
            return self.select(range(len(self))[index])
        count = len(self)
        if not -count <= index < count:
            raise IndexError("file index out of range")
        if index < 0:
            index += count
        return self._columns.spec(index if self._order is None else self._order[index])

    def __iter__(self) -> Iterator[FileSpec]:
        order = range(len(self._columns)) if self._order is None else self._order
        return self._columns.specs(order)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # equal to other sequences: not hashable

    def __repr__(self) -> str:
        return f"FileTable({len(self)} files)"

    def select(self, indices: Iterable[int]) -> FileTable:
        """The files at ``indices`` (positions in this table), in that order."""
        return FileTable(self._columns, array("i", (self._at(i) for i in indices)))

    def size(self, index: int) -> int:
        return self._columns.sizes[self._at(index)]

    def sizer(self) -> Callable[[int], int]:
        """``size`` as one call per file: for loops that ask every file's size."""
        sizes, order = self._columns.sizes, self._order
        if order is None:
            return sizes.__getitem__
        return lambda index: sizes[order[index]]

    def identity(self, index: int) -> tuple[str, int, int, int, int | None]:
        """``(path, size, dev, ino, mtime_ns)`` of the file at ``index``, without making a
        spec."""
        columns = self._columns
        at = self._at(index)
        return (
            columns.path(at),
            columns.sizes[at],
            columns.devs[at],
            columns.inos[at],
            _mtime(columns.mtimes[at]),
        )

    def path(self, index: int) -> str:
        return self._columns.path(self._at(index))

    def sizes(self) -> Iterator[int]:
        """Every file's size, in order, without making specs."""
        sizes = self._columns.sizes
        return iter(sizes) if self._order is None else map(sizes.__getitem__, self._order)

    def devices(self) -> set[int]:
        """The ``st_dev`` of every file, without making specs."""
        devs = self._columns.devs
        return set(devs) if self._order is None else set(map(devs.__getitem__, self._order))

    def paths(self) -> Iterator[str]:
        path = self._columns.path
        order = range(len(self._columns)) if self._order is None else self._order
        return map(path, order)

    @property
    def total_bytes(self) -> int:
        # The columns do not change once a table holds them (the walk is over).
        if self._total is None:
            self._total = sum(self.sizes())
        return self._total
