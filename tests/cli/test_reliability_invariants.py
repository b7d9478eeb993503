"""Reliability invariants (issue 12), each tested over every command and option.

The options come from the CLI's own declarations (click's parameters), so an option
added later is covered without touching this file. Values are drawn by hypothesis from
what a user can type or a pod can set: ``nan``, ``inf``, negatives, huge numbers, wrong
case, empty strings, any printable text.

- No traceback and no exit 1 (a bug) for any of them, as a flag or as the environment
  twin; only documented exit codes.
- ``--best-effort`` (flag or environment): exit 0 for all of them, with the reason on
  stderr.
- Nothing outside the roots is read, nothing is written (FUSE fixture as the outside
  world: it logs every open and read, and every attempt to change it).
- Every HTTP endpoint answers in every state the agent can reach.
- A signal stops every command while it plans, with the walk hanging on storage.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preloader import errors
from preloader.cli.app import cli

from ..lib.cli import REPO, CliProcess, cli_env, run_cli
from ..lib.fusefs import FuseMount
from ..lib.marks import needs_fuse
from ..lib.residency import evict_tree
from ..lib.serve import Served, track

Snapshot = Callable[[Path], Path]

DOCUMENTED = {0, 2, 3, 4, 5, 6, 7, 8, 9, 130}
# Commands that finish on their own with any option (serve runs until a signal; demo
# writes as much as --size says; --lock holds the pages until a signal).
FINITE = ("warm", "status", "evict", "plan")
NEVER_DRAWN = {"paths", "lock", "model_dir", "env_paths"}

NASTY = [
    "nan",
    "NaN",
    "-nan",
    "inf",
    "-inf",
    "1e400",
    "-1",
    "0",
    "-0",
    "1.5",
    "",
    " ",
    "abc",
    "99999999999999999999999",
    "0x10",
    "Sendfile",
    "INFO",
    "TRUE",
    "yes please",
    "64MiB",
    "-64MiB",
    "200%",
    "*",
    "[",
]
TEXT = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x00"), max_size=12
)
VALUES = st.one_of(st.sampled_from(NASTY), TEXT)
SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


def _options(command: str) -> list[click.Option]:
    params = cli.load_all()[command].params
    return [p for p in params if isinstance(p, click.Option) and p.name not in NEVER_DRAWN]


def _env_twins(command: str) -> list[str]:
    names = []
    for param in [*cli.params, *cli.commands[command].params]:
        envvar = param.envvar if isinstance(param, click.Option) else None
        if isinstance(envvar, str) and envvar.startswith("PRELOADER_"):
            names.append(envvar)
    return [n for n in names if n not in ("PRELOADER_LOG_FORMAT", "PRELOADER_PATHS")]


def _flag_args(option: click.Option, value: str) -> list[str]:
    name = max(option.opts, key=len)
    if option.is_flag:
        return [name]
    return [f"{name}={value}"] if name.startswith("--") else [name, value]


def _check(done: subprocess.CompletedProcess[str], best_effort: bool = False) -> None:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode in DOCUMENTED, (done.returncode, done.stderr[-3000:])
    if best_effort:
        assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture
def small_model(shared_tmp: Path) -> Path:
    root = shared_tmp / "model"
    root.mkdir()
    (root / "config.json").write_bytes(b"{}")
    (root / "model.safetensors").write_bytes(os.urandom(64 * 1024))
    evict_tree(root)
    return root


# ------------------------------------------------------ any input: documented exit codes

BATCH = str(Path(__file__).parents[1] / "lib" / "cli_batch.py")
# Every option gets these, by what it takes, as a flag and as its environment twin.
NUMBER_VALUES = ["nan", "inf", "-1", "", "abc", "99999999999999999999"]
TEXT_VALUES = ["", "nan", "[", "abc"]
SWITCH_VALUES = ["", "abc", "INFO", "2"]  # for a flag's environment twin


def _values(option: click.Option) -> list[str]:
    if option.is_flag:
        return SWITCH_VALUES
    if isinstance(option.type, click.Choice):
        return ["", "abc", str(option.type.choices[0]).upper()]
    if isinstance(option.type, click.types.StringParamType | click.Path):
        return TEXT_VALUES
    return NUMBER_VALUES


# serve and wait would run until a signal with good values: these keep them finite (an
# address nobody can bind; a port where nothing listens; a short deadline).
BOUNDED = {
    "serve": {"host": ["--host", "256.0.0.1"]},
    "wait": {"url": ["--url", "OK_URL"], "timeout": ["--timeout", "0.2"]},
}
SKIP = {("serve", "host")}  # a good address would serve for ever; bind errors: test_server


def _batch(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the cases through tests/lib/cli_batch.py (one interpreter, one fork a case)."""
    lines = "".join(json.dumps(case) + "\n" for case in cases)
    done = subprocess.run(
        [sys.executable, BATCH],
        input=lines,
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60 + 30 * len(cases),
        check=True,
    )
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(cases), done.stderr[-3000:]
    return results


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def ok_url() -> Iterator[str]:
    """A /readyz that answers 200 at once, so `wait` with any good value ends."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/readyz"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _cases(command: str, best_effort: bool, root: Path, ok_url: str = "") -> list[dict[str, Any]]:
    cases = []
    # The global options once, with warm (they are parsed the same before any command).
    group = [p for p in cli.params if isinstance(p, click.Option) and p.name != "version"]
    options = [(True, p) for p in group if command == "warm"]
    options += [(False, p) for p in _options(command)]
    extra = {"PRELOADER_BEST_EFFORT": "1"} if best_effort else {}
    for is_group, option in options:
        if (command, option.name) in SKIP:
            continue
        bounded = {k: v for k, v in BOUNDED.get(command, {}).items() if k != option.name}
        base = [ok_url if arg == "OK_URL" else arg for pair in bounded.values() for arg in pair]
        base += [str(root)] if command in FINITE else []
        flags = [_flag_args(option, "")] if option.is_flag else []
        flags += [] if option.is_flag else [_flag_args(option, v) for v in _values(option)]
        for flag in flags:
            args = [*flag, command, *base] if is_group else [command, *flag, *base]
            cases.append({"args": args, "env": cli_env(extra), "what": " ".join(flag)})
        if isinstance(option.envvar, str):
            for value in _values(option):
                env = cli_env({**extra, option.envvar: value})
                what = f"{option.envvar}={value}"
                cases.append({"args": [command, *base], "env": env, "what": what})
    return cases


@pytest.mark.parametrize("command", [*FINITE, "serve", "wait"])
def test_every_option_with_any_value_gives_a_documented_exit_code(
    small_model: Path, ok_url: str, command: str
) -> None:
    cases = _cases(command, best_effort=False, root=small_model, ok_url=ok_url)
    bad = [
        (case["what"], case["args"], result["code"], result["stderr"][-600:])
        for case, result in zip(cases, _batch(cases), strict=True)
        if result["code"] not in DOCUMENTED or "Traceback" in result["stderr"]
    ]
    assert not bad, bad[:5]


def test_best_effort_exits_0_for_every_option_with_any_value(small_model: Path) -> None:
    cases = _cases("warm", best_effort=True, root=small_model)
    for case in cases[::2]:  # the flag form half of the time
        case["env"].pop("PRELOADER_BEST_EFFORT")
        case["args"].insert(case["args"].index("warm") + 1, "--best-effort")
        case["what"] += " --best-effort"
    results = _batch(cases)
    bad = [
        (case["what"], case["args"], result["code"], result["stderr"][-600:])
        for case, result in zip(cases, results, strict=True)
        if result["code"] != 0 or "Traceback" in result["stderr"]
    ]
    assert not bad, bad[:5]
    # The reason still reaches the log: every refused value is named on stderr.
    for case, result in zip(cases, results, strict=True):
        if "bad input" in result["stderr"]:
            assert "best effort" in result["stderr"], (case["what"], result["stderr"])


@SETTINGS
@given(data=st.data())
def test_any_text_in_any_warm_option_gives_a_documented_exit_code(
    small_model: Path, data: st.DataObject
) -> None:
    option = data.draw(st.sampled_from(_options("warm")), label="option")
    value = data.draw(VALUES, label="value")
    via_env = data.draw(st.booleans(), label="from the environment") and bool(option.envvar)
    if via_env and isinstance(option.envvar, str):
        done = run_cli("warm", str(small_model), env={option.envvar: value})
    else:
        done = run_cli("warm", *_flag_args(option, value), str(small_model))
    _check(done)


@pytest.mark.parametrize(
    "redirect",
    [">&-", "2>&-", ">&- 2>&-", ">/dev/full", "2>/dev/full", "| head -c1"],
    ids=["stdout closed", "stderr closed", "both closed", "stdout full", "stderr full", "pipe"],
)
@pytest.mark.parametrize("best_effort", [False, True], ids=["plain", "best-effort"])
def test_closed_or_full_outputs_never_give_a_traceback(
    small_model: Path, redirect: str, best_effort: bool
) -> None:
    flags = "--best-effort " if best_effort else ""
    status = "" if "head" not in redirect else "; exit ${PIPESTATUS[0]}"
    script = (
        f'"{sys.executable}" -m preloader warm --json {flags}"{small_model}" {redirect}{status}'
    )
    done = subprocess.run(
        ["bash", "-c", script, "preloader"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
        cwd=REPO,
    )
    assert "Traceback" not in done.stderr
    if best_effort:
        assert done.returncode == 0, done.stderr
    else:
        assert done.returncode in DOCUMENTED, done.stderr


# ------------------------------------------------------ nothing outside read, nothing written


@needs_fuse
@pytest.mark.parametrize("command", [*FINITE, "serve"])
def test_nothing_outside_the_roots_is_read_and_nothing_is_written(
    shared_tmp: Path,
    served: list[Served],
    fuse_fs: Callable[..., FuseMount],
    unchanged: Snapshot,
    command: str,
) -> None:
    outside = fuse_fs({"files": {"secret.bin": {"size": 8192}, "d/inner.bin": {"size": 4096}}})
    model = shared_tmp / "model"
    model.mkdir()
    (model / "config.json").write_bytes(b"{}")
    (model / "model.safetensors").write_bytes(os.urandom(64 * 1024))
    os.symlink(outside.path("secret.bin"), model / "secret.safetensors")
    os.symlink(outside.path("d"), model / "weights")
    os.symlink(outside.mountpoint, model / "mnt")
    unchanged(model)
    if command == "serve":
        server = track(served, str(model), "--recheck-seconds", "0")
        server.wait_for_log(lambda entry: entry.get("event") == "warmed")
        assert server.stop()[0] == 0
    else:
        done = run_cli(command, str(model))
        _check(done)
        assert done.returncode == 0, done.stderr
    assert outside.events("OPEN") == [] and outside.events("READ") == []
    assert outside.events("MUTATE") == []


# ------------------------------------------------------ every endpoint, every state


def _all_endpoints_answer(server: Served) -> dict[str, Any]:
    for path in ("/healthz", "/readyz", "/status", "/metrics"):
        status, body = server.request(path)
        assert status in (200, 503) if path == "/readyz" else status == 200, (path, body)
        body.decode("utf-8")
    _, document = server.json("/status")
    return dict(document)


@needs_fuse
@pytest.mark.parametrize(
    ("state", "spec"),
    [
        ("planning", {"files": {"config.json": {"size": 10}}, "stall_readdir": ["/"]}),
        ("warming", {"files": {"model.safetensors": {"size": 1 << 20, "gate_from": 0}}}),
        ("verifying", {"files": {"model.safetensors": {"size": 8192, "stall_open": 2}}}),
        ("ready", {"files": {"model.safetensors": {"size": 8192}}}),
        ("degraded", {"cache": "drop", "files": {"model.safetensors": {"size": 8192}}}),
        (
            "failed",
            {"files": {"model-00001-of-00002.gguf": {"size": 4096}}},  # a split set lacking a part
        ),
    ],
)
def test_every_endpoint_answers_in_every_state(
    served: list[Served], fuse_fs: Callable[..., FuseMount], state: str, spec: dict[str, Any]
) -> None:
    """(``served`` before ``fuse_fs``: a server stuck in a FUSE request can only be reaped
    once the filesystem is gone, so the mount is torn down first.)"""
    fs = fuse_fs(spec)
    server = track(served, str(fs.mountpoint), "--recheck-seconds", "0", "--read-timeout", "60")
    if state == "planning":
        fs.wait_for("STALL readdir /")
    elif state == "warming":
        fs.wait_for("GATE read")
    elif state == "verifying":
        fs.wait_for("STALL open")
    else:
        server.wait_for_log(lambda entry: entry.get("event") in ("warmed", "failed"))
    document = _all_endpoints_answer(server)
    if state in ("planning", "warming", "verifying"):
        assert document["state"] == state
    if state == "warming":
        fs.release()


def test_every_endpoint_answers_with_nothing_to_serve(served: list[Served]) -> None:
    server = track(served)  # MODEL_DIR unset: nothing to serve, ready at once
    document = _all_endpoints_answer(server)
    assert document["ready"] and document["skip_reason"]


def test_every_endpoint_answers_with_a_missing_model_dir(served: list[Served]) -> None:
    server = track(served, env={"MODEL_DIR": "/nonexistent/model"})
    document = _all_endpoints_answer(server)
    assert not document["ready"] and document["missing_paths"] == ["/nonexistent/model"]


# ------------------------------------------------------ a signal stops every command


@needs_fuse
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("command", [*FINITE, "serve"])
def test_a_signal_stops_every_command_while_it_plans(
    fuse_fs: Callable[..., FuseMount],
    start_cli: Callable[..., CliProcess],
    command: str,
    name: str,
) -> None:
    """The walk hangs in a ``readdir`` the filesystem never answers. The command must
    notice the signal and report (the ``stopping`` log line, bounded wait); its exit status
    then comes once the filesystem goes (a thread in such a request cannot be ended, see
    README "Signals")."""
    fs = fuse_fs({"files": {"config.json": {"size": 10}}, "stall_readdir": ["/"]})
    args = [command, str(fs.mountpoint)]
    env = {"PRELOADER_HOST": "127.0.0.1", "PRELOADER_PORT": "0"} if command == "serve" else {}
    run = start_cli(*args, env=env)
    fs.wait_for("STALL readdir /")
    run.signal(getattr(signal, name))
    line = run.wait_for("stopping", timeout=30)
    assert line["signal"] == name
    fs.__exit__(None, None, None)
    code, _ = run.finish(timeout=30)
    expected = errors.EXIT_OK if command == "serve" else errors.EXIT_INTERRUPTED
    assert code == expected, run.stderr_lines
    assert "Traceback" not in "\n".join(run.stderr_lines)


def test_the_invariant_lists_cover_every_command() -> None:
    """A new command must be placed in one of the lists above (or here, with why)."""
    covered = {*FINITE, "serve", "wait", "demo"}  # demo: tests/cli/test_reliability_defects.py
    assert set(cli.commands) <= covered, set(cli.commands) - covered
    assert json.dumps(sorted(DOCUMENTED))
