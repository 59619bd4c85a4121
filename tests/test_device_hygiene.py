"""Device and autograd hygiene that only a GPU run would otherwise reveal, checked on the CPU.

* rewards score without autograd (a reward model with trainable parameters recorded its whole graph per batch);
* ``flowalign generate`` moves reward models to the scoring device (they stayed on the CPU with CUDA images);
* ``prdp_loss`` takes a step mask on another device than its log-ratios (``Trajectory.stochastic_mask`` is a CPU
  tensor: CUDA & CPU raised), simulated with the ``meta`` device;
* the in-training evaluation samples in ``sampling.micro_batch_size`` chunks, as rollouts do (memory);
* ``train.deterministic`` turns on deterministic kernels (bit-exact resume on GPUs).
"""
from __future__ import annotations

import torch

from flowalign.config import RewardConfig, load_config
from flowalign.objectives.prdp import prdp_loss
from flowalign.rewards import register_reward
from flowalign.rewards.base import Reward, RewardOutput
from flowalign.train.trainer import Trainer

GRAD_SEEN: list[bool] = []
MOVED_TO: list[str] = []


@register_reward("test_grad_probe")
class GradProbe(Reward):
    """Brightness through a trainable scale; records whether autograd was on and where it was moved."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def to(self, device):
        MOVED_TO.append(str(device))
        return super().to(device)

    def score(self, images, prompts, metadata):
        GRAD_SEEN.append(torch.is_grad_enabled())
        return RewardOutput(scores=images.mean(dim=(1, 2, 3)) * self.scale)


TINY = ["model.pretrained=tiny-sd3", "sampling.num_steps=2", "sampling.eval_num_steps=2", "sampling.guidance_scale=1.0",
        "sampling.group_size=2", "train.prompts_per_iter=2", "lora.rank=2", "lora.alpha=4", "objective.kl_beta=0.0",
        "rewards=[{name: test_grad_probe}]", "train.progress=false", "train.log_with=[]", "train.final_eval_samples=0",
        "train.eval_num_prompts=3"]


def test_the_trainer_scores_rollouts_without_autograd(tmp_path):
    GRAD_SEEN.clear()
    trainer = Trainer(load_config(None, [*TINY, f"train.output_dir={tmp_path / 'run'}"])).setup()
    try:
        trainer.score(trainer.collect().traj)  # (evaluate and the held-out evaluation run under no_grad as a whole)
    finally:
        trainer.cleanup()
    assert GRAD_SEEN and not any(GRAD_SEEN)


def test_generate_moves_rewards_to_the_scoring_device_and_scores_without_autograd():
    from flowalign.train.generate import reward_score_fn

    GRAD_SEEN.clear(), MOVED_TO.clear()
    score = reward_score_fn([RewardConfig(name="test_grad_probe")], device="cpu")
    out = score(torch.rand(2, 3, 8, 8), ["a", "b"], [{}, {}])
    assert MOVED_TO == ["cpu"] and GRAD_SEEN == [False]
    assert not out["test_grad_probe"].requires_grad


def test_prdp_loss_takes_a_step_mask_on_another_device():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    ra, rb = torch.rand(3, generator=gen), torch.rand(3, generator=gen)
    mask = torch.tensor([True, False, True, True])
    loss, clipped = prdp_loss(a, b, ra, rb, beta=0.5, clip_range=0.3, step_mask=mask)
    meta_loss, meta_clipped = prdp_loss(a.to("meta"), b.to("meta"), ra.to("meta"), rb.to("meta"), beta=0.5, clip_range=0.3,
                                        step_mask=mask)  # a CPU mask with "device" tensors: no device mix
    assert meta_loss.device.type == "meta" and meta_loss.shape == loss.shape and meta_clipped.shape == clipped.shape


def test_the_eval_grid_samples_in_micro_batches(tmp_path, monkeypatch):
    trainer = Trainer(load_config(None, [*TINY, "sampling.micro_batch_size=2", f"train.output_dir={tmp_path / 'run'}"])).setup()
    sizes = []
    velocity = trainer.adapter.velocity

    def recording(x, *args, **kwargs):
        sizes.append(x.shape[0])
        return velocity(x, *args, **kwargs)

    monkeypatch.setattr(trainer.adapter, "velocity", recording)
    try:
        trainer.evaluate()
    finally:
        trainer.cleanup()
    assert sizes and max(sizes) <= 2  # 3 prompts in chunks of 2 (guidance 1: one row per sample)


def test_train_deterministic_turns_on_deterministic_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset")  # recorded, so the test leaves the environment as it found it
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    before = torch.are_deterministic_algorithms_enabled()
    try:
        trainer = Trainer(load_config(None, [*TINY, "train.deterministic=true", "train.iterations=1", "train.eval_every=-1",
                                             f"train.output_dir={tmp_path / 'run'}"])).setup()
        try:
            assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
            trainer.train()  # every op of an iteration has a deterministic kernel here (strict mode raises otherwise)
        finally:
            trainer.cleanup()
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before)
