"""Tests for the Flow-GRPO objective: ratio, REINFORCE gradient, clipping, KL, registry."""
import dataclasses
import math

import pytest
import torch

from flowalign import sde
from flowalign.errors import ConfigError
from flowalign.objectives import OBJECTIVES, StepBatch, available_objectives, get_objective
from flowalign.objectives.grpo import FlowGRPO, clipped_policy_loss, mean_kl, transition_mean

D = 6


def _linear_policy(seed):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(D, D)
    return lin, (lambda x, sigma: lin(x))


def _flow_sde_coeffs(s, s_next, a):
    """Hand formulas of the Flow-SDE kernel: d mean / d v and std (s < 1 here)."""
    dt = s_next - s
    std_t = a * math.sqrt(s / (1 - s))
    return (1 + std_t**2 * (1 - s) / (2 * s)) * dt, std_t * math.sqrt(-dt)


def _batch(policy, seed=0, B=5, a=0.7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    sigma = torch.tensor([0.9, 0.8, 0.6, 0.5, 0.3][:B])
    sigma_next = sigma - 0.1
    level = torch.full((B,), a)
    with torch.no_grad():
        out = sde.step("flow_sde", x, policy(x, sigma), sigma, sigma_next, level, generator=g)
        old = sde.log_prob(out.prev_sample, out.mean, out.std)
    adv = torch.tensor([1.5, -0.7, 0.3, -2.0, 0.9][:B])
    return StepBatch(x=x, x_next=out.prev_sample, sigma=sigma, sigma_next=sigma_next, noise_level=level,
                     old_log_prob=old, advantages=adv, kernel="flow_sde")


def test_first_inner_step_ratio_one_and_reinforce_gradient():
    lin, policy = _linear_policy(0)
    batch = _batch(policy)
    obj = FlowGRPO(clip_range=1e-4)
    loss, metrics = obj.loss(batch, policy, None)
    assert metrics["policy/ratio_mean"] == 1.0 and metrics["policy/clip_frac"] == 0.0
    assert metrics["policy/approx_kl"] == 0.0
    loss.backward()
    # hand REINFORCE gradient: d logp_i / d mean_i = (x'_i - mean_i) / (std² D); d mean / d v = c_v;
    # v = W x + b  =>  grad_W logp_i = c_v (x'_i - mean_i) x_i^T / (std² D);  loss grad = -mean_i A_i grad logp_i
    gW, gb = torch.zeros(D, D), torch.zeros(D)
    with torch.no_grad():
        for i in range(len(batch.sigma)):
            s, sn = float(batch.sigma[i]), float(batch.sigma_next[i])
            c_v, std = _flow_sde_coeffs(s, sn, 0.7)
            std_t = 0.7 * math.sqrt(s / (1 - s))
            x = batch.x[i]
            mean = x * (1 + std_t**2 * (sn - s) / (2 * s)) + lin(x) * c_v
            dlogp_dv = c_v * (batch.x_next[i] - mean) / (std**2 * D)
            gW += -batch.advantages[i] * torch.outer(dlogp_dv, x) / len(batch.sigma)
            gb += -batch.advantages[i] * dlogp_dv / len(batch.sigma)
    assert torch.allclose(lin.weight.grad, gW, rtol=1e-4, atol=1e-6)
    assert torch.allclose(lin.bias.grad, gb, rtol=1e-4, atol=1e-6)


def test_clipping_zeroes_gradient_outside_trust_region_by_sign_of_advantage():
    eps = 0.2
    logratio = torch.tensor([0.5, 0.5, -0.5, -0.5, 0.1])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    old = torch.zeros(5)
    logp = logratio.clone().requires_grad_(True)
    loss, m = clipped_policy_loss(logp, old, adv, eps)
    loss.backward()
    r = torch.exp(logratio)
    # row 0: A>0, ratio>1+eps -> clipped (0); row 1: A<0, ratio>1+eps -> unclipped: -A r / B
    # row 2: A>0, ratio<1-eps -> unclipped; row 3: A<0, ratio<1-eps -> clipped; row 4 inside -> -A r / B
    expected = torch.tensor([0.0, r[1] / 5, -r[2] / 5, 0.0, -2 * r[4] / 5])
    assert torch.allclose(logp.grad, expected, atol=1e-7)
    # loss by hand: max(-A r, -A clip(r))
    hand = [max(-a * rr, -a * min(max(rr, 1 - eps), 1 + eps)) for a, rr in zip(adv.tolist(), r.tolist())]
    assert loss.item() == pytest.approx(sum(hand) / 5)
    assert m["policy/clip_frac"] == pytest.approx(4 / 5)
    assert m["policy/approx_kl"] == pytest.approx(float(((r - 1) - logratio).mean()))
    assert m["policy/ratio_mean"] == pytest.approx(float(r.mean()))


def test_kl_zero_at_reference_positive_after_change_and_hand_value():
    lin, policy = _linear_policy(1)
    ref_lin, reference = _linear_policy(1)  # same init -> policy == reference
    batch = _batch(policy, seed=3)
    obj = FlowGRPO(kl_beta=0.5)
    assert obj.needs_reference and not FlowGRPO().needs_reference
    loss, m = obj.loss(batch, policy, reference)
    assert m["kl/ref"] == 0.0
    with torch.no_grad():
        lin.weight.add_(0.05)
    loss, m = obj.loss(batch, policy, reference)
    loss.backward()
    assert ref_lin.weight.grad is None  # reference evaluated without grad
    with torch.no_grad():
        kls = []
        for i in range(len(batch.sigma)):
            c_v, std = _flow_sde_coeffs(float(batch.sigma[i]), float(batch.sigma_next[i]), 0.7)
            dmean = c_v * (lin(batch.x[i]) - ref_lin(batch.x[i]))
            kls.append(float((dmean**2).mean() / (2 * std**2)))
    assert m["kl/ref"] > 0
    assert m["kl/ref"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert m["loss/total"] == pytest.approx(m["loss/policy"] + 0.5 * m["kl/ref"], rel=1e-5)

    # kl_form="per_time": Flow-GRPO's released code divides by sigma_t^2 (its std_dev_t), not the step's variance
    # sigma_t^2 |dt|: each row's KL times |dt| = sigma - sigma_next
    per_time = FlowGRPO(kl_beta=0.5, kl_form="per_time").loss(batch, policy, reference)[1]
    with torch.no_grad():
        by_hand = []
        for i in range(len(batch.sigma)):
            c_v, std = _flow_sde_coeffs(float(batch.sigma[i]), float(batch.sigma_next[i]), 0.7)
            dt = float(batch.sigma[i]) - float(batch.sigma_next[i])
            sigma_t = std / dt ** 0.5  # the code's std_dev_t = a sqrt(s / (1 - s)), without sqrt(-dt)
            by_hand.append(float((c_v * (lin(batch.x[i]) - ref_lin(batch.x[i]))) .pow(2).mean() / (2 * sigma_t**2)))
    assert per_time["kl/ref"] == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-4)
    assert per_time["kl/ref"] < m["kl/ref"]
    with pytest.raises(ValueError, match="kl_form"):
        FlowGRPO(kl_form="paper")


def test_per_time_kl_under_cps_is_the_released_cps_branch():
    """Flow-GRPO's ``cps`` branch returns ``std_dev_t = s' sin(a pi / 2)``, the step's full std, and its KL divides by
    that squared: ``kl_form="per_time"`` must equal ``"transition"`` there (times |dt| would weaken it 4-25x)."""
    lin, policy = _linear_policy(1)
    ref_lin, reference = _linear_policy(2)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, D, generator=g)
    sigma = torch.tensor([0.9, 0.7, 0.5, 0.3])
    sigma_next = sigma - 0.2
    level = torch.full((4,), 0.7)
    with torch.no_grad():
        out = sde.step("cps", x, policy(x, sigma), sigma, sigma_next, level, generator=g)
        old = sde.log_prob(out.prev_sample, out.mean, out.std)
    batch = StepBatch(x=x, x_next=out.prev_sample, sigma=sigma, sigma_next=sigma_next, noise_level=level,
                      old_log_prob=old, advantages=torch.zeros(4), kernel="cps")
    with torch.no_grad():
        by_hand = []
        for i in range(4):
            s, s1 = float(sigma[i]), float(sigma_next[i])
            std_dev_t = s1 * math.sin(0.7 * math.pi / 2)
            # released cps mean: (1 - s') x0_hat + sqrt(s'^2 - std^2) x1_hat, x0_hat = x - s v, x1_hat = x + (1 - s) v
            c_v = -(1 - s1) * s + math.sqrt(s1**2 - std_dev_t**2) * (1 - s)  # d mean / d v
            dmean = c_v * (lin(x[i]) - ref_lin(x[i]))
            by_hand.append(float(dmean.pow(2).mean() / (2 * std_dev_t**2)))
    for form in ("per_time", "transition"):
        m = FlowGRPO(kl_beta=0.5, kl_form=form).loss(batch, policy, reference)[1]
        assert m["kl/ref"] == pytest.approx(sum(by_hand) / 4, rel=1e-4), form


