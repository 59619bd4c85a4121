"""Rewards served over HTTP: score with a reward model that lives in another environment or machine.

Reward models often need libraries that cannot share an environment with the trainer (GenEval's
mmdetection, a VLM judge behind vLLM), which is why Flow-GRPO and DDPO call them as servers. Here
both ends are flowalign:

    # in the reward's environment (any reward load_reward accepts, with its kwargs as JSON):
    flowalign reward serve shapes --kwargs '{"score": "partial"}' --port 8765

    # in the training config:
    rewards: [{name: remote, kwargs: {url: "http://127.0.0.1:8765"}}]

The wire format is safe to parse (no pickle). A request is one safetensors file: tensor ``images``
(``[B, 3, H, W]`` or ``[B, T, 3, H, W]``, uint8 by default, or float32 in [0, 1] with
``dtype: float32``), and in its string metadata ``prompts`` and ``metadata`` as JSON. The answer is
JSON ``{"scores": [B numbers or null], "details": {...}}``, or ``{"error": "..."}`` with HTTP 500.
uint8 is what reward models read anyway (and 4x smaller); a score computed from uint8 images equals
the local reward's score on the same images rounded to 1/255.

A reward that fails on the server (it raised, or returned a malformed result) comes back as the
server's message, a ``RewardError`` that the run's ``on_error`` handles; an unreachable server is
retried ``retries`` times, ``retry_wait`` seconds apart, before it raises. Scores of ``null`` (the
server's NaN) are NaN here, so ``on_error: drop`` drops those samples.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from flowalign.errors import ConfigError, RewardError
from flowalign.rewards.base import Reward, RewardOutput, load_reward, register_reward

logger = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 1 << 30  # the server refuses larger bodies (1 GiB: 128 videos of 81 frames at 480 x 832 in uint8 do not fit)
DTYPES = ("uint8", "float32")


def encode_request(images: Tensor, prompts: list[str], metadata: list[dict[str, Any]], dtype: str = "uint8") -> bytes:
    """The request body: ``images`` in [0, 1] as ``dtype`` (uint8: ``round(255 x)``) in one safetensors file,
    ``prompts`` and ``metadata`` as JSON in its header."""
    if dtype not in DTYPES:
        raise ConfigError(f"remote reward dtype must be one of {list(DTYPES)}, got {dtype!r}")
    pixels = images.detach().float().clamp(0, 1).cpu()
    pixels = ((pixels * 255).round().to(torch.uint8) if dtype == "uint8" else pixels).contiguous()  # views (decoded latents) too
    return save_safetensors({"images": pixels}, metadata={"prompts": json.dumps(prompts), "metadata": json.dumps(metadata)})


def decode_request(body: bytes) -> tuple[Tensor, list[str], list[dict[str, Any]]]:
    """``(images float32 in [0, 1], prompts, metadata)`` from :func:`encode_request`'s bytes; ValueError if malformed."""
    try:
        tensors = load_safetensors(body)
        header_len = int.from_bytes(body[:8], "little")
        header = json.loads(body[8: 8 + header_len]).get("__metadata__", {})
        prompts, metadata = json.loads(header["prompts"]), json.loads(header["metadata"])
        images = tensors["images"]
    except Exception as exc:  # noqa: BLE001 (any parse failure is the client's malformed request)
        raise ValueError(f"not a flowalign reward request: {exc}") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings")
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise ValueError("metadata must be a list of objects")
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return images, prompts, metadata


