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
    ``<run>/noise_table.json`` (``new_levels`` is then None: nothing to save), and an existing
    ``dense.noise_table_file`` calibrated under the same settings wins (its levels are saved with the run). With several processes each rolls out its share of every round's
    ``dense.calibration_samples`` (:func:`calibration_shard`) and all gather the step gains, so the work is
    split and every process ends with the same table.
    """
    from flowalign import sde
    from flowalign.step_rewards import calibrate_noise_table_for, load_noise_table, schedule_start_levels

    cfg = trainer.config
    d, s = cfg.dense, cfg.sampling
    if d.noise_table_file and Path(d.noise_table_file).is_file():  # checked against these settings when the run was set up
        return trainer.schedule, load_noise_table(d.noise_table_file)[0]  # saved with the run: a resume needs no outside file
    if resumed and (trainer.run_dir / "noise_table.json").is_file():
        return sde.table(load_noise_table(trainer.run_dir / "noise_table.json")[0]), None
    from flowalign.train.trainer import PROCESS_SEED_STRIDE

    records = trainer.sampler.records[: max(1, min(len(trainer.sampler.records), d.calibration_samples))]
    acc = trainer.accelerator
    # this process's share of every round's samples (all of them on one process); sample i is prompt i mod len(records)
    shard = calibration_shard(d.calibration_samples, acc.process_index, acc.num_processes)
    picked = [records[i % len(records)] for i in shard]
    # noise_seeding: group: each sample from its own (seed, round, global index) stream, so the table is the same on any
    # number of processes; process: one batch from this process's stream
    sample_generator = ((lambda round_index, i: runtime.calibration_generator(cfg.train.seed, round_index, shard[i]))
                        if s.noise_seeding == "group" else None)
    with runtime.rewards_on_device(trainer.rewards.values(), trainer.device, cfg.train.offload_rewards):
        levels = calibrate_noise_table_for(
            trainer.adapter, [r.prompt for r in picked], trainer.mixed_reward(),
            rounds=d.calibration_rounds, samples=len(picked),
            initial_levels=torch.tensor(schedule_start_levels(cfg)),
            eps1=d.eps1, eps2=d.eps2, max_level=d.max_level, kernel=s.kernel, guidance_scale=s.guidance_scale,
            estimator=d.estimator, stride=d.stride, max_batch=d.max_batch, micro_batch_size=s.micro_batch_size,
            generator=torch.Generator().manual_seed(cfg.train.seed + 2 + acc.process_index * PROCESS_SEED_STRIDE),
            metadata=[dict(r.metadata) for r in picked],
            gather=(lambda rows: gather_rows(acc, rows)) if acc.num_processes > 1 else None, sample_generator=sample_generator,
        )
    return sde.table(levels), levels


def calibration_shard(samples: int, rank: int, world: int) -> list[int]:
    """The calibration rollouts process ``rank`` of ``world`` draws each round: the round's sample indices
    ``rank, rank + world, ...`` below ``samples`` (sample ``i`` is prompt ``i mod len(prompts)``, as in one process)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    return list(range(rank, samples, world))


def gather_rows(accelerator, rows: Tensor) -> Tensor:
    """Every process's ``rows`` ``[n_p, K]`` (``n_p`` may differ, 0 included), concatenated in process order,
    on every process (on the CPU)."""
    counts = [int(n) for n in accelerator.gather(torch.tensor([rows.shape[0]], device=accelerator.device)).tolist()]
    padded = accelerator.pad_across_processes(rows.to(accelerator.device).contiguous(), dim=0)
    gathered = accelerator.gather(padded).cpu()
    width = max(counts)
    return torch.cat([gathered[p * width: p * width + n] for p, n in enumerate(counts)])


def save_run_noise_table(run_dir: Path, levels: Tensor, cfg: FlowalignConfig) -> None:
    """Write a calibrated table to ``<run>/noise_table.json`` (and ``dense.noise_table_file`` when set)."""
    from flowalign.step_rewards import save_noise_table

    from flowalign.step_rewards import calibration_meta, schedule_start_levels

    meta = calibration_meta(cfg, schedule_start_levels(cfg))
    save_noise_table(run_dir / "noise_table.json", levels, meta)
    if cfg.dense.noise_table_file and not Path(cfg.dense.noise_table_file).is_file():  # a table reused from it stays as it is
        save_noise_table(cfg.dense.noise_table_file, levels, meta)
