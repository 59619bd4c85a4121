"""Process layout, precision and memory helpers of the trainer (train/trainer.py).

* **Layout-invariant noise** (``sampling.noise_seeding: group``): the rollout noise of a group is
  drawn from its own generator, seeded by ``(train.seed, iteration, global group index)``, and
  the noise levels of an iteration from a generator seeded by ``(train.seed, iteration)``, so
  the samples of an iteration do not depend on how many processes share it; the forward-process
  draws of nft / awm come from a third per-group stream (:func:`forward_generator`). Groups are never
  split across processes (``PromptSampler`` hands each process whole prompts).
* **Update slots**: every process must run the same number of optimizer steps (each one
  all-reduces the LoRA gradients), even when their kept samples differ. :func:`slot_sizes`
  gathers the rows of every process's micro-batches; a process with fewer micro-batches runs
  empty slots. A micro-batch's mean loss is weighted by ``rows / rows of its accumulation group
  over all processes`` and the gradients are summed across processes, so an optimizer step
  follows the mean over every (sample, step) row of its group whatever the layout.
* **Mixed precision** (``train.mixed_precision``): :class:`AutocastAdapter` runs the adapter's
  velocity under ``torch.autocast`` and returns it in fp32; transition means, log-densities and
  the loss stay fp32 (DESIGN.md §4), the LoRA parameters stay fp32.
"""
from __future__ import annotations

import contextlib
from contextlib import nullcontext
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from flowalign.trajectory import cat_trajectories  # noqa: F401 - re-exported: runtime's callers and plugins import it here

SEED_MOD = 2**63 - 1
GROUP_STREAM = 7_919  # offsets keep these streams apart from the per-process ones
LEVEL_STREAM = 104_729
FORWARD_STREAM = 1_299_709
CALIBRATION_STREAM = 15_485_863
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def seed_global_rngs(seed: int) -> None:
    """Seed torch's, Python's and numpy's global RNGs from ``seed`` (numpy takes it mod 2**32): flowalign draws from
    its own generators, but LoRA init (peft) uses torch's, and a user's reward or objective may use the others,
    which two fresh runs with one seed should then draw alike (checkpoints save and restore all three)."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def group_generator(seed: int, iteration: int, group_index: int) -> torch.Generator:
    """CPU generator of the group at global position ``group_index`` of ``iteration``."""
    value = ((seed * 1_000_003 + iteration) * 1_000_003 + group_index + GROUP_STREAM) % SEED_MOD
    return torch.Generator().manual_seed(value)


def forward_generator(seed: int, iteration: int, group_index: int) -> torch.Generator:
    """CPU generator of the forward-process draws (nft, awm: sigmas and noises) of the group at global position
    ``group_index`` of ``iteration``: a stream apart from the group's rollout noise."""
    value = ((seed * 1_000_003 + iteration) * 1_000_003 + group_index + FORWARD_STREAM) % SEED_MOD
    return torch.Generator().manual_seed(value)


def calibration_generator(seed: int, round_index: int, sample_index: int) -> torch.Generator:
    """CPU generator of DenseGRPO calibration sample ``sample_index`` (its global index) in round ``round_index``, under
    ``sampling.noise_seeding: group``: the calibrated table does not depend on how the samples are split over processes."""
    value = ((seed * 1_000_003 + round_index) * 1_000_003 + sample_index + CALIBRATION_STREAM) % SEED_MOD
    return torch.Generator().manual_seed(value)


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    """CPU generator shared by every process for the draws of ``iteration`` that all must agree on."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + iteration) * 7 + LEVEL_STREAM) % SEED_MOD)


def global_group_index(local, groups_per_round: int, process_index: int, num_processes: int):
    """The index one process would give a group (int or tensor ``local``: this process's group ids, numbered
    round after round, ``groups_per_round`` per round): the sampler splits each round's window over the
    processes in process order, and the rounds follow each other. Seeds each group's noise streams
    (``noise_seeding: group``) and orders DAPO's group choice, so neither depends on the process count."""
    round_index, within = local // groups_per_round, local % groups_per_round
    return (round_index * num_processes + process_index) * groups_per_round + within


