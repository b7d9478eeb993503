"""The serve agent on real files and the real page cache, driven phase by phase."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from preloader.agent.agent import Agent
from preloader.agent.keepwarm import DEGRADE_AFTER
from preloader.agent.snapshot import AgentSnapshot
from preloader.cli.demomodel import write_demo_model
from preloader.engine.events import ERROR_REASONS, EngineEvent, EventKind
from preloader.settings import Selection, ServeConfig, WarmOptions

from ..lib.marks import needs_vmtouch
from ..lib.residency import evict_tree, vmtouch_resident

MiB = 1024 * 1024
DEADLINE = 30  # seconds; a bound against hangs, never a synchronisation

pytestmark = pytest.mark.anyio


def _config(*paths: Path, **overrides: object) -> ServeConfig:
    settings: dict[str, object] = {
        "selection": Selection(tuple(str(p) for p in paths)),
        "options": WarmOptions(concurrency=2, chunk_size=MiB),
        "recheck_seconds": 30.0,
        # Pages are lost with POSIX_FADV_DONTNEED here, standing in for reclaim; a reader's
        # drop is held, not re-read, by default (see preloader.agent.serverdrop).
        "on_server_drop": "rewarm",
    }
    settings.update(overrides)
    return ServeConfig(**settings)  # type: ignore[arg-type]


def _files(snap: AgentSnapshot, state: str) -> int:
    return dict(snap.paths[0].files_by_state)[state]


def _errors(snap: AgentSnapshot, reason: str) -> int:
    return dict(snap.paths[0].errors_by_reason)[reason]


@needs_vmtouch
async def test_first_pass_warms_then_the_agent_is_ready(model_dir: Path) -> None:
    agent = Agent(_config(model_dir))
    before = agent.snapshot()
    assert (before.state, before.ready) == ("planning", False)
    assert before.reason == f"planning: walking {model_dir}"

    await agent.start_up()
    snap = agent.snapshot()
    assert (snap.state, snap.ready, snap.verified) == ("ready", True, True)
    [path] = snap.paths
    assert path.resident_bytes == path.bytes == path.warm_bytes == path.read_bytes > 0
    assert _files(snap, "resident") == path.files == 8
    assert path.warm_seconds is not None
    assert snap.memory_budget is not None  # read on the agent's schedule, shown in /status
    assert snap.to_json()["memory_budget"] == snap.memory_budget.to_json()
    pages, total = vmtouch_resident(model_dir)
    assert pages == total


@needs_vmtouch
async def test_a_recheck_rereads_only_what_was_evicted(model_dir: Path) -> None:
    agent = Agent(_config(model_dir))
    await agent.start_up()
    shard = sorted(model_dir.glob("*.safetensors"))[1]
    evict_tree(shard)

    await agent.recheck()
    [path] = agent.snapshot().paths
    assert path.rewarm_bytes == shard.stat().st_size
    assert path.evictions_detected == -(-shard.stat().st_size // MiB)  # its 1 MiB chunks
    assert path.resident_bytes == path.bytes
    assert path.state == "ready" and path.degraded_reason is None
    pages, total = vmtouch_resident(model_dir)
    assert pages == total


async def test_a_clean_recheck_reads_nothing(model_dir: Path) -> None:
    agent = Agent(_config(model_dir))
    await agent.start_up()
    await agent.recheck()
    [path] = agent.snapshot().paths
    assert path.rewarm_bytes == 0
    assert path.last_check is not None


async def test_pages_lost_again_and_again_degrade_and_back_off(model_dir: Path) -> None:
    events: list[EngineEvent] = []
    agent = Agent(
        _config(model_dir, recheck_seconds=30.0, max_backoff_seconds=100.0), events.append
    )
    await agent.start_up()
    intervals = []
    states = []
    for _ in range(DEGRADE_AFTER + 2):
        evict_tree(model_dir)  # the same pages, gone again after every re-read
        await agent.recheck()
        [path] = agent.snapshot().paths
        intervals.append(path.recheck_seconds)
        states.append(path.state)
        assert path.resident_bytes == path.bytes  # re-read all the same
    # Each repeated loss degrades the path and backs off; each re-read here restores every
    # page, so the path is whole (ready) again after it, while the backed-off interval stays.
    assert intervals == [30.0] * (DEGRADE_AFTER - 1) + [60.0, 100.0, 100.0]
    assert states == ["ready"] * (DEGRADE_AFTER + 2)
    kinds = [e.kind for e in events if e.kind in (EventKind.DEGRADED, EventKind.RECOVERED)]
    assert kinds == [EventKind.DEGRADED, EventKind.RECOVERED] * 3
    degraded = [e for e in events if e.kind is EventKind.DEGRADED]
    assert "lost again" in degraded[-1].detail

    await agent.recheck()  # nothing lost this time
    [path] = agent.snapshot().paths
    assert (path.state, path.recheck_seconds, path.degraded_reason) == ("ready", 30.0, None)


async def test_a_loss_after_a_clean_check_is_not_a_repeat(model_dir: Path) -> None:
    agent = Agent(_config(model_dir))
    await agent.start_up()
    await agent.recheck()  # clean
    for _ in range(DEGRADE_AFTER + 1):
        evict_tree(model_dir)
        await agent.recheck()
        await agent.recheck()  # clean again after each re-read
    [path] = agent.snapshot().paths
    assert path.state == "ready" and path.recheck_seconds == 30.0


@needs_vmtouch
async def test_a_file_that_grew_after_the_first_pass_is_planned_and_warmed_again(
    model_dir: Path,
) -> None:
    events: list[EngineEvent] = []
    agent = Agent(_config(model_dir), events.append)
    await agent.start_up()
    planned = agent.snapshot().paths[0].bytes
    shard = sorted(model_dir.glob("*.safetensors"))[1]
    size, mtime_ns = shard.stat().st_size, shard.stat().st_mtime_ns
    with shard.open("ab") as out:  # still being written after the first pass
        out.write(os.urandom(3 * MiB + 5))
        out.flush()
        os.fsync(out.fileno())  # written back: clean pages can be evicted
    os.utime(shard, ns=(mtime_ns, mtime_ns + 1_000_000_000))  # a write's new mtime, surely
    evict_tree(shard)  # the appended bytes were never read by the pass
    assert vmtouch_resident(shard)[0] == 0

    await agent.recheck()
    snap = agent.snapshot()
    [path] = snap.paths
    assert path.bytes == planned + 3 * MiB + 5  # the plan has the file's new size
    [said] = [e for e in events if e.kind is EventKind.REPLANNED]
    assert str(shard) in said.detail
    assert f"grew from {size} to {size + 3 * MiB + 5} bytes" in said.detail
    assert (path.state, path.resident_bytes) == ("ready", path.bytes)
    pages, total = vmtouch_resident(shard)
    assert pages == total  # the grown file is warm, appended bytes and all


@pytest.mark.parametrize(
    ("damage", "reason"),
    [("delete", "read"), ("replace", "changed")],
)
async def test_a_broken_file_is_counted_and_the_agent_carries_on(
    model_dir: Path, damage: str, reason: str
) -> None:
    victim = sorted(model_dir.glob("*.safetensors"))[-1]
    events: list[EngineEvent] = []

    def on_event(event: EngineEvent) -> None:
        events.append(event)
        first = [e.kind for e in events].count("planned") == 1
        if event.kind == "planned" and first:  # between planning and reading, deterministically
            if damage == "delete":
                victim.unlink()
            else:
                replacement = victim.with_suffix(".new")
                replacement.write_bytes(b"x" * 100)
                replacement.replace(victim)

    agent = Agent(_config(model_dir), on_event=on_event)
    await agent.start_up()
    snap = agent.snapshot()
    [path] = snap.paths
    assert _errors(snap, reason) == 1
    assert _files(snap, "error") == 1
    assert _files(snap, "resident") == 7
    assert path.state == "degraded" and not snap.ready
    assert "below the ready ratio" in snap.reason
    assert [p for p, _ in path.error_details] == [str(victim)]
    assert ("file_error", str(victim)) in [(e.kind, e.path) for e in events]

    await agent.recheck()
    snap = agent.snapshot()
    if damage == "delete":  # tries again, fails again, still serving
        assert _errors(snap, reason) == 2
        assert snap.paths[0].state == "degraded"
    else:  # another file at the planned path: a new revision, planned and warmed again
        assert "replanned" in [e.kind for e in events]
        assert _files(snap, "error") == 0 and snap.ready
        assert snap.paths[0].state == "ready"


async def test_a_low_ready_ratio_accepts_a_partly_warm_model(model_dir: Path) -> None:
    victim = sorted(model_dir.glob("*.safetensors"))[-1]

    def on_event(event: EngineEvent) -> None:
        if event.kind == "planned":
            victim.unlink()

    agent = Agent(_config(model_dir, ready_ratio=0.5), on_event=on_event)
    await agent.start_up()
    snap = agent.snapshot()
    assert snap.ready
    assert 0.5 <= snap.paths[0].warm_ratio < 0.99


@pytest.mark.parametrize("latch", [True, False])
async def test_readiness_latches_unless_told_otherwise(model_dir: Path, latch: bool) -> None:
    agent = Agent(_config(model_dir, ready_latch=latch))
    await agent.start_up()
    assert agent.snapshot().ready
    sorted(model_dir.glob("*.safetensors"))[0].unlink()  # a quarter of the bytes, gone
    await agent.recheck()
    snap = agent.snapshot()
    assert snap.ready is latch
    assert snap.paths[0].warm_ratio < 0.99


@pytest.mark.parametrize(("policy", "ready"), [("ready", True), ("unready", False)])
async def test_the_deadline_policy_decides_readiness(
    model_dir: Path, policy: str, ready: bool
) -> None:
    victim = sorted(model_dir.glob("*.safetensors"))[-1]
    events: list[EngineEvent] = []

    def on_event(event: EngineEvent) -> None:
        events.append(event)
        if event.kind == "planned":
            victim.unlink()  # never warm enough

    agent = Agent(_config(model_dir, timeout=0.0, timeout_policy=policy), on_event=on_event)
    async with anyio.create_task_group() as group:
        group.start_soon(agent.run)
        with anyio.fail_after(DEADLINE):
            snap = await agent.wait_until(lambda s: s.timed_out and s.paths[0].state != "warming")
        agent.stop()
    assert snap.ready is ready
    assert "deadline" in snap.reason and policy in snap.reason
    assert [e for e in events if e.kind == "timeout"]


async def test_several_paths_are_labelled_and_a_shared_file_is_read_once(
    shared_tmp: Path,
) -> None:
    first, second = shared_tmp / "a", shared_tmp / "b"
    write_demo_model(str(first), 4 * MiB, shards=2)
    write_demo_model(str(second), 2 * MiB, shards=1)
    os.link(first / "config.json", second / "shared.json")
    evict_tree(shared_tmp)

    agent = Agent(_config(first, second))
    await agent.start_up()
    snap = agent.snapshot()
    assert [p.path for p in snap.paths] == [str(first), str(second)]
    assert snap.paths[1].skipped == 1
    assert all(p.resident_bytes == p.bytes > 0 for p in snap.paths)
    assert snap.ready and snap.bytes == sum(p.bytes for p in snap.paths)


async def test_nothing_to_serve_is_ready_at_once() -> None:
    agent = Agent(ServeConfig(selection=Selection((), skip_reason="MODEL_DIR is not set")))
    snap = agent.snapshot()
    assert (snap.ready, snap.state) == (True, "ready")
    assert snap.reason == "nothing to warm: MODEL_DIR is not set"
    await agent.start_up()
    assert agent.snapshot().ready


async def test_stop_ends_run_and_sets_stopped(model_dir: Path) -> None:
    agent = Agent(_config(model_dir, recheck_seconds=0.01))
    async with anyio.create_task_group() as group:
        group.start_soon(agent.run)
        with anyio.fail_after(DEADLINE):
            await agent.wait_until(lambda s: s.ready)
            agent.stop()
            await agent.stopped.wait()


async def test_the_keep_warm_loop_rewarms_on_its_own(model_dir: Path) -> None:
    agent = Agent(_config(model_dir, recheck_seconds=0.05))
    async with anyio.create_task_group() as group:
        group.start_soon(agent.run)
        with anyio.fail_after(DEADLINE):
            await agent.wait_until(lambda s: s.ready)
            evict_tree(model_dir)
            snap = await agent.wait_until(
                lambda s: (
                    s.paths[0].rewarm_bytes > 0 and s.paths[0].resident_bytes == s.paths[0].bytes
                )
            )
        agent.stop()
    assert snap.paths[0].evictions_detected > 0


def test_error_reasons_are_a_small_fixed_set() -> None:
    assert ERROR_REASONS == ("read", "stalled", "changed", "incomplete", "internal")


async def test_a_file_error_counts_under_the_reason_the_engine_gave(tmp_path: Path) -> None:
    """The label comes from the event's reason, set where the error happened, not from
    the wording of its message."""
    (tmp_path / "config.json").write_text("{}")
    agent = Agent(_config(tmp_path))
    [model] = agent._models
    for reason in ("read", "stalled", "changed"):
        agent._events.engine_event(
            model,
            EngineEvent(EventKind.FILE_ERROR, str(tmp_path), "any words at all", reason),
        )
    snap = agent.snapshot()
    assert dict(snap.paths[0].errors_by_reason) == {
        "read": 1,
        "stalled": 1,
        "changed": 1,
        "incomplete": 0,
        "internal": 0,
    }


@needs_vmtouch
async def test_a_snapshot_taken_while_the_pass_end_is_decided_sees_all_of_it(
    model_dir: Path,
) -> None:
    # The HTTP thread reads snapshots while the agent decides the first pass's end (the
    # state, /readyz and /startz): it must see the decision whole, never /readyz open with
    # the state still "verifying" (seen under load) nor the reverse.
    import threading

    agent = Agent(_config(model_dir))
    seen: list[AgentSnapshot] = []
    reader: list[threading.Thread] = []
    alive: list[bool] = []
    decide = agent._gate.pass_over

    def pass_over(*args: object) -> None:
        decide(*args)  # type: ignore[arg-type]
        # Half-way through the decision: another thread asks for a snapshot now.
        thread = threading.Thread(target=lambda: seen.append(agent.snapshot()))
        thread.start()
        reader.append(thread)
        thread.join(0.2)
        alive.append(thread.is_alive())  # it waits for the decision's end

    agent._gate.pass_over = pass_over  # type: ignore[method-assign]
    await agent.start_up()
    [thread] = reader
    thread.join(DEADLINE)
    assert alive == [True]
    [snap] = seen
    assert (snap.state, snap.ready, snap.start_gate.open) == ("ready", True, True)
    assert snap.reason.startswith("warm: ")
