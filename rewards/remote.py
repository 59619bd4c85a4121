"""Rewards served over HTTP: score with a reward model that lives in another environment or machine.

Reward models often need libraries that cannot share an environment with the trainer (GenEval's
mmdetection, a VLM judge behind vLLM), which is why Flow-GRPO and DDPO call them as servers. Here
both ends are flowalign:

    # in the reward's environment (any reward load_reward accepts, with its kwargs as JSON):
    flowalign reward serve shapes --kwargs '{"score": "partial"}' --port 8765
    # (python -m flowalign.rewards.remote shapes ... is the same command)

    # in the training config:
    rewards: [{name: remote, kwargs: {url: "http://127.0.0.1:8765"}}]

The wire format is safe to parse (no pickle). A request is one safetensors file: tensor ``images``
(``[B, 3, H, W]`` or ``[B, T, 3, H, W]``, uint8 by default, or float32 in [0, 1] with
``dtype: float32``), and in its string metadata ``prompts`` and ``metadata`` as JSON. The answer is
JSON ``{"scores": [B numbers or null], "details": {...}, "version": "..."}`` (the served reward's ``Reward.version``,
absent when it has none; the client keeps it as its own ``version``), or ``{"error": "..."}`` with HTTP 500 (the
reward failed) or 400 / 411 / 413 (a malformed, unsized or oversized request).
uint8 is what reward models read anyway (and 4x smaller); a score computed from uint8 images equals
the local reward's score on the same images rounded to 1/255.

Failures. A reward that fails on the server (it raised, or returned a malformed result: HTTP 500), or
an answer that is not a list of scores, is a failure of that batch, which the run's ``on_error``
handles like a local reward's (``drop``: each sample is asked again alone and the failing ones are
dropped). A server that cannot be reached (refused or reset connections, a dropped answer) is
tried ``retries`` more times, ``retry_wait`` seconds apart, then raises ``RewardError``, which
stops the run whatever ``on_error`` says: dropping every sample would train on nothing. No answer
within ``timeout`` seconds raises at once (the server may still be working on it: a resent
request would queue behind it). Batches go in requests of at most ``max_batch`` samples; a
request over 1 GiB is refused before it is sent. Scores of ``null`` (the server's NaN) are NaN
here, so ``on_error: drop`` drops those samples. Details: a list of ``B`` numbers comes back as a
float32 tensor (``binary``, ``partial`` as evaluation reads them); anything else as JSON gives it.
The client ignores ``http_proxy`` for loopback addresses.
"""
from __future__ import annotations

import http.client
import io
import ipaddress
import json
import logging
import math
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from flowalign.errors import ConfigError, RewardError
from flowalign.rewards.base import Reward, RewardOutput, join_details, register_reward

logger = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 1 << 30  # the server refuses larger bodies (1 GiB: 128 videos of 81 frames at 480 x 832 in uint8 do not fit)
DTYPES = ("uint8", "float32")
CHECK_TIMEOUT = 10.0  # seconds the prompt check before a run waits for the server


def encode_request(images: Tensor, prompts: list[str], metadata: list[dict[str, Any]], dtype: str = "uint8") -> bytes:
    """The request body: ``images`` in [0, 1] as ``dtype`` (uint8: ``round(255 x)``) in one safetensors file,
    ``prompts`` and ``metadata`` as JSON in its header."""
    if dtype not in DTYPES:
        raise ConfigError(f"remote reward dtype must be one of {list(DTYPES)}, got {dtype!r}")
    pixels = images.detach().float().clamp(0, 1).cpu()
    pixels = ((pixels * 255).round().to(torch.uint8) if dtype == "uint8" else pixels).contiguous()  # views (decoded latents) too
    return save_safetensors({"images": pixels}, metadata={"prompts": json.dumps(prompts),
                                                           "metadata": json.dumps(metadata, default=_jsonable)})


