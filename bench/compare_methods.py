"""Flow-GRPO vs DenseGRPO vs TP-GRPO on the toy recipes: accuracy per rollout budget and iteration cost.

Each method trains from its recipe (``train/configs/toy_grpo.yaml``, ``toy_dense_grpo.yaml``,
``toy_tp_grpo.yaml``; the three differ only in objective, kernel and ``dense`` settings) with the
same seed, prompts and number of rollouts, through the real trainer
(:class:`flowalign.train.trainer.Trainer`, whose dense path calls
:func:`flowalign.step_rewards.dense_step_advantages`). After every ``--eval-every`` iterations the
held-out accuracy (:func:`flowalign.evaluation.evaluate`, as ``flowalign eval`` measures it) is printed. Reported:

* held-out accuracy (``--eval-samples`` noise-free samples, the same seeds for every method and
  step) after each budget step (rollouts = iterations x samples per iteration);
* rollouts each method needs to reach Flow-GRPO's final accuracy (first eval at or above it;
  null when never reached);
* time of a whole iteration (rollout + rewards + step-reward estimation + update), the median
  over interleaved rounds (one warm-up first), wall and process CPU, and its ratio to Flow-GRPO's,
  for DenseGRPO with each estimator: full ODE completion, ODE stride 2, Tweedie;
* DenseGRPO's noise calibration, timed separately (a one-off cost before training).

The recipes train the toy shapes model (``assets/toy``) with the ``shapes`` verifier; ``--toy``
also pins those settings explicitly, in case a recipe is pointed elsewhere. Timings on a shared CPU are noisy: compare
ratios, not seconds.

    python bench/compare_methods.py [--iterations 10] [--eval-every 2] [--toy] [--set key=value ...]

Writes ``bench/results/compare_methods.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flowalign.config import load_config  # noqa: E402
from flowalign.step_rewards import prepare_noise_schedule  # noqa: E402
from flowalign.train.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "compare_methods.json"
RECIPES = {"flow_grpo": "toy_grpo.yaml", "dense_grpo": "toy_dense_grpo.yaml", "tp_grpo": "toy_tp_grpo.yaml"}
ESTIMATORS = {"ode": ["dense.estimator=ode", "dense.stride=1"],
              "ode_stride2": ["dense.estimator=ode_stride", "dense.stride=2"],
              "tweedie": ["dense.estimator=tweedie", "dense.stride=1"]}
TOY = ["model.pretrained=toy", "rewards.0.name=shapes", "train.prompts=assets/prompts/shapes_train.jsonl",
       "train.eval_prompts=assets/prompts/shapes_heldout.jsonl", "sampling.guidance_scale=4.5"]


def build_trainer(method: str, overrides: list[str], run_dir: Path) -> tuple[Trainer, float]:
    """A set-up trainer for ``method`` (its recipe + overrides) and the seconds spent calibrating noise."""
    cfg = load_config(ROOT / "train" / "configs" / RECIPES[method], overrides + [
        f"train.output_dir={run_dir}", "train.eval_every=-1", "train.checkpoint_every=0", "train.progress=false", "train.log_with=[]",
    ])
    trainer = Trainer(cfg, overwrite=True).setup()
    calibration_s = 0.0
    if trainer.dense and cfg.dense.calibration_rounds > 0:
        # calibrate DenseGRPO's table on the training prompts (its own RNG stream), as a run would
        t0 = time.perf_counter()
        records = trainer.sampler.records[: cfg.dense.calibration_samples]
        trainer.schedule, _ = prepare_noise_schedule(trainer.adapter, [r.prompt for r in records], trainer.rewards, cfg,
                                                     metadata=[dict(r.metadata) for r in records])
        calibration_s = time.perf_counter() - t0
    return trainer, calibration_s


def heldout_records(trainer: Trainer) -> list:
    """The prompt records of ``train.eval_prompts`` (the training prompts when unset)."""
    from flowalign.prompts import load_prompts
    from flowalign.train.model import resolve_path

    return load_prompts(resolve_path(trainer.config.train.eval_prompts or trainer.config.train.prompts))


def evaluate_heldout(trainer: Trainer, records: list, num_samples: int):
    """``num_samples`` noise-free samples of ``records`` with the trainer's current weights (its EMA when
    ``train.ema`` is on, as the run saves and reports them; prompts
    cycled, sample ``i`` from seed ``i``: every method and every budget step sees the same noise),
    scored by the first reward via :func:`flowalign.evaluation.evaluate`, as ``flowalign eval`` and
    the run report measure it; returns its ``EvalResult``."""
    from flowalign.evaluation import evaluate

    cfg = trainer.config
    with trainer.ema.applied() if trainer.ema is not None else nullcontext():  # the weights a run saves and reports
        return evaluate(trainer.adapter, records, trainer.rewards[cfg.rewards[0].key], num_samples=num_samples,
                        num_steps=cfg.sampling.eval_num_steps, guidance_scale=cfg.sampling.guidance_scale, seed=0,
                        batch_size=160, keep_images=0, progress=False)


def eval_score(trainer: Trainer, records: list, num_samples: int) -> float:
    """Held-out accuracy (fraction of samples the first reward judges correct: its verdict, else score >= 0.5) of :func:`evaluate_heldout`."""
    return float(evaluate_heldout(trainer, records, num_samples).accuracy)


def timed_iteration(trainer: Trainer) -> tuple[float, float, dict]:
    """(wall s, process CPU s, metrics) of one whole trainer iteration."""
    wall, cpu = time.perf_counter(), time.process_time()
    metrics = trainer.run_iteration()
    trainer.iteration += 1
    return time.perf_counter() - wall, time.process_time() - cpu, metrics


def train_and_eval(method: str, overrides: list[str], iterations: int, eval_every: int, eval_samples: int, workdir: Path) -> dict:
    """Train ``iterations`` iterations, evaluating at 0 and every ``eval_every``; collect costs."""
    trainer, calibration_s = build_trainer(method, overrides, workdir / method)
    try:
        per_iter = trainer.config.train.prompts_per_iter * trainer.config.sampling.group_size
        records = heldout_records(trainer)
        evals = [{"iteration": 0, "rollouts": 0, "accuracy": eval_score(trainer, records, eval_samples)}]
        print(f"{method:>12s}  it   0  rollouts    0  accuracy {evals[0]['accuracy']:.4f}", flush=True)
        times, nfe = [], []
        for _ in range(iterations):
            wall, _, metrics = timed_iteration(trainer)
            times.append(wall)
            nfe.append(metrics.get("nfe", 0.0) + metrics.get("dense/nfe", 0.0))
            if trainer.iteration % eval_every == 0 or trainer.iteration == iterations:
                acc = eval_score(trainer, records, eval_samples)
                evals.append({"iteration": trainer.iteration, "rollouts": trainer.iteration * per_iter, "accuracy": acc})
                print(f"{method:>12s}  it {trainer.iteration:3d}  rollouts {trainer.iteration * per_iter:4d}  accuracy {acc:.4f}", flush=True)
        levels = trainer.schedule.levels(trainer.config.sampling.num_steps) if hasattr(trainer.schedule, "levels") else None
        return {"recipe": RECIPES[method], "samples_per_iteration": per_iter, "evals": evals, "final_accuracy": evals[-1]["accuracy"],
                "iteration_s_median": statistics.median(times), "iteration_s_all": times, "nfe_per_iteration": statistics.mean(nfe),
                "calibration_s": calibration_s, "noise_levels": None if levels is None else [round(float(x), 4) for x in levels]}
    finally:
        trainer.cleanup()


def time_iterations(variants: dict[str, tuple[str, list[str]]], rounds: int, workdir: Path) -> dict:
    """Per variant (name -> (method, overrides)): median wall / CPU time of a whole iteration.

    All variants are built first and warmed up by one iteration; then ``rounds`` rounds run one
    iteration of each in turn, so drifting machine load hits every variant alike.
    """
    trainers = {name: build_trainer(method, ov, workdir / f"timing_{name}")[0] for name, (method, ov) in variants.items()}
    try:
        for trainer in trainers.values():
            timed_iteration(trainer)  # warm-up
        runs: dict[str, list] = {name: [] for name in trainers}
        for _ in range(rounds):
            for name, trainer in trainers.items():
                runs[name].append(timed_iteration(trainer))
        out = {}
        for name, r in runs.items():
            out[name] = {
                "iteration_s_median": statistics.median(w for w, _, _ in r),
                "iteration_cpu_s_median": statistics.median(c for _, c, _ in r),
                "iteration_s_all": [w for w, _, _ in r],
                "rollout_nfe": r[-1][2].get("nfe", 0.0),
                "estimator_nfe": r[-1][2].get("dense/nfe", 0.0),
                "step_rewards_s_median": statistics.median(m.get("time/step_rewards", 0.0) for _, _, m in r),
            }
        return out
    finally:
        for trainer in trainers.values():
            trainer.cleanup()


def rollouts_to_reach(evals: list[dict], target: float) -> Optional[int]:
    """Rollouts at the first eval whose accuracy is >= target (None if none)."""
    for e in evals:
        if e["accuracy"] >= target:
            return e["rollouts"]
    return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=10, help="training iterations per method (same for all)")
    parser.add_argument("--eval-every", type=int, default=2, help="evaluate every N iterations (the budget step)")
    parser.add_argument("--timing-rounds", type=int, default=5, help="timed iterations per variant, interleaved (after 1 warm-up)")
    parser.add_argument("--methods", default="flow_grpo,dense_grpo,tp_grpo")
    parser.add_argument("--estimators", default="ode,ode_stride2,tweedie")
    parser.add_argument("--toy", action="store_true", help="use assets/toy with the shapes reward and prompt sets")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override every recipe")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest timings on a shared CPU)")
    parser.add_argument("--eval-samples", type=int, default=320, help="held-out samples per evaluation (one pass = 320 prompts)")
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    estimators = [e for e in args.estimators.split(",") if e]
    unknown = [m for m in methods if m not in RECIPES] + [e for e in estimators if e not in ESTIMATORS]
    if unknown or "flow_grpo" not in methods:
        parser.error(f"unknown {unknown} or no flow_grpo; methods from {sorted(RECIPES)}, estimators from {sorted(ESTIMATORS)}")
    overrides = (TOY if args.toy else []) + list(args.overrides) + [f"train.iterations={args.iterations}"]

    results: dict = {"methods": {}, "timing": {}}
    with tempfile.TemporaryDirectory(prefix="compare_methods_") as tmp:
        workdir = Path(tmp)
        for method in methods:
            results["methods"][method] = train_and_eval(method, overrides, args.iterations, args.eval_every, args.eval_samples, workdir)
        target = results["methods"]["flow_grpo"]["final_accuracy"]
        for res in results["methods"].values():
            res["rollouts_to_flow_grpo_final"] = rollouts_to_reach(res["evals"], target)

        variants = {"flow_grpo": ("flow_grpo", overrides)}
        for est in estimators:
            variants[f"dense_grpo[{est}]"] = ("dense_grpo", overrides + ESTIMATORS[est] + ["dense.calibration_rounds=0"])
        results["timing"] = time_iterations(variants, args.timing_rounds, workdir)
        base = results["timing"]["flow_grpo"]
        for t in results["timing"].values():
            t["ratio_vs_flow_grpo"] = t["iteration_s_median"] / base["iteration_s_median"]
            t["cpu_ratio_vs_flow_grpo"] = t["iteration_cpu_s_median"] / base["iteration_cpu_s_median"]

    cfg = load_config(ROOT / "train" / "configs" / RECIPES["flow_grpo"], overrides)
    results["setup"] = {
        "model": cfg.model.pretrained, "reward": cfg.rewards[0].name, "num_steps": cfg.sampling.num_steps,
        "group_size": cfg.sampling.group_size, "prompts_per_iter": cfg.train.prompts_per_iter, "iterations": args.iterations,
        "eval_every": args.eval_every, "eval_samples": args.eval_samples, "seed": cfg.train.seed,
        "overrides": overrides, "torch_threads": torch.get_num_threads(), "machine": platform.platform(), "cpu_count": os.cpu_count(),
        "note": "accuracy = fraction of held-out ODE samples (seeds 0..eval_samples-1) the first reward scores >= 0.5; timing = whole trainer iterations "
                "(median over interleaved rounds, wall and process CPU), dense estimators without noise calibration; "
                "Tweedie recomputes x0 (the trainer records no x0_preds)",
    }
    print(f"\nrollouts to reach Flow-GRPO's final accuracy ({target:.4f}): "
          + ", ".join(f"{m} {r['rollouts_to_flow_grpo_final']}" for m, r in results["methods"].items()))
    print("iteration time vs Flow-GRPO (wall / CPU): "
          + ", ".join(f"{k} {v['ratio_vs_flow_grpo']:.2f}x / {v['cpu_ratio_vs_flow_grpo']:.2f}x" for k, v in results["timing"].items()))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
