"""Data files a run reads back (rollout-store manifests, checkpoint manifests) cannot make it read outside their
folder or crash with a traceback: hand-edited or corrupt entries are one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from flowalign import checkpoint as ckpt
from flowalign.errors import CheckpointError, RolloutStoreError
from flowalign.offline import MANIFEST_FILE, META_FILE, STORE_VERSION, RolloutStore


def _store_with(tmp_path, entry) -> RolloutStore:
    root = tmp_path / "store"
    (root / "shards").mkdir(parents=True)
    (root / META_FILE).write_text(json.dumps({"version": STORE_VERSION, "settings": {}}))
    (root / MANIFEST_FILE).write_text(json.dumps(entry) + "\n")
    return RolloutStore(root)


@pytest.mark.parametrize("shard", ["../../outside.safetensors", "/dev/zero", "shard-00001.safetensors"])
def test_a_store_manifest_cannot_name_a_shard_outside_its_folder(tmp_path, shard):
    """Shard paths were root / "shards" / entry["shard"] unchecked: "../../x" and absolute paths loaded files outside
    the store, and /dev/zero hung the checksum. A shard is now named by its index or refused."""
    save_file({"latents": torch.zeros(1, 2)}, str(tmp_path / "outside.safetensors"))
    entry = {"index": 0, "shard": shard, "sha256": "0" * 64, "num_samples": 1, "latent_shape": [2], "samples": [{}]}
    with pytest.raises(RolloutStoreError, match="line 1: not a shard entry"):
        _store_with(tmp_path, entry)


@pytest.mark.parametrize("entry", [[1, 2], {"shard": "x"}, {"index": 0, "shard": "shard-00000.safetensors", "sha256": "0",
                                                              "num_samples": 1, "latent_shape": 5, "samples": []}])
def test_a_malformed_store_manifest_line_is_a_store_error(tmp_path, entry):
    with pytest.raises(RolloutStoreError, match="not a shard entry"):
        _store_with(tmp_path, entry)


def _edit_manifest(path, **changes):
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest.update(changes)
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_a_checkpoint_manifest_cannot_load_files_outside_its_folder_or_unlisted(tmp_path):
    """verify_checkpoint checked only the files the manifest listed, whatever their names, and load_checkpoint then
    loaded tensor_groups and the state whether listed or not."""
    save_file({"w": torch.ones(1)}, str(tmp_path / "evil.safetensors"))
    path = ckpt.save_checkpoint(tmp_path / "ck", 1, {"lora": {"w": torch.zeros(1)}}, {"it": 1})
    good = json.loads((path / ckpt.MANIFEST).read_text())
    _edit_manifest(path, files={}, tensor_groups=["../../evil"])
    with pytest.raises(CheckpointError, match="not its tensor groups' files, exports and the state"):
        ckpt.load_checkpoint(path)
    evil = {"size": (tmp_path / "evil.safetensors").stat().st_size, "sha256": ckpt.sha256_file(tmp_path / "evil.safetensors")}
    _edit_manifest(path, files={**good["files"], "../../evil.safetensors": evil}, tensor_groups=["lora"])
    with pytest.raises(CheckpointError, match="not its tensor groups' files"):
        ckpt.load_checkpoint(path)
    _edit_manifest(path, files={**good["files"], "../../evil.safetensors": evil}, exports=["../../evil.safetensors"])
    with pytest.raises(CheckpointError, match="lacks files / tensor_groups / iteration in the expected form"):  # exports too
        ckpt.load_checkpoint(path)
    _edit_manifest(path, **good)
    assert torch.equal(ckpt.load_checkpoint(path).tensors["lora"]["w"], torch.zeros(1))


@pytest.mark.parametrize("manifest", [{"format": 1}, [1], {"format": 1, "files": [], "tensor_groups": [], "iteration": 1}])
def test_a_malformed_checkpoint_manifest_is_skipped_as_corrupt(tmp_path, manifest):
    """{"format": 1} raised KeyError out of find_latest: a traceback for --resume instead of 'skipping corrupt checkpoint'."""
    older = ckpt.save_checkpoint(tmp_path, 1, {"lora": {"w": torch.zeros(1)}}, {"it": 1})
    newer = ckpt.save_checkpoint(tmp_path, 2, {"lora": {"w": torch.ones(1)}}, {"it": 2})
    (newer / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError):
        ckpt.verify_checkpoint(newer)
    assert ckpt.find_latest(tmp_path) == older
