"""LoraOptimizer: the online trainer's optimizer step, checked on a hand-sized parameter set."""
from types import SimpleNamespace

import pytest
import torch

from flowalign.config import TrainConfig
from flowalign.errors import CheckpointError, NonFiniteLossError
from flowalign.train.lora_optimizer import LoraOptimizer


def _optim(model_dtype=None, **train):
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    cfg = TrainConfig(**{"lr": 0.1, "weight_decay": 0.0, "max_grad_norm": 0.0, "max_nonfinite_steps": 2, **train})
    accelerator = SimpleNamespace(num_processes=1)
    groups = [{"params": [a], "lr_ratio": 1.0}, {"params": [b], "lr_ratio": 0.5}]
    return LoraOptimizer(groups, cfg, accelerator, "cpu", gather=lambda t: t, model_dtype=model_dtype), a, b


def test_an_fp16_model_gets_loss_scaling_so_small_gradients_do_not_underflow():
    """model.dtype float16 trained without a GradScaler: gradients through the model's fp16 activations underflowed
    (64% of a tiny-sd3 step's entries were 0). The fp32 LoRA's gradient here passes an fp16 product of 1e-8."""
    grads = {}
    for dtype in (None, torch.float16):
        opt, a, _ = _optim(model_dtype=dtype)
        stats = opt.new_stats()
        x = torch.full((3,), 1e-4, dtype=torch.float16)  # an fp16 activation
        opt.backward((x * a.half()).float().sum() * 1e-4, "here")  # d loss / d a = 1e-8, below fp16's smallest subnormal
        opt.step(stats)
        grads[dtype] = stats["grad_norm"][0] if stats["grad_norm"] else stats.get("zero") and 0.0
    assert grads[None] == 0.0  # unscaled: underflowed to an all-zero gradient (so no step)
    assert grads[torch.float16] == pytest.approx(1e-8 * 3**0.5, rel=1e-2)


def test_a_step_that_overflows_the_weights_stops_naming_the_learning_rate():
    """A finite gradient with a huge lr made the LoRA inf; the run then failed at the next rollout as 'reward: images
    contain NaN or inf', naming neither the LoRA nor the learning rate."""
    opt, a, b = _optim(lr=3e37)  # Adam's first step moves each weight by about lr, here past fp32's largest value
    with torch.no_grad():
        a.fill_(3.3e38)
    opt.set_lr(0)
    stats = opt.new_stats()
    opt.backward(-(2 * (a - a.detach())).sum() - (3 * b).sum(), "here")  # a finite loss (0 for a) and gradient (-2)
    with pytest.raises(NonFiniteLossError, match=r"iteration 1: the LoRA weights are NaN / inf after an optimizer step .* lower "
                                                 r"train.lr or set train.max_grad_norm"):
        opt.step(stats)


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_an_all_zero_gradient_takes_no_step(precision):
    """A batch whose groups are all tied gives zero gradients; AdamW still moved the LoRA by weight decay and its old
    momentum (offline: ~80% of a real step). No signal, no step."""
    opt, a, b = _optim(weight_decay=0.1, mixed_precision=precision)
    opt.set_lr(0)
    stats = opt.new_stats()
    opt.backward((2 * a).sum() + (3 * b).sum(), "here")
    opt.step(stats)  # a real step: momentum now
    before = a.detach().clone(), b.detach().clone()
    opt.backward(0.0 * ((2 * a).sum() + (3 * b).sum()), "here")  # tied: zero gradient
    opt.step(stats)
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
    assert stats["steps"] == 1 and stats["zero"] == 1 and opt.steps_taken == 1
    opt.backward((2 * a).sum() + (3 * b).sum(), "here")  # and training goes on (the fp16 scaler too)
    opt.step(stats)
    assert stats["steps"] == 2 and not torch.equal(a.detach(), before[0])


