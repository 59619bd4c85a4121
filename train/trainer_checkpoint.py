"""Checkpoints of an online run (DESIGN.md §9): what the trainer saves and how a resume restores it.

A checkpoint holds the LoRA (transformer and text encoders), the optimizer's moments, EMA and
loss scaler (:class:`~flowalign.train.lora_optimizer.LoraOptimizer`), every process's generator
and global torch (and CUDA) RNG, every process's python / numpy RNGs, the prompt sampler's position
and the iteration, so a resumed run continues bit-exactly (``tests/test_trainer.py``, ``tests/test_resume_kill.py``). Files are written
atomically by :func:`flowalign.checkpoint.save_checkpoint` and refused on a config mismatch.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from flowalign import checkpoint as ckpt
from flowalign import lora as lora_lib
from flowalign.config import config_hash
from flowalign.errors import CheckpointError
from flowalign.objectives.base import objective_state, restore_objective_state
from flowalign.train.lora_export import checkpoint_export

logger = logging.getLogger("flowalign.train.trainer")


def trainer_state(trainer) -> tuple[dict, dict]:
    """(tensor groups, JSON state) of everything needed to continue bit-exactly."""
    tensors = {"lora": lora_lib.get_lora_state_dict(trainer.adapter.trainable_module)}
    tensors.update(lora_lib.text_lora_tensors(trainer.text_modules))
    if trainer.reference_lora is not None:  # lora.reference: init: the start, so a resume needs no lora.init_from file
        tensors.update(trainer.reference_lora.state())
    optim_tensors, optim_state = trainer.optim.state()  # "ema"; "optimizer", "nonfinite_in_row", "grad_scaler"
    tensors.update(optim_tensors)
    state = {
        "iteration": trainer.iteration,
        "rng": ckpt.capture_rng(),
        # [num_processes, S] uint8: every process's own generator (each resumes its own stream)
        "generators": trainer._gather(trainer.generator.get_state()[None]),
        # [num_processes, S] uint8: every process's global torch RNG (LoRA dropout draws from it, and processes
        # that drew different numbers of masks are on different streams); "rng" holds process 0's python/numpy
        "torch_rngs": trainer._gather(torch.get_rng_state()[None]),
        "sampler": trainer.sampler.state_dict(),
        "all_dropped_in_row": trainer._all_dropped_in_row,  # iterations in a row whose every reward was dropped
        "train_seconds": trainer.train_seconds(),  # the report's train time covers every session of a resumed run
        **optim_state,
    }
    if trainer.accelerator.num_processes > 1:  # every process's python / numpy RNG ("rng" holds process 0's)
        from accelerate.utils import gather_object

        state["host_rngs"] = gather_object([ckpt.host_rng_state()])
    state["reward_versions"] = {key: getattr(reward, "version", None) for key, reward in trainer.rewards.items()}
    state["eval_prompts"] = [record.prompt for record in trainer.eval_records]  # the eval grid a resume keeps
    saved = objective_state(trainer.objective)
    if saved is not None:  # a plugin objective's own state (an adaptive coefficient, a running baseline)
        state["objective"] = saved
    if torch.cuda.is_available() and trainer.device.type == "cuda":  # the CUDA generator of each process's own device
        state["cuda_rngs"] = trainer._gather(torch.cuda.get_rng_state(trainer.device)[None])
    return tensors, state


def save_trainer_checkpoint(trainer) -> Optional[Path]:
    """Atomically write ``checkpoints/iter_XXXXXX`` (main process), keeping the last K; with the run's
    ``pytorch_lora_weights.safetensors`` as it would be saved now (:mod:`flowalign.train.lora_export`)."""
    tensors, state = trainer_state(trainer)
    path = None
    if trainer.accelerator.is_main_process:
        root = trainer.run_dir / "checkpoints"
        try:
            path = ckpt.save_checkpoint(root, trainer.iteration, tensors, state, config_hash=config_hash(trainer.config),
                                        keep=trainer.config.train.keep_checkpoints,
                                        export=checkpoint_export(trainer.adapter, trainer.lora_modules, trainer.ema))
        except OSError as exc:  # disk full, quota, permissions: the temporary folder is already removed
            raise ckpt.write_error(root, trainer.iteration, exc) from exc
    trainer.accelerator.wait_for_everyone()
    return path


def keep_eval_grid(trainer, saved: Optional[list]) -> None:
    """Give a resumed run the eval grid it began with, so ``eval/*`` and ``samples/`` measure the same prompts before and
    after the resume: the checkpoint's prompts (``saved``), or for a checkpoint from before it recorded them the first
    ``train.eval_num_prompts`` lines the grid then took. Prompts no longer in the eval file keep the new grid."""
    pool = trainer.heldout_records if trainer.heldout_records else trainer.sampler.records
    n = len(trainer.eval_records)
    wanted = list(saved) if saved is not None else [record.prompt for record in pool[:n]]
    if wanted == [record.prompt for record in trainer.eval_records]:
        return
    by_prompt = {}
    for record in pool:
        by_prompt.setdefault(record.prompt, record)
    if all(prompt in by_prompt for prompt in wanted):
        trainer.eval_records = [by_prompt[prompt] for prompt in wanted]
        logger.info("resumed run: its eval grid keeps the %d prompts it began with", len(wanted))
    else:
        logger.warning("resumed run: its eval grid's prompts are no longer all in the eval prompts; eval/* from here on "
                       "measures another grid")


def warn_changed_rewards(trainer, saved: Optional[dict], path: Path) -> None:
    """Warn when a reward's scoring rules (``Reward.version``) differ from those the checkpoint's run trained with (or
    the checkpoint records none, being older, for a reward that has a version): the resumed run mixes two rewards."""
    for key, reward in trainer.rewards.items():
        ours = getattr(reward, "version", None)
        theirs = None if saved is None else saved.get(key)
        if ours is not None and theirs != ours:
            was = "no recorded version (written before versions were)" if theirs is None else f"version {theirs!r}"
            logger.warning("checkpoint %s trained with reward %r at %s; it is %r now: if its rules changed, the resumed run's "
                           "rewards (and its report) mix two reward functions", path, key, was, ours)


def restore_trainer_checkpoint(trainer, path: Path) -> None:
    """Load checkpoint ``path`` into a set-up trainer (refused when its config hash differs, or when
    it was written by another number of processes)."""
    loaded = ckpt.load_checkpoint(path, expected_config_hash=config_hash(trainer.config))
    state = loaded.state
    generators, world = state["generators"], trainer.accelerator.num_processes
    if generators.shape[0] != world:  # before anything is restored
        raise CheckpointError(f"checkpoint {path} was written by {generators.shape[0]} processes, this run has {world}; "
                              "resume with the same number of processes")
    lora_lib.set_lora_state_dict(trainer.adapter.trainable_module, loaded.tensors["lora"])
    lora_lib.load_text_lora_tensors(trainer.text_modules, loaded.tensors, path)
    if trainer.reference_lora is not None:
        trainer.reference_lora.load_state(loaded.tensors, path)
    trainer.optim.load(loaded.tensors, state, path)
    trainer.sampler.load_state_dict(state["sampler"])
    ckpt.restore_rng(state["rng"])
    rank = trainer.accelerator.process_index
    trainer.generator.set_state(generators[rank].to(torch.uint8).clone())  # a row view is refused
    if "torch_rngs" in state:  # checkpoints from before it restore process 0's global RNG everywhere
        torch.set_rng_state(state["torch_rngs"][rank].to(torch.uint8).clone())
    if "host_rngs" in state:  # checkpoints from before it restore process 0's python / numpy RNG everywhere
        ckpt.restore_host_rng(state["host_rngs"][rank])
    if "cuda_rngs" in state and torch.cuda.is_available() and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rngs"][rank].to(torch.uint8).clone(), trainer.device)
    restore_objective_state(trainer.objective, state.get("objective"), path)
    warn_changed_rewards(trainer, state.get("reward_versions"), path)
    keep_eval_grid(trainer, state.get("eval_prompts"))
    trainer.iteration = int(state["iteration"])
    trainer._all_dropped_in_row = int(state.get("all_dropped_in_row", 0))  # absent from checkpoints before it
    trainer.train_seconds_before = float(state.get("train_seconds", 0.0))
    logger.info("resumed from %s at iteration %d", path, trainer.iteration)
