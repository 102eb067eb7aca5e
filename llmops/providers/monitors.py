"""Monitors: a deployment's request store, and the settings its server logs with.

A monitor (`monitors.NAME`) watches the deployment of the same name (or `deployment:`).
Its apply makes sure the request store exists and records where it is. The deployment's
server logs to it because serving control (`llmops.serve.control.start_deployment`) asks
`serving_monitor` (in `llmops.monitor.spec`, below both providers) which store to pass.
A monitor never starts or stops a server: when a running server logs with other settings
than llmops.yaml now asks (a monitor added, removed or moved, `store` or `log_text`
changed), the deployment's refresh reports `request-log` drift and the deployment's apply
restarts it. The monitor's checks themselves run with `llmops monitor`; their open alerts
are shown by plan (`alerts`).
"""

from __future__ import annotations

from typing import Any

from llmops.errors import ProviderError
from llmops.engine.lockfile import LockedResource
from llmops.monitor.spec import monitor_deployment, recorded_store, serving_monitor
from llmops.providers.base import ApplyRequest, ApplyResult, Provider


class MonitorsProvider(Provider):
    kind = "monitors"
    heavy_modules = ()
    # Nothing is rebuilt: every change (and an upstream deployment's) is applied in place.
    in_place_fields = frozenset({"deployment", "window", "drift", "feedback", "latency", "error_rate_max",
                                 "suspicious", "log_text", "store", "webhook", "webhook_env"})
    upstream_change = "update"

    @classmethod
    def summary(cls, outputs: dict[str, Any]) -> str:
        if not outputs.get("store"):
            return ""
        return f"logging {outputs.get('deployment')}'s requests to {outputs['store']}"

    def apply(self, request: ApplyRequest) -> ApplyResult:
        from llmops.monitor.store import open_store

        deployment = monitor_deployment(request.name, request.spec)
        monitor = serving_monitor(self.ctx, deployment)
        if monitor is None or monitor.name != request.name:
            raise ProviderError(f"monitors.{request.name} does not watch deployments.{deployment} in llmops.yaml; "
                                "run `llmops plan` again.")
        open_store(monitor.store).close()  # creates the store and its schema, or says why it cannot
        outputs: dict[str, Any] = {"deployment": deployment, "store": recorded_store(self.ctx.root, monitor.store),
                                   "log_text": monitor.log_text}
        if not request.upstream_specs.get(f"deployments.{deployment}", {}).get("serve"):
            request.log(f"deployments.{deployment} has no `serve:`; nothing logs requests into "
                        "this monitor's store until it serves")
        return ApplyResult(outputs=outputs)

    def delete(self, name: str, locked: LockedResource) -> None:
        """Nothing to undo: the store and its data stay on disk. The deployment's server stops
        logging into it through the deployment (its refresh sees the request-log drift)."""
