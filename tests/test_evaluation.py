"""Evaluation: per-sample seeds, per-category aggregation, confidence intervals, compare, the eval CLI."""
from __future__ import annotations

import json
import logging
import os
import math

import pytest
import torch

from flowalign import lora as lora_lib
from flowalign.errors import ConfigError, LoraMismatchError
from flowalign.evaluation import (
    EvalResult,
    aggregate,
    category_mean,
    compare,
    correct_mask,
    evaluate,
    mean_interval,
    newcombe_interval,
    sample_indices,
    wilson_interval,
)
from flowalign.pipelines import load_adapter
from flowalign.pipelines.testing import add_random_lora, tiny_sd3_pipeline
from flowalign.rewards import Reward, RewardOutput

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
RECORDS = [
    {"prompt": "a red square", "tag": "colors"},
    {"prompt": "two blue circles", "tag": "counting"},
    {"prompt": "a circle left of a square", "tag": "position"},
    {"prompt": "a green triangle", "tag": "colors"},
]
STEPS = 2


class TagBrightness(Reward):
    """Test reward: binary = mean brightness > threshold, partial = brightness, tag from metadata."""

    name = "tag_brightness"

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold

    def score(self, images, prompts, metadata):
        brightness = images.mean(dim=(1, 2, 3))  # [B]
        return RewardOutput(scores=(brightness > self.threshold).float(),
                            details={"partial": brightness, "tag": [m.get("tag", "?") for m in metadata]})


