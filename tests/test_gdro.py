"""GDRO and Diffusion-DPO: soft targets vs brute-force Plackett–Luce, the k=2 DPO identity,
a gradient step on a tiny linear velocity model, ties."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowalign.objectives.base import OBJECTIVES, OfflineBatch
from flowalign.objectives.diffusion_dpo import DiffusionDPO, diffusion_dpo_loss, noised_and_target
from flowalign.objectives.gdro import GDRO, gdro_listwise_loss, implicit_rewards, plackett_luce_targets


class LinearVelocity(nn.Module):
    """v(x, s) = W x + s·b on flattened latents: tiny, but every row has its own gradient."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(dim, dim, generator=g) * 0.1)
        self.b = nn.Parameter(torch.randn(dim, generator=g) * 0.1)

    def forward(self, x, sigma):
        flat = x.flatten(1)
        return (flat @ self.W.T + sigma[:, None] * self.b).view_as(x)


def _pl_probability(perm, r, tau):
    """Plackett–Luce probability of the permutation ``perm`` (loop over positions)."""
    p = 1.0
    rest = list(perm)
    for item in perm:
        den = sum(math.exp(r[m] / tau) for m in rest)
        p *= math.exp(r[item] / tau) / den
        rest.remove(item)
    return p


def test_registered():
    assert OBJECTIVES["gdro"] is GDRO and OBJECTIVES["diffusion_dpo"] is DiffusionDPO


def test_soft_targets_match_brute_force_enumeration():
    r = [0.3, 0.9, -0.2, 0.5]
    tau = 0.4
    order, q = plackett_luce_targets(torch.tensor([r]), tau)
    order = order[0].tolist()
    assert order == [1, 3, 0, 2]
    perms = list(itertools.permutations(range(4)))
    probs = {perm: _pl_probability(perm, r, tau) for perm in perms}
    assert sum(probs.values()) == pytest.approx(1.0)
    for i in range(4):
        prefix = tuple(order[:i])
        cond = {perm: p for perm, p in probs.items() if perm[:i] == prefix}
        total = sum(cond.values())
        for j in range(4):
            expected = sum(p for perm, p in cond.items() if perm[i] == order[j]) / total
            assert q[0, i, j].item() == pytest.approx(expected, abs=1e-6), (i, j)


def test_listwise_loss_is_pl_negative_log_likelihood_when_tau_small():
    # with one-hot targets the loss is -log P_PL(reward-sorted order | scores s)
    torch.manual_seed(1)
    s = torch.randn(3, 5)
    r = torch.randn(3, 5)
    loss = gdro_listwise_loss(s, r, tau=1e-6)
    for p in range(3):
        perm = sorted(range(5), key=lambda j: -r[p, j].item())
        nll = -math.log(_pl_probability(perm, s[p].tolist(), 1.0))
        assert loss[p].item() == pytest.approx(nll, rel=1e-5)


def test_k2_tau0_gamma0_equals_diffusion_dpo():
    torch.manual_seed(2)
    P, k, shape = 5, 2, (2, 3, 3)
    x0 = torch.randn(P, k, *shape)
    rewards = torch.randn(P, k)
    sigma = torch.rand(P, 1).expand(P, k)
    noise = torch.randn(P, 1, *shape).expand(P, k, *shape)
    dim = 2 * 3 * 3
    policy, reference = LinearVelocity(dim, seed=3), LinearVelocity(dim, seed=4)
    batch = OfflineBatch(x0=x0, rewards=rewards)
    gdro, _ = GDRO(beta=7.0, tau=1e-6, gamma=0.0).loss(batch, policy, reference, sigma=sigma, noise=noise)
    dpo, _ = DiffusionDPO(beta=7.0).loss(batch, policy, reference, sigma=sigma, noise=noise)
    # independent per-pair computation straight from the Diffusion-DPO formula
    manual = []
    for p in range(P):
        w, l = (0, 1) if rewards[p, 0] > rewards[p, 1] else (1, 0)
        errs = {}
        for j in (w, l):
            x_s = (1 - sigma[p, j]) * x0[p, j] + sigma[p, j] * noise[p, j]
            v = noise[p, j] - x0[p, j]
            e = ((policy(x_s[None], sigma[p, j][None])[0] - v) ** 2).mean()
            e_ref = ((reference(x_s[None], sigma[p, j][None])[0] - v) ** 2).mean()
            errs[j] = (e, e_ref)
        inside = -7.0 * ((errs[w][0] - errs[w][1]) - (errs[l][0] - errs[l][1]))
        manual.append(-F.logsigmoid(inside))
    manual = torch.stack(manual).mean()
    assert gdro.item() == pytest.approx(manual.item(), rel=1e-5)
    assert dpo.item() == pytest.approx(manual.item(), rel=1e-5)


