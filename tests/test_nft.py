"""DiffusionNFT (flowalign.objectives.nft): hand-worked loss, its minimiser, its gradient, the trainer path."""
from __future__ import annotations

import math

import pytest
import torch

from flowalign.config import load_config
from flowalign.errors import ConfigError
from flowalign.objectives import get_objective
from flowalign.objectives.nft import ForwardBatch, draw_forward_sigmas, nft_loss, optimality_probability
from flowalign.train import forward_process as fp
from flowalign.train.trainer import Trainer


def test_optimality_probability_hand_values():
    r = optimality_probability(torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 7.0]), adv_clip=5.0)
    assert r.tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(ValueError, match="adv_clip"):
        optimality_probability(torch.zeros(2), 0.0)


def test_nft_loss_hand_worked_one_dimension():
    # s = 0.5, x0 = 1, eps = 0 -> x_s = 0.5; v_theta = 0.5, v_old = 0.2, beta = 1, r = 0.75
    # v+ = 0.5 -> x0_hat = 0.25, err 0.5625;  v- = 2*0.2 - 0.5 = -0.1 -> x0_hat = 0.55, err 0.2025
    # loss = 0.75*0.5625 + 0.25*0.2025 = 0.4725
    one = lambda v: torch.tensor([[v]])  # noqa: E731  [B=1, D=1]
    loss = nft_loss(one(0.5), one(0.2), one(0.5), one(1.0), torch.tensor([0.5]), torch.tensor([0.75]), beta=1.0, adaptive=False)
    assert loss.item() == pytest.approx(0.4725, abs=1e-7)
    # beta = 0.5, scale 5: v+ = 0.35 -> x0_hat 0.325, err 0.455625; v- = 1.5*0.2 - 0.25 = 0.05 -> 0.475, err 0.275625
    loss = nft_loss(one(0.5), one(0.2), one(0.5), one(1.0), torch.tensor([0.5]), torch.tensor([0.75]), beta=0.5, scale=5.0, adaptive=False)
    assert loss.item() == pytest.approx(5.0 * (0.75 * 0.455625 + 0.25 * 0.275625) / 0.5, abs=1e-6)
    # adaptive weighting divides each error by its mean |x0_hat - x0|: 0.5625/0.75 and 0.2025/0.45
    loss = nft_loss(one(0.5), one(0.2), one(0.5), one(1.0), torch.tensor([0.5]), torch.tensor([0.75]), beta=1.0, adaptive=True)
    assert loss.item() == pytest.approx(0.75 * 0.75 + 0.25 * 0.45, abs=1e-6)


def test_nft_adaptive_weight_is_the_mean_absolute_error_without_gradient_in_two_dimensions():
    """In one dimension mean |d| and the RMS agree and a weight with or without gradient differ only in scale; two
    dimensions tell them apart. r = 1, beta = 1, sigma = 1, x_s = 0: x0_hat = -v_theta = [1, 3], x0 = 0:
    error mean(1, 9) = 5, weight mean(1, 3) = 2, loss 2.5 (RMS: 2.236); d loss / d v_theta = -x0_hat / 2 = [-0.5, -1.5]
    with the weight held fixed (with its gradient: [0.125, -0.875])."""
    v_theta = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    zero = torch.zeros(1, 2)
    loss = nft_loss(v_theta, zero, zero, zero, torch.tensor([1.0]), torch.tensor([1.0]), beta=1.0, adaptive=True)
    assert loss.item() == pytest.approx(2.5, abs=1e-6)
    loss.sum().backward()
    assert v_theta.grad.tolist() == [pytest.approx([-0.5, -1.5], abs=1e-6)]


