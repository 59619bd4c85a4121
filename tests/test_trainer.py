"""The Flow-GRPO recipe end to end on the tiny SD3 pipeline: KL, learning, saving, exact resume."""
from __future__ import annotations

import os
import csv
import logging
import math
import re

import pytest
import torch
from PIL import Image

from flowalign import lora as lora_lib
from flowalign import sampling
from flowalign.config import load_config, save_config
from flowalign.errors import CheckpointError, ConfigError
from flowalign.pipelines import load_adapter
from flowalign.pipelines.testing import tiny_sd3_pipeline
from flowalign.plots import image_grid, reward_curve
from flowalign.rewards import load_reward, register_reward
from flowalign.rewards.base import Reward, RewardOutput
from flowalign.errors import NonFiniteLossError
from flowalign.train.model import TINY_T5_TOKENS
from flowalign.train.run_dir import prepare_run_dir
from flowalign.train.trainer import Trainer, fill_dropped, make_step_batch

# the toy recipe's learning settings, made smaller where the test allows
FAST = [
    "sampling.num_steps=6", "sampling.guidance_scale=1.0", "sampling.group_size=4",
    "train.prompts_per_iter=4", "train.micro_batch_size=16", "train.grad_accum=6",
    "train.lr=3e-2", "lora.rank=4", "lora.alpha=8", "objective.kl_beta=0.0",
    "train.progress=false", "train.log_with=[]", "train.eval_every=-1", "train.checkpoint_every=0",
]


def _config(tmp_path, *overrides):
    return load_config(None, FAST + [f"train.output_dir={tmp_path}"] + list(overrides))


def _trainer(tmp_path, *overrides, **kwargs) -> Trainer:
    return Trainer(_config(tmp_path, *overrides), **kwargs).setup()


def _record_bars(trainer) -> list:
    """Make ``trainer`` open recording bars (the test config hides real ones); returns the list they land in."""
    bars = []

    class Bar:
        def __init__(self, desc, total, unit):
            self.desc, self.total, self.unit, self.n, self.closed = desc, total, unit, 0, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    trainer._bar = Bar
    return bars


def _paired_brightness(adapter, seed: int = 123) -> torch.Tensor:
    """Brightness of rollouts from fixed noise with the LoRA on minus the same rollouts with it off."""
    prompts = ["a red square", "a blue circle", "a green triangle", "a yellow star"]
    reward = load_reward("brightness")

    def run():
        traj = sampling.rollout(adapter, prompts, group_size=4, num_steps=6, kernel="flow_sde", schedule=0.7,
                                generator=torch.Generator().manual_seed(seed))
        return reward(traj.images, traj.prompts).scores

    on = run()
    with lora_lib.lora_disabled(adapter.trainable_module):
        off = run()
    return on - off


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """10 iterations of the fast recipe (one optimizer step each), with the final save."""
    out = tmp_path_factory.mktemp("run")
    trainer = _trainer(out, "train.iterations=10", "train.eval_every=0", "sampling.eval_num_steps=6", "train.log_with=[tensorboard]")
    history = []
    while trainer.iteration < trainer.config.train.iterations:
        metrics = trainer.run_iteration()
        trainer.iteration += 1
        metrics["iteration"] = trainer.iteration
        trainer.log(metrics)
        history.append(metrics)
    trainer.save_final()
    trainer.cleanup()
    return trainer, history


def test_training_raises_brightness(trained):
    trainer, history = trained
    # the objective's own view: sampled rewards went up (per-sample std is ~0.002)
    assert history[-1]["reward/brightness/mean"] - history[0]["reward/brightness/mean"] > 0.004
    # an independent, paired check: same noise, LoRA on vs off
    gain = _paired_brightness(trainer.adapter)
    assert gain.mean() > 0.004, gain
    assert (gain > 0).float().mean() >= 0.75
    assert all(h["frac_zero_std_groups"] == 0.0 for h in history)
    # kl_beta = 0: the trainer still logs a diagnostic KL to the reference, 0 before the first update
    assert history[0]["kl/ref"] == 0.0 and history[-1]["kl/ref"] > 0.0
    assert all(h["optim/steps"] == 1.0 and h["optim/skipped_nonfinite"] == 0.0 for h in history)


def test_run_dir_holds_weights_metrics_and_figures(trained):
    trainer, history = trained
    run = trainer.run_dir
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert load_config(run / "config.yaml") == trainer.config
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 11))
    assert math.isclose(float(rows[-1]["reward/mean"]), history[-1]["reward/mean"], rel_tol=1e-9)
    for column in ("reward/brightness/std", "frac_zero_std_groups", "policy/clip_frac", "policy/approx_kl", "grad_norm",
                   "loss/total", "perf/samples_per_s", "nfe", "time/rollout", "time/reward", "time/update"):
        assert column in rows[0], column
    assert float(rows[0]["nfe"]) == 16 * 6  # 16 samples x 6 steps, CFG off
    assert Image.open(run / "reward_curve.png").size[0] > 100
    assert list((run / "logs").glob("events.out.tfevents.*"))  # TensorBoard
    assert Image.open(run / "samples" / "final.png").size[0] > 32


def test_saved_lora_in_a_fresh_pipeline_reproduces_outputs(trained):
    trainer, _ = trained
    prompts = ["a red square", "a blue circle"]

    def ode(adapter):
        return sampling.sample_ode(adapter, prompts, num_steps=8, generator=torch.Generator().manual_seed(5), decode=False)

    expected = ode(trainer.adapter)
    fresh = tiny_sd3_pipeline(seed=0)
    base = ode(load_adapter(fresh, max_sequence_length=TINY_T5_TOKENS))
    assert (base - expected).abs().max() > 1e-3  # training changed the outputs
    fresh.load_lora_weights(str(trainer.run_dir))
    assert (ode(load_adapter(fresh, max_sequence_length=TINY_T5_TOKENS)) - expected).abs().max() <= 1e-4


def test_adapter_save_lora_keeps_alpha_in_the_header(trained, tmp_path):
    """``SD3Adapter.save_lora(..., metadata=...)`` writes peft's config (alpha 8 != rank 4) into the header."""
    import json

    from safetensors import safe_open

    trainer, _ = trained
    for path in (trainer.run_dir / "pytorch_lora_weights.safetensors",
                 trainer.adapter.save_lora(tmp_path, lora_lib.get_lora_state_dict(trainer.adapter.trainable_module),
                                           metadata={"r": 4, "lora_alpha": 8.0, "target_modules": ["attn.to_q"]})):
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()["lora_adapter_metadata"])
        assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (4, 8.0), meta


def test_kl_is_zero_before_the_first_update_and_positive_after(tmp_path):
    trainer = _trainer(tmp_path, "objective.kl_beta=0.04", "train.prompts_per_iter=2", "train.micro_batch_size=8")
    first = trainer.run_iteration()
    trainer.iteration += 1
    second = trainer.run_iteration()
    assert first["kl/ref"] == 0.0  # LoRA B = 0: policy and reference agree exactly
    assert second["kl/ref"] > 0.0
    assert first["optim/steps"] == 1.0


