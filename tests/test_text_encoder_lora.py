"""``lora.train_text_encoder``: LoRA on SD3's CLIP encoders trained with the transformer's.

Checked against independent computations: a fresh tiny pipeline's own encoding (the reference
and the base report must see the text encoders without LoRA), a fresh pipeline that loads the
run's file with plain diffusers ``load_lora_weights`` (the file holds the whole trained model),
and a run resumed from a checkpoint (bit-identical to an uninterrupted one).
"""
from __future__ import annotations

import json

import pytest
import torch

from flowalign import lora as lora_lib
from flowalign import sampling
from flowalign.config import load_config
from flowalign.errors import CheckpointError, ConfigError
from flowalign.pipelines import load_adapter
from flowalign.pipelines.sd3 import SD3Adapter
from flowalign.pipelines.testing import tiny_sd3_pipeline
from flowalign.train.model import TINY_T5_TOKENS
from flowalign.train.trainer import Trainer

FAST = [
    "sampling.num_steps=4", "sampling.guidance_scale=2.0", "sampling.group_size=4",  # CFG on: "" goes through the encoders too
    "train.prompts_per_iter=2", "train.micro_batch_size=8", "train.grad_accum=4",
    "train.lr=3e-2", "lora.rank=4", "lora.alpha=8", "objective.kl_beta=0.0", "lora.train_text_encoder=true",
    "train.progress=false", "train.log_with=[]", "train.eval_every=-1", "train.checkpoint_every=0",
]
PROMPTS = ["a red square", "a blue circle"]


def _trainer(tmp_path, *overrides, **kwargs) -> Trainer:
    return Trainer(load_config(None, FAST + [f"train.output_dir={tmp_path}", *overrides]), **kwargs).setup()


def _fresh_adapter():
    return load_adapter(tiny_sd3_pipeline(seed=0), max_sequence_length=TINY_T5_TOKENS)


