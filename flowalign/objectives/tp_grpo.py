"""TP-GRPO: Flow-GRPO's loss with step-level incremental rewards and turning points.

Tong et al., "Alleviating Sparse Rewards by Modeling Step-Wise and Long-Term Sampling Effects in
Flow-Based GRPO", arXiv 2602.06422. Step k's reward is its gain r_k = R_k - R_{k-1} (ODE
completions); at a *turning point* (a step that flips the local reward trend back to the
trajectory's overall trend, :func:`flowalign.dense.turning_points`) it becomes the aggregated
long-term reward R_K - R_{k-1}. Advantages normalise these across the group per step
(:func:`flowalign.dense.tp_advantages`).

The paper samples with the coefficient-preserving kernel (CPS, noise 0.7) and a tighter clip
(1e-5); those are this class's defaults. Its last CPS step is deterministic and never trained.
"""
from __future__ import annotations

from flowalign.objectives.base import register_objective, require_finite
from flowalign.objectives.grpo import FlowGRPO


@register_objective("tp_grpo")
class TPGRPO(FlowGRPO):
    """Clipped ratio loss on per-step turning-point advantages.

    Its default kernel is CPS. The CPS reference code (Flow-GRPO's ``cps`` branch, which TP-GRPO's
    scripts build on) takes ``-(x' - mean)²`` averaged over dims as the log-prob, without the
    Gaussian's ``1/(2 std²)``: set ``sampling.log_prob_form: squared_error`` (as
    ``sd35m_tp_grpo_geneval.yaml`` does) for their trust region. With the default Gaussian density
    the same clip (1e-5) is far tighter on low-noise steps (about 8,000x on SD3.5's last stochastic
    step of 10, sigma 0.278 -> 0.0089) and looser on the first ones.

    Args:
        clip_range: PPO clip eps, default 1e-5 (TP-GRPO).
        kl_beta, adv_clip, kl_form: as :class:`~flowalign.objectives.grpo.FlowGRPO`.
    """

    dense_method = "tp_grpo"  # per-step turning-point advantages (a subclass of the user's inherits it)

    name = "tp_grpo"
    default_kernel = "cps"
    default_noise_level = 0.7
    advantage_fn = "flowalign.dense:tp_advantages"

    def __init__(self, clip_range: float = 1e-5, kl_beta: float = 0.0, adv_clip: float = 5.0, kl_form: str = "transition"):
        require_finite(type(self).__name__, {k: v for k, v in locals().items() if k != "self"})
        super().__init__(clip_range=clip_range, kl_beta=kl_beta, adv_clip=adv_clip, kl_form=kl_form)
