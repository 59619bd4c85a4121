"""Held-out evaluation: noise-free samples with fixed per-sample seeds, scored per category.

    result = evaluate(adapter, load_prompts("assets/prompts/shapes_heldout.jsonl"), load_reward("shapes"),
                      num_samples=640, num_steps=40, guidance_scale=4.5, seed=0)
    print(result.table())                      # per ShapesEval category (metadata["tag"]) and "all"
    print(compare(base, aligned).table())      # base vs aligned, with deltas and 95% CIs

Sample ``i`` (``i = 0 .. N-1``) is drawn for record ``(i // samples_per_prompt) % P`` from the
initial noise ``adapter.initial_noise(1, torch.Generator().manual_seed(seed + i))`` and
integrated with the Euler ODE (:func:`flowalign.sampling.sample_ode`). Its noise therefore
depends on ``seed`` and ``i`` only, never on the batch size or on the weights, so a base and an
aligned evaluation with the same settings compare the two models on identical noise (checked
by :func:`compare` through per-sample noise fingerprints).

The binary outcome of a sample is the reward's own verdict ``details["binary"]`` when it gives one
(a verifier such as ``shapes`` does, whatever score it was configured to train on: ``partial`` or
``mix``), else ``score >= threshold``; accuracy is its mean, with a Wilson score interval.
``details["partial"]`` (a graded score in [0, 1]) is averaged when the reward provides it.
``details["failure"]`` (one label per sample naming why it fails, ``"correct"`` when it does not,
e.g. the ``shapes`` verifier's ``empty`` / ``malformed`` / ``shape_count`` / ``color`` / ``position``) is kept
per sample; :func:`failure_counts` and :func:`failure_transitions` tabulate it and the run report
shows which failures alignment fixes and which correct samples it breaks.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from flowalign.errors import ConfigError
from flowalign.eval_journal import EvalBatch, EvalJournal
from flowalign.prompts import split_records

logger = logging.getLogger(__name__)

__all__ = [
    "ALL",
    "CategoryStats",
    "Comparison",
    "EvalResult",
    "Z95",
    "aggregate",
    "category_mean",
    "correct_mask",
    "compare",
    "evaluate",
    "failure_counts",
    "failure_transitions",
    "headroom",
    "mean_interval",
    "newcombe_interval",
    "pass_at_k",
    "pick_samples",
    "sample_indices",
    "shard_rows",
    "wilson_interval",
]

Z95 = 1.959963984540054  # standard normal 0.975 quantile
ALL = "all"
UNTAGGED = "untagged"
DROPPED = "dropped"  # the failure label of a sample the reward dropped (failed or non-finite score)


# ----------------------------------------------------------------------------------------------
# Confidence intervals (pure functions)
# ----------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``p = successes / n``.

    ``centre = (p + z²/2n) / (1 + z²/n)``, ``half = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²)``,
    interval ``[centre - half, centre + half]`` (E. B. Wilson, "Probable inference, the law of
    succession, and statistical inference", JASA 22:209-212, 1927; Newcombe 1998, Stat. Med.
    17:857, method 3). Unlike the normal (Wald) interval it stays inside [0, 1] and is not
    degenerate at p = 0 or 1. Returns ``(nan, nan)`` for ``n = 0``.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def newcombe_interval(successes_1: int, n_1: int, successes_2: int, n_2: int, z: float = Z95) -> tuple[float, float]:
    """Interval for the difference of proportions ``d = p1 - p2`` from the two Wilson intervals.

    With ``(l_i, u_i)`` the Wilson interval of ``p_i``:
    ``[d - sqrt((p1 - l1)² + (u2 - p2)²),  d + sqrt((u1 - p1)² + (p2 - l2)²)]``
    (R. G. Newcombe, "Interval estimation for the difference between independent proportions",
    Stat. Med. 17:873-890, 1998, method 10). It treats the samples as independent; for the
    paired base/aligned samples of an evaluation (same prompts and noise) it is conservative.
    """
    if n_1 == 0 or n_2 == 0:
        return (math.nan, math.nan)
    p1, p2 = successes_1 / n_1, successes_2 / n_2
    l1, u1 = wilson_interval(successes_1, n_1, z)
    l2, u2 = wilson_interval(successes_2, n_2, z)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def mean_interval(values: Tensor, z: float = Z95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the normal-approximation interval ``mean ± z · s / sqrt(n)``.

    ``s`` is the sample standard deviation (Bessel-corrected); with ``n < 2`` the interval is
    ``(nan, nan)``, with ``n = 0`` the mean too.
    """
    values = values.detach().double().flatten()  # [n]
    n = values.numel()
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(values.mean())
    if n < 2:
        return (mean, math.nan, math.nan)
    half = z * float(values.std(unbiased=True)) / math.sqrt(n)
    return (mean, mean - half, mean + half)


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclass
class CategoryStats:
    """Aggregates of one category (``"all"`` for every sample).

    Attributes:
        count: scored samples (dropped ones excluded).
        correct: samples with ``score >= threshold``.
        accuracy: ``correct / count``; ``ci_low``/``ci_high`` its 95% Wilson interval.
        mean_score: mean raw score.
        mean_partial, partial_low, partial_high: mean of ``details["partial"]`` and its 95%
            normal interval (NaN when the reward gives no partial score).
        dropped: samples whose reward failed under ``on_error="drop"``.
    """

    name: str
    count: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    mean_score: float
    mean_partial: float = math.nan
    partial_low: float = math.nan
    partial_high: float = math.nan
    dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields (NaN and inf as null)."""
        return {k: _json_number(v) for k, v in self.__dict__.items()}


def correct_mask(scores: Tensor, verdicts: Optional[Tensor], threshold: float = 0.5) -> Tensor:
    """``[N]`` bool: whether each sample counts as correct. Its verdict (the reward's 1/0 ``details["binary"]``)
    is 1, or, without verdicts, its score is ``>= threshold``; a dropped sample (NaN score) never is."""
    kept = ~torch.isnan(scores)
    if verdicts is not None:
        return kept & (verdicts >= 0.5)
    return kept & (scores >= threshold)


def aggregate(tags: Sequence[str], scores: Tensor, partial: Optional[Tensor], threshold: float = 0.5, z: float = Z95,
              verdicts: Optional[Tensor] = None) -> dict[str, CategoryStats]:
    """Per-category :class:`CategoryStats` of ``[N]`` scores (NaN = dropped), sorted, then ``"all"``.

    A sample is correct when its ``verdicts`` entry (the reward's 1/0 ``details["binary"]``) is 1, or,
    without verdicts, when its score is ``>= threshold``."""
    scores = scores.detach().double().cpu()  # [N]
    verdicts = None if verdicts is None else verdicts.detach().double().cpu()  # [N]
    if verdicts is not None and verdicts.shape != scores.shape:
        raise ValueError(f"{verdicts.numel()} verdicts for {scores.numel()} scores")
    partial = None if partial is None else partial.detach().double().cpu()  # [N]
    if len(tags) != scores.numel():
        raise ValueError(f"{len(tags)} tags for {scores.numel()} scores")
    check_tags(tags)
    is_correct = correct_mask(scores, verdicts, threshold)  # [N]
    groups: dict[str, list[int]] = {}
    for i, tag in enumerate(tags):
        groups.setdefault(tag, []).append(i)
    groups = {name: groups[name] for name in sorted(groups)}
    groups[ALL] = list(range(len(tags)))
    out = {}
    for name, rows in groups.items():
        index = torch.tensor(rows, dtype=torch.long)
        s = scores[index]
        kept = ~torch.isnan(s)
        s = s[kept]
        correct = int(is_correct[index].sum())
        count = int(s.numel())
        low, high = wilson_interval(correct, count, z)
        stats = CategoryStats(
            name=name, count=count, correct=correct, accuracy=correct / count if count else math.nan,
            ci_low=low, ci_high=high, mean_score=float(s.mean()) if count else math.nan, dropped=int((~kept).sum()),
        )
        if partial is not None:
            judged = partial[index][kept]
            judged = judged[~torch.isnan(judged)]  # a sample the reward could not judge has no partial: left out, not NaN for all
            stats.mean_partial, stats.partial_low, stats.partial_high = mean_interval(judged, z)
        out[name] = stats
    return out


def check_tags(tags: Sequence[Any]) -> None:
    """ValueError when a sample's category is named ``"all"``: that name is the overall row's."""
    if ALL in tags:
        raise ValueError(f"a prompt's category (tag) is {ALL!r}, the name of the overall row: rename that tag")


def category_mean(categories: Mapping[str, CategoryStats], names: Optional[Sequence[str]] = None) -> float:
    """Mean accuracy over the categories, each weighted equally (``"all"`` left out).

    GenEval's overall score is this mean over its tasks; the ``"all"`` row weights categories
    by their sample counts instead, and the two differ when a prompt set is sampled unevenly
    (e.g. 512 samples, one per line, of a file with 64 lines per category). Categories with no
    scored sample are skipped; NaN when none is left. ``names`` limits the mean to those categories
    (two evaluations compared over the categories both scored: :func:`common_categories`).
    """
    values = [c.accuracy for name, c in categories.items() if name != ALL and c.count > 0 and (names is None or name in names)]
    return sum(values) / len(values) if values else math.nan


def common_categories(*results: Mapping[str, CategoryStats]) -> list[str]:
    """The categories (``"all"`` aside) with a scored sample in every one of ``results``' category tables."""
    names = [name for name in results[0] if name != ALL]
    return [name for name in names if all(name in r and r[name].count > 0 for r in results)]


@dataclass
class EvalResult:
    """One evaluation: per-sample outcomes, per-category aggregates and the settings used.

    Attributes:
        prompts, tags, seeds, record_index: per sample ``i`` (``N`` entries each).
        scores: ``[N]`` float32 raw scores (NaN where dropped).
        partial: ``[N]`` float32 ``details["partial"]`` or None.
        verdicts: ``[N]`` float32 1/0 ``details["binary"]`` (the reward's own verdict, which the
            accuracy counts), or None when the reward gives none (then ``score >= threshold``).
        noise_fingerprints: ``[N]`` float64 sums of each sample's initial noise (a cheap check
            that two evaluations drew identical noise).
        categories: ``{tag: CategoryStats}`` plus ``"all"``.
        settings: how the samples were drawn (steps, guidance, seed, model, LoRA, ...).
        images: ``{sample index: [3, H, W] float image in [0, 1]}`` for the kept subset.
        wall_time: seconds spent sampling and scoring.
        failures: ``N`` labels from the reward's ``details["failure"]`` (why each sample fails,
            ``"correct"`` when it does not), or None when the reward gives none.
        extra: ``{name: [N] float32}`` of the reward details ``evaluate(extra_details=...)`` kept.
    """

    prompts: list[str]
    tags: list[str]
    seeds: list[int]
    record_index: list[int]
    scores: Tensor
    partial: Optional[Tensor]
    noise_fingerprints: Tensor
    categories: dict[str, CategoryStats]
    settings: dict[str, Any] = field(default_factory=dict)
    images: dict[int, Tensor] = field(default_factory=dict)
    wall_time: float = 0.0
    failures: Optional[list[str]] = None
    verdicts: Optional[Tensor] = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Samples evaluated."""
        return len(self.prompts)

    @property
    def accuracy(self) -> float:
        """Overall accuracy (the ``"all"`` category)."""
        return self.categories[ALL].accuracy

    def correct(self) -> Tensor:
        """``[N]`` bool, whether each sample counts as correct: its verdict, or ``score >= threshold``
        (``settings["threshold"]``, default 0.5); a dropped sample (NaN score) is not."""
        return correct_mask(self.scores, self.verdicts, float(self.settings.get("threshold", 0.5)))

    def images_for(self, indices: Iterable[int]) -> Tensor:
        """``[M, 3, H, W]`` images of the given sample indices (they must have been kept)."""
        indices = list(indices)
        missing = [i for i in indices if i not in self.images]
        if missing:
            raise KeyError(f"images of samples {missing[:10]} were not kept; pass keep_images to evaluate() "
                           f"(kept: {sorted(self.images)[:10]}{'...' if len(self.images) > 10 else ''})")
        return torch.stack([self.images[i] for i in indices])

    def table(self, title: Optional[str] = None) -> str:
        """Markdown table: category, samples, accuracy with its 95% CI, mean partial score; below it,
        with two or more categories, their equally weighted mean (:func:`category_mean`)."""
        lines = [f"**{title}**", ""] if title else []
        lines += ["| category | n | accuracy | 95% CI | mean partial | mean score |", "|---|---:|---:|---|---:|---:|"]
        for stats in self.categories.values():
            name = f"**{stats.name}**" if stats.name == ALL else stats.name
            lines.append(f"| {name} | {stats.count} | {_pct(stats.accuracy)} | {_pct_ci(stats.ci_low, stats.ci_high)} | "
                         f"{_num(stats.mean_partial)} | {_num(stats.mean_score)} |")
        if len(self.categories) > 2:  # more than one category besides "all"
            lines += ["", f"Category mean (each category weighted equally): {_pct(category_mean(self.categories))}"]
        return "\n".join(lines)

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        """JSON-ready dict (images excluded); ``samples=False`` leaves out the per-sample lists."""
        out: dict[str, Any] = {
            "settings": self.settings,
            "num_samples": self.num_samples,
            "wall_time": self.wall_time,
            "categories": {name: stats.to_dict() for name, stats in self.categories.items()},
        }
        if samples:
            out["samples"] = {
                "prompt": self.prompts,
                "tag": self.tags,
                "seed": self.seeds,
                "record_index": self.record_index,
                "score": [_json_number(v) for v in self.scores.tolist()],
                "partial": None if self.partial is None else [_json_number(v) for v in self.partial.tolist()],
                "noise_fingerprint": self.noise_fingerprints.tolist(),
                "failure": self.failures,
                "verdict": None if self.verdicts is None else [_json_number(v) for v in self.verdicts.tolist()],
            }
            if self.extra:
                out["samples"]["extra"] = {name: [_json_number(v) for v in values.tolist()] for name, values in self.extra.items()}
        return out

    def to_json(self, path: Optional[Union[str, Path]] = None, samples: bool = True) -> str:
        """The :meth:`to_dict` as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(samples=samples), indent=1, allow_nan=False)
        if path is not None:
            from flowalign.files import write_text_atomic

            write_text_atomic(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, source: Union[str, Path, dict]) -> "EvalResult":
        """Read back what :meth:`to_json` wrote (a path or the loaded dict); images are not stored."""
        data = source if isinstance(source, dict) else json.loads(Path(source).read_text(encoding="utf-8"))
        if "samples" not in data:
            raise ValueError("this evaluation JSON was written without per-sample results (to_json(samples=False))")
        s = data["samples"]
        nan = lambda v: math.nan if v is None else v  # noqa: E731
        categories = {name: CategoryStats(**{k: nan(v) for k, v in st.items()}) for name, st in data["categories"].items()}
        return cls(
            prompts=list(s["prompt"]), tags=list(s["tag"]), seeds=[int(x) for x in s["seed"]],
            record_index=[int(x) for x in s["record_index"]],
            scores=torch.tensor([nan(v) for v in s["score"]], dtype=torch.float32),
            partial=None if s["partial"] is None else torch.tensor([nan(v) for v in s["partial"]], dtype=torch.float32),
            noise_fingerprints=torch.tensor(s["noise_fingerprint"], dtype=torch.float64),
            categories=categories, settings=dict(data.get("settings", {})), wall_time=float(data.get("wall_time", 0.0)),
            failures=None if s.get("failure") is None else [str(x) for x in s["failure"]],
            verdicts=None if s.get("verdict") is None else torch.tensor([nan(v) for v in s["verdict"]], dtype=torch.float32),
            extra={name: torch.tensor([nan(v) for v in values], dtype=torch.float32) for name, values in s.get("extra", {}).items()},
        )


@dataclass
class Comparison:
    """Base vs aligned per category: ``rows[tag] = {"base": CategoryStats, "aligned": ...,
    "delta": accuracy difference, "delta_low"/"delta_high": its 95% Newcombe interval,
    "delta_partial": difference of mean partial scores, "delta_score": mean of the paired score
    differences (aligned − base, same prompt and noise; samples either dropped are left out),
    "delta_score_low"/"delta_score_high": its 95% normal interval}``. The score rows are what a
    continuous reward (no verdict, scores below the 0.5 threshold) moves. Every row counts the samples both
    evaluations scored: ``one_sided`` samples that one of them dropped are left out of both sides."""

    rows: dict[str, dict[str, Any]]
    one_sided: int = 0

    @property
    def delta(self) -> float:
        """Overall accuracy gain (aligned - base), as a fraction."""
        return self.rows[ALL]["delta"]

    def table(self) -> str:
        """Markdown table of both evaluations and the deltas (accuracy in percentage points)."""
        lines = [
            "| category | n | base acc [95% CI] | aligned acc [95% CI] | Δ acc (pts) [95% CI] | base partial | aligned partial | Δ partial "
            "| base score | aligned score | Δ score [95% CI] |",
            "|---|---:|---|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for name, row in self.rows.items():
            b, a = row["base"], row["aligned"]
            label = f"**{name}**" if name == ALL else name
            n = str(a.count) if a.count == b.count else f"{b.count}/{a.count}"
            lines.append(
                f"| {label} | {n} | {_pct(b.accuracy)} {_pct_ci(b.ci_low, b.ci_high)} | {_pct(a.accuracy)} {_pct_ci(a.ci_low, a.ci_high)} | "
                f"{_pts(row['delta'])} {_pts_ci(row['delta_low'], row['delta_high'])} | {_num(b.mean_partial)} | {_num(a.mean_partial)} | "
                f"{_signed(row['delta_partial'])} | {_num(b.mean_score)} | {_num(a.mean_score)} | "
                f"{_signed(row['delta_score'])} {_num_ci(row['delta_score_low'], row['delta_score_high'])} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Per category: base and aligned stats and the gain, JSON-safe."""
        return {
            name: {"base": row["base"].to_dict(), "aligned": row["aligned"].to_dict(),
                   **{k: _json_number(row[k]) for k in ("delta", "delta_low", "delta_high", "delta_partial", "delta_score",
                                                        "delta_score_low", "delta_score_high")}}
            for name, row in self.rows.items()
        }

    def __str__(self) -> str:
        return self.table()


def compare(base: EvalResult, aligned: EvalResult, z: float = Z95, check_noise: bool = True) -> Comparison:
    """Per-category deltas ``aligned - base`` with Newcombe intervals (:func:`newcombe_interval`).

    Raises:
        ValueError: the two evaluations did not score the same prompts with the same seeds (or,
            with ``check_noise``, did not start from the same noise).
    """
    if base.prompts != aligned.prompts or base.seeds != aligned.seeds:
        pairs = zip(zip(base.prompts, base.seeds), zip(aligned.prompts, aligned.seeds))
        first = next((i for i, (a, b) in enumerate(pairs) if a != b), min(base.num_samples, aligned.num_samples))
        raise ValueError(f"base and aligned evaluations differ in prompts or seeds ({base.num_samples} vs {aligned.num_samples} samples; "
                         f"first difference at sample {first}): evaluate both with the same records, num_samples and seed")
    if check_noise and not torch.allclose(base.noise_fingerprints, aligned.noise_fingerprints, rtol=1e-6, atol=1e-6):
        bad = int(torch.nonzero(~torch.isclose(base.noise_fingerprints, aligned.noise_fingerprints, rtol=1e-6, atol=1e-6))[0])
        raise ValueError(f"base and aligned evaluations drew different initial noise (first at sample {bad}); "
                         "were they run on different devices or latent shapes?")
    base, aligned = align_tags(base, aligned)
    base, aligned, one_sided = jointly_scored(base, aligned)
    rows = {}
    differences = aligned.scores.double() - base.scores.double()  # [N] paired: NaN where either was dropped
    for name in aligned.categories:
        if name not in base.categories:
            continue
        b, a = base.categories[name], aligned.categories[name]
        low, high = newcombe_interval(a.correct, a.count, b.correct, b.count, z)
        mine = differences if name == ALL else differences[torch.tensor([t == name for t in aligned.tags], dtype=torch.bool)]
        score_delta, score_low, score_high = mean_interval(mine[~torch.isnan(mine)], z)
        rows[name] = {"base": b, "aligned": a, "delta": a.accuracy - b.accuracy, "delta_low": low, "delta_high": high,
                      "delta_partial": a.mean_partial - b.mean_partial, "delta_score": score_delta, "delta_score_low": score_low,
                      "delta_score_high": score_high}
    return Comparison(rows=rows, one_sided=one_sided)


def jointly_scored(base: EvalResult, aligned: EvalResult) -> tuple[EvalResult, EvalResult, int]:
    """``base`` and ``aligned`` (same samples) with a sample one of them dropped dropped in both, recounted, and how
    many such samples there were: accuracies, partials and their deltas then compare the same samples (a category
    one run dropped whole would otherwise leave the other run's "all" row only)."""
    both = ~torch.isnan(base.scores) & ~torch.isnan(aligned.scores)
    one_sided = int((~both).sum()) - int((torch.isnan(base.scores) & torch.isnan(aligned.scores)).sum())
    if not one_sided:
        return base, aligned, 0

    def restricted(result: EvalResult) -> EvalResult:
        nan = torch.tensor(float("nan"))
        scores = torch.where(both, result.scores, nan)
        partial = None if result.partial is None else torch.where(both, result.partial, nan)
        categories = aggregate(result.tags, scores, partial, result.settings.get("threshold", 0.5), verdicts=result.verdicts)
        return dataclasses.replace(result, scores=scores, partial=partial, categories=categories)

    return restricted(base), restricted(aligned), one_sided


def align_tags(base: EvalResult, aligned: EvalResult) -> tuple[EvalResult, EvalResult]:
    """``base`` and ``aligned`` with one category per sample: where one files a sample as ``"untagged"`` (a dropped
    sample whose category only the reward names) the other's category is used, and the categories are recounted.

    Raises:
        ValueError: a sample is filed under two named categories (prompt files that tag the same prompts otherwise).
    """
    if base.tags == aligned.tags or len(base.tags) != len(aligned.tags):
        return base, aligned
    tags = []
    for i, (b, a) in enumerate(zip(base.tags, aligned.tags)):
        if b != a and UNTAGGED not in (a, b):
            raise ValueError(f"base and aligned evaluations file sample {i} ({base.prompts[i]!r}) under other categories "
                             f"({b!r} vs {a!r}): evaluate both with the same prompt file")
        tags.append(a if b == UNTAGGED else b)
    return _retagged(base, tags), _retagged(aligned, tags)


def _retagged(result: EvalResult, tags: list[str]) -> EvalResult:
    if result.tags == tags:
        return result
    categories = aggregate(tags, result.scores, result.partial, result.settings.get("threshold", 0.5), verdicts=result.verdicts)
    return dataclasses.replace(result, tags=tags, categories=categories)


def _label_order(labels: Sequence[str]) -> list[str]:
    """Distinct labels, ``"correct"`` first, the others most frequent first (ties: first seen first)."""
    counts = Counter(labels)  # keys in order of first appearance; sorted() is stable for ties
    return sorted(counts, key=lambda x: (x != "correct", -counts[x]))


def failure_counts(tags: Sequence[str], failures: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{category: {label: count}}`` (every label of ``failures`` in every row) plus ``"all"``.

    >>> failure_counts(["a", "a", "b"], ["correct", "malformed", "malformed"])
    {'a': {'correct': 1, 'malformed': 1}, 'b': {'correct': 0, 'malformed': 1}, 'all': {'correct': 1, 'malformed': 2}}
    """
    if len(tags) != len(failures):
        raise ValueError(f"{len(tags)} tags but {len(failures)} failure labels")
    labels = _label_order(list(failures))
    table = {tag: dict.fromkeys(labels, 0) for tag in [*sorted(set(tags)), ALL]}
    for tag, label in zip(tags, failures):
        table[tag][label] += 1
        table[ALL][label] += 1
    return table


def failure_transitions(base: Sequence[str], aligned: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{base label: {aligned label: count}}`` over paired samples (same prompts and seeds).

    >>> failure_transitions(["correct", "color", "color"], ["color", "correct", "color"])
    {'correct': {'correct': 0, 'color': 1}, 'color': {'correct': 1, 'color': 1}}
    """
    if len(base) != len(aligned):
        raise ValueError(f"{len(base)} base labels but {len(aligned)} aligned labels")
    labels = _label_order([*base, *aligned])
    table = {a: dict.fromkeys(labels, 0) for a in labels}
    for a, b in zip(base, aligned):
        table[a][b] += 1
    return table


def prompt_changes(prompts: Sequence[str], tags: Sequence[str], base_correct: Sequence[bool], aligned_correct: Sequence[bool]) -> list[dict[str, Any]]:
    """Per distinct prompt of paired samples (same prompts and seeds): its category, sample count and
    correct samples before and after, sorted by the change (largest gain first; ties by prompt).

    >>> prompt_changes(["a", "b", "a"], ["x", "y", "x"], [False, True, True], [True, False, True])
    [{'prompt': 'a', 'tag': 'x', 'n': 2, 'base': 1, 'aligned': 2}, {'prompt': 'b', 'tag': 'y', 'n': 1, 'base': 1, 'aligned': 0}]
    """
    if not len(prompts) == len(tags) == len(base_correct) == len(aligned_correct):
        raise ValueError(f"got {len(prompts)} prompts, {len(tags)} tags, {len(base_correct)} base and {len(aligned_correct)} aligned outcomes")
    rows: dict[str, dict[str, Any]] = {}
    for prompt, tag, b, a in zip(prompts, tags, base_correct, aligned_correct):
        row = rows.setdefault(prompt, {"prompt": prompt, "tag": tag, "n": 0, "base": 0, "aligned": 0})
        row["n"] += 1
        row["base"] += int(bool(b))
        row["aligned"] += int(bool(a))
    return sorted(rows.values(), key=lambda r: (r["base"] - r["aligned"], r["prompt"]))


# ----------------------------------------------------------------------------------------------
# Headroom: how often a prompt succeeds at all (pure functions)
# ----------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021,
    arXiv 2107.03374, Eq. 1): the chance that ``k`` samples drawn without replacement hold at
    least one correct one,

        pass@k = 1 - C(n - c, k) / C(n, k)

    (1 when ``n - c < k``). With ``k = 1`` it is the accuracy ``c / n``.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def headroom(tags: Sequence[str], correct: Sequence[Sequence[bool]], weights: Optional[Sequence[float]] = None,
             ks: Sequence[int] = (1, 4, 16)) -> dict[str, dict[str, float]]:
    """Per category (and ``"all"``): the weighted mean of pass@k over prompts.

    ``correct[j]`` holds the outcomes of ``n`` samples of prompt ``j`` (every prompt the same
    ``n``); ``weights[j]`` is how often prompt ``j`` appears in the evaluated set (default 1).
    pass@1 is the accuracy a sampler of this model gets; pass@k for large k bounds what
    re-weighting the model's own samples can reach without new capability (a prompt the model
    never solves in ``n`` tries contributes nothing), i.e. how much room sharpening (RL on the
    model's own samples) has. Returns ``{category: {"prompts": m, "pass@k": value, ...}}``.
    """
    if len(tags) != len(correct):
        raise ValueError(f"{len(tags)} tags for {len(correct)} prompts")
    n = {len(c) for c in correct}
    if len(n) != 1:
        raise ValueError(f"every prompt needs the same number of samples, got {sorted(n)}")
    n = n.pop()
    weights = [1.0] * len(tags) if weights is None else [float(w) for w in weights]
    if len(weights) != len(tags) or any(w < 0 for w in weights):
        raise ValueError("weights must be one non-negative number per prompt")
    values = [{k: pass_at_k(n, sum(map(bool, c)), k) for k in ks} for c in correct]
    out: dict[str, dict[str, float]] = {}
    for tag in sorted(set(map(str, tags))) + [ALL]:
        rows = [j for j, t in enumerate(tags) if tag == ALL or str(t) == tag]
        total = sum(weights[j] for j in rows)
        out[tag] = {"prompts": float(len(rows))}
        for k in ks:
            out[tag][f"pass@{k}"] = sum(weights[j] * values[j][k] for j in rows) / total if total > 0 else math.nan
    return out


# ----------------------------------------------------------------------------------------------
# Sampling and scoring
# ----------------------------------------------------------------------------------------------


def sample_indices(num_records: int, num_samples: Optional[int], samples_per_prompt: int = 1) -> list[int]:
    """Record index of every sample: sample ``i`` belongs to record ``(i // samples_per_prompt) % P``.

    ``num_samples`` None means ``P · samples_per_prompt`` (each prompt ``samples_per_prompt``
    times); otherwise it must be at least that, and the prompts are cycled over.
    """
    if num_records < 1:
        raise ConfigError("evaluation needs at least one prompt, got none")
    if samples_per_prompt < 1:
        raise ConfigError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    minimum = num_records * samples_per_prompt
    if num_samples is None:
        num_samples = minimum
    if num_samples < minimum:
        raise ConfigError(f"num_samples={num_samples} is below prompts x samples_per_prompt = {num_records} x {samples_per_prompt} = {minimum}: "
                          "every prompt must be evaluated")
    return [(i // samples_per_prompt) % num_records for i in range(num_samples)]


def pick_samples(records: Sequence[Any], num_samples: Optional[int] = None, samples_per_prompt: int = 1, per_category: int = 2) -> list[int]:
    """Sample indices for a before/after grid: the first ``per_category`` distinct prompts of each category.

    Computed from the records alone (the sampling rule of :func:`evaluate`), so the indices can
    be passed as ``keep_images`` to both the base and the aligned evaluation. Categories are in
    sorted order; within one, samples are in index order.
    """
    prompts, metadata = split_records(records)
    index = sample_indices(len(prompts), num_samples, samples_per_prompt)
    chosen: dict[str, list[int]] = {}
    seen: set[int] = set()
    for i, r in enumerate(index):
        tag = str(metadata[r].get("tag", UNTAGGED))
        if r in seen or len(chosen.setdefault(tag, [])) >= per_category:
            continue
        seen.add(r)
        chosen[tag].append(i)
    return [i for tag in sorted(chosen) for i in chosen[tag]]


def _per_sample(value: Any, batch: int, name: str) -> Optional[Tensor]:
    """A ``[B]`` float tensor from a reward detail (tensor / array / list), or None if absent."""
    if value is None:
        return None
    t = torch.as_tensor(value if isinstance(value, Tensor) else [float(v) for v in value]).detach().float().cpu().flatten()
    if t.numel() != batch:
        raise ValueError(f"reward details[{name!r}] has {t.numel()} values for {batch} samples")
    return t


def _load_lora(adapter, lora: Union[str, Path]):
    from flowalign.lora import load_lora_into_pipeline

    name = "flowalign_eval"
    load_lora_into_pipeline(adapter.pipeline, lora, adapter_name=name)
    return name


@dataclass
class _Part:
    """One process's share of an evaluation: per-sample outcomes of the sample indices ``rows``.
    A list is None when the reward did not give that detail for some batch (then the merged
    evaluation has none either); ``images`` maps sample index to image."""

    rows: list[int]
    scores: list[float]
    partial: Optional[list[float]]
    verdicts: Optional[list[float]]
    tags: list[str]
    fingerprints: list[float]
    failures: Optional[list[str]]
    images: dict[int, Tensor]
    extra: dict[str, list[float]] = field(default_factory=dict)
    resumed: int = 0  # samples read back from a journal
    refused: Optional[str] = None  # why this process's journal was refused (every process raises it after the gather)


def shard_rows(num_samples: int, shard: Optional[tuple[int, int]]) -> list[int]:
    """The sample indices process ``index`` of ``count`` evaluates: ``index, index + count, ...``
    (strided, so every process gets about as many samples of each prompt and category)."""
    if shard is None:
        return list(range(num_samples))
    index, count = int(shard[0]), int(shard[1])
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    return list(range(index, num_samples, count))


def _share_order(rows_per_part: Sequence[Sequence[int]], n: int) -> list[tuple[int, int]]:
    """``(part, position)`` of samples ``0 .. n-1`` in order, from each part's sample indices.

    Raises:
        RuntimeError: the parts do not cover samples ``0 .. n-1`` exactly once.
    """
    order = sorted((r, k, j) for k, rows in enumerate(rows_per_part) for j, r in enumerate(rows))
    if [r for r, _, _ in order] != list(range(n)):
        raise RuntimeError(f"the processes' evaluation shares do not cover samples 0..{n - 1} exactly once")
    return [(k, j) for _, k, j in order]


def _merge_parts(parts: Sequence[_Part], n: int) -> _Part:
    """The parts of every process as one part over samples ``0 .. n-1`` (each index exactly once)."""
    order = _share_order([part.rows for part in parts], n)

    def pick(name: str) -> Optional[list]:
        if any(getattr(part, name) is None for part in parts if part.rows):
            return None
        return [getattr(parts[k], name)[j] for k, j in order]

    images = {i: img for part in parts for i, img in part.images.items()}
    extra = {name: [parts[k].extra[name][j] for k, j in order] for name in parts[0].extra}
    return _Part(rows=list(range(n)), scores=pick("scores"), partial=pick("partial"), verdicts=pick("verdicts"), tags=pick("tags"),
                 fingerprints=pick("fingerprints"), failures=pick("failures"), images=images, extra=extra,
                 resumed=sum(part.resumed for part in parts))


def noise_fingerprints(noise: Tensor) -> list[float]:
    """Each sample's initial-noise fingerprint: the float64 sum of its ``noise[i]`` (``EvalResult.noise_fingerprints``)."""
    return noise.detach().double().flatten(1).sum(1).cpu().tolist()


def _score_batch(adapter, reward, rows: list[int], prompts: list[str], metadata: list[dict], noise: Tensor, *, num_steps: int,
                 guidance_scale: float, on_error: str, keep: set, extra_details: Sequence[str],
                 reward_batch_size: Optional[int] = None) -> EvalBatch:
    """Sample the ODE from ``noise`` (``[b, *latent]``) for the sample indices ``rows`` and score the images (in chunks
    of ``reward_batch_size``, the reward's own ``batch_size``)."""
    from flowalign.rewards import call_reward_batched
    from flowalign.sampling import sample_ode

    images = sample_ode(adapter, prompts, num_steps=num_steps, guidance_scale=guidance_scale, initial_noise=noise)  # [b, 3, H, W]
    out = call_reward_batched(reward, images, prompts, metadata, on_error=on_error, batch_size=reward_batch_size)
    scores = out.scores.detach().float().cpu()  # [b]
    # a batch whose every sample was dropped has no details: NaN / "dropped" rows, so one bad batch
    # does not switch the whole evaluation to the score threshold
    dropped = torch.isnan(scores)  # [b]: a reward that raised, or returned a non-finite score, under "drop"
    all_dropped = bool(dropped.all())
    nan_rows = torch.full((len(rows),), float("nan"))

    def per_sample(name: str) -> Optional[list[float]]:
        v = _per_sample(out.details.get(name), len(rows), name)
        v = nan_rows if v is None and all_dropped else v
        return None if v is None else torch.where(dropped, nan_rows, v).tolist()  # a dropped sample's details do not count

    labels = out.details.get("failure")
    labels = [None] * len(rows) if labels is None and all_dropped else labels
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"reward details['failure'] has {len(labels)} labels for {len(rows)} samples")
    failures = None if labels is None else [DROPPED if label is None or bool(dropped[j]) else str(label) for j, label in enumerate(labels)]
    detail_tags = out.details.get("tag")
    tags = []
    for j, m in enumerate(metadata):
        tag = m.get("tag")
        if tag is None and detail_tags is not None and not bool(dropped[j]):  # a dropped sample's details do not count
            tag = detail_tags[j]
        tags.append(None if tag is None else str(tag))  # None: filled by evaluate from the record's other samples
    extra = {}
    for name in extra_details:
        values = _per_sample(out.details.get(name), len(rows), name)
        values = nan_rows if values is None and all_dropped else values
        if values is None:
            raise ValueError(f"evaluate(extra_details=...) keeps details[{name!r}], which the reward did not give")
        extra[name] = values.tolist()
    return EvalBatch(rows=list(rows), scores=scores.tolist(), fingerprints=noise_fingerprints(noise),
                     tags=tags, partial=per_sample("partial"), verdicts=per_sample("binary"), failures=failures, extra=extra,
                     images={i: images[j].detach().float().cpu() for j, i in enumerate(rows) if i in keep})


def _journaled(done: dict[int, EvalBatch], rows: list[int], keep: set, on_error: str,
               extra_details: Sequence[str]) -> Optional[EvalBatch]:
    """The journaled outcomes of the batch of sample indices ``rows``, or None to score it again.

    ``done`` maps a sample index to a journaled batch holding it (:meth:`EvalJournal.load`'s batches by each of their
    rows). Every row must be journaled, with its image when it is now kept, the details now kept, and not dropped
    when failures now raise (a sample scored under ``on_error="drop"`` without a drop is the same under ``"raise"``;
    one dropped is scored again, and raises). Rows of one journaled batch come back as they were; rows of several
    (a launch with another process count or batch size) are joined into one batch."""
    sources = [done.get(i) for i in rows]
    if any(b is None for b in sources):
        return None
    picks = [(b, b.rows.index(i)) for b, i in zip(sources, rows)]
    if any(i in keep and i not in b.images for (b, _), i in zip(picks, rows)):
        return None
    if on_error == "raise" and any(math.isnan(b.scores[j]) for b, j in picks):
        return None
    if any(name not in b.extra for b, _ in picks for name in extra_details):
        return None
    if len({id(b) for b, _ in picks}) == 1 and sources[0].rows == rows:
        return sources[0]

    def column(name: str) -> Optional[list]:
        values = [getattr(b, name) for b, _ in picks]
        return None if any(v is None for v in values) else [v[j] for v, (_, j) in zip(values, picks)]

    return EvalBatch(rows=list(rows), scores=column("scores"), fingerprints=column("fingerprints"), tags=column("tags"),
                     partial=column("partial"), verdicts=column("verdicts"), failures=column("failures"),
                     extra={name: [b.extra[name][j] for b, j in picks] for name in extra_details},
                     images={i: b.images[i] for (b, _), i in zip(picks, rows) if i in b.images})


def _check_resumed(batch: EvalBatch, noise: Tensor, journal: EvalJournal) -> None:
    """ConfigError unless a journaled batch was drawn from exactly ``noise`` (the adapter's noise of its seeds)."""
    if noise_fingerprints(noise) != batch.fingerprints:
        raise ConfigError(f"{journal.folder}: the journaled samples {batch.rows[0]}..{batch.rows[-1]} were drawn from other initial "
                          f"noise than this model gives for their seeds (another resolution or adapter); pass --restart to discard them")


@torch.no_grad()
def evaluate(
    adapter,
    records: Sequence[Any],
    reward,
    *,
    num_samples: Optional[int] = None,
    samples_per_prompt: int = 1,
    num_steps: int = 40,
    guidance_scale: float = 4.5,
    seed: int = 0,
    batch_size: int = 32,
    lora: Optional[Union[str, Path]] = None,
    threshold: float = 0.5,
    on_error: str = "raise",
    keep_images: Union[int, Sequence[int], None] = 16,
    progress: bool = True,
    shard: Optional[tuple[int, int]] = None,
    gather: Optional[Callable[[Any], list]] = None,
    journal: Optional[EvalJournal] = None,
    extra_details: Sequence[str] = (),
    reward_batch_size: Optional[int] = None,
) -> EvalResult:
    """Sample, score and aggregate a prompt set (see the module docstring for the sampling rule).

    Args:
        adapter: a ``flowalign.pipelines.Adapter`` (with whatever LoRA state it has).
        records: ``PromptRecord``s (``flowalign.prompts.load_prompts``), ``{"prompt", ...}`` dicts
            or strings; the category of a sample is ``metadata["tag"]`` (else the reward's
            ``details["tag"]``, else ``"untagged"``).
        reward: a ``Reward`` (or any callable ``call_reward`` accepts).
        num_samples: total samples ``N`` (default ``P · samples_per_prompt``); prompts are cycled.
        samples_per_prompt: consecutive samples per visit of a prompt.
        num_steps, guidance_scale: the Euler ODE sampler's steps and CFG scale.
        seed: sample ``i`` starts from the noise of ``torch.Generator().manual_seed(seed + i)``.
        batch_size: samples per transformer call (does not change any sample).
        reward_batch_size: images per reward call at most (a run's ``rewards[].batch_size``: a reward model's memory);
            None: each batch in one call.
        lora: a LoRA file or folder loaded for this evaluation only (removed afterwards).
        threshold: a sample is correct when ``score >= threshold`` (a reward that gives ``details["binary"]``:
            when that verdict is 1).
        on_error: reward failure policy (``"raise"`` or ``"drop"``; dropped samples are not counted).
        keep_images: keep the images of the first ``k`` samples (int), of the given sample
            indices (sequence), or of none (None / 0).
        progress: show a tqdm bar.
        shard: ``(index, count)``: this process samples and scores only the indices
            :func:`shard_rows` gives it (every ``count``-th sample from ``index``), then ``gather``
            collects every process's share, so each process returns the whole evaluation. A sample
            depends on its index only, so the result is the one of a single process (up to the float
            rounding of other batch compositions).
        gather: with ``shard``: takes this process's share and returns every process's shares, e.g.
            ``lambda part: accelerate.utils.gather_object([part])`` (called once, by every process).
        journal: a :class:`flowalign.eval_journal.EvalJournal`: every scored batch is written to it at
            once, and a batch whose samples it already holds (same key; every sample of the batch journaled, by any
            process count or batch size, with the images now kept, and none dropped when ``on_error="raise"``;
            :func:`_journaled`) is read back instead of sampled again, after
            checking their initial noise, so a killed evaluation resumes where it stopped with the same
            result (``settings["resumed_samples"]``: how many, over every process). The caller removes it
            once the result is saved.
        extra_details: names of per-sample reward details (e.g. ``"quality"`` of
            :class:`flowalign.corrected.QualityTap`) to keep as ``result.extra[name]`` (``[N]`` float32).
    """
    from tqdm.auto import tqdm

    from flowalign.rewards.base import reward_name

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if num_steps < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
    if shard is not None and int(shard[1]) > 1 and gather is None:
        raise ConfigError(f"evaluate(shard={shard}) needs gather, which collects the other processes' shares")
    prompts_all, metadata_all = split_records(records)
    try:
        check_tags([m.get("tag") for m in metadata_all])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None  # before anything is sampled
    index = sample_indices(len(prompts_all), num_samples, samples_per_prompt)
    n = len(index)
    seeds = [int(seed) + i for i in range(n)]
    keep_set = set(range(min(int(keep_images), n))) if isinstance(keep_images, int) else set(keep_images or ())
    my_rows = shard_rows(n, shard)

    start = time.perf_counter()
    split = shard is not None and int(shard[1]) > 1
    try:
        loaded, refused = (journal.load() if journal is not None else {}), None
        done = {i: batch for batch in loaded.values() for i in batch.rows}  # by sample index
    except ConfigError as exc:
        if not split:
            raise
        # a journal only this process refuses (a foreign file in its share): every process must still reach the gather,
        # where all of them raise it, instead of the others waiting there until the process group times out
        done, refused, my_rows = {}, str(exc), []
    resumed = 0
    lora_name = _load_lora(adapter, lora) if lora is not None else None
    try:
        scores, partial, verdicts, tags, fingerprints, failures, images = [], [], [], [], [], [], {}
        extra: dict[str, list[float]] = {name: [] for name in extra_details}
        has_partial = has_failure = has_verdict = True
        # disable only when asked: left unset, tqdm's TQDM_DISABLE / TQDM_MININTERVAL environment settings apply (batch jobs)
        bar = tqdm(total=len(my_rows), desc="eval", unit="sample", leave=False, **({} if progress else {"disable": True}))
        for lo in range(0, len(my_rows), batch_size):
            rows = my_rows[lo:lo + batch_size]
            noise = torch.cat([adapter.initial_noise(1, torch.Generator().manual_seed(seeds[i])) for i in rows])  # [b, *latent]
            batch = _journaled(done, rows, keep_set, on_error, extra_details)
            if batch is not None:
                _check_resumed(batch, noise, journal)
                resumed += len(rows)
            else:
                prompts = [prompts_all[index[i]] for i in rows]
                metadata = [dict(metadata_all[index[i]]) for i in rows]
                batch = _score_batch(adapter, reward, rows, prompts, metadata, noise, num_steps=num_steps, guidance_scale=guidance_scale,
                                     on_error=on_error, keep=keep_set, extra_details=extra_details, reward_batch_size=reward_batch_size)
                if journal is not None:
                    journal.save(batch)
            scores += batch.scores
            fingerprints += batch.fingerprints
            tags += batch.tags
            has_partial = has_partial and batch.partial is not None
            partial += batch.partial or []
            has_verdict = has_verdict and batch.verdicts is not None
            verdicts += batch.verdicts or []
            has_failure = has_failure and batch.failures is not None
            failures += batch.failures or []
            for name in extra_details:
                extra[name] += batch.extra[name]
            images.update(batch.images)
            bar.update(len(rows))
        bar.close()
    finally:
        if lora_name is not None:
            adapter.pipeline.delete_adapters(lora_name)
    if resumed:
        logger.info("resumed %d of %d samples from %s", resumed, len(my_rows), journal.folder)
    part = _Part(rows=my_rows, scores=scores, partial=partial if has_partial else None, verdicts=verdicts if has_verdict else None,
                 tags=tags, fingerprints=fingerprints, failures=failures if has_failure else None, images=images, extra=extra,
                 resumed=resumed, refused=refused)
    if split:
        logger.info("evaluation share %d of %d: sampled %d of the %d samples", int(shard[0]), int(shard[1]), len(my_rows), n)
        parts = gather(part)
        refusals = [p.refused for p in parts if p.refused is not None]
        if refusals:
            raise ConfigError(refusals[0])
        part = _merge_parts(parts, n)
    wall = time.perf_counter() - start
    named = {}  # a dropped sample whose category only the reward names takes another sample's of its record
    for i, tag in enumerate(part.tags):
        if tag is not None:
            named.setdefault(index[i], tag)
    part.tags = [named.get(index[i], UNTAGGED) if tag is None else tag for i, tag in enumerate(part.tags)]

    scores_t = torch.tensor(part.scores, dtype=torch.float32)  # [N]
    partial_t = torch.tensor(part.partial, dtype=torch.float32) if part.partial is not None and n else None  # [N]
    verdicts_t = torch.tensor(part.verdicts, dtype=torch.float32) if part.verdicts is not None and n else None  # [N]
    settings = {
        "reward": reward_name(reward), "reward_version": getattr(reward, "version", None), "num_samples": n, "samples_per_prompt": samples_per_prompt, "num_prompts": len(prompts_all),
        "num_steps": num_steps, "guidance_scale": float(guidance_scale), "seed": int(seed), "threshold": threshold,
        "correct_when": "details['binary'] == 1" if verdicts_t is not None else f"score >= {threshold}",
        "lora": None if lora is None else str(lora), "sampler": "ode", "resumed_samples": part.resumed,
    }
    result = EvalResult(
        prompts=[prompts_all[r] for r in index], tags=part.tags, seeds=seeds, record_index=index, scores=scores_t, partial=partial_t,
        noise_fingerprints=torch.tensor(part.fingerprints, dtype=torch.float64),
        categories=aggregate(part.tags, scores_t, partial_t, threshold, verdicts=verdicts_t),
        settings=settings, images=part.images, wall_time=wall, failures=part.failures if part.failures and n else None,
        verdicts=verdicts_t, extra={name: torch.tensor(values, dtype=torch.float32) for name, values in part.extra.items()},
    )
    logger.info("evaluated %d samples in %.1fs: accuracy %.1f%%", n, wall, 100 * result.accuracy)
    return result


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------


def _json_number(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _pct(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{100 * v:.1f}%"


def _pct_ci(lo: float, hi: float) -> str:
    return "–" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def _pts(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{100 * v:+.1f}"


def _pts_ci(lo: float, hi: float) -> str:
    return "–" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _num(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{v:.3f}"


def _num_ci(lo: float, hi: float) -> str:
    return "–" if math.isnan(lo) or math.isnan(hi) else f"[{lo:+.3f}, {hi:+.3f}]"


def _signed(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{v:+.3f}"
