"""Euphonium's process-reward guided drift: flowalign.sde.reward_drift, the drift in sde.step,
flowalign.guidance (SPSA / autograd gradients, RewardDrift) and its use in rollouts and training."""
from __future__ import annotations

import csv
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from flowalign import guidance, sampling, sde
from flowalign.config import load_config
from flowalign.errors import ConfigError
from flowalign.pipelines import load_adapter
from flowalign.pipelines.testing import tiny_sd3_pipeline
from flowalign.rewards import load_reward
from flowalign.rewards.base import Reward, RewardOutput

PROMPTS = ["a red square", "two blue circles"]


# ------------------------------------------------------------------------------------------
# sde.reward_drift and the drift in sde.step (pure math)
# ------------------------------------------------------------------------------------------


def test_tilted_drift_is_the_mean_of_the_exponentially_tilted_kernel():
    """N(mu, std²) tilted by exp(lam·g·x) is N(mu + lam·std²·g, std²): check the shift by quadrature."""
    mu, std, g, lam = 0.3, 0.4, 1.7, 0.8
    xs = torch.linspace(mu - 12 * std, mu + 12 * std, 200001, dtype=torch.float64)
    density = torch.exp(-((xs - mu) ** 2) / (2 * std**2) + lam * g * xs)
    tilted_mean = float((xs * density).sum() / density.sum())
    drift = sde.reward_drift(torch.tensor([[g]]), torch.tensor([[std]]), scale=lam, mode="tilted")
    assert float(drift) == pytest.approx(tilted_mean - mu, rel=1e-5)
    assert float(drift) == pytest.approx(lam * std**2 * g, rel=1e-6)  # the closed form the docstring states


