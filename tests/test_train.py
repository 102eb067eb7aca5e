"""The training job (`python -m llmops.train`): data, loss masking, packing, the loop,
MLflow logging and registration, sweeps, determinism, and resume after SIGKILL.

Everything is real: a tiny Llama built by llmops.train.build, peft LoRA, MLflow on SQLite.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import copy_prepared_mlflow_db

from llmops.train import spec as specs
from llmops.train.build import build_tiny_model
from llmops.train.data import IGNORE, Example, PromptRenderer, encode_example, make_rows, pack

COLOURS = ["red", "blue", "green", "yellow"]
TEMPLATE = "Q: {{ question }}\nA:"
# A random-init model's output layer is too weak to fit anything unless it is adapted too.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {"question": f"What colour is box {k}?", "answer": f"Box {k} is {COLOURS[k]}."}
        for k in ((i + offset) % 4 for i in range(n))
    ]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "model"
    texts = [f"{r['question']} {r['answer']}" for r in rows(40)] + ["Q: A:"]
    build_tiny_model({"hidden_size": 32, "heads": 2, "intermediate_size": 64, "vocab_size": 300,
                      "max_position_embeddings": 128}, texts, folder)
    return folder


def job_spec(tmp: Path, base: Path, tracking: bool = True, **overrides) -> dict:
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": "colours",
        "base_model": str(base),
        "train_path": str(write_jsonl(data / "train.jsonl", rows(24))),
        "eval_path": str(write_jsonl(data / "eval.jsonl", rows(8, offset=1))),
        "prompt": {"text": TEMPLATE, "response_field": "answer"},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS},
        "training": {"epochs": 4, "learning_rate": 3e-2, "batch_size": 4, "max_seq_length": 64, "seed": 7},
        "output_dir": str(tmp / "run"),
        "checkpoint_dir": str(tmp / "run" / "checkpoints"),
        "tracking_uri": tracking_store(tmp / "mlflow.db") if tracking else None,
        "artifact_location": (tmp / "artifacts").as_uri(),
        "experiment": "tests",
        "registered_model": "colours",
        "tags": {"llmops.dataset.train_md5": "abc123", "llmops.base_model_files_sha": "def456",
                 "llmops.git_commit": "0" * 40, "llmops.version": "0.1.0"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def tracking_store(db: Path) -> str:
    """The URI of an empty MLflow store at DB (a copy of the session's prepared one: the job's
    helper opens it as it would a store it created, without running MLflow's migrations)."""
    copy_prepared_mlflow_db(db, db.parent / "mlruns")
    return f"sqlite:///{db}"


def run_in_process(spec: dict, capsys) -> tuple[dict, list[dict]]:
    from llmops.train.job import run_job

    result = run_job(spec)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return result, events


# -- pure pieces -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sweep, count, first",
    [
        (None, 1, {}),
        ({"training.learning_rate": [1e-4, 2e-4]}, 2, {"training.learning_rate": 1e-4}),
        (
            {"training.learning_rate": [1e-4, 2e-4], "adapter.r": [8, 16]},
            4,
            {"adapter.r": 8, "training.learning_rate": 1e-4},
        ),
    ],
)
def test_expand_sweep(sweep, count, first):
    trials = specs.expand_sweep(sweep)
    assert len(trials) == count
    assert trials[0] == first
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == count


def test_sweep_rejects_unknown_section():
    from llmops.errors import ProviderError

    with pytest.raises(ProviderError, match="parameter path"):
        specs.expand_sweep({"optimizer.lr": [1]})


@pytest.mark.parametrize(
    "kind, step, expected",
    [
        ("linear", 0, 1 / 3),  # warm-up: 2 steps
        ("linear", 2, 1.0),
        ("linear", 7, 0.375),
        ("cosine", 2, 1.0),
        ("cosine", 6, 0.5),
        ("constant", 9, 1.0),
    ],
)
def test_lr_schedule(kind, step, expected):
    from llmops.train.loop import lr_lambda

    assert lr_lambda(kind, 2, 10)(step) == pytest.approx(expected)