@pytest.mark.parametrize("r,beta", [(1.0, 1.0), (0.75, 1.0), (0.5, 0.5), (0.2, 0.5), (0.0, 2.0)])
def test_nft_minimiser_is_a_bounded_move_towards_or_away_from_the_target(r, beta):
    """Brute force: gradient descent on a free v_theta reaches v_old + (2r - 1)(v - v_old)/beta."""
    g = torch.Generator().manual_seed(0)
    x0, eps, v_old = (torch.randn(3, 5, generator=g) for _ in range(3))
    sigma = torch.tensor([0.3, 0.6, 0.9])
    x_s = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
    rr = torch.full((3,), r)
    v = torch.zeros_like(v_old, requires_grad=True)
    opt = torch.optim.SGD([v], lr=2.0)
    for _ in range(3000):
        opt.zero_grad()
        nft_loss(v, v_old, x_s, x0, sigma, rr, beta, adaptive=False).sum().backward()
        opt.step()
    expected = v_old + (2 * r - 1) * ((eps - x0) - v_old) / beta
    assert torch.allclose(v.detach(), expected, atol=1e-4)


def test_nft_gradient_at_the_old_policy_is_advantage_weighted_flow_matching():
    g = torch.Generator().manual_seed(1)
    x0, eps, v_old = (torch.randn(4, 6, generator=g) for _ in range(3))
    sigma = torch.tensor([0.2, 0.4, 0.7, 1.0])
    r = torch.tensor([0.0, 0.3, 0.5, 0.9])
    x_s = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, x_s, x0, sigma, r, beta=0.7, adaptive=False).sum().backward()
    # independent: d/dv of mean_D (x_s - s v - x0)^2 = -2 s (x_s - s v - x0) / D, times (2r - 1)
    fm_grad = -2 * sigma[:, None] * (x_s - sigma[:, None] * v_old - x0) / x0.shape[1]
    assert torch.allclose(v.grad, (2 * r - 1)[:, None] * fm_grad, atol=1e-6)
    assert v.grad[2].abs().max() < 1e-7  # r = 1/2: nothing to learn (round-off only)


def test_nft_loss_checks_shapes_and_beta():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="must match"):
        nft_loss(z, torch.zeros(2, 4), z, z, torch.ones(2), torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="beta"):
        nft_loss(z, z, z, z, torch.ones(2), torch.ones(2), 0.0)


def test_objective_defaults_v_old_to_the_detached_policy_and_adds_the_reference_penalty():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    ref = torch.nn.Linear(4, 4)

    def policy(x, sigma):
        return layer(x) * sigma[:, None]

    def reference(x, sigma):
        return ref(x) * sigma[:, None]

    x0, noise = torch.randn(3, 4), torch.randn(3, 4)
    batch = ForwardBatch(x0=x0, noise=noise, sigma=torch.tensor([0.2, 0.5, 0.9]), advantages=torch.tensor([1.0, -2.0, 0.5]))
    obj = get_objective("nft", beta=1.0, kl_beta=0.1, adv_clip=2.0)
    loss, metrics = obj.loss(batch, policy, reference)
    # by hand: the same rows with v_old = the policy's own output
    x_s = (1 - batch.sigma[:, None]) * x0 + batch.sigma[:, None] * noise
    with torch.no_grad():
        v = policy(x_s, batch.sigma)
        r = 0.5 + 0.5 * batch.advantages.clamp(-2, 2) / 2
        expected = nft_loss(v, v, x_s, x0, batch.sigma, r, 1.0, scale=2.0).mean()
        kl = (v - reference(x_s, batch.sigma)).pow(2).mean(dim=1).mean()
    assert loss.item() == pytest.approx(float(expected + 0.1 * kl), rel=1e-6)
    assert metrics["kl/ref"] == pytest.approx(float(kl), rel=1e-6)
    assert metrics["nft/old_deviate"] == 0.0
    with pytest.raises(ValueError, match="reference"):
        obj.loss(batch, policy, None)


