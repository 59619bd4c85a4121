"""flowalign.step_rewards on the tiny SD3 pipeline: estimators through the adapter against the
pipeline itself and hand loops, NFE counted at the transformer, per-step advantages, the trainer
entry point, noise calibration and the noise-table file."""
import json
import logging
import math
import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from flowalign import dense, sde
from flowalign.advantages import per_step_advantages
from flowalign.errors import ConfigError
from flowalign.pipelines import load_adapter
from flowalign.rewards import MultiReward, call_reward, load_reward
from flowalign.sampling import rollout
from flowalign import step_rewards as sr

PROMPTS = ["a red square", "two blue circles"]
K = 4
G = 2
B = len(PROMPTS) * G
LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
ROOT = Path(__file__).resolve().parents[1]


def luma_mean(images):
    """Brightness by hand: mean BT.601 luma of [N, 3, H, W] images."""
    return (images.float() * LUMA).sum(1).flatten(1).mean(1)


@pytest.fixture(scope="module")
def adapter(pipe):
    return load_adapter(pipe, max_sequence_length=32)


@pytest.fixture(scope="module")
def reward():
    return load_reward("brightness")


class RowCounter:
    """Counts the rows the transformer sees (CFG concatenates both branches: 2 rows per sample)."""

    def __init__(self, module):
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.rows += kwargs["hidden_states"].shape[0]

    def close(self):
        self.handle.remove()


def _traj(adapter, reward, guidance_scale=2.0, schedule=0.7, seed=0, kernel="flow_sde", num_steps=K):
    traj = rollout(adapter, PROMPTS, group_size=G, num_steps=num_steps, kernel=kernel, schedule=schedule,
                   guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed))
    traj.rewards = call_reward(reward, traj.images, traj.prompts, traj.metadata).scores
    return traj


@pytest.fixture(scope="module")
def traj_cfg(adapter, reward):
    return _traj(adapter, reward, guidance_scale=2.0)


@pytest.fixture(scope="module")
def cond_cfg(adapter):
    return adapter.encode(PROMPTS, do_classifier_free_guidance=True)


# ------------------------------------------------------------------ estimators through the adapter


def test_R0_is_the_pipelines_noise_free_sample_from_the_rollouts_own_xT(pipe, adapter, reward, traj_cfg, cond_cfg):
    R, _ = sr.estimate_step_rewards(adapter, traj_cfg, cond_cfg, reward)
    # independent: diffusers' own pipeline from the same x_T, scored by hand
    prompts = [p for p in PROMPTS for _ in range(G)]
    images = pipe(prompts, latents=traj_cfg.latents[:, 0], num_inference_steps=K, guidance_scale=2.0,
                  max_sequence_length=32, output_type="pt").images
    assert torch.allclose(R[:, 0], luma_mean(images), atol=1e-5)
    # R_K is the rollout's reward, untouched
    assert torch.equal(R[:, K], traj_cfg.rewards.float())
    # the SDE rollout really moved away from the noise-free sample (else the test proves little)
    assert (R[:, 0] - R[:, K]).abs().max() > 1e-4


def test_completion_matches_a_hand_loop_with_stride(adapter, reward, traj_cfg, cond_cfg):
    stride = 2
    R, _ = sr.estimate_step_rewards(adapter, traj_cfg, cond_cfg, reward, estimator="ode_stride", stride=stride)
    sig = traj_cfg.sigmas.tolist()
    cond_rows = cond_cfg.repeat_interleave(G)
    for k in range(K):  # all samples at once, one start at a time
        x = traj_cfg.latents[:, k].clone()
        j = k
        while j < K:  # Euler over sigma indices k, k+2, ... and a last step to sigma_K = 0
            nxt = min(j + stride, K)
            x = x + (sig[nxt] - sig[j]) * adapter.velocity(x, sig[j], cond_rows, 2.0)
            j = nxt
        assert torch.allclose(R[:, k], luma_mean(adapter.decode(x)), atol=1e-5), k


