"""Prompt sets: reading prompt files and drawing per-iteration batches of prompts.

Files (UTF-8, an optional BOM is ignored):

- ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped; each
  prompt is stripped of surrounding whitespace.
- ``.jsonl``: one JSON object per non-blank line with at least a non-empty string ``"prompt"``;
  every other key is kept as the record's metadata (for example ShapesEval's
  ``{"prompt": ..., "tag": "counting", "include": [...]}``), which the trainer passes to rewards.

Any problem raises ``PromptFileError`` naming the file and, where it applies, the line.

``PromptSampler`` draws the prompts of each training iteration: an endless stream made of one
shuffled permutation of the prompt set per epoch, cut into global batches of
``batch_size * num_shards`` prompts, of which process ``shard_index`` takes its own slice. Every
process computes the same stream, so a prompt (and the group of samples drawn for it) belongs to
exactly one process, and the sampler's state is the same on every process.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from flowalign.errors import CheckpointError, ConfigError, PromptFileError

logger = logging.getLogger(__name__)

PROMPT_FILE_SUFFIXES = (".txt", ".jsonl")
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class PromptRecord:
    """One prompt and its metadata (the other keys of a JSONL object; empty for ``.txt``).

    ``line`` is the 1-based line of the file it came from (0 when not read from a file).
    """

    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)
    line: int = 0


def spread_records(records: Sequence[PromptRecord], n: int) -> list[PromptRecord]:
    """Up to ``n`` distinct prompts of ``records`` spread over their tags (``metadata["tag"]``): one of each tag in the
    order tags first appear, then a second of each, ... (each tag's prompts in file order). An eval grid of the first
    ``n`` lines showed one category (the shipped held-out file starts with 64 lines of two prompts of two objects)."""
    by_tag: dict[Any, list[PromptRecord]] = {}
    seen: set[str] = set()
    for record in records:
        if record.prompt not in seen:
            seen.add(record.prompt)
            by_tag.setdefault(record.metadata.get("tag"), []).append(record)
    out: list[PromptRecord] = []
    queues = [list(group) for group in by_tag.values()]
    while len(out) < n and any(queues):
        for queue in queues:
            if queue and len(out) < n:
                out.append(queue.pop(0))
    return out


def prompts_digest(records: Sequence[Any]) -> str:
    """sha256 of the prompts in order, each with its metadata (``{"prompt": ..., **metadata}`` as canonical JSON):
    what a run or a rollout store trained on, so a resume notices an edited prompt file."""
    prompts, metadata = split_records(records)
    specs = [{"prompt": p, **m} for p, m in zip(prompts, metadata)]
    return hashlib.sha256(json.dumps(specs, sort_keys=True, default=str).encode()).hexdigest()


def split_records(records: Sequence[Any]) -> tuple[list[str], list[dict]]:
    """``(prompts, metadata)`` from ``PromptRecord`` s, ``{"prompt": ..., **metadata}`` mappings or plain strings."""
    prompts, metadata = [], []
    for r in records:
        if isinstance(r, str):
            prompts.append(r)
            metadata.append({})
        elif isinstance(r, dict):
            prompts.append(r["prompt"])
            metadata.append({k: v for k, v in r.items() if k != "prompt"})
        else:
            prompts.append(r.prompt)
            metadata.append(dict(r.metadata))
    return prompts, metadata


def load_prompts(path: Union[str, Path]) -> list[PromptRecord]:
    """Read a ``.txt`` or ``.jsonl`` prompt file (see the module docstring for the formats).

    Raises:
        PromptFileError: unsupported suffix, missing or unreadable file, invalid UTF-8, malformed
            JSON, a JSON line that is not an object, a missing / empty / non-string ``"prompt"``,
            or a file without any prompt. The message names the file and the line.
    """
    from flowalign.assets import resolve_asset

    path = resolve_asset(path)  # "assets/prompts/..." from any folder with an installed flowalign
    suffix = path.suffix.lower()
    if path.is_dir():
        raise PromptFileError(f"{path}: is a folder; give a .txt or .jsonl prompt file", path=path)
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise PromptFileError(f"{path}: unsupported prompt file type {suffix or '(none)'!r}; use .txt or .jsonl", path=path)
    if not path.exists():
        from flowalign.files import relative_to_cwd

        raise PromptFileError(f"{path}: prompt file not found{relative_to_cwd(path)}", path=path)
    if not path.is_file():
        raise PromptFileError(f"{path}: not a file", path=path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot read prompt file: {exc}", path=path) from exc
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]

    parse = _parse_txt_line if suffix == ".txt" else _parse_jsonl_line
    records: list[PromptRecord] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PromptFileError(f"{path}:{number}: not valid UTF-8 ({exc.reason} at byte {exc.start})", path=path, line=number) from None
        record = parse(text, path, number)
        if record is not None:
            records.append(record)
    if not records:
        kind = "empty file" if not data.strip() else "only blank lines and comments"
        raise PromptFileError(f"{path}: no prompts ({kind})", path=path)
    return records


def _check_prompt(prompt: str, path: Path, number: int) -> None:
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptFileError(f"{path}:{number}: prompt contains an invalid unicode escape (lone surrogate)", path=path, line=number) from None


def _parse_txt_line(text: str, path: Path, number: int) -> Optional[PromptRecord]:
    prompt = text.strip()
    if not prompt or prompt.startswith("#"):
        return None
    if prompt.startswith("{") and prompt.endswith("}") and '"prompt"' in prompt:
        # a JSONL record in a .txt file would become the prompt text itself, braces and all
        raise PromptFileError(f"{path}:{number}: this line is a JSON prompt record, but a .txt file holds one plain prompt "
                              f"per line; rename the file to .jsonl", path=path, line=number)
    _check_prompt(prompt, path, number)
    return PromptRecord(prompt=prompt, metadata={}, line=number)


class _StrictJSONError(ValueError):
    """JSON that Python's parser takes but a prompt record must not hold."""


def _no_duplicate_keys(pairs: list) -> dict:
    """``object_pairs_hook``: a key given twice (``json.loads`` keeps the last one silently) is an error."""
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise _StrictJSONError(f"key {key!r} appears twice in one record")
        obj[key] = value
    return obj


def _no_nonfinite_number(name: str):
    """``parse_constant``: NaN / Infinity are not JSON (Python's parser accepts them)."""
    raise _StrictJSONError(f"{name} is not a JSON number")


def _parse_jsonl_line(text: str, path: Path, number: int) -> Optional[PromptRecord]:
    if not text.strip():
        return None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_nonfinite_number)
    except _StrictJSONError as exc:
        raise PromptFileError(f"{path}:{number}: {exc}", path=path, line=number) from None
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})", path=path, line=number) from None
    except (ValueError, RecursionError) as exc:
        raise PromptFileError(f"{path}:{number}: malformed JSON ({type(exc).__name__}: {exc})", path=path, line=number) from None
    if not isinstance(obj, dict):
        raise PromptFileError(f"{path}:{number}: expected a JSON object with a \"prompt\" key, got {type(obj).__name__}", path=path, line=number)
    if "prompt" not in obj:
        raise PromptFileError(f"{path}:{number}: missing \"prompt\" key (keys: {sorted(obj)[:10]})", path=path, line=number)
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise PromptFileError(f"{path}:{number}: \"prompt\" must be a string, got {type(prompt).__name__}", path=path, line=number)
    if not prompt.strip():
        raise PromptFileError(f"{path}:{number}: empty \"prompt\"", path=path, line=number)
    _check_prompt(prompt, path, number)
    metadata = {key: value for key, value in obj.items() if key != "prompt"}
    return PromptRecord(prompt=prompt, metadata=metadata, line=number)


