"""Bad input found by a careless-user review: each used to pass silently or fail with a message that did not say
what to fix (rewards that change their input images, complex scores, registry names, config and prompt-file
mistakes)."""
from __future__ import annotations

import logging

import pytest
import torch

from flowalign.config import load_config
from flowalign.errors import ConfigError, PromptFileError, RewardError
from flowalign.prompts import load_prompts
from flowalign.rewards import call_reward
from flowalign.rewards.base import REWARDS, register_reward

IMAGES = torch.rand(2, 3, 8, 8)


def _zero_in_place(images, prompts, metadata):
    images.zero_()
    return torch.zeros(len(prompts))


def _write_through_numpy(images, prompts, metadata):
    images.numpy()[:] = 0.5
    return torch.zeros(len(prompts))


def _clamped_copy(images, prompts, metadata):
    return images.clamp(0.2, 0.8).mean(dim=(1, 2, 3))  # out of place: fine


@pytest.mark.parametrize("fn", [_zero_in_place, _write_through_numpy])
@pytest.mark.parametrize("on_error", ["raise", "drop"])
def test_a_reward_that_changes_its_images_in_place_is_named(fn, on_error):
    """The next reward of a mix (and the report, the rollout store) would see the changed images."""
    with pytest.raises(RewardError, match=f"reward '{fn.__name__}' modified the images it was given in place"):
        call_reward(fn, IMAGES.clone(), ["a", "b"], on_error=on_error)
    images = IMAGES.clone()
    call_reward(_clamped_copy, images, ["a", "b"])
    assert torch.equal(images, IMAGES)


def test_complex_scores_are_refused_not_truncated():
    with pytest.raises(RewardError, match="complex scores"):
        call_reward(lambda images, prompts, metadata: torch.ones(2, dtype=torch.complex64) * 1j, IMAGES, ["a", "b"])


def test_register_reward_needs_a_string_and_says_when_it_replaces_one(caplog):
    with pytest.raises(ConfigError, match="non-empty string name"):
        register_reward(123)
    before = REWARDS.get("test_bad_input_twice")
    try:
        register_reward("test_bad_input_twice")(_clamped_copy)
        with caplog.at_level(logging.WARNING):
            register_reward("test_bad_input_twice")(_zero_in_place)
        assert "replaces the reward registered under that name" in caplog.text
    finally:
        REWARDS.pop("test_bad_input_twice", None) if before is None else REWARDS.__setitem__("test_bad_input_twice", before)