def test_gradient_step_raises_best_implicit_reward():
    torch.manual_seed(5)
    P, k, shape = 2, 4, (4, 2, 2)
    dim = 16
    x0 = torch.randn(P, k, *shape)
    rewards = torch.tensor([[0.1, 0.9, 0.4, 0.2], [0.7, 0.0, 0.3, 0.5]])
    policy = LinearVelocity(dim, seed=6)
    reference = copy.deepcopy(policy).requires_grad_(False)
    sigma = torch.full((P, k), 0.6)
    noise = torch.randn(P, 1, *shape).expand(P, k, *shape)
    objective = GDRO(beta=6.0, tau=0.05, gamma=0.0)
    batch = OfflineBatch(x0=x0, rewards=rewards)

    def scores():
        x_s, v = noised_and_target(x0.flatten(0, 1), noise.flatten(0, 1), sigma.flatten())
        with torch.no_grad():
            err = ((policy(x_s, sigma.flatten()) - v) ** 2).flatten(1).mean(1)
            ref = ((reference(x_s, sigma.flatten()) - v) ** 2).flatten(1).mean(1)
        return implicit_rewards(err, ref, 6.0).view(P, k)

    before = scores()
    assert torch.allclose(before, torch.zeros(P, k))  # policy == reference
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    loss, metrics = objective.loss(batch, policy, reference, sigma=sigma, noise=noise)
    loss.backward()
    opt.step()
    after = scores()
    best, worst = rewards.argmax(1), rewards.argmin(1)
    assert (after[torch.arange(P), best] > 0).all()
    assert (after[torch.arange(P), worst] < 0).all()
    assert set(metrics) >= {"gdro/listwise", "gdro/fm_top", "gdro/implicit_acc"}


def test_gamma_adds_top_sample_flow_matching_loss():
    torch.manual_seed(7)
    x0 = torch.randn(3, 4, 8)
    rewards = torch.randn(3, 4)
    policy, reference = LinearVelocity(8, 1), LinearVelocity(8, 2)
    sigma = torch.rand(3, 1).expand(3, 4)
    noise = torch.randn(3, 4, 8)
    batch = OfflineBatch(x0=x0, rewards=rewards)
    l0, _ = GDRO(gamma=0.0).loss(batch, policy, reference, sigma=sigma, noise=noise)
    l1, m = GDRO(gamma=1.0).loss(batch, policy, reference, sigma=sigma, noise=noise)
    top = rewards.argmax(1)
    fm = []
    for p in range(3):
        j = top[p]
        x_s = (1 - sigma[p, j]) * x0[p, j] + sigma[p, j] * noise[p, j]
        fm.append(((policy(x_s[None], sigma[p, j][None])[0] - (noise[p, j] - x0[p, j])) ** 2).mean())
    assert (l1 - l0).item() == pytest.approx(torch.stack(fm).mean().item(), rel=1e-5)
    assert m["gdro/fm_top"] == pytest.approx(torch.stack(fm).mean().item(), rel=1e-5)


@pytest.mark.parametrize("tau", [0.05, 1e-6])
def test_ties_do_not_produce_nan(tau):
    x0 = torch.randn(2, 6, 4)
    rewards = torch.tensor([[1.0] * 6, [0.0, 1.0, 1.0, 0.0, 0.5, 0.5]])
    policy, reference = LinearVelocity(4, 1), LinearVelocity(4, 2)
    loss, metrics = GDRO(tau=tau).loss(OfflineBatch(x0, rewards), policy, reference)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters())
    assert metrics["gdro/frac_tied_groups"] == pytest.approx(0.5)
    _, q = plackett_luce_targets(rewards, tau)
    assert torch.allclose(q.sum(-1), torch.ones(2, 6))
    # a fully tied group has uniform targets over the remaining items
    assert torch.allclose(q[0, 0], torch.full((6,), 1 / 6))


