"""The engine layer: read a plan into the page cache and prove what is resident.

The pass (:mod:`.warm`) over the stream schedule (:mod:`.schedule`), the reading and its
fallbacks (:mod:`.reading`, :mod:`.prefetch`, :mod:`.holes`), residency and eviction
(:mod:`.residency`), verification after a pass (:mod:`.verify`), per-file bookkeeping
(:mod:`.ledger`), the reports (:mod:`.reports`), events (:mod:`.events`) and keep-warm's
measure and re-read (:mod:`.keepwarm`). Async over worker threads; it never prints: it
updates a :class:`~.reports.WarmProgress` and calls an event callback.

Import rule: :mod:`preloader.planning`, :mod:`preloader.kernel`, the shared leaves and
third-party runtime libraries (anyio); nothing of the agent, serve or the CLI.
"""
