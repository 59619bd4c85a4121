"""`flowalign offline` on the tiny pipeline (generate a store, train 2 steps, LoRA written; refuse,
resume, overwrite; bad input -> one line, exit 2, nothing written), the offline recipes, the
schema-aware `--set` defaults and the public config builder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowalign.train import cli

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "train" / "configs"


def _one_error_line(capsys, command: str = "offline") -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flowalign {command}: error:") and "\n" not in err, err
    return err


# ---------------------------------------------------------------------------------------------
# config plumbing


def test_set_on_a_missing_section_starts_from_that_configs_defaults(tmp_path):
    from flowalign.config import load_config
    from flowalign.train.generate import load_generate_config
    from flowalign.train.offline_trainer import load_offline_config

    gen = tmp_path / "gen.yaml"
    gen.write_text("samples_per_prompt: 4\n")  # no rewards: section
    cfg = load_generate_config(gen, ["rewards.0.weight=2"])
    # GenerateConfig's default reward list (shapes), not the training recipe's (brightness)
    assert [(r.name, r.weight) for r in cfg.rewards] == [("shapes", 2.0)]
    assert cfg.samples_per_prompt == 4
    off = tmp_path / "off.yaml"
    off.write_text("k: 2\n")
    lora = load_offline_config(off, ["lora.rank=2"]).lora
    assert (lora.rank, lora.alpha) == (2, 16.0)  # OfflineConfig's LoRA default alpha (the training default is 64)
    # the training recipe keeps its own defaults
    assert [(r.name, r.weight) for r in load_config(None, ["rewards.0.weight=3"]).rewards] == [("brightness", 3.0)]


def test_build_dataclass_is_public_and_the_old_name_still_works():
    from flowalign.config import ConfigError, _build, build_dataclass
    from flowalign.train.generate import GenerateConfig

    assert _build is build_dataclass
    cfg = build_dataclass(GenerateConfig, {"model": {"pretrained": "tiny-sd3"}, "noise_level": 1})
    assert cfg.model.pretrained == "tiny-sd3" and isinstance(cfg.noise_level, float)
    with pytest.raises(ConfigError, match="did you mean 'samples_per_prompt'"):
        build_dataclass(GenerateConfig, {"samples_per_promt": 3})
    with pytest.raises(ConfigError, match="must be a mapping"):
        build_dataclass(GenerateConfig, ["not", "a", "mapping"])


def test_rollout_store_error_lives_in_errors():
    from flowalign import errors, offline

    assert offline.RolloutStoreError is errors.RolloutStoreError
    assert issubclass(errors.RolloutStoreError, errors.FlowalignError) and issubclass(errors.RolloutStoreError, RuntimeError)
    assert errors.RolloutStoreError("bad", shard="shard-00001.safetensors").shard == "shard-00001.safetensors"


def test_offline_recipes_load_and_fit_together():
    from flowalign.objectives import get_objective
    from flowalign.train.generate import load_generate_config
    from flowalign.train.offline_trainer import load_offline_config

    gen = load_generate_config(CONFIGS / "toy_generate.yaml")
    off = load_offline_config(CONFIGS / "toy_gdro.yaml")
    assert gen.model.pretrained == off.model.pretrained == "toy"
    assert [r.name for r in gen.rewards] == ["shapes"] and gen.prompts.endswith("shapes_train.jsonl")
    assert gen.kernel in ("ode", "flow_sde") and gen.samples_per_prompt >= off.k
    assert off.store == gen.output_dir  # the GDRO recipe reads what the generate recipe writes
    assert off.objective == "gdro" and off.k == 6
    kw = off.objective_kwargs
    assert (kw["tau"], kw["beta"], kw["gamma"]) == (0.05, 6.0, 1.0)
    assert off.reward in ("shapes", "shapes/partial")
    objective = get_objective("gdro", **kw)  # every key is an argument of GDRO
    assert (objective.tau, objective.beta, objective.gamma) == (0.05, 6.0, 1.0)
    awm = load_offline_config(CONFIGS / "toy_awm_offline.yaml")
    assert awm.store == gen.output_dir and awm.objective == "awm" and awm.k <= gen.samples_per_prompt
    objective = get_objective("awm", **awm.objective_kwargs)  # every key is an argument of AWM
    assert objective.sigma_range == (0.8, 1.0) and objective.weighting == "ghuber" and objective.clip_range == 0.2


# ---------------------------------------------------------------------------------------------
# the command on the tiny pipeline


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from tests.tiny_run import generate_tiny_store

    return generate_tiny_store(tmp_path_factory.mktemp("offline_cli"))


def _offline_yaml(tmp_path, store, run) -> Path:
    path = tmp_path / "off.yaml"
    path.write_text(f"model: {{pretrained: tiny-sd3}}\nlora: {{rank: 4, alpha: 4.0}}\nstore: {store}\nk: 3\n"
                    f"groups_per_batch: 1\nlr: 1.0e-3\noutput_dir: {run}\n")
    return path


def test_offline_refuses_a_tracker_that_is_not_installed_before_writing(tiny_store, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    run = tmp_path / "run"
    assert cli.main(["offline", "--config", str(_offline_yaml(tmp_path, tiny_store, run)), "--set", "log_with=[wandb]"]) == 2
    assert "log_with names 'wandb', but the wandb package is not installed here" in _one_error_line(capsys)
    assert not run.exists()


def test_an_offline_run_whose_every_step_was_skipped_fails(tiny_store, tmp_path, capsys, monkeypatch):
    """Every loss NaN, fewer in a row than max_nonfinite_steps: it said 'done' and wrote an untrained LoRA."""
    from flowalign.objectives.gdro import GDRO

    real = GDRO.loss
    monkeypatch.setattr(GDRO, "loss", lambda self, *a: (lambda loss, m: (loss * float("nan"), m))(*real(self, *a)))
    run = tmp_path / "run"
    assert cli.main(["offline", "--config", str(_offline_yaml(tmp_path, tiny_store, run)), "--set", "max_nonfinite_steps=10",
                     "--set", "progress=false"]) == 1
    assert "nothing trained: in all 2 steps every optimizer step was skipped, as non-finite or with an all-zero gradient" in _one_error_line(capsys)
    assert not (run / "pytorch_lora_weights.safetensors").exists()


def test_a_store_without_a_complete_group_is_named_as_such(tiny_store, tmp_path, capsys):
    """Every group holding a dropped reward was reported as 'lr_warmup=0 must be below the run's 0 steps'."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    lines = [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines()]
    for entry in lines:  # one sample of each prompt dropped (stored as null), as on_error: drop writes it
        entry["samples"][0]["rewards"]["brightness"] = None
    (store / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    run = tmp_path / "run"
    assert cli.main(["offline", "--config", str(_offline_yaml(tmp_path, store, run))]) == 2
    assert "holds no group of k=3 samples of one prompt whose 'brightness' rewards are all finite" in _one_error_line(capsys)


def test_offline_trains_then_refuses_resumes_and_overwrites(tiny_store, tmp_path, capsys):
    run = tmp_path / "run"
    config = _offline_yaml(tmp_path, tiny_store, run)
    assert cli.main(["offline", "--config", str(config)]) == 0  # 2 prompt groups / 1 per step = 2 steps
    captured = capsys.readouterr()
    assert "done: 2 steps, 12 NFE" in captured.out  # per step: policy + reference on k = 3 rows
    assert "offline gdro" in captured.err and "2/2" in captured.err  # the progress bar counts optimizer steps
    assert (run / "training_curve.png").is_file() and any((run / "logs").glob("events.out.tfevents.*"))
    lora_file = run / "pytorch_lora_weights.safetensors"
    weights = load_file(str(lora_file))
    assert weights and all("lora" in k for k in weights)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())  # trained away from B = 0
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
    assert (run / "checkpoints" / "iter_000002").is_dir()  # the end of a run is a checkpoint, with the run's LoRA file
    exported = load_file(str(run / "checkpoints" / "iter_000002" / "pytorch_lora_weights.safetensors"))
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)
    stamp = lora_file.stat().st_mtime_ns

    assert cli.main(["offline", "--config", str(config)]) == 2
    assert "already holds an offline run; pass --resume" in _one_error_line(capsys)
    assert lora_file.stat().st_mtime_ns == stamp

    # a resume under other settings would continue the LoRA and AdamW state of one objective under another: refused
    before = (run / "offline_config.yaml").read_text()
    assert cli.main(["offline", "--config", str(config), "--resume", "--set", "objective=diffusion_dpo", "--set", "seed=7"]) == 2
    assert "(changed: objective, seed); resume with the run's settings" in _one_error_line(capsys)
    assert (run / "offline_config.yaml").read_text() == before and lora_file.stat().st_mtime_ns == stamp

    assert cli.main(["offline", "--config", str(config), "--resume", "--set", "epochs=2"]) == 0  # a longer run is the same run
    captured = capsys.readouterr()
    assert "done: 4 steps, 24 NFE" in captured.out
    assert "2/4" in captured.err and "4/4" in captured.err  # the bar starts at the resumed step
    assert len((run / "metrics.csv").read_text().splitlines()) == 5

    # a checkpoint past the run's end trains nothing: refused (it printed "done: 4 steps" and rewrote the config)
    before, stamp = (run / "offline_config.yaml").read_text(), lora_file.stat().st_mtime_ns
    assert cli.main(["offline", "--config", str(config), "--resume", "--set", "epochs=2", "--set", "max_steps=3"]) == 2
    assert ("is at step 4, past the run's 3 steps (epochs x batches, capped by max_steps); raise epochs or max_steps so the "
            "run has 4 steps or more") in _one_error_line(capsys)
    assert (run / "offline_config.yaml").read_text() == before and lora_file.stat().st_mtime_ns == stamp

    assert cli.main(["offline", "--config", str(config), "--overwrite", "--set", "max_steps=1"]) == 0
    assert "done: 1 steps" in capsys.readouterr().out
    assert len((run / "metrics.csv").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "groups_per_batch=0"], "groups_per_batch must be >= 1, got 0"),
        (["--set", "k=5"], "k=5 but store"),
        (["--set", "reward=aesthetic"], "reward='aesthetic' is not in store"),
        (["--set", "objetive=gdro"], "did you mean 'objective'"),
        (["--set", "objective_kwargs.tau=-1"], "tau must be > 0"),
        (["--resume"], "no valid checkpoint under"),
        (["--resume", "--overwrite"], "--resume continues the run in the output folder and --overwrite replaces it"),
        (["--set", "device=cpux"], "device='cpux' is not a torch device"),
        (["--set", "device=cuda:7"], "device='cuda:7': torch sees"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_store, tmp_path, capsys, extra, message):
    run = tmp_path / "run"
    assert cli.main(["offline", "--config", str(_offline_yaml(tmp_path, tiny_store, run)), *extra]) == 2
    assert message in _one_error_line(capsys)
    assert not run.exists()


