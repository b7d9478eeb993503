"""Reliability matrix, failing storage: the real CLI on FUSE filesystems that misbehave.

The filesystems (tests/lib/fusefs.py) serve synthetic files and fail on purpose: EIO for some
byte ranges, reads or opens that never return, a page cache dropped at every open, reads
that bypass the cache (direct_io). Each run must name the file and the cause, exit with
the documented code, and never ask the filesystem to change anything (the filesystem
logs every such attempt as ``MUTATE``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from preloader import errors

from ..lib.cli import CliProcess, run_cli
from ..lib.fusefs import FuseMount
from ..lib.marks import needs_fuse

pytestmark = needs_fuse

MiB = 1 << 20

MODEL: dict[str, dict[str, Any]] = {
    "config.json": {"size": 700},
    "tokenizer.json": {"size": 5000},
    "model-00001-of-00002.safetensors": {"size": 3 * MiB},
    "model-00002-of-00002.safetensors": {"size": 2 * MiB + 11},
}


def _spec(cache: str = "keep", changes: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """MODEL served with ``cache`` behaviour, some files changed (see tests/lib/fusefs.py)."""
    files = {name: {**entry, **(changes or {}).get(name, {})} for name, entry in MODEL.items()}
    return {"cache": cache, "files": files}


def _warm(fs: FuseMount, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = run_cli("warm", "--json", "--chunk-size", "1MiB", *args, str(fs.mountpoint), env=env)
    assert "Traceback" not in done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    report["logs"] = [json.loads(line) for line in done.stderr.splitlines()]
    assert report["exit_code"] == done.returncode
    return report


def _by_name(fs: FuseMount, details: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return {d["path"].removeprefix(f"{fs.mountpoint}/"): d[key] for d in details}


def test_healthy_storage_is_warmed_and_verified(fuse_fs: Callable[..., FuseMount]) -> None:
    fs = fuse_fs(_spec("keep"))
    report = _warm(fs)
    assert report["exit_code"] == errors.EXIT_OK
    assert report["resident_bytes"] == report["read_bytes"] == report["bytes"]
    assert fs.events("MUTATE") == []


def test_eio_in_a_range_names_the_file_and_the_range(fuse_fs: Callable[..., FuseMount]) -> None:
    bad = {"eio": [[MiB + 4096, MiB + 8192]]}
    fs = fuse_fs(_spec(changes={"model-00001-of-00002.safetensors": bad}))
    report = _warm(fs)
    assert report["exit_code"] == errors.EXIT_READ_ERRORS
    causes = _by_name(fs, report["error_details"], "cause")
    assert causes == {
        "model-00001-of-00002.safetensors": "Input/output error reading bytes 1048576-2097151"
    }
    failed = [line for line in report["logs"] if line["event"] == "read failed"]
    assert [line["path"] for line in failed] == [str(fs.path("model-00001-of-00002.safetensors"))]
    # everything else was warmed
    assert report["not_resident"] == []
    assert fs.bytes_served("model-00002-of-00002.safetensors") == 2 * MiB + 11
    assert fs.events("MUTATE") == []


@pytest.mark.parametrize(
    ("stalled", "stall_from"), [("model-00001-of-00002.safetensors", MiB), ("config.json", 0)]
)
def test_a_stalled_read_is_given_up_after_the_read_timeout_and_the_rest_goes_on(
    fuse_fs: Callable[..., FuseMount],
    start_cli: Callable[..., CliProcess],
    stalled: str,
    stall_from: int,
) -> None:
    """Through the environment twin. A stalled small file blames only itself: tokenizer.json,
    handed to the same worker thread right after config.json, is read anew."""
    fs = fuse_fs(_spec(changes={stalled: {"stall_from": stall_from}}))
    run = start_cli(
        "warm", "--json", "--chunk-size", "1MiB", str(fs.mountpoint),
        env={"PRELOADER_READ_TIMEOUT": "1"},
    )  # fmt: skip
    # The exit does not wait for the filesystem: the stuck thread is abandoned.
    code, stdout = run.finish(timeout=30)
    assert fs.wait_for(f"STALL read /{stalled}")
    report = json.loads(stdout)
    assert code == errors.EXIT_READ_ERRORS
    causes = _by_name(fs, report["error_details"], "cause")
    assert causes == {stalled: "read stalled for more than 1 s; file given up"}
    residency = {
        name: fs.bytes_served(name) for name in MODEL if name != stalled
    }  # every other file came from the storage in full
    assert residency == {name: MODEL[name]["size"] for name in residency}
    assert report["residency_unknown_reason"].endswith(
        "not measured: its read stalled, and opening it again could hang too"
    )
    assert fs.events("MUTATE") == []


def test_a_filesystem_dropping_the_cache_at_open_is_not_counted_warm(
    fuse_fs: Callable[..., FuseMount],
) -> None:
    fs = fuse_fs(_spec("drop"))
    report = _warm(fs)
    assert report["exit_code"] == errors.EXIT_NOT_RESIDENT
    assert report["resident_bytes"] == 0 and report["read_bytes"] == report["bytes"]
    causes = _by_name(fs, report["not_resident"], "cause")
    assert causes.keys() == MODEL.keys()
    assert all("invalidates the page cache at open" in cause for cause in causes.values())
    warned = [line["path"] for line in report["logs"] if line["event"] == "not resident"]
    assert len(warned) == len(MODEL)


def test_a_direct_io_filesystem_is_reported_as_bypassing_the_cache(
    fuse_fs: Callable[..., FuseMount],
) -> None:
    fs = fuse_fs(_spec("direct"))
    report = _warm(fs)
    assert report["exit_code"] == errors.EXIT_NOT_RESIDENT
    assert report["resident_bytes"] == 0
    causes = _by_name(fs, report["not_resident"], "cause")
    assert causes.keys() == MODEL.keys()
    assert all(cause.startswith("reads bypass the page cache") for cause in causes.values())


@pytest.mark.parametrize("method", ["read", "mmap"])
def test_direct_io_through_the_copying_and_mapping_paths_is_named_too(
    fuse_fs: Callable[..., FuseMount], method: str
) -> None:
    """read() on direct_io never fills the cache; mmap is refused and falls back to it."""
    fs = fuse_fs(_spec("direct"))
    report = _warm(fs, "--method", method)
    assert report["exit_code"] == errors.EXIT_NOT_RESIDENT
    causes = _by_name(fs, report["not_resident"], "cause")
    assert all(cause.startswith("reads bypass the page cache") for cause in causes.values()), causes


def test_a_verification_open_that_never_returns_is_given_up(
    fuse_fs: Callable[..., FuseMount], start_cli: Callable[..., CliProcess]
) -> None:
    """The summary comes after the read timeout. The process itself cannot end before the
    filesystem answers: a thread in a FUSE request already sent to the daemon waits
    uninterruptibly (even SIGKILL waits), so the exit code arrives once the mount goes."""
    fs = fuse_fs(_spec(changes={"tokenizer.json": {"stall_open": 2}}))
    run = start_cli(
        "warm", "--json", "--chunk-size", "1MiB", "--read-timeout", "1", str(fs.mountpoint)
    )
    summary = run.wait_for("warm finished, residency unverified", timeout=30)
    assert "tokenizer.json: not measured: stalled for more than 1 s" in summary["unverified"]
    fs.__exit__(None, None, None)
    code, stdout = run.finish(timeout=30)
    assert code == errors.EXIT_OK
    report = json.loads(stdout)
    assert report["read_bytes"] == report["bytes"] and report["errors"] == 0
