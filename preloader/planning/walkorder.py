"""The natural warm order of a walked tree, worked out folder by folder.

Sorting a million relative paths by their natural keys would hold a million keys at
once. The walk (:mod:`preloader.planning.walk`) instead adds each folder's files to the columns in
natural order and notes where each subfolder's ``name/`` falls among them (:class:`Folder`);
:class:`Tree` then reads the whole-path order off the folders, one key per folder.
"""

from __future__ import annotations

import bisect
import itertools
import os
from array import array

from . import formats
from .filetable import FileColumns

__all__ = ["METADATA_MAX_BYTES", "METADATA_SUFFIXES", "Folder", "Tree", "is_metadata"]

# Small files a server reads first (config, tokenizer, index): warming them first lets a
# loader that opens them early find them in cache even while shards are still streaming.
METADATA_SUFFIXES = frozenset(
    {
        ".json",
        ".txt",
        ".model",
        ".tiktoken",
        ".py",
        ".md",
        ".yaml",
        ".yml",
        ".jinja",
        ".vocab",
        ".merges",
        ".cfg",
        ".ini",
    }
)
METADATA_MAX_BYTES = 64 * 1024 * 1024

_METADATA_ENDINGS = tuple(METADATA_SUFFIXES)


def is_metadata(name: str, size: int) -> bool:
    """A metadata file by its base name's suffix and its size."""
    if size > METADATA_MAX_BYTES or not name.lower().endswith(_METADATA_ENDINGS):
        return False  # the usual answer, without splitting the name
    _, suffix = os.path.splitext(name)
    return suffix.lower() in METADATA_SUFFIXES


class Folder:
    """One walked folder: where its files lie in the columns and where its subfolders
    fall among them in natural order."""

    __slots__ = ("ambiguous", "children", "count", "first", "id", "keyed", "ruled")

    def __init__(self, folder_id: int) -> None:
        self.id = folder_id
        self.first = 0
        self.count = 0
        # (natural key of "name/", folder) while walking
        self.keyed: list[tuple[str, Folder]] = []
        # (files of this folder before it, folder), in natural order, once placed
        self.children: list[tuple[int, Folder]] = []
        self.ruled = False  # holds a file a model-format rule may apply to
        self.ambiguous = False  # two subfolders' keys do not settle their order

    def place(self, columns: FileColumns, files: list[tuple[str, os.stat_result]]) -> None:
        """Add the folder's planned files to the columns in natural order (a stable sort
        of the plainly sorted names), and place its subfolders among them."""
        natural_key = formats.natural_key
        keyed_files = sorted(((natural_key(name), name, st) for name, st in files), key=_first)
        self.first = len(columns)
        self.count = len(keyed_files)
        names = [name for _, name, _ in keyed_files]
        columns.extend(
            self.id,
            names,
            [st for _, _, st in keyed_files],
            [is_metadata(name, st.st_size) for _, name, st in keyed_files],
        )
        self.ruled = any(map(formats.may_apply, names))
        keyed = sorted(self.keyed, key=_first)
        # A key is the folder's "name/" ending in "/\0": when one without its "\0" starts
        # the next, the paths below them compare on what follows ("01/" and "1/").
        self.ambiguous = any(
            later[0].startswith(earlier[0][:-1]) for earlier, later in itertools.pairwise(keyed)
        )
        keys = [item[0] for item in keyed_files]
        # A file's key never equals a folder's: only the folder's holds the "/".
        self.children = [(bisect.bisect_left(keys, key), child) for key, child in keyed]
        self.keyed = []


def _first(item: tuple[str, object] | tuple[str, object, object]) -> str:
    return item[0]


class Tree:
    """One root's folders, to put its files in natural order without a key per file."""

    def __init__(self, columns: FileColumns, folders: list[Folder], first: int) -> None:
        self.columns = columns
        self.folders = folders[first:]

    def ruled_folders(self) -> set[int]:
        return {folder.id for folder in self.folders if folder.ruled}

    def natural_order(self) -> array[int]:
        """Column indices in the order of a natural sort of the relative paths.

        Folder by folder: a folder's files are in the columns in natural order already,
        and each subfolder's files come where the subfolder's ``name/`` sorts among them
        (comparing ``a/b`` with ``a-c`` is comparing ``a/`` with ``a-c``: the paths agree
        up to the ``/``). Where two sibling folders' keys do not settle it (``01/`` and
        ``1/`` compare equal), the paths are sorted whole, one key each, as they interleave.
        """
        order = array("i")
        if not self.folders:
            return order
        if any(folder.ambiguous for folder in self.folders):
            return self._sorted_whole()
        # (folder, its files emitted so far, its children entered so far)
        stack: list[tuple[Folder, int, int]] = [(self.folders[0], 0, 0)]
        while stack:
            folder, done, entered = stack.pop()
            if entered < len(folder.children):
                before, child = folder.children[entered]
                order.extend(range(folder.first + done, folder.first + before))
                stack.append((folder, max(done, before), entered + 1))
                stack.append((child, 0, 0))
            else:
                order.extend(range(folder.first + done, folder.first + folder.count))
        return order

    def _sorted_whole(self) -> array[int]:
        columns = self.columns
        indices = [
            i for folder in self.folders for i in range(folder.first, folder.first + folder.count)
        ]
        indices.sort()  # the visit order: a stable sort keeps it among equal keys
        indices.sort(key=lambda i: formats.natural_key(columns.relpath(i)))
        return array("i", indices)

    def metadata_first(self, order: array[int]) -> array[int]:
        """``order`` with the metadata files first (a stable partition)."""
        metadata = self.columns.metadata
        first = array("i", (i for i in order if metadata[i]))
        first.extend(i for i in order if not metadata[i])
        return first
