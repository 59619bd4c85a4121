"""OCR reward for visual text rendering (Flow-GRPO's text task), on the PP-OCR models that
``rapidocr-onnxruntime`` ships (DESIGN.md §3).

The prompt asks for a text in double quotes (``'a neon sign that says "Open 24 hours"'``); a
``text`` field in the prompt file's metadata, when present, is the target instead. The reward
reads the image with PP-OCR (detection + recognition, no angle classifier) and compares what it
read with the target, both normalised (Unicode NFKC, whitespace removed, case-folded)::

    read    = "".join(lines whose confidence >= min_confidence)          (in reading order)
    d       = 0                        if target is a substring of read
            = Levenshtein(read, target) otherwise
    score   = 1 - min(d, len(target)) / len(target)                       in [0, 1]

so a fully rendered text scores 1 whatever else the image shows, a blank image 0, and a
misspelling loses ``1 / len(target)`` per edit. This is Flow-GRPO's ``OcrScorer``
(``flow_grpo/ocr.py``) with these differences:

* the OCR: rapidocr's ONNX PP-OCRv4 detector and recogniser (``ch_``: Chinese and English,
  detection on images scaled to a 736-pixel short side, box threshold 0.5, unclip ratio 1.6,
  dilation on) where ``PaddleOCR(lang="en")`` loads English PP-OCRv3 detection and PP-OCRv4
  recognition (960-pixel long side, 0.6, 1.5, no dilation). Readings of the same image can
  differ; ``engine_kwargs`` sets rapidocr's keys (``det_box_thresh``, ``det_unclip_ratio``,
  ``det_donot_use_dilation``, ``det_limit_type``, ``det_limit_side_len``, model paths);
* ``min_confidence`` 0.5 is PaddleOCR's ``drop_score``, which its ``ocr()`` applies before
  Flow-GRPO's own ``> 0`` test;
* images reach the OCR in OpenCV's BGR order, as both libraries read arrays;
* an OCR failure raises (``call_reward``'s ``on_error`` then raises or drops the sample)
  instead of scoring 0: a crash is not a bad rendering;
* videos ``[B, T, 3, H, W]`` score the mean over every ``frame_stride``-th frame, each frame
  scored as an image (Flow-GRPO's video scorer drops the substring rule and averages only the
  frames that score above 0).

    pip install 'flowalign-rl[ocr]'     # rapidocr-onnxruntime (onnxruntime, opencv-python)
    rewards: [{name: ocr}]
"""
from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from flowalign.errors import ConfigError
from flowalign.rewards.base import Reward, RewardOutput, _quote, register_reward

QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')  # "text" or “text”: the first pair in the prompt


def target_text(prompt: str, metadata: Optional[Mapping[str, Any]] = None) -> str:
    """The text an image for ``prompt`` must show: ``metadata["text"]`` when given, else the first
    double-quoted span of the prompt (straight or curly quotes). ValueError when there is none."""
    if metadata and metadata.get("text") is not None:
        return str(metadata["text"])
    match = QUOTED.search(prompt)
    if match is None:
        raise ValueError(f"no quoted text in prompt {prompt!r}")
    return match.group(1) if match.group(1) is not None else match.group(2)


