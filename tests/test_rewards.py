"""Tests for flowalign.rewards: loading, the failure policy, MultiReward and the built-ins."""
from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign.errors import ConfigError, RewardError
from flowalign.rewards import (
    REWARDS,
    CheckedRewardOutput,
    FunctionReward,
    MultiReward,
    Reward,
    RewardOutput,
    available_rewards,
    call_reward,
    load_reward,
    register_reward,
)
from flowalign.rewards import base as reward_base
from flowalign.rewards.builtin import Brightness, ColorFraction, JpegCompressibility, JpegIncompressibility


def _images(batch=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g)


@pytest.fixture
def temp_module(write_plugin):
    """Write a uniquely named module into a folder on sys.path; return its name."""
    return lambda source: write_plugin(source, "fa_tmp")


CONST_SOURCE = """
    import torch
    from flowalign.rewards.base import Reward, RewardOutput

    class ConstReward(Reward):
        def __init__(self, value=1.5, device=None):
            super().__init__(device)
            self.value = value

        def score(self, images, prompts, metadata):
            return RewardOutput(torch.full((images.shape[0],), float(self.value)))

    def mean_pixel(images, prompts, metadata):
        return images.flatten(1).mean(1)

    def make_const(value=2.5):
        return ConstReward(value)
"""


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_registered_name_builds_class_with_kwargs(monkeypatch):
    class Scaled(Reward):
        def __init__(self, factor=1.0):
            super().__init__()
            self.factor = factor

        def score(self, images, prompts, metadata):
            return RewardOutput(self.factor * images.flatten(1).sum(1))

    monkeypatch.setitem(REWARDS, "scaled_test", Scaled)
    register_reward("scaled_test")(Scaled)
    reward = load_reward("scaled_test", factor=3.0)
    assert isinstance(reward, Scaled) and reward.name == "scaled_test"
    x = _images(2)
    assert torch.allclose(reward(x, ["a", "b"]).scores, 3.0 * x.flatten(1).sum(1))
    assert "scaled_test" in available_rewards()
    with pytest.raises(ConfigError, match="cannot be built with arguments"):
        load_reward("scaled_test", nonsense=1)


def test_class_and_instance_passed_directly():
    class Unregistered(Reward):
        def score(self, images, prompts, metadata):
            return RewardOutput(images.flatten(1).amax(1))

    reward = load_reward(Unregistered)
    assert isinstance(reward, Unregistered) and reward.name == "Unregistered"
    instance = Brightness()
    assert load_reward(instance) is instance
    with pytest.raises(ConfigError, match="instance"):
        load_reward(instance, weights=(1, 1, 1))


def test_builtins_are_listed_sorted():
    names = available_rewards()
    assert names == sorted(names)
    for name in ("jpeg_compressibility", "jpeg_incompressibility", "brightness", "color_fraction"):
        assert name in names
        assert load_reward(name).name == name


def test_quality_signal_is_a_lazy_builtin():
    """`flowalign eval --corrected-by image_stats_quality` and reward configs can name it."""
    from flowalign.corrected import ImageStatsQuality

    assert "image_stats_quality" in available_rewards()
    assert reward_base._import_object(reward_base.LAZY_REWARDS["image_stats_quality"]) is ImageStatsQuality


def test_dotted_paths_both_forms(temp_module):
    module = temp_module(CONST_SOURCE)
    for spec in (f"{module}:ConstReward", f"{module}.ConstReward"):
        reward = load_reward(spec, value=4.0)
        assert type(reward).__name__ == "ConstReward"
        assert reward(_images(2), ["a", "b"]).scores.tolist() == [4.0, 4.0]
    assert isinstance(load_reward("flowalign.rewards.builtin:Brightness"), Brightness)
    assert isinstance(load_reward("flowalign.rewards.builtin.Brightness"), Brightness)


def test_a_subclass_of_a_registered_reward_is_named_by_its_spec_not_its_parent(temp_module):
    """A plugin deriving from Brightness inherited the name register_reward gave its parent: its metrics and eval.json
    called it `brightness`, and `eval --compare` took it for one."""
    module = temp_module("""
        from flowalign.rewards.builtin import Brightness

        class Lenient(Brightness):
            pass

        class Named(Brightness):
            name = "named_by_itself"
    """)
    assert load_reward(f"{module}:Lenient").name == f"{module}:Lenient"
    assert load_reward(f"{module}:Named").name == "named_by_itself"
    assert load_reward("brightness").name == load_reward("flowalign.rewards.builtin:Brightness").name == "brightness"


def test_plain_function_and_factory_are_wrapped(temp_module):
    module = temp_module(CONST_SOURCE)
    x = _images(3)
    fn_reward = load_reward(f"{module}:mean_pixel")
    assert isinstance(fn_reward, FunctionReward) and fn_reward.name == f"{module}:mean_pixel"
    assert torch.allclose(fn_reward(x, ["a"] * 3).scores, x.mean(dim=(1, 2, 3)))
    factory_reward = load_reward(f"{module}:make_const", value=7.0)
    assert factory_reward(x, ["a"] * 3).scores.tolist() == [7.0] * 3

    def ddpo_style(images, prompts, metadata):  # numpy scores + details tuple, as DDPO's rewards
        return np.arange(len(prompts), dtype=np.float64), {"note": "x"}

    out = call_reward(load_reward(ddpo_style), x, ["a", "b", "c"])
    assert out.scores.dtype == torch.float32 and out.scores.tolist() == [0.0, 1.0, 2.0]
    assert out.details == {"note": "x"}


