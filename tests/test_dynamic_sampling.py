"""DAPO's dynamic sampling (train.oversample): the group selection by hand and by brute force, and in the trainer."""
from __future__ import annotations

import json

import pytest
import torch

from flowalign.advantages import first_informative_groups, groups_with_spread
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


# ---------------------------------------------------------------- sample-until-full (train.max_sampling_rounds)

def test_groups_with_spread_hand_worked():
    rewards = torch.tensor([0.5, 0.5, 0.2, 0.9, 1.0, float("nan"), 0.3, 0.3])
    groups = torch.tensor([7, 7, 2, 2, 4, 4, 1, 1])  # 7: flat, 2: spread, 4: one finite value, 1: flat
    assert groups_with_spread(rewards, groups) == 1
    assert groups_with_spread(rewards, groups, keep=torch.tensor([1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)) == 0
    other = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # a second reward with a spread in group 7 only
    assert groups_with_spread({"a": rewards, "b": other}, groups) == 2
    assert groups_with_spread({}, groups) == 0
    with pytest.raises(ValueError, match="values must all be"):
        groups_with_spread({"a": rewards, "b": other[:4]}, groups)


@pytest.mark.parametrize("seed", range(10))
def test_groups_with_spread_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 30, (1,), generator=gen))
    groups = torch.randint(0, 6, (batch,), generator=gen)
    rewards = torch.randint(0, 3, (batch,), generator=gen).float()  # few values: many flat groups
    rewards[torch.rand(batch, generator=gen) < 0.15] = float("nan")
    keep = torch.rand(batch, generator=gen) < 0.8
    expect = sum(len({float(r) for r, g, k in zip(rewards, groups, keep) if g == h and k and r == r}) > 1 for h in set(groups.tolist()))
    assert groups_with_spread(rewards, groups, keep) == expect


