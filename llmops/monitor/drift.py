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
`completion`, `output`, `target`) joined by newlines. It keeps the training lengths as
distinct values and their counts, and the window's side comes the same way (the monitor
counts lengths in SQL): KS, PSI and means over counts equal those over the raw lengths.
`Reference.to_arrays` / `from_arrays` are its cache form (`llmops.monitor.reference`);
`REFERENCE_VERSION` names everything else it depends on (word splitting, buckets, bins).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from llmops.monitor.records import MAX_BAG_TOKENS, TOKEN_BUCKETS, WORD_PATTERN, token_bag, words

EPS = 1e-4
ANSWER_FIELDS = ("answer", "response", "completion", "output", "target")
MAX_REFERENCE_ROWS = 200_000
LENGTH_BINS = 10
# What a Reference depends on besides its rows: bump `v` when building it changes.
REFERENCE_VERSION = (f"v1 words={WORD_PATTERN.pattern} buckets={TOKEN_BUCKETS}/crc32 bag={MAX_BAG_TOKENS} "
                     f"rows<={MAX_REFERENCE_ROWS} bins={LENGTH_BINS} fields={','.join(ANSWER_FIELDS)}")


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


def ks_statistic_counts(x_values: Any, x_counts: Any, y_values: Any, y_counts: Any) -> float:
    """`ks_statistic` of two samples given as ascending distinct values and their counts
    (the same number: each CDF is an integer count over the sample size at the same points)."""
    xv, yv = np.asarray(x_values, dtype=np.float64), np.asarray(y_values, dtype=np.float64)
    cx = np.concatenate([[0], np.cumsum(np.asarray(x_counts, dtype=np.int64))])
    cy = np.concatenate([[0], np.cumsum(np.asarray(y_counts, dtype=np.int64))])
    if cx[-1] == 0 or cy[-1] == 0:
        return 0.0
    grid = np.concatenate([xv, yv])
    fx = cx[np.searchsorted(xv, grid, side="right")] / cx[-1]
    fy = cy[np.searchsorted(yv, grid, side="right")] / cy[-1]
    return float(np.max(np.abs(fx - fy)))


def value_counts(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Ascending distinct values (float64) and how often each occurs (int64)."""
    v, c = np.unique(np.asarray(values, dtype=np.float64), return_counts=True)
    return v, c.astype(np.int64)


def ks_pvalue(d: float, n: int, m: int) -> float:
    """Asymptotic two-sided p-value of a KS statistic `d` for sample sizes n and m."""
    if n == 0 or m == 0 or d <= 0:
        return 1.0
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    total = sum(2 * (-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return float(min(1.0, max(0.0, total)))


def length_bins(reference: Any, bins: int = LENGTH_BINS) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (duplicates removed, so integer data works)."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.size == 0:
        return np.array([], dtype=np.float64)
    return np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))


def histogram(values: Any, edges: np.ndarray) -> np.ndarray:
    """Counts per bin: bin i holds edges[i-1] < x <= edges[i] (first and last bins open-ended)."""
    idx = np.searchsorted(edges, np.asarray(values, dtype=np.float64), side="left")
    return np.bincount(idx, minlength=edges.size + 1)


def histogram_counts(values: Any, counts: Any, edges: np.ndarray) -> np.ndarray:
    """`histogram` of a sample given as distinct values and their counts."""
    idx = np.searchsorted(edges, np.asarray(values, dtype=np.float64), side="left")
    return np.bincount(idx, weights=np.asarray(counts, dtype=np.int64), minlength=edges.size + 1).astype(np.int64)


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
    """What the training split looks like: prompt lengths (in words) as distinct `values` and
    their `counts`, the length bins, token buckets."""

    values: np.ndarray  # ascending distinct lengths, float64
    counts: np.ndarray  # training rows of each length, int64
    edges: np.ndarray
    expected_lengths: np.ndarray
    token_counts: np.ndarray
    rows: int

    @property
    def lengths(self) -> np.ndarray:
        """Every training row's length, ascending."""
        return np.repeat(self.values, self.counts)

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
        values, counts = value_counts(arr)
        return cls(values, counts, edges, histogram(arr, edges), bag_counts(bags), len(rows))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for `np.savez`); `from_arrays` reads them back."""
        return {"values": self.values, "counts": self.counts, "edges": self.edges,
                "expected_lengths": self.expected_lengths, "token_counts": self.token_counts,
                "rows": np.asarray([self.rows], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: Any) -> "Reference":
        """The Reference `to_arrays` wrote; ValueError when the arrays do not make one."""
        try:
            values = np.asarray(arrays["values"], dtype=np.float64)
            counts = np.asarray(arrays["counts"], dtype=np.int64)
            edges = np.asarray(arrays["edges"], dtype=np.float64)
            expected = np.asarray(arrays["expected_lengths"], dtype=np.int64)
            tokens = np.asarray(arrays["token_counts"], dtype=np.int64)
            rows = int(np.asarray(arrays["rows"]).reshape(-1)[0])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"not a drift reference ({exc})") from None
        if (values.ndim != 1 or values.shape != counts.shape or edges.ndim != 1
                or expected.shape != (edges.size + 1,) or tokens.shape != (TOKEN_BUCKETS,)
                or int(counts.sum()) != rows or int(expected.sum()) != rows or (counts < 0).any()
                or (values.size > 1 and not (np.diff(values) > 0).all())):
            raise ValueError("not a drift reference (inconsistent arrays)")
        return cls(values, counts, edges, expected, tokens, rows)

    def length_drift(self, lengths: np.ndarray) -> dict[str, float]:
        """Length drift of a window given as one length per request."""
        return self.length_drift_counts(*value_counts(lengths))

    def length_drift_counts(self, values: np.ndarray, counts: np.ndarray) -> dict[str, float]:
        """Length drift of a window given as ascending distinct lengths and their counts."""
        values = np.asarray(values, dtype=np.float64)
        counts = np.asarray(counts, dtype=np.int64)
        n = int(counts.sum())
        d = ks_statistic_counts(self.values, self.counts, values, counts)
        return {"psi": round(psi(self.expected_lengths, histogram_counts(values, counts, self.edges)), 6),
                "ks": round(d, 6), "ks_pvalue": ks_pvalue(d, self.rows, n),
                "mean_reference": round(_mean(self.values, self.counts), 3) if self.rows else 0.0,
                "mean_window": round(_mean(values, counts), 3) if n else 0.0}

    def token_drift(self, counts: np.ndarray) -> dict[str, float]:
        order = np.argsort(-self.token_counts, kind="stable")
        return {"psi": round(psi(self.token_counts, counts), 6),
                "ks": round(cumulative_gap(self.token_counts, counts, order), 6)}


def _mean(values: np.ndarray, counts: np.ndarray) -> float:
    """Mean of a sample given by value counts (exact for whole-number lengths, as `np.mean` is)."""
    return float(np.dot(values, counts.astype(np.float64)) / int(counts.sum()))
