"""Two CPU processes (torchrun, gloo) against one: same LoRA, files from the main process only, clean exit.

``sampling.noise_seeding: group`` draws each group's noise from its own stream, so the two runs
sample the same trajectories; one optimizer step per iteration (grad_accum covers every
micro-batch) makes the update the mean over the same rows. What differs is only float rounding:
the two processes' gradients are summed by gloo instead of accumulated in one process, and the
transformer sees batches of a different size (its matmuls sum in a batch-size-dependent order).
The gradient norms agree to ~1e-7 relative; AdamW's first steps, ``g / (sqrt(v) + eps)``, turn
rounding differences of near-zero gradient entries into single-weight differences of up to ~1.2e-3
(measured with the text encoders' LoRA; the largest lora_B weight is ~6e-2), so the LoRAs are compared
per component by relative Frobenius norm, which those few entries barely move (measured <= 1.1e-4),
while training on half the prompts (what a process without the gradient all-reduce sees) moves it by
0.09-0.13 (measured; the shared gaussian lora_A init is in the norm).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowalign import checkpoint as ckpt
from flowalign.train import cli

TINY_RECIPE = Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_grpo.yaml"  # fast recipe (the default is the toy main job)
TORCHRUN = Path(sys.executable).with_name("torchrun")
SETTINGS = ["sampling.num_steps=2", "sampling.guidance_scale=1.0", "sampling.group_size=2", "sampling.noise_seeding=group",
            "train.prompts_per_iter=4", "train.micro_batch_size=2", "train.grad_accum=8", "train.iterations=2",
            "train.lr=3e-2", "lora.rank=2", "lora.alpha=4", "objective.kl_beta=0.04", "train.eval_every=-1",
            "train.log_with=[]", "train.progress=false", "train.checkpoint_every=1", "train.keep_checkpoints=3"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")  # every launch's environment
TOLERANCE = 1e-3  # ||LoRA(2) - LoRA(1)||_F / ||LoRA(1)||_F per component after 2 AdamW steps of lr 3e-2 (measured <= 1.1e-4)


def _args(run: Path, extra: list[str]) -> list[str]:
    args = ["train", "--config", str(TINY_RECIPE)]
    for item in SETTINGS + extra + [f"train.output_dir={run}"]:
        args += ["--set", item]
    return args


def _tree(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "samples" not in p.parts)


HELDOUT = Path(__file__).resolve().parents[1] / "assets" / "prompts" / "shapes_heldout.jsonl"
# a held-out report of 7 samples (4 + 3 over two processes) on the first 5 held-out prompts, written to {tmp}/heldout.jsonl
REPORT = ["train.eval_prompts={tmp}/heldout.jsonl", "train.final_eval_samples=7", "sampling.micro_batch_size=2"]
# DAPO's sample-until-full with a reward that is flat for the 2 red demo prompts of 8: an iteration whose first window of
# 4 prompts (2 per process) holds one needs a second window, and then has 5-6 groups with a signal, of which the first 4
# in draw order train (a window's process 0 groups, then process 1's); the module is written to {tmp} (on sys.path)
# DiffusionNFT's forward-process draws are seeded per group too: a later window's groups must get their own streams
UNTIL_FULL = ["train.max_sampling_rounds=4", "rewards=[{name: 'flat_red:FlatForRed'}]",
              "objective.name=nft", "objective.kwargs={num_timesteps: 2}", "sampling.kernel=ode"]
FLAT_RED = """import torch
from flowalign.rewards.base import Reward, RewardOutput


class FlatForRed(Reward):
    def score(self, images, prompts, metadata):
        luma = images.mean(dim=(1, 2, 3))
        flat = torch.tensor(["red" in p for p in prompts])
        return RewardOutput(scores=torch.where(flat, torch.full_like(luma, 0.5), luma))
