"""SD3Adapter against the real StableDiffusion3Pipeline it wraps (tiny offline pipeline)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from flowalign.pipelines import Adapter, Conditioning, known_families, load_adapter
from flowalign.pipelines.sd3 import SD3Adapter
from flowalign.pipelines.testing import tiny_sd3_pipeline

PROMPTS = ["a red square", "two blue circles"]


@pytest.fixture(scope="module")
def adapter(pipe):
    return load_adapter(pipe)


def _euler_reference(adapter, prompts, x, num_steps, w):
    """Plain Euler loop written against the adapter protocol only."""
    cond = adapter.encode(prompts, do_classifier_free_guidance=w > 1)
    sigmas = adapter.sigmas(num_steps)
    with torch.no_grad():
        for i in range(num_steps):
            x = x + (sigmas[i + 1] - sigmas[i]) * adapter.velocity(x, float(sigmas[i]), cond, w)
    return adapter.decode(x)


def test_load_adapter_picks_sd3_and_satisfies_protocol(adapter):
    assert isinstance(adapter, SD3Adapter)
    assert isinstance(adapter, Adapter)
    assert known_families()["StableDiffusion3Pipeline"] == "sd3"
    assert adapter.latent_shape == (4, 16, 16)
    assert adapter.trainable_module is adapter.pipeline.transformer


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_euler_through_adapter_reproduces_pipeline(pipe, adapter, guidance_scale):
    x = adapter.initial_noise(2, torch.Generator().manual_seed(3))
    ref = pipe(PROMPTS, latents=x.clone(), num_inference_steps=5, guidance_scale=guidance_scale, output_type="pt").images
    ours = _euler_reference(adapter, PROMPTS, x, 5, guidance_scale)
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert (ours - ref).abs().max() <= 1e-4
    # the comparison can fail: a different guidance scale gives different images
    other = _euler_reference(adapter, PROMPTS, x, 5, guidance_scale + 2.0)
    assert (other - ref).abs().max() > 1e-3


def test_ode_rollout_reproduces_a_bfloat16_pipeline_exactly():
    # in bf16 the scheduler takes dt·v in the model's dtype; the rollout must do the same, not an fp32 product
    from flowalign.sampling import sample_ode

    pipe = tiny_sd3_pipeline().to(torch.bfloat16)
    adapter = load_adapter(pipe)
    x = adapter.initial_noise(2, torch.Generator().manual_seed(3))
    ref = pipe(PROMPTS, latents=x.clone(), num_inference_steps=6, guidance_scale=4.5, output_type="latent").images
    ours = sample_ode(adapter, PROMPTS, num_steps=6, guidance_scale=4.5, initial_noise=x.clone(), decode=False)
    assert ours.dtype == ref.dtype == torch.bfloat16 and torch.equal(ours, ref)


def test_initial_noise_is_the_pipelines_draw(pipe, adapter):
    x = adapter.initial_noise(2, torch.Generator().manual_seed(11))
    with_latents = pipe(PROMPTS, latents=x, num_inference_steps=2, guidance_scale=1.0, output_type="pt").images
    with_generator = pipe(PROMPTS, generator=torch.Generator().manual_seed(11), num_inference_steps=2, guidance_scale=1.0, output_type="pt").images
    assert torch.equal(with_latents, with_generator)


@pytest.mark.parametrize("dynamic", [False, True])
def test_sigmas_are_the_schedulers(dynamic):
    p = tiny_sd3_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    if dynamic:
        p.scheduler = type(p.scheduler).from_config(p.scheduler.config, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    ad = load_adapter(p)
    p(["x"], num_inference_steps=6, guidance_scale=1.0, output_type="latent")
    sigmas = ad.sigmas(6)
    assert sigmas.shape == (7,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    torch.testing.assert_close(sigmas, p.scheduler.sigmas.float(), rtol=0, atol=0)
    # static SD3 shift by hand: s = shift*t / (1 + (shift-1)*t), t = linspace(1, t_min, K) where
    # diffusers' t_min is the shifted smallest training sigma, shift(1/1000)
    if not dynamic:
        t = torch.linspace(1.0, 3e-3 / (1 + 2e-3), 6, dtype=torch.float64)
        torch.testing.assert_close(sigmas[:-1].double(), 3 * t / (1 + 2 * t), rtol=1e-6, atol=1e-6)


def test_encode_and_velocity_shapes_and_cfg_formula(adapter):
    cond = adapter.encode(PROMPTS)
    assert isinstance(cond, Conditioning) and cond.uncond is not None
    assert cond.cond["encoder_hidden_states"].shape == (2, 77 + 256, 64)
    assert cond.cond["pooled_projections"].shape == (2, 64)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v_c = adapter.velocity(x, 0.7, Conditioning(cond.cond), 1.0)
        v_u = adapter.velocity(x, 0.7, Conditioning(cond.uncond), 1.0)
        v = adapter.velocity(x, 0.7, cond, 3.0)
        v_vec = adapter.velocity(x, torch.tensor([0.7, 0.7]), cond, 3.0)
        v_mixed = adapter.velocity(x, torch.tensor([0.7, 0.2]), cond, 3.0)
        v_02 = adapter.velocity(x[1:], 0.2, cond.select(slice(1, 2)), 3.0)
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_vec, v, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(v_mixed[1:], v_02, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unconditional"):
        adapter.velocity(x, 0.7, Conditioning(cond.cond), 3.0)
    with pytest.raises(ValueError, match="sigma"):
        adapter.velocity(x, torch.tensor([0.1, 0.2, 0.3]), cond, 1.0)


def test_max_sequence_length_is_configurable(pipe):
    ad = load_adapter(pipe, max_sequence_length=32)
    assert ad.encode(["a"], do_classifier_free_guidance=False).cond["encoder_hidden_states"].shape == (1, 77 + 32, 64)


def test_decode_matches_vae_by_hand(adapter):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    vae = adapter.pipeline.vae
    with torch.no_grad():
        by_hand = vae.decode(z / 1.5035 + 0.0609).sample
    torch.testing.assert_close(adapter.decode(z), (by_hand / 2 + 0.5).clamp(0, 1))


def test_lora_targets_attach_and_save_lora_round_trips(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    p = tiny_sd3_pipeline(seed=1)
    p.set_progress_bar_config(disable=True)
    ad = load_adapter(p)
    ad.trainable_module.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=ad.lora_target_modules))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peft starts lora_B at 0; give it weights so the LoRA changes the output
        for name, param in ad.trainable_module.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    state = get_peft_model_state_dict(ad.trainable_module)
    n_layers = p.transformer.config.num_layers
    # 8 targets per joint block, except the last block's context path (context_pre_only: no to_add_out)
    assert len(state) == 2 * (8 * n_layers - 1)
    path = ad.save_lora(tmp_path, state)
    assert path.name == "pytorch_lora_weights.safetensors" and path.is_file()
    x = ad.initial_noise(1, torch.Generator().manual_seed(0))
    cond = ad.encode(["a"], do_classifier_free_guidance=False)
    with torch.no_grad():
        v_lora = ad.velocity(x, 0.5, cond, 1.0)
    fresh = tiny_sd3_pipeline(seed=1)
    fresh_ad = load_adapter(fresh)
    with torch.no_grad():
        v_base = fresh_ad.velocity(x, 0.5, cond, 1.0)
    fresh.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        v_loaded = fresh_ad.velocity(x, 0.5, cond, 1.0)
    assert (v_lora - v_base).abs().max() > 1e-4
    torch.testing.assert_close(v_loaded, v_lora, atol=1e-5, rtol=1e-5)


def test_load_adapter_from_folder_and_errors(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "tiny")
    ad = load_adapter(tmp_path / "tiny", max_sequence_length=16)
    assert isinstance(ad, SD3Adapter) and ad.max_sequence_length == 16
    x = ad.initial_noise(1, torch.Generator().manual_seed(0))
    cond = ad.encode(["a red square"], do_classifier_free_guidance=False)
    cond_ref = load_adapter(pipe, max_sequence_length=16).encode(["a red square"], do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.cond["encoder_hidden_states"], cond_ref.cond["encoder_hidden_states"])
    with torch.no_grad():
        torch.testing.assert_close(ad.velocity(x, 0.3, cond, 1.0), load_adapter(pipe).velocity(x, 0.3, cond, 1.0))
    with pytest.raises(FileNotFoundError, match="not a local"):
        load_adapter(tmp_path / "missing")
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline -> sd3"):
        load_adapter(object())
    with pytest.raises(ValueError, match="height"):
        SD3Adapter(pipe, height=33)


def test_folders_without_t5_load_and_broken_folders_name_what_is_wrong(tmp_path, pipe):
    import json
    import shutil

    from flowalign.config import ModelConfig
    from flowalign.errors import ConfigError
    from flowalign.train.model import build_adapter

    pipe.save_pretrained(tmp_path / "full")
    no_t5 = dict(pipe.components, text_encoder_3=None, tokenizer_3=None)
    expected = load_adapter(type(pipe)(**no_t5)).encode(["a red square"], do_classifier_free_guidance=False)
    # an SD3.5 download without its T5 folders, and a pipeline saved with T5 = None ([null, null] in the index)
    shutil.copytree(tmp_path / "full", tmp_path / "no_t5_dirs")
    for name in ("text_encoder_3", "tokenizer_3"):
        shutil.rmtree(tmp_path / "no_t5_dirs" / name)
    type(pipe)(**no_t5).save_pretrained(tmp_path / "saved_none")
    # a partial download holding the T5 encoder but not its tokenizer (or the other way): the pair goes together,
    # where the encoder alone failed at the first prompt ('NoneType' object is not callable)
    for kept in ("text_encoder_3", "tokenizer_3"):
        shutil.copytree(tmp_path / "full", tmp_path / f"only_{kept}")
        shutil.rmtree(tmp_path / f"only_{kept}" / ({"text_encoder_3", "tokenizer_3"} - {kept}).pop())
    for folder in ("no_t5_dirs", "saved_none", "only_text_encoder_3", "only_tokenizer_3"):
        for adapter in (load_adapter(tmp_path / folder), build_adapter(ModelConfig(pretrained=str(tmp_path / folder)), torch.device("cpu"))):
            assert adapter.pipeline.text_encoder_3 is None and adapter.pipeline.tokenizer_3 is None, folder
            got = adapter.encode(["a red square"], do_classifier_free_guidance=False)
            torch.testing.assert_close(got.cond["encoder_hidden_states"], expected.cond["encoder_hidden_states"])
    # a missing VAE is named; a pipeline class without an adapter is refused before anything loads
    shutil.copytree(tmp_path / "full", tmp_path / "no_vae")
    shutil.rmtree(tmp_path / "no_vae" / "vae")
    with pytest.raises(ConfigError, match=r"\['vae'\]"):
        build_adapter(ModelConfig(pretrained=str(tmp_path / "no_vae")), torch.device("cpu"))
    index = tmp_path / "full" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ConfigError, match="'StableDiffusionXLPipeline' pipeline"):
        load_adapter(tmp_path / "full")


def test_cfg_embedding_cache_never_serves_stale_embeddings(pipe):
    ad = load_adapter(pipe)
    a, b = ad.encode(["a red square"]), ad.encode(["a blue circle"])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v_a = ad.velocity(x, 0.5, a, 3.0)
        v_b = ad.velocity(x, 0.5, b, 3.0)
        v_b_fresh = load_adapter(pipe).velocity(x, 0.5, b, 3.0)
        v_a_again = ad.velocity(x, 0.5, a, 3.0)
    assert torch.equal(v_b, v_b_fresh) and torch.equal(v_a, v_a_again)
    assert not torch.allclose(v_a, v_b)


def test_conditioning_gather_equals_select_and_sums_gradients_by_hand():
    """``gather`` = ``select`` in value (repeats allowed); the gradient of a repeated row is the sum of
    its copies' gradients, worked by hand."""
    hidden = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    pooled = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    cond = Conditioning(cond={"encoder_hidden_states": hidden, "pooled_projections": pooled, "ids": torch.tensor([7, 9])}, uncond=None)
    rows = torch.tensor([1, 0, 1])
    out = cond.gather(rows)
    assert torch.equal(out.cond["encoder_hidden_states"], cond.select(rows).cond["encoder_hidden_states"])
    assert torch.equal(out.cond["pooled_projections"], pooled[rows]) and out.cond["ids"].tolist() == [9, 7, 9]
    weights = torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1)
    (out.cond["encoder_hidden_states"] * weights).sum().backward()
    torch.testing.assert_close(hidden.grad, torch.stack([torch.full((3, 4), 10.0), torch.full((3, 4), 101.0)]))


def test_conditioning_to_casts_floating_tensors_only_and_keeps_extra():
    cond = Conditioning(cond={"encoder_hidden_states": torch.ones(2, 3, 4), "ids": torch.tensor([7, 9])},
                        uncond={"encoder_hidden_states": torch.zeros(2, 3, 4)}, extra={"prompts": ["a", "b"]})
    moved = cond.to("meta", dtype=torch.float16)
    assert moved.cond["encoder_hidden_states"].device.type == "meta" and moved.cond["encoder_hidden_states"].dtype == torch.float16
    assert moved.cond["ids"].dtype == torch.long and moved.cond["ids"].device.type == "meta"  # integer ids keep their dtype
    assert moved.uncond["encoder_hidden_states"].dtype == torch.float16
    assert moved.extra == {"prompts": ["a", "b"]} and moved.extra is not cond.extra
    assert moved.batch_size == 2
    assert Conditioning(cond={"x": torch.ones(1)}, uncond=None).to("cpu").uncond is None
