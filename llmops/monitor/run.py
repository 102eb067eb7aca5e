"""A project's monitors, run the way `llmops monitor` and `llmops feedback export` need them.

- `run_project_monitors(project, name)`: for each monitor (or NAME), the training rows of
  the deployment's fine-tune (its dataset's train split, rendered with the fine-tune's
  prompt into a `prompt` field), one `run_monitor` pass, and optionally its HTML report
  under `.llmops/reports/monitor/NAME/`. With `drift.embedding_model: base_model` the
  embedding model is the fine-tune's base model folder (`base_model_dir`).
- `training_rows(project, deployment)`: that reference, followed through llmops.lock:
  deployment outputs -> model address -> the fine-tune's dataset upstream -> its outputs.
- `training_reference(project, deployment)`: the drift reference built from those rows,
  cached under `.llmops/monitor/reference/` by the split's locked md5 and the prompt's digest
  (`llmops.monitor.reference`): a later run reads neither the split nor renders a row, unless
  embedding drift needs the texts.
- `export_project_feedback`: rated requests of a monitor's store as JSONL.

Only the standard library is imported at module level; numpy and the monitor runner are
imported when a monitor runs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from llmops.monitor.errors import MonitorError

if TYPE_CHECKING:
    from llmops.engine.lockfile import LockedResource
    from llmops.monitor.drift import Reference
    from llmops.monitor.runner import MonitorReport
    from llmops.templating.prompt_template import PromptTemplate
    from llmops.engine.project import Project

REPORTS_DIR = Path(".llmops") / "reports" / "monitor"
BASE_MODEL = "base_model"  # `drift.embedding_model: base_model` (as in llmops.monitor.embedding, numpy-free here)
Log = Callable[[str], None]


@dataclass
class MonitorOutcome:
    """One monitor's run: its report and, with `html`, the report page written."""

    report: "MonitorReport"
    html: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.report.to_dict(), "html": None if self.html is None else str(self.html)}


def monitor_specs(project: "Project", name: str | None = None) -> dict[str, dict[str, Any]]:
    """`{NAME: spec}` of every monitor in llmops.yaml, or of NAME alone."""
    monitors = project.config.data.get("monitors") or {}
    if name is None:
        if not monitors:
            raise MonitorError("llmops.yaml declares no monitors; add a `monitors:` entry for a deployment.")
        return {n: dict(monitors[n] or {}) for n in sorted(monitors)}
    short = name.split(".", 1)[1] if name.startswith("monitors.") else name
    if short not in monitors:
        close = difflib.get_close_matches(short, list(monitors), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(monitors)) or 'none'}"
        raise MonitorError(f"no monitor '{short}' in llmops.yaml ({hint}).")
    return {short: dict(monitors[short] or {})}


def _locked_finetune(project: "Project", deployment: str) -> tuple[str, "LockedResource | None"]:
    """The address the deployment serves (per llmops.lock) and its fine-tune's lock entry, if any."""
    dep = project.lock.get(f"deployments.{deployment}")
    model = str((dep.outputs if dep else {}).get("model") or "")
    return model, project.lock.get(model) if model.startswith("finetunes.") else None


def base_model_dir(project: "Project", deployment: str) -> Path | None:
    """The folder of the base model the deployment's fine-tune was trained from (per llmops.lock),
    or None when the deployment is not applied or serves no fine-tune."""
    from llmops.providers.base_models import model_folder

    model, finetune = _locked_finetune(project, deployment)
    if finetune is None:
        return None
    addr = f"base_models.{finetune.spec.get('base_model')}"
    if addr not in finetune.upstreams:
        addr = next((u for u in sorted(finetune.upstreams) if u.startswith("base_models.")), addr)
    base = project.lock.get(addr)
    if base is None:
        raise MonitorError(f"{model} names {addr}, which is not in llmops.lock; run `llmops apply`.")
    folder = model_folder(project.root, base.outputs, base.inputs)
    if folder is None:
        raise MonitorError(f"the model folder of {addr} is not on this machine; run `llmops apply` to build or "
                           "fetch it again.")
    return folder


