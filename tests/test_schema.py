"""Tests of llmops/schemas/llmops.schema.json: it is a valid 2020-12 schema, the example project passes,
bad documents fail at the place that is wrong, and every property is documented."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

REPO = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO / "llmops" / "schemas" / "llmops.schema.json"
EXAMPLE = REPO / "example-project"


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


@pytest.fixture(scope="module")
def validator(schema: dict) -> Draft202012Validator:
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@pytest.fixture
def example() -> dict:
    return yaml.safe_load((EXAMPLE / "llmops.yaml").read_text())


def errors_of(validator: Draft202012Validator, doc: Any) -> list:
    return list(validator.iter_errors(doc))


def set_at(doc: dict, path: str, value: Any) -> None:
    """Set a value at a dotted path (list indexes as digits), creating dicts on the way."""
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def test_schema_is_valid_2020_12(schema: dict) -> None:
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] and schema["title"]


def test_example_project_is_valid(validator: Draft202012Validator, example: dict) -> None:
    assert [e.message for e in errors_of(validator, example)] == []
    assert example["version"] == 1 and example["project"] == "support-assistant"


# (what is changed: dotted path -> new value, or a function of the doc), expected error path, validator
BAD = {
    "unknown top-level key": (
        {"verison": 1}, [], "additionalProperties"),
    "unknown key in training": (
        {"finetunes.support-lora.training.learnin_rate": 0.1},
        ["finetunes", "support-lora", "training"], "additionalProperties"),
    "unknown key in a resource": (
        {"evals.support-quality.treshold": {}}, ["evals", "support-quality"], "additionalProperties"),
    "wrong type": (
        {"finetunes.support-lora.training.epochs": "two"},
        ["finetunes", "support-lora", "training", "epochs"], "type"),
    "bad enum in settings": (
        {"settings.runner": "kubernetes"}, ["settings", "runner"], "enum"),
    "bad enum in adapter": (
        {"finetunes.support-lora.adapter.type": "dora"},
        ["finetunes", "support-lora", "adapter", "type"], "enum"),
    "step with two keys": (
        {"datasets.tickets.prepare.0": {"dedupe": {}, "filter": {"min_chars": {"question": 8}}}},
        ["datasets", "tickets", "prepare", 0], "maxProperties"),
    "unknown step": (
        {"datasets.tickets.prepare.0": {"shuffle": {}}},
        ["datasets", "tickets", "prepare", 0], "additionalProperties"),
    "base model with hf and build": (
        {"base_models.tiny.hf": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}, ["base_models", "tiny"], "oneOf"),
    "base model with none of hf, path, build": (
        {"base_models.tiny": {"revision": "main"}}, ["base_models", "tiny"], None),
    "prompt with template and text": (
        {"prompts.support.text": "{{ question }}"}, ["prompts", "support"], "oneOf"),
    "build without tokenizer_from": (
        {"base_models.tiny.build": {"hidden_size": 64}}, ["base_models", "tiny", "build"], "required"),
    "finetune without base_model": (
        lambda d: d["finetunes"]["support-lora"].pop("base_model"), ["finetunes", "support-lora"], "required"),
    "bad resource name": (
        lambda d: d["datasets"].update({"Tickets": d["datasets"].pop("tickets")}), ["datasets"], "pattern"),
    "bad target name": (
        {"targets.Prod": {}}, ["targets"], "pattern"),
    "unknown version": (
        {"version": 2}, ["version"], "const"),
    "threshold that is not a comparison": (
        {"evals.support-quality.thresholds.rougeL": "at least 0.3"},
        ["evals", "support-quality", "thresholds", "rougeL"], "pattern"),
    "dedupe threshold above 1": (
        {"datasets.tickets.prepare.0.dedupe.near_duplicate_threshold": 1.5},
        ["datasets", "tickets", "prepare", 0, "dedupe", "near_duplicate_threshold"], "maximum"),
    "target_modules neither all-linear nor a list": (
        {"finetunes.support-lora.adapter.target_modules": "all"},
        ["finetunes", "support-lora", "adapter", "target_modules"], "const"),
    "unknown metric": (
        {"evals.support-quality.metrics.0": "rogueL"}, ["evals", "support-quality", "metrics", 0], "enum"),
    "unknown sweep parameter": (
        {"finetunes.support-lora.sweep": {"training.learning_rte": [1e-4]}},
        ["finetunes", "support-lora", "sweep"], "enum"),
    "serve without port": (
        {"deployments.support-prod.serve": {"host": "0.0.0.0"}},
        ["deployments", "support-prod", "serve"], "required"),
    "unknown key in a target overlay": (
        {"targets.prod.finetunes": {"support-lora": {"trainig": {}}}},
        ["targets", "prod", "finetunes", "support-lora"], "additionalProperties"),
    "project in a target overlay": (
        {"targets.prod.project": "other"}, ["targets", "prod"], "additionalProperties"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_document_fails_at_path(validator: Draft202012Validator, example: dict, case: str) -> None:
    change, path, kind = BAD[case]
    doc = copy.deepcopy(example)
    if callable(change):
        change(doc)
    else:
        for where, value in change.items():
            set_at(doc, where, value)
    errors = errors_of(validator, doc)
    assert errors, f"{case}: document was accepted"
    best = best_match(errors)
    assert list(best.absolute_path) == path, best.message
    if kind:
        assert best.validator == kind, best.message


GOOD = {
    "partial overlays in a target": {
        "targets.prod.finetunes": {"support-lora": {"training": {"epochs": 1}}},
        "targets.prod.deployments": {"support-prod": {"serve": {"host": "0.0.0.0"}}},
        "targets.prod.base_models": {"tiny": {"build": {"layers": 1}}},
        "targets.prod.datasets": {"tickets": {"description": "prod data"}},
    },
    "hf base model with revision, protected": {
        "base_models.big": {"hf": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "revision": "main", "protect": True},
    },
    "every eval form": {
        "evals.support-quality.metrics": ["rougeL", {"name": "polite", "python": "checks.tone:polite"}],
        "evals.support-quality.baseline": {"deployment": "support-prod", "max_drop": {"rougeL": 0.02}},
        "evals.support-quality.thresholds": {"rougeL": ">= 0.30", "perplexity": "<40", "polite": "== 1"},
    },
    "a monitor and GitOps settings": {
        "monitors.support-prod": {"window": "24h", "drift": {"psi_max": 0.2, "window": 1000},
                                  "feedback": {"min_positive_rate": 0.7}, "webhook": "https://example.invalid/h"},
        "settings.github": {"repository": "acme/support", "gpu_runner_label": "gpu"},
        "deployments.support-prod.approval": "required",
    },
    "sweep over adapter and training": {
        "finetunes.support-lora.sweep": {"training.learning_rate": [1e-4, 2e-4], "adapter.r": [8, 16]},
        "finetunes.support-lora.adapter.target_modules": ["q_proj", "v_proj"],
        "finetunes.support-lora.select": {"metric": "eval_loss", "mode": "min"},
    },
}


@pytest.mark.parametrize("case", list(GOOD), ids=list(GOOD))
def test_good_variants_pass(validator: Draft202012Validator, example: dict, case: str) -> None:
    doc = copy.deepcopy(example)
    for where, value in GOOD[case].items():
        set_at(doc, where, value)
    assert [f"{list(e.absolute_path)}: {e.message}" for e in errors_of(validator, doc)] == []


PRODUCT_SAMPLE = """
version: 1
project: support-assistant
settings: {tracking_uri: sqlite:///.llmops/mlflow.db, runner: local, parallelism: 2}
targets:
  prod: {settings: {tracking_uri: http://mlflow.internal:5000, runner: docker}}
datasets:
  tickets:
    source: data/tickets.jsonl
    prepare:
      - dedupe: {fields: [question], near_duplicate_threshold: 0.9}
      - filter: {min_chars: {question: 8}}
      - split: {eval_fraction: 0.1, seed: 13}
prompts:
  support: {template: prompts/support.j2, variables: [question]}
base_models:
  tiny:  {build: {architecture: llama, hidden_size: 64, layers: 2, tokenizer_from: tickets}}
  llama: {hf: TinyLlama/TinyLlama-1.1B-Chat-v1.0, revision: main}
finetunes:
  support-lora:
    base_model: tiny
    dataset: tickets
    prompt: support
    adapter: {type: lora, r: 8, alpha: 16, dropout: 0.05, target_modules: all-linear}
    training: {epochs: 2, learning_rate: 2.0e-4, batch_size: 8, max_seq_length: 256, seed: 13}
    resources: {gpus: 0, image: ghcr.io/acme/llmops-train:1.2}
evals:
  support-quality:
    model: support-lora
    dataset: tickets
    metrics: [rougeL, bleu, exact_match, perplexity, latency_p95_ms]
    thresholds: {rougeL: ">= 0.30", perplexity: "<= 40"}
    baseline: deployments.support-prod
deployments:
  support-prod:
    model: support-lora
    alias: production
    gates: [support-quality]
    approval: required
    protect: true
    serve: {port: 8080}
monitors:
  support-prod:
    drift: {psi_max: 0.2, window: 1000}
    feedback: {min_positive_rate: 0.7}
"""


def test_product_spec_sample_is_valid(validator: Draft202012Validator) -> None:
    """The llmops.yaml shown in the product specification (section 3) passes as written."""
    doc = yaml.safe_load(PRODUCT_SAMPLE)
    assert [f"{list(e.absolute_path)}: {e.message}" for e in errors_of(validator, doc)] == []


def walk_properties(node: Any, where: str = "#"):
    """Yield (location, subschema) for every entry of every `properties` in the schema."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for name, sub in value.items():
                    yield f"{where}/properties/{name}", sub
                    yield from walk_properties(sub, f"{where}/properties/{name}")
            else:
                yield from walk_properties(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from walk_properties(item, f"{where}/{i}")


def test_every_property_has_a_description(schema: dict) -> None:
    found = list(walk_properties(schema))
    assert len(found) > 100  # the walk reaches the nested definitions
    missing = [loc for loc, sub in found if not (isinstance(sub, dict) and str(sub.get("description", "")).strip())]
    assert missing == []


def test_objects_with_properties_forbid_unknown_keys(schema: dict) -> None:
    def objects(node: Any, where: str = "#"):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                yield where, node
            for key, value in node.items():
                yield from objects(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                yield from objects(item, f"{where}/{i}")

    open_objects = [loc for loc, node in objects(schema) if node.get("additionalProperties") is not False]
    assert open_objects == []


def test_every_resource_allows_description_and_protect(validator: Draft202012Validator, example: dict) -> None:
    doc = copy.deepcopy(example)
    for kind, resources in doc.items():
        if kind in {"datasets", "prompts", "base_models", "finetunes", "evals", "deployments"}:
            for spec in resources.values():
                spec.update(description="cosmetic", protect=True)
    doc["monitors"] = {"support-prod": {"description": "cosmetic", "protect": False}}
    assert [e.message for e in errors_of(validator, doc)] == []
    doc["monitors"]["support-prod"]["protect"] = "yes"
    assert [list(e.absolute_path) for e in errors_of(validator, doc)] == [["monitors", "support-prod", "protect"]]


def test_example_data_is_regenerated_byte_for_byte(tmp_path: Path) -> None:
    script = tmp_path / "make_tickets.py"
    shutil.copy(EXAMPLE / "data" / "make_tickets.py", script)
    subprocess.run([sys.executable, str(script)], check=True, timeout=60)
    made = (tmp_path / "tickets.jsonl").read_bytes()
    assert made == (EXAMPLE / "data" / "tickets.jsonl").read_bytes()
    rows = [json.loads(line) for line in made.decode().splitlines()]
    questions = [r["question"] for r in rows]
    assert all(set(r) == {"question", "answer", "category"} for r in rows)
    assert len(questions) - len(set(questions)) >= 3  # exact duplicates for dedupe
    assert sum(len(q) < 8 for q in questions) >= 3  # short questions for filter


def test_every_ref_resolves(schema: dict) -> None:
    def refs(node: Any):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    found = sorted(set(refs(schema)))
    assert found
    unresolved = [ref for ref in found if not ref.startswith("#/$defs/") or ref.split("/", 2)[2] not in schema["$defs"]]
    assert unresolved == []
    unused = sorted(set(schema["$defs"]) - {ref.split("/", 2)[2] for ref in found})
    assert unused == []