def test_one_step_is_adamw_with_each_groups_lr_ratio():
    opt, a, b = _optim()
    opt.set_lr(0)
    stats = opt.new_stats()
    assert opt.backward((2 * a).sum() + (3 * b).sum(), "here")
    opt.step(stats)
    # Adam's first step moves every coordinate by lr * g / (|g| + eps) = lr (bias corrections cancel)
    assert torch.allclose(a.detach(), torch.full((3,), 1 - 0.1), atol=1e-6)
    assert torch.allclose(b.detach(), torch.full((2,), 1 - 0.05), atol=1e-6)
    assert stats["steps"] == 1 and stats["grad_norm"] == [pytest.approx((4 * 3 + 9 * 2) ** 0.5)]
    m = opt.metrics(stats)
    assert m["optim/lr"] == pytest.approx(0.1) and m["optim/lr_text_encoder"] == pytest.approx(0.05)
    assert a.grad is None  # zeroed after the step


def test_the_schedule_sets_the_rate_from_the_iteration_alone():
    opt, _, _ = _optim(lr_schedule="cosine", iterations=3)
    opt.set_lr(1)
    assert [g["lr"] for g in opt.optimizer.param_groups] == pytest.approx([0.05, 0.025])  # (1 + cos(pi/2)) / 2


def test_a_non_finite_loss_is_skipped_counted_and_reset_by_a_finite_one():
    opt, a, _ = _optim(max_nonfinite_steps=3)
    assert not opt.backward(a.sum() * float("nan"), "at step 0")
    assert a.grad is None and opt.nonfinite_in_row == 1
    assert opt.backward(a.sum(), "at step 0") and opt.nonfinite_in_row == 0


def test_a_non_finite_gradient_skips_the_step_and_the_limit_stops_training():
    opt, a, _ = _optim(max_nonfinite_steps=2)
    stats = opt.new_stats()
    a.grad = torch.tensor([1.0, float("inf"), 0.0])
    opt.step(stats)
    assert stats == {"steps": 0, "skipped": 1, "grad_norm": []} and torch.equal(a.detach(), torch.ones(3))
    assert a.grad is None
    a.grad = torch.tensor([float("nan"), 0.0, 0.0])
    with pytest.raises(NonFiniteLossError, match="2 non-finite"):
        opt.step(stats)


def _nan_gradient_loss(a):
    """A finite loss (0) whose gradient is NaN: d sqrt(x)/dx at 0 is inf, times 0."""
    return torch.sqrt(a.sum() * 0.0) + 0.0 * a.sum()


def test_finite_losses_with_non_finite_gradients_stop_training_at_the_limit():
    # each backward of a finite loss reset the counter, so a run of NaN gradients was skipped forever
    opt, a, _ = _optim(max_nonfinite_steps=3)
    stats = opt.new_stats()
    for _ in range(2):
        assert opt.backward(_nan_gradient_loss(a), "here")
        opt.step(stats)
    assert stats["skipped"] == 2 and opt.skipped_steps_in_row == 2
    assert opt.backward(_nan_gradient_loss(a), "here")
    with pytest.raises(NonFiniteLossError, match="3 non-finite"):
        opt.step(stats)
    # an applied step resets the count, and the count is part of the checkpoint
    opt, a, _ = _optim(max_nonfinite_steps=3)
    stats = opt.new_stats()
    for loss in (_nan_gradient_loss(a), _nan_gradient_loss(a), a.sum(), _nan_gradient_loss(a)):
        opt.backward(loss, "here")
        opt.step(stats)
    assert stats["steps"] == 1 and stats["skipped"] == 3 and opt.skipped_steps_in_row == 1
    restored, _, _ = _optim(max_nonfinite_steps=3)
    restored.load(*opt.state())
    assert restored.skipped_steps_in_row == 1


def test_fp16_overflows_count_only_once_the_loss_scale_is_below_one():
    # a healthy fp16 run overflows while the scaler halves its scale from 65536: not a failure; a real NaN keeps
    # halving it, and is counted from the first skip with the scale under 1
    opt, a, _ = _optim(max_nonfinite_steps=2, mixed_precision="fp16")
    stats = opt.new_stats()
    steps = 0
    with pytest.raises(NonFiniteLossError):
        while steps < 40:
            opt.backward(_nan_gradient_loss(a), "here")
            steps += 1
            opt.step(stats)
    assert steps == 18  # 65536 * 0.5**17 = 0.5 < 1 after the 17th skip: it counts as 1, the 18th as 2 (the limit)


