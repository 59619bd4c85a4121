"""Training objectives, one file per method (DESIGN.md §8), selected by name in configs.

Importing this package imports every module in it, so each ``@register_objective(name)`` class
lands in :data:`OBJECTIVES`; :func:`get_objective` builds one by name.

An objective of your own needs no edit here. A recipe names it by a dotted path
(``objective: {name: "mypkg.objectives:Reinforce"}``) or by an entry point of group
``flowalign.objectives`` in your package's ``pyproject.toml``; :func:`resolve_objective` imports it
and registers it under that name, so a run that used it resumes with it too. What the trainers
call and read is the :class:`~flowalign.objectives.base.Objective` protocol (``loss``, the
``loss/total`` metric, the constructor keywords the online trainer passes).
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from flowalign.errors import ConfigError
from flowalign.plugins import entry_points, find_plugin
from flowalign.objectives.base import OBJECTIVES, OFFLINE_TRAINER, ONLINE_TRAINER, Objective, OfflineBatch, StepBatch, register_objective, trained_by

# the online per-transition family first (dense_grpo / tp_grpo subclass grpo), then every other module
from flowalign.objectives import grpo  # noqa: E402,F401
from flowalign.objectives import dense_grpo, tp_grpo  # noqa: E402,F401

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["ENTRY_POINT_GROUP", "OBJECTIVES", "OFFLINE_TRAINER", "ONLINE_TRAINER", "Objective", "OfflineBatch", "StepBatch",
           "available_objectives", "get_objective", "register_objective", "resolve_objective", "takes_keyword", "trained_by"]

ENTRY_POINT_GROUP = "flowalign.objectives"


def available_objectives() -> list[str]:
    """Sorted names of the registered objectives and of the installed ``flowalign.objectives`` entry points."""
    return sorted(set(OBJECTIVES) | {ep.name for ep in entry_points(ENTRY_POINT_GROUP)})


def resolve_objective(name: str) -> str:
    """Make the objective ``name`` available in :data:`OBJECTIVES` and return ``name``.

    ``name`` is a registered name (as is), an entry point of group :data:`ENTRY_POINT_GROUP`, or a dotted
    path ``"pkg.mod:Class"`` / ``"pkg.mod.Class"`` (imported; the class is registered under ``name``).

    Raises:
        ConfigError: none of these, an import that fails, or an object without a ``loss`` method.
    """
    if name in OBJECTIVES:
        return name
    found = find_plugin(name, ENTRY_POINT_GROUP, "objective")
    if found is None:
        raise ConfigError(f"unknown objective {name!r}; available: {available_objectives()}, or a dotted path "
                          f"'package.module:Class', or an entry point of group {ENTRY_POINT_GROUP!r}")
    if not (isinstance(found, type) and callable(getattr(found, "loss", None))):
        raise ConfigError(f"objective {name!r} is {found!r}, not a class with a loss(batch, policy, reference) method "
                          "(flowalign.objectives.base.Objective)")
    OBJECTIVES[name] = found
    if not isinstance(getattr(found, "name", None), str):
        found.name = name
    return name


def takes_keyword(name: str, keyword: str) -> bool:
    """Whether the constructor of the registered objective ``name`` accepts ``keyword`` (by name or ``**kwargs``):
    the trainers pass what they always have (``adv_clip``, ``generator``) only to objectives that take it."""
    try:
        params = inspect.signature(OBJECTIVES[resolve_objective(name)]).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == keyword or p.kind is p.VAR_KEYWORD for p in params)


def get_objective(name: str, **kwargs):
    """Instantiate the objective registered as ``name`` with its constructor ``kwargs``.

    Raises:
        ConfigError: unknown name (the message lists the available ones), or arguments the
            constructor does not take or refuses.
    """
    resolve_objective(name)
    check_argument_types(OBJECTIVES[name], kwargs, f"objective {name!r}")
    try:
        return OBJECTIVES[name](**kwargs)
    except (TypeError, ValueError) as err:  # an unknown keyword, or a value the constructor refuses
        raise ConfigError(f"bad arguments {kwargs} for objective {name!r}: {err}") from None


def check_argument_types(cls, kwargs: dict, what: str) -> None:
    """ConfigError for a value that does not fit its constructor annotation, which Python would take silently: a
    string for a ``bool`` (``bool("off")`` is True), a fraction for an ``int`` (2.7 truncated), NaN for a ``float``
    (it passes every ``x <= 0`` check). Parameters without such a plain annotation are the constructor's to check."""
    import math
    import typing

    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - annotations that do not resolve (a plugin's forward references): nothing to check
        return
    for key, value in kwargs.items():
        hint = hints.get(key)
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            continue
        plain = next((a for a in args if a is not type(None)), None) if len(args) == 2 and type(None) in args else hint
        if plain is bool and not isinstance(value, bool):
            raise ConfigError(f"{what}: {key} must be true or false, got {value!r}")
        if plain is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{what}: {key} must be an integer, got {value!r}")
        if plain is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{what}: {key} must be a number, got {value!r}")
            if math.isnan(value):
                raise ConfigError(f"{what}: {key} must be a number, got NaN")

