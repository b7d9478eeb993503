"""The end-to-end scenario on a GPU: ranks move their slices to ``cuda:R``.

This is :mod:`bench.e2e` (same storages, modes, loader and report) with
``--e2e-device cuda --e2e-framework pt``: rank R of the server-like loader
copies its 1/N slice of every tensor to ``cuda:R`` (R modulo the GPU count) and
synchronises before it counts as loaded; its start-up also creates the CUDA
context. Results go to ``bench/results/gpu/`` unless ``--out`` says otherwise.

Run: ``sudo python -m bench.gpu_e2e [any python -m bench flag]``, e.g.
``--e2e-ranks 1,4,8 -n 3``. Needs torch with CUDA. ``--e2e-device cpu`` runs
the same path on the CPU, which is how it is tested on machines without a GPU.
"""

import sys

from . import run

__all__ = ["main"]


def _have_torch_cuda() -> bool:
    try:
        import torch  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def main(argv: list[str] | None = None) -> int:
    """Run the e2e scenario with slices on the GPU (or ``--e2e-device cpu``).

    :param argv: ``python -m bench`` flags, without the program name.
    :return: the bench's exit status; 2 when CUDA is wanted but absent.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    device = "cuda"
    if "--e2e-device" in args[:-1]:
        device = args[args.index("--e2e-device") + 1]
    if device == "cuda" and not _have_torch_cuda():
        print(
            "gpu_e2e: torch with CUDA is not available (--e2e-device cpu runs it on the CPU)",
            file=sys.stderr,
        )
        return 2
    base = ["--scenarios", "e2e", "--e2e-device", device]
    if device == "cuda":
        base += ["--e2e-framework", "pt"]
    if "--out" not in args:
        base += ["--out", str(run.REPO_ROOT / "bench" / "results" / "gpu")]
    return run.main(base + args)  # later flags win: the caller's override ours


if __name__ == "__main__":
    sys.exit(main())
