"""A small SVG line plot of p99 latency against memory size (log-scaled), with no plotting library."""

from __future__ import annotations

import math
from typing import Any

W, H, PAD = 640, 360, 60
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")


def series(r: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for size, s in r["sizes"].items():
        for name, value in (
            ("in-process search+gather, batch 1", s["in_process"]["batch1"]["search_gather"]["p99_ms"]),
            ("in-process search+gather, batch 32", s["in_process"]["batch32"]["search_gather"]["p99_ms"]),
            ("HTTP /classify, batch 1", s["http"]["batch1"]["wall"]["p99_ms"]),
            ("HTTP /classify/batch, batch 32", s["http"]["batch32"]["wall"]["p99_ms"]),
        ):
            out.setdefault(name, []).append((int(size), float(value)))
    return out


def svg(r: dict[str, Any]) -> str:
    lines = series(r)
    xs = [x for pts in lines.values() for x, _ in pts]
    ys = [y for pts in lines.values() for _, y in pts]
    x0, x1 = math.log10(min(xs)) - 0.1, math.log10(max(xs)) + 0.1
    y1 = max(ys) * 1.1

    def px(x: float) -> float:
        return PAD + (math.log10(x) - x0) / (x1 - x0) * (W - 2 * PAD)

    def py(y: float) -> float:
        return H - PAD - y / y1 * (H - 2 * PAD)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="20" text-anchor="middle">p99 latency (ms) from the first request, by memory size</text>',
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>',
    ]
    for x in sorted(set(xs)):
        label = f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k"
        parts.append(f'<text x="{px(x):.1f}" y="{H - PAD + 16}" text-anchor="middle">{label}</text>')
    for i in range(5):
        y = y1 * i / 4
        parts.append(f'<text x="{PAD - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.0f}</text>')
    for n, (name, pts) in enumerate(lines.items()):
        colour = COLOURS[n % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{PAD + 10}" y="{PAD + 14 * n}" fill="{colour}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
