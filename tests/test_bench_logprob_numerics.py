"""bench/logprob_numerics.py: bf16 rounding alone clips every row of CPS's last stochastic step under the Gaussian
log-density and none under the CPS reference code's -(x' - mean)² (sampling.log_prob_form: squared_error)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "logprob_numerics.py"


def test_rounding_alone_clips_cps_last_step_only_under_the_gaussian_form(tmp_path):
    spec = importlib.util.spec_from_file_location("logprob_numerics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--latent", "4", "16", "16", "--rows", "8", "--steps", "0", "8", "--output", str(tmp_path / "r.json")])
    by = {(r["kernel"], r["form"], r["step"]): r for r in out["results"]}
    assert by[("cps", "gaussian", 8)]["std"] < 0.01  # s' sin(0.7 pi / 2) at s' = 0.0089
    assert by[("cps", "gaussian", 8)]["clip_frac_1e-05"] == 1.0
    assert by[("cps", "squared_error", 8)]["clip_frac_1e-05"] == 0.0
    assert by[("cps", "gaussian", 0)]["clip_frac_1e-05"] == 0.0  # a high-noise step is fine in either form
    assert (tmp_path / "r.json").is_file()
