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

REPO = Path(__file__).resolve().parents[2]


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
    expected = {"one-liner", "vmtouch", "engine-prefetch", "preloader"} | (
        {"fio"} if shutil.which("fio") else set()
    )
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
    assert "| engines' prefetch (4 threads, 16 MiB) |" in table and "vs engines' prefetch" in table
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


def _run_e2e(
    data: Path, out: Path, *args: str, module: str = "bench"
) -> tuple[subprocess.CompletedProcess[str], Any]:
    result = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--data-dir", str(data), "--out", str(out)]
        + (["--scenarios", "e2e"] if module == "bench" else [])
        + list(args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads((out / "raw" / "e2e-latest.json").read_text())


def _tensor_bytes(model: Path) -> int:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return int(index["metadata"]["total_size"])


def test_e2e_scenario_loads_a_real_model_in_every_mode_from_a_cold_cache(
    bench_dirs: tuple[Path, Path],
) -> None:
    _requires("vmtouch")
    pytest.importorskip("safetensors")
    data, out = bench_dirs

    _, raw = _run_e2e(
        data, out, "--e2e-storage", "local", "--e2e-framework", "np", "--e2e-startup", "1"
    )

    records = raw["records"]
    assert raw["framework"] == "np"
    modes = {record["mode"] for record in records}
    expected = {
        "cold",
        "one-liner",
        "warm",
        "engine-prefetch",
        "sidecar-readyz",
        "sidecar-startz",
        "sidecar-startz+engine-prefetch",
        "resident",
        "fastest-read",
    }
    for mode in ("sidecar-startz", "sidecar-startz+engine-prefetch"):
        if mode in raw["skipped"]:
            assert raw["skipped"][mode] == "skipped: this preloader has no --start-lead"
            expected.discard(mode)
    assert modes == expected
    total = _tensor_bytes(data / "e2e" / "bucket" / "model")
    for record in records:
        assert record["ok"], record
        if record["mode"] == "resident":  # made resident before t0: the bound's load half
            assert record["resident_before"] >= 0.999, record
        else:
            assert record["resident_before"] < 0.01, f"{record['mode']} did not start cold"
        if record["mode"] == "fastest-read":  # no server: a full read of the model only
            assert "loaded_s" not in record and record["warmup_s"] > 0, record
            assert record["resident_after"] >= 0.999, record
            continue
        # Between them the ranks copied every tensor byte exactly once.
        assert record["copied_bytes"] == total, record
        # No rank read a weight before the server's start-up was over.
        assert record["first_read_s"] >= record.get("gate_s", 0.0) + 1.0, record
        assert record["loaded_s"] > record["first_read_s"]
        if record["mode"] in {"warm", "sidecar-readyz", "sidecar-startz"}:
            assert record["resident_after"] >= 0.999, record
        if record["mode"] == "sidecar-readyz":
            # The server started only once /readyz was 200.
            assert record["gate_s"] == record["warmup_s"]
        if "engine-prefetch" in record["mode"]:
            # The ranks' prefetch shares cover the shards, each once.
            shares = [name for share in record["prefetch"] for name in share["files"]]
            assert sorted(shares) == sorted(
                p.name for p in (data / "e2e" / "bucket" / "model").glob("*.safetensors")
            )
        else:
            assert "prefetch" not in record
    table = (out / "e2e.md").read_text()
    assert "| local disk, sharded | 2 |" in table
    assert "x prefetch" in table and "x bound" in table
    assert "numpy" in table


def test_gpu_e2e_is_the_e2e_scenario_and_runs_on_the_cpu(bench_dirs: tuple[Path, Path]) -> None:
    _requires("vmtouch")
    pytest.importorskip("safetensors")
    data, out = bench_dirs

    _, raw = _run_e2e(
        data,
        out,
        "--e2e-device",
        "cpu",
        "--e2e-storage",
        "local",
        "--e2e-modes",
        "cold,warm",
        "--e2e-ranks",
        "1",
        "--e2e-startup",
        "0",
        module="bench.gpu_e2e",
    )

    assert [record["mode"] for record in raw["records"]] == ["cold", "warm"]
    for record in raw["records"]:
        assert record["ok"], record
        assert record["device"] == "cpu"
        assert record["ranks"] == 1
    assert (out / "e2e.md").exists()


@pytest.mark.fuse
def test_e2e_scenario_loads_through_s3fs_and_the_fuse_fixture_from_real_bytes(
    bench_dirs: tuple[Path, Path],
) -> None:
    _requires("vmtouch", "s3fs")
    if not Path("/dev/fuse").exists():
        pytest.skip("/dev/fuse is missing")
    if os.geteuid() != 0:
        pytest.skip("mounting the bench's FUSE fixtures needs root")
    pytest.importorskip("mfusepy", reason="pip install '.[bench]' for the FUSE fixture")
    pytest.importorskip("safetensors")
    data, out = bench_dirs

    _, raw = _run_e2e(
        data,
        out,
        "--e2e-storage",
        "s3fs,fuse-gguf",
        "--e2e-modes",
        "cold,warm,engine-prefetch",
        "--e2e-framework",
        "np",
        "--e2e-startup",
        "0",
    )

    records = raw["records"]
    # One process maps the GGUF file: the engines' prefetch of shards has no place there.
    assert {(r["storage"], r["mode"]) for r in records} == {
        (storage, mode) for storage in ("s3fs", "fuse-gguf") for mode in ("cold", "warm")
    } | {("s3fs", "engine-prefetch")}
    for record in records:
        assert record["ok"], record
        assert record["resident_before"] < 0.01, record
        # Every run went to the fixture for every byte it read, nothing came from a cache:
        # warm reads the whole tree, the loader every weight file (not config.json).
        config = data / "e2e" / "bucket" / "model" / "config.json"
        skipped = config.stat().st_size if record["storage"] == "s3fs" else 0
        wanted = record["bytes"] - (skipped if record["mode"] in {"cold", "engine-prefetch"} else 0)
        assert record["fetched_bytes"] >= wanted, record
        if record["storage"] == "fuse-gguf":
            assert record["ranks"] == 1  # one llama.cpp-like process maps the file
        if record["mode"] == "warm":
            assert record["resident_after"] >= 0.999, record
    with open("/proc/mounts") as mounts:
        assert str(data) not in mounts.read()


def test_e2e_report_compares_each_mode_with_the_one_liner_of_its_own_storage() -> None:
    from bench import e2e

    def record(storage: str, mode: str, loaded: float, resident: float = 1.0) -> dict[str, Any]:
        return {
            "storage": storage,
            "ranks": 4,
            "mode": mode,
            "ok": True,
            "loaded_s": loaded,
            "first_read_s": 8.0,
            "resident_after": resident,
            "bytes": 100,
        }

    records = [
        record("s3fs", "cold", 30.0),
        record("s3fs", "one-liner", 20.0),
        record("s3fs", "warm", 19.8),
        record("s3fs", "sidecar-startz", 17.0),
        record("local", "one-liner", 10.0),
        record("local", "warm", 9.0),
        record("local", "sidecar-readyz", 12.0, resident=0.99),
        record("s3fs", "one-liner", 24.0),  # a second repetition: the median is 22
    ]
    records.append({**record("s3fs", "cold", 0.0), "ok": False})

    cells = e2e.summarize(records)
    table = "\n".join(e2e.summary_table(cells))
    checks = "\n".join(e2e.target_checks(cells))

    assert "| s3fs over loopback S3, sharded | 4 | 30.0 s (1.36 x) | 22.0 s |" in table
    assert "19.8 s (0.90 x)" in table  # warm against the median one-liner of s3fs
    assert "12.0 s (1.20 x)" in table  # against local's one-liner, not s3fs's
    assert "/startz + lead <= 0.95 x one-liner and <= 0.6 x cold: met (0.77 x, 0.57 x)" in checks
    assert "as postStart <= 0.95 x one-liner and <= 0.6 x cold: **missed** (0.90 x, 0.66 x)" in (
        checks
    )
    assert "no preloader mode slower than the one-liner: **missed** (slowest: sidecar, gate " in (
        checks
    )
    assert ">= 99.9% resident after every preloader mode (vmtouch): **missed** (lowest 99.00%" in (
        checks
    )
    cold = next(c for c in cells if (c.storage, c.mode) == ("s3fs", "cold"))
    assert (cold.runs, cold.failed, cold.loaded_s) == (2, 1, 30.0)


def test_scale_bench_measures_startup_and_trees_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sizes = ["--trees", "300x4096", "-n", "1"]
    places = ["--data-dir", str(tmp_path / "data"), "--out", str(out), "--clean"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--scale", *sizes, *places],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads((out / "scale.json").read_text())
    tree = found["trees"]["300x4096"]
    assert set(tree) == {
        "find -type f \\| wc -l",
        "preloader plan",
        "preloader plan --json",
        "preloader status",
        "preloader status --json",
        "preloader warm --json",
    }
    assert all(run["rss_mib"] > 0 and run["cpu_s"] >= 0 for run in tree.values())
    assert "preloader --version" in found["startup"]
    assert "300 files of 4096 B" in (out / "scale.md").read_text()
    assert not (tmp_path / "data").exists()


def test_recheck_bench_reads_nothing_resident_and_names_the_lost_chunks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sizes = ["--files", "300", "--sparse-files", "3", "--sparse-size", str(128 << 20)]
    places = ["--data-dir", str(tmp_path / "data"), "--out", str(out), "-n", "1", "--mincore"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--recheck", *sizes, *places],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    cases = json.loads((out / "recheck.json").read_text())["cases"]
    assert set(cases) == {
        "files, cachestat",
        "sparse, cachestat",
        "files, mincore",
        "sparse, mincore",
    }
    for way in ("cachestat", "mincore"):
        files = cases[f"files, {way}"]
        assert files["files"] == 300
        resident = files["all resident"]
        assert (resident["read_bytes"], resident["lost_chunks"], resident["exact"]) == (0, 0, True)
        evicted = files["every 100th file evicted"]
        assert (evicted["lost_chunks"], evicted["exact"]) == (3, True)
        again = files["re-read"]
        assert again["read_bytes"] == again["lost_bytes"] == 3 * 4096
        sparse = cases[f"sparse, {way}"]["first chunk of every 50th file resident"]
        # 3 files of 2 chunks, the first chunk of the first file resident.
        assert (sparse["read_bytes"], sparse["lost_chunks"], sparse["exact"]) == (0, 5, True)
    assert "every 100th file evicted" in (out / "recheck.md").read_text()