def _pipe(**kwargs):
    pipe = tiny_sd3_pipeline(seed=0, with_t5=False, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def adapter():
    return load_adapter(_pipe())


@pytest.fixture(scope="module")
def threshold(adapter):
    """The median brightness of the evaluation's samples, so the binary outcome is mixed."""
    result = evaluate(adapter, RECORDS, TagBrightness(0.0), num_samples=8, num_steps=STEPS, guidance_scale=1.0, seed=3, progress=False)
    return float(result.partial.median())


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA file with a clearly non-zero update for the tiny pipeline."""
    pipe = _pipe()
    add_random_lora(pipe.transformer, target_modules=TARGETS, seed=1)
    directory = tmp_path_factory.mktemp("lora")
    lora_lib.save_lora_weights(pipe, directory, lora_lib.get_lora_state_dict(pipe.transformer))
    return directory


# ---------------------------------------------------------------------------------------------- intervals


def test_wilson_interval_matches_score_test_inversion_and_scipy():
    # hand formula: centre (p + z²/2n)/(1 + z²/n), half z/(1 + z²/n)·sqrt(p(1-p)/n + z²/4n²)
    z, k, n = 1.959963984540054, 7, 20
    p = k / n
    centre = (p + z * z / 40) / (1 + z * z / 20)
    half = z / (1 + z * z / 20) * math.sqrt(p * (1 - p) / 20 + z * z / 1600)
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(centre - half, abs=1e-12) and high == pytest.approx(centre + half, abs=1e-12)
    # the endpoints are the p0 where the score test is on the edge: (p - p0)² = z² p0 (1 - p0) / n
    for p0 in (low, high):
        assert (p - p0) ** 2 == pytest.approx(z * z * p0 * (1 - p0) / n, rel=1e-9)
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(81, 263), (0, 20), (1, 29), (20, 20), (64, 128)]:
        ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)
    # Newcombe (1998), Table I, method 3: 81/263 -> 0.2553 to 0.3662
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 3)


def test_newcombe_difference_interval_published_examples():
    # Newcombe (1998), Stat. Med. 17:873, Table II, method 10: 56/70 - 48/80 -> 0.0524 to 0.3339;
    # 9/10 - 3/10 -> 0.1705 to 0.8090
    assert newcombe_interval(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert newcombe_interval(9, 10, 3, 10) == pytest.approx((0.1705, 0.8090), abs=1e-4)
    # antisymmetric: swapping the groups mirrors the interval
    low, high = newcombe_interval(48, 80, 56, 70)
    assert (low, high) == pytest.approx((-0.3339, -0.0524), abs=1e-4)


def test_mean_interval_is_normal_approximation():
    values = torch.tensor([0.2, 0.4, 0.9, 0.5, 0.1])
    mean, low, high = mean_interval(values)
    m = sum(values.tolist()) / 5
    s = math.sqrt(sum((v - m) ** 2 for v in values.tolist()) / 4)
    assert mean == pytest.approx(m) and high - mean == pytest.approx(1.959963984540054 * s / math.sqrt(5)) and mean - low == pytest.approx(high - mean)


# ---------------------------------------------------------------------------------------------- aggregation


def test_aggregate_counts_by_hand_and_skips_dropped():
    tags = ["a", "b", "a", "a", "b", "c"]
    scores = torch.tensor([1.0, 0.0, float("nan"), 1.0, 1.0, 0.0])
    partial = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.6, 0.2])
    stats = aggregate(tags, scores, partial)
    assert list(stats) == ["a", "b", "c", "all"]
    assert (stats["a"].count, stats["a"].correct, stats["a"].dropped) == (2, 2, 1)  # sample 2 dropped
    assert stats["a"].mean_partial == pytest.approx(0.8)  # (0.9 + 0.7) / 2: the dropped one excluded
    assert (stats["b"].count, stats["b"].correct, stats["b"].accuracy) == (2, 1, 0.5)
    assert (stats["c"].count, stats["c"].correct) == (1, 0)
    assert (stats["all"].count, stats["all"].correct) == (5, 3)
    assert (stats["all"].ci_low, stats["all"].ci_high) == pytest.approx(wilson_interval(3, 5))
    assert stats["a"].mean_score == pytest.approx(1.0) and stats["all"].mean_score == pytest.approx(3 / 5)  # dropped: not a 0
    # a sample the reward scored but could not judge (partial NaN, as the protocol allows) leaves its partial out only
    unjudged = aggregate(tags, scores, torch.tensor([0.9, 0.1, 0.5, float("nan"), 0.6, 0.2]))
    assert unjudged["a"].mean_partial == pytest.approx(0.9) and unjudged["a"].count == 2
    assert unjudged["all"].mean_partial == pytest.approx((0.9 + 0.1 + 0.6 + 0.2) / 4)
    # a score exactly at the threshold counts as correct (>=), one just below does not
    assert correct_mask(torch.tensor([0.5, 0.4999, float("nan")]), None, threshold=0.5).tolist() == [True, False, False]


def test_category_mean_weights_categories_equally_and_skips_empty_ones():
    tags = ["a", "b", "a", "a", "b", "c", "d"]
    scores = torch.tensor([1.0, 0.0, float("nan"), 1.0, 1.0, 0.0, float("nan")])
    stats = aggregate(tags, scores, None)
    # a: 2/2, b: 1/2, c: 0/1, d: nothing scored (skipped) -> (1 + 0.5 + 0) / 3; "all" is 3/5
    assert category_mean(stats) == pytest.approx(0.5)
    assert stats["all"].accuracy == pytest.approx(0.6)
    assert math.isnan(category_mean({"all": stats["all"]}))


def test_sample_indices_cycle_over_prompts():
    assert sample_indices(3, 7) == [0, 1, 2, 0, 1, 2, 0]
    assert sample_indices(3, None, samples_per_prompt=2) == [0, 0, 1, 1, 2, 2]
    assert sample_indices(2, 6, samples_per_prompt=2) == [0, 0, 1, 1, 0, 0]
    with pytest.raises(ConfigError, match="num_samples=2 is below"):
        sample_indices(3, 2)


def test_per_category_aggregation_equals_hand_count_of_diffusers_samples(adapter, threshold):
    """Every sample is redrawn with the full diffusers ``pipe(...)`` from the same seed and counted by hand."""
    n, seed = 8, 3
    reward = TagBrightness(threshold)
    result = evaluate(adapter, RECORDS, reward, num_samples=n, num_steps=STEPS, guidance_scale=1.0, seed=seed, batch_size=4, progress=False)
    pipe = adapter.pipeline
    hand: dict[str, list[int]] = {}
    for i in range(n):
        record = RECORDS[i % len(RECORDS)]
        latents = adapter.initial_noise(1, torch.Generator().manual_seed(seed + i))
        image = pipe(record["prompt"], latents=latents, num_inference_steps=STEPS, guidance_scale=1.0, output_type="pt").images
        correct = int(float(image.mean()) > threshold)
        hand.setdefault(record["tag"], []).append(correct)
        assert result.prompts[i] == record["prompt"] and result.tags[i] == record["tag"]
        assert float(result.partial[i]) == pytest.approx(float(image.mean()), abs=1e-5)
    assert 0 < sum(sum(v) for v in hand.values()) < n  # a mixed outcome, so the counts are informative
    assert list(result.categories) == sorted(hand) + ["all"]
    for tag, outcomes in hand.items():
        stats = result.categories[tag]
        assert (stats.count, stats.correct) == (len(outcomes), sum(outcomes))
        assert stats.accuracy == pytest.approx(sum(outcomes) / len(outcomes))
    assert result.categories["all"].correct == sum(sum(v) for v in hand.values())
    assert "| colors | 4 |" in result.table() and "| **all** | 8 |" in result.table()
    expected = sum(sum(v) / len(v) for v in hand.values()) / len(hand)  # from the hand count
    assert f"Category mean (each category weighted equally): {100 * expected:.1f}%" in result.table()


# ---------------------------------------------------------------------------------------------- seeds and noise


def test_identical_noise_for_base_and_lora_whatever_the_batch_size(adapter, threshold, lora_dir):
    reward = TagBrightness(threshold)
    kw = dict(num_samples=4, num_steps=1, guidance_scale=1.0, seed=11, keep_images=4, progress=False)
    base = evaluate(adapter, RECORDS, reward, batch_size=3, **kw)
    base_other_batching = evaluate(adapter, RECORDS, reward, batch_size=1, **kw)
    aligned = evaluate(adapter, RECORDS, reward, batch_size=4, lora=lora_dir, **kw)
    # the noise of sample i, drawn by hand from its own generator
    expected = torch.stack([adapter.initial_noise(1, torch.Generator().manual_seed(11 + i)).double().sum() for i in range(4)])
    for result in (base, base_other_batching, aligned):
        assert torch.equal(result.noise_fingerprints, expected)
        assert result.seeds == list(range(11, 15))
    # batching never changes a sample (up to float summation order)
    assert torch.allclose(base.images_for(range(4)), base_other_batching.images_for(range(4)), atol=1e-5)
    # the LoRA changes the samples, and is removed again afterwards
    assert (aligned.images_for(range(4)) - base.images_for(range(4))).abs().max() > 1e-3
    after = evaluate(adapter, RECORDS, reward, batch_size=2, **kw)
    assert torch.allclose(after.images_for(range(4)), base.images_for(range(4)), atol=1e-5)
    comparison = compare(base, aligned)
    assert comparison.delta == pytest.approx(aligned.accuracy - base.accuracy)
    assert aligned.settings["lora"] == str(lora_dir)


def test_a_lora_with_text_encoder_keys_is_used_then_removed_everywhere(adapter, threshold, tmp_path):
    """A file written by ``SD3Adapter.save_lora`` with ``text_encoder_states`` (as
    ``lora.train_text_encoder`` runs write it) changes the samples through the text side alone, and
    after the evaluation the base samples come back: its text-encoder LoRA was removed too."""
    pipe = _pipe()
    writer = load_adapter(pipe)
    lora_lib.add_lora(pipe.transformer, rank=4, alpha=8, target_modules=TARGETS)  # left at zero: only the text side moves
    text = {}
    gen = torch.Generator().manual_seed(2)
    for name in ("text_encoder", "text_encoder_2"):
        params = lora_lib.add_lora(getattr(pipe, name), rank=4, alpha=8, target_modules=writer.text_lora_target_modules)
        with torch.no_grad():
            for q in params:
                q.add_(0.5 * torch.randn(q.shape, generator=gen))
        text[name] = (lora_lib.get_lora_state_dict(getattr(pipe, name)), lora_lib.lora_metadata(getattr(pipe, name)))
    writer.save_lora(tmp_path, lora_lib.get_lora_state_dict(pipe.transformer), lora_lib.lora_metadata(pipe.transformer),
                     text_encoder_states=text)
    with pytest.raises(ValueError, match="not 'text_encoder_3'"):
        writer.save_lora(tmp_path / "t5", {}, text_encoder_states={"text_encoder_3": text["text_encoder"]})
    kw = dict(num_samples=4, num_steps=1, guidance_scale=1.0, seed=5, keep_images=4, progress=False)
    base = evaluate(adapter, RECORDS, TagBrightness(threshold), **kw)
    aligned = evaluate(adapter, RECORDS, TagBrightness(threshold), lora=tmp_path, **kw)
    assert (aligned.images_for(range(4)) - base.images_for(range(4))).abs().max() > 1e-3
    after = evaluate(adapter, RECORDS, TagBrightness(threshold), **kw)
    assert torch.allclose(after.images_for(range(4)), base.images_for(range(4)), atol=1e-5)


def test_compare_refuses_different_seeds_and_reports_deltas(adapter, threshold):
    reward = TagBrightness(threshold)
    kw = dict(num_samples=4, num_steps=1, guidance_scale=1.0, progress=False)
    a = evaluate(adapter, RECORDS, reward, seed=0, **kw)
    b = evaluate(adapter, RECORDS, reward, seed=1, **kw)
    with pytest.raises(ValueError, match="prompts or seeds .* first difference at sample 0\\)"):  # same prompts, other seeds
        compare(a, b)
    # a hand-built "aligned" result with every sample correct
    better = EvalResult.from_json(json.loads(a.to_json()))
    better.scores = torch.ones_like(better.scores)
    better.categories = aggregate(better.tags, better.scores, better.partial)
    comparison = compare(a, better)
    for name, row in comparison.rows.items():
        assert row["delta"] == pytest.approx(1.0 - a.categories[name].accuracy)
        assert (row["delta_low"], row["delta_high"]) == pytest.approx(
            newcombe_interval(row["aligned"].correct, row["aligned"].count, row["base"].correct, row["base"].count))
    assert "| **all** | 4 |" in comparison.table() and f"{100 * comparison.delta:+.1f}" in comparison.table()
    better.partial = (a.partial + 0.25).clamp(max=1.0) if a.partial is not None else torch.full_like(a.scores, 0.75)
    better.categories = aggregate(better.tags, better.scores, better.partial)
    for name, row in compare(a, better).rows.items():  # aligned minus base, as delta
        assert row["delta_partial"] == pytest.approx(better.categories[name].mean_partial - a.categories[name].mean_partial)
        assert row["delta_partial"] > 0


def test_json_round_trip_and_image_subset(adapter, threshold, tmp_path):
    result = evaluate(adapter, RECORDS, TagBrightness(threshold), num_samples=5, num_steps=1, guidance_scale=2.0, keep_images=[1, 3], progress=False)
    assert sorted(result.images) == [1, 3] and result.images_for([3, 1]).shape == (2, 3, 32, 32)
    with pytest.raises(KeyError, match="were not kept"):
        result.images_for([0])
    back = EvalResult.from_json(json.loads(result.to_json(tmp_path / "eval.json")))
    assert back.prompts == result.prompts and back.seeds == result.seeds and back.tags == result.tags
    assert torch.equal(back.scores, result.scores) and torch.allclose(back.partial, result.partial)
    assert back.categories["all"] == result.categories["all"]
    assert back.settings["guidance_scale"] == 2.0
    assert EvalResult.from_json(tmp_path / "eval.json").categories.keys() == result.categories.keys()


def test_lora_for_another_architecture_is_refused(tmp_path, lora_dir):
    other = load_adapter(_pipe(num_layers=1))
    with pytest.raises(LoraMismatchError, match="does not fit"):
        evaluate(other, RECORDS, TagBrightness(), num_steps=1, lora=lora_dir, progress=False)


# ---------------------------------------------------------------------------------------------- CLI


def _one_line_error(capsys, argv) -> str:
    from flowalign.train.eval_cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("flowalign eval: error: ")
    return err


def test_cli_errors_exit_2_with_one_line(capsys, tmp_path, lora_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n")
    assert "missing.jsonl: prompt file not found" in _one_line_error(capsys, ["--model", "tiny-sd3", "--prompts", str(tmp_path / "missing.jsonl")])
    assert "unknown reward 'brightnes'" in _one_line_error(capsys, ["--model", "tiny-sd3", "--prompts", str(prompts), "--reward", "brightnes"])
    err = _one_line_error(capsys, ["--model", str(tmp_path / "nomodel"), "--prompts", str(prompts), "--reward", "brightness"])
    assert "is not a local diffusers folder" in err and "--model " in err and "model.pretrained" not in err
    assert "below prompts x samples_per_prompt" in _one_line_error(capsys, ["--model", "tiny-sd3", "--prompts", str(prompts), "--reward", "brightness", "--num-samples", "1"])
    assert "samples_per_prompt must be >= 1, got 0" in _one_line_error(capsys, ["--model", "tiny-sd3", "--prompts", str(prompts), "--reward", "brightness", "--samples-per-prompt", "0"])
    # numbers training refuses too: refused before the model loads (nan crashed after sampling; 0.5 ran as 1)
    base = ["--model", "tiny-sd3", "--prompts", str(prompts), "--reward", "brightness"]
    for flag, value, message in (("--guidance", "nan", "--guidance must be a finite number >= 1"), ("--guidance", "0.5", "got 0.5"),
                                 ("--steps", "0", "--steps must be >= 1"), ("--batch-size", "0", "--batch-size must be >= 1"),
                                 ("--seed", "-1", "--seed must be >= 0")):
        assert message in _one_line_error(capsys, base + [flag, value])
    err = _one_line_error(capsys, base + ["--resolution", "9", "--num-samples", "2", "--no-progress"])
    assert "--resolution 9" in err and "multiples of" in err and "model.resolution" not in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "pytorch_lora_weights.safetensors").write_bytes(b"\x00" * 16)  # e.g. an interrupted copy
    assert "not a readable safetensors LoRA file" in _one_line_error(capsys, ["--model", "tiny-sd3", "--prompts", str(prompts), "--reward", "brightness", "--lora", str(tmp_path / "broken"), "--steps", "1", "--num-samples", "2", "--no-progress"])
    # a LoRA for a 3-layer transformer on the 2-layer tiny-sd3 model
    small = _pipe(num_layers=3)
    params = lora_lib.add_lora(small.transformer, rank=2, alpha=2, target_modules=TARGETS)
    with torch.no_grad():
        params[-1].add_(1.0)
    lora_lib.save_lora_weights(small, tmp_path / "other", lora_lib.get_lora_state_dict(small.transformer))
    err = _one_line_error(capsys, ["--model", "tiny-sd3", "--prompts", str(prompts), "--reward", "brightness", "--lora", str(tmp_path / "other"), "--steps", "1", "--num-samples", "2", "--no-progress"])
    assert "does not fit the model" in err


def test_an_unusable_out_folder_is_refused_before_sampling(capsys, tmp_path, monkeypatch):
    """``--out`` naming a file (or a path under one) failed with a raw FileExistsError after the whole evaluation."""
    from flowalign import evaluation

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in RECORDS[:3]) + "\n")
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("sampled before --out was checked"))
    (tmp_path / "afile").write_text("x")
    base = ["--model", "tiny-sd3", "--prompts", str(prompts), "--reward", "brightness", "--num-samples", "2", "--steps", "1", "--no-progress"]
    assert "--out '" + str(tmp_path / "afile") + "' is a file, not a folder" in _one_line_error(capsys, base + ["--out", str(tmp_path / "afile")])
    err = _one_line_error(capsys, base + ["--out", str(tmp_path / "afile" / "deeper" / "eval")])
    assert f"{tmp_path / 'afile'} is a file, so the folder cannot be made" in err
    assert not (tmp_path / "afile").is_dir()


def test_cli_run_writes_json_and_markdown(capsys, tmp_path):
    from flowalign.train.eval_cli import EvalOptions, main, run_eval

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in RECORDS[:3]) + "\n")
    out = tmp_path / "eval"
    argv = ["--model", "tiny-sd3", "--prompts", str(prompts), "--reward", "brightness", "--num-samples", "4", "--steps", "1",
            "--guidance", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "eval.json").read_text())
    assert data["num_samples"] == 4 and data["samples"]["prompt"][3] == RECORDS[0]["prompt"]
    assert data["categories"]["colors"]["count"] == 2  # samples 0 and 3
    assert "| colors | 2 |" in printed and "| colors | 2 |" in (out / "eval.md").read_text()
    # default count: whole passes over the prompts reaching 512 samples
    from flowalign.train.eval_cli import _counts

    assert _counts(EvalOptions(), 320) == (None, 2) and _counts(EvalOptions(), 600) == (None, 1)
    # run_eval with the dataclass gives the same scores as the CLI
    again = run_eval(EvalOptions(model="tiny-sd3", prompts=str(prompts), reward="brightness", num_samples=4, steps=1, guidance=1.0, progress=False))
    assert again.scores.tolist() == pytest.approx(data["samples"]["score"], abs=1e-6)


def test_cli_compare_sets_an_evaluation_against_an_earlier_one(capsys, tmp_path, lora_dir):
    """--compare: the deltas, and the per-prompt moves, agree with the two eval.json files read independently."""
    from flowalign.train.eval_cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in RECORDS[:3]) + "\n")
    def argv(samples: int = 12, steps: int = 1, reward: str = "brightness") -> list[str]:
        return ["--model", "tiny-sd3", "--prompts", str(prompts), "--reward", reward, "--num-samples", str(samples), "--steps", str(steps),
                "--guidance", "1", "--no-progress"]

    common = argv()
    assert main([*common, "--out", str(tmp_path / "base")]) == 0
    assert main([*common, "--lora", str(lora_dir), "--compare", str(tmp_path / "base"), "--out", str(tmp_path / "lora")]) == 0
    printed = capsys.readouterr().out
    base = json.loads((tmp_path / "base" / "eval.json").read_text())["samples"]
    lora = json.loads((tmp_path / "lora" / "eval.json").read_text())["samples"]
    ok_base = [x >= 0.5 for x in base["score"]]  # brightness gives no verdict: score >= 0.5 counts
    ok_lora = [x >= 0.5 for x in lora["score"]]
    assert base["score"] != lora["score"]  # the LoRA changed the samples
    line = f"Accuracy {100 * sum(ok_base) / 12:.1f}% → {100 * sum(ok_lora) / 12:.1f}% ({100 * (sum(ok_lora) - sum(ok_base)) / 12:+.1f} points"
    assert f"## Against {tmp_path / 'base'}" in printed and line in printed
    md = (tmp_path / "lora" / "eval.md").read_text()
    assert line in md
    assert "(compare.png)" in md and (tmp_path / "lora" / "compare.png").is_file() and not (tmp_path / "base" / "compare.png").exists()
    moved = {}
    for prompt, b, a in zip(base["prompt"], ok_base, ok_lora):
        moved[prompt] = moved.get(prompt, 0) + int(a) - int(b)
    assert ("## Prompts that moved most" in md) == any(moved.values())
    for prompt, delta in moved.items():
        if delta:
            assert f"| {prompt} |" in md and f"| {delta:+d} |" in md
    # refused: other steps, other samples, no eval.json
    err = _one_line_error(capsys, [*argv(steps=2), "--compare", str(tmp_path / "base")])
    assert "num_steps=1" in err and "num_steps=2" in err
    err = _one_line_error(capsys, [*argv(samples=6), "--compare", str(tmp_path / "base" / "eval.json")])
    assert "samples=12" in err and "samples=6" in err
    err = _one_line_error(capsys, [*argv(reward="jpeg_compressibility"), "--compare", str(tmp_path / "base")])  # another scale
    assert "reward=brightness" in err and "reward=jpeg_compressibility" in err
    assert "no eval.json there" in _one_line_error(capsys, [*common, "--compare", str(tmp_path / "nowhere")])
    # the same 12 samples spread 4 per prompt instead of cycling: other prompts at the same indices, refused before sampling
    err = _one_line_error(capsys, [*common, "--samples-per-prompt", "4", "--compare", str(tmp_path / "base"), "--out", str(tmp_path / "spp")])
    assert "samples_per_prompt=4, so the same sample indices hold other prompts" in err and not (tmp_path / "spp").exists()
    # other prompts, same counts: refused before sampling too (it used to sample and write eval.json first)
    prompts.write_text("\n".join(json.dumps(r) for r in RECORDS[1:4]) + "\n")
    err = _one_line_error(capsys, [*common, "--compare", str(tmp_path / "base"), "--out", str(tmp_path / "other")])
    assert f"its sample 0 is {RECORDS[0]['prompt']!r}, this evaluation's is {RECORDS[1]['prompt']!r}" in err
    assert not (tmp_path / "other").exists()
    (tmp_path / "bad.json").write_text("{}")
    assert "is not a flowalign eval.json" in _one_line_error(capsys, [*common, "--compare", str(tmp_path / "bad.json")])


def test_compare_refuses_a_reference_scored_with_other_reward_kwargs_and_warns_when_it_names_none(caplog):
    """The run report's eval_base.json recorded no reward kwargs, so `eval --compare` against it (the report scores
    `shapes` with score: mix, a plain eval with the verdict) was accepted and printed a score change for the same model."""
    from types import SimpleNamespace

    from flowalign.train.eval_cli import check_reference

    reference = SimpleNamespace(settings={"reward": "shapes", "reward_kwargs": {"score": "mix", "partial_weight": 0.5}},
                                num_samples=8, seeds=[0])
    with pytest.raises(ConfigError, match=r"reward_kwargs=\{'score': 'mix', 'partial_weight': 0.5\}, this evaluation with reward_kwargs=\{\}"):
        check_reference(reference, "run/eval_base.json", reward="shapes", reward_kwargs={})
    check_reference(reference, "run/eval_base.json", reward="shapes", reward_kwargs={"score": "mix", "partial_weight": 0.5})
    older = SimpleNamespace(settings={"reward": "shapes"}, num_samples=8, seeds=[0])
    with caplog.at_level(logging.WARNING, logger="flowalign.train.eval_cli"):
        check_reference(older, "old/eval.json", reward="shapes", reward_kwargs={})
    assert "--compare old/eval.json records no reward kwargs" in caplog.text


def test_comparison_markdown_hand_worked():
    """Samples 0-3 are prompts p0, p1, p0, p1: the reference gets sample 0 right, the new evaluation 1, 2 and 3,
    so p0 stays at 1 of 2 and p1 goes 0 -> 2; accuracy 25% -> 75%."""
    from flowalign.evaluation import aggregate
    from flowalign.train.eval_cli import comparison_markdown

    def result(correct: list[int], guidance: float = 4.5) -> EvalResult:
        tags, scores = ["a", "a", "b", "b"], torch.tensor(correct, dtype=torch.float32)
        return EvalResult(prompts=["p0", "p1", "p0", "p1"], tags=tags, seeds=[0, 1, 2, 3], record_index=[0, 1, 0, 1], scores=scores, partial=None,
                          noise_fingerprints=torch.arange(4, dtype=torch.float64), categories=aggregate(tags, scores, None),
                          settings={"num_steps": 10, "guidance_scale": guidance})

    md = comparison_markdown(result([1, 0, 0, 0]), result([0, 1, 1, 1]), "ref")
    assert md.startswith("## Against ref") and "Accuracy 25.0% → 75.0% (+50.0 points" in md
    assert "| p1 | a | 2 | 0 | 2 | +2 |" in md and "| p0 |" not in md
    assert "1 of 2 distinct prompts moved." in md and "report.json" not in md  # eval writes no per-prompt list
    with pytest.raises(ConfigError, match="guidance_scale=4.5, this evaluation with guidance_scale=3.0"):
        comparison_markdown(result([1, 0, 0, 0]), result([0, 1, 1, 1], guidance=3.0), "ref")


class GradedVerifier(Reward):
    """Test reward that trains on a graded score but carries its own verdict: score = brightness,
    details["binary"] = brightness > threshold (the verdict evaluation must count)."""

    name = "graded_verifier"

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def score(self, images, prompts, metadata):
        brightness = images.mean(dim=(1, 2, 3))  # [B], around 0.5 on the tiny pipeline
        return RewardOutput(scores=brightness, details={"binary": (brightness > self.threshold).float(),
                                                        "tag": [m.get("tag", "?") for m in metadata]})


def test_accuracy_counts_the_rewards_own_verdict_not_its_graded_score(adapter, tmp_path):
    """A verifier configured to score a graded value (shapes' score: partial) keeps ``details["binary"]`` as the
    verdict: the accuracy counts it, not score >= 0.5, in the result, its categories, its JSON and correct()."""
    kw = dict(num_samples=8, num_steps=1, guidance_scale=1.0, seed=0, progress=False)
    probe = evaluate(adapter, RECORDS, GradedVerifier(0.0), **kw)
    brightness = probe.scores.double()
    cut = float(brightness.median())  # half the samples pass the verdict, whatever 0.5 would say
    result = evaluate(adapter, RECORDS, GradedVerifier(cut), **kw)
    by_hand = (brightness > cut)
    assert result.verdicts.tolist() == by_hand.float().tolist()
    assert result.accuracy == pytest.approx(float(by_hand.double().mean()))
    assert result.accuracy != pytest.approx(float((brightness >= 0.5).double().mean()))  # not the score threshold
    assert result.correct().tolist() == by_hand.tolist()
    for tag, stats in result.categories.items():
        rows = [i for i, t in enumerate(result.tags) if t == tag or tag == "all"]
        assert stats.correct == int(by_hand[rows].sum())
    assert result.settings["correct_when"] == "details['binary'] == 1"
    back = EvalResult.from_json(json.loads(result.to_json()))
    assert back.verdicts.tolist() == result.verdicts.tolist() and back.correct().tolist() == by_hand.tolist()
    # a reward without a verdict: score >= threshold, as before
    plain = evaluate(adapter, RECORDS, TagBrightness(cut), **kw)
    assert plain.verdicts is None and plain.settings["correct_when"] == "score >= 0.5"
    assert plain.correct().tolist() == (plain.scores >= 0.5).tolist()
    with pytest.raises(ValueError, match="verdicts for"):
        aggregate(result.tags, result.scores, None, verdicts=result.verdicts[:3])


class PickyVerifier(GradedVerifier):
    """GradedVerifier that raises on any batch holding the prompt "a green triangle" (an out-of-grammar prompt)."""

    name = "picky_verifier"

    def score(self, images, prompts, metadata):
        if "a green triangle" in prompts:
            raise ValueError("not in the grammar")
        out = super().score(images, prompts, metadata)
        out.details["failure"] = ["ok" if b else "dim" for b in out.details["binary"].tolist()]
        return out


def test_a_dropped_sample_keeps_the_verdicts_of_the_others(adapter):
    """One failing sample used to make the whole evaluation lose the reward's verdicts (and partials, failure
    labels, tags): the batch is rescored one by one and those samples' details are kept; a batch of dropped
    samples only gives NaN / "dropped" rows."""
    kw = dict(num_samples=8, num_steps=1, guidance_scale=1.0, seed=0, progress=False, on_error="drop")
    cut = float(evaluate(adapter, RECORDS[:3], GradedVerifier(0.0), **{**kw, "on_error": "raise"}).scores.median())
    for batch_size in (4, 1):  # one sample per batch: a batch of the failing prompt is dropped whole
        result = evaluate(adapter, RECORDS, PickyVerifier(cut), batch_size=batch_size, **kw)
        failed = [i for i, p in enumerate(result.prompts) if p == "a green triangle"]
        assert failed == [3, 7] and torch.isnan(result.scores[failed]).all()
        assert result.settings["correct_when"] == "details['binary'] == 1"
        by_hand = [float(result.scores[i]) > cut for i in range(8) if i not in failed]
        assert [bool(result.verdicts[i]) for i in range(8) if i not in failed] == by_hand
        assert result.categories["all"].correct == sum(by_hand) and result.categories["all"].dropped == 2
        assert [result.failures[i] for i in failed] == ["dropped", "dropped"]
        assert result.tags == [r["tag"] for r in RECORDS] * 2  # metadata tags, failed samples included


class NaNScoreVerifier(PickyVerifier):
    """PickyVerifier that returns a NaN score (not an exception) for "a green triangle", keeping its details."""

    def score(self, images, prompts, metadata):
        out = GradedVerifier.score(self, images, prompts, metadata)
        out.details["failure"] = ["ok" if b else "dim" for b in out.details["binary"].tolist()]
        out.scores[[i for i, p in enumerate(prompts) if p == "a green triangle"]] = float("nan")
        return out


def test_a_sample_dropped_for_a_nan_score_is_labelled_dropped_everywhere(adapter):
    """A NaN score under "drop" leaves the sample out of accuracy; its verdict, partial and failure label
    must say so too (it was still counted as "ok" in the failure tables)."""
    kw = dict(num_samples=8, num_steps=1, guidance_scale=1.0, seed=0, progress=False, on_error="drop", batch_size=4)
    cut = float(evaluate(adapter, RECORDS[:3], GradedVerifier(0.0), **{**kw, "on_error": "raise"}).scores.median())
    raised = evaluate(adapter, RECORDS, PickyVerifier(cut), **kw)  # the same samples dropped by an exception
    result = evaluate(adapter, RECORDS, NaNScoreVerifier(cut), **kw)
    failed = [i for i, p in enumerate(result.prompts) if p == "a green triangle"]
    assert failed == [3, 7]
    assert [result.failures[i] for i in failed] == ["dropped", "dropped"] and torch.isnan(result.verdicts[failed]).all()
    assert result.failures == raised.failures and result.categories["all"].correct == raised.categories["all"].correct
    assert result.categories["all"].dropped == 2


def test_eval_samples_with_the_models_recommended_steps_and_guidance(tmp_path):
    """`flowalign eval --model toy` without --steps / --guidance uses the toy's 10 steps and guidance 4.5 (as the
    trainer's report does: the README's eval command gave 33.1% at the old default of 40 steps where report.md says
    39.5%); a folder without recommended settings keeps 40 / 4.5; explicit flags win."""
    from flowalign.train.eval_cli import EvalOptions, _options

    toy = _options({"model": "toy"})
    assert (toy.steps, toy.guidance) == (10, 4.5)
    (tmp_path / "flowalign_toy.json").write_text(json.dumps({"num_inference_steps": 7, "guidance_scale": 2.0}))
    assert (_options({"model": str(tmp_path)}).steps, _options({"model": str(tmp_path)}).guidance) == (7, 2.0)
    assert (_options({"model": "tiny-sd3"}).steps, _options({"model": "tiny-sd3"}).guidance) == (40, 4.5)
    assert (_options(EvalOptions(model="toy", steps=3, guidance=1.0)).steps, _options({"model": "toy", "guidance": 1.0}).guidance) == (3, 1.0)


class _Share(Exception):
    """Carries one process's share out of ``evaluate`` (the test plays every process in turn)."""

    def __init__(self, part):
        super().__init__("share")
        self.part = part


