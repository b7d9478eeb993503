"""Skip conditions shared by the test modules: what the machine must offer."""

from __future__ import annotations

import os
import shutil

import pytest

needs_vmtouch = pytest.mark.skipif(shutil.which("vmtouch") is None, reason="vmtouch not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
# The marker, not a skip: tests/conftest.py skips every ``fuse`` test where FUSE cannot be
# mounted (:data:`FUSE_MISSING` says why), and marks everything in tests/fuse/ and every
# test that takes the ``fuse_fs`` fixture ``fuse`` too.
needs_fuse = pytest.mark.fuse
FUSE_MISSING = (
    None
    if os.path.exists("/dev/fuse") and shutil.which("fusermount3") and os.geteuid() == 0
    else "needs /dev/fuse, fusermount3 and root"
)
