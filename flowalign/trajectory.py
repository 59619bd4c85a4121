"""Data classes that carry rollouts from the sampler to rewards, advantages and objectives.

Shapes use ``B`` for the number of samples in a batch, ``K`` for the number of denoising steps
and ``C, H, W`` for the latent layout (videos add a frame axis ``F`` after ``C``; nothing here
depends on the rank of a latent).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Sequence

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
        log_prob_reduce: how ``log_probs`` were reduced over latent dims (``"mean"`` or ``"sum"``): their
            scale, which a softmax over path log-probs (BranchGRPO / TreeGRPO) depends on.
        log_prob_form: ``"gaussian"`` or ``"squared_error"``: what ``log_probs`` measure
            (:func:`flowalign.sde.log_prob`); an objective recomputes them in the same form.
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
    log_prob_reduce: str = "mean"
    log_prob_form: str = "gaussian"

    @property
    def batch_size(self) -> int:
        """Samples B."""
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        """Denoising steps K (``sigmas`` holds K + 1 values)."""
        return self.sigmas.shape[0] - 1

    def _rows(self, index) -> Tensor:
        """``index`` as long row indices: row indices as they are, a ``[B]`` bool mask as the rows it marks."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            if index.shape != (self.batch_size,):
                raise ValueError(f"a bool mask must be [{self.batch_size}] (one entry per sample), got {tuple(index.shape)}")
            index = index.nonzero().flatten()
        return index.long()

    def select(self, index: Tensor | list[int]) -> "Trajectory":
        """Return the sub-batch of samples ``index`` (row indices, or a ``[B]`` bool mask; tensors with a
        batch axis are indexed)."""
        index = self._rows(index)
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

    def trainable_steps(self) -> list[int]:
        """The step indices ``k`` that injected noise (``stochastic_mask``): the transitions a policy-gradient
        objective can train on (a deterministic step has no log-density)."""
        return [int(k) for k in torch.nonzero(self.stochastic_mask.cpu()).flatten()]

    def step_batch(self, k: int, advantages: Optional[Tensor] = None, index: Optional[Tensor] = None,
                   log_prob_reduce: Optional[str] = None, device: Optional[torch.device | str] = None,
                   log_prob_form: Optional[str] = None):
        """The recorded transitions ``x_k -> x_{k+1}`` of samples ``index`` (default: all) as a
        :class:`flowalign.objectives.StepBatch`, the batch an objective's ``loss`` takes.

        Args:
            k: step index in ``[0, K)``; see :meth:`trainable_steps`.
            advantages: ``[B]`` per-sample or ``[B, K]`` per-step advantages of all B samples (default:
                ``self.advantages``).
            index: ``[n]`` rows to take (a long tensor or list) or a ``[B]`` bool mask, default every sample.
            log_prob_reduce: how the sampler reduced the recorded log-probs (default: ``self.log_prob_reduce``).
            log_prob_form: the recorded log-probs' form (default: ``self.log_prob_form``).
            device: where the batch's tensors go (default: where they are).

        Example (a hand-written update; ``policy`` binds the adapter and the samples' conditioning)::

            for k in traj.trainable_steps():
                loss, metrics = objective.loss(traj.step_batch(k, adv), policy, None)
        """
        from flowalign.objectives.base import StepBatch

        if not 0 <= k < self.num_steps:
            raise ValueError(f"step k={k} is outside [0, {self.num_steps})")
        adv = self.advantages if advantages is None else torch.as_tensor(advantages)
        if adv is None:
            raise ValueError("no advantages: pass them, or set traj.advantages")
        if adv.shape[0] != self.batch_size or adv.ndim not in (1, 2) or (adv.ndim == 2 and adv.shape[1] != self.num_steps):
            raise ValueError(f"advantages must be [B]={self.batch_size} or [B, K]=[{self.batch_size}, {self.num_steps}], "
                             f"got {tuple(adv.shape)}")
        rows = torch.arange(self.batch_size) if index is None else self._rows(index)  # a bool mask was cast to rows 0 / 1
        n = rows.numel()
        move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        r = rows.to(self.latents.device)
        adv_rows = rows.to(adv.device)
        return StepBatch(
            x=move(self.latents[r, k]),
            x_next=move(self.latents[r, k + 1]),
            sigma=move(self.sigmas[k].expand(n)),
            sigma_next=move(self.sigmas[k + 1].expand(n)),
            noise_level=move(self.noise_levels[k].expand(n)),
            old_log_prob=move(self.log_probs[rows.to(self.log_probs.device), k]),
            advantages=move(adv[adv_rows, k] if adv.ndim == 2 else adv[adv_rows]),
            kernel=self.kernel,
            step_index=move(torch.full((n,), k, dtype=torch.long)),
            log_prob_reduce=log_prob_reduce or self.log_prob_reduce,
            log_prob_form=log_prob_form or self.log_prob_form,
            sample_index=move(rows.clone()),
            group_id=move(self.group_ids[rows.to(self.group_ids.device)].long()),
        )

    def to(self, device: torch.device | str) -> "Trajectory":
        """Move every tensor to ``device``."""
        return replace(
            self,
            **{f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)},
        )


def cat_trajectories(trajs: Sequence[Any]) -> Any:
    """Concatenate ``Trajectory`` objects of the same sigmas/levels along the sample axis.

    Group ids are renumbered so that the groups of ``trajs[i]`` follow those of ``trajs[i-1]``;
    per-sample tensors are concatenated, shared ones (``sigmas``, ``noise_levels``,
    ``stochastic_mask``, kernel, guidance, log-prob settings) taken from the first, ``nfe`` summed.

    Raises:
        ValueError: no trajectories, or trajectories whose shared fields differ (two rollouts with other random
            noise windows: the joined batch would train one on the other's steps).
    """
    if not trajs:
        raise ValueError("cat_trajectories needs at least one trajectory")
    first = trajs[0]
    shared = {"sigmas", "noise_levels", "stochastic_mask", "kernel", "guidance_scale", "log_prob_reduce", "log_prob_form"}
    for t in trajs[1:]:
        for name in sorted(shared):
            a, b = getattr(first, name, None), getattr(t, name, None)
            if not _same_field(a, b):
                raise ValueError(f"cat_trajectories: the trajectories differ in {name} ({_brief(a)} vs {_brief(b)}); only rollouts "
                                 "of the same sigmas, noise levels, kernel, guidance and log-prob settings join into one batch")
    values: dict = {}
    offset, group_ids = 0, []
    for t in trajs:
        group_ids.append(t.group_ids + offset)
        offset += int(t.group_ids.max()) + 1
    for f in fields(first):
        items = [getattr(t, f.name) for t in trajs]
        if f.name in shared:
            values[f.name] = items[0]
        elif f.name == "group_ids":
            values[f.name] = torch.cat(group_ids)
        elif f.name == "nfe":
            values[f.name] = sum(items)
        elif f.name in ("prompts", "metadata"):
            values[f.name] = [x for item in items for x in (item or [])]
        elif all(isinstance(x, Tensor) for x in items):
            values[f.name] = torch.cat(items)
        else:
            values[f.name] = None
    return type(first)(**values)


def _same_field(a: Any, b: Any) -> bool:
    """Whether two trajectories' shared field holds the same: equal tensors (shape and values), else ``==``."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    return a == b


def _brief(value: Any) -> str:
    """A shared field's value for a message: a short tensor as its list."""
    if isinstance(value, Tensor):
        return str([round(float(v), 4) for v in value.flatten()[:8].tolist()]) + ("..." if value.numel() > 8 else "")
    return repr(value)
