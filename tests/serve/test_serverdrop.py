"""A server that drops the weights' pages after loading them, against a real ``serve``.

The reader is a real process that reads each shard in full and then advises
``POSIX_FADV_DONTNEED`` on it, as sglang's ``--weight-loader-drop-cache-after-load`` does;
memory is plentiful. The control loses pages to a real memory cgroup limit instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from preloader.cli.demomodel import write_demo_model

from ..lib.cli import REPO, cli_env
from ..lib.marks import needs_vmtouch
from ..lib.residency import evict_tree, vmtouch_resident
from ..lib.serve import Served, ready_body, track

# Reads every file named in full, then drops its pages, one file after the other.
_LOADER = """
import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, 1 << 20):
            pass
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
"""


def _load_and_drop(shards: list[Path]) -> None:
    subprocess.run([sys.executable, "-c", _LOADER, *map(str, shards)], check=True, timeout=60)


def _path(server: Served) -> dict[str, Any]:
    [path] = server.json("/status")[1]["paths"]
    return path  # type: ignore[no-any-return]


def _after_checks(server: Served, count: int) -> dict[str, Any]:
    """The path's status once ``count`` more keep-warm checks have ended."""
    seen: set[float] = set()

    def checked() -> dict[str, Any] | None:
        path = _path(server)
        seen.add(path["last_check"])
        return path if len(seen) > count else None

    return server.poll(checked)


def _metrics(server: Served, path: Path) -> dict[str, float]:
    status, body = server.request("/metrics")
    assert status == 200
    return {
        s.name: s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.labels.get("path") == str(path)
    }


