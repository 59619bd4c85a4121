"""bench/heldout_curve.py: the figure (both panels drawn from stored curves) and the per-interval training diagnostics."""
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