def draw_order(rank: Tensor) -> tuple[Tensor, Tensor]:
    """``(order, position)`` for gathered rows whose groups have draw ranks ``rank [N]``
    (:func:`global_group_index`): ``rows[order]`` lists them in the order one process would draw them
    (a group's rows keep their order), and ``position[i]`` is where gathered row ``i`` went."""
    order = torch.argsort(torch.as_tensor(rank), stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    return order, position


@torch.no_grad()
def rollout_groups(adapter, records: Sequence[Any], cond, sampling_cfg, schedule, generator: torch.Generator, iteration: int,
                   seed: int, first_group: int, drift=None, on_step=None, levels=None, record_x0: bool = False):
    """Roll out one process's prompt ``records`` (``group_size`` samples each) with ``sampling_cfg``'s settings.

    The iteration's noise levels (a random window's start) are drawn from :func:`iteration_generator`, so every process
    explores the same steps. ``sampling.noise_seeding: process`` draws every noise from this process's ``generator``;
    ``group`` rolls each group out from its own stream (:func:`group_generator` at global index ``first_group + j``),
    so the samples do not depend on the number of processes. ``cond`` is the records' encoding (one row per record).
    ``drift`` is the process-reward guidance (:class:`flowalign.guidance.RewardDrift`) or None; ``on_step(k)``
    is called after each denoising step of each batch rolled out (``num_steps`` calls, or that per group).
    ``sampling.rollout`` names the function that rolls a batch out (:func:`flowalign.sampling.resolve_rollout`: the
    default engine, or a tree / branch sampler of your own, called with ``sampling.rollout_kwargs`` too).
    ``levels`` (``[K]``) replaces the schedule's noise levels (a later sampling round of the same iteration
    reuses the first's, so that the rounds' trajectories concatenate). ``record_x0`` keeps each step's x0-prediction
    (``Trajectory.x0_preds``: what DenseGRPO's ``tweedie`` estimator scores, then without a model call).
    """
    from flowalign import sampling, sde

    s = sampling_cfg
    kwargs = dict(group_size=s.group_size, num_steps=s.num_steps, kernel=s.kernel, guidance_scale=s.guidance_scale,
                  share_initial_noise=s.share_initial_noise, log_prob_reduce=s.log_prob_reduce, log_prob_form=s.log_prob_form, record_x0=record_x0,
                  iteration=iteration, micro_batch_size=s.micro_batch_size, drift=drift, on_step=on_step)
    roll = sampling.resolve_rollout(s.rollout)
    if roll is not sampling.rollout:  # a rollout of your own (a tree sampler): its kwargs, and a check of what it returns
        plugin, extra = roll, dict(s.rollout_kwargs)

        def roll(adapter, prompts, **kw):
            traj = plugin(adapter, prompts, **kw, **extra)
            return sampling.check_rollout(traj, name=s.rollout, num_prompts=len(prompts), group_size=s.group_size, num_steps=s.num_steps,
                                          sampling_config=s)

    if levels is None:  # one draw per iteration, the same on every process (a random window), whatever noise_seeding says
        levels = schedule.levels(s.num_steps, iteration=iteration, generator=iteration_generator(seed, iteration))
    levels = sde.table(levels)
    if s.noise_seeding == "process":
        return roll(adapter, [r.prompt for r in records], schedule=levels, generator=generator, cond=cond,
                    metadata=[dict(r.metadata) for r in records], **kwargs)
    return cat_trajectories([
        roll(adapter, [r.prompt], schedule=levels, cond=cond.select([j]), metadata=[dict(r.metadata)],
             generator=group_generator(seed, iteration, first_group + j), **kwargs)
        for j, r in enumerate(records)
    ])


def _values_per_key(metrics: dict) -> dict[str, list]:
    """Every process's value of each key of ``metrics`` (one object gather: the processes' key sets may
    differ, e.g. a process whose update plan was empty has no loss metrics)."""
    from accelerate.utils import gather_object

    values: dict = {}
    for part in gather_object([metrics]):
        for key, value in part.items():
            values.setdefault(key, []).append(value)
    return values


def sum_metrics_across_processes(sums: dict, counts: dict) -> tuple[dict, dict]:
    """Per-key sums and counts of every process's micro-batch metrics."""
    pairs = _values_per_key({key: (sums[key], counts[key]) for key in sums})
    return {k: sum(s for s, _ in v) for k, v in pairs.items()}, {k: sum(c for _, c in v) for k, v in pairs.items()}


def combine_process_metrics(metrics: dict, sum_keys: Sequence[str] = ()) -> dict:
    """Every process's ``metrics`` as one dict: the sum over processes for ``sum_keys`` (counts: NFE,
    dropped samples), the mean over the processes that have the key for the rest (each process holds
    the same number of samples)."""
    return {key: (sum(v) if key in sum_keys else sum(v) / len(v)) for key, v in _values_per_key(metrics).items()}


def deterministic_kernels() -> None:
    """``train.deterministic``: deterministic GPU kernels only (an op without one raises, naming it: in warn-only mode
    torch would keep e.g. the split-key attention backward and resume would drift) and cuBLAS's fixed workspace
    (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts: it takes effect when set before the process's first GPU matmul,
    so a script that already ran one should set it itself). Stays on for the rest of the process."""
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def make_accelerator(timeout_min: float):
    """The run's ``accelerate.Accelerator`` (CPU when no GPU is visible), its process group (several processes) waiting
    ``timeout_min`` minutes in a collective before failing (``train.process_group_timeout_min``)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_min))])


def release_process_group(accelerator) -> None:
    """End ``accelerator``'s training (trackers, and the process group of a multi-process launch), then run
    Python's garbage collector while the interpreter is still whole.

    Without the collection, a 2-process gloo launch that ended right after an optimizer step (gradients
    all-reduced, then ``end_training()``) aborted at interpreter exit with "terminate called without an
    active exception" (SIGABRT, after every result was written) in 14 of 50 launches on this CPU; with it,
    0 of 50 (session 36, tests/test_multiprocess.py's step script). The trainer's own launch did not abort
    (0 of 8 in the same hour). Objects in reference cycles left from
    the collectives were then destroyed during finalization, which torch's gloo teardown does not survive
    (pytorch/pytorch#190489 reports the same abort). A barrier before ``end_training()`` did not help
    (3 of 30)."""
    import gc

    accelerator.end_training()
    gc.collect()


def gather_shares(part) -> list:
    """Every process's share of a split evaluation (``flowalign.evaluation.evaluate``'s ``gather``), in process
    order (one process: ``[part]``)."""
    from accelerate.utils import gather_object

    return gather_object([part])


def slot_sizes(plan_rows: list[int], accelerator) -> Tensor:
    """``[world, S]`` rows of every process's micro-batches (0 for the empty slots of shorter plans)."""
    world = accelerator.num_processes
    local = torch.tensor(plan_rows, dtype=torch.long)
    if world == 1:
        return local[None]
    device = accelerator.device
    lengths = accelerator.gather(torch.tensor([local.numel()], device=device)).cpu()  # [world]
    padded = torch.zeros(int(lengths.max()), dtype=torch.long)
    padded[: local.numel()] = local
    return accelerator.gather(padded[None].to(device)).cpu().reshape(world, -1)


class AutocastAdapter:
    """An adapter whose ``velocity`` runs under ``torch.autocast(dtype)`` and returns fp32.

    Everything else is the wrapped adapter's (attribute access is delegated), so rollouts,
    rewards and saving see the same object. Only the transformer's matmuls run in ``dtype``;
    the kernels' means, log-densities and the objective are computed from the fp32 output.
    """

    def __init__(self, adapter, dtype: torch.dtype):
        self.__dict__["_adapter"] = adapter
        self.__dict__["_dtype"] = dtype

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_adapter"], name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.__dict__["_adapter"], name, value)

    @property
    def autocast_dtype(self) -> torch.dtype:
        """The autocast dtype (bf16 or fp16) of the transformer calls."""
        return self.__dict__["_dtype"]

    def velocity(self, latents: Tensor, sigma, cond, guidance_scale: float = 1.0) -> Tensor:
        """The wrapped adapter's velocity under autocast, returned in fp32."""
        adapter = self.__dict__["_adapter"]
        with torch.autocast(device_type=latents.device.type, dtype=self.__dict__["_dtype"]):
            v = adapter.velocity(latents, sigma, cond, guidance_scale)
        return v.float()


def autocast_adapter(adapter, mixed_precision: str):
    """``adapter`` itself for ``"no"``, else an :class:`AutocastAdapter` in bf16 / fp16."""
    if mixed_precision == "no":
        return adapter
    return AutocastAdapter(adapter, AUTOCAST_DTYPES[mixed_precision])


def check_device(value: str, what: str) -> torch.device:
    """``torch.device(value)``, or a one-line ConfigError naming ``what`` (a flag or config key) when it is no
    device name or names an accelerator this machine lacks (before any model loads)."""
    from flowalign.errors import ConfigError

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{what}={value!r} is not a torch device (cpu, cuda, cuda:1, mps): {exc}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"{what}={value!r}: torch sees {torch.cuda.device_count()} CUDA device(s) here"
                          f"{'' if torch.cuda.is_available() else ' (no CUDA driver or a CPU build of torch)'}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{what}={value!r}: MPS is not available here")
    return device


def to_device(reward, device):
    """``reward``, moved to ``device`` when it can move (``Reward.to``; plain callables have no ``to``, and a plugin's
    in-place ``to`` may return None, so the reward itself is returned)."""
    if callable(getattr(reward, "to", None)):
        reward.to(device)
    return reward


def reward_device(reward, device: Optional[torch.device], offload: bool):
    """Context for one reward call: move the reward to ``device`` first and, when ``offload``,
    back to the CPU afterwards (``Reward.to`` / ``Reward.offload``; no-ops for plain callables)."""
    if not offload or not hasattr(reward, "offload"):
        return nullcontext()
    return _OnDevice(reward, device)


def rewards_on_device(rewards, device: Optional[torch.device], offload: bool) -> contextlib.ExitStack:
    """:func:`reward_device` for several rewards at once (a mixed reward, the dense step rewards, the eval grid)."""
    stack = contextlib.ExitStack()
    for reward in rewards:
        stack.enter_context(reward_device(reward, device, offload))
    return stack


class _OnDevice:
    def __init__(self, reward, device):
        self.reward, self.device = reward, device

    def __enter__(self):
        self.reward.to(self.device)
        return self.reward

    def __exit__(self, *exc):
        self.reward.offload()
        return False
