"""The finished batches of an evaluation on disk, so that a killed evaluation resumes where it stopped.

    journal = EvalJournal("runs/sd35_eval/eval_partial", key={"model": ..., "num_steps": 40, ...})
    done = journal.load()                     # {first sample index: EvalBatch} of batches already scored
    ...                                       # sample and score the other batches, journal.save(batch) after each
    journal.remove()                          # once the whole evaluation is written elsewhere

:func:`flowalign.evaluation.evaluate` (``journal=``) writes one safetensors file per batch as soon as
it is scored, atomically, named by the process's share and the batch's first sample index
(``share0of1_rows0000032.safetensors``). Each file carries the evaluation's *key* (everything that
decides a sample's outcome: model, LoRA, prompts, seeds, steps, guidance, reward, ...) in its
metadata, so a journal written under other settings is never mixed with a new evaluation: it is
refused, naming the settings that differ (``on_mismatch="refuse"``, ``flowalign eval``), or
discarded with a warning (``"discard"``, the trainer's report). ``restart=True`` deletes that
process's files first, and those of launches with another process count. Every process of a sharded evaluation writes its own share's files and reads
every share's (:meth:`EvalJournal.load`), so an evaluation killed on 8 processes resumes on 4, or on one:
``evaluate`` takes a journaled sample back by its index, and a batch is taken back when all of its samples
are journaled (with another layout they come from other batches, so they match a fresh run's up to the
float rounding of the batch they were drawn in). The batch size is not part of the key either.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from flowalign.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["EvalBatch", "EvalJournal", "JOURNAL_VERSION"]

JOURNAL_VERSION = 1


@dataclass
class EvalBatch:
    """One scored batch: the per-sample outcomes of the sample indices ``rows``.

    ``partial`` / ``verdicts`` / ``failures`` are None when the reward did not give that detail;
    ``tags`` holds None where neither the record nor the reward named a category; ``extra`` maps a
    kept reward detail's name to its per-sample values; ``images`` maps a kept sample index to its
    ``[3, H, W]`` image.
    """

    rows: list[int]
    scores: list[float]
    fingerprints: list[float]
    tags: list[Optional[str]]
    partial: Optional[list[float]] = None
    verdicts: Optional[list[float]] = None
    failures: Optional[list[str]] = None
    extra: dict[str, list[float]] = field(default_factory=dict)
    images: dict[int, Tensor] = field(default_factory=dict)

    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """``(tensors, metadata)`` for a safetensors file (the strings go in the metadata)."""
        tensors = {"rows": torch.tensor(self.rows, dtype=torch.int64), "scores": torch.tensor(self.scores, dtype=torch.float32),
                   "fingerprints": torch.tensor(self.fingerprints, dtype=torch.float64)}
        for name in ("partial", "verdicts"):
            if getattr(self, name) is not None:
                tensors[name] = torch.tensor(getattr(self, name), dtype=torch.float32)
        for name, values in self.extra.items():
            tensors[f"extra.{name}"] = torch.tensor(values, dtype=torch.float32)
        for row, image in self.images.items():
            tensors[f"image.{int(row)}"] = image.detach().float().cpu().contiguous()
        return tensors, {"tags": json.dumps(self.tags), "failures": json.dumps(self.failures)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], metadata: dict[str, str]) -> "EvalBatch":
        """The batch :meth:`to_tensors` wrote."""
        get = lambda name: tensors[name].tolist() if name in tensors else None  # noqa: E731
        return cls(
            rows=[int(r) for r in tensors["rows"].tolist()], scores=tensors["scores"].tolist(), fingerprints=tensors["fingerprints"].tolist(),
            tags=json.loads(metadata["tags"]), partial=get("partial"), verdicts=get("verdicts"), failures=json.loads(metadata["failures"]),
            extra={k[len("extra."):]: v.tolist() for k, v in tensors.items() if k.startswith("extra.")},
            images={int(k[len("image."):]): v for k, v in tensors.items() if k.startswith("image.")},
        )


class EvalJournal:
    """A folder of scored batches of one evaluation (see the module docstring).

    Args:
        folder: where the batch files go (created on the first save).
        key: JSON-ready settings that decide every sample's outcome; a file written under another
            key is refused by :meth:`load`.
        share: ``(index, count)`` of this process in a sharded evaluation (``(0, 1)``: one process).
        restart: delete this share's files instead of resuming from them.
        on_mismatch: what :meth:`load` does with files of another key or unreadable ones: ``"refuse"``
            (ConfigError; ``flowalign eval``, whose user decides with ``--restart``) or ``"discard"`` (delete
            them with a warning and start over; the trainer's report, which has no one to ask).
    """

    def __init__(self, folder: Union[str, Path], key: dict[str, Any], share: tuple[int, int] = (0, 1), restart: bool = False,
                 on_mismatch: str = "refuse"):
        if on_mismatch not in ("refuse", "discard"):
            raise ValueError(f"on_mismatch must be 'refuse' or 'discard', got {on_mismatch!r}")
        self.folder = Path(folder)
        self.key = json.loads(json.dumps({"journal_version": JOURNAL_VERSION, **key}, sort_keys=True))  # as it reads back
        self.prefix = f"share{int(share[0])}of{int(share[1])}_rows"
        self.layout = f"of{int(share[1])}_rows"  # this launch's process count, in every one of its processes' file names
        self.restart = restart
        self.on_mismatch = on_mismatch

    def _files(self, every_share: bool = False) -> list[Path]:
        pattern = "share*of*_rows*.safetensors" if every_share else f"{self.prefix}*.safetensors"
        return sorted(self.folder.glob(pattern)) if self.folder.is_dir() else []

    def load(self) -> dict[int, EvalBatch]:
        """``{first sample index: EvalBatch}`` of the journaled batches of every share, this process's and those of a
        launch with another process count (none after ``restart``, which deletes this share's files and those of
        other launch layouts).

        Raises:
            ConfigError: (``on_mismatch="refuse"``) a batch file was written under another key, or cannot be read.
        """
        from safetensors import safe_open

        if self.restart:  # this share's files and every other launch layout's (those of this launch's other
            # processes are theirs to delete: one of them may already be writing)
            for path in self._files(every_share=True):
                if path.name.startswith(self.prefix) or self.layout not in path.name:
                    path.unlink(missing_ok=True)
            self.restart = False
            return {}
        done: dict[int, EvalBatch] = {}
        for path in self._files(every_share=True):
            problem = None
            try:
                with safe_open(str(path), framework="pt") as fh:
                    metadata = fh.metadata() or {}
                    tensors = {name: fh.get_tensor(name) for name in fh.keys()}
                key = json.loads(metadata["key"])
                batch = EvalBatch.from_tensors(tensors, metadata)
            except Exception as exc:  # a truncated or foreign file is reported with its path
                problem = (f"{path} is not a readable evaluation batch ({type(exc).__name__}: {exc})",
                           f"delete {self.folder} or pass --restart")
            else:
                if key != self.key:
                    differ = sorted(name for name in set(key) | set(self.key) if key.get(name) != self.key.get(name))
                    shown = ", ".join(f"{name} {_short(key.get(name))} -> {_short(self.key.get(name))}" for name in differ[:4])
                    problem = (f"{self.folder} holds a partial evaluation with other settings ({shown})",
                               "pass --restart to discard it, or another --out")
            if problem is not None:
                if self.on_mismatch == "refuse":
                    raise ConfigError(f"{problem[0]}; {problem[1]}")
                logger.warning("%s: discarded, the evaluation starts over", problem[0])
                self._discard(every_share=True)
                return {}
            done[batch.rows[0]] = batch
        return done

    def _discard(self, every_share: bool = False) -> None:
        for path in self._files(every_share):
            path.unlink(missing_ok=True)

    def save(self, batch: EvalBatch) -> Path:
        """Write ``batch`` atomically; returns its file."""
        from flowalign.files import atomic_path, save_safetensors

        tensors, metadata = batch.to_tensors()
        path = self.folder / f"{self.prefix}{batch.rows[0]:07d}.safetensors"
        with atomic_path(path) as tmp:
            save_safetensors(tensors, tmp, metadata={**metadata, "key": json.dumps(self.key, sort_keys=True)})
        return path

    def remove(self) -> None:
        """Delete the folder with every share's files (the evaluation is complete and written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _short(value: Any) -> str:
    """A key's value for a message: its repr, long ones (a model's file list) cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
