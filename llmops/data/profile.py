"""The dataset profile: row counts per step, duplicates removed, null rates and lengths per field.

A value is "null" when the field is missing, JSON null or an empty string (CSV has no other
way to say "no value"). Lengths are counted in characters of the value (non-strings as their
JSON text) over the non-null values. All numbers are rounded so the JSON is stable.
"""

from __future__ import annotations

from typing import Any

from llmops.data.io import canonical_json

PROFILE_VERSION = 1


def _is_null(value: Any) -> bool:
    return value is None or value == ""


def _length(value: Any) -> int:
    return len(value) if isinstance(value, str) else len(canonical_json(value))


def field_lengths(rows: list[dict[str, Any]], field: str) -> list[int]:
    """Character lengths of the non-null values of `field`."""
    return [_length(r[field]) for r in rows if field in r and not _is_null(r[field])]


def length_stats(lengths: list[int]) -> dict[str, float]:
    """min / mean / p50 / p95 / max of a list of lengths (zeros when it is empty)."""
    if not lengths:
        return {"min": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    import numpy as np

    arr = np.asarray(lengths, dtype=np.float64)
    return {
        "min": int(arr.min()),
        "mean": round(float(arr.mean()), 3),
        "p50": round(float(np.percentile(arr, 50)), 3),
        "p95": round(float(np.percentile(arr, 95)), 3),
        "max": int(arr.max()),
    }


def split_profile(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows, and per field its null rate and length statistics."""
    fields = sorted({k for r in rows for k in r})
    out: dict[str, Any] = {}
    for f in fields:
        nulls = sum(1 for r in rows if _is_null(r.get(f)))
        out[f] = {
            "null_rate": round(nulls / len(rows), 6) if rows else 0.0,
            "chars": length_stats(field_lengths(rows, f)),
        }
    return {"rows": len(rows), "fields": out}


def build_profile(
    name: str,
    source: str,
    fmt: str,
    source_rows: int,
    steps: list[dict[str, Any]],
    splits: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """The whole profile document (what profile.json holds)."""
    exact = sum(s.get("removed_exact", 0) for s in steps)
    near = sum(s.get("removed_near", 0) for s in steps)
    return {
        "profile_version": PROFILE_VERSION,
        "dataset": name,
        "source": {"path": source, "format": fmt, "rows": source_rows},
        "steps": steps,
        "duplicates_removed": {"exact": exact, "near": near},
        "outputs": {split: split_profile(rows) for split, rows in sorted(splits.items())},
    }