def decode_request(body: bytes, as_float: bool = True) -> tuple[Tensor, list[str], list[dict[str, Any]]]:
    """``(images, prompts, metadata)`` from :func:`encode_request`'s bytes; ValueError if malformed. The images
    are float32 in [0, 1], or, with ``as_float=False``, as they travelled (uint8 stays uint8: 4x smaller while a
    request waits; :func:`pixels_as_float` converts them)."""
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
    if images.dtype not in (torch.uint8, torch.float32):
        raise ValueError(f"images must be uint8 or float32, got {images.dtype}")
    return (pixels_as_float(images) if as_float else images), prompts, metadata


def pixels_as_float(images: Tensor) -> Tensor:
    """float32 pixels in [0, 1] from a request's uint8 (``x / 255``) or float32 images."""
    return images.float() / 255 if images.dtype == torch.uint8 else images


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


def _is_numbers(value: Any) -> bool:
    """A JSON list of numbers and nulls (the wire's NaN)."""
    return isinstance(value, list) and all(isinstance(v, (int, float)) or v is None for v in value)


def _floats(values: list) -> Tensor:
    """:func:`_is_numbers`' list as float32, null as NaN."""
    return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)


def _details_from_json(details: dict[str, Any], batch: int) -> dict[str, Any]:
    """Per-sample numeric lists back as float32 tensors (evaluation reads ``binary`` / ``partial`` as tensors)."""
    return {key: _floats(value) if _is_numbers(value) and len(value) == batch else value for key, value in details.items()}


class RemoteScoringError(RuntimeError):
    """The server answered, but with a failure of this batch (HTTP 500: its reward raised) or no list of scores:
    ``call_reward``'s ``on_error`` handles it like a local reward's exception."""


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error_of(answer: urllib.error.HTTPError) -> str:
    """The ``"error"`` of a server's JSON error answer, or "" when it gave none."""
    try:
        return str(json.loads(answer.read()).get("error", ""))
    except Exception:  # noqa: BLE001 - not JSON, not a mapping, an unreadable body
        return ""


