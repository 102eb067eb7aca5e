"""Embedding drift with a real (tiny, locally built) transformers model: the score against its
noise floor, the alert, the training-side cache, the log_text requirement, the schema keys,
and `llmops monitor` with `embedding_model: base_model` resolved through llmops.lock."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from llmops.monitor import open_store
from llmops.monitor.embedding import CACHE_DIR, TransformersEmbedder
from llmops.monitor.errors import MonitorError
from llmops.monitor.runner import run_monitor

REPO = Path(__file__).resolve().parents[1]
TICKETS = REPO / "example-project" / "data" / "tickets.jsonl"
PROMPT = "### Question:\n{q}\n### Answer:\n"  # example-project/prompts/support.j2, as rendered
NOW = 1_800_000_000.0
MODEL_REL = "models/emb"
OFF_TOPIC = ("the committee reviewed the quarterly geological survey of volcanic basalt formations and "
             "sediment layers along the northern coastline while astronomers catalogued spectral lines "
             "of distant galaxies and the orchestra rehearsed a symphony in a minor key").split()


def _questions() -> list[str]:
    rows = [json.loads(line) for line in TICKETS.read_text().splitlines() if line.strip()]
    questions = [r["question"] for r in rows]
    random.Random(7).shuffle(questions)
    return questions


QUESTIONS = _questions()
TRAIN_ROWS = [{"prompt": PROMPT.format(q=q)} for q in QUESTIONS[:160]]  # as llmops.monitor.run renders them
IN_DISTRIBUTION = [PROMPT.format(q=q) for q in QUESTIONS[160:]]  # held-out questions: same distribution


def _shifted(n: int = 60) -> list[str]:
    rng = random.Random(3)
    return [" ".join(rng.choice(OFF_TOPIC) for _ in range(rng.randint(60, 120))) for _ in range(n)]


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder holding a tiny model + tokenizer built from the tickets at `models/emb`."""
    from llmops.train.build import build_tiny_model

    root = tmp_path_factory.mktemp("embproj")
    rows = [json.loads(line) for line in TICKETS.read_text().splitlines() if line.strip()]
    texts = [r["question"] for r in rows] + [r["answer"] for r in rows]
    build_tiny_model({"hidden_size": 32, "layers": 1, "heads": 2, "intermediate_size": 64, "vocab_size": 384,
                      "max_position_embeddings": 256, "seed": 13}, texts, root / MODEL_REL)
    return root


def fill(root: Path, db: str, prompts: list[str], log_text: bool = True) -> str:
    """Log server-shaped records of `prompts` into a sqlite store; returns its URL."""
    url = f"sqlite:///{root / db}"
    store = open_store(url, log_text=log_text, flush_interval=0.01)
    for i, prompt in enumerate(prompts):
        store.log({"id": f"cmpl-{i}", "time": NOW - 600 + i, "path": "/v1/completions", "client": "c1",
                   "status": 200, "latency_ms": 40.0, "prompt": [prompt], "completion": ["Sure."],
                   "prompt_tokens": 20, "completion_tokens": 2})
    store.close()
    return url


def spec(url: str, **drift: object) -> dict:
    return {"window": 1000, "log_text": True, "store": url, "drift": {"embedding_model": MODEL_REL, **drift}}


def embedding(report) -> dict:
    return report.metrics["drift"]["embedding"]


def test_shifted_prompts_alert_and_in_distribution_prompts_do_not(model_root: Path) -> None:
    same = fill(model_root, "same.db", IN_DISTRIBUTION)
    shifted = fill(model_root, "shifted.db", _shifted())
    measured = embedding(run_monitor(model_root, "same", spec(same), TRAIN_ROWS, now=NOW))
    assert measured["status"] == "ok" and measured["requests"] == len(IN_DISTRIBUTION)
    assert measured["reference_texts"] == len(TRAIN_ROWS) and measured["noise_floor"] > 0
    limit = float(f"{5 * measured['noise_floor']:.2g}")  # a threshold a few noise floors above sampling noise

    ok = run_monitor(model_root, "same", spec(same, embedding_max=limit), TRAIN_ROWS, now=NOW)
    assert embedding(ok)["cosine_distance"] <= limit
    assert [a for a in ok.alerts if a.metric.startswith("drift.embedding")] == []

    bad = run_monitor(model_root, "shifted", spec(shifted, embedding_max=limit), TRAIN_ROWS, now=NOW)
    dist = embedding(bad)["cosine_distance"]
    assert dist > limit and dist > 10 * embedding(bad)["noise_floor"]
    alerts = [a for a in bad.alerts if a.metric == "drift.embedding.cosine_distance"]
    assert len(alerts) == 1 and alerts[0].value == dist and alerts[0].threshold == limit
    assert alerts[0].message.startswith(f"drift: embedding distance {dist:.2f} > {limit:g}")


