"""Data classes that carry rollouts from the sampler to rewards, advantages and objectives.

Shapes use ``B`` for the number of samples in a batch, ``K`` for the number of denoising steps
and ``C, H, W`` for the latent layout (videos add a frame axis ``F`` after ``C``; nothing here
depends on the rank of a latent).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

import torch
from torch import Tensor


@dataclass
class Trajectory:
    """A batch of ``B`` denoising trajectories of ``K`` steps through one sigma schedule.

    Attributes:
        prompts: the ``B`` prompts, one per sample (a prompt is repeated for each group member).
        group_ids: ``[B]`` long, samples with the same id were drawn for the same prompt and are
            normalised together by the advantage estimators.
        sigmas: ``[K+1]`` float, sigma_0 = 1 (noise) ... sigma_K = 0 (data); shared by the batch.
        latents: ``[B, K+1, *latent_shape]``, ``latents[:, 0]`` is the initial noise x_T and
            ``latents[:, k+1]`` the sample after step ``k``.
        log_probs: ``[B, K]`` fp32, log-density of ``latents[:, k+1]`` under the kernel of step
            ``k`` (0 where the step was deterministic).
        stds: ``[B, K]`` fp32, the kernel's per-sample standard deviation at each step
            (0 for ODE steps).
        noise_levels: ``[K]`` the noise level the schedule gave each step.
        stochastic_mask: ``[K]`` bool, True where the step injected noise (trainable steps).
        x0_preds: ``[B, K, *latent_shape]`` or None, x0-hat = x - sigma * v at each step.
        images: ``[B, 3, H, W]`` (or ``[B, F, 3, H, W]``) decoded final samples in [0, 1].
        rewards: ``[B]`` outcome reward (filled in by the reward stage), or None.
        step_rewards: ``[B, K]`` per-step rewards from ``flowalign.dense``, or None.
        advantages: ``[B]`` or ``[B, K]`` filled in by ``flowalign.advantages``, or None.
        kernel: name of the transition kernel (``"flow_sde"``, ``"cps"``, ...).
        guidance_scale: CFG scale used while sampling.
        metadata: one dict per sample (prompt spec, seed, ...), passed to rewards.
        nfe: number of transformer evaluations spent on this batch (CFG counts double).
    """

    prompts: list[str]
    group_ids: Tensor
    sigmas: Tensor
    latents: Tensor
    log_probs: Tensor
    stds: Tensor
    noise_levels: Tensor
    stochastic_mask: Tensor
    x0_preds: Optional[Tensor] = None
    images: Optional[Tensor] = None
    rewards: Optional[Tensor] = None
    step_rewards: Optional[Tensor] = None
    advantages: Optional[Tensor] = None
    kernel: str = "flow_sde"
    guidance_scale: float = 1.0
    metadata: list[dict[str, Any]] = field(default_factory=list)
    nfe: int = 0

    @property
    def batch_size(self) -> int:
        """Samples B."""
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        """Denoising steps K (``sigmas`` holds K + 1 values)."""
        return self.sigmas.shape[0] - 1

    def select(self, index: Tensor | list[int]) -> "Trajectory":
        """Return the sub-batch of samples ``index`` (row indices, or a ``[B]`` bool mask; tensors with a
        batch axis are indexed)."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            if index.shape != (self.batch_size,):
                raise ValueError(f"a bool mask must be [{self.batch_size}] (one entry per sample), got {tuple(index.shape)}")
            index = index.nonzero().flatten()
        index = index.long()
        idx = index.tolist()
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("sigmas", "noise_levels", "stochastic_mask"):
                out[f.name] = value
            elif isinstance(value, Tensor):
                out[f.name] = value[index.to(value.device)]
            elif f.name in ("prompts", "metadata") and value:
                out[f.name] = [value[i] for i in idx]
            else:
                out[f.name] = value
        return replace(self, **out)

    def to(self, device: torch.device | str) -> "Trajectory":
        """Move every tensor to ``device``."""
        return replace(
            self,
            **{f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)},
        )
