"""Rollout store: round trip, groups/batches, a real SIGKILL mid-run then resume == uninterrupted,
torn manifest / temp leftovers / unlisted shards are repaired, corruption is reported by name."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowalign.offline import RolloutStore, RolloutStoreError, RolloutWriter, fill_store, sample_seed

PROMPTS = [{"prompt": f"prompt {i}", "tag": "t"} for i in range(12)]
G = 3

# The same generator code runs in-process and in the killed subprocess.
GEN_CODE = textwrap.dedent(
    """
    import time
    import torch

    def sample_fn(prompts, seeds, delay=0.0):
        time.sleep(delay)
        latents = torch.stack([torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(s)) for s in seeds])
        images = torch.sigmoid(latents[:, :3].repeat_interleave(2, -1).repeat_interleave(2, -2))
        return latents, images

    def score_fn(images, prompts, metadata):
        return {"bright": images.mean(dim=(1, 2, 3)), "red": images[:, 0].mean(dim=(1, 2))}
    """
)
namespace: dict = {}
exec(GEN_CODE, namespace)
sample_fn, score_fn = namespace["sample_fn"], namespace["score_fn"]


def _fill(root, **kw):
    return fill_store(root, PROMPTS, G, sample_fn, score_fn, settings={"model_hash": "abc"}, base_seed=7, prompts_per_shard=2, **kw)


def _contents(store: RolloutStore):
    recs = sorted(store.records(), key=lambda r: (r["prompt_index"], r["member"]))
    latents = {}
    for entry in store.entries:
        t = store.load_shard(entry)
        for s in entry["samples"]:
            latents[(s["prompt_index"], s["member"])] = t["latents"][s["row"]]
    return [{k: v for k, v in r.items() if k != "row"} for r in recs], latents


def test_round_trip_groups_and_batches(tmp_path):
    store = _fill(tmp_path / "s", image_format="png")
    assert len(store) == 36 and len(store.entries) == 6
    assert store.reward_names == ["bright", "red"]
    groups = list(store.groups())
    assert len(groups) == 12 and all(g.x0.shape == (3, 4, 4, 4) for g in groups)
    g5 = groups[5]
    assert g5.prompt == "prompt 5" and g5.seeds == [sample_seed(7, 5, j, G) for j in range(3)]
    # stored latents and rewards are exactly what the generator produced for those seeds
    lat, img = sample_fn([g5.prompt] * 3, g5.seeds)
    assert torch.equal(g5.x0, lat)
    assert torch.equal(g5.rewards["bright"], score_fn(img, None, None)["bright"])
    assert g5.metadata == {"tag": "t"}
    assert len(list((tmp_path / "s" / "images" / "shard-00002").glob("*.png"))) == 6
    # k smaller than G: one group of 2 per prompt (the third member is left out)
    assert len(list(store.groups(2))) == 12
    # num_groups counts from the manifest what groups() yields by loading every shard
    assert [store.num_groups(k) for k in (None, 1, 2, 3)] == [len(list(store.groups(k))) for k in (None, 1, 2, 3)] == [12, 36, 12, 12]
    with pytest.raises(ValueError, match="k=4"):
        list(store.groups(4))
    batches = list(store.batches(k=3, groups_per_batch=5, reward="red", generator=torch.Generator().manual_seed(0)))
    assert [b.x0.shape[0] for b, _ in batches] == [5, 5, 2]
    b, chosen = batches[0]
    assert b.rewards.shape == (5, 3) and torch.equal(b.rewards[1], chosen[1].rewards["red"])
    line = json.loads((tmp_path / "s" / "manifest.jsonl").read_text().splitlines()[0])
    assert {"shard", "sha256", "samples", "latent_shape"} <= set(line)
    assert set(line["samples"][0]) >= {"prompt", "group", "seed", "rewards", "prompt_index", "member"}


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(
        GEN_CODE
        + textwrap.dedent(
            f"""
            import functools, sys
            from flowalign.offline import fill_store
            prompts = {PROMPTS!r}
            fill_store(sys.argv[1], prompts, {G}, functools.partial(sample_fn, delay=float(sys.argv[2])), score_fn,
                       settings={{"model_hash": "abc"}}, base_seed=7, prompts_per_shard=2)
            """
        )
    )
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "0.4"], env=env)
    manifest = killed / "manifest.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:
        if manifest.exists() and manifest.read_text().count("\n") >= 2:
            break
        if proc.poll() is not None:
            pytest.fail("generator finished or crashed before it could be killed")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = manifest.read_text().count("\n")
    assert 2 <= done_before < 6, "the kill must land mid-way"
    partial = RolloutStore(killed)  # readable, and it knows it is incomplete
    assert not partial.is_complete and len(partial) == 6 * done_before
    subprocess.run([sys.executable, str(script), str(killed), "0"], env=env, check=True)
    resumed = RolloutStore(killed)
    assert resumed.is_complete
    reference = _fill(tmp_path / "reference")
    rec_a, lat_a = _contents(resumed)
    rec_b, lat_b = _contents(reference)
    assert len(rec_a) == 36 and len({(r["prompt_index"], r["member"]) for r in rec_a}) == 36
    assert rec_a == rec_b
    assert lat_a.keys() == lat_b.keys() and all(torch.equal(lat_a[k], lat_b[k]) for k in lat_a)
    assert not list((killed / "shards").glob("*.tmp"))


def test_recovers_from_torn_line_temp_file_and_unlisted_shard(tmp_path):
    root = tmp_path / "s"
    _fill(root)
    manifest = root / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    # simulate: shard 5 renamed but its line torn mid-append; shard 4 never listed; a temp file
    manifest.write_text("".join(lines[:4]) + lines[5][:50])
    with pytest.raises(RolloutStoreError, match="last line is incomplete .* rerun the same `flowalign generate`"):
        RolloutStore(root)  # a reader does not repair: it says what will
    (root / "shards" / "shard-00009.safetensors.tmp").write_bytes(b"partial")
    store_before = RolloutWriter(root, json.loads((root / "store.json").read_text())["settings"])
    assert store_before.completed == {0, 1, 2, 3}
    assert not (root / "shards" / "shard-00009.safetensors.tmp").exists()
    resumed = _fill(root)
    assert len(resumed) == 36 and sorted(e["index"] for e in resumed.entries) == list(range(6))
    rec_a, _ = _contents(resumed)
    rec_b, _ = _contents(_fill(tmp_path / "ref"))
    assert rec_a == rec_b


def test_corrupt_shard_is_reported_by_name(tmp_path):
    root = tmp_path / "s"
    store = _fill(root)
    path = root / "shards" / "shard-00003.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RolloutStoreError, match="shard-00003") as info:
        list(RolloutStore(root).groups())
    assert info.value.shard == "shard-00003.safetensors"
    with pytest.raises(RolloutStoreError, match="shard-00003"):
        RolloutStore(root).verify()  # what an offline run checks at setup
    # a missing shard is named as well
    path.unlink()
    with pytest.raises(RolloutStoreError, match="shard-00003"):
        list(store.groups())


def test_generate_draws_a_corrupt_or_missing_shard_again_and_keeps_the_corrupt_file(tmp_path, caplog):
    """It refused the store ("corrupt shard"), so one flipped bit cost the whole folder: the seeds depend only on a
    sample's place and the settings are the store's, so the shard is drawn again, the same as before."""
    root = tmp_path / "s"
    records, latents = _contents(_fill(root))
    before = records, {key: value.clone() for key, value in latents.items()}  # not a view of the file about to be damaged
    shard = root / "shards" / "shard-00003.safetensors"
    good = shard.read_bytes()
    data = bytearray(good)
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    (root / "shards" / "shard-00001.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="flowalign.offline"):
        store = _fill(root)
    assert "shard-00003.safetensors is corrupt" in caplog.text and "shard-00001.safetensors is missing" in caplog.text
    assert shard.read_bytes() == good and (root / "shards" / "shard-00003.safetensors.corrupt").read_bytes() == bytes(data)
    store.verify()
    records, latents = _contents(store)
    assert records == before[0] and all(torch.equal(latents[key], before[1][key]) for key in latents)
    assert sorted(e["index"] for e in store.entries) == list(range(6))


def _edit_manifest(root, edit):
    lines = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    edit(lines)
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda root: (root / "store.json").write_text(""), r"store.json: not valid JSON"),
    (lambda root: (root / "store.json").write_text('{"version": 1}'), r"store.json: no 'settings' object"),
    (lambda root: _edit_manifest(root, lambda lines: lines[0]["samples"].pop()), r"line 1: 5 sample records, num_samples says 6"),
    (lambda root: _edit_manifest(root, lambda lines: lines[1]["samples"][2].pop("rewards")), r"line 2: sample record 2: rewards must map"),
    (lambda root: _edit_manifest(root, lambda lines: lines[0]["samples"][1]["rewards"].update(bright="0.43")),
     r"line 1: sample record 1: rewards must map .*'0.43'"),
    (lambda root: _edit_manifest(root, lambda lines: lines[0]["samples"][1].update(member="1")), r"line 1: sample record 1 has no valid member"),
    (lambda root: _edit_manifest(root, lambda lines: lines[0]["samples"][1].update(row=0)), r"line 1: sample rows \[0, 0, 2, 3, 4, 5\]"),
    (lambda root: _edit_manifest(root, lambda lines: lines[0]["samples"][1].update(member=2)), r"prompt 0 of shard-00000.safetensors has members \[0, 2, 2\]"),
])
def test_a_damaged_or_hand_edited_store_is_a_store_error_naming_the_file(tmp_path, damage, message):
    """They were a JSONDecodeError, a KeyError or a ValueError from deep in a run, and a reward stored as a string was
    left out as 'dropped when generating'."""
    root = tmp_path / "s"
    _fill(root)
    damage(root)
    with pytest.raises(RolloutStoreError, match=message):
        RolloutStore(root)


def test_wrong_shape_is_reported(tmp_path):
    root = tmp_path / "s"
    _fill(root)
    path = root / "shards" / "shard-00001.safetensors"
    save_file({"latents": torch.zeros(6, 4, 4)}, str(path))
    lines = [json.loads(l) for l in (root / "manifest.jsonl").read_text().splitlines()]
    lines[1]["sha256"] = __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    (root / "manifest.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    with pytest.raises(RolloutStoreError, match="shard-00001.*shape"):
        list(RolloutStore(root).groups())


def test_a_k_that_does_not_divide_the_group_is_named_once_not_per_prompt_and_epoch(tmp_path, caplog):
    store = _fill(tmp_path / "s")  # 12 prompts x 3 samples
    with caplog.at_level(logging.WARNING, logger="flowalign.offline"):
        for _ in range(2):  # two epochs
            assert len(list(store.groups(k=2))) == 12
    assert caplog.text.count("does not divide") == 1
    assert "k=2 does not divide the 3 samples per prompt: the last 1 of each prompt (12 in all) are not used" in caplog.text


def test_stores_of_different_base_seeds_share_no_sample_and_older_stores_keep_their_seeds(tmp_path):
    """Seeds were base + prompt_index * G + member: the stores of seeds 0 and 1 shared all but one sample per group."""
    assert sample_seed(7, 5, 1, 3) == 7 * 2**32 + 5 * 3 + 1 and sample_seed(7, 5, 1, 3, stride=1) == 7 + 16
    seeds = {base: {r["seed"] for r in fill_store(tmp_path / f"s{base}", PROMPTS, G, sample_fn, score_fn, base_seed=base,
                                                  prompts_per_shard=2).records()} for base in (0, 1)}
    assert len(seeds[0]) == len(seeds[1]) == 36 and not seeds[0] & seeds[1]
    # a store begun before the stride (its store.json has no seed_stride) is finished with the seeds it began with
    root = tmp_path / "old"
    _fill(root)
    meta = json.loads((root / "store.json").read_text())
    assert meta["settings"].pop("seed_stride") == 2**32
    (root / "store.json").write_text(json.dumps(meta))
    _edit_manifest(root, lambda lines: lines.pop())  # shard 5 (prompts 10, 11) left to draw
    (root / "shards" / "shard-00005.safetensors").unlink()
    store = _fill(root)
    redrawn = sorted(r["seed"] for r in store.records() if r["prompt_index"] >= 10)
    assert redrawn == [7 + p * G + j for p in (10, 11) for j in range(G)]


def test_settings_mismatch_and_no_pickle(tmp_path):
    root = tmp_path / "s"
    _fill(root, image_format="tensor")
    with pytest.raises(RolloutStoreError, match="model_hash"):
        fill_store(root, PROMPTS, G, sample_fn, score_fn, settings={"model_hash": "other"}, base_seed=7, prompts_per_shard=2, image_format="tensor")
    tensors = load_file(str(root / "shards" / "shard-00000.safetensors"))
    assert tensors["images"].dtype == torch.uint8 and tensors["images"].shape == (6, 3, 8, 8)
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in root.rglob("*"))


def test_a_resume_with_other_prompt_constraints_is_another_store(tmp_path):
    """The prompts' whole specs are in the settings: a prompt file whose constraints changed between a crash and
    the rerun would mix shards scored against the old and the new ones."""
    root = tmp_path / "s"
    fill_store(root, PROMPTS[:2], G, sample_fn, score_fn, settings={"model_hash": "abc"}, prompts_per_shard=1)
    edited = [PROMPTS[0], {**PROMPTS[1], "tag": "other"}]
    with pytest.raises(RolloutStoreError, match="prompts_sha256"):
        fill_store(root, edited, G, sample_fn, score_fn, settings={"model_hash": "abc"}, prompts_per_shard=1)


def test_samples_a_reward_dropped_leave_their_groups_out(tmp_path):
    """on_error: drop gives a sample a NaN reward: it is stored as null (valid JSON) and its group is left out
    of groups(), num_groups() and batches(), where it used to reach GDRO mid-run as NaN."""
    def holes(images, prompts, metadata):
        out = score_fn(images, prompts, metadata)
        out["bright"] = torch.where(torch.tensor([p == "prompt 1" for p in prompts]) & (torch.arange(len(prompts)) % G == 0),
                                    torch.tensor(float("nan")), out["bright"])
        return out

    store = fill_store(tmp_path / "s", PROMPTS[:4], G, sample_fn, holes, prompts_per_shard=2)
    manifest = (tmp_path / "s" / "manifest.jsonl").read_text()
    assert "NaN" not in manifest and manifest.count("null") == 1
    for line in manifest.splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the manifest"))
    groups = list(store.groups())
    assert [g.prompt for g in groups] == ["prompt 0", "prompt 2", "prompt 3"] and store.num_groups() == 3
    assert all(torch.isfinite(batch.rewards).all() for batch, _ in store.batches(G, 2, reward="bright"))
    # a run on the other reward keeps that group: only the reward it trains on must be there
    assert store.num_groups(G, reward="red") == 4 and sum(len(chosen) for _, chosen in store.batches(G, 2, reward="red")) == 4


def test_a_store_from_before_the_spec_hash_still_resumes(tmp_path, caplog):
    import hashlib

    root = tmp_path / "s"
    fill_store(root, PROMPTS[:2], G, sample_fn, score_fn, prompts_per_shard=1)
    meta = json.loads((root / "store.json").read_text())
    meta["settings"]["prompts_sha256"] = hashlib.sha256(json.dumps([p["prompt"] for p in PROMPTS[:2]]).encode()).hexdigest()
    (root / "store.json").write_text(json.dumps(meta))  # what the texts-only digest wrote
    with caplog.at_level("WARNING"):
        store = fill_store(root, PROMPTS[:2], G, sample_fn, score_fn, prompts_per_shard=1)
    assert len(store) == 2 * G and "checks the prompt texts only" in caplog.text


def test_a_complete_but_corrupt_last_line_is_corruption_not_an_interruption(tmp_path):
    root = tmp_path / "s"
    _fill(root)
    manifest = root / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:-1]) + "{not json}\n")  # ends with its newline: not a torn write
    with pytest.raises(RolloutStoreError, match="line 6 is not valid JSON"):
        RolloutStore(root)
    with pytest.raises(RolloutStoreError, match="line 6 is not valid JSON"):
        _fill(root)  # a rerun does not truncate it away either
    assert manifest.read_text().endswith("{not json}\n")


@pytest.mark.slow
def test_run_generate_with_tiny_sd3_and_builtin_reward(tmp_path):
    from flowalign.rewards import load_reward
    from flowalign.train.generate import adapter_sample_fn, load_generate_config, load_model_adapter, run_generate

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\ntwo green triangles\n")
    config = tmp_path / "gen.yaml"
    config.write_text(
        "model: {pretrained: tiny-sd3}\nrewards: [{name: brightness}, {name: color_fraction, weight: 0.5}]\n"
        f"prompts: {prompts}\nsamples_per_prompt: 2\nnum_steps: 2\nguidance_scale: 2.0\nkernel: flow_sde\n"
        f"noise_level: 0.7\nprompts_per_shard: 2\nbatch_size: 4\noutput_dir: {tmp_path / 'store'}\n"
    )
    cfg = load_generate_config(config, ["seed=3"])
    path = run_generate(cfg)
    store = RolloutStore(path)
    assert store.is_complete and len(store) == 6 and store.latent_shape == (4, 16, 16)
    assert store.reward_names == ["brightness", "color_fraction", "total"]
    assert len(store.settings["model_hash"]) == 64
    groups = list(store.groups(2))
    # a sample depends on its seed only: redraw prompt 2 alone, one sample per batch
    adapter = load_model_adapter(cfg.model)
    sample = adapter_sample_fn(adapter, 2, 2.0, "flow_sde", 0.7, batch_size=1)
    latents, images = sample([groups[2].prompt] * 2, groups[2].seeds)
    assert torch.allclose(latents, groups[2].x0, atol=1e-5)
    bright = load_reward("brightness")(images, [groups[2].prompt] * 2).scores
    assert torch.allclose(bright, groups[2].rewards["brightness"], atol=1e-5)
    total = groups[2].rewards["brightness"] + 0.5 * groups[2].rewards["color_fraction"]
    assert torch.allclose(total, groups[2].rewards["total"], atol=1e-6)
    # a rerun finds the store complete and leaves it as it is
    before = (path / "manifest.jsonl").read_text()
    run_generate(cfg)
    assert (path / "manifest.jsonl").read_text() == before


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from flowalign.train.generate import GenerateConfig, run_generate
    from flowalign.config import ModelConfig, RewardConfig

    root = tmp_path_factory.mktemp("offline")
    prompts = root / "p.txt"
    prompts.write_text("a red circle\na blue square\ntwo green triangles\na yellow square\n")
    cfg = GenerateConfig(model=ModelConfig(pretrained="tiny-sd3"), rewards=[RewardConfig(name="brightness")], prompts=str(prompts),
                         samples_per_prompt=4, num_steps=2, guidance_scale=1.0, prompts_per_shard=2, output_dir=str(root / "store"))
    return run_generate(cfg)


def _offline_trainer(store, out, **kw):
    from flowalign.config import LoraConfig, ModelConfig
    from flowalign.train.offline_trainer import OfflineConfig, OfflineTrainer

    kw.setdefault("lora", LoraConfig(rank=4, alpha=4.0))
    cfg = OfflineConfig(model=ModelConfig(pretrained="tiny-sd3"), store=str(store), groups_per_batch=2, output_dir=str(out), **kw)
    return OfflineTrainer(cfg).setup()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["gdro", "diffusion_dpo"])
def test_offline_trainer_lowers_the_loss_on_fixed_noise(tiny_store, tmp_path, objective):
    from flowalign.lora import get_lora_state_dict

    trainer = _offline_trainer(tiny_store, tmp_path / "run", objective=objective, lr=3e-3, epochs=2,
                               objective_kwargs={"beta": 50.0} if objective == "diffusion_dpo" else {"gamma": 0.0, "beta": 50.0})
    batch, groups = next(trainer.store.batches(4, 4, shuffle=False))
    g = torch.Generator().manual_seed(0)
    sigma = torch.rand(4, 1, generator=g).expand(4, 4) * 0.8 + 0.1
    noise = torch.randn(4, 1, *batch.x0.shape[2:], generator=g).expand_as(batch.x0)

    def fixed_loss():
        policy, reference = trainer.velocity_fns([x.prompt for x in groups])
        with torch.no_grad():
            return trainer.objective.loss(batch, policy, reference, sigma=sigma, noise=noise)[0].item()

    before = fixed_loss()
    nfe0 = trainer.nfe
    lora_before = get_lora_state_dict(trainer.adapter.trainable_module)
    history = trainer.train()
    assert len(history) == 4 and all(math.isfinite(h["loss"]) for h in history)  # 4 groups / 2 per batch x 2 epochs
    assert history[-1]["train/nfe"] - nfe0 == 4 * 2 * (2 * 4)  # per step: policy + reference on P*k = 8 rows
    for h in history:  # 8 stored samples per step over the step's wall time
        assert h["perf/samples_per_s"] == pytest.approx(8 / h["time/step"])
    assert history[-1]["train/seconds"] == pytest.approx(sum(h["time/step"] for h in history))
    after = fixed_loss()
    assert after < before
    lora_after = get_lora_state_dict(trainer.adapter.trainable_module)
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_after)
    path = trainer.save_final()
    assert path.name == "pytorch_lora_weights.safetensors" and path.exists()
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 5
    prefix = "gdro" if objective == "gdro" else "dpo"
    from PIL import Image

    # loss | ranking accuracy | implicit reward (GDRO's mean, DPO's margin): three panels of 450 px
    assert Image.open(tmp_path / "run" / "training_curve.png").size == (1350, 360)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "logs")).Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars(f"{prefix}/implicit_acc")] == pytest.approx([h[f"{prefix}/implicit_acc"] for h in history])


@pytest.mark.slow
def test_offline_awm_raises_the_likelihood_of_the_better_samples(tiny_store, tmp_path):
    """`flowalign offline` with objective awm: on fixed draws the clipped surrogate falls, the better half of
    each group gains likelihood ratio against the base over the worse half, and the run writes its curve."""
    from flowalign.objectives.awm import offline_group_advantages

    trainer = _offline_trainer(tiny_store, tmp_path / "run", objective="awm", lr=3e-3, epochs=3,
                               objective_kwargs={"sigma_range": [0.2, 0.9], "weighting": "uniform"})
    batch, groups = next(trainer.store.batches(4, 4, shuffle=False))
    g = torch.Generator().manual_seed(0)
    sigma = torch.rand(4, 4, generator=g) * 0.7 + 0.2
    noise = torch.randn(batch.x0.shape, generator=g)

    def fixed():
        policy, reference = trainer.velocity_fns([x.prompt for x in groups])
        with torch.no_grad():
            loss, _ = trainer.objective.offline_loss(batch, policy, reference, sigma=sigma, noise=noise)
            from flowalign.objectives.awm import matching_log_likelihood
            from flowalign.objectives.diffusion_dpo import noised_and_target

            x_s, target = noised_and_target(batch.x0.flatten(0, 1), noise.flatten(0, 1), sigma.flatten())
            gap = (matching_log_likelihood(policy(x_s, sigma.flatten()), target, sigma.flatten(), "uniform")
                   - matching_log_likelihood(reference(x_s, sigma.flatten()), target, sigma.flatten(), "uniform"))
        return float(loss), gap.view(4, 4)

    before, gap_before = fixed()
    assert gap_before.abs().max() == 0  # LoRA B starts at zero: the policy is the base
    history = trainer.train()
    assert len(history) == 6 and all(math.isfinite(h["loss"]) for h in history)
    after, gap_after = fixed()
    assert after < before
    adv = offline_group_advantages(batch.rewards)
    better, worse = gap_after[adv > 0].mean(), gap_after[adv < 0].mean()
    assert better > worse  # log-likelihood (vs the base) moved up for above-average samples, down for the others
    trainer.save_final()
    from PIL import Image

    # loss | ratio | clipped fraction | velocity gap: four panels of 450 px
    assert Image.open(tmp_path / "run" / "training_curve.png").size == (1800, 360)


@pytest.mark.slow
def test_offline_trainer_resume_continues_bit_exactly(tiny_store, tmp_path):
    from flowalign.lora import get_lora_state_dict

    from flowalign.train.offline_trainer import OfflineTrainer

    full = _offline_trainer(tiny_store, tmp_path / "full", lr=1e-3, epochs=2)
    full.train()
    part = _offline_trainer(tiny_store, tmp_path / "part", lr=1e-3, max_steps=3, checkpoint_every=1, epochs=2)
    part.train()
    assert part.step == 3
    config = part.config
    config.max_steps = None
    resumed = OfflineTrainer(config, resume=True).setup()
    assert resumed.step == 3
    reads = []
    real = resumed.store._read_groups
    resumed.store._read_groups = lambda refs: reads.append(len(refs)) or real(refs)
    resumed.train()
    assert resumed.step == full.step == 4
    assert reads == [2]  # the last step's 2 groups: the 3 steps done (over 2 epochs) are not read again
    a, b = get_lora_state_dict(full.adapter.trainable_module), get_lora_state_dict(resumed.adapter.trainable_module)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_shard_damaged_before_or_during_an_offline_run_loses_no_step(tiny_store, tmp_path):
    """A damaged shard was found only when an epoch reached it, after steps had trained, and nothing was checkpointed
    (checkpoint_every 0). Setup now checks every shard; one damaged mid-run checkpoints the steps done, and after the
    store is repaired the resumed run ends where an uninterrupted one does."""
    import shutil

    from flowalign.lora import get_lora_state_dict
    from flowalign.train.offline_trainer import OfflineTrainer

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    shards = sorted((store / "shards").glob("*.safetensors"))
    good = {path: path.read_bytes() for path in shards}
    _flip_last_byte(shards[1])
    with pytest.raises(RolloutStoreError, match=r"shard-00001.*rerun the `flowalign generate` that wrote the store"):
        _offline_trainer(store, tmp_path / "refused", lr=1e-3, epochs=2)
    shards[1].write_bytes(good[shards[1]])

    full = _offline_trainer(store, tmp_path / "full", lr=1e-3, epochs=2)
    full.train()

    def damage_after_the_first_step(trainer, metrics):
        if trainer.step == 1:
            for path in shards:
                _flip_last_byte(path)

    part = _offline_trainer(store, tmp_path / "part", lr=1e-3, epochs=2)
    with pytest.raises(RolloutStoreError, match="sha256 differs"):
        part.train(callback=damage_after_the_first_step)
    assert [p.name for p in (tmp_path / "part" / "checkpoints").iterdir()] == ["iter_000001"]
    for path in shards:  # the repair: what `flowalign generate` draws again
        path.write_bytes(good[path])
    resumed = OfflineTrainer(part.config, resume=True).setup()
    assert resumed.step == 1
    resumed.train()
    a, b = get_lora_state_dict(full.adapter.trainable_module), get_lora_state_dict(resumed.adapter.trainable_module)
    assert resumed.step == full.step == 4 and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_offline_resume_after_a_crash_keeps_one_metrics_row_per_step(tiny_store, tmp_path):
    """A crash after step 2 was logged but before its checkpoint: the resumed run replays step 2
    and metrics.csv still has each step once (it used to append a second row for it)."""
    import csv
    import shutil

    from flowalign.train.offline_trainer import OfflineTrainer

    part = _offline_trainer(tiny_store, tmp_path / "run", lr=1e-3, epochs=2, max_steps=2, checkpoint_every=1)
    part.train()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "iter_000002")  # as if killed before writing it
    config = part.config
    config.max_steps = None
    resumed = OfflineTrainer(config, resume=True).setup()
    assert resumed.step == 1
    resumed.train()
    with open(tmp_path / "run" / "metrics.csv", newline="") as fh:
        steps = [int(row["step"]) for row in csv.DictReader(fh)]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_offline_trainer_with_text_encoder_lora(tiny_store, tmp_path):
    """GDRO with ``lora.train_text_encoder``: the text LoRA trains, the reference sees the base text
    features (a fresh pipeline's), the file loads in plain diffusers, and a resumed run is bit-exact."""
    from flowalign.config import LoraConfig
    from flowalign.lora import get_lora_state_dict, lora_disabled
    from flowalign.pipelines import load_adapter
    from flowalign.pipelines.testing import tiny_sd3_pipeline
    from flowalign.train.model import TINY_T5_TOKENS
    from flowalign.train.offline_trainer import OfflineTrainer

    lora = LoraConfig(rank=4, alpha=4.0, train_text_encoder=True, text_encoder_lr=3e-2)
    full = _offline_trainer(tiny_store, tmp_path / "full", lr=3e-3, lora=lora)
    assert set(full.text_modules) == {"text_encoder", "text_encoder_2"}
    full.train()
    for module in full.text_modules.values():
        assert any(float(p.detach().abs().max()) > 0 for n, p in module.named_parameters() if "lora_B" in n)
    # the reference's conditioning is the base model's: its velocity equals a fresh pipeline's
    prompts = ["a red circle", "a blue square"]
    x = torch.randn(2 * full.k, *full.adapter.latent_shape, generator=torch.Generator().manual_seed(3))
    sigma = torch.full((2 * full.k,), 0.6)
    policy, reference = full.velocity_fns(prompts)
    fresh = load_adapter(tiny_sd3_pipeline(seed=0), max_sequence_length=TINY_T5_TOKENS)
    expected = fresh.velocity(x, sigma, fresh.encode(prompts, do_classifier_free_guidance=False).repeat_interleave(full.k))
    torch.testing.assert_close(reference(x, sigma), expected, atol=1e-5, rtol=0)
    with lora_disabled(full.adapter.trainable_module):  # the transformer's LoRA off: what is left is the text side
        assert float((policy(x, sigma) - expected).detach().abs().max()) > 1e-4
    # the file holds all three components and reproduces the trained policy in plain diffusers
    path = full.save_final()
    loaded = tiny_sd3_pipeline(seed=0)
    loaded.load_lora_weights(str(path.parent))
    adapter = load_adapter(loaded, max_sequence_length=TINY_T5_TOKENS)
    with torch.no_grad():
        trained = policy(x, sigma)
    torch.testing.assert_close(adapter.velocity(x, sigma, adapter.encode(prompts, do_classifier_free_guidance=False).repeat_interleave(full.k)),
                               trained, atol=1e-4, rtol=0)
    # resume: 1 step, checkpoint, 1 more equals 2 straight
    part = _offline_trainer(tiny_store, tmp_path / "part", lr=3e-3, lora=lora, max_steps=1, checkpoint_every=1)
    part.train()
    config = part.config
    config.max_steps = None
    resumed = OfflineTrainer(config, resume=True).setup()
    resumed.train()
    for name in ("text_encoder", "text_encoder_2"):
        a, b = get_lora_state_dict(full.text_modules[name]), get_lora_state_dict(resumed.text_modules[name])
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_verifier_partial_scores_are_stored_and_not_picked_by_default(tmp_path):
    import numpy as np

    from flowalign.config import RewardConfig
    from flowalign.rewards import load_reward
    from flowalign.rewards.shapes_scenes import load_prompts, render_spec
    from flowalign.train.generate import reward_score_fn

    specs = load_prompts("train")[:2]
    rng = np.random.default_rng(0)
    clean = torch.stack([torch.from_numpy(render_spec(s, rng)).permute(2, 0, 1).float() / 255 for s in specs])
    blank = torch.full_like(clean, 238 / 255)

    def sample_fn(prompts, seeds):  # member 0: a clean render of its prompt, member 1: an empty canvas
        index = [next(i for i, s in enumerate(specs) if s["prompt"] == p) for p in prompts]
        images = torch.stack([clean[i] if seed % 2 == 0 else blank[i] for i, seed in zip(index, seeds)])
        return images.clone(), images

    score_fn = reward_score_fn([RewardConfig(name="shapes")])
    store = fill_store(tmp_path / "s", specs, 2, sample_fn, score_fn, prompts_per_shard=1)
    assert store.reward_names == ["shapes", "shapes/partial"]
    direct = load_reward("shapes")(clean, [s["prompt"] for s in specs], [{k: v for k, v in s.items() if k != "prompt"} for s in specs])
    groups = list(store.groups())
    for g, score, partial in zip(groups, direct.scores, direct.details["partial"]):
        assert g.rewards["shapes"][0] == score and g.rewards["shapes/partial"][0] == partial
        assert g.rewards["shapes/partial"][1] < g.rewards["shapes/partial"][0]  # the empty canvas meets fewer constraints
    batch, _ = next(store.batches(k=2, groups_per_batch=2, shuffle=False))
    assert torch.equal(batch.rewards, torch.stack([g.rewards["shapes"] for g in groups]))


def test_a_single_rewards_weight_reaches_the_stored_total(tmp_path):
    """One reward with weight -1 (a penalty): offline runs must rank its samples as the online trainer does
    (total = weight x score), not by the raw score, which `generate` stored alone."""
    from flowalign.config import RewardConfig
    from flowalign.train.generate import reward_score_fn

    images = torch.stack([torch.full((3, 8, 8), 0.2), torch.full((3, 8, 8), 0.8)])
    scored = reward_score_fn([RewardConfig(name="brightness", weight=-1.0)])(images, ["a", "b"], [{}, {}])
    assert torch.allclose(scored["total"], -scored["brightness"]) and scored["total"][0] > scored["total"][1]
    assert "total" not in reward_score_fn([RewardConfig(name="brightness")])(images, ["a", "b"], [{}, {}])  # weight 1: as before


def test_generation_shows_a_progress_bar_over_the_samples_left(tmp_path, capsys):
    _fill(tmp_path / "s", progress=False)
    assert "generate" not in capsys.readouterr().err
    manifest = tmp_path / "s" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:4]) + "\n")  # 2 of the 6 shards (2 prompts x 3 samples each) to redo
    _fill(tmp_path / "s2", progress=True)
    err = capsys.readouterr().err
    assert "generate" in err and "36/36" in err and "bright=" in err
    _fill(tmp_path / "s", progress=True)
    err = capsys.readouterr().err
    assert "12/12" in err and "36/36" not in err  # only the samples still to generate are counted


