"""Settings resolution and size parsing: pure functions."""

from __future__ import annotations

from pathlib import Path

import pytest

from preloader.errors import UsageError
from preloader.settings import (
    AUTO_CONCURRENCY,
    DEFAULT_CONCURRENCY,
    WarmOptions,
    parse_concurrency,
    resolve_selection,
)
from preloader.units import format_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [("1048576", 1 << 20), ("64MiB", 64 << 20), ("1G", 10**9), ("1.5 GiB", 3 << 29), ("4k", 4000)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "12 parsecs", "-1"])
def test_parse_size_rejects_nonsense_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 << 30) == "3.0 GiB"


def test_concurrency() -> None:
    assert parse_concurrency(None) == parse_concurrency("") == DEFAULT_CONCURRENCY
    assert DEFAULT_CONCURRENCY == AUTO_CONCURRENCY == WarmOptions().concurrency  # -c auto
    assert parse_concurrency("8") == 8
    assert parse_concurrency("auto") == parse_concurrency("AUTO") == AUTO_CONCURRENCY
    with pytest.raises(UsageError):
        parse_concurrency("0")


def test_explicit_paths_must_exist(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file or directory"):
        resolve_selection([str(tmp_path / "x")], None, [])
    assert resolve_selection([str(tmp_path)], "/ignored", []).paths == (str(tmp_path),)


def test_environment_roots_are_merged_and_missing_ones_dropped(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    sel = resolve_selection([], str(a), [str(b), str(a), str(tmp_path / "gone")])
    assert sel.paths == (str(a), str(b))
    assert sel.skip_reason is None


def test_nothing_to_do_is_a_skip_not_an_error(tmp_path: Path) -> None:
    assert (
        resolve_selection([], None, []).skip_reason == "MODEL_DIR is not set and no PATH was given"
    )
    gone = str(tmp_path / "gone")
    assert resolve_selection([], gone, []).skip_reason == f"{gone}: does not exist"