@pytest.mark.parametrize("guidance_scale,stride", [(1.0, 1), (2.0, 1), (2.0, 2), (2.0, 3)])
def test_nfe_equals_formula_and_the_transformer_rows(adapter, reward, guidance_scale, stride):
    traj = _traj(adapter, reward, guidance_scale=guidance_scale)
    cond = adapter.encode(PROMPTS, do_classifier_free_guidance=guidance_scale > 1)
    counter = RowCounter(adapter.pipeline.transformer)
    try:
        _, nfe = sr.estimate_step_rewards(adapter, traj, cond, reward, stride=stride, reuse_deterministic=False)
    finally:
        counter.close()
    cfg = 2 if guidance_scale > 1 else 1
    expected = cfg * B * sum(math.ceil((K - k) / stride) for k in range(K))
    if stride == 1:
        assert expected == cfg * B * K * (K + 1) // 2
    assert nfe == expected == counter.rows


def test_batched_equals_unbatched(adapter, reward, traj_cfg, cond_cfg):
    R1, n1 = sr.estimate_step_rewards(adapter, traj_cfg, cond_cfg, reward)
    R2, n2 = sr.estimate_step_rewards(adapter, traj_cfg, cond_cfg, reward, max_batch=3)
    assert n1 == n2
    assert torch.allclose(R1, R2, atol=1e-5)


def test_cond_per_group_equals_cond_per_sample(adapter, reward, traj_cfg, cond_cfg):
    R1, _ = sr.estimate_step_rewards(adapter, traj_cfg, cond_cfg, reward, estimator="tweedie", guidance_scale=1.5)
    R2, _ = sr.estimate_step_rewards(adapter, traj_cfg, cond_cfg.repeat_interleave(G), reward, estimator="tweedie", guidance_scale=1.5)
    assert torch.allclose(R1, R2, atol=1e-6)
    with pytest.raises(ValueError, match="one per sample"):
        sr.estimate_step_rewards(adapter, traj_cfg, cond_cfg.select([0]), reward)


def test_tweedie_costs_no_nfe_with_recorded_x0(adapter, reward, traj_cfg, cond_cfg):
    counter = RowCounter(adapter.pipeline.transformer)
    try:
        R_rec, nfe_rec = sr.estimate_step_rewards(adapter, traj_cfg, cond_cfg, reward, estimator="tweedie")
        assert nfe_rec == 0 and counter.rows == 0
        # a different guidance scale cannot reuse the recorded x0: velocities are recomputed
        R_new, nfe_new = sr.estimate_step_rewards(adapter, traj_cfg, cond_cfg, reward, estimator="tweedie", guidance_scale=2.0 + 1e-9)
    finally:
        counter.close()
    assert nfe_new == 2 * B * K == counter.rows
    assert torch.allclose(R_rec, R_new, atol=1e-5)
    # by hand: x0_hat = x_k - sigma_k v(x_k) for sample 3, step 2
    x = traj_cfg.latents[3:4, 2]
    v = adapter.velocity(x, float(traj_cfg.sigmas[2]), cond_cfg.select([1]), 2.0)
    assert R_rec[3, 2] == pytest.approx(float(luma_mean(adapter.decode(x - traj_cfg.sigmas[2] * v))[0]), abs=1e-5)


