"""The shipped toy model (assets/toy) and its build script (flowalign.pipelines.toy)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flowalign.assets
from flowalign.pipelines import toy
from flowalign.rewards import shapes_scenes as S
from flowalign.rewards.shapes import ShapesReward

TOY = Path(flowalign.assets.__file__).resolve().parent / "toy"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    p = StableDiffusion3Pipeline.from_pretrained(TOY, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def test_shipped_folder_files_and_size():
    files = [f for f in TOY.rglob("*") if f.is_file()]
    assert (TOY / "model_index.json").is_file()
    assert {f.suffix for f in files} <= {".json", ".txt", ".safetensors"}, sorted({f.suffix for f in files})
    total = sum(f.stat().st_size for f in files)
    assert total <= 25 * 2**20, f"toy model is {total / 2**20:.1f} MiB"
    index = json.loads((TOY / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]  # the zero-output placeholder
    meta = toy.load_toy_meta(TOY)
    assert meta["max_sequence_length"] == toy.T5_TOKENS and meta["height"] == 32


def test_placeholder_t5_outputs_zeros_like_no_t5(pipe):
    ids = pipe.tokenizer_3(["a red circle", "four cyan squares"], padding="max_length", max_length=5, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder_3(ids)[0]
    assert out.shape == (2, 5, pipe.transformer.config.joint_attention_dim)
    assert torch.count_nonzero(out) == 0  # what SD3 feeds when text_encoder_3 is None


def test_tokenizers_fit_every_caption(pipe):
    captions = [s["prompt"] for t in S.TAGS for s in S.all_specs(t)]
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        lengths = [len(tok(c).input_ids) for c in captions]
        assert max(lengths) == tok.model_max_length  # the shortest context that fits all
    # the placeholder T5's tokenizer must hold every caption too (the pipeline keeps T5_TOKENS of them),
    # else transformers warns on every load that the ids "will result in indexing errors"
    assert max(len(pipe.tokenizer_3(c).input_ids) for c in captions) <= pipe.tokenizer_3.model_max_length


def test_samples_fast_and_verifiable(pipe):
    specs = S.load_prompts("train")[::6][:64]
    prompts = [s["prompt"] for s in specs]
    meta = toy.load_toy_meta(TOY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU: one thread avoids oversubscription
    try:
        start = time.perf_counter()
        images = toy.sample(pipe, prompts, seed=0, steps=10, guidance_scale=meta["guidance_scale"])
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert images.shape == (64, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert elapsed < 60, f"64 samples (10 steps, CFG) took {elapsed:.1f}s"  # ~3 s on an idle core
    again = toy.sample(pipe, prompts[:4], seed=0, steps=10, guidance_scale=meta["guidance_scale"])
    assert torch.allclose(again, images[:4], atol=1e-5)  # same seed, same noise -> same images
    acc = ShapesReward()(images, prompts, specs).scores.mean().item()
    # the shipped model scores ~0.2-0.25; an untrained one ~0.01 (measured on a smoke build)
    assert acc >= 0.1, f"training-prompt accuracy {acc:.2f}: the model draws no recognisable shapes"


def test_smoke_build_loads_and_is_deterministic(tmp_path, toy_smoke):
    from diffusers import StableDiffusion3Pipeline

    summaries = [toy.build(tmp_path / name, toy.ToyBuildConfig(seed=1, **toy_smoke)) for name in ("a", "b")]
    assert summaries[0]["params"] == summaries[1]["params"]
    for sub in ("transformer/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model", "text_encoder_2/model"):
        a, b = load_file(tmp_path / "a" / f"{sub}.safetensors"), load_file(tmp_path / "b" / f"{sub}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    other = toy.build(tmp_path / "c", toy.ToyBuildConfig(seed=2, **toy_smoke))
    a = load_file(tmp_path / "a" / "transformer/diffusion_pytorch_model.safetensors")
    c = load_file(tmp_path / "c" / "transformer/diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert other["clip_max_length"] == summaries[0]["clip_max_length"]
    # what the bits depend on besides seed and flags is recorded, in the summary and next to the weights
    built_with = summaries[0]["built_with"]
    assert built_with["torch"] == torch.__version__ and built_with["threads"] == min(torch.get_num_threads(), toy.ToyBuildConfig().threads)
    assert set(built_with) == {"torch", "diffusers", "transformers", "numpy", "python", "threads", "commit"}
    assert toy.load_toy_meta(tmp_path / "a")["built_with"] == built_with
    p = StableDiffusion3Pipeline.from_pretrained(tmp_path / "a", local_files_only=True)
    p.set_progress_bar_config(disable=True)
    out = toy.sample(p, ["a red circle", "two squares"], seed=0, steps=2, guidance_scale=2.0)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_cli_smoke_build(tmp_path, toy_smoke):
    rc = toy.main(["build", "--out", str(tmp_path / "m"), "--summary", str(tmp_path / "s.json"), "--n-scenes", "32", "--vae-steps", "1",
                   "--dit-steps", "1", "--dit-batch", "4", "--dit-layers", "1", "--dit-heads", "2", "--caption-noise", "0.5", "--pretrain-heldout", "--eval-samples", "0",
                   "--color-synonyms", "blue:cyan,red:purple", "--synonym-rate", "1.0", "--clip-hidden", "8,12"])
    assert rc == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["config"]["dit_steps"] == 1 and (tmp_path / "m" / "model_index.json").is_file()
    assert summary["config"]["caption_noise"] == 0.5 and 4 <= summary["noisy_captions"] <= 28  # ~16 of 32 captions
    assert summary["config"]["pretrain_heldout"] is True
    assert summary["config"]["color_synonyms"] == "blue:cyan,red:purple" and summary["config"]["synonym_rate"] == 1.0
    assert 0 < summary["synonym_captions"] < 32  # captions naming blue, cyan, red or purple (some swaps are blocked)
    with pytest.raises(ValueError, match="uncaptioned_heldout needs pretrain_heldout"):
        toy.ToyBuildConfig(seed=1, uncaptioned_heldout=True, **toy_smoke)  # refused before any scene is rendered
    assert json.loads((tmp_path / "m" / "transformer" / "config.json").read_text())["num_attention_heads"] == 2
    assert summary["config"]["clip_hidden"] == [8, 12]
    assert json.loads((tmp_path / "m" / "text_encoder_2" / "config.json").read_text())["hidden_size"] == 12
    assert json.loads((tmp_path / "m" / "transformer" / "config.json").read_text())["joint_attention_dim"] == 20
    with pytest.raises(SystemExit):
        toy.main(["build", "--clip-hidden", "16"])  # argparse: two sizes or a usage error


def test_frozen_text_encoders_keep_their_seeded_init(tmp_path, toy_smoke):
    """--frozen-text-encoders: both CLIP encoders are saved exactly as build_pipeline initialised
    them (an independent fresh init with the same seed), while the transformer still trains."""
    cfg = toy.ToyBuildConfig(seed=1, frozen_text_encoders=True, **toy_smoke)
    toy.build(tmp_path / "f", cfg)
    fresh = toy.build_pipeline(cfg, toy.build_vae(cfg), max_length=11)
    for name in ("text_encoder", "text_encoder_2"):
        saved = load_file(tmp_path / "f" / name / "model.safetensors")
        init = getattr(fresh, name).state_dict()
        assert all(torch.equal(saved[k], init[k]) for k in saved), name
    saved = load_file(tmp_path / "f" / "transformer" / "diffusion_pytorch_model.safetensors")
    init = fresh.transformer.state_dict()
    assert not all(torch.equal(saved[k], init[k]) for k in saved)  # the transformer did learn


def test_evaluate_toy_measures_a_folder(tmp_path, pipe):
    """`python -m flowalign.pipelines.toy evaluate` on the shipped toy at 1 step (the build's summary uses 10)."""
    out = toy.evaluate_toy(TOY, guidance_scales=(4.5,), shifts=(1.5,), n_samples=8, steps=1, n_groups=2, group_size=2, grid_dir=tmp_path)
    assert list(out["sweep_heldout_320"]) == ["shift=1.5,cfg=4.5"] and (out["shift"], out["guidance_scale"]) == (1.5, 4.5)
    assert out["heldout_samples"] == 8 and set(out["train_accuracy"]) == {"overall", *{s["tag"] for s in S.load_prompts("train")}}
    assert out["sample_seconds_batch64_1steps_cfg"] > 0
    assert out["folder_bytes"] == sum(out["file_bytes"].values()) and out["params"]["transformer"] > 0
    for name in ("seeds_ode", "flow_sde_0.7"):  # 2 groups of 2: a fraction in {0, 0.5, 1}
        assert out[f"zero_variance_groups_{name}"] in (0.0, 0.5, 1.0)
    assert {p.name for p in tmp_path.iterdir()} == {"heldout_grid.png", "heldout_grid.txt", "sde_groups_grid.png"}
    # the grid's verdicts are the verifier's on the same samples (seed + 3, the shipped shift 1.5): re-score them here
    lines = (tmp_path / "heldout_grid.txt").read_text().splitlines()
    held = S.load_prompts("heldout")[::5]
    assert len(lines) == len(held) and all(line.startswith(f"{k}: {s['prompt']} -> ") for k, (line, s) in enumerate(zip(lines, held)))
    assert pipe.scheduler.config.shift == 1.5
    scores = ShapesReward()(toy.sample(pipe, [s["prompt"] for s in held], 3, 1, 4.5), [s["prompt"] for s in held], held).scores
    assert [int(line.split(" -> ")[1].split()[0]) for line in lines] == [int(v) for v in scores]


def test_the_toy_loads_by_its_assets_path_from_any_directory(tmp_path, monkeypatch):
    # `python -m flowalign.pipelines.toy evaluate` (default --model assets/toy) failed outside the repository root
    monkeypatch.chdir(tmp_path)
    pipe = toy.load_toy_pipeline("assets/toy")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
