"""Tiny offline diffusers pipelines for tests (yours too).

The pipelines here are the real diffusers classes assembled from the tiny, seeded components of
:mod:`flowalign.pipelines.components` (real CLIP BPE tokenizers, a character-level T5
tokenizer, random weights). They need no network and run a few denoising steps on a CPU in
milliseconds, so any code that takes a diffusers pipeline, including your own adapters,
rewards and training loops, can be tested end to end::

    from flowalign.pipelines.testing import tiny_sd3_pipeline
    pipe = tiny_sd3_pipeline(seed=0)
    images = pipe("a red square", num_inference_steps=4, output_type="pt").images

Same seed, same weights. The images are noise-like (the weights are untrained); for a model
that draws something, use the toy model in ``flowalign.assets`` (``flowalign.pipelines.toy``).
One builder per pipeline family: ``tiny_sd3_pipeline`` now; FLUX, Wan, ... get their own
``tiny_<family>_pipeline`` here, following the same pattern.
"""
from __future__ import annotations

from typing import Optional

from . import components

__all__ = ["add_random_lora", "tiny_sd3_pipeline"]

SD3_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")


def tiny_sd3_pipeline(
    seed: int = 0,
    with_t5: bool = True,
    sample_size: int = 16,
    patch_size: int = 2,
    num_layers: int = 2,
    clip_hidden_size: int = 32,
    t5_max_length: int = 256,
    shift: float = 3.0,
    vae_block_out_channels: tuple[int, ...] = (8, 16),
):
    """A ``StableDiffusion3Pipeline`` of tiny random components, built offline from configs.

    Layout follows SD3: two CLIP text encoders (CLIP-L style tokenizer padding with
    ``<|endoftext|>``, bigG style padding with ``!``), an optional T5 encoder (``with_t5=False``
    sets ``text_encoder_3``/``tokenizer_3`` to None, as SD3 allows), an MMDiT transformer, an
    SD3-style VAE (shift and scaling factors) and ``FlowMatchEulerDiscreteScheduler(shift=3)``.
    Default output: 32x32 images from 4x16x16 latents.

    Args:
        seed: seeds every component (component ``i`` uses ``seed + i``).
        with_t5: include the T5 encoder and tokenizer.
        sample_size: latent side (image side = ``sample_size * 2 ** (len(vae_block_out_channels) - 1)``).
        patch_size, num_layers: transformer patch size and depth.
        clip_hidden_size: hidden and projection size of each CLIP encoder; the transformer's
            ``joint_attention_dim`` and the T5 ``d_model`` are twice this.
        t5_max_length: ``tokenizer_3.model_max_length``.
        shift: the scheduler's static timestep shift (SD3 uses 3.0).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    joint_dim = 2 * clip_hidden_size
    clip_kw = dict(hidden_size=clip_hidden_size, projection_dim=clip_hidden_size)
    text_encoder_3: Optional[object] = None
    tokenizer_3: Optional[object] = None
    if with_t5:
        text_encoder_3 = components.tiny_t5_encoder(d_model=joint_dim, seed=seed + 2)
        tokenizer_3 = components.t5_tokenizer(model_max_length=t5_max_length)
    vae = components.tiny_vae(block_out_channels=vae_block_out_channels, seed=seed + 3)
    transformer = components.tiny_sd3_transformer(
        sample_size=sample_size,
        patch_size=patch_size,
        num_layers=num_layers,
        joint_attention_dim=joint_dim,
        pooled_projection_dim=2 * clip_hidden_size,
        seed=seed + 4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae,
        text_encoder=components.tiny_clip_text_encoder(**clip_kw, seed=seed),
        tokenizer=components.clip_tokenizer(pad_token=components.CLIP_EOS),
        text_encoder_2=components.tiny_clip_text_encoder(**clip_kw, seed=seed + 1),
        tokenizer_2=components.clip_tokenizer(pad_token="!"),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def add_random_lora(module, rank: int = 4, alpha: float = 8.0, target_modules=SD3_ATTENTION, scale: float = 0.5, seed: int = 1) -> list:
    """Inject LoRA into ``module`` (:func:`flowalign.lora.add_lora`) and add ``scale ·`` standard normal
    draws (``torch.Generator().manual_seed(seed)``, parameter by parameter) to its A and B, so that the
    update is clearly non-zero: a LoRA to load, save or evaluate in tests. Returns the LoRA parameters."""
    import torch

    from flowalign import lora as lora_lib

    params = lora_lib.add_lora(module, rank=rank, alpha=alpha, target_modules=list(target_modules))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return params
