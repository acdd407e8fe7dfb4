"""The loss curve and the labelled XY grid (checkpoint x LoRA strength) users judge a run by.

Matplotlib is driven through `Figure` + `FigureCanvasAgg`, never `pyplot`: pyplot keeps global state that is not
thread-safe, and ComfyUI runs nodes on a worker thread of its server.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from .checkpoints import atomic_write

PLOT_SIZE = (8.0, 4.5)  # inches; at PLOT_DPI an 800 x 450 image
PLOT_DPI = 100
MAX_STRENGTHS = 100  # one column of sampled images each: more is a typo, not a grid


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to `window` finite values (fewer at the start); NaN/inf losses are skipped, not spread."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, v, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    lo = np.maximum(np.arange(1, len(v) + 1) - window, 0)
    n = counts[1:] - counts[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[1:] - sums[lo]) / n, np.nan)


def loss_plot(
    losses: Sequence[float],
    lrs: Sequence[float] | None = None,
    checkpoint_steps: Sequence[int] = (),
    path: str | Path | None = None,
    title: str | None = None,
    validation: Sequence[dict] = (),
) -> Image.Image:
    """The loss per step (raw and smoothed), the learning rate on a second axis, the saved checkpoints, and the
    validation loss (`validation.validation_record`s: the raw LoRA's, and its EMA's where kept) as a second line.

    Steps count from 1. Returns an RGB image; also written as a PNG to `path` (atomically) when given.
    """
    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    n = len(losses)
    if n == 0:
        ax.text(0.5, 0.5, "no steps yet", ha="center", va="center", fontsize=16, transform=ax.transAxes)
        ax.set_axis_off()
    else:
        steps = np.arange(1, n + 1)
        window = max(1, min(n // 20, 200))  # ~5% of the run: smooth enough early, still local late
        marker = "o" if n == 1 else None  # a single point draws no line
        faint = window > 1  # the raw loss recedes only when a smoothed curve carries the trend
        ax.plot(steps, losses, color="tab:blue", alpha=0.35 if faint else 1.0, linewidth=0.8, marker=marker,
                label="loss")
        if faint:
            ax.plot(steps, moving_average(losses, window), color="tab:blue", linewidth=2,
                    label=f"loss, mean of {window}")
        if lrs:
            ax_lr = ax.twinx()
            ax_lr.plot(np.arange(1, len(lrs) + 1), lrs, color="tab:orange", linewidth=1.2, marker=marker,
                       label="learning rate")
            ax_lr.set_ylabel("learning rate", color="tab:orange")
            ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            ax_lr.set_ylim(bottom=0)
        for kind, colour, name in (("raw", "tab:green", "validation loss"), ("ema", "tab:purple", "validation, EMA")):
            points = [(r["step"], r[kind]) for r in validation if r.get(kind) is not None and r["step"] <= n]
            if points:
                ax.plot(*zip(*points), color=colour, linewidth=1.5, marker="o", markersize=4, label=name)
        marks = [s for s in checkpoint_steps if 1 <= s <= n]  # a mark outside the run would only stretch the axis
        for i, step in enumerate(marks):
            ax.axvline(step, color="0.4", linestyle="--", linewidth=1, label=None if i else "checkpoint")
            ax.text(step, 0.98, f"{step} ", transform=ax.get_xaxis_transform(), rotation=90, va="top", ha="right",
                    fontsize=8, color="0.3")
        ax.set_xlim(0.5, max(n, 2) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        # one legend for both axes, under the plot where no curve or checkpoint label can hide it
        handles = [h for a in fig.axes for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(handles), fontsize=8,
                  frameon=False)
    ax.set_title(title or "training loss")
    fig.tight_layout()
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
    if path is not None:
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return image


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _text_size(font: ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def xy_grid(
    images: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str | None = None,
    x_axis: str = "strength",
    y_axis: str = "step",
) -> Image.Image:
    """Cells in rows (e.g. checkpoints) and columns (e.g. LoRA strengths), labelled on the left and on top.

    All cells must have one size. Text scales with the cell size so it stays readable from 64 px to 1024 px cells.
    The grid is exactly label margin + cells: (left + cols * w) x (top + rows * h) pixels.
    """
    if not row_labels or not col_labels:
        raise ValueError("xy_grid: no rows or no columns; give at least one checkpoint and one strength")
    if len(images) != len(row_labels):
        raise ValueError(f"xy_grid: {len(images)} rows of images but {len(row_labels)} row labels; "
                         "give one label per row")
    for r, row in enumerate(images):
        if len(row) != len(col_labels):
            raise ValueError(f"xy_grid: row {r} ({row_labels[r]!r}) has {len(row)} images but there are "
                             f"{len(col_labels)} column labels; every row needs one image per column")
    cell = images[0][0].size
    for r, row in enumerate(images):
        for c, im in enumerate(row):
            if im.size != cell:
                raise ValueError(f"xy_grid: row {r} ({row_labels[r]!r}), column {c} is {im.size[0]}x{im.size[1]} "
                                 f"but the first cell is {cell[0]}x{cell[1]}; sample every cell at one size")
    w, h = cell
    size = max(12, min(w, h) // 12)
    font, title_font = _font(size), _font(round(size * 1.25))
    pad = size // 2
    corner = f"{y_axis} \\ {x_axis}"
    line_h = _text_size(font, "Ag0")[1]
    left = max(_text_size(font, t)[0] for t in [corner, *row_labels]) + 2 * pad
    title_h = _text_size(title_font, title)[1] + 2 * pad if title else 0
    top = title_h + line_h + 2 * pad

    grid = Image.new("RGB", (left + len(col_labels) * w, top + len(row_labels) * h), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((grid.width / 2, pad), title, font=title_font, fill="black", anchor="mt")
    label_y = title_h + pad + line_h / 2
    draw.text((pad, label_y), corner, font=font, fill="dimgray", anchor="lm")
    for c, label in enumerate(col_labels):
        draw.text((left + c * w + w / 2, label_y), label, font=font, fill="black", anchor="mm")
    for r, (label, row) in enumerate(zip(row_labels, images)):
        draw.text((left - pad, top + r * h + h / 2), label, font=font, fill="black", anchor="rm")
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB"), (left + c * w, top + r * h))
    return grid


def _parse_number(token: str) -> float:
    try:
        value = float(token)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"strengths: {token!r} is not a number; write numbers like '0, 0.5, 1' or a range "
                         "'start:stop:step' like '0:1:0.25'")
    return value


def _parse_range(token: str) -> list[float]:
    parts = token.split(":")
    if len(parts) != 3:
        raise ValueError(f"strengths: {token!r} is not a range; write it as start:stop:step, e.g. '0:1:0.25'")
    start, stop, step = (_parse_number(p) for p in parts)
    if step <= 0 or stop < start:
        raise ValueError(f"strengths: range {token!r} needs start <= stop and a step > 0, e.g. '0:1:0.25'")
    count = math.floor((stop - start) / step + 1e-9) + 1  # the tolerance keeps `stop` when it is reached exactly
    if count > MAX_STRENGTHS:
        raise ValueError(f"strengths: range {token!r} gives {count} values, more than {MAX_STRENGTHS}; "
                         "use a larger step")
    return [round(start + i * step, 10) for i in range(count)]  # round off float noise like 0.30000000000000004


def parse_strengths(text: str) -> list[float]:
    """'0,0.2,0.4', '0 0.5 1' or a range 'start:stop:step' ('0:1:0.25'); tokens may mix numbers and ranges."""
    tokens = [t for t in re.split(r"[,;\s]+", re.sub(r"\s*:\s*", ":", text.strip())) if t]
    if not tokens:
        raise ValueError("strengths: empty; give LoRA strengths like '0, 0.5, 1' or a range like '0:1:0.25'")
    values = [v for t in tokens for v in (_parse_range(t) if ":" in t else [_parse_number(t)])]
    if len(values) > MAX_STRENGTHS:
        raise ValueError(f"strengths: {len(values)} values, more than {MAX_STRENGTHS}; give fewer")
    return values
