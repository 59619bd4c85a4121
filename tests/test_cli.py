"""The `flowalign` command: exit codes, one-line errors, nothing written on error, resume/overwrite."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowalign.errors import ConfigError
from flowalign.train import cli

TINY_RECIPE = Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_grpo.yaml"  # fast recipe (the default is the toy main job)
TINY = ["sampling.num_steps=2", "sampling.guidance_scale=1.0", "sampling.group_size=2", "train.prompts_per_iter=2",
        "train.micro_batch_size=4", "train.grad_accum=2", "train.eval_every=-1", "train.log_with=[]", "train.progress=false",
        "train.checkpoint_every=1", "lora.rank=2", "lora.alpha=2"]


def _sets(run: Path, *extra: str) -> list[str]:
    args = ["--config", str(TINY_RECIPE)]
    for item in TINY + [f"train.output_dir={run}", *extra]:
        args += ["--set", item]
    return args


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("flowalign train: error: ")
    return err


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "train" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "train.lrr=1"], "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
        (["--set", "train.lr=-1"], "train.lr must be > 0, got -1.0"),
        (["--set", "sampling.kernel=ode"], "sampling.kernel='ode' draws no noise"),
        (["--config", "nope/missing.yaml"], "config file not found: nope/missing.yaml"),
        (["--set", "rewards=[{name: no_such_reward}]"], "no_such_reward"),
        (["--set", "objective.name=no_such_objective"], "unknown objective 'no_such_objective'"),
        (["--set", "train.prompts=missing_prompts.txt"], "missing_prompts.txt"),
        (["--resume", "--overwrite"], "--resume continues the run in the output folder and --overwrite replaces it: pass one"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    run = tmp_path / "run"
    status = cli.main(["train", *_sets(run), *args])
    assert status == 2
    assert message in _one_error_line(capsys)
    assert not run.exists()


def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_built(tmp_path, capsys, monkeypatch):
    """``train.log_with: [wandb]`` without wandb failed with a raw ModuleNotFoundError after the model was built, and
    left config.yaml behind, so the next start asked for --resume."""
    import importlib.util

    from flowalign.train import trainer_setup

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.setattr(trainer_setup, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    run = tmp_path / "run"
    assert cli.main(["train", *_sets(run), "--set", "train.log_with=[tensorboard, wandb]"]) == 2
    assert ("train.log_with names 'wandb', but the wandb package is not installed here (pip install 'flowalign-rl[wandb]')"
            in _one_error_line(capsys))
    assert not run.exists()


def test_resume_refuses_a_prompt_file_edited_since_the_checkpoint(tmp_path, capsys):
    """Only the prompt file's path is in the config hash: shuffling its lines (same count) between stop and --resume
    used to resume silently on other prompts."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\ntwo green triangles\n")
    run = tmp_path / "run"
    assert cli.main(["train", *_sets(run, "train.iterations=1", f"train.prompts={prompts}")]) == 0
    capsys.readouterr()
    prompts.write_text("two green triangles\na blue square\na red circle\n")
    assert cli.main(["train", "--resume", str(run), "--set", "train.iterations=2"]) != 0
    assert "prompts differ from those this run was trained on" in capsys.readouterr().err
    assert [r["iteration"] for r in csv.DictReader(open(run / "metrics.csv", newline=""))] == ["1"]


def test_ctrl_c_outside_the_training_loop_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    """A Ctrl-C during the final evaluation / report (the longest phase of make demo) printed a KeyboardInterrupt
    traceback; the folder's lock must still be let go."""
    from flowalign.train.run_lock import LOCK_NAME
    from flowalign.train.trainer import Trainer

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", interrupted)
    run = tmp_path / "run"
    assert cli.main(["train", *_sets(run, "train.iterations=1")]) == 130
    assert capsys.readouterr().err.strip() == ("flowalign train: interrupted (Ctrl-C); continue with --resume: from the last "
                                               "checkpoint written (a finished run's writes its outputs again, its held-out report "
                                               "from the batches already scored), or from the start if there is none")
    assert not (run / LOCK_NAME).exists()


