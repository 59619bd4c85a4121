"""Flow-GRPO: the clipped policy-gradient objective over recorded SDE transitions (DESIGN.md §8).

Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470, Eq. 4-6.
Each row of a :class:`~flowalign.objectives.base.StepBatch` is one transition x_k -> x_{k+1} that
the sampler drew with log-prob ``old_log_prob`` (the behaviour policy). The policy recomputes the
kernel mean from its own velocity, the ratio of densities gives the PPO-style clipped surrogate,
and an optional KL to the reference model (LoRA disabled) is taken on the transition means.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from flowalign import sde
from flowalign.objectives.base import StepBatch, VelocityFn, register_objective, require_finite


def clipped_policy_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> tuple[Tensor, dict[str, float]]:
    """PPO / GRPO clipped surrogate (Flow-GRPO arXiv 2505.05470 Eq. 5; cleanrl ``ppo.py`` naming).

    ratio = exp(logp - logp_old)
    loss  = mean( max(-A·ratio, -A·clip(ratio, 1 - eps, 1 + eps)) )

    Args:
        log_prob: ``[B]`` log-prob of the recorded transitions under the current policy (with grad).
        old_log_prob: ``[B]`` log-prob recorded by the sampler (no grad).
        advantages: ``[B]`` advantage of each transition.
        clip_range: eps of the trust region (Flow-GRPO uses 1e-4: log-probs are means over
            latent dims, so ratios stay very close to 1).

    Returns:
        ``(loss, metrics)`` with ``policy/clip_frac`` (fraction of rows whose ratio is outside
        [1-eps, 1+eps]), ``policy/approx_kl`` (the k3 estimator mean((ratio - 1) - logratio)) and
        ``policy/ratio_mean``.
    """
    if not (clip_range > 0 and math.isfinite(clip_range)):  # NaN fails every comparison: its loss was NaN with clip_frac 0
        raise ValueError(f"clip_range must be a finite number > 0, got {clip_range}")
    if not (log_prob.shape == old_log_prob.shape == advantages.shape) or log_prob.ndim != 1:
        raise ValueError(
            f"log_prob, old_log_prob and advantages must all be [B]; got {tuple(log_prob.shape)}, "
            f"{tuple(old_log_prob.shape)}, {tuple(advantages.shape)}"
        )
    logratio = log_prob - old_log_prob.detach()  # [B]
    ratio = torch.exp(logratio)  # [B]
    pg_loss1 = -advantages * ratio  # [B]
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # [B]
    loss = torch.maximum(pg_loss1, pg_loss2).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clip_frac = ((ratio - 1.0).abs() > clip_range).float().mean()
    metrics = {
        "policy/clip_frac": float(clip_frac),
        "policy/approx_kl": float(approx_kl),
        "policy/ratio_mean": float(ratio.detach().mean()),
    }
    return loss, metrics


# Kernels whose released code returns a ``std_dev_t`` without the step's ``sqrt(|dt|)`` (Flow-GRPO's "sde" branch);
# its KL ``(mu - mu_ref)² / (2 std_dev_t²)`` is then the transition KL times ``|dt|``. Flow-GRPO's "cps" branch and
# DanceGRPO return the step's full std, so for them ``"per_time"`` is the transition KL itself.
PER_TIME_KERNELS = ("flow_sde",)


def kl_in_form(kl: Tensor, batch: StepBatch, kl_form: str) -> Tensor:
    """Per-row transition KLs ``[B]`` as the penalty weighs them: as they are (``"transition"``), or as the released
    code divides them (``"per_time"``): times the step's length ``|σ_t - σ_{t+1}|`` for ``flow_sde``, unchanged for
    ``cps`` and ``dance_sde``, whose released ``std_dev_t`` is already the step's std; see :class:`FlowGRPO`'s ``kl_form``."""
    if kl_form == "per_time" and batch.kernel in PER_TIME_KERNELS:
        return kl * (batch.sigma.float() - batch.sigma_next.float()).abs().to(kl.device)
    return kl


def mean_kl(mean: Tensor, mean_ref: Tensor, std: Tensor, reduce: str = "mean") -> Tensor:
    """KL between two Gaussian transitions with the same std, averaged over latent dims (Flow-GRPO
    arXiv 2505.05470 Eq. 6: KL(N(mu, s²) || N(mu_ref, s²)) = (mu - mu_ref)² / (2 s²)).

    Args:
        mean, mean_ref: ``[B, *latent]`` kernel means under the policy and the reference.
        std: broadcastable to ``mean`` (``[B, 1, ..., 1]`` from :func:`flowalign.sde.step`); a ``[B]`` tensor
            is taken per sample (:func:`flowalign.sde.per_sample_std`).
        reduce: ``"mean"`` over latent dims (Flow-GRPO's, beside its mean-reduced log-probs) or ``"sum"`` (the
            transition's whole KL, beside sum-reduced log-probs: the penalty keeps its weight against the ratio term,
            where a mean would make ``kl_beta`` D times weaker).

    Returns:
        ``[B]`` per-row KL, reduced over latent dims; 0 for rows with ``std == 0`` (deterministic steps
        carry no density and are never trained).
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if mean.shape != mean_ref.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and mean_ref {tuple(mean_ref.shape)} must match")
    std = sde.per_sample_std(std, mean)
    live = std > 0
    safe = torch.where(live, std, torch.ones_like(std))
    kl = (mean.float() - mean_ref.float()) ** 2 / (2 * safe**2)  # [B, *latent]
    kl = torch.where(live, kl, torch.zeros_like(kl))
    dims = tuple(range(1, kl.ndim))
    return kl.mean(dim=dims) if reduce == "mean" else kl.sum(dim=dims)


