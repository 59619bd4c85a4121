"""Tests for flowalign.sde: kernels against diffusers / torch.distributions / Monte Carlo, schedules."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowalign import sde

STOCHASTIC = ("flow_sde", "dance_sde", "cps")


def _shifted_sigmas(num_steps=10, shift=3.0):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    return sched.sigmas.clone()  # [K+1], 1 ... 0


def test_ode_matches_diffusers_scheduler_full_loop():
    torch.manual_seed(0)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    W = torch.randn(4, 4) * 0.3
    velocity = lambda x, t: torch.einsum("ij,bjhw->bihw", W, x) + t  # noqa: E731
    x_ref = torch.randn(2, 4, 6, 6)
    x_ours = x_ref.clone()
    for i, t in enumerate(sched.timesteps):
        x_ref = sched.step(velocity(x_ref, sched.sigmas[i]), t, x_ref).prev_sample
        out = sde.step("ode", x_ours, velocity(x_ours, sched.sigmas[i]), float(sched.sigmas[i]), float(sched.sigmas[i + 1]))
        x_ours = out.prev_sample
        assert out.std.shape == (2, 1, 1, 1) and torch.all(out.std == 0)
        assert torch.allclose(x_ours, x_ref, atol=1e-6, rtol=0), f"step {i}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ode_matches_diffusers_scheduler_bit_for_bit_in_half_precision(dtype):
    # diffusers adds dt·v taken in the model's dtype to the fp32 sample: a half-precision run must match it exactly
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(3, 4, 8, 8, generator=g).to(dtype)
    x_ours, x_rows = x_ref.clone(), x_ref.clone()
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(3, 4, 8, 8, generator=g).to(dtype)
        x_ref = sched.step(v, t, x_ref).prev_sample
        x_ours = sde.step("ode", x_ours, v, float(sched.sigmas[i]), float(sched.sigmas[i + 1])).prev_sample
        x_rows = sde.step("ode", x_rows, v, sched.sigmas[i].expand(3), sched.sigmas[i + 1].expand(3)).prev_sample  # [B] sigmas
        assert x_ours.dtype == dtype and torch.equal(x_ours, x_ref), f"step {i}"
        assert torch.equal(x_rows, x_ref), f"step {i} ([B] sigmas)"


@pytest.mark.parametrize("kind", STOCHASTIC)
def test_noise_level_zero_equals_ode(kind):
    torch.manual_seed(1)
    sigmas = _shifted_sigmas(6)
    x, v = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    for i in range(6):
        ode = sde.step("ode", x, v, sigmas[i], sigmas[i + 1])
        out = sde.step(kind, x, v, sigmas[i], sigmas[i + 1], 0.0, noise=torch.randn_like(x))
        assert torch.allclose(out.mean, ode.mean, atol=1e-6), (kind, i)
        assert torch.allclose(out.prev_sample, ode.prev_sample, atol=1e-6), (kind, i)
        assert torch.all(out.std == 0)


@pytest.mark.parametrize("kind", STOCHASTIC)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_zero_noise_rows_are_the_ode_step_bit_for_bit_in_half_precision(kind, dtype):
    """Level-0 rows (window schedules' ODE steps, zero table entries) and CPS's last step take the Euler step as the
    ODE kernel and diffusers do (dt·v in v's dtype), so a half-precision rollout through them equals the ODE one;
    a noisy row in the same batch keeps its kernel."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 8, generator=g).to(dtype)
    level = torch.tensor([0.0, 0.0, 0.7])
    for i in range(6):
        v = torch.randn(3, 4, 8, 8, generator=g).to(dtype)
        s, s_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        ref = sched.step(v, sched.timesteps[i], x).prev_sample
        sched._step_index = None  # each call steps from timestep i again
        out = sde.step(kind, x, v, s, s_next, level, noise=torch.randn(3, 4, 8, 8, generator=g))
        assert torch.equal(out.prev_sample[:2], ref[:2]), (kind, i)
        assert torch.equal(out.prev_sample[:2], sde.step("ode", x, v, s, s_next).prev_sample[:2])
        noisy = sde.step(kind, x[2:], v[2:], s, s_next, 0.7, noise=out.prev_sample.new_zeros(1, 4, 8, 8).float())
        assert torch.equal(out.mean[2:], noisy.mean), (kind, i)
        x = out.prev_sample


def test_kernel_formulas_hand_computed():
    # one element, s = 0.5, s' = 0.25, dt = -0.25, x = 1, v = 2
    x, v = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    # flow_sde, a = 0.5: std_t = 0.5·sqrt(0.5/0.5) = 0.5; mean = 1·(1 + 0.25·(-0.25)/1) + 2·(1 + 0.25·0.5/1)·(-0.25)
    out = sde.step("flow_sde", x, v, 0.5, 0.25, 0.5, noise=torch.zeros(1, 1))
    assert out.mean.item() == pytest.approx(0.9375 - 0.5625)
    assert out.std.item() == pytest.approx(0.5 * 0.5)
    # dance, eta = 0.5: x0 = 0; score = -(1 - 0)/0.25 = -4; mean = 1 - 0.5 - 0.5·0.25·(-4)·(-0.25) = 0.375
    out = sde.step("dance_sde", x, v, 0.5, 0.25, 0.5, noise=torch.zeros(1, 1))
    assert out.mean.item() == pytest.approx(0.375)
    assert out.std.item() == pytest.approx(0.5 * math.sqrt(0.25))
    # cps, a = 0.5: std = 0.25·sin(pi/4); x0 = 0, x1 = 1 + 0.5·2 = 2; mean = 0.75·0 + sqrt(0.0625 - std²)·2
    out = sde.step("cps", x, v, 0.5, 0.25, 0.5, noise=torch.zeros(1, 1))
    std = 0.25 * math.sin(math.pi / 4)
    assert out.std.item() == pytest.approx(std)
    assert out.mean.item() == pytest.approx(math.sqrt(0.0625 - std**2) * 2)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_log_prob_matches_torch_distributions(reduce):
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(4, 3, 2, 5, 5, generator=g)  # 5-D video latent
    std = torch.rand(4, 1, 1, 1, 1, generator=g) + 0.1
    x = mean + std * torch.randn(mean.shape, generator=g)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x)
    ref = ref.mean(dim=(1, 2, 3, 4)) if reduce == "mean" else ref.sum(dim=(1, 2, 3, 4))
    ours = sde.log_prob(x, mean, std, reduce=reduce)
    assert ours.shape == (4,)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_log_prob_deterministic_rows_are_zero_with_finite_grad():
    mean = torch.randn(2, 3, requires_grad=True)
    std = torch.tensor([[0.0], [0.5]])
    x = torch.randn(2, 3)
    lp = sde.log_prob(x, mean, std)
    assert lp[0].item() == 0.0
    ref = torch.distributions.Normal(mean[1].detach(), 0.5).log_prob(x[1]).mean()
    assert lp[1].item() == pytest.approx(ref.item(), abs=1e-6)
    lp.sum().backward()
    assert torch.isfinite(mean.grad).all() and (mean.grad[0] == 0).all()
    with pytest.raises(ValueError, match="reduce"):
        sde.log_prob(x, mean, std, reduce="max")


@pytest.mark.parametrize("kind,level", [("flow_sde", 0.7), ("dance_sde", 0.3), ("cps", 0.7)])
def test_monte_carlo_moments_match_mean_and_std(kind, level):
    n = 20_000
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, generator=g).expand(n, 4).contiguous()
    v = torch.randn(1, 4, generator=g).expand(n, 4).contiguous()
    out = sde.step(kind, x, v, 0.6, 0.45, level, generator=g)
    assert out.std.shape == (n, 1)
    std = float(out.std[0])
    emp_mean, emp_std = out.prev_sample.mean(0), out.prev_sample.std(0)
    assert torch.allclose(emp_mean, out.mean[0], atol=4 * std / math.sqrt(n))
    assert torch.allclose(emp_std, torch.full((4,), std), rtol=0.03)


