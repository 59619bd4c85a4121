"""Run report: report.md rows and headline, report.json / eval_*.json, metrics summary, before/after grid."""
from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign.evaluation import EvalResult, aggregate, wilson_interval
from flowalign.report import CAPTION_LINES, LABEL_WIDTH, LINE_HEIGHT, PAD, before_after_grid, summarize_metrics, write_report

TAGS = ["colors"] * 4 + ["counting"] * 4 + ["position"] * 2


def _result(correct: list[int], partial: list[float]) -> EvalResult:
    n = len(correct)
    scores = torch.tensor(correct, dtype=torch.float32)
    part = torch.tensor(partial, dtype=torch.float32)
    return EvalResult(
        prompts=[f"prompt {i % 5}" for i in range(n)], tags=list(TAGS), seeds=list(range(n)), record_index=[i % 5 for i in range(n)],
        scores=scores, partial=part, noise_fingerprints=torch.arange(n, dtype=torch.float64),
        categories=aggregate(TAGS, scores, part),
        settings={"num_samples": n, "samples_per_prompt": 2, "num_prompts": 5, "num_steps": 40, "guidance_scale": 4.5,
                  "prompts_file": "assets/prompts/shapes_heldout.jsonl"},
    )


CONFIG = {
    "model": {"pretrained": "toy", "dtype": "float32"},
    "sampling": {"kernel": "flow_sde", "noise_schedule": "constant", "noise_kwargs": {"a": 0.7}, "num_steps": 10, "group_size": 8},
    "rewards": [{"name": "shapes", "weight": 1.0}],
    "lora": {"rank": 16},
    "objective": {"name": "grpo"},
    "train": {"iterations": 60, "lr": 3e-4, "seed": 0},
}


def _write_metrics(path):
    rows = [{"iteration": i, "reward/shapes/mean": 0.1 * i, "reward/shapes/std": 0.2, "frac_zero_std_groups": 1.0 - 0.1 * i, "loss": 1.0}
            for i in range(10)]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_report_holds_the_table_rows_headline_and_json(tmp_path):
    # base: colors 1/4, counting 0/4, position 1/2 -> 2/10; aligned: 3/4, 2/4, 2/2 -> 7/10
    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5, 0.2, 0.3, 0.4, 0.1, 0.1, 0.2, 0.2, 0.9, 0.3])
    aligned = _result([1, 1, 1, 0, 1, 1, 0, 0, 1, 1], [0.9, 0.8, 0.9, 0.4, 0.7, 0.6, 0.3, 0.2, 1.0, 0.8])
    _write_metrics(tmp_path / "metrics.csv")
    (tmp_path / "before_after.png").write_bytes(b"png")
    timings = {"base eval": 30.0, "train": 1500.0, "aligned eval": 31.0}
    path = write_report(tmp_path, base=base, aligned=aligned, config_dict=CONFIG, timings=timings, command="flowalign train",
                        target_gain_points=15)
    text = path.read_text()
    assert path == tmp_path / "report.md"
    lo, hi = wilson_interval(3, 4)
    assert f"| colors | 4 | 25.0% {_ci(wilson_interval(1, 4))} | 75.0% {_ci((lo, hi))} | +50.0 " in text
    assert "| counting | 4 | 0.0% [0.0, 49.0] | 50.0% " in text
    assert "| position | 2 | 50.0% " in text and "| 100.0% " in text
    assert "| **all** | 10 | 20.0% " in text
    assert "20.0% → 70.0%" in text and "+50.0 points" in text and "**met**" in text
    assert "**met** by the point estimate (its 95% CI reaches down to " in text  # 10 samples: a wide interval
    # category mean: base (1/4 + 0/4 + 1/2) / 3 = 25%, aligned (3/4 + 2/4 + 2/2) / 3 = 75%
    assert "Category mean (each category weighted equally, GenEval's overall score): 25.0% → 75.0% (+50.0 points)" in text
    assert "`flowalign train`" in text and "`grpo`" in text and "`toy`" in text and "`shapes` × 1.0" in text
    assert "| train | 25.0 min |" in text and "| base eval | 30.0 s |" in text and "| **total** | 26.0 min |" in text
    assert "![before / after (same prompts and seeds)](before_after.png)" in text
    assert "`reward_curve.png` not written" in text
    # training curve: first 10% (1 row) = 0.0, last 10% = 0.9 of reward/shapes/mean
    assert "| reward/shapes/mean | 10 | 0 | 0.9 | 0 | 0.9 |" in text
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["gain_points"] == pytest.approx(50.0) and summary["target_met"] is True
    assert summary["accuracy_base"] == pytest.approx(0.2) and summary["accuracy_aligned"] == pytest.approx(0.7)
    assert summary["category_mean_base"] == pytest.approx(0.25) and summary["category_mean_aligned"] == pytest.approx(0.75)
    assert summary["comparison"]["counting"]["delta"] == pytest.approx(0.5)
    back = EvalResult.from_json(tmp_path / "eval_aligned.json")
    assert back.categories["all"].correct == 7 and back.seeds == aligned.seeds


