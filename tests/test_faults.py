"""Faults and bad input, each inside the real trainer or CLI on the tiny SD3 pipeline.

Rewards that raise, return NaN or the wrong number of scores (policies raise / drop); NaN losses
through the CLI; all-equal rewards; empty or malformed prompt files; a LoRA for another
architecture; a disk that fills up while a checkpoint is written.
"""
from __future__ import annotations

import csv
import errno
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flowalign import checkpoint as ckpt
from flowalign import lora as lora_lib
from flowalign.config import load_config
from flowalign.errors import LoraMismatchError, RewardError
from flowalign.pipelines.testing import tiny_sd3_pipeline
from flowalign.rewards import register_reward
from flowalign.rewards.base import Reward, RewardOutput
from flowalign.train import cli
from flowalign.train.trainer import Trainer

TINY_RECIPE = Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_grpo.yaml"  # fast recipe (the default is the toy main job)
FAST = ["sampling.num_steps=2", "sampling.guidance_scale=1.0", "sampling.group_size=2", "train.prompts_per_iter=4",
        "train.micro_batch_size=8", "train.grad_accum=2", "lora.rank=2", "lora.alpha=4", "objective.kl_beta=0.0", "train.lr=3e-2",
        "train.progress=false", "train.log_with=[]", "train.eval_every=-1", "train.checkpoint_every=0"]


def _trainer(tmp_path, *overrides) -> Trainer:
    return Trainer(load_config(None, FAST + [f"train.output_dir={tmp_path}", *overrides])).setup()


def _sets(run, *extra) -> list[str]:
    return ["--config", str(TINY_RECIPE)] + [x for item in FAST + [f"train.output_dir={run}", *extra] for x in ("--set", item)]


def _lora(trainer) -> dict:
    return lora_lib.get_lora_state_dict(trainer.adapter.trainable_module)


def _one_line(capsys, command: str = "train") -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"flowalign {command}: error: ")
    return err


@register_reward("test_faulty")
class Faulty(Reward):
    """Brightness, except on prompts containing 'circle': ``mode`` raise -> ValueError, nan -> NaN;
    ``mode`` short -> one score too few for any batch; constant -> 0.5 for everything."""

    def __init__(self, mode: str = "raise", device=None):
        super().__init__(device)
        self.mode = mode

    def score(self, images, prompts, metadata):
        scores = images.mean(dim=(1, 2, 3)).float()
        if self.mode == "constant":
            return RewardOutput(scores=torch.full_like(scores, 0.5))
        if self.mode == "short":
            return RewardOutput(scores=scores[:-1])
        bad = torch.tensor(["circle" in p for p in prompts])
        if self.mode == "raise" and bad.any():
            raise ValueError("detector crashed")
        return RewardOutput(scores=torch.where(bad, torch.full_like(scores, float("nan")), scores))


