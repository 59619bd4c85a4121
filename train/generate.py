"""``flowalign generate``: one generation pass into a rollout store (flowalign.offline).

    flowalign generate --config train/configs/toy_generate.yaml [--set samples_per_prompt=8]

Draws ``samples_per_prompt`` samples for every prompt with the configured sampler (any kernel:
ODE by default, since offline objectives do not need stochastic steps), scores them with every
configured reward and writes shards + manifest. Rerunning the same command after a crash
finishes the store without redrawing finished shards. The store then feeds
``flowalign offline`` (train/offline_trainer.py: GDRO / Diffusion-DPO) any number of times.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from flowalign import sde
from flowalign.config import KERNELS, MODEL_MEMORY_KNOBS, ModelConfig, RewardConfig, apply_overrides, build_dataclass, check_kernel, to_dict
from flowalign.errors import ConfigError
from flowalign.offline import SampleFn, ScoreFn, fill_store

logger = logging.getLogger(__name__)

__all__ = ["GenerateConfig", "load_generate_config", "read_yaml_mapping", "run_generate", "adapter_sample_fn", "reward_score_fn", "model_fingerprint", "load_model_adapter"]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class GenerateConfig:
    """One generation pass into a rollout store."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(pretrained="toy"), metadata={"help": "The pipeline to sample."})
    lora: Optional[str] = field(default=None, metadata={"help": "LoRA weights (pytorch_lora_weights.safetensors or its folder) loaded before sampling; null = base model."})
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig(name="shapes")], metadata={"help": "Rewards to score every sample with; all are stored (a verifier's details['partial'] too, as '<name>/partial'), plus 'total' (the weighted sum) when there are several or one's weight is not 1."})
    prompts: str = field(default="assets/prompts/shapes_train.jsonl", metadata={"help": "Prompt file (.txt or .jsonl)."})
    num_prompts: Optional[int] = field(default=None, metadata={"help": "Use only the first N prompts; null = all."})
    samples_per_prompt: int = field(default=6, metadata={"help": "Samples per prompt (G); GDRO groups use k <= G of them."})
    num_steps: int = field(default=20, metadata={"help": "Denoising steps."})
    guidance_scale: float = field(default=4.5, metadata={"help": "CFG scale (1 = off)."})
    kernel: str = field(default="ode", metadata={"help": f"Transition kernel, one of {KERNELS}, or a kernel of your own (entry point of group flowalign.kernels, dotted path pkg.module:fn)."})
    noise_level: float = field(default=0.0, metadata={"help": "Noise level of a stochastic kernel (ignored by ode)."})
    seed: int = field(default=0, metadata={"help": "Base seed; sample j of prompt i uses seed + i * G + j."})
    batch_size: int = field(default=16, metadata={"help": "Samples per transformer call."})
    prompts_per_shard: int = field(default=8, metadata={"help": "Prompts (whole groups) per shard: the unit of atomic writes and of resume."})
    image_format: str = field(default="none", metadata={"help": "Also keep images: 'none', 'png' (files per shard) or 'tensor' (uint8 in the shard)."})
    output_dir: str = field(default="runs/rollouts_toy", metadata={"help": "The store folder."})
    device: str = field(default="cpu", metadata={"help": "Device for the pipeline and rewards."})
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar over the samples."})

    def __post_init__(self):
        _check(self.samples_per_prompt >= 2, f"samples_per_prompt must be >= 2 (groups need two samples), got {self.samples_per_prompt}")
        _check(self.num_steps >= 1, f"num_steps must be >= 1, got {self.num_steps}")
        _check(self.guidance_scale >= 1.0, f"guidance_scale must be >= 1, got {self.guidance_scale}")
        check_kernel("kernel", self.kernel)
        _check(self.noise_level >= 0, f"noise_level must be >= 0, got {self.noise_level}")  # NaN fails too
        bound = sde.max_level(self.kernel)
        if bound is not None and not self.noise_level <= bound:
            what = " (a fraction of a right angle)" if self.kernel == "cps" else ""
            raise ConfigError(f"kernel {self.kernel!r} takes noise_level in [0, {bound:g}]{what}, got {self.noise_level}")
        _check(self.batch_size >= 1 and self.prompts_per_shard >= 1, f"batch_size and prompts_per_shard must be >= 1, got {self.batch_size}, {self.prompts_per_shard}")
        _check(self.num_prompts is None or self.num_prompts >= 1, f"num_prompts must be null or >= 1, got {self.num_prompts}")
        _check(self.image_format in ("none", "png", "tensor"), f"image_format={self.image_format!r} is not one of ['none', 'png', 'tensor']")
        names = [r.key for r in self.rewards]
        _check(len(names) >= 1 and len(set(names)) == len(names), f"rewards must list distinct names, got {names} (a label, "
                                                                  "rewards[].label, lets one reward appear twice)")
        _check("total" not in names, "a reward keyed 'total' (its label, else its name) would be shadowed by the store's weighted "
                                     "total: give that entry another label")


