"""Memory knobs on the tiny SD3 pipeline: each gives the results of the plain run (or close, for autocast).

* ``train.gradient_checkpointing``: same LoRA gradient, and the blocks really run twice.
* update micro-batching (``train.micro_batch_size`` x ``train.grad_accum``): same gradient as one big micro-batch.
* ``train.offload_rewards``: the reward model is moved to the device for each call and back to the CPU after; same scores.
* ``train.mixed_precision`` bf16 / fp16: the transformer runs in half precision, transition means and
  log-probs stay fp32, and the gradient is close to the fp32 one.
"""
from __future__ import annotations

import pytest
import torch

from flowalign import sde
from flowalign.config import load_config
from flowalign.rewards import register_reward
from flowalign.rewards.base import Reward, RewardOutput
from flowalign.train.trainer import Trainer

BASE = ["sampling.num_steps=3", "sampling.guidance_scale=1.0", "sampling.group_size=4", "train.prompts_per_iter=2",
        "train.micro_batch_size=8", "train.grad_accum=3", "lora.rank=2", "lora.alpha=4", "objective.kl_beta=0.04",
        "train.progress=false", "train.log_with=[]", "train.eval_every=-1", "train.checkpoint_every=0"]


def _trainer(tmp_path, *overrides) -> Trainer:
    return Trainer(load_config(None, BASE + [f"train.output_dir={tmp_path}", *overrides])).setup()


def _update_gradient(trainer: Trainer, batch=None) -> tuple[torch.Tensor, object]:
    """The summed LoRA gradient of one iteration's update (captured at its single optimizer step)."""
    captured = []
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):
        captured.append(torch.cat([p.grad.flatten() for p in trainer.params]).clone())
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step
    batch = batch or trainer.collect()
    trainer.update(batch)
    assert len(captured) == 1
    return captured[0], batch


def test_gradient_checkpointing_gives_the_same_gradient(tmp_path):
    plain, batch = _update_gradient(_trainer(tmp_path / "a"))
    trainer = _trainer(tmp_path / "b", "train.gradient_checkpointing=true")
    module = trainer.adapter.trainable_module
    assert module.gradient_checkpointing
    calls = {"n": 0}
    # a pre-hook: the recomputation stops early (non-reentrant checkpoint), before post-hooks would run
    module.transformer_blocks[0].register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    checkpointed, _ = _update_gradient(trainer, batch)
    # 3 micro-batches: a policy and a reference forward each (kl_beta > 0), and the policy block again in the backward
    assert calls["n"] == 3 * 3, calls
    assert torch.allclose(plain, checkpointed, rtol=1e-5, atol=1e-9)
    assert plain.abs().max() > 0


def test_update_micro_batching_gives_the_same_gradient(tmp_path):
    whole, batch = _update_gradient(_trainer(tmp_path / "a"))  # 8 samples per micro-batch
    split, _ = _update_gradient(_trainer(tmp_path / "b", "train.micro_batch_size=2", "train.grad_accum=12"), batch)
    assert torch.allclose(whole, split, rtol=1e-5, atol=1e-9)
    uneven, _ = _update_gradient(_trainer(tmp_path / "c", "train.micro_batch_size=3", "train.grad_accum=9"), batch)  # 3 + 3 + 2 rows
    assert torch.allclose(whole, uneven, rtol=1e-5, atol=1e-9)
    # grad_accum null: one optimizer step per pass whatever the micro-batch, so micro_batch_size is a memory knob only
    for size in (2, 3, 8):
        auto, _ = _update_gradient(_trainer(tmp_path / f"auto{size}", f"train.micro_batch_size={size}", "train.grad_accum=null"), batch)
        assert torch.allclose(whole, auto, rtol=1e-5, atol=1e-9)


def test_a_lowered_micro_batch_under_a_fixed_grad_accum_warns_of_its_extra_optimizer_steps(tmp_path, caplog):
    """Lowering train.micro_batch_size for memory multiplied the micro-batches under the recipe's grad_accum: 4 optimizer
    steps per iteration instead of 1, most of their rows outside Flow-GRPO's 1e-4 clip, without a word."""
    import logging

    batch = _trainer(tmp_path / "a").collect()
    with caplog.at_level(logging.WARNING, logger="flowalign.train.trainer"):
        metrics = _trainer(tmp_path / "b", "train.micro_batch_size=2").update(batch)  # 4 chunks x 3 steps / grad_accum 3
    assert metrics["optim/steps"] == 4.0
    assert caplog.text.count("each update pass takes 4 optimizer steps (12 micro-batches of train.micro_batch_size=2, grad_accum=3)") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flowalign.train.trainer"):
        metrics = _trainer(tmp_path / "c", "train.micro_batch_size=2", "train.grad_accum=null").update(batch)
    assert metrics["optim/steps"] == 1.0 and "optimizer steps" not in caplog.text
    with pytest.raises(Exception, match=r"train.grad_accum must be >= 1, got 0 \(null: one optimizer step per pass\)"):
        load_config(None, ["train.grad_accum=0"])


