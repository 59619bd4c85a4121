"""Does float rounding alone move a PPO ratio past the clip range at real latent sizes?

The rollout records each transition's log-prob from one forward pass; the update recomputes it from
another. With a bf16 transformer the two velocities differ by rounding even at the same weights, and
the log-ratio ``log p_new(x') - log p_old(x')`` then is not 0. This script draws random SD3.5-sized
latents (16 x 64 x 64 at 512 px, ``--latent``) on SD3.5's 10-step schedule (shift 3), rounds the
velocity to bf16 in both passes (with a relative jitter ``--jitter`` for the second pass's other
accumulation order), and prints, per kernel, log-prob form and step, the std of the step, the mean
log-ratio and the fraction of rows with ``|ratio - 1| > clip`` for the clip ranges of the recipes
(Flow-GRPO 1e-4, TP-GRPO 1e-5).

    python bench/logprob_numerics.py [--latent 16 64 64] [--rows 32] [--jitter 1e-4] [--output F]

What it showed (2026-12-06, see bench/README.md): on CPS's last stochastic step (sigma 0.278 ->
0.0089, std 0.0079) the Gaussian log-density puts every row outside 1e-5 (TP-GRPO's clip) from
rounding alone; ``-(x' - mean)²`` (``sampling.log_prob_form: squared_error``, the CPS reference
code's form) leaves none there. No model or GPU is needed: the velocities are random, so the figures
are about rounding, not about any model.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from flowalign import sde

SD35_SIGMAS_10 = (1.0, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.278, 0.0089, 0.0)  # shift 3, 10 steps
KERNEL_LEVELS = {"flow_sde": 0.7, "cps": 0.7}
CLIPS = (1e-5, 1e-4)


def clipped_by_rounding(kernel: str, form: str, k: int, latent: tuple[int, ...], rows: int, jitter: float,
                        generator: torch.Generator) -> dict:
    """One step ``k``: the log-ratio of two bf16 passes at the same weights and its clip fractions."""
    s, s_next = SD35_SIGMAS_10[k], SD35_SIGMAS_10[k + 1]
    x0 = 0.8 * torch.randn(rows, *latent, generator=generator)
    noise = torch.randn(rows, *latent, generator=generator)
    x = ((1 - s) * x0 + s * noise).bfloat16().float()  # latents kept in the transformer's dtype
    v = (noise - x0) + 0.3 * torch.randn(rows, *latent, generator=generator)  # a velocity with model-like error
    v_rollout = v.bfloat16().float()
    v_update = (v * (1 + jitter * torch.randn(rows, *latent, generator=generator))).bfloat16().float()
    level = KERNEL_LEVELS[kernel]
    drawn = sde.step(kernel, x, v_rollout, s, s_next, level, generator=generator)
    x_next = drawn.prev_sample.bfloat16().float()  # the recorded sample, rounded as the rollout stores it
    old = sde.log_prob(x_next, drawn.mean, drawn.std, form=form)
    mean_new = sde.step(kernel, x, v_update, s, s_next, level, noise=torch.zeros_like(x)).mean
    new = sde.log_prob(x_next, mean_new, drawn.std, form=form)
    log_ratio = (new - old).double()
    ratio = log_ratio.exp()
    return {"kernel": kernel, "form": form, "step": k, "sigma": s, "sigma_next": s_next, "std": float(drawn.std.flatten()[0]),
            "log_ratio_mean": float(log_ratio.mean()), "log_ratio_sd": float(log_ratio.std()),
            **{f"clip_frac_{c:g}": float(((ratio - 1).abs() > c).double().mean()) for c in CLIPS}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latent", type=int, nargs="+", default=[16, 64, 64], help="latent shape of one sample")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--jitter", type=float, default=1e-4, help="relative difference of the update's velocity before bf16 rounding")
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 4, 7, 8], help="step indices of the 10-step schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(args.seed)
    latent = tuple(args.latent)
    results = []
    print(f"latent {latent} ({math.prod(latent)} dims), {args.rows} rows, bf16 velocities, update jitter {args.jitter:g}")
    print(f"{'kernel':9s} {'form':14s} {'step':>4s} {'sigma->next':>15s} {'std':>8s} {'log-ratio mean':>15s} "
          + " ".join(f"{'> ' + format(c, 'g'):>9s}" for c in CLIPS))
    for kernel in KERNEL_LEVELS:
        for form in sde.LOG_PROB_FORMS:
            for k in args.steps:
                r = clipped_by_rounding(kernel, form, k, latent, args.rows, args.jitter, generator)
                results.append(r)
                print(f"{kernel:9s} {form:14s} {k:4d} {r['sigma']:7.4f}->{r['sigma_next']:.4f} {r['std']:8.4f} {r['log_ratio_mean']:+15.2e} "
                      + " ".join(f"{r[f'clip_frac_{c:g}']:9.2f}" for c in CLIPS))
    out = {"latent": list(latent), "rows": args.rows, "jitter": args.jitter, "sigmas": list(SD35_SIGMAS_10), "results": results}
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
