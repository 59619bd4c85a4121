"""Transition kernels of the user's own, named by a dotted path or an entry point (flowalign.sde.kernel_plugin):
a new SDE for exploration needs no edit of flowalign.sde, and rollouts, log-probs, the update and the recipe checks
all follow it."""
from __future__ import annotations

import math

import pytest
import torch
from tiny_run import train_argv

from flowalign import sde
from flowalign.config import load_config
from flowalign.errors import ConfigError
from flowalign.train import cli

KERNEL_SOURCE = """
    import torch


    def flow_sde_copy(x, v, s, s_next, a):
        # Flow-GRPO's step written out again: a plugin equal to the built-in must train the same LoRA
        dt = s_next - s
        denom = torch.where(s >= 1, s_next, s)
        std_t = a * torch.sqrt(s / (1 - denom))
        mean = x * (1 + std_t**2 * dt / (2 * s)) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        return mean, std_t * torch.sqrt(-dt)


    def naive(x, v, s, s_next, level):
        # Euler step plus noise level * sqrt(|dt|), no drift correction; levels up to 2
        dt = s_next - s
        return x + dt * v, level * torch.sqrt(-dt)


    naive.max_level = 2.0


    def wrong_shape(x, v, s, s_next, level):
        return x[:, :1], level


    def negative_std(x, v, s, s_next, level):
        return x + (s_next - s) * v, -torch.ones(()) * level


    def one_value(x, v, s, s_next, level):
        return x


    class Bounded:
        max_level = "one"

        def __call__(self, x, v, s, s_next, level):
            return x, level


    bounded = Bounded()
    not_a_function = 3
"""


@pytest.fixture
def kernels(write_plugin):
    return write_plugin(KERNEL_SOURCE, "fa_kernel")


def test_a_kernel_of_your_own_steps_draws_and_masks_as_its_formula_says(kernels):
    kind = f"{kernels}:naive"
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    levels = torch.tensor([0.5, 0.0, 1.5])
    out = sde.step(kind, x, v, 0.8, 0.6, levels, noise=noise)
    # by hand: dt = -0.2, std = level * sqrt(0.2)
    std = levels * math.sqrt(0.2)
    assert torch.allclose(out.mean, x - 0.2 * v)
    assert torch.allclose(out.std.flatten(), std)
    assert torch.allclose(out.prev_sample, x - 0.2 * v + std.view(3, 1, 1, 1) * noise)
    assert torch.equal(out.prev_sample[1], out.mean[1])  # level 0: the row is deterministic
    lp = sde.log_prob(out.prev_sample, out.mean, out.std)
    z = noise[0].flatten()
    expected = (-0.5 * z**2 - math.log(std[0].item()) - 0.5 * math.log(2 * math.pi)).mean()
    assert lp[1] == 0 and torch.allclose(lp[0], expected, atol=1e-5)
    sigmas = torch.tensor([1.0, 0.7, 0.3, 0.0])
    mask = sde.is_stochastic(kind, sigmas[:-1], sigmas[1:], torch.tensor([0.7, 0.0, 0.7]))
    assert mask.tolist() == [True, False, True]  # the last step (s' = 0) keeps its noise, unlike CPS's
    assert sde.is_stochastic(kind, 0.5, 0.25, 0.3).ndim == 0
    assert sde.max_level(kind) == 2.0 and sde.max_level("cps") == 1.0 and sde.max_level("flow_sde") is None
    with pytest.raises(ValueError, match=rf"kernel '{kind}' takes noise levels in \[0, 2\]"):
        sde.step(kind, x, v, 0.8, 0.6, 2.5)


def test_a_copy_of_flow_sde_as_a_plugin_steps_as_the_built_in(kernels):
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    sigmas = torch.tensor([1.0, 0.75, 0.4, 0.0])
    for k in range(3):
        built_in = sde.step("flow_sde", x, v, sigmas[k], sigmas[k + 1], 0.7, generator=torch.Generator().manual_seed(k))
        plugin = sde.step(f"{kernels}:flow_sde_copy", x, v, sigmas[k], sigmas[k + 1], 0.7, generator=torch.Generator().manual_seed(k))
        for a, b in zip(built_in, plugin):
            assert torch.equal(a, b)
    assert torch.equal(sde.is_stochastic("flow_sde", sigmas[:-1], sigmas[1:], 0.7),
                       sde.is_stochastic(f"{kernels}:flow_sde_copy", sigmas[:-1], sigmas[1:], 0.7))


@pytest.mark.parametrize("fn, message", [
    ("wrong_shape", r"returned a mean of shape \(3, 1, 4\); it must have x's shape \(3, 2, 4\)"),
    ("negative_std", "must be finite and >= 0"),
    ("one_value", r"must return \(mean, std\)"),
])
def test_a_kernel_that_breaks_the_protocol_is_named(kernels, fn, message):
    x = torch.zeros(3, 2, 4)
    with pytest.raises(ValueError, match=message):
        sde.step(f"{kernels}:{fn}", x, x, 0.5, 0.25, 0.3)