def _shares(adapter, reward, count: int, **kw) -> list:
    """What ``gather`` would return on ``count`` processes: each process's share, computed in turn."""
    def stop(part):
        raise _Share(part)

    parts = []
    for index in range(count):
        with pytest.raises(_Share) as caught:
            evaluate(adapter, RECORDS, reward, shard=(index, count), gather=stop, **kw)
        parts.append(caught.value.part)
    return parts


@pytest.mark.parametrize("count", [2, 3])
def test_an_evaluation_split_over_processes_is_the_single_process_one(adapter, count):
    """Each process samples every count-th sample (the noise of sample i depends on i only), then the shares are
    gathered: every per-sample list, kept image and category equals the one-process evaluation's, also with a
    reward that drops a sample and with a process whose share is a single batch of 1 (7 samples over 3)."""
    kw = dict(num_samples=7, num_steps=1, guidance_scale=1.0, seed=5, progress=False, on_error="drop", batch_size=2,
              keep_images=[0, 4, 5])
    cut = float(evaluate(adapter, RECORDS[:3], GradedVerifier(0.0), **{**kw, "on_error": "raise", "keep_images": 0}).scores.median())
    reward = NaNScoreVerifier(cut)
    one = evaluate(adapter, RECORDS, reward, **kw)
    parts = _shares(adapter, reward, count, **kw)
    assert [p.rows for p in parts] == [list(range(k, 7, count)) for k in range(count)]
    split = evaluate(adapter, RECORDS, reward, shard=(1, count), gather=lambda part: parts, **kw)
    assert split.prompts == one.prompts and split.tags == one.tags and split.seeds == one.seeds
    assert torch.equal(split.noise_fingerprints, one.noise_fingerprints)
    for name in ("scores", "partial", "verdicts"):  # float rounding of other batch compositions: to the ulp or so
        torch.testing.assert_close(getattr(split, name), getattr(one, name), equal_nan=True, rtol=1e-5, atol=1e-6)
    assert split.failures == one.failures and "dropped" in one.failures
    assert sorted(split.images) == [0, 4, 5] and all(torch.allclose(split.images[i], one.images[i], atol=1e-5) for i in (0, 4, 5))
    assert {k: v.correct for k, v in split.categories.items()} == {k: v.correct for k, v in one.categories.items()}
    assert split.categories["all"].dropped == one.categories["all"].dropped == 1


