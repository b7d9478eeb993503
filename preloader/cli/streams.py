"""Standard streams that a closed, full or broken output cannot turn into a traceback.

A postStart hook may run with stdout or stderr closed, a user pipes ``status | head -1``,
a log volume fills up (``/dev/full``: ENOSPC). What the command did and its exit code do
not depend on whether anyone reads the output: a write that fails is dropped, the stream
is pointed at ``/dev/null`` so nothing fails again (not even Python's flush at exit), and
the first failure on stdout is logged on stderr (while that one still works).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import TextIO

from ..logs import get_logger

__all__ = ["TolerantStream", "protect_streams"]


class TolerantStream(io.TextIOBase):
    """A text stream over ``raw`` whose writes and flushes never raise.

    :ivar lost: why output was lost (the first failure), or ``None``.
    """

    def __init__(self, raw: TextIO, fd: int, name: str, *, closed: bool = False) -> None:
        """:param closed: the fd was closed when the command started (now ``/dev/null``):
        the first write is lost and told as such."""
        super().__init__()
        self._raw = raw
        self._fd = fd
        self._closed = closed
        self.name = name
        self.lost: str | None = None

    def write(self, text: str) -> int:
        if self.lost is None:
            if self._closed:
                self._tell("the stream was closed when the command started")
                return len(text)
            try:
                self._raw.write(text)
            except (OSError, ValueError) as err:
                self._failed(err)
        return len(text)

    def flush(self) -> None:
        if self.lost is None:
            try:
                self._raw.flush()
            except (OSError, ValueError) as err:
                self._failed(err)

    def isatty(self) -> bool:
        try:
            return self._raw.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self._fd

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._raw, "encoding", None) or "utf-8"

    def _failed(self, err: BaseException) -> None:
        # Whatever the raw stream still buffers goes nowhere, and so does all that follows.
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self._fd)
        finally:
            os.close(null)
        with contextlib.suppress(OSError, ValueError):
            self._raw.flush()
        self._tell(f"{getattr(err, 'strerror', None) or err}")

    def _tell(self, cause: str) -> None:
        self.lost = cause
        if self.name == "stdout":
            # Told on stderr (a closed stderr has nowhere to tell, and stdout keeps --json).
            get_logger().warning("output lost", stream="stdout", cause=cause)


def protect_streams() -> None:
    """Give fds 0-2 a target if they are closed, and wrap stdout and stderr.

    A closed fd 1 or 2 would otherwise be handed out by the next ``open`` and the log
    written into whatever file got it.
    """
    closed = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.add(fd)
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        current = getattr(sys, name)
        if isinstance(current, TolerantStream):
            continue
        if current is None:
            current = open(fd, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        setattr(sys, name, TolerantStream(current, fd, name, closed=fd in closed))