def _shards(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


@needs_vmtouch
def test_a_server_dropping_the_shards_is_detected_and_not_fetched_again(
    model_dir: Path, served: list[Served]
) -> None:
    shards = _shards(model_dir)
    shard_bytes = sum(p.stat().st_size for p in shards)
    server = track(
        served,
        str(model_dir),
        "--recheck-seconds",
        "0.2",
        "--chunk-size",
        "1MiB",
        "--on-server-drop",
        "hold",
    )
    server.poll(lambda: ready_body(server))
    assert _path(server)["server_drop"]["detected"] is False

    _load_and_drop(shards)
    assert vmtouch_resident(shards[0])[0] == 0

    def held() -> dict[str, Any] | None:
        path = _path(server)
        return path if path["server_drop"]["held_files"] == len(shards) else None

    path = server.poll(held)
    drop = path["server_drop"]
    assert drop["detected"] is True and drop["policy"] == "hold"
    assert drop["files"] == len(shards) and drop["held_bytes"] == drop["bytes"] == shard_bytes
    line = server.wait_for_log(lambda line: line.get("event") == "server drop")
    assert line["level"] == "warning"
    assert "--weight-loader-drop-cache-after-load" in line["detail"]
    assert "PRELOADER_ON_SERVER_DROP=rewarm" in line["detail"]

    # Keep-warm goes on checking, and reads none of the dropped shards again.
    path = _after_checks(server, 3)
    assert path["rewarm_bytes"] == 0
    assert path["server_drop"]["held_files"] == len(shards)
    assert sum(vmtouch_resident(p)[0] for p in shards) == 0
    samples = _metrics(server, model_dir)
    assert samples["preloader_server_drop_detected"] == 1
    assert samples["preloader_server_dropped_files_total"] == len(shards)
    assert samples["preloader_server_drop_held_bytes"] == shard_bytes
    assert samples["preloader_rewarm_bytes_total"] == 0

    # The server reads them again (a restart): resident again, so watched again.
    subprocess.run(["vmtouch", "-qt", *map(str, shards)], check=True, timeout=60)

    def released() -> dict[str, Any] | None:
        path = _path(server)
        return path if path["server_drop"]["held_files"] == 0 else None

    assert server.poll(released)["server_drop"]["held_bytes"] == 0
    assert server.stop()[0] == 0


@needs_vmtouch
def test_by_default_the_dropped_shards_are_read_again_and_the_log_says_how_to_stop_it(
    model_dir: Path, served: list[Served]
) -> None:
    shards = _shards(model_dir)
    shard_bytes = sum(p.stat().st_size for p in shards)
    server = track(
        served,
        str(model_dir),
        "--recheck-seconds",
        "0.2",
        "--chunk-size",
        "1MiB",
    )  # rewarm is the default
    server.poll(lambda: ready_body(server))
    _load_and_drop(shards)

    def rewarmed() -> dict[str, Any] | None:
        path = _path(server)
        done = path["server_drop"]["files"] >= 1 and path["rewarm_bytes"] >= shard_bytes
        return path if done and path["resident_bytes"] == path["bytes"] else None

    path = server.poll(rewarmed)
    assert path["server_drop"]["policy"] == "rewarm" and path["server_drop"]["held_files"] == 0
    line = server.wait_for_log(lambda line: line.get("event") == "server drop")
    assert "PRELOADER_ON_SERVER_DROP=hold" in line["detail"]
    assert _metrics(server, model_dir)["preloader_server_drop_detected"] == 1
    assert server.stop()[0] == 0


def test_evicting_unrelated_files_is_no_server_drop(
    model_dir: Path, big_file: Path, served: list[Served]
) -> None:
    server = track(served, str(model_dir), "--recheck-seconds", "0.1", "--chunk-size", "1MiB")
    server.poll(lambda: ready_body(server))
    subprocess.run(["cat", str(big_file)], stdout=subprocess.DEVNULL, check=True, timeout=60)
    evict_tree(big_file)
    path = _after_checks(server, 3)
    assert path["server_drop"] == {
        "detected": False,
        "policy": "rewarm",
        "files": 0,
        "bytes": 0,
        "held_files": 0,
        "held_bytes": 0,
    }
    assert path["rewarm_bytes"] == 0
    assert server.stop()[0] == 0


# -- the control: pages lost to a memory cgroup's limit -----------------------------------


def _memory_cgroup() -> tuple[Path, str, str] | None:
    """This process's memory cgroup folder, its limit file and its usage file."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, relative = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / relative.lstrip("/")
            return folder, "memory.limit_in_bytes", "memory.usage_in_bytes"
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            folder = Path("/sys/fs/cgroup") / relative.lstrip("/")
            if "memory" in (folder / "cgroup.subtree_control").read_text().split():
                return folder, "memory.max", "memory.current"
    return None


@pytest.fixture
def limited_cgroup() -> Iterator[tuple[Path, str, str]]:
    """A fresh child memory cgroup, removed afterwards; skips where none can be made."""
    found = _memory_cgroup()
    if found is None:
        pytest.skip("no memory cgroup controller for this process")
    parent, limit, usage = found
    child = parent / f"preloader-test-{os.getpid()}"
    try:
        child.mkdir()
    except OSError as err:
        pytest.skip(f"cannot make a memory cgroup under {parent}: {err}")
    try:
        yield child, limit, usage
    finally:
        child.rmdir()


@needs_vmtouch
def test_pages_lost_to_a_memory_limit_are_no_server_drop(
    shared_tmp: Path, limited_cgroup: tuple[Path, str, str], served: list[Served]
) -> None:
    cgroup, limit, usage = limited_cgroup
    root = shared_tmp / "big-model"
    write_demo_model(str(root), 128 * 1024 * 1024, shards=4)
    evict_tree(root)
    command = [
        *("sh", "-c", 'echo $$ > "$0/cgroup.procs" && shift && exec "$@"', str(cgroup), "--"),
        *(sys.executable, "-m", "preloader", "serve", str(root)),
        *("--recheck-seconds", "0.1", "--chunk-size", "4MiB"),
    ]
    env = cli_env({"PRELOADER_HOST": "127.0.0.1", "PRELOADER_PORT": "0"})
    proc = subprocess.Popen(
        command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    server = Served(proc)
    served.append(server)
    server.poll(lambda: ready_body(server))
    # The model's pages are charged to the cgroup; a limit 64 MiB under its use reclaims.
    used = int((cgroup / usage).read_text())
    (cgroup / limit).write_text(str(used - 64 * 1024 * 1024))

    def lost_again() -> dict[str, Any] | None:
        path = _path(server)
        return path if path["evictions_detected"] > 0 and path["rewarm_bytes"] > 0 else None

    server.poll(lost_again)
    path = _after_checks(server, 3)
    assert path["server_drop"]["detected"] is False and path["server_drop"]["files"] == 0
    assert _metrics(server, root)["preloader_server_drop_detected"] == 0
    assert not any(line.get("event") == "server drop" for line in server.logs)
    server.kill()
