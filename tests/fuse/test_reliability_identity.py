"""File identity on FUSE filesystems whose inode numbers do not last.

libfuse's high-level API (s3fs, ossfs) hands out inode numbers per lookup: a file whose
dentry the kernel forgot comes back under a new number. The fixture's ``fresh_inodes``
gives a new number at every ``stat``, so every inode the plan took is gone by the next
look: a renumbered inode alone is no change, and the model must still end warm with the
gates open. A real change (another modification time) is still one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preloader import errors
from preloader.kernel.identity import inodes_stable, is_planned

from ..lib.cli import run_cli
from ..lib.fusefs import FuseMount
from ..lib.marks import needs_fuse
from ..lib.serve import Served, track

MiB = 1 << 20

MODEL: dict[str, dict[str, Any]] = {
    "config.json": {"size": 700},
    "model-00001-of-00002.safetensors": {"size": 3 * MiB},
    "model-00002-of-00002.safetensors": {"size": 2 * MiB + 11},
}
SPEC: dict[str, Any] = {"cache": "keep", "fresh_inodes": True, "files": MODEL}


@needs_fuse
def test_the_fixture_renumbers_inodes(fuse_fs: Callable[..., FuseMount]) -> None:
    fs = fuse_fs(SPEC)
    path = fs.path("config.json")
    first, second = os.stat(path), os.stat(path)
    assert first.st_ino != second.st_ino
    assert (first.st_size, first.st_mtime_ns) == (second.st_size, second.st_mtime_ns)


@needs_fuse
def test_identity_trusts_the_inode_only_where_the_filesystem_keeps_it(
    fuse_fs: Callable[..., FuseMount], tmp_path: Path
) -> None:
    fs = fuse_fs(SPEC)
    on_fuse = os.stat(fs.path("config.json"))
    assert not inodes_stable(on_fuse.st_dev)
    # Another number, same modification time: the same file on FUSE.
    assert is_planned(on_fuse, on_fuse.st_dev, on_fuse.st_ino + 1, on_fuse.st_mtime_ns)
    # Another modification time: another file (a real replacement).
    assert not is_planned(on_fuse, on_fuse.st_dev, on_fuse.st_ino, on_fuse.st_mtime_ns + 1)
    local = tmp_path / "weights.bin"
    local.write_bytes(b"x")
    on_disk = os.stat(local)
    if inodes_stable(on_disk.st_dev):  # the test's temporary folder lies on ext4, tmpfs ...
        assert not is_planned(on_disk, on_disk.st_dev, on_disk.st_ino + 1, on_disk.st_mtime_ns)
    assert is_planned(on_disk, on_disk.st_dev, on_disk.st_ino, on_disk.st_mtime_ns)


@needs_fuse
def test_warm_on_renumbered_inodes_ends_resident(fuse_fs: Callable[..., FuseMount]) -> None:
    fs = fuse_fs(SPEC)
    done = run_cli("warm", "--json", "--chunk-size", "1MiB", str(fs.mountpoint))
    report = json.loads(done.stdout)
    assert "replaced" not in done.stdout + done.stderr
    assert report["exit_code"] == done.returncode == errors.EXIT_OK
    assert report["files"] == len(MODEL)
    assert report["resident_bytes"] == report["read_bytes"] == report["bytes"] > 0


@needs_fuse
def test_a_file_replaced_on_fuse_is_still_found_by_its_modification_time(
    fuse_fs: Callable[..., FuseMount],
) -> None:
    replaced = "model-00002-of-00002.safetensors"
    files = {**MODEL, replaced: {**MODEL[replaced], "retime_at_open": 1}}
    fs = fuse_fs({**SPEC, "files": files})
    done = run_cli("warm", "--json", "--chunk-size", "1MiB", str(fs.mountpoint))
    report = json.loads(done.stdout)
    assert report["exit_code"] == done.returncode != errors.EXIT_OK
    (failed,) = report["error_details"]
    assert failed["path"] == str(fs.path(replaced))
    assert "replaced by another file" in failed["cause"]


@needs_fuse
def test_keep_warm_on_renumbered_inodes_finds_nothing_changed(
    fuse_fs: Callable[..., FuseMount], served: list[Served]
) -> None:
    fs = fuse_fs(SPEC)
    server = track(served, str(fs.mountpoint), "--chunk-size", "1MiB", "--recheck-seconds", "0.2")

    def rechecked() -> dict[str, Any] | None:
        _, body = server.json("/status")
        (path,) = body["paths"]
        return body if path["last_check"] is not None else None

    status = server.poll(rechecked)
    assert "replaced" not in json.dumps(status)
    assert status["state"] == "ready" and status["errors"] == 0
    (path,) = status["paths"]
    assert path["resident_bytes"] == path["bytes"] > 0


@needs_fuse
def test_serve_on_renumbered_inodes_opens_both_gates(
    fuse_fs: Callable[..., FuseMount], served: list[Served]
) -> None:
    fs = fuse_fs(SPEC)
    server = track(served, str(fs.mountpoint), "--chunk-size", "1MiB", "--recheck-seconds", "0")

    def settled() -> dict[str, Any] | None:
        _, body = server.json("/status")
        return body if body["state"] not in ("planning", "warming", "verifying") else None

    status = server.poll(settled)
    assert "replaced" not in json.dumps(status)
    assert status["state"] == "ready"
    assert server.request("/readyz")[0] == 200
    assert server.request("/startz")[0] == 200
    (path,) = status["paths"]
    assert path["files"] == len(MODEL)
    assert path["resident_bytes"] == path["bytes"] == sum(f["size"] for f in MODEL.values())
