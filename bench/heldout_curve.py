"""Held-out (and training-prompt) accuracy *during* training: is the final report a peak or a plateau?

Trains one recipe (``--config``, default the main job's ``train/configs/toy_grpo.yaml``, with
``--set`` overrides) through the real trainer (:class:`flowalign.train.trainer.Trainer`) and, every
``--eval-every`` iterations (and before the first), evaluates the current LoRA exactly as the run
report does (:func:`flowalign.evaluation.evaluate`: noise-free ODE samples, the recipe's eval
steps and guidance, sample ``i`` from seed ``i``, the first reward's verdict (``details["binary"]``, else score >= 0.5) counts as correct):

* ``--eval-samples`` samples of the held-out prompts (``train.eval_prompts``), per category;
* with ``--train-samples N > 0``, also N samples of the training prompts (``train.prompts``):
  how much of what RL learns on its own prompts carries over to the held-out compositions.

The curve of one variant is stored under ``--name`` in ``bench/results/heldout_curve.json``
(other variants already there are kept), with the training reward averaged over each eval
interval, the interval's means of the trainer's diagnostics (``train_metrics``: clip fraction, groups
with no reward spread, approximate KL, gradient norm) and the wall time per iteration; ``heldout_curve.png`` plots every stored variant.

    python bench/heldout_curve.py --name default --iterations 100 --eval-every 20
    python bench/heldout_curve.py --name window3 --iterations 60 --eval-every 15 \\
        --set sampling.noise_schedule=window --set "sampling.noise_kwargs={a: 0.7, start: 0, size: 3}" \\
        --set objective.timestep_fraction=1.0 --set train.grad_accum=3

Timings on a shared CPU are noisy (``--threads``, default 1, so two variants can run side by side).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flowalign.config import load_config  # noqa: E402
from flowalign.prompts import load_prompts  # noqa: E402
from flowalign.train.model import resolve_path  # noqa: E402
from flowalign.train.trainer import Trainer  # noqa: E402

from compare_methods import evaluate_heldout  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "heldout_curve.json"
DEFAULT_RECIPE = ROOT / "train" / "configs" / "toy_grpo.yaml"

logger = logging.getLogger("heldout_curve")


def accuracy_by_category(trainer: Trainer, records: list, num_samples: int) -> dict[str, float]:
    """``{category: accuracy, ..., "all": accuracy}`` of the trainer's current weights on ``records``
    (the evaluation of :func:`compare_methods.evaluate_heldout`)."""
    return {tag: round(float(stats.accuracy), 4) for tag, stats in evaluate_heldout(trainer, records, num_samples).categories.items()}


TRAINING_DIAGNOSTICS = ("reward/mean", "frac_zero_std_groups", "policy/clip_frac", "policy/approx_kl", "grad_norm")


def interval_means(metrics: list[dict], keys: tuple[str, ...] = TRAINING_DIAGNOSTICS) -> dict[str, float]:
    """Mean of each of ``keys`` over the iterations' metric dicts in ``metrics`` (one per iteration since
    the last evaluation); a key no iteration logged, or logged only as NaN, is left out."""
    means = {}
    for key in keys:
        values = [float(m[key]) for m in metrics if key in m and math.isfinite(float(m[key]))]
        if values:
            means[key] = round(sum(values) / len(values), 6)
    return means


def run_curve(config: Path, overrides: list[str], iterations: int, eval_every: int, eval_samples: int,
              train_samples: int, workdir: Path, on_point: Optional[Callable[[dict], None]] = None) -> dict:
    """Train ``iterations`` iterations, evaluating at 0 and every ``eval_every``; return the curve.

    ``on_point(curve_so_far)`` is called after every evaluation (``main`` saves it, so a run
    stopped early keeps the points it measured)."""
    cfg = load_config(config, list(overrides) + [
        f"train.iterations={iterations}", f"train.output_dir={workdir}", "train.eval_every=-1",
        "train.checkpoint_every=0", "train.progress=false", "train.log_with=[]",
    ])
    if not cfg.train.eval_prompts:
        raise SystemExit("heldout_curve: the recipe has no train.eval_prompts (the held-out set to follow)")
    heldout = load_prompts(resolve_path(cfg.train.eval_prompts))
    train_prompts = load_prompts(resolve_path(cfg.train.prompts)) if train_samples > 0 else None
    trainer = Trainer(cfg, overwrite=True).setup()
    points, rewards, seconds, interval = [], [], [], []

    def evaluate_now() -> None:
        point = {"iteration": trainer.iteration, "heldout": accuracy_by_category(trainer, heldout, eval_samples)}
        if train_prompts is not None:
            point["train_categories"] = accuracy_by_category(trainer, train_prompts, train_samples)
            point["train"] = point["train_categories"]["all"]
        if interval:  # the rewards since the last point (a shorter last interval included), as train_metrics
            window = [float(m.get("reward/mean", float("nan"))) for m in interval]
            point["train_reward_mean"] = round(sum(window) / len(window), 4)
        if interval:
            point["train_metrics"] = interval_means(interval)  # clip fraction, flat groups, ... since the last point
            interval.clear()
        points.append(point)
        extra = (f"  train prompts {point['train']:.3f} (" + "  ".join(f"{k} {v:.3f}" for k, v in point["train_categories"].items()
                                                                 if k != "all") + ")") if "train" in point else ""
        cats = "  ".join(f"{k} {v:.3f}" for k, v in point["heldout"].items() if k != "all")
        logger.info("it %3d  held-out %.3f%s  (%s)", trainer.iteration, point["heldout"]["all"], extra, cats)
        if on_point is not None:
            on_point(curve(complete=False))

    def curve(complete: bool) -> dict:
        return {"overrides": list(overrides), "iterations": iterations, "eval_every": eval_every, "eval_samples": eval_samples,
                "train_samples": train_samples, "points": list(points), "train_reward": [round(r, 4) for r in rewards],
                "iteration_s_mean": sum(seconds) / len(seconds) if seconds else None, "complete": complete}

    try:
        evaluate_now()
        for _ in range(iterations):
            start = time.perf_counter()
            metrics = trainer.run_iteration()
            trainer.iteration += 1
            seconds.append(time.perf_counter() - start)
            rewards.append(float(metrics.get("reward/mean", float("nan"))))
            interval.append(metrics)
            if trainer.iteration % eval_every == 0 or trainer.iteration == iterations:
                evaluate_now()
    finally:
        trainer.cleanup()
    return curve(complete=True)


MAIN_RECIPE = ("text_encoder_lora_seed0", "text_encoder_lora_seed1", "text_encoder_lora_seed2")  # the main job's recipe (toy_grpo.yaml), seeds 0-2


def plot(results: dict, path: Path, highlight: tuple[str, ...] = MAIN_RECIPE) -> Optional[Path]:
    """Two panels. Left: held-out accuracy against iteration, the ``highlight`` variants in colour
    (with accuracy on the training prompts dashed, where measured) over every other stored variant
    in grey. Right: each variant's highest and final held-out accuracy, sorted, against the base
    and the toy world's target (base + 15 points, issue 3)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is a core dependency; keep the bench usable without it anyway
        return None
    variants = {name: res for name, res in results.get("variants", {}).items() if res.get("points")}
    if not variants:
        return None
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(15, max(5.0, 0.17 * len(variants) + 1.5)), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.get_cmap("tab10").colors
    shown = [name for name in highlight if name in variants]
    iterations = {name: [p["iteration"] for p in res["points"]] for name, res in variants.items()}
    heldout = {name: [100 * p["heldout"]["all"] for p in res["points"]] for name, res in variants.items()}
    for name in variants:
        if name not in shown:
            ax.plot(iterations[name], heldout[name], color="0.75", lw=0.8, zorder=1)
    ax.plot([], [], color="0.75", lw=0.8, label=f"{len(variants) - len(shown)} other variants")
    for i, name in enumerate(shown):
        line, = ax.plot(iterations[name], heldout[name], marker="o", lw=2, color=colors[i % len(colors)], label=f"{name} (held-out)", zorder=3)
        points = variants[name]["points"]
        if all("train" in p for p in points):
            ax.plot(iterations[name], [100 * p["train"] for p in points], ls="--", color=line.get_color(), label=f"{name} (train prompts)", zorder=3)
    bases = [res["points"][0]["heldout"]["all"] for res in variants.values() if res["points"][0]["iteration"] == 0]
    base = sorted(bases)[len(bases) // 2] if bases else None  # the common base (a bf16 or CFG-free variant measures its own)
    for reference_line in (ax.axhline, bars.axvline):  # accuracy is the y axis on the left, the x axis on the right
        if base is not None:
            reference_line(100 * base + 15.0, color="black", lw=1, ls=":", label="base + 15 points")
            reference_line(100 * base, color="black", lw=1, ls="-", alpha=0.4, label="base")
    ax.grid(alpha=0.3)
    bars.grid(alpha=0.3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend(fontsize=8, loc="lower right")
    order = sorted(variants, key=lambda n: max(heldout[n]))
    y = range(len(order))
    best = [max(heldout[n]) for n in order]
    bars.barh(y, best, color=["tab:blue" if n in shown else "0.6" for n in order], label="highest")
    bars.scatter([heldout[n][-1] for n in order], y, color="black", marker="|", s=60, zorder=3, label="final")
    bars.set_yticks(list(y), [f"{n} ({iterations[n][-1]} it)" for n in order], fontsize=6.5)
    bars.set_xlim(10, max(best + [100 * (base or 0) + 15.0]) + 3)
    bars.set_xlabel("held-out accuracy (%)")
    bars.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None, parents: tuple = (), configure=None) -> dict:
    """Run one variant. A probe script adds its own flags with ``parents`` (argparse parent parsers, so that
    ``--help`` lists them) and reads them with ``configure(args)``, called after parsing; their values are stored
    with the curve under ``probe``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=list(parents))
    parser.add_argument("--name", required=True, help="key of this variant in the results file")
    parser.add_argument("--config", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-samples", type=int, default=512, help="held-out samples per evaluation")
    parser.add_argument("--train-samples", type=int, default=0, help="training-prompt samples per evaluation (0 = skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.eval_every < 1 or args.eval_samples < 1 or args.train_samples < 0:
        parser.error("--iterations, --eval-every and --eval-samples must be >= 1, --train-samples >= 0")
    if configure is not None:
        configure(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("flowalign").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    config_name = (str(Path(args.config).resolve().relative_to(ROOT)) if Path(args.config).resolve().is_relative_to(ROOT)
                   else str(args.config))

    # a probe's own flags (its parent parsers' arguments), stored with the curve: the recipe overrides alone do not say what ran
    probe = {a.dest: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
             for parent in parents for a in parent._actions if a.dest != "help" for v in [getattr(args, a.dest)]}

    def save(curve: dict) -> dict:
        """Store ``curve`` as variant ``--name`` (re-reading the file: other variants may have landed meanwhile)."""
        curve.update({"config": config_name, "torch_threads": args.threads, "machine": platform.platform(), **({"probe": probe} if probe else {})})
        results = json.loads(args.output.read_text()) if args.output.exists() else {}
        results.setdefault("what", "held-out (and training-prompt) accuracy during training; bench/heldout_curve.py "
                                   "(complete: false = the run stopped before its last iteration)")
        results.setdefault("variants", {})[args.name] = curve
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, args.output)  # atomic: a stop mid-write keeps the previous file
        return results

    with tempfile.TemporaryDirectory(prefix="heldout_curve_") as tmp:
        curve = run_curve(args.config, args.overrides, args.iterations, args.eval_every, args.eval_samples,
                          args.train_samples, Path(tmp), on_point=save)
    results = save(curve)
    figure = plot(results, args.output.with_suffix(".png"))
    best = max(curve["points"], key=lambda p: p["heldout"]["all"])
    first, last = curve["points"][0]["heldout"]["all"], curve["points"][-1]["heldout"]["all"]
    print(f"{args.name}: held-out {100 * first:.1f}% -> {100 * last:.1f}% after {args.iterations} iterations "
          f"(highest {100 * best['heldout']['all']:.1f}% at iteration {best['iteration']}); "
          f"{curve['iteration_s_mean']:.1f} s/iteration; wrote {args.output}" + (f" and {figure}" if figure else ""))
    return curve


if __name__ == "__main__":
    main()