def test_ctrl_c_in_eval_names_what_it_can_go_on_from(tmp_path, capsys, monkeypatch):
    """With --out the scored batches are kept (eval_partial); "nothing to continue" was wrong there."""
    from flowalign.train import eval_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cli, "main_eval", interrupted)
    assert cli.main(["eval", "--out", str(tmp_path / "ev")]) == 130
    assert capsys.readouterr().err.strip() == ("flowalign eval: interrupted (Ctrl-C); rerun the same command to go on from the "
                                               f"batches already scored (kept in {tmp_path / 'ev' / 'eval_partial'})")
    assert cli.main(["eval"]) == 130
    assert capsys.readouterr().err.strip() == "flowalign eval: interrupted (Ctrl-C); nothing to continue"


def test_train_then_refuse_then_resume_then_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *_sets(run, "train.iterations=2")]) == 0
    assert "done: 2 iterations" in capsys.readouterr().out
    assert {"config.yaml", "metrics.csv", "pytorch_lora_weights.safetensors", "checkpoints"} <= {p.name for p in run.iterdir()}

    # the same command again would silently mix two runs: refused, nothing touched
    before = (run / "metrics.csv").read_text()
    assert cli.main(["train", *_sets(run, "train.iterations=2")]) == 2
    assert "already holds a run of the same config; pass --resume" in _one_error_line(capsys)
    assert cli.main(["train", *_sets(run, "train.iterations=2", "train.lr=1e-3")]) == 2
    assert "already holds a different run" in _one_error_line(capsys)
    assert (run / "metrics.csv").read_text() == before

    # a checkpoint past train.iterations trains nothing: refused (it used to print "done: 1 iterations")
    lora = (run / "pytorch_lora_weights.safetensors").read_bytes()
    assert cli.main(["train", "--resume", str(run), "--set", "train.iterations=1"]) == 2
    assert "is at iteration 2, past train.iterations=1; set train.iterations to 2 or more" in _one_error_line(capsys)
    assert (run / "pytorch_lora_weights.safetensors").read_bytes() == lora and (run / "metrics.csv").read_text() == before

    # --resume DIR reads DIR/config.yaml; --set extends the run to 3 iterations
    assert cli.main(["train", "--resume", str(run), "--set", "train.iterations=3"]) == 0
    with open(run / "metrics.csv", newline="") as fh:
        assert [r["iteration"] for r in csv.DictReader(fh)] == ["1", "2", "3"]

    # --resume of a checkpoint folder goes back to that iteration and replays the rest
    assert cli.main(["train", "--resume", str(run / "checkpoints" / "iter_000002"), "--set", "train.iterations=3"]) == 0
    with open(run / "metrics.csv", newline="") as fh:
        assert [r["iteration"] for r in csv.DictReader(fh)] == ["1", "2", "3"]
    assert cli.main(["train", "--resume", str(run / "nowhere")]) == 2
    assert "no such run folder or checkpoint folder" in _one_error_line(capsys)

    # --overwrite starts over
    assert cli.main(["train", *_sets(run, "train.iterations=1"), "--overwrite"]) == 0
    with open(run / "metrics.csv", newline="") as fh:
        assert [r["iteration"] for r in csv.DictReader(fh)] == ["1"]


