"""DiffusionNFT: online RL on the forward process (Zheng et al., arXiv 2509.16117; DESIGN.md §8).

Solver-agnostic: the samples may come from any sampler (the plain ODE included) and only their
clean latents ``x0`` and rewards are kept. Each sample is noised to a sigma ``s`` with fresh noise
(``x_s = (1 - s)·x0 + s·ε``, DESIGN.md §4). With the frozen **old** policy's velocity ``v_old``
(the policy that drew the samples) and the trained one ``v_θ``, the paper's implicit positive and
negative policies are (Eq. 8)

    v⁺ = (1 - β)·v_old + β·v_θ            v⁻ = (1 + β)·v_old - β·v_θ

and the loss weights their flow-matching errors by each sample's optimality probability
``r ∈ [0, 1]`` (Eq. 10, written in x0 space as the official code does, ``x̂0(v) = x_s - s·v``):

    L = (c/β) · mean_i [ r_i·‖x̂0(v⁺) - x0‖²/w⁺_i + (1 - r_i)·‖x̂0(v⁻) - x0‖²/w⁻_i ]

where ``‖·‖²`` is a mean over latent dims, ``w = mean|x̂0 - x0|`` (no gradient; the official
"adaptive weighting", clamped below at 1e-5; ``adaptive_weight=False`` uses ``w = 1``), and
``r = 0.5 + 0.5·clip(A, -c, c)/c`` maps the group-normalised advantage ``A`` with ``c = adv_clip``.

What the loss does (``w = 1``): with ``Δ = v_θ - v_old`` and ``e = v_old - v`` (``v = ε - x0``) the
bracket is ``s²·(β²‖Δ‖² + ‖e‖² + 2β(2r - 1)⟨Δ, e⟩)``, minimised by ``v_θ = v_old + (2r - 1)(v - v_old)/β``:
a sample better than its group (r > ½) pulls the velocity towards its own flow-matching target, a
worse one pushes it away, and the move is bounded by ``1/β`` (a trust region around ``v_old``
instead of Flow-GRPO's ratio clip). At ``v_θ = v_old`` the gradient is ``(2r - 1)·(c/β)·β·∇‖x̂0(v_θ) - x0‖²/w``:
advantage-weighted flow matching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from flowalign.objectives.base import VelocityFn, register_objective, require_finite
from flowalign.objectives.diffusion_dpo import noised_and_target

__all__ = ["ForwardBatch", "optimality_probability", "nft_loss", "forward_rows", "velocity_gap", "add_reference_penalty", "draw_forward_sigmas",
           "DiffusionNFT"]

SIGMA_SAMPLING = ("grid", "uniform")


@dataclass
class ForwardBatch:
    """Clean samples noised by the forward process, one row per (sample, sigma) draw.

    Attributes:
        x0: ``[B, *latent]`` clean latents of the samples (the sampler's final latents).
        noise: ``[B, *latent]`` the fresh standard-normal noise ``ε`` of each row.
        sigma: ``[B]`` the noise level ``s`` of each row, in (0, 1].
        advantages: ``[B]`` group-normalised advantage of the row's sample.
        v_old: ``[B, *latent]`` the old (sampling) policy's velocity at ``x_s``, or None when the
            trained policy still *is* the old one (first optimizer step of an iteration, sampling
            on-policy): then ``v_old = v_θ.detach()`` and no second forward is needed. With
            ``train.old_policy_rate > 0`` the samples come from DiffusionNFT's soft-updated old
            policy and the trainer always fills it with that policy's velocity.
        v_ema: ``[B, *latent]`` the velocity of the EMA of the trained LoRA at ``x_s``, filled by the
            trainer only for an objective with ``needs_ema`` (AWM's ``ema_beta``); else None.
    """

    x0: Tensor
    noise: Tensor
    sigma: Tensor
    advantages: Tensor
    v_old: Optional[Tensor] = None
    v_ema: Optional[Tensor] = None


def optimality_probability(advantages: Tensor, adv_clip: float) -> Tensor:
    """``r = 0.5 + 0.5·clip(A, -c, c)/c`` in [0, 1] (DiffusionNFT §4.2, official normalisation); ``[B]``."""
    if adv_clip <= 0:
        raise ValueError(f"adv_clip must be > 0, got {adv_clip}")
    return 0.5 + 0.5 * advantages.float().clamp(-adv_clip, adv_clip) / adv_clip


def _x0_error(x0_hat: Tensor, x0: Tensor, adaptive: bool) -> Tensor:
    """``‖x̂0 - x0‖²`` (mean over latent dims, fp32), divided by ``w = mean|x̂0 - x0|`` (no grad) when adaptive; ``[B]``."""
    diff = (x0_hat.float() - x0.float()).flatten(1)  # [B, D]
    err = diff.pow(2).mean(dim=1)  # [B]
    if adaptive:
        with torch.no_grad():
            weight = diff.abs().mean(dim=1).clamp_min(1e-5)  # [B]
        err = err / weight
    return err


def nft_loss(v_theta: Tensor, v_old: Tensor, x_s: Tensor, x0: Tensor, sigma: Tensor, r: Tensor, beta: float,
             scale: float = 1.0, adaptive: bool = True) -> Tensor:
    """Per-row DiffusionNFT loss (arXiv 2509.16117 Eq. 10, x0-space form of the official code), ``[B]``.

    ``scale·[ r·‖x̂0(v⁺) - x0‖²/w⁺ + (1 - r)·‖x̂0(v⁻) - x0‖²/w⁻ ] / β`` with
    ``v⁺ = (1-β)v_old + βv_θ``, ``v⁻ = (1+β)v_old - βv_θ``, ``x̂0(v) = x_s - s·v``.

    Args:
        v_theta: ``[B, *latent]`` trained velocity at ``x_s`` (with grad).
        v_old: ``[B, *latent]`` old policy's velocity at ``x_s`` (detached here).
        x_s, x0: ``[B, *latent]`` noised and clean latents.
        sigma: ``[B]`` noise levels; r: ``[B]`` optimality probabilities in [0, 1].
        beta: implicit-policy strength ``β > 0``; scale: the constant ``c`` in front (official: adv_clip).
        adaptive: divide each error by its (detached) mean absolute value.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not (v_theta.shape == v_old.shape == x_s.shape == x0.shape) or sigma.shape != r.shape or sigma.shape[0] != x0.shape[0]:
        raise ValueError(f"nft_loss: v_theta {tuple(v_theta.shape)}, v_old {tuple(v_old.shape)}, x_s {tuple(x_s.shape)}, "
                         f"x0 {tuple(x0.shape)} must match, sigma {tuple(sigma.shape)} and r {tuple(r.shape)} must be [B]")
    v_old = v_old.detach()
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(v_theta.dtype)  # [B, 1, ...]
    # 1. the implicit positive and negative policies (Eq. 8)
    v_pos = beta * v_theta + (1.0 - beta) * v_old  # [B, *latent]
    v_neg = (1.0 + beta) * v_old - beta * v_theta  # [B, *latent]
    # 2. their x0 predictions and (adaptively weighted) errors
    pos_err = _x0_error(x_s - s * v_pos, x0, adaptive)  # [B]
    neg_err = _x0_error(x_s - s * v_neg, x0, adaptive)  # [B]
    # 3. reward-weighted mix
    r = r.float()
    return scale * (r * pos_err + (1.0 - r) * neg_err) / beta


def forward_rows(batch: ForwardBatch, policy: VelocityFn) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The rows every forward-process objective starts from: ``(x_s, v_target, v_θ, v_old)``, each ``[B, *latent]``.

    ``x_s = (1 - s)·x0 + s·ε`` and ``v_target = ε - x0`` (the forward process), ``v_θ = policy(x_s, s)``
    (with grad), and ``v_old = batch.v_old``, or ``v_θ`` detached when the batch has none (no optimizer
    step yet in the iteration: the trained policy is the sampling one). Raises ValueError when
    ``batch.advantages`` is not ``[B]``.
    """
    if batch.advantages.ndim != 1 or batch.advantages.shape[0] != batch.x0.shape[0]:
        raise ValueError(f"ForwardBatch.advantages must be [B]={batch.x0.shape[0]}, got {tuple(batch.advantages.shape)}")
    x_s, v_target = noised_and_target(batch.x0, batch.noise, batch.sigma)
    v_theta = policy(x_s, batch.sigma)
    v_old = v_theta.detach() if batch.v_old is None else batch.v_old
    return x_s, v_target, v_theta, v_old


def velocity_gap(v: Tensor, v_other: Tensor) -> Tensor:
    """``mean_i mean_d (v - v_other)²`` (mean over latent dims, then rows), a fp32 scalar: the
    forward-process objectives' distance between two velocity fields at the same rows."""
    return (v.float() - v_other.float()).pow(2).flatten(1).mean(dim=1).mean()


def add_reference_penalty(loss: Tensor, metrics: dict[str, float], v_theta: Tensor, x_s: Tensor, sigma: Tensor,
                          reference: Optional[VelocityFn], kl_beta: float) -> Tensor:
    """``loss + kl_beta·mean_i mean_d (v_θ - v_ref)²`` at the rows' ``x_s`` (the forward-process objectives'
    KL-like penalty, LoRA off as the reference), logging ``metrics["kl/ref"]``; ``loss`` unchanged when ``kl_beta = 0``."""
    if kl_beta <= 0:
        return loss
    if reference is None:
        raise ValueError("kl_beta > 0 needs a reference velocity function")
    with torch.no_grad():
        v_ref = reference(x_s, sigma)
    kl = velocity_gap(v_theta, v_ref)
    metrics["kl/ref"] = float(kl.detach())
    return loss + kl_beta * kl


def draw_forward_sigmas(grid: Tensor, batch: int, num: int, generator: Optional[torch.Generator] = None,
                        mode: str = "grid") -> Tensor:
    """Noise levels for ``num`` forward-process draws of each of ``batch`` samples, ``[batch, num]``.

    ``mode="grid"``: ``num`` distinct entries of ``grid`` (the sampler's own sigmas, ``[M]``, all in
    (0, 1]) per sample, uniformly without replacement (as the official code trains on the sampling
    timesteps). ``mode="uniform"``: ``s ~ U(min(grid), max(grid))``.
    """
    if mode not in SIGMA_SAMPLING:
        raise ValueError(f"sigma_sampling={mode!r}; choose one of {SIGMA_SAMPLING}")
    grid = torch.as_tensor(grid, dtype=torch.float32).flatten()
    if grid.numel() == 0 or bool((grid <= 0).any()) or bool((grid > 1).any()):
        raise ValueError(f"the sigma grid must be non-empty and in (0, 1], got {grid.tolist()}")
    if mode == "uniform":
        low, high = float(grid.min()), float(grid.max())
        return low + (high - low) * torch.rand(batch, num, generator=generator)
    if not 1 <= num <= grid.numel():
        raise ValueError(f"num_timesteps={num} must be in [1, {grid.numel()}] (the number of sigmas to draw from)")
    order = torch.rand(batch, grid.numel(), generator=generator).argsort(dim=1)[:, :num]  # [batch, num] distinct
    return grid[order]


@register_objective("nft")
class DiffusionNFT:
    """DiffusionNFT objective (arXiv 2509.16117) over a :class:`ForwardBatch`; see the module docstring.

    Args:
        beta: implicit-policy strength β (the official GenEval recipe: 1.0).
        num_timesteps: forward-process draws per sample and iteration (read by the trainer).
        sigma_sampling: ``"grid"`` (the sampler's sigmas) or ``"uniform"`` (read by the trainer).
        adaptive_weight: the official per-row adaptive weighting of the x0 errors.
        kl_beta: weight of ``‖v_θ - v_ref‖²`` (mean over latent dims) to the reference (LoRA off).
        adv_clip: ``c`` of the advantage → optimality-probability map and the loss scale.
        clip_range: unused (the trust region is β's); accepted so every online recipe shares keys.
    """

    name = "nft"
    forward_process = True  # the trainer builds ForwardBatch rows from clean samples, not StepBatch transitions

    def __init__(self, beta: float = 1.0, num_timesteps: int = 2, sigma_sampling: str = "grid", adaptive_weight: bool = True,
                 kl_beta: float = 0.0, adv_clip: float = 5.0, clip_range: float = 1e-4):
        require_finite(type(self).__name__, {k: v for k, v in locals().items() if k != "self"})
        if beta <= 0 or kl_beta < 0 or adv_clip <= 0 or num_timesteps < 1:
            raise ValueError(f"need beta > 0, kl_beta >= 0, adv_clip > 0, num_timesteps >= 1; got {beta}, {kl_beta}, {adv_clip}, {num_timesteps}")
        if sigma_sampling not in SIGMA_SAMPLING:
            raise ValueError(f"sigma_sampling={sigma_sampling!r}; choose one of {SIGMA_SAMPLING}")
        self.beta = beta
        self.num_timesteps = int(num_timesteps)
        self.sigma_sampling = sigma_sampling
        self.adaptive_weight = bool(adaptive_weight)
        self.kl_beta = kl_beta
        self.adv_clip = adv_clip

    @property
    def needs_reference(self) -> bool:
        """Only the KL term (``kl_beta > 0``) reads the reference."""
        return self.kl_beta > 0

    def loss(self, batch: ForwardBatch, policy: VelocityFn, reference: Optional[VelocityFn] = None) -> tuple[Tensor, dict[str, float]]:
        """Mean loss over the rows of ``batch``; ``policy(x, sigma[B]) -> v`` with grad."""
        # 1. forward process: x_s = (1 - s) x0 + s eps, target v = eps - x0; the trained and the old velocity
        x_s, v_target, v_theta, v_old = forward_rows(batch, policy)  # [B, *latent] each
        # 2. optimality probability and the NFT loss
        r = optimality_probability(batch.advantages, self.adv_clip)  # [B]
        per_row = nft_loss(v_theta, v_old, x_s, batch.x0, batch.sigma, r, self.beta, scale=self.adv_clip, adaptive=self.adaptive_weight)
        loss = per_row.mean()
        with torch.no_grad():
            metrics = {
                "loss/policy": float(loss),
                "nft/r_mean": float(r.mean()),
                "nft/old_deviate": float((v_theta.float() - v_old.float()).pow(2).mean()),
                "nft/fm_error": float((v_theta.float() - v_target.float()).pow(2).mean()),
            }
        # 3. optional KL-like penalty to the reference (the official code's ‖v_θ - v_ref‖²)
        loss = add_reference_penalty(loss, metrics, v_theta, x_s, batch.sigma, reference, self.kl_beta)
        metrics["loss/total"] = float(loss.detach())
        return loss, metrics