def test_cps_preserves_the_marginal():
    # x_s = (1-s)·x0 + s·eps with the exact velocity v = eps - x0: after a CPS step the sample must be
    # distributed as (1-s')·x0 + s'·eps' (per-dim mean (1-s')·x0, variance s'^2).
    n, s, s_next, a = 50_000, 0.6, 0.4, 0.7
    g = torch.Generator().manual_seed(4)
    x0 = torch.tensor([1.5, -0.5, 0.25, 2.0])
    eps = torch.randn(n, 4, generator=g)
    x = (1 - s) * x0 + s * eps
    out = sde.step("cps", x, eps - x0, s, s_next, a, generator=g)
    mean, var = out.prev_sample.mean(0), out.prev_sample.var(0)
    assert torch.allclose(mean, (1 - s_next) * x0, atol=4 * s_next / math.sqrt(n))
    assert torch.allclose(var, torch.full((4,), s_next**2), rtol=0.02)
    # the Flow-SDE Euler-Maruyama step is not coefficient-preserving: its variance drifts
    fsde = sde.step("flow_sde", x, eps - x0, s, s_next, a, generator=g).prev_sample.var(0)
    assert not torch.allclose(fsde, torch.full((4,), s_next**2), rtol=0.02)


@pytest.mark.parametrize("kind", STOCHASTIC)
def test_first_and_last_steps_finite_or_excluded(kind):
    sigmas = _shifted_sigmas(10)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    g = torch.Generator().manual_seed(5)
    x, v = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    for i in (0, len(sigmas) - 2):
        out = sde.step(kind, x, v, sigmas[i], sigmas[i + 1], 0.7, generator=g)
        lp = sde.log_prob(out.prev_sample, out.mean, out.std)
        assert torch.isfinite(out.mean).all() and torch.isfinite(out.prev_sample).all()
        assert torch.isfinite(lp).all()
        stochastic = bool(sde.is_stochastic(kind, sigmas[i], sigmas[i + 1], 0.7))
        assert stochastic == bool((out.std > 0).all())
        if kind == "cps" and i > 0:  # last CPS step is deterministic: excluded from training
            assert not stochastic and torch.all(lp == 0)
        else:
            assert stochastic


