"""Node labels kept true over time and through the stop, against the stand-in API server.

- One SIGTERM in any phase (planning, warming, verifying, ready, during the label PATCH,
  during the node GET) leaves no ``preloader.dev/`` label on the node, and ``serve``
  exits 0.
- A label changed out of band is put right by the periodic read of the node.
- A failing API server is not asked again before the back-off is over, however often
  the agent's state moves.

Every wait is on the stand-in or the FUSE daemon having seen a request, never a sleep.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest

from preloader.agent.agent import Agent
from preloader.labels import LABEL_PREFIX, NodeLabelConfig
from preloader.serve.kube import nodelabels
from preloader.serve.kube.api import NodeApi, NodeEvent
from preloader.serve.kube.nodelabels import NodeLabeler
from preloader.settings import Selection, ServeConfig, WarmOptions

from ..lib import serve as _serve
from ..lib.fusefs import FuseMount
from ..lib.kubeapi import KubeApi
from ..lib.marks import needs_fuse

MiB = 1024 * 1024
DEADLINE = 30  # seconds; a bound against hangs, never a synchronisation
INTERRUPTED = "a node label request was interrupted by the stop; reading the node again"


@pytest.fixture
def kube() -> Iterator[KubeApi]:
    with KubeApi() as api:
        yield api


def _start(
    served: list[_serve.Served], kube: KubeApi, tmp_path: Path, root: Path, *extra: str
) -> _serve.Served:
    return _serve.track(
        served,
        str(root),
        "--node-label",
        "--model-name",
        f"{root}=qwen",
        *extra,
        env={"NODE_NAME": kube.node_name, "KUBECONFIG": str(kube.kubeconfig(tmp_path))},
    )


def _exit_code(server: _serve.Served, then: Callable[[], None] = lambda: None) -> int:
    """SIGTERM once, run ``then`` (release what the phase holds), and wait for the exit."""
    server.proc.send_signal(signal.SIGTERM)
    then()
    code = server.proc.wait(timeout=_serve.DEADLINE)
    server.kill()  # joins the log reader
    return code


# -------------------------------------------------------------- one SIGTERM, any phase


def test_one_sigterm_while_the_label_patch_is_in_flight_leaves_no_label(
    model_dir: Path, kube: KubeApi, tmp_path: Path, served: list[_serve.Served]
) -> None:
    key = LABEL_PREFIX + "qwen"
    kube.hold_next("PATCH")  # the first PATCH is the one that sets the label
    server = _start(served, kube, tmp_path, model_dir)
    kube.wait_for(lambda api: bool(api.held))
    assert kube.ours() == {key: "warm"}  # applied by the API server; its reply not yet read
    assert _exit_code(server) == 0
    assert kube.ours() == {}
    assert kube.labels["team"] == "ml"
    events = [line.get("event") for line in server.logs]
    assert INTERRUPTED in events and "node labels removed" in events


def _fuse_root(fuse_fs: Callable[..., FuseMount], phase: str) -> tuple[Path, FuseMount]:
    files: dict[str, Any] = {"model.safetensors": {"size": 4 * MiB}}
    spec: dict[str, Any] = {"cache": "keep", "files": files}
    if phase == "planning":
        spec["stall_readdir"] = ["/"]
    elif phase == "warming":
        files["model.safetensors"]["gate_from"] = MiB
    else:  # verifying: measuring re-opens the file; the second open never returns
        files["model.safetensors"]["stall_open"] = 2
    fs = fuse_fs(spec)
    return fs.mountpoint, fs


_FUSE_SIGN = {
    "planning": "STALL readdir /",
    "warming": "GATE read /model.safetensors",
    "verifying": "STALL open /model.safetensors",
}


@pytest.mark.parametrize(
    "phase",
    [
        pytest.param("planning", marks=needs_fuse),
        pytest.param("warming", marks=needs_fuse),
        pytest.param("verifying", marks=needs_fuse),
        "ready",
        "patch",
        "get",
    ],
)
def test_one_sigterm_in_any_phase_leaves_no_label_and_exits_0(
    request: pytest.FixtureRequest,
    model_dir: Path,
    kube: KubeApi,
    tmp_path: Path,
    served: list[_serve.Served],
    phase: str,
) -> None:
    key = LABEL_PREFIX + "qwen"
    # As a SIGKILL of the previous agent leaves them: this model's label and another's.
    kube.labels.update({key: "warm", "preloader.dev/old-model": "warm"})
    release: Callable[[], None] = lambda: None  # noqa: E731 - a default to replace
    if phase in _FUSE_SIGN:
        root, fs = _fuse_root(request.getfixturevalue("fuse_fs"), phase)
        server = _start(served, kube, tmp_path, root)
        fs.wait_for(_FUSE_SIGN[phase])
        release = fs.release if phase == "warming" else lambda: fs.__exit__(None, None, None)
    elif phase == "ready":
        server = _start(served, kube, tmp_path, model_dir)
        server.wait_for_log(lambda line: line.get("event") == "node label set")
    elif phase == "patch":
        # The start's PATCH removes the stale labels; the second one sets this model's.
        server = _start(served, kube, tmp_path, model_dir)
        server.wait_for_log(lambda line: line.get("event") == "node label removed")
        kube.hold_next("PATCH")
        kube.wait_for(lambda api: bool(api.held))
    else:  # the start's GET, before the agent knows the node's labels
        kube.hold_next("GET")
        server = _start(served, kube, tmp_path, model_dir)
        kube.wait_for(lambda api: bool(api.held))
    assert _exit_code(server, release) == 0, server.raw
    assert kube.ours() == {}, kube.calls()
    assert kube.labels["team"] == "ml"


# ------------------------------------------------------------- the periodic read


def test_a_label_removed_out_of_band_is_put_back(
    model_dir: Path, kube: KubeApi, tmp_path: Path, served: list[_serve.Served]
) -> None:
    key = LABEL_PREFIX + "qwen"
    server = _serve.track(
        served,
        str(model_dir),
        "--node-label",
        "--model-name",
        f"{model_dir}=qwen",
        env={
            "NODE_NAME": kube.node_name,
            "KUBECONFIG": str(kube.kubeconfig(tmp_path)),
            "PRELOADER_LABEL_RESYNC_SECONDS": "0.2",  # the option's environment twin
        },
    )
    server.wait_for_log(lambda line: line.get("event") == "node label set")
    patches = sum(r.method == "PATCH" for r in kube.requests)
    kube.remove_label(key)  # kubectl label node gpu-node-1 preloader.dev/qwen-
    kube.wait_for(lambda api: sum(r.method == "PATCH" for r in api.requests) > patches)
    assert kube.ours() == {key: "warm"}
    repaired = server.wait_for_log(
        lambda line: line.get("event") == "node labels changed by someone else; putting them right"
    )
    assert repaired["expected"] == [key] and repaired["found"] == []
    _, metrics = server.request("/metrics")
    assert "preloader_node_label_repairs_total 1.0" in metrics.decode()
    assert _exit_code(server) == 0
    assert kube.ours() == {}


def test_the_resync_interval_is_an_option_with_its_default(model_dir: Path) -> None:
    config = NodeLabelConfig.resolve("n", [str(model_dir)])
    assert config.resync_seconds == 60.0


# ------------------------------------------------------------- back-off


class _Counting:
    """The real lightkube API, with a count of the calls the labeler makes."""

    def __init__(self, api: NodeApi) -> None:
        self.api = api
        self.calls = 0

    async def get_node(self) -> tuple[str, dict[str, str]]:
        self.calls += 1
        return await self.api.get_node()

    async def patch_labels(self, changes: Mapping[str, str | None]) -> dict[str, str]:
        self.calls += 1
        return await self.api.patch_labels(changes)

    async def post_event(self, event: NodeEvent, node_uid: str) -> None:
        self.calls += 1
        await self.api.post_event(event, node_uid)

    async def aclose(self) -> None:
        await self.api.aclose()


@pytest.mark.anyio
async def test_state_changes_do_not_cut_the_backoff_short(
    model_dir: Path, kube: KubeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nodelabels, "MIN_BACKOFF_SECONDS", 3600.0)
    kube.refuse = True
    agent = Agent(
        ServeConfig(
            selection=Selection((str(model_dir),)),
            options=WarmOptions(concurrency=2, chunk_size=MiB),
            recheck_seconds=30.0,
        )
    )
    config = NodeLabelConfig.resolve(
        kube.node_name, [str(model_dir)], kubeconfig=str(kube.kubeconfig(tmp_path))
    )
    api = _Counting(nodelabels.connect(config))
    labeler = NodeLabeler(config, api)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(labeler.run, agent)
            with anyio.fail_after(DEADLINE):
                while not labeler.api_errors()["get"]:
                    await anyio.sleep(0.01)  # polling period: the refusal comes on its own
                await agent.start_up()  # planning, warming, verifying, ready: four moves
            # Every task has had its turn: a labeler woken by a move has made its call.
            await anyio.wait_all_tasks_blocked()
            assert agent.snapshot().state == "ready"
            assert api.calls == 1
            group.cancel_scope.cancel()
    finally:
        await api.aclose()
