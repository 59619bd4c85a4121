"""Checkpoints: pickle-free round trips, atomic writes, pruning, corruption detection."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from flowalign import checkpoint as ckpt
from flowalign.errors import CheckpointError


def _optimizer_after_steps(steps: int, seed: int = 0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        (params[0].sum() ** 2 + params[1].pow(3).sum()).backward()
        opt.step()
    return params, opt


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    params, opt = _optimizer_after_steps(3)
    path = ckpt.save_checkpoint(tmp_path, 3, {"params": {str(i): p.data for i, p in enumerate(params)}}, {"optimizer": opt.state_dict()})
    loaded = ckpt.load_checkpoint(path)
    # a fresh optimizer restored from the checkpoint must take exactly the same next step
    new_params = [torch.nn.Parameter(loaded.tensors["params"][str(i)].clone()) for i in range(2)]
    new_opt = torch.optim.AdamW(new_params, lr=5.0)  # lr comes back from the state
    new_opt.load_state_dict(loaded.state["optimizer"])
    assert new_opt.param_groups[0]["lr"] == 1e-2
    for p, o in ((params, opt), (new_params, new_opt)):
        o.zero_grad()
        (p[0].sum() ** 2 + p[1].pow(3).sum()).backward()
        o.step()
    for a, b in zip(params, new_params):
        assert torch.equal(a.data, b.data)


def test_split_merge_keeps_int_keys_tuples_and_dtypes():
    state = {"a": {1: torch.arange(3, dtype=torch.int16), 2: (1.5, "x")}, "b": [np.arange(4, dtype=np.uint32), None, True]}
    as_json, tensors = ckpt.split_state(state)
    back = ckpt.merge_state(json.loads(json.dumps(as_json)), tensors)
    assert set(back["a"]) == {1, 2}
    assert back["a"][1].dtype == torch.int16 and torch.equal(back["a"][1], state["a"][1])
    assert back["a"][2] == (1.5, "x")
    assert torch.equal(back["b"][0], torch.arange(4, dtype=torch.int64).to(torch.uint32))
    assert back["b"][1:] == [None, True]


def test_a_key_holding_a_slash_does_not_collide_with_a_nested_key():
    """Tensor paths join keys with "/": {"a/b": ones, "a": {"b": zeros}} stored both under "/a/b" and read back zeros twice."""
    state = {"a/b": torch.ones(2), "a": {"b": torch.zeros(2)}}
    as_json, tensors = ckpt.split_state(state)
    assert len(tensors) == 2
    back = ckpt.merge_state(json.loads(json.dumps(as_json)), tensors)
    assert torch.equal(back["a/b"], torch.ones(2)) and torch.equal(back["a"]["b"], torch.zeros(2))


def test_split_state_rejects_objects():
    with pytest.raises(CheckpointError, match="cannot store object"):
        ckpt.split_state({"x": object()})


def test_rng_round_trip_through_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(123)
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    torch.randn(5, generator=gen)
    path = ckpt.save_checkpoint(tmp_path, 1, {}, {"rng": ckpt.capture_rng({"sampler": gen})})
    expected = (torch.randn(4, generator=gen), torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    gen.manual_seed(0)
    ckpt.restore_rng(ckpt.load_checkpoint(path).state["rng"], {"sampler": gen})
    got = (torch.randn(4, generator=gen), torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def test_cuda_rng_states_restore_onto_the_devices_this_machine_has(monkeypatch):
    """A checkpoint saved with 2 visible GPUs resumed where 1 is visible: device 0 gets its state, device 1's is
    ignored (set_rng_state_all raised IndexError for the missing device). Simulated: no GPU here."""
    restored = []
    state = ckpt.capture_rng()
    state["cuda"] = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((int(s[0]), device)))

    def set_all(states):  # what torch does with more states than devices: default_generators[1] does not exist
        if len(states) > torch.cuda.device_count():
            raise IndexError("tuple index out of range")

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    ckpt.restore_rng(state)
    assert restored == [(1, 0)]


def test_keep_last_k_and_find_latest(tmp_path):
    for it in (2, 4, 6, 8):
        ckpt.save_checkpoint(tmp_path, it, {"lora": {"w": torch.full((2,), float(it))}}, {"it": it}, keep=2)
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [6, 8]
    latest = ckpt.find_latest(tmp_path)
    assert latest.name == "iter_000008"
    loaded = ckpt.load_checkpoint(latest)
    assert loaded.iteration == 8 and loaded.state == {"it": 8}
    assert torch.equal(loaded.tensors["lora"]["w"], torch.full((2,), 8.0))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "delete"])
def test_find_latest_skips_corrupt_checkpoint(tmp_path, caplog, damage):
    ckpt.save_checkpoint(tmp_path, 1, {"lora": {"w": torch.ones(64)}}, {"it": 1})
    bad = ckpt.save_checkpoint(tmp_path, 2, {"lora": {"w": torch.zeros(64)}}, {"it": 2})
    target = bad / "lora.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (bad / ckpt.MANIFEST).unlink()
    else:
        target.unlink()
    with caplog.at_level(logging.WARNING, logger="flowalign.checkpoint"):
        assert ckpt.find_latest(tmp_path).name == "iter_000001"
    assert "iter_000002" in caplog.text
    with pytest.raises(CheckpointError):
        ckpt.load_checkpoint(bad)


def test_failed_write_leaves_previous_checkpoints_and_no_temp(tmp_path, monkeypatch):
    good = ckpt.save_checkpoint(tmp_path, 1, {"lora": {"w": torch.ones(3)}}, {"it": 1})
    from flowalign import files

    calls = {"n": 0}
    real_write = files._write_file

    def failing_write(path, data):  # a full disk
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(files, "_write_file", failing_write)
    with pytest.raises(OSError, match="No space left on device"):
        ckpt.save_checkpoint(tmp_path, 2, {"lora": {"w": torch.zeros(3)}, "ema": {"w": torch.zeros(3)}}, {"it": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]
    assert ckpt.find_latest(tmp_path) == good


def test_resaving_an_iteration_replaces_it(tmp_path):
    ckpt.save_checkpoint(tmp_path, 3, {"lora": {"w": torch.ones(3)}}, {"v": 1})
    ckpt.save_checkpoint(tmp_path, 3, {"lora": {"w": torch.zeros(3)}}, {"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000003"]
    assert ckpt.load_checkpoint(tmp_path / "iter_000003").state == {"v": 2}


def test_a_checkpoint_written_after_resuming_an_older_one_drops_the_abandoned_newer_ones(tmp_path):
    """Resumed from iter 2 of a run that reached iter 4, the new iter 3 must be what --resume picks next: iter 4
    (whose metrics the resume already dropped) is deleted, and keep counts only checkpoints up to iter 3."""
    save = lambda it, keep: ckpt.save_checkpoint(tmp_path, it, {"lora": {"w": torch.full((2,), float(it))}}, {"it": it}, keep=keep)  # noqa: E731
    save(2, 2)
    save(4, 2)
    save(3, 2)  # the resumed run's checkpoint
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3] and ckpt.find_latest(tmp_path).name == "iter_000003"
    save(4, 1)
    save(3, 1)  # keep 1 used to delete the checkpoint just written and keep the abandoned iter 4
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [3]
    (tmp_path / ".old-iter_000002-1").mkdir()  # a leftover of an interrupted re-save by another process
    save(5, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000005"]


def test_a_second_signal_during_a_re_save_keeps_the_previous_copy(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 2, {"lora": {"w": torch.ones(2)}}, {"v": 1})
    real_replace, calls = ckpt.os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        real_replace(src, dst)
        if len(calls) == 1:  # the old copy was moved aside: Ctrl-C before the new one is moved in
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, {"lora": {"w": torch.zeros(2)}}, {"v": 2})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_000002"]
    assert ckpt.load_checkpoint(ckpt.find_latest(tmp_path)).state == {"v": 1}


def test_config_hash_mismatch_is_refused(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, {}, {}, config_hash="aaaa")
    assert ckpt.load_checkpoint(path, expected_config_hash="aaaa").config_hash == "aaaa"
    with pytest.raises(CheckpointError, match="config hash aaaa"):
        ckpt.load_checkpoint(path, expected_config_hash="bbbb")


def test_no_pickle_in_checkpoint(tmp_path):
    _, opt = _optimizer_after_steps(1)
    path = ckpt.save_checkpoint(tmp_path, 1, {}, {"optimizer": opt.state_dict(), "rng": ckpt.capture_rng()})
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "state.json", "state.safetensors"]
    json.loads((path / "state.json").read_text())  # plain JSON


def test_exports_are_written_listed_and_checked_but_not_loaded(tmp_path):
    def export(folder):
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"diffusers file")
        return ["pytorch_lora_weights.safetensors"]

    path = ckpt.save_checkpoint(tmp_path, 1, {"lora": {"w": torch.ones(2)}}, {"it": 1}, export=export)
    manifest = ckpt.verify_checkpoint(path)
    assert manifest["exports"] == ["pytorch_lora_weights.safetensors"]
    assert manifest["files"]["pytorch_lora_weights.safetensors"]["size"] == len(b"diffusers file")
    loaded = ckpt.load_checkpoint(path)
    assert set(loaded.tensors) == {"lora"} and loaded.state == {"it": 1}  # resume state only
    (path / "pytorch_lora_weights.safetensors").write_bytes(b"diffusers filE")
    with pytest.raises(CheckpointError, match="pytorch_lora_weights.safetensors does not match its sha256"):
        ckpt.verify_checkpoint(path)
    (path / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pytorch_lora_weights.safetensors is missing"):
        ckpt.verify_checkpoint(path)
    assert ckpt.find_latest(tmp_path) is None  # its only checkpoint no longer verifies


@pytest.mark.parametrize("name", ["lora.safetensors", "state.json", "../outside.bin", "never_written.bin"])
def test_an_export_may_not_shadow_or_escape_the_checkpoint(tmp_path, name):
    def export(folder):
        if name != "never_written.bin":
            (folder / Path(name).name).write_bytes(b"x")
        return [name]

    with pytest.raises(CheckpointError, match="not a file of its own"):
        ckpt.save_checkpoint(tmp_path, 1, {"lora": {"w": torch.ones(2)}}, {"it": 1}, export=export)
    assert ckpt.list_checkpoints(tmp_path) == [] and not list(tmp_path.glob(".tmp-*"))  # nothing left behind


WRITE_WITH_METADATA = """
import sys, torch
from flowalign.files import save_safetensors
meta = {k: str(i) for i, k in enumerate(["format", "version", "index", "alpha", "beta", "gamma", "delta", "epsilon"])}
save_safetensors({"b": torch.arange(6.0), "a": torch.ones(2, 3, dtype=torch.bfloat16)}, sys.argv[1], metadata=meta)
"""


def test_safetensors_files_are_byte_identical_across_processes_and_readable_by_others(tmp_path):
    """safetensors writes __metadata__ keys in a per-process hash order and files 0o600: a regenerated rollout store's
    shards (the same tensors) got other sha256 fingerprints, and a shared store or checkpoint was unreadable to others."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file, safe_open

    paths = [tmp_path / f"w{i}.safetensors" for i in range(3)]
    old = os.umask(0o022)
    try:
        for path in paths:
            subprocess.run([sys.executable, "-c", WRITE_WITH_METADATA, str(path)], check=True)
    finally:
        os.umask(old)
    data = [p.read_bytes() for p in paths]
    assert data[0] == data[1] == data[2]
    n = int.from_bytes(data[0][:8], "little")
    header = data[0][8:8 + n]
    assert n % 8 == 0 and header.rstrip(b" ") == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
    assert torch.equal(load_file(str(paths[0]))["b"], torch.arange(6.0))
    with safe_open(str(paths[0]), "pt") as fh:
        assert fh.metadata()["epsilon"] == "7"
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in paths)


