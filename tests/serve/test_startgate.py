"""The start gate (``/startz``): the estimator's arithmetic, the latch, the lead's verdict,
the setting, and the real server on a throttled FUSE mount."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from preloader.agent.estimate import (
    MIN_SECONDS,
    WINDOW_SECONDS,
    MountProgress,
    RateSample,
    estimate_guard_bytes,
    estimate_seconds_left,
)
from preloader.agent.startgate import StartGate, ahead_bytes, lead_verdict
from preloader.errors import UsageError
from preloader.settings import parse_start_lead

from ..lib.cli import run_cli
from ..lib.fusefs import FuseMount, served_bytes
from ..lib.marks import needs_fuse
from ..lib.serve import Served, ready_body, track

MiB = 1 << 20

# ------------------------------------------------------------------ the estimator


def _steady(rate: int, seconds: int) -> list[RateSample]:
    return [RateSample(float(t), rate * t) for t in range(seconds + 1)]


def test_no_estimate_from_too_little_data() -> None:
    assert estimate_seconds_left([], 100) is None
    assert estimate_seconds_left([RateSample(0.0, 0)], 100) is None
    # A first chunk that lands at once must not promise an absurd rate.
    early = [RateSample(0.0, 0), RateSample(MIN_SECONDS / 2, 10**12)]
    assert estimate_seconds_left(early, 100) is None
    assert estimate_seconds_left([RateSample(0.0, 0), RateSample(MIN_SECONDS, 200)], 100) == (
        MIN_SECONDS / 2
    )


def test_no_estimate_before_the_guard_bytes_arrived() -> None:
    # A burst of first chunks (s3fs fetching ahead) must not set the rate alone.
    burst = [RateSample(0.0, 0), RateSample(1.0, 300)]
    assert estimate_seconds_left(burst, 700, min_bytes=301) is None
    assert estimate_seconds_left(burst, 700, min_bytes=300) == pytest.approx(700 / 300)
    assert estimate_seconds_left(burst, 0, min_bytes=301) == 0.0  # done is done


def test_the_guard_is_one_chunk_per_worker_and_one_more() -> None:
    assert estimate_guard_bytes(4, 64 * MiB) == 5 * 64 * MiB
    assert estimate_guard_bytes(0, MiB) == 2 * MiB  # auto starts somewhere: at least one


def test_the_gate_waits_for_the_guard_bytes_at_most_a_quarter_of_the_pass() -> None:
    # 100 B/s, lead 1000 s: the estimate alone would open the gate at the first sample.
    gate = StartGate(lead=1000.0, started=0.0, min_bytes=300)
    assert _feed(gate, 100, 10_000, until=9.0) == 3.0
    small = StartGate(lead=1000.0, started=0.0, min_bytes=10**9)
    assert _feed(small, 100, 1000, until=9.0) == 2.5  # a quarter of 1,000 bytes


def test_the_guard_may_follow_the_mounts_planned_bytes() -> None:
    # The agent's guard is in the chunks the pass cuts, finer for a smaller plan: a tenth
    # of the mount here. 100 B/s over 10,000 bytes: 1,000 bytes by t = 10; a fixed guard
    # of 3,000 bytes would hold the gate until t = 30.
    gate = StartGate(lead=1000.0, started=0.0, min_bytes=lambda total: total // 10)
    assert _feed(gate, 100, 10_000, until=40.0) == 10.0
    fixed = StartGate(lead=1000.0, started=0.0, min_bytes=3_000)
    assert _feed(fixed, 100, 10_000, until=40.0) == 25.0  # a quarter of the mount


def test_estimate_is_bytes_left_over_the_rate() -> None:
    assert estimate_seconds_left(_steady(100, 10), 1000) == pytest.approx(10.0)
    assert estimate_seconds_left(_steady(100, 10), 0) == 0.0


def test_the_rate_is_the_mean_over_the_last_window() -> None:
    # 100 B/s for 30 s, then 50 B/s for 10 s: over the last 20 s, 1,500 bytes.
    samples = _steady(100, 30) + [RateSample(30.0 + t, 3000 + 50 * t) for t in range(1, 11)]
    assert WINDOW_SECONDS == 20.0
    assert estimate_seconds_left(samples, 750) == pytest.approx(750 / 75)
    # A shorter window follows the slowdown alone.
    assert estimate_seconds_left(samples, 750, window=5.0) == pytest.approx(750 / 50)


def test_a_stall_gives_no_estimate() -> None:
    stalled = [*_steady(100, 5), *(RateSample(5.0 + t, 500) for t in range(1, 30))]
    assert estimate_seconds_left(stalled, 1000) is None


def test_ahead_bytes_discounts_what_was_resident_before() -> None:
    # 10 MiB resident beyond what was read when the gate opened (a pre-warmed node).
    baseline = 10 * MiB
    assert ahead_bytes(resident_bytes=30 * MiB, read_bytes=20 * MiB, baseline=baseline) == 0
    assert ahead_bytes(resident_bytes=50 * MiB, read_bytes=24 * MiB, baseline=baseline) == 16 * MiB


@pytest.mark.parametrize(
    ("opened_by", "ready", "caught_up", "measurable", "verdict"),
    [
        (None, False, False, True, "pending"),
        ("ready", True, False, True, "together"),
        ("timeout", True, False, True, "together"),
        ("estimate", False, False, True, "pending"),
        ("estimate", False, True, True, "caught_up"),
        ("estimate", True, True, True, "caught_up"),
        ("estimate", True, False, True, "behind"),
        ("estimate", True, False, False, "unknown"),
    ],
)
def test_lead_verdict(
    opened_by: str | None, ready: bool, caught_up: bool, measurable: bool, verdict: str
) -> None:
    assert lead_verdict(opened_by, ready, caught_up, measurable) == verdict


@pytest.mark.parametrize(
    ("opened_by", "ready", "verdict"),
    [
        (None, False, "unready"),
        ("estimate", False, "unready"),
        ("estimate", True, "behind"),
        ("ready", True, "together"),
    ],
)
def test_no_verdict_stays_pending_once_the_pass_is_over(
    opened_by: str | None, ready: bool, verdict: str
) -> None:
    assert lead_verdict(opened_by, ready, False, True, pass_over=True) == verdict


# ------------------------------------------------------------------ the latch


def _feed(gate: StartGate, rate: int, total: int, until: float) -> float | None:
    """Sample a steady pass every half second (a coarser tick than the agent's); return when
    the gate opened."""
    t = 0.0
    while t <= until:
        if gate.observe(t, min(total, int(rate * t)), total):
            return t
        t += 0.5
    return None


def test_the_gate_opens_when_the_estimate_reaches_the_lead_and_stays_open() -> None:
    gate = StartGate(lead=4.0, started=0.0)
    # 100 B/s over 1,000 bytes: 4 s left at t = 6.
    assert _feed(gate, 100, 1000, until=9.0) == 6.0
    snap = gate.snapshot(now=7.0, ready=False)
    assert (snap.open, snap.opened_by, snap.open_seconds) == (True, "estimate", 6.0)
    assert snap.estimate_at_open_seconds == pytest.approx(4.0)
    assert snap.start_to_ready_seconds == 1.0  # the time so far
    gate.ready_opened(10.0)
    gate.ready_opened(12.0)  # /readyz flapping under --no-ready-latch changes nothing
    snap = gate.snapshot(now=20.0, ready=True)
    assert (snap.open, snap.opened_by, snap.start_to_ready_seconds) == (True, "estimate", 4.0)
    assert snap.verdict == "behind"


def test_at_lead_zero_the_gate_opens_only_with_ready() -> None:
    gate = StartGate(lead=0.0, started=0.0)
    assert _feed(gate, 100, 1000, until=10.0) is None  # the estimate falls to 0 s: still shut
    assert not gate.snapshot(10.0, ready=False).open
    gate.ready_opened(11.0)
    snap = gate.snapshot(12.0, ready=True)
    assert (snap.opened_by, snap.start_to_ready_seconds, snap.verdict) == ("ready", 0.0, "together")


def test_a_stalled_pass_does_not_open_the_gate() -> None:
    gate = StartGate(lead=1000.0, started=0.0)
    assert gate.observe(0.0, 0, 10**9) is False
    assert gate.observe(30.0, 0, 10**9) is False  # nothing arrived: no estimate
    assert gate.snapshot(30.0, ready=False).estimate_seconds is None


def test_reads_ahead_of_the_warm_up_mean_the_server_caught_up() -> None:
    gate = StartGate(lead=100.0, started=0.0)
    assert _feed(gate, MiB, 100 * MiB, until=3.0) == 0.5  # the first sample past the guard
    slack = 2 * MiB
    # Baseline: 5 MiB resident before (a pre-warmed node) beyond the 2 MiB read.
    assert gate.measured(7 * MiB, 2 * MiB, slack) is False
    assert gate.measured(12 * MiB, 9 * MiB, slack) is False  # within the reads in flight
    assert gate.snapshot(4.0, ready=False).verdict == "pending"
    assert gate.measured(40 * MiB, 10 * MiB, slack) is True  # 25 MiB ahead
    assert gate.measured(50 * MiB, 10 * MiB, slack) is False  # reported once
    snap = gate.snapshot(5.0, ready=False)
    assert (snap.verdict, snap.ahead_bytes, snap.ahead_slack_bytes) == (
        "caught_up",
        35 * MiB,
        slack,
    )
    assert not gate.watching_ahead


def test_unmeasurable_residency_makes_the_verdict_unknown() -> None:
    gate = StartGate(lead=100.0, started=0.0)
    assert _feed(gate, MiB, 100 * MiB, until=3.0) is not None
    gate.measured(None, 3 * MiB, MiB)
    gate.ready_opened(9.0)
    snap = gate.snapshot(9.0, ready=True)
    assert (snap.verdict, snap.ahead_bytes) == ("unknown", None)


# ------------------------------------------------------------------ the setting


@pytest.mark.parametrize("text", ["0", "0.5", "60", " 90 "])
def test_a_lead_is_seconds(text: str) -> None:
    assert parse_start_lead(text) == float(text)


@pytest.mark.parametrize("text", ["-1", "nan", "inf", "-inf", "abc", "", "1e999"])
def test_a_bad_lead_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="PRELOADER_START_LEAD") as caught:
        parse_start_lead(text)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("where", ["env", "flag"])
@pytest.mark.parametrize("text", ["-5", "nan", "soon"])
def test_serve_refuses_a_bad_lead_in_one_line_and_exits_2(
    where: str, text: str, shared_tmp: Path
) -> None:
    args = ["serve", "--host", "127.0.0.1", "--port", "0", str(shared_tmp)]
    if where == "env":
        result = run_cli(*args, env={"PRELOADER_START_LEAD": text})
    else:
        result = run_cli(*args, f"--start-lead={text}")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "start lead" in line and "PRELOADER_START_LEAD" in line and repr(text) in line
    assert "serving" not in result.stderr  # refused before listening


def test_serve_help_documents_the_start_gate() -> None:
    result = run_cli("serve", "--help", check=True)
    assert "--start-lead" in result.stdout and "PRELOADER_START_LEAD" in result.stdout
    assert "/startz" in result.stdout


# ------------------------------------------------------------------ the real server


def _throttled(fuse_fs: Callable[..., FuseMount]) -> FuseMount:
    """Two 16 MiB shards; the first served at 4 MiB/s, its last MiB held until released.

    With one reader the warm-up reads the first shard, then the second: held at the gate
    it cannot finish, so ``/readyz`` stays shut for as long as the test needs, while the
    bytes before the gate give the estimator a real, throttled rate.
    """
    first = {"size": 16 * MiB, "rate": 4 * MiB, "gate_from": 15 * MiB}
    return fuse_fs({"files": {"a.safetensors": first, "b.safetensors": {"size": 16 * MiB}}})


def _serve(served: list[Served], fs: FuseMount, lead: str) -> Served:
    return track(
        served,
        str(fs.mountpoint),
        "-c",
        "1",
        "--chunk-size",
        "1MiB",
        "--recheck-seconds",
        "0",
        env={"PRELOADER_START_LEAD": lead},
    )


def _gate(server: Served) -> dict[str, object]:
    status, body = server.json("/status")
    assert status == 200
    gate = body["start_gate"]
    assert isinstance(gate, dict)
    return gate


def _scrape(server: Served) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = server.request("/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


@needs_fuse
@pytest.mark.parametrize("server_reads_ahead", [False, True], ids=["behind", "caught_up"])
def test_with_a_lead_the_start_gate_opens_before_readyz(
    fuse_fs: Callable[..., FuseMount], served: list[Served], server_reads_ahead: bool
) -> None:
    fs = _throttled(fuse_fs)
    server = _serve(served, fs, lead="3600")
    opened = server.poll(lambda: (lambda r: r[1] if r[0] == 200 else None)(server.json("/startz")))
    assert opened["open"] is True and opened["opened_by"] == "estimate"
    # The warm-up is held at the gate: the model is not resident, /readyz says so.
    status, ready = server.json("/readyz")
    assert status == 503 and ready["state"] == "warming"
    assert server.wait_for_log(lambda line: line.get("event") == "start")["detail"].startswith(
        "open: the first pass's estimated time left"
    )
    if server_reads_ahead:
        # The "server" is done starting and reads the second shard before the warm-up.
        data = (fs.mountpoint / "b.safetensors").read_bytes()
        assert data == served_bytes("b.safetensors", 0, len(data))
        server.poll(lambda: True if _gate(server)["verdict"] == "caught_up" else None)
        server.wait_for_log(lambda line: line.get("event") == "start_lead_too_long")
    else:
        fs.wait_for("GATE read")
        assert _gate(server)["verdict"] == "pending"
        # The older-cluster way (deploy/sidecar-wait): `wait` on /startz returns now, while
        # `wait` on /readyz would still block.
        base = f"http://127.0.0.1:{server.port}"
        assert run_cli("wait", "--url", f"{base}/startz", "--timeout", "60").returncode == 0
        assert run_cli("wait", "--url", f"{base}/readyz", "--timeout", "1").returncode == 5
    fs.release()
    server.poll(lambda: ready_body(server))
    gate = _gate(server)
    assert gate["open"] is True and gate["lead_seconds"] == 3600.0
    assert isinstance(gate["start_to_ready_seconds"], float) and gate["start_to_ready_seconds"] > 0
    verdict = "caught_up" if server_reads_ahead else "behind"
    assert gate["verdict"] == verdict
    metrics = _scrape(server)
    assert metrics[("preloader_start_gate_open", ())] == 1
    assert metrics[("preloader_start_lead_seconds", ())] == 3600
    assert metrics[("preloader_start_to_ready_seconds", ())] == pytest.approx(
        gate["start_to_ready_seconds"], abs=1e-3
    )
    assert metrics[("preloader_start_gate_open_seconds", ())] > 0
    assert metrics[("preloader_start_lead_verdict", (("verdict", verdict),))] == 1
    assert metrics[("preloader_start_lead_verdict", (("verdict", "pending"),))] == 0
    ahead = metrics[("preloader_start_ahead_bytes", ())]
    assert (ahead > 2 * MiB) if server_reads_ahead else (ahead <= 2 * MiB)
    assert server.stop()[0] == 0


@needs_fuse
def test_the_estimate_counts_bytes_as_they_arrive_not_when_a_chunk_completes(
    fuse_fs: Callable[..., FuseMount], served: list[Served]
) -> None:
    # Two 32 MiB chunks, the first held from 20 MiB on: no chunk completes, but the two
    # 8 MiB read steps before the hold are bytes the estimate can measure a rate on.
    fs = fuse_fs({"files": {"a.safetensors": {"size": 64 * MiB, "gate_from": 20 * MiB}}})
    server = track(
        served,
        str(fs.mountpoint),
        "-c",
        "1",
        "--chunk-size",
        "32MiB",
        "--recheck-seconds",
        "0",
        env={"PRELOADER_START_LEAD": "3600"},
    )
    fs.wait_for("GATE read")
    opened = server.poll(lambda: (lambda r: r[1] if r[0] == 200 else None)(server.json("/startz")))
    assert opened["opened_by"] == "estimate"
    status, ready = server.json("/readyz")
    assert status == 503 and ready["state"] == "warming"
    fs.release()
    server.poll(lambda: ready_body(server))
    assert server.stop()[0] == 0


@needs_fuse
def test_at_lead_zero_the_start_gate_opens_together_with_readyz(
    fuse_fs: Callable[..., FuseMount], served: list[Served]
) -> None:
    fs = _throttled(fuse_fs)
    server = _serve(served, fs, lead="0")
    fs.wait_for("GATE read")
    # The estimator has had its data (the pass is nearly done), and still the gate is shut.
    server.poll(lambda: True if _gate(server)["estimate_seconds"] is not None else None)
    status, closed = server.json("/startz")
    assert status == 503 and closed["open"] is False
    assert closed["reason"] == "closed: opens with /readyz (start lead 0)"
    assert server.json("/readyz")[0] == 503
    metrics = _scrape(server)
    assert metrics[("preloader_start_gate_open", ())] == 0
    assert ("preloader_start_gate_open_seconds", ()) not in metrics
    fs.release()
    server.poll(lambda: ready_body(server))
    status, opened = server.json("/startz")
    assert status == 200 and opened["opened_by"] == "ready"
    gate = _gate(server)
    assert (gate["start_to_ready_seconds"], gate["verdict"]) == (0.0, "together")
    metrics = _scrape(server)
    assert metrics[("preloader_start_gate_open", ())] == 1
    assert metrics[("preloader_start_to_ready_seconds", ())] == 0
    assert metrics[("preloader_start_lead_verdict", (("verdict", "together"),))] == 1
    assert server.stop()[0] == 0


def test_nothing_to_serve_opens_both_gates_at_once(served: list[Served]) -> None:
    server = track(served, env={"PRELOADER_START_LEAD": "30"})
    assert server.poll(lambda: ready_body(server))["ready"] is True
    status, body = server.json("/startz")
    assert status == 200 and body["opened_by"] == "ready"
    assert server.stop()[0] == 0


@needs_fuse
@pytest.mark.parametrize("policy", ["ready", "unready"])
def test_the_deadline_opens_the_start_gate_only_under_the_ready_policy(
    fuse_fs: Callable[..., FuseMount], served: list[Served], policy: str
) -> None:
    # Held at the gate for good: only the deadline can decide.
    fs = fuse_fs({"files": {"a.safetensors": {"size": 4 * MiB, "gate_from": 0}}})
    server = track(
        served,
        str(fs.mountpoint),
        "--chunk-size",
        "1MiB",
        "--recheck-seconds",
        "0",
        "--timeout",
        "1",
        "--timeout-policy",
        policy,
        env={"PRELOADER_START_LEAD": "0"},
    )
    server.wait_for_log(lambda line: line.get("event") == "timeout")
    status, body = server.json("/startz")
    assert server.json("/readyz")[0] == status
    if policy == "ready":
        assert (status, body["opened_by"]) == (200, "timeout")
        assert _gate(server)["verdict"] == "together"
    else:
        assert (status, body["open"]) == (503, False)
    fs.release()
    assert server.stop()[0] == 0


# ------------------------------------------------------------------ the pass's end decides


def _first_pass_over(server: Served) -> dict[str, object]:
    def probe() -> dict[str, object] | None:
        _, body = server.json("/status")
        return body if body["state"] not in ("planning", "warming", "verifying") else None

    return server.poll(probe)


@needs_fuse
@pytest.mark.parametrize("lead", ["0", "8"])
@pytest.mark.parametrize(
    ("timeout", "policy", "decides"),
    [
        ("0", "ready", "no PRELOADER_TIMEOUT is set: it opens only with /readyz"),
        ("3600", "ready", "PRELOADER_TIMEOUT 3600 s (policy 'ready') opens it at the deadline"),
        ("3600", "unready", "PRELOADER_TIMEOUT 3600 s has policy 'unready'"),
    ],
)
def test_after_a_pass_with_failed_files_the_start_gate_names_its_cause_and_policy(
    fuse_fs: Callable[..., FuseMount],
    served: list[Served],
    lead: str,
    timeout: str,
    policy: str,
    decides: str,
) -> None:
    bad = "model-00002-of-00002.safetensors"
    fs = fuse_fs(
        {
            "files": {
                "model-00001-of-00002.safetensors": {"size": 2 * MiB},
                bad: {"size": 2 * MiB, "eio": [[0, 2 * MiB]]},
            }
        }
    )
    server = track(
        served,
        str(fs.mountpoint),
        "--chunk-size",
        "1MiB",
        "--recheck-seconds",
        "0",
        "--timeout",
        timeout,
        "--timeout-policy",
        policy,
        env={"PRELOADER_START_LEAD": lead},
    )
    status = _first_pass_over(server)
    assert status["ready"] is False
    code, gate = server.json("/startz")
    if gate["opened_by"] == "estimate":  # opened early, before the failure was known
        assert code == 200
        return
    assert code == 503
    reason = gate["reason"]
    assert reason.startswith("closed: the first pass is over and /readyz is closed (")
    assert bad in reason  # the readiness reason names the failed file
    assert decides in reason
    assert "estimated" not in reason
    assert _gate(server)["verdict"] == "unready"


def test_after_a_pass_over_everything_the_start_gate_is_open(
    model_dir: Path, served: list[Served]
) -> None:
    server = track(
        served, str(model_dir), "--recheck-seconds", "0", env={"PRELOADER_START_LEAD": "8"}
    )
    status = _first_pass_over(server)
    assert status["ready"] is True
    code, gate = server.json("/startz")
    assert code == 200 and gate["reason"].startswith("open: ")


def test_a_gate_still_shut_when_the_pass_is_over_never_gives_a_false_estimate() -> None:
    gate = StartGate(lead=8.0, started=0.0)
    gate.observe(0.0, 0, 10 * MiB)
    gate.observe(0.1, MiB, 10 * MiB)  # too young for an estimate
    gate.pass_over("no PRELOADER_TIMEOUT is set: it opens only with /readyz")
    reason = gate.snapshot(1.0, ready=False, cause="/m: 2 files failed").reason
    assert reason == (
        "closed: the first pass is over and /readyz is closed (/m: 2 files failed); "
        "no PRELOADER_TIMEOUT is set: it opens only with /readyz"
    )


def test_a_blocked_gate_ignores_the_estimate_and_names_the_cause() -> None:
    gate = StartGate(lead=1000.0, started=0.0, policy="it opens only with /readyz")
    gate.block("incomplete model: /m/b.safetensors: missing")
    assert _feed(gate, 100, 10_000, until=9.0) is None  # the estimate alone would open it
    snap = gate.snapshot(9.0, ready=False)
    assert snap.estimate_seconds is not None and not snap.open
    assert snap.reason == (
        "closed: /readyz cannot open (incomplete model: /m/b.safetensors: missing); "
        "it opens only with /readyz"
    )
    gate.ready_opened(10.0)  # /readyz (or the deadline) still opens it
    assert gate.snapshot(10.0, ready=True).opened_by == "ready"


# ------------------------------------------------------------------ per mount, floor, stall


def _mounts(fast: int, slow: int, slow_started: bool) -> list[MountProgress]:
    """A local mount of 1,000 bytes, read, then a slow one of 10,000 bytes."""
    return [
        MountProgress("local", fast, 1000, True),
        MountProgress("fuse", slow, 10_000, slow_started),
    ]


def test_a_mount_not_read_yet_leaves_no_estimate_that_opens_the_gate() -> None:
    gate = StartGate(lead=3.0, started=0.0)
    # The local mount is read at 4,000 B/s: one rate for the pass would promise 2.75 s.
    for step in range(5):
        assert not gate.observe_mounts(step * 0.1, _mounts(min(1000, 400 * step), 0, False))
    assert gate.snapshot(0.4, ready=False).estimate_seconds is None


def test_each_mount_is_estimated_at_its_own_rate() -> None:
    gate = StartGate(lead=3.0, started=0.0)
    gate.observe_mounts(0.0, _mounts(0, 0, False))
    gate.observe_mounts(0.5, _mounts(1000, 0, True))  # the slow mount starts
    opened = None
    for tick in range(1, 200):
        now = 0.5 + tick * 0.1
        if gate.observe_mounts(now, _mounts(1000, 100 * tick, True)):  # 1,000 B/s
            opened = now
            break
    # 3 s left at 1,000 B/s: 7,000 of 10,000 bytes read, 7.5 s into the pass.
    assert opened == pytest.approx(7.5)
    snap = gate.snapshot(opened, ready=False)
    assert snap.opened_by == "estimate" and snap.estimate_at_open_seconds == pytest.approx(3.0)


def test_a_floor_rate_opens_the_gate_before_any_estimate_when_the_plan_is_short() -> None:
    gate = StartGate(lead=30.0, started=0.0, floor=1000.0)
    # 11,000 bytes at no less than 1,000 B/s: at most 11 s, within the lead of 30 s.
    assert gate.observe_mounts(0.0, _mounts(0, 0, False)) is True
    snap = gate.snapshot(0.0, ready=False)
    assert snap.opened_by == "floor" and snap.estimate_at_open_seconds == pytest.approx(11.0)
    assert snap.reason.startswith("open: the first pass's estimated time left was 11.0 s at most")
    fast = StartGate(lead=30.0, started=0.0, floor=240.0 * 2**20)
    assert fast.observe_mounts(0.0, _mounts(0, 0, False)) is True
    assert (
        "the floor rate of 240.0 MiB/s, PRELOADER_START_MIN_RATE"
        in fast.snapshot(0.0, False).reason
    )
    assert gate.watching_ahead  # an early opening: the lead's verdict is measured


def test_a_floor_never_opens_the_gate_for_a_plan_longer_than_the_lead() -> None:
    gate = StartGate(lead=5.0, started=0.0, floor=1000.0)
    assert gate.observe_mounts(0.0, _mounts(0, 0, False)) is False  # at most 11 s: too long
    assert gate.snapshot(0.0, ready=False).estimate_seconds == pytest.approx(11.0)
    # A measured rate replaces the floor: 100 B/s on the local mount is slower.
    for tick in range(1, 5):
        assert not gate.observe_mounts(tick * 0.1, _mounts(10 * tick, 0, False))
    assert gate.snapshot(0.4, ready=False).estimate_seconds == pytest.approx(960 / 100 + 10.0)


def test_through_a_stall_the_estimate_grows_and_never_opens_the_gate() -> None:
    gate = StartGate(lead=1000.0, started=0.0, min_bytes=10**9)
    for second in range(6):  # 100 B/s for 5 s: a quarter of 2,000 bytes at the end
        gate.observe(float(second), 100 * second, 2000)
    assert gate.is_open  # the estimate opened it (1,500 B left at 100 B/s)
    shown = []
    for second in range(6, 80, 8):  # then nothing arrives, for longer than the window
        assert not gate.observe(float(second), 500, 2000)
        shown.append(gate.snapshot(float(second), ready=False).estimate_seconds)
    assert all(value is not None for value in shown)
    assert shown == sorted(shown) and len(set(shown)) == len(shown)  # grows at every sample


def test_a_stall_keeps_a_shut_gate_shut() -> None:
    gate = StartGate(lead=100.0, started=0.0, min_bytes=10**9)
    gate.observe(0.0, 0, 100_000)
    gate.observe(1.0, 1000, 100_000)  # 1,000 B/s, too little for the guard (a quarter)
    for second in range(2, 60, 5):
        assert not gate.observe(float(second), 1000, 100_000)
    snap = gate.snapshot(60.0, ready=False)
    assert not snap.open and snap.estimate_seconds is not None