def test_a_split_evaluation_refuses_shares_that_do_not_cover_every_sample_once(adapter):
    kw = dict(num_samples=4, num_steps=1, guidance_scale=1.0, seed=0, progress=False, keep_images=0)
    parts = _shares(adapter, TagBrightness(0.5), 2, **kw)
    with pytest.raises(RuntimeError, match="exactly once"):
        evaluate(adapter, RECORDS, TagBrightness(0.5), shard=(0, 2), gather=lambda part: [parts[0], parts[0]], **kw)
    with pytest.raises(ConfigError, match="needs gather"):
        evaluate(adapter, RECORDS, TagBrightness(0.5), shard=(0, 2), **kw)
    with pytest.raises(ConfigError, match="0 <= index < count"):
        evaluate(adapter, RECORDS, TagBrightness(0.5), shard=(2, 2), gather=lambda part: [part], **kw)


class PromptTagPicky(GradedVerifier):
    """Categories from the reward (details["tag"], from the prompt text), not the metadata; raises the first time it
    sees "a green triangle" only (the record's later samples are scored)."""

    def score(self, images, prompts, metadata):
        if "a green triangle" in prompts and not getattr(self, "raised", False):
            self.raised = True
            raise ValueError("not in the grammar")
        out = super().score(images, prompts, metadata)
        out.details["tag"] = ["colors" if p.startswith(("a red", "a green")) else "other" for p in prompts]
        return out