def test_any_callable_that_scores_is_a_scorer_and_bad_arguments_fail_at_load():
    import functools

    x, prompts = _images(2), ["a", "b"]
    expected = x.mean(dim=(1, 2, 3))

    class ModuleScorer(torch.nn.Module):  # nn.Module: its __call__ is (*args, **kwargs)
        def forward(self, images, prompts, metadata):
            return images.mean(dim=(1, 2, 3))

    def plain_decorator(fn):  # a wrapper without functools.wraps
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    @plain_decorator
    def decorated(images, prompts, metadata, scale=1.0):
        return scale * images.mean(dim=(1, 2, 3))

    def make_reward(model_name, threshold):  # a factory with required keywords
        return lambda images, prompts, metadata: (images.mean(dim=(1, 2, 3)) > threshold).float()

    for reward in (load_reward(ModuleScorer()), load_reward(decorated), load_reward(functools.partial(decorated, scale=1.0))):
        assert isinstance(reward, FunctionReward) and torch.allclose(reward(x, prompts).scores, expected)
    assert torch.allclose(load_reward(decorated, scale=2.0)(x, prompts).scores, 2 * expected)
    built = load_reward(make_reward, model_name="m", threshold=0.0)
    assert built(x, prompts).scores.tolist() == [1.0, 1.0]
    # refused at load, naming the reward, instead of every sample failing (or being dropped) later
    def scorer(images, prompts, metadata, scale=1.0):
        return scale * images.mean(dim=(1, 2, 3))

    def two_args(images, prompts):
        return images.mean(dim=(1, 2, 3))

    with pytest.raises(ConfigError, match="reward 'scorer' cannot be called with arguments \\['scael'\\]"):
        load_reward(scorer, scael=2.0)
    with pytest.raises(ConfigError, match="reward 'two_args'.*too many positional arguments"):
        load_reward(two_args)
    # numpy scores inside a RewardOutput are converted like bare numpy scores
    out = call_reward(load_reward(lambda i, p, m: RewardOutput(scores=np.array([0.25, 0.5]), details={})), x, prompts)
    assert isinstance(out.scores, torch.Tensor) and out.scores.tolist() == [0.25, 0.5]


def test_a_setting_the_reward_refuses_is_a_config_error():
    with pytest.raises(ConfigError, match="partial_weight=0.7"):
        load_reward("shapes", partial_weight=0.7)

    class Fussy(Reward):
        def __init__(self, level=1):
            super().__init__()
            if level > 3:
                raise RuntimeError("level must be <= 3")

    with pytest.raises(ConfigError, match="reward 'fussy' could not be built .*level must be <= 3"):
        reward_base._build(Fussy, "fussy", {"level": 5})


def test_dotted_path_errors(temp_module):
    module = temp_module("import fa_missing_dependency_xyz\n")
    with pytest.raises(ConfigError, match="fa_missing_dependency_xyz"):
        load_reward(f"{module}:Anything")
    good = temp_module(CONST_SOURCE)
    with pytest.raises(ConfigError, match="has no attribute 'Nope'"):
        load_reward(f"{good}:Nope")
    with pytest.raises(ConfigError, match=r"no importable module in this dotted path \(tried 'fa_no_such_pkg_q.sub', 'fa_no_such_pkg_q'\); "
                                          "install the package that provides it, or put its folder on PYTHONPATH"):
        load_reward("fa_no_such_pkg_q.sub.Thing")


def test_a_module_in_the_current_folder_that_is_not_importable_gets_a_pythonpath_hint(tmp_path, monkeypatch):
    """The console script does not import from the working directory: myrew.py beside the user was 'no importable module'."""
    import sys

    name = f"fa_here_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(CONST_SOURCE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    with pytest.raises(ConfigError, match=f"{name} is in the current folder, which this command does not import from: run it with "
                                          "PYTHONPATH=."):
        load_reward(f"{name}:Const")


def test_unknown_name_lists_available_and_suggests():
    with pytest.raises(ConfigError) as info:
        load_reward("jpeg_compresibility")
    message = str(info.value)
    assert "Did you mean 'jpeg_compressibility'" in message
    assert "brightness" in message and "color_fraction" in message
    with pytest.raises(ConfigError) as info:
        load_reward("qqqqqq")
    assert "Did you mean" not in str(info.value) and "Available rewards" in str(info.value)


def test_entry_point_from_a_real_dist_info(tmp_path, monkeypatch):
    package = f"fa_ep_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(textwrap.dedent(CONST_SOURCE))
    dist_info = tmp_path / f"{package}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    ep_name = f"ep_const_{package}"
    (dist_info / "entry_points.txt").write_text(
        f"[flowalign.rewards]\n{ep_name} = {package}:ConstReward\nbroken_{package} = {package}:Missing\n"
    )
    assert ep_name not in available_rewards()
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert ep_name in available_rewards()
        reward = load_reward(ep_name, value=-2.0)
        assert reward.name == ep_name
        assert reward(_images(2), ["a", "b"]).scores.tolist() == [-2.0, -2.0]
        with pytest.raises(ConfigError, match="entry point"):
            load_reward(f"broken_{package}")
    finally:
        sys.modules.pop(package, None)


