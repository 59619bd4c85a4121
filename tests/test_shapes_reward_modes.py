"""``ShapesReward(score=...)``: binary (default), partial and mixed training signals.

Scenes are drawn with the toy world's renderer at hand-picked places, so the constraint counts
below are worked out by hand from the GenEval rule (a coloured request counts twice: the
shape, then the coloured shape).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flowalign.rewards import load_reward
from flowalign.rewards import shapes_scenes as S
from flowalign.rewards.shapes import ShapesReward, evaluate, unrequested


def _scene(*objects: tuple[str, str, tuple[float, float]]) -> torch.Tensor:
    """``[1, 3, 32, 32]`` in [0, 1] with size-11 shapes ``(shape, colour, centre)``."""
    img = S.render([{"shape": s, "color": c, "size": 11.0, "center": xy} for s, c, xy in objects])
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0


RED_CIRCLE = _scene(("circle", "red", (10.0, 16.0)))
RED_CIRCLE_BLUE_SQUARE = _scene(("circle", "red", (9.0, 16.0)), ("square", "blue", (23.0, 16.0)))

# (image, prompt, binary, partial): partial = constraints met / constraints, counted by hand
CASES = [
    (RED_CIRCLE, "a red circle", 1.0, 1.0),  # circle ✓, red circle ✓
    (RED_CIRCLE, "a blue circle", 0.0, 0.5),  # circle ✓, blue circle ✗
    (RED_CIRCLE, "a red circle and a blue square", 0.0, 0.5),  # circle ✓ red circle ✓ square ✗ blue square ✗
    (RED_CIRCLE, "a square", 0.0, 0.0),  # square ✗
    (RED_CIRCLE_BLUE_SQUARE, "a red circle and a blue square", 1.0, 1.0),
    (RED_CIRCLE_BLUE_SQUARE, "a circle left of a square", 1.0, 1.0),  # square ✓, circle ✓, left of ✓
    (RED_CIRCLE_BLUE_SQUARE, "a circle right of a square", 0.0, 2 / 3),  # square ✓, circle ✓, right of ✗
    (RED_CIRCLE_BLUE_SQUARE, "two circles", 0.0, 0.5),  # 2 circles ✗, fewer than 3 circles ✓
]


def _batch():
    images = torch.cat([c[0] for c in CASES])
    prompts = [c[1] for c in CASES]
    binary = torch.tensor([c[2] for c in CASES])
    partial = torch.tensor([c[3] for c in CASES])
    return images, prompts, binary, partial


def test_binary_is_the_default_and_unchanged():
    images, prompts, binary, partial = _batch()
    default = ShapesReward()(images, prompts, [{}] * len(prompts))
    explicit = ShapesReward(score="binary")(images, prompts, [{}] * len(prompts))
    torch.testing.assert_close(default.scores, binary)
    torch.testing.assert_close(explicit.scores, binary)
    torch.testing.assert_close(default.details["partial"], partial)
    torch.testing.assert_close(default.details["binary"], binary)


def test_partial_scores_the_fraction_of_constraints_met():
    images, prompts, binary, partial = _batch()
    out = ShapesReward(score="partial")(images, prompts, [{}] * len(prompts))
    torch.testing.assert_close(out.scores, partial)
    torch.testing.assert_close(out.details["binary"], binary)  # the verdict stays available


@pytest.mark.parametrize("w", [0.5, 0.25, 0.1])
def test_mix_is_the_weighted_sum_and_keeps_the_binary_verdict_at_threshold_half(w):
    images, prompts, binary, partial = _batch()
    out = ShapesReward(score="mix", partial_weight=w)(images, prompts, [{}] * len(prompts))
    torch.testing.assert_close(out.scores, (1 - w) * binary + w * partial)
    # evaluation counts score >= 0.5 as correct: a mixed score gives the binary accuracy
    assert torch.equal(out.scores >= 0.5, binary.bool())
    # denser than binary: failed samples with different partial credit get different scores
    failed = out.scores[binary == 0]
    assert len(set(failed.tolist())) == len(set(partial[binary == 0].tolist())) > 1


def test_mix_threshold_matches_binary_on_random_ground_truth_and_wrong_captions():
    rng = np.random.default_rng(3)
    specs = S.sample_specs(rng, 24)
    images = torch.stack([torch.from_numpy(S.render_spec(s, rng)).permute(2, 0, 1).float() / 255.0 for s in specs])
    wrong = specs[1:] + specs[:1]  # captions of other scenes: mostly failed, with partial credit
    for captions in (specs, wrong):
        prompts = [s["prompt"] for s in captions]
        binary = ShapesReward()(images, prompts, list(captions)).scores
        mixed = ShapesReward(score="mix")(images, prompts, list(captions)).scores
        assert torch.equal(mixed >= 0.5, binary.bool())
    assert binary.sum() < len(wrong)  # the wrong captions did fail somewhere


def test_registry_passes_the_mode_and_bad_values_are_named():
    images, prompts, _, partial = _batch()
    out = load_reward("shapes", score="partial")(images, prompts, [{}] * len(prompts))
    torch.testing.assert_close(out.scores, partial)
    with pytest.raises(ValueError, match="score='dense'"):
        ShapesReward(score="dense")
    with pytest.raises(ValueError, match="partial_weight=0.7"):
        ShapesReward(score="mix", partial_weight=0.7)
    with pytest.raises(ValueError, match="partial_weight=0"):
        ShapesReward(score="mix", partial_weight=0.0)


# (image, prompt, binary, partial with the extra "nothing unrequested" constraint), by hand
EXCLUSIVE_CASES = [
    (RED_CIRCLE, "a red circle", 1.0, 1.0),  # circle ✓ red circle ✓ nothing else ✓
    (RED_CIRCLE_BLUE_SQUARE, "a red circle", 1.0, 2 / 3),  # circle ✓ red circle ✓; the blue square is unrequested ✗
    (RED_CIRCLE_BLUE_SQUARE, "a circle", 1.0, 0.5),  # circle ✓; square unrequested ✗
    (RED_CIRCLE_BLUE_SQUARE, "a red circle and a blue square", 1.0, 1.0),  # 4 ✓ + nothing else ✓
    (RED_CIRCLE_BLUE_SQUARE, "a red circle and a green square", 0.0, 3 / 5),  # square ✓ green ✗; the blue square is unrequested ✗
    (RED_CIRCLE_BLUE_SQUARE, "a circle and a square", 1.0, 1.0),  # uncoloured requests take any colour
    (RED_CIRCLE, "a square", 0.0, 0.0),  # square ✗; the circle is unrequested ✗
    (RED_CIRCLE_BLUE_SQUARE, "two circles", 0.0, 1 / 3),  # 2 circles ✗, < 3 circles ✓, square unrequested ✗
]


def test_exclusive_prices_unrequested_objects_and_keeps_the_geneval_verdict():
    images = torch.cat([c[0] for c in EXCLUSIVE_CASES])
    prompts = [c[1] for c in EXCLUSIVE_CASES]
    binary = torch.tensor([c[2] for c in EXCLUSIVE_CASES])
    partial = torch.tensor([c[3] for c in EXCLUSIVE_CASES])
    out = ShapesReward(score="mix", exclusive=True)(images, prompts, [{}] * len(prompts))
    torch.testing.assert_close(out.details["partial"], partial)
    torch.testing.assert_close(out.details["binary"], binary)  # GenEval ignores the extra objects
    torch.testing.assert_close(out.scores, 0.5 * binary + 0.5 * partial)
    assert torch.equal(out.scores >= 0.5, binary.bool())  # the evaluation threshold still reads the verdict
    plain = ShapesReward(score="mix")(images, prompts, [{}] * len(prompts))
    assert torch.equal(plain.details["binary"], binary)
    # lower exactly where something unrequested is drawn (cases 2, 3, 5, 8; case 7 scores 0 either way)
    assert (out.scores <= plain.scores).all() and (out.scores < plain.scores).nonzero().flatten().tolist() == [1, 2, 4, 7]


def test_exclusive_is_free_on_ground_truth_scenes_and_counts_blobs():
    rng = np.random.default_rng(11)
    specs = S.sample_specs(rng, 200)
    images = torch.stack([torch.from_numpy(S.render_spec(s, rng)).permute(2, 0, 1).float() / 255.0 for s in specs])
    out = load_reward("shapes", score="mix", exclusive=True)(images, [s["prompt"] for s in specs], list(specs))
    assert out.details["binary"].mean().item() >= 0.99
    assert (out.details["partial"] == 1.0).float().mean().item() >= 0.99  # a scene drawn from its spec has nothing extra
    # shapeless blobs are never requested; the hand-worked rule on detected objects
    circle = {"shape": "circle", "color": "red", "box": (2, 2, 10, 10), "center": (6, 6)}
    blob = {"shape": "other", "color": "red", "box": (12, 12, 30, 30), "center": (21, 21)}
    spec = S.parse_prompt("a red circle")
    assert evaluate([circle, blob], spec) == (True, 1.0)
    assert evaluate([circle, blob], spec, exclusive=True) == (True, 2 / 3)
    assert unrequested([circle, blob], spec) == [blob]
    assert evaluate([circle], spec, exclusive=True) == (True, 1.0)
