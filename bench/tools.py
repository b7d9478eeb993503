"""The competitors: how each is started on a tree, and whether it applies."""

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .scenarios import Scenario

__all__ = ["ONE_LINER", "Tool", "build_tools", "fio_block_size", "preloader_argv"]

# The reference postStart hook, verbatim, with PRELOADER_CONC's default of 4.
ONE_LINER = (
    """find "$MODEL_DIR" -type f -print0 | """
    """xargs -0 -I {} -P "$PRELOADER_CONC" sh -c 'cat "{}" > /dev/null'"""
)


@dataclass(frozen=True)
class Tool:
    """One competitor."""

    name: str  # stable key in raw results
    label: str  # what the tables show
    family: str  # "one-liner", "vmtouch", "fio", "s3-direct", "engine-prefetch" or "preloader"
    concurrency: str | None = None  # preloader's -c value; None: its default

    def applies_to(self, scenario: Scenario) -> bool:
        """Whether this tool runs on *scenario*.

        fio measures only the local device, and the direct S3 fetch only the server
        behind an s3fs scenario.
        """
        if self.family == "fio":
            return scenario.local
        if self.family == "s3-direct":
            return scenario.kind == "s3fs"
        return True

    def argv(self, target: Path, median_file_bytes: int = 0, s3_url: str = "") -> list[str]:
        """Return the command that reads every file under *target* once.

        :param target: the model directory.
        :param median_file_bytes: the tree's median file size; fio cannot read a file
            smaller than its block size, so its block is the largest power of two that
            fits the median file, at most 4 MiB.
        :param s3_url: the S3 server behind the s3fs mount (the direct fetch's source).
        :return: the argv.
        """
        if self.family == "one-liner":
            return ["sh", "-c", f'MODEL_DIR="$1" PRELOADER_CONC=4; {ONE_LINER}', "sh", str(target)]
        if self.family == "vmtouch":
            # -m: vmtouch skips files over 500M by default, which would flatter it.
            return ["vmtouch", "-q", "-t", "-m", "1024G", str(target)]
        if self.family == "fio":
            return [
                "fio",
                "--name=device-limit",
                f"--opendir={target}",
                "--rw=read",
                "--direct=1",
                f"--bs={fio_block_size(median_file_bytes)}",
                "--ioengine=libaio",
                "--iodepth=32",
                "--openfiles=256",  # a tree of 20,000 files would exhaust the fd limit
                "--output-format=json",
            ]
        if self.family == "s3-direct":
            # The same objects (bucket "models", prefix "model/"), straight from the server.
            return [sys.executable, "-m", "bench.s3get", s3_url, "models", "model/"]
        if self.family == "engine-prefetch":
            # vLLM's and SGLang's page-cache prefetch, one rank: a file a thread, 16 MiB reads.
            return [sys.executable, "-m", "bench.loader", str(target), "--prefetch-only"]
        return preloader_argv(target, self.concurrency)


def fio_block_size(median_file_bytes: int) -> int:
    """Return fio's block size: a power of two, 4 KiB to 4 MiB, no larger than the median file.

    :param median_file_bytes: the tree's median file size (0: unknown, use 4 MiB).
    :return: bytes.
    """
    if median_file_bytes <= 0:
        return 4 * 2**20
    block = 4096
    while block * 2 <= min(median_file_bytes, 4 * 2**20):
        block *= 2
    return block


def preloader_argv(target: Path, concurrency: str | None) -> list[str]:
    """Return ``python -m preloader warm TARGET --json [-c N]``, the contract's command.

    :param target: the model directory.
    :param concurrency: ``-c`` value, or ``None`` for preloader's default.
    :return: the argv.
    """
    argv = [sys.executable, "-m", "preloader", "warm", str(target), "--json"]
    if concurrency is not None:
        argv += ["-c", concurrency]
    return argv


def build_tools(sweep: list[str], with_auto: bool, only: set[str] | None) -> list[Tool]:
    """Return the competitors in their A B A B order.

    :param sweep: extra preloader ``-c`` values besides the default.
    :param with_auto: include ``-c auto``.
    :param only: keep just these families or names (``None``: all).
    :return: the tools that exist on this machine.
    """
    tools = [
        Tool("one-liner", "one-liner (cat, -P 4)", "one-liner"),
        Tool("vmtouch", "vmtouch -t", "vmtouch"),
        Tool("fio", "fio --direct=1 (device)", "fio"),
        Tool("s3-direct", "range GETs, 16 connections (network)", "s3-direct"),
        Tool("engine-prefetch", "engines' prefetch (4 threads, 16 MiB)", "engine-prefetch"),
        Tool("preloader", "preloader (default)", "preloader"),
    ]
    tools += [
        Tool(f"preloader-c{value}", f"preloader -c {value}", "preloader", value) for value in sweep
    ]
    if with_auto:
        tools.append(Tool("preloader-auto", "preloader -c auto", "preloader", "auto"))
    if only is not None:
        tools = [tool for tool in tools if tool.family in only or tool.name in only]
    return [tool for tool in tools if tool.family != "fio" or shutil.which("fio")]