def test_offline_lr_schedule_follows_the_hand_worked_cosine(tiny_store, tmp_path):
    # 4 prompt groups / 2 per step x 2 epochs = 4 steps; warmup 1, then cosine from 1 down to the floor 0.1:
    # step 0: (0+1)/(1+1) = 0.5; steps 1-3: p = 0, 1/2, 1 -> 0.1 + 0.9 (1 + cos(pi p)) / 2 = 1, 0.55, 0.1
    trainer = _offline_trainer(tiny_store, tmp_path / "run", lr=1e-3, epochs=2, lr_schedule="cosine", lr_warmup=1, lr_min_ratio=0.1)
    assert trainer.total_steps == 4
    assert trainer.params == [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert trainer.params and all(p.requires_grad for p in trainer.params)
    history = trainer.train()
    assert [h["optim/lr"] for h in history] == pytest.approx([5e-4, 1e-3, 5.5e-4, 1e-4])
    assert [h["optim/steps"] for h in history] == [1.0] * 4


def test_offline_resume_refuses_a_decay_over_another_length(tiny_store, tmp_path):
    from flowalign.errors import ConfigError
    from flowalign.train.offline_trainer import OfflineTrainer

    part = _offline_trainer(tiny_store, tmp_path / "run", lr=1e-3, epochs=2, lr_schedule="linear", max_steps=1)
    part.train()
    config = part.config
    config.max_steps = None  # 4 steps now, the checkpoint's schedule spans 1
    with pytest.raises(ConfigError, match="linear lr schedule over 1 steps, this config's run has 4"):
        OfflineTrainer(config, resume=True).setup()
    with pytest.raises(ConfigError, match="lr_warmup=4 must be below the run's 4 steps"):
        _offline_trainer(tiny_store, tmp_path / "other", epochs=2, lr_warmup=4)


def test_offline_nonfinite_loss_skips_the_step_and_the_limit_stops_the_run(tiny_store, tmp_path):
    from flowalign.errors import NonFiniteLossError
    from flowalign.lora import get_lora_state_dict

    trainer = _offline_trainer(tiny_store, tmp_path / "run", lr=1e-3, epochs=3, max_nonfinite_steps=2)
    real_loss, calls = trainer.objective.loss, []

    def loss(batch, policy, reference):  # NaN at steps 2, 4 and 5 (1-based)
        calls.append(1)
        value, metrics = real_loss(batch, policy, reference)
        return (value * float("nan"), metrics) if len(calls) in (2, 4, 5) else (value, metrics)

    trainer.objective.loss = loss
    snapshots = []
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite losses/gradients in a row at step 5 \(max_nonfinite_steps=2\); lower lr"):
        trainer.train(callback=lambda t, m: snapshots.append((m, get_lora_state_dict(t.adapter.trainable_module))))
    assert [m["step"] for m, _ in snapshots] == [1, 2, 3, 4]  # the 5th call raised
    assert [m["optim/steps"] for m, _ in snapshots] == [1.0, 0.0, 1.0, 0.0]
    (_, after1), (_, after2), (_, after3), _ = snapshots
    assert all(torch.equal(after1[k], after2[k]) for k in after1)  # the NaN step left the LoRA alone
    assert any(not torch.equal(after2[k], after3[k]) for k in after2)  # a finite step after it trains again


def test_offline_stop_on_a_signal_checkpoints_and_resume_equals_the_uninterrupted_run(tiny_store, tmp_path):
    import signal

    from flowalign.errors import TrainingStopped
    from flowalign.lora import get_lora_state_dict
    from flowalign.train.offline_trainer import OfflineTrainer

    full = _offline_trainer(tiny_store, tmp_path / "full", lr=1e-3, epochs=2)
    full.train()
    part = _offline_trainer(tiny_store, tmp_path / "part", lr=1e-3, epochs=2)

    def send(trainer, metrics):
        if metrics["step"] == 1:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(TrainingStopped, match=r"stopped by SIGINT after step 1 of 4; checkpoint .*iter_000001") as info:
        part.train(callback=send)
    assert info.value.step == 1 and info.value.exit_status == 130
    # the message names the command that continues this run: its own saved config, not the default recipe's folder
    saved = tmp_path / "part" / "offline_config.yaml"
    assert str(info.value).endswith(f"continue with flowalign offline --resume {tmp_path / 'part'}")
    from flowalign.train.offline_trainer import load_offline_config, offline_config_hash

    assert offline_config_hash(load_offline_config(saved)) == offline_config_hash(part.config)
    assert Path(load_offline_config(saved).output_dir) == tmp_path / "part"
    part.close()
    resumed = OfflineTrainer(part.config, resume=True).setup()
    assert resumed.step == 1
    resumed.train()
    assert resumed.step == full.step == 4
    a, b = get_lora_state_dict(full.adapter.trainable_module), get_lora_state_dict(resumed.adapter.trainable_module)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generate_finds_the_packaged_prompts_from_any_directory(tmp_path, monkeypatch):
    """The default prompts path assets/prompts/shapes_train.jsonl is the packaged copy outside the repo (as for
    train and eval); generate looked for it under the working directory and failed."""
    from flowalign.config import ModelConfig, RewardConfig
    from flowalign.train.generate import GenerateConfig, run_generate

    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "assets").exists()
    cfg = GenerateConfig(model=ModelConfig(pretrained="tiny-sd3"), rewards=[RewardConfig(name="brightness")],
                         prompts="assets/prompts/shapes_train.jsonl", num_prompts=1, samples_per_prompt=2, num_steps=1,
                         guidance_scale=1.0, output_dir=str(tmp_path / "store"))
    store = RolloutStore(run_generate(cfg))
    assert store.is_complete and len(store) == 2


