"""What the online trainer logs means what its name says: checked against independent computations.

* ``reward/group_std_mean`` against a per-group loop in plain Python;
* micro-batch metrics are means over rows (a short last chunk counts for its rows, not as a whole chunk);
* the diagnostic ``kl/ref`` averages every trained step, as the objective's KL term does;
* optimizer counters: skipped micro-batches, the cumulative step, no ``grad_norm`` without a step;
* the final evaluation is logged once, into the last row of ``metrics.csv``;
* a resumed run's train time includes the sessions before it.
"""
from __future__ import annotations

import csv
import math
import statistics

import pytest
import torch

from flowalign.advantages import mean_group_std
from flowalign.config import load_config
from flowalign.train.trainer import Trainer

TINY = ["model.pretrained=tiny-sd3", "sampling.num_steps=3", "sampling.eval_num_steps=2", "sampling.guidance_scale=1.0",
        "sampling.group_size=2", "train.prompts_per_iter=3", "lora.rank=2", "lora.alpha=4", "objective.kl_beta=0.0",
        "rewards=[{name: brightness}]", "train.progress=false", "train.log_with=[]", "train.eval_every=-1",
        "train.final_eval_samples=0"]


def _by_hand_group_std(rewards: list[float], groups: list[int]) -> float:
    stds = []
    for g in dict.fromkeys(groups):
        kept = [r for r, h in zip(rewards, groups) if h == g and not math.isnan(r)]
        if kept:
            stds.append(statistics.pstdev(kept))
    return sum(stds) / len(stds) if stds else math.nan


def test_mean_group_std_hand_worked():
    # group 7: {1, 3} -> std 1; group 2: {0, 0, 6} -> mean 2, var (4 + 4 + 16) / 3 = 8; group 5: {4, NaN} -> one kept, 0
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 6.0, 4.0, float("nan")])
    groups = torch.tensor([7, 7, 2, 2, 2, 5, 5])
    assert mean_group_std(rewards, groups) == pytest.approx((1.0 + 8 ** 0.5 + 0.0) / 3)
    assert math.isnan(mean_group_std(torch.tensor([float("nan")] * 2), torch.tensor([0, 0])))  # nothing kept


@pytest.mark.parametrize("seed", range(10))
def test_mean_group_std_matches_a_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 30, (1,), generator=gen))
    rewards = torch.randn(batch, generator=gen) * 3
    rewards[torch.rand(batch, generator=gen) < 0.2] = float("nan")
    groups = torch.randint(0, 6, (batch,), generator=gen)
    expected = _by_hand_group_std(rewards.tolist(), groups.tolist())
    got = mean_group_std(rewards, groups)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def _trainer(tmp_path, extra=()):
    return Trainer(load_config(None, [*TINY, f"train.output_dir={tmp_path / 'run'}", *extra])).setup()


def test_micro_batch_metrics_are_row_weighted_and_the_diagnostic_kl_covers_every_trained_step(tmp_path, monkeypatch):
    """6 samples in micro-batches of 4: chunks of 4 and 2 rows at each of 3 trained steps. A metric equal to the
    chunk's row count averages to (4·4 + 2·2) / 6 = 20/6 over rows (the unweighted mean of chunks would be 3); the
    diagnostic kl/ref is the row-weighted mean over the first chunk's rows at all 3 steps (it read step 0 alone)."""
    trainer = _trainer(tmp_path, ["train.micro_batch_size=4", "train.grad_accum=6", "train.ref_kl_every=1"])
    try:
        batch = trainer.collect()
        batch.keep[:] = True  # every sample trains (a flat group would drop two and change the chunking)
        steps = trainer._trained_steps(batch.traj)
        assert len(steps) == 3
        seen_kl = []

        def fake_reference_kl(batch, index, k):
            seen_kl.append((index.numel(), k))
            return 10.0 ** k  # a different value per step: 1, 10, 100

        def fake_micro_step(batch, index, k, scale):
            return {"rows": float(index.numel())}

        monkeypatch.setattr(trainer, "_reference_kl", fake_reference_kl)
        monkeypatch.setattr(trainer, "_micro_step", fake_micro_step)
        metrics = trainer.update(batch)
        assert metrics["rows"] == pytest.approx((4 * 4 + 2 * 2) / 6)
        assert sorted(k for _, k in seen_kl) == steps and {n for n, _ in seen_kl} == {4}
        assert metrics["kl/ref"] == pytest.approx(sum(10.0 ** k for k in steps) / 3)
        assert "grad_norm" not in metrics and metrics["optim/steps"] == 0.0  # no loss, no step: no 0.0 norm either
    finally:
        trainer.cleanup()


