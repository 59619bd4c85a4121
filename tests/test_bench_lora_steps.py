"""bench/lora_steps.py: the step gate by hand, and its two ends against plain evaluations."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import lora_steps  # noqa: E402

from flowalign import lora as lora_lib  # noqa: E402
from flowalign.config import ModelConfig  # noqa: E402
from flowalign.evaluation import evaluate  # noqa: E402
from flowalign.pipelines.testing import add_random_lora  # noqa: E402
from flowalign.rewards import load_reward  # noqa: E402
from flowalign.train.model import build_adapter  # noqa: E402


class _Transformer:
    def __init__(self):
        self.lora_on = True

    def disable_lora(self):
        self.lora_on = False

    def enable_lora(self):
        self.lora_on = True


class _Pipeline:
    def __init__(self):
        self.transformer = _Transformer()


class _Adapter:
    """Sigmas 1, 0.75, 0.5, 0.25, 0; ``velocity`` reports whether the LoRA was on."""

    def __init__(self):
        self.pipeline = _Pipeline()

    def sigmas(self, num_steps):
        return torch.linspace(1.0, 0.0, num_steps + 1)

    def velocity(self, latents, sigma, cond, guidance_scale=1.0):
        return self.pipeline.transformer.lora_on


@pytest.mark.parametrize("n, expected", [(0, [False] * 4), (1, [True, False, False, False]), (3, [True, True, True, False]), (4, [True] * 4), (9, [True] * 4)])
def test_gate_turns_the_lora_off_from_step_n(n, expected):
    adapter = _Adapter()
    with lora_steps.transformer_lora_on_first_steps(adapter, 4, n):
        seen = [adapter.velocity(None, s, None) for s in adapter.sigmas(4)[:-1].tolist()]
        assert seen == expected
        assert adapter.velocity(None, torch.tensor([1.0, 1.0]), None) is (n >= 1)  # a [B] sigma, all rows at step 0
        assert adapter.velocity(None, torch.tensor([0.25, 0.25]), None) is (n >= 4)
        if 0 < n < 4:
            with pytest.raises(ValueError, match="straddle"):
                adapter.velocity(None, adapter.sigmas(4)[n - 1:n + 1], None)
    assert "velocity" not in vars(adapter) and adapter.pipeline.transformer.lora_on


def test_negative_n_is_refused():
    with pytest.raises(ValueError, match="n must be >= 0"):
        with lora_steps.transformer_lora_on_first_steps(_Adapter(), 4, -1):
            pass


@pytest.fixture(scope="module")
def tiny():
    return build_adapter(ModelConfig(pretrained="tiny-sd3"), torch.device("cpu"))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A clearly non-zero transformer LoRA for the tiny pipeline (written from a second copy of it)."""
    pipe = build_adapter(ModelConfig(pretrained="tiny-sd3"), torch.device("cpu")).pipeline
    add_random_lora(pipe.transformer)
    directory = tmp_path_factory.mktemp("lora")
    lora_lib.save_lora_weights(pipe, directory, lora_lib.get_lora_state_dict(pipe.transformer))
    return directory


def test_both_ends_match_plain_evaluations(tiny, lora_dir):
    """n = steps is the LoRA everywhere, n = 0 the base; a middle n differs from both."""
    records = ["a red square", "two blue circles"]
    kw = dict(num_samples=4, guidance_scale=1.0, seed=5, keep_images=0, progress=False)
    reward = load_reward("brightness")
    steps = 3
    base = evaluate(tiny, records, reward, num_steps=steps, **kw)
    full = evaluate(tiny, records, reward, num_steps=steps, lora=lora_dir, **kw)
    assert not torch.equal(base.scores, full.scores)
    gated = {n: lora_steps.evaluate_gated(tiny, records, reward, lora_dir, n, num_steps=steps, **kw) for n in (0, 1, steps)}
    assert torch.equal(gated[steps].scores, full.scores)
    assert torch.equal(gated[0].scores, base.scores)
    assert not torch.equal(gated[1].scores, base.scores) and not torch.equal(gated[1].scores, full.scores)
    assert not getattr(tiny.pipeline.transformer, "peft_config", {})  # the LoRA is removed again


def test_script_writes_a_row_per_n(tmp_path, lora_dir):
    out = tmp_path / "steps.json"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\na blue circle\n")
    assert lora_steps.main(["--model", "tiny-sd3", "--lora", str(lora_dir), "--prompts", str(prompts), "--reward", "brightness",
                            "--n", "0", "2", "--num-samples", "2", "--steps", "2", "--guidance", "1", "--threads", "1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["accuracy"]) == {"0", "2"}
    assert all(0.0 <= row["all"] <= 1.0 for row in result["accuracy"].values())
    assert result["settings"]["num_samples"] == 2
