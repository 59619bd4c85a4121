"""Does Euphonium's guided drift (``sampling.drift_reward``) make a recipe learn its reward faster?

Trains the same recipe (``--config``, default the main job's ``train/configs/toy_grpo.yaml``) with
the training reward replaced by ``--reward`` (default: the soft, differentiable fraction of red
pixels), once without guidance and once per ``--scales`` value with the same reward as the drift's
process reward (autograd through the VAE decoder when it is differentiable, else SPSA). Every
``--eval-every`` iterations (and before the first) it scores ``--eval-samples`` noise-free samples
of the *unguided* policy (the current LoRA, ODE, sample ``i`` from seed ``i``, ``--eval-prompts``
training prompts), which is what a run saves; rollout rewards of guided arms are inflated by the guidance
itself, so they are reported separately.

    python bench/guided_drift.py --iterations 20 --eval-every 5 --scales 1 2

Prints one row per arm and evaluation, and writes ``bench/results/guided_drift.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flowalign.config import load_config  # noqa: E402
from flowalign.prompts import load_prompts  # noqa: E402
from flowalign.train.model import resolve_path  # noqa: E402
from flowalign.train.trainer import Trainer  # noqa: E402

from compare_methods import evaluate_heldout  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "guided_drift.json"
DEFAULT_RECIPE = ROOT / "train" / "configs" / "toy_grpo.yaml"
DEFAULT_REWARD = "{name: color_fraction, kwargs: {color: red, tolerance: 0.4, soft: true, temperature: 0.05}}"

logger = logging.getLogger("guided_drift")


def run_arm(config: Path, overrides: list[str], iterations: int, eval_every: int, eval_samples: int, eval_prompts: int,
            workdir: Path) -> dict:
    """Train one arm; return its unguided eval rewards, rollout rewards and seconds per iteration."""
    cfg = load_config(config, list(overrides) + [
        f"train.iterations={iterations}", f"train.output_dir={workdir}", "train.eval_every=-1",
        "train.checkpoint_every=0", "train.progress=false", "train.log_with=[]",
    ])
    records = load_prompts(resolve_path(cfg.train.prompts))
    records = records[:: max(len(records) // eval_prompts, 1)][:eval_prompts]  # evenly spread over the file
    trainer = Trainer(cfg, overwrite=True).setup()
    points, rollout_rewards, seconds = [], [], []

    def evaluate_now() -> None:
        result = evaluate_heldout(trainer, records, eval_samples)
        points.append({"iteration": trainer.iteration, "reward": round(float(result.scores.nanmean()), 5)})
        logger.info("it %3d  unguided reward %.4f", trainer.iteration, points[-1]["reward"])

    try:
        evaluate_now()
        while trainer.iteration < iterations:
            start = time.perf_counter()
            metrics = trainer.run_iteration()
            trainer.iteration += 1
            seconds.append(time.perf_counter() - start)
            rollout_rewards.append(round(float(metrics["reward/mean"]), 5))
            if trainer.iteration % eval_every == 0 or trainer.iteration == iterations:
                evaluate_now()
    finally:
        trainer.cleanup()
    return {"points": points, "rollout_reward": rollout_rewards, "s_per_iteration": round(sum(seconds) / max(len(seconds), 1), 3)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--reward", default=DEFAULT_REWARD, help="the training reward (YAML mapping), also the drift's process reward")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides for every arm")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="drift scales of the guided arms")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--eval-prompts", type=int, default=64, help="training prompts evaluated (evenly spread over the file)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    import yaml

    reward = yaml.safe_load(args.reward)
    common = [f"rewards=[{args.reward}]", *args.set]
    process = [f"sampling.drift_reward={reward['name']}", f"sampling.drift_reward_kwargs={json.dumps(reward.get('kwargs', {}))}"]
    arms = {"unguided": common}
    arms.update({f"drift_{scale:g}": common + process + [f"sampling.drift_scale={scale}"] for scale in args.scales})
    out = {"config": str(args.config), "reward": reward, "overrides": args.set, "iterations": args.iterations,
           "eval_samples": args.eval_samples, "threads": args.threads, "machine": platform.processor() or platform.machine(), "arms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in arms.items():
            logger.info("arm %s", name)
            out["arms"][name] = run_arm(args.config, overrides, args.iterations, args.eval_every, args.eval_samples,
                                        args.eval_prompts, Path(tmp) / name)

    iterations = [p["iteration"] for p in next(iter(out["arms"].values()))["points"]]
    print("unguided-policy reward (ODE samples) at iterations " + " / ".join(map(str, iterations)))
    for name, arm in out["arms"].items():
        print(f"  {name:12s} " + " / ".join(f"{p['reward']:.4f}" for p in arm["points"])
              + f"   rollout reward (last 5) {sum(arm['rollout_reward'][-5:]) / len(arm['rollout_reward'][-5:]):.4f}"
              + f"   {arm['s_per_iteration']:.2f} s per iteration")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    logger.info("wrote %s", args.output)
    return out


if __name__ == "__main__":
    main()
