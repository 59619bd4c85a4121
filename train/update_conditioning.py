"""The conditioning of the online update's micro-batches (policy and reference).

Without trained text encoders the policy uses the rollout's own encoding, and the reference
shares it. With ``lora.train_text_encoder`` the encoding changes with every optimizer step, so:

- the policy re-encodes each micro-batch's prompts through the current encoders (with gradient,
  so their LoRA learns); T5, never adapted, comes from the adapter's cache;
- the reference encodes with every LoRA off (under ``lora.reference: init``, with the LoRA the run
  started from). Neither changes, so one batch's
  distinct prompts are encoded once and kept until a batch with other prompts comes: the
  micro-batches of one iteration (every trained step, every inner epoch) gather their rows from
  that one encoding.

Rows are picked with :meth:`Conditioning.gather` (a one-hot matmul), whose backward sums each
row's gradients in a fixed order, so a resumed run reproduces an uninterrupted one bit for bit.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from flowalign import lora as lora_lib


class UpdateConditioning:
    """Policy and reference conditioning of samples ``index`` of a batch (``batch.cond_rows(index)``:
    the rollout's encoding of their prompts; ``batch.traj.prompts``: one prompt per sample).

    Args:
        adapter: the (possibly autocast-wrapped) adapter whose ``encode`` the rollouts used.
        text_modules: ``{name: text encoder}`` carrying trained LoRA; empty when none.
        classifier_free: whether training applies classifier-free guidance (encode the negative prompt too).
        device: where the gathered rows go.
        reference_lora: the reference's LoRA weights (``lora.reference: init``); None: every LoRA off.
    """

    def __init__(self, adapter, text_modules: dict, classifier_free: bool, device: torch.device,
                 reference_lora: Optional[lora_lib.LoraSnapshot] = None):
        self.adapter = adapter
        self.text_modules = text_modules
        self.reference_lora = reference_lora
        self.classifier_free = classifier_free
        self.device = device
        self._reference = None  # (the last batch's distinct prompts encoded as the reference, {prompt: row})

    def policy(self, batch, index: Tensor, requires_grad: bool = True):
        """The rollouts' own rows (no gradient), or the prompts re-encoded by the current text
        encoders (with gradient when ``requires_grad``). Before the first optimizer step of an
        iteration the two are equal, so the ratio starts at 1."""
        if not self.text_modules:
            return batch.cond_rows(index)
        return self.encode_rows([batch.traj.prompts[i] for i in index.tolist()], requires_grad)

    def encode_rows(self, prompts: list[str], requires_grad: bool = True):
        """One conditioning row per entry of ``prompts`` (repeats allowed) from the current text encoders:
        each distinct prompt is encoded once (with gradient when ``requires_grad``) and its rows gathered."""
        return self._gather(*self._encode_distinct(prompts, requires_grad), prompts)

    def reference(self, batch, index: Tensor) -> Optional[object]:
        """The prompts encoded as the reference (every LoRA off, or the starting LoRA), or None without trained text encoders (the
        reference then shares the policy's conditioning)."""
        if not self.text_modules:
            return None
        return self.reference_rows(batch.traj.prompts, [batch.traj.prompts[i] for i in index.tolist()])

    def reference_rows(self, batch_prompts: list[str], prompts: list[str]):
        """One row per entry of ``prompts`` encoded as the reference (every LoRA off, or the starting LoRA). The distinct prompts of
        ``batch_prompts`` (which must hold every one of ``prompts``) are encoded once and kept until
        a call with other ``batch_prompts``."""
        if self._reference is None or list(self._reference[1]) != list(dict.fromkeys(batch_prompts)):
            with lora_lib.reference_weights(self.reference_lora, *self.text_modules.values()):
                self._reference = self._encode_distinct(batch_prompts, requires_grad=False)
        return self._gather(*self._reference, prompts)

    def _encode_distinct(self, prompts: list[str], requires_grad: bool):
        """``(conditioning of each distinct prompt, {prompt: its row})``."""
        position = {p: j for j, p in enumerate(dict.fromkeys(prompts))}
        return self.adapter.encode(list(position), do_classifier_free_guidance=self.classifier_free, requires_grad=requires_grad), position

    def _gather(self, cond, position: dict, prompts: list[str]):
        """One row of ``cond`` per prompt of ``prompts``."""
        return cond.gather(torch.tensor([position[p] for p in prompts], device=self.device))
