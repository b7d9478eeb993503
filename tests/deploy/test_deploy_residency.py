"""The residency-truth choice of each deployment, exercised with the real preloader.

cachestat(2) (and mincore(2)) tell the truth only to the files' owner or a holder of
CAP_FOWNER; anyone else gets EPERM or "every page resident". The manifests choose:

- sidecar, node warm-up DaemonSet, stage-one status: uid 0, capabilities ALL dropped but
  FOWNER, read-only root and model mounts -> true whoever owns the files;
- postStart: the server container's identity (root with the runtime's default
  capabilities, FOWNER among them) -> true;
- the documented alternative for the "restricted" Pod Security Standard: a non-root uid
  that owns the files (FUSE uid/gid mount options) -> true; not owning them -> unknown
  (null), never a guess. Adding FOWNER to a non-root uid gives nothing.

Each case takes the securityContext from the rendered manifests, runs the zipapp under
that identity (setpriv) with `/` read-only (a private mount namespace), evicts the model,
and compares what the preloader says with fincore(1).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ..lib import manifests as dm
from ..lib.residency import fincore_resident_bytes

MiB = 1024 * 1024
OTHER_UID = 4321  # an owner that is neither root nor the preloader (NFS, other tooling)

pytestmark = pytest.mark.nonroot


def _requirements() -> tuple[tuple[str, ...], str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch identities")
    for tool in ("setpriv", "fincore"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) not installed")
    prefix = dm.readonly_root_prefix()
    if prefix is None:
        pytest.skip("cannot mount / read-only in a private mount namespace here")
    python = dm.system_python()
    if python is None:
        pytest.skip(dm.NO_SYSTEM_PYTHON)
    return prefix, python


def _security_context(folder: str, container_name: str) -> dict[str, Any]:
    for _, spec in dm.pod_specs(dm.render(folder)):
        for container in dm.containers(spec):
            if container["name"] == container_name:
                return dict(container["securityContext"])
    raise AssertionError(f"{folder}/{container_name} not found")


def _model(owner: int) -> Path:
    model = dm.shared_tmpdir("preloader-residency-") / "model"
    model.mkdir()
    model.chmod(0o755)
    for index in range(3):
        path = model / f"model-0000{index + 1}-of-00003.safetensors"
        path.write_bytes(os.urandom(2 * MiB))
        path.chmod(0o644)
        os.chown(path, owner, owner)
    return model


def _evict(model: Path) -> None:
    for path in model.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _preloader(
    identity: list[str], *args: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    prefix, python = _requirements()
    result = subprocess.run(
        [*prefix, *identity, python, str(dm.zipapp()), *args, "--json"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **(env or {})},
        cwd="/",
        timeout=120,
        check=False,
    )
    assert result.stdout, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _assert_truthful(identity: list[str], model: Path) -> None:
    total = sum(p.stat().st_size for p in model.iterdir())
    _evict(model)
    assert fincore_resident_bytes(*model.iterdir()) == 0
    cold = _preloader(identity, "status", str(model))
    assert cold["resident_bytes"] == 0, cold  # not "100%" from a lying syscall
    warm = _preloader(identity, "warm", str(model))
    assert warm["errors"] == 0, warm
    assert warm["resident_bytes"] == total == fincore_resident_bytes(*model.iterdir()), warm
    hot = _preloader(identity, "status", str(model))
    assert hot["resident_bytes"] == total, hot


def _assert_unknown(identity: list[str], model: Path) -> None:
    _evict(model)
    cold = _preloader(identity, "status", str(model))
    assert cold["resident_bytes"] is None, cold
    assert cold["residency_unknown_reason"], cold
    warm = _preloader(identity, "warm", str(model))
    assert warm["resident_bytes"] is None, warm
    assert fincore_resident_bytes(*model.iterdir()) == sum(
        p.stat().st_size for p in model.iterdir()
    )


AGENT_CONTAINERS = [
    ("sidecar", "preloader"),
    ("sidecar-readiness-only", "preloader"),
    ("sidecar-wait", "preloader"),
    ("node-warmup", "preloader"),
    ("stage-one-download", "preloader-status"),
]


def test_agent_containers_share_one_choice() -> None:
    contexts = [_security_context(*where) for where in AGENT_CONTAINERS]
    assert all(c == contexts[0] for c in contexts)
    assert contexts[0]["runAsUser"] == 0
    assert contexts[0]["capabilities"] == {"drop": ["ALL"], "add": ["FOWNER"]}


@pytest.mark.parametrize("owner", [0, OTHER_UID], ids=["root-owned (ossfs)", "other-owned (NFS)"])
def test_agent_choice_is_truthful_whoever_owns_the_files(owner: int) -> None:
    identity = dm.setpriv_args(_security_context("sidecar", "preloader"))
    _assert_truthful(identity, _model(owner))


def test_poststart_runs_as_the_server_and_is_truthful() -> None:
    # The server container sets no securityContext: root with the runtime's defaults.
    identity = [
        "setpriv",
        "--reuid=0",
        "--regid=0",
        "--clear-groups",
        f"--bounding-set=-all,{','.join('+' + c for c in dm.DEFAULT_CONTAINER_CAPS.split(','))}",
    ]
    _assert_truthful(identity, _model(OTHER_UID))


def test_restricted_alternative_is_truthful_when_the_mount_presents_its_uid() -> None:
    context = {
        "runAsUser": dm.IMAGE_UID,
        "runAsGroup": dm.IMAGE_UID,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    _assert_truthful(dm.setpriv_args(context), _model(dm.IMAGE_UID))


def test_restricted_alternative_says_unknown_for_files_it_does_not_own() -> None:
    context = {"runAsUser": dm.IMAGE_UID, "capabilities": {"drop": ["ALL"]}}
    _assert_unknown(dm.setpriv_args(context), _model(0))


def test_fowner_added_to_a_non_root_user_is_not_effective() -> None:
    # Why the manifests pair FOWNER with uid 0 (test_preloader_containers_are_locked_down).
    context = {"runAsUser": dm.IMAGE_UID, "capabilities": {"drop": ["ALL"], "add": ["FOWNER"]}}
    _assert_unknown(dm.setpriv_args(context), _model(0))
