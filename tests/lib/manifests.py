"""Helpers for the tests of ``deploy/``: render the Kustomize folders and walk pod specs.

Rendering uses ``kubectl kustomize`` when kubectl is installed and otherwise a small
loader that understands exactly the Kustomize features ``deploy/`` uses (``resources``
and ``configMapGenerator``); ``test_deploy_manifests.py`` checks that both agree, so a
feature added to a kustomization without support here fails loudly instead of being
skipped.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "AGREED_METRICS",
    "DEFAULT_CONTAINER_CAPS",
    "DEPLOY",
    "IMAGE_UID",
    "NODE_LABEL_METRICS",
    "OVERLAYS",
    "REPO",
    "Invocation",
    "containers",
    "invocations",
    "is_preloader_image",
    "pod_specs",
    "readonly_root_prefix",
    "render",
    "render_python",
    "setpriv_args",
    "shared_tmpdir",
    "system_python",
    "zipapp",
]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
#: Every folder of deploy/ that kustomize can build.
OVERLAYS = sorted(p.parent.name for p in DEPLOY.glob("*/kustomization.yaml"))
#: The numeric USER of the Dockerfile's final stage (checked in test_dockerfile.py).
IMAGE_UID = 65532
#: Metric names agreed with the sidecar (issue 3); the dashboard may use only these.
AGREED_METRICS = frozenset(
    {
        "preloader_target_bytes",
        "preloader_resident_bytes",
        "preloader_read_bytes_total",
        "preloader_files",
        "preloader_errors_total",
        "preloader_warm_duration_seconds",
        "preloader_ready",
        "preloader_rewarm_bytes_total",
        "preloader_evictions_detected_total",
        "preloader_build_info",
        "preloader_start_gate_open",
        "preloader_start_lead_seconds",
        "preloader_start_estimate_seconds",
        "preloader_start_to_ready_seconds",
        "preloader_start_lead_verdict",
    }
)
#: Exported only by ``serve --node-label`` (the node labeler's collector).
NODE_LABEL_METRICS = frozenset({"preloader_node_label", "preloader_kube_api_errors_total"})

Resource = dict[str, Any]
_KNOWN_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "configMapGenerator"}


def render(folder: str) -> list[Resource]:
    """Render ``deploy/<folder>`` with ``kubectl kustomize``, or the Python loader."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return render_python(DEPLOY / folder)
    output = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / folder)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def render_python(folder: Path) -> list[Resource]:
    """Render a kustomization that uses only ``resources`` and ``configMapGenerator``."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _KNOWN_KUSTOMIZATION_KEYS
    if unknown:
        raise NotImplementedError(f"{folder}: kustomization keys {sorted(unknown)}")
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            resources.extend(render_python(path))
        else:
            resources.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    renames: dict[str, str] = {}
    for generator in kustomization.get("configMapGenerator", []):
        config_map = _generate_config_map(folder, generator)
        renames[generator["name"]] = config_map["metadata"]["name"]
        resources.append(config_map)
    for resource in resources:
        _rename_config_map_refs(resource, renames)
    return resources


def _generate_config_map(folder: Path, generator: dict[str, Any]) -> Resource:
    data: dict[str, str] = {}
    for env_file in generator.get("envs", []):
        for line in (folder / env_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                data[key] = value
    for file_entry in generator.get("files", []):
        key, _, source = file_entry.rpartition("=")
        path = folder / (source or file_entry)
        data[key or path.name] = path.read_text()
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    options = generator.get("options", {})
    name = generator["name"]
    if not options.get("disableNameSuffixHash", False):
        name = f"{name}-{_kustomize_hash(data)}"
    metadata: dict[str, Any] = {"name": name}
    if options.get("labels"):
        metadata["labels"] = dict(options["labels"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _kustomize_hash(data: dict[str, str]) -> str:
    # Kustomize hashes {"data", "kind", "name": ""} as Go's json.Marshal writes it (sorted
    # keys, no spaces, HTML characters escaped) and maps 0,1,3,a,e so the suffix never
    # looks like a number or a word.
    encoded = json.dumps(
        {"data": data, "kind": "ConfigMap", "name": ""},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        encoded = encoded.replace(char, escape)
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _rename_config_map_refs(node: Any, renames: dict[str, str]) -> None:
    if isinstance(node, dict):
        for key in ("configMap", "configMapRef", "configMapKeyRef"):
            ref = node.get(key)
            if isinstance(ref, dict) and ref.get("name") in renames:
                ref["name"] = renames[ref["name"]]
        for value in node.values():
            _rename_config_map_refs(value, renames)
    elif isinstance(node, list):
        for value in node:
            _rename_config_map_refs(value, renames)


def pod_specs(resources: list[Resource]) -> Iterator[tuple[Resource, dict[str, Any]]]:
    """Yield ``(resource, pod spec)`` for every workload with a pod template."""
    for resource in resources:
        template = resource.get("spec", {}).get("template")
        if isinstance(template, dict) and "spec" in template:
            yield resource, template["spec"]


def containers(pod_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield init containers, then containers, of a pod spec."""
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec.get("containers", [])


def is_preloader_image(container: dict[str, Any]) -> bool:
    """True for containers that run the preloader's own image."""
    return str(container.get("image", "")).split(":")[0].rsplit("/", 1)[-1] == "preloader"


