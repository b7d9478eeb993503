"""The benchmark suite still runs end to end (issue 5), at toy sizes.

These are not benchmarks: they assert no timings, only that every competitor
ran on a cold cache, that the results were written, and that the FUSE fixtures
really served the bytes and were unmounted afterwards.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def _filesystem_type(path: Path) -> str:
    best, fstype = "", ""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, mountpoint, kind = line.split()[:3]
            if str(path).startswith(mountpoint) and len(mountpoint) > len(best):
                best, fstype = mountpoint, kind
    return fstype


@pytest.fixture
def bench_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A data directory whose pages can be evicted (not tmpfs) and an output directory."""
    if _filesystem_type(tmp_path) in {"tmpfs", "ramfs"}:
        data = Path(tempfile.mkdtemp(prefix="preloader-bench-test-", dir="/var/tmp"))
    else:
        data = tmp_path / "data"
    try:
        yield data, tmp_path / "out"
    finally:
        shutil.rmtree(data, ignore_errors=True)


def _run_bench(data: Path, out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--data-dir",
            str(data),
            "--out",
            str(out),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    raw = json.loads((out / "raw" / "latest.json").read_text())
    return result, raw


def _requires(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install {' '.join(missing)})")


def test_local_scenario_runs_every_competitor_on_a_cold_cache(
    bench_dirs: tuple[Path, Path],
) -> None:
    _requires("vmtouch")
    data, out = bench_dirs

    result, raw = _run_bench(data, out, "--scenarios", "sharded")

    records = raw["records"]
    families = {record["family"] for record in records}
    expected = {"one-liner", "vmtouch", "preloader"} | ({"fio"} if shutil.which("fio") else set())
    assert families == expected
    assert {record["tool"] for record in records} >= {"preloader", "preloader-auto"}
    for record in records:
        assert record["ok"], record
        assert record["resident_before"] < 0.01, f"{record['tool']} did not start cold"
        if record["family"] == "fio":  # O_DIRECT: it reads the device and caches nothing
            assert record["bytes"] > 0, "fio read nothing (block larger than the files?)"
        else:
            assert record["resident_after"] > 0.99, record
        assert record["max_rss_kib"] > 0
    preloader = next(record for record in records if record["tool"] == "preloader")
    assert preloader["preloader"]["bytes"] == preloader["bytes"]
    assert raw["startup"]["cpu_s"] > 0
    table = (out / "results.md").read_text()
    assert "| preloader (default) |" in table
    assert "| one-liner (cat, -P 4) |" in table
    assert "[1/" in result.stderr  # the progress line


@pytest.mark.fuse
def test_fuse_scenarios_read_through_the_mounts_and_unmount(
    bench_dirs: tuple[Path, Path],
) -> None:
    _requires("vmtouch", "s3fs")
    if not Path("/dev/fuse").exists():
        pytest.skip("/dev/fuse is missing")
    if os.geteuid() != 0:
        pytest.skip("mounting the bench's FUSE fixtures needs root")
    pytest.importorskip("mfusepy", reason="pip install '.[bench]' for the FUSE fixture")
    data, out = bench_dirs

    _, raw = _run_bench(
        data,
        out,
        "--scenarios",
        "s3fs,s3fs-large,fuse-parallel",
        "--tools",
        "one-liner,preloader,s3-direct",
    )

    records = raw["records"]
    assert {record["scenario"] for record in records} == {"s3fs", "s3fs-large", "fuse-parallel"}
    # The network's limit runs beside every s3fs scenario, and only there.
    assert {r["scenario"] for r in records if r["tool"] == "s3-direct"} == {"s3fs", "s3fs-large"}
    for record in records:
        assert record["ok"], record
        assert record["resident_before"] < 0.01, f"{record['tool']} did not start cold"
        # Every cold run fetched the whole tree from the fixture, not from a cache.
        assert record["fixture_bytes"] >= record["bytes"], record
    with open("/proc/mounts") as mounts:
        assert str(data) not in mounts.read()
