"""Corrected score: the combination formula, hand-computed image statistics, and the toy quality
signal: degenerate images (flat colour, noise, saturated) get a low q, normal renders do not."""
from __future__ import annotations

import math

import pytest
import torch

from flowalign.corrected import FEATURES, CorrectedScore, ImageStatsQuality, corrected_score, image_statistics
from flowalign.rewards.base import Reward, RewardOutput


@pytest.fixture(scope="module")
def quality():
    return ImageStatsQuality()  # fitted on 512 clean renders (seed 12345)


@pytest.fixture(scope="module")
def renders():
    return ImageStatsQuality.toy_reference(200, seed=7)  # other scenes than the reference


def test_corrected_score_formula():
    r, q = torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.9, 0.2, 1.0])
    out = corrected_score(r, q, q0=0.5, c=0.1)
    assert out.tolist() == pytest.approx([1.0 * 0.4 + 0.1, 0.5 * -0.3 + 0.1, 0.1])


def test_image_statistics_by_hand():
    img = torch.zeros(1, 3, 4, 4)
    img[..., 2:] = 1.0  # left half black, right half white
    f = dict(zip(FEATURES, image_statistics(img)[0].tolist()))
    assert f["log_non_dominant"] == pytest.approx(math.log(1e-3 + 0.5))
    assert f["saturation"] == pytest.approx(0.0)
    assert f["log_edge_energy"] == pytest.approx(math.log(1e-3 + 1 / 3))  # one unit step in 3 column gaps
    assert f["log_laplacian_energy"] == pytest.approx(math.log(1e-3 + 1.0), abs=1e-5)  # interior |Δ| = 1 everywhere
    assert f["hist_entropy"] == pytest.approx(math.log(2))
    assert f["luma_mean"] == pytest.approx(0.5)
    assert f["luma_std"] == pytest.approx(math.sqrt(16 * 0.25 / 15))
    assert f["log_clipped"] == pytest.approx(math.log(1.05))


def test_normal_renders_keep_high_quality(quality, renders):
    q = quality(renders, [""] * len(renders)).scores
    assert q.min().item() > 0.5
    assert q.median().item() > 0.95


def test_degenerate_images_get_low_quality(quality, renders):
    g = torch.Generator().manual_seed(0)
    flat = torch.rand(16, 3, 1, 1, generator=g).expand(16, 3, 32, 32)
    background = torch.full((4, 3, 32, 32), 238 / 255)  # an empty canvas is degenerate too
    noise = torch.rand(16, 3, 32, 32, generator=g)
    saturated = ((renders[:16] - 0.5) * 8 + 0.5).clamp(0, 1)
    noisy_render = (renders[:16] + 0.15 * torch.randn(16, 3, 32, 32, generator=g)).clamp(0, 1)
    for name, images in [("flat", flat), ("background", background), ("noise", noise), ("saturated", saturated), ("noisy_render", noisy_render)]:
        out = quality(images, [""] * len(images))
        assert out.scores.max().item() < 0.05, name
        assert all(w is not None for w in out.details["worst_feature"]), name


def test_reference_round_trip_and_custom_fit(tmp_path, quality, renders):
    path = quality.save(tmp_path / "ref.json")
    loaded = ImageStatsQuality(path)
    assert torch.allclose(loaded.center, quality.center) and torch.allclose(loaded.scale, quality.scale)
    # fitted on noise, noise becomes "normal" and renders become the outliers
    g = torch.Generator().manual_seed(1)
    on_noise = ImageStatsQuality(torch.rand(64, 3, 32, 32, generator=g))
    assert on_noise(torch.rand(8, 3, 32, 32, generator=g), [""] * 8).scores.min() > 0.5
    assert on_noise(renders[:8], [""] * 8).scores.max() < 0.05


