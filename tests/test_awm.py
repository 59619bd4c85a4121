"""Advantage Weighted Matching (flowalign.objectives.awm): hand-worked surrogate and loss, its gradient, the trainer path."""
from __future__ import annotations

import math

import pytest
import torch

from flowalign.config import load_config
from flowalign.errors import ConfigError
from flowalign.objectives import get_objective
from flowalign.objectives.awm import awm_policy_loss, matching_log_likelihood
from flowalign.objectives.nft import ForwardBatch
from flowalign.train.trainer import Trainer


def test_matching_log_likelihood_hand_worked():
    # two rows of two dims: errors (0.5 - 1)^2, (1 - 0)^2 -> mean 0.625;  (0 - 0)^2, (2 - 0)^2 -> mean 2
    v = torch.tensor([[0.5, 1.0], [0.0, 2.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    sigma = torch.tensor([0.5, 0.25])
    assert matching_log_likelihood(v, target, sigma, "uniform").tolist() == pytest.approx([-0.625, -2.0])
    assert matching_log_likelihood(v, target, sigma, "t").tolist() == pytest.approx([-0.3125, -0.5])
    assert matching_log_likelihood(v, target, sigma, "t2").tolist() == pytest.approx([-0.15625, -0.125])
    # ghuber, p = 0.5: -s * 2 * (sqrt(e) - 0)  (delta = 1e-10 only moves the 6th decimal here)
    expected = [-0.5 * 2 * math.sqrt(0.625), -0.25 * 2 * math.sqrt(2.0)]
    assert matching_log_likelihood(v, target, sigma, "ghuber", power=0.5).tolist() == pytest.approx(expected, abs=1e-5)
    # ghuber with p = 1 is the "t" weighting
    assert matching_log_likelihood(v, target, sigma, "ghuber", power=1.0).tolist() == pytest.approx([-0.3125, -0.5], abs=1e-9)
    with pytest.raises(ValueError, match="weighting"):
        matching_log_likelihood(v, target, sigma, "huber")
    with pytest.raises(ValueError, match="must match"):
        matching_log_likelihood(v, target[:, :1], sigma)


def test_awm_policy_loss_hand_worked_with_clipping():
    # ratios e^0 = 1, e^0.5 = 1.6487, e^-0.5 = 0.6065 against advantages 1, 1, -1; clip 0.2
    log_lik = torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64)
    old = torch.zeros(3, dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    loss, ratio = awm_policy_loss(log_lik, old, adv, clip_range=0.2)
    assert ratio.tolist() == pytest.approx([1.0, math.exp(0.5), math.exp(-0.5)])
    # row 0: -1;  row 1: max(-1.6487, -1.2) = -1.2;  row 2: max(0.6065, 0.8) = 0.8
    assert loss.tolist() == pytest.approx([-1.0, -1.2, 0.8])
    with pytest.raises(ValueError, match="must all be"):
        awm_policy_loss(log_lik, old[:2], adv, 0.2)


def test_gradient_at_the_old_policy_is_advantage_weighted_flow_matching():
    """One optimizer step per iteration: the gradient is sum_i A_i w(s_i) phi'(e_i) grad e_i / B (independent autograd-free formula)."""
    g = torch.Generator().manual_seed(0)
    x0, eps, v0 = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.2, 0.4, 0.7, 1.0], dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0, 0.0, 7.0], dtype=torch.float64)
    v = v0.clone().requires_grad_(True)
    obj = get_objective("awm", adv_clip=5.0, advantage_max=1.0, weighting="ghuber", ghuber_power=0.25)
    batch = ForwardBatch(x0=x0, noise=eps, sigma=sigma, advantages=adv)
    # a "policy" that ignores its input and returns the free tensor v
    loss, metrics = obj.loss(batch, lambda x, s: v)
    loss.backward()
    target = eps - x0
    err = (v0 - target).pow(2).mean(dim=1)  # [B]
    a_hat = adv.clamp(-5, 5) / 5.0  # [0.4, -0.2, 0, 1]
    # d/dv of -(-s ((e + d)^p - d^p) / p) * A / B = A s (e + d)^(p - 1) * 2 (v - target) / D / B
    expected = (a_hat * sigma * (err + 1e-10).pow(-0.75))[:, None] * 2 * (v0 - target) / 6 / 4
    assert torch.allclose(v.grad, expected, atol=1e-10)
    assert v.grad[2].abs().max() == 0.0  # zero advantage: nothing to learn
    assert metrics["awm/ratio_mean"] == 1.0 and metrics["awm/clipfrac"] == 0.0


