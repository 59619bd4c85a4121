"""Where `model.pretrained` loads from: a local folder, a hub id (the hub cache; never reached in tests), a builtin."""
from __future__ import annotations

import pytest
import torch

from flowalign.config import ModelConfig
from flowalign.errors import ConfigError
from flowalign.pipelines.testing import tiny_sd3_pipeline
from flowalign.train import model


def test_a_hub_id_goes_to_from_pretrained_with_its_revision(monkeypatch):
    seen = {}

    def from_pretrained(source, **kwargs):
        seen.update(source=source, **kwargs)
        return tiny_sd3_pipeline(seed=0)

    from diffusers import DiffusionPipeline

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", staticmethod(from_pretrained))
    adapter = model.build_adapter(ModelConfig(pretrained="stabilityai/stable-diffusion-3.5-medium", revision="main"), torch.device("cpu"))
    assert seen["source"] == "stabilityai/stable-diffusion-3.5-medium" and seen["revision"] == "main"
    assert "local_files_only" not in seen  # the hub cache, or a download where the hub is reachable
    assert not any(p.requires_grad for p in adapter.trainable_module.parameters())  # frozen like any other source


def test_a_hub_id_that_cannot_be_loaded_is_one_config_error(monkeypatch):
    from diffusers import DiffusionPipeline

    def offline(source, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files,\nand couldn't find them in the cache")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", staticmethod(offline))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ConfigError, match=r"model.pretrained='owner/model': no local folder .* from the cache or the hub \(OSError: We couldn't connect") as info:
        model.build_adapter(ModelConfig(pretrained="owner/model"), torch.device("cpu"))
    assert "\n" not in str(info.value)
    # offline mode is named (the hub was never asked), and a long reason is cut visibly
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", staticmethod(lambda source, **kw: (_ for _ in ()).throw(OSError("x" * 400))))
    with pytest.raises(ConfigError, match=r"from the cache only \(HF_HUB_OFFLINE set\) \(OSError: x{299}…\)$"):
        model.build_adapter(ModelConfig(pretrained="owner/model"), torch.device("cpu"))


@pytest.mark.parametrize("name", ["/no/such/folder", "./missing", "not-a-hub-id", "a/b/c"])
def test_neither_a_folder_nor_a_hub_id_is_refused(name):
    with pytest.raises(ConfigError, match="is not a local diffusers folder, a hub id"):
        model.build_adapter(ModelConfig(pretrained=name), torch.device("cpu"))


def test_a_folder_of_variant_files_loads_with_model_variant_and_without_it_names_the_variant(tmp_path):
    """``save_pretrained(variant="fp16")`` writes ``*.fp16.safetensors`` only (as some hub snapshots ship): without
    ``model.variant`` diffusers finds no weights file, which was an OSError (exit 1); now it is a ConfigError naming
    the variant, and ``model.variant=fp16`` loads the same weights."""
    pipe = tiny_sd3_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "m", variant="fp16")
    assert not list((tmp_path / "m").glob("*/model.safetensors")) and list((tmp_path / "m").glob("*/*.fp16.safetensors"))
    with pytest.raises(ConfigError, match=r"the folder does not load .*weight files are of variant 'fp16': set model.variant=fp16") as info:
        model.build_adapter(ModelConfig(pretrained=str(tmp_path / "m")), torch.device("cpu"))
    assert "\n" not in str(info.value)
    adapter = model.build_adapter(ModelConfig(pretrained=str(tmp_path / "m"), variant="fp16"), torch.device("cpu"))
    theirs, ours = dict(adapter.pipeline.transformer.state_dict()), pipe.transformer.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_a_hub_id_gets_the_variant_too(monkeypatch):
    seen = {}

    def from_pretrained(source, **kwargs):
        seen.update(kwargs)
        return tiny_sd3_pipeline(seed=0)

    from diffusers import DiffusionPipeline

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", staticmethod(from_pretrained))
    model.build_adapter(ModelConfig(pretrained="owner/model", variant="fp16"), torch.device("cpu"))
    assert seen["variant"] == "fp16"
    seen.clear()
    model.build_adapter(ModelConfig(pretrained="owner/model"), torch.device("cpu"))
    assert "variant" not in seen  # diffusers' own default


def test_eval_takes_variant_and_names_the_flag(tmp_path, capsys):
    from flowalign.train import cli

    tiny_sd3_pipeline(seed=0).save_pretrained(tmp_path / "m", variant="fp16")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    base = ["eval", "--model", str(tmp_path / "m"), "--prompts", str(prompts), "--reward", "brightness", "--num-samples", "1", "--steps", "2"]
    assert cli.main(base) == 2
    assert "set --variant fp16" in capsys.readouterr().err
    assert cli.main(base + ["--variant", "fp16", "--out", str(tmp_path / "e")]) == 0
    import json

    assert json.loads((tmp_path / "e" / "eval.json").read_text())["settings"]["variant"] == "fp16"
