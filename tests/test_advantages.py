"""Tests for flowalign.advantages against brute-force python loops."""
import math

import pytest
import torch

from flowalign.advantages import (
    group_advantages,
    multi_reward_advantages,
    nonzero_mask,
    per_step_advantages,
    zero_variance_fraction,
)


def _brute(rewards, gids, std="group", eps=1e-4, clip=None):
    """Plain python: loop over samples, gather their group, population std."""
    r, g = [float(x) for x in rewards], [int(x) for x in gids]
    allmean = sum(r) / len(r)
    allstd = math.sqrt(sum((x - allmean) ** 2 for x in r) / len(r))
    out = []
    for i in range(len(r)):
        members = [r[j] for j in range(len(r)) if g[j] == g[i]]
        if max(members) == min(members):
            out.append(0.0)
            continue
        m = sum(members) / len(members)
        sd = math.sqrt(sum((x - m) ** 2 for x in members) / len(members))
        a = r[i] - m
        a = a / (sd + eps) if std == "group" else a / (allstd + eps) if std == "global" else a
        if clip is not None:
            a = max(-clip, min(clip, a))
        out.append(a)
    return torch.tensor(out)


@pytest.mark.parametrize("std", ["group", "global", "none"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_group_advantages_match_brute_force(std, clip):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(24, generator=g)
    gids = torch.tensor([7, 3, 9, 3, 7, 9] * 4)  # unsorted, non-contiguous ids, groups of 8
    rewards[gids == 9] = 0.3  # one all-equal group
    ours = group_advantages(rewards, gids, std=std, clip=clip)
    assert torch.allclose(ours, _brute(rewards, gids, std, clip=clip), atol=1e-5)


def test_all_equal_rewards_give_exact_zero_and_no_nan():
    rewards = torch.full((6,), 0.1)  # 0.1 is not exact in binary: mean may round
    adv = group_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.equal(adv, torch.zeros(6))
    assert torch.equal(group_advantages(rewards, torch.zeros(6, dtype=torch.long), std="global"), torch.zeros(6))
    assert torch.equal(group_advantages(torch.ones(3), [5, 5, 5], eps=0.0), torch.zeros(3))
    single = group_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))  # groups of one
    assert torch.equal(single, torch.zeros(2))


def test_hand_worked_group():
    # rewards 1, 2, 3: mean 2, population std sqrt(2/3)
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, dtype=torch.long), eps=0.0)
    s = math.sqrt(2 / 3)
    assert adv.tolist() == pytest.approx([-1 / s, 0.0, 1 / s])


def test_per_step_advantages_normalise_each_step_across_group():
    g = torch.Generator().manual_seed(1)
    R = torch.randn(8, 5, generator=g)
    gids = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    R[gids == 1, 2] = 4.0  # group 1 has equal rewards at step 2
    ours = per_step_advantages(R, gids, std="group")
    for k in range(5):
        assert torch.allclose(ours[:, k], _brute(R[:, k], gids), atol=1e-5)
    assert torch.all(ours[gids == 1, 2] == 0)
    ours_global = per_step_advantages(R, gids, std="global", clip=0.5)
    for k in range(5):
        assert torch.allclose(ours_global[:, k], _brute(R[:, k], gids, "global", clip=0.5), atol=1e-5)


def test_multi_reward_advantages_weighted_sum():
    g = torch.Generator().manual_seed(2)
    gids = torch.tensor([0, 0, 0, 1, 1, 1])
    a, b = torch.rand(6, generator=g), torch.rand(6, generator=g) * 100
    ours = multi_reward_advantages({"a": a, "b": b}, gids, weights={"a": 2.0})
    assert torch.allclose(ours, 2.0 * _brute(a, gids) + _brute(b, gids), atol=1e-5)
    ours_t = multi_reward_advantages(torch.stack([a, b], 1), gids, weights=[0.5, 0.25], clip=0.3)
    assert torch.allclose(ours_t, (0.5 * _brute(a, gids) + 0.25 * _brute(b, gids)).clamp(-0.3, 0.3), atol=1e-5)
    with pytest.raises(ValueError, match="'c'"):
        multi_reward_advantages({"a": a}, gids, weights={"c": 1.0})


