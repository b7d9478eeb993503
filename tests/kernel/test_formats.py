"""Model formats: real safetensors and GGUF trees, and the plans the planner makes of them.

The files are written by the real ``safetensors`` and ``gguf`` packages (tiny numpy
tensors), as a Hugging Face download or a llama.cpp model folder lays them out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from preloader import errors
from preloader.planning.formats import (
    Entry,
    arrange,
    default_skip,
    read_safetensors_index,
    split_part,
)
from preloader.planning.planner import build_plan

from ..lib.cli import run_cli
from ..lib.residency import evict_tree, fincore_resident_bytes

gguf = pytest.importorskip("gguf")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _tensor(seed: int, elements: int = 4096) -> np.ndarray:
    return np.arange(elements, dtype=np.float32) + seed


def write_safetensors_model(
    root: Path, shards: int = 3, index_order: list[int] | None = None, missing: tuple[int, ...] = ()
) -> list[str]:
    """A sharded safetensors model with its index, config and tokenizer; shard names back."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"model-{n:05d}-of-{shards:05d}.safetensors" for n in range(1, shards + 1)]
    weight_map: dict[str, str] = {}
    for layer, shard in enumerate(index_order or range(shards)):
        weight_map[f"model.layers.{layer}.weight"] = names[shard]
    for shard, name in enumerate(names):
        if shard in missing:
            continue
        tensors = {t: _tensor(i) for i, (t, n) in enumerate(weight_map.items()) if n == name}
        safetensors_numpy.save_file(tensors, str(root / name), metadata={"format": "pt"})
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    return names