def test_mean_kl_rows_and_deterministic_rows():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    std = torch.tensor([[2.0], [0.0]])
    kl = mean_kl(mean, ref, std)
    assert kl.tolist() == pytest.approx([(1 / 8 + 4 / 8) / 2, 0.0])


def test_the_kl_is_reduced_over_latent_dims_as_the_log_probs_are():
    """Under log_prob_reduce=sum the ratio term sums over the D latent dims, but the KL was always a mean: kl_beta
    weighed D times less against it (65k times at SD3.5's 512 px)."""
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    std = torch.tensor([[2.0], [0.0]])
    assert mean_kl(mean, ref, std, reduce="sum").tolist() == pytest.approx([1 / 8 + 4 / 8, 0.0])
    with pytest.raises(ValueError, match="reduce"):
        mean_kl(mean, ref, std, reduce="max")
    lin, policy = _linear_policy(0)
    _, reference = _linear_policy(3)
    batch = _batch(policy)
    summed = dataclasses.replace(batch, old_log_prob=sde.log_prob(batch.x_next, *transition_mean(batch, policy), reduce="sum").detach(),
                                 log_prob_reduce="sum")
    by_mean = FlowGRPO(kl_beta=0.5).loss(batch, policy, reference)[1]["kl/ref"]
    by_sum = FlowGRPO(kl_beta=0.5).loss(summed, policy, reference)[1]["kl/ref"]
    assert by_sum == pytest.approx(D * by_mean, rel=1e-5)


