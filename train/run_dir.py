"""Run folders: may a run start here (``--overwrite`` / ``--resume``), and which checkpoint resumes it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

from flowalign import checkpoint as ckpt
from flowalign.config import FlowalignConfig, config_diff, config_hash, load_config
from flowalign.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)


def prepare_run_dir(run_dir: Path, config: FlowalignConfig, resume: bool, overwrite: bool) -> bool:
    """Check that a run may start in ``run_dir``; return True when an old run must be cleared first.

    Writes nothing: the caller clears (``--overwrite``) only once every component is built.

    Raises:
        ConfigError: ``run_dir`` holds a run (or foreign files) and neither resume nor overwrite.
    """
    if resume:
        if (run_dir / "config.yaml").is_file():
            changed = config_diff(load_config(run_dir / "config.yaml"), config)
            if changed:
                logger.warning("resuming %s with changed settings: %s", run_dir, ", ".join(changed))
        return False
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return False
    previous, why = _run_config(run_dir)
    if previous is None:  # --overwrite must never delete a folder that is not a run (its rmtree takes everything)
        raise ConfigError(f"train.output_dir {run_dir} is not empty and holds no flowalign run ({why}); choose another output_dir")
    if not overwrite:
        same = config_hash(previous) == config_hash(config)
        what = "a run of the same config" if same else "a different run"
        raise ConfigError(f"train.output_dir {run_dir} already holds {what}; pass --resume to continue it or --overwrite to replace it")
    return True


def _run_config(run_dir: Path) -> tuple[Optional[FlowalignConfig], str]:
    """The config of the run in ``run_dir`` and "", or None and why the folder is not a run: a run
    folder is one whose ``config.yaml`` is a flowalign config (a stray ``config.yaml`` is not)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None, "no config.yaml"
    try:
        return load_config(path), ""
    except ConfigError as exc:
        return None, f"its config.yaml is not a flowalign config: {exc}"


def find_resume_checkpoint(resume: Union[bool, str, Path], run_dir: Path) -> Path:
    """The checkpoint to resume from: ``resume`` itself when it is a checkpoint folder, else the
    newest valid one under ``<resume or run_dir>/checkpoints``.

    Raises:
        CheckpointError: no valid checkpoint there.
    """
    if isinstance(resume, (str, Path)):
        if not Path(resume).is_dir():
            raise CheckpointError(f"--resume {resume}: no such run folder or checkpoint folder")
        if (Path(resume) / ckpt.MANIFEST).is_file():
            return Path(resume)
        run_dir = Path(resume)
    found = ckpt.find_latest(run_dir / "checkpoints")
    if found is None:
        raise CheckpointError(f"--resume: no valid checkpoint under {run_dir / 'checkpoints'}")
    return found