def test_flow_sde_first_step_uses_next_sigma_in_denominator():
    sigmas = _shifted_sigmas(10)
    s1 = float(sigmas[1])
    out = sde.step("flow_sde", torch.zeros(1, 2), torch.zeros(1, 2), 1.0, s1, 0.7, noise=torch.zeros(1, 2))
    std_t = 0.7 * math.sqrt(1.0 / (1 - s1))
    assert out.std.item() == pytest.approx(std_t * math.sqrt(1 - s1), rel=1e-6)


@pytest.mark.parametrize("kind", sde.KERNELS)
def test_per_sample_sigmas_equal_row_by_row_calls(kind):
    g = torch.Generator().manual_seed(6)
    x, v = torch.randn(3, 2, 2, 4, 4, generator=g), torch.randn(3, 2, 2, 4, 4, generator=g)  # videos
    noise = torch.randn(x.shape, generator=g)
    sigma = torch.tensor([1.0, 0.7, 0.3])
    sigma_next = torch.tensor([0.9, 0.5, 0.0])
    level = torch.tensor([0.5, 0.7, 0.9])
    out = sde.step(kind, x, v, sigma, sigma_next, level, noise=noise)
    for b in range(3):
        row = sde.step(kind, x[b : b + 1], v[b : b + 1], float(sigma[b]), float(sigma_next[b]), float(level[b]), noise=noise[b : b + 1])
        assert torch.allclose(out.prev_sample[b], row.prev_sample[0], atol=1e-6)
        assert torch.allclose(out.mean[b], row.mean[0], atol=1e-6)
        assert torch.allclose(out.std.flatten()[b], row.std.flatten()[0], atol=1e-7)


def test_generator_reproducible_and_ode_consumes_no_randomness():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a = sde.step("flow_sde", x, v, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(7)).prev_sample
    b = sde.step("flow_sde", x, v, 0.8, 0.6, 0.7, generator=torch.Generator().manual_seed(7)).prev_sample
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    sde.step("ode", x, v, 0.8, 0.6, generator=g)
    assert torch.equal(sde.step("flow_sde", x, v, 0.8, 0.6, 0.7, generator=g).prev_sample, a)


