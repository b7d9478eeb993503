"""deploy/monitoring against a real Prometheus: every Grafana panel query returns data.

A real ``preloader serve --node-label`` warms a small model that holds one file the agent
may not read (a per-file read error: the errors panel plots ``preloader_errors_total``,
which has no series until something fails) and labels its node through the stand-in API
server of ``tests/lib/kubeapi.py`` (the node-label panels); the fixture waits until the label
is set, by which time ``/startz`` has opened (the start gate's panels). As root the agent
runs as uid 65534 and owns the other files, so residency is measurable. A real Prometheus
(Debian's ``prometheus``) scrapes it on loopback every second, with the ``namespace`` and
``pod`` target labels that the PodMonitor's targets carry, and the test waits (bounded
polls of the HTTP API, no sleeps) until the target is ``up`` and has been scraped five
times.

The rule each target of ``deploy/monitoring/grafana-dashboard.json`` must pass, after
Grafana's variables are resolved to concrete values:

- the expression parses and its instant query (``/api/v1/query``), evaluated at the last
  scrape, returns a non-empty result;
- every metric name it mentions has series in Prometheus, so that an ``or vector(0)`` or
  one side of a division cannot hide a name that does not exist.

Variables resolve as Grafana resolves them: ``$namespace`` and ``$pod`` by running their
own ``label_values(...)`` queries against Prometheus (each must find the one value that
the scrape attached); ``$__rate_interval`` is Grafana's ``max($__interval + scrape
interval, 4 x scrape interval)`` with ``$__interval`` at its floor, the scrape interval:
4 s here, the shortest window Grafana uses, so the strictest case for ``rate()`` and
``increase()``, which need two samples in their window.

The repository ships no recording or alerting rules (nothing for ``promtool check
rules``); the test's scrape configuration passes ``promtool check config`` before
Prometheus starts.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from preloader.cli.demomodel import write_demo_model

from ..lib import manifests as dm
from ..lib.cli import NOBODY
from ..lib.kubeapi import KubeApi
from ..lib.prometheus import Prometheus, PrometheusError, scrape_config
from ..lib.residency import evict_tree
from ..lib.serve import Served, start_serve

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="needs Debian's prometheus package (prometheus, promtool)",
)

DASHBOARD = dm.DEPLOY / "monitoring" / "grafana-dashboard.json"
SCRAPE_INTERVAL = 1.0  # seconds
SCRAPES = 5  # scrapes to wait for before querying: more than the 4 of the shortest window
#: The target labels a PodMonitor's targets carry (the dashboard filters on them).
TARGET_LABELS = {"namespace": "preloader-test", "pod": "model-server-0"}
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")
_PROMQL_WORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "inf", "nan"}
)
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


@dataclass(frozen=True)
class Monitored:
    """Prometheus scraping the agent, and the Unix time of its last scrape."""

    prometheus: Prometheus
    at: float


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitored]:
    """A served model with one unreadable file, scraped by a real Prometheus."""
    shared = dm.shared_tmpdir("preloader-prometheus-")  # every uid may traverse it
    model = shared / "model"
    write_demo_model(str(model), 8 * 1024 * 1024, shards=4)
    unreadable = model / "tokenizer.json"
    unreadable.write_text("{}")
    unreadable.chmod(0)  # root's and unreadable to uid 65534, or the test user's mode 000
    as_root = os.geteuid() == 0
    if as_root:
        for path in [model, *model.iterdir()]:
            if path != unreadable:
                os.chown(path, NOBODY, NOBODY)  # the agent owns them: residency is known
    evict_tree(model)
    # --node-label against the stand-in API server, for the node-label panels.
    kube = KubeApi()
    kube.up()
    kubeconfig = kube.kubeconfig(shared)
    kubeconfig.chmod(0o644)  # the agent's uid reads it
    env = {"MODEL_DIR": str(model), "NODE_NAME": kube.node_name, "KUBECONFIG": str(kubeconfig)}
    server: Served = start_serve("--node-label", env=env, user=NOBODY if as_root else None)
    prometheus: Prometheus | None = None
    try:
        server.wait_for_log(lambda line: line.get("event") == "warmed")
        # /startz open and the label written: the start gate's and node-label panels.
        server.wait_for_log(lambda line: line.get("event") == "node label set")
        config = scrape_config(f"127.0.0.1:{server.port}", SCRAPE_INTERVAL, TARGET_LABELS)
        prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), config)
        prometheus.poll('up{job="preloader"} == 1')
        prometheus.poll(f'count_over_time(up{{job="preloader"}}[1h]) >= {SCRAPES}')
        (last,) = prometheus.query('timestamp(up{job="preloader"})')
        yield Monitored(prometheus, float(last["value"][1]))
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.kill()
        kube.down()


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a row's panels


def _targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (panel.get("title", f"id {panel.get('id')}"), target)
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def _substitute(text: str, values: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        assert name in values, f"template variable ${name} has no value in this test"
        return values[name]

    return _VARIABLE.sub(value, text)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, grouping label
    lists, ranges, strings, function names and keywords stripped)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    return {
        match.group()
        for match in _IDENTIFIER.finditer(expr)
        if match.group() not in _PROMQL_WORDS and not expr[match.end() :].lstrip().startswith("(")
    }


def resolve_variables(dashboard: dict[str, Any], prometheus: Prometheus) -> dict[str, str]:
    """Concrete values for the dashboard's variables, found as Grafana finds them."""
    interval = SCRAPE_INTERVAL  # Grafana's floor for $__interval: the scrape interval
    rate_interval = max(interval + SCRAPE_INTERVAL, 4 * SCRAPE_INTERVAL)
    values = {"__interval": f"{interval:g}s", "__rate_interval": f"{rate_interval:g}s"}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "datasource":
            continue  # picks the data source, appears in no expression
        assert variable["type"] == "query", f"variable {variable['name']}: {variable['type']}"
        match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", variable["definition"])
        assert match, f"variable {variable['name']}: {variable['definition']}"
        selector, label = _substitute(match.group(1), values), match.group(2)
        # Grafana's Prometheus data source asks the label values API the same question.
        found = prometheus.api(f"label/{label}/values", **{"match[]": selector})
        assert len(found) == 1, f"variable {variable['name']}: {selector} -> {found}"
        assert re.fullmatch(r"[\w-]+", found[0]), found  # no regex escaping needed
        values[variable["name"]] = found[0]
    return values


