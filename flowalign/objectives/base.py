"""Shared types for objectives (DESIGN.md §8).

Every objective is a class with ``loss(batch, policy, reference) -> (loss, metrics)``:

* ``batch`` is a :class:`StepBatch` (online, per-transition methods: grpo, dense_grpo, tp_grpo,
  tree_grpo; prdp reads pairs of them, a ``PairBatch``), an :class:`OfflineBatch` (offline methods on clean samples: gdro,
  diffusion_dpo) or a :class:`flowalign.objectives.nft.ForwardBatch` (online methods on freshly
  noised clean samples, any sampler: nft, awm; such a class sets ``forward_process = True``).
* ``policy(x, sigma) -> v`` and ``reference(x, sigma) -> v`` are velocity functions with the
  conditioning already bound (the trainer closes over the adapter, the prompts' conditioning and
  the CFG scale; ``reference`` runs with the LoRA disabled). ``sigma`` is ``[B]``.
* ``metrics`` maps slash names (``"policy/clip_frac"``, ``"kl/ref"``) to python floats.

Objectives never touch files, devices or processes: that keeps them testable with a toy
``policy`` (e.g. a linear layer) and hand-worked numbers.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol

from torch import Tensor

from flowalign.errors import ConfigError

VelocityFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class StepBatch:
    """One recorded transition x_k -> x_{k+1} per row (rows may mix steps and samples).

    Attributes:
        x: ``[B, *latent]`` latent before the step.
        x_next: ``[B, *latent]`` latent the sampler actually drew.
        sigma, sigma_next: ``[B]`` the step's sigmas (sigma_next < sigma).
        noise_level: ``[B]`` the schedule's noise level for the step.
        old_log_prob: ``[B]`` fp32 log-prob recorded by the sampler (the behaviour policy).
        advantages: ``[B]`` advantage of the transition (per-sample for grpo, per-step for dense).
        kernel: transition kernel name, as in ``flowalign.sde.step``.
        step_index: ``[B]`` long, index k of the step (for logging / per-step weights), optional.
        log_prob_reduce: ``"mean"`` or ``"sum"`` over latent dims, as the sampler recorded it.
        log_prob_form: ``"gaussian"`` or ``"squared_error"``, as the sampler recorded it.
        sample_index: ``[B]`` long, which sample of the iteration's batch each row is (optional).
        group_id: ``[B]`` long, the row's group (prompt): rows of one id were drawn for the same prompt (optional).

    An objective whose class sets ``update_unit = "trajectory"`` gets, per micro-batch, every trained step of
    each of its samples in one ``StepBatch`` (rows ordered step-major: all samples at the first trained step,
    then the next...; ``step_index``, ``sample_index`` and ``group_id`` say which is which), for losses over a
    whole trajectory, such as a sequence-level importance ratio (GSPO) or a per-trajectory constraint.
    ``train.micro_batch_size`` then counts samples, each bringing its trained steps.
    """

    x: Tensor
    x_next: Tensor
    sigma: Tensor
    sigma_next: Tensor
    noise_level: Tensor
    old_log_prob: Tensor
    advantages: Tensor
    kernel: str = "flow_sde"
    step_index: Optional[Tensor] = None
    log_prob_reduce: str = "mean"
    log_prob_form: str = "gaussian"
    sample_index: Optional[Tensor] = None
    group_id: Optional[Tensor] = None


def concat_step_batches(batches: "list[StepBatch]") -> StepBatch:
    """One :class:`StepBatch` holding the rows of ``batches`` in order (the trajectory unit of an update: a
    micro-batch's samples at each trained step). Every batch must share ``kernel``, ``log_prob_reduce`` and
    ``log_prob_form``; an optional field is kept only when every batch has it."""
    import torch

    if not batches:
        raise ValueError("concat_step_batches needs at least one StepBatch")
    first = batches[0]
    for b in batches[1:]:
        if (b.kernel, b.log_prob_reduce, b.log_prob_form) != (first.kernel, first.log_prob_reduce, first.log_prob_form):
            raise ValueError("step batches of different kernels or log-prob forms cannot be joined")

    def cat(name: str) -> Optional[Tensor]:
        values = [getattr(b, name) for b in batches]
        return None if any(v is None for v in values) else torch.cat(values)

    return StepBatch(x=cat("x"), x_next=cat("x_next"), sigma=cat("sigma"), sigma_next=cat("sigma_next"),
                     noise_level=cat("noise_level"), old_log_prob=cat("old_log_prob"), advantages=cat("advantages"),
                     kernel=first.kernel, step_index=cat("step_index"), log_prob_reduce=first.log_prob_reduce,
                     log_prob_form=first.log_prob_form, sample_index=cat("sample_index"), group_id=cat("group_id"))


@dataclass
class OfflineBatch:
    """Groups of clean samples of the same prompt, for offline objectives.

    Attributes:
        x0: ``[P, k, *latent]`` clean latents, ``k`` samples for each of ``P`` prompts.
        rewards: ``[P, k]`` explicit rewards of those samples.
        cond_index: ``[P]`` long, which prompt (row of the bound conditioning) each group uses.
    """

    x0: Tensor
    rewards: Tensor
    cond_index: Optional[Tensor] = None


class Objective(Protocol):
    """What the trainers call (see the module docstring).

    Attributes:
        name: the registry name, set by :func:`register_objective`.
        needs_reference: True when ``loss`` uses ``reference`` (the trainer then evaluates the
            model with the LoRA disabled; False lets it pass ``None`` and skip those forwards).

    Optional class attributes the trainers read:
        forward_process: True for objectives on freshly re-noised clean samples (``ForwardBatch``:
            nft, awm), which also set ``num_timesteps`` and ``sigma_sampling``; any sampler works.
        trained_by: what runs the objective (one name, or a tuple of them: awm runs in both
            trainers), :data:`ONLINE_TRAINER` when absent; ``flowalign train`` refuses, on load, an
            objective it does not run (gdro / diffusion_dpo: :data:`OFFLINE_TRAINER`).
        update_unit: ``"trajectory"`` for one ``StepBatch`` per micro-batch holding every trained step of its
            samples (:class:`StepBatch`); absent (``"step"``): one step of a micro-batch's samples per call.
        dense_method: ``"dense_grpo"`` or ``"tp_grpo"`` to receive per-step advantages (``StepBatch.advantages``
            then holds each row's step's own; the ``dense:`` section applies); absent for outcome advantages.

    Optional methods: an objective that keeps state across iterations (an adaptive KL coefficient, a running
    baseline, an annealed weight) defines ``state_dict() -> dict`` (JSON values and tensors) and
    ``load_state_dict(state)``; every checkpoint saves process 0's state (keep it equal on every process, e.g.
    computed from gathered values) and ``--resume`` restores it, so the run continues as if never stopped.
    An objective with an estimator of its own (a tree's leaf-to-root backup, BranchGRPO's depth-wise normalisation)
    defines ``advantages(rewards=, group_ids=, keep=, traj=, components=) -> [B] or [B, K]``: the trainer calls it
    instead of the group normalisation with this process's rows (every group lies whole on one process; ``rewards``
    is NaN where ``keep`` is False, ``components`` each reward's scores by name, ``traj`` the rollout with its
    ``metadata``); a ``[B, K]`` result gives each trained step its own advantage, as ``dense_method`` does.

    Construction: ``flowalign train`` builds the class with ``objective.kwargs`` plus ``clip_range`` /
    ``kl_beta`` when the recipe sets them and ``adv_clip`` when the constructor takes it;
    ``flowalign offline`` with ``objective_kwargs`` and ``generator`` (a ``torch.Generator``).
    Metrics: ``loss`` returns slash-named floats that are averaged over micro-batches and logged
    (``metrics.csv``, TensorBoard); the trainer adds ``loss/total`` (the returned loss) unless the
    objective reports it. Objectives of your own: see :mod:`flowalign.objectives` (dotted path or
    entry point in a recipe, no edit here).
    """

    name: str
    needs_reference: bool

    def loss(self, batch, policy: VelocityFn, reference: Optional[VelocityFn]) -> tuple[Tensor, dict[str, float]]:
        """The scalar loss to minimise for ``batch`` and its metrics (slash names to floats).

        Args:
            batch: a :class:`StepBatch`, :class:`OfflineBatch` or ``ForwardBatch`` (the kind the
                objective is written for).
            policy: ``(x [B, *latent], sigma [B]) -> v [B, *latent]`` with gradient through the LoRA.
            reference: the same with the LoRA disabled, or None when ``needs_reference`` is False.
        """
        ...


OBJECTIVES: dict[str, type] = {}

# What trains an objective: the class attribute ``trained_by`` names it (or them), and an objective
# without one runs in the online loop (``flowalign train``). gdro / diffusion_dpo say OFFLINE_TRAINER
# (from a ``flowalign generate`` store), awm says both, prdp names its own loop.
ONLINE_TRAINER = "flowalign train"
OFFLINE_TRAINER = "flowalign offline"


def trained_by(name: str) -> tuple[str, ...]:
    """What trains the registered objective ``name``: ``(ONLINE_TRAINER,)`` unless its class says otherwise."""
    runners = getattr(OBJECTIVES[name], "trained_by", ONLINE_TRAINER)
    return (runners,) if isinstance(runners, str) else tuple(runners)


def register_objective(name: str):
    """Class decorator: make an objective available by name in configs (``objective: grpo``)."""

    def wrap(cls):
        OBJECTIVES[name] = cls
        cls.name = name
        return cls

    return wrap


def objective_state(objective: Any) -> Optional[dict]:
    """``objective.state_dict()`` for a checkpoint, or None for an objective without state (see :class:`Objective`)."""
    if not callable(getattr(objective, "state_dict", None)):
        return None
    state = objective.state_dict()
    if not isinstance(state, Mapping):
        raise ConfigError(f"objective {getattr(objective, 'name', type(objective).__name__)!r}: state_dict() must return a dict, "
                          f"got {type(state).__name__}")
    return dict(state)


def restore_objective_state(objective: Any, saved: Optional[Mapping], path: Any) -> None:
    """Give ``objective`` the state a checkpoint saved (``load_state_dict``).

    Raises:
        CheckpointError: the objective keeps state but the checkpoint at ``path`` holds none (written before
            it kept any, or by another objective), or the other way round: resuming would silently restart it.
    """
    from flowalign.errors import CheckpointError

    name = getattr(objective, "name", type(objective).__name__)
    loads = callable(getattr(objective, "load_state_dict", None))
    if saved is None and not loads:
        return
    if saved is None and not objective_state(objective):  # load_state_dict, but nothing to load (a parameterless nn.Module)
        return
    if saved is None:
        raise CheckpointError(f"checkpoint {path} holds no state of objective {name!r}, which keeps some (load_state_dict): "
                              "resuming would restart it; resume a checkpoint written with it, or start a new output_dir")
    if not loads:
        raise CheckpointError(f"checkpoint {path} holds objective state that objective {name!r} cannot load (no "
                              "load_state_dict): was it written by another version of the objective?")
    objective.load_state_dict(dict(saved))


def checked_loss(result: Any, name: str) -> tuple[Tensor, dict[str, float]]:
    """An objective's ``loss(...)`` result as ``(loss, metrics)``, checked so that a plugin that breaks the
    protocol fails with one line naming it instead of a traceback inside the trainer: ``loss`` a floating tensor
    with one element, ``metrics`` a mapping of names to numbers (0-d tensors become floats).

    Raises:
        ConfigError: naming objective ``name`` and what it returned.
    """
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ConfigError(f"objective {name!r}: loss() must return (loss, metrics), got {type(result).__name__}"
                          + (f" of length {len(result)}" if isinstance(result, tuple) else ""))
    loss, metrics = result
    if not isinstance(loss, Tensor) or not loss.is_floating_point() or loss.numel() != 1:
        shown = f"a {loss.dtype} tensor of shape {list(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ConfigError(f"objective {name!r}: the loss must be a floating tensor with one element, got {shown}")
    if not isinstance(metrics, Mapping):
        raise ConfigError(f"objective {name!r}: metrics must be a dict of name -> number, got {type(metrics).__name__}")
    checked: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            value = float(value.detach())
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"objective {name!r}: metric {key!r} must map a name to a number, got {type(value).__name__}")
        checked[key] = float(value)
    return loss.reshape(()), checked


def require_finite(owner: str, values: Mapping[str, Any]) -> None:
    """ValueError naming the numeric hyper-parameters of ``values`` that are NaN or infinite (``x <= 0`` is False for
    NaN, so a NaN clip range or KL weight passed the range checks and made every loss NaN behind a clip_frac of 0)."""
    import math

    bad = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v)}
    if bad:
        raise ValueError(f"{owner}: {bad} must be finite numbers")
