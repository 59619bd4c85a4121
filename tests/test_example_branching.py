"""The tree-rollout example (examples/branching): its subtree advantages against a hand-worked tree, its rollout's
shared prefixes and cost, and a training run through `flowalign train` with the plugin named in a recipe."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import train_argv

from flowalign.config import load_config
from flowalign.errors import ConfigError
from flowalign.objectives import OBJECTIVES
from flowalign.pipelines import load_adapter

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "branching"


@pytest.fixture
def branching(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    import branching as module

    yield module
    sys.modules.pop("branching", None)
    for key in [k for k in OBJECTIVES if k.startswith("branching:")]:
        OBJECTIVES.pop(key)


def test_step_depths_count_the_branch_steps_at_or_before_each_step(branching):
    assert branching.step_depths([0, 1, 2], 5).tolist() == [1, 2, 3, 3, 3]
    assert branching.step_depths([2], 4).tolist() == [0, 0, 1, 1]


def test_subtree_advantages_on_a_hand_worked_tree(branching):
    # group 0: one root, branches before steps 0 and 1 (4 leaves), rewards 1, 0, 0, 0;
    # group 1: the same tree, rewards 1, 1, 0, 1
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 1])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    paths = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]] * 2)  # root, copy at step 0, copy at step 1
    depths = branching.step_depths([0, 1], 3)  # [1, 2, 2]
    adv = branching.subtree_advantages(rewards, groups, paths, depths, eps=1e-4)
    # group 0, depth 1: nodes {leaves 0, 1} = 0.5 and {2, 3} = 0: mean 0.25, sample std sqrt(0.125)
    d1 = 0.25 / (math.sqrt(0.125) + 1e-4)
    # depth 2: the leaves 1, 0, 0, 0: mean 0.25, sample std 0.5
    hi, lo = 0.75 / (0.5 + 1e-4), -0.25 / (0.5 + 1e-4)
    expected0 = [[d1, hi, hi], [d1, lo, lo], [-d1, lo, lo], [-d1, lo, lo]]
    # group 1, depth 1: nodes 1 and 0.5: mean 0.75, sample std sqrt(0.125); depth 2: leaves 1, 1, 0, 1 (mean 0.75, std 0.5)
    e1 = 0.25 / (math.sqrt(0.125) + 1e-4)
    up, down = 0.25 / (0.5 + 1e-4), -0.75 / (0.5 + 1e-4)
    expected1 = [[e1, up, up], [e1, up, up], [-e1, down, down], [-e1, up, up]]
    assert torch.allclose(adv, torch.tensor(expected0 + expected1), atol=1e-5)
    # a step every leaf of the group shares (before its first branch, one root) carries nothing
    shared = branching.subtree_advantages(rewards[:4], groups[:4], paths[:4], branching.step_depths([1], 3))
    assert shared[:, 0].abs().max() == 0 and shared[:, 1].abs().max() > 0


def test_each_shared_transition_can_be_trained_once(branching):
    # one group, a root copied before steps 0 and 1 (4 leaves): step 0 is taken by 2 nodes, steps 1-2 by the 4 leaves
    paths = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]])
    first = branching.first_leaf_of_each_node(paths, torch.zeros(4, dtype=torch.long), branching.step_depths([0, 1], 3))
    assert first.tolist() == [[True, True, True], [False, True, True], [True, True, True], [False, True, True]]
    two_groups = branching.first_leaf_of_each_node(torch.cat([paths, paths]), torch.tensor([0] * 4 + [1] * 4),
                                                   branching.step_depths([1], 3))
    assert two_groups[:, 0].tolist() == [True, False, False, False] * 2  # the root's step, once per group
    with pytest.raises(ValueError, match="edges must be"):
        branching.TreeGRPO(edges="twice")
    # through the objective (branch steps read from the samples): the repeats of a shared step zeroed
    from types import SimpleNamespace

    traj = SimpleNamespace(num_steps=3, metadata=[{"tree_root": 0, "tree_path": p[1:], "tree_branch_steps": [0, 1]}
                                                  for p in paths.tolist()])
    rewards, groups, keep = torch.tensor([1.0, 0, 0, 0]), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool)
    per_leaf = branching.TreeGRPO().advantages(rewards, groups, keep, traj)
    once = branching.TreeGRPO(edges="once").advantages(rewards, groups, keep, traj)
    d1 = 0.25 / (math.sqrt(0.125) + 1e-4)  # step 0's nodes: 0.5 and 0 (as in the hand-worked tree above)
    assert per_leaf[:, 0].tolist() == pytest.approx([d1, d1, -d1, -d1], abs=1e-5)
    assert once[:, 0].tolist() == pytest.approx([d1, 0, -d1, 0], abs=1e-5) and torch.equal(once[:, 1:], per_leaf[:, 1:])
    # a dropped first leaf hands its node's step to the next kept leaf
    dropped = torch.tensor([False, True, True, True])
    once_dropped = branching.TreeGRPO(edges="once").advantages(torch.tensor([1.0, 1, 0, 0]), groups, dropped, traj)
    e = 0.5 / (math.sqrt(0.5) + 1e-4)  # nodes 1 (leaf 1 alone) and 0: mean 0.5, sample std sqrt(0.5)
    assert once_dropped[:, 0].tolist() == pytest.approx([0, e, -e, 0], abs=1e-5)
    # samples that are not tree_rollout's are refused
    with pytest.raises(ConfigError, match="TreeGRPO trains on tree_rollout's samples"):
        branching.TreeGRPO().advantages(rewards, groups, keep, SimpleNamespace(num_steps=3, metadata=[{}] * 4))


def test_a_dropped_leaf_neither_raises_nor_lowers_its_node(branching):
    # width 3, one branch before step 0: nodes A = {dropped, 1, 1}, B = {.5, .5, .5}, C = {0, 0, 0}
    rewards = torch.tensor([0.0, 1, 1, 0.5, 0.5, 0.5, 0, 0, 0])
    keep = torch.tensor([False] + [True] * 8)
    paths = torch.tensor([[0, i // 3] for i in range(9)])
    adv = branching.subtree_advantages(rewards, torch.zeros(9, dtype=torch.long), paths, branching.step_depths([0], 2), keep=keep)
    # node values 1, 0.5, 0 (A from its kept leaves only): mean 0.5, sample std 0.5
    assert adv[::3, 0].tolist() == pytest.approx([0.5 / 0.5001, 0.0, -0.5 / 0.5001], abs=1e-5)
    # a node with no kept leaf is left out of its depth's normalisation
    none_kept = branching.subtree_advantages(rewards, torch.zeros(9, dtype=torch.long), paths, branching.step_depths([0], 2),
                                             keep=torch.tensor([False] * 3 + [True] * 6))
    assert none_kept[:3, 0].abs().max() == 0 and none_kept[3:6, 0].tolist() == pytest.approx([0.25 / (math.sqrt(0.125) + 1e-4)] * 3, abs=1e-5)


def test_the_tree_settings_are_checked_at_load(branching):
    base = ["sampling.rollout=branching:tree_rollout", "sampling.num_steps=4", "sampling.group_size=8"]
    with pytest.raises(ConfigError, match=r"branch_steps must be distinct steps in \[0, 4\), got \[0, 9\]"):
        load_config(None, [*base, "sampling.rollout_kwargs={branch_steps: [0, 9]}"])
    with pytest.raises(ConfigError, match="distinct"):
        load_config(None, [*base, "sampling.rollout_kwargs={branch_steps: [1, 1]}"])
    with pytest.raises(ConfigError, match=r"group_size 6 is not a multiple of width\*\*len\(branch_steps\) = 4"):
        load_config(None, [*base, "sampling.group_size=6", "sampling.rollout_kwargs={branch_steps: [0, 1]}"])
    with pytest.raises(ConfigError, match=r"branch steps \[3\] draw no noise .* branch on the noisy steps \[0, 1\]"):
        load_config(None, [*base, "sampling.noise_schedule=window", "sampling.noise_kwargs={a: 0.7, start: 0, size: 2}",
                           "sampling.rollout_kwargs={branch_steps: [1, 3]}"])
    assert load_config(None, [*base, "sampling.rollout_kwargs={branch_steps: [2, 0], width: 2}"])


def test_a_moving_window_that_leaves_a_branch_step_is_refused_at_load(branching):
    base = ["sampling.rollout=branching:tree_rollout", "sampling.num_steps=4", "sampling.group_size=4",
            "sampling.noise_schedule=window"]
    # sliding by one step every 10 iterations: steps 0 and 1 are noisy at iteration 0, step 0 is quiet from iteration 10
    with pytest.raises(ConfigError, match=r"branch steps \[0\] draw no noise .* at iteration 10 \(the window moves"):
        load_config(None, [*base, "sampling.noise_kwargs={a: 0.7, start: 0, size: 2, mode: sliding, shift_every: 10}",
                           "sampling.rollout_kwargs={branch_steps: [0, 1]}"])
    # a random window of 3 of the 4 steps covers steps 1 and 2 wherever it starts, but not step 0 or 3
    random_window = "sampling.noise_kwargs={a: 0.7, size: 3, mode: random}"
    assert load_config(None, [*base, random_window, "sampling.rollout_kwargs={branch_steps: [1, 2]}"])
    with pytest.raises(ConfigError, match=r"branch steps \[0\] draw no noise .* at iteration \d+ \(the window moves"):
        load_config(None, [*base, random_window, "sampling.rollout_kwargs={branch_steps: [0, 2]}"])


def test_the_rollout_refuses_a_branch_on_a_quiet_step_of_its_iteration(pipe, branching):
    from flowalign import sde

    adapter = load_adapter(pipe, max_sequence_length=32)
    sliding = sde.make_schedule("window", a=0.7, start=0, size=2, mode="sliding")
    kw = dict(group_size=2, num_steps=4, kernel="flow_sde", schedule=sliding, guidance_scale=1.0, branch_steps=[0], width=2)
    assert branching.tree_rollout(adapter, ["a red square"], generator=torch.Generator().manual_seed(0), iteration=0, **kw).latents.shape[0] == 2
    with pytest.raises(ConfigError, match=r"branch steps \[0\] draw no noise at iteration 1 \(levels \[0.0, 0.7"):
        branching.tree_rollout(adapter, ["a red square"], generator=torch.Generator().manual_seed(0), iteration=1, **kw)


def test_the_tree_rollout_shares_prefixes_and_costs_less(pipe, branching):
    from flowalign import sampling, sde

    adapter = load_adapter(pipe, max_sequence_length=32)
    kw = dict(group_size=8, num_steps=4, kernel="flow_sde", schedule=sde.window(0.7, 0, 3), guidance_scale=1.0)
    traj = branching.tree_rollout(adapter, ["a red square", "two blue circles"], generator=torch.Generator().manual_seed(0),
                                  branch_steps=[0, 1, 2], width=2, **kw)
    cfg = load_config(None, ["sampling.num_steps=4", "sampling.group_size=8", "sampling.guidance_scale=1.0",
                             "sampling.rollout=branching:tree_rollout", "sampling.rollout_kwargs={branch_steps: [0, 1, 2]}"])
    sampling.check_rollout(traj, name="tree", num_prompts=2, group_size=8, num_steps=4, sampling_config=cfg.sampling)
    lat = traj.latents  # [16, 5, ...]
    for k, block in ((1, 4), (2, 2), (3, 1)):  # after step k-1 the leaves of one node (block of rows) are equal
        rows = lat[:, k].reshape(16 // block, block, -1)
        assert torch.equal(rows, rows[:, :1].expand_as(rows)), k
        if block > 1:
            assert not torch.equal(lat[0, k], lat[block, k])  # the next node differs
    assert torch.equal(lat[0::8, 0], lat[7::8, 0]) and not torch.equal(lat[0, 0], lat[8, 0])  # one root per prompt
    assert not torch.equal(lat[0, 4], lat[1, 4])
    # transformer rows: the root's 2 copies take step 0, 4 step 1, 8 steps 2 and 3: 2 prompts x 22 against 2 x 8 x 4 = 64
    assert traj.nfe == 2 * (2 + 4 + 8 + 8)
    assert [m["tree_path"] for m in traj.metadata[:3]] == [[0, 0, 0], [0, 0, 1], [0, 1, 0]]
    # each row's log-probs are its own path's: a shared step's log-prob is the same for every leaf below it
    for k, block in ((0, 4), (1, 2)):  # step 0 is taken by 2 copies per prompt (4 leaves each), step 1 by 4 (2 each)
        lp = traj.log_probs[:, k].reshape(16 // block, block)
        assert torch.equal(lp, lp[:, :1].expand_as(lp)) and lp[:, 0].unique().numel() == 16 // block, k
    assert traj.log_probs[:, 2].unique().numel() == 16  # step 2: every leaf's own copy


def test_several_roots_unsorted_branch_steps_and_step_indices(pipe, branching):
    from flowalign import sde

    adapter = load_adapter(pipe, max_sequence_length=32)
    steps_done = []
    traj = branching.tree_rollout(adapter, ["a red square"], group_size=12, num_steps=4, kernel="flow_sde",
                                  schedule=sde.constant(0.7), guidance_scale=1.0, generator=torch.Generator().manual_seed(1),
                                  branch_steps=[3, 1], width=2, on_step=steps_done.append)
    assert steps_done == [0, 1, 2, 3]  # the rollout's own step indices, once each
    # 3 roots x 2 x 2 leaves: the roots take step 0, their 6 copies steps 1-2, the 12 leaves step 3
    assert traj.nfe == 3 + 6 + 6 + 12
    assert [m["tree_root"] for m in traj.metadata] == [0] * 4 + [1] * 4 + [2] * 4
    assert traj.metadata[5]["tree_path"] == [0, 1] and traj.metadata[0]["tree_branch_steps"] == [1, 3]
    lat = traj.latents[:, :, 0]  # one channel is enough to tell rows apart
    assert torch.equal(lat[0:4, 1], lat[0:1, 1].expand(4, -1, -1)) and not torch.equal(lat[0, 1], lat[4, 1])  # roots differ
    assert torch.equal(lat[0, 3], lat[1, 3]) and not torch.equal(lat[0, 3], lat[2, 3])  # siblings of the step-1 copy
    assert not torch.equal(lat[0, 4], lat[1, 4])  # split before step 3


SHORT_RUN = ["sampling.num_steps=4", "sampling.group_size=4", "train.prompts_per_iter=2", "train.micro_batch_size=8", "lora.rank=2",
             "lora.alpha=4", "train.progress=false", "train.log_with=[csv]", "train.eval_every=-1", "train.iterations=2",
             "sampling.noise_kwargs={a: 0.7}", "sampling.rollout=branching:tree_rollout",
             "sampling.rollout_kwargs={branch_steps: [1, 2]}", "objective.name=branching:TreeGRPO"]


def test_the_trainer_takes_the_objectives_per_step_advantages(tmp_path, branching):
    from flowalign.train.trainer import Trainer
    from tiny_run import TINY_RECIPE

    trainer = Trainer(load_config(str(TINY_RECIPE), [*SHORT_RUN, f"train.output_dir={tmp_path / 'run'}"])).setup()
    try:
        batch = trainer.collect()
    finally:
        trainer.cleanup()
    traj = batch.traj
    assert batch.advantages.shape == (8, 4)  # [B, K], not the group normalisation's [B]
    paths = torch.tensor([[m["tree_root"], *m["tree_path"]] for m in traj.metadata])
    expected = branching.subtree_advantages(traj.rewards, traj.group_ids.cpu(), paths, branching.step_depths([1, 2], 4))
    assert torch.allclose(batch.advantages, expected) and batch.advantages[:, 0].abs().max() == 0  # step 0: one root


def test_the_example_recipe_loads_and_a_short_run_trains_on_subtree_advantages(tmp_path, branching):
    from flowalign.train import cli

    cfg = load_config(str(EXAMPLE / "toy_tree_grpo.yaml"), [])
    assert cfg.sampling.rollout == "branching:tree_rollout" and cfg.objective.name == "branching:TreeGRPO"
    assert cli.main(train_argv(tmp_path / "run", SHORT_RUN)) == 0
    text = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header, rows = text[0].split(","), [line.split(",") for line in text[1:]]
    nfe = [float(r[header.index("nfe")]) for r in rows]
    assert nfe == [2 * (1 + 2 + 4 + 4)] * 2  # one root per prompt: step 0 once, copied before step 1 (2) and step 2 (4)
    assert all(float(r[header.index("advantages/abs_mean")]) > 0 for r in rows)
