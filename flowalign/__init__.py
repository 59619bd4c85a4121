"""flowalign: reinforcement-learning alignment of diffusion and flow-matching generators.

The core (this package) is pure math and bookkeeping, testable without a model:

* ``flowalign.sde``: transition kernels (ODE, Flow-GRPO's SDE, DanceGRPO's, CPS) and exact log-probs;
* ``flowalign.sampling`` / ``flowalign.trajectory``: rollouts that record every transition;
* ``flowalign.dense`` / ``flowalign.step_rewards``: step-wise rewards, gains, turning points;
* ``flowalign.advantages``: group-normalised advantages, per sample or per step;
* ``flowalign.objectives``: one file per method (grpo, dense_grpo, tp_grpo, nft, gdro, ...);
* ``flowalign.offline``: the rollout store offline objectives train from;
* ``flowalign.evaluation`` / ``flowalign.report``: per-category held-out tables and figures
  (``flowalign.eval_journal``: the scored batches a killed evaluation resumes from).

Beside it: ``flowalign.pipelines`` (adapters over diffusers pipelines, the toy model),
``flowalign.rewards`` (the reward protocol, registry and plugins) and ``flowalign.train``
(trainers, the ``flowalign`` command, recipes). See DESIGN.md for the architecture.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("flowalign-rl")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

_SUBMODULES = ("advantages", "checkpoint", "config", "corrected", "dense", "errors", "eval_journal", "evaluation", "files", "guidance", "lora",
               "lr_schedule", "objectives", "offline", "pipelines", "plots", "plugins", "prompts", "report", "rewards", "sampling",
               "sde", "step_rewards", "trajectory", "train")
# `from flowalign import *` takes the pure-math core only (the trainers pull in accelerate, tensorboard, ...)
__all__ = ["__version__", "advantages", "dense", "objectives", "sampling", "sde", "step_rewards", "trajectory"]


def __getattr__(name: str):
    """``flowalign.sde`` etc. without an import of each: submodules load on first use (PEP 562)."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
