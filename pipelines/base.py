"""The Adapter protocol: the only way flowalign talks to a diffusers pipeline.

An adapter wraps one pipeline object and exposes exactly what the samplers, dense estimators
and trainer need (DESIGN.md §3). It never re-implements a model: it calls the pipeline's own
encoders, transformer, scheduler and VAE.

Convention (flowalign/sde.py): sigma goes from 1 (noise) to 0 (data),
``x_sigma = (1 - sigma) * x0 + sigma * noise`` and the model predicts ``v = noise - x0``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass
class Conditioning:
    """Encoded prompts, batch-first.

    ``cond`` holds the tensors the transformer takes for the prompts (for SD3:
    ``encoder_hidden_states`` and ``pooled_projections``); ``uncond`` the same keys for the
    negative / empty prompt (None when CFG is off). Every tensor has the batch on axis 0.
    """

    cond: dict[str, Tensor]
    uncond: Optional[dict[str, Tensor]] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """Rows (prompts, or prompt x sample) the conditioning holds."""
        return next(iter(self.cond.values())).shape[0]

    def select(self, index: Union[Tensor, list[int], slice]) -> "Conditioning":
        """Rows ``index`` of every tensor (used to build groups and micro-batches)."""
        pick = lambda d: None if d is None else {k: v[index] for k, v in d.items()}  # noqa: E731
        return Conditioning(cond=pick(self.cond), uncond=pick(self.uncond), extra=dict(self.extra))

    def gather(self, rows: Tensor) -> "Conditioning":
        """Rows ``rows`` (repeats allowed) of every tensor, like :meth:`select`, computed as a one-hot
        matmul for floating tensors: the same values (``1 * x + 0`` is exact), but the backward sums
        each row's gradients in a fixed order, where indexing's backward (``index_put_`` with
        accumulation) may not, and a training run would not resume bit-exactly. For conditioning
        that carries gradient (text encoders with LoRA)."""
        def take(t: Tensor) -> Tensor:
            if not t.is_floating_point():
                return t[rows]
            pick = torch.nn.functional.one_hot(rows, t.shape[0]).to(t.dtype)  # [n, u]
            return (pick @ t.reshape(t.shape[0], -1)).reshape(rows.numel(), *t.shape[1:])

        part = lambda d: None if d is None else {k: take(v) for k, v in d.items()}  # noqa: E731
        return Conditioning(cond=part(self.cond), uncond=part(self.uncond), extra=dict(self.extra))

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """The rows of ``parts`` one after another (the same keys in each; ``extra`` from the first)."""
        if not parts:
            raise ValueError("Conditioning.cat needs at least one part")
        first = parts[0]
        if any(set(p.cond) != set(first.cond) or (p.uncond is None) != (first.uncond is None) for p in parts):
            raise ValueError("Conditioning.cat: the parts hold different keys (or CFG in some only)")
        join = lambda name: None if getattr(first, name) is None else {  # noqa: E731
            k: torch.cat([getattr(p, name)[k] for p in parts]) for k in getattr(first, name)}
        return Conditioning(cond=join("cond"), uncond=join("uncond"), extra=dict(first.extra))

    def repeat_interleave(self, repeats: int) -> "Conditioning":
        """Repeat each prompt ``repeats`` times in a row (prompt p -> rows p*G ... p*G+G-1)."""
        rep = lambda d: None if d is None else {k: v.repeat_interleave(repeats, dim=0) for k, v in d.items()}  # noqa: E731
        return Conditioning(cond=rep(self.cond), uncond=rep(self.uncond), extra=dict(self.extra))

    def to(self, device: Union[torch.device, str], dtype: Optional[torch.dtype] = None) -> "Conditioning":
        """A copy on ``device``; ``dtype`` casts the floating-point tensors only."""
        move = lambda d: None if d is None else {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in d.items()}  # noqa: E731
        return Conditioning(cond=move(self.cond), uncond=move(self.uncond), extra=dict(self.extra))


@runtime_checkable
class Adapter(Protocol):
    """What a pipeline family must provide. See ``pipelines/sd3.py`` for the reference one."""

    pipeline: Any

    def encode(self, prompts: list[str], do_classifier_free_guidance: bool = True, requires_grad: bool = False) -> Conditioning:
        """Encode prompts (and the empty negative prompt when CFG is on); without autograd unless
        ``requires_grad`` (the update re-encodes with it when the text encoders carry LoRA)."""

    def velocity(self, latents: Tensor, sigma: Union[float, Tensor], cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """Predicted velocity ``v = noise - x0`` for ``latents`` at ``sigma`` (float or ``[B]``).

        With ``guidance_scale > 1`` and ``cond.uncond`` set, CFG is applied inside, in one
        batched transformer call: ``v = v_u + w (v_c - v_u)``.
        """

    def sigmas(self, num_steps: int) -> Tensor:
        """``[num_steps + 1]`` sigmas from the pipeline's own scheduler and shift rules, ending at 0."""

    def initial_noise(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """Standard normal latents of the pipeline's default resolution, ``[B, *latent_shape]``."""

    def decode(self, latents: Tensor, requires_grad: bool = False) -> Tensor:
        """Decode latents to images ``[B, 3, H, W]`` or videos ``[B, F, 3, H, W]`` (frames first, then RGB: not the
        ``[B, C, F, H, W]`` of video latents; what rewards take) in [0, 1], float32; ``requires_grad=True`` keeps the
        graph to ``latents`` (process-reward guidance with a differentiable reward)."""

    @property
    def trainable_module(self) -> nn.Module:
        """The module LoRA is attached to (the transformer)."""

    @property
    def lora_target_modules(self) -> list[str]:
        """Default LoRA target module names for this family."""

    @property
    def text_lora_modules(self) -> dict[str, nn.Module]:
        """``{component name: text encoder}`` that ``lora.train_text_encoder`` adapts, named as the
        pipeline's ``save_lora_weights`` / ``load_lora_weights`` name them (SD3: ``text_encoder``,
        ``text_encoder_2``); ``{}`` for a family whose loader takes no text-encoder LoRA."""

    @property
    def text_lora_target_modules(self) -> list[str]:
        """Default LoRA target module names in the text encoders."""

    def save_lora(self, directory: Union[str, Path], state_dict: dict[str, Tensor],
                  metadata: Optional[dict[str, Any]] = None,
                  text_encoder_states: Optional[dict[str, tuple[dict[str, Tensor], Optional[dict[str, Any]]]]] = None) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` with the pipeline class's ``save_lora_weights``.

        ``metadata`` is the peft config of the LoRA (``flowalign.lora.lora_metadata``: ``r``,
        ``lora_alpha``, target modules) written into the safetensors header; without it diffusers'
        ``load_lora_weights`` assumes ``lora_alpha == r`` and the loaded model differs from the
        trained one whenever ``alpha != r``. ``text_encoder_states`` maps a name of
        :attr:`text_lora_modules` to that encoder's ``(state_dict, metadata)``.
        """


# name -> factory(pipeline, **kwargs) -> Adapter; filled by each family module at import time.
ADAPTERS: dict[str, Callable[..., Adapter]] = {}
# diffusers pipeline class name -> adapter name
PIPELINE_CLASSES: dict[str, str] = {}


def register_adapter(name: str, pipeline_classes: tuple[str, ...] = ()) -> Callable:
    """Class decorator: make an adapter available to ``load_adapter`` under ``name``."""

    def wrap(cls):
        ADAPTERS[name] = cls
        for pipeline_class in pipeline_classes:
            PIPELINE_CLASSES[pipeline_class] = name
        return cls

    return wrap
