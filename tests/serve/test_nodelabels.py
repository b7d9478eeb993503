"""Node labels and Events (``serve --node-label``) against a stand-in API server.

The agent is real (real files, the real page cache); the API server is the stand-in of
``tests/lib/kubeapi.py`` on 127.0.0.1, reached through lightkube with a kubeconfig, as the
DaemonSet reaches the real one with its service account.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from preloader.agent.agent import Agent
from preloader.agent.keepwarm import DEGRADE_AFTER
from preloader.engine.events import EngineEvent, EventKind
from preloader.errors import UsageError
from preloader.labels import LABEL_PREFIX, NodeLabelConfig, label_key, label_name
from preloader.serve.kube import nodelabels
from preloader.serve.kube.nodelabels import NodeLabeler
from preloader.settings import Selection, ServeConfig, WarmOptions

from ..lib import serve as _serve
from ..lib.kubeapi import MERGE, KubeApi
from ..lib.residency import evict_tree

MiB = 1024 * 1024
DEADLINE = 30  # seconds; a bound against hangs, never a synchronisation
NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


@pytest.fixture
def kube() -> Iterator[KubeApi]:
    with KubeApi() as api:
        yield api


# ---------------------------------------------------------------------- the key scheme


def test_a_plain_model_name_is_the_label_name() -> None:
    assert label_name("Qwen3-32B") == "Qwen3-32B"
    assert label_key("deepseek-r1") == "preloader.dev/deepseek-r1"


def test_characters_a_label_cannot_hold_become_dashes() -> None:
    assert label_name("Qwen/Qwen3 32B") == "Qwen-Qwen3-32B"
    assert label_name("  _model.v2_ ") == "model.v2"


def test_a_long_name_is_cut_and_ends_in_a_hash_of_the_whole_name() -> None:
    first = "meta-llama-" + "x" * 80 + "-instruct-a"
    second = "meta-llama-" + "x" * 80 + "-instruct-b"
    assert len(label_name(first)) == 63
    assert label_name(first) != label_name(second)
    assert label_name(first) == label_name(first)  # deterministic
    assert label_name(first).startswith("meta-llama-xxx")
    assert re.fullmatch(r".{52}-[0-9a-f]{10}", label_name(first))


def test_a_name_with_nothing_to_keep_is_refused() -> None:
    with pytest.raises(UsageError, match="no letter or digit"):
        label_name("///")


@settings(deadline=None)  # a shared, loaded machine; the property is what is tested
@given(st.text(min_size=1).filter(lambda s: any(c.isascii() and c.isalnum() for c in s)))
def test_every_label_name_fits_kubernetes_limits(model: str) -> None:
    name = label_name(model)
    assert len(name) <= 63 and NAME.match(name)


def test_the_key_comes_from_the_model_name_or_else_the_path() -> None:
    config = NodeLabelConfig.resolve(
        "node-a", ["/models/Qwen3-32B", "/models/ds/"], ["/models/ds=deepseek-r1"]
    )
    assert config.keys == (
        ("/models/Qwen3-32B", "preloader.dev/Qwen3-32B"),
        ("/models/ds/", "preloader.dev/deepseek-r1"),
    )


@pytest.mark.parametrize(
    ("node", "paths", "names", "message"),
    [
        (None, ["/m/a"], [], "NODE_NAME"),
        ("n", ["/m/a", "/n/a"], [], "both would be labelled preloader.dev/a"),
        ("n", ["/m/a"], ["/m/b=x"], "/m/b: not a served path"),
        ("n", ["/m/a"], ["x"], "expected PATH=NAME"),
    ],
)
def test_bad_settings_are_one_line_errors(
    node: str | None, paths: list[str], names: list[str], message: str
) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        NodeLabelConfig.resolve(node, paths, names)


# ----------------------------------------------------------- the agent and the labeler


def _serve_config(*paths: Path) -> ServeConfig:
    return ServeConfig(
        selection=Selection(tuple(str(p) for p in paths)),
        options=WarmOptions(concurrency=2, chunk_size=MiB),
        recheck_seconds=30.0,
        # Pages are lost with POSIX_FADV_DONTNEED here, standing in for reclaim; a reader's
        # drop is held, not re-read, by default (see preloader.agent.serverdrop).
        on_server_drop="rewarm",
    )


@asynccontextmanager
async def _labelling(
    agent: Agent, kube: KubeApi, tmp_path: Path, grace: float = 60.0
) -> AsyncIterator[NodeLabeler]:
    paths = [p.path for p in agent.snapshot().paths]
    config = NodeLabelConfig.resolve(
        kube.node_name, paths, grace_seconds=grace, kubeconfig=str(kube.kubeconfig(tmp_path))
    )
    api = nodelabels.connect(config)
    labeler = NodeLabeler(config, api)
    async with anyio.create_task_group() as group:
        group.start_soon(labeler.run, agent)
        yield labeler
        group.cancel_scope.cancel()
    with anyio.fail_after(DEADLINE):
        assert await labeler.withdraw()
    await api.aclose()


async def _until(kube: KubeApi, predicate: Callable[[KubeApi], bool]) -> None:
    await anyio.to_thread.run_sync(kube.wait_for, predicate)


def _metric(labeler: NodeLabeler, name: str, **labels: str) -> float | None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(labeler.collector())
    return registry.get_sample_value(name, labels)


@pytest.mark.anyio
async def test_a_ready_path_labels_the_node_and_posts_an_event_with_the_figures(
    model_dir: Path, kube: KubeApi, tmp_path: Path
) -> None:
    agent = Agent(_serve_config(model_dir))
    key = LABEL_PREFIX + model_dir.name
    async with _labelling(agent, kube, tmp_path) as labeler:
        assert kube.ours() == {}
        await agent.start_up()
        await _until(kube, lambda api: "ModelWarm" in api.event_reasons())
        assert kube.ours() == {key: "warm"}
        assert kube.labels["team"] == "ml"  # a merge patch leaves other labels alone
        assert _metric(labeler, "preloader_node_label", path=str(model_dir), label=key) == 1
    [path] = agent.snapshot().paths
    [event] = kube.events
    assert event["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Node",
        "name": kube.node_name,
        "uid": kube.uid,
    }
    assert event["metadata"]["namespace"] == "default" and event["type"] == "Normal"
    message = event["message"]
    assert f"({path.bytes} bytes)" in message and "100.0% resident" in message
    assert re.search(r"first pass \d+\.\d s", message)
    patches = [r for r in kube.requests if r.method == "PATCH"]
    assert {r.content_type for r in patches} == {MERGE}
    assert patches[0].body == {"metadata": {"labels": {key: "warm"}}}
    assert kube.ours() == {}  # withdrawn on the way out


@pytest.mark.anyio
async def test_stale_labels_of_the_scheme_are_removed_at_start(
    model_dir: Path, kube: KubeApi, tmp_path: Path
) -> None:
    # As a SIGKILL leaves them: this model's label and one of a model no longer served.
    key = LABEL_PREFIX + model_dir.name
    kube.labels.update({key: "warm", "preloader.dev/old-model": "warm", "other.io/x": "warm"})
    agent = Agent(_serve_config(model_dir))
    async with _labelling(agent, kube, tmp_path):
        await _until(kube, lambda api: not api.ours())
        first_patch = next(r for r in kube.requests if r.method == "PATCH")
        assert first_patch.body == {
            "metadata": {"labels": {key: None, "preloader.dev/old-model": None}}
        }
        assert kube.labels["other.io/x"] == "warm"
        await agent.start_up()
        await _until(kube, lambda api: api.ours() == {key: "warm"})


class _Node:
    """A node that cannot hold the model while ``full``: its pages go again right after
    each re-read (keep-warm measures them lost then, and the path stays degraded).

    :param model_dir: the files it evicts.
    """

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.full = True

    def on_event(self, event: EngineEvent) -> None:
        """Evict the model once a re-read is reported, before keep-warm measures it."""
        if self.full and event.kind is EventKind.REWARMED:
            evict_tree(self.model_dir)


async def _degrade(agent: Agent, model_dir: Path) -> None:
    for _ in range(DEGRADE_AFTER):
        evict_tree(model_dir)  # the same pages lost again after every re-read
        await agent.recheck()
    assert agent.snapshot().paths[0].state == "degraded"


def _degraded_events(api: KubeApi) -> list[dict[str, Any]]:
    return [e for e in api.events if e["reason"] == "ModelDegraded"]


@pytest.mark.anyio
async def test_a_degraded_path_keeps_its_label_within_the_grace(
    model_dir: Path, kube: KubeApi, tmp_path: Path
) -> None:
    node = _Node(model_dir)
    agent = Agent(_serve_config(model_dir), node.on_event)
    key = LABEL_PREFIX + model_dir.name
    async with _labelling(agent, kube, tmp_path, grace=3600):
        await agent.start_up()
        await _until(kube, lambda api: api.ours() == {key: "warm"})
        await _degrade(agent, model_dir)

        def lost_again(api: KubeApi) -> bool:
            return any("lost again" in e["message"] for e in _degraded_events(api))

        # A check that finds the pages gone may show the path below the ready ratio
        # before its re-read (an event of its own); the strikes' event follows.
        await _until(kube, lost_again)
        assert kube.ours() == {key: "warm"}
        assert {e["type"] for e in _degraded_events(kube)} == {"Warning"}


@pytest.mark.anyio
async def test_a_path_degraded_past_the_grace_loses_its_label(
    model_dir: Path, kube: KubeApi, tmp_path: Path
) -> None:
    node = _Node(model_dir)
    agent = Agent(_serve_config(model_dir), node.on_event)
    key = LABEL_PREFIX + model_dir.name
    async with _labelling(agent, kube, tmp_path, grace=0):
        await agent.start_up()
        await _until(kube, lambda api: api.ours() == {key: "warm"})
        await _degrade(agent, model_dir)
        await _until(kube, lambda api: not api.ours())
        node.full = False  # the node holds the model again: the next re-read restores it
        await agent.recheck()  # whole again after the re-read: warm again, labelled again
        await _until(kube, lambda api: len(api.events) == 3)
        assert kube.ours() == {key: "warm"}
    assert kube.event_reasons() == ["ModelWarm", "ModelDegraded", "ModelWarm"]


@pytest.mark.anyio
async def test_a_failed_path_loses_its_label_at_once(
    model_dir: Path, kube: KubeApi, tmp_path: Path
) -> None:
    agent = Agent(_serve_config(model_dir))
    key = LABEL_PREFIX + model_dir.name
    async with _labelling(agent, kube, tmp_path, grace=3600):
        await agent.start_up()
        await _until(kube, lambda api: api.ours() == {key: "warm"})
        for victim in model_dir.iterdir():
            victim.unlink()
        await agent.recheck()
        assert agent.snapshot().paths[0].state == "failed"
        await _until(kube, lambda api: not api.ours() and "ModelFailed" in api.event_reasons())
    failed = kube.events[-1]
    assert failed["type"] == "Warning" and "errors" in failed["message"]


@pytest.mark.anyio
@pytest.mark.parametrize("trouble", ["refused", "down"])
async def test_an_api_server_that_refuses_or_is_down_does_not_stop_warming(
    model_dir: Path, kube: KubeApi, tmp_path: Path, trouble: str
) -> None:
    if trouble == "refused":
        kube.refuse = True
    else:
        kube.down()
    agent = Agent(_serve_config(model_dir))
    key = LABEL_PREFIX + model_dir.name
    async with _labelling(agent, kube, tmp_path) as labeler:
        with anyio.fail_after(DEADLINE):
            await agent.start_up()
        snap = agent.snapshot()
        assert snap.ready and snap.state == "ready"  # the gate does not wait for the API
        with anyio.fail_after(DEADLINE):
            while not _metric(labeler, "preloader_kube_api_errors_total", operation="get"):
                await anyio.sleep(0.05)  # polling period; the labeler retries on its own
        assert _metric(labeler, "preloader_node_label", path=str(model_dir), label=key) == 0
        if trouble == "refused":
            assert {r.code for r in kube.requests} == {403}
            kube.refuse = False
        else:
            kube.up()
        await _until(kube, lambda api: api.ours() == {key: "warm"})
        await _until(kube, lambda api: "ModelWarm" in api.event_reasons())


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: the cluster CA and the server's key."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.anyio
async def test_in_cluster_config_reaches_the_api_over_tls_with_the_token(
    model_dir: Path, tmp_path: Path, certificate: tuple[Path, Path], monkeypatch: Any
) -> None:
    with KubeApi(tls=certificate) as kube:
        account = kube.service_account(tmp_path / "serviceaccount", certificate[0])
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(kube.port))
        config = dataclasses.replace(
            NodeLabelConfig.resolve(kube.node_name, [str(model_dir)]),
            service_account=str(account),
        )
        api = nodelabels.connect(config)
        try:
            labels = await api.patch_labels({"preloader.dev/model": "warm"})
        finally:
            await api.aclose()
        assert labels["preloader.dev/model"] == "warm"
        assert [r.code for r in kube.requests] == [200]


def test_in_cluster_config_without_the_service_host_is_a_usage_error(
    tmp_path: Path, certificate: tuple[Path, Path], monkeypatch: Any
) -> None:
    account = KubeApi().service_account(tmp_path / "serviceaccount", certificate[0])
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = dataclasses.replace(
        NodeLabelConfig.resolve("n", ["/m/a"]), service_account=str(account)
    )
    with pytest.raises(UsageError, match="KUBERNETES_SERVICE_HOST is not set"):
        nodelabels.connect(config)


# ------------------------------------------------------------------ a real serve process


def test_serve_labels_the_node_and_removes_the_label_on_sigterm(
    model_dir: Path, kube: KubeApi, tmp_path: Path, served: list[_serve.Served]
) -> None:
    key = LABEL_PREFIX + "qwen"
    server = _serve.track(
        served,
        str(model_dir),
        "--node-label",
        "--model-name",
        f"{model_dir}=qwen",
        env={"NODE_NAME": kube.node_name, "KUBECONFIG": str(kube.kubeconfig(tmp_path))},
    )
    server.poll(lambda: _serve.ready_body(server))
    kube.wait_for(lambda api: api.ours() == {key: "warm"})
    # The stand-in sees the label before the agent has read the reply that records it.
    server.wait_for_log(lambda line: line.get("event") == "node label set")
    _, metrics = server.request("/metrics")
    assert f'preloader_node_label{{label="{key}",path="{model_dir}"}} 1.0' in metrics.decode()
    code, _ = server.stop()
    assert code == 0
    assert kube.ours() == {}
    assert kube.labels["team"] == "ml"
    assert any(line.get("event") == "node labels removed" for line in server.logs)


def _serve_exit(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PRELOADER_")}
    base.pop("KUBECONFIG", None)
    base.pop("NODE_NAME", None)
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=_serve.REPO,
        env={**base, "PRELOADER_LOG_FORMAT": "console", **env},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    return proc.returncode, proc.stderr


def test_node_label_without_a_node_name_is_a_usage_error(model_dir: Path) -> None:
    code, stderr = _serve_exit(["-m", "preloader", "serve", str(model_dir), "--node-label"], {})
    assert code == 2
    assert "NODE_NAME" in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["   ", "-1", "Node_1", "a..b", "x" * 254])
def test_a_node_name_that_is_not_a_dns_subdomain_is_a_usage_error(
    model_dir: Path, name: str
) -> None:
    code, stderr = _serve_exit(
        ["-m", "preloader", "serve", str(model_dir), "--node-label"], {"NODE_NAME": name}
    )
    assert code == 2, stderr
    assert "NODE_NAME" in stderr and "not a node name" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_a_dns_subdomain_node_name_is_accepted(model_dir: Path) -> None:
    config = NodeLabelConfig.resolve("ip-10-0-0-1.ec2.internal", [str(model_dir)])
    assert config.node_name == "ip-10-0-0-1.ec2.internal"


def test_node_label_without_in_cluster_config_is_a_usage_error(model_dir: Path) -> None:
    code, stderr = _serve_exit(
        ["-m", "preloader", "serve", str(model_dir), "--node-label"], {"NODE_NAME": "n"}
    )
    assert code == 2
    assert "no in-cluster config" in stderr and len(stderr.strip().splitlines()) == 1


_MISSING_USER = (
    '{"clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}], '
    '"contexts": [{"name": "x", "context": {"cluster": "c", "user": "ghost"}}], '
    '"current-context": "x"}'
)


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("garbage: [\n", "not YAML"),
        ("[]\n", "not a kubeconfig"),
        ("null\n", "not a kubeconfig"),
        ('{"clusters": 5}\n', "not a kubeconfig"),
        (_MISSING_USER, "'ghost'"),
    ],
    ids=["not-yaml", "a-list", "null", "clusters-a-number", "missing-user"],
)
def test_a_malformed_kubeconfig_is_a_usage_error_naming_the_file(
    model_dir: Path, tmp_path: Path, text: str, cause: str
) -> None:
    kubeconfig = tmp_path / "bad-kubeconfig"
    kubeconfig.write_text(text)
    code, stderr = _serve_exit(
        ["-m", "preloader", "serve", str(model_dir), "--node-label"],
        {"NODE_NAME": "n", "KUBECONFIG": str(kubeconfig)},
    )
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert str(kubeconfig) in stderr and cause in stderr
    assert "internal error" not in stderr


def test_node_label_without_the_k8s_extra_names_the_extra(model_dir: Path) -> None:
    # lightkube made unimportable, as in an install without the extra.
    script = (
        "import sys; sys.modules['lightkube'] = None; "
        "from preloader.cli import main; sys.argv[0] = 'preloader'; main()"
    )
    code, stderr = _serve_exit(
        ["-c", script, "serve", str(model_dir), "--node-label"], {"NODE_NAME": "n"}
    )
    assert code == 2
    assert "pip install 'preloader[k8s]'" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_warm_never_imports_the_node_labeler_or_its_client(model_dir: Path) -> None:
    # -X importtime logs every import as it happens: an atexit hook would not run when
    # the CLI leaves by os._exit (a worker thread still winding down).
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "preloader", "warm", str(model_dir)],
        cwd=_serve.REPO,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert proc.returncode == 0, proc.stderr
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "preloader.cli.warm" in imported  # the log is there to be read
    assert (
        not {"lightkube", "preloader.serve.kube.nodelabels", "preloader.serve.kube.client"}
        & imported
    )
