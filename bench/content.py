"""Where the bench fixtures' bytes come from: the synthetic pattern, or real files.

Synthetic bytes (:mod:`bench.pattern`) keep the fixtures' own disk and page cache
out of a throughput measurement. The end-to-end scenario needs real bytes (a
loader parses the safetensors header and tensors), so a fixture can serve files
from a backing directory instead: object key or mount path ``p`` is the file
``BACKING/p``. The bench evicts those backing files before every cold run too.
"""

import os
import threading
from pathlib import Path

from .pattern import object_bytes, object_seed

__all__ = ["Content"]


class Content:
    """Bytes of named objects: synthetic, or read from files under *backing*."""

    def __init__(self, names: list[str], backing: Path | None = None) -> None:
        self.backing = backing
        self._seeds = {name: object_seed(name) for name in names}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                assert self.backing is not None
                fd = os.open(self.backing / name.lstrip("/"), os.O_RDONLY)
                self._fds[name] = fd
            return fd

    def read(self, name: str, offset: int, size: int) -> bytes:
        """Return *size* bytes of object *name* from *offset* (clipped by the caller).

        :param name: object key or path inside the fixture, as listed in its manifest.
        :param offset: byte offset.
        :param size: byte count.
        :return: the bytes.
        :raises OSError: when a backing file cannot be read.
        """
        if self.backing is None:
            return object_bytes(self._seeds[name], offset, size)
        fd = self._fd(name)
        data = os.pread(fd, size, offset)
        while len(data) < size:  # pread may return short on a large request
            more = os.pread(fd, size - len(data), offset + len(data))
            if not more:
                raise OSError(f"{self.backing / name.lstrip('/')}: shorter than the manifest says")
            data += more
        return data
