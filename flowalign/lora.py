"""LoRA on the adapter's trainable module (and, with ``lora.train_text_encoder``, its text
encoders) via peft, in diffusers' file format (DESIGN.md §9).

* :func:`add_lora` freezes the module and injects peft LoRA layers
  (``module.add_adapter(peft.LoraConfig(...))`` for diffusers models); the update starts at 0
  (B = 0), so the policy equals the reference before the first optimizer step.
* :func:`get_lora_state_dict` / :func:`set_lora_state_dict` move the LoRA weights in the
  diffusers layout (``peft.utils.get_peft_model_state_dict`` keys, e.g.
  ``transformer_blocks.0.attn.to_q.lora_A.weight``), which ``save_lora_weights`` prefixes with
  ``transformer.`` when writing ``pytorch_lora_weights.safetensors``.
* :func:`lora_disabled` runs the reference model (LoRA off, on one or several modules) inside a ``with`` block.
* :class:`LoraEMA` keeps an exponential moving average of the LoRA weights.
* :func:`load_lora_into_pipeline` checks a LoRA file against a pipeline's transformer (and its
  CLIP text encoders, for files trained with them, like diffusers' DreamBooth
  ``--train_text_encoder``) first and raises :class:`~flowalign.errors.LoraMismatchError`
  listing what does not fit.
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
from safetensors import safe_open
from torch import Tensor, nn

from flowalign.errors import LoraMismatchError

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "default"
# the key prefixes (pipeline components) that SD3's ``load_lora_weights`` reads from one file
LORA_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")


def _tuner_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def add_lora(
    module: nn.Module,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    init: str = "gaussian",
    dropout: float = 0.0,
) -> list[nn.Parameter]:
    """Freeze ``module`` and inject LoRA (rank ``rank``, scale ``alpha / rank``) on ``target_modules``.

    Returns the trainable LoRA parameters (kept in fp32 whatever the module's dtype).

    Raises:
        LoraMismatchError: no module of ``module`` matches ``target_modules``.
    """
    from peft import LoraConfig as PeftLoraConfig

    peft_config = PeftLoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True if init == "default" else init,
        target_modules=list(target_modules),
    )
    if ADAPTER_NAME in (getattr(module, "peft_config", None) or {}):
        raise LoraMismatchError(f"{type(module).__name__} already carries flowalign's LoRA (adapter {ADAPTER_NAME!r}): a second run "
                                "on the same loaded model needs remove_lora(module) first (flowalign.lora), or a freshly loaded model")
    grads = [p.requires_grad for p in module.parameters()]
    peft_loaded = getattr(module, "_hf_peft_config_loaded", None)
    module.requires_grad_(False)
    try:
        from diffusers.loaders.peft import PeftAdapterMixin

        if isinstance(module, PeftAdapterMixin):  # diffusers models
            module.add_adapter(peft_config, adapter_name=ADAPTER_NAME)
        else:  # e.g. transformers' CLIP encoders, whose add_adapter wants a newer peft than diffusers does
            from peft import inject_adapter_in_model

            inject_adapter_in_model(peft_config, module, adapter_name=ADAPTER_NAME)
    except Exception as exc:
        # the module as it was: diffusers marks it as carrying a peft config before the injection fails, and a
        # second add_adapter (the right targets, in a notebook) then failed on the missing config
        for p, flag in zip(module.parameters(), grads):
            p.requires_grad_(flag)
        if peft_loaded is None:
            module.__dict__.pop("_hf_peft_config_loaded", None)
        else:
            module._hf_peft_config_loaded = peft_loaded
        if isinstance(exc, ValueError) and ("not found in the base model" in str(exc) or "Target modules" in str(exc)):
            raise LoraMismatchError(f"no module matches lora target_modules={list(target_modules)}: {exc}") from None
        raise
    params = lora_parameters(module)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    set_lora_dropout(module, False)  # off in rollouts, evaluation and references; lora_dropout_active turns it on
    logger.info("LoRA r=%d alpha=%s on %d layers, %d trainable parameters", rank, alpha, len(_tuner_layers(module)),
                sum(p.numel() for p in params))
    return params


def remove_lora(module: nn.Module) -> None:
    """Take flowalign's LoRA (adapter ``"default"``) off ``module`` again, so that another run can add its own to the same
    loaded model (a sweep). Its LoRA weights are gone; the base weights were never changed."""
    config = getattr(module, "peft_config", None) or {}
    if ADAPTER_NAME not in config:
        return
    from diffusers.loaders.peft import PeftAdapterMixin

    if isinstance(module, PeftAdapterMixin):
        module.delete_adapters(ADAPTER_NAME)
        return
    for layer in _tuner_layers(module):
        layer.delete_adapter(ADAPTER_NAME)
    config.pop(ADAPTER_NAME, None)


def add_text_lora(adapter, cfg) -> tuple[dict[str, nn.Module], list[nn.Parameter]]:
    """LoRA (``cfg``'s rank, alpha, init, dropout) on ``adapter.text_lora_modules`` for
    ``lora.train_text_encoder``: ``({component name: encoder}, their LoRA parameters)``.

    Raises:
        ConfigError: the adapter has no text encoders that take LoRA, ``cfg.text_encoder_target_modules``
            match nothing in one of them, or name none of the adapter's default targets (diffusers could not load the file).
    """
    from flowalign.errors import ConfigError

    modules = dict(getattr(adapter, "text_lora_modules", None) or {})
    if not modules:
        raise ConfigError(f"lora.train_text_encoder=true but the {type(adapter).__name__} adapter has no text encoders "
                          "that take LoRA (text_lora_modules is empty)")
    targets = cfg.text_encoder_target_modules or adapter.text_lora_target_modules
    defaults = list(adapter.text_lora_target_modules)
    if not {t.rsplit(".", 1)[-1] for t in targets} & {t.rsplit(".", 1)[-1] for t in defaults}:
        # diffusers' load_lora_weights tells a text-encoder LoRA's key format from those layers: without one of them the
        # run's pytorch_lora_weights.safetensors would not load ("Could not automatically infer state dict type")
        raise ConfigError(f"lora.text_encoder_target_modules={list(targets)} names none of {defaults}: diffusers could not load "
                          "the run's LoRA file (it reads a text-encoder LoRA's format from those layers); add one of them")
    params: list[nn.Parameter] = []
    for name, module in modules.items():
        try:
            params += add_lora(module, cfg.rank, cfg.alpha, targets, cfg.init, cfg.dropout)
        except LoraMismatchError as exc:
            raise ConfigError(f"lora.text_encoder_target_modules={list(targets)} match nothing in {name} "
                              f"({type(module).__name__}): {exc}") from None
    return modules, params


def text_lora_tensors(text_modules: Mapping[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    """Checkpoint tensor groups ``{"lora_<name>": LoRA state}`` of the text encoders with LoRA."""
    return {f"lora_{name}": get_lora_state_dict(module) for name, module in text_modules.items()}


def load_text_lora_tensors(text_modules: Mapping[str, nn.Module], tensors: Mapping[str, dict[str, Tensor]], path) -> None:
    """Restore :func:`text_lora_tensors` groups of checkpoint ``path`` into ``text_modules``.

    Raises:
        CheckpointError: the checkpoint holds no LoRA for one of the encoders.
    """
    from flowalign.errors import CheckpointError

    for name, module in text_modules.items():
        if f"lora_{name}" not in tensors:
            raise CheckpointError(f"checkpoint {path} has no LoRA for {name} but lora.train_text_encoder is on")
        set_lora_state_dict(module, tensors[f"lora_{name}"])


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters of ``module`` in a fixed order (named_parameters order)."""
    return [p for name, p in module.named_parameters() if "lora_" in name]


def get_lora_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """LoRA weights in the diffusers layout (``...to_q.lora_A.weight``), detached fp32 copies on CPU."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
    return {k: v.detach().float().cpu().clone() for k, v in state.items()}


def set_lora_state_dict(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` (as from :func:`get_lora_state_dict`) into the LoRA parameters, exactly.

    Raises:
        LoraMismatchError: a key is missing or unexpected, or a shape differs.
    """
    current = dict(module.named_parameters())
    # the adapter name as a whole path segment: "...lora_A.default.weight" and, for embeddings, "...lora_embedding_A.default"
    expected = {re.sub(rf"\.{re.escape(ADAPTER_NAME)}(?=\.|$)", "", name): p for name, p in current.items() if "lora_" in name}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        raise LoraMismatchError(_mismatch_message("LoRA state", missing, unexpected, shapes))
    with torch.no_grad():
        for key, p in expected.items():
            p.copy_(state[key].to(device=p.device, dtype=p.dtype))


@contextlib.contextmanager
def lora_disabled(module: nn.Module, *more: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` (and ``more`` modules, e.g. text encoders with LoRA) without their LoRA
    update (the frozen reference model) inside the block."""
    layers = [layer for m in (module, *more) for layer in _tuner_layers(m)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def _lora_dropouts(module: nn.Module) -> list[nn.Module]:
    """The dropout modules peft put in front of each LoRA branch (``nn.Identity`` when dropout is 0)."""
    return [d for layer in _tuner_layers(module) for d in getattr(layer, "lora_dropout", {}).values()]


def set_lora_dropout(module: nn.Module, active: bool) -> None:
    """Turn the LoRA dropout of ``module`` on (train mode) or off (eval mode), whatever mode the module is in.

    peft creates its dropout in train mode and the frozen base models here are never put in train mode,
    so :func:`add_lora` turns it off: a rollout, an evaluation or a reference forward must be a
    deterministic function of the weights (the rollout's recorded log-probs are the old policy's).
    """
    for dropout in _lora_dropouts(module):
        dropout.train(active)


@contextlib.contextmanager
def lora_dropout_active(*modules: nn.Module) -> Iterator[None]:
    """LoRA dropout on inside the block (the gradient forward of an update), off again after it."""
    try:
        for m in modules:
            set_lora_dropout(m, True)
        yield
    finally:
        for m in modules:
            set_lora_dropout(m, False)


def soft_update_decay(step: int, rate: float, max_decay: float, flat: int = 0) -> float:
    """DiffusionNFT's decay of the soft-updated old (sampling) policy (Zheng et al., arXiv 2509.16117, §4)::

        d(step) = 0                                         step < flat
                = min(rate · (step - flat), max_decay)      otherwise

    ``old <- d·old + (1 - d)·θ`` after each iteration, ``step`` counting the optimizer steps taken so
    far: with ``d = 0`` the sampler is the trained policy (on-policy); as ``d`` grows it lags behind
    it, which the paper found to stabilise long runs. The official presets are ``(0.001, 0.5, 0)`` and
    ``(0.0075, 0.999, 75)``.
    """
    if rate < 0 or not 0.0 <= max_decay < 1.0 or flat < 0:
        raise ValueError(f"soft_update_decay needs rate >= 0, max_decay in [0, 1), flat >= 0; got {rate}, {max_decay}, {flat}")
    return 0.0 if step < flat else min(rate * (step - flat), max_decay)


def power_ema_decay(step: int, gamma: float) -> float:
    """The power-function EMA's decay at optimizer step ``step`` (EDM2: Karras et al., "Analyzing
    and Improving the Training Dynamics of Diffusion Models", arXiv 2312.02696, §3.1)::

        beta(t) = (1 - 1/t) ** (gamma + 1),        t = 1, 2, ... (the step just taken, 1-based)

    used as ``ema <- beta(t)·ema + (1 - beta(t))·theta_t``. Step 1 copies the weights (beta = 0), so
    the average never holds the initial LoRA; afterwards it weights step i's weights roughly in
    proportion to ``i ** gamma``: ``gamma = 0`` is exactly the mean of every step's weights, and a
    larger ``gamma`` averages over a more recent tail whose length grows with the run (no decay to
    tune per run length). Worked example, gamma = 1: beta = 0, 1/4, 4/9 give after three steps
    ``(1·theta_1 + 3·theta_2 + 5·theta_3) / 9``.
    """
    if step < 1 or gamma < 0:
        raise ValueError(f"power_ema_decay needs step >= 1 and gamma >= 0; got step={step}, gamma={gamma}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def warmup_ema_decay(step: int, max_decay: float) -> float:
    """Flow-GRPO's EMA decay (``flow_grpo/ema.py``, ``EMAModuleWrapper.get_current_decay``) at 0-based optimizer step
    ``step``::

        decay(step) = min((1 + step) / (10 + step), max_decay)

    so early averages follow the weights closely (step 0: 0.1, step 10: 0.55) and the decay reaches ``max_decay`` 0.9
    at step 80. Worked example, max 0.9: steps 0, 1, 8 give 0.1, 2/11, 0.5.
    """
    if step < 0 or not 0.0 <= max_decay < 1.0:
        raise ValueError(f"warmup_ema_decay needs step >= 0 and 0 <= max_decay < 1; got step={step}, max_decay={max_decay}")
    return min((1.0 + step) / (10.0 + step), max_decay)


class LoraEMA:
    """Exponential moving average of the LoRA weights: ``ema <- decay·ema + (1 - decay)·theta``.

    Call :meth:`update` after each optimizer step; :meth:`applied` swaps the averaged weights in
    for the duration of a ``with`` block (eval, saving).
    """

    def __init__(self, params: Sequence[nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, decay: Optional[float] = None) -> None:
        """shadow <- decay * shadow + (1 - decay) * param, in fp32 (after each optimizer step).

        ``decay`` overrides the constructor's for this update (a schedule, :func:`soft_update_decay`);
        0 copies the parameters."""
        decay = self.decay if decay is None else float(decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        for s, p in zip(self.shadow, self.params):
            s.mul_(decay).add_(p.detach().float(), alpha=1.0 - decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the LoRA parameters hold the EMA weights; the trained ones come back after."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        """The shadow weights keyed ``"0"``, ``"1"``... in parameter order (for safetensors checkpoints)."""
        return {str(i): s.clone() for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`'s output; LoraMismatchError when the parameter count differs."""
        if len(state) != len(self.shadow):
            raise LoraMismatchError(f"EMA state has {len(state)} tensors, the model has {len(self.shadow)} LoRA parameters")
        # on the device of the copies they replace (the parameters'): a checkpoint loads on the CPU
        self.shadow = [state[str(i)].to(device=s.device, dtype=torch.float32).clone() for i, s in enumerate(self.shadow)]


def lora_metadata(module: nn.Module) -> Optional[dict]:
    """The peft ``LoraConfig`` of ``module`` as a dict (rank, alpha, targets), or None without LoRA.

    Stored in the safetensors header by ``save_lora_weights`` so that ``load_lora_weights``
    restores the same ``alpha / r`` scale (without it diffusers assumes alpha = r). Only :data:`PORTABLE_LORA_FIELDS`
    are written (r, alpha and targets always, the others when not peft's defaults), so a peft of another version, which
    refuses unknown fields, still builds the config. ``lora_dropout``
    is written as 0: dropout is a training-time regulariser, not part of the weights, and diffusers
    creates a loaded LoRA's dropout in train mode, so a non-zero value would randomise every image.
    Sets (peft keeps ``target_modules`` as one) become sorted lists, so the file's bytes do not depend
    on Python's string hash seed.
    """
    config = getattr(module, "peft_config", {}).get(ADAPTER_NAME)
    if config is None:
        return None
    from peft import LoraConfig

    defaults = LoraConfig().to_dict()
    data = {key: sorted(value, key=str) if isinstance(value, (set, frozenset)) else value for key, value in config.to_dict().items()}
    # a portable subset: diffusers builds LoraConfig(**header), and a peft of another version refuses fields it does not
    # know (this peft writes ~45); what shapes the loaded weights, always the three that define them, the rest when set
    portable = {key: value for key, value in data.items()
                if key in PORTABLE_LORA_FIELDS and (key in ("r", "lora_alpha", "target_modules") or value != defaults.get(key))}
    return {**portable, "lora_dropout": 0.0}


# LoraConfig fields a LoRA file's header keeps (lora_metadata): those that change the loaded weights' effect
PORTABLE_LORA_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "use_rslora", "lora_bias",
                        "bias", "fan_in_fan_out")


def save_lora_weights(pipeline, directory: Union[str, Path], state: dict[str, Tensor], metadata: Optional[dict] = None) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` with the pipeline class's ``save_lora_weights``.

    ``metadata`` defaults to :func:`lora_metadata` of ``pipeline.transformer``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if metadata is None:
        metadata = lora_metadata(pipeline.transformer)
    from flowalign.files import atomic_file_in

    with atomic_file_in(directory, LORA_WEIGHT_NAME) as tmp:  # replaced whole: a crash mid-write keeps the old file
        type(pipeline).save_lora_weights(tmp, transformer_lora_layers=state, safe_serialization=True,
                                         transformer_lora_adapter_metadata=metadata)
    return directory / LORA_WEIGHT_NAME


def _mismatch_message(what: str, missing: list, unexpected: list, shapes: list, limit: int = 5) -> str:
    def show(keys):
        return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {show(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {show(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} with wrong shapes: {show(shapes)}")
    return f"{what} does not fit the model; " + "; ".join(parts)


def lora_components(pipeline) -> dict[str, nn.Module]:
    """``{prefix: module}`` of the pipeline's components a LoRA file may target (:data:`LORA_COMPONENTS`)."""
    return {name: getattr(pipeline, name) for name in LORA_COMPONENTS if getattr(pipeline, name, None) is not None}


def _expected_lora_shape(layer: nn.Module, kind: str) -> Optional[tuple[int, int, int, str]]:
    """``(ndim, axis, size, name)`` a LoRA tensor of ``kind`` (the key after ``.lora_``: ``A.weight``,
    ``B.weight``, ``B.bias``, DoRA's ``magnitude_vector``, ``embedding_A``, ``embedding_B``) must have on ``layer``: ``shape[axis] == size``;
    None when ``layer`` cannot carry it (another model's key)."""
    if isinstance(layer, nn.Linear):
        dims = {"A.weight": (2, 1, layer.in_features, "in_features"), "B.weight": (2, 0, layer.out_features, "out_features"),
                "B.bias": (1, 0, layer.out_features, "out_features"), "magnitude_vector": (1, 0, layer.out_features, "out_features")}
    elif isinstance(layer, nn.modules.conv._ConvNd):
        ndim = layer.weight.dim()
        dims = {"A.weight": (ndim, 1, layer.in_channels, "in_channels"), "B.weight": (ndim, 0, layer.out_channels, "out_channels"),
                "B.bias": (1, 0, layer.out_channels, "out_channels"),
                "magnitude_vector": (ndim, 1, layer.out_channels, "out_channels")}  # DoRA: [1, out, 1, 1]
    elif isinstance(layer, nn.Embedding):
        dims = {"embedding_A": (2, 1, layer.num_embeddings, "num_embeddings"), "embedding_B": (2, 0, layer.embedding_dim, "embedding_dim")}
    else:
        return None
    return dims.get(kind)


def read_lora_file(path: Union[str, Path]) -> tuple[Path, dict[str, tuple], dict[str, str]]:
    """``(file, {key: shape}, header metadata)`` of a LoRA safetensors file, or of the
    ``pytorch_lora_weights.safetensors`` in a folder; reads the header only, so a CLI can refuse a
    wrong path before any model loads.

    Raises:
        LoraMismatchError: no such file (naming the ``.safetensors`` files a folder holds instead; for an old
            checkpoint without the file, how to get one), or a file that is not readable safetensors.
    """
    given = Path(path)
    file = given / LORA_WEIGHT_NAME if given.is_dir() else given
    if not file.is_file():
        others = sorted(p.name for p in given.glob("*.safetensors")) if given.is_dir() else []
        hint = f"; the folder holds {', '.join(others)}: pass that file itself" if others else ""
        if (given / "manifest.json").is_file():  # a checkpoint from before checkpoints held the diffusers file
            hint = ("; this checkpoint predates checkpoints carrying it (its lora.safetensors is resume state, without "
                    "diffusers' key prefixes): the run's own pytorch_lora_weights.safetensors holds its end, and "
                    "`flowalign train --resume` from this checkpoint writes the file into the checkpoints that follow it "
                    "(not into this one)")
        from flowalign.files import relative_to_cwd

        raise LoraMismatchError(f"LoRA file not found: {file}{relative_to_cwd(file)}{hint}")
    try:
        with safe_open(str(file), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
            header = fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError (bad header, truncated copy), OSError
        raise LoraMismatchError(f"{file} is not a readable safetensors LoRA file ({type(exc).__name__}: {exc})") from None
    return file, shapes, header


# diffusers' own text-encoder key form (``convert_state_dict_to_diffusers``, DreamBooth / SDXL scripts), which
# load_lora_weights converts to peft's: ``<layer>.lora_linear_layer.down.weight`` is ``<layer>.lora_A.weight``
DIFFUSERS_KEY_FORMS = ((".lora_linear_layer.down.", ".lora_A."), (".lora_linear_layer.up.", ".lora_B."))


def _peft_form(key: str) -> str:
    """``key`` in peft's form (``.lora_A.`` / ``.lora_B.``) when it is in diffusers' (:data:`DIFFUSERS_KEY_FORMS`)."""
    for theirs, ours in DIFFUSERS_KEY_FORMS:
        if theirs in key:
            return key.replace(theirs, ours)
    return key


def check_lora_file(path: Union[str, Path], module: Union[nn.Module, Mapping[str, nn.Module]], prefix: str = "transformer") -> dict[str, tuple]:
    """Check every key of a diffusers LoRA file against ``module``; return ``{key: shape}``.

    ``module`` is one module, whose keys carry ``prefix``, or a mapping ``{prefix: module}`` such
    as :func:`lora_components` of a pipeline. A key ``<prefix>.<module path>.lora_A.weight`` fits
    when ``<module path>`` is a linear layer of that prefix's module with
    ``lora_A: [r, in_features]`` and ``lora_B: [out_features, r]`` (and ``lora_B.bias: [out_features]``);
    conv layers take ``[r, in_channels, ...]`` / ``[out_channels, r, ...]``, embeddings
    ``lora_embedding_A: [r, num_embeddings]`` / ``lora_embedding_B: [embedding_dim, r]``.

    Logs a warning for each prefix in the file whose ``lora_alpha`` the safetensors header does
    not carry (diffusers then loads those weights with ``alpha = r``).

    Raises:
        LoraMismatchError: listing keys for another model (wrong prefix or unknown module) and
            keys whose shapes do not fit.
    """
    modules = dict(module) if isinstance(module, Mapping) else {prefix: module}
    path, shapes, header = read_lora_file(path)
    layers = {name: dict(m.named_modules()) for name, m in modules.items()}
    unknown, bad_shape, present = [], [], set()
    for key, shape in shapes.items():
        owner = next((name for name in modules if key.startswith(name + ".")), None)  # "text_encoder_2." never starts with "text_encoder."
        base, _, kind = _peft_form(key[len(owner) + 1:] if owner else "").rpartition(".lora_")
        layer = layers[owner].get(base.replace(f".{ADAPTER_NAME}", "")) if owner else None
        expected = _expected_lora_shape(getattr(layer, "base_layer", layer), kind) if layer is not None else None
        if expected is None:
            unknown.append(key)
            continue
        present.add(owner)
        ndim, axis, size, what = expected
        if len(shape) != ndim or shape[axis] != size:
            bad_shape.append(f"{key} {list(shape)} (layer {what} {size})")
    if unknown or bad_shape or not shapes:
        raise LoraMismatchError(_mismatch_message(f"LoRA file {path}", [] if shapes else ["(file holds no tensors)"], sorted(unknown), sorted(bad_shape)))
    for name in sorted(present):
        if f'"{name}.lora_alpha"' not in header.get("lora_adapter_metadata", ""):
            logger.warning("LoRA file %s has no %s.lora_alpha in its header (lora_adapter_metadata): diffusers loads it with "
                           "alpha = r, so a LoRA trained with another alpha acts at another strength (flowalign writes the header)",
                           path, name)
    return shapes


def load_lora_into_pipeline(pipeline, path: Union[str, Path], adapter_name: Optional[str] = None) -> None:
    """Check a LoRA file (or a folder holding ``pytorch_lora_weights.safetensors``) against the
    pipeline's transformer and text encoders (:func:`lora_components`), then load it (its weights in fp32 on a
    half-precision model, as training used them: :func:`_lora_in_fp32`).

    Raises:
        LoraMismatchError: the file was trained for another architecture or size.
    """
    components = lora_components(pipeline)
    check_lora_file(path, components)
    path = Path(path)
    kwargs = {"adapter_name": adapter_name} if adapter_name else {}
    before = _adapter_names(components)
    if path.is_dir():
        pipeline.load_lora_weights(str(path), weight_name=LORA_WEIGHT_NAME, **kwargs)
    else:
        pipeline.load_lora_weights(str(path.parent), weight_name=path.name, **kwargs)
    for module in components.values():  # a file whose header asks for dropout (another tool's) must not randomise samples
        set_lora_dropout(module, False)
    new = _adapter_names(components) - before
    if any(p.dtype in (torch.float16, torch.bfloat16) for m in components.values() for n, p in m.named_parameters() if "lora_" in n):
        _lora_in_fp32(components, path / LORA_WEIGHT_NAME if path.is_dir() else path, new)


def _adapter_names(components: Mapping[str, nn.Module]) -> set[str]:
    return {name for module in components.values() for name in (getattr(module, "peft_config", None) or {})}


# <layer>.lora_A.<adapter>.weight; an embedding's <layer>.lora_embedding_A.<adapter> (a ParameterDict entry: no suffix)
_ADAPTER_SEGMENT = re.compile(r"\.(lora_[A-Za-z_]+)\.([^.]+)(?:\.(weight|bias))?$")


def _lora_in_fp32(components: Mapping[str, nn.Module], file: Path, adapters: set[str]) -> None:
    """The just-loaded ``adapters``' LoRA parameters in fp32 with the file's own values, as training used them
    (:func:`add_lora` keeps LoRA in fp32 on a fp16 / bf16 model). diffusers loads them in the model's dtype, which
    moved bf16 samples visibly (0.27 in images at guidance 4.5 on the toy) from those the run trained and reported;
    peft casts a layer's input to its LoRA's dtype and the sum back. Parameters the file's keys do not name (another
    tool's key form) are upcast from what diffusers loaded."""
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    by_key = {_peft_form(key): value for key, value in tensors.items()}
    for prefix, module in components.items():
        for name, param in module.named_parameters():
            found = _ADAPTER_SEGMENT.search(name)
            if found is None or found.group(2) not in adapters:
                continue
            suffix = f".{found.group(3)}" if found.group(3) else ""
            source = by_key.get(f"{prefix}.{name[:found.start()]}.{found.group(1)}{suffix}")
            if source is not None and source.shape == param.shape:
                param.data = source.to(device=param.device, dtype=torch.float32)
            elif param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()


def _component_of(key: str, components: Sequence[str]) -> Optional[str]:
    """The component whose ``<name>.`` prefixes ``key`` (the longest: ``text_encoder_2.`` before ``text_encoder.``)."""
    found = [name for name in components if key.startswith(name + ".")]
    return max(found, key=len) if found else None


def _header_value(header: Mapping[str, str], component: str, field: str):
    """``<component>.<field>`` of a diffusers LoRA file's ``lora_adapter_metadata`` header, or None."""
    import json

    try:
        meta = json.loads(header.get("lora_adapter_metadata") or "{}")
    except ValueError:
        return None
    return meta.get(f"{component}.{field}") if isinstance(meta, dict) else None


def load_initial_lora(modules: Mapping[str, nn.Module], path: Union[str, Path], rank: int, alpha: float) -> dict[str, int]:
    """Start the LoRA of ``modules`` (``{"transformer": ..., "text_encoder": ...}``, as :func:`add_lora` /
    :func:`add_text_lora` built them) from a diffusers LoRA file (``lora.init_from``: a previous run's
    ``pytorch_lora_weights.safetensors`` or its folder), so that the policy starts as that LoRA's model.

    The file must fit the LoRA it is copied into: every key a LoRA layer of that component (the same
    ``target_modules`` or fewer), at rank ``rank``, and trained with ``alpha`` (the header's
    ``<component>.lora_alpha``; a file without it was, for diffusers, trained with alpha = r). Layers the file
    does not hold keep their fresh init (B = 0: no update). Returns ``{component: keys loaded}``.

    Raises:
        LoraMismatchError: the file is missing or unreadable, holds LoRA for a component that ``modules``
            lacks (e.g. text encoders without ``lora.train_text_encoder``) or for layers the LoRA does not
            adapt, at another rank or alpha, or holds nothing for ``modules``.
    """
    from safetensors.torch import load_file

    file, shapes, header = read_lora_file(path)
    by_component: dict[str, dict[str, str]] = {}
    strays = []
    for key in shapes:
        component = _component_of(key, LORA_COMPONENTS)
        if component is None:
            strays.append(key)
        else:
            by_component.setdefault(component, {})[_peft_form(key[len(component) + 1:])] = key
    if strays:
        raise LoraMismatchError(f"lora.init_from={file}: keys outside {list(LORA_COMPONENTS)} (another tool's format?): "
                                + ", ".join(sorted(strays)[:5]))
    extra = sorted(set(by_component) - set(modules))
    if extra:
        hint = " (set lora.train_text_encoder=true)" if any(name.startswith("text_encoder") for name in extra) else ""
        raise LoraMismatchError(f"lora.init_from={file} holds LoRA for {', '.join(extra)}, which this run does not train{hint}: "
                                "starting without it would not start from that file's model")
    if not by_component:
        raise LoraMismatchError(f"lora.init_from={file} holds no LoRA tensors")
    tensors = load_file(str(file))
    loaded = {}
    for component, keys in by_component.items():
        module = modules[component]
        state = get_lora_state_dict(module)
        unknown = sorted(k for k in keys if k not in state)
        if unknown:
            targets = _header_value(header, component, "target_modules")
            raise LoraMismatchError(
                f"lora.init_from={file}: {len(unknown)} {component} LoRA layers this run does not adapt ("
                + ", ".join(unknown[:3]) + (" ..." if len(unknown) > 3 else "") + ")"
                + (f"; the file was trained with target_modules={targets}: set lora.target_modules (or "
                   "lora.text_encoder_target_modules) to them" if targets else "; set lora.target_modules to the file's"))
        file_ranks = {tuple(shapes[keys[k]])[0] for k in keys if k.endswith("lora_A.weight")}
        if file_ranks and file_ranks != {rank}:
            raise LoraMismatchError(f"lora.init_from={file}: its {component} LoRA has rank {sorted(file_ranks)}, this run "
                                    f"lora.rank={rank}; set lora.rank to the file's")
        bad = sorted(k for k in keys if tuple(shapes[keys[k]]) != tuple(state[k].shape))
        if bad:
            raise LoraMismatchError(f"lora.init_from={file}: {component} tensors of another shape: "
                                    + ", ".join(f"{k} {list(shapes[keys[k]])} (here {list(state[k].shape)})" for k in bad[:3]))
        unsupported = {field: value for field in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "lora_bias")
                       if (value := _header_value(header, component, field)) not in (None, False, {}, "none")}
        if unsupported:
            raise LoraMismatchError(f"lora.init_from={file}: its {component} LoRA was trained with {unsupported}, which change how its "
                                    "weights act and which flowalign's LoRA does not use: it cannot start from that file")
        file_alpha = _header_value(header, component, "lora_alpha")
        file_alpha = float(file_alpha if file_alpha is not None else rank)  # diffusers' reading of a header without it
        if abs(file_alpha - float(alpha)) > 1e-6 * max(1.0, abs(alpha)):
            raise LoraMismatchError(f"lora.init_from={file}: its {component} LoRA was trained with alpha {file_alpha:g}, this "
                                    f"run lora.alpha={alpha:g} (the update is scaled by alpha / r); set lora.alpha={file_alpha:g}")
        state.update({k: tensors[key].float() for k, key in keys.items()})
        set_lora_state_dict(module, state)
        loaded[component] = len(keys)
    logger.info("LoRA starts from %s (%s)", file, ", ".join(f"{c}: {n} tensors" for c, n in loaded.items()))
    return loaded


class LoraSnapshot:
    """A frozen copy of the LoRA weights of some modules (``lora.reference: init``: the reference policy is the
    LoRA a run started from, not the base model).

    :meth:`applied` gives each snapshot module its copied weights inside a ``with`` block by rebinding the
    parameters' ``.data`` (no in-place write), so a reference forward run between the policy's forward and its
    backward leaves the tensors autograd saved untouched.
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules = dict(modules)
        self.copies = {name: [p.detach().clone() for p in lora_parameters(m)] for name, m in self.modules.items()}

    @contextlib.contextmanager
    def applied(self, *modules: nn.Module) -> Iterator[None]:
        """Within the block ``modules`` (default: all) run with the snapshot's LoRA weights, LoRA dropout off (a
        reference is a fixed function of its weights, also inside an update's :func:`lora_dropout_active`)."""
        chosen = [name for name, m in self.modules.items() if not modules or any(m is x for x in modules)]
        pairs = [(p, c) for name in chosen for p, c in zip(lora_parameters(self.modules[name]), self.copies[name])]
        kept = [p.data for p, _ in pairs]
        dropouts = [d for name in chosen for d in _lora_dropouts(self.modules[name])]
        modes = [d.training for d in dropouts]
        try:
            for p, c in pairs:
                p.data = c
            for d in dropouts:
                d.train(False)
            yield
        finally:
            for (p, _), data in zip(pairs, kept):
                p.data = data
            for d, mode in zip(dropouts, modes):
                d.train(mode)

    def state(self) -> dict[str, dict[str, Tensor]]:
        """Checkpoint tensor groups ``{"lora_init_<component>": LoRA state}`` (keys as :func:`get_lora_state_dict`'s)."""
        out = {}
        for name, module in self.modules.items():
            with self.applied(module):
                out[f"lora_init_{name}"] = get_lora_state_dict(module)
        return out

    def load_state(self, tensors: Mapping[str, Mapping[str, Tensor]], path) -> None:
        """Restore :meth:`state`'s groups (a resume of a ``lora.reference: init`` run reads the start from the checkpoint).

        Raises:
            CheckpointError: the checkpoint holds no copy for one of the modules.
        """
        from flowalign.errors import CheckpointError

        for name, module in self.modules.items():
            group = tensors.get(f"lora_init_{name}")
            if group is None:
                raise CheckpointError(f"checkpoint {path} holds no starting LoRA for {name} (lora_init_{name}) but lora.reference is init")
            with self.applied(module):
                set_lora_state_dict(module, dict(group))


def reference_weights(snapshot: Optional[LoraSnapshot], *modules: nn.Module):
    """The context in which ``modules`` run as the reference policy: their LoRA off (the base model), or with
    ``snapshot``'s weights (``lora.reference: init``)."""
    return snapshot.applied(*modules) if snapshot is not None else lora_disabled(*modules)
