"""DenseGRPO: Flow-GRPO's loss with per-step advantages from ODE-completion step gains.

Deng et al., "DenseGRPO: From Sparse to Dense Reward for Flow Matching Model Alignment",
arXiv 2601.20218. The dense reward of step k is the gain r_k = R_k - R_{k-1}, where R_k is the
reward of the deterministic (ODE) completion from the latent after step k
(:func:`flowalign.dense.ode_completion_rewards`, :func:`flowalign.dense.step_gains`); advantages
normalise r_k across the group at the same step (:func:`flowalign.dense.dense_advantages`). The
sampler's per-step noise levels come from a calibrated table
(:func:`flowalign.dense.calibrate_noise_table`, ``sde.table``).

The loss itself is Flow-GRPO's: each :class:`~flowalign.objectives.base.StepBatch` row already
carries the advantage of *its* transition, so this class only configures and documents.
"""
from __future__ import annotations

from flowalign.objectives.base import register_objective
from flowalign.objectives.grpo import FlowGRPO


@register_objective("dense_grpo")
class DenseGRPO(FlowGRPO):
    """Clipped ratio loss on per-step (dense) advantages.

    Recommended sampler settings (``default_kernel``, ``default_schedule``): Flow-SDE with the
    per-timestep table calibrated by DenseGRPO's reward-aware scheme.

    Args: as :class:`~flowalign.objectives.grpo.FlowGRPO`.
    """

    name = "dense_grpo"
    dense_method = "dense_grpo"  # the trainer computes per-step advantages this way (a subclass of the user's inherits it)
    default_kernel = "flow_sde"
    default_schedule = "table"
    advantage_fn = "flowalign.dense:dense_advantages"