def test_an_entry_point_with_a_builtin_name_is_named_in_a_warning(tmp_path, monkeypatch, caplog):
    """An installed entry point called 'brightness' was silently ignored in favour of the built-in."""
    package = f"fa_ep_{uuid.uuid4().hex[:8]}"
    dist_info = tmp_path / f"{package}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[flowalign.rewards]\nbrightness = {package}:Mine\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(reward_base, "_WARNED_SHADOWED", set())
    with caplog.at_level("WARNING"):
        reward = load_reward("brightness")
        load_reward("brightness")
    assert type(reward).__module__.startswith("flowalign.rewards")  # the built-in
    assert caplog.text.count(f"entry point 'brightness' = '{package}:Mine'") == 1  # once
    assert f"name it by its dotted path '{package}:Mine'" in caplog.text


def test_lazy_builtin_not_imported_until_used(temp_module, monkeypatch):
    module = temp_module(CONST_SOURCE)
    monkeypatch.setitem(reward_base.LAZY_REWARDS, "lazy_const_test", f"{module}:ConstReward")
    monkeypatch.setitem(reward_base.LAZY_REWARDS, "lazy_missing_test", "fa_not_there_zz.mod:Thing")
    names = available_rewards()
    assert "lazy_const_test" in names and "lazy_missing_test" not in names
    assert module not in sys.modules
    assert load_reward("lazy_const_test", value=0.5)(_images(1), ["a"]).scores.tolist() == [0.5]
    assert module in sys.modules


def test_package_import_does_not_import_shapes():
    code = "import sys, flowalign.rewards; print('flowalign.rewards.shapes' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Input validation and the failure policy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, prompts, match",
    [
        (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), ["a", "b"], "float"),
        (torch.full((2, 3, 4, 4), 1.5), ["a", "b"], r"\[0, 1\]"),
        (torch.full((2, 3, 4, 4), -0.1), ["a", "b"], r"\[0, 1\]"),
        (torch.zeros(2, 4, 4, 4), ["a", "b"], "shape"),
        (torch.zeros(2, 4, 4), ["a", "b"], "shape"),
        (torch.zeros(2, 3, 4, 4), ["a"], "1 prompts for 2 images"),
        (torch.zeros(2, 3, 4, 4), "ab", "list of strings"),
        (torch.tensor([float("nan")]).expand(2, 3, 4, 4), ["a", "b"], "NaN"),
    ],
)
def test_input_validation(images, prompts, match):
    with pytest.raises(RewardError, match=match):
        call_reward(load_reward("brightness"), images, prompts)


