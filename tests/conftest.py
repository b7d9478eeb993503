"""Shared fixtures: real files, the real page cache, the real CLI.

Tests evict only their own files (POSIX_FADV_DONTNEED), never the whole cache.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from preloader import pagecache
from preloader.demo import write_demo_model

NOBODY = 65534
AS_USER = str(Path(__file__).with_name("_as_user.py"))


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


def fincore_resident_bytes(path: str | os.PathLike[str]) -> int:
    """Resident bytes of one file by util-linux fincore."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", os.fspath(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


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
