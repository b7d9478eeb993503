"""The planner: what is read, in which order, and what is never opened."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from preloader.planning.formats import natural_key as _natural_key
from preloader.planning.planner import build_plan
from preloader.planning.specs import FileSpec, chunk_count, iter_chunks
from preloader.units import PAGE_SIZE, printable

from ..lib.marks import needs_root


def _names(plan_files: tuple[FileSpec, ...], root: Path) -> list[str]:
    return [os.path.relpath(f.path, root) for f in plan_files]


def _touch(path: Path, size: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def test_metadata_first_then_shards_in_numeric_order(tmp_path: Path) -> None:
    for name in [
        "model-00010-of-00011.safetensors",
        "model-00002-of-00011.safetensors",
        "shard_10.bin",
        "shard_9.bin",
        "tokenizer.json",
        "config.json",
    ]:
        _touch(tmp_path / name, 1000)
    shards = ["model-00002-of-00011.safetensors", "model-00010-of-00011.safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {f"t{i}": name for i, name in enumerate(shards)}})
    )
    # all_formats: the .bin files beside the safetensors stay in the plan
    plan = build_plan([str(tmp_path)], all_formats=True)
    assert _names(plan.files, tmp_path) == [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "model-00002-of-00011.safetensors",
        "model-00010-of-00011.safetensors",
        "shard_9.bin",
        "shard_10.bin",
    ]
    assert [f.metadata for f in plan.files] == [True] * 3 + [False] * 4


def test_nested_folders_are_walked_and_sorted_by_relative_path(tmp_path: Path) -> None:
    _touch(tmp_path / "b" / "w.bin")
    _touch(tmp_path / "a" / "w.bin")
    _touch(tmp_path / "w.bin")
    assert _names(build_plan([str(tmp_path)]).files, tmp_path) == ["a/w.bin", "b/w.bin", "w.bin"]


def test_include_and_exclude_globs(tmp_path: Path) -> None:
    _touch(tmp_path / "config.json")
    _touch(tmp_path / "model.safetensors")
    _touch(tmp_path / "pytorch_model.bin")
    _touch(tmp_path / "original" / "consolidated.pth")
    _touch(tmp_path / "sub" / "x.safetensors")
    plan = build_plan([str(tmp_path)], include=["*.safetensors", "*.json"], exclude=["sub/*"])
    assert _names(plan.files, tmp_path) == ["config.json", "model.safetensors"]
    reasons = {os.path.relpath(s.path, tmp_path): s.reason for s in plan.skipped}
    assert reasons["pytorch_model.bin"] == "not matched by --include"
    assert reasons["sub/x.safetensors"] == "matched by --exclude"


def test_an_excluded_directory_is_not_entered(tmp_path: Path) -> None:
    _touch(tmp_path / ".git" / "objects" / "pack")
    _touch(tmp_path / "w.bin")
    plan = build_plan([str(tmp_path)], exclude=[".git"])
    assert _names(plan.files, tmp_path) == ["w.bin"]
    assert [os.path.relpath(s.path, tmp_path) for s in plan.skipped] == [".git"]


def test_special_files_are_skipped_with_a_reason_and_never_opened(tmp_path: Path) -> None:
    _touch(tmp_path / "w.bin")
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "fifo", tmp_path / "link-to-fifo")
    os.symlink("/dev/zero", tmp_path / "zero")
    os.symlink(tmp_path / "missing", tmp_path / "broken")
    os.symlink(tmp_path / "loop-b", tmp_path / "loop-a")
    os.symlink(tmp_path / "loop-a", tmp_path / "loop-b")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        plan = build_plan([str(tmp_path)])
    finally:
        sock.close()
    assert _names(plan.files, tmp_path) == ["w.bin"]
    reasons = {os.path.relpath(s.path, tmp_path): s.reason for s in plan.skipped}
    assert reasons == {
        "fifo": "FIFO",
        "link-to-fifo": "FIFO behind a symlink",
        "zero": "device node behind a symlink",
        "broken": "broken symlink",
        "loop-a": "symlink loop",
        "loop-b": "symlink loop",
        "sock": "socket",
    }


@needs_root
def test_a_device_node_in_the_tree_is_skipped(tmp_path: Path) -> None:
    os.mknod(tmp_path / "null", 0o600 | 0o020000, os.makedev(1, 3))
    plan = build_plan([str(tmp_path)])
    assert plan.files == ()
    assert [s.reason for s in plan.skipped] == ["device node"]


def test_links_to_the_same_file_are_planned_once(tmp_path: Path) -> None:
    blob = _touch(tmp_path / "blobs" / "abc123", 100)
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    os.symlink("../../blobs/abc123", snap / "model.safetensors")
    os.link(blob, tmp_path / "hardlink.bin")
    plan = build_plan([str(snap), str(tmp_path)])
    assert _names(plan.files, tmp_path) == ["snapshots/rev/model.safetensors"]
    assert sum("already planned" in s.reason for s in plan.skipped) == 2


def test_directory_link_loops_terminate(tmp_path: Path) -> None:
    _touch(tmp_path / "d" / "w.bin")
    os.symlink("..", tmp_path / "d" / "up")
    plan = build_plan([str(tmp_path)])
    assert _names(plan.files, tmp_path) == ["d/w.bin"]
    assert [s.reason for s in plan.skipped] == [
        "directory already walked (link loop or bind mount)"
    ]


@needs_root
def test_a_bind_mount_reaching_the_same_files_is_read_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _touch(src / "w.bin", 100)
    dst = tmp_path / "dst"
    dst.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True).returncode:
        pytest.skip("bind mounts are not permitted here")
    try:
        plan = build_plan([str(src), str(dst)])
    finally:
        subprocess.run(["umount", str(dst)], check=True)
    assert [f.path for f in plan.files] == [str(src / "w.bin")]


def test_deep_nesting_does_not_recurse(tmp_path: Path) -> None:
    deep = tmp_path
    for i in range(200):
        deep = deep / f"d{i}"
    _touch(deep / "w.bin")
    plan = build_plan([str(tmp_path)])
    assert len(plan.files) == 1


def test_a_file_root_is_planned_even_if_globs_would_not_match(tmp_path: Path) -> None:
    path = _touch(tmp_path / "one.gguf")
    plan = build_plan([str(path)], include=["*.safetensors"])
    assert [f.path for f in plan.files] == [str(path)]


def test_a_missing_root_is_reported(tmp_path: Path) -> None:
    plan = build_plan([str(tmp_path / "nope")])
    assert plan.files == ()
    assert plan.skipped[0].reason == "does not exist"


def test_names_with_newlines_and_invalid_utf8_are_planned_and_printable(tmp_path: Path) -> None:
    weird = os.path.join(os.fsencode(tmp_path), b"bad\xff\nname.bin")
    with open(weird, "wb") as handle:
        handle.write(b"data")
    plan = build_plan([str(tmp_path)])
    assert len(plan.files) == 1
    shown = printable(plan.files[0].path)
    assert "\n" not in shown
    assert shown.endswith("bad\\xff\\nname.bin")


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
    chunk_size=st.integers(min_value=1, max_value=4096),
)
def test_chunks_cover_every_byte_exactly_once(sizes: list[int], chunk_size: int) -> None:
    files = tuple(FileSpec(f"f{i}", size, 1, i) for i, size in enumerate(sizes))
    covered: dict[int, list[tuple[int, int]]] = {}
    for chunk in iter_chunks(files, chunk_size):
        covered.setdefault(chunk.file_index, []).append((chunk.offset, chunk.length))
    for index, size in enumerate(sizes):
        ranges = covered[index]
        assert len(ranges) == chunk_count(size, chunk_size)
        position = 0
        for offset, length in ranges:
            assert offset == position
            assert 0 < length <= chunk_size or size == 0
            position += length
        assert position == size


# ------------------------------------------------ properties of globbing and ordering

_SEGMENTS = st.sampled_from(["a", "b", "sub", "model-2", "model-10", "x.y"])
_FILE_NAMES = st.sampled_from(
    ["config.json", "w.bin", "model-00002.safetensors", "model-00010.safetensors", "t.txt", "a"]
)
_RELPATHS = st.builds(
    lambda dirs, name: "/".join([*dirs, name]),
    st.lists(_SEGMENTS, max_size=3),
    _FILE_NAMES,
)
_PATTERNS = st.sampled_from(
    ["*.json", "*.bin", "model-*", "sub", "sub/*", "a/*", "*/w.bin", "?", "*", "model-1*", "b"]
)


def _reference_match(relpath: str, pattern: str) -> bool:
    """The documented rule: without '/' a glob matches the name, with '/' the relative path."""
    import fnmatch

    target = relpath if "/" in pattern else relpath.rsplit("/", 1)[-1]
    return fnmatch.fnmatchcase(target, pattern.strip("/"))


def _tree_of(root: Path, relpaths: set[str]) -> set[str]:
    """Create the files; drop paths that collide with a directory of another one."""
    made = set()
    for relpath in sorted(relpaths, key=lambda p: (p.count("/"), p)):
        target = root / relpath
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                continue
            target.write_bytes(b"x")
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            continue
        made.add(relpath)
    return {p for p in made if (root / p).is_file()}


@given(
    relpaths=st.sets(_RELPATHS, min_size=1, max_size=12),
    include=st.lists(_PATTERNS, max_size=2),
    exclude=st.lists(_PATTERNS, max_size=2),
)
def test_include_and_exclude_partition_the_tree_as_documented(
    relpaths: set[str], include: list[str], exclude: list[str]
) -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        root = Path(scratch)
        files = _tree_of(root, relpaths)
        # all_formats: the format rules (a .bin beside safetensors ...) are tested apart
        plan = build_plan([str(root)], include=include, exclude=exclude, all_formats=True)

        def excluded(relpath: str) -> bool:
            parts = relpath.split("/")
            ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
            return any(_reference_match(a, p) for a in ancestors for p in exclude) or any(
                _reference_match(relpath, p) for p in exclude
            )

        expected = {
            p
            for p in files
            if not excluded(p) and (not include or any(_reference_match(p, i) for i in include))
        }
        planned = [os.path.relpath(f.path, root) for f in plan.files]
        assert sorted(planned) == sorted(expected)
        assert len(planned) == len(set(planned))
        # everything not planned is accounted for by a skip at itself or a pruned folder
        skipped = {os.path.relpath(s.path, root) for s in plan.skipped}
        for relpath in files - expected:
            parts = relpath.split("/")
            assert any("/".join(parts[:i]) in skipped for i in range(1, len(parts) + 1))
        assert not any(s.error for s in plan.skipped)


@given(relpaths=st.sets(_RELPATHS, min_size=1, max_size=12), seed=st.randoms())
def test_plan_order_is_metadata_first_then_natural_whatever_the_creation_order(
    relpaths: set[str], seed: random.Random
) -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        root = Path(scratch)
        shuffled = list(relpaths)
        seed.shuffle(shuffled)
        files = _tree_of(root, set(shuffled))
        plan = build_plan([str(root)], all_formats=True)
        again = build_plan([str(root)], all_formats=True)
    assert plan.files == again.files
    assert {os.path.relpath(f.path, root) for f in plan.files} == files
    flags = [f.metadata for f in plan.files]
    assert flags == sorted(flags, reverse=True)  # every metadata file before any weight
    for group in (True, False):
        names = [os.path.relpath(f.path, root) for f in plan.files if f.metadata is group]
        assert names == sorted(names, key=_natural_key)


@given(numbers=st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, unique=True))
def test_shards_sort_by_number_not_by_text(numbers: list[int]) -> None:
    names = [f"model-{n}-of-x.safetensors" for n in numbers]
    assert sorted(names, key=_natural_key) == [
        f"model-{n}-of-x.safetensors" for n in sorted(numbers)
    ]


@given(
    size=st.integers(min_value=0, max_value=1 << 44),
    pages=st.integers(min_value=1, max_value=1 << 18),
)
def test_chunks_of_huge_files_are_page_aligned_and_cover_the_file(size: int, pages: int) -> None:
    """The engine rounds chunk sizes to pages, so every chunk offset is page aligned (mmap
    needs it) and the last chunk ends exactly at the end of the file, even for 16 TiB."""
    chunk_size = pages * PAGE_SIZE
    count = chunk_count(size, chunk_size)
    spec = FileSpec("f", size, 1, 1)
    first = next(iter_chunks((spec,), chunk_size))  # lazily: 2**32 chunks exist
    assert (first.offset, first.length) == (0, min(size, chunk_size))
    assert (count - 1) * chunk_size < size <= count * chunk_size or size == 0 == count - 1
    last_offset = (count - 1) * chunk_size
    assert last_offset % PAGE_SIZE == 0
    assert last_offset + max(0, min(chunk_size, size - last_offset)) == size
    if count <= 64:
        chunks = list(iter_chunks((spec,), chunk_size))
        assert sum(c.length for c in chunks) == size
        assert all(c.offset % PAGE_SIZE == 0 for c in chunks)


def _parts_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """The natural order spelt out: text and digit runs, numbers compared as numbers."""
    return tuple(
        (0, int(part)) if index % 2 else (1, part)
        for index, part in enumerate(re.split(r"(\d+)", text))
    )


@given(st.lists(st.text(alphabet="ab0129-._/\x01\x7f", max_size=12), min_size=2, max_size=40))
def test_the_one_string_natural_key_orders_as_the_parts_do(names: list[str]) -> None:
    assert sorted(names, key=_natural_key) == sorted(names, key=_parts_key)
    for a, b in itertools.pairwise(names):
        assert (_natural_key(a) < _natural_key(b)) == (_parts_key(a) < _parts_key(b))
        assert (_natural_key(a) == _natural_key(b)) == (_parts_key(a) == _parts_key(b))


def test_a_file_reached_from_two_roots_is_planned_once_and_first(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "w-2.bin").write_bytes(b"x" * 10)
    (tmp_path / "a" / "w-10.bin").write_bytes(b"y" * 10)
    os.link(tmp_path / "a" / "w-10.bin", tmp_path / "b" / "w-1.bin")
    plan = build_plan([str(tmp_path / "a"), str(tmp_path / "b")])
    assert [os.path.relpath(f.path, tmp_path) for f in plan.files] == ["a/w-2.bin", "a/w-10.bin"]
    assert [s.reason for s in plan.skipped] == ["same file already planned (link or bind mount)"]
    assert len({(f.dev, f.ino) for f in plan.files}) == 2
