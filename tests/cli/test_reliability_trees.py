"""Reliability matrix, trees and inputs: the real CLI against every strange tree.

Each case ends with a one-line JSON log message naming the path and the cause, the
documented exit code, no traceback, a bounded run (every subprocess has a timeout) and the
model tree exactly as it was (the ``unchanged`` fixture hashes contents and compares
sizes, mtimes and ctimes).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest

from preloader import errors

from ..lib.cli import NOBODY, CliProcess, cli_env, run_cli
from ..lib.fusefs import FuseMount
from ..lib.marks import needs_fuse, needs_root
from ..lib.residency import evict_tree

Snapshot = Callable[[Path], Path]


def _logs(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """Every stderr line is one JSON object: one message a line, no traceback."""
    assert "Traceback" not in done.stderr
    return [json.loads(line) for line in done.stderr.splitlines()]


def _events(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [line for line in logs if line["event"] == event]


def _write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def _model(root: Path) -> Path:
    _write(root / "config.json", 300)
    _write(root / "model-00001-of-00002.safetensors", 256 * 1024)
    _write(root / "model-00002-of-00002.safetensors", 200 * 1024 + 5)
    evict_tree(root)
    return root


# ------------------------------------------------------------------- what MODEL_DIR is


def test_model_dir_that_is_a_regular_file_warms_that_file(
    shared_tmp: Path, unchanged: Snapshot
) -> None:
    path = _write(shared_tmp / "model.gguf", 300 * 1024)
    unchanged(shared_tmp)
    done = run_cli("warm", "--json", env={"MODEL_DIR": str(path)})
    assert done.returncode == errors.EXIT_OK, done.stderr
    report = json.loads(done.stdout)
    assert (report["files"], report["read_bytes"]) == (1, 300 * 1024)
    assert report["resident_ratio"] == 1.0
    _logs(done)


def test_an_empty_model_dir_warms_nothing_and_says_so(
    shared_tmp: Path, unchanged: Snapshot
) -> None:
    empty = unchanged(shared_tmp / "empty")
    empty.mkdir()
    done = run_cli("warm", "--json", env={"MODEL_DIR": str(empty)})
    assert done.returncode == errors.EXIT_OK
    assert json.loads(done.stdout)["files"] == 0
    [line] = _events(_logs(done), "no files found")
    assert line["paths"] == [str(empty)]


@needs_root
@pytest.mark.parametrize("given_as", ["MODEL_DIR", "PATH"])
def test_an_unreadable_model_dir_is_a_read_error_naming_it(
    shared_tmp: Path, unchanged: Snapshot, given_as: str
) -> None:
    locked = _model(shared_tmp / "model")
    locked.chmod(0o700)  # root's; uid 65534 may not list it
    unchanged(shared_tmp)
    if given_as == "MODEL_DIR":
        done = run_cli("warm", "--json", env={"MODEL_DIR": str(locked)}, user=NOBODY)
    else:
        done = run_cli("warm", "--json", str(locked), user=NOBODY)
    assert done.returncode == errors.EXIT_READ_ERRORS, done.stderr
    report = json.loads(done.stdout)
    assert report["error_details"] == [
        {"path": str(locked), "cause": "cannot list: Permission denied"}
    ]
    assert report["errors"] == 1 and report["files"] == 0
    [line] = _events(_logs(done), "cannot read")
    assert (line["path"], line["cause"]) == (str(locked), "cannot list: Permission denied")
    for command in ("status", "evict"):
        other = run_cli(command, str(locked), user=NOBODY)
        assert other.returncode == errors.EXIT_READ_ERRORS
        assert _events(_logs(other), "cannot read") == [line | {"timestamp": ANY}]


@needs_root
def test_an_unreadable_subfolder_fails_only_its_part(shared_tmp: Path, unchanged: Snapshot) -> None:
    model = _model(shared_tmp / "model")
    private = model / "extra"
    _write(private / "adapter_model.safetensors", 4096)
    private.chmod(0o700)
    unchanged(shared_tmp)
    done = run_cli("warm", "--json", str(model), user=NOBODY)
    assert done.returncode == errors.EXIT_READ_ERRORS
    report = json.loads(done.stdout)
    assert report["files"] == 3
    assert report["read_bytes"] == report["bytes"]
    assert report["error_details"] == [
        {"path": str(private), "cause": "cannot list: Permission denied"}
    ]
    _logs(done)


@needs_root
def test_a_model_dir_behind_an_unsearchable_folder_is_not_called_missing(
    shared_tmp: Path, unchanged: Snapshot
) -> None:
    """EACCES on a folder above is not "does not exist" (that would skip with exit 0)."""
    model = _model(shared_tmp / "private" / "model")
    (shared_tmp / "private").chmod(0o700)
    unchanged(shared_tmp)
    done = run_cli("warm", "--json", env={"MODEL_DIR": str(model)}, user=NOBODY)
    assert done.returncode == errors.EXIT_READ_ERRORS, done.stderr
    report = json.loads(done.stdout)
    assert report["error_details"] == [
        {"path": str(model), "cause": "cannot stat: Permission denied"}
    ]
    _logs(done)


# ------------------------------------------------------------- special files and links


def _special_tree(root: Path) -> tuple[Path, socket.socket]:
    """Regular files beside every kind of file that must never be opened.

    The FIFOs have no writer: opening one for reading (as ``cat`` would) blocks for ever,
    so a run that finishes proves they were never opened, with or without a link between.
    """
    model = _model(root)
    os.mkfifo(model / "fifo")
    os.symlink(model / "fifo", model / "link-to-fifo")
    os.symlink("/dev/zero", model / "zero.safetensors")
    os.symlink(model / "gone", model / "broken.bin")
    os.symlink(model / "loop-b", model / "loop-a")
    os.symlink(model / "loop-a", model / "loop-b")
    os.symlink(".", model / "self")  # a directory loop
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(model / "sock"))
    os.symlink(model / "sock", model / "link-to-sock")
    if os.geteuid() == 0:
        os.mknod(model / "zero-node", stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero
        os.mknod(model / "loop-node", stat.S_IFBLK | 0o600, os.makedev(7, 0))  # /dev/loop0
    return model, sock


SPECIAL_REASONS = {
    "fifo": "FIFO",
    "link-to-fifo": "FIFO behind a symlink",
    "zero.safetensors": "device node behind a symlink",
    "broken.bin": "broken symlink",
    "loop-a": "symlink loop",
    "loop-b": "symlink loop",
    "self": "directory already walked (link loop or bind mount)",
    "sock": "socket",
    "link-to-sock": "socket behind a symlink",
}


@pytest.mark.parametrize("command", ["warm", "status", "evict"])
def test_special_files_in_the_tree_and_behind_links_are_never_opened(
    shared_tmp: Path, unchanged: Snapshot, command: str
) -> None:
    model, sock = _special_tree(shared_tmp / "model")
    unchanged(shared_tmp)
    try:
        done = run_cli(command, "--json", str(model))
    finally:
        sock.close()
    assert done.returncode == errors.EXIT_OK, done.stderr
    report = json.loads(done.stdout)
    assert report["files"] == 3
    expected = dict(SPECIAL_REASONS)
    if os.geteuid() == 0:
        expected.update({"zero-node": "device node", "loop-node": "device node"})
    skipped = {
        os.path.relpath(line["path"], model): line["reason"]
        for line in _events(_logs(done), "skipped")
    }
    assert skipped == expected
    if command == "warm":
        assert report["read_bytes"] == report["bytes"] == 300 + 256 * 1024 + 200 * 1024 + 5
        assert report["skipped"] == len(expected)
        assert report["errors"] == 0


def test_a_link_to_dev_zero_as_the_model_dir_is_refused_not_read(shared_tmp: Path) -> None:
    link = shared_tmp / "model"
    os.symlink("/dev/zero", link)
    fifo = shared_tmp / "fifo-root"
    os.mkfifo(fifo)
    for root in (link, fifo):
        done = run_cli("warm", "--json", env={"MODEL_DIR": str(root)})
        assert done.returncode == errors.EXIT_OK
        assert json.loads(done.stdout)["read_bytes"] == 0
        [line] = _events(_logs(done), "skipped")
        assert line["path"] == str(root)


# ----------------------------------------------------------------------- odd names, depth


def test_names_with_newlines_and_invalid_utf8_stay_one_line(
    shared_tmp: Path, unchanged: Snapshot
) -> None:
    model = shared_tmp / "model"
    model.mkdir()
    weird = [b"two\nlines.safetensors", b"latin1-\xe9\xff.safetensors", b"tab\tand\x1bescape.json"]
    for name in weird:
        with open(os.path.join(os.fsencode(model), name), "wb") as handle:
            handle.write(b"w" * 5000)
    os.mkfifo(os.path.join(os.fsencode(model), b"fifo\n\xff"))
    unchanged(model)

    done = run_cli("warm", "--json", str(model))
    assert done.returncode == errors.EXIT_OK, done.stderr
    report = json.loads(done.stdout)  # one object on one line, whatever the names
    assert (report["files"], report["read_bytes"]) == (3, 15000)
    [skipped] = _events(_logs(done), "skipped")
    assert skipped["path"] == f"{model}/fifo\\n\\xff"

    status = run_cli("status", str(model))
    assert status.returncode == errors.EXIT_OK
    lines = status.stdout.splitlines()
    assert len([line for line in lines if f"{model}/" in line]) == 3  # one line a file
    assert any(line.endswith("two\\nlines.safetensors") for line in lines)
    assert any(line.endswith("latin1-\\xe9\\xff.safetensors") for line in lines)


def test_a_200_deep_tree_is_walked(shared_tmp: Path, unchanged: Snapshot) -> None:
    deep = shared_tmp / "model"
    leaf = deep.joinpath(*[f"d{i:03}" for i in range(200)])
    _write(leaf / "w.safetensors", 8192)
    unchanged(deep)
    done = run_cli("warm", "--json", str(deep))
    assert done.returncode == errors.EXIT_OK, done.stderr
    report = json.loads(done.stdout)
    assert (report["files"], report["read_bytes"]) == (1, 8192)


# ---------------------------------------------------------------------- many small files


def _many_files(root: Path, count: int, per_dir: int = 1000) -> None:
    for index in range(count):
        directory = root / f"d{index // per_dir:04}"
        if index % per_dir == 0:
            directory.mkdir(parents=True)
        with open(directory / f"f{index:06}.bin", "wb") as handle:
            handle.write(b"%06d" % index * 100)
    evict_tree(root)


def _measured_run(*args: str) -> tuple[subprocess.CompletedProcess[str], float, int]:
    """Run the CLI in a child of a fresh child, for its own peak RSS."""
    probe = (
        "import json, resource, subprocess, sys, time\n"
        "t = time.monotonic()\n"
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=600)\n"
        "seconds = time.monotonic() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps([done.returncode, done.stdout, done.stderr, seconds, rss]))\n"
    )
    env = cli_env()
    out = subprocess.run(
        [sys.executable, "-c", probe, sys.executable, "-m", "preloader", *args],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=660,
    ).stdout
    code, stdout, stderr, seconds, rss_kib = json.loads(out)
    return subprocess.CompletedProcess(args, code, stdout, stderr), seconds, rss_kib * 1024


def test_ten_thousand_small_files_are_each_read_once(shared_tmp: Path) -> None:
    _many_files(shared_tmp / "model", 10_000)
    done, _, _ = _measured_run("warm", "--json", str(shared_tmp / "model"))
    assert done.returncode == errors.EXIT_OK, done.stderr
    report = json.loads(done.stdout)
    assert (report["files"], report["bytes"]) == (10_000, 10_000 * 600)
    assert report["read_bytes"] == report["resident_bytes"] == report["bytes"]


@pytest.mark.slow
def test_one_hundred_thousand_small_files_measured(shared_tmp: Path) -> None:
    """The README's numbers: wall time and peak RSS of `preloader warm` on 100,000 files."""
    _many_files(shared_tmp / "model", 100_000)
    done, seconds, peak_rss = _measured_run("warm", "--json", str(shared_tmp / "model"))
    assert done.returncode == errors.EXIT_OK, done.stderr
    report = json.loads(done.stdout)
    assert report["files"] == 100_000
    assert report["read_bytes"] == report["resident_bytes"] == report["bytes"]
    print(
        f"\n100,000 files: {seconds:.1f} s wall, warm pass {report['seconds']:.1f} s, "
        f"{report['cpu_seconds']:.1f} CPU-s in the pass, peak RSS {peak_rss / 2**20:.0f} MiB"
    )
    # Bounded memory: well under a few KiB per file on top of the interpreter.
    assert peak_rss < 512 * 2**20


