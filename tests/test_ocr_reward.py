"""The ocr reward: its text math against brute force and hand-worked cases, and the real PP-OCR
models rapidocr-onnxruntime ships reading text rendered here."""
from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from flowalign.errors import ConfigError
from flowalign.rewards import call_reward, load_reward
from flowalign.rewards import ocr


@functools.lru_cache(maxsize=None)
def _brute_distance(a: str, b: str) -> int:
    """Levenshtein by its recursive definition (first characters), independent of the table in ocr.py."""
    if not a or not b:
        return len(a) + len(b)
    return min(_brute_distance(a[1:], b) + 1, _brute_distance(a, b[1:]) + 1, _brute_distance(a[1:], b[1:]) + (a[0] != b[0]))


def test_edit_distance_by_hand_and_against_the_recursive_definition():
    assert ocr.edit_distance("kitten", "sitting") == 3  # k->s, e->i, +g
    assert ocr.edit_distance("flaw", "lawn") == 2
    assert ocr.edit_distance("", "abc") == ocr.edit_distance("abc", "") == 3
    assert ocr.edit_distance("same", "same") == 0
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        assert ocr.edit_distance(a, b) == _brute_distance(a, b) == ocr.edit_distance(b, a), (a, b)


def test_text_score_by_hand():
    assert ocr.text_score("Hello World", "hello world") == 1.0  # normalised: spaces and case do not count
    assert ocr.text_score("OPEN 24h now", "24h") == 1.0  # the target inside more text: 1
    assert ocr.text_score("helo", "hello") == pytest.approx(1 - 1 / 5)  # one insertion missing
    assert ocr.text_score("hallo", "hello") == pytest.approx(1 - 1 / 5)  # one substitution
    assert ocr.text_score("", "hello") == 0.0  # nothing read
    assert ocr.text_score("completely unrelated words", "hi") == 0.0  # capped at len(target): never negative
    with pytest.raises(ValueError, match="empty"):
        ocr.text_score("x", "  ")


def test_target_text_takes_the_first_quoted_span_or_the_metadata():
    assert ocr.target_text('a neon sign that says "Open 24 hours" at night') == "Open 24 hours"
    assert ocr.target_text("a mug with \u201cgood morning\u201d on it") == "good morning"
    assert ocr.target_text('a "first" and a "second"') == "first"
    assert ocr.target_text("no quotes here", {"text": "from the file"}) == "from the file"
    with pytest.raises(ValueError, match="no quoted text"):
        ocr.target_text("a sign with no text")


