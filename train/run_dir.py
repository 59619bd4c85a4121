"""Run folders: may a run start here (``--overwrite`` / ``--resume``), and which checkpoint resumes it."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional, Union

from flowalign import checkpoint as ckpt
from flowalign.config import FlowalignConfig, config_diff, config_hash, load_config
from flowalign.errors import CheckpointError, ConfigError
from flowalign.train.run_lock import LOCK_NAME, refuse_file

logger = logging.getLogger(__name__)


# what an online run writes into its folder: --overwrite deletes these and nothing else
RUN_ENTRIES = frozenset({
    "config.yaml", "checkpoints", "logs", "samples", "metrics.csv", "reward_curve.png", "before_after.png",
    "heldout_accuracy.png", "report.md", "report.json", "eval_base.json", "eval_aligned.json",
    "pytorch_lora_weights.safetensors", "noise_table.json",
    "report_partial",  # the held-out report's journals while it samples (flowalign.train.final_outputs)
    "eval_partial",  # the same, as runs of 2026-12-07 before report_partial wrote it
})
# what an offline run writes
OFFLINE_RUN_ENTRIES = frozenset({
    "offline_config.yaml", "checkpoints", "logs", "metrics.csv", "training_curve.png", "pytorch_lora_weights.safetensors",
})


# the temporary names of an interrupted atomic write: flowalign.files (".report.123.tmp.md", ".pytorch_lora_weights.123.tmp")
# and metrics.csv's rewrite (".metrics.csv.tmp")
_TEMPORARY = re.compile(r"\.[^/]+\.\d+\.tmp(\.[A-Za-z0-9]+)?|\.metrics\.csv\.tmp")
# what operating systems and tools drop into any folder someone browses: neither a run's nor a reason to refuse one
_SYSTEM_FILES = re.compile(r"\.DS_Store|Thumbs\.db|desktop\.ini|\.ipynb_checkpoints|\.nfs.*")


def _is_temporary(name: str) -> bool:
    """A hidden temporary file or folder of an interrupted atomic write, by the exact names flowalign writes."""
    return _TEMPORARY.fullmatch(name) is not None


def foreign_entries(run_dir: Path, known: frozenset = RUN_ENTRIES) -> list[str]:
    """Names in ``run_dir`` that a run does not write (sorted; system files such as ``.DS_Store`` and the run
    lock aside): a folder holding any is never cleared."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir()
                  if p.name not in known and p.name != LOCK_NAME and not _is_temporary(p.name) and not _SYSTEM_FILES.fullmatch(p.name))


def is_empty(run_dir: Path) -> bool:
    """``run_dir`` is missing or holds nothing but the run lock (which the starting run itself took), temporary files of
    an interrupted write (a run killed while writing its first file) and system files."""
    return not run_dir.exists() or all(p.name == LOCK_NAME or _is_temporary(p.name) or _SYSTEM_FILES.fullmatch(p.name)
                                       for p in run_dir.iterdir())


def remove_interrupted_writes(run_dir: Path) -> list[str]:
    """Delete the temporary files and folders of atomic writes a killed run left in ``run_dir`` (top level, by the exact
    names flowalign writes; the caller holds the run lock, so no other run is writing them); returns their names."""
    removed = []
    for path in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        if _is_temporary(path.name):
            _delete(path)
            removed.append(path.name)
    if removed:
        logger.info("%s: removed %d unfinished write(s) of an interrupted run: %s", run_dir, len(removed), ", ".join(removed))
    return removed


def clear_run_dir(run_dir: Path, known: frozenset = RUN_ENTRIES) -> None:
    """Delete what a run wrote into ``run_dir`` (``known`` names and interrupted temporary files), never
    anything else: ``--overwrite`` used to delete the whole folder."""
    for path in list(run_dir.iterdir()) if run_dir.is_dir() else []:
        if path.name in known or _is_temporary(path.name):
            _delete(path)


def _delete(path: Path) -> None:
    """Remove a file, a link or a folder tree (a link itself, never what it points to)."""
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def refuse_foreign(run_dir: Path, known: frozenset = RUN_ENTRIES, key: str = "train.output_dir", what: str = "a run") -> None:
    """ConfigError when ``run_dir`` holds entries ``what`` does not write (they would be kept, but a folder
    mixing a run with other files is not one to clear or to write a run into)."""
    foreign = foreign_entries(run_dir, known)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
        raise ConfigError(f"{key} {run_dir} holds files {what} does not write ({shown}): choose another {key.split('.')[-1]}, "
                          "or move them out first")


def refuse_other_kind(run_dir: Path, command: str) -> None:
    """ConfigError when ``--resume`` of ``command`` (``"train"`` or ``"offline"``) points at a run of the other command,
    naming the command that continues it (each would otherwise blame the config hash or the missing checkpoint)."""
    import shlex

    quoted = shlex.quote(str(run_dir))
    if command == "offline" and (run_dir / "config.yaml").is_file() and not (run_dir / "offline_config.yaml").is_file():
        raise ConfigError(f"{run_dir} holds a `flowalign train` run, not an offline one: continue it with "
                          f"`flowalign train --resume {quoted}`")
    if command == "train" and (run_dir / "offline_config.yaml").is_file() and not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} holds a `flowalign offline` run, not a train run: continue it with "
                          f"`flowalign offline --resume {quoted}`")


