"""Dense step rewards on real pipelines: the glue between an Adapter, a Trajectory, a Reward and the
pure estimators of :mod:`flowalign.dense` (DESIGN.md §6-8).

The math (ODE completion, Tweedie, step gains, turning points, credit assignment, noise
calibration) stays in :mod:`flowalign.dense`; this module only binds the model and the reward:

* :func:`estimate_step_rewards` -> ``R[B, K+1]``: ``R_k`` is the reward of the deterministic
  completion from ``traj.latents[:, k]`` (``"ode"``; ``"ode_stride"`` visits every λ-th sigma) or
  of the one-step prediction x0_hat (``"tweedie"``); ``R_0`` comes from the rollout's own x_T and
  ``R_K = traj.rewards`` (no extra reward call).
* :func:`step_advantages` -> ``[B, K]`` per-step advantages for ``dense_grpo`` (DenseGRPO, arXiv
  2601.20218) or ``tp_grpo`` (TP-GRPO, arXiv 2602.06422), with an optional credit assignment
  (``"gain"``, sum-form ``"sum"`` returns, min-form ``"min"`` values).
* :func:`dense_step_advantages` -> the one call the trainer makes after the outcome rewards.
* :func:`calibrate_noise_table_for` -> DenseGRPO's calibrated per-step noise table, and
  :func:`save_noise_table` / :func:`load_noise_table` to keep it as JSON next to a run.

Cost: with stride λ and start steps 0..K-1 the ODE estimator spends
``B · sum_{k=0}^{K-1} ceil((K - k) / λ)`` transformer rows (``B·K(K+1)/2`` for λ = 1), twice that
with CFG. With λ = 1, a start whose next step was deterministic (an ODE step of a window
schedule, CPS's last step) shares its completion with the following start, so only the starts
before stochastic steps are computed (``R_{k-1} = R_k`` exactly when step k is deterministic).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from flowalign import dense
from flowalign.advantages import per_step_advantages
from flowalign.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "ESTIMATORS",
    "CREDITS",
    "DenseConfig",
    "bind_velocity",
    "bind_reward",
    "estimate_step_rewards",
    "step_advantages",
    "dense_step_advantages",
    "rollout_gains_fn",
    "calibrate_noise_table_for",
    "save_noise_table",
    "load_noise_table",
    "noise_schedule_for",
    "prepare_noise_schedule",
]

ESTIMATORS = ("ode", "ode_stride", "tweedie")
CREDITS = ("gain", "sum", "min")
METHODS = ("dense_grpo", "tp_grpo")
NOISE_TABLE_FORMAT = "flowalign.noise_table"
NOISE_TABLE_VERSION = 1


@dataclass
class DenseConfig:
    """Settings of the dense (per-step) reward path, read by :func:`dense_step_advantages`.

    Meant as the ``dense:`` section of a recipe (``flowalign.config.FlowalignConfig.dense``).
    """

    estimator: str = field(default="ode", metadata={"help": f"How R_k is estimated, one of {ESTIMATORS}: full ODE completion, ODE completion on every `stride`-th sigma, or the one-step x0 prediction (Tweedie)."})
    stride: int = field(default=1, metadata={"help": "Sigma stride λ of the ODE completion of estimator 'ode_stride' (>= 2 there; the other estimators take 1)."})
    credit: str = field(default="gain", metadata={"help": f"Credit assignment of the step rewards, one of {CREDITS}: the step reward itself, sum-form return sum_j>=k gamma^(j-k) r_j, or min-form value min_j>=k r_j."})
    gamma: float = field(default=1.0, metadata={"help": "Discount of the sum-form return (credit='sum')."})
    balance: bool = field(default=False, metadata={"help": "TP-GRPO: keep equally many positive and negative turning-point replacements, those of the rows with the largest |R_K - R_0| (the authors' use_delta_global)."})
    max_batch: Optional[int] = field(default=None, metadata={"help": "Rows per transformer / VAE / reward call of the estimator (memory only); null = all at once."})
    reuse_deterministic: bool = field(default=True, metadata={"help": "With stride 1, copy R_k into R_{k-1} when step k was deterministic instead of recomputing it (same value, fewer NFE)."})
    noise_table_file: Optional[str] = field(default=None, metadata={"help": "JSON noise table (flowalign.step_rewards.save_noise_table) used as sampling noise levels by dense_grpo / tp_grpo, instead of sampling.noise_schedule. With calibration_rounds > 0 it is where the calibration is written, and an existing file is reused when its calibration settings match (else refused)."})
    calibration_rounds: int = field(default=0, metadata={"help": "DenseGRPO: rounds of noise-table calibration before training (0 = none; use noise_table_file or sampling.noise_kwargs)."})
    calibration_samples: int = field(default=64, metadata={"help": "Rollouts per calibration round (N in DenseGRPO's counts)."})
    eps1: float = field(default=2.0, metadata={"help": "DenseGRPO calibration: a step is balanced when |#positive - #negative gains| <= eps1 "
                                                         "(the paper's Alg. 1, |#pos - #neg| < 2 on integer counts, is eps1 1; "
                                                         "the default 2 is one count looser)."})
    eps2: float = field(default=0.01, metadata={"help": "DenseGRPO calibration: noise-level increment (balanced) or decrement (unbalanced) per round."})
    max_level: Optional[float] = field(default=None, metadata={"help": "Upper bound of a calibrated noise level; null = none (1 under sampling.kernel=cps, whose level is an angle fraction)."})

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"dense.estimator={self.estimator!r} is not one of {list(ESTIMATORS)}")
        if self.credit not in CREDITS:
            raise ConfigError(f"dense.credit={self.credit!r} is not one of {list(CREDITS)}")
        if self.stride < 1 or (self.estimator == "ode_stride" and self.stride < 2):
            raise ConfigError(f"dense.stride must be >= 1 (>= 2 for estimator 'ode_stride'), got {self.stride}")
        if self.stride > 1 and self.estimator != "ode_stride":
            raise ConfigError(f"dense.stride={self.stride} needs dense.estimator=ode_stride (the strided ODE completion); "
                              f"estimator {self.estimator!r} completes on every sigma")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"dense.gamma must be in [0, 1], got {self.gamma}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"dense.max_batch must be null or >= 1, got {self.max_batch}")
        if self.calibration_rounds < 0 or self.calibration_samples < 1:
            raise ConfigError(f"dense.calibration_rounds must be >= 0 and calibration_samples >= 1, got {self.calibration_rounds}, {self.calibration_samples}")
        if self.eps1 < 0 or self.eps2 <= 0:
            raise ConfigError(f"dense.eps1 must be >= 0 and dense.eps2 > 0, got {self.eps1}, {self.eps2}")
        if self.max_level is not None and self.max_level <= 0:
            raise ConfigError(f"dense.max_level must be null or > 0, got {self.max_level}")


# ------------------------------------------------------------------------------------------
# binding the adapter and the reward to dense.py's callables
# ------------------------------------------------------------------------------------------


def _row_of_sample(cond, group_ids: Tensor) -> Tensor:
    """``[B]`` row of ``cond`` for each sample: cond has one row per sample, or one per group."""
    B = group_ids.shape[0]
    if cond.batch_size == B:
        return torch.arange(B)
    _, inverse = torch.unique(group_ids.cpu(), return_inverse=True)
    if cond.batch_size == int(inverse.max()) + 1:
        return inverse
    raise ValueError(f"cond has {cond.batch_size} rows; expected one per sample ({B}) or one per group ({int(inverse.max()) + 1})")


def bind_velocity(adapter, cond, guidance_scale: float, group_ids: Optional[Tensor] = None) -> dense.VelocityFn:
    """``velocity_fn(x[N], sigma[N], index[N])`` over ``adapter.velocity`` with the conditioning of
    each row's sample (``cond.select``); CFG is applied inside the adapter when ``guidance_scale > 1``.

    ``cond`` has one row per sample, or one per group when ``group_ids`` says which group each
    sample belongs to (the layout :func:`flowalign.sampling.rollout` uses).
    """
    row = torch.arange(cond.batch_size) if group_ids is None else _row_of_sample(cond, torch.as_tensor(group_ids))
    if guidance_scale > 1.0 and cond.uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale} > 1 needs unconditional embeddings in cond (encode with do_classifier_free_guidance=True)")

    def velocity_fn(x: Tensor, sigma: Tensor, index: Tensor) -> Tensor:
        rows = row[index.cpu()].to(x.device)
        return adapter.velocity(x, sigma, cond.select(rows), guidance_scale)

    return velocity_fn


def _as_reward(reward: Any, reward_configs: Optional[Sequence[Any]] = None):
    """A single reward; a ``{name: reward}`` mapping is mixed with the weights of ``reward_configs``."""
    if not isinstance(reward, Mapping):
        return reward
    from flowalign.rewards import MultiReward

    specs = {getattr(c, "key", getattr(c, "name", None)): c for c in (reward_configs or [])}
    mix = {}
    for name, r in reward.items():
        c = specs.get(name)
        mix[name] = (r, float(getattr(c, "weight", 1.0)), getattr(c, "on_error", "raise"))
    return MultiReward(mix)


def bind_reward(reward: Any, prompts: Sequence[str], metadata: Optional[Sequence[Mapping]], on_error: str = "raise") -> dense.RewardFn:
    """``reward_fn(images[N], index[N]) -> scores[N]`` through :func:`flowalign.rewards.call_reward`,
    with the prompt and metadata of each row's sample. Dropped samples (``on_error="drop"``) score NaN."""
    from flowalign.rewards import call_reward

    prompts = list(prompts)
    metadata = list(metadata) if metadata else [{} for _ in prompts]
    if len(metadata) != len(prompts):
        raise ValueError(f"{len(metadata)} metadata entries for {len(prompts)} prompts")

    def reward_fn(images: Tensor, index: Tensor) -> Tensor:
        idx = index.tolist()
        with torch.no_grad():  # step rewards are scores, never differentiated
            out = call_reward(reward, images, [prompts[i] for i in idx], [metadata[i] for i in idx], on_error=on_error)
        return out.scores.float()

    return reward_fn