def test_checkpoint_every_0_checkpoints_the_end_and_resume_keeps_an_odd_folder_name(tmp_path, capsys, monkeypatch):
    """checkpoint_every=0 means "only after the last iteration", so a finished run can be extended; --resume DIR
    passes DIR verbatim (it used to go through YAML: "2024-06-01" became a date, " #2" a comment)."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "2024-06-01 #2"
    assert cli.main(["train", *_sets(run, "train.iterations=1", "train.checkpoint_every=0")]) == 0
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["iter_000001"]
    assert cli.main(["train", "--resume", str(run), "--set", "train.iterations=3", "--set", "train.checkpoint_every=2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [run.name]  # nothing written beside it
    with open(run / "metrics.csv", newline="") as fh:
        assert [r["iteration"] for r in csv.DictReader(fh)] == ["1", "2", "3"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter_000002", "iter_000003"]  # every 2nd and the last


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    assert cli.main(["train", *_sets(tmp_path / "run"), "--resume"]) == 2
    assert "no valid checkpoint under" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_eval_and_generate_are_wired(tmp_path, capsys):
    """Each subcommand reaches its own code: its own error for a missing file, and eval scores a tiny model end to end
    (an error line alone would pass for a stub)."""
    assert cli.main(["eval", "--model", "tiny-sd3", "--prompts", str(tmp_path / "missing.jsonl"), "--reward", "brightness"]) == 2
    assert f"flowalign eval: error: {tmp_path / 'missing.jsonl'}: prompt file not found" in capsys.readouterr().err
    assert cli.main(["generate", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert f"flowalign generate: error: generate config '{tmp_path / 'missing.yaml'}' does not exist" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("a red circle\ntwo squares\n")
    assert cli.main(["eval", "--model", "tiny-sd3", "--prompts", str(tmp_path / "p.txt"), "--reward", "brightness", "--num-samples", "2",
                     "--steps", "1", "--no-progress", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["num_samples"] == 2 and result["categories"]["all"]["count"] == 2 and 0 < result["categories"]["all"]["mean_score"] < 1


def test_console_script_reports_config_errors(tmp_path):
    exe = Path(sys.executable).with_name("flowalign")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "flowalign.train.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(command + ["train", "--set", "train.iterations=0", "--set", f"train.output_dir={tmp_path / 'r'}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "flowalign train: error: train.iterations must be >= 1, got 0"
    assert not (tmp_path / "r").exists()


def test_default_recipe_is_the_toy_recipe():
    assert cli.DEFAULT_RECIPE.name == "toy_grpo.yaml" and cli.DEFAULT_RECIPE.is_file()


ONLINE_RECIPES = ["tiny_grpo.yaml", "toy_grpo.yaml", "toy_dense_grpo.yaml", "toy_tp_grpo.yaml", "toy_nft.yaml", "toy_awm.yaml",
                  "sd35m_grpo_geneval.yaml", "sd35m_dense_grpo_geneval.yaml", "sd35m_tp_grpo_geneval.yaml", "sd35m_grpo_ocr.yaml"]


@pytest.mark.parametrize("recipe", ONLINE_RECIPES)
def test_config_prints_every_key_with_its_help_and_reads_back(recipe, tmp_path, capsys):
    """`flowalign config` of every training recipe: each field's help appears, the overrides are applied,
    and the printed YAML loads back (through --config) into an equal config."""
    import dataclasses

    from flowalign.config import load_config, to_dict

    path = TINY_RECIPE.parent / recipe
    assert cli.main(["config", "--config", str(path), "--set", "train.lr=0.00123", "--set", "model.t5_cache_size=7"]) == 0
    text = capsys.readouterr().out
    expected = load_config(path, ["train.lr=0.00123", "model.t5_cache_size=7"])
    for section in dataclasses.fields(expected):
        value = getattr(expected, section.name)
        items = value if isinstance(value, list) else [value]
        for f in dataclasses.fields(items[0]):
            assert f.metadata["help"] in text, f"{section.name}.{f.name}"
    assert "  lr: 0.00123\n" in text and "  t5_cache_size: 7\n" in text
    (tmp_path / "printed.yaml").write_text(text)
    assert to_dict(load_config(tmp_path / "printed.yaml")) == to_dict(expected)


def test_config_refuses_bad_keys_in_one_line(capsys):
    assert cli.main(["config", "--set", "train.lrr=1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == "flowalign config: error: unknown config key 'train.lrr'; did you mean 'train.lr'?"


@pytest.mark.parametrize("override, message", [
    ("rewards.0.name=json:no_such_scorer", "json"),  # the module is installed, the name in it is not
    ("rewards.0.kwargs.partial_wieght=1", "unexpected keyword argument 'partial_wieght'"),
    ("objective.kwargs.clip=1", "unexpected keyword argument 'clip'"),
])
def test_config_refuses_what_train_would_refuse(override, message, capsys):
    """`flowalign config` used to print these recipes, which `flowalign train` then refused."""
    assert cli.main(["config", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("flowalign config: error: ") and message in err


@pytest.mark.parametrize("name", ["brigthness", "fa_nowhere_zz.mod:Thing", "fa_nowhere_zz.mod.Thing"])
def test_config_prints_a_recipe_whose_reward_is_not_installed_with_a_warning(name, capsys):
    """A plugin of another machine, by name or by a dotted path into its package (the dotted path was an error, so a
    recipe written for a GPU box could not be printed on a laptop)."""
    assert cli.main(["config", "--set", f"rewards.0.name={name}"]) == 0
    out = capsys.readouterr()
    assert f"\"name\": \"{name}\"" in out.out and "train would refuse this recipe here" in out.err
    if ":" in name or "." in name:  # the import's own reason, as train gives it: the modules tried, and PYTHONPATH
        assert f"reward {name!r}: no importable module in this dotted path (tried 'fa_nowhere_zz.mod'" in out.err
        assert "put its folder on PYTHONPATH" in out.err
    else:
        assert f"reward {name!r} is not installed here (available: " in out.err


def test_too_few_final_eval_samples_name_the_key_and_the_minimum(tmp_path, capsys):
    assert cli.main(["train", "--set", "train.final_eval_samples=8", "--set", f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "train.final_eval_samples=8 is below the 320 prompts of train.eval_prompts" in err and ">= 320" in err
    assert not (tmp_path / "run").exists()


def test_config_list_names_every_shipped_recipe_and_launch_config(capsys):
    from flowalign.config import packaged_recipe_dir, resolve_recipe

    assert cli.main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    recipes = sorted(p.stem for p in packaged_recipe_dir().glob("*.yaml"))
    assert set(recipes) <= set(names) and {"cpu", "ddp", "fsdp", "deepspeed_zero2"} <= set(names)
    assert all(resolve_recipe(name) == packaged_recipe_dir() / f"{name}.yaml" for name in recipes)  # each listed name loads


@pytest.mark.parametrize("command", ["generate", "offline"])
def test_one_process_commands_refuse_a_multi_process_launch(command, tmp_path, capsys, monkeypatch):
    """Under torchrun every process of generate wrote the same store (its manifest listed shards twice, for good)
    and every process of offline raced on one run folder."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main([command, "--set", f"output_dir={tmp_path / 'out'}"]) == 2
    assert capsys.readouterr().err.strip() == (f"flowalign {command}: error: flowalign {command} runs in one process, but this "
                                               "launch started 2 (WORLD_SIZE=2): run it without torchrun / accelerate launch")
    assert not (tmp_path / "out").exists()


