"""Bandwidth caps for the bench fixtures, as remote object stores impose them."""

import threading
import time

__all__ = ["Pacer", "wait_for_slots"]


class Pacer:
    """A bandwidth cap shared by whoever holds it: a connection, a stream, a link.

    Each transfer reserves the next free slot on a virtual clock, so transfers
    that share one pacer add up to at most ``bytes_per_second``, however many
    threads ask at once. ``None`` means no cap.
    """

    def __init__(self, bytes_per_second: float | None) -> None:
        self.bytes_per_second = bytes_per_second
        self._lock = threading.Lock()
        self._next_free = 0.0

    def reserve(self, nbytes: int) -> float:
        """Reserve time for *nbytes* and return the monotonic time they may be done.

        :param nbytes: size of the transfer.
        :return: the ``time.monotonic()`` deadline before which it must not finish.
        """
        if not self.bytes_per_second:
            return 0.0
        with self._lock:
            start = max(time.monotonic(), self._next_free)
            self._next_free = start + nbytes / self.bytes_per_second
            return self._next_free


def wait_for_slots(nbytes: int, *pacers: Pacer) -> None:
    """Sleep until every pacer allows a transfer of *nbytes* to be done.

    :param nbytes: size of the transfer.
    :param pacers: the caps it passes through (connection, link, ...).
    """
    deadline = max((pacer.reserve(nbytes) for pacer in pacers), default=0.0)
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)
