"""The kernel layer: what Linux says and does about the page cache, as plain functions.

Page-cache syscalls (``cachestat``, ``mincore``, ``fadvise``, ``readahead``:
:mod:`.pagecache`), the read methods (:mod:`.fileread`), ``/proc`` and cgroup readers with
the one mount table (:mod:`.procfs`, :mod:`.cgroups`), pinning (:mod:`.pinning`) and
proactive-reclaim detection (:mod:`.reclaim`). Synchronous, no event loop.

Import rule: the standard library and the shared leaves (:mod:`preloader.settings`,
:mod:`preloader.errors`, :mod:`preloader.units`) only; nothing of the layers above and
no third-party package (``lint-imports`` checks both).
"""
