"""The Prometheus collector: names, values, honesty about unknowns, and promtool's verdict."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from preloader.agent.agent import Agent
from preloader.agent.snapshot import AgentSnapshot
from preloader.kernel import fileread, pagecache, reclaim
from preloader.serve.metrics import METRIC_NAMES, make_registry
from preloader.settings import Selection, ServeConfig, WarmOptions

from ..lib import manifests as dm

MiB = 1024 * 1024

pytestmark = pytest.mark.anyio

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool")


async def _warm_agent(model_dir: Path) -> Agent:
    agent = Agent(
        ServeConfig(selection=Selection((str(model_dir),)), options=WarmOptions(chunk_size=MiB))
    )
    await agent.start_up()
    return agent


def _unknown(snap: AgentSnapshot) -> AgentSnapshot:
    """The snapshot a process gets where the kernel hides residency (cachestat EPERM)."""
    path = replace(
        snap.paths[0],
        resident_bytes=None,
        residency_unknown_reason="cachestat refused (EPERM): ...",
    )
    return replace(snap, paths=(path,))


def test_importing_registers_nothing_globally() -> None:
    import preloader.serve.metrics  # noqa: F401

    names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not [name for name in names if name.startswith("preloader")]


def test_registering_does_not_collect() -> None:
    def no_snapshot() -> AgentSnapshot:
        raise AssertionError("collect() ran at registration")

    make_registry(no_snapshot)


async def test_a_warm_model_is_reported_as_such(model_dir: Path) -> None:
    agent = await _warm_agent(model_dir)
    registry = make_registry(agent.snapshot)
    path = {"path": str(model_dir)}
    target = registry.get_sample_value("preloader_target_bytes", path)
    assert target is not None and target > 0
    assert registry.get_sample_value("preloader_resident_bytes", path) == target
    assert registry.get_sample_value("preloader_read_bytes_total", path) == target
    assert registry.get_sample_value("preloader_rewarm_bytes_total", path) == 0
    assert registry.get_sample_value("preloader_ready") == 1
    assert registry.get_sample_value("preloader_state", {"state": "ready"}) == 1
    assert registry.get_sample_value("preloader_files", {**path, "state": "resident"}) == 8
    assert registry.get_sample_value("preloader_errors_total", {**path, "reason": "read"}) == 0
    assert registry.get_sample_value("preloader_residency_known", path) == 1
    assert registry.get_sample_value("preloader_degraded", path) == 0
    duration = registry.get_sample_value("preloader_warm_duration_seconds", path)
    assert duration is not None and duration > 0
    budget = agent.snapshot().memory_budget
    assert budget is not None
    assert registry.get_sample_value("preloader_memory_available_bytes") == (budget.available_bytes)


async def test_unknown_residency_is_left_out_not_guessed(model_dir: Path) -> None:
    agent = await _warm_agent(model_dir)
    snap = _unknown(agent.snapshot())
    registry = make_registry(lambda: snap)
    path = {"path": str(model_dir)}
    assert registry.get_sample_value("preloader_resident_bytes", path) is None
    assert registry.get_sample_value("preloader_residency_known", path) == 0
    assert registry.get_sample_value("preloader_target_bytes", path) is not None


async def test_proactive_reclaim_is_a_gauge_and_a_status_field(model_dir: Path) -> None:
    agent = await _warm_agent(model_dir)
    snap = agent.snapshot()
    seen = reclaim.note()  # what this machine runs now (the test session pauses DAMON)
    assert snap.proactive_reclaim == seen
    assert snap.to_json()["proactive_reclaim"] == seen
    assert make_registry(lambda: snap).get_sample_value("preloader_proactive_reclaim") == (
        1 if seen else 0
    )
    line = "this machine's proactive reclaim drops idle page cache: DAMON kdamond 0, ..."
    reclaiming = replace(snap, proactive_reclaim=line)
    assert make_registry(lambda: reclaiming).get_sample_value("preloader_proactive_reclaim") == 1
    assert reclaiming.to_json()["proactive_reclaim"] == line


async def test_a_scrape_reads_memory_only(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = await _warm_agent(model_dir)
    registry = make_registry(agent.snapshot)

    def no_syscalls(*args: object) -> None:
        raise AssertionError("a scrape touched the kernel layer")

    for name in (
        "cachestat",
        "cached_pages",
        "whole_file_counter",
        "fd_residency",
        "range_resident_pages",
    ):
        monkeypatch.setattr(pagecache, name, no_syscalls)
    monkeypatch.setattr(fileread, "read_range", no_syscalls)
    assert b"preloader_resident_bytes" in generate_latest(registry)


async def test_the_exposition_parses_and_uses_only_preloader_names(model_dir: Path) -> None:
    agent = await _warm_agent(model_dir)
    text = generate_latest(make_registry(agent.snapshot)).decode()
    families = list(text_string_to_metric_families(text))
    names = {sample.name for family in families for sample in family.samples}
    assert names <= set(METRIC_NAMES)
    assert len(names) >= 5
    assert names >= dm.AGREED_METRICS  # the names the Grafana dashboard relies on
    counters = [f for f in families if f.type == "counter"]
    assert all(s.name.endswith("_total") for f in counters for s in f.samples)


@needs_promtool
@pytest.mark.parametrize("unknown", [False, True], ids=["measured", "unknown"])
async def test_promtool_accepts_the_exposition(model_dir: Path, unknown: bool) -> None:
    agent = await _warm_agent(model_dir)
    snap = _unknown(agent.snapshot()) if unknown else agent.snapshot()
    text = generate_latest(make_registry(lambda: snap))
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
