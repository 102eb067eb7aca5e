"""Charts for the HTML reports, as SVG text: histograms (dataset reports) and time series
(monitor reports).

Written here rather than drawn with matplotlib: a report's charts are bars and lines on two
axes, and importing matplotlib cost every dataset stage ~0.5 s of its ~0.6 s
(bench/dataset_stage.py). SVG is text, so the same data gives the same bytes (DVC sees an
unchanged report), a diff shows what moved, and nothing is imported but the standard library.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from html import escape
from typing import Sequence

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
THRESHOLD_COLOUR = "#d62728"
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 12, 28, 44  # margins around the plot area, in pixels


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value < high + step * 0.999:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if value == value else "nan"


def _label(value: float) -> str:
    return f"{value:g}"


class _Frame:
    """The plot area of one chart: data coordinates to pixels, axes, ticks, title and legend."""

    def __init__(self, width: int, height: int, x_range: tuple[float, float], y_ticks: list[float]) -> None:
        self.width, self.height = width, height
        self.x0, self.x1 = x_range if x_range[1] > x_range[0] else (x_range[0] - 0.5, x_range[0] + 0.5)
        self.y0, self.y1 = y_ticks[0], y_ticks[-1]
        self.parts: list[str] = []

    def x(self, value: float) -> float:
        return _LEFT + (value - self.x0) / (self.x1 - self.x0) * (self.width - _LEFT - _RIGHT)

    def y(self, value: float) -> float:
        return self.height - _BOTTOM - (value - self.y0) / (self.y1 - self.y0) * (self.height - _TOP - _BOTTOM)

    def axes(self, title: str, xlabel: str, ylabel: str, y_ticks: list[float],
             x_ticks: Sequence[tuple[float, str]]) -> None:
        w, h, p = self.width, self.height, self.parts
        bottom, right = h - _BOTTOM, w - _RIGHT
        p.append(f'<text x="{w / 2:g}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>')
        for tick in y_ticks:
            y = _num(self.y(tick))
            p.append(f'<line x1="{_LEFT}" y1="{y}" x2="{right}" y2="{y}" stroke="#e5e5e5"/>')
            p.append(f'<text x="{_LEFT - 4}" y="{y}" text-anchor="end" dominant-baseline="middle">'
                     f"{escape(_label(tick))}</text>")
        for value, text in x_ticks:
            x = _num(self.x(value))
            p.append(f'<line x1="{x}" y1="{bottom}" x2="{x}" y2="{bottom + 4}" stroke="#333"/>')
            p.append(f'<text x="{x}" y="{bottom + 16}" text-anchor="middle">{escape(text)}</text>')
        p.append(f'<polyline points="{_LEFT},{_TOP} {_LEFT},{bottom} {right},{bottom}" fill="none" stroke="#333"/>')
        if xlabel:
            p.append(f'<text x="{(_LEFT + right) / 2:g}" y="{h - 6}" text-anchor="middle">{escape(xlabel)}</text>')
        p.append(f'<text transform="translate(14 {(_TOP + bottom) / 2:g}) rotate(-90)" text-anchor="middle">'
                 f"{escape(ylabel)}</text>")

    def legend(self, entries: list[tuple[str, str, str]], right: bool = False) -> None:
        """entries: (label, colour, "box" | "line" | "dash"), listed at the plot's top left (or
        top right: histograms of lengths are mostly empty there)."""
        longest = max((len(label) for label, _, _ in entries), default=0)
        for i, (label, colour, mark) in enumerate(entries):
            x = self.width - _RIGHT - 24 - 6 * longest if right else _LEFT + 8
            y = _TOP + 10 + 14 * i
            if mark == "box":
                self.parts.append(f'<rect x="{x}" y="{y - 5}" width="12" height="10" fill="{colour}" '
                                  'fill-opacity="0.6"/>')
            else:
                dash = ' stroke-dasharray="4 3"' if mark == "dash" else ""
                self.parts.append(f'<line x1="{x}" y1="{y}" x2="{x + 12}" y2="{y}" stroke="{colour}" '
                                  f'stroke-width="2"{dash}/>')
            self.parts.append(f'<text x="{x + 16}" y="{y}" dominant-baseline="middle">{escape(label)}</text>')

    def svg(self, description: str) -> str:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}" font-family="sans-serif" font-size="10" role="img">'
                f"<title>{escape(description)}</title>"
                f'<rect width="{self.width}" height="{self.height}" fill="white"/>'
                + "".join(self.parts) + "</svg>\n")


def histogram_svg(title: str, xlabel: str, ylabel: str, series: dict[str, list[int]], bins: int = 30,
                  width: int = 400, height: int = 240) -> str:
    """Overlaid histograms of integer values, one colour per series (legend: "name (count)").
    One bar per value when the values span fewer than `bins` integers, else `bins` equal bins."""
    every = [v for values in series.values() for v in values]
    low, high = (min(every), max(every)) if every else (0, 1)
    if high - low < bins:
        edges = [low - 0.5 + i for i in range(high - low + 2)]
    else:
        edges = [low + (high - low) * i / bins for i in range(bins + 1)]
    counts: dict[str, list[int]] = {}
    for name, values in sorted(series.items()):
        row = [0] * (len(edges) - 1)
        for v in values:
            i = min(int((v - edges[0]) / (edges[-1] - edges[0]) * (len(edges) - 1)), len(edges) - 2)
            row[i] += 1
        counts[name] = row
    y_ticks = nice_ticks(0, max((c for row in counts.values() for c in row), default=1))
    frame = _Frame(width, height, (edges[0], edges[-1]), y_ticks)
    x_ticks = [(t, _label(t)) for t in nice_ticks(edges[0], edges[-1]) if edges[0] <= t <= edges[-1]]
    frame.axes(title, xlabel, ylabel, y_ticks, x_ticks)
    entries = []
    for k, (name, row) in enumerate(counts.items()):
        colour = PALETTE[k % len(PALETTE)]
        for i, count in enumerate(row):
            if count:
                x, top = frame.x(edges[i]), frame.y(count)
                frame.parts.append(f'<rect x="{_num(x)}" y="{_num(top)}" width="{_num(frame.x(edges[i + 1]) - x)}" '
                                   f'height="{_num(frame.y(0) - top)}" fill="{colour}" fill-opacity="0.6">'
                                   f"<title>{escape(name)}: {count}</title></rect>")
        if series[name]:
            entries.append((f"{name} ({len(series[name])})", colour, "box"))
    frame.legend(entries, right=True)
    return frame.svg(title)


def _time_label(t: float, span: float) -> str:
    when = datetime.fromtimestamp(t, tz=timezone.utc)
    return when.strftime("%H:%M:%S" if span <= 3600 else "%H:%M" if span <= 86400 else "%m-%d %H:%M")


def series_svg(title: str, ylabel: str, t: Sequence[float], lines: list[tuple[str, Sequence[float]]],
               threshold: float | None = None, width: int = 640, height: int = 240) -> str:
    """Lines over time (`t`: Unix seconds, UTC on the axis), a dot per point; a NaN leaves a gap.
    `threshold` draws a dashed line labelled "threshold X"."""
    finite = [v for _, values in lines for v in values if math.isfinite(v)]
    if threshold is not None:
        finite.append(threshold)
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    y_ticks = nice_ticks(min(low, 0.0), high)
    start, end = (min(t), max(t)) if len(t) else (0.0, 1.0)
    frame = _Frame(width, height, (start, end), y_ticks)
    span = end - start
    step = max(1, len(t) // 6)
    frame.axes(title, "time (UTC)", ylabel, y_ticks, [(x, _time_label(x, span)) for x in list(t)[::step]])
    entries = []
    for k, (label, values) in enumerate(lines):
        colour = PALETTE[k % len(PALETTE)]
        run: list[str] = []
        for x, v in [*zip(t, values), (None, math.nan)]:
            if x is not None and math.isfinite(v):
                px, py = _num(frame.x(x)), _num(frame.y(v))
                run.append(f"{px},{py}")
                frame.parts.append(f'<circle cx="{px}" cy="{py}" r="2" fill="{colour}"/>')
            elif run:
                frame.parts.append(f'<polyline points="{" ".join(run)}" fill="none" stroke="{colour}" '
                                   'stroke-width="1.5"/>')
                run = []
        entries.append((label, colour, "line"))
    if threshold is not None:
        y = _num(frame.y(threshold))
        frame.parts.append(f'<line x1="{_LEFT}" y1="{y}" x2="{width - _RIGHT}" y2="{y}" '
                           f'stroke="{THRESHOLD_COLOUR}" stroke-dasharray="4 3"/>')
        entries.append((f"threshold {threshold:g}", THRESHOLD_COLOUR, "dash"))
    frame.legend(entries)
    return frame.svg(title)
