"""``flowalign train`` argument lists on the tiny recipe, for the tests that train a plugin for an iteration or two."""
from __future__ import annotations

from pathlib import Path

TINY_RECIPE = Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_grpo.yaml"


def train_argv(run, settings, *extra) -> list:
    """``flowalign train --config tiny_grpo.yaml`` with ``--set`` for each item of ``settings``, ``train.output_dir=run``
    and each of ``extra`` (later items win)."""
    argv = ["train", "--config", str(TINY_RECIPE)]
    for item in [*settings, f"train.output_dir={run}", *extra]:
        argv += ["--set", item]
    return argv


TINY_PROMPTS = '{"prompt": "a red circle", "tag": "single"}\n{"prompt": "two blue squares", "tag": "counting"}\n'


def generate_tiny_store(root: Path, prompts: str = TINY_PROMPTS, lora=None) -> Path:
    """``flowalign generate`` a rollout store of the tiny pipeline into ``root/store`` (3 samples per prompt, 2 steps,
    brightness, one prompt per shard; drawn with ``lora`` when given): the store the offline tests train on."""
    from flowalign.train import cli

    (root / "p.jsonl").write_text(prompts)
    gen = root / "gen.yaml"
    gen.write_text("model: {pretrained: tiny-sd3}\n" + (f"lora: {lora}\n" if lora is not None else "")
                   + f"rewards: [{{name: brightness}}]\nprompts: {root / 'p.jsonl'}\nsamples_per_prompt: 3\n"
                   f"num_steps: 2\nguidance_scale: 1.0\nprompts_per_shard: 1\noutput_dir: {root / 'store'}\n")
    assert cli.main(["generate", "--config", str(gen)]) == 0
    return root / "store"
