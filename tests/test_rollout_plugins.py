"""Rollouts and advantage estimators of the user's own (sampling.rollout, an objective's advantages method): a tree
sampler with a leaf-to-root backup (BranchGRPO / TreeGRPO's shape) can be written outside flowalign and trained by
`flowalign train`."""
from __future__ import annotations

import sys

import pytest
import torch
from tiny_run import train_argv

from flowalign import sampling
from flowalign.config import load_config
from flowalign.errors import ConfigError
from flowalign.train import cli

TREE_SOURCE = """
    import torch
    from flowalign import sde
    from flowalign.sampling import integrate, noise_levels
    from flowalign.trajectory import Trajectory

    SEEN = {"hook": [], "loss": []}


    def two_level(adapter, prompts, *, group_size, num_steps, kernel, schedule=None, guidance_scale=1.0, generator=None,
                  log_prob_reduce="mean", log_prob_form="gaussian", iteration=0, metadata=None, micro_batch_size=None,
                  cond=None, on_step=None, split=1, **ignored):
        # group_size // 2 trunks per prompt for the first `split` steps, then each trunk branches in two leaves
        P, T = len(prompts), group_size // 2
        sigmas = adapter.sigmas(num_steps).float().cpu()
        levels = noise_levels(schedule, num_steps, iteration, generator)
        if cond is None:
            cond = adapter.encode(list(prompts), do_classifier_free_guidance=guidance_scale > 1.0)
        kw = dict(kernel=kernel, guidance_scale=guidance_scale, generator=generator, log_prob_reduce=log_prob_reduce,
                  log_prob_form=log_prob_form, record_x0=False)
        trunk = integrate(adapter, adapter.initial_noise(P * T, generator), cond.repeat_interleave(T), sigmas[:split + 1],
                          levels=levels[:split], **kw)
        leaves = integrate(adapter, trunk.final.repeat_interleave(2, dim=0), cond.repeat_interleave(group_size),
                           sigmas[split:], levels=levels[split:], **kw)
        latents = torch.cat([trunk.latents.repeat_interleave(2, dim=0), leaves.latents[:, 1:]], dim=1)
        meta = [dict((metadata or [{}] * P)[i // group_size], leaf=i % 2, trunk=i // 2) for i in range(P * group_size)]
        return Trajectory(
            prompts=[p for p in prompts for _ in range(group_size)],
            group_ids=torch.arange(P).repeat_interleave(group_size), sigmas=sigmas, latents=latents,
            log_probs=torch.cat([trunk.log_probs.repeat_interleave(2, dim=0), leaves.log_probs], dim=1),
            stds=torch.cat([trunk.stds.repeat_interleave(2, dim=0), leaves.stds], dim=1), noise_levels=levels,
            stochastic_mask=sde.is_stochastic(kernel, sigmas[:-1], sigmas[1:], levels), images=adapter.decode(leaves.final),
            kernel=kernel, guidance_scale=float(guidance_scale), metadata=meta, nfe=trunk.nfe + leaves.nfe,
            log_prob_reduce=log_prob_reduce, log_prob_form=log_prob_form)


    class TreeBackup:
        # REINFORCE over whole trajectories; a trunk edge's advantage is the mean of its two leaves'
        needs_reference = False
        update_unit = "trajectory"

        def __init__(self, split: int = 1):
            self.split = split

        def advantages(self, rewards, group_ids, keep, traj, components):
            adv = torch.zeros(traj.batch_size)
            for g in group_ids.unique():
                rows = group_ids == g
                r = rewards[rows]
                adv[rows] = (r - r.mean()) / (r.std() + 1e-4)
            per_step = adv[:, None].repeat(1, traj.num_steps)
            sibling_mean = adv.view(-1, 2).mean(dim=1).repeat_interleave(2)
            per_step[:, :self.split] = sibling_mean[:, None]
            SEEN["hook"].append({"rewards": rewards.clone(), "adv": per_step.clone(), "latents": traj.latents.clone(),
                                 "leaf": [m["leaf"] for m in traj.metadata]})
            return per_step

        def loss(self, batch, policy, reference):
            v = policy(batch.x, batch.sigma)
            out = sde.step(batch.kernel, batch.x, v, batch.sigma, batch.sigma_next, batch.noise_level)
            logp = sde.log_prob(batch.x_next, out.mean, out.std, reduce=batch.log_prob_reduce)
            SEEN["loss"].append({"sample": batch.sample_index.clone(), "step": batch.step_index.clone(),
                                 "adv": batch.advantages.clone()})
            return -(batch.advantages * logp).mean(), {}


    class WrongShape(TreeBackup):
        def advantages(self, rewards, group_ids, keep, traj, components):
            return torch.zeros(traj.batch_size, 1)


    def wrong_rows(adapter, prompts, *, group_size, **kw):
        traj = two_level(adapter, prompts, group_size=group_size, **kw)
        return traj.select(list(range(traj.batch_size - 1)))


    def shuffled_groups(adapter, prompts, *, group_size, **kw):
        traj = two_level(adapter, prompts, group_size=group_size, **kw)
        traj.group_ids = traj.group_ids.flip(0)
        return traj


    def no_trajectory(adapter, prompts, **kw):
        return {"latents": None}


    def forgot_kernel(adapter, prompts, **kw):
        traj = two_level(adapter, prompts, **kw)
        traj.kernel = "dance_sde"
        return traj


    def summed(adapter, prompts, **kw):
        return two_level(adapter, prompts, **{**kw, "log_prob_reduce": "sum"})


    def no_images(adapter, prompts, **kw):
        traj = two_level(adapter, prompts, **kw)
        traj.images = None
        return traj


    def wrong_mask(adapter, prompts, **kw):
        traj = two_level(adapter, prompts, **kw)
        traj.stochastic_mask = ~traj.stochastic_mask
        return traj


    def strict(adapter, prompts, *, group_size, num_steps, kernel, split=1):
        raise AssertionError("never called: the recipe check refuses it")


    def complete(adapter, prompts, *, group_size=None, num_steps=None, kernel=None, schedule=None, guidance_scale=None, generator=None,
                 share_initial_noise=None, log_prob_reduce=None, log_prob_form=None, record_x0=None, decode=None, iteration=None,
                 metadata=None, initial_noise=None, micro_batch_size=None, cond=None, drift=None, on_step=None, split=1):
        raise AssertionError("never called")
"""


