"""Probe, not product code: Flow-GRPO with LoRA on the toy's two CLIP text encoders as well as
on the transformer, measured like bench/heldout_curve.py (same arguments and output).

    .venv/bin/python bench/text_encoder_lora_probe.py --name te_seed0 --iterations 50 --eval-every 25 --set train.seed=0

Why: the toy's co-trained text encoders give some words near-identical features (bench/README.md),
which a LoRA on the transformer alone cannot split. Here the text encoders get rank-8 LoRA on their
attention projections (``flowalign.lora.add_lora``, which injects peft directly into non-diffusers modules),
in the same optimizer, and each micro-batch's prompts are re-encoded *with* gradients in the update
(the rollouts keep their no-grad conditioning, which equals the re-encoded one before the first
step, so the ratio starts at 1) by overriding the trainer's ``_update_cond``. What
it does not do: save the text-encoder LoRA into the run's LoRA file, checkpoint or resume it, or
disable it for the reference (the diagnostic kl/ref then sees the text LoRA on both sides).
Results: bench/results/heldout_curve.json, variants ``text_encoder_lora_seed0`` / ``_seed1`` / ``_seed2``
(+12.3 / +10.1 / +9.7 points at 50 iterations, against +11.1 / +9.4 / +7.0 without it)."""
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import heldout_curve  # noqa: E402
from flowalign import lora as L  # noqa: E402
from flowalign.train import trainer as T  # noqa: E402

TE_RANK = 8
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class TextLoraTrainer(T.Trainer):
    def _setup_model(self) -> None:
        super()._setup_model()
        pipe = self.adapter.pipeline
        extra = []
        for name in ("text_encoder", "text_encoder_2"):
            extra += L.add_lora(getattr(pipe, name), TE_RANK, 2.0 * TE_RANK, CLIP_TARGETS, init="gaussian")
        self.optimizer.add_param_group({"params": extra})
        self.params = list(self.params) + extra
        logging.getLogger("te_probe").info("text-encoder LoRA: %d parameters", sum(p.numel() for p in extra))

    def _update_cond(self, batch, index):
        prompts = [batch.traj.prompts[i] for i in index.tolist()]
        encode = type(self.adapter).encode.__wrapped__  # the adapter's encode without its no_grad
        return encode(self.adapter, prompts, do_classifier_free_guidance=self.config.sampling.guidance_scale > 1.0)


heldout_curve.Trainer = TextLoraTrainer
if __name__ == "__main__":
    heldout_curve.main(sys.argv[1:])
