"""DAPO's dynamic sampling (train.oversample): the group selection by hand and by brute force, and in the trainer."""
from __future__ import annotations

import json

import pytest
import torch

from flowalign.advantages import first_informative_groups
from flowalign.config import load_config
from flowalign.errors import ConfigError
from flowalign.rewards import register_reward
from flowalign.rewards.base import Reward, RewardOutput
from flowalign.train.trainer import Trainer


def test_first_informative_groups_hand_worked():
    # groups in order of appearance: 5 (signal), 3 (none), 9 (signal in one row), 1 (signal), 7 (signal)
    keep = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    groups = torch.tensor([5, 5, 3, 3, 9, 9, 1, 1, 7, 7])
    expect_two = torch.tensor([1, 1, 0, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    assert torch.equal(first_informative_groups(keep, groups, 2), expect_two)
    assert torch.equal(first_informative_groups(keep, groups, 3), torch.tensor([1, 1, 0, 0, 1, 0, 1, 1, 0, 0], dtype=torch.bool))
    assert torch.equal(first_informative_groups(keep, groups, 10), keep)
    assert not first_informative_groups(keep, groups, 0).any()


def _brute_force(keep: list[bool], groups: list[int], max_groups: int) -> list[bool]:
    chosen: list[int] = []
    for g in dict.fromkeys(groups):  # order of first appearance
        if len(chosen) < max_groups and any(k for k, h in zip(keep, groups) if h == g):
            chosen.append(g)
    return [k and g in chosen for k, g in zip(keep, groups)]


@pytest.mark.parametrize("seed", range(20))
def test_first_informative_groups_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 40, (1,), generator=gen))
    groups = torch.randint(0, 9, (batch,), generator=gen)
    keep = torch.rand(batch, generator=gen) < 0.4
    max_groups = int(torch.randint(0, 6, (1,), generator=gen))
    got = first_informative_groups(keep, groups, max_groups)
    assert got.tolist() == _brute_force(keep.tolist(), groups.tolist(), max_groups)


def test_first_informative_groups_rejects_bad_input():
    with pytest.raises(ValueError, match="max_groups"):
        first_informative_groups(torch.ones(2, dtype=torch.bool), torch.zeros(2), -1)
    with pytest.raises(ValueError, match="keep must be"):
        first_informative_groups(torch.ones(2, 2, dtype=torch.bool), torch.zeros(2), 1)


def test_oversample_below_one_is_refused():
    with pytest.raises(ConfigError, match="train.oversample must be >= 1"):
        load_config(None, ["train.oversample=0.5"])


@register_reward("test_flat_for_red")
class FlatForRed(Reward):
    """0.5 for every image of a prompt with "red" in it (a group with no learning signal), else the image's brightness."""

    def score(self, images, prompts, metadata):
        luma = images.mean(dim=(1, 2, 3))  # [B]
        red = torch.tensor(["red" in p for p in prompts])
        return RewardOutput(scores=torch.where(red, torch.full_like(luma, 0.5), luma))


@pytest.mark.parametrize("oversample", [1.0, 2.0])
def test_trainer_rolls_out_more_and_trains_on_the_first_groups_with_a_signal(tmp_path, oversample):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a red square", "a blue circle", "a green triangle", "a yellow star"]))
    config = load_config(None, [
        "sampling.num_steps=3", "sampling.guidance_scale=1.0", "sampling.group_size=4", "train.prompts_per_iter=2",
        "train.micro_batch_size=8", f"train.oversample={oversample}", f"train.prompts={prompts}", "rewards=[{name: test_flat_for_red}]",
        "lora.rank=2", "objective.kl_beta=0.0", "train.progress=false", "train.log_with=[]", "train.eval_every=-1",
        "train.checkpoint_every=0", f"train.output_dir={tmp_path / 'run'}",
    ])
    trainer = Trainer(config).setup()
    try:
        for _ in range(2):
            batch = trainer.collect()
            rows = batch.traj.batch_size
            assert rows == 4 * (4 if oversample == 2.0 else 2)
            group_of = batch.traj.group_ids.cpu()
            red = torch.tensor(["red" in p for p in batch.traj.prompts])
            assert not batch.keep[red].any()  # flat groups never train
            signal_groups = list(dict.fromkeys(group_of[~red].tolist()))  # in order of appearance
            trained = signal_groups[:2] if oversample == 2.0 else signal_groups  # 4 prompts drawn, 3 with a signal: the first 2 train
            assert torch.equal(batch.keep, torch.tensor([g in trained for g in group_of.tolist()]))
            if oversample == 2.0:
                assert len(signal_groups) == 3 and batch.metrics["samples/groups_trained"] == 2.0
            assert batch.metrics["samples/kept_frac"] == pytest.approx(float(batch.keep.float().mean()))
            trainer.update(batch)
            trainer.iteration += 1
    finally:
        trainer.cleanup()


def test_an_oversample_that_does_not_split_over_the_processes_is_refused(tmp_path):
    """1.25 x 4 prompts = 5 on one process but ceil(1.25 x 2) = 3 on each of 2 (6): the prompt window and the
    sampler's position would depend on the process count, so setup refuses it; 1.5 x 4 = 6 = 2 x 3 is fine."""
    from types import SimpleNamespace

    from flowalign.train.trainer_setup import build_prompt_data

    two = SimpleNamespace(num_processes=2, process_index=0)
    base = [f"train.output_dir={tmp_path}", "train.prompts_per_iter=4", "train.micro_batch_size=8"]
    with pytest.raises(ConfigError, match=r"train.oversample=1.25 draws 5 prompts per iteration on one process but 6 over 2"):
        build_prompt_data(load_config(None, base + ["train.oversample=1.25"]), two)
    assert build_prompt_data(load_config(None, base + ["train.oversample=1.5"]), two).sampler is not None
    assert build_prompt_data(load_config(None, base + ["train.oversample=1.25"]), SimpleNamespace(num_processes=1, process_index=0))
