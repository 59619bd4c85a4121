"""metrics.csv survives a crash while it is rewritten (train/run_log.py)."""
import csv

import pytest

from flowalign.train.run_log import RunLogger


def _iterations(path):
    with open(path, newline="") as fh:
        return [int(r["iteration"]) for r in csv.DictReader(fh)]


def test_a_crash_mid_write_keeps_the_previous_metrics(tmp_path, monkeypatch):
    log = RunLogger(tmp_path, log_with=[])
    for step in (1, 2, 3):
        log.log({"reward/mean": 0.1 * step}, step)
    assert _iterations(tmp_path / "metrics.csv") == [1, 2, 3]

    def crash(self, rows):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(csv.DictWriter, "writerows", crash)
    with pytest.raises(KeyboardInterrupt):
        log.log({"reward/mean": 0.4}, 4)
    assert _iterations(tmp_path / "metrics.csv") == [1, 2, 3]  # the old file, whole (a truncating write left it empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no temporary file left behind
    monkeypatch.undo()
    log.log({"reward/mean": 0.4}, 4)
    assert _iterations(tmp_path / "metrics.csv") == [1, 2, 3, 4]