def test_offline_training_checks_the_model_that_generated_the_store(tiny_store, tmp_path, caplog):
    """A model with the store's latent shape but other weights: AWM (whose old policy is the generating model) is
    refused; the sampler-independent GDRO warns and trains. The generating model itself passes silently."""
    import logging

    from flowalign.config import LoraConfig, ModelConfig
    from flowalign.errors import ConfigError
    from flowalign.pipelines import load_adapter
    from flowalign.pipelines.testing import tiny_sd3_pipeline
    from flowalign.train.model import TINY_T5_TOKENS
    from flowalign.train.offline_trainer import OfflineConfig, OfflineTrainer

    def trainer(objective, out, seed):
        other = load_adapter(tiny_sd3_pipeline(seed=seed), max_sequence_length=TINY_T5_TOKENS)
        for module in other.pipeline.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        cfg = OfflineConfig(model=ModelConfig(pretrained="tiny-sd3"), store=str(tiny_store), groups_per_batch=2,
                            output_dir=str(tmp_path / out), objective=objective, lora=LoraConfig(rank=4, alpha=4.0))
        return OfflineTrainer(cfg, adapter=other)

    with pytest.raises(ConfigError, match="generated by another model .* old policy"):
        trainer("awm", "awm", seed=1).setup()
    with caplog.at_level(logging.WARNING, logger="flowalign.train.offline_trainer"):
        trainer("gdro", "gdro", seed=1).setup()
    assert "generated by another model" in caplog.text and "sampler-independent" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flowalign.train.offline_trainer"):
        trainer("awm", "same", seed=0).setup()  # the generating model (tiny-sd3 is seed 0)
    assert "another model" not in caplog.text


