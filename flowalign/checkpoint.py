"""Atomic, pickle-free training checkpoints (DESIGN.md §9).

A checkpoint is a folder ``<root>/iter_000012/`` holding

* one ``<name>.safetensors`` per tensor group the trainer hands over (``lora``, ``ema``, ...),
* ``state.json`` + ``state.safetensors``: every other piece of state (optimizer, RNGs, prompt
  sampler, counters) as JSON, with its tensors moved into the safetensors file and referenced
  by key (see :func:`split_state`),
* optional exports (``save_checkpoint(..., export=...)``): files for use outside a resume, such as the
  trainers' ``pytorch_lora_weights.safetensors``, which ``pipe.load_lora_weights(checkpoint_dir)`` and
  ``flowalign eval --lora checkpoint_dir`` load; checked like the rest, never read by a resume,
* ``manifest.json`` last: format, iteration, config hash and the size and sha256 of every file.

It is written into a temporary folder in the same parent, every file and the folder are
fsync'ed, and the folder is renamed into place, so a crash leaves either the old set of
checkpoints or the new one. :func:`find_latest` checks manifests and skips (with a warning) a
checkpoint whose files are missing, truncated or altered.

Crash tests: with ``FLOWALIGN_CHECKPOINT_FAULT=<point>[@<iteration>]`` in the environment the
process kills itself with SIGKILL at that point of :func:`save_checkpoint` (``after:<file>``
once a file is written into the temporary folder, ``before-manifest``, ``before-rename``,
``after-rename``); ``tests/test_resume_kill.py`` resumes from each and checks the result is
bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from flowalign.errors import CheckpointError
from flowalign.files import fsync_path, save_safetensors

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_NAME_RE = re.compile(r"^iter_(\d+)$")
_EXPORT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a plain file name inside the checkpoint's folder
PathLike = Union[str, Path]
FAULT_ENV = "FLOWALIGN_CHECKPOINT_FAULT"


def _fault_point(point: str, iteration: int) -> None:
    """Test hook: SIGKILL this process at ``point`` when ``$FLOWALIGN_CHECKPOINT_FAULT`` names it."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name == point and (not at or int(at) == iteration):
        logger.warning("%s=%s: killing this process", FAULT_ENV, spec)
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# nested state <-> JSON + tensors


def split_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, numbers, strings) into JSON + tensors.

    Each tensor is replaced by ``{"__tensor__": key}`` and returned in the dict under ``key``; a
    dict with a non-string key (torch optimizer state is keyed by int) or a key holding ``/`` becomes
    ``{"__items__": [[key, value], ...]}``; tuples become ``{"__tuple__": [...]}``;
    numpy arrays become tensors. :func:`merge_state` inverts this exactly.
    """
    tensors: dict[str, Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, Tensor):
            tensors[path] = node.detach().cpu().contiguous().clone()
            return {"__tensor__": path}
        if isinstance(node, np.ndarray):
            return walk(torch.from_numpy(np.ascontiguousarray(node)), path)
        if isinstance(node, dict):
            # string keys name their tensors' paths, unless one holds "/" ({"a/b": x} and {"a": {"b": y}} would share one)
            if all(isinstance(k, str) and "/" not in k for k in node) and not ({"__tensor__", "__items__", "__tuple__"} & set(node)):
                return {k: walk(v, f"{path}/{k}") for k, v in node.items()}
            return {"__items__": [[k, walk(v, f"{path}/{i}")] for i, (k, v) in enumerate(node.items())]}
        if isinstance(node, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
        if isinstance(node, (np.integer, np.floating, np.bool_)):
            return node.item()
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise CheckpointError(f"cannot store {type(node).__name__} at '{path or '/'}' in a checkpoint (JSON or tensors only)")

    return walk(obj, prefix), tensors


def merge_state(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`split_state`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"checkpoint state refers to tensor '{key}' that is not stored")
            return tensors[key]
        if "__items__" in obj:
            return {k: merge_state(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(merge_state(v, tensors) for v in obj["__tuple__"])
        return {k: merge_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [merge_state(v, tensors) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# RNG states


def capture_rng(generators: Optional[dict[str, torch.Generator]] = None) -> dict:
    """Every RNG state a run depends on: torch (CPU, CUDA), python, numpy and named generators."""
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def host_rng_state() -> dict:
    """This process's python and numpy RNG states (a multi-process checkpoint keeps each process's: rewards and plugins
    may draw from them, and processes other than the first are seeded apart)."""
    return {"python": random.getstate(), "numpy": np.random.get_state()}


def restore_host_rng(state: dict) -> None:
    """Restore :func:`host_rng_state`'s output (after a JSON round trip through a checkpoint)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))


