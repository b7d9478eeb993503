"""The planner: which files to warm, in which order, cut into which chunks.

The plan's types live here; the walk that fills them, which touches the filesystem only
through ``stat``/``scandir`` (never ``open``), is :mod:`preloader.walk`. Everything after
the walk (filtering, ordering, chunking) is pure.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .filetable import FileTable
from .formats import Choice, Problem
from .settings import Selection

__all__ = [
    "Chunk",
    "FileSpec",
    "Plan",
    "Skipped",
    "build_plan",
    "chunk_count",
    "iter_chunks",
    "plan_selection",
    "printable",
    "sparse_note",
]


@dataclass(frozen=True, slots=True)
class FileSpec:
    """One regular file to warm.

    :ivar path: the path to open (as walked; may pass through symlinks).
    :ivar size: bytes at planning time.
    :ivar dev: device of the file the path resolved to.
    :ivar ino: inode of that file; ``(dev, ino)`` identifies it across links and mounts.
    :ivar metadata: a small config/tokenizer/index file, warmed before weights.
    :ivar allocated: bytes the file occupies on its filesystem (``st_blocks`` x 512);
        far below :attr:`size` for a sparse file. ``None`` when not known.
    :ivar mtime_ns: ``st_mtime_ns`` at planning time, ``None`` when not known: with
        ``dev`` and ``ino``, what :func:`preloader.identity.is_planned` compares.
    """

    path: str
    size: int
    dev: int
    ino: int
    metadata: bool = False
    allocated: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class Skipped:
    """A path the plan will not read, and why (with its size, when it is a file).

    :ivar error: the walk failed here (a folder that cannot be listed, a path that cannot
        be stat'ed): what lies below was not read, which is a read error, not a choice.
    """

    path: str
    reason: str
    size: int | None = None
    error: bool = False


@dataclass(frozen=True, slots=True)
class Chunk:
    """A byte range of one planned file.

    :ivar file_index: index into :attr:`Plan.files`.
    :ivar index: position of this chunk within its file (0-based).
    """

    file_index: int
    index: int
    offset: int
    length: int


@dataclass(frozen=True, init=False)
class Plan:
    """The files to warm, in warm order, and what the walk skipped.

    :ivar files: a :class:`~preloader.filetable.FileTable` (columns, a :class:`FileSpec`
        made per access); any iterable of specs given is stored as one.

    :ivar choices: folders with several models where one was chosen (GGUF quantisations).
    :ivar problems: an incomplete model (shards an index names but the folder lacks).
    """

    roots: tuple[str, ...]
    files: FileTable
    skipped: tuple[Skipped, ...] = field(default=())
    choices: tuple[Choice, ...] = field(default=())
    problems: tuple[Problem, ...] = field(default=())

    def __init__(
        self,
        roots: tuple[str, ...],
        files: Iterable[FileSpec],
        skipped: tuple[Skipped, ...] = (),
        choices: tuple[Choice, ...] = (),
        problems: tuple[Problem, ...] = (),
    ) -> None:
        # Any specs are kept as columns (a tuple of FileSpec costs an object per file).
        object.__setattr__(self, "roots", roots)
        object.__setattr__(self, "files", FileTable.of(files))
        object.__setattr__(self, "skipped", skipped)
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "problems", problems)

    @property
    def total_bytes(self) -> int:
        return self.files.total_bytes


def printable(path: str) -> str:
    """A path safe to put on one line of a log or a terminal.

    Undecodable bytes come out as ``\\xNN`` and control characters (a newline in a file
    name) as escapes, so one path is always one line.
    """
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


SPARSE_MIN_HOLE = 64 * 1024 * 1024


def sparse_note(spec: FileSpec) -> str | None:
    """A warning for a sparse file (allocated far below its apparent size), else ``None``.

    Holes are read like any other byte (a loader reads them too, as zeros), so the page
    cache and the memory budget count the apparent size: a 1 TiB sparse file is trimmed
    to the budget, never read whole. Filesystems that report no blocks at all (some FUSE
    clients) are not called sparse.
    """
    allocated = spec.allocated
    if not allocated or spec.size - allocated < max(SPARSE_MIN_HOLE, spec.size // 2):
        return None
    return (
        f"sparse: {spec.size} bytes apparent, {allocated} allocated; the holes read as "
        "zeros and take page cache like data (the memory budget counts the apparent size)"
    )


def build_plan(
    roots: Iterable[str],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    all_formats: bool = False,
) -> Plan:
    """Walk ``roots`` and return the warm plan.

    Regular files only. Symlinks are followed when they lead to a place within a root (or,
    for a root inside a Hugging Face cache snapshot, to that repo's ``blobs/``); a link
    leading anywhere else is skipped, so nothing outside the roots is read. Kernel
    filesystems (procfs, sysfs, devtmpfs, cgroupfs, ...: :data:`PSEUDO_FILESYSTEMS`) are
    never entered. A file reached twice (two links, two roots, a bind mount) is planned
    once, keyed by ``(st_dev, st_ino)``. FIFOs, sockets, device
    nodes (also behind links), broken links and link loops are skipped with a reason and
    never opened. Per root, metadata files come first, then the rest in natural order,
    so shards are read front to back; a safetensors index orders the shards it names.

    Under a directory root the model-format rules of :mod:`preloader.formats` apply:
    ``.git/``, ``.cache/``, ``.huggingface/``, ``original/`` and lock or partial-download
    files are skipped unless an include glob names them; PyTorch pickles beside
    safetensors, safetensors an index does not name, and all GGUF models but one (when
    no include glob chose) are skipped unless ``all_formats``; an index or split set that
    names missing files is recorded in :attr:`Plan.problems`.

    :param roots: files or directories.
    :param include: globs; when given, a file must match one. A glob without ``/``
        matches the file name, one with ``/`` the path relative to its root.
    :param exclude: globs; a matching file or directory is skipped.
    :param all_formats: warm every format and every GGUF model (see above).
    :return: the plan. Roots that do not exist appear in :attr:`Plan.skipped`.
    """
    # The walk imports this module's types: imported here, not at the top.
    from .walk import walk_roots

    root_list = tuple(roots)
    walk, files = walk_roots(root_list, tuple(include), tuple(exclude), all_formats)
    return Plan(
        roots=root_list,
        files=files,
        skipped=tuple(walk.skipped),
        choices=tuple(walk.choices),
        problems=tuple(walk.problems),
    )


def plan_selection(selection: Selection) -> Plan:
    """:func:`build_plan` over a front end's :class:`~preloader.settings.Selection`."""
    return build_plan(selection.paths, selection.include, selection.exclude, selection.all_formats)


def chunk_count(size: int, chunk_size: int) -> int:
    """Chunks a file of ``size`` bytes is cut into; an empty file still has one."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    return max(1, -(-size // chunk_size))


def iter_chunks(files: Sequence[FileSpec], chunk_size: int) -> Iterator[Chunk]:
    """Every byte range of every file, exactly once, in plan order.

    The engine cuts files the same way; which worker reads which chunk when is
    :mod:`preloader.schedule`'s business.
    """
    for file_index, spec in enumerate(files):
        for index in range(chunk_count(spec.size, chunk_size)):
            offset = index * chunk_size
            yield Chunk(file_index, index, offset, max(0, min(chunk_size, spec.size - offset)))
