"""The frozen-T5 feature cache of the SD3 adapter (pipelines/text_cache.py) on a real tiny pipeline."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from flowalign.pipelines import load_adapter
from flowalign.pipelines.testing import tiny_sd3_pipeline
from flowalign.pipelines.text_cache import FrozenEncoderCache

T5_TOKENS = 32
PROMPTS = ["a red square", "two blue circles", "a red square"]


@pytest.fixture()
def pipe():
    p = tiny_sd3_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def _count_t5_rows(pipe) -> list:
    """A list that grows by the batch size of every T5 forward."""
    seen = []
    pipe.text_encoder_3.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    return seen


def _reference(pipe, prompts, cfg=True):
    """diffusers' own encode_prompt, no cache in the way."""
    with torch.no_grad():
        return pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=pipe.device,
                                  do_classifier_free_guidance=cfg, negative_prompt="", max_sequence_length=T5_TOKENS)


def test_cached_encoding_equals_encode_prompt_and_runs_t5_once_per_prompt(pipe):
    adapter = load_adapter(pipe, max_sequence_length=T5_TOKENS)
    t5_rows = _count_t5_rows(pipe)
    embeds, neg, pooled, neg_pooled = _reference(pipe, PROMPTS)
    assert sum(t5_rows) == 3 + 3  # the reference itself: 3 prompts + 3 negatives, uncached
    t5_rows.clear()

    first = adapter.encode(PROMPTS)
    for got, want in [(first.cond["encoder_hidden_states"], embeds), (first.uncond["encoder_hidden_states"], neg),
                      (first.cond["pooled_projections"], pooled), (first.uncond["pooled_projections"], neg_pooled)]:
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert t5_rows == [1, 1, 1]  # two distinct prompts and the empty negative, one per call
    assert len(adapter.t5_cache) == 3

    t5_rows.clear()
    again = adapter.encode(list(reversed(PROMPTS)), requires_grad=True)
    assert t5_rows == []  # every row from the cache
    torch.testing.assert_close(again.cond["encoder_hidden_states"], embeds.flip(0), rtol=0, atol=1e-6)
    assert adapter.t5_cache.hits >= 6


def test_gradient_reaches_clip_not_t5_through_cached_rows(pipe):
    adapter = load_adapter(pipe, max_sequence_length=T5_TOKENS)
    adapter.encode(PROMPTS)  # fill the cache
    clip_weight = pipe.text_encoder.text_model.encoder.layers[0].self_attn.q_proj.weight
    clip_weight.requires_grad_(True)
    try:
        cond = adapter.encode(PROMPTS, requires_grad=True)
        hidden = cond.cond["encoder_hidden_states"]
        assert hidden.requires_grad
        hidden.square().sum().backward()
        assert clip_weight.grad is not None and clip_weight.grad.abs().sum() > 0
        assert any(p.requires_grad for p in pipe.text_encoder_3.parameters())  # so T5 would get gradient uncached
        assert all(p.grad is None for p in pipe.text_encoder_3.parameters())
    finally:
        clip_weight.requires_grad_(False)
        clip_weight.grad = None


def test_lru_bound_and_cache_off(pipe):
    t5_rows = _count_t5_rows(pipe)
    small = load_adapter(pipe, max_sequence_length=T5_TOKENS, t5_cache_size=2)
    small.encode(["a", "b", "c"], do_classifier_free_guidance=False)
    assert len(small.t5_cache) == 2  # "a" was dropped: least recently used
    t5_rows.clear()
    small.encode(["c"], do_classifier_free_guidance=False)
    assert t5_rows == []
    small.encode(["a"], do_classifier_free_guidance=False)
    assert t5_rows == [1]
    small.t5_cache.clear()  # after T5's weights change: every row is computed again
    assert len(small.t5_cache) == 0
    t5_rows.clear()
    small.encode(["a"], do_classifier_free_guidance=False)
    assert t5_rows == [1]

    off = load_adapter(pipe, max_sequence_length=T5_TOKENS, t5_cache_size=0)
    t5_rows.clear()
    off.encode(["a", "b"], do_classifier_free_guidance=False)
    off.encode(["a", "b"], do_classifier_free_guidance=False)
    assert t5_rows == [2, 2]  # diffusers' own batched call, every time


