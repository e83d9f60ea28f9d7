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


@dataclass
class _Canvas:
    """Where the chart draws: the image's drawing surface and font, the plot box in pixels (left, top, right,
    bottom) and the data ranges its sides stand for."""

    draw: ImageDraw.ImageDraw
    font: ImageFont.ImageFont
    box: tuple[int, int, int, int]
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def at(self, x: float, y: float) -> tuple[float, float]:
        """The pixel of the data point (x, y)."""
        (left, top, right, bottom), (x_lo, x_hi), (y_lo, y_hi) = self.box, self.x_range, self.y_range
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))


def _draw_axes(canvas: _Canvas, title: str) -> None:
    """The plot box, six ticks with their values on each axis, the axes' names and the title."""
    draw, font = canvas.draw, canvas.font
    left, top, right, bottom = canvas.box
    (x_lo, x_hi), (y_lo, y_hi) = canvas.x_range, canvas.y_range
    draw.rectangle([left, top, right, bottom], outline="black")
    for k in range(6):
        xv, yv = x_lo + k * (x_hi - x_lo) / 5, y_lo + k * (y_hi - y_lo) / 5
        px, _ = canvas.at(xv, y_lo)
        _, py = canvas.at(x_lo, yv)
        draw.line([px, bottom, px, bottom + 5], fill="black")
        draw.text((px - 12, bottom + 8), f"{xv:.2f}", fill="black", font=font)
        draw.line([left - 5, py, left, py], fill="black")
        draw.text((left - 40, py - 6), f"{yv:.2f}", fill="black", font=font)
    draw.text(((left + right) / 2 - 110, bottom + 30), "editability: prompt fidelity (higher: follows the prompt)",
              fill="black", font=font)
    draw.text((8, top - 20), "reconstruction: identity (higher: looks like the pictures)", fill="black", font=font)
    if title:
        draw.text(((left + right) / 2 - 3 * len(title), 6), title, fill="black", font=font)


def _draw_line_at(canvas: _Canvas, p: Point, colour: str) -> None:
    """A point without editability (the real pictures): a dashed horizontal line at its identity, named."""
    left, _, right, _ = canvas.box
    _, py = canvas.at(canvas.x_range[0], p.y[0])
    for sx in range(int(left), int(right), 12):
        canvas.draw.line([sx, py, min(sx + 6, right), py], fill=colour, width=2)
    canvas.draw.text((right - 90, py - 14), p.name, fill=colour, font=canvas.font)


def _draw_point(canvas: _Canvas, p: Point, colour: str) -> tuple[float, float]:
    """A point as a dot with its two intervals as error bars; returns the dot's centre in pixels."""
    cx, cy = canvas.at(p.x[0], p.y[0])
    x1, _ = canvas.at(p.x[1], p.y[0])
    x2, _ = canvas.at(p.x[2], p.y[0])
    _, y1 = canvas.at(p.x[0], p.y[1])
    _, y2 = canvas.at(p.x[0], p.y[2])
    canvas.draw.line([x1, cy, x2, cy], fill=colour, width=2)
    canvas.draw.line([cx, y1, cx, y2], fill=colour, width=2)
    canvas.draw.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=colour)
    return cx, cy


def _place_labels(canvas: _Canvas, wanted: list[tuple[tuple[float, float], str, str]]) -> None:
    """Write each name at its wanted corner, moved down past the labels already placed so that none overlap; after
    every bar and on white, so no bar hides a name. `wanted`: ((x, y), text, colour) in drawing order."""
    placed: list[tuple[float, float, float, float]] = []  # label boxes so far
    labels = []
    for (x, y), text, colour in wanted:
        width = canvas.draw.textlength(text, font=canvas.font)
        while any(x < bx2 and bx1 < x + width and y < by2 and by1 < y + 12 for bx1, by1, bx2, by2 in placed):
            y += 13
        placed.append((x, y, x + width, y + 12))
        labels.append(((x, y), text, colour))
    for (lx, ly), text, colour in labels:
        canvas.draw.rectangle([lx - 1, ly, lx + canvas.draw.textlength(text, font=canvas.font) + 1, ly + 12],
                              fill="white")
        canvas.draw.text((lx, ly), text, fill=colour, font=canvas.font)


def draw_tradeoff(points: list[Point], path: str | os.PathLike, title: str = "") -> Path:
    """Write the chart as a PNG at `path` (atomically); ValueError when there is no point to draw."""
    drawable = [p for p in points if p.x[0] == p.x[0]]  # NaN x: the real pictures' line
    if not drawable:
        raise ValueError("no variant has both identity and prompt fidelity to draw")
    xs = [v for p in drawable for v in p.x[1:]]
    ys = [v for p in points for v in p.y[1:]]
    image = Image.new("RGB", SIZE, "white")
    canvas = _Canvas(ImageDraw.Draw(image), ImageFont.load_default(),
                     (MARGIN[0], MARGIN[1], SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]),
                     _padded(min(xs), max(xs)), _padded(min(ys), max(ys)))
    _draw_axes(canvas, title)
    colour = iter(PALETTE * 4)
    labels: list[tuple[tuple[float, float], str, str]] = []
    for p in points:
        c = REFERENCE if p.reference else next(colour)
        if p.x[0] != p.x[0]:  # the real pictures
            _draw_line_at(canvas, p, c)
            continue
        cx, cy = _draw_point(canvas, p, c)
        labels.append(((cx + 8, cy - 14), p.name, c))
    _place_labels(canvas, labels)
    return atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def _padded(lo: float, hi: float) -> tuple[float, float]:
    span = max(hi - lo, 0.05)
    return lo - 0.08 * span, hi + 0.08 * span