"""


CASES = {"transformer_heldout_report": REPORT, "with_text_encoders": ["lora.train_text_encoder=true"],
         "dynamic_sampling": ["train.oversample=1.5"], "global_std": ["objective.adv_std=global"],
         "guided_drift_spsa": ["sampling.drift_reward=brightness", "sampling.drift_gradient=spsa", "sampling.drift_spsa_sigma=0.5"],
         "dense_global_std": ["objective.name=dense_grpo", "objective.adv_std=global"],
         "tp_grpo_balance": ["objective.name=tp_grpo", "dense.balance=true"],
         "nft_forward_draws": ["objective.name=nft", "objective.kwargs={num_timesteps: 2}", "sampling.kernel=ode"],
         "advantage_mix_global_std": ["objective.reward_mix=advantage", "objective.adv_std=global",
                                      "rewards=[{name: brightness, weight: 1.0}, {name: jpeg_compressibility, weight: 0.5}]"],
         "sample_until_full": UNTIL_FULL}
# One launch runs every case but the report's, one training after another in the same two processes: each launch
# costs ~20 CPU-seconds of imports (torch, diffusers) against ~1 s of training, so ten launches made this file the
# test suite's longest. The report's case keeps a launch of its own: the real ``torchrun -m flowalign.train.cli``,
# whose clean exit (the process group released, the summary printed once) it checks.
BATCH_DRIVER = '''
import gc
import json
import os
import sys

import torch.distributed as dist

from flowalign.train import cli

destroy = dist.destroy_process_group
dist.destroy_process_group = lambda *args, **kwargs: None  # every run of this launch keeps the first run's process group
for name, args in json.loads(open(sys.argv[1]).read()):
    if os.environ["RANK"] == "0":
        print(f"=== flowalign test case {name}", flush=True)
    if cli.main(args) != 0:
        raise SystemExit(f"case {name} failed")
destroy()
gc.collect()  # as flowalign.train.runtime.release_process_group does
'''


@pytest.fixture(scope="module")
def batched_launch(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Every batched case trained by one 2-process launch: its folder and each case's stdout."""
    root = tmp_path_factory.mktemp("two_processes")
    (root / "flat_red.py").write_text(FLAT_RED)  # the launch runs in root, on its processes' sys.path
    (root / "driver.py").write_text(BATCH_DRIVER)
    cases = [[name, _args(root / name, extra)] for name, extra in CASES.items() if extra != REPORT]
    (root / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "driver.py", "cases.json"],
                          capture_output=True, text=True, env=ENV, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    parts = done.stdout.split("=== flowalign test case ")[1:]
    return root, {part.split("\n", 1)[0]: part for part in parts}


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one_process(tmp_path, monkeypatch, request, case):
    extra = CASES[case]
    report = extra == REPORT
    if report:
        (tmp_path / "heldout.jsonl").write_text("".join(HELDOUT.read_text().splitlines(keepends=True)[:5]))
        extra = [e.format(tmp=tmp_path) for e in extra]
        # -v: the per-process lines checked below are INFO, which processes other than the launching one log only with -v
        two = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "flowalign.train.cli", "-v",
                              *_args(tmp_path / "two", extra)], capture_output=True, text=True, env=ENV, timeout=240, cwd=tmp_path)
        assert two.returncode == 0, two.stderr[-3000:]
        two_dir, stdout = tmp_path / "two", two.stdout
    else:
        root, stdouts = request.getfixturevalue("batched_launch")
        two_dir, stdout = root / case, stdouts[case]
    if extra == UNTIL_FULL:  # this process needs the reward's module on its path too
        (tmp_path / "flat_red.py").write_text(FLAT_RED)
        monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(_args(tmp_path / "one", extra)) == 0

    one_lora = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    two_lora = load_file(two_dir / "pytorch_lora_weights.safetensors")
    assert one_lora.keys() == two_lora.keys()
    prefixes = {k.split(".")[0] for k in one_lora}
    assert prefixes == ({"transformer", "text_encoder", "text_encoder_2"} if "lora.train_text_encoder=true" in extra else {"transformer"})
    scale = max(float(v.abs().max()) for k, v in one_lora.items() if "lora_B" in k)
    assert scale > 1e-3  # it trained (lora_B starts at 0)
    for prefix in sorted(prefixes):
        keys = [k for k in one_lora if k.split(".")[0] == prefix]
        gap = sum(float((one_lora[k] - two_lora[k]).square().sum()) for k in keys) ** 0.5
        norm = sum(float(one_lora[k].square().sum()) for k in keys) ** 0.5
        print(f"{prefix}: ||LoRA(2 processes) - LoRA(1 process)|| / ||LoRA(1 process)|| = {gap / norm:.3g}")
        assert gap <= TOLERANCE * norm, (prefix, gap / norm)

    # only the main process wrote: the same files as the one-process run, each iteration logged once
    assert _tree(two_dir) == _tree(tmp_path / "one")
    rows = {name: list(csv.DictReader(open(folder / "metrics.csv", newline=""))) for name, folder in (("one", tmp_path / "one"), ("two", two_dir))}
    assert [r["iteration"] for r in rows["two"]] == ["1", "2"]
    if any(e.startswith("sampling.drift_reward") for e in extra):  # the guidance did steer (SPSA from each group's stream)
        assert all(float(r["drift/moved_frac"]) > 0 for r in rows["one"] + rows["two"])
    for a, b in zip(rows["one"], rows["two"]):  # same samples, and gradients of the same scale (summed, not averaged)
        # the same trajectories (iteration 1: the same zero-initialised LoRA; later: LoRAs that differ by float rounding,
        # see the docstring), up to a float32 ulp or so: a process decodes half the batch, and the VAE decoder's oneDNN
        # convolutions pick their kernels by batch size on some CPUs (AMD EPYC: rel. 1.7e-7 at iteration 1; other
        # noise or prompts would move the mean by 1e-3 or more)
        assert float(a["reward/mean"]) == pytest.approx(float(b["reward/mean"]), rel=1e-6, abs=0)
        # the same scale: a gradient averaged instead of summed over the processes is off by 2x. Not tighter than 1e-3:
        # dense objectives normalise step gains of ODE completions whose decodes round by batch size (above), and under
        # the full suite this host measured 1.2e-4 (dense_global_std, tp_grpo_balance; alone they pass at < 1e-4)
        assert abs(float(a["grad_norm"]) / float(b["grad_norm"]) - 1) < 1e-3, (a["grad_norm"], b["grad_norm"])
        assert a["nfe"] == b["nfe"] and a.get("dense/nfe") == b.get("dense/nfe")  # counts summed over the processes
        for key in ("frac_zero_std_groups", "samples/kept_frac", "advantages/abs_mean"):  # over every process's samples
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-3, abs=1e-7), key  # (dense: rewards of ODE completions)
        if extra == UNTIL_FULL:  # the same windows drawn, the same groups trained
            assert a["samples/sampling_rounds"] == b["samples/sampling_rounds"]
            assert float(a["samples/groups_trained"]) == 4.0
        for key in ("drift/moved_frac", "drift/score"):  # the guidance's stats too, where it steers
            if key in a:
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-3, abs=1e-6), key
    if report:  # the held-out report's samples were split over the processes: the same samples, scores, report
        for name in ("eval_base.json", "eval_aligned.json"):
            a, b = (json.loads((tmp_path / run / name).read_text())["samples"] for run in ("one", "two"))
            assert a["prompt"] == b["prompt"] and a["seed"] == b["seed"] == list(range(7))
            assert a["noise_fingerprint"] == b["noise_fingerprint"]
            assert b["score"] == pytest.approx(a["score"], rel=1e-5, abs=1e-6), name  # rounding (batches of other rows)
        for k, share in ((0, 4), (1, 3)):  # base and aligned: each process sampled its share
            assert two.stderr.count(f"evaluation share {k} of 2: sampled {share} of the 7 samples") == 2, two.stderr[-3000:]
        text = (tmp_path / "two" / "report.md").read_text()
        assert "7 samples" in text and text.count("| **all** | 7 |") == 1, text[:2000]
    state = ckpt.load_checkpoint(ckpt.find_latest(two_dir / "checkpoints")).state
    assert state["generators"].shape[0] == 2  # every process's shuffle stream, saved by the main process
    assert state["torch_rngs"].shape[0] == 2  # and every process's global torch RNG (LoRA dropout draws from it)
    assert not torch.equal(state["torch_rngs"][0], state["torch_rngs"][1])  # its own stream: no shared dropout masks
    assert stdout.count("done: 2 iterations") == 1  # the summary once (the main process's)
    if report:  # a clean exit: each process released its process group
        assert two.stderr.count("process group destroyed") == 2, two.stderr[-2000:]


