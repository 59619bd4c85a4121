"""Process-reward guidance of rollouts: Euphonium's guided drift (arXiv 2602.04928; DESIGN.md §4).

Undirected SDE noise finds high-reward samples only as often as the policy already draws them.
Euphonium adds the gradient of a *process* reward to the drift of each stochastic step, so
rollouts are steered toward what the reward likes, and trains on them with their log-densities
under the unguided kernel: the policy learns to take the guided steps itself, and inference needs
no reward model. Here a step's process reward is any registered reward scored on the decoded
x0-prediction ``x0_hat = x - sigma·v``; its gradient w.r.t. ``x0_hat`` comes from autograd (a
differentiable reward through the VAE decoder) or, for a black-box reward such as a verifier or a
VLM, from SPSA (:func:`spsa_gradient`, Euphonium's zero-order estimate), and
:func:`flowalign.sde.reward_drift` turns it into the drift that :func:`flowalign.sde.step` adds.

As in Euphonium, the gradient is taken w.r.t. ``x0_hat`` rather than the current latent ``x``
(which would need a backward pass through the transformer); ``d x0_hat / d x`` is the identity
up to the model's Jacobian term.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from flowalign import sde

logger = logging.getLogger(__name__)

__all__ = ["spsa_gradient", "autograd_gradient", "resolve_gradient", "RewardDrift", "bind", "GRADIENT_METHODS"]

GRADIENT_METHODS = ("auto", "autograd", "spsa")
ScoreFn = Callable[[Tensor], Tensor]  # [N, *latent] -> [N] scores


@torch.no_grad()
def spsa_gradient(score_fn: ScoreFn, x: Tensor, *, sigma: float, pairs: int = 1,
                  generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Zero-order gradient of a black-box per-row score, by antithetic Gaussian SPSA.

        g(x) = (1/n) · sum_j (f(x + sigma·u_j) - f(x - sigma·u_j)) / (2·sigma) · u_j,   u_j ~ N(0, I)

    For ``f`` quadratic the difference quotient is exactly ``u_j·grad f(x)`` (the even terms cancel),
    and ``E[(u·g) u] = g`` for standard normal ``u``, so the estimate is unbiased; for a
    piecewise-constant score (a 0/1 verifier) it is the gradient of ``f`` smoothed at scale ``sigma``.
    Each pair scores ``x + sigma·u`` and ``x - sigma·u`` in one call of ``2·B`` rows.

    Args:
        score_fn: ``[N, *latent] -> [N]`` scores (NaN counts as no difference).
        x: ``[B, *latent]`` points.
        sigma: perturbation scale (> 0), in the units of ``x``.
        pairs: antithetic pairs averaged per row (``n``).
        generator: source of the directions ``u`` (drawn in fp32 on the generator's device).

    Returns:
        ``(grad [B, *latent] fp32, mean score over the perturbed points with a finite score [B])``; a NaN or inf score difference counts as none.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    x32 = x.float()
    batch = x.shape[0]
    grad = torch.zeros_like(x32)
    score_sum = torch.zeros(batch, dtype=torch.float32, device=x.device)
    score_count = torch.zeros(batch, dtype=torch.float32, device=x.device)  # finite perturbed scores per row
    device = generator.device if generator is not None else x.device
    for _ in range(pairs):
        u = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)
        scores = score_fn(torch.cat([x32 + sigma * u, x32 - sigma * u]).to(x.dtype)).float().reshape(-1)
        if scores.shape[0] != 2 * batch:
            raise ValueError(f"score_fn returned {scores.shape[0]} scores for {2 * batch} rows")
        plus, minus = scores[:batch], scores[batch:]
        d = plus - minus
        diff = torch.where(torch.isfinite(d), d, torch.zeros_like(d))  # NaN or inf (a score at -inf): no difference
        grad += (diff / (2 * sigma)).reshape(-1, *([1] * (x.ndim - 1))) * u
        for side in (plus, minus):
            finite = torch.isfinite(side)
            score_sum += torch.where(finite, side, torch.zeros_like(side))
            score_count += finite.float()
    return grad / pairs, score_sum / score_count.clamp_min(1)


def autograd_gradient(score_fn: ScoreFn, x: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient of a differentiable per-row score w.r.t. ``x``: ``(grad [B, *latent] fp32, scores [B])``.

    Row ``b``'s score must depend on row ``b`` only (as a reward of decoded images does), so the
    gradient of the summed scores is each row's own gradient.
    """
    with torch.enable_grad():
        leaf = x.detach().float().requires_grad_(True)
        scores = score_fn(leaf.to(x.dtype)).float().reshape(-1)
        if scores.shape[0] != x.shape[0]:
            raise ValueError(f"score_fn returned {scores.shape[0]} scores for {x.shape[0]} rows")
        if not scores.requires_grad:
            raise ValueError("the process reward's scores carry no gradient: use gradient='spsa' for a non-differentiable reward")
        finite = torch.isfinite(scores)
        (grad,) = torch.autograd.grad(torch.where(finite, scores, torch.zeros_like(scores)).sum(), leaf)
    # a row without a finite score gets no gradient (its backward may still hold 0·NaN)
    grad = torch.where(finite.reshape(-1, *([1] * (x.ndim - 1))), grad, torch.zeros_like(grad))
    return grad.detach(), scores.detach()


