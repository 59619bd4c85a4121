"""The online trainer's setup parts (DESIGN.md §9), each built from the config and returned.

``Trainer.setup`` calls them in this order, so bad input fails before the model is loaded::

    warn_about_launch      launcher settings the trainer does not apply (FSDP / ZeRO, mixed precision)
    build_prompt_data      training prompts (sharded per process), eval and held-out prompts
    build_rewards          the reward plugins, on the device (or offloaded)
    build_objective        the objective and the sampler's noise schedule
    check_reward_prompts   each reward refuses prompts it can never score (a verifier's grammar)
    build_model            adapter + LoRA (transformer, text encoders), update conditioning, optimizer
    warn_about_log_prob_sum   a summed log-prob over a latent too large for fp32 to resolve its ratio
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from flowalign import lora as lora_lib
from flowalign.config import FlowalignConfig, dense_method
from flowalign.errors import ConfigError
from flowalign.train import runtime
from flowalign.train.lora_optimizer import LoraOptimizer
from flowalign.train.model import build_adapter, resolve_path
from flowalign.train.update_conditioning import UpdateConditioning

logger = logging.getLogger(__name__)

# prompts used when train.prompts is null (the tiny random pipeline ignores their meaning)
DEMO_PROMPTS = ["a red square", "a blue circle", "a green triangle", "a yellow star", "two red circles",
                "a white square on the left", "a black circle", "a purple triangle"]


def warn_about_launch(accelerator, config: FlowalignConfig) -> None:
    """Warn about launcher settings the trainer does not apply (see train/accelerate/*.yaml)."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if not accelerator.is_main_process:
        return
    if kind in ("FSDP", "DEEPSPEED"):
        logger.warning("distributed_type %s: the frozen transformer is replicated and LoRA gradients all-reduced, "
                       "i.e. this runs like DDP (no sharding)", kind)
    if accelerator.mixed_precision not in ("no", None) and config.train.mixed_precision == "no":
        logger.warning("the launcher asks for mixed_precision=%s, which the trainer does not apply; "
                       "set train.mixed_precision=%s to autocast the transformer", accelerator.mixed_precision, accelerator.mixed_precision)


# latent size above which an fp32 sum of per-dimension log-probs cannot resolve a PPO ratio (its rounding,
# ~1e-7 of |sum| ~ D, passes clip ranges of 1e-4 near D = 1e3 already; measured 1e-3 at 65k dims, 0.5 at 2M)
SUM_LOG_PROB_MAX_DIMS = 4096


def warn_about_log_prob_sum(config: FlowalignConfig, adapter, accelerator) -> None:
    """Warn when ``sampling.log_prob_reduce: sum`` meets a latent too large for fp32 sums to resolve a log-ratio."""
    if config.sampling.log_prob_reduce != "sum" or not accelerator.is_main_process:
        return
    dims = adapter.initial_noise(1, torch.Generator().manual_seed(0)).numel()
    if dims > SUM_LOG_PROB_MAX_DIMS:
        logger.warning("sampling.log_prob_reduce=sum over %d latent dims: the fp32 rounding of the summed log-probs is far above "
                       "any clip range (about 1e-7 x %d per log-prob), so ratios are mostly rounding; use 'mean' (Flow-GRPO's)", dims, dims)


@dataclass
class PromptData:
    """The run's prompts.

    Attributes:
        sampler: ``PromptSampler`` over the training prompts, this process's shard of each iteration.
        eval_records: ``train.eval_num_prompts`` distinct eval prompts spread over their tags (in-training grids; a resumed run keeps its own).
        heldout_records: every prompt of ``train.eval_prompts`` (the held-out report), or None.
    """

    sampler: Any
    eval_records: list
    heldout_records: Optional[list]


def prompts_drawn_per_process(train_config, world: int) -> int:
    """Prompts each process rolls out per iteration: ``ceil(oversample · prompts_per_iter / world)``
    (``Trainer.advantages`` trains the first ``prompts_per_iter`` of all processes' groups with a signal)."""
    return math.ceil(train_config.oversample * (train_config.prompts_per_iter // world))


def build_prompt_data(config: FlowalignConfig, accelerator) -> PromptData:
    """Read ``train.prompts`` / ``train.eval_prompts`` and check them against the run's sizes.

    Raises:
        ConfigError: ``prompts_per_iter`` not divisible by the processes, or the held-out report
            asking for more samples than its sampling allows; PromptFileError for a bad file.
    """
    from flowalign.prompts import PromptRecord, PromptSampler, load_prompts, spread_records

    cfg = config.train
    world = accelerator.num_processes
    if cfg.prompts_per_iter % world:
        raise ConfigError(f"train.prompts_per_iter={cfg.prompts_per_iter} must be divisible by the {world} processes")
    drawn, alone = world * prompts_drawn_per_process(cfg, world), prompts_drawn_per_process(cfg, 1)
    if drawn != alone:  # the prompt window, the sampler's position and so the run would depend on the process count
        raise ConfigError(f"train.oversample={cfg.oversample:g} draws {alone} prompts per iteration on one process but "
                          f"{drawn} over {world} ({drawn // world} each): choose it so that oversample x prompts_per_iter "
                          f"({cfg.oversample * cfg.prompts_per_iter:g}) / {world} is a whole number")
    records = load_prompts(resolve_path(cfg.prompts)) if cfg.prompts else [PromptRecord(p) for p in DEMO_PROMPTS]
    sampler = PromptSampler(records, prompts_drawn_per_process(cfg, world), seed=cfg.seed, num_shards=world, shard_index=accelerator.process_index)
    most = alone * cfg.max_sampling_rounds  # sample-until-full's windows of one iteration
    if cfg.max_sampling_rounds > 1 and alone <= len(records) < most and accelerator.process_index == 0:
        logger.warning("train.max_sampling_rounds=%d may draw up to %d prompts in an iteration from a set of %d: a later window can "
                       "draw a prompt again (a group that was flat will likely be flat again)", cfg.max_sampling_rounds, most, len(records))
    eval_records = load_prompts(resolve_path(cfg.eval_prompts)) if cfg.eval_prompts else records
    if cfg.eval_prompts and 0 < cfg.final_eval_samples < len(eval_records):  # the held-out report's check, before any training
        raise ConfigError(f"train.final_eval_samples={cfg.final_eval_samples} is below the {len(eval_records)} prompts of "
                          f"train.eval_prompts ({cfg.eval_prompts}): the held-out report evaluates every prompt at least once; "
                          f"set it to 0 (no report) or >= {len(eval_records)}")
    return PromptData(sampler=sampler, eval_records=spread_records(eval_records, cfg.eval_num_prompts),
                      heldout_records=eval_records if cfg.eval_prompts else None)


def build_rewards(config: FlowalignConfig, device: torch.device) -> dict[str, Any]:
    """``{name: reward}`` for every configured reward, moved to ``device`` (or offloaded to the CPU
    with ``train.offload_rewards``). Raises RewardError / ConfigError for an unknown one."""
    from flowalign.rewards import load_reward

    rewards = {r.key: load_reward(r.name, **r.kwargs) for r in config.rewards}
    for reward in rewards.values():
        if hasattr(reward, "to"):
            reward.offload() if config.train.offload_rewards and hasattr(reward, "offload") else reward.to(device)
    return rewards


def check_reward_prompts(config: FlowalignConfig, rewards: dict, drift_reward, data: "PromptData") -> None:
    """Let each reward refuse prompts it can never score (``Reward.check_prompts``: a verifier's grammar) before
    the model loads: every reward with ``on_error: raise`` the training prompts (under ``drop`` such samples are
    meant to be dropped), the report's (``train.report_reward``, else the first) the held-out prompts when it raises on
    a failed sample, the drift reward the training prompts. The in-training eval drops failed samples, so its prompts
    are not checked."""
    from flowalign.rewards.base import check_reward_prompts as check
    from flowalign.train.final_outputs import report_entry

    for rcfg in config.rewards:
        if rcfg.on_error == "raise":
            check(rewards[rcfg.key], data.sampler.records, rcfg.key, "training prompts (train.prompts)")
    reported = report_entry(config)
    if reported.on_error == "raise" and data.heldout_records and config.train.final_eval_samples > 0:
        check(rewards[reported.key], data.heldout_records, reported.key, "held-out prompts (train.eval_prompts)")
    if drift_reward is not None:
        check(drift_reward, data.sampler.records, config.sampling.drift_reward, "training prompts (sampling.drift_reward)")


def build_drift_reward(config: FlowalignConfig, device: torch.device):
    """The process reward of ``sampling.drift_reward`` (None when guidance is off), loaded before the model.

    Raises ConfigError naming the key for an unknown reward, or for ``drift_gradient: autograd`` with a
    reward that is not differentiable."""
    from flowalign import guidance
    from flowalign.rewards import load_reward

    s = config.sampling
    if s.drift_reward is None:
        return None
    try:
        reward = load_reward(s.drift_reward, **s.drift_reward_kwargs)
    except Exception as err:
        raise ConfigError(f"sampling.drift_reward={s.drift_reward!r}: {err}") from err
    try:
        guidance.resolve_gradient(reward, s.drift_gradient)  # the check RewardDrift makes, before the model is built
    except ValueError:
        raise ConfigError(f"sampling.drift_reward={s.drift_reward!r} is not differentiable: use sampling.drift_gradient=spsa (or auto)") from None
    return runtime.to_device(reward, device)


def build_drift(config: FlowalignConfig, adapter, reward):
    """The rollouts' process-reward guidance (:class:`flowalign.guidance.RewardDrift`) over ``adapter``
    with the reward of :func:`build_drift_reward`, or None when it is off."""
    from flowalign import guidance

    if reward is None:
        return None
    s = config.sampling
    return guidance.RewardDrift(adapter, reward, scale=s.drift_scale, mode=s.drift_mode, gradient=s.drift_gradient,
                                spsa_sigma=s.drift_spsa_sigma, spsa_pairs=s.drift_spsa_pairs, micro_batch_size=s.micro_batch_size)


@dataclass
class ObjectiveParts:
    """What the objective decides about the recipe.

    Attributes:
        objective: the configured objective.
        dense: per-step advantages from step rewards (dense_grpo, tp_grpo).
        forward_process: trains on freshly noised clean samples, not recorded transitions (nft, awm).
        schedule: the sampler's noise schedule (a saved DenseGRPO table when one is configured).
    """

    objective: Any
    dense: bool
    forward_process: bool
    schedule: Any


def build_objective(config: FlowalignConfig) -> ObjectiveParts:
    """The objective from ``objective.*`` and the noise schedule from ``sampling.*`` (or
    ``dense.noise_table_file``). Raises ConfigError for an unknown objective or bad arguments."""
    from flowalign import sde
    from flowalign.objectives import get_objective, resolve_objective, takes_keyword

    ocfg = config.objective
    # clip_range / kl_beta only when set: an unset key keeps the objective's own default (AWM clips at 1.0, TP-GRPO at 1e-5)
    chosen = {key: getattr(ocfg, key) for key in ("clip_range", "kl_beta") if getattr(ocfg, key) is not None}
    refused = [key for key in chosen if not takes_keyword(resolve_objective(ocfg.name), key)]
    if refused:
        raise ConfigError(f"objective {ocfg.name!r} takes no {' / '.join(refused)}, which the recipe sets: set "
                          f"{', '.join(f'objective.{key}=null' for key in refused)}")
    if takes_keyword(ocfg.name, "adv_clip"):  # always set (default 5); an objective of the user's may not take it
        chosen["adv_clip"] = ocfg.adv_clip
    from flowalign.objectives.awm import is_awm

    if "sigma_range" in ocfg.kwargs and is_awm(ocfg.name):  # as flowalign offline refuses online AWM's keys
        raise ConfigError("objective.kwargs.sigma_range is offline AWM's sigma draw; online AWM re-noises at the sampler's sigmas "
                          "(objective.kwargs.sigma_sampling, num_timesteps): remove it")
    objective = get_objective(ocfg.name, **chosen, **ocfg.kwargs)
    unit = getattr(objective, "update_unit", "step")
    if unit not in ("step", "trajectory"):
        raise ConfigError(f"objective {ocfg.name!r}: update_unit must be 'step' or 'trajectory', got {unit!r}")
    if unit == "trajectory" and getattr(objective, "forward_process", False):
        raise ConfigError(f"objective {ocfg.name!r}: update_unit 'trajectory' gathers a sample's recorded transitions; a "
                          "forward-process objective (forward_process = True) trains on fresh re-noisings instead")
    if getattr(objective, "needs_ema", False) and not config.train.ema and getattr(objective, "kl_ema", None) is None:
        raise ConfigError(f"objective {ocfg.name!r} with ema_beta > 0 penalises the distance to the EMA of the LoRA: set train.ema=true "
                          "(train.ema_decay sets how fast it follows)")
    if getattr(objective, "forward_process", False) and getattr(objective, "sigma_sampling", "grid") == "grid":
        check_forward_grid(objective, config)
    dense = dense_method(ocfg.name) is not None
    if getattr(objective, "advantages", None) is not None:
        if not callable(objective.advantages):
            raise ConfigError(f"objective {ocfg.name!r}: advantages must be a method (rewards, group_ids, keep, traj, components) -> "
                              f"[B] or [B, K], got a {type(objective.advantages).__name__}")
        if dense:
            raise ConfigError(f"objective {ocfg.name!r} has both an advantages method and dense_method {dense_method(ocfg.name)!r}: "
                              "the dense: section computes per-step advantages itself; keep one of the two")
    table_file = config.dense.noise_table_file if dense else None
    if table_file and (Path(table_file).is_file() or config.dense.calibration_rounds == 0):
        from flowalign.step_rewards import check_calibrated_table, noise_schedule_for, schedule_start_levels

        if config.dense.calibration_rounds:
            check_calibrated_table(table_file, config, schedule_start_levels(config))
        schedule = noise_schedule_for(config.sampling, config.dense)
    else:
        schedule = sde.make_schedule(config.sampling.noise_schedule, **config.sampling.noise_kwargs)
    return ObjectiveParts(objective=objective, dense=dense, forward_process=bool(getattr(objective, "forward_process", False)),
                          schedule=schedule)


def check_forward_grid(objective, config: FlowalignConfig) -> None:
    """ConfigError when a forward-process objective (nft, awm) draws more distinct sigmas per sample
    (``num_timesteps``) than its grid holds: the first ``ceil(objective.timestep_fraction · sampling.num_steps)``
    of the rollout's sigmas (train/forward_process.py); it failed at the first update, after a rollout."""
    from flowalign.train.forward_process import grid_size

    steps, fraction = config.sampling.num_steps, config.objective.timestep_fraction
    grid, num = grid_size(steps, fraction), getattr(objective, "num_timesteps", 1)
    if isinstance(num, int) and num > grid:
        raise ConfigError(f"objective {config.objective.name!r} draws num_timesteps={num} distinct sigmas per sample from the first "
                          f"{grid} of the rollout's {steps} (objective.timestep_fraction={fraction:g} x sampling.num_steps={steps}, "
                          "rounded up): lower num_timesteps, or raise timestep_fraction or num_steps")


@dataclass
class ModelParts:
    """The model side of a run.

    Attributes:
        adapter: the pipeline's adapter, with LoRA added (autocast-wrapped under mixed precision).
        text_modules: ``{component: text encoder}`` with LoRA (``lora.train_text_encoder``), or empty.
        conditioning: the update's policy / reference conditioning (re-encoded through trained text encoders).
        optim: the LoRA optimizer step (one parameter group per learning rate).
        reference_lora: the starting LoRA's weights under ``lora.reference: init`` (the reference policy), else None.
    """

    adapter: Any
    text_modules: dict
    conditioning: UpdateConditioning
    optim: LoraOptimizer
    reference_lora: Optional[lora_lib.LoraSnapshot] = None


def check_lora_start(lcfg, resuming: bool) -> None:
    """``lora.init_from`` missing or unreadable: one error before the model loads (a resume reads the start from its
    checkpoint, so the file need not exist then)."""
    if lcfg.init_from is not None and not resuming:
        lora_lib.read_lora_file(resolve_path(lcfg.init_from))


def start_lora(lcfg, modules: dict, resuming: bool) -> Optional[lora_lib.LoraSnapshot]:
    """``lora.init_from``: copy that file's LoRA into ``modules`` (``{"transformer": ..., text encoders}``), except on a
    resume, whose checkpoint holds the weights; return the reference snapshot under ``lora.reference: init`` (a resume
    restores its weights from the checkpoint), else None. Both trainers call it before their optimizer copies the
    weights (EMA, old policy)."""
    if lcfg.init_from is None:
        return None
    if not resuming:
        lora_lib.load_initial_lora(modules, resolve_path(lcfg.init_from), lcfg.rank, lcfg.alpha)
    return lora_lib.LoraSnapshot(modules) if lcfg.reference == "init" else None


def build_model(config: FlowalignConfig, adapter, device: torch.device, accelerator,
                gather: Callable[[Tensor], Tensor], train_guidance: float, kl_ema=None, resuming: bool = False) -> ModelParts:
    """Load the pipeline (unless ``adapter`` is given), add LoRA (from ``lora.init_from`` unless ``resuming``), wrap
    for mixed precision and build the optimizer over the LoRA parameters.

    Raises:
        ConfigError: gradient checkpointing asked of a module without it; LoraMismatchError for
            target modules the model lacks.
    """
    if adapter is None:
        adapter = build_adapter(config.model, device)
    module = adapter.trainable_module
    lcfg = config.lora
    transformer_params = lora_lib.add_lora(module, lcfg.rank, lcfg.alpha, lcfg.target_modules or adapter.lora_target_modules,
                                           lcfg.init, lcfg.dropout)
    text_modules, text_params = lora_lib.add_text_lora(adapter, lcfg) if lcfg.train_text_encoder else ({}, [])
    reference_lora = start_lora(lcfg, {"transformer": module, **text_modules}, resuming)
    cache = getattr(adapter, "t5_cache", None)
    # + the negative prompt; sample-until-full may draw max_sampling_rounds windows
    needed = prompts_drawn_per_process(config.train, accelerator.num_processes) * config.train.max_sampling_rounds + 1
    if text_modules and cache is not None and 0 < cache.max_prompts < needed:
        logger.warning("model.t5_cache_size=%d holds fewer than an iteration's %d prompts at most (with the negative): the update "
                       "will recompute T5 rows it dropped; raise it to at least %d", cache.max_prompts, needed, needed)
    if config.train.gradient_checkpointing:
        if not getattr(module, "_supports_gradient_checkpointing", False):
            raise ConfigError(f"train.gradient_checkpointing=true but {type(module).__name__} does not support gradient checkpointing")
        module.enable_gradient_checkpointing()
    adapter = runtime.autocast_adapter(adapter, config.train.mixed_precision)
    conditioning = UpdateConditioning(adapter, text_modules, train_guidance > 1.0, device, reference_lora)
    # one parameter group per learning rate; "lr_ratio" scales train.lr's schedule (LoraOptimizer.set_lr)
    groups = [{"params": transformer_params, "lr_ratio": 1.0}]
    if text_params:
        groups.append({"params": text_params, "lr_ratio": (lcfg.text_encoder_lr or config.train.lr) / config.train.lr})
    optim = LoraOptimizer(groups, config.train, accelerator, device.type, gather, model_dtype=next(module.parameters()).dtype,
                          kl_ema=kl_ema)
    return ModelParts(adapter=adapter, text_modules=text_modules, conditioning=conditioning, optim=optim, reference_lora=reference_lora)
