"""Evaluation metrics, threshold gates and baseline regression checks.

Every metric is defined once, below, as a function over
`(predictions, references, extras) -> float` and registered in `METRICS`:

- `predictions[i]` is the model's text for row i; `references[i]` is the list of
  acceptable answers for row i (one or more; multi-reference metrics use them all);
- `extras` holds what the evaluator measured besides texts (all optional):
  `latency_ms` (per row), `completion_tokens` (per row), `generation_seconds` (total wall
  time spent generating), `nll_sum` / `nll_tokens` (summed negative log-likelihood of the
  reference answers given their prompts, and how many tokens it covers), `prompts`, `rows`.

Scales: every text metric is on 0..1 (sacrebleu's 0..100 BLEU and chrF are divided by 100)
so thresholds such as `">= 0.30"` read the same for all of them. A metric that needs an
extra the evaluator could not measure raises `MetricUnavailable`; `compute_metrics` reports
it under `skipped` instead of failing the whole evaluation.

Safety metrics (`prompt_injection_resistance`, `pii_leak_rate`, `refusal_rate`, see
`llmops.evals.safety`) run their versioned probe sets through `extras["generate"]`
(`prompts -> texts`, the evaluated model with the eval's decoding), rendered by
`extras["render"]` (`(system, user) -> prompt`); each stores `(probe set label, details)`
in the dict `extras["safety"]` when the evaluator passes one.

Custom metrics (`{name, python: "module:function"}`) are imported from the project folder
and called with the same three arguments; a function attribute `higher_is_better = False`
marks a lower-is-better metric (default: higher is better).
"""

from __future__ import annotations

import difflib
import importlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from llmops.errors import LlmopsError
from llmops.evals.safety import SAFETY_METRICS, SafetyResult

Extras = dict[str, Any]
MetricFn = Callable[[list[str], list[list[str]], Extras], float]


class MetricError(LlmopsError):
    """A metric or threshold in the config cannot be used (unknown, bad syntax, import failure)."""


class MetricUnavailable(MetricError):
    """The evaluator did not measure what this metric needs (e.g. perplexity of an endpoint)."""


@dataclass(frozen=True)
class Metric:
    """A named metric; `fn` computes one number for a whole evaluation set."""

    name: str
    higher_is_better: bool
    fn: MetricFn
    doc: str = ""

    def __call__(self, predictions: list[str], references: list[list[str]], extras: Extras) -> float:
        return float(self.fn(predictions, references, extras))


METRICS: dict[str, Metric] = {}


def _metric(name: str, higher_is_better: bool = True) -> Callable[[MetricFn], MetricFn]:
    def register(fn: MetricFn) -> MetricFn:
        METRICS[name] = Metric(name, higher_is_better, fn, (fn.__doc__ or "").strip())
        return fn

    return register


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


@_metric("exact_match")
def exact_match(predictions: list[str], references: list[list[str]], extras: Extras) -> float:
    """Fraction of rows whose prediction equals one of its references, ignoring case and
    differences in whitespace (runs of spaces/newlines count as one space; ends stripped)."""
    hits = sum(
        any(_normalise(p) == _normalise(r) for r in refs) for p, refs in zip(predictions, references)
    )
    return hits / len(predictions)


def _reference_streams(references: list[list[str]]) -> list[list[str]]:
    """sacrebleu wants one stream per reference position; rows with fewer references get None."""
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]  # type: ignore[misc]


@_metric("bleu")
def bleu(predictions: list[str], references: list[list[str]], extras: Extras) -> float:
    """sacrebleu corpus BLEU with its defaults (13a tokenisation, exponential smoothing),
    divided by 100: 0..1."""
    from sacrebleu.metrics import BLEU

    return BLEU().corpus_score(predictions, _reference_streams(references)).score / 100.0


@_metric("chrf")
def chrf(predictions: list[str], references: list[list[str]], extras: Extras) -> float:
    """sacrebleu corpus chrF (character 6-grams, beta 2) divided by 100: 0..1."""
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score(predictions, _reference_streams(references)).score / 100.0