def _training_source(project: "Project", deployment: str) -> "tuple[dict[str, Any], PromptTemplate] | None":
    """The locked outputs of the deployment's fine-tune's dataset and the fine-tune's prompt,
    or None when the deployment is not applied or serves a base model (no training data)."""
    from llmops.templating.prompt_template import load_prompt

    model, finetune = _locked_finetune(project, deployment)
    if finetune is None:
        return None
    ds_addr = f"datasets.{finetune.spec.get('dataset')}"
    if ds_addr not in finetune.upstreams:
        ds_addr = next((u for u in sorted(finetune.upstreams) if u.startswith("datasets.")), "")
    dataset = project.lock.get(ds_addr)
    if dataset is None:
        raise MonitorError(f"{model} names {ds_addr or 'no dataset'}, which is not in llmops.lock; run `llmops apply`.")
    prompt_name = str(finetune.spec.get("prompt") or "")
    prompt_spec = (project.config.data.get("prompts") or {}).get(prompt_name)
    if prompt_spec is None:
        raise MonitorError(f"{model} uses prompt '{prompt_name}', which llmops.yaml no longer declares; "
                           "put it back or re-apply the fine-tune.")
    return dict(dataset.outputs), load_prompt(prompt_spec, project.root, prompt_name)


def _rendered_rows(project: "Project", outputs: dict[str, Any], prompt: "PromptTemplate") -> list[dict[str, Any]] | None:
    from llmops.providers.datasets import load_split

    out = []
    for row in load_split(project.root, outputs, "train"):
        if all(v in row for v in prompt.variables):  # rows without the variables were not trained on
            out.append({"prompt": prompt.render({v: row[v] for v in prompt.variables})})
    return out or None


def training_rows(project: "Project", deployment: str) -> list[dict[str, Any]] | None:
    """The deployment's fine-tune's train split rendered with its prompt (`prompt` field),
    or None when the deployment is not applied or serves a base model (no training data)."""
    source = _training_source(project, deployment)
    return None if source is None else _rendered_rows(project, *source)


def training_reference(project: "Project", deployment: str, *, need_rows: bool = False
                       ) -> "tuple[list[dict[str, Any]] | None, Reference | None, str]":
    """`(rows, reference, how)` for the deployment's drift: the reference from the cache
    when it holds one for this split and prompt (`how` as `reference.cached_reference`
    says), the rendered rows only when `need_rows` (embedding drift) or to build it."""
    from llmops.monitor.drift import Reference
    from llmops.monitor.reference import cached_reference, reference_key

    source = _training_source(project, deployment)
    if source is None:
        return None, None, "none"
    outputs, prompt = source
    rows = _rendered_rows(project, outputs, prompt) if need_rows else None
    train = outputs.get("train") if isinstance(outputs.get("train"), dict) else {}
    key = reference_key(str(train.get("md5") or ""), prompt.digest())

    def build() -> Reference | None:
        built = rows if need_rows else _rendered_rows(project, outputs, prompt)
        return Reference.from_rows(built) if built else None

    reference, how = cached_reference(project.root, key, build)
    return rows, reference, how


def _store_url(project: "Project", name: str, spec: dict[str, Any]) -> str:
    from llmops.monitor.spec import store_url

    return store_url(project.root, name, spec.get("store"))


def run_project_monitors(project: "Project", name: str | None = None, *, html: bool = False,
                         log: Log | None = None) -> list[MonitorOutcome]:
    """Run every monitor (or NAME) once; alerts are recorded and sent to webhooks."""
    from llmops.monitor.runner import run_monitor
    from llmops.monitor.spec import MonitorSpec
    from llmops.monitor.store import open_store

    outcomes = []
    for mon, spec in monitor_specs(project, name).items():
        parsed = MonitorSpec.from_dict(mon, spec)
        deployment = parsed.deployment
        # the texts are read only for embedding drift; PSI/KS need only the (cached) reference
        rows, reference, _how = training_reference(
            project, deployment, need_rows=parsed.embedding_model is not None and parsed.log_text)
        base_dir = None
        if rows is not None and parsed.embedding_model == BASE_MODEL and parsed.log_text:
            base_dir = base_model_dir(project, deployment)
        store = open_store(_store_url(project, mon, spec))
        try:
            report = run_monitor(project.root, mon, spec, rows, store=store, base_model_dir=base_dir, log=log,
                                 reference=reference)
            page = None
            if html:
                from llmops.monitor.report_html import write_html_report

                page = write_html_report(report, store, project.root / REPORTS_DIR / mon)
        finally:
            store.close()
        outcomes.append(MonitorOutcome(report, page))
    return outcomes


def export_project_feedback(project: "Project", name: str, to: Path | str, min_rating: Any = None,
                            pairs: Path | str | None = None) -> int:
    """Write monitor NAME's rated requests to `to` as JSONL (and preference pairs to `pairs`);
    returns the number of rows."""
    from llmops.monitor.feedback import export_feedback
    from llmops.monitor.store import open_store

    (mon, spec), = monitor_specs(project, name).items()
    store = open_store(_store_url(project, mon, spec))
    try:
        return export_feedback(store, to, min_rating, pairs)
    finally:
        store.close()
