"""Colour synonyms in the toy's pretraining captions: paired hues named interchangeably, never a held-out caption."""
from __future__ import annotations

import numpy as np
import pytest

from flowalign.pipelines.toy import ToyBuildConfig
from flowalign.rewards import shapes_scenes as S


def test_hand_worked_swaps_at_rate_one():
    pairs = (("blue", "cyan"),)
    captions = ["a blue square", "a cyan circle", "two blue squares", "a blue square and a cyan triangle", "a red square", "a circle left of a square"]
    got, changed = S.synonym_captions(captions, pairs, 1.0, seed=0)
    assert got == [
        "a cyan square",
        "a cyan circle",  # "a blue circle" is a held-out caption: that swap is not made
        "two cyan squares",
        "a cyan square and a blue triangle",  # each colour word swaps on its own
        "a red square",
        "a circle left of a square",
    ]
    assert changed == 3


def test_rate_is_per_colour_word_and_deterministic():
    rng = np.random.default_rng(0)
    specs = S.sample_specs(rng, 6000)
    clean = [s["prompt"] for s in specs]
    pairs = S.parse_color_pairs("blue:cyan,red:purple")
    assert S.synonym_captions(clean, pairs, 0.0, seed=1) == (clean, 0)
    assert S.synonym_captions(clean, (), 0.5, seed=1) == (clean, 0)
    got, changed = S.synonym_captions(clean, pairs, 0.5, seed=1)
    assert S.synonym_captions(clean, pairs, 0.5, seed=1) == (got, changed)
    assert changed == sum(a != b for a, b in zip(got, clean))
    # independent count: among colour words a swap could legally change, about half changed
    partner = {"blue": "cyan", "cyan": "blue", "red": "purple", "purple": "red"}
    eligible = swapped = 0
    for before, after in zip(clean, got):
        wb, wa = before.split(" "), after.split(" ")
        assert len(wb) == len(wa)
        for k, w in enumerate(wb):
            if w not in partner:
                assert wa[k] == w
                continue
            trial = " ".join(wb[:k] + [partner[w]] + wb[k + 1:])
            if S.is_heldout(S.parse_prompt(trial)):
                continue
            eligible += 1
            swapped += wa[k] == partner[w]
    assert eligible > 1000 and abs(swapped / eligible - 0.5) < 4 * (0.25 / eligible) ** 0.5
    assert not any(S.is_heldout(S.parse_prompt(c)) for c in got)


def test_pair_parsing_and_validation():
    assert S.parse_color_pairs("") == ()
    assert S.parse_color_pairs(" blue:cyan , red:purple ") == (("blue", "cyan"), ("red", "purple"))
    with pytest.raises(ValueError, match="unknown colour"):
        S.parse_color_pairs("blue:teal")
    with pytest.raises(ValueError, match="one pair only"):
        S.parse_color_pairs("blue:cyan,cyan:green")
    with pytest.raises(ValueError, match="colour:colour"):
        S.parse_color_pairs("blue")
    with pytest.raises(ValueError, match="synonym rate"):
        S.synonym_captions(["a red square"], (("red", "purple"),), 1.5, seed=0)
    with pytest.raises(ValueError, match="unknown colour"):
        ToyBuildConfig(color_synonyms="red:orange")
    with pytest.raises(ValueError, match="synonym_rate"):
        ToyBuildConfig(synonym_rate=-0.1)
