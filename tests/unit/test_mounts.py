"""The mount table: one parser, one cached table of filesystem types by device."""

from __future__ import annotations

import os
from pathlib import Path

from preloader.kernel.mounts import filesystem_type, mount_types, parse_mountinfo, refresh_mounts

ROOT = "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
S3 = "40 22 0:41 / /mnt/s3 rw shared:7 - fuse.s3fs s3fs rw,user_id=0\n"


def test_every_field_of_a_line_with_optional_fields() -> None:
    [root, s3] = parse_mountinfo(ROOT + S3 + "no separator here\n")
    assert (root.device, root.fstype, root.mount_point) == (os.makedev(254, 0), "ext4", "/")
    assert (s3.device, s3.fstype, s3.super_options) == (
        os.makedev(0, 41),
        "fuse.s3fs",
        ("rw", "user_id=0"),
    )


def test_a_bind_mount_keeps_the_first_type_of_its_device(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(ROOT + "50 22 254:0 /srv /srv rw - ext4 /dev/vda rw\n")
    assert mount_types(str(table)) == {os.makedev(254, 0): "ext4"}
    assert mount_types(str(tmp_path / "missing")) == {}


def test_a_device_mounted_since_is_found_by_reading_the_table_again(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(ROOT)
    refresh_mounts(str(table))
    assert filesystem_type(os.makedev(254, 0), str(table)) == "ext4"
    table.write_text(ROOT + S3)  # mounted after the table was read
    assert filesystem_type(os.makedev(0, 41), str(table)) == "fuse.s3fs"
    # A device no mount lists is asked about once; the answer stays until a refresh.
    assert filesystem_type(os.makedev(7, 7), str(table)) is None
    table.write_text(ROOT + S3 + "60 22 7:7 / /mnt/loop rw - xfs /dev/loop7 rw\n")
    assert filesystem_type(os.makedev(7, 7), str(table)) is None
    refresh_mounts(str(table))
    assert filesystem_type(os.makedev(7, 7), str(table)) == "xfs"
