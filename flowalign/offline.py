"""Rollout store: generated samples + rewards on disk, for offline objectives (GDRO, Diffusion-DPO, AWM).

Layout of a store folder::

    store.json                 settings of the generation (fixed for the store's life)
    manifest.jsonl             one JSON line per finished shard (see below)
    shards/shard-00000.safetensors   "latents" [N, *latent] (+ "images" uint8 [N,3,H,W], videos [N,F,3,H,W], optional)
    images/shard-00000/        optional PNGs, <prompt_index>_<member>.png (a video: its frames left to right)

A shard holds whole prompt groups (``prompts_per_shard`` prompts x ``samples_per_prompt``), so a
group never spans shards. Its manifest line::

    {"shard": "shard-00000.safetensors", "index": 0, "sha256": "...", "num_samples": N,
     "latent_shape": [...], "images": "none", "sampler": {...}, "model_hash": "...",
     "samples": [{"row": 0, "prompt": "...", "prompt_index": 0, "group": 0, "member": 0,
                  "seed": 1234, "rewards": {"shapes": 1.0}, "metadata": {...}}, ...]}

Durability: each shard is written to a temp file, fsynced and renamed; its PNG folder likewise;
only then is its manifest line appended (and fsynced). A killed run therefore leaves at most a
temp file, an unlisted shard or a torn last manifest line, which :class:`RolloutWriter` cleans
up; rerunning regenerates exactly the missing shards (seeds depend only on the prompt index and
member, not on the run), and draws again a listed shard that is missing or whose sha256 differs (a
corrupt file is kept as ``<shard>.corrupt``). Reading verifies every shard's sha256 and shapes
(:meth:`RolloutStore.verify`, which an offline run calls at setup) and raises
:class:`RolloutStoreError` naming the shard; a damaged ``store.json`` or manifest line is named the
same way: nothing is skipped silently. No pickle anywhere.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from flowalign.checkpoint import sha256_file
from flowalign.errors import RolloutStoreError  # re-exported: `from flowalign.offline import RolloutStoreError` keeps working
from flowalign.files import fsync_path, save_safetensors, write_text_atomic
from flowalign.objectives.base import OfflineBatch
from flowalign.prompts import prompts_digest

logger = logging.getLogger(__name__)

__all__ = [
    "RolloutStoreError",
    "RolloutWriter",
    "RolloutStore",
    "StoreGroup",
    "fill_store",
    "sample_seed",
    "shard_name",
]

STORE_VERSION = 1
META_FILE = "store.json"
MANIFEST_FILE = "manifest.jsonl"
IMAGE_FORMATS = ("none", "png", "tensor")
PathLike = Union[str, Path]
SampleFn = Callable[[list[str], list[int]], tuple[Tensor, Optional[Tensor]]]
ScoreFn = Callable[[Tensor, list[str], list[dict]], dict[str, Tensor]]


def shard_name(index: int) -> str:
    """File name of shard ``index`` in the store's ``shards/`` folder."""
    return f"shard-{index:05d}.safetensors"


#: seeds of one base seed's store: ``base * SEED_STRIDE + prompt_index * G + member`` (stores of base seeds 0 and 1
#: share no sample unless one holds 2**32 samples)
SEED_STRIDE = 2**32


def sample_seed(base_seed: int, prompt_index: int, member: int, samples_per_prompt: int, stride: int = SEED_STRIDE) -> int:
    """Seed of sample ``member`` of prompt ``prompt_index``: ``(base * stride + prompt_index * G + member) mod 2**63``.

    Depends only on the sample's place in the store, so a resumed run redraws the same samples, and stores of
    different base seeds draw different samples. Stores written before ``stride`` existed used ``stride = 1``
    (``base + prompt_index * G + member``: base seeds 0 and 1 shared all but one sample per G), which
    :func:`fill_store` keeps when it finishes one of them.
    """
    return (base_seed * stride + prompt_index * samples_per_prompt + member) % 2**63