def test_tied_groups_are_left_out_and_k2_identity_holds_with_them():
    """A fully tied group carries no ranking: GDRO's loss (and gradient) with it equals the loss of the
    decisive groups alone, and so (k = 2, τ → 0, γ = 0) Diffusion-DPO's, which drops tied pairs."""
    torch.manual_seed(7)
    shape = (2, 2, 2)
    x0 = torch.randn(3, 2, *shape)
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.2, 0.7]])  # the middle group is tied
    sigma = torch.rand(3, 1).expand(3, 2)
    noise = torch.randn(3, 1, *shape).expand(3, 2, *shape)
    policy, reference = LinearVelocity(8, seed=1), LinearVelocity(8, seed=2)

    def loss_and_grad(objective, rows):
        policy.zero_grad()
        loss, metrics = objective.loss(OfflineBatch(x0[rows], rewards[rows]), policy, reference, sigma=sigma[rows], noise=noise[rows])
        loss.backward()
        return loss.item(), policy.W.grad.clone(), metrics

    gdro = GDRO(beta=3.0, tau=1e-6, gamma=0.0)
    with_tied, g_with, metrics = loss_and_grad(gdro, [0, 1, 2])
    decisive, g_decisive, _ = loss_and_grad(gdro, [0, 2])
    dpo, g_dpo, _ = loss_and_grad(DiffusionDPO(beta=3.0), [0, 1, 2])
    assert with_tied == pytest.approx(decisive, rel=1e-6) and with_tied == pytest.approx(dpo, rel=1e-5)
    assert torch.allclose(g_with, g_decisive, atol=1e-7) and torch.allclose(g_with, g_dpo, atol=1e-6)
    assert metrics["gdro/frac_tied_groups"] == pytest.approx(1 / 3)
    # γ's flow-matching term is on the top samples of the decisive groups only (a tied group's top is arbitrary)
    with_fm, _, m_fm = loss_and_grad(GDRO(beta=3.0, tau=1e-6, gamma=1.0), [0, 1, 2])
    fm = []
    for p in (0, 2):
        j = int(rewards[p].argmax())
        x_s = (1 - sigma[p, j]) * x0[p, j] + sigma[p, j] * noise[p, j]
        fm.append(((policy(x_s[None], sigma[p, j][None])[0] - (noise[p, j] - x0[p, j])) ** 2).mean().item())
    assert m_fm["gdro/fm_top"] == pytest.approx(sum(fm) / 2, rel=1e-5)
    assert with_fm == pytest.approx(decisive + sum(fm) / 2, rel=1e-5)


@pytest.mark.parametrize("objective", [GDRO(), DiffusionDPO()], ids=["gdro", "diffusion_dpo"])
def test_a_batch_of_tied_groups_gives_a_zero_loss_that_backpropagates(objective):
    """A binary verifier often ties every group of a small batch: the loss is 0, and backward() (as the
    trainer calls it) must still work, with zero gradients, and the policy must still run."""
    policy, reference = LinearVelocity(4, 1), LinearVelocity(4, 2)
    calls = []
    counted = lambda x, s: calls.append(1) or policy(x, s)  # noqa: E731
    loss, metrics = objective.loss(OfflineBatch(torch.randn(2, 3, 4), torch.tensor([[1.0] * 3, [0.0] * 3])), counted, reference)
    loss.backward()
    assert loss.item() == 0.0 and calls
    assert all(p.grad is not None and not p.grad.any() for p in policy.parameters())


def test_dpo_drops_tied_pairs_and_all_pairs_mode():
    x0 = torch.randn(2, 3, 4)
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 1.0]])
    policy, reference = LinearVelocity(4, 1), LinearVelocity(4, 2)
    _, m = DiffusionDPO().loss(OfflineBatch(x0, rewards), policy, reference)
    assert m["dpo/num_pairs"] == 1.0
    _, m_all = DiffusionDPO(pairs="all").loss(OfflineBatch(x0, rewards), policy, reference)
    assert m_all["dpo/num_pairs"] == 3.0


def test_dpo_loss_hand_value():
    # margin = (1 - 0.5) - (2 - 2.5) = 1 -> -log sigmoid(-2 * 1)
    out = diffusion_dpo_loss(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([2.0]), torch.tensor([2.5]), beta=2.0)
    assert out.item() == pytest.approx(math.log1p(math.exp(2.0)), rel=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="tau"):
        GDRO(tau=0.0)
    with pytest.raises(ValueError, match="pairs"):
        DiffusionDPO(pairs="random")