# ------------------------------------------------------- files changing under the pass


@needs_fuse
@pytest.mark.parametrize(
    ("change", "code", "cause"),
    [
        ("truncated", errors.EXIT_READ_ERRORS, "file shrank while being read"),
        ("deleted", errors.EXIT_READ_ERRORS, "No such file or directory"),
        ("replaced", errors.EXIT_READ_ERRORS, "replaced by another file since planning"),
        ("growing", errors.EXIT_OK, "grew from 1048576 to 2097152 bytes since planning"),
    ],
)
def test_a_file_changing_while_being_warmed_is_named_with_the_change(
    shared_tmp: Path,
    fuse_fs: Callable[..., FuseMount],
    start_cli: Callable[..., CliProcess],
    unchanged: Snapshot,
    change: str,
    code: int,
    cause: str,
) -> None:
    """One worker reads a FUSE file that waits at a gate, then the disk model: the change
    lands after planning and before the victim is opened, every time."""
    fs = fuse_fs({"files": {"gate.json": {"size": 4096, "gate_from": 0}}})
    model = _model(shared_tmp / "model")
    victim = _write(model / "adapter_model.safetensors", 1 << 20)
    run = start_cli("warm", "--json", "-c", "1", str(fs.path("gate.json")), str(model))
    try:
        fs.wait_for("GATE read /gate.json")
    except AssertionError:
        raise AssertionError(run.stderr_lines) from None  # why it never got there
    if change == "truncated":
        os.truncate(victim, 1000)
    elif change == "deleted":
        victim.unlink()
    elif change == "replaced":
        _write(model / "new", 1 << 20).replace(victim)
    else:
        with open(victim, "ab") as handle:
            handle.write(b"g" * (1 << 20))
    unchanged(model)  # from here on, only preloader could change it
    fs.release()
    exit_code, stdout = run.finish(timeout=60)
    assert exit_code == code, run.stderr_lines
    report = json.loads(stdout)
    named = {d["path"]: d["cause"] for d in report["error_details"] + report["not_resident"]}
    assert named.keys() == {str(victim)}
    assert named[str(victim)].startswith(cause)
    others = [str(p) for p in model.iterdir() if p != victim]
    assert all(p not in named for p in others)
    assert "Traceback" not in "\n".join(run.stderr_lines)


