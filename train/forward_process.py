"""Forward-process training rows for solver-agnostic objectives (DiffusionNFT and AWM: ``flowalign.objectives.nft``, ``.awm``).

Per-transition objectives (grpo, dense_grpo, tp_grpo) train on the recorded steps of a rollout;
forward-process objectives (``objective.forward_process = True``) keep only each sample's clean
final latent and noise it afresh. Each iteration draws (once, shared by its inner epochs), for every sample, ``T =
objective.num_timesteps`` sigmas and noises (:func:`draw`, from the trainer's generator, so a
resumed run draws the same ones); the trainer's plan is then ``(sample indices, draw j)`` micro-batches,
exactly as ``(sample indices, step k)`` for the step objectives.

The old (sampling) policy's velocity ``v_old`` is needed at every row. While no optimizer step has
been taken in the iteration the trained LoRA *is* the old policy, so ``v_old = v_θ.detach()`` costs
nothing; when an iteration takes several optimizer steps, or the samples come from DiffusionNFT's
soft-updated old policy (``train.old_policy_rate > 0``, :func:`flowalign.lora.soft_update_decay`),
:func:`old_velocities` evaluates it once for every row before the first step (the trainer swaps the
old weights in for it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass
class ForwardDraws:
    """One iteration's forward-process draws (shared by its inner epochs): ``sigma [B, T]``, ``noise [B, T, *latent]`` (CPU),
    and ``v_old [B, T, *latent]`` once :func:`old_velocities` has filled it (else None)."""

    sigma: Tensor
    noise: Tensor
    v_old: Optional[Tensor] = None


def sigma_grid(traj, timestep_fraction: float) -> Tensor:
    """The rollout's own noise levels ``sigma_0..sigma_{K-1}`` (sigma_K = 0 excluded), the first
    ``ceil(timestep_fraction·K)`` of them (the high-noise end, where the layout is decided)."""
    grid = traj.sigmas[:-1].float().cpu()  # [K]
    return grid[:grid_size(grid.numel(), timestep_fraction)]


def grid_size(num_steps: int, timestep_fraction: float) -> int:
    """How many of a ``num_steps`` rollout's sigmas :func:`sigma_grid` keeps: ``max(1, ceil(timestep_fraction·K))``."""
    return max(1, math.ceil(round(timestep_fraction * num_steps, 9)))  # round: 0.7 * 10 is 7.000000000000001


def draw(traj, objective, timestep_fraction: float, generator: torch.Generator,
         group_generator: Optional[Callable[[int], torch.Generator]] = None) -> ForwardDraws:
    """Sigmas (``objective.sigma_sampling`` over :func:`sigma_grid`) and standard-normal noises for every sample.

    With ``group_generator`` (``group id -> generator``; the trainer's under ``sampling.noise_seeding: group``)
    each group's rows are drawn from their group's own stream, so the draws do not depend on how the
    groups are spread over processes; else every row from ``generator``.
    """
    from flowalign.objectives.nft import draw_forward_sigmas

    batch, num = traj.batch_size, objective.num_timesteps
    grid, latent = sigma_grid(traj, timestep_fraction), traj.latents.shape[2:]
    if group_generator is None:
        sigma = draw_forward_sigmas(grid, batch, num, generator, objective.sigma_sampling)  # [B, T]
        noise = torch.randn((batch, num, *latent), generator=generator, dtype=torch.float32)  # [B, T, *latent]
        return ForwardDraws(sigma=sigma, noise=noise)
    sigma, noise = torch.empty(batch, num), torch.empty((batch, num, *latent), dtype=torch.float32)
    group_ids = traj.group_ids.cpu()
    for g in group_ids.unique().tolist():
        rows = (group_ids == g).nonzero().flatten()
        gen = group_generator(int(g))
        sigma[rows] = draw_forward_sigmas(grid, rows.numel(), num, gen, objective.sigma_sampling)
        noise[rows] = torch.randn((rows.numel(), num, *latent), generator=gen, dtype=torch.float32)
    return ForwardDraws(sigma=sigma, noise=noise)


def make_forward_batch(traj, advantages: Tensor, draws: ForwardDraws, index: Tensor, j: int, device: torch.device):
    """Rows ``(index, draw j)`` as a :class:`~flowalign.objectives.nft.ForwardBatch` on ``device``."""
    from flowalign.objectives.nft import ForwardBatch

    dtype = traj.latents.dtype
    return ForwardBatch(
        x0=traj.latents[index, -1].to(device),
        noise=draws.noise[index, j].to(device=device, dtype=dtype),
        sigma=draws.sigma[index, j].to(device),
        advantages=advantages[index].to(device),
        v_old=None if draws.v_old is None else draws.v_old[index, j].to(device=device, dtype=dtype),
    )


def noised(fb) -> Tensor:
    """``x_s = (1 - s)·x0 + s·ε`` of a ForwardBatch's rows (the objective recomputes the same)."""
    from flowalign.objectives.diffusion_dpo import noised_and_target

    return noised_and_target(fb.x0, fb.noise, fb.sigma)[0]


@torch.no_grad()
def old_velocities(traj, advantages: Tensor, draws: ForwardDraws, plan: list, velocity_for: Callable[[Tensor], Callable],
                   device: torch.device) -> None:
    """Fill ``draws.v_old`` with the policy's velocity at every planned row (the sampling policy's: call it with
    those weights in the LoRA).

    ``velocity_for(index) -> policy(x, sigma)`` binds the conditioning of samples ``index``; call
    this before the iteration's first optimizer step.
    """
    draws.v_old = None
    v_old = torch.zeros_like(draws.noise)  # [B, T, *latent]
    for index, j in plan:
        fb = make_forward_batch(traj, advantages, draws, index, j, device)
        v_old[index, j] = velocity_for(index)(noised(fb), fb.sigma).float().cpu()
    draws.v_old = v_old


@torch.no_grad()
def reference_gap(fb, policy: Callable, reference: Callable) -> float:
    """Diagnostic ``mean ‖v_θ - v_ref‖²`` (mean over latent dims and rows) at the rows of ``fb``."""
    from flowalign.objectives.nft import velocity_gap

    x_s = noised(fb)
    return float(velocity_gap(policy(x_s, fb.sigma), reference(x_s, fb.sigma)))
