"""Tiny SVG charts (standard library only), so reports render anywhere without matplotlib."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 30, 56
COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1")


def _frame(title: str, y_max: float, y_label: str) -> list[str]:
    plot_h = HEIGHT - TOP - BOTTOM
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>',
        f'<text x="12" y="{TOP + plot_h / 2}" transform="rotate(-90 12 {TOP + plot_h / 2})" '
        f'text-anchor="middle">{escape(y_label)}</text>',
    ]
    for i in range(5):
        value = y_max * i / 4
        y = TOP + plot_h - plot_h * i / 4
        parts.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#ddd"/>'
        )
        parts.append(f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(value)}</text>')
    return parts


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _legend(names: Sequence[str]) -> list[str]:
    parts = []
    x = float(LEFT)
    for i, name in enumerate(names):
        colour = COLOURS[i % len(COLOURS)]
        parts.append(
            f'<rect x="{x:.0f}" y="{HEIGHT - 14}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{x + 14:.0f}" y="{HEIGHT - 5}">{escape(name)}</text>'
        )
        x += 14 + 7 * len(name) + 16  # about 7 px a character at font-size 11
    return parts


def bar_chart(
    title: str, categories: Sequence[str], series: dict[str, Sequence[float]], y_label: str
) -> str:
    """Grouped bars: one group per category, one bar per series."""
    values = [v for vs in series.values() for v in vs if math.isfinite(v)]
    y_max = max(values, default=1.0) or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = _frame(title, y_max, y_label)
    group_w = plot_w / max(1, len(categories))
    bar_w = group_w * 0.8 / max(1, len(series))
    for s, (name, vs) in enumerate(series.items()):
        colour = COLOURS[s % len(COLOURS)]
        for i, v in enumerate(vs):
            h = plot_h * (v / y_max if math.isfinite(v) else 0)
            x = LEFT + i * group_w + group_w * 0.1 + s * bar_w
            parts.append(
                f'<rect x="{x:.1f}" y="{TOP + plot_h - h:.1f}" width="{bar_w:.1f}" '
                f'height="{h:.1f}" fill="{colour}"><title>{escape(name)} '
                f"{escape(categories[i])}: {_fmt(v)}</title></rect>"
            )
    step = max(1, len(categories) // 12)
    for i, cat in enumerate(categories):
        if i % step == 0:
            x = LEFT + (i + 0.5) * group_w
            y = TOP + plot_h + 14
            parts.append(
                f'<text x="{x:.1f}" y="{y}" text-anchor="end" '
                f'transform="rotate(-30 {x:.1f} {y})">{escape(cat)}</text>'
            )
    parts += _legend(list(series))
    parts.append("</svg>")
    return "\n".join(parts)


def line_chart(
    title: str, x_labels: Sequence[str], series: dict[str, Sequence[float | None]], y_label: str
) -> str:
    """Lines over ordered points (e.g. time buckets); None leaves a gap."""
    values = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    y_max = max(values, default=1.0) or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = _frame(title, y_max, y_label)
    n = max(1, len(x_labels))

    def xy(i: int, v: float) -> tuple[float, float]:
        x = LEFT + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)
        return x, TOP + plot_h - plot_h * v / y_max

    for s, (name, vs) in enumerate(series.items()):
        colour = COLOURS[s % len(COLOURS)]
        points = [xy(i, v) for i, v in enumerate(vs) if v is not None and math.isfinite(v)]
        if len(points) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
        for x, y in points:
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}">'
                f"<title>{escape(name)}</title></circle>"
            )
    # keep labels about 80 px apart so they never overlap
    step = max(1, math.ceil(n * 80 / plot_w))
    for i, label in enumerate(x_labels):
        if i % step == 0:
            x, _ = xy(i, 0)
            parts.append(
                f'<text x="{x:.1f}" y="{TOP + plot_h + 14}" text-anchor="middle">'
                f"{escape(label)}</text>"
            )
    parts += _legend(list(series))
    parts.append("</svg>")
    return "\n".join(parts)
