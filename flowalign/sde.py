"""Transition kernels x_sigma -> x_sigma' for flow-matching samplers, and per-step noise schedules.

Conventions (DESIGN.md §4): sigma runs from 1 (noise) to 0 (data), ``x_sigma = (1 - sigma)·x0 +
sigma·noise``, the model predicts the velocity ``v = noise - x0``, and one step goes from
``s = sigma_i`` to ``s' = sigma_{i+1}`` with ``dt = s' - s < 0``.

Every kernel is a Gaussian ``x' ~ N(mean, std²)`` with a per-sample scalar ``std`` (it depends on
the sigmas and the noise level only, never on the model), so the policy log-density of a recorded
transition is :func:`log_prob` of the recorded ``x'`` under the ``mean`` recomputed by the policy.

Kernels (:func:`step`):

* ``"ode"``: Euler step ``x' = x + dt·v`` (diffusers' ``FlowMatchEulerDiscreteScheduler.step``).
* ``"flow_sde"``: Flow-GRPO (arXiv 2505.05470, Eq. 9-12), noise level ``a``.
* ``"dance_sde"``: DanceGRPO (arXiv 2505.07818, Eq. 6), noise level ``eta``.
* ``"cps"``: coefficient-preserving sampling (arXiv 2509.05952, Eq. 10), noise level ``a`` in [0, 1].
* a kernel of your own: an entry point of group ``flowalign.kernels`` or a dotted path ``"pkg.mod:fn"``
  (see :func:`kernel_plugin`), a function ``(x, v, s, s_next, level) -> (mean, std)`` like the four above.

Boundary steps (decided once, here):

* **First step (s = 1).** Flow-SDE's ``std_t = a·sqrt(s/(1-s))`` is infinite at s = 1; as in
  Flow-GRPO's ``sd3_sde_with_logprob`` we put sigma_1 (the next sigma, i.e. the first sigma below
  1 of the schedule) in the denominator: ``std_t = a·sqrt(1/(1-s'))``. With a one-step schedule
  (s' = 0) that gives ``std_t = a``. Dance-SDE and CPS are finite at s = 1 without a special case.
* **Last step (s' = 0).** Flow-SDE and Dance-SDE stay stochastic and finite (their std depends on
  s > 0). CPS has ``std = s'·sin(a·pi/2) = 0``: the last CPS step is deterministic (it lands
  exactly on x0-hat) and is excluded from training by design.
* Deterministic steps (``std == 0``: the ODE kernel, noise level 0, the last CPS step) have no
  density; :func:`log_prob` returns 0 for such rows (as ``Trajectory.log_probs`` records) and
  :func:`is_stochastic` tells the sampler which steps to mark trainable. Their mean is the Euler step
  taken as :func:`ode_kernel` takes it, so it equals the ODE step bit for bit in any dtype.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from flowalign.errors import ConfigError

KERNELS = ("ode", "flow_sde", "dance_sde", "cps")
KERNEL_ENTRY_POINT_GROUP = "flowalign.kernels"  # [project.entry-points."flowalign.kernels"]
MAX_LEVELS = {"cps": 1.0}  # built-in kernels whose noise level is bounded (CPS: a fraction of a right angle)
ScalarOrBatch = Union[float, Tensor]


@dataclass
class SDEStep:
    """Output of :func:`step`.

    Attributes:
        prev_sample: ``x'`` with the shape and dtype of ``x`` (the sample after the step).
        mean: fp32 mean of the kernel, same shape as ``x``.
        std: fp32 standard deviation, ``[B, 1, ..., 1]`` (broadcastable to ``x``; ``std.flatten()``
            is the per-sample ``[B]`` value); 0 for deterministic steps.
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor

    def __iter__(self):
        """``x_next, mean, std = sde.step(...)`` (DESIGN §4's ``(x_next, mean, std)``) as well as ``out.mean``."""
        return iter((self.prev_sample, self.mean, self.std))


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def _as_column(value: ScalarOrBatch, x: Tensor, name: str) -> Tensor:
    """float or [B] tensor -> fp32 tensor broadcastable to ``x`` (0-d, or [B, 1, ..., 1])."""
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must be a float or a [B]={x.shape[0]} tensor, got shape {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def _check_finite(**values: ScalarOrBatch) -> None:
    """ValueError naming the first non-finite input (NaN passes every range comparison below)."""
    for name, value in values.items():
        t = torch.as_tensor(value)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite, got {t.flatten().tolist()}")


def _check_inputs(kind: str, sigma: Tensor, sigma_next: Tensor, noise_level: Tensor) -> None:
    kernel_plugin(kind)  # ValueError (a ConfigError) for a name that is neither a built-in nor a plugin
    _check_finite(sigma=sigma, sigma_next=sigma_next, noise_level=noise_level)
    if bool(((sigma > 1) | (sigma_next < 0)).any()):
        raise ValueError(f"sigmas must lie in [0, 1], got sigma={sigma.flatten().tolist()}, sigma_next={sigma_next.flatten().tolist()}")
    if bool((sigma_next >= sigma).any()):
        raise ValueError(
            f"a step needs sigma_next < sigma (denoising direction), got sigma={sigma.flatten().tolist()}, "
            f"sigma_next={sigma_next.flatten().tolist()}"
        )
    if bool((noise_level < 0).any()):
        raise ValueError(f"noise_level must be >= 0, got {noise_level.flatten().tolist()}")
    bound = max_level(kind)  # CPS's level is an angle fraction in [0, 1]; a kernel of your own may set its max_level
    if bound is not None and bool((noise_level > bound).any()):
        raise ValueError(f"kernel {kind!r} takes noise levels in [0, {bound:g}], got {noise_level.flatten().tolist()}")


# --------------------------------------------------------------------------------------------
# kernels: each returns (mean, std) in fp32
# --------------------------------------------------------------------------------------------


def ode_kernel(x: Tensor, v: Tensor, s: Tensor, s_next: Tensor) -> tuple[Tensor, Tensor]:
    """Euler step of the probability-flow ODE: ``x' = x + (s' - s)·v``, std = 0.

    Identical to ``FlowMatchEulerDiscreteScheduler.step`` (diffusers), bit for bit in any dtype: it adds
    to the fp32 sample the product ``dt·v`` taken in the velocity's dtype, so for an fp16 / bf16 ``v``
    ``dt`` is rounded to that dtype and the product too (pass ``v`` uncast).
    """
    dt = s_next - s
    if v.dtype in (torch.float16, torch.bfloat16):
        return x.float() + (dt.to(v.dtype) * v).float(), torch.zeros_like(dt)
    return x + dt * v.float(), torch.zeros_like(dt)


def flow_sde_kernel(x: Tensor, v: Tensor, s: Tensor, s_next: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Flow-GRPO reverse SDE, Euler-Maruyama step (Liu et al., arXiv 2505.05470, Eq. 9-12).

    std_t = a·sqrt(s / (1 - s))                    (s -> s' in the denominator when s = 1)
    mean  = x·(1 + std_t²·dt / (2s)) + v·(1 + std_t²·(1 - s) / (2s))·dt
    std   = std_t·sqrt(-dt)
    """
    dt = s_next - s
    denom = torch.where(s >= 1, s_next, s)  # sigma_1 at the first step (see module docstring)
    std_t = a * torch.sqrt(s / (1 - denom))
    mean = x * (1 + std_t**2 * dt / (2 * s)) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_t * torch.sqrt(-dt)


def dance_sde_kernel(x: Tensor, v: Tensor, s: Tensor, s_next: Tensor, eta: Tensor) -> tuple[Tensor, Tensor]:
    """DanceGRPO reverse SDE step (Xue et al., arXiv 2505.07818, Eq. 6 / ``flux_step``).

    x0_hat = x - s·v;  score = -(x - (1 - s)·x0_hat) / s²
    mean   = x + dt·v - ½·eta²·score·dt
    std    = eta·sqrt(s - s')
    """
    dt = s_next - s
    x0_hat = x - s * v
    score = -(x - (1 - s) * x0_hat) / s**2
    mean = x + dt * v - 0.5 * eta**2 * score * dt
    return mean, eta * torch.sqrt(s - s_next)


def cps_kernel(x: Tensor, v: Tensor, s: Tensor, s_next: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Coefficient-preserving sampling (Wang & Yu, arXiv 2509.05952, Eq. 10).

    std    = s'·sin(a·pi/2)
    x0_hat = x - s·v;  x1_hat = x + (1 - s)·v          (predicted data and predicted noise)
    mean   = (1 - s')·x0_hat + sqrt(s'² - std²)·x1_hat
    The noise coefficients satisfy (s'² - std²) + std² = s'², so x' has the form (1 - s')·x0 + s'·noise
    with unit-variance noise when x0_hat and x1_hat are the sample's own data and noise (a per-sample oracle
    v = noise - x0). A model's v is the conditional mean E[noise - x0 | x], which shrinks x0_hat towards the
    data mean: then CPS does not preserve the marginal. On 1-D Gaussian data (std 0.5) with the exact
    velocity at level 0.7, the final std is 0.37 / 0.42 / 0.42 at 10 / 100 / 1000 steps (Flow-SDE: 0.48 /
    0.50 / 0.50), and more steps do not close the gap.
    """
    std = s_next * torch.sin(a * (math.pi / 2))
    x0_hat = x - s * v
    x1_hat = x + (1 - s) * v
    coef = torch.sqrt(torch.clamp(s_next**2 - std**2, min=0.0))
    return (1 - s_next) * x0_hat + coef * x1_hat, std


# --------------------------------------------------------------------------------------------
# kernels of your own
# --------------------------------------------------------------------------------------------


def kernel_plugin(kind: str) -> Optional[Callable]:
    """The function of a transition kernel named ``kind``; None for the built-ins (:data:`KERNELS`).

    A kernel of your own is named in a recipe (``sampling.kernel``, ``flowalign generate``'s ``kernel``) by
    an entry point of group :data:`KERNEL_ENTRY_POINT_GROUP` or a dotted path ``"pkg.module:fn"``. It is a
    function (or a callable object) with the signature of the built-in kernels::

        def my_kernel(x, v, s, s_next, level):       # fp32 tensors
            ...                                       # x, v: [B, *latent]; s, s_next, level: 0-d or [B, 1, ..., 1]
            return mean, std                          # mean: [B, *latent]; std >= 0, broadcastable to [B, 1, ..., 1]

    The step draws ``x' = mean + std·noise``; :func:`log_prob` is the Gaussian density of ``x'`` under the
    policy's recomputed ``mean``, as for the built-ins. ``std`` must depend on the sigmas and the level
    only, never on ``x`` or ``v`` (a step's trainability is decided before the model runs, by
    :func:`is_stochastic`); a row with ``std == 0`` is deterministic and untrained, and a level of 0 is
    expected to give ``std == 0`` (the noise schedules' "ODE step"). An optional ``max_level`` attribute
    (a float) bounds the level, as CPS's angle fraction is bounded by 1; recipes are checked against it.
    """
    if kind in KERNELS:
        return None
    return _load_kernel(kind)


@functools.lru_cache(maxsize=64)
def _load_kernel(kind: str) -> Callable:
    from flowalign.plugins import require_callable_plugin

    found = require_callable_plugin(kind, KERNEL_ENTRY_POINT_GROUP, "transition kernel",
                                    f"kind={kind!r} is not a transition kernel; choose one of {KERNELS}, an entry point of group "
                                    f"{KERNEL_ENTRY_POINT_GROUP!r} or a dotted path 'pkg.module:fn'",
                                    "a function (x, v, s, s_next, level) -> (mean, std)")
    bound = getattr(found, "max_level", None)
    if bound is not None and not (isinstance(bound, (int, float)) and not isinstance(bound, bool) and bound > 0 and math.isfinite(bound)):
        raise ConfigError(f"transition kernel {kind!r}: max_level must be a finite number > 0 or absent, got {bound!r}")
    return found


def max_level(kind: str) -> Optional[float]:
    """The largest noise level kernel ``kind`` takes (1 for CPS, a plugin's ``max_level``), or None when unbounded."""
    fn = kernel_plugin(kind)
    if fn is None:
        return MAX_LEVELS.get(kind)
    bound = getattr(fn, "max_level", None)
    return None if bound is None else float(bound)


def _plugin_mean_std(kind: str, fn: Callable, x: Tensor, v: Tensor, s: Tensor, s_next: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
    """A plugin kernel's ``(mean, std)``, checked: mean of ``x``'s shape, finite std >= 0 of one value per row."""
    try:
        out = fn(x, v, s, s_next, level)
        mean, std = out
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"transition kernel {kind!r} must return (mean, std) from (x, v, s, s_next, level): {type(exc).__name__}: {exc}") from exc
    mean = torch.as_tensor(mean)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    if mean.shape != x.shape:
        raise ConfigError(f"transition kernel {kind!r} returned a mean of shape {tuple(mean.shape)}; it must have x's shape {tuple(x.shape)}")
    column = (x.shape[0],) + (1,) * (x.ndim - 1)
    try:
        std = torch.broadcast_to(std, column)
    except RuntimeError:
        raise ConfigError(f"transition kernel {kind!r} returned a std of shape {tuple(std.shape)}; it must be one value per sample, "
                         f"broadcastable to {column} (the noise scale may depend on the sigmas and the level only)") from None
    if not bool(torch.isfinite(std).all()) or bool((std < 0).any()):
        raise ConfigError(f"transition kernel {kind!r} returned std {std.flatten().tolist()}: it must be finite and >= 0")
    return mean.float(), std


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def step(
    kind: str,
    x: Tensor,
    v: Tensor,
    sigma: ScalarOrBatch,
    sigma_next: ScalarOrBatch,
    noise_level: ScalarOrBatch = 0.0,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    drift: Optional[Tensor] = None,
) -> SDEStep:
    """One transition x_sigma -> x_sigma_next with kernel ``kind`` (see module docstring).

    Args:
        kind: ``"ode"``, ``"flow_sde"``, ``"dance_sde"``, ``"cps"`` or a kernel of your own (:func:`kernel_plugin`).
        x: ``[B, *latent]`` latent at ``sigma`` (images ``[B, C, H, W]``, videos ``[B, C, F, H, W]``).
        v: velocity prediction, same shape as ``x``.
        sigma, sigma_next: floats or ``[B]`` tensors, ``0 <= sigma_next < sigma <= 1``.
        noise_level: float or ``[B]``: ``a`` for flow_sde / cps, ``eta`` for dance_sde; ignored by ode.
        noise: standard normal ``[B, *latent]`` to use; drawn with ``generator`` when None.
        generator: ``torch.Generator`` for the draw (noise is drawn on the generator's device in
            fp32 and moved to ``x``'s device).
        drift: optional ``[B, *latent]`` guided drift (Euphonium; see :func:`reward_drift`) added to
            the sample of the stochastic rows only: ``prev_sample = mean + drift + std·noise``. The
            returned ``mean`` stays the kernel's own (unguided) mean, so :func:`log_prob` of the
            guided sample is its density under the policy's kernel (DESIGN.md §4). Rows with
            ``std == 0`` ignore it: a deterministic step has no density to correct.

    Returns:
        :class:`SDEStep` ``(prev_sample, mean, std)``; ``prev_sample = mean + std·noise`` cast to
        ``x.dtype`` (plus ``drift`` where given); ``mean`` and ``std`` are fp32 (gradients flow
        through ``v`` into ``mean``).
    """
    s = _as_column(sigma, x, "sigma")
    s_next = _as_column(sigma_next, x, "sigma_next")
    level = _as_column(noise_level, x, "noise_level")
    _check_inputs(kind, s, s_next, level)
    if v.shape != x.shape:
        raise ValueError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    if noise is not None and noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    if drift is not None and drift.shape != x.shape:
        raise ValueError(f"drift must have the shape of x {tuple(x.shape)}, got {tuple(drift.shape)}")

    x32, v32 = x.float(), v.float()
    plugin = kernel_plugin(kind)
    if plugin is not None:
        mean, std = _plugin_mean_std(kind, plugin, x32, v32, s, s_next, level)
        return _draw(mean, std, x, noise, generator, drift)
    if kind == "ode":
        mean, std = ode_kernel(x32, v, s, s_next)  # v uncast: diffusers' Euler step multiplies in v's dtype
    elif kind == "flow_sde":
        mean, std = flow_sde_kernel(x32, v32, s, s_next, level)
    elif kind == "dance_sde":
        mean, std = dance_sde_kernel(x32, v32, s, s_next, level)
    else:
        mean, std = cps_kernel(x32, v32, s, s_next, level)
    std = torch.broadcast_to(std, (x.shape[0],) + (1,) * (x.ndim - 1))  # [B, 1, ..., 1]
    if kind != "ode" and bool((std == 0).any()):
        # a zero-noise row is the Euler step mathematically; take it as ode_kernel does, so in fp16 / bf16 it is the
        # ODE step (and diffusers') bit for bit, not the same sum rounded in fp32
        mean = torch.where(std == 0, ode_kernel(x32, v, s, s_next)[0], mean)

    return _draw(mean, std, x, noise, generator, drift)


def _draw(mean: Tensor, std: Tensor, x: Tensor, noise: Optional[Tensor], generator: Optional[torch.Generator],
          drift: Optional[Tensor]) -> SDEStep:
    """``x' = mean + std·noise (+ drift on the stochastic rows)`` cast to ``x``'s dtype; no draw when every row is deterministic."""
    if not bool((std > 0).any()):
        prev = mean  # deterministic: no draw, so the caller's RNG stream is not consumed
    else:
        if noise is None:
            device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
        prev = mean + std * noise.to(device=x.device, dtype=torch.float32)
        if drift is not None:
            prev = prev + torch.where(std > 0, drift.float(), torch.zeros((), device=x.device))
    return SDEStep(prev_sample=prev.to(x.dtype), mean=mean, std=std)


DRIFT_MODES = ("normalized", "tilted")


def per_sample_std(std: Tensor | float, x: Tensor) -> Tensor:
    """``std`` as fp32 on ``x``'s device, broadcastable to ``x``: one std per sample given as ``[B]`` (as
    ``SDEStep.std.flatten()`` gives) or with fewer trailing unit dims than ``x`` (``[B, 1]``, as ``traj.stds[:, k:k+1]``
    gives) becomes ``[B, 1, ..., 1]`` instead of broadcasting over ``x``'s last dims."""
    std32 = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    if 1 <= std32.dim() < x.dim() and std32.shape[0] == x.shape[0] and std32.numel() == x.shape[0]:
        std32 = std32.reshape(-1, *([1] * (x.dim() - 1)))
    return std32


def reward_drift(grad: Tensor, std: Tensor | float, scale: float, mode: str = "normalized") -> Tensor:
    """Guided drift of a stochastic step from a process-reward gradient (Euphonium, arXiv 2602.04928).

    Euphonium steers exploration by adding the gradient of a process reward to the SDE's drift,
    so rollouts find high-reward samples more often; the samples are then trained on with their
    log-densities under the *unguided* kernel (pass the result as ``drift`` to :func:`step`), so the
    policy learns to take the guided steps itself and needs no reward model at inference.

    * ``"tilted"``: ``drift = scale·std²·g``. This is the exact mean shift of the Gaussian kernel
      N(mean, std²) tilted by ``exp(scale·g·x)``, i.e. the one-step optimum of a KL-regularised
      reward ``r`` linear near the mean with ``scale = 1/beta`` (Euphonium's ``eta²/(2·kl_beta)``
      with their noise convention). It vanishes with the noise and grows with the gradient.
    * ``"normalized"`` (default): ``drift = scale·std·g / rms(g)`` per sample: each latent element
      moves ``scale`` noise standard deviations on average, along the gradient's direction. The
      reward's units drop out, so one ``scale`` suits any reward (Euphonium normalises by the
      gradient's norm). Rows whose gradient is 0 are not moved.

    In both modes a row whose gradient has a NaN or inf entry (a reward that could not score it) is not moved.

    Args:
        grad: ``[B, *latent]`` gradient of the process reward (e.g. w.r.t. the step's x0-prediction).
        std: the kernel's std, ``[B, 1, ..., 1]``, ``[B]`` (per sample) or a float (:attr:`SDEStep.std`).
        scale: ``>= 0``; 0 gives a zero drift.
        mode: ``"normalized"`` or ``"tilted"``.

    Returns:
        ``[B, *latent]`` fp32 drift.
    """
    if mode not in DRIFT_MODES:
        raise ValueError(f"mode={mode!r}; choose one of {DRIFT_MODES}")
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    g = grad.float()
    finite_rows = torch.isfinite(g.reshape(g.shape[0], -1)).all(dim=1).reshape(-1, *([1] * (g.ndim - 1)))
    g = torch.where(finite_rows, g, torch.zeros_like(g))  # a row whose gradient is NaN / inf is not moved
    std32 = per_sample_std(std, g)
    if mode == "tilted":
        return scale * std32**2 * g
    rms = g.reshape(g.shape[0], -1).pow(2).mean(dim=1).sqrt().reshape(-1, *([1] * (g.ndim - 1)))  # [B, 1, ..., 1] (per row, even for [B])
    unit = torch.where(rms > 0, g / torch.where(rms > 0, rms, torch.ones_like(rms)), torch.zeros_like(g))
    return scale * std32 * unit


LOG_PROB_FORMS = ("gaussian", "squared_error")


def log_prob(x_next: Tensor, mean: Tensor, std: Tensor | float, reduce: str = "mean", form: str = "gaussian") -> Tensor:
    """Gaussian log-density of ``x_next`` under N(mean, std²), reduced over non-batch dims, fp32.

    form "gaussian" (default):    log N(x; mu, std) = -(x - mu)² / (2·std²) - log(std) - ½·log(2·pi)   (per element)
    form "squared_error":         -(x - mu)²                                                           (per element)

    ``"squared_error"`` is the surrogate that the CPS reference code uses (Flow-GRPO's ``cps``
    branch, on which Flow-CPS and TP-GRPO's launches build): the Gaussian's quadratic term
    without ``1/(2·std²)`` and the constants. Its log-ratio ``-(x - mu_new)² + (x - mu_old)²``
    does not blow up on low-noise steps, where CPS's std ``s'·sin(a·pi/2)`` is tiny (0.0079 at
    s' = 0.0089, SD3.5's last stochastic step of 10): there a velocity change ``dv`` moves the
    Gaussian log-ratio by ~``(0.27·dv / std)²``, so bf16 rounding alone leaves every row
    outside a 1e-5 clip. It is not a density (no normalisation), so its scale differs from the
    Gaussian's and a clip range tuned for one form is not the other's.

    Args:
        x_next: ``[B, *latent]`` the sample actually drawn.
        mean: ``[B, *latent]`` kernel mean (under the policy being evaluated).
        std: broadcastable to ``x_next`` (``[B, 1, ..., 1]``, 0-d or float); a ``[B]`` tensor is taken per
            sample (as ``[B, 1, ..., 1]``), never broadcast over the last latent dim. Negative or NaN: ValueError.
        reduce: ``"mean"`` (default, Flow-GRPO / DanceGRPO convention) or ``"sum"`` over latent dims.
        form: ``"gaussian"`` or ``"squared_error"`` (above).

    Returns:
        ``[B]`` fp32. Elements with ``std == 0`` (deterministic steps) contribute 0, so a fully
        deterministic row has log-prob 0 with finite gradients; such steps must be excluded from
        training (see :func:`is_stochastic`).
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce={reduce!r}; choose 'mean' or 'sum'")
    if form not in LOG_PROB_FORMS:
        raise ValueError(f"form={form!r}; choose one of {LOG_PROB_FORMS}")
    if x_next.shape != mean.shape:
        raise ValueError(f"x_next {tuple(x_next.shape)} and mean {tuple(mean.shape)} must have the same shape")
    x32, mu32 = x_next.float(), mean.float()
    std32 = per_sample_std(std, x32)
    if bool((std32.isnan() | (std32 < 0)).any()):
        raise ValueError("std must be >= 0 and not NaN (0 marks a deterministic step)")
    live = std32 > 0
    safe = torch.where(live, std32, torch.ones_like(std32))  # keeps gradients finite where std = 0
    if form == "squared_error":
        lp = -((x32 - mu32) ** 2)
    else:
        z = (x32 - mu32) / safe  # not (x - mu)² / std²: std² underflows to 0 for std below ~1e-19 (0/0 = NaN)
        lp = -0.5 * z**2 - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    lp = torch.where(live, lp, torch.zeros_like(lp))  # [B, *latent]
    lp = lp.reshape(lp.shape[0], -1)  # [B, D]: per row, even for [B] latents
    return lp.mean(dim=1) if reduce == "mean" else lp.sum(dim=1)


def is_stochastic(kind: str, sigma: ScalarOrBatch, sigma_next: ScalarOrBatch, noise_level: ScalarOrBatch) -> Tensor:
    """Whether a step injects noise (has a density, so it can be trained). Bool tensor, shape of the
    broadcast inputs (0-d for floats, ``[B]`` or ``[K]`` for vectors).

    False for ``kind == "ode"``, for ``noise_level == 0``, and for CPS steps with ``sigma_next == 0``
    (std = s'·sin(a·pi/2) = 0). Flow-SDE and Dance-SDE steps with a positive level are always
    stochastic, the first and last step included. A kernel of your own is asked for its std at these sigmas and
    levels (on zero latents): a step is stochastic where that std is > 0.
    """
    plugin = kernel_plugin(kind)
    _check_finite(sigma=sigma, sigma_next=sigma_next, noise_level=noise_level)
    s = torch.as_tensor(sigma, dtype=torch.float32)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float32)
    level = torch.as_tensor(noise_level, dtype=torch.float32)
    if plugin is not None:  # ask the kernel: its std depends on the sigmas and the level only
        shape = torch.broadcast_shapes(s.shape, s_next.shape, level.shape)
        flat = [t.broadcast_to(shape).reshape(-1, 1) for t in (s, s_next, level)]
        rows = flat[0].shape[0]
        if rows == 0:
            return torch.zeros(shape, dtype=torch.bool)
        _, std = _plugin_mean_std(kind, plugin, torch.zeros(rows, 1), torch.zeros(rows, 1), *flat)
        return (std.reshape(shape) > 0) & (s > s_next)
    if kind == "ode":
        return torch.zeros(torch.broadcast_shapes(s.shape, s_next.shape, level.shape), dtype=torch.bool)
    out = (level > 0) & (s > s_next)
    if kind == "cps":
        out = out & (s_next > 0)
    return out


# --------------------------------------------------------------------------------------------
# noise schedules: which noise level each step of a K-step rollout gets (0 = ODE step)
# --------------------------------------------------------------------------------------------


@dataclass
class ConstantSchedule:
    """The same level ``a`` at every step (Flow-GRPO's default, a ≈ 0.7)."""

    a: float

    def __post_init__(self):
        if not self.a >= 0 or not math.isfinite(self.a):  # NaN fails every comparison
            raise ValueError(f"noise level a must be a finite number >= 0, got {self.a}")

    def levels(self, num_steps: int, iteration: int = 0, generator: Optional[torch.Generator] = None) -> Tensor:
        """``[K]`` fp32 levels for a rollout of ``num_steps`` steps."""
        return torch.full((num_steps,), float(self.a))


@dataclass
class WindowSchedule:
    """Level ``a`` on a window of ``size`` consecutive steps, 0 (ODE) outside.

    ``mode``:
      * ``"fixed"``: the window starts at step ``start`` at every iteration.
      * ``"sliding"`` (after MixGRPO, arXiv 2507.21802): the start advances by ``stride`` every
        ``shift_every`` iterations and wraps around: ``(start + (iteration // shift_every)·stride)
        mod (K - size + 1)``. MixGRPO's own code (``grpo_states.py``, its FLUX launch script) differs:
        it moves every 25 iterations (``shift_every=25``), lets the window shrink at the end
        (``range(cur, min(cur + size, K - 2))``) before rolling back, and never puts noise on the last
        two steps; here the window keeps its size and may reach the last step.
      * ``"random"`` (TreeGRPO-style): the start is drawn uniformly from ``0 .. K - size`` at each
        call with ``generator``.
    """

    a: float
    start: int = 0
    size: int = 1
    mode: str = "fixed"
    stride: int = 1
    shift_every: int = 1

    def __post_init__(self):
        if self.mode not in ("fixed", "sliding", "random"):
            raise ValueError(f"window mode={self.mode!r}; choose 'fixed', 'sliding' or 'random'")
        if not (self.a >= 0 and math.isfinite(self.a)) or self.size < 1 or self.start < 0 or self.stride < 0 or self.shift_every < 1:
            raise ValueError(
                f"bad window: a={self.a} (finite, >= 0), size={self.size} (>= 1), start={self.start} (>= 0), "
                f"stride={self.stride} (>= 0), shift_every={self.shift_every} (>= 1)"
            )

    def window_start(self, num_steps: int, iteration: int = 0, generator: Optional[torch.Generator] = None) -> int:
        """First step index of the window for this iteration."""
        positions = num_steps - self.size + 1  # valid starts: 0 .. K - size
        if positions < 1:
            raise ValueError(f"window size {self.size} exceeds the {num_steps} steps of the rollout")
        if self.mode == "fixed":
            if self.start >= positions:
                raise ValueError(f"window start {self.start} + size {self.size} exceeds {num_steps} steps")
            return self.start
        if self.mode == "sliding":
            return (self.start + (iteration // self.shift_every) * self.stride) % positions
        return int(torch.randint(positions, (1,), generator=generator).item())

    def levels(self, num_steps: int, iteration: int = 0, generator: Optional[torch.Generator] = None) -> Tensor:
        """``[K]`` fp32 levels: ``a`` inside the window, 0 outside."""
        first = self.window_start(num_steps, iteration, generator)
        out = torch.zeros(num_steps)
        out[first : first + self.size] = float(self.a)
        return out


@dataclass
class TableSchedule:
    """Per-step levels psi[k] (DenseGRPO's calibrated table, arXiv 2601.20218)."""

    table: Sequence[float] | Tensor

    def __post_init__(self):
        self.table = torch.as_tensor(self.table, dtype=torch.float32).flatten()
        if bool((self.table.isnan() | (self.table < 0) | self.table.isinf()).any()):
            raise ValueError(f"noise table entries must be finite and >= 0, got {self.table.tolist()}")

    def levels(self, num_steps: int, iteration: int = 0, generator: Optional[torch.Generator] = None) -> Tensor:
        """The table itself; ``num_steps`` must equal its length."""
        if num_steps != self.table.numel():
            raise ValueError(f"noise table has {self.table.numel()} entries but the rollout has {num_steps} steps")
        return self.table.clone()


def constant(a: float) -> ConstantSchedule:
    """Schedule with level ``a`` at every step."""
    return ConstantSchedule(a)


def window(a: float, start: int = 0, size: int = 1, mode: str = "fixed", stride: int = 1, shift_every: int = 1) -> WindowSchedule:
    """Schedule with level ``a`` on ``size`` steps from ``start`` (fixed / sliding / random)."""
    return WindowSchedule(a, start, size, mode, stride, shift_every)


def table(levels: Sequence[float] | Tensor) -> TableSchedule:
    """Schedule with an explicit per-step table of levels."""
    return TableSchedule(levels)


SCHEDULES = {"constant": constant, "window": window, "table": table}
SCHEDULE_ENTRY_POINT_GROUP = "flowalign.noise_schedules"  # [project.entry-points."flowalign.noise_schedules"]


def make_schedule(name: str, **kwargs):
    """Build a schedule from a config: ``make_schedule("window", a=0.7, size=2, mode="sliding")``.

    ``name`` is a built-in (:data:`SCHEDULES`), an entry point of group :data:`SCHEDULE_ENTRY_POINT_GROUP` or a
    dotted path ``"pkg.mod:Class"``: a class or function called with ``kwargs`` whose result has
    ``levels(num_steps, iteration=0, generator=None) -> Tensor[num_steps]`` (a progressive or shrinking
    window, a decaying level); the recipe's checks then call it as they call the built-ins'. Such a schedule
    must be a function of ``(num_steps, iteration, generator)`` alone: a resumed run calls it afresh.
    """
    factory = SCHEDULES.get(name)
    if factory is None:
        from flowalign.plugins import require_callable_plugin

        factory = require_callable_plugin(name, SCHEDULE_ENTRY_POINT_GROUP, "noise schedule",
                                          f"unknown noise schedule {name!r}; available: {sorted(SCHEDULES)}, an entry point of group "
                                          f"{SCHEDULE_ENTRY_POINT_GROUP!r} or a dotted path 'pkg.module:Class'", "a class or function")
    try:
        schedule = factory(**kwargs)
    except TypeError as err:
        raise ConfigError(f"bad arguments {kwargs} for noise schedule {name!r}: {err}") from None
    if not callable(getattr(schedule, "levels", None)):
        raise ConfigError(f"noise schedule {name!r} built a {type(schedule).__name__} without a levels(num_steps, iteration, "
                          "generator) method")
    return schedule
