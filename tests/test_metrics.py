"""Metrics against documented and hand-computed values; thresholds, regressions, repeats."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llmops.evals.metrics import (
    METRICS,
    MetricError,
    aggregate_repeats,
    check_gate,
    check_regression,
    compute_metrics,
    parse_threshold,
    percentile,
    resolve_metrics,
)

# sacrebleu's README ("Using SacreBLEU from Python"): two reference streams.
SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS_A = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]
REFS_B = ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]


def run(name: str, preds: list[str], refs: list, extras: dict | None = None) -> float:
    values, skipped = compute_metrics([METRICS[name]], preds, refs, extras or {})
    assert not skipped, skipped
    return values[name]


def test_bleu_matches_sacrebleu_readme() -> None:
    # README: BLEU = 48.53 82.4/50.0/45.5/37.5 ... reported here on 0..1.
    assert run("bleu", SYS, [[a, b] for a, b in zip(REFS_A, REFS_B)]) == pytest.approx(0.4853, abs=5e-5)


def test_bleu_with_a_variable_number_of_references_matches_readme() -> None:
    # README "Variable Number of References": drop the first reference of the first sentence -> 29.44.
    refs = [[REFS_B[0]], [REFS_A[1], REFS_B[1]], [REFS_A[2], REFS_B[2]]]
    assert run("bleu", SYS, refs) == pytest.approx(0.2944, abs=5e-5)


def test_chrf_matches_sacrebleu_readme() -> None:
    # README: chrF2 = 59.73
    assert run("chrf", SYS, [[a, b] for a, b in zip(REFS_A, REFS_B)]) == pytest.approx(0.5973, abs=5e-5)


def test_rouge_on_rouge_score_readme_pair_by_hand() -> None:
    # rouge-score README: score('The quick brown fox jumps over the lazy dog', 'The quick brown dog jumps on the log.')
    # Stemmed tokens: target the quick brown fox jump over the lazi dog (9), prediction the quick brown dog
    # jump on the log (8). Unigram overlap 6 -> F = 2*6/(8+9) = 12/17; bigram overlap 2 (the quick,
    # quick brown) of 7 and 8 -> F = 4/15; LCS the quick brown jump the = 5 -> F = 10/17.
    pred, ref = ["The quick brown dog jumps on the log."], ["The quick brown fox jumps over the lazy dog"]
    assert run("rouge1", pred, ref) == pytest.approx(12 / 17)
    assert run("rouge2", pred, ref) == pytest.approx(4 / 15)
    assert run("rougeL", pred, ref) == pytest.approx(10 / 17)


def test_rouge_is_the_mean_over_rows_of_the_best_reference() -> None:
    preds = ["a b c d", "x y"]
    refs = [["zzz", "a b c d"], ["x q"]]  # row 1: perfect via the 2nd reference; row 2: P=R=1/2
    assert run("rouge1", preds, refs) == pytest.approx((1.0 + 0.5) / 2)


def test_exact_match_ignores_case_and_whitespace_and_accepts_any_reference() -> None:
    preds = ["  Paris\n", "the  Quick\tfox", "Berlin", "Rome"]
    refs = ["paris", ["nope", "The quick fox"], "Bern", ["Roma", "rome "]]
    assert run("exact_match", preds, refs) == pytest.approx(3 / 4)


def test_perplexity_is_exp_of_token_weighted_mean_nll() -> None:
    extras = {"nll_sum": 3 * math.log(2) + 1 * math.log(16), "nll_tokens": 4}  # mean ln(2^(7/4))
    assert run("perplexity", ["x"], ["y"], extras) == pytest.approx(2 ** (7 / 4))
    assert METRICS["perplexity"].higher_is_better is False


def test_latency_percentiles_interpolate_linearly() -> None:
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([10, 20, 30, 40, 50], 95) == pytest.approx(48.0)
    extras = {"latency_ms": [10.0, 20.0, 30.0, 40.0, 50.0]}
    assert run("latency_p50_ms", ["a"] * 5, ["b"] * 5, extras) == 30.0
    assert run("latency_p95_ms", ["a"] * 5, ["b"] * 5, extras) == pytest.approx(48.0)


def test_tokens_per_second() -> None:
    extras = {"completion_tokens": [10, 20], "generation_seconds": 1.5}
    assert run("tokens_per_s", ["a", "b"], ["a", "b"], extras) == pytest.approx(20.0)


def test_metrics_without_their_measurements_are_skipped_not_failed() -> None:
    values, skipped = compute_metrics(
        [METRICS["exact_match"], METRICS["perplexity"], METRICS["latency_p95_ms"]], ["a"], ["a"], {}
    )
    assert values == {"exact_match": 1.0}
    assert set(skipped) == {"perplexity", "latency_p95_ms"} and "nll_sum" in skipped["perplexity"]


def test_empty_or_mismatched_sets_are_errors() -> None:
    with pytest.raises(MetricError, match="empty"):
        compute_metrics([METRICS["bleu"]], [], [])
    with pytest.raises(MetricError, match="2 predictions but 1 references"):
        compute_metrics([METRICS["bleu"]], ["a", "b"], ["a"])


def test_every_builtin_metric_has_a_docstring() -> None:
    assert {"exact_match", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "perplexity", "latency_p50_ms",
            "latency_p95_ms", "tokens_per_s"} <= set(METRICS)
    assert all(m.doc for m in METRICS.values())


def test_custom_metric_is_imported_from_the_project_folder(tmp_path: Path) -> None:
    (tmp_path / "proj_metrics_ok.py").write_text(
        "def length_ratio(predictions, references, extras):\n"
        "    return sum(len(p) for p in predictions) / sum(len(r[0]) for r in references)\n"
        "def distance(predictions, references, extras):\n    return 3.0\n"
        "distance.higher_is_better = False\n"
    )
    metrics = resolve_metrics(
        ["exact_match", {"name": "ratio", "python": "proj_metrics_ok:length_ratio"},
         {"name": "dist", "python": "proj_metrics_ok:distance"}], tmp_path
    )
    values, _ = compute_metrics(metrics, ["abcd", "ef"], ["ab", "ef"])
    assert values == {"exact_match": 0.5, "ratio": 1.5, "dist": 3.0}
    assert [m.higher_is_better for m in metrics] == [True, True, False]


def test_custom_metric_errors_are_clear(tmp_path: Path) -> None:
    (tmp_path / "proj_metrics_bad.py").write_text("x = 1\n")
    with pytest.raises(MetricError, match="module 'no_such_mod' not found in the project folder"):
        resolve_metrics([{"name": "m", "python": "no_such_mod:f"}], tmp_path)
    with pytest.raises(MetricError, match="has no function 'f'"):
        resolve_metrics([{"name": "m", "python": "proj_metrics_bad:f"}], tmp_path)
    with pytest.raises(MetricError, match="module:function"):
        resolve_metrics([{"name": "m", "python": "not a target"}], tmp_path)
    with pytest.raises(MetricError, match="did you mean 'rougeL'"):
        resolve_metrics(["rougel"], tmp_path)


@pytest.mark.parametrize(
    ("expr", "parsed"),
    [(">= 0.30", (">=", 0.30)), ("<=40", ("<=", 40.0)), ("> -1.5e-3", (">", -0.0015)), ("< .5", ("<", 0.5)),
     ("== 1", ("==", 1.0))],
)
def test_parse_threshold(expr: str, parsed: tuple[str, float]) -> None:
    assert parse_threshold(expr) == parsed


@pytest.mark.parametrize("expr", ["0.3", ">= ", "=> 0.3", ">= 0.3 0.4", "about 3", "!= 2"])
def test_parse_threshold_rejects_bad_expressions(expr: str) -> None:
    with pytest.raises(MetricError, match="operator and a number"):
        parse_threshold(expr)


@pytest.mark.parametrize(
    ("value", "expr", "passed", "margin"),
    [
        (0.25, ">= 0.30", False, -0.05),
        (0.30, ">= 0.30", True, 0.0),
        (0.30, "> 0.30", False, 0.0),
        (35.0, "<= 40", True, 5.0),
        (41.0, "< 40", False, -1.0),
        (1.0, "== 1", True, 0.0),
        (1.2, "== 1", False, -0.2),
        (float("nan"), "<= 40", False, None),
    ],
)
def test_check_gate_margins_are_signed(value: float, expr: str, passed: bool, margin: float | None) -> None:
    gate = check_gate("m", value, expr)
    assert gate.passed is passed
    if margin is None:
        assert math.isnan(gate.margin)
    else:
        assert gate.margin == pytest.approx(margin)
    assert ("passed by" if passed else "missed by") in gate.describe()


def test_failed_gate_message_says_by_how_much() -> None:
    assert check_gate("rougeL", 0.25, ">= 0.30").describe() == "rougeL = 0.25, needs >= 0.3: missed by 0.05"


def test_regression_limits() -> None:
    drop = check_regression("rougeL", 0.38, 0.40, max_drop=0.01)
    assert (drop.op, drop.threshold, drop.passed, drop.baseline) == (">=", pytest.approx(0.39), False, 0.40)
    assert drop.margin == pytest.approx(-0.01)
    rise = check_regression("perplexity", 10.5, 10.0, max_rise=1.0)
    assert (rise.op, rise.threshold, rise.passed) == ("<=", 11.0, True)
    # With no limit a metric may not get worse, in its own direction.
    assert check_regression("perplexity", 10.1, 10.0).passed is False
    assert check_regression("perplexity", 9.9, 10.0).passed is True
    assert check_regression("bleu", 0.31, 0.30).passed is True
    assert check_regression("custom", 0.29, 0.30, higher_is_better=True).passed is False
    # Both limits: the worse check is reported.
    both = check_regression("x", 0.5, 0.45, max_drop=0.1, max_rise=0.02)
    assert (both.op, both.passed) == ("<=", False)


def test_aggregate_repeats_mean_and_sample_std() -> None:
    mean, std = aggregate_repeats([{"bleu": 1.0, "em": 0.5}, {"bleu": 2.0, "em": 0.5}, {"bleu": 3.0, "em": 0.5}])
    assert mean == {"bleu": 2.0, "em": 0.5} and std == {"bleu": 1.0, "em": 0.0}
    assert aggregate_repeats([{"bleu": 0.4}]) == ({"bleu": 0.4}, {"bleu": 0.0})


def test_recorded_metrics_keep_six_significant_digits_whatever_their_scale():
    from llmops.evals.metrics import round_metric

    assert round_metric(0.123456789) == 0.123457
    assert round_metric(35.123456789) == 35.1235
    assert round_metric(3.21987654e-07) == 3.21988e-07  # 6 decimals would record 0.0
    assert round_metric(8) == 8 and isinstance(round_metric(8), int)  # a step count stays a count
    assert round_metric(None) is None and round_metric("n/a") == "n/a"