def _rouge(kind: str, predictions: list[str], references: list[list[str]]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([kind], use_stemmer=True)
    total = 0.0
    for pred, refs in zip(predictions, references):
        total += scorer.score_multi(refs, pred)[kind].fmeasure
    return total / len(predictions)


@_metric("rouge1")
def rouge1(predictions: list[str], references: list[list[str]], extras: Extras) -> float:
    """Mean ROUGE-1 F-measure (rouge-score, Porter stemmer; best reference per row)."""
    return _rouge("rouge1", predictions, references)


@_metric("rouge2")
def rouge2(predictions: list[str], references: list[list[str]], extras: Extras) -> float:
    """Mean ROUGE-2 F-measure (rouge-score, Porter stemmer; best reference per row)."""
    return _rouge("rouge2", predictions, references)


@_metric("rougeL")
def rouge_l(predictions: list[str], references: list[list[str]], extras: Extras) -> float:
    """Mean ROUGE-L (longest common subsequence) F-measure (rouge-score, Porter stemmer)."""
    return _rouge("rougeL", predictions, references)


def _need(extras: Extras, key: str, metric: str) -> Any:
    if extras.get(key) is None:
        raise MetricUnavailable(f"metric {metric} needs `{key}`, which this evaluation did not measure")
    return extras[key]


@_metric("perplexity", higher_is_better=False)
def perplexity(predictions: list[str], references: list[list[str]], extras: Extras) -> float:
    """exp(mean negative log-likelihood per token) of the first reference answer of each row
    given its prompt, over all reference tokens of the set (token-weighted)."""
    nll_sum = float(_need(extras, "nll_sum", "perplexity"))
    tokens = int(_need(extras, "nll_tokens", "perplexity"))
    if tokens <= 0:
        raise MetricUnavailable("metric perplexity needs at least one reference token")
    return math.exp(nll_sum / tokens)


METRIC_DIGITS = 6  # significant digits a recorded metric keeps


def round_metric(value: Any) -> Any:
    """A metric as llmops records it (eval and fine-tune outputs, comparisons): a float to
    `METRIC_DIGITS` significant digits, so the rule does not depend on the metric's scale
    (a loss of 3.2e-07 keeps its digits, a perplexity of 35.1234567 drops its noise);
    ints (step counts) and anything else unchanged."""
    if isinstance(value, float):
        return float(f"{value:.{METRIC_DIGITS}g}")
    return value


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default), e.g. p50 of [1, 2, 3, 4] is 2.5."""
    ordered = sorted(values)
    if not ordered:
        raise MetricUnavailable("no values to take a percentile of")
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@_metric("latency_p50_ms", higher_is_better=False)
def latency_p50_ms(predictions: list[str], references: list[list[str]], extras: Extras) -> float:
    """Median time from sending a request to having its whole answer, in milliseconds.
    In batched local evaluation every row of a batch waits for the whole batch."""
    return percentile(_need(extras, "latency_ms", "latency_p50_ms"), 50)


@_metric("latency_p95_ms", higher_is_better=False)
def latency_p95_ms(predictions: list[str], references: list[list[str]], extras: Extras) -> float:
    """95th percentile of per-request latency in milliseconds (see latency_p50_ms)."""
    return percentile(_need(extras, "latency_ms", "latency_p95_ms"), 95)


@_metric("tokens_per_s")
def tokens_per_s(predictions: list[str], references: list[list[str]], extras: Extras) -> float:
    """Generated tokens per second of generation wall time (all rows together)."""
    tokens = sum(_need(extras, "completion_tokens", "tokens_per_s"))
    seconds = float(_need(extras, "generation_seconds", "tokens_per_s"))
    if seconds <= 0:
        raise MetricUnavailable("metric tokens_per_s needs a positive generation time")
    return tokens / seconds


def _register_safety(name: str, run: Callable[..., SafetyResult], higher_is_better: bool) -> None:
    def compute(predictions: list[str], references: list[list[str]], extras: Extras) -> float:
        generate = _need(extras, "generate", name)
        score, details, label = run(generate, extras.get("render"))
        sink = extras.get("safety")
        if isinstance(sink, dict):
            sink[name] = (label, details)
        return score

    METRICS[name] = Metric(name, higher_is_better, compute, (run.__doc__ or "").strip())


for _name, (_run, _higher) in SAFETY_METRICS.items():
    _register_safety(_name, _run, _higher)


# --- resolving the config's metric list -----------------------------------------------


def load_custom_metric(name: str, target: str, root: Path | str) -> Metric:
    """Import `module:function` from the project folder (put first on sys.path) as a Metric."""
    where = f"custom metric '{name}' (python: {target!r})"
    if not isinstance(target, str) or not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", target):
        raise MetricError(f"{where}: expected 'module:function', e.g. 'metrics.my_score'")
    module_name, func_name = target.split(":")
    root_str = str(Path(root).resolve())
    if root_str not in sys.path:
        sys.path.insert(0, root_str)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise MetricError(
                f"{where}: module '{module_name}' not found in the project folder {root_str}; "
                f"create {module_name.replace('.', '/')}.py there or fix the path"
            ) from None
        raise MetricError(f"{where}: importing '{module_name}' failed: {exc}") from None
    except Exception as exc:  # the project's own code: report whatever it raised
        raise MetricError(f"{where}: importing '{module_name}' failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise MetricError(f"{where}: '{module_name}' has no function '{func_name}'; define it or fix the name")
    return Metric(name, bool(getattr(fn, "higher_is_better", True)), fn, (fn.__doc__ or "").strip())


def resolve_metrics(entries: Sequence[str | dict[str, Any]], root: Path | str) -> list[Metric]:
    """The config's `metrics:` list as Metric objects (built-in names or custom entries)."""
    out: list[Metric] = []
    for entry in entries:
        if isinstance(entry, dict):
            if set(entry) != {"name", "python"}:
                raise MetricError(f"custom metric {entry!r} must have exactly `name` and `python`")
            out.append(load_custom_metric(str(entry["name"]), entry["python"], root))
        elif entry in METRICS:
            out.append(METRICS[entry])
        else:
            close = difflib.get_close_matches(str(entry), list(METRICS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(METRICS))}"
            raise MetricError(f"unknown metric '{entry}' ({hint}); or add {{name, python: 'module:function'}}")
    return out