def test_statistics_and_zscores_follow_the_images_device():
    """On a GPU the histogram and the fitted statistics must live with the images ('meta' stands in
    for CUDA here: every machine has it, and a device mismatch raises on it as on CUDA)."""
    quality = ImageStatsQuality(torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    images = torch.rand(2, 3, 8, 8, device="meta")
    assert image_statistics(images).device.type == "meta"
    z = quality.to("meta").zscores(images)
    assert z.device.type == "meta" and z.shape == (2, len(FEATURES))


def test_corrected_score_reward_discounts_hacked_images(quality, renders):
    class Brightness(Reward):
        def score(self, images, prompts, metadata):
            return RewardOutput(scores=images.mean(dim=(1, 2, 3)))

    scorer = CorrectedScore(Brightness(), quality, q0=0.0, c=0.0)
    hacked = torch.ones(4, 3, 32, 32)  # maximal brightness, no content
    good = renders[:4]
    out_h, out_g = scorer(hacked, [""] * 4), scorer(good, [""] * 4)
    assert (out_h.details["reward"] > out_g.details["reward"]).all()  # the raw reward is hacked
    assert (out_h.scores < out_g.scores).all()  # the corrected score is not
    assert torch.allclose(out_g.scores, out_g.details["reward"] * out_g.details["quality"])


# ---------------------------------------------------------------------------------------------
# per-category summary and `flowalign eval --corrected-by`


def test_corrected_summary_by_hand():
    from flowalign.corrected import corrected_summary

    tags = ["a", "b", "a", "b"]
    r = torch.tensor([1.0, 0.0, 0.5, float("nan")])  # the last sample was dropped
    q = torch.tensor([0.9, 0.2, 0.4, 1.0])
    s = corrected_summary(tags, r, q, q0=0.5, c=0.1)
    assert list(s) == ["a", "b", "all"]
    a = s["a"]  # corrected: 1*0.4+0.1 = 0.5 and 0.5*(-0.1)+0.1 = 0.05
    assert a.count == 2 and a.mean_reward == pytest.approx(0.75) and a.mean_quality == pytest.approx(0.65)
    assert a.mean_corrected == pytest.approx(0.275) and a.low_quality == 1
    half = 1.959964 * math.sqrt(((0.5 - 0.275) ** 2 + (0.05 - 0.275) ** 2) / 1) / math.sqrt(2)
    assert (a.corrected_low, a.corrected_high) == pytest.approx((0.275 - half, 0.275 + half), rel=1e-5)
    assert s["b"].count == 1 and s["b"].mean_corrected == pytest.approx(0.1) and s["b"].low_quality == 1
    assert s["b"].mean_quality == pytest.approx(0.2) and s["all"].mean_quality == pytest.approx(0.5)  # the dropped q = 1 is out
    assert s["all"].count == 3 and s["all"].mean_corrected == pytest.approx((0.5 + 0.05 + 0.1) / 3)
    with pytest.raises(ValueError, match="must match"):
        corrected_summary(tags[:3], r, q)


def test_quality_tap_keeps_the_target_scores_and_flags_a_degenerate_image(quality, renders):
    from flowalign.corrected import QualityTap
    from flowalign.rewards import call_reward

    class Brightness(Reward):
        def score(self, images, prompts, metadata):
            return RewardOutput(scores=images.mean(dim=(1, 2, 3)), details={"partial": images[:, 0].mean(dim=(1, 2))})

    images = torch.cat([renders[:3], torch.full((1, 3, 32, 32), 0.5)])  # three renders and one flat grey image
    tap = QualityTap(Brightness(), quality)
    out = call_reward(tap, images, [""] * 4)
    assert torch.allclose(out.scores, images.mean(dim=(1, 2, 3)))  # the target's scores, unchanged
    assert torch.allclose(out.details["partial"], images[:, 0].mean(dim=(1, 2)))
    q = torch.cat(tap.qualities)
    assert torch.allclose(q, quality(images, [""] * 4).scores)
    assert q[:3].min() > 0.5 and q[3] < 0.05  # the degenerate image is flagged

    class Fails(Reward):  # fails on dark images: dropped, but its quality is still recorded
        def score(self, images, prompts, metadata):
            if (images.mean(dim=(1, 2, 3)) < 0.3).any():
                raise RuntimeError("too dark")
            return RewardOutput(scores=images.mean(dim=(1, 2, 3)))

    dark = torch.cat([renders[:2], torch.zeros(1, 3, 32, 32)])
    tap = QualityTap(Fails(), quality, on_error="drop")
    out = call_reward(tap, dark, [""] * 3, on_error="drop")
    assert torch.isnan(out.scores[2]) and torch.isfinite(out.scores[:2]).all()
    assert torch.cat(tap.qualities).shape == (3,)


PROMPTS = '{"prompt": "a red circle", "tag": "single"}\n{"prompt": "two blue squares", "tag": "counting"}\n'


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    """``flowalign eval --corrected-by`` on the tiny random SD3 pipeline (its images are noise-like)."""
    from flowalign.train import cli

    root = tmp_path_factory.mktemp("corrected_eval")
    (root / "p.jsonl").write_text(PROMPTS)
    args = ["eval", "--model", "tiny-sd3", "--prompts", str(root / "p.jsonl"), "--reward", "brightness", "--num-samples", "6",
            "--steps", "2", "--guidance", "1", "--no-progress", "--batch-size", "4"]
    assert cli.main([*args, "--corrected-by", "--corrected-q0", "0.2", "--corrected-c", "0.1", "--out", str(root / "out")]) == 0
    return root, args


def test_eval_corrected_by_reports_the_combination_per_category(tiny_eval):
    import json

    from flowalign.config import ModelConfig
    from flowalign.evaluation import evaluate
    from flowalign.prompts import load_prompts
    from flowalign.rewards import load_reward
    from flowalign.train.model import build_adapter

    root, _ = tiny_eval
    data = json.loads((root / "out" / "eval.json").read_text())
    corrected = data["corrected"]
    assert (corrected["quality"], corrected["q0"], corrected["c"]) == ("image_stats_quality", 0.2, 0.1)
    # independent check: redraw the same samples, score their quality directly
    adapter = build_adapter(ModelConfig(pretrained="tiny-sd3"), torch.device("cpu"))
    again = evaluate(adapter, load_prompts(root / "p.jsonl"), load_reward("brightness"), num_samples=6, num_steps=2,
                     guidance_scale=1.0, keep_images=6, progress=False)
    q = ImageStatsQuality()(again.images_for(range(6)), [""] * 6).scores
    assert corrected["quality_scores"] == pytest.approx(q.tolist(), abs=1e-5)
    r = torch.tensor(data["samples"]["score"])
    assert torch.allclose(r, again.scores, atol=1e-6)
    tags = data["samples"]["tag"]
    for name in ("single", "counting", "all"):
        rows = [i for i, t in enumerate(tags) if name in ("all", t)]
        stats = corrected["categories"][name]
        expected = sum(float(r[i]) * (float(q[i]) - 0.2) + 0.1 for i in rows) / len(rows)
        assert stats["count"] == len(rows) and stats["mean_corrected"] == pytest.approx(expected, abs=1e-5)
        assert stats["mean_reward"] == pytest.approx(float(r[rows].mean()), abs=1e-6)
    # the random tiny model draws noise, not scenes: the quality signal flags every sample
    assert corrected["categories"]["all"]["low_quality"] == 6 and max(corrected["quality_scores"]) < 0.5
    md = (root / "out" / "eval.md").read_text()
    assert "brightness · (q − 0.2) + 0.1" in md and "| **all** | 6 |" in md


def test_eval_quality_fitted_on_the_models_own_samples_is_high(tiny_eval, tmp_path, capsys):
    from flowalign.config import ModelConfig
    from flowalign.evaluation import evaluate
    from flowalign.rewards import load_reward
    from flowalign.train import cli
    from flowalign.train.model import build_adapter

    root, args = tiny_eval
    adapter = build_adapter(ModelConfig(pretrained="tiny-sd3"), torch.device("cpu"))
    own = evaluate(adapter, ["a red circle", "two blue squares"], load_reward("brightness"), num_samples=32, num_steps=2,
                   guidance_scale=1.0, seed=1000, keep_images=32, progress=False)  # other seeds than the eval's
    ImageStatsQuality(own.images_for(range(32))).save(tmp_path / "ref.json")
    capsys.readouterr()
    assert cli.main([*args, "--corrected-by", "--corrected-reference", str(tmp_path / "ref.json")]) == 0
    printed = capsys.readouterr().out
    line = [ln for ln in printed.splitlines() if ln.startswith("| **all** | 6 |")][-1]  # the corrected table comes second
    mean_q, low = float(line.split("|")[4]), int(line.split("|")[5])
    assert mean_q > 0.8 and low == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--corrected-reference", "ref.json"], "--corrected-reference needs --corrected-by"),
        (["--corrected-by", "--corrected-q0", "nan"], "--corrected-q0 must be a finite number"),
        (["--corrected-by", "no_such_quality"], "no_such_quality"),
        (["--corrected-by", "brightness", "--corrected-reference", "x.json"], "only applies to --corrected-by image_stats_quality"),
    ],
)
def test_eval_corrected_bad_input_is_one_line_exit_2(tiny_eval, capsys, extra, message):
    from flowalign.train import cli

    _, args = tiny_eval
    capsys.readouterr()
    assert cli.main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowalign eval: error:") and "\n" not in err and message in err