STEP_SCRIPT = '''
import torch
from accelerate import Accelerator
from flowalign.config import TrainConfig
from flowalign.train.lora_optimizer import LoraOptimizer
from flowalign.train.runtime import release_process_group

acc = Accelerator(cpu=True)
p = torch.nn.Parameter(torch.ones(4))
opt = LoraOptimizer([{"params": [p], "lr_ratio": 1.0}], TrainConfig(lr=0.1, weight_decay=0.0, max_nonfinite_steps=10), acc, "cpu",
                    lambda t: acc.gather(t))
stats = opt.new_stats()
opt.backward((p * torch.arange(4.0)).sum(), "good")
opt.step(stats)  # a real step on every process
before = p.detach().clone()
opt.backward(p.sum() * float("nan"), "bad")  # every process's only micro-batch is non-finite: skipped
opt.step(stats)
moved_all_nan = float((p.detach() - before).abs().max())
if acc.process_index == 0:
    opt.backward((p * torch.arange(4.0)).sum(), "good")  # only process 0 has a loss: the sum is its gradient
opt.step(stats)
if acc.is_main_process:
    print(f"RESULT steps={stats['steps']} taken={opt.steps_taken} moved_all_nan={moved_all_nan} moved_one={float((p.detach() - before).abs().max())}")
release_process_group(acc)  # end_training() alone aborted at exit in 14 of 50 launches
'''


