"""Offline GDRO (or AWM) from one stored generation pass vs online Flow-GRPO: held-out accuracy vs compute.

Both arms start from the same base model and LoRA settings and are charged for everything they
run except evaluation: the offline arm pays one generation pass (``flowalign generate``: ODE
samples of the training prompts + rewards) and then GDRO updates (one policy forward/backward
and one reference forward per stored sample and step, no sampling); the online arm pays
Flow-GRPO rollouts (SDE sampling + rewards) and updates every iteration. Compute is reported as
wall-clock seconds and NFE (transformer rows evaluated, CFG counted twice: every call of
``adapter.velocity`` is counted). Held-out accuracy comes from ``flowalign.evaluation.evaluate``
(per-sample-seeded ODE samples of the held-out prompts, same seeds at every evaluation).

The online arm is the recipe ``train/configs/toy_grpo.yaml`` as it is (only its length, output
folder and logging are overridden); the offline arm generates with the same model, sampler steps,
CFG scale and LoRA size, then trains with ``--offline-recipe`` (default ``train/configs/toy_gdro.yaml``; ``--offline-set``
overrides it). Every held-out evaluation also records the corrected score's quality signal
(:class:`flowalign.corrected.ImageStatsQuality`, fitted on clean toy renders): mean ``q`` and the
share of samples with ``q < 0.5``, so an accuracy gain bought with degraded images shows.

    nice -n 19 python bench/offline_vs_online.py               # toy model, shapes reward
    python bench/offline_vs_online.py --model tiny-sd3 --reward brightness --quick   # smoke run

Writes ``bench/results/offline_vs_online_<model>_<reward>.json`` (points of both arms and a
``summary``: the online arm's final accuracy, the first offline point reaching it and the compute
ratios) and prints a table of (seconds, NFE, held-out accuracy, mean score, mean q) per arm.
Seconds exclude evaluation; on a shared machine they vary with the load, NFE does not.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flowalign.config import RewardConfig, load_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


class NFECounter:
    """Wrap ``adapter.velocity`` to count transformer rows (x2 with CFG); ``paused`` during eval."""

    def __init__(self, adapter):
        self.value, self.paused, self.eval_seconds = 0, False, 0.0
        inner = adapter.velocity

        def velocity(latents, sigma, cond, guidance_scale=1.0):
            if not self.paused:
                cfg = guidance_scale > 1.0 and getattr(cond, "uncond", None) is not None
                self.value += latents.shape[0] * (2 if cfg else 1)
            return inner(latents, sigma, cond, guidance_scale)

        adapter.velocity = velocity


def held_out_accuracy(adapter, counter, records, reward, args) -> dict:
    """Held-out accuracy and mean score (ODE, fixed seeds), plus the quality signal of the samples."""
    from flowalign.corrected import QualityTap
    from flowalign.evaluation import evaluate

    tap = QualityTap(reward, args.quality)
    counter.paused = True
    start = time.perf_counter()
    try:
        result = evaluate(adapter, records, tap, num_steps=args.eval_steps,
                          guidance_scale=args.guidance, seed=10_000, batch_size=32, keep_images=0, progress=False)
    finally:
        counter.paused = False
        counter.eval_seconds += time.perf_counter() - start
    stats = result.categories["all"]
    q = torch.cat(tap.qualities)
    return {"accuracy": float(stats.accuracy), "mean_score": float(stats.mean_score),
            "mean_quality": float(q.mean()), "low_quality_frac": float((q < 0.5).float().mean())}


def run_offline(args, records_train, records_eval, reward, workdir: Path) -> list[dict]:
    from flowalign.offline import fill_store
    from flowalign.train.generate import adapter_sample_fn, reward_score_fn
    from flowalign.train.offline_trainer import OfflineTrainer, load_offline_config
    from flowalign.train.model import build_adapter

    online = args.online_config
    adapter = build_adapter(online.model, torch.device("cpu"))
    counter = NFECounter(adapter)
    points = [{"seconds": 0.0, "nfe": 0, **held_out_accuracy(adapter, counter, records_eval, reward, args), "phase": "base"}]
    logging.info("offline base %s", points[0])
    t0 = time.perf_counter()
    sample_fn = adapter_sample_fn(adapter, args.gen_steps, args.guidance, args.gen_kernel, args.gen_noise, batch_size=64)
    score_fn = reward_score_fn([RewardConfig(name=args.reward)])
    prompts = [{"prompt": r.prompt, **r.metadata} for r in records_train]
    store = fill_store(workdir / "store", prompts, args.group, sample_fn, score_fn, base_seed=args.seed, prompts_per_shard=16)
    gen_seconds, gen_nfe = time.perf_counter() - t0, counter.value
    rewards = torch.tensor([s["rewards"][args.reward] for s in store.records()]).view(-1, args.group)  # [P, G]
    tied = float((rewards.max(1).values == rewards.min(1).values).float().mean())
    logging.info("generation: %d samples, %.1fs, %d NFE, mean reward %.3f, tied groups %.2f", len(store), gen_seconds, gen_nfe, rewards.mean(), tied)
    points.append({**points[0], "seconds": gen_seconds, "nfe": gen_nfe, "phase": "generated", "train_reward_mean": float(rewards.mean()),
                   "tied_group_frac": tied})

    overrides = [f"model.pretrained={online.model.pretrained}", f"lora.rank={online.lora.rank}", f"lora.alpha={online.lora.alpha}",
                 f"store={workdir / 'store'}", f"output_dir={workdir / 'gdro'}", f"seed={args.seed}", "checkpoint_every=0",
                 f"k={args.group}"]  # the offline recipe's own reward is kept (the store holds --reward and its "/partial")
    cfg = load_offline_config(args.offline_recipe, overrides + list(args.offline_set))
    trainer = OfflineTrainer(cfg, adapter=adapter).setup()
    counter.eval_seconds = 0.0
    t_train = time.perf_counter()

    def on_step(tr, metrics):
        if tr.step % args.eval_every_offline == 0:
            seconds = gen_seconds + (time.perf_counter() - t_train) - counter.eval_seconds  # training wall time without evals
            acc = held_out_accuracy(adapter, counter, records_eval, reward, args)
            points.append({"seconds": seconds, "nfe": counter.value, **acc, "phase": f"{cfg.objective} step {tr.step}",
                           "loss": metrics["loss"], "implicit_acc": metrics.get("gdro/implicit_acc")})
            logging.info("offline %s", points[-1])

    trainer.train(callback=on_step)
    args.offline_config = cfg
    return points


def run_online(args, reward, records_eval, workdir: Path) -> list[dict]:
    from flowalign.train.model import build_adapter
    from flowalign.train.trainer import Trainer

    config = args.online_config
    adapter = build_adapter(config.model, torch.device("cpu"))
    counter = NFECounter(adapter)
    trainer = Trainer(config, adapter=adapter, overwrite=True).setup()
    points = [{"seconds": 0.0, "nfe": 0, **held_out_accuracy(adapter, counter, records_eval, reward, args), "phase": "base"}]
    seconds = 0.0
    while trainer.iteration < config.train.iterations:
        metrics = trainer.run_iteration()
        trainer.iteration += 1
        seconds += metrics["time/iteration"]
        if trainer.iteration % args.eval_every_online == 0 or trainer.iteration == config.train.iterations:
            acc = held_out_accuracy(adapter, counter, records_eval, reward, args)
            points.append({"seconds": seconds, "nfe": counter.value, **acc, "phase": f"grpo iteration {trainer.iteration}",
                           "reward_mean": metrics.get("reward/mean")})
            logging.info("online %s", points[-1])
    trainer.cleanup()
    return points


def summarize(offline: list[dict], online: list[dict]) -> dict:
    """Online final accuracy, the first offline point at or above it, and the compute ratios."""
    final = online[-1]
    reached = next((p for p in offline[2:] if p["accuracy"] >= final["accuracy"]), None)
    best = max(offline[2:], key=lambda p: p["accuracy"]) if len(offline) > 2 else offline[-1]
    out = {"online_base_accuracy": online[0]["accuracy"], "online_final_accuracy": final["accuracy"],
           "online_seconds": final["seconds"], "online_nfe": final["nfe"],
           "offline_best_accuracy": best["accuracy"], "offline_best_phase": best["phase"],
           "offline_best_seconds_ratio": best["seconds"] / final["seconds"], "offline_best_nfe_ratio": best["nfe"] / final["nfe"],
           "offline_total_seconds_ratio": offline[-1]["seconds"] / final["seconds"], "offline_total_nfe_ratio": offline[-1]["nfe"] / final["nfe"],
           "offline_reaches_online_final": reached is not None}
    if reached is not None:
        out.update({"offline_reached_phase": reached["phase"], "seconds_ratio": reached["seconds"] / final["seconds"],
                    "nfe_ratio": reached["nfe"] / final["nfe"]})
    return out


def table(name: str, points: list[dict]) -> str:
    lines = [f"**{name}**", "", "| phase | seconds | NFE | held-out accuracy | mean score | mean q | q < 0.5 |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {p['phase']} | {p['seconds']:.1f} | {p['nfe']} | {p['accuracy']:.3f} | {p['mean_score']:.4f} | "
              f"{p['mean_quality']:.3f} | {p['low_quality_frac']:.3f} |" for p in points]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--online-recipe", default=str(REPO / "train" / "configs" / "toy_grpo.yaml"), help="the online arm's recipe, used as it is")
    parser.add_argument("--online-iterations", type=int, default=None, help="default: the recipe's train.iterations")
    parser.add_argument("--online-set", action="append", default=[], help="extra --set overrides of the online recipe")
    parser.add_argument("--offline-recipe", default=str(REPO / "train" / "configs" / "toy_gdro.yaml"),
                        help="the offline arm's recipe (toy_gdro.yaml, toy_awm_offline.yaml)")
    parser.add_argument("--offline-set", action="append", default=[], help="--set overrides of the offline recipe")
    parser.add_argument("--model", default=None, help="default: the online recipe's model.pretrained")
    parser.add_argument("--reward", default=None, help="default: the online recipe's first reward")
    parser.add_argument("--train-prompts", default=str(REPO / "assets" / "prompts" / "shapes_train.jsonl"))
    parser.add_argument("--eval-prompts", default=str(REPO / "assets" / "prompts" / "shapes_heldout.jsonl"))
    parser.add_argument("--num-train-prompts", type=int, default=96, help="prompts in the offline generation pass (a seeded random subset)")
    parser.add_argument("--group", type=int, default=6, help="samples per prompt in the store (= GDRO's k)")
    parser.add_argument("--gen-kernel", default="ode", help="sampler of the generation pass (ode, flow_sde, ...)")
    parser.add_argument("--gen-noise", type=float, default=0.0, help="noise level of a stochastic generation kernel")
    parser.add_argument("--eval-samples", type=int, default=160, help="held-out prompts evaluated (an even subset), one sample each")
    parser.add_argument("--eval-every-offline", type=int, default=8)
    parser.add_argument("--eval-every-online", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--offline-only", action="store_true", help="run only the offline arm (compare with a saved online arm)")
    parser.add_argument("--online-from", default=None, help="with --offline-only: a results JSON whose online arm is reused")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    args = parser.parse_args(argv)
    online_set = list(args.online_set)
    if args.quick:
        args.num_train_prompts, args.group, args.eval_samples = 8, 4, 16
        args.eval_every_offline, args.eval_every_online = 2, 1
        args.online_iterations = args.online_iterations or 2
        online_set += ["train.prompts_per_iter=2", "sampling.group_size=4", "sampling.num_steps=3", "sampling.eval_num_steps=3",
                       "train.micro_batch_size=8", "train.grad_accum=3"]
        args.offline_set = ["groups_per_batch=2", "epochs=1", *args.offline_set]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "flowalign.pipelines", "flowalign.lora", "flowalign.evaluation"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(max(1, args.threads))

    from flowalign.config import to_dict
    from flowalign.corrected import ImageStatsQuality
    from flowalign.prompts import load_prompts
    from flowalign.rewards import load_reward

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"train.output_dir={Path(tmp) / 'grpo'}", "train.eval_every=-1", "train.checkpoint_every=0", "train.progress=false",
                     "train.log_with=[csv]", "train.final_eval_samples=0", f"train.seed={args.seed}"]
        if args.online_iterations is not None:
            overrides.append(f"train.iterations={args.online_iterations}")
        if args.model is not None:
            overrides.append(f"model.pretrained={args.model}")
        if args.reward is not None:
            overrides.append(f"rewards=[{{name: {args.reward}}}]")
        args.online_config = load_config(args.online_recipe, overrides + online_set)
        cfg = args.online_config
        args.model, args.reward = cfg.model.pretrained, cfg.rewards[0].name
        args.gen_steps, args.guidance, args.eval_steps = cfg.sampling.num_steps, cfg.sampling.guidance_scale, cfg.sampling.eval_num_steps
        args.quality = ImageStatsQuality()  # fitted on clean toy renders
        reward = load_reward(args.reward)
        records_train = load_prompts(args.train_prompts)
        pick = torch.randperm(len(records_train), generator=torch.Generator().manual_seed(args.seed))[: args.num_train_prompts]
        records_train = [records_train[i] for i in sorted(pick.tolist())]  # every category, not the file's first ones
        records_eval = load_prompts(args.eval_prompts)
        stride = max(1, len(records_eval) // args.eval_samples)  # an even subset keeps every category
        records_eval = records_eval[::stride][: args.eval_samples]
        offline = run_offline(args, records_train, records_eval, reward, Path(tmp))
        if args.offline_only:
            online = json.loads(Path(args.online_from).read_text())["online_flow_grpo"] if args.online_from else None
        else:
            online = run_online(args, reward, records_eval, Path(tmp))
    summary = summarize(offline, online) if online else {}
    settings = {k: v for k, v in vars(args).items() if k not in ("online_config", "offline_config", "quality")}
    online_config = to_dict(args.online_config)
    if args.offline_only and args.online_from:  # the online points come from that file: record the config they ran with
        online_config = json.loads(Path(args.online_from).read_text()).get("settings", {}).get("online_config")
    result = {
        "settings": {**settings, "online_config": online_config, "offline_config": to_dict(args.offline_config)},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "note": "shared 2-core machine, run under nice -n 19: seconds depend on the load, NFE does not"},
        "summary": summary,
        f"offline_{args.offline_config.objective}": offline,
        "online_flow_grpo": online,
    }
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = f"offline_vs_online_{Path(args.model).name}_{args.reward}" + (f"_{args.tag}" if args.tag else "")
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(f"offline {args.offline_config.objective} (one generation pass)", offline))
    if online:
        print()
        print(table("online Flow-GRPO", online))
    print()
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
