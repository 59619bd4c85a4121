"""LoRA: injection, diffusers-format save/load round trip, reference = LoRA off, EMA, mismatch errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flowalign import lora
from flowalign.errors import LoraMismatchError
from flowalign.pipelines.testing import tiny_sd3_pipeline

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


def _latents(pipe, steps: int = 3) -> torch.Tensor:
    # noise-free (ODE) sampling with a fixed initial noise: the full diffusers __call__
    return pipe("a red square", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent").images


def _perturb(params, scale: float = 0.3, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen))


@pytest.fixture
def pipe():
    p = tiny_sd3_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def test_add_lora_starts_at_zero_update_and_trains_only_lora(pipe):
    before = _latents(pipe)
    params = lora.add_lora(pipe.transformer, rank=4, alpha=8, target_modules=TARGETS)
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    trainable = [n for n, p in pipe.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # B = 0 at init: the adapted model is the base model
    assert torch.equal(_latents(pipe), before)


def test_lora_disabled_gives_the_base_model(pipe):
    base = _latents(pipe)
    params = lora.add_lora(pipe.transformer, rank=4, alpha=8, target_modules=TARGETS)
    _perturb(params)
    adapted = _latents(pipe)
    assert (adapted - base).abs().max() > 1e-2
    with lora.lora_disabled(pipe.transformer):
        assert torch.equal(_latents(pipe), base)
    assert torch.equal(_latents(pipe), adapted)  # re-enabled after the block


def test_save_then_fresh_pipeline_load_reproduces_outputs(pipe, tmp_path):
    params = lora.add_lora(pipe.transformer, rank=4, alpha=16, target_modules=TARGETS)  # scale alpha/r = 4
    _perturb(params)
    expected = _latents(pipe)
    path = lora.save_lora_weights(pipe, tmp_path, lora.get_lora_state_dict(pipe.transformer))
    assert path.name == "pytorch_lora_weights.safetensors" and path.is_file()
    fresh = tiny_sd3_pipeline(seed=0)
    fresh.set_progress_bar_config(disable=True)
    assert (_latents(fresh) - expected).abs().max() > 1e-2
    lora.load_lora_into_pipeline(fresh, tmp_path)
    assert (_latents(fresh) - expected).abs().max() <= 1e-4


def test_a_lora_trained_with_dropout_loads_deterministic_in_plain_diffusers(pipe, tmp_path):
    # dropout is a training-time regulariser: the saved file must give the trained model's samples, every time
    params = lora.add_lora(pipe.transformer, rank=4, alpha=16, target_modules=TARGETS, dropout=0.5)
    _perturb(params)
    expected = _latents(pipe)  # add_lora leaves dropout off outside the update
    lora.save_lora_weights(pipe, tmp_path, lora.get_lora_state_dict(pipe.transformer))
    plain = tiny_sd3_pipeline(seed=0)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(tmp_path))  # plain diffusers, no flowalign in the loop
    first, second = _latents(plain), _latents(plain)
    assert torch.equal(first, second) and (first - expected).abs().max() <= 1e-4
    # a file from another tool whose header asks for dropout: flowalign's loader still samples deterministically
    import json
    from safetensors import safe_open

    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as f:
        header, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["lora_adapter_metadata"])
    assert meta["transformer.lora_dropout"] == 0.0
    header["lora_adapter_metadata"] = json.dumps({**meta, "transformer.lora_dropout": 0.5})
    other = tmp_path / "other"
    other.mkdir()
    save_file(state, str(other / "pytorch_lora_weights.safetensors"), metadata=header)
    fresh = tiny_sd3_pipeline(seed=0)
    fresh.set_progress_bar_config(disable=True)
    lora.load_lora_into_pipeline(fresh, other)
    assert torch.equal(_latents(fresh), _latents(fresh)) and (_latents(fresh) - expected).abs().max() <= 1e-4


def test_state_dict_round_trip_is_exact(pipe):
    params = lora.add_lora(pipe.transformer, rank=2, alpha=2, target_modules=TARGETS)
    _perturb(params, seed=3)
    state = lora.get_lora_state_dict(pipe.transformer)
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) and ".default." not in k for k in state)
    _perturb(params, seed=4)
    lora.set_lora_state_dict(pipe.transformer, state)
    again = lora.get_lora_state_dict(pipe.transformer)
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(LoraMismatchError, match="1 missing"):
        lora.set_lora_state_dict(pipe.transformer, bad)


def test_loading_a_lora_for_another_architecture_lists_keys(pipe, tmp_path):
    params = lora.add_lora(pipe.transformer, rank=4, alpha=4, target_modules=TARGETS)
    _perturb(params)
    lora.save_lora_weights(pipe, tmp_path, lora.get_lora_state_dict(pipe.transformer))
    other = tiny_sd3_pipeline(seed=0, num_layers=1)
    with pytest.raises(LoraMismatchError) as info:
        lora.load_lora_into_pipeline(other, tmp_path)
    # block 1 does not exist in a 1-layer transformer; its last block has no to_add_out
    assert "unexpected: transformer.transformer_blocks.0.attn.to_add_out.lora_A.weight" in str(info.value)
    with pytest.raises(LoraMismatchError, match="not found"):
        lora.load_lora_into_pipeline(other, tmp_path / "missing")
    # a truncated copy or another file under the LoRA's name: one LoraMismatchError (the CLI's exit 2), not SafetensorError
    data = (tmp_path / "pytorch_lora_weights.safetensors").read_bytes()
    for name, content in [("truncated", data[: len(data) // 2]), ("garbage", b"not a safetensors file at all")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "pytorch_lora_weights.safetensors").write_bytes(content)
        with pytest.raises(LoraMismatchError, match="not a readable safetensors LoRA file"):
            lora.load_lora_into_pipeline(other, tmp_path / name)


def test_lora_with_wrong_shapes_or_foreign_keys_is_refused(pipe, tmp_path):
    q = pipe.transformer.transformer_blocks[0].attn.to_q
    bad = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, q.in_features + 1),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(q.out_features, 4),
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8),
    }
    save_file(bad, tmp_path / lora.LORA_WEIGHT_NAME)
    with pytest.raises(LoraMismatchError) as info:
        lora.load_lora_into_pipeline(pipe, tmp_path)
    message = str(info.value)
    assert f"1 with wrong shapes: transformer.transformer_blocks.0.attn.to_q.lora_A.weight [4, {q.in_features + 1}] (layer in_features {q.in_features})" in message
    assert "1 unexpected: unet.down_blocks.0.attentions.0.proj_in.lora_A.weight" in message


def test_unknown_target_module_is_a_lora_mismatch(pipe):
    with pytest.raises(LoraMismatchError, match="to_nothing"):
        lora.add_lora(pipe.transformer, rank=2, alpha=2, target_modules=["to_nothing"])


def test_ema_matches_hand_computed_average():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = lora.LoraEMA([p], decay=0.5)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 6.0]))
    ema.update()  # 0.5*[1,2] + 0.5*[3,6] = [2,4]
    with torch.no_grad():
        p.copy_(torch.tensor([0.0, 0.0]))
    ema.update()  # 0.5*[2,4] + 0.5*[0,0] = [1,2]
    assert torch.allclose(ema.shadow[0], torch.tensor([1.0, 2.0]))
    with ema.applied():
        assert torch.equal(p.data, torch.tensor([1.0, 2.0]))
    assert torch.equal(p.data, torch.tensor([0.0, 0.0]))
    restored = lora.LoraEMA([p], decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.shadow[0], ema.shadow[0])


def test_ema_state_loads_onto_the_parameters_device():
    """A checkpoint's tensors load on the CPU; the restored EMA copies must follow the parameters (on a GPU run
    the first update after --resume mixed a CPU copy with a CUDA parameter). The meta device stands in for CUDA."""
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    ema = lora.LoraEMA([p], decay=0.9)
    ema.load_state_dict({"0": torch.ones(3, dtype=torch.float64)})
    assert ema.shadow[0].device == p.device and ema.shadow[0].dtype == torch.float32


def test_a_lora_file_without_alpha_in_its_header_warns(pipe, tmp_path, caplog):
    params = lora.add_lora(pipe.transformer, rank=4, alpha=16, target_modules=TARGETS)
    _perturb(params)
    state = lora.get_lora_state_dict(pipe.transformer)
    lora.save_lora_weights(pipe, tmp_path / "ours", state)
    with caplog.at_level("WARNING", logger="flowalign.lora"):
        lora.check_lora_file(tmp_path / "ours", pipe.transformer)
    assert "no transformer.lora_alpha" not in caplog.text
    (tmp_path / "bare").mkdir()
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, tmp_path / "bare" / lora.LORA_WEIGHT_NAME)  # no header
    with caplog.at_level("WARNING", logger="flowalign.lora"):
        lora.check_lora_file(tmp_path / "bare", pipe.transformer)
    assert "has no transformer.lora_alpha in its header" in caplog.text


CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _text_lora_pipeline(pipe) -> torch.Tensor:
    """LoRA on the transformer and on text_encoder_2, perturbed away from 0; returns the pipeline's latents then."""
    _perturb(lora.add_lora(pipe.transformer, rank=4, alpha=8, target_modules=TARGETS))
    _perturb(lora.add_lora(pipe.text_encoder_2, rank=2, alpha=4, target_modules=CLIP_TARGETS), scale=0.5, seed=5)
    return _latents(pipe)


