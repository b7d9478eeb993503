"""What preloader must never change: a snapshot of a tree to compare before and after."""

from __future__ import annotations

import hashlib
import os
import stat


def tree_snapshot(root: str | os.PathLike[str]) -> dict[bytes, tuple[object, ...]]:
    """Everything preloader must never change under root: for each entry (names as bytes,
    links not followed) its type and mode, size, mtime and ctime, a SHA-256 of a regular
    file's contents and a link's target. FIFOs, sockets and devices are only lstat'ed."""
    top = os.fsencode(root)
    snapshot: dict[bytes, tuple[object, ...]] = {}
    for directory, dirnames, filenames in os.walk(top, followlinks=False):
        for name in [*dirnames, *filenames]:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256()
                with open(path, "rb") as handle:
                    for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                        digest.update(block)
                extra = digest.hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            snapshot[os.path.relpath(path, top)] = (
                st.st_mode,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                extra,
            )
    return snapshot
