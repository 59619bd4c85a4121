"""Typed configs: YAML -> dataclasses, overrides, one-line errors, every shipped recipe loads."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from flowalign import config as C
from flowalign.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "train" / "configs"


def _write(tmp_path, data) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_every_field_has_help():
    for cls in (C.ModelConfig, C.SamplingConfig, C.RewardConfig, C.LoraConfig, C.ObjectiveConfig, C.TrainConfig, C.FlowalignConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_yaml_and_overrides_build_typed_config(tmp_path):
    path = _write(tmp_path, {"train": {"lr": 1.0e-3, "iterations": 7}, "rewards": [{"name": "brightness"}, {"name": "color_fraction", "weight": 2}]})
    cfg = C.load_config(path, ["train.lr=2e-4", "rewards.1.weight=0.5", "sampling.noise_kwargs={a: 0.9}", "lora.target_modules=[to_q, to_k]"])
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.iterations == 7
    assert [(r.name, r.weight) for r in cfg.rewards] == [("brightness", 1.0), ("color_fraction", 0.5)]
    assert isinstance(cfg.rewards[1].weight, float)
    assert cfg.sampling.noise_kwargs == {"a": 0.9}
    assert cfg.lora.target_modules == ["to_q", "to_k"]
    assert cfg.model == C.ModelConfig()  # untouched sections keep their defaults


def test_save_and_reload_is_identity(tmp_path):
    cfg = C.load_config(None, ["train.seed=5", "objective.kl_beta=0.0"])
    path = C.save_config(cfg, tmp_path)
    assert path.name == "config.yaml"
    assert C.load_config(path) == cfg
    assert C.config_hash(C.load_config(path)) == C.config_hash(cfg)


def test_config_hash_ignores_run_length_but_not_the_math():
    base = C.load_config(None)
    assert C.config_hash(C.load_config(None, ["train.iterations=999", "train.output_dir=elsewhere"])) == C.config_hash(base)
    assert C.config_hash(C.load_config(None, ["model.t5_cache_size=0"])) == C.config_hash(base)  # a memory knob
    assert C.config_hash(C.load_config(None, ["train.lr=1.0e-5"])) != C.config_hash(base)
    assert C.config_diff(base, C.load_config(None, ["train.lr=1.0e-5"])) == ["train.lr"]


def test_config_diff_hashed_only_names_the_settings_that_change_the_run():
    base = C.load_config(None)
    longer = C.load_config(None, ["train.iterations=999", "train.lr=1.0e-5", "train.log_with=[]"])
    assert C.config_diff(base, longer) == ["train.iterations", "train.log_with", "train.lr"]
    assert C.config_diff(base, longer, hashed_only=True) == ["train.lr"]
    # a decaying schedule's horizon is the run length: there train.iterations changes the run
    decaying = C.load_config(None, ["train.lr_schedule=cosine"])
    assert C.config_diff(decaying, C.load_config(None, ["train.lr_schedule=cosine", "train.iterations=999"]), hashed_only=True) == ["train.iterations"]
    # a key hashed only away from its default (older runs lacked it) counts when it moves
    assert C.config_diff(base, C.load_config(None, ["train.max_sampling_rounds=2"]), hashed_only=True) == ["train.max_sampling_rounds"]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": {"lrr": 1.0}}, "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
        ({"trian": {}}, "unknown config key 'trian'; did you mean 'train'?"),
        ({"train": {"lr": "fast"}}, "train.lr must be a number, got str 'fast'"),
        ({"train": {"lr": -1.0}}, "train.lr must be > 0, got -1.0"),
        ("train: {lr: .inf}\n", "train.lr must be a finite number, got inf"),
        ("train: {oversample: .inf}\n", "train.oversample must be a finite number, got inf"),
        ("dense: {estimator: ode, stride: 2}\n", "dense.stride=2 needs dense.estimator=ode_stride"),
        ("dense: {estimator: tweedie, stride: 3}\n", "dense.stride=3 needs dense.estimator=ode_stride"),
        ("sampling: {guidance_scale: .nan}\n", "sampling.guidance_scale must be a finite number, got nan"),
        ({"sampling": {"group_size": 1}}, "sampling.group_size must be >= 2 for group-normalised advantages, got 1"),
        ({"sampling": {"group_size": 2.5}}, "sampling.group_size must be an integer, got float 2.5"),
        ({"sampling": {"kernel": "sde"}}, "sampling.kernel='sde' is not one of"),
        ({"train": {"ema": "on"}}, "train.ema must be true or false, got 'on'"),
        ({"objective": {"timestep_fraction": 1.5}}, "objective.timestep_fraction must be in (0, 1], got 1.5"),
        ({"rewards": {"name": "x"}}, "rewards must be a list"),
        ({"rewards": [{"name": "a"}, {"name": "a"}]}, "rewards name ['a'] twice"),
        ({"rewards": [{"name": "shapes"}, {"name": "brightness", "label": "shapes"}]}, "rewards name ['shapes'] twice (each entry's label"),
        ({"train": {"report_reward": "shapes"}}, "train.report_reward='shapes' is none of the rewards ['brightness']"),
        ({"train": {"micro_batch_size": 64, "prompts_per_iter": 2}, "sampling": {"group_size": 4}}, "exceeds the samples per iteration (prompts_per_iter 2 x group_size 4 = 8); set train.micro_batch_size=8 too"),
        ({"objective": {"cfg_in_training": False}, "sampling": {"guidance_scale": 4.5}},
         "objective.cfg_in_training=false with sampling.guidance_scale=4.5 > 1: rollouts record the log-probs of the guided transitions"),
        ("train: [1, 2", "is not valid YAML at line"),
        ("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "is not valid YAML at line 3: found duplicate key 'lr'"),
        ("- a\n- b\n", "must hold a mapping of sections, got list"),
    ],
)
def test_bad_configs_raise_one_clear_line(tmp_path, data, message):
    with pytest.raises(ConfigError) as info:
        C.load_config(_write(tmp_path, data))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        C.load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        C.load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="did you mean 'train.iterations'"):
        C.load_config(None, ["train.iteration=3"])
    with pytest.raises(ConfigError, match="not an index of a list of 1"):
        C.load_config(None, ["rewards.4.weight=3"])


# generate / offline recipes have their own schemas and loaders (tests/test_offline_cli.py validates them)
NOT_TRAINING_RECIPES = {"toy_generate.yaml", "toy_gdro.yaml", "toy_awm_offline.yaml"}


@pytest.mark.parametrize("path", sorted(p for p in CONFIG_DIR.glob("*.yaml") if p.name not in NOT_TRAINING_RECIPES), ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path):
    raw = yaml.safe_load(path.read_text())
    cfg = C.load_config(path)
    assert isinstance(cfg, C.FlowalignConfig)
    # every key written in the recipe is a real field (load_config would raise otherwise) and
    # survives the round trip unchanged
    as_dict = C.to_dict(cfg)
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert as_dict[section][key] == value, f"{path.name}: {section}.{key}"


def test_recipes_exist():
    names = {p.name for p in CONFIG_DIR.glob("*.yaml")}
    assert {"toy_grpo.yaml", "sd35m_grpo_geneval.yaml"} <= names


def test_objectives_that_flowalign_train_does_not_run_are_refused_on_load():
    """An offline objective, one with its own loop, or an unknown name fails when the config loads (before
    any model), saying what runs it; the offline trainer's list is exactly the objectives marked offline."""
    from flowalign.objectives import OFFLINE_TRAINER, ONLINE_TRAINER, available_objectives, trained_by
    from flowalign.train.offline_trainer import OFFLINE_OBJECTIVES

    with pytest.raises(ConfigError, match=r"objective 'gdro' is not trained by `flowalign train`: use `flowalign offline` from a rollout store"):
        C.load_config(None, ["objective.name=gdro"])
    with pytest.raises(ConfigError, match=r"use `flowalign\.objectives\.prdp\.run_online_prdp`"):
        C.load_config(None, ["objective.name=prdp"])
    with pytest.raises(ConfigError, match=r"unknown objective 'nope'; available: \['awm', 'dense_grpo', 'grpo', 'nft', 'tp_grpo'\] "
                                          r"\(offline: \['awm', 'diffusion_dpo', 'gdro'\]\)"):
        C.load_config(None, ["objective.name=nope"])
    assert sorted(OFFLINE_OBJECTIVES) == [n for n in available_objectives() if OFFLINE_TRAINER in trained_by(n)]
    assert trained_by("awm") == (ONLINE_TRAINER, OFFLINE_TRAINER) and trained_by("gdro") == (OFFLINE_TRAINER,)
    for name in ("grpo", "dense_grpo", "tp_grpo", "nft", "awm"):
        assert ONLINE_TRAINER in trained_by(name)
        C.load_config(None, [f"objective.name={name}"])


