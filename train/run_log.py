"""Per-step metrics of a training run (main process only): ``metrics.csv`` plus TensorBoard / wandb."""
from __future__ import annotations

import csv
import io
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Optional, Sequence

from flowalign.errors import RunLogError
from flowalign.files import write_text_atomic

logger = logging.getLogger(__name__)


def write_metrics_row(path: Path, metrics: dict, step: int, key: str = "iteration") -> None:
    """Add ``metrics`` as the row of ``step`` to the CSV at ``path``, dropping every row whose
    ``key`` column is ``step`` or later: those were logged before a crash and are being replayed
    by a resumed run, so each step keeps exactly one row.

    The common case appends one line: the file ends with a whole line, its header already has
    every column of the row, and its last row is an earlier step. Otherwise (a replayed step, a
    new metric, a torn last line) the file is rewritten whole, beside itself and then renamed, so
    a crash (even SIGKILL) mid-rewrite leaves the previous file whole. A crash mid-append can
    only tear the last line, which belongs to a step after the last checkpoint (the trainers log
    a step before checkpointing it): the resumed run replays that step and the rewrite drops the
    torn line (a row with missing fields, or the replayed step's).
    """
    row = {**metrics, key: step}
    if path.is_file() and _append_row(path, row, step, key):
        return
    _rewrite(path, [*_rows_before(path, step, key), row], key)


def trim_metrics(path: Path, last_step: int, key: str = "iteration") -> int:
    """Drop the rows of ``metrics.csv`` past ``last_step`` (a resumed run's checkpoint: rows a stopped run logged after
    it belong to steps the resumed run replays, or, resumed to an earlier end, never runs); returns how many went."""
    if not path.is_file():
        return 0
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    kept = _before(rows, last_step + 1, key)
    if len(kept) < len(rows):
        _rewrite(path, kept, key)
    return len(rows) - len(kept)


