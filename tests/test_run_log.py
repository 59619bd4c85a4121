"""metrics.csv: one line appended per step, rewritten whole (atomically) only when it must be, and
whole again after a crash in either write (train/run_log.py)."""
import csv

import pytest

from flowalign.train import run_log
from flowalign.train.run_log import RunLogger, write_metrics_row


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _iterations(path):
    return [int(r["iteration"]) for r in _rows(path)]


def _no_rewrite(monkeypatch):
    def forbidden(*args):
        raise AssertionError("metrics.csv was rewritten")

    monkeypatch.setattr(run_log.os, "replace", forbidden)


def test_a_crash_mid_rewrite_keeps_the_previous_metrics(tmp_path, monkeypatch):
    log = RunLogger(tmp_path, log_with=[])
    for step in (1, 2, 3):
        log.log({"reward/mean": 0.1 * step}, step)
    assert _iterations(tmp_path / "metrics.csv") == [1, 2, 3]

    def crash(self, rows):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(csv.DictWriter, "writerows", crash)
    with pytest.raises(KeyboardInterrupt):
        log.log({"reward/mean": 0.4, "kl/ref": 0.1}, 4)  # a new metric: the columns are rebuilt, the file rewritten
    assert _iterations(tmp_path / "metrics.csv") == [1, 2, 3]  # the old file, whole (a truncating write left it empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no temporary file left behind
    monkeypatch.undo()
    log.log({"reward/mean": 0.4, "kl/ref": 0.1}, 4)
    assert _iterations(tmp_path / "metrics.csv") == [1, 2, 3, 4]
    assert [r["kl/ref"] for r in _rows(tmp_path / "metrics.csv")] == ["", "", "", "0.1"]


def test_steps_append_one_line_and_give_what_a_rewrite_gives(tmp_path, monkeypatch):
    appended, rewritten = tmp_path / "a.csv", tmp_path / "b.csv"
    write_metrics_row(appended, {"loss": 1.0, "reward/mean": 0.5}, 1)
    write_metrics_row(rewritten, {"loss": 1.0, "reward/mean": 0.5}, 1)
    with monkeypatch.context() as m:
        _no_rewrite(m)
        write_metrics_row(appended, {"loss": 0.9, "reward/mean": 0.6}, 2)
        write_metrics_row(appended, {"loss": 0.8}, 3)  # a metric missing at a step: an empty cell
    write_metrics_row(rewritten, {"loss": 0.9, "reward/mean": 0.6}, 2)
    write_metrics_row(rewritten, {"loss": 0.8, "kl/ref": 0.0}, 3)  # forces the rewrite path...
    write_metrics_row(rewritten, {"loss": 0.8}, 3)  # ...and replays step 3 without the new column's value
    assert appended.read_text() == "iteration,loss,reward/mean\n1,1.0,0.5\n2,0.9,0.6\n3,0.8,\n"
    assert [{k: v for k, v in r.items() if k != "kl/ref"} for r in _rows(rewritten)] == _rows(appended)


def test_a_replayed_step_rewrites_and_drops_the_later_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    for step in (1, 2, 3, 4):
        write_metrics_row(path, {"loss": float(step)}, step)
    write_metrics_row(path, {"loss": 20.0}, 2)  # a resumed run replays step 2
    assert [(r["iteration"], r["loss"]) for r in _rows(path)] == [("1", "1.0"), ("2", "20.0")]


@pytest.mark.parametrize("torn", ["4,0.", "1", "4,0.25,0.1,9"])
def test_a_torn_last_line_from_a_killed_append_is_dropped_by_the_replay(tmp_path, torn):
    """SIGKILL mid-append leaves part of step 4's line (cut after its first character, its key 1
    of 12 looks like an old step); the resumed run replays step 4 and the file is whole again."""
    path = tmp_path / "metrics.csv"
    for step in (1, 2, 3):
        write_metrics_row(path, {"loss": float(step)}, step)
    with open(path, "a") as fh:
        fh.write(torn)  # no newline: the write was cut
    write_metrics_row(path, {"loss": 4.0}, 4)
    assert [(r["iteration"], r["loss"]) for r in _rows(path)] == [("1", "1.0"), ("2", "2.0"), ("3", "3.0"), ("4", "4.0")]
    assert path.read_text().endswith("4,4.0\n")


def test_a_torn_line_with_its_newline_is_still_dropped(tmp_path):
    path = tmp_path / "metrics.csv"
    for step in (1, 2):
        write_metrics_row(path, {"loss": float(step), "reward/mean": 0.5}, step)
    with open(path, "a") as fh:
        fh.write("1\n")  # a cut line that did get a newline: too few fields
    write_metrics_row(path, {"loss": 3.0, "reward/mean": 0.5}, 3)
    assert _iterations(path) == [1, 2, 3]
    assert path.read_text() == "iteration,loss,reward/mean\n1,1.0,0.5\n2,2.0,0.5\n3,3.0,0.5\n"


def test_a_full_disk_is_one_flowalign_error_and_keeps_the_written_rows(tmp_path, monkeypatch):
    import errno

    from flowalign.errors import FlowalignError, RunLogError

    log = RunLogger(tmp_path, log_with=[])
    log.log({"loss": 1.0}, 1)
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if "a" in mode or "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(RunLogError, match=r"could not write step 2 to .*metrics.csv: No space left on device \(errno 28\); .*--resume") as info:
        log.log({"loss": 0.5}, 2)
    assert isinstance(info.value, FlowalignError) and isinstance(info.value, OSError)
    monkeypatch.undo()
    assert _iterations(tmp_path / "metrics.csv") == [1]