@pytest.fixture
def tree(write_plugin):
    return write_plugin(TREE_SOURCE, "fa_tree")


SETTINGS = ["sampling.num_steps=3", "sampling.group_size=4", "train.prompts_per_iter=2", "train.micro_batch_size=8",
            "lora.rank=2", "lora.alpha=4", "train.progress=false", "train.log_with=[]", "train.eval_every=-1",
            "train.iterations=1", "objective.clip_range=null", "objective.kl_beta=null"]


def _train(run, *extra):
    return train_argv(run, SETTINGS, *extra)


def test_a_tree_rollout_and_its_backup_advantages_train_out_of_tree(tmp_path, tree):
    assert cli.main(_train(tmp_path / "run", f"sampling.rollout={tree}:two_level", "sampling.rollout_kwargs={split: 2}",
                           f"objective.name={tree}:TreeBackup", "objective.kwargs={split: 2}")) == 0
    seen = sys.modules[tree].SEEN
    assert len(seen["hook"]) == 1 and seen["loss"]
    hook = seen["hook"][0]
    latents, rewards, adv = hook["latents"], hook["rewards"], hook["adv"]
    assert latents.shape[:2] == (8, 4) and hook["leaf"] == [0, 1] * 4
    # siblings share the trunk (x_T and the first 2 steps) and part after the branch
    assert torch.equal(latents[0::2, :3], latents[1::2, :3]) and not torch.equal(latents[0::2, 3], latents[1::2, 3])
    # the backup by hand: group-normalised leaf rewards; a trunk step carries the mean of its two leaves'
    expected = torch.empty(8, 3)
    for g in range(2):
        r = rewards[4 * g:4 * g + 4]
        a = (r - r.mean()) / (r.std() + 1e-4)
        for leaf in range(4):
            expected[4 * g + leaf] = torch.tensor([(a[leaf - leaf % 2] + a[leaf - leaf % 2 + 1]) / 2] * 2 + [a[leaf]])
    assert torch.allclose(adv, expected, atol=1e-6)
    # every trained row got its own step's advantage from the hook
    rows = 0
    for item in seen["loss"]:
        assert torch.allclose(item["adv"], adv[item["sample"], item["step"]])
        rows += len(item["adv"])
    assert rows == 8 * 3
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("fn, message", [
    ("wrong_rows", r"latents has shape \(7, 4\), expected \(8, 4\)"),
    ("shuffled_groups", r"group_ids must be \[0, 0, 0, 0, 1, 1, 1, 1\]"),
    ("no_trajectory", "returned a dict, not a flowalign.trajectory.Trajectory"),
    ("forgot_kernel", "recorded kernel='dance_sde' where the recipe's sampling.kernel is 'flow_sde'"),
    ("summed", "recorded log_prob_reduce='sum' where the recipe's sampling.log_prob_reduce is 'mean'"),
    ("no_images", "returned no images"),
    ("wrong_mask", r"stochastic_mask \[False, False, False\] is not what kernel 'flow_sde' gives"),
])
def test_a_rollout_that_breaks_the_layout_is_named(tmp_path, tree, capsys, fn, message):
    assert cli.main(_train(tmp_path / "run", f"sampling.rollout={tree}:{fn}", f"objective.name={tree}:TreeBackup")) == 1
    err = capsys.readouterr().err
    assert f"rollout '{tree}:{fn}'" in err and len(__import__("re").findall(message, err)) == 1, err


