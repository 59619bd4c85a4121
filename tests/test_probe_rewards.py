"""bench/probe_rewards.py: the shape-fit probe reward keeps the binary verdict at 0.5 and prefers the right shape."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from probe_rewards import ShapeFit, shape_fit  # noqa: E402

from flowalign.rewards import shapes_scenes as S  # noqa: E402
from flowalign.rewards.shapes import ShapesReward, detect  # noqa: E402


def test_shape_fit_prefers_the_drawn_shape():
    rng = np.random.default_rng(0)
    for shape in ("circle", "square", "triangle"):
        image = S.render_spec(S.make_spec("single_object", [shape], ["red", None]), rng).astype(np.float32)
        (obj,) = detect(image)
        others = [s for s in ("circle", "square", "triangle") if s != shape]
        assert shape_fit(obj, shape) > 0.5 > max(shape_fit(obj, s) for s in others), shape


def test_threshold_half_is_still_the_binary_verdict():
    rng = np.random.default_rng(1)
    every = S.load_prompts("heldout")
    specs = [every[i] for i in rng.permutation(len(every))[:48]]  # all categories
    # right scenes, and the same scenes under the next spec's prompt (mostly wrong)
    images = torch.tensor(np.stack([S.render_spec(s, rng) for s in specs])).permute(0, 3, 1, 2).float() / 255.0
    prompts = [s["prompt"] for s in specs[1:] + specs[:1]] + [s["prompt"] for s in specs]
    images = torch.cat([images, images])
    out = ShapeFit()(images, prompts, [{}] * len(prompts))
    binary = ShapesReward()(images, prompts, [{}] * len(prompts)).scores
    assert 0 < binary.sum() < len(prompts)
    assert torch.equal(out.scores >= 0.5, binary >= 0.5)
    assert (out.scores[binary == 0] > 0).any()  # the dense half gives failed samples a signal
