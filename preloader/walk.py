"""The directory walk behind :func:`preloader.planner.build_plan`.

Walking touches the filesystem only through ``stat``/``scandir`` (never ``open``), so a
FIFO, a device node or a link to ``/dev/zero`` can be recognised and skipped without ever
being read. What a root's walk found is then handed to :func:`preloader.formats.arrange`.
"""

from __future__ import annotations

import bisect
import errno
import fnmatch
import itertools
import os
import stat
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from . import formats
from .filetable import FileColumns, FileTable
from .formats import Choice, Problem
from .planner import Skipped, printable
from .procfs import mount_types

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


# Kernel and pseudo filesystems hold no model and are never walked: their files change
# size as they are read (sysfs), hold every process's tree (procfs: /proc/*/cwd) or are
# devices (devtmpfs). Matched by the filesystem type in /proc/self/mountinfo.
PSEUDO_FILESYSTEMS = frozenset(
    {
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "cgroup",
        "cgroup2",
        "debugfs",
        "tracefs",
        "securityfs",
        "configfs",
        "pstore",
        "bpf",
        "mqueue",
        "hugetlbfs",
        "fusectl",
        "binfmt_misc",
        "efivarfs",
        "autofs",
        "rpc_pipefs",
        "nsfs",
    }
)


def _hf_blobs(root: str) -> str | None:
    """The ``blobs`` folder of a Hugging Face cache repo when ``root`` lies in one of its
    snapshots (``models--org--name/snapshots/REV/...``), whose files link to ``../../blobs``."""
    parts = root.split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(
            ("models--", "datasets--", "spaces--")
        ):
            return os.sep.join([*parts[:i], "blobs"])
    return None


