"""A first SIGINT / SIGTERM stops a run at the next iteration (or offline step) with a checkpoint,
and --resume then gives exactly the uninterrupted run; a second signal aborts at once
(train/graceful_stop.py, both trainers, the CLI's exit status)."""
from __future__ import annotations

import csv
import signal
import threading

import pytest
import torch

from flowalign import lora as lora_lib
from flowalign.config import load_config
from flowalign.errors import TrainingStopped
from flowalign.train import cli
from flowalign.train.graceful_stop import GracefulStop, stop_everywhere
from flowalign.train.trainer import Trainer

FAST = [
    "sampling.num_steps=4", "sampling.guidance_scale=1.0", "sampling.group_size=4",
    "train.prompts_per_iter=2", "train.micro_batch_size=4", "train.grad_accum=3",
    "train.lr=3e-2", "lora.rank=4", "lora.alpha=8", "objective.kl_beta=0.0", "train.iterations=4",
    "train.progress=false", "train.log_with=[]", "train.eval_every=-1", "train.checkpoint_every=0",
]


def test_first_signal_asks_second_aborts_and_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        assert stop.signum is None
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # asked, nothing raised
        with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_launchers_sigterm_right_after_ctrl_c_is_the_same_stop(monkeypatch):
    """Ctrl-C reaches every worker of a torchrun / accelerate launch, and the launcher then SIGTERMs them: that was
    taken as a second signal, so a multi-process run aborted without its checkpoint."""
    from flowalign.train import graceful_stop

    clock = [100.0]
    monkeypatch.setattr(graceful_stop.time, "monotonic", lambda: clock[0])
    with GracefulStop() as stop:
        signal.raise_signal(signal.SIGINT)
        clock[0] += 1.0
        signal.raise_signal(signal.SIGTERM)  # the launcher's, a second later: ignored
        assert stop.signum == signal.SIGINT
        clock[0] += graceful_stop.LAUNCHER_FORWARD_SECONDS
        with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):  # much later: a real second signal
            signal.raise_signal(signal.SIGTERM)
    with GracefulStop() as stop:
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):  # Ctrl-C twice, however fast: abort
            signal.raise_signal(signal.SIGINT)


def test_outside_the_main_thread_nothing_is_installed():
    seen = []
    thread = threading.Thread(target=lambda: seen.append(GracefulStop().__enter__()._previous))
    thread.start()
    thread.join()
    assert seen == [{}]


def test_stop_everywhere_takes_any_process_flag():
    assert stop_everywhere(None, lambda t: t) is None
    assert stop_everywhere(signal.SIGINT, lambda t: t) == signal.SIGINT
    # 3 processes, the second got SIGTERM: every process sees it
    assert stop_everywhere(None, lambda t: torch.tensor([0, int(signal.SIGTERM), 0])) == signal.SIGTERM
    assert TrainingStopped("x", 2, int(signal.SIGINT)).exit_status == 130


def _signal_during(trainer, iteration_index: int, signum=signal.SIGINT):
    """Send ``signum`` to this process in the middle of the trainer's iteration ``iteration_index`` (0-based)."""
    real = trainer.run_iteration

    def run_iteration():
        if trainer.iteration == iteration_index:
            signal.raise_signal(signum)  # mid-iteration: rollouts done below, the update not yet
        return real()

    trainer.run_iteration = run_iteration


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _lora(trainer):
    return lora_lib.get_lora_state_dict(trainer.adapter.trainable_module)


def test_online_stop_checkpoints_the_iteration_and_resume_equals_the_uninterrupted_run(tmp_path):
    full = Trainer(load_config(None, FAST + [f"train.output_dir={tmp_path / 'full'}"])).setup()
    full.train()
    full.cleanup()

    config = load_config(None, FAST + [f"train.output_dir={tmp_path / 'run'}"])
    stopped = Trainer(config).setup()
    _signal_during(stopped, 1)
    handler = signal.getsignal(signal.SIGINT)  # pytest's (SIG_IGN in an xdist worker)
    with pytest.raises(TrainingStopped, match=r"stopped by SIGINT after iteration 2 of 4; checkpoint .*iter_000002; continue with flowalign train --resume .*run$") as info:
        stopped.train()
    stopped.cleanup()
    assert (info.value.step, info.value.signum, info.value.checkpoint.name) == (2, signal.SIGINT, "iter_000002")
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()  # an unfinished run writes no final outputs
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back

    resumed = Trainer(config, resume=True).setup()
    assert resumed.iteration == 2
    resumed.train()
    resumed.cleanup()
    a, b = _lora(full), _lora(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a) and any(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    for name in ("pytorch_lora_weights.safetensors", "checkpoints/iter_000004/pytorch_lora_weights.safetensors",
                 "checkpoints/iter_000004/lora.safetensors"):  # byte for byte too: canonical safetensors headers
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "run" / name).read_bytes(), name
    runs = {name: _rows(tmp_path / name / "metrics.csv") for name in ("full", "run")}
    assert [r["iteration"] for r in runs["run"]] == ["1", "2", "3", "4"]  # each iteration once, across the stop
    assert [r["reward/mean"] for r in runs["run"]] == [r["reward/mean"] for r in runs["full"]]  # the same rollouts


def test_a_stop_in_the_last_iteration_skips_the_final_outputs_until_resume(tmp_path):
    """A signal during the last iteration was accepted, then ignored: the run went on to the final evaluation (512
    samples by default) with the signal handlers already restored. It now stops there too; --resume writes the rest."""
    config = load_config(None, FAST + [f"train.output_dir={tmp_path / 'run'}"])
    stopped = Trainer(config).setup()
    _signal_during(stopped, 3)
    with pytest.raises(TrainingStopped, match=r"after iteration 4 of 4; checkpoint .*iter_000004"):
        stopped.train()
    stopped.cleanup()
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()
    resumed = Trainer(config, resume=True).setup()
    assert resumed.iteration == 4
    resumed.train()
    resumed.cleanup()
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert all(torch.equal(v, _lora(stopped)[k]) for k, v in _lora(resumed).items())


def test_cli_exits_with_130_and_one_line(tmp_path, capsys, monkeypatch):
    real = Trainer.run_iteration

    def run_iteration(self):
        if self.iteration == 0:
            signal.raise_signal(signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(Trainer, "run_iteration", run_iteration)
    overrides = [a for item in FAST + [f"train.output_dir={tmp_path / 'run'}"] for a in ("--set", item)]
    assert cli.main(["train", *overrides]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flowalign train: stopped by SIGTERM after iteration 1 of 4; checkpoint ")
    assert err[-1].endswith(f"continue with flowalign train --resume {tmp_path / 'run'}")  # a bare --resume reads the default folder
    assert (tmp_path / "run" / "checkpoints" / "iter_000001").is_dir()


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_second_signal_exits_with_its_own_status_and_one_line(tmp_path, monkeypatch, capsys, signum, status):
    """Two SIGTERMs used to end with exit 130 and a KeyboardInterrupt traceback; the README promises 143."""
    from flowalign.train import cli
    from flowalign.train.trainer import Trainer

    def abort(self):
        with GracefulStop() as stop:
            signal.raise_signal(signum)
            signal.raise_signal(signum)  # the second one aborts
        return stop

    monkeypatch.setattr(Trainer, "train", abort)
    args = ["train"] + [x for item in FAST + [f"train.output_dir={tmp_path / 'run'}"] for x in ("--set", item)]
    assert cli.main(args) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"flowalign train: second {signal.Signals(signum).name}: aborting")
