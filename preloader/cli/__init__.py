"""The command line: flags and environment in, settings built, a command run, an exit code.

Layout: :mod:`.options` declares every option once; one thin module per command family
(:mod:`.warm`; :mod:`.residency` for ``status``, ``evict``, ``plan``; :mod:`.serve`;
:mod:`.wait`; :mod:`.demo`) builds its settings and runs; :mod:`.render` prints text and
JSON; :mod:`.outcome` owns exit codes and ``--best-effort``. Only the front ends print.

The group lives in :mod:`.app`, and a command's module is imported when that command
runs (:class:`~.app.LazyGroup`): ``warm`` never loads the HTTP server, Prometheus or the
Kubernetes client. ``preloader --version`` (alone) is answered before click is imported.
Helpers only the front ends use live here too: the progress bar (:mod:`.progress`), the
readiness poll behind ``wait`` (:mod:`.readiness`), the demo model (:mod:`.demomodel`).

Import rule: the top layer; it may import every other part of the package, and nothing
imports it (``preloader/__main__.py`` excepted).
"""

from __future__ import annotations

import gc
import os
import sys
from typing import TYPE_CHECKING, Any

from .._version import __version__
from .streams import protect_streams

if TYPE_CHECKING:
    from .app import cli as cli
    from .warm import SHUTDOWN_GRACE_SECONDS as SHUTDOWN_GRACE_SECONDS
    from .warm import warm_exit_code as warm_exit_code

__all__ = ["SHUTDOWN_GRACE_SECONDS", "cli", "main", "warm_exit_code"]

# `preloader --version` as click's version option prints it, for the one call (a probe,
# a bug report) that should not pay for importing click and the option declarations.
_VERSION_ARGS = (["--version"], ["-V"])
_VERSION_LINE = f"preloader, version {__version__}\n"


def __getattr__(name: str) -> Any:
    if name == "cli":
        from .app import cli

        return cli
    if name in ("SHUTDOWN_GRACE_SECONDS", "warm_exit_code"):
        from . import warm

        return getattr(warm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Console-script entry point.

    Streams that are closed, full or broken never turn into a traceback; click's errors
    become one log line (and a JSON document under ``--json``); ``--best-effort``, asked
    for on the command line or in the environment, makes every exit 0.
    """
    # Start-up imports and declares some 40,000 objects that live until exit; collecting
    # them over and over while they are made cost 15% of start-up. Collection is back on
    # for the command's own work (:func:`end_startup`, called by ``outcome.execute``).
    gc.disable()
    protect_streams()
    args = sys.argv[1:]
    if args in _VERSION_ARGS:
        sys.stdout.write(_VERSION_LINE)
        sys.stdout.flush()
        sys.exit(0)

    import click

    from .. import errors
    from .app import cli
    from .entry import Intent, usage_error
    from .outcome import finish, request_best_effort

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