def _perturb_text_lora(trainer, seed: int = 0, scale: float = 0.5) -> None:
    """Give every text-encoder lora_B random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    for module in trainer.text_modules.values():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.data.copy_(scale * torch.randn(p.shape, generator=g))


def _assert_cond_close(a, b, atol=1e-6):
    for part in ("cond", "uncond"):
        da, db = getattr(a, part), getattr(b, part)
        assert da.keys() == db.keys()
        for key in da:
            torch.testing.assert_close(da[key], db[key], atol=atol, rtol=0)


def _cond_gap(a, b) -> float:
    return max(float((a.cond[k] - b.cond[k]).detach().abs().max()) for k in a.cond)


def test_setup_adds_lora_to_both_clip_encoders_only(tmp_path):
    trainer = _trainer(tmp_path)
    assert set(trainer.text_modules) == {"text_encoder", "text_encoder_2"}  # T5 is never adapted (as in diffusers)
    assert not lora_lib.lora_parameters(trainer.adapter.pipeline.text_encoder_3)
    text_params = [p for m in trainer.text_modules.values() for p in lora_lib.lora_parameters(m)]
    assert text_params and all(p.requires_grad for p in text_params)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in text_params} <= optimised
    # CLIP attention projections, as diffusers' DreamBooth --train_text_encoder
    names = {n.split(".")[-1] for m in trainer.text_modules.values() for n, sub in m.named_modules() if hasattr(sub, "lora_A")}
    assert names == {"q_proj", "k_proj", "v_proj", "out_proj"}


def test_update_and_reference_conditioning(tmp_path):
    """The update re-encodes with the current text LoRA (equal to the rollouts' conditioning before
    a step, with gradient); the reference encodes with it off (equal to a fresh base pipeline)."""
    trainer = _trainer(tmp_path)
    _perturb_text_lora(trainer)
    batch = trainer.collect()
    index = torch.tensor([5, 0, 3, 6])  # rows of two prompts, out of order
    update = trainer.conditioning.policy(batch, index)
    _assert_cond_close(update, batch.cond_rows(index))
    base = _fresh_adapter().encode([batch.traj.prompts[i] for i in index.tolist()], do_classifier_free_guidance=True)
    reference = trainer.conditioning.reference(batch, index)
    _assert_cond_close(reference, base)
    assert _cond_gap(update, base) > 1e-3  # the text LoRA does change the features
    assert not any(t.requires_grad for t in reference.cond.values())
    # gradients reach every text-encoder LoRA tensor through the transformer's velocity
    policy, _ = trainer.velocity_fns(update)
    x = torch.randn(index.numel(), *trainer.adapter.latent_shape, generator=torch.Generator().manual_seed(1))
    policy(x, torch.full((index.numel(),), 0.7)).square().sum().backward()
    for module in trainer.text_modules.values():
        grads = [p.grad for p in lora_lib.lora_parameters(module)]
        assert all(g is not None for g in grads) and any(float(g.abs().max()) > 0 for g in grads)


def test_reference_conditioning_is_encoded_once_per_batch(tmp_path, monkeypatch):
    """The base encoders never change: one batch's micro-batches share one reference encoding of its
    distinct prompts (each row equal to a fresh base pipeline's), and a batch of other prompts re-encodes."""
    trainer = _trainer(tmp_path)
    _perturb_text_lora(trainer)
    calls = []
    encode = trainer.adapter.encode
    monkeypatch.setattr(trainer.adapter, "encode", lambda prompts, *a, **k: calls.append(list(prompts)) or encode(prompts, *a, **k))
    batch = trainer.collect()
    calls.clear()
    fresh = _fresh_adapter()
    for index in (torch.tensor([5, 0, 3]), torch.tensor([1, 6]), torch.tensor([7, 2, 4, 0])):
        expected = fresh.encode([batch.traj.prompts[i] for i in index.tolist()], do_classifier_free_guidance=True)
        _assert_cond_close(trainer.conditioning.reference(batch, index), expected)
    assert calls == [list(dict.fromkeys(batch.traj.prompts))]
    other = trainer.collect()
    assert set(other.traj.prompts) != set(batch.traj.prompts)
    calls.clear()
    _assert_cond_close(trainer.conditioning.reference(other, torch.tensor([1])),
                       fresh.encode([other.traj.prompts[1]], do_classifier_free_guidance=True))
    assert calls == [list(dict.fromkeys(other.traj.prompts))]


def test_training_runs_t5_once_per_prompt(tmp_path):
    """T5 is frozen: over two iterations (rollouts, every update micro-step re-encoding with gradient)
    it runs once per distinct prompt, where uncached it would run at every encode."""
    from flowalign.train.trainer_setup import DEMO_PROMPTS

    trainer = _trainer(tmp_path, "train.iterations=2", "train.final_eval_samples=0")
    rows = []
    trainer.adapter.pipeline.text_encoder_3.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    trainer.train()
    assert rows and set(rows) == {1}  # one prompt per call
    assert len(rows) <= len(DEMO_PROMPTS) + 1  # each prompt (and the empty negative) at most once
    assert trainer.adapter.t5_cache.hits > 2 * len(rows)


def test_a_cache_smaller_than_an_iteration_warns(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="flowalign.train.trainer"):
        _trainer(tmp_path / "a", "model.t5_cache_size=2")
    assert "model.t5_cache_size=2 holds fewer than an iteration's 3 prompts" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="flowalign.train.trainer"):
        _trainer(tmp_path / "b", "model.t5_cache_size=3")
    assert "t5_cache_size" not in caplog.text


def test_reference_kl_sees_the_text_lora(tmp_path):
    """kl/ref compares with the base text features: 0 with the text LoRA at 0, > 0 once it moves
    (the transformer's LoRA is still 0 here, so only the text side can make a difference)."""
    trainer = _trainer(tmp_path)
    batch = trainer.collect()
    index, k = torch.arange(4), 0
    assert trainer._reference_kl(batch, index, k) <= 1e-12  # 0 up to rounding (the reference encodes the batch's prompts at once)
    _perturb_text_lora(trainer)
    batch = trainer.collect()
    assert trainer._reference_kl(batch, index, k) > 1e-6


