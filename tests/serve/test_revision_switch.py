"""A revision switched under a served path is planned and warmed again, no restart.

A real Hugging Face cache layout (``blobs/``, ``snapshots/<rev>/`` of links into it,
``refs/main``), served through a link to the current snapshot as a deployment would
point ``MODEL_DIR`` at it. The link is switched atomically (a new link renamed over it)
and ``refs/main`` rewritten, while a real ``preloader serve`` keeps the path warm with a
short ``--recheck-seconds``: the new revision's files become resident (fincore, the
outside witness), ``/status`` describes the new plan, the gate stays open (latched) and
nothing is counted failed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..lib.residency import evict_tree, fincore_resident_bytes
from ..lib.serve import Served, ready_body, track

MiB = 1024 * 1024


def _revision(repo: Path, name: str, shards: int) -> list[Path]:
    """``snapshots/<name>/`` with a config and ``shards`` 1 MiB shards, each a link to a
    blob named by its content's hash, as huggingface_hub writes them; the blobs."""
    snapshot = repo / "snapshots" / name
    snapshot.mkdir(parents=True)
    blobs = []
    files = {"config.json": f'{{"revision": "{name}"}}'.encode()}
    for shard in range(shards):
        files[f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"] = os.urandom(MiB)
    for filename, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        _write(blob, content)
        (snapshot / filename).symlink_to(os.path.relpath(blob, snapshot))
        blobs.append(blob)
    return blobs


def _write(path: Path, content: bytes) -> None:
    """Write and flush: dirty pages cannot be evicted, clean ones can."""
    with open(path, "wb") as handle:
        handle.write(content)
        os.fsync(handle.fileno())


def _in_pages(paths: list[Path]) -> int:
    """What fincore reports for fully resident files: whole pages."""
    page = os.sysconf("SC_PAGE_SIZE")
    return sum(-(-p.stat().st_size // page) * page for p in paths)


def _switch(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically: a new link renamed over the old one."""
    fresh = link.with_name(link.name + ".new")
    fresh.symlink_to(target)
    fresh.rename(link)


def test_a_switched_revision_is_replanned_and_warmed(
    shared_tmp: Path, served: list[Served]
) -> None:
    repo = shared_tmp / "hub" / "models--org--tiny"
    old = _revision(repo, "1111111", shards=2)
    new = _revision(repo, "2222222", shards=3)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1111111")
    model = shared_tmp / "model"
    model.symlink_to(repo / "snapshots" / "1111111")
    evict_tree(repo / "blobs")

    server = track(served, str(model), "--recheck-seconds", "0.2")
    server.poll(lambda: ready_body(server))
    assert fincore_resident_bytes(*old) == _in_pages(old)
    assert fincore_resident_bytes(*new) < MiB  # the new shards are cold

    (repo / "refs" / "main").write_text("2222222")
    _switch(model, repo / "snapshots" / "2222222")

    new_bytes = sum(p.stat().st_size for p in new)

    def replanned() -> dict[str, Any] | None:
        [path] = server.json("/status")[1]["paths"]
        done = path["bytes"] == new_bytes and path["state"] == "ready"
        return path if done and path["resident_bytes"] == new_bytes else None

    path = server.poll(replanned)
    assert path["files"] == 4 and path["files_by_state"]["resident"] == 4
    assert path["errors"] == 0 and not any(path["errors_by_reason"].values())
    assert fincore_resident_bytes(*new) == _in_pages(new)
    status, body = server.json("/readyz")
    assert status == 200 and body["ready"] is True
    line = server.wait_for_log(lambda line: line.get("event") == "replanned")
    assert "2222222" in line["detail"] and "1111111" in line["detail"]
    assert not [line for line in server.logs if line.get("event") == "failed"]
    code, _ = server.stop()
    assert code == 0


def test_files_replaced_in_place_are_replanned(shared_tmp: Path, served: list[Served]) -> None:
    model = shared_tmp / "model"
    model.mkdir()
    shards = [model / f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for shard in shards:
        _write(shard, os.urandom(MiB))
    server = track(served, str(model), "--recheck-seconds", "0.2")
    server.poll(lambda: ready_body(server))

    for shard in shards:  # a new revision written beside and renamed over, as sync tools do
        staged = shard.with_name(shard.name + ".tmp")
        _write(staged, os.urandom(2 * MiB))
        os.utime(staged, ns=(1, 1))  # a modification time unlike the planned one
        staged.rename(shard)
    evict_tree(model)

    def replanned() -> dict[str, Any] | None:
        [path] = server.json("/status")[1]["paths"]
        done = path["bytes"] == 4 * MiB and path["state"] == "ready"
        return path if done and path["resident_bytes"] == 4 * MiB else None

    server.poll(replanned)
    assert fincore_resident_bytes(*shards) == 4 * MiB
    assert server.json("/readyz")[0] == 200
    assert server.wait_for_log(lambda line: line.get("event") == "replanned")


def test_an_incomplete_revision_fails_the_path_until_a_complete_one_comes(
    shared_tmp: Path, served: list[Served]
) -> None:
    """A switch to a revision whose index names a missing shard fails the path with that
    cause (as at start); the path is still watched, and the next switch is warmed."""
    repo = shared_tmp / "hub" / "models--org--tiny"
    _revision(repo, "1111111", shards=2)
    broken = repo / "snapshots" / "3333333"
    broken.mkdir(parents=True)
    (broken / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors"}}'
    )
    good = _revision(repo, "2222222", shards=3)
    model = shared_tmp / "model"
    model.symlink_to(repo / "snapshots" / "1111111")
    server = track(served, str(model), "--recheck-seconds", "0.2", "--no-ready-latch")
    server.poll(lambda: ready_body(server))

    _switch(model, broken)

    def failed() -> dict[str, Any] | None:
        status, body = server.json("/readyz")
        return body if status == 503 and "incomplete model" in body["reason"] else None

    server.poll(failed)
    evict_tree(repo / "blobs")
    _switch(model, repo / "snapshots" / "2222222")
    server.poll(lambda: ready_body(server))
    [path] = server.json("/status")[1]["paths"]
    assert path["bytes"] == sum(p.stat().st_size for p in good)
    assert fincore_resident_bytes(*good) == _in_pages(good)
