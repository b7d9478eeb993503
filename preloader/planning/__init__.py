"""The planning layer: which files to warm, in which order, cut into which chunks, within
which memory budget.

The plan's parts (:mod:`.specs`), the walk (:mod:`.walk`, :mod:`.walkorder`), model
formats (:mod:`.formats`), the columnar file table (:mod:`.filetable`), the plan
(:mod:`.planner`) and the memory budget (:mod:`.budget`). Pure over paths: it reads
metadata (``stat``, ``scandir``, index files, cgroup limits) and never a weight's bytes.

Import rule: :mod:`preloader.kernel`, the shared leaves and the standard library only;
nothing of the engine, the agent, serve or the CLI.
"""