@pytest.mark.parametrize("raw", ["off", "0755", "2024-06-01", "exp #2", "1e-4"])
def test_a_text_field_keeps_the_text_of_its_override(raw):
    """YAML would read these as a bool, an int, a date, "exp" (a comment) or a float: a folder name is text."""
    assert C.load_config(None, [f"train.output_dir={raw}"]).train.output_dir == raw
    assert C.load_config(None, [f"train.output_dir='{raw}'"]).train.output_dir == raw  # quoting still works
    cfg = C.load_config(None, ["train.lr=1e-4", "train.log_with=[tensorboard]", "model.dtype=float32"])  # other types as before
    assert (cfg.train.lr, cfg.train.log_with, cfg.model.dtype) == (1e-4, ["tensorboard"], "float32")


@pytest.mark.parametrize("raw", ["my prompts #2.txt", "@home", "*x", "%tmp", "a: b: c", "off", "1.0"])
def test_a_text_field_typed_optional_keeps_its_text_too(raw):
    """The rule went by the default's type: train.prompts (default null) was parsed as YAML, so "my prompts #2.txt" lost
    its tail, "@home" was invalid YAML, "off" a bool and model.revision=1.0 a float. It now goes by the field's type."""
    cfg = C.load_config(None, [f"train.prompts={raw}", f"train.eval_prompts={raw}", f"model.revision={raw}", f"train.output_dir={raw}"])
    assert cfg.train.prompts == cfg.train.eval_prompts == cfg.model.revision == cfg.train.output_dir == raw
    assert C.load_config(None, ["train.eval_prompts=null"]).train.eval_prompts is None  # null still clears it
    assert C.load_config(None, ["rewards.0.name=shapes"]).rewards[0].name == "shapes"  # list entries are typed too


