"""The Flow-GRPO training recipe (DESIGN.md §9): setup / train / save / cleanup over library parts.

One iteration::

    prompts (PromptSampler, sharded per process by group)
      -> rollout            flowalign.sampling.rollout        (tqdm "rollout"; with train.old_policy_rate > 0
                            by DiffusionNFT's soft-updated old policy, LoraOptimizer.old_policy; with
                            sampling.drift_reward steered by Euphonium's guided drift, flowalign.guidance)
      -> rewards            flowalign.rewards.call_reward_batched (tqdm "reward" over samples, failure policy)
      -> advantages         flowalign.advantages.group_advantages, drop all-zero samples (with train.oversample > 1:
                            train on the first prompts_per_iter groups with a signal, first_informative_groups;
                            train.max_sampling_rounds > 1 first draws, rolls out and scores more windows of prompts
                            while fewer groups than that have a signal: DAPO's sample-until-full)
      -> inner epochs       shuffle samples; micro-batches of (samples, one trained step);
                            objective.loss(StepBatch, policy, reference); accumulate, clip, step
                            (tqdm "update"); forward-process objectives (nft, awm) instead get
                            (samples, one re-noising draw) as a ForwardBatch (train/forward_process.py)
      -> old policy         old <- d·old + (1 - d)·θ           (only with train.old_policy_rate > 0)
      -> log / checkpoint

Setup builds its parts with ``train/trainer_setup.py`` (prompts, rewards, objective, model + LoRA +
optimizer); checkpoints are ``train/trainer_checkpoint.py``, the end of a run ``train/final_outputs.py``.

The recipe only talks to the pipeline through the Adapter protocol (``flowalign.pipelines``), so
any family with an adapter trains with it. Accelerate owns the device and the processes; only
the main process writes files.

Several processes (``torchrun --nproc_per_node N -m flowalign.train.cli train ...``, or
``accelerate launch --multi_gpu --num_processes N ...``; see train/accelerate/*.yaml): each
process rolls out whole groups (``PromptSampler`` shards prompts, never a group), rewards are
gathered for logging only, advantages are computed per group on the process that owns it (the
gathered batch for ``adv_std: global``). The (small) LoRA gradients are summed across processes
by hand at every optimizer step, each micro-batch weighted by its share of the rows of its
accumulation group over all processes, and every process runs the same number of optimizer
steps (``train/runtime.py``), so the pipeline's modules are never wrapped: FSDP / ZeRO configs
run like DDP. With ``sampling.noise_seeding: group`` a run gives the same LoRA (up to float
reduction order) on any number of processes when each optimizer step covers the same rows there:
``grad_accum`` counts a process's micro-batches, so that holds when one step takes the whole
iteration (the toy recipes and ``sd35m_dense_grpo_geneval``) and not when, say, ``grad_accum: 1`` makes 2 processes take half
the steps of 1. ``train.oversample`` must split evenly over the processes (checked at setup).
"""
from __future__ import annotations

import logging
import math
import shlex
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor

from flowalign import lora as lora_lib
from flowalign.advantages import groups_with_spread, kept_multi_reward_advantages
from flowalign.config import FlowalignConfig, inert_settings, save_config, to_dict
from flowalign.errors import ConfigError
from flowalign.objectives.base import checked_loss, concat_step_batches
from flowalign.train import final_outputs, trainer_checkpoint, trainer_setup
from flowalign.train import forward_process as fp
from flowalign.train import runtime
from flowalign.train.dense_setup import calibrated_schedule, save_run_noise_table
from flowalign.train.graceful_stop import GracefulStop, stop_everywhere
from flowalign.train.lora_export import trained_modules
from flowalign.train.lora_optimizer import OptimizerViews, nothing_stepped
from flowalign.train.run_dir import clear_run_dir, find_resume_checkpoint, prepare_run_dir, refuse_past_the_end, remove_interrupted_writes
from flowalign.train.run_log import RunLogger, check_trackers
from flowalign.train.run_lock import setup_lock

logger = logging.getLogger(__name__)

PROCESS_SEED_STRIDE = 1_000_003  # process p draws from seed + p * stride


@dataclass
class Batch:
    """One iteration's rollouts with everything the update needs.

    ``cond`` holds one row per group (prompt), in ``traj.group_ids`` order: a group's samples share their
    prompt's encoding, so it is not repeated ``group_size`` times (for SD3.5 at 333 tokens of 4,096 features
    a row is 2.7 MB in bf16). :meth:`cond_rows` gives samples' rows. :meth:`Trainer.run_iteration` drops
    ``traj.images`` once :meth:`Trainer.collect` has scored them: the update needs none of them.
    """

    traj: Any  # flowalign.trajectory.Trajectory
    cond: Any  # flowalign.pipelines.base.Conditioning, one row per group (traj.group_ids)
    advantages: Tensor  # [B] outcome advantages, or [B, K] per-step ones (dense objectives)
    keep: Tensor  # [B] bool: reward kept and advantage non-zero
    metrics: dict

    def cond_rows(self, index: Tensor):
        """The conditioning of samples ``index`` (one row each, on the conditioning's device)."""
        group_ids = self.traj.group_ids
        return self.cond.select(group_ids[index.to(group_ids.device)].to(next(iter(self.cond.cond.values())).device))


class _Round(NamedTuple):
    """One window of prompts rolled out and scored (DAPO's sample-until-full draws several per iteration)."""

    traj: Any
    cond: Any  # one row per prompt
    rewards: Tensor
    keep: Tensor
    components: dict
    dropped: dict
    groups: int  # prompts (groups) of this process in the window


def _join_rounds(rounds: list[_Round]) -> tuple[Any, Any, Tensor, Tensor, dict]:
    """The rounds' trajectory (group ids numbered round after round), conditioning, rewards, kept mask and
    per-reward scores, concatenated in the order drawn."""
    if len(rounds) == 1:
        r = rounds[0]
        return r.traj, r.cond, r.rewards, r.keep, r.components
    from flowalign.pipelines.base import Conditioning

    traj = runtime.cat_trajectories([r.traj for r in rounds])
    components = {key: torch.cat([r.components[key] for r in rounds]) for key in rounds[0].components}
    return (traj, Conditioning.cat([r.cond for r in rounds]), torch.cat([r.rewards for r in rounds]),
            torch.cat([r.keep for r in rounds]), components)


def prune_eval_grids(folder: Path, keep: int, current: Optional[int] = None) -> list[Path]:
    """Delete the in-training eval grids ``folder/iter_*.png`` but the first and the last ``keep`` (``train.keep_eval_grids``;
    0 keeps every one); returns the deleted paths. The first shows the start, the last ones where the run is now. With
    ``current`` (the iteration just evaluated) only grids up to it count: a run resumed from an earlier checkpoint leaves
    the abandoned run's later grids alone (its own overwrite them as it gets there) instead of keeping those as the last."""
    grids = sorted(path for path in folder.glob("iter_*.png")
                   if current is None or grid_iteration(path) is None or grid_iteration(path) <= current)
    doomed = grids[1:-keep] if keep > 0 else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def grid_iteration(path: Path) -> Optional[int]:
    """The iteration of an eval grid ``iter_N.png`` (None for another name)."""
    number = path.stem[len("iter_"):] if path.stem.startswith("iter_") else ""
    return int(number) if number.isdigit() else None