def test_image_statistics_of_a_coloured_image_by_hand():
    """The black / white image has no saturation and a Laplacian that any centre weight of 2 or 4 reads alike: a
    coloured image with one bright pixel tells the formulas apart."""
    img = torch.zeros(1, 3, 3, 3)
    img[0, 0], img[0, 1], img[0, 2] = 0.5, 0.25, 0.25  # every pixel (0.5, 0.25, 0.25): saturation (0.5 - 0.25) / 0.5
    img[0, :, 1, 1] = 1.0  # the centre pixel white: luma 1 among luma 0.299·0.5 + 0.587·0.25 + 0.114·0.25 = 0.32425
    f = dict(zip(FEATURES, image_statistics(img)[0].tolist()))
    assert f["saturation"] == pytest.approx(8 / 9 * 0.5)  # 8 coloured pixels at 0.5, the white one at 0
    luma = 0.299 * 0.5 + 0.587 * 0.25 + 0.114 * 0.25
    assert f["log_laplacian_energy"] == pytest.approx(math.log(1e-3 + 4 * (1 - luma)), abs=1e-6)  # one interior pixel


def test_quality_is_exp_of_minus_half_the_mean_squared_excess_by_hand(monkeypatch):
    import flowalign.corrected as corrected

    features = torch.tensor([[4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [1.0, -5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.5]])
    monkeypatch.setattr(corrected, "image_statistics", lambda images, bins=4: features[: images.shape[0]])
    quality = ImageStatsQuality(reference=torch.zeros(8, 3, 4, 4), tolerance=3.0)
    quality.center, quality.scale = torch.zeros(8), torch.ones(8)
    q = quality.score(torch.zeros(2, 3, 4, 4), ["a", "b"], [{}, {}]).scores
    # excess max(0, |z| - 3): row 0 [1, 0, ...] -> d2 = 1/8; row 1 [0, 2, 0, ..., 0.5] -> d2 = (4 + 0.25) / 8
    assert q.tolist() == pytest.approx([math.exp(-0.5 / 8), math.exp(-0.5 * 4.25 / 8)])


def test_fit_takes_the_median_and_1_4826_mad_plus_a_floor_by_hand(monkeypatch):
    import flowalign.corrected as corrected

    column = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 2.0, 3.0, 3.0, 20.0])  # median 3, |f - 3| median 1
    features = column[:, None].expand(9, len(FEATURES)).clone()
    monkeypatch.setattr(corrected, "image_statistics", lambda images, bins=4: features)
    quality = ImageStatsQuality(reference=torch.zeros(9, 3, 4, 4))
    assert quality.center.tolist() == pytest.approx([3.0] * len(FEATURES))
    assert quality.scale.tolist() == pytest.approx([1.4826 * 1.0 + 0.05 * 3.0 + 0.01] * len(FEATURES))
