"""The corrected score: a target reward discounted by an independent quality signal.

GDRO (arXiv 2601.02036, §5) evaluates alignment with a *corrected score* so that reward hacking
(a higher target reward bought with degraded images) shows up in the number: the target reward
``r`` is combined with a second, independent quality signal ``q`` as

    corrected = r · (q - q0) + c

(:func:`corrected_score`; ``q0`` and ``c`` are configurable constants: with ``q0 = 0``, ``c = 0``
it is the reward weighted by quality; ``q0`` set to the base model's mean quality makes the
score fall below zero when quality drops below the base model's).

For the toy world (32x32 flat-colour shape scenes, ``rewards/shapes_scenes.py``) the quality
signal is :class:`ImageStatsQuality`: how far an image's low-level statistics (dominant-colour
fraction, saturation, edge and Laplacian energy, colour-histogram entropy, luma mean/std,
clipped pixels) drift from a reference set (base-model samples, or clean renders by default).
Degenerate outputs that a verifier may still score (flat colour, noise, over-saturation) land
far outside the reference and get ``q ≈ 0``; normal renders stay near ``q = 1``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from flowalign.rewards.base import Reward, RewardOutput, register_reward

__all__ = [
    "corrected_score", "image_statistics", "FEATURES", "ImageStatsQuality", "CorrectedScore", "QualityTap",
    "CategoryCorrected", "corrected_summary", "corrected_table", "LOW_QUALITY",
]

LOW_QUALITY = 0.5  # a sample with q below this is flagged as degraded in the tables

FEATURES = (
    "log_non_dominant",  # log(1e-3 + share of pixels outside the most common quantised colour)
    "saturation",  # mean (max - min) / max over RGB
    "log_edge_energy",  # log(1e-3 + mean |∂x luma| + |∂y luma|)
    "log_laplacian_energy",  # log(1e-3 + mean |Δ luma|)  (high frequencies: noise)
    "hist_entropy",  # entropy (nats) of the 4x4x4 colour histogram
    "luma_mean",
    "luma_std",
    "log_clipped",  # log(0.05 + share of pixels with a channel <= 1/255 or >= 254/255)
)


def corrected_score(reward: Tensor, quality: Tensor, q0: float = 0.0, c: float = 0.0) -> Tensor:
    """GDRO's corrected score ``r · (q - q0) + c`` (arXiv 2601.02036, §5), elementwise ``[B]``."""
    return reward * (quality - q0) + c


def image_statistics(images: Tensor, bins: int = 4) -> Tensor:
    """Low-level statistics of images ``[B, 3, H, W]`` in [0, 1] -> ``[B, len(FEATURES)]`` fp32; of videos
    ``[B, F, 3, H, W]``, each frame's statistics averaged over the frames."""
    if images.dim() == 5 and images.shape[2] == 3:
        B, F = images.shape[:2]
        return image_statistics(images.reshape(B * F, *images.shape[2:]), bins).reshape(B, F, -1).mean(dim=1)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] (or videos [B, F, 3, H, W]), got {tuple(images.shape)}")
    x = images.float().clamp(0, 1)
    B = x.shape[0]
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # [B, H, W]
    cmax, cmin = x.max(dim=1).values, x.min(dim=1).values
    saturation = ((cmax - cmin) / cmax.clamp_min(1e-3)).flatten(1).mean(1)
    gx, gy = luma[:, :, 1:] - luma[:, :, :-1], luma[:, 1:, :] - luma[:, :-1, :]
    edge = gx.abs().flatten(1).mean(1) + gy.abs().flatten(1).mean(1)
    lap = 4 * luma[:, 1:-1, 1:-1] - luma[:, :-2, 1:-1] - luma[:, 2:, 1:-1] - luma[:, 1:-1, :-2] - luma[:, 1:-1, 2:]
    q = (x * bins).long().clamp(max=bins - 1)  # [B, 3, H, W] quantised colour
    codes = (q[:, 0] * bins * bins + q[:, 1] * bins + q[:, 2]).flatten(1)  # [B, H*W]
    hist = torch.zeros(B, bins**3, device=x.device).scatter_add_(1, codes, torch.ones_like(codes, dtype=torch.float32))
    p = hist / codes.shape[1]
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1)
    dominant = p.max(dim=1).values
    clipped = ((x <= 1 / 255) | (x >= 254 / 255)).any(dim=1).flatten(1).float().mean(1)
    # energies and small shares in log space: "exactly flat" or "no clipping" are far from "a little"
    feats = [
        (1e-3 + 1 - dominant).log(), saturation, (1e-3 + edge).log(), (1e-3 + lap.abs().flatten(1).mean(1)).log(),
        entropy, luma.flatten(1).mean(1), luma.flatten(1).std(1), (0.05 + clipped).log(),
    ]
    return torch.stack(feats, dim=1)


