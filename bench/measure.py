"""Run one competitor as a child process and measure it like a stopwatch and `time -v`.

Wall time from ``perf_counter``; CPU (user+sys) and peak RSS from ``os.wait4``,
whose rusage covers the child and every descendant it waited for (so the
one-liner's ``find``, ``xargs``, ``sh`` and ``cat`` processes all count).
Peak RSS comes from GNU ``time`` wrapped around the child when it is installed:
a process forked or vforked from this (large) Python interpreter inherits the
interpreter's high-water RSS into its own ``ru_maxrss`` (Linux records the old
mm's peak at ``exec``), so ``wait4`` alone would report ~50 MB for a bare
``cat``. GNU time is small, so what it reports is the child's own peak.

Page-cache state is set and read with ``vmtouch``, never with preloader.
"""

import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ChildResult",
    "Residency",
    "evict",
    "residency",
    "run_child",
]

_RESIDENT = re.compile(r"Resident Pages:\s*(\d+)/(\d+)")


@dataclass(frozen=True)
class ChildResult:
    """What one child run cost."""

    argv: tuple[str, ...]
    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    max_rss_kib: int
    stdout: str
    stderr: str
    rss_exact: bool = True

    @property
    def cpu_s(self) -> float:
        """User plus system CPU seconds of the child and its descendants."""
        return self.user_s + self.sys_s


@dataclass(frozen=True)
class Residency:
    """Pages of a tree in the page cache, as ``vmtouch`` counts them."""

    resident_pages: int
    total_pages: int

    @property
    def ratio(self) -> float:
        """Resident share, 1.0 for an empty tree."""
        return self.resident_pages / self.total_pages if self.total_pages else 1.0


def run_child(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 900.0,
) -> ChildResult:
    """Run *argv* to completion and return its wall time, rusage and output.

    Output goes to temporary files rather than pipes, so a chatty child never
    blocks on a full pipe while we sit in ``wait4``.

    :param argv: the command.
    :param env: its environment (``None``: ours).
    :param cwd: its working directory.
    :param timeout_s: kill it (and its process group) after this long.
    :return: the measurements.
    :raises subprocess.TimeoutExpired: when it ran past *timeout_s*.
    """
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile(mode="r") as rss_file,
    ):
        command = list(argv)
        if gnu_time:
            command = [gnu_time, "-f", "%M", "-o", rss_file.name, *command]
        start = time.perf_counter()
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=err,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
        deadline = start + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(proc.pid, 9)
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise subprocess.TimeoutExpired(list(argv), timeout_s)
            # Poll finely at first (short runs), coarser later (long runs).
            time.sleep(0.001 if time.perf_counter() - start < 1 else 0.01)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        rss_lines = rss_file.read().split()
        exact = bool(gnu_time and rss_lines and rss_lines[-1].isdigit())
        return ChildResult(
            argv=tuple(argv),
            returncode=proc.returncode,
            wall_s=wall,
            user_s=usage.ru_utime,
            sys_s=usage.ru_stime,
            max_rss_kib=int(rss_lines[-1]) if exact else usage.ru_maxrss,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            rss_exact=exact,
        )


def residency(path: Path) -> Residency:
    """Count the resident pages under *path* with ``vmtouch``.

    :param path: a file or directory (walked recursively, symlinks not followed).
    :return: resident and total pages.
    :raises RuntimeError: when vmtouch fails or prints nothing we understand.
    """
    result = subprocess.run(
        ["vmtouch", "-m", "1024G", str(path)], capture_output=True, text=True, check=False
    )
    match = _RESIDENT.search(result.stdout)
    if result.returncode != 0 or not match:
        raise RuntimeError(f"vmtouch {path} failed: {result.stderr.strip() or result.stdout}")
    return Residency(int(match.group(1)), int(match.group(2)))


def touch(path: Path) -> None:
    """Bring every page of the files under *path* into the page cache (``vmtouch -t``).

    :param path: a file or directory.
    :raises RuntimeError: when vmtouch fails.
    """
    result = subprocess.run(
        ["vmtouch", "-q", "-t", "-m", "1024G", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"vmtouch -t {path} failed: {result.stderr.strip()}")


def pin(path: Path, pidfile: Path) -> int:
    """Bring every page under *path* into the page cache and hold it there (``vmtouch -dl``:
    a daemon that keeps the pages locked until it is killed).

    :param path: a file or directory.
    :param pidfile: where vmtouch writes the daemon's pid (it removes it when it exits).
    :return: the daemon's pid, for :func:`unpin`.
    :raises RuntimeError: when vmtouch fails.
    """
    # Read first, then lock through opens of the daemon's own: a FUSE client keeps what it
    # fetched for an open (s3fs: a temporary copy on disk) for as long as the lock holds it.
    touch(path)
    argv = ["vmtouch", "-q", "-d", "-l", "-w", "-m", "1024G", "-P", str(pidfile), str(path)]
    # Not a pipe: the daemon keeps what it inherits open, and a pipe would never end.
    with tempfile.TemporaryFile("w+") as errors:
        code = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=errors, check=False)
        errors.seek(0)
        if code.returncode != 0 or not pidfile.exists():
            raise RuntimeError(f"vmtouch -dl {path} failed: {errors.read().strip()}")
    return int(pidfile.read_text())


def unpin(pid: int) -> None:
    """End a :func:`pin` daemon and wait (10 s at most) until it is gone: its pages are
    no longer locked, and can be evicted for the next run."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        select.select([pidfd], [], [], 10.0)  # readable once the process has exited
    finally:
        os.close(pidfd)


def evict(path: Path) -> None:
    """Drop the clean page-cache pages of the files under *path*, and only those.

    ``vmtouch -e`` is ``posix_fadvise(POSIX_FADV_DONTNEED)`` per file. It works
    through a FUSE mount too (it drops the mount's pages, not the server's).
    Never a global ``drop_caches``: others share this machine's page cache.

    :param path: a file or directory.
    :raises RuntimeError: when vmtouch fails.
    """
    result = subprocess.run(
        ["vmtouch", "-q", "-e", "-m", "1024G", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"vmtouch -e {path} failed: {result.stderr.strip()}")