def test_nonzero_mask_and_zero_variance_fraction():
    adv = torch.tensor([[0.0, 0.0], [0.0, 1.0], [-2.0, 0.0]])
    assert nonzero_mask(adv).tolist() == [False, True, True]
    assert nonzero_mask(torch.tensor([0.0, 0.5])).tolist() == [False, True]
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    gids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    # groups: {1,1} equal, {0,1} not, {.5,.5} equal, {.5,.5} equal -> 3/4
    assert zero_variance_fraction(rewards, gids) == pytest.approx(0.75)
    assert nonzero_mask(group_advantages(rewards, gids)).tolist() == [False, False, True, True, False, False, False, False]


def test_bad_inputs():
    with pytest.raises(ValueError, match="std='batch'"):
        group_advantages(torch.zeros(2), torch.zeros(2), std="batch")
    with pytest.raises(ValueError, match=r"\[B\]=3"):
        group_advantages(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        per_step_advantages(torch.zeros(3), torch.zeros(3))


def test_non_finite_rewards_are_refused_and_kept_group_advantages_leaves_dropped_ones_out():
    g = torch.tensor([0, 0, 1, 1])
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="non-finite"):
            group_advantages(torch.tensor([1.0, bad, 0.0, 2.0]), g)
        with pytest.raises(ValueError, match="non-finite"):
            group_advantages(torch.tensor([1.0, bad, 0.0, 2.0]), g, std="global")
    from flowalign.advantages import kept_group_advantages

    adv = kept_group_advantages(torch.tensor([1.0, float("nan"), 0.0, 2.0, 5.0]), torch.tensor([0, 0, 1, 1, 0]))
    # group 0 keeps rewards 1 and 5 (mean 3, std 2), group 1 keeps 0 and 2 (mean 1, std 1); the NaN row gets 0
    assert torch.allclose(adv, torch.tensor([-2 / (2 + 1e-4), 0.0, -1 / (1 + 1e-4), 1 / (1 + 1e-4), 2 / (2 + 1e-4)]))
    # global std over the kept rows only: std of [1, 5, 0, 2] = sqrt(3.5)
    adv = kept_group_advantages(torch.tensor([1.0, float("nan"), 0.0, 2.0, 5.0]), torch.tensor([0, 0, 1, 1, 0]), std="global")
    scale = 3.5 ** 0.5 + 1e-4
    assert torch.allclose(adv, torch.tensor([-2 / scale, 0.0, -1 / scale, 1 / scale, 2 / scale]))
    with pytest.raises(ValueError, match="inf"):
        kept_group_advantages(torch.tensor([1.0, float("inf")]), torch.tensor([0, 0]))


def test_huge_rewards_normalise_like_small_ones():
    """1e20 squared overflows fp32: the group's std came out inf and both advantages 0."""
    g = torch.tensor([0, 0, 1, 1])
    adv = group_advantages(torch.tensor([0.0, 1e20, 0.0, 1.0]), g, eps=0.0)
    assert torch.equal(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    adv = group_advantages(torch.tensor([0.0, 1e39, 0.0, 1.0], dtype=torch.float64), g, eps=0.0)
    assert torch.equal(adv, torch.tensor([-1.0, 1.0, -1.0, 1.0])) and adv.dtype == torch.float32


def test_kept_multi_reward_advantages_normalise_each_reward_over_the_kept_samples():
    from flowalign.advantages import kept_multi_reward_advantages, multi_reward_advantages

    g = torch.tensor([0, 0, 0, 1, 1])
    a = torch.tensor([1.0, 3.0, float("nan"), 0.0, 10.0])
    b = torch.tensor([100.0, 300.0, 5.0, 7.0, 7.0])
    adv = kept_multi_reward_advantages({"a": a, "b": b}, g, {"a": 1.0, "b": 0.5}, eps=0.0)
    # row 2 is dropped everywhere; group 0 keeps rows 0, 1: a -> [-1, 1], b -> [-1, 1]; group 1: a -> [-1, 1], b ties -> 0
    assert torch.allclose(adv, torch.tensor([-1.5, 1.5, 0.0, -1.0, 1.0]))
    kept = torch.tensor([0, 1, 3, 4])
    reference = multi_reward_advantages({"a": a[kept], "b": b[kept]}, g[kept], weights={"a": 1.0, "b": 0.5}, eps=0.0)
    assert torch.allclose(adv[kept], reference)
    assert torch.allclose(kept_multi_reward_advantages({"a": a, "b": b}, g, {"a": 1.0, "b": 0.5}, eps=0.0, clip=1.2)[:2],
                          torch.tensor([-1.2, 1.2]))


def test_kept_and_multi_reward_advantages_keep_fp64_rewards_as_group_advantages_does():
    """Rewards that differ below fp32's resolution (1e8 + 2) must not be tied by the kept / multi-reward paths."""
    from flowalign.advantages import kept_group_advantages, multi_reward_advantages

    r = torch.tensor([1e8, 1e8 + 2, 1e8 + 4], dtype=torch.float64)
    ids = torch.zeros(3, dtype=torch.long)
    expect = group_advantages(r, ids)
    assert expect.tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-3)
    assert torch.equal(kept_group_advantages(r, ids), expect)
    assert torch.equal(multi_reward_advantages({"a": r}, ids), expect)
    assert torch.equal(multi_reward_advantages(r[:, None], ids), expect)


