"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Each write goes to a hidden temporary file beside the target (same folder, so the same
filesystem), is flushed to disk, and replaces the target with :func:`os.replace`, which is
atomic on POSIX and Windows. The temporary name keeps the target's suffix, so writers that pick
a format from the extension (matplotlib's ``savefig``, PIL's ``save``) still do.
"""
from __future__ import annotations

import itertools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, Path]


def relative_to_cwd(path: PathLike) -> str:
    """``" (relative to the working directory D)"`` for a relative ``path``, else ``""``: the tail of a "not found"
    message, since a relative path names a file only together with the folder the command ran in."""
    return "" if Path(path).is_absolute() else f" (relative to the working directory {Path.cwd()})"


def fsync_path(path: PathLike) -> None:
    """Flush ``path`` (a file or a folder) to disk. A file's errors are raised (a failed flush is a failed
    write); a folder that cannot be opened or flushed is skipped (Windows, some filesystems)."""
    folder = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:  # pragma: no cover - e.g. folders on Windows
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)


_WRITES = itertools.count()


def _unique() -> str:
    """Digits no other write of this process or of another running process uses: the pid, then a per-process
    counter (six digits), so two threads writing the same file do not share a temporary name."""
    return f"{os.getpid()}{next(_WRITES) % 10**6:06d}"


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on a clean exit it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. The parent
    folder is created if needed.

        with atomic_path(run_dir / "curve.png") as tmp:
            fig.savefig(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{_unique()}.tmp{path.suffix}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. a read-only folder: the error that matters is the one already raised
            pass


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header written canonically (keys sorted, no spaces, padded with
    spaces to 8 bytes as the format asks). safetensors writes the ``__metadata__`` keys in a hash order that
    changes from process to process, so equal tensors and metadata gave files, and sha256 fingerprints, that differ."""
    import json

    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def canonicalise_safetensors_file(path: PathLike) -> None:
    """Rewrite ``path`` (a safetensors file being written, not yet in place) with :func:`canonical_safetensors`."""
    path = Path(path)
    data = path.read_bytes()
    canonical = canonical_safetensors(data)
    if canonical != data:
        path.write_bytes(canonical)


def save_safetensors(tensors: dict, path: PathLike, metadata: Optional[dict] = None) -> None:
    """``safetensors.torch.save_file`` with a canonical header (:func:`canonical_safetensors`: the same tensors and
    metadata give the same bytes) and the usual permissions of a new file (``0o666`` less the umask; safetensors
    writes ``0o600``, which kept a shared rollout store or checkpoint from the other users of a group). The bytes
    are written by Python, so a full disk is the ``OSError`` handlers of disk errors expect (safetensors' own
    writer raised ``SafetensorError``)."""
    from safetensors.torch import save

    _write_file(path, canonical_safetensors(save(tensors, metadata=metadata)))


def _write_file(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path``; ``open`` creates the file with ``0o666`` less the umask."""
    with open(path, "wb") as fh:
        fh.write(data)


def refuse_dangling_link(path: PathLike, name: str) -> None:
    """ConfigError when ``path`` (an output folder, named ``name`` in the message) is a symbolic link whose target
    does not exist: creating the folder would fail with a bare "File exists", after the model had loaded."""
    from flowalign.errors import ConfigError

    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{name} {path} is a symbolic link to {os.readlink(path)}, which does not exist; create the "
                          f"target folder or choose another {name}")


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see the module docstring); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def _umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux: ``/proc/self/status``);
    elsewhere set and restored at once (a race only with another thread creating files in that instant)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file_in(directory: PathLike, name: str) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``directory/name``; a writer that can only write into a
    folder under a fixed file name (diffusers' ``save_lora_weights``) writes ``name`` there, and on a
    clean exit it replaces ``directory/name`` atomically.

    The file gets the usual permissions of a new file (``0o666`` less the umask): safetensors writes
    ``0o600``, which keeps a LoRA meant to be shared from other users.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{Path(name).stem}.{_unique()}.tmp"
    tmp.mkdir(exist_ok=True)
    try:
        yield tmp
        written = tmp / name
        if not written.is_file():
            raise FileNotFoundError(f"the writer did not create {name} in {tmp}")
        if written.suffix == ".safetensors":
            canonicalise_safetensors_file(written)
        os.chmod(written, 0o666 & ~_umask())
        fsync_path(written)
        os.replace(written, directory / name)
        fsync_path(directory)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # never hides the error that brought us here