def test_release_process_group_ends_training_then_collects_reference_cycles():
    """What the step script's clean exit rests on: the process group is released, then cycles left behind are
    collected while the interpreter is whole (not during its finalization, where gloo's teardown aborted)."""
    import gc
    import weakref

    from flowalign.train.runtime import release_process_group

    class Node:
        pass

    events = []

    class FakeAccelerator:
        def end_training(self):
            events.append(("end_training", probe() is not None))

    cycle = Node()
    cycle.self = cycle
    probe = weakref.ref(cycle)
    del cycle
    gc.disable()  # no automatic collection may free the cycle before the call does
    try:
        release_process_group(FakeAccelerator())
    finally:
        gc.enable()
    assert events == [("end_training", True)] and probe() is None


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_a_step_every_process_skipped_is_skipped_everywhere(tmp_path):
    """Every micro-batch non-finite on every process: no AdamW step anywhere (it used to step on zero-filled
    gradients, moving the weights by momentum); a step where only one process has a loss still steps."""
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT)
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script)], capture_output=True, text=True,
                          env=ENV, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    fields = dict(item.split("=") for item in line.split()[1:])
    assert (fields["steps"], fields["taken"]) == ("2", "2") and float(fields["moved_all_nan"]) == 0.0
    assert float(fields["moved_one"]) > 0