def test_training_embeddings_are_cached_and_rebuilt_when_the_training_rows_change(model_root: Path,
                                                                                   tmp_path: Path) -> None:
    root = tmp_path / "proj"
    (root / "models").mkdir(parents=True)
    # A copy, not a symlink: a base model folder must resolve inside the project (hostile-input rule).
    shutil.copytree(model_root / MODEL_REL, root / MODEL_REL)
    url = fill(root, "log.db", IN_DISTRIBUTION[:40])
    embedder = TransformersEmbedder(root / MODEL_REL)

    first = embedding(run_monitor(root, "prod", spec(url), TRAIN_ROWS, now=NOW, embed=embedder))
    assert first["cache"] == "miss" and embedder.texts_embedded == len(TRAIN_ROWS) + 40
    cached = list((root / CACHE_DIR).glob("prod-*.npy"))
    assert len(cached) == 1

    second = embedding(run_monitor(root, "prod", spec(url), TRAIN_ROWS, now=NOW, embed=embedder))
    assert second["cache"] == "hit" and embedder.texts_embedded == len(TRAIN_ROWS) + 80  # only the window
    assert second["cosine_distance"] == pytest.approx(first["cosine_distance"], abs=1e-5)
    # the configured path (no embed passed) builds its own embedder and finds the same entry
    assert embedding(run_monitor(root, "prod", spec(url), TRAIN_ROWS, now=NOW))["cache"] == "hit"

    changed = embedding(run_monitor(root, "prod", spec(url), TRAIN_ROWS[:-1], now=NOW, embed=embedder))
    assert changed["cache"] == "miss" and embedder.texts_embedded == 2 * len(TRAIN_ROWS) - 1 + 120
    assert list((root / CACHE_DIR).glob("prod-*.npy")) != cached  # the old entry was replaced, not kept
    assert len(list((root / CACHE_DIR).glob("prod-*.npy"))) == 1


def test_embedding_drift_needs_log_text(tmp_path: Path) -> None:
    url = fill(tmp_path, "log.db", IN_DISTRIBUTION[:40], log_text=False)
    mon = {"store": url, "drift": {"embedding_model": "no/such/model", "embedding_max": 0.0}}
    report = run_monitor(tmp_path, "prod", mon, TRAIN_ROWS, now=NOW)
    assert embedding(report) == {"status": "needs log_text", "detail": "embedding drift needs log_text: true"}
    assert not any(a.metric.startswith("drift.embedding") for a in report.alerts)
    # with log_text on but a store that never logged texts, the same advice is not given
    report = run_monitor(tmp_path, "prod", {**mon, "log_text": True}, TRAIN_ROWS, now=NOW)
    assert embedding(report)["status"] == "no logged texts"


def test_a_missing_embedding_model_is_one_clear_error(tmp_path: Path) -> None:
    url = fill(tmp_path, "log.db", IN_DISTRIBUTION[:40])
    with pytest.raises(MonitorError, match=r"monitors\.prod\.drift\.embedding_model: model folder .*no/such"):
        run_monitor(tmp_path, "prod", {**spec(url), "drift": {"embedding_model": "no/such"}}, TRAIN_ROWS, now=NOW)
    with pytest.raises(MonitorError, match="base_model.*llmops.lock"):
        run_monitor(tmp_path, "prod", {**spec(url), "drift": {"embedding_model": "base_model"}}, TRAIN_ROWS, now=NOW)


@pytest.mark.parametrize("drift, valid", [
    ({"embedding_model": "models/emb", "embedding_max": 0.2}, True),
    ({"embedding_model": "base_model", "embedding_max": 0, "psi_max": 0.2}, True),
    ({"embedding_model": ""}, False),
    ({"embedding_model": 3}, False),
    ({"embedding_max": -0.1}, False),
    ({"embedding_max": 2.5}, False),
    ({"embedding_max": "0.2"}, False),
    ({"embedding_models": "models/emb"}, False),
])
def test_schema_accepts_the_embedding_keys(drift: dict, valid: bool) -> None:
    schema = json.loads((REPO / "llmops" / "schemas" / "llmops.schema.json").read_text())
    doc = yaml.safe_load((REPO / "example-project" / "llmops.yaml").read_text())
    doc["monitors"] = {"support-prod": {"log_text": True, "drift": drift}}
    errors = list(Draft202012Validator(schema).iter_errors(doc))
    assert (errors == []) is valid, [e.message for e in errors]
    drift_props = schema["$defs"]["monitor_fields"]["properties"]["drift"]["properties"]
    assert all(drift_props[k].get("description") for k in ("embedding_model", "embedding_max"))


