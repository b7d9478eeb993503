"""The five bench scenarios: their data, their mounts, and how to tear them down.

Local data is written once under the data directory and reused while its
sizes match (a small JSON note beside each tree, never inside it: every tool
reads the whole tree). Remote-like scenarios serve synthetic bytes through a
real FUSE mount, so they need no data on disk.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "SCENARIOS",
    "Prepared",
    "Scenario",
    "Sizes",
    "fuse_available",
    "fuse_mount",
    "prepare",
    "s3fs_available",
    "s3fs_mount",
]

MiB = 2**20
GiB = 2**30
_WRITE_BLOCK = 8 * MiB
_METADATA = {
    "config.json": 1_200,
    "generation_config.json": 200,
    "model.safetensors.index.json": 30_000,
    "tokenizer.json": 2 * MiB,
    "tokenizer_config.json": 4_000,
}


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is and how slow its fixtures are."""

    shards: int = 6
    shard_bytes: int = 512 * MiB
    big_bytes: int = 2 * GiB
    small_count: int = 20_000
    small_bytes: int = 64 * 1024
    s3_shards: int = 4
    s3_shard_bytes: int = 64 * MiB
    s3_large_shards: int = 4
    s3_large_shard_bytes: int = 512 * MiB
    s3_latency_ms: float = 20.0
    s3_conn_mibps: float = 32.0
    s3_link_mibps: float = 400.0
    fuse_bytes: int = 512 * MiB
    fuse_stream_mibps: float = 64.0
    fuse_link_mibps: float = 400.0
    fuse_latency_ms: float = 20.0

    @classmethod
    def smoke(cls) -> "Sizes":
        """Tiny sizes that run every scenario in seconds."""
        return cls(
            shards=3,
            shard_bytes=8 * MiB,
            big_bytes=32 * MiB,
            small_count=300,
            small_bytes=64 * 1024,
            s3_shards=2,
            s3_shard_bytes=8 * MiB,
            s3_large_shards=2,
            s3_large_shard_bytes=24 * MiB,
            s3_latency_ms=5.0,
            s3_conn_mibps=64.0,
            s3_link_mibps=0.0,
            fuse_bytes=32 * MiB,
            fuse_stream_mibps=64.0,
            fuse_link_mibps=0.0,
            fuse_latency_ms=5.0,
        )


@dataclass(frozen=True)
class Scenario:
    """One workload: what it stands for and where its bytes come from."""

    name: str
    title: str
    meaning: str
    kind: str  # "local", "s3fs" or "fuse"

    @property
    def local(self) -> bool:
        """Whether the data sits on the local disk (where fio's device limit applies)."""
        return self.kind == "local"


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "sharded",
        "Sharded model, local disk",
        "safetensors shards plus metadata files, as a Hugging Face model directory",
        "local",
    ),
    Scenario(
        "big-file",
        "One big file, local disk",
        "a single GGUF file: only reads inside the file can use concurrency",
        "local",
    ),
    Scenario(
        "small-files",
        "Many small files, local disk",
        "the one-liner starts two processes per file; per-file overhead dominates",
        "local",
    ),
    Scenario(
        "s3fs",
        "s3fs over a loopback S3 server",
        "a real FUSE object-store client (kernel_cache) over a server with first-byte "
        "latency and a per-connection bandwidth cap",
        "s3fs",
    ),
    Scenario(
        "s3fs-large",
        "s3fs over a loopback S3 server, real shard sizes",
        "the same client and server with shards of 512 MiB, several chunks each: one "
        "sequential stream per file is s3fs's fast path",
        "s3fs",
    ),
    Scenario(
        "fuse-parallel",
        "Parallel-stream FUSE, one big file",
        "a FUSE filesystem that serves concurrent reads of one file in parallel with each "
        "sequential stream capped, like ossfs 2.0 or Mountpoint for S3",
        "fuse",
    ),
)


@dataclass(frozen=True)
class Prepared:
    """A scenario ready to measure: the tree to warm and a way to read fixture counters."""

    scenario: Scenario
    target: Path
    files: int
    bytes: int
    fixture_stats: Callable[[bool], dict[str, int]] | None = None
    median_file_bytes: int = 0
    s3_url: str = ""  # the S3 server behind an s3fs scenario, for the direct-fetch limit