def _save_with_text_lora(pipe, directory, convert=lambda state: state) -> dict:
    """Write both LoRAs with diffusers' save_lora_weights (text keys through ``convert``); returns the text state."""
    text_state = convert(lora.get_lora_state_dict(pipe.text_encoder_2))
    type(pipe).save_lora_weights(
        directory, transformer_lora_layers=lora.get_lora_state_dict(pipe.transformer), text_encoder_2_lora_layers=text_state,
        transformer_lora_adapter_metadata=lora.lora_metadata(pipe.transformer),
        text_encoder_2_lora_adapter_metadata=lora.lora_metadata(pipe.text_encoder_2), safe_serialization=True,
    )
    return text_state


def test_a_file_with_text_encoder_lora_is_checked_and_loaded(pipe, tmp_path, caplog):
    """Files that also train the CLIP encoders (diffusers DreamBooth --train_text_encoder) carry
    ``text_encoder.`` / ``text_encoder_2.`` keys: they are checked against those encoders and the
    loaded pipeline reproduces the trained one's samples."""
    expected = _text_lora_pipeline(pipe)
    with lora.lora_disabled(pipe.transformer):
        assert (_latents(pipe) - expected).abs().max() > 1e-3  # the text LoRA alone moves the samples
    text_state = _save_with_text_lora(pipe, tmp_path)
    fresh = tiny_sd3_pipeline(seed=0)
    fresh.set_progress_bar_config(disable=True)
    with caplog.at_level("WARNING", logger="flowalign.lora"):
        shapes = lora.check_lora_file(tmp_path, lora.lora_components(fresh))
    assert {k.split(".")[0] for k in shapes} == {"transformer", "text_encoder_2"}
    assert "lora_alpha" not in caplog.text  # both components' alphas are in the header
    with pytest.raises(LoraMismatchError, match="unexpected: text_encoder_2.text_model"):
        lora.check_lora_file(tmp_path, fresh.transformer)  # the transformer alone does not own those keys
    assert (_latents(fresh) - expected).abs().max() > 1e-2
    lora.load_lora_into_pipeline(fresh, tmp_path)
    assert (_latents(fresh) - expected).abs().max() <= 1e-4
    # a text-encoder key of the wrong width is named with its prefix
    key = next(k for k in text_state if k.endswith("q_proj.lora_A.weight"))
    save_file({f"text_encoder_2.{key}": torch.zeros(2, 3)}, tmp_path / "bad.safetensors")
    with pytest.raises(LoraMismatchError, match=f"1 with wrong shapes: text_encoder_2.{key} \\[2, 3\\]"):
        lora.check_lora_file(tmp_path / "bad.safetensors", lora.lora_components(tiny_sd3_pipeline(seed=0)))


