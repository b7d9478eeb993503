"""deploy/storage and deploy/servers: Kustomize components for other storages and servers.

Each storage component swaps deploy/base's ossfs 2.0 volume for another storage, each
server component swaps the reference guide's SGLang demo image for an upstream server.
They are rendered with ``kubectl kustomize`` on top of the ways that mount the model
claim, every combination, and each result is validated strictly against the Kubernetes
schemas, then held to what the component's comments promise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ..lib import manifests as dm

STORAGE = dm.DEPLOY / "storage"
SERVERS = dm.DEPLOY / "servers"
STORAGES = sorted(p.parent.name for p in STORAGE.glob("*/kustomization.yaml"))
SERVER_NAMES = sorted(p.parent.name for p in SERVERS.glob("*/kustomization.yaml"))
#: The ways whose pods mount the deepseek-r1 claim of deploy/base.
CLAIM_WAYS = ("sidecar", "sidecar-readiness-only", "sidecar-wait", "poststart", "node-warmup")
#: The ways whose server container runs unchanged: the server components apply to these.
SERVER_WAYS = ("sidecar", "sidecar-readiness-only")
NATIVE_SIDECAR_WAYS = {"sidecar", "sidecar-readiness-only"}
MODEL_PATH = "/models/DeepSeek-R1-0528"

Resource = dict[str, Any]

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="components and patches are rendered with kubectl kustomize (not installed)",
)


def render(way: str, components: list[str | Path]) -> list[Resource]:
    """``kubectl kustomize`` of an overlay: ``deploy/<way>`` plus the given components.

    :param way: a folder of deploy/
    :param components: component folders, relative to deploy/ or absolute
    :return: the rendered resources
    :raises subprocess.CalledProcessError: when kustomize fails
    """
    with tempfile.TemporaryDirectory() as work:
        # kustomize takes only relative paths to other kustomizations.
        def rel(path: Path) -> str:
            return os.path.relpath(path, work)

        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [rel(dm.DEPLOY / way)],
            # An absolute component path stays itself under the / operator.
            "components": [rel(dm.DEPLOY / c) for c in components],
        }
        (Path(work) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        output = subprocess.run(
            ["kubectl", "kustomize", work], check=True, capture_output=True, text=True
        ).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def _validate(way: str, resources: list[Resource]) -> None:
    versions = ["1.30.0"] if way in NATIVE_SIDECAR_WAYS else ["1.27.0", "1.30.0"]
    for resource in resources:
        for version in versions:
            kubernetes_validate.validate(resource, version, strict=True)


def _one(resources: list[Resource], kind: str) -> Resource:
    (found,) = [r for r in resources if r["kind"] == kind]
    return found


def _named(resources: list[Resource], kind: str, name: str) -> Resource:
    (found,) = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def _workload(resources: list[Resource]) -> Resource:
    """The way's one StatefulSet, or node-warmup's DaemonSet."""
    (found,) = [r for r in resources if r["kind"] in {"StatefulSet", "DaemonSet"}]
    return found


def _model_volume_name(resources: list[Resource]) -> str:
    # node-warmup names its volumes after the models; the StatefulSets say model-storage.
    return "deepseek-r1" if _workload(resources)["kind"] == "DaemonSet" else "model-storage"


def _model_volume(resources: list[Resource]) -> dict[str, Any]:
    spec = _workload(resources)["spec"]["template"]["spec"]
    name = _model_volume_name(resources)
    (volume,) = [v for v in spec["volumes"] if v["name"] == name]
    return dict(volume)


def _mounts_of_model(resources: list[Resource]) -> Iterator[dict[str, Any]]:
    spec = _workload(resources)["spec"]["template"]["spec"]
    name = _model_volume_name(resources)
    for container in dm.containers(spec):
        for mount in container.get("volumeMounts", []):
            if mount["name"] == name:
                yield mount


def test_every_storage_users_have_has_a_component() -> None:
    # ossfs 2.0 is deploy/base itself.
    assert set(STORAGES) >= {"s3-mountpoint", "gcsfuse", "nfs", "local-nvme", "juicefs"}
    assert set(SERVER_NAMES) >= {"sglang", "vllm", "llama-cpp"}


def test_components_are_components_with_comments() -> None:
    for folder in [*(STORAGE / s for s in STORAGES), *(SERVERS / s for s in SERVER_NAMES)]:
        text = (folder / "kustomization.yaml").read_text()
        assert text.startswith("#"), folder
        assert "docs/storages-kubernetes.md" in text or folder.parent == SERVERS, folder
        assert yaml.safe_load(text)["kind"] == "Component", folder


@pytest.mark.parametrize("way", CLAIM_WAYS)
@pytest.mark.parametrize("storage", STORAGES)
def test_storage_renders_validates_and_replaces_the_ossfs_volume(way: str, storage: str) -> None:
    resources = render(way, [f"storage/{storage}"])
    _validate(way, resources)
    names = [(r["kind"], r["metadata"]["name"]) for r in resources]
    assert len(names) == len(set(names))
    # Every mount of the model stays read-only, whatever the storage.
    mounts = list(_mounts_of_model(resources))
    assert mounts and all(m.get("readOnly") is True for m in mounts), mounts
    volume = _model_volume(resources)
    if storage == "local-nvme":
        claims = {r["metadata"]["name"] for r in resources if r["kind"].startswith("Persistent")}
        assert "deepseek-r1" not in claims
        assert "persistentVolumeClaim" not in volume
        assert volume["hostPath"]["type"] == "Directory"
        return
    assert volume["persistentVolumeClaim"]["claimName"] == "deepseek-r1"
    pv = _named(resources, "PersistentVolume", "deepseek-r1")
    pvc = _named(resources, "PersistentVolumeClaim", "deepseek-r1")
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == pv["spec"]["accessModes"]
    assert "ossplugin" not in yaml.safe_dump(pv["spec"]), "the ossfs volume is left over"
    options = pv["spec"]["mountOptions"]
    if storage == "s3-mountpoint":
        # Mountpoint drops a file's pages at every open: only its own cache lasts.
        assert pv["spec"]["csi"]["volumeAttributes"]["cache"] in {"emptyDir", "ephemeral"}
        assert "read-only" in options
        assert "metadata-ttl indefinite" in options
        # The page cache never holds across the server's open there: ready once the pass
        # has read everything through Mountpoint's cache, and no keep-warm re-reads.
        spec = _workload(resources)["spec"]["template"]["spec"]
        agents = [c for c in dm.containers(spec) if c["name"] == "preloader"]
        assert len(agents) == (0 if way == "poststart" else 1)
        for agent in agents:
            env = {e["name"]: e.get("value") for e in agent["env"]}
            assert env["PRELOADER_READY_RATIO"] == "0"
            assert env["PRELOADER_RECHECK_SECONDS"] == "0"
            assert dm.is_preloader_image(agent)
    elif storage == "gcsfuse":
        # A mount per pod: only the StatefulSet ways, where the preloader shares the pod.
        template = _workload(resources)["spec"]["template"]["metadata"]
        if way != "node-warmup":
            assert template["annotations"]["gke-gcsfuse/volumes"] == "true"
        assert pv["spec"]["csi"]["readOnly"] is True
    elif storage == "nfs":
        assert "csi" not in pv["spec"]
        assert pv["spec"]["nfs"]["readOnly"] is True
    elif storage == "juicefs":
        assert pv["spec"]["csi"]["volumeHandle"] == pv["metadata"]["name"]
        assert "ro" in options


@pytest.mark.parametrize("way", SERVER_WAYS)
@pytest.mark.parametrize("storage", [None, *STORAGES])
@pytest.mark.parametrize("server", SERVER_NAMES)
def test_server_is_a_parameter_on_any_storage(way: str, storage: str | None, server: str) -> None:
    components: list[str | Path] = [f"servers/{server}"]
    components += [f"storage/{storage}"] if storage else []
    resources = render(way, components)
    _validate(way, resources)
    spec = _one(resources, "StatefulSet")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["name"] == server
    assert "aliyuncs.com" not in container["image"] and "ack-demo" not in container["image"]
    assert ":" in container["image"], "pin a tag"
    command = " ".join(container["command"])
    assert MODEL_PATH in command
    assert "--port 8000" in command
    # The rest of the container (ports, GPUs, mounts) is the way's own.
    assert container["ports"] == [{"containerPort": 8000, "name": "http"}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {MODEL_PATH, "/dev/shm"}
    # The preloader sidecar is untouched by the server component.
    (preloader,) = [c for c in dm.containers(spec) if dm.is_preloader_image(c)]
    assert preloader["args"] == ["serve"]


@pytest.mark.parametrize("server", SERVER_NAMES)
def test_a_server_component_refuses_a_way_whose_first_container_is_not_the_server(
    server: str,
) -> None:
    # In deploy/sidecar-wait the first container is the preloader, not the server.
    with pytest.raises(subprocess.CalledProcessError) as failed:
        render("sidecar-wait", [f"servers/{server}"])
    assert "test" in str(failed.value.stderr).lower()


def test_render_fails_loudly_on_a_broken_component(tmp_path: Path) -> None:
    # Guards the tests above: a patch whose path does not exist must fail the render.
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\npatches:\n"
        "  - target: {kind: PersistentVolume, name: deepseek-r1}\n"
        "    patch: |-\n      - op: remove\n        path: /spec/nosuchfield\n"
    )
    with pytest.raises(subprocess.CalledProcessError):
        render("sidecar", [tmp_path])
