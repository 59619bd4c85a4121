"""metric_panels (flowalign/plots.py): one panel per (title, keys) present in metrics.csv."""
import pytest
from PIL import Image

from flowalign.plots import metric_panels


def _csv(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss,gdro/implicit_acc,gdro/implicit_reward_mean\n1,6.5,0.5,\n2,6.4,0.75,0.01\n3,6.2,1.0,0.02\n")
    return path


def test_one_panel_per_title_and_panels_without_columns_are_dropped(tmp_path):
    path = _csv(tmp_path)
    three = metric_panels(path, tmp_path / "a.png", [("loss", ["loss"]), ("acc", ["gdro/implicit_acc"]),
                                                     ("reward", ["gdro/implicit_reward_mean", "dpo/margin"])])
    assert Image.open(three).size == (1350, 360)  # 4.5 x 3.6 inches at 100 dpi per panel
    two = metric_panels(path, tmp_path / "b.png", [("loss", ["loss"]), ("margin", ["dpo/margin"]), ("acc", ["gdro/implicit_acc"])])
    assert Image.open(two).size == (900, 360)  # the DPO panel has no column here


def test_missing_x_or_every_key_missing_is_an_error(tmp_path):
    path = _csv(tmp_path)
    with pytest.raises(ValueError, match="no 'iteration' column"):
        metric_panels(path, tmp_path / "c.png", [("loss", ["loss"])], x="iteration")
    with pytest.raises(ValueError, match=r"none of the columns \['dpo/margin'\]"):
        metric_panels(path, tmp_path / "c.png", [("margin", ["dpo/margin"])])
    assert not (tmp_path / "c.png").exists()
