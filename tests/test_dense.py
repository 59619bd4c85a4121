"""Tests for flowalign.dense: step gains, turning points (hand-worked), credit assignment,
ODE-completion / Tweedie estimators against brute force, noise calibration, dense objectives."""
import math

import pytest
import torch

from flowalign import dense, sde
from flowalign.advantages import per_step_advantages
from flowalign.objectives import StepBatch, get_objective

# ------------------------------------------------------------------ step gains / turning points


def test_step_gains_telescope():
    g = torch.Generator().manual_seed(0)
    R = torch.randn(6, 9, generator=g)
    r = dense.step_gains(R)
    assert r.shape == (6, 8)
    assert torch.allclose(r.sum(1), R[:, -1] - R[:, 0], atol=1e-6)
    assert torch.allclose(r[:, 3], R[:, 4] - R[:, 3])


# Each case: R = [R_0, ..., R_K]; steps are 1-based k = 1..K (column k-1).
# r_k = R_k - R_{k-1}; g = sign(R_K - R_0); e_k = sign(R_K - R_k).
# k = 1 is a turning point iff sign(r_1)·e_1 > 0; k > 1 iff sign(r_{k-1})·g < 0, sign(r_k)·g > 0, sign(r_k)·e_k > 0.
# A turning point's reward is R_K - R_{k-1}.
TP_CASES = [
    # 1. monotone up: r = [1, 1, 1], g = +, e = [+, +, 0]. k=1: (+)(+) -> TP, R_3 - R_0 = 3.
    #    k=2, k=3: previous step agrees with g -> no.
    ([0, 1, 2, 3], [1, 0, 0], [3, 1, 1]),
    # 2. dip then recovery: r = [-1, 2, 1], g = +, e = [+, +, 0]. k=1: (-)(+) no.
    #    k=2: r_1 against g, r_2 with g, r_2·e_2 = + -> TP, R_3 - R_1 = 2 - (-1) = 3. k=3: r_2 with g -> no.
    ([0, -1, 1, 2], [0, 1, 0], [-1, 3, 1]),
    # 3. r = [1, -0.5, 1.5], g = +, e = [+, +, 0]. k=1 TP (R_3 - R_0 = 2). k=2: r_1 with g -> no.
    #    k=3: r_2 against g, r_3 with g, but e_3 = 0 (last step) -> no.
    ([0, 1, 0.5, 2], [1, 0, 0], [2, -0.5, 1.5]),
    # 4. downward trend: r = [1, -2, -1], g = -, e = [-, -, 0]. k=1: (+)(-) no.
    #    k=2: sign(r_1)g = - , sign(r_2)g = +, r_2·e_2 = (-)(-) = + -> TP, R_3 - R_1 = -1 - 2 = -3.
    ([1, 2, 0, -1], [0, 1, 0], [1, -3, -1]),
    # 5. flat: all gains 0, g = 0 -> no turning point, rewards 0.
    ([0.5, 0.5, 0.5, 0.5], [0, 0, 0], [0, 0, 0]),
    # 6. R_K = R_0 with wiggles: r = [1, -2, 1], g = 0, e = [-, +, 0]. k=1: (+)(-) no; k>1 need g != 0 -> none.
    ([0, 1, -1, 0], [0, 0, 0], [1, -2, 1]),
    # 7. two turning points, K = 5: r = [-1, 2, -1, 2, 1], g = +, e = [+, +, +, +, 0].
    #    k=1: (-)(+) no. k=2: TP, R_5 - R_1 = 3 - (-1) = 4. k=3: r_2 with g -> no.
    #    k=4: r_3 against, r_4 with, e_4 = + -> TP, R_5 - R_3 = 3 - 0 = 3. k=5: r_4 with g -> no.
    ([0, -1, 1, 0, 2, 3], [0, 1, 0, 1, 0], [-1, 4, -1, 3, 1]),
    # 8. turn overshoots: r = [-1, 4, -1], g = +, e = [+, -, 0]. k=2: r_1 against, r_2 with, but
    #    r_2·e_2 = (+)(-) < 0 (reward falls back afterwards) -> no. k=3: r_2 with g -> no.
    ([0, -1, 3, 2], [0, 0, 0], [-1, 4, -1]),
    # 9. r = [1, 1, -3], g = -, e = [-, -, 0]. k=1: (+)(-) no. k=2: r_2·g = (+)(-) < 0 no.
    #    k=3: r_2 against g, r_3 with g, e_3 = 0 -> no.
    ([0, 1, 2, -1], [0, 0, 0], [1, 1, -3]),
    # 10. downward, first step: r = [-1, 0.5, -1.5], g = -, e = [-, -, 0]. k=1: (-)(-) = + -> TP,
    #     R_3 - R_0 = -2. k=2: r_1·g = + -> no. k=3: e_3 = 0 -> no.
    ([0, -1, -0.5, -2], [1, 0, 0], [-2, 0.5, -1.5]),
    # 11. zero gain first: r = [0, 1, 1], g = +. k=1: sign(r_1) = 0 no. k=2: sign(r_1)·g = 0, not < 0 -> no.
    ([0, 0, 1, 2], [0, 0, 0], [0, 1, 1]),
    # 12. K = 4 downward: r = [1, -2, 0.5, -1.5], g = sign(0 - 2) = -, e = [-, -, -, 0].
    #     k=1: (+)(-) no. k=2: (+)(-) < 0, (-)(-) > 0, (-)(-) > 0 -> TP, R_4 - R_1 = 0 - 3 = -3.
    #     k=3: r_2·g = + -> no. k=4: r_3 against, r_4 with, e_4 = 0 -> no.
    ([2, 3, 1, 1.5, 0], [0, 1, 0, 0], [1, -3, 0.5, -1.5]),
    # 13. K = 1: r = [1], e_1 = sign(R_1 - R_1) = 0 -> no turning point.
    ([0, 1], [0], [1]),
    # 14. the trend is R_K - R_0, not the first gain: r = [2, -5, 1, 1], g = sign(-1 - 0) = -, e = [-, +, +, 0].
    #     k=1: (+)(-) no. k=2: r_1 against, r_2 with, but r_2·e_2 = (-)(+) < 0 -> no. k=3: r_2 with g -> no.
    #     k=4: r_4·g = (+)(-) < 0 -> no. (Read with g = sign(r_1) = +, step 3 would turn with R_4 - R_2 = 2.)
    ([0, 2, -3, -2, -1], [0, 0, 0, 0], [2, -5, 1, 1]),
]