# ------------------------------------------------------------------------------------------
# R_k for a trajectory
# ------------------------------------------------------------------------------------------


def _needed_starts(stochastic_mask: Tensor, K: int) -> list[int]:
    """Starts 0..K-1 whose completion cannot be copied: those right before a stochastic step."""
    mask = torch.as_tensor(stochastic_mask).bool().cpu()
    return [j for j in range(K) if bool(mask[j])]


@torch.no_grad()
def estimate_step_rewards(
    adapter,
    traj,
    cond,
    reward,
    *,
    estimator: str = "ode",
    stride: int = 1,
    guidance_scale: Optional[float] = None,
    max_batch: Optional[int] = None,
    on_error: str = "raise",
    reuse_deterministic: bool = True,
    store_gains: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> tuple[Tensor, int]:
    """Rewards ``R[B, K+1]`` of the intermediate latents of ``traj`` (DESIGN.md §6).

    ``R_k`` (k < K) scores the deterministic completion from ``traj.latents[:, k]``
    (:func:`flowalign.dense.ode_completion_rewards`; ``"ode_stride"`` every ``stride``-th sigma) or
    the Tweedie prediction x0_hat = x_k - sigma_k·v (:func:`flowalign.dense.tweedie_rewards`; no
    model call when ``traj.x0_preds`` was recorded with the same guidance). ``R_0`` comes from the
    rollout's own x_T (``traj.latents[:, 0]``) and ``R_K = traj.rewards`` when set (no extra reward
    call; otherwise the final latents are decoded and scored).

    Args:
        adapter: a ``flowalign.pipelines.Adapter`` (velocity with CFG inside, decode).
        traj: the rollout (``flowalign.trajectory.Trajectory``).
        cond: ``Conditioning`` with one row per sample, or one per group (rollout layout).
        reward: a ``Reward`` (or a ``{name: Reward}`` mapping, mixed with weight 1 each).
        estimator: ``"ode"``, ``"ode_stride"`` (needs ``stride >= 2``) or ``"tweedie"``.
        stride: λ of the ODE completion.
        guidance_scale: CFG scale of the completions; default ``traj.guidance_scale``.
        max_batch: most rows per velocity / decode / reward call (None: all).
        on_error: reward failure policy (``"raise"`` or ``"drop"``: that sample's R is NaN).
        reuse_deterministic: with the ODE estimator, ``stride == 1`` and the rollout's own guidance, take
            ``R_{k-1} = R_k`` when step k was deterministic instead of recomputing the same completion (under
            another guidance the completion from ``x_{k-1}`` does not pass through the rollout's ``x_k``).
        store_gains: also set ``traj.step_rewards`` to the gains ``R_k - R_{k-1}`` ``[B, K]``.
        progress: ``progress(done, total)`` after each chunk of rows (see :func:`flowalign.dense.ode_completion_rewards`).

    Returns:
        ``(R[B, K+1] fp32 on the CPU, nfe)``; nfe counts transformer rows, doubled with CFG.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}; choose one of {ESTIMATORS}")
    if stride < 1 or (estimator == "ode_stride" and stride < 2):
        raise ValueError(f"stride must be >= 1 (>= 2 for 'ode_stride'), got {stride}")
    w = float(traj.guidance_scale if guidance_scale is None else guidance_scale)
    B, K = traj.batch_size, traj.num_steps
    reward = _as_reward(reward)
    velocity_fn = bind_velocity(adapter, cond, w, traj.group_ids)
    reward_fn = bind_reward(reward, traj.prompts, traj.metadata, on_error)
    decode_fn = adapter.decode
    final = traj.rewards.float() if traj.rewards is not None else None
    cfg_factor = 2 if w > 1.0 else 1

    if estimator == "tweedie":
        x0 = traj.x0_preds if (traj.x0_preds is not None and w == float(traj.guidance_scale)) else None
        R, rows = dense.tweedie_rewards(velocity_fn, decode_fn, reward_fn, traj.latents, traj.sigmas,
                                        max_batch=max_batch, x0_preds=x0, final_rewards=final, progress=progress)
    else:
        copy = reuse_deterministic and stride == 1 and w == float(traj.guidance_scale)
        starts = _needed_starts(traj.stochastic_mask, K) + [K] if copy else None
        R, rows = dense.ode_completion_rewards(velocity_fn, decode_fn, reward_fn, traj.latents, traj.sigmas, stride=stride,
                                               steps=starts, max_batch=max_batch, final_rewards=final, progress=progress)
        if copy:
            for j in range(K - 1, -1, -1):  # step j+1 deterministic: its completion is the one from j+1
                if j not in starts:
                    R[:, j] = R[:, j + 1]
    R = R.float().cpu()
    if store_gains:
        finite = torch.isfinite(R).all(dim=1)
        gains = torch.full((B, K), float("nan"))
        if finite.any():
            gains[finite] = dense.step_gains(R[finite])
        traj.step_rewards = gains
    return R, rows * cfg_factor


# ------------------------------------------------------------------------------------------
# per-step advantages
# ------------------------------------------------------------------------------------------


def _credit(r: Tensor, credit: str, gamma: float) -> Tensor:
    if credit == "gain":
        return r
    if credit == "sum":
        return dense.discounted_returns(r, gamma)
    if credit == "min":
        return dense.min_form_values(r)
    raise ValueError(f"credit={credit!r}; choose one of {CREDITS}")


def step_advantages(
    R: Tensor,
    group_ids: Tensor,
    method: str = "dense_grpo",
    *,
    credit: str = "gain",
    gamma: float = 1.0,
    balance: bool = False,
    std: str = "group",
    eps: float = 1e-4,
    clip: Optional[float] = None,
) -> Tensor:
    """Per-step advantages ``[B, K]`` from ``R[B, K+1]``.

    1. step rewards: DenseGRPO gains r_k = R_k - R_{k-1} (arXiv 2601.20218), or TP-GRPO's rewards
       with turning points replaced by R_K - R_{k-1} (arXiv 2602.06422, :func:`dense.turning_points`);
    2. credit assignment: ``"gain"`` keeps them; ``"sum"`` takes G_k = sum_{j>=k} gamma^{j-k} r_j
       (with gamma = 1 and gains, G_k = R_K - R_{k-1}); ``"min"`` takes V_k = min_{j>=k} r_j (PURE,
       arXiv 2504.15275);
    3. normalisation across the group at each step (:func:`flowalign.advantages.per_step_advantages`).

    With ``credit="gain"`` this is :func:`dense.dense_advantages` / :func:`dense.tp_advantages`.
    """
    if method == "dense_grpo":
        r = dense.step_gains(R)  # [B, K]
    elif method == "tp_grpo":
        _, r = dense.turning_points(R, balance=balance)  # [B, K]
    else:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    return per_step_advantages(_credit(r, credit, gamma), group_ids, std=std, eps=eps, clip=clip)


def _dense_config(cfg: Any) -> DenseConfig:
    d = getattr(cfg, "dense", None)
    if d is None:
        return DenseConfig()
    if isinstance(d, DenseConfig):
        return d
    if isinstance(d, Mapping):
        return DenseConfig(**d)
    return DenseConfig(**{f: getattr(d, f) for f in DenseConfig.__dataclass_fields__ if hasattr(d, f)})


def _dropped_sample_policy(cfg) -> str:
    """``"drop"`` when any configured reward drops failed samples (the mixture then drops them), else ``"raise"``."""
    return "drop" if any(getattr(r, "on_error", "raise") == "drop" for r in getattr(cfg, "rewards", None) or []) else "raise"


def dense_step_advantages(adapter, traj, cond, reward, cfg, gather: Optional[Callable] = None,
                          progress: Optional[Callable[[int, int], None]] = None) -> tuple[Tensor, dict[str, float]]:
    """The trainer's entry point: per-step advantages ``[B, K]`` and metrics for one rollout batch.

    Call it after the outcome rewards are in ``traj.rewards``. ``cfg`` is the run's
    ``FlowalignConfig`` (read: ``objective.name`` in {dense_grpo, tp_grpo}, ``objective.adv_std``,
    ``adv_eps``, ``adv_clip``, ``sampling.guidance_scale``, ``rewards`` (weights, on_error) and the
    ``dense`` section, :class:`DenseConfig`, defaults when absent). ``reward`` is one reward or the
    trainer's ``{name: reward}`` dict (mixed with ``cfg.rewards``' weights).

    ``gather(R, group_ids) -> (R_all, group_ids_all, own_rows)`` (the trainer's, on several processes) gives
    every process's rows, with group ids distinct across processes, and the slice of this process's rows:
    advantages are then computed over the whole batch (``objective.adv_std="global"`` normalises over it,
    and TP-GRPO's ``dense.balance`` balances over it, where the authors' code balances each 9-image sampling batch
    on its own: :func:`flowalign.dense.turning_points`), so they do not depend on the process count.
    ``progress(done, total)``: the step-reward estimate's rows (:func:`estimate_step_rewards`), for a bar.

    Samples whose R has a NaN (a reward dropped under ``on_error="drop"``) get zero advantages and are
    left out of the group statistics; rows with all-zero advantages can be dropped with
    ``flowalign.advantages.nonzero_mask``. Advantage ``[b, k]`` belongs to transition
    ``traj.latents[b, k] -> traj.latents[b, k+1]``.

    Metrics: ``dense/nfe``, ``dense/nfe_per_sample``, ``dense/turning_point_frac`` (over stochastic
    steps), ``dense/gain_pos_frac`` / ``dense/gain_neg_frac``, ``dense/R0_mean``, ``dense/RK_mean``,
    ``dense/gain_abs_mean``, ``dense/dropped``, ``dense/zero_adv_frac``, ``time/step_rewards``.
    """
    start = time.perf_counter()
    d = _dense_config(cfg)
    ocfg = cfg.objective
    from flowalign.config import dense_method

    method = dense_method(ocfg.name) or ocfg.name
    if method not in METHODS:
        raise ConfigError(f"objective.name={method!r} has no per-step advantages; use one of {list(METHODS)}")
    on_error = _dropped_sample_policy(cfg)
    mixed = _as_reward(reward, getattr(cfg, "rewards", None))
    R, nfe = estimate_step_rewards(
        adapter, traj, cond, mixed, estimator=d.estimator, stride=d.stride, guidance_scale=cfg.sampling.guidance_scale,
        max_batch=d.max_batch, on_error=on_error, reuse_deterministic=d.reuse_deterministic, store_gains=True, progress=progress,
    )
    B, K = traj.batch_size, traj.num_steps
    ok = torch.isfinite(R).all(dim=1)  # [B]
    metrics: dict[str, float] = {"dense/nfe": float(nfe), "dense/nfe_per_sample": nfe / max(B, 1), "dense/dropped": float((~ok).sum())}
    R_all, gid_all, own = gather(R, traj.group_ids.cpu()) if gather is not None else (R, traj.group_ids.cpu(), slice(None))
    ok_all = torch.isfinite(R_all).all(dim=1)
    adv_all = torch.zeros(R_all.shape[0], K)
    if ok_all.any():
        adv_all[ok_all] = step_advantages(R_all[ok_all], gid_all[ok_all], method, credit=d.credit, gamma=d.gamma, balance=d.balance,
                                          std=ocfg.adv_std, eps=ocfg.adv_eps, clip=ocfg.adv_clip)
    adv = adv_all[own]  # [B, K]
    if ok.any():
        Rk = R[ok]
        stoch = torch.as_tensor(traj.stochastic_mask).bool().cpu()
        gains = dense.step_gains(Rk)[:, stoch]  # [b, S]
        tp_mask, _ = dense.turning_points(Rk, balance=d.balance)
        metrics.update({
            "dense/turning_point_frac": float(tp_mask[:, stoch].float().mean()) if stoch.any() else 0.0,
            "dense/gain_pos_frac": float((gains > 0).float().mean()) if gains.numel() else 0.0,
            "dense/gain_neg_frac": float((gains < 0).float().mean()) if gains.numel() else 0.0,
            "dense/gain_abs_mean": float(gains.abs().mean()) if gains.numel() else 0.0,
            "dense/R0_mean": float(Rk[:, 0].mean()),
            "dense/RK_mean": float(Rk[:, -1].mean()),
        })
    metrics["dense/zero_adv_frac"] = float((adv == 0).all(dim=1).float().mean())
    metrics["time/step_rewards"] = time.perf_counter() - start
    traj.advantages = adv
    return adv, metrics


# ------------------------------------------------------------------------------------------
# DenseGRPO noise calibration on a pipeline, and the noise-table file
# ------------------------------------------------------------------------------------------


def rollout_gains_fn(
    adapter,
    prompts: Sequence[str],
    reward,
    *,
    samples: int,
    kernel: str = "flow_sde",
    guidance_scale: float = 1.0,
    estimator: str = "ode",
    stride: int = 1,
    max_batch: Optional[int] = None,
    micro_batch_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    metadata: Optional[Sequence[Mapping]] = None,
    on_error: str = "raise",
    sample_generator: Optional[Callable[[int, int], torch.Generator]] = None,
) -> Callable[[Tensor], Tensor]:
    """``gains_fn(levels[K]) -> gains[samples, K]`` for :func:`dense.calibrate_noise`.

    Each call draws ``samples`` rollouts (prompt ``i % len(prompts)`` for sample i) with the noise
    table ``levels`` (``sde.table``), scores them, estimates ``R`` with
    :func:`estimate_step_rewards` and returns the step gains. Prompts are encoded once.
    The rollouts draw from ``generator`` in one batch; with ``sample_generator(call, i)`` (``call``: 0, 1, ... for
    each call of ``gains_fn``) sample ``i`` is rolled out on its own from that generator, so a sample does not depend
    on which others it is drawn with (a multi-process run's ``sampling.noise_seeding: group``).
    """
    from flowalign import sampling, sde
    from flowalign.rewards import call_reward
    from flowalign.trajectory import cat_trajectories

    prompts = list(prompts)
    if not prompts or samples < 1:
        raise ValueError(f"need at least one prompt and samples >= 1, got {len(prompts)} prompts, samples={samples}")
    batch_prompts = [prompts[i % len(prompts)] for i in range(samples)]
    batch_meta = [dict(metadata[i % len(metadata)]) for i in range(samples)] if metadata else None
    cond = adapter.encode(batch_prompts, do_classifier_free_guidance=guidance_scale > 1.0)
    reward = _as_reward(reward)

    calls = itertools.count()

    def gains_fn(levels: Tensor) -> Tensor:
        levels = torch.as_tensor(levels, dtype=torch.float32).flatten()
        settings = dict(num_steps=levels.numel(), kernel=kernel, schedule=sde.table(levels), guidance_scale=guidance_scale,
                        micro_batch_size=micro_batch_size, record_x0=estimator == "tweedie")
        if sample_generator is None:
            traj = sampling.rollout(adapter, batch_prompts, generator=generator, metadata=batch_meta, cond=cond, **settings)
        else:
            call = next(calls)
            traj = cat_trajectories([
                sampling.rollout(adapter, [prompt], generator=sample_generator(call, i), cond=cond.select([i]),
                                 metadata=[batch_meta[i]] if batch_meta else None, **settings)
                for i, prompt in enumerate(batch_prompts)])
        with torch.no_grad():
            traj.rewards = call_reward(reward, traj.images, traj.prompts, traj.metadata, on_error=on_error).scores.float().cpu()
        R, _ = estimate_step_rewards(adapter, traj, cond, reward, estimator=estimator, stride=stride,
                                     guidance_scale=guidance_scale, max_batch=max_batch, on_error=on_error)
        R = R[torch.isfinite(R).all(dim=1)]
        return dense.step_gains(R)

    return gains_fn


def calibrate_noise_table_for(
    adapter,
    prompts: Sequence[str],
    reward,
    *,
    rounds: int,
    samples: int,
    initial_levels: Union[Sequence[float], Tensor],
    eps1: float = 2,
    eps2: float = 0.01,
    max_level: Optional[float] = None,
    kernel: str = "flow_sde",
    guidance_scale: float = 1.0,
    estimator: str = "ode",
    stride: int = 1,
    max_batch: Optional[int] = None,
    micro_batch_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    metadata: Optional[Sequence[Mapping]] = None,
    gains_fn: Optional[Callable[[Tensor], Tensor]] = None,
    on_error: Optional[str] = None,
    gather: Optional[Callable[[Tensor], Tensor]] = None,
    sample_generator: Optional[Callable[[int, int], torch.Generator]] = None,
) -> Tensor:
    """DenseGRPO's reward-aware noise calibration on a pipeline (arXiv 2601.20218) -> ``levels[K]``.

    Each of ``rounds`` rounds samples ``samples`` rollouts with the current table, estimates their
    step gains and moves each step's level by ±``eps2`` (:func:`dense.calibrate_noise_table`: up
    where positive and negative gains are balanced within ``eps1``, down otherwise). ``K`` is
    ``len(initial_levels)``. ``gains_fn`` replaces the rollout loop (:func:`rollout_gains_fn`).
    ``on_error`` (default: the reward's own ``on_error``, else ``"raise"``) is the dropped-sample policy:
    under ``"drop"`` a sample whose reward fails is left out of that round's gains, as in training.
    ``gather`` (several processes): each process rolls out its own ``samples`` (0 allowed) and
    ``gather(gains) -> every process's gains`` joins them each round, so every process moves the same table;
    ``sample_generator(round, i)`` seeds each of this process's samples on its own (:func:`rollout_gains_fn`), so the
    table does not depend on the number of processes either.
    Under ``kernel="cps"`` the levels are capped at 1 (and at ``max_level`` when lower): a step whose gains stay
    balanced, such as CPS's deterministic last step (all gains 0), climbs by ``eps2`` every round. A step that starts
    at level 0 (outside a noise window) stays 0 (:func:`flowalign.dense.calibrate_noise`).
    """
    levels = torch.as_tensor(initial_levels, dtype=torch.float32).flatten()
    if levels.numel() < 1 or bool((levels < 0).any()):
        raise ValueError(f"initial_levels must be a non-empty list of levels >= 0, got {levels.tolist()}")
    if gains_fn is None and gather is not None and samples < 1:  # fewer samples than processes: this one only gathers
        gains_fn = lambda levels: torch.zeros(0, torch.as_tensor(levels).numel())  # noqa: E731
    if gains_fn is None:
        gains_fn = rollout_gains_fn(adapter, prompts, reward, samples=samples, kernel=kernel, guidance_scale=guidance_scale,
                                    estimator=estimator, stride=stride, max_batch=max_batch, micro_batch_size=micro_batch_size,
                                    generator=generator, metadata=metadata,
                                    on_error=on_error or getattr(reward, "on_error", "raise"), sample_generator=sample_generator)
    if gather is not None:
        local = gains_fn
        gains_fn = lambda levels: gather(local(levels))  # noqa: E731
    from flowalign import sde

    bound = sde.max_level(kernel)  # a CPS level is an angle fraction: above 1 the rollout refuses it (a plugin's max_level too)
    if bound is not None:
        max_level = bound if max_level is None else min(max_level, bound)
    one_round, started, done = gains_fn, time.perf_counter(), itertools.count(1)

    def gains_fn(levels: Tensor) -> Tensor:  # each round says how far calibration is (SD3.5's recipe runs 20 of 96 rollouts)
        gains = one_round(levels)
        logger.info("noise-table calibration: round %d of %d (%.1f s so far)", next(done), rounds, time.perf_counter() - started)
        return gains

    table = dense.calibrate_noise(gains_fn, levels, rounds, eps1=eps1, eps2=eps2, max_level=max_level)
    logger.info("calibrated noise table after %d rounds: %s", rounds, [round(x, 4) for x in table.tolist()])
    return table


def save_noise_table(path: Union[str, Path], levels: Union[Sequence[float], Tensor], meta: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``levels[K]`` (and JSON-serialisable ``meta``: model, kernel, eps1/eps2, rounds, ...) to
    ``path`` as ``{"format": "flowalign.noise_table", "version": 1, "num_steps": K, "levels": [...],
    "meta": {...}}``, atomically (temp file + rename)."""
    values = torch.as_tensor(levels, dtype=torch.float32).flatten().tolist()
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"noise table levels must be finite and >= 0, got {values}")
    from flowalign.files import write_text_atomic

    doc = {"format": NOISE_TABLE_FORMAT, "version": NOISE_TABLE_VERSION, "num_steps": len(values), "levels": values, "meta": dict(meta or {})}
    return write_text_atomic(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")


def load_noise_table(path: Union[str, Path]) -> tuple[Tensor, dict[str, Any]]:
    """Read a table written by :func:`save_noise_table` -> ``(levels[K] fp32, meta)``.

    Raises:
        ConfigError: missing file, invalid JSON, wrong format / version, or bad levels.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"noise table file not found: {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"noise table {path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
    if not isinstance(doc, dict) or doc.get("format") != NOISE_TABLE_FORMAT:
        raise ConfigError(f"{path} is not a flowalign noise table (format={doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != NOISE_TABLE_VERSION:
        raise ConfigError(f"noise table {path} has version {doc.get('version')!r}; this flowalign reads version {NOISE_TABLE_VERSION}")
    values = doc.get("levels")
    if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in values):
        raise ConfigError(f"noise table {path}: 'levels' must be a non-empty list of numbers >= 0, got {values!r}")
    if doc.get("num_steps", len(values)) != len(values):
        raise ConfigError(f"noise table {path}: num_steps={doc.get('num_steps')} but {len(values)} levels")
    return torch.tensor(values, dtype=torch.float32), dict(doc.get("meta") or {})


def calibration_meta(cfg, initial_levels: Optional[Sequence[float]] = None) -> dict[str, Any]:
    """The settings a calibrated noise table depends on, as its file's ``meta`` records them: the ``dense``
    calibration keys, the sampler (kernel, steps, guidance, the levels calibration starts from: ``initial_levels``,
    default ``[a] * K``), the rewards (names, weights, kwargs) and the model."""
    d, s = _dense_config(cfg), cfg.sampling
    kwargs = s.noise_kwargs if isinstance(getattr(s, "noise_kwargs", None), Mapping) else {}
    a = float(kwargs.get("a", 0.7))
    start = [a] * s.num_steps if initial_levels is None else [float(x) for x in initial_levels]
    rewards = [[getattr(r, "key", getattr(r, "name", None)), float(getattr(r, "weight", 1.0)), dict(getattr(r, "kwargs", {}) or {})]
               for r in (getattr(cfg, "rewards", None) or [])]
    return {"initial_level": a, "initial_levels": [round(x, 6) for x in start], "rounds": d.calibration_rounds,
            "samples": d.calibration_samples, "eps1": d.eps1, "eps2": d.eps2, "max_level": d.max_level, "kernel": s.kernel,
            "estimator": d.estimator, "stride": d.stride, "num_steps": s.num_steps,
            "guidance_scale": getattr(s, "guidance_scale", None), "rewards": rewards,
            "model": getattr(getattr(cfg, "model", None), "pretrained", None)}


def schedule_start_levels(cfg) -> list[float]:
    """The levels a run's calibration starts from: ``sampling.noise_schedule``'s at iteration 0 (its random draws, if any,
    from ``train.seed``), as :func:`flowalign.train.dense_setup.calibrated_schedule` starts."""
    from flowalign import sde

    s = cfg.sampling
    schedule = sde.make_schedule(s.noise_schedule, **s.noise_kwargs)
    seed = int(getattr(getattr(cfg, "train", None), "seed", 0))
    return [float(x) for x in schedule.levels(s.num_steps, 0, torch.Generator().manual_seed(seed))]


def check_calibrated_table(path: Union[str, Path], cfg, initial_levels: Optional[Sequence[float]] = None) -> None:
    """ConfigError when ``dense.calibration_rounds > 0`` asks for a calibration and the existing table ``path`` was
    calibrated under other settings (its ``meta``, :func:`calibration_meta`; keys an older file lacks are not
    compared): the run would use the old table and ignore the settings asked for. A table without calibration
    (``calibration_rounds: 0``) is used as it is."""
    d = _dense_config(cfg)
    if not d.calibration_rounds or not Path(path).is_file():
        return
    _, meta = load_noise_table(path)
    now = calibration_meta(cfg, initial_levels)
    changed = [f"{key} {meta[key]!r} -> {now[key]!r}" for key in now if key in meta and meta[key] != now[key]]
    if changed:
        raise ConfigError(f"dense.noise_table_file {path} was calibrated under other settings ({', '.join(changed)}); "
                          "delete it (or name another file) to calibrate again, or set dense.calibration_rounds=0 to "
                          "use it as it is")


def noise_schedule_for(sampling_cfg, dense_cfg: Optional[DenseConfig] = None):
    """The sampling noise schedule of a run: ``sde.table`` of ``dense.noise_table_file`` when set,
    else ``sde.make_schedule(sampling.noise_schedule, **sampling.noise_kwargs)``."""
    from flowalign import sde

    table_file = getattr(dense_cfg, "noise_table_file", None) if dense_cfg is not None else None
    if getattr(dense_cfg, "calibration_rounds", 0) and not (table_file and Path(table_file).is_file()):
        logger.warning("dense.calibration_rounds=%d is ignored here: prepare_noise_schedule(adapter, prompts, reward, cfg) "
                       "calibrates the table; using sampling.noise_schedule", dense_cfg.calibration_rounds)
        table_file = None
    if table_file:
        levels, _ = load_noise_table(table_file)
        if levels.numel() != sampling_cfg.num_steps:
            raise ConfigError(f"noise table {table_file} has {levels.numel()} levels but sampling.num_steps={sampling_cfg.num_steps}")
        return sde.table(levels)
    return sde.make_schedule(sampling_cfg.noise_schedule, **sampling_cfg.noise_kwargs)


def prepare_noise_schedule(
    adapter,
    prompts: Sequence[str],
    reward,
    cfg,
    *,
    run_dir: Optional[Union[str, Path]] = None,
    generator: Optional[torch.Generator] = None,
    metadata: Optional[Sequence[Mapping]] = None,
):
    """The run's sampling noise schedule, calibrating DenseGRPO's table first when asked.

    Order: the table in ``dense.noise_table_file`` if that file exists; else ``run_dir /
    "noise_table.json"`` if it exists (a resumed run); else, with ``dense.calibration_rounds > 0``,
    :func:`calibrate_noise_table_for` from ``sampling.noise_kwargs["a"]`` at every step (written to
    ``dense.noise_table_file`` when that is set); else ``sampling.noise_schedule``. Calibration draws
    from ``generator`` (default: a fresh one seeded ``train.seed + 2``, leaving the training stream alone).

    Returns:
        ``(schedule, levels)``: ``levels[K]`` when the schedule is a table (the trainer saves it as
        ``run_dir / "noise_table.json"`` with :func:`save_noise_table`), else None.
    """
    from flowalign import sde

    d, s = _dense_config(cfg), cfg.sampling
    if d.noise_table_file:
        check_calibrated_table(d.noise_table_file, cfg)
    candidates = [Path(d.noise_table_file)] if d.noise_table_file else []
    if run_dir is not None:
        candidates.append(Path(run_dir) / "noise_table.json")
    for path in candidates:
        if path.is_file():
            levels = noise_schedule_for(s, DenseConfig(noise_table_file=str(path))).table
            logger.info("noise table from %s: %s", path, [round(x, 4) for x in levels.tolist()])
            return sde.table(levels), levels
    if d.calibration_rounds == 0:
        if d.noise_table_file:
            raise ConfigError(f"dense.noise_table_file {d.noise_table_file} does not exist and dense.calibration_rounds=0; calibrate it first")
        return noise_schedule_for(s, None), None
    a = float(s.noise_kwargs.get("a", 0.7)) if isinstance(s.noise_kwargs, Mapping) else 0.7
    seed = int(getattr(getattr(cfg, "train", None), "seed", 0)) + 2
    levels = calibrate_noise_table_for(
        adapter, prompts, _as_reward(reward, getattr(cfg, "rewards", None)), rounds=d.calibration_rounds, samples=d.calibration_samples,
        initial_levels=[a] * s.num_steps, eps1=d.eps1, eps2=d.eps2, max_level=d.max_level, kernel=s.kernel,
        guidance_scale=s.guidance_scale, estimator=d.estimator, stride=d.stride, max_batch=d.max_batch,
        micro_batch_size=getattr(s, "micro_batch_size", None), generator=generator or torch.Generator().manual_seed(seed), metadata=metadata,
        on_error=_dropped_sample_policy(cfg),
    )
    if d.noise_table_file:
        save_noise_table(d.noise_table_file, levels, calibration_meta(cfg, [a] * s.num_steps))
    return sde.table(levels), levels
