"""``lora.init_from`` / ``lora.reference``: a run starts from a previous LoRA file, and its reference may be that
start instead of the base model (iterative rounds of offline DPO / GDRO, a second online round)."""
from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flowalign import lora as lora_lib
from flowalign.config import LoraConfig, load_config
from flowalign.errors import ConfigError, LoraMismatchError
from flowalign.train import cli
from tests.tiny_run import TINY_RECIPE, generate_tiny_store, train_argv

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]


@pytest.fixture
def transformer():
    from flowalign.pipelines.testing import tiny_sd3_pipeline

    return tiny_sd3_pipeline(seed=0).transformer


def _lora_file(module, tmp_path, rank=4, alpha=8.0, targets=TARGETS, seed=1):
    """A diffusers LoRA file of ``module`` (a copy with LoRA at random weights) and its ``{peft key: tensor}``."""
    trained = copy.deepcopy(module)
    lora_lib.add_lora(trained, rank, alpha, targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_lib.lora_parameters(trained):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    from diffusers import StableDiffusion3Pipeline

    folder = tmp_path / f"lora_r{rank}_a{alpha:g}_{len(targets)}"
    # save_lora_weights uses the pipeline's class (its writer) only
    lora_lib.save_lora_weights(StableDiffusion3Pipeline.__new__(StableDiffusion3Pipeline), folder,
                               lora_lib.get_lora_state_dict(trained), lora_lib.lora_metadata(trained))
    return folder, lora_lib.get_lora_state_dict(trained)


def test_the_lora_starts_from_the_files_weights_and_layers_it_lacks_start_at_zero(transformer, tmp_path):
    folder, saved = _lora_file(transformer, tmp_path, targets=["attn.to_q", "attn.to_k"])
    lora_lib.add_lora(transformer, 4, 8.0, TARGETS)
    assert lora_lib.load_initial_lora({"transformer": transformer}, folder, rank=4, alpha=8.0) == {"transformer": len(saved)}
    state = lora_lib.get_lora_state_dict(transformer)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    rest = [k for k in state if k not in saved]
    assert rest and all(state[k].abs().max() == 0 for k in rest if "lora_B" in k)  # to_v / to_out: no update yet


@pytest.mark.parametrize("rank, alpha, message", [(2, 8.0, "has rank [4], this run lora.rank=2; set lora.rank"),
                                                  (4, 4.0, "trained with alpha 8, this run lora.alpha=4")])
def test_another_rank_or_alpha_is_refused_with_the_setting_to_change(transformer, tmp_path, rank, alpha, message):
    folder, _ = _lora_file(transformer, tmp_path)
    lora_lib.add_lora(transformer, rank, alpha, TARGETS)
    with pytest.raises(LoraMismatchError, match=message.replace("[", r"\[").replace("]", r"\]")):
        lora_lib.load_initial_lora({"transformer": transformer}, folder, rank=rank, alpha=alpha)


def test_layers_the_run_does_not_adapt_and_text_encoders_it_does_not_train_are_refused(transformer, tmp_path):
    folder, _ = _lora_file(transformer, tmp_path)
    narrow = copy.deepcopy(transformer)
    lora_lib.add_lora(narrow, 4, 8.0, ["attn.to_q"])
    with pytest.raises(LoraMismatchError, match=r"LoRA layers this run does not adapt.*target_modules=\['attn.to_k'"):
        lora_lib.load_initial_lora({"transformer": narrow}, folder, rank=4, alpha=8.0)
    lora_lib.add_lora(transformer, 4, 8.0, TARGETS)
    from safetensors.torch import save_file

    tensors = load_file(str(folder / lora_lib.LORA_WEIGHT_NAME))
    tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 8)
    save_file(tensors, str(tmp_path / "with_text.safetensors"))
    with pytest.raises(LoraMismatchError, match="holds LoRA for text_encoder.*set lora.train_text_encoder=true"):
        lora_lib.load_initial_lora({"transformer": transformer}, tmp_path / "with_text.safetensors", rank=4, alpha=8.0)