def test_deterministic_steps_share_their_completion(adapter, reward):
    # stochastic only at step index 1 (latents[1] -> latents[2]): one completion start is needed
    schedule = sde.window(0.9, start=1, size=1)
    traj = _traj(adapter, reward, guidance_scale=1.0, schedule=schedule)
    assert traj.stochastic_mask.tolist() == [False, True, False, False]
    cond = adapter.encode(PROMPTS, do_classifier_free_guidance=False)
    R_all, n_all = sr.estimate_step_rewards(adapter, traj, cond, reward, reuse_deterministic=False)
    R_reuse, n_reuse = sr.estimate_step_rewards(adapter, traj, cond, reward)
    assert n_all == B * K * (K + 1) // 2 and n_reuse == B * (K - 1)
    assert torch.allclose(R_all, R_reuse, atol=1e-5)  # the copies equal the recomputed completions
    assert torch.equal(R_reuse[:, 0], R_reuse[:, 1]) and torch.equal(R_reuse[:, 2], R_reuse[:, K])
    gains = dense.step_gains(R_reuse)
    assert (gains[:, [0, 2, 3]] == 0).all() and (gains[:, 1] != 0).any()
    # completions under another guidance than the rollout's do not pass through its deterministic steps: recomputed
    cond_cfg = adapter.encode(PROMPTS, do_classifier_free_guidance=True)
    R_other, n_other = sr.estimate_step_rewards(adapter, traj, cond_cfg, reward, guidance_scale=3.0)
    R_other_all, _ = sr.estimate_step_rewards(adapter, traj, cond_cfg, reward, guidance_scale=3.0, reuse_deterministic=False)
    assert n_other == 2 * B * K * (K + 1) // 2 and torch.allclose(R_other, R_other_all, atol=1e-6)
    assert not torch.allclose(R_other[:, 0], R_other[:, 1], atol=1e-6)  # the copy would have made them equal


def test_store_gains_and_drop_policy(adapter, traj_cfg, cond_cfg):
    def fragile(images, prompts, metadata):  # fails (NaN) for the second prompt only
        return torch.tensor([float("nan") if p == PROMPTS[1] else 1.0 + float(images.mean()) for p in prompts])

    reward = load_reward(fragile)
    traj = traj_cfg.select(list(range(B)))
    traj.rewards = torch.full((B,), 2.0)
    with pytest.raises(Exception, match="fragile"):
        sr.estimate_step_rewards(adapter, traj, cond_cfg, reward, estimator="tweedie")
    R, _ = sr.estimate_step_rewards(adapter, traj, cond_cfg, reward, estimator="tweedie", on_error="drop", store_gains=True)
    assert torch.isfinite(R[:G]).all() and torch.isnan(R[G:, :K]).all()
    assert torch.allclose(traj.step_rewards[:G], R[:G, 1:] - R[:G, :-1])
    assert torch.isnan(traj.step_rewards[G:]).all()


# ------------------------------------------------------------------ per-step advantages


