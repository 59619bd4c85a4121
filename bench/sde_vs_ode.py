"""Held-out accuracy under the evaluation's sampler (ODE) and under the training rollouts' (the main job's Flow-SDE
window: noise a = 0.7 on the first 3 of 10 steps), for the base toy and base + a LoRA.

RL improves the policy it samples from (the SDE); the report judges the noise-free ODE. This prints both for both
models on the same prompts (sample i is held-out prompt i mod 86 and batch b's noise comes from seed 1000 + 64 b; the
SDE draws its step noise from that generator too), so the gap between the two samplers, and whether alignment moves
one more than the other, can be read off.

    python bench/sde_vs_ode.py --lora runs/toy_grpo --samples 512 --output bench/results/sde_vs_ode.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flowalign import lora as lora_lib  # noqa: E402
from flowalign import sampling, sde  # noqa: E402
from flowalign.pipelines import load_adapter  # noqa: E402
from flowalign.prompts import load_prompts  # noqa: E402
from flowalign.rewards import call_reward, load_reward  # noqa: E402

logger = logging.getLogger("sde_vs_ode")
BATCH = 64


def accuracy(adapter, records, kernel: str, window: dict) -> float:
    """Fraction of ``records`` the shapes verifier accepts, sampled with ``kernel`` (the window's noise when stochastic)."""
    reward = load_reward("shapes", score="binary")
    correct = 0
    for lo in range(0, len(records), BATCH):
        batch = records[lo:lo + BATCH]
        prompts = [r.prompt for r in batch]
        with torch.no_grad():
            traj = sampling.rollout(adapter, prompts, num_steps=10, kernel=kernel, schedule=sde.make_schedule("window", **window),
                                    guidance_scale=4.5, generator=torch.Generator().manual_seed(1000 + lo), record_x0=False)
            out = call_reward(reward, traj.images, prompts, [dict(r.metadata) for r in batch])
        correct += int((out.scores > 0.5).sum())
    return correct / len(records)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", type=Path, required=True, help="the aligned LoRA (a run folder or its safetensors file)")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    heldout = load_prompts("assets/prompts/shapes_heldout.jsonl")
    records = [heldout[i % len(heldout)] for i in range(args.samples)]
    window = {"a": 0.7, "start": 0, "size": 3}
    out = {"samples": args.samples, "window": window, "lora": str(args.lora)}
    for model in ("base", "aligned"):
        adapter = load_adapter("assets/toy")
        if model == "aligned":
            lora_lib.load_lora_into_pipeline(adapter.pipeline, args.lora)
        for name, kernel in (("ode", "ode"), ("sde", "flow_sde")):
            out[f"{model}_{name}"] = accuracy(adapter, records, kernel, window)
            logger.info("%-8s %-4s %.1f%%", model, name, 100 * out[f"{model}_{name}"])
    logger.info("SDE - ODE: base %+.1f, aligned %+.1f points; alignment: ODE %+.1f, SDE %+.1f points",
                100 * (out["base_sde"] - out["base_ode"]), 100 * (out["aligned_sde"] - out["aligned_ode"]),
                100 * (out["aligned_ode"] - out["base_ode"]), 100 * (out["aligned_sde"] - out["base_sde"]))
    if args.output:
        args.output.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
