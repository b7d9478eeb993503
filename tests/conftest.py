"""Shared fixtures and the rules of the suite: real files, the real page cache, the real CLI.

The folder a test module sits in says what it touches, and marks its tests so (``-m``
selects them): ``unit`` (pure logic: no process, no mount, no socket; tests/unit/conftest.py
refuses them), ``kernel`` (real page cache, syscalls, vmtouch and fincore), ``fuse`` (FUSE
mounts, s3fs), ``serve`` (the HTTP server, the agent, Prometheus metrics), ``cli`` (the CLI
in child processes), ``deploy`` (manifests, the kube stand-in), ``packaging`` (Dockerfile,
zipapp, the quick start) and ``bench`` (the benchmark suite at toy sizes). A test anywhere
that mounts FUSE (the ``fuse_fs`` fixture, ``needs_fuse``) is marked ``fuse`` too, and every
``fuse`` test is skipped, saying why, where FUSE cannot be mounted. Shared helpers are in
tests/lib/.

Tests evict only their own files (POSIX_FADV_DONTNEED), never the whole cache.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings

from preloader.cli.demomodel import write_demo_model

from .lib.cli import CliProcess
from .lib.fusefs import FuseMount
from .lib.marks import FUSE_MISSING
from .lib.residency import evict_tree
from .lib.trees import tree_snapshot

if TYPE_CHECKING:
    from .lib.serve import Served

# No timing thresholds in tests: hypothesis's per-example deadline (200 ms) fails
# properties at random on a loaded, shared machine.
settings.register_profile("preloader", deadline=None)
settings.load_profile("preloader")

TESTS = Path(__file__).resolve().parent
# Each folder's marker (registered in pyproject.toml, as --strict-markers wants).
KINDS = ("unit", "kernel", "fuse", "serve", "cli", "deploy", "packaging", "bench")


@pytest.fixture
def anyio_backend() -> str:
    """The async tests run on asyncio, as preloader does (anyio's pytest plugin)."""
    return "asyncio"


DAMON_STATES = "/sys/kernel/mm/damon/admin/kdamonds"


def _running_kdamonds() -> list[str]:
    """The ``state`` files of the kdamonds that are ``on`` now and that this process may write."""
    if not (os.path.isdir(DAMON_STATES) and os.access(DAMON_STATES, os.W_OK)):
        return []
    running = []
    for name in sorted(os.listdir(DAMON_STATES)):
        state = os.path.join(DAMON_STATES, name, "state")
        try:
            with open(state) as handle:
                if handle.read().strip() == "on":
                    running.append(state)
        except OSError:
            continue
    return running


def _set_kdamonds(states: list[str], value: str) -> list[str]:
    """Write ``value`` to each state file; return those that took it."""
    done = []
    for state in states:
        try:
            with open(state, "w") as handle:
                handle.write(value)
        except OSError as err:
            sys.stderr.write(f"tests: could not turn {state} {value}: {err}\n")
            continue
        done.append(state)
    return done


_PAUSED = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    """Pause DAMON proactive reclaim for the test run, where it runs.

    Some VMs (this project's CI among them) run a DAMON ``pageout`` scheme that pages out
    physical regions idle for a minute, at up to 128 MiB/s, and freshly cached pages that
    land in such a region go with it. Residency assertions must test preloader, not the
    VM's reclaimer, so the run stops the kdamonds it can (root), says so in its header,
    and :func:`pytest_unconfigure` turns each back on however pytest ends (failures,
    Ctrl-C and internal errors included). A pytest killed outright runs no hook:
    scripts/test.sh turns them back on after pytest whatever way it ended. The benchmark
    leaves DAMON running and reports residency as it is.
    """
    config.stash[_PAUSED] = _set_kdamonds(_running_kdamonds(), "off")


def pytest_unconfigure(config: pytest.Config) -> None:
    _set_kdamonds(config.stash.get(_PAUSED, []), "on")


def pytest_report_header(config: pytest.Config) -> str | None:
    paused = config.stash.get(_PAUSED, [])
    if not paused:
        return None
    return f"DAMON proactive reclaim paused for this run, restored at its end: {' '.join(paused)}"


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


@pytest.fixture
def fuse_fs(
    shared_tmp: Path, start_cli: Callable[..., CliProcess]
) -> Iterator[Callable[..., FuseMount]]:
    """``fuse_fs(spec)`` mounts a failing FUSE filesystem (see tests/lib/fusefs.py).

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
    """Mark each test by its folder and FUSE use; skip what this run or machine cannot do."""
    run_slow = config.getoption("--run-slow")
    for item in items:
        kind = item.path.resolve().relative_to(TESTS).parts[0]
        if kind in KINDS:
            item.add_marker(kind)
        if "fuse_fs" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("fuse"):
            item.add_marker("fuse")
        if item.get_closest_marker("fuse") and FUSE_MISSING:
            item.add_marker(pytest.mark.skip(reason=FUSE_MISSING))
        if item.get_closest_marker("slow") and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow"))


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


@pytest.fixture
def served() -> Iterator[list[Served]]:
    """Servers a test starts (see ``tests.lib.serve.track``); killed afterwards if left running."""
    started: list[Served] = []
    yield started
    for server in started:
        server.kill()
