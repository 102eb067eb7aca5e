"""The preflight of providers whose resources live in MLflow (runs, model and prompt registry).

A provider mixes `TrackingStore` in ahead of `Provider`; the generic contract
(`Provider.preflight`, `Provider.check_live`) knows nothing of MLflow.
"""

from __future__ import annotations


class TrackingStore:
    """`preflight`: the tracking and registry stores open (a local SQLite store gets its
    schema). `check_live`: both answer within seconds, before a plan reads live state."""

    def preflight(self) -> None:
        from llmops.integrations.mlflow import check_store

        check_store(self.ctx.root, self.ctx.settings)

    def check_live(self) -> None:
        from llmops.integrations.mlflow import check_reachable, registry_uri, tracking_uri

        check_reachable(tracking_uri(self.ctx.root, self.ctx.settings))
        check_reachable(registry_uri(self.ctx.root, self.ctx.settings))
