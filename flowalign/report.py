"""The run report: ``report.md`` (+ ``report.json``) and the before/after image grid.

``write_report(run_dir, base=..., aligned=..., config_dict=..., timings=...)`` writes into the run
directory:

- ``report.md``: the command, model, method and sampler, wall time per phase, the held-out
  table per category (base vs aligned, deltas, 95% CIs; :func:`flowalign.evaluation.compare`),
  links to ``heldout_accuracy.png`` / ``reward_curve.png`` / ``before_after.png``, a summary of ``metrics.csv`` and, for a
  reward that labels its failures (``details["failure"]``, e.g. ``shapes``), the failure modes
  base → aligned and which samples alignment fixed or broke (:func:`failure_tables`, :func:`failure_section`),
  and the prompts alignment helped and hurt most (:func:`prompt_section`;
  :func:`flowalign.evaluation.prompt_changes`);
- ``heldout_accuracy.png``: the held-out table as grouped bars, base vs aligned per category with
  95% whiskers and, with a target (``train.report_target_points``), its line (:func:`flowalign.plots.category_bars`);
- ``report.json``: the same numbers for scripts (``bench/toy_alignment.py`` reads it), every prompt's change included;
- ``eval_base.json`` / ``eval_aligned.json``: both evaluations with their per-sample results.

``before_after_grid(base_images, aligned_images, prompts, out_png)`` draws one column per prompt,
the base sample on the top row and the aligned sample (same prompt, same seed) under it, each
upscaled ``scale`` times with nearest-neighbour so 32x32 samples stay crisp, and the prompt,
wrapped, under each column.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from flowalign.evaluation import ALL, EvalResult, _num, _num_ci, _pct, _pts, _pts_ci, _signed, align_tags, category_mean, common_categories, compare, evaluate, failure_counts, failure_transitions, pick_samples, prompt_changes
from flowalign.files import atomic_path, write_text_atomic
from flowalign.plots import category_bars, read_metrics

logger = logging.getLogger(__name__)

__all__ = ["before_after_grid", "grid_size", "heldout_report", "write_before_after", "summarize_metrics", "write_report"]

PathLike = Union[str, Path]

# before/after grid layout (pixels)
LABEL_WIDTH = 64
PAD = 4
LINE_HEIGHT = 13
FONT_SIZE = 11
CAPTION_LINES = 3


# ----------------------------------------------------------------------------------------------
# Before / after grid
# ----------------------------------------------------------------------------------------------


def grid_size(num_images: int, height: int, width: int, scale: int = 4) -> tuple[int, int]:
    """``(width, height)`` in pixels of :func:`before_after_grid` for ``num_images`` columns.

    Layout: a label column of ``LABEL_WIDTH`` px, then per column a ``scale·w`` wide cell and a
    ``PAD`` gap; two image rows of ``scale·h`` separated by ``PAD``, and a caption strip of
    ``CAPTION_LINES·LINE_HEIGHT`` px; ``PAD`` around everything.
    """
    cell_w, cell_h = scale * width, scale * height
    total_w = PAD + LABEL_WIDTH + num_images * (cell_w + PAD)
    total_h = PAD + 2 * (cell_h + PAD) + CAPTION_LINES * LINE_HEIGHT + PAD
    return total_w, total_h


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)  # FreeType font (Pillow >= 10.1)
    except TypeError:  # older Pillow: the bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, max_width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``max_width`` px; the last line ends with '…' when text is cut."""
    def width(s: str) -> float:
        return font.getlength(s) if hasattr(font, "getlength") else 6 * len(s)

    lines: list[str] = []
    words = text.split()
    current = ""
    for word in words:
        trial = f"{current} {word}".strip()
        if width(trial) <= max_width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    lines = [line if width(line) <= max_width else _cut(line, width, max_width) for line in lines]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _cut(lines[-1] + " …", width, max_width)
    return lines


def _cut(line: str, width, max_width: int) -> str:
    while line and width(line + "…") > max_width:
        line = line[:-1]
    return line.rstrip() + "…"


def _to_uint8(images: Tensor) -> "Any":
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W] floats in [0, 1], got shape {tuple(images.shape)}")
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [N, H, W, 3]