LLMOPS_YAML = """\
version: 1
project: embmon
datasets:
  tickets: {source: data/tickets.jsonl}
prompts:
  support: {template: prompts/support.j2, variables: [question], response_field: answer}
base_models:
  tiny: {path: models/emb}
finetunes:
  lora: {base_model: tiny, dataset: tickets, prompt: support, adapter: {type: lora, r: 4, alpha: 8}}
deployments:
  prod: {model: lora}
monitors:
  prod:
    log_text: true
    drift: {embedding_model: base_model, embedding_max: 0.05}
"""


def _lock(train_path: str) -> dict:
    entry = {"fingerprint": "sha256:test", "spec": {}, "files": {}, "upstreams": {}, "inputs": {}, "outputs": {}}
    return {"lock_version": 1, "resources": {
        "datasets.tickets": {**entry, "outputs": {"train": {"path": train_path}}},
        "base_models.tiny": {**entry, "outputs": {"source": "path", "path": MODEL_REL}},
        "finetunes.lora": {**entry, "spec": {"base_model": "tiny", "dataset": "tickets", "prompt": "support"},
                           "upstreams": {"datasets.tickets": "sha256:d", "base_models.tiny": "sha256:b"}},
        "deployments.prod": {**entry, "outputs": {"model": "finetunes.lora"}},
    }}


def test_llmops_monitor_uses_the_fine_tunes_base_model(model_root: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from llmops.cli.main import main

    root = tmp_path / "proj"
    (root / "models").mkdir(parents=True)
    # A copy, not a symlink: a base model folder must resolve inside the project (hostile-input rule).
    shutil.copytree(model_root / MODEL_REL, root / MODEL_REL)
    (root / "prompts").mkdir()
    (root / "prompts" / "support.j2").write_text("### Question:\n{{ question }}\n### Answer:\n")
    (root / "data").mkdir()
    (root / "data" / "tickets.jsonl").write_text(TICKETS.read_text())
    train = ".llmops/data/tickets/train.jsonl"
    (root / train).parent.mkdir(parents=True)
    (root / train).write_text("".join(json.dumps({"question": q, "answer": "ok"}) + "\n" for q in QUESTIONS[:160]))
    (root / "llmops.yaml").write_text(LLMOPS_YAML)
    # A JSON round trip: shared dicts would be dumped as YAML aliases, which llmops never writes.
    (root / "llmops.lock").write_text(yaml.safe_dump(json.loads(json.dumps(_lock(train)))))
    fill(root, ".llmops/monitor/prod.db", _shifted(40))

    with pytest.raises(SystemExit) as exit_info:
        main(["-C", str(root), "monitor", "--json"])
    captured = capsys.readouterr()
    assert captured.out, captured.err
    out = json.loads(captured.out)
    emb = out[0]["metrics"]["drift"]["embedding"]
    assert emb["status"] == "ok" and emb["reference_texts"] == 160 and emb["cache"] == "miss"
    assert [a["metric"] for a in out[0]["alerts"]] == ["drift.embedding.cosine_distance"]
    assert exit_info.value.code == 3
    assert list((root / CACHE_DIR).glob("prod-*.npy"))

    with pytest.raises(SystemExit) as exit_info:  # the table, with the training side from the cache
        main(["-C", str(root), "monitor"])
    table = capsys.readouterr().out
    assert exit_info.value.code == 3
    assert "drift: embedding" in table and "noise floor" in table
    assert f"drift: embedding distance {emb['cosine_distance']:.2f} > 0.05" in table

    # Without stored texts there is nothing to embed: llmops.yaml itself is refused, with the fix.
    (root / "llmops.yaml").write_text(LLMOPS_YAML.replace("log_text: true", "log_text: false"))
    with pytest.raises(SystemExit) as exit_info:
        main(["-C", str(root), "monitor"])
    assert exit_info.value.code == 1
    assert "embedding drift needs the prompt texts" in capsys.readouterr().err
