"""Does the toy's VAE cap the verifier's score? Ground-truth scenes vs their VAE round trip, per category.

A sample of the toy is decoded by its VAE, so no model drawing through that VAE can score more than
the verifier gives the VAE's reconstructions of perfect scenes. For every record of a prompt set this
renders ``--per-prompt`` ground-truth scenes of its spec (:func:`flowalign.rewards.shapes_scenes.render_spec`,
seeded), encodes them with the model's VAE (the posterior mode), decodes them, and prints the
``shapes`` verifier's accuracy (its own binary verdict) on the renders and on the round trips.

    python bench/vae_roundtrip.py --output bench/results/vae_roundtrip.json
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

logger = logging.getLogger("vae_roundtrip")


@torch.no_grad()
def round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] through ``vae.encode`` (posterior mode) and ``vae.decode``, back in [0, 1]."""
    z = vae.encode(images * 2.0 - 1.0).latent_dist.mode()
    return ((vae.decode(z).sample + 1.0) / 2.0).clamp(0.0, 1.0)


def accuracy_by_tag(verdicts: list[bool], tags: list[str]) -> dict[str, float]:
    """Fraction of true verdicts per tag, and over all of them (``"all"``)."""
    hits, totals = collections.Counter(), collections.Counter()
    for ok, tag in zip(verdicts, tags):
        hits[tag] += int(ok)
        totals[tag] += 1
    out = {tag: hits[tag] / totals[tag] for tag in sorted(totals)}
    out["all"] = sum(hits.values()) / max(1, sum(totals.values()))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    from diffusers import AutoencoderKL

    from flowalign.prompts import load_prompts
    from flowalign.rewards import load_reward
    from flowalign.rewards.shapes_scenes import render_spec
    from flowalign.train.model import resolve_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy", help="a diffusers folder with a vae/ (default: the shipped toy)")
    ap.add_argument("--prompts", default="assets/prompts/shapes_heldout.jsonl")
    ap.add_argument("--per-prompt", type=int, default=2, help="ground-truth scenes per record")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    folder = resolve_path("assets/toy" if args.model == "toy" else args.model)
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True).eval()
    records = load_prompts(args.prompts)
    rng = np.random.default_rng(args.seed)
    rows = [r for r in records for _ in range(args.per_prompt)]
    scenes = np.stack([render_spec(r.metadata, rng) for r in rows])  # [N, 32, 32, 3] uint8
    images = torch.from_numpy(scenes).permute(0, 3, 1, 2).float() / 255.0
    decoded = torch.cat([round_trip(vae, chunk) for chunk in images.split(64)])
    reward = load_reward("shapes")
    prompts, metadata, tags = [r.prompt for r in rows], [r.metadata for r in rows], [r.metadata.get("tag", "?") for r in rows]
    result = {}
    for name, batch in (("ground_truth", images), ("vae_round_trip", decoded)):
        binary = reward(batch, prompts, metadata).details["binary"]
        result[name] = accuracy_by_tag([bool(b) for b in binary], tags)
    result["settings"] = {"model": args.model, "prompts": args.prompts, "scenes": len(rows), "seed": args.seed,
                          "mean_abs_error": float((decoded - images).abs().mean()), "seconds": round(time.perf_counter() - start, 1)}
    for tag in result["ground_truth"]:
        print(f"{tag:12s} ground truth {100 * result['ground_truth'][tag]:5.1f}%   VAE round trip {100 * result['vae_round_trip'][tag]:5.1f}%")
    print(f"{len(rows)} scenes, mean |round trip - render| {result['settings']['mean_abs_error']:.4f} (pixels in [0, 1])")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
        logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