def before_after_grid(base_images: Tensor, aligned_images: Tensor, prompts: Sequence[str], out_png: PathLike,
                      scale: int = 4, row_labels: Sequence[str] = ("base", "aligned")) -> Path:
    """Write a 2-row grid: base samples on top, aligned samples (same prompts and seeds) below.

    Args:
        base_images, aligned_images: ``[N, 3, H, W]`` floats in [0, 1] (videos ``[N, F, 3, H, W]``: a strip of
            frames per cell, :func:`flowalign.plots.frame_strip`), column ``j`` from the same prompt and initial noise.
        prompts: ``N`` captions, written (wrapped, up to ``CAPTION_LINES`` lines) under the columns.
        scale: nearest-neighbour upscale factor (4: 32x32 samples become 128x128 cells).
    Returns the path written; its size is :func:`grid_size`.
    """
    from PIL import Image, ImageDraw

    from flowalign.plots import frame_strip

    if base_images.shape != aligned_images.shape:
        raise ValueError(f"base and aligned images differ in shape: {tuple(base_images.shape)} vs {tuple(aligned_images.shape)}")
    base_images, aligned_images = frame_strip(base_images), frame_strip(aligned_images)
    if len(prompts) != base_images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {base_images.shape[0]} image columns")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    n, _, h, w = base_images.shape
    cell_w, cell_h = scale * w, scale * h
    canvas = Image.new("RGB", grid_size(n, h, w, scale), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for row, images in enumerate((base_images, aligned_images)):
        pixels = _to_uint8(images)
        y = PAD + row * (cell_h + PAD)
        label_w = font.getlength(row_labels[row]) if hasattr(font, "getlength") else 6 * len(row_labels[row])
        draw.text((PAD + max(0, (LABEL_WIDTH - PAD - label_w) / 2), y + cell_h / 2 - FONT_SIZE / 2), row_labels[row], fill="black", font=font)
        for j in range(n):
            x = PAD + LABEL_WIDTH + j * (cell_w + PAD)
            canvas.paste(Image.fromarray(pixels[j]).resize((cell_w, cell_h), Image.NEAREST), (x, y))
    y_caption = PAD + 2 * (cell_h + PAD)
    for j, prompt in enumerate(prompts):
        x = PAD + LABEL_WIDTH + j * (cell_w + PAD)
        for k, line in enumerate(_wrap(str(prompt), font, cell_w, CAPTION_LINES)):
            draw.text((x, y_caption + k * LINE_HEIGHT), line, fill="black", font=font)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        canvas.save(tmp)
    return out_png


def write_before_after(out_png: PathLike, base: EvalResult, aligned: EvalResult, indices: Optional[Sequence[int]] = None,
                       scale: int = 4) -> Path:
    """:func:`before_after_grid` of the samples both evaluations kept (``keep_images``), default all of them.

    Raises:
        ValueError: the two evaluations do not hold the same prompts and seeds for these samples.
    """
    if indices is None:
        indices = sorted(set(base.images) & set(aligned.images))
    indices = list(indices)
    if not indices:
        raise ValueError("no images to compare: evaluate both models with the same keep_images (e.g. evaluation.pick_samples(records))")
    for i in indices:
        if base.prompts[i] != aligned.prompts[i] or base.seeds[i] != aligned.seeds[i]:
            raise ValueError(f"sample {i} differs between the evaluations: {base.prompts[i]!r} seed {base.seeds[i]} vs "
                             f"{aligned.prompts[i]!r} seed {aligned.seeds[i]}")
    return before_after_grid(base.images_for(indices), aligned.images_for(indices), [base.prompts[i] for i in indices], out_png, scale=scale)


# ----------------------------------------------------------------------------------------------
# metrics.csv summary
# ----------------------------------------------------------------------------------------------


def _ema_note(config_dict: Mapping) -> str:
    """The method line's note on the averaged LoRA, which is what a run with ``train.ema`` evaluates and saves."""
    if _get(config_dict, "train.ema", False) is not True:
        return ""
    if _get(config_dict, "train.ema_schedule", "constant") == "power":
        return f"; evaluated and saved: the power-function EMA of the LoRA (gamma {_get(config_dict, 'train.ema_power', '?')})"
    every = _get(config_dict, "train.ema_every", 1)
    return (f"; evaluated and saved: the EMA of the LoRA (decay {_get(config_dict, 'train.ema_decay', '?')}"
            + (f", updated every {every} optimizer steps" if every not in (1, "?") else "") + ")")


def _drift_note(config_dict: Mapping) -> str:
    """The method line's note on guided rollouts (``sampling.drift_reward``): their rewards include the guidance."""
    reward = _get(config_dict, "sampling.drift_reward", None)
    if not reward:
        return ""
    return (f" (rollouts steered by Euphonium's guided drift: `{reward}`, {_get(config_dict, 'sampling.drift_mode', '?')} "
            f"scale {_get(config_dict, 'sampling.drift_scale', '?')}, {_get(config_dict, 'sampling.drift_gradient', '?')} gradient; "
            f"training rewards are the guided samples', evaluation is unguided)")


def _per_prompt_note(result) -> str:
    """"2 per line", or "1–2 per line" when the samples cycle over the prompt file's lines unevenly (512 over 320); a
    prompt on several lines gets more (the report's per-prompt table counts those)."""
    counts = collections.Counter(result.record_index).values() if result.record_index else []
    if not counts:
        return f"{result.settings.get('samples_per_prompt', '?')} per line"
    low, high = min(counts), max(counts)
    return f"{low} per line" if low == high else f"{low}–{high} per line"


def summarize_metrics(metrics_csv: PathLike, window: float = 0.1) -> list[dict[str, Any]]:
    """Per reward/diagnostic column of ``metrics.csv``: first and last window means and the best value.

    Columns summarised: ``reward/*/mean``, ``eval/*``, and the diagnostics the trainer logs when
    present (zero-advantage fraction, KL, clip fraction, grad norm, samples/s). ``window`` is the
    fraction of a column's logged values (at least one) averaged at each end, so one noisy iteration
    does not decide the summary; a column logged every few iterations (``eval/*``) is windowed over
    its own values, not over the run's iterations.
    """
    data = read_metrics(metrics_csv)
    n = len(data.get("iteration", []))
    if n == 0:
        return []
    wanted = ("zero", "kl", "clip", "grad_norm", "samples_per_s", "samples/s", "nonzero")
    keys = [c for c in data if c != "iteration" and (
        (c.startswith("reward/") and c.endswith("/mean")) or c.startswith("eval/") or any(w in c for w in wanted))]
    out = []
    for key in keys:
        values = [v for v in data[key] if math.isfinite(v)]
        if not values:
            continue
        k = max(1, int(round(window * len(values))))
        first, last = values[:k], values[-k:]
        out.append({"metric": key, "iterations": len(values), "first": sum(first) / len(first), "last": sum(last) / len(last),
                    "min": min(values), "max": max(values)})
    return out


# ----------------------------------------------------------------------------------------------
# report.md
# ----------------------------------------------------------------------------------------------


def _get(d: Mapping, dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return default
        d = d[part]
    return d


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples lists, other objects strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def duration_text(seconds: float) -> str:
    """``"42.0 s"``, ``"4.9 min"`` or ``"1.25 h"`` (``"–"`` when not finite): the report's wall times and the training log's ETA."""
    if not math.isfinite(seconds):
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def failure_tables(base: EvalResult, aligned: EvalResult) -> Optional[dict[str, dict[str, dict[str, int]]]]:
    """``{"base": counts, "aligned": counts, "transitions": matrix}`` of a reward that labels its failures
    (``details["failure"]``; :func:`flowalign.evaluation.failure_counts` / ``failure_transitions``), else None."""
    if base.failures is None or aligned.failures is None:
        return None
    base, aligned = align_tags(base, aligned)
    return {"base": failure_counts(base.tags, base.failures), "aligned": failure_counts(aligned.tags, aligned.failures),
            "transitions": failure_transitions(base.failures, aligned.failures)}


def failure_section(tables: Optional[Mapping[str, Mapping[str, Mapping[str, int]]]]) -> list[str]:
    """Report lines for :func:`failure_tables`: per category, the count of each label base → aligned,
    and what the aligned model made of each base outcome (same prompts and seeds). Empty for None."""
    if tables is None:
        return []
    before, after, moves = tables["base"], tables["aligned"], tables["transitions"]
    labels = list(moves)
    lines = ["## Failure modes", "", "Why samples fail, as the reward labels them; each cell is base → aligned (same prompts and seeds).", "",
             "| category | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for tag in [*sorted((set(before) | set(after)) - {ALL}), ALL]:  # a category only one side has shows as 0 there
        name = f"**{tag}**" if tag == ALL else tag
        lines.append(f"| {name} | " + " | ".join(f"{before.get(tag, {}).get(x, 0)} → {after[tag].get(x, 0)}" for x in labels) + " |")
    lines += ["", "Base outcome (rows) → aligned outcome (columns) of the same samples:", "",
              "| base outcome | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    lines += [f"| {a} | " + " | ".join(str(moves[a][b]) for b in labels) + " |" for a in labels]
    fixed = sum(row.get("correct", 0) for a, row in moves.items() if a != "correct")
    broken = sum(moves["correct"].values()) - moves["correct"]["correct"] if "correct" in moves else 0
    lines += ["", f"Alignment turns {fixed} failed samples correct and {broken} correct ones into failures (net {fixed - broken:+d}).", ""]
    return lines


def prompt_section(changes: Sequence[Mapping[str, Any]], top: int = 5, full_list: Optional[str] = "report.json") -> list[str]:
    """Report lines for :func:`flowalign.evaluation.prompt_changes`: the ``top`` prompts alignment
    helped most and the ``top`` it hurt most (prompts that did not move are left out). Empty when
    no prompt moved. ``full_list`` names the file that holds every prompt's change (None: none does)."""
    gains = [r for r in changes if r["aligned"] > r["base"]][:top]
    losses = [r for r in reversed(changes) if r["aligned"] < r["base"]][:top]
    if not gains and not losses:
        return []
    moved = sum(r["aligned"] != r["base"] for r in changes)
    lines = ["## Prompts that moved most", "",
             f"Correct samples per prompt, base → aligned (same seeds); {moved} of {len(changes)} distinct prompts moved"
             + (f" (all of them in `{full_list}`)." if full_list else "."), "",
             "| prompt | category | samples | base | aligned | Δ |", "|---|---|---:|---:|---:|---:|"]
    for r in [*gains, *losses]:
        lines.append(f"| {_table_cell(r['prompt'])} | {_table_cell(r['tag'])} | {r['n']} | {r['base']} | {r['aligned']} | {r['aligned'] - r['base']:+d} |")
    return lines + [""]


def _table_cell(text: str, max_chars: int = 80) -> str:
    """``text`` for one Markdown table cell: pipes escaped, newlines flattened, cut to ``max_chars`` with an ellipsis."""
    text = " ".join(str(text).split())
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text.replace("|", "\\|")


def meets_target(gain_points: float, target_points: float) -> bool:
    """``gain_points >= target_points`` without float noise: an exact +15-point gain (e.g. 68 -> 164 of
    640 samples, computed as 14.999999999999996) meets a +15 target. Gains are rounded to 1e-9 points,
    far below one sample's weight."""
    return round(gain_points, 9) >= target_points


def _target_caveat(met: bool, delta_low: float, delta_high: float, target_points: float) -> str:
    """How sure the verdict on the target is: the verdict reads the gain's point estimate, and a 95% CI that
    reaches the other side of the target (a small evaluation, a gain near it) says so."""
    if not (math.isfinite(delta_low) and math.isfinite(delta_high)):
        return ""
    if met and 100 * delta_low < target_points:
        return f" by the point estimate (its 95% CI reaches down to {100 * delta_low:+.1f}: more samples would settle it)"
    if not met and 100 * delta_high >= target_points:
        return f" by the point estimate (its 95% CI reaches up to {100 * delta_high:+.1f})"
    return ""


def run_environment() -> dict[str, Any]:
    """What a report records of where it was made: flowalign's version (and git commit, for a source checkout), torch,
    diffusers and python versions, the device, the number of processes of the launch (``WORLD_SIZE``), the UTC time."""
    import datetime
    import platform
    import subprocess

    import diffusers
    import torch

    import flowalign

    commit = None
    package = Path(flowalign.__file__).resolve().parent
    try:  # a source checkout of flowalign itself (not a project repository that happens to hold an installed copy)
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package, capture_output=True, text=True, timeout=5)
        lines = out.stdout.split()
        if out.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == package.parent:
            commit = lines[1]
            changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=package.parent,
                                     capture_output=True, text=True, timeout=10)
            if changed.returncode != 0 or changed.stdout.strip():  # edits since that commit ran too
                commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    try:  # torchrun / accelerate launch set it: a multi-process run's LoRA depends on it (noise_seeding: process)
        processes = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        processes = 1
    return {"flowalign": flowalign.__version__, "git_commit": commit, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "device": device, "processes": processes,
            "written_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def _short_commit(commit: str) -> str:
    """The first 12 hex digits of a commit, keeping a ``-dirty`` mark."""
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def _rollout_note(config_dict: Mapping) -> str:
    """`` rolled out by `pkg:fn` {kwargs}`` for a rollout of the user's own (a tree sampler); empty for the default."""
    name = _get(config_dict, "sampling.rollout", "default")
    if name == "default":
        return ""
    kwargs = _get(config_dict, "sampling.rollout_kwargs", {})
    return f" rolled out by `{name}`" + (f" {kwargs}" if kwargs else "")


def _noise_note(config_dict: Mapping[str, Any], run_dir: Path) -> str:
    """The rollouts' noise: the run's calibrated table when it saved one (DenseGRPO), else the configured schedule."""
    table = run_dir / "noise_table.json"
    if table.is_file():
        try:
            levels = json.loads(table.read_text(encoding="utf-8"))["levels"]
            return f"table `noise_table.json` [{', '.join(f'{x:.3g}' for x in levels)}]"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return f"{_get(config_dict, 'sampling.noise_schedule', '?')} {_get(config_dict, 'sampling.noise_kwargs', '')}"


def write_report(
    run_dir: PathLike,
    *,
    base: EvalResult,
    aligned: EvalResult,
    config_dict: Mapping[str, Any],
    timings: Mapping[str, float],
    metrics_csv: Optional[PathLike] = None,
    command: Optional[str] = None,
    target_gain_points: Optional[float] = None,
) -> Path:
    """Write ``report.md``, ``report.json``, ``eval_base.json`` and ``eval_aligned.json`` in ``run_dir``.

    Args:
        base, aligned: evaluations of the same prompts and seeds (checked by ``compare``).
        config_dict: the run's config as a dict (``flowalign.config.to_dict``).
        timings: wall seconds per phase, e.g. ``{"base eval": 50.2, "train": 1800.0, "aligned eval": 51.0}``.
        metrics_csv: the trainer's ``metrics.csv`` (default: ``run_dir/metrics.csv`` when present).
        command: the command line (default: ``config_dict["command"]``, else this process's argv).
        target_gain_points: an accuracy gain (percentage points) the report checks for (``train.report_target_points``):
            it says met / not met and draws the line on the bar chart; None (default): no target.
    Returns the path of ``report.md``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    comparison = compare(base, aligned)
    base, aligned = align_tags(base, aligned)  # as compare counted them
    category_bars(comparison.rows, run_dir / "heldout_accuracy.png", target_points=target_gain_points, overall=ALL)
    if command is None:
        program = Path(sys.argv[0]).name
        cli = sys.modules.get("flowalign.train.cli")
        main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if (cli is not None and (Path(sys.argv[0]).resolve() == Path(cli.__file__).resolve() or sys.argv[0] == "-c")) or \
                getattr(main_spec, "name", None) == "flowalign.train.cli":
            # python -m flowalign.train.cli (torchrun, accelerate launch), or python -c "...cli import main...": the command
            program = "flowalign"
        command = config_dict.get("command") or shlex.join([program, *sys.argv[1:]])
    environment = run_environment()
    if metrics_csv is None and (run_dir / "metrics.csv").is_file():
        metrics_csv = run_dir / "metrics.csv"
    curve = summarize_metrics(metrics_csv) if metrics_csv is not None and Path(metrics_csv).is_file() else []

    overall = comparison.rows[ALL]
    gain = 100 * overall["delta"]
    met = None if target_gain_points is None else meets_target(gain, target_gain_points)
    # the jointly scored samples' categories (compare() leaves out a sample one run dropped); one all dropped: out of both
    paired_base = {name: row["base"] for name, row in comparison.rows.items()}
    paired_aligned = {name: row["aligned"] for name, row in comparison.rows.items()}
    both = common_categories(paired_base, paired_aligned)
    mean_base, mean_aligned = category_mean(paired_base, both), category_mean(paired_aligned, both)
    settings = aligned.settings
    kernel = _get(config_dict, "sampling.kernel", "?")
    oversample = _get(config_dict, "train.oversample", 1.0)
    rounds = _get(config_dict, "train.max_sampling_rounds", 1)
    lines = [f"# flowalign run report: {run_dir.name}", ""]
    lines += [
        f"- **command**: `{command}`",
        f"- **model**: `{_get(config_dict, 'model.pretrained', settings.get('model', '?'))}` ({_get(config_dict, 'model.dtype', '?')})",
        f"- **method**: `{_get(config_dict, 'objective.name', '?')}`, kernel `{kernel}`"
        + ("" if kernel == "ode"  # the ODE draws no noise: its schedule is moot
           else f" (noise {_noise_note(config_dict, run_dir)})") + ", "
        f"{_get(config_dict, 'sampling.num_steps', '?')} steps, group size {_get(config_dict, 'sampling.group_size', '?')}"
        + _rollout_note(config_dict)
        + (f" (dynamic sampling from {oversample:g}x the prompts)" if oversample != 1.0 else "")
        + (f" (sampled until full: up to {rounds} windows of prompts)" if rounds != 1 else "") + _drift_note(config_dict) + ", "
        f"LoRA rank {_get(config_dict, 'lora.rank', '?')}" + (" (transformer and text encoders)" if _get(config_dict, "lora.train_text_encoder", False) is True else "")
        + f", {_get(config_dict, 'train.iterations', '?')} iterations, "
        f"lr {_get(config_dict, 'train.lr', '?')}, seed {_get(config_dict, 'train.seed', '?')}" + _ema_note(config_dict),
        "- **rewards**: " + ", ".join(f"`{r.get('name')}`" + (f" {r['kwargs']}" if r.get("kwargs") else "")
                                      + (f" as `{r['label']}`" if r.get("label") else "") + f" × {r.get('weight', 1.0)}"
                                      for r in config_dict.get("rewards", []) if isinstance(r, Mapping)) + _verdict_note(config_dict),
        f"- **evaluation**: {aligned.num_samples} samples ({_per_prompt_note(aligned)}, "
        + (f"{settings['num_prompts']} lines, " if "num_prompts" in settings else "") + f"{len(set(aligned.prompts))} distinct prompts, of "
        f"`{settings.get('prompts_file', _get(config_dict, 'train.eval_prompts', '?'))}`), "
        f"ODE {settings.get('num_steps', '?')} steps, guidance {settings.get('guidance_scale', '?')}, seeds {aligned.seeds[0]}…{aligned.seeds[-1]}; "
        f"the same prompts and initial noise for base and aligned",
        f"- **software**: flowalign {environment['flowalign']}" + (f" ({_short_commit(environment['git_commit'])})" if environment.get("git_commit") else "")
        + f", torch {environment['torch']}, diffusers {environment['diffusers']}, python {environment['python']}; "
        f"{environment['device']}" + (f" × {environment['processes']} processes" if environment.get("processes", 1) > 1 else "")
        + f"; written {environment['written_utc']} UTC",
        "",
        "## Result",
        "",
        f"Held-out accuracy **{_pct(overall['base'].accuracy)} → {_pct(overall['aligned'].accuracy)}** "
        f"(**{_pts(overall['delta'])} points**, 95% CI {_pts_ci(overall['delta_low'], overall['delta_high'])})"
        + ("." if target_gain_points is None else f"; target ≥ +{target_gain_points:g} points: **{'met' if met else 'NOT met'}**"
           + _target_caveat(met, overall["delta_low"], overall["delta_high"], target_gain_points) + ".")
        + f" Mean score {_num(overall['base'].mean_score)} → {_num(overall['aligned'].mean_score)} "
          f"({_signed(overall['delta_score'])}, 95% CI {_num_ci(overall['delta_score_low'], overall['delta_score_high'])})."
        + (f" {comparison.one_sided} samples scored in one evaluation only (the other dropped them) are left out of both."
           if comparison.one_sided else ""),
        "",
        comparison.table(),
        "",
        f"Category mean (each category weighted equally, GenEval's overall score): {_pct(mean_base)} → "
        f"{_pct(mean_aligned)} ({_pts(mean_aligned - mean_base)} points); the **all** row weights categories "
        "by their sample counts.",
        "",
        "Accuracy: fraction of samples the verifier accepts (95% Wilson interval); Δ: aligned − base in percentage points "
        "(95% Newcombe interval, conservative for these paired samples); partial: mean graded score; score: mean raw score, "
        "Δ score: mean of the paired differences (same prompt and noise) with its 95% normal interval.",
        "",
    ]
    failures = failure_tables(base, aligned)
    lines += failure_section(failures)
    prompts = prompt_changes(base.prompts, base.tags, base.correct().tolist(), aligned.correct().tolist())
    lines += prompt_section(prompts)
    lines += [
        "## Wall time",
        "",
        "| phase | time |",
        "|---|---:|",
    ]
    lines += [f"| {phase} | {duration_text(float(seconds))} |" for phase, seconds in timings.items()]
    lines += [f"| **total** | {duration_text(float(sum(timings.values())))} |", "", "## Figures", ""]
    for name, caption in (("heldout_accuracy.png", "held-out accuracy per category, base vs aligned"), ("reward_curve.png", "training reward curve"),
                          ("before_after.png", "before / after (same prompts and seeds)")):
        lines.append(f"![{caption}]({name})" if (run_dir / name).is_file() else f"- {caption}: `{name}` not written")
        lines.append("")
    lines += ["## Training curve", ""]
    if curve:
        lines += ["| metric | iterations | first 10% | last 10% | min | max |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['metric']} | {c['iterations']} | {c['first']:.4g} | {c['last']:.4g} | {c['min']:.4g} | {c['max']:.4g} |" for c in curve]
    else:
        lines.append("(no metrics.csv)")
    lines.append("")
    # each file is replaced atomically, report.md last: a failure midway leaves the previous report.md
    base.to_json(run_dir / "eval_base.json")
    aligned.to_json(run_dir / "eval_aligned.json")
    summary = {
        "command": command, "config": dict(config_dict), "timings": dict(timings), "target_gain_points": target_gain_points,
        "accuracy_base": overall["base"].accuracy, "accuracy_aligned": overall["aligned"].accuracy, "gain_points": gain, "target_met": met,
        "category_mean_base": mean_base, "category_mean_aligned": mean_aligned,
        "comparison": comparison.to_dict(), "one_sided_samples": comparison.one_sided, "training_curve": curve, "eval_settings": settings, "environment": environment,
    }
    if failures is not None:
        summary["failures"] = failures
    summary["prompts"] = prompts
    write_text_atomic(run_dir / "report.json", json.dumps(_clean(summary), indent=1, allow_nan=False) + "\n")
    path = write_text_atomic(run_dir / "report.md", "\n".join(lines))
    logger.info("wrote %s: held-out accuracy %.1f%% -> %.1f%% (%+.1f points)", path, 100 * overall["base"].accuracy,
                100 * overall["aligned"].accuracy, gain)
    return path


def _verdict_note(config_dict: Mapping[str, Any]) -> str:
    """Which reward's verdict the accuracy counts (``train.report_reward``, else the first reward)."""
    entries = [r for r in config_dict.get("rewards", []) if isinstance(r, Mapping)]
    name = _get(config_dict, "train.report_reward", None) or (entries[0].get("label") or entries[0].get("name") if entries else None)
    if not name:
        return ""
    return (f"; accuracy counts `{name}`'s verdict (`details['binary']`, or a score >= 0.5 for a reward without verdicts;"
            " `train.report_reward`)")


def heldout_report(
    run_dir: PathLike,
    adapter,
    records: Sequence[Any],
    reward,
    *,
    config_dict: Mapping[str, Any],
    timings: Mapping[str, float],
    num_steps: int,
    guidance_scale: float,
    num_samples: Optional[int] = None,
    samples_per_prompt: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 32,
    base: Optional[EvalResult] = None,
    base_context: Optional[Callable[[], ContextManager]] = None,
    aligned_context: Optional[Callable[[], ContextManager]] = None,
    metrics_csv: Optional[PathLike] = None,
    command: Optional[str] = None,
    progress: bool = True,
    target_gain_points: Optional[float] = None,
    shard: Optional[tuple[int, int]] = None,
    gather: Optional[Callable[[Any], list]] = None,
    journals: Optional[tuple[Any, Any]] = None,
    on_error: str = "raise",
    reward_kwargs: Optional[Mapping[str, Any]] = None,
    reward_batch_size: Optional[int] = None,
) -> Optional[Path]:
    """Evaluate base and aligned on the held-out ``records``, draw ``before_after.png``, write the report.

    The trainer's end of run in one call. The adapter holds the trained LoRA; the base model is
    the same adapter inside ``base_context()`` (default: :func:`flowalign.lora.lora_disabled` on
    ``adapter.trainable_module``) and the aligned one inside ``aligned_context()`` (e.g. the EMA
    weights applied; default: as is). A ``base`` evaluated earlier (e.g. before training) is
    reused; it must have the same settings. ``num_samples`` / ``samples_per_prompt`` default to
    whole passes over the prompts reaching 512 samples. Eval wall times are added to ``timings``.
    ``target_gain_points``: see :func:`write_report`. ``on_error``: the reward's failure policy (``"drop"``: a sample
    whose reward fails or is NaN is left out and counted in each category's ``dropped``). ``reward_kwargs``: the
    reward's keyword arguments (the recipe's ``rewards[i].kwargs``), recorded in ``eval_*.json``'s settings as
    ``flowalign eval`` records them, so that ``eval --compare`` refuses a reference scored with other ones.
    ``reward_batch_size``: images per reward call at most (the recipe's ``rewards[i].batch_size``).

    Several processes split the samples: every process calls this with ``shard=(index, count)``
    and ``gather`` (see :func:`flowalign.evaluation.evaluate`), each samples its share of both
    evaluations, and process 0 alone writes the files and returns the report's path (the others
    return None). The report is the one a single process writes, up to float rounding.

    ``journals``: ``(base, aligned)`` :class:`flowalign.eval_journal.EvalJournal` s (the aligned one's key
    must name the aligned weights): each evaluation resumes from the batches its journal holds, so a run
    killed in its report samples only what it had not scored; process 0 removes both once the report is
    written.
    """
    from flowalign.lora import lora_disabled

    run_dir = Path(run_dir)
    if num_samples is None and samples_per_prompt is None:
        samples_per_prompt = max(1, math.ceil(512 / len(records)))
    samples_per_prompt = 1 if samples_per_prompt is None else samples_per_prompt
    columns = pick_samples(records, num_samples, samples_per_prompt, per_category=2)
    kw = dict(num_samples=num_samples, samples_per_prompt=samples_per_prompt, num_steps=num_steps, guidance_scale=guidance_scale,
              seed=seed, batch_size=batch_size, keep_images=columns, progress=progress, shard=shard, gather=gather, on_error=on_error,
              reward_batch_size=reward_batch_size)
    timings = dict(timings)
    if base is None:
        start = time.perf_counter()
        with (base_context or (lambda: lora_disabled(adapter.trainable_module)))():
            base = evaluate(adapter, records, reward, **kw, journal=None if journals is None else journals[0])
        timings["base eval"] = time.perf_counter() - start
    start = time.perf_counter()
    with (aligned_context or nullcontext)():
        aligned = evaluate(adapter, records, reward, **kw, journal=None if journals is None else journals[1])
    timings["aligned eval"] = time.perf_counter() - start
    if shard is not None and int(shard[0]) != 0:
        return None
    if reward_kwargs is not None:
        for result in (base, aligned):
            result.settings.setdefault("reward_kwargs", dict(reward_kwargs))
    if set(columns) <= set(base.images):
        write_before_after(run_dir / "before_after.png", base, aligned, columns)
    else:
        logger.warning("the base evaluation kept no images of the grid samples; before_after.png not written")
    path = write_report(run_dir, base=base, aligned=aligned, config_dict=config_dict, timings=timings, metrics_csv=metrics_csv, command=command,
                        target_gain_points=target_gain_points)
    for journal in journals or ():
        journal.remove()  # eval_base.json / eval_aligned.json hold every sample now
    return path

