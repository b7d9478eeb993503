"""The agent layer: the long-running state machine behind ``preloader serve``.

One :class:`~.agent.Agent` per served path set, composed of a first-pass collaborator
(:mod:`.firstpass`: plan, budget, read, verify) and a keep-warm collaborator
(:mod:`.keepwarm`: measure, re-read what was lost, back off) and, with ``--lock``, a pin
keeper (:mod:`.pins`: hold the warmed pages with ``mlock``), each owning its own state;
the start gate (:mod:`.startgate`) and the immutable snapshot front ends read
(:mod:`.snapshot`). No HTTP, no printing.

Import rule: :mod:`preloader.engine`, :mod:`preloader.planning`, :mod:`preloader.kernel`,
the shared leaves and the standard library; nothing of serve or the CLI.
"""