def test_bad_inputs_raise_naming_the_value():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kind='euler'"):
        sde.step("euler", x, x, 0.5, 0.4)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde.step("ode", x, x, 0.4, 0.5)
    with pytest.raises(ValueError, match=r"\[B\]=2"):
        sde.step("ode", x, x, torch.tensor([0.5, 0.4, 0.3]), 0.1)
    with pytest.raises(ValueError, match="noise_level"):
        sde.step("flow_sde", x, x, 0.5, 0.4, -0.1)
    nan = float("nan")  # NaN passes every comparison: it must still be refused, not turned into NaN latents
    for args, name in [((nan, 0.4, 0.7), "sigma"), ((0.5, nan, 0.7), "sigma_next"), ((0.5, 0.4, nan), "noise_level")]:
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            sde.step("flow_sde", x, x, *args)


def test_log_prob_and_drift_reduce_per_row_for_flat_latents():
    # [B] latents: one element per row, so each row's log-prob is its own element's density, not the batch mean
    mean, std = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.5, 1.0, 2.0])
    x = torch.tensor([0.3, 0.0, 1.0])
    ref = torch.distributions.Normal(mean, std).log_prob(x)
    assert torch.allclose(sde.log_prob(x, mean, std), ref) and torch.allclose(sde.log_prob(x, mean, std, reduce="sum"), ref)
    # normalized drift: each row moves scale·std along its own gradient's sign (rms of one element = |g|)
    drift = sde.reward_drift(torch.tensor([0.1, -3.0, 0.0]), std, scale=0.5)
    assert drift.tolist() == pytest.approx([0.25, -0.5, 0.0])


# ------------------------------------------------------------------ schedules


def test_constant_and_table_schedules():
    assert torch.equal(sde.constant(0.7).levels(4), torch.full((4,), 0.7))
    t = sde.table([0.1, 0.0, 0.3])
    assert torch.allclose(t.levels(3), torch.tensor([0.1, 0.0, 0.3]))
    with pytest.raises(ValueError, match="3 entries"):
        t.levels(4)


def test_window_fixed_and_sliding_masks():
    w = sde.window(0.5, start=2, size=3)
    assert (w.levels(8) > 0).tolist() == [False, False, True, True, True, False, False, False]
    sl = sde.window(0.5, start=0, size=2, mode="sliding", stride=1, shift_every=2)
    # K=5, size=2 -> valid starts 0..3; start = (iteration // 2) mod 4
    starts = [int((sl.levels(5, iteration=it) > 0).nonzero()[0]) for it in range(10)]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]
    assert int((sl.levels(5, iteration=3) > 0).sum()) == 2


def test_window_random_start_uses_generator():
    w = sde.window(0.7, size=3, mode="random")
    draws = [w.window_start(10, generator=torch.Generator().manual_seed(s)) for s in range(50)]
    again = [w.window_start(10, generator=torch.Generator().manual_seed(s)) for s in range(50)]
    assert draws == again
    assert min(draws) >= 0 and max(draws) <= 7 and len(set(draws)) > 3
    many = {w.window_start(5, generator=torch.Generator().manual_seed(s)) for s in range(200)}
    assert many == {0, 1, 2}  # every start of a 3-step window in 5 steps, the last one included
    lv = w.levels(10, generator=torch.Generator().manual_seed(0))
    first = int((lv > 0).nonzero()[0])
    assert lv[first : first + 3].tolist() == pytest.approx([0.7] * 3) and int((lv > 0).sum()) == 3


def test_make_schedule_and_errors():
    s = sde.make_schedule("window", a=0.7, start=1, size=2)
    assert (s.levels(4) > 0).tolist() == [False, True, True, False]
    assert isinstance(sde.make_schedule("constant", a=0.3), sde.ConstantSchedule)
    with pytest.raises(ValueError, match="unknown noise schedule 'linear'"):
        sde.make_schedule("linear", a=1)
    with pytest.raises(ValueError, match="window size 5 exceeds"):
        sde.window(0.5, size=5).levels(4)
    with pytest.raises(ValueError, match="mode='slide'"):
        sde.window(0.5, mode="slide")