def test_reference_init_needs_init_from():
    with pytest.raises(ConfigError, match="lora.reference=init needs lora.init_from"):
        LoraConfig(reference="init")
    with pytest.raises(ConfigError, match="lora.reference='start' is not one of"):
        LoraConfig(reference="start", init_from="x")


def test_a_snapshot_runs_the_reference_without_disturbing_the_policys_backward(transformer, tmp_path):
    """The reference forward (with the starting weights) between the policy's forward and its backward: the policy's
    gradient is that of a run without it, and the reference's output that of a module holding the start."""
    lora_lib.add_lora(transformer, 4, 8.0, TARGETS)
    with torch.no_grad():
        for p in lora_lib.lora_parameters(transformer):
            p.copy_(torch.randn_like(p) * 0.1)  # a start unlike the base
    start = copy.deepcopy(transformer)
    snapshot = lora_lib.LoraSnapshot({"transformer": transformer})
    with torch.no_grad():
        for p in lora_lib.lora_parameters(transformer):
            p.add_(torch.randn_like(p) * 0.1)  # the policy has moved on
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    enc = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500.0, 250.0])

    def run(module):
        return module(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t).sample

    out = run(transformer)
    with torch.no_grad(), lora_lib.reference_weights(snapshot, transformer):
        ref = run(transformer)
    out.square().sum().backward()
    with_ref = [p.grad.clone() for p in lora_lib.lora_parameters(transformer)]
    for p in lora_lib.lora_parameters(transformer):
        p.grad = None
    run(transformer).square().sum().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(with_ref, lora_lib.lora_parameters(transformer)))
    with torch.no_grad():
        assert torch.equal(ref, run(start))
        with lora_lib.lora_disabled(start):
            assert not torch.equal(ref, run(start))  # not the base
        assert not torch.equal(ref, run(transformer))  # the policy is back after the block


