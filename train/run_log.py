"""Per-iteration metrics of a training run (main process only): ``metrics.csv`` plus TensorBoard / wandb."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from flowalign.config import FlowalignConfig


class RunLogger:
    """Per-iteration metrics of the main process: ``metrics.csv`` plus TensorBoard / wandb."""

    def __init__(self, run_dir: Path, config: FlowalignConfig):
        self.path = run_dir / "metrics.csv"
        self.trackers: list = []
        log_dir = run_dir / "logs"
        if "tensorboard" in config.train.log_with:
            from torch.utils.tensorboard import SummaryWriter

            self.trackers.append(SummaryWriter(str(log_dir)))
        if "wandb" in config.train.log_with:
            import wandb  # optional dependency: pip install 'flowalign-rl[wandb]'

            from flowalign.config import to_dict

            self.trackers.append(wandb.init(project="flowalign", dir=str(log_dir), config=to_dict(config)))

    def log(self, metrics: dict, step: int) -> None:
        """Append a ``metrics.csv`` row (replacing rows from ``step`` on, replayed after a resume) and log to trackers."""
        rows: list[dict] = []
        if self.path.is_file():
            with open(self.path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(float(r["iteration"])) < step]
        rows.append({**metrics, "iteration": step})
        fields = ["iteration"] + sorted({k for r in rows for k in r} - {"iteration"})
        # small file: rewriting keeps the columns aligned; written beside it and renamed, so a crash
        # (even SIGKILL) mid-write leaves the previous metrics.csv whole
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self.log_scalars(metrics, step)

    def log_scalars(self, metrics: dict, step: int) -> None:
        for tracker in self.trackers:
            if hasattr(tracker, "add_scalar"):
                for key, value in metrics.items():
                    tracker.add_scalar(key, value, step)
                tracker.flush()
            else:
                tracker.log(metrics, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            (tracker.close if hasattr(tracker, "close") else tracker.finish)()
