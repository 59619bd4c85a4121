"""Advantage Weighted Matching (AWM; Xue et al., arXiv 2509.25050; DESIGN.md §8).

Solver-agnostic like DiffusionNFT: only each sample's clean latent ``x0`` and its advantage are
kept, and the sample is noised afresh to a sigma ``s`` with noise ``ε`` (``x_s = (1 - s)·x0 + s·ε``,
DESIGN.md §4). AWM replaces Flow-GRPO's per-step Gaussian log-likelihood by the pretraining
objective itself: the flow-matching error of the sample is its (negative, weighted) log-likelihood
surrogate

    e_i   = mean_d (v_θ(x_s, s) - (ε - x0))²                      (mean over latent dims)
    ℓ_i   = -w(s)·φ(e_i)
            uniform: w = 1, φ(e) = e;   t: w = s, φ(e) = e;   t2: w = s², φ(e) = e
            ghuber:  w = s, φ(e) = ((e + δ)^p - δ^p) / p       (δ = 1e-10; p = ghuber_power)

and the loss is PPO's clipped surrogate on the ratio of these surrogates against the sampling
policy's (``ℓ_old`` at the same ``x_s``; the official "exp_first" form, one ratio per row):

    ρ_i = exp(ℓ_i - ℓ_old_i)
    Â_i = clip(A_i, -c, c) · advantage_max / c
    L   = mean_i max(-Â_i·ρ_i, -Â_i·clip(ρ_i, 1 - ε, 1 + ε))  +  kl_beta · mean_i mean_d (v_θ - v_ref)²
                                                               +  ema_beta · mean_i mean_d (v_θ - v_ema)²

At ``v_θ = v_old`` (one optimizer step per iteration: ``ρ = 1``) the gradient is
``mean_i Â_i·w(s_i)·φ'(e_i)·∇e_i``: flow matching towards the sample's own target, weighted by its
advantage (a better-than-group sample pulls, a worse one pushes). The generalised Huber weighting
(``p < 1``) shrinks the pull of rows whose error is already large, as DiffusionNFT's adaptive
weighting does. The last term is a penalty to an EMA of the trained LoRA (``v_ema``; the trainer fills
``ForwardBatch.v_ema`` when ``ema_beta > 0``): a trust region around the recent policies rather than
around the base model. ``ema_target="kl_ema"`` is the official recipe's KL-EMA (their presets,
``config/dgx_awm.py``: ``ema_beta = 1``, ``kl_ema_decay = 0.3``, linear): a copy of its own, soft-updated
after each iteration, ``ema <- d·ema + (1 - d)·θ`` with ``d = min(0.3, 0.001·step)``, so it stays close to
the current policy, apart from the evaluation EMA. ``ema_target="train_ema"`` (the default) instead reads
``train.ema``'s averaged weights, the ones evaluated and saved.

**Offline** (``flowalign offline``, an :class:`~flowalign.objectives.base.OfflineBatch` of ``P``
groups of ``k`` stored samples of one prompt each): the store's samples were drawn by the base
model, so the old policy is the reference (LoRA off) and every optimizer step is one more step
away from it, as PPO's later epochs are. Per step and row ``(p, j)`` the objective draws
``s ~ U(sigma_range)`` and ``ε ~ N(0, I)`` from its generator, takes the advantage within the group,
``A_pj = (r_pj - mean_j r_pj) / (std_j r_pj + adv_eps)`` (population std; a group whose rewards are
all equal has ``A = 0``), and applies the same loss with ``ℓ_old = ℓ_ref``, averaged over the rows with
``A ≠ 0`` as the online trainer drops zero-advantage samples (DESIGN.md §7: a tied group neither pulls
nor pushes, and does not dilute the step either; a batch with no such row gives a zero loss that
keeps the graph). The ratio clip bounds
how far each stored sample's likelihood moves from the base model's, and ``kl_beta`` reuses the
same reference velocity. (A store generated with a LoRA, ``flowalign generate``'s ``lora:``, was not
drawn by the base: train it with ``lora.init_from`` set to that LoRA and ``lora.reference: init``, which
makes that LoRA's model the reference and so the old policy; with the base as reference the ratio is to
the base, as GDRO's implicit reward then is.)
``ema_beta`` is online only: the offline trainer keeps no EMA.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from flowalign.errors import ConfigError
from flowalign.advantages import nonzero_mask
from flowalign.objectives.base import OFFLINE_TRAINER, ONLINE_TRAINER, OfflineBatch, VelocityFn, register_objective, require_finite
from flowalign.objectives.diffusion_dpo import check_sigma_range, noised_and_target, sample_group_noise, sample_sigmas
from flowalign.objectives.nft import SIGMA_SAMPLING, ForwardBatch, add_reference_penalty, forward_rows, velocity_gap

__all__ = ["WEIGHTINGS", "matching_log_likelihood", "awm_policy_loss", "offline_group_advantages", "AdvantageWeightedMatching"]

WEIGHTINGS = ("uniform", "t", "t2", "ghuber")
_DELTA = 1e-10


def matching_log_likelihood(v: Tensor, v_target: Tensor, sigma: Tensor, weighting: str = "ghuber", power: float = 0.25) -> Tensor:
    """AWM's log-likelihood surrogate ``ℓ = -w(s)·φ(e)`` of each row (module docstring), ``[B]`` in fp64.

    Args:
        v: ``[B, *latent]`` predicted velocity at ``x_s``; v_target: ``[B, *latent]`` its target ``ε - x0``.
        sigma: ``[B]`` noise levels ``s``.
        weighting: ``"uniform"``, ``"t"``, ``"t2"`` or ``"ghuber"``; power: ``p`` of ghuber, in (0, 1].
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}; choose one of {WEIGHTINGS}")
    if v.shape != v_target.shape or sigma.shape != (v.shape[0],):
        raise ValueError(f"v {tuple(v.shape)} and v_target {tuple(v_target.shape)} must match and sigma {tuple(sigma.shape)} be [B]")
    err = (v.double() - v_target.double()).pow(2).flatten(1).mean(dim=1)  # [B]
    s = sigma.double()
    if weighting == "uniform":
        return -err
    if weighting == "t":
        return -s * err
    if weighting == "t2":
        return -s.pow(2) * err
    return -s * ((err + _DELTA).pow(power) - _DELTA ** power) / power


