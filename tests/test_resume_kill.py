"""Runs killed with SIGKILL (at random moments and inside checkpoint writes) or stopped with Ctrl-C,
and resumed with ``--resume``, end with a LoRA and a metrics curve bit-identical to an
uninterrupted run (CPU).

Every run is a ``flowalign train`` subprocess with one torch thread (the uninterrupted reference
too), so the float operations are the same. Kill points inside ``save_checkpoint`` come from its
``FLOWALIGN_CHECKPOINT_FAULT`` hook; random moments from a seeded timer after a seeded number of
logged iterations.
"""
from __future__ import annotations

import csv
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowalign import checkpoint as ckpt
from flowalign.config import load_config
from flowalign.train.trainer import Trainer

ITERATIONS = 6
SETTINGS = ["sampling.num_steps=2", "sampling.noise_schedule=constant", "sampling.noise_kwargs={a: 0.7}", "sampling.guidance_scale=1.0", "sampling.group_size=2", "train.prompts_per_iter=2",
            "train.micro_batch_size=2", "train.grad_accum=2", f"train.iterations={ITERATIONS}", "train.lr=3e-2", "lora.rank=2",
            "lora.alpha=4", "objective.kl_beta=0.04", "train.eval_every=-1", "train.log_with=[]", "train.progress=false",
            "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.ema=true",
            "train.final_eval_samples=0"]  # the toy recipe's 512-sample report (~40 s a run) is not what these tests compare
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
TIMED = ("time/", "perf/")  # wall-clock columns differ between runs


def _command(run: Path, resume: bool) -> list[str]:
    if resume:
        return [sys.executable, "-m", "flowalign.train.cli", "train", "--resume", str(run)]
    sets = [x for item in SETTINGS + [f"train.output_dir={run}"] for x in ("--set", item)]
    return [sys.executable, "-m", "flowalign.train.cli", "train", *sets]


def _run(run: Path, resume: bool, fault: str = "") -> int:
    env = dict(ENV, **({ckpt.FAULT_ENV: fault} if fault else {}))
    return subprocess.run(_command(run, resume), env=env, capture_output=True, text=True, timeout=240).returncode


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in r.items() if not k.startswith(TIMED)} for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    assert _run(run, resume=False) == 0
    return run


def _assert_same_as(reference: Path, run: Path) -> None:
    a, b = load_file(reference / "pytorch_lora_weights.safetensors"), load_file(run / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
    assert _rows(run) == _rows(reference)
    assert [p.name for p in (run / "checkpoints").iterdir()] and not list((run / "checkpoints").glob(".tmp-*"))


def test_killed_inside_checkpoint_writes_then_resumed_is_bit_identical(reference, tmp_path):
    run = tmp_path / "run"
    # one kill per run, each inside a different stage of writing the next checkpoint
    assert _run(run, resume=False, fault="after:lora.safetensors@2") == -signal.SIGKILL  # a partial temp folder
    assert [i for i, _ in ckpt.list_checkpoints(run / "checkpoints")] == [1]
    assert _run(run, resume=True, fault="before-rename@3") == -signal.SIGKILL  # complete temp folder, not renamed
    assert _run(run, resume=True, fault="after-rename@4") == -signal.SIGKILL  # renamed, older ones not pruned yet
    assert [i for i, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2, 3, 4]
    assert _run(run, resume=True) == 0
    _assert_same_as(reference, run)


def test_killed_at_random_moments_then_resumed_is_bit_identical(reference, tmp_path):
    rng = random.Random(20240521)
    run = tmp_path / "run"
    resume, kills = False, 0
    for _ in range(2):  # two kills at random moments (after a random number of logged iterations + a random delay)
        after_rows, delay = rng.randint(1, 3), rng.uniform(0.0, 0.4)
        done_before = len(_rows(run)) if (run / "metrics.csv").is_file() else 0
        proc = subprocess.Popen(_command(run, resume), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if (run / "metrics.csv").is_file() and len(_rows(run)) >= min(done_before + after_rows, ITERATIONS - 1):
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        code = proc.wait(timeout=240)
        assert code in (-signal.SIGKILL, 0)
        kills += code == -signal.SIGKILL
        resume = True
    assert kills >= 1
    assert _run(run, resume=True) == 0
    _assert_same_as(reference, run)


def test_ctrl_c_stops_at_an_iteration_then_resume_is_bit_identical(reference, tmp_path):
    """A real Ctrl-C from outside: the run finishes its iteration, checkpoints, exits 130 with one
    line, and --resume completes it bit-identically (SIGTERM: tests/test_graceful_stop.py)."""
    run, signum = tmp_path / "run", signal.SIGINT
    proc = subprocess.Popen(_command(run, False), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if (run / "metrics.csv").is_file() and len(_rows(run)) >= 1:  # training (not setup) is under way
            proc.send_signal(signum)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"flowalign train: stopped by {signal.Signals(signum).name} after iteration ") and line.endswith(f"continue with flowalign train --resume {run}")
    stopped_at = len(_rows(run))
    assert 1 <= stopped_at < ITERATIONS and ckpt.list_checkpoints(run / "checkpoints")[-1][0] == stopped_at
    assert not (run / "pytorch_lora_weights.safetensors").exists()
    assert _run(run, resume=True) == 0
    _assert_same_as(reference, run)


def test_corrupt_latest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    overrides = [*SETTINGS, f"train.output_dir={tmp_path / 'run'}", "train.keep_checkpoints=3"]

    def train(iterations: int, resume: bool = False) -> Trainer:
        trainer = Trainer(load_config(None, overrides + [f"train.iterations={iterations}"]), resume=resume)
        trainer.setup()
        trainer.train()
        trainer.cleanup()
        return trainer

    torch.set_num_threads(1)
    full = train(4)
    expected = load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert full.iteration == 4
    latest = tmp_path / "run" / "checkpoints" / "iter_000004"
    target = latest / "lora.safetensors"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])  # a partial write
    with caplog.at_level(logging.WARNING, logger="flowalign.checkpoint"):
        resumed = Trainer(load_config(None, overrides + ["train.iterations=4"]), resume=True).setup()
    assert "skipping corrupt checkpoint" in caplog.text and "iter_000004" in caplog.text
    assert resumed.iteration == 3  # the previous one
    resumed.train()
    resumed.cleanup()
    got = load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    ckpt.verify_checkpoint(latest)  # iteration 4 was written again, whole
