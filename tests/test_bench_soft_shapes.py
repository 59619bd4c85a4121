"""bench/soft_shapes.py: the verifier's labels, the soft GenEval terms by hand, and the shipped detector's reward."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import soft_shapes as ss  # noqa: E402

from flowalign.rewards import shapes_scenes as S  # noqa: E402
from flowalign.rewards.shapes import detect  # noqa: E402


def test_verifier_objects_carry_each_objects_own_pixels():
    rng = np.random.default_rng(0)
    for spec in S.sample_specs(rng, 40):
        image = S.render_spec(spec, rng).astype(np.float32)
        objects, labels = ss.verifier_objects(image)
        assert [o["shape"] for o in objects] == [o["shape"] for o in detect(image)]
        taken = np.zeros(labels.shape, bool)
        for o in objects:
            mask = o["mask"]
            assert mask.sum() == o["area"] and not (mask & taken).any()  # one object's pixels, no other's
            taken |= mask
            assert (labels[mask] == list(S.PALETTE).index(o["color"])).all()
            ys, xs = np.nonzero(mask)
            assert o["box"] == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_labels_give_each_accepted_object_unit_density_mass():
    rng = np.random.default_rng(1)
    spec = S.make_spec("counting", ["square"], ["blue", None], count=3)
    image = S.render_spec(spec, rng)
    seg, density, counts, found = ss.make_labels(image[None].astype(np.uint8))
    k = ss.pair_index("blue", "square")
    assert counts[0, k] == 3 and counts[0].sum() == 3
    assert density[0].sum() == pytest.approx(3.0, abs=1e-4)
    assert (seg[0] == 2 + k).sum() == sum(o["area"] for o in found[0])


def _maps(objects):
    """Hand-made detector outputs: each (colour, shape, x0, y0, x1, y1) fills a box of that class with
    probability 1 and unit density mass; the rest is background."""
    probs = torch.zeros(ss.N_CLASSES, ss.SIZE, ss.SIZE)
    probs[ss.BG] = 1.0
    centre = torch.zeros(ss.N_PAIRS, ss.SIZE, ss.SIZE)
    for color, shape, x0, y0, x1, y1 in objects:
        k = ss.pair_index(color, shape)
        probs[:, y0:y1, x0:x1] = 0.0
        probs[2 + k, y0:y1, x0:x1] = 1.0
        centre[k, y0:y1, x0:x1] = 1.0 / ((y1 - y0) * (x1 - x0))
    return probs, centre


def test_terms_by_hand():
    reward = ss.SoftShapesReward(detector=torch.nn.Identity(), mode="product")  # terms() never calls the detector
    w = reward.count_width
    # "two red squares", one drawn: shape term and colour term each exp(-(2 - 1)^2 / (2 w^2)); exclude 3: 1
    probs, centre = _maps([("red", "square", 2, 2, 8, 8)])
    spec = S.make_spec("counting", ["square"], ["red", None], count=2)
    terms = [float(t) for t in reward.terms(probs, centre, spec)]
    miss = math.exp(-1.0 / (2 * w * w))
    assert terms == pytest.approx([miss, miss, 1.0], abs=1e-5)
    # a blue square does not count for the red one, but does for the shape
    probs, centre = _maps([("red", "square", 2, 2, 8, 8), ("blue", "square", 20, 2, 26, 8)])
    assert [float(t) for t in reward.terms(probs, centre, spec)] == pytest.approx([1.0, miss, 1.0], abs=1e-5)
    # position: "a circle left of a triangle", centres 16 px apart on the x axis, aligned in y
    probs, centre = _maps([("green", "circle", 2, 10, 8, 16), ("red", "triangle", 18, 10, 24, 16)])
    spec = S.make_spec("position", ["circle", "triangle"], relation="left of")
    rel = [e for e in spec["include"] if "position" in e]
    assert rel, spec
    terms = [float(t) for t in reward.terms(probs, centre, spec)]
    d = 16.0
    expected = (1 / (1 + math.exp(-(d - reward.margin) / reward.tau))) * (1 / (1 + math.exp(-(math.sqrt(3) * d - 0.5) / reward.tau)))
    assert terms[-1] == pytest.approx(expected, rel=1e-4)
    swapped = S.make_spec("position", ["circle", "triangle"], relation="right of")
    assert float(reward.terms(probs, centre, swapped)[-1]) < 1e-5


def _position_term(reward, relation, circle_box):
    probs, centre = _maps([("green", "circle", *circle_box), ("red", "triangle", 13, 13, 19, 19)])  # triangle centred at (16, 16)
    return float(reward.terms(probs, centre, S.make_spec("position", ["circle", "triangle"], relation=relation))[-1])


def test_position_terms_follow_the_verifiers_axes_and_its_60_degree_cone():
    reward = ss.SoftShapesReward(detector=torch.nn.Identity())
    # image y grows downwards: a circle centred 10 px higher (y = 6) is "above" the triangle, not "below"
    assert _position_term(reward, "above", (13, 3, 19, 9)) > 0.99 > 0.01 > _position_term(reward, "below", (13, 3, 19, 9))
    assert _position_term(reward, "below", (13, 23, 19, 29)) > 0.99 > 0.01 > _position_term(reward, "above", (13, 23, 19, 29))
    # 8 px left and 4 px up (27 degrees off the axis): left of; 4 px left and 8 px up (63 degrees): not, softly
    # (sigmoid(sqrt(3) 4 - sqrt(8^2 + 0.25)) = 0.25); 2 px left and 10 px up (79 degrees): not
    assert _position_term(reward, "left of", (5, 9, 11, 15)) > 0.99
    assert _position_term(reward, "left of", (9, 5, 15, 11)) < 0.5
    assert _position_term(reward, "left of", (11, 3, 17, 9)) < 0.01


def test_counting_excludes_one_more_object():
    reward = ss.SoftShapesReward(detector=torch.nn.Identity(), mode="product")
    spec = S.make_spec("counting", ["square"], ["red", None], count=2)  # include 2 red squares, exclude 3
    two = _maps([("red", "square", 2, 2, 8, 8), ("red", "square", 20, 2, 26, 8)])
    three = _maps([("red", "square", 2, 2, 8, 8), ("red", "square", 20, 2, 26, 8), ("red", "square", 2, 20, 8, 26)])
    assert [float(t) for t in reward.terms(*two, spec)] == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    assert float(reward.terms(*three, spec)[-1]) == pytest.approx(math.exp(-1.0 / (2 * reward.count_width**2)), abs=1e-5)
    # exact counts: two red squares and a blue one pass the verifier, so the any-colour term stays one-sided
    exact = ss.SoftShapesReward(detector=torch.nn.Identity(), exact_counts=True)
    extra_blue = _maps([("red", "square", 2, 2, 8, 8), ("red", "square", 20, 2, 26, 8), ("blue", "square", 2, 20, 8, 26)])
    assert [float(t) for t in exact.terms(*extra_blue, spec)] == pytest.approx([1.0, 1.0], abs=1e-5)


@pytest.mark.skipif(not ss.DEFAULT_WEIGHTS.is_file(), reason="needs bench/results/soft_shapes/detector.safetensors")
def test_shipped_detector_prefers_a_scene_under_its_own_prompt_and_has_a_gradient():
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    specs = S.sample_specs(rng, 24)
    images = torch.tensor(np.stack([S.render_spec(s, rng) for s in specs])).permute(0, 3, 1, 2).float() / 255.0
    reward = ss.SoftShapesReward(mode="product")
    own = reward(images, [s["prompt"] for s in specs])
    wrong = reward(images, [specs[(i + 1) % len(specs)]["prompt"] for i in range(len(specs))])
    assert float(own.mean()) > 0.8 and float(own.mean()) > float(wrong.mean()) + 0.3
    x = images[:4].clone().requires_grad_(True)
    reward(x, [s["prompt"] for s in specs[:4]]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="prompts"):
        reward(images[:2], ["a red square"])


@pytest.mark.skipif(not ss.DEFAULT_WEIGHTS.is_file(), reason="needs bench/results/soft_shapes/detector.safetensors")
def test_process_reward_plugin_is_the_soft_reward_behind_the_protocol():
    from flowalign.rewards import load_reward

    reward = load_reward("soft_shapes:SoftShapesProcessReward", mode="product")  # bench/ is on sys.path here
    assert reward.differentiable
    rng = np.random.default_rng(3)
    specs = S.sample_specs(rng, 4)
    images = (torch.tensor(np.stack([S.render_spec(s, rng) for s in specs])).permute(0, 3, 1, 2).float() / 255.0).requires_grad_(True)
    prompts = [s["prompt"] for s in specs]
    out = reward(images, prompts)
    assert torch.allclose(out.scores, ss.SoftShapesReward(reward.detector, mode="product")(images, prompts))
    out.scores.sum().backward()
    assert float(images.grad.abs().sum()) > 0