@pytest.mark.parametrize("R,mask,rewards", TP_CASES)
def test_turning_points_hand_worked(R, mask, rewards):
    m, r = dense.turning_points(torch.tensor([R], dtype=torch.float32))
    assert m[0].tolist() == [bool(x) for x in mask]
    assert r[0].tolist() == pytest.approx(rewards)


def test_turning_points_batched_equals_rows():
    R = torch.tensor([c[0] for c in TP_CASES if len(c[0]) == 4], dtype=torch.float32)
    m, r = dense.turning_points(R)
    expect = [c for c in TP_CASES if len(c[0]) == 4]
    assert m.tolist() == [[bool(x) for x in c[1]] for c in expect]
    assert torch.allclose(r, torch.tensor([c[2] for c in expect], dtype=torch.float32))


def test_turning_points_balance():
    # rows: case 1 (TP k=1, +3), case 2 (TP k=2, +3), case 4 (TP k=2, -3), [0,.5,1,1.5] (TP k=1, +1.5)
    R = torch.tensor([[0, 1, 2, 3], [0, -1, 1, 2], [1, 2, 0, -1], [0, 0.5, 1, 1.5]], dtype=torch.float32)
    m, _ = dense.turning_points(R)
    assert m.tolist() == [[True, False, False], [False, True, False], [False, True, False], [True, False, False]]
    # 3 positive vs 1 negative -> keep 1 of each: the largest |value| positive (rows 0 and 1 tie at 3,
    # row-major order keeps row 0) and the negative one; the others revert to their step gains.
    mb, rb = dense.turning_points(R, balance=True)
    assert mb.tolist() == [[True, False, False], [False, False, False], [False, True, False], [False, False, False]]
    assert rb.tolist() == [[3, 1, 1], [-1, 2, 1], [1, -3, -1], [0.5, 0.5, 0.5]]
    # only positive turning points: nothing to balance
    mo, _ = dense.turning_points(R[[0, 1, 3]], balance=True)
    assert mo.tolist() == m[[0, 1, 3]].tolist()


