"""How much room does RL have? pass@k of the model's own samples, per ShapesEval category.

RL on a model's own samples (Flow-GRPO, DiffusionNFT, ...) re-weights what the model already
draws; a prompt it never solves gives no reward signal. This samples every *distinct* prompt of a
set ``--n`` times exactly as the run report does (:func:`flowalign.evaluation.evaluate`:
noise-free ODE, the toy's 10 steps and guidance 4.5; sample seeds start at ``--seed``, away from
the report's 0..511) and prints, per category, pass@1 (the accuracy) and pass@k (the unbiased
estimator, :func:`flowalign.evaluation.pass_at_k`) weighted by how often each prompt appears in
the set. pass@n is what perfect sharpening of the model could reach on these prompts; the
held-out prompts are never trained on, so RL reaches them only through what transfers.

    python bench/headroom.py --output bench/results/headroom.json            # the base toy, held-out
    python bench/headroom.py --prompts assets/prompts/shapes_train.jsonl      # the training prompts
    python bench/headroom.py --lora runs/toy_grpo --name aligned              # base + a trained LoRA
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

logger = logging.getLogger("headroom")


def main(argv: Optional[list[str]] = None) -> int:
    from flowalign.config import ModelConfig
    from flowalign.evaluation import evaluate, headroom
    from flowalign.prompts import load_prompts
    from flowalign.rewards import load_reward
    from flowalign.train.model import build_adapter

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--lora", default=None, help="LoRA file or run folder (default: the base model)")
    ap.add_argument("--name", default=None, help="key of this entry in --output (default: base / the LoRA path) and the prompt file")
    ap.add_argument("--prompts", default="assets/prompts/shapes_heldout.jsonl")
    ap.add_argument("--n", type=int, default=16, help="samples per distinct prompt")
    ap.add_argument("--seed", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=None, help="add the table to this JSON file (other entries are kept)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    records = load_prompts(args.prompts)
    frequency = collections.Counter(r.prompt for r in records)
    first: dict = {}
    for r in records:
        first.setdefault(r.prompt, r)  # the first record of each prompt, in file order
    distinct = list(first.values())
    adapter = build_adapter(ModelConfig(pretrained=args.model), torch.device("cpu"))
    start = time.perf_counter()
    result = evaluate(adapter, distinct, load_reward("shapes"), samples_per_prompt=args.n, num_steps=args.steps,
                      guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch_size, lora=args.lora, keep_images=0)
    correct = result.correct().view(len(distinct), args.n).tolist()  # sample i: prompt i // n (the verifier's verdict)
    tags = [r.metadata.get("tag", "untagged") for r in distinct]
    ks = sorted({1, 4, args.n} & set(range(1, args.n + 1)))
    table = headroom(tags, correct, weights=[frequency[r.prompt] for r in distinct], ks=ks)
    lines = [f"{'category':<14}{'prompts':>8}" + "".join(f"{'pass@' + str(k):>10}" for k in ks)]
    for tag, row in table.items():
        lines.append(f"{tag:<14}{int(row['prompts']):>8}" + "".join(f"{100 * row[f'pass@{k}']:>9.1f}%" for k in ks))
    logger.info("%s, %s: %d distinct prompts x %d samples (%.0f s)\n%s", args.lora or "base", args.prompts, len(distinct), args.n,
                time.perf_counter() - start, "\n".join(lines))
    if args.output:
        store = json.loads(args.output.read_text()) if args.output.is_file() else {
            "what": "pass@k per category (bench/headroom.py): distinct prompts x n ODE samples, weighted by prompt frequency", "entries": {}}
        key = f"{args.name or ('base' if args.lora is None else str(args.lora))} @ {Path(args.prompts).name}"
        store["entries"][key] = {"model": args.model, "lora": args.lora, "prompts": args.prompts, "n": args.n, "seed": args.seed,
                                 "steps": args.steps, "guidance": args.guidance, "table": table}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(store, indent=1) + "\n")
        logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