def test_is_stochastic_masks_over_a_schedule():
    sigmas = _shifted_sigmas(6)
    levels = sde.window(0.7, start=3, size=3).levels(6)  # last three steps
    mask = sde.is_stochastic("cps", sigmas[:-1], sigmas[1:], levels)
    assert mask.tolist() == [False, False, False, True, True, False]  # last CPS step deterministic
    mask = sde.is_stochastic("flow_sde", sigmas[:-1], sigmas[1:], levels)
    assert mask.tolist() == [False, False, False, True, True, True]
    assert not sde.is_stochastic("ode", sigmas[:-1], sigmas[1:], levels).any()


def test_is_stochastic_refuses_non_finite_inputs_naming_them():
    with pytest.raises(ValueError, match="noise_level must be finite, got \\[nan\\]"):
        sde.is_stochastic("flow_sde", 0.5, 0.4, float("nan"))


def test_a_step_unpacks_as_x_next_mean_std():
    """DESIGN §4's kernels return (x_next, mean, std): SDEStep unpacks so, and keeps its attribute names."""
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    out = sde.step("flow_sde", x, v, 0.8, 0.6, 0.7, noise=torch.zeros(2, 3))
    x_next, mean, std = out
    assert x_next is out.prev_sample and mean is out.mean and std is out.std


def test_log_prob_of_a_tiny_std_is_the_density_not_nan():
    """std = 1e-24: std² underflows fp32 to 0 and (x - mu)² / (2 std²) was 0/0."""
    got = sde.log_prob(torch.zeros(1, 1), torch.zeros(1, 1), 1e-24)
    assert torch.allclose(got, torch.tensor([-math.log(1e-24) - 0.5 * math.log(2 * math.pi)]))
    x, v = torch.zeros(2, 4), torch.ones(2, 4)
    out = sde.step("flow_sde", x, v, 0.5, 0.4, 1e-24, noise=torch.randn(2, 4, generator=torch.Generator().manual_seed(0)))
    reference = torch.distributions.Normal(out.mean.double(), out.std.double()).log_prob(out.prev_sample.double()).mean(dim=1)
    assert torch.isfinite(sde.log_prob(out.prev_sample, out.mean, out.std)).all()
    assert torch.allclose(sde.log_prob(out.prev_sample, out.mean, out.std).double(), reference, rtol=1e-5)


def test_log_prob_takes_a_per_sample_std_per_sample_and_refuses_a_negative_or_nan_one():
    """A ``[B]`` std (``SDEStep.std.flatten()``) was broadcast over the last latent dim: wrong values when that dim
    equals B, a RuntimeError otherwise; a negative or NaN std gave log-prob 0, as if the step were deterministic."""
    x, mu = torch.randn(2, 2), torch.zeros(2, 2)  # last dim == B: the silent case
    std = torch.tensor([0.5, 2.0])
    expected = torch.distributions.Normal(mu, std[:, None]).log_prob(x).mean(dim=1)
    assert torch.allclose(sde.log_prob(x, mu, std), expected, atol=1e-6)
    assert torch.allclose(sde.log_prob(x, mu, std[:, None]), expected, atol=1e-6)
    lat = torch.randn(3, 4, 2, 2)
    per_sample = torch.tensor([0.3, 0.0, 1.1])
    assert torch.allclose(sde.log_prob(lat, lat * 0, per_sample), sde.log_prob(lat, lat * 0, per_sample.view(3, 1, 1, 1)))
    for bad in (torch.tensor([0.5, -0.1]), torch.tensor([0.5, float("nan")]), -1.0):
        with pytest.raises(ValueError, match="std must be >= 0 and not NaN"):
            sde.log_prob(x, mu, bad)