def _lora_after(tmp_path, iterations: int, resume=False, *extra):
    trainer = Trainer(_config(tmp_path, f"train.iterations={iterations}", "train.checkpoint_every=2", "train.prompts_per_iter=2",
                              "train.micro_batch_size=4", "train.grad_accum=3", "sampling.num_steps=4", "train.ema=true",
                              "train.eval_every=2", "sampling.eval_num_steps=2", "train.eval_num_prompts=2", *extra),
                      resume=resume)
    trainer.setup()
    trainer.train()
    trainer.cleanup()
    return lora_lib.get_lora_state_dict(trainer.adapter.trainable_module), trainer


def test_resume_after_two_of_four_iterations_is_bit_identical(tmp_path):
    full, full_trainer = _lora_after(tmp_path / "full", 4)
    _lora_after(tmp_path / "split", 2)
    resumed, resumed_trainer = _lora_after(tmp_path / "split", 4, True)
    assert resumed_trainer.iteration == 4
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert any(full[k].abs().max() > 0 for k in full if "lora_B" in k)  # it did train
    assert all(torch.equal(a, b) for a, b in zip(full_trainer.ema.shadow, resumed_trainer.ema.shadow))
    for name in ("full", "split"):  # same logged curve, each iteration once
        with open(tmp_path / name / "metrics.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert [r["iteration"] for r in rows] == ["1", "2", "3", "4"]
        assert [r["eval/brightness/mean"] != "" for r in rows] == [False, True, False, True]  # evals (EMA) at 2 and 4
        if name == "full":
            full_rewards = [(r["reward/mean"], r["eval/brightness/mean"]) for r in rows]
        else:
            assert [(r["reward/mean"], r["eval/brightness/mean"]) for r in rows] == full_rewards
    assert (tmp_path / "full" / "samples" / "iter_000004.png").is_file()


def test_each_checkpoint_holds_the_diffusers_lora_file_of_its_iteration(tmp_path):
    """A run stopped early is usable without a resume: ``checkpoints/iter_*/pytorch_lora_weights.safetensors`` is what
    the run would have saved then (EMA weights, as the final file), listed and checked in the manifest, and plain
    diffusers and ``flowalign eval --lora`` load the folder."""
    from safetensors.torch import load_file

    from flowalign import checkpoint as ckpt
    from flowalign.lora import check_lora_file, lora_components

    _, trainer = _lora_after(tmp_path, 4)
    run = trainer.run_dir
    final = load_file(run / "pytorch_lora_weights.safetensors")
    raw = {f"transformer.{k}": v for k, v in lora_lib.get_lora_state_dict(trainer.adapter.trainable_module).items()}
    assert final.keys() == raw.keys() and any(not torch.equal(final[k], raw[k]) for k in final)  # EMA != raw weights
    exported = {it: load_file(run / "checkpoints" / f"iter_{it:06d}" / "pytorch_lora_weights.safetensors") for it in (2, 4)}
    assert exported[4].keys() == final.keys() and all(torch.equal(exported[4][k], final[k]) for k in final)
    assert any(not torch.equal(exported[2][k], final[k]) for k in final)  # iteration 2's own weights
    manifest = ckpt.verify_checkpoint(run / "checkpoints" / "iter_000002")
    assert manifest["exports"] == ["pytorch_lora_weights.safetensors"]
    check_lora_file(run / "checkpoints" / "iter_000002", lora_components(trainer.adapter.pipeline))  # eval --lora's check

    def ode(adapter):
        return sampling.sample_ode(adapter, ["a red square"], num_steps=4, generator=torch.Generator().manual_seed(5), decode=False)

    fresh = tiny_sd3_pipeline(seed=0)
    base = ode(load_adapter(fresh, max_sequence_length=TINY_T5_TOKENS))
    fresh.load_lora_weights(str(run / "checkpoints" / "iter_000002"))
    assert (ode(load_adapter(fresh, max_sequence_length=TINY_T5_TOKENS)) - base).abs().max() > 1e-4  # it loaded weights
    target = run / "checkpoints" / "iter_000004" / "pytorch_lora_weights.safetensors"
    target.write_bytes(target.read_bytes()[:-8] + bytes(8))  # an altered export fails verification like any file
    with pytest.raises(CheckpointError, match="pytorch_lora_weights.safetensors does not match its sha256"):
        ckpt.verify_checkpoint(target.parent)


def test_nonfinite_losses_are_skipped_then_abort(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "train.max_nonfinite_steps=3", "train.prompts_per_iter=2", "train.micro_batch_size=8")
    before = lora_lib.get_lora_state_dict(trainer.adapter.trainable_module)
    calls = {"n": 0}
    real_loss = trainer.objective.loss

    def sometimes_nan(batch, policy, reference):
        calls["n"] += 1
        loss, metrics = real_loss(batch, policy, reference)
        return (loss * float("nan") if calls["n"] <= 6 else loss), metrics

    monkeypatch.setattr(trainer.objective, "loss", sometimes_nan)
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses/gradients in a row .*max_nonfinite_steps=3"):
        trainer.run_iteration()
    after = lora_lib.get_lora_state_dict(trainer.adapter.trainable_module)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was applied


def test_a_run_whose_every_step_was_skipped_is_not_a_success(tmp_path, monkeypatch):
    """Every loss NaN, but fewer in a row than max_nonfinite_steps: the run ended 'done', exit 0, with the untrained LoRA."""
    trainer = _trainer(tmp_path, "train.max_nonfinite_steps=100", "train.iterations=2", "train.prompts_per_iter=2",
                       "train.micro_batch_size=8", "train.eval_every=-1")
    real_loss = trainer.objective.loss
    monkeypatch.setattr(trainer.objective, "loss", lambda *a: (lambda loss, m: (loss * float("nan"), m))(*real_loss(*a)))
    with pytest.raises(NonFiniteLossError, match=r"nothing trained: in all 2 iterations every optimizer step was skipped"):
        trainer.train()
    assert not (trainer.run_dir / "pytorch_lora_weights.safetensors").exists()


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Micro-batches scaled by 1/n and summed give the gradient of the loss over all rows at once."""
    trainer = _trainer(tmp_path, "train.prompts_per_iter=2", "train.micro_batch_size=3", "objective.kl_beta=0.04", "sampling.num_steps=3")
    batch = trainer.collect()
    plan = trainer._plan(batch)
    assert len(plan) == 3 * len(trainer._trained_steps(batch.traj))  # chunks of 3, 3, 2 samples
    for index, k in plan:
        trainer._micro_step(batch, index, k, scale=1.0 / len(plan))
    accumulated = [p.grad.clone() for p in trainer.params]
    trainer.optimizer.zero_grad(set_to_none=True)
    # reference: every (sample, step) row weighted as the micro-batch means weight it
    total = 0.0
    for index, k in plan:
        step = make_step_batch(batch, index, k, "mean", trainer.device)
        policy, reference = trainer.velocity_fns(batch.cond_rows(index))
        loss, _ = trainer.objective.loss(step, policy, reference)
        total = total + loss / len(plan)
    total.backward()
    for a, b in zip(accumulated, [p.grad for p in trainer.params]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-10)
    assert any(g.abs().max() > 0 for g in accumulated)


def test_output_dir_guard(tmp_path):
    cfg = _config(tmp_path / "run")
    assert prepare_run_dir(tmp_path / "run", cfg, resume=False, overwrite=False) is False  # missing dir: fine
    save_config(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run of the same config; pass --resume .* --overwrite .* or --set train.output_dir="):
        prepare_run_dir(tmp_path / "run", cfg, resume=False, overwrite=False)
    other = _config(tmp_path / "run", "train.lr=1e-5")
    with pytest.raises(ConfigError, match="already holds a different run"):
        prepare_run_dir(tmp_path / "run", other, resume=False, overwrite=False)
    assert prepare_run_dir(tmp_path / "run", other, resume=False, overwrite=True) is True
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no flowalign run"):
        prepare_run_dir(tmp_path / "foreign", cfg, resume=False, overwrite=True)
    # a folder with some other config.yaml is not a run either: --overwrite would have deleted notes.txt with it
    (tmp_path / "foreign" / "config.yaml").write_text("foo: 1\n")
    with pytest.raises(ConfigError, match=r"holds no flowalign run \(its config.yaml is not a flowalign config: top level \['foo'\]"):
        prepare_run_dir(tmp_path / "foreign", cfg, resume=False, overwrite=True)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    # a run of an older flowalign whose settings no longer validate is still a run: --overwrite may replace it
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text("lora: {dropout: 0.05}\ntrain: {lr: 1.0e-3}\n")  # dropout with grpo: refused today
    with pytest.raises(ConfigError, match="already holds a different run"):
        prepare_run_dir(tmp_path / "old", cfg, resume=False, overwrite=False)
    assert prepare_run_dir(tmp_path / "old", cfg, resume=False, overwrite=True) is True
    (tmp_path / "run" / "checkpoints" / "iter_000001").mkdir(parents=True)  # a checkpoint, but not a valid one
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        Trainer(cfg, resume=True).setup()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "config.yaml"]  # nothing written


def test_fill_dropped_keeps_group_means():
    rewards = torch.tensor([1.0, float("nan"), 3.0, float("nan"), float("nan"), 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    assert torch.equal(fill_dropped(rewards, groups), torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]))


def test_plots(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("iteration,reward/mean,reward/std,loss/total\n1,0.1,0.01,0\n2,0.2,0.02,0\n3,0.4,0.01,0\n")
    png = reward_curve(path, tmp_path / "curve.png")
    assert Image.open(png).size == (600, 400)
    from flowalign.plots import reward_curve_keys

    one = {"iteration": [1, 2], "reward/mean": [0.1, 0.2], "reward/shapes/mean": [0.1, 0.2], "eval/shapes/mean": [float("nan"), 0.3]}
    assert reward_curve_keys(one) == ["reward/shapes/mean", "eval/shapes/mean"]  # the mix line was drawn twice
    two = dict(one, **{"reward/mean": [0.3, 0.4], "reward/clip/mean": [0.5, 0.6]})
    assert reward_curve_keys(two) == ["reward/mean", "reward/shapes/mean", "eval/shapes/mean", "reward/clip/mean"]
    images = torch.zeros(5, 3, 8, 10)
    images[2, 0] = 1.0  # third image pure red
    grid = Image.open(image_grid(images, tmp_path / "grid.png", nrow=2, pad=2, upscale=1))
    assert grid.size == (2 * (10 + 2) + 2, 3 * (8 + 2) + 2)  # 2 columns, 3 rows
    assert grid.getpixel((2 + 0, 2 + 1 * 10 + 3)) == (255, 0, 0)  # row 1, column 0
    assert grid.getpixel((2 + 12, 2)) == (0, 0, 0)
    big = Image.open(image_grid(images, tmp_path / "big.png", nrow=2, pad=2))  # auto: 10 px -> 130 px cells
    assert big.size == (2 * (130 + 2) + 2, 3 * (104 + 2) + 2)
    with pytest.raises(ValueError, match="no reward columns"):
        bad = tmp_path / "bad.csv"
        bad.write_text("iteration,loss\n1,0\n")
        reward_curve(bad, tmp_path / "x.png")


def test_dense_objective_trains_on_per_step_advantages_with_a_calibrated_table(tmp_path):
    import json

    trainer = _trainer(tmp_path, "objective.name=dense_grpo", "dense.estimator=tweedie", "dense.calibration_rounds=1",
                       "dense.calibration_samples=4", "sampling.num_steps=4", "train.prompts_per_iter=2",
                       "train.micro_batch_size=8", "train.grad_accum=4")
    levels = json.loads((tmp_path / "noise_table.json").read_text())["levels"]
    # one DenseGRPO calibration round moves every level of the constant 0.7 by exactly +-eps2 = 0.01
    assert len(levels) == 4 and all(abs(abs(level - 0.7) - 0.01) < 1e-6 for level in levels)
    assert torch.allclose(trainer.schedule.levels(4), torch.tensor(levels))
    bars = _record_bars(trainer)
    batch = trainer.collect()
    step_bar = next(bar for bar in bars if bar.desc == "step rewards")  # the phase had no bar of its own
    # Tweedie: 8 samples x 4 steps, one scored row each; the x0-predictions are the rollout's own (they cost a second
    # transformer pass over every rollout row, recomputed, until the rollouts recorded them)
    assert step_bar.n == step_bar.total == 8 * 4 and step_bar.closed
    assert batch.metrics["dense/nfe"] == 0 and batch.traj.x0_preds is not None and batch.traj.x0_preds.shape[:2] == (8, 4)
    assert batch.advantages.shape == (8, 4)
    index = torch.tensor([1, 5])
    step = make_step_batch(batch, index, 2, "mean", trainer.device)
    assert torch.equal(step.advantages, batch.advantages[index, 2])
    metrics = trainer.update(batch)
    assert metrics["optim/steps"] == 1.0


@register_reward("test_tag_brightness")
class TagBrightness(Reward):
    """Tag-aware test reward: a 'bright' prompt wants mean luma >= 0.5, a 'dark' one < 0.5 (partial: luma or 1 - luma)."""

    def score(self, images, prompts, metadata):
        luma = images.mean(dim=(1, 2, 3))  # [B]
        want_bright = torch.tensor([m["tag"] == "bright" for m in metadata])
        partial = torch.where(want_bright, luma, 1 - luma)
        return RewardOutput(scores=(partial >= 0.5).float(), details={"partial": partial})


def test_final_heldout_report_is_written_with_phase_times(tmp_path):
    import json

    from flowalign.report import grid_size

    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "tag": t}) + "\n" for p, t in
                               [("a white square", "bright"), ("a yellow star", "bright"), ("a black circle", "dark"), ("a blue night", "dark")]))
    run = tmp_path / "run"
    trainer = Trainer(_config(run, "train.iterations=2", f"train.prompts={prompts}", f"train.eval_prompts={prompts}", "train.final_eval_samples=8",
                              "rewards=[{name: test_tag_brightness}, {name: brightness, weight: 0.1}]", "train.prompts_per_iter=2",
                              "train.micro_batch_size=8", "sampling.num_steps=3", "sampling.eval_num_steps=3", "lora.rank=2"))
    trainer.setup()
    trainer.train()
    trainer.cleanup()
    assert {"setup", "train", "save", "held-out eval"} <= set(trainer.timings)
    text = (run / "report.md").read_text()
    assert "bright" in text and "dark" in text and "| train |" in text.replace("**", "")
    base = json.loads((run / "eval_base.json").read_text())
    aligned = json.loads((run / "eval_aligned.json").read_text())
    assert base["settings"]["num_samples"] == aligned["settings"]["num_samples"] == 8
    assert base["settings"]["reward"] == aligned["settings"]["reward"]  # the first reward of the mix
    assert base["settings"]["reward_kwargs"] == aligned["settings"]["reward_kwargs"] == {}  # what `eval --compare` checks
    # 2 columns per tag, each a base and an aligned cell of the 32 px tiny images upscaled 4x
    h, w = trainer.adapter.height, trainer.adapter.width
    assert Image.open(run / "before_after.png").size == grid_size(4, h, w)
    assert (run / "heldout_accuracy.png").is_file() and "(heldout_accuracy.png)" in text

    # extended by a third iteration without a new report: the old one (about the 2-iteration LoRA) must not stay
    extended = Trainer(_config(run, "train.iterations=3", f"train.prompts={prompts}", f"train.eval_prompts={prompts}",
                               "train.final_eval_samples=0", "rewards=[{name: test_tag_brightness}, {name: brightness, weight: 0.1}]",
                               "train.prompts_per_iter=2", "train.micro_batch_size=8", "sampling.num_steps=3",
                               "sampling.eval_num_steps=3", "lora.rank=2"), resume=True)
    extended.setup()
    extended.train()
    extended.cleanup()
    assert extended.iteration == 3 and (run / "pytorch_lora_weights.safetensors").is_file()
    assert not any((run / name).exists() for name in ("report.md", "report.json", "eval_base.json", "eval_aligned.json",
                                                        "before_after.png", "heldout_accuracy.png"))


def test_ref_kl_every_only_thins_the_diagnostic(tmp_path):
    """train.ref_kl_every = 2 logs kl/ref on metrics rows 2, 4, ... only (row 1, before any update, is always 0), and trains
    the same weights as every iteration."""
    runs = {}
    for every in (1, 2):
        trainer = _trainer(tmp_path / f"every_{every}", f"train.ref_kl_every={every}", "train.prompts_per_iter=2",
                           "train.micro_batch_size=8")
        logged = []
        for _ in range(3):
            logged.append("kl/ref" in trainer.run_iteration())
            trainer.iteration += 1
        runs[every] = (logged, {k: v.detach().clone() for k, v in lora_lib.get_lora_state_dict(trainer.adapter.trainable_module).items()})
        trainer.cleanup()
    assert runs[1][0] == [True, True, True] and runs[2][0] == [False, True, False]
    assert runs[1][1].keys() == runs[2][1].keys() and runs[1][1]
    for key, value in runs[1][1].items():
        assert torch.equal(value, runs[2][1][key]), key
    with pytest.raises(ConfigError, match="train.ref_kl_every"):
        _config(tmp_path, "train.ref_kl_every=-1")


def test_too_few_final_eval_samples_fail_before_training(tmp_path):
    """The held-out report evaluates every prompt: a smaller train.final_eval_samples is a ConfigError at setup,
    not after the whole run."""
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(f'{{"prompt": "a red square {i}"}}\n' for i in range(5)))
    with pytest.raises(ConfigError, match="train.final_eval_samples=3 is below the 5 prompts"):
        _trainer(tmp_path / "run", f"train.eval_prompts={prompts}", "train.final_eval_samples=3")
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.parametrize("std", ["group", "none"])
def test_trainer_advantages_follow_objective_adv_std(tmp_path, std):
    """objective.adv_std=none (Dr. GRPO) keeps each group's reward spread: advantage = reward - group mean."""
    trainer = _trainer(tmp_path, f"objective.adv_std={std}", "train.iterations=1")
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.3, 0.3, 0.5])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv, keep, _ = trainer.advantages(rewards, group_ids, torch.ones(8, dtype=torch.bool))
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.1, -0.1, -0.1, 0.1])
    expected = centred if std == "none" else centred / torch.tensor([0.75**0.5 * 0.5] * 4 + [0.1] * 4)
    assert torch.allclose(adv, expected, atol=1e-3) and keep.all()
    trainer.cleanup()


