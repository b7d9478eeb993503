"""``serve --lock``: the warmed model pinned until the stop, and a refusal that never blocks.

A real ``preloader serve`` in a child process over real files: the pins are seen from the
outside (``VmLck`` in ``/proc/PID/status``, vmtouch after ``POSIX_FADV_DONTNEED``), the
refusal with a real ``RLIMIT_MEMLOCK`` (prlimit) and a process without ``CAP_IPC_LOCK``
(an unprivileged uid).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from preloader.kernel.pinning import parse_vm_locked

from ..lib.cli import NOBODY
from ..lib.fusefs import FuseMount
from ..lib.marks import needs_fuse, needs_root, needs_vmtouch
from ..lib.residency import evict_tree, vmtouch_resident
from ..lib.serve import Served, ready_body, track

MiB = 1024 * 1024


def _vm_locked(pid: int) -> int:
    return parse_vm_locked(Path(f"/proc/{pid}/status").read_text())


def _gauge(server: Served, name: str) -> float:
    status, body = server.request("/metrics")
    assert status == 200
    [value] = [
        sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == name
    ]
    return value


def _lock(server: Served) -> dict[str, Any]:
    status, document = server.json("/status")
    assert status == 200
    lock: dict[str, Any] = document["lock"]
    return lock


def _nice(stat: Path) -> int:
    """The nice value in a ``/proc/.../stat`` file (field 19)."""
    after_name = stat.read_text().rsplit(")", 1)[1].split()
    return int(after_name[16])  # the fields from 3 on


def _nice_values(pid: int) -> tuple[int, set[int]]:
    """The process's own nice value, and those of all its threads."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return _nice(Path(f"/proc/{pid}/stat")), {_nice(task / "stat") for task in tasks}


def _pinned(server: Served, nbytes: int) -> dict[str, Any] | None:
    """``/status``'s ``lock`` once it holds ``nbytes`` pinned (for :meth:`Served.poll`)."""
    lock = _lock(server)
    if lock["error"]:
        pytest.skip(f"mlock is not permitted here: {lock['error']}")
    return lock if lock["pinned_bytes"] == nbytes else None


def _write(path: Path, content: bytes) -> None:
    """Write and flush: dirty pages cannot be evicted, clean ones can."""
    with open(path, "wb") as handle:
        handle.write(content)
        os.fsync(handle.fileno())


@needs_vmtouch
def test_serve_lock_pins_the_warmed_model_until_sigterm(
    model_dir: Path, served: list[Served]
) -> None:
    server = track(served, str(model_dir), "--lock")
    body = server.poll(lambda: ready_body(server))
    model_bytes = body["bytes_total"]
    lock = server.poll(lambda: _pinned(server, model_bytes))
    assert lock == {"pinned_bytes": model_bytes, "pinned_files": 8, "error": None}
    assert _vm_locked(server.proc.pid) >= model_bytes
    # The pins were taken on a thread of their own at nice 19; the rest runs as started.
    own, threads = _nice_values(server.proc.pid)
    assert own < 19 and threads == {own, 19}
    assert _gauge(server, "preloader_pinned_bytes") == model_bytes
    assert _gauge(server, "preloader_lock_error") == 0
    line = server.wait_for_log(lambda line: line.get("event") == "pinned")
    assert line["pinned_bytes"] == model_bytes and line["pinned_files"] == 8

    # POSIX_FADV_DONTNEED from another process drops nothing of a pinned file.
    evict_tree(model_dir)
    pages, total = vmtouch_resident(model_dir)
    assert pages == total

    pid = server.proc.pid
    code, _ = server.stop()
    assert code == 0
    assert not Path(f"/proc/{pid}").exists()
    line = server.wait_for_log(lambda line: line.get("event") == "released pinned pages")
    assert line["bytes"] == model_bytes
    # Nothing holds the pages any more: they can be evicted again.
    evict_tree(model_dir)
    assert vmtouch_resident(model_dir)[0] == 0


def test_without_lock_nothing_is_pinned(model_dir: Path, served: list[Served]) -> None:
    server = track(served, str(model_dir))
    server.poll(lambda: ready_body(server))
    assert server.json("/status")[1]["lock"] is None
    assert _gauge(server, "preloader_pinned_bytes") == 0
    assert _gauge(server, "preloader_lock_error") == 0
    assert _vm_locked(server.proc.pid) == 0
    own, threads = _nice_values(server.proc.pid)
    assert threads == {own}  # no pinning thread
    assert server.stop()[0] == 0


@needs_root
@pytest.mark.nonroot
def test_lock_refused_still_warms_serves_and_says_why(
    model_dir: Path, served: list[Served]
) -> None:
    # An unprivileged uid has no CAP_IPC_LOCK, and 1 MiB of RLIMIT_MEMLOCK is less than
    # the 8 MiB model: serve must warm, open its gates and say why nothing is pinned.
    server = track(
        served,
        str(model_dir),
        env={"PRELOADER_LOCK": "1"},
        user=NOBODY,
        wrap=["prlimit", "--memlock=1048576:1048576"],
    )
    server.poll(lambda: ready_body(server))
    assert server.request("/startz")[0] == 200
    lock = _lock(server)
    assert lock["pinned_bytes"] == 0 and lock["pinned_files"] == 0
    assert "RLIMIT_MEMLOCK is 1.0 MiB" in lock["error"]
    assert "lacks CAP_IPC_LOCK" in lock["error"] and "IPC_LOCK]" in lock["error"]
    assert _gauge(server, "preloader_pinned_bytes") == 0
    assert _gauge(server, "preloader_lock_error") == 1
    assert _vm_locked(server.proc.pid) == 0
    assert server.stop()[0] == 0
    # One error line, naming the cause and the fix.
    [line] = [line for line in server.logs if line.get("event") == "cannot lock"]
    assert line["level"] == "error" and "serving unpinned" in line["detail"]
    assert "RLIMIT_MEMLOCK" in line["detail"] and "CAP_IPC_LOCK" in line["detail"]
    assert not [line for line in server.raw if "Traceback" in line]