def test_a_dropped_sample_whose_category_the_reward_names_keeps_its_records_category(adapter):
    """A dropped sample's category came from its (absent) details, so it was filed under a made-up 'untagged' row."""
    kw = dict(num_samples=8, num_steps=1, guidance_scale=1.0, seed=0, progress=False, on_error="drop", batch_size=1)
    plain = [r["prompt"] for r in RECORDS]  # no metadata tags: only the reward names categories
    result = evaluate(adapter, plain, PromptTagPicky(0.5), **kw)
    assert torch.isnan(result.scores[3]) and not torch.isnan(result.scores[7])  # sample 3 dropped, 7 (same record) scored
    assert result.tags == ["colors", "other", "other", "colors"] * 2  # sample 3 takes sample 7's category
    assert "untagged" not in result.categories and result.categories["colors"].dropped == 1
    alone = evaluate(adapter, plain, PromptTagPicky(0.5), **{**kw, "num_samples": 4})  # its record has no other sample
    assert alone.tags[3] == "untagged"


def _tagged_result(tags, correct, failures=None):
    scores = torch.tensor(correct, dtype=torch.float32)
    n = len(tags)
    return EvalResult(prompts=[f"p{i}" for i in range(n)], tags=list(tags), seeds=list(range(n)), record_index=list(range(n)),
                      scores=scores, partial=None, noise_fingerprints=torch.zeros(n, dtype=torch.float64),
                      categories=aggregate(tags, scores, None), settings={"num_steps": 1, "guidance_scale": 1.0}, failures=failures)


def test_compare_refuses_other_categories_and_takes_the_named_one_over_untagged():
    """--compare of evaluations whose prompt files tag the same prompts otherwise lost categories silently."""
    from flowalign.report import failure_section, failure_tables

    base = _tagged_result(["colors", "colors", "counting", "counting"], [1, 0, 1, 0], ["correct", "color", "correct", "count"])
    retagged = _tagged_result(["single", "single", "single", "single"], [1, 0, 1, 0], ["correct", "color", "correct", "count"])
    with pytest.raises(ValueError, match=r"file sample 0 \('p0'\) under other categories \('colors' vs 'single'\)"):
        compare(base, retagged)
    dropped = _tagged_result(["colors", "colors", "counting", "untagged"], [1, 1, 1, float("nan")],
                             ["correct", "correct", "correct", "dropped"])
    rows = compare(base, dropped).rows
    assert set(rows) == {"colors", "counting", "all"}
    # the sample the aligned run dropped is left out of both sides (compared on the jointly scored samples)
    assert (rows["counting"]["base"].count, rows["counting"]["aligned"].count, rows["counting"]["aligned"].dropped) == (1, 1, 1)
    lines = "\n".join(failure_section(failure_tables(base, dropped)))
    assert "| counting | 1 → 1 |" in lines and "untagged" not in lines


def test_a_category_named_all_is_refused():
    """A tag 'all' overwrote the overall row (category mean 0.0 instead of 0.5) and was counted twice in failure tables."""
    with pytest.raises(ValueError, match="'all', the name of the overall row"):
        aggregate(["all", "all", "x"], torch.tensor([1.0, 1.0, 0.0]), None)
    with pytest.raises(ConfigError, match="'all', the name of the overall row"):
        evaluate(None, [{"prompt": "a red square", "tag": "all"}], TagBrightness(), num_samples=1, num_steps=1)


def test_the_reports_category_mean_compares_the_categories_both_runs_scored():
    from flowalign.evaluation import common_categories

    base = _tagged_result(["a", "a", "b", "b"], [1, 1, 0, 0])
    aligned = _tagged_result(["a", "a", "b", "b"], [1, 1, float("nan"), float("nan")])  # b all dropped
    both = common_categories(base.categories, aligned.categories)
    assert both == ["a"]
    assert category_mean(base.categories, both) == category_mean(aligned.categories, both) == 1.0
    assert category_mean(base.categories) == 0.5  # without the common set: an average over other categories


# ----------------------------------------------------------------------------------------------
# A killed evaluation resumes from its journal (flowalign.eval_journal)
# ----------------------------------------------------------------------------------------------


class _Killed(BaseException):  # as KeyboardInterrupt: not a reward failure call_reward would report
    pass


class CountingVerifier(GradedVerifier):
    """GradedVerifier with a per-sample quality detail that counts the samples it scored and, with ``kill_after``,
    dies (as a killed process would stop) on the batch that would take it past that many samples."""

    def __init__(self, threshold: float, kill_after: int = 10**9):
        super().__init__(threshold)
        self.kill_after, self.scored = kill_after, 0

    def score(self, images, prompts, metadata):
        if self.scored + len(prompts) > self.kill_after:
            raise _Killed()
        self.scored += len(prompts)
        out = super().score(images, prompts, metadata)
        out.details["partial"] = images.mean(dim=(1, 2, 3))
        out.details["failure"] = ["correct" if b else "dark" for b in out.details["binary"].tolist()]
        out.details["quality"] = images.std(dim=(1, 2, 3))
        return out


