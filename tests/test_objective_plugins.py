"""Objectives of the user's own, named in a recipe by a dotted path or an entry point (flowalign.objectives.resolve_objective):
no edit of the library, a run that used one resumes with it, and the trainer logs its loss."""
from __future__ import annotations

import csv

import pytest
from tiny_run import TINY_RECIPE, train_argv

from flowalign.config import load_config
from flowalign.errors import ConfigError
from flowalign.objectives import OBJECTIVES, available_objectives, get_objective, resolve_objective
from flowalign.train import cli

# REINFORCE on the recorded transitions: no clip, no reference, no adv_clip argument, no loss/total metric
REINFORCE_SOURCE = """
    import torch
    from flowalign import sde


    class Reinforce:
        needs_reference = False

        def __init__(self, scale: float = 1.0):
            self.scale = scale

        def loss(self, batch, policy, reference):
            v = policy(batch.x, batch.sigma)
            out = sde.step(batch.kernel, batch.x, v, batch.sigma, batch.sigma_next, batch.noise_level)
            logp = sde.log_prob(batch.x_next, out.mean, out.std, reduce=batch.log_prob_reduce)
            return -(self.scale * batch.advantages * logp).mean(), {"policy/logp_mean": float(logp.detach().mean())}


    class Adaptive(Reinforce):
        # REINFORCE whose weight grows with each loss call: state that a resume must restore

        def __init__(self, scale: float = 1.0):
            super().__init__(scale)
            self.calls = 0
            self.weight = torch.ones(())

        def loss(self, batch, policy, reference):
            self.calls += 1
            self.weight = self.weight * 1.5
            loss, metrics = super().loss(batch, policy, reference)
            return loss * self.weight, {**metrics, "mine/calls": float(self.calls)}

        def state_dict(self):
            return {"calls": self.calls, "weight": self.weight}

        def load_state_dict(self, state):
            self.calls, self.weight = state["calls"], state["weight"]


    class TrajectoryReinforce(Reinforce):
        # the same loss over a micro-batch's whole trajectories: checks it got every trained step of each sample
        update_unit = "trajectory"

        def loss(self, batch, policy, reference):
            steps = batch.step_index.unique()
            counts = torch.bincount(batch.sample_index)
            if len(steps) < 2 or not bool((counts[counts > 0] == len(steps)).all()):
                raise RuntimeError(f"not whole trajectories: steps {steps.tolist()}, rows per sample {counts.tolist()}")
            if batch.group_id is None or batch.group_id.shape != batch.sample_index.shape:
                raise RuntimeError("no group ids")
            loss, metrics = super().loss(batch, policy, reference)
            return loss, {**metrics, "mine/steps": float(len(steps)), "mine/rows": float(len(batch.x))}


    class NotAnObjective:
        pass


    class BadReturn(Reinforce):
        def __init__(self, scale: float = 1.0, mode: str = "tensor"):
            super().__init__(scale)
            self.mode = mode

        def loss(self, batch, policy, reference):
            loss, metrics = super().loss(batch, policy, reference)
            if self.mode == "tensor":
                return loss
            if self.mode == "per_row":
                return loss * torch.ones(len(batch.x)), metrics
            return loss, {"policy/note": "text"}
"""

SETTINGS = ["sampling.num_steps=3", "sampling.guidance_scale=1.0", "sampling.group_size=2", "train.prompts_per_iter=2",
            "train.micro_batch_size=4", "train.grad_accum=3", "lora.rank=2", "lora.alpha=4", "train.progress=false",
            "train.log_with=[]", "train.eval_every=-1", "train.checkpoint_every=1"]


@pytest.fixture
def plugin_module(write_plugin):
    """The module name of REINFORCE_SOURCE, written as a user's package."""
    return write_plugin(REINFORCE_SOURCE, "fa_obj")


def _train(run, *extra):
    return train_argv(run, SETTINGS, *extra)


def test_a_dotted_path_objective_trains_logs_its_loss_and_resumes(tmp_path, plugin_module):
    name = f"{plugin_module}:Reinforce"
    run = tmp_path / "run"
    assert cli.main(_train(run, f"objective.name={name}", "objective.kwargs={scale: 2.0}", "train.iterations=1",
                           "objective.clip_range=null", "objective.kl_beta=null")) == 0
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and float(rows[0]["loss/total"]) == float(rows[0]["loss/total"])  # logged by the trainer, finite
    assert "policy/logp_mean" in rows[0]
    OBJECTIVES.pop(name)  # a fresh process: the resumed run imports it again from its config.yaml
    assert cli.main(["train", "--resume", str(run), "--set", "train.iterations=2"]) == 0
    with open(run / "metrics.csv", newline="") as fh:
        assert [int(r["iteration"]) for r in csv.DictReader(fh)] == [1, 2]
    assert get_objective(name, scale=3.0).scale == 3.0 and OBJECTIVES[name].name == name