def restore_rng(state: dict, generators: Optional[dict[str, torch.Generator]] = None) -> None:
    """Restore what :func:`capture_rng` captured (after a JSON round trip through a checkpoint)."""
    torch.set_rng_state(state["torch"].to(torch.uint8).clone())
    restore_host_rng(state)
    if "cuda" in state and torch.cuda.is_available():
        # the devices this machine has (a run resumed on fewer visible GPUs than it was saved with: set_rng_state_all
        # raised IndexError for the missing ones; each process's own device is restored by its trainer)
        for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state.to(torch.uint8), index)
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(f"checkpoint has no state for generator '{name}' (has {sorted(state['generators'])})")
        g.set_state(state["generators"][name].to(torch.uint8).clone())


# ---------------------------------------------------------------------------------------------
# files


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (checkpoint and rollout-store manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def update_with_tensors(digest, named: Iterable[tuple[str, Tensor]]) -> None:
    """Feed ``digest`` (a hashlib object) each ``(name, tensor)``'s name, shape, dtype and bytes, in the given order;
    the buffer itself is read (no bytes copy)."""
    for name, tensor in named:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())


def checkpoint_name(iteration: int) -> str:
    """Folder name of the checkpoint taken after ``iteration`` (sorts in step order)."""
    return f"iter_{iteration:06d}"


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensor groups by name, the JSON state (tensors merged back), metadata."""

    path: Path
    iteration: int
    config_hash: Optional[str]
    tensors: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    state: dict = field(default_factory=dict)


def save_checkpoint(
    root: PathLike,
    iteration: int,
    tensors: dict[str, dict[str, Tensor]],
    state: dict,
    config_hash: Optional[str] = None,
    keep: Optional[int] = None,
    export: Optional[Callable[[Path], Iterable[Union[str, Path]]]] = None,
) -> Path:
    """Atomically write checkpoint ``root/iter_{iteration:06d}`` and keep only the last ``keep``.

    Args:
        root: the checkpoints folder (created if missing).
        iteration: completed iterations at the time of saving.
        tensors: ``{"lora": {...}, "ema": {...}}`` -> ``lora.safetensors``, ``ema.safetensors``.
        state: nested JSON-able state that may contain tensors (optimizer, RNG, counters).
        config_hash: hash of the run's config (checked on resume).
        keep: number of checkpoints to keep (older ones are deleted); None keeps all.
        export: writes further files into the (temporary) checkpoint folder it is given and returns their
            names, e.g. a diffusers LoRA file; they are renamed into place with the rest and listed in the
            manifest, which :func:`verify_checkpoint` checks, but :func:`load_checkpoint` does not read them.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(iteration)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    old: Optional[Path] = None  # the previous copy of a re-saved iteration, moved aside during the swap
    try:
        files: dict[str, Path] = {}
        for name, group in tensors.items():
            if name == "state" or not re.fullmatch(r"[A-Za-z0-9_]+", name):
                raise CheckpointError(f"invalid tensor group name {name!r} (letters, digits, _; not 'state')")
            files[f"{name}.safetensors"] = tmp / f"{name}.safetensors"
            save_safetensors({k: v.detach().cpu().contiguous().clone() for k, v in group.items()}, files[f"{name}.safetensors"])
            _fault_point(f"after:{name}.safetensors", iteration)
        exports = []
        for name in (export(tmp) if export is not None else ()):
            name = Path(name).name if Path(name).parent in (Path("."), tmp) else str(name)  # a file right in the folder
            if not _EXPORT_RE.fullmatch(name) or name in files or name in ("state.json", "state.safetensors", MANIFEST) \
                    or not (tmp / name).is_file():
                raise CheckpointError(f"export {name!r}: not a file of its own written into the checkpoint folder")
            files[name] = tmp / name
            exports.append(name)
        json_state, state_tensors = split_state(state)
        files["state.safetensors"] = tmp / "state.safetensors"
        save_safetensors(state_tensors, files["state.safetensors"])
        _fault_point("after:state.safetensors", iteration)
        files["state.json"] = tmp / "state.json"
        files["state.json"].write_text(json.dumps(json_state), encoding="utf-8")
        manifest = {
            "format": FORMAT_VERSION,
            "iteration": iteration,
            "config_hash": config_hash,
            "tensor_groups": sorted(tensors),
            "exports": sorted(exports),
            "files": {name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for name, p in files.items()},
        }
        for p in files.values():
            fsync_path(p)
        _fault_point("before-manifest", iteration)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        fsync_path(tmp / MANIFEST)
        fsync_path(tmp)
        _fault_point("before-rename", iteration)
        if final.exists():  # re-saving an iteration (e.g. after a resume): swap, then delete the old one
            old = root / f".old-{final.name}-{os.getpid()}"
            if old.exists():  # left by an earlier process of the same pid (containers reuse them)
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(root)
        _fault_point("after-rename", iteration)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # a second Ctrl-C included: the previous copy of a re-saved iteration goes back
        if old is not None and old.exists() and not final.exists():
            os.replace(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(root, keep, newest=iteration)
    logger.info("saved checkpoint %s", final)
    return final


def write_error(root: PathLike, iteration: int, exc: OSError) -> CheckpointError:
    """The one-line error for a checkpoint that could not be written (disk full, quota, permissions): the
    temporary folder is already gone, and the previous checkpoint, if any, is intact."""
    root = Path(root)
    previous = find_latest(root)
    return CheckpointError(
        f"could not write checkpoint {checkpoint_name(iteration)} in {root}: {exc.strerror or exc} (errno {exc.errno}); "
        + (f"the previous checkpoint {previous.name} is intact, continue with --resume" if previous is not None else "no earlier checkpoint")
    )


def list_checkpoints(root: PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every ``iter_*`` folder under ``root``, oldest first (not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME_RE.match(p.name))]
    return sorted(found)


def prune_checkpoints(root: PathLike, keep: Optional[int], newest: Optional[int] = None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (None: keep all) and leftover temporary folders; return the deleted.

    With ``newest`` (the iteration just written), checkpoints past it are deleted first: they belong to a run
    that was resumed from an older checkpoint, whose metrics past that point were already dropped, and
    ``--resume`` would otherwise pick one of them instead of the checkpoint just written.
    """
    root = Path(root)
    removed = []
    found = list_checkpoints(root)
    if newest is not None:
        stale = [path for iteration, path in found if iteration > newest]
        found = [(iteration, path) for iteration, path in found if iteration <= newest]
    else:
        stale = []
    if keep is not None:
        stale += [path for _, path in found[: max(0, len(found) - keep)]]
    stale += [p for pattern in (".tmp-iter_*", ".old-iter_*") for p in root.glob(pattern) if not p.name.endswith(f"-{os.getpid()}")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def verify_checkpoint(path: PathLike) -> dict:
    """Check the manifest of checkpoint ``path`` (every file present, right size and sha256); return it.

    Raises:
        CheckpointError: naming the first missing or altered file.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST} (partial write?)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not valid JSON ({exc.msg})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is not a JSON object")
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format {manifest.get('format')!r}, this flowalign reads {FORMAT_VERSION}")
    files, groups, exports = manifest.get("files"), manifest.get("tensor_groups"), manifest.get("exports", [])
    if not (isinstance(files, dict) and isinstance(groups, list) and isinstance(manifest.get("iteration"), int)
            and isinstance(exports, list) and all(isinstance(e, str) and _EXPORT_RE.fullmatch(e) for e in exports)
            and all(isinstance(m, dict) and isinstance(m.get("size"), int) and isinstance(m.get("sha256"), str) for m in files.values())):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} lacks files / tensor_groups / iteration in the expected form")
    # exactly the files this checkpoint loads, each a plain name inside its folder: a manifest cannot point outside it
    # nor leave a loaded file unchecked
    expected = {f"{g}.safetensors" for g in groups if isinstance(g, str) and re.fullmatch(r"[A-Za-z0-9_]+", g)}
    if len(expected) != len(groups) or set(files) != expected | {"state.json", "state.safetensors"} | set(exports):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} lists {sorted(files)}, not its tensor groups' files, exports and the state")
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} is missing")
        size = file.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"checkpoint {path}: {name} has {size} bytes, manifest says {meta['size']}")
        if sha256_file(file) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its sha256 in the manifest")
    return manifest


def find_latest(root: PathLike) -> Optional[Path]:
    """The newest checkpoint under ``root`` whose manifest verifies; corrupt ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            logger.warning("skipping corrupt checkpoint: %s", exc)
            continue
        return path
    return None


def load_checkpoint(path: PathLike, expected_config_hash: Optional[str] = None) -> Checkpoint:
    """Verify and read checkpoint ``path``.

    Raises:
        CheckpointError: corrupt checkpoint, or ``expected_config_hash`` given and different.
    """
    path = Path(path)
    manifest = verify_checkpoint(path)
    if expected_config_hash is not None and manifest.get("config_hash") not in (None, expected_config_hash):
        raise CheckpointError(
            f"checkpoint {path} was written by a run with config hash {manifest['config_hash']}, "
            f"this run's is {expected_config_hash}"
        )
    tensors = {name: load_file(path / f"{name}.safetensors") for name in manifest["tensor_groups"]}
    state = merge_state(json.loads((path / "state.json").read_text(encoding="utf-8")), load_file(path / "state.safetensors"))
    return Checkpoint(path=path, iteration=manifest["iteration"], config_hash=manifest.get("config_hash"), tensors=tensors, state=state)
