"""Monitors: a deployment's request store, and the server settings that log into it.

A monitor (`monitors.NAME`) watches the deployment of the same name (or `deployment:`).
Its apply makes sure the request store exists and records where it is; the deployment's
server logs to it because `DeploymentsProvider._serve` asks `serving_monitor` (in
`llmops.monitor.spec`, below both providers) which store
to pass. When the server runs with other monitor settings than llmops.yaml now asks for
(a monitor added, `store` or `log_text` changed), apply restarts it through the
deployments provider. The monitor's checks themselves run with `llmops monitor`; their
open alerts are shown by plan (`alerts`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmops.errors import ProviderError
from llmops.engine.lockfile import LockedResource
from llmops.monitor.spec import ServedMonitor, monitor_deployment, serving_monitor
from llmops.providers.base import ApplyRequest, ApplyResult, Provider


def _wanted(monitor: ServedMonitor | None) -> dict[str, Any] | None:
    from llmops.redact import redact_url

    return None if monitor is None else {"store": redact_url(monitor.store), "log_text": monitor.log_text}


def _recorded_store(root: Path, url: str) -> str:
    """The store as llmops.lock records it: no password, and a SQLite file inside the project
    relative to it (`sqlite:///.llmops/monitor/NAME.db`), so the lock holds no machine's path."""
    from llmops.redact import redact_url

    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        base = root.resolve()
        if path.is_absolute() and path.is_relative_to(base):
            return "sqlite:///" + path.relative_to(base).as_posix()
    return redact_url(url)


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
        outputs: dict[str, Any] = {"deployment": deployment, "store": _recorded_store(self.ctx.root, monitor.store),
                                   "log_text": monitor.log_text}
        if not request.upstream_specs.get(f"deployments.{deployment}", {}).get("serve"):
            request.log(f"deployments.{deployment} has no `serve:`; nothing logs requests into "
                        "this monitor's store until it serves")
        dep = request.upstream.get(f"deployments.{deployment}")
        if dep is not None:
            self._restart_if_changed(deployment, dep, monitor)
        old = (request.before.outputs if request.before else {}).get("deployment")
        if old and old != deployment:  # the monitor moved to another deployment: the old one stops logging
            self._reconfigure(str(old))
        return ApplyResult(outputs=outputs)

    def _restart_if_changed(self, deployment: str, dep: LockedResource, monitor: ServedMonitor | None) -> bool:
        """Restart the deployment's running server when it logs with other settings than wanted."""
        from llmops.providers.deployments import serve_deployment  # the restart: the deployment's own start
        from llmops.serve.control import serve_state_file, server_monitor, server_status

        state = serve_state_file(self.ctx, deployment)  # read only: status and monitor settings
        if not server_status(state).running or server_monitor(state) == _wanted(monitor):
            return False
        spec = self.ctx.spec_of(f"deployments.{deployment}")
        out = dep.outputs
        if not spec.get("serve") or not out.get("model_name"):
            return False
        current = {"version": out.get("version"), "adapter": out.get("adapter"), "base_model": out.get("base_model")}
        self.ctx.log(f"deployments.{deployment}", "restarting the server with the monitor's request-log settings")
        served = serve_deployment(self.ctx, deployment, spec, str(out["model_name"]), current)
        if out.get("endpoint") and served["endpoint"] != out["endpoint"]:
            raise ProviderError(f"deployments.{deployment} restarted on {served['endpoint']}, but llmops.lock says "
                                f"{out['endpoint']}; run `llmops apply` to record the new endpoint.")
        return True

    def delete(self, name: str, locked: LockedResource) -> None:
        """Stop logging into the removed monitor's store (its data stays on disk)."""
        self._reconfigure(str(locked.outputs.get("deployment") or name))

    def _reconfigure(self, deployment: str) -> None:
        """Restart a deployment no monitor watches any more so it stops logging into a store."""
        if serving_monitor(self.ctx, deployment) is not None:
            return  # another monitor watches it now; that monitor's apply sets the server up
        dep = self.ctx.locked(f"deployments.{deployment}")
        if dep is not None:
            self._restart_if_changed(deployment, dep, None)