def test_a_resumed_run_purges_the_tensorboard_steps_it_replays(tmp_path):
    """Resumed at iteration 2 of a run that logged 4, TensorBoard keeps one event per step (it had two for 3 and 4)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = RunLogger(tmp_path, ["tensorboard"])
    for step in (1, 2, 3, 4):
        first.log({"reward/mean": float(step)}, step)
    first.close()
    resumed = RunLogger(tmp_path, ["tensorboard"], resumed_at=2)
    for step in (3, 4):
        resumed.log({"reward/mean": 10.0 + step}, step)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    scalars = events.Scalars("reward/mean")
    assert [(e.step, e.value) for e in scalars] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


class _FakeWandb:
    """Stands in for the optional ``wandb`` package: records each ``init``'s keyword arguments."""

    def __init__(self):
        self.inits = []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, metrics, step):
                fake.logged = (metrics, step)

            def finish(self):
                pass

        return Run()


@pytest.fixture
def fake_wandb(monkeypatch):
    import sys

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def test_a_resumed_run_continues_its_wandb_run_and_a_fresh_one_opens_a_new_run(tmp_path, fake_wandb):
    first = RunLogger(tmp_path / "a", ["wandb"])
    first.log({"reward/mean": 0.5}, 1)
    first.close()
    resumed = RunLogger(tmp_path / "a", ["wandb"], resumed_at=1)
    resumed.close()
    other = RunLogger(tmp_path / "b", ["wandb"])
    other.close()
    ids = [kwargs["id"] for kwargs in fake_wandb.inits]
    assert ids[0] == ids[1] and ids[2] != ids[0]
    assert all(kwargs["resume"] == "allow" for kwargs in fake_wandb.inits)
    assert fake_wandb.logged == ({"reward/mean": 0.5}, 1)


def test_a_restarted_run_in_the_same_folder_opens_a_new_wandb_run(tmp_path, fake_wandb):
    """Not resumed (a fresh start after --overwrite kept logs/ by accident): a new run, not the old one's."""
    RunLogger(tmp_path, ["wandb"]).close()
    RunLogger(tmp_path, ["wandb"]).close()
    assert fake_wandb.inits[0]["id"] != fake_wandb.inits[1]["id"]


def test_a_garbled_wandb_id_file_gives_a_new_run_with_a_warning(tmp_path, fake_wandb, caplog):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / run_log.WANDB_ID_FILE).write_text("../../etc\n")
    with caplog.at_level("WARNING"):
        RunLogger(tmp_path, ["wandb"], resumed_at=3).close()
    assert fake_wandb.inits[0]["id"] != "../../etc" and "no wandb run id" in caplog.text


def _rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_run_resumed_to_an_earlier_end_keeps_only_its_own_rows(tmp_path):
    """Killed after logging iteration 3 but before its checkpoint, then resumed with iterations=2 (the checkpoint of 2 is
    the end): row 3 of the abandoned run stayed in metrics.csv (and the reward curve), and the final evaluation, which
    added its eval/* to "the last row" only, replaced row 2 with a row of its own, losing row 2's training metrics."""
    from tiny_run import train_argv

    from flowalign.train import cli

    run = tmp_path / "run"
    settings = ["train.iterations=3", "train.checkpoint_every=1", "train.eval_every=-1", "train.log_with=[]", "train.progress=false"]
    assert cli.main(train_argv(run, settings)) == 0
    before = _rows(run / "metrics.csv")
    assert [r["iteration"] for r in before] == ["1", "2", "3"]
    import shutil

    shutil.rmtree(run / "checkpoints" / "iter_000003")  # as if killed before writing it
    (run / "samples").mkdir(exist_ok=True)
    (run / "samples" / "iter_000003.png").write_bytes(b"a grid of the abandoned iteration")
    (run / ".pytorch_lora_weights.4242.tmp").mkdir()  # a killed final write's temporary copy
    (run / ".pytorch_lora_weights.4242.tmp" / "x").write_bytes(b"x")
    (run / ".report.4242.tmp.md").write_text("half a report")
    assert cli.main(["train", "--resume", str(run), "--set", "train.iterations=2", "--set", "train.eval_every=0"]) == 0
    after = _rows(run / "metrics.csv")
    assert [r["iteration"] for r in after] == ["1", "2"]
    assert after[1]["reward/mean"] == before[1]["reward/mean"] and after[1]["eval/brightness/mean"] != ""  # row 2 kept, eval added
    assert not (run / "samples" / "iter_000003.png").exists()
    assert not any(p.name.startswith((".pytorch_lora_weights.", ".report.")) for p in run.iterdir())


def test_a_folder_holding_only_a_killed_first_write_is_empty(tmp_path):
    """A run killed while writing its first file (config.yaml) left `.config.<n>.tmp.yaml`: a fresh start and --overwrite
    then refused the folder ("holds no flowalign run") and --resume found no checkpoint; it had to be deleted by hand."""
    from tiny_run import train_argv

    from flowalign.train import cli
    from flowalign.train.run_dir import is_empty

    run = tmp_path / "run"
    run.mkdir()
    (run / ".config.77.tmp.yaml").write_text("train: {")
    (run / ".DS_Store").write_bytes(b"")
    assert is_empty(run)
    (run / "notes.txt").write_text("mine")
    assert not is_empty(run)
    (run / "notes.txt").unlink()
    assert cli.main(train_argv(run, ["train.iterations=1", "train.eval_every=-1", "train.log_with=[]", "train.progress=false"])) == 0
    assert not (run / ".config.77.tmp.yaml").exists() and (run / "config.yaml").is_file()