def awm_policy_loss(log_lik: Tensor, old_log_lik: Tensor, advantages: Tensor, clip_range: float) -> tuple[Tensor, Tensor]:
    """Per-row clipped surrogate ``max(-Â·ρ, -Â·clip(ρ, 1 ± ε))`` with ``ρ = exp(ℓ - ℓ_old)``; returns (loss ``[B]``, ρ ``[B]``)."""
    if not log_lik.shape == old_log_lik.shape == advantages.shape:
        raise ValueError(f"log_lik {tuple(log_lik.shape)}, old_log_lik {tuple(old_log_lik.shape)} and advantages "
                         f"{tuple(advantages.shape)} must all be [B]")
    ratio = torch.exp(log_lik - old_log_lik.detach())  # [B]
    adv = advantages.to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def offline_group_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """Advantages of an offline batch's groups: ``(r - mean) / (std + eps)`` along ``k`` (population std), ``[P, k]`` fp64.

    A group whose rewards are all equal gets exactly 0 (its std is 0 and so is every ``r - mean``)."""
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [P, k] with k >= 2, got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():  # as gdro and diffusion_dpo: a NaN would make the whole loss NaN
        raise ValueError("awm got non-finite explicit rewards")
    r = rewards.double()
    centred = r - r.mean(dim=1, keepdim=True)  # not exactly 0 for a tied group of fp64 values such as 0.1
    tied = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    centred = torch.where(tied, torch.zeros_like(centred), centred)
    return centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps)


def is_awm(name: str) -> bool:
    """True when objective ``name`` (registered, entry point or dotted path) is AWM or a subclass of it: the checks
    that AWM's old policy and its sigma draws need follow the class, not the name."""
    from flowalign.objectives import OBJECTIVES, resolve_objective

    try:
        cls = OBJECTIVES[resolve_objective(name)]
    except ConfigError:
        return False
    return isinstance(cls, type) and issubclass(cls, AdvantageWeightedMatching)


