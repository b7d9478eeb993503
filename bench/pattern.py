"""Deterministic synthetic file content shared by the bench fixtures.

The S3 server and the FUSE filesystem serve objects that exist nowhere on disk:
their bytes are a slice of one random block, shifted per object. That keeps the
fixtures' own page cache and disk out of the measurement (the page cache the
bench measures is the mount's, nothing else) and costs no disk space.
"""

import hashlib
import random

__all__ = ["PATTERN_SIZE", "object_bytes", "object_seed"]

PATTERN_SIZE = 1 << 20
_PATTERN = random.Random(20240605).randbytes(PATTERN_SIZE)
_DOUBLED = memoryview(_PATTERN + _PATTERN)


def object_seed(name: str) -> int:
    """Return a stable shift for the object called *name*.

    :param name: object key or file path inside the fixture.
    :return: an offset into the pattern, different per name.
    """
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") % PATTERN_SIZE


def object_bytes(seed: int, offset: int, size: int) -> bytes:
    """Return *size* bytes of the object with *seed* starting at *offset*.

    :param seed: the object's shift, from :func:`object_seed`.
    :param offset: byte offset inside the object.
    :param size: how many bytes; the caller clips it to the object's size.
    :return: the bytes.
    """
    parts: list[bytes] = []
    while size > 0:
        start = (seed + offset) % PATTERN_SIZE
        take = min(size, PATTERN_SIZE)
        parts.append(bytes(_DOUBLED[start : start + take]))
        offset += take
        size -= take
    return b"".join(parts) if len(parts) != 1 else parts[0]