def test_the_pipeline_is_restored_even_after_an_error(pipe):
    adapter = load_adapter(pipe, max_sequence_length=T5_TOKENS)
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.t5_cache.serving(pipe):
            assert "_get_t5_prompt_embeds" in vars(pipe)
            raise RuntimeError("boom")
    assert "_get_t5_prompt_embeds" not in vars(pipe)
    adapter.encode(["a"])
    assert "_get_t5_prompt_embeds" not in vars(pipe)


def test_images_per_prompt_repeat_like_diffusers(pipe):
    cache = FrozenEncoderCache(max_prompts=8)
    with torch.no_grad():
        want = pipe._get_t5_prompt_embeds(prompt=["x", "yy"], num_images_per_prompt=3, max_sequence_length=T5_TOKENS)
        with cache.serving(pipe):
            got = pipe._get_t5_prompt_embeds(prompt=["x", "yy"], num_images_per_prompt=3, max_sequence_length=T5_TOKENS)
    assert got.shape == want.shape == (6, T5_TOKENS, want.shape[-1])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.equal(got[0], got[3])  # the two prompts differ, so a wrong order would show


def test_bad_size_is_refused():
    with pytest.raises(ValueError, match="max_prompts"):
        FrozenEncoderCache(max_prompts=-1)


def test_model_config_sets_the_cache_and_refuses_negative_sizes():
    from flowalign.config import ModelConfig
    from flowalign.errors import ConfigError
    from flowalign.train.model import build_adapter

    assert build_adapter(ModelConfig(pretrained="tiny-sd3"), torch.device("cpu")).t5_cache.max_prompts == 64
    assert build_adapter(ModelConfig(pretrained="tiny-sd3", t5_cache_size=0), torch.device("cpu")).t5_cache.max_prompts == 0
    with pytest.raises(ConfigError, match="model.t5_cache_size"):
        ModelConfig(pretrained="tiny-sd3", t5_cache_size=-1)


def test_a_row_cached_in_one_dtype_is_not_served_in_another():
    """The key held (prompt, length, device): a row encoded in fp32 was served to a bf16 call (a caller passing dtype;
    diffusers passes none, see the next test)."""
    calls = []

    def encoder(prompt=None, num_images_per_prompt=1, max_sequence_length=8, device=None, dtype=None):
        calls.append(dtype)
        return torch.ones(len(prompt), 2, 3, dtype=dtype)

    cache = FrozenEncoderCache()
    a = cache._lookup(encoder, ["x"], 1, 8, "cpu", torch.float32)
    b = cache._lookup(encoder, ["x"], 1, 8, "cpu", torch.bfloat16)
    assert (a.dtype, b.dtype) == (torch.float32, torch.bfloat16) and calls == [torch.float32, torch.bfloat16]
    assert cache._lookup(encoder, ["x"], 1, 8, "cpu", torch.bfloat16).dtype == torch.bfloat16 and len(calls) == 2


def test_after_the_pipeline_moves_to_bf16_its_rows_are_bf16(pipe):
    """diffusers' SD3 never passes ``dtype`` to ``_get_t5_prompt_embeds`` (a row's dtype is T5's), so the key's dtype
    was always None and ``pipe.to(torch.bfloat16)`` was served the fp32 rows: sampling then failed on a dtype mismatch."""
    adapter = load_adapter(pipe, max_sequence_length=T5_TOKENS)
    first = adapter.encode(PROMPTS)
    assert first.cond["encoder_hidden_states"].dtype == torch.float32
    pipe.to(torch.bfloat16)
    moved = adapter.encode(PROMPTS)
    expected = _reference(pipe, PROMPTS)[0]
    assert moved.cond["encoder_hidden_states"].dtype == torch.bfloat16 == expected.dtype
    torch.testing.assert_close(moved.cond["encoder_hidden_states"], expected, rtol=0, atol=2e-2)  # bf16 batch vs one prompt per call