def test_objective_keys_in_objective_kwargs_and_a_bad_adam_eps_are_config_errors():
    """objective.kwargs.adv_clip reached get_objective twice (TypeError traceback); adam_eps <= 0 failed in AdamW."""
    with pytest.raises(C.ConfigError, match=r"objective.kwargs.adv_clip: a key of objective itself; set objective.adv_clip instead"):
        C.load_config(None, ["objective.kwargs={adv_clip: 1}"])
    with pytest.raises(C.ConfigError, match=r"objective.kwargs.clip_range, kl_beta"):
        C.load_config(None, ["objective.kwargs={kl_beta: 0.1, clip_range: 0.2, num_timesteps: 2}"])
    assert C.load_config(None, ["objective.kwargs={num_timesteps: 2}"]).objective.kwargs == {"num_timesteps": 2}
    for eps in ("0", "-1"):
        with pytest.raises(C.ConfigError, match="train.adam_eps must be > 0"):
            C.load_config(None, [f"train.adam_eps={eps}"])


def test_a_section_with_every_key_commented_out_holds_the_defaults(tmp_path):
    path = _write(tmp_path, "train:\n  # lr: 1.0e-3\nsampling:\n  num_steps: 4\n")
    cfg = C.load_config(path)
    # the defaults, but its own folder (a recipe that sets no output_dir writes to runs/<its name>)
    assert cfg.train == dataclasses.replace(C.TrainConfig(), output_dir=f"runs/{path.stem}") and cfg.sampling.num_steps == 4
    assert C.load_config(path, ["train.lr=2.0e-3"]).train.lr == 2e-3  # --set into it works too


