"""Typed run configuration (DESIGN.md §9): YAML recipe -> dataclasses, checked on load.

A recipe is a flat-ish YAML file with one section per dataclass below::

    model:     {pretrained: tiny-sd3, dtype: float32}
    sampling:  {num_steps: 10, group_size: 4, kernel: flow_sde, ...}
    rewards:   [{name: brightness, weight: 1.0}]
    lora:      {rank: 8, alpha: 16}
    objective: {name: grpo, clip_range: 1.0e-4, kl_beta: 0.04}
    train:     {prompts: ..., iterations: 100, lr: 3.0e-4, ...}

``load_config(path, overrides=["train.lr=1e-4"])`` builds a :class:`FlowalignConfig`. Every
field carries ``metadata={"help": ...}``; each class checks its values in ``__post_init__``. An
unknown key (with a did-you-mean), a value of the wrong type, an out-of-range value or a missing
file raise :class:`flowalign.errors.ConfigError` with one line naming the key and the value.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import logging

import yaml

from flowalign.errors import ConfigError
from flowalign.lr_schedule import LR_SCHEDULES

logger = logging.getLogger(__name__)

try:  # the `dense:` section is owned by flowalign/step_rewards.py (DenseGRPO / TP-GRPO settings)
    from flowalign.step_rewards import DenseConfig
except ImportError:  # pragma: no cover - only while step_rewards.py is not in the tree
    DenseConfig = dict  # type: ignore[misc,assignment]


KERNELS = ("ode", "flow_sde", "dance_sde", "cps")
MAX_STEPS = 1000  # denoising steps per sample: far beyond any flow-matching recipe (the schedules allocate per step)
MAX_SAMPLING_ROUNDS = 64  # train.max_sampling_rounds: DAPO caps its generation batches the same way (max_num_gen_batches)
LOG_PROB_FORMS = ("gaussian", "squared_error")  # flowalign.sde.LOG_PROB_FORMS (config does not import torch)
# top-level keys of the other commands' recipes: a training recipe error names the command the file is for
OTHER_COMMANDS_KEYS = {
    **{key: "`flowalign offline`" for key in ("store", "objective_kwargs", "groups_per_batch", "epochs", "k", "max_steps", "reward", "lr")},
    **{key: "`flowalign generate`" for key in ("prompts", "num_prompts", "samples_per_prompt", "prompts_per_shard", "kernel", "noise_level",
                                               "num_steps", "image_format")},
    **{key: "`flowalign generate` or `flowalign offline`" for key in ("output_dir", "guidance_scale", "seed", "device")},
}  # (tests/test_config.py checks these against GenerateConfig / OfflineConfig)
DRIFT_MODES = ("normalized", "tilted")  # flowalign.sde.DRIFT_MODES
DRIFT_GRADIENTS = ("auto", "autograd", "spsa")  # flowalign.guidance.GRADIENT_METHODS
DTYPES = ("float32", "bfloat16", "float16")
LOG_BACKENDS = ("tensorboard", "wandb", "csv")
EMA_SCHEDULES = ("constant", "power", "warmup")  # flowalign.lora: LoraEMA, power_ema_decay, warmup_ema_decay


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _choice(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"{name}={value!r} is not one of {list(choices)}")


def check_kernel(name: str, value: Any) -> None:
    """ConfigError unless ``value`` is a built-in transition kernel or one of the user's (entry point of group
    ``flowalign.kernels``, dotted path) that imports."""
    from flowalign.sde import kernel_plugin

    from flowalign.sde import KERNEL_ENTRY_POINT_GROUP

    _check(isinstance(value, str), f"{name} must be a kernel name, got {value!r}")
    try:
        kernel_plugin(value)
    except ConfigError as exc:
        if ":" in value or "." in value or not str(exc).startswith(f"kind={value!r} is not"):  # a path, or a plugin that failed
            raise ConfigError(f"{name}: {exc}") from None
        raise ConfigError(f"{name}={value!r} is not one of {list(KERNELS)} (nor an entry point of group {KERNEL_ENTRY_POINT_GROUP!r}; "
                          "a kernel of your own may also be a dotted path 'pkg.module:fn')") from None


@dataclass
class ModelConfig:
    """Which pipeline to align."""

    pretrained: str = field(
        default="tiny-sd3",
        metadata={"help": "A local diffusers pipeline folder, a hub id (owner/name: loaded from the hub cache, downloaded when the hub is reachable), or a builtin: 'tiny-sd3' (random tiny SD3 for tests) or 'toy' (assets/toy)."},
    )
    dtype: str = field(default="float32", metadata={"help": f"Weights dtype of the frozen pipeline, one of {DTYPES}. LoRA weights stay fp32."})
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision of `pretrained` (ignored for folders and builtins)."})
    variant: Optional[str] = field(default=None, metadata={"help": "diffusers weight-file variant of `pretrained` (e.g. 'fp16': files named *.fp16.safetensors), for a folder or hub id that ships only such files; null = the plain files. Ignored for builtins."})
    resolution: Optional[int] = field(default=None, metadata={"help": "Square image side in pixels for rollouts; null = the pipeline's default."})
    adapter: Optional[str] = field(
        default=None,
        metadata={"help": "The adapter (flowalign.pipelines): a registered family ('sd3'), an entry point of group "
                          "'flowalign.adapters' or a dotted path 'package.module:Class'; null = chosen by the pipeline's class."},
    )
    adapter_kwargs: dict = field(
        default_factory=dict,
        metadata={"help": "Extra keyword arguments of the adapter (e.g. a video family's frame count). The SD3 adapter's "
                          "settings below go only to adapters that take them."},
    )
    t5_cache_size: int = field(
        default=64,
        metadata={"help": "Prompts whose frozen T5 features the adapter keeps in memory (0 = off): the update's re-encoding "
                          "with gradient (lora.train_text_encoder) then runs only the CLIP encoders. SD3.5: 2 MiB per prompt in bf16."},
    )

    def __post_init__(self):
        _check(bool(self.pretrained), "model.pretrained must be a path, hub id or builtin name, got ''")
        _check(self.resolution is None or self.resolution >= 8, f"model.resolution must be null or >= 8, got {self.resolution}")
        _check(self.t5_cache_size >= 0, f"model.t5_cache_size must be >= 0, got {self.t5_cache_size}")
        _check(self.variant is None or (isinstance(self.variant, str) and bool(self.variant.strip()) and "/" not in self.variant),
               f"model.variant must be null or a variant name such as 'fp16', got {self.variant!r}")
        _choice("model.dtype", self.dtype, DTYPES)


@dataclass
class SamplingConfig:
    """How rollouts are drawn (flowalign.sampling.rollout)."""

    num_steps: int = field(default=10, metadata={"help": "Denoising steps per training rollout (K)."})
    eval_num_steps: int = field(default=40, metadata={"help": "Denoising steps for evaluation samples (ODE)."})
    guidance_scale: float = field(default=4.5, metadata={"help": "Classifier-free guidance scale while sampling (1 = off)."})
    kernel: str = field(default="flow_sde", metadata={"help": f"Transition kernel, one of {KERNELS} (flowalign.sde.step), or a kernel of your own: an entry point of group flowalign.kernels or a dotted path pkg.module:fn, a function (x, v, s, s_next, level) -> (mean, std)."})
    rollout: str = field(default="default", metadata={"help": "What rolls a batch out: default (flowalign.sampling.rollout), or a rollout of your own (a tree / branch sampler: an entry point of group flowalign.rollouts or a dotted path pkg.module:fn with flowalign.sampling.rollout's signature)."})
    rollout_kwargs: dict = field(default_factory=dict, metadata={"help": "Extra keyword arguments of a rollout of your own (its branching steps and widths, say); none for the default."})
    noise_schedule: str = field(default="constant", metadata={"help": "Noise-level schedule for flowalign.sde.make_schedule: constant, window, table, or a schedule of your own (an entry point of group flowalign.noise_schedules, or a dotted path pkg.module:Class built with noise_kwargs, with levels(num_steps, iteration, generator))."})
    noise_kwargs: dict = field(default_factory=lambda: {"a": 0.7}, metadata={"help": "Keyword arguments of the noise schedule, e.g. {a: 0.7}."})
    group_size: int = field(default=4, metadata={"help": "Samples drawn per prompt (G); advantages are normalised within a group."})
    share_initial_noise: bool = field(default=False, metadata={"help": "All samples of a group start from the same x_T."})
    log_prob_reduce: str = field(default="mean", metadata={"help": "Reduce the per-dimension log-density by 'mean' or 'sum'. 'sum' multiplies the float rounding of a recomputed log-prob by the latent size (2.4e-4 on a 1,024-dim latent when the update's micro-batches differ from the rollout's), beyond Flow-GRPO's clip_range 1e-4; at real latent sizes (65k dims for SD3.5 at 512 px, 2M for Wan) an fp32 sum cannot resolve a log-ratio at all (errors of 1e-3 to 0.5 measured), so use 'mean' there."})
    log_prob_form: str = field(default="gaussian", metadata={"help": "What the recorded and recomputed log-probs measure: 'gaussian' "
                                 "(the transition's log-density) or 'squared_error' (-(x' - mean)², the CPS reference code's surrogate, used "
                                 "by Flow-CPS and TP-GRPO: its ratio stays near 1 on CPS's low-noise steps; flowalign.sde.log_prob)."})
    micro_batch_size: Optional[int] = field(default=None, metadata={"help": "Rows per transformer/VAE call while sampling (memory only; results unchanged); null = all."})
    noise_seeding: str = field(
        default="process",
        metadata={"help": "Rollout noise streams: 'process' (one stream per process, one batched rollout per process) or 'group' "
                          "(each group's noise seeded by (seed, iteration, group index): the same samples on any number of "
                          "processes; one rollout call per group)."},
    )
    drift_reward: Optional[str] = field(
        default=None,
        metadata={"help": "Process reward that steers the stochastic steps (Euphonium's guided drift, flowalign.guidance): a "
                          "registered name, entry point or dotted path, scored on each step's decoded x0-prediction; null = off. "
                          "Log-probs keep the unguided mean, so the policy learns the guided steps."},
    )
    drift_reward_kwargs: dict = field(default_factory=dict, metadata={"help": "Keyword arguments of the drift reward's constructor."})
    drift_scale: float = field(default=1.0, metadata={"help": "Guided drift scale (flowalign.sde.reward_drift): noise stds per element ('normalized') or 1/beta ('tilted')."})
    drift_mode: str = field(default="normalized", metadata={"help": f"Guided drift form, one of {DRIFT_MODES}: scale*std*g/rms(g), or the tilted kernel's scale*std^2*g."})
    drift_gradient: str = field(default="auto", metadata={"help": f"How the drift reward is differentiated, one of {DRIFT_GRADIENTS}: autograd through the VAE decoder, SPSA (any reward), or auto (autograd when the reward is differentiable)."})
    drift_spsa_sigma: float = field(default=0.1, metadata={"help": "SPSA perturbation scale in latent units (drift_gradient: spsa)."})
    drift_spsa_pairs: int = field(default=1, metadata={"help": "SPSA antithetic pairs per sample and step (each costs a decode and a reward call of 2B rows)."})

    def __post_init__(self):
        _check(1 <= self.num_steps <= MAX_STEPS, f"sampling.num_steps must be in [1, {MAX_STEPS}], got {self.num_steps}")
        _check(self.eval_num_steps <= MAX_STEPS, f"sampling.eval_num_steps must be <= {MAX_STEPS}, got {self.eval_num_steps}")
        _check(self.eval_num_steps >= 1, f"sampling.eval_num_steps must be >= 1, got {self.eval_num_steps}")
        _check(self.guidance_scale >= 1.0, f"sampling.guidance_scale must be >= 1 (1 = no CFG), got {self.guidance_scale}")
        check_kernel("sampling.kernel", self.kernel)
        _check(self.group_size >= 2, f"sampling.group_size must be >= 2 for group-normalised advantages, got {self.group_size}")
        _choice("sampling.log_prob_reduce", self.log_prob_reduce, ("mean", "sum"))
        _choice("sampling.log_prob_form", self.log_prob_form, LOG_PROB_FORMS)
        _check(self.micro_batch_size is None or self.micro_batch_size >= 1, f"sampling.micro_batch_size must be null or >= 1, got {self.micro_batch_size}")
        _choice("sampling.noise_seeding", self.noise_seeding, ("process", "group"))
        _choice("sampling.drift_mode", self.drift_mode, DRIFT_MODES)
        _choice("sampling.drift_gradient", self.drift_gradient, DRIFT_GRADIENTS)
        _check(self.drift_scale >= 0, f"sampling.drift_scale must be >= 0, got {self.drift_scale}")
        _check(self.drift_spsa_sigma > 0, f"sampling.drift_spsa_sigma must be > 0, got {self.drift_spsa_sigma}")
        _check(self.drift_spsa_pairs >= 1, f"sampling.drift_spsa_pairs must be >= 1, got {self.drift_spsa_pairs}")
        _check(self.drift_reward is None or self.kernel != "ode",
               "sampling.drift_reward steers stochastic steps only, and sampling.kernel is 'ode': choose an SDE kernel or drop drift_reward")
        self._check_noise_schedule()
        self._check_rollout()

    def noise_at(self, iteration: int = 0, seed: int = 0):
        """``(levels [K], stochastic [K] bool)`` at ``iteration``: the schedule's noise levels (a random window drawn with
        ``torch.Generator().manual_seed(seed)``), and which steps the kernel makes stochastic under them. Sigmas fall
        linearly from 1 to 0 here (the model's shifted sigmas differ, but are positive, and reach 0, where the real ones
        do), which is what stochasticity depends on."""
        import torch

        from flowalign.sde import is_stochastic, make_schedule

        schedule = make_schedule(self.noise_schedule, **self.noise_kwargs)
        levels = torch.as_tensor(schedule.levels(self.num_steps, iteration, torch.Generator().manual_seed(seed)), dtype=torch.float32)
        sigmas = torch.linspace(1.0, 0.0, self.num_steps + 1)
        return levels, is_stochastic(self.kernel, sigmas[:-1], sigmas[1:], levels)

    def _check_rollout(self) -> None:
        """The rollout function imports, and ``rollout_kwargs`` are keywords it can take beside the engine's own."""
        from flowalign.sampling import _ROLLOUT_PARAMETERS, check_rollout_signature, resolve_rollout

        try:
            fn = resolve_rollout(self.rollout)
        except ConfigError as exc:
            raise ConfigError(f"sampling.rollout: {exc}") from None
        if not isinstance(self.rollout_kwargs, dict):
            return  # the type check names it
        _check(self.rollout == "default" or not set(self.rollout_kwargs) & set(_ROLLOUT_PARAMETERS),
               f"sampling.rollout_kwargs {sorted(set(self.rollout_kwargs) & set(_ROLLOUT_PARAMETERS))} are the engine's own arguments, "
               "which the recipe's sampling section sets; give them there")
        _check(self.rollout != "default" or not self.rollout_kwargs,
               f"sampling.rollout_kwargs={self.rollout_kwargs} is for a rollout of your own; the default rollout takes none")
        if self.rollout != "default":
            explicit = [key for key, on in (("drift", self.drift_reward is not None), ("share_initial_noise", self.share_initial_noise)) if on]
            try:
                check_rollout_signature(fn, self.rollout, self.rollout_kwargs, explicit)
                if callable(getattr(fn, "validate", None)):  # the rollout's own checks of its kwargs against these settings
                    fn.validate(self)
            except ConfigError as exc:
                raise ConfigError(f"sampling.rollout: {exc}") from None

    def _check_noise_schedule(self) -> None:
        """Build the noise schedule and its levels for ``num_steps`` now: a bad window (past the last
        step, an unknown mode, a NaN level) is a config error before anything runs, not a crash mid-run."""
        import torch

        from flowalign.sde import make_schedule, max_level

        if not isinstance(self.noise_kwargs, dict):
            return  # the type check names it
        try:
            levels = make_schedule(self.noise_schedule, **self.noise_kwargs).levels(self.num_steps, 0, torch.Generator().manual_seed(0))
            levels = torch.as_tensor(levels, dtype=torch.float64)
            if levels.shape != (self.num_steps,) or not bool(torch.isfinite(levels).all()) or bool((levels < 0).any()):
                raise ValueError(f"levels(num_steps={self.num_steps}) must be {self.num_steps} finite numbers >= 0, got "
                                 f"{levels.tolist() if levels.numel() <= 16 else tuple(levels.shape)}")
            bound = max_level(self.kernel)
            if bound is not None and bool((levels > bound).any()):  # the kernel's own check fires only at the first step
                what = " (a fraction of a right angle)" if self.kernel == "cps" else ""
                raise ValueError(f"kernel {self.kernel!r} takes noise levels in [0, {bound:g}]{what}, got up to "
                                 f"{float(levels.max()):g}")
        except ConfigError as exc:
            raise ConfigError(f"sampling.noise_schedule: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"sampling.noise_schedule={self.noise_schedule!r} with noise_kwargs={self.noise_kwargs} "
                              f"and num_steps={self.num_steps}: {exc}") from None