def test_group_reward_norm_is_scale_free():
    torch.manual_seed(8)
    x0 = torch.randn(3, 4, 8)
    rewards = torch.randn(3, 4)
    policy, reference = LinearVelocity(8, 1), LinearVelocity(8, 2)
    sigma, noise = torch.rand(3, 1).expand(3, 4), torch.randn(3, 4, 8)
    objective = GDRO(reward_norm="group")
    small, _ = objective.loss(OfflineBatch(x0, rewards), policy, reference, sigma=sigma, noise=noise)
    large, _ = objective.loss(OfflineBatch(x0, rewards * 100 + 3), policy, reference, sigma=sigma, noise=noise)
    assert small.item() == pytest.approx(large.item(), rel=1e-3)  # up to reward_norm_eps (1e-4) against stds near 1
    plain, _ = GDRO().loss(OfflineBatch(x0, rewards * 0.01), policy, reference, sigma=sigma, noise=noise)
    plain_large, _ = GDRO().loss(OfflineBatch(x0, rewards), policy, reference, sigma=sigma, noise=noise)
    assert plain.item() != pytest.approx(plain_large.item(), rel=1e-3)  # the paper's form depends on the scale


def test_tied_rewards_are_ranked_in_a_random_order_so_tied_samples_get_equal_expected_pushes():
    """Binary rewards [1, 1, 1, 0, 0, 0]: the stable sort ranked tied members in list order, so the last-listed
    winner got ~7x the push of the first. The objective now shuffles tied members each step: the mean gradient
    over draws equals the exact mean over every order of the tied members (brute force), equal within each tie."""
    rewards = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    tau = 0.05

    def grad_for(order):  # gradient of the listwise loss w.r.t. the implicit rewards (all 0: policy = reference)
        scores = torch.zeros(1, 6, requires_grad=True)
        perm = torch.tensor([order])
        gdro_listwise_loss(scores.gather(1, perm), rewards.gather(1, perm), tau).sum().backward()
        return scores.grad[0]

    exact = torch.stack([grad_for(list(w) + list(l)) for w in itertools.permutations(range(3))
                         for l in itertools.permutations(range(3, 6))]).mean(0)
    assert torch.allclose(exact[:3], exact[0].expand(3)) and torch.allclose(exact[3:], exact[3].expand(3))
    member_order = grad_for(list(range(6)))
    assert (member_order[:3].max() - member_order[:3].min()) > 0.5  # what a fixed tie order did
    gdro = GDRO(tau=tau, generator=torch.Generator().manual_seed(0))
    drawn = torch.stack([grad_for(gdro._tie_order(rewards)[0].tolist()) for _ in range(3000)]).mean(0)
    assert torch.allclose(drawn, exact, atol=0.04)
    # the flow-matching term's "top" is a random one of the tied best
    tops = [int(p[rewards.gather(1, p[None])[0].argmax()]) for p in (gdro._tie_order(rewards)[0] for _ in range(600))]
    assert all(abs(tops.count(j) / 600 - 1 / 3) < 0.07 for j in range(3))
    # without ties nothing is drawn: the generator stream (sigmas, noise) is untouched
    state = gdro.generator.get_state()
    assert gdro._tie_order(torch.tensor([[0.3, 0.1, 0.9]])).tolist() == [[0, 1, 2]]
    assert torch.equal(gdro.generator.get_state(), state)


def _row_errors(x0, sigma, noise, net):
    """Per-sample velocity error ‖net(x_s, s) − (ε − x0)‖² (mean over dims), by hand: ``[P, k]``."""
    P, k = x0.shape[:2]
    out = torch.empty(P, k)
    for p in range(P):
        for j in range(k):
            x_s = (1 - sigma[p, j]) * x0[p, j] + sigma[p, j] * noise[p, j]
            out[p, j] = ((net(x_s[None], sigma[p, j][None])[0] - (noise[p, j] - x0[p, j])) ** 2).mean()
    return out