def prepare_run_dir(run_dir: Path, config: FlowalignConfig, resume: bool, overwrite: bool) -> bool:
    """Check that a run may start in ``run_dir``; return True when an old run must be cleared first.

    Writes nothing: the caller clears (``--overwrite``) only once every component is built.

    Raises:
        ConfigError: ``run_dir`` holds a run (or foreign files) and neither resume nor overwrite.
    """
    refuse_file(run_dir)
    try:
        str(run_dir.absolute()).encode("utf-8")
    except UnicodeEncodeError:  # bytes of another encoding in a Linux file name: TensorBoard's writer dies on them mid-setup
        raise ConfigError(f"train.output_dir {str(run_dir)!r} is not valid UTF-8, which TensorBoard and the run's files need; "
                          "rename the folder") from None
    if resume:
        refuse_other_kind(run_dir, "train")
        if (run_dir / "config.yaml").is_file():
            previous = load_config(run_dir / "config.yaml")
            changed = config_diff(previous, config)
            if config_hash(previous) != config_hash(config):  # before the model loads (the checkpoint would refuse it after)
                blamed = config_diff(previous, config, hashed_only=True) or changed
                raise CheckpointError(f"cannot resume {run_dir}: it was trained with config hash {config_hash(previous)}, this "
                                      f"config's is {config_hash(config)}; the settings that change the run: {', '.join(blamed)}. "
                                      f"--resume may change only what does not change the computation (such as train.iterations "
                                      f"under a constant lr, logging, checkpointing); pass --overwrite or another train.output_dir "
                                      f"to start over")
            if changed:
                logger.warning("resuming %s with changed settings: %s", run_dir, ", ".join(changed))
        return False
    if is_empty(run_dir):
        return False
    is_run, previous, why = _run_config(run_dir)
    if not is_run:  # --overwrite must never delete a folder that is not a run (its rmtree takes everything)
        raise ConfigError(f"train.output_dir {run_dir} is not empty and holds no flowalign run ({why}); choose another output_dir")
    if not overwrite:
        same = previous is not None and config_hash(previous) == config_hash(config)
        what = "a run of the same config" if same else "a different run"
        raise ConfigError(f"train.output_dir {run_dir} already holds {what}; pass --resume to continue it, --overwrite to replace it, "
                          "or --set train.output_dir=<another folder> to keep it")
    refuse_foreign(run_dir)  # --overwrite deletes a run's files only, and only from a folder holding nothing else
    return True


def _run_config(run_dir: Path) -> tuple[bool, Optional[FlowalignConfig], str]:
    """``(is a run, its config or None, why not a run)``. A run folder is one whose ``config.yaml`` is a
    mapping of flowalign config sections (a stray ``config.yaml`` is not); its config is None when it no
    longer validates (a run of an older flowalign whose settings are refused today)."""
    import dataclasses

    import yaml

    from flowalign.config import load_yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return False, None, "no config.yaml"
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        return False, None, f"its config.yaml cannot be read as YAML: {' '.join(str(exc).split())[:120]}"
    sections = {f.name for f in dataclasses.fields(FlowalignConfig)}
    if not isinstance(data, dict) or not data or not set(data) <= sections:
        keys = sorted(map(str, data))[:5] if isinstance(data, dict) else type(data).__name__
        return False, None, f"its config.yaml is not a flowalign config: top level {keys}"
    try:
        return True, load_config(path), ""
    except ConfigError:
        return True, None, ""


def find_resume_checkpoint(resume: Union[bool, str, Path], run_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from: ``resume`` itself when it is a checkpoint folder, else the
    newest valid one under ``<resume or run_dir>/checkpoints``; None (with a warning) for a run folder
    that holds no checkpoint yet (stopped before its first one: nothing trained is lost, so it starts
    again from iteration 0 rather than sending the user from --resume to --overwrite and back).

    Raises:
        CheckpointError: no valid checkpoint there, and no run either.
    """
    output_dir = run_dir
    if isinstance(resume, (str, Path)):
        if not Path(resume).is_dir():
            raise CheckpointError(f"--resume {resume}: no such run folder or checkpoint folder")
        if (Path(resume) / ckpt.MANIFEST).is_file():
            return Path(resume)
        run_dir = Path(resume)
    found = ckpt.find_latest(run_dir / "checkpoints")
    if found is None:
        # only the run this call would write into restarts (a Trainer resuming another folder must not clear its own)
        if Path(run_dir).resolve() == Path(output_dir).resolve() and never_checkpointed(run_dir) and _run_config(run_dir)[0]:
            logger.warning("--resume: %s holds a run stopped before its first checkpoint: starting it again from iteration 0",
                           run_dir)
            return None
        raise CheckpointError(f"--resume: no valid checkpoint under {run_dir / 'checkpoints'}")
    return found


def refuse_past_the_end(checkpoint: Path, iterations: int, unit: str = "iteration", limit: str = "train.iterations={n}",
                        fix: str = "set train.iterations to {done} or more") -> None:
    """ConfigError when ``checkpoint`` is past ``train.iterations`` (an offline run: its steps, ``unit="step"``): the
    resumed run would train nothing and report ``iterations`` done while the LoRA is the checkpoint's (a checkpoint at
    exactly ``iterations`` is a finished run, whose end --resume writes again). ``limit`` and ``fix`` word the message."""
    try:  # the manifest alone (find_latest verified it, load_checkpoint verifies it again): no second sha256 pass
        done = json.loads((checkpoint / ckpt.MANIFEST).read_text(encoding="utf-8"))["iteration"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a damaged manifest: load_checkpoint names what is wrong
    if isinstance(done, int) and done > iterations:
        raise ConfigError(f"--resume: {checkpoint} is at {unit} {done}, past {limit.format(n=iterations)}; "
                          f"{fix.format(done=done)} to continue it (or resume an earlier checkpoint)")


def never_checkpointed(run_dir: Path) -> bool:
    """True for a run folder with no checkpoint folder at all (valid or not) and no final LoRA: a run stopped
    before its first checkpoint, which loses nothing trained by starting again."""
    return not ckpt.list_checkpoints(run_dir / "checkpoints") and not (run_dir / "pytorch_lora_weights.safetensors").exists()