def test_plan_steps_defaults_to_saving_each_epoch():
    t = specs.resolve_training({"epochs": 2, "gradient_accumulation_steps": 2})
    assert specs.plan_steps(t, 7) == (4, 8, 4)
    t = specs.resolve_training({"max_steps": 500})
    assert specs.plan_steps(t, 1000) == (1000, 500, specs.DEFAULT_SAVE_EVERY)


def test_loss_masks_prompt_tokens(base):
    from llmops.train.model import load_tokenizer

    tok = load_tokenizer(base)
    prompt, response = PromptRenderer({"text": TEMPLATE}).render(rows(1)[0])
    ex = encode_example(tok, prompt, response, 64)
    n_prompt = 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])  # BOS + prompt
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[-1] == tok.eos_token_id
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert tok.decode(ex.input_ids[n_prompt:-1]).strip() == response
    # Truncation keeps the mask aligned.
    short = encode_example(tok, prompt, response, n_prompt + 2)
    assert len(short.input_ids) == n_prompt + 2 and short.labels[-2:] == short.input_ids[-2:]


def test_renderer_reports_missing_response_field():
    from llmops.errors import ProviderError

    with pytest.raises(ProviderError, match="response_field"):
        PromptRenderer({"text": TEMPLATE, "response_field": "reply"}).render(rows(1)[0])


@pytest.mark.parametrize("text, message", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}{{ question }}", "failed to render .*unsafe"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ question }}",
     "render budget .*loops ran more than"),
    ("{% for x in %}", "does not parse .*line 1"),
])
def test_training_renders_prompts_in_the_sandbox_under_the_budgets(text, message):
    """The training job renders as evals and serving do (llmops.templating's sandbox): a
    template that reaches for Python internals or loops without end fails with a clear error."""
    from llmops.errors import ProviderError

    with pytest.raises(ProviderError, match=message):
        PromptRenderer({"text": text}).render(rows(1)[0])


def test_pack_fits_every_example_once():
    examples = [Example([i] * n, [i] * n) for i, n in enumerate([50, 10, 30, 64, 5, 20, 33, 1])]
    bins = pack(examples, 64)
    assert sorted(id(e) for b in bins for e in b) == sorted(id(e) for e in examples)
    assert all(sum(len(e) for e in b) <= 64 for b in bins)
    assert len(bins) == 4  # 213 tokens need at least 4 rows of 64
    rows_ = make_rows(examples, 64, packing=True)
    for r in rows_:
        starts = [i for i, p in enumerate(r.position_ids) if p == 0]
        assert len(starts) == len(set(r.input_ids)) and starts[0] == 0


def test_packed_examples_do_not_attend_to_each_other(base):
    """The loss of a packed row equals the summed losses of its examples run one by one."""
    import torch

    from llmops.train.data import collate, encode_rows
    from llmops.train.loop import _loss_module
    from llmops.train.model import load_model, load_tokenizer

    tok = load_tokenizer(base)
    training = specs.resolve_training({"max_seq_length": 64, "packing": True})
    model = load_model(base, specs.resolve_adapter({"dropout": 0.0}), training, "cpu").eval()
    loss = _loss_module(model, chunk_tokens=7)  # several chunks: exercises chunked CE too
    examples = encode_rows(rows(5), PromptRenderer({"text": TEMPLATE}), tok, 64)
    packed = make_rows(examples, 64, packing=True)
    assert len(packed) < len(examples)
    single = make_rows(examples, 64, packing=False)
    with torch.no_grad():
        together = float(loss(**_tensors(collate(packed, tok.pad_token_id, True))))
        apart = sum(float(loss(**_tensors(collate([r], tok.pad_token_id, False)))) for r in single)
        padded = float(loss(**_tensors(collate(single, tok.pad_token_id, False))))
    assert together == pytest.approx(apart, rel=1e-4)
    assert padded == pytest.approx(apart, rel=1e-4)


def _tensors(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("n_tokens", "n_labels")}


# -- the job -------------------------------------------------------------------------------


