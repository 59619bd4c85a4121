"""Reward plugins used by probes (``--set 'rewards=[{name: "probe_rewards:ShapeFit", ...}]'`` with
``bench/`` on ``PYTHONPATH``): loaded by dotted path like any user reward.

``ShapeFit`` is the ``shapes`` verifier plus a continuous shape-fit term aimed at its main failure
on the toy (shapeless or rounded-square blobs where a circle is asked for): for each requested
object, the best candidates of its colour are scored by how close their soft fill, asymmetry and
aspect are to the ideal shape's (measured on rendered scenes), times their cleanliness. The score is

    0.5 * binary + 0.5 * ((1 - w) * partial + w * fit)

so ``score >= 0.5`` stays exactly the binary verdict (a failed sample has ``partial < 1``) and
held-out accuracy is measured as with ``shapes``. Probes ``te_shapefit_seed0`` / ``_seed1`` in
``results/heldout_curve.json``.
"""
from __future__ import annotations

import numpy as np
import torch

from flowalign.rewards.base import RewardOutput
from flowalign.rewards.shapes import ShapesReward, detect, scene_pixels, scene_spec

# (soft fill, asymmetry) of each shape on rendered scenes (means over 300 training scenes)
TARGET = {"circle": (0.79, 0.0), "square": (1.0, 0.0), "triangle": (0.58, 0.43)}


def shape_fit(obj: dict, shape: str) -> float:
    """How much a detected object looks like ``shape``, in [0, 1]."""
    fill, asym = TARGET[shape]
    return float(np.exp(-((obj["soft_fill"] - fill) / 0.08) ** 2) * np.exp(-((obj["asym"] - asym) / 0.12) ** 2)
                 * np.exp(-(np.log(max(obj["aspect"], 1e-3)) / 0.3) ** 2) * obj["clean"])


class ShapeFit(ShapesReward):
    """``shapes`` with a shape-fit term of weight ``fit_weight`` in its dense half (see the module docstring)."""

    def __init__(self, fit_weight: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.fit_weight = float(fit_weight)

    def score(self, images, prompts, metadata):
        out = super().score(images, prompts, metadata)
        arr = scene_pixels(images)
        fits = []
        for i, prompt in enumerate(prompts):
            spec = scene_spec(prompt, metadata[i] if i < len(metadata) else None)
            objects = detect(arr[i], self.min_area)  # again: the parent keeps only a few fields of each object
            per_request = []
            for req in spec["include"]:
                count = int(req.get("count", 1))
                candidates = [o for o in objects if "color" not in req or o["color"] == req["color"]]
                best = sorted((shape_fit(o, req["shape"]) for o in candidates), reverse=True)[:count]
                per_request.append(sum(best) / count)
            fits.append(float(np.mean(per_request)) if per_request else 0.0)
        fit = torch.tensor(fits, dtype=torch.float32, device=out.scores.device)
        dense = (1 - self.fit_weight) * out.details["partial"] + self.fit_weight * fit
        return RewardOutput(scores=0.5 * out.details["binary"] + 0.5 * dense, details=dict(out.details, fit=fit))
