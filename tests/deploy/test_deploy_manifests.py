"""deploy/ renders, validates against Kubernetes schemas and stays consistent with itself.

Consistency with the code (env names, command lines, the HTTP endpoints) is in
test_deploy_cli.py; the residency-truth choice is exercised in test_deploy_residency.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from preloader.settings import parse_start_lead

from ..lib import manifests as dm

# Native sidecars (restartPolicy on an initContainer) are GA from 1.29; the rest must also
# work on older clusters, which is the point of sidecar-wait.
NATIVE_SIDECAR_FOLDERS = {"sidecar", "sidecar-readiness-only"}
# admissionregistration.k8s.io/v1 ValidatingAdmissionPolicy is GA from 1.30 (optional folder).
POLICY_FOLDERS = {"node-warmup-policy"}
OLDEST_SUPPORTED = "1.27.0"
TARGET = "1.30.0"
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}
SERVER_PORT = 9400
SERVER_PATHS = {"/healthz", "/startz", "/readyz", "/status", "/metrics"}


@pytest.fixture(scope="module", params=dm.OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, dm.render(request.param)


def test_every_way_has_a_folder() -> None:
    assert {
        "base",
        "poststart",
        "sidecar",
        "sidecar-readiness-only",
        "sidecar-wait",
        "node-warmup",
        "stage-one-download",
        "monitoring",
    } <= set(dm.OVERLAYS)


def test_renders_to_resources(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    folder, resources = rendered
    assert resources, folder
    names = [(r["kind"], r["metadata"]["name"]) for r in resources]
    assert len(names) == len(set(names)), f"{folder}: duplicate resources {names}"


def test_validates_strictly_against_kubernetes_schemas(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    folder, resources = rendered
    newer = NATIVE_SIDECAR_FOLDERS | POLICY_FOLDERS
    versions = [TARGET] if folder in newer else [OLDEST_SUPPORTED, TARGET]
    for resource in resources:
        if (resource["apiVersion"], resource["kind"]) in CRD_KINDS:
            continue  # no schema shipped; checked by test_podmonitor_*
        for version in versions:
            kubernetes_validate.validate(resource, version, strict=True)


def test_strict_validation_catches_a_typo() -> None:
    # Guards the test above: strict mode must reject unknown fields.
    _, resources = "sidecar", dm.render("sidecar")
    workload = next(r for r in resources if r["kind"] == "StatefulSet")
    workload["spec"]["template"]["spec"]["initContainers"][0]["startupprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(workload, TARGET, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_python_loader_agrees_with_kubectl_kustomize() -> None:
    def key(resource: dict[str, Any]) -> tuple[str, str]:
        return resource["kind"], resource["metadata"]["name"]

    for folder in dm.OVERLAYS:
        by_kubectl = sorted(dm.render(folder), key=key)
        by_python = sorted(dm.render_python(dm.DEPLOY / folder), key=key)
        assert by_python == by_kubectl, folder


def _workloads(folder: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return list(dm.pod_specs(dm.render(folder)))


def _model_claims(resources: list[dict[str, Any]]) -> set[str]:
    return {r["metadata"]["name"] for r in resources if r["kind"] == "PersistentVolumeClaim"}


def test_preloader_containers_are_locked_down() -> None:
    for folder in dm.OVERLAYS:
        for _, spec in _workloads(folder):
            for container in dm.containers(spec):
                if not dm.is_preloader_image(container):
                    continue
                where = f"{folder}/{container['name']}"
                context = container.get("securityContext", {})
                assert context.get("allowPrivilegeEscalation") is False, where
                assert context.get("readOnlyRootFilesystem") is True, where
                assert context.get("capabilities", {}).get("drop") == ["ALL"], where
                assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, where
                assert context.get("privileged") is not True, where
                added = context.get("capabilities", {}).get("add", [])
                # FOWNER is the one capability residency needs, and it is only effective
                # for uid 0: adding it to a non-root user would be a silent no-op.
                assert set(added) <= {"FOWNER"}, where
                if added:
                    assert context.get("runAsUser") == 0, where
                else:
                    assert context.get("runAsNonRoot") is True, where


def test_model_volumes_are_mounted_read_only_except_for_the_downloader() -> None:
    for folder in dm.OVERLAYS:
        resources = dm.render(folder)
        claims = _model_claims(resources) | {"deepseek-r1", "qwen3-32b"}
        for _, spec in dm.pod_specs(resources):
            model_volumes = {
                v["name"]
                for v in spec.get("volumes", [])
                if v.get("persistentVolumeClaim", {}).get("claimName") in claims
            }
            assert model_volumes, folder
            for container in dm.containers(spec):
                for mount in container.get("volumeMounts", []):
                    if mount["name"] in model_volumes and container["name"] != "downloader":
                        assert mount.get("readOnly") is True, f"{folder}/{container['name']}"


def _preloader_port(container: dict[str, Any]) -> dict[str, Any]:
    ports = [p for p in container.get("ports", []) if p.get("name") == "preloader"]
    assert len(ports) == 1, container["name"]
    return dict(ports[0])


def _probe(container: dict[str, Any], kind: str) -> tuple[str, Any] | None:
    probe = container.get(kind)
    if probe is None:
        return None
    http = probe["httpGet"]
    return http["path"], http["port"]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _serving_containers(folder: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    found = []
    for _, spec in _workloads(folder):
        for container in dm.containers(spec):
            if dm.is_preloader_image(container) and container.get("args", [None])[0] == "serve":
                found.append((spec, container))
    return found


def test_probes_use_the_server_endpoints_and_port() -> None:
    for folder in ("sidecar", "sidecar-readiness-only", "sidecar-wait", "node-warmup"):
        serving = _serving_containers(folder)
        assert len(serving) == 1, folder
        _, container = serving[0]
        port = _preloader_port(container)
        assert port["containerPort"] == SERVER_PORT
        assert _env(container).get("PRELOADER_PORT", str(SERVER_PORT)) == str(SERVER_PORT)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = _probe(container, kind)
            if probe is not None:
                path, probe_port = probe
                assert path in SERVER_PATHS, (folder, kind)
                assert probe_port in ("preloader", SERVER_PORT), (folder, kind)
        assert _probe(container, "livenessProbe") == ("/healthz", "preloader"), folder


def test_serving_pods_take_no_service_link_variables() -> None:
    # A Service named preloader would put PRELOADER_PORT=tcp://ADDR:PORT into the pod.
    for folder in ("sidecar", "sidecar-readiness-only", "sidecar-wait", "node-warmup"):
        for spec, _ in _serving_containers(folder):
            assert spec.get("enableServiceLinks") is False, folder


def test_each_sidecar_variant_gates_what_it_says() -> None:
    ((_, gated),) = _serving_containers("sidecar")
    assert gated["restartPolicy"] == "Always"
    # The server starts on the start gate; Pod Ready still means resident.
    assert _probe(gated, "startupProbe") == ("/startz", "preloader")
    assert _probe(gated, "readinessProbe") == ("/readyz", "preloader")

    ((_, readiness),) = _serving_containers("sidecar-readiness-only")
    assert readiness["restartPolicy"] == "Always"
    assert "startupProbe" not in readiness
    assert _probe(readiness, "readinessProbe") == ("/readyz", "preloader")

    ((spec, legacy),) = _serving_containers("sidecar-wait")
    assert "restartPolicy" not in legacy
    assert legacy in spec["containers"]
    server = next(c for c in spec["containers"] if c["name"] == "sglang")
    script = " ".join(server["command"])
    waited = re.search(r"preloader\.pyz wait --url (\S+)", script)
    assert waited is not None
    assert waited.group(1) == f"http://127.0.0.1:{SERVER_PORT}/startz"
    assert script.index("preloader.pyz wait") < script.index("sglang.launch_server")
    assert _probe(legacy, "readinessProbe") == ("/readyz", "preloader")


def test_the_start_gate_ways_set_a_valid_lead() -> None:
    for folder in ("sidecar", "sidecar-wait"):
        ((_, container),) = _serving_containers(folder)
        lead = parse_start_lead(_env(container)["PRELOADER_START_LEAD"])
        # A lead is a start-up time: more than nothing, well inside the agent's deadline.
        assert 0 < lead < float(_env(container)["PRELOADER_TIMEOUT"]), folder


def test_startup_budget_outlasts_the_agent_deadline() -> None:
    # The agent's own deadline (PRELOADER_TIMEOUT, policy "ready") must fire before the
    # kubelet gives up on the startupProbe, or the sidecar is killed and starts over.
    ((_, container),) = _serving_containers("sidecar")
    probe = container["startupProbe"]
    budget = probe["periodSeconds"] * probe["failureThreshold"]
    deadline = float(_env(container)["PRELOADER_TIMEOUT"])
    assert 0 < deadline < budget
    assert _env(container)["PRELOADER_TIMEOUT_POLICY"] == "ready"


def test_wait_outlasts_the_agent_deadline() -> None:
    ((spec, container),) = _serving_containers("sidecar-wait")
    server = next(c for c in spec["containers"] if c["name"] == "sglang")
    timeout = re.search(r"wait .*--timeout (\d+)", " ".join(server["command"]))
    assert timeout is not None
    assert float(_env(container)["PRELOADER_TIMEOUT"]) < float(timeout.group(1))


_QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * _QUANTITY[unit]


def test_agent_memory_holds_the_model_and_request_equals_limit() -> None:
    # Sizing rule of docs/kubernetes.md (Memory planning): request = limit >= model bytes + 256 MiB.
    model_bytes = {"/models/DeepSeek-R1-0528": 690 * 10**9, "/models/Qwen3-32B": 66 * 10**9}
    for folder in ("sidecar", "sidecar-readiness-only", "sidecar-wait", "node-warmup"):
        resources = dm.render(folder)
        ((_, container),) = _serving_containers(folder)
        limits = container["resources"]["limits"]
        requests = container["resources"]["requests"]
        assert requests["memory"] == limits["memory"], folder
        mounted = {m["mountPath"] for m in container["volumeMounts"]}
        need = sum(model_bytes[path] for path in mounted) + 256 * 2**20
        assert _bytes(limits["memory"]) > need, folder
        assert "cpu" not in limits, f"{folder}: a CPU limit only slows the warm-up"
        config = next((r for r in resources if r["kind"] == "ConfigMap"), None)
        if config is not None:  # node-warmup: every listed model is mounted
            paths = set(config["data"]["PRELOADER_PATHS"].split(":"))
            assert paths == mounted, folder


def test_zipapp_path_matches_the_dockerfile_and_the_mounts() -> None:
    dockerfile = (dm.REPO / "Dockerfile").read_text()
    assert "--output /opt/preloader/preloader.pyz" in dockerfile
    for folder in ("poststart", "sidecar-wait"):
        ((_, spec),) = _workloads(folder)
        (installer,) = spec["initContainers"]
        source, target = installer["command"][1:]
        assert installer["command"][0] == "cp"
        assert source == "/opt/preloader/preloader.pyz"
        (bin_mount,) = installer["volumeMounts"]
        assert Path(target).parent == Path(bin_mount["mountPath"])
        server = next(c for c in spec["containers"] if c["name"] == "sglang")
        server_mount = next(m for m in server["volumeMounts"] if m["name"] == bin_mount["name"])
        served = Path(server_mount["mountPath"]) / Path(target).name
        invoked = [inv for inv in dm.invocations(folder, [*dm.render(folder)]) if inv.via_zipapp]
        assert invoked, folder
        hook_or_command = json.dumps(server)
        assert f"python3 {served}" in hook_or_command, folder


def test_poststart_hook_mirrors_the_reference_env() -> None:
    ((_, spec),) = _workloads("poststart")
    server = next(c for c in spec["containers"] if c["name"] == "sglang")
    env = _env(server)
    assert env["MODEL_DIR"] == "/models/DeepSeek-R1-0528"
    assert env["PRELOADER_CONC"] == "4"
    assert "--tp 8" in server["command"][-1]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in spec["volumes"])
    hook = server["lifecycle"]["postStart"]["exec"]["command"]
    assert "warm --best-effort" in hook[-1]


def test_images_carry_the_package_version() -> None:
    version_file = (dm.REPO / "preloader" / "_version.py").read_text()
    match = re.search(r"""__version__\s*=\s*["']([^"']+)""", version_file)
    assert match is not None
    for folder in dm.OVERLAYS:
        for _, spec in _workloads(folder):
            for container in dm.containers(spec):
                if dm.is_preloader_image(container):
                    assert container["image"].endswith(":" + match.group(1)), folder


def test_node_warmup_targets_gpu_nodes() -> None:
    ((daemonset, spec),) = _workloads("node-warmup")
    assert daemonset["kind"] == "DaemonSet"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    keys = {e["key"] for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]}
    assert keys == {"aliyun.accelerator/nvidia_name", "nvidia.com/gpu.present"}
    (container,) = spec["containers"]
    assert container["envFrom"][0]["configMapRef"]["name"].startswith("preloader-models-")


