"""``preloader demo``: a synthetic model, evicted, warmed, measured, removed."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import anyio
import click

from .. import api, errors
from ..logs import get_logger
from ..settings import parse_concurrency
from ..units import format_bytes
from . import render
from .options import bundle, concurrency_option, option
from .outcome import DEMO_EXIT_CODES_HELP, execute
from .paramtypes import Size

__all__ = ["demo"]


@dataclass(frozen=True)
class DemoFlags:
    """``demo``'s options: the synthetic model's size and folder, and how to warm it.

    :ivar keep: leave the model on disk afterwards.
    """

    size: int
    directory: str | None
    keep: bool
    concurrency: str


@click.command(epilog=DEMO_EXIT_CODES_HELP)
@option(
    "--size",
    envvar="PRELOADER_DEMO_SIZE",
    type=Size(),
    default="1GiB",
    show_default=True,
    help="Total bytes of the synthetic model.",
)
@option(
    "--dir",
    "directory",
    envvar="PRELOADER_DEMO_DIR",
    type=click.Path(file_okay=False),
    help="Where to write it (default: a new folder under /var/tmp, which is disk-backed "
    "where /tmp may be tmpfs and always resident).",
)
@click.option("--keep", is_flag=True, help="Keep the demo model instead of deleting it.")
@concurrency_option("As for warm.")
@click.pass_context
@bundle("flags", DemoFlags)
def demo(ctx: click.Context, flags: DemoFlags) -> None:
    """Build a synthetic safetensors model, evict it, warm it, show residency, clean up."""
    execute(ctx, lambda: flags, _run_demo)


def _run_demo(flags: DemoFlags) -> int:
    from .demomodel import claim_directory, write_demo_model

    log = get_logger()
    conc = parse_concurrency(flags.concurrency)
    directory = flags.directory
    if directory is None:
        base = "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()
        directory = tempfile.mkdtemp(prefix="preloader-demo-", dir=base)
    else:
        claim_directory(directory)  # refuses a folder that exists: never writes into it
    try:
        log.info("writing demo model", dir=directory, size=format_bytes(flags.size))
        write_demo_model(directory, flags.size)
        before = anyio.run(lambda: api.evict([directory]))
        click.echo(f"after evict: {render.ratio_text(before)} resident")
        report = anyio.run(lambda: api.warm([directory], concurrency=conc))
        rate = report.read_bytes / report.seconds if report.seconds > 0 else 0.0
        after = anyio.run(lambda: api.residency([directory]))
        click.echo(
            f"warmed {len(report.files)} files, {format_bytes(report.bytes)} in "
            f"{report.seconds:.2f} s ({format_bytes(rate)}/s, {report.cpu_seconds:.2f} CPU-s)"
        )
        click.echo(f"after warm:  {render.ratio_text(after)} resident")
        for line in render.residency_lines(after, per_file=True):
            click.echo(line)
        return errors.EXIT_OK if not report.errors else errors.EXIT_READ_ERRORS
    finally:
        if flags.keep:
            click.echo(f"kept demo model in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
