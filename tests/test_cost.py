"""Cost estimates (llmops.engine.cost): scaled from the last recorded run, else a stated default;
what the plan shows of them; the comparison of two evals in the PR comment."""

from __future__ import annotations

import json

import pytest

from llmops.engine.cost import DEFAULTS, actual, describe, estimate_eval, estimate_finetune, total
from llmops.engine.plan import Plan, ResourceChange
from llmops.operations.plan_markdown import plan_to_markdown

LAST = {"cost": actual("cpu", 20.0, tokens=60_000, train_s=6.0, train_rows=200, trials=1, steps=150)}
TRAINING = {"epochs": 6}
DATASET = {"train": {"rows": 200, "path": "train.jsonl"}}


def test_the_last_run_is_scaled_by_epochs_rows_and_trials(tmp_path):
    same = estimate_finetune(tmp_path, TRAINING, 1, 0, LAST, TRAINING, DATASET, None)
    assert same["tokens"] == 60_000 and same["wall_s"] == pytest.approx(20.0)
    assert same["basis"] == "from the last run: 10,000 tokens/s on cpu, 14 s outside training"
    # Twice the epochs: twice the tokens and training seconds, the same time outside training.
    double = estimate_finetune(tmp_path, {"epochs": 12}, 1, 0, LAST, TRAINING, DATASET, None)
    assert double["tokens"] == 120_000 and double["wall_s"] == pytest.approx(14.0 + 12.0)
    # Half the rows, three trials of a sweep.
    half = estimate_finetune(tmp_path, TRAINING, 3, 0, LAST, TRAINING, {"train": {"rows": 100}}, None)
    assert half["tokens"] == 90_000
    capped = estimate_finetune(tmp_path, {"epochs": 6, "max_steps": 75}, 1, 0, LAST, TRAINING, DATASET, None)
    assert capped["tokens"] == 30_000


def test_without_a_run_the_default_per_device_is_stated(tmp_path):
    (tmp_path / "train.jsonl").write_text("x" * 40_000)
    cpu = estimate_finetune(tmp_path, TRAINING, 1, 0, None, None, DATASET, None)
    rate = DEFAULTS["cpu"]["train_tokens_per_s"]
    assert cpu["tokens"] == 60_000  # 40,000 bytes / 4 per token * 6 epochs
    assert cpu["wall_s"] == pytest.approx(DEFAULTS["cpu"]["train_overhead_s"] + 60_000 / rate)
    assert cpu["basis"].startswith("default for cpu") and "no run recorded yet" in cpu["basis"]
    # Two GPUs: the CUDA default, and GPU-hours for both.
    gpu = estimate_finetune(tmp_path, TRAINING, 1, 2, None, None, DATASET, None)
    assert gpu["device"] == "cuda" and gpu["gpu_hours"] == pytest.approx(gpu["wall_s"] * 2 / 3600, rel=1e-3)
    # A CPU run says nothing about a GPU job: the default is used, not the CPU throughput.
    moved = estimate_finetune(tmp_path, TRAINING, 1, 1, LAST, TRAINING, DATASET, None)
    assert moved["basis"].startswith("default for cuda")
    # Before the dataset exists: from the source file, or honestly unknown.
    (tmp_path / "src.jsonl").write_text("y" * 4_000)
    assert estimate_finetune(tmp_path, TRAINING, 1, 0, None, None, None, "src.jsonl")["tokens"] == 6_000
    unknown = estimate_finetune(tmp_path, TRAINING, 1, 0, None, None, None, "missing.jsonl")
    assert "wall_s" not in unknown and describe(unknown) == "unknown until the dataset is prepared"


def test_eval_estimates_scale_with_rows_and_repeats():
    last = {"rows": 20, "cost": actual("cpu", 4.0, tokens=640, rows=20, repeats=1)}
    est = estimate_eval(40, 2, 32, last)
    assert est["tokens"] == 40 * 2 * 32 and est["wall_s"] == pytest.approx(16.0)
    first = estimate_eval(10, 1, 32, None)
    expected = DEFAULTS["cpu"]["eval_overhead_s"] + 320 / DEFAULTS["cpu"]["gen_tokens_per_s"]
    assert first["wall_s"] == pytest.approx(expected, abs=0.05)  # rounded to 0.1 s
    assert estimate_eval(None, 1, 32, None)["basis"] == "unknown until the dataset is prepared"


def test_actuals_record_gpu_hours_only_on_gpus():
    assert actual("cpu", 3600, gpus=2)["gpu_hours"] == 0.0
    assert actual("cuda:0", 1800, gpus=2)["gpu_hours"] == 1.0


def _change(address, action, details):
    return ResourceChange(address=address, action=action, reasons=["training.learning_rate: 0.01 -> 0.008"],
                          details=details)


