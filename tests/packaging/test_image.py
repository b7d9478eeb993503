"""The container image, built from the Dockerfile and run with podman.

The Dockerfile is built on a local Debian base (debootstrap, then ``podman import``; no
registry is reached) with its pip steps fed from a wheelhouse made on this machine
(``--no-index``: a hermetic build). Then the real image runs as the manifests run it:

- ``warm`` on a model mounted read-only, as the image's uid 65532 with a read-only root
  and every capability dropped, and as uid 0 with only CAP_FOWNER; the page cache is the
  host's, so vmtouch on the host is the witness of what the container made resident;
- ``serve``: /healthz, /startz, /readyz and /metrics from the host, and ``podman stop``
  (SIGTERM) ends it with exit status 0 within the grace period;
- the zipapp copied out of the image the way the initContainers of deploy/poststart and
  deploy/sidecar-wait copy it, and run in a second container made from the bare base,
  which has python3 and no preloader, like an inference server's image.

The image's size, layers and user are printed. The Debian base is cached in
/var/cache/preloader-ci (``PRELOADER_CI_CACHE``), keyed by suite, mirror and packages,
so a rerun skips debootstrap. With ``PRELOADER_CI_ARTIFACTS=DIR`` the image is saved there
as ``preloader-image.tar`` (``podman save``). Skipped, with the reason, only where podman cannot run
containers (not root, no podman, runc or debootstrap, or ``podman info`` fails).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..lib import manifests as dm
from ..lib.residency import vmtouch_resident

pytestmark = pytest.mark.timeout(900)

SUITE = "bookworm"


def _debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 sources), else deb.debian.org."""
    for sources in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in sources.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1)
                for line in stanza.splitlines()
                if re.match(r"^[A-Za-z-]+:", line)
            )
            if SUITE in fields.get("Suites", "").split() and "URIs" in fields:
                return fields["URIs"].split()[0]
    return "http://deb.debian.org/debian"