def test_step_advantages_match_dense_and_hand_credit():
    gen = torch.Generator().manual_seed(3)
    R = torch.randn(6, 5, generator=gen)
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    assert torch.allclose(sr.step_advantages(R, gid, "dense_grpo"), dense.dense_advantages(R, gid))
    assert torch.allclose(sr.step_advantages(R, gid, "tp_grpo", balance=True), dense.tp_advantages(R, gid, balance=True))
    # sum-form with gamma = 1 telescopes to R_K - R_{k-1}
    expect = per_step_advantages(R[:, -1:] - R[:, :-1], gid)
    assert torch.allclose(sr.step_advantages(R, gid, credit="sum", gamma=1.0), expect, atol=1e-5)
    # sum-form with gamma 0.5 by hand: R = [[0, 1, 3], [0, 2, 2]] -> gains [[1, 2], [2, 0]] -> returns
    # [[1 + 0.5·2, 2], [2 + 0.5·0, 0]] = [[2, 2], [2, 0]] -> minus the group mean [2, 1]: [[0, 1], [0, -1]]
    R2 = torch.tensor([[0.0, 1.0, 3.0], [0.0, 2.0, 2.0]])
    assert sr.step_advantages(R2, torch.tensor([0, 0]), credit="sum", gamma=0.5, std="none").tolist() == [[0.0, 1.0], [0.0, -1.0]]
    # min-form by hand on one row: gains [1, -2, 3, -1] -> V = [-2, -2, -1, -1]
    R1 = torch.tensor([[0.0, 1.0, -1.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    adv = sr.step_advantages(R1, torch.tensor([0, 0]), credit="min", std="none")
    assert adv[0].tolist() == pytest.approx([-1.0, -1.0, -0.5, -0.5])  # V - group mean (other row 0)
    with pytest.raises(ValueError, match="method"):
        sr.step_advantages(R, gid, "grpo")
    with pytest.raises(ValueError, match="credit"):
        sr.step_advantages(R, gid, credit="max")


def _cfg(name="dense_grpo", **dense_kw):
    return SimpleNamespace(
        objective=SimpleNamespace(name=name, adv_std="group", adv_eps=1e-4, adv_clip=5.0),
        sampling=SimpleNamespace(guidance_scale=2.0),
        rewards=[SimpleNamespace(name="brightness", weight=2.0, on_error="raise")],
        dense=sr.DenseConfig(**dense_kw),
    )


@pytest.mark.parametrize("name", ["dense_grpo", "tp_grpo"])
def test_dense_step_advantages_entry_point(adapter, reward, traj_cfg, cond_cfg, name):
    traj = traj_cfg.select(list(range(B)))
    traj.rewards = 2.0 * traj_cfg.rewards  # the trainer's weighted outcome reward
    adv, metrics = sr.dense_step_advantages(adapter, traj, cond_cfg.repeat_interleave(G), {"brightness": reward}, _cfg(name))
    # independent: R of a hand-weighted reward (weight 2, from cfg.rewards), R_K = traj.rewards
    R, nfe = sr.estimate_step_rewards(adapter, traj_cfg, cond_cfg, load_reward(lambda i, p, m: 2.0 * luma_mean(i)))
    R[:, K] = 2.0 * traj_cfg.rewards
    expected = dense.dense_advantages(R, traj.group_ids, clip=5.0) if name == "dense_grpo" else dense.tp_advantages(R, traj.group_ids, clip=5.0)
    assert adv.shape == (B, K)
    assert torch.allclose(adv, expected, atol=1e-4)
    assert metrics["dense/nfe"] == nfe == 2 * B * K * (K + 1) // 2
    tp_mask, _ = dense.turning_points(R)
    assert metrics["dense/turning_point_frac"] == pytest.approx(float(tp_mask.float().mean()))
    assert metrics["dense/dropped"] == 0 and traj.step_rewards.shape == (B, K)
    with pytest.raises(ConfigError, match="objective.name"):
        sr.dense_step_advantages(adapter, traj, cond_cfg, reward, _cfg("grpo"))


def test_dense_config_checks():
    assert sr.DenseConfig().estimator == "ode"
    for bad in [dict(estimator="mc"), dict(credit="max"), dict(estimator="ode_stride", stride=1), dict(gamma=1.5), dict(eps2=0)]:
        with pytest.raises(ConfigError, match="dense."):
            sr.DenseConfig(**bad)


# ------------------------------------------------------------------ calibration and the table file


def test_calibration_driver_follows_synthetic_gains(caplog):
    # fake gains: step 0 balanced (2 up, 2 down), step 1 all positive, step 2 balanced within eps1=2 (3 up, 1 down)
    fake = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]])
    seen = []

    def gains_fn(levels):
        seen.append(levels.clone())
        return fake

    with caplog.at_level(logging.INFO, logger="flowalign.step_rewards"):
        table = sr.calibrate_noise_table_for(None, [], None, rounds=3, samples=4, initial_levels=[0.5, 0.5, 0.5], eps1=2, eps2=0.05,
                                             gains_fn=gains_fn)
    assert table.tolist() == pytest.approx([0.65, 0.35, 0.65])
    # the silent phase says how far it is, one line per round (SD3.5's recipe runs 20 rounds of 96 rollouts before training)
    rounds = [r.getMessage() for r in caplog.records if r.getMessage().startswith("noise-table calibration: round")]
    assert [m.split(" (")[0] for m in rounds] == [f"noise-table calibration: round {i} of 3" for i in (1, 2, 3)]
    assert [s.tolist() for s in seen] == [pytest.approx(v) for v in ([0.5] * 3, [0.55, 0.45, 0.55], [0.6, 0.4, 0.6])]


