"""The real CLI in a real process: contract keys, exit codes, env twins, non-root truth."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from preloader import errors

from ..lib.cli import NOBODY, cli_env, run_cli
from ..lib.marks import needs_root, needs_vmtouch
from ..lib.residency import evict_tree, vmtouch_resident

CONTRACT_KEYS = {"files", "bytes", "resident_bytes", "seconds", "errors"}


def _log_lines(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@needs_vmtouch
def test_evict_status_warm_status_round_trip(model_dir: Path) -> None:
    status = json.loads(run_cli("status", str(model_dir), "--json", check=True).stdout)
    assert status["resident_bytes"] == 0
    assert len(status["per_file"]) == status["files"] == 8

    done = run_cli("warm", str(model_dir), "--json", "-c", "2", "--chunk-size", "1MiB")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report.keys() >= CONTRACT_KEYS
    assert report["resident_bytes"] == report["bytes"] == status["bytes"]
    assert report["errors"] == 0
    assert report["exit_code"] == 0
    pages, total = vmtouch_resident(model_dir)
    assert pages == total

    after = json.loads(run_cli("status", str(model_dir), "--json", check=True).stdout)
    assert after["resident_ratio"] == 1.0

    run_cli("evict", str(model_dir), check=True)
    assert vmtouch_resident(model_dir)[0] == 0


def test_model_dir_from_the_environment_and_conc_twin(model_dir: Path) -> None:
    done = run_cli("warm", "--json", env={"MODEL_DIR": str(model_dir), "PRELOADER_CONC": "3"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["concurrency"] == 3
    assert report["paths"] == [str(model_dir)]


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({}, "MODEL_DIR is not set and no PATH was given"),
        ({"MODEL_DIR": ""}, "MODEL_DIR is not set and no PATH was given"),
        ({"MODEL_DIR": "/nonexistent/model"}, "/nonexistent/model: does not exist"),
    ],
)
def test_unset_or_missing_model_dir_skips_with_exit_0(env: dict[str, str], reason: str) -> None:
    done = run_cli("warm", "--json", env=env)
    assert done.returncode == errors.EXIT_OK
    assert json.loads(done.stdout)["skipped_reason"] == reason
    # (a MODEL_DIR that does not exist is also a warning of its own, before this line)
    skipped = [line for line in _log_lines(done.stderr) if line["event"] == "skipped"]
    assert {"event": "skipped", "reason": reason}.items() <= skipped[0].items()


def test_a_missing_explicit_path_is_a_one_line_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    done = run_cli("warm", str(missing))
    assert done.returncode == errors.EXIT_USAGE
    [line] = _log_lines(done.stderr)
    assert line["error"] == f"{missing}: no such file or directory"
    assert "Traceback" not in done.stderr


def test_best_effort_turns_every_failure_into_exit_0(tmp_path: Path) -> None:
    done = run_cli("warm", "--best-effort", str(tmp_path / "nope"))
    assert done.returncode == errors.EXIT_OK


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["-c", "many"],
            "invalid value for --concurrency: concurrency 'many': not a whole number or 'auto'",
        ),
        (
            ["-c", "0"],
            "invalid value for --concurrency: concurrency 0: must be between 1 and 1024, or 'auto'",
        ),
    ],
)
def test_bad_options_exit_2_without_a_traceback(
    model_dir: Path, args: list[str], message: str
) -> None:
    done = run_cli("warm", str(model_dir), *args)
    assert done.returncode == errors.EXIT_USAGE
    assert _log_lines(done.stderr)[0]["error"] == message
    assert "Traceback" not in done.stderr


def test_a_bad_size_is_a_click_usage_error(model_dir: Path) -> None:
    done = run_cli("warm", str(model_dir), "--chunk-size", "lots")
    assert done.returncode == errors.EXIT_USAGE
    assert "'lots' is not a size" in done.stderr


def test_read_errors_exit_3_and_name_the_file(shared_tmp: Path) -> None:
    good = shared_tmp / "good.bin"
    good.write_bytes(b"x" * 4096)
    locked = shared_tmp / "locked.bin"
    locked.write_bytes(b"y" * 4096)
    locked.chmod(0o000)
    # root would read a mode-000 file: run as an ordinary user when we can switch
    done = run_cli("warm", str(shared_tmp), "--json", user=NOBODY if os.geteuid() == 0 else None)
    assert done.returncode == errors.EXIT_READ_ERRORS, done.stderr
    report = json.loads(done.stdout)
    assert report["error_details"] == [{"path": str(locked), "cause": "Permission denied"}]
    failed = [line for line in _log_lines(done.stderr) if line["event"] == "read failed"]
    assert failed == [failed[0]] and failed[0]["path"] == str(locked)


@needs_root
def test_as_non_owner_residency_is_unknown_never_100_percent(model_dir: Path) -> None:
    """uid 65534 reading root-owned files: the read works, residency is not claimed."""
    done = run_cli("warm", str(model_dir), "--json", user=NOBODY)
    assert done.returncode == errors.EXIT_OK, done.stderr
    report = json.loads(done.stdout)
    assert report["resident_bytes"] is None
    assert report["resident_ratio"] is None
    assert "CAP_FOWNER" in report["residency_unknown_reason"]
    assert report["read_bytes"] == report["bytes"]
    # ... while the truth, seen by the owner, is that it is resident
    assert vmtouch_resident(model_dir)[0] == vmtouch_resident(model_dir)[1]

    strict = run_cli("warm", str(model_dir), "--json", "--require-verified", user=NOBODY)
    assert strict.returncode == errors.EXIT_UNVERIFIED

    status = json.loads(run_cli("status", str(model_dir), "--json", user=NOBODY).stdout)
    assert status["resident_bytes"] is None
    assert all(f["resident_bytes"] is None for f in status["per_file"])


@needs_root
def test_as_owner_without_privileges_residency_is_measured(model_dir: Path) -> None:
    for path in [model_dir, *model_dir.iterdir()]:
        os.chown(path, NOBODY, NOBODY)
    evict_tree(model_dir)
    done = run_cli("warm", str(model_dir), "--json", user=NOBODY)
    report = json.loads(done.stdout)
    assert report["resident_ratio"] == 1.0


def test_sigterm_stops_with_a_summary_and_exit_130(shared_tmp: Path) -> None:
    # 2 GiB of holes, one 1 MiB chunk at a time through the copying path: long enough
    # that the signal, sent once the first progress line shows reading has begun,
    # always lands mid-pass.
    path = shared_tmp / "sparse.bin"
    with open(path, "wb") as handle:
        handle.truncate(2 << 30)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRELOADER_")}
    env.update(PRELOADER_LOG_FORMAT="json", PRELOADER_PROGRESS_INTERVAL="0.05")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "preloader",
            "warm",
            str(path),
            "--json",
            "-c",
            "1",
            "--chunk-size",
            "1MiB",
            "--method",
            "read",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if '"progress"' in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == errors.EXIT_INTERRUPTED, err
    report = json.loads(out)
    assert report["interrupted"] is True
    assert report["read_bytes"] < report["bytes"]


def test_help_lists_every_option_with_its_environment_twin() -> None:
    done = run_cli("warm", "--help", check=True)
    for twin in [
        "PRELOADER_CONC",
        "PRELOADER_CHUNK_SIZE",
        "PRELOADER_TIMEOUT",
        "PRELOADER_BEST_EFFORT",
        "PRELOADER_MIN_RESIDENT",
        "PRELOADER_JSON",
    ]:
        assert twin in done.stdout
    assert "130 interrupted" in done.stdout


def test_version() -> None:
    from preloader import __version__

    assert run_cli("--version", check=True).stdout.strip() == f"preloader, version {__version__}"


def test_demo_runs_end_to_end(shared_tmp: Path) -> None:
    done = run_cli("demo", "--size", "4MiB", "--dir", str(shared_tmp / "demo"))
    assert done.returncode == 0, done.stderr
    assert "after evict: 0.0% resident" in done.stdout
    assert "after warm:  100.0% resident" in done.stdout


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_no_command_prints_the_help_as_text_and_exits_2(log_format: str) -> None:
    done = run_cli(env={"PRELOADER_LOG_FORMAT": log_format})
    assert done.returncode == errors.EXIT_USAGE == 2
    assert done.stdout == ""
    assert done.stderr.startswith("Usage: preloader [OPTIONS] COMMAND")
    assert "bad input" not in done.stderr and "\\n" not in done.stderr
    assert "warm" in done.stderr and "serve" in done.stderr


@pytest.mark.parametrize(
    ("command", "codes"),
    [
        ("status", {0, 1, 2, 130}),
        ("evict", {0, 1, 2, 130}),
        ("plan", {0, 1, 2, 8, 130}),
        ("demo", {0, 1, 2, 3, 130}),
        ("warm", {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 130}),
    ],
)
def test_help_lists_only_the_exit_codes_the_command_returns(command: str, codes: set[int]) -> None:
    done = run_cli(command, "--help")
    assert done.returncode == 0, done.stderr
    epilog = " ".join(done.stdout.split("Exit codes:", 1)[1].split())
    listed = {int(n) for n in re.findall(r"(?:^|, )(\d+) ", epilog)}
    assert listed == codes, epilog


@pytest.mark.parametrize("lock", [["--lock"], []])
def test_lock_with_best_effort_is_refused_not_held(model_dir: Path, lock: list[str]) -> None:
    # --best-effort is the postStart form; --lock would hold that hook until SIGTERM.
    env = cli_env({} if lock else {"PRELOADER_LOCK": "1"})
    done = subprocess.run(
        [sys.executable, "-m", "preloader", "warm", "--best-effort", *lock, str(model_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,  # a bound against the hold, never a synchronisation
    )
    assert done.returncode == 0  # --best-effort: exit 0 whatever goes wrong, bad input too
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(
        line.get("event") == "bad input" and "--lock with --best-effort" in line["error"]
        for line in lines
    ), done.stderr
    assert any(line.get("would_exit") == errors.EXIT_USAGE for line in lines), done.stderr


@pytest.mark.parametrize(
    ("args", "env", "where"),
    [
        (["warm"], {"PRELOADER_CONC": "abc"}, "PRELOADER_CONC"),
        (["warm"], {"PRELOADER_CONC": "0"}, "PRELOADER_CONC"),
        (["warm", "-c", "0"], {}, "--concurrency"),
        (["serve", "--node-label"], {"PRELOADER_MODEL_NAMES": "qwen"}, "PRELOADER_MODEL_NAMES"),
        (["serve", "--node-label", "--model-name", "qwen"], {}, "--model-name"),
    ],
)
def test_a_bad_value_names_the_variable_it_came_from(
    model_dir: Path, args: list[str], env: dict[str, str], where: str
) -> None:
    done = run_cli(*args, str(model_dir), env={"NODE_NAME": "n", **env})
    assert done.returncode == errors.EXIT_USAGE, done.stderr
    (line,) = [json.loads(x) for x in done.stderr.splitlines() if '"level": "error"' in x]
    assert line["error"].startswith(f"invalid value for {where}:"), line