def test_a_tied_float64_group_is_exactly_zero_and_not_kept_with_or_without_eps():
    """0.1 is not exact in binary: a group of fp64 0.1s has a mean that rounds, so only the explicit tie rule gives 0
    (without it: -1.4e-13 with eps 1e-4, which nonzero_mask keeps, and -1 for every member with eps 0)."""
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0, 1.0], dtype=torch.float64)
    gids = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    for eps in (1e-4, 0.0):
        adv = group_advantages(rewards, gids, eps=eps)
        assert torch.equal(adv[:6], torch.zeros(6)), eps
        assert nonzero_mask(adv).tolist() == [False] * 6 + [True, True]


def test_kept_multi_reward_advantages_weigh_a_reward_missing_from_weights_by_one_and_drop_a_nan_in_any_reward():
    from flowalign.advantages import kept_multi_reward_advantages

    g = torch.tensor([0, 0, 0])
    x = torch.tensor([0.0, 1.0, 0.5])
    y = torch.tensor([1.0, 0.0, float("nan")])  # a NaN in the second reward drops row 2 as one in the first does
    adv = kept_multi_reward_advantages({"x": x, "y": y}, g, {"x": 2.0}, eps=0.0)
    # kept rows 0, 1: x -> [-1, 1] (weight 2), y -> [1, -1] (weight 1, not named)
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, 0.0]))


def test_flat_group_ends_tell_solved_from_hopeless_groups():
    from flowalign.advantages import flat_group_ends

    nan = float("nan")
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5, 1.0, 0.5, 0.5, nan, 0.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    # group 0 flat at the top (1), group 1 flat at the bottom (0), group 2 spread, group 3 flat in between, group 4: one
    # kept sample at 0 (flat, at the bottom)
    assert flat_group_ends(rewards, groups) == (1 / 5, 2 / 5)
    assert flat_group_ends(torch.full((4,), nan), torch.tensor([0, 0, 1, 1])) == (0.0, 0.0)
    assert flat_group_ends(torch.tensor([0.3, 0.3]), torch.tensor([7, 7])) == (1.0, 1.0)  # one group: both ends


@pytest.mark.parametrize("kwargs, message", [({"clip": -1.0}, "clip must be None or > 0"), ({"clip": float("nan")}, "clip must be"),
                                             ({"eps": float("nan")}, "eps must be a finite number"), ({"eps": float("inf")}, "eps must be")])
def test_nonsensical_clip_or_eps_is_refused(kwargs, message):
    """clip=-1 gave every sample the advantage -1, clip=NaN made all NaN, eps=NaN silently dropped the normalisation."""
    from flowalign.advantages import group_advantages

    with pytest.raises(ValueError, match=message):
        group_advantages(torch.tensor([0.0, 1.0, 0.0, 2.0]), torch.tensor([0, 0, 1, 1]), **kwargs)