def test_report_base_turns_the_text_lora_off(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "train.eval_prompts=assets/prompts/shapes_heldout.jsonl", "train.final_eval_samples=320")
    _perturb_text_lora(trainer)
    seen = {}

    def fake_report(run_dir, adapter, records, reward, base_context=None, **kwargs):
        with base_context():
            seen["base"] = adapter.encode(PROMPTS)
        seen["aligned"] = adapter.encode(PROMPTS)
        return run_dir / "report.md"

    monkeypatch.setattr("flowalign.report.heldout_report", fake_report)
    trainer.heldout_report()
    _assert_cond_close(seen["base"], _fresh_adapter().encode(PROMPTS))
    assert _cond_gap(seen["aligned"], seen["base"]) > 1e-3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("te_run")
    trainer = _trainer(out, "train.iterations=3")
    trainer.train()
    trainer.cleanup()
    return trainer


def test_training_moves_the_text_lora_and_the_file_holds_it(trained):
    for module in trained.text_modules.values():
        assert any(float(p.detach().abs().max()) > 0 for n, p in module.named_parameters() if "lora_B" in n)
    from safetensors import safe_open

    with safe_open(str(trained.run_dir / lora_lib.LORA_WEIGHT_NAME), "pt") as fh:
        prefixes = {key.split(".")[0] for key in fh.keys()}
        header = fh.metadata() or {}
    assert prefixes == {"transformer", "text_encoder", "text_encoder_2"}
    meta = json.loads(header["lora_adapter_metadata"])  # peft configs, so loaders restore alpha / r
    assert [meta[f"{name}.lora_alpha"] for name in prefixes] == [8.0] * 3 and meta["text_encoder.r"] == 4


def test_the_file_reproduces_the_trained_model_in_plain_diffusers(trained):
    def ode(adapter):
        return sampling.sample_ode(adapter, PROMPTS, num_steps=6, guidance_scale=2.0,
                                   generator=torch.Generator().manual_seed(5), decode=False)

    expected = ode(trained.adapter)
    with lora_lib.lora_disabled(*trained.text_modules.values()):
        transformer_only = ode(trained.adapter)
    assert (transformer_only - expected).abs().max() > 1e-3  # the text LoRA is part of the trained model
    fresh = tiny_sd3_pipeline(seed=0)
    assert (ode(load_adapter(fresh, max_sequence_length=TINY_T5_TOKENS)) - expected).abs().max() > 1e-3
    fresh.load_lora_weights(str(trained.run_dir))
    assert (ode(load_adapter(fresh, max_sequence_length=TINY_T5_TOKENS)) - expected).abs().max() <= 1e-4


def test_resume_is_bit_identical_with_text_lora(tmp_path):
    def run(folder, iterations, resume=False):
        trainer = _trainer(folder, f"train.iterations={iterations}", "train.checkpoint_every=2", "train.ema=true", resume=resume)
        trainer.train()
        trainer.cleanup()
        return trainer

    full = run(tmp_path / "full", 4)
    run(tmp_path / "split", 2)
    resumed = run(tmp_path / "split", 4, resume=True)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        a = lora_lib.get_lora_state_dict(full.lora_modules[name])
        b = lora_lib.get_lora_state_dict(resumed.lora_modules[name])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert len(full.ema.shadow) == len(full.params)  # the EMA covers the text LoRA too
    assert all(torch.equal(a, b) for a, b in zip(full.ema.shadow, resumed.ema.shadow))
    # the same checkpoint with the text LoRA switched off is refused (config hash), not half-loaded
    with pytest.raises(CheckpointError, match="config hash"):
        _trainer(tmp_path / "split", "train.iterations=6", "train.checkpoint_every=2", "train.ema=true",
                 "lora.train_text_encoder=false", resume=True)