def _within(path: str, folders: Sequence[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


def _matches(relpath: str, patterns: Sequence[str]) -> bool:
    name = relpath.rsplit("/", 1)[-1]
    for pattern in patterns:
        target = relpath if "/" in pattern else name
        if fnmatch.fnmatchcase(target, pattern.strip("/")):
            return True
    return False


_METADATA_ENDINGS = tuple(METADATA_SUFFIXES)


def _is_metadata(name: str, size: int) -> bool:
    """A metadata file by its base name's suffix and its size."""
    if size > METADATA_MAX_BYTES or not name.lower().endswith(_METADATA_ENDINGS):
        return False  # the usual answer, without splitting the name
    _, suffix = os.path.splitext(name)
    return suffix.lower() in METADATA_SUFFIXES


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device node"
    return "not a regular file"


@dataclass
class _Walk:
    include: Sequence[str]
    exclude: Sequence[str]
    all_formats: bool = False
    # Planned inodes per device: one set of ints per filesystem, not a tuple per file.
    seen_files: dict[int, set[int]] = field(default_factory=dict)
    columns: FileColumns = field(default_factory=FileColumns)
    folders: list[_Folder] = field(default_factory=list)
    seen_dirs: set[tuple[int, int]] = field(default_factory=set)
    skipped: list[Skipped] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # Where a symlink may lead: the roots themselves and a Hugging Face cache's blobs.
    allowed: list[str] = field(default_factory=list)
    pseudo: dict[int, str] = field(default_factory=dict)

    def allow(self, root: str) -> None:
        real = os.path.realpath(root)
        self.allowed.append(real)
        blobs = _hf_blobs(real)
        if blobs is not None:
            self.allowed.append(blobs)

    def outside(self, path: str) -> str | None:
        """The target of a link under a root when it leads outside every root, else None."""
        target = os.path.realpath(path)
        return None if _within(target, self.allowed) else target

    def pseudo_kind(self, st: os.stat_result) -> str | None:
        fstype = self.pseudo.get(st.st_dev)
        return None if fstype is None else f"on {fstype}, a kernel filesystem: not model storage"

    def resolve(self, path: str, is_link: bool) -> os.stat_result | None:
        """stat through links; broken links and loops become skips."""
        try:
            return os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                reason = "symlink loop"
            elif is_link and err.errno == errno.ENOENT:
                reason = "broken symlink"
            elif err.errno == errno.ENOENT:
                reason = "vanished while planning"
            else:
                self.skipped.append(Skipped(path, f"cannot stat: {err.strerror}", error=True))
                return None
            self.skipped.append(Skipped(path, reason))
            return None

    def walk_root(self, root: str) -> Sequence[int]:
        """Walk one root; the column indices of its files in warm order."""
        # lstat, not os.path.lexists: a folder above that may not be searched is an
        # error to report (EACCES), not a root that "does not exist".
        try:
            is_link = stat.S_ISLNK(os.lstat(root).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            self.skipped.append(Skipped(root, "does not exist"))
            return ()
        except OSError as err:
            self.skipped.append(Skipped(root, f"cannot stat: {err.strerror}", error=True))
            return ()
        st = self.resolve(root, is_link)
        if st is None:
            return ()
        regular_or_dir = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
        pseudo = self.pseudo_kind(st) if regular_or_dir else None
        if pseudo is not None:
            self.skipped.append(Skipped(root, pseudo))
            return ()
        if stat.S_ISREG(st.st_mode):
            if not self._wanted(root, "", "", st, filtered=False):
                return ()
            whole = self.columns.add_dir("", "")
            return (self._add(whole, root, st),)
        if stat.S_ISDIR(st.st_mode):
            first = len(self.folders)
            self._walk_dir(root, st)
            tree = _Tree(self.columns, self.folders, first)
            return self._arrange(root, tree.metadata_first(tree.natural_order()), tree)
        self.skipped.append(Skipped(root, _special_kind(st.st_mode)))
        return ()

    def _arrange(self, root: str, order: array[int], tree: _Tree) -> Sequence[int]:
        """Apply the model-format rules (:mod:`preloader.formats`) to one walked root.

        The rules are per folder, so only the folders holding a file they may apply to
        (:func:`formats.may_apply`) are handed to :func:`formats.arrange`, each alone, in
        the order their first file comes; what they skip or reorder is put back in place.

        :param order: the walked files (column indices) in natural order, metadata first.
        """
        columns = self.columns
        ruled = tree.ruled_folders()
        if not ruled:
            return order
        members: dict[int, list[int]] = {}
        dir_of = columns.dir_of
        for position, index in enumerate(order):
            folder = dir_of[index]
            if folder in ruled:
                members.setdefault(folder, []).append(position)
        dropped: list[tuple[int, str]] = []
        for positions in members.values():
            indices = [order[p] for p in positions]
            entries = [
                formats.Entry(columns.relpath(i), columns.sizes[i], bool(columns.metadata[i]))
                for i in indices
            ]
            arrangement = formats.arrange(
                entries,
                load_index=lambda rel: formats.read_safetensors_index(os.path.join(root, rel)),
                exists=lambda rel: os.path.exists(os.path.join(root, rel)),
                all_formats=self.all_formats,
                choose_gguf=not self.include,
            )
            dropped.extend((positions[k], reason) for k, reason in arrangement.skipped)
            # The kept files take the slots the folder's kept files held, in its order.
            slots = [positions[k] for k in sorted(arrangement.order)]
            for slot, k in zip(slots, arrangement.order, strict=True):
                order[slot] = indices[k]
            self._record(root, arrangement)
        if not dropped:
            return order
        dropped.sort()
        gone = set()
        for position, reason in dropped:
            index = order[position]
            gone.add(position)
            self.skipped.append(Skipped(columns.path(index), reason, columns.sizes[index]))
        return array("i", (index for p, index in enumerate(order) if p not in gone))

    def _record(self, root: str, arrangement: formats.Arrangement) -> None:
        for choice in arrangement.choices:
            self.choices.append(
                replace(
                    choice,
                    directory=os.path.join(root, choice.directory) if choice.directory else root,
                    chosen=os.path.join(root, choice.chosen),
                    candidates=tuple(os.path.join(root, c) for c in choice.candidates),
                )
            )
        for problem in arrangement.problems:
            self.problems.append(replace(problem, path=os.path.join(root, problem.path)))

    def _wanted(
        self, path: str, name: str, relpath: str, st: os.stat_result, filtered: bool = True
    ) -> bool:
        """Whether a regular file is planned: filters (unless a root), then duplicates by
        inode."""
        if filtered:
            if self.exclude and _matches(relpath, self.exclude):
                self.skipped.append(Skipped(path, "matched by --exclude", st.st_size))
                return False
            default = formats.default_skip(name, False, self.include)
            if default is not None:
                self.skipped.append(Skipped(path, default, st.st_size))
                return False
            if self.include and not _matches(relpath, self.include):
                self.skipped.append(Skipped(path, "not matched by --include", st.st_size))
                return False
        inodes = self.seen_files.get(st.st_dev)
        if inodes is None:
            inodes = self.seen_files[st.st_dev] = set()
        if st.st_ino in inodes:
            self.skipped.append(Skipped(path, _SAME_FILE))
            return False
        inodes.add(st.st_ino)
        return True

    def _add(self, folder: int, path: str, st: os.stat_result) -> int:
        """A root that is a file, its whole path as its name."""
        size = st.st_size
        metadata = _is_metadata(os.path.basename(path), size)
        return self.columns.add(
            folder, path, size, st.st_dev, st.st_ino, metadata, st.st_blocks * 512
        )

    def _walk_dir(self, root: str, root_st: os.stat_result) -> None:
        self.seen_dirs.add((root_st.st_dev, root_st.st_ino))
        top = _Folder(self.columns.add_dir(_prefix(root), ""))
        self.folders.append(top)
        # An explicit stack, not recursion: a 200-deep tree must not hit Python's limit.
        # The visit order (names sorted plainly, a folder's files before its subfolders)
        # decides which of two links is planned and the order of the skips; the natural
        # warm order is worked out afterwards (_Tree).
        stack: list[tuple[str, str, _Folder]] = [(root, "", top)]
        while stack:
            directory, rel, folder = stack.pop()
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except OSError as err:
                self.skipped.append(Skipped(directory, f"cannot list: {err.strerror}", error=True))
                continue
            subdirs: list[tuple[str, str, _Folder]] = []
            files: list[tuple[str, os.stat_result]] = []
            # The common case, a plain regular file under no filter, takes the short way.
            plain = not self.exclude and not self.include
            pseudo_devices = self.pseudo
            inodes = self.seen_files
            for entry in entries:
                name = entry.name
                try:
                    is_link = entry.is_symlink()
                except OSError:
                    is_link = False
                st = self.resolve(entry.path, is_link)
                if st is None:
                    continue
                regular = stat.S_ISREG(st.st_mode)
                if (
                    regular
                    and plain
                    and not is_link
                    and st.st_dev not in pseudo_devices
                    and not name.lower().endswith(formats.SKIP_SUFFIXES)
                ):
                    seen = inodes.get(st.st_dev)
                    if seen is None:
                        seen = inodes[st.st_dev] = set()
                    if st.st_ino in seen:
                        self.skipped.append(Skipped(entry.path, _SAME_FILE))
                    else:
                        seen.add(st.st_ino)
                        files.append((name, st))
                    continue
                relpath = f"{rel}{name}"
                wanted = stat.S_ISDIR(st.st_mode) or regular
                target = self.outside(entry.path) if is_link and wanted else None
                if target is not None:
                    self.skipped.append(
                        Skipped(
                            entry.path,
                            f"symlink leads outside the roots (to {printable(target)}); "
                            "give the target as a PATH to warm it",
                        )
                    )
                    continue
                pseudo = self.pseudo_kind(st) if wanted else None
                if pseudo is not None:
                    self.skipped.append(Skipped(entry.path, pseudo))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if self.exclude and _matches(relpath, self.exclude):
                        self.skipped.append(Skipped(entry.path, "matched by --exclude"))
                        continue
                    default = formats.default_skip(entry.name, True, self.include)
                    if default is not None:
                        self.skipped.append(Skipped(entry.path, default))
                        continue
                    key = (st.st_dev, st.st_ino)
                    if key in self.seen_dirs:
                        self.skipped.append(
                            Skipped(
                                entry.path, "directory already walked (link loop or bind mount)"
                            )
                        )
                        continue
                    self.seen_dirs.add(key)
                    child = _Folder(self.columns.add_dir(_prefix(entry.path), relpath + "/"))
                    self.folders.append(child)
                    folder.keyed.append((formats.natural_key(entry.name + "/"), child))
                    subdirs.append((entry.path, relpath + "/", child))
                elif regular:
                    if self._wanted(entry.path, name, relpath, st):
                        files.append((name, st))
                else:
                    kind = _special_kind(st.st_mode)
                    self.skipped.append(
                        Skipped(entry.path, f"{kind} behind a symlink" if is_link else kind)
                    )
            del entries
            folder.place(self, files)
            stack.extend(reversed(subdirs))


_SAME_FILE = "same file already planned (link or bind mount)"


def _prefix(directory: str) -> str:
    """What goes before a name to make the path ``os.scandir`` gives its entries."""
    return directory if directory.endswith(os.sep) else directory + os.sep


class _Folder:
    """One walked folder: where its files lie in the columns and where its subfolders
    fall among them in natural order."""

    __slots__ = ("ambiguous", "children", "count", "first", "id", "keyed", "ruled")

    def __init__(self, folder_id: int) -> None:
        self.id = folder_id
        self.first = 0
        self.count = 0
        # (natural key of "name/", folder) while walking
        self.keyed: list[tuple[str, _Folder]] = []
        # (files of this folder before it, folder), in natural order, once placed
        self.children: list[tuple[int, _Folder]] = []
        self.ruled = False  # holds a file a model-format rule may apply to
        self.ambiguous = False  # two subfolders' keys do not settle their order

    def place(self, walk: _Walk, files: list[tuple[str, os.stat_result]]) -> None:
        """Add the folder's planned files to the columns in natural order (a stable sort
        of the plainly sorted names), and place its subfolders among them."""
        natural_key = formats.natural_key
        keyed_files = sorted(((natural_key(name), name, st) for name, st in files), key=_first)
        columns = walk.columns
        self.first = len(columns)
        self.count = len(keyed_files)
        names = [name for _, name, _ in keyed_files]
        columns.extend(
            self.id,
            names,
            [st for _, _, st in keyed_files],
            [_is_metadata(name, st.st_size) for _, name, st in keyed_files],
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


class _Tree:
    """One root's folders, to put its files in natural order without a key per file."""

    def __init__(self, columns: FileColumns, folders: list[_Folder], first: int) -> None:
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
        stack: list[tuple[_Folder, int, int]] = [(self.folders[0], 0, 0)]
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


def walk_roots(
    roots: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    all_formats: bool,
) -> tuple[_Walk, FileTable]:
    """Walk every root (see :func:`preloader.planner.build_plan` for the rules): the walk,
    holding what it skipped, chose and found wrong, and the files in warm order."""
    walk = _Walk(include=include, exclude=exclude, all_formats=all_formats)
    walk.pseudo = {dev: kind for dev, kind in mount_types().items() if kind in PSEUDO_FILESYSTEMS}
    for root in roots:
        walk.allow(root)
    order = array("i")
    for root in roots:
        order.extend(walk.walk_root(root))
    return walk, FileTable(walk.columns, order)