MIRROR = os.environ.get("PRELOADER_CI_DEBIAN_MIRROR") or _debian_mirror()
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3")
CACHE = Path(os.environ.get("PRELOADER_CI_CACHE", "/var/cache/preloader-ci"))
IMAGE = "localhost/preloader:ci"
MiB = 1 << 20
#: podman stop's grace period: SIGTERM, then SIGKILL (exit status 137) after this long.
GRACE_S = 20
# crun refuses hybrid cgroup hosts; podman's default ulimits exceed a host's hard limits.
CONTAINERS_CONF = """\
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def _cannot_run_podman() -> str | None:
    if os.geteuid() != 0:
        return "needs root (rootful podman; the model's owner is changed too)"
    for tool in ("podman", "runc", "debootstrap", "vmtouch"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (scripts/test.sh installs it with apt)"
    return None


@pytest.fixture(scope="module")
def podman_env() -> Iterator[dict[str, str]]:
    """The environment podman runs in: this module's containers.conf, or a skip."""
    reason = _cannot_run_podman()
    if reason is not None:
        pytest.skip(reason)
    conf = dm.shared_tmpdir("preloader-podman-") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    info = subprocess.run(
        ["podman", "info"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip().splitlines()[-1:]}")
    yield env


def _podman(
    env: dict[str, str], *args: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    if args[0] in {"run", "build"} and "--network" not in args:
        # Nothing here needs a network (the build installs from the wheelhouse): none at
        # all keeps the build hermetic and needs no container network plugins.
        args = (args[0], "--network", "none", *args[1:])
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(f"podman {' '.join(args[:3])} ... exited {result.returncode}: {result.stderr}")
    return result


def _report(request: pytest.FixtureRequest, line: str) -> None:
    """Print ``line`` on the terminal, past pytest's output capture."""
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[image] {line}")


@pytest.fixture(scope="module")
def base_image(podman_env: dict[str, str], request: pytest.FixtureRequest) -> str:
    """A Debian base made with debootstrap, imported once per cache key."""
    key = hashlib.sha256(
        "\n".join(["minbase", SUITE, MIRROR, *sorted(BASE_PACKAGES)]).encode()
    ).hexdigest()[:16]
    name = f"localhost/preloader-ci-base:{SUITE}-{key}"
    if _podman(podman_env, "image", "exists", name, check=False).returncode == 0:
        return name
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"debian-{SUITE}-{key}.tar"
    if not tarball.exists():
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=CACHE) as work:
            rootfs = Path(work) / "rootfs"
            made = subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    SUITE,
                    str(rootfs),
                    MIRROR,
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            if made.returncode != 0:
                pytest.fail(f"debootstrap {SUITE} from {MIRROR}: {made.stdout[-2000:]}")
            partial = Path(work) / "rootfs.tar"
            subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
            partial.rename(tarball)
        _report(request, f"debootstrap {SUITE}: {time.monotonic() - started:.0f} s")
    _podman(podman_env, "import", "--quiet", str(tarball), name)
    return name


PRINT_VERSION = "import sys; print('%d.%d' % sys.version_info[:2])"


def _base_python(env: dict[str, str], base: str) -> str:
    out = _podman(
        env,
        "run",
        "--rm",
        base,
        "python3",
        "-c",
        "import sys; print('%d.%d' % sys.version_info[:2])",
    )
    return out.stdout.strip()


def _zipapp_pins() -> list[str]:
    """name==version of every distribution the host's zipapp build vendored."""
    pins = []
    with zipfile.ZipFile(dm.zipapp()) as archive:
        for entry in archive.namelist():
            match = re.fullmatch(r"([^/]+)-([^/-]+)\.dist-info/METADATA", entry)
            if match and match.group(1) != "preloader":
                pins.append(f"{match.group(1)}=={match.group(2)}")
    assert pins
    return sorted(pins)


def _pip_download(dest: Path, *args: str) -> None:
    # This machine's own pip configuration (indexes, find-links) applies; the image's
    # build gets only what lands in dest.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--dest",
            str(dest),
            *args,
        ],
        check=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def wheelhouse(podman_env: dict[str, str], base_image: str) -> Path:
    """Every wheel the Dockerfile's two pip steps need, for the base's python3."""
    dest = dm.shared_tmpdir("preloader-wheelhouse-")
    python = _base_python(podman_env, base_image)
    binary = [
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        *("--platform", "manylinux_2_28_x86_64"),
        *("--platform", "manylinux_2_17_x86_64"),
        *("--platform", "manylinux2014_x86_64"),
        *("--platform", "manylinux2010_x86_64"),
    ]
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((dm.REPO / "pyproject.toml").read_text())
    wanted = [
        *project["project"]["dependencies"],
        *project["project"]["optional-dependencies"]["k8s"],
        *project["build-system"]["requires"],
    ]
    _pip_download(dest, *binary, *wanted)
    # The zipapp's pure-Python wheels, as resolved for its oldest target interpreter.
    _pip_download(
        dest,
        "--no-deps",
        "--only-binary=:all:",
        *("--platform", "any", "--implementation", "py", "--abi", "none"),
        *("--python-version", "3.10"),
        *_zipapp_pins(),
    )
    return dest


@pytest.fixture(scope="module")
def image(
    podman_env: dict[str, str],
    base_image: str,
    wheelhouse: Path,
    request: pytest.FixtureRequest,
) -> str:
    # The last run's image would stay behind untagged.
    _podman(podman_env, "rmi", "--force", IMAGE, check=False)
    started = time.monotonic()
    _podman(
        podman_env,
        "build",
        "--quiet",
        "--pull=never",
        # No cached stages: the Dockerfile is built for real every run, and no untagged
        # build-stage image is left behind.
        "--layers=false",
        *("--build-arg", f"BASE_IMAGE={base_image}"),
        *("--build-arg", "WHEELHOUSE=/wheels"),
        *("--build-arg", "REVISION=ci"),
        *("-v", f"{wheelhouse}:/wheels:ro"),
        *("--tag", IMAGE),
        str(dm.REPO),
        timeout=900,
    )
    _report(request, f"podman build: {time.monotonic() - started:.0f} s")
    artifacts = os.environ.get("PRELOADER_CI_ARTIFACTS")
    if artifacts:
        # The image as a CI artefact (podman load -i), never committed.
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        _podman(
            podman_env, "save", "--quiet", "--output", f"{artifacts}/preloader-image.tar", IMAGE
        )
    return IMAGE


def _inspect(env: dict[str, str], name: str) -> dict[str, object]:
    out = _podman(env, "image", "inspect", name).stdout
    (entry,) = json.loads(out)
    assert isinstance(entry, dict)
    return entry


