"""pass@k and the per-category headroom table, against hand-worked values and brute force."""
from __future__ import annotations

import itertools
import math

import pytest

from flowalign.evaluation import headroom, pass_at_k


def brute_force_pass_at_k(outcomes: list[bool], k: int) -> float:
    """Fraction of all k-subsets of the samples that hold at least one success."""
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_hand_worked():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2) / C(4,2) = 3 / 6
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # k = 1 is the accuracy
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # only 2 failures: any 3 samples hold a success
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)


@pytest.mark.parametrize("n", [1, 3, 6, 8])
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(outcomes, k))


def test_headroom_weights_prompts_by_frequency():
    # prompt a (colors, weight 3): 1 of 4 correct; prompt b (colors, weight 1): 0 of 4; prompt c (counting): 4 of 4
    tags = ["colors", "colors", "counting"]
    correct = [[True, False, False, False], [False] * 4, [True] * 4]
    table = headroom(tags, correct, weights=[3, 1, 2], ks=(1, 2, 4))
    assert table["colors"]["prompts"] == 2
    assert table["colors"]["pass@1"] == pytest.approx(3 * 0.25 / 4)
    assert table["colors"]["pass@2"] == pytest.approx(3 * 0.5 / 4)  # pass@2 of 1-in-4 is 1 - C(3,2)/C(4,2) = 0.5
    assert table["colors"]["pass@4"] == pytest.approx(3 / 4)
    assert table["counting"]["pass@1"] == 1.0
    assert table["all"]["pass@4"] == pytest.approx((3 * 1 + 1 * 0 + 2 * 1) / 6)
    assert math.isclose(table["all"]["pass@1"], (3 * 0.25 + 2 * 1.0) / 6)


def test_headroom_rejects_ragged_input():
    with pytest.raises(ValueError, match="same number"):
        headroom(["a", "b"], [[True], [True, False]])
    with pytest.raises(ValueError, match="tags"):
        headroom(["a"], [[True], [False]])
