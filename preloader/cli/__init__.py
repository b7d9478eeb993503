"""The command line: flags and environment in, settings built, a command run, an exit code.

Layout: :mod:`.options` declares every option once; one thin module per command family
(:mod:`.warm`; :mod:`.residency` for ``status``, ``evict``, ``plan``; :mod:`.serve`;
:mod:`.wait`; :mod:`.demo`) builds its settings and runs; :mod:`.render` prints text and
JSON; :mod:`.outcome` owns exit codes and ``--best-effort``. Only the front ends print.
"""

from __future__ import annotations

import os
import sys

import click

from .. import errors
from .._version import __version__
from ..logs import configure, get_logger
from .demo import demo
from .entry import Intent, usage_error
from .environment import unknown_variables
from .options import log_options
from .outcome import EXIT_CODES_HELP, finish, request_best_effort
from .residency import evict, plan_command, status
from .serve import serve
from .streams import protect_streams
from .wait import wait
from .warm import SHUTDOWN_GRACE_SECONDS as SHUTDOWN_GRACE_SECONDS
from .warm import warm
from .warm import warm_exit_code as warm_exit_code

__all__ = ["SHUTDOWN_GRACE_SECONDS", "cli", "main", "warm_exit_code"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, "-V", "--version", prog_name="preloader")
@log_options
@click.pass_context
def cli(ctx: click.Context, log_level: str, log_format: str, debug: bool) -> None:
    """Make model weight files resident in the Linux page cache, and prove it.

    A drop-in for the postStart one-liner `find $MODEL_DIR -type f | xargs -P
    $PRELOADER_CONC cat > /dev/null`: zero-copy chunked reads, residency verified by
    cachestat(2), progress, clear errors.
    """
    configure(log_level, log_format)
    ctx.obj = {"debug": debug}
    log = get_logger()
    for name, close in unknown_variables(ctx.command, os.environ):
        log.warning("unknown environment variable; ignored", name=name, did_you_mean=close)


for _command in (warm, status, evict, plan_command, demo, serve, wait):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point.

    Streams that are closed, full or broken never turn into a traceback; click's errors
    become one log line (and a JSON document under ``--json``); ``--best-effort``, asked
    for on the command line or in the environment, makes every exit 0.
    """
    protect_streams()
    args = sys.argv[1:]
    intent = Intent.read(cli, args, os.environ)
    request_best_effort(intent.best_effort)
    try:
        result = cli.main(args=args, prog_name="preloader", standalone_mode=False)
    except click.ClickException as err:
        finish(usage_error(err, intent))
    except click.exceptions.Abort:  # Ctrl-C while click parsed
        finish(errors.EXIT_INTERRUPTED)
    # --help and --version return here; a command ends in finish() itself.
    finish(result if isinstance(result, int) else errors.EXIT_OK)