def read_yaml_mapping(path: Union[str, Path], what: str) -> dict[str, Any]:
    """The top-level mapping of the YAML file ``path`` (:func:`flowalign.config.read_recipe`: a shipped recipe's
    name works, and ``base:`` chains); :class:`ConfigError` (one line) if missing or invalid."""
    from flowalign.config import read_recipe

    return read_recipe(path, what)


def load_generate_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> GenerateConfig:
    """Read a generation YAML (keys of :class:`GenerateConfig`) with ``key=value`` overrides.

    Raises:
        ConfigError: missing or invalid file, unknown key, wrong type or bad value (one line).
    """
    data = read_yaml_mapping(path, "generate") if path is not None else {}
    data = apply_overrides(data, list(overrides or []), schema=GenerateConfig)
    return build_dataclass(GenerateConfig, data)


def load_model_adapter(model: ModelConfig, lora: Optional[str] = None, device: str = "cpu"):
    """Adapter for ``model.pretrained`` (``'tiny-sd3'``, ``'toy'`` or a local folder), LoRA loaded."""
    from flowalign.train.model import build_adapter

    adapter = build_adapter(model, torch.device(device))
    if lora is not None:
        from flowalign.lora import load_lora_into_pipeline

        load_lora_into_pipeline(adapter.pipeline, lora)
    return adapter


def model_fingerprint(module: torch.nn.Module, lora: Optional[str] = None) -> str:
    """sha256 of the module's parameter names, shapes and bytes, plus the LoRA file's bytes."""
    from flowalign.checkpoint import update_with_tensors

    digest = hashlib.sha256()
    update_with_tensors(digest, sorted(module.state_dict().items()))
    if lora is not None:
        path = Path(lora)
        path = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
        digest.update(path.read_bytes())
    return digest.hexdigest()


def adapter_sample_fn(
    adapter, num_steps: int, guidance_scale: float = 1.0, kernel: str = "ode", noise_level: float = 0.0, batch_size: int = 16
) -> SampleFn:
    """``(prompts, seeds) -> (latents, images)`` through ``adapter`` with per-sample generators.

    Every random draw of sample ``i`` (its initial noise, then one noise per stochastic step)
    comes from ``torch.Generator().manual_seed(seeds[i])``, so a sample is the same whatever batch
    it is drawn in: that is what makes a resumed store identical to an uninterrupted one. The
    step itself is ``flowalign.sde.step`` (with ``kernel="ode"`` exactly the pipeline's Euler step).
    """
    sigmas = adapter.sigmas(num_steps)  # [K+1]

    @torch.no_grad()
    def sample(prompts: list[str], seeds: list[int]) -> tuple[Tensor, Tensor]:
        latents, images = [], []
        for start in range(0, len(prompts), batch_size):
            texts, chunk = prompts[start : start + batch_size], seeds[start : start + batch_size]
            gens = [torch.Generator().manual_seed(int(s)) for s in chunk]
            x = torch.cat([adapter.initial_noise(1, generator=g) for g in gens])  # [B, *latent]
            cond = adapter.encode(texts, do_classifier_free_guidance=guidance_scale > 1.0)
            for k in range(num_steps):
                s, s_next = float(sigmas[k]), float(sigmas[k + 1])
                v = adapter.velocity(x, torch.full((x.shape[0],), s, device=x.device), cond, guidance_scale)
                noise = None
                if kernel != "ode":
                    noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device)
                x = sde.step(kernel, x, v, s, s_next, noise_level, noise=noise).prev_sample
            latents.append(x.float().cpu())
            images.append(adapter.decode(x).cpu())
        return torch.cat(latents), torch.cat(images)

    return sample