def test_image_runs_as_65532_and_adds_one_layer_without_build_tools(
    podman_env: dict[str, str], image: str, base_image: str, request: pytest.FixtureRequest
) -> None:
    info = _inspect(podman_env, image)
    base = _inspect(podman_env, base_image)
    config = info["Config"]
    assert isinstance(config, dict)
    layers = info["RootFS"]["Layers"]  # type: ignore[index]
    base_layers = base["RootFS"]["Layers"]  # type: ignore[index]
    _report(
        request,
        f"size {int(info['Size']) / MiB:.0f} MiB (base {int(base['Size']) / MiB:.0f} MiB), "  # type: ignore[call-overload]
        f"{len(layers)} layers, user {config['User']}, entrypoint {config['Entrypoint']} "
        f"{config.get('Cmd')}",
    )
    assert config["User"] == f"{dm.IMAGE_UID}:{dm.IMAGE_UID}"
    assert config["Entrypoint"] == ["preloader"]
    assert config.get("Cmd") == ["serve"]
    # The final stage is the base plus one COPY of /opt/preloader: nothing of the build
    # stage (its source tree, pip caches, the wheelhouse) reaches the image.
    assert layers[: len(base_layers)] == base_layers
    assert len(layers) == len(base_layers) + 1
    probe = _podman(
        podman_env,
        "run",
        "--rm",
        "--read-only",
        "--entrypoint",
        "sh",
        image,
        "-c",
        "for t in gcc cc c++ make ld as; do command -v $t; done;"
        " ls -A /opt/preloader; ls -d /src /wheels /root/.cache /tmp/pip-* 2>/dev/null;"
        " find /opt/preloader -name '*.whl'; true",
    )
    assert probe.stdout.split() == ["preloader.pyz", "venv"], probe.stdout
    # The license travels with the installed package (the wheel's dist-info).
    licensed = _podman(
        podman_env,
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        image,
        "-c",
        "cat /opt/preloader/venv/lib/python3*/site-packages/preloader-*.dist-info/licenses/LICENSE",
    )
    assert licensed.stdout == (dm.REPO / "LICENSE").read_text()


def _model(owner: int) -> Path:
    model = dm.shared_tmpdir("preloader-image-model-")
    for name, size in (
        ("model-00001-of-00002.safetensors", 3 * MiB),
        ("model-00002-of-00002.safetensors", 2 * MiB),
    ):
        path = model / name
        path.write_bytes(os.urandom(size))
        path.chmod(0o644)
        os.chown(path, owner, owner)
    (model / "config.json").write_text("{}")
    os.chown(model / "config.json", owner, owner)
    os.chown(model, owner, owner)
    return model


def _evict(model: Path) -> int:
    for path in model.iterdir():
        # Written back first: vmtouch cannot evict dirty pages.
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    subprocess.run(["vmtouch", "-q", "-e", str(model)], check=True)
    resident, total = vmtouch_resident(model)
    assert resident == 0, f"vmtouch could not evict {model}"
    return total


def _warm(env: dict[str, str], image: str, model: Path, *identity: str) -> dict[str, object]:
    result = _podman(
        env,
        "run",
        "--rm",
        "--read-only",
        "--cap-drop",
        "ALL",
        *identity,
        *("-v", f"{model}:/models:ro"),
        image,
        "warm",
        "--json",
        "/models",
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    return report


def _mostly_resident(model: Path) -> None:
    """vmtouch, on the host, finds the pages the container read in the host's page cache.

    Under memory pressure the kernel may reclaim the oldest of them at once (seen: 1206 of
    1281 pages on a loaded machine), so this asks for nine in ten, not all; an image whose
    reads do not reach the host's cache leaves none (the files were evicted before).
    """
    resident, total = vmtouch_resident(model)
    assert resident * 10 >= total * 9, f"vmtouch: {resident} of {total} pages resident"


def _model_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.iterdir())


def test_warm_as_the_image_user_read_only_root_no_capabilities(
    podman_env: dict[str, str], image: str
) -> None:
    # Files the image's user owns: residency is provable without any capability.
    model = _model(dm.IMAGE_UID)
    _evict(model)
    report = _warm(podman_env, image, model)
    assert report["bytes"] == _model_bytes(model)
    assert report["resident_bytes"] == report["bytes"], report
    _mostly_resident(model)


def test_warm_as_the_image_user_on_files_it_does_not_own_never_overstates(
    podman_env: dict[str, str], image: str
) -> None:
    # The kernel hides page-cache residency of files a process neither owns nor may
    # write: the report must be true or say null with a reason, never a guess.
    model = _model(0)
    _evict(model)
    report = _warm(podman_env, image, model)
    _mostly_resident(model)
    assert report["read_bytes"] == report["bytes"] == _model_bytes(model), report
    # uid 65532 neither owns nor may write these files: null, with the reason.
    assert report["resident_bytes"] is None, report
    assert "CAP_FOWNER" in str(report["residency_unknown_reason"]), report


