"""Sizes, rates and paths as people read them: parsing and printing; pure functions.

A shared leaf: imports nothing of the package.
"""

from __future__ import annotations

import mmap
import os
import re

__all__ = ["PAGE_SIZE", "format_bytes", "parse_size", "printable"]

PAGE_SIZE = mmap.PAGESIZE
"""Bytes in one page of the page cache."""

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"64MiB"`` -> 67108864. Decimal (``MB``, ``G``) and binary (``MiB``) units.

    :raises ValueError: with a message naming the text, for anything else.
    """
    match = _SIZE.match(text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 1048576, 64MiB, 1G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(count: float) -> str:
    """1536 -> ``"1.5 KiB"``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def printable(path: str) -> str:
    """A path safe to put on one line of a log or a terminal.

    Undecodable bytes come out as ``\\xNN`` and control characters (a newline in a file
    name) as escapes, so one path is always one line.
    """
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
