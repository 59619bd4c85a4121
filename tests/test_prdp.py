"""PRDP: hand-worked loss values, clipping cuts the gradient, a step moves the predicted reward
difference towards the observed one, the online resampling helper."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flowalign import sde
from flowalign.objectives.base import OBJECTIVES
from flowalign.objectives.prdp import PRDP, PairBatch, prdp_loss, run_online_prdp


class LinearVelocity(nn.Module):
    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(dim, dim, generator=g) * 0.2)
        self.b = nn.Parameter(torch.randn(dim, generator=g) * 0.2)

    def forward(self, x, sigma):
        return (x.flatten(1) @ self.W.T + sigma[:, None] * self.b).view_as(x)


LA = [[0.2, -0.1]]
LB = [[0.0, 0.3]]


def test_hand_worked_full_sum_no_clip():
    # Δℓ sum = 0.2 - 0.4 = -0.2; r̂ = 0.5 * -0.2 = -0.1; Δr = 0.8 -> (0.9)² = 0.81
    loss, clipped = prdp_loss(torch.tensor(LA), torch.tensor(LB), torch.tensor([1.0]), torch.tensor([0.2]), 0.5, None, per_step=False)
    assert loss.item() == pytest.approx(0.81, rel=1e-6)
    assert not clipped.any()


def test_hand_worked_per_step_no_clip():
    # step 0: r̂ = 0.5*2*0.2 = 0.2 -> 0.36; step 1: r̂ = 0.5*2*(-0.4) = -0.4 -> 1.44; mean 0.9
    loss, _ = prdp_loss(torch.tensor(LA), torch.tensor(LB), torch.tensor([1.0]), torch.tensor([0.2]), 0.5, None, per_step=True)
    assert loss.item() == pytest.approx(0.9, rel=1e-6)


def test_clipping_value_and_gradient_cut():
    # eps = 0.15: step 0 clipped Δ = 0.15 -> (0.65)² = 0.4225 > 0.36, the clipped branch wins and
    # ℓ_a[0] = 0.2 is outside the range: no gradient. Step 1: clipped Δ = -0.25 -> 1.1025 < 1.44,
    # the unclipped branch wins and the gradient flows. Mean (0.4225 + 1.44) / 2.
    la = torch.tensor(LA, requires_grad=True)
    lb = torch.tensor(LB, requires_grad=True)
    loss, clipped = prdp_loss(la, lb, torch.tensor([1.0]), torch.tensor([0.2]), 0.5, 0.15, per_step=True)
    assert loss.item() == pytest.approx(0.93125, rel=1e-6)
    assert clipped.tolist() == [[True, False]]
    loss.sum().backward()
    assert la.grad[0, 0].item() == 0.0
    # d/dℓ_a[1] of ½·(Δr - βK(ℓa1 - ℓb1))² (mean over K=2 steps) = -βK·(Δr - r̂_1) = -1·1.2
    assert la.grad[0, 1].item() == pytest.approx(-1.2, rel=1e-6)
    assert lb.grad[0, 1].item() == pytest.approx(1.2, rel=1e-6)


def _sample_pairs(model, P=3, K=3, dim=8, seed=0, a=0.7):
    g = torch.Generator().manual_seed(seed)
    sigmas = torch.linspace(1.0, 0.0, K + 1)
    x = torch.randn(P * 2, dim, generator=g)
    xs, xn, lps = [], [], []
    with torch.no_grad():
        for k in range(K):
            s = sigmas[k].expand(P * 2)
            out = sde.step("flow_sde", x, model(x, s), s, sigmas[k + 1].expand(P * 2), a, generator=g)
            xs.append(x)
            xn.append(out.prev_sample)
            lps.append(sde.log_prob(out.prev_sample, out.mean, out.std))
            x = out.prev_sample
    stack = lambda t: torch.stack(t, 1).view(P, 2, K, *t[0].shape[1:])  # noqa: E731
    rewards = -x.pow(2).mean(1).view(P, 2)  # prefer samples near the origin
    return PairBatch(
        x=stack(xs), x_next=stack(xn), sigma=sigmas[:-1], sigma_next=sigmas[1:], noise_level=torch.full((K,), a),
        old_log_probs=torch.stack(lps, 1).view(P, 2, K), rewards=rewards,
    )


def test_objective_recomputes_recorded_log_probs_and_step_moves_prediction():
    torch.manual_seed(3)
    assert OBJECTIVES["prdp"] is PRDP
    model = LinearVelocity(8, seed=1)
    batch = _sample_pairs(model)
    objective = PRDP(beta=0.1, clip_range=None, per_step=False)
    loss, metrics = objective.loss(batch, model, None)
    # policy == sampler: log-ratios are 0, prediction 0, loss = Δr²
    target = batch.rewards[:, 0] - batch.rewards[:, 1]
    assert loss.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-5)
    assert metrics["prdp/pred_diff_abs"] == pytest.approx(0.0, abs=1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss.backward()
    opt.step()
    with torch.no_grad():
        from flowalign.objectives.prdp import _policy_log_probs

        ratio = _policy_log_probs(batch, model) - batch.old_log_probs
        pred = 0.1 * (ratio[:, 0] - ratio[:, 1]).sum(1)
    # the prediction moved towards the observed difference: same sign, smaller loss
    assert (torch.sign(pred) == torch.sign(target)).all()
    new_loss, _ = objective.loss(batch, model, None)
    assert new_loss.item() < loss.item()


def test_clip_fraction_reported_when_policy_moved():
    model = LinearVelocity(8, seed=1)
    batch = _sample_pairs(model)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.W.add_(0.3)
    _, m_tight = PRDP(beta=0.1, clip_range=1e-6).loss(batch, moved)
    _, m_loose = PRDP(beta=0.1, clip_range=1e6).loss(batch, moved)
    assert m_tight["prdp/clip_frac"] > 0.0
    assert m_loose["prdp/clip_frac"] == 0.0


def test_online_helper_resamples_every_k_updates():
    calls = []

    def sample_fn(i):
        calls.append(i)
        return i

    history = run_online_prdp(sample_fn, lambda b: {"batch": float(b)}, num_updates=7, resample_every=3)
    assert calls == [0, 1, 2]
    assert [h["batch"] for h in history] == [0, 0, 0, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="resample_every"):
        run_online_prdp(sample_fn, lambda b: {}, 1, 0)


def test_a_step_mask_averages_over_the_counted_steps_only():
    # steps 0 and 2 count (K_eff = 2); the middle one's huge log-ratios must not matter
    la, lb = torch.tensor([[0.2, 0.5, -0.1]]), torch.tensor([[0.0, 9.0, 0.3]])
    mask = torch.tensor([True, False, True])
    r_a, r_b = torch.tensor([1.0]), torch.tensor([0.2])
    per_step, _ = prdp_loss(la, lb, r_a, r_b, 0.5, None, per_step=True, step_mask=mask)
    assert per_step.item() == pytest.approx((0.36 + 1.44) / 2, rel=1e-6)  # as test_hand_worked_per_step_no_clip, K = 2
    full, _ = prdp_loss(la, lb, r_a, r_b, 0.5, None, per_step=False, step_mask=mask)
    assert full.item() == pytest.approx(0.81, rel=1e-6)  # Δℓ sum over the counted steps -0.2, as the full-sum hand case


@pytest.mark.parametrize("per_step", [False, True])
def test_each_side_is_clipped_before_the_difference_and_the_larger_branch_wins(per_step):
    # ℓa = 0.2, ℓb = 0.1, ε = 0.1, Δr = 1, β = 1, K = 1: unclipped Δℓ 0.1 -> (0.9)² = 0.81; each side clipped:
    # 0.1 - 0.1 = 0 -> 1.0, the larger (clipping the difference instead keeps 0.1 -> 0.81)
    loss, clipped = prdp_loss(torch.tensor([[0.2]]), torch.tensor([[0.1]]), torch.tensor([1.0]), torch.tensor([0.0]), 1.0, 0.1,
                              per_step=per_step)
    assert loss.item() == pytest.approx(1.0, rel=1e-6)
    assert clipped.tolist() == [[True]]
