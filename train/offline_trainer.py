"""Offline recipe: GDRO / Diffusion-DPO / AWM with LoRA from a rollout store (DESIGN.md §8, §9).

    flowalign generate --config train/configs/toy_generate.yaml   # once: samples + rewards -> store
    flowalign offline --config train/configs/toy_gdro.yaml        # any number of times

One step::

    store.batches(k, groups_per_batch)   P groups of k clean latents + explicit rewards
      -> encode the P prompts, repeat k times (rows p*k + j)
      -> objective.loss(OfflineBatch, policy, reference)   reference = LoRA disabled
      -> LoraOptimizer: lr schedule, backward, clip, AdamW step (a NaN/inf loss or gradient
         skips the step; max_nonfinite_steps in a row stop the run), metrics.csv (+ TensorBoard),
         checkpoint every N steps
    end: pytorch_lora_weights.safetensors, training_curve.png

No sampling happens while training: the cost is one policy forward + backward and one reference
forward per stored sample and step (``train/nfe`` counts the forwards, CFG twice). Single
process; checkpoints hold LoRA + optimizer + RNG + step and ``resume`` replays the batch order.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from flowalign import checkpoint as ckpt
from flowalign import lora as lora_lib
from flowalign.config import LOG_BACKENDS, LORA_OMIT_AT, MODEL_MEMORY_KNOBS, LoraConfig, ModelConfig, apply_overrides, build_dataclass, dump_yaml, to_dict
from flowalign.errors import ConfigError, RolloutStoreError
from flowalign.files import write_text_atomic
from flowalign.lr_schedule import LR_SCHEDULES
from flowalign.objectives.awm import is_awm
from flowalign.objectives.base import OfflineBatch, checked_loss, objective_state, restore_objective_state
from flowalign.offline import LATER_SETTINGS, RolloutStore
from flowalign.train.graceful_stop import GracefulStop
from flowalign.train.lora_export import checkpoint_export, save_lora_file, trained_modules
from flowalign.train.lora_optimizer import LoraOptimizer, OptimizerViews, nothing_stepped
from flowalign.train.run_log import RunLogger, check_trackers
from flowalign.train.update_conditioning import UpdateConditioning

logger = logging.getLogger(__name__)

__all__ = ["OfflineConfig", "OfflineTrainer", "load_offline_config", "offline_config_hash", "prepare_offline_dir", "main"]
OFFLINE_OBJECTIVES = ("awm", "diffusion_dpo", "gdro")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class OfflineConfig:
    """An offline (GDRO / Diffusion-DPO / AWM) run over a rollout store."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(pretrained="toy"), metadata={"help": "The pipeline the store was generated with."})
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(rank=8, alpha=16.0), metadata={"help": "LoRA settings."})
    store: str = field(default="runs/rollouts_toy", metadata={"help": "Rollout store folder written by `flowalign generate`."})
    objective: str = field(default="gdro", metadata={"help": f"One of {OFFLINE_OBJECTIVES}, or your own: a dotted path 'package.module:Class' or a 'flowalign.objectives' entry point."})
    objective_kwargs: dict = field(default_factory=dict, metadata={"help": "Objective arguments, e.g. {beta: 6, tau: 0.05, gamma: 1.0}."})
    k: Optional[int] = field(default=None, metadata={"help": "Samples per group; null = the store's samples_per_prompt."})
    reward: Optional[str] = field(default=None, metadata={"help": "Stored reward used as the explicit reward; null = the only one, or 'total'."})
    groups_per_batch: int = field(default=4, metadata={"help": "Prompt groups per optimizer step (P)."})
    epochs: int = field(default=1, metadata={"help": "Passes over the store."})
    max_steps: Optional[int] = field(default=None, metadata={"help": "Stop after this many optimizer steps (null = all epochs)."})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    lr_schedule: str = field(default="constant", metadata={"help": "Learning-rate schedule over the run's steps: constant, linear or cosine (flowalign.lr_schedule)."})
    lr_warmup: int = field(default=0, metadata={"help": "Steps of linear warmup before the schedule, each below the full rate: (i + 1) / (lr_warmup + 1) at step i (0 = none; Diffusion-DPO warms up)."})
    lr_min_ratio: float = field(default=0.0, metadata={"help": "Floor of a linear or cosine decay, as a fraction of lr (reached on the last step)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the LoRA gradient norm (0 = off)."})
    max_nonfinite_steps: int = field(default=5, metadata={"help": "Abort after this many consecutive steps with a NaN/inf loss or gradient (each is skipped)."})
    guidance_scale: float = field(default=1.0, metadata={"help": "CFG scale of the policy/reference velocities in the loss (1 = conditional only)."})
    seed: int = field(default=0, metadata={"help": "Seeds the batch order and the sigma/noise draws."})
    output_dir: str = field(default="runs/offline_gdro", metadata={"help": "metrics.csv, logs/ (TensorBoard), checkpoints/, pytorch_lora_weights.safetensors, training_curve.png."})
    checkpoint_every: int = field(default=0, metadata={"help": "Checkpoint every N steps (0 = only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept."})
    device: str = field(default="cpu", metadata={"help": "Training device."})
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={"help": "Trackers besides metrics.csv: tensorboard, wandb."})
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar over the optimizer steps."})

    def __post_init__(self):
        _check_offline_objective(self.objective)
        _check(self.k is None or self.k >= 2, f"k must be null or >= 2, got {self.k}")
        for name in ("groups_per_batch", "epochs", "keep_checkpoints", "max_nonfinite_steps"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be null or >= 1, got {self.max_steps}")
        _check(self.lr > 0 and self.weight_decay >= 0 and self.max_grad_norm >= 0, f"need lr > 0, weight_decay >= 0, max_grad_norm >= 0; got {self.lr}, {self.weight_decay}, {self.max_grad_norm}")
        _check(self.guidance_scale >= 1.0, f"guidance_scale must be >= 1, got {self.guidance_scale}")
        _check(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        _check(self.lr_schedule in LR_SCHEDULES, f"lr_schedule={self.lr_schedule!r} is not one of {list(LR_SCHEDULES)}")
        _check(self.lr_warmup >= 0 and 0.0 <= self.lr_min_ratio <= 1.0, f"need lr_warmup >= 0 and lr_min_ratio in [0, 1]; got {self.lr_warmup}, {self.lr_min_ratio}")
        for backend in self.log_with:
            _check(backend in LOG_BACKENDS, f"log_with entry {backend!r} is not one of {list(LOG_BACKENDS)}")
        _check_objective_kwargs(self.objective, self.objective_kwargs)


def _same_lora_file(stored: str, init_from: Optional[str]) -> bool:
    """Whether the LoRA a store was drawn with (its recorded path) holds the bytes of ``init_from``; True when the
    recorded file is gone (nothing to compare: the store keeps only the combined fingerprint)."""
    from flowalign.checkpoint import sha256_file
    from flowalign.lora import LORA_WEIGHT_NAME
    from flowalign.train.model import resolve_path

    def file_of(path) -> Path:
        path = resolve_path(path)
        return path / LORA_WEIGHT_NAME if path.is_dir() else path

    stored_file = file_of(stored)
    if init_from is None or not stored_file.is_file():
        return True
    init_file = file_of(init_from)
    return init_file.is_file() and sha256_file(stored_file) == sha256_file(init_file)


def _check_offline_objective(name: str) -> None:
    """ConfigError unless ``name`` is a built-in offline objective or one of the user's (a dotted path or an
    entry point, :func:`flowalign.objectives.resolve_objective`) whose class says ``trained_by`` ``flowalign offline``."""
    if name in OFFLINE_OBJECTIVES:
        return
    from flowalign.objectives import OFFLINE_TRAINER, available_objectives, resolve_objective, trained_by

    _check(":" in name or "." in name or name in available_objectives(),
           f"objective={name!r} is not one of {list(OFFLINE_OBJECTIVES)}, a dotted path 'package.module:Class' or an entry point "
           "of group 'flowalign.objectives'")
    resolve_objective(name)
    _check(OFFLINE_TRAINER in trained_by(name), f"objective {name!r} is not trained by `{OFFLINE_TRAINER}` (its class's trained_by "
                                               f"is {trained_by(name)}); set trained_by = \"{OFFLINE_TRAINER}\" on a class whose loss takes an "
                                               "OfflineBatch")


def _check_objective_kwargs(objective: str, kwargs: dict) -> None:
    """ConfigError, when the recipe loads (before the store or the model), for ``objective_kwargs`` the
    objective's constructor does not take or refuses (building an objective loads nothing)."""
    from flowalign.objectives import get_objective

    built = get_objective(objective, **kwargs)  # ConfigError: "bad arguments {...} for objective 'awm': ..."
    _check(not getattr(built, "needs_ema", False), f"objective_kwargs of {objective}: ema_beta needs the EMA of the online trainer "
                                                   "(flowalign train with train.ema); flowalign offline keeps none")
    online_only = sorted({"num_timesteps", "sigma_sampling"} & set(kwargs)) if is_awm(objective) else []
    _check(not online_only, f"objective_kwargs.{', '.join(online_only)}: online AWM's sigma draws (the trainer's); offline AWM "
                            "draws one sigma per sample and step from objective_kwargs.sigma_range")


def load_offline_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> OfflineConfig:
    """Read an offline recipe YAML (keys of :class:`OfflineConfig`) with ``key=value`` overrides.

    Raises:
        ConfigError: missing or invalid file, unknown key, wrong type or bad value (one line).
    """
    from flowalign.train.generate import read_yaml_mapping

    data = read_yaml_mapping(path, "offline") if path is not None else {}
    return build_dataclass(OfflineConfig, apply_overrides(data, list(overrides or []), schema=OfflineConfig))


# keys that do not change what an offline run computes: its length (a decaying schedule's horizon is checked on
# its own), where it writes, what it logs, the device
_HASH_EXCLUDE = ("epochs", "max_steps", "output_dir", "checkpoint_every", "keep_checkpoints", "device", "log_with",
                 "progress", "max_nonfinite_steps")


def _hashed_settings(cfg: OfflineConfig, legacy: bool = False, with_store: bool = False) -> dict:
    data = {key: value for key, value in to_dict(cfg).items() if key not in _HASH_EXCLUDE
            and (key != "store" or with_store or legacy)}
    data["model"] = {key: value for key, value in data["model"].items() if key not in MODEL_MEMORY_KNOBS
                     and not (legacy and key in LATER_SETTINGS["model"] and value == LATER_SETTINGS["model"][key])}
    data["lora"] = {key: value for key, value in data["lora"].items() if not (key in LORA_OMIT_AT and value == LORA_OMIT_AT[key])}
    if data["model"].get("variant", "") is None:  # added after runs were checkpointed: left out at its default
        data["model"].pop("variant")
    return data


def offline_config_hash(cfg: OfflineConfig, legacy: bool = False, with_store: bool = False) -> str:
    """sha256 (16 hex digits) of the settings that define an offline run's steps: a checkpoint carries it and
    ``--resume`` refuses one written under other settings (objective, its kwargs, lr, seed, LoRA...). The store's
    path is not one of them: the checkpoint keeps the store's fingerprint (its settings and shard checksums), so a
    store moved or named otherwise resumes and another content is refused. ``with_store``: the hash of a run written
    before that (the path hashed too); ``legacy``: the hash of one written before ``model.adapter`` /
    ``adapter_kwargs`` existed (those keys at their defaults left out, the path hashed). A resume accepts both."""
    return hashlib.sha256(json.dumps(_hashed_settings(cfg, legacy, with_store), sort_keys=True, default=str).encode()).hexdigest()[:16]


def accepted_config_hashes(cfg: OfflineConfig) -> list[str]:
    """The config hashes a checkpoint of ``cfg``'s run may carry: today's, then the older forms'."""
    return [offline_config_hash(cfg), offline_config_hash(cfg, with_store=True), offline_config_hash(cfg, legacy=True)]


def prepare_offline_dir(run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Check that an offline run may start in ``run_dir``; True when an old run must be cleared.

    Writes nothing. A folder holding ``offline_config.yaml`` is an offline run.

    Raises:
        ConfigError: ``run_dir`` holds a run (or foreign files) and neither resume nor overwrite.
    """
    from flowalign.files import refuse_dangling_link
    from flowalign.train.run_dir import OFFLINE_RUN_ENTRIES, is_empty, refuse_foreign

    refuse_dangling_link(run_dir, "output_dir")
    if resume or is_empty(run_dir):
        return False
    if not (run_dir / "offline_config.yaml").is_file():
        raise ConfigError(f"output_dir {run_dir} is not empty and holds no flowalign offline run; choose another output_dir")
    if not overwrite:
        raise ConfigError(f"output_dir {run_dir} already holds an offline run; pass --resume to continue it or --overwrite to replace it")
    refuse_foreign(run_dir, OFFLINE_RUN_ENTRIES, key="output_dir")  # --overwrite deletes an offline run's files only
    return True


class _SingleProcess:
    """The one-process stand-in for an ``accelerate.Accelerator`` that :class:`LoraOptimizer` reads."""

    num_processes = 1


def optimizer_settings(cfg: OfflineConfig, total_steps: int) -> SimpleNamespace:
    """The ``train``-section fields :class:`LoraOptimizer` reads, from an offline recipe whose
    schedule spans ``total_steps`` optimizer steps (AdamW's default betas and eps; no EMA, no old policy, fp32)."""
    return SimpleNamespace(
        lr=cfg.lr, lr_schedule=cfg.lr_schedule, iterations=total_steps, lr_warmup=cfg.lr_warmup, lr_min_ratio=cfg.lr_min_ratio,
        adam_betas=(0.9, 0.999), adam_eps=1e-8, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        max_nonfinite_steps=cfg.max_nonfinite_steps, ema=False, ema_decay=0.0, old_policy_rate=0.0, mixed_precision="no",
    )


class OfflineTrainer(OptimizerViews):
    """setup / train / save over a rollout store. ``adapter`` may be passed pre-built (tests, bench).

    Args:
        resume: True continues from the newest valid checkpoint in ``output_dir/checkpoints``
            (:class:`CheckpointError` when there is none); a checkpoint folder continues from that one.
        overwrite: replace a run already in ``output_dir`` (cleared only once setup succeeded).
    """

    def __init__(self, config: OfflineConfig, adapter=None, resume: Union[bool, str, Path] = False, overwrite: bool = False):
        self.config, self.adapter, self.resume, self.overwrite = config, adapter, resume, overwrite
        self.run_dir = Path(config.output_dir)
        self.step, self.nfe, self.seconds = 0, 0, 0.0
        self._saved_step = -1
        self.unapplied_steps = 0  # steps of the last train() call with an all-zero gradient (tied groups), not applied
        self.text_modules: dict = {}  # text encoders with LoRA (lora.train_text_encoder), filled by setup
        self.reference_lora: Optional[lora_lib.LoraSnapshot] = None  # lora.reference: init, filled by setup
        self.run_log: Optional[RunLogger] = None  # metrics.csv + trackers, opened by setup
        self._lock = None  # the run folder's lock, taken by setup

    def _check_store(self) -> None:
        """Store-dependent settings (k, reward) checked before the model is built."""
        cfg = self.config
        self.store = RolloutStore(cfg.store)
        if not self.store.is_complete:
            logger.warning("rollout store %s is incomplete (rerun `flowalign generate` to finish it)", cfg.store)
        if not self.store.entries:
            raise ConfigError(f"store {cfg.store} holds no samples yet (run `flowalign generate` first)")
        try:
            self.store.verify()  # every shard's sha256, before the model loads (an epoch would find a bad one mid-run)
        except RolloutStoreError as exc:
            raise RolloutStoreError(f"{exc}; rerun the `flowalign generate` that wrote the store: it draws damaged shards again",
                                    exc.shard) from None
        per_prompt = int(self.store.settings["samples_per_prompt"])
        self.k = cfg.k or per_prompt
        if self.k > per_prompt:
            raise ConfigError(f"k={self.k} but store {cfg.store} has {per_prompt} samples per prompt")
        try:
            self.reward = self.store.resolve_reward(cfg.reward)  # the explicit reward the run trains on
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.store.num_groups(self.k, self.reward) == 0:  # before the schedule's checks, which would blame the step count
            raise ConfigError(f"store {cfg.store} holds no group of k={self.k} samples of one prompt whose {self.reward!r} "
                              "rewards are all finite (samples dropped under on_error: drop have none); lower k or regenerate")

    def _check_generating_model(self) -> None:
        """Compare the model with the one that generated the store (its fingerprint, when the store was drawn
        from a base model without a LoRA). AWM's offline ratio takes the store's model as the old policy, so a
        mismatch is refused; GDRO and Diffusion-DPO are sampler-independent, so they only warn."""
        settings = self.store.settings
        stored = settings.get("model_hash")
        lcfg = self.config.lora
        if settings.get("lora") and lcfg.reference != "init":
            logger.warning("store %s was generated with the LoRA %s, and this run's reference is the base model (lora.reference: "
                           "base)%s; for a next round on that LoRA's samples set lora.init_from to it and lora.reference=init",
                           self.config.store, settings["lora"], "" if lcfg.init_from else ", starting from a fresh LoRA")
        elif settings.get("lora") and not _same_lora_file(settings["lora"], lcfg.init_from):
            message = (f"store {self.config.store} was generated with the LoRA {settings['lora']}, whose file differs from "
                       f"lora.init_from={lcfg.init_from}, this run's reference")
            if is_awm(self.config.objective):
                raise ConfigError(message + ": offline AWM takes the LoRA that drew the store as its old policy; start from that file")
            logger.warning("%s; %s is sampler-independent, so training goes on", message, self.config.objective)
        if not stored or stored == "custom-sample-fn" or settings.get("lora"):
            return  # nothing comparable recorded
        from flowalign.train.generate import model_fingerprint

        if model_fingerprint(self.adapter.trainable_module) == stored:
            return
        cfg = self.config
        generated_by = (settings.get("model") or {}).get("pretrained", "?")
        stored_dtype = (settings.get("model") or {}).get("dtype")
        if stored_dtype is not None and stored_dtype != cfg.model.dtype:  # the same weights, rounded otherwise
            message = (f"store {cfg.store} was generated with model.dtype={stored_dtype!r}, this run loads {cfg.model.dtype!r}: "
                       f"its weights (fingerprint {stored[:12]}...) differ; set model.dtype={stored_dtype}")
        else:
            message = (f"store {cfg.store} was generated by another model (model.pretrained={generated_by!r}, weights fingerprint "
                       f"{stored[:12]}...) than model.pretrained={cfg.model.pretrained!r}")
        if is_awm(cfg.objective):
            raise ConfigError(message + ": offline AWM takes the generating model as its old policy; train the model that drew the store")
        logger.warning("%s; %s is sampler-independent, so training goes on", message, cfg.objective)

    def setup(self) -> "OfflineTrainer":
        """Check the run folder and the store, build model + LoRA + optimizer, restore a checkpoint.

        Nothing is written (and an ``--overwrite``-n run is not cleared) until every part is built.
        """
        from flowalign.train.run_lock import setup_lock

        with setup_lock(self.run_dir, self.resume) as self._lock:  # one run per folder (train/run_lock.py)
            return self._setup()

    def _setup(self) -> "OfflineTrainer":
        from flowalign.errors import CheckpointError
        from flowalign.objectives import get_objective, takes_keyword

        from flowalign.train.runtime import check_device

        self.config = cfg = build_dataclass(OfflineConfig, to_dict(self.config))  # validated again: edited after it was built?
        check_device(cfg.device, "device")  # a typo or a missing accelerator: one line, before anything loads
        latest = None
        if self.resume:
            from flowalign.train.run_dir import never_checkpointed, refuse_other_kind

            refuse_other_kind(self.run_dir, "offline")
            chosen = Path(self.resume) if isinstance(self.resume, (str, Path)) else None
            if chosen is not None and not (chosen / ckpt.MANIFEST).is_file():
                raise CheckpointError(f"resume={chosen}: not a checkpoint folder (pass True to resume output_dir's newest)")
            latest = chosen if chosen is not None else ckpt.find_latest(self.run_dir / "checkpoints")
            if latest is None and not ((self.run_dir / "offline_config.yaml").is_file() and never_checkpointed(self.run_dir)):
                raise CheckpointError(f"--resume: no valid checkpoint under {self.run_dir / 'checkpoints'}")
            if latest is None:  # stopped before its first checkpoint: nothing trained is lost, start it again
                logger.warning("--resume: %s holds an offline run stopped before its first checkpoint: starting it again from "
                               "step 0", self.run_dir)
        clear = prepare_offline_dir(self.run_dir, latest is not None, self.overwrite or self.resume)
        check_trackers(cfg.log_with, key="log_with")
        self._check_store()
        from flowalign.train.trainer_setup import check_lora_start, start_lora

        check_lora_start(cfg.lora, resuming=latest is not None)
        if latest is not None:
            from flowalign.train.run_dir import refuse_past_the_end

            refuse_past_the_end(latest, self.total_steps, unit="step", limit="the run's {n} steps (epochs x batches, capped by max_steps)",
                                fix="raise epochs or max_steps so the run has {done} steps or more")
        self.generator = torch.Generator().manual_seed(cfg.seed)  # sigma / noise draws of the objective
        # the kwargs were checked when the config was built (_check_objective_kwargs); get_objective raises ConfigError itself
        extra = {"generator": self.generator} if takes_keyword(cfg.objective, "generator") else {}
        self.objective = get_objective(cfg.objective, **extra, **cfg.objective_kwargs)
        from flowalign.train.runtime import seed_global_rngs

        seed_global_rngs(cfg.seed)  # LoRA init (peft draws from torch's global RNG); Python's and numpy's for plugins
        self.device = torch.device(cfg.device)
        if self.adapter is None:
            from flowalign.train.model import build_adapter

            self.adapter = build_adapter(cfg.model, self.device)
        latent = tuple(self.adapter.initial_noise(1).shape[1:])
        if self.store.latent_shape is not None and tuple(self.store.latent_shape) != latent:
            raise ConfigError(f"store {cfg.store} holds latents {tuple(self.store.latent_shape)} but the model makes {latent}")
        self._check_generating_model()
        module = self.adapter.trainable_module
        targets = cfg.lora.target_modules or self.adapter.lora_target_modules
        transformer_params = lora_lib.add_lora(module, cfg.lora.rank, cfg.lora.alpha, targets, cfg.lora.init, cfg.lora.dropout)
        self.text_modules, text_params = lora_lib.add_text_lora(self.adapter, cfg.lora) if cfg.lora.train_text_encoder else ({}, [])
        self.reference_lora = start_lora(cfg.lora, {"transformer": module, **self.text_modules}, resuming=latest is not None)
        self.conditioning = UpdateConditioning(self.adapter, self.text_modules, classifier_free=cfg.guidance_scale > 1.0, device=self.device,
                                               reference_lora=self.reference_lora)
        groups = [{"params": transformer_params, "lr_ratio": 1.0}]
        if text_params:
            groups.append({"params": text_params, "lr_ratio": (cfg.lora.text_encoder_lr or cfg.lr) / cfg.lr})
        total = self.total_steps
        if cfg.lr_warmup >= total:
            raise ConfigError(f"lr_warmup={cfg.lr_warmup} must be below the run's {total} steps")
        self.optim = LoraOptimizer(groups, optimizer_settings(cfg, total), _SingleProcess(), self.device.type, gather=lambda t: t,
                                   prefix="", unit="step", model_dtype=next(module.parameters()).dtype)
        if latest is not None:
            self._load(latest)
            self._saved_step = self.step
        if clear:
            from flowalign.train.run_dir import OFFLINE_RUN_ENTRIES, clear_run_dir

            clear_run_dir(self.run_dir, OFFLINE_RUN_ENTRIES)  # an offline run's own files only
        from flowalign.train.run_dir import remove_interrupted_writes

        remove_interrupted_writes(self.run_dir)  # a killed run's temporary files (each write picks fresh names)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_dir / "offline_config.yaml", dump_yaml(to_dict(cfg)))  # as config.yaml
        self.run_log = RunLogger(self.run_dir, cfg.log_with, to_dict(cfg), key="step", resumed_at=self.step if latest is not None else None)
        return self

    @property
    def lora_modules(self) -> dict:
        """``{component: module}`` of every module with trained LoRA (``transformer`` first)."""
        return trained_modules(self.adapter, self.text_modules)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: ``epochs * ceil(groups / groups_per_batch)``, capped by ``max_steps``."""
        per_epoch = -(-self.store.num_groups(self.k, self.reward) // self.config.groups_per_batch)
        total = self.config.epochs * per_epoch
        return total if self.config.max_steps is None else min(total, self.config.max_steps)

    # ------------------------------------------------------------------ one step

    def velocity_fns(self, prompts: list[str]) -> tuple[Callable, Callable]:
        """Policy (LoRA on) and reference (LoRA off, or the starting LoRA under ``lora.reference: init``) velocities for
        rows ``p*k + j``; counts NFE.

        With ``lora.train_text_encoder`` the policy's prompts are encoded with gradient through the
        text encoders' LoRA and the reference's with every LoRA off."""
        w = self.config.guidance_scale
        if self.text_modules:  # the online update's encoding: each distinct prompt once, rows gathered (train/update_conditioning.py)
            rows = [p for p in prompts for _ in range(self.k)]
            cond, reference_cond = self.conditioning.encode_rows(rows), self.conditioning.reference_rows(rows, rows)
        else:
            cond = reference_cond = self.adapter.encode(prompts, do_classifier_free_guidance=w > 1.0).repeat_interleave(self.k)
        module, factor = self.adapter.trainable_module, 2 if w > 1.0 else 1

        def rows(x: Tensor) -> Any:
            # offline objectives evaluate every row p*k + j of the batch in one call
            return cond if x.shape[0] == cond.batch_size else None

        def policy(x: Tensor, sigma: Tensor) -> Tensor:
            c = rows(x)
            if c is None:
                raise ValueError(f"policy called on {x.shape[0]} rows, conditioning has {cond.batch_size}")
            self.nfe += factor * x.shape[0]
            return self.adapter.velocity(x, sigma, c, guidance_scale=w)

        def reference(x: Tensor, sigma: Tensor) -> Tensor:
            c = rows(x)
            if c is None:
                raise ValueError(f"reference called on {x.shape[0]} rows, conditioning has {cond.batch_size}")
            self.nfe += factor * x.shape[0]
            with torch.no_grad(), lora_lib.reference_weights(self.reference_lora, module):
                return self.adapter.velocity(x, sigma, reference_cond, guidance_scale=w)

        return policy, reference

    def train_step(self, batch: OfflineBatch, prompts: list[str]) -> dict[str, float]:
        """One optimizer step on ``P`` groups; returns the step's metrics."""
        t0 = time.perf_counter()
        batch = OfflineBatch(x0=batch.x0.to(self.device), rewards=batch.rewards.to(self.device), cond_index=batch.cond_index)
        self.optim.set_lr(self.step)
        with lora_lib.lora_dropout_active(self.adapter.trainable_module, *self.text_modules.values()):  # lora.dropout acts in the gradient forward only
            policy, reference = self.velocity_fns(prompts)
            loss, metrics = checked_loss(self.objective.loss(batch, policy, reference), self.config.objective)
        stats = self.optim.new_stats()
        self.optim.optimizer.zero_grad(set_to_none=True)
        if self.optim.backward(loss, f"({self.config.objective})"):  # a non-finite loss is skipped and counted
            self.optim.step(stats)  # clip; a non-finite gradient norm skips the step and is counted
        self.step += 1  # a skipped step still consumes its batch: a resume replays the same order
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        rows = batch.x0.shape[0] * batch.x0.shape[1]  # P groups x k samples
        return {"step": self.step, "loss": loss.item(), **self.optim.metrics(stats), "train/nfe": float(self.nfe),
                "train/seconds": self.seconds, "time/step": seconds, "perf/samples_per_s": rows / max(seconds, 1e-9), **metrics}

    # ------------------------------------------------------------------ loop

    def _epoch_batches(self, epoch: int, skip: int = 0):
        order = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        return self.store.batches(self.k, self.config.groups_per_batch, self.reward, shuffle=True, generator=order, skip=skip)

    def _pending_batches(self):
        """``(epoch, batch, groups)`` of the steps still to run: the epochs' batches in their seeded
        order, without the steps a resumed checkpoint already did (not read: each epoch's order comes
        from its own seed), up to ``max_steps``."""
        cfg = self.config
        per_epoch = -(-self.store.num_groups(self.k, self.reward) // cfg.groups_per_batch)
        for epoch in range(cfg.epochs):
            skip = min(max(self.step - epoch * per_epoch, 0), per_epoch)  # batches of this epoch a resume already did
            if skip == per_epoch:
                continue
            for batch, groups in self._epoch_batches(epoch, skip):
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    return
                yield epoch, batch, groups

    def train(self, callback: Optional[Callable[["OfflineTrainer", dict], None]] = None) -> list[dict]:
        """Run the epochs (skipping the steps a resumed checkpoint already did); returns metrics.

        Each step's metrics go to ``metrics.csv`` (replacing rows a resume replays) and to the
        trackers (``log_with``); a tqdm bar counts the steps when ``progress`` is on.

        Raises:
            TrainingStopped: a SIGINT / SIGTERM asked to stop (train/graceful_stop.py): the step
                under way finished and was checkpointed; ``--resume`` continues it.
        """
        cfg, history = self.config, []
        if self.run_log is None:
            raise RuntimeError("OfflineTrainer.train() before setup()")
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="offline " + cfg.objective, unit="step")
        try:
            with GracefulStop("step") as stop:
                for epoch, batch, groups in self._pending_batches():
                    metrics = {"epoch": epoch, **self.train_step(batch, [g.prompt for g in groups])}
                    history.append(metrics)
                    self.run_log.log({k: v for k, v in metrics.items() if k != "step"}, self.step)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{metrics['loss']:.4g}")
                    if callback is not None:
                        callback(self, metrics)
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if stop.signum is not None and self.step < self.total_steps:
                        path = self.save_checkpoint() if self.step > self._saved_step else ckpt.find_latest(self.run_dir / "checkpoints")
                        raise stop.stopped(stop.signum, self.step, self.total_steps, path,
                                           resume=f"flowalign offline --resume {shlex.quote(str(self.run_dir))}")
        except RolloutStoreError:  # a shard damaged since setup checked it: keep the steps done
            if self.step > self._saved_step:
                path = self.save_checkpoint()
                logger.error("the store failed at step %d; the steps done are checkpointed in %s: repair the store (rerun its "
                             "`flowalign generate`) and continue with `flowalign offline --resume %s`", self.step, path,
                             shlex.quote(str(self.run_dir)))
            raise
        finally:
            if bar is not None:
                bar.close()
        if self.step > self._saved_step:  # the end of a run is always resumable (e.g. with more epochs)
            self.save_checkpoint()
        if history and self.optim.steps_taken == 0:  # every step skipped as non-finite, each streak under the limit
            raise nothing_stepped(f"{self.step} steps", columns="loss and grad_norm")
        self.unapplied_steps = int(sum(m.get("optim/skipped_zero", 0.0) for m in history))
        if self.unapplied_steps:
            zero = [m for m in history if m.get("optim/skipped_zero", 0.0) > 0]
            tied = sum(1 for m in zero if m.get("gdro/frac_tied_groups", 0.0) >= 1.0 or m.get("dpo/num_pairs", 1.0) == 0)
            ranked = sum(1 for m in zero if "gdro/frac_tied_groups" in m or "dpo/num_pairs" in m) - tied  # a ranking, yet 0
            logger.warning("%d of the %d steps run had an all-zero gradient and were not applied: %d with every group of the batch "
                           "tied on %r (a denser reward, such as a verifier's '<name>/partial', a larger k or more groups_per_batch "
                           "give more steps a ranking), %d with a loss saturated at its optimum (%s: a preference margin far past "
                           "the sigmoid's range; a smaller objective_kwargs.beta)%s", self.unapplied_steps, len(history), tied,
                           self.reward, ranked, cfg.objective,
                           "" if tied + ranked == len(zero) else f", {len(zero) - tied - ranked} of an objective that reports "
                           "neither (all-equal rewards in every group give every advantage 0)")
        return history

    # ------------------------------------------------------------------ save / resume

    def save_checkpoint(self) -> Path:
        """Atomic checkpoint of the LoRA (and text-encoder LoRA), optimizer, RNG and counters, with the
        ``pytorch_lora_weights.safetensors`` the run would save now (:mod:`flowalign.train.lora_export`)."""
        tensors = {"lora": lora_lib.get_lora_state_dict(self.adapter.trainable_module)}
        tensors.update(lora_lib.text_lora_tensors(self.text_modules))
        if self.reference_lora is not None:  # lora.reference: init: the start, so a resume needs no lora.init_from file
            tensors.update(self.reference_lora.state())
        optim_tensors, optim_state = self.optim.state()
        tensors.update(optim_tensors)
        state = {"step": self.step, "nfe": self.nfe, "seconds": self.seconds, **optim_state, "schedule_steps": self.optim.cfg.iterations,
                 "rng": ckpt.capture_rng({"objective": self.generator}), "store_fingerprint": self.store.fingerprint}
        saved = objective_state(self.objective)
        if saved is not None:  # a plugin objective's own state
            state["objective"] = saved
        if isinstance(getattr(self.objective, "beta", None), (int, float)):  # what the run trains with, defaults included
            state["objective_beta"] = float(self.objective.beta)
        try:
            path = ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, tensors, state, keep=self.config.keep_checkpoints,
                                        config_hash=offline_config_hash(self.config),
                                        export=checkpoint_export(self.adapter, self.lora_modules))
        except OSError as exc:  # disk full, quota, permissions: the temporary folder is already removed
            raise ckpt.write_error(self.run_dir / "checkpoints", self.step, exc) from exc
        self._saved_step = self.step
        return path

    def _load(self, path: Path) -> None:
        from flowalign.errors import CheckpointError

        expected = offline_config_hash(self.config)
        try:  # a run written before the store's path left the hash, or before model.adapter existed: an older form
            saved_hash = json.loads((path / ckpt.MANIFEST).read_text(encoding="utf-8")).get("config_hash")
            if saved_hash in accepted_config_hashes(self.config):
                expected = saved_hash
        except (OSError, ValueError, AttributeError):
            pass  # a damaged manifest: load_checkpoint names what is wrong
        try:
            loaded = ckpt.load_checkpoint(path, expected_config_hash=expected)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}{self._changed_settings()}; resume with the run's settings or start a new output_dir") from None
        saved_store = loaded.state.get("store_fingerprint")  # absent from checkpoints before it
        if saved_store is not None and saved_store != self.store.fingerprint:
            raise CheckpointError(f"checkpoint {path} was trained on another content of store {self.config.store} (regenerated or "
                                  "finished since: other settings or shards); resuming would replay other groups. Start a new "
                                  "output_dir (or --overwrite)")
        saved_total, total = loaded.state.get("schedule_steps"), self.optim.cfg.iterations
        if self.config.lr_schedule != "constant" and saved_total is not None and saved_total != total:
            raise ConfigError(f"checkpoint {path} follows a {self.config.lr_schedule} lr schedule over {saved_total} steps, "
                              f"this config's run has {total}: resume with the same epochs and max_steps")
        lora_lib.set_lora_state_dict(self.adapter.trainable_module, loaded.tensors["lora"])
        lora_lib.load_text_lora_tensors(self.text_modules, loaded.tensors, path)
        if self.reference_lora is not None:
            self.reference_lora.load_state(loaded.tensors, path)
        self.optim.load(loaded.tensors, loaded.state, path)
        ckpt.restore_rng(loaded.state["rng"], {"objective": self.generator})
        restore_objective_state(self.objective, loaded.state.get("objective"), path)
        self._keep_the_runs_beta(loaded.state, path)
        self.step, self.nfe, self.seconds = int(loaded.state["step"]), int(loaded.state["nfe"]), float(loaded.state["seconds"])
        logger.info("resumed offline run from %s at step %d", path, self.step)

    def _keep_the_runs_beta(self, state: dict, path: Path) -> None:
        """A resumed run keeps the ``beta`` it began with when the recipe leaves it to the objective's default and that
        default has moved since (Diffusion-DPO's, 6 -> 2500 on 2026-12-07; checkpoints from before it record no beta):
        the config hash covers ``objective_kwargs`` as written, not the defaults they fall back on."""
        from flowalign.objectives.diffusion_dpo import DiffusionDPO

        if "beta" in self.config.objective_kwargs or not isinstance(getattr(self.objective, "beta", None), (int, float)):
            return
        began = state.get("objective_beta")
        if began is None and isinstance(self.objective, DiffusionDPO):
            began = 6.0  # the default before the checkpoints recorded it
        if began is not None and float(began) != float(self.objective.beta):
            logger.warning("%s began with %s's default beta %g, which is now %g: it continues with %g (set objective_kwargs.beta "
                           "to choose)", path.parent.parent, self.config.objective, began, self.objective.beta, began)
            self.objective.beta = float(began)

    def _changed_settings(self) -> str:
        """``" (changed: a, b)"``: the hashed keys in which this config differs from the run's ``offline_config.yaml``."""
        try:
            before = _hashed_settings(load_offline_config(self.run_dir / "offline_config.yaml"))
        except (ConfigError, OSError):
            return ""
        now = _hashed_settings(self.config)
        changed = sorted(key for key in now.keys() | before.keys() if now.get(key) != before.get(key))
        return f" (changed: {', '.join(changed)})" if changed else ""

    def save_final(self) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` (diffusers format; with the text encoders'
        LoRA under ``text_encoder.`` / ``text_encoder_2.`` keys when trained) and
        ``training_curve.png`` (loss and the objective's ranking metrics per step) to ``output_dir``,
        and close the trackers."""
        path = save_lora_file(self.adapter, self.lora_modules, self.run_dir)  # as the online trainer saves
        self.write_training_curve()
        self.close()
        return path

    def write_training_curve(self) -> Optional[Path]:
        """``training_curve.png`` from ``metrics.csv``: the loss, and the implicit-reward accuracy
        and margin of GDRO / Diffusion-DPO (AWM: the likelihood ratio to the base model, its clipped
        fraction and the velocity gap to the base). None (with a warning) when there is nothing to plot."""
        from flowalign.plots import metric_panels

        csv_path = self.run_dir / "metrics.csv"
        if not csv_path.is_file():
            logger.warning("no metrics.csv in %s: no training_curve.png", self.run_dir)
            return None
        if is_awm(self.config.objective):
            panels = [("loss", ["loss"]), ("likelihood ratio to the base (mean)", ["awm/ratio_mean"]),
                      ("clipped fraction", ["awm/clipfrac"]), ("velocity gap to the base", ["kl/ref"])]
        elif self.config.objective not in OFFLINE_OBJECTIVES:  # the user's own: its loss
            panels = [("loss", ["loss"])]
        else:
            prefix = "gdro" if self.config.objective == "gdro" else "dpo"
            panels = [("loss", ["loss"]),
                      ("implicit reward: ranking accuracy", [f"{prefix}/implicit_acc"]),
                      ("implicit reward", ([f"{prefix}/implicit_reward_mean"] if prefix == "gdro" else []) + [f"{prefix}/margin"])]
        return metric_panels(csv_path, self.run_dir / "training_curve.png", panels, x="step")

    def close(self) -> None:
        """Flush and close the trackers and let the run folder go (``save_final`` closes the trackers; call it after a
        failed run)."""
        if self.run_log is not None:
            self.run_log.close()
            self.run_log = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m flowalign.train.offline_trainer ...``: the same as ``flowalign offline ...``."""
    from flowalign.train.cli import main as cli_main

    return cli_main(["offline", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
