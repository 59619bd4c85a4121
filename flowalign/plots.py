"""Figures for the run directory: the reward curve and other metric panels from ``metrics.csv``, accuracy per category
(base vs aligned bars), and sample image grids."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from flowalign.files import atomic_path

PathLike = Union[str, Path]


def read_metrics(metrics_csv: PathLike) -> dict[str, list[float]]:
    """Columns of ``metrics.csv`` as float lists (empty cells -> NaN)."""
    with open(metrics_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            try:
                number = float(value) if value not in (None, "") else math.nan
            except ValueError:
                number = math.nan
            columns.setdefault(key, []).append(number)
    return columns


def _save_figure(fig, out_png: PathLike) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png = Path(out_png)
    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return out_png


def reward_curve_keys(data: dict) -> list[str]:
    """The columns :func:`reward_curve` draws by default: every ``reward/.../mean`` and ``eval/.../mean``, without
    ``reward/mean`` when it is a single reward's own line (one reward of weight 1: the same values, drawn once)."""
    keys = [k for k in data if k.endswith("/mean") and k.split("/")[0] in ("reward", "eval")]
    components = [k for k in keys if k.startswith("reward/") and k != "reward/mean"]
    if "reward/mean" in keys and len(components) == 1 and np.allclose(data["reward/mean"], data[components[0]], equal_nan=True):
        keys.remove("reward/mean")
    return keys


def reward_curve(metrics_csv: PathLike, out_png: PathLike, keys: Optional[Sequence[str]] = None) -> Path:
    """Plot reward columns of ``metrics.csv`` against ``iteration`` and write ``out_png``.

    ``keys`` defaults to every ``reward/.../mean`` column (and ``eval/.../mean`` ones), with a
    shaded ±std band where the matching ``.../std`` column exists.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_metrics(metrics_csv)
    if "iteration" not in data:
        raise ValueError(f"{metrics_csv} has no 'iteration' column (columns: {sorted(data)})")
    if keys is None:
        keys = reward_curve_keys(data)
    if not keys:
        raise ValueError(f"{metrics_csv} has no reward columns to plot (columns: {sorted(data)})")
    x = np.asarray(data["iteration"])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key in keys:
        y = np.asarray(data[key])
        ok = ~np.isnan(y)
        ax.plot(x[ok], y[ok], marker="o" if ok.sum() < 30 else None, label=key)
        std_key = key[: -len("mean")] + "std"
        if std_key in data:
            s = np.asarray(data[std_key])
            ax.fill_between(x[ok], (y - s)[ok], (y + s)[ok], alpha=0.2)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.set_title("reward/*: training rollouts; eval/*: the eval grid (ODE)\nbands: ±1 std over the iteration's samples", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, out_png)


def metric_panels(metrics_csv: PathLike, out_png: PathLike, panels: Sequence[tuple[str, Sequence[str]]], x: str = "step") -> Path:
    """Plot columns of ``metrics.csv`` against column ``x``, one panel per ``(title, keys)``.

    Keys missing from the file are skipped, as are panels left with no key; NaN cells (a metric
    not logged at that step) are gaps. Used for offline runs (``loss``, ``gdro/implicit_acc``...).

    Raises:
        ValueError: no ``x`` column, or none of the keys is in the file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_metrics(metrics_csv)
    if x not in data:
        raise ValueError(f"{metrics_csv} has no {x!r} column (columns: {sorted(data)})")
    shown = [(title, [k for k in keys if k in data]) for title, keys in panels]
    shown = [(title, keys) for title, keys in shown if keys]
    if not shown:
        wanted = sorted({k for _, keys in panels for k in keys})
        raise ValueError(f"{metrics_csv} has none of the columns {wanted} (columns: {sorted(data)})")
    xs = np.asarray(data[x])
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.6), dpi=100, squeeze=False)
    for ax, (title, keys) in zip(axes[0], shown):
        for key in keys:
            y = np.asarray(data[key])
            ok = ~np.isnan(y)
            ax.plot(xs[ok], y[ok], marker="o" if ok.sum() < 30 else None, label=key)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel(x)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    return _save_figure(fig, out_png)