@register_reward("image_stats_quality")
class ImageStatsQuality(Reward):
    """Quality ``q ∈ (0, 1]``: closeness of an image's statistics to a reference set.

    With per-feature robust z-scores ``z_f = (f - median_f) / (1.4826·MAD_f + floor_f)`` over the
    reference, ``d² = mean_f max(0, |z_f| - tolerance)²`` and ``q = exp(-d² / 2)``: images inside
    the reference's spread (``|z| <= tolerance``) get ``q = 1``.

    Args:
        reference: images ``[N, 3, H, W]`` in [0, 1] to fit on, a JSON file written by
            :meth:`save`, or None for 512 clean toy renders (``shapes_scenes.training_scenes``).
        tolerance: z-score band treated as normal.
    """

    name = "image_stats_quality"

    def __init__(self, reference: Union[Tensor, str, Path, None] = None, tolerance: float = 3.0, device=None):
        super().__init__(device)
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.tolerance = tolerance
        if isinstance(reference, (str, Path)):
            data = json.loads(Path(reference).read_text(encoding="utf-8"))
            if data.get("features") != list(FEATURES):
                raise ValueError(f"{reference}: reference statistics for features {data.get('features')}, expected {list(FEATURES)}")
            self.center, self.scale = torch.tensor(data["center"]), torch.tensor(data["scale"])
        else:
            self.fit(reference if reference is not None else self.toy_reference())

    @staticmethod
    def toy_reference(n: int = 512, seed: int = 12345) -> Tensor:
        """``n`` clean renders of training scenes, ``[n, 3, 32, 32]`` in [0, 1]."""
        from flowalign.rewards.shapes_scenes import training_scenes

        images, _ = training_scenes(seed, n)
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0

    def fit(self, images: Tensor) -> "ImageStatsQuality":
        """Set the reference median and robust scale from images ``[N, 3, H, W]``."""
        if images.shape[0] < 8:
            raise ValueError(f"need at least 8 reference images, got {images.shape[0]}")
        f = image_statistics(images)  # [N, F]
        self.center = f.median(dim=0).values
        mad = (f - self.center).abs().median(dim=0).values
        floor = 0.05 * self.center.abs() + 0.01  # a constant feature must not give infinite z
        self.scale = 1.4826 * mad + floor
        return self

    def save(self, path: Union[str, Path]) -> Path:
        """Write the fitted feature centres and scales as JSON (``path`` is returned)."""
        path = Path(path)
        path.write_text(json.dumps({"features": list(FEATURES), "center": self.center.tolist(), "scale": self.scale.tolist()}, indent=2), encoding="utf-8")
        return path

    def zscores(self, images: Tensor) -> Tensor:
        """``[B, F]`` robust z-scores of the images' statistics."""
        f = image_statistics(images)  # on the images' device; the fitted statistics follow them there
        return (f - self.center.to(f.device)) / self.scale.to(f.device)

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        z = self.zscores(images)
        excess = (z.abs() - self.tolerance).clamp_min(0)  # [B, F]
        d2 = excess.pow(2).mean(dim=1)
        q = torch.exp(-0.5 * d2)
        worst = excess.argmax(dim=1)
        return RewardOutput(scores=q, details={"zscores": z, "worst_feature": [FEATURES[i] if excess[b, i] > 0 else None for b, i in enumerate(worst.tolist())]})


class CorrectedScore(Reward):
    """``r · (q - q0) + c`` for a target reward ``r`` and a quality reward ``q`` (both Rewards)."""

    name = "corrected"

    def __init__(self, reward: Reward, quality: Optional[Reward] = None, q0: float = 0.0, c: float = 0.0, device=None):
        super().__init__(device)
        self.reward = reward
        self.quality = quality if quality is not None else ImageStatsQuality()
        self.q0, self.c = q0, c

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        r = self.reward(images, prompts, metadata).scores.float().cpu()
        q = self.quality(images, prompts, metadata).scores.float().cpu()
        return RewardOutput(scores=corrected_score(r, q, self.q0, self.c), details={"reward": r, "quality": q})