def test_draw_forward_sigmas_grid_and_uniform():
    grid = torch.tensor([1.0, 0.8, 0.5, 0.2])
    s = draw_forward_sigmas(grid, batch=50, num=3, generator=torch.Generator().manual_seed(0))
    assert s.shape == (50, 3)
    for row in s:
        assert len(set(row.tolist())) == 3 and set(row.tolist()) <= set(grid.tolist())
    # every grid entry is used about equally often (each with probability 3/4 per row)
    counts = torch.stack([(s == v).sum() for v in grid]).float()
    assert counts.min() > 25
    u = draw_forward_sigmas(grid, batch=200, num=2, generator=torch.Generator().manual_seed(0), mode="uniform")
    assert u.min() >= 0.2 and u.max() <= 1.0 and u.std() > 0.15
    with pytest.raises(ValueError, match="num_timesteps"):
        draw_forward_sigmas(grid, 2, 5)
    with pytest.raises(ValueError, match="grid"):
        draw_forward_sigmas(torch.tensor([1.0, 0.0]), 2, 1)
    with pytest.raises(ValueError, match="sigma_sampling"):
        draw_forward_sigmas(grid, 2, 1, mode="logit")


# ----------------------------------------------------------------------------- the trainer path

NFT_FAST = [
    "objective.name=nft", "objective.kwargs={beta: 1.0, num_timesteps: 2}", "sampling.kernel=ode",
    "sampling.num_steps=4", "sampling.guidance_scale=1.0", "sampling.group_size=4",
    "train.prompts_per_iter=4", "train.micro_batch_size=8", "lora.rank=4", "lora.alpha=8",
    "train.progress=false", "train.log_with=[]", "train.eval_every=-1", "train.checkpoint_every=0",
]


def _nft_trainer(tmp_path, *overrides) -> Trainer:
    return Trainer(load_config(None, NFT_FAST + [f"train.output_dir={tmp_path}"] + list(overrides))).setup()


def test_ode_sampling_is_only_accepted_for_forward_process_objectives(tmp_path):
    load_config(None, NFT_FAST + [f"train.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="forward-process objective"):
        load_config(None, ["sampling.kernel=ode", f"train.output_dir={tmp_path}"])


def test_one_optimizer_step_per_iteration_needs_no_old_forward(tmp_path):
    trainer = _nft_trainer(tmp_path, "train.grad_accum=4", "train.lr=1e-2")
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.run_iteration()
    assert metrics["optim/steps"] == 1.0
    assert trainer._draws.v_old is None  # 2 chunks x 2 draws = 4 micro-batches, one step: the policy is the old one
    assert trainer._draws.sigma.shape == (16, 2) and set(trainer._draws.sigma.flatten().tolist()) <= set(trainer.adapter.sigmas(4)[:-1].tolist())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))
    assert math.isfinite(metrics["loss/total"]) and "nft/r_mean" in metrics


def test_several_optimizer_steps_use_the_sampling_policy_as_old(tmp_path):
    trainer = _nft_trainer(tmp_path, "train.grad_accum=1", "train.lr=1e-2")
    batch = trainer.collect()
    lora_before = [p.detach().clone() for p in trainer.params]
    trainer.update(batch)  # 4 optimizer steps
    draws = trainer._draws
    assert draws.v_old is not None
    # independent: restore the sampling LoRA and evaluate its velocity at a few rows
    after = [p.detach().clone() for p in trainer.params]
    with torch.no_grad():
        for p, b in zip(trainer.params, lora_before):
            p.copy_(b)
        kept = torch.nonzero(batch.keep).flatten()[:3]
        policy, _ = trainer.velocity_fns(batch.cond_rows(kept))
        for j in range(2):
            fb = fp.make_forward_batch(batch.traj, batch.advantages, draws, kept, j, trainer.device)
            x_s = (1 - fb.sigma.view(-1, 1, 1, 1)) * fb.x0 + fb.sigma.view(-1, 1, 1, 1) * fb.noise
            assert torch.allclose(policy(x_s, fb.sigma), fb.v_old, atol=1e-5)
        for p, a in zip(trainer.params, after):
            p.copy_(a)
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, after))