def test_a_step_with_every_micro_batch_skipped_does_nothing():
    opt, a, _ = _optim()
    stats = opt.new_stats()
    opt.step(stats)
    assert stats["steps"] == 0 and torch.equal(a.detach(), torch.ones(3))


def test_state_round_trip_restores_moments_counter_and_ema():
    opt, a, b = _optim(ema=True, ema_decay=0.5)
    opt.set_lr(0)
    opt.backward((a * a).sum() + b.sum(), "")
    opt.step(opt.new_stats())
    opt.nonfinite_in_row = 1
    tensors, state = opt.state()
    assert set(tensors) == {"ema"} and state["nonfinite_in_row"] == 1
    fresh, _, _ = _optim(ema=True, ema_decay=0.5)
    fresh.load(tensors, state)
    assert fresh.nonfinite_in_row == 1
    assert torch.equal(fresh.optimizer.state_dict()["state"][0]["exp_avg"], opt.optimizer.state_dict()["state"][0]["exp_avg"])
    assert all(torch.equal(x, y) for x, y in zip(fresh.ema.shadow, opt.ema.shadow))
    with pytest.raises(CheckpointError, match="no EMA"):
        fresh.load({}, state, "ckpt")


def test_old_policy_follows_the_soft_update_schedule_and_round_trips():
    """old <- d·old + (1 - d)·θ after each update, d = min(rate·(steps - flat), max): hand-worked on one step each."""
    opt, a, b = _optim(old_policy_rate=0.25, old_policy_max=0.4, old_policy_flat=1)
    assert opt.update_old_policy() == 0.0  # 0 steps < flat: the old policy is the trained one
    opt.set_lr(0)
    for target in (1.0 - 0.1, 1.0 - 0.2):  # Adam's first steps move each coordinate by lr = 0.1
        opt.backward(a.sum() + b.sum(), "")
        opt.step(opt.new_stats())
        assert torch.allclose(a.detach(), torch.full((3,), target), atol=1e-6)
    # steps_taken = 2: d = min(0.25 * (2 - 1), 0.4) = 0.25; old a = 0.25 * 1 + 0.75 * 0.8 = 0.85
    assert opt.steps_taken == 2 and opt.update_old_policy() == pytest.approx(0.25)
    assert torch.allclose(opt.old_policy.shadow[0], torch.full((3,), 0.85), atol=1e-6)
    opt.steps_taken = 10  # d capped at 0.4: 0.4 * 0.85 + 0.6 * 0.8 = 0.82
    assert opt.update_old_policy() == pytest.approx(0.4)
    assert torch.allclose(opt.old_policy.shadow[0], torch.full((3,), 0.82), atol=1e-6)
    tensors, state = opt.state()
    assert set(tensors) == {"old_policy"} and state["steps_taken"] == 10
    fresh, _, _ = _optim(old_policy_rate=0.25, old_policy_max=0.4, old_policy_flat=1)
    fresh.load(tensors, state)
    assert fresh.steps_taken == 10 and torch.equal(fresh.old_policy.shadow[0], opt.old_policy.shadow[0])
    with pytest.raises(CheckpointError, match="no old-policy weights"):
        fresh.load({}, state, "ckpt")
    on_policy, _, _ = _optim()
    assert on_policy.old_policy is None and on_policy.update_old_policy() is None


def test_power_ema_with_gamma_zero_holds_the_mean_of_every_steps_weights():
    opt, a, b = _optim(ema=True, ema_schedule="power", ema_power=0.0)
    seen = []
    for iteration in range(4):
        opt.set_lr(iteration)
        assert opt.backward((a * torch.arange(1.0, 4.0)).sum() + b.square().sum(), "here")
        opt.step(opt.new_stats())
        seen.append(torch.cat([a.detach(), b.detach()]).clone())
    assert torch.allclose(torch.cat(opt.ema.shadow), torch.stack(seen).mean(0), atol=1e-6)
    constant, a2, b2 = _optim(ema=True, ema_decay=0.5)  # the constant schedule keeps its own recursion
    constant.set_lr(0)
    constant.backward((a2 * torch.arange(1.0, 4.0)).sum() + b2.square().sum(), "here")
    constant.step(constant.new_stats())
    assert torch.allclose(constant.ema.shadow[0], 0.5 * torch.ones(3) + 0.5 * a2.detach())