def test_train_end_to_end_logs_and_registers(tmp_path, base, capsys):
    spec = job_spec(tmp_path, base, export={"merge": True})
    result, events = run_in_process(spec, capsys)

    adapter = Path(result["adapter"]["path"])
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    from llmops.hashing import file_sha256 as sha256_file

    assert result["adapter"]["sha256"] == sha256_file(adapter / "adapter_model.safetensors")
    assert (Path(result["tokenizer"]["path"]) / "tokenizer.json").is_file()
    assert (Path(result["merged"]["path"]) / "model.safetensors").is_file()

    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 25))  # 24 rows / 4 per batch * 4 epochs
    first, last = steps[:6], steps[-6:]
    assert sum(e["loss"] for e in last) / 6 < 0.6 * sum(e["loss"] for e in first) / 6
    assert all(e["tokens_per_s"] > 0 for e in steps)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["training.learning_rate"] == "0.03" and run.data.params["adapter.r"] == "4"
    expected = {"loss", "learning_rate", "tokens_per_s", "train_loss", "eval_loss", "peak_memory_mb"}
    assert expected <= set(run.data.metrics)
    assert len(client.get_metric_history(result["run_id"], "loss")) == 24
    assert run.data.tags["llmops.dataset.train_md5"] == "abc123"
    assert run.data.tags["llmops.git_commit"] == "0" * 40
    artifacts = {a.path for a in client.list_artifacts(result["run_id"], "model/artifacts")}
    assert {"model/artifacts/adapter", "model/artifacts/tokenizer"} <= artifacts  # a pyfunc model (MLmodel)
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(result["run_id"], "model")}
    assert "merged/model.safetensors" in {a.path for a in client.list_artifacts(result["run_id"], "merged")}

    version = client.get_model_version("colours", result["model_version"])
    assert version.run_id == result["run_id"]
    assert version.tags["llmops.base_model_files_sha"] == "def456"
    assert version.tags["llmops.adapter_sha256"] == result["adapter"]["sha256"]
    assert version.source.endswith("/model")

    # The merged model computes what base + adapter compute.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 12, 40]])
    merged = AutoModelForCausalLM.from_pretrained(result["merged"]["path"]).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-4)


def test_same_seed_same_adapter(tmp_path, base, capsys):
    a, _ = run_in_process(job_spec(tmp_path / "a", base, tracking=False, training={"epochs": 1}), capsys)
    b, _ = run_in_process(job_spec(tmp_path / "b", base, tracking=False, training={"epochs": 1}), capsys)
    c, _ = run_in_process(job_spec(tmp_path / "c", base, tracking=False, training={"epochs": 1, "seed": 8}), capsys)
    assert a["adapter"]["sha256"] == b["adapter"]["sha256"]
    assert a["adapter"]["sha256"] != c["adapter"]["sha256"]


def test_sweep_keeps_the_trial_with_lowest_eval_loss(tmp_path, base, capsys):
    spec = job_spec(
        tmp_path,
        base,
        training={"epochs": 2},
        sweep={"training.learning_rate": [1e-5, 3e-2], "adapter.r": [2, 4]},
        select={"metric": "eval_loss", "mode": "min"},
    )
    result, events = run_in_process(spec, capsys)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    losses = {int(k): t["metrics"]["eval_loss"] for k, t in state["trials"].items()}
    assert len(losses) == 4 and result["trials"] == 4
    best = min(losses, key=losses.get)
    assert result["best_trial"]["index"] == best
    assert result["best_trial"]["params"]["training.learning_rate"] == 3e-2
    assert result["metrics"]["eval_loss"] == losses[best]
    # The exported adapter is the best trial's.
    from llmops.hashing import file_sha256 as sha256_file

    best_file = Path(state["trials"][str(best)]["dir"]) / "adapter" / "adapter_model.safetensors"
    assert result["adapter"]["sha256"] == sha256_file(best_file)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec["tracking_uri"])
    children = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result['run_id']}'",
    )
    assert len(children) == 4
    assert {c.info.run_id for c in children} == {t["run_id"] for t in state["trials"].values()}
    assert client.get_run(result["run_id"]).data.metrics["eval_loss"] == pytest.approx(losses[best])