@pytest.mark.parametrize("mode, message", [
    ("tensor", "loss() must return (loss, metrics), got Tensor"),
    ("per_row", "the loss must be a floating tensor with one element, got a torch.float32 tensor of shape [4]"),
    ("text_metric", "metric 'policy/note' must map a name to a number, got str"),
])
def test_an_objective_that_breaks_the_loss_protocol_is_named(tmp_path, plugin_module, capsys, mode, message):
    """A custom objective returning the loss alone, a per-row loss or a text metric failed with a raw TypeError /
    ValueError inside the trainer's micro-step."""
    args = _train(tmp_path / "run", f"objective.name={plugin_module}:BadReturn", f"objective.kwargs={{mode: {mode}}}",
                  "train.iterations=1", "objective.clip_range=null", "objective.kl_beta=null")
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"objective '{plugin_module}:BadReturn': {message}" in err[0], err


def test_recipe_keys_the_objective_does_not_take_are_named(tmp_path, plugin_module, capsys):
    """The tiny recipe sets objective.clip_range and kl_beta, which Reinforce does not take."""
    assert cli.main(_train(tmp_path / "run", f"objective.name={plugin_module}:Reinforce", "train.iterations=1")) == 2
    assert "set objective.clip_range=null, objective.kl_beta=null" in capsys.readouterr().err


def test_bad_objective_names_say_what_is_wrong(tmp_path, plugin_module):
    with pytest.raises(ConfigError, match="not a class with a loss"):
        load_config(None, [f"objective.name={plugin_module}:NotAnObjective"])
    with pytest.raises(ConfigError, match="has no attribute 'Missing'"):
        load_config(None, [f"objective.name={plugin_module}:Missing"])
    with pytest.raises(ConfigError, match="no importable module"):
        load_config(None, ["objective.name=fa_nowhere_zz.mod:Thing"])
    with pytest.raises(ConfigError, match=r"unknown objective 'reinforce'.*dotted path"):
        load_config(None, ["objective.name=reinforce"])


def test_an_entry_point_objective_is_listed_and_selectable(tmp_path, plugin_module, monkeypatch):
    dist_info = tmp_path / f"{plugin_module}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {plugin_module}\nVersion: 0.1\n")
    ep_name = f"{plugin_module}_reinforce"
    (dist_info / "entry_points.txt").write_text(f"[flowalign.objectives]\n{ep_name} = {plugin_module}:Reinforce\n")
    try:
        assert ep_name in available_objectives()
        cfg = load_config(None, [f"objective.name={ep_name}"])
        assert cfg.objective.name == ep_name and resolve_objective(ep_name) == ep_name
    finally:
        OBJECTIVES.pop(ep_name, None)


def test_an_offline_objective_of_the_users_must_say_it_is_trained_offline(tmp_path, plugin_module):
    from flowalign.train.offline_trainer import load_offline_config

    with pytest.raises(ConfigError, match="not trained by `flowalign offline`"):
        load_offline_config(None, [f"objective={plugin_module}:Reinforce", "store=x"])


SUBCLASS_SOURCE = """
    from flowalign.objectives.dense_grpo import DenseGRPO


    class MyDense(DenseGRPO):
        pass
"""


def test_a_subclass_of_dense_grpo_trains_on_per_step_advantages(tmp_path, write_plugin):
    from flowalign.train.trainer import Trainer

    name = write_plugin(SUBCLASS_SOURCE, "fa_dense")
    overrides = SETTINGS + [f"objective.name={name}:MyDense", "dense.estimator=tweedie", f"train.output_dir={tmp_path / 'run'}"]
    trainer = Trainer(load_config(str(TINY_RECIPE), overrides)).setup()
    assert trainer.dense
    batch = trainer.collect()
    assert batch.advantages.shape == (4, 3)  # [B, K]: DenseGRPO's per-step advantages
    trainer.cleanup()


@pytest.mark.parametrize("name, kwargs, message", [
    ("nft", {"adaptive_weight": "off_please"}, "adaptive_weight must be true or false, got 'off_please'"),
    ("gdro", {"per_sample_sigma": "false"}, "per_sample_sigma must be true or false, got 'false'"),
    ("awm", {"num_timesteps": 2.7}, "num_timesteps must be an integer, got 2.7"),
    ("grpo", {"clip_range": float("nan")}, "clip_range must be a number, got NaN"),
    ("gdro", {"beta": float("nan")}, "beta must be a number, got NaN"),
])
def test_objective_arguments_python_would_coerce_silently_are_refused(name, kwargs, message):
    """bool('false') is True, int(2.7) is 2 and NaN passes every 'x <= 0' check: each used to train on another setting."""
    with pytest.raises(ConfigError, match=f"objective '{name}': {message}"):
        get_objective(name, **kwargs)


