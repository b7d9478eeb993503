"""No figure claims more of the model than is resident, whatever the options.

Every ratio in ``warm --json``, ``/readyz``, ``/status`` and ``/metrics`` is over the model
the user asked for (its planned bytes before a trim to the memory budget), and is checked
against ``fincore``'s count of the same files, taken from outside the process. The model is
run in real memory cgroups smaller than it, so ``--on-overflow`` decides something.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from preloader import errors
from preloader.cli.demomodel import write_demo_model

from ..lib.cli import NOBODY, run_cli, run_cli_in_cgroup
from ..lib.marks import needs_root
from ..lib.residency import fincore_resident_bytes
from ..lib.serve import Served, start_serve
from .conftest import BIG_MODEL_BYTES

MiB = 1024 * 1024
MODEL_BYTES = BIG_MODEL_BYTES
ROOMY = 160 * MiB  # fits part of the model: trim cuts it
TINY = 60 * MiB  # fits nothing once the headroom is kept: trim warms nothing


@pytest.fixture
def model(big_model: Path) -> Path:
    """The shared 320 MiB, 10-shard model, evicted."""
    return big_model


def _planned(model: Path) -> int:
    return sum(p.stat().st_size for p in model.iterdir())


def _true_share(model: Path) -> float:
    """Resident share of the whole model by fincore (whole pages: never below the truth)."""
    return fincore_resident_bytes(*model.iterdir()) / _planned(model)


def _log_lines(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.mark.parametrize(
    ("limit", "overflow", "method"),
    [
        (TINY, "trim", "sendfile"),
        (ROOMY, "trim", "sendfile"),
        (ROOMY, "trim", "mmap"),
        (ROOMY, "trim", "read"),
        (ROOMY, "warn", "sendfile"),
        (ROOMY, "warn", "mmap"),
    ],
)
def test_warm_json_ratios_are_over_the_model_and_never_above_fincore(
    model: Path,
    memory_cgroup: Callable[[int], tuple[str, int]],
    limit: int,
    overflow: str,
    method: str,
) -> None:
    cgroup, _ = memory_cgroup(limit)
    done = run_cli_in_cgroup(
        cgroup, "warm", str(model), "--json", "--on-overflow", overflow, "--method", method
    )
    report = json.loads(done.stdout)
    planned = _planned(model)
    true_share = _true_share(model)
    assert report["model_bytes"] == report["budget"]["planned_bytes"] == planned
    assert report["resident_ratio"] == report["resident_bytes"] / planned
    # Under warn the cgroup is at its limit when the pass is measured, and the process's own
    # allocations after that (the report, the exit) reclaim a few more pages before fincore
    # can look: up to 4 MiB of them (1.25% of the model; 1 MiB was exceeded once on a
    # loaded machine) is that, not a claim.
    after = 4 * MiB / planned if overflow == "warn" else 0.0
    assert report["resident_ratio"] <= true_share + after
    status = json.loads(run_cli("status", str(model), "--json").stdout)
    assert status["bytes"] == planned
    assert status["resident_ratio"] <= _true_share(model)
    summary = _log_lines(done.stderr)[-1]
    assert summary["event"].startswith("warm finished"), done.stderr
    assert f"{report['resident_ratio']:.1%} of the model resident" in summary["summary"]
    if overflow == "trim":
        # The policy accepts a model warmed as far as the budget allows: exit 0, the cut named.
        assert done.returncode == errors.EXIT_OK, done.stderr
        assert report["bytes"] + report["cold_bytes"] == planned and report["cold_bytes"] > 0
        assert "trimmed to the memory budget" in summary["trimmed"]
        assert "left cold by the memory budget" in summary["summary"]
        # The file the trim cut is not reported as grown: it did not grow.
        assert not any("grew" in item["cause"] for item in report["not_resident"])
    if limit == TINY:
        assert report["files"] == 0 and report["resident_ratio"] == 0.0
    if overflow == "warn":
        # A local disk in a small cgroup: the limit took the pages, no FUSE mount is involved.
        causes = [item["cause"] for item in report["not_resident"]]
        assert causes, report
        for cause in causes:
            assert "direct_io" not in cause and "bypass" not in cause, cause
            assert "at open" not in cause, cause
            assert "cgroup limit" in cause, cause


def _settled(server: Served) -> dict[str, Any] | None:
    _, status = server.json("/status")
    return status if status["state"] in ("ready", "degraded", "failed") else None


def _metric(body: bytes, name: str) -> float:
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no {name} in the exposition")


@pytest.mark.parametrize(("limit", "ready_ratio"), [(TINY, "0.99"), (ROOMY, "0.99"), (ROOMY, "0")])
def test_serve_readyz_status_metrics_are_over_the_model_and_a_trim_is_not_ready(
    model: Path,
    memory_cgroup: Callable[[int], tuple[str, int]],
    limit: int,
    ready_ratio: str,
) -> None:
    cgroup, _ = memory_cgroup(limit)
    env = {"MODEL_DIR": str(model), "PRELOADER_READY_RATIO": ready_ratio}
    server = start_serve(env=env, cgroup=cgroup)
    try:
        status = server.poll(lambda: _settled(server))
        code, readyz = server.json("/readyz")
        _, metrics = server.request("/metrics")
        true_share = _true_share(model)
    finally:
        server.stop()  # before the cgroup is removed
        server.kill()  # closes its pipe
    planned = _planned(model)
    path = status["paths"][0]
    assert readyz["bytes_total"] == status["bytes"] == path["bytes"] == planned
    assert path["cold_bytes"] > 0
    assert _metric(metrics, "preloader_target_bytes") == planned
    claimed = [
        status["resident_ratio"],
        path["resident_ratio"],
        path["warm_ratio"],
        readyz["bytes_done"] / readyz["bytes_total"],
        _metric(metrics, "preloader_resident_bytes") / planned,
        _metric(metrics, "preloader_warm_bytes") / planned,
    ]
    assert all(share <= true_share for share in claimed), (claimed, true_share)
    assert "trimmed to the memory budget" in readyz["reason"]
    if ready_ratio == "0":  # explicitly accepting a partly warm model
        assert code == 200 and readyz["ready"] is True
    else:
        assert code == 503 and readyz["ready"] is False
        assert "lower PRELOADER_READY_RATIO" in readyz["reason"]
        assert "100.0%" not in readyz["reason"]


def test_warm_ends_with_one_human_line_on_console_logs_and_json_stays_parseable(
    model: Path,
) -> None:
    console = run_cli("--log-format", "console", "warm", str(model), "--json")
    assert console.returncode == errors.EXIT_OK, console.stderr
    json.loads(console.stdout)  # stdout is the document alone
    last = console.stderr.splitlines()[-1]
    files = len(list(model.iterdir()))
    assert last.startswith(f"warmed {files} files, 320.0 MiB, 100.0% of the model resident in ")
    as_json = run_cli("warm", str(model))
    lines = _log_lines(as_json.stderr)
    assert len(lines) == len(as_json.stderr.splitlines())  # every stderr line is JSON
    assert lines[-1]["summary"].startswith(f"warmed {files} files, 320.0 MiB, 100.0% of the")


def test_evict_says_why_dirty_pages_stay(shared_tmp: Path) -> None:
    written = shared_tmp / "fresh.safetensors"
    with open(written, "wb") as handle:  # dirty until the flusher writes it (seconds later)
        handle.write(b"\1" * (4 * MiB))
    done = run_cli("evict", str(written), "--json")
    assert done.returncode == errors.EXIT_OK, done.stderr
    (item,) = json.loads(done.stdout)["per_file"]
    if not item["resident_bytes"]:
        pytest.skip("the pages were written back before the eviction")
    assert "dirty: the kernel drops a page only once it is written back" in item["reason"]
    stayed = [line for line in _log_lines(done.stderr) if line["event"] == "pages stayed"]
    assert stayed and stayed[0]["path"] == str(written)
    written.unlink()


@needs_root
def test_status_as_non_owner_does_not_say_the_missing_bytes_fit(shared_tmp: Path) -> None:
    model = shared_tmp / "model"
    write_demo_model(str(model), 8 * MiB, shards=4)
    done = run_cli("status", str(model), "--summary", user=NOBODY)
    assert done.returncode == errors.EXIT_OK, done.stderr
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("memory budget:")]
    assert "residency is unknown, so what is missing is unknown" in line
    assert "not resident fit" not in line
