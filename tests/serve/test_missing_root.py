"""``serve`` with a root that does not exist: never ready by accident.

A misspelt ``MODEL_DIR`` used to turn the sidecar ready at once (the one-liner's "skip when
missing", meant for the postStart hook), so a node shipped cold with every probe green.
``serve`` now keeps ``/readyz`` closed and names the path in ``/readyz``, ``/status``,
``/metrics`` and the log; ``--allow-missing`` asks for the old behaviour. ``warm`` keeps
the one-liner's: logged, skipped, exit 0.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from preloader import errors

from ..lib.cli import run_cli
from ..lib.serve import Served, ready_body, track


def _gauge(server: Served, name: str) -> float:
    status, body = server.request("/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no {name} in /metrics")


def _settled(server: Served) -> Callable[[], dict[str, Any] | None]:
    def probe() -> dict[str, Any] | None:
        _, body = server.json("/status")
        return body if body["state"] not in ("planning", "warming", "verifying") else None

    return probe


def test_serve_with_a_missing_model_dir_is_not_ready(
    shared_tmp: Path, served: list[Served]
) -> None:
    missing = str(shared_tmp / "no-such-model")
    server = track(served, "--recheck-seconds", "0", env={"MODEL_DIR": missing})
    status = server.poll(_settled(server))
    assert status["state"] == "failed" and not status["ready"]
    assert status["missing_paths"] == [missing]
    code, body = server.json("/readyz")
    assert code == 503
    assert missing in body["reason"] and "does not exist" in body["reason"]
    code, gate = server.json("/startz")
    assert code == 503 and missing in gate["reason"]
    assert _gauge(server, "preloader_missing_paths") == 1
    logged = server.wait_for_log(lambda line: line.get("level") == "error")
    assert logged["paths"] == [missing] and "does not exist" in logged["event"]


def test_serve_with_one_missing_root_beside_a_good_one_is_not_ready(
    model_dir: Path, shared_tmp: Path, served: list[Served]
) -> None:
    missing = str(shared_tmp / "no-such-model")
    env = {"MODEL_DIR": str(model_dir), "PRELOADER_PATHS": missing}
    server = track(served, "--recheck-seconds", "0", env=env)
    status = server.poll(_settled(server))
    assert not status["ready"] and status["missing_paths"] == [missing]
    (path,) = status["paths"]
    assert path["resident_bytes"] == path["bytes"] > 0  # the good one is warm all the same
    code, body = server.json("/readyz")
    assert code == 503 and missing in body["reason"]


def test_allow_missing_serves_without_the_missing_root(
    shared_tmp: Path, served: list[Served]
) -> None:
    missing = str(shared_tmp / "no-such-model")
    env = {"MODEL_DIR": missing, "PRELOADER_ALLOW_MISSING": "1"}
    server = track(served, "--recheck-seconds", "0", env=env)
    body = server.poll(lambda: ready_body(server))
    assert body["state"] == "ready"
    assert _gauge(server, "preloader_missing_paths") == 0
    assert server.json("/status")[1]["missing_paths"] == []


def test_warm_with_a_missing_model_dir_still_skips(shared_tmp: Path) -> None:
    missing = str(shared_tmp / "no-such-model")
    done = run_cli("warm", env={"MODEL_DIR": missing})
    assert done.returncode == errors.EXIT_OK
    assert "does not exist" in done.stderr