def test_a_file_with_diffusers_form_text_encoder_keys_is_checked_and_loaded(pipe, tmp_path):
    """Text-encoder keys in diffusers' own form (convert_state_dict_to_diffusers: lora_linear_layer.up / .down, as the
    DreamBooth SDXL scripts write them) load in plain diffusers but were refused by flowalign eval / generate."""
    from diffusers.utils import convert_state_dict_to_diffusers

    expected = _text_lora_pipeline(pipe)
    text_state = _save_with_text_lora(pipe, tmp_path, convert=convert_state_dict_to_diffusers)
    assert any(".lora_linear_layer.down." in k for k in text_state)
    fresh = tiny_sd3_pipeline(seed=0)
    fresh.set_progress_bar_config(disable=True)
    shapes = lora.check_lora_file(tmp_path, lora.lora_components(fresh))
    assert any(".lora_linear_layer.up." in k for k in shapes)  # named as the file names them
    lora.load_lora_into_pipeline(fresh, tmp_path)
    assert (_latents(fresh) - expected).abs().max() <= 1e-4
    key = next(k for k in text_state if k.endswith("q_proj.lora_linear_layer.down.weight"))
    save_file({f"text_encoder_2.{key}": torch.zeros(2, 3)}, tmp_path / "bad.safetensors")  # the shape check applies to them too
    with pytest.raises(LoraMismatchError, match="1 with wrong shapes: text_encoder_2.*lora_linear_layer.down.weight \\[2, 3\\]"):
        lora.check_lora_file(tmp_path / "bad.safetensors", lora.lora_components(tiny_sd3_pipeline(seed=0)))