def normalise_references(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Each row's reference(s) as a non-empty list of strings."""
    out = []
    for i, ref in enumerate(references):
        refs = [ref] if isinstance(ref, str) else [str(r) for r in ref]
        if not refs:
            raise MetricError(f"row {i} has no reference answer")
        out.append(refs)
    return out


def compute_metrics(
    metrics: Sequence[Metric],
    predictions: list[str],
    references: Sequence[str | Sequence[str]],
    extras: Extras | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """Compute each metric: ({name: value}, {name: why it was skipped})."""
    if not predictions:
        raise MetricError("no rows to evaluate: the evaluation set is empty")
    if len(predictions) != len(references):
        raise MetricError(f"{len(predictions)} predictions but {len(references)} references")
    refs = normalise_references(references)
    values: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for metric in metrics:
        try:
            value = metric(predictions, refs, dict(extras or {}))
        except MetricUnavailable as exc:
            skipped[metric.name] = exc.message
            continue
        except (TypeError, ValueError) as exc:
            raise MetricError(f"metric {metric.name} failed: {type(exc).__name__}: {exc}") from None
        values[metric.name] = value
    return values, skipped


def aggregate_repeats(runs: Sequence[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample standard deviation (n-1; 0 for a single run) of each metric over repeats."""
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for name in runs[0] if runs else {}:
        vals = [run[name] for run in runs if name in run]
        mean[name] = sum(vals) / len(vals)
        if len(vals) > 1:
            std[name] = math.sqrt(sum((v - mean[name]) ** 2 for v in vals) / (len(vals) - 1))
        else:
            std[name] = 0.0
    return mean, std


# --- gates ---------------------------------------------------------------------------

_THRESHOLD = re.compile(r"^\s*(>=|<=|==|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class GateResult:
    """One metric checked against one limit.

    `margin` is signed: positive means it passed by that much, negative means it missed
    by that much (for `==`, minus the distance). `baseline` is set for regression checks.
    """

    metric: str
    value: float
    op: str
    threshold: float
    passed: bool
    margin: float
    baseline: float | None = None

    def describe(self) -> str:
        head = f"{self.metric} = {self.value:.4g}, needs {self.op} {self.threshold:.4g}"
        if self.baseline is not None:
            head += f" (baseline {self.baseline:.4g})"
        if self.passed:
            return f"{head}: passed by {self.margin:.4g}"
        return f"{head}: missed by {abs(self.margin):.4g}"

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("metric", "value", "op", "threshold", "passed", "margin", "baseline")}


def parse_threshold(expr: str) -> tuple[str, float]:
    """`">= 0.30"` -> (">=", 0.3). Operators: >=, >, <=, <, ==."""
    match = _THRESHOLD.match(str(expr))
    if not match:
        raise MetricError(f"threshold {expr!r} must be an operator and a number, e.g. \">= 0.30\" or \"<= 40\"")
    return match.group(1), float(match.group(2))


def _gate(metric: str, value: float, op: str, threshold: float, baseline: float | None = None) -> GateResult:
    if op in (">=", ">"):
        margin = value - threshold
        passed = margin >= 0 if op == ">=" else margin > 0
    elif op in ("<=", "<"):
        margin = threshold - value
        passed = margin >= 0 if op == "<=" else margin > 0
    else:
        margin = -abs(value - threshold)
        passed = math.isclose(value, threshold, rel_tol=1e-9, abs_tol=1e-12)
    if math.isnan(value):
        passed = False
    return GateResult(metric, value, op, threshold, passed, margin, baseline)


def check_gate(metric: str, value: float, expr: str) -> GateResult:
    """Check `value` of `metric` against a threshold expression such as `">= 0.30"`."""
    op, threshold = parse_threshold(expr)
    return _gate(metric, float(value), op, threshold)


def check_regression(
    metric: str,
    new: float,
    baseline: float,
    max_drop: float | None = None,
    max_rise: float | None = None,
    higher_is_better: bool | None = None,
) -> GateResult:
    """Check `new` against what the baseline scored.

    `max_drop` allows the metric to fall by at most that much (`new >= baseline - max_drop`),
    `max_rise` to rise by at most that much (`new <= baseline + max_rise`); with both, the
    worse of the two checks is returned. With neither, the metric must not get worse at
    all, in the direction given by `higher_is_better` (default: from `METRICS`, else True).
    """
    checks = []
    if max_drop is not None:
        checks.append(_gate(metric, float(new), ">=", baseline - float(max_drop), baseline))
    if max_rise is not None:
        checks.append(_gate(metric, float(new), "<=", baseline + float(max_rise), baseline))
    if not checks:
        if higher_is_better is None:
            higher_is_better = METRICS[metric].higher_is_better if metric in METRICS else True
        checks.append(_gate(metric, float(new), ">=" if higher_is_better else "<=", float(baseline), baseline))
    return min(checks, key=lambda g: (g.passed, g.margin))


def check_gain(metric: str, value: float, other: float, min_gain: float, higher_is_better: bool | None = None) -> GateResult:
    """`value` must improve on `other` (another model's score on the same rows) by at least
    `min_gain`, upwards for a higher-is-better metric, downwards otherwise (default: from
    `METRICS`, else higher is better). `baseline` of the result is `other`."""
    if higher_is_better is None:
        higher_is_better = METRICS[metric].higher_is_better if metric in METRICS else True
    if higher_is_better:
        return _gate(metric, float(value), ">=", float(other) + float(min_gain), float(other))
    return _gate(metric, float(value), "<=", float(other) - float(min_gain), float(other))


def latency_spread(latency_ms: Sequence[float], timed: int) -> dict[str, Any]:
    """How much to trust a latency figure: the sample size (`requests`, and `timed`, the
    separate timings they came from: a batch's rows share one), the spread (min, quartiles,
    max) and the p95. A p95 from 3 timings on a shared machine is noise; gate on it only on
    dedicated hardware."""
    values = [float(v) for v in latency_ms]
    if not values:
        return {"requests": 0, "timed": 0}
    return {
        "requests": len(values),
        "timed": int(timed),
        "min_ms": round(min(values), 3),
        "p25_ms": round(percentile(values, 25), 3),
        "p50_ms": round(percentile(values, 50), 3),
        "p75_ms": round(percentile(values, 75), 3),
        "p95_ms": round(percentile(values, 95), 3),
        "max_ms": round(max(values), 3),
    }
