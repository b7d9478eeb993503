"""Whether a path still names the planned file: the one rule every check uses.

A planned file is known by what its filesystem keeps stable. On a filesystem known to
keep inode numbers (:data:`STABLE_INODE_FILESYSTEMS`, looked up by the file's planned
``st_dev`` in the mount table, :func:`~.mounts.filesystem_type`) that is its device and
inode: another inode under the same path is another file. Elsewhere (every ``fuse.*``
type, and a device the mount table does not name) inode numbers may be handed out per
lookup: s3fs, ossfs and other filesystems on libfuse's high-level API give a file a new
number once the kernel forgets its dentry, so a renumbered inode alone is no change;
there the file is the planned one while its device and modification time are. A changed
size is reported by the callers as grown or shrunk, on every filesystem.
"""

from __future__ import annotations

import os

from .mounts import MOUNTINFO, filesystem_type

__all__ = ["STABLE_INODE_FILESYSTEMS", "inodes_stable", "is_planned"]

STABLE_INODE_FILESYSTEMS = frozenset(
    {
        "ext2",
        "ext3",
        "ext4",
        "xfs",
        "btrfs",
        "f2fs",
        "jfs",
        "reiserfs",
        "bcachefs",
        "nilfs2",
        "zfs",
        "tmpfs",
        "ramfs",
        "overlay",
        "nfs",
        "nfs4",
        "ceph",
        "cifs",
        "smb3",
        "lustre",
        "gpfs",
        "9p",
        "virtiofs",
        "squashfs",
        "erofs",
        "iso9660",
    }
)
"""Filesystems whose inode numbers stay the same for a file as long as it exists."""


def inodes_stable(dev: int, mountinfo: str = MOUNTINFO) -> bool:
    """Whether the filesystem on ``dev`` keeps a file's inode number.

    By the cached mount table (:func:`~.mounts.filesystem_type`); a device it does not
    list counts as unstable (its inode is not trusted).
    """
    return filesystem_type(dev, mountinfo) in STABLE_INODE_FILESYSTEMS


def is_planned(st: os.stat_result, dev: int, ino: int, mtime_ns: int | None) -> bool:
    """Whether ``st`` (a ``stat`` of the planned path now) is still the planned file.

    :param dev: the planned ``st_dev``.
    :param ino: the planned ``st_ino`` (compared only where :func:`inodes_stable`).
    :param mtime_ns: the planned ``st_mtime_ns`` (compared only where the inode is not);
        ``None`` when not known.
    :return: ``False`` for another file under the planned path.
    """
    if st.st_dev != dev:
        return False
    if inodes_stable(dev):
        return st.st_ino == ino
    return mtime_ns is None or st.st_mtime_ns == mtime_ns
