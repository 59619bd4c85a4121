"""DenseGRPO's noise calibration as a run performs it: computed before training, reused on resume,
saved with the run (``<run>/noise_table.json``)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flowalign.config import FlowalignConfig
from flowalign.train import runtime

if TYPE_CHECKING:
    from flowalign.train.trainer import Trainer


def calibrated_schedule(trainer: "Trainer", resumed: bool):
    """DenseGRPO's calibrated noise table (``dense.calibration_rounds > 0``) as ``(schedule, new_levels)``.

    Computed once before training from the training prompts; a resumed run reuses
    ``<run>/noise_table.json``, and an existing ``dense.noise_table_file`` wins (``new_levels``
    is then None: nothing to save).
    """
    from flowalign import sde
    from flowalign.step_rewards import calibrate_noise_table_for, load_noise_table

    cfg = trainer.config
    d, s = cfg.dense, cfg.sampling
    if d.noise_table_file and Path(d.noise_table_file).is_file():
        return trainer.schedule, None
    if resumed and (trainer.run_dir / "noise_table.json").is_file():
        return sde.table(load_noise_table(trainer.run_dir / "noise_table.json")[0]), None
    records = trainer.sampler.records[: max(1, min(len(trainer.sampler.records), d.calibration_samples))]
    with runtime.rewards_on_device(trainer.rewards.values(), trainer.device, cfg.train.offload_rewards):
        levels = calibrate_noise_table_for(
            trainer.adapter, [r.prompt for r in records], trainer.mixed_reward(),
            rounds=d.calibration_rounds, samples=d.calibration_samples,
            initial_levels=trainer.schedule.levels(s.num_steps, 0, torch.Generator().manual_seed(cfg.train.seed)),
            eps1=d.eps1, eps2=d.eps2, max_level=d.max_level, kernel=s.kernel, guidance_scale=s.guidance_scale,
            estimator=d.estimator, stride=d.stride, max_batch=d.max_batch, micro_batch_size=s.micro_batch_size,
            generator=torch.Generator().manual_seed(cfg.train.seed + 2), metadata=[dict(r.metadata) for r in records],
        )
    return sde.table(levels), levels


def save_run_noise_table(run_dir: Path, levels: Tensor, cfg: FlowalignConfig) -> None:
    """Write a calibrated table to ``<run>/noise_table.json`` (and ``dense.noise_table_file`` when set)."""
    from flowalign.step_rewards import save_noise_table

    d = cfg.dense
    meta = {"rounds": d.calibration_rounds, "samples": d.calibration_samples, "eps1": d.eps1, "eps2": d.eps2,
            "kernel": cfg.sampling.kernel, "model": cfg.model.pretrained}
    save_noise_table(run_dir / "noise_table.json", levels, meta)
    if d.noise_table_file:
        save_noise_table(d.noise_table_file, levels, meta)
