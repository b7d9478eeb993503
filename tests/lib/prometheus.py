"""A real Prometheus (Debian's ``prometheus``) on loopback, spoken to over its HTTP API.

It runs with a temporary configuration and storage folder, scrapes the targets it is
given and is stopped (SIGTERM, then SIGKILL) by :meth:`Prometheus.stop`, which the
fixtures call in ``finally`` whatever the test did.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from .net import free_port

DEADLINE = 60.0  # seconds; a bound against hangs, never a synchronisation
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def scrape_config(
    target: str, interval: float, labels: dict[str, str], job: str = "preloader"
) -> dict[str, Any]:
    """A Prometheus configuration that scrapes ``target`` (host:port) every ``interval``
    seconds and attaches ``labels`` to its series, as a PodMonitor's target labels are."""
    seconds = f"{interval:g}s"
    return {
        "global": {"scrape_interval": seconds, "scrape_timeout": seconds},
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target], "labels": labels}],
            }
        ],
    }


class PrometheusError(AssertionError):
    """Prometheus answered a query with an error (bad PromQL, for example)."""


class Prometheus:
    """One Prometheus process; ``config`` is written to ``workdir`` before it starts.

    :param workdir: an empty folder for the configuration, the TSDB and the log.
    :param config: the configuration (see :func:`scrape_config`).
    :raises AssertionError: when ``promtool check config`` rejects the configuration or
        Prometheus does not answer ``/-/ready`` within :data:`DEADLINE`.
    """

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.config_file = workdir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config))
        check = subprocess.run(
            ["promtool", "check", "config", str(self.config_file)],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        self.port = free_port()
        self.log_file = workdir / "prometheus.log"
        with open(self.log_file, "w") as log:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={self.config_file}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        end = time.monotonic() + DEADLINE
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}: {self.log()}")
            try:
                with _DIRECT.open(f"{self.url}/-/ready", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > end:
                raise AssertionError(f"prometheus not ready within {DEADLINE} s: {self.log()}")
            time.sleep(0.1)  # the polling period, not a synchronisation

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")[-4000:]

    def api(self, endpoint: str, **params: str | list[str]) -> Any:
        """GET ``/api/v1/<endpoint>``; return its ``data``.

        :raises PrometheusError: with Prometheus' ``errorType`` and ``error``.
        """
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with _DIRECT.open(f"{self.url}/api/v1/{endpoint}?{query}", timeout=30) as response:
                body = json.load(response)
        except urllib.error.HTTPError as err:
            with err:
                body = json.load(err)
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query (``/api/v1/query``), evaluated at ``at`` (Unix time) or now."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self.api("query", **params)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        assert isinstance(result, list)
        return result

    def poll(self, expr: str) -> list[dict[str, Any]]:
        """Query ``expr`` until its result is non-empty (bounded); return the result."""
        end = time.monotonic() + DEADLINE
        while True:
            result = self.query(expr)
            if result:
                return result
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"{expr!r} stayed empty for {DEADLINE} s: {self.log()}")
            time.sleep(0.2)  # the polling period, not a synchronisation

    def stop(self) -> None:
        """Stop Prometheus (SIGTERM, SIGKILL after :data:`DEADLINE`); safe to call twice."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
