"""Probe: Flow-GRPO plus an anchor on the unconditional velocity, ``beta · mean ‖v_u(θ) - v_u(ref)‖²`` at each
micro-batch's rows (the reference: every LoRA off; ``v_u``: the velocity for the empty prompt, guidance 1).

Hypothesis (session 36): under CFG 4.5 the sample follows ``v_u + 4.5 (v_c - v_u)``, so a LoRA change of the
unconditional branch enters every prompt's sample 3.5 times over, coupling all prompts (held-out ones included);
anchoring it would leave the prompt-specific part to the policy gradient. Measured: it slows learning instead.

    python bench/probe_uncond_anchor.py --beta 0.1 --name te_uncond_anchor0.1_seed0 --iterations 50 --eval-every 25
"""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import argparse
import torch
import heldout_curve
from flowalign import lora as lora_lib
from flowalign.pipelines.base import Conditioning
from flowalign.train.trainer import Trainer


class AnchorTrainer(Trainer):
    beta = 1.0

    def _micro_step(self, batch, index, k, scale):
        metrics = super()._micro_step(batch, index, k, scale)
        rows = self._make_batch(batch, index, k)
        cond = self.conditioning.policy(batch, index)
        v = self.adapter.velocity(rows.x, rows.sigma, Conditioning(cond=cond.uncond), 1.0)
        with torch.no_grad(), lora_lib.lora_disabled(*self.lora_modules.values()):
            ref = self.conditioning.reference(batch, index) or batch.cond_rows(index)
            v_ref = self.adapter.velocity(rows.x, rows.sigma, Conditioning(cond=ref.uncond), 1.0)
        gap = (v - v_ref).pow(2).mean()
        self.optim.backward(self.beta * gap * scale, f"anchor at step {k}")
        metrics["anchor/uncond_gap"] = float(gap.detach())
        return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--beta", type=float, default=1.0)

    def configure(args):
        AnchorTrainer.beta = args.beta

    heldout_curve.Trainer = AnchorTrainer
    return heldout_curve.main(argv, parents=(parser,), configure=configure)


if __name__ == "__main__":
    main()