CALIBRATION_SCRIPT = '''
import sys
import torch
from flowalign import dense
from flowalign.config import load_config
from flowalign.train import dense_setup
from flowalign.train.trainer import Trainer

local, rounds = [], []
gather = dense_setup.gather_rows
def recording_gather(acc, rows):  # several processes: this process's rows
    local.append(rows.shape[0])
    return gather(acc, rows)
dense_setup.gather_rows = recording_gather
calibrate = dense.calibrate_noise
def recording_calibrate(gains_fn, *args, **kwargs):  # every process's rows, as the table sees them
    def recorded(levels):
        out = gains_fn(levels)
        rounds.append(out)
        return out
    return calibrate(recorded, *args, **kwargs)
dense.calibrate_noise = recording_calibrate

cfg = load_config(sys.argv[1], sys.argv[2:])
trainer = Trainer(cfg).setup()
acc = trainer.accelerator
levels = trainer.schedule.levels(cfg.sampling.num_steps)
every_gains = torch.cat(rounds)
total = acc.gather(every_gains.sum().reshape(1)).tolist()
# one file per process: two processes printing to one pipe can interleave their lines
with open(f"result_{acc.process_index}.txt", "w") as fh:
    fh.write(f"RESULT rank={acc.process_index} local={local or [r.shape[0] for r in rounds]} gathered={[r.shape[0] for r in rounds]} "
             f"levels={[round(x, 6) for x in levels.tolist()]} gains_sum_everywhere={total}\\n")
trainer.cleanup()
'''


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_dense_calibration_splits_its_rollouts_over_the_processes_and_gets_one_processs_table(tmp_path):
    """5 calibration samples on 2 processes: process 0 rolls out 3 and process 1 2 per round (they used to roll out all 5
    each), both see all 5 rows of step gains and end with the same table, which is the one a single process
    calibrates: under noise_seeding: group each sample has its own stream (they were drawn per process, so the table
    moved with the process count: [0.69, 0.69, 0.71] on 1 and [0.71, 0.69, 0.67] on 2 in an audit's case)."""
    script = tmp_path / "calibrate.py"
    script.write_text(CALIBRATION_SCRIPT)
    settings = SETTINGS + ["objective.name=dense_grpo", "dense.estimator=tweedie", "dense.calibration_rounds=3",
                           "dense.calibration_samples=5", "dense.eps1=1", "sampling.num_steps=3"]
    fields = {}
    for world in (2, 1):
        where = tmp_path / f"world{world}"
        where.mkdir()
        launch = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2"] if world == 2 else [sys.executable]
        done = subprocess.run([*launch, str(script), str(TINY_RECIPE), *settings, f"train.output_dir={where / 'run'}"],
                              capture_output=True, text=True, env=ENV, timeout=240, cwd=where)
        assert done.returncode == 0, done.stderr[-3000:]
        results = [(where / f"result_{rank}.txt").read_text().strip() for rank in range(world)]
        fields[world] = [dict(item.split("=", 1) for item in line.split(" ", 1)[1].replace(", ", ",").split()) for line in results]
    two, one = fields[2], fields[1][0]
    assert two[0]["local"] == "[3,3,3]" and two[1]["local"] == "[2,2,2]" and one["local"] == "[5,5,5]"
    assert two[0]["gathered"] == two[1]["gathered"] == one["gathered"] == "[5,5,5]"
    assert two[0]["levels"] == two[1]["levels"] == one["levels"]
    assert len(set(one["levels"].strip("[]").split(","))) > 1  # eps1=1 moved the steps apart: the table says something
    sums = two[0]["gains_sum_everywhere"].strip("[]").split(",")
    assert sums[0] == sums[1]  # the gathered gains are the same rows on both processes
    assert abs(float(sums[0]) - float(one["gains_sum_everywhere"].strip("[]"))) < 1e-5  # and the one process's rows