def test_text_encoder_lr_sets_the_first_adam_step(tmp_path):
    """Adam's first step moves each lora_B entry (all 0 before) by its group's lr times
    g / (|g| + eps) (m / sqrt(v) with bias correction; weight decay of 0 is 0): lr itself wherever
    |g| >> eps = 1e-8 (the largest gradients), i.e. 3e-2 on the transformer and 3e-1 on the text side."""
    trainer = _trainer(tmp_path, "lora.text_encoder_lr=0.3")
    metrics = trainer.update(trainer.collect())
    assert metrics["optim/steps"] == 1.0 and (metrics["optim/lr"], metrics["optim/lr_text_encoder"]) == (3e-2, 0.3)
    for name, module in trainer.lora_modules.items():
        b = torch.cat([p.detach().flatten() for n, p in module.named_parameters() if "lora_B" in n]).abs()
        lr = 0.3 if name.startswith("text_encoder") else 3e-2
        torch.testing.assert_close(b.max(), torch.tensor(lr), rtol=1e-4, atol=0)


def test_bad_text_encoder_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="train_text_encoder is false"):
        load_config(None, ["lora.text_encoder_target_modules=[q_proj]"])
    with pytest.raises(ConfigError, match="train_text_encoder is false"):
        load_config(None, ["lora.text_encoder_lr=1e-4"])
    with pytest.raises(ConfigError, match="text_encoder_lr must be"):
        load_config(None, ["lora.train_text_encoder=true", "lora.text_encoder_lr=0"])

    class NoTextLora(SD3Adapter):
        text_lora_modules = {}

    adapter = NoTextLora(tiny_sd3_pipeline(seed=0), max_sequence_length=TINY_T5_TOKENS)
    with pytest.raises(ConfigError, match="no text encoders"):
        _trainer(tmp_path, adapter=adapter)
    with pytest.raises(ConfigError, match=r"text_encoder_target_modules=\['layers.99.self_attn.q_proj'\] match nothing in text_encoder"):
        _trainer(tmp_path / "b", "lora.text_encoder_target_modules=[layers.99.self_attn.q_proj]")
    # without q/k/v/out_proj diffusers cannot tell the file's text-encoder format: the run's LoRA would not load
    with pytest.raises(ConfigError, match=r"text_encoder_target_modules=\['fc1', 'fc2'\] names none of \['q_proj', 'k_proj', "
                                          r"'v_proj', 'out_proj'\]: diffusers could not load the run's LoRA file"):
        _trainer(tmp_path / "c", "lora.text_encoder_target_modules=[fc1, fc2]")


def test_a_token_embedding_lora_loads_into_a_bf16_pipeline_in_fp32_as_trained(tmp_path):
    """peft names an embedding's LoRA ``...token_embedding.lora_embedding_A.<adapter>`` (no ``.weight``); the loader's
    fp32 pass missed it, so a bf16 pipeline ran the embedding LoRA rounded to bf16 while the Linear ones were exact."""
    from flowalign import lora as lora_lib
    from flowalign.pipelines import load_adapter
    from flowalign.pipelines.testing import tiny_sd3_pipeline
    from flowalign.train.lora_export import save_lora_file

    prompts = ["a red square", "two blue circles"]
    trained = tiny_sd3_pipeline(seed=0).to(torch.bfloat16)
    g = torch.Generator().manual_seed(10)
    for name in ("text_encoder", "text_encoder_2"):
        params = lora_lib.add_lora(getattr(trained, name), 4, 8.0, ["q_proj", "token_embedding"])
        with torch.no_grad():
            for p in params:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    assert any("lora_embedding_A" in n for n, _ in trained.text_encoder.named_parameters())
    lora_lib.add_lora(trained.transformer, 4, 8.0, ["attn.to_q"])
    adapter = load_adapter(trained, max_sequence_length=32)
    save_lora_file(adapter, {"transformer": trained.transformer, "text_encoder": trained.text_encoder,
                             "text_encoder_2": trained.text_encoder_2}, tmp_path)
    fresh = tiny_sd3_pipeline(seed=0).to(torch.bfloat16)
    lora_lib.load_lora_into_pipeline(fresh, tmp_path)
    loaded = {n: p.dtype for n, p in fresh.text_encoder.named_parameters() if "lora_" in n}
    assert any("lora_embedding" in n for n in loaded) and set(loaded.values()) == {torch.float32}
    ours, theirs = adapter.encode(prompts), load_adapter(fresh, max_sequence_length=32).encode(prompts)
    for key in ("encoder_hidden_states", "pooled_projections"):
        assert torch.equal(ours.cond[key], theirs.cond[key]), key
