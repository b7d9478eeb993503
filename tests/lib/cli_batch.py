"""Run many CLI invocations cheaply: ``python tests/lib/cli_batch.py < cases.jsonl``.

Each input line is ``{"args": [...], "env": {...}}``. The interpreter imports preloader
once; every case runs the real ``preloader.cli.main()`` in a forked child with its own
environment, stdout and stderr (files), so a case costs a fork instead of an interpreter
start. Each output line is ``{"code": N, "stdout": "...", "stderr": "..."}``; a child that
raised past ``main()`` (a traceback) has its traceback in stderr and code 99, a child that
ran past 20 s is killed (code -14, SIGALRM).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import traceback

# This checkout's preloader, not whichever one `pip install -e` last pointed at.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import anyio._backends._asyncio  # noqa: F401 (anyio.run imports it lazily: once here, not per case)
import click.shell_completion  # noqa: F401
import structlog.dev  # noqa: F401

import preloader.api
import preloader.cli
import preloader.cli.demomodel
import preloader.cli.readiness
import preloader.serve.server

CASE_SECONDS = 20


def _child(args: list[str], env: dict[str, str], out: str, err: str) -> None:
    code = 99
    try:
        os.environ.clear()
        os.environ.update(env)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(os.open(out, os.O_WRONLY | os.O_TRUNC), 1)
        os.dup2(os.open(err, os.O_WRONLY | os.O_TRUNC), 2)
        signal.alarm(CASE_SECONDS)
        sys.argv = ["preloader", *args]
        preloader.cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 99
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # the child exits either way
                stream.flush()
        os._exit(code)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="preloader-batch-") as scratch:
        out, err = os.path.join(scratch, "out"), os.path.join(scratch, "err")
        for line in sys.stdin:
            case = json.loads(line)
            for path in (out, err):
                open(path, "w").close()
            pid = os.fork()
            if pid == 0:
                _child(case["args"], case["env"], out, err)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            with open(out, encoding="utf-8", errors="backslashreplace") as handle:
                stdout = handle.read()
            with open(err, encoding="utf-8", errors="backslashreplace") as handle:
                stderr = handle.read()
            sys.stdout.write(json.dumps({"code": code, "stdout": stdout, "stderr": stderr}) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