FAILING_REWARD = '''
import os
import torch

calls = 0

def fails_on_rank_1(images, prompts, metadata):
    """Mean brightness, except that process 1's second call raises (a reward service dropping out mid-run)."""
    global calls
    calls += 1
    if int(os.environ.get("RANK", "0")) == 1 and calls == 2:
        raise RuntimeError("reward service down on rank 1")
    return images.mean(dim=(1, 2, 3))
'''


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_one_process_failing_mid_run_stops_the_whole_launch(tmp_path):
    """Process 1's reward raises in iteration 2 while process 0 goes on to the gather of the rewards: the launch
    ends (non-zero, naming the error) instead of leaving process 0 waiting in the collective until gloo's
    30-minute timeout; torchrun stops the surviving process once one fails."""
    (tmp_path / "rank_reward.py").write_text(FAILING_REWARD)
    env = dict(ENV, PYTHONPATH=str(tmp_path))
    args = _args(tmp_path / "run", ["train.iterations=3", 'rewards=[{name: "rank_reward:fails_on_rank_1", weight: 1.0}]'])
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "flowalign.train.cli", *args],
                          capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)
    assert done.returncode != 0
    assert "reward service down on rank 1" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()  # no result from a failed run
    assert ckpt.find_latest(tmp_path / "run" / "checkpoints") is not None  # iteration 1's checkpoint survives for --resume


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_a_launch_into_a_locked_run_folder_stops_every_process(tmp_path):
    """Another run holds the folder's lock: process 0 refuses before the process group forms, and the launch ends
    (non-zero, naming the holder) instead of process 1 waiting at the first barrier."""
    from flowalign.train.run_lock import RunLock

    run = tmp_path / "run"
    holder = RunLock(run).acquire()  # this test process plays the other run
    try:
        done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "flowalign.train.cli",
                               *_args(run, []), "--overwrite"], capture_output=True, text=True, env=ENV, timeout=180, cwd=tmp_path)
    finally:
        holder.release()
    assert done.returncode != 0
    assert f"pid {os.getpid()}" in done.stderr, done.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == []  # nothing written (the lock file went with its holder)


SLOW_REPORT_SCRIPT = '''
import sys
import time
from flowalign.config import load_config
from flowalign.train import final_outputs
from flowalign.train.trainer import Trainer

save = final_outputs.save_lora_file
def slow_save(*args, **kwargs):  # the main process's final outputs take 20 s (a held-out report on one GPU takes hours)
    time.sleep(20)
    return save(*args, **kwargs)
final_outputs.save_lora_file = slow_save

trainer = Trainer(load_config(sys.argv[1], sys.argv[2:])).setup()
try:
    trainer.train()
finally:
    trainer.cleanup()
'''


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_the_other_processes_wait_for_the_main_ones_final_outputs_as_long_as_the_timeout_says(tmp_path):
    """Only the main process writes the final outputs (the LoRA file, grids, plots) while the others wait at a barrier, which
    fails after the process group's timeout (torch's NCCL default: 10 minutes, shorter than a GenEval-sized report).
    train.process_group_timeout_min reaches the process group: 3 s fails at that barrier against 20 s of final outputs (8 s was not always enough on a loaded machine)
    (with gloo's own 30-minute default the run waited and succeeded). The default of 120 minutes waits like every
    other 2-process test here."""
    timeout_min = 0.05
    script = tmp_path / "slow.py"
    script.write_text(SLOW_REPORT_SCRIPT)
    settings = SETTINGS + ["train.iterations=1", f"train.process_group_timeout_min={timeout_min}", f"train.output_dir={tmp_path / 'run'}"]
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script), str(TINY_RECIPE), *settings],
                          capture_output=True, text=True, env=ENV, timeout=240, cwd=tmp_path)
    # it timed out at the end: training and its last checkpoint done, the slow LoRA file never written
    assert done.returncode != 0 and "timed out" in done.stderr.lower(), done.stderr[-3000:]
    assert "TypeError" not in done.stderr, done.stderr[-3000:]  # the slow wrapper ran (it once lagged a signature change)
    assert ckpt.find_latest(tmp_path / "run" / "checkpoints") is not None
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_flowalign_eval_splits_its_samples_over_a_launch(tmp_path):
    """``torchrun ... flowalign eval``: each process samples every other sample, the main one prints and writes the
    same eval.json as one process (to float rounding), the ``--corrected-by`` quality of every sample included."""
    (tmp_path / "heldout.jsonl").write_text("".join(HELDOUT.read_text().splitlines(keepends=True)[:5]))
    args = ["eval", "--model", "tiny-sd3", "--prompts", str(tmp_path / "heldout.jsonl"), "--reward", "brightness", "--steps", "2",
            "--guidance", "1.0", "--num-samples", "7", "--batch-size", "2", "--no-progress", "--corrected-by"]
    two = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "flowalign.train.cli", "-v", *args, "--out",
                          str(tmp_path / "two")], capture_output=True, text=True, env=ENV, timeout=240, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    for k, share in ((0, 4), (1, 3)):
        assert f"evaluation share {k} of 2: sampled {share} of the 7 samples" in two.stderr, two.stderr[-3000:]
    assert two.stdout.count("| **all** | 7 |") == 2  # the main process alone prints the tables (accuracy, corrected score)
    one, split = (json.loads((tmp_path / run / "eval.json").read_text()) for run in ("one", "two"))
    assert split["settings"]["processes"] == 2 and one["settings"]["processes"] == 1
    assert split["samples"]["prompt"] == one["samples"]["prompt"] and split["samples"]["noise_fingerprint"] == one["samples"]["noise_fingerprint"]
    assert split["samples"]["score"] == pytest.approx(one["samples"]["score"], rel=1e-5, abs=1e-6)
    quality = one["corrected"]["quality_scores"]
    assert len(quality) == 7 and len(set(quality)) > 1  # per sample, in sample order (not all alike)
    assert split["corrected"]["quality_scores"] == pytest.approx(quality, rel=1e-5, abs=1e-6)
    assert split["corrected"]["categories"]["all"]["count"] == 7