def s3fs_available() -> str | None:
    """Return why the s3fs scenario cannot run here, or ``None`` when it can."""
    if shutil.which("s3fs") is None:
        return "s3fs is not installed (apt-get install s3fs)"
    if not Path("/dev/fuse").exists():
        return "/dev/fuse is missing"
    return None


def fuse_available() -> str | None:
    """Return why the parallel-stream FUSE scenario cannot run here, or ``None``."""
    if not Path("/dev/fuse").exists():
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        return "no fusermount (apt-get install fuse3)"
    try:
        import mfusepy  # type: ignore[import-untyped]  # noqa: F401
    except (ImportError, OSError) as err:  # OSError: libfuse itself is missing
        return f"mfusepy unusable ({err}); pip install '.[bench]' and apt-get install fuse3"
    return None


# --- local data -----------------------------------------------------------------


def _write_file(path: Path, size: int, block: bytes) -> None:
    """Write *size* bytes, distinct per file and per block, then drop them from the cache."""
    stamp_base = path.name.encode()[:40].ljust(40, b".")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        offset = 0
        while offset < size:
            piece = min(len(block), size - offset)
            stamp = stamp_base + offset.to_bytes(8, "little")
            data = stamp + block[len(stamp) : piece] if piece > len(stamp) else block[:piece]
            os.write(fd, data)
            offset += piece
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _tree_layout(scenario: str, sizes: Sizes) -> dict[str, int]:
    if scenario == "sharded":
        layout = dict(_METADATA)
        for index in range(1, sizes.shards + 1):
            name = f"model-{index:05d}-of-{sizes.shards:05d}.safetensors"
            layout[name] = sizes.shard_bytes
        return layout
    if scenario == "big-file":
        return {"model-Q8_0.gguf": sizes.big_bytes}
    if scenario == "small-files":
        per_dir = 1000
        return {
            f"part-{index // per_dir:03d}/blob-{index:06d}.bin": sizes.small_bytes
            for index in range(sizes.small_count)
        }
    raise ValueError(f"no local layout for {scenario}")


def _local_tree(
    data_dir: Path, scenario: Scenario, sizes: Sizes, log: Callable[[str], None]
) -> Prepared:
    layout = _tree_layout(scenario.name, sizes)
    root = data_dir / scenario.name
    note = data_dir / f"{scenario.name}.layout.json"
    wanted = json.dumps(layout, sort_keys=True)
    if not (root.is_dir() and note.exists() and note.read_text() == wanted):
        total_gib = sum(layout.values()) / GiB
        log(f"writing {scenario.name} data: {len(layout)} files, {total_gib:.2f} GiB")
        shutil.rmtree(root, ignore_errors=True)
        note.unlink(missing_ok=True)
        block = os.urandom(_WRITE_BLOCK)
        for relative, size in layout.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_file(path, size, block)
        note.write_text(wanted)
    sizes_sorted = sorted(layout.values())
    return Prepared(
        scenario,
        root,
        len(layout),
        sum(layout.values()),
        median_file_bytes=sizes_sorted[len(sizes_sorted) // 2],
    )


# --- FUSE fixtures ---------------------------------------------------------------


def _unmount(mountpoint: Path) -> None:
    """Unmount *mountpoint* if anything is mounted there, lazily as a last resort."""
    for argv in (
        ["fusermount3", "-u", str(mountpoint)],
        ["fusermount", "-u", str(mountpoint)],
        ["umount", str(mountpoint)],
        ["umount", "-l", str(mountpoint)],
    ):
        if not _is_mounted(mountpoint):
            return
        if shutil.which(argv[0]):
            subprocess.run(argv, capture_output=True, check=False)
    if _is_mounted(mountpoint):
        raise RuntimeError(f"could not unmount {mountpoint}")


def _is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint.resolve()) if mountpoint.exists() else str(mountpoint)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts if len(line.split()) > 1)