def test_yaml_merge_keys_still_load_and_a_repeated_key_is_still_refused(tmp_path):
    path = _write(tmp_path, "defaults: &d {lr: 1.0e-4, seed: 3}\n")
    path.write_text("train:\n  <<: {lr: 1.0e-4, seed: 3}\n  iterations: 5\n")
    cfg = C.load_config(path)
    assert (cfg.train.lr, cfg.train.seed, cfg.train.iterations) == (1e-4, 3, 5)
    path.write_text("train:\n  <<: {lr: 1.0e-4}\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match="found duplicate key 'seed'"):
        C.load_config(path)


def test_unset_clip_and_kl_keep_each_objectives_own_defaults():
    """objective.clip_range / kl_beta left out of a recipe fall back to the objective's defaults, not GRPO's
    (toy_nft.yaml trained with a 0.04 KL nobody set; AWM clipped at 1e-4 instead of its 1.0)."""
    from flowalign.train.trainer_setup import build_objective

    def built(*overrides):
        cfg = C.load_config(None, list(overrides))
        return build_objective(cfg).objective

    # the default recipe sets both keys; null them to see the objectives' own choices
    unset = ["objective.clip_range=null", "objective.kl_beta=null"]
    awm = built("objective.name=awm", "sampling.kernel=ode", *unset)
    assert awm.clip_range == 1.0 and awm.kl_beta == 0.0
    tp = built("objective.name=tp_grpo", *unset)
    assert tp.clip_range == 1e-5 and tp.kl_beta == 0.0
    nft = built("objective.name=nft", "sampling.kernel=ode", *unset)
    assert nft.kl_beta == 0.0 and not nft.needs_reference
    grpo = built("objective.clip_range=0.2", "objective.kl_beta=0.01")  # set keys still win
    assert grpo.clip_range == 0.2 and grpo.kl_beta == 0.01
    assert C.ObjectiveConfig().clip_range is None and C.ObjectiveConfig().kl_beta is None
    with pytest.raises(C.ConfigError, match="objective.kl_beta must be null or >= 0"):
        C.load_config(None, ["objective.kl_beta=-1"])
    # the shipped NFT recipe names the KL its curves were measured with
    nft_recipe = C.load_config(Path(__file__).resolve().parents[1] / "train" / "configs" / "toy_nft.yaml")
    assert build_objective(nft_recipe).objective.kl_beta == 0.04


@pytest.mark.parametrize("kwargs, match", [
    ("{a: 0.7, size: 2, mode: slidng}", "window mode='slidng'"),
    ("{a: 0.7, size: 20}", "window size 20 exceeds the 10 steps"),
    ("{a: 0.7, start: 9, size: 3}", "window start 9 \\+ size 3 exceeds 10 steps"),
    ("{a: .nan}", "a=nan \\(finite, >= 0\\)"),
])
def test_a_noise_schedule_that_cannot_run_is_a_config_error_at_load(kwargs, match):
    # these crashed with a traceback at the first rollout, after the run folder was written
    with pytest.raises(ConfigError, match=match):
        C.load_config(None, ["sampling.noise_schedule=window", f"sampling.noise_kwargs={kwargs}", "sampling.num_steps=10"])
    with pytest.raises(ConfigError, match="noise level a must be a finite number >= 0"):
        C.load_config(None, ["sampling.noise_schedule=constant", "sampling.noise_kwargs={a: .inf}"])
    assert C.load_config(None, ["sampling.noise_schedule=window", "sampling.noise_kwargs={a: 0.7, start: 7, size: 3}",
                                "sampling.num_steps=10"]).sampling.noise_kwargs["start"] == 7


def test_noise_levels_out_of_the_kernels_range_are_config_errors_at_load():
    """CPS levels above 1 and NaN table entries passed the config and crashed at the first rollout step; generate had
    by then written store.json, so the corrected rerun was refused as another store's settings."""
    from flowalign.train.generate import load_generate_config

    with pytest.raises(ConfigError, match=r"kernel 'cps' takes noise levels in \[0, 1\] .*got up to 2"):
        C.load_config(None, ["sampling.kernel=cps", "sampling.noise_schedule=constant", "sampling.noise_kwargs={a: 2.0}"])
    assert C.load_config(None, ["sampling.kernel=cps", "sampling.noise_schedule=constant", "sampling.noise_kwargs={a: 1.0}"])
    assert C.load_config(None, ["sampling.noise_schedule=constant", "sampling.noise_kwargs={a: 2.0}"])  # flow_sde takes it
    with pytest.raises(ConfigError, match="noise table entries must be finite and >= 0"):
        C.load_config(None, ["sampling.noise_schedule=table", "sampling.noise_kwargs={levels: [0.5, .nan, 0.5]}", "sampling.num_steps=3"])
    with pytest.raises(ConfigError, match=r"kernel 'cps' takes noise_level in \[0, 1\]"):
        load_generate_config("toy_generate", ["kernel=cps", "noise_level=2"])
    with pytest.raises(ConfigError, match="a reward keyed 'total' .* give that entry another label"):
        load_generate_config("toy_generate", ["rewards=[{name: brightness, label: total}]"])


def test_list_entries_are_named_the_way_set_addresses_them_and_missing_lists_start_from_the_default():
    # errors used rewards[0].kwarg, which --set refuses; a list the recipe lacks was built as a dict
    with pytest.raises(ConfigError, match=r"unknown config key 'rewards\.0\.kwarg'; did you mean 'rewards\.0\.kwargs'"):
        C.load_config(None, ["rewards.0.kwarg={score: partial}"])
    with pytest.raises(ConfigError, match=r"address list entries with dots, e\.g\. --set rewards\.0\.weight=2"):
        C.load_config(None, ["rewards[0].weight=2"])
    data = {"train": {"lr": 1e-3}}  # a recipe without adam_betas
    C.apply_overrides(data, ["train.adam_betas.0=0.8"])
    assert data["train"]["adam_betas"] == [0.8, C.TrainConfig().adam_betas[1]] and data["train"]["lr"] == 1e-3


def test_a_generate_or_offline_recipe_given_to_train_names_its_command():
    import dataclasses as dc

    from flowalign.train.generate import GenerateConfig
    from flowalign.train.offline_trainer import OfflineConfig

    root = Path(__file__).resolve().parents[1] / "train" / "configs"
    for name, command in [("toy_gdro.yaml", "flowalign offline"), ("toy_generate.yaml", "flowalign generate")]:
        with pytest.raises(ConfigError, match="recipes: run that command with this file") as info:
            C.load_config(root / name)
        assert command in str(info.value)
    # the hint table names real keys of those commands, none of the training recipe's sections
    top = {f.name for f in dc.fields(C.FlowalignConfig)}
    other = {f.name for f in dc.fields(GenerateConfig)} | {f.name for f in dc.fields(OfflineConfig)}
    assert set(C.OTHER_COMMANDS_KEYS) <= other - top


def test_a_run_folder_whose_name_ends_in_yaml_gets_its_config_inside(tmp_path):
    folder = tmp_path / "exp.yaml"
    folder.mkdir()
    path = C.save_config(C.load_config(None), folder)
    assert path == folder / "config.yaml" and C.load_config(path) == C.load_config(None)
    assert C.save_config(C.load_config(None), tmp_path / "mine.yaml") == tmp_path / "mine.yaml"  # a file path stays a file


def test_a_schedule_without_any_stochastic_step_is_a_config_error():
    """A fixed noise window on CPS's last step (std = 0 there) or a zero level trained nothing, silently, every iteration."""
    cps_last = ["sampling.kernel=cps", "sampling.noise_schedule=window", "sampling.noise_kwargs={a: 0.7, start: 3, size: 1}",
                "sampling.num_steps=4"]
    with pytest.raises(C.ConfigError, match="no stochastic step of the 4 for kernel 'cps' .*CPS's last step"):
        C.load_config(None, cps_last)
    with pytest.raises(C.ConfigError, match="no stochastic step of the 10 for kernel 'flow_sde'"):
        C.load_config(None, ["sampling.noise_kwargs={a: 0.0}"])
    assert C.load_config(None, cps_last[:2] + ["sampling.noise_kwargs={a: 0.7, start: 2, size: 2}", "sampling.num_steps=4"])
    assert C.load_config(None, cps_last[:3] + ["objective.name=nft", "sampling.num_steps=4"])  # forward-process: no log-probs
    # a DenseGRPO noise table file replaces the schedule: its a: 0 is not what samples
    assert C.load_config(None, ["sampling.noise_kwargs={a: 0}", "objective.name=dense_grpo", "dense.noise_table_file=/tmp/x.json",
                                "dense.calibration_rounds=0"])


def test_a_recipe_can_start_from_a_shipped_one_and_change_only_a_few_keys(tmp_path):
    from flowalign.config import read_recipe

    mine = tmp_path / "mine.yaml"
    mine.write_text("base: toy_grpo\ntrain:\n  lr: 1.0e-4\nrewards:\n  - {name: brightness, weight: 1.0}\n")
    cfg = C.load_config(mine)
    toy = C.load_config("toy_grpo")
    assert cfg.model.pretrained == toy.model.pretrained == "toy"  # kept from the base
    assert cfg.train.lr == 1e-4 and cfg.train.iterations == toy.train.iterations  # a section merges key by key
    assert [r.name for r in cfg.rewards] == ["brightness"]  # a list replaces
    # a base next to the recipe, two levels deep, with overrides on top
    (tmp_path / "mid.yaml").write_text("base: mine.yaml\ntrain: {iterations: 3}\n")
    cfg = C.load_config(tmp_path / "mid.yaml", ["train.seed=7"])
    assert (cfg.train.iterations, cfg.train.lr, cfg.train.seed, cfg.model.pretrained) == (3, 1e-4, 7, "toy")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="starts a loop"):
        read_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: toy_grpoo\n")
    with pytest.raises(ConfigError, match="neither a file next to it nor a shipped recipe.*toy_grpo"):
        C.load_config(tmp_path / "c.yaml")


