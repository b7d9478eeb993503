"""bench/http_load.py and bench/healthz_load.py still measure, at a toy size.

Not a benchmark: it asserts no timings, only that the measurement ran end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..lib.cli import REPO

TOY = ("--size", "8MiB", "--runs", "1", "--probes", "20")


def test_http_load_measures_quiet_and_loaded_first_passes(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.http_load", "--data-dir", str(tmp_path), *TOY],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["bytes"] == 8 << 20
    assert len(result["quiet_seconds"]) == len(result["loaded_seconds"]) == 1
    assert all(seconds > 0 for seconds in result["quiet_seconds"] + result["loaded_seconds"])
    assert result["probes_answered"] % 20 == 0


def test_healthz_load_probes_healthz_under_scrapes(tmp_path: Path) -> None:
    toy = ("--paths", "3", "--files", "2", "--size", "4096", "--clients", "4", "--seconds", "1")
    done = subprocess.run(
        [sys.executable, "-m", "bench.healthz_load", "--data-dir", str(tmp_path), *toy, "-n", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    [run] = result["runs"]
    assert result["paths"] == 3 and run["probes"] > 0 and run["scrapes"] > 0
    assert 0 < run["healthz_p50"] <= run["healthz_p99"] <= run["healthz_max"]
