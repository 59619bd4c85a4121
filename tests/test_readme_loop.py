"""The README's hand-written training step runs as written and trains the LoRA; Trajectory.step_batch (what it and
the trainer feed an objective) is the recorded transition."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text()
    start = text.index("A training step written by hand")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_the_readme_training_step_runs_and_moves_the_lora():
    torch.manual_seed(0)
    scope: dict = {}
    code = _snippet()
    assert "optimizer.step()" in code
    before_step, _ = code.split("optimizer.step()")
    exec(before_step, scope)  # noqa: S102 - the README's own code
    params = scope["params"]
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and any(float(g.abs().max()) > 0 for g in grads)  # the loss reached the LoRA
    before = [p.detach().clone() for p in params]
    scope["optimizer"].step()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    traj = scope["traj"]
    assert traj.trainable_steps() == list(range(6))  # constant 0.7 on 6 steps: every step drew noise


def test_step_batch_is_the_recorded_transition():
    from flowalign import sampling, sde
    from flowalign.pipelines import load_adapter
    from flowalign.pipelines.testing import tiny_sd3_pipeline

    adapter = load_adapter(tiny_sd3_pipeline())
    traj = sampling.rollout(adapter, ["a", "b"], group_size=2, num_steps=4, kernel="flow_sde",
                            schedule=sde.window(0.7, start=1, size=2), generator=torch.Generator().manual_seed(1))
    assert traj.trainable_steps() == [1, 2]
    per_step = torch.arange(16.0).reshape(4, 4)
    rows = torch.tensor([3, 0])
    batch = traj.step_batch(2, per_step, index=rows)
    assert torch.equal(batch.x, traj.latents[[3, 0], 2]) and torch.equal(batch.x_next, traj.latents[[3, 0], 3])
    assert torch.equal(batch.old_log_prob, traj.log_probs[[3, 0], 2]) and batch.advantages.tolist() == [14.0, 2.0]
    assert batch.sigma.tolist() == [float(traj.sigmas[2])] * 2 and batch.step_index.tolist() == [2, 2]
    assert torch.all(batch.noise_level == traj.noise_levels[2])

    with pytest.raises(ValueError, match="outside"):
        traj.step_batch(4, per_step)
    with pytest.raises(ValueError, match="advantages must be"):
        traj.step_batch(0, torch.zeros(3))


def test_the_readme_parts_snippet_runs_as_written():
    text = README.read_text()
    start = text.index("The parts are usable alone")
    code = re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the README's own code
    assert scope["traj"].log_probs.shape == (4, 10)
    assert scope["out"].prev_sample.shape == scope["x"].shape
    assert scope["mask"].shape == (4, 10) and scope["step_rewards"].shape == (4, 10)


def test_a_trajectory_knows_how_its_log_probs_were_reduced():
    """A softmax over path log-probs (BranchGRPO / TreeGRPO) depends on their scale: the trajectory records it, and
    step_batch and cat_trajectories keep it."""
    from flowalign import sampling, sde
    from flowalign.pipelines import load_adapter
    from flowalign.pipelines.testing import tiny_sd3_pipeline
    from flowalign.train.runtime import cat_trajectories

    adapter = load_adapter(tiny_sd3_pipeline())
    runs = [sampling.rollout(adapter, ["a"], group_size=2, num_steps=3, kernel="flow_sde", schedule=sde.constant(0.7),
                             log_prob_reduce="sum", generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)]
    assert runs[0].log_prob_reduce == "sum" and runs[0].step_batch(0, torch.zeros(2)).log_prob_reduce == "sum"
    assert cat_trajectories(runs).log_prob_reduce == "sum"
    assert torch.equal(sampling.noise_levels(sde.constant(0.7), 3), torch.full((3,), 0.7))
