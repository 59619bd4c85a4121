"""Overhead of flowalign's SDE rollout (with log-probs) over the plain diffusers pipeline call.

Times ``pipe(prompts, num_inference_steps=K, guidance_scale=w, output_type="pt")`` against
``flowalign.sampling.rollout(adapter, prompts, num_steps=K, kernel="flow_sde", schedule=a, ...)``
on the same tiny offline SD3 pipeline, same prompts, steps, batch and guidance. Both include
prompt encoding, K transformer calls and VAE decoding; the rollout also draws the SDE noise and
records latents, log-probs, stds and x0-predictions. Runs alternate (pipe, rollout, pipe, ...)
after a warm-up so drifting machine load hits both alike; the reported figure is the ratio of
medians (target <= 1.05), with the median of per-pair ratios next to it (steadier when other
processes load the machine) and the ratio of median process CPU times (with ``--threads 1``
the least sensitive to other load).

    python bench/sampler_overhead.py [--steps 10] [--batch 4] [--repeats 15]

Writes ``bench/results/sampler_overhead.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flowalign.pipelines import load_adapter  # noqa: E402
from flowalign.pipelines.testing import tiny_sd3_pipeline  # noqa: E402
from flowalign.sampling import rollout  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "sampler_overhead.json"
PROMPTS = ["a red square above a blue circle", "two green triangles", "a yellow star", "three purple squares"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4, help="images per call")
    parser.add_argument("--repeats", type=int, default=20, help=">= 10 timed runs of each")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    parser.add_argument("--noise-level", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    if args.repeats < 10:
        parser.error(f"--repeats must be >= 10, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = tiny_sd3_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    adapter = load_adapter(pipe, t5_cache_size=0)  # no T5 cache: both sides encode the prompts every call, as pipe() does
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]

    def run_pipe(seed: int) -> None:
        pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(seed), output_type="pt")

    def run_rollout(seed: int) -> None:
        rollout(
            adapter,
            prompts,
            num_steps=args.steps,
            kernel="flow_sde",
            schedule=args.noise_level,
            guidance_scale=args.guidance_scale,
            generator=torch.Generator().manual_seed(seed),
        )

    for i in range(args.warmup):
        run_pipe(i)
        run_rollout(i)
    times = {"pipe": [], "rollout": []}
    cpu_times = {"pipe": [], "rollout": []}
    for i in range(args.repeats):
        for name, fn in (("pipe", run_pipe), ("rollout", run_rollout)) if i % 2 == 0 else (("rollout", run_rollout), ("pipe", run_pipe)):
            start, cpu_start = time.perf_counter(), time.process_time()
            fn(i)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)

    med = {k: statistics.median(v) for k, v in times.items()}
    # each repeat runs both back to back, so a per-pair ratio cancels slow load drift
    pair_ratios = [r / p for r, p in zip(times["rollout"], times["pipe"])]
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    result = {
        "benchmark": "sampler_overhead",
        "pipeline": "tiny_sd3_pipeline(seed=0) (flowalign.pipelines.testing)",
        "steps": args.steps,
        "batch": args.batch,
        "guidance_scale": args.guidance_scale,
        "kernel": "flow_sde",
        "noise_level": args.noise_level,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "median_s": med,
        "times_s": times,
        "ratio_rollout_over_pipe": med["rollout"] / med["pipe"],
        "median_paired_ratio": statistics.median(pair_ratios),
        "median_cpu_s": cpu_med,
        "cpu_time_ratio": cpu_med["rollout"] / cpu_med["pipe"],
        "target_ratio": 1.05,
        "device": "cpu",
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"pipe    median {med['pipe'] * 1e3:8.1f} ms  ({args.repeats} runs, {args.steps} steps, batch {args.batch}, cfg {args.guidance_scale})")
    print(f"rollout median {med['rollout'] * 1e3:8.1f} ms  (flow_sde a={args.noise_level}, log-probs, x0-preds)")
    print(
        f"ratio of medians {result['ratio_rollout_over_pipe']:.3f}, median paired ratio "
        f"{result['median_paired_ratio']:.3f}, CPU-time ratio {result['cpu_time_ratio']:.3f} "
        f"(target <= 1.05) -> {args.output}"
    )
    return result


if __name__ == "__main__":
    main()