class PromptSampler:
    """Deterministic, resumable, sharded batches of prompts, one batch per training iteration.

    The stream is ``perm_0 + perm_1 + ...`` where ``perm_e`` is a permutation of the prompt
    indices drawn by a ``torch.Generator`` seeded from ``(seed, e)`` (or ``arange`` when
    ``shuffle=False``). Iteration ``t`` takes stream positions ``[t*G, (t+1)*G)`` with
    ``G = batch_size * num_shards``; process ``shard_index`` keeps positions
    ``[shard_index*batch_size, (shard_index+1)*batch_size)`` of that window. So every prompt is
    drawn once per epoch across all processes, an iteration may straddle two epochs, and the state
    ``(epoch, offset)`` is identical on all processes.

    Args:
        prompts: ``PromptRecord``s (from ``load_prompts``) or plain strings.
        batch_size: prompts per process per iteration (each becomes a group of samples).
        seed: an int, or a ``torch.Generator`` from which the seed is drawn.
        shuffle: shuffle each epoch (True) or cycle through the file order.
        num_shards: number of processes; shard_index: this process's rank in ``[0, num_shards)``.
    """

    def __init__(self, prompts: Sequence[Union[PromptRecord, str]], batch_size: int, *,
                 seed: Union[int, torch.Generator] = 0, shuffle: bool = True, num_shards: int = 1, shard_index: int = 0):
        self.records = [p if isinstance(p, PromptRecord) else PromptRecord(prompt=str(p)) for p in prompts]
        if not self.records:
            raise ConfigError("PromptSampler needs at least one prompt")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"PromptSampler batch_size must be a positive int, got {batch_size!r}")
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
            raise ConfigError(f"PromptSampler num_shards must be a positive int, got {num_shards!r}")
        if not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
            raise ConfigError(f"PromptSampler shard_index must be in [0, {num_shards}), got {shard_index!r}")
        if isinstance(seed, torch.Generator):
            seed = int(torch.randint(0, 2**62, (1,), generator=seed).item())
        self.seed = int(seed)
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.num_shards = num_shards
        self.shard_index = shard_index
        self.epoch = 0  # epoch of the next stream position
        self.offset = 0  # next position inside that epoch's permutation
        self.iteration = 0
        self._cached: tuple[int, list[int]] = (-1, [])
        self._prompts_sha256: Optional[str] = None  # prompts_digest(records), computed once when first asked
        if self.global_batch_size > len(self.records):
            logger.warning("PromptSampler: %d prompts per iteration from a set of %d; prompts repeat within an iteration",
                           self.global_batch_size, len(self.records))

    @property
    def global_batch_size(self) -> int:
        """Prompts per iteration over all processes."""
        return self.batch_size * self.num_shards

    def _permutation(self, epoch: int) -> list[int]:
        if self._cached[0] != epoch:
            n = len(self.records)
            if self.shuffle:
                generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63 - 1))
                order = torch.randperm(n, generator=generator).tolist()
            else:
                order = list(range(n))
            self._cached = (epoch, order)
        return self._cached[1]

    def next_indices(self) -> list[int]:
        """Advance one iteration; return this process's ``batch_size`` prompt indices."""
        window: list[int] = []
        n = len(self.records)
        while len(window) < self.global_batch_size:
            order = self._permutation(self.epoch)
            take = min(self.global_batch_size - len(window), n - self.offset)
            window.extend(order[self.offset:self.offset + take])
            self.offset += take
            if self.offset == n:
                self.epoch, self.offset = self.epoch + 1, 0
        self.iteration += 1
        start = self.shard_index * self.batch_size
        return window[start:start + self.batch_size]

    def next_batch(self) -> list[PromptRecord]:
        """Advance one iteration; return this process's ``batch_size`` prompt records."""
        return [self.records[i] for i in self.next_indices()]

    def __iter__(self) -> Iterator[list[PromptRecord]]:
        return self

    def __next__(self) -> list[PromptRecord]:
        return self.next_batch()

    def _digest(self) -> str:
        if self._prompts_sha256 is None:  # the records are fixed: hashed once
            self._prompts_sha256 = prompts_digest(self.records)
        return self._prompts_sha256

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position in the stream (identical on every process), with the prompts' digest."""
        return {"seed": self.seed, "shuffle": self.shuffle, "num_prompts": len(self.records), "epoch": self.epoch,
                "offset": self.offset, "iteration": self.iteration, "global_batch_size": self.global_batch_size,
                "prompts_sha256": self._digest()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the next batches are exactly those the saved sampler would draw.

        Raises ``CheckpointError`` when the prompt count, seed or shuffling differ (the stream
        would differ), or the prompts themselves (:func:`prompts_digest`; states saved before it
        was recorded are not checked). A different ``batch_size`` / ``num_shards`` continues the same stream.
        """
        missing = {"seed", "shuffle", "num_prompts", "epoch", "offset"} - set(state)
        if missing:
            raise CheckpointError(f"PromptSampler state lacks {sorted(missing)}")
        for key, mine in (("num_prompts", len(self.records)), ("seed", self.seed), ("shuffle", self.shuffle)):
            if state[key] != mine:
                raise CheckpointError(f"PromptSampler state has {key}={state[key]!r} but this sampler has {key}={mine!r}")
        if "prompts_sha256" in state and state["prompts_sha256"] != self._digest():
            raise CheckpointError("the prompts differ from those this run was trained on (same count; other texts, "
                                  "constraints or order): resume with the prompt file the run started with")
        if not 0 <= int(state["offset"]) < len(self.records) or int(state["epoch"]) < 0:
            raise CheckpointError(f"PromptSampler state out of range: epoch={state['epoch']!r}, offset={state['offset']!r}")
        if state.get("global_batch_size", self.global_batch_size) != self.global_batch_size:
            logger.warning("PromptSampler: resuming with %d prompts per iteration instead of %d",
                           self.global_batch_size, state["global_batch_size"])
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self.iteration = int(state.get("iteration", 0))
