"""``flowalign train`` argument lists on the tiny recipe, for the tests that train a plugin for an iteration or two."""
from __future__ import annotations

from pathlib import Path

TINY_RECIPE = Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_grpo.yaml"


def train_argv(run, settings, *extra) -> list:
    """``flowalign train --config tiny_grpo.yaml`` with ``--set`` for each item of ``settings``, ``train.output_dir=run``
    and each of ``extra`` (later items win)."""
    argv = ["train", "--config", str(TINY_RECIPE)]
    for item in [*settings, f"train.output_dir={run}", *extra]:
        argv += ["--set", item]
    return argv