@pytest.mark.parametrize("seed", range(10))
def test_first_informative_groups_by_rank_matches_brute_force_on_sorted_rows(seed):
    gen = torch.Generator().manual_seed(seed)
    num_groups, size = int(torch.randint(1, 8, (1,), generator=gen)), 3
    group_rank = torch.randperm(num_groups, generator=gen)  # draw position of each group
    rows = torch.randperm(num_groups * size, generator=gen)  # rows gathered in some other order
    groups = (torch.arange(num_groups).repeat_interleave(size))[rows] * 10 + 5  # arbitrary ids
    rank = group_rank[(groups - 5) // 10]
    keep = torch.rand(groups.shape[0], generator=gen) < 0.4
    max_groups = int(torch.randint(0, 5, (1,), generator=gen))
    order = torch.argsort(rank, stable=True)  # the rows in draw order, where first appearance is the rank
    expect = torch.zeros_like(keep)
    expect[order] = torch.tensor(_brute_force(keep[order].tolist(), groups[order].tolist(), max_groups), dtype=torch.bool)
    assert torch.equal(first_informative_groups(keep, groups, max_groups, rank=rank), expect)
    with pytest.raises(ValueError, match="rank must be"):
        first_informative_groups(keep, groups, max_groups, rank=rank[:1])


def test_conditioning_cat():
    from flowalign.pipelines.base import Conditioning

    a = Conditioning(cond={"h": torch.zeros(2, 3), "p": torch.zeros(2, 1)}, uncond={"h": torch.ones(2, 3), "p": torch.ones(2, 1)}, extra={"x": 1})
    b = Conditioning(cond={"h": torch.full((1, 3), 2.0), "p": torch.full((1, 1), 2.0)}, uncond={"h": torch.full((1, 3), 3.0), "p": torch.full((1, 1), 3.0)})
    joined = Conditioning.cat([a, b])
    assert joined.batch_size == 3 and joined.extra == {"x": 1}
    assert joined.cond["h"][:, 0].tolist() == [0, 0, 2] and joined.uncond["p"][:, 0].tolist() == [1, 1, 3]
    with pytest.raises(ValueError, match="different keys"):
        Conditioning.cat([a, Conditioning(cond={"h": torch.zeros(1, 3)})])
    with pytest.raises(ValueError, match="at least one"):
        Conditioning.cat([])


def test_max_sampling_rounds_is_checked():
    with pytest.raises(ConfigError, match=r"train.max_sampling_rounds must be in \[1, 64\]"):
        load_config(None, ["train.max_sampling_rounds=0"])


def _until_full_trainer(tmp_path, prompts: list[str], rounds: int, per_iter: int = 2, extra: tuple = ("rewards=[{name: test_flat_for_red}]",)):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    config = load_config(None, [
        "sampling.num_steps=3", "sampling.guidance_scale=1.0", "sampling.group_size=4", f"train.prompts_per_iter={per_iter}",
        "train.micro_batch_size=8", f"train.max_sampling_rounds={rounds}", f"train.prompts={path}", *extra,
        "lora.rank=2", "objective.kl_beta=0.0", "train.progress=false", "train.log_with=[]", "train.eval_every=-1",
        "train.checkpoint_every=0", f"train.output_dir={tmp_path / 'run'}",
    ])
    return Trainer(config).setup()


def test_sample_until_full_draws_windows_until_enough_groups_have_a_signal(tmp_path):
    """4 of 6 prompts are flat ("red"): each window of 2 prompts is drawn in the sampler's shuffled order; the
    trainer keeps drawing windows until 2 groups have a signal (or 3 windows), and trains the first 2 of them."""
    prompts = ["a red square", "a red circle", "a red star", "a red cross", "a blue circle", "a green triangle"]
    trainer = _until_full_trainer(tmp_path, prompts, rounds=3)
    seen_rounds, drawn_windows = [], 0
    try:
        for _ in range(4):
            batch = trainer.collect()
            group_of = batch.traj.group_ids.cpu()
            red = torch.tensor(["red" in p for p in batch.traj.prompts])
            windows = batch.traj.batch_size // (2 * 4)
            # the stopping rule by hand: signal groups (in draw order) after each window of 2 prompts
            signal_after = [sum("red" not in p for p in batch.traj.prompts[:8 * (w + 1):4]) for w in range(windows)]
            assert windows == next((w + 1 for w, n in enumerate(signal_after) if n >= 2), 3)
            assert all(n < 2 for n in signal_after[:-1])
            assert batch.metrics["samples/sampling_rounds"] == windows
            signal_groups = list(dict.fromkeys(group_of[~red].tolist()))
            assert torch.equal(batch.keep, torch.tensor([g in signal_groups[:2] for g in group_of.tolist()]))
            assert not batch.keep[red].any()
            # each window is a fresh draw of the sampler (prompts of a window are the next ones in its order)
            drawn_windows += windows
            assert trainer.sampler.iteration == drawn_windows
            assert batch.cond.batch_size == len(set(group_of.tolist())) == 2 * windows  # one row per group of every window
            # each sample's row is its own prompt's encoding, through the windows' joined group ids
            fresh = trainer.adapter.encode(batch.traj.prompts, do_classifier_free_guidance=False)
            rows = batch.cond_rows(torch.arange(batch.traj.batch_size))
            assert all(torch.allclose(rows.cond[k], fresh.cond[k], atol=1e-5) for k in fresh.cond)
            seen_rounds.append(windows)
            trainer.update(batch)
            trainer.iteration += 1
    finally:
        trainer.cleanup()
    assert max(seen_rounds) > 1  # the test exercised extra rounds


def test_sample_until_full_stops_at_the_cap_when_no_group_has_a_signal(tmp_path):
    trainer = _until_full_trainer(tmp_path, ["a red square", "a red circle", "a red star"], rounds=3)
    try:
        batch = trainer.collect()
        assert batch.metrics["samples/sampling_rounds"] == 3 and batch.traj.batch_size == 3 * 2 * 4
        assert not batch.keep.any() and batch.metrics["samples/kept_frac"] == 0.0
        assert trainer.sampler.iteration == 3
    finally:
        trainer.cleanup()


def test_one_round_is_the_default_and_logs_no_round_count(tmp_path):
    trainer = _until_full_trainer(tmp_path, ["a red square", "a red circle", "a red star"], rounds=1)
    try:
        batch = trainer.collect()
        assert batch.traj.batch_size == 2 * 4 and "samples/sampling_rounds" not in batch.metrics
    finally:
        trainer.cleanup()


def test_global_group_index_orders_groups_round_after_round_then_by_process():
    """Process 1 of 2, 2 groups per process and round: its round-0 groups are the 3rd and 4th drawn (process 0 has
    the 1st and 2nd), its round-1 groups the 7th and 8th; one process numbers its groups as they come."""
    from flowalign.train.runtime import global_group_index

    local = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert global_group_index(local, 2, 1, 2).tolist() == [2, 2, 3, 3, 6, 6, 7, 7]
    assert global_group_index(local, 2, 0, 2).tolist() == [0, 0, 1, 1, 4, 4, 5, 5]
    assert global_group_index(local, 2, 0, 1).tolist() == local.tolist()
    assert [global_group_index(g, 3, 2, 3) for g in range(6)] == [6, 7, 8, 15, 16, 17]  # ints too (the noise streams' index)


def test_draw_order_hand_worked():
    from flowalign.train.runtime import draw_order

    # gathered process-major: process 0's groups drawn 1st (round 0) and 5th (round 1), process 1's 3rd and 7th
    rank = torch.tensor([0, 0, 4, 4, 2, 2, 6, 6])
    order, position = draw_order(rank)
    assert order.tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert position.tolist() == [0, 1, 4, 5, 2, 3, 6, 7] and position[4:].tolist() == [2, 3, 6, 7]  # process 1's rows


def test_tp_grpo_balance_over_gathered_windows_matches_one_process_in_draw_order():
    """TP-GRPO's balancing keeps turning points by row position among ties, so over several sampling windows the
    two-process batch (gathered process-major) gives one process's advantages only once put in draw order."""
    from flowalign.step_rewards import step_advantages
    from flowalign.train.runtime import draw_order, global_group_index

    K, G, per_round, differs = 4, 2, 1, 0
    for seed in range(30):
        gen = torch.Generator().manual_seed(seed)
        # one process's batch: 4 windows of 2 groups (one per process), drawn in order g = 0..7, 2 rows each; discrete rewards
        R_one = torch.randint(0, 4, (8 * G, K + 1), generator=gen).float() / 2
        ids_one = torch.arange(8).repeat_interleave(G)
        # two processes: process p holds the groups g with g % 2 == p (1 per round), gathered process-major
        rows = [r for p in range(2) for r in range(8 * G) if int(ids_one[r]) % 2 == p]
        local = torch.tensor([int(ids_one[r]) // 2 for r in rows])  # each process's group ids, round after round
        proc = torch.tensor([int(ids_one[r]) % 2 for r in rows])
        rank = torch.stack([global_group_index(l, per_round, int(p), 2) for l, p in zip(local, proc)])
        assert torch.equal(rank, ids_one[rows])  # the draw rank is the one-process group index
        kw = dict(method="tp_grpo", balance=True)
        expect = step_advantages(R_one, ids_one, **kw)[rows]
        order, position = draw_order(rank)
        got = step_advantages(R_one[rows][order], rank[order], **kw)[position]
        assert torch.equal(got, expect), seed
        differs += not torch.equal(step_advantages(R_one[rows], rank, **kw), expect)  # process order instead
    assert differs > 0  # the order does matter for some batches


def test_a_weight_0_reward_does_not_count_as_a_signal_in_the_stop_rule(tmp_path):
    """objective.reward_mix: advantage with a logged-only reward (weight 0) that varies in every group: the groups
    still have no signal to train on, so every window is drawn."""
    rewards = "rewards=[{name: test_flat_for_red, weight: 1.0}, {name: brightness, weight: 0.0}]"
    trainer = _until_full_trainer(tmp_path, ["a red square", "a red circle", "a red star"], rounds=3,
                                  extra=(rewards, "objective.reward_mix=advantage"))
    try:
        batch = trainer.collect()
        assert batch.metrics["samples/sampling_rounds"] == 3 and not batch.keep.any()
    finally:
        trainer.cleanup()


def test_sample_until_full_warns_when_its_windows_can_repeat_prompts(tmp_path, caplog):
    from types import SimpleNamespace

    from flowalign.train.trainer_setup import build_prompt_data

    path = tmp_path / "p.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(10)))
    one = SimpleNamespace(num_processes=1, process_index=0)
    base = [f"train.output_dir={tmp_path}", f"train.prompts={path}", "train.prompts_per_iter=4"]
    with caplog.at_level("WARNING", logger="flowalign.train.trainer_setup"):
        build_prompt_data(load_config(None, base + ["train.max_sampling_rounds=2"]), one)  # 8 of 10: no repeat
        assert "draw a prompt again" not in caplog.text
        build_prompt_data(load_config(None, base + ["train.max_sampling_rounds=3"]), one)  # 12 of 10
    assert "train.max_sampling_rounds=3 may draw up to 12 prompts in an iteration from a set of 10" in caplog.text
