"""bench/probe_alignprop.py: the surrogate's gradient reaches both LoRAs through the sampler, and the hybrid adds
it to Flow-GRPO's single optimizer step of an iteration."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import probe_alignprop as P  # noqa: E402
import soft_shapes  # noqa: E402

from flowalign.config import load_config  # noqa: E402

pytestmark = pytest.mark.skipif(not soft_shapes.DEFAULT_WEIGHTS.is_file(), reason="needs the shipped surrogate detector")


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    cfg = load_config(ROOT / "train" / "configs" / "toy_grpo.yaml", [
        "train.prompts_per_iter=2", "sampling.group_size=4", "sampling.num_steps=4", "sampling.noise_kwargs={a: 0.7, start: 0, size: 2}",
        f"train.output_dir={tmp_path / 'run'}", "train.checkpoint_every=0", "train.progress=false", "train.log_with=[]",
        "train.eval_every=-1", "train.micro_batch_size=8", "train.grad_accum=2", "train.final_eval_samples=0"])
    for name, value in {"per_prompt": 1, "grad_from": 0, "hybrid": 0.0, "paired": False, "reward_mode": "product", "_reward": None}.items():
        monkeypatch.setattr(P.AlignPropTrainer, name, value)
    t = P.AlignPropTrainer(cfg, overwrite=True).setup()
    yield t
    t.cleanup()


def _group_norms(t):
    return [float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in g["params"] if p.grad is not None)))
            for g in t.optim.optimizer.param_groups]


def test_gradient_reaches_the_transformer_and_text_lora_through_every_step(trainer):
    norms = {}
    for k0 in (0, 3):
        type(trainer).grad_from = k0
        trainer.optim.optimizer.zero_grad(set_to_none=True)
        state = trainer.generator.get_state()
        loss, metrics = trainer.alignprop_loss()
        trainer.generator.set_state(state)  # the same samples for both truncations
        loss.backward()
        norms[k0] = _group_norms(trainer)
        assert metrics["alignprop/grad_from"] == k0
    assert len(norms[0]) == 2 and all(n > 0 for n in norms[0])  # transformer LoRA, text-encoder LoRA
    assert all(full > 2 * last for full, last in zip(norms[0], norms[3]))  # the earlier steps carry most of it


def test_hybrid_adds_the_term_to_the_one_optimizer_step(trainer):
    seen = []
    step = trainer.optim.step

    def counting_step(stats):
        seen.append(sum(n * n for n in _group_norms(trainer)) ** 0.5)
        return step(stats)

    trainer.optim.step = counting_step
    for weight in (1e-30, 1.0):  # > 0: the hybrid path, with the term about nothing, then at full weight
        type(trainer).hybrid = weight
        metrics = trainer.run_iteration()
        assert "alignprop/verifier" in metrics and "loss/total" in metrics
    assert len(seen) == 2  # one optimizer step per iteration, the term inside it
    assert seen[1] > 10 * seen[0]