def test_soft_update_decay_is_diffusionnft_schedule():
    # preset 1: 0.001 per step up to 0.5; preset 2: 0 for 75 steps, then 0.0075 per step up to 0.999
    assert [lora.soft_update_decay(s, 0.001, 0.5) for s in (0, 100, 499, 500, 10_000)] == pytest.approx([0.0, 0.1, 0.499, 0.5, 0.5])
    assert [lora.soft_update_decay(s, 0.0075, 0.999, flat=75) for s in (0, 74, 75, 85, 208, 300)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.075, 0.9975, 0.999])
    for bad in ((-0.1, 0.5, 0), (0.1, 1.0, 0), (0.1, 0.5, -1)):
        with pytest.raises(ValueError, match="soft_update_decay"):
            lora.soft_update_decay(3, *bad)


def test_ema_update_with_an_explicit_decay():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = lora.LoraEMA([p], decay=0.9)
    with torch.no_grad():
        p.copy_(torch.tensor([5.0, 6.0]))
    ema.update(0.25)  # 0.25*[1,2] + 0.75*[5,6] = [4,5]
    assert torch.allclose(ema.shadow[0], torch.tensor([4.0, 5.0]))
    ema.update(0.0)  # a copy
    assert torch.equal(ema.shadow[0], torch.tensor([5.0, 6.0]))
    with pytest.raises(ValueError, match="decay"):
        ema.update(1.0)


def test_power_ema_decay_worked_example_and_errors():
    # gamma = 1: beta = 0, 1/4, 4/9 -> after three steps (1*theta_1 + 3*theta_2 + 5*theta_3) / 9
    assert [lora.power_ema_decay(t, 1.0) for t in (1, 2, 3)] == pytest.approx([0.0, 0.25, 4 / 9])
    p = torch.nn.Parameter(torch.zeros(1))
    ema = lora.LoraEMA([p], decay=0.5)
    for t, value in enumerate((9.0, 18.0, 27.0), start=1):
        with torch.no_grad():
            p.fill_(value)
        ema.update(lora.power_ema_decay(t, 1.0))
    assert ema.shadow[0].item() == pytest.approx((1 * 9 + 3 * 18 + 5 * 27) / 9)
    for bad in ((0, 1.0), (3, -0.5)):
        with pytest.raises(ValueError, match="power_ema_decay"):
            lora.power_ema_decay(*bad)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 6.0])