def test_input_validation_metadata_and_video():
    with pytest.raises(RewardError, match="metadata"):
        call_reward(load_reward("brightness"), _images(2), ["a", "b"], [{}])
    video = torch.rand(2, 5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    out = call_reward(load_reward("brightness"), video, ["a", "b"])
    assert out.scores.shape == (2,)


def _failing_reward(kind):
    def fn(images, prompts, metadata):
        scores = images.flatten(1).mean(1)
        if kind == "nan":
            return torch.where(torch.tensor([p == "bad" for p in prompts]), torch.nan, scores)
        if kind == "inf":
            return torch.where(torch.tensor([p == "bad" for p in prompts]), torch.inf, scores)
        if kind == "raise" and "bad" in prompts:
            raise ValueError("cannot score this one")
        if kind == "length":
            return torch.zeros(len(prompts) + 1)
        if kind == "batch_only" and len(prompts) > 1:
            raise MemoryError("batch too large")
        return scores

    fn.__name__ = f"{kind}_reward"
    return load_reward(fn)


PROMPTS = ["good one", "bad", "good two"]


@pytest.mark.parametrize("kind", ["nan", "inf", "raise"])
def test_raise_policy_names_reward_and_prompt(kind):
    with pytest.raises(RewardError) as info:
        call_reward(_failing_reward(kind), _images(3), PROMPTS)
    assert f"{kind}_reward" in str(info.value) and "'bad'" in str(info.value)
    assert info.value.reward == f"{kind}_reward" and info.value.prompts == ["bad"]
    if kind == "raise":
        assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("kind", ["nan", "inf", "raise"])
def test_drop_policy_masks_failed_samples(kind, caplog):
    x = _images(3)
    with caplog.at_level(logging.WARNING, logger="flowalign.rewards.base"):
        out = call_reward(_failing_reward(kind), x, PROMPTS, on_error="drop")
    assert isinstance(out, CheckedRewardOutput)
    assert out.keep.tolist() == [True, False, True] and out.num_dropped == 1
    expected = x.flatten(1).mean(1)
    assert torch.allclose(out.scores[out.keep], expected[[0, 2]])
    assert torch.isnan(out.scores[1])
    assert any("dropped 1 of 3" in r.getMessage() for r in caplog.records)


def test_wrong_length_under_both_policies():
    reward = _failing_reward("length")
    with pytest.raises(RewardError, match=r"shape \[4\] for 3 prompts"):
        call_reward(reward, _images(3), PROMPTS)
    out = call_reward(reward, _images(3), PROMPTS, on_error="drop")
    assert out.keep.tolist() == [False, False, False] and out.num_dropped == 3
    assert torch.isnan(out.scores).all()


def test_batch_only_failure(caplog):
    reward = _failing_reward("batch_only")
    x = _images(3)
    with pytest.raises(RewardError, match="each prompt alone succeeded"):
        call_reward(reward, x, PROMPTS)
    with caplog.at_level("WARNING"):
        out = call_reward(reward, x, PROMPTS, on_error="drop")
    assert "failed on a batch of 3 but scored each sample alone" in caplog.text  # it said nothing: one call per sample
    assert out.num_dropped == 0 and out.details["scored_one_by_one"]
    assert torch.allclose(out.scores, x.flatten(1).mean(1))


def test_bad_policy_and_healthy_call():
    with pytest.raises(ConfigError, match="on_error"):
        call_reward(load_reward("brightness"), _images(1), ["a"], on_error="ignore")
    out = call_reward(load_reward("brightness"), _images(2), ["a", "b"])
    assert out.keep.all() and out.num_dropped == 0


def test_differentiable_reward_keeps_gradients_through_call_reward():
    x = _images(2).requires_grad_(True)
    out = call_reward(load_reward("brightness"), x, ["a", "b"])
    out.scores.sum().backward()
    # d/dR mean_pixels(0.299 R + 0.587 G + 0.114 B) = 0.299 / (H W)
    hw = x.shape[-1] * x.shape[-2]
    assert torch.allclose(x.grad[:, 0], torch.full_like(x.grad[:, 0], 0.299 / hw))
    assert torch.allclose(x.grad[:, 2], torch.full_like(x.grad[:, 2], 0.114 / hw))


def test_to_and_offload_reach_a_plain_scoring_class_and_its_models():
    """train.offload_rewards did nothing for a plugin scorer that is a plain class holding a model."""
    class RecordingModel(torch.nn.Linear):
        def to(self, device):  # records the moves (a CPU-only machine has nowhere real to move to and back)
            self.moves = getattr(self, "moves", []) + [str(device)]
            return self

    class WithTo:  # a plain class with its own to()
        def __init__(self):
            self.model, self.moves = RecordingModel(3, 1), []

        def to(self, device):
            self.moves.append(str(device))
            return self

        def __call__(self, images, prompts, metadata=None):
            return torch.zeros(len(prompts))

    class ModelOnly(WithTo):  # a plain class without to(): its module attributes move
        to = None

    with_to, model_only = FunctionReward(WithTo()), FunctionReward(ModelOnly())
    for reward in (with_to, model_only):
        reward.to("meta")
        assert reward.device == torch.device("meta")
        reward.offload()
        assert reward.device == torch.device("cpu")
    assert with_to.fn.moves == ["meta", "cpu"]  # its own to(), which moves what it holds
    assert model_only.fn.model.moves == ["meta", "cpu"]
    FunctionReward(lambda images, prompts, metadata=None: torch.zeros(len(prompts))).to("meta")  # a function: only the device


def test_to_and_offload_move_modules():
    class WithModel(Reward):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(3, 1)

    reward = WithModel()
    assert reward.to("meta") is reward
    assert reward.device == torch.device("meta") and reward.model.weight.device.type == "meta"
    other = WithModel().offload()
    assert other.device == torch.device("cpu") and other.model.weight.device.type == "cpu"
    multi = MultiReward({"a": (WithModel(), 1.0), "b": ("brightness", 1.0)})
    multi.to("meta")
    assert multi.rewards["a"].model.weight.device.type == "meta"
    assert multi.rewards["b"].device == torch.device("meta")

    class Recording(WithModel):
        def to(self, device):
            self.log = getattr(self, "log", []) + [str(device)]
            return super().to(device)

    mixed = MultiReward({"a": (Recording(), 1.0), "b": (Recording(), 2.0)})
    mixed.device = torch.device("meta")
    assert mixed.offload() is mixed  # every component goes to the CPU through its own offload
    assert mixed.device == torch.device("cpu")
    assert [mixed.rewards[k].log for k in ("a", "b")] == [["cpu"], ["cpu"]]


# ---------------------------------------------------------------------------------------------
# MultiReward
# ---------------------------------------------------------------------------------------------


def test_multireward_weighted_sum_matches_hand_sum():
    x = _images(4, seed=3)
    prompts = list("abcd")
    multi = MultiReward({"bright": ("brightness", 2.0), "red": (ColorFraction(tolerance=0.6), -0.5)})
    out = call_reward(multi, x, prompts)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    bright = (0.299 * r + 0.587 * g + 0.114 * b).mean(dim=(1, 2))
    red = (((r - 1) ** 2 + g ** 2 + b ** 2).sqrt() <= 0.6).float().mean(dim=(1, 2))
    assert torch.allclose(out.scores, 2.0 * bright - 0.5 * red, atol=1e-6)
    assert torch.allclose(out.details["components"]["bright"], bright, atol=1e-6)
    assert torch.allclose(out.details["components"]["red"], red)
    assert out.details["weights"] == {"bright": 2.0, "red": -0.5}
    assert multi.differentiable is False  # hard colour fraction is not differentiable


def test_multireward_advantage_mode_and_config():
    multi = MultiReward.from_config({"brightness": 1.0, "color_fraction": {"weight": 3.0, "soft": True}}, mode="advantage")
    assert multi.differentiable is True and multi.mode == "advantage"
    out = call_reward(multi, _images(2), ["a", "b"])
    assert out.details["mode"] == "advantage" and set(out.details["components"]) == {"brightness", "color_fraction"}
    advantages = {"brightness": torch.tensor([1.0, -1.0]), "color_fraction": torch.tensor([0.5, 0.25])}
    assert multi.combine(advantages).tolist() == [1.0 + 1.5, -1.0 + 0.75]
    with pytest.raises(ConfigError, match="missing components"):
        multi.combine({"brightness": torch.zeros(2)})


def test_multireward_component_failures():
    nan_reward = _failing_reward("nan")
    multi = MultiReward({"ok": ("brightness", 1.0), "flaky": (nan_reward, 1.0)})
    assert multi.on_error == "raise"
    with pytest.raises(RewardError, match="reward 'flaky'.*'bad'"):
        call_reward(multi, _images(3), PROMPTS)
    multi_drop = MultiReward({"ok": ("brightness", 1.0), "flaky": (nan_reward, 1.0)}, on_error="drop")
    out = call_reward(multi_drop, _images(3), PROMPTS, on_error=multi_drop.on_error)
    assert out.keep.tolist() == [True, False, True] and out.num_dropped == 1
    # per-component policy: only the flaky component drops, a raising one would still raise
    mixed = MultiReward({"ok": ("brightness", 1.0), "flaky": (nan_reward, 1.0, "drop")})
    assert mixed.on_error == "drop" and mixed.policies == {"ok": "raise", "flaky": "drop"}
    out = call_reward(mixed, _images(3), PROMPTS, on_error=mixed.on_error)
    assert out.keep.tolist() == [True, False, True]
    assert torch.isnan(out.details["components"]["flaky"][1]) and torch.isfinite(out.details["components"]["ok"]).all()
    strict = MultiReward({"raising": (_failing_reward("raise"), 1.0), "flaky": (nan_reward, 1.0, "drop")})
    with pytest.raises(RewardError, match="reward 'raising' failed"):
        call_reward(strict, _images(3), PROMPTS, on_error=strict.on_error)


def test_multireward_from_list_config():
    from flowalign.config import RewardConfig

    entries = [RewardConfig(name="brightness", weight=2.0),
               {"name": "color_fraction", "weight": 0.5, "kwargs": {"color": "blue"}, "on_error": "drop"}]
    multi = MultiReward.from_config(entries)
    assert multi.weights == {"brightness": 2.0, "color_fraction": 0.5}
    assert multi.policies == {"brightness": "raise", "color_fraction": "drop"}
    assert multi.rewards["color_fraction"].color == (0.0, 0.0, 1.0)
    x = _images(2)
    expected = 2.0 * Brightness()(x, ["a", "b"]).scores + 0.5 * ColorFraction(color="blue")(x, ["a", "b"]).scores
    assert torch.allclose(multi(x, ["a", "b"]).scores, expected)
    with pytest.raises(ConfigError, match="listed twice; give one of them a 'label'"):
        MultiReward.from_config([{"name": "brightness"}, {"name": "brightness"}])
    # one reward twice under labels (the README's recipe form), as the trainer keys them
    twice = MultiReward.from_config([RewardConfig(name="color_fraction", label="blue", kwargs={"color": "blue"}),
                                     {"name": "color_fraction", "label": "red", "weight": 0.5, "kwargs": {"color": "red"}}])
    assert twice.weights == {"blue": 1.0, "red": 0.5} and twice.rewards["red"].color == (1.0, 0.0, 0.0)
    expected = ColorFraction(color="blue")(x, ["a", "b"]).scores + 0.5 * ColorFraction(color="red")(x, ["a", "b"]).scores
    assert torch.allclose(twice(x, ["a", "b"]).scores, expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rewards": {}}, "at least one"),
        ({"rewards": {"a": ("brightness", float("nan"))}}, "finite"),
        ({"rewards": {"a": "brightness"}}, "tuple"),
        ({"rewards": {"a": ("brightness", 1.0, "skip")}}, "on_error"),
        ({"rewards": {"a": ("brightness", 1.0)}, "mode": "sum"}, "mode"),
    ],
)
def test_multireward_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MultiReward(**kwargs)


