"""The default toy job over several seeds: held-out accuracy before / after alignment, and wall time.

For each seed the main job's recipe (``train/configs/toy_grpo.yaml``) is trained through the
``flowalign train`` command in a subprocess (exactly what a user runs)::

    flowalign train --config train/configs/toy_grpo.yaml --set train.seed=S --set train.output_dir=<runs>/seed_S

Held-out accuracy comes from the run's ``report.json`` (written by
:func:`flowalign.report.write_report`: base and aligned on the same prompts and seeds). When a
run has no report, the bench evaluates it itself with :func:`flowalign.evaluation.evaluate`:
the base model once (it does not depend on the training seed) and the run's LoRA, on the
recipe's held-out prompts (``train.eval_prompts``), with the recipe's reward, eval steps and
guidance, ``--eval-samples`` samples (default: whole passes over the prompts reaching 512) and
evaluation seed 0. Printed and written to ``bench/results/toy_alignment.json``: per seed and as
mean ± std over seeds, the accuracy before and after, the gain in points (target: +15) and the
wall time of the whole job (``train_wall_time_s``: the ``flowalign train`` command, evaluations included)
and of its training phase (``train_phase_s``, from the report's timings).

    python bench/toy_alignment.py [--seeds 0 1 2] [--config train/configs/toy_grpo.yaml] [--set key=value ...]
    python bench/toy_alignment.py --smoke      # mechanics only: tiny-sd3 recipe allowed, 2 iterations, 8 samples

It stops with one line and exit status 2 when the recipe, the trainer command or the toy model
(``assets/toy``) is missing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "toy_alignment.json"
DEFAULT_RECIPE = ROOT / "train" / "configs" / "toy_grpo.yaml"
DEFAULT_HELDOUT = "assets/prompts/shapes_heldout.jsonl"
TARGET_GAIN_POINTS = 15.0  # issue #3's bar, when the recipe sets no train.report_target_points
SMOKE = ["train.iterations=2", "train.checkpoint_every=0", "train.eval_every=-1"]

logger = logging.getLogger("toy_alignment")


class BenchError(Exception):
    """Something the bench needs is missing; the message says what."""


# ---------------------------------------------------------------------------------------------- preflight


def _toy_model_dir() -> Path:
    from flowalign.train.model import resolve_path

    return resolve_path("assets/toy")


def preflight(recipe: Path, overrides: list[str], smoke: bool):
    """Check the recipe, the trainer command and the model before training anything; return the config."""
    import importlib.util

    if not recipe.is_file():
        raise BenchError(f"recipe {recipe} not found (the main job's recipe is train/configs/toy_grpo.yaml)")
    if importlib.util.find_spec("flowalign.train.cli") is None or importlib.util.find_spec("flowalign.train.trainer") is None:
        raise BenchError("the trainer is missing: flowalign.train.cli / flowalign.train.trainer cannot be imported")
    from flowalign.train import cli

    if not hasattr(cli, "main"):
        raise BenchError("flowalign.train.cli has no main(): the `flowalign train` command is not there yet")
    from flowalign.config import load_config

    config = load_config(recipe, overrides)
    model = config.model.pretrained
    if model == "toy":
        toy = _toy_model_dir()
        if not (toy / "model_index.json").is_file():
            raise BenchError(f"the toy model is not built: {toy}/model_index.json is missing (build it with `python -m flowalign.pipelines.toy build`)")
    elif not smoke:
        raise BenchError(f"the recipe aligns model.pretrained={model!r}, not the toy model; switch {recipe.name} to `model.pretrained: toy` "
                         "(or pass --set model.pretrained=toy), or run --smoke to check the bench's mechanics only")
    return config


# ---------------------------------------------------------------------------------------------- one run


def train_run(recipe: Path, seed: int, run_dir: Path, overrides: list[str], timeout: Optional[float]) -> float:
    """``flowalign train`` in a subprocess; returns its wall time. Output goes to ``<run_dir>.log``."""
    command = [sys.executable, "-c", "import sys; from flowalign.train.cli import main; sys.exit(main())", "train",
               "--config", str(recipe), "--set", f"train.seed={seed}", "--set", f"train.output_dir={run_dir}"]
    for item in overrides:
        command += ["--set", item]
    log = run_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    shown = "flowalign " + " ".join(command[3:])
    logger.info("seed %d: %s (log: %s)", seed, shown, log)
    start = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(f"$ {shown}\n")
        fh.flush()
        proc = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise BenchError(f"`{shown}` failed with exit status {proc.returncode} after {wall:.0f} s; last lines of {log}:\n{tail}")
    return wall


def _eval_settings(config, eval_samples: Optional[int]) -> dict[str, Any]:
    prompts = config.train.eval_prompts or DEFAULT_HELDOUT
    return {"prompts": prompts, "reward": config.rewards[0].name, "reward_kwargs": dict(config.rewards[0].kwargs),
            "steps": config.sampling.eval_num_steps, "guidance": config.sampling.guidance_scale, "num_samples": eval_samples}


def bench_eval(config, lora: Optional[Path], eval_samples: Optional[int]):
    """Evaluate the recipe's model (with ``lora`` when given) on its held-out prompts."""
    import torch

    from flowalign.evaluation import evaluate
    from flowalign.prompts import load_prompts
    from flowalign.rewards import load_reward
    from flowalign.train.eval_cli import DEFAULT_MIN_SAMPLES
    from flowalign.train.model import build_adapter, resolve_path

    settings = _eval_settings(config, eval_samples)
    records = load_prompts(resolve_path(settings["prompts"]))
    if eval_samples is not None and eval_samples < len(records):  # fewer samples than prompts: an evenly strided subset
        stride = math.ceil(len(records) / eval_samples)
        logger.warning("--eval-samples %d < %d prompts: evaluating every %d-th prompt", eval_samples, len(records), stride)
        records = records[::stride][:eval_samples]
    reward = load_reward(settings["reward"], **settings["reward_kwargs"])
    spp = 1 if eval_samples is not None else max(1, math.ceil(DEFAULT_MIN_SAMPLES / len(records)))
    adapter = build_adapter(config.model, torch.device("cpu"))
    return evaluate(adapter, records, reward, num_samples=eval_samples, samples_per_prompt=spp, num_steps=settings["steps"],
                    guidance_scale=settings["guidance"], seed=0, lora=lora, keep_images=0)


