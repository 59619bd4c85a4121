"""The exceptions flowalign raises on purpose.

Every error the library raises for a bad input, file or model derives from ``FlowalignError``,
so ``except FlowalignError`` catches them all. Each also derives from the builtin exception a
caller would expect (``ValueError`` for bad values, ``RuntimeError`` for failures while running),
so existing ``except ValueError`` code keeps working.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union


class FlowalignError(Exception):
    """Base class of every error raised by flowalign."""


class ConfigError(FlowalignError, ValueError):
    """A configuration value is invalid, unknown or inconsistent with another one."""


class RewardError(FlowalignError, RuntimeError):
    """A reward raised, returned a malformed result or non-finite scores.

    Attributes:
        reward: name of the reward that failed (None when unknown).
        prompts: the offending prompt(s), as far as they could be identified.
    """

    def __init__(self, message: str, reward: Optional[str] = None, prompts: Sequence[str] = ()):
        super().__init__(message)
        self.reward = reward
        self.prompts = list(prompts)


class PromptFileError(FlowalignError, ValueError):
    """A prompt file is missing, empty or malformed.

    Attributes:
        path: the file.
        line: 1-based line number of the problem (None for whole-file problems).
    """

    def __init__(self, message: str, path: Union[str, Path, None] = None, line: Optional[int] = None):
        super().__init__(message)
        self.path = path
        self.line = line


class CheckpointError(FlowalignError, RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the run resuming from it."""


class NonFiniteLossError(FlowalignError, RuntimeError):
    """Training produced NaN/inf losses or gradients too many times in a row."""


class RunLogError(FlowalignError, OSError):
    """A run's ``metrics.csv`` could not be written (disk full, quota, permissions)."""


class LoraMismatchError(FlowalignError, ValueError):
    """LoRA weights do not fit the model (missing or unexpected keys, wrong rank or shapes)."""


class RolloutStoreError(FlowalignError, RuntimeError):
    """A rollout store (flowalign.offline) is missing, corrupt or inconsistent.

    Attributes:
        shard: file name of the bad shard (None for whole-store problems).
    """

    def __init__(self, message: str, shard: Optional[str] = None):
        super().__init__(message)
        self.shard = shard


class Aborted(KeyboardInterrupt):
    """A second stop signal: the run ends now, without a checkpoint (the last one written stays).

    Attributes:
        signum: the signal that aborted the run (the exit status is ``128 + signum``).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class TrainingStopped(FlowalignError, RuntimeError):
    """A run stopped on request (a signal) after writing a checkpoint.

    Attributes:
        step: the iteration (online) or optimizer step (offline) completed and checkpointed.
        signum: the signal that asked for the stop.
        checkpoint: the checkpoint folder written (None on processes other than the main one).
    """

    def __init__(self, message: str, step: int, signum: int, checkpoint=None):
        super().__init__(message)
        self.step, self.signum, self.checkpoint = step, signum, checkpoint

    @property
    def exit_status(self) -> int:
        """``128 + signum``, the shell's status for a process ended by that signal (130 for Ctrl-C)."""
        return 128 + self.signum


def one_line(exc: BaseException) -> str:
    """The error as one line for a command's ``error:`` message. An ``OSError`` from the system (a full disk, a folder
    that cannot be written: it carries ``strerror``) reads ``could not read or write PATH: reason (errno N)``."""
    if isinstance(exc, OSError) and not isinstance(exc, FlowalignError) and exc.strerror:
        where = f" {exc.filename}" if exc.filename else ""
        return f"could not read or write{where}: {exc.strerror} (errno {exc.errno})"
    return " ".join(str(exc).split())


__all__ = [
    "FlowalignError",
    "ConfigError",
    "RewardError",
    "PromptFileError",
    "CheckpointError",
    "LoraMismatchError",
    "RolloutStoreError",
    "NonFiniteLossError",
    "TrainingStopped",
    "RunLogError",
    "one_line",
]
