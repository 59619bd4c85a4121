"""Per-step metrics of a training run (main process only): ``metrics.csv`` plus TensorBoard / wandb."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional, Sequence


def write_metrics_row(path: Path, metrics: dict, step: int, key: str = "iteration") -> None:
    """Add ``metrics`` as the row of ``step`` to the CSV at ``path``, dropping every row whose
    ``key`` column is ``step`` or later: those were logged before a crash and are being replayed
    by a resumed run, so each step keeps exactly one row.

    The file is small and rewritten whole (the columns stay aligned when a later row brings new
    metrics), beside itself and then renamed, so a crash (even SIGKILL) mid-write leaves the
    previous file whole.
    """
    rows: list[dict] = []
    if path.is_file():
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(float(r[key])) < step]
    rows.append({**metrics, key: step})
    fields = [key] + sorted({k for r in rows for k in r} - {key})
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class RunLogger:
    """Per-step metrics of the main process: ``metrics.csv`` plus TensorBoard / wandb.

    Args:
        run_dir: the run folder (``metrics.csv`` and ``logs/`` go there).
        log_with: trackers besides ``metrics.csv``: ``"tensorboard"`` and / or ``"wandb"``.
        run_config: the run's configuration as a plain dict (wandb records it).
        key: the CSV's step column (``"iteration"`` online, ``"step"`` offline).
    """

    def __init__(self, run_dir: Path, log_with: Sequence[str], run_config: Optional[dict] = None, key: str = "iteration"):
        self.path = run_dir / "metrics.csv"
        self.key = key
        self.trackers: list = []
        log_dir = run_dir / "logs"
        if "tensorboard" in log_with:
            from torch.utils.tensorboard import SummaryWriter

            self.trackers.append(SummaryWriter(str(log_dir)))
        if "wandb" in log_with:
            import wandb  # optional dependency: pip install 'flowalign-rl[wandb]'

            self.trackers.append(wandb.init(project="flowalign", dir=str(log_dir), config=run_config or {}))

    def log(self, metrics: dict, step: int) -> None:
        """Append a ``metrics.csv`` row (replacing rows from ``step`` on, replayed after a resume) and log to trackers."""
        write_metrics_row(self.path, metrics, step, key=self.key)
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
