"""``-c auto`` (the default) on a storage whose throughput stops growing with readers.

Two files served at 64 MiB/s each, all their readers together: four readers (two a
file) already take everything the mount gives, and eight read no faster. The tuner must
measure both and settle at the knee, the fewer readers, not at whichever window happened
to read a hair faster.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from preloader.engine.warm import warm_plan
from preloader.planning.planner import build_plan
from preloader.settings import AUTO_CONCURRENCY, AUTO_START_CONCURRENCY, WarmOptions

from ..lib.fusefs import FuseMount
from ..lib.marks import needs_fuse

MiB = 1024 * 1024


@needs_fuse
@pytest.mark.anyio
async def test_auto_settles_at_the_fewest_readers_that_read_as_fast(
    fuse_fs: Callable[..., FuseMount],
) -> None:
    # 640 MiB at 128 MiB/s: about 5 s, room for a window at 4 readers (128 MiB) and one
    # at 8 (256 MiB) with chunks left to read after both.
    files = {name: {"size": 320 * MiB, "rate": 64 * MiB} for name in ("a.bin", "b.bin")}
    fs = fuse_fs({"cache": "keep", "files": files})
    plan = build_plan([str(fs.mountpoint)])
    report = await warm_plan(plan, WarmOptions(concurrency=AUTO_CONCURRENCY))
    assert report.errors == ()
    assert report.autotune is not None
    steps = [readers for readers, _ in report.autotune.steps]
    assert steps[:2] == [AUTO_START_CONCURRENCY, 2 * AUTO_START_CONCURRENCY]
    assert report.autotune.settled == report.concurrency == AUTO_START_CONCURRENCY
    assert "must gain" in report.autotune.why