def test_bad_kernel_names_are_config_errors_at_load(kernels):
    with pytest.raises(ConfigError, match=r"sampling.kernel='nope' is not one of \['ode', 'flow_sde', 'dance_sde', 'cps'\].*flowalign.kernels"):
        load_config(None, ["sampling.kernel=nope"])
    with pytest.raises(ConfigError, match="is a int, not a function"):
        load_config(None, [f"sampling.kernel={kernels}:not_a_function"])
    with pytest.raises(ConfigError, match="has no attribute 'missing'"):
        load_config(None, [f"sampling.kernel={kernels}:missing"])
    with pytest.raises(ConfigError, match="max_level must be a finite number > 0 or absent, got 'one'"):
        load_config(None, [f"sampling.kernel={kernels}:bounded"])
    kind = f"{kernels}:naive"
    assert load_config(None, [f"sampling.kernel={kind}", "sampling.noise_kwargs={a: 2.0}"]).sampling.kernel == kind
    with pytest.raises(ConfigError, match=rf"kernel '{kind}' takes noise levels in \[0, 2\], got up to 2.5"):
        load_config(None, [f"sampling.kernel={kind}", "sampling.noise_kwargs={a: 2.5}"])
    with pytest.raises(ConfigError, match="leaves no stochastic step"):
        load_config(None, [f"sampling.kernel={kind}", "sampling.noise_kwargs={a: 0.0}"])


def test_generate_takes_a_kernel_of_your_own_and_its_level_bound(kernels):
    from flowalign.train.generate import load_generate_config

    kind = f"{kernels}:naive"
    assert load_generate_config(None, [f"kernel={kind}", "noise_level=1.5"]).kernel == kind
    with pytest.raises(ConfigError, match=rf"kernel '{kind}' takes noise_level in \[0, 2\], got 3.0"):
        load_generate_config(None, [f"kernel={kind}", "noise_level=3.0"])
    with pytest.raises(ConfigError, match="kernel='nope' is not one of"):
        load_generate_config(None, ["kernel=nope"])


def test_an_entry_point_kernel_is_selectable_by_its_name(tmp_path, kernels):
    dist_info = tmp_path / f"{kernels}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {kernels}\nVersion: 0.1\n")
    ep_name = f"{kernels}_naive"
    (dist_info / "entry_points.txt").write_text(f"[flowalign.kernels]\n{ep_name} = {kernels}:naive\n{ep_name}_broken = {kernels}:missing\n")
    with pytest.raises(ConfigError, match=rf"sampling.kernel: loading transition kernel entry point '{ep_name}_broken'"):
        load_config(None, [f"sampling.kernel={ep_name}_broken"])  # why it failed, not "is not one of"
    cfg = load_config(None, [f"sampling.kernel={ep_name}"])
    assert cfg.sampling.kernel == ep_name and sde.max_level(ep_name) == 2.0
    x = torch.ones(2, 3)
    assert torch.allclose(sde.step(ep_name, x, x, 0.5, 0.3, 1.0, noise=torch.zeros(2, 3)).std.flatten(), torch.full((2,), math.sqrt(0.2)))


SETTINGS = ["sampling.num_steps=3", "sampling.group_size=2", "train.prompts_per_iter=2", "train.micro_batch_size=4",
            "lora.rank=2", "lora.alpha=4", "train.progress=false", "train.log_with=[]", "train.eval_every=-1", "train.iterations=2"]


def _train(run, *extra):
    return train_argv(run, SETTINGS, *extra)


def test_training_with_a_plugin_copy_of_flow_sde_writes_the_built_ins_lora(tmp_path, kernels):
    """Rollouts, recorded log-probs and the update's recomputed mean all go through the plugin: the same formula as a
    plugin trains the built-in's LoRA, and another kernel trains another one."""
    from safetensors.torch import load_file

    runs = {}
    for label, kind in (("built_in", "flow_sde"), ("copy", f"{kernels}:flow_sde_copy"), ("naive", f"{kernels}:naive")):
        assert cli.main(_train(tmp_path / label, f"sampling.kernel={kind}")) == 0
        runs[label] = load_file(str(tmp_path / label / "pytorch_lora_weights.safetensors"))
    assert runs["built_in"].keys() == runs["copy"].keys()
    assert all(torch.equal(runs["built_in"][k], runs["copy"][k]) for k in runs["built_in"])
    assert any(not torch.equal(runs["built_in"][k], runs["naive"][k]) for k in runs["built_in"])
    assert "naive" in (tmp_path / "naive" / "config.yaml").read_text()