def test_warmup_ema_follows_flow_grpos_decay_every_nth_step():
    """train.ema_schedule: warmup is flow_grpo/ema.py's min((1 + step) / (10 + step), decay), stepped every ema_every
    optimizer steps; the shadow is unrolled by hand from the weights after each step."""
    from flowalign.lora import warmup_ema_decay

    assert [warmup_ema_decay(s, 0.9) for s in (0, 1, 8, 80, 500)] == pytest.approx([0.1, 2 / 11, 0.5, 0.9, 0.9])
    opt, a, b = _optim(ema=True, ema_schedule="warmup", ema_decay=0.9, ema_every=2)
    shadow = torch.cat([a.detach(), b.detach()]).clone()
    for iteration in range(6):
        opt.set_lr(iteration)
        assert opt.backward((a * torch.arange(1.0, 4.0)).sum() + b.square().sum(), "here")
        opt.step(opt.new_stats())
        if (iteration + 1) % 2 == 0:  # 0-based steps 1, 3, 5 update: decays 2/11, 4/13, 6/15
            decay = (1 + iteration) / (10 + iteration)
            shadow = decay * shadow + (1 - decay) * torch.cat([a.detach(), b.detach()])
    assert torch.allclose(torch.cat(opt.ema.shadow), shadow, atol=1e-6)
    with pytest.raises(ValueError, match="step >= 0"):
        warmup_ema_decay(-1, 0.9)


def test_power_ema_config_is_validated():
    with pytest.raises(Exception, match="train.ema_schedule"):
        TrainConfig(ema_schedule="karras")
    with pytest.raises(Exception, match="train.ema_power"):
        TrainConfig(ema_power=-1.0)


def test_an_fp16_overflow_is_not_counted_as_a_failure():
    """The scaler's normal back-off (a finite loss whose scaled gradient overflows) counted as a non-finite
    micro-batch: with max_nonfinite_steps=1 the first overflow stopped the run."""
    opt, a, _ = _optim(max_nonfinite_steps=1, mixed_precision="fp16")
    stats = opt.new_stats()
    opt.backward((a * 1e35).sum(), "here")  # finite in fp32; x 65536 overflows the gradient
    opt.step(stats)
    assert stats["skipped"] == 1 and opt.scaler.get_scale() == 32768.0
    assert opt.nonfinite_in_row == 0 and opt.skipped_steps_in_row == 0
    opt.backward(a.sum(), "here")
    opt.step(stats)
    assert stats["steps"] == 1


def test_the_loss_scale_is_part_of_the_checkpoint():
    """A resumed fp16 run restarted its GradScaler at 65536 where the interrupted one had backed off: the resumed steps
    skipped and scaled differently from an uninterrupted run's."""
    for model_dtype, mixed in ((None, "fp16"), (torch.float16, "no")):
        opt, a, _ = _optim(model_dtype=model_dtype, mixed_precision=mixed)
        stats = opt.new_stats()
        for _ in range(3):  # three overflows: 65536 -> 8192
            opt.backward((a * 1e35).sum(), "here")
            opt.step(stats)
        assert stats["skipped"] == 3 and opt.scaler.get_scale() == 8192.0
        restored, _, _ = _optim(model_dtype=model_dtype, mixed_precision=mixed)
        assert restored.scaler.get_scale() == 65536.0
        restored.load(*opt.state())
        assert restored.scaler.get_scale() == 8192.0, (model_dtype, mixed)


class _TwoProcesses:
    """Stands in for process 1 of 2: ``reduce`` adds process 0's contribution, given per call."""

    num_processes = 2

    def __init__(self, other):
        self.other = list(other)  # what process 0 contributes to each reduce, in call order

    def reduce(self, tensor, reduction="sum"):
        return tensor + self.other.pop(0)


