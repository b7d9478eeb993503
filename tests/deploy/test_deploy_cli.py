"""deploy/ agrees with the code: command lines, environment names and HTTP endpoints.

Every preloader command line in the manifests (image args, zipapp calls in shell
scripts, the postStart hook) must parse with the real click CLI, and every PRELOADER_*
variable a container sets must be the envvar of an option of that command (or of the
global options); MODEL_DIR is the reference name. A command the manifests name that the
CLI lacks is a failure.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from ..lib import manifests as dm
from ..lib.serve import ready_body, start_serve

INVOCATIONS = [inv for folder in dm.OVERLAYS for inv in dm.invocations(folder, dm.render(folder))]


def _group() -> click.Group:
    from preloader import cli as cli_module

    group = cli_module.cli
    assert isinstance(group, click.Group), "expected the click group as preloader.cli.cli"
    return group


def _envvars(command: click.Command) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        envvar = getattr(param, "envvar", None)
        if isinstance(envvar, str):
            names.add(envvar)
        elif envvar:
            names.update(envvar)
    return names


def _command(name: str) -> click.Command:
    group = _group()
    command = group.get_command(click.Context(group), name)
    assert command is not None, f"`preloader {name}` is not a command of the CLI"
    return command


def test_manifests_run_the_preloader_somewhere() -> None:
    commands = {inv.argv[0] for inv in INVOCATIONS}
    assert commands == {"warm", "serve", "wait", "status"}


@pytest.mark.parametrize("invocation", INVOCATIONS, ids=lambda inv: inv.where)
def test_command_line_parses(invocation: dm.Invocation) -> None:
    name, *args = invocation.argv
    command = _command(name)
    try:
        command.make_context(name, list(args))
    except click.BadParameter as error:
        # Paths of the cluster (/mnt/oss) need not exist here; anything else is wrong.
        assert isinstance(error.param.type, click.Path), error  # type: ignore[union-attr]


@pytest.mark.parametrize("invocation", INVOCATIONS, ids=lambda inv: inv.where)
def test_environment_names_are_options_of_the_command(invocation: dm.Invocation) -> None:
    command = _command(invocation.argv[0])
    known = _envvars(command) | _envvars(_group()) | {"MODEL_DIR"}
    ours = {name for name in invocation.env if name.startswith("PRELOADER_")}
    assert ours <= known, sorted(ours - known)


def test_model_dir_and_conc_keep_the_reference_names() -> None:
    warm = _command("warm")
    assert {"MODEL_DIR", "PRELOADER_CONC"} <= _envvars(warm)


def _option(command: click.Command, envvar: str) -> click.Parameter:
    for param in command.params:
        names = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
        if envvar in names:
            return param
    raise AssertionError(f"no option with envvar {envvar}")


def test_serve_defaults_match_the_manifests() -> None:
    serve = _command("serve")
    assert str(_option(serve, "PRELOADER_PORT").default) == "9400"


def test_wait_default_url_is_the_sidecar_readyz() -> None:
    wait = _command("wait")
    assert _option(wait, "PRELOADER_WAIT_URL").default == "http://127.0.0.1:9400/readyz"


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """The real ``preloader serve``, set up through the environment as the manifests do,
    once ``/readyz`` answers 200 (the fixture fails the test when it does not in time)."""
    _command("serve")
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.safetensors").write_bytes(os.urandom(1 << 20))
    server = start_serve(env={"MODEL_DIR": str(model), "PRELOADER_RECHECK_SECONDS": "1"})
    try:
        server.poll(lambda: ready_body(server))
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.kill()


def test_probe_paths_answer_on_the_real_server(served: str) -> None:
    assert _get(served + "/healthz")[0] == 200
    status, body = _get(served + "/readyz")
    assert status == 200, body
    assert json.loads(body)["ready"] is True
    status, body = _get(served + "/status")
    assert status == 200, body
    json.loads(body)


def test_dashboard_metrics_are_exported_by_the_real_server(served: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = _get(served + "/metrics")
    assert status == 200
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    # The parser strips _total from counter family names.
    exported = families | {f + "_total" for f in families}
    dashboard = json.loads((dm.DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    used = {name for name in dm.AGREED_METRICS if name in exprs}
    assert used <= exported, sorted(used - exported)