@pytest.mark.parametrize("mode", ["raise", "nan", "short"])
def test_failing_reward_under_raise_stops_the_iteration_and_names_the_prompt(tmp_path, mode):
    trainer = _trainer(tmp_path, f"rewards=[{{name: test_faulty, kwargs: {{mode: {mode}}}, on_error: raise}}]")
    before = _lora(trainer)
    with pytest.raises(RewardError, match="test_faulty") as info:
        trainer.run_iteration()
    if mode != "short":
        assert "circle" in str(info.value)
    after = _lora(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_failing_reward_under_drop_drops_those_samples_and_trains_on_the_rest(tmp_path, mode):
    trainer = _trainer(tmp_path, f"rewards=[{{name: test_faulty, kwargs: {{mode: {mode}}}, on_error: drop}}]")
    batch = trainer.collect()
    circle = torch.tensor(["circle" in p for p in batch.traj.prompts])
    assert 0 < int(circle.sum()) < circle.numel()
    assert not batch.keep[circle].any()  # dropped samples are never trained on
    assert batch.keep[~circle].any()
    assert batch.metrics["reward/test_faulty/dropped"] == float(circle.sum())
    assert torch.isfinite(batch.advantages).all()
    metrics = trainer.update(batch)
    assert metrics["optim/steps"] == 1.0 and torch.isfinite(torch.tensor(metrics["loss/total"]))


@pytest.mark.parametrize("mix", ["reward", "advantage"])
def test_a_weight_0_reward_that_drops_samples_is_logged_and_trains_nothing_away(tmp_path, mix):
    """A weight-0 reward "counts for nothing" (README), yet its dropped samples left the update (kept_frac 0.5) and
    MultiReward's sum was NaN for them (0 * NaN). Now the run trains as it does without it, step for step."""
    from flowalign.rewards import MultiReward

    brightness = "{name: brightness, weight: 1.0}"
    alone = _trainer(tmp_path / "alone", f"rewards=[{brightness}]", f"objective.reward_mix={mix}")
    monitored = _trainer(tmp_path / "monitored", f"rewards=[{brightness}, {{name: test_faulty, kwargs: {{mode: nan}}, weight: 0.0, "
                         "on_error: drop}]", f"objective.reward_mix={mix}")
    a, b = alone.run_iteration(), monitored.run_iteration()
    assert b["reward/test_faulty/dropped"] > 0 and b["samples/kept_frac"] == a["samples/kept_frac"] == 1.0
    assert all(torch.equal(x, y) for x, y in zip(_lora(alone).values(), _lora(monitored).values()))
    combined = MultiReward.from_config([{"name": "brightness"}, {"name": "test_faulty", "kwargs": {"mode": "nan"}, "weight": 0.0,
                                        "on_error": "drop"}])
    images = torch.rand(4, 3, 8, 8)
    out = combined.score(images, ["a circle", "a square", "a circle", "a square"], [{}] * 4)
    assert torch.isfinite(out.scores).all() and torch.equal(out.scores, out.details["components"]["brightness"])


def test_reward_with_wrong_length_under_drop_drops_the_whole_batch_and_skips_the_update(tmp_path):
    trainer = _trainer(tmp_path, "rewards=[{name: test_faulty, kwargs: {mode: short}, on_error: drop}]")
    before = _lora(trainer)
    metrics = trainer.run_iteration()
    assert metrics["reward/test_faulty/dropped"] == 8.0 and metrics["samples/kept_frac"] == 0.0
    assert metrics["optim/steps"] == 0.0
    after = _lora(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_all_equal_rewards_give_zero_advantages_and_the_step_does_nothing(tmp_path):
    trainer = _trainer(tmp_path, "rewards=[{name: test_faulty, kwargs: {mode: constant}}]")
    before = [p.detach().clone() for p in trainer.params]
    metrics = trainer.run_iteration()
    assert metrics["frac_zero_std_groups"] == 1.0
    # (r - mean) / (0 + eps) is exactly 0 (no division by zero): no row has an advantage to train on
    assert metrics["samples/kept_frac"] == 0.0 and metrics["optim/steps"] == 0.0
    assert math.isnan(metrics["advantages/abs_mean"])  # a mean over no trained row, not a 0 that reads as a measurement
    assert metrics["reward/group_std_mean"] == 0.0 and "grad_norm" not in metrics  # no step, so no norm
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.params))  # no AdamW step (not even weight decay)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if not k.startswith("time/") and k != "advantages/abs_mean")


def test_nan_losses_abort_through_the_cli_with_exit_1(tmp_path, capsys, monkeypatch):
    from flowalign.objectives.grpo import FlowGRPO as GRPO

    real = GRPO.loss

    def nan_loss(self, batch, policy, reference):
        loss, metrics = real(self, batch, policy, reference)
        return loss * float("nan"), metrics

    monkeypatch.setattr(GRPO, "loss", nan_loss)
    run = tmp_path / "run"
    assert cli.main(["train", *_sets(run, "train.iterations=3", "train.max_nonfinite_steps=3")]) == 1
    err = _one_line(capsys)
    # grad_accum 2: iteration 1's two micro-batches, then the first of iteration 2 (1-based, as metrics.csv and the bar count)
    assert "3 non-finite losses/gradients in a row at iteration 2" in err and "train.max_nonfinite_steps=3" in err
    assert not (run / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("content, message", [
    ("", "no prompts"),
    ("\n   \n", "no prompts"),
    ('{"prompt": "a red square"}\n{"prompt": \n', "prompts.jsonl:2: malformed json"),
    ('{"text": "no prompt key"}\n', "prompt"),
])
def test_empty_or_malformed_prompt_file_is_one_line_exit_2(tmp_path, capsys, content, message):
    prompts = tmp_path / ("prompts.jsonl" if "{" in content else "prompts.txt")
    prompts.write_text(content)
    run = tmp_path / "run"
    assert cli.main(["train", *_sets(run, f"train.prompts={prompts}")]) == 2
    assert message in _one_line(capsys).lower()
    assert not run.exists()


def _foreign_lora(path) -> None:
    """A LoRA for another architecture (FLUX-style single blocks) plus one SD3 key of the wrong width."""
    save_file({
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4),
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 999),
    }, str(path))


def test_lora_for_another_architecture_is_refused_listing_the_keys(tmp_path, capsys):
    path = tmp_path / "flux_lora.safetensors"
    _foreign_lora(path)
    with pytest.raises(LoraMismatchError) as info:
        lora_lib.load_lora_into_pipeline(tiny_sd3_pipeline(seed=0), path)
    text = str(info.value)
    assert "2 unexpected: transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight" in text
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight [4, 999]" in text
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    assert cli.main(["eval", "--model", "tiny-sd3", "--lora", str(path), "--prompts", str(prompts), "--reward", "brightness",
                     "--num-samples", "1", "--steps", "1", "--no-progress"]) == 2
    err = _one_line(capsys, "eval")
    assert "single_transformer_blocks.0.attn.to_q.lora_A.weight" in err and "[4, 999]" in err