# ------------------------------------------------------------ the same files twice


@needs_root
def test_a_bind_mount_and_a_second_path_reaching_the_same_files_read_them_once(
    shared_tmp: Path, unchanged: Snapshot
) -> None:
    model = _model(shared_tmp / "model")
    bound = shared_tmp / "bound"
    bound.mkdir()
    os.symlink(model, shared_tmp / "alias")
    if subprocess.run(["mount", "--bind", str(model), str(bound)], check=False).returncode:
        pytest.skip("bind mounts are not permitted here")
    try:
        unchanged(model)
        done = run_cli("warm", "--json", str(model), str(bound), str(shared_tmp / "alias"))
    finally:
        subprocess.run(["umount", str(bound)], check=True)
    assert done.returncode == errors.EXIT_OK, done.stderr
    report = json.loads(done.stdout)
    assert report["files"] == 3
    assert report["read_bytes"] == report["bytes"] == 300 + 256 * 1024 + 200 * 1024 + 5
    reasons = {d["reason"] for d in report["skipped_details"]}
    assert reasons == {"same file already planned (link or bind mount)"}
    assert report["skipped"] == 6


@needs_fuse
def test_a_bind_mount_of_network_storage_is_read_from_the_storage_once(
    shared_tmp: Path, fuse_fs: Callable[..., FuseMount]
) -> None:
    """The storage's own count: every byte served once, though two paths lead to it.

    The filesystem drops the cache at every open, so a second read through the other path
    would reach the storage again; only the one-page direct_io probe comes on top.
    """
    size = 3 << 20
    fs = fuse_fs({"cache": "drop", "files": {"w.safetensors": {"size": size}}})
    bound = shared_tmp / "bound"
    bound.mkdir()
    if subprocess.run(["mount", "--bind", str(fs.mountpoint), str(bound)]).returncode:
        pytest.skip("bind mounts are not permitted here")
    try:
        done = run_cli("warm", "--json", str(fs.mountpoint), str(bound))
    finally:
        subprocess.run(["umount", "-l", str(bound)], check=True)
    report = json.loads(done.stdout)
    assert report["files"] == 1 and report["read_bytes"] == size
    served = fs.bytes_served("w.safetensors")
    assert size <= served <= size + 4096
    assert fs.events("MUTATE") == []
