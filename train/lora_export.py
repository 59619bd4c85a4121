"""The diffusers LoRA file a run writes: at its end (``<output_dir>/``) and in every checkpoint.

``pytorch_lora_weights.safetensors`` holds the transformer's LoRA and, when trained, the CLIP text
encoders' (``text_encoder.`` / ``text_encoder_2.`` keys), with each peft config (rank, alpha) in the
header, so plain diffusers' ``pipe.load_lora_weights(folder)`` and ``flowalign eval --lora folder``
load it. A checkpoint's copy (:func:`checkpoint_export`) makes a run stopped early (Ctrl-C, a crash)
usable without a resume: ``pipe.load_lora_weights("runs/x/checkpoints/iter_000020")``.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

from torch import Tensor, nn

from flowalign import lora as lora_lib


def trained_modules(adapter, text_modules: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """``{component: module}`` of every module with trained LoRA: the adapter's transformer first, then the text
    encoders (``lora.train_text_encoder``); both trainers' ``lora_modules``."""
    return {"transformer": adapter.trainable_module, **text_modules}


def lora_states(lora_modules: Mapping[str, nn.Module], ema=None) -> dict[str, dict[str, Tensor]]:
    """``{component: LoRA state}`` of ``lora_modules`` (``transformer`` and any text encoders), with the
    weights of ``ema`` (a :class:`flowalign.lora.LoraEMA`-like object with ``applied()``) when given."""
    with ema.applied() if ema is not None else nullcontext():
        return {name: lora_lib.get_lora_state_dict(module) for name, module in lora_modules.items()}


def save_lora_file(adapter, lora_modules: Mapping[str, nn.Module], directory: Union[str, Path],
                   states: Optional[dict[str, dict[str, Tensor]]] = None) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` through ``adapter.save_lora`` (a family may write
    its own keys). ``lora_modules``: ``{"transformer": module, "text_encoder": ..., ...}``, transformer
    first; ``states``: their LoRA states (default: the modules' current weights)."""
    states = lora_states(lora_modules) if states is None else states
    text = {name: (states[name], lora_lib.lora_metadata(module)) for name, module in lora_modules.items() if name != "transformer"}
    return adapter.save_lora(Path(directory), states["transformer"], metadata=lora_lib.lora_metadata(lora_modules["transformer"]),
                             **({"text_encoder_states": text} if text else {}))


def checkpoint_export(adapter, lora_modules: Mapping[str, nn.Module], ema=None) -> Callable[[Path], list[str]]:
    """A ``flowalign.checkpoint.save_checkpoint(export=...)`` hook writing the file the run would save if it
    ended now (EMA weights when ``ema`` is given) into the checkpoint's folder."""
    def write(folder: Path) -> list[str]:
        return [save_lora_file(adapter, lora_modules, folder, lora_states(lora_modules, ema)).name]
    return write