def test_warm_as_root_with_only_fowner_on_files_of_another_owner(
    podman_env: dict[str, str], image: str
) -> None:
    model = _model(4242)
    _evict(model)
    report = _warm(podman_env, image, model, "--user", "0:0", "--cap-add", "FOWNER")
    assert report["resident_bytes"] == report["bytes"] == _model_bytes(model), report
    _mostly_resident(model)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _until(url: str, status: int, deadline_s: float) -> tuple[int, str]:
    """Poll ``url`` until it answers ``status`` (a condition, with a deadline)."""
    deadline = time.monotonic() + deadline_s
    last: tuple[int, str] = (0, "no answer")
    while time.monotonic() < deadline:
        try:
            last = _get(url)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            last = (0, str(error))
        if last[0] == status:
            return last
        time.sleep(0.2)
    pytest.fail(f"{url} did not answer {status} in {deadline_s} s: {last}")


def test_serve_answers_probes_from_the_host_and_stops_on_sigterm(
    podman_env: dict[str, str], image: str
) -> None:
    model = _model(dm.IMAGE_UID)
    _evict(model)
    port = _free_port()
    name = f"preloader-ci-serve-{os.getpid()}"
    _podman(
        podman_env,
        "run",
        "--detach",
        "--name",
        name,
        "--read-only",
        "--cap-drop",
        "ALL",
        "--network",
        "host",
        *("-e", f"PRELOADER_PORT={port}", "-e", "PRELOADER_HOST=127.0.0.1"),
        *("-e", "MODEL_DIR=/models", "-v", f"{model}:/models:ro"),
        image,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _until(f"{base}/healthz", 200, 60)
        _until(f"{base}/startz", 200, 60)
        _until(f"{base}/readyz", 200, 60)
        _mostly_resident(model)
        status, metrics = _get(f"{base}/metrics")
        assert status == 200
        assert re.search(r"^preloader_ready 1\.0$", metrics, re.M), metrics
        # The container's own figure, measured truthfully (it owns the files).
        resident = re.search(r'^preloader_resident_bytes\{path="/models"\} (\S+)$', metrics, re.M)
        assert resident is not None, metrics
        assert float(resident.group(1)) == _model_bytes(model)
        started = time.monotonic()
        _podman(podman_env, "stop", "--time", str(GRACE_S), name, timeout=GRACE_S + 60)
        stopped_s = time.monotonic() - started
        state = _podman(podman_env, "inspect", "--format", "{{.State.ExitCode}}", name)
        logs = _podman(podman_env, "logs", name).stderr
        assert state.stdout.strip() == "0", logs[-2000:]
        assert stopped_s < GRACE_S, f"took {stopped_s:.1f} s: SIGKILL, not SIGTERM, ended it"
    finally:
        _podman(podman_env, "rm", "--force", name, check=False)


def test_zipapp_copied_out_of_the_image_runs_in_a_bare_server_base(
    podman_env: dict[str, str], image: str, base_image: str
) -> None:
    shared = dm.shared_tmpdir("preloader-image-shared-")
    # As the initContainers do: the image's own cp into a shared volume.
    _podman(
        podman_env,
        "run",
        "--rm",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--user",
        "0:0",
        "--entrypoint",
        "cp",
        "-v",
        f"{shared}:/opt/preloader-bin",
        image,
        "/opt/preloader/preloader.pyz",
        "/opt/preloader-bin/preloader.pyz",
    )
    assert (shared / "preloader.pyz").stat().st_size > 0
    bare = _podman(
        podman_env, "run", "--rm", base_image, "python3", "-c", "import preloader", check=False
    )
    assert bare.returncode != 0, "the server-like base must not have preloader installed"
    model = _model(4242)
    _evict(model)
    result = _podman(
        podman_env,
        "run",
        "--rm",
        "--read-only",
        *("--cap-drop", "ALL", "--cap-add", "FOWNER", "--user", "0:0"),
        *("-v", f"{shared}:/opt/preloader-bin:ro", "-v", f"{model}:/models:ro"),
        base_image,
        "python3",
        "/opt/preloader-bin/preloader.pyz",
        "warm",
        "--json",
        "/models",
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["resident_bytes"] == report["bytes"] == _model_bytes(model), report
    _mostly_resident(model)
