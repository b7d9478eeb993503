"""Reliability matrix, signals: SIGTERM and SIGINT in every phase, once and twice.

Every case synchronises on what the process or the filesystem printed (a log line, the
FUSE fixture's ``STALL``), never on sleeps. Each ends with a summary on stderr (and the
``--json`` document on stdout), exit code 130 and no traceback; the waits are bounded, so
a hang fails the test. The times from the signal to the summary and to the exit are
printed (``pytest -s``); docs/reliability.md records them.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from preloader import errors

from ..lib.cli import CliProcess
from ..lib.fusefs import FuseMount
from ..lib.marks import needs_fuse

MiB = 1 << 20

SUMMARIES = (
    "warm finished",
    "warm finished, residency unverified",
    "warm finished with problems",
    "stopped before the pass could finish; residency not measured",
)
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}
TIMES = pytest.mark.parametrize("times", [1, 2], ids=["once", "twice"])
WHICH = pytest.mark.parametrize("name", list(SIGNALS))

MODEL: dict[str, dict[str, Any]] = {
    "config.json": {"size": 700},
    "model-00001-of-00002.safetensors": {"size": 3 * MiB},
    "model-00002-of-00002.safetensors": {"size": 2 * MiB},
}


def _spec(changes: dict[str, dict[str, Any]], **extra: object) -> dict[str, Any]:
    files = {name: {**entry, **changes.get(name, {})} for name, entry in MODEL.items()}
    return {"cache": "keep", "files": files, **extra}


def _stop(run: CliProcess, signum: int, times: int, held: bool = False) -> float:
    """Send the signal; the second only once the first was seen. Return when it was sent.

    :param held: the first stop is held up by the storage (for the stop grace), so the
        second one surely lands while the pass still runs and must cut it short. Otherwise
        the first may already have ended it; the second must then do no harm.
    """
    sent = time.monotonic()
    run.signal(signum)
    run.wait_for("stopping")
    if times == 2:
        run.signal(signum)
        if held:
            run.wait_for("stopping now")
    return sent


def _summary(run: CliProcess, sent: float, phase: str) -> tuple[dict[str, Any], float]:
    line = run.wait_for(*SUMMARIES, timeout=30)
    seconds = time.monotonic() - sent
    assert line["exit_code"] == errors.EXIT_INTERRUPTED, line
    print(f"\n{phase}: summary {seconds:.2f} s after the signal")
    return line, seconds


def _finish(run: CliProcess) -> dict[str, Any]:
    code, stdout = run.finish(timeout=30)
    assert code == errors.EXIT_INTERRUPTED
    assert not any("Traceback" in line for line in run.stderr_lines)
    assert all(line.startswith("{") for line in run.stderr_lines)
    report: dict[str, Any] = json.loads(stdout)
    assert report["interrupted"] is True and report["exit_code"] == errors.EXIT_INTERRUPTED
    return report


@WHICH
@TIMES
def test_signal_while_warming(
    shared_tmp: Path, start_cli: Callable[..., CliProcess], name: str, times: int
) -> None:
    # 2 GiB of holes through the copying path, 1 MiB at a time: the pass is under way
    # once the first progress line shows, and far from done.
    path = shared_tmp / "sparse.gguf"
    with open(path, "wb") as handle:
        handle.truncate(2 << 30)
    run = start_cli(
        "warm", "--json", "-c", "1", "--chunk-size", "1MiB", "--method", "read", str(path),
        env={"PRELOADER_PROGRESS_INTERVAL": "0.05"},
    )  # fmt: skip
    run.wait_for("progress")
    sent = _stop(run, SIGNALS[name], times)
    _summary(run, sent, f"warming, {name} x{times}")
    report = _finish(run)
    assert report["read_bytes"] < report["bytes"]


@needs_fuse
@WHICH
@TIMES
def test_signal_while_planning(
    fuse_fs: Callable[..., FuseMount],
    start_cli: Callable[..., CliProcess],
    name: str,
    times: int,
) -> None:
    """The walk hangs in readdir on storage that stopped answering; the stop does not wait."""
    fs = fuse_fs(_spec({}, stall_readdir=["/"]))
    run = start_cli("warm", "--json", str(fs.mountpoint))
    fs.wait_for("STALL readdir /")
    sent = _stop(run, SIGNALS[name], times)
    line, _ = _summary(run, sent, f"planning, {name} x{times}")
    assert line["state"] == "planning"
    # The walking thread sits in a FUSE request the daemon never answers: not even SIGKILL
    # ends such a thread, so the exit status comes once the filesystem goes.
    fs.__exit__(None, None, None)
    report = _finish(run)
    assert report["files"] == 0 and report["state"] == "planning"


@needs_fuse
@WHICH
@TIMES
def test_signal_during_a_stalled_read(
    fuse_fs: Callable[..., FuseMount],
    start_cli: Callable[..., CliProcess],
    name: str,
    times: int,
) -> None:
    """The default read timeout (600 s) is not what bounds a stop: the stop grace is."""
    fs = fuse_fs(_spec({"model-00001-of-00002.safetensors": {"stall_from": MiB}}))
    run = start_cli("warm", "--json", "--chunk-size", "1MiB", str(fs.mountpoint))
    fs.wait_for("STALL read /model-00001-of-00002.safetensors")
    sent = _stop(run, SIGNALS[name], times, held=True)
    _summary(run, sent, f"stalled read, {name} x{times}")
    # Reads wait on the page cache, which a fatal signal does end: no unmount needed.
    report = _finish(run)
    print(f"stalled read, {name} x{times}: exit {time.monotonic() - sent:.2f} s after")
    assert report["read_bytes"] < report["bytes"]


@needs_fuse
@WHICH
@TIMES
def test_signal_while_verifying(
    fuse_fs: Callable[..., FuseMount],
    start_cli: Callable[..., CliProcess],
    name: str,
    times: int,
) -> None:
    """Verification re-opens each file; the second open of one never returns."""
    fs = fuse_fs(_spec({"model-00002-of-00002.safetensors": {"stall_open": 2}}))
    run = start_cli("warm", "--json", "--chunk-size", "1MiB", str(fs.mountpoint))
    fs.wait_for("STALL open /model-00002-of-00002.safetensors")
    sent = _stop(run, SIGNALS[name], times, held=True)
    line, _ = _summary(run, sent, f"verifying, {name} x{times}")
    if times == 1:  # the pass had read everything: the summary is the full report
        assert line["event"] == "warm finished, residency unverified"
        assert "not measured: the pass was stopped" in line["unverified"]
    fs.__exit__(None, None, None)
    report = _finish(run)
    assert report["read_bytes"] == report["bytes"]


def _wait_for_a_thread_in_fuse(pid: int, deadline: float = 30.0) -> None:
    """Return once a thread of ``pid`` sleeps in the kernel's FUSE read path (its wchan,
    or its stack where readable, names fuse or a folio/page wait); fail at the deadline."""
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                wchan = (task / "wchan").read_text()
                stack = (task / "stack").read_text() if (task / "stack").exists() else ""
            except OSError:
                continue
            if any(k in wchan + stack for k in ("fuse", "folio_wait", "wait_on_page")):
                return
        time.sleep(0.01)  # polling the kernel's view of the threads, not a synchronisation guess
    raise AssertionError(f"no thread of {pid} is waiting on a FUSE read")


@needs_fuse
def test_a_read_stuck_in_storage_is_given_up_after_the_engines_stop_grace(
    fuse_fs: Callable[..., FuseMount], start_cli: Callable[..., CliProcess]
) -> None:
    """One signal, a read that never returns: the engine waits its stop grace for the read,
    then abandons it, before the command's own shutdown grace (the backstop, which logs
    ``stop grace ran out`` when it has to cancel everything) runs out."""
    from preloader import cli
    from preloader.engine import reading

    assert reading.STOP_GRACE_SECONDS < cli.SHUTDOWN_GRACE_SECONDS
    fs = fuse_fs(_spec({"model-00001-of-00002.safetensors": {"stall_from": MiB}}))
    run = start_cli("warm", "--json", "--chunk-size", "1MiB", str(fs.mountpoint))
    fs.wait_for("STALL read /model-00001-of-00002.safetensors")
    # The stalled request may be the kernel's readahead, issued before any worker asks for
    # those pages: signal once a worker thread really sleeps on the FUSE read.
    _wait_for_a_thread_in_fuse(run.proc.pid)
    sent = _stop(run, signal.SIGTERM, 1)
    _, seconds = _summary(run, sent, "stalled read, SIGTERM once")
    report = _finish(run)
    assert seconds >= reading.STOP_GRACE_SECONDS  # the stuck read was waited for
    assert "stop grace ran out" not in [line.get("event") for line in run.logs]
    assert report["read_bytes"] < report["bytes"]


@needs_fuse
def test_a_stop_waits_one_grace_in_all_when_reads_and_opens_both_hang(
    fuse_fs: Callable[..., FuseMount], start_cli: Callable[..., CliProcess]
) -> None:
    """Storage that stopped answering (a FUSE daemon stopped): a read hangs, and so does the
    verification's open of another file. The stop grace runs once, from the signal: the
    verification that starts after the stopped read pass gets what is left of it, not a
    grace of its own (it took two, 2.07 s)."""
    from preloader.engine import reading

    fs = fuse_fs(
        _spec(
            {
                "model-00001-of-00002.safetensors": {"stall_from": MiB},
                "model-00002-of-00002.safetensors": {"stall_open": 2},
            }
        )
    )
    run = start_cli("warm", "--json", "--chunk-size", "1MiB", str(fs.mountpoint))
    fs.wait_for("STALL read /model-00001-of-00002.safetensors")
    sent = _stop(run, signal.SIGTERM, 1)
    _, seconds = _summary(run, sent, "stalled read and open, SIGTERM once")
    assert reading.STOP_GRACE_SECONDS <= seconds < 2 * reading.STOP_GRACE_SECONDS
    fs.__exit__(None, None, None)  # a thread in the stuck open is released with the mount
    report = _finish(run)
    assert report["read_bytes"] < report["bytes"]