def test_power_ema_matches_the_unrolled_weights(gamma):
    """Brute force: the recursion's weight on step i is (1 - beta_i) * prod_{j > i} beta_j; they sum to 1,
    never fall with i, and for gamma = 0 are all 1/T (the plain mean)."""
    T = 12
    betas = [lora.power_ema_decay(t, gamma) for t in range(1, T + 1)]
    weights = [(1 - betas[i]) * torch.tensor(betas[i + 1:], dtype=torch.float64).prod().item() for i in range(T)]
    assert sum(weights) == pytest.approx(1.0)
    assert all(w2 >= w1 - 1e-12 for w1, w2 in zip(weights, weights[1:]))
    if gamma == 0.0:
        assert weights == pytest.approx([1 / T] * T)
    thetas = torch.randn(T, 4, generator=torch.Generator().manual_seed(0))
    p = torch.nn.Parameter(torch.zeros(4))
    ema = lora.LoraEMA([p], decay=0.5)
    for t in range(T):
        with torch.no_grad():
            p.copy_(thetas[t])
        ema.update(betas[t])
    expected = (torch.tensor(weights, dtype=torch.float32)[:, None] * thetas).sum(0)
    assert torch.allclose(ema.shadow[0], expected, atol=1e-5)


def test_lora_dropout_acts_only_inside_lora_dropout_active():
    """peft creates LoRA dropout in train mode; a rollout or an evaluation must be a deterministic function
    of the weights, so it is off until the update's gradient forward turns it on."""
    torch.manual_seed(0)
    module = torch.nn.Sequential()
    module.add_module("proj", torch.nn.Linear(16, 16))
    params = lora.add_lora(module, rank=4, alpha=4.0, target_modules=["proj"], dropout=0.5)
    with torch.no_grad():
        for p in params:
            p.normal_()  # a non-zero LoRA update (B starts at 0)
    x = torch.randn(8, 16)
    with torch.no_grad():
        first, second = module(x), module(x)
    assert torch.equal(first, second)  # off by default
    with lora.lora_dropout_active(module):
        noisy = module(x)
    assert not torch.allclose(noisy, first)
    with torch.no_grad():
        assert torch.equal(module(x), first)  # off again after the block
    # no dropout configured: the same context changes nothing
    plain = torch.nn.Sequential()
    plain.add_module("proj", torch.nn.Linear(16, 16))
    lora.add_lora(plain, rank=4, alpha=4.0, target_modules=["proj"])
    with torch.no_grad(), lora.lora_dropout_active(plain):
        inside = plain(x)
    assert torch.equal(inside, plain(x).detach())


@pytest.mark.filterwarnings("ignore:.*invalid shape.*:UserWarning")  # peft takes any 1-D lora_B tensor, its bias too, for a sharded save
def test_conv_embedding_and_bias_lora_files_check_load_and_round_trip(tmp_path):
    """LoRA on a conv (pos_embed.proj), with a lora_B bias (peft lora_bias), and on an embedding: the file check
    accepts each shape that plain diffusers loads (it used to call conv keys unexpected and biases misshapen), and
    an embedding LoRA's state round-trips (its parameter names end in the adapter name, with no dot after)."""
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = tiny_sd3_pipeline(seed=0)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["attn.to_q", "pos_embed.proj"], lora_bias=True))
    state = get_peft_model_state_dict(pipe.transformer)
    assert any(k.endswith("lora_B.bias") for k in state) and any("pos_embed.proj.lora_A" in k for k in state)
    type(pipe).save_lora_weights(tmp_path, transformer_lora_layers=state, transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict())
    fresh = tiny_sd3_pipeline(seed=0)
    shapes = lora.check_lora_file(tmp_path, lora.lora_components(fresh))
    assert shapes["transformer.pos_embed.proj.lora_A.weight"][1] == fresh.transformer.pos_embed.proj.in_channels
    lora.load_lora_into_pipeline(fresh, tmp_path)
    # a bias of the wrong size is still refused
    bad = {k: (v[:-1] if k.endswith("lora_B.bias") else v) for k, v in state.items()}
    save_file({f"transformer.{k}": v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraMismatchError, match=r"lora_B.bias \[\d+\] \(layer out_features"):
        lora.check_lora_file(tmp_path / "bad.safetensors", fresh.transformer)
    # embedding LoRA: state dict out and back in
    encoder = tiny_sd3_pipeline(seed=0).text_encoder
    lora.add_lora(encoder, 4, 8.0, ["q_proj", "token_embedding"])
    saved = {k: torch.randn_like(v) for k, v in lora.get_lora_state_dict(encoder).items()}
    assert any(k.endswith("lora_embedding_A") for k in saved)
    lora.set_lora_state_dict(encoder, saved)
    assert all(torch.equal(saved[k], v) for k, v in lora.get_lora_state_dict(encoder).items())


def test_a_dora_file_passes_the_check(tmp_path):
    """DoRA adds lora_magnitude_vector [out_features] per layer; diffusers loads such files, so the check must too."""
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = tiny_sd3_pipeline(seed=0)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["attn.to_q"], use_dora=True))
    state = get_peft_model_state_dict(pipe.transformer)
    key = next(k for k in state if "magnitude_vector" in k)
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(tmp_path / "dora.safetensors"))
    fresh = tiny_sd3_pipeline(seed=0).transformer
    shapes = lora.check_lora_file(tmp_path / "dora.safetensors", fresh)
    assert shapes[f"transformer.{key}"] == (fresh.transformer_blocks[0].attn.to_q.out_features,)