def test_trainer_advantages_leave_dropped_rewards_out_of_the_group_statistics(tmp_path):
    """A dropped (NaN) reward gets advantage 0 and does not shrink its group's std: the kept samples'
    advantages are those of the group without it (the review's case: [1, 0, 1, NaN] -> +-0.707, -1.414)."""
    trainer = _trainer(tmp_path, "train.iterations=1")
    rewards = torch.tensor([1.0, 0.0, 1.0, float("nan"), 0.2, 0.4, 0.6, 0.8])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    keep = ~rewards.isnan()
    adv, kept, _ = trainer.advantages(rewards, group_ids, keep)
    # by hand, population std over the kept rows only: group 0 mean 2/3, std sqrt(2)/3
    g0 = [(r - 2 / 3) / (2**0.5 / 3 + 1e-4) for r in (1.0, 0.0, 1.0)]
    g1 = [(r - 0.5) / (0.05**0.5 + 1e-4) for r in (0.2, 0.4, 0.6, 0.8)]
    assert adv.tolist() == pytest.approx(g0 + [0.0] + g1, abs=1e-5)
    assert kept.tolist() == [True, True, True, False] + [True] * 4
    trainer.cleanup()


def test_train_function_runs_a_whole_job_and_state_dict_is_what_the_checkpoint_holds(tmp_path):
    from flowalign import checkpoint as ckpt
    from flowalign.train import trainer as trainer_module

    config = _config(tmp_path, "train.iterations=1", "train.prompts_per_iter=2", "train.micro_batch_size=4", "train.grad_accum=3",
                     "sampling.num_steps=4", "train.checkpoint_every=1")
    metrics = trainer_module.train(config)  # setup, train, final outputs, cleanup
    assert metrics["iteration"] == 1 and math.isfinite(metrics["loss/total"])
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file() and (tmp_path / "reward_curve.png").is_file()
    resumed = Trainer(config, resume=True).setup()  # the job's checkpoint, read back
    tensors, state = resumed.state_dict()
    saved = ckpt.load_checkpoint(ckpt.find_latest(tmp_path / "checkpoints"))
    assert state["iteration"] == saved.state["iteration"] == 1
    assert tensors["lora"].keys() == saved.tensors["lora"].keys()
    assert all(torch.equal(tensors["lora"][k], saved.tensors["lora"][k]) for k in tensors["lora"])
    assert state["optimizer"]["state"].keys() == saved.state["optimizer"]["state"].keys()
    resumed.cleanup()