def test_processes_other_than_the_launching_one_log_warnings_only(monkeypatch):
    """Setup INFO lines ("using the 'sd3' adapter", "LoRA r=...") repeated once per process of a launch."""
    import logging

    monkeypatch.delenv("RANK", raising=False)
    assert cli.log_level(False) == logging.INFO and cli.log_level(True) == logging.DEBUG
    monkeypatch.setenv("RANK", "1")
    assert cli.log_level(False) == logging.WARNING and cli.log_level(True) == logging.DEBUG
    monkeypatch.setenv("RANK", "0")
    assert cli.log_level(False) == logging.INFO


def test_an_ascii_locale_reads_the_shipped_recipes_and_prints_the_help(tmp_path):
    """Files were read in the locale's encoding: under LC_ALL=C without UTF-8 mode, `flowalign config` died on the
    "²" of a help text, `config --list` and the TP-GRPO / DenseGRPO recipes on their UTF-8 comments."""
    import subprocess

    code = ("import sys\n"
            "from flowalign.train import cli\n"
            "assert sys.stdout.encoding.lower() in ('ascii', 'ansi_x3.4-1968'), sys.stdout.encoding\n"
            "for argv in (['config'], ['config', '--list'], ['config', '--config', 'train/configs/toy_dense_grpo.yaml'],\n"
            "             ['config', '--config', 'train/configs/sd35m_tp_grpo_geneval.yaml']):\n"
            "    assert cli.main(argv) == 0, argv\n")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONIOENCODING": "",
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    assert b"Traceback" not in result.stderr


