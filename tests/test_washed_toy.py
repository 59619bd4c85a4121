"""Washed-out renditions in the toy's pretraining data and continued builds (``--init-from``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowalign.pipelines import toy
from flowalign.rewards import shapes_scenes as S
from flowalign.rewards.shapes import detect, evaluate


@pytest.fixture(scope="module")
def base_toy(tmp_path_factory, toy_smoke):
    """A smoke-sized toy folder to continue from."""
    folder = tmp_path_factory.mktemp("base_toy")
    toy.build(folder, toy.ToyBuildConfig(seed=1, **toy_smoke))
    return folder


@pytest.fixture
def continued(toy_smoke) -> dict:
    """The smoke sizes a continued build may set (it takes the folder's architecture)."""
    return {k: v for k, v in toy_smoke.items() if k not in toy.ARCHITECTURE_FIELDS}


def test_washed_renditions_blend_the_chosen_scenes_toward_the_background():
    images = np.zeros((5, 2, 2, 3), np.uint8)
    images[..., 0] = 238  # a red-ish pixel on each channel pattern: (238, 0, 0) against background (238, 238, 238)
    out, mask = S.washed_renditions(images, 1.0, 0.25, seed=0)
    assert mask.all()
    # b + 0.25 (p - b): red channel 238 + 0.25 * 0 = 238; green / blue 238 + 0.25 * (0 - 238) = 178.5 -> 178 (round half to even)
    assert out[0, 0, 0].tolist() == [238, 178, 178]
    same, none = S.washed_renditions(images, 0.0, 0.25, seed=0)
    assert not none.any() and np.array_equal(same, images) and same is not images
    a, ma = S.washed_renditions(np.repeat(images, 400, 0), 0.3, 0.25, seed=3)
    b, mb = S.washed_renditions(np.repeat(images, 400, 0), 0.3, 0.25, seed=3)
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and 0.25 < ma.mean() < 0.35
    assert np.array_equal(a[~ma], np.repeat(images, 400, 0)[~ma])  # untouched scenes stay bit-exact
    with pytest.raises(ValueError, match="washed fraction"):
        S.washed_renditions(images, 1.5, 0.25, seed=0)
    with pytest.raises(ValueError, match="uint8 images"):
        S.washed_renditions(images[0], 0.5, 0.25, seed=0)


def test_the_verifier_sees_no_objects_in_washed_scenes_and_every_one_in_the_rest():
    images, specs = S.training_scenes(4, 60)
    washed, mask = S.washed_renditions(images, 0.5, 0.25, seed=1)
    assert 0 < mask.sum() < 60
    for image, spec, w in zip(washed.astype(np.float32), specs, mask):
        objects = detect(image)
        if w:
            assert objects == [], spec["prompt"]
        else:
            assert evaluate(objects, spec)[0], spec["prompt"]


def test_continued_build_keeps_the_vae_and_moves_the_transformer(tmp_path, base_toy, continued):
    summary = toy.build(tmp_path / "cont", toy.ToyBuildConfig(seed=1, init_from=str(base_toy), washed_fraction=0.5, **continued))
    assert summary["init_from"] == str(base_toy) and 16 <= summary["washed_scenes"] <= 48
    for sub, same in (("vae/diffusion_pytorch_model", True), ("transformer/diffusion_pytorch_model", False), ("text_encoder/model", False)):
        a, b = load_file(base_toy / f"{sub}.safetensors"), load_file(tmp_path / "cont" / f"{sub}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a) is same, sub
    again = toy.build(tmp_path / "again", toy.ToyBuildConfig(seed=1, init_from=str(base_toy), washed_fraction=0.5, **continued))
    assert again["washed_scenes"] == summary["washed_scenes"]
    a = load_file(tmp_path / "cont" / "transformer/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "again" / "transformer/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic
    assert toy.load_toy_meta(tmp_path / "cont")["max_sequence_length"] == toy.T5_TOKENS


def test_continued_build_keeps_the_sources_sampling_settings_in_scheduler_and_metadata(tmp_path, toy_smoke, continued):
    """A continued build wrote the CLI's default shift / guidance into flowalign_toy.json while the scheduler kept the
    source's: plain diffusers and flowalign then sampled the same folder with different shifts."""
    source = tmp_path / "src"
    toy.build(source, toy.ToyBuildConfig(seed=1, shift=3.0, guidance_scale=3.0, **toy_smoke))
    toy.build(tmp_path / "cont", toy.ToyBuildConfig(seed=1, init_from=str(source), **continued))
    meta = toy.load_toy_meta(tmp_path / "cont")
    scheduler = json.loads((tmp_path / "cont" / "scheduler" / "scheduler_config.json").read_text())
    assert meta["shift"] == scheduler["shift"] == 3.0 and meta["guidance_scale"] == 3.0
    # an explicit new shift goes into both
    toy.build(tmp_path / "moved", toy.ToyBuildConfig(seed=1, init_from=str(source), shift=2.0, **continued))
    scheduler = json.loads((tmp_path / "moved" / "scheduler" / "scheduler_config.json").read_text())
    assert toy.load_toy_meta(tmp_path / "moved")["shift"] == scheduler["shift"] == 2.0


def test_continued_build_refuses_architecture_changes_and_missing_folders(tmp_path):
    with pytest.raises(ValueError, match="its own architecture.*dit_layers"):
        toy.ToyBuildConfig(init_from="assets/toy", dit_layers=2)
    with pytest.raises(ValueError, match="washed_fraction"):
        toy.ToyBuildConfig(washed_fraction=-0.1)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        toy.build(tmp_path / "x", toy.ToyBuildConfig(seed=1, init_from=str(tmp_path / "nowhere"), n_scenes=8, eval_samples=0, dit_steps=1))


def test_cli_passes_the_washed_and_init_flags(tmp_path, base_toy):
    base = base_toy
    rc = toy.main(["build", "--out", str(tmp_path / "m"), "--n-scenes", "32", "--dit-steps", "1", "--dit-batch", "4", "--eval-samples", "0",
                   "--init-from", str(base), "--washed-fraction", "0.5", "--washed-alpha", "0.3", "--summary", str(tmp_path / "s.json")])
    assert rc == 0
    import json

    cfg = json.loads((tmp_path / "s.json").read_text())["config"]
    assert cfg["init_from"] == str(base) and cfg["washed_fraction"] == 0.5 and cfg["washed_alpha"] == 0.3
