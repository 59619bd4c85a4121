"""Dense step rewards for flow-matching RL (DESIGN.md §6): estimators, step gains, turning points,
credit assignment and DenseGRPO's noise calibration. Pure functions; models enter only as callables.

Indexing: a rollout has K steps; ``R[:, k]`` (k = 0..K) is the reward attributed to the latent
*after* k steps (``R[:, 0]``: the deterministic completion from the initial noise x_T;
``R[:, K]``: the final sample's reward). Step k (1-based, as in the papers) is the transition
``latents[:, k-1] -> latents[:, k]``; it is column ``k-1`` of every ``[B, K]`` tensor here, and
its gain is ``r_k = R_k - R_{k-1}``.

Callables used by the estimators (the trainer binds prompts / conditioning by sample index):

* ``velocity_fn(x[N, *latent], sigma[N], index[N]) -> v[N, *latent]`` where ``index`` says which of
  the B samples (hence which prompt's conditioning) each row belongs to;
* ``decode_fn(latents[N, *latent]) -> images[N, ...]``;
* ``reward_fn(images[N, ...], index[N]) -> scores[N]``.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from flowalign import sde
from flowalign.advantages import per_step_advantages

logger = logging.getLogger(__name__)

VelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]
DecodeFn = Callable[[Tensor], Tensor]
RewardFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# step gains and turning points
# --------------------------------------------------------------------------------------------


def _check_R(R: Tensor) -> Tensor:
    R = torch.as_tensor(R)
    if R.ndim != 2 or R.shape[1] < 2:
        raise ValueError(f"R must be [B, K+1] with K >= 1, got shape {tuple(R.shape)}")
    if not torch.isfinite(R).all():
        raise ValueError("R has non-finite entries (steps left out of the estimator?); pass finite rewards")
    return R.float()


def step_gains(R: Tensor) -> Tensor:
    """Step-wise reward gains r_k = R_k - R_{k-1} (DenseGRPO, arXiv 2601.20218).

    ``R[B, K+1]`` -> ``[B, K]``; the gains telescope: sum_k r_k = R_K - R_0.
    """
    R = _check_R(R)
    return R[:, 1:] - R[:, :-1]


def turning_points(R: Tensor, balance: bool = False) -> tuple[Tensor, Tensor]:
    """TP-GRPO turning points and replaced step rewards (Tong et al., arXiv 2602.06422).

    With r_k = R_k - R_{k-1} and the overall trend g = sign(R_K - R_0), step k (1-based) is a
    turning point when

    * k > 1:  sign(r_{k-1})·g < 0  and  sign(r_k)·g > 0  and  sign(r_k)·sign(R_K - R_k) > 0
      (the previous step went against the trend, this one turns back to it, and the reward keeps
      moving the same way until the end);
    * k = 1:  sign(r_1)·sign(R_K - R_1) > 0.

    "sign(a) = sign(b)" of DESIGN.md §6 is read strictly, as in the authors' code: both signs are
    non-zero, so a step after which the reward does not move any more (R_k = R_K, e.g. the last
    step) is never a turning point, and no k > 1 turning point exists when R_K = R_0.
    A turning point's reward becomes the aggregated long-term reward R_K - R_{k-1}; other steps keep
    r_k. The replacement always has the sign of r_k (it is r_k + (R_K - R_k), both of that sign).

    ``balance=True`` (the authors' balanced bonus, ``use_balanced_bonus`` with ``use_delta_global``): over
    the rows given, if there are P > 0 positive and N > 0 negative replacements, keep the min(P, N) of each
    sign whose row has the largest overall change |R_K - R_0| (ties, such as two turning points of one row:
    the earlier row-major position wins); the others revert to ordinary steps. A replacement's sign is
    always its row's trend sign(R_K - R_0). The authors' code balances each sampling batch on its own (9
    images on one GPU in their launch scripts); the trainer passes the whole iteration's rows, every
    process's (:func:`flowalign.step_rewards.dense_step_advantages`), which keeps at least as many
    replacements (the sum over batches of min(P_b, N_b) is at most min(sum P, sum N)) and favours the rows of
    largest change batch-wide.

    Returns:
        ``(mask[B, K] bool, rewards[B, K] fp32)``.
    """
    R = _check_R(R)
    r = step_gains(R)  # [B, K]
    sign_r = torch.sign(r)
    g = torch.sign(R[:, -1:] - R[:, :1])  # [B, 1]
    to_end = torch.sign(R[:, -1:] - R[:, 1:])  # [B, K]: sign(R_K - R_k)
    consistent = sign_r * to_end > 0  # [B, K]
    mask = torch.zeros_like(consistent)
    mask[:, 0] = consistent[:, 0]
    mask[:, 1:] = (sign_r[:, :-1] * g < 0) & (sign_r[:, 1:] * g > 0) & consistent[:, 1:]
    long_term = R[:, -1:] - R[:, :-1]  # [B, K]: R_K - R_{k-1}
    if balance:
        mask = _balance(mask, (R[:, -1:] - R[:, :1]).expand_as(long_term))
    return mask, torch.where(mask, long_term, r)


def _balance(mask: Tensor, value: Tensor) -> Tensor:
    """Keep equally many positive and negative turning points (the sign of ``value``), the largest |value| of each."""
    flat_mask, flat_val = mask.flatten(), value.flatten()
    pos = (flat_mask & (flat_val > 0)).nonzero().flatten()
    neg = (flat_mask & (flat_val < 0)).nonzero().flatten()
    if len(pos) == 0 or len(neg) == 0:
        return mask
    keep = min(len(pos), len(neg))
    out = torch.zeros_like(flat_mask)
    for idx in (pos, neg):
        order = torch.sort(flat_val[idx].abs(), descending=True, stable=True).indices[:keep]
        out[idx[order]] = True
    return out.reshape(mask.shape)


# --------------------------------------------------------------------------------------------
# credit assignment
# --------------------------------------------------------------------------------------------


def discounted_returns(r: Tensor, gamma: float = 1.0) -> Tensor:
    """Sum-form returns G_k = sum_{j >= k} gamma^{j-k} r_j (Sutton & Barto Eq. 3.8).

    ``r[B, K]`` -> ``[B, K]``; with gamma = 1 and step gains, G_k = R_K - R_{k-1}.
    """
    r = torch.as_tensor(r).float()
    if r.ndim != 2 or not (0.0 <= gamma <= 1.0):
        raise ValueError(f"need r [B, K] and 0 <= gamma <= 1, got shape {tuple(r.shape)}, gamma={gamma}")
    out = torch.empty_like(r)
    running = torch.zeros_like(r[:, 0])
    for k in range(r.shape[1] - 1, -1, -1):
        running = r[:, k] + gamma * running
        out[:, k] = running
    return out


def min_form_values(r: Tensor) -> Tensor:
    """Min-form credit assignment V_k = min_{j >= k} r_j (PURE, Cheng et al., arXiv 2504.15275).

    ``r[B, K]`` -> ``[B, K]``: a step is worth the worst step reward still ahead of it.
    """
    r = torch.as_tensor(r).float()
    if r.ndim != 2:
        raise ValueError(f"r must be [B, K], got shape {tuple(r.shape)}")
    return torch.flip(torch.cummin(torch.flip(r, dims=[1]), dim=1).values, dims=[1])


# --------------------------------------------------------------------------------------------
# estimators of R_k
# --------------------------------------------------------------------------------------------


def _chunks(n: int, max_batch: Optional[int]):
    size = n if not max_batch else max_batch
    for lo in range(0, n, max(size, 1)):
        yield slice(lo, min(lo + size, n))


class _Work:
    """Rows done out of a known total (transformer rows, then decoded and scored rows), reported to
    ``progress(done, total)`` after each chunk: what a progress bar over the step-reward phase shows."""

    def __init__(self, progress: Optional[Callable[[int, int], None]], total: int):
        self.progress, self.total, self.done = progress, int(total), 0

    def add(self, rows: int) -> None:
        self.done += int(rows)
        if self.progress is not None:
            self.progress(self.done, self.total)


def _score(latents: Tensor, index: Tensor, decode_fn: DecodeFn, reward_fn: RewardFn, max_batch: Optional[int],
           work: Optional[_Work] = None) -> Tensor:
    """Decode and score ``latents[N]`` in chunks -> ``[N]`` fp32."""
    out = []
    for sl in _chunks(latents.shape[0], max_batch):
        scores = torch.as_tensor(reward_fn(decode_fn(latents[sl]), index[sl])).float().flatten()
        if scores.shape[0] != sl.stop - sl.start:
            raise ValueError(f"reward_fn returned {scores.shape[0]} scores for {sl.stop - sl.start} images")
        out.append(scores.to(latents.device))
        if work is not None:
            work.add(sl.stop - sl.start)
    return torch.cat(out) if out else torch.zeros(0, device=latents.device)


def _start_steps(steps: Optional[Sequence[int]], K: int) -> list[int]:
    starts = list(range(K + 1)) if steps is None else sorted({int(k) for k in steps})
    bad = [k for k in starts if not 0 <= k <= K]
    if bad:
        raise ValueError(f"steps must lie in 0..K={K}, got {bad}")
    return starts


def _check_trajectory(latents: Tensor, sigmas: Tensor) -> tuple[int, int, Tensor]:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
    if latents.ndim < 3 or latents.shape[1] != sigmas.shape[0]:
        raise ValueError(f"latents must be [B, K+1, *latent] with K+1={sigmas.shape[0]} (len(sigmas)), got {tuple(latents.shape)}")
    if float(sigmas[-1]) != 0.0 or bool((sigmas[1:] >= sigmas[:-1]).any()):
        raise ValueError(f"sigmas must decrease strictly and end at 0, got {sigmas.tolist()}")
    return latents.shape[0], sigmas.shape[0] - 1, sigmas


@torch.no_grad()
def ode_completion_rewards(
    velocity_fn: VelocityFn,
    decode_fn: DecodeFn,
    reward_fn: RewardFn,
    latents: Tensor,
    sigmas: Tensor,
    stride: int = 1,
    steps: Optional[Sequence[int]] = None,
    max_batch: Optional[int] = None,
    final_rewards: Optional[Tensor] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> tuple[Tensor, int]:
    """R_k = reward of the deterministic (Euler ODE) completion from ``latents[:, k]``
    (DenseGRPO arXiv 2601.20218; TP-GRPO arXiv 2602.06422).

    From start k the completion visits sigma indices k, k+λ, k+2λ, ... (< K) and always ends with a
    step to sigma_K = 0 (λ = ``stride``). All completions of all samples and start steps are
    advanced together: sigma index j is one ``velocity_fn`` call (chunked by ``max_batch`` rows)
    over every completion currently at j, so at most K calls in all.

    Args:
        latents: ``[B, K+1, *latent]`` the recorded trajectory (``latents[:, 0]`` = x_T).
        sigmas: ``[K+1]`` decreasing to 0.
        stride: λ >= 1.
        steps: start indices k to evaluate (default all 0..K); others are NaN in the output.
        max_batch: most rows per ``velocity_fn`` / ``decode_fn`` / ``reward_fn`` call (None: all).
        final_rewards: ``[B]`` rewards of the final samples if already known (R_K is then not
            re-scored); otherwise ``latents[:, K]`` is decoded and scored (no model call).
        progress: called as ``progress(done, total)`` after each chunk, counting the rows passed to
            ``velocity_fn`` and then the rows decoded and scored (for a progress bar).

    Returns:
        ``(R[B, K+1] fp32, nfe)`` with nfe = number of rows passed to ``velocity_fn`` (multiply by
        2 for CFG if ``velocity_fn`` runs two branches).
    """
    B, K, sigmas = _check_trajectory(latents, sigmas)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    device = latents.device
    starts = _start_steps(steps, K)
    R = torch.full((B, K + 1), float("nan"), device=device)
    sig = sigmas.to(device)

    inner = [k for k in starts if k < K]  # completions that need model calls
    rescored = K in starts and final_rewards is None
    work = _Work(progress, B * (sum(-(-(K - k) // stride) for k in inner) + len(inner) + int(rescored)))  # ceil((K-k)/λ) calls from k
    if inner:
        start_of = torch.tensor(inner, device=device).repeat_interleave(B)  # [C], C = B·len(inner)
        sample_of = torch.arange(B, device=device).repeat(len(inner))  # [C]
        x = latents[sample_of, start_of].clone()  # [C, *latent]
        pos = start_of.clone()  # sigma index each completion is at
        nfe = 0
        for j in range(K):
            active = (pos == j).nonzero().flatten()
            if active.numel() == 0:
                continue
            nxt = min(j + stride, K)
            for sl in _chunks(active.numel(), max_batch):
                rows = active[sl]
                s = sig[j].expand(rows.numel())
                v = velocity_fn(x[rows], s, sample_of[rows])
                x[rows] = sde.step("ode", x[rows], v, sig[j], sig[nxt]).prev_sample
                nfe += rows.numel()
                work.add(rows.numel())
            pos[active] = nxt
        scores = _score(x, sample_of, decode_fn, reward_fn, max_batch, work)  # [C]
        R[sample_of, start_of] = scores
    else:
        nfe = 0
    if K in starts:
        if final_rewards is not None:
            R[:, K] = torch.as_tensor(final_rewards, dtype=torch.float32, device=device).flatten()
        else:
            R[:, K] = _score(latents[:, K], torch.arange(B, device=device), decode_fn, reward_fn, max_batch, work)
    return R, nfe


@torch.no_grad()
def tweedie_rewards(
    velocity_fn: Optional[VelocityFn],
    decode_fn: DecodeFn,
    reward_fn: RewardFn,
    latents: Tensor,
    sigmas: Tensor,
    steps: Optional[Sequence[int]] = None,
    max_batch: Optional[int] = None,
    x0_preds: Optional[Tensor] = None,
    final_rewards: Optional[Tensor] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> tuple[Tensor, int]:
    """One-step (Tweedie) estimate: R_k = reward(decode(x0_hat_k)), x0_hat_k = x_k - sigma_k·v(x_k, sigma_k).

    Cheap (one model call per latent, none if the sampler recorded ``x0_preds``) but biased: x0_hat
    is a posterior mean, blurry at high sigma.

    Args:
        x0_preds: ``[B, K, *latent]`` recorded x0-hat of the latents *before* each step
            (``Trajectory.x0_preds``): entry k is x0_hat of ``latents[:, k]``; if given, no model call.
        others: as :func:`ode_completion_rewards`.

    Returns:
        ``(R[B, K+1] fp32, nfe)``; ``R[:, K]`` scores the final sample itself.
    """
    B, K, sigmas = _check_trajectory(latents, sigmas)
    device = latents.device
    starts = _start_steps(steps, K)
    R = torch.full((B, K + 1), float("nan"), device=device)
    inner = [k for k in starts if k < K]
    nfe = 0
    rescored = K in starts and final_rewards is None
    work = _Work(progress, B * (len(inner) * (1 if x0_preds is not None else 2) + int(rescored)))
    if inner:
        start_of = torch.tensor(inner, device=device).repeat_interleave(B)
        sample_of = torch.arange(B, device=device).repeat(len(inner))
        if x0_preds is not None:
            if x0_preds.shape[:2] != (B, K):
                raise ValueError(f"x0_preds must be [B, K, *latent] = [{B}, {K}, ...], got {tuple(x0_preds.shape)}")
            x0 = x0_preds[sample_of, start_of]
        else:
            if velocity_fn is None:
                raise ValueError("tweedie_rewards needs velocity_fn or x0_preds")
            x = latents[sample_of, start_of]  # [C, *latent]
            s = sigmas.to(device)[start_of]  # [C]
            x0 = torch.empty_like(x)
            for sl in _chunks(x.shape[0], max_batch):
                v = velocity_fn(x[sl], s[sl], sample_of[sl])
                x0[sl] = x[sl] - s[sl].reshape(-1, *([1] * (x.ndim - 1))) * v
                nfe += sl.stop - sl.start
                work.add(sl.stop - sl.start)
        R[sample_of, start_of] = _score(x0, sample_of, decode_fn, reward_fn, max_batch, work)
    if K in starts:
        if final_rewards is not None:
            R[:, K] = torch.as_tensor(final_rewards, dtype=torch.float32, device=device).flatten()
        else:
            R[:, K] = _score(latents[:, K], torch.arange(B, device=device), decode_fn, reward_fn, max_batch, work)
    return R, nfe


# --------------------------------------------------------------------------------------------
# DenseGRPO noise calibration
# --------------------------------------------------------------------------------------------


def calibrate_noise_table(
    levels: Tensor, gains: Tensor, eps1: float = 2, eps2: float = 0.01, max_level: Optional[float] = None
) -> Tensor:
    """One round of DenseGRPO's reward-aware exploration calibration (arXiv 2601.20218).

    For each timestep k, count positive and negative step gains over N calibration rollouts:
    psi_k <- psi_k + eps2 where |#pos_k - #neg_k| <= eps1 (balanced: room to explore more; the paper's
    ``|#pos - #neg| < 2`` on integer counts is ``eps1 = 1``, the default 2 one count looser),
    psi_k <- psi_k - eps2 otherwise; clamped to [0, max_level] (a level within max(eps2/1000, 1e-5) of 0
    after the update, i.e. one decremented to 0 up to float round-off, is exactly 0).

    Args:
        levels: ``[K]`` current noise levels psi.
        gains: ``[N, K]`` step gains r_k of N rollouts sampled with ``levels``.

    Returns:
        ``[K]`` new levels.
    """
    levels = torch.as_tensor(levels, dtype=torch.float32).flatten()
    gains = torch.as_tensor(gains, dtype=torch.float32)
    if gains.ndim != 2 or gains.shape[1] != levels.shape[0]:
        raise ValueError(f"gains must be [N, K={levels.shape[0]}], got shape {tuple(gains.shape)}")
    if not (eps1 >= 0 and eps2 > 0 and math.isfinite(eps1) and math.isfinite(eps2)):
        raise ValueError(f"need finite eps1 >= 0 and eps2 > 0, got eps1={eps1}, eps2={eps2}")
    if max_level is not None and not max_level >= 0:  # a negative cap made every level negative
        raise ValueError(f"max_level must be None or >= 0, got {max_level}")
    n_pos = (gains > 0).sum(dim=0)  # [K]
    n_neg = (gains < 0).sum(dim=0)  # [K]
    balanced = (n_pos - n_neg).abs() <= eps1  # [K]
    new = levels + torch.where(balanced, eps2, -eps2)
    # a level decremented to "0" by float steps lands near 1e-7, not 0: a step that stays stochastic with a
    # vanishing std (log-probs of ~1e5 per 1e-4 of mean). fp32 round-off of n steps is ~n·1e-7·level (700 steps of 0.001
    # from 0.7 leave 5e-6); a real level is not that small.
    new = torch.where(new.abs() < max(eps2 * 1e-3, 1e-5), torch.zeros_like(new), new)
    return new.clamp(min=0.0, max=max_level)


def calibrate_noise(
    gains_fn: Callable[[Tensor], Tensor],
    initial_levels: Tensor,
    rounds: int,
    eps1: float = 2,
    eps2: float = 0.01,
    max_level: Optional[float] = None,
) -> Tensor:
    """Run ``rounds`` of :func:`calibrate_noise_table` and return the frozen ``[K]`` table.

    ``gains_fn(levels[K]) -> gains[N, K]`` samples N calibration rollouts with the given per-step
    levels and returns their step gains (e.g. :func:`step_gains` of :func:`ode_completion_rewards`).
    A step whose initial level is 0 (outside a noise window) stays 0: its ODE step's gains are exactly 0, which
    the rule reads as balanced, so it would climb by ``eps2`` every round and the window would end as noise on
    every step. The paper starts from one level at every step, where this does not arise.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    levels = torch.as_tensor(initial_levels, dtype=torch.float32).flatten().clone()
    explored = levels > 0  # [K] the steps the schedule puts noise on
    for i in range(rounds):
        levels = calibrate_noise_table(levels, gains_fn(levels.clone()), eps1, eps2, max_level) * explored
        logger.debug("noise calibration round %d: %s", i + 1, [round(x, 4) for x in levels.tolist()])
    return levels


# --------------------------------------------------------------------------------------------
# advantages for the dense objectives
# --------------------------------------------------------------------------------------------


def dense_advantages(R: Tensor, group_ids: Tensor, std: str = "group", eps: float = 1e-4, clip: Optional[float] = None) -> Tensor:
    """DenseGRPO advantages: step gains r_k normalised across the group at each step -> ``[B, K]``."""
    return per_step_advantages(step_gains(R), group_ids, std=std, eps=eps, clip=clip)


def tp_advantages(
    R: Tensor, group_ids: Tensor, balance: bool = False, std: str = "group", eps: float = 1e-4, clip: Optional[float] = None
) -> Tensor:
    """TP-GRPO advantages: turning-point step rewards normalised across the group per step -> ``[B, K]``."""
    _, rewards = turning_points(R, balance=balance)
    return per_step_advantages(rewards, group_ids, std=std, eps=eps, clip=clip)