def _journal_kw(**extra):
    return dict(num_samples=10, num_steps=1, guidance_scale=1.0, seed=4, progress=False, batch_size=3, keep_images=[1, 7],
                extra_details=("quality",), **extra)


def test_a_killed_evaluation_resumes_from_its_journal_with_the_uninterrupted_result(adapter, tmp_path, threshold):
    """Every scored batch is on disk at once; the rerun reads them back, samples only the rest and returns what
    one uninterrupted evaluation returns: scores, verdicts, partial, failures, tags, kept images and extra details."""
    from flowalign.eval_journal import EvalJournal

    whole = evaluate(adapter, RECORDS, CountingVerifier(threshold), **_journal_kw())
    key = {"model": "tiny", "steps": 1}
    with pytest.raises(_Killed):  # dies on the 3rd batch (samples 6..8), after 6 samples
        evaluate(adapter, RECORDS, CountingVerifier(threshold, kill_after=7), journal=EvalJournal(tmp_path / "j", key), **_journal_kw())
    files = sorted(p.name for p in (tmp_path / "j").iterdir())
    assert files == ["share0of1_rows0000000.safetensors", "share0of1_rows0000003.safetensors"]
    again = CountingVerifier(threshold)
    resumed = evaluate(adapter, RECORDS, again, journal=EvalJournal(tmp_path / "j", key), **_journal_kw())
    assert again.scored == 4  # samples 6..9 only
    assert resumed.settings["resumed_samples"] == 6 and whole.settings["resumed_samples"] == 0
    assert resumed.scores.tolist() == whole.scores.tolist() and resumed.verdicts.tolist() == whole.verdicts.tolist()
    assert resumed.partial.tolist() == whole.partial.tolist() and resumed.failures == whole.failures
    assert resumed.tags == whole.tags and resumed.noise_fingerprints.tolist() == whole.noise_fingerprints.tolist()
    assert resumed.extra["quality"].tolist() == whole.extra["quality"].tolist() and whole.extra["quality"].shape == (10,)
    assert sorted(resumed.images) == [1, 7] and torch.equal(resumed.images[1], whole.images[1])  # 1 from disk, 7 sampled
    assert torch.equal(resumed.images[7], whole.images[7])
    assert resumed.categories["all"].correct == whole.categories["all"].correct
    assert 0 < whole.categories["all"].correct < 10  # a mixed outcome, so a wrong row would show
    back = EvalResult.from_json(json.loads(resumed.to_json()))
    assert back.extra["quality"].tolist() == resumed.extra["quality"].tolist()
    # batches cut differently (another batch size) are joined from the journaled samples, each row its own
    other = CountingVerifier(threshold)
    recut = evaluate(adapter, RECORDS, other, journal=EvalJournal(tmp_path / "j", key), **{**_journal_kw(), "batch_size": 2})
    assert other.scored == 0 and recut.settings["resumed_samples"] == 10
    assert recut.scores.tolist() == whole.scores.tolist() and recut.failures == whole.failures and recut.tags == whole.tags
    assert recut.extra["quality"].tolist() == whole.extra["quality"].tolist() and torch.equal(recut.images[7], whole.images[7])


def test_a_journal_of_other_settings_is_refused_and_restart_discards_it(adapter, tmp_path, threshold):
    from flowalign.eval_journal import EvalJournal

    with pytest.raises(_Killed):
        evaluate(adapter, RECORDS, CountingVerifier(threshold, kill_after=4), journal=EvalJournal(tmp_path / "j", {"steps": 1}),
                 **_journal_kw())
    with pytest.raises(ConfigError, match=r"other settings \(steps 1 -> 2\); pass --restart"):
        evaluate(adapter, RECORDS, CountingVerifier(threshold), journal=EvalJournal(tmp_path / "j", {"steps": 2}), **_journal_kw())
    fresh = CountingVerifier(threshold)
    evaluate(adapter, RECORDS, fresh, journal=EvalJournal(tmp_path / "j", {"steps": 2}, restart=True), **_journal_kw())
    assert fresh.scored == 10  # nothing read back
    # a truncated batch file is named, not half-read
    path = tmp_path / "j" / "share0of1_rows0000003.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ConfigError, match="share0of1_rows0000003.safetensors is not a readable evaluation batch"):
        EvalJournal(tmp_path / "j", {"steps": 2}).load()
    # a launch with another process count reads every share's files (the truncated one is still named)
    with pytest.raises(ConfigError, match="share0of1_rows0000003.safetensors is not a readable evaluation batch"):
        EvalJournal(tmp_path / "j", {"steps": 2}, share=(1, 2)).load()
    path.unlink()
    assert sorted(EvalJournal(tmp_path / "j", {"steps": 2}, share=(1, 2)).load()) == [0, 6, 9]


def test_a_journaled_batch_drawn_from_other_noise_is_refused(adapter, tmp_path, threshold):
    """Same key, but the model draws other initial noise for the seeds (here: another resolution): refused."""
    from flowalign.eval_journal import EvalJournal

    evaluate(adapter, RECORDS, CountingVerifier(threshold), journal=EvalJournal(tmp_path / "j", {}), **_journal_kw())
    bigger = load_adapter(_pipe(sample_size=24))
    assert bigger.initial_noise(1, torch.Generator().manual_seed(0)).shape != adapter.initial_noise(1, torch.Generator().manual_seed(0)).shape
    with pytest.raises(ConfigError, match="drawn from other initial noise"):
        evaluate(bigger, RECORDS, CountingVerifier(threshold), journal=EvalJournal(tmp_path / "j", {}), **_journal_kw())


def test_eval_cli_resumes_a_killed_evaluation_and_removes_its_journal_when_done(tmp_path, monkeypatch, capsys):
    """``flowalign eval --out``: the batches of a killed run are read back (the reward scores the rest only), the
    result equals an uninterrupted run's, ``eval_partial`` is gone once ``eval.json`` is written, and another
    ``--steps`` is refused unless ``--restart``."""
    from flowalign.train.eval_cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    calls = []
    import flowalign.rewards as rewards_mod

    real = rewards_mod.call_reward_batched  # what evaluation scores through (the reward's own batch_size)

    def counting(reward, images, prompts, *a, **k):
        if len(calls) == int(os.environ.get("KILL_AT_CALL", "-1")):
            raise _Killed()
        calls.append(len(prompts))
        return real(reward, images, prompts, *a, **k)

    monkeypatch.setattr(rewards_mod, "call_reward_batched", counting)
    argv = ["--model", "tiny-sd3", "--prompts", str(prompts), "--reward", "brightness", "--num-samples", "10", "--steps", "1",
            "--guidance", "1", "--batch-size", "4", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "eval.json").read_text())
    assert not (tmp_path / "whole" / "eval_partial").exists()
    calls.clear()
    monkeypatch.setenv("KILL_AT_CALL", "2")
    with pytest.raises(_Killed):
        main([*argv, "--out", str(tmp_path / "cut")])
    assert len(list((tmp_path / "cut" / "eval_partial").glob("*.safetensors"))) == 2 and not (tmp_path / "cut" / "eval.json").exists()
    monkeypatch.delenv("KILL_AT_CALL")
    calls.clear()
    capsys.readouterr()
    assert main([*argv, "--steps", "2", "--out", str(tmp_path / "cut")]) == 2
    assert "holds a partial evaluation with other settings (steps 1 -> 2)" in " ".join(capsys.readouterr().err.split())
    assert calls == []
    assert main([*argv, "--out", str(tmp_path / "cut")]) == 0
    assert calls == [2]  # samples 8 and 9
    cut = json.loads((tmp_path / "cut" / "eval.json").read_text())
    assert cut["samples"]["score"] == whole["samples"]["score"] and cut["settings"]["resumed_samples"] == 8
    assert not (tmp_path / "cut" / "eval_partial").exists()
    calls.clear()
    monkeypatch.setenv("KILL_AT_CALL", "1")
    with pytest.raises(_Killed):
        main([*argv, "--out", str(tmp_path / "again")])
    monkeypatch.delenv("KILL_AT_CALL")
    calls.clear()
    assert main([*argv, "--restart", "--out", str(tmp_path / "again")]) == 0
    assert calls == [4, 4, 2]  # --restart: every batch sampled again
    # the usual reruns after a crash change --on-error or --batch-size: neither is refused
    for flags, expect, resumed in ((["--on-error", "drop"], [2], 8), (["--batch-size", "2"], [2], 8)):
        calls.clear()
        monkeypatch.setenv("KILL_AT_CALL", "2")
        with pytest.raises(_Killed):
            main([*argv, "--out", str(tmp_path / flags[0])])
        monkeypatch.delenv("KILL_AT_CALL")
        calls.clear()
        assert main([*argv, *flags, "--out", str(tmp_path / flags[0])]) == 0
        assert calls == expect  # --batch-size 2: the 8 journaled samples joined into batches of 2, samples 8 and 9 sampled
        done = json.loads((tmp_path / flags[0] / "eval.json").read_text())
        assert done["settings"]["resumed_samples"] == resumed
        assert done["samples"]["score"] == pytest.approx(whole["samples"]["score"], abs=1e-6)  # another batch size: float rounding


