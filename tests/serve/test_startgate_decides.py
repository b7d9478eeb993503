"""The start gate (``/startz``) decides from what the agent knows, on the real server:
a path known to be failed keeps it shut, the estimate is per mount, and every gate is
decided once the first pass is over."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ..lib.cli import run_cli
from ..lib.fusefs import FuseMount
from ..lib.marks import needs_fuse
from ..lib.residency import evict_tree
from ..lib.serve import Served, track

MiB = 1 << 20


def _incomplete(root: Path) -> Path:
    """A safetensors model whose index names two shards, one of them missing."""
    root.mkdir(parents=True)
    (root / "config.json").write_bytes(os.urandom(300))
    (root / "model-00001-of-00002.safetensors").write_bytes(os.urandom(256 * 1024))
    weight_map = {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
    }
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    evict_tree(root)
    return root


def _gate(server: Served) -> dict[str, object]:
    status, body = server.json("/status")
    assert status == 200
    gate = body["start_gate"]
    assert isinstance(gate, dict)
    return gate


@needs_fuse
def test_an_incomplete_model_beside_a_good_one_keeps_the_start_gate_shut(
    shared_tmp: Path, fuse_fs: Callable[..., FuseMount], served: list[Served]
) -> None:
    broken = _incomplete(shared_tmp / "broken")
    # The good model is read at 4 MiB/s and held before its last MiB: the estimator gets a
    # real rate while the pass cannot end.
    fs = fuse_fs(
        {"files": {"a.safetensors": {"size": 8 * MiB, "rate": 4 * MiB, "gate_from": 7 * MiB}}}
    )
    server = track(
        served,
        "-c",
        "1",
        "--chunk-size",
        "1MiB",
        "--recheck-seconds",
        "0",
        env={
            "PRELOADER_PATHS": f"{broken}:{fs.mountpoint}",
            "PRELOADER_START_LEAD": "3600",
        },
    )
    fs.wait_for("GATE read")
    # A lead of an hour: any estimate would open the gate.
    server.poll(lambda: True if _gate(server)["estimate_seconds"] is not None else None)
    status, body = server.json("/startz")
    assert (status, body["open"], body["opened_by"]) == (503, False, None)
    assert body["reason"].startswith("closed: /readyz cannot open (incomplete model: ")
    assert "model-00002-of-00002.safetensors" in body["reason"]
    assert "it opens only with /readyz" in body["reason"]
    fs.release()
    over = server.wait_for_log(lambda line: line.get("event") == "first pass over")
    assert (over["ready"], over["startz"], over["verdict"]) == (False, False, "unready")
    status, body = server.json("/startz")
    assert status == 503 and "incomplete model" in body["reason"]
    assert server.stop()[0] == 0


def _local_model(root: Path, size: int) -> Path:
    root.mkdir(parents=True)
    (root / "model.safetensors").write_bytes(os.urandom(size))
    evict_tree(root)
    return root


@needs_fuse
def test_a_fast_local_path_does_not_lend_its_rate_to_a_slow_mount(
    shared_tmp: Path, fuse_fs: Callable[..., FuseMount], served: list[Served]
) -> None:
    local = _local_model(shared_tmp / "local", 32 * MiB)
    # 64 MiB at 4 MiB/s after it (16 s), held at 8 MiB: one rate for the pass, measured
    # over the local read, promised the FUSE bytes in well under the lead.
    fs = fuse_fs(
        {"files": {"a.safetensors": {"size": 64 * MiB, "rate": 4 * MiB, "gate_from": 8 * MiB}}}
    )
    server = track(
        served,
        "-c",
        "1",
        "--chunk-size",
        "1MiB",
        "--recheck-seconds",
        "0",
        env={"PRELOADER_PATHS": f"{local}:{fs.mountpoint}", "PRELOADER_START_LEAD": "3"},
    )
    fs.wait_for("GATE read")
    gate = server.poll(
        lambda: (lambda g: g if g["estimate_seconds"] is not None else None)(_gate(server))
    )
    status, body = server.json("/startz")
    assert (status, body["opened_by"]) == (503, None)
    assert body["reason"].startswith("closed: estimated ")
    assert gate["estimate_seconds"] > 3  # 56 MiB left at 4 MiB/s
    fs.release()
    server.wait_for_log(lambda line: line.get("event") == "first pass over")
    assert server.stop()[0] == 0


@needs_fuse
@pytest.mark.parametrize(("floor", "opens"), [("1MiB", True), ("64KiB", False)])
def test_a_floor_rate_opens_the_start_gate_at_once_only_for_a_plan_shorter_than_the_lead(
    fuse_fs: Callable[..., FuseMount], served: list[Served], floor: str, opens: bool
) -> None:
    # 4 MiB held from the first byte: no rate is ever measured. At 1 MiB/s the plan takes
    # at most 4 s, within the lead of 30 s; at 64 KiB/s it could take 64 s.
    fs = fuse_fs({"files": {"a.safetensors": {"size": 4 * MiB, "gate_from": 0}}})
    server = track(
        served,
        str(fs.mountpoint),
        "--chunk-size",
        "1MiB",
        "--recheck-seconds",
        "0",
        env={"PRELOADER_START_LEAD": "30", "PRELOADER_START_MIN_RATE": floor},
    )
    fs.wait_for("GATE read")
    if opens:
        line = server.wait_for_log(lambda entry: entry.get("event") == "start")
        assert "PRELOADER_START_MIN_RATE" in line["detail"]
        status, body = server.json("/startz")
        assert (status, body["opened_by"]) == (200, "floor")
        assert server.json("/readyz")[0] == 503  # the warm-up is held: not resident
    else:
        gate = server.poll(
            lambda: (lambda g: g if g["estimate_seconds"] is not None else None)(_gate(server))
        )
        assert gate["estimate_seconds"] == pytest.approx(64, abs=1)
        status, body = server.json("/startz")
        assert (status, body["opened_by"]) == (503, None)
    fs.release()
    over = server.wait_for_log(lambda entry: entry.get("event") == "first pass over")
    assert over["opened_by"] == ("floor" if opens else "ready")
    assert server.stop()[0] == 0


def test_serve_refuses_a_bad_floor_rate_in_one_line(shared_tmp: Path) -> None:
    result = run_cli(
        "serve", "--host", "127.0.0.1", "--port", "0", str(shared_tmp),
        env={"PRELOADER_START_MIN_RATE": "fast"},
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "PRELOADER_START_MIN_RATE" in line or "--start-min-rate" in line


@needs_fuse
def test_a_catch_up_that_ends_between_two_checks_is_seen_at_the_paths_end(
    fuse_fs: Callable[..., FuseMount], served: list[Served]
) -> None:
    # Two paths on one mount: the first read at 4 MiB/s and held before its last MiB.
    fs = fuse_fs(
        {
            "files": {
                "a/a.safetensors": {"size": 8 * MiB, "rate": 4 * MiB, "gate_from": 7 * MiB},
                "b/b.safetensors": {"size": 4 * MiB},
            }
        }
    )
    server = track(
        served,
        str(fs.path("a")),
        str(fs.path("b")),
        "-c",
        "1",
        "--chunk-size",
        "1MiB",
        "--recheck-seconds",
        "0",
        env={"PRELOADER_START_LEAD": "3600"},
    )
    server.wait_for_log(lambda line: line.get("event") == "start")
    # The first residency measurement (the baseline) is taken...
    server.poll(lambda: True if _gate(server)["ahead_bytes"] is not None else None)
    # ...then the "server" reads the second path, and the warm-up goes on: it ends well
    # within the 2 s until the next periodic check, reading the second path from memory.
    assert len((fs.path("b") / "b.safetensors").read_bytes()) == 4 * MiB
    fs.release()
    over = server.wait_for_log(lambda line: line.get("event") == "first pass over")
    assert over["verdict"] == "caught_up"
    server.wait_for_log(lambda line: line.get("event") == "start_lead_too_long")
    assert server.stop()[0] == 0


# ------------------------------------------------------------------ every gate decides

_DECIDES = {
    ("0", "ready"): "no PRELOADER_TIMEOUT is set: it opens only with /readyz",
    ("3600", "ready"): "PRELOADER_TIMEOUT 3600 s (policy 'ready') opens it at the deadline",
    (
        "3600",
        "unready",
    ): "PRELOADER_TIMEOUT 3600 s has policy 'unready': it opens only with /readyz",
}


def _end_state(end: str, shared_tmp: Path, request: pytest.FixtureRequest) -> tuple[str, str]:
    """Paths (``PRELOADER_PATHS``) whose first pass ends as ``end``; the cause it names."""
    good = _local_model(shared_tmp / "good", 2 * MiB)
    if end == "all_ok":
        return str(good), ""
    if end == "incomplete":
        broken = _incomplete(shared_tmp / "broken")
        return f"{broken}:{good}", "model-00002-of-00002.safetensors"
    if end == "missing_root":
        return f"{shared_tmp / 'misspelt'}:{good}", "misspelt"
    assert end == "failed_file"
    fs = request.getfixturevalue("fuse_fs")(
        {
            "files": {
                "model-00001-of-00002.safetensors": {"size": 2 * MiB},
                "model-00002-of-00002.safetensors": {"size": 2 * MiB, "eio": [[0, 2 * MiB]]},
            }
        }
    )
    return f"{good}:{fs.mountpoint}", "model-00002-of-00002.safetensors"


@pytest.mark.parametrize("lead", ["0", "3"])
@pytest.mark.parametrize(("timeout", "policy"), list(_DECIDES))
@pytest.mark.parametrize(
    "end",
    ["all_ok", "incomplete", "missing_root", pytest.param("failed_file", marks=needs_fuse)],
)
def test_after_the_first_pass_every_gate_is_open_or_names_its_cause_and_policy(
    shared_tmp: Path,
    served: list[Served],
    request: pytest.FixtureRequest,
    end: str,
    timeout: str,
    policy: str,
    lead: str,
) -> None:
    paths, cause = _end_state(end, shared_tmp, request)
    server = track(
        served,
        "--chunk-size",
        "1MiB",
        "--recheck-seconds",
        "0",
        "--timeout",
        timeout,
        "--timeout-policy",
        policy,
        env={"PRELOADER_PATHS": paths, "PRELOADER_START_LEAD": lead},
    )
    over = server.wait_for_log(lambda line: line.get("event") == "first pass over")
    ready_code, ready = server.json("/readyz")
    start_code, start = server.json("/startz")
    _, status = server.json("/status")
    # What the log line says is what the endpoints answer, and no phase is left pending.
    assert (over["ready"], over["startz"]) == (ready_code == 200, start_code == 200)
    assert status["state"] not in ("planning", "warming", "verifying")
    assert status["start_gate"]["verdict"] != "pending"
    if end == "all_ok":
        assert (ready_code, start_code) == (200, 200)
        return
    assert ready_code == 503 and cause in ready["reason"]
    if start_code == 200:  # only an estimate made before any failure was known opens it
        assert end == "failed_file" and start["opened_by"] == "estimate"
        return
    assert cause in start["reason"] and _DECIDES[(timeout, policy)] in start["reason"]
    assert status["start_gate"]["verdict"] == "unready"