def category_bar_values(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What :func:`category_bars` draws, in percent, from ``Comparison.rows`` (``{category: {"base":
    CategoryStats, "aligned": CategoryStats, "delta": ...}}``, the overall row last as ``compare`` orders it).

    Returns ``{"names": [C], "count": [C], "base" / "aligned": [C] accuracies, "base_err" / "aligned_err":
    [2, C] distances from the accuracy down to the 95% interval's low end and up to its high end,
    "delta": [C] aligned - base in points}``.
    """
    names = list(rows)

    def side(key: str) -> tuple[np.ndarray, np.ndarray]:
        stats = [rows[name][key] for name in names]
        acc = np.array([100.0 * s.accuracy for s in stats])
        err = np.array([[100.0 * s.accuracy - 100.0 * s.ci_low for s in stats], [100.0 * s.ci_high - 100.0 * s.accuracy for s in stats]])
        return acc, np.maximum(err, 0.0)  # at 0% or 100% the interval's end equals the accuracy up to rounding

    base, base_err = side("base")
    aligned, aligned_err = side("aligned")
    return {"names": names, "count": [int(rows[name]["aligned"].count) for name in names],
            "base_count": [int(rows[name]["base"].count) for name in names], "base": base, "base_err": base_err,
            "aligned": aligned, "aligned_err": aligned_err, "delta": aligned - base}


def count_label(base_count: int, aligned_count: int) -> str:
    """The ``n=`` under a pair of bars: one count, or ``base/aligned`` when drops made them differ (as the tables show)."""
    return f"n={aligned_count}" if base_count == aligned_count else f"n={base_count}/{aligned_count}"


def category_bars(rows: Mapping[str, Mapping[str, Any]], out_png: PathLike, target_points: Optional[float] = None,
                  overall: str = "all", title: str = "held-out accuracy per category", labels: tuple[str, str] = ("base", "aligned")) -> Path:
    """Grouped bars of accuracy per category, base vs aligned (named ``labels`` in the legend), with
    95% Wilson whiskers and the gain in points over each pair; with ``target_points``, a dashed line
    over the ``overall`` pair at base + target (the run report's acceptance bar). ``rows`` is
    ``Comparison.rows`` (:func:`flowalign.evaluation.compare`); values as :func:`category_bar_values`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = category_bar_values(rows)
    names, x, width = values["names"], np.arange(len(values["names"])), 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(names) + 1.5), 4), dpi=100)
    ax.bar(x - width / 2, values["base"], width, yerr=values["base_err"], capsize=3, color="#9e9e9e", label=labels[0])
    ax.bar(x + width / 2, values["aligned"], width, yerr=values["aligned_err"], capsize=3, color="#1f77b4", label=labels[1])
    for i, delta in enumerate(values["delta"]):
        top = np.nan_to_num(max(values["base"][i] + values["base_err"][1, i], values["aligned"][i] + values["aligned_err"][1, i]))
        ax.text(x[i], top + 2, f"{delta:+.1f}" if np.isfinite(delta) else "–", ha="center", va="bottom", fontsize=8)
    top_of_axis = 112.0
    if target_points is not None and overall in names:
        i = names.index(overall)
        line = values["base"][i] + target_points
        if np.isfinite(line):
            # above 100% no accuracy can meet it: the line sits at the top of the chart, its label says where it is
            shown = min(line, top_of_axis - 1.0)
            ax.hlines(shown, x[i] - 1.2 * width, x[i] + 1.2 * width, colors="#d62728", linestyles="--",
                      label=f"base + {target_points:g} points" + (f" (= {line:.0f}%, off the chart)" if line > shown else ""))
    ax.set_xticks(x, [f"{name}\n({count_label(b, a)})" for name, b, a in zip(names, values["base_count"], values["count"])], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, top_of_axis)
    ax.set_title(f"{title} (gain in points above each pair)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    # outside the axes, right of them: inside, it covered the first pair's bars or gain label when those are high
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save_figure(fig, out_png)


def frame_strip(images: torch.Tensor, max_frames: int = 4) -> torch.Tensor:
    """Videos ``[N, F, 3, H, W]`` as images ``[N, 3, H, f·W]``: ``f = min(F, max_frames)`` frames evenly spaced from the
    first to the last (the first alone when ``f = 1``), left to right; images ``[N, 3, H, W]`` come back as they are.
    How grids show a video."""
    if images.ndim == 4:
        return images
    if images.ndim != 5 or images.shape[2] != 3:
        raise ValueError(f"videos must be [N, F, 3, H, W], got shape {tuple(images.shape)}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    count = images.shape[1]
    picked = torch.linspace(0, count - 1, min(count, max_frames)).round().long().unique()  # [f], first and last included
    frames = images[:, picked]  # [N, f, 3, H, W]
    return frames.permute(0, 2, 3, 1, 4).reshape(images.shape[0], 3, images.shape[3], -1)  # [N, 3, H, f·W]


def image_grid(images: torch.Tensor, out_png: PathLike, nrow: int = 4, captions: Optional[Sequence[str]] = None,
               pad: int = 2, caption_height: int = 12, upscale: Optional[int] = None) -> Path:
    """Write ``images`` (``[N, 3, H, W]`` floats in [0, 1]; videos ``[N, F, 3, H, W]`` as :func:`frame_strip`s) as a
    grid of ``nrow`` per row.

    Captions (one per image, cut to the cell width) are drawn in a strip under each cell. Small
    images are enlarged by an integer factor ``upscale`` (nearest neighbour; default: the
    smallest factor making cells (a video's frames) at least 128 px wide). Returns the path written.
    """
    frame_width = images.shape[-1]  # of one frame: a video's strip is several wide
    if images.ndim == 5:
        images = frame_strip(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W] (or videos [N, F, 3, H, W]), got shape {tuple(images.shape)}")
    if captions is not None and len(captions) != images.shape[0]:
        raise ValueError(f"{len(captions)} captions for {images.shape[0]} images")
    factor = upscale if upscale is not None else max(1, math.ceil(128 / frame_width))
    if factor > 1:
        images = images.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    n, _, h, w = images.shape
    ncol = max(1, min(nrow, n))
    nrows = math.ceil(n / ncol)
    strip = caption_height if captions is not None else 0
    cell_h, cell_w = h + strip + pad, w + pad
    canvas = Image.new("RGB", (ncol * cell_w + pad, nrows * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, ncol)
        x0, y0 = pad + c * cell_w, pad + r * cell_h
        canvas.paste(Image.fromarray(pixels[i]), (x0, y0))
        if captions is not None:
            text = str(captions[i])
            max_chars = max(1, w // 6)
            draw.text((x0, y0 + h), text if len(text) <= max_chars else text[: max_chars - 1] + "…", fill="black")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return out_png
