"""bench/guided_drift.py on the shipped toy: the arms, the file it writes, and that guidance steers rollouts."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import guided_drift  # noqa: E402


def test_guided_arm_rolls_out_redder_samples_and_the_result_file_says_so(tmp_path):
    out_file = tmp_path / "guided_drift.json"
    out = guided_drift.main([
        "--iterations", "1", "--eval-every", "1", "--eval-samples", "8", "--eval-prompts", "8", "--scales", "2",
        "--set", "train.prompts_per_iter=4", "--set", "train.micro_batch_size=32", "--threads", "2", "--output", str(out_file),
    ])
    assert json.loads(out_file.read_text()) == out
    assert set(out["arms"]) == {"unguided", "drift_2"}
    assert out["reward"]["name"] == "color_fraction" and out["reward"]["kwargs"]["soft"] is True
    for arm in out["arms"].values():
        assert [p["iteration"] for p in arm["points"]] == [0, 1]
        assert len(arm["rollout_reward"]) == 1
    # the same rollout noise, steered up the soft red fraction: the guided arm's samples are redder
    assert out["arms"]["drift_2"]["rollout_reward"][0] > 2 * out["arms"]["unguided"]["rollout_reward"][0]
    # before training both arms evaluate the same base model on the same noise
    assert out["arms"]["drift_2"]["points"][0] == out["arms"]["unguided"]["points"][0]
