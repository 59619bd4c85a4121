"""Rewards over HTTP: a flowalign reward server in a thread, the ``remote`` reward as its client."""
from __future__ import annotations

import json
import math
import threading
import urllib.request

import pytest
import torch

from flowalign.errors import ConfigError, RewardError
from flowalign.rewards import call_reward, load_reward
from flowalign.rewards import remote
from flowalign.rewards.base import Reward, RewardOutput


class Flaky(Reward):
    """Mean brightness with details; NaN for prompts saying "nan", raises for prompts saying "boom"."""

    def score(self, images, prompts, metadata):
        if any("boom" in p for p in prompts):
            raise RuntimeError("model crashed on boom")
        luma = images.flatten(1).mean(1)
        luma = torch.where(torch.tensor(["nan" in p for p in prompts]), torch.full_like(luma, math.nan), luma)
        return RewardOutput(scores=luma, details={"binary": (luma > 0.5).float(), "tag": [m.get("tag", "-") for m in metadata],
                                                  "first_pixel": images[:, 0, 0, 0]})


@pytest.fixture(scope="module")
def server():
    srv = remote.make_server(Flaky(), port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_request_round_trip_is_exact_in_float32_and_rounds_to_1_255_in_uint8():
    images = torch.rand(3, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    prompts, metadata = ["a", "b \u00e9", "c"], [{"tag": "x"}, {}, {"include": [{"shape": "circle"}]}]
    got, p, m = remote.decode_request(remote.encode_request(images, prompts, metadata, "float32"))
    assert torch.equal(got, images) and p == prompts and m == metadata
    got, _, _ = remote.decode_request(remote.encode_request(images, prompts, metadata))
    assert torch.equal(got, torch.round(images * 255) / 255)  # uint8 on the wire
    view = images.transpose(2, 3)  # not contiguous (a decoded batch often is not)
    for dtype in remote.DTYPES:
        got = remote.decode_request(remote.encode_request(view, prompts, metadata, dtype))[0]
        assert torch.allclose(got, view, rtol=0, atol=0.5 / 255)
    video = torch.rand(2, 3, 3, 4, 4)
    assert torch.equal(remote.decode_request(remote.encode_request(video, ["a", "b"], [{}, {}], "float32"))[0], video)
    import numpy as np  # metadata a plugin built in Python: numpy values travel as JSON numbers

    assert remote.decode_request(remote.encode_request(images[:1], ["a"], [{"k": np.float32(0.5), "v": np.arange(2)}]))[2] == [
        {"k": 0.5, "v": [0, 1]}]
    with pytest.raises(ValueError, match="not a flowalign reward request"):
        remote.decode_request(b"\x00" * 16)


def test_remote_scores_equal_the_local_reward_on_the_same_pixels(server):
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts, metadata = ["p0", "p1", "p2", "p3"], [{"tag": "t0"}, {}, {"tag": "t2"}, {}]
    client = load_reward("remote", url=server)
    out = call_reward(client, images, prompts, metadata, on_error="raise", name="remote")
    on_wire = torch.round(images * 255) / 255
    local = Flaky()(on_wire, prompts, metadata)
    assert torch.allclose(out.scores, local.scores, rtol=0, atol=1e-7)
    assert torch.equal(out.details["binary"], local.details["binary"])  # numeric lists come back as tensors
    assert out.details["tag"] == ["t0", "-", "t2", "-"]
    assert torch.equal(out.details["first_pixel"], on_wire[:, 0, 0, 0])
    exact = load_reward("remote", url=server, dtype="float32")(images, prompts, metadata)
    assert torch.allclose(exact.scores, images.flatten(1).mean(1), rtol=0, atol=1e-7)


def test_nan_scores_come_back_as_nan_and_on_error_drop_drops_them(server):
    images = torch.full((2, 3, 4, 4), 0.75)
    out = call_reward(load_reward("remote", url=server), images, ["ok", "nan"], None, on_error="drop", name="remote")
    assert out.keep.tolist() == [True, False] and out.scores[0] == pytest.approx(0.75, abs=1 / 255)


def test_a_failing_server_side_reward_is_a_failure_of_its_batch_that_on_error_handles(server, caplog):
    client = load_reward("remote", url=server, retries=3, retry_wait=10.0)  # a retry would take 10 s
    with pytest.raises(remote.RemoteScoringError, match=r"RuntimeError: model crashed on boom"):
        client(torch.zeros(1, 3, 4, 4), ["boom"])
    assert "retrying" not in caplog.text
    with pytest.raises(RewardError, match="model crashed on boom"):  # on_error: raise names the reward and prompt
        call_reward(client, torch.zeros(2, 3, 4, 4), ["ok", "boom"], None, on_error="raise", name="remote")
    out = call_reward(client, torch.full((3, 3, 4, 4), 0.5), ["ok", "boom", "fine"], None, on_error="drop", name="remote")
    assert out.keep.tolist() == [True, False, True]  # each sample asked again alone: only the failing one dropped
    assert out.scores[0] == pytest.approx(0.5, abs=1 / 255) and out.scores[2] == pytest.approx(0.5, abs=1 / 255)


class Slow(Reward):
    """Counts its calls; sleeps ``delay`` s in each."""

    def __init__(self, delay=0.0):
        super().__init__()
        self.delay, self.calls = delay, []

    def score(self, images, prompts, metadata):
        import time

        self.calls.append(len(prompts))
        time.sleep(self.delay)
        return RewardOutput(scores=images.flatten(1).mean(1), details={"n": torch.arange(len(prompts)).float(), "p": list(prompts)})


def _serve(reward):
    srv = remote.make_server(reward, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def test_batches_go_in_chunks_of_max_batch_and_their_details_join():
    reward = Slow()
    srv, url = _serve(reward)
    try:
        out = load_reward("remote", url=url, max_batch=3)(torch.rand(7, 3, 4, 4), [f"p{i}" for i in range(7)])
    finally:
        srv.shutdown(), srv.server_close()
    assert reward.calls == [3, 3, 1]
    assert out.details["n"].tolist() == [0, 1, 2, 0, 1, 2, 0] and out.details["p"] == [f"p{i}" for i in range(7)]


def test_no_answer_within_the_timeout_raises_without_resending():
    reward = Slow(delay=1.5)
    srv, url = _serve(reward)
    try:
        with pytest.raises(RewardError, match=r"no answer within 0.5 s"):
            load_reward("remote", url=url, timeout=0.5, retries=3, retry_wait=0.0)(torch.rand(1, 3, 4, 4), ["x"])
    finally:
        srv.shutdown(), srv.server_close()
    assert reward.calls == [1]  # asked once: a resent request would queue behind the one still being scored


def test_oversized_requests_are_refused_before_sending(server, monkeypatch):
    monkeypatch.setattr(remote, "MAX_REQUEST_BYTES", 1000)
    with pytest.raises(RewardError, match="lower the remote reward's max_batch"):
        load_reward("remote", url=server)(torch.rand(2, 3, 16, 16), ["a", "b"])


def test_loopback_servers_are_reached_past_a_proxy_setting(server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a proxy nobody runs
    monkeypatch.setenv("no_proxy", "")
    out = load_reward("remote", url=server, retries=0)(torch.full((1, 3, 4, 4), 0.25), ["x"])
    assert out.scores.tolist() == pytest.approx([0.25], abs=1 / 255)


def test_an_unreachable_server_is_retried_then_named(caplog):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = load_reward("remote", url=f"http://127.0.0.1:{port}", retries=2, retry_wait=0.0, timeout=5)
    with pytest.raises(RewardError, match=rf"127.0.0.1:{port} unreachable after 3 attempts"):
        client(torch.zeros(1, 3, 4, 4), ["x"])
    assert caplog.text.count("retrying") == 2


def test_the_prompt_check_reaches_the_server_and_its_rewards_check_before_any_model():
    """An unreachable server was found only after the model loaded and a whole rollout ran (19 s on the toy), and a
    served verifier could not refuse prompts outside its grammar before sampling."""
    import socket

    from flowalign.rewards.base import check_reward_prompts

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = load_reward("remote", url=f"http://127.0.0.1:{port}", retries=5, retry_wait=30.0)
    with pytest.raises(ConfigError, match=rf"reward server http://127.0.0.1:{port} is unreachable .*flowalign reward serve NAME --port {port}"):
        check_reward_prompts(down, ["a red square"], name="remote")  # no retry, no 30 s wait
    srv = remote.make_server(load_reward("shapes"), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        served = load_reward("remote", url=f"http://127.0.0.1:{srv.server_address[1]}")
        check_reward_prompts(served, ["a red square", {"prompt": "a cat", "include": [{"shape": "circle", "count": 1}]}])
        with pytest.raises(ConfigError, match="reward 'remote' cannot score the prompts: reward server .*'a photo of a cat'"):
            check_reward_prompts(served, ["a red square", "a photo of a cat"], name="remote")
    finally:
        srv.shutdown()
        srv.server_close()


def test_health_bad_paths_and_malformed_bodies(server):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    assert json.loads(opener.open(server + "/health", timeout=10).read()) == {"ok": True}

    def post(body: bytes) -> tuple[int, str]:
        try:
            opener.open(urllib.request.Request(server + "/score", data=body, method="POST"), timeout=10)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())["error"]
        return 200, ""

    code, error = post(b"junk")
    assert code == 400 and "not a flowalign reward request" in error  # the client's fault: not a reward failure
    from safetensors.torch import save

    code, error = post(save({"images": torch.rand(1, 3, 4, 4, dtype=torch.float64)}, metadata={"prompts": '["a"]', "metadata": "[{}]"}))
    assert code == 400 and "uint8 or float32" in error
    code, error = post(save({"images": torch.rand(2, 3, 4, 4)}, metadata={"prompts": '["a"]', "metadata": "[{}]"}))
    assert code == 500 and "prompt" in error  # the reward's input check: 2 images, 1 prompt


class Gate(Reward):
    """Scores once ``release`` is set (``entered`` tells that a call is waiting); counts its calls."""

    def __init__(self):
        super().__init__()
        self.release, self.entered, self.calls = threading.Event(), threading.Event(), 0

    def score(self, images, prompts, metadata):
        self.entered.set()
        self.release.wait(30)
        self.calls += 1
        return RewardOutput(scores=images.flatten(1).mean(1))


def test_at_most_max_pending_request_bodies_are_held_and_the_rest_wait_unread(monkeypatch):
    decoded = []
    decode = remote.decode_request
    monkeypatch.setattr(remote, "decode_request", lambda body, **kw: decoded.append(len(body)) or decode(body, **kw))
    reward = Gate()
    srv = remote.make_server(reward, port=0, max_pending=2)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    client = load_reward("remote", url=url, timeout=60)
    results = [None] * 4

    def ask(i):
        results[i] = client(torch.full((1, 3, 4, 4), i / 4), [f"p{i}"]).scores.tolist()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for _ in range(100):  # the first two requests are read (one scoring, one queued behind it)
            if len(decoded) >= 2:
                break
            threading.Event().wait(0.05)
        threading.Event().wait(0.5)  # time for a third to be read, if the limit did not hold
        assert len(decoded) == 2 and reward.calls == 0
        reward.release.set()
        for t in threads:
            t.join(30)
    finally:
        reward.release.set()
        srv.shutdown(), srv.server_close()
    assert len(decoded) == 4 and reward.calls == 4
    assert results == [[pytest.approx(i / 4, abs=1 / 255)] for i in range(4)]
    with pytest.raises(ConfigError, match="max_pending"):
        remote.make_server(reward, port=0, max_pending=0)


def test_a_request_the_busy_server_does_not_take_in_time_is_not_resent():
    """Only slot busy: a body too big for the sockets' buffers cannot be sent, and the client's timeout ends it with
    its own message (it used to read as "no connection" and be sent again, queueing a second copy)."""
    reward = Gate()
    srv = remote.make_server(reward, port=0, max_pending=1)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    first = threading.Thread(target=lambda: load_reward("remote", url=url, timeout=60)(torch.rand(1, 3, 4, 4), ["a"]))
    try:
        first.start()
        assert reward.entered.wait(10)  # the first request holds the slot (its reward waits at the gate)
        big = torch.rand(1, 3, 2600, 2600, generator=torch.Generator().manual_seed(0))  # 20 MB of uint8
        with pytest.raises(RewardError, match=r"did not take the request within 1 s"):
            load_reward("remote", url=url, timeout=1, retries=2, retry_wait=0.0)(big, ["b"])
    finally:
        reward.release.set()
        first.join(30)
        srv.shutdown(), srv.server_close()
    assert reward.calls == 1


def test_a_client_that_trickles_its_body_loses_its_slot_after_the_read_timeout():
    import socket
    import time

    srv = remote.make_server(Slow(), port=0, max_pending=1, read_timeout=1.0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    sock = socket.create_connection(("127.0.0.1", port))
    stop = threading.Event()

    def trickle():  # one byte every 0.2 s of a 1000-byte body: never done, never silent for a whole socket timeout
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        while not stop.is_set():
            try:
                sock.sendall(b"x")
            except OSError:
                return
            time.sleep(0.2)

    thread = threading.Thread(target=trickle, daemon=True)
    try:
        thread.start()
        threading.Event().wait(0.3)  # it holds the only slot
        start = time.monotonic()
        out = load_reward("remote", url=f"http://127.0.0.1:{port}", timeout=10)(torch.full((1, 3, 4, 4), 0.5), ["x"])
        waited = time.monotonic() - start
        answer = sock.recv(4096).decode(errors="replace")
    finally:
        stop.set()
        sock.close()
        srv.shutdown(), srv.server_close()
    assert out.scores.tolist() == [pytest.approx(0.5, abs=1 / 255)]
    assert 0.5 < waited < 5 and " 408 " in answer.split("\r\n")[0]


def test_queued_requests_keep_their_uint8_pixels_until_scored():
    images = torch.rand(2, 3, 4, 4)
    raw, _, _ = remote.decode_request(remote.encode_request(images, ["a", "b"], [{}, {}]), as_float=False)
    assert raw.dtype == torch.uint8 and torch.equal(remote.pixels_as_float(raw), torch.round(images * 255) / 255)
    exact, _, _ = remote.decode_request(remote.encode_request(images, ["a", "b"], [{}, {}], "float32"), as_float=False)
    assert exact.dtype == torch.float32 and remote.pixels_as_float(exact) is exact


def test_a_server_on_an_ipv6_address_is_reached_by_the_client():
    try:
        srv = remote.make_server(Slow(), host="[::1]", port=0)  # brackets, as in a URL, are fine
    except OSError as exc:  # a machine without IPv6
        pytest.skip(f"no IPv6 loopback here: {exc}")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = remote.server_url(srv)
        assert url == f"http://[::1]:{srv.server_address[1]}"
        out = load_reward("remote", url=url)(torch.full((2, 3, 4, 4), 0.5), ["a", "b"])
    finally:
        srv.shutdown(), srv.server_close()
    assert out.scores.tolist() == [pytest.approx(0.5, abs=1 / 255)] * 2


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="http"):
        remote.RemoteReward(url="127.0.0.1:8765")
    with pytest.raises(ConfigError, match="dtype"):
        remote.RemoteReward(url="http://x", dtype="float16")
    with pytest.raises(ConfigError, match="retries"):
        remote.RemoteReward(url="http://x", retries=-1)
    with pytest.raises(ConfigError, match=r"url 'http://127.0.0.1:99999': Port out of range"):  # was "Connection refused"
        remote.RemoteReward(url="http://127.0.0.1:99999")
    with pytest.raises(ConfigError, match="names no host"):
        remote.RemoteReward(url="http://:8765")


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_refuses_a_port_out_of_range_before_loading_the_reward(port, capsys, monkeypatch):
    """``--port 99999`` was a raw OverflowError traceback from bind()."""
    from flowalign.train import cli

    monkeypatch.setattr("flowalign.rewards.load_reward", lambda *a, **k: pytest.fail("loaded the reward"))
    assert cli.main(["reward", "serve", "brightness", "--port", port]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--port must be in 0..65535 (0: a free one), got {port}" in err


def test_a_training_run_scores_its_rollouts_on_a_server(tmp_path):
    """``flowalign reward serve`` (a real process, on a free port it prints) serving a built-in reward, a tiny
    training run as its client."""
    import os
    import subprocess
    import sys

    from flowalign.train import cli

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "flowalign.train.cli", "reward", "serve", "brightness", "--port", "0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # "serving reward 'brightness' on http://127.0.0.1:PORT (...)"
        url = line.split(" on ", 1)[1].split()[0]
        assert json.loads(urllib.request.urlopen(url + "/health", timeout=30).read()) == {"ok": True}
        args = ["train", "--config", "train/configs/tiny_grpo.yaml"]
        for item in ["sampling.num_steps=2", "sampling.group_size=2", "train.prompts_per_iter=2", "train.iterations=1",
                     "train.micro_batch_size=4", "train.grad_accum=1",
                     f"rewards=[{{name: remote, kwargs: {{url: '{url}'}}}}]", "train.log_with=[csv]", "train.progress=false",
                     "train.eval_every=-1", f"train.output_dir={tmp_path / 'run'}"]:
            args += ["--set", item]
        assert cli.main(args) == 0
        rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
        header, row = rows[0].split(","), rows[1].split(",")
        assert 0.0 < float(row[header.index("reward/mean")]) < 1.0  # mean brightness, scored by the server
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_reward_list_and_serve_errors(capsys):
    from flowalign.train import cli

    assert cli.main(["reward", "list"]) == 0
    out = capsys.readouterr().out
    assert "Any importable 'package.module:Class'" in out  # a dotted-path reward is usable without being listed
    listed = {(line.split(None, 1) + [""])[0]: (line.split(None, 1) + [""])[1] for line in out.split("\n\n")[0].splitlines()}
    # (other tests register rewards without a docstring: their summary is empty)
    assert {"ocr", "remote", "shapes", "brightness"} <= set(listed)
    assert listed["remote"].startswith("A reward scored over HTTP") and listed["ocr"].startswith("Text rendering:")
    assert cli.main(["reward", "serve", "brightnes"]) == 2
    assert "Did you mean 'brightness'" in capsys.readouterr().err
    assert cli.main(["reward", "serve", "brightness", "--kwargs", "{bad"]) == 2
    assert "--kwargs is not JSON" in capsys.readouterr().err
    assert cli.main(["reward", "serve", "brightness", "--port", "0", "--max-pending", "0"]) == 2
    assert "max_pending must be an int of at least 1" in capsys.readouterr().err


def test_flowalign_eval_scores_with_a_served_reward(server, tmp_path, capsys):
    """``flowalign eval --reward remote --reward-kwargs '{"url": ...}'``: the same scores as the reward evaluated here,
    up to the wire's 1/255 rounding; a bad --reward-kwargs exits 2 before any model loads."""
    from flowalign.train import cli

    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    common = ["eval", "--model", "tiny-sd3", "--prompts", str(tmp_path / "p.txt"), "--steps", "2", "--guidance", "1.0",
              "--num-samples", "4", "--no-progress"]
    assert cli.main([*common, "--reward", "remote", "--reward-kwargs", json.dumps({"url": server}), "--out", str(tmp_path / "r")]) == 0
    assert cli.main([*common, "--reward", "tests.test_remote_reward:Flaky", "--out", str(tmp_path / "l")]) == 0
    served, local = (json.loads((tmp_path / d / "eval.json").read_text())["samples"]["score"] for d in ("r", "l"))
    assert served == pytest.approx(local, abs=1 / 255) and len(set(served)) > 1
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["settings"]["reward_kwargs"] == {"url": server}
    capsys.readouterr()
    assert cli.main([*common, "--reward", "remote", "--reward-kwargs", "[1]"]) == 2
    assert "--reward-kwargs must be a JSON object" in capsys.readouterr().err
    # --compare refuses an evaluation scored with other reward settings (another server, another score mode)
    assert cli.main([*common, "--reward", "remote", "--reward-kwargs", json.dumps({"url": server, "dtype": "float32"}),
                     "--compare", str(tmp_path / "r")]) == 2
    assert "reward_kwargs" in capsys.readouterr().err


def test_the_served_rewards_version_reaches_the_client(tmp_path):
    """The remote reward recorded no Reward.version, so an evaluation or a checkpoint scored by a served `shapes` could
    not tell its scoring rules from another version's (eval --compare, resume warnings)."""
    from flowalign.rewards.base import check_reward_prompts
    from flowalign.rewards.shapes import ShapesReward

    srv = remote.make_server(load_reward("shapes"), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        served = load_reward("remote", url=url)
        assert served.version == ShapesReward.version == "2"  # asked at the first read: before anything is scored
        check_reward_prompts(served, ["a red square"], name="remote")
        assert served.version == "2"
        other = load_reward("remote", url=url)
        call_reward(other, torch.zeros(1, 3, 32, 32), ["a red square"], [{}])  # a score answer carries it too
        assert other._version_known and other.version == "2"
        with urllib.request.urlopen(url + "/health") as answer:
            assert json.loads(answer.read()) == {"ok": True, "version": "2"}
    finally:
        srv.shutdown()
        srv.server_close()
    # a served reward without a version, and a server of before this change, leave it None
    unversioned = remote.make_server(Flaky(), port=0)
    threading.Thread(target=unversioned.serve_forever, daemon=True).start()
    try:
        client = load_reward("remote", url=f"http://127.0.0.1:{unversioned.server_address[1]}")
        check_reward_prompts(client, ["a"], name="remote")
        assert client.version is None
        client._note_version(b'{"scores": [0.5]}')
        assert client.version is None
    finally:
        unversioned.shutdown()
        unversioned.server_close()
    # a server that is down now: None, asked again at the next read
    down = load_reward("remote", url=url, timeout=2.0)
    assert down.version is None and not down._version_known


def test_a_resumed_eval_journal_keeps_the_served_rewards_version_under_drop(tmp_path):
    """The journal key read the remote reward's version before anything was scored: None under on_error drop (no
    prompt check), the version after a raise run's check, so a drop rerun of a raise run's journal was refused."""
    from flowalign.train import cli

    class Versioned(Flaky):
        version = "7"

    srv = remote.make_server(Versioned(), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        (tmp_path / "p.txt").write_text("a red circle\nboom square\n")
        common = ["eval", "--model", "tiny-sd3", "--prompts", str(tmp_path / "p.txt"), "--steps", "2", "--guidance", "1.0",
                  "--num-samples", "2", "--batch-size", "1", "--no-progress", "--reward", "remote",
                  "--reward-kwargs", json.dumps({"url": url, "retries": 0}), "--out", str(tmp_path / "e")]
        assert cli.main([*common, "--on-error", "raise"]) != 0  # the "boom" prompt fails its batch, after the first is journaled
        assert list((tmp_path / "e").rglob("*.safetensors"))
        assert cli.main([*common, "--on-error", "drop"]) == 0  # resumes that journal: the same reward version
        assert json.loads((tmp_path / "e" / "eval.json").read_text())["settings"]["reward_version"] == "7"
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_served_reward_is_moved_to_the_servers_device_and_gets_its_images_there(capsys):
    """`reward serve` never called the reward's to(device): a served VLM or detector scored on the CPU."""
    class Placed(Reward):
        def __init__(self):
            super().__init__()
            self.moves, self.seen = [], []

        def to(self, device):
            self.moves.append(str(device))
            return self

        def score(self, images, prompts, metadata):
            self.seen.append(str(images.device))
            return RewardOutput(scores=images.flatten(1).mean(1))

    reward = Placed()
    srv = remote.make_server(reward, port=0, device="cpu")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        load_reward("remote", url=f"http://127.0.0.1:{srv.server_address[1]}")(torch.rand(2, 3, 4, 4), ["a", "b"])
    finally:
        srv.shutdown(), srv.server_close()
    assert reward.moves == ["cpu"] and reward.seen == ["cpu"]
    if not torch.cuda.is_available():  # a GPU asked of a machine without one: one line, before the model loads
        from flowalign.train import cli

        assert cli.main(["reward", "serve", "brightness", "--port", "0", "--device", "cuda"]) == 2
        assert "--device" in capsys.readouterr().err
