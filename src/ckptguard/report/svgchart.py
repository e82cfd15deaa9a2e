"""Inline SVG charts for the run report: lines, bars and checkpoint marks, no library, no script.

Every text that reaches the SVG goes through :func:`esc` (names from the run are untrusted: a
metric called ``<script>`` must stay text). Hovering a mark shows its ``<title>`` tooltip.

>>> svg = line_chart([Series("loss", [(1, 0.9), (2, 0.7)])], [Mark(2, 0.7, "best", "step 2")], title="loss")
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Sequence

__all__ = ["MARK_STYLE", "Mark", "Series", "VLine", "esc", "line_chart", "mark_symbol", "nice_ticks"]

# category -> (fill, stroke, shape)
MARK_STYLE: dict[str, tuple[str, str, str]] = {
    "kept": ("#1f77b4", "#0d3c61", "circle"),
    "best": ("#ffbf00", "#7a5c00", "star"),
    "verified": ("#2ca02c", "#145214", "diamond"),
    "failed": ("#d62728", "#6b0f10", "cross"),
    "corrupt": ("#7b1fa2", "#3c0a52", "cross"),
    "pruned": ("none", "#9e9e9e", "circle"),
    "slimmed": ("none", "#ff7f0e", "ring"),
}


def esc(text: object) -> str:
    """HTML/SVG-escaped text (quotes too: safe inside attributes)."""
    return html.escape(str(text), quote=True)


@dataclasses.dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]
    color: str = "#4c72b0"
    bars: bool = False  # vertical bars from 0 instead of a line


@dataclasses.dataclass(frozen=True)
class Mark:
    x: float
    y: float | None  # None: on the chart's bottom edge
    category: str
    tip: str
    ring: bool = False  # an extra ring (a slimmed checkpoint)


@dataclasses.dataclass(frozen=True)
class VLine:
    x: float
    label: str
    color: str = "#888888"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else [0.0]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3g}"


def mark_symbol(category: str, cx: float, cy: float, r: float = 5.5, *, ring: bool = False) -> str:
    """The SVG shape of one checkpoint mark (also used in the legend)."""
    fill, stroke, shape = MARK_STYLE.get(category, MARK_STYLE["kept"])
    common = f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"'
    if shape == "star":
        pts = []
        for i in range(10):
            rad = (r * 1.7 if i % 2 == 0 else r * 0.75)
            a = math.pi / 2 + i * math.pi / 5
            pts.append(f"{cx + rad * math.cos(a):.1f},{cy - rad * math.sin(a):.1f}")
        out = f'<polygon points="{" ".join(pts)}" {common}/>'
    elif shape == "diamond":
        out = f'<polygon points="{cx},{cy - r * 1.2:.1f} {cx + r * 1.2:.1f},{cy} {cx},{cy + r * 1.2:.1f} {cx - r * 1.2:.1f},{cy}" {common}/>'
    elif shape == "cross":
        d = r * 1.1
        out = (f'<path d="M{cx - d:.1f},{cy - d:.1f}L{cx + d:.1f},{cy + d:.1f}M{cx - d:.1f},{cy + d:.1f}L{cx + d:.1f},{cy - d:.1f}" '
               f'stroke="{fill}" stroke-width="3.2" fill="none"/>')
    elif shape == "ring":
        out = f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r * 1.9:.1f}" fill="none" stroke="{stroke}" stroke-width="2" stroke-dasharray="3,2"/>'
    else:
        out = f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}" {common}/>'
    if ring and shape != "ring":
        out += mark_symbol("slimmed", cx, cy, r)
    return out


def _extent(values: list[float], pad: float) -> tuple[float, float]:
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - (abs(lo) or 1.0) * 0.5, hi + (abs(hi) or 1.0) * 0.5
    span = hi - lo
    return lo - span * pad, hi + span * pad


def line_chart(
    series: Sequence[Series], marks: Sequence[Mark] = (), *, title: str = "", ylabel: str = "",
    xlabel: str = "step", vlines: Sequence[VLine] = (), width: int = 1000, height: int = 320, zero: bool = False,
) -> str:
    """One chart as an ``<svg>`` element (text escaped). ``zero``: the y axis starts at 0."""
    left, right, top, bottom = 70, 20, 34, 44
    pw, ph = width - left - right, height - top - bottom
    finite = [(x, y) for s in series for x, y in s.points if math.isfinite(x) and math.isfinite(y)]
    xs = [x for x, _ in finite] + [m.x for m in marks] + [v.x for v in vlines]
    ys = [y for _, y in finite] + [m.y for m in marks if m.y is not None and math.isfinite(m.y)]
    x0, x1 = _extent(xs, 0.02)
    y0, y1 = _extent(ys + ([0.0] if zero else []), 0.06)
    if zero:
        y0 = min(0.0, y0) if min(ys or [0.0]) < 0 else 0.0

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fbfbfd" stroke="#d0d0d8"/>',
             f'<text x="{left}" y="20" class="ctitle">{esc(title)}</text>']
    for t in nice_ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e6e6ee"/>'
                     f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end" class="tick">{esc(_fmt(t))}</text>')
    for t in nice_ticks(x0, x1, 8):
        parts.append(f'<text x="{px(t):.1f}" y="{top + ph + 16}" text-anchor="middle" class="tick">{esc(_fmt(t))}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" class="axis">{esc(xlabel)}</text>'
                 f'<text x="14" y="{top + ph / 2}" text-anchor="middle" class="axis" '
                 f'transform="rotate(-90 14 {top + ph / 2})">{esc(ylabel)}</text>')
    for v in vlines:
        parts.append(f'<line x1="{px(v.x):.1f}" x2="{px(v.x):.1f}" y1="{top}" y2="{top + ph}" stroke="{v.color}" '
                     f'stroke-dasharray="5,4" stroke-width="1.3"><title>{esc(v.label)}</title></line>'
                     f'<text x="{px(v.x) + 3:.1f}" y="{top + 11}" class="vlabel" fill="{v.color}">{esc(v.label)}</text>')
    for s in series:
        pts = [(px(x), py(y)) for x, y in s.points if math.isfinite(x) and math.isfinite(y)]
        if s.bars:
            w = max(2.0, min(14.0, pw / max(len(pts), 1) * 0.6))
            base = py(max(y0, 0.0))
            parts += [f'<rect x="{x - w / 2:.1f}" y="{min(y, base):.1f}" width="{w:.1f}" height="{abs(base - y):.1f}" '
                      f'fill="{s.color}" opacity="0.8"><title>{esc(s.name)}</title></rect>' for x, y in pts]
        elif pts:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="1.6">'
                         f'<title>{esc(s.name)}</title></polyline>')
    for m in marks:
        y = py(m.y) if m.y is not None and math.isfinite(m.y) else top + ph - 8
        slim = ' data-slimmed="1"' if m.ring else ""
        parts.append(f'<g class="mark mark-{esc(m.category)}" data-category="{esc(m.category)}"{slim}><title>{esc(m.tip)}</title>'
                     f'{mark_symbol(m.category, px(m.x), y, ring=m.ring)}</g>')
    parts.append("</svg>")
    return "".join(parts)
