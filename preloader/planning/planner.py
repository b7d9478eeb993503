"""The planner: which files to warm, in which order, cut into which chunks.

The plan lives here; its parts are in :mod:`.specs`; the walk that fills it, which
touches the filesystem only through ``stat``/``scandir`` (never ``open``), is
:mod:`.walk`. Everything after the walk (filtering, ordering, chunking) is pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..settings import Selection
from .filetable import FileTable
from .formats import Choice, Problem
from .specs import FileSpec, Skipped
from .walk import walk_roots

__all__ = ["Plan", "build_plan", "plan_selection"]


@dataclass(frozen=True, init=False)
class Plan:
    """The files to warm, in warm order, and what the walk skipped.

    :ivar files: a :class:`~preloader.planning.filetable.FileTable` (columns, a :class:`FileSpec`
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

    Under a directory root the model-format rules of :mod:`preloader.planning.formats` apply:
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