@register_reward("remote")
class RemoteReward(Reward):
    """A reward scored over HTTP by ``flowalign reward serve NAME`` in another environment or machine.

    The module docstring gives the wire format and the failure rules.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8765``.
        timeout: seconds to wait for one answer (a reward model on a busy GPU can be slow, and requests of
            several training processes queue on the server).
        retries: further attempts after a refused, reset or dropped connection (not after the server's own
            error answer, which would fail again, nor after ``timeout``).
        retry_wait: seconds between attempts.
        dtype: ``uint8`` (default) or ``float32`` images on the wire.
        max_batch: samples per request (a batch is sent in chunks).
        device: where the score tensors go.
    """

    differentiable = False

    def __init__(self, url: str, timeout: float = 600.0, retries: int = 2, retry_wait: float = 5.0, dtype: str = "uint8",
                 max_batch: int = 32, device: Optional[torch.device | str] = None):
        super().__init__(device)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"remote reward url must start with http:// or https://, got {url!r}")
        parts = urllib.parse.urlsplit(url)
        try:
            _ = parts.port  # ValueError: "Port out of range 0-65535", "Port could not be cast to integer value"
        except ValueError as exc:
            raise ConfigError(f"remote reward url {url!r}: {exc}") from None
        if not parts.hostname:
            raise ConfigError(f"remote reward url {url!r} names no host")
        if dtype not in DTYPES:
            raise ConfigError(f"remote reward dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if not timeout > 0 or (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0) or retry_wait < 0:
            raise ConfigError(f"remote reward needs timeout > 0, retries >= 0 and retry_wait >= 0, got {timeout}, {retries!r}, {retry_wait}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"remote reward max_batch must be a positive int, got {max_batch!r}")
        self.url, self.timeout, self.retries, self.retry_wait, self.dtype = url.rstrip("/"), float(timeout), retries, float(retry_wait), dtype
        self.max_batch = max_batch
        self._version: Optional[str] = None  # the served reward's Reward.version (see the version property)
        self._version_known = False
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(self.url) else []
        self._opener = urllib.request.build_opener(*handlers)

    def _post(self, body: bytes) -> Any:
        if len(body) > MAX_REQUEST_BYTES:
            raise RewardError(f"a request of {len(body) / 2**20:.0f} MiB to {self.url} is over the server's limit of "
                              f"{MAX_REQUEST_BYTES / 2**20:.0f} MiB: lower the remote reward's max_batch (now {self.max_batch})")
        for attempt in range(self.retries + 1):
            sent = io.BytesIO(body)  # how far it was read tells a refused connection from a request the server holds
            request = urllib.request.Request(self.url + "/score", data=sent, method="POST",
                                             headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(body))})
            try:
                with self._opener.open(request, timeout=self.timeout) as answer:
                    raw = answer.read()
                break
            except urllib.error.HTTPError as exc:  # the server answered
                message = _error_of(exc)
                if exc.code == 500:  # its reward failed on this batch: on_error decides
                    raise RemoteScoringError(f"reward server {self.url}: {message or exc.reason}") from None
                raise RewardError(f"reward server {self.url} answered HTTP {exc.code}: {message or exc.reason}") from None
            except TimeoutError as exc:  # (socket.timeout) the server may still be working on it: do not resend
                raise RewardError(f"reward server {self.url} gave no answer within {self.timeout:g} s (the remote reward's timeout)") from exc
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, TimeoutError) and sent.tell() > 0:  # connected, but the body was not taken in time
                    raise RewardError(f"reward server {self.url} did not take the request within {self.timeout:g} s (the remote "
                                      "reward's timeout; a busy server reads at most its --max-pending requests at once)") from None
                if isinstance(reason, TimeoutError):  # connecting timed out: nobody took the request
                    reason = f"no connection within {self.timeout:g} s"
                if attempt == self.retries:
                    raise RewardError(f"reward server {self.url} unreachable after {self.retries + 1} attempts: {reason}") from None
                logger.warning("reward server %s: %s; retrying in %.0f s", self.url, reason, self.retry_wait)
                time.sleep(self.retry_wait)
        try:
            return json.loads(raw)
        except ValueError:
            raise RemoteScoringError(f"reward server {self.url} answered something that is not JSON: {raw[:200]!r}") from None

    def check_prompts(self, prompts: list[str], metadata: list[dict[str, Any]]) -> None:
        """Before any model loads: the server answers (``POST /check``, at most ``CHECK_TIMEOUT`` s, no retry) and its
        reward's own ``check_prompts`` accepts the prompts. ConfigError (one line) otherwise; a server without
        ``/check`` (an older flowalign) is asked ``GET /health`` instead."""
        body = json.dumps({"prompts": list(prompts), "metadata": [dict(m) for m in metadata]}, default=str).encode()
        request = urllib.request.Request(self.url + "/check", data=body, method="POST", headers={"Content-Type": "application/json"})
        timeout = min(self.timeout, CHECK_TIMEOUT)
        try:
            with self._opener.open(request, timeout=timeout) as answer:
                self._note_version(answer.read())
        except urllib.error.HTTPError as exc:
            message = _error_of(exc)
            if exc.code == 422:
                raise ConfigError(f"reward server {self.url}: {message}") from None
            if exc.code != 404:
                raise ConfigError(f"reward server {self.url} answered HTTP {exc.code} to its prompt check: {message or exc.reason}") from None
            try:  # an older server: it answers, which is what can be checked
                with self._opener.open(self.url + "/health", timeout=timeout) as answer:
                    self._note_version(answer.read())
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError) as exc:
                raise ConfigError(f"reward server {self.url} does not answer GET /health: {getattr(exc, 'reason', exc)}") from None
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"reward server {self.url} is unreachable ({reason}): start it first, e.g. `flowalign reward serve "
                              f"NAME --port {urllib.parse.urlsplit(self.url).port or 80}`, or fix the remote reward's url") from None

    @property
    def version(self) -> Optional[str]:
        """The served reward's ``Reward.version``: from the server's latest answer, else asked once (``GET /health``)
        the first time it is read, so that a resume or an evaluation journal has it before anything is scored. None
        for a server of before versions were sent, a reward without one, or a server that does not answer now."""
        if not self._version_known:
            try:
                with self._opener.open(self.url + "/health", timeout=min(self.timeout, CHECK_TIMEOUT)) as answer:
                    self._note_version(answer.read())
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError, ValueError):
                pass  # asked again next time; scoring will say what is wrong with the server
        return self._version

    def _note_version(self, answer: Any) -> None:
        """Keep the served reward's ``version`` from a server's JSON answer (bytes or parsed); a server of before it sent
        one (or a reward without one) leaves it None."""
        if isinstance(answer, (bytes, bytearray)):
            try:
                answer = json.loads(answer)
            except ValueError:
                return
        if not isinstance(answer, dict):
            return
        version = answer.get("version")
        if version is None or isinstance(version, str):
            self._version, self._version_known = version, True

    def _score_chunk(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> tuple[Tensor, dict]:
        answer = self._post(encode_request(images, prompts, metadata, self.dtype))
        self._note_version(answer)
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not _is_numbers(scores):
            raise RemoteScoringError(f"reward server {self.url} answered without a list of scores: {str(answer)[:200]}")
        if len(scores) != len(prompts):
            raise RemoteScoringError(f"reward server {self.url} answered {len(scores)} scores for {len(prompts)} samples")
        details = answer.get("details") or {}
        return _floats(scores), _details_from_json(details if isinstance(details, dict) else {}, len(prompts))

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        parts = [self._score_chunk(images[i:i + self.max_batch], prompts[i:i + self.max_batch], metadata[i:i + self.max_batch])
                 for i in range(0, len(prompts), self.max_batch)]
        scores = torch.cat([values for values, _ in parts]).to(self.device) if parts else torch.zeros(0, device=self.device)
        sizes = [len(values) for values, _ in parts]
        return RewardOutput(scores=scores, details=join_details([d for _, d in parts], sizes) if parts else {})


def check_max_pending(max_pending: int) -> None:
    """Refuse a ``max_pending`` (:func:`make_server`) that is not a positive int."""
    if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
        raise ConfigError(f"max_pending must be an int of at least 1, got {max_pending!r}")


def make_server(reward, host: str = "127.0.0.1", port: int = 8765, max_pending: int = 4, read_timeout: float = 300.0,
                device: Optional[str] = None) -> ThreadingHTTPServer:
    """An HTTP server scoring ``POST /score`` requests with ``reward`` (``serve_forever()`` runs it;
    port 0 picks a free one: ``server.server_address``). ``GET /health`` answers ``{"ok": true}``; ``POST /check``
    runs the reward's ``check_prompts`` (what :meth:`RemoteReward.check_prompts` asks before a run loads its model). Requests
    (one per training process and batch) are scored one at a time: a reward model need not be thread-safe.
    At most ``max_pending`` requests are held at once (being read, queued or scored; a queued one keeps its
    pixels as they travelled, uint8 by default, until its turn), so the server holds about ``max_pending`` times
    a request's size (at most 1 GiB each) however many processes send; a further request waits, unread, for a
    slot (its client's ``timeout`` counts the wait). A client gets ``read_timeout`` seconds in all to send its
    body once it holds a slot, so a stalled or trickling one cannot keep it (it gets HTTP 408). ``host`` may be
    an IPv6 address (``::1``, ``::``, with or without brackets). ``device``: where the reward scores (its ``to(device)``,
    as the trainer moves a reward, and the images sent there); None: where it was built."""
    check_max_pending(max_pending)
    if device is not None and callable(getattr(reward, "to", None)):
        reward.to(torch.device(device))
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    lock = threading.Lock()
    pending = threading.BoundedSemaphore(max_pending)
    version = getattr(reward, "version", None)  # the scoring rules' version (Reward.version), sent with every answer
    versioned = {} if version is None else {"version": str(version)}  # no key for a reward without one (as before)

    class Handler(BaseHTTPRequestHandler):
        timeout = read_timeout  # seconds a client may take to send its request (a stalled one frees its thread and its slot)

        def _answer(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout) before the answer
                logger.warning("client %s left before its HTTP %d answer", self.address_string(), code)

        def _read_body(self, length: int) -> Optional[bytes]:
            """The body, or None when the client takes over ``timeout`` seconds in all or disconnects."""
            deadline, parts, got = time.monotonic() + self.timeout, [], 0
            while got < length:
                if time.monotonic() > deadline:
                    return None
                try:
                    part = self.rfile.read1(min(length - got, 1 << 20))
                except (TimeoutError, ConnectionError):
                    return None
                if not part:
                    return None
                parts.append(part)
                got += len(part)
            return b"".join(parts)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._answer(200, {"ok": True, **versioned}) if self.path == "/health" else self._answer(404, {"error": f"no {self.path}"})

        def _check(self, body: bytes) -> None:
            """``POST /check``: the served reward's ``check_prompts`` on JSON ``{"prompts", "metadata"}`` (422 with its
            one-line refusal; 200 when it accepts them or has no check)."""
            from .base import check_reward_prompts

            try:
                request = json.loads(body)
                prompts, metadata = list(request["prompts"]), list(request.get("metadata") or [{}] * len(request["prompts"]))
                records = [{**dict(m), "prompt": p} for p, m in zip(prompts, metadata)]
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                return self._answer(400, {"error": f"a prompt check is JSON {{'prompts': [...], 'metadata': [...]}}: {exc}"})
            try:
                with lock:
                    check_reward_prompts(reward, records, name=getattr(reward, "name", None))
            except ConfigError as exc:
                return self._answer(422, {"error": str(exc)})
            self._answer(200, {"ok": True, **versioned})

        def do_POST(self):  # noqa: N802
            if self.path not in ("/score", "/check"):
                return self._answer(404, {"error": f"no {self.path}"})
            try:
                length = int(self.headers.get("Content-Length") or -1)
            except ValueError:
                return self._answer(400, {"error": "Content-Length is not a number"})
            if length < 0:
                return self._answer(411, {"error": "a request needs a Content-Length"})
            if length > MAX_REQUEST_BYTES:
                return self._answer(413, {"error": f"request of {length} bytes (at most {MAX_REQUEST_BYTES})"})
            with pending:  # the body is read only once a slot is free
                body = self._read_body(length)
                if body is None:
                    self.close_connection = True
                    return self._answer(408, {"error": f"the request's {length} bytes did not arrive within {self.timeout} s"})
                if self.path == "/check":
                    return self._check(body)
                try:
                    images, prompts, metadata = decode_request(body, as_float=False)
                except ValueError as exc:  # the client's fault, not the reward's
                    return self._answer(400, {"error": str(exc)})
                del body
                try:
                    with lock:
                        pixels = pixels_as_float(images)
                        out = reward(pixels if device is None else pixels.to(device), prompts, metadata)
                    answer = {"scores": _jsonable(out.scores.float()), "details": _jsonable(dict(out.details or {})), **versioned}
                except Exception as exc:  # noqa: BLE001 (the client hands it to the run's on_error)
                    logger.exception("scoring failed")
                    return self._answer(500, {"error": f"{type(exc).__name__}: {exc}"})
                del images
            self._answer(200, answer)

        def log_message(self, fmt, *args):
            logger.debug("%s " + fmt, self.address_string(), *args)

    server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
    return server_class((host, port), Handler)


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def serve(server: ThreadingHTTPServer) -> None:
    """Run ``server`` (:func:`make_server`) until Ctrl-C, then close it."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def server_url(server: ThreadingHTTPServer) -> str:
    """The URL a client uses: the bound address, or this machine's name when it listens on every interface."""
    host, port = server.server_address[:2]
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


if __name__ == "__main__":  # python -m flowalign.rewards.remote NAME [...]: the same as flowalign reward serve NAME [...]
    import sys

    from flowalign.train.cli import main

    sys.exit(main(["reward", "serve", *sys.argv[1:]]))