def test_shipped_recipes_are_found_by_name_and_by_their_repository_path_from_any_folder(tmp_path, monkeypatch):
    from flowalign.config import packaged_recipe_dir, resolve_recipe

    monkeypatch.chdir(tmp_path)  # where an installed flowalign's user stands: no train/ here
    assert resolve_recipe("toy_nft") == packaged_recipe_dir() / "toy_nft.yaml"
    assert resolve_recipe("toy_nft.yaml") == packaged_recipe_dir() / "toy_nft.yaml"
    assert resolve_recipe("train/configs/toy_gdro.yaml") == packaged_recipe_dir() / "toy_gdro.yaml"
    assert resolve_recipe("train/accelerate/cpu.yaml") == packaged_recipe_dir().parent / "accelerate" / "cpu.yaml"
    assert C.load_config("train/configs/toy_nft.yaml").objective.name == "nft"
    (tmp_path / "toy_nft.yaml").write_text("train: {lr: 0.25}\nmodel: {pretrained: tiny-sd3}\n")
    assert C.load_config("toy_nft.yaml").train.lr == 0.25  # a file of the user's wins over a shipped name
    with pytest.raises(ConfigError, match="config file not found: nope"):
        C.load_config("nope")


def test_a_recipe_without_a_model_warns_that_the_default_is_a_random_test_model(tmp_path, caplog):
    partial = tmp_path / "partial.yaml"
    partial.write_text("train: {lr: 1.0e-4}\n")
    with caplog.at_level("WARNING"):
        assert C.load_config(partial).model.pretrained == "tiny-sd3"
    assert "sets no model.pretrained" in caplog.text and "base: toy_grpo" in caplog.text
    caplog.clear()
    (tmp_path / "based.yaml").write_text("base: toy_grpo\n")
    with caplog.at_level("WARNING"):
        C.load_config(tmp_path / "based.yaml")
        C.load_config(partial, ["model.pretrained=toy"])
    assert "sets no model.pretrained" not in caplog.text


