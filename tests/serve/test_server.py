"""The real ``preloader serve`` in a child process, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..lib.cli import NOBODY, run_cli
from ..lib.marks import needs_root, needs_vmtouch
from ..lib.residency import evict_tree, vmtouch_resident
from ..lib.serve import Served, ready_body, track

READYZ_KEYS = {"ready", "state", "reason", "bytes_done", "bytes_total"}


def _samples(server: Served) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = server.request("/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


@needs_vmtouch
def test_healthz_at_once_readyz_200_once_vmtouch_agrees_sigterm_exits_0(
    model_dir: Path, served: list[Served]
) -> None:
    server = track(served, env={"MODEL_DIR": str(model_dir)})
    assert server.request("/healthz") == (200, b"ok\n")  # the first request
    body = server.poll(lambda: ready_body(server))
    assert body.keys() >= READYZ_KEYS
    assert body["ready"] is True and body["bytes_done"] == body["bytes_total"] > 0
    pages, total = vmtouch_resident(model_dir)
    assert pages >= 0.99 * total

    status, document = server.json("/status")
    assert status == 200
    assert document["state"] == "ready"
    assert document["resident_bytes"] == document["bytes"] == body["bytes_total"]
    [path] = document["paths"]
    assert path["path"] == str(model_dir) and path["files_by_state"]["resident"] == 8

    code, _ = server.stop(signal.SIGTERM)
    assert code == 0
    assert server.wait_for_log(lambda line: line.get("event") == "stopped")


@needs_root
@needs_vmtouch
def test_readyz_is_503_with_a_reason_until_the_files_can_be_read(
    model_dir: Path, served: list[Served]
) -> None:
    # The agent runs as the files' owner, so residency is measured truthfully, but cannot
    # open one shard until the test allows it: a gate closed for as long as the test says.
    for path in [model_dir, *model_dir.iterdir()]:
        os.chown(path, NOBODY, NOBODY)
    locked = sorted(model_dir.glob("*.safetensors"))[0]
    locked.chmod(0o000)
    server = track(
        served,
        env={"MODEL_DIR": str(model_dir), "PRELOADER_RECHECK_SECONDS": "0.1"},
        user=NOBODY,
    )
    status, body = server.json("/readyz")
    assert status == 503
    assert body.keys() >= READYZ_KEYS and body["ready"] is False

    def first_pass_over() -> dict[str, Any] | None:
        document = server.json("/status")[1]
        return document if document["state"] == "degraded" else None

    document = server.poll(first_pass_over)
    assert document["paths"][0]["errors_by_reason"]["read"] >= 1
    status, body = server.json("/readyz")
    assert status == 503
    assert "below the ready ratio" in body["reason"]
    assert body["bytes_done"] < body["bytes_total"]

    locked.chmod(0o644)
    body = server.poll(lambda: ready_body(server))
    assert body["verified"] is True
    pages, total = vmtouch_resident(model_dir)
    assert pages >= 0.99 * total
    assert server.stop()[0] == 0


@needs_vmtouch
def test_evicted_files_are_rewarmed_by_the_running_agent(
    model_dir: Path, served: list[Served]
) -> None:
    # The eviction stands in for reclaim: a reader's drop is held by default (serverdrop).
    server = track(
        served,
        *(str(model_dir), "--recheck-seconds", "0.1", "--chunk-size", "1MiB"),
        env={"PRELOADER_ON_SERVER_DROP": "rewarm"},
    )
    server.poll(lambda: ready_body(server))
    evict_tree(model_dir)
    assert vmtouch_resident(model_dir)[0] == 0

    def rewarmed() -> dict[str, Any] | None:
        [path] = server.json("/status")[1]["paths"]
        done = path["rewarm_bytes"] >= path["bytes"] and path["resident_bytes"] == path["bytes"]
        return path if done else None

    path = server.poll(rewarmed)
    assert path["evictions_detected"] > 0
    pages, total = vmtouch_resident(model_dir)
    assert pages == total
    label = (("path", str(model_dir)),)
    samples = _samples(server)
    assert samples[("preloader_rewarm_bytes_total", label)] >= path["bytes"]
    assert samples[("preloader_evictions_detected_total", label)] > 0
    assert server.stop()[0] == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool")
def test_metrics_parse_and_pass_promtool(model_dir: Path, served: list[Served]) -> None:
    server = track(served, env={"MODEL_DIR": str(model_dir)})
    server.poll(lambda: ready_body(server))
    status, body = server.request("/metrics")
    assert status == 200
    samples = _samples(server)
    names = {name for name, _ in samples}
    assert len([n for n in names if n.startswith("preloader_")]) >= 5
    label = (("path", str(model_dir)),)
    assert (
        samples[("preloader_resident_bytes", label)] == samples[("preloader_target_bytes", label)]
    )
    assert samples[("preloader_ready", ())] == 1
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_root
def test_a_non_owner_is_ready_unverified_and_exports_no_resident_bytes(
    model_dir: Path, served: list[Served]
) -> None:
    server = track(served, env={"MODEL_DIR": str(model_dir)}, user=NOBODY)
    body = server.poll(lambda: ready_body(server))
    assert body["verified"] is False
    assert "unverified" in body["reason"]
    document = server.json("/status")[1]
    assert document["resident_bytes"] is None
    [path] = document["paths"]
    assert "EPERM" in path["residency_unknown_reason"]
    assert path["files_by_state"]["unknown"] == 8
    samples = _samples(server)
    label = (("path", str(model_dir)),)
    assert ("preloader_resident_bytes", label) not in samples
    assert samples[("preloader_residency_known", label)] == 0
    assert samples[("preloader_warm_bytes", label)] == samples[("preloader_target_bytes", label)]
    assert server.stop()[0] == 0


def test_only_get_and_head_on_the_five_paths(model_dir: Path, served: list[Served]) -> None:
    server = track(served, env={"MODEL_DIR": str(model_dir)})
    for path in ("/healthz", "/startz", "/readyz", "/status", "/metrics"):
        assert server.request(path, "HEAD")[0] in (200, 503)
        assert server.request(path, "POST")[0] == 405
        assert server.request(path, "DELETE")[0] == 405
    assert server.request("/")[0] == 404
    assert server.request("/status/../../etc/passwd")[0] == 404
    status, body = server.request("/status?path=/etc/passwd")
    assert status == 200 and b"root:" not in body
    assert server.stop()[0] == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_right_after_start_exits_0(
    model_dir: Path, served: list[Served], signum: int
) -> None:
    server = track(served, env={"MODEL_DIR": str(model_dir)})
    code, _ = server.stop(signum)
    assert code == 0
    assert not [line for line in server.raw if "Traceback" in line]


def test_nothing_to_serve_is_ready_at_once(served: list[Served]) -> None:
    server = track(served)
    status, body = server.json("/readyz")
    assert status == 200
    assert body["reason"] == "nothing to warm: MODEL_DIR is not set and no PATH was given"
    assert server.stop()[0] == 0


def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = run_cli("serve", "--host", "127.0.0.1", "--port", str(port))
    assert done.returncode == 2
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(f"127.0.0.1:{port}: cannot listen" in str(line.get("error")) for line in lines)
    assert "Traceback" not in done.stderr


def test_a_missing_path_argument_is_a_usage_error(shared_tmp: Path) -> None:
    done = run_cli("serve", str(shared_tmp / "nope"), "--port", "0")
    assert done.returncode == 2
    assert "no such file or directory" in done.stderr


def test_all_formats_reaches_the_agent(tmp_path: Path, served: list[Served]) -> None:
    """``serve --all-formats`` (and ``PRELOADER_ALL_FORMATS``) warms the .bin beside the
    safetensors, as ``warm --all-formats`` does; it used to be dropped on the way."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"s" * 8192)
    (tmp_path / "pytorch_model.bin").write_bytes(b"b" * 8192)
    for args, env in [(("--all-formats",), {}), ((), {"PRELOADER_ALL_FORMATS": "1"})]:
        server = track(served, *args, str(tmp_path), env=env)
        server.poll(lambda server=server: ready_body(server))  # type: ignore[misc]
        status, document = server.json("/status")
        assert status == 200
        [path] = document["paths"]
        assert path["files"] == 3, path
        assert server.stop(signal.SIGTERM)[0] == 0
    plain = track(served, str(tmp_path))
    plain.poll(lambda: ready_body(plain))
    assert plain.json("/status")[1]["paths"][0]["files"] == 2
    assert plain.stop(signal.SIGTERM)[0] == 0