def test_a_noise_schedule_of_the_users_is_named_by_dotted_path(tmp_path, monkeypatch):
    """sampling.noise_schedule took the three built-ins only: a progressive or shrinking window (MixGRPO's end of
    schedule, a decaying level) needed an edit of flowalign."""
    import sys
    import uuid

    from flowalign.config import load_config
    from flowalign.errors import ConfigError
    from flowalign.sde import make_schedule

    name = f"fa_sched_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import torch\n\n\n"
        "class Shrinking:\n"
        "    # noise a on the first `size - iteration` steps (at least one)\n"
        "    def __init__(self, a, size):\n        self.a, self.size = a, size\n\n"
        "    def levels(self, num_steps, iteration=0, generator=None):\n"
        "        out = torch.zeros(num_steps)\n        out[:max(1, self.size - iteration)] = self.a\n        return out\n\n\n"
        "def bad(a):\n    return torch.ones(3) * a\n\n\n"
        "class Negative(Shrinking):\n    def levels(self, num_steps, iteration=0, generator=None):\n"
        "        return -super().levels(num_steps, iteration, generator)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        schedule = make_schedule(f"{name}:Shrinking", a=0.7, size=3)
        assert schedule.levels(4, 0).tolist() == pytest.approx([0.7, 0.7, 0.7, 0.0])
        assert schedule.levels(4, 5).tolist() == pytest.approx([0.7, 0.0, 0.0, 0.0])
        cfg = load_config(None, [f"sampling.noise_schedule={name}:Shrinking", "sampling.noise_kwargs={a: 0.7, size: 2}"])
        assert cfg.sampling.noise_schedule == f"{name}:Shrinking"
        with pytest.raises(ConfigError, match="without a levels"):
            make_schedule(f"{name}:bad", a=0.5)
        with pytest.raises(ConfigError, match="bad arguments"):
            make_schedule(f"{name}:Shrinking", a=0.5)
        with pytest.raises(ConfigError, match="must be 10 finite numbers >= 0"):
            load_config(None, [f"sampling.noise_schedule={name}:Negative", "sampling.noise_kwargs={a: 0.7, size: 2}",
                               "sampling.num_steps=10"])
        with pytest.raises(ConfigError, match="unknown noise schedule 'nope'"):
            make_schedule("nope", a=0.5)
    finally:
        sys.modules.pop(name, None)


def test_cps_does_not_keep_the_marginal_under_a_models_conditional_mean_velocity():
    """cps_kernel's docstring said x' keeps the marginal when v is exact. With the Bayes-optimal (conditional mean)
    velocity of 1-D Gaussian data, Flow-SDE ends on the data's std and CPS well below it, as the docstring now says."""
    mu, s0 = 2.0, 0.5  # data x0 ~ N(2, 0.5²); x_t = (1 - t) x0 + t eps

    def v_exact(x, t):  # E[eps - x0 | x_t = x], in closed form for Gaussian data
        var = (1 - t) ** 2 * s0**2 + t**2
        d = x - (1 - t) * mu
        return (t / var) * d - (mu + ((1 - t) * s0**2 / var) * d)

    sigmas = torch.linspace(1, 0, 101)
    final = {}
    for kind in ("flow_sde", "cps"):
        x, g = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1)
        for k in range(100):
            s, s_next = float(sigmas[k]), float(sigmas[k + 1])
            x = sde.step(kind, x, v_exact(x, s), s, s_next, 0.7, generator=g).prev_sample
        final[kind] = float(x.std())
    assert abs(final["flow_sde"] - s0) < 0.02 and final["cps"] < 0.45, final


def test_a_per_sample_std_given_as_b_by_1_is_per_sample():
    """traj.stds[:, k:k+1] is [B, 1]; it was lined up against the latent's last two dims (1.46 off for B = 16, a size
    error for B = 3) instead of being taken per sample like a [B] std."""
    from flowalign.sde import log_prob

    for batch in (16, 3):
        x_next, mean = torch.randn(batch, 4, 16, 16), torch.randn(batch, 4, 16, 16)
        std = torch.rand(batch) + 0.5
        assert torch.allclose(log_prob(x_next, mean, std[:, None]), log_prob(x_next, mean, std))
