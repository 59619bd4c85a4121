"""Test-wide settings: offline hub, one torch thread per xdist worker, deterministic seeds."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: oversubscribing threads makes every test slower
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def pipe():
    """The tiny random SD3 pipeline (seed 0, progress bars off), built once per test module that asks for it.
    A module whose tests change the pipeline defines its own (``test_lora.py``, ``test_text_cache.py``: one
    per test; ``test_toy_model.py``: the shipped toy)."""
    from flowalign.pipelines.testing import tiny_sd3_pipeline

    p = tiny_sd3_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def lora_brightness_gain():
    """``gain(trainer, iterations) -> [16]``: run ``iterations`` training iterations, then the brightness of
    paired 4-step ODE samples (4 prompts x 4, the same noise) with the trainer's LoRA on minus off; an
    objective that learned the brightness reward makes it positive by many standard errors."""
    from flowalign import lora as lora_lib
    from flowalign import sampling
    from flowalign.rewards import load_reward

    prompts = ["a red square", "a blue circle", "a green triangle", "a yellow star"]
    reward = load_reward("brightness")

    def gain(trainer, iterations: int) -> torch.Tensor:
        for _ in range(iterations):
            trainer.run_iteration()
            trainer.iteration += 1

        def score():
            images = sampling.sample_ode(trainer.adapter, prompts, num_steps=4, group_size=4, generator=torch.Generator().manual_seed(7))
            return reward(images, [p for p in prompts for _ in range(4)]).scores

        on = score()
        with lora_lib.lora_disabled(trainer.adapter.trainable_module):
            off = score()
        return on - off

    return gain


@pytest.fixture
def resumed_lora_matches():
    """``check(make_config, split, total) -> LoRA state dict``: train ``make_config(out, iterations)`` for
    ``total`` iterations straight, and for ``split`` then resumed to ``total`` in another folder; assert the two
    LoRAs are bit-identical and that training moved them; return the straight run's. ``make_config`` must write
    a checkpoint at ``split``."""
    from flowalign import lora as lora_lib
    from flowalign.train.trainer import Trainer

    def lora_after(config, resume: bool = False) -> dict:
        trainer = Trainer(config, resume=resume).setup()
        trainer.train()
        trainer.cleanup()
        return lora_lib.get_lora_state_dict(trainer.adapter.trainable_module)

    def check(make_config, split: int, total: int, root) -> dict:
        full = lora_after(make_config(root / "full", total))
        lora_after(make_config(root / "split", split))
        resumed = lora_after(make_config(root / "split", total), resume=True)
        assert full.keys() == resumed.keys()
        assert all(torch.equal(full[k], resumed[k]) for k in full)
        assert any(full[k].abs().max() > 0 for k in full if "lora_B" in k)  # it did train
        return full

    return check


@pytest.fixture(scope="session")
def toy_smoke() -> dict:
    """``ToyBuildConfig`` sizes of a toy build that finishes in about a second (smoke tests of the build)."""
    return dict(n_scenes=64, vae_steps=2, vae_batch=8, dit_steps=3, dit_batch=8, dit_layers=1, eval_samples=0)



@pytest.fixture
def write_plugin(tmp_path, monkeypatch):
    """``write(source, prefix) -> name``: ``source`` (dedented) as a module of a fresh name on ``sys.path``, the way
    a user's package holds a reward, objective, kernel or rollout named by dotted path; the modules and the
    objectives they registered are forgotten after the test."""
    import sys
    import textwrap
    import uuid

    from flowalign.objectives import OBJECTIVES

    names = []
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str, prefix: str = "fa_plugin") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)
        for key in [k for k in OBJECTIVES if k.startswith(name)]:
            OBJECTIVES.pop(key)
