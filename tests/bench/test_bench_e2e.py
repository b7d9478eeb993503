"""The e2e bench's engine-prefetch emulation, its shapes and its physical bound.

Real files and real reader processes; no timings asserted.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import e2e, loader

from ..lib.marks import needs_vmtouch
from ..lib.residency import evict_tree, vmtouch_resident

REPO = Path(__file__).resolve().parents[2]
RANK_FLAGS = ("--ranks", "3", "--framework", "np", "--prefetch", "--discard")
READ_FLAGS = ("--prefetch-threads", "3", "--prefetch-block", "65536")


def _shards(directory: Path, sizes: list[int]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, size in enumerate(sizes, start=1):
        path = directory / f"model-{index:05d}-of-{len(sizes):05d}.safetensors"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    return paths


def test_prefetch_shares_give_every_shard_to_exactly_one_rank(tmp_path: Path) -> None:
    paths = _shards(tmp_path, [4096] * 7)

    shares = [loader.prefetch_share(list(reversed(paths)), rank, 3) for rank in range(3)]

    # sorted(files)[rank::ranks], whatever order the directory listed them in.
    assert shares[0] == [paths[0], paths[3], paths[6]]
    assert shares[1] == [paths[1], paths[4]]
    assert sorted(p for share in shares for p in share) == paths
    with pytest.raises(ValueError, match=r"rank 3 is not in 0\.\.2"):
        loader.prefetch_share(paths, 3, 3)


def test_prefetchers_across_ranks_read_each_shard_once_and_whole(tmp_path: Path) -> None:
    # Not a multiple of the block: the last read of each file is short.
    sizes = [3 * 65536 + 17, 65536, 5 * 65536 - 1, 12345, 2 * 65536]
    paths = _shards(tmp_path, sizes)

    read: dict[str, list[int]] = {}
    for rank in range(2):
        prefetcher = loader.Prefetcher(loader.prefetch_share(paths, rank, 2), 4, 65536)
        prefetcher.start()
        prefetcher.join()
        assert prefetcher.done_at is not None
        for name, got in prefetcher.read.items():
            read.setdefault(name, []).append(got)

    assert read == {path.name: [path.stat().st_size] for path in paths}


def _tiny_model(directory: Path, shards: int) -> Path:
    from bench.models import write_safetensors_model

    write_safetensors_model(directory, shards, 256 * 1024)
    return directory


def test_loader_ranks_with_prefetch_read_each_shard_once_between_them(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    pytest.importorskip("numpy")
    model = _tiny_model(tmp_path / "model", 5)
    shards = sorted(p for p in model.iterdir() if p.name.endswith(".safetensors"))

    outputs = []
    for rank in range(3):
        done = subprocess.run(
            [sys.executable, "-m", "bench.loader", str(model), "--rank", str(rank), *RANK_FLAGS],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))

    files = [name for out in outputs for name in out["prefetch"]["files"]]
    assert sorted(files) == [p.name for p in shards]  # each shard once, none left out
    prefetched = sum(out["prefetch"]["bytes"] for out in outputs)
    total = sum(p.stat().st_size for p in shards)
    assert prefetched <= total
    if all(out["prefetch"]["done"] is not None for out in outputs):  # not cut short by exit
        assert prefetched == total
    for out in outputs:
        # Each rank loaded every shard, in index order, after its prefetch began.
        assert [name for name, _ in out["shards"]] == [p.name for p in shards]
        assert out["cpu_s"] > 0


def test_loader_read_all_reads_every_byte_of_the_model(tmp_path: Path) -> None:
    paths = _shards(tmp_path / "m", [100_000, 1, 65536 * 3])

    done = subprocess.run(
        [sys.executable, "-m", "bench.loader", str(tmp_path / "m"), "--read-all", *READ_FLAGS],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"files": 3, "bytes": sum(p.stat().st_size for p in paths)}


def _record(mode: str, loaded: float | None = None, warmup: float | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "storage": "s3fs",
        "ranks": 4,
        "mode": mode,
        "ok": True,
        "resident_after": 1.0,
        "bytes": 100,
        "startup_s": 8.0,
    }
    if loaded is not None:
        record |= {"loaded_s": loaded, "first_read_s": 8.0}
    if warmup is not None:
        record["warmup_s"] = warmup
    return record


def test_the_bound_is_the_larger_of_resident_load_and_the_fastest_full_read() -> None:
    records = [
        _record("resident", loaded=17.0),
        _record("fastest-read", warmup=31.0),
        _record("one-liner", loaded=41.0, warmup=29.0),  # the fastest full read
        _record("one-liner", loaded=43.0, warmup=30.0),  # medians: 42 and 29.5
        _record("engine-prefetch", loaded=50.0),
        _record("sidecar-startz", loaded=38.0),
        _record("sidecar-startz:28", loaded=35.4),
    ]

    cells = e2e.summarize(records)
    bound = e2e.bound_of(cells, "s3fs", 4)

    assert (bound.resident_s, bound.startup_s) == (17.0, 8.0)
    assert (bound.fastest_read_s, bound.fastest_by) == (29.5, "one-liner")
    assert bound.bound_s == 29.5
    table = "\n".join(e2e.summary_table(cells))
    # 35.4 / 42 = 0.84 x the one-liner, / 50 = 0.71 x the prefetch, / 29.5 = 1.20 x the bound.
    assert "35.4 s (0.84 x, 0.71 x prefetch, 1.20 x bound)" in table
    assert "| sidecar, gate /startz + lead (lead 28) |" in table
    assert table.splitlines()[2].endswith("| 29.5 s |")
    checks = "\n".join(e2e.target_checks(cells))
    assert "(lead 28) <= 0.80 x the engines' prefetch: met (0.71 x)" in checks
    assert "(warm-up 30 s >= 2 x the 8 s start-up): sidecar, gate /startz + lead (lead 28) " in (
        checks
    )
    assert "<= 0.90 x the one-liner: met (0.84 x; 1.20 x the bound)" in checks

    # A start-up plus load longer than any read: that half sets the bound.
    slow = e2e.summarize([*records, _record("resident", loaded=40.0), _record("resident", 40.0)])
    assert e2e.bound_of(slow, "s3fs", 4).bound_s == 40.0
    # Without the resident load there is no bound, only its read half.
    half = e2e.bound_of(e2e.summarize(records[1:]), "s3fs", 4)
    assert (half.bound_s, half.fastest_read_s) == (None, 29.5)


def test_modes_name_their_own_lead_and_bad_modes_get_one_line() -> None:
    assert e2e.split_mode("sidecar-startz:19") == ("sidecar-startz", 19.0)
    assert e2e.split_mode("sidecar-startz+engine-prefetch") == (
        "sidecar-startz+engine-prefetch",
        None,
    )
    config = e2e.E2EConfig(startup_s=8.0, lead_s=18.0)
    assert config.lead_of("sidecar-startz:28") == 28.0
    assert config.lead_of("sidecar-startz+engine-prefetch") == 18.0
    assert config.lead_of("engine-prefetch") is None
    assert e2e.uses_engine_prefetch("sidecar-startz+engine-prefetch:30")
    assert not e2e.uses_engine_prefetch("sidecar-startz:30")
    with pytest.raises(ValueError, match="unknown mode 'prefetch'"):
        e2e.split_mode("prefetch")
    with pytest.raises(ValueError, match="only a sidecar-startz mode takes a lead"):
        e2e.split_mode("one-liner:8")
    with pytest.raises(ValueError, match="seconds >= 0"):
        e2e.split_mode("sidecar-startz:soon")


def _args(*argv: str) -> argparse.Namespace:
    from bench.run import _parse_args

    return _parse_args(list(argv))


def test_shapes_are_presets_that_flags_override() -> None:
    long = e2e.config_from_args(_args("--e2e-shape", "long-warmup"))
    assert (long.shards, long.shard_bytes, long.startup_s, long.lead) == (8, 2**30, 8.0, 18.0)
    assert long.storages == ("s3fs", "fuse-sharded")
    assert {"engine-prefetch", "resident", "fastest-read"} <= set(long.modes)
    assert long.shards * long.shard_bytes <= 8 * 2**30  # fits beside other sessions

    assert e2e.config_from_args(_args("--e2e-shape", "long-startup")).startup_s == 30.0
    override = e2e.config_from_args(
        _args("--e2e-shape", "long-warmup", "--e2e-shards", "2", "--e2e-modes", "cold")
    )
    assert (override.shards, override.modes, override.shape) == (2, ("cold",), "long-warmup")
    smoke = e2e.config_from_args(_args("--smoke", "--e2e-shape", "long-warmup"))
    assert smoke.shard_bytes == e2e.E2EConfig.smoke().shard_bytes  # toy sizes stay
    assert smoke.modes == long.modes


def test_a_floor_rate_goes_to_every_startz_sidecar_and_nowhere_else(tmp_path: Path) -> None:
    config = e2e.config_from_args(_args("--e2e-start-min-rate", "200MiB"))
    assert config.start_min_rate == 200 * 2**20
    target = e2e.Target("local", tmp_path, tmp_path, (), 1, 1)
    startz = e2e._warmer("sidecar-startz:9.5", target, config, {}, 9400) or []
    assert startz[startz.index("--start-min-rate") + 1] == str(200 * 2**20)
    readyz = e2e._warmer("sidecar-readyz", target, config, {}, 9400) or []
    assert "--start-min-rate" not in readyz


def test_serve_lock_goes_to_every_sidecar_and_into_the_header(tmp_path: Path) -> None:
    config = e2e.config_from_args(_args("--e2e-serve-lock"))
    assert config.serve_lock
    target = e2e.Target("local", tmp_path, tmp_path, (), 1, 1)
    for mode in ("sidecar-startz", "sidecar-readyz", "sidecar-startz+engine-prefetch"):
        assert "--lock" in (e2e._warmer(mode, target, config, {}, 9400) or [])
    assert "--lock" not in (e2e._warmer("warm", target, config, {}, 9400) or [])
    plain = e2e.config_from_args(_args())
    assert not plain.serve_lock
    # One sidecar pinned beside the same one unpinned, in the same run.
    assert "--lock" in (e2e._warmer("sidecar-startz+lock:12", target, plain, {}, 9400) or [])
    assert "--lock" not in (e2e._warmer("sidecar-startz", target, plain, {}, 9400) or [])
    note = e2e._serve_flags_note(dataclasses.asdict(config))
    assert note == ", `--lock` (the resident model held by `vmtouch -dl`)"


def test_an_object_arrives_when_its_bytes_were_first_all_sent() -> None:
    from bench.s3trace import Get

    gets = [
        Get("model/a", 0, 49, 50, 0.0, 1.0),
        Get("model/b", 0, 99, 100, 0.0, 2.0),
        Get("model/a", 50, 99, 50, 0.5, 3.0),  # a is whole here
        Get("model/a", 0, 9, 10, 8.0, 9.0),  # a refetch: not its arrival
        Get("model/c", 0, 9, 10, 1.0, 4.0),  # never whole: its last GET
    ]

    assert e2e.complete_at(gets, {"a": 100, "b": 100, "c": 20}) == {"a": 3.0, "b": 2.0, "c": 4.0}
    assert e2e.complete_at(gets, {"a": 100, "b": 100, "c": 20}, 0.5)["a"] == 1.0


@needs_vmtouch
def test_the_pinned_resident_model_stays_under_dontneed_until_unpinned(
    shared_tmp: Path,
) -> None:
    from bench import measure

    model = shared_tmp / "model"
    model.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        with open(model / name, "wb") as handle:
            handle.write(os.urandom(3 * 2**20))
            os.fsync(handle.fileno())  # dirty pages cannot be evicted
    evict_tree(model)
    pid = measure.pin(model, shared_tmp / "vmtouch.pid")
    try:
        assert vmtouch_resident(model) == (2 * 768, 2 * 768)
        evict_tree(model)  # POSIX_FADV_DONTNEED leaves locked pages alone
        assert vmtouch_resident(model)[0] == 2 * 768
    finally:
        measure.unpin(pid)
    evict_tree(model)  # unpin waits for the daemon's exit: nothing holds the pages
    assert vmtouch_resident(model)[0] == 0