def _metrics(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


ONE_ITERATION = ["train.iterations=1", "train.prompts_per_iter=2", "sampling.group_size=2", "train.micro_batch_size=4",
                 "train.eval_every=-1", "train.ref_kl_every=1", "train.checkpoint_every=1"]


@pytest.mark.parametrize("text", [False, True], ids=["transformer", "with_text_encoders"])
def test_an_online_run_starts_from_a_previous_runs_lora_and_measures_its_kl_from_it(tmp_path, text):
    first = tmp_path / "first"
    settings = ONE_ITERATION + [f"lora.train_text_encoder={str(text).lower()}"]
    assert cli.main(train_argv(first, settings + ["train.lr=1e-2"])) == 0
    start = first / lora_lib.LORA_WEIGHT_NAME
    assert any(k.startswith("text_encoder") for k in load_file(str(start))) == text
    for reference, zero in (("init", True), ("base", False)):
        run = tmp_path / reference
        assert cli.main(train_argv(run, settings + [f"lora.init_from={start}", f"lora.reference={reference}"])) == 0
        kl = float(_metrics(run)[0]["kl/ref"])
        # kl/ref is measured on the rollouts' policy, which is the start: 0 to the start, > 0 to the base
        assert (kl == 0.0) if zero else kl > 1e-8, (reference, kl)
    from flowalign.train.trainer import Trainer

    trainer = Trainer(load_config(TINY_RECIPE, settings + [f"lora.init_from={start}", f"train.output_dir={tmp_path / 'setup'}"])).setup()
    saved = load_file(str(start))
    for component, module in trainer.lora_modules.items():
        state = lora_lib.get_lora_state_dict(module)
        mine = {k[len(component) + 1:]: v for k, v in saved.items() if k.startswith(component + ".")}
        assert mine and mine.keys() == state.keys() and all(torch.equal(state[k], v) for k, v in mine.items())
    trainer.cleanup()


def test_a_reference_init_run_resumes_exactly_without_its_init_file(tmp_path, resumed_lora_matches):
    first = tmp_path / "first"
    assert cli.main(train_argv(first, ONE_ITERATION + ["train.lr=1e-2"])) == 0
    start = tmp_path / "start.safetensors"
    start.write_bytes((first / lora_lib.LORA_WEIGHT_NAME).read_bytes())

    def make(out, iterations):
        if iterations == 3 and (out / "checkpoints").is_dir():
            start.unlink(missing_ok=True)  # the resume reads the start from the checkpoint
        return load_config(TINY_RECIPE, ONE_ITERATION + [f"train.iterations={iterations}", f"lora.init_from={start}", "lora.reference=init",
                                                         "objective.kl_beta=0.1", f"train.output_dir={out}"])

    resumed_lora_matches(make, 1, 3, tmp_path)
    assert not start.exists()


@pytest.fixture(scope="module")
def store_and_start(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_init_offline")
    generate_tiny_store(root)
    first = root / "first"
    assert cli.main(["offline", "--config", str(_offline_yaml(root, root / "store", first)), "--set", "lr=1e-2"]) == 0
    return root / "store", first / lora_lib.LORA_WEIGHT_NAME


def _offline_yaml(folder, store, run):
    path = folder / f"{run.name}.yaml"
    path.write_text(f"model: {{pretrained: tiny-sd3}}\nlora: {{rank: 4, alpha: 4.0}}\nstore: {store}\nk: 3\n"
                    f"groups_per_batch: 1\noutput_dir: {run}\nlog_with: []\n")
    return path


def test_an_offline_dpo_round_from_the_previous_lora_starts_at_its_reference(store_and_start, tmp_path):
    """Diffusion-DPO's loss is -log sigmoid(-beta * margin), and the margin is 0 while the policy equals the reference:
    so the first step of a round started from the previous LoRA has loss log 2 under lora.reference=init, and not
    under the base as reference (the policy then already differs from it)."""
    store, start = store_and_start
    first_step = {}
    for reference in ("init", "base"):
        run = tmp_path / reference
        assert cli.main(["offline", "--config", str(_offline_yaml(tmp_path, store, run)), "--set", "objective=diffusion_dpo",
                         "--set", f"lora.init_from={start}", "--set", f"lora.reference={reference}", "--set", "max_steps=1"]) == 0
        first_step[reference] = _metrics(run)[0]
    assert float(first_step["init"]["dpo/margin"]) == 0.0
    assert math.isclose(float(first_step["init"]["dpo/loss"]), math.log(2.0), rel_tol=1e-6)
    assert abs(float(first_step["base"]["dpo/margin"])) > 1e-9
    assert not math.isclose(float(first_step["base"]["dpo/loss"]), math.log(2.0), rel_tol=1e-6)


def test_a_missing_init_file_is_one_line_before_the_model_loads(tmp_path, capsys):
    assert cli.main(train_argv(tmp_path / "run", ONE_ITERATION + [f"lora.init_from={tmp_path / 'nope'}"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "LoRA file not found" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_the_new_keys_at_their_defaults_keep_older_runs_hashes_so_they_resume():
    from flowalign.config import config_hash, packaged_recipe_dir
    from flowalign.train.offline_trainer import load_offline_config, offline_config_hash

    assert config_hash(load_config(packaged_recipe_dir() / "toy_grpo.yaml")) == "4c69ef0402ca238f"  # as before the keys
    assert offline_config_hash(load_offline_config(packaged_recipe_dir() / "toy_gdro.yaml")) == "049255ee876760cc"
    online = load_config(packaged_recipe_dir() / "toy_grpo.yaml", ["lora.init_from=x.safetensors"])
    offline = load_offline_config(packaged_recipe_dir() / "toy_gdro.yaml", ["lora.init_from=x.safetensors"])
    assert config_hash(online) != "4c69ef0402ca238f" and offline_config_hash(offline) != "049255ee876760cc"


def test_a_store_drawn_with_a_lora_names_the_settings_of_a_next_round(store_and_start, tmp_path, caplog):
    _, start = store_and_start
    generate_tiny_store(tmp_path, '{"prompt": "a red circle", "tag": "single"}\n', lora=start)
    warned = {}
    for name, extra in (("fresh", []), ("next_round", ["--set", f"lora.init_from={start}", "--set", "lora.reference=init"])):
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert cli.main(["offline", "--config", str(_offline_yaml(tmp_path, tmp_path / "store", tmp_path / name)), *extra]) == 0
        warned[name] = [r.getMessage() for r in caplog.records if "was generated with the LoRA" in r.getMessage()]
    assert len(warned["fresh"]) == 1 and "starting from a fresh LoRA" in warned["fresh"][0] and "lora.reference=init" in warned["fresh"][0]
    assert warned["next_round"] == []
    # another LoRA as the start and reference: AWM, whose old policy is the LoRA that drew the store, refuses it
    other = tmp_path / "other.safetensors"
    tensors = load_file(str(start))
    save_file({k: v * 2 for k, v in tensors.items()}, str(other), metadata=dict(safe_open(str(start), "pt").metadata()))
    argv = ["offline", "--config", str(_offline_yaml(tmp_path, tmp_path / "store", tmp_path / "awm")), "--set", "objective=awm",
            "--set", f"lora.init_from={other}", "--set", "lora.reference=init"]
    assert cli.main(argv) == 2
    assert cli.main(argv[:-4] + ["--set", f"lora.init_from={start}", "--set", "lora.reference=init", "--set", "max_steps=1"]) == 0


def test_the_start_as_reference_ignores_lora_dropout(transformer):
    """The update runs inside lora_dropout_active; the reference swapped in there ran the starting LoRA with dropout, so
    two reference calls on the same input differed (0.10 in an audit's case). It is now a fixed function of its weights."""
    lora_lib.add_lora(transformer, 4, 8.0, TARGETS, dropout=0.5)
    with torch.no_grad():
        for p in lora_lib.lora_parameters(transformer):
            p.copy_(torch.randn_like(p))
    snapshot = lora_lib.LoraSnapshot({"transformer": transformer})
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(encoder_hidden_states=torch.randn(1, 5, 64), pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500.0]))
    with torch.no_grad():
        with lora_lib.reference_weights(snapshot, transformer):
            outside = transformer(hidden_states=x, **kw).sample
        with lora_lib.lora_dropout_active(transformer):
            with lora_lib.reference_weights(snapshot, transformer):
                inside = [transformer(hidden_states=x, **kw).sample for _ in range(2)]
            policy = [transformer(hidden_states=x, **kw).sample for _ in range(2)]
    assert torch.equal(inside[0], outside) and torch.equal(inside[1], outside)
    assert not torch.equal(policy[0], policy[1])  # the policy's dropout is still on after the block


def test_a_file_trained_with_rslora_or_patterns_is_refused(transformer, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    folder, _ = _lora_file(transformer, tmp_path)
    with safe_open(str(folder / lora_lib.LORA_WEIGHT_NAME), "pt") as fh:
        header = dict(fh.metadata())
    meta = json.loads(header["lora_adapter_metadata"])
    lora_lib.add_lora(transformer, 4, 8.0, TARGETS)
    for extra in ({"transformer.use_rslora": True}, {"transformer.rank_pattern": {"attn.to_q": 2}}):
        path = tmp_path / "other.safetensors"
        save_file(load_file(str(folder / lora_lib.LORA_WEIGHT_NAME)), str(path),
                  metadata={**header, "lora_adapter_metadata": json.dumps({**meta, **extra})})
        with pytest.raises(LoraMismatchError, match="which change how its weights act"):
            lora_lib.load_initial_lora({"transformer": transformer}, path, rank=4, alpha=8.0)