def _start_fixture(
    argv: list[str], name: str, timeout_s: float = 15.0
) -> tuple[subprocess.Popen[str], int]:
    """Start a fixture process and wait for its ``READY <port>`` line."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY") or line.startswith("FAILED") or proc.poll() is not None:
            break
    if not line.startswith("READY"):
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise RuntimeError(f"{name} fixture did not start: {line.strip()} {err.strip()}")
    return proc, int(line.split()[1])


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _http_stats(url: str) -> Callable[[bool], dict[str, int]]:
    def stats(reset: bool) -> dict[str, int]:
        with urllib.request.urlopen(url + ("?reset=1" if reset else ""), timeout=10) as reply:
            values: dict[str, int] = json.load(reply)
        return values

    return stats


def _wait_listing(path: Path, expected: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    found = 0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            found = sum(len(files) for _, _, files in os.walk(path))
            if found >= expected:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{path} lists {found} files, expected {expected}")


@contextlib.contextmanager
def s3fs_mount(
    data_dir: Path,
    objects: dict[str, int],
    latency_ms: float,
    conn_mibps: float,
    link_mibps: float,
    backing: Path | None = None,
    name: str = "s3",
    on_server: Callable[[str], None] | None = None,
) -> Iterator[tuple[Path, Callable[[bool], dict[str, int]]]]:
    """Serve *objects* from the loopback S3 server and mount them with s3fs.

    s3fs runs with ``kernel_cache`` (warmed pages survive the loader's open) and
    without ``use_cache`` (no local disk cache: every cold read goes to the server).

    :param data_dir: where the manifest, the password file and the mount point live.
    :param objects: key (``model/...``) to size, in bucket ``models``.
    :param latency_ms: the server's first-byte latency per request.
    :param conn_mibps: per-connection cap (0: none).
    :param link_mibps: whole-server cap (0: none).
    :param backing: serve ``backing/KEY`` instead of synthetic bytes.
    :param name: distinguishes the manifest and mount point of concurrent users.
    :param on_server: called with the server's URL (``http://127.0.0.1:PORT``) once it
        listens.
    :return: a context manager yielding the mount point and the server's counters.
    """
    manifest = data_dir / f"{name}-objects.json"
    manifest.write_text(json.dumps({"bucket": "models", "objects": objects}))
    passwd = data_dir / "s3-passwd"
    passwd.write_text("bench-access-key:bench-secret-key\n")
    passwd.chmod(0o600)
    mountpoint = data_dir / f"mnt-{name}"
    mountpoint.mkdir(exist_ok=True)
    _unmount(mountpoint)
    argv = [sys.executable, "-m", "bench.s3server", "--manifest", str(manifest)]
    argv += ["--latency-ms", str(latency_ms), "--conn-mibps", str(conn_mibps)]
    argv += ["--link-mibps", str(link_mibps)]
    argv += ["--backing", str(backing)] if backing else []
    server, port = _start_fixture(argv, "S3")
    if on_server is not None:
        on_server(f"http://127.0.0.1:{port}")
    try:
        options = [
            f"url=http://127.0.0.1:{port}",
            "use_path_request_style",
            f"passwd_file={passwd}",
            "endpoint=us-east-1",
            "kernel_cache",
            "ro",
            "stat_cache_expire=3600",
        ]
        mounted = subprocess.run(
            ["s3fs", "models", str(mountpoint), "-o", ",".join(options)],
            capture_output=True,
            text=True,
            check=False,
        )
        if mounted.returncode != 0:
            raise RuntimeError(f"s3fs mount failed: {mounted.stderr.strip()}")
        try:
            top = {key.split("/", 1)[0] for key in objects}
            for prefix in top:
                _wait_listing(
                    mountpoint / prefix, sum(1 for k in objects if k.startswith(prefix + "/"))
                )
            yield mountpoint, _http_stats(f"http://127.0.0.1:{port}/_bench/stats")
        finally:
            _unmount(mountpoint)
    finally:
        _stop(server)


@contextlib.contextmanager
def _s3fs_mount(data_dir: Path, scenario: Scenario, sizes: Sizes) -> Iterator[Prepared]:
    large = scenario.name == "s3fs-large"
    shards = sizes.s3_large_shards if large else sizes.s3_shards
    shard_bytes = sizes.s3_large_shard_bytes if large else sizes.s3_shard_bytes
    objects = {f"model/{name}": size for name, size in _METADATA.items()}
    for index in range(1, shards + 1):
        name = f"model/model-{index:05d}-of-{shards:05d}.safetensors"
        objects[name] = shard_bytes
    urls: list[str] = []
    with s3fs_mount(
        data_dir,
        objects,
        sizes.s3_latency_ms,
        sizes.s3_conn_mibps,
        sizes.s3_link_mibps,
        name=scenario.name,
        on_server=urls.append,
    ) as (mountpoint, stats):
        yield Prepared(
            scenario,
            mountpoint / "model",
            len(objects),
            sum(objects.values()),
            stats,
            s3_url=urls[0],
        )


@contextlib.contextmanager
def fuse_mount(
    data_dir: Path,
    files: dict[str, int],
    stream_mibps: float,
    link_mibps: float,
    latency_ms: float,
    backing: Path | None = None,
    name: str = "fuse",
) -> Iterator[tuple[Path, Callable[[bool], dict[str, int]]]]:
    """Mount the parallel-stream FUSE fixture (:mod:`bench.fusefs`) serving *files*.

    :param data_dir: where the manifest and the mount point live.
    :param files: path inside the mount to size.
    :param stream_mibps: per-stream cap (0: none).
    :param link_mibps: all-streams cap (0: none).
    :param latency_ms: first byte of each new stream.
    :param backing: serve ``backing/PATH`` instead of synthetic bytes.
    :param name: distinguishes the manifest and mount point of concurrent users.
    :return: a context manager yielding the mount point and the fixture's counters.
    """
    manifest = data_dir / f"{name}-files.json"
    manifest.write_text(json.dumps({"files": files}))
    mountpoint = data_dir / f"mnt-{name}"
    mountpoint.mkdir(exist_ok=True)
    _unmount(mountpoint)
    argv = [sys.executable, "-m", "bench.fusefs", str(mountpoint), "--manifest", str(manifest)]
    argv += ["--stream-mibps", str(stream_mibps), "--link-mibps", str(link_mibps)]
    argv += ["--latency-ms", str(latency_ms)]
    argv += ["--backing", str(backing)] if backing else []
    server, port = _start_fixture(argv, "FUSE")
    try:
        _wait_listing(mountpoint, len(files))
        yield mountpoint, _http_stats(f"http://127.0.0.1:{port}/stats")
    finally:
        _unmount(mountpoint)
        _stop(server)


@contextlib.contextmanager
def _fuse_mount(data_dir: Path, scenario: Scenario, sizes: Sizes) -> Iterator[Prepared]:
    files = {"model-Q8_0.gguf": sizes.fuse_bytes}
    with fuse_mount(
        data_dir, files, sizes.fuse_stream_mibps, sizes.fuse_link_mibps, sizes.fuse_latency_ms
    ) as (mountpoint, stats):
        yield Prepared(scenario, mountpoint, len(files), sum(files.values()), stats)


@contextlib.contextmanager
def prepare(
    scenario: Scenario, data_dir: Path, sizes: Sizes, log: Callable[[str], None]
) -> Iterator[Prepared]:
    """Make *scenario* ready under *data_dir* and clean up its mounts afterwards.

    :param scenario: which workload.
    :param data_dir: where data, manifests and mount points live.
    :param sizes: how big and how slow.
    :param log: where to say what takes long (writing data).
    :return: a context manager yielding the prepared scenario.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    if scenario.kind == "local":
        yield _local_tree(data_dir, scenario, sizes, log)
    elif scenario.kind == "s3fs":
        with _s3fs_mount(data_dir, scenario, sizes) as prepared:
            yield prepared
    else:
        with _fuse_mount(data_dir, scenario, sizes) as prepared:
            yield prepared


def sizes_as_dict(sizes: Sizes) -> dict[str, float]:
    """Return the sizes as plain JSON values, for the raw results."""
    return {key: float(value) for key, value in asdict(sizes).items()}