def transition_mean(batch: StepBatch, velocity: VelocityFn) -> tuple[Tensor, Tensor]:
    """Recompute the kernel ``(mean, std)`` of every row of ``batch`` under ``velocity``."""
    v = velocity(batch.x, batch.sigma)  # [B, *latent]
    out = sde.step(batch.kernel, batch.x, v, batch.sigma, batch.sigma_next, batch.noise_level, noise=torch.zeros_like(batch.x))
    return out.mean, out.std


@register_objective("grpo")
class FlowGRPO:
    """Flow-GRPO objective (arXiv 2505.05470): clipped ratio loss + kl_beta·KL to the reference.

    Args:
        clip_range: PPO clip eps (default 1e-4, Flow-GRPO's value for mean-reduced log-probs).
        kl_beta: weight of the KL on transition means; the reference is only evaluated when > 0.
        adv_clip: advantages are clamped to ``[-adv_clip, adv_clip]`` before the loss.
        kl_form: ``"transition"`` (default): the KL of the two Gaussian transitions, divided by the
            step's variance ``std² = σ_t²·|Δt|`` (the paper's Eq.); ``"per_time"``: times ``|Δt| =
            sigma - sigma_next``, i.e. divided by ``σ_t²`` alone, as Flow-GRPO's released code computes it
            for ``flow_sde`` (``std_dev_t`` without ``sqrt(-dt)``). Published ``kl_beta`` values (0.04 for GenEval)
            were tuned with ``"per_time"``: with ``"transition"`` the same beta weighs the KL 1/|Δt| times
            more (4–28x on SD3.5's 10 shifted steps). For ``cps`` and ``dance_sde`` the released code's
            ``std_dev_t`` is the step's own std, so ``"per_time"`` equals ``"transition"`` there.
    """

    name = "grpo"

    def __init__(self, clip_range: float = 1e-4, kl_beta: float = 0.0, adv_clip: float = 5.0, kl_form: str = "transition"):
        require_finite(type(self).__name__, {k: v for k, v in locals().items() if k != "self"})
        if clip_range <= 0 or kl_beta < 0 or adv_clip <= 0:
            raise ValueError(f"need clip_range > 0, kl_beta >= 0, adv_clip > 0; got {clip_range}, {kl_beta}, {adv_clip}")
        if kl_form not in ("transition", "per_time"):
            raise ValueError(f"kl_form must be 'transition' or 'per_time', got {kl_form!r}")
        self.clip_range = clip_range
        self.kl_beta = kl_beta
        self.adv_clip = adv_clip
        self.kl_form = kl_form

    @property
    def needs_reference(self) -> bool:
        """Only the KL term (``kl_beta > 0``) reads the reference."""
        return self.kl_beta > 0

    def loss(self, batch: StepBatch, policy: VelocityFn, reference: Optional[VelocityFn] = None) -> tuple[Tensor, dict[str, float]]:
        """Loss on one batch of transitions; ``policy(x, sigma[B]) -> v``; ``reference`` when kl_beta > 0."""
        if batch.advantages.ndim != 1:
            raise ValueError(f"StepBatch.advantages must be [B] (one per transition), got {tuple(batch.advantages.shape)}")
        # 1. policy log-prob of the recorded transition
        mean, std = transition_mean(batch, policy)
        logp = sde.log_prob(batch.x_next, mean, std, reduce=batch.log_prob_reduce, form=batch.log_prob_form)  # [B]
        # 2. clipped surrogate on clamped advantages
        adv = torch.clamp(batch.advantages.float(), -self.adv_clip, self.adv_clip)  # [B]
        loss, metrics = clipped_policy_loss(logp, batch.old_log_prob.float(), adv, self.clip_range)
        metrics["loss/policy"] = float(loss.detach())
        # 3. KL to the reference on the kernel means
        if self.kl_beta > 0:
            if reference is None:
                raise ValueError("kl_beta > 0 needs a reference velocity function")
            with torch.no_grad():
                mean_ref, _ = transition_mean(batch, reference)
            kl = kl_in_form(mean_kl(mean, mean_ref, std, reduce=batch.log_prob_reduce), batch, self.kl_form).mean()
            loss = loss + self.kl_beta * kl
            metrics["kl/ref"] = float(kl.detach())
        metrics["loss/total"] = float(loss.detach())
        return loss, metrics