@pytest.mark.parametrize("args, message", [
    ((None, "train.lr=1e-3"), "overrides must be a list"),
    ((None, [5]), "overrides must be a list"),
    (({"train": {"lr": 1e-3}}, None), "config_from_dict"),
    ((None, ["sampling.num_steps=1000000000000"]), r"sampling.num_steps must be in \[1, 1000\]"),
    ((None, ["sampling.eval_num_steps=5000"]), "sampling.eval_num_steps must be <= 1000"),
    ((None, ["rewards.0.weight=0"]), "every reward's weight is 0"),
])
def test_load_config_refuses_what_would_fail_later_or_train_nothing(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(*args)


def test_an_empty_recipe_file_is_refused(tmp_path):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("# nothing here yet\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(recipe)


def test_prompt_files_a_folder_and_jsonl_in_a_txt_file(tmp_path):
    with pytest.raises(PromptFileError, match="is a folder"):
        load_prompts(tmp_path)
    wrong = tmp_path / "prompts.txt"
    wrong.write_text('a plain prompt\n{"prompt": "a red circle", "tag": "colors"}\n')
    with pytest.raises(PromptFileError, match=r"prompts.txt:2: this line is a JSON prompt record.*rename the file to .jsonl"):
        load_prompts(wrong)
    fine = tmp_path / "fine.txt"
    fine.write_text("a {curly} prompt\n")  # braces alone are a prompt like any other
    assert [r.prompt for r in load_prompts(fine)] == ["a {curly} prompt"]


def test_resuming_with_a_setting_that_changes_the_run_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from flowalign.errors import CheckpointError
    from flowalign.train import trainer_setup
    from flowalign.train.trainer import Trainer

    settings = ["sampling.num_steps=2", "train.iterations=1", "train.prompts_per_iter=2", "sampling.group_size=2",
                "train.micro_batch_size=4", "train.grad_accum=2", "train.final_eval_samples=0", "train.eval_every=-1",
                "train.log_with=[]", "train.progress=false", f"train.output_dir={tmp_path}"]
    trainer = Trainer(load_config("tiny_grpo", settings)).setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was built before the changed config was refused")

    monkeypatch.setattr(trainer_setup, "build_model", must_not_load)
    changed = load_config("tiny_grpo", settings + ["train.iterations=2", "sampling.group_size=4", "train.micro_batch_size=8"])
    with pytest.raises(CheckpointError, match=r"config hash .* the settings that change the run: sampling.group_size, "
                                               r"train.micro_batch_size\. --resume"):
        Trainer(changed, resume=True).setup()


def test_adapter_kwargs_the_adapter_does_not_take_are_refused_before_the_weights_load(monkeypatch):
    import diffusers

    from flowalign.config import ModelConfig
    from flowalign.train.model import build_adapter

    def must_not_load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the bad adapter_kwargs were refused")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", must_not_load)
    with pytest.raises(ConfigError, match="model.adapter_kwargs: the adapter SD3Adapter takes no 'num_frames'; it takes .*t5_cache_size"):
        build_adapter(ModelConfig(pretrained="toy", adapter_kwargs={"num_frames": 3}), torch.device("cpu"))


def test_device_names_are_checked_before_a_model_loads(capsys):
    from flowalign.train import eval_cli
    from flowalign.train.runtime import check_device

    assert check_device("cpu", "--device") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device='banana' is not a torch device"):
        check_device("banana", "--device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device='cuda:0': torch sees 0 CUDA device\(s\) here"):
            check_device("cuda:0", "device")
        assert eval_cli.main(["--device", "cuda"]) == 2
        assert "torch sees 0 CUDA device(s)" in capsys.readouterr().err


def test_lora_paths_are_read_before_a_model_loads(tmp_path, capsys):
    from flowalign.errors import LoraMismatchError
    from flowalign.lora import read_lora_file
    from flowalign.train import eval_cli

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "lora.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LoraMismatchError, match="the folder holds lora.safetensors: pass that file itself"):
        read_lora_file(checkpoint)
    with pytest.raises(LoraMismatchError, match="is not a readable safetensors LoRA file"):
        read_lora_file(checkpoint / "lora.safetensors")
    assert eval_cli.main(["--lora", str(checkpoint), "--model", str(tmp_path / "no_such_model")]) == 2  # the LoRA is read first
    assert "pass that file itself" in capsys.readouterr().err
    (checkpoint / "manifest.json").write_text("{}")  # a checkpoint from before checkpoints carried the diffusers file
    with pytest.raises(LoraMismatchError, match=r"this checkpoint predates .* writes the file into the checkpoints that follow it \(not into this one\)"):
        read_lora_file(checkpoint)


def test_generate_refuses_a_folder_that_holds_other_files(tmp_path):
    """``flowalign generate`` wrote its store.json, shards/ and manifest.jsonl into any folder, a training run's included."""
    from flowalign.train.generate import load_generate_config, run_generate

    run = tmp_path / "a_training_run"
    run.mkdir()
    (run / "config.yaml").write_text("train: {}\n")
    (run / "metrics.csv").write_text("iteration\n")
    with pytest.raises(ConfigError, match=r"output_dir .* holds files a rollout store does not write \(config.yaml, metrics.csv\)"):
        run_generate(load_generate_config("toy_generate", [f"output_dir={run}"]))
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.csv"]  # nothing written


def test_an_output_dir_that_is_a_file_is_named(tmp_path):
    from flowalign.train.generate import load_generate_config, run_generate
    from flowalign.train.trainer import Trainer

    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        Trainer(load_config("tiny_grpo", [f"train.output_dir={afile}"])).setup()
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        run_generate(load_generate_config("toy_generate", [f"output_dir={afile}"]))


def test_a_broken_recipe_section_is_blamed_not_the_override_into_it(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("base: toy_grpo\nsampling: 5\n")
    with pytest.raises(ConfigError, match=r"the recipe's 'sampling' must be a mapping of keys, got int \(5\)"):
        load_config(recipe, ["sampling.group_size=2"])


def test_a_plugin_check_prompts_raising_any_error_is_one_config_error_naming_the_reward():
    """A plugin's check_prompts raising ValueError gave a traceback and exit 1 instead of the one-line exit-2 refusal."""
    from flowalign.errors import ConfigError
    from flowalign.rewards.base import check_reward_prompts

    class Picky:
        def __call__(self, images, prompts, metadata=None):
            return [0.0] * len(prompts)

        def check_prompts(self, prompts, metadata):
            raise ValueError(f"no quoted text in {prompts[0]!r}")

    with pytest.raises(ConfigError, match="reward 'picky' cannot score the prompts: ValueError: no quoted text in 'a cat'"):
        check_reward_prompts(Picky(), ["a cat"], name="picky")


def test_prompts_outside_a_verifiers_grammar_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """The shapes verifier used to fail only after the model loaded and the first batch was sampled."""
    from flowalign.rewards import load_reward
    from flowalign.rewards.base import check_reward_prompts
    from flowalign.train import eval_cli, trainer_setup
    from flowalign.train.trainer import Trainer

    shapes = load_reward("shapes")
    check_reward_prompts(shapes, ["a red square", {"prompt": "a cat", "include": [{"shape": "circle", "count": 1}]}])  # a spec: fine
    check_reward_prompts(load_reward("brightness"), ["a photo of a cat"])  # a reward without a grammar accepts anything
    prompts = tmp_path / "cats.txt"
    prompts.write_text("a red square\na photo of a cat\nthree dogs\n")

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was built before the prompts were refused")

    monkeypatch.setattr(trainer_setup, "build_model", must_not_load)
    with pytest.raises(ConfigError, match=r"reward 'shapes' cannot score the training prompts \(train.prompts\): 2 of 3 prompts "
                                          r"are outside the shapes caption grammar.*'a photo of a cat', 'three dogs'"):
        Trainer(load_config("toy_grpo", [f"train.prompts={prompts}", f"train.output_dir={tmp_path / 'run'}"])).setup()
    assert eval_cli.main(["--prompts", str(prompts), "--model", str(tmp_path / "no_such_model")]) == 2  # prompts checked first
    assert "cannot score the prompts of" in capsys.readouterr().err


@pytest.mark.parametrize("include, message", [
    ([{"shape": "cirle"}], r"include\[0\]: 'shape' must be one of \['circle', 'square', 'triangle'\], got 'cirle'"),
    ([{"shape": "circle", "colour": "red"}], r"include\[0\] has unknown key\(s\) \['colour'\]"),
    ([{"class": "circle"}], r"include\[0\] has unknown key\(s\) \['class'\]"),
    ("oops", r"'include' must be a list of objects, got str"),
    ([{"shape": "circle", "color": "teal"}], r"'color' must be one of"),
    ([{"shape": "circle", "count": 0}], r"'count' must be an integer >= 1, got 0"),
    ([{"shape": "circle", "position": ["left of", 0]}], r"'position' must be \[relation, j\]"),  # no earlier entry
    ([{"shape": "circle"}, {"shape": "square", "position": ["beside", 0]}], r"include\[1\]: 'position' must be"),
])
def test_a_prompt_files_shapes_spec_is_checked_before_the_model_loads(tmp_path, monkeypatch, include, message):
    """A misspelt spec used to pass: ``"cirle"`` failed every sample, ``"colour"`` dropped the colour constraint, and
    ``"class"`` or a string ``include`` crashed inside the verifier after the model had loaded and sampled."""
    import json

    from flowalign.rewards.shapes import ShapesReward
    from flowalign.train import trainer_setup
    from flowalign.train.trainer import Trainer

    record = {"prompt": "a red circle", "tag": "colors", "include": include}
    with pytest.raises(ValueError, match=message):
        ShapesReward().score(torch.zeros(1, 3, 32, 32), ["a red circle"], [record])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a blue square", "include": [{"shape": "square", "color": "blue"}]}) + "\n"
                       + json.dumps(record) + "\n")
    monkeypatch.setattr(trainer_setup, "build_model", lambda *a, **k: pytest.fail("the model was built before the spec was refused"))
    with pytest.raises(ConfigError, match=r"1 of 2 prompts carry a spec the shapes verifier cannot check; first: 'a red circle': .*" + message):
        Trainer(load_config("toy_grpo", [f"train.prompts={prompts}", f"train.output_dir={tmp_path / 'run'}"])).setup()


def test_the_image_check_takes_inference_tensors_strided_batches_and_never_sums():
    """The first version read the version counter of inference tensors (which have none: RuntimeError) and summed the
    batch in fp64 (a full copy; no fp64 on MPS; a sum whose rounding depends on the thread count)."""
    with torch.inference_mode():
        made = torch.rand(2, 3, 8, 8)
    assert call_reward(_clamped_copy, made, ["a", "b"]).scores.shape == (2,)
    strided = torch.rand(3, 8, 8, 2).permute(3, 0, 1, 2)  # not contiguous: the version counter still guards it
    call_reward(_clamped_copy, strided, ["a", "b"])
    with pytest.raises(RewardError, match="modified the images"):
        call_reward(_zero_in_place, torch.rand(3, 8, 8, 2).permute(3, 0, 1, 2), ["a", "b"])
    threads = torch.get_num_threads()

    def changes_threads(images, prompts, metadata):
        torch.set_num_threads(1 if threads > 1 else 2)
        return images.mean(dim=(1, 2, 3))

    try:
        call_reward(changes_threads, torch.distributions.Beta(0.5, 0.5).sample((4, 3, 64, 64)), list("abcd"))
    finally:
        torch.set_num_threads(threads)


def test_overrides_may_come_from_a_generator():
    assert load_config(None, (item for item in ["train.lr=0.123"])).train.lr == 0.123


def test_prompts_outside_the_grammar_are_left_to_on_error_drop(tmp_path, monkeypatch):
    from flowalign.train import trainer_setup
    from flowalign.train.trainer import Trainer

    prompts = tmp_path / "cats.txt"
    prompts.write_text("a red square\na photo of a cat\n")
    built = []
    monkeypatch.setattr(trainer_setup, "build_model", lambda *args, **kwargs: built.append(1) or (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):  # past the prompt check: those samples will be dropped
        Trainer(load_config("toy_grpo", [f"train.prompts={prompts}", "rewards=[{name: shapes, on_error: drop}]",
                                         f"train.output_dir={tmp_path / 'run'}"])).setup()
    assert built == [1]


def test_an_adapter_whose_pipeline_argument_is_positional_only_keeps_its_keywords():
    from flowalign.pipelines.base import ADAPTERS
    from flowalign.train.model import check_adapter_kwargs

    class Mine:
        def __init__(self, pipeline, /, *, num_frames: int = 17):
            pass

    ADAPTERS["test_positional_only"] = Mine
    try:
        check_adapter_kwargs("test_positional_only", "", {"num_frames": 9})
        with pytest.raises(ConfigError, match="takes no 'height'; it takes num_frames"):
            check_adapter_kwargs("test_positional_only", "", {"height": 9})
    finally:
        ADAPTERS.pop("test_positional_only")


def test_a_resolution_the_model_cannot_make_is_refused_before_the_weights_load(monkeypatch):
    import diffusers

    from flowalign.config import ModelConfig
    from flowalign.train.model import build_adapter

    def must_not_load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the resolution was refused")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", must_not_load)
    with pytest.raises(ConfigError, match=r"model.resolution=65: must be a multiple of 4 \(VAE factor x patch size"):
        build_adapter(ModelConfig(pretrained="toy", resolution=65), torch.device("cpu"))


def test_scores_without_values_are_refused():
    with pytest.raises(RewardError, match="'meta' device"):
        call_reward(lambda images, prompts, metadata: torch.zeros(2, device="meta"), IMAGES, ["a", "b"])
