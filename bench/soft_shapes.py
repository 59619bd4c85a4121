"""A differentiable surrogate of the ``shapes`` verifier, for reward backpropagation through the image.

AlignProp / DRaFT-style training needs ``d reward / d image``; the ``shapes`` verifier
(:mod:`flowalign.rewards.shapes`) is a rule-based, piecewise-constant pipeline (thresholded colour
segmentation, connected components, shape rules) with no useful gradient. This module distils it
into a small fully-convolutional network and scores prompts with smooth versions of its rules:

* :class:`ShapeDetector`: a 3-level U-Net (about 0.2M parameters) on ``[B, 3, 32, 32]`` images in
  [0, 1]. ``seg`` logits ``[B, 20, 32, 32]`` over ``background``, ``other`` (foreground the verifier
  does not accept as a clean shape) and the 18 ``(colour, shape)`` classes in palette order
  (:data:`CLASS_NAMES`); ``centre`` maps ``[B, 18, 32, 32]`` (non-negative: each pair's class
  probability times one class-agnostic softplus density map trained towards ``1 / area`` on each
  accepted object) whose sum over pixels is the soft number of objects of each ``(colour, shape)``.
* Labels come from the verifier itself (:func:`verifier_objects`: the objects of
  :func:`flowalign.rewards.shapes.detect` with their pixel masks), so the surrogate learns the
  verifier's own judgement of blurry and malformed shapes.
* :class:`SoftShapesReward`: ``reward(images, prompts) -> Tensor[B]``, differentiable w.r.t. the
  images, with soft counts and soft position relations (see its docstring).

``python bench/soft_shapes.py --build`` generates the data (rendered scenes, their round trip through
the toy's VAE, samples of the toy model for the *training* prompts), trains the detector and
validates it; ``--validate`` re-runs only the validation on the saved weights. Outputs go to
``bench/results/soft_shapes/`` (``detector.safetensors``, ``detector.json``, ``summary.json``);
cached arrays to ``--scratch`` (default ``/tmp/soft_shapes_scratch``). The held-out prompt file is
used for scoring only (:func:`validate`'s checks (iii) and (iv)), never for training.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flowalign.rewards.base import Reward, RewardOutput  # noqa: E402
from flowalign.rewards.shapes import detect, detect_with_masks, evaluate, scene_pixels  # noqa: E402
from flowalign.rewards.shapes_scenes import (COLORS, SHAPES, SIZE, TAGS, Spec, load_prompts,  # noqa: E402
                                             parse_prompt, render_spec, sample_specs, split_renditions,
                                             watermarked_renditions)

logger = logging.getLogger("soft_shapes")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "soft_shapes"
DEFAULT_WEIGHTS = RESULTS / "detector.safetensors"
SCRATCH = Path("/tmp/soft_shapes_scratch")
TOY = ROOT / "assets" / "toy"

PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)  # palette order, then shape
CLASS_NAMES: tuple[str, ...] = ("background", "other") + tuple(f"{c} {s}" for c, s in PAIRS)
N_PAIRS = len(PAIRS)  # 18
N_CLASSES = len(CLASS_NAMES)  # 20
BG, OTHER = 0, 1


def pair_index(color: str, shape: str) -> int:
    """Index of ``(color, shape)`` among the 18 pairs (``seg`` class ``2 + index``, ``centre`` channel ``index``)."""
    return COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


# ----------------------------------------------------------------------------- labels from the verifier


def verifier_objects(image: np.ndarray) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The verifier's objects in ``image`` (float ``[32, 32, 3]`` in 0..255, as :func:`scene_pixels` gives),
    each with its boolean ``mask``, largest first, and its per-pixel labels (``-1`` background, ``-2``
    unexplained, else the colour index): :func:`flowalign.rewards.shapes.detect_with_masks`."""
    return detect_with_masks(image)


def make_labels(images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[dict[str, Any]]]]:
    """Verifier labels of ``uint8 [N, 32, 32, 3]`` images.

    Returns ``seg [N, 32, 32]`` int64 class indices (:data:`CLASS_NAMES`: pixels of an accepted
    object get its ``(colour, shape)`` class; other foreground, i.e. any pixel the verifier does not
    call background, gets ``other``; the rest ``background``), ``density [N, 32, 32]`` float32
    (``1 / area`` on the pixels of each accepted object, 0 elsewhere: unit mass per object),
    ``counts [N, 18]`` (accepted objects per pair) and the objects (without masks).

    (A first version's target, a unit-mass Gaussian of sigma 1.5 px at each object's centroid in its
    pair's channel, generalised badly to held-out colour-shape pairs: see :class:`ShapeDetector`.)
    """
    n = len(images_u8)
    seg = np.zeros((n, SIZE, SIZE), np.int64)
    density = np.zeros((n, SIZE, SIZE), np.float32)
    counts = np.zeros((n, N_PAIRS), np.float32)
    found = []
    for i in range(n):
        objects, labels = verifier_objects(images_u8[i].astype(np.float32))
        s = np.where(labels == -1, BG, OTHER)
        for o in objects:
            if o["shape"] == "other":
                continue
            k = pair_index(o["color"], o["shape"])
            s[o["mask"]] = 2 + k
            density[i][o["mask"]] = 1.0 / o["area"]
            counts[i, k] += 1
        seg[i] = s
        found.append([{k: v for k, v in o.items() if k != "mask"} for o in objects])
    return seg, density, counts, found


