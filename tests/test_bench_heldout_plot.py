"""bench/heldout_curve.py: the figure (both panels drawn from stored curves) and the per-interval training diagnostics."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import heldout_curve  # noqa: E402


def _curve(values):
    return {"points": [{"iteration": 10 * i, "heldout": {"all": v}} for i, v in enumerate(values)]}


def test_plot_writes_png_with_highlighted_and_grey_variants(tmp_path):
    results = {"variants": {"main": _curve([0.27, 0.36, 0.38]), "other": _curve([0.27, 0.30]), "empty": {"points": []}}}
    path = heldout_curve.plot(results, tmp_path / "curve.png", highlight=("main", "missing"))
    assert path == tmp_path / "curve.png"
    from PIL import Image

    with Image.open(path) as image:
        assert image.width > 1000 and image.height >= 500


def test_plot_without_curves_writes_nothing(tmp_path):
    assert heldout_curve.plot({"variants": {"empty": {"points": []}}}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_interval_means_by_hand():
    metrics = [
        {"policy/clip_frac": 0.5, "grad_norm": 1.0, "reward/mean": 0.2},
        {"policy/clip_frac": 0.0, "grad_norm": float("nan"), "reward/mean": 0.4},
        {"policy/clip_frac": 0.25, "reward/mean": 0.9, "loss/policy": 3.0},
    ]
    means = heldout_curve.interval_means(metrics)
    # clip fraction over all three iterations, the gradient norm over the one finite value, keys never logged left out
    assert means == {"reward/mean": 0.5, "policy/clip_frac": 0.25, "grad_norm": 1.0}
    assert heldout_curve.interval_means(metrics, keys=("loss/policy",)) == {"loss/policy": 3.0}
    assert heldout_curve.interval_means([]) == {}


def test_probe_replay_help_lists_its_own_flags_and_its_flags_reach_the_trainer(capsys, monkeypatch):
    """bench/probe_replay.py parsed its flags with a help-less pre-parser, so ``--help`` showed only heldout_curve's."""
    import probe_replay

    monkeypatch.setattr(heldout_curve, "Trainer", heldout_curve.Trainer)  # main() swaps in its ReplayTrainer
    with pytest.raises(SystemExit):
        probe_replay.main(["--help"])
    out = capsys.readouterr().out
    assert "--weight" in out and "--min-score" in out and "--iterations" in out

    class Parsed(Exception):
        pass

    def stop(*args, **kwargs):  # called right after the flags are parsed and handed over
        raise Parsed

    monkeypatch.setattr(heldout_curve.logging, "basicConfig", stop)
    monkeypatch.setattr(probe_replay.ReplayTrainer, "weight", 1.0)
    monkeypatch.setattr(probe_replay.ReplayTrainer, "rows", 64)
    with pytest.raises(Parsed):
        probe_replay.main(["--name", "x", "--weight", "0.25", "--rows", "7", "--iterations", "3"])
    assert probe_replay.ReplayTrainer.weight == 0.25 and probe_replay.ReplayTrainer.rows == 7


def test_a_probes_own_flags_are_stored_with_its_curve(tmp_path, monkeypatch):
    """The stored ``overrides`` are the recipe's only: a probe's flags (weights, modes) are kept under ``probe``."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--hybrid", type=float, default=0.0)
    parser.add_argument("--reward-mode", default="mean")
    curve = {"points": [{"iteration": 0, "heldout": {"all": 0.25}}], "iteration_s_mean": 1.0}
    monkeypatch.setattr(heldout_curve, "run_curve", lambda *a, **k: dict(curve))
    monkeypatch.setattr(heldout_curve, "plot", lambda *a, **k: None)
    out = tmp_path / "curves.json"
    heldout_curve.main(["--name", "p", "--hybrid", "3e-4", "--reward-mode", "product", "--output", str(out)], parents=(parser,))
    heldout_curve.main(["--name", "plain", "--output", str(out)])
    stored = json.loads(out.read_text())["variants"]
    assert stored["p"]["probe"] == {"hybrid": 3e-4, "reward_mode": "product"}
    assert "probe" not in stored["plain"]
