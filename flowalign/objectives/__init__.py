"""Training objectives, one file per method (DESIGN.md §8), selected by name in configs.

Importing this package imports every module in it, so each ``@register_objective(name)`` class
lands in :data:`OBJECTIVES`; :func:`get_objective` builds one by name.
"""
from __future__ import annotations

import importlib
import pkgutil

from flowalign.errors import ConfigError
from flowalign.objectives.base import OBJECTIVES, OFFLINE_TRAINER, ONLINE_TRAINER, Objective, OfflineBatch, StepBatch, register_objective, trained_by

# the online per-transition family first (dense_grpo / tp_grpo subclass grpo), then every other module
from flowalign.objectives import grpo  # noqa: E402,F401
from flowalign.objectives import dense_grpo, tp_grpo  # noqa: E402,F401

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["OBJECTIVES", "OFFLINE_TRAINER", "ONLINE_TRAINER", "Objective", "OfflineBatch", "StepBatch", "available_objectives", "get_objective",
           "register_objective", "trained_by"]


def available_objectives() -> list[str]:
    """Sorted names of the registered objectives."""
    return sorted(OBJECTIVES)


def get_objective(name: str, **kwargs):
    """Instantiate the objective registered as ``name`` with its constructor ``kwargs``.

    Raises:
        ConfigError: unknown name (the message lists the available ones), or arguments the
            constructor does not take or refuses.
    """
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; available: {available_objectives()}")
    try:
        return OBJECTIVES[name](**kwargs)
    except (TypeError, ValueError) as err:  # an unknown keyword, or a value the constructor refuses
        raise ConfigError(f"bad arguments {kwargs} for objective {name!r}: {err}") from None
