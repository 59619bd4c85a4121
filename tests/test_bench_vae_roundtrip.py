"""bench/vae_roundtrip.py: per-category accuracy by hand, the round trip's range, and the script on a few shipped scenes."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import vae_roundtrip  # noqa: E402


def test_accuracy_by_tag_hand_worked():
    out = vae_roundtrip.accuracy_by_tag([True, False, True, True, False], ["a", "a", "b", "b", "c"])
    assert out == pytest.approx({"a": 0.5, "b": 1.0, "c": 0.0, "all": 0.6})


def test_round_trip_keeps_shape_and_range():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8).eval()
    images = torch.rand(3, 3, 8, 8)
    out = vae_roundtrip.round_trip(vae, images)
    assert out.shape == images.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # it is the VAE's reconstruction (posterior mode, decoded, back to [0, 1]), not the input passed through
    with torch.no_grad():
        by_hand = ((vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(out, by_hand, atol=1e-6) and not torch.allclose(out, images, atol=1e-2)


def test_script_on_shipped_toy_scores_its_own_renders(tmp_path, capsys):
    """Ground-truth renders pass the verifier (the reward's >= 99% check), and the toy's VAE keeps most of them."""
    records = [json.loads(line) for line in (Path(__file__).resolve().parents[1] / "assets/prompts/shapes_heldout.jsonl").read_text().splitlines()[::40]]
    prompts = tmp_path / "few.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "vae.json"
    assert vae_roundtrip.main(["--prompts", str(prompts), "--per-prompt", "2", "--threads", "1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ground_truth"]["all"] == 1.0
    assert result["vae_round_trip"]["all"] >= 0.75
    assert 0.0 < result["settings"]["mean_abs_error"] < 0.1  # the scenes went through the VAE: not identical, close
    assert result["settings"]["scenes"] == 2 * len(records)
    assert "VAE round trip" in capsys.readouterr().out
