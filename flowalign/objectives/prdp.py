"""PRDP: proximal reward difference prediction (Deng et al., arXiv 2402.08714).

For two trajectories ``a``, ``b`` of the same prompt, the KL-regularised RL optimum satisfies
``r(x_a) - r(x_b) = β Σ_t [ log p_θ(a_t)/p_ref(a_t) - log p_θ(b_t)/p_ref(b_t) ]`` (the
partition function cancels in the difference; PRDP Thm. 4.1). The **RDP** objective regresses the
observed reward difference onto this prediction::

    r̂_θ = β Σ_t ( ℓ_t^a - ℓ_t^b ),   ℓ_t = log p_θ(x_{t+1} | x_t) - log p_ref(x_{t+1} | x_t)
    L    = ( r_a - r_b - r̂_θ )²          ( = β² · ((r_a - r_b)/β - Σ_t(ℓ_t^a - ℓ_t^b))² )

In the online, proximal version the reference is the policy that sampled the pair (the recorded
``old_log_probs``), and updates are kept close to it by clipping each per-step log-ratio to
``[-ε, ε]``, PPO style: ``L = max( (Δr - r̂)², (Δr - r̂_clip)² )`` so moving a log-ratio past the
clip range stops helping the fit (zero gradient) but can still be pulled back. As in the paper
(and DDPO), the sum over steps can be replaced by ``K×`` one step, so each step gets its own loss
(``per_step=True``, the default): ``r̂_t = β K (ℓ_t^a - ℓ_t^b)``.

Log-probs are the kernels' Gaussian densities (``flowalign.sde.log_prob``), reduced over latent
dims as the sampler recorded them (``mean`` by default), so ``β`` is on that scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from flowalign import sde
from flowalign.objectives.base import VelocityFn, register_objective, require_finite

__all__ = ["PairBatch", "prdp_loss", "PRDP", "run_online_prdp"]


@dataclass
class PairBatch:
    """``P`` pairs of recorded trajectories (side 0 = ``a``, side 1 = ``b``) of the same prompt.

    Attributes:
        x: ``[P, 2, K, *latent]`` latent before each step.
        x_next: ``[P, 2, K, *latent]`` latent the sampler drew.
        sigma, sigma_next: ``[K]`` the step sigmas (shared schedule).
        noise_level: ``[K]`` noise level of each step.
        old_log_probs: ``[P, 2, K]`` fp32 log-probs recorded by the sampler (the reference).
        rewards: ``[P, 2]`` outcome rewards of the two samples.
        step_mask: ``[K]`` bool, steps to train on (stochastic steps); all when None.
        kernel: transition kernel name as in ``flowalign.sde.step``.
        log_prob_reduce: ``"mean"`` or ``"sum"``, as the sampler recorded the log-probs.
        log_prob_form: ``"gaussian"`` or ``"squared_error"``, as the sampler recorded them.
    """

    x: Tensor
    x_next: Tensor
    sigma: Tensor
    sigma_next: Tensor
    noise_level: Tensor
    old_log_probs: Tensor
    rewards: Tensor
    step_mask: Optional[Tensor] = None
    kernel: str = "flow_sde"
    log_prob_reduce: str = "mean"
    log_prob_form: str = "gaussian"


def prdp_loss(
    log_ratio_a: Tensor,
    log_ratio_b: Tensor,
    reward_a: Tensor,
    reward_b: Tensor,
    beta: float,
    clip_range: Optional[float] = None,
    per_step: bool = True,
    step_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Proximal reward-difference-prediction loss per pair (arXiv 2402.08714, RDP + clipping).

    ``per_step=False``: ``L = max((Δr - β Σ_t Δℓ_t)², (Δr - β Σ_t Δℓ_t^clip)²)``;
    ``per_step=True``:  ``L = mean_t max((Δr - β K Δℓ_t)², (Δr - β K Δℓ_t^clip)²)``
    with ``Δr = r_a - r_b``, ``Δℓ_t = ℓ_t^a - ℓ_t^b``, ``ℓ^clip = clip(ℓ, -ε, ε)`` and ``K`` the
    number of trained steps. ``clip_range=None`` disables clipping (plain RDP).

    Args:
        log_ratio_a, log_ratio_b: ``[P, K]`` per-step log p_θ - log p_ref of each side.
        reward_a, reward_b: ``[P]``.
        step_mask: ``[K]`` bool, steps that count (default all).

    Returns:
        (loss ``[P]``, clipped ``[P, K]`` bool: where the clipped branch was the larger one and a
        log-ratio was outside the range, i.e. where the gradient is cut).
    """
    P, K = log_ratio_a.shape
    given = torch.ones(K, dtype=torch.bool) if step_mask is None else step_mask.bool()
    k_eff = int(given.sum())
    mask = given.to(log_ratio_a.device)  # on the log-ratios' device (Trajectory.stochastic_mask lives on the CPU: CUDA & CPU raised)
    if k_eff == 0:
        raise ValueError("prdp_loss: step_mask selects no step")
    m = mask.to(dtype=log_ratio_a.dtype)  # [K]
    target = (reward_a - reward_b).float()  # [P]
    eps = float("inf") if clip_range is None else clip_range
    delta = (log_ratio_a - log_ratio_b) * m  # [P, K]
    delta_clip = (log_ratio_a.clamp(-eps, eps) - log_ratio_b.clamp(-eps, eps)) * m  # [P, K]
    outside = ((log_ratio_a.abs() > eps) | (log_ratio_b.abs() > eps)) & mask  # [P, K]
    if per_step:
        err = (target[:, None] - beta * k_eff * delta) ** 2  # [P, K]
        err_clip = (target[:, None] - beta * k_eff * delta_clip) ** 2
        per = torch.maximum(err, err_clip)
        loss = (per * m).sum(dim=1) / k_eff  # [P]
        clipped = outside & (err_clip > err)
    else:
        err = (target - beta * delta.sum(dim=1)) ** 2  # [P]
        err_clip = (target - beta * delta_clip.sum(dim=1)) ** 2
        loss = torch.maximum(err, err_clip)
        clipped = outside & (err_clip > err)[:, None]
    return loss, clipped


