"""One run per folder at a time: an exclusive lock a run holds on its output folder while it lives.

Two ``flowalign train --overwrite`` started on the same ``train.output_dir`` (two terminals, a
scheduler retrying a job) would clear and write each other's files. The first to start takes
``<run>/.flowalign.lock`` (``fcntl.flock``: released by the kernel when the process ends, however it
ends, so a killed run leaves no stale lock, only the file, which the next run reuses); the second stops
before writing anything, naming the holder's pid. A run that ends normally removes the file. Only the launching process (rank 0) locks; on systems without ``fcntl`` (Windows) there
is no lock.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from flowalign.errors import ConfigError

logger = logging.getLogger(__name__)

LOCK_NAME = ".flowalign.lock"
_HELD: dict[Path, "RunLock"] = {}  # folders this process holds: a second Trainer on one of them (resume in a script) shares it


def launching_process() -> bool:
    """Whether this is the process that owns the run folder (rank 0 of a torchrun / accelerate launch, or the only one)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


class RunLock:
    """The lock on ``run_dir`` (see the module docstring); ``release`` is idempotent.

    Attributes:
        created_dir: the folder did not exist and the lock created it (``release(remove_if_unused=True)``
            removes it again when the run wrote nothing into it).
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.created_dir = False
        self._handle = None

    def acquire(self) -> "RunLock":
        """Take the lock; ConfigError naming the other run's pid when it holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        key = self.run_dir.resolve()
        if key in _HELD:  # this process already runs there (a Trainer it built earlier): not another run
            return self
        self.created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise ConfigError(f"{self.run_dir} is in use by another flowalign run (pid {holder}): wait for it to finish, "
                                  "or choose another output folder") from None
            try:  # the holder before us removes the file on release: lock the file that is there now, not a removed one
                if os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        else:  # pragma: no cover - five releases in a row under our feet
            raise ConfigError(f"{self.run_dir}: could not lock it (other runs keep starting there)")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        _HELD[key] = self
        return self

    def release(self, remove_if_unused: bool = False) -> None:
        """Let the folder go. With ``remove_if_unused``, a folder the lock created and the run left empty (a run
        that stopped at setup) is removed, so bad input still writes nothing."""
        if self._handle is None:
            return
        _HELD.pop(self.run_dir.resolve(), None)
        try:
            import fcntl

            self.path.unlink(missing_ok=True)  # while still held: a run folder keeps no lock file once its run ends
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        except OSError as exc:
            logger.debug("releasing the lock on %s: %s", self.run_dir, exc)
        finally:
            self._handle.close()
            self._handle = None
        if remove_if_unused and self.created_dir:
            try:
                self.run_dir.rmdir()  # only if empty: the run wrote nothing
            except OSError:
                pass


def lock_run_dir(run_dir: Path) -> Optional[RunLock]:
    """The launching process's lock on ``run_dir`` (None on the other processes)."""
    return RunLock(run_dir).acquire() if launching_process() else None