def test_dpo_all_pairs_loss_and_metrics_match_a_hand_computation():
    """pairs="all": every ordered pair (w, l) with r_w > r_l, the mean of −log σ(−β[(e_w − e_ref,w) − (e_l − e_ref,l)]);
    implicit_acc = the fraction of pairs whose margin favours the winner, margin = mean of −β·[...]. Swapping
    winner and loser, or the sign of either metric, fails this."""
    torch.manual_seed(5)
    P, k, shape = 2, 3, (2, 2)
    x0 = torch.randn(P, k, *shape)
    rewards = torch.tensor([[0.3, 0.9, 0.1], [0.5, 0.5, 0.2]])  # group 1: a tie, which is no pair
    sigma = torch.rand(P, 1).expand(P, k)
    noise = torch.randn(P, 1, *shape).expand(P, k, *shape)
    policy, reference = LinearVelocity(4, seed=3), LinearVelocity(4, seed=4)
    beta = 3.0
    loss, m = DiffusionDPO(beta=beta, pairs="all").loss(OfflineBatch(x0, rewards), policy, reference, sigma=sigma, noise=noise)
    with torch.no_grad():
        d = _row_errors(x0, sigma, noise, policy) - _row_errors(x0, sigma, noise, reference)  # [P, k]
    pairs = [(p, i, j) for p in range(P) for i in range(k) for j in range(k) if rewards[p, i] > rewards[p, j]]
    assert len(pairs) == 3 + 2 and m["dpo/num_pairs"] == 5.0
    inside = torch.stack([-beta * (d[p, i] - d[p, j]) for p, i, j in pairs])
    assert loss.item() == pytest.approx(float(-F.logsigmoid(inside).mean()), rel=1e-5)
    assert m["dpo/implicit_acc"] == pytest.approx(float((inside > 0).float().mean()))
    assert m["dpo/margin"] == pytest.approx(float(inside.mean()), rel=1e-5)
    assert 0.0 < m["dpo/implicit_acc"] < 1.0  # this draw has pairs on both sides, so a flipped comparison shows


def test_dpo_best_worst_picks_among_tied_best_at_random():
    """A group [1, 1, 0] has two best members: each must be the winner about half the time (argmax always took
    member 0, so member 1 was never trained)."""
    rewards = torch.tensor([[1.0, 1.0, 0.0]])
    dpo = DiffusionDPO(generator=torch.Generator().manual_seed(0))
    winners = [int(dpo._pair_index(rewards)[0]) for _ in range(400)]
    assert set(winners) == {0, 1} and 150 < winners.count(1) < 250
    assert all(int(dpo._pair_index(rewards)[1]) == 2 for _ in range(20))  # the only worst member
    untied = DiffusionDPO(generator=torch.Generator().manual_seed(0))
    state = untied.generator.get_state()
    assert [t.tolist() for t in untied._pair_index(torch.tensor([[0.2, 0.9, 0.1]]))] == [[1], [2]]
    assert torch.equal(untied.generator.get_state(), state)  # no ties: nothing drawn


@pytest.mark.parametrize("name", ["gdro", "diffusion_dpo", "awm"])
def test_every_offline_objective_refuses_non_finite_explicit_rewards(name):
    """GDRO raised, Diffusion-DPO dropped the NaN's pairs without a word and AWM returned a NaN loss."""
    import torch

    from flowalign.objectives import get_objective
    from flowalign.objectives.base import OfflineBatch

    objective = get_objective(name)
    x0 = torch.randn(1, 4, 2, 4, 4)
    rewards = torch.tensor([[0.1, float("nan"), 0.5, 0.9]])
    batch = OfflineBatch(x0=x0, rewards=rewards, cond_index=torch.zeros(1, dtype=torch.long))
    velocity = lambda x, s: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match=f"{name} got non-finite explicit rewards"):
        objective.loss(batch, velocity, velocity)


def test_a_ranked_group_with_ties_pairs_each_score_with_its_own_reward_whatever_the_tie_order():
    """The tie shuffle permutes scores and targets together; permuting the targets alone paired the scores with other
    members' rewards (rewards [1, 0, 0], scores [0, 2, -1]: 3.72 by hand, 0.98 / 3.72 / 4.30 from draw to draw)."""
    torch.manual_seed(3)
    x0 = torch.randn(2, 3, 6)
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.9, 0.2]])
    sigma, noise = torch.rand(2, 1).expand(2, 3), torch.randn(2, 3, 6)
    policy, reference = LinearVelocity(6, 1), LinearVelocity(6, 2)
    scores = implicit_rewards(_row_errors(x0, sigma, noise, policy), _row_errors(x0, sigma, noise, reference), 6.0)
    by_hand = gdro_listwise_loss(scores, rewards, 0.05).mean()
    for seed in range(6):
        loss, _ = GDRO(tau=0.05, gamma=0.0, generator=torch.Generator().manual_seed(seed)).loss(
            OfflineBatch(x0, rewards), policy, reference, sigma=sigma, noise=noise)
        assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5), seed