def test_optimizer_counts_skipped_micro_batches_and_the_cumulative_step(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, ["train.micro_batch_size=6", "train.grad_accum=1", "train.max_nonfinite_steps=10"])
    try:
        real_loss = trainer.objective.loss
        calls = []

        def nan_on_second(rows, policy, reference=None):
            loss, metrics = real_loss(rows, policy, reference)
            calls.append(1)
            return (loss * float("nan"), metrics) if len(calls) == 2 else (loss, metrics)

        monkeypatch.setattr(trainer.objective, "loss", nan_on_second)
        batch = trainer.collect()
        first = trainer.update(batch)
        planned = len(trainer._plan(batch))  # one step per micro-batch (grad_accum 1)
        assert first["optim/skipped_microbatches"] == 1.0
        assert first["optim/steps"] == planned - 1 == first["optim/global_step"]
        assert first["grad_norm"] > 0
        second = trainer.update(trainer.collect())
        assert second["optim/skipped_microbatches"] == 0.0  # counted per update
        assert second["optim/global_step"] == first["optim/global_step"] + second["optim/steps"]
    finally:
        trainer.cleanup()


def _rows(run):
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_final_eval_lands_in_the_last_row_once(tmp_path):
    """eval_every=2 over 3 iterations: the loop evaluates at 2, the final eval (after 3) is added to row 3 of
    metrics.csv (it reached TensorBoard only, and never the CSV or the reward curve); eval_every=3: the loop's
    eval at 3 is the final one, logged once to TensorBoard, and its grid is copied to samples/final.png."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for every in (2, 3):
        run = tmp_path / f"every{every}"
        trainer = Trainer(load_config(None, [*TINY, f"train.output_dir={run}", "train.iterations=3", f"train.eval_every={every}",
                                             "train.eval_num_prompts=2", "train.log_with=[tensorboard]"])).setup()
        try:
            trainer.train()
        finally:
            trainer.cleanup()
        rows = _rows(run)
        assert [r["iteration"] for r in rows] == ["1", "2", "3"]
        with_eval = [r["iteration"] for r in rows if r.get("eval/brightness/mean")]
        assert with_eval == (["2", "3"] if every == 2 else ["3"])
        assert rows[-1]["reward/mean"] != ""  # the last row kept its training metrics
        events = EventAccumulator(str(run / "logs")).Reload()
        assert [e.step for e in events.Scalars("eval/brightness/mean")] == ([2, 3] if every == 2 else [3])
        assert (run / "samples" / "final.png").is_file()
        if every == 3:
            assert (run / "samples" / "final.png").read_bytes() == (run / "samples" / "iter_000003.png").read_bytes()


def test_a_resumed_run_reports_the_train_time_of_every_session(tmp_path):
    config = [*TINY, f"train.output_dir={tmp_path / 'run'}", "train.checkpoint_every=1"]
    first = Trainer(load_config(None, [*config, "train.iterations=2"])).setup()
    try:
        first.train()
        before = first.timings["train"]
    finally:
        first.cleanup()
    resumed = Trainer(load_config(None, [*config, "train.iterations=3"]), resume=True).setup()
    try:
        # checkpointed at the loop's end, before the last checkpoint's write (which the report's figure includes)
        assert 0.5 * before <= resumed.train_seconds_before <= before
        resumed.train()
        assert resumed.timings["train"] > before  # the first session's seconds and the third iteration's
    finally:
        resumed.cleanup()


def test_update_norm_is_how_far_the_iteration_moved_the_lora(tmp_path):
    import torch

    trainer = _trainer(tmp_path)
    before = [p.detach().clone() for p in trainer.optim.params]
    metrics = trainer.run_iteration()
    moved = sum(float((p.detach() - b).square().sum()) for p, b in zip(trainer.optim.params, before)) ** 0.5
    assert metrics["optim/update_norm"] == pytest.approx(moved, rel=1e-6) and moved > 0
    assert metrics["optim/lora_norm"] == pytest.approx(sum(float(p.detach().square().sum()) for p in trainer.optim.params) ** 0.5,
                                                       rel=1e-6)
    assert torch.is_tensor(trainer.optim.params[0])


def test_noise_metrics_say_where_the_rollouts_explored():
    import torch

    from flowalign.train.trainer import noise_metrics

    levels = torch.tensor([0.0, 0.7, 0.9, 0.0, 0.5])
    mask = torch.tensor([False, True, True, False, False])  # the last step's level put no noise (e.g. CPS's sigma_next = 0)
    assert noise_metrics(levels, mask) == {"sampling/noisy_steps": 2.0, "sampling/first_noisy_step": 1.0,
                                           "sampling/last_noisy_step": 2.0, "sampling/noise_level_mean": pytest.approx(0.8)}
    assert noise_metrics(levels, torch.zeros(5, dtype=torch.bool))["sampling/first_noisy_step"] == -1.0


def test_a_sliding_window_shows_in_the_logged_noise_metrics(tmp_path):
    trainer = _trainer(tmp_path, ["sampling.noise_schedule=window", "sampling.noise_kwargs={a: 0.7, size: 2, mode: sliding}"])
    starts = []
    for _ in range(3):
        metrics = trainer.run_iteration()
        trainer.iteration += 1
        starts.append((metrics["sampling/first_noisy_step"], metrics["sampling/noisy_steps"]))
    assert starts == [(0.0, 2.0), (1.0, 2.0), (0.0, 2.0)]  # 3 steps: the window of 2 starts at 0 or 1, then wraps
