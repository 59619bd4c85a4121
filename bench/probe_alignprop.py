"""Probe: direct reward backpropagation (AlignProp / DRaFT) on the toy, with a differentiable surrogate of the verifier.

Every policy-gradient variant measured on the toy (``bench/README.md``: 160+ curves) plateaus near 36-40% held-out
accuracy; this probe tries the other family. Each iteration draws ``prompts_per_iter`` training prompts,
``--per-prompt`` samples each, runs the recipe's noise-free sampler (``sampling.num_steps`` Euler steps at
``sampling.guidance_scale``) *with autograd* through the transformer's and the text encoders' LoRA, decodes with the
frozen VAE and ascends a differentiable reward of the images:

    loss = - mean_b R(decode(x_0^b), prompt_b)

``--grad-from k`` keeps the graph from step ``k`` on (steps before it run without gradient, DRaFT-K style with the
K = num_steps - k last steps); ``--grad-from -1`` draws ``k`` uniformly per iteration (AlignProp's randomized
truncation). The reward is ``bench/soft_shapes.py``'s surrogate (``--reward soft_shapes``) or, to check the
gradient path, the built-in soft colour fraction (``--reward color``). Held-out accuracy is measured by the real
verifier, as every other curve in ``heldout_curve.json``.

``--hybrid w`` keeps the recipe's own Flow-GRPO iteration and adds ``w x`` the AlignProp loss (on a fresh draw of
training prompts) to the gradient of its one optimizer step: the verifier's exact policy gradient plus the
surrogate's dense pixel gradient (the policy gradient's norm is about 0.008 here, the AlignProp loss's about 8).

Measured (session 37, seed 0 unless named; held-out accuracy at 25 / 50 iterations; the default recipe: 38.1 / 39.5%,
seed 1 33.4 / 37.3%, seed 2 35.7 / 36.9%): AlignProp alone, 32 samples per iteration, 3 s per iteration, 31.6-34.4%
(product and mean surrogates, 4 jitters, random truncation); hybrid w = 1e-3 38.1 / 34.4%, w = 3e-4 40.4 / 41.2% (seed 1 34.2 / 37.5%, seed 2 34.0 /
34.8%: 37.8% at 50 over seeds 0-2, the default's 37.9%), w = 1e-4 37.3 / 38.3%; paired (``--paired``), w = 3e-4
38.3 / 38.7% (seed 0) and 35.9 / 37.1% (seed 1). The same plateau (``bench/README.md``).

    python bench/probe_alignprop.py --name ap_soft_product_seed0 --reward-mode product --iterations 50 --eval-every 25
    python bench/probe_alignprop.py --name te_hybrid_ap3e-4_product_seed0 --reward-mode product --hybrid 3e-4 \\
        --iterations 50 --eval-every 25
"""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import argparse
import time

import torch

import heldout_curve
from flowalign import sde
from flowalign.train.trainer import Trainer