def test_a_label_lets_one_reward_appear_twice_and_keeps_old_hashes():
    twice = "rewards=[{name: shapes, kwargs: {score: binary}}, {name: shapes, label: shapes_partial, kwargs: {score: partial}}]"
    cfg = C.load_config(None, [twice])
    assert [r.key for r in cfg.rewards] == ["shapes", "shapes_partial"]
    with pytest.raises(ConfigError, match="give one of those entries a label"):
        C.load_config(None, ["rewards=[{name: shapes}, {name: shapes}]"])
    for bad in ("a/b", " x", ""):
        with pytest.raises(ConfigError, match="label"):
            C.load_config(None, [f"rewards=[{{name: shapes, label: {bad!r}}}]"])
    # new keys at their defaults (label, objective.reward_mix) leave the hash that older checkpoints carry: toy_grpo's,
    # computed at commit 445bd1c before either existed
    assert C.config_hash(C.load_config(C.packaged_recipe_dir() / "toy_grpo.yaml")) == "4c69ef0402ca238f"


def test_base_kwargs_mappings_replace_and_empty_sections_keep_the_base(tmp_path):
    (tmp_path / "const.yaml").write_text("base: toy_grpo\nsampling: {noise_schedule: constant, noise_kwargs: {a: 0.5}}\n")
    cfg = C.load_config(tmp_path / "const.yaml")
    assert cfg.sampling.noise_kwargs == {"a": 0.5} and cfg.sampling.group_size == 8  # not the window's start / size
    (tmp_path / "empty.yaml").write_text("base: toy_grpo\nmodel:\n  # nothing changed here\n")
    assert C.load_config(tmp_path / "empty.yaml").model.pretrained == "toy"


@pytest.mark.parametrize("recipe, steps_per_iteration", [("sd35m_grpo_geneval", 2), ("sd35m_dense_grpo_geneval", 1),
                                                         ("sd35m_tp_grpo_geneval", 2), ("sd35m_grpo_ocr", 2)])
def test_the_sd35m_recipes_take_the_papers_optimizer_steps_per_iteration_on_8_processes(recipe, steps_per_iteration):
    """Flow-GRPO's code: 2 optimizer steps per epoch of 1152 samples; DenseGRPO App. A: batch 144 x accumulation 8 = 1152 per step."""
    cfg = C.load_config(recipe)
    samples_per_process = cfg.train.prompts_per_iter // 8 * cfg.sampling.group_size
    stochastic = cfg.sampling.num_steps - (1 if cfg.sampling.kernel == "cps" else 0)  # CPS's last step is deterministic
    trained_steps = int(round(stochastic * cfg.objective.timestep_fraction, 9))  # as Trainer._trained_steps counts them
    micro_batches = samples_per_process // cfg.train.micro_batch_size * trained_steps
    assert samples_per_process % cfg.train.micro_batch_size == 0
    assert micro_batches == steps_per_iteration * cfg.train.grad_accum
    assert cfg.train.ema and cfg.train.ema_every == 8


def test_a_null_kwargs_over_a_base_is_refused_not_silently_inherited(tmp_path):
    (tmp_path / "c.yaml").write_text("base: toy_grpo\nsampling: {noise_schedule: constant, noise_kwargs: null}\n")
    with pytest.raises(ConfigError, match="noise_kwargs"):
        C.load_config(tmp_path / "c.yaml")


