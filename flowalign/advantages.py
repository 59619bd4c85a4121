"""Group-relative advantages (DESIGN.md §7): pure tensor functions, no model inside.

GRPO (Shao et al., arXiv 2402.03300 §4.1.2; Flow-GRPO arXiv 2505.05470 Eq. 3) normalises each
sample's reward within its group (the G samples drawn for one prompt):

    A_i = (r_i - mean_{g(i)}) / (std_{g(i)} + eps)

``std`` is the population standard deviation (ddof = 0, as ``np.std`` in Flow-GRPO). A group
whose rewards are all equal gets exactly zero advantage (not ``0/eps`` round-off), so it is
recognisably "nothing to learn" and :func:`nonzero_mask` drops it.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

STD_MODES = ("group", "global", "none")


def _group_index(group_ids: Tensor, batch: int, device: torch.device) -> tuple[Tensor, int]:
    """``group_ids[B]`` (any ids) -> (dense index [B] in 0..G-1, G)."""
    group_ids = torch.as_tensor(group_ids, device=device)
    if group_ids.ndim != 1 or group_ids.shape[0] != batch:
        raise ValueError(f"group_ids must be [B]={batch}, got shape {tuple(group_ids.shape)}")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max()) + 1 if batch else 0


def _group_extremes(values: Tensor, idx: Tensor, G: int) -> tuple[Tensor, Tensor]:
    """Per-group max and min ``[G]`` of ``values [n]`` whose rows belong to groups ``idx [n]`` (in 0..G-1);
    ``-inf`` / ``inf`` for a group without a row."""
    hi = torch.full((G,), -torch.inf, dtype=values.dtype, device=values.device).scatter_reduce(0, idx, values, "amax")
    lo = torch.full((G,), torch.inf, dtype=values.dtype, device=values.device).scatter_reduce(0, idx, values, "amin")
    return hi, lo


def _as_float(values) -> Tensor:
    """``values`` as a floating tensor, fp64 kept (fp32 rounding would tie rewards that differ below its resolution)."""
    t = torch.as_tensor(values)
    return t if t.dtype == torch.float64 else t.float()


def _normalise_columns(values: Tensor, group_ids: Tensor, std: str, eps: float, clip: Optional[float]) -> Tensor:
    """Group-normalise every column of ``values[B, M]`` independently -> ``[B, M]``."""
    if std not in STD_MODES:
        raise ValueError(f"std={std!r}; choose one of {STD_MODES}")
    if not (eps >= 0 and math.isfinite(eps)):  # NaN fails every comparison: it silently meant no normalisation
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if clip is not None and not clip > 0:  # a negative clip gave every sample -clip; NaN made every advantage NaN
        raise ValueError(f"clip must be None or > 0, got {clip}")
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        raise ValueError(f"rewards hold {int((~finite).sum())} non-finite value(s) of {values.numel()}: a NaN marks a dropped "
                         "sample (call_reward's on_error='drop'); use kept_group_advantages, which leaves those out")
    # fp64 inside (fp32 on MPS, which has no fp64): squares of large rewards stay finite, and means of equal values exact
    work = torch.float32 if values.device.type == "mps" else torch.float64
    values = values.to(work)
    B, M = values.shape
    idx, G = _group_index(group_ids, B, values.device)
    col = idx[:, None].expand(B, M)  # [B, M]
    count = torch.bincount(idx, minlength=G).to(work)[:, None]  # [G, 1]
    mean = torch.zeros(G, M, dtype=work, device=values.device).scatter_add_(0, col, values) / count  # [G, M]
    dev = values - mean[idx]  # [B, M]
    g_max = torch.full((G, M), -torch.inf, dtype=work, device=values.device).scatter_reduce(0, col, values, "amax")
    g_min = torch.full((G, M), torch.inf, dtype=work, device=values.device).scatter_reduce(0, col, values, "amin")
    dev = torch.where((g_max == g_min)[idx], torch.zeros_like(dev), dev)  # all-equal group -> exactly 0
    if std == "group":
        var = torch.zeros(G, M, dtype=work, device=values.device).scatter_add_(0, col, dev**2) / count
        scale = var.sqrt()[idx] + eps  # [B, M]
    elif std == "global":
        scale = values.std(dim=0, unbiased=False, keepdim=True) + eps  # [1, M]
    else:
        scale = torch.ones_like(dev)
    adv = dev / torch.where(scale > 0, scale, torch.ones_like(scale))  # eps = 0 and a flat group: 0, not 0/0
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.float()


def group_advantages(
    rewards: Tensor, group_ids: Tensor, std: str = "group", eps: float = 1e-4, clip: Optional[float] = None
) -> Tensor:
    """Per-sample GRPO advantage (arXiv 2402.03300 §4.1.2).

    A_i = (r_i - mean_g) / (std + eps), std = the group's (``"group"``), the whole batch's
    (``"global"``, Flow-GRPO's ``global_std``) or 1 (``"none"``: mean-centring only, Dr. GRPO
    style); then clamped to ``[-clip, clip]`` if ``clip`` is given.

    Args:
        rewards: ``[B]`` rewards.
        group_ids: ``[B]`` ids; samples with the same id are one group.

    Returns:
        ``[B]`` fp32 advantages; exactly 0 for samples of a group whose rewards are all equal.

    Raises:
        ValueError: a reward is NaN or infinite (for dropped samples use :func:`kept_group_advantages`).
    """
    rewards = torch.as_tensor(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    return _normalise_columns(rewards[:, None], group_ids, std, eps, clip)[:, 0]


def kept_group_advantages(rewards: Tensor, group_ids: Tensor, std: str = "group", eps: float = 1e-4,
                          clip: Optional[float] = None) -> Tensor:
    """:func:`group_advantages` over the kept samples only: a dropped sample (NaN reward, as
    ``call_reward(..., on_error="drop")`` returns it) gets advantage 0 and is left out of its group's
    mean and std (and of the batch's, for ``std="global"``). ``[B]`` fp32."""
    rewards = torch.as_tensor(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    return kept_multi_reward_advantages({"reward": rewards}, group_ids, {"reward": 1.0}, std=std, eps=eps, clip=clip)


def per_step_advantages(
    step_rewards: Tensor, group_ids: Tensor, std: str = "group", eps: float = 1e-4, clip: Optional[float] = None
) -> Tensor:
    """Per-step advantages for dense rewards (DenseGRPO arXiv 2601.20218, TP-GRPO arXiv 2602.06422).

    A_{i,k} = (r_{i,k} - mean_{j in g(i)} r_{j,k}) / (std_k + eps): each step index k is normalised
    across the group separately (``"global"``: std over the whole batch at step k).

    Args:
        step_rewards: ``[B, K]`` reward of step k of sample i.
        group_ids: ``[B]``.

    Returns:
        ``[B, K]`` fp32.
    """
    step_rewards = torch.as_tensor(step_rewards)
    if step_rewards.ndim != 2:
        raise ValueError(f"step_rewards must be [B, K], got shape {tuple(step_rewards.shape)}")
    return _normalise_columns(step_rewards, group_ids, std, eps, clip)


def multi_reward_advantages(
    rewards: Union[Mapping[str, Tensor], Tensor],
    group_ids: Tensor,
    weights: Union[Mapping[str, float], Sequence[float], None] = None,
    std: str = "group",
    eps: float = 1e-4,
    clip: Optional[float] = None,
) -> Tensor:
    """Sum of separately normalised advantages: A = sum_m w_m · group_advantages(r_m).

    Used to mix rewards on the advantage level (each reward normalised on its own scale) and for
    G²RPO's multi-granularity sum over strides (pass one "reward" per stride).

    Args:
        rewards: ``{name: [B]}`` or ``[B, M]``.
        weights: ``{name: w}`` (missing names weigh 1), a sequence of M weights, or None (all 1).
        clip: applied to the weighted sum.

    Returns:
        ``[B]`` fp32.
    """
    if isinstance(rewards, Mapping):
        names = list(rewards)
        if not names:
            raise ValueError("rewards is empty")
        stacked = torch.stack([_as_float(rewards[n]) for n in names], dim=1)  # [B, M]
        if isinstance(weights, Mapping):
            unknown = set(weights) - set(names)
            if unknown:
                raise ValueError(f"weights name rewards that are not given: {sorted(unknown)}; rewards: {names}")
            w = [float(weights.get(n, 1.0)) for n in names]
        else:
            w = [1.0] * len(names) if weights is None else [float(x) for x in weights]
    else:
        stacked = _as_float(rewards)
        if stacked.ndim != 2:
            raise ValueError(f"rewards must be a dict of [B] or a [B, M] tensor, got shape {tuple(stacked.shape)}")
        w = [1.0] * stacked.shape[1] if weights is None else [float(x) for x in weights]
    if len(w) != stacked.shape[1]:
        raise ValueError(f"{len(w)} weights for {stacked.shape[1]} rewards")
    adv = _normalise_columns(stacked, group_ids, std, eps, None)  # [B, M]
    total = adv @ torch.tensor(w, device=adv.device)  # [B]
    return total.clamp(-clip, clip) if clip is not None else total


def kept_multi_reward_advantages(
    rewards: Mapping[str, Tensor],
    group_ids: Tensor,
    weights: Mapping[str, float],
    std: str = "group",
    eps: float = 1e-4,
    clip: Optional[float] = None,
) -> Tensor:
    """:func:`multi_reward_advantages` over the kept samples only: a sample whose reward is NaN under any of the
    rewards (dropped) gets advantage 0 and is left out of every reward's group mean and std. ``[B]`` fp32.

    A = clip(sum_m w_m · group_advantages(r_m over the kept samples)).
    """
    names = list(rewards)
    if not names:
        raise ValueError("rewards is empty")
    stacked = torch.stack([_as_float(rewards[n]) for n in names], dim=1)  # [B, M]
    if bool(torch.isinf(stacked).any()):
        raise ValueError("rewards hold inf: only NaN marks a dropped sample")
    kept = ~stacked.isnan().any(dim=1)
    adv = torch.zeros(stacked.shape[0], dtype=torch.float32, device=stacked.device)
    if kept.any():
        group_ids = torch.as_tensor(group_ids, device=stacked.device)
        adv[kept] = multi_reward_advantages(stacked[kept], group_ids[kept], weights=[float(weights.get(n, 1.0)) for n in names],
                                            std=std, eps=eps, clip=clip)
    return adv


def nonzero_mask(advantages: Tensor) -> Tensor:
    """``[B]`` bool: True for samples with any non-zero advantage (others are dropped from the update).

    ``advantages`` is ``[B]`` or ``[B, K, ...]`` (a sample is kept if any of its steps is non-zero).
    """
    advantages = torch.as_tensor(advantages)
    if advantages.ndim == 1:
        return advantages != 0
    return (advantages != 0).flatten(1).any(dim=1)


def first_informative_groups(keep: Tensor, group_ids: Tensor, max_groups: int, rank: Optional[Tensor] = None) -> Tensor:
    """``keep [B]`` limited to the first ``max_groups`` groups, in order of first appearance (or of
    ``rank``), that have a kept sample: DAPO's dynamic sampling (Yu et al., arXiv 2503.14476, §3.2)
    over a batch drawn larger than the update needs, so that the update sees up to ``max_groups``
    groups with a learning signal however many groups came out all equal.

    Args:
        keep: ``[B]`` bool, a sample's reward is kept and its advantage non-zero (the trainer's mask).
        group_ids: ``[B]`` group of each sample (any ids; a group is identified by its id).
        max_groups: groups to keep at most (>= 0).
        rank: ``[B]`` integer draw position of each row's group (the same for a group's rows); groups
            are taken by their lowest rank instead of their first row. The trainer ranks groups in the
            order one process would draw them, whatever order the processes' rows were gathered in.
    """
    keep = torch.as_tensor(keep, dtype=torch.bool)
    if keep.ndim != 1:
        raise ValueError(f"keep must be [B], got shape {tuple(keep.shape)}")
    if max_groups < 0:
        raise ValueError(f"max_groups must be >= 0, got {max_groups}")
    batch = keep.shape[0]
    idx, G = _group_index(group_ids, batch, keep.device)
    if G == 0:
        return keep.clone()
    has_kept = torch.zeros(G, dtype=torch.bool, device=keep.device).index_put_((idx,), keep, accumulate=True)  # [G]
    if rank is None:
        position = torch.arange(batch, device=keep.device)
    else:
        position = torch.as_tensor(rank, device=keep.device).long()
        if position.shape != (batch,):
            raise ValueError(f"rank must be [B]={batch}, got shape {tuple(position.shape)}")
    first_row = torch.full((G,), torch.iinfo(torch.int64).max, device=keep.device).scatter_reduce(0, idx, position, "amin")
    in_order = torch.argsort(first_row, stable=True)  # groups by first appearance (lowest rank)
    chosen = torch.zeros(G, dtype=torch.bool, device=keep.device)
    chosen[in_order[has_kept[in_order]][:max_groups]] = True
    return keep & chosen[idx]


def groups_with_spread(values: Union[Tensor, Mapping[str, Tensor]], group_ids: Tensor, keep: Optional[Tensor] = None) -> int:
    """Number of groups whose kept, finite values are not all equal: the groups a group-relative
    advantage can learn from. DAPO's sample-until-full (the trainer's ``train.max_sampling_rounds``)
    counts them to decide whether to roll out more prompts.

    Args:
        values: ``[B]`` rewards, or ``{name: [B]}`` several rewards (a group counts when any of them
            differs within it: ``objective.reward_mix: advantage`` normalises each on its own).
        group_ids: ``[B]`` group of each sample (any ids).
        keep: ``[B]`` bool, samples to consider (None = every sample); NaN values never count.
    """
    columns = list(values.values()) if isinstance(values, Mapping) else [values]
    if not columns:
        return 0
    batch = torch.as_tensor(columns[0]).shape[0]
    idx, G = _group_index(group_ids, batch, torch.device("cpu"))
    keep = torch.ones(batch, dtype=torch.bool) if keep is None else torch.as_tensor(keep, dtype=torch.bool).cpu()
    spread = torch.zeros(G, dtype=torch.bool)
    for column in columns:
        v = torch.as_tensor(column).double().cpu()
        if v.shape != (batch,):
            raise ValueError(f"values must all be [B]={batch}, got shape {tuple(v.shape)}")
        ok = keep & torch.isfinite(v)
        hi, lo = _group_extremes(v[ok], idx[ok], G)
        spread |= hi > lo
    return int(spread.sum())


def zero_variance_fraction(rewards: Tensor, group_ids: Tensor) -> float:
    """Fraction of groups whose rewards are all equal (no learning signal); the trainer logs it."""
    rewards = torch.as_tensor(rewards).float()
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    idx, G = _group_index(group_ids, rewards.shape[0], rewards.device)
    if G == 0:
        return 0.0
    g_max, g_min = _group_extremes(rewards, idx, G)
    return float((g_max == g_min).float().mean())


def flat_group_ends(rewards: Tensor, group_ids: Tensor) -> tuple[float, float]:
    """``(at max, at min)``: the fractions of groups whose rewards are all equal *and* equal to the batch's highest
    (saturated: every sample as good as any) or lowest reward (every sample as bad as any). Together with
    :func:`zero_variance_fraction` they tell a flat batch of solved prompts from one of hopeless ones. NaN (dropped)
    rewards are left out; ``(0, 0)`` for an empty batch."""
    rewards = torch.as_tensor(rewards).detach().cpu().double()
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    idx, G = _group_index(torch.as_tensor(group_ids).cpu(), rewards.shape[0], rewards.device)
    keep = ~torch.isnan(rewards)
    if not bool(keep.any()):
        return 0.0, 0.0
    hi, lo = _group_extremes(rewards[keep], idx[keep], G)  # a group without a kept row: -inf / inf, never flat
    flat = hi == lo
    return float((flat & (hi == rewards[keep].max())).sum()) / G, float((flat & (lo == rewards[keep].min())).sum()) / G


def mean_group_std(rewards: Tensor, group_ids: Tensor) -> float:
    """Mean over groups of the population std of each group's rewards (NaN = dropped, left out; a group with
    one kept sample has std 0; a group with none is skipped; NaN when no group has a kept sample).

    The spread GRPO learns from: ``reward/std`` over the whole batch mostly measures how prompts differ.
    """
    rewards = torch.as_tensor(rewards).detach().cpu().double()  # a logged figure: on the CPU in fp64, from any device
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    idx, G = _group_index(torch.as_tensor(group_ids).cpu(), rewards.shape[0], rewards.device)
    kept = torch.isfinite(rewards)
    if G == 0 or not bool(kept.any()):
        return float("nan")
    values = torch.where(kept, rewards, torch.zeros_like(rewards))
    zeros = torch.zeros(G, dtype=torch.float64, device=rewards.device)
    count = zeros.scatter_add(0, idx, kept.double())
    mean = zeros.scatter_add(0, idx, values) / count.clamp(min=1)
    sq = torch.where(kept, (rewards - mean[idx]) ** 2, torch.zeros_like(rewards))
    var = zeros.scatter_add(0, idx, sq) / count.clamp(min=1)
    return float(var.sqrt()[count > 0].mean())
