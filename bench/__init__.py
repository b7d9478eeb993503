"""Benchmark suite for preloader (issue 5).

Runs each scenario on a cold cache and times preloader against the reference
postStart one-liner, ``vmtouch -t`` and ``fio --direct=1`` (the device limit),
alternating A B A B in one run. Run it with ``python -m bench --help``.

The bench talks to preloader only through its command line contract
(``python -m preloader warm PATH --json``), never through its internals.
"""

__all__: list[str] = []
