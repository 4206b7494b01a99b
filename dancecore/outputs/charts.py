"""Inline SVG line charts for the HTML report (no plotting library, no script)."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Series:
    """One line of a chart: label, iterations and values (non-finite values leave gaps)."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: str


def is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (1, 2, 2.5, 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(value, 12))
    return ticks


def format_number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4g}"


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    band: tuple[Sequence[float], Sequence[float], Sequence[float]] | None = None,
    y_label: str = "",
    width: int = 600,
    height: int = 250,
) -> str:
    """An inline SVG line chart; ``band`` is (xs, low, high), drawn shaded behind the lines."""
    left, right, top, bottom = 64, 14, 30, 36
    points = [(x, y) for s in series for x, y in zip(s.xs, s.ys, strict=True) if is_finite(x) and is_finite(y)]
    if band is not None:
        points += [(x, y) for x, lo, hi in zip(*band, strict=True) for y in (lo, hi) if is_finite(x) and is_finite(y)]
    esc = html.escape
    head = f'<svg class="chart" role="img" aria-label="{esc(title)}" viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
    parts = [head, f'<text x="{left}" y="18" class="title">{esc(title)}</text>']
    if not points:
        parts.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">no finite values</text></svg>'
        )
        return "".join(parts)
    xs_all, ys_all = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs_all), max(xs_all)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    yt = nice_ticks(min(ys_all), max(ys_all))
    y0, y1 = yt[0], yt[-1]
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    frame = _Frame(left, top, plot_w, plot_h, height, sx, sy)
    parts.extend(_axes(frame, yt, x0, x1, y_label))
    parts.extend(_lines(frame, series, band))
    parts.append("</svg>")
    return "".join(parts)


@dataclass(frozen=True)
class _Frame:
    """Where a chart's plot area is and how values map onto it."""

    left: float
    top: float
    plot_w: float
    plot_h: float
    height: float
    sx: Callable[[float], float]
    sy: Callable[[float], float]


def _axes(frame: _Frame, yt: Sequence[float], x0: float, x1: float, y_label: str) -> list[str]:
    """Grid lines, ticks, axes and labels of :func:`line_chart`."""
    left, top, plot_w, plot_h, height, sx, sy = (
        frame.left,
        frame.top,
        frame.plot_w,
        frame.plot_h,
        frame.height,
        frame.sx,
        frame.sy,
    )
    esc = html.escape
    parts: list[str] = []
    for t in yt:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>')
        parts.append(
            f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" class="tick">{format_number(t)}</text>'
        )
    for t in nice_ticks(x0, x1, 6):
        if x0 <= t <= x1:
            parts.append(
                f'<text x="{sx(t):.1f}" y="{top + plot_h + 16}" text-anchor="middle" class="tick">{format_number(t)}</text>'
            )
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" class="axis"/>')
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" class="axis"/>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle" class="label">iteration</text>')
    if y_label:
        parts.append(
            f'<text transform="translate(12 {top + plot_h / 2}) rotate(-90)" text-anchor="middle" class="label">{esc(y_label)}</text>'
        )
    return parts


def _lines(
    frame: _Frame, series: Sequence[Series], band: tuple[Sequence[float], Sequence[float], Sequence[float]] | None
) -> list[str]:
    """The band, the lines (hover points when few) and the legend of :func:`line_chart`."""
    left, top, plot_w, sx, sy = frame.left, frame.top, frame.plot_w, frame.sx, frame.sy
    esc = html.escape
    parts: list[str] = []
    if band is not None:
        for segment in _segments(band[0], list(zip(band[1], band[2], strict=True))):
            upper = " ".join(f"{sx(x):.1f},{sy(hi):.1f}" for x, (_, hi) in segment)
            lower = " ".join(f"{sx(x):.1f},{sy(lo):.1f}" for x, (lo, _) in reversed(segment))
            parts.append(f'<polygon points="{upper} {lower}" class="band"><title>+/- one std</title></polygon>')
    for s in series:
        pairs = list(zip(s.xs, s.ys, strict=True))
        for segment in _segments(s.xs, list(s.ys)):
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in segment)
            parts.append(
                f'<polyline points="{coords}" fill="none" stroke="{s.color}" stroke-width="1.6"><title>{esc(s.label)}</title></polyline>'
            )
        finite = [(x, y) for x, y in pairs if is_finite(x) and is_finite(y)]
        if len(finite) <= 120:  # hover a point for its value (SVG titles, no script)
            parts.extend(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{s.color}"><title>{esc(s.label)} @ {format_number(x)}: {format_number(y)}</title></circle>'
                for x, y in finite
            )
    for i, s in enumerate(series):  # legend, top right
        y = top + 4 + 14 * i
        parts.append(f'<rect x="{left + plot_w - 150}" y="{y}" width="10" height="3" fill="{s.color}"/>')
        parts.append(f'<text x="{left + plot_w - 136}" y="{y + 5}" class="legend">{esc(s.label[:28])}</text>')
    return parts


def _segments(xs: Sequence[float], ys: Sequence[Any]) -> list[list[tuple[float, Any]]]:
    """Runs of consecutive points whose values are all finite (NaN breaks a line)."""
    runs: list[list[tuple[float, Any]]] = [[]]
    for x, y in zip(xs, ys, strict=True):
        values = y if isinstance(y, tuple) else (y,)
        if is_finite(x) and all(is_finite(v) for v in values):
            runs[-1].append((x, y))
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]
