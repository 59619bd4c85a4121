"""Rollout engine (flowalign/sampling.py) on the tiny SD3 pipeline."""
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from flowalign import sde
from flowalign.pipelines import load_adapter
from flowalign.sampling import integrate, rollout, sample_ode
from flowalign.trajectory import Trajectory

PROMPTS = ["a red square", "two blue circles"]
K = 4


@pytest.fixture(scope="module")
def adapter(pipe):
    return load_adapter(pipe, max_sequence_length=32)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
@pytest.mark.parametrize("kernel", ["ode", "flow_sde"])
def test_noise_free_rollout_reproduces_pipeline(pipe, adapter, kernel, guidance_scale):
    # kernel "flow_sde" with noise level 0 must be the ODE as well
    traj = rollout(adapter, PROMPTS, num_steps=K, kernel=kernel, schedule=0.0, guidance_scale=guidance_scale, generator=_gen(7))
    kw = dict(num_inference_steps=K, guidance_scale=guidance_scale, max_sequence_length=32)
    ref_latents = pipe(PROMPTS, output_type="latent", generator=_gen(7), **kw).images
    ref_images = pipe(PROMPTS, output_type="pt", generator=_gen(7), **kw).images
    assert (traj.latents[:, -1] - ref_latents).abs().max() <= 1e-4
    assert (traj.images - ref_images).abs().max() <= 1e-4
    assert not traj.stochastic_mask.any() and (traj.log_probs == 0).all() and (traj.stds == 0).all()
    assert traj.nfe == K * 2 * (2 if guidance_scale > 1 else 1)


def test_rollout_layout_and_recorded_quantities(adapter):
    traj = rollout(adapter, PROMPTS, group_size=3, num_steps=K, kernel="flow_sde", schedule=sde.constant(0.7), guidance_scale=2.0, generator=_gen(0), metadata=[{"id": 0}, {"id": 1}])
    assert isinstance(traj, Trajectory)
    B = 6
    assert traj.prompts == ["a red square"] * 3 + ["two blue circles"] * 3
    assert traj.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert [m["id"] for m in traj.metadata] == [0, 0, 0, 1, 1, 1]
    assert traj.latents.shape == (B, K + 1, 4, 16, 16)
    assert traj.x0_preds.shape == (B, K, 4, 16, 16)
    assert traj.log_probs.shape == traj.stds.shape == (B, K)
    assert traj.images.shape == (B, 3, 32, 32)
    assert traj.sigmas.shape == (K + 1,) and traj.num_steps == K and traj.batch_size == B
    assert traj.stochastic_mask.all() and torch.equal(traj.noise_levels, torch.full((K,), 0.7))
    assert traj.nfe == K * B * 2 and traj.kernel == "flow_sde" and traj.guidance_scale == 2.0
    # independent noise per sample: group members differ from the start
    assert not torch.allclose(traj.latents[0, 0], traj.latents[1, 0])
    # stds: Flow-SDE std = a*sqrt(s/(1-s))*sqrt(s-s'), with s' in the denominator at s = 1
    s, s_next = traj.sigmas[:-1].double(), traj.sigmas[1:].double()
    denom = torch.where(s >= 1, s_next, s)
    expected = 0.7 * torch.sqrt(s / (1 - denom)) * torch.sqrt(s - s_next)
    torch.testing.assert_close(traj.stds, expected.float().expand(B, K), rtol=1e-5, atol=1e-6)