def test_missing_store_and_config_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["offline", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("k: [unclosed\n")
    assert cli.main(["offline", "--config", str(bad)]) == 2
    assert "not valid YAML at line" in _one_error_line(capsys)
    assert cli.main(["offline", "--set", f"store={tmp_path / 'nostore'}", "--set", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "not a rollout store" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()
    # objective arguments are checked when the recipe loads, before the store is opened
    assert cli.main(["offline", "--config", str(CONFIGS / "toy_awm_offline.yaml"), "--set", f"store={tmp_path / 'nostore'}",
                     "--set", "objective_kwargs.sigma_range=[0.9, 0.5]", "--set", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "for objective 'awm'" in (line := _one_error_line(capsys)) and "sigma_range must be (low, high)" in line
    assert cli.main(["offline", "--config", str(CONFIGS / "toy_awm_offline.yaml"), "--set", f"store={tmp_path / 'nostore'}",
                     "--set", "objective_kwargs.tau=0.1"]) == 2
    assert "for objective 'awm'" in (line := _one_error_line(capsys)) and "'tau'" in line  # GDRO's key, not AWM's
    assert cli.main(["offline", "--config", str(CONFIGS / "toy_awm_offline.yaml"), "--set", f"store={tmp_path / 'nostore'}",
                     "--set", "objective_kwargs.ema_beta=0.1"]) == 2
    assert "ema_beta needs the EMA of the online trainer" in _one_error_line(capsys)
    # online AWM's sigma draws would be accepted and ignored offline
    assert cli.main(["offline", "--config", str(CONFIGS / "toy_awm_offline.yaml"), "--set", f"store={tmp_path / 'nostore'}",
                     "--set", "objective_kwargs.num_timesteps=8"]) == 2
    assert "objective_kwargs.num_timesteps: online AWM's sigma draws" in _one_error_line(capsys)
    for objective in ("gdro", "diffusion_dpo"):  # checked when built (it failed at the first step, after the run folder)
        assert cli.main(["offline", "--set", f"objective={objective}", "--set", f"store={tmp_path / 'nostore'}",
                         "--set", "objective_kwargs.sigma_range=[0.9, 0.5]", "--set", f"output_dir={tmp_path / 'run'}"]) == 2
        assert f"for objective '{objective}'" in (line := _one_error_line(capsys)) and "sigma_range must be (low, high)" in line
    assert not (tmp_path / "run").exists()
    from flowalign.train import offline_trainer

    assert offline_trainer.main(["--config", str(tmp_path / "none.yaml")]) == 2  # python -m flowalign.train.offline_trainer
    assert "does not exist" in _one_error_line(capsys)


def test_store_from_another_model_is_refused(tiny_store, tmp_path, capsys):
    from flowalign.train.offline_trainer import OfflineTrainer, load_offline_config

    cfg = load_offline_config(_offline_yaml(tmp_path, tiny_store, tmp_path / "run"))

    class OtherShape:  # an adapter whose latents are not the store's
        def initial_noise(self, batch, generator=None):
            return torch.zeros(batch, 4, 8, 8)

    from flowalign.errors import ConfigError

    with pytest.raises(ConfigError, match=r"holds latents \(4, 16, 16\) but the model makes \(4, 8, 8\)"):
        OfflineTrainer(cfg, adapter=OtherShape()).setup()
    assert not (tmp_path / "run").exists()


def test_generate_rerun_with_another_t5_cache_size_is_the_same_store(tiny_store, capsys):
    """model.t5_cache_size changes no sample: a finished store reruns under another value instead of refusing."""
    gen = tiny_store.parent / "gen.yaml"
    assert cli.main(["generate", "--config", str(gen), "--set", "model.t5_cache_size=0"]) == 0, capsys.readouterr().err


def test_the_same_files_named_otherwise_finish_a_store_and_resume_a_run(tiny_store, tmp_path, monkeypatch, capsys):
    """An interrupted `generate` finished with `./p.jsonl` instead of the absolute path was refused ("differs in
    ['prompts_file']; use a new folder"), and `offline --resume` after the store moved was refused ("changed: store"):
    the prompts' digest, the weights' fingerprint and the store's fingerprint already pin what they name."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    lines = (store / "manifest.jsonl").read_text().splitlines(keepends=True)
    (store / "manifest.jsonl").write_text(lines[0])  # interrupted after its first shard
    monkeypatch.chdir(tiny_store.parent)
    assert cli.main(["generate", "--config", "gen.yaml", "--set", "prompts=./p.jsonl", "--set", f"output_dir={store}",
                     "--set", "progress=false"]) == 0, capsys.readouterr().err
    assert (store / "manifest.jsonl").read_text().splitlines(keepends=True) == lines  # the same samples, finished
    assert json.loads((store / "store.json").read_text())["settings"]["prompts_file"] == str(tiny_store.parent / "p.jsonl")
    # other prompts are still another store
    (tmp_path / "q.jsonl").write_text('{"prompt": "a red circle", "tag": "single"}\n')
    (store / "manifest.jsonl").write_text(lines[0])
    assert cli.main(["generate", "--config", "gen.yaml", "--set", f"prompts={tmp_path / 'q.jsonl'}", "--set", f"output_dir={store}"]) == 2
    assert "differs in ['num_prompts', 'prompts_file', 'prompts_sha256']" in _one_error_line(capsys, "generate")
    (store / "manifest.jsonl").write_text("".join(lines))

    run = tmp_path / "run"
    assert cli.main(["offline", "--config", str(_offline_yaml(tmp_path, store, run)), "--set", "max_steps=1", "--set", "progress=false"]) == 0
    moved = tmp_path / "moved"
    store.rename(moved)
    assert cli.main(["offline", "--resume", str(run), "--set", f"store={moved}", "--set", "max_steps=2", "--set", "progress=false"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    # another content under the new path is refused by the store's fingerprint
    shutil.copytree(moved, tmp_path / "other")
    meta = json.loads((tmp_path / "other" / "store.json").read_text())
    meta["settings"]["base_seed"] = 5
    (tmp_path / "other" / "store.json").write_text(json.dumps(meta))
    assert cli.main(["offline", "--resume", str(run), "--set", f"store={tmp_path / 'other'}", "--set", "max_steps=3"]) == 2
    assert "was trained on another content of store" in _one_error_line(capsys)


def test_generate_scores_in_reward_batches_into_the_same_store(tiny_store, tmp_path, capsys):
    """rewards[].batch_size chunks the scoring calls; the stored rewards are the whole batch's, and a finished store
    reruns under another batch size (the chunking is not a setting of the store)."""
    import shutil

    store = tmp_path / "store"
    gen = tmp_path / "gen.yaml"
    gen.write_text((tiny_store.parent / "gen.yaml").read_text().replace(str(tiny_store), str(store)))
    assert cli.main(["generate", "--config", str(gen), "--set", "rewards.0.batch_size=2"]) == 0, capsys.readouterr().err
    ours = [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (tiny_store / "manifest.jsonl").read_text().splitlines()]
    assert [[s["rewards"] for s in e["samples"]] for e in ours] == [[s["rewards"] for s in e["samples"]] for e in theirs]
    assert cli.main(["generate", "--config", str(gen)]) == 0, capsys.readouterr().err
    shutil.rmtree(store)


@pytest.mark.parametrize("kind, recipe", [("offline", "toy_gdro.yaml"), ("offline", "toy_awm_offline.yaml"), ("generate", "toy_generate.yaml")])
def test_config_prints_offline_and_generate_recipes_that_read_back(kind, recipe, tmp_path, capsys):
    import dataclasses

    from flowalign.config import to_dict
    from flowalign.train.generate import load_generate_config
    from flowalign.train.offline_trainer import load_offline_config

    load = load_offline_config if kind == "offline" else load_generate_config
    assert cli.main(["config", "--for", kind, "--config", str(CONFIGS / recipe), "--set", "seed=5"]) == 0
    text = capsys.readouterr().out
    expected = load(CONFIGS / recipe, ["seed=5"])
    assert all(f.metadata["help"] in text for f in dataclasses.fields(expected))
    (tmp_path / "printed.yaml").write_text(text)
    assert to_dict(load(tmp_path / "printed.yaml")) == to_dict(expected)


def test_offline_overwrite_refuses_a_folder_with_files_an_offline_run_does_not_write(tmp_path):
    """Any folder holding an offline_config.yaml (even an empty one) was cleared whole by --overwrite."""
    from flowalign.errors import ConfigError
    from flowalign.train.offline_trainer import prepare_offline_dir
    from flowalign.train.run_dir import OFFLINE_RUN_ENTRIES, clear_run_dir

    folder = tmp_path / "off"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "a.py").write_text("x = 1\n")
    (folder / "offline_config.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"holds files a run does not write \(src\)"):
        prepare_offline_dir(folder, resume=False, overwrite=True)
    (folder / "src" / "a.py").unlink()
    (folder / "src").rmdir()
    (folder / "metrics.csv").write_text("step\n1\n")
    (folder / ".metrics.csv.tmp").write_text("torn")
    assert prepare_offline_dir(folder, resume=False, overwrite=True) is True
    clear_run_dir(folder, OFFLINE_RUN_ENTRIES)
    assert folder.is_dir() and not any(folder.iterdir())


def test_offline_resume_dir_reads_the_runs_config_and_a_checkpoint_folder_resumes_from_it(tiny_store, tmp_path, capsys):
    """`offline --resume` took no folder: the stop line had to spell `--config RUN/offline_config.yaml --resume`."""
    run = tmp_path / "run"
    assert cli.main(["offline", "--config", str(_offline_yaml(tmp_path, tiny_store, run)), "--set", "progress=false"]) == 0
    capsys.readouterr()
    (tmp_path / "off.yaml").unlink()  # the recipe is gone: the run folder's own offline_config.yaml is the one read
    assert cli.main(["offline", "--resume", str(run), "--set", "epochs=2"]) == 0
    assert "done: 4 steps" in capsys.readouterr().out
    assert len((run / "metrics.csv").read_text().splitlines()) == 5
    after_four = load_file(str(run / "pytorch_lora_weights.safetensors"))

    # a checkpoint folder: continue from that checkpoint (step 2), not from the newest (step 4)
    assert cli.main(["offline", "--resume", str(run / "checkpoints" / "iter_000002"), "--set", "epochs=2"]) == 0
    assert "done: 4 steps" in capsys.readouterr().out
    again = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert again.keys() == after_four.keys() and all(torch.equal(again[k], after_four[k]) for k in again)  # steps 3-4 replayed exactly

    assert cli.main(["offline", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "--resume " + str(tmp_path / "nowhere") + ": no such run folder or checkpoint folder" in _one_error_line(capsys)
    stray = tmp_path / "stray"
    stray.mkdir()
    assert cli.main(["offline", "--resume", str(stray)]) == 2
    assert "holds no offline_config.yaml, so it is not a flowalign offline run" in _one_error_line(capsys)


def test_resume_names_the_command_of_a_run_of_the_other_kind(tiny_store, tmp_path, capsys):
    """`offline --resume` on a train run blamed the config hash; `train --resume` on an offline run read the default recipe."""
    offline_run = tmp_path / "offline_run"
    assert cli.main(["offline", "--config", str(_offline_yaml(tmp_path, tiny_store, offline_run)), "--set", "max_steps=1"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(offline_run)]) == 2
    assert f"holds a `flowalign offline` run, not a train run: continue it with `flowalign offline --resume {offline_run}`" \
        in _one_error_line(capsys, "train")

    train_run = tmp_path / "train_run"
    train_run.mkdir()
    assert cli.main(["config", "--set", "model.pretrained=tiny-sd3"]) == 0
    (train_run / "config.yaml").write_text(capsys.readouterr().out, encoding="utf-8")
    (train_run / "checkpoints").mkdir()
    for argv in (["offline", "--resume", str(train_run)],  # DIR: its offline_config.yaml would be read
                 ["offline", "--config", str(tmp_path / "off.yaml"), "--resume", "--set", f"output_dir={train_run}"]):
        assert cli.main(argv) == 2
        assert f"holds a `flowalign train` run, not an offline one: continue it with `flowalign train --resume {train_run}`" \
            in _one_error_line(capsys)


def test_steps_whose_groups_all_tie_are_counted_and_named(tiny_store, tmp_path, capsys, caplog):
    """A batch of tied groups gives GDRO no ranking, so its step is not applied: the run said 'done: 2 steps' as if both
    had trained, without a word."""
    import logging
    import shutil

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    lines = [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines()]
    lines[0]["samples"] = [{**s, "rewards": {**s["rewards"], "brightness": 0.5}} for s in lines[0]["samples"]]  # group 0 tied
    (store / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="flowalign.train.offline_trainer"):
        assert cli.main(["offline", "--config", str(_offline_yaml(tmp_path, store, run)), "--set", "progress=false"]) == 0
    assert "done: 2 steps (1 without signal, not applied)" in capsys.readouterr().out
    assert "1 of the 2 steps run had an all-zero gradient and were not applied: 1 with every group of the batch tied on " \
           "'brightness'" in caplog.text and ", 0 with a loss saturated" in caplog.text
    import csv

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert sorted(float(r["optim/skipped_zero"]) for r in rows) == [0.0, 1.0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flowalign.train.offline_trainer"):  # AWM reports no tie count
        assert cli.main(["offline", "--config", str(_offline_yaml(tmp_path, store, tmp_path / "awm")), "--set", "objective=awm",
                         "--set", "progress=false"]) == 0
    assert "0 with every group of the batch tied" in caplog.text and "1 of an objective that reports neither" in caplog.text
    assert sorted(float(r["optim/steps"]) for r in rows) == [0.0, 1.0]


def test_a_partial_model_or_lora_section_keeps_the_commands_own_defaults(tmp_path):
    """An offline / generate recipe writing part of `model:` or `lora:` got ModelConfig's and LoraConfig's own defaults
    (tiny-sd3, a random test model; rank 32) instead of the command's documented ones (toy; rank 8, alpha 16)."""
    from flowalign.config import build_dataclass
    from flowalign.train.generate import GenerateConfig, load_generate_config
    from flowalign.train.offline_trainer import load_offline_config

    recipe = tmp_path / "partial.yaml"
    recipe.write_text("model:\n  dtype: bfloat16\nlora:\n  dropout: 0.1\n")
    offline = load_offline_config(recipe)
    assert (offline.model.pretrained, offline.model.dtype) == ("toy", "bfloat16")
    assert (offline.lora.rank, offline.lora.alpha, offline.lora.dropout) == (8, 16.0, 0.1)
    recipe.write_text("model:\n  dtype: bfloat16\n")
    generate = load_generate_config(recipe)
    assert (generate.model.pretrained, generate.model.dtype) == (GenerateConfig().model.pretrained, "bfloat16") == ("toy", "bfloat16")
    # the training recipe's sections are their classes' own defaults: unchanged
    from flowalign.config import FlowalignConfig, ModelConfig

    assert build_dataclass(FlowalignConfig, {"model": {"dtype": "bfloat16"}}).model == ModelConfig(dtype="bfloat16")


def test_a_resumed_dpo_run_keeps_the_beta_it_began_with(tiny_store, tmp_path, caplog):
    """Diffusion-DPO's default beta moved from 6 to 2500; the hash covers objective_kwargs as written, so a run begun
    before (no beta in its recipe) resumed at 400 times its preference scale without a word."""
    import logging
    from types import SimpleNamespace

    from flowalign.objectives.diffusion_dpo import DiffusionDPO
    from flowalign.train.offline_trainer import OfflineTrainer

    run = tmp_path / "run"
    assert cli.main(["offline", "--config", str(_offline_yaml(tmp_path, tiny_store, run)), "--set", "objective=diffusion_dpo",
                     "--set", "max_steps=1", "--set", "progress=false"]) == 0
    state = json.loads((run / "checkpoints" / "iter_000001" / "state.json").read_text())
    assert state["objective_beta"] == 2500.0  # recorded from now on

    def resumed(state, kwargs=None):
        fake = SimpleNamespace(config=SimpleNamespace(objective_kwargs=kwargs or {}, objective="diffusion_dpo"), objective=DiffusionDPO())
        OfflineTrainer._keep_the_runs_beta(fake, state, run / "checkpoints" / "iter_000001")
        return fake.objective.beta

    with caplog.at_level(logging.WARNING, logger="flowalign.train.offline_trainer"):
        assert resumed({}) == 6.0  # a checkpoint from before: the old default
    assert "began with diffusion_dpo's default beta 6, which is now 2500: it continues with 6" in caplog.text
    assert resumed({"objective_beta": 2500.0}) == 2500.0
    assert resumed({}, {"beta": 100.0}) == 2500.0  # a beta the recipe sets is the hash's to check (the fake builds the default)


def test_runs_and_stores_from_before_model_adapter_still_resume(tiny_store, tmp_path, capsys):
    """Offline runs and rollout stores written before model.adapter / adapter_kwargs existed: `offline --resume` blamed
    the user's settings (the hash now covered the two keys at their defaults) and `generate` called the store another
    model's."""
    import shutil

    from flowalign import checkpoint as ckpt
    from flowalign.train.offline_trainer import load_offline_config, offline_config_hash

    run = tmp_path / "run"
    assert cli.main(["offline", "--config", str(_offline_yaml(tmp_path, tiny_store, run)), "--set", "max_steps=1",
                     "--set", "progress=false"]) == 0
    capsys.readouterr()
    # what the older version wrote: the manifest's hash without the two keys (re-signed, as that version signed it)
    config = load_offline_config(run / "offline_config.yaml")
    legacy = offline_config_hash(config, legacy=True)
    assert legacy != offline_config_hash(config)
    manifest_path = run / "checkpoints" / "iter_000001" / ckpt.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["config_hash"] = legacy
    manifest_path.write_text(json.dumps(manifest))
    assert cli.main(["offline", "--resume", str(run), "--set", "max_steps=2", "--set", "progress=false"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    meta = json.loads((store / "store.json").read_text())
    for key in ("adapter", "adapter_kwargs"):
        meta["settings"]["model"].pop(key)
    (store / "store.json").write_text(json.dumps(meta))
    gen = tmp_path / "gen.yaml"
    gen.write_text((tiny_store.parent / "gen.yaml").read_text().replace(str(tiny_store), str(store)))
    assert cli.main(["generate", "--config", str(gen)]) == 0, capsys.readouterr().err
