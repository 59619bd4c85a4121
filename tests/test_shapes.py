"""Toy world: caption grammar, held-out split, renderer and the ``shapes`` verifier."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flowalign.errors import ConfigError, RewardError
from flowalign.rewards import load_reward
from flowalign.rewards import shapes_scenes as S
from flowalign.rewards.shapes import (FAILURE_MODES, ShapesReward, classify_shape, detect, evaluate, failure_mode, relative_position, soft_fill,
                                       split_touching)


def _all() -> list[dict]:
    return [s for t in S.TAGS for s in S.all_specs(t)]


def _images(arrays: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0


def test_grammar_counts_and_round_trip():
    # 3 shapes, 6 colours: 3 + 6 + 3*7*3 + 18 + 6*4 + 6*36 distinct captions
    assert [len(S.all_specs(t)) for t in S.TAGS] == [3, 6, 63, 18, 24, 216]
    prompts = [s["prompt"] for s in _all()]
    assert len(set(prompts)) == len(prompts)
    for spec in _all():
        assert S.parse_prompt(spec["prompt"]) == spec
    assert S.parse_prompt("A photo of a Red circle.")["include"] == [{"shape": "circle", "count": 1, "color": "red"}]
    with pytest.raises(ValueError, match="not in the shapes caption grammar"):
        S.parse_prompt("a red dog")
    with pytest.raises(ValueError, match="not in the shapes caption grammar"):
        S.parse_prompt("a red circle and a square")


def test_position_spec_is_geneval_order():
    spec = S.parse_prompt("a circle left of a square")
    assert spec["include"] == [{"shape": "square", "count": 1}, {"shape": "circle", "count": 1, "position": ["left of", 0]}]
    assert S.parse_prompt("three red triangles")["exclude"] == [{"shape": "triangle", "color": "red", "count": 4}]


def test_heldout_split_and_prompt_files(tmp_path):
    train, held = S.load_prompts("train"), S.load_prompts("heldout")
    assert len(train) == 384 and len(held) == 320
    assert train == S.prompt_set(False) and held == S.prompt_set(True)  # files regenerate exactly
    written = S.write_jsonl(S.prompt_set(True), tmp_path / "sub" / "held.jsonl")  # how the shipped files were made
    assert written.read_bytes() == (S.prompts_dir() / "shapes_heldout.jsonl").read_bytes()
    assert S.read_jsonl(written) == held
    assert not {s["prompt"] for s in train} & {s["prompt"] for s in held}
    for spec in train:
        assert not S.is_heldout(spec)
        for obj in spec["include"]:
            assert (obj.get("color"), obj["shape"]) not in S.HELDOUT_COLOR_SHAPES
        if len(spec["include"]) == 2:
            assert frozenset(o["shape"] for o in spec["include"]) not in S.HELDOUT_SHAPE_PAIRS
    for spec in held:
        named = {(o.get("color"), o["shape"]) for o in spec["include"]}
        shapes = frozenset(o["shape"] for o in spec["include"])
        assert named & S.HELDOUT_COLOR_SHAPES or shapes in S.HELDOUT_SHAPE_PAIRS
    assert {s["tag"] for s in held} == set(S.HELDOUT_TAGS)


def test_training_scenes_deterministic_and_never_heldout():
    a, specs_a = S.training_scenes(3, 200)
    b, specs_b = S.training_scenes(3, 200)
    c, _ = S.training_scenes(4, 200)
    assert a.shape == (200, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and specs_a == specs_b and not np.array_equal(a, c)
    assert not any(S.is_heldout(s) for s in specs_a)
    assert {s["tag"] for s in specs_a} == set(S.TAGS)


def test_training_scenes_with_heldout_cover_every_caption_at_the_expected_rate():
    n = 3000
    _, specs = S.training_scenes(5, n, include_heldout=True)
    # independent expectation: categories uniform, captions uniform within a category
    expected = sum(len(S.split_specs(t, heldout=True)) / len(S.all_specs(t)) for t in S.TAGS) / len(S.TAGS)
    frac = sum(S.is_heldout(s) for s in specs) / n
    assert abs(frac - expected) < 4 * (expected * (1 - expected) / n) ** 0.5, (frac, expected)
    assert {s["tag"] for s in specs if S.is_heldout(s)} == set(S.HELDOUT_TAGS)
    images, again = S.training_scenes(5, 50, include_heldout=True)
    assert again == specs[:50] and images.shape == (50, 32, 32, 3)


def test_uncaptioned_heldout_blanks_exactly_the_heldout_captions():
    _, specs = S.training_scenes(6, 400, include_heldout=True)
    captions = [s["prompt"] for s in specs]
    out = S.uncaptioned_heldout(specs, captions)
    assert len(out) == len(specs)
    for spec, before, after in zip(specs, captions, out):
        assert after == ("" if S.is_heldout(spec) else before)
    held = {s["prompt"] for s in S.load_prompts("heldout")}
    assert not held & set(out)  # no held-out caption is ever read
    assert 0 < out.count("") < len(out)
    with pytest.raises(ValueError, match="2 specs but 1 captions"):
        S.uncaptioned_heldout(specs[:2], captions[:1])


def test_layout_respects_constraints():
    rng = np.random.default_rng(0)
    for spec in S.all_specs("position") + S.all_specs("counting"):
        objs = S.layout(spec, rng)
        assert len(objs) == sum(i["count"] for i in spec["include"])
        for i, p in enumerate(objs):  # boxes inside the image, 2-pixel gaps
            assert all(1 - 1e-9 <= p["center"][k] - p["size"] / 2 and p["center"][k] + p["size"] / 2 <= 31 + 1e-9 for k in (0, 1))
            for q in objs[i + 1 :]:
                gap = max(abs(p["center"][0] - q["center"][0]), abs(p["center"][1] - q["center"][1]))
                assert gap >= (p["size"] + q["size"]) / 2 + 2 - 1e-9
        if spec["tag"] == "position":
            rel = spec["include"][1]["position"][0]
            (ax, ay), (bx, by) = objs[1]["center"], objs[0]["center"]
            expected = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[rel]
            assert expected


def test_render_draws_palette_colours_on_background():
    img = S.render([{"shape": "square", "color": "red", "size": 10.0, "center": (10.0, 10.0)}])
    assert tuple(img[10, 10]) == S.PALETTE["red"]
    assert tuple(img[25, 25]) == S.BACKGROUND
    # a 0.88*10 = 8.8-pixel square, sampled on a 4x4 grid per pixel: count the sample points
    inside = sum(abs((k + 0.5) / 4 - 10.0) <= 4.4 for k in range(128))  # per side
    covered = (img.astype(float) - S.BACKGROUND)[..., 1].sum() / (S.PALETTE["red"][1] - S.BACKGROUND[1])
    assert covered == pytest.approx(inside**2 / 16, abs=0.3)  # uint8 rounding of edge pixels


def test_segment_labels_palette_pixels_background_and_unexplained_ones():
    from flowalign.rewards.shapes import segment

    img = np.full((6, 6, 3), S.BACKGROUND, np.float32)
    img[1, 1] = S.PALETTE["blue"]
    half = (np.asarray(S.PALETTE["cyan"], np.float32) + np.asarray(S.BACKGROUND, np.float32)) / 2
    img[2, 2] = half  # an anti-aliased edge: half cyan, half background
    img[4, 4] = (0, 0, 0)  # black: neither background nor a blend of one palette colour with it
    labels = segment(img)
    assert labels.shape == (6, 6) and labels.dtype.kind == "i"
    assert labels[1, 1] == list(S.PALETTE).index("blue") and labels[2, 2] == list(S.PALETTE).index("cyan")
    assert labels[4, 4] == -2
    assert labels[0, 0] == -1 and (labels == -1).sum() == 33


def test_classify_shape_on_hand_drawn_masks():
    yy, xx = np.mgrid[0:20, 0:20]
    disk = (xx - 9.5) ** 2 + (yy - 9.5) ** 2 <= 7.5**2
    square = (abs(xx - 9.5) <= 6) & (abs(yy - 9.5) <= 6)
    triangle = (yy >= 3) & (yy <= 16) & (abs(xx - 9.5) <= (yy - 3) * 0.5)
    assert classify_shape(disk)[0] == "circle"
    assert classify_shape(square)[0] == "square"
    assert classify_shape(triangle)[0] == "triangle"


def test_soft_fill_hand_worked():
    alpha = np.zeros((8, 8))
    alpha[2:6, 2:6] = 1.0  # a 4x4 square: 16 / (4 * 4)
    region = np.ones((8, 8), bool)
    assert soft_fill(alpha, region) == pytest.approx(1.0)
    alpha[2:6, 1] = 0.5  # half-covered column on the left: area 18, width 4.5, height 4
    assert soft_fill(alpha, region) == pytest.approx(18 / (4.5 * 4))
    assert soft_fill(alpha, np.zeros((8, 8), bool)) == 0.0
    # a finely sampled disc gives pi/4
    yy, xx = (np.mgrid[0:400, 0:400] + 0.5) / 20
    disc = ((xx - 10) ** 2 + (yy - 10) ** 2 <= 49).astype(float).reshape(20, 20, 20, 20).mean(axis=(1, 3))
    assert soft_fill(disc, np.ones_like(disc, bool)) == pytest.approx(np.pi / 4, abs=0.02)


def test_relative_position_geneval_rule():
    a = {"box": (0, 10, 6, 16), "center": (3, 13)}
    b = {"box": (20, 10, 26, 16), "center": (23, 13)}
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    # offset (20, -20): revised |20| - 0.1 * 12 = 18.8 on both axes, / 28.28 = 0.66 > 0.5: both relations
    c = {"box": (20, -10, 26, -4), "center": (23, -7)}
    assert relative_position(c, a) == {"right of", "above"}
    e = {"box": (20, 0, 26, 6), "center": (23, 3)}  # offset (20, -10): dy = -8.8 / 22.4 = -0.39, not above
    assert relative_position(e, a) == {"right of"}
    d = {"box": (1, 11, 7, 17), "center": (4, 14)}  # offset 1 px < 0.1 * (6 + 6): no relation
    assert relative_position(a, d) == set()


def test_evaluate_partial_credit_hand_worked():
    red_circle = {"shape": "circle", "color": "red", "box": (2, 2, 10, 10), "center": (6, 6)}
    spec = S.parse_prompt("a red circle and a blue square")
    # constraints: circle present, red circle present, square present, blue square present
    assert evaluate([red_circle], spec) == (False, 0.5)
    blue_square = {"shape": "square", "color": "blue", "box": (20, 2, 28, 10), "center": (24, 6)}
    assert evaluate([red_circle, blue_square], spec) == (True, 1.0)
    green_square = {**blue_square, "color": "green"}
    assert evaluate([red_circle, green_square], spec) == (False, 0.75)
    count = S.parse_prompt("two circles")  # include >= 2 circles, exclude >= 3
    three = [red_circle, {**red_circle, "center": (20, 20)}, {**red_circle, "center": (20, 6)}]
    assert evaluate(three[:2], count) == (True, 1.0)
    assert evaluate(three, count) == (False, 0.5)
    pos = S.parse_prompt("a circle right of a square")  # square anchor, circle right of it
    assert evaluate([red_circle, blue_square], pos) == (False, 2 / 3)
    assert evaluate([{**red_circle, "box": (20, 20, 28, 28), "center": (24, 24)}, {**blue_square, "box": (2, 20, 10, 28), "center": (6, 24)}], pos) == (True, 1.0)


def test_evaluate_graded_count_credit_hand_worked():
    g = {"shape": "triangle", "color": "green"}
    spec = S.parse_prompt("three green triangles")  # >= 3 triangles, >= 3 green triangles, not >= 4 green triangles
    two = [{**g, "center": (6, 6)}, {**g, "center": (20, 6)}]
    # all-or-nothing: [0, 0, 1] -> 1/3; graded: [2/3, 2/3, 1] -> 7/9
    assert evaluate(two, spec) == (False, 1 / 3)
    ok, frac = evaluate(two, spec, graded=True)
    assert not ok and abs(frac - 7 / 9) < 1e-9
    # one green and one red triangle: shape credit 2/3, colour credit 1/3, exclusion met -> 2/3
    mixed = [{**g, "center": (6, 6)}, {**g, "color": "red", "center": (20, 6)}]
    ok, frac = evaluate(mixed, spec, graded=True)
    assert not ok and abs(frac - 2 / 3) < 1e-9
    # a met spec stays (True, 1.0), and graded never lifts a failed verdict
    three = two + [{**g, "center": (20, 20)}]
    assert evaluate(three, spec, graded=True) == (True, 1.0)
    assert evaluate(three + [{**g, "center": (6, 20)}], spec, graded=True)[0] is False


def _o(shape: str, color: str, x: float, y: float) -> dict:
    return {"shape": shape, "color": color, "box": (x - 4, y - 4, x + 4, y + 4), "center": (x, y)}


def test_failure_mode_names_the_first_broken_level():
    pair = S.parse_prompt("a red circle and a blue square")
    assert failure_mode([_o("circle", "red", 6, 6), _o("square", "blue", 24, 6)], pair) == "correct"
    # the square is missing: with a shapeless blob in the scene it is "malformed", without it "shape_count"
    assert failure_mode([_o("circle", "red", 6, 6), _o("other", "blue", 24, 6)], pair) == "malformed"
    assert failure_mode([_o("circle", "red", 6, 6), _o("circle", "blue", 24, 6)], pair) == "shape_count"
    assert failure_mode([_o("circle", "red", 6, 6)], pair) == "shape_count"
    # both shapes, one in the wrong colour
    assert failure_mode([_o("circle", "red", 6, 6), _o("square", "green", 24, 6)], pair) == "color"
    # a blob beside correct shapes does not fail the scene (GenEval ignores extra objects)
    assert failure_mode([_o("circle", "red", 6, 6), _o("square", "blue", 24, 6), _o("other", "red", 6, 24)], pair) == "correct"
    count = S.parse_prompt("two blue circles")  # >= 2 blue circles, < 3
    assert failure_mode([_o("circle", "blue", 6, 6), _o("circle", "blue", 24, 6), _o("circle", "blue", 6, 24)], count) == "shape_count"
    assert failure_mode([_o("circle", "blue", 6, 6), _o("circle", "purple", 24, 6)], count) == "color"
    # the exclusion counts the requested kind: two blue circles and a purple one pass, one blue and two
    # purple ones fail on colour (not on "too many circles")
    assert failure_mode([_o("circle", "blue", 6, 6), _o("circle", "blue", 24, 6), _o("circle", "purple", 6, 24)], count) == "correct"
    assert failure_mode([_o("circle", "blue", 6, 6), _o("circle", "purple", 24, 6), _o("circle", "purple", 6, 24)], count) == "color"
    pos = S.parse_prompt("a circle right of a square")
    assert failure_mode([_o("circle", "red", 6, 6), _o("square", "blue", 24, 6)], pos) == "position"
    assert failure_mode([_o("circle", "red", 24, 6), _o("square", "blue", 6, 6)], pos) == "correct"
    # nothing detected at all, for any spec (every spec asks for at least one object)
    assert failure_mode([], pair) == "empty" and failure_mode([], count) == "empty" and failure_mode([], pos) == "empty"
    assert failure_mode(detect(np.full((32, 32, 3), 238.0, np.float32)), pair) == "empty"  # a blank background
    assert set(FAILURE_MODES) == {"correct", "empty", "malformed", "shape_count", "color", "position"}


def test_failure_mode_agrees_with_the_verdict_on_rendered_and_noise_scenes():
    rng = np.random.default_rng(11)
    pool = _all()
    for k in range(60):
        spec = pool[rng.integers(len(pool))]
        img = S.render_spec(spec, rng).astype(np.float32)
        if k % 3 == 1:  # a scene of another spec
            img = S.render_spec(pool[rng.integers(len(pool))], rng).astype(np.float32)
        elif k % 3 == 2:  # smeared: a blurred copy
            img = (img + np.roll(img, 2, axis=0) + np.roll(img, 2, axis=1)) / 3
        objects = detect(img)
        assert (failure_mode(objects, spec) == "correct") == evaluate(objects, spec)[0]


@pytest.fixture(scope="module")
def ground_truth():
    """1,000 fresh scenes, categories uniform (specs drawn uniformly over captions were 63% colour attribution and 1%
    single objects, so a category could fail without moving the total)."""
    rng = np.random.default_rng(2024)
    specs = S.sample_specs(rng, 1000, heldout=None)
    return _images(np.stack([S.render_spec(s, rng) for s in specs])), specs


def test_verifier_accepts_ground_truth(ground_truth):
    images, specs = ground_truth
    reward = load_reward("shapes")
    assert isinstance(reward, ShapesReward)
    out = reward(images, [s["prompt"] for s in specs], specs)
    assert out.scores.shape == (1000,) and out.scores.dtype == torch.float32
    assert out.scores.mean().item() >= 0.99
    tags = np.array([s["tag"] for s in specs])
    for tag in S.TAGS:
        assert (tags == tag).sum() >= 120 and out.scores.numpy()[tags == tag].mean() >= 0.98, tag
    assert out.details["partial"].min().item() >= 0.5 and out.details["tag"] == [s["tag"] for s in specs]
    # prompts alone (parsed with the grammar) give the same verdicts as the metadata
    parsed = reward(images[:200], [s["prompt"] for s in specs[:200]])
    assert torch.equal(parsed.scores, out.scores[:200])


def test_verifier_rejects_noise_and_wrong_specs(ground_truth):
    images, specs = ground_truth
    reward = ShapesReward()
    prompts = [s["prompt"] for s in specs]
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    assert reward(noise, prompts).scores.mean().item() <= 0.05
    blank = torch.full_like(images[:50], S.BACKGROUND[0] / 255.0)
    assert reward(blank, prompts[:50]).scores.sum().item() == 0


def test_verifier_rejects_near_misses_one_attribute_off(ground_truth):
    """Scenes of the wrong spec: a caption one attribute off (another colour, count, shape or relation, or two colours
    swapped), what a model gets wrong. (Shuffled captions, the test before, are often right: "a circle" holds for a
    scene of "a red circle and a blue square", 14% of them with categories drawn uniformly.)"""
    images, specs = ground_truth
    rng = np.random.default_rng(3)
    rows, near = [], []
    for i, spec in enumerate(specs):
        options = S.caption_neighbors(spec)
        if options:
            rows.append(i)
            near.append(options[rng.integers(len(options))])
    assert len(rows) >= 800 and {n["tag"] for n in near} == set(S.TAGS)
    out = ShapesReward()(images[rows], [n["prompt"] for n in near], near)
    assert out.scores.mean().item() <= 0.05


def test_verifier_detects_counts_and_resizes():
    rng = np.random.default_rng(5)
    spec = S.parse_prompt("four cyan squares")
    img = S.render_spec(spec, rng)
    objects = detect(img.astype(np.float32))
    assert [(o["shape"], o["color"]) for o in objects] == [("square", "cyan")] * 4
    big = torch.nn.functional.interpolate(_images(img[None]), scale_factor=2, mode="nearest")
    reward = ShapesReward()
    assert reward(big, ["four cyan squares"]).scores.tolist() == [1.0]
    assert reward(big, ["three cyan squares"]).scores.tolist() == [0.0]
    from flowalign.errors import RewardError

    with pytest.raises(RewardError, match="images"):
        reward(big[:, :1], ["four cyan squares"])
    with pytest.raises(RewardError, match=r"must be in \[0, 1\]"):  # 0..255 floats scored 0 silently (clamped to 1)
        reward(big * 255, ["four cyan squares"])
    with pytest.raises(RewardError, match="must be float"):
        reward((big * 255).to(torch.uint8), ["four cyan squares"])


def test_reward_labels_each_sample_and_evaluate_keeps_the_labels(ground_truth):
    images, specs = ground_truth
    reward = ShapesReward(score="mix")
    prompts = [s["prompt"] for s in specs[:120]]
    wrong = prompts[60:] + prompts[:60]  # half the scenes scored against another caption
    out = reward(images[:120], wrong, [{}] * 120)
    labels = out.details["failure"]
    assert len(labels) == 120 and set(labels) <= set(FAILURE_MODES)
    assert [lab == "correct" for lab in labels] == [bool(b) for b in out.details["binary"].tolist()]
    assert "correct" in labels and len(set(labels)) >= 3

    from flowalign.evaluation import evaluate

    def labelled(imgs, ps, meta):
        n = len(ps)
        return type(out)(scores=torch.ones(n), details={"failure": ["correct" if i % 2 else "color" for i in range(n)]})

    from flowalign.pipelines import load_adapter
    from flowalign.pipelines.testing import tiny_sd3_pipeline

    adapter = load_adapter(tiny_sd3_pipeline(seed=0, with_t5=False))
    result = evaluate(adapter, ["a", "b", "c"], labelled, num_samples=5, num_steps=1, guidance_scale=1.0, batch_size=2, progress=False)
    assert result.failures == ["color", "correct", "color", "correct", "color"]  # per batch of 2, 2, 1
    unlabelled = evaluate(adapter, ["a"], lambda i, p, m: type(out)(scores=torch.ones(len(p))), num_samples=2, num_steps=1,
                          guidance_scale=1.0, progress=False)
    assert unlabelled.failures is None


def test_an_explicit_spec_needs_no_caption_of_the_grammar():
    """metadata["include"] is the spec: a prompt outside the caption grammar is scored by it (tag "untagged"
    unless the metadata names one), where it used to raise while looking up a tag it did not need."""
    from flowalign.rewards.shapes import ShapesReward
    from flowalign.rewards.shapes_scenes import render

    image = torch.from_numpy(render([{"shape": "circle", "color": "red", "size": 11.0, "center": (16.0, 16.0)}])).permute(2, 0, 1)[None].float() / 255
    spec = {"include": [{"shape": "circle", "count": 1, "color": "red"}]}
    out = ShapesReward(score="binary")(image, ["one round red thing"], [spec])
    assert out.scores.tolist() == [1.0] and out.details["tag"] == ["untagged"]
    wrong = ShapesReward(score="binary")(image, ["one round red thing"], [{"include": [{"shape": "square", "count": 1}], "tag": "custom"}])
    assert wrong.scores.tolist() == [0.0] and wrong.details["tag"] == ["custom"]


@pytest.mark.parametrize("width", [96, 128, 160])
def test_a_non_square_image_is_padded_not_squashed(width):
    """H != W was area-resized straight to 32x32: a 64 x 128 scene's circle became a 2:1 ellipse ('other'), so 'a red
    circle' scored 0. The scene is padded to a square with the background first, which keeps the aspect."""
    img = S.render([{"shape": "circle", "color": "red", "size": 20, "center": (16, 16)}])
    x = torch.nn.functional.interpolate(_images(img[None]), scale_factor=2, mode="nearest")  # a 40 px circle in 64 x 64
    wide = torch.full((1, 3, 64, width), S.BACKGROUND[0] / 255.0)
    wide[..., (width - 64) // 2:(width - 64) // 2 + 64] = x
    reward = ShapesReward()
    assert reward(wide, ["a red circle"]).scores.tolist() == [1.0]
    assert reward(wide.transpose(-1, -2).contiguous(), ["a red circle"]).scores.tolist() == [1.0]  # tall as well
    assert reward(wide, ["a red square"]).scores.tolist() == [0.0]


def test_degenerate_specs_an_exclude_without_count_and_no_constraints():
    """An exclude entry without "count" raised KeyError (include entries default to 1); a spec with no constraints
    gave a NaN partial score."""
    red_circle = [{"shape": "circle", "color": "red", "box": (10, 10, 20, 20), "center": (15.0, 15.0)}]
    assert evaluate(red_circle, {"include": [], "exclude": [{"shape": "circle"}]}) == (False, 0.0)  # none allowed
    assert evaluate(red_circle, {"include": [], "exclude": [{"shape": "square"}]}) == (True, 1.0)
    assert evaluate(red_circle, {"include": [], "exclude": []}) == (True, 1.0)


@pytest.mark.parametrize("contrast", [0.7, 0.9, 1.1])
def test_a_faded_or_brighter_render_keeps_its_shape(ground_truth, contrast):
    """soft_fill read the colour's strength as fill: a disc drawn at 90% contrast measured as a square, so "a red
    square" accepted a pale red circle (about half of all scenes failed at 0.9)."""
    images, specs = ground_truth
    background = torch.tensor(S.BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 255.0
    scaled = (background + contrast * (images[:300] - background)).clamp(0, 1)
    out = ShapesReward()(scaled, [s["prompt"] for s in specs[:300]], specs[:300])
    assert out.scores.mean().item() >= 0.99
    disc = S.render([{"shape": "circle", "color": "red", "size": 11.0, "center": (16.0, 16.0)}]).astype(np.float32)
    pale = S.BACKGROUND + contrast * (disc - np.float32(S.BACKGROUND))
    assert [o["shape"] for o in detect(np.clip(pale, 0, 255))] == ["circle"]


def test_soft_fill_divides_by_the_objects_own_colour_strength():
    square = np.zeros((8, 8), bool)
    square[2:6, 2:6] = True
    region = np.ones((8, 8), bool)
    half = np.where(square, 0.5, 0.0)  # a square at half strength: fill 0.5 * 16 / (2 * 2) = 2 read raw...
    assert soft_fill(half, region) == pytest.approx(0.5 * 16 / (0.5 * 4 * 0.5 * 4))
    assert soft_fill(half, region, square) == pytest.approx(1.0)  # ...and 1 once divided by its strength 0.5


def test_a_shape_wider_than_max_side_is_no_shape_whatever_its_kind():
    """The limit was an area (400 px): a 24-px disc (448 px) failed while a 28-px triangle (392 px) passed."""
    for shape, size in (("circle", 24.0), ("triangle", 28.0), ("square", 25.0)):
        image = S.render([{"shape": shape, "color": "blue", "size": size, "center": (16.0, 16.0)}]).astype(np.float32)
        assert [o["shape"] for o in detect(image)] == ["other"], shape
        image = S.render([{"shape": shape, "color": "blue", "size": 13.0, "center": (16.0, 16.0)}]).astype(np.float32)
        assert [o["shape"] for o in detect(image)] == [shape], shape


@pytest.mark.parametrize("meta, words", [
    ({"include": []}, "'include' is empty"),
    ({"include": [{"shape": "circle", "count": 2}], "exclude": [{"shape": "circle", "count": 2}]}, "no image can meet"),
    ({"include": [{"shape": "circle", "color": "red"}], "exclude": [{"shape": "circle"}]}, "no image can meet"),
    ({"include": [{"shape": "circle", "count": 2}], "excludes": [{"shape": "circle", "count": 3}]}, "did you mean 'exclude'"),
    ({"includes": [{"shape": "circle"}]}, "did you mean 'include'"),
    ({"exclude": [{"shape": "circle"}]}, "no 'include' list"),
])
def test_specs_the_verifier_cannot_check_are_refused(meta, words):
    """Each was accepted: an empty include scored noise 1, a contradiction scored everything 0, a misspelt
    'exclude' turned "exactly two" into "two or more", and an exclude alone was dropped for the parsed caption."""
    reward = ShapesReward()
    with pytest.raises(ConfigError, match=words):
        reward.check_prompts(["two circles"], [meta])
    with pytest.raises(ValueError, match=words):
        reward(torch.rand(1, 3, 32, 32), ["two circles"], [meta])
    # a record's own field that merely resembles a spec key is not one: the caption is parsed
    reward.check_prompts(["two circles"], [{"exclusive": True, "text": "x"}])
    # a coloured include does not contradict an exclude of another colour, nor an uncoloured include a coloured exclude
    reward.check_prompts(["x", "y"], [{"include": [{"shape": "circle", "color": "red", "count": 2}], "exclude": [{"shape": "circle", "color": "blue"}]},
                                      {"include": [{"shape": "circle", "count": 2}], "exclude": [{"shape": "circle", "color": "red"}]}])


def test_check_prompts_refuses_a_metadata_list_of_another_length():
    with pytest.raises(ConfigError, match="1 metadata entries for 2 prompts"):
        ShapesReward().check_prompts(["a circle", "not a caption"], [{}])


def test_videos_are_a_reward_error_naming_the_layout():
    with pytest.raises(RewardError, match=r"scores images \[B, 3, H, W\].*videos"):
        ShapesReward()(torch.rand(1, 2, 3, 32, 32), ["a red circle"])


def test_touching_discs_and_triangles_of_one_colour_are_separate_objects():
    """One connected component per colour made two discs whose anti-aliased edges meet one shapeless blob, so "two
    green circles" failed where GenEval's instance detector sees two; side-by-side squares stay one rectangle."""
    reward = ShapesReward()
    for shape, caption in (("circle", "two green circles"), ("triangle", "two green triangles")):
        for size in (7.0, 9.0, 11.0):
            image = S.render([{"shape": shape, "color": "green", "size": size, "center": (16 - size / 2, 16.0)},
                              {"shape": shape, "color": "green", "size": size, "center": (16 + size / 2, 16.0)}])
            objects = detect(image.astype(np.float32))
            assert [o["shape"] for o in objects] == [shape, shape], (shape, size)
            assert sorted(o["center"][0] for o in objects)[0] < 16 < sorted(o["center"][0] for o in objects)[1]
            assert reward(_images(image[None]), [caption]).scores.tolist() == [1.0]
    squares = S.render([{"shape": "square", "color": "green", "size": 10.0, "center": (16 - 4.4, 16.0)},
                        {"shape": "square", "color": "green", "size": 10.0, "center": (16 + 4.4, 16.0)}])
    assert [o["shape"] for o in detect(squares.astype(np.float32))] == ["other"]
    one = np.zeros((12, 12), bool)
    one[2:10, 2:10] = True  # no neck: never split
    assert len(split_touching(one)) == 1


def test_a_block_of_touching_discs_that_reads_as_one_circle_is_four_circles():
    """Only a component classified "other" was tried as touching objects, so four touching discs in a 2x2 block, whose
    union reads as one big circle, passed "a blue circle" and failed "four blue circles". A shape that reads clean
    whole is now split too, into parts of like size only; a lone shape is left whole."""
    reward = ShapesReward()
    for size in (8.0, 10.0):
        block = S.render([{"shape": "circle", "color": "blue", "size": size, "center": (x, y)}
                          for x in (16 - size / 2, 16 + size / 2) for y in (16 - size / 2, 16 + size / 2)])
        assert [o["shape"] for o in detect(block.astype(np.float32))] == ["circle"] * 4, size
        assert reward(_images(block[None]), ["four blue circles"]).scores.tolist() == [1.0]
    for shape in ("circle", "square", "triangle"):
        for size in (7.0, 10.0, 13.0):
            lone = S.render([{"shape": shape, "color": "red", "size": size, "center": (16.0, 16.0)}])
            assert [o["shape"] for o in detect(lone.astype(np.float32))] == [shape], (shape, size)