def test_normalized_drift_moves_scale_noise_stds_along_the_gradient():
    grad = torch.tensor([[3.0, -4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    std = torch.tensor([[0.5], [0.5], [2.0]])
    drift = sde.reward_drift(grad, std, scale=0.6)
    # row 0: rms(g) = sqrt((9 + 16) / 4) = 2.5, so drift = 0.6 · 0.5 · g / 2.5 = 0.12 · g
    torch.testing.assert_close(drift[0], 0.12 * grad[0])
    assert (drift[1] == 0).all()  # no gradient, no move
    torch.testing.assert_close(drift[2], torch.full((4,), 1.2))  # 0.6 · 2.0 · 1
    rms = drift.pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(rms[[0, 2]], 0.6 * std[[0, 2], 0])
    torch.testing.assert_close(sde.reward_drift(100 * grad, std, scale=0.6), drift)  # the reward's units drop out


@pytest.mark.parametrize("mode", ["normalized", "tilted"])
def test_reward_drift_takes_a_b_std_per_sample_even_when_the_last_dim_is_b(mode):
    torch.manual_seed(0)
    grad = torch.randn(3, 2, 3)  # last dim 3 == B
    std = torch.tensor([0.5, 1.0, 2.0])
    assert torch.equal(sde.reward_drift(grad, std, 0.6, mode), sde.reward_drift(grad, std.reshape(3, 1, 1), 0.6, mode))


def test_reward_drift_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        sde.reward_drift(torch.ones(1, 2), 1.0, scale=1.0, mode="bogus")
    with pytest.raises(ValueError, match="scale"):
        sde.reward_drift(torch.ones(1, 2), 1.0, scale=-1.0)


@pytest.mark.parametrize("kind", ["flow_sde", "dance_sde", "cps"])
def test_step_adds_the_drift_to_the_sample_and_not_to_the_mean(kind):
    g = torch.Generator().manual_seed(0)
    x, v, noise, drift = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(4))
    plain = sde.step(kind, x, v, 0.7, 0.5, 0.6, noise=noise)
    guided = sde.step(kind, x, v, 0.7, 0.5, 0.6, noise=noise, drift=drift)
    torch.testing.assert_close(guided.mean, plain.mean)
    torch.testing.assert_close(guided.std, plain.std)
    torch.testing.assert_close(guided.prev_sample, plain.mean + plain.std * noise + drift)
    # the log-density the trainer uses is the unguided kernel's, evaluated at the guided sample
    by_hand = (-((guided.prev_sample - plain.mean) ** 2) / (2 * plain.std**2) - torch.log(plain.std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(sde.log_prob(guided.prev_sample, guided.mean, guided.std), by_hand)


def test_deterministic_steps_ignore_the_drift():
    x, v, drift = torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4)
    ode = sde.step("ode", x, v, 0.6, 0.4, drift=drift)
    torch.testing.assert_close(ode.prev_sample, x - 0.2 * v)
    zero_level = sde.step("flow_sde", x, v, 0.6, 0.4, torch.tensor([0.0, 0.5]), noise=torch.zeros(2, 4), drift=drift)
    torch.testing.assert_close(zero_level.prev_sample[0], zero_level.mean[0])  # level 0: no density, no drift
    torch.testing.assert_close(zero_level.prev_sample[1], zero_level.mean[1] + 1.0)
    with pytest.raises(ValueError, match="drift must have the shape"):
        sde.step("flow_sde", x, v, 0.6, 0.4, 0.5, drift=torch.ones(2, 3))


# ------------------------------------------------------------------------------------------
# gradient estimators
# ------------------------------------------------------------------------------------------


def _quadratic(center: torch.Tensor, weights: torch.Tensor):
    """Per-row f(x) = -sum w·(x - c)² (an even-order remainder SPSA's antithetic pair cancels), grad -2w(x - c)."""
    def f(x: torch.Tensor) -> torch.Tensor:
        return -(weights * (x - center.repeat(x.shape[0] // center.shape[0], 1)) ** 2).sum(dim=1)

    return f, (lambda x: -2 * weights * (x - center))


def test_spsa_single_pair_is_the_directional_difference_along_its_draw():
    g = torch.Generator().manual_seed(3)
    center, weights, x = torch.randn(2, 5, generator=g), torch.rand(5, generator=g), torch.randn(2, 5, generator=g)
    f, true_grad = _quadratic(center, weights)
    grad, mean_score = guidance.spsa_gradient(f, x, sigma=0.3, pairs=1, generator=torch.Generator().manual_seed(11))
    u = torch.randn(2, 5, generator=torch.Generator().manual_seed(11))  # the same draw
    expected = (u * true_grad(x)).sum(dim=1, keepdim=True) * u  # (u·grad f) u, exact for a quadratic
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mean_score, (f(x + 0.3 * u) + f(x - 0.3 * u)) / 2)


def test_spsa_averages_to_the_true_gradient():
    g = torch.Generator().manual_seed(4)
    center, weights, x = torch.randn(1, 6, generator=g), torch.rand(6, generator=g) + 0.5, torch.randn(1, 6, generator=g)
    f, true_grad = _quadratic(center, weights)
    grad, _ = guidance.spsa_gradient(f, x, sigma=0.5, pairs=20000, generator=torch.Generator().manual_seed(5))
    exact = true_grad(x)
    assert float((grad - exact).norm() / exact.norm()) < 0.05


def test_spsa_rejects_bad_arguments_and_counts_nan_as_no_difference():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sigma"):
        guidance.spsa_gradient(lambda z: z.sum(1), x, sigma=0.0)
    with pytest.raises(ValueError, match="pairs"):
        guidance.spsa_gradient(lambda z: z.sum(1), x, sigma=0.1, pairs=0)
    with pytest.raises(ValueError, match="scores for 4 rows"):
        guidance.spsa_gradient(lambda z: z.sum(), x, sigma=0.1)
    grad, _ = guidance.spsa_gradient(lambda z: torch.full((z.shape[0],), float("nan")), x, sigma=0.1)
    assert (grad == 0).all()
    # an infinite score on one side (a -inf log-likelihood) is no difference either, not an infinite gradient
    grad, mean = guidance.spsa_gradient(lambda z: torch.tensor([float("-inf"), 1.0, 2.0, 0.5]), x, sigma=0.1,
                                        generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(grad).all() and (grad[0] == 0).all() and (grad[1] != 0).all()
    assert mean.tolist() == pytest.approx([2.0, 0.75])  # the finite perturbed scores of each row


def test_autograd_gradient_matches_the_analytic_one():
    g = torch.Generator().manual_seed(6)
    center, weights, x = torch.randn(3, 4, generator=g), torch.rand(4, generator=g), torch.randn(3, 4, generator=g)
    f, true_grad = _quadratic(center, weights)
    grad, scores = guidance.autograd_gradient(f, x)
    torch.testing.assert_close(grad, true_grad(x))
    torch.testing.assert_close(scores, f(x))
    with pytest.raises(ValueError, match="no gradient"):
        guidance.autograd_gradient(lambda z: z.detach().sum(1), x)


# ------------------------------------------------------------------------------------------
# RewardDrift
# ------------------------------------------------------------------------------------------


class _IdentityAdapter:
    """decode = the latents themselves, as images: a reward's gradient w.r.t. latents is its own."""

    def decode(self, latents, requires_grad=False):
        with torch.set_grad_enabled(requires_grad):
            return latents * 1.0


class _RedMass(Reward):
    """Mean of channel 0, differentiable."""

    differentiable = True

    def __call__(self, images, prompts, metadata=None):
        return RewardOutput(scores=images[:, 0].mean(dim=(1, 2)), details={})


class _Verifier(Reward):
    """Black-box: 1 when channel 0's mean is above 0."""

    def __call__(self, images, prompts, metadata=None):
        return RewardOutput(scores=(images[:, 0].mean(dim=(1, 2)) > 0).float(), details={})


def test_reward_drift_with_autograd_points_up_the_reward():
    drift = guidance.RewardDrift(_IdentityAdapter(), _RedMass(), scale=0.5)
    assert drift.gradient == "autograd"  # auto picks autograd for a differentiable reward
    x0 = torch.randn(2, 3, 4, 4)
    std = torch.full((2, 1, 1, 1), 0.2)
    out = drift(x0, std, prompts=PROMPTS, metadata=[{}, {}])
    expected = torch.zeros_like(x0)
    expected[:, 0] = 0.5 * 0.2 * math.sqrt(3)  # grad = 1/16 on channel 0; rms = (1/16)/sqrt(3)
    torch.testing.assert_close(out, expected)
    assert drift.pop_stats() == {"drift/moved_frac": 1.0, "drift/score": pytest.approx(float(x0[:, 0].mean()))}
    assert drift.pop_stats() == {}


def test_reward_drift_with_spsa_for_a_black_box_reward():
    drift = guidance.RewardDrift(_IdentityAdapter(), _Verifier(), scale=1.0, spsa_sigma=2.0, spsa_pairs=512)
    assert drift.gradient == "spsa"
    x0 = torch.zeros(2, 3, 4, 4)
    x0[1] -= 0.01  # just below the verifier's threshold
    out = drift(x0, torch.full((2, 1, 1, 1), 1.0), prompts=PROMPTS, metadata=[{}, {}], generator=torch.Generator().manual_seed(0))
    assert float(out[:, 0].mean()) > 0.3  # SPSA finds the direction that raises channel 0
    assert float(out[:, 0].mean()) > 3 * float(out[:, 1:].abs().mean())
    with pytest.raises(ValueError, match="not differentiable"):
        guidance.RewardDrift(_IdentityAdapter(), _Verifier(), scale=1.0, gradient="autograd")
    with pytest.raises(ValueError, match="gradient="):
        guidance.RewardDrift(_IdentityAdapter(), _Verifier(), scale=1.0, gradient="finite")


# ------------------------------------------------------------------------------------------
# rollouts and training on the tiny SD3 pipeline
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter():
    pipe = tiny_sd3_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return load_adapter(pipe, max_sequence_length=32)


def _rollout(adapter, drift, seed=1):
    return sampling.rollout(adapter, PROMPTS, group_size=4, num_steps=4, kernel="flow_sde", schedule=sde.window(0.8, start=0, size=2),
                            generator=torch.Generator().manual_seed(seed), drift=drift)


def test_guided_rollout_raises_the_reward_and_records_unguided_log_probs(adapter):
    brightness = load_reward("brightness")
    plain = _rollout(adapter, None)
    zero = _rollout(adapter, guidance.RewardDrift(adapter, brightness, scale=0.0))
    torch.testing.assert_close(zero.latents, plain.latents)  # autograd draws nothing; scale 0 moves nothing
    drift = guidance.RewardDrift(adapter, brightness, scale=2.0)
    guided = _rollout(adapter, drift)
    assert drift.pop_stats()["drift/moved_frac"] == 1.0
    gain = brightness(guided.images, guided.prompts).scores - brightness(plain.images, plain.prompts).scores
    assert float(gain.mean()) > 0.01 and float((gain > 0).float().mean()) >= 0.75
    # log-probs of the guided samples are under the *unguided* kernel mean, recomputed from the model
    cond = adapter.encode(PROMPTS, do_classifier_free_guidance=False).repeat_interleave(4)
    for k in range(2):
        x, s, s_next = guided.latents[:, k], float(guided.sigmas[k]), float(guided.sigmas[k + 1])
        with torch.no_grad():
            v = adapter.velocity(x, s, cond, 1.0)
        out = sde.step("flow_sde", x, v, s, s_next, 0.8, noise=torch.zeros_like(x))
        torch.testing.assert_close(guided.log_probs[:, k], sde.log_prob(guided.latents[:, k + 1], out.mean, out.std), rtol=1e-4, atol=1e-4)
        # and the sample is off that mean by more than the noise alone explains: the drift moved it
        assert float(((guided.latents[:, k + 1] - out.mean) / out.std).pow(2).mean()) > 1.5


def test_decode_keeps_the_graph_only_when_asked(adapter):
    latents = torch.randn(1, *adapter.latent_shape, requires_grad=True)
    assert not adapter.decode(latents).requires_grad
    adapter.decode(latents, requires_grad=True).mean().backward()
    assert latents.grad is not None and float(latents.grad.abs().sum()) > 0
    adapter.pipeline.vae.zero_grad(set_to_none=True)
    grad, _ = guidance.autograd_gradient(lambda z: adapter.decode(z, requires_grad=True).mean(dim=(1, 2, 3)), latents.detach())
    assert float(grad.abs().sum()) > 0
    assert all(p.grad is None for p in adapter.pipeline.vae.parameters())  # guidance never touches the model's grads


def _fast(tmp_path, *overrides):
    return load_config(None, [
        "sampling.num_steps=4", "sampling.guidance_scale=1.0", "sampling.group_size=4", "train.prompts_per_iter=2",
        "train.micro_batch_size=8", "train.iterations=2", "lora.rank=4", "lora.alpha=8", "objective.kl_beta=0.0",
        "train.progress=false", "train.log_with=[]", "train.eval_every=-1", "train.checkpoint_every=0",
        f"train.output_dir={tmp_path}", *overrides])


def test_config_validates_the_drift_settings(tmp_path):
    for bad, match in [("sampling.drift_mode=sideways", "drift_mode"), ("sampling.drift_gradient=finite", "drift_gradient"),
                       ("sampling.drift_scale=-1", "drift_scale"), ("sampling.drift_spsa_sigma=0", "drift_spsa_sigma"),
                       ("sampling.drift_spsa_pairs=0", "drift_spsa_pairs")]:
        with pytest.raises(ConfigError, match=match):
            _fast(tmp_path, bad)
    with pytest.raises(ConfigError, match="stochastic steps only"):
        _fast(tmp_path, "sampling.drift_reward=brightness", "sampling.kernel=ode")


def test_trainer_rejects_a_bad_drift_reward_before_building_the_model(tmp_path, monkeypatch):
    from flowalign.train import trainer_setup
    from flowalign.train.trainer import Trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the drift reward was checked")

    monkeypatch.setattr(trainer_setup, "build_model", no_model)

    cfg = _fast(tmp_path, "sampling.drift_reward=jpeg_compressibility", "sampling.drift_gradient=autograd")
    with pytest.raises(ConfigError, match="drift_reward='jpeg_compressibility' is not differentiable"):
        Trainer(cfg).setup()
    with pytest.raises(ConfigError, match="sampling.drift_reward='nosuch': unknown reward"):
        Trainer(_fast(tmp_path, "sampling.drift_reward=nosuch")).setup()
    assert not (tmp_path / "config.yaml").exists()  # nothing written before the checks


def test_trainer_logs_the_guided_drift(tmp_path):
    from flowalign.train.trainer import train

    train(_fast(tmp_path, "sampling.drift_reward=brightness", "sampling.drift_scale=1.0"))
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) == 2
    assert all(float(r["drift/moved_frac"]) == 1.0 for r in rows)
    assert all(0.0 <= float(r["drift/score"]) <= 1.0 for r in rows)


def test_resume_with_spsa_guidance_is_bit_identical(tmp_path, resumed_lora_matches):
    """SPSA draws its directions from the rollout generator, which checkpoints restore: resuming gives the same LoRA."""
    def config(out, iterations):
        return _fast(out, f"train.iterations={iterations}", "train.checkpoint_every=1", "sampling.drift_reward=brightness",
                     "sampling.drift_gradient=spsa", "sampling.drift_spsa_sigma=0.5", "train.lr=3e-2")

    resumed_lora_matches(config, 1, 2, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "split" / "metrics.csv")))
    assert [r["iteration"] for r in rows] == ["1", "2"] and all(float(r["drift/moved_frac"]) > 0 for r in rows)


def test_config_choices_name_the_library_choices():
    """config.py stays torch-free, so it restates the kernels, drift modes and gradient methods: they must agree."""
    from flowalign import config

    assert config.KERNELS == sde.KERNELS
    assert config.DRIFT_MODES == sde.DRIFT_MODES
    assert config.DRIFT_GRADIENTS == guidance.GRADIENT_METHODS


def test_a_row_without_a_finite_score_or_gradient_is_not_moved_in_either_mode():
    """A reward that cannot score a row (NaN, or -inf for a log-reward at its boundary) gave that row a NaN / inf
    gradient, which the tilted drift wrote into the sample. Such rows now get no gradient and no drift."""
    from flowalign import guidance, sde

    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    # autograd: row 1's score is sqrt(-1) = NaN, and its backward holds 0 * NaN
    grad, scores = guidance.autograd_gradient(lambda z: torch.stack([(z[0] ** 2).sum(), torch.sqrt(z[1, 0]) + z[1, 1]]), x)
    assert torch.isnan(scores[1]) and grad[1].tolist() == [0.0, 0.0] and grad[0].tolist() == [2.0, 4.0]
    # SPSA: a log reward that is -inf for any negative first coordinate (row 1 at x = -1, for every direction)
    grad, score = guidance.spsa_gradient(lambda z: torch.log(z[:, 0].clamp_min(0.0)) + z[:, 1], x, sigma=0.01, pairs=8,
                                         generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(grad).all() and grad[1].tolist() == [0.0, 0.0] and torch.isfinite(score).all()
    assert grad[0, 0] == pytest.approx(1.0, rel=0.3)  # d/dx log(x) at 1, from 8 pairs
    # the drift itself: a NaN / inf row is left where it is, whatever the mode
    bad = torch.tensor([[0.5, 1.0], [float("nan"), 0.0], [float("inf"), 1.0]])
    for mode in ("tilted", "normalized"):
        drift = sde.reward_drift(bad, torch.full((3, 1), 0.5), scale=1.0, mode=mode)
        assert torch.isfinite(drift).all() and drift[1:].abs().sum() == 0 and drift[0].abs().sum() > 0
