"""Diffusion-DPO (Wallace et al., arXiv 2311.12908) for flow-matching models.

Convention (DESIGN.md §4): ``x_s = (1 - s)·x0 + s·ε`` and the model predicts ``v = ε - x0``, so
the paper's ε-prediction error ``‖ε - ε_θ(x_t, t)‖²`` becomes the velocity error
``‖v - v_θ(x_s, s)‖²``. Errors are **means over latent dimensions** (as the official code's
``mse_loss(...).mean(dim=[1, 2, 3])``).

β convention: the paper's Eq. 14 reads
``L = -E log σ(-β T ω(λ_t) [ (e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l)) ])`` with ``e`` summed
squared errors. Here a single ``beta`` stands for ``β·T·ω(λ_t)`` times the latent size (because
our errors are means, not sums); the official SD1.5 recipe's ``beta_dpo = 5000`` used inside
``-0.5 * beta_dpo * (...)`` corresponds to ``beta = 2500`` here. With this convention the GDRO
listwise loss with ``k = 2``, ``τ → 0`` and ``γ = 0`` *is* this loss with the same ``beta``
(``tests/test_gdro.py``).

The module also holds the small noising helpers GDRO shares (same file keeps one source of truth).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from flowalign.objectives.base import OFFLINE_TRAINER, OfflineBatch, VelocityFn, register_objective, require_finite

__all__ = [
    "sample_sigmas",
    "sample_group_noise",
    "noised_and_target",
    "velocity_errors",
    "diffusion_dpo_loss",
    "DiffusionDPO",
]


def sample_sigmas(
    num_groups: int,
    group_size: int,
    per_sample: bool = False,
    sigma_range: tuple[float, float] = (0.0, 1.0),
    generator: Optional[torch.Generator] = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw a noise level for each sample, ``s ~ U(sigma_range)``; ``[P, k]``.

    With ``per_sample = False`` (default, as Diffusion-DPO and GDRO) every member of a group
    shares its group's sigma, so implicit rewards inside a group are compared at the same noise.
    """
    low, high = check_sigma_range(sigma_range)
    cols = group_size if per_sample else 1
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.rand(num_groups, cols, generator=generator, device=gen_device).to(device)
    return (low + (high - low) * u).expand(num_groups, group_size).contiguous()  # [P, k]


def check_sigma_range(sigma_range) -> tuple[float, float]:
    """``(low, high)`` as floats; ValueError unless ``0 <= low < high <= 1`` (objectives check it when built,
    so a bad recipe fails when it loads, not at the first training step)."""
    try:
        low, high = (float(v) for v in sigma_range)
    except (TypeError, ValueError):
        raise ValueError(f"sigma_range must be (low, high) with 0 <= low < high <= 1, got {sigma_range!r}") from None
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"sigma_range must be (low, high) with 0 <= low < high <= 1, got {sigma_range!r}")
    return low, high


