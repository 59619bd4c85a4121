"""What an online run writes when it ends (DESIGN.md §9): the LoRA file, the final eval grid,
``reward_curve.png`` and the held-out report (``report.md``, ``before_after.png``). Only the main
process writes; the held-out report's samples are split over every process.

``pytorch_lora_weights.safetensors`` is diffusers' file (``pipe.load_lora_weights(run_dir)``),
with the EMA weights when ``train.ema`` is on and the peft config (rank, alpha) in its header.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from flowalign import lora as lora_lib
from flowalign.train import runtime
from flowalign.train.lora_export import lora_states, save_lora_file
from flowalign.files import atomic_path

logger = logging.getLogger("flowalign.train.trainer")


def write_final_outputs(trainer) -> Optional[Path]:
    """``pytorch_lora_weights.safetensors`` (EMA weights when enabled), eval grid, reward curve
    (main process only) and, when ``train.eval_prompts`` is set, the held-out report (every process
    samples its share, the main one writes)."""
    path = None
    start = time.perf_counter()
    if trainer.accelerator.is_main_process:
        path = save_lora_file(trainer.adapter, trainer.lora_modules, trainer.run_dir, lora_states(trainer.lora_modules, trainer.ema))
        every = trainer.config.train.eval_every
        if every > 0 and trainer.iteration % every == 0 and (trainer.run_dir / "samples" / f"iter_{trainer.iteration:06d}.png").is_file():
            # the loop evaluated these weights at this iteration already (same prompts, noise and weights): its grid
            # is the final one, and its eval/* are in the last row
            with atomic_path(trainer.run_dir / "samples" / "final.png") as tmp:
                shutil.copyfile(trainer.run_dir / "samples" / f"iter_{trainer.iteration:06d}.png", tmp)
        elif every >= 0:  # into the last iteration's row, so metrics.csv and reward_curve.png have it too
            trainer.run_log.add_to_last_row(trainer.evaluate(tag="final"), trainer.iteration)
        if (trainer.run_dir / "metrics.csv").is_file():
            from flowalign.plots import reward_curve

            reward_curve(trainer.run_dir / "metrics.csv", trainer.run_dir / "reward_curve.png")
        trainer.timings["save"] = time.perf_counter() - start
    if trainer.config.train.eval_prompts and trainer.config.train.final_eval_samples > 0:
        # every process calls it (each samples its share, the main one writes: write_heldout_report); a subclass's
        # override runs on every process too
        trainer.heldout_report()
    elif trainer.accelerator.is_main_process and not remove_stale_report(trainer.run_dir):
        logger.info("no held-out report: %s", "train.final_eval_samples=0" if trainer.config.train.eval_prompts
                    else "train.eval_prompts is not set")
    if trainer.accelerator.is_main_process:
        logger.info("wall time per phase: %s", ", ".join(f"{k} {v:.1f}s" for k, v in trainer.timings.items()))
    trainer.accelerator.wait_for_everyone()
    return path


# what the held-out report writes: a run that ends without a new report must not keep an earlier one's
REPORT_FILES = ("report.md", "report.json", "eval_base.json", "eval_aligned.json", "before_after.png", "heldout_accuracy.png")
# run_dir/report_partial/{base,aligned}: the report's scored batches until report.md is written (not eval_partial, which is
# flowalign eval --out's and goes when that evaluation ends, also when its --out is the run folder)
REPORT_JOURNALS = "report_partial"


def report_journals(trainer, reward_key: str) -> tuple:
    """``(base, aligned)`` :class:`flowalign.eval_journal.EvalJournal` s of the held-out report, under
    ``run_dir/report_partial``: a run killed while it evaluates resumes the report from the batches they hold. The
    key holds what decides the samples (model, held-out prompts, sampling settings, the report's reward); the
    aligned one also the sha256 of the evaluated LoRA weights (EMA when on). A journal under another key (weights
    trained further by an extended run, another reward) is discarded with a warning and sampled again: a resumed run
    has no ``--restart`` to ask for. The sample count and the batch size are not in it: a batch is read back only
    for the same sample indices."""
    import dataclasses
    import hashlib

    from flowalign.checkpoint import update_with_tensors
    from flowalign.config import MODEL_MEMORY_KNOBS
    from flowalign.eval_journal import EvalJournal
    from flowalign.prompts import prompts_digest
    from flowalign.train.model import model_files_signature

    cfg = trainer.config
    # the entry as it scores: batch_size only chunks the calls (left out, so journals of before it still match)
    reward = [{k: v for k, v in dataclasses.asdict(r).items() if k != "batch_size"} for r in cfg.rewards if r.key == reward_key]
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in MODEL_MEMORY_KNOBS}
    key = {"model": model, "model_files": model_files_signature(cfg.model.pretrained, cfg.model.revision),
           "device_type": torch.device(trainer.device).type, "mixed_precision": cfg.train.mixed_precision,
           "prompts_sha256": prompts_digest(trainer.heldout_records), "reward": reward,
           "steps": cfg.sampling.eval_num_steps, "guidance": cfg.sampling.guidance_scale}
    version = getattr(trainer.rewards.get(reward_key), "version", None) if isinstance(getattr(trainer, "rewards", None), dict) else None
    if version is not None:  # batches scored under other rules of the reward are not read back
        key["reward_version"] = version
    digest = hashlib.sha256()
    states = sorted(lora_states(trainer.lora_modules, trainer.ema).items())
    update_with_tensors(digest, ((f"{component}.{name}", tensor) for component, state in states for name, tensor in sorted(state.items())))
    share = (trainer.accelerator.process_index, trainer.accelerator.num_processes)
    folder = trainer.run_dir / REPORT_JOURNALS
    return (EvalJournal(folder / "base", key, share=share, on_mismatch="discard"),
            EvalJournal(folder / "aligned", {**key, "lora_sha256": digest.hexdigest()}, share=share, on_mismatch="discard"))


def remove_stale_report(run_dir: Path) -> list[Path]:
    """Delete an earlier held-out report from ``run_dir`` (a run resumed or extended with
    ``train.final_eval_samples=0`` or without ``train.eval_prompts``): it describes another LoRA."""
    removed = [run_dir / name for name in REPORT_FILES if (run_dir / name).is_file()]
    for path in removed:
        path.unlink()
    shutil.rmtree(run_dir / REPORT_JOURNALS, ignore_errors=True)  # a report killed before it was written
    if removed:
        logger.warning("no held-out report this time (train.eval_prompts unset or train.final_eval_samples=0): removed the "
                       "earlier one, which described the LoRA before this run (%s)", ", ".join(p.name for p in removed))
    return removed


def report_entry(cfg):
    """The ``rewards`` entry the held-out report scores with: ``train.report_reward``'s, else the first."""
    name = cfg.train.report_reward or cfg.rewards[0].key
    return next(r for r in cfg.rewards if r.key == name)


def write_heldout_report(trainer) -> Optional[Path]:
    """Base (LoRA off) vs aligned (EMA weights when enabled) on ``train.eval_prompts`` with the
    reward ``train.report_reward`` (default: the first configured one): ``report.md``/``report.json``, ``before_after.png``, ``eval_*.json``.

    Called by every process: each samples every ``num_processes``-th sample of both evaluations
    (:func:`flowalign.evaluation.evaluate`'s ``shard``), the shares are gathered, and the main
    process writes the files and returns their path (the others return None)."""
    from flowalign.config import to_dict
    from flowalign.report import heldout_report

    cfg = trainer.config
    entry = report_entry(cfg)
    name = entry.key
    reward = trainer.rewards[name]
    runtime.to_device(reward, trainer.device)
    start = time.perf_counter()
    path = heldout_report(
        trainer.run_dir, trainer.adapter, trainer.heldout_records, reward,
        config_dict=to_dict(cfg), timings=dict(trainer.timings), num_samples=cfg.train.final_eval_samples,
        num_steps=cfg.sampling.eval_num_steps, guidance_scale=cfg.sampling.guidance_scale,
        batch_size=cfg.sampling.micro_batch_size or 32, aligned_context=(trainer.ema.applied if trainer.ema is not None else None),
        base_context=lambda: lora_lib.lora_disabled(*trainer.lora_modules.values()),
        metrics_csv=trainer.run_dir / "metrics.csv", progress=cfg.train.progress and trainer.accelerator.is_main_process,
        target_gain_points=cfg.train.report_target_points,
        shard=(trainer.accelerator.process_index, trainer.accelerator.num_processes), gather=runtime.gather_shares,
        journals=report_journals(trainer, name), on_error=entry.on_error, reward_kwargs=dict(entry.kwargs or {}),
        reward_batch_size=entry.batch_size,
    )
    trainer.timings["held-out eval"] = time.perf_counter() - start  # base + aligned (each in report.md)
    if path is not None:  # the main process, report written: heldout_report removed both journals, here their folder
        shutil.rmtree(trainer.run_dir / REPORT_JOURNALS, ignore_errors=True)
    return path
