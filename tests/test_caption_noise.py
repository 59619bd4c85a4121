"""Caption noise for the toy's pretraining data: one attribute wrong, never a held-out caption."""
from __future__ import annotations

import numpy as np
import pytest

from flowalign.rewards import shapes_scenes as S


def _attributes(spec: dict) -> list:
    """An independent reading of what a caption names: per object (shape, colour, count,
    relation), in GenEval include order."""
    return [(o["shape"], o.get("color"), o["count"], tuple(o.get("position", ()))) for o in spec["include"]]


def test_hand_listed_neighbours():
    spec = S.parse_prompt("a circle left of a square")
    got = sorted(n["prompt"] for n in S.caption_neighbors(spec))
    # relation changed (3), anchor/subject swapped (1), subject shape changed to the third shape (1;
    # "a circle left of a triangle" pairs circle+triangle, a held-out pair, so it is excluded)
    assert got == sorted([
        "a circle right of a square", "a circle above a square", "a circle below a square",
        "a square left of a circle", "a triangle left of a square",
    ])
    spec = S.parse_prompt("a red circle and a green square")
    got = {n["prompt"] for n in S.caption_neighbors(spec)}
    assert "a green circle and a red square" in got or "a red square and a green circle" in got  # the binding error
    assert not any("blue circle" in p for p in got)  # held-out colour-shape pair
    assert {p for p in got if p.startswith("a red circle and a ")} == {f"a red circle and a {c} square" for c in S.COLORS if c not in ("green", "yellow")}


def test_neighbours_differ_in_one_attribute_and_are_training_specs():
    train = {s["prompt"] for t in S.TAGS for s in S.split_specs(t, heldout=False)}
    for tag in S.TAGS:
        for spec in S.split_specs(tag, heldout=False):
            neighbours = S.caption_neighbors(spec)
            assert neighbours, spec["prompt"]
            mine = _attributes(spec)
            for n in neighbours:
                assert n["prompt"] in train and not S.is_heldout(n) and n["tag"] == tag
                theirs = _attributes(n)
                assert sorted(map(str, theirs)) != sorted(map(str, mine))  # asks something else of the scene
                # one attribute: a single field differs, or two objects' fields are swapped
                flat_a = [x for o in mine for x in o]
                flat_b = [x for o in theirs for x in o]
                diff = [i for i, (a, b) in enumerate(zip(flat_a, flat_b)) if a != b]
                swapped = len(diff) == 2 and sorted(map(str, flat_a)) == sorted(map(str, flat_b))
                assert len(diff) == 1 or swapped, (spec["prompt"], n["prompt"], diff)


def test_noise_rate_determinism_and_validation():
    rng = np.random.default_rng(0)
    specs = S.sample_specs(rng, 4000)
    clean = [s["prompt"] for s in specs]
    assert S.noisy_captions(specs, 0.0, seed=1) == (clean, 0)
    captions, replaced = S.noisy_captions(specs, 0.3, seed=1)
    assert S.noisy_captions(specs, 0.3, seed=1) == (captions, replaced)
    changed = sum(a != b for a, b in zip(captions, clean))
    assert changed == replaced
    assert abs(replaced / len(specs) - 0.3) < 4 * (0.3 * 0.7 / len(specs)) ** 0.5
    neighbours = {s["prompt"]: {n["prompt"] for n in S.caption_neighbors(s)} for s in specs}
    assert all(c == p or c in neighbours[p] for c, p in zip(captions, clean))
    assert not any(S.is_heldout(S.parse_prompt(c)) for c in captions)
    with pytest.raises(ValueError, match="caption noise"):
        S.noisy_captions(specs, 1.5, seed=0)