def test_each_process_resumes_its_own_global_torch_rng(tmp_path, monkeypatch):
    """A checkpoint keeps every process's global torch RNG (``torch_rngs``, one row per process; LoRA dropout draws
    from it) and a resume restores this process's row, not process 0's ``rng`` everywhere."""
    from flowalign import checkpoint as ckpt
    from flowalign.train import trainer_checkpoint

    trainer = _trainer(tmp_path)
    saved = torch.get_rng_state()
    path = trainer.save_checkpoint()
    loaded = ckpt.load_checkpoint(path)
    assert loaded.state["torch_rngs"].shape == (1, saved.numel()) and torch.equal(loaded.state["torch_rngs"][0].to(torch.uint8), saved)
    own = torch.Generator().manual_seed(123).get_state()  # stands in for another process's stream
    loaded.state["torch_rngs"] = own[None].clone()
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda *args, **kwargs: loaded)
    torch.manual_seed(7)
    trainer_checkpoint.restore_trainer_checkpoint(trainer, path)
    assert torch.equal(torch.get_rng_state(), own)  # this process's row wins over rng["torch"]


def test_trained_steps_count_is_exact_for_decimal_fractions():
    """The first timestep_fraction of the stochastic steps: 0.58 of 50 is 29 (float 28.999999999999996 floored to 28)."""
    from types import SimpleNamespace

    def trained(k, fraction):
        fake = SimpleNamespace(config=SimpleNamespace(objective=SimpleNamespace(timestep_fraction=fraction)))
        return Trainer._trained_steps(fake, SimpleNamespace(stochastic_mask=torch.ones(k, dtype=torch.bool)))

    assert len(trained(50, 0.58)) == 29 and len(trained(3, 0.34)) == 1 and len(trained(10, 0.3)) == 3 and len(trained(3, 0.1)) == 1
    assert trained(50, 0.58) == list(range(29))


