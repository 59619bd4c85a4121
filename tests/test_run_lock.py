"""One run per output folder at a time (train/run_lock.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flowalign.errors import ConfigError
from flowalign.train import cli
from flowalign.train.run_dir import foreign_entries, is_empty
from flowalign.train.run_lock import LOCK_NAME, RunLock

TINY_RECIPE = Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_grpo.yaml"
HOLD = textwrap.dedent("""
    import sys, time
    from flowalign.train.run_lock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


@pytest.fixture
def other_process_holds(tmp_path):
    """Another process holding the lock on tmp_path / 'run' (as a second, running flowalign would)."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert holder.stdout.readline().strip() == "locked"
    yield run, holder.pid
    holder.kill()
    holder.wait()


def test_a_second_run_on_a_locked_folder_stops_before_writing(other_process_holds, capsys):
    run, pid = other_process_holds
    args = ["train", "--config", str(TINY_RECIPE), "--set", f"train.output_dir={run}", "--set", "train.iterations=1", "--overwrite"]
    assert cli.main(args) == 2
    assert f"in use by another flowalign run (pid {pid})" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # the holder's, untouched


def test_the_lock_goes_with_its_process_and_a_run_then_starts(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(60)", "import os; os._exit(0)"), str(run)],
                            capture_output=True, text=True)
    assert holder.returncode == 0  # exited without releasing: the kernel released it
    assert (run / LOCK_NAME).is_file()  # a killed holder leaves the file, not the lock
    assert is_empty(run) and foreign_entries(run) == []  # and the file neither fills a folder nor is foreign
    lock = RunLock(run).acquire()
    lock.release()
    assert not (run / LOCK_NAME).exists()  # a released lock takes its file along


def test_bad_input_leaves_no_folder_and_a_finished_run_frees_its_folder(tmp_path, capsys):
    run = tmp_path / "run"
    bad = ["train", "--config", str(TINY_RECIPE), "--set", f"train.output_dir={run}", "--set", "rewards=[{name: brigthness}]"]
    assert cli.main(bad) == 2 and not run.exists()
    good = ["train", "--config", str(TINY_RECIPE), "--set", f"train.output_dir={run}", "--set", "train.iterations=1",
            "--set", "train.progress=false", "--set", "train.log_with=[]"]
    assert cli.main(good) == 0
    assert not (run / LOCK_NAME).exists()  # the finished run let the folder go
    (run / LOCK_NAME).write_text("12345\n")  # as a killed run leaves it
    assert cli.main(good + ["--overwrite"]) == 0  # a stale lock file neither blocks nor makes the folder foreign
    assert (run / "pytorch_lora_weights.safetensors").is_file() and not (run / LOCK_NAME).exists()


def test_a_locked_folder_refuses_the_offline_trainer_too(other_process_holds):
    from flowalign.train.offline_trainer import OfflineTrainer, load_offline_config

    run, pid = other_process_holds
    cfg = load_offline_config(None, [f"output_dir={run}", f"store={run.parent / 'store'}"])
    with pytest.raises(ConfigError, match=f"pid {pid}"):
        OfflineTrainer(cfg).setup()


def _other_process_can_lock(run) -> bool:
    probe = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(60)", "pass"), str(run)], capture_output=True, text=True)
    return probe.returncode == 0


def test_trainers_of_one_process_share_the_lock_until_the_last_lets_go(tmp_path):
    run = tmp_path / "run"
    first, second = RunLock(run).acquire(), RunLock(run).acquire()
    first.release()
    assert (run / LOCK_NAME).is_file() and not _other_process_can_lock(run)  # the second still runs there
    second.release()
    assert not (run / LOCK_NAME).exists() and _other_process_can_lock(run)


def test_bad_input_into_a_new_nested_folder_leaves_none_of_it(tmp_path):
    run = tmp_path / "a" / "b" / "run"
    bad = ["train", "--config", str(TINY_RECIPE), "--set", f"train.output_dir={run}", "--set", "rewards=[{name: brigthness}]"]
    assert cli.main(bad) == 2
    assert list(tmp_path.iterdir()) == []


def test_resuming_another_run_into_a_new_folder_locks_the_new_folder(tmp_path):
    from flowalign.config import load_config
    from flowalign.train.trainer import Trainer

    settings = ["train.iterations=1", "train.progress=false", "train.log_with=[]", "train.eval_every=-1", "train.checkpoint_every=1"]
    assert cli.main(["train", "--config", str(TINY_RECIPE), *sum([["--set", s] for s in settings], []),
                     "--set", f"train.output_dir={tmp_path / 'old'}"]) == 0
    cfg = load_config(TINY_RECIPE, settings + ["train.iterations=2", f"train.output_dir={tmp_path / 'new'}"])
    trainer = Trainer(cfg, resume=str(tmp_path / "old")).setup()
    try:
        assert trainer._lock is not None and not _other_process_can_lock(tmp_path / "new")
    finally:
        trainer.cleanup()
    assert _other_process_can_lock(tmp_path / "new")


def _generate_config(store, prompts):
    from flowalign.config import ModelConfig, RewardConfig
    from flowalign.train.generate import GenerateConfig

    return GenerateConfig(model=ModelConfig(pretrained="tiny-sd3"), rewards=[RewardConfig(name="brightness")], prompts=str(prompts),
                          samples_per_prompt=2, num_steps=2, guidance_scale=1.0, prompts_per_shard=1, output_dir=str(store),
                          image_format="none")


def test_generate_locks_its_store_while_it_fills_and_a_locked_store_refuses_it(other_process_holds, tmp_path):
    """Two generate runs on one store folder listed shards twice in its manifest, and the store stayed unreadable."""
    import torch

    from flowalign.train.generate import run_generate

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    held = []

    def sample(prompts_, seeds):
        held.append(not _other_process_can_lock(store))  # another run cannot start here while this one fills
        return torch.zeros(len(prompts_), 4, 2, 2), None

    def score(images, prompts_, metadata):
        return {"brightness": torch.zeros(len(prompts_))}

    store = tmp_path / "store"
    run_generate(_generate_config(store, prompts), sample_fn=sample, score_fn=score)
    assert held and all(held)
    assert not (store / LOCK_NAME).exists()  # a finished generate lets the folder go
    locked, pid = other_process_holds
    with pytest.raises(ConfigError, match=f"in use by another flowalign run \\(pid {pid}\\)"):
        run_generate(_generate_config(locked, prompts), sample_fn=sample, score_fn=score)
    assert sorted(p.name for p in locked.iterdir()) == [LOCK_NAME]  # nothing written beside the holder's lock


def test_generate_checks_the_rewards_prompts_before_the_model_and_a_shardless_store_takes_new_settings(tmp_path, monkeypatch):
    """generate sampled a shard before the reward refused the prompts, and its store.json then refused the corrected
    reward for good ("written with other settings") although no shard existed."""
    import torch

    from flowalign.config import RewardConfig
    from flowalign.train import generate

    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\n")
    monkeypatch.setattr(generate, "load_model_adapter", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = _generate_config(tmp_path / "store", prompts)
    cfg.rewards = [RewardConfig(name="shapes")]
    with pytest.raises(ConfigError, match="reward 'shapes' cannot score the prompts"):
        generate.run_generate(cfg)
    assert not (tmp_path / "store").exists()  # nothing written, not even the folder

    store = tmp_path / "store2"
    first = _generate_config(store, prompts)

    def sample(prompts_, seeds):
        raise RuntimeError("interrupted before the first shard")

    with pytest.raises(RuntimeError):
        generate.run_generate(first, sample_fn=sample, score_fn=lambda *a: {})
    manifest = store / "manifest.jsonl"
    assert (store / "store.json").is_file() and (not manifest.exists() or not manifest.read_text().strip())
    second = _generate_config(store, prompts)
    second.num_steps = 3  # other settings: accepted while the store holds no shard
    generate.run_generate(second, sample_fn=lambda p, s: (torch.zeros(len(p), 4, 2, 2), None),
                          score_fn=lambda images, p, m: {"brightness": torch.zeros(len(p))})
    assert json.loads((store / "store.json").read_text())["settings"]["sampler"]["num_steps"] == 3
    third = _generate_config(store, prompts)  # now it holds shards: other settings are refused as before
    with pytest.raises(Exception, match="store was written with other settings"):
        generate.run_generate(third, sample_fn=lambda p, s: (torch.zeros(len(p), 4, 2, 2), None),
                              score_fn=lambda images, p, m: {"brightness": torch.zeros(len(p))})