def test_an_objective_argument_of_the_wrong_kind_stops_train_before_the_model(tmp_path, capsys, monkeypatch):
    from flowalign.train import trainer_setup

    monkeypatch.setattr(trainer_setup, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    args = _train(tmp_path / "run", "objective.name=nft", "sampling.kernel=ode", "objective.kwargs={adaptive_weight: 'off'}",
                  "objective.clip_range=null")
    assert cli.main(args) == 2
    assert "objective 'nft': adaptive_weight must be true or false, got 'off'" in capsys.readouterr().err


def test_numbers_and_bools_of_the_right_kind_still_pass():
    assert get_objective("grpo", clip_range=1).clip_range == 1  # an int for a float
    assert get_objective("nft", adaptive_weight=False, beta=2).adaptive_weight is False


def test_an_objective_with_state_resumes_with_it(tmp_path, plugin_module):
    """A checkpoint kept the LoRA, optimizer and RNGs but not the objective's own state: an adaptive coefficient or a
    running baseline restarted on --resume, and the resumed run silently differed from one never stopped."""
    import torch
    from safetensors.torch import load_file

    name = f"{plugin_module}:Adaptive"
    common = [f"objective.name={name}", "objective.clip_range=null", "objective.kl_beta=null"]
    assert cli.main(_train(tmp_path / "full", *common, "train.iterations=3")) == 0
    assert cli.main(_train(tmp_path / "split", *common, "train.iterations=2")) == 0
    OBJECTIVES.pop(name)  # a fresh process
    assert cli.main(["train", "--resume", str(tmp_path / "split"), "--set", "train.iterations=3"]) == 0

    def calls(run):
        with open(run / "metrics.csv", newline="") as fh:
            return [float(r["mine/calls"]) for r in csv.DictReader(fh)]

    assert calls(tmp_path / "split") == calls(tmp_path / "full")
    full = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    split = load_file(str(tmp_path / "split" / "pytorch_lora_weights.safetensors"))
    assert full.keys() == split.keys() and all(torch.equal(full[k], split[k]) for k in full)

    # a checkpoint written without the objective's state (an objective that kept none then) is refused, not restarted
    from flowalign.errors import CheckpointError
    from flowalign.objectives.base import restore_objective_state

    with pytest.raises(CheckpointError, match="holds no state of objective .* resuming would restart it"):
        restore_objective_state(get_objective(name), None, tmp_path / "ckpt")
    restore_objective_state(get_objective(f"{plugin_module}:Reinforce"), None, tmp_path / "ckpt")  # stateless: nothing to do

    class ModuleObjective(torch.nn.Module):  # load_state_dict without any state: a checkpoint of before resumes
        name = "module"

    restore_objective_state(ModuleObjective(), None, tmp_path / "ckpt")


def test_a_trajectory_objective_gets_every_trained_step_of_its_samples_at_once(tmp_path, plugin_module):
    """Every micro-batch held one denoising step, so a loss over a whole trajectory (GSPO's sequence-level ratio) could
    not be written without forking the trainer. With update_unit = "trajectory" the same REINFORCE loss over the
    whole trajectories gives the update of the per-step plan (one optimizer step over the same rows)."""
    import torch
    from safetensors.torch import load_file

    common = ["objective.clip_range=null", "objective.kl_beta=null", "train.iterations=1", "train.micro_batch_size=4",
              "train.grad_accum=3"]
    assert cli.main(_train(tmp_path / "step", f"objective.name={plugin_module}:Reinforce", *common)) == 0
    assert cli.main(_train(tmp_path / "traj", f"objective.name={plugin_module}:TrajectoryReinforce", *common)) == 0
    with open(tmp_path / "traj" / "metrics.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    steps = int(float(row["mine/steps"]))
    assert steps >= 2 and float(row["mine/rows"]) == 4 * steps and float(row["optim/steps"]) == 1.0
    per_step = load_file(str(tmp_path / "step" / "pytorch_lora_weights.safetensors"))
    whole = load_file(str(tmp_path / "traj" / "pytorch_lora_weights.safetensors"))
    assert per_step.keys() == whole.keys()
    assert all(torch.allclose(per_step[k], whole[k], atol=1e-6) for k in per_step)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in whole.items() if "lora_B" in k)  # it trained


def test_update_unit_is_checked(tmp_path, plugin_module):
    from flowalign.objectives.base import StepBatch, concat_step_batches

    with pytest.raises(ValueError, match="at least one"):
        concat_step_batches([])
    import torch

    one = StepBatch(*(torch.zeros(2) for _ in range(7)))
    other = StepBatch(*(torch.zeros(2) for _ in range(7)), kernel="cps")
    with pytest.raises(ValueError, match="different kernels"):
        concat_step_batches([one, other])
    assert concat_step_batches([one, one]).x.shape == (4,) and concat_step_batches([one, one]).sample_index is None
