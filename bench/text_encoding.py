"""What the frozen-T5 cache saves when the text encoders train (``lora.train_text_encoder``).

The update re-encodes each micro-batch's prompts with gradient. Without the cache that runs all
three SD3 encoders; with it (``SD3Adapter(t5_cache_size > 0)``, the default) only the two CLIP
encoders run and T5's rows come from memory. This script times ``adapter.encode(prompts,
requires_grad=True)`` plus its backward on a tiny SD3 pipeline whose T5 is sized against its CLIP
encoders as in SD3.5: there T5-XXL holds about 4.63B non-embedding parameters and runs 256 tokens,
CLIP-L + CLIP-G about 0.72B on 77 tokens, so T5 costs about 21x the CLIP encoders' forward
(parameters x tokens); the defaults here give 22x. Figures go to ``bench/results/text_encoding.json``.

    .venv/bin/python bench/text_encoding.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from flowalign.pipelines import components, load_adapter
from flowalign.pipelines.testing import tiny_sd3_pipeline

logger = logging.getLogger("text_encoding")
RESULTS = Path(__file__).resolve().parent / "results" / "text_encoding.json"


SD35_T5_TO_CLIP_COST = 4.63e9 * 256 / (0.72e9 * 77)


def _params(module) -> int:
    """Non-embedding parameters: what a token's forward costs in multiply-adds."""
    embedding = sum(p.numel() for m in module.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    return sum(p.numel() for p in module.parameters()) - embedding


def build(t5_layers: int, t5_ff: int, tokens: int):
    pipe = tiny_sd3_pipeline(seed=0, clip_hidden_size=64, t5_max_length=tokens)  # joint dim 128 = T5 d_model
    pipe.text_encoder_3 = components.tiny_t5_encoder(d_model=128, d_kv=32, d_ff=t5_ff, num_layers=t5_layers, num_heads=4, seed=2)
    for module in (pipe.text_encoder_3, pipe.transformer, pipe.vae):
        module.requires_grad_(False)
    for module in (pipe.text_encoder, pipe.text_encoder_2):  # stands in for the CLIP LoRA: gradient flows
        module.requires_grad_(True)
    return pipe


def time_update_encodes(adapter, prompts: list[str], repeats: int) -> float:
    """Seconds per re-encode with gradient + backward, as the update does at each micro-step."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        cond = adapter.encode(prompts, requires_grad=True)
        (cond.cond["encoder_hidden_states"].square().mean() + cond.cond["pooled_projections"].square().mean()).backward()
        times.append(time.perf_counter() - start)
    return min(times[1:])  # the first call fills the cache (a rollout's encode does that in training)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts per micro-batch")
    parser.add_argument("--tokens", type=int, default=256, help="T5 tokens (SD3.5 trains with 256)")
    parser.add_argument("--t5-layers", type=int, default=4)
    parser.add_argument("--t5-ff", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    pipe = build(args.t5_layers, args.t5_ff, args.tokens)
    prompts = [f"prompt number {i}: a red square left of {i % 4 + 1} blue circles" for i in range(args.prompts)]
    clip = _params(pipe.text_encoder) + _params(pipe.text_encoder_2)
    t5 = _params(pipe.text_encoder_3)
    cost_ratio = t5 * args.tokens / (clip * pipe.tokenizer.model_max_length)
    uncached = time_update_encodes(load_adapter(pipe, max_sequence_length=args.tokens, t5_cache_size=0), prompts, args.repeats)
    cached = time_update_encodes(load_adapter(pipe, max_sequence_length=args.tokens), prompts, args.repeats)
    result = {
        "what": "seconds per adapter.encode(prompts, requires_grad=True) + backward (the update's re-encoding), best of repeats",
        "prompts": args.prompts, "t5_tokens": args.tokens, "threads": args.threads,
        "clip_non_embedding_params": clip, "t5_non_embedding_params": t5,
        "t5_to_clip_forward_cost": round(cost_ratio, 1), "sd35_t5_to_clip_forward_cost": round(SD35_T5_TO_CLIP_COST, 1),
        "uncached_s": round(uncached, 4), "cached_s": round(cached, 4), "speedup": round(uncached / cached, 2),
    }
    logger.info("CLIP %.3fM, T5 %.3fM non-embedding parameters; T5's forward costs %.1fx the CLIP encoders' (SD3.5: %.1fx); "
                "%d prompts, %d T5 tokens", clip / 1e6, t5 / 1e6, cost_ratio, SD35_T5_TO_CLIP_COST, args.prompts, args.tokens)
    logger.info("re-encode with gradient + backward: %.3f s without the T5 cache, %.3f s with it (%.1fx)", uncached, cached,
                uncached / cached)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