def test_offline_awm_names_a_store_generated_in_another_dtype(tiny_store, tmp_path):
    """The same model loaded in bf16 was refused as 'generated by another model ... than tiny-sd3' (the same name)."""
    from flowalign.config import LoraConfig, ModelConfig
    from flowalign.errors import ConfigError
    from flowalign.train.offline_trainer import OfflineConfig, OfflineTrainer

    cfg = OfflineConfig(model=ModelConfig(pretrained="tiny-sd3", dtype="bfloat16"), store=str(tiny_store), groups_per_batch=2,
                        output_dir=str(tmp_path / "bf16"), objective="awm", lora=LoraConfig(rank=4, alpha=4.0))
    with pytest.raises(ConfigError, match=r"generated with model.dtype='float32', this run loads 'bfloat16': .* set "
                                          r"model.dtype=float32: offline AWM takes the generating model as its old policy"):
        OfflineTrainer(cfg).setup()


def test_offline_resume_refuses_a_store_whose_content_changed(tiny_store, tmp_path):
    """The resume hash holds the store's path only: a store regenerated (or finished) in the same folder resumed
    silently on other groups. The checkpoint now keeps the store's fingerprint (settings + shard checksums)."""
    import shutil

    from flowalign.errors import CheckpointError
    from flowalign.offline import MANIFEST_FILE
    from flowalign.train.offline_trainer import OfflineTrainer

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    part = _offline_trainer(store, tmp_path / "run", lr=1e-3, max_steps=1, checkpoint_every=1)
    part.train()
    config = part.config
    manifest = store / MANIFEST_FILE
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:-1]))  # the same folder, one shard fewer
    with pytest.raises(CheckpointError, match="another content of store"):
        OfflineTrainer(config, resume=True).setup()
    manifest.write_text("".join(lines))  # the content it was trained on: resumes
    assert OfflineTrainer(config, resume=True).setup().step == 1