def normalize(text: str) -> str:
    """NFKC (full-width and compatibility forms to their plain letters), whitespace removed, case-folded:
    what the score compares (OCR splits and joins words freely)."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text)).casefold()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions
    turning ``a`` into ``b`` (dynamic programming over prefixes, O(len(a) len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1,  # delete ca
                               current[j - 1] + 1,  # insert cb
                               previous[j - 1] + (ca != cb)))  # substitute (free when equal)
        previous = current
    return previous[-1]


def normalized_target(prompt: str, metadata: Optional[Mapping[str, Any]] = None) -> str:
    """:func:`target_text`, normalised; ValueError when the prompt has none or it is empty."""
    target = normalize(target_text(prompt, metadata))
    if not target:
        raise ValueError(f"the text to render of prompt {prompt!r} is empty")
    return target


def text_distance(read: str, target: str) -> int:
    """``d`` of the module docstring on normalised strings: 0 when ``target`` occurs in ``read``,
    else their edit distance, capped at ``len(target)``."""
    if target in read:
        return 0
    return min(edit_distance(read, target), len(target))


def text_score(read: str, target: str) -> float:
    """``1 - d / len(target)`` for raw strings (normalised here); ValueError for an empty target."""
    read, target = normalize(read), normalize(target)
    if not target:
        raise ValueError("the target text is empty once whitespace is removed")
    return 1.0 - text_distance(read, target) / len(target)


def to_bgr_uint8(image: Tensor) -> np.ndarray:
    """``[3, H, W]`` float in [0, 1] -> ``[H, W, 3]`` uint8 in OpenCV's BGR order (what rapidocr
    expects of an array)."""
    rgb = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(rgb[..., ::-1])


@register_reward("ocr")
class OCRReward(Reward):
    """Text rendering: 1 - edit distance of PP-OCR's reading to the prompt's quoted text, over its length.

    The module docstring gives the formula and how it differs from Flow-GRPO's scorer.

    Args:
        device: where the score tensors go (the OCR runs in onnxruntime on the CPU unless
            ``engine_kwargs`` asks for CUDA, e.g. ``{det_use_cuda: true, rec_use_cuda: true}``
            with ``onnxruntime-gpu``).
        min_confidence: recognised lines under this confidence are ignored (0.5: PaddleOCR's
            ``drop_score``, under Flow-GRPO's reward).
        frame_stride: videos score every ``frame_stride``-th frame.
        num_threads: onnxruntime threads per model (default: ``torch.get_num_threads()``; at
            most the machine's CPU count).
        engine_kwargs: further ``rapidocr_onnxruntime.RapidOCR`` settings (its config keys,
            e.g. ``det_box_thresh``, ``rec_model_path``).

    ``details``: ``read`` (the normalised text read, per sample; videos: per frame),
    ``target`` (normalised), ``distance`` (``[B]``; videos: the mean over frames) and ``binary``
    (``[B]``: 1 where the whole text was read, in every scored frame of a video), which
    ``flowalign eval`` and the run report count as accuracy; their mean score is Flow-GRPO's metric.
    """

    differentiable = False

    def __init__(self, device: Optional[torch.device | str] = None, min_confidence: float = 0.5, frame_stride: int = 4,
                 num_threads: Optional[int] = None, engine_kwargs: Optional[Mapping[str, Any]] = None):
        super().__init__(device)
        if not 0.0 <= float(min_confidence) <= 1.0:
            raise ConfigError(f"ocr reward min_confidence must be in [0, 1], got {min_confidence}")
        if isinstance(frame_stride, bool) or not isinstance(frame_stride, int) or frame_stride < 1:
            raise ConfigError(f"ocr reward frame_stride must be a positive int, got {frame_stride!r}")
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:  # not installed, or opencv without its system libraries (libGL on minimal images)
            raise ConfigError(f"the ocr reward needs rapidocr-onnxruntime (PP-OCR models in ONNX): pip install 'flowalign-rl[ocr]'; "
                              f"importing it failed with: {exc} (opencv's system libraries on a minimal Linux image: "
                              f"apt-get install libgl1 libglib2.0-0)") from exc
        self.min_confidence = float(min_confidence)
        self.frame_stride = frame_stride
        threads = int(num_threads) if num_threads is not None else torch.get_num_threads()
        if threads < 1:
            raise ConfigError(f"ocr reward num_threads must be >= 1, got {num_threads}")
        # the global key reaches all three models' sessions (rapidocr ignores a count over the CPU count)
        _check_engine_kwargs(dict(engine_kwargs or {}))
        settings = {"text_score": self.min_confidence, "use_cls": False, "print_verbose": False,
                    "intra_op_num_threads": min(threads, os.cpu_count() or 1), **dict(engine_kwargs or {})}
        self.engine = RapidOCR(**settings)

    def check_prompts(self, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> None:
        """Every prompt needs a non-empty quoted text (or ``metadata["text"]``)."""
        bad = []
        for i, prompt in enumerate(prompts):
            try:
                normalized_target(prompt, metadata[i] if i < len(metadata) else None)
            except ValueError:
                bad.append(prompt)
        if bad:
            raise ConfigError(f"the ocr reward needs the text to render in double quotes (or a 'text' field in the prompt file): "
                              f"{len(bad)} of {len(prompts)} prompts have none: {_quote(bad)}")

    def read(self, image: Tensor) -> str:
        """The normalised text PP-OCR reads in one ``[3, H, W]`` image, lines in reading order."""
        result, _ = self.engine(to_bgr_uint8(image))
        lines = [text for _, text, confidence in (result or []) if float(confidence) >= self.min_confidence]
        return normalize("".join(lines))

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        if images.ndim not in (4, 5) or images.shape[-3] != 3:
            raise ValueError(f"ocr reward expects images [B, 3, H, W] or videos [B, T, 3, H, W], got shape {tuple(images.shape)}")
        scores, distances, exact, reads, targets = [], [], [], [], []
        for i, prompt in enumerate(prompts):
            target = normalized_target(prompt, metadata[i] if i < len(metadata) else None)
            frames = images[i][:: self.frame_stride] if images.ndim == 5 else images[i][None]
            read = [self.read(frame) for frame in frames]
            d = [text_distance(r, target) for r in read]
            scores.append(sum(1.0 - x / len(target) for x in d) / len(d))
            distances.append(sum(d) / len(d))
            exact.append(float(max(d) == 0))
            reads.append(read if images.ndim == 5 else read[0])
            targets.append(target)
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32, device=self.device),
                            details={"read": reads, "target": targets,
                                     "distance": torch.tensor(distances, dtype=torch.float32, device=self.device),
                                     "binary": torch.tensor(exact, dtype=torch.float32, device=self.device)})


def _rapidocr_keys() -> Optional[set[str]]:
    """The keyword arguments ``RapidOCR(**kwargs)`` applies, read from its shipped ``config.yaml`` (``Global`` keys as
    they are, ``det_<key>``, ``cls_`` / ``rec_`` keys as its ``UpdateParameters`` maps them); None when that file does
    not read as expected (another rapidocr version: nothing is checked)."""
    try:
        import yaml
        from rapidocr_onnxruntime import main as rapidocr_main

        config = yaml.safe_load(Path(rapidocr_main.DEFAULT_CFG_PATH).read_text(encoding="utf-8"))
        keys = set(config["Global"]) | {f"det_{k}" for k in config["Det"]} | {"det_donot_use_dilation"}
        for section, prefix in (("Cls", "cls_"), ("Rec", "rec_")):  # UpdateParameters strips the prefix of these only
            keys |= {k if k.startswith(prefix) else prefix + k for k in config[section]
                     if k.startswith(prefix) or k in ("model_path", "use_cuda", "use_dml", "label_list")}
        return keys
    except Exception:  # noqa: BLE001 - a layout this check does not know: leave the engine's arguments unchecked
        return None


def _check_engine_kwargs(engine_kwargs: Mapping[str, Any]) -> None:
    """ConfigError for ``engine_kwargs`` keys that rapidocr would silently ignore (it adds unknown keys to its config
    unread: ``det_box_thres`` for ``det_box_thresh`` changed nothing)."""
    known = _rapidocr_keys()
    unknown = sorted(set(engine_kwargs) - known) if known is not None else []
    if unknown:
        import difflib

        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, sorted(known), n=1)) else repr(k)
                 for k in unknown]
        raise ConfigError(f"ocr reward engine_kwargs: rapidocr does not use {', '.join(hints)}; it takes {sorted(known)}")