def test_disk_full_while_checkpointing_is_reported_and_the_previous_checkpoint_is_intact(tmp_path, capsys, monkeypatch):
    from flowalign import files

    real_write = files._write_file
    calls = {"n": 0}

    def filling_disk(path, data):
        calls["n"] += 1
        if calls["n"] == 4:  # the second checkpoint's second tensor file (lora, state | lora, *state*)
            raise OSError(28, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(files, "_write_file", filling_disk)
    run = tmp_path / "run"
    assert cli.main(["train", *_sets(run, "train.iterations=3", "train.checkpoint_every=1")]) == 1
    err = _one_line(capsys)
    assert "could not write checkpoint iter_000002" in err and "No space left on device (errno 28)" in err
    assert "the previous checkpoint iter_000001 is intact" in err
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter_000001"]  # no temp folder left
    assert ckpt.load_checkpoint(root / "iter_000001").iteration == 1
    monkeypatch.setattr(files, "_write_file", real_write)
    assert cli.main(["train", "--resume", str(run)]) == 0  # continues from it once there is room
    assert json.loads((root / "iter_000003" / "manifest.json").read_text())["iteration"] == 3


def test_full_disk_while_logging_exits_1_with_one_line_and_resumes(tmp_path, capsys, monkeypatch):
    from flowalign.train import run_log

    real_write = run_log.write_metrics_row

    def filling_disk(path, metrics, step, key="iteration"):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, metrics, step, key)

    monkeypatch.setattr(run_log, "write_metrics_row", filling_disk)
    run = tmp_path / "run"
    assert cli.main(["train", *_sets(run, "train.iterations=3", "train.checkpoint_every=1")]) == 1
    err = _one_line(capsys)
    assert "could not write step 2 to" in err and "No space left on device (errno 28)" in err and "--resume" in err
    assert [i for i, _ in ckpt.list_checkpoints(run / "checkpoints")] == [1]  # step 2 was logged before its checkpoint
    monkeypatch.setattr(run_log, "write_metrics_row", real_write)
    assert cli.main(["train", "--resume", str(run)]) == 0
    with open(run / "metrics.csv", newline="") as fh:
        assert [r["iteration"] for r in csv.DictReader(fh)] == ["1", "2", "3"]


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    """A read-only or full output folder raised a bare OSError through the CLI: a traceback and exit 1."""
    from flowalign import files

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(files, "write_text_atomic", read_only)  # config.yaml, the first file a run writes
    assert cli.main(["train", *_sets(tmp_path / "run")]) == 2
    err = _one_line(capsys)
    assert "could not read or write" in err and "config.yaml: Read-only file system (errno 30)" in err


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_again(tmp_path, capsys):
    """Killed before its first checkpoint, a run could neither be resumed ("no valid checkpoint") nor rerun ("already
    holds a run ... pass --resume"). --resume now starts it again from iteration 0."""
    run = tmp_path / "run"
    trainer = Trainer(load_config(TINY_RECIPE, FAST + [f"train.output_dir={run}"])).setup()  # writes config.yaml
    trainer.cleanup()  # ... and dies before any checkpoint
    assert (run / "config.yaml").is_file() and not (run / "checkpoints").exists()
    assert cli.main(["train", *_sets(run)]) == 2
    assert "pass --resume to continue it" in _one_line(capsys)
    assert cli.main(["train", "--resume", *_sets(run)]) == 0
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    assert cli.main(["train", "--resume", str(tmp_path / "nothing")]) == 2  # no run there at all: still refused
    assert "no such run folder" in _one_line(capsys)