def test_calibration_caps_cps_levels_at_one():
    """CPS's last step is deterministic (std = s' sin(a pi/2) = 0 at s' = 0): its gains are all 0, which counts as
    balanced, so its level climbs eps2 a round; a CPS level above 1 is refused by the rollout, so the table stops at 1."""
    zero_last = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    kw = dict(rounds=4, samples=2, initial_levels=[0.97, 0.97], eps1=0, eps2=0.02, gains_fn=lambda levels: zero_last)
    assert sr.calibrate_noise_table_for(None, [], None, kernel="cps", **kw).tolist() == pytest.approx([1.0, 1.0])
    assert sr.calibrate_noise_table_for(None, [], None, kernel="cps", max_level=0.99, **kw).tolist() == pytest.approx([0.99, 0.99])
    assert sr.calibrate_noise_table_for(None, [], None, kernel="flow_sde", **kw).tolist() == pytest.approx([1.05, 1.05])
    table = sr.calibrate_noise_table_for(None, [], None, kernel="cps", **kw)
    sde.step("cps", torch.zeros(1, 2), torch.zeros(1, 2), 0.5, 0.3, float(table.max()))  # accepted by the kernel


def test_rollout_gains_fn_matches_rollout_plus_estimator(adapter, reward):
    levels = torch.tensor([0.8, 0.4, 0.0])
    gains_fn = sr.rollout_gains_fn(adapter, PROMPTS, reward, samples=3, generator=torch.Generator().manual_seed(5))
    gains = gains_fn(levels)
    # independent: the same draws by hand (prompts cycle), final rewards scored by hand
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    traj = rollout(adapter, prompts, num_steps=3, kernel="flow_sde", schedule=sde.table(levels), generator=torch.Generator().manual_seed(5))
    cond = adapter.encode(prompts, do_classifier_free_guidance=False)
    R = torch.empty(3, 4)
    R[:, 3] = luma_mean(traj.images)
    for k in range(3):
        x = traj.latents[:, k]
        for j in range(k, 3):
            x = x + (traj.sigmas[j + 1] - traj.sigmas[j]) * adapter.velocity(x, float(traj.sigmas[j]), cond, 1.0)
        R[:, k] = luma_mean(adapter.decode(x))
    assert gains.shape == (3, 3)
    assert torch.allclose(gains, R[:, 1:] - R[:, :-1], atol=1e-5)
    assert (gains[:, 2].abs() < 1e-5).all()  # level 0 on the last step: deterministic, zero gain


def test_calibration_drops_failed_samples_under_the_drop_policy(adapter, reward, tmp_path):
    # a reward that fails (NaN) on the second prompt: calibration must leave those samples out, as training does
    def fragile(images, prompts, metadata):
        return torch.tensor([float("nan") if p == PROMPTS[1] else float(v) for p, v in zip(prompts, luma_mean(images))])

    levels = torch.tensor([0.8, 0.4])
    expect = sr.rollout_gains_fn(adapter, PROMPTS, reward, samples=4, generator=torch.Generator().manual_seed(2))(levels)[0::2]
    expect_levels = [0.5 + 0.1 if int((expect[:, k] > 0).sum()) == int((expect[:, k] < 0).sum()) else 0.5 - 0.1 for k in range(2)]
    mixed = MultiReward({"fragile": (load_reward(fragile), 1.0, "drop")})
    table = sr.calibrate_noise_table_for(adapter, PROMPTS, mixed, rounds=1, samples=4, initial_levels=[0.5, 0.5], eps1=0, eps2=0.1,
                                         generator=torch.Generator().manual_seed(2))
    assert table.tolist() == pytest.approx(expect_levels)
    with pytest.raises(Exception, match="non-finite"):  # the raise policy still raises
        sr.calibrate_noise_table_for(adapter, PROMPTS, mixed, rounds=1, samples=4, initial_levels=[0.5, 0.5], on_error="raise")
    cfg = SimpleNamespace(
        objective=SimpleNamespace(name="dense_grpo"), train=SimpleNamespace(seed=0), model=SimpleNamespace(pretrained="tiny-sd3"),
        sampling=SimpleNamespace(num_steps=2, kernel="flow_sde", guidance_scale=1.0, noise_schedule="constant", noise_kwargs={"a": 0.5}),
        rewards=[SimpleNamespace(name="fragile", weight=1.0, on_error="drop")],
        dense=sr.DenseConfig(calibration_rounds=1, calibration_samples=4, eps1=0, eps2=0.1),
    )
    _, prepared = sr.prepare_noise_schedule(adapter, PROMPTS, {"fragile": load_reward(fragile)}, cfg)
    assert prepared.numel() == 2 and torch.isfinite(prepared).all()