def test_mean_kl_takes_a_b_std_per_sample_even_when_the_last_dim_is_b():
    torch.manual_seed(0)
    mean, ref = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)  # last dim 4 == B
    std = torch.tensor([0.1, 0.2, 0.4, 0.8])
    by_hand = [float(((mean[i] - ref[i]) ** 2).mean() / (2 * float(std[i]) ** 2)) for i in range(4)]
    assert mean_kl(mean, ref, std).tolist() == pytest.approx(by_hand, rel=1e-5)
    assert torch.equal(mean_kl(mean, ref, std), mean_kl(mean, ref, std.reshape(4, 1, 1, 1)))


def test_advantages_are_clamped():
    lin, policy = _linear_policy(2)
    batch = _batch(policy)
    big = StepBatch(**{**batch.__dict__, "advantages": batch.advantages * 100})
    clamped = StepBatch(**{**batch.__dict__, "advantages": torch.clamp(batch.advantages * 100, -5, 5)})
    obj = FlowGRPO(adv_clip=5.0)
    g1 = torch.autograd.grad(obj.loss(big, policy)[0], lin.weight)[0]
    g2 = torch.autograd.grad(obj.loss(clamped, policy)[0], lin.weight)[0]
    assert torch.allclose(g1, g2)


def test_registry_and_errors():
    assert {"grpo", "dense_grpo", "tp_grpo"} <= set(available_objectives())
    assert OBJECTIVES["grpo"] is FlowGRPO
    obj = get_objective("grpo", clip_range=2e-4)
    assert obj.clip_range == 2e-4 and obj.name == "grpo"
    with pytest.raises(ConfigError, match=r"unknown objective 'ppo'.*grpo"):
        get_objective("ppo")
    with pytest.raises(ConfigError, match="bad arguments"):
        get_objective("grpo", clip=0.1)
    with pytest.raises(ValueError, match="clip_range"):
        FlowGRPO(clip_range=0.0)
    with pytest.raises(ValueError, match=r"\[B\]"):
        clipped_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), 0.1)


def test_nan_hyper_parameters_are_refused_on_direct_construction():
    """The range checks (x <= 0) are False for NaN: FlowGRPO(clip_range=nan) and a NaN kl_beta were accepted and every
    loss came out NaN with policy/clip_frac 0; calibrate_noise_table(max_level=-1) gave a table of negative levels."""
    import math

    from flowalign.dense import calibrate_noise_table
    from flowalign.objectives.diffusion_dpo import DiffusionDPO
    from flowalign.objectives.grpo import FlowGRPO, clipped_policy_loss

    for kwargs in ({"clip_range": math.nan}, {"kl_beta": math.nan}, {"adv_clip": math.inf}):
        with pytest.raises(ValueError, match="finite"):
            FlowGRPO(**kwargs)
    with pytest.raises(ValueError, match="finite"):
        DiffusionDPO(beta=math.nan)
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="clip_range must be a finite number > 0"):
        clipped_policy_loss(z, z, z, math.nan)
    with pytest.raises(ValueError, match="max_level must be None or >= 0"):
        calibrate_noise_table(torch.tensor([0.7]), torch.tensor([[1.0], [-1.0]]), max_level=-1.0)
