"""Evals: run a model on a dataset's eval split through a prompt, score it, check gates.

An eval's apply always records its metrics and gate results, passing or not; it is the
deployments that refuse to promote on a failed gate. Changing only `thresholds` is an
`update`: the recorded metrics are re-checked without running the model again.
A `baseline` deployment is read live (what it serves *now*, before this apply).
`compare_to` names another eval of the same rows (say, of the base model): a dependency whose
recorded metrics are put beside this eval's, with the delta and optional `min_gain` gates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmops.errors import ProviderError
from llmops.engine.lockfile import LockedResource
from llmops.evals.metrics import round_metric
from llmops.providers.base import ApplyRequest, ApplyResult, Drift, Found, ProgressEvent, Provider, short_number
from llmops.providers.tracking_store import TrackingStore

_MODEL_KINDS = ("finetunes", "base_models", "deployments")
RESULTS_ARTIFACT = "eval.json"  # the eval's recorded outputs, logged to its MLflow run


def model_address(spec: dict[str, Any], upstream: dict[str, LockedResource]) -> str:
    """The upstream address an eval's `model:` names."""
    value = str(spec.get("model"))
    if "." in value and value.split(".", 1)[0] in _MODEL_KINDS:
        return value
    for kind in _MODEL_KINDS[:2]:
        if f"{kind}.{value}" in upstream:
            return f"{kind}.{value}"
    raise ProviderError(f"model '{value}' is not among this eval's applied upstreams; run `llmops plan`.")


def local_model(root: Path, kind: str, outputs: dict[str, Any]) -> tuple[Path, Path | None]:
    """(model folder, adapter folder or None) of a fine-tune's or base model's lock outputs."""
    if kind == "finetunes":
        base = outputs.get("base_model", {}).get("path")
        adapter = outputs.get("adapter", {}).get("path")
        if not base or not adapter:
            raise ProviderError("the fine-tune's lock entry has no base model/adapter path; re-apply it.")
        return root / base, root / adapter
    path = outputs.get("path")
    if not path:
        raise ProviderError("the base model's lock entry has no path; re-apply it.")
    return root / path, None


