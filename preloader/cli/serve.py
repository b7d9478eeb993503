"""``preloader serve``: the sidecar (warm, gate ``/startz`` and ``/readyz``, keep warm,
export metrics)."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import click

from ..settings import (
    SERVER_DROP_POLICIES,
    TIMEOUT_POLICIES,
    ServeConfig,
    ServerDropPolicy,
    TimeoutPolicy,
    parse_start_lead,
)
from .options import (
    NodeLabelArgs,
    ReadArgs,
    SelectionArgs,
    allow_missing_option,
    bundle,
    choice_option,
    lock_option,
    node_label_options,
    number_option,
    option,
    read_options,
    selection_options,
    start_min_rate_option,
    timeout_option,
)
from .outcome import SERVE_EXIT_CODES_HELP, execute
from .paramtypes import ListenPort

__all__ = ["serve"]


@dataclass(frozen=True)
class ServeFlags:
    """The serve options that are neither selection nor reading."""

    host: str
    port: int
    ready_ratio: float
    ready_latch: bool
    timeout: float
    timeout_policy: TimeoutPolicy
    start_lead: str
    start_min_rate: int
    recheck_seconds: float
    max_backoff: float
    on_server_drop: ServerDropPolicy
    allow_missing: bool
    lock: bool


@click.command(epilog=SERVE_EXIT_CODES_HELP)
@selection_options
@allow_missing_option
@read_options(
    chunk_help="Bytes per chunk; also the unit keep-warm measures and re-reads.",
    method_help="How to read (see warm --help).",
)
@option(
    "--host",
    envvar="PRELOADER_HOST",
    default="0.0.0.0",  # noqa: S104 - probes and scrapes come from outside the pod
    show_default=True,
    help="Address to listen on (127.0.0.1 for the pod only, :: for IPv6).",
)
@option(
    "--port",
    envvar="PRELOADER_PORT",
    type=ListenPort(),
    default=9400,
    show_default=True,
    help="Port to listen on (0: any free port, logged at start). A Kubernetes service "
    "link in PRELOADER_PORT (tcp://ADDR:PORT, from a Service named preloader) is ignored "
    "with a warning.",
)
@number_option(
    "--ready-ratio",
    "PRELOADER_READY_RATIO",
    0.99,
    "/readyz answers 200 once the first pass is over and at least this share of "
    "every path's bytes is resident.",
    least=0.0,
    most=1.0,
)
@option(
    "--ready-latch/--no-ready-latch",
    envvar="PRELOADER_READY_LATCH",
    default=True,
    show_default=True,
    help="Once ready, stay ready even if pages are lost later (the server has loaded "
    "its weights by then). --no-ready-latch makes /readyz follow residency.",
)
@timeout_option(
    "Seconds from start after which --timeout-policy decides readiness (0: no "
    "deadline). Reading goes on either way."
)
@choice_option(
    "--timeout-policy",
    "PRELOADER_TIMEOUT_POLICY",
    TIMEOUT_POLICIES,
    "ready",
    "At the deadline: 'ready' opens the gate anyway (an error log line and "
    "preloader_timed_out 1), so slow storage never blocks a rollout for ever; 'unready' "
    "keeps it closed.",
)
@option(
    "--start-lead",
    envvar="PRELOADER_START_LEAD",
    metavar="SECONDS",
    default="0",
    show_default=True,
    help="/startz (the server container's startupProbe) opens once the first pass's "
    "estimated time left (per mount, bytes left over its read rate of the last 20 s; no "
    "estimate before 0.25 s and a few chunks of reading) is at most this, so the "
    "server's own start-up overlaps the warm-up's tail; it also opens with /readyz, and "
    "at --timeout under policy 'ready'. "
    "0: together with /readyz. Set it to about the server's start-up time.",
)
@start_min_rate_option
@number_option(
    "--recheck-seconds",
    "PRELOADER_RECHECK_SECONDS",
    30.0,
    "Keep-warm: measure residency chunk by chunk this often and re-read only the "
    "chunks that lost pages (0: keep-warm off).",
)
@number_option(
    "--max-backoff",
    "PRELOADER_MAX_BACKOFF_SECONDS",
    900.0,
    "Longest keep-warm interval: while the same pages keep being lost, the interval "
    "doubles up to this (state 'degraded').",
)
@choice_option(
    "--on-server-drop",
    "PRELOADER_ON_SERVER_DROP",
    SERVER_DROP_POLICIES,
    "rewarm",
    "Files the server drops from the page cache after loading them (sglang "
    "--weight-loader-drop-cache-after-load: whole files gone with no memory pressure): "
    "'rewarm' re-reads them (a second read of the storage after every load); 'hold' "
    "leaves them alone until they are resident again. Either way /status, "
    "preloader_server_drop_detected and a log line say so.",
)
@lock_option(
    "Pin the warmed files with mmap + mlock (like vmtouch -l; each shard once read, the "
    "rest after the first pass) until SIGTERM/SIGINT, so neither memory pressure nor "
    "proactive reclaim (a DAMON pageout scheme) pages them out; a new revision's files "
    "replace the old ones' pins. Without the "
    "permission it warms and serves unpinned: one error line, /status lock.error, "
    "preloader_lock_error 1."
)
@node_label_options
@click.pass_context
@bundle("flags", ServeFlags)
def serve(
    ctx: click.Context,
    selection: SelectionArgs,
    read: ReadArgs,
    node_labels: NodeLabelArgs,
    flags: ServeFlags,
) -> None:
    """Sidecar: warm PATH (default $MODEL_DIR and --path), gate /startz and /readyz, keep warm.

    Serves /healthz (200 while the process serves), /startz (503 with a JSON reason until
    the server may start, then 200: see --start-lead), /readyz (503 with a JSON reason
    until the paths are warm, then 200), /status (JSON progress) and /metrics
    (Prometheus) on --host:--port. With MODEL_DIR unset and no path it serves and is ready at
    once (logged); a MODEL_DIR or --path root that does not exist keeps /readyz closed
    (see --allow-missing).
    SIGTERM or SIGINT stops reading, answers requests in flight and exits 0.
    """

    def build() -> ServeConfig:
        options = read.options()
        resolved = selection.resolve()
        return ServeConfig(
            selection=resolved,
            options=options,
            host=flags.host,
            port=flags.port,
            ready_ratio=flags.ready_ratio,
            ready_latch=flags.ready_latch,
            timeout=flags.timeout or None,
            timeout_policy=flags.timeout_policy,
            start_lead=parse_start_lead(flags.start_lead),
            start_min_rate=flags.start_min_rate or None,
            recheck_seconds=flags.recheck_seconds,
            max_backoff_seconds=flags.max_backoff,
            on_server_drop=flags.on_server_drop,
            node_labels=node_labels.resolve(resolved.paths),
            allow_missing=flags.allow_missing,
            lock=flags.lock,
        )

    # uvicorn, starlette and prometheus-client only for this command; imported here, while
    # start-up still runs without garbage collection (see preloader.cli.main).
    from ..serve import server

    def run(config: ServeConfig) -> int:
        node_api = None
        if config.node_labels is not None:
            from ..serve.kube.nodelabels import connect

            node_api = connect(config.node_labels)
        sock = server.bind(config.host, config.port)
        return anyio.run(server.serve, config, sock, node_api)

    execute(ctx, build, run)