@needs_root
@pytest.mark.nonroot
def test_a_lock_that_fails_midway_is_released_and_said(
    shared_tmp: Path, served: list[Served]
) -> None:
    # 48 files of 100 bytes: 4.7 KiB planned, within a 64 KiB RLIMIT_MEMLOCK, so the check
    # before the pass lets it through; but each file locks a whole page, so mlock runs out
    # of the limit part of the way (ENOMEM).
    model = shared_tmp / "small"
    model.mkdir()
    for index in range(48):
        _write(model / f"part-{index:02d}.txt", os.urandom(100))
    server = track(
        served,
        str(model),
        "--lock",
        user=NOBODY,
        wrap=["prlimit", f"--memlock={64 * 1024}:{64 * 1024}"],
    )
    server.poll(lambda: ready_body(server))

    def failed() -> dict[str, Any] | None:
        lock = _lock(server)
        return lock if lock["error"] else None

    lock = server.poll(failed)
    assert lock["pinned_bytes"] == 0 and lock["pinned_files"] == 0
    assert "cannot pin" in lock["error"] and "released all" in lock["error"]
    assert "RLIMIT_MEMLOCK" in lock["error"] and "CAP_IPC_LOCK" in lock["error"]
    assert _vm_locked(server.proc.pid) == 0
    assert _gauge(server, "preloader_lock_error") == 1
    assert server.request("/readyz")[0] == 200
    assert server.stop()[0] == 0


def test_a_replaced_shard_is_pinned_again_and_the_old_pin_released(
    shared_tmp: Path, served: list[Served]
) -> None:
    model = shared_tmp / "model"
    model.mkdir()
    shards = [model / f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for shard in shards:
        _write(shard, os.urandom(MiB))
    evict_tree(model)
    server = track(served, str(model), "--lock", "--recheck-seconds", "0.2")
    server.poll(lambda: ready_body(server))
    server.poll(lambda: _pinned(server, 2 * MiB))
    assert _vm_locked(server.proc.pid) == 2 * MiB

    for shard in shards:  # a new revision written beside and renamed over, as sync tools do
        staged = shard.with_name(shard.name + ".tmp")
        _write(staged, os.urandom(2 * MiB))
        os.utime(staged, ns=(1, 1))  # a modification time unlike the planned one
        staged.rename(shard)

    lock = server.poll(lambda: _pinned(server, 4 * MiB))
    assert lock["pinned_files"] == 2
    # The old files' pins are gone (else 6 MiB would be locked), the new ones held.
    assert _vm_locked(server.proc.pid) == 4 * MiB

    def released() -> int | None:
        # One re-plan per shard or one for both, as keep-warm's checks fall.
        lines = [line for line in server.logs if line.get("event") == "released pinned pages"]
        assert all("no longer planned" in line["detail"] for line in lines)
        total = sum(line["bytes"] for line in lines)
        return total if total == 2 * MiB else None

    server.poll(released)
    assert server.json("/status")[1]["paths"][0]["bytes"] == 4 * MiB
    assert server.stop()[0] == 0


@needs_fuse
def test_a_shard_is_pinned_as_soon_as_it_is_read_while_the_pass_reads_the_next(
    fuse_fs: Callable[..., FuseMount], served: list[Served]
) -> None:
    # A proactive reclaimer may page out the first shards of a long warm-up before the
    # last is read: each shard is pinned once all of it is. The second shard is held
    # before its first byte, so the pass cannot end while the first is seen pinned.
    fs = fuse_fs(
        {
            "files": {
                "model-00001-of-00002.safetensors": {"size": 8 * MiB},
                "model-00002-of-00002.safetensors": {"size": 8 * MiB, "gate_from": 0},
            }
        }
    )
    server = track(
        served, str(fs.mountpoint), "--lock", "--chunk-size", "1MiB", "--recheck-seconds", "0"
    )
    fs.wait_for("GATE read")
    lock = server.poll(lambda: _pinned(server, 8 * MiB))
    assert lock["pinned_files"] == 1
    assert _vm_locked(server.proc.pid) == 8 * MiB
    assert not [line for line in server.logs if line.get("event") == "first pass over"]
    fs.release()
    lock = server.poll(lambda: _pinned(server, 16 * MiB))
    assert lock == {"pinned_bytes": 16 * MiB, "pinned_files": 2, "error": None}
    # One line for the pass's pins, once it is over.
    line = server.wait_for_log(lambda line: line.get("event") == "pinned")
    assert line["pinned_bytes"] == 16 * MiB and line["pinned_files"] == 2
    assert server.stop()[0] == 0
    line = server.wait_for_log(lambda line: line.get("event") == "released pinned pages")
    assert line["bytes"] == 16 * MiB
    assert len([line for line in server.logs if line.get("event") == "pinned"]) == 1