def dashboard_problems(dashboard: dict[str, Any], monitored: Monitored) -> list[str]:
    """One line per dashboard target that breaks the module's rule; ``[]`` when all pass."""
    prometheus = monitored.prometheus
    values = resolve_variables(dashboard, prometheus)
    known = set(prometheus.api("label/__name__/values"))
    problems: list[str] = []
    for title, target in _targets(dashboard):
        if not target.get("expr"):
            problems.append(f"panel {title!r} {target.get('refId')}: no expr")
            continue
        expr = _substitute(target["expr"], values)
        where = f"panel {title!r} {target.get('refId')}: {expr}"
        try:
            result = prometheus.query(expr, at=monitored.at)
        except PrometheusError as err:
            problems.append(f"{where}: {err}")
            continue
        if not result:
            problems.append(f"{where}: no data")
        missing = sorted(metric_names(expr) - known)
        if missing:
            problems.append(f"{where}: no series named {', '.join(missing)}")
    return problems


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def test_every_dashboard_query_returns_data(monitored: Monitored) -> None:
    dashboard = _dashboard()
    assert len(_targets(dashboard)) >= 10  # the panels are there to be checked
    assert dashboard_problems(dashboard, monitored) == []


def test_the_start_gate_and_the_node_labels_have_panels() -> None:
    plotted = set().union(*(metric_names(target["expr"]) for _, target in _targets(_dashboard())))
    assert {
        "preloader_start_gate_open",
        "preloader_start_lead_seconds",
        "preloader_start_estimate_seconds",
        "preloader_start_to_ready_seconds",
        "preloader_start_lead_verdict",
        "preloader_node_label",
        "preloader_kube_api_errors_total",
    } <= plotted


def test_template_variables_find_the_scraped_target(monitored: Monitored) -> None:
    values = resolve_variables(_dashboard(), monitored.prometheus)
    assert {name: values[name] for name in TARGET_LABELS} == TARGET_LABELS


def _rename_a_metric(dashboard: dict[str, Any]) -> int:
    """A typo in a metric name, in every target that uses it; return the targets edited."""
    edited = 0
    for _, target in _targets(dashboard):
        if "preloader_resident_bytes" in target["expr"]:
            target["expr"] = target["expr"].replace(
                "preloader_resident_bytes", "preloader_resident_byte"
            )
            edited += 1
    return edited


def _add_panel(dashboard: dict[str, Any], expr: str) -> int:
    target = {"refId": "Z", "expr": expr}
    dashboard["panels"].append({"id": 999, "title": "Added", "type": "stat", "targets": [target]})
    return 1


def _hide_a_missing_metric(dashboard: dict[str, Any]) -> int:
    """A name that does not exist, where ``or vector(0)`` still returns a value."""
    return _add_panel(
        dashboard, 'sum(preloader_page_faults_total{namespace=~"$namespace"}) or vector(0)'
    )


def _unparsable(dashboard: dict[str, Any]) -> int:
    return _add_panel(dashboard, 'sum(preloader_ready{pod=~"$pod"}')


@pytest.mark.parametrize(
    ("breakage", "cause"),
    [
        (_rename_a_metric, "no data"),
        (_hide_a_missing_metric, "no series named preloader_page_faults_total"),
        (_unparsable, "bad_data"),
    ],
    ids=["renamed", "behind-or-vector", "unparsable"],
)
def test_a_query_of_a_metric_that_does_not_exist_fails(
    monitored: Monitored, breakage: Callable[[dict[str, Any]], int], cause: str
) -> None:
    dashboard = copy.deepcopy(_dashboard())
    edited = breakage(dashboard)
    assert edited >= 1
    problems = dashboard_problems(dashboard, monitored)
    assert len([line for line in problems if cause in line]) == edited, problems
    # ... and only the edited targets are reported
    assert len({line.split(": ")[0] for line in problems}) == edited, problems


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (namespace, pod) (rate(a_total{namespace=~"$ns", x="b{c}"}[5m])) / b',
            {"a_total", "b"},
        ),
        ('count(up{job="x"} == 1) or on (pod) vector(0)', {"up"}),
        ("histogram_quantile(0.9, sum by (le) (rate(c_bucket[1m]))) > 1e3", {"c_bucket"}),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
