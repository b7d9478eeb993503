"""The rule that tells a reader's page-cache drop from reclaim (pure parts)."""

from __future__ import annotations

from preloader.agent.serverdrop import RESIDENT_LEFT, ServerDrops, describe, dropped_by_reader
from preloader.engine.keepwarm import ChunkResidency
from preloader.kernel.procfs import vmstat_counter

SIZE = 1 << 20


def _file(index: int, resident: int | None, evicted: int | None) -> ChunkResidency:
    return ChunkResidency(index, f"/m/{index}.safetensors", SIZE, resident, evicted_pages=evicted)


def test_a_whole_file_gone_without_evicted_pages_is_a_reader_drop() -> None:
    measured = [_file(0, 0, 0), _file(1, SIZE, None)]
    assert [item.file_index for item in dropped_by_reader([SIZE, SIZE], measured, True)] == [0]


def test_reclaim_traces_partial_loss_and_earlier_loss_are_not() -> None:
    measured = [
        _file(0, 0, 5),  # shadow entries: reclaim took it
        _file(1, SIZE // 2, 0),  # half of it is still there
        _file(2, 0, 0),  # was not resident in full before
        _file(3, 0, None),  # not measured by cachestat (mincore)
        _file(4, None, 0),  # residency unknown
    ]
    previous = [SIZE, SIZE, SIZE - 4096, SIZE, SIZE]
    assert dropped_by_reader(previous, measured, True) == []


def test_nothing_is_found_when_shadow_entries_were_pruned_or_before_a_measurement() -> None:
    measured = [_file(0, 0, 0)]
    assert dropped_by_reader([SIZE], measured, False) == []
    assert dropped_by_reader(None, measured, True) == []


def test_a_file_with_at_most_the_allowed_share_left_counts_as_whole() -> None:
    left = int(SIZE * RESIDENT_LEFT)
    assert dropped_by_reader([SIZE], [_file(0, left, 0)], True)
    assert not dropped_by_reader([SIZE], [_file(0, left + 4096, 0)], True)


def test_the_log_line_names_the_setting_for_each_policy() -> None:
    found = [_file(0, 0, 0)]
    assert "PRELOADER_ON_SERVER_DROP=rewarm" in describe(found, hold=True)
    assert "PRELOADER_ON_SERVER_DROP=hold" in describe(found, hold=False)
    assert "--weight-loader-drop-cache-after-load" in describe(found, hold=True)


def test_held_bytes_and_vmstat_counters() -> None:
    drops = ServerDrops(held={0: 3, 2: 4})
    assert drops.held_bytes() == 7
    text = "nr_free_pages 10\nworkingset_nodereclaim 36150\n"
    assert vmstat_counter("workingset_nodereclaim", text) == 36150
    assert vmstat_counter("pgsteal_kswapd", text) is None
