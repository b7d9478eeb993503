"""Proactive reclaim: DAMON schemes that page out idle page cache, read from sysfs.

The trees below are laid out as the kernel's DAMON sysfs interface is
(``/sys/kernel/mm/damon/admin/kdamonds/N/contexts/N/schemes/N/...``), with the values
this project's CI VM runs (a ``pageout`` of unmapped, non-anonymous pages in physical
regions idle for 12 aggregation intervals of 5 s, 128 MiB per second); a kdamond cannot
be started here without changing how the machine reclaims memory, and the test session
pauses the real one (``tests/conftest.py``, ``pytest_configure``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from preloader.engine.residency import eviction_causes
from preloader.kernel import reclaim

from ..lib.cli import run_cli


def _write(root: Path, values: dict[str, str]) -> None:
    for name, value in values.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")


def _kdamond(
    sys_root: Path,
    *,
    state: str = "on",
    operations: str = "paddr",
    action: str = "pageout",
    filters: tuple[tuple[str, str, str], ...] = (("anon", "Y", "N"), ("unmapped", "Y", "Y")),
    layer: str = "ops_filters",
    index: int = 0,
) -> None:
    """One kdamond, one context, one scheme; ``filters``: (type, matching, allow)."""
    kdamond = sys_root / "kernel/mm/damon/admin/kdamonds" / str(index)
    context = kdamond / "contexts/0"
    scheme = context / "schemes/0"
    _write(
        kdamond,
        {
            "state": state,
            "contexts/nr_contexts": "1",
            "contexts/0/operations": operations,
            "contexts/0/monitoring_attrs/intervals/sample_us": "500000",
            "contexts/0/monitoring_attrs/intervals/aggr_us": "5000000",
        },
    )
    _write(
        scheme,
        {
            "action": action,
            "access_pattern/age/min": "12",
            "access_pattern/age/max": "4294967295",
            "quotas/bytes": str(128 * 1024 * 1024),
            "quotas/reset_interval_ms": "1000",
            "watermarks/metric": "none",
            f"{layer}/nr_filters": str(len(filters)),
        },
    )
    for number, (kind, matching, allow) in enumerate(filters):
        _write(scheme / layer / str(number), {"type": kind, "matching": matching, "allow": allow})


def test_the_ci_vms_scheme_is_found_with_its_age_quota_and_what_it_spares(
    tmp_path: Path,
) -> None:
    _kdamond(tmp_path)
    (scheme,) = reclaim.find_schemes(str(tmp_path))
    assert scheme.where == "DAMON kdamond 0, scheme 0"
    assert scheme.min_idle_seconds == 60.0
    assert scheme.bytes_per_second == 128 * 1024 * 1024
    assert scheme.mapped_too is False  # the last filter allows: what no filter matches stays
    line = reclaim.describe((scheme,))
    assert line is not None
    assert "page cache that no process maps" in line
    assert "60 s" in line and "128.0 MiB/s" in line
    assert "--lock" in line and "a server's mmap" in line


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"state": "off"}, "a stopped kdamond does nothing"),
        ({"operations": "vaddr"}, "virtual-address schemes act on processes, not page cache"),
        ({"action": "lru_deprio"}, "deprioritising drops nothing"),
        ({"action": "stat"}, "counting drops nothing"),
        ({"filters": (("anon", "Y", "Y"),)}, "only anonymous memory is allowed"),
        ({"filters": (("anon", "N", "N"),)}, "everything but anonymous memory is left alone"),
        ({"filters": (("unmapped", "Y", "N"),)}, "unmapped pages are left alone"),
    ],
)
def test_schemes_that_leave_page_cache_alone_are_not_reported(
    tmp_path: Path, change: dict[str, object], why: str
) -> None:
    _kdamond(tmp_path, **change)  # type: ignore[arg-type]
    assert reclaim.find_schemes(str(tmp_path)) == (), why


def test_without_filters_mapped_pages_go_too_and_lock_is_the_way_out(tmp_path: Path) -> None:
    _kdamond(tmp_path, filters=(), index=1)
    (scheme,) = reclaim.find_schemes(str(tmp_path))
    assert scheme.where == "DAMON kdamond 1, scheme 0"
    assert scheme.mapped_too is True
    line = reclaim.describe((scheme,))
    assert line is not None and "--lock" in line and "mmap" not in line


def test_older_kernels_filters_without_allow_filter_out_what_they_match(tmp_path: Path) -> None:
    # Before 6.14 a filter has no `allow`: what it matches is left alone.
    _kdamond(tmp_path, filters=(("anon", "Y", ""),), layer="filters")
    for path in tmp_path.rglob("allow"):
        path.unlink()
    (scheme,) = reclaim.find_schemes(str(tmp_path))
    assert scheme.mapped_too is True


def test_a_filter_on_what_cannot_be_told_from_here_is_said_so(tmp_path: Path) -> None:
    _kdamond(tmp_path, filters=(("memcg", "Y", "Y"),))
    (scheme,) = reclaim.find_schemes(str(tmp_path))
    assert scheme.mapped_too is None
    assert "page cache its filters select" in scheme.describe()


def test_damon_reclaim_module_is_found(tmp_path: Path) -> None:
    _write(
        tmp_path / "module/damon_reclaim/parameters",
        {"enabled": "Y", "min_age": "120000000"},
    )
    (scheme,) = reclaim.find_schemes(str(tmp_path))
    assert (scheme.where, scheme.min_idle_seconds, scheme.mapped_too) == (
        "DAMON_RECLAIM",
        120.0,
        True,
    )
    _write(tmp_path / "module/damon_reclaim/parameters", {"enabled": "N"})
    assert reclaim.find_schemes(str(tmp_path)) == ()


def test_nothing_readable_means_nothing_said(tmp_path: Path) -> None:
    assert reclaim.find_schemes(str(tmp_path)) == ()
    assert reclaim.describe(()) is None
    # Root-only files a non-root process cannot read are the same as no DAMON.
    _kdamond(tmp_path)
    if os.geteuid() != 0:
        for path in tmp_path.rglob("state"):
            path.chmod(0)
        assert reclaim.find_schemes(str(tmp_path)) == ()


def test_eviction_causes_name_the_machines_reclaim_when_there_is_one() -> None:
    causes = eviction_causes()
    assert causes.startswith("memory pressure")
    proactive = reclaim.note()
    assert (proactive is None) == (causes == "memory pressure or a cgroup limit")
    if proactive is not None:
        assert causes.endswith(proactive)


def test_warm_reports_what_this_machine_runs(model_dir: Path) -> None:
    # The real CLI, on this machine's real sysfs (paused or not, what it reads is what
    # the kernel says now).
    result = run_cli("warm", "--json", str(model_dir))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "proactive_reclaim" in report
    assert report["proactive_reclaim"] == reclaim.describe(reclaim.find_schemes())
    warned = "proactive reclaim" in result.stderr
    assert warned == (report["proactive_reclaim"] is not None)


def test_the_log_line_is_short_and_warned_once_a_boot(tmp_path: Path) -> None:
    _kdamond(tmp_path / "sys")
    schemes = reclaim.find_schemes(str(tmp_path / "sys"))
    line = reclaim.headline(schemes)
    assert line is not None and "DAMON kdamond 0, scheme 0" in line and "--lock" in line
    full = reclaim.describe(schemes)
    assert full is not None and len(line) < 120 < len(full)
    assert reclaim.headline(()) is None
    boot = tmp_path / "boot_id"
    boot.write_text("one\n")
    markers = tmp_path / "markers"
    markers.mkdir()
    assert reclaim.first_this_boot(str(markers), str(boot)) is True
    assert reclaim.first_this_boot(str(markers), str(boot)) is False  # the same boot
    boot.write_text("two\n")
    assert reclaim.first_this_boot(str(markers), str(boot)) is True  # after a reboot
    assert reclaim.first_this_boot(str(markers), str(boot)) is False


def test_the_marker_is_never_written_through_a_link(tmp_path: Path) -> None:
    boot = tmp_path / "boot_id"
    boot.write_text("one\n")
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    markers = tmp_path / "markers"
    markers.mkdir()
    (markers / f"preloader-proactive-reclaim-{os.getuid()}").symlink_to(victim)
    assert reclaim.first_this_boot(str(markers), str(boot)) is True
    assert victim.read_text() == "keep me"
    os.link(victim, markers / "hard")
    (markers / f"preloader-proactive-reclaim-{os.getuid()}").unlink()
    os.link(victim, markers / f"preloader-proactive-reclaim-{os.getuid()}")
    assert reclaim.first_this_boot(str(markers), str(boot)) is True
    assert victim.read_text() == "keep me"