def test_an_advantage_hook_of_the_wrong_shape_is_named(tmp_path, tree, capsys):
    assert cli.main(_train(tmp_path / "run", f"sampling.rollout={tree}:two_level", f"objective.name={tree}:WrongShape")) == 1
    assert r"advantages() returned shape [8, 1]; expected [B]=[8] or [B, K]=[8, 3]" in capsys.readouterr().err


def test_rollout_settings_are_checked_at_load(tree):
    with pytest.raises(ConfigError, match="unknown rollout 'nope'"):
        load_config(None, ["sampling.rollout=nope"])
    with pytest.raises(ConfigError, match="has no attribute 'missing'"):
        load_config(None, [f"sampling.rollout={tree}:missing"])
    with pytest.raises(ConfigError, match=r"rollout_kwargs \['num_steps'\] are the engine's own arguments"):
        load_config(None, [f"sampling.rollout={tree}:two_level", "sampling.rollout_kwargs={num_steps: 4}"])
    with pytest.raises(ConfigError, match="the default rollout takes none"):
        load_config(None, ["sampling.rollout_kwargs={split: 1}"])
    assert load_config(None, [f"sampling.rollout={tree}:two_level", "sampling.rollout_kwargs={split: 1}"]).sampling.rollout_kwargs == {"split": 1}
    # a signature that cannot take what the trainer passes fails at load, not after the model loads
    with pytest.raises(ConfigError, match=r"rollout '.*:strict' does not take the keyword\(s\) \['schedule', 'guidance_scale'"):
        load_config(None, [f"sampling.rollout={tree}:strict"])
    assert load_config(None, [f"sampling.rollout={tree}:complete", "sampling.rollout_kwargs={split: 2}"])
    with pytest.raises(ConfigError, match=r"does not take the keyword\(s\) \['splt'\], which the trainer passes \(sampling.rollout_kwargs\)"):
        load_config(None, [f"sampling.rollout={tree}:complete", "sampling.rollout_kwargs={splt: 2}"])
    # settings that change the samples must be named by a rollout that only swallows **kwargs
    with pytest.raises(ConfigError, match=r"takes \['drift'\] only through \*\*kwargs"):
        load_config(None, [f"sampling.rollout={tree}:two_level", "sampling.drift_reward=brightness"])
    with pytest.raises(ConfigError, match=r"takes \['share_initial_noise'\] only through \*\*kwargs"):
        load_config(None, [f"sampling.rollout={tree}:two_level", "sampling.share_initial_noise=true"])
    assert load_config(None, [f"sampling.rollout={tree}:complete", "sampling.drift_reward=brightness", "sampling.share_initial_noise=true"])
    assert sampling.resolve_rollout("default") is sampling.rollout


def test_the_default_rollout_keeps_the_config_hash():
    """Runs from before sampling.rollout existed resume: the new keys at their defaults are outside the hash."""
    from flowalign.config import _hashed_settings

    assert "rollout" not in _hashed_settings(load_config(None, []))["sampling"]
    assert "rollout" in _hashed_settings(load_config(None, ["sampling.rollout=flowalign.sampling:rollout"]))["sampling"]


def test_the_report_names_a_rollout_of_your_own():
    from flowalign.report import _rollout_note

    assert _rollout_note({"sampling": {"rollout": "default"}}) == ""
    assert _rollout_note({}) == ""  # a run from before sampling.rollout existed
    assert _rollout_note({"sampling": {"rollout": "pkg.trees:two_level", "rollout_kwargs": {"split": 2}}}) == \
        " rolled out by `pkg.trees:two_level` {'split': 2}"


def test_group_normalisation_keys_under_an_advantages_method_are_named_inert(tree):
    from flowalign.config import inert_settings

    cfg = load_config(None, [f"objective.name={tree}:TreeBackup", "objective.adv_std=global", "objective.clip_range=null",
                             "objective.kl_beta=null"])
    assert any(line.startswith("objective.adv_std: objective") and "its own advantages" in line for line in inert_settings(cfg))
    assert not any("its own advantages" in line for line in inert_settings(load_config(None, ["objective.adv_std=global"])))


def test_the_signature_check_asks_only_for_what_the_trainer_passes(write_plugin):
    """The check asked for `decode` and `initial_noise` ("which the trainer passes"), which the trainer never passes: a
    rollout written to that message (keyword-only, no default) passed the load and failed at the first iteration."""
    keywords = ", ".join(k for k in sampling._ROLLOUT_PARAMETERS if k not in ("decode", "initial_noise"))
    module = write_plugin(f'''
        def lean(adapter, prompts, *, {keywords}):
            raise NotImplementedError

        def demanding(adapter, prompts, *, {keywords}, decode, initial_noise):
            raise NotImplementedError
    ''')
    assert load_config(None, [f"sampling.rollout={module}:lean"]).sampling.rollout == f"{module}:lean"
    with pytest.raises(ConfigError, match=r"requires the keyword\(s\) \['decode', 'initial_noise'\], which the trainer does not pass"):
        load_config(None, [f"sampling.rollout={module}:demanding"])
