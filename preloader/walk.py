"""The directory walk behind :func:`preloader.planner.build_plan`.

Walking touches the filesystem only through ``stat``/``scandir`` (never ``open``), so a
FIFO, a device node or a link to ``/dev/zero`` can be recognised and skipped without ever
being read. What a root's walk found is then handed to :func:`preloader.formats.arrange`.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from . import formats
from .formats import Choice, Problem
from .planner import FileSpec, Skipped, printable
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


def walk_roots(
    roots: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    all_formats: bool,
) -> tuple[_Walk, list[FileSpec]]:
    """Walk every root (see :func:`preloader.planner.build_plan` for the rules): the walk,
    holding what it skipped, chose and found wrong, and the files in warm order."""
    walk = _Walk(include=include, exclude=exclude, all_formats=all_formats)
    walk.pseudo = {dev: kind for dev, kind in mount_types().items() if kind in PSEUDO_FILESYSTEMS}
    for root in roots:
        walk.allow(root)
    files: list[FileSpec] = []
    for root in roots:
        files.extend(walk.walk_root(root))
    return walk, files
