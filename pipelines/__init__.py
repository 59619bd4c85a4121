"""Adapters from diffusers pipelines to flowalign (DESIGN.md §3).

``load_adapter(pipe)`` picks the adapter for a pipeline object by its class name;
``load_adapter("path/to/folder")`` first loads the folder with
``DiffusionPipeline.from_pretrained(path, local_files_only=True)``.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path
from typing import Any, Optional, Union

from .base import ADAPTERS, PIPELINE_CLASSES, Adapter, Conditioning, register_adapter

logger = logging.getLogger(__name__)

__all__ = ["Adapter", "Conditioning", "load_adapter", "register_adapter", "resolve_adapter", "known_families", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "flowalign.adapters"  # adapters of other packages: [project.entry-points."flowalign.adapters"]

# Family modules that register adapters on import (missing ones are skipped).
_FAMILY_MODULES = ("sd3", "flux", "wan", "qwenimage", "toy")


def _import_families() -> None:
    for name in _FAMILY_MODULES:
        module = f"{__name__}.{name}"
        if importlib.util.find_spec(module) is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError as err:  # one family's missing extra must not hide the others
            logger.warning("adapter family %r is unavailable: %s", name, err)


def known_families() -> dict[str, str]:
    """``{diffusers pipeline class name: adapter name}`` for every registered family."""
    _import_families()
    return dict(sorted(PIPELINE_CLASSES.items()))


def resolve_adapter(name: str) -> str:
    """Make the adapter ``name`` available to :func:`load_adapter` and return its family name.

    ``name`` is a registered family (``"sd3"``), an entry point of group :data:`ENTRY_POINT_GROUP`, or a dotted path
    ``"pkg.mod:Class"`` (imported; a class or factory ``(pipeline, **kwargs) -> adapter`` that its module already
    registered keeps that family name, any other is registered under ``name``). What a recipe's ``model.adapter``
    names, so that a new model family (a video pipeline, say) trains from the command line without changes here.

    Raises:
        ConfigError: none of these, an import that fails, or an object that cannot be called.
    """
    from flowalign.errors import ConfigError
    from flowalign.plugins import find_plugin

    _import_families()
    if name in ADAPTERS:
        return name
    found = find_plugin(name, ENTRY_POINT_GROUP, "adapter")
    if found is None:
        raise ConfigError(f"unknown adapter {name!r}; registered: {sorted(ADAPTERS)}, or a dotted path 'package.module:Class', "
                          f"or an entry point of group {ENTRY_POINT_GROUP!r}")
    if not callable(found):
        raise ConfigError(f"adapter {name!r} is {found!r}, not a class or factory taking (pipeline, **kwargs) (flowalign.pipelines.base.Adapter)")
    registered = [family for family, cls in ADAPTERS.items() if cls is found]
    if registered:  # its module registered it (@register_adapter) when the import ran
        return registered[0]
    ADAPTERS[name] = found
    return name


# components a family can run without, passed as None when a folder lacks them (SD3 / SD3.5 without T5); a family's
# droppable components go together (a T5 encoder without its tokenizer cannot encode)
DROPPABLE_COMPONENTS = {"StableDiffusion3Pipeline": ("text_encoder_3", "tokenizer_3")}


def folder_load_kwargs(path: Union[str, Path], family: Optional[str] = None) -> dict:
    """Check a local pipeline folder against its ``model_index.json`` before loading anything, and return
    the ``from_pretrained`` kwargs it needs.

    * an unknown ``_class_name`` is refused at once (a large model is not loaded only to be refused);
    * a droppable component (SD3's T5: ``text_encoder_3``, ``tokenizer_3``) that the index leaves out
      or null, or whose folder is missing, is passed as None, with a warning, and so are its partners (a
      T5 encoder whose tokenizer is missing would fail at the first prompt);
    * any other component the index names but the folder lacks is a ``ConfigError`` naming it.

    With ``family`` (an adapter chosen by name, ``model.adapter``) a pipeline class no family claims is accepted.
    """
    import json

    from flowalign.errors import ConfigError

    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ConfigError(f"{str(path)!r} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{index_file} is not valid JSON: {exc}") from None
    _import_families()
    cls = index.get("_class_name") if isinstance(index, dict) else None
    if cls not in PIPELINE_CLASSES and family is None:
        known = ", ".join(sorted(PIPELINE_CLASSES))
        raise ConfigError(f"{str(path)!r} holds a {cls!r} pipeline; flowalign has adapters for: {known} (another adapter: "
                          "model.adapter, a dotted path 'package.module:Class' or an entry point)")
    droppable = DROPPABLE_COMPONENTS.get(cls, ())
    kwargs, dropped, missing = {}, [], []
    for name, entry in index.items():
        if name.startswith("_"):
            continue
        null = not (isinstance(entry, list) and entry and entry[0] is not None)  # [null, null]: saved as None
        exists = (path / name).exists()
        if name in droppable and (null or not exists):
            kwargs[name] = None
            dropped.append(name)
        elif not null and not exists:
            missing.append(name)
    for name in droppable:  # not in the index at all
        if name not in index:
            kwargs[name] = None
            dropped.append(name)
    if missing:
        raise ConfigError(f"{str(path)!r} lacks the component folder(s) {missing} that its model_index.json names")
    if dropped:
        partners = [name for name in droppable if name not in dropped]
        for name in partners:
            kwargs[name] = None
        if partners:
            logger.warning("%s: no %s in the folder, and %s cannot run without it; loading the pipeline without %s", path,
                           " / ".join(dropped), " / ".join(partners), " / ".join(droppable))
        else:
            logger.warning("%s: no %s in the folder; loading the pipeline without them", path, " / ".join(dropped))
    return kwargs


def load_adapter(
    pipeline_or_path: Union[Any, str, Path],
    family: Optional[str] = None,
    pipeline_kwargs: Optional[dict] = None,
    **kwargs: Any,
) -> Adapter:
    """Wrap a diffusers pipeline (object or local folder) in its flowalign adapter.

    Args:
        pipeline_or_path: a pipeline object, or a local diffusers folder (never downloaded).
        family: adapter name to force (e.g. ``"sd3"``); default: chosen by the pipeline class.
        pipeline_kwargs: extra ``DiffusionPipeline.from_pretrained`` arguments (``torch_dtype``...).
        **kwargs: passed to the adapter (e.g. ``max_sequence_length`` for SD3). A folder with a
            ``flowalign_toy.json`` (the toy) gets its recommended settings first, as ``flowalign train`` does.
    """
    _import_families()
    pipeline = pipeline_or_path
    if isinstance(pipeline_or_path, (str, Path)):
        from flowalign.assets import resolve_asset

        path = resolve_asset(pipeline_or_path)  # "assets/toy" from any folder with an installed flowalign
        if not path.is_dir():
            raise FileNotFoundError(f"{str(path)!r} is not a local diffusers pipeline folder (load_adapter loads local folders only; `model.pretrained` in a recipe also takes hub ids)")
        from diffusers import DiffusionPipeline

        pipeline = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **{**folder_load_kwargs(path, family), **(pipeline_kwargs or {})})
        from .toy import apply_toy_meta

        kwargs = {**apply_toy_meta(pipeline, path), **kwargs}  # a toy folder's recommended settings; the caller's win
    name = family or PIPELINE_CLASSES.get(type(pipeline).__name__)
    if name is None or name not in ADAPTERS:
        known = ", ".join(f"{cls} -> {fam}" for cls, fam in sorted(PIPELINE_CLASSES.items()))
        what = f"adapter family {family!r}" if family else f"pipeline class {type(pipeline).__name__!r}"
        raise ValueError(f"no flowalign adapter for {what}; known: {known or 'none'}")
    logger.info("using the %r adapter for %s", name, type(pipeline).__name__)
    return ADAPTERS[name](pipeline, **kwargs)