def test_the_progress_bar_averages_a_reward_over_its_scored_samples(tmp_path, capsys):
    """A dropped (NaN) score counted as 0 in the bar's running mean: 'flaky=0.454' where the kept samples averaged 0.9."""
    def flaky(images, prompts, metadata):
        return {"flaky": torch.tensor([float("nan") if p.endswith(("0", "2")) else 0.9 for p in prompts])}

    fill_store(tmp_path / "store", PROMPTS[:4], G, sample_fn, flaky, settings={"model_hash": "abc"}, base_seed=7,
               prompts_per_shard=4, progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "flaky=0.900" in bar, bar


def test_model_fingerprint_is_the_sha256_of_names_shapes_dtypes_and_bytes_by_hand(tmp_path):
    """Stores record it and refuse another model's: its value must not drift when its computation is made faster."""
    import hashlib

    from flowalign.train.generate import model_fingerprint

    module = torch.nn.Linear(3, 2).to(torch.bfloat16)
    digest = hashlib.sha256()
    for name in ("bias", "weight"):
        tensor = getattr(module, name).detach()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(bytes(tensor.view(torch.int16).numpy().tobytes()))
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"lora bytes")
    assert model_fingerprint(module) == digest.hexdigest()
    digest.update(b"lora bytes")
    assert model_fingerprint(module, str(tmp_path)) == digest.hexdigest()


