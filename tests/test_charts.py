"""llmops.charts: the reports' SVG histograms and time series, read back as XML."""

from __future__ import annotations

import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from llmops.charts import histogram_svg, nice_ticks, series_svg

SVG = "{http://www.w3.org/2000/svg}"


def parse_svg(source: Path | str) -> ET.Element:
    text = source.read_text(encoding="utf-8") if isinstance(source, Path) else source
    root = ET.fromstring(text)
    assert root.tag == f"{SVG}svg"
    return root


def bars(source: Path | str) -> list[tuple[str, int, float, float, float, float]]:
    """Each histogram bar: (series, count, x, y, width, height), from its <title> "name: count"."""
    out = []
    for rect in parse_svg(source).iter(f"{SVG}rect"):
        title = rect.find(f"{SVG}title")
        if title is not None:
            name, count = title.text.rsplit(": ", 1)
            out.append((name, int(count), *(float(rect.get(k)) for k in ("x", "y", "width", "height"))))
    return out


def bar_counts(source: Path | str) -> dict[str, int]:
    """Rows per series that a histogram's bars add up to."""
    totals: dict[str, int] = {}
    for name, count, *_ in bars(source):
        totals[name] = totals.get(name, 0) + count
    return totals


@pytest.mark.parametrize("low, high, expected", [
    (0, 10, [0, 2, 4, 6, 8, 10]),
    (0, 7, [0, 2, 4, 6, 8]),
    (0, 1, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (3, 3, [3, 4, 5, 6]),
    (0, 0, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (-0.05, 0.3, [-0.1, 0.0, 0.1, 0.2, 0.3]),
])
def test_ticks_are_round_and_cover_the_range(low, high, expected):
    ticks = nice_ticks(low, high)
    assert ticks == pytest.approx(expected)
    assert ticks[0] <= low and ticks[-1] >= max(high, low)


def test_a_histogram_counts_every_value_once_with_one_bar_per_length_when_the_range_is_small():
    svg = histogram_svg("question: length", "characters", "rows", {"train": [5, 5, 6, 9], "eval": [6]})
    found = bars(svg)
    assert bar_counts(svg) == {"train": 4, "eval": 1}
    train = sorted((x, count) for name, count, x, *_ in found if name == "train")
    assert [count for _, count in train] == [2, 1, 1]  # lengths 5, 6, 9: three bars
    widths = {round(w, 6) for *_, w, _ in found}
    assert len(widths) == 1  # every bar one length wide
    # The tallest bar reaches the top tick's height; the others are in proportion.
    heights = {count: h for _, count, _, _, _, h in found}
    assert heights[2] == pytest.approx(2 * heights[1], rel=0.02)
    texts = [t.text for t in parse_svg(svg).iter(f"{SVG}text")]
    assert "train (4)" in texts and "eval (1)" in texts and "question: length" in texts


def test_a_wide_range_gets_thirty_bins_and_the_largest_value_lands_in_the_last():
    values = list(range(0, 1000, 7)) + [999]
    svg = histogram_svg("t", "x", "y", {"all": values})
    found = bars(svg)
    assert bar_counts(svg) == {"all": len(values)} and len(found) <= 30
    last = max(found, key=lambda b: b[2])
    assert last[2] + last[4] == pytest.approx(max(b[2] + b[4] for b in found))


def test_an_empty_histogram_is_a_valid_chart_without_bars():
    svg = histogram_svg("t", "x", "y", {"train": []})
    assert bars(svg) == [] and "train (0)" not in svg


def test_text_is_escaped():
    svg = histogram_svg('<b>&"x"', "x", "y", {"a<script>": [1, 2]})
    assert bar_counts(svg) == {"a<script>": 2} and "<script>" not in svg


def test_same_data_same_bytes():
    data = {"train": [3, 8, 8, 40], "eval": [9]}
    assert histogram_svg("t", "x", "y", data) == histogram_svg("t", "x", "y", dict(reversed(data.items())))


def test_a_series_breaks_at_nan_and_draws_its_threshold():
    t = [1_700_000_000 + 60 * i for i in range(6)]
    svg = series_svg("Latency", "ms", t, [("p50", [1, 2, math.nan, 4, 5, 6]), ("p95", [2, 3, 4, 5, 6, 7])],
                     threshold=5.5)
    root = parse_svg(svg)
    lines = root.findall(f".//{SVG}polyline[@stroke-width]")
    points = [len(line.get("points").split()) for line in lines]
    assert sorted(points) == [2, 3, 6]  # p50 in two runs around its gap, p95 whole
    assert len(root.findall(f".//{SVG}circle")) == 11
    dashed = [ln for ln in root.iter(f"{SVG}line") if ln.get("stroke-dasharray")]
    texts = {e.text for e in root.iter(f"{SVG}text")}
    assert {"p50", "p95", "threshold 5.5", "time (UTC)"} <= texts
    assert "22:13:20" in texts  # 1_700_000_000 on a UTC clock, with seconds for a five-minute span
    # The threshold sits between the values 5 and 6 on the y axis.
    y = {v: float(c.get("cy")) for v, c in zip([2, 3, 4, 5, 6, 7], root.findall(f".//{SVG}circle")[5:])}
    assert len(dashed) >= 2 and y[6] < float(dashed[0].get("y1")) < y[5]


def test_a_series_without_finite_values_still_renders():
    svg = series_svg("Drift", "PSI", [1.0, 2.0], [("psi", [math.nan, math.nan])])
    assert parse_svg(svg).findall(f".//{SVG}polyline[@stroke-width]") == []


def test_a_dataset_stage_imports_no_plotting_library(tmp_path):
    """The reason for llmops.charts: a stage process stays light (bench/dataset_stage.py)."""
    code = ("import sys; from pathlib import Path; from llmops.data.report import write_report; "
            "write_report(Path(sys.argv[1]), {'dataset': 'd', 'source': {'path': 'p', 'format': 'jsonl', 'rows': 2}, "
            "'duplicates_removed': {'exact': 0, 'near': 0}, 'steps': [], 'outputs': {}}, "
            "{'train': [{'q': 'ab'}, {'q': 'abc'}]}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'numpy', 'PIL')))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert bar_counts(next(tmp_path.glob("length-*.svg"))) == {"train": 2}