def _rows_before(path: Path, step: int, key: str) -> list[dict]:
    """The whole rows of the CSV at ``path`` (if any) whose ``key`` is below ``step``."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return _before(csv.DictReader(fh), step, key)


def _before(rows, step: int, key: str) -> list[dict]:
    """The whole ``rows`` whose ``key`` is below ``step`` (a torn row is dropped)."""
    return [r for r in rows if _whole(r, key) and int(float(r[key])) < step]


def _rewrite(path: Path, rows: list[dict], key: str) -> None:
    """Write ``rows`` as the whole CSV at ``path``, beside it and then renamed (a crash leaves the previous file)."""
    fields = [key] + sorted({k for r in rows for k in r} - {key})
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _whole(row: dict, key: str) -> bool:
    """False for a torn CSV line: fields missing (None) or extra, or no step."""
    return None not in row and None not in row.values() and row.get(key) != ""


def _append_row(path: Path, row: dict, step: int, key: str) -> bool:
    """Append ``row`` as one line when that keeps the file whole and ordered; False when it needs a rewrite."""
    with open(path, "rb") as fh:
        header_line = fh.readline()
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 65536))
        tail = fh.read()
    if not header_line.endswith(b"\n") or not tail.endswith(b"\n"):
        return False  # empty, or a torn last line
    header = next(csv.reader([header_line.decode("utf-8")]))
    if not header or header[0] != key or not set(row) <= set(header):
        return False  # another layout, or a new metric: the columns are rebuilt
    last_line = tail.rstrip(b"\r\n").rsplit(b"\n", 1)[-1].decode("utf-8")
    if last_line.rstrip("\r") != header_line.decode("utf-8").rstrip("\r\n"):  # the file has rows
        last = next(csv.reader([last_line]))
        try:
            if len(last) != len(header) or int(float(last[0])) >= step:
                return False  # a torn row, or a replayed step
        except ValueError:
            return False
    buffer = io.StringIO()
    csv.DictWriter(buffer, fieldnames=header).writerow(row)
    with open(path, "a", newline="", encoding="utf-8") as fh:
        fh.write(buffer.getvalue())  # one write of one line
    return True


WANDB_ID_FILE = "wandb_run_id.txt"


def wandb_run_id(log_dir: Path, resumed: bool) -> str:
    """The wandb run id of the run logging to ``log_dir``: a resumed run continues the run its first start
    opened (``logs/wandb_run_id.txt``) instead of opening a new one; a fresh run draws a new id and records it.

    wandb drops the steps a resumed run replays (those up to the last one it logged before the stop), which
    ``metrics.csv`` and TensorBoard replace instead.
    """
    path = log_dir / WANDB_ID_FILE
    if resumed and path.is_file():
        recorded = path.read_text(encoding="utf-8").strip()
        if re.fullmatch(r"[a-z0-9]{8,64}", recorded):
            return recorded
        logger.warning("%s holds no wandb run id (%r): this resumed run opens a new wandb run", path, recorded[:80])
    run_id = uuid.uuid4().hex
    log_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, run_id + "\n")
    return run_id


def check_trackers(log_with: Sequence[str], key: str = "train.log_with") -> None:
    """Refuse (ConfigError) a tracker whose package is not installed, before a run builds its model or writes a file:
    ``wandb`` is optional (``pip install 'flowalign-rl[wandb]'``)."""
    import importlib.util

    from flowalign.errors import ConfigError

    for backend, module in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if backend in log_with and importlib.util.find_spec(module) is None:
            extra = " (pip install 'flowalign-rl[wandb]')" if backend == "wandb" else ""
            raise ConfigError(f"{key} names {backend!r}, but the {module} package is not installed here{extra}; "
                              f"install it or leave {backend!r} out of {key}")


class RunLogger:
    """Per-step metrics of the main process: ``metrics.csv`` plus TensorBoard / wandb.

    Args:
        run_dir: the run folder (``metrics.csv`` and ``logs/`` go there).
        log_with: trackers besides ``metrics.csv``: ``"tensorboard"`` and / or ``"wandb"``.
        run_config: the run's configuration as a plain dict (wandb records it).
        key: the CSV's step column (``"iteration"`` online, ``"step"`` offline).
        resumed_at: the step a resumed run continues after: TensorBoard drops the events the old run
            logged past it (``SummaryWriter(purge_step=...)``), which the resumed run logs again, as
            ``metrics.csv`` replaces its rows.
    """

    def __init__(self, run_dir: Path, log_with: Sequence[str], run_config: Optional[dict] = None, key: str = "iteration",
                 resumed_at: Optional[int] = None):
        self.path = run_dir / "metrics.csv"
        self.key = key
        self.trackers: list = []
        if resumed_at is not None:
            dropped = trim_metrics(self.path, resumed_at, key)
            if dropped:
                logger.info("%s: dropped %d row(s) logged after step %d, where this run resumes", self.path, dropped, resumed_at)
        log_dir = run_dir / "logs"
        if "tensorboard" in log_with:
            from torch.utils.tensorboard import SummaryWriter

            self.trackers.append(SummaryWriter(str(log_dir), purge_step=None if resumed_at is None else resumed_at + 1))
        if "wandb" in log_with:
            import wandb  # optional dependency: pip install 'flowalign-rl[wandb]'

            run_id = wandb_run_id(log_dir, resumed=resumed_at is not None)
            self.trackers.append(wandb.init(project="flowalign", dir=str(log_dir), config=run_config or {},
                                            id=run_id, resume="allow"))

    def log(self, metrics: dict, step: int) -> None:
        """Append a ``metrics.csv`` row (replacing rows from ``step`` on, replayed after a resume) and log to trackers.

        Raises:
            RunLogError: the row could not be written (disk full, quota, permissions).
        """
        try:
            write_metrics_row(self.path, metrics, step, key=self.key)
        except OSError as exc:
            raise RunLogError(f"could not write step {step} to {self.path}: {exc.strerror or exc} (errno {exc.errno}); "
                              "the file keeps the earlier steps and the checkpoints are intact: free space, then continue "
                              "with --resume") from exc
        self.log_scalars(metrics, step)

    def add_to_last_row(self, metrics: dict, step: int) -> None:
        """Add ``metrics`` to the CSV row of ``step`` (else write a row of them), and send them to the trackers: a
        final evaluation after the last iteration's row was written. Rows after ``step`` go (the run ends there)."""
        row: dict = {}
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh) if _whole(r, self.key) and int(float(r[self.key])) == step]
            if rows:
                row = {k: v for k, v in rows[-1].items() if k != self.key and v != ""}
        try:
            write_metrics_row(self.path, {**row, **metrics}, step, key=self.key)
        except OSError as exc:
            raise RunLogError(f"could not write step {step} to {self.path}: {exc.strerror or exc} (errno {exc.errno})") from exc
        self.log_scalars(metrics, step)

    def log_scalars(self, metrics: dict, step: int) -> None:
        """Send ``metrics`` to the trackers only (no CSV row)."""
        for tracker in self.trackers:
            if hasattr(tracker, "add_scalar"):
                for key, value in metrics.items():
                    tracker.add_scalar(key, value, step)
                tracker.flush()
            else:
                tracker.log(metrics, step=step)

    def close(self) -> None:
        """Flush and close every tracker."""
        for tracker in self.trackers:
            (tracker.close if hasattr(tracker, "close") else tracker.finish)()