def pace(elapsed_s: float, done: int, left: int) -> str:
    """``"6.1 s/it, ETA 4.9 min"``: seconds per iteration over the ``done`` iterations of this session (evaluations and
    checkpoints included) and the time the ``left`` ones would take at that pace (:func:`flowalign.report.duration_text`,
    as report.md's wall times); ``""`` before the first."""
    from flowalign.report import duration_text

    if done <= 0:
        return ""
    per = elapsed_s / done
    return f"{per:.1f} s/it, ETA {duration_text(per * left)}"


def fill_dropped(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """``rewards [B]`` with NaN (dropped) entries replaced by their group's mean over kept samples
    (0 for a group with none), so dropped samples leave the group's mean unchanged."""
    rewards = rewards.clone()
    nan = rewards.isnan()
    for g in group_ids[nan].unique().tolist():
        in_group = group_ids == g
        kept = rewards[in_group & ~nan]
        rewards[in_group & nan] = kept.mean() if kept.numel() else 0.0
    return rewards


class PlanItem(NamedTuple):
    """One micro-batch of an update: the batch's ``rows`` (sample indices) at one ``step`` (a denoising step k, or a
    forward-process draw j). A named pair, so that a later plan over rows that mix steps (tree edges: ``step=None``,
    DESIGN.md §5) extends it instead of changing what every caller unpacks."""

    rows: Tensor
    step: Optional[int]


def noise_metrics(noise_levels: Tensor, stochastic_mask: Tensor) -> dict[str, float]:
    """Where this iteration's rollouts explored: ``sampling/noisy_steps`` (how many steps injected noise),
    ``sampling/first_noisy_step`` / ``last_noisy_step`` (0-based; -1 when none did) and ``sampling/noise_level_mean`` over
    those steps (0 when none). A sliding or random window, or a calibrated table, shows here iteration by iteration."""
    mask = torch.as_tensor(stochastic_mask).bool().cpu()
    steps = torch.nonzero(mask).flatten()
    levels = torch.as_tensor(noise_levels).float().cpu()
    return {"sampling/noisy_steps": float(steps.numel()),
            "sampling/first_noisy_step": float(steps[0]) if steps.numel() else -1.0,
            "sampling/last_noisy_step": float(steps[-1]) if steps.numel() else -1.0,
            "sampling/noise_level_mean": float(levels[mask].mean()) if steps.numel() else 0.0}


def make_step_batch(batch: Batch, index: Tensor, k: int, log_prob_reduce: str, device: torch.device, log_prob_form: str = "gaussian"):
    """The transitions ``x_k -> x_{k+1}`` of samples ``index`` as a ``StepBatch`` on ``device``
    (:meth:`flowalign.trajectory.Trajectory.step_batch` with the batch's advantages)."""
    return batch.traj.step_batch(k, batch.advantages, index=index, log_prob_reduce=log_prob_reduce, device=device,
                                 log_prob_form=log_prob_form)


def velocity_fns(adapter, cond, guidance_scale: float, with_reference: bool, reference_cond=None,
                 reference_lora: Optional[lora_lib.LoraSnapshot] = None):
    """``(policy, reference)`` velocity functions over ``adapter`` with ``cond`` bound; the reference
    runs the same module with its LoRA disabled, or with ``reference_lora``'s weights (``lora.reference:
    init``) (None unless ``with_reference``) on ``reference_cond``: the prompts encoded as the reference,
    when the text encoders carry LoRA (default: ``cond``)."""
    module = adapter.trainable_module
    reference_cond = cond if reference_cond is None else reference_cond

    def policy(x: Tensor, sigma: Tensor) -> Tensor:
        return adapter.velocity(x, sigma, cond, guidance_scale=guidance_scale)

    def reference(x: Tensor, sigma: Tensor) -> Tensor:
        with torch.no_grad(), lora_lib.reference_weights(reference_lora, module):
            return adapter.velocity(x, sigma, reference_cond, guidance_scale=guidance_scale)

    return policy, (reference if with_reference else None)


class Trainer(OptimizerViews):
    """Flow-GRPO (and every per-transition objective) on any adapter; see the module docstring.

    Usage::

        trainer = Trainer(load_config("train/configs/toy_grpo.yaml"))
        trainer.setup()          # or Trainer(..., resume=True) to continue output_dir's run
        trainer.train()
        trainer.cleanup()
    """

    _trajectory_unit = False  # the objective's update_unit is "trajectory" (set by setup)
    _plan_steps: tuple = ()  # the trained steps of the current update (its plan's)

    def __init__(self, config: FlowalignConfig, resume: Union[bool, str, Path] = False, overwrite: bool = False, adapter=None):
        self.config = config
        self.resume = resume
        self.overwrite = overwrite
        self.adapter = adapter
        self.run_dir = Path(config.train.output_dir)
        self.iteration = 0
        self._all_dropped_in_row = 0  # iterations in a row whose every reward was dropped (_check_all_dropped)
        self._untrained_iterations = 0  # iterations of this session with no row to train (flat or dropped groups)
        self._warned_steps_per_pass = False  # one warning per session (_warn_steps_per_pass)
        self.run_log: Optional[RunLogger] = None  # main process only
        self._lock = None  # the run folder's lock (train/run_lock.py), taken by setup
        self.text_modules: dict = {}  # text encoders with LoRA (lora.train_text_encoder), filled by setup
        self.reference_lora: Optional[lora_lib.LoraSnapshot] = None  # lora.reference: init, filled by setup
        self.timings: dict[str, float] = {}  # wall seconds per phase of this session (setup, calibration, train, ...)
        self.train_seconds_before = 0.0  # training wall seconds of earlier sessions up to the resumed checkpoint
        self._train_start: Optional[float] = None  # perf_counter() when this session's training loop began
        self._first_iteration = 0  # the iteration this session's training loop began at (the log line's pace)

    # ================================================================= setup

    def setup(self) -> "Trainer":
        """Check the run dir, build every component, restore a checkpoint when resuming.

        Nothing is written (and an ``--overwrite``-n run is not cleared) until all parts are built.
        """
        with setup_lock(self.run_dir, self.resume) as self._lock:  # one run per folder: a second one stops here
            return self._setup()

    def _setup(self) -> "Trainer":
        start = time.perf_counter()
        from flowalign.config import config_from_dict

        # validated again: a config built in code and edited afterwards (cfg.objective.name = ...) skipped the checks that
        # run when it is built, and failed deep in the first update, or with torch's words
        self.config = cfg = config_from_dict(to_dict(self.config))
        resume_path = find_resume_checkpoint(self.resume, self.run_dir) if self.resume else None
        if resume_path is not None:
            refuse_past_the_end(resume_path, cfg.train.iterations)
        # --resume of a run without a checkpoint starts it again (its folder is cleared, as --overwrite does)
        clear = prepare_run_dir(self.run_dir, cfg, resume=resume_path is not None, overwrite=self.overwrite or (bool(self.resume) and resume_path is None))
        self.accelerator = runtime.make_accelerator(cfg.train.process_group_timeout_min)
        self.accelerator.wait_for_everyone()  # every process checked the run dir before the main one writes
        self.device = self.accelerator.device
        trainer_setup.warn_about_launch(self.accelerator, cfg)
        check_trackers(cfg.train.log_with)
        if cfg.train.deterministic:
            runtime.deterministic_kernels()
        runtime.seed_global_rngs(cfg.train.seed)
        # rollout noise, shuffles, schedules: one stream per process (process 0 uses the seed itself)
        self.generator = torch.Generator().manual_seed(cfg.train.seed + PROCESS_SEED_STRIDE * self.accelerator.process_index)
        # cheap checks (prompts, rewards, objective) before the model is built
        data = trainer_setup.build_prompt_data(cfg, self.accelerator)
        self.sampler, self.eval_records, self.heldout_records = data.sampler, data.eval_records, data.heldout_records
        self.rewards = trainer_setup.build_rewards(cfg, self.device)
        drift_reward = trainer_setup.build_drift_reward(cfg, self.device)
        trainer_setup.check_reward_prompts(cfg, self.rewards, drift_reward, data)
        trainer_setup.check_lora_start(cfg.lora, resuming=resume_path is not None)
        parts = trainer_setup.build_objective(cfg)
        self.objective, self.dense, self.forward_process, self.schedule = parts.objective, parts.dense, parts.forward_process, parts.schedule
        self._trajectory_unit = getattr(self.objective, "update_unit", "step") == "trajectory"
        if self.accelerator.is_main_process:
            for line in inert_settings(cfg):
                logger.warning("set but without effect: %s", line)
        self._draws: Optional[fp.ForwardDraws] = None  # forward-process objectives' re-noising draws of an iteration
        model = trainer_setup.build_model(cfg, self.adapter, self.device, self.accelerator, self._gather, self._train_guidance(),
                                          kl_ema=getattr(self.objective, "kl_ema", None), resuming=resume_path is not None)
        self.adapter, self.text_modules, self.conditioning, self.optim = model.adapter, model.text_modules, model.conditioning, model.optim
        self.reference_lora = model.reference_lora  # lora.reference: init (restored from the checkpoint on a resume)
        trainer_setup.warn_about_log_prob_sum(cfg, self.adapter, self.accelerator)
        if self.accelerator.process_index > 0:  # the LoRA init above drew the same numbers everywhere; from here on
            # (LoRA dropout masks) each process draws its own (process 0 keeps the seed's stream: 1-process runs unchanged)
            runtime.seed_global_rngs(cfg.train.seed + PROCESS_SEED_STRIDE * self.accelerator.process_index)
        self.drift = trainer_setup.build_drift(cfg, self.adapter, drift_reward)  # Euphonium's guided rollouts, or None
        noise_table = None
        if self.dense and cfg.dense.calibration_rounds > 0:
            t0 = time.perf_counter()
            self.schedule, noise_table = calibrated_schedule(self, resumed=resume_path is not None)
            self.timings["calibration"] = time.perf_counter() - t0
        if resume_path is not None:
            self._load_checkpoint(resume_path)
            if self.accelerator.is_main_process and self.iteration < cfg.train.iterations and (self.run_dir / "pytorch_lora_weights.safetensors").is_file():
                logger.warning("%s: its pytorch_lora_weights.safetensors (and report, if any) are an earlier end's; this run replaces "
                               "them when it reaches iteration %d (until then the newest LoRA is in checkpoints/)", self.run_dir,
                               cfg.train.iterations)
        if self.accelerator.is_main_process:
            if clear:
                clear_run_dir(self.run_dir)  # the run's own files only (prepare_run_dir refused a folder holding others)
            remove_interrupted_writes(self.run_dir)  # a killed run's temporary files (each write picks fresh names)
            if resume_path is not None:
                self._remove_grids_after(self.iteration)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir)
            if noise_table is not None:
                save_run_noise_table(self.run_dir, noise_table, cfg)
            self.run_log = RunLogger(self.run_dir, cfg.train.log_with, to_dict(cfg), resumed_at=self.iteration if resume_path is not None else None)
        self.accelerator.wait_for_everyone()
        self.timings["setup"] = time.perf_counter() - start - self.timings.get("calibration", 0.0)
        return self

    @property
    def ema(self) -> Optional[lora_lib.LoraEMA]:
        """The LoRA's EMA (``train.ema``), or None."""
        return self.optim.ema

    @property
    def lora_modules(self) -> dict:
        """``{component: module}`` of every module with trained LoRA (``transformer`` first)."""
        return trained_modules(self.adapter, self.text_modules)

    def mixed_reward(self):
        """The configured rewards as one reward (their weighted sum)."""
        from flowalign.rewards import MultiReward

        return MultiReward({r.key: (self.rewards[r.key], r.weight, r.on_error) for r in self.config.rewards})

    # ================================================================= train

    def train(self) -> dict:
        """Run the remaining iterations and write the final outputs; return the last iteration's metrics.

        Raises:
            TrainingStopped: a SIGINT / SIGTERM asked to stop (train/graceful_stop.py): the
                iteration under way finished and was checkpointed; ``--resume`` continues it.
        """
        if not hasattr(self, "sampler"):  # an AttributeError on 'sampler' said nothing of the order
            raise RuntimeError("Trainer.train() before setup(): call trainer.setup(), then train(), then cleanup() "
                               "(or flowalign.train.trainer.train(config))")
        cfg = self.config.train
        metrics: dict = {}
        self._train_start = time.perf_counter()
        first, self._untrained_iterations = self.iteration, 0
        self._first_iteration = first
        with GracefulStop("iteration") as stop:
            while self.iteration < cfg.iterations:
                metrics = self.run_iteration()
                self.iteration += 1
                metrics["iteration"] = self.iteration
                if cfg.eval_every > 0 and self.iteration % cfg.eval_every == 0:
                    metrics.update(self.evaluate())
                self.log(metrics)
                # every checkpoint_every iterations, and at the last one (--resume can extend a finished run)
                checkpointed = (cfg.checkpoint_every > 0 and self.iteration % cfg.checkpoint_every == 0) or self.iteration == cfg.iterations
                path = self.save_checkpoint() if checkpointed else None
                signum = stop_everywhere(stop.signum, self._gather)
                if signum is not None:  # the last iteration too: --resume then writes the final outputs (evaluation included)
                    path = path if checkpointed else self.save_checkpoint()
                    raise stop.stopped(signum, self.iteration, cfg.iterations, path,
                                       resume=f"flowalign train --resume {shlex.quote(str(self.run_dir))}")
        ran = self.iteration - first
        # a constant reward, or one whose every sample was dropped; a resumed run's LoRA was trained by earlier sessions
        if first == 0 and ran > 0 and self._untrained_iterations >= ran:
            from flowalign.errors import RewardError

            raise RewardError(f"nothing trained: in all {ran} iterations every group's rewards were equal or dropped (rewards: "
                              f"{', '.join(r.key for r in self.config.rewards)}), so the LoRA is unchanged and no LoRA file or "
                              f"report is written; see reward/*/std and frac_zero_std_groups in metrics.csv")
        if ran > 0 and self.optim.steps_taken == 0:  # every step skipped as non-finite, each streak under the limit
            raise nothing_stepped(f"{self.iteration} iterations")
        self.timings["train"] = self.train_seconds()  # every session's, so a resumed run reports the whole run's
        self.save_final()
        return metrics

    def train_seconds(self) -> float:
        """Wall seconds spent in the training loop so far, earlier sessions (up to the checkpoint resumed) included."""
        running = time.perf_counter() - self._train_start if self._train_start is not None else 0.0
        return self.train_seconds_before + running

    def run_iteration(self) -> dict:
        """Rollout, rewards, advantages and the update for one iteration; return its metrics."""
        start = time.perf_counter()
        batch = self.collect()
        batch.traj.images = None  # scored: the update needs none (fp32, on the device: 3 MiB per 512 px sample)
        metrics = dict(batch.metrics)
        metrics.update(self.update(batch))
        metrics["time/iteration"] = time.perf_counter() - start
        metrics["perf/samples_per_s"] = batch.traj.batch_size * self.accelerator.num_processes / metrics["time/iteration"]
        return metrics

    def collect(self) -> Batch:
        """Draw this process's prompts, roll them out (with the sampling policy), score them and compute advantages.

        With ``train.max_sampling_rounds > 1`` (DAPO's sample-until-full) it draws, rolls out and scores further
        windows of prompts while fewer than ``prompts_per_iter`` groups over all processes have rewards that
        differ; :meth:`advantages` then trains the first ``prompts_per_iter`` groups with a signal, in the order
        one process would have drawn them.
        """
        cfg = self.config.train
        rounds: list[_Round] = []
        timing = {"time/rollout": 0.0, "time/reward": 0.0}
        with_signal = 0
        weights = {r.key: r.weight for r in self.config.rewards}  # a weight-0 reward (logged only) gives no signal
        while True:
            records = self.sampler.next_batch()
            t0 = time.perf_counter()
            # later rounds reuse the first round's noise levels (a random window is drawn once per iteration)
            traj, cond = self._roll_out(records, len(rounds), rounds[0].traj.noise_levels if rounds else None)
            t1 = time.perf_counter()
            total, keep, components, dropped = self._score_rewards(traj)
            timing["time/rollout"] += t1 - t0
            timing["time/reward"] += time.perf_counter() - t1
            rounds.append(_Round(traj, cond, total, keep, components, dropped, len(records)))
            if len(rounds) == cfg.max_sampling_rounds:
                break
            values = ({k: v for k, v in components.items() if weights[k] != 0} if self.config.objective.reward_mix == "advantage"
                      else total)
            with_signal += int(self._sum_over_processes(groups_with_spread(values, traj.group_ids.cpu(), keep)))
            if with_signal >= cfg.prompts_per_iter:
                break
            logger.debug("iteration %d: %d of %d groups with a reward spread after %d rounds: drawing more prompts",
                         self.iteration + 1, with_signal, cfg.prompts_per_iter, len(rounds))
        traj, cond, rewards, keep, components = _join_rounds(rounds)
        metrics = self._reward_metrics(rewards, components, {k: sum(r.dropped[k] for r in rounds) for k in components})
        if self.drift is not None:
            stats = self.drift.pop_stats()  # this process's rollouts: logged over every process's
            metrics.update(runtime.combine_process_metrics(stats) if self.accelerator.num_processes > 1 else stats)
        traj.rewards = rewards
        advantages, keep, adv_metrics = self.advantages(rewards, traj.group_ids, keep, traj=traj, cond=cond, components=components,
                                                        groups_per_round=rounds[0].groups)
        traj.advantages = advantages
        metrics.update(adv_metrics)
        metrics.update({**timing, "nfe": self._sum_over_processes(traj.nfe)})
        metrics.update(noise_metrics(traj.noise_levels, traj.stochastic_mask))
        if cfg.max_sampling_rounds > 1:
            metrics["samples/sampling_rounds"] = float(len(rounds))
        if not self.config.objective.cfg_in_training and cond.uncond is not None:
            cond = type(cond)(cond=cond.cond, uncond=None, extra=cond.extra)
        return Batch(traj=traj, cond=cond, advantages=advantages, keep=keep, metrics=metrics)

    def _roll_out(self, records: list, round_index: int, levels: Optional[Tensor] = None):
        """Encode ``records`` and roll out their groups (round ``round_index`` of the iteration; ``levels`` fixes the
        noise levels of a later round to the first's): the trajectory and the records' conditioning (one row each)."""
        s = self.config.sampling
        bar = self._bar("rollout" if round_index == 0 else f"rollout (round {round_index + 1})",
                        total=s.num_steps * (len(records) if s.noise_seeding == "group" else 1), unit="step")
        first_group = self._global_group(round_index * len(records), len(records))  # this process's first group of the round
        with self._sampling_policy():
            cond = self.adapter.encode([r.prompt for r in records], do_classifier_free_guidance=s.guidance_scale > 1.0)
            traj = runtime.rollout_groups(self.adapter, records, cond, s, self.schedule, self.generator, self.iteration,
                                          self.config.train.seed, first_group=first_group, drift=self.drift, levels=levels,
                                          on_step=None if bar is None else lambda k: bar.update(1),
                                          # the tweedie step rewards read the rollout's own x0-predictions: no second pass
                                          record_x0=bool(self.dense) and self.config.dense.estimator == "tweedie"
                                          and s.rollout == "default")
        if bar is not None:
            bar.close()
        return traj, cond

    def _sampling_policy(self):
        """Context in which the LoRA holds the sampling policy's weights: the soft-updated old policy
        (``train.old_policy_rate > 0``), else the trained weights themselves."""
        return self.optim.old_policy.applied() if self.optim.old_policy is not None else nullcontext()


    def score(self, traj) -> tuple[Tensor, Tensor, dict, dict]:
        """Weighted sum of the configured rewards ``[B]``, the kept-samples mask, reward metrics and each reward's
        scores by key (NaN where dropped)."""
        total, keep, components, dropped = self._score_rewards(traj)
        return total, keep, self._reward_metrics(total, components, dropped), components

    def _score_rewards(self, traj) -> tuple[Tensor, Tensor, dict, dict]:
        """This process's weighted reward sum ``[B]`` (NaN where dropped), kept mask, each reward's scores and
        dropped-sample count by key."""
        from flowalign.rewards import call_reward_batched

        total = torch.zeros(traj.batch_size)
        keep = torch.ones(traj.batch_size, dtype=torch.bool)
        components: dict = {}  # each reward's scores [B] (NaN where dropped), for objective.reward_mix: advantage
        dropped: dict = {}
        bar = self._bar("reward", total=len(self.config.rewards) * traj.batch_size, unit="sample")  # every reward's samples
        for rcfg in self.config.rewards:
            reward = self.rewards[rcfg.key]
            # no autograd: a reward model whose parameters require grad would record its whole graph
            with runtime.reward_device(reward, self.device, self.config.train.offload_rewards), torch.no_grad():
                out = call_reward_batched(reward, traj.images, traj.prompts, traj.metadata or None, on_error=rcfg.on_error,
                                          name=rcfg.key, batch_size=rcfg.batch_size, progress=bar.update if bar is not None else None)
            scores = out.scores.detach().float().cpu()
            components[rcfg.key] = scores
            dropped[rcfg.key] = out.num_dropped
            if rcfg.weight == 0:  # logged only: it counts for nothing, so a sample it drops still trains
                continue
            keep &= out.keep.cpu()
            was_finite = torch.isfinite(total)  # not where an earlier reward dropped the sample
            total += rcfg.weight * scores  # NaN where dropped
            overflow = was_finite & torch.isfinite(scores) & ~torch.isfinite(total)
            if bool(overflow.any()):
                from flowalign.errors import RewardError

                raise RewardError(f"the weighted reward sum overflows float32 at reward {rcfg.key!r} (weight {rcfg.weight}, scores up "
                                  f"to {float(scores[overflow].abs().max()):.3g}); rescale the reward or its weight", reward=rcfg.key)
        if bar is not None:
            bar.close()
        return total, keep, components, dropped

    def _reward_metrics(self, total: Tensor, components: dict, dropped: dict) -> dict:
        """``reward/*`` over every process's samples; stops the run after too many iterations in a row with every
        reward dropped (:meth:`_check_all_dropped`)."""
        metrics: dict = {}
        for key, scores in components.items():
            gathered = self._gather(scores)
            metrics[f"reward/{key}/mean"] = float(gathered.nanmean())
            finite = gathered[~gathered.isnan()]
            metrics[f"reward/{key}/std"] = float(finite.std()) if finite.numel() > 1 else 0.0
            metrics[f"reward/{key}/dropped"] = self._sum_over_processes(dropped[key])
        gathered = self._gather(total)
        self._check_all_dropped(bool(gathered.isnan().all()))
        gathered = gathered[~gathered.isnan()]
        metrics["reward/mean"] = float(gathered.mean()) if gathered.numel() else math.nan
        metrics["reward/std"] = float(gathered.std()) if gathered.numel() > 1 else 0.0
        return metrics

    def _check_all_dropped(self, all_dropped: bool) -> None:
        """Stop with a RewardError after ``train.max_nonfinite_steps`` iterations in a row whose every sample's
        reward was dropped (``on_error: drop`` on a reward that always fails): nothing trains, and the run would
        otherwise end as a success with an untouched LoRA."""
        self._all_dropped_in_row = self._all_dropped_in_row + 1 if all_dropped else 0
        limit = self.config.train.max_nonfinite_steps
        if self._all_dropped_in_row >= limit:
            from flowalign.errors import RewardError

            names = ", ".join(r.key for r in self.config.rewards)
            raise RewardError(f"every sample's reward was dropped in {self._all_dropped_in_row} iterations in a row "
                              f"(train.max_nonfinite_steps={limit}; rewards: {names}): see the warnings above for why")

    def advantages(self, rewards: Tensor, group_ids: Tensor, keep: Tensor, traj=None, cond=None,
                   components: Optional[dict] = None, groups_per_round: Optional[int] = None) -> tuple[Tensor, Tensor, dict]:
        """Advantages ``[B]`` (group-normalised outcome; with ``objective.reward_mix: advantage`` the weighted sum
        of each reward's own, from ``components``, its scores by name) or ``[B, K]`` (dense objectives, from
        ``flowalign.step_rewards.dense_step_advantages``); samples with a dropped reward or only
        zero advantages are masked out, and with ``train.oversample > 1`` (or more than one sampling round:
        ``group_ids`` numbered round after round, ``groups_per_round`` of them per process and round) those past
        the first ``prompts_per_iter`` groups with a kept sample over all processes, in the order drawn."""
        from flowalign.advantages import first_informative_groups, flat_group_ends, mean_group_std, nonzero_mask, zero_variance_fraction

        ocfg = self.config.objective
        group_ids = group_ids.cpu()
        metrics: dict = {}
        num_groups = int(group_ids.unique().numel())
        per_round = groups_per_round or num_groups
        select = self.config.train.oversample > 1.0 or num_groups > per_round  # DAPO's group choice (below)
        gathers = self.accelerator.num_processes > 1 and (self.dense or ocfg.adv_std == "global")
        rank = self._draw_rank(group_ids, per_round) if select or gathers else None  # every process's rows' draw positions
        if self.dense:
            from flowalign.step_rewards import dense_step_advantages

            # advantages over every process's rows in draw order (a global std, TP-GRPO's balancing), so they do not depend
            # on the process count
            gather = (lambda v, ids: self._gather_batch(v, ids, rank)) if self.accelerator.num_processes > 1 else None
            bar = {}

            def progress(done: int, total: int) -> None:  # the phase's transformer rows, then its decoded and scored rows
                if "bar" not in bar:
                    bar["bar"] = self._bar("step rewards", total=total, unit="row")
                if bar["bar"] is not None:
                    bar["bar"].update(done - bar["bar"].n)

            with runtime.rewards_on_device(self.rewards.values(), self.device, self.config.train.offload_rewards):
                adv, metrics = dense_step_advantages(self.adapter, traj, cond, self.rewards, self.config, gather=gather, progress=progress)
            if bar.get("bar") is not None:
                bar["bar"].close()
            adv = adv.cpu()
            if self.accelerator.num_processes > 1:  # the dense/* diagnostics over every process's samples
                metrics = runtime.combine_process_metrics(metrics, sum_keys=("dense/nfe", "dense/dropped"))
                metrics["dense/nfe_per_sample"] = metrics["dense/nfe"] / (traj.batch_size * self.accelerator.num_processes)
        elif getattr(self.objective, "advantages", None) is not None:  # the objective's own estimator (a tree's backup)
            adv = self._objective_advantages(rewards, group_ids, keep, traj, components)
        else:
            # one reward (the weighted sum), or each reward on its own scale (objective.reward_mix: advantage)
            if ocfg.reward_mix == "advantage" and components:
                weights = {r.key: r.weight for r in self.config.rewards if r.weight != 0}  # a weight-0 reward is logged only
                values = {key: components[key] for key in weights}
            else:
                values, weights = {"total": rewards}, {"total": 1.0}
            ids, mine = group_ids, slice(None)
            if ocfg.adv_std == "global" and self.accelerator.num_processes > 1:
                # the std runs over every process's samples: normalise the gathered batch, keep our rows
                gathered = {name: self._gather_batch(v, group_ids, rank) for name, v in values.items()}
                ids, mine = next(iter(gathered.values()))[1:]
                values = {name: g[0] for name, g in gathered.items()}
            adv = kept_multi_reward_advantages(values, ids, weights, std=ocfg.adv_std, eps=ocfg.adv_eps, clip=ocfg.adv_clip)[mine]
        keep = keep & nonzero_mask(adv)
        all_ids = self._gather_group_ids(group_ids)  # every process's rows, in process order
        if select:
            # DAPO's dynamic sampling: the first prompts_per_iter groups with a signal over every process's groups, in the
            # order one process would roll them out (the sampler splits each window in process order; windows follow each
            # other), so the trained rows do not depend on the process count
            chosen = first_informative_groups(self._gather(keep.float()).bool(), all_ids, self.config.train.prompts_per_iter, rank=rank)
            keep = chosen[self._own_rows(keep.shape[0])]
            metrics["samples/groups_trained"] = float(all_ids[chosen].unique().numel())
        trained = self._gather(keep.float()).bool()
        if not bool(trained.any()):
            self._untrained_iterations += 1
            if self.accelerator.is_main_process:
                logger.warning("iteration %d trains no sample: every group's rewards are equal (or dropped), so every advantage is 0",
                               self.iteration + 1)
        metrics.update({  # over every process's samples (the main process logs them)
            "frac_zero_std_groups": zero_variance_fraction(self._gather(fill_dropped(rewards, group_ids)), all_ids),
            **dict(zip(("frac_zero_std_groups/at_max", "frac_zero_std_groups/at_min"),
                       flat_group_ends(self._gather(rewards.float()), all_ids))),
            "reward/group_std_mean": mean_group_std(self._gather(rewards.float()), all_ids),  # the spread GRPO learns from
            "samples/kept_frac": float(trained.float().mean()),
            # over the trained rows (dropped, flat-group and oversampled-out rows have no advantage to speak of)
            "advantages/abs_mean": float(self._gather(adv.abs().float())[trained].mean()) if bool(trained.any()) else float("nan"),
        })
        return adv, keep, metrics

    def _objective_advantages(self, rewards: Tensor, group_ids: Tensor, keep: Tensor, traj, components: Optional[dict]) -> Tensor:
        """The objective's ``advantages(rewards=, group_ids=, keep=, traj=, components=)``: ``[B]`` or ``[B, K]`` for this
        process's rows (a group's rows are all on one process), checked, 0 on the rows whose reward was dropped."""
        name = self.config.objective.name
        adv = self.objective.advantages(rewards=rewards, group_ids=group_ids, keep=keep, traj=traj, components=components)
        if not isinstance(adv, Tensor) or not adv.is_floating_point():
            raise ConfigError(f"objective {name!r}: advantages() must return a floating tensor, got {type(adv).__name__}")
        adv = adv.detach().float().cpu()
        batch, steps = traj.batch_size, traj.num_steps
        if adv.shape not in ((batch,), (batch, steps)):
            raise ConfigError(f"objective {name!r}: advantages() returned shape {list(adv.shape)}; expected [B]=[{batch}] or "
                             f"[B, K]=[{batch}, {steps}]")
        if adv.ndim == 2 and self.forward_process:
            raise ConfigError(f"objective {name!r}: a forward-process objective weighs whole samples; advantages() must return [B], "
                             f"got [B, K]={list(adv.shape)}")
        rows = keep if adv.ndim == 1 else keep[:, None].expand_as(adv)
        if not bool(torch.isfinite(adv[rows]).all()):
            raise ConfigError(f"objective {name!r}: advantages() returned non-finite values on samples whose reward was kept")
        return torch.where(rows, adv, torch.zeros(()))

    # ================================================================= update

    def _train_guidance(self) -> float:
        return self.config.sampling.guidance_scale if self.config.objective.cfg_in_training else 1.0

    def _trained_steps(self, traj) -> list[int]:
        """The first ``timestep_fraction`` of the stochastic steps (at least one)."""
        stochastic = torch.nonzero(traj.stochastic_mask.cpu()).flatten().tolist()
        if not stochastic:
            logger.warning("iteration %d: no rollout step was stochastic (a moving noise window on a step without noise, such as "
                           "CPS's last): nothing to train this iteration", self.iteration + 1)
        n = max(1, int(round(len(stochastic) * self.config.objective.timestep_fraction, 9)))  # round: 50 * 0.58 is 28.999999999999996
        return stochastic[:n]

    def _plan(self, batch: Batch) -> list["PlanItem"]:
        """Micro-batches ``PlanItem(rows, step)`` of one inner epoch: shuffled samples, chunk-major
        (forward-process objectives: ``(sample indices, draw j)`` for j < objective.num_timesteps; an objective with
        ``update_unit = "trajectory"``: ``(sample indices, None)``, every trained step of those samples at once)."""
        kept = torch.nonzero(batch.keep).flatten()
        order = kept[torch.randperm(kept.numel(), generator=self.generator)]
        size = self.config.train.micro_batch_size
        steps = list(range(self.objective.num_timesteps)) if self.forward_process else self._trained_steps(batch.traj)
        self._plan_steps = steps
        if self._trajectory_unit:
            return [PlanItem(order[i:i + size], None) for i in range(0, order.numel(), size)] if steps else []
        return [PlanItem(order[i:i + size], k) for i in range(0, order.numel(), size) for k in steps]

    def _row_samples(self, index: Tensor, k: Optional[int]) -> Tensor:
        """Which sample each row of micro-batch ``(index, k)`` is: ``index``, or for a trajectory item (``k`` None)
        ``index`` once per trained step, step-major (the rows :meth:`_make_batch` builds)."""
        return index if k is not None else index.repeat(len(self._plan_steps))

    def velocity_fns(self, cond, reference_cond=None):
        """``policy(x, sigma)`` (LoRA on, with grad) and ``reference`` (LoRA off or the starting LoRA, no grad; None when
        the objective needs no reference) with ``cond`` (and ``reference_cond`` for the reference;
        default ``cond``) bound, CFG as configured for training."""
        return velocity_fns(self.adapter, cond, self._train_guidance(), getattr(self.objective, "needs_reference", False), reference_cond,
                            self.reference_lora)

    def _remove_grids_after(self, iteration: int) -> None:
        """Delete ``samples/iter_N.png`` grids past ``iteration`` (a resume's checkpoint): the run they showed stopped, and
        this one replays those iterations or, resumed to an earlier end, never reaches them."""
        for grid in (self.run_dir / "samples").glob("iter_*.png"):
            if (grid_iteration(grid) or 0) > iteration:
                grid.unlink()

    def _warn_steps_per_pass(self, steps: int, micro_batches: int, accum: int) -> None:
        """Warn once when a pass takes several optimizer steps under a PPO clip so tight that only the first is on-policy
        (Flow-GRPO's 1e-4: after one step most ratios leave it and their rows stop training): usually a lowered
        ``train.micro_batch_size`` (for memory) that multiplied the micro-batches under a fixed ``grad_accum``."""
        clip = getattr(self.objective, "clip_range", None)
        if steps <= 1 or self._warned_steps_per_pass or not isinstance(clip, (int, float)) or clip >= 1e-3:
            return
        self._warned_steps_per_pass = True
        logger.warning("each update pass takes %d optimizer steps (%d micro-batches of train.micro_batch_size=%d, grad_accum=%d) "
                       "under clip_range %g: the rows of every step after the first are mostly clipped. For one step per pass "
                       "set train.grad_accum=null (micro_batch_size is then a memory knob only); see policy/clip_frac",
                       steps, micro_batches, self.config.train.micro_batch_size, accum, clip)

    def update(self, batch: Batch) -> dict:
        """``inner_epochs`` passes of micro-batches with gradient accumulation; return the metrics: each
        micro-batch metric averaged over the rows of every micro-batch (of every process), and the optimizer's."""
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        stats = self.optim.new_stats()
        self.optim.set_lr(self.iteration)
        before = [p.detach().float().clone() for p in self.optim.params]  # for optim/update_norm (LoRA weights: small)
        for epoch in range(self.config.train.inner_epochs):
            plan = self._plan(batch)
            # rows of every process's micro-batches: the same number of optimizer steps everywhere (runtime.py)
            sizes = runtime.slot_sizes([index.numel() for index, _ in plan], self.accelerator)  # [world, S]
            num_slots = sizes.shape[1]
            accum = self.config.train.grad_accum or max(1, num_slots)  # null: every micro-batch of the pass in one step
            self._warn_steps_per_pass(math.ceil(num_slots / accum), num_slots, accum)
            if self.forward_process and epoch == 0:
                self._prepare_forward_draws(batch, plan, optimizer_steps=self.config.train.inner_epochs * math.ceil(num_slots / accum))
            every = self.config.train.ref_kl_every
            if epoch == 0 and plan and not getattr(self.objective, "needs_reference", False) and every > 0 and (self.iteration + 1) % every == 0:
                # the first micro-batch's rows at every trained step (the plan is chunk-major): the quantity the
                # objective's own kl/ref averages when kl_beta > 0, on fewer rows
                first = [item for item in plan if torch.equal(item.rows, plan[0].rows)]
                rows = sum(item.rows.numel() for item in first)
                sums["kl/ref"] = sum(self._reference_kl(batch, *item) * item.rows.numel() for item in first)
                counts["kl/ref"] = rows
            for i in self._tqdm(range(num_slots), "update"):
                group_start = (i // accum) * accum
                group_end = min(group_start + accum, num_slots)
                if i < len(plan):
                    index, k = plan[i]
                    # this micro-batch's share of the rows of its accumulation group over all processes
                    step_metrics = self._micro_step(batch, index, k, scale=index.numel() / float(sizes[:, group_start:group_end].sum()))
                    if "policy/clip_frac" in step_metrics and not self.forward_process and k is not None:  # which steps clip: a low-noise
                        # step whose ratio moves with float rounding alone shows here first (flowalign.sde.log_prob)
                        step_metrics[f"policy/clip_frac/step_{k:02d}"] = step_metrics["policy/clip_frac"]
                    for key, value in step_metrics.items():  # weighted by rows: a short last chunk counts for its rows
                        sums[key] = sums.get(key, 0.0) + value * index.numel()
                        counts[key] = counts.get(key, 0) + index.numel()
                if i == group_end - 1:
                    self.optim.step(stats)
        if self.accelerator.num_processes > 1:
            self.optim.check_nonfinite()
            sums, counts = runtime.sum_metrics_across_processes(sums, counts)  # the mean over every process's micro-batches
        metrics = {key: sums[key] / counts[key] for key in sums}
        metrics.update(self.optim.metrics(stats))
        decay = self.optim.update_old_policy()  # the next iteration's sampler
        if decay is not None:
            metrics["old_policy/decay"] = decay
        kl_decay = self.optim.update_kl_ema()  # the objective's own penalty target (AWM's KL-EMA)
        if kl_decay is not None:
            metrics["kl_ema/decay"] = kl_decay
        with torch.no_grad():  # how far this iteration moved the LoRA: the PPO ratios stay 1 with one optimizer step
            metrics["optim/update_norm"] = float(sum(float((p.detach().float() - b).square().sum()) for p, b in
                                                     zip(self.optim.params, before)) ** 0.5)
            metrics["optim/lora_norm"] = float(sum(float(p.detach().float().square().sum()) for p in self.optim.params) ** 0.5)
        metrics["time/update"] = time.perf_counter() - t0
        return metrics

    def _prepare_forward_draws(self, batch: Batch, plan: list, optimizer_steps: int) -> None:
        """This iteration's forward-process sigmas and noises (shared by its inner epochs); the sampling policy's
        velocity ``v_old`` at every row, before the first step, when it differs from the trained policy during the
        update (more than one optimizer step, or a lagging old policy)."""
        group_generator = None
        if self.config.sampling.noise_seeding == "group":  # each group's draws from its own stream: layout-invariant
            per_round = trainer_setup.prompts_drawn_per_process(self.config.train, self.accelerator.num_processes)
            seed, iteration = self.config.train.seed, self.iteration
            group_generator = lambda g: runtime.forward_generator(seed, iteration, self._global_group(g, per_round))  # noqa: E731
        self._draws = fp.draw(batch.traj, self.objective, self.config.objective.timestep_fraction, self.generator, group_generator)
        if optimizer_steps > 1 or self.optim.old_policy is not None:
            with self._sampling_policy():  # batch.cond is the rollout's encoding, by the same weights
                fp.old_velocities(batch.traj, batch.advantages, self._draws, plan,
                                  lambda index: self.velocity_fns(batch.cond_rows(index))[0], self.device)

    def _make_batch(self, batch: Batch, index: Tensor, k: Optional[int], for_loss: bool = True):
        """The objective's rows for micro-batch ``(index, k)``: a StepBatch of step k (``k`` None: of every trained
        step, step-major), or a ForwardBatch of draw k (with ``v_ema``, the velocity of the LoRA's EMA weights, when
        the objective ``needs_ema`` and the rows are ``for_loss``; a diagnostic needs no extra forward)."""
        if k is None:
            reduce, form = self.config.sampling.log_prob_reduce, self.config.sampling.log_prob_form
            return concat_step_batches([make_step_batch(batch, index, step, reduce, self.device, form) for step in self._plan_steps])
        if self.forward_process:
            rows = fp.make_forward_batch(batch.traj, batch.advantages, self._draws, index, k, self.device)
            if for_loss and getattr(self.objective, "needs_ema", False):
                rows.v_ema = self._ema_velocity(batch, index, rows)
            return rows
        return make_step_batch(batch, index, k, self.config.sampling.log_prob_reduce, self.device, self.config.sampling.log_prob_form)

    @torch.no_grad()
    def _ema_velocity(self, batch: Batch, index: Tensor, rows) -> Tensor:
        """The velocity at the rows' ``x_s`` with every LoRA (text encoders included: the prompts are re-encoded)
        holding its EMA weights (the objective's own KL-EMA copy when it keeps one, else ``train.ema``'s), training's CFG."""
        with (self.optim.kl_ema if self.optim.kl_ema is not None else self.optim.ema).applied():
            cond = self.conditioning.policy(batch, index, requires_grad=False)
            return velocity_fns(self.adapter, cond, self._train_guidance(), False)[0](fp.noised(rows), rows.sigma)

    @torch.no_grad()
    def _reference_kl(self, batch: Batch, index: Tensor, k: int) -> float:
        """Diagnostic KL to the reference (LoRA off, or the starting LoRA) on one micro-batch, for objectives that do not
        compute it (kl_beta = 0): mean over rows of (mean_theta - mean_ref)^2 / (2 std^2), times
        |sigma - sigma_next| under the objective's ``kl_form: per_time``, as its own penalty would weigh it
        (forward-process objectives: mean ||v_theta - v_ref||^2 at their noised rows)."""
        from flowalign.objectives.grpo import kl_in_form, mean_kl, transition_mean

        samples = self._row_samples(index, k)
        policy, reference = velocity_fns(self.adapter, self.conditioning.policy(batch, samples, requires_grad=False), self._train_guidance(),
                                         True, self.conditioning.reference(batch, samples), self.reference_lora)
        rows = self._make_batch(batch, index, k, for_loss=False)
        if self.forward_process:
            return fp.reference_gap(rows, policy, reference)
        mean, std = transition_mean(rows, policy)
        mean_ref, _ = transition_mean(rows, reference)
        return float(kl_in_form(mean_kl(mean, mean_ref, std, reduce=rows.log_prob_reduce), rows,
                                getattr(self.objective, "kl_form", "transition")).mean())

    def _micro_step(self, batch: Batch, index: Tensor, k: int, scale: float) -> dict:
        """Forward + backward of one micro-batch; a non-finite loss is skipped (and counted)."""
        rows = self._make_batch(batch, index, k)
        samples = self._row_samples(index, k)
        needs_reference = getattr(self.objective, "needs_reference", False)
        with lora_lib.lora_dropout_active(*self.lora_modules.values()):  # lora.dropout acts in this forward only
            policy, reference = self.velocity_fns(self.conditioning.policy(batch, samples),
                                                  self.conditioning.reference(batch, samples) if needs_reference else None)
            loss, metrics = checked_loss(self.objective.loss(rows, policy, reference), self.config.objective.name)
        metrics = {"loss/total": float(loss.detach()), **metrics}  # an objective of the user's need not report its loss
        where = f"at step {k}" if k is not None else f"at steps {self._plan_steps}"
        return metrics if self.optim.backward(loss * scale, where) else {}

    # ================================================================= logging / eval

    def _progress(self, desc: str) -> bool:
        return self.config.train.progress and self.accelerator.is_main_process

    def _bar(self, desc: str, total: int, unit: str):
        """A tqdm bar for a phase that is not a loop of its own (the rollout's denoising steps), or None."""
        if not self._progress(desc):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"[{self.iteration + 1}/{self.config.train.iterations}] {desc}", unit=unit, leave=False)

    def _tqdm(self, iterable, desc: str):
        if not self._progress(desc):
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=f"[{self.iteration + 1}/{self.config.train.iterations}] {desc}", leave=False)

    def log(self, metrics: dict) -> None:
        """Append ``metrics`` of the current iteration to metrics.csv and the trackers (main process)."""
        if self.run_log is not None:
            shown = [f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith(("reward/mean", "kl", "loss/total"))]
            if self._train_start is not None:  # the whole run's pace, so a long recipe says when it will end
                shown.append(pace(time.perf_counter() - self._train_start, self.iteration - self._first_iteration,
                                  self.config.train.iterations - self.iteration))
            logger.info("iteration %d: %s", self.iteration, ", ".join(s for s in shown if s))
            self.run_log.log(metrics, self.iteration)

    def _gather(self, tensor: Tensor) -> Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.gather(tensor.to(self.device)).cpu()

    def _gather_group_ids(self, group_ids: Tensor) -> Tensor:
        """Every process's ``group_ids`` in process order, made distinct across processes."""
        return self._gather(group_ids + 10**9 * self.accelerator.process_index)

    def _global_group(self, local, groups_per_round: int):
        """:func:`runtime.global_group_index` of this process's group id(s) ``local``."""
        return runtime.global_group_index(local, groups_per_round, self.accelerator.process_index, self.accelerator.num_processes)

    def _draw_rank(self, group_ids: Tensor, groups_per_round: int) -> Tensor:
        """Every process's rows' group position in the order one process would draw them: round after round, each
        round's window split over the processes in process order (``group_ids``: this process's, numbered round
        after round, ``groups_per_round`` per round)."""
        return self._gather(self._global_group(group_ids.cpu().long(), groups_per_round))

    def _sum_over_processes(self, value: float) -> float:
        """A count (NFE, dropped samples) summed over every process."""
        return float(self._gather(torch.tensor([float(value)])).sum())

    def _gather_batch(self, values: Tensor, group_ids: Tensor, rank: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Any]:
        """Every process's ``values`` and (distinct) ``group_ids``, and the index of this process's rows in them.

        With ``rank`` (every process's rows' draw positions, :meth:`_draw_rank`) the rows come in the order one process
        would draw them, so that a computation over the gathered batch whose result depends on row order (TP-GRPO's
        balancing breaks ties by position) does not depend on the process count; with one round that is the process
        order itself."""
        gathered, ids, own = self._gather(values), self._gather_group_ids(group_ids), self._own_rows(values.shape[0])
        if rank is None:
            return gathered, ids, own
        order, position = runtime.draw_order(rank)
        return gathered[order], ids[order], position[own]

    def _own_rows(self, rows: int) -> slice:
        """This process's rows of a gathered tensor whose processes each gave ``rows``."""
        return slice(self.accelerator.process_index * rows, (self.accelerator.process_index + 1) * rows)

    @torch.no_grad()
    def evaluate(self, tag: Optional[str] = None) -> dict:
        """ODE samples of the eval prompts (EMA weights when enabled): an image grid and eval rewards."""
        from flowalign import sampling
        from flowalign.plots import image_grid
        from flowalign.rewards import call_reward_batched

        s = self.config.sampling
        prompts = [r.prompt for r in self.eval_records]
        generator = torch.Generator().manual_seed(self.config.train.seed + 1)  # same noise at every eval
        with self.ema.applied() if self.ema is not None else nullcontext():
            images = sampling.sample_ode(self.adapter, prompts, num_steps=s.eval_num_steps, guidance_scale=s.guidance_scale, generator=generator,
                                         micro_batch_size=s.micro_batch_size)  # in chunks, as the rollouts (memory)
        metrics = {}
        for rcfg in self.config.rewards:
            with runtime.reward_device(self.rewards[rcfg.key], self.device, self.config.train.offload_rewards):
                out = call_reward_batched(self.rewards[rcfg.key], images, prompts, [dict(r.metadata) for r in self.eval_records],
                                          on_error="drop", batch_size=rcfg.batch_size)
            metrics[f"eval/{rcfg.key}/mean"] = float(out.scores.float().nanmean())
        if self.accelerator.is_main_process:
            name = tag or f"iter_{self.iteration:06d}"
            image_grid(images.cpu(), self.run_dir / "samples" / f"{name}.png", nrow=4, captions=prompts)
            if tag is None:
                prune_eval_grids(self.run_dir / "samples", self.config.train.keep_eval_grids, current=self.iteration)
        return metrics

    # ================================================================= save / resume

    def state_dict(self) -> tuple[dict, dict]:
        """(tensor groups, JSON state) of everything needed to continue bit-exactly (train/trainer_checkpoint.py)."""
        return trainer_checkpoint.trainer_state(self)

    def save_checkpoint(self) -> Optional[Path]:
        """Atomically write ``checkpoints/iter_XXXXXX`` (main process), keeping the last K."""
        return trainer_checkpoint.save_trainer_checkpoint(self)

    def _load_checkpoint(self, path: Path) -> None:
        trainer_checkpoint.restore_trainer_checkpoint(self, path)

    def save_final(self) -> Optional[Path]:
        """``pytorch_lora_weights.safetensors`` (EMA weights when enabled), eval grid, reward curve
        and, when ``train.eval_prompts`` is set, the held-out report (train/final_outputs.py)."""
        return final_outputs.write_final_outputs(self)

    def heldout_report(self) -> Optional[Path]:
        """Base (LoRA off) vs aligned on ``train.eval_prompts``: ``report.md``, ``before_after.png`` (train/final_outputs.py)."""
        return final_outputs.write_heldout_report(self)

    def cleanup(self) -> None:
        """Close trackers, release the process group and the run folder's lock."""
        if self.run_log is not None:
            self.run_log.close()
        if self._lock is not None:
            self._lock.release(remove_if_unused=True)  # a run that stopped at setup leaves no folder behind
            self._lock = None
        if hasattr(self, "accelerator"):
            runtime.release_process_group(self.accelerator)  # also destroys the process group
            if self.accelerator.num_processes > 1 and not torch.distributed.is_initialized():
                logger.info("process %d of %d: process group destroyed", self.accelerator.process_index, self.accelerator.num_processes)


def train(config: FlowalignConfig, resume: Union[bool, str, Path] = False, overwrite: bool = False) -> dict:
    """Set up, train, save and clean up one run; return the last iteration's metrics."""
    trainer = Trainer(config, resume=resume, overwrite=overwrite)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