class QualityTap(Reward):
    """The target reward's output unchanged, with the quality of every scored image recorded.

    ``flowalign eval --corrected-by`` evaluates with this in place of the target reward, so
    accuracy and categories stay the target's while ``details["quality"]`` gives ``q`` of every
    sample (``evaluate(extra_details=("quality",))`` keeps it per sample, across processes and a
    resumed evaluation); ``qualities`` also collects it in call order (one call per batch). The target is called through ``call_reward``
    with ``on_error``: under ``"drop"`` a failing sample gets a NaN score here (and is then
    dropped by the evaluation) but still its quality, so ``qualities`` stays aligned with the
    samples; under ``"raise"`` the ``RewardError`` propagates.
    """

    def __init__(self, reward: Reward, quality: Reward, on_error: str = "raise"):
        from flowalign.rewards.base import reward_name

        super().__init__(getattr(reward, "device", None))
        self.reward, self.quality, self.on_error = reward, quality, on_error
        self.name = reward_name(reward)
        self.version = getattr(reward, "version", None)  # the target's scoring rules, as evaluations record them
        self.qualities: list[Tensor] = []

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        from flowalign.rewards import call_reward

        out = call_reward(self.reward, images, prompts, metadata, on_error=self.on_error)
        q = call_reward(self.quality, images, prompts, metadata, on_error="raise").scores.detach().float().cpu()  # [B]
        self.qualities.append(q)
        return RewardOutput(scores=out.scores, details={**out.details, "quality": q})


@dataclass
class CategoryCorrected:
    """Target reward, quality and corrected score of one category (``"all"``: every sample).

    Means skip dropped samples (NaN reward); ``low_quality`` counts samples with ``q < 0.5``;
    ``corrected_low``/``corrected_high`` is the 95% normal interval of the mean corrected score.
    """

    name: str
    count: int
    mean_reward: float
    mean_quality: float
    low_quality: int
    mean_corrected: float
    corrected_low: float
    corrected_high: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields (NaN and inf as null)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


def corrected_summary(tags: Sequence[str], reward: Tensor, quality: Tensor, q0: float = 0.0, c: float = 0.0) -> dict[str, CategoryCorrected]:
    """Per-category means of ``r``, ``q`` and ``r · (q - q0) + c`` (sorted categories, then ``"all"``).

    ``reward`` and ``quality`` are ``[N]`` per-sample values aligned with ``tags``; samples with a
    NaN reward (dropped) are left out of every mean and count.
    """
    from flowalign.evaluation import mean_interval

    r, q = reward.detach().double().cpu().flatten(), quality.detach().double().cpu().flatten()  # [N], [N]
    if not (len(tags) == r.numel() == q.numel()):
        raise ValueError(f"{len(tags)} tags, {r.numel()} rewards and {q.numel()} qualities: they must match")
    combined = corrected_score(r, q, q0, c)  # [N]
    rows: dict[str, list[int]] = {}
    for i, tag in enumerate(tags):
        rows.setdefault(str(tag), []).append(i)
    rows = {name: rows[name] for name in sorted(rows)}
    rows["all"] = list(range(len(tags)))
    out = {}
    for name, index in rows.items():
        idx = torch.tensor(index, dtype=torch.long)
        kept = idx[~torch.isnan(r[idx])]
        n = int(kept.numel())
        mean, low, high = mean_interval(combined[kept])
        out[name] = CategoryCorrected(
            name=name, count=n, mean_reward=float(r[kept].mean()) if n else math.nan,
            mean_quality=float(q[kept].mean()) if n else math.nan, low_quality=int((q[kept] < LOW_QUALITY).sum()),
            mean_corrected=mean, corrected_low=low, corrected_high=high,
        )
    return out


def corrected_table(summary: dict[str, CategoryCorrected], reward: str = "r", quality: str = "q", q0: float = 0.0, c: float = 0.0) -> str:
    """Markdown table of :func:`corrected_summary`: reward, quality, flagged samples, corrected score."""

    def num(v: float) -> str:
        return "–" if not math.isfinite(v) else f"{v:.3f}"

    lines = [
        f"**corrected score** = {reward} · ({quality} − {q0:g}) + {c:g}  (low q: {quality} < {LOW_QUALITY})",
        "",
        f"| category | n | mean {reward} | mean {quality} | low q | corrected | 95% CI |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for stats in summary.values():
        name = f"**{stats.name}**" if stats.name == "all" else stats.name
        ci = "–" if not (math.isfinite(stats.corrected_low) and math.isfinite(stats.corrected_high)) else f"[{stats.corrected_low:.3f}, {stats.corrected_high:.3f}]"
        lines.append(f"| {name} | {stats.count} | {num(stats.mean_reward)} | {num(stats.mean_quality)} | {stats.low_quality} | "
                     f"{num(stats.mean_corrected)} | {ci} |")
    return "\n".join(lines)