def test_recorded_log_probs_and_x0_match_recomputation(adapter):
    traj = rollout(adapter, PROMPTS, group_size=2, num_steps=K, kernel="flow_sde", schedule=sde.window(0.8, start=1, size=2), guidance_scale=2.5, generator=_gen(1))
    assert traj.stochastic_mask.tolist() == [False, True, True, False]
    cond = adapter.encode(PROMPTS).repeat_interleave(2)
    for k in range(K):
        x, s, s_next = traj.latents[:, k], float(traj.sigmas[k]), float(traj.sigmas[k + 1])
        with torch.no_grad():
            v = adapter.velocity(x, s, cond, 2.5)
        torch.testing.assert_close(traj.x0_preds[:, k], x - s * v, rtol=1e-5, atol=1e-5)
        out = sde.step("flow_sde", x, v, s, s_next, float(traj.noise_levels[k]), noise=torch.zeros_like(x))
        lp = sde.log_prob(traj.latents[:, k + 1], out.mean, out.std)
        torch.testing.assert_close(traj.log_probs[:, k], lp, rtol=1e-4, atol=1e-4)
        if traj.stochastic_mask[k]:
            # independent check with torch.distributions: mean over latent dims of the elementwise log-density
            ref = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean)).log_prob(traj.latents[:, k + 1].float())
            torch.testing.assert_close(traj.log_probs[:, k], ref.mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(traj.latents[:, k + 1], out.mean)
            assert (traj.log_probs[:, k] == 0).all()


def test_sum_reduction(adapter):
    a = rollout(adapter, PROMPTS[:1], num_steps=2, kernel="dance_sde", schedule=0.3, generator=_gen(2), decode=False)
    b = rollout(adapter, PROMPTS[:1], num_steps=2, kernel="dance_sde", schedule=0.3, generator=_gen(2), decode=False, log_prob_reduce="sum")
    torch.testing.assert_close(b.log_probs, a.log_probs * (4 * 16 * 16))
    assert a.images is None


def test_shared_initial_noise(adapter):
    traj = rollout(adapter, PROMPTS, group_size=3, num_steps=2, kernel="cps", schedule=0.5, generator=_gen(3), share_initial_noise=True, decode=False)
    x0 = traj.latents[:, 0]
    assert torch.equal(x0[0], x0[1]) and torch.equal(x0[0], x0[2]) and torch.equal(x0[3], x0[5])
    assert not torch.equal(x0[0], x0[3])
    # the shared draw is the adapter's draw for P samples
    torch.testing.assert_close(x0[::3], adapter.initial_noise(2, _gen(3)))
    # the SDE makes the group members diverge
    assert not torch.allclose(traj.latents[0, -1], traj.latents[1, -1])


def test_reproducible_with_seed_and_micro_batches_change_nothing(adapter):
    kw = dict(group_size=2, num_steps=3, kernel="flow_sde", schedule=0.7, guidance_scale=2.0)
    a = rollout(adapter, PROMPTS, generator=_gen(5), **kw)
    b = rollout(adapter, PROMPTS, generator=_gen(5), **kw)
    c = rollout(adapter, PROMPTS, generator=_gen(6), **kw)
    m = rollout(adapter, PROMPTS, generator=_gen(5), micro_batch_size=3, **kw)
    for name in ("latents", "log_probs", "stds", "x0_preds", "images"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        torch.testing.assert_close(getattr(m, name), getattr(a, name), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a.latents[:, -1], c.latents[:, -1])


def test_random_window_uses_the_generator_and_iteration(adapter):
    sched = sde.window(0.7, size=1, mode="sliding")
    t0 = rollout(adapter, PROMPTS[:1], num_steps=3, kernel="flow_sde", schedule=sched, generator=_gen(0), iteration=0, decode=False)
    t1 = rollout(adapter, PROMPTS[:1], num_steps=3, kernel="flow_sde", schedule=sched, generator=_gen(0), iteration=1, decode=False)
    assert t0.stochastic_mask.tolist() == [True, False, False]
    assert t1.stochastic_mask.tolist() == [False, True, False]


def test_sample_ode_and_integrate_from_midway(pipe, adapter):
    images = sample_ode(adapter, PROMPTS, num_steps=K, guidance_scale=3.0, generator=_gen(9))
    ref = pipe(PROMPTS, num_inference_steps=K, guidance_scale=3.0, max_sequence_length=32, generator=_gen(9), output_type="pt").images
    assert (images - ref).abs().max() <= 1e-4
    # finishing an ODE trajectory from step 2 lands where the full trajectory lands
    traj = rollout(adapter, PROMPTS, num_steps=K, kernel="ode", guidance_scale=3.0, generator=_gen(9), decode=False)
    cond = adapter.encode(PROMPTS)
    rest = integrate(adapter, traj.latents[:, 2], cond, traj.sigmas[2:], guidance_scale=3.0, record=False)
    torch.testing.assert_close(rest.final, traj.latents[:, -1], rtol=1e-5, atol=1e-5)
    assert rest.nfe == 2 * 2 * 2 and rest.latents is None


def test_bad_arguments(adapter):
    with pytest.raises(ValueError, match="kernel"):
        rollout(adapter, PROMPTS, num_steps=2, kernel="euler")
    with pytest.raises(ValueError, match="metadata"):
        rollout(adapter, PROMPTS, num_steps=2, metadata=[{}] * 3)
    with pytest.raises(ValueError, match="initial_noise"):
        rollout(adapter, PROMPTS, num_steps=2, initial_noise=torch.zeros(3, 4, 16, 16))
    with pytest.raises(ValueError, match="micro_batch_size"):
        rollout(adapter, PROMPTS, num_steps=2, micro_batch_size=0)


def test_trajectory_to_moves_every_tensor_and_keeps_the_rest():
    B, K = 2, 3
    traj = Trajectory(prompts=["a", "b"], group_ids=torch.tensor([0, 0]), sigmas=torch.linspace(1, 0, K + 1),
                      latents=torch.randn(B, K + 1, 4, 2, 2), log_probs=torch.zeros(B, K), stds=torch.ones(B, K),
                      noise_levels=torch.full((K,), 0.7), stochastic_mask=torch.tensor([True, False, False]),
                      rewards=torch.tensor([0.5, 1.0]), kernel="cps", metadata=[{"tag": "x"}, {}], nfe=12)
    moved = traj.to("meta")  # a device every machine has: tensors keep shape and dtype, lose their data
    tensors = [name for name, value in vars(moved).items() if isinstance(value, torch.Tensor)]
    assert sorted(tensors) == ["group_ids", "latents", "log_probs", "noise_levels", "rewards", "sigmas", "stds", "stochastic_mask"]
    assert all(getattr(moved, n).device.type == "meta" and getattr(moved, n).shape == getattr(traj, n).shape for n in tensors)
    assert moved.stochastic_mask.dtype == torch.bool and moved.group_ids.dtype == torch.long
    assert (moved.images, moved.x0_preds, moved.advantages) == (None, None, None)
    assert (moved.prompts, moved.kernel, moved.metadata, moved.nfe) == (traj.prompts, "cps", traj.metadata, 12)
    assert traj.latents.device.type == "cpu"  # the original is untouched


def test_trajectory_select_takes_indices_or_a_bool_mask():
    K = 2
    traj = Trajectory(prompts=["a", "b", "c", "d"], group_ids=torch.tensor([0, 0, 1, 1]), sigmas=torch.linspace(1, 0, K + 1),
                      latents=torch.arange(4.0).view(4, 1, 1).expand(4, K + 1, 3).contiguous(), log_probs=torch.zeros(4, K),
                      stds=torch.ones(4, K), noise_levels=torch.full((K,), 0.7), stochastic_mask=torch.tensor([True, False]),
                      rewards=torch.tensor([0.1, 0.2, 0.3, 0.4]), kernel="flow_sde", metadata=[{"i": i} for i in range(4)])
    by_mask = traj.select(torch.tensor([False, False, True, True]))  # the trainer's keep mask, not rows 0 and 1
    by_index = traj.select([2, 3])
    for sub in (by_mask, by_index):
        assert sub.prompts == ["c", "d"] and sub.metadata == [{"i": 2}, {"i": 3}]
        assert sub.group_ids.tolist() == [1, 1] and sub.rewards.tolist() == pytest.approx([0.3, 0.4])
        assert sub.latents[:, 0, 0].tolist() == [2.0, 3.0] and sub.sigmas.shape == (K + 1,)
    with pytest.raises(ValueError, match=r"bool mask must be \[4\]"):
        traj.select(torch.tensor([True, False]))
    # step_batch cast a bool mask to rows 0 / 1 (rows [0, 0, 1, 1] with their advantages): it takes the marked rows too
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    for index in (torch.tensor([False, False, True, True]), [2, 3]):
        step = traj.step_batch(0, adv, index=index)
        assert step.x[:, 0].tolist() == [2.0, 3.0] and step.advantages.tolist() == [2.0, -2.0]
    with pytest.raises(ValueError, match=r"bool mask must be \[4\]"):
        traj.step_batch(0, adv, index=torch.tensor([True, False]))


def test_initial_noise_of_the_wrong_size_or_beside_shared_noise_is_refused(adapter):
    """sample_ode took initial noise of any row count; rollout silently ignored share_initial_noise beside it."""
    noise = adapter.initial_noise(3, _gen(0))
    with pytest.raises(ValueError, match=r"initial_noise has 3 rows, expected P\*G = 4"):
        sample_ode(adapter, PROMPTS[:2], num_steps=2, group_size=2, initial_noise=noise, decode=False)
    with pytest.raises(ValueError, match="not both"):
        rollout(adapter, PROMPTS[:1], group_size=3, num_steps=2, kernel="flow_sde", schedule=0.7, generator=_gen(1),
                initial_noise=noise, share_initial_noise=True)
    # latents of another size decoded to images of another size, integer ones were truncated every step, NaN ones gave
    # NaN log-probs: each silently
    c, h, w = adapter.latent_shape
    bad = {"latents (4, 4, 4), the model's are": torch.randn(3, c, 4, 4), "must be a floating tensor": torch.zeros(3, c, h, w, dtype=torch.long),
           "holds NaN or inf": torch.full((3, c, h, w), float("nan"))}
    for message, noise in bad.items():
        with pytest.raises(ValueError, match=re.escape(message) if "latents" not in message else r"latents \(\d+, 4, 4\)"):
            rollout(adapter, PROMPTS[:1], group_size=3, num_steps=2, kernel="flow_sde", schedule=0.7, generator=_gen(1), initial_noise=noise)
        with pytest.raises(ValueError):
            sample_ode(adapter, PROMPTS[:1], num_steps=2, group_size=3, initial_noise=noise, decode=False)
    for prompts, group_size in (([], 1), (PROMPTS[:1], -1)):  # an IndexError and a "negative dimension" deep inside
        with pytest.raises(ValueError, match="need at least one prompt and group_size >= 1"):
            sample_ode(adapter, prompts, num_steps=2, group_size=group_size, decode=False)


def test_on_step_reports_every_denoising_step_and_changes_nothing(adapter):
    seen = []
    traj = rollout(adapter, ["a", "b"], group_size=2, num_steps=4, kernel="flow_sde", schedule=0.7, generator=_gen(3),
                   micro_batch_size=2, on_step=seen.append)
    plain = rollout(adapter, ["a", "b"], group_size=2, num_steps=4, kernel="flow_sde", schedule=0.7, generator=_gen(3),
                    micro_batch_size=2)
    assert seen == [0, 1, 2, 3]
    assert torch.equal(traj.latents, plain.latents)


def test_training_shows_a_rollout_bar(tmp_path, capsys):
    """DESIGN.md §9: progress for the rollout, reward and update phases (the rollout had none)."""
    from pathlib import Path

    from flowalign.train import cli

    recipe = Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_grpo.yaml"
    assert cli.main(["train", "--config", str(recipe), "--set", "train.iterations=1", "--set", "train.eval_every=-1",
                     "--set", "train.progress=true", "--set", f"train.output_dir={tmp_path}"]) == 0
    err = capsys.readouterr().err
    assert "[1/1] rollout" in err and "step/s" in err and "[1/1] update" in err


@pytest.mark.parametrize("seeding", ["process", "group"])
def test_a_random_window_is_one_draw_per_iteration_whatever_the_processes_generators(adapter, seeding):
    """Under noise_seeding: process the window was drawn inside each process's rollout from its own generator, so two
    processes explored different steps in one iteration (an audit saw [0, 1] on one and [2, 3] on the other), and only
    the first's was logged. It now comes from the iteration's shared stream, as under group."""
    from flowalign.config import SamplingConfig
    from flowalign.prompts import PromptRecord
    from flowalign.train.runtime import rollout_groups

    cfg = SamplingConfig(num_steps=6, group_size=2, kernel="flow_sde", noise_schedule="window",
                         noise_kwargs={"a": 0.7, "size": 2, "mode": "random"}, noise_seeding=seeding)
    records = [PromptRecord(prompt=PROMPTS[0])]
    cond = adapter.encode([PROMPTS[0]])
    masks = {}
    for iteration in range(4):
        for process in (0, 1):  # the two processes' own generators, seeded apart as the trainer seeds them
            traj = rollout_groups(adapter, records, cond, cfg, sde.make_schedule("window", **cfg.noise_kwargs),
                                  torch.Generator().manual_seed(1000 * process + 7),
                                  iteration=iteration, seed=0, first_group=process)
            masks[iteration, process] = traj.stochastic_mask.tolist()
        assert masks[iteration, 0] == masks[iteration, 1] and sum(masks[iteration, 0]) == 2
    assert len({tuple(m) for m in masks.values()}) > 1  # the window does move between iterations


def test_rollouts_of_other_noise_windows_do_not_join(adapter):
    """cat_trajectories took the first rollout's levels for both: the second batch trained on steps where it drew no
    noise (ratio 0.77 on-policy in an audit's case). Rollouts of other shared settings are now refused."""
    from flowalign.trajectory import cat_trajectories

    sched = sde.window(0.7, size=1, mode="sliding")
    a = rollout(adapter, PROMPTS[:1], num_steps=3, kernel="flow_sde", schedule=sched, generator=_gen(0), iteration=0, decode=False)
    b = rollout(adapter, PROMPTS[:1], num_steps=3, kernel="flow_sde", schedule=sched, generator=_gen(1), iteration=1, decode=False)
    same = rollout(adapter, PROMPTS[1:], num_steps=3, kernel="flow_sde", schedule=sched, generator=_gen(2), iteration=0, decode=False)
    with pytest.raises(ValueError, match="differ in noise_levels"):
        cat_trajectories([a, b])
    joined = cat_trajectories([a, same])
    assert joined.latents.shape[0] == 2 and joined.group_ids.tolist() == [0, 1]
    with pytest.raises(ValueError, match="at least one"):
        cat_trajectories([])
