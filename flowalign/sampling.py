"""Rollout engine: sample groups of trajectories through an Adapter and record what training needs.

A rollout of ``P`` prompts with group size ``G`` draws ``B = P·G`` samples; prompt ``p`` owns rows
``p·G ... p·G + G - 1`` and ``group_ids = p`` (DESIGN.md §5). Each of the ``K`` steps is one
batched velocity call (CFG inside the adapter) followed by one transition of
:func:`flowalign.sde.step`; the engine records the latents, sigmas, per-step log-densities of
the drawn samples (:func:`flowalign.sde.log_prob`), kernel stds, noise levels, the stochastic
(trainable) mask, x0-predictions ``x0_hat = x - sigma·v`` and the decoded images.

Random draws, in order, all from ``generator`` (the global RNG when None): the schedule's noise
levels (random windows only; CPU generators only), the initial noise, then the kernel noise of
each stochastic step for the whole batch at once (preceded, with process-reward guidance, by that
step's SPSA directions: :mod:`flowalign.guidance`). Micro-batching splits only the velocity and
decode calls, so it never changes the random stream (results agree to float rounding, ~1e-6:
the transformer's matmuls sum in a batch-size-dependent order).

With a deterministic kernel or noise level 0 the rollout is the Euler sampler of the pipeline:
through :class:`flowalign.pipelines.sd3.SD3Adapter` it reproduces ``pipe(...)`` (tested).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from flowalign import guidance, sde
from flowalign.trajectory import Trajectory

logger = logging.getLogger(__name__)

__all__ = ["rollout", "sample_ode", "integrate", "Integration", "resolve_rollout", "check_rollout", "check_rollout_signature"]

Schedule = Any  # an object with .levels(num_steps, iteration=0, generator=None) -> Tensor[K]


@dataclass
class Integration:
    """Result of :func:`integrate`.

    Attributes:
        final: ``[B, *latent]`` sample after the last step.
        latents: ``[B, K+1, *latent]`` every state (``latents[:, 0]`` = start) or None.
        log_probs: ``[B, K]`` fp32 log-densities of the drawn steps (0 on deterministic steps) or None.
        stds: ``[B, K]`` fp32 kernel standard deviations or None.
        x0_preds: ``[B, K, *latent]`` ``x - sigma·v`` at each step or None.
        nfe: transformer evaluations (rows x steps, CFG counted twice).
    """

    final: Tensor
    latents: Optional[Tensor] = None
    log_probs: Optional[Tensor] = None
    stds: Optional[Tensor] = None
    x0_preds: Optional[Tensor] = None
    nfe: int = 0


def _chunks(batch: int, micro_batch_size: Optional[int]) -> list[slice]:
    if micro_batch_size is None or micro_batch_size >= batch:
        return [slice(0, batch)]
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return [slice(i, min(i + micro_batch_size, batch)) for i in range(0, batch, micro_batch_size)]


def noise_levels(schedule: Union[Schedule, float, None], num_steps: int, iteration: int = 0,
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """``[K]`` fp32 noise levels from a schedule object, a constant float, or None (all 0): what :func:`rollout`
    draws first from ``generator`` (a random window's position), before any noise; a sampler of its own (a
    tree's segments) draws them the same way."""
    if schedule is None:
        return torch.zeros(num_steps)
    if isinstance(schedule, (int, float)):
        return sde.constant(float(schedule)).levels(num_steps)
    cpu_gen = generator if generator is not None and generator.device.type == "cpu" else None
    levels = torch.as_tensor(schedule.levels(num_steps, iteration=iteration, generator=cpu_gen), dtype=torch.float32).cpu()
    if levels.shape != (num_steps,):
        raise ValueError(f"schedule {schedule!r} gave levels of shape {tuple(levels.shape)}, expected ({num_steps},)")
    return levels


@torch.no_grad()
def integrate(
    adapter,
    x: Tensor,
    cond,
    sigmas: Tensor,
    *,
    kernel: str = "ode",
    levels: Optional[Tensor] = None,
    guidance_scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
    log_prob_reduce: str = "mean",
    log_prob_form: str = "gaussian",
    record: bool = True,
    record_x0: bool = True,
    micro_batch_size: Optional[int] = None,
    drift_fn: Optional[Callable[..., Tensor]] = None,
    on_step: Optional[Callable[[int], None]] = None,
) -> Integration:
    """Run ``K = len(sigmas) - 1`` transitions from ``x`` at ``sigmas[0]`` (the core of :func:`rollout`).

    Args:
        adapter: a ``flowalign.pipelines.Adapter``.
        x: ``[B, *latent]`` start latents (at ``sigmas[0]``; need not be 1, e.g. ODE completions).
        cond: ``Conditioning`` with ``B`` rows.
        sigmas: ``[K+1]`` decreasing sigmas.
        kernel, levels: transition kernel (``flowalign.sde.KERNELS``) and ``[K]`` noise levels
            (None: 0 everywhere, i.e. deterministic).
        record: keep all latents, log-probs and stds (else only the final sample).
        record_x0: also keep ``x0_hat = x - sigma·v`` (needs ``record``).
        micro_batch_size: rows per velocity call (None: the whole batch in one call).
        drift_fn: process-reward guidance (:func:`flowalign.guidance.bind`):
            ``drift_fn(x0_hat, std, generator) -> [B, *latent]``, called at each stochastic step
            before its kernel noise is drawn; the drift moves the sample, not the recorded
            log-density's mean (:func:`flowalign.sde.step`).
        on_step: called with ``k`` after transition ``k`` (a progress bar).
    """
    num_steps = sigmas.shape[0] - 1
    if levels is None:
        levels = torch.zeros(num_steps)
    if levels.shape != (num_steps,):
        raise ValueError(f"levels must have shape ({num_steps},) for {num_steps + 1} sigmas, got {tuple(levels.shape)}")
    batch = x.shape[0]
    chunks = _chunks(batch, micro_batch_size)
    conds = [cond if len(chunks) == 1 else cond.select(c) for c in chunks]
    sig = sigmas.tolist()
    lev = levels.tolist()

    out = Integration(final=x)
    if record:
        out.latents = x.new_empty((batch, num_steps + 1, *x.shape[1:]))  # [B, K+1, *latent]
        out.latents[:, 0] = x
        out.log_probs = torch.zeros(batch, num_steps, dtype=torch.float32, device=x.device)
        out.stds = torch.zeros(batch, num_steps, dtype=torch.float32, device=x.device)
        if record_x0:
            out.x0_preds = x.new_empty((batch, num_steps, *x.shape[1:]))
    cfg_factor = 2 if guidance_scale > 1.0 else 1

    for k in range(num_steps):
        s, s_next = sig[k], sig[k + 1]
        if len(chunks) == 1:
            v = adapter.velocity(x, s, cond, guidance_scale)
        else:
            v = torch.cat([adapter.velocity(x[c], s, cc, guidance_scale) for c, cc in zip(chunks, conds)])
        drift = None
        if drift_fn is not None and lev[k] > 0:
            std_k = sde.step(kernel, x, v, s, s_next, lev[k], noise=torch.zeros_like(x)).std  # no draw
            if bool((std_k > 0).any()):
                drift = drift_fn(x - s * v.to(x.dtype), std_k, generator)
        step = sde.step(kernel, x, v, s, s_next, lev[k], generator=generator, drift=drift)
        if record:
            out.latents[:, k + 1] = step.prev_sample
            std = step.std.reshape(-1)  # [B] or [1]
            out.stds[:, k] = std
            if bool((std > 0).any()):
                out.log_probs[:, k] = sde.log_prob(step.prev_sample, step.mean, step.std, reduce=log_prob_reduce,
                                                      form=log_prob_form)
            if record_x0:
                out.x0_preds[:, k] = x - s * v.to(x.dtype)
        x = step.prev_sample
        out.nfe += cfg_factor * batch
        if on_step is not None:
            on_step(k)
    out.final = x
    return out


def _expand_metadata(metadata: Optional[Sequence[dict]], num_prompts: int, group_size: int) -> list[dict]:
    batch = num_prompts * group_size
    if metadata is None:
        return [{} for _ in range(batch)]
    metadata = list(metadata)
    if len(metadata) == num_prompts:
        return [dict(m) for m in metadata for _ in range(group_size)]
    if len(metadata) == batch:
        return [dict(m) for m in metadata]
    raise ValueError(f"metadata has {len(metadata)} entries; expected one per prompt ({num_prompts}) or per sample ({batch})")


@torch.no_grad()
def _decode(adapter, latents: Tensor, micro_batch_size: Optional[int]) -> Tensor:
    chunks = _chunks(latents.shape[0], micro_batch_size)
    if len(chunks) == 1:
        return adapter.decode(latents)
    return torch.cat([adapter.decode(latents[c]) for c in chunks])


@torch.no_grad()
def rollout(
    adapter,
    prompts: Sequence[str],
    *,
    group_size: int = 1,
    num_steps: int,
    kernel: str = "flow_sde",
    schedule: Union[Schedule, float, None] = None,
    guidance_scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
    share_initial_noise: bool = False,
    log_prob_reduce: str = "mean",
    log_prob_form: str = "gaussian",
    record_x0: bool = True,
    decode: bool = True,
    iteration: int = 0,
    metadata: Optional[Sequence[dict]] = None,
    initial_noise: Optional[Tensor] = None,
    micro_batch_size: Optional[int] = None,
    cond=None,
    drift=None,
    on_step: Optional[Callable[[int], None]] = None,
) -> Trajectory:
    """Sample ``group_size`` trajectories per prompt and record them (DESIGN.md §5).

    Args:
        adapter: a ``flowalign.pipelines.Adapter``.
        prompts: ``P`` prompts; sample ``p·G + j`` is the ``j``-th of prompt ``p``.
        group_size: ``G`` samples per prompt.
        num_steps: ``K`` denoising steps; sigmas come from ``adapter.sigmas(K)``.
        kernel: ``"ode"``, ``"flow_sde"``, ``"dance_sde"``, ``"cps"`` (``flowalign.sde``) or a kernel of your own
            (``flowalign.sde.kernel_plugin``).
        schedule: noise schedule (``flowalign.sde.make_schedule(...)``), a float (constant level)
            or None (level 0: deterministic).
        guidance_scale: CFG scale (> 1 enables CFG, as in diffusers).
        generator: source of every random draw (see the module docstring for the order).
        share_initial_noise: one initial noise per prompt, shared by its group.
        log_prob_reduce: ``"mean"`` or ``"sum"`` over latent dimensions.
        log_prob_form: ``"gaussian"`` (the transition's log-density) or ``"squared_error"``
            (``-(x' - mean)²``, the CPS reference code's surrogate; :func:`flowalign.sde.log_prob`).
        record_x0: record ``x0_hat = x - sigma·v`` per step.
        decode: decode the final latents to images in [0, 1].
        iteration: training iteration, passed to the schedule (sliding windows).
        metadata: one dict per prompt (repeated over its group) or per sample.
        initial_noise: ``[B, *latent]`` start latents (replaces the draw).
        micro_batch_size: rows per transformer / VAE call (memory); results are unchanged up
            to float rounding.
        cond: precomputed ``Conditioning`` for the ``P`` prompts (skips ``adapter.encode``).
        drift: a :class:`flowalign.guidance.RewardDrift` (Euphonium's process-reward guidance of
            the stochastic steps) or None. Its random draws (SPSA directions) come from
            ``generator`` at each stochastic step, before that step's kernel noise.
        on_step: called with ``k`` after denoising step ``k`` of the batch (a progress bar).

    Returns:
        a :class:`flowalign.trajectory.Trajectory` with ``B = P·G`` rows.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    num_prompts, batch = len(prompts), len(prompts) * group_size
    if group_size < 1 or num_prompts < 1:
        raise ValueError(f"need at least one prompt and group_size >= 1, got {num_prompts} prompts, group_size={group_size}")
    sde.kernel_plugin(kernel)  # ValueError for a name that is neither a built-in nor a kernel of the user's
    sample_metadata = _expand_metadata(metadata, num_prompts, group_size)

    sigmas = adapter.sigmas(num_steps).to(torch.float32).cpu()  # [K+1]
    levels = noise_levels(schedule, num_steps, iteration, generator)  # [K]
    mask = sde.is_stochastic(kernel, sigmas[:-1], sigmas[1:], levels)  # [K] bool

    if cond is None:
        cond = adapter.encode(prompts, do_classifier_free_guidance=guidance_scale > 1.0)
    if cond.batch_size != num_prompts:
        raise ValueError(f"cond has {cond.batch_size} rows for {num_prompts} prompts")
    cond = cond.repeat_interleave(group_size) if group_size > 1 else cond  # [B] rows

    if initial_noise is None:
        if share_initial_noise:
            initial_noise = adapter.initial_noise(num_prompts, generator).repeat_interleave(group_size, dim=0)
        else:
            initial_noise = adapter.initial_noise(batch, generator)
    elif share_initial_noise:
        raise ValueError("pass share_initial_noise=True or initial_noise, not both (the given noise replaces the shared draw)")
    else:
        check_initial_noise(adapter, initial_noise, batch)

    run = integrate(
        adapter,
        initial_noise,
        cond,
        sigmas,
        kernel=kernel,
        levels=levels,
        guidance_scale=guidance_scale,
        generator=generator,
        log_prob_reduce=log_prob_reduce,
        log_prob_form=log_prob_form,
        record=True,
        record_x0=record_x0,
        micro_batch_size=micro_batch_size,
        drift_fn=guidance.bind(drift, [p for p in prompts for _ in range(group_size)], sample_metadata),
        on_step=on_step,
    )
    images = _decode(adapter, run.final, micro_batch_size) if decode else None
    group_ids = torch.arange(num_prompts, device=run.final.device).repeat_interleave(group_size)
    return Trajectory(
        prompts=[p for p in prompts for _ in range(group_size)],
        group_ids=group_ids,
        sigmas=sigmas,
        latents=run.latents,
        log_probs=run.log_probs,
        stds=run.stds,
        noise_levels=levels,
        stochastic_mask=mask,
        x0_preds=run.x0_preds,
        images=images,
        kernel=kernel,
        guidance_scale=float(guidance_scale),
        metadata=sample_metadata,
        nfe=run.nfe,
        log_prob_reduce=log_prob_reduce,
        log_prob_form=log_prob_form,
    )


def check_initial_noise(adapter, noise: Tensor, batch: int) -> None:
    """ValueError unless ``noise`` is a finite floating ``[batch, *latent_shape]`` tensor (the adapter's
    ``latent_shape`` when it has one): latents of another size ran and decoded to images of another size, integer
    ones truncated every step to integers, and NaN ones gave NaN log-probs, all without a word."""
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise ValueError(f"initial_noise must be a floating tensor, got {getattr(noise, 'dtype', type(noise).__name__)}")
    if noise.shape[0] != batch:
        raise ValueError(f"initial_noise has {noise.shape[0]} rows, expected P*G = {batch}")
    shape = getattr(adapter, "latent_shape", None)
    if shape is not None and tuple(noise.shape[1:]) != tuple(shape):
        raise ValueError(f"initial_noise has latents {tuple(noise.shape[1:])}, the model's are {tuple(shape)}")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("initial_noise holds NaN or inf")


@torch.no_grad()
def sample_ode(
    adapter,
    prompts: Sequence[str],
    *,
    num_steps: int,
    guidance_scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
    group_size: int = 1,
    initial_noise: Optional[Tensor] = None,
    decode: bool = True,
    micro_batch_size: Optional[int] = None,
) -> Tensor:
    """Noise-free (Euler ODE) samples for evaluation: ``[P·G, 3, H, W]`` images in [0, 1]
    (or the final latents when ``decode=False``). Keeps only the current state in memory."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if group_size < 1 or not prompts:
        raise ValueError(f"need at least one prompt and group_size >= 1, got {len(prompts)} prompts, group_size={group_size}")
    batch = len(prompts) * group_size
    if initial_noise is not None:
        check_initial_noise(adapter, initial_noise, batch)
    cond = adapter.encode(prompts, do_classifier_free_guidance=guidance_scale > 1.0)
    cond = cond.repeat_interleave(group_size) if group_size > 1 else cond
    x = adapter.initial_noise(batch, generator) if initial_noise is None else initial_noise
    run = integrate(
        adapter,
        x,
        cond,
        adapter.sigmas(num_steps).to(torch.float32).cpu(),
        kernel="ode",
        guidance_scale=guidance_scale,
        record=False,
        micro_batch_size=micro_batch_size,
    )
    return _decode(adapter, run.final, micro_batch_size) if decode else run.final


# --------------------------------------------------------------------------------------------
# rollouts of your own (trees, branches: sampling.rollout)
# --------------------------------------------------------------------------------------------

ROLLOUT_ENTRY_POINT_GROUP = "flowalign.rollouts"  # [project.entry-points."flowalign.rollouts"]
_ROLLOUT_PARAMETERS = ("group_size", "num_steps", "kernel", "schedule", "guidance_scale", "generator", "share_initial_noise",
                       "log_prob_reduce", "log_prob_form", "record_x0", "decode", "iteration", "metadata", "initial_noise",
                       "micro_batch_size", "cond", "drift", "on_step")
# the keywords the trainer passes a rollout (train/runtime.py rollout_groups): the engine's, but decode and initial_noise
_TRAINER_ROLLOUT_KEYWORDS = tuple(k for k in _ROLLOUT_PARAMETERS if k not in ("decode", "initial_noise"))


def resolve_rollout(name: str) -> Callable[..., Trajectory]:
    """The function ``sampling.rollout`` names: :func:`rollout` for ``"default"``, else a rollout of your own.

    A rollout of your own (a tree or branch sampler: BranchGRPO, TreeGRPO) is an entry point of group
    :data:`ROLLOUT_ENTRY_POINT_GROUP` or a dotted path ``"pkg.module:fn"``: a function with :func:`rollout`'s
    signature (``fn(adapter, prompts, *, group_size, num_steps, kernel, schedule, ..., **rollout_kwargs)``, the
    recipe's ``sampling.rollout_kwargs`` passed as extra keywords) that returns a :class:`Trajectory` laid out as
    :func:`rollout`'s is: ``B = P·G`` rows, prompt ``p``'s ``G`` samples (a tree's leaves) in rows ``p·G .. p·G + G - 1``
    with ``group_ids = p``, each row the full path ``latents[:, 0..K]`` of its sample (a prefix shared by several
    leaves repeated in each), ``log_probs`` / ``stds`` of every step of that path and one ``[K]`` stochastic mask
    (:func:`check_rollout`), recorded with the kernel, guidance and log-prob reduce / form it was given. Its signature
    must take every keyword the trainer passes (:func:`check_rollout_signature`, at load), and name ``drift`` /
    ``share_initial_noise`` itself when the recipe sets them. A ``validate(sampling_config)`` attribute on the function,
    when present, is called at load too (the recipe's ``SamplingConfig``; raise ``ConfigError`` for ``rollout_kwargs``
    that cannot work, such as a branch on a step without noise). DenseGRPO's noise calibration still rolls out with the
    default engine. :func:`integrate` continues a batch from any step, which is what a branch needs.
    Advantages along a tree come from the objective's ``advantages`` method (``flowalign.objectives.base.Objective``),
    which may read what the rollout recorded in each sample's ``metadata``.
    """
    if name == "default":
        return rollout
    from flowalign.plugins import require_callable_plugin

    return require_callable_plugin(name, ROLLOUT_ENTRY_POINT_GROUP, "rollout",
                                   f"unknown rollout {name!r}: 'default', an entry point of group {ROLLOUT_ENTRY_POINT_GROUP!r} or a "
                                   "dotted path 'pkg.module:fn' with flowalign.sampling.rollout's signature",
                                   "a function with flowalign.sampling.rollout's signature")


def check_rollout_signature(fn: Callable, name: str, rollout_kwargs: dict, explicit: Sequence[str] = ()) -> None:
    """ConfigError, at load, when rollout ``fn`` cannot take every keyword the trainer passes
    (:data:`_TRAINER_ROLLOUT_KEYWORDS` and ``rollout_kwargs``), requires one the trainer does not pass (a parameter
    without a default, past ``adapter, prompts``), or takes one of ``explicit`` (settings that change the samples,
    such as ``drift`` under ``sampling.drift_reward``) only through ``**kwargs``, where it would be dropped unread."""
    import inspect

    from flowalign.errors import ConfigError

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return  # a builtin or C callable: nothing to read
    named = {p.name for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    passed = (*_TRAINER_ROLLOUT_KEYWORDS, *rollout_kwargs)
    listed = list(params.values())
    positional = [p for p in listed if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]  # adapter, prompts
    required = [p.name for p in listed if p not in positional and p.default is p.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in passed]
    if required:
        raise ConfigError(f"rollout {name!r} requires the keyword(s) {required}, which the trainer does not pass (it passes "
                          f"{sorted(passed)}): give them defaults, or set them in sampling.rollout_kwargs")
    if not open_ended:
        missing = [k for k in passed if k not in named]
        if missing:
            raise ConfigError(f"rollout {name!r} does not take the keyword(s) {missing}, which the trainer passes"
                              + (" (sampling.rollout_kwargs)" if set(missing) & set(rollout_kwargs) else "")
                              + ": add them to its signature, or a **kwargs it may ignore")
    unread = [k for k in explicit if k not in named]
    if unread:
        raise ConfigError(f"rollout {name!r} takes {unread} only through **kwargs, and the recipe sets them (they change the samples): "
                          "name them in its signature to show it honours them, or leave those settings at their defaults")


def check_rollout(traj: Any, *, name: str, num_prompts: int, group_size: int, num_steps: int, sampling_config: Any = None) -> Trajectory:
    """``traj`` when a rollout of your own returned what the trainer reads (:func:`resolve_rollout`), else a
    ConfigError naming the rollout and the first field that is off. With ``sampling_config`` its kernel, guidance
    and log-prob reduce / form must be the recipe's (the update recomputes the log-probs that way) and its
    stochastic mask must be what the kernel says of its sigmas and levels."""
    from flowalign.errors import ConfigError

    where = f"rollout {name!r}"
    if not isinstance(traj, Trajectory):
        raise ConfigError(f"{where} returned a {type(traj).__name__}, not a flowalign.trajectory.Trajectory")
    if traj.images is None:
        raise ConfigError(f"{where} returned no images: the rewards score the decoded samples (adapter.decode of the final latents)")
    batch, k = num_prompts * group_size, num_steps
    expected_ids = torch.arange(num_prompts).repeat_interleave(group_size)
    checks = [
        ("latents", tuple(traj.latents.shape[:2]), (batch, k + 1)),
        ("log_probs", tuple(traj.log_probs.shape), (batch, k)),
        ("stds", tuple(traj.stds.shape), (batch, k)),
        ("sigmas", tuple(traj.sigmas.shape), (k + 1,)),
        ("noise_levels", tuple(traj.noise_levels.shape), (k,)),
        ("stochastic_mask", tuple(traj.stochastic_mask.shape), (k,)),
        ("prompts", len(traj.prompts), batch),
        ("images", int(traj.images.shape[0]), batch),
    ]
    for field_name, got, want in checks:
        if got != want:
            raise ConfigError(f"{where}: {field_name} has shape {got}, expected {want} ({num_prompts} prompts x group_size "
                             f"{group_size}, {num_steps} steps)")
    if traj.stochastic_mask.dtype != torch.bool:
        raise ConfigError(f"{where}: stochastic_mask must be a bool tensor, got {traj.stochastic_mask.dtype}")
    if not torch.equal(traj.group_ids.cpu().long(), expected_ids):
        raise ConfigError(f"{where}: group_ids must be {expected_ids.tolist()[:16]}{'...' if batch > 16 else ''} (prompt p's samples in "
                         f"rows p*G .. p*G + G - 1), got {traj.group_ids.tolist()[:16]}")
    if not bool(torch.isfinite(traj.log_probs).all()):
        raise ConfigError(f"{where}: log_probs are not all finite")
    if sampling_config is not None:
        s = sampling_config
        for field_name, got, want in (("kernel", traj.kernel, s.kernel), ("guidance_scale", float(traj.guidance_scale), float(s.guidance_scale)),
                                      ("log_prob_reduce", traj.log_prob_reduce, s.log_prob_reduce),
                                      ("log_prob_form", traj.log_prob_form, s.log_prob_form)):
            if got != want:
                raise ConfigError(f"{where} recorded {field_name}={got!r} where the recipe's sampling.{field_name} is {want!r}: the update "
                                  "recomputes each step's log-prob with the recipe's settings, so every ratio would start away from 1 "
                                  "(pass the keyword it was given on to the Trajectory)")
        mask = sde.is_stochastic(traj.kernel, traj.sigmas[:-1].cpu(), traj.sigmas[1:].cpu(), traj.noise_levels.cpu())
        if not torch.equal(traj.stochastic_mask.cpu(), mask):
            raise ConfigError(f"{where}: stochastic_mask {traj.stochastic_mask.tolist()} is not what kernel {traj.kernel!r} gives its sigmas "
                              f"and noise_levels ({mask.tolist()}: flowalign.sde.is_stochastic)")
    return traj