# ---------------------------------------------------------------------------------------------
# Built-in rewards against independent computations
# ---------------------------------------------------------------------------------------------


def _pil_jpeg_kb(array_hwc_uint8, quality=95):
    buffer = io.BytesIO()
    Image.fromarray(array_hwc_uint8, mode="RGB").save(buffer, "JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000.0


def test_jpeg_rewards_match_pil_sizes():
    x = _images(3, size=24, seed=5)
    x[0] = 0.5  # a flat image compresses far better than noise
    arrays = np.clip(np.rint(x.numpy() * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    expected = torch.tensor([_pil_jpeg_kb(a) for a in arrays])
    incompressibility = call_reward(JpegIncompressibility(), x, list("abc")).scores
    compressibility = call_reward(load_reward("jpeg_compressibility"), x, list("abc")).scores
    assert torch.allclose(incompressibility, expected)
    assert torch.allclose(compressibility, -expected)
    assert compressibility[0] > compressibility[1]
    expected_q50 = torch.tensor([_pil_jpeg_kb(a, quality=50) for a in arrays])
    assert torch.allclose(JpegCompressibility(quality=50)(x, list("abc")).scores, -expected_q50)
    with pytest.raises(ConfigError, match="quality"):
        JpegCompressibility(quality=0)


def test_jpeg_video_is_mean_over_frames():
    video = torch.rand(1, 2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    frames = np.clip(np.rint(video[0].numpy() * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    expected = (_pil_jpeg_kb(frames[0]) + _pil_jpeg_kb(frames[1])) / 2
    assert call_reward(JpegIncompressibility(), video, ["a"]).scores.item() == pytest.approx(expected)


def test_brightness_hand_values_and_pil():
    x = torch.zeros(1, 3, 1, 2)
    x[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # luma 0.299
    x[0, :, 0, 1] = torch.tensor([0.5, 1.0, 0.25])  # luma 0.1495 + 0.587 + 0.0285 = 0.765
    assert call_reward(Brightness(), x, ["a"]).scores.item() == pytest.approx((0.299 + 0.765) / 2, abs=1e-6)
    y = _images(2, size=16, seed=9)
    arrays = np.clip(np.rint(y.numpy() * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    pil_means = [np.asarray(Image.fromarray(a).convert("L"), dtype=np.float64).mean() / 255.0 for a in arrays]
    assert np.allclose(Brightness()(y, ["a", "b"]).scores.numpy(), pil_means, atol=2 / 255)
    video = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)]).unsqueeze(0)  # [1, 2, 3, 2, 2]
    assert Brightness()(video, ["a"]).scores.item() == pytest.approx(0.5)


def test_color_fraction_hand_values():
    x = torch.zeros(1, 3, 2, 2)
    x[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # red, distance 0
    x[0, :, 0, 1] = torch.tensor([0.8, 0.0, 0.0])  # distance 0.2
    x[0, :, 1, 0] = torch.tensor([0.0, 0.0, 1.0])  # blue, distance sqrt(2)
    x[0, :, 1, 1] = torch.tensor([0.6, 0.3, 0.0])  # distance 0.5
    assert ColorFraction()(x, ["a"]).scores.item() == pytest.approx(0.5)  # tolerance 0.3
    assert ColorFraction(tolerance=0.55)(x, ["a"]).scores.item() == pytest.approx(0.75)
    assert ColorFraction(color="blue")(x, ["a"]).scores.item() == pytest.approx(0.25)
    assert ColorFraction(color=(0.6, 0.3, 0.0), tolerance=0.01)(x, ["a"]).scores.item() == pytest.approx(0.25)
    soft = ColorFraction(soft=True, temperature=0.05)
    assert soft.differentiable and not ColorFraction().differentiable
    expected_soft = torch.sigmoid((0.3 - torch.tensor([0.0, 0.2, 2 ** 0.5, 0.5])) / 0.05).mean()
    xg = x.clone().requires_grad_(True)
    value = soft(xg, ["a"]).scores
    assert value.item() == pytest.approx(expected_soft.item(), abs=1e-5)
    value.sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="unknown colour"):
        ColorFraction(color="mauve")
    with pytest.raises(ConfigError, match="RGB triple"):
        ColorFraction(color=(2.0, 0.0, 0.0))


def test_one_by_one_rescoring_keeps_each_samples_details():
    """After a failed batched call, each sample's own per-sample details are joined back (NaN / None for
    samples that fail alone), so a verifier's verdicts and labels survive one bad prompt."""

    class Verifier(Reward):
        name = "verifier"

        def score(self, images, prompts, metadata):
            if "bad" in prompts:
                raise ValueError("cannot parse 'bad'")
            m = images.flatten(1).mean(1)
            return RewardOutput(scores=m, details={"binary": (m > 0.5).float(), "label": [p.upper() for p in prompts], "note": "batch-level"})

    x = _images(3)
    out = call_reward(Verifier(), x, ["a", "bad", "c"], on_error="drop")
    assert out.keep.tolist() == [True, False, True]
    m = x.flatten(1).mean(1)
    assert out.details["binary"][[0, 2]].tolist() == (m[[0, 2]] > 0.5).float().tolist() and torch.isnan(out.details["binary"][1])
    assert out.details["label"] == ["A", None, "C"]
    assert "note" not in out.details and out.details["scored_one_by_one"]  # not per-sample: left out


def test_a_direct_call_checks_the_number_of_scores_and_leaves_nan_to_the_policy():
    from flowalign.errors import RewardError

    short = load_reward(lambda images, prompts, metadata: [0.1, 0.2, 0.3])
    with pytest.raises(RewardError, match=r"returned scores of shape \[3\] for 4 prompts"):
        short(_images(4), ["a"] * 4)
    column = load_reward(lambda images, prompts, metadata: torch.zeros(4, 1))
    with pytest.raises(RewardError, match=r"shape \[4, 1\]"):
        column(_images(4), ["a"] * 4)
    nan = load_reward(lambda images, prompts, metadata: torch.tensor([0.5, float("nan")]))
    assert torch.isnan(nan(_images(2), ["a", "b"]).scores[1])  # call_reward's on_error decides
    with pytest.raises(RewardError, match="non-finite"):
        call_reward(nan, _images(2), ["a", "b"])


@pytest.mark.parametrize("details, message", [
    ({"binary": torch.ones(5)}, r"details\['binary'\] with 5 values for 4 prompts"),
    ({"binary": ["yes"] * 4}, r"details\['binary'\] that are not numbers"),
    ({"binary": torch.full((4,), 0.5)}, r"details\['binary'\] with values other than 0, 1 \(or NaN\)"),
    ({"partial": [0.1, float("inf"), 0.2, 0.3]}, r"infinite details\['partial'\]"),
    ({"tag": "colors"}, r"details\['tag'\] as str; expected 4 strings"),
    ({"failure": ["correct"] * 3}, r"details\['failure'\] as 3 entries; expected 4 strings"),
    ([1, 2], r"details of type list"),
])
def test_details_that_evaluation_reads_are_checked_where_the_reward_is_called(details, message):
    """A reward's ``binary`` / ``partial`` / ``tag`` / ``failure`` details are checked like its scores, so a malformed one
    fails at the first call naming the reward, not in the held-out report after a whole run."""
    from flowalign.errors import RewardError

    reward = load_reward(lambda images, prompts, metadata: RewardOutput(scores=torch.zeros(len(prompts)), details=details))
    with pytest.raises(RewardError, match=message):
        call_reward(reward, _images(4), ["a"] * 4)
    fine = load_reward(lambda images, prompts, metadata: RewardOutput(
        scores=torch.zeros(len(prompts)), details={"binary": [True, False, 1, float("nan")], "partial": np.array([0.5] * 3 + [np.nan]),
                                                   "tag": ["t"] * 4, "failure": ["correct"] * 4, "objects": "anything"}))
    assert call_reward(fine, _images(4), ["a"] * 4).details["tag"] == ["t"] * 4


def test_a_mixture_names_a_failing_component_by_its_key():
    def broken(images, prompts, metadata):
        raise RuntimeError("no model")

    mix = MultiReward({"aesthetic": (broken, 1.0), "bright": ("brightness", 1.0)})
    with pytest.raises(RewardError, match="reward 'aesthetic' failed"):
        call_reward(mix, _images(2), ["a", "b"])


def test_float64_scores_that_float32_merges_are_named_in_one_warning(monkeypatch, caplog):
    """Rewards are kept in float32: scores 1e8 + 0.25 * i are four values in float64 and one in float32, so every group
    tied and nothing trained, silently. A plain list of floats was even rounded before any check could see it."""
    monkeypatch.setattr(reward_base, "_WARNED_FLOAT32_MERGES", set())
    assert reward_base.float32_merges(torch.tensor([1e8, 1e8 + 0.25, 1e8 + 0.5, 1e8 + 0.75], dtype=torch.float64)) == 3
    assert reward_base.float32_merges(torch.tensor([0.1, 0.1 + 1e-6, float("nan")], dtype=torch.float64)) == 0
    assert reward_base.float32_merges(torch.tensor([1e7, 1e7 + 0.25], dtype=torch.float32)) == 0
    images = torch.rand(4, 3, 8, 8)
    def offset_scores(images, prompts, metadata=None):
        return [1e8 + 0.25 * i for i in range(len(prompts))]

    offset = load_reward(offset_scores)
    small = load_reward(lambda images, prompts, metadata=None: [0.25 * i for i in range(len(prompts))])
    with caplog.at_level(logging.WARNING, logger="flowalign.rewards.base"):
        call_reward(small, images, ["a"] * 4)
        assert not caplog.records
        for _ in range(3):
            out = call_reward(offset, images, ["a"] * 4)
    assert out.scores.dtype == torch.float32
    merged = [r.getMessage() for r in caplog.records if "float32" in r.getMessage()]
    assert len(merged) == 1 and "'offset_scores'" in merged[0] and "3 of a batch's distinct float64 scores" in merged[0], merged


def test_call_reward_batched_joins_chunks_as_one_call():
    """Chunks of at most batch_size samples: scores, keep mask, dropped count and details as the whole batch's."""
    from flowalign.rewards import call_reward, call_reward_batched, join_details

    calls = []

    def reward(images, prompts, metadata):
        calls.append(len(prompts))
        scores = images.mean(dim=(1, 2, 3))
        scores = torch.where(torch.tensor(["bad" in p for p in prompts]), torch.full_like(scores, float("nan")), scores)
        return scores, {"per_sample": scores * 2, "tags": [m["tag"] for m in metadata], "scale": 2.0,
                        "nested": {"twice": scores.clone()}, "summary": torch.tensor(1.0)}

    images = torch.rand(7, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    prompts = ["a", "b", "bad c", "d", "e", "bad f", "g"]
    metadata = [{"tag": f"t{i}"} for i in range(7)]
    whole = call_reward(reward, images, prompts, metadata, on_error="drop")
    calls.clear()
    done = []
    out = call_reward_batched(reward, images, prompts, metadata, on_error="drop", batch_size=3, progress=done.append)
    assert calls == [3, 3, 1] and done == [3, 3, 1]
    assert torch.equal(out.scores.isnan(), whole.scores.isnan()) and torch.allclose(out.scores.nan_to_num(), whole.scores.nan_to_num())
    assert torch.equal(out.keep, whole.keep) and out.num_dropped == whole.num_dropped == 2
    assert torch.allclose(out.details["per_sample"].nan_to_num(), whole.details["per_sample"].nan_to_num())
    assert out.details["tags"] == [f"t{i}" for i in range(7)] and out.details["scale"] == 2.0
    assert torch.allclose(out.details["nested"]["twice"].nan_to_num(), whole.scores.nan_to_num())
    assert "summary" not in out.details  # one value per chunk, not per sample: not joinable
    calls.clear()
    assert torch.allclose(call_reward_batched(reward, images, prompts, metadata, on_error="drop", batch_size=7).scores.nan_to_num(),
                          whole.scores.nan_to_num()) and calls == [7]  # one chunk: one call
    with pytest.raises(RewardError, match="non-finite scores for 1 of 3 prompts"):  # each chunk under the policy
        call_reward_batched(reward, images, prompts, metadata, on_error="raise", batch_size=3)
    assert join_details([{"a": [1], "b": 1}, {"a": [2, 3], "b": 2}], [1, 2]) == {"a": [1, 2, 3]}  # differing constants: left out


def test_call_reward_batched_checks_the_counts_before_it_chunks():
    from flowalign.rewards import call_reward_batched

    reward = lambda images, prompts, metadata: images.mean(dim=(1, 2, 3))  # noqa: E731
    for batch_size in (None, 2):
        with pytest.raises(RewardError, match="3 prompts for 4 images"):
            call_reward_batched(reward, torch.rand(4, 3, 4, 4), ["a", "b", "c"], batch_size=batch_size)


def test_a_chunk_whose_every_sample_failed_keeps_the_batchs_detail_keys():
    """join_details kept only keys every chunk had, and a chunk whose samples all failed has none: under batch_size 2
    the verifier's binary / partial / tag / failure vanished for the whole batch (a store then lost shapes/partial)."""
    from flowalign.rewards import call_reward_batched
    from flowalign.rewards.shapes import ShapesReward

    class Flaky(ShapesReward):
        def score(self, images, prompts, metadata):
            if any("blue" in p for p in prompts):
                raise RuntimeError("flaky")
            return super().score(images, prompts, metadata)

    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a green square", "a blue circle", "a blue square"]
    whole = call_reward_batched(Flaky(), images, prompts, on_error="drop")
    chunked = call_reward_batched(Flaky(), images, prompts, on_error="drop", batch_size=2)
    assert {"binary", "partial", "tag", "failure"} <= set(chunked.details) & set(whole.details)
    for key in ("binary", "partial"):
        torch.testing.assert_close(torch.as_tensor(chunked.details[key]).float(), torch.as_tensor(whole.details[key]).float(), equal_nan=True)
    assert chunked.keep.tolist() == whole.keep.tolist() == [True, True, False, False]


def test_a_functions_kwargs_reach_it_whatever_their_names_and_its_version_is_recorded(write_plugin):
    """FunctionReward took name / fn from the kwargs (TypeError: multiple values) and kept device / differentiable for
    itself, so a function with a `device` argument ran with its default; its `version` was not carried over."""
    from flowalign.rewards import call_reward, load_reward

    module = write_plugin('''
        import torch

        def scorer(images, prompts, metadata, name="default", device="cpu", fn=1):
            return torch.full((len(prompts),), float(len(name) + 10 * fn)), {"device": [device] * len(prompts)}

        scorer.version = "7"
    ''')
    reward = load_reward(f"{module}:scorer", name="custom", device="cuda:7", fn=2)
    out = call_reward(reward, torch.rand(2, 3, 8, 8), ["a", "b"])
    assert out.scores.tolist() == [26.0, 26.0] and out.details["device"] == ["cuda:7", "cuda:7"]
    assert reward.version == "7" and reward.name == f"{module}:scorer"


def test_a_plugin_that_exits_at_import_or_is_not_callable_is_one_config_error(write_plugin):
    """A reward module calling sys.exit at import (a top-level argparse) ended `flowalign train` silently with its exit
    code; a non-callable attribute passed `flowalign config` and `reward list` described int's docstring."""
    from flowalign.rewards import check_reward_spec, load_reward

    exits = write_plugin("import sys\nsys.exit(3)\n")
    with pytest.raises(ConfigError, match=r"importing it called exit\(3\)"):
        load_reward(f"{exits}:f")
    plain = write_plugin("NOT_CALLABLE = 3\n")
    with pytest.raises(ConfigError, match="resolved to int, which is neither a Reward nor callable"):
        check_reward_spec(f"{plain}:NOT_CALLABLE")


def test_a_reward_editing_a_records_nested_spec_leaves_the_record_alone():
    from flowalign.rewards import call_reward

    def greedy(images, prompts, metadata):
        metadata[0]["include"].pop()
        return torch.zeros(len(prompts))

    records = [{"include": [{"shape": "circle"}]}]
    call_reward(greedy, torch.rand(1, 3, 8, 8), ["a circle"], records)
    assert records == [{"include": [{"shape": "circle"}]}]


def test_float64_scores_beyond_float32s_range_are_named_not_dropped_as_non_finite():
    from flowalign.rewards import call_reward

    def logit_sum(images, prompts, metadata):
        return torch.full((len(prompts),), 1e39, dtype=torch.float64)

    with pytest.raises(RewardError, match="beyond float32's range"):
        call_reward(logit_sum, torch.rand(2, 3, 8, 8), ["a", "b"], on_error="raise")
