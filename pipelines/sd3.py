"""Adapter for diffusers' ``StableDiffusion3Pipeline`` (SD3 / SD3.5 and the flowalign toy model).

Everything goes through the pipeline's own public parts: ``encode_prompt`` for the three text
encoders, the ``SD3Transformer2DModel`` for velocities, the pipeline's
``FlowMatchEulerDiscreteScheduler`` config for sigmas (static ``shift``; ``mu`` when the config
asks for dynamic shifting), the pipeline's latent shape and noise (``randn_tensor``, as in
``prepare_latents``), the VAE for decoding and ``save_lora_weights`` for LoRA files.

With ``kernel="ode"`` the flowalign rollout through this adapter reproduces
``pipe(prompt, latents=x_T, num_inference_steps=K, guidance_scale=w, output_type="pt")``
(tested to 1e-4 with CFG on and off).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .base import Conditioning, register_adapter
from .text_cache import FrozenEncoderCache

logger = logging.getLogger(__name__)

# Default LoRA targets of diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py
# (joint attention: image-stream q/k/v/out and text-stream add_q/k/v/to_add_out).
SD3_LORA_TARGETS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)
# Text-encoder LoRA targets of the same script with --train_text_encoder (the CLIP attention projections)
CLIP_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# the text encoders SD3's save_lora_weights / load_lora_weights take LoRA for (T5 is never adapted)
SD3_TEXT_LORA_COMPONENTS = ("text_encoder", "text_encoder_2")


@register_adapter("sd3", ("StableDiffusion3Pipeline",))
class SD3Adapter:
    """Adapter over a ``StableDiffusion3Pipeline`` (see ``pipelines/base.py`` for the protocol).

    Args:
        pipeline: a ``StableDiffusion3Pipeline`` (any device / dtype; the transformer's is used).
        max_sequence_length: T5 token length passed to ``encode_prompt`` (SD3 default 256).
        negative_prompt: the unconditional prompt for CFG (``""`` like the pipeline's default).
        height, width: image size in pixels; default ``transformer.config.sample_size *
            vae_scale_factor`` (the pipeline's default).
        t5_cache_size: prompts whose T5 features are kept in memory (``pipelines/text_cache.py``;
            0 = off). T5 is frozen, so ``encode`` runs it once per prompt and serves the rows from
            then on: the update's re-encoding with gradient (``lora.train_text_encoder``) then
            runs only the CLIP encoders. Call ``adapter.t5_cache.clear()`` after changing T5's weights.
    """

    def __init__(
        self,
        pipeline: Any,
        max_sequence_length: int = 256,
        negative_prompt: str = "",
        height: Optional[int] = None,
        width: Optional[int] = None,
        t5_cache_size: int = 64,
    ):
        self.pipeline = pipeline
        self.t5_cache = FrozenEncoderCache("_get_t5_prompt_embeds", max_prompts=t5_cache_size)
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt
        default = pipeline.default_sample_size * pipeline.vae_scale_factor
        self.height = int(height or default)
        self.width = int(width or default)
        multiple = pipeline.vae_scale_factor * pipeline.transformer.config.patch_size
        if self.height % multiple or self.width % multiple:
            raise ValueError(f"height={self.height} and width={self.width} must be multiples of {multiple} (VAE factor x patch size)")

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        """Device of the transformer's parameters."""
        return self._first_parameter().device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the transformer's parameters."""
        return self._first_parameter().dtype

    def _first_parameter(self) -> Tensor:
        # O(1), unlike ModelMixin.device/.dtype, which walk every module on each call
        return next(self.pipeline.transformer.parameters())

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one latent, as ``prepare_latents`` makes it."""
        f = self.pipeline.vae_scale_factor
        return (self.pipeline.transformer.config.in_channels, self.height // f, self.width // f)

    @property
    def num_train_timesteps(self) -> int:
        """The scheduler's training timesteps (1000 for SD3): the transformer's timestep is ``sigma * num_train_timesteps``."""
        return int(self.pipeline.scheduler.config.num_train_timesteps)

    @property
    def trainable_module(self) -> nn.Module:
        """The module that carries the LoRA (the SD3 transformer)."""
        return self.pipeline.transformer

    @property
    def lora_target_modules(self) -> list[str]:
        """Default LoRA targets in the transformer: the joint-attention projections (both streams)."""
        return list(SD3_LORA_TARGETS)

    @property
    def text_lora_modules(self) -> dict[str, nn.Module]:
        """Text encoders that take LoRA with ``lora.train_text_encoder``: the two CLIP encoders present (never T5)."""
        return {name: getattr(self.pipeline, name) for name in SD3_TEXT_LORA_COMPONENTS if getattr(self.pipeline, name, None) is not None}

    @property
    def text_lora_target_modules(self) -> list[str]:
        """Default LoRA targets in each CLIP encoder: ``q/k/v/out_proj``."""
        return list(CLIP_LORA_TARGETS)

    # ------------------------------------------------------------------ protocol

    def encode(self, prompts: list[str], do_classifier_free_guidance: bool = True, requires_grad: bool = False) -> Conditioning:
        """Encode ``prompts`` with ``pipeline.encode_prompt`` (and ``negative_prompt`` for CFG).

        Returns ``Conditioning(cond={"encoder_hidden_states": [B, 77 + T5_len, D],
        "pooled_projections": [B, P]}, uncond=same keys or None)``. Runs under ``torch.no_grad``
        unless ``requires_grad`` (then gradients reach any LoRA in the text encoders). T5's rows
        come from ``self.t5_cache`` (computed once per prompt, without gradient: T5 is never adapted).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        t5_rows = self.t5_cache.serving(self.pipeline) if getattr(self.pipeline, "text_encoder_3", None) is not None else nullcontext()
        with t5_rows, torch.enable_grad() if requires_grad else torch.no_grad():
            embeds, neg_embeds, pooled, neg_pooled = self.pipeline.encode_prompt(
                prompt=list(prompts),
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                do_classifier_free_guidance=do_classifier_free_guidance,
                negative_prompt=self.negative_prompt,
                max_sequence_length=self.max_sequence_length,
            )
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        uncond = None
        if do_classifier_free_guidance:
            uncond = {"encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled}
        return Conditioning(cond=cond, uncond=uncond)

    def velocity(self, latents: Tensor, sigma: Union[float, Tensor], cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """``v = noise - x0`` from one transformer call; CFG ``v_u + w (v_c - v_u)`` when ``w > 1``.

        The transformer gets ``timestep = sigma * num_train_timesteps``, the ``t`` the SD3
        pipeline passes from its scheduler. Rows are ``[uncond; cond]`` as in the pipeline.
        """
        batch = latents.shape[0]
        if cond.batch_size != batch:
            raise ValueError(f"conditioning has {cond.batch_size} rows but latents have {batch}")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(batch)
        elif sigma.shape != (batch,):
            raise ValueError(f"sigma must be a float or a [B]={batch} tensor, got shape {tuple(sigma.shape)}")
        timestep = sigma * self.num_train_timesteps  # [B]

        do_cfg = guidance_scale > 1.0
        if do_cfg and cond.uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} > 1 needs unconditional embeddings: encode with do_classifier_free_guidance=True")
        x = latents.to(self.dtype)
        hidden, pooled = cond.cond["encoder_hidden_states"], cond.cond["pooled_projections"]
        if do_cfg:
            x = torch.cat([x, x])
            timestep = torch.cat([timestep, timestep])
            hidden, pooled = self._cfg_embeddings(cond)
        v = self.pipeline.transformer(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        if do_cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        return v

    def _cfg_embeddings(self, cond: Conditioning) -> tuple[Tensor, Tensor]:
        """``[uncond; cond]`` text embeddings, concatenated once per conditioning and reused.

        A rollout calls ``velocity`` K times with the same ``cond``; the pipeline also concatenates
        once before its loop. The cache holds the source tensors and is only used when they are the
        very same objects (and need no gradient).
        """
        sources = (
            cond.uncond["encoder_hidden_states"],
            cond.cond["encoder_hidden_states"],
            cond.uncond["pooled_projections"],
            cond.cond["pooled_projections"],
        )
        cached = getattr(self, "_cfg_cache", None)
        if cached is not None and all(a is b for a, b in zip(cached[0], sources)):
            return cached[1]
        joined = (torch.cat(sources[:2]), torch.cat(sources[2:]))
        if not any(t.requires_grad for t in sources):
            self._cfg_cache = (sources, joined)
        return joined

    def sigmas(self, num_steps: int) -> Tensor:
        """``[num_steps + 1]`` fp32 sigmas of the pipeline's scheduler (shifted), ending at 0, on CPU.

        A fresh scheduler is built from the pipeline's config, so the pipeline's own scheduler
        state is left alone.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        config = self.pipeline.scheduler.config
        scheduler = type(self.pipeline.scheduler).from_config(config)
        kwargs = {}
        if config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            _, h, w = self.latent_shape
            p = self.pipeline.transformer.config.patch_size
            kwargs["mu"] = calculate_shift(
                (h // p) * (w // p),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
        sigmas = scheduler.sigmas.to(torch.float32)
        if sigmas.shape != (num_steps + 1,) or float(sigmas[-1]) != 0.0:
            raise RuntimeError(f"scheduler gave sigmas {sigmas.tolist()}, expected {num_steps + 1} values ending at 0")
        return sigmas

    def initial_noise(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``[B, C, H/f, W/f]`` standard normal latents drawn like the pipeline's ``prepare_latents``."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor((batch_size, *self.latent_shape), generator=generator, device=self.device, dtype=self.dtype)

    def decode(self, latents: Tensor, requires_grad: bool = False) -> Tensor:
        """``[B, 3, H, W]`` fp32 images in [0, 1]: VAE decode of ``latents / scaling + shift``.

        ``requires_grad=True`` keeps the graph to ``latents`` (the frozen decoder's weights get no
        gradient), for rewards differentiated w.r.t. latents (:mod:`flowalign.guidance`).
        """
        vae = self.pipeline.vae
        with torch.set_grad_enabled(requires_grad):
            z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
            images = vae.decode(z, return_dict=False)[0]
            return (images.float() / 2 + 0.5).clamp(0, 1)

    def save_lora(self, directory: Union[str, Path], state_dict: dict[str, Tensor], metadata: Optional[dict] = None,
                  text_encoder_states: Optional[dict[str, tuple[dict[str, Tensor], Optional[dict]]]] = None) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` with ``StableDiffusion3Pipeline.save_lora_weights``.

        ``metadata`` (the peft ``LoraConfig`` as a dict, e.g. :func:`flowalign.lora.lora_metadata`)
        goes into the file header as ``transformer_lora_adapter_metadata``, so
        ``load_lora_weights`` restores the trained ``lora_alpha / r`` scale (without it diffusers
        assumes ``alpha = r``). ``text_encoder_states`` (``{"text_encoder": (state, metadata),
        "text_encoder_2": ...}``) adds the CLIP encoders' LoRA as ``text_encoder.`` /
        ``text_encoder_2.`` keys, as diffusers' DreamBooth ``--train_text_encoder`` writes them.
        """
        directory = Path(directory)
        extra = {}
        for name, (state, meta) in (text_encoder_states or {}).items():
            if name not in SD3_TEXT_LORA_COMPONENTS:
                raise ValueError(f"SD3 LoRA files take text-encoder LoRA for {SD3_TEXT_LORA_COMPONENTS}, not {name!r}")
            extra[f"{name}_lora_layers"], extra[f"{name}_lora_adapter_metadata"] = state, meta
        from flowalign.files import atomic_file_in

        with atomic_file_in(directory, "pytorch_lora_weights.safetensors") as tmp:  # a crash mid-write keeps the old file
            type(self.pipeline).save_lora_weights(str(tmp), transformer_lora_layers=state_dict,
                                                  transformer_lora_adapter_metadata=metadata, **extra)
        return directory / "pytorch_lora_weights.safetensors"
