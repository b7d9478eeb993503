"""Residency on real files: eviction of a test's own files and the outside witnesses.

Tests evict only their own files (POSIX_FADV_DONTNEED), never the whole cache.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from preloader.kernel import pagecache


def evict_tree(root: str | os.PathLike[str]) -> None:
    """Drop the page cache of every regular file under root (as vmtouch -e does)."""
    for path in _files(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            pagecache.evict(fd)
        finally:
            os.close(fd)


def _files(root: str | os.PathLike[str]) -> list[str]:
    root = os.fspath(root)
    if os.path.isfile(root):
        return [root]
    return [
        os.path.join(d, f)
        for d, _, names in os.walk(root)
        for f in names
        if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))
    ]


def vmtouch_resident(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(resident pages, total pages) as vmtouch reports them: the outside witness."""
    out = subprocess.run(
        ["vmtouch", "-f", os.fspath(path)], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Resident Pages:\s+(\d+)/(\d+)", out)
    assert match, out
    return int(match.group(1)), int(match.group(2))


def fincore_resident_bytes(*paths: str | os.PathLike[str]) -> int:
    """Resident bytes of the given files together, by util-linux fincore."""
    if shutil.which("fincore") is None:
        pytest.skip("fincore (util-linux) not installed")
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(os.fspath, paths)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(line) for line in out.split())
