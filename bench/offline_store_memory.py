"""Memory and latency of one epoch of offline batches from a rollout store of SD3.5-sized latents.

    python bench/offline_store_memory.py [--prompts 250] [--samples-per-prompt 6] [--output bench/results/offline_store_memory.json]

Writes a synthetic store (random 16x64x64 fp32 latents, the size of SD3.5's at 512 px: 256 KiB each, one random reward)
to a scratch folder, then iterates one shuffled epoch of ``RolloutStore.batches`` (k = samples per prompt, 4 groups per
batch) and prints the peak RSS it added over the process's RSS before the epoch, the time to the first batch and the
epoch's time. An epoch used to build every group (every shard read and hashed) before its first batch; it now reads each
batch's rows only.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from flowalign.offline import RolloutStore, fill_store


def peak_rss_mib() -> float:
    """The process's peak resident set so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_one_epoch(root: str, k: int, groups_per_batch: int, queue) -> None:
    """One shuffled epoch of ``RolloutStore(root).batches``; puts its figures on ``queue``."""
    store = RolloutStore(root)
    before = peak_rss_mib()
    start = time.perf_counter()
    first, batches = None, 0
    for _batch, _groups in store.batches(k, groups_per_batch, reward="r", generator=torch.Generator().manual_seed(0)):
        batches += 1
        first = time.perf_counter() - start if first is None else first
    queue.put({"samples": len(store), "batches": batches, "peak_rss_added_mib": round(peak_rss_mib() - before, 1),
               "first_batch_s": round(first, 3), "epoch_s": round(time.perf_counter() - start, 3)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--prompts", type=int, default=250)
    parser.add_argument("--samples-per-prompt", type=int, default=6)
    parser.add_argument("--groups-per-batch", type=int, default=4)
    parser.add_argument("--output", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="flowalign-store-"))
    try:
        prompts = [{"prompt": f"prompt {i}"} for i in range(args.prompts)]

        def sample(texts, seeds):
            return torch.stack([torch.randn(16, 64, 64, generator=torch.Generator().manual_seed(s)) for s in seeds]), None

        def score(images, texts, metadata):
            return {"r": torch.rand(len(texts))}

        fill_store(scratch, prompts, args.samples_per_prompt, sample, score, settings={"model_hash": "synthetic"},
                   prompts_per_shard=16, image_format="none", progress=False)
        store_mib = sum(f.stat().st_size for f in scratch.rglob("*") if f.is_file()) / 2**20
        # a fresh process reads the store: this one's peak RSS already holds the generation's
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        reader = context.Process(target=read_one_epoch, args=(str(scratch), args.samples_per_prompt, args.groups_per_batch, queue))
        reader.start()
        figures = {"store_mib": round(store_mib, 1), **queue.get(timeout=600), "torch": torch.__version__}
        reader.join()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"store {figures['store_mib']} MiB, {figures['samples']} samples: one epoch of {figures['batches']} batches added "
          f"{figures['peak_rss_added_mib']} MiB of peak RSS; first batch after {figures['first_batch_s']} s, epoch {figures['epoch_s']} s")
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
