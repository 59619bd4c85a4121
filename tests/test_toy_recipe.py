"""The default recipe (train/configs/toy_grpo.yaml) and how the trainer loads a toy folder.

``build_adapter`` must read ``flowalign_toy.json`` next to a toy pipeline: the toy model is
trained with 1 zero "T5" token, so SD3's default ``max_sequence_length=256`` would feed it
255 extra tokens it never saw.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowalign.config import ModelConfig, load_config
from flowalign.sde import make_schedule
from flowalign.train.model import TOY_META_FILE, build_adapter, resolve_path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "train" / "configs" / "toy_grpo.yaml"


@pytest.fixture(scope="module")
def toy_like_folder(tmp_path_factory):
    """The tiny SD3 pipeline saved as a folder with a toy metadata file (7 T5 tokens, shift 2)."""
    from flowalign.pipelines.testing import tiny_sd3_pipeline

    folder = tmp_path_factory.mktemp("toy_like")
    tiny_sd3_pipeline(seed=0, shift=3.0).save_pretrained(folder, safe_serialization=True)
    (folder / TOY_META_FILE).write_text(json.dumps({"max_sequence_length": 7, "guidance_scale": 4.5, "shift": 2.0,
                                                    "num_inference_steps": 10}))
    return folder


def test_build_adapter_applies_the_toy_metadata(toy_like_folder):
    adapter = build_adapter(ModelConfig(pretrained=str(toy_like_folder)), torch.device("cpu"))
    assert adapter.max_sequence_length == 7
    assert adapter.pipeline.scheduler.config.shift == 2.0
    cond = adapter.encode(["a red circle and a blue square"], do_classifier_free_guidance=True)
    # 77 CLIP tokens + 7 T5 tokens, for the prompt and the empty negative prompt
    assert cond.cond["encoder_hidden_states"].shape[1] == 77 + 7
    assert cond.uncond["encoder_hidden_states"].shape[1] == 77 + 7
    # diffusers' FlowMatchEulerDiscreteScheduler with shift s = 2: t = linspace(1, sigma_min, K) with
    # sigma_min = shift(1/1000), then sigma = shift(t), shift(u) = s u / (1 + (s - 1) u)
    shift = lambda u: 2 * u / (1 + u)  # noqa: E731
    t = torch.linspace(1.0, shift(torch.tensor(1.0 / 1000)).item(), 4)
    expected = torch.cat([shift(t), torch.zeros(1)])
    torch.testing.assert_close(adapter.sigmas(4), expected, atol=1e-5, rtol=0)


def test_load_adapter_on_a_toy_folder_applies_its_metadata_too(toy_like_folder):
    # the public loader and the trainer's must give the same model from one folder; explicit kwargs still win
    from flowalign.pipelines import load_adapter

    adapter = load_adapter(toy_like_folder)
    assert adapter.max_sequence_length == 7 and adapter.pipeline.scheduler.config.shift == 2.0
    assert load_adapter(toy_like_folder, max_sequence_length=9).max_sequence_length == 9


def test_build_adapter_without_metadata_keeps_the_pipeline_defaults(toy_like_folder, tmp_path):
    plain = tmp_path / "plain"
    for item in toy_like_folder.iterdir():
        if item.name != TOY_META_FILE:
            target = plain / item.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(item, target_is_directory=item.is_dir())
    adapter = build_adapter(ModelConfig(pretrained=str(plain)), torch.device("cpu"))
    assert adapter.max_sequence_length == 256 and adapter.pipeline.scheduler.config.shift == 3.0


def test_default_recipe_is_the_toy_main_job():
    cfg = load_config(RECIPE)
    assert cfg.model.pretrained == "toy"
    assert cfg.rewards[0].name == "shapes"  # the held-out report scores with the first reward
    assert resolve_path(cfg.train.prompts).name == "shapes_train.jsonl" and resolve_path(cfg.train.prompts).is_file()
    assert resolve_path(cfg.train.eval_prompts).name == "shapes_heldout.jsonl" and resolve_path(cfg.train.eval_prompts).is_file()
    assert cfg.train.final_eval_samples >= 512
    assert cfg.objective.cfg_in_training and cfg.sampling.guidance_scale > 1.0 and cfg.objective.kl_beta == 0.0
    # one optimizer step per iteration: one micro-batch of every sample at each trained step
    assert cfg.train.micro_batch_size == cfg.train.prompts_per_iter * cfg.sampling.group_size
    levels = make_schedule(cfg.sampling.noise_schedule, **cfg.sampling.noise_kwargs).levels(cfg.sampling.num_steps)
    stochastic = int((levels[:-1] > 0).sum())  # the last step lands on sigma = 0: never stochastic
    assert stochastic >= 1
    trained_steps = max(1, int(stochastic * cfg.objective.timestep_fraction))
    assert cfg.train.grad_accum == trained_steps and cfg.train.inner_epochs == 1
    toy = resolve_path("assets/toy")
    if (toy / TOY_META_FILE).is_file():  # sampling follows the toy's recommended settings
        meta = json.loads((toy / TOY_META_FILE).read_text())
        assert cfg.sampling.guidance_scale == meta["guidance_scale"]
        assert cfg.sampling.num_steps == cfg.sampling.eval_num_steps == meta["num_inference_steps"]


def test_build_adapter_loads_in_the_configured_dtype_without_deprecation_warnings(toy_like_folder):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = build_adapter(ModelConfig(pretrained=str(toy_like_folder), dtype="bfloat16"), torch.device("cpu"))
    assert adapter.pipeline.transformer.dtype == torch.bfloat16 and adapter.pipeline.text_encoder.dtype == torch.bfloat16
    deprecated = [str(w.message) for w in caught if issubclass(w.category, FutureWarning) and "dtype" in str(w.message)]
    assert not deprecated, deprecated
