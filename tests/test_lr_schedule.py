"""train.lr_schedule: the pure multiplier against hand-worked values and torch's own schedulers,
its validation, and the trainer applying it per iteration (logged as optim/lr)."""
import csv
import math

import pytest
import torch

from flowalign import config as C
from flowalign.errors import ConfigError
from flowalign.lr_schedule import lr_multiplier


def test_hand_worked_values():
    # cosine over 5 iterations: p = i / 4, (1 + cos(pi p)) / 2
    assert [lr_multiplier("cosine", i, 5) for i in range(5)] == pytest.approx([1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2, 0.0])
    # 2 warmup iterations of 6 (1/3, 2/3 of the rate: two below it), then linear from 1 to 0.1 over p = (i - 2) / 3
    assert [lr_multiplier("linear", i, 6, warmup=2, min_ratio=0.1) for i in range(6)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.7, 0.4, 0.1])
    # one warmup iteration is one at half the rate (it was (i + 1) / W = 1: no warmup at all)
    assert [lr_multiplier("constant", i, 4, warmup=1) for i in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_multiplier("cosine", 0, 1) == 1.0  # a one-iteration run is not decayed to nothing


@pytest.mark.parametrize("total, min_ratio", [(7, 0.0), (12, 0.25)])
def test_matches_torch_schedulers(total, min_ratio):
    def torch_factors(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, out = make(opt), []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    cosine = torch_factors(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total - 1, eta_min=min_ratio))
    linear = torch_factors(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=min_ratio, total_iters=total - 1))
    assert [lr_multiplier("cosine", i, total, min_ratio=min_ratio) for i in range(total)] == pytest.approx(cosine, abs=1e-9)
    assert [lr_multiplier("linear", i, total, min_ratio=min_ratio) for i in range(total)] == pytest.approx(linear, abs=1e-9)


@pytest.mark.parametrize("args, message", [
    (("step", 0, 5), "unknown lr schedule 'step'"),
    (("cosine", 5, 5), "iteration must be in [0, 5)"),
    (("cosine", 0, 5, 5), "warmup must be in [0, total=5)"),
    (("cosine", 0, 5, 0, 1.5), "min_ratio must be in [0, 1]"),
])
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        lr_multiplier(*args)


@pytest.mark.parametrize("override, message", [
    ("train.lr_schedule=step", "train.lr_schedule='step' is not one of"),
    ("train.lr_warmup=100", "train.lr_warmup must be in [0, train.iterations=100), got 100"),
    ("train.lr_min_ratio=-0.5", "train.lr_min_ratio must be in [0, 1], got -0.5"),
])
def test_config_validation(override, message):
    with pytest.raises(ConfigError) as info:
        C.load_config(None, ["train.iterations=100", override])
    assert message in str(info.value)


def test_config_hash_counts_the_horizon_of_a_decay_only():
    constant = C.load_config(None)
    assert C.config_hash(C.load_config(None, ["train.lr_schedule=constant", "train.lr_warmup=0"])) == C.config_hash(constant)
    cosine = C.load_config(None, ["train.lr_schedule=cosine"])
    assert C.config_hash(cosine) != C.config_hash(constant)
    assert C.config_hash(C.load_config(None, ["train.lr_schedule=cosine", "train.iterations=7"])) != C.config_hash(cosine)
    assert C.config_hash(C.load_config(None, ["train.iterations=7"])) == C.config_hash(constant)


def test_trainer_sets_the_scheduled_rate_each_iteration(tmp_path):
    from tests.test_trainer import _trainer

    trainer = _trainer(tmp_path, "train.iterations=3", "train.lr_schedule=cosine", "train.lr=0.02")
    trainer.train()
    with open(tmp_path / "metrics.csv", newline="") as fh:
        lrs = [float(row["optim/lr"]) for row in csv.DictReader(fh)]
    assert lrs == pytest.approx([0.02, 0.01, 0.0])  # (1 + cos(pi i / 2)) / 2 at i = 0, 1, 2
    trainer.iteration = 1  # the rate is a function of the iteration alone: what --resume relies on
    trainer.optim.set_lr(trainer.iteration)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_a_decayed_run_resumes_only_with_its_own_length(tmp_path):
    from flowalign.errors import CheckpointError
    from tests.test_trainer import _lora_after

    _lora_after(tmp_path, 2, False, "train.lr_schedule=cosine")
    with pytest.raises(CheckpointError, match="config hash"):
        _lora_after(tmp_path, 4, True, "train.lr_schedule=cosine")  # the horizon changed: the first 2 rates would differ
