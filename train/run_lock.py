"""One run per folder at a time: an exclusive lock a run holds on its output folder while it lives.

Two ``flowalign train --overwrite`` started on the same ``train.output_dir`` (two terminals, a
scheduler retrying a job) would clear and write each other's files. The first to start takes
``<run>/.flowalign.lock`` (``fcntl.flock``: released by the kernel when the process ends, however it
ends, so a killed run leaves no stale lock, only the file, which the next run reuses); the second stops
before writing anything, naming the holder's pid. A run that ends normally removes the file. Only the
launching process (rank 0) locks; on systems without ``fcntl`` (Windows) there is no lock. Within one
process, trainers on the same folder (a script resuming its own run) share the lock: it is released when
the last of them lets go.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from flowalign.errors import ConfigError

logger = logging.getLogger(__name__)

LOCK_NAME = ".flowalign.lock"


class _Held:
    """This process's lock on one folder: the open locked file and how many RunLocks use it."""

    def __init__(self, handle, created: list[Path]):
        self.handle = handle
        self.created = created  # folders the first acquire created, deepest first
        self.users = 1


_HELD: dict[Path, _Held] = {}


def launching_process() -> bool:
    """Whether this is the process that owns the run folder (rank 0 of a torchrun / accelerate launch, or the only one)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _missing_parents(folder: Path) -> list[Path]:
    """``folder`` and those of its ancestors that do not exist yet, deepest first."""
    missing = []
    for path in [folder, *folder.parents]:
        if path.exists():
            break
        missing.append(path)
    return missing


class RunLock:
    """The lock on ``run_dir`` (see the module docstring); ``release`` is idempotent."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._key: Optional[Path] = None

    def acquire(self) -> "RunLock":
        """Take the lock (or share this process's); ConfigError naming the other run's pid when another holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        key = self.run_dir.resolve()
        if key in _HELD:  # this process already runs there (a Trainer it built earlier): not another run
            _HELD[key].users += 1
            self._key = key
            return self
        refuse_file(self.run_dir)
        created = _missing_parents(self.run_dir.absolute())
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
        _HELD[key] = _Held(handle, created)
        self._key = key
        return self

    def release(self, remove_if_unused: bool = False) -> None:
        """Let the folder go (the lock itself goes with the last user in this process). With ``remove_if_unused``,
        the folders the lock created are removed again when the run left them empty (a run that stopped at
        setup), so bad input still writes nothing."""
        if self._key is None:
            return
        held, key, self._key = _HELD.get(self._key), self._key, None
        if held is None:
            return
        held.users -= 1
        if held.users > 0:
            return
        del _HELD[key]
        try:
            import fcntl

            self.path.unlink(missing_ok=True)  # while still held: a run folder keeps no lock file once its run ends
            fcntl.flock(held.handle.fileno(), fcntl.LOCK_UN)
        except OSError as exc:
            logger.debug("releasing the lock on %s: %s", self.run_dir, exc)
        finally:
            held.handle.close()
        if remove_if_unused:
            for folder in held.created:  # deepest first; stops at the first that is not empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def refuse_file(run_dir: Path) -> None:
    """ConfigError when ``train.output_dir`` names a file (checked by the lock on the launching process and by
    ``prepare_run_dir`` on every process)."""
    from flowalign.files import refuse_dangling_link

    refuse_dangling_link(run_dir, "train.output_dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"train.output_dir {run_dir} is a file, not a folder; choose another output_dir")


def resumes_missing_folder(resume, run_dir: Path) -> bool:
    """``--resume`` of the output folder itself when it does not exist: setup reports that, so no lock (whose
    folder would exist by then) is taken. Resuming another run into a new folder locks the new folder."""
    if not resume or run_dir.exists():
        return False
    return resume is True or Path(resume).absolute() == run_dir.absolute()


def lock_run_dir(run_dir: Path) -> Optional[RunLock]:
    """The launching process's lock on ``run_dir`` (None on the other processes)."""
    return RunLock(run_dir).acquire() if launching_process() else None


@contextmanager
def setup_lock(run_dir: Path, resume) -> Iterator[Optional[RunLock]]:
    """The run folder's lock for a trainer's setup (None on other processes, and for ``--resume`` of a folder that
    does not exist, which setup reports): released, with the folders it created, when setup fails; kept on success
    until the trainer's cleanup releases it."""
    lock = None if resumes_missing_folder(resume, run_dir) else lock_run_dir(run_dir)
    try:
        yield lock
    except BaseException:
        if lock is not None:
            lock.release(remove_if_unused=True)  # bad input writes nothing, not even the folder
        raise