def test_resuming_across_a_reward_version_warns(caplog):
    import logging
    from pathlib import Path
    from types import SimpleNamespace

    from flowalign.rewards import load_reward
    from flowalign.train.trainer_checkpoint import warn_changed_rewards

    trainer = SimpleNamespace(rewards={"shapes": load_reward("shapes"), "brightness": load_reward("brightness")})
    with caplog.at_level(logging.WARNING, logger="flowalign.train.trainer"):
        warn_changed_rewards(trainer, {"shapes": "2", "brightness": None}, Path("ckpt"))
        assert caplog.text == ""
        warn_changed_rewards(trainer, None, Path("ckpt"))  # a checkpoint from before versions were recorded
    assert "trained with reward 'shapes' at no recorded version" in caplog.text and "brightness" not in caplog.text


def test_a_resumed_run_keeps_the_eval_grid_it_began_with(caplog):
    """The eval grid's prompts changed (the first N lines -> prompts spread over the tags): a run resumed across the
    change measured eval/* on other prompts after the resume."""
    import logging
    from types import SimpleNamespace

    from flowalign.prompts import PromptRecord, spread_records
    from flowalign.train.trainer_checkpoint import keep_eval_grid

    pool = [PromptRecord(p, {"tag": t}) for p, t in [("a", "x"), ("a", "x"), ("b", "x"), ("c", "y"), ("d", "z")]]

    def trainer():
        return SimpleNamespace(heldout_records=pool, sampler=SimpleNamespace(records=[]), eval_records=spread_records(pool, 3))

    t = trainer()
    assert [r.prompt for r in t.eval_records] == ["a", "c", "d"]
    keep_eval_grid(t, None)  # a checkpoint from before it recorded them: the grid then was the first 3 lines
    assert [r.prompt for r in t.eval_records] == ["a", "a", "b"]
    t = trainer()
    keep_eval_grid(t, ["d", "b", "a"])
    assert [r.prompt for r in t.eval_records] == ["d", "b", "a"] and t.eval_records[0] is pool[4]
    t = trainer()
    with caplog.at_level(logging.WARNING, logger="flowalign.train.trainer"):
        keep_eval_grid(t, ["gone", "a", "b"])
    assert [r.prompt for r in t.eval_records] == ["a", "c", "d"] and "no longer all in the eval prompts" in caplog.text
