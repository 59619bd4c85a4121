"""Build the toy model: a real ``StableDiffusion3Pipeline`` of tiny components trained on the
shapes world (DESIGN.md §10).

    python -m flowalign.pipelines.toy build [--out assets/toy] [--seed 0] [--dit-steps N] ...

Stages (one deterministic seed drives them all):

1. **Data**: ``n_scenes`` training scenes and captions from
   :func:`flowalign.rewards.shapes_scenes.training_scenes` (held-out combinations never drawn).
   With ``caption_noise > 0`` that fraction of captions gets one attribute wrong, like web
   alt-text (:func:`flowalign.rewards.shapes_scenes.noisy_captions`: a shape, colour, number or
   relation changed, or two attributes swapped; never a held-out caption): the model then
   draws, for a caption, the right scene or a near miss, the imperfection that reward
   alignment is meant to remove. With ``color_synonyms`` (``"blue:cyan,red:purple"``) each
   colour of a pair is named by its partner with probability ``synonym_rate``
   (:func:`flowalign.rewards.shapes_scenes.synonym_captions`); at 0.5 the words of a pair mean
   the same thing in the data. Measured (bench/results/toy_variants.json, S1/S2): the
   co-trained text encoders then give the pair near-identical features, and RL (LoRA on the
   transformer, or on the text encoders too) did not separate them within 50 iterations.
   With ``washed_fraction > 0`` that fraction of scenes is washed out towards the background
   (:func:`flowalign.rewards.shapes_scenes.washed_renditions`, contrast ``washed_alpha``), a
   defect the same for every caption. Measured (bench/README.md, session 26): guidance at 4.5
   hides most of it, and RL gains +8 to +14 points on such toys, about what it gains on the
   shipped one.
   With ``split_fraction > 0`` that fraction of scenes has every object cut in two by a band of
   background colour ``split_width`` pixels wide (:func:`flowalign.rewards.shapes_scenes.split_renditions`):
   a defect the same for every caption that keeps full contrast, so guidance does not hide it.
   With ``watermark_fraction > 0`` that fraction of scenes is stamped with the same diagonal
   stripes at ``watermark_opacity`` (:func:`flowalign.rewards.shapes_scenes.watermarked_renditions`),
   like stock-photo watermarks in web data.
2. **VAE**: a small ``AutoencoderKL`` (32x32x3 -> 16x16x4, SD3 layout: no quant convs) trained
   with L1 + MSE reconstruction and a small KL term; its ``shift_factor``/``scaling_factor``
   are set from the latents' mean and std so the transformer sees unit-variance latents.
3. **Transformer + text encoders**: an ``SD3Transformer2DModel`` (patch 2 on the 16x16
   latent: 64 image tokens) and two tiny CLIP text encoders (co-trained; with
   ``frozen_text_encoders`` they keep their seeded random init and only the transformer
   learns. Measured (toy_variants.json, F): random features keep "left of" / "right of" apart
   but leave colour words close, and that base scores 7.2% held-out; the tokenizers are
   the real CLIP BPE from :mod:`flowalign.pipelines.components`, ``model_max_length`` the
   shortest that fits every caption, 11; no real T5: :func:`zero_t5` outputs zeros exactly
   like ``text_encoder_3=None``) trained with the SD3 rectified-flow loss
   (Esser et al. 2024, arXiv:2403.03206, eq. 1-2 and §3.1):
   ``x_t = (1 - t) x0 + t eps``, target ``v = eps - x0``, ``t ~ logit-normal(0, 1)``,
   ``timestep = 1000 t``; 10% of captions are dropped to ``""`` so classifier-free guidance
   works. An EMA of the weights is what gets saved.

The pipeline still appends ``max_sequence_length`` (default 256) zero tokens in T5's place;
the model is trained with :data:`T5_TOKENS` of them, so callers pass
``max_sequence_length=T5_TOKENS`` (else sampling is slower and off-distribution). That value,
the recommended guidance scale, shift and step count are in ``flowalign_toy.json`` next to
``model_index.json`` (:func:`load_toy_meta`).

**Continued builds**: with ``--init-from FOLDER`` the build skips stage 2 and the initialisation of
stage 3 and continues pretraining that toy folder (its VAE, latent scaling, text encoders and
transformer; the architecture flags must stay at their defaults) for ``--dit-steps`` steps on
``--n-scenes`` fresh scenes (drawn with ``seed + 1``, so not the ones the folder was trained on):

    python -m flowalign.pipelines.toy build --init-from assets/toy --out /tmp/toy_washed \\
        --n-scenes 20000 --dit-steps 800 --dit-lr 3e-4 --washed-fraction 0.35

    python -m flowalign.pipelines.toy evaluate --model assets/toy --out bench/results/toy_build.json

measures a folder (:func:`evaluate_toy`). Training runs single-threaded by default: on a
shared 2-core CPU, two torch threads competing with another process ran 10-15x slower.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

T5_TOKENS = 1  # zero "T5" tokens the pipeline appends without a T5 encoder (max_sequence_length)
META_FILE = "flowalign_toy.json"


@dataclass
class ToyBuildConfig:
    """Sizes and schedule of a toy build (the defaults are the shipped model)."""

    seed: int = 0
    n_scenes: int = 30000
    vae_steps: int = 700
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    vae_channels: tuple[int, ...] = (16, 32)
    threads: int = 1  # tiny models train far faster single-threaded on a shared CPU (no oversubscription)
    latent_channels: int = 4
    dit_steps: int = 4000
    dit_batch: int = 64
    dit_lr: float = 8e-4
    dit_layers: int = 4
    dit_heads: int = 3
    dit_head_dim: int = 32
    dit_patch: int = 2
    clip_hidden: tuple[int, int] = (16, 16)
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    caption_noise: float = 0.0  # fraction of training captions with one attribute wrong (noisy_captions)
    color_synonyms: str = ""  # "blue:cyan,red:purple": colour pairs the captions name interchangeably (synonym_captions)
    synonym_rate: float = 0.5  # probability that a paired colour is named by its partner
    pretrain_heldout: bool = False  # pretraining scenes include the held-out combinations (training_scenes)
    uncaptioned_heldout: bool = False  # with pretrain_heldout: held-out scenes are shown with the empty caption only
    frozen_text_encoders: bool = False  # keep both CLIP encoders at their random init (only the transformer learns)
    washed_fraction: float = 0.0  # fraction of training scenes washed out towards the background (washed_renditions)
    washed_alpha: float = 0.25  # contrast kept by a washed scene (the verifier needs >= 0.5)
    split_fraction: float = 0.0  # fraction of training scenes whose every object is cut in two (split_renditions)
    split_width: float = 1.5  # width in pixels of the background-coloured cut
    watermark_fraction: float = 0.0  # fraction of training scenes stamped with diagonal stripes (watermarked_renditions)
    watermark_opacity: float = 0.7  # the stamp's opacity
    init_from: Optional[str] = None  # continue pretraining this toy folder (its VAE, text encoders, transformer)
    shift: float = 1.5
    guidance_scale: float = 4.5
    eval_every: int = 500
    eval_samples: int = 64
    sample_dir: Optional[str] = None

    def __post_init__(self) -> None:
        from flowalign.rewards.shapes_scenes import parse_color_pairs

        parse_color_pairs(self.color_synonyms)  # raises on unknown or repeated colours
        if not 0.0 <= self.synonym_rate <= 1.0:
            raise ValueError(f"synonym_rate must be in [0, 1], got {self.synonym_rate}")
        if self.uncaptioned_heldout and not self.pretrain_heldout:
            raise ValueError("uncaptioned_heldout needs pretrain_heldout (there are no held-out scenes to leave uncaptioned)")
        if not 0.0 <= self.washed_fraction <= 1.0 or not 0.0 <= self.washed_alpha <= 1.0:
            raise ValueError(f"washed_fraction and washed_alpha must be in [0, 1], got {self.washed_fraction}, {self.washed_alpha}")
        if not 0.0 <= self.split_fraction <= 1.0 or not self.split_width > 0.0:
            raise ValueError(f"split_fraction must be in [0, 1] and split_width positive, got {self.split_fraction}, {self.split_width}")
        if not 0.0 <= self.watermark_fraction <= 1.0 or not 0.0 <= self.watermark_opacity <= 1.0:
            raise ValueError(f"watermark_fraction and watermark_opacity must be in [0, 1], got {self.watermark_fraction}, {self.watermark_opacity}")
        if self.init_from is not None:
            default = ToyBuildConfig()
            changed = [k for k in ARCHITECTURE_FIELDS if getattr(self, k) != getattr(default, k)]
            if changed:
                raise ValueError(f"init_from continues {self.init_from!r} with its own architecture; do not also set {changed}")


ARCHITECTURE_FIELDS = ("vae_channels", "latent_channels", "dit_layers", "dit_heads", "dit_head_dim", "dit_patch", "clip_hidden")


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] -> float [N, 3, 32, 32] in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def caption_length(captions: list[str]) -> int:
    """Shortest CLIP context length that holds every caption (BOS + tokens + EOS)."""
    from .components import clip_tokenizer

    tok = clip_tokenizer(77)
    return max(len(tok(c).input_ids) for c in captions)


def build_vae(cfg: ToyBuildConfig):
    """The toy's untrained ``AutoencoderKL`` (diffusers' class at tiny widths, seeded by ``cfg.seed``)."""
    from .components import tiny_vae

    return tiny_vae(block_out_channels=cfg.vae_channels, latent_channels=cfg.latent_channels, layers_per_block=1, norm_num_groups=16, sample_size=32, seed=cfg.seed)


def train_vae(vae, images: torch.Tensor, cfg: ToyBuildConfig, gen: torch.Generator) -> dict[str, float]:
    """Reconstruction (L1 + MSE) + ``vae_kl_weight`` x KL training; returns final metrics."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    warm = max(1, cfg.vae_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm) * max(0.05, 1 - k / max(cfg.vae_steps, 1)))
    bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=10)
    rec = kl = torch.zeros(())
    for _ in bar:
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=gen)
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        y = vae.decode(z).sample
        rec = F.l1_loss(y, x) + F.mse_loss(y, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = rec + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}", refresh=False)
    vae.eval()
    return {"vae_rec_loss": rec.item(), "vae_kl": kl.item()}


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds ``[N, C, 16, 16]`` (raw, before shift/scale)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i : i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def build_pipeline(cfg: ToyBuildConfig, vae, max_length: int):
    """The untrained pipeline around a trained VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from .components import clip_tokenizer, t5_tokenizer, tiny_clip_text_encoder, tiny_sd3_transformer

    h1, h2 = cfg.clip_hidden
    te1 = tiny_clip_text_encoder(hidden_size=h1, projection_dim=h1, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * h1, max_position_embeddings=max_length, seed=cfg.seed + 1)
    te2 = tiny_clip_text_encoder(hidden_size=h2, projection_dim=h2, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * h2, max_position_embeddings=max_length, seed=cfg.seed + 2)
    inner = cfg.dit_heads * cfg.dit_head_dim
    transformer = tiny_sd3_transformer(
        sample_size=32 // 2 ** (len(cfg.vae_channels) - 1),
        patch_size=cfg.dit_patch,
        in_channels=cfg.latent_channels,
        num_layers=cfg.dit_layers,
        attention_head_dim=cfg.dit_head_dim,
        num_attention_heads=cfg.dit_heads,
        joint_attention_dim=h1 + h2,
        caption_projection_dim=inner,
        pooled_projection_dim=h1 + h2,
        seed=cfg.seed + 3,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift),
        vae=vae,
        text_encoder=te1,
        tokenizer=clip_tokenizer(max_length),
        text_encoder_2=te2,
        tokenizer_2=clip_tokenizer(max_length, pad_token="!"),
        text_encoder_3=zero_t5(h1 + h2, seed=cfg.seed + 4),
        tokenizer_3=t5_tokenizer(),  # 256: longer than any caption (T5_TOKENS only sets what the pipeline keeps)
    )


def zero_t5(d_model: int, seed: int = 0):
    """A 1-layer T5 encoder whose output is identically zero (its final RMSNorm weight is 0).

    SD3 without T5 (``text_encoder_3=None``) feeds zeros in T5's place; this module feeds the
    same zeros, so the folder loads with a plain ``from_pretrained`` (diffusers 0.42 does not
    list ``text_encoder_3`` among SD3's optional components) and behaves as the T5-free model.
    """
    from .components import tiny_t5_encoder

    t5 = tiny_t5_encoder(d_model=d_model, d_kv=8, d_ff=16, num_layers=1, num_heads=1, seed=seed)
    with torch.no_grad():
        t5.encoder.final_layer_norm.weight.zero_()
    return t5.requires_grad_(False)


@contextlib.contextmanager
def quiet_t5_truncation() -> Iterator[None]:
    """Silence SD3's per-call warning that captions were truncated to ``max_sequence_length``
    T5 tokens (expected here: the placeholder T5 reads :data:`T5_TOKENS` tokens only)."""
    sd3_logger = logging.getLogger("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3")
    level = sd3_logger.level
    sd3_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        sd3_logger.setLevel(level)


def _encode(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    with quiet_t5_truncation():
        pe, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
    return pe, pooled


def _trained_modules(pipe, frozen_text_encoders: bool = False) -> list[torch.nn.Module]:
    if frozen_text_encoders:
        return [pipe.transformer]
    return [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]


def sample(pipe, prompts: list[str], seed: int, steps: int = 10, guidance_scale: float = 4.0) -> torch.Tensor:
    """Noise-free samples through ``pipe(...)``: float ``[B, 3, 32, 32]`` in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    with quiet_t5_truncation():
        out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gen, output_type="pt", max_sequence_length=T5_TOKENS)
    return out.images.float().clamp(0, 1)


