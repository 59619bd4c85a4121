"""Ready for video families and adapters of other packages (DESIGN.md §3, later wave).

* what draws pictures takes videos ``[N, F, 3, H, W]``: sample grids and ``before_after.png`` show a strip of frames
  per cell (:func:`flowalign.plots.frame_strip`), the rollout store's PNGs hold every frame, and the image-statistics
  quality signal averages over frames (each raised on 5-D input before);
* ``model.adapter`` names an adapter by dotted path (as rewards and objectives are named), ``model.adapter_kwargs``
  passes its own settings, and SD3's settings go only to adapters that take them.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign.config import ModelConfig, load_config
from flowalign.corrected import image_statistics
from flowalign.errors import ConfigError
from flowalign.plots import frame_strip, image_grid
from flowalign.report import before_after_grid, grid_size


def _video(n=2, frames=5, h=4, w=6, seed=0):
    return torch.rand(n, frames, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_frame_strip_picks_evenly_spaced_frames_left_to_right():
    video = _video()
    strip = frame_strip(video, max_frames=4)  # linspace(0, 4, 4) = 0, 1.33, 2.67, 4 -> frames 0, 1, 3, 4
    assert strip.shape == (2, 3, 4, 4 * 6)
    for slot, frame in enumerate([0, 1, 3, 4]):
        assert torch.equal(strip[:, :, :, slot * 6:(slot + 1) * 6], video[:, frame])
    assert torch.equal(frame_strip(video, max_frames=9)[:, :, :, 4 * 6:], video[:, 4])  # all 5 when fewer than asked
    images = torch.rand(2, 3, 4, 6)
    assert frame_strip(images) is images
    with pytest.raises(ValueError, match=r"\[N, F, 3, H, W\]"):
        frame_strip(torch.rand(2, 5, 4, 4, 6))


def test_grids_take_videos(tmp_path):
    video = _video(n=3, h=8, w=8)
    path = image_grid(video, tmp_path / "grid.png", nrow=3, captions=["a", "b", "c"], upscale=1, pad=2, caption_height=12)
    assert Image.open(path).size == (3 * (4 * 8 + 2) + 2, (8 + 12 + 2) + 2)  # cells 4 frames wide
    aligned = _video(n=3, h=8, w=8, seed=1)
    out = before_after_grid(video, aligned, ["a", "b", "c"], tmp_path / "ba.png", scale=2)
    assert Image.open(out).size == grid_size(3, 8, 4 * 8, scale=2)


def test_image_statistics_of_a_video_average_its_frames():
    video = _video(n=2, frames=3, h=8, w=8)
    per_frame = torch.stack([image_statistics(video[:, f]) for f in range(3)], dim=1)  # [2, 3, features]
    assert torch.allclose(image_statistics(video), per_frame.mean(dim=1), atol=1e-6)


def test_rollout_store_writes_a_video_as_one_png_of_its_frames(tmp_path):
    from flowalign.offline import RolloutWriter

    writer = RolloutWriter(tmp_path / "store", {"test": True})
    video = _video(n=2, frames=3, h=4, w=4)
    samples = [{"prompt": "p", "prompt_index": 0, "group": 0, "member": j, "seed": j, "rewards": {"r": 0.5}, "metadata": {}} for j in range(2)]
    writer.write_shard(0, torch.zeros(2, 4, 2, 2, 2), samples, images=video, image_format="png")
    png = Image.open(tmp_path / "store" / "images" / "shard-00000" / "0_1.png")
    assert png.size == (3 * 4, 4)
    expected = (frame_strip(video, max_frames=3)[1] * 255).round().to(torch.uint8).permute(1, 2, 0)
    assert torch.equal(torch.from_numpy(np.array(png)), expected)


STRICT_ADAPTER = '''
from flowalign.pipelines.sd3 import SD3Adapter


class Strict(SD3Adapter):
    """An adapter of another package whose constructor takes none of SD3's settings but one of its own."""

    def __init__(self, pipeline, marker=None):
        super().__init__(pipeline, max_sequence_length=32)
        self.marker = marker
