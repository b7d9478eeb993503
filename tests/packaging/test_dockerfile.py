"""The Dockerfile, checked without a Docker engine.

Its instructions are parsed and held to the image contract (multi-stage, slim base, no
build tools in the final stage, numeric non-root USER, `preloader` entrypoint, OCI
labels). The build stage's install step is replayed in a fresh venv of another Python,
and the entrypoint runs from it as the image's USER with `/` mounted read-only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..lib import manifests as dm

DOCKERFILE = dm.REPO / "Dockerfile"
OCI_LABELS = {
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.licenses",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.source",
}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


def parse(text: str) -> list[list[Instruction]]:
    """Split a Dockerfile into stages of instructions (continuations joined)."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: list[list[Instruction]] = [[]]
    for entry in logical:
        keyword, _, value = entry.partition(" ")
        instruction = Instruction(keyword.upper(), value.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


def _values(stage: list[Instruction], keyword: str) -> list[str]:
    return [i.value for i in stage if i.keyword == keyword]


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return parse(DOCKERFILE.read_text())


def test_is_multi_stage_on_a_slim_python_base(stages: list[list[Instruction]]) -> None:
    preamble, build, final = stages
    # The base is a build argument (tests/test_image.py points it at a local Debian base);
    # its default is a slim Python image of a supported version.
    (base,) = (v for v in _values(preamble, "ARG") if v.startswith("BASE_IMAGE="))
    match = re.fullmatch(r"BASE_IMAGE=python:(\d+)\.(\d+)-slim-\w+", base)
    assert match is not None, base
    assert (int(match.group(1)), int(match.group(2))) >= (3, 10)
    assert build[0].value == "${BASE_IMAGE} AS build"
    assert final[0].value == "${BASE_IMAGE}"


def test_final_stage_has_no_build_tools(stages: list[list[Instruction]]) -> None:
    final = stages[-1]
    assert not _values(final, "RUN"), "install in the build stage; copy results only"
    copies = _values(final, "COPY")
    assert copies and all(c.startswith("--from=build ") for c in copies)
    build_runs = " ".join(_values(stages[1], "RUN"))
    assert "--only-binary=:all:" in build_runs, "wheels only: no compiler needed"
    assert not re.search(r"apt-get|gcc|build-essential", build_runs)


def test_runs_as_a_numeric_non_root_user(stages: list[list[Instruction]]) -> None:
    (user,) = _values(stages[-1], "USER")
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    assert match is not None, "Kubernetes can only check runAsNonRoot for numeric users"
    assert int(match.group(1)) == dm.IMAGE_UID != 0
    assert match.group(2) is not None and int(match.group(2)) != 0


def test_entrypoint_is_preloader_in_exec_form(stages: list[list[Instruction]]) -> None:
    final = stages[-1]
    (entrypoint,) = _values(final, "ENTRYPOINT")
    (command,) = _values(final, "CMD")
    assert json.loads(entrypoint) == ["preloader"]
    assert json.loads(command) == ["serve"]
    assert _values(final, "EXPOSE") == ["9400"]


def test_read_only_root_needs_no_bytecode_writes(stages: list[list[Instruction]]) -> None:
    env = " ".join(_values(stages[-1], "ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PATH=/opt/preloader/venv/bin:$PATH" in env


def test_carries_oci_labels(stages: list[list[Instruction]]) -> None:
    labels = " ".join(_values(stages[-1], "LABEL"))
    keys = set(re.findall(r"(org\.opencontainers\.image\.[a-z.]+)=", labels))
    assert keys >= OCI_LABELS


def test_build_stage_builds_the_zipapp_where_manifests_copy_it_from(
    stages: list[list[Instruction]],
) -> None:
    runs = " ".join(_values(stages[1], "RUN"))
    assert "python3 -m venv /opt/preloader/venv" in runs
    # The k8s extra: the node warm-up DaemonSet labels nodes (serve --node-label).
    assert "/opt/preloader/venv/bin/pip install --only-binary=:all: '.[k8s]'" in runs
    assert "scripts/build_zipapp.py --output /opt/preloader/preloader.pyz" in runs


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (dm.REPO / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "dist", "tests"):
        assert entry in ignored


@pytest.fixture(scope="module")
def image_venv() -> Path:
    """Replay of the build stage's install: a fresh venv of the system Python, `pip install .`."""
    base = dm.system_python()
    if base is None:
        pytest.skip(dm.NO_SYSTEM_PYTHON)
    venv = dm.shared_tmpdir("preloader-image-") / "venv"
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            f"{dm.REPO}[k8s]",
        ],
        check=True,
        timeout=300,
    )
    return venv


def test_entrypoint_runs_as_the_image_user_on_a_read_only_root(
    image_venv: Path, stages: list[list[Instruction]]
) -> None:
    prefix = dm.readonly_root_prefix()
    if prefix is None:
        pytest.skip("needs root and unshare to mount / read-only")
    (user,) = _values(stages[-1], "USER")
    uid, gid = user.split(":")
    model = dm.shared_tmpdir("preloader-image-model-")
    (model / "weights.safetensors").write_bytes(os.urandom(1 << 20))
    (model / "weights.safetensors").chmod(0o644)
    # Files the image's user owns: residency is provable without any capability.
    os.chown(model / "weights.safetensors", int(uid), int(gid))
    env = {
        "PATH": f"{image_venv / 'bin'}:/usr/bin:/bin",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/nonexistent",
    }
    identity = [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--bounding-set=-all",
        "--no-new-privs",
    ]
    version = subprocess.run(
        [*prefix, *identity, "preloader", "--version"],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=60,
        check=False,
    )
    assert version.returncode == 0, version.stderr
    warm = subprocess.run(
        [*prefix, *identity, "preloader", "warm", "--json", str(model)],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=60,
        check=False,
    )
    assert warm.returncode == 0, warm.stderr
    report = json.loads(warm.stdout)
    assert report["files"] == 1
    assert report["bytes"] == report["resident_bytes"] == 1 << 20


def test_the_image_has_the_node_label_client(image_venv: Path) -> None:
    # The k8s extra is installed: --node-label gets past the import and stops at the
    # missing in-cluster config of this machine (not at "pip install 'preloader[k8s]'").
    result = subprocess.run(
        [str(image_venv / "bin" / "preloader"), "serve", "--node-label"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "NODE_NAME": "gpu-node-1", "HOME": "/nonexistent"},
        cwd="/",
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "no in-cluster config" in result.stderr
