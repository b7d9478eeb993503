"""Shared fixtures: real files, the real page cache, the real CLI.

Tests evict only their own files (POSIX_FADV_DONTNEED), never the whole cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings

from preloader.cli.demomodel import write_demo_model
from preloader.kernel import pagecache

from .fusefs import FuseMount

if TYPE_CHECKING:
    from ._serve import Served

# No timing thresholds in tests: hypothesis's per-example deadline (200 ms) fails
# properties at random on a loaded, shared machine.
settings.register_profile("preloader", deadline=None)
settings.load_profile("preloader")

NOBODY = 65534
AS_USER = str(Path(__file__).with_name("_as_user.py"))
# Child processes import this checkout's preloader, even where another checkout is
# pip-installed in editable mode (several worktrees share one interpreter here).
REPO = str(Path(__file__).resolve().parent.parent)


def evict_tree(root: str | os.PathLike[str]) -> None:
    """Drop the page cache of every regular file under root (as vmtouch -e does)."""
    for path in _files(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            pagecache.evict(fd)
        finally:
            os.close(fd)


def _files(root: str | os.PathLike[str]) -> list[str]:
    root = os.fspath(root)
    if os.path.isfile(root):
        return [root]
    return [
        os.path.join(d, f)
        for d, _, names in os.walk(root)
        for f in names
        if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))
    ]


def vmtouch_resident(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(resident pages, total pages) as vmtouch reports them: the outside witness."""
    out = subprocess.run(
        ["vmtouch", "-f", os.fspath(path)], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Resident Pages:\s+(\d+)/(\d+)", out)
    assert match, out
    return int(match.group(1)), int(match.group(2))


def fincore_resident_bytes(*paths: str | os.PathLike[str]) -> int:
    """Resident bytes of the given files together, by util-linux fincore."""
    if shutil.which("fincore") is None:
        pytest.skip("fincore (util-linux) not installed")
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(os.fspath, paths)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(line) for line in out.split())


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    user: int | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``preloader`` CLI in a new process (as another uid when asked)."""
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith("PRELOADER_") and k != "MODEL_DIR"
    }
    base_env["PRELOADER_LOG_FORMAT"] = "json"
    base_env["PYTHONPATH"] = REPO
    base_env.update(env or {})
    if user is None:
        cmd = [sys.executable, "-m", "preloader", *args]
    else:
        cmd = [sys.executable, AS_USER, str(user), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=base_env, check=check, timeout=120
    )


DAMON_STATES = "/sys/kernel/mm/damon/admin/kdamonds"


@pytest.fixture(scope="session", autouse=True)
def _pause_proactive_reclaim() -> Iterator[None]:
    """Pause DAMON proactive reclaim for the test session, where it runs.

    Some VMs (this project's CI among them) run a DAMON ``pageout`` scheme that pages out
    physical regions idle for a minute, at up to 128 MiB/s, and freshly cached pages that
    land in such a region go with it. Residency assertions must test preloader, not the
    VM's reclaimer, so the session stops kdamonds it can (root) and restarts them after.
    The benchmark leaves it running and reports residency as it is.
    """
    paused: list[str] = []
    if os.path.isdir(DAMON_STATES) and os.access(DAMON_STATES, os.W_OK):
        for name in sorted(os.listdir(DAMON_STATES)):
            state = os.path.join(DAMON_STATES, name, "state")
            try:
                with open(state) as handle:
                    if handle.read().strip() != "on":
                        continue
                with open(state, "w") as handle:
                    handle.write("off")
                paused.append(state)
            except OSError:
                continue
    try:
        yield
    finally:
        for state in paused:
            with open(state, "w") as handle:
                handle.write("on")


needs_vmtouch = pytest.mark.skipif(shutil.which("vmtouch") is None, reason="vmtouch not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A scratch folder on disk (not tmpfs) that other uids may traverse."""
    path = Path(tempfile.mkdtemp(prefix="preloader-test-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def model_dir(shared_tmp: Path) -> Path:
    """A small sharded safetensors model (4 shards, ~8 MiB), evicted from the cache."""
    root = shared_tmp / "model"
    write_demo_model(str(root), 8 * 1024 * 1024, shards=4)
    evict_tree(root)
    return root


@pytest.fixture
def big_file(shared_tmp: Path) -> Path:
    """One 24 MiB file (several chunks at 4 MiB), evicted."""
    path = shared_tmp / "model.gguf"
    with open(path, "wb") as handle:
        handle.write(os.urandom(24 * 1024 * 1024 + 123))
        handle.flush()
        os.fsync(handle.fileno())
    evict_tree(path)
    return path


# ------------------------------------------------------------ reliability matrix helpers


def tree_snapshot(root: str | os.PathLike[str]) -> dict[bytes, tuple[object, ...]]:
    """Everything preloader must never change under root: for each entry (names as bytes,
    links not followed) its type and mode, size, mtime and ctime, a SHA-256 of a regular
    file's contents and a link's target. FIFOs, sockets and devices are only lstat'ed."""
    top = os.fsencode(root)
    snapshot: dict[bytes, tuple[object, ...]] = {}
    for directory, dirnames, filenames in os.walk(top, followlinks=False):
        for name in [*dirnames, *filenames]:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256()
                with open(path, "rb") as handle:
                    for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                        digest.update(block)
                extra = digest.hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            snapshot[os.path.relpath(path, top)] = (
                st.st_mode,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                extra,
            )
    return snapshot


@pytest.fixture
def unchanged() -> Iterator[Callable[[Path], Path]]:
    """``unchanged(root)`` snapshots a tree; the test fails if it differs at teardown."""
    watched: list[tuple[Path, dict[bytes, tuple[object, ...]]]] = []

    def watch(root: Path) -> Path:
        watched.append((root, tree_snapshot(root)))
        return root

    yield watch
    for root, before in watched:
        after = tree_snapshot(root)
        assert after == before, f"{root} changed: {set(before) ^ set(after) or 'metadata'}"


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment run_cli uses: no PRELOADER_* or MODEL_DIR leaking in, JSON logs."""
    base = {
        k: v for k, v in os.environ.items() if not k.startswith("PRELOADER_") and k != "MODEL_DIR"
    }
    base["PRELOADER_LOG_FORMAT"] = "json"
    base["PYTHONPATH"] = REPO
    base.update(env or {})
    return base


class CliProcess:
    """The real CLI running in the background, its JSON log lines collected as they come.

    Tests synchronise on log lines (:meth:`wait_for`), never on sleeps; every wait is
    bounded, so a hang fails the test instead of stalling the run.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "preloader", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(env),
        )
        self.stderr_lines: list[str] = []
        self.stdout_text = ""
        self._stderr_closed = False
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.stderr_lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._stderr_closed = True
            self._changed.notify_all()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        self.stdout_text = self.proc.stdout.read()

    @property
    def logs(self) -> list[dict[str, Any]]:
        with self._changed:
            return [json.loads(line) for line in self.stderr_lines if line.startswith("{")]

    def wait_for(self, *events: str, timeout: float = 60) -> dict[str, Any]:
        """Block until a log line with one of these ``event`` values appears; return it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.stderr_lines:
                    if line.startswith("{") and json.loads(line).get("event") in events:
                        return dict(json.loads(line))
                left = deadline - time.monotonic()
                if left <= 0 or self._stderr_closed:
                    raise AssertionError(f"no {events} log line: {self.stderr_lines}")
                self._changed.wait(left)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        """Wait for the exit; return the exit code and stdout."""
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=timeout)
        return code, self.stdout_text

    def close(self) -> None:
        """Kill the process if it still runs (a failed test), and release its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        finally:
            for reader in self._readers:
                reader.join(timeout=30)
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()


@pytest.fixture
def start_cli() -> Iterator[Callable[..., CliProcess]]:
    """Start the CLI in the background; whatever the test does, it is killed at the end."""
    started: list[CliProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> CliProcess:
        process = CliProcess(*args, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


needs_fuse = pytest.mark.skipif(
    not (os.path.exists("/dev/fuse") and shutil.which("fusermount3") and os.geteuid() == 0),
    reason="needs /dev/fuse, fusermount3 and root",
)


@pytest.fixture
def fuse_fs(
    shared_tmp: Path, start_cli: Callable[..., CliProcess]
) -> Iterator[Callable[..., FuseMount]]:
    """``fuse_fs(spec)`` mounts a failing FUSE filesystem (see tests/fusefs.py).

    Every mount is unmounted (lazily, when a read still hangs in it) and its process
    killed at teardown, even when the test failed half-way. It tears down before
    ``start_cli`` (hence the dependency): a CLI thread stuck in a request the filesystem
    never answers is released only when the filesystem goes.
    """
    mounts: list[FuseMount] = []

    def mount(spec: dict[str, Any], name: str = "mnt") -> FuseMount:
        fs = FuseMount(shared_tmp / name, spec)
        mounts.append(fs)
        return fs.__enter__()

    try:
        yield mount
    finally:
        for fs in reversed(mounts):
            fs.__exit__(None, None, None)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        help="also run tests marked slow (the 100,000-file measurement)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


CGROUP_V1_MEMORY = "/sys/fs/cgroup/memory"
CGROUP_V2 = "/sys/fs/cgroup"


def _make_memory_cgroup(limit: int) -> tuple[str, int]:
    """Create a memory cgroup limited to ``limit`` bytes; return (directory, version)."""
    name = f"preloader-test-{os.getpid()}-{os.urandom(4).hex()}"
    if os.path.isfile(os.path.join(CGROUP_V1_MEMORY, "memory.limit_in_bytes")):
        path = os.path.join(CGROUP_V1_MEMORY, name)
        os.mkdir(path)
        limit_file, version = "memory.limit_in_bytes", 1
    else:
        try:
            with open(os.path.join(CGROUP_V2, "cgroup.subtree_control")) as handle:
                enabled = handle.read().split()
        except OSError:
            enabled = []
        if "memory" not in enabled:
            raise OSError("no cgroup v1 memory hierarchy and no v2 memory controller")
        path = os.path.join(CGROUP_V2, name)
        os.mkdir(path)
        limit_file, version = "memory.max", 2
    try:
        with open(os.path.join(path, limit_file), "w") as handle:
            handle.write(str(limit))
    except OSError:
        os.rmdir(path)
        raise
    return path, version


@pytest.fixture
def memory_cgroup() -> Iterator[Callable[[int], tuple[str, int]]]:
    """Make real memory cgroups (``make(limit) -> (directory, version)``), removed after.

    Skips, saying why, where cgroups cannot be made (not root, no memory controller).
    """
    made: list[str] = []

    def make(limit: int) -> tuple[str, int]:
        if os.geteuid() != 0:
            pytest.skip("making a memory cgroup needs root")
        try:
            path, version = _make_memory_cgroup(limit)
        except OSError as err:
            pytest.skip(f"cannot make a memory cgroup here: {err}")
        made.append(path)
        return path, version

    yield make
    for path in made:
        # The children have exited (subprocess.run waited); their page cache is moved to
        # the parent on removal.
        os.rmdir(path)


def run_cli_in_cgroup(
    cgroup: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a process that first moves itself into ``cgroup``."""
    wrapper = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith("PRELOADER_") and k != "MODEL_DIR"
    }
    base_env["PRELOADER_LOG_FORMAT"] = "json"
    base_env["PYTHONPATH"] = REPO
    base_env.update(env or {})
    return subprocess.run(
        ["sh", "-c", wrapper, cgroup, sys.executable, "-m", "preloader", *args],
        capture_output=True,
        text=True,
        env=base_env,
        timeout=120,
    )


@pytest.fixture
def served() -> Iterator[list[Served]]:
    """Servers a test starts (see ``tests._serve.track``); killed afterwards if left running."""
    started: list[Served] = []
    yield started
    for server in started:
        server.kill()
