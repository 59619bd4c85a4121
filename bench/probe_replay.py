"""Probe: Flow-GRPO plus self-imitation of a replay buffer of verified successes.

Every rollout whose reward reaches ``--min-score`` (with the default ``mix`` reward, 1.0 = every
constraint met) is kept: its clean latent, under its prompt and category (the last ``--cap`` per
prompt). Each iteration then adds, to the same optimizer step as the policy-gradient loss,

    weight · mean_rows ‖v_θ(x_s, s) - (ε - x0)‖²,   x_s = (1 - s)·x0 + s·ε

over ``--rows`` buffered samples, drawn category first, then prompt, then sample (so rare
successes on hard captions are replayed as often as easy ones), at a sigma from the rollout's
first ``--sigmas`` levels. The idea: the policy gradient uses each rare success once, for one
optimizer step; the buffer keeps teaching it.

    python bench/probe_replay.py --name replay_w1 --iterations 50 --eval-every 25 --weight 1.0
"""
from __future__ import annotations

import argparse
from collections import deque

import torch

import heldout_curve
from flowalign.train.trainer import Trainer, velocity_fns


class ReplayTrainer(Trainer):
    """Trainer whose first micro-step of each iteration also backpropagates the replay loss."""

    rows = 64
    weight = 1.0
    cap = 8
    min_score = 0.999
    num_sigmas = 3
    guidance = 1.0  # the replayed velocity's CFG scale: 1 = the conditional velocity (plain flow matching)

    def setup(self):
        out = super().setup()
        self.buffer: dict = {}
        self.replay_generator = torch.Generator().manual_seed(1234 + self.config.train.seed)
        self._pending = False
        return out

    def collect(self):
        batch = super().collect()
        traj = batch.traj
        for i in range(traj.batch_size):
            if float(traj.rewards[i]) >= self.min_score:
                tag = (traj.metadata[i] or {}).get("tag", "")
                self.buffer.setdefault(tag, {}).setdefault(traj.prompts[i], deque(maxlen=self.cap)).append(traj.latents[i, -1].clone())
        self._grid = traj.sigmas[: self.num_sigmas].float().cpu()
        self._pending = True
        return batch

    def _micro_step(self, batch, index, k, scale):
        metrics = super()._micro_step(batch, index, k, scale)
        if self._pending and self.buffer:
            self._pending = False
            metrics.update(self._replay_backward())
        return metrics

    def _randint(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.replay_generator))

    def _replay_backward(self) -> dict:
        tags = sorted(self.buffer)
        prompts, latents = [], []
        for _ in range(self.rows):
            by_prompt = self.buffer[tags[self._randint(len(tags))]]
            names = sorted(by_prompt)
            prompt = names[self._randint(len(names))]
            pool = by_prompt[prompt]
            prompts.append(prompt)
            latents.append(pool[self._randint(len(pool))])
        x0 = torch.stack(latents).to(self.device)
        noise = torch.randn(x0.shape, generator=self.replay_generator).to(self.device, x0.dtype)
        sigma = self._grid[torch.randint(self._grid.numel(), (self.rows,), generator=self.replay_generator)].to(self.device)
        s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        x_s = (1 - s) * x0 + s * noise
        target = noise - x0
        text = bool(self.conditioning.text_modules)
        cond = self.adapter.encode(prompts, do_classifier_free_guidance=self.guidance > 1.0, requires_grad=text)
        policy, _ = velocity_fns(self.adapter, cond, self.guidance, False)
        loss = (policy(x_s, sigma).float() - target.float()).pow(2).mean()
        self.optim.backward(loss * self.weight, "replay")
        size = sum(len(q) for by_prompt in self.buffer.values() for q in by_prompt.values())
        return {"replay/loss": float(loss.detach()), "replay/buffer": float(size),
                "replay/prompts": float(sum(len(b) for b in self.buffer.values()))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(add_help=False)  # a parent of heldout_curve's parser: --help lists both
    replay = parser.add_argument_group("replay buffer")
    replay.add_argument("--weight", type=float, default=1.0, help="weight of the replay loss")
    replay.add_argument("--rows", type=int, default=64, help="buffered samples replayed per iteration")
    replay.add_argument("--cap", type=int, default=8, help="successes kept per prompt (the last ones)")
    replay.add_argument("--sigmas", type=int, default=3, help="replay at one of the rollout's first N sigmas")
    replay.add_argument("--min-score", type=float, default=0.999, help="a rollout scoring at least this is kept")
    replay.add_argument("--guidance", type=float, default=1.0, help="CFG scale of the replayed velocity")

    def configure(args) -> None:
        ReplayTrainer.weight, ReplayTrainer.rows, ReplayTrainer.cap = args.weight, args.rows, args.cap
        ReplayTrainer.num_sigmas, ReplayTrainer.min_score, ReplayTrainer.guidance = args.sigmas, args.min_score, args.guidance

    heldout_curve.Trainer = ReplayTrainer
    return heldout_curve.main(argv, parents=(parser,), configure=configure)


if __name__ == "__main__":
    main()