def _policy_log_probs(batch: PairBatch, fn: VelocityFn) -> Tensor:
    """Log-probs ``[P, 2, K]`` of the recorded transitions under ``fn``'s kernel means."""
    P, _, K = batch.old_log_probs.shape
    latent = batch.x.shape[3:]
    x = batch.x.reshape(P * 2 * K, *latent)  # rows ordered (pair, side, step)
    x_next = batch.x_next.reshape(P * 2 * K, *latent)
    sigma = batch.sigma.repeat(P * 2)  # [P*2*K]
    sigma_next = batch.sigma_next.repeat(P * 2)
    level = batch.noise_level.repeat(P * 2)
    v = fn(x, sigma)
    out = sde.step(batch.kernel, x, v, sigma, sigma_next, level, noise=torch.zeros_like(x))
    return sde.log_prob(x_next, out.mean, out.std, reduce=batch.log_prob_reduce, form=batch.log_prob_form).view(P, 2, K)


@register_objective("prdp")
class PRDP:
    """PRDP over a :class:`PairBatch`.

    ``policy`` is called once on all recorded steps, rows ordered ``(pair, side, step)``: row
    ``r`` belongs to pair ``r // (2K)`` (the trainer binds that pair's prompt conditioning).
    The reference log-probs are the recorded ``old_log_probs`` (proximal, online PRDP), so
    ``reference`` is unused (``needs_reference = False``).
    """

    needs_reference = False
    trained_by = "flowalign.objectives.prdp.run_online_prdp"  # pairs of recorded trajectories: its own loop, no CLI recipe

    def __init__(self, beta: float = 1.0, clip_range: Optional[float] = 1e-4, per_step: bool = True):
        require_finite(type(self).__name__, {k: v for k, v in locals().items() if k != "self"})
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if clip_range is not None and clip_range <= 0:
            raise ValueError(f"clip_range must be > 0 or None, got {clip_range}")
        self.beta, self.clip_range, self.per_step = beta, clip_range, per_step

    def loss(self, batch: PairBatch, policy: VelocityFn, reference: Optional[VelocityFn] = None) -> tuple[Tensor, dict[str, float]]:
        """Mean proximal RDP loss over pairs, and diagnostics."""
        logp = _policy_log_probs(batch, policy)  # [P, 2, K]
        log_ratio = logp - batch.old_log_probs.float()
        loss, clipped = prdp_loss(
            log_ratio[:, 0], log_ratio[:, 1], batch.rewards[:, 0], batch.rewards[:, 1],
            self.beta, self.clip_range, self.per_step, batch.step_mask,
        )
        with torch.no_grad():
            mask = torch.ones(log_ratio.shape[-1], dtype=torch.bool) if batch.step_mask is None else batch.step_mask.bool()
            lr = log_ratio[..., mask]
            pred = self.beta * (lr[:, 0] - lr[:, 1]).sum(dim=1)
        metrics = {
            "prdp/loss": loss.mean().item(),
            "prdp/clip_frac": clipped[:, mask].float().mean().item(),
            "prdp/pred_diff_abs": pred.abs().mean().item(),
            "prdp/target_diff_abs": (batch.rewards[:, 0] - batch.rewards[:, 1]).abs().float().mean().item(),
            "prdp/approx_kl": (0.5 * lr.pow(2)).mean().item(),
        }
        return loss.mean(), metrics


def run_online_prdp(
    sample_fn: Callable[[int], PairBatch],
    update_fn: Callable[[PairBatch], dict[str, float]],
    num_updates: int,
    resample_every: int,
) -> list[dict[str, float]]:
    """Online PRDP loop: draw fresh pairs with the current policy every ``resample_every`` updates.

    ``sample_fn(iteration)`` returns a :class:`PairBatch` whose ``old_log_probs`` come from the
    policy at that moment (the new proximal reference); ``update_fn(batch)`` takes one optimiser
    step and returns its metrics. Returns the metrics of every update, each with ``"prdp/round"``.
    """
    if resample_every < 1:
        raise ValueError(f"resample_every must be >= 1, got {resample_every}")
    history, batch = [], None
    for update in range(num_updates):
        if update % resample_every == 0:
            batch = sample_fn(update // resample_every)
        metrics = dict(update_fn(batch))
        metrics["prdp/round"] = float(update // resample_every)
        history.append(metrics)
    return history
