"""The Textual Inversion paper's trade-off chart: reconstruction (identity) against editability (prompt fidelity), one
point per variant with its 95% intervals as error bars, plain words and the real pictures as references.

Drawn with Pillow (already a dependency) into a PNG: a plotting library would be a new dependency for one figure.
`tradeoff_points(results)` reads the points from `studio eval --variants` JSON; `draw_tradeoff(points, path)` draws.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from studio.engine.files import atomic_write

SIZE = (900, 640)
MARGIN = (90, 50, 40, 70)  # left, top, right, bottom
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
REFERENCE = "#7f7f7f"


@dataclass
class Point:
    name: str
    x: tuple[float, float, float]  # editability: mean, low, high
    y: tuple[float, float, float]  # reconstruction: mean, low, high
    reference: bool = False  # plain words / real pictures: drawn grey


def _estimate(d: dict | None) -> tuple[float, float, float] | None:
    if not d or d.get("mean") is None:
        return None
    return float(d["mean"]), float(d.get("low", d["mean"])), float(d.get("high", d["mean"]))


def tradeoff_points(variants: dict[str, dict], plain: dict | None = None, ceiling: dict | None = None) -> list[Point]:
    """Points from `compare_methods`-shaped rows (`{name: {"identity": est, "prompt_fidelity": est, ...}}`), plain
    words' row and the real pictures' identity (a horizontal reference: they have no prompt to follow)."""
    points = []
    for name, row in variants.items():
        x, y = _estimate(row.get("prompt_fidelity")), _estimate(row.get("identity"))
        if x is not None and y is not None:
            points.append(Point(name, x, y))
    if plain is not None:
        x, y = _estimate(plain.get("prompt_fidelity")), _estimate(plain.get("identity"))
        if x is not None and y is not None:
            points.append(Point("plain words", x, y, reference=True))
    if ceiling is not None and _estimate(ceiling) is not None:
        points.append(Point("real pictures", (float("nan"),) * 3, _estimate(ceiling), reference=True))
    return points


def draw_tradeoff(points: list[Point], path: str | os.PathLike, title: str = "") -> Path:
    """Write the chart as a PNG at `path` (atomically); ValueError when there is no point to draw."""
    drawable = [p for p in points if p.x[0] == p.x[0]]  # NaN x: the real pictures' line
    if not drawable:
        raise ValueError("no variant has both identity and prompt fidelity to draw")
    xs = [v for p in drawable for v in p.x[1:]]
    ys = [v for p in points for v in p.y[1:]]
    x_lo, x_hi = _padded(min(xs), max(xs))
    y_lo, y_hi = _padded(min(ys), max(ys))
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top, right, bottom = MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left), bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    # axes, ticks, labels
    draw.rectangle([left, top, right, bottom], outline="black")
    for k in range(6):
        xv, yv = x_lo + k * (x_hi - x_lo) / 5, y_lo + k * (y_hi - y_lo) / 5
        px, _ = at(xv, y_lo)
        _, py = at(x_lo, yv)
        draw.line([px, bottom, px, bottom + 5], fill="black")
        draw.text((px - 12, bottom + 8), f"{xv:.2f}", fill="black", font=font)
        draw.line([left - 5, py, left, py], fill="black")
        draw.text((left - 40, py - 6), f"{yv:.2f}", fill="black", font=font)
    draw.text(((left + right) / 2 - 110, bottom + 30), "editability: prompt fidelity (higher: follows the prompt)",
              fill="black", font=font)
    draw.text((8, top - 20), "reconstruction: identity (higher: looks like the pictures)", fill="black", font=font)
    if title:
        draw.text(((left + right) / 2 - 3 * len(title), 6), title, fill="black", font=font)

    colour = iter(PALETTE * 4)
    placed: list[tuple[float, float, float, float]] = []  # label boxes so far: a new one moves down past them
    labels: list[tuple[tuple[float, float], str, str]] = []

    def label_at(x: float, y: float, text: str) -> tuple[float, float]:
        width = draw.textlength(text, font=font)
        while any(x < bx2 and bx1 < x + width and y < by2 and by1 < y + 12 for bx1, by1, bx2, by2 in placed):
            y += 13
        placed.append((x, y, x + width, y + 12))
        return x, y

    for p in points:
        c = REFERENCE if p.reference else next(colour)
        if p.x[0] != p.x[0]:  # the real pictures: a dashed horizontal line at their identity
            _, py = at(x_lo, p.y[0])
            for sx in range(int(left), int(right), 12):
                draw.line([sx, py, min(sx + 6, right), py], fill=c, width=2)
            draw.text((right - 90, py - 14), p.name, fill=c, font=font)
            continue
        cx, cy = at(p.x[0], p.y[0])
        x1, _ = at(p.x[1], p.y[0])
        x2, _ = at(p.x[2], p.y[0])
        _, y1 = at(p.x[0], p.y[1])
        _, y2 = at(p.x[0], p.y[2])
        draw.line([x1, cy, x2, cy], fill=c, width=2)
        draw.line([cx, y1, cx, y2], fill=c, width=2)
        draw.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=c)
        labels.append((label_at(cx + 8, cy - 14, p.name), p.name, c))
    for (lx, ly), text, c in labels:  # after every bar, on white, so no bar hides a name
        draw.rectangle([lx - 1, ly, lx + draw.textlength(text, font=font) + 1, ly + 12], fill="white")
        draw.text((lx, ly), text, fill=c, font=font)
    return atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def _padded(lo: float, hi: float) -> tuple[float, float]:
    span = max(hi - lo, 0.05)
    return lo - 0.08 * span, hi + 0.08 * span
