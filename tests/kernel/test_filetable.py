"""The columnar plan and report: the same files, order and results as objects would give."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preloader.engine.reports import FileResults, Residencies
from preloader.engine.residency import measure_residency
from preloader.engine.warm import warm_plan
from preloader.planning import formats
from preloader.planning.filetable import FileColumns, FileTable
from preloader.planning.formats import natural_key
from preloader.planning.planner import Plan, build_plan
from preloader.planning.specs import FileSpec

from ..lib.residency import evict_tree

SPECS = (
    FileSpec("/m/config.json", 10, 1, 5, True, 4096),
    FileSpec("/m/w-1.bin", 3000, 1, 6, False, None),
    FileSpec("/m/sub/w-2.bin", 0, 2, 7, False, 0),
)


def _touch(path: Path, size: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def test_a_table_is_the_sequence_of_specs_it_was_made_of() -> None:
    table = FileTable.of(SPECS)
    assert table == SPECS and list(table) == list(SPECS)
    assert len(table) == 3 and table[-1] == SPECS[-1] and table[1:] == SPECS[1:]
    assert table.select([2, 0]) == (SPECS[2], SPECS[0])
    assert list(table.paths()) == [s.path for s in SPECS]
    assert list(table.sizes()) == [10, 3000, 0] and table.total_bytes == 3010
    assert table.size(1) == 3000 and table.path(2) == "/m/sub/w-2.bin"
    assert table.devices() == {1, 2} and table.select([0, 1]).devices() == {1}
    assert table != SPECS[:2] and table != SPECS[::-1]
    with pytest.raises(IndexError):
        table[3]
    # A plan given specs keeps them as a table; given a table, keeps that one.
    plan = Plan(("/m",), SPECS)
    assert isinstance(plan.files, FileTable) and plan.files == SPECS
    assert Plan(("/m",), table).files is table and plan.total_bytes == 3010


@given(
    names=st.lists(
        st.text(
            alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
            min_size=1,
            max_size=8,
        ),
        max_size=20,
    )
)
def test_names_survive_the_byte_column(names: list[str]) -> None:
    columns = FileColumns()
    folder = columns.add_dir("/root/", "")
    for index, name in enumerate(names):
        columns.add(folder, name, index, 1, index, False, None)
    assert [columns.name(i) for i in range(len(names))] == names
    assert [columns.path(i) for i in range(len(names))] == [f"/root/{n}" for n in names]


def test_undecodable_names_round_trip(tmp_path: Path) -> None:
    name = os.fsdecode(b"w\xff-1.bin")
    _touch(tmp_path / name)
    [spec] = build_plan([str(tmp_path)]).files
    assert spec.path == os.path.join(str(tmp_path), name)
    assert os.path.exists(spec.path)


def _reference_order(root: Path) -> list[str]:
    """Every regular file, sorted whole by its natural key, metadata first."""
    found = [
        os.path.relpath(os.path.join(top, name), root)
        for top, _, names in os.walk(root)
        for name in names
    ]
    found.sort(key=natural_key)
    meta = [p for p in found if os.path.splitext(p)[1] in {".json", ".txt"}]
    return meta + [p for p in found if p not in meta]


def test_natural_order_across_folders_is_the_whole_path_order(tmp_path: Path) -> None:
    # "a/..." against "a-b" and "a.b": the folder's files do not simply come first.
    for rel in [
        "a/w-10.bin",
        "a/w-9.bin",
        "a-b",
        "a.b",
        "a0/x",
        "a10/y",
        "a9/z/2.bin",
        "a9/z/10.bin",
        "a9/z.bin",
        "b/config.json",
        "tok.txt",
        "z1/1/1",
        "z1/1.bin",
    ]:
        _touch(tmp_path / rel)
    plan = build_plan([str(tmp_path)])
    assert [os.path.relpath(f.path, tmp_path) for f in plan.files] == _reference_order(tmp_path)


def test_sibling_folders_with_equal_keys_interleave_as_a_whole_sort_does(tmp_path: Path) -> None:
    # "01/" and "1/" have the same natural key: their files sort by what follows.
    for rel in ["01/a2", "01/a10", "1/a2", "1/a10", "1/a3", "2/a1"]:
        _touch(tmp_path / rel)
    plan = build_plan([str(tmp_path)])
    assert [os.path.relpath(f.path, tmp_path) for f in plan.files] == [
        "01/a2",
        "1/a2",
        "1/a3",
        "01/a10",
        "1/a10",
        "2/a1",
    ]


def _index(folder: Path, shards: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {f"t{i}": name for i, name in enumerate(shards)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_format_rules_apply_per_folder_and_keep_the_rest_in_place(tmp_path: Path) -> None:
    # Two models and plain folders between them: each model's index picks its shards, which
    # fill the slots they hold in the loaders' file order; skips come in plan order,
    # whatever folder they are in.
    for model in ("m1", "m3"):
        shards = [f"model-0000{n}-of-00002.safetensors" for n in (2, 1)]
        _index(tmp_path / model, shards)
        for shard in shards:
            _touch(tmp_path / model / shard)
        _touch(tmp_path / model / "pytorch_model.bin")
    _touch(tmp_path / "m2" / "w.bin")
    _touch(tmp_path / "m4" / "a.Q8_0.gguf")
    _touch(tmp_path / "m4" / "a.Q4_K_M.gguf")
    plan = build_plan([str(tmp_path)])
    assert [os.path.relpath(f.path, tmp_path) for f in plan.files] == [
        "m1/model.safetensors.index.json",
        "m3/model.safetensors.index.json",
        "m1/model-00001-of-00002.safetensors",
        "m1/model-00002-of-00002.safetensors",
        "m2/w.bin",
        "m3/model-00001-of-00002.safetensors",
        "m3/model-00002-of-00002.safetensors",
        "m4/a.Q4_K_M.gguf",
    ]
    assert [os.path.relpath(s.path, tmp_path) for s in plan.skipped] == [
        "m1/pytorch_model.bin",
        "m3/pytorch_model.bin",
        "m4/a.Q8_0.gguf",
    ]
    assert [c.directory for c in plan.choices] == [str(tmp_path / "m4")]


@given(names=st.lists(st.sampled_from(["a", "b.bin", "c.txt", "x-1", "10"]), max_size=6))
@settings(max_examples=50)
def test_a_folder_no_rule_may_apply_to_is_arranged_as_it_is(names: list[str]) -> None:
    entries = [formats.Entry(f"d/{n}", 1) for n in dict.fromkeys(names)]
    assert not any(formats.may_apply(e.relpath.rsplit("/", 1)[-1]) for e in entries)
    arrangement = formats.arrange(entries, lambda rel: [], lambda rel: True)
    assert arrangement.order == tuple(range(len(entries)))
    assert not arrangement.skipped and not arrangement.problems and not arrangement.choices


def test_hard_links_and_links_are_planned_once_in_the_columns(tmp_path: Path) -> None:
    first = _touch(tmp_path / "a" / "w-1.bin", 100)
    os.link(first, tmp_path / "b-hard.bin")
    os.symlink(first, tmp_path / "c-soft.bin")
    _touch(tmp_path / "d.bin", 50)
    plan = build_plan([str(tmp_path)])
    # The walk visits a folder's entries before its subfolders: the first path it meets
    # is planned, the others skipped in that order, whatever the warm order is.
    assert [os.path.relpath(f.path, tmp_path) for f in plan.files] == ["b-hard.bin", "d.bin"]
    assert [os.path.relpath(s.path, tmp_path) for s in plan.skipped] == [
        "c-soft.bin",
        "a/w-1.bin",
    ]
    assert plan.total_bytes == 150


@pytest.mark.anyio
async def test_the_warm_report_and_residency_are_columns_that_read_as_results(
    tmp_path: Path,
) -> None:
    for n in range(5):
        _touch(tmp_path / f"w-{n}.bin", 5000 * (n + 1))
    plan = build_plan([str(tmp_path)])
    evict_tree(tmp_path)
    os.unlink(plan.files[3].path)  # one file gone before the pass
    report = await warm_plan(plan)
    assert isinstance(report.files, FileResults) and len(report.files) == 5
    results = list(report.files)
    assert results == [report.files[i] for i in range(5)]
    assert [r.path for r in results] == list(plan.files.paths())
    assert [r.error is not None for r in results] == [False, False, False, True, False]
    assert report.errors == (results[3],)
    assert report.read_bytes == sum(r.read_bytes for r in results) == 75000 - 20000
    assert report.resident_bytes == sum(r.residency.resident_bytes or 0 for r in results)
    measured = await measure_residency(plan)
    assert isinstance(measured.files, Residencies)
    assert [f.resident_bytes for f in measured.files][:3] == [5000, 10000, 15000]
    assert measured.files[3].resident_bytes is None and measured.files[3].reason
    assert measured.resident_bytes is None  # one unknown: no total
    assert measured.residency_unknown_reason is not None
