"""``sampling.log_prob_form``: the CPS reference code's ``-(x' - mean)²`` surrogate next to the Gaussian density,
recorded by the sampler and recomputed in the same form by the objectives (Flow-CPS, TP-GRPO)."""
from __future__ import annotations

import math

import pytest
import torch

from flowalign import config, sampling, sde
from flowalign.errors import ConfigError
from flowalign.objectives import get_objective
from flowalign.pipelines import load_adapter
from flowalign.pipelines.testing import tiny_sd3_pipeline
from flowalign.train.runtime import cat_trajectories
from flowalign.train.trainer import velocity_fns


def test_squared_error_by_hand():
    x_next = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mean = torch.tensor([[0.0, 0.0], [3.0, 2.0]])
    std = torch.tensor([[0.5], [0.0]])  # row 1 is deterministic: contributes 0
    assert sde.log_prob(x_next, mean, std, form="squared_error").tolist() == [-2.5, 0.0]  # -(1 + 4) / 2
    assert sde.log_prob(x_next, mean, std, reduce="sum", form="squared_error").tolist() == [-5.0, 0.0]
    gauss = -0.5 * (torch.tensor([1.0, 2.0]) / 0.5) ** 2 - math.log(0.5) - 0.5 * math.log(2 * math.pi)
    assert sde.log_prob(x_next, mean, std)[0].item() == pytest.approx(float(gauss.mean()))  # the default is unchanged
    mu = mean.clone().requires_grad_(True)
    sde.log_prob(x_next, mu, std, form="squared_error").sum().backward()
    assert mu.grad.tolist() == [[1.0, 2.0], [0.0, 0.0]]  # d/dmu of -(x - mu)²/2 = (x - mu); std 0: no gradient
    with pytest.raises(ValueError, match="form="):
        sde.log_prob(x_next, mean, std, form="density")
    assert config.LOG_PROB_FORMS == sde.LOG_PROB_FORMS


@pytest.fixture(scope="module")
def adapter():
    return load_adapter(tiny_sd3_pipeline(seed=0))


def _rollout(adapter, form: str):
    return sampling.rollout(adapter, ["a red square", "two blue circles"], group_size=2, num_steps=4, kernel="cps",
                            schedule=sde.constant(0.7), guidance_scale=2.0, generator=torch.Generator().manual_seed(3),
                            log_prob_form=form, decode=False)


def test_the_sampler_records_the_form_on_the_same_samples(adapter):
    """The form changes what is recorded, not what is drawn. For a CPS draw x' = mean + std·eps both forms come from
    the same eps: squared_error = -std²·mean(eps²) and gaussian = -mean(eps²)/2 - log std - log(2 pi)/2, so
    squared_error = 2 std² (gaussian + log std + log(2 pi)/2) on every stochastic step."""
    g, q = _rollout(adapter, "gaussian"), _rollout(adapter, "squared_error")
    assert torch.equal(g.latents, q.latents) and q.log_prob_form == "squared_error"
    steps = g.trainable_steps()
    assert steps == [0, 1, 2]  # CPS's last step (to sigma 0) is deterministic
    std = g.stds[:, steps].double()
    by_hand = 2 * std**2 * (g.log_probs[:, steps].double() + std.log() + 0.5 * math.log(2 * math.pi))
    torch.testing.assert_close(q.log_probs[:, steps].double(), by_hand, rtol=1e-4, atol=1e-7)
    assert bool((q.log_probs[:, steps] < 0).all()) and bool((q.log_probs[:, 3] == 0).all())
    assert q.step_batch(1, torch.zeros(4)).log_prob_form == "squared_error"
    assert cat_trajectories([q, q]).log_prob_form == "squared_error"