def test_turning_points_balance_ranks_by_the_rows_overall_change():
    """The authors' balancing (use_delta_global) ranks a turning point by its row's |R_K - R_0|, not by its
    replacement |R_K - R_{k-1}|: row 0's step-2 turning point has the larger replacement (1.6) but the smaller
    overall change (0.6), so row 1's step-1 turning point (1.0, 1.0) is the positive one kept."""
    R = torch.tensor([[0, -1, 0.5, 0.6], [0, 0.5, 0.6, 1.0], [0, -0.5, -0.6, -1.0]])
    m, r = dense.turning_points(R)
    assert m.tolist() == [[False, True, False], [True, False, False], [True, False, False]]
    assert r[0, 1].item() == pytest.approx(1.6) and r[1, 0].item() == pytest.approx(1.0)
    mb, rb = dense.turning_points(R, balance=True)
    assert mb.tolist() == [[False, False, False], [True, False, False], [True, False, False]]
    assert torch.allclose(rb, torch.tensor([[-1, 1.5, 0.1], [1.0, 0.1, 0.4], [-1.0, -0.1, -0.4]]))


def test_turning_points_rejects_bad_R():
    with pytest.raises(ValueError, match=r"\[B, K\+1\]"):
        dense.turning_points(torch.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        dense.step_gains(torch.tensor([[0.0, float("nan")]]))


def test_credit_assignment_hand_values():
    r = torch.tensor([[1.0, 2.0, 3.0], [3.0, -1.0, 2.0]])
    # gamma = 0.5: G_3 = 3, G_2 = 2 + 0.5·3 = 3.5, G_1 = 1 + 0.5·3.5 = 2.75
    assert dense.discounted_returns(r, 0.5)[0].tolist() == pytest.approx([2.75, 3.5, 3.0])
    assert dense.discounted_returns(r, 1.0)[1].tolist() == pytest.approx([4.0, 1.0, 2.0])
    assert dense.min_form_values(torch.tensor([[3.0, 1.0, 2.0, 5.0]]))[0].tolist() == [1.0, 1.0, 2.0, 5.0]
    # with gamma = 1, the return of step gains is R_K - R_{k-1}
    R = torch.tensor([[0.0, 2.0, 1.0, 4.0]])
    assert dense.discounted_returns(dense.step_gains(R), 1.0)[0].tolist() == pytest.approx([4.0, 2.0, 3.0])


# ------------------------------------------------------------------ estimators

B, K, SHAPE = 3, 6, (2, 3, 3)


class Toy:
    """Analytic velocity / decode / reward with per-sample conditioning, counting calls."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.M = torch.randn(2, 2, generator=g) * 0.4
        self.offset = torch.randn(B, 2, 1, 1, generator=g)  # per-sample "prompt"
        self.weight = torch.tensor([1.0, -2.0, 0.5])
        self.calls, self.rows = [], 0

    def velocity(self, x, sigma, index):
        self.calls.append(x.shape[0])
        self.rows += x.shape[0]
        s = sigma.reshape(-1, 1, 1, 1)
        return torch.einsum("ij,bjhw->bihw", self.M, x) * (1 + s) + self.offset[index]

    def decode(self, z):
        return torch.tanh(z)

    def reward(self, images, index):
        return images.flatten(1).mean(1) * self.weight[index] + images[:, 0, 0, 0]


def _sigmas():
    return torch.tensor([1.0, 0.9, 0.75, 0.55, 0.35, 0.15, 0.0])


def _trajectory(toy, kind="flow_sde"):
    """A stochastic rollout through the toy velocity: latents [B, K+1, *SHAPE]."""
    g = torch.Generator().manual_seed(2)
    sig = _sigmas()
    x = torch.randn(B, *SHAPE, generator=g)
    lat = [x]
    for i in range(K):
        v = toy.velocity(x, sig[i].expand(B), torch.arange(B))
        x = sde.step(kind, x, v, sig[i], sig[i + 1], 0.7, generator=g).prev_sample
        lat.append(x)
    toy.calls, toy.rows = [], 0
    return torch.stack(lat, 1)


def _brute_completion(toy, x, b, k, sig, stride):
    """Plain Euler loop for one sample b from start index k (independent of dense / sde)."""
    path = list(range(k, K, stride)) + [K]
    for j, jn in zip(path[:-1], path[1:]):
        v = toy.velocity(x[None], sig[j].reshape(1), torch.tensor([b]))[0]
        x = x + (sig[jn] - sig[j]) * v
    return float(toy.reward(toy.decode(x[None]), torch.tensor([b]))[0])


def test_ode_completion_from_step0_equals_full_ode_rollout():
    toy = Toy()
    lat = _trajectory(toy)
    R, _ = dense.ode_completion_rewards(toy.velocity, toy.decode, toy.reward, lat, _sigmas())
    sig = _sigmas()
    x = lat[:, 0]
    for i in range(K):  # full deterministic rollout from x_T with the same velocity function
        x = sde.step("ode", x, toy.velocity(x, sig[i].expand(B), torch.arange(B)), sig[i], sig[i + 1]).prev_sample
    assert torch.allclose(R[:, 0], toy.reward(toy.decode(x), torch.arange(B)), atol=1e-5)
    assert torch.allclose(R[:, K], toy.reward(toy.decode(lat[:, K]), torch.arange(B)), atol=1e-6)


@pytest.mark.parametrize("stride", [1, 2, 4])
@pytest.mark.parametrize("max_batch", [None, 4])
def test_batched_completion_equals_per_sample_and_counts_nfe(stride, max_batch):
    toy = Toy()
    lat = _trajectory(toy)
    sig = _sigmas()
    R, nfe = dense.ode_completion_rewards(toy.velocity, toy.decode, toy.reward, lat, sig, stride=stride, max_batch=max_batch)
    calls = list(toy.calls)
    expected_nfe = B * sum(math.ceil((K - k) / stride) for k in range(K))
    assert nfe == expected_nfe == sum(calls)
    if max_batch is None:
        assert len(calls) <= K  # one call per sigma index covers every pending completion
    else:
        assert max(calls) <= max_batch
    for b in range(B):
        for k in range(K + 1):
            assert R[b, k].item() == pytest.approx(_brute_completion(toy, lat[b, k], b, k, sig, stride), abs=1e-5), (b, k)


def test_completion_of_an_ode_trajectory_is_constant():
    # along a deterministic trajectory the stride-1 completion from every step is the same sample
    toy = Toy()
    lat = _trajectory(toy, kind="ode")
    R, _ = dense.ode_completion_rewards(toy.velocity, toy.decode, toy.reward, lat, _sigmas())
    assert torch.allclose(R, R[:, :1].expand_as(R), atol=1e-5)
    assert torch.allclose(dense.step_gains(R), torch.zeros(B, K), atol=1e-5)


def test_completion_steps_subset_and_final_rewards():
    toy = Toy()
    lat = _trajectory(toy)
    full, _ = dense.ode_completion_rewards(toy.velocity, toy.decode, toy.reward, lat, _sigmas())
    part, nfe = dense.ode_completion_rewards(
        toy.velocity, toy.decode, toy.reward, lat, _sigmas(), steps=[2, 5, K], final_rewards=torch.tensor([7.0, 8.0, 9.0])
    )
    assert nfe == B * ((K - 2) + (K - 5))
    assert torch.allclose(part[:, [2, 5]], full[:, [2, 5]], atol=1e-6)
    assert part[:, K].tolist() == [7.0, 8.0, 9.0]
    assert torch.isnan(part[:, [0, 1, 3, 4]]).all()
    with pytest.raises(ValueError, match="0..K=6"):
        dense.ode_completion_rewards(toy.velocity, toy.decode, toy.reward, lat, _sigmas(), steps=[7])


def test_tweedie_rewards_hand_and_recorded_x0():
    toy = Toy()
    lat = _trajectory(toy)
    sig = _sigmas()
    R, nfe = dense.tweedie_rewards(toy.velocity, toy.decode, toy.reward, lat, sig)
    assert nfe == B * K
    x0_preds = torch.stack(
        [lat[:, k] - sig[k] * toy.velocity(lat[:, k], sig[k].expand(B), torch.arange(B)) for k in range(K)], 1
    )
    for k in range(K):
        assert torch.allclose(R[:, k], toy.reward(toy.decode(x0_preds[:, k]), torch.arange(B)), atol=1e-5)
    R2, nfe2 = dense.tweedie_rewards(None, toy.decode, toy.reward, lat, sig, x0_preds=x0_preds)
    assert nfe2 == 0 and torch.allclose(R, R2, atol=1e-5)


@pytest.mark.parametrize("estimator, kw", [
    ("ode", {}), ("ode", {"stride": 2, "max_batch": 4}), ("ode", {"steps": [2, 5, K], "final_rewards": torch.tensor([7.0, 8.0, 9.0])}),
    ("ode", {"steps": [0, 3]}), ("tweedie", {}), ("tweedie", {"max_batch": 2, "final_rewards": torch.tensor([1.0, 2.0, 3.0])}),
    ("tweedie_x0", {}),
])
def test_progress_counts_every_transformer_and_scored_row_up_to_its_total(estimator, kw):
    """The step-reward phase's bar: ``progress(done, total)`` rises after each chunk and ends at its total, which
    is the rows the velocity, decode and reward calls actually took (counted here by wrapping them)."""
    toy = Toy()
    lat = _trajectory(toy)
    sig = _sigmas()
    counted, seen = {"rows": 0}, []

    def velocity(x, s, idx):
        counted["rows"] += x.shape[0]
        return toy.velocity(x, s, idx)

    def reward(images, idx):
        counted["rows"] += images.shape[0]
        return toy.reward(images, idx)

    progress = lambda done, total: seen.append((done, total))  # noqa: E731
    if estimator == "ode":
        dense.ode_completion_rewards(velocity, toy.decode, reward, lat, sig, progress=progress, **kw)
    elif estimator == "tweedie":
        dense.tweedie_rewards(velocity, toy.decode, reward, lat, sig, progress=progress, **kw)
    else:
        x0 = torch.stack([lat[:, k] - sig[k] * toy.velocity(lat[:, k], sig[k].expand(B), torch.arange(B)) for k in range(K)], 1)
        dense.tweedie_rewards(None, toy.decode, reward, lat, sig, x0_preds=x0, progress=progress)
    totals = {t for _, t in seen}
    assert len(totals) == 1 and seen[-1][0] == totals.pop() == counted["rows"] > 0
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) >= 2


# ------------------------------------------------------------------ calibration


def test_calibration_raises_balanced_and_lowers_unbalanced():
    N = 20
    gains = torch.zeros(N, 4)
    gains[:10, 0], gains[10:, 0] = 1.0, -1.0  # 10 vs 10: balanced
    gains[:11, 1], gains[11:, 1] = 0.5, -0.5  # 11 vs 9: |diff| = 2 <= eps1, balanced
    gains[:15, 2], gains[15:, 2] = 0.1, -0.1  # 15 vs 5: unbalanced
    gains[:, 3] = -0.2  # all negative: unbalanced
    new = dense.calibrate_noise_table(torch.tensor([0.5, 0.5, 0.5, 0.005]), gains, eps1=2, eps2=0.01)
    assert new.tolist() == pytest.approx([0.51, 0.51, 0.49, 0.0])
    capped = dense.calibrate_noise_table(torch.tensor([0.5, 0.5, 0.5, 0.5]), gains, max_level=0.505)
    assert capped.tolist() == pytest.approx([0.505, 0.505, 0.49, 0.49])


def test_calibration_driver_converges_to_synthetic_thresholds():
    # synthetic sampler: at step k gains stay balanced while the level is below thr[k] and become
    # one-sided above it, so the calibrated level should settle within eps2 of thr[k]
    thr = torch.tensor([0.2, 0.5, 0.8])
    calls = []

    def gains_fn(levels):
        calls.append(levels.clone())
        balanced = levels < thr  # [3]
        alt = torch.tensor([1.0, -1.0] * 10)[:, None]  # 10 pos / 10 neg
        return torch.where(balanced, alt, -torch.ones(20, 3))

    table = dense.calibrate_noise(gains_fn, torch.full((3,), 0.5), rounds=60, eps2=0.01)
    assert len(calls) == 60
    assert torch.all((table - thr).abs() <= 0.011)
    assert dense.calibrate_noise(gains_fn, torch.full((3,), 0.5), rounds=0).tolist() == [0.5] * 3


# ------------------------------------------------------------------ dense advantages and objectives


def test_dense_and_tp_advantages_compose():
    R = torch.tensor([[0, 1, 2, 3], [0, -1, 1, 2], [1, 2, 0, -1], [0, 0.5, 1, 1.5]], dtype=torch.float32)
    gids = torch.tensor([0, 0, 1, 1])
    assert torch.allclose(dense.dense_advantages(R, gids), per_step_advantages(R[:, 1:] - R[:, :-1], gids))
    hand = torch.tensor([[3, 1, 1], [-1, 3, 1], [1, -3, -1], [1.5, 0.5, 0.5]])
    assert torch.allclose(dense.tp_advantages(R, gids), per_step_advantages(hand, gids))


def _cps_case(theta0=0.8):
    """Two transitions (steps 1 and 2) of one sample, policy v = theta·x, CPS kernel."""
    theta = torch.nn.Parameter(torch.tensor(theta0))
    policy = lambda x, sigma: theta * x  # noqa: E731
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, generator=g)
    sigma, sigma_next = torch.tensor([0.8, 0.6]), torch.tensor([0.6, 0.4])
    level = torch.full((2,), 0.7)
    with torch.no_grad():
        out = sde.step("cps", x, policy(x, sigma), sigma, sigma_next, level, generator=g)
        old = sde.log_prob(out.prev_sample, out.mean, out.std)
    return theta, policy, x, out.prev_sample, sigma, sigma_next, level, old


@pytest.mark.parametrize("name", ["tp_grpo", "dense_grpo"])
def test_dense_objectives_gradient_matches_hand(name):
    theta, policy, x, x_next, sigma, sigma_next, level, old = _cps_case()
    # advantages of steps 2 and 3 of sample 0 in a group of two samples (per-step normalisation)
    R = torch.tensor([[0.0, -1.0, 1.0, 2.0], [0.0, 0.5, 0.2, 0.1]])
    adv_fn = dense.tp_advantages if name == "tp_grpo" else dense.dense_advantages
    adv = adv_fn(R, torch.tensor([0, 0]))[0, 1:3]
    batch = StepBatch(x=x, x_next=x_next, sigma=sigma, sigma_next=sigma_next, noise_level=level, old_log_prob=old,
                      advantages=adv, kernel="cps", step_index=torch.tensor([1, 2]))
    obj = get_objective(name)
    loss, m = obj.loss(batch, policy, None)
    assert m["policy/ratio_mean"] == 1.0
    loss.backward()
    # hand: CPS mean = (1-s')(x - s·θx) + c(x + (1-s)θx), c = sqrt(s'^2 - std^2), std = s' sin(0.7π/2)
    # d logp/dθ = mean_d (x'_d - mean_d)/std^2 · x_d (c(1-s) - (1-s')s); loss grad = -mean_i A_i d logp_i/dθ
    hand = 0.0
    for i in range(2):
        s, sn = float(sigma[i]), float(sigma_next[i])
        std = sn * math.sin(0.7 * math.pi / 2)
        c = math.sqrt(sn**2 - std**2)
        th = float(theta.detach())
        mean = (1 - sn) * (x[i] - s * th * x[i]) + c * (x[i] + (1 - s) * th * x[i])
        dlogp = float(((x_next[i] - mean) / std**2 * x[i] * (c * (1 - s) - (1 - sn) * s)).mean())
        hand += -float(adv[i]) * dlogp / 2
    assert theta.grad.item() == pytest.approx(hand, rel=1e-4)


def test_tp_grpo_defaults():
    obj = get_objective("tp_grpo")
    assert obj.clip_range == 1e-5 and obj.default_kernel == "cps" and obj.default_noise_level == 0.7
    assert get_objective("dense_grpo").clip_range == 1e-4


def test_the_calibration_shards_cover_every_sample_once():
    from flowalign.train.dense_setup import calibration_shard

    for samples, world in [(5, 2), (96, 8), (3, 4), (1, 1)]:
        shards = [calibration_shard(samples, rank, world) for rank in range(world)]
        assert sorted(i for shard in shards for i in shard) == list(range(samples))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert calibration_shard(3, 3, 4) == []
    with pytest.raises(ValueError, match="rank"):
        calibration_shard(4, 2, 2)


def test_calibration_leaves_the_steps_outside_the_window_noise_free():
    """A window's noise-free steps have gains of exactly 0 (an ODE step moves along the completion it is scored by),
    which the balance rule counts as balanced: each climbed by eps2 a round, so a 2-of-6 window ended as a table of
    noise on every step."""
    def gains_fn(levels):  # balanced (10 vs 10) where there is noise, 0 where there is none
        gains = torch.cat([torch.ones(10, 6), -torch.ones(10, 6)])
        return gains * (levels > 0)

    table = dense.calibrate_noise(gains_fn, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.7, 0.7]), rounds=3, eps2=0.01)
    assert table.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0, 0.73, 0.73])
    # one round of the paper's rule itself still raises a balanced step from 0 (the driver keeps the window)
    assert dense.calibrate_noise_table(torch.tensor([0.0]), torch.zeros(4, 1)).item() == pytest.approx(0.01)


def test_a_noise_table_with_a_moving_window_is_refused():
    from flowalign.config import load_config
    from flowalign.errors import ConfigError

    sliding = ["objective.name=dense_grpo", "sampling.noise_schedule=window", "sampling.noise_kwargs={a: 0.7, size: 2, mode: sliding}"]
    with pytest.raises(ConfigError, match="a sliding noise window with a noise table .* the window would not move"):
        load_config(None, [*sliding, "dense.calibration_rounds=2"])
    assert load_config(None, [*sliding[:2], "sampling.noise_kwargs={a: 0.7, size: 2}", "dense.calibration_rounds=2"])


def test_a_level_decremented_to_zero_is_zero_not_float_round_off():
    """0.7 - 70 x 0.01 in fp32 steps is 3.7e-7: a step left stochastic with a vanishing std."""
    gains = torch.ones(8, 1)  # never balanced: -eps2 each round
    assert dense.calibrate_noise(lambda levels: gains, torch.tensor([0.7]), rounds=70).item() == 0.0
    assert dense.calibrate_noise(lambda levels: gains, torch.tensor([0.3]), rounds=30).item() == 0.0
    assert not bool(sde.is_stochastic("flow_sde", 0.5, 0.4, dense.calibrate_noise(lambda levels: gains, torch.tensor([0.7]), rounds=70)))
    # increments still count from a level below eps2 / 2
    assert dense.calibrate_noise_table(torch.tensor([0.003]), torch.zeros(4, 1), eps1=2, eps2=0.01).item() == pytest.approx(0.013)


def test_the_zero_snap_takes_round_off_only():
    """A level of 0.012 decremented by 0.01 is 0.002, a real level (it was snapped to 0 when the snap took anything < eps2/2)."""
    out = dense.calibrate_noise_table(torch.tensor([0.012, 0.7, 0.0049]), torch.ones(4, 3), eps1=0, eps2=0.01)
    assert out.tolist() == pytest.approx([0.002, 0.69, 0.0], abs=1e-7)


def test_many_small_decrements_to_zero_end_at_zero():
    gains = torch.ones(8, 1)
    assert dense.calibrate_noise(lambda levels: gains, torch.tensor([0.7]), rounds=700, eps2=0.001).item() == 0.0
    assert dense.calibrate_noise(lambda levels: gains, torch.tensor([1.0]), rounds=1000, eps2=0.001).item() == 0.0