def test_group_sigmas_and_noise_are_shared_within_a_group_and_cover_the_range():
    from flowalign.objectives.diffusion_dpo import sample_group_noise, sample_sigmas

    g = torch.Generator().manual_seed(0)
    shared = sample_sigmas(400, 4, sigma_range=(0.2, 0.4), generator=g)
    assert shared.shape == (400, 4) and torch.equal(shared, shared[:, :1].expand(400, 4))  # winner and loser at one sigma
    assert shared.min() >= 0.2 and shared.max() < 0.4 and shared.min() < 0.21 and shared.max() > 0.39  # U(0.2, 0.4)
    own = sample_sigmas(400, 4, per_sample=True, sigma_range=(0.2, 0.4), generator=g)
    assert own.min() >= 0.2 and own.max() < 0.4 and bool((own[:, 1:] != own[:, :1]).any())
    x0 = torch.zeros(5, 3, 2, 2)
    noise = sample_group_noise(x0, generator=g)
    assert torch.equal(noise, noise[:, :1].expand_as(noise)) and noise[:, 0].std() > 0.5
    assert bool((sample_group_noise(x0, per_sample=True, generator=g)[:, 1:] != noise[:, :1]).any())


def test_group_reward_norm_uses_the_population_std_by_hand():
    # rewards [0, 1, 2]: mean 1, population std sqrt(2/3) -> targets [-1.2247, 0, 1.2247] (sample std: +-1)
    torch.manual_seed(5)
    x0, rewards = torch.randn(1, 3, 6), torch.tensor([[0.0, 1.0, 2.0]])
    sigma, noise = torch.rand(1, 1).expand(1, 3), torch.randn(1, 3, 6)
    policy, reference = LinearVelocity(6, 1), LinearVelocity(6, 2)
    scores = implicit_rewards(_row_errors(x0, sigma, noise, policy), _row_errors(x0, sigma, noise, reference), 6.0)
    targets = torch.tensor([[-1.0, 0.0, 1.0]]) / (math.sqrt(2 / 3) + 1e-4)
    loss, _ = GDRO(tau=0.5, gamma=0.0, reward_norm="group").loss(OfflineBatch(x0, rewards), policy, reference, sigma=sigma, noise=noise)
    assert loss.item() == pytest.approx(gdro_listwise_loss(scores, targets, 0.5).item(), rel=1e-5)


def test_group_reward_norm_keeps_a_near_tie_a_near_tie():
    """Rewards [0.5, 0.500001, 0.5] (float noise of one reward) were z-scored by std.clamp_min(1e-8) into the same
    targets as [0, 1, 0]: a full-confidence ranking of noise. With std + eps the targets are about 0.005 apart."""
    torch.manual_seed(6)
    x0, sigma, noise = torch.randn(1, 3, 6), torch.rand(1, 1).expand(1, 3), torch.randn(1, 3, 6)
    policy, reference = LinearVelocity(6, 1), LinearVelocity(6, 2)
    scores = implicit_rewards(_row_errors(x0, sigma, noise, policy), _row_errors(x0, sigma, noise, reference), 6.0)
    near = torch.tensor([[0.5, 0.500001, 0.5]], dtype=torch.float64)
    std = math.sqrt(2 / 9) * 1e-6  # population std of [0, 1e-6, 0]
    by_hand = ((near - near.mean()) / (std + 1e-4)).float()  # about [-0.0047, 0.0094, -0.0047]
    assert by_hand.abs().max() < 0.01
    objective = GDRO(tau=0.05, gamma=0.0, reward_norm="group")
    loss, _ = objective.loss(OfflineBatch(x0, near.float()), policy, reference, sigma=sigma, noise=noise)
    assert loss.item() == pytest.approx(gdro_listwise_loss(scores, by_hand, 0.05).item(), rel=1e-3)
    ranked, _ = objective.loss(OfflineBatch(x0, torch.tensor([[0.0, 1.0, 0.0]])), policy, reference, sigma=sigma, noise=noise)
    assert abs(ranked.item() - loss.item()) > 0.1
    with pytest.raises(ValueError, match="reward_norm_eps must be > 0"):
        GDRO(reward_norm_eps=0.0)