def test_an_output_folder_that_is_a_dangling_link_is_one_line_before_anything_loads(tmp_path, capsys, monkeypatch):
    """A symbolic link to a missing folder gave "could not read or write PATH: File exists" (train, generate, offline)
    and a traceback after the first batch (eval)."""
    from flowalign.train import model as model_mod
    from flowalign.train.offline_trainer import prepare_offline_dir

    monkeypatch.setattr(model_mod, "build_adapter", lambda *a, **k: pytest.fail("the model loaded before the output folder was checked"))
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    expected = f"{link} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist"
    for argv in (["train", "--set", f"train.output_dir={link}"], ["eval", "--model", "tiny-sd3", "--out", str(link)],
                 ["generate", "--config", "train/configs/toy_generate.yaml", "--set", f"output_dir={link}"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and expected in err, (argv, err)
    with pytest.raises(ConfigError, match="is a symbolic link to .* which does not exist"):
        prepare_offline_dir(link, resume=False, overwrite=False)
    assert not (tmp_path / "nowhere").exists()


def test_sigterm_outside_the_training_loop_says_what_it_left_and_exits_143(tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM during setup, the final report or an evaluation ended the process with status 143 and
    nothing printed (SIGINT printed the hint); the handler is restored afterwards."""
    import signal as signals

    from flowalign.train import eval_cli

    def terminated(args):
        os.kill(os.getpid(), signals.SIGTERM)
        pytest.fail("SIGTERM did not interrupt the command")

    monkeypatch.setattr(eval_cli, "main_eval", terminated)
    before = signals.getsignal(signals.SIGTERM)
    assert cli.main(["eval", "--out", str(tmp_path / "ev")]) == 143
    assert capsys.readouterr().err.strip() == ("flowalign eval: terminated (SIGTERM); rerun the same command to go on from the "
                                               f"batches already scored (kept in {tmp_path / 'ev' / 'eval_partial'})")
    assert signals.getsignal(signals.SIGTERM) is before


def test_the_toy_builder_help_works_without_docstrings():
    """python -OO drops docstrings: the builder's --help took its description from __doc__.split and raised."""
    result = subprocess.run([sys.executable, "-OO", "-m", "flowalign.pipelines.toy", "--help"], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-1000:]
    assert "build" in result.stdout and "evaluate" in result.stdout


def test_a_run_folder_name_that_is_not_utf8_is_one_line(tmp_path, capsys):
    """Linux allows any bytes in a name; TensorBoard's writer died on them with a traceback, leaving config.yaml behind."""
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/run\xff")
    assert cli.main(["train", "--set", f"train.output_dir={bad}", "--set", "train.iterations=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not valid UTF-8" in err
    assert not (Path(bad) / "config.yaml").exists()


def test_an_eval_into_a_folder_of_another_evaluation_says_it_replaces_it(tmp_path, caplog):
    import logging

    from flowalign.train.eval_cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\na blue circle\n")
    argv = ["--model", "tiny-sd3", "--prompts", str(prompts), "--reward", "brightness", "--num-samples", "2", "--steps", "1",
            "--guidance", "1", "--no-progress", "--out", str(tmp_path / "ev")]
    with caplog.at_level(logging.WARNING, logger="flowalign.train.eval_cli"):
        assert main(argv) == 0 and main(argv) == 0  # the same evaluation again: replaced silently
        assert "held another evaluation" not in caplog.text
        assert main([*argv, "--steps", "2"]) == 0
    assert "eval.json held another evaluation (num_steps 1 -> 2); it is replaced" in caplog.text


def test_tqdm_disable_in_the_environment_silences_the_bars_of_a_batch_job(tmp_path):
    """A job logging to a file got every bar redraw in it; tqdm's own TQDM_DISABLE now applies to every bar (the
    evaluation passed disable=False explicitly, which overrode it)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    command = [sys.executable, "-m", "flowalign.train.cli", "eval", "--model", "tiny-sd3", "--prompts", str(prompts), "--reward",
               "brightness", "--num-samples", "2", "--steps", "1", "--guidance", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DELAY": "0"}  # a file: bars of short phases show only when asked
    shown = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    quiet = subprocess.run(command, capture_output=True, text=True, env={**env, "TQDM_DISABLE": "1"}, timeout=300)
    assert shown.returncode == quiet.returncode == 0, (shown.stderr[-500:], quiet.stderr[-500:])
    assert "eval: " in shown.stderr and "eval: " not in quiet.stderr and "\r" not in quiet.stderr


def test_bars_redraw_rarely_when_stderr_is_a_file(tmp_path):
    """`nohup flowalign train > log 2>&1`: tqdm redrew every bar ten times a second into the log, and a short phase's
    0% frame and erasure prefixed the next log line."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    env["OMP_NUM_THREADS"] = "1"
    code = ("import os, sys, time\n"
            "from flowalign.train import cli\n"
            "seen = {}\n"
            "cli._dispatch = lambda args: seen.setdefault('value', (os.environ.get('TQDM_MININTERVAL'), os.environ.get('TQDM_DELAY'))) and 0\n"
            "cli.main(['config'])\n"
            "print(*seen['value'], os.environ.get('TQDM_MININTERVAL'), os.environ.get('TQDM_DELAY'))\n")
    with open(tmp_path / "err.log", "w") as err:
        out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err, env=env, text=True, check=True).stdout
    interval = cli.OFF_TERMINAL_BAR_INTERVAL
    assert out.split() == [interval, interval, "None", "None"]  # set while the command ran, removed after
    env["TQDM_MININTERVAL"] = "5"  # the user's own setting stays
    with open(tmp_path / "err.log", "w") as err:
        out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err, env=env, text=True, check=True).stdout
    assert out.split() == ["5", interval, "5", "None"]


def test_overwrite_takes_a_run_folder_holding_the_reports_journals(tmp_path):
    """A run killed in its held-out report leaves report_partial/ (eval_partial/ in the versions of 2026-12-07 before
    it): --overwrite refused the folder as one holding files a run does not write."""
    from flowalign.train.run_dir import RUN_ENTRIES, foreign_entries

    for name in ("config.yaml", "report_partial", "eval_partial"):
        (tmp_path / name).mkdir() if name.endswith("partial") else (tmp_path / name).write_text("train: {}\n")
    assert foreign_entries(tmp_path, RUN_ENTRIES) == []
    (tmp_path / "notes.txt").write_text("mine")
    assert foreign_entries(tmp_path, RUN_ENTRIES) == ["notes.txt"]


def test_resume_from_a_checkpoint_named_from_inside_its_checkpoints_folder(tmp_path, monkeypatch):
    """`cd runs/x/checkpoints && flowalign train --resume iter_000001` took '.' for the run folder (Path('iter_000001')
    .parent.parent), found no config.yaml there and fell back to the toy recipe: refused for its config hash."""
    from tests.tiny_run import train_argv

    run = tmp_path / "run"
    settings = ["train.iterations=1", "train.prompts_per_iter=2", "sampling.group_size=2", "train.micro_batch_size=4",
                "train.eval_every=-1", "train.checkpoint_every=1", "train.log_with=[]"]
    assert cli.main(train_argv(run, settings)) == 0
    monkeypatch.chdir(run / "checkpoints")
    assert cli.main(["train", "--resume", "iter_000001", "--set", "train.iterations=2"]) == 0
    assert (run / "checkpoints" / "iter_000002").is_dir() and not (run / "checkpoints" / "runs").exists()
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