def run_result(run_dir: Path, config, base_cache: dict, eval_samples: Optional[int]) -> dict[str, Any]:
    """Accuracy before / after of one finished run: from its report.json, else evaluated here."""
    report = run_dir / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        comparison = data["comparison"]
        return {"source": "report.json", "accuracy_base": data["accuracy_base"], "accuracy_aligned": data["accuracy_aligned"],
                "category_mean_base": data["category_mean_base"], "category_mean_aligned": data["category_mean_aligned"],
                "gain_points": data["gain_points"], "eval_wall_time_s": sum(v for k, v in data.get("timings", {}).items() if "eval" in k),
                "train_phase_s": data.get("timings", {}).get("train"),
                "per_category": {k: {"base": v["base"]["accuracy"], "aligned": v["aligned"]["accuracy"]} for k, v in comparison.items()}}
    lora = run_dir / "pytorch_lora_weights.safetensors"
    if not lora.is_file():
        raise BenchError(f"{run_dir} has neither report.json nor pytorch_lora_weights.safetensors: did the run finish?")
    from flowalign.evaluation import category_mean, compare

    logger.info("%s has no report.json: evaluating base and aligned here", run_dir)
    start = time.perf_counter()
    if "base" not in base_cache:
        base_cache["base"] = bench_eval(config, None, eval_samples)
    base = base_cache["base"]
    aligned = bench_eval(config, lora, eval_samples)
    comparison = compare(base, aligned)
    aligned.to_json(run_dir / "bench_eval_aligned.json")
    return {"source": "bench eval", "accuracy_base": base.accuracy, "accuracy_aligned": aligned.accuracy,
            "category_mean_base": category_mean(base.categories), "category_mean_aligned": category_mean(aligned.categories),
            "gain_points": 100 * comparison.delta, "eval_wall_time_s": time.perf_counter() - start,
            "per_category": {k: {"base": r["base"].accuracy, "aligned": r["aligned"].accuracy} for k, r in comparison.rows.items()},
            "eval_settings": aligned.settings}