def random_tie_order(rewards: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """``[P, k]``: a random order of each group's members when a ranked group (not all equal) holds tied
    rewards, else the identity, drawing nothing (the generator's stream is kept).

    Reading a group in this order, a stable sort or a first-index ``argmax`` picks among tied members
    at random instead of always the lowest-listed one (which got every push a tie gave).
    """
    P, k = rewards.shape
    identity = torch.arange(k, device=rewards.device).expand(P, k)
    srt = rewards.sort(dim=1).values
    ranked = srt[:, -1] > srt[:, 0]
    if not bool(((srt[:, 1:] == srt[:, :-1]).any(dim=1) & ranked).any()):
        return identity
    keys = torch.rand(P, k, generator=generator, device=generator.device if generator is not None else "cpu")
    return keys.to(rewards.device).argsort(dim=1)


def sample_group_noise(x0: Tensor, per_sample: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
    """Standard normal noise shaped like ``x0 [P, k, *latent]``, shared across a group by default."""
    P, k = x0.shape[:2]
    shape = (P, k if per_sample else 1, *x0.shape[2:])
    gen_device = generator.device if generator is not None else "cpu"
    noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device=x0.device, dtype=x0.dtype).expand_as(x0).contiguous()  # [P, k, *latent]


def noised_and_target(x0: Tensor, noise: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Rectified-flow interpolation and its velocity target.

    ``x_s = (1 - s)·x0 + s·ε`` and ``v = ε - x0`` (DESIGN.md §4).
    Shapes: x0, noise ``[N, *latent]``; sigma ``[N]`` -> (x_s, v) both ``[N, *latent]``.
    """
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)  # [N, 1, ...]
    return (1.0 - s) * x0 + s * noise, noise - x0


def velocity_errors(x_s: Tensor, v_target: Tensor, sigma: Tensor, fn: VelocityFn) -> Tensor:
    """``‖v - fn(x_s, s)‖²`` averaged over latent dims, fp32; ``[N]``."""
    pred = fn(x_s, sigma)  # [N, *latent]
    return (pred.float() - v_target.float()).pow(2).flatten(1).mean(dim=1)


def diffusion_dpo_loss(err_w: Tensor, ref_err_w: Tensor, err_l: Tensor, ref_err_l: Tensor, beta: float) -> Tensor:
    """Per-pair Diffusion-DPO loss (arXiv 2311.12908, Eq. 14), ``[N]``.

    ``L = -log σ(-β [ (e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l)) ])``

    where ``e`` are per-sample velocity errors at the same sigma and noise (see module docstring
    for the β convention). All inputs ``[N]``.
    """
    margin = (err_w - ref_err_w) - (err_l - ref_err_l)  # [N]  < 0 when the policy prefers w
    return -F.logsigmoid(-beta * margin)


@register_objective("diffusion_dpo")
class DiffusionDPO:
    """Diffusion-DPO over groups of an :class:`OfflineBatch`.

    Each group of ``k >= 2`` samples gives pairs (winner, loser) by explicit reward:
    ``pairs = "best_worst"`` (default, one pair per group) or ``"all"`` (every ordered pair with
    a strictly higher reward). Pairs with equal rewards carry no preference and are dropped.
    Winner and loser are noised with the same sigma and noise (as the official implementation).

    ``policy`` / ``reference`` are called once on all flattened rows ``p * k + j`` of ``batch.x0``
    (the trainer binds the conditioning of ``batch.cond_index`` repeated ``k`` times), so with
    ``k > 2`` and ``"best_worst"`` some rows are evaluated and not used: prefer ``k = 2`` groups.

    ``beta`` defaults to 2500, the official recipe's ``beta_dpo = 5000`` in this module's convention (module
    docstring); GDRO's 6 (its own default) is a far weaker preference scale here.
    """

    needs_reference = True
    trained_by = OFFLINE_TRAINER  # from a rollout store, not in the online loop

    def __init__(
        self,
        beta: float = 2500.0,
        pairs: str = "best_worst",
        sigma_range: tuple[float, float] = (0.0, 1.0),
        generator: Optional[torch.Generator] = None,
    ):
        require_finite(type(self).__name__, {k: v for k, v in locals().items() if k != "self"})
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if pairs not in ("best_worst", "all"):
            raise ValueError(f"pairs must be 'best_worst' or 'all', got {pairs!r}")
        self.beta = beta
        self.pairs = pairs
        self.sigma_range = check_sigma_range(sigma_range)
        self.generator = generator

    def _pair_index(self, rewards: Tensor) -> tuple[Tensor, Tensor]:
        """Flat row indices (winner, loser) of the preference pairs; both ``[M]``."""
        P, k = rewards.shape
        base = torch.arange(P, device=rewards.device)[:, None] * k
        if self.pairs == "best_worst":
            order = random_tie_order(rewards, self.generator)  # tied best (worst) members: one at random
            shuffled = rewards.gather(1, order)
            w = order.gather(1, shuffled.argmax(dim=1, keepdim=True))[:, 0]  # [P]
            l = order.gather(1, shuffled.argmin(dim=1, keepdim=True))[:, 0]
            keep = rewards.max(dim=1).values > rewards.min(dim=1).values
            return (base[:, 0] + w)[keep], (base[:, 0] + l)[keep]
        better = rewards[:, :, None] > rewards[:, None, :]  # [P, k, k] i beats j
        p, i, j = better.nonzero(as_tuple=True)
        return base[p, 0] + i, base[p, 0] + j

    def loss(
        self,
        batch: OfflineBatch,
        policy: VelocityFn,
        reference: Optional[VelocityFn],
        sigma: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Mean Diffusion-DPO loss over the batch's pairs.

        ``sigma [P, k]`` and ``noise [P, k, *latent]`` may be given (tests, replay); otherwise
        they are drawn with ``self.generator``, shared across each group.
        """
        if reference is None:
            raise ValueError("diffusion_dpo needs a reference velocity function, got None")
        x0, rewards = batch.x0, batch.rewards.float()  # [P, k, *latent], [P, k]
        if not torch.isfinite(rewards).all():  # a NaN loses every comparison: its pairs would vanish without a word
            raise ValueError("diffusion_dpo got non-finite explicit rewards")
        P, k = rewards.shape
        if k < 2:
            raise ValueError(f"diffusion_dpo needs groups of k >= 2 samples, got k={k}")
        if sigma is None:
            sigma = sample_sigmas(P, k, False, self.sigma_range, self.generator, x0.device)
        if noise is None:
            noise = sample_group_noise(x0, False, self.generator)
        w, l = self._pair_index(rewards)
        # every row is evaluated (rows p*k + j, as the trainer binds the conditioning), then paired
        flat_sigma = sigma.reshape(P * k)
        x_s, v = noised_and_target(x0.flatten(0, 1), noise.flatten(0, 1), flat_sigma)  # [P*k, *latent]
        err = velocity_errors(x_s, v, flat_sigma, policy)  # [P*k]
        if w.numel() == 0:
            # every group tied: no preference to learn; a zero that keeps the policy's graph, so that
            # backward() works and every process of a DDP run takes part in the same reduction
            return err.sum() * 0.0, {"dpo/num_pairs": 0.0}
        with torch.no_grad():
            ref_err = velocity_errors(x_s, v, flat_sigma, reference)
        wi, li = w, l
        per_pair = diffusion_dpo_loss(err[wi], ref_err[wi], err[li], ref_err[li], self.beta)  # [M]
        margin = ((err[wi] - ref_err[wi]) - (err[li] - ref_err[li])).detach()
        metrics = {
            "dpo/loss": per_pair.mean().item(),
            "dpo/implicit_acc": (margin < 0).float().mean().item(),
            "dpo/margin": (-self.beta * margin).mean().item(),
            "dpo/num_pairs": float(per_pair.numel()),
            "dpo/fm_loss": err.detach().mean().item(),
        }
        return per_pair.mean(), metrics