def test_a_process_without_micro_batches_steps_in_fp16_and_untouched_parameters_stay_put():
    """Process 1 of 2 applied nothing this step: its scaler had never scaled a loss, so unscale_ failed; and a
    parameter no process gave a gradient got a zero one, so AdamW's weight decay and momentum moved it."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    cfg = TrainConfig(lr=0.1, weight_decay=0.1, max_grad_norm=0.0, mixed_precision="fp16")
    other = [torch.tensor([1.0, 0.0]), torch.full((3,), 65536.0)]  # process 0: a gradient for a (scaled) and none for b
    opt = LoraOptimizer([{"params": [a, b], "lr_ratio": 1.0}], cfg, _TwoProcesses(other), "cpu", gather=lambda t: t)
    opt.set_lr(0)
    opt.check_nonfinite = lambda: None  # (it gathers over processes)
    stats = opt.new_stats()
    opt.step(stats)
    assert stats["steps"] == 1 and b.grad is None
    assert torch.equal(b.detach(), torch.ones(2))  # untouched: no decay, no step
    assert torch.allclose(a.detach(), torch.full((3,), 1 - 0.1 * 0.1 - 0.1))  # decoupled decay, then Adam's first step -lr·sign


def test_ema_every_updates_the_average_on_every_nth_step_only():
    """Flow-GRPO's EMAModuleWrapper(decay=0.9, update_step_interval=8): the shadow moves at steps 8, 16, ... (by hand)."""
    opt, a, b = _optim(ema=True, ema_decay=0.5, ema_every=3)
    shadow = a.detach().clone()
    for iteration in range(7):
        opt.set_lr(iteration)
        assert opt.backward((a * torch.arange(1.0, 4.0)).sum() + b.square().sum(), "here")
        opt.step(opt.new_stats())
        if (iteration + 1) % 3 == 0:
            shadow = 0.5 * shadow + 0.5 * a.detach()
        assert torch.allclose(opt.ema.shadow[0], shadow), iteration
    with pytest.raises(Exception, match="ema_every"):
        TrainConfig(ema_every=0)


def test_the_power_ema_counts_its_own_updates_under_ema_every():
    """ema_every=3 with the power schedule: the first update (step 3) copies the weights, as power_ema_decay(1) = 0 says;
    it used to take decay(3) and keep the untrained LoRA in the average."""
    opt, a, b = _optim(ema=True, ema_schedule="power", ema_power=0.0, ema_every=3)
    seen = []
    for iteration in range(6):
        opt.set_lr(iteration)
        assert opt.backward((a * torch.arange(1.0, 4.0)).sum() + b.square().sum(), "here")
        opt.step(opt.new_stats())
        if (iteration + 1) % 3 == 0:
            seen.append(a.detach().clone())
            assert torch.allclose(opt.ema.shadow[0], torch.stack(seen).mean(0), atol=1e-6), iteration  # gamma 0: the plain mean


def test_kl_ema_copy_round_trips_through_a_checkpoint_and_is_required_by_it():
    def optim():
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.ones(3))
        cfg = TrainConfig(lr=0.1, weight_decay=0.0, max_grad_norm=0.0)
        return LoraOptimizer([{"params": [a], "lr_ratio": 1.0}], cfg, SimpleNamespace(num_processes=1), "cpu",
                             gather=lambda t: t, kl_ema=(None, 0.5)), a

    opt, a = optim()
    opt.backward(a.sum(), "here")
    opt.step(opt.new_stats())
    assert opt.update_kl_ema() == 0.5  # rate None: the constant decay
    assert torch.allclose(opt.kl_ema.shadow[0], 0.5 * torch.ones(3) + 0.5 * a.detach())
    tensors, state = opt.state()
    fresh, _ = optim()
    fresh.load(tensors, state, "ckpt")
    assert torch.equal(fresh.kl_ema.shadow[0], opt.kl_ema.shadow[0])
    with pytest.raises(CheckpointError, match="no KL-EMA weights"):
        optim()[0].load({}, state, "ckpt")