def test_a_reward_dropped_on_every_sample_stops_the_run_instead_of_ending_as_a_success(tmp_path):
    """on_error: drop on a reward that always fails: every iteration kept nothing and the run used to end with exit 0
    and an untouched LoRA. It stops after train.max_nonfinite_steps such iterations in a row; one good iteration resets."""
    from flowalign.errors import RewardError
    from flowalign.rewards import FunctionReward

    trainer = _trainer(tmp_path, "train.max_nonfinite_steps=2", "train.iterations=5")
    rcfg = trainer.config.rewards[0]
    rcfg.on_error = "drop"
    good = trainer.rewards[rcfg.name]
    broken = FunctionReward(lambda images, prompts, metadata: torch.full((len(prompts),), float("nan")), name=rcfg.name)
    trainer.rewards[rcfg.name] = broken
    trainer.run_iteration()  # 1 in a row
    trainer.rewards[rcfg.name] = good
    trainer.run_iteration()  # a kept iteration resets the count
    trainer.rewards[rcfg.name] = broken
    trainer.run_iteration()
    path = trainer.save_checkpoint()  # the count survives a resume: the first iteration after it is the 2nd in a row
    trainer._all_dropped_in_row = 0
    from flowalign.train import trainer_checkpoint

    trainer_checkpoint.restore_trainer_checkpoint(trainer, path)
    assert trainer._all_dropped_in_row == 1
    with pytest.raises(RewardError, match="dropped in 2 iterations in a row"):
        trainer.run_iteration()
    trainer.cleanup()


def test_reward_mix_advantage_sums_each_rewards_own_group_advantages(tmp_path):
    """objective.reward_mix: advantage (DESIGN.md §3: MultiReward mixes on rewards or on advantages)."""
    rewards = "rewards=[{name: brightness, weight: 1.0}, {name: jpeg_compressibility, weight: 0.5}]"
    trainer = _trainer(tmp_path, rewards, "objective.reward_mix=advantage")
    batch = trainer.collect()
    images, groups = batch.traj.images, batch.traj.group_ids.tolist()
    scores = {"brightness": load_reward("brightness")(images, batch.traj.prompts).scores.double(),
              "jpeg_compressibility": load_reward("jpeg_compressibility")(images, batch.traj.prompts).scores.double()}
    expected = torch.zeros(len(groups), dtype=torch.float64)
    for name, weight in (("brightness", 1.0), ("jpeg_compressibility", 0.5)):  # by hand: each reward normalised in each group
        r = scores[name]
        for g in set(groups):
            rows = [i for i, x in enumerate(groups) if x == g]
            mean = sum(r[i] for i in rows) / len(rows)
            std = (sum((r[i] - mean) ** 2 for i in rows) / len(rows)) ** 0.5
            for i in rows:
                expected[i] += weight * (r[i] - mean) / (std + 1e-4)
    assert torch.allclose(batch.advantages.double(), expected.clamp(-5, 5), atol=1e-4)
    summed = trainer.advantages(scores["brightness"].float() + 0.5 * scores["jpeg_compressibility"].float(), batch.traj.group_ids,
                                torch.ones(len(groups), dtype=torch.bool))[0]
    assert not torch.allclose(summed, batch.advantages, atol=1e-3)  # the default mix gives other advantages
    with pytest.raises(ConfigError, match="reward_mix"):
        _config(tmp_path, "objective.name=dense_grpo", "objective.reward_mix=advantage")


def test_one_reward_twice_under_labels_logs_both(tmp_path):
    twice = "rewards=[{name: color_fraction, kwargs: {color: red}}, {name: color_fraction, label: blue, weight: 0.5, kwargs: {color: blue}}]"
    trainer = _trainer(tmp_path, twice)
    batch = trainer.collect()
    red = load_reward("color_fraction", color="red")(batch.traj.images, batch.traj.prompts).scores
    blue = load_reward("color_fraction", color="blue")(batch.traj.images, batch.traj.prompts).scores
    assert batch.metrics["reward/color_fraction/mean"] == pytest.approx(float(red.mean()), abs=1e-6)
    assert batch.metrics["reward/blue/mean"] == pytest.approx(float(blue.mean()), abs=1e-6)
    assert torch.allclose(batch.traj.rewards, red + 0.5 * blue, atol=1e-6)


def test_setup_seeds_python_and_numpy_from_the_run_seed(tmp_path):
    """Only torch was seeded: a reward or objective plugin drawing from random / numpy differed between two fresh
    runs with one seed (resumes restored them, so only fresh runs drifted)."""
    import random

    import numpy as np

    from flowalign.train.runtime import seed_global_rngs

    draws = []
    for _ in range(2):
        random.seed(None)
        np.random.seed(None)
        seed_global_rngs(7)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert draws[0] == draws[1]
    seed_global_rngs(2**40 + 7)  # numpy takes it mod 2**32
    assert float(np.random.rand()) == draws[0][1]
    after_setup = []
    for name in ("a", "b"):
        random.seed(None)
        np.random.seed(None)
        trainer = _trainer(tmp_path / name)
        after_setup.append((random.random(), float(np.random.rand())))
        trainer.cleanup()
    assert after_setup[0] == after_setup[1]


