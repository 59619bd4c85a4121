"""Tests for flowalign.prompts: the prompt-file reader (with fuzzing) and PromptSampler."""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowalign.errors import CheckpointError, ConfigError, PromptFileError
from flowalign.prompts import PromptRecord, PromptSampler, load_prompts, prompts_digest


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------


def test_txt_skips_blanks_and_comments(tmp_path):
    path = _write(tmp_path, "p.txt", "# header\n  a red circle  \n\n\t\n#comment\r\ntwo blue squares\r\nnaïve café ☕\n")
    records = load_prompts(path)
    assert [r.prompt for r in records] == ["a red circle", "two blue squares", "naïve café ☕"]
    assert [r.line for r in records] == [2, 6, 7]
    assert all(r.metadata == {} for r in records)


def test_jsonl_keeps_metadata(tmp_path):
    lines = [
        {"prompt": "a photo of a red circle", "tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"}]},
        {"prompt": "two squares", "tag": "counting", "include": [{"class": "square", "count": 2}]},
    ]
    path = _write(tmp_path, "p.jsonl", "\ufeff" + json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    records = load_prompts(path)
    assert [r.prompt for r in records] == [lines[0]["prompt"], lines[1]["prompt"]]
    assert records[0].metadata == {"tag": "color_attr", "include": lines[0]["include"]}
    assert records[1].metadata["include"][0]["count"] == 2
    assert [r.line for r in records] == [1, 3]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("p.txt", "", r"p\.txt: no prompts \(empty file\)"),
        ("p.txt", "# only\n\n", "only blank lines and comments"),
        ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "x",\n', r"p\.jsonl:2: malformed JSON"),
        ("p.jsonl", '{"prompt": "ok"}\n["a"]\n', r"p\.jsonl:2: expected a JSON object"),
        ("p.jsonl", '{"tag": "a"}\n', r"p\.jsonl:1: missing \"prompt\""),
        ("p.jsonl", '{"prompt": "  "}\n', r"p\.jsonl:1: empty \"prompt\""),
        ("p.jsonl", '{"prompt": 3}\n', r"p\.jsonl:1: \"prompt\" must be a string, got int"),
        ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "a red circle", "prompt": "a blue square"}\n', r"p\.jsonl:2: key 'prompt' appears twice"),
        ("p.jsonl", '{"prompt": "ok", "weight": NaN}\n', r"p\.jsonl:1: NaN is not a JSON number"),
        ("p.jsonl", '{"prompt": "ok", "include": [{"count": -Infinity}]}\n', r"p\.jsonl:1: -Infinity is not a JSON number"),
        ("p.jsonl", '{"prompt": "\\ud800"}\n', r"p\.jsonl:1: .*surrogate"),
        ("p.txt", b"fine\n\xff\xfe bad\n", r"p\.txt:2: not valid UTF-8"),
        ("p.csv", "a,b\n", "unsupported prompt file type '.csv'"),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, name, content, match):
    with pytest.raises(PromptFileError, match=match) as info:
        load_prompts(_write(tmp_path, name, content))
    assert str(tmp_path / name) in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(PromptFileError, match="not found") as info:
        load_prompts(tmp_path / "nope.txt")
    assert info.value.path == tmp_path / "nope.txt" and info.value.line is None
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(PromptFileError, match="is a folder; give a .txt or .jsonl prompt file"):
        load_prompts(tmp_path / "dir.jsonl")


def test_a_missing_relative_path_names_the_working_directory(tmp_path, monkeypatch, capsys):
    """A relative path that is not there is a file relative to *some* folder: the messages named the path alone, so a
    command run from the wrong folder read as a missing file."""
    from flowalign.config import load_config
    from flowalign.lora import read_lora_file
    from flowalign.train import cli

    monkeypatch.chdir(tmp_path)
    where = f"(relative to the working directory {tmp_path})"
    with pytest.raises(PromptFileError, match="not found") as info:
        load_prompts("prompts/mine.jsonl")
    assert str(info.value) == f"prompts/mine.jsonl: prompt file not found {where}"
    with pytest.raises(ConfigError) as info:
        load_config("configs/mine.yaml")
    assert str(info.value) == f"config file not found: configs/mine.yaml {where}"
    with pytest.raises(Exception, match="LoRA file not found") as info:
        read_lora_file("runs/mine")
    assert f"runs/mine {where}" in str(info.value)
    assert cli.main(["eval", "--model", "tiny-sd3", "--prompts", "p.txt", "--lora", "runs/mine"]) == 2
    assert f"--lora 'runs/mine' does not exist {where}" in capsys.readouterr().err
    with pytest.raises(PromptFileError) as info:  # an absolute path says nothing more
        load_prompts(tmp_path / "nope.txt")
    assert str(info.value) == f"{tmp_path / 'nope.txt'}: prompt file not found"


