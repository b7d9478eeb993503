"""Pinning with mmap + mlock: pages that stay, a refusal that explains, release on exit."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from preloader import errors
from preloader.kernel.pinning import MemlockPermission, PinSet, parse_vm_locked
from preloader.kernel.procfs import parse_cap_eff

from ..lib.cli import AS_USER, NOBODY, REPO, run_cli
from ..lib.marks import needs_root, needs_vmtouch
from ..lib.residency import vmtouch_resident

MiB = 1024 * 1024

STATUS = """\
Name:\tpython3
VmLck:\t   24576 kB
CapEff:\t000001fffeffffff
"""


def test_status_fields() -> None:
    assert parse_vm_locked(STATUS) == 24 * MiB
    assert parse_cap_eff(STATUS) >> 14 & 1  # CAP_IPC_LOCK
    assert parse_cap_eff("Name: x\n") == 0
    assert parse_vm_locked("Name: x\n") == 0


def test_permission_arithmetic() -> None:
    assert MemlockPermission(cap_ipc_lock=True, soft_limit=0).refusal(1 << 40) is None
    assert MemlockPermission(cap_ipc_lock=False, soft_limit=None).refusal(1 << 40) is None
    assert MemlockPermission(False, 8 * MiB, locked_bytes=2 * MiB).refusal(6 * MiB) is None
    refusal = MemlockPermission(False, 8 * MiB, locked_bytes=2 * MiB).refusal(7 * MiB)
    assert refusal is not None
    assert "RLIMIT_MEMLOCK is 8.0 MiB" in refusal and "CAP_IPC_LOCK" in refusal


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "preloader", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRELOADER_")}
    env["PRELOADER_LOG_FORMAT"] = "json"
    # This checkout, even where another one is pip-installed in editable mode.
    env["PYTHONPATH"] = REPO
    return env


def _vm_locked(pid: int) -> int:
    return parse_vm_locked(Path(f"/proc/{pid}/status").read_text())


def _has_cap_ipc_lock() -> bool:
    return bool(parse_cap_eff(Path("/proc/self/status").read_text()) >> 14 & 1)


@needs_vmtouch
def test_warm_lock_pins_until_signalled_then_releases(model_dir: Path) -> None:
    with subprocess.Popen(
        _cli("warm", str(model_dir), "--lock", "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    ) as holder:
        try:
            assert holder.stdout is not None
            # The summary is printed once the pages are pinned; the process then holds them.
            report = json.loads(holder.stdout.readline())
            if report.get("lock_error"):
                pytest.skip(f"mlock is not permitted here: {report['lock_error']}")
            assert report["pinned_bytes"] == report["bytes"] > 0
            assert report["pinned_files"] == report["files"]
            assert report["exit_code"] == 0
            assert holder.poll() is None
            assert _vm_locked(holder.pid) >= report["bytes"]
            # A pinned page survives POSIX_FADV_DONTNEED from another process.
            run_cli("evict", str(model_dir), check=True)
            pages, total = vmtouch_resident(model_dir)
            assert pages == total
            holder.send_signal(signal.SIGTERM)
            assert holder.wait(timeout=60) == errors.EXIT_OK
        finally:
            if holder.poll() is None:
                holder.kill()
        assert holder.stderr is not None
        events = [json.loads(x)["event"] for x in holder.stderr.read().splitlines() if x[:1] == "{"]
    assert "released pinned pages" in events
    run_cli("evict", str(model_dir), check=True)
    assert vmtouch_resident(model_dir)[0] == 0


@needs_vmtouch
def test_a_pin_set_releases_only_the_pins_asked_for(model_dir: Path) -> None:
    shards = sorted(model_dir.glob("*.safetensors"))[:2]
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    limit = None if soft == resource.RLIM_INFINITY else soft
    size = sum(shard.stat().st_size for shard in shards)
    if MemlockPermission(_has_cap_ipc_lock(), limit).refusal(size) is not None:
        pytest.skip("mlock is not permitted here")
    page = os.sysconf("SC_PAGE_SIZE")
    before = _vm_locked(os.getpid())
    pins = PinSet()
    try:
        first, second = (pins.pin(str(shard), shard.stat().st_size) for shard in shards)
        locked = _vm_locked(os.getpid())
        assert pins.release({first}) == first.length
        assert pins.pins == (second,)
        assert pins.pinned_bytes == second.length
        assert _vm_locked(os.getpid()) == locked - -(-first.length // page) * page
        # The released file's pages can go again; the pinned one's cannot.
        run_cli("evict", *map(str, shards), check=True)
        assert vmtouch_resident(shards[0])[0] == 0
        pages, total = vmtouch_resident(shards[1])
        assert pages == total
    finally:
        pins.release()
    assert _vm_locked(os.getpid()) == before


@needs_root
def test_cap_ipc_lock_overrides_a_small_rlimit_memlock(model_dir: Path) -> None:
    if not _has_cap_ipc_lock():
        pytest.skip("this root lacks CAP_IPC_LOCK")
    with subprocess.Popen(
        ["prlimit", "--memlock=65536:65536", *_cli("warm", str(model_dir), "--json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**_env(), "PRELOADER_LOCK": "1"},
    ) as holder:
        try:
            assert holder.stdout is not None
            report = json.loads(holder.stdout.readline())
            assert report["pinned_bytes"] == report["bytes"] > 65536
            holder.send_signal(signal.SIGINT)
            assert holder.wait(timeout=60) == errors.EXIT_OK
        finally:
            if holder.poll() is None:
                holder.kill()


@needs_root
@pytest.mark.nonroot
def test_without_cap_ipc_lock_a_small_rlimit_memlock_is_a_clear_refusal(model_dir: Path) -> None:
    done = subprocess.run(
        [
            "prlimit",
            "--memlock=1048576:1048576",
            sys.executable,
            AS_USER,
            str(NOBODY),
            "warm",
            str(model_dir),
            "--lock",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert done.returncode == errors.EXIT_LOCK_REFUSED, done.stderr
    message = json.loads(done.stdout)["error"]
    assert "RLIMIT_MEMLOCK is 1.0 MiB" in message
    assert "lacks CAP_IPC_LOCK" in message
    assert "Traceback" not in done.stderr
    # Refused before reading: no shard was warmed for a pin that cannot hold. (Planning
    # read the small index, which a non-owner cannot tell was cold before.)
    assert all(vmtouch_resident(shard)[0] == 0 for shard in model_dir.glob("*.safetensors"))


@needs_root
def test_a_failing_mlock_names_the_cause(model_dir: Path) -> None:
    # The kernel layer itself, without the pre-check: an unprivileged process with
    # RLIMIT_MEMLOCK 0 gets EPERM from mlock, explained.
    shard = next(model_dir.glob("*.safetensors"))
    code = (
        "import os, resource, sys\n"
        "from preloader.kernel.pinning import lock_file\n"
        f"fd = os.open({str(shard)!r}, os.O_RDONLY)\n"
        "resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))\n"
        f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "try:\n"
        f"    lock_file(fd, {shard.stat().st_size})\n"
        "except OSError as err:\n"
        "    print(err.errno, err.strerror)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env()
    ).stdout
    number, _, text = out.strip().partition(" ")
    assert int(number) in (1, 11, 12)  # EPERM, EAGAIN, ENOMEM
    assert "RLIMIT_MEMLOCK or a missing CAP_IPC_LOCK forbids it" in text