@pytest.mark.parametrize("form", ["gaussian", "squared_error"])
def test_the_objective_recomputes_the_recorded_form(adapter, form):
    """At the weights that sampled, GRPO's recomputed log-prob equals the recorded one: ratio 1 on every row (a
    recomputation in the other form would put every row outside the clip)."""
    traj = _rollout(adapter, form)
    cond = adapter.encode(traj.prompts, do_classifier_free_guidance=True)
    policy, _ = velocity_fns(adapter, cond, guidance_scale=2.0, with_reference=False)
    objective = get_objective("grpo", clip_range=1e-4)
    for k in traj.trainable_steps():
        batch = traj.step_batch(k, torch.tensor([1.0, -1.0, 0.5, -0.5]))
        _, metrics = objective.loss(batch, policy, None)
        assert metrics["policy/clip_frac"] == 0.0, (form, k, metrics)
        other = traj.step_batch(k, torch.ones(4), log_prob_form="gaussian" if form == "squared_error" else "squared_error")
        assert get_objective("grpo", clip_range=1e-4).loss(other, policy, None)[1]["policy/clip_frac"] == 1.0


def test_the_config_key_is_checked_and_reaches_the_trainers_rollouts(tmp_path):
    with pytest.raises(ConfigError, match="sampling.log_prob_form"):
        config.load_config(None, ["sampling.log_prob_form=density"])
    from flowalign.train.trainer import Trainer

    recipe = config.load_config("tiny_grpo", ["sampling.kernel=cps", "sampling.log_prob_form=squared_error", "sampling.num_steps=3",
                                              "train.iterations=1", "train.prompts_per_iter=2", "sampling.group_size=2", "train.micro_batch_size=4", "train.grad_accum=3",
                                              "train.final_eval_samples=0", "train.eval_every=-1", "train.log_with=[]",
                                              "train.progress=false", f"train.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(recipe).setup()
    try:
        batch = trainer.collect()
        assert batch.traj.log_prob_form == "squared_error"
        metrics = trainer.update(batch)
        assert metrics["policy/clip_frac"] == 0.0  # one optimizer step per iteration: the rows are on-policy
    finally:
        trainer.cleanup()


class _BigLatent:
    def initial_noise(self, batch_size, generator=None):
        return torch.randn(batch_size, 16, 64, 64, generator=generator)  # SD3 at 512 px: 65,536 dims


class _Main:
    is_main_process = True


def test_a_summed_log_prob_over_a_real_latent_warns(caplog):
    from flowalign.train.trainer_setup import warn_about_log_prob_sum

    for reduce, warned in (("mean", False), ("sum", True)):
        caplog.clear()
        warn_about_log_prob_sum(config.load_config(None, [f"sampling.log_prob_reduce={reduce}"]), _BigLatent(), _Main())
        assert ("65536 latent dims" in caplog.text) == warned, caplog.text


def test_the_clip_fraction_is_logged_per_trained_step(tmp_path):
    """policy/clip_frac/step_KK is each trained step's own clip fraction; their mean, weighted by rows (every step
    trains the same rows here), is policy/clip_frac. Two optimizer steps per iteration make the second half clip."""
    from flowalign.train.trainer import Trainer

    recipe = config.load_config("tiny_grpo", ["sampling.num_steps=3", "train.iterations=1", "train.prompts_per_iter=2",
                                              "sampling.group_size=2", "train.micro_batch_size=4", "train.grad_accum=1",
                                              "train.lr=1e-1", "objective.clip_range=1e-6",
                                              "train.final_eval_samples=0", "train.eval_every=-1", "train.log_with=[]",
                                              "train.progress=false", f"train.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(recipe).setup()
    try:
        metrics = trainer.update(trainer.collect())
    finally:
        trainer.cleanup()
    per_step = {k: v for k, v in metrics.items() if k.startswith("policy/clip_frac/step_")}
    assert sorted(per_step) == ["policy/clip_frac/step_00", "policy/clip_frac/step_01", "policy/clip_frac/step_02"]
    assert per_step["policy/clip_frac/step_00"] == 0.0  # before the first optimizer step: on-policy
    assert per_step["policy/clip_frac/step_02"] > 0.0  # after two steps of lr 0.1: off-policy beyond the clip
    assert metrics["policy/clip_frac"] == pytest.approx(sum(per_step.values()) / 3)