def test_report_says_when_the_target_is_missed(tmp_path):
    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    aligned = _result([1, 1, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)  # +10 points
    text = write_report(tmp_path, base=base, aligned=aligned, config_dict=CONFIG, timings={"train": 1.0}, target_gain_points=15).read_text()
    assert "+10.0 points" in text and "target ≥ +15 points: **NOT met**" in text and "(no metrics.csv)" in text
    assert "**NOT met** by the point estimate (its 95% CI reaches up to " in text
    # without a target (train.report_target_points unset, any run but the toy's): no verdict, no line
    text = write_report(tmp_path, base=base, aligned=aligned, config_dict=CONFIG, timings={"train": 1.0}).read_text()
    assert "+10.0 points**, 95% CI" in text and "target" not in text and "met**" not in text
    assert json.loads((tmp_path / "report.json").read_text())["target_met"] is None
    assert "LoRA rank 16, " in text  # transformer only
    both = dict(CONFIG, lora={"rank": 8, "train_text_encoder": True})
    text = write_report(tmp_path, base=base, aligned=aligned, config_dict=both, timings={}).read_text()
    assert "LoRA rank 8 (transformer and text encoders), " in text


def test_an_exact_gain_meets_its_target_despite_float_rounding(tmp_path):
    # 2/10 -> 3/10 is exactly +10 points, computed as 100 * (0.3 - 0.2) = 9.999999999999998
    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    aligned = _result([1, 1, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    assert 100 * (aligned.accuracy - base.accuracy) < 10.0  # the float noise this guards against
    text = write_report(tmp_path, base=base, aligned=aligned, config_dict=CONFIG, timings={}, target_gain_points=10.0).read_text()
    assert "target ≥ +10 points: **met**" in text and json.loads((tmp_path / "report.json").read_text())["target_met"] is True
    # one sample short is still short
    text = write_report(tmp_path, base=base, aligned=base, config_dict=CONFIG, timings={}, target_gain_points=10.0).read_text()
    assert "**NOT met**" in text


def test_report_names_the_noise_schedule_only_for_a_stochastic_kernel(tmp_path):
    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    text = write_report(tmp_path, base=base, aligned=base, config_dict=CONFIG, timings={}).read_text()
    assert "kernel `flow_sde` (noise constant {'a': 0.7}), 10 steps" in text
    ode = dict(CONFIG, sampling=dict(CONFIG["sampling"], kernel="ode"), objective={"name": "awm"})
    text = write_report(tmp_path, base=base, aligned=base, config_dict=ode, timings={}).read_text()
    assert "- **method**: `awm`, kernel `ode`, 10 steps" in text and "noise constant" not in text


def test_report_names_the_reward_whose_verdict_it_counts(tmp_path):
    """With several rewards the accuracy counted the first one's verdict and never said so."""
    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    text = write_report(tmp_path, base=base, aligned=base, config_dict=CONFIG, timings={}).read_text()
    assert "; accuracy counts `shapes`'s verdict (`details['binary']`, or a score >= 0.5" in text
    mixed = dict(CONFIG, rewards=[{"name": "pkg.mod:Redness", "label": "red", "weight": 0.5}, {"name": "shapes", "weight": 1.0}])
    assert "accuracy counts `red`'s verdict" in write_report(tmp_path, base=base, aligned=base, config_dict=mixed, timings={}).read_text()
    chosen = dict(mixed, train=dict(CONFIG["train"], report_reward="shapes"))
    assert "accuracy counts `shapes`'s verdict" in write_report(tmp_path, base=base, aligned=base, config_dict=chosen, timings={}).read_text()


def test_final_report_scores_with_train_report_reward(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from flowalign import report
    from flowalign.config import load_config
    from flowalign.train import final_outputs

    seen = {}
    monkeypatch.setattr(report, "heldout_report", lambda run_dir, adapter, records, reward, **kw: seen.update(reward=reward, **kw))
    rewards = "rewards=[{name: brightness}, {name: color_fraction, label: colour, on_error: drop}]"
    for extra, expect in (([], "bright"), (["train.report_reward=colour"], "colour")):
        cfg = load_config(None, [rewards, *extra])
        trainer = SimpleNamespace(config=cfg, rewards={"brightness": "bright", "colour": "colour"}, device="cpu", run_dir=tmp_path,
                                  adapter=None, heldout_records=[], timings={}, ema=None, lora_modules={},
                                  accelerator=SimpleNamespace(is_main_process=True, process_index=0, num_processes=1))
        monkeypatch.setattr(final_outputs.runtime, "to_device", lambda reward, device: None)
        seen.clear()
        final_outputs.write_heldout_report(trainer)
        assert seen["reward"] == expect
        assert seen["on_error"] == ("drop" if expect == "colour" else "raise")  # the entry's own policy (was: always raise)


def test_the_held_out_prompts_are_checked_by_the_reward_the_report_uses(tmp_path):
    """Setup checked the held-out prompts with rewards[0] whatever train.report_reward said: a run whose report scores
    with a verifier that cannot read them trained to the end and then failed; one whose first reward was that verifier,
    but whose report uses another, was refused for nothing."""
    from types import SimpleNamespace

    from flowalign.config import load_config
    from flowalign.errors import ConfigError
    from flowalign.prompts import load_prompts
    from flowalign.rewards import load_reward
    from flowalign.train.trainer_setup import check_reward_prompts

    heldout = tmp_path / "heldout.txt"
    heldout.write_text("a photo of a cat\na bowl of soup\n")
    data = SimpleNamespace(sampler=SimpleNamespace(records=load_prompts(tmp_path / "heldout.txt")[:0]),
                           heldout_records=load_prompts(heldout))
    rewards = {"brightness": load_reward("brightness"), "shapes": load_reward("shapes")}

    def check(order, report_reward, on_error="raise"):
        entries = [f"{{name: {name}, on_error: {on_error if name == 'shapes' else 'raise'}}}" for name in order]
        cfg = load_config(None, [f"rewards=[{', '.join(entries)}]", f"train.report_reward={report_reward}"])
        check_reward_prompts(cfg, rewards, None, data)

    with pytest.raises(ConfigError, match="held-out prompts"):
        check(["brightness", "shapes"], "shapes")  # the report's verifier cannot read them: refused before training
    check(["shapes", "brightness"], "brightness")  # the report scores brightness, which reads anything
    check(["brightness", "shapes"], "shapes", on_error="drop")  # the report drops what its reward cannot score


def test_report_refuses_evaluations_with_different_seeds(tmp_path):
    base = _result([0] * 10, [0.1] * 10)
    aligned = _result([1] * 10, [0.9] * 10)
    aligned.seeds = [s + 1 for s in aligned.seeds]
    with pytest.raises(ValueError, match="prompts or seeds"):
        write_report(tmp_path, base=base, aligned=aligned, config_dict=CONFIG, timings={})


def test_summarize_metrics_first_and_last_windows(tmp_path):
    _write_metrics(tmp_path / "m.csv")
    rows = {r["metric"]: r for r in summarize_metrics(tmp_path / "m.csv", window=0.2)}
    assert set(rows) == {"reward/shapes/mean", "frac_zero_std_groups"}  # loss and std are not summarised
    assert rows["reward/shapes/mean"]["first"] == pytest.approx(0.05) and rows["reward/shapes/mean"]["last"] == pytest.approx(0.85)
    assert rows["frac_zero_std_groups"]["min"] == pytest.approx(0.1)


def test_a_sparse_column_is_windowed_over_its_own_values(tmp_path):
    """eval/* is logged every few iterations: 5 values over 50 iterations; a 10% window of the *iterations* (5)
    used to average all 5 values at both ends, reporting no change for a rising curve."""
    rows = [{"iteration": i, "reward/shapes/mean": 0.5, "eval/shapes/mean": (0.1 * (i // 10 + 1) if i % 10 == 9 else "")} for i in range(50)]
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {r["metric"]: r for r in summarize_metrics(tmp_path / "m.csv", window=0.1)}
    assert summary["eval/shapes/mean"]["iterations"] == 5
    assert summary["eval/shapes/mean"]["first"] == pytest.approx(0.1) and summary["eval/shapes/mean"]["last"] == pytest.approx(0.5)


def test_the_evaluation_line_counts_samples_per_prompt_as_drawn(tmp_path):
    """512 samples cycle over 320 prompt lines: 1 or 2 each, which the report says (it said "1 per prompt")."""
    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    aligned = _result([1, 1, 1, 0, 1, 1, 0, 0, 1, 1], [0.5] * 10)
    text = write_report(tmp_path, base=base, aligned=aligned, config_dict=CONFIG, timings={}).read_text()
    assert "10 samples (2 per line, 5 lines, 5 distinct prompts" in text  # record_index i % 5: every prompt twice
    for r in (base, aligned):
        r.record_index = [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]  # uneven: 3, 3, 2, 1, 1
    text = write_report(tmp_path / "uneven", base=base, aligned=aligned, config_dict=CONFIG, timings={}).read_text()
    assert "10 samples (1–3 per line, 5 lines, 5 distinct prompts" in text


def test_before_after_grid_size_and_nearest_upscaled_cells(tmp_path):
    n, h, w, scale = 3, 32, 32, 4
    base = torch.zeros(n, 3, h, w)
    aligned = torch.zeros(n, 3, h, w)
    for j in range(n):
        base[j, j] = 1.0  # column j: pure red / green / blue
        aligned[j, :, : h // 2] = 1.0  # white top half, black bottom half
    base[0, :, 0, 0] = torch.tensor([0.0, 0.0, 1.0])  # one blue pixel in the corner of a red image
    prompts = ["a red square", "two blue circles and a long caption that must wrap over lines", "x"]
    out = before_after_grid(base, aligned, prompts, tmp_path / "ba.png", scale=scale)
    image = np.asarray(Image.open(out).convert("RGB"))
    cell = scale * h
    # width: pad + label column + n (cell + pad); height: pad + 2 (cell + pad) + caption strip + pad
    assert image.shape == (PAD + 2 * (cell + PAD) + CAPTION_LINES * LINE_HEIGHT + PAD, PAD + LABEL_WIDTH + n * (cell + PAD), 3)
    assert (image.shape[1], image.shape[0]) == (464, 311)
    for j in range(n):
        x0, y0 = PAD + LABEL_WIDTH + j * (cell + PAD), PAD
        block = image[y0 + scale: y0 + cell, x0 + scale: x0 + cell]
        expected = np.zeros(3, dtype=np.uint8)
        expected[j] = 255
        assert (block == expected).all()  # the base sample, upscaled, in the top row
        y1 = PAD + cell + PAD
        assert (image[y1: y1 + cell // 2, x0: x0 + cell] == 255).all() and (image[y1 + cell // 2: y1 + cell, x0: x0 + cell] == 0).all()
    # nearest-neighbour: the single blue pixel becomes a scale x scale block, no blending
    corner = image[PAD: PAD + scale + 1, PAD + LABEL_WIDTH: PAD + LABEL_WIDTH + scale + 1]
    assert (corner[:scale, :scale] == [0, 0, 255]).all() and (corner[scale, scale] == [255, 0, 0]).all()
    # captions and labels are drawn (dark pixels) under each column and in the label column
    caption_y = PAD + 2 * (cell + PAD)
    for j in range(n):
        x0 = PAD + LABEL_WIDTH + j * (cell + PAD)
        assert (image[caption_y:, x0: x0 + cell] < 128).any()
    assert (image[PAD: PAD + 2 * cell, PAD: LABEL_WIDTH] < 128).any()
    with pytest.raises(ValueError, match="2 prompts for 3"):
        before_after_grid(base, aligned, prompts[:2], tmp_path / "bad.png")


def _ci(interval) -> str:
    lo, hi = interval
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def test_pick_samples_and_write_before_after(tmp_path):
    from flowalign.evaluation import pick_samples
    from flowalign.report import write_before_after

    records = [{"prompt": f"p{i}", "tag": t} for i, t in enumerate(["b", "a", "b", "a", "b", "a"])]
    # sample i -> record i % 6; two distinct prompts per category, categories sorted
    assert pick_samples(records, num_samples=12, per_category=2) == [1, 3, 0, 2]
    assert pick_samples(records, samples_per_prompt=2, per_category=1) == [2, 0]
    base, aligned = _result([0] * 10, [0.1] * 10), _result([1] * 10, [0.9] * 10)
    base.images = {i: torch.full((3, 8, 8), 0.2) for i in (1, 4)}
    aligned.images = {i: torch.full((3, 8, 8), 0.8) for i in (1, 4, 5)}
    out = write_before_after(tmp_path / "before_after.png", base, aligned, scale=2)
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[1] == PAD + LABEL_WIDTH + 2 * (16 + PAD)  # the two samples both kept
    assert (image[PAD + 2, PAD + LABEL_WIDTH + 2] == round(0.2 * 255)).all() and (image[PAD + 16 + PAD + 2, PAD + LABEL_WIDTH + 2] == round(0.8 * 255)).all()
    aligned.seeds = [s + 1 for s in aligned.seeds]
    with pytest.raises(ValueError, match="sample 1 differs"):
        write_before_after(tmp_path / "x.png", base, aligned)


def test_heldout_report_with_a_trained_lora_end_to_end(tmp_path):
    """Base = LoRA disabled, aligned = LoRA on: same noise, the grid and the report are written."""
    from flowalign.pipelines import load_adapter
    from flowalign.pipelines.testing import add_random_lora, tiny_sd3_pipeline
    from flowalign.report import heldout_report
    from flowalign.rewards import RewardOutput

    pipe = tiny_sd3_pipeline(seed=0, with_t5=False)
    adapter = load_adapter(pipe)
    add_random_lora(pipe.transformer, seed=0)
    records = [{"prompt": "a red square", "tag": "colors"}, {"prompt": "two circles", "tag": "counting"}, {"prompt": "a blue square", "tag": "colors"}]

    def reward(images, prompts, metadata):
        b = images.mean(dim=(1, 2, 3))
        return RewardOutput(scores=(b > 0.43).float(), details={"partial": b})

    path = heldout_report(tmp_path, adapter, records, reward, config_dict=CONFIG, timings={"train": 2.0}, num_steps=1, guidance_scale=1.0,
                          num_samples=3, progress=False)
    base = EvalResult.from_json(tmp_path / "eval_base.json")
    aligned = EvalResult.from_json(tmp_path / "eval_aligned.json")
    assert torch.equal(base.noise_fingerprints, aligned.noise_fingerprints)
    assert (base.partial - aligned.partial).abs().max() > 1e-4  # the LoRA was off for base, on for aligned
    text = path.read_text()
    assert "| base eval |" in text and "| aligned eval |" in text and "| **all** | 3 |" in text
    delta = float((aligned.scores.double() - base.scores.double()).mean())  # the paired score change, a continuous reward's signal
    assert f"Mean score {float(base.scores.mean()):.3f} → {float(aligned.scores.mean()):.3f} ({delta:+.3f}, 95% CI [" in text
    assert "![before / after (same prompts and seeds)](before_after.png)" in text
    width, height = Image.open(tmp_path / "before_after.png").size
    assert width == PAD + LABEL_WIDTH + 3 * (128 + PAD)  # columns: 2 colors prompts + 1 counting prompt
    # after the call the LoRA is enabled again: a new evaluation reproduces the aligned one
    from flowalign.evaluation import evaluate

    again = evaluate(adapter, records, reward, num_samples=3, num_steps=1, guidance_scale=1.0, progress=False)
    assert torch.allclose(again.partial, aligned.partial, atol=1e-6)


def test_failure_tables_hand_worked():
    from flowalign.evaluation import failure_counts, failure_transitions

    tags = ["colors", "colors", "counting", "counting", "counting"]
    base = ["correct", "color", "malformed", "malformed", "correct"]
    aligned = ["color", "correct", "correct", "malformed", "correct"]
    counts = failure_counts(tags, base)
    assert counts == {"colors": {"correct": 1, "color": 1, "malformed": 0}, "counting": {"correct": 1, "color": 0, "malformed": 2},
                      "all": {"correct": 2, "color": 1, "malformed": 2}}
    moves = failure_transitions(base, aligned)
    assert list(moves) == ["correct", "malformed", "color"]  # correct first, then by frequency (malformed 3, color 2)
    assert moves["correct"] == {"correct": 1, "color": 1, "malformed": 0}
    assert moves["malformed"] == {"correct": 1, "color": 0, "malformed": 1}
    assert moves["color"] == {"correct": 1, "color": 0, "malformed": 0}
    assert sum(sum(row.values()) for row in moves.values()) == len(base)
    with pytest.raises(ValueError, match="labels"):
        failure_transitions(base, aligned[:-1])
    with pytest.raises(ValueError, match="tags"):
        failure_counts(tags[:-1], base)


def test_report_failure_section_counts_fixed_and_broken(tmp_path):
    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    aligned = _result([0, 1, 1, 0, 1, 0, 0, 0, 1, 1], [0.5] * 10)
    base.failures = ["correct", "color", "color", "shape_count", "malformed", "malformed", "malformed", "shape_count", "correct", "position"]
    aligned.failures = ["malformed", "correct", "correct", "shape_count", "correct", "malformed", "shape_count", "shape_count", "correct",
                        "correct"]
    text = write_report(tmp_path, base=base, aligned=aligned, config_dict=CONFIG, timings={"train": 1.0}).read_text()
    assert "## Failure modes" in text
    # colors rows 0-3: base correct 1, color 2, shape_count 1 -> aligned correct 2, malformed 1, shape_count 1
    # columns: correct, then by frequency over both: shape_count 5 (seen before malformed 5), color 2, position 1
    assert "| category | correct | shape_count | malformed | color | position |" in text
    assert "| colors | 1 → 2 | 1 → 1 | 0 → 1 | 2 → 0 | 0 → 0 |" in text
    assert "| **all** | 2 → 5 | 2 → 3 | 3 → 2 | 2 → 0 | 1 → 0 |" in text
    assert "| correct | 1 | 0 | 1 | 0 | 0 |" in text  # one correct base sample became malformed
    assert "turns 4 failed samples correct and 1 correct ones into failures (net +3)" in text
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["failures"]["transitions"]["malformed"] == {"correct": 1, "color": 0, "shape_count": 1, "malformed": 1, "position": 0}
    back = EvalResult.from_json(tmp_path / "eval_aligned.json")
    assert back.failures == aligned.failures
    # without labels there is no section
    base.failures = aligned.failures = None
    assert "## Failure modes" not in write_report(tmp_path, base=base, aligned=aligned, config_dict=CONFIG, timings={}).read_text()


def test_report_names_dynamic_sampling_only_when_on(tmp_path):
    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    group = f"group size {CONFIG['sampling']['group_size']}"
    text = write_report(tmp_path, base=base, aligned=base, config_dict=CONFIG, timings={}).read_text()
    assert f"{group}, LoRA rank" in text and "dynamic sampling" not in text
    drawn = dict(CONFIG, train=dict(CONFIG.get("train", {}), oversample=1.5))
    text = write_report(tmp_path, base=base, aligned=base, config_dict=drawn, timings={}).read_text()
    assert f"{group} (dynamic sampling from 1.5x the prompts), LoRA rank" in text
    full = dict(CONFIG, train=dict(CONFIG.get("train", {}), max_sampling_rounds=4))
    text = write_report(tmp_path, base=base, aligned=base, config_dict=full, timings={}).read_text()
    assert f"{group} (sampled until full: up to 4 windows of prompts), LoRA rank" in text


def test_report_says_when_rollouts_were_guided(tmp_path):
    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    group = f"group size {CONFIG['sampling']['group_size']}"
    text = write_report(tmp_path, base=base, aligned=base, config_dict=CONFIG, timings={}).read_text()
    assert f"{group}, LoRA rank" in text and "guided drift" not in text
    guided = dict(CONFIG, sampling=dict(CONFIG["sampling"], drift_reward="color_fraction", drift_mode="normalized",
                                        drift_scale=1.0, drift_gradient="auto"))
    text = write_report(tmp_path, base=base, aligned=base, config_dict=guided, timings={}).read_text()
    assert (f"{group} (rollouts steered by Euphonium's guided drift: `color_fraction`, normalized scale 1.0, auto gradient; "
            "training rewards are the guided samples', evaluation is unguided), LoRA rank") in text


def test_report_names_the_averaged_lora_it_evaluated(tmp_path):
    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)

    def method_line(**train):
        config = dict(CONFIG, train=dict(CONFIG.get("train", {}), **train))
        text = write_report(tmp_path, base=base, aligned=base, config_dict=config, timings={}).read_text()
        return next(line for line in text.splitlines() if line.startswith("- **method**"))

    assert "evaluated and saved" not in method_line(ema=False, ema_decay=0.9)
    assert method_line(ema=True, ema_decay=0.9).endswith("; evaluated and saved: the EMA of the LoRA (decay 0.9)")
    assert method_line(ema=True, ema_schedule="power", ema_power=3.0).endswith(
        "; evaluated and saved: the power-function EMA of the LoRA (gamma 3.0)")


def test_report_prompt_section_hand_worked(tmp_path):
    """Per prompt (sample i is prompt i % 5): base correct 1,0,0,1,0 and aligned 0,1,1,1,2 of 2 samples each."""
    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    aligned = _result([0, 1, 1, 0, 1, 0, 0, 0, 1, 1], [0.5] * 10)
    text = write_report(tmp_path, base=base, aligned=aligned, config_dict=CONFIG, timings={}).read_text()
    section = text.split("## Prompts that moved most")[1].split("##")[0]
    assert "4 of 5 distinct prompts moved" in section
    rows = [line for line in section.splitlines() if line.startswith("| prompt ") and not line.startswith("| prompt |")]
    assert [r.split(" | ")[0] for r in rows] == ["| prompt 4", "| prompt 1", "| prompt 2", "| prompt 0"]  # gains (largest first), then losses
    assert rows[0] == f"| prompt 4 | {TAGS[4]} | 2 | 0 | 2 | +2 |" and rows[-1] == f"| prompt 0 | {TAGS[0]} | 2 | 1 | 0 | -1 |"
    summary = json.loads((tmp_path / "report.json").read_text())
    assert [(r["prompt"], r["base"], r["aligned"]) for r in summary["prompts"]] == [
        ("prompt 4", 0, 2), ("prompt 1", 0, 1), ("prompt 2", 0, 1), ("prompt 3", 1, 1), ("prompt 0", 1, 0)]
    # the same outcomes twice: no prompt moved, no section
    assert "## Prompts that moved most" not in write_report(tmp_path, base=base, aligned=base, config_dict=CONFIG, timings={}).read_text()


def test_prompt_changes_checks_lengths_and_keeps_first_tag():
    from flowalign.evaluation import prompt_changes

    rows = prompt_changes(["b", "a", "b"], ["t1", "t2", "t1"], [True, False, False], [True, True, True])
    assert rows == [{"prompt": "a", "tag": "t2", "n": 1, "base": 0, "aligned": 1}, {"prompt": "b", "tag": "t1", "n": 2, "base": 1, "aligned": 2}]
    with pytest.raises(ValueError, match="2 prompts, 3 tags"):
        prompt_changes(["a", "b"], ["t", "t", "t"], [True, True], [True, True])


def test_prompt_cells_escape_pipes_and_cut_long_prompts():
    from flowalign.report import prompt_section

    long = "a photo of " + "a very " * 30 + "long | prompt\nwith a newline"
    lines = prompt_section([{"prompt": long, "tag": "x|y", "n": 2, "base": 0, "aligned": 2}])
    row = next(line for line in lines if line.endswith("| +2 |"))
    cell = row[2:].split(" | ")[0]
    assert len(cell) == 80 and cell.endswith("…") and "\n" not in row
    assert "| x\\|y |" in row  # the tag's pipe is escaped, so the row keeps its 6 columns
    assert row.replace("\\|", "").count("|") == 7


def _wilson_by_hand(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


def test_category_bars_values_by_hand_and_the_report_figure(tmp_path):
    from flowalign.evaluation import compare
    from flowalign.plots import category_bar_values

    # base: colors 1/4, counting 0/4, position 1/2 -> 2/10; aligned: 3/4, 2/4, 2/2 -> 7/10
    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    aligned = _result([1, 1, 1, 0, 1, 1, 0, 0, 1, 1], [0.5] * 10)
    values = category_bar_values(compare(base, aligned).rows)
    assert values["names"] == ["colors", "counting", "position", "all"]
    assert values["count"] == [4, 4, 2, 10]
    np.testing.assert_allclose(values["base"], [25.0, 0.0, 50.0, 20.0])
    np.testing.assert_allclose(values["aligned"], [75.0, 50.0, 100.0, 70.0])
    np.testing.assert_allclose(values["delta"], [50.0, 50.0, 50.0, 50.0])
    lo, hi = _wilson_by_hand(3, 4)  # aligned colours: whiskers reach the Wilson bounds
    np.testing.assert_allclose(values["aligned_err"][:, 0], [75.0 - 100 * lo, 100 * hi - 75.0], atol=1e-3)
    lo, hi = _wilson_by_hand(0, 4)  # base counting: 0/4 reaches down to 0
    np.testing.assert_allclose(values["base_err"][:, 1], [0.0, 100 * hi], atol=1e-3)

    path = write_report(tmp_path, base=base, aligned=aligned, config_dict=CONFIG, timings={"train": 1.0}, command="flowalign train")
    assert "![held-out accuracy per category, base vs aligned](heldout_accuracy.png)" in path.read_text()
    with Image.open(tmp_path / "heldout_accuracy.png") as image:
        assert image.width >= 500 and image.height == 400


def test_category_bars_label_both_counts_a_dropped_gain_and_an_unreachable_target(tmp_path, monkeypatch):
    """The bars said n=<aligned count> where the tables say base/aligned, '+nan' over an all-dropped pair, and drew a
    base + target line above 112% off the chart while the legend still named it."""
    import matplotlib.axes

    from flowalign.evaluation import compare
    from flowalign.plots import category_bar_values, category_bars, count_label

    base = _result([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0.5] * 10)  # 100%: base + 15 is 115%
    aligned = _result([1, 1, 1, 1, float("nan"), float("nan"), float("nan"), float("nan"), 1, 0], [0.5] * 10)  # counting dropped
    rows = compare(base, aligned).rows
    values = category_bar_values(rows)
    # compared on the jointly scored samples: the counting samples the aligned run dropped leave the base side too
    assert [count_label(b, a) for b, a in zip(values["base_count"], values["count"])] == ["n=4", "n=0", "n=2", "n=6"]
    texts, lines = [], []
    real_text, real_hlines = matplotlib.axes.Axes.text, matplotlib.axes.Axes.hlines
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda self, x, y, s, *a, **k: texts.append(s) or real_text(self, x, y, s, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "hlines", lambda self, y, *a, **k: lines.append((y, k.get("label"))) or real_hlines(self, y, *a, **k))
    category_bars(rows, tmp_path / "bars.png", target_points=15)
    assert texts == ["+0.0", "–", "-50.0", "-16.7"]
    assert lines == [(111.0, "base + 15 points (= 115%, off the chart)")]


def test_a_model_whose_every_sample_was_dropped_reads_as_a_dash_not_nan(tmp_path):
    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    aligned = _result([float("nan")] * 10, [float("nan")] * 10)  # every score dropped (on_error: drop)
    text = write_report(tmp_path, base=base, aligned=aligned, config_dict=CONFIG, timings={}, target_gain_points=15).read_text()
    assert "nan" not in text.lower().replace("nanmean", "")
    assert "Held-out accuracy **– → –** (**– points**, 95% CI –)" in text and "**NOT met**" in text  # no sample both scored
    assert "10 samples scored in one evaluation only" in text


def test_a_failed_report_write_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    """The report's files are replaced one by one, each atomically, report.md last: a failure midway (disk full
    while writing eval_aligned.json) keeps the earlier report.md, which agrees with the earlier report.json."""
    import errno

    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    write_report(tmp_path, base=base, aligned=base, config_dict=CONFIG, timings={})
    before = {name: (tmp_path / name).read_bytes() for name in ("report.md", "report.json", "eval_aligned.json")}
    better = _result([1, 1, 1, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    original = EvalResult.to_json

    def full_disk(self, path=None, samples=True):
        if path is not None and str(path).endswith("eval_aligned.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, path, samples)

    monkeypatch.setattr(EvalResult, "to_json", full_disk)
    with pytest.raises(OSError):
        write_report(tmp_path, base=base, aligned=better, config_dict=CONFIG, timings={})
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    from flowalign.files import atomic_path, write_text_atomic

    target = tmp_path / "sub" / "figure.png"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".png" and tmp != target  # a writer picks PNG from it
            tmp.write_text("half")
            raise RuntimeError("killed midway")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["figure.png"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["figure.png"]


def test_report_names_a_labelled_reward_by_its_label_too(tmp_path):
    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    two = dict(CONFIG, rewards=[{"name": "shapes", "weight": 1.0}, {"name": "shapes", "label": "partial", "weight": 0.5}])
    text = write_report(tmp_path, base=base, aligned=base, config_dict=two, timings={}).read_text()
    assert "`shapes` × 1.0, `shapes` as `partial` × 0.5" in text


def test_the_target_verdict_says_when_its_interval_reaches_the_other_side():
    from flowalign.report import _target_caveat

    assert _target_caveat(True, 0.16, 0.30, 15) == ""  # the whole interval clears +15
    assert _target_caveat(True, 0.149, 0.30, 15).startswith(" by the point estimate (its 95% CI reaches down to +14.9")
    assert _target_caveat(False, 0.02, 0.149, 15) == ""  # the whole interval is short of it
    assert _target_caveat(False, 0.02, 0.15, 15) == " by the point estimate (its 95% CI reaches up to +15.0)"
    assert _target_caveat(False, float("nan"), float("nan"), 15) == ""  # no gain to judge



def test_category_bars_legend_covers_no_bar_and_no_gain_label(tmp_path, monkeypatch):
    """The legend sat inside the axes' upper left, over the first pair's gain label when that pair's bars are high."""
    import flowalign.plots as plots
    from flowalign.evaluation import compare

    base = _result([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], [0.5] * 10)  # colours 4/4: the first pair's label sits near the top
    rows = compare(base, base).rows
    seen = {}
    real_save = plots._save_figure

    def keep_boxes(fig, out_png):
        fig.tight_layout()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        seen["legend"] = ax.get_legend().get_window_extent(renderer)
        seen["others"] = [t.get_window_extent(renderer) for t in ax.texts] + [p.get_window_extent(renderer) for p in ax.patches]
        seen["figure"] = fig.bbox
        return real_save(fig, out_png)

    monkeypatch.setattr(plots, "_save_figure", keep_boxes)
    plots.category_bars(rows, tmp_path / "bars.png", target_points=15)
    assert seen["others"] and not any(seen["legend"].overlaps(box) for box in seen["others"])
    assert seen["figure"].contains(seen["legend"].x1 - 1, seen["legend"].y0 + 1)  # and it is still on the figure


def test_the_report_journal_key_leaves_out_the_rewards_batch_size(tmp_path):
    """rewards[].batch_size only chunks the reward's calls: a run killed in its report and resumed with another value
    sampled the whole report again."""
    from types import SimpleNamespace

    from flowalign.config import load_config
    from flowalign.prompts import load_prompts
    from flowalign.train.final_outputs import report_journals

    (tmp_path / "p.txt").write_text("a red circle\n")

    def key(*extra):
        trainer = SimpleNamespace(config=load_config(None, ["model.pretrained=tiny-sd3", *extra]), run_dir=tmp_path,
                                  heldout_records=load_prompts(tmp_path / "p.txt"), device="cpu", lora_modules={}, ema=None,
                                  accelerator=SimpleNamespace(process_index=0, num_processes=1))
        return report_journals(trainer, "brightness")[0].key

    assert key("rewards.0.batch_size=16") == key()
    assert "batch_size" not in str(key()) and key("rewards.0.kwargs={x: 1}") != key()  # what scores still counts


def test_the_headline_and_target_compare_the_samples_both_runs_scored(tmp_path):
    """With drops, the headline set the base's accuracy over every sample against the aligned one's over the samples
    it kept: an aligned model equal to the base on every shared sample, its other samples all dropped, read
    "+X points, target met". Now both sides count the jointly scored samples, and the report says how many were not."""
    nan = float("nan")
    correct = [1, 0, 0, 1, 0, 0, 1, 0, 0, 1]  # TAGS: 10 samples
    base = _result(correct, [0.5] * 10)
    kept = [tag == TAGS[0] for tag in TAGS]  # the aligned run dropped every sample but the first category's
    aligned = _result([c if k else nan for c, k in zip(correct, kept)], [0.5] * 10)
    text = write_report(tmp_path, base=base, aligned=aligned, config_dict=CONFIG, timings={}, target_gain_points=15).read_text()
    shared = sum(kept)
    accuracy = 100 * sum(c for c, k in zip(correct, kept) if k) / shared  # the same on both sides, by hand
    assert f"Held-out accuracy **{accuracy:.1f}% → {accuracy:.1f}%** (**+0.0 points**" in text and "**NOT met**" in text
    assert f"{10 - shared} samples scored in one evaluation only (the other dropped them) are left out of both." in text
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["gain_points"] == 0.0 and summary["target_met"] is False and summary["one_sided_samples"] == 10 - shared
    assert summary["accuracy_base"] == summary["accuracy_aligned"] == pytest.approx(accuracy / 100)
    # nothing dropped: the comparison is the evaluations' own, and says nothing of one-sided samples
    plain = write_report(tmp_path / "plain", base=base, aligned=base, config_dict=CONFIG, timings={}).read_text()
    assert "scored in one evaluation only" not in plain and f"**{100 * base.accuracy:.1f}% → {100 * base.accuracy:.1f}%**" in plain


def test_the_report_says_what_ran_where(tmp_path, monkeypatch):
    """A run's report named no versions, device or time; a DenseGRPO report gave the configured constant noise while the
    rollouts used the calibrated table; the reward's kwargs (what "score" means) were left out; 320 lines of 86
    prompts read "320 prompts"; `python -m flowalign.train.cli` gave a command `cli.py train` that cannot be run."""
    import flowalign
    from flowalign.step_rewards import save_noise_table

    base = _result([1, 0, 0, 0, 0, 0, 0, 0, 1, 0], [0.5] * 10)
    base.settings = {"num_prompts": 10, "prompts_file": "p.jsonl"}
    mixed = dict(CONFIG, rewards=[{"name": "shapes", "weight": 1.0, "kwargs": {"score": "mix", "partial_weight": 0.5}}])
    from flowalign.train import cli

    monkeypatch.setattr(sys, "argv", [cli.__file__, "train", "--set", "train.seed=1"])  # python -m flowalign.train.cli
    save_noise_table(tmp_path / "noise_table.json", [0.71, 0.73])
    text = write_report(tmp_path, base=base, aligned=base, config_dict=mixed, timings={}).read_text()
    assert "- **command**: `flowalign train --set train.seed=1`" in text
    # under `python -m` (torchrun, accelerate launch) the module runs as __main__ and flowalign.train.cli is not imported
    import importlib.util
    import types

    as_main = types.ModuleType("__main__")
    as_main.__spec__ = importlib.util.find_spec("flowalign.train.cli")
    monkeypatch.setitem(sys.modules, "__main__", as_main)
    monkeypatch.delitem(sys.modules, "flowalign.train.cli")
    monkeypatch.setattr(sys, "argv", ["/somewhere/flowalign/train/cli.py", "train"])
    assert "- **command**: `flowalign train`" in write_report(tmp_path, base=base, aligned=base, config_dict=mixed, timings={}).read_text()
    # python -c "from flowalign.train.cli import main; main()" train ... (bench/toy_alignment.py): argv[0] is "-c"
    monkeypatch.setitem(sys.modules, "flowalign.train.cli", cli)
    monkeypatch.setattr(sys, "argv", ["-c", "train", "--set", "train.seed=3"])
    assert "- **command**: `flowalign train --set train.seed=3`" in write_report(tmp_path, base=base, aligned=base, config_dict=mixed,
                                                                                timings={}).read_text()
    assert "(noise table `noise_table.json` [0.71, 0.73])" in text and "noise constant" not in text
    assert "`shapes` {'score': 'mix', 'partial_weight': 0.5} × 1.0" in text
    assert "10 lines, 5 distinct prompts, of `p.jsonl`" in text
    assert f"- **software**: flowalign {flowalign.__version__}" in text and "torch " in text and " UTC" in text
    env = json.loads((tmp_path / "report.json").read_text())["environment"]
    assert env["flowalign"] == flowalign.__version__ and env["device"]
    # a launch on several processes says so (with noise_seeding: process its LoRA depends on the count)
    assert env["processes"] == 1 and " processes;" not in text
    monkeypatch.setenv("WORLD_SIZE", "8")
    text = write_report(tmp_path, base=base, aligned=base, config_dict=mixed, timings={}).read_text()
    assert " × 8 processes; written" in text and json.loads((tmp_path / "report.json").read_text())["environment"]["processes"] == 8


def test_train_prints_the_held_out_result_last(tmp_path):
    from flowalign.train.cli import _heldout_line

    assert _heldout_line(tmp_path) == ""
    (tmp_path / "report.json").write_text(json.dumps({"accuracy_base": 0.289, "accuracy_aligned": 0.363}))
    assert _heldout_line(tmp_path) == f"; held-out accuracy 28.9% -> 36.3% (+7.4 points), {tmp_path / 'report.md'}"


def test_the_report_and_the_eval_grid_score_in_the_rewards_own_batch_size(tmp_path, write_plugin):
    """`rewards[].batch_size` bounds what a reward model sees at once; training chunked by it, but the held-out report
    scored a whole sampling batch in one call, so a run that trained fine failed at its end (and the eval grid fell back
    to one sample at a time, dropping none only by luck)."""
    from flowalign.train import cli
    from tests.tiny_run import train_argv

    module = write_plugin('''
        import torch

        def limited(images, prompts, metadata):
            if len(prompts) > 4:
                raise RuntimeError(f"CUDA out of memory (simulated) for a batch of {len(prompts)}")
            return images.mean(dim=(1, 2, 3))
    ''')
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("a red circle\na blue square\na green triangle\n")
    settings = ["train.iterations=1", "train.prompts_per_iter=2", "sampling.group_size=2", "train.micro_batch_size=4",
                "train.eval_every=1", f"train.eval_prompts={heldout}", "train.final_eval_samples=12", "sampling.micro_batch_size=12",
                f"rewards=[{{name: '{module}:limited', batch_size: 4}}]", "train.log_with=[]"]
    assert cli.main(train_argv(tmp_path / "run", settings)) == 0
    assert (tmp_path / "run" / "report.md").is_file()
    base = json.loads((tmp_path / "run" / "eval_base.json").read_text())
    assert len(base["samples"]["score"]) == 12 and all(s == s for s in base["samples"]["score"])  # none dropped (NaN)