def test_a_journal_resumes_under_another_on_error_and_batch_size_where_the_samples_are_the_same(adapter, tmp_path, threshold):
    """A journal written under on_error="drop" is read back under "drop"; under "raise" its batches with a dropped
    sample are scored again (and raise), the others are read back. Another batch size reads back nothing (no batch
    holds the same sample indices) joins the journaled samples into its batches. A batch whose kept images are not
    journaled is sampled again."""
    from flowalign.eval_journal import EvalJournal
    from flowalign.errors import RewardError

    kw = dict(num_samples=8, num_steps=1, guidance_scale=1.0, seed=0, progress=False, batch_size=2, keep_images=0)
    cut = float(evaluate(adapter, RECORDS[:3], GradedVerifier(0.0), **{**kw, "on_error": "raise"}).scores.median())
    dropped = evaluate(adapter, RECORDS, PickyVerifier(cut), on_error="drop", journal=EvalJournal(tmp_path / "j", {}), **kw)
    assert [i for i, f in enumerate(dropped.failures) if f == "dropped"] == [3, 7]
    again = evaluate(adapter, RECORDS, PickyVerifier(cut), on_error="drop", journal=EvalJournal(tmp_path / "j", {}), **kw)
    assert again.settings["resumed_samples"] == 8 and again.failures == dropped.failures
    seen = []

    class Watching(PickyVerifier):
        def score(self, images, prompts, metadata):
            seen.extend(prompts)
            return super().score(images, prompts, metadata)

    with pytest.raises(RewardError, match="not in the grammar"):  # batches (2, 3) and (6, 7) hold a drop: scored again
        evaluate(adapter, RECORDS, Watching(cut), on_error="raise", journal=EvalJournal(tmp_path / "j", {}), **kw)
    assert set(seen) == {RECORDS[2]["prompt"], RECORDS[3]["prompt"]}  # samples 0, 1 were read back; 2, 3 scored (and raise)
    kept = evaluate(adapter, RECORDS, PickyVerifier(cut), on_error="drop", journal=EvalJournal(tmp_path / "j", {}),
                    **{**kw, "keep_images": [5]})  # batch (4, 5) was journaled without images
    assert kept.settings["resumed_samples"] == 6 and sorted(kept.images) == [5]
    other = evaluate(adapter, RECORDS, PickyVerifier(cut), on_error="drop", journal=EvalJournal(tmp_path / "j", {}),
                     **{**kw, "batch_size": 4})  # every sample is journaled: joined into batches of 4
    assert other.settings["resumed_samples"] == 8 and other.failures == dropped.failures
    assert other.scores.tolist()[:3] == dropped.scores.tolist()[:3]


def test_resumed_samples_counts_every_processes_share(adapter, tmp_path, threshold):
    """Each process journals and reads back its own share; the merged result counts every process's resumed samples
    (the main process wrote its own share's count as the total)."""
    from flowalign.eval_journal import EvalJournal

    kw = dict(num_samples=8, num_steps=1, guidance_scale=1.0, seed=0, progress=False, batch_size=2, keep_images=0)

    def shares() -> list:
        parts = []
        for k in range(2):
            with pytest.raises(_Share) as caught:
                evaluate(adapter, RECORDS, GradedVerifier(threshold), shard=(k, 2), gather=_stop,
                         journal=EvalJournal(tmp_path / "j", {}, share=(k, 2)), **kw)
            parts.append(caught.value.part)
        return parts

    assert [p.resumed for p in shares()] == [0, 0]
    again = shares()
    merged = evaluate(adapter, RECORDS, GradedVerifier(threshold), shard=(0, 2), gather=lambda part: again,
                      journal=EvalJournal(tmp_path / "j", {}, share=(0, 2)), **kw)
    assert [p.resumed for p in again] == [4, 4] and merged.settings["resumed_samples"] == 8  # not this process's 4


def _stop(part):
    raise _Share(part)


def test_an_evaluation_killed_on_two_processes_resumes_on_one(adapter, tmp_path, threshold):
    """Each process journals its own share (every other sample); a rerun with one process used to read only
    share0of1 files and sampled everything again. It now takes back every journaled sample, scores only the rest,
    and returns what one uninterrupted evaluation returns."""
    from flowalign.eval_journal import EvalJournal

    kw = _journal_kw()
    whole = evaluate(adapter, RECORDS, CountingVerifier(threshold), **kw)
    for k, kill_after in ((0, 3), (1, 5)):  # share 0 journals rows 0, 2, 4 then dies; share 1 rows 1, 3, 5, 7, 9 (all)
        with pytest.raises((_Killed, _Share)):
            evaluate(adapter, RECORDS, CountingVerifier(threshold, kill_after=kill_after), shard=(k, 2), gather=_stop,
                     journal=EvalJournal(tmp_path / "j", {}, share=(k, 2)), **kw)
    one = CountingVerifier(threshold)
    resumed = evaluate(adapter, RECORDS, one, journal=EvalJournal(tmp_path / "j", {}), **kw)
    # batches of 3: (0, 1, 2) and (3, 4, 5) are all journaled; (6, 7, 8) lacks 6 and 8, and 9 alone is journaled
    assert one.scored == 3 and resumed.settings["resumed_samples"] == 7
    # the samples of other batches than a one-process run's agree with it up to the batch's float rounding
    assert resumed.verdicts.tolist() == whole.verdicts.tolist() and resumed.failures == whole.failures
    assert resumed.scores.tolist() == pytest.approx(whole.scores.tolist(), abs=1e-6)
    assert resumed.extra["quality"].tolist() == pytest.approx(whole.extra["quality"].tolist(), abs=1e-6)
    assert sorted(resumed.images) == [1, 7] and torch.allclose(resumed.images[1], whole.images[1], atol=1e-6)
    # --restart on one process clears the two-process launch's files too (they were left, and refused every resume after)
    for k in range(2):
        with pytest.raises((_Killed, _Share)):
            evaluate(adapter, RECORDS, CountingVerifier(threshold, kill_after=3), shard=(k, 2), gather=_stop,
                     journal=EvalJournal(tmp_path / "k", {"steps": 1}, share=(k, 2)), **kw)
    with pytest.raises(_Killed):
        evaluate(adapter, RECORDS, CountingVerifier(threshold, kill_after=3), journal=EvalJournal(tmp_path / "k", {"steps": 2}, restart=True),
                 **kw)
    assert sorted(p.name[:9] for p in (tmp_path / "k").iterdir()) == ["share0of1"]
    again = CountingVerifier(threshold)
    evaluate(adapter, RECORDS, again, journal=EvalJournal(tmp_path / "k", {"steps": 2}), **kw)
    assert again.scored == 7  # the restarted run's first batch came back


def test_the_model_signature_names_files_by_content_and_hub_blobs_by_their_hash(tmp_path):
    """The toy read from the repo and from a copy (other mtimes) is the same model; a changed file is not; a hub
    cache's file is named by its blob (the content hash the hub gives it); an uncached hub id gives {}."""
    import shutil

    from flowalign.train.model import model_files_signature

    toy = model_files_signature("toy")
    copy = tmp_path / "toy"
    shutil.copytree(model_files_signature.__globals__["resolve_path"]("assets/toy"), copy, copy_function=shutil.copyfile)
    assert model_files_signature(str(copy)) == toy and "model_index.json" in toy
    (copy / "model_index.json").write_text((copy / "model_index.json").read_text() + " ")
    assert model_files_signature(str(copy)) != toy
    blob = tmp_path / "hub" / "blobs" / "0123abcd"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"weights")
    snap = tmp_path / "hub" / "snapshots" / "c0ffee"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blob)
    assert model_files_signature(str(snap)) == {"model.safetensors": [7, "0123abcd"]}
    assert model_files_signature("no-such-owner/no-such-model-xyz") == {}


