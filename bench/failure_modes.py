"""Why held-out samples fail, before and after alignment: a failure-mode table for the toy world.

Samples the held-out prompts exactly as the run report does (:func:`flowalign.evaluation.evaluate`:
noise-free ODE, the toy's 10 steps and guidance 4.5, sample ``i`` from seed ``i``) with the base
model and, with ``--lora``, with base + LoRA, detects the objects of every image
(:func:`flowalign.rewards.shapes.detect`) and names the first level of GenEval's rule each sample
breaks (:func:`flowalign.rewards.shapes.failure_mode`): ``malformed`` (a shapeless blob where a
shape was asked for), ``shape_count`` (clean but wrong or missing shapes), ``color``, ``position``.

Prints one table per model (category x mode, counts) and, for base vs LoRA, the transitions
(how many base failures of each mode the LoRA turns correct, and how many correct base samples it
breaks); ``--output`` writes them as JSON.

    python bench/failure_modes.py --lora runs/toy_grpo --output bench/results/failure_modes.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

logger = logging.getLogger("failure_modes")


def sample_modes(model: str, prompts: str, lora: Optional[str], num_samples: int, steps: int, guidance: float, batch_size: int) -> dict:
    """``{"accuracy", "tags": [N], "modes": [N]}`` of one model on the prompt file."""
    from flowalign.config import ModelConfig
    from flowalign.evaluation import evaluate
    from flowalign.prompts import load_prompts
    from flowalign.rewards import load_reward
    from flowalign.rewards.shapes import SIZE, detect, failure_mode
    from flowalign.rewards.shapes_scenes import parse_prompt
    from flowalign.train.model import build_adapter

    records = load_prompts(prompts)
    adapter = build_adapter(ModelConfig(pretrained=model), torch.device("cpu"))
    result = evaluate(adapter, records, load_reward("shapes"), num_samples=num_samples, num_steps=steps, guidance_scale=guidance,
                      seed=0, batch_size=batch_size, lora=lora, keep_images=num_samples, progress=True)
    images = result.images_for(range(result.num_samples)).float().clamp(0, 1)  # [N, 3, H, W]
    if images.shape[-2:] != (SIZE, SIZE):
        images = torch.nn.functional.interpolate(images, size=(SIZE, SIZE), mode="area")
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255.0).astype(np.float32)
    modes = []
    for i in range(result.num_samples):
        meta = dict(records[result.record_index[i]].metadata)
        spec = meta if "include" in meta else parse_prompt(result.prompts[i])
        modes.append(failure_mode(detect(arrays[i]), spec))
    verdicts = [m == "correct" for m in modes]
    scores_ok = (result.scores >= 0.5).tolist()
    if verdicts != scores_ok:  # the same rule on the same images: a mismatch is a bug here
        raise RuntimeError(f"failure_mode disagrees with the reward on {sum(a != b for a, b in zip(verdicts, scores_ok))} samples")
    return {"accuracy": result.accuracy, "tags": list(result.tags), "modes": modes}


def mode_table(tags: list[str], modes: list[str]) -> dict[str, dict[str, int]]:
    """``{category: {mode: count}}`` plus ``"all"``."""
    from flowalign.rewards.shapes import FAILURE_MODES

    table: dict[str, Counter] = defaultdict(Counter)
    for tag, mode in zip(tags, modes):
        table[tag][mode] += 1
        table["all"][mode] += 1
    return {tag: {m: int(table[tag][m]) for m in FAILURE_MODES} for tag in sorted(table, key=lambda t: (t == "all", t))}


def transitions(base: list[str], aligned: list[str]) -> dict[str, dict[str, int]]:
    """``{base mode: {aligned mode: count}}`` over the same samples (same prompts and seeds)."""
    from flowalign.rewards.shapes import FAILURE_MODES

    out = {a: {b: 0 for b in FAILURE_MODES} for a in FAILURE_MODES}
    for a, b in zip(base, aligned):
        out[a][b] += 1
    return out


def markdown(table: dict[str, dict[str, int]], title: str) -> str:
    from flowalign.rewards.shapes import FAILURE_MODES

    lines = [f"### {title}", "", "| category | n | " + " | ".join(FAILURE_MODES) + " |", "|---|---:|" + "---:|" * len(FAILURE_MODES)]
    for tag, row in table.items():
        lines.append(f"| {tag} | {sum(row.values())} | " + " | ".join(str(row[m]) for m in FAILURE_MODES) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--lora", default=None, help="LoRA file or run folder; default: the base model only")
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
    runs = {"base": sample_modes(args.model, args.prompts, None, args.samples, args.steps, args.guidance, args.batch_size)}
    if args.lora:
        runs["aligned"] = sample_modes(args.model, args.prompts, args.lora, args.samples, args.steps, args.guidance, args.batch_size)
    out: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("output", "threads", "batch_size")}}
    for name, run in runs.items():
        out[name] = {"accuracy": run["accuracy"], "table": mode_table(run["tags"], run["modes"])}
        logger.info("%s: accuracy %.1f%%\n%s", name, 100 * run["accuracy"], markdown(out[name]["table"], name))
    if "aligned" in runs:
        out["transitions"] = transitions(runs["base"]["modes"], runs["aligned"]["modes"])
        lines = [f"  {a:>11} -> " + ", ".join(f"{b} {n}" for b, n in row.items() if n) for a, row in out["transitions"].items()]
        logger.info("base mode -> aligned mode (same prompts and seeds):\n%s", "\n".join(lines))
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
        logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
