"""A cache for a frozen text encoder's features (T5 in SD3 / SD3.5, and in FLUX next).

When ``lora.train_text_encoder`` is on, the update re-encodes every micro-batch's prompts with
gradient so that the CLIP encoders' LoRA learns. T5 is never adapted, yet ``encode_prompt`` runs it
each time: on SD3.5 that is T5-XXL (4.7B parameters) at every micro-step. This cache serves T5's
rows from memory instead.

It works by shadowing the pipeline's own ``_get_t5_prompt_embeds`` for the duration of one
``encode_prompt`` call (:meth:`FrozenEncoderCache.serving`), so ``encode_prompt`` still does all
the assembly (CLIP features, padding, concatenation, the negative prompt) exactly as diffusers
writes it; only the T5 call is replaced by a lookup. Rows are computed without gradient (T5 has no
trainable parameters), for the missing prompts only, one prompt per call (so a row's bits never
depend on which prompts it was first encoded with, and a resumed run reproduces an uninterrupted
one), with ``num_images_per_prompt=1``, and repeated per image as the original does. Each row is
keyed by ``(prompt, max_sequence_length, device, dtype)`` and by the dtype and device of the encoder's
weights (diffusers' SD3 never passes ``dtype``: a row's dtype is T5's, so after ``pipe.to(torch.bfloat16)``
the fp32 rows are not served); the least recently used rows are dropped beyond ``max_prompts``.

The cache trusts that the encoder's weights do not change. Call :meth:`clear` after changing
them (loading other weights into ``text_encoder_3``).
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import Tensor


class FrozenEncoderCache:
    """LRU cache of per-prompt rows of a frozen encoder method of a diffusers pipeline.

    Args:
        method: name of the pipeline method to serve, with diffusers' signature
            ``(prompt, num_images_per_prompt, max_sequence_length, device, dtype) -> [B * n, L, D]``
            (``"_get_t5_prompt_embeds"`` in SD3 and FLUX).
        max_prompts: rows kept (0 turns the cache off). A T5-XXL row at 256 tokens is 2 MiB in bf16.
        encoder: the pipeline attribute holding the encoder, whose weights' dtype and device are part of each key.
    """

    def __init__(self, method: str = "_get_t5_prompt_embeds", max_prompts: int = 64, encoder: str = "text_encoder_3"):
        if max_prompts < 0:
            raise ValueError(f"max_prompts must be >= 0, got {max_prompts}")
        self.method = method
        self.encoder = encoder
        self.max_prompts = int(max_prompts)
        self._rows: "OrderedDict[tuple, Tensor]" = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        """Forget every row (after the encoder's weights changed)."""
        self._rows.clear()

    @contextmanager
    def serving(self, pipeline: Any) -> Iterator[None]:
        """Within the block, ``pipeline.<method>`` answers from the cache (computing missing rows
        with the original method); afterwards the pipeline is exactly as before."""
        if self.max_prompts == 0:
            yield
            return
        original = getattr(pipeline, self.method)
        shadowed = self.method in vars(pipeline)

        def cached(prompt=None, num_images_per_prompt: int = 1, max_sequence_length: int = 256,
                   device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
            return self._lookup(original, prompt, num_images_per_prompt, max_sequence_length, device, dtype, _weights_key(pipeline, self.encoder))

        setattr(pipeline, self.method, cached)
        try:
            yield
        finally:
            if shadowed:
                setattr(pipeline, self.method, original)
            else:
                delattr(pipeline, self.method)

    def _lookup(self, original, prompt, num_images_per_prompt, max_sequence_length, device, dtype, weights: tuple = ()) -> Tensor:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        # dtype / device, asked for or the weights': a row in another one is another row
        keys = [(p, int(max_sequence_length), str(device), str(dtype), *weights) for p in prompts]
        missing = [k for k in dict.fromkeys(keys) if k not in self._rows]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        with torch.no_grad():
            for key in missing:  # one prompt per call: a row never depends on which prompts came with it
                self._rows[key] = original(prompt=[key[0]], num_images_per_prompt=1, max_sequence_length=max_sequence_length,
                                           device=device, dtype=dtype)[0]
        out = torch.stack([self._rows[k] for k in keys])
        for k in keys:
            self._rows.move_to_end(k)
        while len(self._rows) > self.max_prompts:  # trimmed after the lookup: a call may need more rows than are kept
            self._rows.popitem(last=False)
        if num_images_per_prompt > 1:
            out = out.repeat_interleave(num_images_per_prompt, dim=0)
        return out


def _weights_key(pipeline: Any, encoder: str) -> tuple:
    """``(dtype, device)`` of the first parameter of ``pipeline.<encoder>`` as text, or ``()`` without one."""
    module = getattr(pipeline, encoder, None)
    first = next(iter(module.parameters()), None) if isinstance(module, torch.nn.Module) else None
    return () if first is None else (str(first.dtype), str(first.device))