def test_a_journal_only_one_process_refuses_fails_every_process_at_the_gather(adapter, tmp_path, threshold):
    """The refusing process raised alone, before the gather, and the others waited in it until the process group
    timed out. It now samples nothing, still reaches the gather, and every process raises its message there."""
    from flowalign.eval_journal import EvalJournal

    kw = dict(num_samples=8, num_steps=1, guidance_scale=1.0, seed=0, progress=False, batch_size=2, keep_images=0)
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "share0of2_rows0000000.safetensors").write_bytes(b"not a batch")
    gathered = []

    def gather_as(k):
        def gather(part):
            gathered.append((k, part.rows))
            raise _Share(part)
        return gather

    parts = []
    for k in range(2):
        with pytest.raises(_Share) as caught:
            evaluate(adapter, RECORDS, GradedVerifier(threshold), shard=(k, 2), gather=gather_as(k),
                     journal=EvalJournal(tmp_path / "j", {}, share=(k, 2)), **kw)
        parts.append(caught.value.part)
    assert gathered == [(0, []), (1, [])]  # every process reads every share's files: both reached the gather without sampling
    for k in range(2):
        with pytest.raises(ConfigError, match="share0of2_rows0000000.safetensors is not a readable evaluation batch"):
            evaluate(adapter, RECORDS, GradedVerifier(threshold), shard=(k, 2), gather=lambda part: parts,
                     journal=EvalJournal(tmp_path / "j", {}, share=(k, 2)), **kw)
    with pytest.raises(ConfigError, match="is not a readable evaluation batch"):  # one process: raised at once, as before
        evaluate(adapter, RECORDS, GradedVerifier(threshold), journal=EvalJournal(tmp_path / "j", {}, share=(0, 2)), **kw)


def test_an_eval_into_a_run_folder_leaves_the_reports_journal_alone(tmp_path):
    """`flowalign eval --out RUN` removed RUN/eval_partial when it ended, which held the killed report's batches too."""
    from flowalign.train.eval_cli import main
    from flowalign.train.final_outputs import REPORT_JOURNALS

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    run = tmp_path / "run"
    kept = run / REPORT_JOURNALS / "base" / "share0of1_rows0000000.safetensors"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"a report batch")
    assert main(["--model", "tiny-sd3", "--prompts", str(prompts), "--reward", "brightness", "--num-samples", "4", "--steps", "1",
                 "--guidance", "1", "--no-progress", "--out", str(run)]) == 0
    assert kept.read_bytes() == b"a report batch" and (run / "eval.json").is_file() and not (run / "eval_partial").exists()


def test_eval_reports_a_full_disk_in_one_line_with_what_it_kept(tmp_path, monkeypatch, capsys):
    """Only bad input was one line; a disk that filled up printed a traceback (train, offline and generate catch it)."""
    import errno

    from flowalign.eval_journal import EvalJournal
    from flowalign.train.eval_cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    real, saved = EvalJournal.save, []

    def filling(self, batch):
        if saved:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.folder / "x.safetensors"))
        saved.append(batch.rows)
        return real(self, batch)

    monkeypatch.setattr(EvalJournal, "save", filling)
    status = main(["--model", "tiny-sd3", "--prompts", str(prompts), "--reward", "brightness", "--num-samples", "8", "--steps", "1",
                   "--guidance", "1", "--batch-size", "4", "--no-progress", "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err.strip()
    assert status == 1 and "\n" not in err and "Traceback" not in err
    assert err.startswith("flowalign eval: error: could not read or write ") and "No space left on device (errno 28)" in err
    assert err.endswith(f"rerun the same command to go on from the batches scored in {tmp_path / 'ev' / 'eval_partial'}")
    assert len(list((tmp_path / "ev" / "eval_partial").glob("*.safetensors"))) == 1


def test_compare_gives_the_paired_score_change_a_continuous_reward_moves(adapter):
    """A reward without a verdict whose scores stay under 0.5 read "accuracy 0% -> 0% (+0.0)" in the comparison and the
    report; the mean of the paired score differences (and its interval) is what moved. Checked by hand, dropped samples
    left out of the pairs."""
    from flowalign.evaluation import mean_interval

    kw = dict(num_samples=8, num_steps=1, guidance_scale=1.0, seed=0, progress=False)
    base = evaluate(adapter, RECORDS, TagBrightness(2.0), **kw)  # brightness never > 2: every score 0
    base.scores = torch.linspace(0.05, 0.4, 8)
    base.categories = aggregate(base.tags, base.scores, base.partial)
    aligned = EvalResult.from_json(json.loads(base.to_json()))
    aligned.scores = base.scores + torch.tensor([0.02, 0.04, 0.01, 0.03, 0.05, 0.02, float("nan"), 0.01])
    aligned.categories = aggregate(aligned.tags, aligned.scores, aligned.partial)
    rows = compare(base, aligned).rows
    assert rows["all"]["delta"] == 0.0 and rows["all"]["aligned"].accuracy == 0.0
    by_hand = [0.02, 0.04, 0.01, 0.03, 0.05, 0.02, 0.01]  # sample 6 was dropped by the aligned evaluation
    mean = sum(by_hand) / 7
    half = 1.959963984540054 * (sum((d - mean) ** 2 for d in by_hand) / 6) ** 0.5 / 7 ** 0.5
    assert rows["all"]["delta_score"] == pytest.approx(mean, abs=1e-6)
    assert (rows["all"]["delta_score_low"], rows["all"]["delta_score_high"]) == pytest.approx((mean - half, mean + half), abs=1e-6)
    colors = [i for i, t in enumerate(base.tags) if t == "colors" and i != 6]
    assert rows["colors"]["delta_score"] == pytest.approx(sum(by_hand[i if i < 6 else i - 1] for i in colors) / len(colors), abs=1e-6)
    assert rows["colors"]["delta_score"] == pytest.approx(mean_interval(torch.tensor([by_hand[i if i < 6 else i - 1] for i in colors]))[0])
    table = compare(base, aligned).table()
    assert "| base score | aligned score | Δ score [95% CI] |" in table and f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]" in table


def test_min_accuracy_gates_the_exit_status_after_everything_is_written(capsys, tmp_path):
    """`flowalign eval --min-accuracy A`: a CI job or a sweep can stop on a model below A without parsing eval.json."""
    from flowalign.train import cli

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n")
    base = ["eval", "--model", "tiny-sd3", "--prompts", str(prompts), "--reward", "brightness", "--num-samples", "4",
            "--steps", "2", "--no-progress"]
    assert cli.main(base + ["--out", str(tmp_path / "low"), "--min-accuracy", "0"]) == 0
    overall = json.loads((tmp_path / "low" / "eval.json").read_text())["categories"]["all"]
    assert overall["accuracy"] < 0.5  # brightness of the random tiny model: below its threshold
    capsys.readouterr()
    assert cli.main(base + ["--out", str(tmp_path / "high"), "--min-accuracy", "0.5"]) == 3
    captured = capsys.readouterr()
    assert (f"accuracy {overall['accuracy']:.4f} ({overall['correct']}/{overall['count']}) is below --min-accuracy 0.5"
            in captured.err)
    assert (tmp_path / "high" / "eval.json").is_file() and "all" in captured.out  # the table printed, the files written
    assert cli.main(base + ["--min-accuracy", str(overall["accuracy"])]) == 0  # at the threshold passes
    capsys.readouterr()
    assert cli.main(base + ["--min-accuracy", "1.5"]) == 2
    assert "--min-accuracy must be a fraction in [0, 1], got 1.5" in capsys.readouterr().err


def test_a_comparison_across_reward_versions_is_flagged():
    """The shapes verifier's fix changed its verdicts; `eval --compare` of an evaluation from before it read +6 points
    for the same LoRA, prompts and seeds, without a word."""
    from flowalign.rewards import load_reward
    from flowalign.train.eval_cli import reward_version_note

    assert load_reward("shapes").version == "2"
    now = {"reward": "shapes", "reward_version": "2"}
    assert reward_version_note({"reward": "shapes", "reward_version": "2"}, now) == ""
    assert "records no version of reward 'shapes'" in reward_version_note({"reward": "shapes"}, now)
    assert "scored with version '1' of reward 'shapes', this evaluation with '2'" in reward_version_note(
        {"reward": "shapes", "reward_version": "1"}, now)
    assert reward_version_note({"reward": "brightness"}, {"reward": "brightness", "reward_version": None}) == ""


def test_reward_versions_reach_the_journal_key_and_the_corrected_tap():
    """A resumed evaluation read back batches scored under another version of the reward; --corrected-by's wrapper
    recorded no version, so a comparison called it one written before versions existed."""
    from flowalign.corrected import QualityTap
    from flowalign.report import _short_commit
    from flowalign.rewards import load_reward
    from flowalign.train.eval_cli import EvalOptions, journal_key

    options = EvalOptions(model="tiny-sd3", steps=2, guidance=1.0)
    plain = journal_key(options, [], {}, "cpu")
    assert "reward_version" not in plain  # a reward without a version: the key of before
    assert journal_key(options, [], {}, "cpu", "2") == {**plain, "reward_version": "2"}
    assert QualityTap(load_reward("shapes"), load_reward("brightness")).version == "2"
    assert _short_commit("0123456789abcdef-dirty") == "0123456789ab-dirty" and _short_commit("0123456789abcdef") == "0123456789ab"
