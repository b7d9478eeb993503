"""The serve layer: ``preloader serve``'s HTTP side over an :class:`~preloader.agent.agent.Agent`.

The ASGI application (:mod:`.app`) apart from the process lifecycle (:mod:`.server`:
bind, run the agent and uvicorn, signals, shutdown), the Prometheus collector
(:mod:`.metrics`) and the Kubernetes node labeler (:mod:`.kube`).

Import rule: may import the agent and everything below it; nothing of the CLI. Only the
``serve`` command loads this package: ``warm``, ``status``, ``evict`` and ``plan`` never
do (``tests/test_startup.py``).
"""
