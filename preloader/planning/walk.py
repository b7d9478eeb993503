"""The directory walk behind :func:`preloader.planning.planner.build_plan`.

Walking touches the filesystem only through ``stat``/``scandir`` (never ``open``), so a
FIFO, a device node or a link to ``/dev/zero`` can be recognised and skipped without ever
being read. What a root's walk found is then handed to :func:`preloader.planning.formats.arrange`.
"""

from __future__ import annotations

import errno
import fnmatch
import operator
import os
import stat
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ..kernel.mounts import refresh_mounts
from ..units import printable
from . import formats
from .filetable import FileColumns, FileTable
from .formats import Choice, Problem
from .specs import Skipped
from .walkorder import Folder, Tree, is_metadata

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
    folders: list[Folder] = field(default_factory=list)
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
            tree = Tree(self.columns, self.folders, first)
            return self._arrange(root, tree.metadata_first(tree.natural_order()), tree)
        self.skipped.append(Skipped(root, _special_kind(st.st_mode)))
        return ()

    def _arrange(self, root: str, order: array[int], tree: Tree) -> Sequence[int]:
        """Apply the model-format rules (:mod:`preloader.planning.formats`) to one walked root.

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
        metadata = is_metadata(os.path.basename(path), size)
        return self.columns.add(
            folder, path, size, st.st_dev, st.st_ino, metadata, st.st_blocks * 512, st.st_mtime_ns
        )

    def _walk_dir(self, root: str, root_st: os.stat_result) -> None:
        self.seen_dirs.add((root_st.st_dev, root_st.st_ino))
        top = Folder(self.columns.add_dir(_prefix(root), ""))
        self.folders.append(top)
        # An explicit stack, not recursion: a 200-deep tree must not hit Python's limit.
        # The visit order (names sorted plainly, a folder's files before its subfolders)
        # decides which of two links is planned and the order of the skips; the natural
        # warm order is worked out afterwards (Tree).
        stack: list[tuple[str, str, Folder]] = [(root, "", top)]
        while stack:
            directory, rel, folder = stack.pop()
            try:
                entries = sorted(os.scandir(directory), key=_NAME)
            except OSError as err:
                self.skipped.append(Skipped(directory, f"cannot list: {err.strerror}", error=True))
                continue
            subdirs: list[tuple[str, str, Folder]] = []
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
                    child = Folder(self.columns.add_dir(_prefix(entry.path), relpath + "/"))
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
            folder.place(self.columns, files)
            stack.extend(reversed(subdirs))


_SAME_FILE = "same file already planned (link or bind mount)"
_NAME = operator.attrgetter("name")


def _prefix(directory: str) -> str:
    """What goes before a name to make the path ``os.scandir`` gives its entries."""
    return directory if directory.endswith(os.sep) else directory + os.sep


def walk_roots(
    roots: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    all_formats: bool,
) -> tuple[_Walk, FileTable]:
    """Walk every root (see :func:`preloader.planning.planner.build_plan` for the rules): the walk,
    holding what it skipped, chose and found wrong, and the files in warm order."""
    walk = _Walk(include=include, exclude=exclude, all_formats=all_formats)
    walk.pseudo = {
        dev: kind for dev, kind in refresh_mounts().items() if kind in PSEUDO_FILESYSTEMS
    }
    for root in roots:
        walk.allow(root)
    order = array("i")
    for root in roots:
        order.extend(walk.walk_root(root))
    return walk, FileTable(walk.columns, order)
