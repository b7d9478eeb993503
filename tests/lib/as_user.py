"""Run the preloader CLI as another uid: ``python tests/lib/as_user.py UID ARGS...``.

Python starts as root (the interpreter may live where only root can read), imports
everything the CLI needs, then drops to UID/GID with no supplementary groups and no
capabilities, and runs the command exactly as an unprivileged container would.
"""

import importlib
import os
import pkgutil
import sys

# This checkout's preloader, not whichever one `pip install -e` last pointed at.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import encodings.idna  # noqa: F401 (getaddrinfo encodes host names with it, lazily)

import anyio
import click
import starlette.applications
import structlog.dev  # noqa: F401
import uvicorn

import preloader.cli  # (import everything before dropping privileges)
import preloader.cli.demomodel
import preloader.serve.server

# The CLI imports each command's module (and the package its names) on first use.
for module in pkgutil.walk_packages(preloader.__path__, "preloader."):
    if module.name != "preloader.serve.kube.client":  # lightkube: only with --node-label
        importlib.import_module(module.name)

# anyio and click import modules lazily (click's usage text needs click._textwrap); load
# them all while the files are still readable.
for module in pkgutil.walk_packages(anyio.__path__, "anyio."):
    if "trio" not in module.name and "pytest" not in module.name:
        importlib.import_module(module.name)
for module in pkgutil.walk_packages(click.__path__, "click."):
    if "winconsole" not in module.name:
        importlib.import_module(module.name)
# So does uvicorn (its protocol, loop and lifespan classes): load a config as serve does.
uvicorn.Config(
    starlette.applications.Starlette(),
    http="h11",
    ws="none",
    loop="asyncio",
    lifespan="off",
    log_config=None,
).load()

# serve --node-label's client (the k8s extra), when installed: lightkube reads its
# version from importlib.metadata and httpx imports its transports lazily.
try:
    import importlib.metadata

    import preloader.serve.kube.client
except ImportError:
    pass

uid = int(sys.argv[1])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
sys.argv = ["preloader", *sys.argv[2:]]
preloader.cli.main()