def write_gguf(path: Path, split_max_tensors: int = 0, tensors: int = 3) -> list[Path]:
    """A real GGUF file (or split set, written by gguf's own splitter); the files back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    before = set(path.parent.iterdir())
    writer = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    writer.add_name(path.stem)
    for i in range(tensors):
        writer.add_tensor(f"blk.{i}.weight", _tensor(i, 1024))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(set(path.parent.iterdir()) - before)


def _names(root: Path, paths: list[str] | tuple[str, ...]) -> list[str]:
    return [os.path.relpath(p, root) for p in paths]


def _planned(
    root: Path, include: tuple[str, ...] | list[str] = (), all_formats: bool = False
) -> list[str]:
    plan = build_plan([str(root)], include=include, all_formats=all_formats)
    return _names(root, [f.path for f in plan.files])


def _reasons(root: Path) -> dict[str, str]:
    return {os.path.relpath(s.path, root): s.reason for s in build_plan([str(root)]).skipped}


# -- safetensors -------------------------------------------------------------------------


def test_shards_named_by_the_index_are_warmed_in_the_loaders_file_order(tmp_path: Path) -> None:
    # Layers 0-1 live in shard 3, layers 2-3 in shard 1, layer 4 in shard 2: weight_map
    # names shard 3 first, but loaders open the shards in natural file-name order.
    names = write_safetensors_model(tmp_path, shards=3, index_order=[2, 2, 0, 0, 1])
    assert read_safetensors_index(str(tmp_path / "model.safetensors.index.json")) == [
        names[2],
        names[0],
        names[1],
    ]
    assert _planned(tmp_path) == [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        names[0],
        names[1],
        names[2],
    ]


def test_shard_names_sort_naturally_not_as_text(tmp_path: Path) -> None:
    names = write_safetensors_model(tmp_path, shards=3)
    renamed = dict(
        zip(names, ("w-2.safetensors", "w-10.safetensors", "w-1.safetensors"), strict=True)
    )
    for old, new in renamed.items():
        (tmp_path / old).rename(tmp_path / new)
    index = tmp_path / "model.safetensors.index.json"
    document = json.loads(index.read_text())
    document["weight_map"] = {t: renamed[n] for t, n in document["weight_map"].items()}
    index.write_text(json.dumps(document))
    assert _planned(tmp_path)[-3:] == ["w-1.safetensors", "w-2.safetensors", "w-10.safetensors"]


def test_reading_the_index_does_not_warm_it(shared_tmp: Path) -> None:
    write_safetensors_model(shared_tmp, shards=2)
    index = shared_tmp / "model.safetensors.index.json"
    fd = os.open(index, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
    finally:
        os.close(fd)
    evict_tree(index)
    assert fincore_resident_bytes(index) == 0
    status = json.loads(run_cli("status", str(shared_tmp), "--json", check=True).stdout)
    per_file = {os.path.basename(f["path"]): f["resident_bytes"] for f in status["per_file"]}
    assert per_file["model.safetensors.index.json"] == 0


def test_shards_the_index_names_but_the_folder_lacks_are_an_error(tmp_path: Path) -> None:
    names = write_safetensors_model(tmp_path, shards=4, missing=(1, 3))
    plan = build_plan([str(tmp_path)])
    [problem] = plan.problems
    assert problem.path == str(tmp_path / "model.safetensors.index.json")
    assert problem.message == (
        f"names 2 of 4 shards that are missing ({names[1]}, {names[3]}): the download is incomplete"
    )
    done = run_cli("warm", str(tmp_path), "--json")
    assert done.returncode == errors.EXIT_INCOMPLETE_MODEL
    report = json.loads(done.stdout)
    assert report["exit_code"] == errors.EXIT_INCOMPLETE_MODEL
    assert names[1] in report["error"] and "incomplete" in report["error"]
    assert "Traceback" not in done.stderr
    dry = run_cli("plan", str(tmp_path))
    assert dry.returncode == errors.EXIT_INCOMPLETE_MODEL
    assert f"INCOMPLETE {tmp_path / 'model.safetensors.index.json'}: names 2 of 4" in dry.stdout


def test_an_include_that_leaves_shards_out_is_not_a_broken_download(tmp_path: Path) -> None:
    names = write_safetensors_model(tmp_path, shards=3)
    plan = build_plan([str(tmp_path)], include=[names[0], "*.json"])
    assert plan.problems == ()
    assert _names(tmp_path, [f.path for f in plan.files])[-1] == names[0]


def test_a_broken_index_is_a_warning_and_every_shard_is_still_warmed(tmp_path: Path) -> None:
    names = write_safetensors_model(tmp_path, shards=2)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    plan = build_plan([str(tmp_path)])
    [problem] = plan.problems
    assert problem.message.startswith("cannot read the safetensors index (not valid JSON")
    assert not problem.fatal
    planned = _names(tmp_path, [f.path for f in plan.files])
    assert all(name in planned for name in names)


def test_pytorch_copies_beside_safetensors_are_skipped_unless_all_formats(tmp_path: Path) -> None:
    names = write_safetensors_model(tmp_path, shards=2)
    (tmp_path / "pytorch_model-00001-of-00002.bin").write_bytes(b"\0" * 4096)
    (tmp_path / "pytorch_model-00002-of-00002.bin").write_bytes(b"\0" * 4096)
    (tmp_path / "pytorch_model.bin.index.json").write_text("{}")
    (tmp_path / "training_args.pt").write_bytes(b"\0" * 100)
    assert _planned(tmp_path)[-2:] == names
    reasons = _reasons(tmp_path)
    assert set(reasons) == {
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "training_args.pt",
    }
    assert all(r.startswith("same weights as the .safetensors files") for r in reasons.values())
    every = _planned(tmp_path, all_formats=True)
    assert "pytorch_model-00002-of-00002.bin" in every and "training_args.pt" in every
    # Without safetensors in the folder the .bin files are the weights.
    for name in names:
        (tmp_path / name).unlink()
    (tmp_path / "model.safetensors.index.json").unlink()
    assert "pytorch_model-00001-of-00002.bin" in _planned(tmp_path)


def test_safetensors_the_index_does_not_name_are_skipped(tmp_path: Path) -> None:
    # Mistral releases ship consolidated.safetensors beside the indexed HF shards.
    names = write_safetensors_model(tmp_path, shards=2)
    safetensors_numpy.save_file({"w": _tensor(9)}, str(tmp_path / "consolidated.safetensors"))
    assert "consolidated.safetensors" not in _planned(tmp_path)
    assert _reasons(tmp_path)["consolidated.safetensors"].startswith(
        "not named by model.safetensors.index.json"
    )
    assert _planned(tmp_path, all_formats=True)[-3:] == ["consolidated.safetensors", *names]


def test_original_git_cache_locks_and_partial_downloads_are_skipped(tmp_path: Path) -> None:
    write_safetensors_model(tmp_path, shards=1)
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "consolidated.00.pth").write_bytes(b"\0" * 100)
    (tmp_path / ".git" / "objects").mkdir(parents=True)
    (tmp_path / ".git" / "objects" / "pack").write_bytes(b"\0" * 100)
    download = tmp_path / ".cache" / "huggingface" / "download"
    download.mkdir(parents=True)
    (download / "model.safetensors.lock").write_bytes(b"")
    (tmp_path / "model-00002.safetensors.incomplete").write_bytes(b"\0" * 100)
    (tmp_path / "tokenizer.model.part").write_bytes(b"\0" * 100)
    (tmp_path / "snapshot.lock").write_bytes(b"")
    reasons = _reasons(tmp_path)
    assert set(reasons) == {
        "original",
        ".git",
        ".cache",
        "model-00002.safetensors.incomplete",
        "tokenizer.model.part",
        "snapshot.lock",
    }
    assert reasons["original"].endswith("--include 'original/*' warms it")
    assert reasons["snapshot.lock"] == "lock file of a download; --include '*.lock' warms it"
    # Named by an include glob, they are warmed.
    assert _planned(tmp_path, include=["original/*"]) == ["original/consolidated.00.pth"]
    assert _planned(tmp_path, include=["*.part"]) == ["tokenizer.model.part"]
    # A plain glob does not lift the rule.
    assert "original/consolidated.00.pth" not in _planned(tmp_path, include=["*.pth"])


def test_a_root_inside_a_skipped_folder_is_walked(tmp_path: Path) -> None:
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "consolidated.00.pth").write_bytes(b"\0" * 100)
    assert _planned(tmp_path / "original") == ["consolidated.00.pth"]


# -- GGUF --------------------------------------------------------------------------------


def test_split_gguf_files_are_one_model_in_part_order(tmp_path: Path) -> None:
    parts = write_gguf(tmp_path / "Qwen3-32B-Q4_K_M.gguf", split_max_tensors=1, tensors=3)
    assert [p.name for p in parts] == [f"Qwen3-32B-Q4_K_M-{n:05d}-of-00003.gguf" for n in (1, 2, 3)]
    plan = build_plan([str(tmp_path)])
    assert [f.path for f in plan.files] == [str(p) for p in parts]
    assert plan.choices == () and plan.problems == ()


def test_a_split_set_missing_a_part_is_an_error(tmp_path: Path) -> None:
    parts = write_gguf(tmp_path / "m-Q8_0.gguf", split_max_tensors=1, tensors=3)
    parts[1].unlink()
    [problem] = build_plan([str(tmp_path)]).problems
    assert problem.path == str(parts[0])
    assert problem.message == (
        f"split model m-Q8_0.gguf lacks 1 of its 3 parts ({parts[1].name}): "
        "the download is incomplete"
    )
    assert run_cli("warm", str(tmp_path)).returncode == errors.EXIT_INCOMPLETE_MODEL


def test_several_quantisations_warm_one_and_say_which(tmp_path: Path) -> None:
    q4 = write_gguf(tmp_path / "Llama-3-8B-Q4_K_M.gguf", split_max_tensors=2, tensors=3)
    [q8] = write_gguf(tmp_path / "Llama-3-8B-Q8_0.gguf")
    [f16] = write_gguf(tmp_path / "Llama-3-8B-F16.gguf")
    [mmproj] = write_gguf(tmp_path / "mmproj-Llama-3-8B-f16.gguf")
    plan = build_plan([str(tmp_path)])
    assert [f.path for f in plan.files] == [str(p) for p in q4] + [str(mmproj)]
    [choice] = plan.choices
    assert choice.chosen == str(q4[0])
    assert set(choice.candidates) == {str(q4[0]), str(q8), str(f16)}
    assert choice.reason.startswith("Q4_K_M, the usual default quantisation")
    skipped = {s.path: s.reason for s in plan.skipped}
    assert skipped[str(q8)].startswith(f"another GGUF model in this folder; warming {q4[0].name}")
    # The CLI says which, in the log and in --json.
    done = run_cli("plan", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["choices"][0]["chosen"] == str(q4[0])
    assert [f["path"] for f in document["files"]] == [str(p) for p in q4] + [str(mmproj)]


def test_without_a_q4_k_m_the_first_by_name_is_chosen(tmp_path: Path) -> None:
    [q5] = write_gguf(tmp_path / "a-Q5_K_M.gguf")
    write_gguf(tmp_path / "a-Q8_0.gguf")
    plan = build_plan([str(tmp_path)])
    assert [f.path for f in plan.files] == [str(q5)]
    assert plan.choices[0].reason.startswith("first in name order")


def test_include_selects_the_quantisation_and_all_formats_keeps_every_one(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m-Q4_K_M.gguf")
    [q8] = write_gguf(tmp_path / "m-Q8_0.gguf")
    plan = build_plan([str(tmp_path)], include=["*Q8_0*"])
    assert [f.path for f in plan.files] == [str(q8)]
    assert plan.choices == ()
    assert len(build_plan([str(tmp_path)], all_formats=True).files) == 2
    done = run_cli("warm", str(tmp_path), "--json", env={"PRELOADER_ALL_FORMATS": "1"})
    assert json.loads(done.stdout)["files"] == 2


def test_warm_logs_the_choice(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m-Q4_K_M.gguf")
    write_gguf(tmp_path / "m-Q8_0.gguf")
    done = run_cli("warm", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["choices"][0]["chosen"] == str(tmp_path / "m-Q4_K_M.gguf")
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    [chose] = [line for line in lines if line["event"] == "several models in one folder"]
    assert chose["chosen"] == str(tmp_path / "m-Q4_K_M.gguf")


# -- the pure rules ------------------------------------------------------------------------


def test_split_part_names() -> None:
    assert split_part("model-00002-of-00005.gguf") == ("model", 2, 5, ".gguf")
    assert split_part("model-00001-of-00002.safetensors") == ("model", 1, 2, ".safetensors")
    assert split_part("model-00006-of-00005.gguf") is None
    assert split_part("model.gguf") is None
    assert split_part("notes-00001-of-00002.txt") is None


def test_default_skip_rules() -> None:
    assert default_skip(".git", True, ()) is not None
    assert default_skip(".git", True, [".git/*"]) is None
    assert default_skip("weights", True, ()) is None
    assert default_skip("x.incomplete", False, ()) is not None
    assert default_skip("x.incomplete", False, ["*.incomplete"]) is None
    assert default_skip("x.safetensors", False, ()) is None


def test_arrange_is_per_folder_and_keeps_other_files_in_place() -> None:
    entries = [
        Entry("a/config.json", 10, metadata=True),
        Entry("a/model.safetensors.index.json", 10, metadata=True),
        Entry("a/model-00001-of-00002.safetensors", 100),
        Entry("a/model-00002-of-00002.safetensors", 100),
        Entry("a/pytorch_model.bin", 100),
        Entry("b/pytorch_model.bin", 100),
    ]
    indexes = {
        "a/model.safetensors.index.json": [
            "model-00002-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
        ]
    }
    result = arrange(entries, indexes.__getitem__, lambda rel: True)
    assert [entries[i].relpath for i in result.order] == [
        "a/config.json",
        "a/model.safetensors.index.json",
        "a/model-00001-of-00002.safetensors",
        "a/model-00002-of-00002.safetensors",
        "b/pytorch_model.bin",
    ]
    assert [entries[i].relpath for i, _ in result.skipped] == ["a/pytorch_model.bin"]
