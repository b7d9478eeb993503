"""Kubernetes: node labels and Events for ``serve --node-label``.

The protocol the labeler needs (:mod:`.api`, standard library only), the labeler
(:mod:`.nodelabels`), and the lightkube implementation (:mod:`.client`), which only
:func:`.nodelabels.connect` imports.

Import rule: part of the serve layer: it may import the agent and below, never the CLI;
:mod:`.api` and :mod:`.nodelabels` never import :mod:`.client` at module level.
"""