@register_reward("test_linear_model_reward")
class LinearModelReward(Reward):
    """A reward with a model (a fixed linear map of the mean colour) that records where it computed."""

    def __init__(self, device=None):
        super().__init__(device)
        self.head = torch.nn.Linear(3, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.2, 0.5, 0.3]]))
            self.head.bias.zero_()
        self.log: list[str] = []

    def to(self, device):
        self.log.append(f"to:{torch.device(device).type}")
        return super().to(device)

    def offload(self):
        self.log.append("offload")
        return super().offload()

    def score(self, images, prompts, metadata):
        self.log.append(f"score:{self.head.weight.device.type}")
        return RewardOutput(scores=self.head(images.mean(dim=(2, 3)).to(self.head.weight.device)).squeeze(1).float().cpu())


def test_reward_offload_moves_the_model_around_each_call_with_the_same_scores(tmp_path):
    kept = _trainer(tmp_path / "a", "rewards=[{name: test_linear_model_reward}]")
    offloaded = _trainer(tmp_path / "b", "rewards=[{name: test_linear_model_reward}]", "train.offload_rewards=true")
    a, b = kept.collect(), offloaded.collect()
    assert torch.equal(a.traj.rewards, b.traj.rewards)
    device = offloaded.device.type
    assert kept.rewards["test_linear_model_reward"].log == [f"to:{device}", f"score:{device}"]
    assert offloaded.rewards["test_linear_model_reward"].log == ["offload", "to:cpu", f"to:{device}", f"score:{device}", "offload", "to:cpu"]


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_runs_the_transformer_in_half_and_the_log_prob_math_in_fp32(tmp_path, monkeypatch, precision, dtype):
    """One iteration (its own rollouts) in half precision against fp32: gradients within 5% (measured
    bf16 1.2%; fp16 with dynamic loss scaling 0.16%, 37% without: its gradients underflow)."""
    reference, _ = _update_gradient(_trainer(tmp_path / "fp32"))
    trainer = _trainer(tmp_path / precision, f"train.mixed_precision={precision}")
    seen = {"linear": set(), "log_prob": set(), "v": set()}
    layer = trainer.adapter.trainable_module.transformer_blocks[0].attn.to_q.base_layer
    layer.register_forward_hook(lambda m, i, o: seen["linear"].add(o.dtype))
    real_log_prob = sde.log_prob

    def spy_log_prob(x_next, mean, std, reduce="mean", form="gaussian"):
        seen["log_prob"].update({x_next.dtype, mean.dtype, torch.as_tensor(std).dtype})
        out = real_log_prob(x_next, mean, std, reduce=reduce, form=form)
        seen["log_prob"].add(out.dtype)
        return out

    monkeypatch.setattr(sde, "log_prob", spy_log_prob)
    half, batch = _update_gradient(trainer)  # rollout and update both autocast
    v = trainer.adapter.velocity(batch.traj.latents[:2, 0], 0.5, batch.cond_rows(torch.tensor([0, 1])), 1.0)
    assert v.dtype == torch.float32
    assert trainer.adapter.autocast_dtype == dtype
    assert seen["linear"] == {dtype}  # the transformer's matmuls ran in half precision
    assert seen["log_prob"] == {torch.float32}  # means, stds, samples and log-densities in fp32
    assert all(p.dtype == torch.float32 for p in trainer.params)
    rel = float((half - reference).norm() / reference.norm())
    print(f"{precision}: |g - g_fp32| / |g_fp32| = {rel:.3g}")
    assert rel < 0.05, rel
    assert rel > 0  # it did run in half precision


@register_reward("test_offload_checked_reward")
class OffloadCheckedReward(LinearModelReward):
    """LinearModelReward that refuses a call made while it is offloaded (not moved to the device for the call)."""

    def __init__(self, device=None):
        super().__init__(device)
        self.offloaded, self._offloading = False, False

    def to(self, device):
        if not self._offloading:
            self.offloaded = False
        return super().to(device)

    def offload(self):
        self._offloading = True
        try:
            return super().offload()
        finally:
            self._offloading, self.offloaded = False, True

    def score(self, images, prompts, metadata):
        if self.offloaded:
            raise RuntimeError("called while offloaded: the caller did not move the reward to the device")
        return super().score(images, prompts, metadata)


@pytest.mark.parametrize("objective", ["grpo", "dense_grpo"])
def test_every_reward_call_moves_an_offloaded_reward_first(tmp_path, objective):
    """The rollout rewards, the dense step rewards (with DenseGRPO's noise calibration) and the in-training eval
    grid all move an offloaded reward to the device for their call (on a GPU a CPU-held model would get GPU images)."""
    trainer = _trainer(tmp_path, "rewards=[{name: test_offload_checked_reward}]", "train.offload_rewards=true",
                       f"objective.name={objective}", "dense.calibration_samples=2", "dense.calibration_rounds=1")
    batch = trainer.collect()
    assert torch.isfinite(batch.traj.rewards).all()
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval/test_offload_checked_reward/mean"]))
    reward = trainer.rewards["test_offload_checked_reward"]
    assert reward.offloaded and reward.log.count("offload") >= 3  # back on the CPU between calls
