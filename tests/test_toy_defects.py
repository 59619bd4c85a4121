"""Defects in the toy's pretraining data: cut-in-two renditions (``split_renditions``) and watermarks (``watermarked_renditions``)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flowalign.pipelines import toy
from flowalign.rewards import shapes_scenes as S
from flowalign.rewards.shapes import detect, evaluate


def _brute_force_cut(image: np.ndarray, objects: list[set], centroids: list[tuple[float, float]], angles: list[float],
                     width: float) -> np.ndarray:
    """Pixel by pixel: within each object's own pixels, each pixel centre's distance to its cut line, coverage 1 inside
    half the width, linear over one pixel."""
    out = image.astype(np.float64)
    for pixels, (cy, cx), angle in zip(objects, centroids, angles):
        for y, x in pixels:
            distance = abs((x + 0.5 - cx) * math.sin(angle) - (y + 0.5 - cy) * math.cos(angle))
            c = min(max(width / 2 + 0.5 - distance, 0.0), 1.0)
            out[y, x] = out[y, x] * (1 - c) + np.asarray(S.BACKGROUND) * c
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_split_renditions_cut_each_object_through_its_centroid_as_a_brute_force_reference_does():
    spec = S.parse_prompt("a red square and a blue circle")
    scene = S.render_spec(spec, np.random.default_rng(3))
    images = np.stack([scene] * 6)
    out, mask = S.split_renditions(images, 0.5, 1.5, seed=2)
    # the same draws, in the documented order: which scenes, then one angle per object of each cut scene
    rng = np.random.default_rng(2)
    expected_mask = rng.random(6) < 0.5
    assert np.array_equal(mask, expected_mask) and 0 < mask.sum() < 6
    background = np.asarray(S.BACKGROUND)
    objects = np.argwhere(np.abs(scene.astype(int) - background).sum(-1) > 0)
    # two objects, told apart by which side of the image they lie (the layout keeps them apart)
    from scipy import ndimage

    labels, n = ndimage.label(np.abs(scene.astype(int) - background).sum(-1) > 0)
    assert n == 2 and len(objects) == (labels > 0).sum()
    centroids = [tuple(np.argwhere(labels == k).mean(0) + 0.5) for k in (1, 2)]
    objects = [{tuple(q) for q in np.argwhere(labels == k)} for k in (1, 2)]
    for i in range(6):
        if not mask[i]:
            assert np.array_equal(out[i], images[i])
            continue
        angles = [rng.uniform(0.0, np.pi) for _ in range(2)]
        assert np.array_equal(out[i], _brute_force_cut(scene, objects, centroids, angles, 1.5)), i
        # each object lost its centre pixel to the background
        for cy, cx in centroids:
            assert tuple(out[i][int(cy), int(cx)]) == S.BACKGROUND
    assert out is not images and np.array_equal(images[0], scene)  # the input is untouched


def test_the_verifier_fails_most_cut_scenes_and_passes_every_intact_one():
    images, specs = S.training_scenes(4, 120)
    cut, mask = S.split_renditions(images, 0.5, 1.5, seed=1)
    verdicts = np.array([evaluate(detect(image.astype(np.float32)), spec)[0] for image, spec in zip(cut, specs)])
    assert verdicts[~mask].all()
    assert 20 < mask.sum() < 100 and verdicts[mask].mean() < 0.3  # 87% of cut scenes fail on 600 scenes


def test_split_renditions_are_deterministic_and_check_their_arguments():
    images, _ = S.training_scenes(5, 40)
    a, ma = S.split_renditions(images, 0.3, 1.5, seed=9)
    b, mb = S.split_renditions(images, 0.3, 1.5, seed=9)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    none, m0 = S.split_renditions(images, 0.0, 1.5, seed=9)
    assert not m0.any() and np.array_equal(none, images)
    with pytest.raises(ValueError, match="split fraction"):
        S.split_renditions(images, 1.2, 1.5, seed=0)
    with pytest.raises(ValueError, match="split width"):
        S.split_renditions(images, 0.5, 0.0, seed=0)
    with pytest.raises(ValueError, match="uint8 images"):
        S.split_renditions(images[0], 0.5, 1.5, seed=0)
    with pytest.raises(ValueError, match="split_fraction"):
        toy.ToyBuildConfig(split_fraction=2.0)


def test_build_applies_the_configured_defects_and_the_cli_passes_the_flags(tmp_path, toy_smoke):
    rc = toy.main(["build", "--out", str(tmp_path / "m"), "--n-scenes", "40", "--dit-steps", "1", "--dit-batch", "4", "--vae-steps", "1",
                   "--eval-samples", "0", "--split-fraction", "0.5", "--split-width", "2.0",
                   "--watermark-fraction", "0.25", "--watermark-opacity", "0.5", "--summary", str(tmp_path / "s.json"),
                   "--dit-layers", str(toy_smoke["dit_layers"])])
    assert rc == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["config"]["split_fraction"] == 0.5 and summary["config"]["split_width"] == 2.0
    assert 10 <= summary["split_scenes"] <= 30
    assert summary["config"]["watermark_fraction"] == 0.25 and summary["config"]["watermark_opacity"] == 0.5
    assert 3 <= summary["watermarked_scenes"] <= 18


def test_watermark_coverage_matches_the_distance_to_the_nearest_stripe_by_brute_force():
    coverage = S.watermark_coverage(32, period=10.0, width=2.0)
    for y in range(32):
        for x in range(32):
            # stripes are the lines x + y = 10 k; a pixel centre's distance to line k is |x + y + 1 - 10 k| / sqrt(2)
            d = min(abs(x + y + 1 - 10 * k) for k in range(8)) / math.sqrt(2)
            assert coverage[y, x] == pytest.approx(min(max(1.5 - d, 0.0), 1.0), abs=1e-12)
    assert coverage[0, 9] == 1.0 and coverage[0, 4] == 0.0  # x + y + 1 = 10 on a stripe; 5 halfway between two


def test_watermarked_renditions_stamp_the_chosen_scenes_alike_and_leave_the_rest():
    images, specs = S.training_scenes(6, 80)
    out, mask = S.watermarked_renditions(images, 0.5, 0.7, seed=4)
    assert np.array_equal(mask, np.random.default_rng(4).random(80) < 0.5)
    c = 0.7 * S.watermark_coverage(32)[..., None]
    expected = np.clip(np.rint(images[mask].astype(np.float64) * (1 - c) + S.WATERMARK_GRAY * c), 0, 255)
    assert np.array_equal(out[mask], expected.astype(np.uint8)) and np.array_equal(out[~mask], images[~mask])
    verdicts = np.array([evaluate(detect(image.astype(np.float32)), spec)[0] for image, spec in zip(out, specs)])
    assert verdicts[~mask].all() and verdicts[mask].mean() < 0.25
    with pytest.raises(ValueError, match="watermark fraction"):
        S.watermarked_renditions(images, -0.1, 0.7, seed=0)
    with pytest.raises(ValueError, match="watermark opacity"):
        S.watermarked_renditions(images, 0.5, 1.7, seed=0)
    with pytest.raises(ValueError, match="watermark_fraction"):
        toy.ToyBuildConfig(watermark_fraction=1.5)