def _shard_entry_problem(entry: Any) -> Optional[str]:
    """What makes ``entry`` not a manifest line as the writer writes it (None when it is one). Its shard is named by
    its index, so it cannot point outside ``shards/``; its ``num_samples`` records each carry their row, prompt index,
    member and rewards (a number, or null for a sample whose reward was dropped)."""
    if not (isinstance(entry, dict) and type(entry.get("index")) is int and entry["index"] >= 0
            and entry.get("shard") == shard_name(entry["index"]) and isinstance(entry.get("sha256"), str)
            and type(entry.get("num_samples")) is int and isinstance(entry.get("samples"), list)
            and isinstance(entry.get("latent_shape"), list) and all(type(d) is int for d in entry["latent_shape"])):
        return ("not a shard entry (index, shard = shard-NNNNN.safetensors of that index, sha256, num_samples, "
                "latent_shape, samples)")
    samples = entry["samples"]
    if len(samples) != entry["num_samples"]:
        return f"{len(samples)} sample records, num_samples says {entry['num_samples']}"
    for number, record in enumerate(samples):
        if not isinstance(record, dict):
            return f"sample record {number} is not an object"
        bad = [key for key in ("row", "prompt_index", "member") if type(record.get(key)) is not int or record[key] < 0]
        if bad:
            return f"sample record {number} has no valid {', '.join(bad)} (an int >= 0)"
        rewards = record.get("rewards")
        if not isinstance(rewards, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) or v is None
                                                     for v in rewards.values()):
            return f"sample record {number}: rewards must map each reward's name to a number or null, got {rewards!r}"
    if sorted(record["row"] for record in samples) != list(range(len(samples))):
        return f"sample rows {sorted(record['row'] for record in samples)} are not 0..{len(samples) - 1}"
    return None


def _read_store_json(path: Path) -> dict:
    """``store.json``'s content, or a RolloutStoreError naming what is wrong with it."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RolloutStoreError(f"{path}: not valid JSON ({exc}): a damaged or hand-edited store") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("settings"), dict):
        raise RolloutStoreError(f"{path}: no 'settings' object: a damaged or hand-edited store")
    return meta


def _read_manifest(path: Path, repair: bool) -> list[dict]:
    """Parse manifest lines. A torn last line (killed mid-append) is truncated when ``repair``."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines, good_end = [], 0
    offset = 0
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        end = offset + len(chunk) + 1
        if chunk.strip():
            complete = end <= len(raw)  # the line ended with a newline
            try:
                entry = json.loads(chunk) if complete else None
            except json.JSONDecodeError:
                entry = None
            if entry is None:
                if not complete and repair:  # only the last line may be torn (no newline after it)
                    logger.warning("rollout store: dropping a torn last manifest line (%d bytes)", len(chunk))
                    with open(path, "r+b") as fh:
                        fh.truncate(good_end)
                        os.fsync(fh.fileno())
                    break
                if not complete:  # a torn last line: a `flowalign generate` that stopped mid-write
                    raise RolloutStoreError(f"{path}: the last line is incomplete (generation was interrupted); rerun the same "
                                            "`flowalign generate` to repair and finish the store")
                raise RolloutStoreError(f"{path}: line {number} is not valid JSON (corrupt manifest)")
            problem = _shard_entry_problem(entry)
            if problem is not None:
                raise RolloutStoreError(f"{path}: line {number}: {problem}: corrupt or hand-edited manifest")
            lines.append(entry)
            good_end = end
        offset = end
    return lines


# settings keys added after stores and offline runs existed, with the value every one before them had (the model block of
# train/generate.py's store settings and of an offline recipe): a store, or an offline run's hash, from before them is the same
LATER_SETTINGS = {"model": {"adapter": None, "adapter_kwargs": {}, "variant": None}}


def _with_later_defaults(meta: Any) -> Any:
    """``store.json`` content with :data:`LATER_SETTINGS` keys it predates filled in at their defaults."""
    settings = meta.get("settings") if isinstance(meta, dict) else None
    if not isinstance(settings, dict):
        return meta
    for section, defaults in LATER_SETTINGS.items():
        if isinstance(settings.get(section), dict):
            for key, value in defaults.items():
                settings[section].setdefault(key, value)
    return meta


#: settings that name files whose content other settings pin (``prompts_sha256``; ``model_hash``, the weights' fingerprint
#: with the LoRA's): the same store when only their spelling or place differs
DESCRIPTIVE_SETTINGS = (("prompts_file",), ("lora",), ("model", "pretrained"))


def _store_identity(meta: dict) -> dict:
    """``store.json`` content without :data:`DESCRIPTIVE_SETTINGS` when the content they name is pinned."""
    settings = meta.get("settings")
    if not isinstance(settings, dict) or not settings.get("prompts_sha256") or settings.get("model_hash") in (None, "custom-sample-fn"):
        return meta
    settings = json.loads(json.dumps(settings))
    for path in DESCRIPTIVE_SETTINGS:
        parent = settings
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    return {**meta, "settings": settings}