@dataclass
class RewardConfig:
    """One reward of the (weighted) mix."""

    name: str = field(default="brightness", metadata={"help": "Registered reward name, entry point, or dotted path 'pkg.module:Class'."})
    weight: float = field(default=1.0, metadata={"help": "Weight of this reward in the mix."})
    kwargs: dict = field(default_factory=dict, metadata={"help": "Keyword arguments passed to the reward's constructor."})
    on_error: str = field(default="raise", metadata={"help": "When the reward fails or returns NaN: 'raise' or 'drop' the sample with a warning."})
    label: Optional[str] = field(default=None, metadata={"help": "The run's name for this entry in logs and metrics (reward/<label>/mean); null = name. Lets one reward appear twice with other kwargs."})
    batch_size: Optional[int] = field(default=None, metadata={"help": "Samples per call of the reward when it scores rollouts (train, generate; null: each process's whole batch at once). Bounds a reward model's peak memory; the scores are the same, so a run may resume with another value."})

    @property
    def key(self) -> str:
        """The entry's name in the run: ``label``, else ``name``."""
        return self.label or self.name

    def __post_init__(self):
        _check(bool(self.name), "rewards[].name must not be empty")
        _check(self.label is None or (isinstance(self.label, str) and self.label.strip() == self.label and self.label != ""
                                      and "/" not in self.label),
               f"rewards[{self.name}].label must be null or a non-empty name without '/' or surrounding spaces, got {self.label!r}")
        _choice("rewards[].on_error", self.on_error, ("raise", "drop"))
        _check(self.batch_size is None or (isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool)
                                           and self.batch_size >= 1),
               f"rewards[{self.name}].batch_size must be null or an integer >= 1, got {self.batch_size!r}")
        _check(self.weight == self.weight, f"rewards[{self.name}].weight must be a number, got {self.weight}")