@pytest.mark.parametrize("weighting", ["uniform", "t", "ghuber"])
def test_descent_pulls_good_samples_in_and_pushes_bad_ones_out(weighting):
    """Brute force: a few SGD steps on a free v shrink the flow-matching error of a positive-advantage row and grow a negative one's."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    v = torch.zeros(2, 5, requires_grad=True)
    batch = ForwardBatch(x0=x0, noise=eps, sigma=torch.tensor([0.6, 0.6]), advantages=torch.tensor([3.0, -3.0]))
    obj = get_objective("awm", weighting=weighting, clip_range=10.0)
    before = (v.detach() - (eps - x0)).pow(2).mean(dim=1)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        obj.loss(batch, lambda x, s: v)[0].backward()
        opt.step()
    after = (v.detach() - (eps - x0)).pow(2).mean(dim=1)
    assert after[0] < 0.9 * before[0] and after[1] > 1.05 * before[1]


def test_reference_penalty_and_old_velocity_hand_worked():
    x0 = torch.tensor([[1.0, 0.0]])
    eps = torch.tensor([[0.0, 1.0]])  # target v = eps - x0 = (-1, 1)
    sigma = torch.tensor([0.5])
    batch = ForwardBatch(x0=x0, noise=eps, sigma=sigma, advantages=torch.tensor([5.0]), v_old=torch.tensor([[-1.0, 1.0]]))
    obj = get_objective("awm", weighting="uniform", clip_range=0.1, kl_beta=0.5, adv_clip=5.0)
    # policy v = (0, 0): e = 1, log-lik -1; old v = target: log-lik 0; ratio e^-1 = 0.3679 < 0.9 -> clipped term -0.9 vs -0.3679
    # max(-0.3679, -0.9) = -0.3679;  reference v = (1, 1): kl = ((0-1)^2 + (0-1)^2)/2 = 1 -> + 0.5
    loss, metrics = obj.loss(batch, lambda x, s: torch.zeros_like(x), lambda x, s: torch.ones_like(x))
    assert loss.item() == pytest.approx(-math.exp(-1.0) + 0.5, abs=1e-6)
    assert metrics["kl/ref"] == pytest.approx(1.0) and metrics["awm/clipfrac"] == 1.0
    assert obj.needs_reference
    with pytest.raises(ValueError, match="reference"):
        obj.loss(batch, lambda x, s: torch.zeros_like(x), None)


def test_ema_penalty_hand_worked():
    x0 = torch.tensor([[1.0, 0.0]])
    eps = torch.tensor([[0.0, 1.0]])  # target v = (-1, 1)
    sigma = torch.tensor([0.5])
    obj = get_objective("awm", weighting="uniform", clip_range=0.1, adv_clip=5.0, ema_beta=0.25)
    assert obj.needs_ema and not obj.needs_reference
    batch = ForwardBatch(x0=x0, noise=eps, sigma=sigma, advantages=torch.tensor([5.0]), v_old=torch.tensor([[-1.0, 1.0]]),
                         v_ema=torch.tensor([[2.0, 0.0]]))
    # as the reference test: policy (0, 0), ratio e^-1 -> -0.3679;  EMA gap ((0-2)^2 + 0^2)/2 = 2 -> + 0.25 * 2
    loss, metrics = obj.loss(batch, lambda x, s: torch.zeros_like(x))
    assert loss.item() == pytest.approx(-math.exp(-1.0) + 0.5, abs=1e-6)
    assert metrics["awm/ema_gap"] == pytest.approx(2.0)
    batch.v_ema = None
    with pytest.raises(ValueError, match="v_ema"):
        obj.loss(batch, lambda x, s: torch.zeros_like(x))
    assert not get_objective("awm").needs_ema


def test_constructor_rejects_bad_arguments():
    for kwargs in ({"weighting": "l1"}, {"ghuber_power": 0.0}, {"ghuber_power": 1.5}, {"num_timesteps": 0},
                   {"sigma_sampling": "logit"}, {"advantage_max": 0.0}, {"clip_range": 0.0}, {"kl_beta": -1.0}, {"ema_beta": -0.1}):
        with pytest.raises(ConfigError):
            get_objective("awm", **kwargs)


# ----------------------------------------------------------------------------- the trainer path

AWM_FAST = [
    "objective.name=awm", "objective.clip_range=1.0", "objective.kwargs={num_timesteps: 2, weighting: t}", "sampling.kernel=ode",
    "sampling.num_steps=4", "sampling.guidance_scale=1.0", "sampling.group_size=4",
    "train.prompts_per_iter=4", "train.micro_batch_size=8", "lora.rank=4", "lora.alpha=8",
    "train.progress=false", "train.log_with=[]", "train.eval_every=-1", "train.checkpoint_every=0",
]


def test_awm_runs_in_the_trainer_with_ode_rollouts(tmp_path):
    load_config(None, AWM_FAST + [f"train.output_dir={tmp_path}"])  # ODE sampling is accepted: a forward-process objective
    trainer = Trainer(load_config(None, AWM_FAST + [f"train.output_dir={tmp_path}", "train.grad_accum=4", "train.lr=1e-2"])).setup()
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.run_iteration()
    assert metrics["optim/steps"] == 1.0 and metrics["awm/ratio_mean"] == pytest.approx(1.0)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))


def test_ema_penalty_in_the_trainer_reads_the_ema_weights(tmp_path):
    """ema_beta needs train.ema; the trainer fills v_ema with the LoRA's EMA weights: equal to the trained ones
    before the first step (gap 0), behind them after it (gap > 0, and the same velocity as the weights set by hand)."""
    from flowalign.train import forward_process as fp
    from flowalign.train.trainer import velocity_fns

    base = AWM_FAST + [f"train.output_dir={tmp_path}", "train.grad_accum=4", "train.lr=1e-2",
                       "objective.kwargs={num_timesteps: 2, weighting: t, ema_beta: 0.1}"]
    with pytest.raises(ConfigError, match="set train.ema=true"):
        Trainer(load_config(None, base)).setup()
    trainer = Trainer(load_config(None, base + ["train.ema=true", "train.ema_decay=0.5"])).setup()
    first = trainer.run_iteration()
    assert first["awm/ema_gap"] == 0.0  # the EMA starts at the initial weights, which the first step starts from
    trainer.iteration += 1
    second = trainer.run_iteration()
    assert second["awm/ema_gap"] > 0.0
    # an independent EMA velocity: copy the shadow weights in by hand, evaluate, restore
    batch = trainer.collect()
    plan = trainer._plan(batch)
    trainer._prepare_forward_draws(batch, plan, optimizer_steps=1)
    index, j = plan[0]
    rows = trainer._make_batch(batch, index, j)
    saved = [p.detach().clone() for p in trainer.params]
    with torch.no_grad():
        for p, shadow in zip(trainer.params, trainer.optim.ema.shadow):
            p.copy_(shadow)
        cond = trainer.conditioning.policy(batch, index, requires_grad=False)
        by_hand = velocity_fns(trainer.adapter, cond, 1.0, False)[0](fp.noised(rows), rows.sigma)
        for p, value in zip(trainer.params, saved):
            p.copy_(value)
    assert torch.allclose(rows.v_ema, by_hand, atol=1e-6)
    assert all(torch.equal(p, value) for p, value in zip(trainer.params, saved))  # the trained weights came back
    assert not torch.allclose(rows.v_ema, velocity_fns(trainer.adapter, cond, 1.0, False)[0](fp.noised(rows), rows.sigma).detach())


def test_the_official_kl_ema_is_a_fast_copy_of_its_own(tmp_path):
    """ema_target: kl_ema keeps the official recipe's penalty target: a copy of the LoRA soft-updated after each
    iteration with d = min(kl_ema_decay, kl_ema_rate * optimizer steps), apart from train.ema (off here), and saved in
    checkpoints. The shadow is unrolled by hand from the weights after each iteration."""
    base = AWM_FAST + [f"train.output_dir={tmp_path}", "train.grad_accum=2", "train.lr=1e-2", "train.checkpoint_every=1",
                       "objective.kwargs={num_timesteps: 2, weighting: t, ema_beta: 1.0, ema_target: kl_ema, "
                       "kl_ema_decay: 0.3, kl_ema_rate: 0.1}"]
    trainer = Trainer(load_config(None, base)).setup()  # no train.ema needed
    assert trainer.optim.ema is None and trainer.optim.kl_ema is not None
    shadow = [p.detach().float().clone() for p in trainer.params]
    for _ in range(3):
        metrics = trainer.run_iteration()
        trainer.iteration += 1
        decay = min(0.3, 0.1 * trainer.optim.steps_taken)
        assert metrics["kl_ema/decay"] == pytest.approx(decay) and "awm/ema_gap" in metrics
        shadow = [decay * s + (1 - decay) * p.detach().float() for s, p in zip(shadow, trainer.params)]
        assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(trainer.optim.kl_ema.shadow, shadow))
    tensors, _ = trainer.optim.state()
    assert set(tensors) == {"kl_ema"}
    trainer.cleanup()
    with pytest.raises(ConfigError, match="ema_target"):
        Trainer(load_config(None, AWM_FAST + [f"train.output_dir={tmp_path / 'x'}", "objective.kwargs={ema_beta: 1.0, ema_target: nope}"])).setup()


def test_awm_training_raises_brightness(tmp_path, lora_brightness_gain):
    """The objective improves its reward on the tiny pipeline: paired ODE samples (same noise) with the
    LoRA on vs off are brighter, by many standard errors (measured: +0.0016, per-sample std 0.0004)."""
    trainer = Trainer(load_config(None, AWM_FAST + [f"train.output_dir={tmp_path}", "rewards=[{name: brightness}]", "train.lr=3e-2",
                                                    "train.grad_accum=8", "objective.kwargs={num_timesteps: 4, weighting: t}"])).setup()
    gain = lora_brightness_gain(trainer, iterations=10)  # [16]
    assert float(gain.mean()) > 0.0005
    assert float(gain.mean()) > 4 * float(gain.std()) / math.sqrt(gain.numel())


# ----------------------------------------------------------------------------- offline (flowalign offline)


def test_offline_group_advantages_hand_worked():
    from flowalign.objectives.awm import offline_group_advantages

    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
    adv = offline_group_advantages(rewards, eps=1e-4)
    # group 0: mean 0.5, population std 0.5;  group 1: all equal -> 0;  group 2: mean 0.75, std sqrt(27/16) = 1.299
    assert adv[0].tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001, -0.5 / 0.5001, 0.5 / 0.5001])
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    std = math.sqrt(27 / 16)
    assert adv[2].tolist() == pytest.approx([-0.75 / (std + 1e-4)] * 3 + [2.25 / (std + 1e-4)])
    with pytest.raises(ValueError, match=r"\[P, k\] with k >= 2"):
        offline_group_advantages(torch.ones(3, 1))


def test_offline_loss_hand_worked_against_the_reference_as_old_policy():
    """One group of two 2-dim samples; policy v = a*x, reference v = x: every number by hand (uniform weighting, no clip)."""
    from flowalign.objectives.base import OfflineBatch

    x0 = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)  # [P=1, k=2, 2]
    noise = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]], dtype=torch.float64)
    sigma = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    rewards = torch.tensor([[1.0, 0.0]])
    a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    obj = get_objective("awm", weighting="uniform", clip_range=10.0, adv_clip=5.0, advantage_max=5.0, adv_eps=1e-12)
    batch = OfflineBatch(x0=x0, rewards=rewards)
    loss, metrics = obj.offline_loss(batch, lambda x, s: a * x, lambda x, s: x, sigma=sigma, noise=noise)
    # x_s = 0.5 x0 + 0.5 eps: row 0 (0.5, 0.5), row 1 (0.5, 1.0); targets eps - x0: (-1, 1), (1, -2)
    # policy 2 x_s: (1, 1), (1, 2) -> errors mean((2^2, 0^2)) = 2, mean((0^2, 4^2)) = 8
    # reference x_s: (0.5, 0.5), (0.5, 1) -> errors mean(1.5^2, 0.5^2) = 1.25, mean(0.5^2, 3^2) = 4.625
    # advantages: rewards (1, 0), mean 0.5, std 0.5 -> (+1, -1) (clip 5, rescale 5/5)
    # ratios exp(-2 + 1.25) = exp(-0.75), exp(-8 + 4.625) = exp(-3.375); loss mean(-exp(-0.75), +exp(-3.375))
    expected = 0.5 * (-math.exp(-0.75) + math.exp(-3.375))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert metrics["awm/ratio_mean"] == pytest.approx(0.5 * (math.exp(-0.75) + math.exp(-3.375)), rel=1e-6)
    # velocity gap to the reference: (a - 1) x_s -> mean((0.25, 0.25)) and mean((0.25, 1)) -> 0.25, 0.625 -> 0.4375
    assert metrics["kl/ref"] == pytest.approx(0.4375)
    # d loss / d a by hand: d ratio_i / d a = ratio_i * (-d e_i / d a);  e_i = mean_d (a x_s - t)^2
    # row 0: d e/da = mean(2 (a x_s - t) x_s) = mean(2*2*0.5, 2*0*0.5) = 1;  row 1: mean(2*0*0.5, 2*4*1) = 4
    # loss = 0.5 (-r0 + r1) -> d/da = 0.5 (r0 * 1 - r1 * 4)
    loss.backward()
    assert float(a.grad) == pytest.approx(0.5 * (math.exp(-0.75) * 1 - math.exp(-3.375) * 4), rel=1e-6)
    # kl_beta adds beta * the same gap, from the same reference forward
    with_kl, _ = get_objective("awm", weighting="uniform", clip_range=10.0, adv_clip=5.0, advantage_max=5.0, adv_eps=1e-12,
                               kl_beta=0.1).offline_loss(batch, lambda x, s: 2.0 * x, lambda x, s: x, sigma=sigma, noise=noise)
    assert float(with_kl) == pytest.approx(expected + 0.1 * 0.4375, rel=1e-6)


def test_offline_loss_leaves_tied_groups_out_of_the_mean():
    """A tied group (A = 0 on every row) neither pulls, pushes nor dilutes: the loss and gradient with it
    equal those of the decisive group alone (the online trainer drops zero-advantage rows the same way)."""
    from flowalign.objectives.base import OfflineBatch

    torch.manual_seed(4)
    x0, noise = torch.randn(2, 2, 3), torch.randn(2, 2, 3)
    sigma = torch.full((2, 2), 0.5)
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    W = torch.randn(3, 3, requires_grad=True)
    obj = get_objective("awm", weighting="uniform", clip_range=10.0)

    def loss_and_grad(rows):
        W.grad = None
        loss, metrics = obj.offline_loss(OfflineBatch(x0[rows], rewards[rows]), lambda x, s: x @ W, lambda x, s: 0.5 * x,
                                         sigma=sigma[rows], noise=noise[rows])
        loss.backward()
        return float(loss.detach()), W.grad.clone(), metrics

    both, g_both, metrics = loss_and_grad([0, 1])
    alone, g_alone, _ = loss_and_grad([0])
    assert both == pytest.approx(alone, rel=1e-6) and torch.allclose(g_both, g_alone, atol=1e-7)
    assert metrics["awm/informative_rows"] == 2.0
    tied, g_tied, metrics = loss_and_grad([1])  # nothing to learn: a zero loss that still backpropagates
    assert tied == 0.0 and not g_tied.any() and metrics["awm/informative_rows"] == 0.0


def test_offline_loss_draws_from_its_generator_and_checks_its_input():
    from flowalign.objectives.base import OfflineBatch

    x0 = torch.randn(3, 4, 2, 2)
    batch = OfflineBatch(x0=x0, rewards=torch.rand(3, 4))
    seen = []

    def policy(x, s):
        seen.append(s.clone())
        return x * 1.5

    obj = get_objective("awm", sigma_range=(0.6, 0.9), generator=torch.Generator().manual_seed(3))
    loss_a, metrics = obj.loss(batch, policy, lambda x, s: x)  # loss() dispatches an OfflineBatch
    assert seen[0].shape == (12,) and bool(((seen[0] >= 0.6) & (seen[0] <= 0.9)).all())
    assert 0.6 <= metrics["awm/sigma_mean"] <= 0.9
    again = get_objective("awm", sigma_range=(0.6, 0.9), generator=torch.Generator().manual_seed(3)).loss(batch, policy, lambda x, s: x)[0]
    assert float(again) == float(loss_a)  # the same seed draws the same sigmas and noises
    with pytest.raises(ValueError, match="needs the reference"):
        obj.loss(batch, policy, None)
    with pytest.raises(ValueError, match=r"rewards \[P, k\]"):
        obj.loss(OfflineBatch(x0=x0, rewards=torch.rand(3, 3)), policy, lambda x, s: x)
    for bad in [(0.5, 0.5), (-0.1, 1.0), (0.2, 1.1)]:
        with pytest.raises(ValueError, match="sigma_range"):
            get_objective("awm", sigma_range=bad)


def test_a_tied_fp64_group_has_exactly_zero_offline_advantage():
    """Three fp64 rewards of 0.1: r - mean is -1.4e-17, not 0, and the tied rows counted as informative."""
    from flowalign.objectives.awm import offline_group_advantages

    adv = offline_group_advantages(torch.tensor([[0.1, 0.1, 0.1], [0.0, 0.5, 1.0]], dtype=torch.float64))
    assert torch.equal(adv[0], torch.zeros(3, dtype=torch.float64))
    assert adv[1, 0] < 0 < adv[1, 2]


def test_more_forward_draws_than_the_sigma_grid_holds_is_refused_at_setup():
    """toy_awm draws 3 sigmas from ceil(0.3 x num_steps) of the rollout's: with 6 steps only 2, which failed at the first
    update (ValueError after a rollout)."""
    from flowalign.config import load_config
    from flowalign.errors import ConfigError
    from flowalign.train.forward_process import grid_size
    from flowalign.train.trainer_setup import build_objective

    assert [grid_size(k, 0.3) for k in (6, 7, 10)] == [2, 3, 3]  # ceil(1.8), ceil(2.1), ceil(3.0)
    with pytest.raises(ConfigError, match=r"num_timesteps=3 distinct sigmas per sample from the first 2 of the rollout's 6"):
        build_objective(load_config("toy_awm", ["sampling.num_steps=6"]))
    assert build_objective(load_config("toy_awm", ["sampling.num_steps=7"])).forward_process
    # uniform sampling draws from the grid's range, any number of times
    assert build_objective(load_config("toy_awm", ["sampling.num_steps=6", "objective.kwargs.sigma_sampling=uniform"])).forward_process


def test_a_subclass_of_awm_gets_awms_checks(tmp_path, monkeypatch):
    """The offline trainer checked `objective == "awm"`: a user's subclass of AWM trained on a store drawn by another
    model (AWM's old policy) with a warning calling it sampler-independent, and took online-only kwargs."""
    import sys
    import uuid

    from flowalign.errors import ConfigError
    from flowalign.objectives import OBJECTIVES
    from flowalign.objectives.awm import is_awm
    from flowalign.train.offline_trainer import _check_objective_kwargs

    name = f"fa_awm_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("from flowalign.objectives.awm import AdvantageWeightedMatching\n\n\n"
                                         "class MyAWM(AdvantageWeightedMatching):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert is_awm("awm") and is_awm(f"{name}:MyAWM") and not is_awm("gdro") and not is_awm("no.such:Thing")
        with pytest.raises(ConfigError, match="online AWM's sigma draws"):
            _check_objective_kwargs(f"{name}:MyAWM", {"num_timesteps": 2})
    finally:
        sys.modules.pop(name, None)
        OBJECTIVES.pop(f"{name}:MyAWM", None)