# ---------------------------------------------------------------------------------------------- summary


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("accuracy_base", "accuracy_aligned", "category_mean_base", "category_mean_aligned", "gain_points", "train_wall_time_s")
    summary = {k: mean_std([float(r[k]) for r in runs]) for k in keys}
    if all(r.get("train_phase_s") is not None for r in runs):  # the training phase alone, from each report's timings
        summary["train_phase_s"] = mean_std([float(r["train_phase_s"]) for r in runs])
    categories = sorted({c for r in runs for c in r["per_category"]})
    summary["per_category_gain_points"] = {
        c: mean_std([100 * (r["per_category"][c]["aligned"] - r["per_category"][c]["base"]) for r in runs if c in r["per_category"]])
        for c in categories}
    return summary


def _fmt(stat: dict[str, float], scale: float = 1.0, unit: str = "") -> str:
    return f"{scale * stat['mean']:.1f} ± {scale * stat['std']:.1f}{unit}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--config", type=Path, default=DEFAULT_RECIPE, help="recipe (default: train/configs/toy_grpo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="extra recipe override (repeatable)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="where the runs go (default: runs/bench_toy_alignment/<timestamp>)")
    parser.add_argument("--eval-samples", type=int, default=None, help="held-out samples when the bench evaluates a run itself (default: >= 512)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per training run")
    parser.add_argument("--out", type=Path, default=RESULT, help=f"result JSON (default: {RESULT.relative_to(ROOT)})")
    parser.add_argument("--smoke", action="store_true", help="check the mechanics: any recipe model, 2 iterations, 8 eval samples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    overrides = list(args.overrides) + (SMOKE if args.smoke else [])
    eval_samples = args.eval_samples if args.eval_samples is not None else (8 if args.smoke else None)
    try:
        config = preflight(args.config, overrides, args.smoke)
        runs_dir = args.runs_dir or ROOT / "runs" / "bench_toy_alignment" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        runs, base_cache = [], {}
        for seed in args.seeds:
            run_dir = runs_dir / f"seed_{seed}"
            wall = train_run(args.config, seed, run_dir, overrides, args.timeout)
            result = {"seed": seed, "run_dir": str(run_dir), "train_wall_time_s": wall, **run_result(run_dir, config, base_cache, eval_samples)}
            runs.append(result)
            print(f"seed {seed}: held-out accuracy {100 * result['accuracy_base']:.1f}% -> {100 * result['accuracy_aligned']:.1f}% "
                  f"({result['gain_points']:+.1f} points), job {wall / 60:.1f} min [{result['source']}]", flush=True)
    except BenchError as exc:
        print(f"toy_alignment: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - config errors etc.: one line
        from flowalign.errors import FlowalignError

        if not isinstance(exc, FlowalignError):
            raise
        print(f"toy_alignment: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2

    summary = summarize(runs)
    target = config.train.report_target_points if config.train.report_target_points is not None else TARGET_GAIN_POINTS
    print(f"\n{len(runs)} seeds ({args.config.name}{', smoke' if args.smoke else ''}):")
    print(f"  held-out accuracy before  {_fmt(summary['accuracy_base'], 100, '%')}")
    print(f"  held-out accuracy after   {_fmt(summary['accuracy_aligned'], 100, '%')}")
    print(f"  gain                      {_fmt(summary['gain_points'], 1, ' points')}  (target +{target:g})")
    print(f"  category mean (GenEval)   {_fmt(summary['category_mean_base'], 100, '%')} -> {_fmt(summary['category_mean_aligned'], 100, '%')}")
    print(f"  job wall time             {_fmt(summary['train_wall_time_s'], 1 / 60, ' min')}  (the whole `flowalign train`: setup, training, both evaluations, outputs)")
    if "train_phase_s" in summary:
        print(f"    of which training       {_fmt(summary['train_phase_s'], 1 / 60, ' min')}")
    for c, stat in summary["per_category_gain_points"].items():
        print(f"    {c:<12} gain {_fmt(stat, 1, ' points')}")
    import torch

    from flowalign.report import meets_target

    record = {
        "recipe": str(args.config.relative_to(ROOT) if args.config.is_absolute() and ROOT in args.config.parents else args.config),
        "overrides": overrides, "smoke": args.smoke, "seeds": args.seeds, "runs": runs, "summary": summary,
        "target_gain_points": target, "all_seeds_meet_target": all(meets_target(r["gain_points"], target) for r in runs),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