@pytest.mark.parametrize("extra", [[], ["train.old_policy_rate=0.05", "train.old_policy_max=0.3"]], ids=["on_policy", "old_policy"])
def test_nft_training_raises_brightness(tmp_path, lora_brightness_gain, extra):
    """The objective improves its reward on the tiny pipeline: paired ODE samples (same noise) with the
    LoRA on vs off are brighter, by many standard errors (measured: +0.0011, per-sample std 0.0003), also when
    the samples come from a lagging old policy (+0.0007, std 0.0001: the lag slows it, as it should)."""
    trainer = _nft_trainer(tmp_path, "rewards=[{name: brightness}]", "train.lr=3e-2", "train.grad_accum=8",
                           "objective.kwargs={beta: 1.0, num_timesteps: 4}", *extra)
    gain = lora_brightness_gain(trainer, iterations=10)  # [16]
    assert float(gain.mean()) > 0.0005
    assert float(gain.mean()) > 4 * float(gain.std()) / math.sqrt(gain.numel())


def test_sigma_grid_keeps_the_high_noise_end():
    class Traj:  # the one field sigma_grid reads
        sigmas = torch.tensor([1.0, 0.92, 0.84, 0.75, 0.65, 0.55, 0.43, 0.30, 0.16, 0.002, 0.0])

    assert fp.sigma_grid(Traj, 1.0).tolist() == pytest.approx(Traj.sigmas[:-1].tolist())  # sigma_K = 0 is never drawn
    assert fp.sigma_grid(Traj, 0.3).tolist() == pytest.approx([1.0, 0.92, 0.84])  # ceil(0.3 * 10) = 3
    assert fp.sigma_grid(Traj, 0.25).tolist() == pytest.approx([1.0, 0.92, 0.84])  # ceil(2.5) = 3
    assert fp.sigma_grid(Traj, 0.01).tolist() == pytest.approx([1.0])  # at least one
    assert len(fp.sigma_grid(Traj, 0.7)) == 7  # not 8 from 0.7 * 10 = 7.000000000000001


@pytest.mark.parametrize("extra", [[], ["train.old_policy_rate=0.3", "train.old_policy_max=0.6"]], ids=["on_policy", "old_policy"])
def test_nft_resume_is_bit_identical(tmp_path, extra, resumed_lora_matches):
    """4 iterations straight = 2, checkpoint, resume, 2 more (the forward-process draws come from the saved generator;
    a lagging old policy, its weights and the step count that sets its decay, from the checkpoint)."""
    def config(out, iterations):
        return load_config(None, NFT_FAST + [f"train.output_dir={out}", f"train.iterations={iterations}", "train.checkpoint_every=2",
                                             "train.prompts_per_iter=2", "train.grad_accum=1", "train.lr=1e-2",
                                             "train.final_eval_samples=0"] + extra)

    resumed_lora_matches(config, 2, 4, tmp_path)


def test_reference_gap_diagnostic_is_zero_before_the_first_step_and_grows_after(tmp_path):
    # kl_beta = 0: the trainer measures mean ||v_theta - v_ref||^2 itself (train.ref_kl_every) on the first micro-batch
    trainer = _nft_trainer(tmp_path, "train.grad_accum=4", "train.lr=1e-2", "train.ref_kl_every=1")
    first = trainer.run_iteration()
    assert first["kl/ref"] == 0.0  # LoRA B starts at 0: the policy is the reference
    trainer.iteration += 1
    second = trainer.run_iteration()
    assert second["kl/ref"] > 0.0


def test_reference_gap_hand_worked():
    # rows x_s = (1 - s) x0 + s eps; policy v = 2 x_s, reference v = x_s  =>  gap = mean over rows of mean(x_s^2)
    x0 = torch.tensor([[1.0, 3.0], [2.0, -2.0]])
    eps = torch.tensor([[1.0, -1.0], [0.0, 4.0]])
    sigma = torch.tensor([0.5, 0.25])
    fb = ForwardBatch(x0=x0, noise=eps, sigma=sigma, advantages=torch.zeros(2))
    # row 0: x_s = (1, 1) -> 1; row 1: x_s = (1.5, -0.5) -> (2.25 + 0.25) / 2 = 1.25; mean 1.125
    gap = fp.reference_gap(fb, lambda x, s: 2 * x, lambda x, s: x)
    assert gap == pytest.approx(1.125)