def test_overwrite_and_resume_never_delete_files_a_run_did_not_write(tmp_path, capsys):
    """--overwrite removed the whole output folder once its config.yaml looked like a run's (any ML project's
    config.yaml with model: / train: sections); --resume on a folder whose only checkpoint is corrupt cleared it too."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    (project / "config.yaml").write_text("model: {arch: resnet50}\ntrain: {epochs: 90}\n")
    assert cli.main(["train", *_sets(project), "--overwrite"]) == 2
    assert "holds files a run does not write (src)" in _one_line(capsys)
    assert (project / "src" / "main.py").read_text() == "print('mine')\n"

    run = tmp_path / "run"
    assert cli.main(["train", *_sets(run)]) == 0
    (run / "my_analysis.txt").write_text("notes")
    assert cli.main(["train", *_sets(run), "--overwrite"]) == 2  # a run folder with a user's file beside it
    assert "(my_analysis.txt)" in _one_line(capsys)
    newest = ckpt.find_latest(run / "checkpoints")
    for old in ckpt.list_checkpoints(run / "checkpoints"):  # every checkpoint corrupt: nothing valid to resume
        lora_file = old[1] / "lora.safetensors"
        data = bytearray(lora_file.read_bytes())
        data[-1] ^= 0xFF
        lora_file.write_bytes(bytes(data))
    assert cli.main(["train", "--resume", *_sets(run)]) == 2
    assert "no valid checkpoint" in _one_line(capsys)
    assert newest.is_dir() and (run / "my_analysis.txt").is_file() and (run / "pytorch_lora_weights.safetensors").is_file()
    (run / "my_analysis.txt").unlink()
    (run / ".DS_Store").write_text("finder")  # what an OS drops into a browsed folder: kept, and no reason to refuse
    assert cli.main(["train", *_sets(run), "--overwrite"]) == 0  # only the run's files: replaced
    assert (run / ".DS_Store").is_file()
    (run / ".tmp_cache").mkdir()  # a user's hidden folder is not one of flowalign's temporary names
    assert cli.main(["train", *_sets(run), "--overwrite"]) == 2
    assert "(.tmp_cache)" in _one_line(capsys)
    capsys.readouterr()


def test_a_trainer_resuming_another_folder_never_clears_its_own_output(tmp_path):
    """Trainer(cfg, resume=OTHER) with OTHER a never-checkpointed run restarted by clearing cfg's output_dir: a
    finished run there lost its checkpoints and LoRA. Only the output folder itself may restart."""
    from flowalign.errors import CheckpointError

    run = tmp_path / "run"
    assert cli.main(["train", *_sets(run)]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text((run / "config.yaml").read_text())
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        Trainer(load_config(TINY_RECIPE, FAST + [f"train.output_dir={run}"]), resume=str(other)).setup()
    assert sorted(p.name for p in run.iterdir()) == before and (run / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("reward", ["{name: test_faulty, kwargs: {mode: constant}}", "{name: test_faulty, kwargs: {mode: short}, on_error: drop}"],
                         ids=["constant", "every_sample_dropped"])
def test_a_run_in_which_nothing_trains_fails_at_the_end_instead_of_passing(tmp_path, reward):
    """A constant reward, or one whose every sample is dropped in fewer iterations than max_nonfinite_steps, used to
    end with exit 0 and an untouched LoRA written as the result."""
    trainer = _trainer(tmp_path, f"rewards=[{reward}]", "train.iterations=2")
    try:
        with pytest.raises(RewardError, match="nothing trained: in all 2 iterations"):
            trainer.train()
    finally:
        trainer.cleanup()
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()


@register_reward("test_huge")
def _huge(images, prompts, metadata):
    return torch.full((len(prompts),), 3e38)


def test_a_weighted_reward_sum_that_overflows_names_the_reward(tmp_path):
    trainer = _trainer(tmp_path, "rewards=[{name: brightness, on_error: drop}, {name: test_huge, weight: 10.0}]")
    try:
        with pytest.raises(RewardError, match="overflows float32 at reward 'test_huge' \\(weight 10.0"):
            trainer.run_iteration()
    finally:
        trainer.cleanup()


@register_reward("test_flat_after_first")
class FlatAfterFirst(Reward):
    """Brightness on its first call in a process, then a constant: a verifier that saturates late in training."""

    calls = 0

    def score(self, images, prompts, metadata):
        FlatAfterFirst.calls += 1
        scores = images.mean(dim=(1, 2, 3)).float()
        return RewardOutput(scores=scores if FlatAfterFirst.calls == 1 else torch.full_like(scores, 1.0))


def test_a_resumed_session_whose_iterations_are_all_flat_still_writes_its_outputs(tmp_path):
    """The nothing-trained check is about a run's own LoRA: earlier sessions trained a resumed one."""
    first = _trainer(tmp_path, "rewards=[{name: test_flat_after_first}]", "train.iterations=1", "train.checkpoint_every=1")
    FlatAfterFirst.calls = 0
    try:
        first.train()
    finally:
        first.cleanup()
    (tmp_path / "pytorch_lora_weights.safetensors").unlink()
    resumed = Trainer(load_config(None, FAST + [f"train.output_dir={tmp_path}", "rewards=[{name: test_flat_after_first}]",
                                                "train.iterations=2", "train.checkpoint_every=1"]), resume=True).setup()
    try:
        resumed.train()  # its one iteration is flat (every group's rewards equal): no error
    finally:
        resumed.cleanup()
    assert resumed.iteration == 2 and (tmp_path / "pytorch_lora_weights.safetensors").is_file()
