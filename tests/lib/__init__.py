"""Helpers the test modules share (fixtures are in tests/conftest.py).

``cli`` runs the real CLI in child processes; ``serve`` runs ``preloader serve`` and speaks
HTTP to it; ``residency`` evicts a test's own files and asks vmtouch and fincore;
``marks`` holds the skip conditions; ``trees`` snapshots a tree; ``net`` finds a free
port; ``fusefs`` is the failing FUSE filesystem; ``kubeapi`` the stand-in Kubernetes API
server; ``prometheus`` a real Prometheus; ``manifests`` renders and reads deploy/.
``as_user`` and ``cli_batch`` are scripts the helpers run as child processes.
"""