'''


@pytest.fixture
def strict_module(tmp_path, monkeypatch):
    (tmp_path / "strict_adapter.py").write_text(STRICT_ADAPTER)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "strict_adapter:Strict"
    sys.modules.pop("strict_adapter", None)
    from flowalign.pipelines.base import ADAPTERS

    ADAPTERS.pop("strict_adapter:Strict", None)


def test_a_recipe_names_an_adapter_by_dotted_path_with_its_own_settings(strict_module):
    from flowalign.train.model import build_adapter

    adapter = build_adapter(ModelConfig(pretrained="tiny-sd3", adapter=strict_module, adapter_kwargs={"marker": 7}), torch.device("cpu"))
    assert type(adapter).__name__ == "Strict" and adapter.marker == 7  # t5_cache_size / max_sequence_length not passed
    with pytest.raises(ConfigError, match="takes no height / width"):
        build_adapter(ModelConfig(pretrained="tiny-sd3", adapter=strict_module, resolution=32), torch.device("cpu"))
    with pytest.raises(ConfigError, match="unknown adapter 'nonesuch'"):
        build_adapter(ModelConfig(pretrained="tiny-sd3", adapter="nonesuch"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="strict_adapter:Nope"):
        build_adapter(ModelConfig(pretrained="tiny-sd3", adapter="strict_adapter:Nope"), torch.device("cpu"))


def test_the_trainer_runs_with_an_adapter_named_in_the_recipe(strict_module, tmp_path):
    from flowalign.config import config_hash
    from flowalign.train.trainer import Trainer

    settings = ["model.pretrained=tiny-sd3", "sampling.num_steps=2", "sampling.guidance_scale=1.0", "sampling.group_size=2",
                "train.prompts_per_iter=2", "lora.rank=2", "lora.alpha=4", "objective.kl_beta=0.0", "rewards=[{name: brightness}]",
                "train.progress=false", "train.log_with=[]", "train.eval_every=-1", "train.final_eval_samples=0", "train.iterations=1",
                f"train.output_dir={tmp_path / 'run'}"]
    config = load_config(None, [*settings, f"model.adapter={json.dumps(strict_module)}", "model.adapter_kwargs={marker: 3}"])
    assert config_hash(config) != config_hash(load_config(None, settings))  # another model: another run
    trainer = Trainer(config).setup()
    try:
        assert type(trainer.adapter).__name__ == "Strict" and trainer.adapter.marker == 3
        trainer.train()
    finally:
        trainer.cleanup()
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_flowalign_eval_takes_the_adapter_and_its_settings(strict_module, tmp_path, capsys, monkeypatch):
    from flowalign.train import eval_cli
    from flowalign.train import model as model_lib

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\na blue circle\n")
    built = []
    real = model_lib.build_adapter

    def recording(model_cfg, device):  # the model settings eval builds its adapter from
        built.append(model_cfg)
        return real(model_cfg, device)

    monkeypatch.setattr(model_lib, "build_adapter", recording)
    argv = ["--model", "tiny-sd3", "--prompts", str(prompts), "--reward", "brightness", "--num-samples", "2", "--steps", "2",
            "--guidance", "1", "--no-progress", "--adapter", strict_module]
    assert eval_cli.main([*argv, "--adapter-kwargs", '{"marker": 5}']) == 0
    assert built[-1].adapter == strict_module and built[-1].adapter_kwargs == {"marker": 5}
    assert eval_cli.main([*argv, "--adapter-kwargs", "[1, 2]"]) == 2
    assert "--adapter-kwargs must be a JSON object" in capsys.readouterr().err
    assert eval_cli.main([*argv, "--resolution", "32"]) == 2
    assert "set its size in --adapter-kwargs" in capsys.readouterr().err