def _jsonable(value: Any) -> Any:
    """Tensors and numpy values as (nested) lists and numbers; NaN / inf as null; other objects as strings."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().tolist()
    elif hasattr(value, "tolist"):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def score_request(reward, body: bytes) -> dict[str, Any]:
    """What the server answers to one request body: ``{"scores", "details"}`` of ``reward`` on its images."""
    images, prompts, metadata = decode_request(body)
    out = reward(images, prompts, metadata)
    return {"scores": _jsonable(out.scores.float()), "details": _jsonable(dict(out.details or {}))}


def _details_from_json(details: dict[str, Any], batch: int) -> dict[str, Any]:
    """Per-sample numeric lists back as float32 tensors (evaluation reads ``binary`` / ``partial`` as tensors)."""
    out = {}
    for key, value in details.items():
        numeric = isinstance(value, list) and len(value) == batch and all(isinstance(v, (int, float)) or v is None for v in value)
        out[key] = torch.tensor([math.nan if v is None else float(v) for v in value], dtype=torch.float32) if numeric else value
    return out


@register_reward("remote")
class RemoteReward(Reward):
    """A reward scored over HTTP by ``flowalign reward serve NAME`` in another environment or machine.

    The module docstring gives the wire format and the failure rules.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8765``.
        timeout: seconds to wait for one answer (a reward model on a busy GPU can be slow).
        retries: further attempts after a connection failure or timeout (not after the server's
            own error answer, which would fail again).
        retry_wait: seconds between attempts.
        dtype: ``uint8`` (default) or ``float32`` images on the wire.
        device: where the score tensors go.
    """

    differentiable = False

    def __init__(self, url: str, timeout: float = 600.0, retries: int = 2, retry_wait: float = 5.0, dtype: str = "uint8",
                 device: Optional[torch.device | str] = None):
        super().__init__(device)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"remote reward url must start with http:// or https://, got {url!r}")
        if dtype not in DTYPES:
            raise ConfigError(f"remote reward dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if not timeout > 0 or (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0) or retry_wait < 0:
            raise ConfigError(f"remote reward needs timeout > 0, retries >= 0 and retry_wait >= 0, got {timeout}, {retries!r}, {retry_wait}")
        self.url, self.timeout, self.retries, self.retry_wait, self.dtype = url.rstrip("/"), float(timeout), retries, float(retry_wait), dtype

    def _post(self, body: bytes) -> dict[str, Any]:
        request = urllib.request.Request(self.url + "/score", data=body, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    return json.loads(answer.read())
            except urllib.error.HTTPError as exc:  # the server answered: its reward failed, do not retry
                try:
                    message = json.loads(exc.read()).get("error", "")
                except Exception:  # noqa: BLE001
                    message = ""
                raise RewardError(f"reward server {self.url} answered HTTP {exc.code}: {message or exc.reason}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if attempt == self.retries:
                    raise RewardError(f"reward server {self.url} unreachable after {self.retries + 1} attempts: "
                                      f"{getattr(exc, 'reason', exc)}") from None
                logger.warning("reward server %s: %s; retrying in %.0f s", self.url, getattr(exc, "reason", exc), self.retry_wait)
                time.sleep(self.retry_wait)
        raise AssertionError("unreachable")

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        answer = self._post(encode_request(images, prompts, metadata, self.dtype))
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or not all(isinstance(s, (int, float)) or s is None for s in scores):
            raise RewardError(f"reward server {self.url} answered without a list of scores: {str(answer)[:200]}")
        values = torch.tensor([math.nan if s is None else float(s) for s in scores], dtype=torch.float32, device=self.device)
        details = answer.get("details") or {}
        return RewardOutput(scores=values, details=_details_from_json(details if isinstance(details, dict) else {}, len(prompts)))


def make_server(reward, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """An HTTP server scoring ``POST /score`` requests with ``reward`` (``serve_forever()`` runs it;
    port 0 picks a free one: ``server.server_address``). ``GET /health`` answers ``{"ok": true}``. Requests
    (one per training process and batch) are read concurrently and scored one at a time: a reward model
    need not be thread-safe."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._answer(200, {"ok": True}) if self.path == "/health" else self._answer(404, {"error": f"no {self.path}"})

        def do_POST(self):  # noqa: N802
            if self.path != "/score":
                return self._answer(404, {"error": f"no {self.path}"})
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_REQUEST_BYTES:
                return self._answer(413, {"error": f"request of {length} bytes (at most {MAX_REQUEST_BYTES})"})
            body = self.rfile.read(length)
            try:
                with lock:
                    payload = score_request(reward, body)
                self._answer(200, payload)
            except Exception as exc:  # noqa: BLE001 (the client raises it as a RewardError)
                logger.exception("scoring failed")
                self._answer(500, {"error": f"{type(exc).__name__}: {exc}"})

        def log_message(self, fmt, *args):
            logger.debug("%s " + fmt, self.address_string(), *args)

    return ThreadingHTTPServer((host, port), Handler)


def serve(spec: str, kwargs: Optional[dict] = None, host: str = "127.0.0.1", port: int = 8765, announce=print) -> None:
    """Load the reward ``spec`` (with ``kwargs``) and serve it (:func:`make_server`) until Ctrl-C; ``announce`` gets one
    line naming the URL (port 0: the port taken) and the recipe entry that uses it. ``flowalign reward serve`` runs this."""
    server = make_server(load_reward(spec, **(kwargs or {})), host, port)
    host, port = server.server_address[:2]
    announce(f"serving reward {spec!r} on http://{host}:{port} (rewards: [{{name: remote, kwargs: {{url: \"http://{host}:{port}\"}}}}])")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