@register_objective("awm")
class AdvantageWeightedMatching:
    """AWM objective (arXiv 2509.25050) over a :class:`~flowalign.objectives.nft.ForwardBatch` (``flowalign train``)
    or an :class:`~flowalign.objectives.base.OfflineBatch` (``flowalign offline``); see the module docstring.

    Args:
        num_timesteps: forward-process draws per sample and iteration (read by the trainer).
        sigma_sampling: ``"grid"`` (the sampler's sigmas) or ``"uniform"`` (read by the trainer).
        weighting: the likelihood surrogate's weighting (the official GenEval recipe: ``"ghuber"``).
        ghuber_power: ``p`` of the ghuber weighting (official: 0.25).
        advantage_max: advantages are clipped to ``±adv_clip`` and rescaled to ``±advantage_max`` (official: 1).
        clip_range: PPO clip ``ε`` on the ratio (official: 1, i.e. barely clipped; with one optimizer
            step per iteration ``ρ = 1`` and the clip never acts).
        kl_beta: weight of ``mean ‖v_θ - v_ref‖²`` to the reference (LoRA off); official 0.003.
        ema_beta: online only: weight of ``mean ‖v_θ - v_ema‖²`` to an EMA of the trained LoRA.
        ema_target: which EMA: ``"train_ema"`` (``train.ema``'s, the one evaluated and saved; needs ``train.ema``) or
            ``"kl_ema"``, the official recipe's own copy, ``ema <- d·ema + (1 - d)·θ`` after each iteration with
            ``d = min(kl_ema_decay, kl_ema_rate · optimizer steps)`` (``kl_ema_rate`` None: ``d = kl_ema_decay``).
        kl_ema_decay, kl_ema_rate: that copy's schedule (official: 0.3 and 0.001, "linear").
        adv_clip: ``c`` of the advantage clip.
        sigma_range: offline only: ``s ~ U(sigma_range)`` per row and step (online, the trainer draws the sigmas).
        adv_eps: offline only: ``eps`` of the within-group advantage normalisation.
        generator: offline only: the ``torch.Generator`` of the sigma and noise draws (the offline trainer's).
    """

    name = "awm"
    forward_process = True  # online, the trainer builds ForwardBatch rows from clean samples
    trained_by = (ONLINE_TRAINER, OFFLINE_TRAINER)  # offline: groups of a rollout store (OfflineBatch)

    def __init__(self, num_timesteps: int = 2, sigma_sampling: str = "grid", weighting: str = "ghuber", ghuber_power: float = 0.25,
                 advantage_max: float = 1.0, clip_range: float = 1.0, kl_beta: float = 0.0, adv_clip: float = 5.0,
                 sigma_range: tuple[float, float] = (0.0, 1.0), adv_eps: float = 1e-4, generator: Optional[torch.Generator] = None,
                 ema_beta: float = 0.0, ema_target: str = "train_ema", kl_ema_decay: float = 0.3, kl_ema_rate: Optional[float] = 0.001):
        require_finite(type(self).__name__, {k: v for k, v in locals().items() if k != "self"})
        if num_timesteps < 1 or adv_clip <= 0 or advantage_max <= 0 or clip_range <= 0 or kl_beta < 0 or adv_eps <= 0 or ema_beta < 0:
            raise ValueError(f"need num_timesteps >= 1, adv_clip > 0, advantage_max > 0, clip_range > 0, kl_beta >= 0, adv_eps > 0, "
                             f"ema_beta >= 0; got {num_timesteps}, {adv_clip}, {advantage_max}, {clip_range}, {kl_beta}, {adv_eps}, {ema_beta}")
        sigma_range = check_sigma_range(sigma_range)
        if sigma_sampling not in SIGMA_SAMPLING:
            raise ValueError(f"sigma_sampling={sigma_sampling!r}; choose one of {SIGMA_SAMPLING}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}; choose one of {WEIGHTINGS}")
        if not 0.0 < ghuber_power <= 1.0:
            raise ValueError(f"ghuber_power must be in (0, 1], got {ghuber_power}")
        if ema_target not in ("train_ema", "kl_ema"):
            raise ValueError(f"ema_target={ema_target!r}; choose 'train_ema' or 'kl_ema'")
        if not 0.0 <= kl_ema_decay < 1.0 or (kl_ema_rate is not None and kl_ema_rate < 0):
            raise ValueError(f"need 0 <= kl_ema_decay < 1 and kl_ema_rate >= 0 (or None); got {kl_ema_decay}, {kl_ema_rate}")
        self.ema_target = ema_target
        self.kl_ema_decay = float(kl_ema_decay)
        self.kl_ema_rate = None if kl_ema_rate is None else float(kl_ema_rate)
        self.num_timesteps = int(num_timesteps)
        self.sigma_sampling = sigma_sampling
        self.weighting = weighting
        self.ghuber_power = float(ghuber_power)
        self.advantage_max = float(advantage_max)
        self.clip_range = float(clip_range)
        self.kl_beta = float(kl_beta)
        self.adv_clip = float(adv_clip)
        self.sigma_range = sigma_range
        self.adv_eps = float(adv_eps)
        self.generator = generator
        self.ema_beta = float(ema_beta)

    @property
    def needs_reference(self) -> bool:
        """Online, only the KL term (``kl_beta > 0``) reads the reference (offline it is the old policy too)."""
        return self.kl_beta > 0

    @property
    def needs_ema(self) -> bool:
        """Whether the trainer must fill ``ForwardBatch.v_ema`` (the EMA penalty, ``ema_beta > 0``)."""
        return self.ema_beta > 0

    @property
    def kl_ema(self) -> Optional[tuple[Optional[float], float]]:
        """``(rate, max decay)`` of the penalty's own EMA copy the trainer keeps (``ema_target="kl_ema"``), else None
        (the penalty reads ``train.ema``'s EMA)."""
        return (self.kl_ema_rate, self.kl_ema_decay) if self.needs_ema and self.ema_target == "kl_ema" else None

    def loss(self, batch: Union[ForwardBatch, OfflineBatch], policy: VelocityFn,
             reference: Optional[VelocityFn] = None) -> tuple[Tensor, dict[str, float]]:
        """Mean loss over the rows of ``batch`` (a ForwardBatch, or an OfflineBatch: :meth:`offline_loss`);
        ``policy(x, sigma[B]) -> v`` with grad."""
        if isinstance(batch, OfflineBatch):
            return self.offline_loss(batch, policy, reference)
        # 1. forward process: x_s = (1 - s) x0 + s eps, target v = eps - x0; the trained and the old velocity
        x_s, v_target, v_theta, v_old = forward_rows(batch, policy)  # [B, *latent] each
        # 2.-3. likelihood surrogates of the trained and the sampling policy, advantage-weighted and PPO-clipped
        loss, metrics = self._clipped_surrogate(v_theta, v_old, v_target, batch.sigma, batch.advantages)
        # 4. optional penalty to the reference (the official code's uniform ‖v_θ - v_ref‖²)
        loss = add_reference_penalty(loss, metrics, v_theta, x_s, batch.sigma, reference, self.kl_beta)
        # 5. optional penalty to the EMA of the trained LoRA (the official recipe's second KL term)
        if self.ema_beta > 0:
            if batch.v_ema is None:
                raise ValueError("ema_beta > 0 needs ForwardBatch.v_ema (the trainer fills it when train.ema is on)")
            ema_gap = velocity_gap(v_theta, batch.v_ema.detach())
            metrics["awm/ema_gap"] = float(ema_gap.detach())
            loss = loss + self.ema_beta * ema_gap
        metrics["loss/total"] = float(loss.detach())
        return loss, metrics

    def _clipped_surrogate(self, v_theta: Tensor, v_old: Tensor, v_target: Tensor, sigma: Tensor,
                           advantages: Tensor) -> tuple[Tensor, dict[str, float]]:
        """``mean_i max(-Â_i·ρ_i, -Â_i·clip(ρ_i, 1 ± ε))`` with ``ρ = exp(ℓ(v_θ) - ℓ(v_old))`` and
        ``Â = clip(A, -c, c) · advantage_max / c`` (all rows ``[B]``), and its metrics."""
        log_lik = matching_log_likelihood(v_theta, v_target, sigma, self.weighting, self.ghuber_power)  # [B]
        with torch.no_grad():
            old_log_lik = matching_log_likelihood(v_old, v_target, sigma, self.weighting, self.ghuber_power)  # [B]
        adv = advantages.double().clamp(-self.adv_clip, self.adv_clip) * (self.advantage_max / self.adv_clip)  # [B]
        per_row, ratio = awm_policy_loss(log_lik, old_log_lik, adv, self.clip_range)
        loss = per_row.mean().float()
        with torch.no_grad():
            metrics = {
                "loss/policy": float(loss),
                "awm/ratio_mean": float(ratio.mean()),
                "awm/clipfrac": float(((ratio - 1.0).abs() > self.clip_range).double().mean()),
                "awm/fm_error": float((v_theta.float() - v_target.float()).pow(2).mean()),
            }
        return loss, metrics

    def offline_loss(self, batch: OfflineBatch, policy: VelocityFn, reference: Optional[VelocityFn],
                     sigma: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> tuple[Tensor, dict[str, float]]:
        """The loss over an :class:`OfflineBatch` (``x0 [P, k, *latent]``, ``rewards [P, k]``), the old policy being
        ``reference`` (module docstring). ``policy`` / ``reference`` are called once on all ``P·k`` rows ``p·k + j``.

        ``sigma [P, k]`` and ``noise [P, k, *latent]`` may be passed (tests); else they are drawn from ``generator``.
        """
        if reference is None:
            raise ValueError("offline AWM needs the reference velocity (the policy that generated the store)")
        x0 = batch.x0
        if x0.dim() < 3 or batch.rewards.shape != x0.shape[:2]:
            raise ValueError(f"OfflineBatch: x0 must be [P, k, *latent] and rewards [P, k]; got {tuple(x0.shape)}, {tuple(batch.rewards.shape)}")
        P, k = x0.shape[:2]
        if sigma is None:  # one sigma and one noise per stored sample (not per group: no pairs are compared)
            sigma = sample_sigmas(P, k, per_sample=True, sigma_range=self.sigma_range, generator=self.generator, device=x0.device)
        if noise is None:
            noise = sample_group_noise(x0, per_sample=True, generator=self.generator)
        flat_sigma = sigma.to(x0.device).reshape(P * k)
        # 1. forward process of every stored sample: x_s = (1 - s) x0 + s eps, target v = eps - x0
        x_s, v_target = noised_and_target(x0.flatten(0, 1), noise.to(device=x0.device, dtype=x0.dtype).flatten(0, 1), flat_sigma)
        v_theta = policy(x_s, flat_sigma)  # [P*k, *latent]
        with torch.no_grad():
            v_ref = reference(x_s, flat_sigma)
        # 2.-3. within-group advantages; the surrogates of the trained and the generating (reference) policy, clipped
        adv = offline_group_advantages(batch.rewards.to(x0.device), self.adv_eps).reshape(P * k)  # [P*k]
        informative = nonzero_mask(adv)  # rows of tied groups (A = 0) are left out of the mean, as online
        if informative.any():
            loss, metrics = self._clipped_surrogate(v_theta[informative], v_ref[informative], v_target[informative],
                                                    flat_sigma[informative], adv[informative])
        else:
            loss, metrics = v_theta.sum() * 0.0, {"loss/policy": 0.0}
        metrics["awm/informative_rows"] = float(informative.sum())
        metrics["awm/sigma_mean"] = float(flat_sigma.float().mean())
        # 4. the velocity gap to the reference (logged), a penalty when kl_beta > 0: the same reference forward
        gap = velocity_gap(v_theta, v_ref)
        metrics["kl/ref"] = float(gap.detach())
        if self.kl_beta > 0:
            loss = loss + self.kl_beta * gap
        metrics["loss/total"] = float(loss.detach())
        return loss, metrics