class RolloutWriter:
    """Append shards to a store folder; resumes a store written by an earlier (killed) run.

    Args:
        root: the store folder (created if missing).
        settings: generation settings written to ``store.json``; a rerun must pass the same
            settings (else :class:`RolloutStoreError` lists the differing keys).
    """

    def __init__(self, root: PathLike, settings: dict[str, Any]):
        self.root = Path(root)
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        meta = {"version": STORE_VERSION, "settings": json.loads(json.dumps(settings))}
        meta_path = self.root / META_FILE
        manifest = self.root / MANIFEST_FILE
        no_shard_yet = not manifest.exists() or not manifest.read_text(encoding="utf-8").strip()
        if meta_path.exists():
            old = _with_later_defaults(_read_store_json(meta_path))
            if old != meta and _store_identity(old) == _store_identity(meta):  # the same files, named otherwise
                logger.info("%s: the same prompts and model as the store's, named otherwise (%s); store.json keeps its names",
                            self.root, ", ".join(".".join(p) for p in DESCRIPTIVE_SETTINGS))
                meta = old
            if old != meta:
                keys = sorted(k for k in set(old.get("settings", {})) | set(meta["settings"]) if old.get("settings", {}).get(k) != meta["settings"].get(k))
                if not no_shard_yet:
                    raise RolloutStoreError(f"{self.root}: store was written with other settings (differs in {keys or ['version']}); use a new folder")
                # a run that failed before its first shard (a reward that refused the prompts) fixed nothing yet
                logger.warning("%s holds no shard yet: starting it with the new settings (they differ in %s)", self.root, keys)
                write_text_atomic(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        else:
            write_text_atomic(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        self.settings = meta["settings"]
        self._recover()

    def _recover(self) -> None:
        """Remove temp leftovers, repair a torn manifest tail, verify listed shards."""
        for leftover in list((self.root / "shards").glob("*.tmp")) + list((self.root / "images").glob("*.tmp")):
            logger.warning("rollout store: removing unfinished %s", leftover.name)
            if leftover.is_dir():
                for f in leftover.iterdir():
                    f.unlink()
                leftover.rmdir()
            else:
                leftover.unlink()
        self.entries, damaged = {}, []
        for entry in _read_manifest(self.root / MANIFEST_FILE, repair=True):
            path = self.root / "shards" / entry["shard"]
            if entry["index"] in self.entries:
                raise RolloutStoreError(f"{self.root}: shard {entry['shard']} is listed twice in the manifest", entry["shard"])
            if not path.exists() or sha256_file(path) != entry["sha256"]:
                damaged.append(entry)
                continue
            self.entries[entry["index"]] = entry
        if damaged:
            self._unlist(damaged)

    def _unlist(self, damaged: list[dict]) -> None:
        """Take missing or corrupt shards out of the manifest, so that this run draws them again (their seeds depend only
        on their place in the store, and the settings, the model's fingerprint included, are the store's). A corrupt
        file is kept beside as ``<shard>.corrupt`` (and its PNG folder as ``<folder>.corrupt``) for inspection."""
        for entry in damaged:
            path = self.root / "shards" / entry["shard"]
            logger.warning("rollout store: %s is %s: drawing it again", path, "corrupt (its sha256 differs from the manifest)"
                           if path.exists() else "missing")
            for old in (path, self.root / "images" / Path(entry["shard"]).stem):
                if old.exists():
                    os.replace(old, old.with_name(old.name + ".corrupt"))
        keep = sorted(self.entries.values(), key=lambda e: e["index"])
        write_text_atomic(self.root / MANIFEST_FILE, "".join(json.dumps(e, sort_keys=True) + "\n" for e in keep))

    @property
    def completed(self) -> set[int]:
        """Indices of the shards already in the manifest."""
        return set(self.entries)

    def write_shard(
        self,
        index: int,
        latents: Tensor,
        samples: list[dict[str, Any]],
        images: Optional[Tensor] = None,
        image_format: str = "none",
        extra: Optional[dict[str, Any]] = None,
    ) -> dict:
        """Write shard ``index`` durably, then append its manifest line; returns the line.

        Args:
            latents: ``[N, *latent]`` final latents.
            samples: ``N`` JSON-able records (prompt, prompt_index, member, seed, rewards, ...).
            images: ``[N, 3, H, W]`` (videos ``[N, F, 3, H, W]``) in [0, 1], needed unless ``image_format == "none"``.
            extra: fields copied into the manifest line (sampler settings, model hash).
        """
        if index in self.entries:
            raise RolloutStoreError(f"shard {shard_name(index)} is already in the store", shard_name(index))
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format={image_format!r}; choose one of {IMAGE_FORMATS}")
        if latents.shape[0] != len(samples):
            raise ValueError(f"{latents.shape[0]} latents but {len(samples)} sample records")
        name = shard_name(index)
        tensors = {"latents": latents.detach().to("cpu", torch.float32).contiguous()}
        if image_format != "none":
            if images is None:
                raise ValueError(f"image_format={image_format!r} needs images")
            pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()  # [N,(F,)3,H,W]
            if image_format == "tensor":
                tensors["images"] = pixels
            else:
                self._write_pngs(name, pixels, samples)
        tmp = self.root / "shards" / (name + ".tmp")
        save_safetensors(tensors, tmp, metadata={"format": "flowalign-rollouts", "version": str(STORE_VERSION), "index": str(index)})
        fsync_path(tmp)
        final = self.root / "shards" / name
        os.replace(tmp, final)
        fsync_path(final.parent)
        entry = {
            "shard": name,
            "index": index,
            "sha256": sha256_file(final),
            "num_samples": len(samples),
            "latent_shape": list(latents.shape[1:]),
            "images": image_format,
            **(extra or {}),
            "samples": [{"row": row, **record} for row, record in enumerate(samples)],
        }
        with open(self.root / MANIFEST_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.entries[index] = entry
        return entry

    def _write_pngs(self, name: str, pixels: Tensor, samples: list[dict]) -> None:
        from PIL import Image

        from flowalign.plots import frame_strip

        if pixels.ndim == 5:  # videos: every frame, left to right
            pixels = frame_strip(pixels, max_frames=pixels.shape[1]).contiguous()
        folder = self.root / "images" / Path(name).stem
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for image, record in zip(pixels, samples):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp / f"{record['prompt_index']}_{record['member']}.png")
        if folder.exists():  # an unlisted earlier attempt of the same shard
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
        os.replace(tmp, folder)


@dataclass
class StoreGroup:
    """``k`` samples of one prompt."""

    prompt: str
    prompt_index: int
    x0: Tensor  # [k, *latent]
    rewards: dict[str, Tensor]  # name -> [k]
    seeds: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)


class RolloutStore:
    """Read a store folder (see module docstring); a shard is verified (sha256, shapes) when it is first read, and
    again whenever its file changes.

    ``groups(k)`` yields :class:`StoreGroup` s; ``batches(...)`` yields ready
    :class:`~flowalign.objectives.base.OfflineBatch` es for GDRO / Diffusion-DPO.
    """

    def __init__(self, root: PathLike):
        self.root = Path(root)
        meta_path = self.root / META_FILE
        if not meta_path.exists():
            raise RolloutStoreError(f"{self.root}: not a rollout store (no {META_FILE})")
        meta = _read_store_json(meta_path)
        if meta.get("version") != STORE_VERSION:
            raise RolloutStoreError(f"{meta_path}: store version {meta.get('version')!r}, this flowalign reads {STORE_VERSION}")
        self.settings: dict[str, Any] = meta["settings"]
        entries = _read_manifest(self.root / MANIFEST_FILE, repair=False)
        seen: set[int] = set()
        for entry in entries:
            if entry["index"] in seen:
                raise RolloutStoreError(f"{self.root}: shard {entry['shard']} is listed twice in the manifest", entry["shard"])
            seen.add(entry["index"])
        self.entries = sorted(entries, key=lambda e: e["index"])
        per_prompt = self.settings.get("samples_per_prompt")
        for entry in self.entries:  # every prompt of a shard has its whole group (members 0..G-1 once each)
            for prompt_index, samples in _by_prompt(entry).items():
                members = [record["member"] for record in samples]
                if type(per_prompt) is int and members != list(range(per_prompt)):
                    raise RolloutStoreError(f"{self.root / MANIFEST_FILE}: prompt {prompt_index} of {entry['shard']} has members "
                                            f"{members}, the store's samples_per_prompt is {per_prompt}: corrupt or hand-edited manifest",
                                            entry["shard"])
        shapes = {tuple(e["latent_shape"]) for e in self.entries}
        if len(shapes) > 1:
            raise RolloutStoreError(f"{self.root}: shards have different latent shapes {sorted(shapes)}")
        self.latent_shape = shapes.pop() if shapes else None
        self._verified: dict[str, tuple[int, ...]] = {}  # shard name -> its stat when its sha256 was last checked
        self._warned_unused: set = set()  # (k, reward) whose unused remainder was named (_group_refs)

    def __len__(self) -> int:
        return sum(e["num_samples"] for e in self.entries)

    @property
    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the store's settings and its shards' indices and checksums: an
        offline checkpoint keeps it, so a resume on a store regenerated (or finished) in the same
        folder is refused rather than replaying other groups under the old run's step count."""
        shards = [[e["index"], e["sha256"]] for e in self.entries]
        text = json.dumps({"settings": self.settings, "shards": shards}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def is_complete(self) -> bool:
        """True when every shard the settings call for is in the manifest (a finished run)."""
        per, total = self.settings.get("prompts_per_shard"), self.settings.get("num_prompts")
        if per is None or total is None:
            return True
        return len(self.entries) == (total + per - 1) // per

    @property
    def reward_names(self) -> list[str]:
        """Sorted names of every stored reward (``"<name>/partial"`` and ``"total"`` included)."""
        names: set[str] = set()
        for e in self.entries:
            for s in e["samples"]:
                names.update(s["rewards"])
        return sorted(names)

    def records(self) -> list[dict[str, Any]]:
        """Every sample record, shard by shard, each with its ``shard`` name."""
        return [{"shard": e["shard"], **s} for e in self.entries for s in e["samples"]]

    def load_shard(self, entry: dict) -> dict[str, Tensor]:
        """Tensors of one shard after checking its sha256 and shapes (RolloutStoreError if not)."""
        name = entry["shard"]
        path = self.root / "shards" / name
        if not path.exists():
            raise RolloutStoreError(f"{path}: shard listed in the manifest is missing", name)
        if sha256_file(path) != entry["sha256"]:
            raise RolloutStoreError(f"{path}: sha256 differs from the manifest (corrupt shard)", name)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:  # pragma: no cover - sha256 catches this first
            raise RolloutStoreError(f"{path}: unreadable shard: {exc}", name) from None
        expected = (entry["num_samples"], *entry["latent_shape"])
        latents = tensors.get("latents")
        if latents is None or tuple(latents.shape) != expected:
            got = None if latents is None else tuple(latents.shape)
            raise RolloutStoreError(f"{path}: latents shape {got}, manifest says {expected}", name)
        if entry["images"] == "tensor" and ("images" not in tensors or tensors["images"].shape[0] != entry["num_samples"]):
            raise RolloutStoreError(f"{path}: images missing or wrong count", name)
        return tensors

    def num_groups(self, k: Optional[int] = None, reward: Optional[str] = None) -> int:
        """How many groups :meth:`groups` yields for ``k`` (and ``reward``), counted from the manifest alone."""
        total = 0
        for entry in self.entries:
            for samples in _by_prompt(entry).values():
                if k is None or k <= len(samples):
                    total += sum(_scored(chunk, reward) for chunk in _chunks(samples, k))
        return total

    def resolve_reward(self, reward: Optional[str] = None) -> str:
        """The explicit reward a run trains on: ``reward``, else ``"total"`` when stored, else the only main
        reward (``"<name>/partial"`` entries are auxiliary and never picked by default)."""
        names = self.reward_names
        if reward is None:
            main = [n for n in names if "/" not in n]
            reward = "total" if "total" in names else (main[0] if len(main) == 1 else None)
            if reward is None:
                raise ValueError(f"store {self.root} has several rewards {names} and no 'total'; name the one to train on (reward)")
        if reward not in names:
            raise ValueError(f"reward={reward!r} is not in store {self.root}; it has {names}")
        return reward

    def _group_refs(self, k: Optional[int] = None, reward: Optional[str] = None) -> list["_GroupRef"]:
        """Every group :meth:`groups` yields, from the manifest alone (no shard is read), in store order."""
        refs, unscored, unused = [], 0, 0
        for entry in self.entries:
            for prompt_index, samples in _by_prompt(entry).items():
                size = len(samples) if k is None else k
                if size > len(samples):
                    raise ValueError(f"groups(k={k}) but prompt {prompt_index} has only {len(samples)} samples in {entry['shard']}")
                if k is not None:
                    unused += len(samples) % k
                for chunk in _chunks(samples, k):
                    if not _scored(chunk, reward):
                        unscored += 1
                        continue
                    refs.append(_GroupRef(entry, prompt_index, chunk))
        if unscored:
            logger.warning("%s: left out %d group(s) with a sample whose reward was dropped when generating", self.root, unscored)
        if unused and (k, reward) not in self._warned_unused:  # once per store and k, not once per prompt and epoch
            self._warned_unused.add((k, reward))
            per_prompt = int(self.settings.get("samples_per_prompt", 0))
            logger.warning("%s: k=%d does not divide the %d samples per prompt: the last %d of each prompt (%d in all) are not used",
                           self.root, k, per_prompt, per_prompt % k, unused)
        return refs

    def verify(self) -> None:
        """Check every shard's sha256 and shapes now (RolloutStoreError naming the first bad one), so that a run finds a
        damaged store before it trains rather than when an epoch reaches the shard; later reads of an unchanged shard
        are not checked again."""
        for entry in self.entries:
            self._verified_path(entry)

    def _verified_path(self, entry: dict) -> Path:
        """The shard's path, its sha256 and shapes checked the first time this store reads it (and again whenever its
        size, modification or change time or inode changed since): an epoch reads only the rows it trains on, not
        every shard again."""
        name = entry["shard"]
        path = self.root / "shards" / name
        try:
            st = path.stat()
        except FileNotFoundError:
            raise RolloutStoreError(f"{path}: shard listed in the manifest is missing", name) from None
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)  # ctime: a copy that restores the mtime changes it
        if self._verified.get(name) != stamp:
            self.load_shard(entry)  # sha256 and shapes, or RolloutStoreError naming the shard
            self._verified[name] = stamp
        return path

    def _read_groups(self, refs: Sequence["_GroupRef"]) -> list[StoreGroup]:
        """The groups of ``refs`` with their latents, each shard opened once and only its needed rows read."""
        from safetensors import safe_open

        x0: dict[int, Tensor] = {}
        by_shard: dict[str, list[int]] = {}
        for i, ref in enumerate(refs):
            by_shard.setdefault(ref.entry["shard"], []).append(i)
        for members in by_shard.values():
            entry = refs[members[0]].entry
            path = self._verified_path(entry)
            try:
                with safe_open(str(path), framework="pt") as fh:
                    latents = fh.get_slice("latents")
                    for i in members:  # a group's members are consecutive rows: one read of their range each
                        rows = [s["row"] for s in refs[i].chunk]
                        lo = min(rows)
                        x0[i] = latents[lo:max(rows) + 1][torch.tensor([r - lo for r in rows])]
            except (SafetensorError, OSError) as exc:
                raise RolloutStoreError(f"{path}: unreadable shard: {exc}", entry["shard"]) from None
        return [ref.group(x0[i]) for i, ref in enumerate(refs)]

    def groups(self, k: Optional[int] = None, reward: Optional[str] = None) -> Iterator[StoreGroup]:
        """Groups of ``k`` samples of one prompt, in store order.

        A prompt with ``G`` samples gives ``G // k`` groups of consecutive members (``k``
        defaults to ``G``); ``k > G`` raises. A group with a sample whose ``reward`` (default: any
        reward) was dropped (``on_error: drop`` when generating: stored as null) is left out, with a warning.
        Shards are read one at a time.
        """
        refs = self._group_refs(k, reward)
        start = 0
        while start < len(refs):  # one shard's groups at a time
            end = start + 1
            while end < len(refs) and refs[end].entry is refs[start].entry:
                end += 1
            yield from self._read_groups(refs[start:end])
            start = end

    def batches(
        self,
        k: int,
        groups_per_batch: int,
        reward: Optional[str] = None,
        shuffle: bool = True,
        generator: Optional[torch.Generator] = None,
        skip: int = 0,
    ) -> Iterator[tuple[OfflineBatch, list[StoreGroup]]]:
        """One epoch of :class:`OfflineBatch` es of ``groups_per_batch`` groups of ``k``.

        ``reward`` picks the explicit reward (default: ``"total"`` when stored, else the only
        main reward; ``"<name>/partial"`` entries are never picked by default).
        ``batch.cond_index`` is the position of each group in the returned group list.
        The order is drawn from the manifest, and each batch reads only its own groups' rows, so an
        epoch holds one batch of latents in memory, not the store; ``skip`` leaves out the first
        ``skip`` batches of the epoch without reading them (a resumed run).
        """
        reward = self.resolve_reward(reward)
        refs = self._group_refs(k, reward)  # a group whose other rewards were dropped still trains on this one
        if not refs:
            raise RolloutStoreError(f"{self.root}: the store holds no complete group of k={k}")
        order = torch.randperm(len(refs), generator=generator).tolist() if shuffle else list(range(len(refs)))
        for number, start in enumerate(range(0, len(order), groups_per_batch)):
            if number < skip:
                continue
            chosen = self._read_groups([refs[i] for i in order[start : start + groups_per_batch]])
            batch = OfflineBatch(
                x0=torch.stack([g.x0 for g in chosen]),  # [P, k, *latent]
                rewards=torch.stack([g.rewards[reward] for g in chosen]),  # [P, k]
                cond_index=torch.arange(len(chosen)),
            )
            yield batch, chosen


@dataclass
class _GroupRef:
    """Where one group's samples are: a shard's manifest entry and the group's sample records."""

    entry: dict
    prompt_index: int
    chunk: list[dict]

    def group(self, x0: Tensor) -> StoreGroup:
        """The :class:`StoreGroup` with its latents ``x0`` ``[k, *latent]``."""
        chunk = self.chunk
        return StoreGroup(
            prompt=chunk[0]["prompt"],
            prompt_index=self.prompt_index,
            x0=x0,
            rewards={n: torch.tensor([_nan_if_none(s["rewards"][n]) for s in chunk], dtype=torch.float32)
                     for n in chunk[0]["rewards"]},  # another reward than the trained one may have been dropped: NaN
            seeds=[s["seed"] for s in chunk],
            metadata=chunk[0].get("metadata", {}),
        )


def _by_prompt(entry: dict) -> dict[int, list[dict]]:
    """A shard's sample records per prompt index, each list in member order."""
    by_prompt: dict[int, list[dict]] = {}
    for s in entry["samples"]:
        by_prompt.setdefault(s["prompt_index"], []).append(s)
    for samples in by_prompt.values():
        samples.sort(key=lambda s: s["member"])
    return by_prompt


def _chunks(samples: list[dict], k: Optional[int]) -> list[list[dict]]:
    """Consecutive groups of ``k`` (default: all) of one prompt's samples; a remainder is left out."""
    size = len(samples) if k is None else k
    return [samples[start : start + size] for start in range(0, len(samples) - size + 1, size)]


def _scored(chunk: list[dict], reward: Optional[str] = None) -> bool:
    """``reward`` (default: every reward) of every sample is a finite number (a dropped one is stored as null;
    older stores: NaN)."""
    def ok(v: Any) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    return all(ok(s["rewards"].get(reward)) if reward is not None else all(ok(v) for v in s["rewards"].values()) for s in chunk)


def _nan_if_none(value: Optional[float]) -> float:
    return math.nan if value is None else float(value)


def _reward_value(value: Any) -> Optional[float]:
    """A manifest reward: the float, or None (JSON null) for a sample the reward dropped (NaN is not JSON)."""
    value = float(value)
    return value if math.isfinite(value) else None


def fill_store(
    root: PathLike,
    prompts: Sequence[Union[str, dict[str, Any]]],
    samples_per_prompt: int,
    sample_fn: SampleFn,
    score_fn: ScoreFn,
    settings: Optional[dict[str, Any]] = None,
    base_seed: int = 0,
    prompts_per_shard: int = 8,
    image_format: str = "none",
    extra: Optional[dict[str, Any]] = None,
    progress: bool = True,
) -> RolloutStore:
    """Generate ``samples_per_prompt`` samples for every prompt into the store at ``root``.

    Args:
        prompts: strings, or dicts with a ``"prompt"`` key (the rest is kept as metadata and
            passed to the rewards).
        sample_fn: ``(prompts [N], seeds [N]) -> (latents [N, *latent], images [N,3,H,W] or None)``;
            each sample must depend on its own seed only (per-sample generators).
        score_fn: ``(images, prompts, metadata) -> {reward name: Tensor[N]}`` (given the latents
            when ``sample_fn`` returns no images).
        settings: what makes two runs the same store (model hash, sampler, seeds, prompts...);
            stored in ``store.json`` and checked on resume.
        extra: fields added to each manifest line (sampler settings, model/LoRA hash).
        progress: show a tqdm bar over the samples still to generate (with each reward's mean so far).

    Resumable: shards already in the manifest are skipped, the others (re)generated.
    """
    if samples_per_prompt < 1 or prompts_per_shard < 1:
        raise ValueError(f"samples_per_prompt and prompts_per_shard must be >= 1, got {samples_per_prompt}, {prompts_per_shard}")
    specs = [p if isinstance(p, dict) else {"prompt": p} for p in prompts]
    # the whole specs: a resume after the prompt file's constraints (include, tag, ...) changed is another store
    prompt_digest = prompts_digest(specs)
    legacy_digest = hashlib.sha256(json.dumps([s["prompt"] for s in specs]).encode()).hexdigest()  # stores before 2026-12-06
    store_json = Path(root) / META_FILE
    begun = _read_store_json(store_json)["settings"] if store_json.is_file() else None  # a store to finish: its settings
    if begun is not None and begun.get("prompts_sha256") == legacy_digest:
        logger.warning("%s: a store from before the prompts' constraints were hashed: resuming it checks the prompt texts only", root)
        prompt_digest = legacy_digest
    stride = SEED_STRIDE
    if begun is not None and "seed_stride" not in begun:
        stride = 1  # a store from before the stride: finished with the seeds it began with
    full_settings = {
        **(settings or {}),
        "samples_per_prompt": samples_per_prompt,
        "prompts_per_shard": prompts_per_shard,
        "base_seed": base_seed,
        **({"seed_stride": stride} if stride != 1 else {}),
        "num_prompts": len(specs),
        "prompts_sha256": prompt_digest,
        "image_format": image_format,
    }
    writer = RolloutWriter(root, full_settings)
    num_shards = (len(specs) + prompts_per_shard - 1) // prompts_per_shard
    todo = [i for i in range(num_shards) if i not in writer.completed]
    logger.info("rollout store %s: %d/%d shards done, %d to generate", root, num_shards - len(todo), num_shards, len(todo))
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        remaining = sum(len(specs[i * prompts_per_shard : (i + 1) * prompts_per_shard]) for i in todo) * samples_per_prompt
        bar = tqdm(total=remaining, desc="generate", unit="sample")
    sums: dict[str, tuple[float, int]] = {}  # per reward: sum and count of its scored (non-NaN) values
    done = 0
    try:
        for index in todo:
            first = index * prompts_per_shard
            chunk = specs[first : first + prompts_per_shard]
            prompt_ids = [first + i for i in range(len(chunk)) for _ in range(samples_per_prompt)]
            members = [j for _ in chunk for j in range(samples_per_prompt)]
            texts = [specs[p]["prompt"] for p in prompt_ids]
            meta = [{k: v for k, v in specs[p].items() if k != "prompt"} for p in prompt_ids]
            seeds = [sample_seed(base_seed, p, j, samples_per_prompt, stride) for p, j in zip(prompt_ids, members)]
            latents, images = sample_fn(texts, seeds)
            scores = score_fn(images, texts, meta) if images is not None else score_fn(latents, texts, meta)
            records = []
            for row, (p, j, seed) in enumerate(zip(prompt_ids, members, seeds)):
                records.append({
                    "prompt": texts[row], "prompt_index": p, "group": p, "member": j, "seed": seed,
                    "rewards": {name: _reward_value(values[row]) for name, values in scores.items()},
                    "metadata": meta[row],
                })
            writer.write_shard(index, latents, records, images, image_format, extra)
            done += len(records)
            if bar is not None:
                for name, values in scores.items():  # the mean over scored samples: a dropped (NaN) one is not a 0
                    values = torch.as_tensor(values).float()
                    total, count = sums.get(name, (0.0, 0))
                    sums[name] = (total + float(values.nansum()), count + int((~values.isnan()).sum()))
                bar.update(len(records))
                bar.set_postfix({name: f"{total / count:.3f}" if count else "nan" for name, (total, count) in sorted(sums.items())[:3]})
    finally:
        if bar is not None:
            bar.close()
    return RolloutStore(root)
