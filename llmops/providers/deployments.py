"""Deployments: promote a registered model version to an MLflow alias, gated, and serve it.

Apply promotes only when every gate (eval) it names passed for exactly the model version
being promoted, and, with `approval: required`, only after an approved pull request (or an
allowed local approval). The lock records version, previous version, gates, approval and
endpoint. Refresh reads the registry alias and the endpoint: an alias moved by hand, a
server that is down, or one that logs requests other than its monitor asks is drift. Only
the server this deployment started counts as up (its /health repeats the instance token in
the state file): another one answering on the endpoint, such as an orphan left after
`.llmops/` was deleted, is named in the drift, and apply then refuses the taken port instead
of reporting it as served.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from llmops.errors import GateError, LlmopsError, ProviderError
from llmops.engine.lockfile import LockedResource
from llmops.providers.base import ApplyRequest, ApplyResult, Drift, Provider, ProviderContext
from llmops.providers.tracking_store import TrackingStore
from llmops.serve import control as serving


def _endpoint_drift(ctx: ProviderContext, name: str, endpoint: str) -> Drift | None:
    """Drift when deployment NAME's own server does not answer on `endpoint`, naming any
    other server that answers there instead."""
    status = serving.server_status(serving.serve_state_file(ctx, name), probe=True)
    if status.running and status.healthy:
        return None
    if status.running and not status.instance:  # started by an llmops that recorded no token
        return Drift(f"endpoint {endpoint} is served by a server started without an instance token; "
                     "apply restarts it", "update", "not-serving")
    # Our proxy (`serve.engine: vllm`) answers 503 while the container behind it is down.
    vllm_state = serving.vllm_state_file(ctx, name)
    if status.running and vllm_state.exists() and not serving.server_status(vllm_state).running:
        return Drift(f"endpoint {endpoint}: the vLLM container behind it is not running; apply restarts it", "update", "not-serving")
    other = serving.other_server_at(endpoint, status.instance)
    if other:
        return Drift(f"endpoint {endpoint} is answered by {other}, not by the server llmops started", "update", "not-serving")
    return Drift(f"endpoint {endpoint} is not answering", "update", "not-serving")


def _request_log_drift(ctx: ProviderContext, name: str) -> Drift | None:
    """Drift when deployment NAME's running server logs requests with other settings than the
    monitor watching it in llmops.yaml asks (a monitor added, removed or moved; its `store` or
    `log_text` changed). Apply restarts the server, as it does for any update of the
    deployment: on a protected deployment that takes the approval too, since what a server
    records of its users' requests is for the reviewer to approve. The monitors provider only
    keeps the store; it never starts or stops a server."""
    from llmops.monitor.spec import recorded_store, serving_monitor

    monitor = serving_monitor(ctx, name)
    wanted = monitor.settings() if monitor else None
    running = serving.server_monitor(serving.serve_state_file(ctx, name))
    if running == wanted:
        return None

    def describe(settings: dict[str, Any]) -> str:  # the store as the lock shows it: no machine's path
        store = recorded_store(ctx.root, str(settings.get("store") or ""))
        return f"{store} ({'with' if settings.get('log_text') else 'without'} texts)"

    if monitor is None:
        why = f"the server logs requests to {describe(running or {})}, but no monitor watches it now"
    elif running is None:
        why = f"monitors.{monitor.name} asks the server to log requests to {describe(wanted or {})}; it logs to none"
    else:
        why = (f"the server logs requests to {describe(running)}, monitors.{monitor.name} asks for "
               f"{describe(wanted or {})}")
    return Drift(why + "; apply restarts it", "update", "request-log")


def _model_address(spec: dict[str, Any], upstream: dict[str, LockedResource]) -> str:
    value = str(spec.get("model"))
    for addr in (value, f"finetunes.{value}", f"base_models.{value}"):
        if addr in upstream:
            return addr
    raise ProviderError(f"model '{value}' is not among this deployment's applied upstreams; run `llmops plan`.")


class DeploymentsProvider(TrackingStore, Provider):
    kind = "deployments"
    heavy_modules = ("mlflow",)
    in_place_fields = frozenset({"alias", "gates", "approval", "approvers", "serve"})
    upstream_change = "update"  # a new model version or new eval results: re-check gates, promote

    @classmethod
    def summary(cls, outputs: dict[str, Any]) -> str:
        if not outputs.get("alias"):
            return ""
        line = f"{outputs.get('model_name')} v{outputs.get('version')} -> alias {outputs['alias']}"
        return line + (f"; serving {outputs['endpoint']}" if outputs.get("endpoint") else "")

    def _client(self):
        from llmops.integrations.mlflow import client

        return client(self.ctx.root, self.ctx.settings)

    # -- apply -------------------------------------------------------------------------
    def apply(self, request: ApplyRequest) -> ApplyResult:
        spec = request.spec
        model_addr = _model_address(spec, request.upstream)
        model = request.upstream[model_addr].outputs
        name, version = model.get("model_name"), model.get("model_version")
        if not name or not version:
            raise ProviderError(f"{model_addr} has no registered model version to promote (deploy a fine-tune).")
        version = str(version)
        gates = self._check_gates(spec, request.upstream, model_addr, version)
        approval = self._check_approval(request.name, spec, request.before)
        alias = str(spec.get("alias") or "production")
        client = self._client()
        previous = _alias_version(client, name, alias)
        if previous != version:
            client.set_registered_model_alias(name, alias, version)
        before = request.before.outputs if request.before else {}
        if before.get("alias") and before.get("alias") != alias and before.get("model_name") == name:
            # the alias was renamed in llmops.yaml: the old one goes if it still names our version
            _delete_alias(client, name, str(before["alias"]), before.get("version"),
                          request.log)
        current = {"version": version, "adapter": model.get("adapter", {}).get("path"),
                   "base_model": model.get("base_model", {}).get("path")}
        if spec.get("serve") and current["adapter"]:
            current["adapter"], current["adapter_sha256"] = self._pinned_adapter(
                str(current["adapter"]), model.get("adapter", {}).get("sha256"))
        outputs: dict[str, Any] = {
            "model": model_addr,
            "model_name": name,
            "version": version,
            "alias": alias,
            "gates": gates,
        }
        if before.get("version") and str(before["version"]) != version:
            outputs["previous"] = {k: before[k] for k in ("version", "adapter", "base_model") if before.get(k)}
        elif before.get("previous"):
            outputs["previous"] = before["previous"]
        elif previous and previous != version:
            outputs["previous"] = {"version": previous}  # promoted before llmops managed it
        if approval:
            outputs["approval"] = approval
        if spec.get("serve"):
            outputs.update(self._serve(request.name, spec, name, current))
        else:
            serving.down(self.ctx, request.name)
        outputs["adapter"], outputs["base_model"] = current["adapter"], current["base_model"]
        return ApplyResult(outputs={k: v for k, v in outputs.items() if v is not None})

    def _check_gates(self, spec, upstream, model_addr: str, version: str) -> dict[str, Any]:
        failures: list[str] = []
        results: dict[str, Any] = {}
        for gate in spec.get("gates") or []:
            addr = f"evals.{gate}"
            out = upstream[addr].outputs
            if out.get("model") != model_addr or str(out.get("model_version")) != version:
                failures.append(f"{addr} scored {out.get('model')} v{out.get('model_version')}, not {model_addr} "
                                f"v{version}; re-run it (`llmops apply --replace {addr}`)")
                continue
            for metric, g in (out.get("gates") or {}).items():
                if not g.get("passed"):
                    failures.append(f"{addr}: {_describe_gate(g)}")
            results[gate] = {"passed": bool(out.get("passed")), "run_id": out.get("run_id")}
        if failures:
            raise GateError("gate failed, nothing was promoted: " + "; ".join(failures))
        return results

    def _check_approval(self, name: str, spec: dict[str, Any], before: LockedResource | None) -> dict[str, Any] | None:
        """The approval record for the lock, or None when the deployment is not protected.

        A deployment last promoted with an approval stays protected until a promotion under the
        same rules: turning `approval` off is a change like any other.
        """
        previous = before.outputs.get("approval") if before else None
        previous = previous if isinstance(previous, dict) else {}
        required = spec.get("approval") == "required"
        if not required and not previous.get("approved"):
            return None
        approved_by = self.ctx.options.get("approved_by")
        sha = os.environ.get("GITHUB_SHA", "").strip()
        if approved_by:
            from llmops.gitops.promotion import check_local_promotion

            result = check_local_promotion(str(approved_by), self.ctx.root, spec, self.ctx.settings)
        elif sha and (os.environ.get("GITHUB_TOKEN") or os.environ.get("LLMOPS_GITHUB_TOKEN")):
            from llmops.gitops.github import client_from_env
            from llmops.gitops.promotion import PromotionRequest, check_promotion

            # The approval compares the whole llmops.yaml being applied with the approved commit's.
            request = PromotionRequest(self.ctx.root, name, self.ctx.config, sha,
                                       applied_commit=previous.get("applied_commit"), target=self.ctx.target)
            result = check_promotion(client_from_env(settings=self.ctx.settings), request)
        else:
            why = "`approval: required`" if required else "it was last promoted with an approval"
            raise GateError(f"promotion needs approval ({why}): run apply in CI on the merge of an approved pull "
                            "request (GITHUB_TOKEN and GITHUB_SHA set), or pass --approved-by NAME where "
                            "settings.allow_local_approvals is true; nothing was promoted.")
        if not result.approved:
            rule = f" (rule: {result.rule})" if result.rule else ""
            raise GateError(f"promotion not approved{rule}: {result.reason}; nothing was promoted.")
        if not required:
            return None  # protection lifted by an approved change: later promotions need none
        record = result.to_dict()
        if not record.get("approver") and previous.get("approver"):  # nothing changed since the last approval
            kept = ("approver", "pr_number", "commit", "pull_requests")
            record.update({k: previous[k] for k in kept if k in previous})
        return {k: v for k, v in record.items() if v not in (None, "", [])}

    # -- serving -----------------------------------------------------------------------
    def _serve(self, name: str, spec: dict[str, Any], model_name: str, current: dict[str, Any]) -> dict[str, Any]:
        """(Re)start deployment NAME's server on `current`'s model (`serving.start_deployment`),
        describing what it serves in its served file; returns the endpoint outputs."""
        return serving.start_deployment(self.ctx, name, spec, model_name, current,
                                        served_file=lambda: self._served_file(name, spec, model_name, current))

    def _pinned_adapter(self, rel: str, sha256: str | None) -> tuple[str, str]:
        """The adapter as served: a copy under `.llmops/serve/adapters/SHA/`, named by the sha256
        of its weights (checked against the lock). A fine-tune rebuilt for the same fingerprint
        trains into the same run folder; the copy keeps each version's weights apart, so a
        rollback serves exactly the older ones."""
        import shutil
        import tempfile

        from llmops.hashing import file_sha256 as sha256_file

        src = self.ctx.root / rel
        weights = src / "adapter_model.safetensors"
        if not weights.is_file():
            raise ProviderError(f"the adapter {rel} has no adapter_model.safetensors; re-apply the fine-tune.")
        actual = sha256_file(weights)
        if sha256 and actual != sha256:
            raise ProviderError(f"the adapter at {rel} is not the one llmops.lock records (sha256 {actual[:12]}, "
                                f"lock {str(sha256)[:12]}); run `llmops apply --replace` on the fine-tune.")
        dest = self.ctx.state_dir / "serve" / "adapters" / actual[:32]
        if not (dest / "adapter_model.safetensors").is_file() or sha256_file(dest / "adapter_model.safetensors") != actual:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
            try:
                shutil.copytree(src, tmp / "a")
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(tmp / "a", dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return dest.relative_to(self.ctx.root).as_posix(), actual

    def _served_file(self, name: str, spec: dict[str, Any], model_name: str, current: dict[str, Any]) -> Path:
        """Write what the server serves, for /health and /v1/models (registered version, alias,
        sha256 of the adapter's weights: as pinned, else as on disk now) and the prompt chat
        requests go through: the fine-tune's, with the prompt version the registry says it was
        trained with."""
        import json

        from llmops.fsutil import atomic_write_text
        from llmops.hashing import file_sha256 as sha256_file

        weights = self.ctx.root / current["adapter"] / "adapter_model.safetensors"
        doc: dict[str, Any] = {"deployment": name, "model": model_name, "version": str(current["version"]),
                               "alias": str(spec.get("alias") or "production"),
                               "adapter_sha256": current.get("adapter_sha256")
                               or (sha256_file(weights) if weights.is_file() else None),
                               "merge": bool(spec["serve"].get("merge", False)),
                               "quantize": str(spec["serve"].get("quantize") or "none")}
        ref = str(spec.get("model") or "")
        finetune = self.ctx.spec_of(ref if ref.startswith("finetunes.") else f"finetunes.{ref}")
        prompt_name = finetune.get("prompt")
        prompt_spec = self.ctx.spec_of(f"prompts.{prompt_name}") if prompt_name else None
        if isinstance(prompt_spec, dict):
            entry: dict[str, Any] = {"name": prompt_name, "spec": prompt_spec, "root": str(self.ctx.root.resolve())}
            try:
                tags = self._client().get_model_version(model_name, str(current["version"])).tags or {}
            except Exception:  # noqa: BLE001 - lineage is shown when the registry has it
                tags = {}
            if tags.get("llmops.prompt.version"):
                entry["version"] = tags["llmops.prompt.version"]
            doc["prompt"] = entry
        path = self.ctx.state_dir / "serve" / f"{name}.served.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return path.resolve()

    # -- refresh / delete --------------------------------------------------------------
    def begin_refresh(self, entries: list[tuple[str, dict[str, Any], LockedResource]]) -> None:
        """Probe every deployment's endpoint at once (each probe has a short timeout), so a plan
        waits for the slowest one, not for the sum of them."""
        from concurrent.futures import ThreadPoolExecutor

        super().begin_refresh(entries)
        probed = [(name, locked.outputs["endpoint"]) for name, _, locked in entries if locked.outputs.get("endpoint")]
        if len(probed) > 1:
            with ThreadPoolExecutor(max_workers=min(16, len(probed)), thread_name_prefix="llmops-probe") as pool:
                found = list(pool.map(lambda item: _endpoint_drift(self.ctx, *item), probed))
            self._bulk_values["endpoints"] = {item: drift for item, drift in zip(probed, found)}

    def refresh(self, name: str, spec: dict[str, Any], locked: LockedResource) -> list[Drift]:
        out = locked.outputs
        drifts: list[Drift] = []
        if out.get("model_name") and out.get("alias"):
            aliases = self.bulk("aliases", self._bulk_aliases)
            if aliases is not None and aliases.get(str(out["model_name"]), {}).get(str(out["alias"])) == str(
                    out.get("version")):
                pass  # in sync; anything else is asked about singly, as before
            else:
                try:
                    live = _alias_version(self._client(), out["model_name"], out["alias"])
                except LlmopsError as exc:
                    return [Drift(f"cannot read the registry: {exc.message}", "update", "unreadable")]
                if live != str(out.get("version")):
                    where = f"v{live}" if live else "nothing"
                    drifts.append(Drift(f"alias {out['alias']} -> {where}, lock says v{out.get('version')}",
                                        "update", "changed"))
        probes = self.bulk("endpoints", dict)
        if out.get("endpoint") and (name, out["endpoint"]) in probes:
            endpoint_drift = probes[(name, out["endpoint"])]
        else:
            endpoint_drift = _endpoint_drift(self.ctx, name, out["endpoint"]) if out.get("endpoint") else None
        if endpoint_drift:
            drifts.append(endpoint_drift)
        elif out.get("endpoint"):  # its own server answers: does it log as its monitor asks?
            logging = _request_log_drift(self.ctx, name)
            if logging:
                drifts.append(logging)
        elif spec.get("serve") and not out.get("endpoint") and out.get("version"):
            # `llmops down` dropped the endpoint: the next apply serves again, as llmops.yaml asks.
            drifts.append(Drift("serve: no server is running (stopped by `llmops down`); apply starts it", "update",
                                "not-serving"))
        return drifts

    def _bulk_aliases(self) -> dict[str, dict[str, str]] | None:
        """{registered model: {alias: version}} of every model a deployment the lock holds
        promoted to: one registry search."""
        from llmops.integrations.mlflow import bulk_aliases, registry_uri

        names = [str(locked.outputs["model_name"]) for _, _, locked in self.refreshing
                 if locked.outputs.get("model_name") and locked.outputs.get("alias")]
        if not names:
            return {}
        return bulk_aliases(self._client, names, uri=registry_uri(self.ctx.root, self.ctx.settings))

    def alerts(self, name: str, spec: dict[str, Any], locked: LockedResource) -> list[str]:
        from llmops.monitor import open_alerts

        return [a.message for a in open_alerts(self.ctx.root, name)]

    def delete(self, name: str, locked: LockedResource) -> None:
        serving.down(self.ctx, name)
        out = locked.outputs
        if out.get("model_name") and out.get("alias"):
            _delete_alias(self._client(), str(out["model_name"]), str(out["alias"]), out.get("version"),
                          lambda msg: self.ctx.log(f"deployments.{name}", msg))


def _alias_version(client, model_name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower():
            return None
        raise ProviderError(f"cannot read alias {alias} of {model_name}: {exc}") from exc


def _delete_alias(client, model_name: str, alias: str, version: Any, log: Callable[[str], None]) -> None:
    """Remove the alias only while it still points at the version this deployment promoted,
    a version llmops registered: the lock naming the model and alias is content a pull
    request can write, and must not unset another model's `production`."""
    try:
        current = client.get_model_version_by_alias(model_name, alias)
    except Exception:  # noqa: BLE001 - already gone
        return
    ours = "llmops.fingerprint" in (getattr(current, "tags", None) or {})
    if not ours or (version is not None and str(current.version) != str(version)):
        log(f"left alias {alias} of {model_name} in place: it points at version {current.version}, "
            f"not the version {version} this deployment promoted")
        return
    try:
        client.delete_registered_model_alias(model_name, alias)
    except Exception:  # noqa: BLE001 - removed meanwhile
        pass


def _describe_gate(g: dict[str, Any]) -> str:
    if g.get("value") is None:
        return g.get("reason") or f"{g.get('metric')} was not measured"
    from llmops.evals.metrics import GateResult

    return GateResult(**{k: g.get(k) for k in ("metric", "value", "op", "threshold", "passed", "margin", "baseline")}).describe()


def rollback(ctx: ProviderContext, name: str, locked: LockedResource) -> dict[str, Any]:
    """Move the deployment's alias back to its previous version (and serve that); new outputs."""
    out = dict(locked.outputs)
    prev = out.get("previous")
    if not isinstance(prev, dict) or not prev.get("version"):
        raise LlmopsError(f"deployments.{name} has no previous version recorded in llmops.lock; nothing to roll back to.")
    provider = DeploymentsProvider(ctx)
    client = provider._client()
    client.set_registered_model_alias(out["model_name"], out["alias"], str(prev["version"]))
    current = {k: out.get(k) for k in ("version", "adapter", "base_model")}
    new = {**out, "version": str(prev["version"]), "previous": {k: v for k, v in current.items() if v},
           "rolled_back_from": str(out["version"])}
    new["adapter"], new["base_model"] = prev.get("adapter"), prev.get("base_model")
    spec = ctx.spec_of(f"deployments.{name}")
    if spec.get("serve") and prev.get("adapter") and prev.get("base_model"):
        new.update(provider._serve(name, spec, out["model_name"], prev))
    return {k: v for k, v in new.items() if v is not None}
