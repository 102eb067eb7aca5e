"""The dataset HTML report: a page with the profile's tables and one SVG histogram per field
(`llmops.charts`: text, so the same data gives the same bytes)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from llmops.charts import histogram_svg
from llmops.fsutil import atomic_write_text
from llmops.data.profile import field_lengths

MAX_FIGURES = 24


def _figure_name(index: int, field: str) -> str:
    return f"length-{index:02d}-{re.sub(r'[^A-Za-z0-9_-]+', '_', field)[:40]}.svg"


def _histogram(path: Path, field: str, by_split: dict[str, list[int]]) -> None:
    svg = histogram_svg(f"{field}: length in characters", "characters", "rows", by_split)
    atomic_write_text(path, svg)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _steps_table(profile: dict[str, Any]) -> str:
    rows = []
    for s in profile["steps"]:
        extra = {k: v for k, v in s.items() if k not in ("step", "rows_in", "rows_out")}
        rows.append([s["step"], s["rows_in"], json.dumps(s["rows_out"]), json.dumps(extra, sort_keys=True)])
    return _table(["step", "rows in", "rows out", "details"], rows)


def _fields_table(split: str, data: dict[str, Any]) -> str:
    rows = [
        [f, f"{v['null_rate']:.2%}", v["chars"]["min"], v["chars"]["mean"], v["chars"]["p50"], v["chars"]["p95"], v["chars"]["max"]]
        for f, v in data["fields"].items()
    ]
    title = f"<h3>{html.escape(split)}: {data['rows']} rows</h3>"
    return title + _table(["field", "null rate", "min", "mean", "p50", "p95", "max"], rows)


def write_report(folder: Path, profile: dict[str, Any], splits: dict[str, list[dict[str, Any]]]) -> Path:
    """Write profile.json, one histogram SVG per field and index.html into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in (*folder.glob("length-*.svg"), *folder.glob("length-*.png")):  # .png: before charts were SVG
        old.unlink()
    fields = sorted({k for rows in splits.values() for r in rows for k in r})
    images = []
    for i, field in enumerate(fields[:MAX_FIGURES]):
        name = _figure_name(i, field)
        _histogram(folder / name, field, {s: field_lengths(rows, field) for s, rows in splits.items()})
        images.append(f'<figure><img src="{html.escape(name)}" alt="{html.escape(field)} lengths"></figure>')
    src = profile["source"]
    dups = profile["duplicates_removed"]
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8">',
        f"<title>Dataset {html.escape(profile['dataset'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}figure{display:inline-block;margin:0.5em}</style>",
        "</head><body>",
        f"<h1>Dataset {html.escape(profile['dataset'])}</h1>",
        f"<p>Source <code>{html.escape(src['path'])}</code> ({html.escape(src['format'])}): {src['rows']} rows. "
        f"Duplicates removed: {dups['exact']} exact, {dups['near']} near.</p>",
        "<h2>Steps</h2>",
        _steps_table(profile),
        "<h2>Fields</h2>",
        *(_fields_table(s, d) for s, d in profile["outputs"].items()),
        "<h2>Length histograms</h2>",
        *images,
        "</body></html>",
    ]
    atomic_write_text(folder / "profile.json", json.dumps(profile, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    index = folder / "index.html"
    atomic_write_text(index, "\n".join(parts) + "\n")
    return index