# ----------------------------------------------------------------------------- the detector


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ShapeDetector(nn.Module):
    """Fully-convolutional detector distilled from the ``shapes`` verifier.

    A 3-level U-Net (32 -> 16 -> 8 pixels, widths ``width``, ``2 width``, ``2 width``; a dilated
    conv at the bottom for a receptive field over a whole object and its bounding box).

    The centre maps are factorised: ``centre[:, k] = softmax(seg)[:, 2 + k] * density`` with one
    class-agnostic, non-negative ``density`` map trained towards ``1 / area`` on each accepted
    object's pixels (unit mass per object). So a pair's soft count is the density mass that its
    class probability covers: the object split (density) does not depend on the colour-shape pair,
    and the class decision is the segmentation's. (A first version with 18 free centre channels and
    Gaussian centroid targets segmented held-out pairs such as red triangles correctly but counted
    them at 0.15 of their number: the per-pair channels did not compose.)

    Args:
        width: channels at full resolution (24 gives about 0.13M parameters, 32 about 0.23M).

    ``forward(images)``: ``images [B, 3, H, W]`` float in [0, 1] (other sizes are bilinearly resized
    to 32x32, differentiably) -> ``(seg, centre)``: ``seg [B, 20, 32, 32]`` logits over
    :data:`CLASS_NAMES` and ``centre [B, 18, 32, 32]`` non-negative maps (softplus) whose sum over
    pixels approximates the number of verifier-accepted objects of each ``(colour, shape)`` pair.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        w1, w2 = width, 2 * width
        self.width = width
        self.enc1 = nn.Sequential(_block(3, w1), _block(w1, w1))
        self.enc2 = nn.Sequential(_block(w1, w2, 2), _block(w2, w2))
        self.enc3 = nn.Sequential(_block(w2, w2, 2), nn.Conv2d(w2, w2, 3, 1, 2, dilation=2, bias=False), nn.BatchNorm2d(w2), nn.ReLU(inplace=True))
        self.dec2 = _block(w2 + w2, w2)
        self.dec1 = _block(w2 + w1, w1)
        self.seg_head = nn.Conv2d(w1, N_CLASSES, 1)
        self.density_head = nn.Conv2d(w1, 1, 1)
        with torch.no_grad():
            self.density_head.bias.fill_(-4.0)  # softplus(-4) ~ 0.018: about 1 / (an object's area)

    def heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``seg`` logits ``[B, 20, 32, 32]`` and the class-agnostic ``density [B, 1, 32, 32]``."""
        if images.shape[-2:] != (SIZE, SIZE):
            images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=False)
        x = images * 2.0 - 1.0
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2, mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2, mode="nearest"), e1], 1))
        return self.seg_head(d1), F.softplus(self.density_head(d1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg, density = self.heads(images)
        return seg, seg.softmax(1)[:, 2:] * density


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_detector(model: ShapeDetector, path: Path = DEFAULT_WEIGHTS, extra: Optional[dict[str, Any]] = None) -> None:
    """Weights (safetensors, buffers included) at ``path`` and ``{arch args, classes}`` in ``path.with_suffix('.json')``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    meta = {"class": "ShapeDetector", "args": {"width": model.width}, "classes": list(CLASS_NAMES), "params": n_params(model),
            "input": "[B, 3, H, W] in [0, 1], resized to 32x32",
            "centre": "softmax(seg)[:, 2:] * softplus density (target 1/area on accepted objects)", **(extra or {})}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_detector(path: Optional[str | Path] = None) -> ShapeDetector:
    """The trained detector (default ``bench/results/soft_shapes/detector.safetensors``), in eval
    mode with ``requires_grad=False`` on its parameters (gradients still flow to its input)."""
    from safetensors.torch import load_file

    path = Path(path) if path else DEFAULT_WEIGHTS
    meta_file = path.with_suffix(".json")
    args = json.loads(meta_file.read_text(encoding="utf-8"))["args"] if meta_file.is_file() else {}
    model = ShapeDetector(**args)
    model.load_state_dict(load_file(str(path)))
    model.eval()
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- the soft reward


class SoftShapesReward:
    """Differentiable surrogate of the ``shapes`` verifier: ``reward(images, prompts) -> Tensor[B]``.

    ``images [B, 3, H, W]`` in [0, 1] (gradients flow to them); ``prompts`` are captions of the toy
    grammar (:func:`parse_prompt`) or specs (dicts with ``include``). The detector gives per-pixel
    class probabilities ``p = softmax(seg)`` and object-centre maps ``c``. For an entry asking for
    ``shape`` (in ``color``, or any colour when None):

    * probability map ``P_e = sum`` of ``p`` over the matching ``(colour, shape)`` classes;
    * soft count ``n_e = sum`` over pixels of the matching ``c`` channels.

    The constraints mirror :func:`flowalign.rewards.shapes.evaluate` (GenEval's rule), each a term in [0, 1]:

    * include "at least ``count``": ``exp(-relu(count - n_e)^2 / (2 width^2))`` (one-sided, as the
      verifier ignores extra objects); a coloured entry first adds the same term for the shape in
      any colour (the verifier's partial score counts it twice the same way);
    * exclude "fewer than ``count``": ``exp(-relu(n_e - (count - 1))^2 / (2 width^2))`` (counting
      prompts exclude ``count + 1``, so with the include term the pair asks for exactly ``count``);
    * ``exact_counts=True`` instead scores each include entry by the two-sided
      ``exp(-(n_e - count)^2 / (2 width^2))`` (and drops the exclude terms); a coloured entry's
      shape-in-any-colour term stays one-sided;
    * position ``[rel, j]``: soft centroids ``(x_e, y_e) = sum(P_e * xy) / sum(P_e)`` of the entry and
      of entry ``j``; ``d`` = the offset along the relation's axis with its sign (image ``y`` grows
      downwards: ``left of`` is ``x_e < x_j``, ``above`` is ``y_e < y_j``, as in
      :func:`flowalign.rewards.shapes.relative_position`), ``o`` the offset across it; the term is
      ``sigmoid((d - margin) / tau) * sigmoid((sqrt(3) d - |o|) / tau)``: the verifier asks that the
      margin-reduced offset point within 60 degrees of the axis.

    ``mode="mean"`` averages the terms (like the verifier's partial score), ``mode="product"``
    multiplies them (like its 1/0 verdict).

    With ``n_aug > 0`` the score is the mean over ``n_aug`` random jitters of the images (a shift
    of up to ``1`` pixel with edge padding, plus Gaussian pixel noise of std ``aug_noise``), an
    expectation over transformations that makes pixel-level adversarial patterns less rewarding
    (see :func:`validate`'s check (iv)). Off by default.

    Args:
        detector: a :class:`ShapeDetector` (default :func:`load_detector`).
        mode: ``"mean"`` or ``"product"``.
        count_width: the width of the count terms (in objects).
        margin, tau: the position sigmoid's offset and temperature, in pixels.
        exact_counts: two-sided count terms (see above).
        n_aug, aug_noise: the jitter average (see above).
    """

    def __init__(self, detector: Optional[ShapeDetector] = None, mode: str = "mean", count_width: float = 0.35,
                 margin: float = 1.0, tau: float = 1.0, exact_counts: bool = False, n_aug: int = 0, aug_noise: float = 0.03):
        if mode not in ("mean", "product"):
            raise ValueError(f"mode must be 'mean' or 'product', got {mode!r}")
        self.detector = detector if detector is not None else load_detector()
        self.mode = mode
        self.count_width = float(count_width)
        self.margin = float(margin)
        self.tau = float(tau)
        self.exact_counts = bool(exact_counts)
        self.n_aug = int(n_aug)
        self.aug_noise = float(aug_noise)
        self._specs: dict[str, Spec] = {}

    def _spec(self, prompt: str | Spec) -> Spec:
        if isinstance(prompt, dict):
            return prompt
        if prompt not in self._specs:
            self._specs[prompt] = parse_prompt(prompt)
        return self._specs[prompt]

    @staticmethod
    def _channels(req: dict[str, Any], use_color: bool = True) -> list[int]:
        color = req.get("color") if use_color else None
        return [pair_index(c, req["shape"]) for c in COLORS if color is None or c == color]

    def _at_least(self, n: torch.Tensor, count: float) -> torch.Tensor:
        return torch.exp(-F.relu(count - n) ** 2 / (2 * self.count_width**2))

    def terms(self, probs: torch.Tensor, centre: torch.Tensor, spec: Spec) -> list[torch.Tensor]:
        """The constraint terms (scalars in [0, 1]) of one image: ``probs [20, 32, 32]`` (softmax of
        ``seg``) and ``centre [18, 32, 32]``."""
        counts = centre.sum((-2, -1))  # [18]
        pair_probs = probs[2:]  # [18, H, W]
        h, w = probs.shape[-2:]
        ys = torch.arange(h, dtype=probs.dtype, device=probs.device).view(h, 1) + 0.5  # pixel centres, like the verifier's boxes
        xs = torch.arange(w, dtype=probs.dtype, device=probs.device).view(1, w) + 0.5
        out: list[torch.Tensor] = []
        cents: list[tuple[torch.Tensor, torch.Tensor]] = []
        for req in spec["include"]:
            count = float(req.get("count", 1))
            ch = self._channels(req)
            n = counts[ch].sum()
            if self.exact_counts:
                if "color" in req:  # other colours of the shape may add to it, as for the verifier: one-sided
                    out.append(self._at_least(counts[self._channels(req, False)].sum(), count))
                out.append(torch.exp(-(n - count) ** 2 / (2 * self.count_width**2)))
            else:
                if "color" in req:
                    out.append(self._at_least(counts[self._channels(req, False)].sum(), count))
                out.append(self._at_least(n, count))
            p = pair_probs[ch].sum(0)  # [H, W]
            mass = p.sum() + 1e-4
            cx = ((p * xs).sum() + 1e-4 * w / 2) / mass
            cy = ((p * ys).sum() + 1e-4 * h / 2) / mass
            cents.append((cx, cy))
            if "position" in req:
                rel, j = req["position"]
                dx, dy = cx - cents[j][0], cy - cents[j][1]
                main, other = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[rel]
                soft_abs = torch.sqrt(other**2 + 0.25)
                out.append(torch.sigmoid((main - self.margin) / self.tau) * torch.sigmoid((math.sqrt(3.0) * main - soft_abs) / self.tau))
        if not self.exact_counts:
            for req in spec.get("exclude", []):
                n = counts[self._channels(req)].sum()
                out.append(torch.exp(-F.relu(n - (float(req.get("count", 1)) - 1.0)) ** 2 / (2 * self.count_width**2)))
        return out

    def __call__(self, images: torch.Tensor, prompts: Sequence[str | Spec]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        if self.n_aug > 0:
            return torch.stack([self._score(self._jitter(images), prompts) for _ in range(self.n_aug)]).mean(0)
        return self._score(images, prompts)

    def _jitter(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,)))
        x = F.pad(images, (1, 1, 1, 1), mode="replicate")[..., 1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w]
        return (x + self.aug_noise * torch.randn_like(x)).clamp(0.0, 1.0)

    def _score(self, images: torch.Tensor, prompts: Sequence[str | Spec]) -> torch.Tensor:
        seg, centre = self.detector(images)
        probs = seg.softmax(1)
        scores = []
        for i, prompt in enumerate(prompts):
            t = self.terms(probs[i], centre[i], self._spec(prompt))
            if not t:
                scores.append(probs.new_ones(()))
            elif self.mode == "mean":
                scores.append(torch.stack(t).mean())
            else:
                scores.append(torch.stack(t).prod())
        return torch.stack(scores)


class SoftShapesProcessReward(Reward):
    """:class:`SoftShapesReward` behind flowalign's reward protocol (``differentiable = True``), so that a
    recipe can name it, e.g. as Euphonium's process reward: ``sampling.drift_reward=soft_shapes:SoftShapesProcessReward``
    (with ``bench/`` on ``sys.path``, as when a bench script runs). Keyword arguments go to :class:`SoftShapesReward`;
    its detector moves with ``to(device)`` (it is the one module attribute)."""

    name = "soft_shapes"
    differentiable = True

    def __init__(self, device=None, **kwargs):
        super().__init__(device)
        self.soft = SoftShapesReward(**kwargs)
        self.detector = self.soft.detector.to(self.device)

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        return RewardOutput(scores=self.soft(images, list(prompts)), details={})


# ----------------------------------------------------------------------------- data


def _u8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, 32, 32]`` in [0, 1] -> ``uint8 [B, 32, 32, 3]`` (rounded, as the cached data)."""
    return np.clip(np.rint(scene_pixels(images)), 0, 255).astype(np.uint8)


def _unit(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0


def load_pipe():
    from flowalign.pipelines.toy import apply_toy_meta, load_toy_pipeline

    pipe = load_toy_pipeline(TOY)
    apply_toy_meta(pipe, TOY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def vae_round_trip(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Through the toy's VAE (posterior mode, as ``bench/vae_roundtrip.py``; the shift/scale factors
    cancel in an encode-decode round trip), back in [0, 1]."""
    out = []
    for chunk in images.split(batch):
        z = vae.encode(chunk * 2.0 - 1.0).latent_dist.mode()
        out.append(((vae.decode(z).sample + 1.0) / 2.0).clamp(0.0, 1.0))
    return torch.cat(out)


def toy_samples(pipe, specs: list[Spec], seed0: int, batch: int = 64, deadline: Optional[float] = None) -> tuple[np.ndarray, list[Spec]]:
    """Samples of the toy (10 steps, guidance 4.5) for ``specs`` in batches with seeds ``seed0 + k``;
    stops early at ``deadline`` (``time.time()``). Returns ``uint8`` images and the specs drawn."""
    from flowalign.pipelines.toy import sample

    imgs, done = [], []
    for k, i in enumerate(range(0, len(specs), batch)):
        if deadline is not None and time.time() > deadline:
            logger.info("toy sampling stopped at the time box after %d samples", len(done))
            break
        chunk = specs[i: i + batch]
        imgs.append(_u8(sample(pipe, [s["prompt"] for s in chunk], seed0 + k, 10, 4.5)))
        done += chunk
    return np.concatenate(imgs), done


def build_data(scratch: Path, n_render: int, n_toy: int, n_eval: int, minutes: float, seed: int = 0) -> dict[str, Any]:
    """Generate (or load from ``scratch``) the cached arrays; returns sizes and timings.

    Sources: ``render`` (ground-truth scenes of random *training* specs; 10% of them cut in two by
    :func:`split_renditions` and 10% watermarked, both defects of the toy world), ``vae`` (those
    scenes through the toy's VAE) and ``toy`` (toy samples for the training prompts, seeds
    ``1000 + k``), labelled by the verifier; plus ``heldout`` (toy samples for the held-out prompts,
    seeds ``50000 + k``, never trained on) and ``gt_val`` (fresh ground-truth scenes for :func:`validate`'s check (ii)).
    """
    scratch.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    t_all = time.time()
    pipe = None
    rng = np.random.default_rng(seed)
    for name in ("render", "vae", "toy"):
        f = scratch / f"{name}_images.npy"
        if f.is_file():
            continue
        t0 = time.time()
        if name == "render":
            specs = sample_specs(rng, n_render, heldout=False, tags=TAGS)
            imgs = np.stack([render_spec(s, rng) for s in specs])
            imgs, _ = split_renditions(imgs, 0.1, 1.5, seed + 7)
            imgs, _ = watermarked_renditions(imgs, 0.1, 0.7, seed + 9)
        elif name == "vae":
            pipe = pipe or load_pipe()
            imgs = _u8(vae_round_trip(pipe.vae, _unit(np.load(scratch / "render_images.npy"))))
        else:
            pipe = pipe or load_pipe()
            train = load_prompts("train")
            order = np.random.default_rng(seed + 1).permutation(max(n_toy, len(train))) % len(train)
            specs = [train[i] for i in order[:n_toy]]
            imgs, _ = toy_samples(pipe, specs, 1000, deadline=t_all + 60 * minutes)
        np.save(f, imgs)
        info[f"{name}_gen_seconds"] = round(time.time() - t0, 1)
        logger.info("%s: %d images in %.0fs", name, len(imgs), time.time() - t0)
    for name in ("render", "vae", "toy"):
        f = scratch / f"{name}_seg.npy"
        if f.is_file():
            continue
        t0 = time.time()
        seg, density, counts, _ = make_labels(np.load(scratch / f"{name}_images.npy"))
        np.save(f, seg.astype(np.uint8))
        np.save(scratch / f"{name}_density.npy", density.astype(np.float16))
        np.save(scratch / f"{name}_counts.npy", counts.astype(np.uint8))
        info[f"{name}_label_seconds"] = round(time.time() - t0, 1)
        logger.info("%s labels in %.0fs", name, time.time() - t0)
    if not (scratch / "heldout_images.npy").is_file():
        t0 = time.time()
        pipe = pipe or load_pipe()
        held = load_prompts("heldout")
        specs = [held[i % len(held)] for i in range(n_eval)]
        imgs, _ = toy_samples(pipe, specs, 50000)
        np.save(scratch / "heldout_images.npy", imgs)
        (scratch / "heldout_prompts.json").write_text(json.dumps([s["prompt"] for s in specs]))
        info["heldout_gen_seconds"] = round(time.time() - t0, 1)
    if not (scratch / "gt_val_images.npy").is_file():
        r2 = np.random.default_rng(seed + 12345)
        specs = sample_specs(r2, 500, heldout=False, tags=TAGS)
        wrong = sample_specs(r2, 500, heldout=False, tags=TAGS)
        np.save(scratch / "gt_val_images.npy", np.stack([render_spec(s, r2) for s in specs]))
        (scratch / "gt_val_specs.json").write_text(json.dumps({"spec": specs, "wrong": wrong}))
    info["data_seconds"] = round(time.time() - t_all, 1)
    return info


def load_source(scratch: Path, name: str, val_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """One cached source split into train / val (the last ``val_fraction``)."""
    imgs = np.load(scratch / f"{name}_images.npy")
    seg = np.load(scratch / f"{name}_seg.npy")
    density = np.load(scratch / f"{name}_density.npy")
    counts = np.load(scratch / f"{name}_counts.npy")
    n_val = int(round(len(imgs) * val_fraction))
    cut = len(imgs) - n_val
    return {"train": (imgs[:cut], seg[:cut], density[:cut], counts[:cut]), "val": (imgs[cut:], seg[cut:], density[cut:], counts[cut:])}


# ----------------------------------------------------------------------------- training


def train_detector(scratch: Path, width: int, seconds: float, batch: int = 64, lr: float = 3e-3, seed: int = 0,
                   centre_weight: float = 1.0) -> tuple[ShapeDetector, dict[str, Any]]:
    """Cross-entropy on ``seg`` + ``centre_weight`` x (MSE of the density map against ``1 / area``,
    scaled by 30^2 so that it is O(1), + MSE of the 18 soft counts ``centre.sum``) for ``seconds`` of wall time (cosine learning rate over the time box), random horizontal
    flips (the verifier's rules are left-right symmetric). Sources are drawn uniformly per batch."""
    torch.manual_seed(seed)
    data = {name: load_source(scratch, name)["train"] for name in ("render", "vae", "toy")}
    xs = np.concatenate([d[0] for d in data.values()])
    segs = np.concatenate([d[1] for d in data.values()])
    dens = np.concatenate([d[2] for d in data.values()])
    cnts = np.concatenate([d[3] for d in data.values()])
    src = np.concatenate([np.full(len(d[0]), k) for k, d in enumerate(data.values())])
    weights = np.array([1.0 / (src == k).sum() for k in src])
    weights /= weights.sum()
    X = torch.from_numpy(xs).permute(0, 3, 1, 2).contiguous()
    S = torch.from_numpy(segs.astype(np.int64))
    D = torch.from_numpy(dens.astype(np.float32))
    N = torch.from_numpy(cnts.astype(np.float32))
    model = ShapeDetector(width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    t0, step, log = time.time(), 0, []
    model.train()
    while True:
        frac = (time.time() - t0) / seconds
        if frac >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr * (min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.from_numpy(rng.choice(len(X), batch, p=weights))
        x, s, d, n = X[idx].float() / 255.0, S[idx], D[idx], N[idx]
        flip = torch.rand(batch) < 0.5
        x[flip], s[flip], d[flip] = x[flip].flip(-1), s[flip].flip(-1), d[flip].flip(-1)
        seg, density = model.heads(x)
        centre = seg.softmax(1)[:, 2:] * density
        ce = F.cross_entropy(seg, s)
        mse = F.mse_loss(density[:, 0], d) * 900.0
        cnt = F.mse_loss(centre.sum((-2, -1)), n)
        loss = ce + centre_weight * (mse + cnt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            log.append({"step": step, "seconds": round(time.time() - t0, 1), "ce": round(ce.item(), 4), "density_mse_x900": round(mse.item(), 4), "count_mse": round(cnt.item(), 4)})
            logger.info("step %d %.0fs ce %.4f density %.4f count %.4f", step, time.time() - t0, ce.item(), mse.item(), cnt.item())
    model.eval()
    model.requires_grad_(False)
    return model, {"steps": step, "train_seconds": round(time.time() - t0, 1), "train_images": int(len(X)),
                   "train_per_source": {k: int(len(d[0])) for k, d in data.items()}, "log": log[-5:]}


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def predict(model: ShapeDetector, images_u8: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``argmax`` class maps ``[N, 32, 32]`` and soft counts ``[N, 18]``."""
    segs, counts = [], []
    for i in range(0, len(images_u8), batch):
        seg, centre = model(_unit(images_u8[i: i + batch]))
        segs.append(seg.argmax(1).numpy())
        counts.append(centre.sum((-2, -1)).numpy())
    return np.concatenate(segs), np.concatenate(counts)


def detector_metrics(model: ShapeDetector, images: np.ndarray, seg: np.ndarray, density: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Pixel accuracy (all pixels, and foreground pixels only), count MAE per (image, pair) over all
    18 pairs and over the pairs present, and the fraction of images whose rounded counts all match."""
    pred, counts = predict(model, images)
    true = true.astype(np.float32)
    fg = seg != BG
    present = true > 0.5
    return {"n": int(len(images)), "pixel_acc": float((pred == seg).mean()), "fg_pixel_acc": float((pred == seg)[fg].mean()),
            "count_mae": float(np.abs(counts - true).mean()), "count_mae_present_pairs": float(np.abs(counts - true)[present].mean()),
            "exact_count_images": float((np.rint(counts) == np.rint(true)).all(1).mean())}


def verifier_scores(images_u8: np.ndarray, specs: list[Spec]) -> tuple[np.ndarray, np.ndarray]:
    """The verifier's 1/0 verdict and partial score on ``uint8`` images (its own ``detect`` + ``evaluate``)."""
    v, p = [], []
    for img, spec in zip(images_u8, specs):
        ok, frac = evaluate(detect(img.astype(np.float32)), spec)
        v.append(float(ok))
        p.append(frac)
    return np.array(v), np.array(p)


def soft_scores(reward: SoftShapesReward, images_u8: np.ndarray, prompts: list, batch: int = 128) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(images_u8), batch):
            out.append(reward(_unit(images_u8[i: i + batch]), prompts[i: i + batch]).numpy())
    return np.concatenate(out)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged)."""
    from scipy.stats import rankdata

    pos, neg = labels > 0.5, labels <= 0.5
    if pos.sum() == 0 or neg.sum() == 0:
        return float("nan")
    r = rankdata(scores)
    return float((r[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * neg.sum()))


def gradient_ascent(model: ShapeDetector, images_u8: np.ndarray, prompts: list[str], steps: int = 20, lr: float = 0.01) -> dict[str, Any]:
    """Pixel-space Adam ascent on the soft reward (both modes, separately), pixels clamped to [0, 1];
    reports the soft reward and the verifier's verdict / partial score before and after, and how far
    the pixels moved."""
    specs = [parse_prompt(p) for p in prompts]
    x0 = _unit(images_u8)
    v0, p0 = verifier_scores(images_u8, specs)
    out: dict[str, Any] = {"n": len(prompts), "steps": steps, "lr": lr, "verifier_acc_before": float(v0.mean()), "verifier_partial_before": float(p0.mean())}
    torch.manual_seed(0)
    for mode, kw in (("mean", {}), ("product", {}), ("mean_aug4", {"n_aug": 4})):
        reward = SoftShapesReward(model, mode=mode.split("_")[0], **kw)
        plain = SoftShapesReward(model, mode=mode.split("_")[0])
        x = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        with torch.no_grad():
            r0 = reward(x, prompts)
        for _ in range(steps):
            loss = -reward(x, prompts).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
        with torch.no_grad():
            r1 = reward(x, prompts)
        x1 = x.detach()
        u1 = _u8(x1)
        v1, p1 = verifier_scores(u1, specs)
        delta = (x1 - x0).abs()
        out[mode] = {"soft_before": float(r0.mean()), "soft_after": float(r1.mean()),
                     "soft_after_requantized_no_aug": float(soft_scores(plain, u1, prompts).mean()),
                     "verifier_acc_after": float(v1.mean()), "verifier_partial_after": float(p1.mean()),
                     "verdict_flips_0to1": int(((v0 == 0) & (v1 == 1)).sum()), "verdict_flips_1to0": int(((v0 == 1) & (v1 == 0)).sum()),
                     "mean_abs_delta_pixel": float(delta.mean()), "max_abs_delta_pixel": float(delta.max()),
                     "mean_abs_delta_pixel_x255": float(delta.mean() * 255)}
        out[mode + "_images"] = u1
    return out


def validate(model: ShapeDetector, scratch: Path, out_dir: Path) -> dict[str, Any]:
    """The four checks written to ``summary.json``; returns them as a dict.

    (i) the detector's pixel accuracy and count error on held-back data of each source; (ii) the mean
    reward of fresh ground-truth scenes under their own prompt and under another scene's; (iii) on toy
    samples for the held-out prompts (scored only): ROC AUC against the verifier's verdict, Pearson
    correlations, per-category AUC; (iv) 20 steps of Adam on 16 such samples' pixels: how far the
    surrogate and the verifier move (can the reward be gamed?)."""
    res: dict[str, Any] = {}
    t0 = time.time()
    res["detector_val"] = {name: detector_metrics(model, *load_source(scratch, name)["val"]) for name in ("render", "vae", "toy")}
    logger.info("(i) detector on held-out data: %s", json.dumps(res["detector_val"]))

    gt = np.load(scratch / "gt_val_images.npy")
    gts = json.loads((scratch / "gt_val_specs.json").read_text())
    gt_res = {}
    for mode in ("mean", "product"):
        reward = SoftShapesReward(model, mode=mode)
        own = soft_scores(reward, gt, gts["spec"])
        wrong = soft_scores(reward, gt, gts["wrong"])
        gt_res[mode] = {"own_spec": float(own.mean()), "wrong_spec": float(wrong.mean()), "own_gt_wrong_pairwise": float((own > wrong).mean())}
    v_own, _ = verifier_scores(gt, gts["spec"])
    v_wrong, _ = verifier_scores(gt, gts["wrong"])
    gt_res["verifier_own_spec_acc"], gt_res["verifier_wrong_spec_acc"] = float(v_own.mean()), float(v_wrong.mean())
    res["gt_scenes"] = {"n": int(len(gt)), **gt_res}
    logger.info("(ii) GT scenes, own vs wrong spec: %s", json.dumps(res["gt_scenes"]))

    held = np.load(scratch / "heldout_images.npy")
    prompts = json.loads((scratch / "heldout_prompts.json").read_text())[: len(held)]
    hseg, hdens, hcounts, _ = make_labels(held)  # scoring only: the held-out samples are never trained on
    res["detector_val"]["heldout_toy_scoring_only"] = detector_metrics(model, held, hseg, hdens, hcounts)
    logger.info("(i) detector on held-out-prompt toy samples: %s", json.dumps(res["detector_val"]["heldout_toy_scoring_only"]))
    specs = [parse_prompt(p) for p in prompts]
    verdict, partial = verifier_scores(held, specs)
    tags = np.array([s["tag"] for s in specs])
    h: dict[str, Any] = {"n": int(len(held)), "verifier_acc": float(verdict.mean()), "verifier_partial_mean": float(partial.mean())}
    for mode in ("mean", "product"):
        s = soft_scores(SoftShapesReward(model, mode=mode), held, prompts)
        h[mode] = {"auc_vs_verdict": roc_auc(s, verdict), "pearson_vs_partial": float(np.corrcoef(s, partial)[0, 1]),
                   "pearson_vs_verdict": float(np.corrcoef(s, verdict)[0, 1]), "mean": float(s.mean()),
                   "mean_when_pass": float(s[verdict == 1].mean()), "mean_when_fail": float(s[verdict == 0].mean()),
                   "acc_at_0.5": float(((s >= 0.5) == (verdict == 1)).mean()),
                   "auc_per_tag": {t: roc_auc(s[tags == t], verdict[tags == t]) for t in sorted(set(tags))}}
    h["verifier_acc_per_tag"] = {t: float(verdict[tags == t].mean()) for t in sorted(set(tags))}
    res["heldout_toy"] = h
    logger.info("(iii) held-out toy samples: %s", json.dumps(h))

    ga = gradient_ascent(model, held[:16], prompts[:16])
    imgs = {k: ga.pop(k) for k in ("mean_images", "product_images", "mean_aug4_images")}
    res["pixel_ascent"] = ga
    logger.info("(iv) pixel ascent: %s", json.dumps(ga))
    try:
        from flowalign.pipelines.toy import save_grid

        save_grid(torch.cat([_unit(held[:16]), _unit(imgs["mean_images"]), _unit(imgs["product_images"]), _unit(imgs["mean_aug4_images"])]), out_dir / "pixel_ascent.png")
    except Exception as exc:  # a figure is a convenience
        logger.warning("no pixel_ascent.png: %s", exc)
    res["validate_seconds"] = round(time.time() - t0, 1)
    return res


# ----------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--build", action="store_true", help="generate the data (cached in --scratch), train, validate")
    g.add_argument("--validate", action="store_true", help="validate the saved detector only")
    ap.add_argument("--scratch", type=Path, default=SCRATCH)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--n-render", type=int, default=6000)
    ap.add_argument("--n-toy", type=int, default=5120)
    ap.add_argument("--n-eval", type=int, default=1024)
    ap.add_argument("--data-minutes", type=float, default=10.0, help="time box of the data generation")
    ap.add_argument("--train-seconds", type=float, default=420.0)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    summary_file = args.out / "summary.json"
    summary: dict[str, Any] = json.loads(summary_file.read_text()) if summary_file.is_file() and args.validate else {}
    if args.build:
        summary["data"] = build_data(args.scratch, args.n_render, args.n_toy, args.n_eval, args.data_minutes)
        summary["data"]["sizes"] = {n: int(len(np.load(args.scratch / f"{n}_images.npy", mmap_mode="r")))
                                    for n in ("render", "vae", "toy", "heldout", "gt_val")}
        model, info = train_detector(args.scratch, args.width, args.train_seconds)
        info["params"] = n_params(model)
        summary["train"] = info
        save_detector(model, args.out / "detector.safetensors", {"train_steps": info["steps"]})
    model = load_detector(args.out / "detector.safetensors")
    summary["validation"] = validate(model, args.scratch, args.out)
    summary_file.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s", summary_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