def test_stage_one_downloads_then_reports_status() -> None:
    ((job, spec),) = _workloads("stage-one-download")
    assert job["kind"] == "Job"
    assert job["spec"]["backoffLimit"] == 0
    (downloader,) = spec["initContainers"]
    assert downloader["command"] == ["modelscope", "download"]
    assert "--max-workers=32" in downloader["args"]
    (status,) = spec["containers"]
    assert status["args"][0] == "status"
    assert status["args"][-1] == downloader["args"][downloader["args"].index("--local_dir") + 1]


def test_pv_matches_the_reference() -> None:
    resources = dm.render("base")
    pv = next(r for r in resources if r["kind"] == "PersistentVolume")
    pvc = next(r for r in resources if r["kind"] == "PersistentVolumeClaim")
    attributes = pv["spec"]["csi"]["volumeAttributes"]
    assert pv["spec"]["csi"]["driver"] == "ossplugin.csi.alibabacloud.com"
    assert pv["spec"]["csi"]["volumeHandle"] == pv["metadata"]["name"]
    assert attributes["fuseType"] == "ossfs2"
    assert attributes["authType"] == "rrsa"
    assert "memory_data_cache_size=" in attributes["otherOpts"]
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pvc["spec"]["storageClassName"] == ""
    # Comments explain every choice; keep them (the reference readers rely on them).
    raw = (dm.DEPLOY / "base" / "model-pv-pvc.yaml").read_text()
    for word in ("RRSA", "memory_data_cache_size", "prefetch_chunks", "same PV"):
        assert word in raw