def test_settings_nothing_reads_under_the_recipes_other_choices_are_named():
    """Keys that validate and then change nothing (the dense: section under grpo, the EMA's keys without train.ema, the
    drift's without a drift reward, ...) ran silently: a user tuning them saw no difference and no word."""
    from flowalign.config import inert_settings

    assert inert_settings(C.load_config(None, [])) == []
    found = inert_settings(C.load_config(None, ["dense.estimator=tweedie", "dense.credit=min", "train.ema_decay=0.5",
                                                "train.old_policy_max=0.9", "sampling.drift_scale=3"]))
    assert found == [
        "dense.estimator, dense.credit: objective 'grpo' trains on outcome advantages; only per-step objectives (dense_grpo, "
        "tp_grpo, a class with dense_method) read the dense: section",
        "train.ema_decay: train.ema is false, so no EMA is kept",
        "train.old_policy_max: train.old_policy_rate is 0, so the rollouts come from the current policy",
        "sampling.drift_scale: sampling.drift_reward is null, so the rollouts are not guided",
    ]
    assert inert_settings(C.load_config(None, ["objective.name=tp_grpo", "dense.estimator=tweedie", "dense.balance=true"])) == []
    assert inert_settings(C.load_config(None, ["objective.name=dense_grpo", "dense.balance=true"])) == [
        "dense.balance: TP-GRPO's balancing of turning points; dense_grpo does not read it"]
    assert inert_settings(C.load_config(None, ["train.ema=true", "train.ema_decay=0.5"])) == []
    assert inert_settings(C.load_config("toy_nft", ["objective.clip_range=0.5"])) == [
        "objective.clip_range: nft has no ratio to clip (its trust region is objective.kwargs.beta)"]


def test_flowalign_config_warns_of_inert_settings_and_refuses_online_awm_sigma_range(capsys):
    from flowalign.train import cli

    assert cli.main(["config", "--set", "dense.credit=min"]) == 0
    assert "flowalign config: warning: set but without effect: dense.credit: objective 'grpo'" in capsys.readouterr().err
    assert cli.main(["config", "--config", "toy_awm", "--set", "objective.kwargs.sigma_range=[0.5, 0.6]"]) == 2
    assert "objective.kwargs.sigma_range is offline AWM's sigma draw" in capsys.readouterr().err


def test_ema_keys_the_chosen_schedule_does_not_read_are_named():
    from flowalign.config import inert_settings

    assert inert_settings(C.load_config(None, ["train.ema=true", "train.ema_schedule=power", "train.ema_decay=0.5"])) == [
        "train.ema_decay: the power-function EMA (train.ema_schedule: power) sets its own decay from train.ema_power"]
    assert inert_settings(C.load_config(None, ["train.ema=true", "train.ema_schedule=warmup", "train.ema_power=1.0"])) == [
        "train.ema_power: read by train.ema_schedule: power only, not warmup"]
    assert inert_settings(C.load_config(None, ["train.ema=true", "train.ema_schedule=warmup", "train.ema_decay=0.5"])) == []


def test_a_recipe_that_sets_no_output_dir_writes_to_runs_named_after_it(tmp_path):
    """`base: toy_grpo` (and a recipe without base) inherited runs/toy_grpo: following the README's own custom-recipe
    steps ran into the main job's folder, refused there as a different run (or replacing it under --overwrite)."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: toy_grpo\ntrain:\n  lr: 1.0e-3\n")
    assert C.load_config(mine).train.output_dir == "runs/mine"
    assert C.load_config(mine, ["train.output_dir=runs/else"]).train.output_dir == "runs/else"
    whole = tmp_path / "whole.yaml"
    whole.write_text("model:\n  pretrained: tiny-sd3\n")
    assert C.load_config(whole).train.output_dir == "runs/whole"
    own = tmp_path / "own.yaml"
    own.write_text("base: toy_grpo\ntrain:\n  output_dir: runs/somewhere\n")
    assert C.load_config(own).train.output_dir == "runs/somewhere"
    assert C.load_config("toy_grpo").train.output_dir == "runs/toy_grpo" == C.load_config(None).train.output_dir
    child = tmp_path / "child.yaml"  # a base that set it: the file's own name still wins
    child.write_text("base: own.yaml\n")
    assert C.load_config(child).train.output_dir == "runs/child"


# ---------------------------------------------------------------------------------------------
# audit C (session 45): YAML readings, empty prompt paths, bases, resume paths


def test_numbers_and_dates_read_alike_in_typed_keys_and_kwargs_mappings(tmp_path):
    """YAML 1.1 read ``1e-3`` as text in a kwargs mapping (typed floats converted it), ``0123`` as octal 83, ``1:30`` as
    90, and ``2024-06-01`` as a datetime.date that passed every check and crashed the first checkpoint's config hash."""
    cfg = C.load_config(C.packaged_recipe_dir() / "toy_nft.yaml",
                        ["objective.kwargs.beta=1e-3", "sampling.noise_kwargs.a=7e-1", "rewards.0.kwargs.partial_weight=5e-1",
                         "rewards.0.kwargs.version=2024-06-01", "train.seed=0123", "train.iterations=1e3"])
    assert cfg.objective.kwargs["beta"] == 0.001 and cfg.sampling.noise_kwargs["a"] == 0.7
    assert cfg.rewards[0].kwargs == {**cfg.rewards[0].kwargs, "partial_weight": 0.5, "version": "2024-06-01"}
    assert cfg.train.seed == 123 and cfg.train.iterations == 1000 and isinstance(cfg.train.iterations, int)
    assert len(C.config_hash(cfg)) == 16 and "2024-06-01" in C.describe_config(cfg)
    with pytest.raises(ConfigError, match=r"train.iterations must be an integer, got str '1:30'"):
        C.load_config(None, ["train.iterations=1:30"])
    with pytest.raises(ConfigError, match="train.group_size|must be an integer"):
        C.load_config(None, ["train.iterations=2.5"])
    recipe = tmp_path / "dated.yaml"
    recipe.write_text("base: toy_grpo\nrewards:\n  - name: shapes\n    kwargs: {version: 2024-06-01, partial_weight: 5e-1}\n")
    assert C.load_config(recipe).rewards[0].kwargs == {"version": "2024-06-01", "partial_weight": 0.5}


