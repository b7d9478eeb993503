"""The planner: which files to warm, in which order, cut into which chunks.

Walking touches the filesystem only through ``stat``/``scandir`` (never ``open``), so a
FIFO, a device node or a link to ``/dev/zero`` can be recognised and skipped without ever
being read. Everything after the walk (filtering, ordering, chunking) is pure.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from . import formats
from .formats import Choice, Problem
from .procfs import mount_types
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
    """

    path: str
    size: int
    dev: int
    ino: int
    metadata: bool = False
    allocated: int | None = None


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


@dataclass(frozen=True)
class Plan:
    """The files to warm, in warm order, and what the walk skipped.

    :ivar choices: folders with several models where one was chosen (GGUF quantisations).
    :ivar problems: an incomplete model (shards an index names but the folder lacks).
    """

    roots: tuple[str, ...]
    files: tuple[FileSpec, ...]
    skipped: tuple[Skipped, ...] = field(default=())
    choices: tuple[Choice, ...] = field(default=())
    problems: tuple[Problem, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


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


def _is_metadata(path: str, size: int) -> bool:
    _, suffix = os.path.splitext(path)
    return suffix.lower() in METADATA_SUFFIXES and size <= METADATA_MAX_BYTES


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device node"
    return "not a regular file"


@dataclass(slots=True)
class _Found:
    """The files one root's walk found: two parallel lists, not a tuple per file (a plan of
    a million files holds them all at once)."""

    relpaths: list[str] = field(default_factory=list)
    specs: list[FileSpec] = field(default_factory=list)

    def in_order(self) -> tuple[list[formats.Entry], list[FileSpec]]:
        """Entries and specs in natural order, metadata first (a stable sort by name, then
        a stable partition), for :func:`formats.arrange`."""
        order = sorted(range(len(self.specs)), key=lambda i: formats.natural_key(self.relpaths[i]))
        specs = self.specs
        order = [i for i in order if specs[i].metadata] + [
            i for i in order if not specs[i].metadata
        ]
        entries = [formats.Entry(self.relpaths[i], specs[i].size, specs[i].metadata) for i in order]
        ordered = [specs[i] for i in order]
        self.relpaths.clear()
        self.specs = ordered
        return entries, ordered


@dataclass
class _Walk:
    include: Sequence[str]
    exclude: Sequence[str]
    all_formats: bool = False
    # Planned inodes per device: one set of ints per filesystem, not a tuple per file.
    seen_files: dict[int, set[int]] = field(default_factory=dict)
    devices: dict[int, int] = field(default_factory=dict)
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

    def walk_root(self, root: str) -> list[FileSpec]:
        found = _Found()
        # lstat, not os.path.lexists: a folder above that may not be searched is an
        # error to report (EACCES), not a root that "does not exist".
        try:
            is_link = stat.S_ISLNK(os.lstat(root).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            self.skipped.append(Skipped(root, "does not exist"))
            return []
        except OSError as err:
            self.skipped.append(Skipped(root, f"cannot stat: {err.strerror}", error=True))
            return []
        st = self.resolve(root, is_link)
        if st is None:
            return []
        regular_or_dir = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
        pseudo = self.pseudo_kind(st) if regular_or_dir else None
        if pseudo is not None:
            self.skipped.append(Skipped(root, pseudo))
            return []
        if stat.S_ISREG(st.st_mode):
            self._add_file(root, os.path.basename(root), st, found, filtered=False)
        elif stat.S_ISDIR(st.st_mode):
            self._walk_dir(root, st, found)
            entries, specs = found.in_order()
            return self._arrange(root, entries, specs)
        else:
            self.skipped.append(Skipped(root, _special_kind(st.st_mode)))
        return found.specs

    def _arrange(
        self, root: str, entries: list[formats.Entry], specs: list[FileSpec]
    ) -> list[FileSpec]:
        """Apply the model-format rules (:mod:`preloader.formats`) to one walked root.

        :param entries: the walked files in natural order, metadata first.
        :param specs: their specs, in the same order.
        """
        arrangement = formats.arrange(
            entries,
            load_index=lambda rel: formats.read_safetensors_index(os.path.join(root, rel)),
            exists=lambda rel: os.path.exists(os.path.join(root, rel)),
            all_formats=self.all_formats,
            choose_gguf=not self.include,
        )
        for index, reason in arrangement.skipped:
            spec = specs[index]
            self.skipped.append(Skipped(spec.path, reason, spec.size))
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
        return [specs[index] for index in arrangement.order]

    def _add_file(
        self,
        path: str,
        relpath: str,
        st: os.stat_result,
        found: _Found,
        filtered: bool = True,
    ) -> None:
        if filtered and self.exclude and _matches(relpath, self.exclude):
            self.skipped.append(Skipped(path, "matched by --exclude", st.st_size))
            return
        default = formats.default_skip(os.path.basename(path), False, self.include)
        if filtered and default is not None:
            self.skipped.append(Skipped(path, default, st.st_size))
            return
        if filtered and self.include and not _matches(relpath, self.include):
            self.skipped.append(Skipped(path, "not matched by --include", st.st_size))
            return
        dev = self.devices.setdefault(st.st_dev, st.st_dev)  # one int object per device
        inodes = self.seen_files.setdefault(dev, set())
        if st.st_ino in inodes:
            self.skipped.append(Skipped(path, "same file already planned (link or bind mount)"))
            return
        inodes.add(st.st_ino)
        spec = FileSpec(
            path,
            st.st_size,
            dev,
            st.st_ino,
            _is_metadata(path, st.st_size),
            st.st_blocks * 512,
        )
        found.relpaths.append(relpath)
        found.specs.append(spec)

    def _walk_dir(self, root: str, root_st: os.stat_result, found: _Found) -> None:
        self.seen_dirs.add((root_st.st_dev, root_st.st_ino))
        # An explicit stack, not recursion: a 200-deep tree must not hit Python's limit.
        stack: list[tuple[str, str]] = [(root, "")]
        while stack:
            directory, rel = stack.pop()
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except OSError as err:
                self.skipped.append(Skipped(directory, f"cannot list: {err.strerror}", error=True))
                continue
            subdirs: list[tuple[str, str]] = []
            for entry in entries:
                relpath = f"{rel}{entry.name}"
                try:
                    is_link = entry.is_symlink()
                except OSError:
                    is_link = False
                st = self.resolve(entry.path, is_link)
                if st is None:
                    continue
                wanted = stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)
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
                    subdirs.append((entry.path, relpath + "/"))
                elif stat.S_ISREG(st.st_mode):
                    self._add_file(entry.path, relpath, st, found)
                else:
                    kind = _special_kind(st.st_mode)
                    self.skipped.append(
                        Skipped(entry.path, f"{kind} behind a symlink" if is_link else kind)
                    )
            stack.extend(reversed(subdirs))


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
    walk = _Walk(include=tuple(include), exclude=tuple(exclude), all_formats=all_formats)
    root_list = tuple(roots)
    walk.pseudo = {dev: kind for dev, kind in mount_types().items() if kind in PSEUDO_FILESYSTEMS}
    for root in root_list:
        walk.allow(root)
    files: list[FileSpec] = []
    for root in root_list:
        files.extend(walk.walk_root(root))
    return Plan(
        roots=root_list,
        files=tuple(files),
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