def test_the_lora_file_is_replaced_whole_and_readable_by_others(pipe, tmp_path, monkeypatch):
    """diffusers wrote the file in place (a crash mid-write left a torn LoRA) and safetensors creates it 0600."""
    import os

    params = lora.add_lora(pipe.transformer, rank=2, alpha=2, target_modules=TARGETS)
    _perturb(params)
    state = lora.get_lora_state_dict(pipe.transformer)
    path = lora.save_lora_weights(pipe, tmp_path, state)
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary folder left
    before = path.read_bytes()

    def torn(directory, **kwargs):  # writes half a file, then the process "dies"
        (Path(directory) / path.name).write_bytes(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(type(pipe), "save_lora_weights", staticmethod(torn))
    with pytest.raises(KeyboardInterrupt):
        lora.save_lora_weights(pipe, tmp_path, state)
    assert path.read_bytes() == before  # the earlier file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_the_umask_is_read_without_being_changed(monkeypatch):
    """files._umask used to set the umask to 0 for an instant (a race with any thread creating files then)."""
    import os

    from flowalign import files

    expected = os.umask(0o027)
    os.umask(0o027)
    try:
        calls = []
        real = os.umask
        monkeypatch.setattr(files.os, "umask", lambda m: calls.append(m) or real(m))
        assert files._umask() == 0o027
        assert calls == [] or not os.path.exists("/proc/self/status")  # Linux reads it from /proc
    finally:
        os.umask(expected)


def test_concurrent_atomic_writes_of_one_file_from_threads_do_not_collide(tmp_path):
    """Temporary names carried the pid only: two threads writing the same file shared one temporary path."""
    import threading

    from flowalign import files

    seen = []
    barrier = threading.Barrier(2)

    def write(text):
        with files.atomic_path(tmp_path / "out.txt") as tmp:
            seen.append(tmp.name)
            barrier.wait(timeout=10)
            tmp.write_text(text)

    threads = [threading.Thread(target=write, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 2 and (tmp_path / "out.txt").read_text() in ("a", "b")
    from flowalign.train.run_dir import _is_temporary

    assert all(_is_temporary(name) for name in seen)  # --overwrite still recognises them as a run's temporaries


LORA_METADATA_SCRIPT = """
import json, sys
import torch
from flowalign import lora
module = torch.nn.Sequential()
for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
    module.add_module(name, torch.nn.Linear(4, 4))
lora.add_lora(module, rank=2, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"])
sys.stdout.write(json.dumps(lora.lora_metadata(module), sort_keys=True))
"""


def test_lora_metadata_lists_targets_sorted_whatever_the_hash_seed():
    """peft keeps target_modules as a set, whose order follows Python's string hash seed; the LoRA file's header
    (and so its bytes) must not: this process (a random hash seed) and one with another seed agree."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONHASHSEED=str(1 + hash("seed") % 1000), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", LORA_METADATA_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    namespace: dict = {}
    script = LORA_METADATA_SCRIPT.replace("sys.stdout.write(", "result = (")
    exec(compile(script, "lora_metadata_script", "exec"), namespace)
    assert done.stdout == namespace["result"]
    assert json.loads(done.stdout)["target_modules"] == ["add_k_proj", "add_q_proj", "add_v_proj", "to_k", "to_q", "to_v"]


def test_the_lora_header_holds_only_portable_fields_and_still_restores_the_scale(pipe, tmp_path):
    """The header held all ~45 fields of this peft's LoraConfig; diffusers builds LoraConfig(**header), so a peft
    of another version (which refuses fields it does not know) could not load the file."""
    import json

    from peft import LoraConfig
    from safetensors import safe_open

    params = lora.add_lora(pipe.transformer, rank=4, alpha=16, target_modules=TARGETS)
    _perturb(params)
    expected = _latents(pipe)
    lora.save_lora_weights(pipe, tmp_path, lora.get_lora_state_dict(pipe.transformer))
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as fh:
        header = json.loads(fh.metadata()["lora_adapter_metadata"])
    meta = {k[len("transformer."):]: v for k, v in header.items()}
    assert set(meta) == {"r", "lora_alpha", "target_modules", "lora_dropout"}  # all others at peft's defaults
    assert (meta["r"], meta["lora_alpha"], sorted(meta["target_modules"])) == (4, 16, sorted(TARGETS))
    assert set(meta) <= set(lora.PORTABLE_LORA_FIELDS) | {"lora_dropout"}
    LoraConfig(**meta)  # what diffusers builds from it
    fresh = tiny_sd3_pipeline(seed=0)
    fresh.set_progress_bar_config(disable=True)
    lora.load_lora_into_pipeline(fresh, tmp_path)
    assert (_latents(fresh) - expected).abs().max() <= 1e-4  # alpha / r = 4 restored


def test_a_lora_loaded_into_a_bf16_pipeline_acts_as_it_did_in_training(tmp_path):
    """Training keeps LoRA weights in fp32 on a bf16 model; diffusers loads them in bf16, so flowalign eval --lora moved
    bf16 samples away from those the run trained and reported. load_lora_into_pipeline keeps them in fp32."""
    trained = tiny_sd3_pipeline(seed=0).to(torch.bfloat16)
    trained.set_progress_bar_config(disable=True)
    params = lora.add_lora(trained.transformer, rank=4, alpha=8, target_modules=TARGETS)
    assert all(p.dtype == torch.float32 for p in params)
    _perturb(params, scale=0.05)
    expected = _latents(trained).float()
    lora.save_lora_weights(trained, tmp_path, lora.get_lora_state_dict(trained.transformer))
    fresh = tiny_sd3_pipeline(seed=0).to(torch.bfloat16)
    fresh.set_progress_bar_config(disable=True)
    lora.load_lora_into_pipeline(fresh, tmp_path)
    assert all(p.dtype == torch.float32 for n, p in fresh.transformer.named_parameters() if "lora_" in n)
    assert torch.equal(_latents(fresh).float(), expected)


def test_a_failed_add_leaves_the_module_as_it_was_and_remove_lora_makes_room_for_another_run():
    """A failed add_lora left diffusers' peft flag set, so the retry with the right targets failed on a missing config; a
    second run on the same loaded model failed with peft's 'Adapter with name default already exists'."""
    pipe = tiny_sd3_pipeline(seed=0)
    module = pipe.transformer
    with pytest.raises(LoraMismatchError, match="no module matches"):
        lora.add_lora(module, 2, 4, ["nonexistent_layer"])
    assert all(p.requires_grad for p in module.parameters())  # as it was before the failed add
    assert len(lora.add_lora(module, 2, 4, ["attn.to_q"])) == 4
    with pytest.raises(LoraMismatchError, match=r"already carries flowalign's LoRA .* remove_lora"):
        lora.add_lora(module, 2, 4, ["attn.to_q"])
    lora.remove_lora(module)
    assert not any("lora_" in n for n, _ in module.named_parameters())
    assert len(lora.add_lora(module, 2, 4, ["attn.to_q"])) == 4
    text = pipe.text_encoder
    lora.add_lora(text, 2, 4, ["q_proj"])
    lora.remove_lora(text)
    assert not any("lora_" in n for n, _ in text.named_parameters())
    assert len(lora.add_lora(text, 2, 4, ["q_proj"])) > 0