def test_extending_a_finished_run_says_its_final_lora_is_the_earlier_ends(tmp_path, caplog):
    """An extension interrupted before its end left the root LoRA and report of the earlier end with no word of it."""
    run = tmp_path / "run"
    first = _trainer(run, "train.iterations=1", "sampling.num_steps=2")
    first.train()
    first.cleanup()
    with caplog.at_level("WARNING"):
        again = _trainer(run, "train.iterations=1", "sampling.num_steps=2", resume=True)  # the same end: nothing to say
        again.cleanup()
        assert "an earlier end's" not in caplog.text
        longer = _trainer(run, "train.iterations=2", "sampling.num_steps=2", resume=True)
        longer.cleanup()
    assert "pytorch_lora_weights.safetensors (and report, if any) are an earlier end's; this run replaces them when it " \
           "reaches iteration 2" in caplog.text


def test_a_float16_model_trains_with_loss_scaling(tmp_path):
    trainer = _trainer(tmp_path, "model.dtype=float16", "sampling.num_steps=2")
    try:
        assert trainer.optim.scaler is not None  # its gradients pass fp16 activations (see test_lora_optimizer)
    finally:
        trainer.cleanup()
    fp32 = _trainer(tmp_path / "b", "sampling.num_steps=2")
    assert fp32.optim.scaler is None
    fp32.cleanup()


def _ema_apart(trainer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Give the live LoRA weights and the EMA shadow different values; returns (live, shadow) copies."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.ema.params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    trainer.ema.shadow = [torch.randn(s.shape, generator=g) * 0.1 for s in trainer.ema.shadow]
    return [p.detach().clone() for p in trainer.ema.params], [s.clone() for s in trainer.ema.shadow]


def _matches(params, values) -> bool:
    return all(torch.equal(p.detach().float(), v.float()) for p, v in zip(params, values))


def test_with_ema_the_in_training_eval_and_the_heldout_report_score_the_averaged_weights(tmp_path, monkeypatch):
    """Both promise the EMA weights (report.md says "the EMA of the LoRA"); no test looked at which weights they ran."""
    trainer = _trainer(tmp_path, "train.ema=true", "train.eval_prompts=assets/prompts/shapes_heldout.jsonl", "train.final_eval_samples=320")
    try:
        live, shadow = _ema_apart(trainer)
        seen = {}

        def fake_sample_ode(adapter, prompts, **kwargs):
            seen["eval"] = _matches(trainer.ema.params, shadow)
            return torch.zeros(len(prompts), 3, 32, 32)

        monkeypatch.setattr("flowalign.sampling.sample_ode", fake_sample_ode)
        trainer.evaluate(tag="check")
        assert seen["eval"] and _matches(trainer.ema.params, live)  # the live weights are back afterwards

        def fake_report(run_dir, adapter, records, reward, aligned_context=None, base_context=None, **kwargs):
            with aligned_context():
                seen["aligned"] = _matches(trainer.ema.params, shadow)
            seen["after"] = _matches(trainer.ema.params, live)
            return run_dir / "report.md"

        monkeypatch.setattr("flowalign.report.heldout_report", fake_report)
        trainer.heldout_report()
        assert seen["aligned"] and seen["after"]
    finally:
        trainer.cleanup()


def test_group_noise_streams_differ_by_seed_iteration_and_group_and_from_the_forward_streams():
    """sampling.noise_seeding: group was only checked as 1 process == 2 processes, which a stream that ignored the
    iteration or the group (the same noise for every group, every iteration) would also pass."""
    from flowalign.train.runtime import forward_generator, group_generator, iteration_generator

    def draw(gen):
        return torch.randn(8, generator=gen)

    keys = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 1, 1)]
    draws = [draw(group_generator(*k)) for k in keys] + [draw(forward_generator(*k)) for k in keys] + [draw(iteration_generator(0, 0))]
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1:])
    assert torch.equal(draw(group_generator(0, 1, 1)), draws[4])  # and each stream is reproducible


def test_pace_gives_seconds_per_iteration_and_the_time_left():
    from flowalign.train.trainer import pace

    assert pace(61.0, 10, 48) == "6.1 s/it, ETA 4.9 min"  # 6.1 s x 48 = 292.8 s
    assert pace(3600.0, 4, 4500) == "900.0 s/it, ETA 1125.00 h"
    assert pace(12.0, 4, 0) == "3.0 s/it, ETA 0.0 s"
    assert pace(5.0, 0, 10) == ""


def test_each_iteration_line_tells_the_pace_and_eta(tmp_path, caplog):
    trainer = _trainer(tmp_path, "train.iterations=2")
    try:
        with caplog.at_level(logging.INFO, logger="flowalign.train.trainer"):
            trainer.train()
    finally:
        trainer.cleanup()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iteration ")]
    assert len(lines) == 2 and all(re.search(r", \d+\.\d s/it, ETA \d+\.\d+ (s|min|h)$", line) for line in lines), lines
    assert lines[-1].endswith("ETA 0.0 s")


def _report_run_that_dies(tmp_path, monkeypatch, at_batch: int):
    """``(run folder, overrides, scored batches)`` of a tiny run whose held-out report (8 samples of 4 tagged prompts,
    batches of 2) dies when it would score its ``at_batch``-th batch, until ``FLOWALIGN_TEST_KILL_AT`` is unset."""
    import json

    from flowalign import evaluation

    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "tag": t}) + "\n" for p, t in
                               [("a white square", "bright"), ("a yellow star", "bright"), ("a black circle", "dark"), ("a blue night", "dark")]))
    args = (f"train.prompts={prompts}", f"train.eval_prompts={prompts}", "train.final_eval_samples=8",
            "rewards=[{name: test_tag_brightness}, {name: brightness, weight: 0.1}]", "train.prompts_per_iter=2", "train.micro_batch_size=8",
            "sampling.micro_batch_size=2", "sampling.num_steps=3", "sampling.eval_num_steps=3", "lora.rank=2", "train.checkpoint_every=1")
    real, scored = evaluation._score_batch, []

    def dying(adapter, reward, rows, *a, **k):
        if len(scored) == int(os.environ.get("FLOWALIGN_TEST_KILL_AT", "-1")):
            raise _Killed()
        scored.append(list(rows))
        return real(adapter, reward, rows, *a, **k)

    monkeypatch.setattr(evaluation, "_score_batch", dying)
    monkeypatch.setenv("FLOWALIGN_TEST_KILL_AT", str(at_batch))
    return tmp_path / "run", args, scored


class _Killed(BaseException):  # as KeyboardInterrupt: nothing in the library reports it as a reward failure
    pass