def reward_score_fn(rewards: list[RewardConfig], device: str = "cpu", records: Optional[Sequence[Any]] = None) -> ScoreFn:
    """``(images, prompts, metadata) -> {name: scores}`` for every reward (its label when set), + the weighted ``"total"`` (what
    offline runs train on by default) when there are several or the one reward's weight is not 1 (a
    negative weight, a penalty, must reverse the ranking as it does online).

    A reward that reports a per-sample ``details["partial"]`` (the shapes verifier's fraction of
    constraints met) also gets ``"<name>/partial"``: a denser ranking signal for GDRO groups whose
    binary scores tie (select it with the offline recipe's ``reward:``). ``records`` (the prompts to be scored) are
    checked by each reward with ``on_error: raise``'s ``check_prompts`` here, before any model samples them (under
    ``drop`` such samples are meant to be dropped, as in training).
    """
    from flowalign.rewards import call_reward_batched, load_reward
    from flowalign.rewards.base import check_reward_prompts
    from flowalign.train.runtime import to_device

    # on the device the images are scored on (a reward model left on the CPU got CUDA images); plain callables have no .to
    loaded = [(cfg, to_device(load_reward(cfg.name, **cfg.kwargs), device)) for cfg in rewards]
    for cfg, reward in loaded if records else ():
        if cfg.on_error == "raise":  # under drop such samples are meant to be dropped, as in training
            check_reward_prompts(reward, records, name=cfg.key)

    def score(images: Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, Tensor]:
        out = {}
        for cfg, reward in loaded:
            with torch.no_grad():  # scores only: a reward model with trainable parameters would record its graph
                checked = call_reward_batched(reward, images.to(device), prompts, metadata, on_error=cfg.on_error,
                                              batch_size=cfg.batch_size)
            out[cfg.key] = checked.scores.float().cpu()
            partial = checked.details.get("partial")
            if isinstance(partial, Tensor) and partial.shape == checked.scores.shape:
                out[f"{cfg.key}/partial"] = partial.float().cpu()  # verifiers: fraction of constraints met
        if len(loaded) > 1 or loaded[0][0].weight != 1.0:
            out["total"] = sum(cfg.weight * out[cfg.key] for cfg, _ in loaded)
        return out

    return score


# what a rollout store writes at its root (flowalign.offline): a folder holding anything else is not one to fill
STORE_ENTRIES = frozenset({"store.json", "manifest.jsonl", "shards", "images"})


def refuse_foreign_store_dir(folder: Path) -> None:
    """ConfigError when ``folder`` holds entries a rollout store does not write (a training run, a user's files): the
    store's files would be mixed into them. An empty or missing folder starts a store; a store's own is finished."""
    from flowalign.train.run_dir import refuse_foreign

    refuse_foreign(folder, STORE_ENTRIES, key="output_dir", what="a rollout store")


