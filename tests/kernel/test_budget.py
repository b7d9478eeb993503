"""The memory budget: parsing cgroup and meminfo files, reading the real ones, fitting a plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from preloader import errors
from preloader.kernel.cgroups import (
    memory_cgroup_dirs,
    parse_limit,
    parse_meminfo,
    parse_proc_cgroup,
)
from preloader.kernel.mounts import Mount, parse_mountinfo
from preloader.planning.budget import CgroupLevel, MemoryBudget, check_plan, read_memory_budget
from preloader.planning.planner import Plan
from preloader.planning.specs import FileSpec
from preloader.settings import Headroom, parse_headroom

from ..cli.test_cli import _log_lines
from ..lib.cli import REPO, run_cli, run_cli_in_cgroup
from ..lib.residency import fincore_resident_bytes

MiB = 1024 * 1024

V1_PROC_CGROUP = """\
9:name=systemd:/
4:memory:/process_api/8532fd156b51fe311a95760bd63b7c52
3:cpuset:/
2:cpu,cpuacct:/
0::/
"""

V1_MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

# A Kubernetes pod on cgroup v2 with a cgroup namespace: the pod's cgroup is "/".
V2_PROC_CGROUP = "0::/\n"
V2_MOUNTINFO = (
    "1180 1172 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime master:9 "
    "- cgroup2 cgroup rw,nsdelegate,memory_recursiveprot\n"
)

# Docker on v1 without a cgroup namespace: the mount's root is the container's cgroup.
DOCKER_V1_PROC_CGROUP = "5:memory:/docker/0123abcd\n"
DOCKER_V1_MOUNTINFO = (
    "600 590 0:32 /docker/0123abcd /sys/fs/cgroup/memory ro,nosuid master:16 "
    "- cgroup cgroup rw,memory\n"
)


def test_proc_cgroup_v1_controllers_and_the_v2_line() -> None:
    v1, v2 = parse_proc_cgroup(V1_PROC_CGROUP)
    assert v1["memory"] == "/process_api/8532fd156b51fe311a95760bd63b7c52"
    assert v1["cpu"] == v1["cpuacct"] == "/"
    assert v1["name=systemd"] == "/"
    assert v2 == "/"
    assert parse_proc_cgroup("0::/kubepods/pod1/c1\n") == ({}, "/kubepods/pod1/c1")


def test_mountinfo_fields_and_octal_escapes() -> None:
    mounts = parse_mountinfo(V1_MOUNTINFO + r"50 1 0:40 / /mnt/with\040space rw - ext4 /dev/x rw")
    memory = Mount("/", "/sys/fs/cgroup/memory", "cgroup", ("rw", "memory"), os.makedev(0, 32))
    assert memory in mounts
    assert mounts[-1].mount_point == "/mnt/with space"
    assert parse_mountinfo("garbage\n") == []


def test_the_memory_cgroup_directory_is_found_for_each_layout() -> None:
    v1, v2 = parse_proc_cgroup(V1_PROC_CGROUP)
    assert memory_cgroup_dirs(v1, v2, parse_mountinfo(V1_MOUNTINFO)) == [
        (
            1,
            "/sys/fs/cgroup/memory/process_api/8532fd156b51fe311a95760bd63b7c52",
            "/sys/fs/cgroup/memory",
        ),
        (2, "/sys/fs/cgroup/unified", "/sys/fs/cgroup/unified"),
    ]
    v1, v2 = parse_proc_cgroup(V2_PROC_CGROUP)
    assert memory_cgroup_dirs(v1, v2, parse_mountinfo(V2_MOUNTINFO)) == [
        (2, "/sys/fs/cgroup", "/sys/fs/cgroup")
    ]
    v1, v2 = parse_proc_cgroup(DOCKER_V1_PROC_CGROUP)
    assert memory_cgroup_dirs(v1, v2, parse_mountinfo(DOCKER_V1_MOUNTINFO)) == [
        (1, "/sys/fs/cgroup/memory", "/sys/fs/cgroup/memory")
    ]


def test_limits_max_and_the_v1_no_limit_number_mean_unlimited() -> None:
    assert parse_limit("max\n") is None
    assert parse_limit("9223372036854771712\n") is None
    assert parse_limit("1073741824\n") == 1 << 30
    with pytest.raises(ValueError):
        parse_limit("lots")


def test_meminfo_in_bytes() -> None:
    info = parse_meminfo(
        "MemTotal:       24684084 kB\nMemAvailable:   23929076 kB\nHugePages_Total: 0\n"
    )
    assert info == {
        "MemTotal": 24684084 * 1024,
        "MemAvailable": 23929076 * 1024,
        "HugePages_Total": 0,
    }


def test_headroom_is_a_size_or_a_share() -> None:
    assert parse_headroom("256MiB") == Headroom(fixed_bytes=256 * MiB)
    assert parse_headroom("10%").bytes_for(1000 * MiB) == 100 * MiB
    default = Headroom()
    assert default.bytes_for(10 * 1024 * MiB) == 512 * MiB  # 5%
    assert default.bytes_for(256 * MiB) == 64 * MiB  # the floor
    assert default.bytes_for(None) == 64 * MiB
    assert default.bytes_for(100 * 1024 * MiB) == 1024 * MiB  # the cap
    assert parse_headroom("10%").bytes_for(100 * 1024 * MiB) == 10 * 1024 * MiB  # no cap
    for bad in ("lots", "120%", "-1%"):
        with pytest.raises(ValueError, match="headroom"):
            parse_headroom(bad)


def _budget(limit: int | None, usage: int, available: int, high: int | None = None) -> MemoryBudget:
    return MemoryBudget(
        cgroup_version=2,
        cgroup_levels=(CgroupLevel("/sys/fs/cgroup/pod", limit, usage, high),),
        mem_available_bytes=available,
        mem_total_bytes=64 * 1024 * MiB,
        source="test",
    )


def test_the_tightest_of_limit_high_ancestors_and_memavailable_binds() -> None:
    budget = _budget(limit=1024 * MiB, usage=100 * MiB, available=8192 * MiB)
    assert budget.available_bytes == 924 * MiB
    assert budget.limited_by == "cgroup v2 memory.max of /sys/fs/cgroup/pod"
    high = _budget(limit=1024 * MiB, usage=100 * MiB, available=8192 * MiB, high=512 * MiB)
    assert high.available_bytes == 412 * MiB
    assert high.limited_by == "cgroup v2 memory.high of /sys/fs/cgroup/pod"
    node = _budget(limit=None, usage=100 * MiB, available=300 * MiB)
    assert node.available_bytes == 300 * MiB
    assert node.limited_by == "node MemAvailable"
    nested = MemoryBudget(
        cgroup_version=1,
        cgroup_levels=(
            CgroupLevel("/c/pod/container", 4096 * MiB, 100 * MiB),
            CgroupLevel("/c/pod", 2048 * MiB, 1900 * MiB),
        ),
        mem_available_bytes=8192 * MiB,
    )
    assert nested.available_bytes == 148 * MiB
    assert nested.limit_bytes == 2048 * MiB
    assert MemoryBudget().available_bytes is None
    assert MemoryBudget().allowance() is None


def _plan(*sizes: int, metadata: int = 0) -> Plan:
    files = tuple(
        FileSpec(f"/m/f{i}", size, 1, i, metadata=i < metadata) for i, size in enumerate(sizes)
    )
    return Plan(roots=("/m",), files=files)


def test_a_plan_that_fits_is_left_alone() -> None:
    budget = _budget(limit=1024 * MiB, usage=0, available=8192 * MiB)
    check = check_plan(_plan(100 * MiB, 100 * MiB), budget, "trim", Headroom(fixed_bytes=0))
    assert not check.over_budget
    assert check.plan.files == _plan(100 * MiB, 100 * MiB).files
    assert check.cold == ()


def test_trim_keeps_the_plan_order_cuts_one_file_and_reports_the_rest_cold() -> None:
    budget = _budget(limit=300 * MiB, usage=0, available=8192 * MiB)
    plan = _plan(1000, 100 * MiB, 100 * MiB, 100 * MiB, 100 * MiB, metadata=1)
    check = check_plan(plan, budget, "trim", Headroom(fixed_bytes=50 * MiB))
    assert check.over_budget
    assert check.allowance_bytes == 250 * MiB
    kept = [(f.path, f.size) for f in check.plan.files]
    page_floor = (250 * MiB - 1000 - 200 * MiB) // os.sysconf("SC_PAGE_SIZE")
    cut = page_floor * os.sysconf("SC_PAGE_SIZE")
    assert kept == [("/m/f0", 1000), ("/m/f1", 100 * MiB), ("/m/f2", 100 * MiB), ("/m/f3", cut)]
    assert [(c.path, c.offset, c.length) for c in check.cold] == [
        ("/m/f3", cut, 100 * MiB - cut),
        ("/m/f4", 0, 100 * MiB),
    ]
    assert check.plan.total_bytes + check.cold_bytes == plan.total_bytes
    assert check.plan.total_bytes <= check.allowance_bytes


def test_resident_bytes_cost_nothing_so_a_warm_model_is_not_trimmed() -> None:
    budget = _budget(limit=300 * MiB, usage=250 * MiB, available=8192 * MiB)
    plan = _plan(100 * MiB, 100 * MiB)
    cold_check = check_plan(plan, budget, "trim", Headroom(fixed_bytes=0))
    assert cold_check.over_budget and cold_check.cold
    warm_check = check_plan(
        plan, budget, "trim", Headroom(fixed_bytes=0), resident=[100 * MiB, 60 * MiB]
    )
    assert warm_check.need_bytes == 40 * MiB
    assert not warm_check.over_budget
    assert warm_check.plan == plan


def test_warn_and_fail_leave_the_plan_whole_and_say_it_does_not_fit() -> None:
    budget = _budget(limit=100 * MiB, usage=0, available=8192 * MiB)
    for policy in ("warn", "fail"):
        check = check_plan(_plan(200 * MiB), budget, policy, Headroom(fixed_bytes=0))
        assert check.over_budget
        assert check.plan.total_bytes == 200 * MiB
        assert check.cold == ()
        assert "needs 200.0 MiB" in check.message()
        assert "allows 100.0 MiB" in check.message()
    with pytest.raises(ValueError, match="unknown overflow policy"):
        check_plan(_plan(1), budget, "panic")


def test_metadata_is_never_cut_in_half() -> None:
    budget = _budget(limit=10 * MiB, usage=0, available=8192 * MiB)
    check = check_plan(_plan(20 * MiB, metadata=1), budget, "trim", Headroom(fixed_bytes=0))
    assert check.plan.files == ()
    assert [(c.offset, c.length) for c in check.cold] == [(0, 20 * MiB)]


# -- the real files of this machine ---------------------------------------------------------


def _own_memory_cgroup() -> tuple[int, str] | None:
    with open("/proc/self/cgroup") as handle:
        v1, v2 = parse_proc_cgroup(handle.read())
    with open("/proc/self/mountinfo") as handle:
        mounts = parse_mountinfo(handle.read())
    for version, directory, _ in memory_cgroup_dirs(v1, v2, mounts):
        limit_file = "memory.max" if version == 2 else "memory.limit_in_bytes"
        if os.path.exists(os.path.join(directory, limit_file)):
            return version, directory
    return None


def test_the_real_budget_matches_the_files_it_comes_from() -> None:
    budget = read_memory_budget()
    with open("/proc/meminfo") as handle:
        meminfo = parse_meminfo(handle.read())
    assert budget.mem_total_bytes == meminfo["MemTotal"]
    assert budget.mem_available_bytes is not None and budget.mem_available_bytes > 0
    own = _own_memory_cgroup()
    if own is None:
        assert budget.cgroup_version is None and budget.notes
        return
    version, directory = own
    assert budget.cgroup_version == version
    assert budget.cgroup_levels[0].path == directory
    limit_file = "memory.max" if version == 2 else "memory.limit_in_bytes"
    assert budget.cgroup_levels[0].limit_bytes == parse_limit(
        Path(directory, limit_file).read_text()
    )
    assert budget.available_bytes is not None
    assert json.loads(json.dumps(budget.to_json()))["cgroup_version"] == version


def _budget_in_child(prefix: list[str], code: str) -> dict[str, object]:
    out = subprocess.run(
        [*prefix, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": REPO},
    ).stdout
    return dict(json.loads(out))


READ_BUDGET = (
    "import json; from preloader.planning.budget import read_memory_budget; "
    "print(json.dumps(read_memory_budget().to_json()))"
)


def test_a_limited_cgroup_is_found_with_its_limit(
    memory_cgroup: Callable[[int], tuple[str, int]],
) -> None:
    cgroup, version = memory_cgroup(256 * MiB)
    wrapper = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup]
    found = _budget_in_child(wrapper, READ_BUDGET)
    assert found["cgroup_version"] == version
    assert found["limit_bytes"] == 256 * MiB
    assert str(found["limited_by"]).endswith(f"of {cgroup}")
    levels = found["cgroup_levels"]
    assert isinstance(levels, list) and levels[0]["path"] == cgroup
    usage = levels[0]["usage_bytes"]
    assert isinstance(usage, int) and 0 < usage < 256 * MiB
    available = found["available_bytes"]
    assert isinstance(available, int) and available == 256 * MiB - usage


def test_without_psutil_meminfo_is_read_directly() -> None:
    found = _budget_in_child([], "import sys; sys.modules['psutil'] = None; " + READ_BUDGET)
    assert found["source"] == "/proc/meminfo"
    assert isinstance(found["mem_available_bytes"], int)


# -- warm inside a real memory cgroup smaller than the model --------------------------------

CGROUP_LIMIT = 160 * MiB


def _shards(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def test_warm_in_a_cgroup_smaller_than_the_model_trims_and_says_what_stayed_cold(
    big_model: Path, memory_cgroup: Callable[[int], tuple[str, int]]
) -> None:
    cgroup, _ = memory_cgroup(CGROUP_LIMIT)
    done = run_cli_in_cgroup(cgroup, "warm", str(big_model), "--json", "-c", "2")
    assert done.returncode == errors.EXIT_OK, done.stderr
    report = json.loads(done.stdout)
    budget = report["budget"]
    assert budget["limit_bytes"] == CGROUP_LIMIT
    assert (
        budget["limited_by"]
        == f"cgroup v{budget['cgroup_version']} "
        + ("memory.limit_in_bytes" if budget["cgroup_version"] == 1 else "memory.max")
        + f" of {cgroup}"
    )
    assert budget["on_overflow"] == "trim" and budget["over_budget"] is True
    planned = sum(p.stat().st_size for p in big_model.iterdir())
    assert budget["planned_bytes"] == budget["need_bytes"] == planned
    assert budget["headroom_bytes"] == 64 * MiB  # the default: 5% of the limit, at least 64 MiB
    # What was warmed fits the allowance, and warmed plus cold is the whole model.
    assert 0 < report["bytes"] <= budget["allowance_bytes"]
    assert report["bytes"] + report["cold_bytes"] == planned
    # Read once, not re-read while the cgroup reclaims, and still resident at the end.
    assert report["read_bytes"] == report["bytes"]
    assert report["resident_bytes"] >= 0.99 * report["bytes"]
    # Every ratio is over the model as planned: the cold bytes count as not resident.
    assert report["model_bytes"] == planned
    assert report["resident_ratio"] == report["resident_bytes"] / planned
    cold = {item["path"]: item for item in report["cold"]}
    shards = _shards(big_model)
    assert str(shards[-1]) in cold and str(shards[0]) not in cold
    assert sum(item["bytes"] for item in cold.values()) == report["cold_bytes"]
    # fincore, outside the cgroup: the cold shards were never read.
    for shard in shards:
        item = cold.get(str(shard))
        if item is not None and item["offset"] == 0:
            assert fincore_resident_bytes(shard) == 0
        elif item is None:
            assert fincore_resident_bytes(shard) >= shard.stat().st_size  # whole pages
    warning = [line for line in _log_lines(done.stderr) if line["event"].startswith("over memory")]
    assert warning and warning[0]["cold_bytes"] == report["cold_bytes"]


def test_warn_reads_everything_once_and_the_cgroup_evicts_what_did_not_fit(
    big_model: Path, memory_cgroup: Callable[[int], tuple[str, int]]
) -> None:
    cgroup, _ = memory_cgroup(CGROUP_LIMIT)
    done = run_cli_in_cgroup(cgroup, "warm", str(big_model), "--json", "--on-overflow", "warn")
    report = json.loads(done.stdout)
    assert report["budget"]["over_budget"] is True
    assert report["read_bytes"] == report["bytes"] == report["budget"]["planned_bytes"]
    assert report["cold"] == []
    assert report["resident_bytes"] < CGROUP_LIMIT  # the rest was reclaimed
    assert done.returncode == errors.EXIT_NOT_RESIDENT
    assert report["not_resident"]


def test_fail_exits_7_naming_the_numbers_before_reading_anything(
    big_model: Path, memory_cgroup: Callable[[int], tuple[str, int]]
) -> None:
    cgroup, _ = memory_cgroup(CGROUP_LIMIT)
    done = run_cli_in_cgroup(
        cgroup, "warm", str(big_model), "--json", env={"PRELOADER_ON_OVERFLOW": "fail"}
    )
    assert done.returncode == errors.EXIT_OVER_BUDGET, done.stderr
    message = json.loads(done.stdout)["error"]
    assert message.startswith("the plan needs 320.0 MiB of page cache (320.0 MiB planned)")
    assert "cgroup v" in message and "limit 160.0 MiB" in message
    assert "Traceback" not in done.stderr
    assert all(fincore_resident_bytes(shard) == 0 for shard in _shards(big_model))
    best_effort = run_cli_in_cgroup(
        cgroup, "warm", str(big_model), "--on-overflow", "fail", "--best-effort"
    )
    assert best_effort.returncode == errors.EXIT_OK


def test_plan_shows_what_trim_would_leave_cold(
    big_model: Path, memory_cgroup: Callable[[int], tuple[str, int]]
) -> None:
    cgroup, _ = memory_cgroup(CGROUP_LIMIT)
    done = run_cli_in_cgroup(
        cgroup, "plan", str(big_model), "--json", env={"PRELOADER_HEADROOM": "8MiB"}
    )
    assert done.returncode == errors.EXIT_OK, done.stderr
    plan = json.loads(done.stdout)
    assert plan["budget"]["headroom_bytes"] == 8 * MiB
    assert plan["cold_bytes"] > 0
    assert plan["bytes"] + plan["cold_bytes"] == plan["budget"]["planned_bytes"]
    assert all(fincore_resident_bytes(shard) == 0 for shard in _shards(big_model))


# -- the budget in the other commands --------------------------------------------------------


def test_status_shows_the_budget_and_whether_the_cold_part_fits(model_dir: Path) -> None:
    document = json.loads(run_cli("status", str(model_dir), "--json", check=True).stdout)
    budget = document["budget"]
    assert budget["need_bytes"] == document["bytes"] - document["resident_bytes"]
    assert budget["available_bytes"] > 0 and budget["over_budget"] is False
    text = run_cli("status", str(model_dir), "--summary", check=True).stdout.splitlines()
    assert text[-1].startswith("memory budget: ")
    assert text[-1].endswith("after headroom)") and " not resident fit " in text[-1]


def test_plan_text_lists_order_sizes_skips_and_the_budget(model_dir: Path) -> None:
    (model_dir / "pytorch_model.bin").write_bytes(b"\0" * 4096)
    lines = run_cli("plan", str(model_dir), check=True).stdout.splitlines()
    assert lines[0] == "warm 8 files, 8.0 MiB, in this order:"
    assert lines[1].split()[-1] == str(model_dir / "config.json")
    assert [line.split()[-1] for line in lines[5:9]] == [
        str(model_dir / f"model-0000{n}-of-00004.safetensors") for n in (1, 2, 3, 4)
    ]
    assert lines[9] == "skip 1:"
    assert any(line.endswith("--all-formats warms it") for line in lines)
    assert lines[-1].startswith("memory budget: ")


def test_a_bad_headroom_is_a_usage_error(model_dir: Path) -> None:
    done = run_cli("warm", str(model_dir), "--headroom", "lots")
    assert done.returncode == errors.EXIT_USAGE
    assert "headroom 'lots': not a size or a percentage" in done.stderr