def test_error_line_attribute(tmp_path):
    with pytest.raises(PromptFileError) as info:
        load_prompts(_write(tmp_path, "p.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{bad\n'))
    assert info.value.line == 3


_FUZZ_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load_or_error(suffix, data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz{suffix}"
        path.write_bytes(data)
        try:
            records = load_prompts(path)
        except PromptFileError as exc:
            assert str(path) in str(exc)
            return None
    assert records and all(isinstance(r, PromptRecord) for r in records)
    for r in records:
        assert isinstance(r.prompt, str) and r.prompt.strip() and isinstance(r.metadata, dict) and r.line >= 1
        r.prompt.encode("utf-8")
    return records


@_FUZZ_SETTINGS
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".txt", ".jsonl"]))
def test_fuzz_arbitrary_bytes(data, suffix):
    _load_or_error(suffix, data)


@_FUZZ_SETTINGS
@given(text=st.text(max_size=300), suffix=st.sampled_from([".txt", ".jsonl"]))
def test_fuzz_arbitrary_text(text, suffix):
    _load_or_error(suffix, text.encode("utf-8", errors="surrogatepass"))


# finite floats: NaN and Infinity are not JSON, and the reader refuses them (test_reader_errors_name_file_and_line)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@_FUZZ_SETTINGS
@given(lines=st.lists(st.one_of(
    st.dictionaries(st.text(max_size=6), _json_values, max_size=4),  # objects, maybe with "prompt"
    _json_values,  # non-objects
), min_size=1, max_size=6))
def test_fuzz_json_shaped_lines(lines):
    data = "\n".join(json.dumps(line) for line in lines).encode("utf-8", errors="surrogatepass")
    records = _load_or_error(".jsonl", data)
    valid = all(isinstance(x, dict) and isinstance(x.get("prompt"), str) and x["prompt"].strip() for x in lines)
    try:
        "".join(x["prompt"] for x in lines).encode("utf-8")
    except (UnicodeEncodeError, TypeError, KeyError, AttributeError):
        valid = False
    assert (records is not None) == valid


@_FUZZ_SETTINGS
@given(items=st.lists(st.tuples(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(lambda p: p.strip()),
    st.dictionaries(st.text(max_size=6).filter(lambda k: k != "prompt"), _json_values, max_size=3),
), min_size=1, max_size=8))
def test_jsonl_roundtrip(items):
    data = "\n".join(json.dumps({"prompt": p, **meta}) for p, meta in items).encode("utf-8")
    records = _load_or_error(".jsonl", data)
    assert [(r.prompt, r.metadata) for r in records] == [(p, meta) for p, meta in items]


@_FUZZ_SETTINGS
@given(prompts=st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=30), min_size=1, max_size=8))
def test_txt_roundtrip(prompts):
    records = _load_or_error(".txt", "\n".join(prompts).encode("utf-8"))
    expected = [p.strip() for p in prompts if p.strip() and not p.strip().startswith("#")]
    if expected:
        assert [r.prompt for r in records] == expected
    else:
        assert records is None


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------


def _draw(sampler, iterations):
    return [sampler.next_indices() for _ in range(iterations)]


def test_epochs_cover_every_prompt_once():
    sampler = PromptSampler([f"p{i}" for i in range(12)], batch_size=4, seed=7)
    batches = _draw(sampler, 6)  # two epochs of three batches
    for epoch in range(2):
        seen = [i for b in batches[3 * epoch: 3 * epoch + 3] for i in b]
        assert sorted(seen) == list(range(12))
    assert batches[:3] != batches[3:]  # reshuffled per epoch
    assert sampler.epoch == 2 and sampler.offset == 0 and sampler.iteration == 6


def test_stream_straddles_epochs_evenly():
    sampler = PromptSampler([f"p{i}" for i in range(10)], batch_size=3, seed=1)
    drawn = [i for b in _draw(sampler, 10) for i in b]  # 30 draws = 3 epochs of 10
    assert Counter(drawn) == Counter({i: 3 for i in range(10)})
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:20]) == list(range(10))


def test_deterministic_and_seed_dependent():
    prompts = [f"p{i}" for i in range(20)]
    a = _draw(PromptSampler(prompts, 5, seed=3), 8)
    b = _draw(PromptSampler(prompts, 5, seed=3), 8)
    c = _draw(PromptSampler(prompts, 5, seed=4), 8)
    assert a == b and a != c
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert _draw(PromptSampler(prompts, 5, seed=g1), 4) == _draw(PromptSampler(prompts, 5, seed=g2), 4)
    unshuffled = _draw(PromptSampler(prompts, 8, shuffle=False), 3)
    assert unshuffled == [list(range(8)), list(range(8, 16)), [16, 17, 18, 19, 0, 1, 2, 3]]


def test_shards_partition_the_global_batch():
    prompts = [f"p{i}" for i in range(17)]
    single = _draw(PromptSampler(prompts, batch_size=6, seed=5), 7)
    shards = [_draw(PromptSampler(prompts, batch_size=2, seed=5, num_shards=3, shard_index=r), 7) for r in range(3)]
    for t in range(7):
        parts = [shards[r][t] for r in range(3)]
        assert parts[0] + parts[1] + parts[2] == single[t]
        if len(set(single[t])) == 6:  # the window does not wrap onto a repeated prompt
            assert not set(parts[0]) & set(parts[1]) and not set(parts[1]) & set(parts[2])