def run_generate(cfg: GenerateConfig, sample_fn: Optional[SampleFn] = None, score_fn: Optional[ScoreFn] = None) -> Path:
    """Fill (or finish) the rollout store ``cfg.output_dir``; returns its path.

    ``sample_fn`` / ``score_fn`` replace the configured model / rewards (tests, custom samplers). The folder is
    locked while it fills (``train/run_lock.py``): a second run on it stops at once, naming the first one's pid.
    """
    from flowalign.errors import ConfigError

    from flowalign.files import refuse_dangling_link

    refuse_dangling_link(cfg.output_dir, "output_dir")
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise ConfigError(f"output_dir {cfg.output_dir} is a file, not a folder for the rollout store")
    refuse_foreign_store_dir(Path(cfg.output_dir))
    from flowalign.train.run_lock import lock_run_dir

    # one writer per store: two generate runs on one folder would list shards twice in its manifest for good
    lock = lock_run_dir(Path(cfg.output_dir))
    try:
        out = _fill_locked(cfg, sample_fn, score_fn)
    except BaseException:
        if lock is not None:
            lock.release(remove_if_unused=True)  # bad input writes nothing, not even the folder
        raise
    if lock is not None:
        lock.release()
    return out


def _fill_locked(cfg: GenerateConfig, sample_fn: Optional[SampleFn], score_fn: Optional[ScoreFn]) -> Path:
    """:func:`run_generate`'s work, under the store folder's lock."""
    from flowalign.prompts import load_prompts
    from flowalign.train.model import resolve_path
    from flowalign.train.runtime import check_device

    records = load_prompts(resolve_path(cfg.prompts))  # assets/... falls back to the packaged copy, as train and eval do
    if cfg.num_prompts is not None:
        if cfg.num_prompts > len(records):
            logger.warning("num_prompts=%d, but %s holds %d prompts: generating for those %d", cfg.num_prompts, cfg.prompts,
                           len(records), len(records))
        records = records[: cfg.num_prompts]
    prompts = [{"prompt": r.prompt, **r.metadata} for r in records]
    sampler = {"num_steps": cfg.num_steps, "guidance_scale": cfg.guidance_scale, "kernel": cfg.kernel, "noise_level": cfg.noise_level}
    if sample_fn is None or score_fn is None:
        check_device(cfg.device, "device")
    if sample_fn is None and cfg.lora is not None:
        from flowalign.lora import read_lora_file

        read_lora_file(cfg.lora)  # missing or unreadable: before the rewards and the model load
    if score_fn is None:  # the rewards load and check the prompts before the model does
        score_fn = reward_score_fn(cfg.rewards, cfg.device, records=records)
    model_hash = "custom-sample-fn"
    if sample_fn is None:
        adapter = load_model_adapter(cfg.model, cfg.lora, cfg.device)
        model_hash = model_fingerprint(adapter.trainable_module, cfg.lora)
        sample_fn = adapter_sample_fn(adapter, cfg.num_steps, cfg.guidance_scale, cfg.kernel, cfg.noise_level, cfg.batch_size)
    settings = {
        "model": {k: v for k, v in to_dict(cfg.model).items() if k not in MODEL_MEMORY_KNOBS}, "lora": cfg.lora, "model_hash": model_hash, "sampler": sampler,
        # an unset label is left out, so a store begun before labels existed is finished by the same settings
        # batch_size is how many samples a call scores, not what it scores: a store finished with another is the same store
        "rewards": [{k: v for k, v in to_dict(r).items() if not (k == "label" and v is None) and k != "batch_size"}
                    for r in cfg.rewards],
        "prompts_file": str(cfg.prompts),
    }
    store = fill_store(
        cfg.output_dir, prompts, cfg.samples_per_prompt, sample_fn, score_fn, settings=settings, base_seed=cfg.seed,
        prompts_per_shard=cfg.prompts_per_shard, image_format=cfg.image_format,
        extra={"sampler": sampler, "model_hash": model_hash}, progress=cfg.progress,
    )
    logger.info("rollout store %s: %d samples, rewards %s", cfg.output_dir, len(store), store.reward_names)
    return Path(cfg.output_dir)
