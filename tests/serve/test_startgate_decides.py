"""The start gate (``/startz``) decides from what the agent knows, on the real server:
a path known to be failed keeps it shut, the estimate is per mount, and every gate is
decided once the first pass is over."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

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