class AlignPropTrainer(Trainer):
    per_prompt = 2
    grad_from = 0
    reward_name = "soft_shapes"
    reward_mode = "mean"
    hybrid = 0.0
    paired = False
    n_aug = 0
    _reward = None
    _verifier = None

    def _differentiable_reward(self):
        """The ascended reward, a differentiable flowalign reward on the training device."""
        if self._reward is None:
            if self.reward_name == "color":
                from flowalign.rewards.builtin import ColorFraction
                self._reward = ColorFraction(color="red", soft=True)
            else:
                import soft_shapes
                self._reward = soft_shapes.SoftShapesProcessReward(mode=self.reward_mode, n_aug=self.n_aug)
            self._reward.to(self.device)  # the decoded images live there
        return self._reward

    def _verify(self, images, prompts):
        if self._verifier is None:
            from flowalign.rewards.shapes import ShapesReward
            self._verifier = ShapesReward(score="binary")
        with torch.no_grad():
            return self._verifier(images.detach(), prompts, None).scores.float()

    def alignprop_loss(self, batch_prompts=None) -> tuple:
        """``(-mean surrogate reward, metrics)`` of ``per_prompt`` fresh noise-free samples of each of the next
        training prompts (or, with ``paired``, of each distinct prompt of ``batch_prompts``, the GRPO batch's, with
        noise from a generator of its own), with the graph from step ``grad_from`` on."""
        s = self.config.sampling
        if self.paired and batch_prompts is not None:  # leaves the sampler's and the rollouts' streams as the default run's
            distinct = list(dict.fromkeys(batch_prompts))
            generator = torch.Generator().manual_seed(10_000_019 * (self.config.train.seed + 1) + self.iteration)
        else:
            distinct, generator = [r.prompt for r in self.sampler.next_batch()], self.generator
        prompts = [p for p in distinct for _ in range(self.per_prompt)]
        cond = self.conditioning.encode_rows(prompts, requires_grad=True)
        sigmas = self.adapter.sigmas(s.num_steps).to(self.device)
        k0 = self.grad_from if self.grad_from >= 0 else int(torch.randint(0, s.num_steps, (1,), generator=generator))
        x = self.adapter.initial_noise(len(prompts), generator=generator)
        for k in range(s.num_steps):
            with torch.set_grad_enabled(k >= k0):
                v = self.adapter.velocity(x, sigmas[k], cond, guidance_scale=s.guidance_scale)
            x = sde.step("ode", x, v, sigmas[k], sigmas[k + 1], 0.0).prev_sample  # the evaluation's Euler step
        images = self.adapter.decode(x, requires_grad=True)
        reward = self._differentiable_reward()(images, prompts).scores
        metrics = {"alignprop/verifier": float(self._verify(images, prompts).mean()), "surrogate/mean": float(reward.detach().mean()),
                   "alignprop/grad_from": float(k0)}
        return -reward.mean(), metrics

    def run_iteration(self) -> dict:
        if self.hybrid > 0:  # Flow-GRPO's iteration, with hybrid x the AlignProp loss added before its optimizer step
            return super().run_iteration()
        start = time.perf_counter()
        self.optim.set_lr(self.iteration)
        stats = self.optim.new_stats()
        loss, metrics = self.alignprop_loss()
        self.optim.backward(loss, "alignprop")
        self.optim.step(stats)
        metrics["reward/mean"] = metrics["alignprop/verifier"]
        metrics.update(self.optim.metrics(stats))
        metrics["time/iteration"] = time.perf_counter() - start
        return metrics

    def update(self, batch) -> dict:
        loss, metrics = self.alignprop_loss(batch.traj.prompts)
        self.optim.backward(self.hybrid * loss, "alignprop")
        metrics.update(super().update(batch))
        return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--per-prompt", type=int, default=2, help="samples per prompt per iteration")
    parser.add_argument("--grad-from", type=int, default=0, help="first step with gradient (-1: uniform per iteration)")
    parser.add_argument("--reward", choices=("soft_shapes", "color"), default="soft_shapes")
    parser.add_argument("--reward-mode", choices=("mean", "product"), default="mean")
    parser.add_argument("--n-aug", type=int, default=0, help="average the surrogate over this many jitters (shift + noise; 0 = off)")
    parser.add_argument("--paired", action="store_true",
                        help="with --hybrid: the AlignProp term samples the GRPO batch's own prompts with noise of its own, so the "
                             "prompt and rollout streams stay the default run's")
    parser.add_argument("--hybrid", type=float, default=0.0,
                        help="> 0: the recipe's own iteration (Flow-GRPO) plus this weight x the AlignProp loss in its optimizer step")

    def configure(args):
        AlignPropTrainer.per_prompt = args.per_prompt
        AlignPropTrainer.grad_from = args.grad_from
        AlignPropTrainer.reward_name = args.reward
        AlignPropTrainer.reward_mode = args.reward_mode
        AlignPropTrainer.hybrid = args.hybrid
        AlignPropTrainer.paired = args.paired
        AlignPropTrainer.n_aug = args.n_aug

    heldout_curve.Trainer = AlignPropTrainer
    keys = heldout_curve.TRAINING_DIAGNOSTICS + ("surrogate/mean", "alignprop/verifier", "alignprop/grad_from")
    means = heldout_curve.interval_means
    heldout_curve.interval_means = lambda metrics, keys=keys: means(metrics, keys)
    return heldout_curve.main(argv, parents=(parser,), configure=configure)


if __name__ == "__main__":
    main()
