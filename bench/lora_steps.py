"""Where does an aligned LoRA's gain live? Held-out accuracy with the transformer LoRA on the first n steps only.

The main job explores (SDE noise) and trains on the first 3 of the toy's 10 sampling steps, but a
LoRA's weights act on every step. This evaluates a trained LoRA exactly as the run report does
(:func:`flowalign.evaluation.evaluate`: noise-free ODE, the toy's 10 steps and guidance 4.5,
sample ``i`` from seed ``i``) with the transformer's LoRA switched on only for steps ``k < n``
(those at ``sigma > sigmas[n]``) and off after them; the text-encoder LoRA, when the file has one,
stays on, so every ``n`` samples from the same prompt features. ``n = steps`` is the LoRA as
trained; ``n = 0`` is the base transformer on the aligned prompt features.

    python bench/lora_steps.py --lora runs/toy_grpo --output bench/results/lora_steps.json
    python bench/lora_steps.py --lora runs/toy_grpo --n 0 1 3 10 --num-samples 256
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Iterator, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

logger = logging.getLogger("lora_steps")


@contextlib.contextmanager
def transformer_lora_on_first_steps(adapter, num_steps: int, n: int) -> Iterator[None]:
    """Within the block, ``adapter.velocity`` runs the transformer's LoRA only at ``sigma > sigmas[n]``.

    ``sigmas = adapter.sigmas(num_steps)`` is the sampler's decreasing schedule, so step ``k`` (at
    ``sigmas[k]``) has the LoRA on exactly when ``k < n``; ``n >= num_steps`` leaves it on everywhere.
    A ``[B]`` sigma must lie on one side of the cut. Restores the adapter's own ``velocity`` after.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    cut = float(adapter.sigmas(num_steps)[n]) if n < num_steps else -math.inf
    transformer = adapter.pipeline.transformer
    own = adapter.velocity

    def velocity(latents, sigma, cond, guidance_scale: float = 1.0):
        above = torch.as_tensor(sigma, dtype=torch.float32) > cut
        if bool(above.all()):
            return own(latents, sigma, cond, guidance_scale)
        if bool(above.any()):
            raise ValueError(f"sigma rows straddle the LoRA cut at {cut}: {sigma}")
        transformer.disable_lora()
        try:
            return own(latents, sigma, cond, guidance_scale)
        finally:
            transformer.enable_lora()

    adapter.velocity = velocity  # an instance attribute shadows the class method
    try:
        yield
    finally:
        del adapter.velocity


def evaluate_gated(adapter, records, reward, lora, n: int, *, num_steps: int, **evaluate_kwargs):
    """:func:`flowalign.evaluation.evaluate` of base + ``lora`` with the transformer LoRA on the first ``n`` steps."""
    from flowalign.evaluation import evaluate

    with transformer_lora_on_first_steps(adapter, num_steps, n):
        return evaluate(adapter, records, reward, num_steps=num_steps, lora=lora, **evaluate_kwargs)


def main(argv: Optional[list[str]] = None) -> int:
    from flowalign.config import ModelConfig
    from flowalign.prompts import load_prompts
    from flowalign.rewards import load_reward
    from flowalign.train.model import build_adapter

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--lora", required=True, help="LoRA file or run folder")
    ap.add_argument("--prompts", default="assets/prompts/shapes_heldout.jsonl")
    ap.add_argument("--reward", default="shapes")
    ap.add_argument("--n", type=int, nargs="+", default=[0, 1, 2, 3, 4, 6, 10], help="steps with the transformer LoRA on")
    ap.add_argument("--num-samples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    records = load_prompts(args.prompts)
    reward = load_reward(args.reward)
    adapter = build_adapter(ModelConfig(pretrained=args.model), torch.device("cpu"))
    rows = {}
    for n in args.n:
        start = time.perf_counter()
        result = evaluate_gated(adapter, records, reward, args.lora, n, num_steps=args.steps, num_samples=args.num_samples,
                                guidance_scale=args.guidance, batch_size=args.batch_size, keep_images=0, progress=False)
        rows[n] = {name: stats.accuracy for name, stats in result.categories.items()}
        logger.info("LoRA on the first %2d of %d steps: %.1f%%  (%s)  %.0f s", n, args.steps, 100 * result.accuracy,
                    "  ".join(f"{k} {100 * v:.1f}" for k, v in rows[n].items() if k != "all"), time.perf_counter() - start)
    if args.output:
        out = {"what": "held-out accuracy with the transformer LoRA on the first n sampling steps only (bench/lora_steps.py)",
               "settings": {"model": args.model, "lora": str(args.lora), "prompts": args.prompts, "num_samples": args.num_samples,
                            "steps": args.steps, "guidance": args.guidance},
               "accuracy": {str(n): row for n, row in rows.items()}}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=1) + "\n")
        logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
