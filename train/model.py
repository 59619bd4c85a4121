"""Build the model a run trains: a local diffusers folder, a hub id (from the hub cache, or downloaded
when the hub is reachable), the shipped toy, or the tiny test pipeline, wrapped in its adapter
(``flowalign.pipelines``) and frozen."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Union

import torch

from flowalign.errors import ConfigError
from flowalign.pipelines.toy import META_FILE as TOY_META_FILE  # noqa: F401 (re-exported: recommended settings next to a toy folder)

TINY_T5_TOKENS = 32  # T5 tokens (characters) of the builtin tiny pipeline: short attention (77 CLIP + 32)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the hub spells repository ids


def resolve_path(path: Union[str, Path]) -> Path:
    """A path as given, or, when it does not exist and starts with ``assets/``, the packaged asset."""
    from flowalign.assets import resolve_asset

    return resolve_asset(path)


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype argument for the installed diffusers: ``dtype`` where diffusers
    has it (newer releases deprecate ``torch_dtype`` with a FutureWarning on every load), else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


HASHED_FILE_BYTES = 64 * 2**20  # model files up to this size are named by their sha256, bigger ones by size and mtime


def model_files_signature(pretrained: str, revision: Optional[str] = None) -> dict[str, Any]:
    """``{relative path: [size, identity]}`` of every file of a model, what a resumed evaluation checks the model by:
    a file of up to 64 MiB by its sha256 (so the shipped toy reads the same from the repo and from the installed
    package), a hub cache's file by its blob's name (the content hash the hub gives it), and a bigger local file by its
    modification time (hashing SD3.5's 20 GB would cost more than a batch). A hub id is looked up in the local cache
    (``snapshot`` names its commit); ``{}`` for a builtin, or a hub id that is not cached."""
    from flowalign.checkpoint import sha256_file

    path = resolve_path("assets/toy" if pretrained == "toy" else pretrained)
    out: dict[str, Any] = {}
    if not path.is_dir() and HUB_ID.fullmatch(pretrained):
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(pretrained, revision=revision, local_files_only=True))
            out["snapshot"] = path.name
        except Exception:  # not cached (an offline machine that never downloaded it): the id alone
            return {}
    if not path.is_dir():
        return {}
    for f in sorted(path.rglob("*")):
        if f.is_file():
            st = f.stat()  # through a hub cache's symlinks to the blobs
            if f.is_symlink():
                identity: Any = f.resolve().name
            elif st.st_size <= HASHED_FILE_BYTES:
                identity = sha256_file(f)
            else:
                identity = st.st_mtime_ns
            out[str(f.relative_to(path))] = [st.st_size, identity]
    return out


def _adapter_class(family, pipeline_class: str):
    """The adapter class of ``family`` (``model.adapter``), else the one registered for ``pipeline_class``, or None."""
    from flowalign.pipelines import known_families
    from flowalign.pipelines.base import ADAPTERS

    return ADAPTERS.get(family or known_families().get(pipeline_class, ""))  # known_families imports the built-in ones


def _local_source(model_cfg) -> Path:
    """Where ``model.pretrained`` points on disk (``toy``: the shipped ``assets/toy``); a hub id gives a path that
    does not exist."""
    return resolve_path("assets/toy" if model_cfg.pretrained == "toy" else model_cfg.pretrained)


def _accepted(family, pipeline_class: str, kwargs: dict) -> dict:
    """The ``kwargs`` the adapter's constructor takes (all of them when it takes ``**kwargs``, or no adapter is known)."""
    import inspect

    cls = _adapter_class(family, pipeline_class)
    if cls is None:
        return kwargs
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _pipeline_class_of(model_cfg) -> str:
    """The pipeline class a ``model.pretrained`` will load, known without loading it (a builtin, or a folder's
    ``model_index.json``), else ``""`` (a hub id: known once loaded)."""
    import json

    if model_cfg.pretrained == "tiny-sd3":
        return "StableDiffusion3Pipeline"
    path = _local_source(model_cfg)
    try:
        return str(json.loads((path / "model_index.json").read_text(encoding="utf-8")).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def check_resolution(model_cfg) -> None:
    """Refuse a ``model.resolution`` that is not a multiple of the VAE factor x the transformer's patch size,
    read from a local folder's ``vae/config.json`` and ``transformer/config.json`` before the weights load
    (SD3 / FLUX-style folders; any other layout is left to the adapter, which checks after loading)."""
    import json

    if not model_cfg.resolution or model_cfg.pretrained == "tiny-sd3":
        return
    path = _local_source(model_cfg)
    try:
        vae = json.loads((path / "vae" / "config.json").read_text(encoding="utf-8"))
        patch = int(json.loads((path / "transformer" / "config.json").read_text(encoding="utf-8")).get("patch_size", 1))
        multiple = 2 ** (len(vae["block_out_channels"]) - 1) * patch
    except (OSError, ValueError, KeyError, TypeError):
        return
    if model_cfg.resolution % multiple:
        raise ConfigError(f"model.resolution={model_cfg.resolution}: must be a multiple of {multiple} (VAE factor x patch size "
                          f"of {path})")


def check_adapter_kwargs(family, pipeline_class: str, adapter_kwargs: dict) -> None:
    """Refuse ``model.adapter_kwargs`` the adapter's constructor does not take (before the weights load)."""
    import inspect

    if not adapter_kwargs:
        return
    cls = _adapter_class(family, pipeline_class)
    if cls is None:
        return
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    pipeline_arg = next(iter(params))  # the first parameter takes the pipeline, whatever its kind
    accepted = [name for name, p in params.items() if name != pipeline_arg and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(adapter_kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"model.adapter_kwargs: the adapter {cls.__name__} takes no {', '.join(map(repr, unknown))}; "
                          f"it takes {', '.join(accepted) or 'nothing'}")


def _variant_hint(path: Path, variant: Optional[str]) -> str:
    """``"; ..."`` naming the weight-file variants the folder's components hold (``model.fp16.safetensors``: ``fp16``)
    when they are not the one asked for, else ``""``."""
    found = set()
    for file in path.glob("*/*.safetensors"):
        parts = file.name.split(".")
        if len(parts) == 3:  # <stem>.<variant>.safetensors (a shard: <stem>-00001-of-00002.<variant>.safetensors)
            found.add(parts[1])
    named = sorted(found - {variant})
    if not named:
        return ""
    return f"; its weight files are of variant {', '.join(repr(v) for v in named)}: set model.variant={named[0]}"


def build_adapter(model_cfg, device: torch.device):
    """The pipeline named by ``model.pretrained`` wrapped in its adapter, frozen, on ``device``."""
    from flowalign.pipelines import load_adapter, resolve_adapter
    from flowalign.pipelines.toy import apply_toy_meta

    family = resolve_adapter(model_cfg.adapter) if model_cfg.adapter else None
    check_adapter_kwargs(family, _pipeline_class_of(model_cfg), model_cfg.adapter_kwargs)
    check_resolution(model_cfg)
    dtype = DTYPES[model_cfg.dtype]
    if model_cfg.pretrained == "tiny-sd3":
        from flowalign.pipelines.testing import tiny_sd3_pipeline

        pipeline = tiny_sd3_pipeline(seed=0)
        if dtype != torch.float32:
            pipeline.to(dtype=dtype)
    else:
        source = "assets/toy" if model_cfg.pretrained == "toy" else model_cfg.pretrained
        path = resolve_path(source)
        from diffusers import DiffusionPipeline

        variant = {"variant": model_cfg.variant} if model_cfg.variant else {}
        if path.is_dir():
            from flowalign.pipelines import folder_load_kwargs

            load_kwargs = folder_load_kwargs(path, family)
            try:
                pipeline = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, revision=model_cfg.revision,
                                                             **load_kwargs, **variant, **dtype_kwarg(dtype))
            except OSError as exc:  # no weights file of the expected name in a component folder: a variant folder, a partial copy
                raise ConfigError(f"model.pretrained={source!r}: the folder does not load ({' '.join(str(exc).split())[:300]})"
                                  f"{_variant_hint(path, model_cfg.variant)}") from None
        elif HUB_ID.fullmatch(source):  # e.g. stabilityai/stable-diffusion-3.5-medium: the hub cache, downloading if allowed
            try:
                pipeline = DiffusionPipeline.from_pretrained(source, revision=model_cfg.revision, **variant, **dtype_kwarg(dtype))
            except (OSError, ValueError) as exc:  # not cached and offline (HF_HUB_OFFLINE=1), gated, no such repo...
                import os

                reason = " ".join(str(exc).split())
                reason = reason if len(reason) <= 300 else reason[:299] + "…"
                offline = [name for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(name, "").strip() not in ("", "0")]
                where = f"from the cache only ({' and '.join(offline)} set)" if offline else "from the cache or the hub"
                raise ConfigError(f"model.pretrained={source!r}: no local folder of that name, and the hub id could not be loaded "
                                  f"{where} ({type(exc).__name__}: {reason})") from None
        else:
            raise ConfigError(f"model.pretrained={model_cfg.pretrained!r} is not a local diffusers folder, a hub id (owner/name) "
                              "nor a builtin ('tiny-sd3', 'toy')")
    pipeline.to(device)
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    kwargs = {}
    if model_cfg.pretrained == "tiny-sd3":
        kwargs["max_sequence_length"] = TINY_T5_TOKENS
    else:
        kwargs.update(apply_toy_meta(pipeline, path))
    if model_cfg.resolution:
        kwargs.update(height=model_cfg.resolution, width=model_cfg.resolution)
    kwargs["t5_cache_size"] = model_cfg.t5_cache_size
    kwargs = _accepted(family, type(pipeline).__name__, kwargs)  # SD3's settings only to adapters that take them
    if model_cfg.resolution and "height" not in kwargs:
        raise ConfigError(f"model.resolution={model_cfg.resolution}: the adapter {model_cfg.adapter or type(pipeline).__name__!r} takes "
                          "no height / width; set its size in model.adapter_kwargs")
    kwargs.update(model_cfg.adapter_kwargs)
    check_adapter_kwargs(family, type(pipeline).__name__, model_cfg.adapter_kwargs)  # a hub model: its class is known now
    try:
        adapter = load_adapter(pipeline, family=family, **kwargs)
    except ValueError as exc:  # a size the model cannot make (the adapter knows the multiple: VAE factor x patch size)
        if not model_cfg.resolution:
            raise
        raise ConfigError(f"model.resolution={model_cfg.resolution}: {exc}") from None
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    return adapter