def test_old_policy_is_refused_for_step_objectives(tmp_path):
    with pytest.raises(ConfigError, match="old_policy_rate=0.1 samples from a lagging copy"):
        load_config(None, [f"train.output_dir={tmp_path}", "train.old_policy_rate=0.1"])  # grpo
    with pytest.raises(ConfigError, match=r"train.old_policy_max must be in \[0, 1\)"):
        load_config(None, NFT_FAST + [f"train.output_dir={tmp_path}", "train.old_policy_rate=0.1", "train.old_policy_max=1.0"])


def test_lora_dropout_is_refused_for_step_objectives(tmp_path):
    with pytest.raises(ConfigError, match="lora.dropout=0.1 makes the trained policy's log-probs random"):
        load_config(None, [f"train.output_dir={tmp_path}", "lora.dropout=0.1"])  # grpo
    assert load_config(None, NFT_FAST + [f"train.output_dir={tmp_path}", "lora.dropout=0.1"]).lora.dropout == 0.1


def test_old_policy_samples_the_rollouts_and_gives_v_old(tmp_path, monkeypatch):
    """train.old_policy_rate: after each update old <- d·old + (1 - d)·θ (d by hand: min(0.5·steps, 0.8)); the next
    rollout runs with the old weights in the LoRA, and v_old is their velocity, not the trained policy's."""
    from flowalign import sampling
    from flowalign.train.trainer import velocity_fns

    trainer = _nft_trainer(tmp_path, "train.grad_accum=4", "train.lr=1e-2", "train.old_policy_rate=0.5", "train.old_policy_max=0.8")
    theta0 = [p.detach().clone() for p in trainer.params]
    first = trainer.run_iteration()
    assert first["old_policy/decay"] == 0.5 and trainer.optim.steps_taken == 1
    theta1 = [p.detach().clone() for p in trainer.params]
    assert any(not torch.equal(a, b) for a, b in zip(theta0, theta1))
    for old, a, b in zip(trainer.optim.old_policy.shadow, theta0, theta1):
        assert torch.allclose(old, 0.5 * a + 0.5 * b, atol=1e-7)

    seen = []
    real_rollout = sampling.rollout

    def spy(*args, **kwargs):
        seen.append([p.detach().clone() for p in trainer.params])
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(sampling, "rollout", spy)
    trainer.iteration += 1
    batch = trainer.collect()
    assert seen and all(torch.equal(p, old) for p, old in zip(seen[0], trainer.optim.old_policy.shadow))
    assert all(torch.equal(p, t) for p, t in zip(trainer.params, theta1))  # the trained weights came back
    plan = trainer._plan(batch)
    trainer._prepare_forward_draws(batch, plan, optimizer_steps=1)
    index, j = plan[0]
    rows = trainer._make_batch(batch, index, j)
    cond = batch.cond_rows(index)
    with torch.no_grad():
        for p, old in zip(trainer.params, trainer.optim.old_policy.shadow):
            p.copy_(old)
        by_hand = velocity_fns(trainer.adapter, cond, 1.0, False)[0](fp.noised(rows), rows.sigma)
        for p, t in zip(trainer.params, theta1):
            p.copy_(t)
        trained = velocity_fns(trainer.adapter, cond, 1.0, False)[0](fp.noised(rows), rows.sigma)
    assert torch.allclose(rows.v_old, by_hand, atol=1e-6) and not torch.allclose(rows.v_old, trained, atol=1e-6)
    second = trainer.update(batch)
    assert second["old_policy/decay"] == pytest.approx(0.8)  # min(0.5 * 2, 0.8)