JITTER_REWARD = """import random

import numpy as np
import torch


def jittered_brightness(images, prompts, metadata):  # a reward drawing from python's and numpy's global RNGs (augmentations)
    jitter = [0.05 * np.random.rand() + 0.05 * random.random() for _ in prompts]
    return images.mean(dim=(1, 2, 3)) + torch.tensor(jitter)
"""
RESUME_DRIVER = '''
import gc
import os
import shutil
import sys

import torch.distributed as dist

from flowalign.train import cli

destroy = dist.destroy_process_group
dist.destroy_process_group = lambda *args, **kwargs: None  # the three runs share the first one's process group
full, split, args = sys.argv[1], sys.argv[2], sys.argv[3:]
assert cli.main(["train", *args, "--set", f"train.output_dir={full}"]) == 0
if os.environ["RANK"] == "0":  # the same run killed after iteration 2: its last checkpoint gone
    shutil.copytree(full, split)
    shutil.rmtree(f"{split}/checkpoints/iter_000003")
dist.barrier()
assert cli.main(["train", "--resume", f"{split}/checkpoints/iter_000002"]) == 0
destroy()
gc.collect()
'''


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_a_two_process_resume_restores_each_processs_python_and_numpy_rngs(tmp_path):
    """The checkpoint kept process 0's python / numpy RNG state and restored it on every process, so after a resume
    process 1 drew process 0's numbers: a reward drawing from them trained another LoRA (0.043 apart in an audit)."""
    (tmp_path / "jitter.py").write_text(JITTER_REWARD)
    (tmp_path / "driver.py").write_text(RESUME_DRIVER)
    args = _args(tmp_path / "unused", ["train.iterations=3", "rewards=[{name: 'jitter:jittered_brightness'}]"])[1:-2]
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "driver.py", str(tmp_path / "full"),
                           str(tmp_path / "split"), *args], capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    full = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    resumed = load_file(str(tmp_path / "split" / "pytorch_lora_weights.safetensors"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    rows = [(tmp_path / run / "metrics.csv").read_text().splitlines()[-1].split(",") for run in ("full", "split")]
    header = (tmp_path / "full" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert rows[0][header.index("reward/mean")] == rows[1][header.index("reward/mean")]
