"""Learning-rate schedules over training iterations (pure functions; ``train.lr_schedule``).

The trainer sets the optimizer's learning rate at the start of iteration ``i`` (0-based, before
its rollouts are trained on) to ``lr · multiplier(i)``. The multiplier depends on the iteration
only, not on optimizer state, so ``--resume`` continues the schedule exactly.

With ``W`` warmup iterations, ``T`` iterations in all, ``m`` the floor (``min_ratio``) and the
progress after warmup ``p = (i - W) / max(T - W - 1, 1)`` (0 at the first decayed iteration,
1 at the last):

* warmup (``i < W``, any schedule): ``(i + 1) / (W + 1)``: ``W`` iterations below the full rate, linear up to it
  at iteration ``W`` (where the schedule's own part starts at 1);
* ``constant``: ``1``;
* ``linear``: ``1 - (1 - m) · p``;
* ``cosine``: ``m + (1 - m) · (1 + cos(pi · p)) / 2``.

The decay reaches ``m`` on the last iteration ``T - 1`` exactly (with a single decayed iteration,
``T = W + 1``, that iteration is also the first: ``p = 0``, the full rate). Because a decay's horizon is
``T``, ``train.iterations`` enters the run's config hash under ``linear`` and ``cosine``: a run
resumes only with the length it was started with. On the toy a cosine decay did not keep
Flow-GRPO's held-out accuracy from drifting late in long runs (bench/results/heldout_curve.json,
``cosine_*``); the default recipe keeps a constant rate.
"""
from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(name: str, iteration: int, total: int, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """The factor on ``train.lr`` at 0-based ``iteration`` of ``total`` (see the module docstring).

    Raises:
        ValueError: unknown ``name``, ``iteration`` outside ``[0, total)``, ``warmup`` outside
            ``[0, total)`` or ``min_ratio`` outside ``[0, 1]``.
    """
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; choose from {LR_SCHEDULES}")
    if not 0 <= iteration < total:
        raise ValueError(f"iteration must be in [0, {total}), got {iteration}")
    if not 0 <= warmup < total:
        raise ValueError(f"warmup must be in [0, total={total}), got {warmup}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    if iteration < warmup:
        return (iteration + 1) / (warmup + 1)
    if name == "constant":
        return 1.0
    progress = (iteration - warmup) / max(total - warmup - 1, 1)
    if name == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