@dataclass
class LoraConfig:
    """peft LoRA on the adapter's trainable module (the transformer) and, with
    ``train_text_encoder``, on its text encoders too (diffusers' DreamBooth ``--train_text_encoder``:
    for SD3 the two CLIP encoders, not T5; same rank and alpha)."""

    rank: int = field(default=32, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=64.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    target_modules: Optional[list[str]] = field(default=None, metadata={"help": "Module names to adapt; null = the adapter's defaults."})
    init: str = field(default="gaussian", metadata={"help": "peft init_lora_weights: 'gaussian' or 'default' (both start with a zero update)."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout probability, active only in the update's gradient forward. Online: forward-process objectives (nft, awm) only (a step objective's ratio would be randomised); offline: any."})
    train_text_encoder: bool = field(default=False, metadata={"help": "Also train LoRA on the adapter's text encoders (SD3: the CLIP pair); the LoRA file then holds text_encoder. / text_encoder_2. keys as well."})
    text_encoder_target_modules: Optional[list[str]] = field(default=None, metadata={"help": "Text-encoder module names to adapt; null = the adapter's defaults (CLIP: q/k/v/out_proj)."})
    text_encoder_lr: Optional[float] = field(default=None, metadata={"help": "Learning rate of the text-encoder LoRA (diffusers' --text_encoder_lr); null = the run's lr (train.lr; lr in an offline recipe). Follows its lr schedule."})
    init_from: Optional[str] = field(default=None, metadata={"help": "Start the LoRA from this diffusers LoRA file (a previous run's pytorch_lora_weights.safetensors or its folder; same rank, alpha and targets or fewer), e.g. a second round of offline GDRO / DPO on a store generated with it; null = a fresh LoRA (no update). A resume reads its start from the checkpoint, not this file."})
    reference: str = field(default="base", metadata={"help": "The reference policy of KL terms and of offline ratios: 'base' (every LoRA off) or 'init' (the LoRA of lora.init_from, as iterative DPO / GDRO rounds take the previous round's model)."})

    def __post_init__(self):
        _check(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        _check(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _choice("lora.init", self.init, ("gaussian", "default"))
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _check(self.target_modules is None or len(self.target_modules) > 0, "lora.target_modules must be null or a non-empty list, got []")
        _check(self.text_encoder_target_modules is None or len(self.text_encoder_target_modules) > 0,
               "lora.text_encoder_target_modules must be null or a non-empty list, got []")
        for key in ("text_encoder_target_modules", "text_encoder_lr"):
            _check(self.train_text_encoder or getattr(self, key) is None, f"lora.{key} is set but lora.train_text_encoder is false")
        _check(self.text_encoder_lr is None or self.text_encoder_lr > 0, f"lora.text_encoder_lr must be null or > 0, got {self.text_encoder_lr}")
        _choice("lora.reference", self.reference, ("base", "init"))
        _check(self.init_from is None or (isinstance(self.init_from, str) and self.init_from.strip() != ""),
               f"lora.init_from must be null or a path, got {self.init_from!r}")
        _check(self.reference == "base" or self.init_from is not None, "lora.reference=init needs lora.init_from (the LoRA the run starts from)")


@dataclass
class ObjectiveConfig:
    """The policy loss (flowalign.objectives) and its advantages (flowalign.advantages)."""

    name: str = field(default="grpo", metadata={"help": "Registered objective name (grpo, dense_grpo, ...)."})
    clip_range: Optional[float] = field(default=None, metadata={"help": "PPO ratio clip epsilon; null = the objective's own default (grpo, dense_grpo: 1e-4; tp_grpo: 1e-5; awm: 1.0). nft has no ratio (its trust region is objective.kwargs.beta) and ignores it."})
    kl_beta: Optional[float] = field(default=None, metadata={"help": "Weight of the KL to the reference (LoRA disabled) in the loss; 0 leaves the reference out of the loss (the diagnostic kl/ref still runs every train.ref_kl_every iterations; 0 there skips it); null = the objective's own default (0 for every built-in one)."})
    adv_clip: float = field(default=5.0, metadata={"help": "Clip advantages to [-adv_clip, adv_clip]."})
    adv_std: str = field(default="group", metadata={"help": "Divide group-centred rewards by the 'group' std (Flow-GRPO), the 'global' std of the batch, or not at all ('none': Dr. GRPO, arXiv:2503.20783, so a group's weight follows its reward spread)."})
    adv_eps: float = field(default=1e-4, metadata={"help": "Added to the std when normalising advantages."})
    reward_mix: str = field(default="reward", metadata={"help": "How several rewards combine: 'reward' (group advantages of their weighted sum) or 'advantage' (the weighted sum of each reward's own group advantages, so each counts on its own scale; flowalign.advantages.multi_reward_advantages). Per-sample objectives only."})
    timestep_fraction: float = field(default=1.0, metadata={"help": "Fraction of the steps trained on, the first ones: step objectives train max(1, floor(fraction x stochastic steps)) of the rollout's stochastic steps; forward-process objectives (nft, awm) draw their sigmas from the first ceil(fraction x num_steps) of the sampler's grid."})
    cfg_in_training: bool = field(default=True, metadata={"help": "Apply CFG in the policy/reference velocity during the update (as while sampling); false needs guidance_scale 1 or a forward-process objective (nft, awm)."})
    kwargs: dict = field(default_factory=dict, metadata={"help": "Extra keyword arguments of the objective."})

    def __post_init__(self):
        _check(self.clip_range is None or self.clip_range > 0, f"objective.clip_range must be null or > 0, got {self.clip_range}")
        _check(self.kl_beta is None or self.kl_beta >= 0, f"objective.kl_beta must be null or >= 0, got {self.kl_beta}")
        _check(self.adv_clip > 0, f"objective.adv_clip must be > 0, got {self.adv_clip}")
        _choice("objective.adv_std", self.adv_std, ("group", "global", "none"))
        _check(self.adv_eps >= 0, f"objective.adv_eps must be >= 0, got {self.adv_eps}")
        _choice("objective.reward_mix", self.reward_mix, ("reward", "advantage"))
        _check(0.0 < self.timestep_fraction <= 1.0, f"objective.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        _check(isinstance(self.kwargs, dict), f"objective.kwargs must be a mapping, got {type(self.kwargs).__name__}")
        typed = sorted(set(self.kwargs) & ({f.name for f in dataclasses.fields(self)} - {"name", "kwargs"}))
        _check(not typed, f"objective.kwargs.{', '.join(typed)}: a key of objective itself; set objective.{typed[0] if typed else ''} instead")


@dataclass
class TrainConfig:
    """The loop: prompts, optimisation, checkpoints, logging and evaluation."""

    prompts: Optional[str] = field(default=None, metadata={"help": "Prompt file (.txt one per line, or .jsonl); null = the builtin demo prompts."})
    prompts_per_iter: int = field(default=4, metadata={"help": "Distinct prompts per iteration (over all processes); samples = prompts_per_iter * group_size."})
    oversample: float = field(
        default=1.0,
        metadata={"help": "Roll out and score oversample times as many prompts per iteration (per process: ceil(oversample * prompts_per_iter "
                          "/ processes); on several processes that must not round, else setup refuses it) and train on the first prompts_per_iter of their groups (over all processes) with a non-zero advantage (DAPO's dynamic "
                          "sampling, arXiv:2503.14476, in one pass; train.max_sampling_rounds draws until the batch is full); 1 = train on every group drawn."},
    )
    max_sampling_rounds: int = field(
        default=1,
        metadata={"help": "DAPO's sample-until-full: while fewer than prompts_per_iter of an iteration's groups (over all processes) have "
                          "rewards that differ, roll out and score the next window of prompts (oversample x prompts_per_iter of them) "
                          "and add its groups, up to this many windows per iteration; the update trains the first prompts_per_iter "
                          "groups with a non-zero advantage in the order drawn. 1 = one window (no extra rounds)."},
    )
    iterations: int = field(default=100, metadata={"help": "Rollout + update iterations."})
    inner_epochs: int = field(default=1, metadata={"help": "Passes over each iteration's samples."})
    micro_batch_size: int = field(default=4, metadata={"help": "Samples per forward pass of the update, per process (each micro-batch is one trained step of these samples)."})
    grad_accum: Optional[int] = field(default=1, metadata={"help": "Micro-batches (of one process) whose gradients are summed per optimizer step (a remainder at the end of an epoch is stepped too); the optimizer steps per iteration therefore depend on the process count unless one step takes the whole iteration. null = every micro-batch of the pass: one optimizer step per inner epoch, whatever micro_batch_size (then a memory knob only) and the process count."})
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate (the peak, under a schedule)."})
    lr_schedule: str = field(default="constant", metadata={"help": "Learning-rate schedule over iterations: constant, linear or cosine (flowalign.lr_schedule)."})
    lr_warmup: int = field(default=0, metadata={"help": "Iterations of linear warmup before the schedule, each below the full rate: (i + 1) / (lr_warmup + 1) at iteration i (0 = none)."})
    lr_min_ratio: float = field(default=0.0, metadata={"help": "Floor of a linear or cosine decay, as a fraction of train.lr (reached on the last iteration)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas."})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the LoRA gradient norm to this value (0 = no clipping)."})
    ema: bool = field(default=False, metadata={"help": "Keep an exponential moving average of the LoRA weights (saved and used for eval)."})
    ema_decay: float = field(default=0.9, metadata={"help": "EMA decay per EMA update, i.e. every train.ema_every optimizer steps (train.ema_schedule: constant), or the warm-up's cap (warmup); power does not read it."})
    ema_every: int = field(default=1, metadata={"help": "Update the EMA every n-th optimizer step (Flow-GRPO's EMAModuleWrapper update_step_interval: 8)."})
    ema_schedule: str = field(
        default="constant",
        metadata={"help": "constant: decay train.ema_decay at every EMA update (every train.ema_every optimizer steps); power: EDM2's power-function average, decay "
                          "(1 - 1/t)^(ema_power + 1) at EMA update t = 1, 2, ..., which weights update i's LoRA about "
                          "in proportion to i^ema_power (0 = the plain mean of every update's weights; larger = more recent); "
                          "warmup: Flow-GRPO's, decay min((1 + s) / (10 + s), ema_decay) at 0-based optimizer step s."})
    ema_power: float = field(default=0.0, metadata={"help": "The power-function EMA's exponent gamma >= 0 (train.ema_schedule: power)."})
    old_policy_rate: float = field(
        default=0.0,
        metadata={"help": "Sample from a soft-updated copy of the LoRA (DiffusionNFT's old policy) instead of the trained one: after each "
                          "iteration old <- d*old + (1 - d)*trained, d = min(rate * (optimizer steps - old_policy_flat), old_policy_max) "
                          "(0 before old_policy_flat steps). 0 = on-policy (d = 0 always). Forward-process objectives (nft, awm) only. "
                          "DiffusionNFT's presets: 0.001 / max 0.5 / flat 0, and 0.0075 / max 0.999 / flat 75."},
    )
    old_policy_max: float = field(default=0.5, metadata={"help": "Upper bound of the old policy's decay d, in [0, 1)."})
    old_policy_flat: int = field(default=0, metadata={"help": "Optimizer steps during which d = 0 (the old policy is the trained one)."})
    seed: int = field(default=0, metadata={"help": "Seed of every random draw (prompts, noise, shuffles)."})
    output_dir: str = field(default="runs/toy_grpo", metadata={"help": "Run directory: config.yaml, metrics.csv, checkpoints/, the final LoRA. A recipe file that does not set it writes to runs/<its file name>."})
    checkpoint_every: int = field(default=10, metadata={"help": "Write a checkpoint every N iterations and after the last one (0 = only after the last one)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Keep the last K checkpoints."})
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={"help": f"Trackers besides metrics.csv (always written), from {LOG_BACKENDS}; 'csv' names that file and adds nothing."})
    max_nonfinite_steps: int = field(default=5, metadata={"help": "Abort after this many consecutive micro-batches with a NaN/inf loss, optimizer steps with a NaN/inf gradient norm (each is skipped), or iterations whose every reward was dropped."})
    eval_every: int = field(default=0, metadata={"help": "Write an eval image grid every N iterations (0 = only at the end, -1 = never)."})
    keep_eval_grids: int = field(
        default=0,
        metadata={"help": "Keep the first and the last K in-training eval grids (samples/iter_*.png), deleting the ones between as "
                          "new ones come; 0 keeps every one (4,500 iterations at eval_every 20 write 225)."},
    )
    ref_kl_every: int = field(
        default=1,
        metadata={"help": "With objective.kl_beta = 0, log the diagnostic kl/ref (a policy and a reference forward of the first "
                          "micro-batch's rows at every trained step, before the update: what the objective's KL term would "
                          "average) on the metrics.csv rows N, 2N, ... (0 = never): row 1 would measure the untrained LoRA, "
                          "always 0, and a 50-iteration run with N = 10 now ends on a measurement. It changes no weights."},
    )
    report_target_points: Optional[float] = field(
        default=None,
        metadata={"help": "A held-out accuracy gain (percentage points) the run report checks: it says met / not met and draws "
                          "the line on heldout_accuracy.png (the toy main job: 15); null = no target."},
    )
    report_reward: Optional[str] = field(
        default=None,
        metadata={"help": "The reward (rewards[].label, else its name) whose verdict the held-out report measures: a sample is "
                          "correct when its details['binary'] is 1, or, for a reward without verdicts, when its score is >= 0.5; "
                          "null = the first of rewards."},
    )
    eval_prompts: Optional[str] = field(default=None, metadata={"help": "Held-out prompt file for evaluation; null = the training prompts."})
    eval_num_prompts: int = field(default=8, metadata={"help": "Prompts in an eval grid: distinct prompts of train.eval_prompts (else the training prompts), spread over their tags."})
    final_eval_samples: int = field(
        default=512,
        metadata={"help": "Samples of the held-out report at the end of training (base vs aligned on train.eval_prompts, "
                          "with train.report_reward, else the first reward; report.md, before_after.png); 0 = no report, else at least one per prompt of train.eval_prompts "
                          "(the shipped held-out file has 320). Needs train.eval_prompts."},
    )
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars for rollout, reward and update."})
    mixed_precision: str = field(
        default="no",
        metadata={"help": "Autocast the transformer's velocity (rollout and update) to 'bf16' or 'fp16' ('no' = off). LoRA "
                          "parameters, transition means, log-probs and the loss stay fp32. fp16 scales the loss dynamically (a GradScaler); bf16 needs none."},
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute the transformer's activations in the backward pass (memory; same results)."})
    offload_rewards: bool = field(default=False, metadata={"help": "Keep reward models on the CPU between reward calls (Reward.to / Reward.offload; memory; same results)."})
    deterministic: bool = field(
        default=False,
        metadata={"help": "On GPUs: deterministic kernels only (torch.use_deterministic_algorithms: an op without one raises, "
                          "naming it) and cuBLAS's fixed workspace, so a resumed run repeats an uninterrupted one as it does on "
                          "CPUs; slower. CPU runs are deterministic without it."},
    )
    process_group_timeout_min: float = field(
        default=120.0,
        metadata={"help": "Minutes a process waits in a collective (several processes) before the launch fails. The main "
                          "process writes the final outputs while the others wait, and the held-out report's share of "
                          "the slowest process bounds the others' wait: torch's NCCL default of 10 minutes can be too short."},
    )

    def __post_init__(self):
        for name in ("prompts_per_iter", "iterations", "inner_epochs", "micro_batch_size", "grad_accum", "keep_checkpoints", "max_nonfinite_steps", "eval_num_prompts"):
            value = getattr(self, name)
            _check((name == "grad_accum" and value is None) or value >= 1, f"train.{name} must be >= 1, got {value}"
                   + (" (null: one optimizer step per pass)" if name == "grad_accum" else ""))
        _check(self.keep_eval_grids >= 0, f"train.keep_eval_grids must be >= 0 (0 = keep every grid), got {self.keep_eval_grids}")
        _check(self.oversample >= 1.0, f"train.oversample must be >= 1 (1 = no oversampling), got {self.oversample}")
        _check(1 <= self.max_sampling_rounds <= MAX_SAMPLING_ROUNDS,
               f"train.max_sampling_rounds must be in [1, {MAX_SAMPLING_ROUNDS}] (1 = one window of prompts per iteration), got {self.max_sampling_rounds}")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(self.adam_eps > 0, f"train.adam_eps must be > 0, got {self.adam_eps}")
        _choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check(0 <= self.lr_warmup < self.iterations, f"train.lr_warmup must be in [0, train.iterations={self.iterations}), got {self.lr_warmup}")
        _check(0.0 <= self.lr_min_ratio <= 1.0, f"train.lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        _check(0 <= self.seed < 2**63, f"train.seed must be in [0, 2**63), got {self.seed}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        _check(self.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0, got {self.max_grad_norm}")
        _check(self.process_group_timeout_min > 0, f"train.process_group_timeout_min must be > 0, got {self.process_group_timeout_min}")
        _check(0.0 < self.ema_decay < 1.0, f"train.ema_decay must be in (0, 1), got {self.ema_decay}")
        _check(self.ema_every >= 1, f"train.ema_every must be >= 1, got {self.ema_every}")
        _choice("train.ema_schedule", self.ema_schedule, EMA_SCHEDULES)
        _check(self.ema_power >= 0, f"train.ema_power must be >= 0, got {self.ema_power}")
        _check(self.old_policy_rate >= 0, f"train.old_policy_rate must be >= 0 (0 = on-policy sampling), got {self.old_policy_rate}")
        _check(0.0 <= self.old_policy_max < 1.0, f"train.old_policy_max must be in [0, 1), got {self.old_policy_max}")
        _check(self.old_policy_flat >= 0, f"train.old_policy_flat must be >= 0, got {self.old_policy_flat}")
        _check(self.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        _check(self.eval_every >= -1, f"train.eval_every must be >= -1, got {self.eval_every}")
        _check(self.ref_kl_every >= 0, f"train.ref_kl_every must be >= 0 (0 = never), got {self.ref_kl_every}")
        _check(self.final_eval_samples >= 0, f"train.final_eval_samples must be >= 0 (0 = no held-out report), got {self.final_eval_samples}")
        for backend in self.log_with:
            _choice("train.log_with[]", backend, LOG_BACKENDS)
        _choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        _check(bool(self.output_dir), "train.output_dir must not be empty")
        for name in ("prompts", "eval_prompts"):  # an empty shell variable (--set train.prompts=$P) is not "null"
            value = getattr(self, name)
            _check(value is None or value.strip() != "", f"train.{name} is empty; give a prompt file, or null for "
                                                         f"{'the builtin demo prompts' if name == 'prompts' else 'the training prompts'}")


@dataclass
class FlowalignConfig:
    """The whole run. ``rewards`` is a list; their weighted sum is the training reward."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The pipeline to align."})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"help": "Rollout settings."})
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()], metadata={"help": "Rewards and their weights."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA settings."})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig, metadata={"help": "Loss and advantage settings."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Loop, optimiser, checkpoint and logging settings."})
    dense: DenseConfig = field(default_factory=DenseConfig, metadata={"help": "Per-step (dense) reward settings, read by the dense_grpo / tp_grpo objectives."})

    def __post_init__(self):
        _check(len(self.rewards) >= 1, "rewards must list at least one reward, got []")
        _check(any(r.weight != 0 for r in self.rewards), "every reward's weight is 0: the mixed reward would be constant and "
                                                          "nothing would train; give at least one reward a non-zero weight")
        names = [r.key for r in self.rewards]
        twice = sorted({n for n in names if names.count(n) > 1})
        _check(not twice, f"rewards name {twice} twice (each entry's label, else its name): give one of those entries a label "
                          "(rewards[].label) no other entry uses, to use a reward twice with other kwargs")
        _check(self.train.report_reward is None or self.train.report_reward in names,
               f"train.report_reward={self.train.report_reward!r} is none of the rewards {names} (labels, else names)")
        per_iter = self.train.prompts_per_iter * self.sampling.group_size
        _check(
            self.train.micro_batch_size <= per_iter,
            f"train.micro_batch_size={self.train.micro_batch_size} exceeds the samples per iteration "
            f"(prompts_per_iter {self.train.prompts_per_iter} x group_size {self.sampling.group_size} = {per_iter}); set "
            f"train.micro_batch_size={per_iter} too (a recipe whose micro-batch is every sample keeps one per trained step that way: "
            f"lowering grad_accum instead would take more optimizer steps per iteration)",
        )
        _check_online_objective(self.objective.name)
        if self.objective.reward_mix == "advantage" and dense_method(self.objective.name):
            raise ConfigError(f"objective.reward_mix='advantage' mixes per-sample advantages; {self.objective.name!r} takes per-step "
                              "advantages of the weighted reward sum: use reward_mix='reward'")
        if self.sampling.kernel == "ode" and not _trains_on_forward_process(self.objective.name):
            raise ConfigError(f"sampling.kernel='ode' draws no noise, so no step of objective {self.objective.name!r} can be trained; "
                              "use flow_sde, dance_sde or cps, or a forward-process objective (nft, awm)")
        table_decides = dense_method(self.objective.name) is not None and bool(self.dense.noise_table_file)  # replaces the schedule
        moving = self.sampling.noise_schedule == "window" and isinstance(self.sampling.noise_kwargs, dict) \
            and self.sampling.noise_kwargs.get("mode", "fixed") != "fixed"
        if dense_method(self.objective.name) is not None and (table_decides or self.dense.calibration_rounds > 0) and moving:
            raise ConfigError(f"a {self.sampling.noise_kwargs['mode']} noise window with a noise table (dense.noise_table_file or "
                              "dense.calibration_rounds): the table replaces sampling.noise_schedule at every iteration, so the window "
                              "would not move (a calibration starts from its iteration-0 position); use a fixed window or a constant level")
        if self.sampling.kernel != "ode" and not _trains_on_forward_process(self.objective.name) and not table_decides:
            _check_some_step_is_stochastic(self.sampling)
        if self.train.old_policy_rate > 0 and not _trains_on_forward_process(self.objective.name):
            raise ConfigError(
                f"train.old_policy_rate={self.train.old_policy_rate} samples from a lagging copy of the LoRA, which objective "
                f"{self.objective.name!r} cannot train on: its ratio to the recorded log-probs would start away from 1 (most samples "
                "clipped); use a forward-process objective (nft, awm) or old_policy_rate=0"
            )
        if self.lora.dropout > 0 and not _trains_on_forward_process(self.objective.name):
            raise ConfigError(
                f"lora.dropout={self.lora.dropout} makes the trained policy's log-probs random: objective {self.objective.name!r}'s "
                "ratio to the rollout's recorded log-probs would start away from 1 on-policy (most samples clipped); use "
                "lora.dropout=0, or a forward-process objective (nft, awm)"
            )
        if not self.objective.cfg_in_training and self.sampling.guidance_scale > 1.0 and not _trains_on_forward_process(self.objective.name):
            raise ConfigError(
                f"objective.cfg_in_training=false with sampling.guidance_scale={self.sampling.guidance_scale} > 1: rollouts record the "
                f"log-probs of the guided transitions, so objective {self.objective.name!r} would take its ratio against an unguided "
                "policy (not 1 before any update; most samples clipped); set cfg_in_training=true, guidance_scale=1, or use a forward-process objective (nft, awm)"
            )


def _check_some_step_is_stochastic(sampling: SamplingConfig) -> None:
    """ConfigError when a schedule that is the same every iteration (constant, table, fixed window) puts no noise
    on any step that can carry it: a zero level, or CPS's last step (sigma_next = 0, so std = 0). Rollouts would be
    paid for and nothing trained. (Sliding and random windows move; the trainer warns on an iteration without one.)"""
    from flowalign.sde import ConstantSchedule, TableSchedule, WindowSchedule, make_schedule

    if not isinstance(sampling.noise_kwargs, dict):
        return
    schedule = make_schedule(sampling.noise_schedule, **sampling.noise_kwargs)
    if isinstance(schedule, WindowSchedule) and schedule.mode != "fixed":
        return
    if not isinstance(schedule, (ConstantSchedule, TableSchedule, WindowSchedule)):  # a plugin's may move with the iteration
        return
    levels, noisy = sampling.noise_at()
    if not bool(noisy.any()):
        where = " (CPS's last step has no noise: std = sigma_next * sin(a*pi/2) = 0)" if sampling.kernel == "cps" and bool((levels > 0).any()) else ""
        raise ConfigError(f"sampling.noise_schedule={sampling.noise_schedule!r} with noise_kwargs={sampling.noise_kwargs} leaves no "
                          f"stochastic step of the {sampling.num_steps} for kernel {sampling.kernel!r}{where}: nothing could be trained")


def _check_online_objective(name: str) -> None:
    """ConfigError, before any model loads, for an objective name that is not registered or that
    ``flowalign train`` does not run (an offline one, or one with its own loop)."""
    from flowalign.objectives import OBJECTIVES, OFFLINE_TRAINER, ONLINE_TRAINER, available_objectives, resolve_objective, trained_by

    if name not in OBJECTIVES and ":" not in name and "." not in name and name not in available_objectives():
        online = sorted(n for n in OBJECTIVES if ONLINE_TRAINER in trained_by(n))
        raise ConfigError(f"unknown objective {name!r}; available: {online} (offline: "
                          f"{sorted(n for n in OBJECTIVES if OFFLINE_TRAINER in trained_by(n))}), or a dotted path "
                          "'package.module:Class', or an entry point of group 'flowalign.objectives'")
    resolve_objective(name)  # a dotted path or an entry point: imported here (its own error says what failed)
    online = sorted(n for n in OBJECTIVES if ONLINE_TRAINER in trained_by(n))
    if ONLINE_TRAINER not in trained_by(name):
        runner = trained_by(name)[0]
        hint = " from a rollout store that `flowalign generate` writes (train/configs/toy_gdro.yaml)" if runner == OFFLINE_TRAINER else ""
        raise ConfigError(f"objective {name!r} is not trained by `{ONLINE_TRAINER}`: use `{runner}`{hint}; "
                          f"the online objectives are {online}")


def _trains_on_forward_process(objective: str) -> bool:
    """Whether the registered objective trains on re-noised clean samples (any sampler, the ODE included)."""
    from flowalign.objectives import OBJECTIVES

    return bool(getattr(OBJECTIVES.get(objective), "forward_process", False))


# ---------------------------------------------------------------------------------------------
# YAML <-> dataclasses


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, base: Any = None) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert (int -> float, dict -> dataclass; a dataclass's
    missing keys from ``base`` when given, the section's own default in its parent)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, base)
    if dataclasses.is_dataclass(tp):
        if value is None:  # a section whose keys are all commented out ("train:" alone) holds the defaults
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {type(value).__name__} {value!r}")
        return build_dataclass(tp, value, key, base=base if isinstance(base, tp) else None)
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]  # rewards.0.weight: the --set spelling
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():  # 1e3, 1000.0
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):  # .inf / .nan pass every range check below and fail mid-run
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")  # pragma: no cover


def build_dataclass(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Instantiate dataclass ``cls`` from ``data`` (nested dicts -> nested dataclasses).

    Values are checked against the field annotations (int -> float allowed, dict -> dataclass);
    an unknown key raises :class:`ConfigError` with a did-you-mean; ``prefix`` names the section
    in messages (``"train"`` -> ``"train.lr"``). Any typed config (the training recipe,
    ``GenerateConfig``, ``OfflineConfig``) is read with it.

    A key ``data`` leaves out takes ``base``'s value when ``base`` (an instance of ``cls``) is given, else the field's
    default. A nested section given in part is completed from the section's default *in its parent*: an offline
    recipe's ``model: {dtype: bfloat16}`` keeps ``OfflineConfig``'s ``pretrained: toy``, not ``ModelConfig``'s own.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__} must be a mapping of {cls.__name__} fields, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    names = list(by_name)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else f"; known keys: {names}"
            if not prefix and cls.__name__ == "FlowalignConfig" and key in OTHER_COMMANDS_KEYS:
                hint += f" ('{key}' is a key of {OTHER_COMMANDS_KEYS[key]} recipes: run that command with this file)"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        kwargs[key] = _coerce(value, hints[key], full, _section_default(by_name[key], base))
    if base is not None:
        kwargs.update({name: copy.deepcopy(getattr(base, name)) for name in names if name not in kwargs})
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - every field has a default
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None


def _section_default(f: dataclasses.Field, base: Any) -> Any:
    """The default a partly given nested section completes from: ``base``'s section, else the field's default when it
    is a dataclass instance other than its class's own defaults (``OfflineConfig.model``: ``pretrained: toy``); None
    (the class's defaults) otherwise."""
    if base is not None:
        value = getattr(base, f.name)
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return None
    if base is None and value == type(value)():
        return None
    return value


_build = build_dataclass  # the former private name, kept for existing imports


def _set_dotted(data: dict, dotted: str, value: Any, defaults: Any = None) -> None:
    """``data['a']['b'] = value`` for ``'a.b'``; a list index is a number (``rewards.0.weight``). A key the
    data lacks on the way starts from the schema's default there (``defaults``: ``train.adam_betas.0=0.8``
    on a recipe without ``adam_betas`` edits the default list), else from an empty section."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            _check(part.isdigit() and int(part) < len(node), f"--set {dotted}: '{part}' is not an index of a list of {len(node)}")
            node = node[int(part)]
        else:
            if node.get(part) is None:
                seed = _default_at(defaults, ".".join(parts[: i + 1])) if defaults is not None else None
                node[part] = copy.deepcopy(seed) if isinstance(seed, (dict, list)) else {}
            node = node[part]
            _check(isinstance(node, (dict, list)), f"--set {dotted}: '{'.'.join(parts[: i + 1])}' is not a section")
    last = parts[-1]
    if isinstance(node, list):
        _check(last.isdigit() and int(last) < len(node), f"--set {dotted}: '{last}' is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def _yaml_problem(exc: Exception) -> str:
    """One line describing a YAML error (scanner/parser errors have ``problem``; reader errors do not)."""
    return " ".join(str(getattr(exc, "problem", None) or exc).split())


def apply_overrides(data: dict, overrides: list[str], schema: Optional[type] = None) -> dict:
    """Apply ``"a.b=value"`` strings (value parsed as YAML: ``1e-4``, ``true``, ``[a, b]``) to ``data``.

    An override inside a section the file does not have (``--set rewards.0.weight=2`` on a file
    without ``rewards:``) starts from that section's default, taken from the dataclass ``schema``
    the data is for (default :class:`FlowalignConfig`; pass ``GenerateConfig`` etc. for other
    configs, so that no training-recipe section leaks into them).
    """
    defaults = to_dict((schema or FlowalignConfig)())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        _check(bool(key), f"override {item!r} has an empty key")
        if "[" in key:  # rewards[0].weight: list entries are addressed by a number between dots
            dotted = key.replace("[", ".").replace("]", "").replace("..", ".")
            raise ConfigError(f"override {item!r}: address list entries with dots, e.g. --set {dotted}={raw}")
        section = key.split(".")[0]
        if section in defaults and data.get(section) is None:  # --set rewards.0.weight=2 on a recipe without rewards (or "rewards:" empty)
            data[section] = defaults[section]
        if "." in key and section in defaults and type(data.get(section)) is not type(defaults[section]):
            # the recipe's section is broken (sampling: 5), not the override into it
            raise ConfigError(f"the recipe's {section!r} must be a {'mapping of keys' if isinstance(defaults[section], dict) else 'list'}, "
                              f"got {type(data[section]).__name__} ({data[section]!r}); fix the recipe before overriding {key}")
        text = raw.strip()
        if _is_text_field(schema or FlowalignConfig, key) and text[:1] not in ("'", '"') and text not in _YAML_NULLS:
            # a text field (str or Optional[str]) keeps its text: output_dir=2024-06-01, off, 0755, "exp #2", @home
            # are folder names, revision=1.0 a tag; quotes and null still go through YAML
            value = text
        else:
            try:
                value = load_yaml(raw) if text else ""
            except yaml.YAMLError as exc:
                raise ConfigError(f"override {item!r}: value is not valid YAML ({_yaml_problem(exc)})") from None
        _set_dotted(data, key, value, defaults)
    return data


_YAML_NULLS = ("null", "Null", "NULL", "~")


def _is_text_field(schema: type, dotted: str) -> bool:
    """True when the dataclass field at ``'a.b'`` (list entries by number: ``rewards.0.name``) is typed
    ``str`` or ``Optional[str]``; False for any other type or a key the schema does not have."""
    import typing

    tp: Any = schema
    for part in dotted.split("."):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is Union and len(args) == 1:  # Optional[X]
            tp = args[0]
        if typing.get_origin(tp) in (list, tuple) and part.isdigit():
            tp = (typing.get_args(tp) or (None,))[0]
        elif dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part)
        else:
            return False
    return tp is str or tp == Optional[str]


def _default_at(defaults: Any, dotted: str) -> Any:
    """The schema default at ``'a.b'`` (list entries: the first one's), or None where the schema has none."""
    node = defaults
    for part in dotted.split("."):
        if isinstance(node, list):
            node = node[0] if node and part.isdigit() else None
        elif isinstance(node, dict):
            node = node.get(part)
        else:
            return None
    return node


def config_from_dict(data: dict) -> FlowalignConfig:
    """Build and validate a :class:`FlowalignConfig` from a plain dict (YAML layout)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    return build_dataclass(FlowalignConfig, data)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (not "the last one wins")."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<:" merges a mapping in (PyYAML resolves it below)
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_INT_TAG, _FLOAT_TAG, _TIMESTAMP_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"
# YAML 1.2's core schema for numbers, where PyYAML follows YAML 1.1: 1e-3 is a number (1.1: the text "1e-3"), 0123 is 123
# (1.1: octal 83), 1:30 is text (1.1: 90), and a date is text (1.1: a datetime.date, which no setting takes and which a
# checkpoint's config hash could not write); digits may be grouped with "_" as YAML 1.1 and Python allow (1_000 is 1000)
_YAML12_INT = re.compile(r"^[-+]?[0-9][0-9_]*$|^0o[0-7_]+$|^0x[0-9a-fA-F_]+$|^0b[01_]+$")
_YAML12_FLOAT = re.compile(r"^[-+]?(\.[0-9][0-9_]*|[0-9][0-9_]*(\.[0-9_]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")


class _ConfigLoader(_StrictLoader):
    """:class:`_StrictLoader` reading numbers as YAML 1.2 does and dates as text (the comment above ``_YAML12_INT``)."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG, _TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(_INT_TAG, _YAML12_INT, list("-+0123456789"))  # before the float: "12" is an int
_ConfigLoader.add_implicit_resolver(_FLOAT_TAG, _YAML12_FLOAT, list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    if _YAML12_INT.match(text) is None:  # an explicit !!int of another form: YAML 1.1's reading
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    digits = text.replace("_", "")
    return int(digits, 0) if digits[:2] in ("0o", "0x", "0b") else int(digits, 10)


_ConfigLoader.add_constructor(_INT_TAG, _construct_int)


class _ConfigDumper(yaml.SafeDumper):
    """``yaml.safe_dump`` quoting every string that :func:`load_yaml` would read as something else (``"1e-4"``, a
    folder or revision named like a number), so that a run's ``config.yaml`` reads back as it was written."""


_ConfigDumper.yaml_implicit_resolvers = _ConfigLoader.yaml_implicit_resolvers


def dump_yaml(data: Any) -> str:
    """``data`` as YAML that :func:`load_yaml` reads back equal (keys in their order)."""
    return yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False)


def load_yaml(text: str) -> Any:
    """Read a recipe or a ``--set`` value: ``yaml.safe_load``, except that a key given twice in one mapping is refused
    (a recipe's second ``lr:`` would silently win) and numbers and dates read as YAML 1.2 reads them (``1e-3`` a number,
    ``0123`` 123, ``2024-06-01`` text; ``1_000`` is 1000, as in YAML 1.1), the same in typed settings and in free-form
    ``*kwargs`` mappings."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


def packaged_recipe_dir() -> Path:
    """The shipped recipes (``train/configs`` of the repository, ``flowalign/train/configs`` when installed)."""
    import flowalign.train

    return Path(flowalign.train.__file__).resolve().parent / "configs"


def resolve_recipe(path: Union[str, Path], relative_to: Optional[Path] = None) -> Path:
    """The recipe file ``path`` names: the path itself (a relative one: relative to ``relative_to`` when given, as a
    ``base:`` is to its recipe's folder, else to the current folder) or, when there is none, the shipped one:
    ``train/configs/X.yaml`` and ``train/accelerate/X.yaml`` from any folder (an installed flowalign has no ``train/``
    beside the user), and a bare name ``X`` or ``X.yaml`` (``toy_dense_grpo``). Returns ``path`` unchanged when
    nothing matches (the caller reports it missing). A ``base:`` never depends on the current folder: the same recipe
    loads the same from anywhere, and a file there cannot shadow a shipped recipe."""
    path = Path(path)
    if relative_to is not None and not path.is_absolute():
        if (relative_to / path).is_file():
            return relative_to / path
    elif path.is_file():
        return path
    shipped = packaged_recipe_dir()
    parts = path.parts
    if len(parts) == 3 and parts[0] == "train" and parts[1] in ("configs", "accelerate"):
        candidate = shipped.parent / parts[1] / parts[2]
        if candidate.is_file():
            return candidate
    if len(parts) == 1:
        for candidate in (shipped / parts[0], shipped / f"{parts[0]}.yaml"):
            if candidate.is_file():
                return candidate
    return relative_to / path if relative_to is not None and not path.is_absolute() else path


def read_recipe(path: Union[str, Path], what: str = "train", _chain: tuple = ()) -> dict[str, Any]:
    """The settings of the recipe YAML ``path`` (:func:`resolve_recipe`) as a mapping.

    A recipe may start from another: ``base: toy_grpo`` (a shipped recipe's name, or a path relative to
    the recipe's folder) reads that one first and lays this file's keys over it (:func:`_merged`: sections
    merge key by key; values, lists and ``*kwargs`` mappings replace), so a recipe holds only what it changes.

    Raises:
        ConfigError: missing or unreadable file, invalid YAML, a top level that is not a mapping, a
            ``base`` that is missing or names a recipe of its own chain.
    """
    label = "config file" if what == "train" else f"{what} config"
    resolved = resolve_recipe(path)  # a base arrives resolved (against its recipe's folder, below)
    if resolved.is_dir():
        raise ConfigError(f"{label} {path} is a folder, not a recipe file (a run folder's recipe is its config.yaml; "
                          "`--resume DIR` reads it)")
    if not resolved.is_file():
        from flowalign.files import relative_to_cwd

        where = relative_to_cwd(resolved)
        raise ConfigError(f"config file not found: {path}{where}" if what == "train" else f"{what} config {str(path)!r} does not exist{where}")
    try:
        data = load_yaml(resolved.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{label} {resolved} is not valid YAML{where}: {_yaml_problem(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label} {resolved} cannot be read: {exc}") from None
    if data is None:  # an empty file (or only comments) is a mistake: it would silently train the defaults
        raise ConfigError(f"{label} {resolved} is empty; write the keys it changes under `base: toy_grpo`, or start from "
                          f"`flowalign config > mine.yaml`")
    if not isinstance(data, dict):
        raise ConfigError(f"{label} {resolved} must hold a mapping of sections, got {type(data).__name__}")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{label} {resolved}: base must name a recipe (a shipped name such as toy_grpo, or a path), got {base!r}")
    chain = (*_chain, resolved.resolve())
    base_path = resolve_recipe(base, relative_to=resolved.parent)
    if base_path.is_file() and base_path.resolve() in chain:
        raise ConfigError(f"{label} {resolved}: base {base!r} starts a loop ({' -> '.join(str(c) for c in chain)} -> {base_path})")
    if not base_path.is_file():
        raise ConfigError(f"{label} {resolved}: base {base!r} is neither a file next to it nor a shipped recipe "
                          f"({', '.join(sorted(p.stem for p in packaged_recipe_dir().glob('*.yaml')))})")
    return _merged(read_recipe(base_path, what, chain), data)


def _merged(base: dict, top: dict) -> dict:
    """``top`` laid over ``base``: sections merge key by key; any other value of ``top`` replaces, and so does a
    free-form argument mapping (a key ending in ``kwargs``: a new noise schedule or objective takes only its own
    arguments, not the base's); an empty section (YAML null) changes nothing."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if value is None and isinstance(out.get(key), dict) and not str(key).endswith("kwargs"):
            continue  # `model:` with only comments under it
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not str(key).endswith("kwargs"):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> FlowalignConfig:
    """Read a YAML recipe (:func:`read_recipe`: a file, a shipped recipe's name, ``base:`` chains) or the
    defaults when ``path`` is None, apply overrides, validate.

    A recipe file that sets no ``model.pretrained`` (and no ``base``) gets a warning: the built-in
    default is ``tiny-sd3``, a random test pipeline, not the toy that ``flowalign train`` aligns.

    Raises:
        ConfigError: missing/unreadable file, invalid YAML, unknown key, wrong type, bad value.
    """
    if isinstance(path, Mapping):
        raise ConfigError("load_config takes a recipe path or name; build a config from a dict with config_from_dict(data)")
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'section.key=value' strings, got the string {overrides!r}")
    overrides = list(overrides or [])  # a generator is read once
    if not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"overrides must be a list of 'section.key=value' strings, got {overrides!r}")
    data: dict = {}
    if path is not None:
        data = read_recipe(path, "train")
        _own_output_dir(data, path)
        model = data.get("model")
        if not (isinstance(model, dict) and "pretrained" in model) and not any(o.startswith("model.pretrained=") for o in overrides or []):
            logger.warning("%s sets no model.pretrained: the built-in default %r is a random test pipeline. A recipe is a whole "
                           "file (start from `flowalign config > mine.yaml`), or starts from a shipped one with `base: toy_grpo`",
                           path, ModelConfig().pretrained)
    return config_from_dict(apply_overrides(data, list(overrides or [])))


def _own_output_dir(data: dict, path: Union[str, Path]) -> None:
    """A recipe file that sets no ``train.output_dir`` itself writes to ``runs/<its file name>``, not to its base's
    folder or the default's (``runs/toy_grpo``: `base: toy_grpo` and a recipe without base both ran into the main
    job's folder, and were refused there as a different run, or replaced it under --overwrite)."""
    resolved = resolve_recipe(path)
    try:
        own = load_yaml(resolved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # read_recipe read it a moment ago: nothing to decide here
        return
    train = own.get("train") if isinstance(own, dict) else None
    if isinstance(train, dict) and "output_dir" in train:
        return
    if data.get("train") is None:  # absent, or "train:" with only comments under it
        data["train"] = {}
    if isinstance(data["train"], dict):
        data["train"]["output_dir"] = f"runs/{resolved.stem}"


def to_dict(config: Any) -> dict:
    """The config as plain dicts/lists (the YAML layout ``load_config`` reads)."""
    return dataclasses.asdict(config)


def save_config(config: FlowalignConfig, path: Union[str, Path]) -> Path:
    """Write ``config`` as YAML to ``path`` (a file, or a folder -> ``folder/config.yaml``; an existing
    folder is a folder even when its name ends in ``.yaml``, e.g. a run's ``output_dir``)."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml") or path.is_dir():
        path = path / "config.yaml"
    from flowalign.files import write_text_atomic

    return write_text_atomic(path, dump_yaml(to_dict(config)))


def inert_settings(config: "FlowalignConfig") -> list[str]:
    """Keys the recipe sets away from their defaults that nothing reads under its other choices, one line each
    (``flowalign train`` and ``flowalign config`` warn with them): the ``dense:`` section under an objective of
    outcome advantages, ``dense.balance`` under dense_grpo, the EMA's keys without ``train.ema``, the old policy's
    without ``train.old_policy_rate``, the guided drift's without ``sampling.drift_reward``, ``objective.clip_range``
    under nft. Resume-safe: a warning, never a refusal (a recipe written for one objective and switched with ``--set``
    keeps working)."""

    def changed(section: Any, default: Any, prefix: str, names: Optional[Sequence[str]] = None) -> list[str]:
        return [f"{prefix}.{f.name}" for f in dataclasses.fields(section)
                if (names is None or f.name in names) and getattr(section, f.name) != getattr(default, f.name)]

    found: list[str] = []
    name = config.objective.name
    method = dense_method(name)
    if method is None:
        keys = changed(config.dense, DenseConfig(), "dense")
        if keys:
            found.append(f"{', '.join(keys)}: objective {name!r} trains on outcome advantages; only per-step objectives "
                         "(dense_grpo, tp_grpo, a class with dense_method) read the dense: section")
    elif method == "dense_grpo" and config.dense.balance:
        found.append("dense.balance: TP-GRPO's balancing of turning points; dense_grpo does not read it")
    t, default_train = config.train, TrainConfig()
    if not t.ema:
        keys = changed(t, default_train, "train", ("ema_decay", "ema_every", "ema_schedule", "ema_power"))
        if keys:
            found.append(f"{', '.join(keys)}: train.ema is false, so no EMA is kept")
    elif t.ema_schedule == "power" and t.ema_decay != default_train.ema_decay:
        found.append("train.ema_decay: the power-function EMA (train.ema_schedule: power) sets its own decay from train.ema_power")
    elif t.ema_schedule != "power" and t.ema_power != default_train.ema_power:
        found.append(f"train.ema_power: read by train.ema_schedule: power only, not {t.ema_schedule}")
    if t.old_policy_rate == 0:
        keys = changed(t, default_train, "train", ("old_policy_max", "old_policy_flat"))
        if keys:
            found.append(f"{', '.join(keys)}: train.old_policy_rate is 0, so the rollouts come from the current policy")
    if config.sampling.drift_reward is None:
        drift = [f.name for f in dataclasses.fields(config.sampling) if f.name.startswith("drift_") and f.name != "drift_reward"]
        keys = changed(config.sampling, SamplingConfig(), "sampling", drift)
        if keys:
            found.append(f"{', '.join(keys)}: sampling.drift_reward is null, so the rollouts are not guided")
    if name == "nft" and config.objective.clip_range is not None:
        found.append("objective.clip_range: nft has no ratio to clip (its trust region is objective.kwargs.beta)")
    if method is None and getattr(_objective_class(name), "advantages", None) is not None:
        from flowalign.objectives import takes_keyword

        keys = changed(config.objective, ObjectiveConfig(), "objective",
                       ("adv_std", "adv_eps", "reward_mix") + (() if takes_keyword(name, "adv_clip") else ("adv_clip",)))
        if keys:
            found.append(f"{', '.join(keys)}: objective {name!r} computes its own advantages (its advantages method), not the "
                         "group normalisation these keys set")
    return found


def _objective_class(name: str) -> Any:
    """The registered class of objective ``name`` (None when it is not registered)."""
    from flowalign.objectives import OBJECTIVES

    return OBJECTIVES.get(name)


def dense_method(objective: str) -> Optional[str]:
    """``"dense_grpo"`` / ``"tp_grpo"`` when ``objective`` trains on per-step advantages (its class's ``dense_method``:
    those two, and an objective of the user's that subclasses either), else None."""
    return getattr(_objective_class(objective), "dense_method", None)
# model keys that change no sample, only memory (left out of config hashes and rollout-store settings)
MODEL_MEMORY_KNOBS = ("t5_cache_size",)
# fields that do not change what a run computes (so resuming with them changed is the same run)
_HASH_EXCLUDE = {("train", "iterations"), ("train", "output_dir"), ("train", "checkpoint_every"), ("train", "keep_checkpoints"),
                 ("train", "log_with"), ("train", "progress"), ("train", "eval_every"), ("train", "final_eval_samples"),
                 ("train", "ref_kl_every"),
                 ("train", "gradient_checkpointing"), ("train", "offload_rewards"), ("train", "process_group_timeout_min"), ("train", "report_target_points"), ("train", "deterministic"),
                 ("train", "report_reward"), ("train", "keep_eval_grids"),
                 *(("model", key) for key in MODEL_MEMORY_KNOBS)}
# fields left out of the hash while at these values (their defaults), so runs from before they existed resume
_HASH_OMIT_AT = {("sampling", "log_prob_form"): "gaussian", ("model", "adapter"): None, ("model", "adapter_kwargs"): {}, ("sampling", "noise_seeding"): "process", ("objective", "reward_mix"): "reward", ("train", "ema_every"): 1, ("train", "mixed_precision"): "no",
                 ("train", "lr_schedule"): "constant", ("train", "lr_warmup"): 0, ("train", "lr_min_ratio"): 0.0,
                 ("train", "max_sampling_rounds"): 1, ("sampling", "rollout"): "default", ("sampling", "rollout_kwargs"): {},
                 ("lora", "init_from"): None, ("lora", "reference"): "base", ("model", "variant"): None}
# lora keys added after runs were checkpointed: left out of both trainers' config hashes at these values
LORA_OMIT_AT = {key: value for (section, key), value in _HASH_OMIT_AT.items() if section == "lora"}


def describe_config(config: Any) -> str:
    """``config`` as a YAML recipe with each key's help as a comment above it (``flowalign config``).

    The text loads back into an equal config (``config_from_dict(yaml.safe_load(text))``); values
    are written in JSON syntax, which YAML reads (``null``, ``true``, ``0.0005``, ``{"a": 0.7}``).
    """

    def value(v: Any) -> str:
        if isinstance(v, float) and v != v:
            return ".nan"
        if isinstance(v, float) and abs(v) == float("inf"):
            return ".inf" if v > 0 else "-.inf"
        return json.dumps(dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)

    def helped(f: dataclasses.Field, indent: str) -> list[str]:
        text = f.metadata.get("help")
        return [f"{indent}# {text}"] if text else []

    lines = [f"# {type(config).__name__}: every key with its help; load it back with --config"]
    for section in dataclasses.fields(config):
        current = getattr(config, section.name)
        lines += [""] + helped(section, "")
        if dataclasses.is_dataclass(current):
            lines.append(f"{section.name}:")
            for f in dataclasses.fields(current):
                lines += helped(f, "  ") + [f"  {f.name}: {value(getattr(current, f.name))}"]
        elif isinstance(current, list) and current and all(dataclasses.is_dataclass(item) for item in current):
            lines += _helped_fields(current[0]) + [f"{section.name}:"] + [f"  - {value(item)}" for item in current]
        else:
            lines.append(f"{section.name}: {value(current)}")
    return "\n".join(lines) + "\n"


def _helped_fields(item: Any) -> list[str]:
    """Comment lines naming each field of a list item's dataclass with its help."""
    return [f"#   {f.name}: {f.metadata['help']}" for f in dataclasses.fields(item) if f.metadata.get("help")]


def config_hash(config: FlowalignConfig) -> str:
    """sha256 (16 hex digits) of the settings that define a run's trajectory (not its length/logging;
    its length too under a decaying ``train.lr_schedule``, whose horizon it is)."""
    return hashlib.sha256(json.dumps(_hashed_settings(config), sort_keys=True).encode()).hexdigest()[:16]


def _hashed_settings(config: FlowalignConfig) -> dict:
    """The config as a dict of the settings :func:`config_hash` covers."""
    data = to_dict(config)
    decays = data["train"].get("lr_schedule", "constant") != "constant"  # a decay's horizon is the run length
    for section, key in _HASH_EXCLUDE:
        if not (decays and (section, key) == ("train", "iterations")):
            data[section].pop(key, None)
    for (section, key), value in _HASH_OMIT_AT.items():
        if data[section].get(key) == value:
            data[section].pop(key)
    for entry in data["rewards"]:  # the same for keys of a reward entry
        if entry.get("label") is None:
            entry.pop("label", None)
        entry.pop("batch_size", None)  # how many samples a call scores, not what it scores
    return data


def config_diff(a: FlowalignConfig, b: FlowalignConfig, hashed_only: bool = False) -> list[str]:
    """Dotted keys whose values differ between ``a`` and ``b`` (for resume warnings); with ``hashed_only``
    only those :func:`config_hash` covers, the settings that change what a run computes."""

    def flat(d: Any, prefix: str = "") -> dict:
        if isinstance(d, dict):
            out = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}.{k}" if prefix else k))
            return out
        return {prefix: d}

    view = _hashed_settings if hashed_only else to_dict
    fa, fb = flat(view(a)), flat(view(b))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