@dataclass(frozen=True)
class Invocation:
    """One way a manifest runs the preloader."""

    where: str  # "<folder>/<container>[/postStart]"
    argv: tuple[str, ...]  # arguments after the program: ("warm", "--best-effort")
    env: frozenset[str]  # environment names the container sets
    via_zipapp: bool


_ZIPAPP_CALL = re.compile(r"python3\s+(\S+preloader\.pyz)\s+([^|;&\n]*)")


def _env_names(container: dict[str, Any], config_maps: dict[str, dict[str, str]]) -> set[str]:
    names = {entry["name"] for entry in container.get("env", [])}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        names.update(config_maps.get(ref, {}))
    return names


def invocations(folder: str, resources: list[Resource]) -> list[Invocation]:
    """Every preloader command line in a rendered folder: image args and zipapp calls."""
    config_maps = {
        r["metadata"]["name"]: r.get("data", {}) for r in resources if r["kind"] == "ConfigMap"
    }
    found: list[Invocation] = []
    for _, spec in pod_specs(resources):
        for container in containers(spec):
            env = frozenset(_env_names(container, config_maps))
            where = f"{folder}/{container['name']}"
            if is_preloader_image(container) and "command" not in container:
                found.append(Invocation(where, tuple(container.get("args", [])), env, False))
            scripts = [" ".join(container.get("command", []) + container.get("args", []))]
            hook = container.get("lifecycle", {}).get("postStart", {}).get("exec", {})
            if hook:
                scripts.append(" ".join(hook["command"]))
                where_hook = where + "/postStart"
            for index, script in enumerate(scripts):
                script = script.replace("\\\n", " ")
                for match in _ZIPAPP_CALL.finditer(script):
                    argv = tuple(shlex.split(match.group(2)))
                    found.append(Invocation(where_hook if index else where, argv, env, True))
    return found


def setpriv_args(security_context: dict[str, Any]) -> list[str]:
    """Translate a container securityContext into ``setpriv`` arguments.

    Like a container runtime: the process gets ``runAsUser`` (default: the image's USER),
    a bounding set of only the added capabilities, no inheritable or ambient ones, and
    ``no_new_privs`` when privilege escalation is off. For uid 0, exec then grants the
    bounding set; for any other uid the kernel grants nothing, as in Kubernetes.
    """
    uid = int(security_context.get("runAsUser", IMAGE_UID))
    gid = int(security_context.get("runAsGroup", uid))
    capabilities = security_context.get("capabilities", {})
    assert capabilities.get("drop") == ["ALL"], "containers must drop ALL capabilities"
    bounding = "-all" + "".join(f",+{cap.lower()}" for cap in capabilities.get("add", []))
    args = [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        f"--bounding-set={bounding}",
        "--inh-caps=-all",
        "--ambient-caps=-all",
    ]
    if security_context.get("allowPrivilegeEscalation") is False:
        args.append("--no-new-privs")
    return args


#: Capabilities a container runtime (containerd, Docker) gives a container that does not
#: drop any: the identity a postStart hook in an unhardened server container runs with.
DEFAULT_CONTAINER_CAPS = (
    "chown,dac_override,fowner,fsetid,kill,setgid,setuid,setpcap,"
    "net_bind_service,net_raw,sys_chroot,mknod,audit_write,setfcap"
)


def shared_tmpdir(prefix: str) -> Path:
    """A temporary folder every uid can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def zipapp() -> Path:
    """Build dist/preloader.pyz once per test session, into a world-readable folder."""
    spec = importlib.util.spec_from_file_location(
        "build_zipapp", REPO / "scripts" / "build_zipapp.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_zipapp"] = module
    spec.loader.exec_module(module)
    output: Path = module.build(shared_tmpdir("preloader-pyz-") / "preloader.pyz")
    output.chmod(0o755)
    return output


SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/usr/bin/python3.12")
NO_SYSTEM_PYTHON = (
    f"no python3 >= 3.10 outside this test environment ({sys.prefix}) at "
    + ", ".join(SYSTEM_PYTHONS)
)


@functools.cache
def system_python() -> str | None:
    """An interpreter >= 3.10 outside this test environment that every uid can execute
    (the Debian one), standing in for a server image's python3.

    It may be the interpreter the test environment was made from: a fresh venv of it has
    none of the test environment's packages (tests/packaging/test_zipapp.py checks that).
    """
    for candidate in SYSTEM_PYTHONS:
        if not os.access(candidate, os.X_OK) or Path(candidate).resolve().is_relative_to(
            Path(sys.prefix).resolve()
        ):
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info >= (3, 10))"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.stdout.strip() == "True":
            return candidate
    return None


@functools.cache
def readonly_root_prefix() -> tuple[str, ...] | None:
    """Command prefix that runs the rest with ``/`` remounted read-only, in a private
    mount namespace (like readOnlyRootFilesystem), or None where that is not allowed."""
    prefix = (
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount --bind / / && mount -o remount,bind,ro / && exec "$@"',
        "readonly-root",
    )
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return None
    probe = subprocess.run(
        [*prefix, "sh", "-c", "! touch /.preloader-ro-probe 2>/dev/null"],
        capture_output=True,
        check=False,
    )
    return prefix if probe.returncode == 0 else None
