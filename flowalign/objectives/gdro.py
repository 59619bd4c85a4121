"""GDRO: group-level direct reward optimisation (Wang et al., arXiv 2601.02036; DESIGN.md §8).

Offline and sampler-independent: for each group of ``k`` clean latents of one prompt, noise every
latent to a sigma (shared by the group by default), read the DPO-style **implicit reward**

    s_i = -β ( ‖v_i - v_θ(x_s,i, s)‖² - ‖v_i - v_ref(x_s,i, s)‖² )     (errors: mean over latent dims)

and fit its Plackett–Luce ranking distribution to soft targets built from the explicit rewards:
sort the group by explicit reward (descending); at position ``i`` the target over the remaining
items ``j >= i`` is ``q_i(j) = softmax_j(r_j / τ)``; the loss is

    L = Σ_i [ logsumexp_{m>=i} s_m - Σ_{j>=i} q_i(j) s_j ]  +  γ · ‖v - v_θ‖²(top sample)

i.e. a sum of cross-entropies ``CE(q_i, softmax_{m>=i}(s))``, averaged over the groups whose
explicit rewards are not all equal. A fully tied group carries no ranking (its targets would be
uniform, a pull of its implicit rewards towards each other) and its "top" sample is arbitrary, so
it is left out of both terms, as the online trainer drops zero-advantage samples (DESIGN.md §7) and
Diffusion-DPO drops tied pairs; a batch of tied groups only gives a zero loss that keeps the graph.
With ``k = 2``, ``τ → 0`` and ``γ = 0`` this is exactly Diffusion-DPO with the same ``β`` (see
``diffusion_dpo.py``), tied groups included.
Defaults follow the paper: ``k = 6``, ``τ = 0.05``, ``β = 6``, ``γ = 1``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from flowalign.objectives.base import OFFLINE_TRAINER, OfflineBatch, VelocityFn, register_objective, require_finite
from flowalign.objectives.diffusion_dpo import check_sigma_range, noised_and_target, random_tie_order, sample_group_noise, sample_sigmas, velocity_errors

__all__ = ["implicit_rewards", "plackett_luce_targets", "gdro_listwise_loss", "GDRO"]


def implicit_rewards(err: Tensor, ref_err: Tensor, beta: float) -> Tensor:
    """DPO-style implicit reward ``s = -β (e_θ - e_ref)`` (GDRO §3, Diffusion-DPO Eq. 14).

    ``err``/``ref_err`` are velocity errors (mean over latent dims), any matching shape.
    """
    return -beta * (err - ref_err)


def _remaining_mask(k: int, device) -> Tensor:
    """``[k, k]`` bool, ``M[i, j] = j >= i`` (items still unranked at position i)."""
    idx = torch.arange(k, device=device)
    return idx[None, :] >= idx[:, None]


def plackett_luce_targets(rewards: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Soft Plackett–Luce targets from explicit rewards (GDRO, listwise targets).

    Sort each group by reward, descending (stable, so ties keep their input order). At position
    ``i`` the target over the sorted items ``j >= i`` is ``q_i(j) = exp(r_j/τ) / Σ_{m>=i} exp(r_m/τ)``
    and 0 for ``j < i``: the Plackett–Luce probability of choosing ``j`` next given that the
    ``i`` best items were chosen first.

    Args:
        rewards: ``[P, k]`` explicit rewards.
        tau: temperature > 0 (``τ → 0`` gives one-hot targets on the sorted order).

    Returns:
        order ``[P, k]`` long (sorted position -> original index) and q ``[P, k, k]`` fp32 with
        rows ``i`` (position) and columns ``j`` (sorted position); each row sums to 1.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    r = rewards.float()
    order = torch.sort(r, dim=1, descending=True, stable=True).indices  # [P, k]
    r_sorted = torch.gather(r, 1, order)  # [P, k]
    k = r.shape[1]
    mask = _remaining_mask(k, r.device)  # [k, k]
    logits = (r_sorted / tau)[:, None, :].expand(-1, k, -1)  # [P, k(i), k(j)]
    logits = logits.masked_fill(~mask, float("-inf"))
    return order, torch.softmax(logits, dim=-1)


def gdro_listwise_loss(scores: Tensor, rewards: Tensor, tau: float) -> Tensor:
    """GDRO listwise loss per group, ``[P]``.

    ``L = Σ_i [ logsumexp_{m>=i} s_(m) - Σ_{j>=i} q_i(j) s_(j) ]`` with items in the order of
    descending explicit reward (``plackett_luce_targets``). ``scores`` are implicit rewards
    ``[P, k]`` (differentiable); ``rewards`` explicit rewards ``[P, k]``.
    """
    order, q = plackett_luce_targets(rewards, tau)  # [P, k], [P, k, k]
    s_sorted = torch.gather(scores.float(), 1, order)  # [P, k]
    k = s_sorted.shape[1]
    mask = _remaining_mask(k, s_sorted.device)
    s_rows = s_sorted[:, None, :].expand(-1, k, -1)  # [P, k(i), k(j)]
    lse = torch.logsumexp(s_rows.masked_fill(~mask, float("-inf")), dim=-1)  # [P, k]
    expected = (q * s_rows.masked_fill(~mask, 0.0)).sum(dim=-1)  # [P, k]
    return (lse - expected).sum(dim=1)


@register_objective("gdro")
class GDRO:
    """GDRO over an :class:`OfflineBatch` (groups ``[P, k]`` of clean latents + rewards).

    ``policy`` / ``reference`` are called once each on the flattened rows ``p * k + j``
    (``[P*k, *latent]``, sigma ``[P*k]``); the trainer binds the conditioning of
    ``batch.cond_index`` repeated ``k`` times. Sigma and noise are shared inside a group unless
    ``per_sample_sigma`` / ``per_sample_noise``; sigma ``~ U(sigma_range)``.

    ``reward_norm="group"`` (an extension, not in the paper) z-scores the explicit rewards within
    each group before the ``/τ`` softmax, so ``τ`` means the same for rewards of any scale (the
    paper's form, ``"none"``, suits rewards in [0, 1] with real spread, e.g. verifiers):
    ``(r - mean) / (std + reward_norm_eps)`` with the population std, as the online group advantages are
    normalised, so a near-tie (float noise of a reward) stays a near-tie instead of a full-confidence ranking.
    """

    needs_reference = True
    trained_by = OFFLINE_TRAINER  # from a rollout store, not in the online loop

    def __init__(
        self,
        beta: float = 6.0,
        tau: float = 0.05,
        gamma: float = 1.0,
        sigma_range: tuple[float, float] = (0.0, 1.0),
        per_sample_sigma: bool = False,
        per_sample_noise: bool = False,
        reward_norm: str = "none",
        reward_norm_eps: float = 1e-4,
        generator: Optional[torch.Generator] = None,
    ):
        require_finite(type(self).__name__, {k: v for k, v in locals().items() if k != "self"})
        if reward_norm not in ("none", "group"):
            raise ValueError(f"reward_norm must be 'none' or 'group', got {reward_norm!r}")
        if not reward_norm_eps > 0:
            raise ValueError(f"reward_norm_eps must be > 0, got {reward_norm_eps}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.beta, self.tau, self.gamma = beta, tau, gamma
        self.sigma_range = check_sigma_range(sigma_range)
        self.per_sample_sigma = per_sample_sigma
        self.per_sample_noise = per_sample_noise
        self.reward_norm, self.reward_norm_eps = reward_norm, float(reward_norm_eps)
        self.generator = generator

    def _tie_order(self, rewards: Tensor) -> Tensor:
        """``[P, k]`` a random order of each group's members when a ranked group holds tied rewards (so
        the stable sort breaks ties at random), else the identity (no draw: the generator stream is kept)."""
        return random_tie_order(rewards, self.generator)

    def loss(
        self,
        batch: OfflineBatch,
        policy: VelocityFn,
        reference: Optional[VelocityFn],
        sigma: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Mean over the groups with distinct rewards of the listwise loss plus ``γ`` times the top sample's FM loss.

        ``sigma [P, k]`` and ``noise [P, k, *latent]`` may be passed explicitly (tests, replay).
        """
        if reference is None:
            raise ValueError("gdro needs a reference velocity function, got None")
        x0, rewards = batch.x0, batch.rewards.float()  # [P, k, *latent], [P, k]
        if x0.shape[:2] != rewards.shape:
            raise ValueError(f"x0 groups {tuple(x0.shape[:2])} do not match rewards {tuple(rewards.shape)}")
        if not torch.isfinite(rewards).all():
            raise ValueError("gdro got non-finite explicit rewards")
        P, k = rewards.shape
        if sigma is None:
            sigma = sample_sigmas(P, k, self.per_sample_sigma, self.sigma_range, self.generator, x0.device)
        if noise is None:
            noise = sample_group_noise(x0, self.per_sample_noise, self.generator)
        flat_sigma = sigma.reshape(P * k)
        x_s, v = noised_and_target(x0.flatten(0, 1), noise.flatten(0, 1), flat_sigma)  # [P*k, *latent]
        err = velocity_errors(x_s, v, flat_sigma, policy).view(P, k)  # [P, k]
        with torch.no_grad():
            ref_err = velocity_errors(x_s, v, flat_sigma, reference).view(P, k)
        scores = implicit_rewards(err, ref_err, self.beta)  # [P, k]
        targets = rewards
        if self.reward_norm == "group":
            std = rewards.std(dim=1, keepdim=True, unbiased=False)
            targets = (rewards - rewards.mean(dim=1, keepdim=True)) / (std + self.reward_norm_eps)  # tied groups -> all 0
        # ties are ranked in a fresh random order each step (the stable sort would always rank them in
        # member order, and argmax always pick member 0 as the top: tied samples would get unequal pushes)
        perm = self._tie_order(rewards)  # [P, k]: member j of the shuffled group is member perm[:, j]
        listwise = gdro_listwise_loss(scores.gather(1, perm), targets.gather(1, perm), self.tau)  # [P]
        top = perm.gather(1, rewards.gather(1, perm).argmax(dim=1, keepdim=True))  # [P, 1]: a random one of the tied best
        fm_top = err.gather(1, top).squeeze(1)  # [P]
        distinct = rewards.max(dim=1).values > rewards.min(dim=1).values  # [P] groups with a ranking
        if distinct.any():
            listwise, fm_top = listwise[distinct], fm_top[distinct]
            loss = listwise.mean() + self.gamma * fm_top.mean()
        else:  # every group tied: nothing to rank (module docstring)
            loss = err.sum() * 0.0
            listwise = fm_top = loss.detach().reshape(1)

        with torch.no_grad():
            s_top = scores.gather(1, top).squeeze(1)
            s_bottom = scores.gather(1, rewards.argmin(dim=1, keepdim=True)).squeeze(1)
        metrics = {
            "gdro/loss": loss.item(),
            "gdro/listwise": listwise.mean().item(),
            "gdro/fm_top": fm_top.mean().item(),
            "gdro/implicit_reward_mean": scores.mean().item(),
            # no group to rank: undefined, not 0% (a 0 reads as a model that ranks every pair the wrong way)
            "gdro/implicit_acc": ((s_top > s_bottom)[distinct].float().mean().item() if distinct.any() else float("nan")),
            "gdro/frac_tied_groups": 1.0 - distinct.float().mean().item(),
            "gdro/sigma_mean": sigma.float().mean().item(),
        }
        return loss, metrics