def test_plan_totals_and_renders_cost_and_comparison(tmp_path):
    from llmops.engine.planfile import plan_to_json

    ft = {"trials": 1, "cost": estimate_finetune(tmp_path, TRAINING, 1, 0, LAST, TRAINING, DATASET, None)}
    ev = {"cost": estimate_eval(20, 1, 32, None), "compared_to": "evals.base",
          "metrics": {"rougeL": {"last": 0.9, "compared": 0.1, "delta": 0.8, "threshold": ">= 0.4", "passes": True},
                      "latency_p95_ms": {"last": 40.0}}}
    noop = {"cost": {"device": "cpu", "tokens": 1, "wall_s": 1.0, "gpu_hours": 0.0, "basis": "x"}}
    plan = Plan([_change("finetunes.ft", "replace", ft), _change("evals.q", "replace", ev),
                 _change("evals.base", "no-op", noop)])
    tot = plan.cost()
    assert tot == {"actions": 2, "tokens": 60_000 + 640, "wall_s": pytest.approx(20.0 + ev["cost"]["wall_s"]),
                   "gpu_hours": 0.0}
    assert json.loads(plan_to_json(plan))["cost"]["actions"] == 2
    md = plan_to_markdown(plan, "p")
    assert "Estimated cost: ~60,640 tokens" in md and "over 2 training/eval actions." in md
    assert "- cost: ~60,000 tokens, ~20 s, 0 GPU-hours (from the last run: 10,000 tokens/s on cpu" in md
    assert "| metric | last applied | `evals.base` | delta | threshold | last value passes? |" in md
    assert "| rougeL | 0.9 | 0.1 | +0.8 | >= 0.4 | ✅ |" in md
    assert "| latency_p95_ms | 40 | — | — |  |  |" in md


def test_no_cost_no_total():
    assert total([{"device": "cpu", "basis": "unknown until the dataset is prepared"}]) is None
    assert Plan([_change("datasets.d", "create", {})]).cost() is None


# --- an eval's comparison with another eval (EvalsProvider, compare_to) -----------------------


def _recheck(tmp_path, compare_to, mine: dict, theirs: dict):
    """Apply an eval whose metrics are recorded (an `update`: gates re-checked, no model run)."""
    from llmops.engine.lockfile import LockedResource
    from llmops.providers.base import ApplyRequest, ProviderContext
    from llmops.providers.evals import EvalsProvider

    provider = EvalsProvider(ProviderContext(root=tmp_path, state_dir=tmp_path / ".llmops", settings={}))
    spec = {"model": "ft", "dataset": "d", "metrics": sorted(mine), "thresholds": {"rougeL": ">= 0.4"},
            "compare_to": compare_to}
    before = LockedResource("evals.q", "sha256:" + "0" * 64,
                            outputs={"model": "finetunes.ft", "metrics": mine, "run_id": "r1", "rows": 20})
    upstream = {"finetunes.ft": LockedResource("finetunes.ft", "f", outputs={"model_version": "2"}),
                "evals.base": LockedResource("evals.base", "b", outputs={"model": "base_models.m", "metrics": theirs})}
    request = ApplyRequest("evals.q", "q", spec, "update", "sha256:" + "1" * 64, before, upstream)
    return provider.apply(request).outputs


def test_min_gain_gates_in_each_metrics_better_direction(tmp_path):
    gains = {"eval": "base", "min_gain": {"rougeL": 0.2, "perplexity": 10}}
    out = _recheck(tmp_path, gains, {"rougeL": 0.5, "perplexity": 20.0}, {"rougeL": 0.25, "perplexity": 35.0})
    assert out["comparison"] == {"eval": "evals.base", "model": "base_models.m",
                                 "metrics": {"perplexity": {"value": 35.0, "delta": -15.0},
                                             "rougeL": {"value": 0.25, "delta": 0.25}}}
    rouge, ppl = out["gates"]["rougeL gain vs base"], out["gates"]["perplexity gain vs base"]
    assert (rouge["op"], rouge["threshold"], rouge["passed"]) == (">=", pytest.approx(0.45), True)
    assert (ppl["op"], ppl["threshold"], ppl["passed"]) == ("<=", 25.0, True)
    assert out["passed"] is True
    # A fine-tune that beats its base by less than asked fails the eval, whatever its level.
    short = _recheck(tmp_path, gains, {"rougeL": 0.5, "perplexity": 30.0}, {"rougeL": 0.35, "perplexity": 35.0})
    assert short["gates"]["rougeL"]["passed"] and not short["gates"]["rougeL gain vs base"]["passed"]
    assert not short["gates"]["perplexity gain vs base"]["passed"] and short["passed"] is False
    # Compared without gains: the deltas, and no extra gate.
    plain = _recheck(tmp_path, "base", {"rougeL": 0.5}, {"rougeL": 0.25})
    assert set(plain["gates"]) == {"rougeL"} and plain["comparison"]["metrics"]["rougeL"]["delta"] == 0.25


def test_compare_to_without_recorded_metrics_says_what_to_apply(tmp_path):
    from llmops.errors import ProviderError

    with pytest.raises(ProviderError) as info:
        _recheck(tmp_path, "base", {"rougeL": 0.5}, {})
    assert "compare_to: evals.base has no recorded metrics; apply it first" in info.value.message


def test_pretraining_is_priced_from_the_last_build_or_the_texts_size():
    from llmops.engine.cost import estimate_pretrain

    last = {"pretrain": {"steps": 160, "tokens": 150_000, "seconds": 10.0}}
    same = estimate_pretrain(20, last, 20, 200, 200, None)
    assert same["tokens"] == 150_000 and same["wall_s"] == pytest.approx(10.0)
    assert same["basis"] == "from the last build: 15,000 tokens/s on one cpu thread"
    longer = estimate_pretrain(40, last, 20, 300, 200, None)
    assert longer["tokens"] == 450_000 and longer["wall_s"] == pytest.approx(30.0)
    first = estimate_pretrain(20, None, None, None, None, 40_000)
    assert first["tokens"] == 200_000 and first["basis"].startswith("default for one cpu thread")
    assert "wall_s" not in estimate_pretrain(20, None, None, None, None, None)