def _render(text: str, size=(256, 96), font_size=36, color=(0, 0, 0), background=(255, 255, 255)) -> torch.Tensor:
    """``[3, H, W]`` float in [0, 1]: ``text`` drawn with Pillow's bundled scalable font."""
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).text((12, (size[1] - font_size) // 2), text, fill=color, font=ImageFont.load_default(size=font_size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def reward():
    return load_reward("ocr", num_threads=1)  # DESIGN.md's example: a registered name, imported on first use


def _session_threads(engine) -> list[int]:
    """intra-op threads of the detector's, recogniser's and classifier's onnxruntime sessions (rapidocr 1.4 internals)."""
    sessions = (engine.text_det.infer, engine.text_rec.session, engine.text_cls.infer)
    return [s.session.get_session_options().intra_op_num_threads for s in sessions]


def test_num_threads_reaches_every_onnxruntime_session(reward):
    assert _session_threads(reward.engine) == [1, 1, 1]  # (0 = onnxruntime's default: every core)
    assert _session_threads(ocr.OCRReward(num_threads=2).engine) == [2, 2, 2]


def test_images_reach_the_ocr_as_bgr_uint8():
    image = torch.zeros(3, 2, 2)
    image[0, 0, 0] = 1.0  # a pure red pixel (RGB)
    image[2, 1, 1] = 0.5  # a half blue one
    bgr = ocr.to_bgr_uint8(image)
    assert bgr.dtype == np.uint8 and bgr.shape == (2, 2, 3) and bgr.flags["C_CONTIGUOUS"]
    assert bgr[0, 0].tolist() == [0, 0, 255] and bgr[1, 1].tolist() == [128, 0, 0]


def test_normalize_folds_width_case_and_spaces():
    assert ocr.normalize("\uff2f\uff50\uff45\uff4e  24\tHours") == "open24hours"  # full-width letters (NFKC), tabs
    assert ocr.text_score("OPEN24HOURS", "\uff2f\uff50\uff45\uff4e 24 hours") == 1.0


def test_real_ocr_reads_rendered_text_and_scores_it(reward):
    images = torch.stack([_render("flowalign"), _render("flowalgn"), torch.ones(3, 96, 256), _render("Reward", color=(200, 30, 30))])
    prompts = ['a poster that says "flowalign"', 'a poster that says "flowalign"', 'a poster that says "flowalign"',
               'a red word "reward" on white']
    out = call_reward(reward, images, prompts, None, on_error="raise", name="ocr")
    assert out.details["read"][0] == "flowalign" and out.details["read"][2] == ""
    assert out.scores.tolist() == pytest.approx([1.0, 1 - 1 / 9, 0.0, 1.0])  # a missing letter costs 1/9; blank: 0
    assert out.details["distance"].tolist() == [0.0, 1.0, 9.0, 0.0]
    assert out.details["binary"].tolist() == [1.0, 0.0, 0.0, 1.0]  # the whole text read: what evaluation counts as correct
    assert out.details["target"] == ["flowalign"] * 3 + ["reward"]


def test_videos_score_the_mean_over_strided_frames(reward):
    frames = torch.stack([_render("abc"), torch.ones(3, 96, 256), _render("abc"), _render("xyz")])  # [T=4, 3, H, W]
    reward_every_2 = ocr.OCRReward(frame_stride=2, num_threads=1)  # every 2nd frame
    out = reward_every_2(frames[None], ['"abc"'])
    assert out.details["read"][0] == ["abc", "abc"]  # frames 0 and 2
    assert out.scores.tolist() == pytest.approx([1.0])
    out = reward(frames[None], ['"abc"'])  # stride 4: frame 0 alone
    assert out.details["read"][0] == ["abc"]
    assert out.details["binary"].tolist() == [1.0]
    out = ocr.OCRReward(frame_stride=1, num_threads=1)(frames[None], ['"abc"'])
    assert out.scores.tolist() == pytest.approx([(1 + 0 + 1 + 0) / 4])
    assert out.details["binary"].tolist() == [0.0]  # a frame without the text: not all read


def test_prompts_without_text_are_refused_before_training(reward):
    with pytest.raises(ConfigError, match=r"2 of 3 prompts have none.*a cat"):
        reward.check_prompts(['a sign "hi"', "a cat", 'empty ""'], [{}, {}, {}])
    reward.check_prompts(["a cat"], [{"text": "meow"}])  # the prompt file's text field is enough
    with pytest.raises(ConfigError, match="frame_stride"):
        ocr.OCRReward(frame_stride=0)
    with pytest.raises(ConfigError, match="min_confidence"):
        ocr.OCRReward(min_confidence=2.0)
    with pytest.raises(ConfigError, match="num_threads"):
        ocr.OCRReward(num_threads=0)


def test_a_missing_rapidocr_names_the_extra_and_the_import_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_rapidocr(name, *args, **kwargs):
        if name.startswith("rapidocr_onnxruntime"):
            raise ImportError("libGL.so.1: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rapidocr)
    with pytest.raises(ConfigError, match=r"flowalign-rl\[ocr\].*libGL.so.1.*apt-get install libgl1"):
        ocr.OCRReward()


def test_the_trainer_refuses_prompts_the_ocr_reward_cannot_score(tmp_path):
    from flowalign.config import load_config
    from flowalign.train.trainer import Trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a sign that says "open"\na cat on a sofa\n')
    cfg = load_config("train/configs/tiny_grpo.yaml", [f"train.output_dir={tmp_path / 'run'}", f"train.prompts={prompts}",
                                                       "rewards=[{name: ocr}]", "train.log_with=[]", "train.progress=false"])
    with pytest.raises(ConfigError, match="a cat on a sofa"):
        Trainer(cfg).setup()


def test_bench_script_prints_speed_and_the_blur_curve(tmp_path):
    import sys
    from pathlib import Path

    bench_dir = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench_dir)
    try:
        import ocr_reward as bench
    finally:
        sys.path.remove(bench_dir)
    result = bench.main(["--blurs", "0", "8", "--output", str(tmp_path / "ocr.json")])
    assert result["by_blur_radius"][0.0]["mean_score"] == 1.0  # sharp text: every phrase read
    assert result["by_blur_radius"][8.0]["mean_score"] == 0.0  # blurred away: nothing read
    assert result["typo"]["scores"] == pytest.approx(result["typo"]["expected_if_read_as_drawn"])
    assert set(result["seconds_per_image"]) == {1, 2} and (tmp_path / "ocr.json").is_file()


def test_engine_kwargs_rapidocr_would_ignore_are_refused_with_the_near_key():
    """rapidocr adds unknown keys to its config unread, so `det_box_thres` (for det_box_thresh) changed nothing."""
    from flowalign.errors import ConfigError
    from flowalign.rewards import load_reward

    with pytest.raises(ConfigError, match=r"'det_box_thres' \(did you mean 'det_box_thresh'\?\).*'totally_bogus'"):
        load_reward("ocr", engine_kwargs={"det_box_thres": 0.3, "totally_bogus": 1})
    reward = load_reward("ocr", engine_kwargs={"det_box_thresh": 0.3, "rec_batch_num": 2})
    assert reward.engine.text_det.postprocess_op.box_thresh == 0.3  # a known key reaches the detector
