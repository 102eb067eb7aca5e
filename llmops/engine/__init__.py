"""The plan/apply engine: addresses, the graph, fingerprints, plans, the lock and apply.

Nothing here names a resource kind: kinds live in `llmops.providers`.
"""