def test_killed_job_resumes_from_checkpoint(tmp_path, base, capsys):
    """SIGKILL mid-run, in the second of four epochs (6 steps each); the next run resumes at the
    saved step and ends where an unbroken run ends (which shuffles every epoch anew)."""
    from llmops.runners.base import Job
    from llmops.runners.local import LocalRunner

    overrides = {"training": {"save_steps": 3}}
    spec = job_spec(tmp_path, base, tracking=False, **overrides)
    spec_path = tmp_path / "job.json"
    spec_path.write_text(json.dumps(spec))
    job = Job(name="t", module="llmops.train", args=[str(spec_path)], workdir=tmp_path, log_path=tmp_path / "log")
    seen: list[dict] = []

    def kill_at_step_10(line: str) -> None:
        if line.startswith("{"):
            event = json.loads(line)
            seen.append(event)
            if event["event"] == "step" and event["step"] == 10:
                os.kill(next(e["pid"] for e in seen if e["event"] == "start"), signal.SIGKILL)

    first = LocalRunner().run(job, kill_at_step_10)
    assert first.exit_code == -signal.SIGKILL
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "trial-0").iterdir())
    saved = int(ckpts[-1].split("-")[1])
    assert saved >= 9 and saved % 3 == 0 and len(ckpts) == 1

    # The next run, here in this process (a job keeps nothing but what is on disk; the killed
    # one above is the real process that matters), resumes from there.
    capsys.readouterr()
    resumed, seen = run_in_process(spec, capsys)
    resume = [e for e in seen if e["event"] == "resume"]
    assert resume and resume[0]["step"] == saved
    steps = [e["step"] for e in seen if e["event"] == "step"]
    assert steps[0] == saved + 1 and steps[-1] == 24
    assert not (tmp_path / "run" / "checkpoints" / "trial-0").exists()

    # Resuming restores optimizer, scheduler and RNG state: same adapter as an unbroken run.
    unbroken, _ = run_in_process(job_spec(tmp_path / "u", base, tracking=False, **overrides), capsys)
    assert resumed["adapter"]["sha256"] == unbroken["adapter"]["sha256"]


def test_job_exits_non_zero_with_a_clear_error(tmp_path, base, capsys):
    from llmops.train.job import main

    spec = job_spec(tmp_path, base, tracking=False, prompt={"text": TEMPLATE, "response_field": "reply"})
    (tmp_path / "job.json").write_text(json.dumps(spec))
    assert main([str(tmp_path / "job.json")]) == 1
    assert "no field 'reply'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # found before the job loaded anything or wrote its state


def test_job_process_never_imports_mlflow_and_still_logs(tmp_path, base):
    """The job's MLflow calls run in its helper process: the job itself never imports mlflow."""
    import subprocess
    import sys

    spec = job_spec(tmp_path, base, training={"epochs": 1})
    (tmp_path / "job.json").write_text(json.dumps(spec))
    probe = (
        "import json, runpy, sys\n"
        "sys.argv = ['llmops.train', sys.argv[1]]\n"
        "code = 0\n"
        "try:\n"
        "    runpy.run_module('llmops.train', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'pandas'))\n"
        "print('LOADED ' + json.dumps(loaded), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "job.json")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(next(line for line in proc.stderr.splitlines() if line.startswith("LOADED "))[7:])
    assert loaded == []
    done = next(json.loads(line) for line in proc.stdout.splitlines() if '"event": "done"' in line)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec["tracking_uri"])
    run = client.get_run(done["run_id"])
    assert run.info.status == "FINISHED" and len(client.get_metric_history(done["run_id"], "loss")) == 6
    assert client.get_model_version("colours", done["model_version"]).run_id == done["run_id"]


def test_a_dead_tracking_helper_is_a_clear_error(tmp_path):
    from llmops.errors import ProviderError
    from llmops.train.track import Tracker

    tracker = Tracker(tracking_store(tmp_path / "mlflow.db"))
    try:
        assert tracker.experiment("t", None)
        tracker._proc.kill()
        tracker._proc.wait()
        with pytest.raises(ProviderError, match="MLflow helper process stopped .*during `start`"):
            tracker.start(None, "r", {})
    finally:
        tracker.close()