def quick_accuracy(pipe, specs: list[dict[str, Any]], seed: int, guidance_scale: float, steps: int = 10, batch: int = 64) -> dict[str, float]:
    """Verifier accuracy of noise-free samples for ``specs`` (overall and per tag)."""
    from flowalign.rewards.shapes import ShapesReward

    reward = ShapesReward()
    scores, tags = [], []
    for i in range(0, len(specs), batch):
        chunk = specs[i : i + batch]
        imgs = sample(pipe, [s["prompt"] for s in chunk], seed + i, steps, guidance_scale)
        scores.append(reward(imgs, [s["prompt"] for s in chunk], list(chunk)).scores)
        tags += [s["tag"] for s in chunk]
    s = torch.cat(scores)
    out = {"overall": float(s.mean())}
    for t in dict.fromkeys(tags):
        out[t] = float(s[[j for j, x in enumerate(tags) if x == t]].mean())
    return out


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, scale: int = 4) -> None:
    """Write ``[B, 3, H, W]`` images in [0, 1] as one PNG grid (nearest-neighbour upscaled)."""
    from PIL import Image

    b, _, h, w = images.shape
    rows = (b + nrow - 1) // nrow
    grid = torch.ones(3, rows * (h + 1), nrow * (w + 1))
    for k in range(b):
        r, c = divmod(k, nrow)
        grid[:, r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = images[k]
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(path)


def train_flow(pipe, means: torch.Tensor, stds: torch.Tensor, captions: list[str], cfg: ToyBuildConfig, gen: torch.Generator, eval_specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """SD3 rectified-flow training of the transformer and (unless ``cfg.frozen_text_encoders``)
    the text encoders; EMA weights are loaded into ``pipe`` at the end. Returns the periodic evaluation log."""
    shift_f, scale_f = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    modules = _trained_modules(pipe, cfg.frozen_text_encoders)
    for m in (pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(m in modules)  # frozen encoders build no autograd graph
    params = [p for m in modules for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, weight_decay=0.0, betas=(0.9, 0.99))
    warm = max(1, min(200, cfg.dit_steps // 10))
    lr_at = lambda k: min(1.0, (k + 1) / warm) * (1.0 if k < 0.7 * cfg.dit_steps else max(0.1, (cfg.dit_steps - k) / (0.3 * cfg.dit_steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    log: list[dict[str, Any]] = []
    bar = tqdm(range(cfg.dit_steps), desc="transformer", mininterval=10)
    for step in bar:
        for m in modules:
            m.train()
        idx = torch.randint(len(means), (cfg.dit_batch,), generator=gen)
        z = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)
        x0 = (z - shift_f) * scale_f  # [B, C, 16, 16] the pipeline's latent convention
        drop = torch.rand(cfg.dit_batch, generator=gen) < cfg.caption_dropout
        caps = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        pe, pooled = _encode(pipe, caps)
        t = torch.sigmoid(torch.randn(cfg.dit_batch, generator=gen))  # logit-normal(0, 1)
        eps = torch.randn(x0.shape, generator=gen)
        tt = t[:, None, None, None]
        xt = (1 - tt) * x0 + tt * eps
        v = pipe.transformer(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=pe, pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % max(cfg.eval_every, 1) == 0 or step + 1 == cfg.dit_steps:
            entry = {"step": step + 1, "loss": loss.item()}
            if eval_specs:
                live = [p.detach().clone() for p in params]
                _assign(params, ema)
                for m in modules:
                    m.eval()
                entry["heldout_accuracy"] = quick_accuracy(pipe, eval_specs, cfg.seed + 999, cfg.guidance_scale)
                if cfg.sample_dir:
                    imgs = sample(pipe, [s["prompt"] for s in eval_specs[:64]], cfg.seed + 7, 10, cfg.guidance_scale)
                    save_grid(imgs, Path(cfg.sample_dir) / f"samples_step{step + 1:05d}.png")
                    from safetensors.torch import save_file

                    save_file({f"{i}": e.contiguous() for i, e in enumerate(ema)}, str(Path(cfg.sample_dir) / f"ema_step{step + 1:05d}.safetensors"))
                _assign(params, live)
            logger.info("step %d: %s", step + 1, entry)
            log.append(entry)
    _assign(params, ema)
    for m in modules:
        m.eval()
    return log


def apply_toy_meta(pipeline, folder: str | Path) -> dict:
    """Adapter kwargs from a toy folder's ``flowalign_toy.json`` (``{}`` for other folders).

    The toy model is trained with ``max_sequence_length`` zero "T5" tokens (SD3's default 256
    would be slower and off-distribution); its recommended ``shift`` replaces the scheduler's
    when they differ, and SD3's per-call "input was truncated" warning is filtered (expected:
    the placeholder T5 reads that many tokens only).
    """
    meta = load_toy_meta(folder)
    if not meta:
        return {}
    shift = meta.get("shift")
    if shift is not None and float(pipeline.scheduler.config.get("shift", 1.0)) != float(shift):
        pipeline.scheduler = type(pipeline.scheduler).from_config({**pipeline.scheduler.config, "shift": float(shift)})
    sd3_logger = logging.getLogger("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3")
    if not any(isinstance(f, _T5TruncationFilter) for f in sd3_logger.filters):
        sd3_logger.addFilter(_T5TruncationFilter())
    return {"max_sequence_length": int(meta["max_sequence_length"])} if "max_sequence_length" in meta else {}


class _T5TruncationFilter(logging.Filter):
    """Drops SD3's "part of your input was truncated because `max_sequence_length`" records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_sequence_length" not in record.getMessage()


def load_toy_pipeline(folder: str | Path):
    """A toy folder as a ``StableDiffusion3Pipeline`` (float32, local files only)."""
    from diffusers import StableDiffusion3Pipeline

    from flowalign.train.model import resolve_path

    folder = resolve_path(folder)  # assets/toy: the packaged copy from any directory, as flowalign train does
    if not (Path(folder) / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is no diffusers pipeline folder (no model_index.json)")
    return StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)


@torch.no_grad()
def _assign(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for p, v in zip(params, values):
        p.copy_(v)


def build(out_dir: str | Path, cfg: Optional[ToyBuildConfig] = None) -> dict[str, Any]:
    """Train the toy model and save it with ``save_pretrained(safe_serialization=True)``.

    Returns a summary (times, parameter counts, losses, evaluation log).
    """
    from flowalign.rewards.shapes_scenes import (
        TAGS,
        all_specs,
        noisy_captions,
        parse_color_pairs,
        prompt_set,
        split_renditions,
        synonym_captions,
        training_scenes,
        uncaptioned_heldout,
        washed_renditions,
        watermarked_renditions,
    )

    cfg = cfg or ToyBuildConfig()
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.sample_dir:
        Path(cfg.sample_dir).mkdir(parents=True, exist_ok=True)

    # a continued build draws fresh scenes (seed + 1), not the ones its starting folder was trained on
    images_u8, specs = training_scenes(cfg.seed + (1 if cfg.init_from else 0), cfg.n_scenes, include_heldout=cfg.pretrain_heldout)
    images_u8, washed = washed_renditions(images_u8, cfg.washed_fraction, cfg.washed_alpha, cfg.seed + 5)
    images_u8, split = split_renditions(images_u8, cfg.split_fraction, cfg.split_width, cfg.seed + 7)
    images_u8, stamped = watermarked_renditions(images_u8, cfg.watermark_fraction, cfg.watermark_opacity, cfg.seed + 9)
    images = _to_unit(images_u8)
    captions, n_noisy = noisy_captions(specs, cfg.caption_noise, cfg.seed + 11)
    captions, n_synonyms = synonym_captions(captions, parse_color_pairs(cfg.color_synonyms), cfg.synonym_rate, cfg.seed + 13)
    if cfg.uncaptioned_heldout:  # ToyBuildConfig checked that pretrain_heldout is set
        captions = uncaptioned_heldout(specs, captions)
    max_length = caption_length(sorted({s["prompt"] for t in TAGS for s in all_specs(t)}))
    logger.info("%d scenes rendered (%.1fs); CLIP context length %d", len(images), time.time() - t_start, max_length)

    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, cfg.threads))
    summary: dict[str, Any] = {"config": asdict(cfg), "clip_max_length": max_length, "t5_tokens": T5_TOKENS, "noisy_captions": n_noisy, "synonym_captions": n_synonyms,
                               "washed_scenes": int(washed.sum()), "split_scenes": int(split.sum()),
                               "watermarked_scenes": int(stamped.sum())}
    shift, guidance = cfg.shift, cfg.guidance_scale
    if cfg.init_from:
        pipe = load_toy_pipeline(cfg.init_from)
        vae = pipe.vae  # its shift/scale factors stay: the transformer was trained in its latent units
        # the source's sampling settings carry over unless asked otherwise (the metadata must match the scheduler)
        from flowalign.train.model import resolve_path

        default, source = ToyBuildConfig(), load_toy_meta(resolve_path(cfg.init_from))
        shift = cfg.shift if cfg.shift != default.shift else float(pipe.scheduler.config.get("shift", cfg.shift))
        guidance = cfg.guidance_scale if cfg.guidance_scale != default.guidance_scale else float(source.get("guidance_scale", guidance))
        if float(pipe.scheduler.config.get("shift", shift)) != shift:
            pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, "shift": shift})
        means, stds = encode_latents(vae, images)
        summary["init_from"] = str(cfg.init_from)
    else:
        vae = build_vae(cfg)
        summary.update(train_vae(vae, images, cfg, gen))
        means, stds = encode_latents(vae, images)
        z = means + stds * torch.randn(means.shape, generator=gen)
        vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    summary["vae_seconds"] = time.time() - t0
    with torch.no_grad():
        rec = vae.decode(means[:64] / 1.0).sample
    summary["vae_recon_mae"] = float((rec.clamp(-1, 1) - images[:64]).abs().mean() / 2)
    if cfg.sample_dir:
        save_grid(torch.cat([images[:32], rec[:32].clamp(-1, 1)]) / 2 + 0.5, Path(cfg.sample_dir) / "vae_recon.png")
    logger.info("VAE done in %.0fs: %s", summary["vae_seconds"], {k: v for k, v in summary.items() if k.startswith("vae")})

    if not cfg.init_from:
        pipe = build_pipeline(cfg, vae, max_length)
    pipe.set_progress_bar_config(disable=True)
    eval_specs = prompt_set(True, per_tag=max(1, cfg.eval_samples // 5), seed=cfg.seed + 5) if cfg.eval_samples else []
    t0 = time.time()
    summary["eval_log"] = train_flow(pipe, means, stds, captions, cfg, gen, eval_specs)
    summary["flow_seconds"] = time.time() - t0
    torch.set_num_threads(threads)

    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    summary["built_with"] = build_environment(min(threads, cfg.threads))
    meta = {"max_sequence_length": T5_TOKENS, "guidance_scale": guidance, "shift": shift, "num_inference_steps": 10, "height": 32, "width": 32, "seed": cfg.seed,
            "built_with": summary["built_with"]}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    summary["params"] = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    summary["build_seconds"] = time.time() - t_start
    logger.info("saved %s in %.0fs", out_dir, summary["build_seconds"])
    return summary


def sample_sde(pipe, prompts: list[str], seed: int, steps: int, guidance_scale: float, noise_level: float, group_size: int) -> torch.Tensor:
    """Flow-SDE rollouts (the GRPO training sampler) through the SD3 adapter: each prompt is
    repeated ``group_size`` times from one shared initial noise, so all variation is the
    sampler's noise. Returns ``[len(prompts) * group_size, 3, 32, 32]`` in [0, 1]."""
    from flowalign import sde
    from flowalign.pipelines import load_adapter

    adapter = load_adapter(pipe, max_sequence_length=T5_TOKENS)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad(), quiet_t5_truncation():
        cond = adapter.encode(prompts).repeat_interleave(group_size)
        sigmas = adapter.sigmas(steps)
        x = adapter.initial_noise(len(prompts), gen).repeat_interleave(group_size, dim=0)
        for i in range(steps):
            v = adapter.velocity(x, float(sigmas[i]), cond, guidance_scale)
            x = sde.step("flow_sde", x, v, float(sigmas[i]), float(sigmas[i + 1]), noise_level, generator=gen).prev_sample
        return adapter.decode(x).float().clamp(0, 1)


def zero_variance_fraction(scores: torch.Tensor, group_size: int) -> float:
    """Fraction of groups (consecutive ``group_size`` scores) whose scores are all equal."""
    g = scores.view(-1, group_size)
    return float((g.max(dim=1).values == g.min(dim=1).values).float().mean())


def evaluate_toy(folder: str | Path, guidance_scales: tuple[float, ...] = (1.0, 2.0, 3.0, 4.5), shifts: tuple[float, ...] = (1.0, 1.5, 3.0),
                 n_samples: int = 640, steps: int = 10, seed: int = 0, group_size: int = 8, n_groups: int = 48,
                 noise_level: float = 0.7, grid_dir: Optional[str | Path] = None) -> dict[str, Any]:
    """Measure a toy folder: held-out/train accuracy per category (noise-free ``pipe(...)``),
    a guidance x shift sweep, batch-64 sampling time, and the fraction of GRPO groups with zero
    reward variance (different seeds; Flow-SDE from a shared noise)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowalign.rewards.shapes import ShapesReward
    from flowalign.rewards.shapes_scenes import load_prompts

    folder = Path(folder)
    pipe = load_toy_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    base_config = dict(pipe.scheduler.config)
    held, train = load_prompts("heldout"), load_prompts("train")
    held_n = [held[i % len(held)] for i in range(n_samples)]
    out: dict[str, Any] = {"folder": str(folder), "steps": steps, "seed": seed}
    sweep = {}
    for shift in shifts:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config({**base_config, "shift": shift})
        for g in guidance_scales:
            sweep[f"shift={shift},cfg={g}"] = quick_accuracy(pipe, held, seed, g, steps)["overall"]
            logger.info("held-out accuracy shift %s cfg %s: %.3f", shift, g, sweep[f"shift={shift},cfg={g}"])
    out["sweep_heldout_320"] = sweep
    best = max(sweep, key=sweep.get)
    shift, g = (float(kv.split("=")[1]) for kv in best.split(","))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config({**base_config, "shift": shift})
    out.update(shift=shift, guidance_scale=g)
    out["heldout_accuracy"] = quick_accuracy(pipe, held_n, seed + 1, g, steps)
    out["heldout_samples"] = len(held_n)
    out["train_accuracy"] = quick_accuracy(pipe, train, seed + 2, g, steps)
    prompts = [s["prompt"] for s in held[:64]]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        sample(pipe, prompts, seed, steps, g)
        times.append(time.perf_counter() - t0)
    out[f"sample_seconds_batch64_{steps}steps_cfg"] = min(times)
    reward = ShapesReward()
    rng = np.random.default_rng(seed)
    groups = [train[i] for i in rng.choice(len(train), n_groups, replace=False)]
    rep = [s for s in groups for _ in range(group_size)]
    seeds_imgs = torch.cat([sample(pipe, [s["prompt"]] * group_size, seed + 100 + k, steps, g) for k, s in enumerate(groups)])
    sde_imgs = sample_sde(pipe, [s["prompt"] for s in groups], seed + 200, steps, g, noise_level, group_size)
    for name, imgs in (("seeds_ode", seeds_imgs), (f"flow_sde_{noise_level}", sde_imgs)):
        r = reward(imgs, [s["prompt"] for s in rep], rep)
        out[f"zero_variance_groups_{name}"] = zero_variance_fraction(r.scores, group_size)
        out[f"zero_variance_groups_partial_{name}"] = zero_variance_fraction(r.details["partial"], group_size)
        out[f"mean_reward_{name}"] = float(r.scores.mean())
    out["group_size"], out["n_groups"] = group_size, n_groups
    if grid_dir:
        Path(grid_dir).mkdir(parents=True, exist_ok=True)
        imgs = sample(pipe, [s["prompt"] for s in held[::5]], seed + 3, steps, g)
        save_grid(imgs, Path(grid_dir) / "heldout_grid.png")
        r = reward(imgs, [s["prompt"] for s in held[::5]], held[::5])
        lines = [f"{k}: {s['prompt']} -> {int(r.scores[k])} {r.details['objects'][k]}" for k, s in enumerate(held[::5])]
        (Path(grid_dir) / "heldout_grid.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        save_grid(sde_imgs[:64], Path(grid_dir) / "sde_groups_grid.png")
    files = [f for f in folder.rglob("*") if f.is_file()]
    out["folder_bytes"] = sum(f.stat().st_size for f in files)
    out["file_bytes"] = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(files)}
    out["params"] = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")}
    return out


def build_environment(threads: int) -> dict[str, Any]:
    """What a build's weights depend on besides its seed and flags: the library versions, the torch ``threads`` it ran and the
    source commit (``None`` outside a git checkout). The same values rebuild the same bits; other torch versions
    round differently and train to other weights."""
    import platform
    import subprocess

    import diffusers
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "threads": threads, "commit": commit}


def load_toy_meta(folder: str | Path) -> dict[str, Any]:
    """The recommended sampling settings stored next to a toy pipeline (``flowalign_toy.json``), ``{}``
    for a folder without them (any other diffusers folder)."""
    meta_file = Path(folder) / META_FILE
    return json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}


BUILD_FLAG_HELP = {
    "seed": "seed of every draw: scenes, captions, initialisation, batches",
    "n_scenes": "procedurally drawn training scenes",
    "vae_steps": "VAE training steps",
    "dit_steps": "transformer (flow matching) training steps",
    "dit_batch": "transformer batch size",
    "dit_layers": "transformer blocks",
    "dit_heads": "attention heads per block",
    "threads": "torch threads (1 avoids oversubscribing a shared CPU; other counts round differently)",
    "eval_every": "log the loss and, with --eval-samples above 0, held-out accuracy every this many transformer steps",
    "eval_samples": "samples of each held-out evaluation (0: none)",
    "shift": "the flow-matching scheduler's timestep shift, stored as the toy's recommended setting",
    "guidance_scale": "the CFG scale stored as the toy's recommended setting",
    "dit_lr": "transformer learning rate",
    "caption_noise": "fraction of training captions with one attribute wrong (web alt-text-like noise)",
    "synonym_rate": "with --color-synonyms: probability that a paired colour is named by its partner",
    "washed_fraction": "fraction of training scenes washed out towards the background",
    "washed_alpha": "contrast a washed scene keeps (the verifier needs >= 0.5)",
    "split_fraction": "fraction of training scenes whose every object is cut in two",
    "split_width": "width in pixels of that background-coloured cut",
    "watermark_fraction": "fraction of training scenes stamped with diagonal stripes",
    "watermark_opacity": "the stamp's opacity",
}


def _int_pair(text: str) -> tuple[int, int]:
    """``"24,24"`` -> ``(24, 24)`` (argparse type for ``--clip-hidden``)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected two positive integers like 24,24, got {text!r}")
    return int(parts[0]), int(parts[1])


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m flowalign.pipelines.toy build | evaluate ...``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m flowalign.pipelines.toy", description=(__doc__ or "").split("\n\n")[0])  # python -OO drops docstrings
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the toy model and save it as a diffusers folder")
    d = ToyBuildConfig()
    b.add_argument("--out", default="assets/toy")
    b.add_argument("--summary", default=None, help="write the build summary JSON here")
    for name in ("seed", "n_scenes", "vae_steps", "dit_steps", "dit_batch", "dit_layers", "dit_heads", "threads", "eval_every", "eval_samples"):
        b.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name), help=f"{BUILD_FLAG_HELP[name]} (default: %(default)s)")
    for name in ("shift", "guidance_scale", "dit_lr", "caption_noise", "synonym_rate", "washed_fraction", "washed_alpha",
                 "split_fraction", "split_width", "watermark_fraction", "watermark_opacity"):
        b.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name), help=f"{BUILD_FLAG_HELP[name]} (default: %(default)s)")
    b.add_argument("--clip-hidden", default=",".join(map(str, d.clip_hidden)), type=_int_pair,
                   help="hidden sizes of the two CLIP text encoders, e.g. 24,24 (the shipped toy: 16,16)")
    b.add_argument("--color-synonyms", default=d.color_synonyms,
                   help='colour pairs the captions name interchangeably, e.g. "blue:cyan,red:purple" (with --synonym-rate)')
    b.add_argument("--pretrain-heldout", action="store_true", help="pretrain on every caption, held-out combinations included")
    b.add_argument("--uncaptioned-heldout", action="store_true",
                   help="with --pretrain-heldout: draw the held-out scenes but caption them with the empty (unconditional) caption")
    b.add_argument("--frozen-text-encoders", action="store_true",
                   help="keep both CLIP text encoders at their seeded random init: only the transformer learns to read them")
    b.add_argument("--init-from", default=None,
                   help="continue pretraining this toy folder (its VAE and architecture) on --n-scenes fresh scenes for --dit-steps steps")
    b.add_argument("--sample-dir", default=None, help="write sample grids and EMA checkpoints here")
    e = sub.add_parser("evaluate", help="measure a toy folder (accuracy, sweep, timing, group variance)")
    e.add_argument("--model", default="assets/toy")
    e.add_argument("--out", default=None, help="write the results JSON here")
    e.add_argument("--samples", type=int, default=640)
    e.add_argument("--grid-dir", default=None)
    e.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    e.add_argument("--build-summary", default=None, help="merge this build summary JSON (build time, losses) into the results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    if args.command == "evaluate":
        torch.set_num_threads(args.threads)
        result = evaluate_toy(args.model, n_samples=args.samples, grid_dir=args.grid_dir)
        if args.build_summary:
            result["build"] = json.loads(Path(args.build_summary).read_text(encoding="utf-8"))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(json.dumps({k: v for k, v in result.items() if k != "file_bytes"}, indent=2))
        return 0
    fields = {k: v for k, v in vars(args).items() if k in ToyBuildConfig.__dataclass_fields__}
    summary = build(args.out, ToyBuildConfig(**fields))
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
