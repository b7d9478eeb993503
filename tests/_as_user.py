"""Run the preloader CLI as another uid: ``python _as_user.py UID ARGS...``.

Python starts as root (the interpreter may live where only root can read), imports
everything the CLI needs, then drops to UID/GID with no supplementary groups and no
capabilities, and runs the command exactly as an unprivileged container would.
"""

import importlib
import os
import pkgutil
import sys

import anyio
import structlog.dev  # noqa: F401

import preloader.cli  # (import everything before dropping privileges)
import preloader.demo

# anyio imports its modules lazily; load them all while the files are still readable.
for module in pkgutil.walk_packages(anyio.__path__, "anyio."):
    if "trio" not in module.name and "pytest" not in module.name:
        importlib.import_module(module.name)

uid = int(sys.argv[1])
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
sys.argv = ["preloader", *sys.argv[2:]]
preloader.cli.main()