class EvalsProvider(TrackingStore, Provider):
    kind = "evals"
    heavy_modules = ("torch", "transformers", "transformers.models.llama.modeling_llama", "peft", "mlflow")
    in_place_fields = frozenset({"thresholds", "compare_to"})

    @classmethod
    def summary(cls, outputs: dict[str, Any]) -> str:
        if not outputs.get("metrics"):
            return ""
        gates = outputs.get("gates") or {}
        parts = []
        for metric, value in outputs["metrics"].items():
            g = gates.get(metric)
            check = (f" ({g['op']} {short_number(g['threshold'])} {'passed' if g['passed'] else 'FAILED'})"
                     if g and g.get("op") else "")
            delta = ((outputs.get("comparison") or {}).get("metrics") or {}).get(metric, {}).get("delta")
            vs = (f" [{delta:+.4g} vs {outputs['comparison']['eval'].split('.', 1)[1]}]"
                  if isinstance(delta, (int, float)) else "")
            spread = outputs.get("latency") or {}
            if metric.startswith("latency_") and spread.get("requests"):
                vs += (f" (n={spread['requests']} from {spread['timed']} timings, "
                       f"{short_number(spread['min_ms'])}-{short_number(spread['max_ms'])} ms)")
            parts.append(f"{metric} {short_number(value)}{check}{vs}")
        failed_gains = [k for k, g in gates.items() if k not in outputs["metrics"] and not g.get("passed")]
        return ", ".join(parts) + (f"; FAILED: {', '.join(failed_gains)}" if failed_gains else "")

    def describe(self, name: str, spec: dict[str, Any], locked: LockedResource | None) -> dict[str, Any]:
        """The last applied metrics, checked against the thresholds now in llmops.yaml."""
        metrics = (locked.outputs.get("metrics") if locked else None) or {}
        if not metrics:
            return {}
        compared = locked.outputs.get("comparison") or {}
        theirs = compared.get("metrics") or {}
        table = {}
        for metric in sorted(set(metrics) | set(spec.get("thresholds") or {})):
            row: dict[str, Any] = {"last": metrics.get(metric)}
            if metric in theirs:
                row["compared"] = theirs[metric].get("value")
                row["delta"] = theirs[metric].get("delta")
            expr = (spec.get("thresholds") or {}).get(metric)
            if expr is not None:
                row["threshold"] = str(expr)
                if metric in metrics:
                    from llmops.evals.metrics import check_gate

                    row["passes"] = check_gate(metric, float(metrics[metric]), str(expr)).passed
            table[metric] = row
        if theirs:
            return {"metrics": table, "compared_to": compared.get("eval")}
        return {"metrics": table}

    def apply(self, request: ApplyRequest) -> ApplyResult:
        spec = request.spec
        before = request.before.outputs if request.before else {}
        model_addr = model_address(spec, request.upstream)
        model_out = request.upstream[model_addr].outputs
        if request.action == "update" and before.get("metrics") and before.get("model") == model_addr:
            # Only thresholds or compare_to changed: re-check the recorded metrics, do not run the model.
            metrics, std, run_id = before["metrics"], before.get("std", {}), before.get("run_id")
            decoding, rows, skipped = before.get("decoding", {}), before.get("rows"), before.get("skipped", {})
            probe_sets = before.get("probe_sets")
            cost, latency = before.get("cost"), before.get("latency")
        else:
            import time

            started = time.monotonic()
            result, rows = self._run(request, model_addr, model_out)
            cost = self._actual_cost(time.monotonic() - started, rows, result.decoding, int(getattr(result, "repeats", 1) or 1))
            metrics = {k: round_metric(v) for k, v in result.metrics.items()}
            std = {k: round_metric(v) for k, v in result.per_metric_std.items()}
            decoding, skipped = result.decoding, result.skipped
            probe_sets = getattr(result, "probe_sets", None)
            latency = getattr(result, "latency", None) or None
            run_id = None
        gates = self._gates(spec, metrics)
        baseline = self._baseline(request, metrics)
        gates.update(baseline.pop("gates", {}))
        comparison = self._compare(request, metrics)
        gates.update(comparison.pop("gates", {}))
        passed = all(g["passed"] for g in gates.values())
        outputs = {
            "model": model_addr,
            "model_name": model_out.get("model_name"),
            "model_version": model_out.get("model_version") or model_out.get("version"),
            "metrics": metrics,
            "std": std,
            "gates": gates,
            "passed": passed,
            "decoding": decoding,
            "rows": rows,
            "probe_sets": probe_sets or None,  # versions of the shipped safety probe sets used
            "latency": latency,  # sample size and spread of the latency metrics
            "cost": cost,
        }
        if skipped:
            outputs["skipped"] = skipped
        if baseline:
            outputs["baseline"] = baseline
        if comparison:
            outputs["comparison"] = comparison
        outputs = {k: v for k, v in outputs.items() if v is not None}
        if run_id is None:
            run_id = self._log_run(request, model_addr, model_out, outputs)
        return ApplyResult(outputs={**outputs, "run_id": run_id})

    def _actual_cost(self, wall: float, rows: int, decoding: dict[str, Any], repeats: int) -> dict[str, Any]:
        from llmops.engine.cost import actual

        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
        return actual(device, wall, tokens=rows * repeats * int((decoding or {}).get("max_new_tokens") or 0) or None,
                      rows=rows, repeats=repeats)

    def estimate(self, name: str, spec: dict[str, Any], locked: LockedResource | None,
                 upstream: dict[str, LockedResource | None]) -> dict[str, Any] | None:
        from llmops.engine.cost import estimate_eval
        from llmops.evals.runner import EvalError, decoding_settings

        try:
            decoding = decoding_settings(spec.get("decoding"))
        except EvalError:
            return None  # apply reports the bad setting
        dataset = upstream.get(f"datasets.{spec.get('dataset')}")
        rows = ((dataset.outputs.get("eval") or {}).get("rows") if dataset else None)
        if not isinstance(rows, int):
            rows = self._guess_rows(str(spec.get("dataset")))
        if isinstance(rows, int) and spec.get("limit"):
            rows = min(rows, int(spec["limit"]))
        return estimate_eval(rows if isinstance(rows, int) else None, int(spec.get("repeats", 1)),
                             int(decoding["max_new_tokens"]), locked.outputs if locked else None)

    def _guess_rows(self, dataset: str) -> int | None:
        """Before a dataset is prepared: its source's lines (estimated from its start) times its
        split's eval_fraction."""
        ds = self.ctx.spec_of(f"datasets.{dataset}")
        source = ds.get("source")
        fraction = 0.1
        for step in ds.get("prepare") or []:
            if isinstance(step, dict) and isinstance(step.get("split"), dict):
                value = step["split"].get("eval_fraction", 0.1)
                fraction = float(value) if isinstance(value, (int, float)) else fraction
        if not isinstance(source, str):
            return None
        try:  # a first guess, at plan time: the lines of the first 64 KiB, scaled to the file's size
            path = self.ctx.root / source
            size = path.stat().st_size
            with path.open("rb") as f:
                head = f.read(64 * 1024)
        except OSError:
            return None
        lines = sum(1 for line in head.splitlines() if line.strip())
        if not lines:
            return None
        return max(int(lines * size / len(head) * fraction), 1)

    def refresh(self, name: str, spec: dict[str, Any], locked: LockedResource) -> list[Drift]:
        """The eval run the lock names must still be in the tracking store: it holds the results
        other checkouts restore (`eval.json`) and the tag linking them to the scored version."""
        from llmops.integrations.mlflow import client, lost_run, tracking_uri

        run_id = locked.outputs.get("run_id")
        if not run_id:
            return []
        runs = self.bulk("runs", self._bulk_runs)
        if runs is not None and runs.get(str(run_id)) == "active":
            return []  # in sync; anything else is asked about singly, as before
        lost = lost_run(client(self.ctx.root, self.ctx.settings), str(run_id),
                        tracking_uri(self.ctx.root, self.ctx.settings))
        return [Drift(f"eval {lost}: it will be run again", code="missing")] if lost else []

    def _bulk_runs(self) -> dict[str, str] | None:
        """{run id: lifecycle stage} of every eval run the lock holds: one tracking-store search."""
        from llmops.integrations.mlflow import bulk_runs, client, tracking_uri

        ids = [str(locked.outputs["run_id"]) for _, _, locked in self.refreshing if locked.outputs.get("run_id")]
        return bulk_runs(lambda: client(self.ctx.root, self.ctx.settings), ids,
                         uri=tracking_uri(self.ctx.root, self.ctx.settings))

    # -- shared results -------------------------------------------------------------------
    def find_existing(self, name: str, spec: dict[str, Any], fingerprint: str) -> Found | None:
        """An eval run made elsewhere for exactly this fingerprint (say by a pull request's CI
        job) whose results were recorded in it: fetched, not run again. An eval with a
        `baseline` reads live state, so it always runs again."""
        if spec.get("baseline"):
            return None
        run = self._run_for(fingerprint)
        if run is None:
            return None
        scored = run.data.tags.get("llmops.model_version")
        what = f" (scored v{scored})" if scored else ""
        return Found(f"evaluated elsewhere for this fingerprint: MLflow run {run.info.run_id}{what}; its results "
                     "will be fetched, not run again", {"run_id": run.info.run_id})

    def _run_for(self, fingerprint: str):
        from llmops.integrations.mlflow import client, filter_value

        c = client(self.ctx.root, self.ctx.settings)
        try:
            exp = c.get_experiment_by_name(f"{self.ctx.project_name}-evals")
            if exp is None:
                return None
            runs = c.search_runs([exp.experiment_id], max_results=5, order_by=["attributes.start_time DESC"],
                                 filter_string=f"tags.`llmops.fingerprint` = {filter_value(fingerprint)} and "
                                               f"tags.`llmops.results` = {filter_value(RESULTS_ARTIFACT)}")
        except Exception:  # noqa: BLE001 - an unreachable store is reported by apply's store check
            return None
        return next((r for r in runs if r.info.status == "FINISHED"), None)

    def restore(self, request: ApplyRequest) -> ApplyResult:
        """The results recorded in the eval run found for this fingerprint, checked to score
        exactly the model version upstream now holds; gates are re-checked as configured."""
        import json

        from llmops.integrations.mlflow import client

        found = request.private.get("found") or {}
        run_id = str(found.get("run_id") or (request.before.outputs.get("run_id") if request.before else ""))
        c = client(self.ctx.root, self.ctx.settings)
        try:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                path = c.download_artifacts(run_id, RESULTS_ARTIFACT, tmp)
                recorded = json.loads(Path(path).read_text(encoding="utf-8"))
        except Exception as exc:  # noqa: BLE001 - the run or its artifact is gone
            raise ProviderError(f"{request.address}: cannot read the results of eval run {run_id} ({exc}); run "
                                f"`llmops apply --replace {request.address}` to evaluate again.") from None
        model_addr = model_address(request.spec, request.upstream)
        model_out = request.upstream[model_addr].outputs
        version = str(model_out.get("model_version") or model_out.get("version"))
        if recorded.get("model") != model_addr or str(recorded.get("model_version")) != version:
            raise ProviderError(f"{request.address}: eval run {run_id} scored {recorded.get('model')} "
                                f"v{recorded.get('model_version')}, not {model_addr} v{version}; run "
                                f"`llmops apply --replace {request.address}` to evaluate this version.")
        gates = self._gates(request.spec, recorded.get("metrics") or {})
        comparison = self._compare(request, recorded.get("metrics") or {})
        gates.update(comparison.pop("gates", {}))
        outputs = {**{k: v for k, v in recorded.items() if k != "comparison"}, "gates": gates,
                   "passed": all(g["passed"] for g in gates.values()), "run_id": run_id}
        if comparison:
            outputs["comparison"] = comparison
        request.log(f"results fetched from eval run {run_id}, not run again")
        return ApplyResult(outputs=outputs)

    # -- running -----------------------------------------------------------------------
    def _prompt_spec(self, request: ApplyRequest, model_addr: str) -> dict[str, Any]:
        name = request.spec.get("prompt")
        if not name and model_addr.startswith("finetunes."):
            name = request.upstream_specs.get(model_addr, {}).get("prompt")
        prompt = request.upstream_specs.get(f"prompts.{name}") if name else None
        if not prompt:
            raise ProviderError("no prompt to evaluate with: set `prompt:` on the eval (or evaluate a fine-tune).")
        return prompt

    def _rows(self, request: ApplyRequest) -> list[dict[str, Any]]:
        from llmops.providers.datasets import load_split

        ds = f"datasets.{request.spec['dataset']}"
        outputs = request.upstream[ds].outputs
        if "eval" not in outputs:
            raise ProviderError(f"{ds} has no eval split; add `- split: {{eval_fraction: 0.1}}` to its prepare steps.")
        rows = load_split(self.ctx.root, outputs, "eval")
        limit = request.spec.get("limit")
        return rows[: int(limit)] if limit else rows

    def _run(self, request: ApplyRequest, model_addr: str, model_out: dict[str, Any]):
        from llmops.evals.runner import evaluate, evaluate_endpoint

        spec = request.spec
        rows = self._rows(request)
        prompt = self._prompt_spec(request, model_addr)

        def progress(done: int, total: int) -> None:
            request.progress(ProgressEvent(done, total, f"{done}/{total} generations"))

        common = dict(decoding=spec.get("decoding"), repeats=int(spec.get("repeats", 1)), progress=progress)
        kind = model_addr.split(".", 1)[0]
        if kind == "deployments":
            url = model_out.get("endpoint")
            if not url:
                raise ProviderError(f"{model_addr} serves no endpoint (no `serve:`); evaluate its model instead.")
            result = evaluate_endpoint(url, rows, prompt, self.ctx.root, spec["metrics"],
                                       model_name=model_out.get("served_model"), api=spec.get("api"), **common)
        else:
            model_dir, adapter = local_model(self.ctx.root, kind, model_out)
            result = evaluate(model_dir, adapter, rows, prompt, self.ctx.root, spec["metrics"],
                              batch_size=int(spec.get("batch_size", 8)), served_as=spec.get("served_as"), **common)
        return result, len(rows)

    # -- gates -------------------------------------------------------------------------
    def _gates(self, spec: dict[str, Any], metrics: dict[str, float]) -> dict[str, dict[str, Any]]:
        from llmops.evals.metrics import check_gate

        gates = {}
        for metric, expr in (spec.get("thresholds") or {}).items():
            if metric not in metrics:
                gates[metric] = {"metric": metric, "passed": False, "value": None, "threshold": expr,
                                 "reason": f"{metric} was not measured; add it to `metrics:`"}
                continue
            gates[metric] = check_gate(metric, float(metrics[metric]), str(expr)).to_dict()
        return gates

    def _compare(self, request: ApplyRequest, metrics: dict[str, float]) -> dict[str, Any]:
        """This eval's metrics beside those the `compare_to` eval recorded (an upstream, applied
        first): each metric's other value and delta (this minus other), and `min_gain` gates."""
        spec = request.spec.get("compare_to")
        if not spec:
            return {}
        name = str(spec if isinstance(spec, str) else spec.get("eval", ""))
        addr = name if name.startswith("evals.") else f"evals.{name}"
        other = request.upstream.get(addr)
        if other is None or not other.outputs.get("metrics"):
            raise ProviderError(f"compare_to: {addr} has no recorded metrics; apply it first "
                                f"(`llmops apply --target {addr}`).")
        from llmops.evals.metrics import check_gain

        theirs = other.outputs["metrics"]
        rows = {m: {"value": theirs[m], "delta": round_metric(float(metrics[m]) - float(theirs[m]))}
                for m in sorted(metrics) if m in theirs and isinstance(theirs[m], (int, float))}
        gates: dict[str, dict[str, Any]] = {}
        short = addr.split(".", 1)[1]
        for metric, gain in ((spec.get("min_gain") if isinstance(spec, dict) else None) or {}).items():
            key = f"{metric} gain vs {short}"
            if metric not in rows:
                gates[key] = {"metric": metric, "passed": False, "value": metrics.get(metric), "threshold": gain,
                              "reason": f"{metric} is not measured by both evals; add it to both `metrics:`"}
                continue
            gate = check_gain(metric, float(metrics[metric]), float(theirs[metric]), float(gain)).to_dict()
            gates[key] = {**gate, "min_gain": gain}
        out: dict[str, Any] = {"eval": addr, "model": other.outputs.get("model"), "metrics": rows, "gates": gates}
        if other.outputs.get("model_version") is not None:
            out["model_version"] = other.outputs["model_version"]
        return out

    def _baseline(self, request: ApplyRequest, metrics: dict[str, float]) -> dict[str, Any]:
        """Regression limits against what the baseline deployment serves now (read live)."""
        spec = request.spec.get("baseline")
        if not spec:
            return {}
        name = spec if isinstance(spec, str) else spec.get("deployment", "")
        name = name.split(".", 1)[1] if name.startswith("deployments.") else name
        limits = {} if isinstance(spec, str) else spec
        from llmops.serve.control import live_endpoint

        url = live_endpoint(self.ctx, name)
        if url is None:
            return {"deployment": name, "note": "baseline not serving yet; no regression check"}
        from llmops.evals.metrics import METRICS, check_regression
        from llmops.evals.runner import evaluate_endpoint

        prompt = self._prompt_spec(request, model_address(request.spec, request.upstream))
        base = evaluate_endpoint(url, self._rows(request), prompt, self.ctx.root, request.spec["metrics"],
                                 decoding=request.spec.get("decoding"))
        gates = {}
        drops, rises = limits.get("max_drop") or {}, limits.get("max_rise") or {}
        for metric in sorted(set(drops) | set(rises)):
            if metric in metrics and metric in base.metrics:
                m = METRICS.get(metric)
                gates[f"{metric} vs baseline"] = check_regression(
                    metric, float(metrics[metric]), float(base.metrics[metric]),
                    max_drop=drops.get(metric), max_rise=rises.get(metric),
                    higher_is_better=m.higher_is_better if m else None).to_dict()
        return {"deployment": name, "metrics": {k: round_metric(v) for k, v in base.metrics.items()}, "gates": gates}

    def _log_run(self, request, model_addr, model_out, outputs: dict[str, Any]) -> str | None:
        from llmops.integrations.mlflow import artifact_location, client, ensure_experiment, is_local, tracking_uri

        c = client(self.ctx.root, self.ctx.settings)
        uri = tracking_uri(self.ctx.root, self.ctx.settings)
        project = self.ctx.project_name
        exp = ensure_experiment(c, f"{project}-evals", artifact_location(self.ctx.root) if is_local(uri) else None)
        from llmops.integrations.mlflow import git_state

        tags = {"llmops.address": request.address, "llmops.model": model_addr,
                "llmops.fingerprint": request.fingerprint, **git_state(self.ctx.root)}
        if model_out.get("model_name"):
            tags["llmops.model_name"] = str(model_out["model_name"])
            tags["llmops.model_version"] = str(model_out.get("model_version"))
        run = c.create_run(exp, tags=tags, run_name=request.name)
        rid = run.info.run_id
        for k, v in outputs.get("decoding", {}).items():
            c.log_param(rid, f"decoding.{k}", v)
        for k, v in outputs["metrics"].items():
            c.log_metric(rid, k, float(v))
        for k, g in outputs["gates"].items():
            c.set_tag(rid, f"gate.{k}", "pass" if g["passed"] else "fail")
        # The whole result, so another checkout (main after the pull request) restores it.
        c.log_dict(rid, outputs, RESULTS_ARTIFACT)
        c.set_tag(rid, "llmops.results", RESULTS_ARTIFACT)
        c.set_terminated(rid)
        if model_out.get("model_name") and model_out.get("model_version"):
            # Link the eval to exactly the model version it scored.
            c.set_model_version_tag(model_out["model_name"], str(model_out["model_version"]),
                                    f"llmops.eval.{request.name}", rid)
        return rid