def test_an_epoch_reads_only_its_batches_rows_and_checks_each_shard_once(tmp_path, monkeypatch):
    """batches() built every group of the store (every shard loaded and hashed) at the start of each epoch, so an
    epoch held the whole store in memory and a resume re-read the skipped epochs. Now each batch reads its own rows;
    the latents are the shards' own (read independently with load_shard), the order is unchanged, and a shard's
    sha256 is checked once per store (again when the file changes, which is then refused)."""
    from flowalign import offline

    _fill(tmp_path / "s")
    store = RolloutStore(tmp_path / "s")
    by_hand = {}
    for entry in store.entries:  # independent: whole shards, rows by the manifest
        t = store.load_shard(entry)
        for s in entry["samples"]:
            by_hand[(s["prompt_index"], s["member"])] = t["latents"][s["row"]]
    hashed = []
    real = offline.sha256_file
    monkeypatch.setattr(offline, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    fresh = RolloutStore(tmp_path / "s")
    epochs = [list(fresh.batches(3, 4, reward="bright", generator=torch.Generator().manual_seed(e))) for e in range(2)]
    assert sorted(hashed) == sorted(e["shard"] for e in fresh.entries)  # 6 shards, each hashed once over 2 epochs
    for batches in epochs:
        assert sum(len(groups) for _, groups in batches) == 12
        for batch, groups in batches:
            for j, g in enumerate(groups):
                members = [by_hand[(g.prompt_index, m)] for m in range(3)]
                assert torch.equal(batch.x0[j], torch.stack(members)) and torch.equal(g.x0, batch.x0[j])
    # the order is the permutation of the store-order groups, as before
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1)).tolist()
    assert [g.prompt_index for _, groups in epochs[1] for g in groups] == order  # 12 prompts, one group of 3 each, in prompt order
    # skip: the epoch's tail, the skipped batches not read
    reads = []
    monkeypatch.setattr(fresh, "_read_groups", lambda refs, real=fresh._read_groups: reads.append(len(refs)) or real(refs))
    tail = list(fresh.batches(3, 4, reward="bright", generator=torch.Generator().manual_seed(1), skip=2))
    assert reads == [4] and [g.prompt_index for g in tail[0][1]] == order[8:]
    assert torch.equal(tail[0][0].x0, epochs[1][2][0].x0)
    # a shard rewritten after its check is checked again, and refused
    entry = fresh.entries[0]
    path = tmp_path / "s" / "shards" / entry["shard"]
    t = load_file(str(path))
    t["latents"] = t["latents"] + 1
    save_file(t, str(path))
    with pytest.raises(RolloutStoreError, match="sha256 differs"):
        list(fresh.batches(3, 12, reward="bright", shuffle=False))