def test_a_set_mapping_with_a_key_twice_is_refused_as_a_recipe_is():
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        C.load_config(None, ["sampling.noise_kwargs={a: 0.5, a: 0.9}"])


@pytest.mark.parametrize("key", ["prompts", "eval_prompts"])
def test_an_empty_prompt_path_is_refused_not_read_as_null(key):
    with pytest.raises(ConfigError, match=f"train.{key} is empty"):
        C.load_config(None, [f"train.{key}="])


def test_a_base_is_found_next_to_its_recipe_never_in_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text("base: parent.yaml\ntrain: {lr: 7.0e-4}\n")
    (tmp_path / "parent.yaml").write_text("base: toy_grpo\ntrain: {lr: 9.0e-4}\n")  # in the current folder only
    (tmp_path / "toy_grpo").write_text("model: {pretrained: tiny-sd3}\n")  # would shadow the shipped recipe
    (tmp_path / "sub" / "shipped.yaml").write_text("base: toy_grpo\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="base 'parent.yaml' is neither a file next to it nor a shipped recipe"):
        C.load_config("sub/mine.yaml")
    assert C.load_config("sub/shipped.yaml").model.pretrained == "toy"  # the shipped toy_grpo, not ./toy_grpo
    (tmp_path / "sub" / "parent.yaml").write_text("base: toy_grpo\ntrain: {lr: 9.0e-4}\n")
    for where in (tmp_path, tmp_path / "sub", Path("/")):  # the same recipe from anywhere
        monkeypatch.chdir(where)
        assert C.load_config(tmp_path / "sub" / "mine.yaml").train.lr == 7.0e-4


def test_a_recipe_with_an_empty_train_section_writes_to_its_own_folder(tmp_path):
    recipe = tmp_path / "emptytrain.yaml"
    recipe.write_text("model: {pretrained: tiny-sd3}\ntrain:\n  # nothing yet\n")
    assert C.load_config(recipe).train.output_dir == "runs/emptytrain"


def test_a_folder_given_as_a_recipe_is_named_as_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a recipe file"):
        C.load_config(tmp_path)


def test_a_saved_config_reads_back_whatever_its_text_keys_hold(tmp_path):
    """config.yaml was written by yaml.safe_dump (YAML 1.1), which leaves 1e-4 unquoted; read as YAML 1.2 it came back a
    number, so `--set train.output_dir=1e-4` trained and its --resume was refused. Digit groups (1_000) still read."""
    cfg = C.load_config(None, ["train.output_dir=1e-4", "model.revision=8e10", "objective.kwargs={tag: '0123', n: 1_000}",
                               "train.iterations=1_000"])
    assert cfg.train.output_dir == "1e-4" and cfg.model.revision == "8e10" and cfg.train.iterations == 1000
    assert cfg.objective.kwargs == {"tag": "0123", "n": 1000}
    path = C.save_config(cfg, tmp_path / "config.yaml")
    assert C.load_config(path) == cfg
    assert C.load_yaml(C.dump_yaml({"a": "2024-06-01", "b": "yes", "c": 1e-5, "d": "1:30"})) == {"a": "2024-06-01", "b": "yes", "c": 1e-5, "d": "1:30"}
