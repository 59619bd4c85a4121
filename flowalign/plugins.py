"""Plugins by name: a dotted path (``"package.module:Class"``) or an entry point of a distribution.

Rewards (group ``flowalign.rewards``) and objectives (group ``flowalign.objectives``) are found the
same way, so a paper's code can live in its own package and still be named in a recipe::

    # pyproject.toml of that package
    [project.entry-points."flowalign.objectives"]
    reinforce = "mypkg.objectives:Reinforce"

    # or, with no packaging at all, in the recipe
    objective: {name: "mypkg.objectives:Reinforce"}
"""
from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

from flowalign.errors import ConfigError


def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """The installed distributions' entry points of ``group``."""
    return list(importlib.metadata.entry_points(group=group))


def load_entry_point(group: str, name: str, kind: str) -> Any:
    """The object of entry point ``name`` in ``group``, or None when no distribution declares it."""
    for ep in entry_points(group):
        if ep.name == name:
            try:
                return ep.load()
            except SystemExit as exc:  # a module that parses sys.argv or exits at import: not flowalign's exit
                raise ConfigError(f"loading {kind} entry point {name!r} = {ep.value!r} failed: importing it called exit({exc.code!r}) "
                                  "(a module that parses the command line or exits when imported)") from None
            except Exception as exc:
                raise ConfigError(f"loading {kind} entry point {name!r} = {ep.value!r} failed: {type(exc).__name__}: {exc}") from exc
    return None


def find_plugin(name: str, group: str, kind: str) -> Any:
    """The object of entry point ``name`` in ``group``, else of the dotted path ``name``; None when ``name`` is neither
    (a plain word no distribution declares). Import failures raise ConfigError naming ``kind``."""
    found = load_entry_point(group, name, kind)
    if found is None and (":" in name or "." in name):
        found = import_object(name, kind)
    return found


def require_callable_plugin(name: Any, group: str, kind: str, unknown: str, expected: str) -> Any:
    """:func:`find_plugin` for a callable (a kernel, a schedule factory, a rollout): ConfigError ``unknown`` when ``name``
    is not a string or names nothing, and "``kind`` ``name`` is a T, not ``expected``" when it is not callable."""
    found = find_plugin(name, group, kind) if isinstance(name, str) else None
    if found is None:
        raise ConfigError(unknown)
    if not callable(found):
        raise ConfigError(f"{kind} {name!r} is a {type(found).__name__}, not {expected}")
    return found


def import_object(path: str, kind: str) -> Any:
    """Import ``"pkg.mod:Attr.sub"`` or ``"pkg.mod.Attr"``; ConfigError naming the path (and ``kind``) otherwise."""
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
        candidates = [(module_name, attr_path)]
    else:
        parts = path.split(".")
        candidates = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]
    for module_name, attr_path in candidates:
        if not module_name or not attr_path:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only "this module does not exist" moves on to the next split; a missing dependency
            # inside an existing module is a real error and is reported as such.
            if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                continue
            raise ConfigError(f"importing {kind} {path!r} failed: {exc}") from exc
        except SystemExit as exc:  # a module that parses sys.argv or exits at import: not flowalign's exit
            raise ConfigError(f"importing {kind} {path!r} failed: importing it called exit({exc.code!r}) (a module that parses "
                              "the command line or exits when imported)") from None
        except Exception as exc:
            raise ConfigError(f"importing {kind} {path!r} failed: {type(exc).__name__}: {exc}") from exc
        obj: Any = module
        try:
            for attr in attr_path.split("."):
                obj = getattr(obj, attr)
        except AttributeError as exc:
            raise ConfigError(f"{kind} {path!r}: module {module_name!r} has no attribute {attr_path!r}") from exc
        return obj
    tried = [module_name for module_name, attr_path in candidates if module_name and attr_path]
    raise ConfigError(f"{kind} {path!r}: no importable module in this dotted path (tried {', '.join(map(repr, tried))})"
                      + _import_hint(tried))


def _import_hint(modules: list) -> str:
    """Why a module of the user's is not found: the current folder is not on the import path of a console script."""
    import sys
    from pathlib import Path

    for module in modules:
        top = module.split(".")[0]
        here = Path.cwd()
        if ((here / f"{top}.py").is_file() or (here / top / "__init__.py").is_file()) and not any(
                Path(p or ".").resolve() == here.resolve() for p in sys.path):
            return (f"; {top} is in the current folder, which this command does not import from: run it with PYTHONPATH=. "
                    "(or install the package that holds it)")
    return "; install the package that provides it, or put its folder on PYTHONPATH"
