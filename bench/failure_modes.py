"""Why held-out samples fail, before and after alignment: a failure-mode table for the toy world.

Samples the held-out prompts exactly as the run report does (:func:`flowalign.evaluation.evaluate`:
noise-free ODE, the toy's 10 steps and guidance 4.5, sample ``i`` from seed ``i``) with the base
model and with base + ``--lora``; the ``shapes`` verifier labels every sample with the first level
of GenEval's rule it breaks (:func:`flowalign.rewards.shapes.failure_mode`): ``empty`` (no object
detected), ``malformed`` (a shapeless blob where a shape was asked for), ``shape_count`` (clean but
wrong or missing shapes), ``color``, ``position``.

Prints the run report's failure-mode section (:func:`flowalign.report.failure_section`: counts per
category base -> aligned, and what the LoRA made of each base outcome) for a LoRA that is already
trained (a run folder of any recipe); ``--output`` writes the tables as JSON.

    python bench/failure_modes.py --lora runs/toy_grpo --output bench/results/failure_modes.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

logger = logging.getLogger("failure_modes")


def main(argv: Optional[list[str]] = None) -> int:
    from flowalign.config import ModelConfig
    from flowalign.evaluation import evaluate
    from flowalign.prompts import load_prompts
    from flowalign.report import failure_section, failure_tables
    from flowalign.rewards import load_reward
    from flowalign.train.model import build_adapter

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--lora", required=True, help="LoRA file or run folder (pytorch_lora_weights.safetensors)")
    ap.add_argument("--prompts", default="assets/prompts/shapes_heldout.jsonl")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=None, help="write the tables as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    adapter = build_adapter(ModelConfig(pretrained=args.model), torch.device("cpu"))
    records, reward = load_prompts(args.prompts), load_reward("shapes")
    kw = dict(num_samples=args.samples, num_steps=args.steps, guidance_scale=args.guidance, seed=0, batch_size=args.batch_size,
              keep_images=0, progress=True)
    base = evaluate(adapter, records, reward, **kw)
    aligned = evaluate(adapter, records, reward, lora=args.lora, **kw)  # loaded for this call only
    tables = failure_tables(base, aligned)
    logger.info("held-out accuracy %.1f%% -> %.1f%%\n%s", 100 * base.accuracy, 100 * aligned.accuracy, "\n".join(failure_section(tables)))
    if args.output:
        out = {"settings": {k: v for k, v in vars(args).items() if k not in ("output", "threads", "batch_size")},
               "accuracy": {"base": base.accuracy, "aligned": aligned.accuracy}, **tables}
        Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
        logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
