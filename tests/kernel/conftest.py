"""Fixtures the kernel tests share."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from preloader.cli.demomodel import write_demo_model

from ..lib.residency import evict_tree

MiB = 1024 * 1024
BIG_MODEL_BYTES = 320 * MiB


@pytest.fixture(scope="session")
def _big_model_files() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="preloader-test-", dir="/var/tmp"))
    try:
        write_demo_model(str(root / "model"), BIG_MODEL_BYTES, shards=10)
        yield root / "model"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def big_model(_big_model_files: Path) -> Path:
    """A 320 MiB, 10-shard safetensors model on local disk (written once a session),
    evicted: larger than the memory cgroup limits the budget tests set."""
    evict_tree(_big_model_files)
    return _big_model_files