def test_state_dict_resumes_exactly():
    prompts = [PromptRecord(f"p{i}", {"k": i}) for i in range(9)]
    sampler = PromptSampler(prompts, batch_size=4, seed=2, num_shards=2, shard_index=1)
    _draw(sampler, 5)
    state = json.loads(json.dumps(sampler.state_dict()))  # JSON-serialisable
    expected = [sampler.next_batch() for _ in range(6)]
    resumed = PromptSampler(prompts, batch_size=4, seed=2, num_shards=2, shard_index=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(6)] == expected
    assert resumed.iteration == sampler.iteration == 11
    other_rank = PromptSampler(prompts, batch_size=4, seed=2, num_shards=2, shard_index=0)
    other_rank.load_state_dict(state)
    assert other_rank.state_dict() == {**state}


@pytest.mark.parametrize("change", [{"num_prompts": 8}, {"seed": 3}, {"shuffle": False}, {"offset": 9}])
def test_state_dict_mismatch(change):
    sampler = PromptSampler([f"p{i}" for i in range(9)], batch_size=2, seed=2)
    with pytest.raises(CheckpointError):
        sampler.load_state_dict({**sampler.state_dict(), **change})


def test_state_dict_refuses_edited_prompts_of_the_same_count():
    """A prompt file edited between stop and --resume (same line count) used to resume silently on other prompts."""
    records = [PromptRecord(f"p{i}", {"include": [{"shape": "circle", "count": i + 1}]}) for i in range(5)]
    state = PromptSampler(records, batch_size=2, seed=2).state_dict()
    PromptSampler(list(records), batch_size=2, seed=2).load_state_dict(state)  # the same prompts: resumes
    for edited in (records[::-1],  # reordered
                   [*records[:4], PromptRecord("p9", records[4].metadata)],  # a text changed
                   [*records[:4], PromptRecord("p4", {"include": [{"shape": "square", "count": 5}]})]):  # a constraint
        with pytest.raises(CheckpointError, match="prompts differ from those this run was trained on"):
            PromptSampler(edited, batch_size=2, seed=2).load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k != "prompts_sha256"}  # a checkpoint from before the digest
    PromptSampler(records[::-1], batch_size=2, seed=2).load_state_dict(legacy)
    assert prompts_digest(records) == prompts_digest([{"prompt": r.prompt, **r.metadata} for r in records])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompts": [], "batch_size": 1}, "at least one prompt"),
        ({"prompts": ["a"], "batch_size": 0}, "batch_size"),
        ({"prompts": ["a"], "batch_size": 1, "num_shards": 0}, "num_shards"),
        ({"prompts": ["a"], "batch_size": 1, "num_shards": 2, "shard_index": 2}, "shard_index"),
    ],
)
def test_sampler_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PromptSampler(**kwargs)


def test_repository_asset_paths_work_from_any_folder(tmp_path, monkeypatch):
    """An installed flowalign has no assets/ beside the user: the docs' relative paths fall back to the shipped files."""
    from flowalign.assets import asset_path, resolve_asset

    monkeypatch.chdir(tmp_path)
    assert resolve_asset("assets/prompts/shapes_heldout.jsonl") == asset_path("prompts", "shapes_heldout.jsonl")
    assert len(load_prompts("assets/prompts/shapes_heldout.jsonl")) == len(load_prompts(asset_path("prompts", "shapes_heldout.jsonl")))
    (tmp_path / "assets" / "prompts").mkdir(parents=True)
    (tmp_path / "assets" / "prompts" / "shapes_heldout.jsonl").write_text('{"prompt": "a red square"}\n')
    assert [r.prompt for r in load_prompts("assets/prompts/shapes_heldout.jsonl")] == ["a red square"]  # the user's own file wins


def test_spread_records_takes_distinct_prompts_round_robin_over_tags():
    """The eval grid took the first 8 lines: on the shipped held-out file, 2 prompts of one category."""
    from flowalign.prompts import spread_records

    records = [PromptRecord(p, {"tag": t}) for p, t in [("a", "x"), ("a", "x"), ("b", "x"), ("c", "y"), ("d", "z"), ("e", "y")]]
    assert [r.prompt for r in spread_records(records, 4)] == ["a", "c", "d", "b"]
    assert [r.prompt for r in spread_records(records, 10)] == ["a", "c", "d", "b", "e"]
    untagged = [PromptRecord(p) for p in "ppqr"]
    assert [r.prompt for r in spread_records(untagged, 3)] == ["p", "q", "r"]
    shipped = load_prompts(Path(__file__).resolve().parents[1] / "assets" / "prompts" / "shapes_heldout.jsonl")
    grid = spread_records(shipped, 8)
    assert len({r.prompt for r in grid}) == 8 and len({r.metadata["tag"] for r in grid}) == 5