def test_a_run_killed_in_its_heldout_report_resumes_the_report_from_the_scored_batches(tmp_path, monkeypatch):
    """The report's base and aligned evaluations journal every batch under run_dir/report_partial: the resumed run
    samples only the aligned batches it had not scored, writes the report, and removes the journals. The aligned
    journal's key names the LoRA weights, the base one's does not."""
    import json

    from flowalign.train import final_outputs

    run, args, scored = _report_run_that_dies(tmp_path, monkeypatch, at_batch=6)  # base: 4 batches of 2; aligned: dies on its 3rd
    args = ("train.iterations=1", *args)
    trainer = Trainer(_config(run, *args))
    trainer.setup()
    with pytest.raises(_Killed):
        trainer.train()
    trainer.cleanup()
    assert not (run / "report.md").exists()
    assert len(list((run / "report_partial" / "base").glob("*.safetensors"))) == 4
    assert len(list((run / "report_partial" / "aligned").glob("*.safetensors"))) == 2
    base_key, aligned_key = (j.key for j in final_outputs.report_journals(trainer, "test_tag_brightness"))
    assert aligned_key.pop("lora_sha256") and base_key == aligned_key
    monkeypatch.delenv("FLOWALIGN_TEST_KILL_AT")
    scored.clear()
    resumed = Trainer(_config(run, *args), resume=True)
    resumed.setup()
    resumed.train()
    resumed.cleanup()
    assert scored == [[4, 5], [6, 7]]  # the aligned batches the killed run had not scored
    assert json.loads((run / "eval_base.json").read_text())["settings"]["resumed_samples"] == 8
    assert json.loads((run / "eval_aligned.json").read_text())["settings"]["resumed_samples"] == 4
    assert (run / "report.md").is_file() and not (run / "report_partial").exists()
    # weights trained further are another aligned model: its journal key differs, the base one's does not
    again = Trainer(_config(tmp_path / "other", *args))
    again.setup()
    before = [j.key for j in final_outputs.report_journals(again, "test_tag_brightness")]
    for p in again.lora_modules["transformer"].parameters():
        if p.requires_grad:
            p.data.add_(0.01)
    after = [j.key for j in final_outputs.report_journals(again, "test_tag_brightness")]
    again.cleanup()
    assert before[0] == after[0] == base_key and before[1]["lora_sha256"] != after[1]["lora_sha256"]


def test_the_batch_keeps_one_encoding_per_prompt_and_no_images(tmp_path):
    """A group's samples share their prompt's encoding: the batch held it group_size times (5.9 GiB for SD3.5-M at
    1,152 samples on one GPU) and every sample's fp32 image through the update. Each sample's row must still be
    its own prompt's encoding, as a fresh encode of the prompts gives it."""
    trainer = _trainer(tmp_path, "sampling.group_size=4", "train.prompts_per_iter=3", "train.micro_batch_size=6", "sampling.guidance_scale=3.0",
                       "objective.cfg_in_training=true")
    try:
        seen = {}
        real_update = trainer.update
        trainer.update = lambda batch: seen.setdefault("images", batch.traj.images) or real_update(batch)
        trainer.run_iteration()
        assert "images" in seen and seen["images"] is None  # dropped before the update
        batch = trainer.collect()
        assert batch.traj.batch_size == 12 and batch.traj.images.shape[0] == 12  # collect itself keeps them for its caller
        assert batch.cond.batch_size == 3
        fresh = trainer.adapter.encode(batch.traj.prompts, do_classifier_free_guidance=trainer.config.sampling.guidance_scale > 1.0)
        index = torch.tensor([11, 0, 5, 6, 3])
        rows = batch.cond_rows(index)
        for part in ("cond", "uncond"):
            got, want = getattr(rows, part), getattr(fresh, part)
            assert got is not None and want is not None  # CFG in training: the negative prompt rows too
            for k in want or {}:
                assert torch.allclose(got[k], want[k][index], atol=1e-5), (part, k)
        assert len({batch.traj.prompts[i] for i in range(12)}) == 3
        trainer.update(batch)  # the update runs on it
    finally:
        trainer.cleanup()


def test_keep_eval_grids_keeps_the_first_and_the_last_k(tmp_path):
    from flowalign.train.trainer import prune_eval_grids

    for i in (20, 40, 60, 80, 100):
        (tmp_path / f"iter_{i:06d}.png").write_bytes(b"png")
    (tmp_path / "final.png").write_bytes(b"png")
    assert [p.name for p in prune_eval_grids(tmp_path, 0)] == []  # 0 keeps every one
    assert [p.name for p in prune_eval_grids(tmp_path, 2)] == ["iter_000040.png", "iter_000060.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.png", "iter_000020.png", "iter_000080.png", "iter_000100.png"]
    assert prune_eval_grids(tmp_path, 5) == []  # fewer than the first + 5
    with pytest.raises(ConfigError, match="keep_eval_grids must be >= 0"):
        _config(tmp_path, "train.keep_eval_grids=-1")


def test_a_run_prunes_its_eval_grids_as_it_goes(tmp_path):
    trainer = _trainer(tmp_path, "train.iterations=4", "train.eval_every=1", "train.keep_eval_grids=1", "train.prompts_per_iter=2",
                       "train.micro_batch_size=8", "sampling.num_steps=2", "sampling.eval_num_steps=2")
    trainer.train()
    trainer.cleanup()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["final.png", "iter_000001.png", "iter_000004.png"]


def test_a_run_killed_in_its_report_then_extended_discards_the_aligned_journal_and_keeps_the_base_one(tmp_path, monkeypatch, caplog):
    """The trainer has no --restart: a report journal under another key (an extended run's weights) is discarded with
    a warning and sampled again, where it stopped the run at its very end. A memory knob (model.t5_cache_size) is not
    in the key."""
    import json
    import logging

    from flowalign.train import final_outputs

    run, args, scored = _report_run_that_dies(tmp_path, monkeypatch, at_batch=6)
    trainer = Trainer(_config(run, "train.iterations=1", *args))
    trainer.setup()
    with pytest.raises(_Killed):
        trainer.train()
    trainer.cleanup()
    keys = [j.key for j in final_outputs.report_journals(trainer, "test_tag_brightness")]
    monkeypatch.delenv("FLOWALIGN_TEST_KILL_AT")
    scored.clear()
    extended = Trainer(_config(run, "train.iterations=2", "model.t5_cache_size=8", *args), resume=True)
    extended.setup()
    with caplog.at_level(logging.WARNING, logger="flowalign.eval_journal"):
        extended.train()
    after = [j.key for j in final_outputs.report_journals(extended, "test_tag_brightness")]
    extended.cleanup()
    assert after[0] == keys[0] and after[1]["lora_sha256"] != keys[1]["lora_sha256"]
    assert "holds a partial evaluation with other settings (lora_sha256" in caplog.text and "discarded" in caplog.text
    assert json.loads((run / "eval_base.json").read_text())["settings"]["resumed_samples"] == 8  # the base: every sample read back
    assert json.loads((run / "eval_aligned.json").read_text())["settings"]["resumed_samples"] == 0
    assert scored == [[0, 1], [2, 3], [4, 5], [6, 7]]  # the aligned evaluation, sampled again for the new weights
    assert (run / "report.md").is_file() and not (run / "report_partial").exists()