def resolve_gradient(reward, gradient: str) -> str:
    """The gradient method a drift with ``reward`` uses: ``"autograd"`` or ``"spsa"``.

    ``"auto"`` picks autograd when ``reward.differentiable`` is true, else SPSA.

    Raises:
        ValueError: an unknown method, or ``"autograd"`` for a reward that is not differentiable.
    """
    if gradient not in GRADIENT_METHODS:
        raise ValueError(f"gradient={gradient!r}; choose one of {GRADIENT_METHODS}")
    differentiable = bool(getattr(reward, "differentiable", False))
    if gradient == "auto":
        return "autograd" if differentiable else "spsa"
    if gradient == "autograd" and not differentiable:
        raise ValueError(f"reward {getattr(reward, 'name', reward)!r} is not differentiable: use gradient='spsa'")
    return gradient


class RewardDrift:
    """The guided drift of a rollout's stochastic steps from a reward scored on decoded x0-predictions.

    ``sampling.integrate`` calls it at every stochastic step with the step's x0-prediction and
    kernel std; it returns the drift that :func:`flowalign.sde.step` adds to the sample (and never to
    the mean that the log-probability uses).

    Args:
        adapter: the ``flowalign.pipelines.Adapter`` whose ``decode`` turns latents into images.
        reward: a ``flowalign.rewards.Reward`` (``reward(images, prompts, metadata).scores``).
        scale: drift scale (:func:`flowalign.sde.reward_drift`).
        mode: ``"normalized"`` (scale in noise stds) or ``"tilted"`` (scale = 1/beta).
        gradient: ``"autograd"`` (differentiable reward: backward through the VAE decoder),
            ``"spsa"`` (any reward) or ``"auto"`` (autograd when ``reward.differentiable``).
        spsa_sigma, spsa_pairs: SPSA's perturbation scale (latent units) and pairs per row.
        micro_batch_size: rows per decode + reward call (None: all at once).

    After each call ``stats`` holds lists of per-step figures (``moved_frac``: share of rows whose
    gradient was non-zero; ``score``: mean reward at the x0-predictions); :meth:`pop_stats` returns
    their means and clears them.
    """

    def __init__(self, adapter, reward, *, scale: float, mode: str = "normalized", gradient: str = "auto",
                 spsa_sigma: float = 0.1, spsa_pairs: int = 1, micro_batch_size: Optional[int] = None):
        if mode not in sde.DRIFT_MODES:
            raise ValueError(f"mode={mode!r}; choose one of {sde.DRIFT_MODES}")
        gradient = resolve_gradient(reward, gradient)
        self.adapter, self.reward = adapter, reward
        self.scale, self.mode, self.gradient = float(scale), mode, gradient
        self.spsa_sigma, self.spsa_pairs = float(spsa_sigma), int(spsa_pairs)
        self.micro_batch_size = micro_batch_size
        self.stats: dict[str, list[float]] = {"moved_frac": [], "score": []}

    def score_fn(self, prompts: Sequence[str], metadata: Sequence[dict]) -> ScoreFn:
        """``latents [N, *latent] -> scores [N]`` for rows that repeat ``prompts`` / ``metadata`` ``N / B`` times."""
        prompts, metadata = list(prompts), list(metadata)
        requires_grad = self.gradient == "autograd"

        def score(latents: Tensor) -> Tensor:
            reps = latents.shape[0] // len(prompts)
            rows_prompts, rows_meta = prompts * reps, [dict(m) for m in metadata] * reps
            step = self.micro_batch_size or latents.shape[0]
            out = []
            for i in range(0, latents.shape[0], step):
                images = self.adapter.decode(latents[i:i + step], requires_grad=requires_grad)
                out.append(self.reward(images, rows_prompts[i:i + step], rows_meta[i:i + step]).scores.float().to(latents.device))
            return torch.cat(out)

        return score

    def __call__(self, x0_hat: Tensor, std: Tensor, *, prompts: Sequence[str], metadata: Sequence[dict],
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Drift ``[B, *latent]`` for one step from its x0-predictions ``[B, *latent]`` and std ``[B, 1, ..]``."""
        if len(prompts) != x0_hat.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {x0_hat.shape[0]} rows")
        fn = self.score_fn(prompts, metadata)
        if self.gradient == "autograd":
            grad, scores = autograd_gradient(fn, x0_hat)
        else:
            grad, scores = spsa_gradient(fn, x0_hat, sigma=self.spsa_sigma, pairs=self.spsa_pairs, generator=generator)
        moved = grad.flatten(1).abs().amax(dim=1) > 0
        self.stats["moved_frac"].append(float(moved.float().mean()))
        self.stats["score"].append(float(torch.nan_to_num(scores, nan=0.0).mean()))
        return sde.reward_drift(grad, std, self.scale, self.mode)

    def pop_stats(self) -> dict[str, float]:
        """Means of the per-step figures since the last call (``drift/moved_frac``, ``drift/score``), then clear."""
        out = {f"drift/{k}": sum(v) / len(v) for k, v in self.stats.items() if v}
        for v in self.stats.values():
            v.clear()
        return out


def bind(drift: Optional[RewardDrift], prompts: Sequence[str], metadata: Sequence[dict]) -> Optional[Callable[..., Tensor]]:
    """``drift`` with a rollout's per-sample prompts and metadata bound: ``f(x0_hat, std, generator) -> drift``."""
    if drift is None:
        return None
    prompts, metadata = list(prompts), list(metadata)

    def fn(x0_hat: Tensor, std: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return drift(x0_hat, std, prompts=prompts, metadata=metadata, generator=generator)

    return fn
