"""Drift statistics: PSI and two-sample KS, and the training-data reference they compare against.

- `psi(expected, actual)`: population stability index of two count (or proportion) vectors
  over the same bins, `sum((a - e) * ln(a / e))` on proportions, empty bins floored at `EPS`.
- `ks_statistic(a, b)`: the two-sample Kolmogorov-Smirnov statistic `max |F_a - F_b|` over the
  pooled sample (what `scipy.stats.ks_2samp` calls `statistic`), and `ks_pvalue` its
  asymptotic p-value.
- Prompt length is binned at the deciles of the training lengths (`length_bins`).
- Token frequency is compared as a distribution over `TOKEN_BUCKETS` hashed word buckets
  (see `records`); its "KS" is the largest gap between the two cumulative distributions
  with buckets ordered from most to least frequent in training.

`Reference.from_rows` builds the reference from the fine-tune's training rows: a row's
text is its `prompt` field when present (pass rows rendered with the deployment's prompt
template), else all its string fields except the answer (`answer`, `response`,
`completion`, `output`, `target`) joined by newlines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from llmops.monitor.records import TOKEN_BUCKETS, token_bag, words

EPS = 1e-4
ANSWER_FIELDS = ("answer", "response", "completion", "output", "target")
MAX_REFERENCE_ROWS = 200_000


def psi(expected: Any, actual: Any, eps: float = EPS) -> float:
    """Population stability index of two histograms over the same bins (counts or proportions)."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1:
        raise ValueError("psi needs two 1-D histograms of the same length")
    if e.sum() <= 0 or a.sum() <= 0:
        return 0.0
    e = np.clip(e / e.sum(), eps, None)
    a = np.clip(a / a.sum(), eps, None)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_statistic(a: Any, b: Any) -> float:
    """Two-sample KS statistic: the largest gap between the two empirical CDFs."""
    x = np.sort(np.asarray(a, dtype=np.float64))
    y = np.sort(np.asarray(b, dtype=np.float64))
    if x.size == 0 or y.size == 0:
        return 0.0
    grid = np.concatenate([x, y])
    fx = np.searchsorted(x, grid, side="right") / x.size
    fy = np.searchsorted(y, grid, side="right") / y.size
    return float(np.max(np.abs(fx - fy)))


def ks_pvalue(d: float, n: int, m: int) -> float:
    """Asymptotic two-sided p-value of a KS statistic `d` for sample sizes n and m."""
    if n == 0 or m == 0 or d <= 0:
        return 1.0
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    total = sum(2 * (-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return float(min(1.0, max(0.0, total)))


def length_bins(reference: Any, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (duplicates removed, so integer data works)."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.size == 0:
        return np.array([], dtype=np.float64)
    return np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))


def histogram(values: Any, edges: np.ndarray) -> np.ndarray:
    """Counts per bin: bin i holds edges[i-1] < x <= edges[i] (first and last bins open-ended)."""
    idx = np.searchsorted(edges, np.asarray(values, dtype=np.float64), side="left")
    return np.bincount(idx, minlength=edges.size + 1)


def cumulative_gap(expected: Any, actual: Any, order: np.ndarray) -> float:
    """Largest |CDF_e - CDF_a| with categories taken in `order` (the KS analogue for buckets)."""
    e = np.asarray(expected, dtype=np.float64)[order]
    a = np.asarray(actual, dtype=np.float64)[order]
    if e.sum() <= 0 or a.sum() <= 0:
        return 0.0
    return float(np.max(np.abs(np.cumsum(e / e.sum()) - np.cumsum(a / a.sum()))))


def bag_counts(bags: Iterable[bytes | None]) -> np.ndarray:
    """Token bucket counts summed over many stored bags."""
    joined = b"".join(b for b in bags if b)
    return np.bincount(np.frombuffer(joined, dtype=np.uint8), minlength=TOKEN_BUCKETS).astype(np.int64)


def row_text(row: dict[str, Any]) -> str:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(v) for k, v in row.items() if k not in ANSWER_FIELDS and isinstance(v, str))


@dataclass
class Reference:
    """What the training split looks like: prompt lengths (in words), their bins, token buckets."""

    lengths: np.ndarray
    edges: np.ndarray
    expected_lengths: np.ndarray
    token_counts: np.ndarray
    rows: int

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> "Reference":
        if len(rows) > MAX_REFERENCE_ROWS:  # a deterministic sample keeps big datasets cheap
            step = len(rows) / MAX_REFERENCE_ROWS
            rows = [rows[int(i * step)] for i in range(MAX_REFERENCE_ROWS)]
        lengths = []
        bags = []
        for row in rows:
            units = words(row_text(row))
            lengths.append(len(units))
            bags.append(token_bag(units))
        arr = np.asarray(lengths, dtype=np.float64)
        edges = length_bins(arr)
        return cls(arr, edges, histogram(arr, edges), bag_counts(bags), len(rows))

    def length_drift(self, lengths: np.ndarray) -> dict[str, float]:
        d = ks_statistic(self.lengths, lengths)
        return {"psi": round(psi(self.expected_lengths, histogram(lengths, self.edges)), 6),
                "ks": round(d, 6), "ks_pvalue": ks_pvalue(d, self.lengths.size, int(lengths.size)),
                "mean_reference": round(float(self.lengths.mean()), 3) if self.lengths.size else 0.0,
                "mean_window": round(float(lengths.mean()), 3) if lengths.size else 0.0}

    def token_drift(self, counts: np.ndarray) -> dict[str, float]:
        order = np.argsort(-self.token_counts, kind="stable")
        return {"psi": round(psi(self.token_counts, counts), 6),
                "ks": round(cumulative_gap(self.token_counts, counts, order), 6)}