def test_a_shard_rewritten_with_its_size_and_mtime_restored_is_checked_again(tmp_path):
    """rsync -a / cp -p restore the modification time: a same-size rewrite of a shard this store had checked was read
    unverified. The change time (and the inode of a rename-replace) cannot be restored."""
    _fill(tmp_path / "s")
    store = RolloutStore(tmp_path / "s")
    list(store.batches(3, 12, reward="bright", shuffle=False))  # every shard checked once
    path = tmp_path / "s" / "shards" / store.entries[0]["shard"]
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-16:] = bytes(16)
    time.sleep(0.01)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(RolloutStoreError, match="sha256 differs"):
        list(store.batches(3, 12, reward="bright", shuffle=False))


def test_generate_checks_prompts_only_for_rewards_that_raise_as_train_does():
    """`generate` refused prompts outside the verifier's grammar under on_error: drop, which `train` accepts (such
    samples are meant to be dropped); under raise both refuse them before any model samples."""
    from flowalign.config import RewardConfig
    from flowalign.errors import ConfigError
    from flowalign.prompts import PromptRecord
    from flowalign.train.generate import reward_score_fn

    records = [PromptRecord(prompt="a photo of a cat"), PromptRecord(prompt="a red circle")]
    score = reward_score_fn([RewardConfig(name="shapes", on_error="drop")], records=records)
    out = score(torch.rand(2, 3, 32, 32), [r.prompt for r in records], [{}, {}])
    assert torch.isnan(out["shapes"][0]) and not torch.isnan(out["shapes"][1])
    with pytest.raises(ConfigError, match="outside the shapes caption grammar"):
        reward_score_fn([RewardConfig(name="shapes", on_error="raise")], records=records)