def test_the_report_journal_key_follows_what_decides_a_sample_only(tmp_path):
    """In the key: model, reward, steps, guidance, device, precision, prompts. Not: the sample count and the batch size
    (a batch is read back only for the same sample indices), memory knobs, the run length."""
    from types import SimpleNamespace

    from flowalign.train import final_outputs

    def key(*overrides):
        cfg = _config(tmp_path, *overrides)
        trainer = SimpleNamespace(config=cfg, heldout_records=[{"prompt": "a red square", "tag": "colors"}], lora_modules={}, ema=None,
                                  device="cpu", run_dir=tmp_path, accelerator=SimpleNamespace(process_index=0, num_processes=1))
        return final_outputs.report_journals(trainer, cfg.rewards[0].key)[0].key

    base = key()
    for same in ("train.final_eval_samples=64", "sampling.micro_batch_size=3", "model.t5_cache_size=8", "train.iterations=99"):
        assert key(same) == base, same
    for other in ("sampling.eval_num_steps=7", "sampling.guidance_scale=2.0", "train.mixed_precision=bf16", "model.dtype=bfloat16",
                  "rewards=[{name: color_fraction}]"):
        assert key(other) != base, other


def test_grid_pruning_after_a_resume_from_an_earlier_checkpoint_keeps_the_new_grids(tmp_path):
    """Grids of the abandoned run's later iterations sorted last, so the resumed run's new grid was deleted at once."""
    from flowalign.train.trainer import prune_eval_grids

    for i in (20, 40, 100, 140, 160, 180, 200):
        (tmp_path / f"iter_{i:06d}.png").write_bytes(b"png")
    (tmp_path / "iter_000120.png").write_bytes(b"png")  # resumed at 100, evaluated at 120
    assert [p.name for p in prune_eval_grids(tmp_path, 2, current=120)] == ["iter_000040.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000020.png", "iter_000100.png", "iter_000120.png", "iter_000140.png",
                                                         "iter_000160.png", "iter_000180.png", "iter_000200.png"]


def test_reward_batch_size_scores_in_chunks_with_the_same_scores_and_a_bar_over_samples(tmp_path):
    """rewards[].batch_size: a reward model saw each process's whole batch at once, and the "reward" bar counted rewards
    (1 of 1), not samples."""
    seen = []
    brightness = load_reward("brightness")

    def scoring(images, prompts, metadata=None):
        seen.append(len(prompts))
        return brightness(images, prompts)

    def scores(run, *overrides):
        trainer = _trainer(tmp_path / run, *overrides)
        trainer.rewards = {key: scoring for key in trainer.rewards}
        bars = _record_bars(trainer)
        seen.clear()
        batch = trainer.collect()
        trainer.cleanup()
        bar = next(bar for bar in bars if bar.desc == "reward")
        return batch.traj.rewards, list(seen), bar

    whole, calls, bar = scores("whole")
    assert calls == [16] and (bar.total, bar.n, bar.unit, bar.closed) == (16, 16, "sample", True)
    chunked, calls, bar = scores("chunked", "rewards.0.batch_size=5")
    assert calls == [5, 5, 5, 1] and (bar.total, bar.n) == (16, 16)
    assert torch.equal(chunked, whole)  # the same samples, the same scores
    from flowalign.config import config_hash

    assert config_hash(_config(tmp_path, "rewards.0.batch_size=5")) == config_hash(_config(tmp_path))  # resumes either way
    for bad in ("0", "-2", "true", "2.5"):
        with pytest.raises(ConfigError, match=r"batch_size must be (null or )?an integer"):
            _config(tmp_path, f"rewards.0.batch_size={bad}")


def test_a_shared_noise_table_is_refused_under_other_calibration_settings_and_saved_with_the_run(tmp_path):
    """dense.noise_table_file calibrated once was reused by a run asking for another calibration (other eps2, rounds),
    which then trained on the old table without a word, and kept no copy of it in its own folder."""
    import json

    table = tmp_path / "shared_table.json"
    dense = ["objective.name=dense_grpo", "dense.estimator=tweedie", "dense.calibration_samples=4", "sampling.num_steps=4",
             "train.prompts_per_iter=2", "train.micro_batch_size=8", "train.grad_accum=4", f"dense.noise_table_file={table}"]
    first = _trainer(tmp_path / "a", *dense, "dense.calibration_rounds=1")
    first.cleanup()
    levels = json.loads(table.read_text())["levels"]
    assert json.loads((tmp_path / "a" / "noise_table.json").read_text())["levels"] == levels
    with pytest.raises(ConfigError, match=r"calibrated under other settings \(rounds 1 -> 2, eps2 0.01 -> 0.3\)"):
        _trainer(tmp_path / "b", *dense, "dense.calibration_rounds=2", "dense.eps2=0.3")
    reused = _trainer(tmp_path / "c", *dense, "dense.calibration_rounds=1")  # the same settings: reused, and kept with the run
    reused.cleanup()
    assert json.loads((tmp_path / "c" / "noise_table.json").read_text())["levels"] == levels
    assert reused.schedule.levels(4).tolist() == pytest.approx(levels)


def test_setup_warns_of_settings_without_effect(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="flowalign.train.trainer"):
        _trainer(tmp_path, "dense.credit=min").cleanup()
    assert "set but without effect: dense.credit: objective 'grpo' trains on outcome advantages" in caplog.text


def test_a_noise_schedule_of_the_users_drives_the_rollouts(tmp_path, monkeypatch):
    import sys
    import uuid

    name = f"fa_sched_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import torch\n\n\nclass FirstSteps:\n    def __init__(self, a, size):\n        self.a, self.size = a, size\n\n"
        "    def levels(self, num_steps, iteration=0, generator=None):\n"
        "        out = torch.zeros(num_steps)\n        out[:self.size] = self.a\n        return out\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        trainer = _trainer(tmp_path / "run", f"sampling.noise_schedule={name}:FirstSteps", "sampling.noise_kwargs={a: 0.7, size: 2}")
        batch = trainer.collect()
        trainer.cleanup()
        assert batch.traj.stochastic_mask.tolist() == [True, True, False, False, False, False]
    finally:
        sys.modules.pop(name, None)


def test_train_before_setup_says_so(tmp_path):
    """`Trainer(config, adapter=...)` then `.train()`, as the README's adapter line reads, failed with an AttributeError
    on 'sampler'."""
    with pytest.raises(RuntimeError, match=r"train\(\) before setup\(\): call trainer.setup\(\), then train\(\), then cleanup\(\)"):
        Trainer(_config(tmp_path)).train()
    assert not (tmp_path / "config.yaml").exists()


def test_setup_validates_a_config_edited_after_it_was_built(tmp_path):
    """A FlowalignConfig is checked when built; edits afterwards (cfg.objective.name = "gdro", a negative lr) reached the
    first update and failed there ('StepBatch' object has no attribute 'x0', torch's Invalid learning rate)."""
    from flowalign.config import load_config
    from flowalign.errors import ConfigError
    from flowalign.train.trainer import Trainer
    from tests.tiny_run import TINY_RECIPE

    for field, value, message in (("objective.name", "gdro", "gdro"), ("train.lr", -1.0, "train.lr")):
        cfg = load_config(TINY_RECIPE, [f"train.output_dir={tmp_path / field}"])
        section, key = field.split(".")
        setattr(getattr(cfg, section), key, value)
        with pytest.raises(ConfigError, match=message):
            Trainer(cfg).setup()
        assert not (tmp_path / field).exists()  # refused before anything is written
