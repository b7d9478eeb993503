"""``preloader wait``: block until the sidecar's ``/readyz`` (or ``/startz``) answers 200."""

from __future__ import annotations

import anyio
import anyio.to_thread
import click

from .. import errors
from ..logs import get_logger
from ..settings import WaitConfig
from ..signals import StopSignals
from .options import number_option, option, timeout_option
from .outcome import WAIT_EXIT_CODES_HELP, execute

__all__ = ["wait"]


@click.command(epilog=WAIT_EXIT_CODES_HELP)
@option(
    "--url",
    envvar="PRELOADER_WAIT_URL",
    default="http://127.0.0.1:9400/readyz",
    show_default=True,
    help="The URL to poll (http or https): /readyz to start once the model is resident, "
    "/startz to start when the sidecar's start gate opens (PRELOADER_START_LEAD).",
)
@timeout_option(
    "Give up after this many seconds and exit 5 (0: wait for ever).",
    envvar="PRELOADER_WAIT_TIMEOUT",
)
@number_option("--interval", "PRELOADER_WAIT_INTERVAL", 1.0, "Seconds between polls.", least=0.05)
@click.pass_context
def wait(ctx: click.Context, url: str, timeout: float, interval: float) -> None:
    """Block until URL (default the local sidecar's /readyz) answers 200, then exit 0.

    For a server container that must not start before the model is warm, where native
    sidecars are not available: `preloader wait && exec python3 -m sglang.launch_server ...`.
    With --url .../startz the server starts when the sidecar's start gate opens
    (PRELOADER_START_LEAD seconds before the warm-up's estimated end), so its own start-up
    overlaps the warm-up; exit 0 then means "may start", not "resident". Connection
    refused, 5xx (the gates' 503), 408 and 429 mean "not yet"; any other 4xx (a wrong
    URL) exits 2 at once.
    """

    def build() -> WaitConfig:
        return WaitConfig(url=url, timeout=timeout or None, interval=interval)

    execute(ctx, build, run_wait)


def run_wait(config: WaitConfig) -> int:
    """Poll until ready, the timeout, or a signal (which ends the wait at once)."""
    from .readiness import Poll, check_url, wait_ready

    log = get_logger()
    check_url(config.url)

    def on_change(answer: Poll) -> None:
        log.info("waiting", url=config.url, status=answer.status, detail=answer.detail)

    # The poll loop blocks in a worker thread; a signal abandons it there at once.
    signals = StopSignals(grace=0, level=None)

    async def guarded() -> tuple[bool, Poll | None, errors.UsageError | None]:
        answer: Poll | None = None
        refused: errors.UsageError | None = None
        done = False
        async with signals.capture():
            try:
                answer = await anyio.to_thread.run_sync(
                    wait_ready, config, on_change, abandon_on_cancel=True
                )
            except errors.UsageError as err:  # raised outside the task group, not grouped
                refused = err
            done = True
        return done, answer, refused

    done, answer, refused = anyio.run(guarded)
    if refused is not None:
        raise refused
    if not done:
        log.warning("interrupted", url=config.url)
        return errors.EXIT_INTERRUPTED
    if answer is None:
        log.error("not ready before the timeout", url=config.url, timeout=config.timeout)
        return errors.EXIT_TIMEOUT
    log.info("ready", url=config.url, detail=answer.detail)
    return errors.EXIT_OK