def test_podmonitor_scrapes_the_preloader_port_of_labelled_pods() -> None:
    (monitor,) = [r for r in dm.render("monitoring") if r["kind"] == "PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    for folder in ("sidecar", "sidecar-readiness-only", "sidecar-wait", "node-warmup"):
        ((workload, _),) = _workloads(folder)
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), folder
        ((_, container),) = _serving_containers(folder)
        assert _preloader_port(container)["name"] == endpoint["port"]


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(
        (dm.DEPLOY / "monitoring" / "grafana-dashboard.json").read_text()
    )
    return dashboard


def test_dashboard_uses_only_agreed_metric_names() -> None:
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bpreloader_[a-z_]+\b", expr)}
    agreed = dm.AGREED_METRICS | dm.NODE_LABEL_METRICS
    assert used <= agreed, used - agreed
    # Progress, throughput, residency and errors are all shown.
    for needed in (
        "preloader_resident_bytes",
        "preloader_target_bytes",
        "preloader_read_bytes_total",
        "preloader_errors_total",
    ):
        assert needed in used
    for expr in exprs:
        for counter in re.findall(r"\bpreloader_[a-z_]+_total\b", expr):
            assert re.search(rf"(rate|increase)\({counter}\b", expr), expr


def test_dashboard_is_wellformed_and_shipped_as_configmap() -> None:
    dashboard = _dashboard()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace", "pod"}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    (config_map,) = [r for r in dm.render("monitoring") if r["kind"] == "ConfigMap"]
    assert config_map["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert json.loads(config_map["data"]["grafana-dashboard.json"]) == dashboard


def test_yaml_files_parse_and_carry_comments() -> None:
    for path in sorted(dm.DEPLOY.rglob("*.yaml")):
        text = path.read_text()
        list(yaml.safe_load_all(text))
        assert text.lstrip().startswith("#"), f"{path} should start with a comment saying why"


def test_kubernetes_page_covers_every_folder_and_the_sizing_rule() -> None:
    page = (dm.DEPLOY.parent / "docs" / "kubernetes.md").read_text()
    text = page.split("## Deploying on Kubernetes", 1)[1]
    for folder in dm.OVERLAYS:
        assert f"deploy/{folder}" in text, folder
    for topic in (
        "request = limit",
        "I/O isolation",
        "GGUF",
        "--weight-loader-prefetch-checkpoints",
        "--safetensors-load-strategy",
        "CAP_FOWNER",
    ):
        assert topic in text, topic
