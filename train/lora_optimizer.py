"""The online trainer's optimizer step over the LoRA parameters (DESIGN.md §9).

One optimizer step, in order::

    set_lr(iteration)        lr = train.lr x schedule(iteration) x group["lr_ratio"]
    backward(loss)           per micro-batch (fp16: through the dynamic loss scaler)
    step(stats)              sum gradients across processes -> unscale -> clip to max_grad_norm
                             -> skip if the norm is not finite, else AdamW step -> EMA update
                             (train.ema_decay, or the power schedule's decay at this step)
    update_old_policy()      after the iteration's last step: the soft-updated sampling policy
                             (train.old_policy_rate > 0; DiffusionNFT's old <- d·old + (1 - d)·θ)

The non-finite guard counts consecutive skipped micro-batches (a NaN/inf loss; a finite one resets
it) and, apart, consecutive skipped optimizer steps (a NaN/inf gradient norm behind finite losses;
an applied step resets it). At ``train.max_nonfinite_steps`` in a row of either (on any process)
training stops with :class:`NonFiniteLossError`. Under fp16 an overflow the loss scaler answers by
halving its scale is not a failure: it counts only once the scale has fallen below 1. Both counters
are part of the checkpoint, so a resumed run stops where an uninterrupted one would.

The pipeline's modules are never wrapped (``train/runtime.py``): gradients of the (small) LoRA
are summed across processes by hand here, each process having weighted its micro-batches by their
share of the accumulation group's rows, so every process applies the same update.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from flowalign import lora as lora_lib
from flowalign.errors import CheckpointError, NonFiniteLossError
from flowalign.lr_schedule import lr_multiplier

logger = logging.getLogger(__name__)


class LoraOptimizer:
    """AdamW over LoRA parameter groups with the lr schedule, cross-process gradient sum,
    clipping, the non-finite guard, fp16 loss scaling, an optional EMA and an optional soft-updated
    old (sampling) policy.

    Args:
        groups: ``[{"params": [...], "lr_ratio": r}, ...]``: one group per learning rate
            (the transformer's LoRA at ratio 1, the text encoders' at ``text_encoder_lr / lr``).
        train_cfg: the ``train`` section (lr, schedule, AdamW, clipping, EMA, mixed precision).
        accelerator: the run's ``accelerate.Accelerator`` (process count, gradient reduction).
        device_type: ``"cpu"`` / ``"cuda"``: where the fp16 loss scaler runs.
        gather: ``tensor -> tensor`` gathered over processes (identity with one).
        prefix, unit: how messages name the config keys (``"train."``) and the schedule's steps
            (``"iteration"``); the offline trainer passes ``""`` and ``"step"``.
    """

    def __init__(self, groups: list[dict], train_cfg, accelerator, device_type: str, gather: Callable[[Tensor], Tensor],
                 prefix: str = "train.", unit: str = "iteration", model_dtype: Optional[torch.dtype] = None,
                 kl_ema: Optional[tuple[Optional[float], float]] = None):
        self.cfg = train_cfg
        self.prefix, self.unit = prefix, unit
        self.accelerator = accelerator
        self.gather = gather
        self.params: list[Tensor] = [p for group in groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.adam_betas), eps=train_cfg.adam_eps,
                                           weight_decay=train_cfg.weight_decay)
        self.ema = lora_lib.LoraEMA(self.params, train_cfg.ema_decay) if train_cfg.ema else None
        # DiffusionNFT's old policy: rollouts (and v_old) use these weights; None = on-policy
        self.old_policy = lora_lib.LoraEMA(self.params, 0.5) if train_cfg.old_policy_rate > 0 else None  # each update passes its decay
        # an objective's own penalty target (AWM's KL-EMA: ``(rate, max)``), soft-updated after each iteration
        self.kl_ema_schedule = kl_ema
        self.kl_ema = lora_lib.LoraEMA(self.params, 0.5) if kl_ema is not None else None
        self.steps_taken = 0  # optimizer steps applied so far (the old policy's schedule reads it)
        # fp16 gradients of small losses underflow: dynamic loss scaling (bf16 has fp32's range and needs none), under fp16
        # autocast and for a model whose weights are fp16 (model.dtype: float16), whose activations' gradients are fp16 too
        # (unscaled, 64% of a tiny-sd3 step's LoRA gradient entries underflowed to 0: cosine 0.79 to the fp32 gradient)
        fp16 = train_cfg.mixed_precision == "fp16" or model_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device_type) if fp16 else None
        self.nonfinite_in_row = 0  # consecutive micro-batches with a non-finite loss
        self.skipped_steps_in_row = 0  # consecutive optimizer steps skipped for a non-finite gradient norm
        self.iteration = 0  # 0-based, set by set_lr at the start of each update; messages print it 1-based (as metrics.csv)
        self.skipped_microbatches = 0  # non-finite losses skipped since the last new_stats (this process's)

    # ----------------------------------------------------------------------------- learning rate

    def set_lr(self, iteration: int) -> None:
        """``train.lr`` times the schedule's factor at ``iteration`` (flowalign.lr_schedule), times
        each parameter group's ``lr_ratio``."""
        t = self.cfg
        self.iteration = iteration
        lr = t.lr * lr_multiplier(t.lr_schedule, min(iteration, t.iterations - 1), t.iterations, t.lr_warmup, t.lr_min_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)

    # ----------------------------------------------------------------------------- micro-batches

    def backward(self, loss: Tensor, what: str) -> bool:
        """Backpropagate a micro-batch's (already weighted) loss; a non-finite one is skipped and
        counted instead. Returns whether it was applied."""
        if not torch.isfinite(loss):
            self.count_nonfinite(f"loss {float(loss.detach())} {what}")
            self.skipped_microbatches += 1
            return False
        self.nonfinite_in_row = 0
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return True

    # ----------------------------------------------------------------------------- the step

    def step(self, stats: dict) -> None:
        """Sum the (row-weighted) gradients across processes, clip, step; a non-finite gradient norm
        skips the step (and is counted). ``stats`` collects ``steps``, ``skipped`` and ``grad_norm``."""
        applied = any(p.grad is not None for p in self.params)  # False: every micro-batch of the group was skipped
        if self.accelerator.num_processes > 1:
            self.check_nonfinite()
            # per parameter: did any process give it a gradient? (one without any, as with one process, is not stepped:
            # a zero gradient would still move it by weight decay and its old momentum)
            has_grad = torch.tensor([float(p.grad is not None) for p in self.params], device=self.params[0].device)
            has_grad = self.accelerator.reduce(has_grad, reduction="sum")
            if float(has_grad.sum()) == 0:  # skipped on every process: no step anywhere
                return
            for p, anywhere in zip(self.params, has_grad.tolist()):
                if anywhere == 0:
                    p.grad = None
                    continue
                if p.grad is None:  # this process skipped: its share of the sum is zero
                    p.grad = torch.zeros_like(p)
                p.grad = self.accelerator.reduce(p.grad, reduction="sum")
        elif not applied:
            return
        if self.scaler is not None:
            # a process whose micro-batches were all skipped has never scaled a loss, and the scaler creates its scale
            # tensor on the first scale() (after a resume too): create it, or unscale_ fails
            self.scaler.scale(torch.zeros((), device=self.params[0].device))
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.max_grad_norm or float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()  # lower the loss scale
            stats["skipped"] += 1
            if self.scaler is not None and self.scaler.get_scale() >= 1.0:  # fp16 overflow: the scaler lowered its scale
                logger.info("%s %d: fp16 gradient overflow, step skipped and the loss scale lowered to %g",
                            self.unit, self.iteration + 1, self.scaler.get_scale())
                return  # not a failure (a real NaN keeps halving it, and counts once it is below 1)
            self.count_nonfinite(f"gradient norm {norm}", step=True)
            return
        if norm == 0.0:  # no signal (every group's rewards tied): no step, or weight decay and old momentum would move the LoRA
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            stats["zero"] = stats.get("zero", 0) + 1
            return
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all()):  # a finite step that overflowed them (one sync)
            raise NonFiniteLossError(
                f"{self.unit} {self.iteration + 1}: the LoRA weights are NaN / inf after an optimizer step (gradient norm "
                f"{norm:.3g}, lr {self.optimizer.param_groups[0]['lr']:.3g}): the update diverged; lower {self.prefix}lr or set "
                f"{self.prefix}max_grad_norm (the last checkpoint holds finite weights)")
        self.steps_taken += 1
        self.skipped_steps_in_row = 0
        every = getattr(self.cfg, "ema_every", 1)
        if self.ema is not None and self.steps_taken % every == 0:
            schedule = self.cfg.ema_schedule
            if schedule == "power":  # its t counts the EMA's own updates (the first one copies the weights)
                decay = lora_lib.power_ema_decay(self.steps_taken // every, self.cfg.ema_power)
            elif schedule == "warmup":  # Flow-GRPO's: from the 0-based optimizer step, as its EMAModuleWrapper.step gets it
                decay = lora_lib.warmup_ema_decay(self.steps_taken - 1, self.cfg.ema_decay)
            else:
                decay = None
            self.ema.update(decay)
        stats["steps"] += 1
        stats["grad_norm"].append(norm)

    def update_kl_ema(self) -> Optional[float]:
        """``kl_ema <- d·kl_ema + (1 - d)·θ`` with ``d = min(max, rate·steps_taken)`` (``rate`` None: ``d = max``), after an
        iteration's update (AWM's official KL-EMA, soft-updated once per epoch); returns ``d``, or None without one."""
        if self.kl_ema is None:
            return None
        rate, max_decay = self.kl_ema_schedule
        decay = max_decay if rate is None else lora_lib.soft_update_decay(self.steps_taken, rate, max_decay)
        self.kl_ema.update(decay)
        return decay

    def update_old_policy(self) -> Optional[float]:
        """``old <- d·old + (1 - d)·θ`` with ``d = soft_update_decay(steps_taken, ...)`` (call after an
        iteration's update); returns ``d``, or None when sampling is on-policy."""
        if self.old_policy is None:
            return None
        decay = lora_lib.soft_update_decay(self.steps_taken, self.cfg.old_policy_rate, self.cfg.old_policy_max, self.cfg.old_policy_flat)
        self.old_policy.update(decay)
        return decay

    def new_stats(self) -> dict:
        """An empty ``stats`` for :meth:`step` (and the skipped micro-batch count starts again)."""
        self.skipped_microbatches = 0
        return {"steps": 0, "skipped": 0, "grad_norm": []}

    def metrics(self, stats: dict) -> dict[str, float]:
        """One update's optimizer metrics (slash names, as logged): ``grad_norm`` (mean before clipping over the
        applied steps; absent when none was applied, rather than a 0 that drags curves down), ``optim/steps`` (applied
        this update), ``optim/global_step`` (applied since the run began: the x-axis of runs with another
        ``grad_accum`` / ``inner_epochs``), ``optim/skipped_nonfinite`` (steps skipped for a non-finite gradient norm),
        ``optim/skipped_microbatches`` (micro-batches skipped for a non-finite loss, over every process), ``optim/skipped_zero``
        (steps not applied for an all-zero gradient: no signal, e.g. every group's rewards tied), ``optim/lr``."""
        norms = stats["grad_norm"]
        skipped = self.gather(torch.tensor([float(self.skipped_microbatches)])).sum()
        out = {"optim/steps": float(stats["steps"]), "optim/global_step": float(self.steps_taken),
               "optim/skipped_nonfinite": float(stats["skipped"]), "optim/skipped_microbatches": float(skipped),
               "optim/skipped_zero": float(stats.get("zero", 0)),
               "optim/lr": self.optimizer.param_groups[0]["lr"]}
        if norms:
            out["grad_norm"] = sum(norms) / len(norms)
        if len(self.optimizer.param_groups) > 1:  # the text encoders' LoRA (lora.text_encoder_lr)
            out["optim/lr_text_encoder"] = self.optimizer.param_groups[1]["lr"]
        return out

    # ----------------------------------------------------------------------------- non-finite guard

    def count_nonfinite(self, what: str, step: bool = False) -> None:
        """Count one skipped micro-batch (``step=False``) or optimizer step; with one process, stop at the limit at once."""
        if step:
            self.skipped_steps_in_row += 1
        else:
            self.nonfinite_in_row += 1
        limit = self.cfg.max_nonfinite_steps
        logger.warning("%s %d: non-finite %s, skipped (%d in a row, limit %d)", self.unit, self.iteration + 1, what,
                       self.skipped_steps_in_row if step else self.nonfinite_in_row, limit)
        if self.accelerator.num_processes == 1:
            self.check_nonfinite()

    def check_nonfinite(self) -> None:
        """Raise after ``train.max_nonfinite_steps`` non-finite losses/gradients in a row on any
        process (with several, every process checks the maximum at each optimizer step, so all
        stop together)."""
        in_row = max(self.nonfinite_in_row, self.skipped_steps_in_row)
        if self.accelerator.num_processes > 1:
            in_row = int(self.gather(torch.tensor([in_row])).max())
        limit = self.cfg.max_nonfinite_steps
        if in_row >= limit:
            raise NonFiniteLossError(
                f"{in_row} non-finite losses/gradients in a row at {self.unit} {self.iteration + 1} "
                f"({self.prefix}max_nonfinite_steps={limit}); lower {self.prefix}lr ({self.cfg.lr}) or check the rewards"
            )

    # ----------------------------------------------------------------------------- checkpoint

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(tensor groups, JSON state)`` for the checkpoint: ``{"ema": ..., "old_policy": ...}`` when on,
        and the optimizer, loss scaler, step count and non-finite counter."""
        tensors = {"ema": self.ema.state_dict()} if self.ema is not None else {}
        if self.old_policy is not None:
            tensors["old_policy"] = self.old_policy.state_dict()
        if self.kl_ema is not None:
            tensors["kl_ema"] = self.kl_ema.state_dict()
        state = {"optimizer": self.optimizer.state_dict(), "nonfinite_in_row": self.nonfinite_in_row,
                 "skipped_steps_in_row": self.skipped_steps_in_row, "steps_taken": self.steps_taken,
                 "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}
        return tensors, state

    def load(self, tensors: dict, state: dict, path: Optional[object] = None) -> None:
        """Restore what :meth:`state` wrote (``path`` names the checkpoint in errors)."""
        if self.ema is not None:
            if "ema" not in tensors:
                raise CheckpointError(f"checkpoint {path} has no EMA weights but {self.prefix}ema is on")
            self.ema.load_state_dict(tensors["ema"])
        if self.old_policy is not None:
            if "old_policy" not in tensors:
                raise CheckpointError(f"checkpoint {path} has no old-policy weights but {self.prefix}old_policy_rate is on")
            self.old_policy.load_state_dict(tensors["old_policy"])
        if self.kl_ema is not None:
            if "kl_ema" not in tensors:
                raise CheckpointError(f"checkpoint {path} has no KL-EMA weights but the objective penalises the distance to one")
            self.kl_ema.load_state_dict(tensors["kl_ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.skipped_steps_in_row = int(state.get("skipped_steps_in_row", 0))
        self.steps_taken = int(state.get("steps_taken", 0))
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])


class OptimizerViews:
    """``params`` and ``optimizer`` of a trainer that keeps its :class:`LoraOptimizer` as ``self.optim``
    (both trainers: tests, benchmarks and callbacks read them there)."""

    optim: LoraOptimizer

    @property
    def params(self) -> list[Tensor]:
        """Every trained LoRA parameter: the transformer's, then the text encoders'."""
        return self.optim.params

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The AdamW over every trained LoRA parameter (one parameter group per learning rate)."""
        return self.optim.optimizer


def nothing_stepped(span: str, columns: str = "loss/total and grad_norm"):
    """The error for a run whose every optimizer step was skipped (non-finite losses or gradients, each streak shorter
    than ``max_nonfinite_steps``, or all-zero gradients): its LoRA is the untrained one, so it must not end as a success."""
    from flowalign.errors import NonFiniteLossError

    return NonFiniteLossError(f"nothing trained: in all {span} every optimizer step was skipped, as non-finite or with an all-zero "
                              f"gradient (every group's rewards tied: nothing to learn; see {columns} in metrics.csv), so the LoRA "
                              "is unchanged and no LoRA file or report is written; check the rewards, the objective's settings "
                              "(a NaN argument?) and lower lr")