def test_noise_table_round_trip_and_errors(tmp_path):
    path = sr.save_noise_table(tmp_path / "run" / "noise_table.json", torch.tensor([0.7, 0.65, 0.5]), {"eps1": 2, "rounds": 10})
    doc = json.loads(path.read_text())
    assert doc["format"] == "flowalign.noise_table" and doc["num_steps"] == 3
    levels, meta = sr.load_noise_table(path)
    assert levels.tolist() == pytest.approx([0.7, 0.65, 0.5]) and meta == {"eps1": 2, "rounds": 10}
    sampling_cfg = SimpleNamespace(num_steps=3, noise_schedule="constant", noise_kwargs={"a": 0.3})
    schedule = sr.noise_schedule_for(sampling_cfg, sr.DenseConfig(noise_table_file=str(path)))
    assert schedule.levels(3).tolist() == pytest.approx([0.7, 0.65, 0.5])
    assert sr.noise_schedule_for(sampling_cfg, None).levels(3).tolist() == pytest.approx([0.3] * 3)
    with pytest.raises(ConfigError, match="3 levels but sampling.num_steps=4"):
        sr.noise_schedule_for(SimpleNamespace(num_steps=4), sr.DenseConfig(noise_table_file=str(path)))
    bad = tmp_path / "bad.json"
    for text, match in [("{", "not valid JSON"), ('{"format": "x"}', "not a flowalign noise table"),
                        ('{"format": "flowalign.noise_table", "version": 1, "levels": [0.1, -1]}', "levels"),
                        ('{"format": "flowalign.noise_table", "version": 9, "levels": [0.1]}', "version")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            sr.load_noise_table(bad)
    with pytest.raises(ConfigError, match="not found"):
        sr.load_noise_table(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="finite"):
        sr.save_noise_table(tmp_path / "x.json", [0.1, float("nan")])


def test_prepare_noise_schedule_calibrates_saves_and_reuses(adapter, reward, tmp_path):
    table_file = tmp_path / "table.json"
    cfg = SimpleNamespace(
        objective=SimpleNamespace(name="dense_grpo"), train=SimpleNamespace(seed=0), model=SimpleNamespace(pretrained="tiny-sd3"),
        sampling=SimpleNamespace(num_steps=2, kernel="flow_sde", guidance_scale=1.0, noise_schedule="constant", noise_kwargs={"a": 0.5}),
        rewards=[SimpleNamespace(name="brightness", weight=1.0, on_error="raise")],
        dense=sr.DenseConfig(noise_table_file=str(table_file), calibration_rounds=1, calibration_samples=3, eps1=0, eps2=0.1),
    )
    schedule, levels = sr.prepare_noise_schedule(adapter, PROMPTS, {"brightness": reward}, cfg)
    # independent: the gains of the same 3 draws (seed train.seed + 2), counted by hand against eps1 = 0
    gains = sr.rollout_gains_fn(adapter, PROMPTS, reward, samples=3, generator=torch.Generator().manual_seed(2))(torch.tensor([0.5, 0.5]))
    balanced = (gains > 0).sum(0) == (gains < 0).sum(0)
    assert levels.tolist() == pytest.approx([0.6 if bool(b) else 0.4 for b in balanced])
    assert schedule.levels(2).tolist() == pytest.approx(levels.tolist())
    saved, meta = sr.load_noise_table(table_file)
    assert torch.equal(saved, levels) and meta["rounds"] == 1 and meta["initial_level"] == 0.5
    # the file now exists: it is reused, nothing is calibrated (no reward call)
    _, again = sr.prepare_noise_schedule(adapter, PROMPTS, None, cfg)
    assert torch.equal(again, levels)
    # ... but not under other calibration settings, which it would silently ignore: named, unless used as it is
    cfg.dense = sr.DenseConfig(noise_table_file=str(table_file), calibration_rounds=2, calibration_samples=3, eps1=0, eps2=0.3)
    with pytest.raises(ConfigError, match=r"calibrated under other settings \(rounds 1 -> 2, eps2 0.1 -> 0.3\); delete it"):
        sr.prepare_noise_schedule(adapter, PROMPTS, None, cfg)
    cfg.dense = sr.DenseConfig(noise_table_file=str(table_file), calibration_rounds=0)
    assert torch.equal(sr.prepare_noise_schedule(adapter, PROMPTS, None, cfg)[1], levels)
    # another reward, or another starting level, is another calibration too
    cfg.dense = sr.DenseConfig(noise_table_file=str(table_file), calibration_rounds=1, calibration_samples=3, eps1=0, eps2=0.1)
    cfg.rewards = [SimpleNamespace(name="color_fraction", weight=1.0, on_error="raise", kwargs={})]
    with pytest.raises(ConfigError, match=r"rewards \[\['brightness'"):
        sr.prepare_noise_schedule(adapter, PROMPTS, None, cfg)
    cfg.rewards = [SimpleNamespace(name="brightness", weight=1.0, on_error="raise")]
    with pytest.raises(ConfigError, match=r"initial_levels \[0.5, 0.5\] -> \[0.5, 0.0\]"):
        sr.check_calibrated_table(table_file, cfg, [0.5, 0.0])
    sr.check_calibrated_table(table_file, cfg)  # the same settings: accepted
    # a named table that does not exist, without calibration, is an error; no dense settings -> the sampling schedule
    cfg.dense = sr.DenseConfig(noise_table_file=str(tmp_path / "none.json"))
    with pytest.raises(ConfigError, match="does not exist"):
        sr.prepare_noise_schedule(adapter, PROMPTS, reward, cfg)
    cfg.dense = None
    schedule, levels = sr.prepare_noise_schedule(adapter, PROMPTS, reward, cfg)
    assert levels is None and schedule.levels(2).tolist() == pytest.approx([0.5, 0.5])


# ------------------------------------------------------------------ recipes

RECIPES = ["toy_dense_grpo.yaml", "toy_tp_grpo.yaml", "sd35m_dense_grpo_geneval.yaml", "sd35m_tp_grpo_geneval.yaml"]


@pytest.mark.parametrize("name", RECIPES)
def test_dense_recipes_validate(name):
    from flowalign.config import load_config

    cfg = load_config(ROOT / "train" / "configs" / name)
    assert isinstance(cfg.dense, sr.DenseConfig)
    assert cfg.objective.name in ("dense_grpo", "tp_grpo")
    if cfg.objective.name == "tp_grpo":
        assert cfg.sampling.kernel == "cps" and cfg.objective.clip_range == pytest.approx(1e-5)
    if name.startswith("toy_"):  # like-for-like with the Flow-GRPO toy recipe: only objective, kernel and dense differ
        base = load_config(ROOT / "train" / "configs" / "toy_grpo.yaml")
        for section in ("model", "rewards", "lora"):
            assert getattr(cfg, section) == getattr(base, section), section
        assert cfg.sampling.num_steps == base.sampling.num_steps and cfg.sampling.group_size == base.sampling.group_size
        # (not lr / iterations / noise: the main job moved to a 3-step noise window at lr 5e-4, which dense rewards,
        # needing noise on every step, do not share; these recipes keep the settings compare_methods measured)
        assert cfg.train.prompts_per_iter == base.train.prompts_per_iter
    # overrides reach the dense section, and bad values fail with the key's name
    assert load_config(ROOT / "train" / "configs" / name, ["dense.estimator=tweedie"]).dense.estimator == "tweedie"
    with pytest.raises(ConfigError, match="dense.stride"):
        load_config(ROOT / "train" / "configs" / name, ["dense.estimator=ode_stride", "dense.stride=1"])
