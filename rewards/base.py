"""The Reward protocol, the registry and the one place where reward calls are checked (DESIGN.md §3).

A reward scores decoded samples for their prompts::

    out = reward(images, prompts, metadata)   # images float [B,3,H,W] (videos [B,F,3,H,W]) in [0,1]
    out.scores                                # Tensor[B], higher is better
    out.details                               # dict of extra per-sample tensors / lists

Rewards are found by ``load_reward(spec)`` from

1. a name registered with ``@register_reward("name")``,
2. a built-in name imported on first use (``"shapes"`` -> ``flowalign.rewards.shapes:ShapesReward``),
3. an entry point in the group ``flowalign.rewards`` of an installed distribution,
4. a dotted path ``"package.module:Class"`` (or ``"package.module.Class"``).

The object found may be a ``Reward`` subclass (instantiated with the keyword arguments), a
``Reward`` instance, a factory returning one, or a plain scoring function
``f(images, prompts, metadata) -> Tensor | RewardOutput`` (wrapped in ``FunctionReward``).

The trainer calls rewards through ``call_reward``, which checks inputs and outputs and applies the
failure policy: ``"raise"`` (default) turns an exception, a malformed output or a non-finite
score into a ``RewardError`` naming the reward and the prompt; ``"drop"`` marks those samples in a
``keep`` mask, sets their score to NaN and logs a warning with the count.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import copy
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from flowalign.errors import ConfigError, FlowalignError, RewardError
from flowalign.plugins import entry_points, find_plugin, import_object

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "flowalign.rewards"
ON_ERROR_POLICIES = ("raise", "drop")

# Built-in names resolved on first use, so importing flowalign.rewards stays cheap and a reward
# family whose module is missing or heavy does not break the others.
LAZY_REWARDS: dict[str, str] = {
    "jpeg_compressibility": "flowalign.rewards.builtin:JpegCompressibility",
    "jpeg_incompressibility": "flowalign.rewards.builtin:JpegIncompressibility",
    "brightness": "flowalign.rewards.builtin:Brightness",
    "color_fraction": "flowalign.rewards.builtin:ColorFraction",
    "shapes": "flowalign.rewards.shapes:ShapesReward",
    "ocr": "flowalign.rewards.ocr:OCRReward",
    "remote": "flowalign.rewards.remote:RemoteReward",
    "image_stats_quality": "flowalign.corrected:ImageStatsQuality",
}


@dataclass
class RewardOutput:
    """Scores ``[B]`` (float32, higher is better) and per-sample details.

    Details that evaluation (:func:`flowalign.evaluation.evaluate`) reads when present, each one
    value per sample: ``"binary"`` the reward's own 1/0 verdict (a verifier's; the accuracy counts it
    instead of ``score >= threshold``, so a verifier may train on a graded score), ``"partial"`` a
    graded score in [0, 1], ``"tag"`` the category, ``"failure"`` why a sample fails (``"correct"``
    when it does not).
    """

    scores: Tensor
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckedRewardOutput(RewardOutput):
    """What ``call_reward`` returns: a ``RewardOutput`` plus the failure-policy bookkeeping.

    Attributes:
        keep: ``[B]`` bool, False for samples dropped under ``on_error="drop"`` (their score is NaN).
        num_dropped: number of False entries in ``keep``.
    """

    keep: Optional[Tensor] = None
    num_dropped: int = 0


class Reward:
    """Base class for rewards. Subclasses implement ``score``.

    Class attributes:
        name: registry name.
        differentiable: True when ``scores`` carry gradients w.r.t. ``images``.

    ``device`` is where the reward computes. ``to(device)`` and ``offload()`` move the reward's
    models (every ``nn.Module`` attribute, by default) so the trainer can keep reward models off
    the training device between calls; for rewards without models they only record the device.
    """

    name: str = "reward"
    differentiable: bool = False

    def __init__(self, device: Optional[torch.device | str] = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        """Score a batch: the one method a reward implements.

        Args:
            images: ``[B, 3, H, W]`` float in [0, 1] (videos: ``[B, T, 3, H, W]``), on ``self.device``.
            prompts: ``B`` captions.
            metadata: ``B`` dicts from the prompt file (e.g. ShapesEval's ``include`` spec).

        Returns:
            :class:`RewardOutput` with ``scores`` ``[B]`` float32, higher is better. A raised
            exception or a non-finite score is a failure that ``call_reward`` handles by the
            config's ``on_error`` policy (raise, or drop the sample).
        """
        raise NotImplementedError

    def check_prompts(self, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> None:
        """Optional: raise ``ConfigError`` for prompts this reward can never score (a verifier's
        grammar), so a run refuses them before any model loads rather than after its first
        rollout. The default accepts every prompt. See :func:`check_reward_prompts`."""

    def __call__(self, images: Tensor, prompts: list[str], metadata: Optional[list[dict[str, Any]]] = None) -> RewardOutput:
        """:meth:`score` between the checks ``call_reward`` makes: :func:`check_reward_inputs` before it (RewardError for
        uint8 or 0..255 images, a wrong shape, a prompt count that differs from the batch), and after it RewardError
        unless it returned ``B`` scores. NaN / inf scores come back as they are: ``call_reward`` applies the
        ``on_error`` policy (``raise`` or ``drop``) to them."""
        name = reward_name(self)
        metadata = check_reward_inputs(images, prompts, metadata, name=name)
        try:
            return _checked_output(self.score(images, prompts, metadata), images.shape[0], name)
        except _MalformedOutput as exc:
            raise _MalformedOutput(exc.detail, reward=name) from None  # call_reward's on_error still applies

    def to(self, device: Union[torch.device, str]) -> "Reward":
        """Move the reward's models to ``device`` and compute there from now on; returns self."""
        device = torch.device(device)
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.to(device)
        self.device = device
        return self

    def offload(self) -> "Reward":
        """Move the reward's models to the CPU (call ``to(device)`` again before scoring)."""
        return self.to("cpu")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(getattr(self, 'device', 'cpu'))!r})"


REWARDS: dict[str, Callable[..., Reward]] = {}


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def register_reward(name: str) -> Callable:
    """Decorator registering a reward class (or factory, or scoring function) under ``name``."""

    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"register_reward needs a non-empty string name, got {name!r}")

    def wrap(obj):
        previous = REWARDS.get(name)
        if previous is not None and previous is not obj and _qualname(previous) != _qualname(obj):  # not a module reload
            logger.warning("register_reward(%r) replaces the reward registered under that name (%r)", name, REWARDS[name])
        REWARDS[name] = obj
        if isinstance(obj, type):
            obj.name = name
        return obj

    return wrap


class FunctionReward(Reward):
    """A plain scoring function ``fn(images, prompts, metadata, **kwargs)`` used as a ``Reward``.

    ``fn`` may return a ``RewardOutput``, a ``[B]`` tensor / array / list of scores, or a
    ``(scores, details)`` tuple as DDPO's reward functions do.
    """

    def __init__(self, fn: Callable, name: Optional[str] = None, differentiable: bool = False,
                 device: Optional[torch.device | str] = None, fn_kwargs: Optional[Mapping[str, Any]] = None, **kwargs: Any):
        super().__init__(device)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.differentiable = differentiable
        # fn_kwargs: the function's own keyword arguments, whatever their names (a function taking name= or device=
        # gets the config's value, not the wrapper); **kwargs: the same, for callers that name no clashing one
        self.kwargs = {**kwargs, **dict(fn_kwargs or {})}
        if getattr(fn, "version", None) is not None:  # the scoring rules' version, recorded by checkpoints and evaluations
            self.version = fn.version

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        return as_reward_output(self.fn(images, prompts, metadata, **self.kwargs))

    def to(self, device: Union[torch.device, str]) -> "FunctionReward":
        """Move the wrapped scorer's models too: its own ``to(device)`` when it has one (a scoring class of a plugin),
        else its ``nn.Module`` attributes; an ``nn.Module`` scorer moves as the wrapper's attribute. ``offload`` follows."""
        fn = self.fn
        if not isinstance(fn, nn.Module):
            mover = getattr(fn, "to", None)
            if callable(mover) and not isinstance(fn, type):
                moved = mover(torch.device(device))
                if moved is not None and callable(moved):
                    self.fn = moved
            else:
                for value in getattr(fn, "__dict__", {}).values():
                    if isinstance(value, nn.Module):
                        value.to(device)
        return super().to(device)


def as_reward_output(value: Any) -> RewardOutput:
    """Normalise what a reward returned to a ``RewardOutput`` (scores as a float tensor)."""
    if isinstance(value, RewardOutput):
        if isinstance(value.scores, Tensor):
            return value
        return RewardOutput(scores=as_reward_output(value.scores).scores, details=value.details)  # numpy / list scores
    details: dict[str, Any] = {}
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Mapping):
        value, details = value[0], dict(value[1])
    if isinstance(value, Tensor):
        scores = value
    elif isinstance(value, (np.ndarray, list, tuple)):
        scores = torch.as_tensor(np.asarray(value, dtype=np.float64))  # call_reward casts to float32 after checking it
    else:
        raise TypeError(f"expected a RewardOutput, a tensor or an array of scores, got {type(value).__name__}")
    return RewardOutput(scores=scores, details=details)


# ----------------------------------------------------------------------------------------------
# Finding and building rewards
# ----------------------------------------------------------------------------------------------


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return entry_points(ENTRY_POINT_GROUP)


def _lazy_available(target: str) -> bool:
    module = target.split(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_rewards() -> list[str]:
    """Sorted names ``load_reward`` accepts: registered, built-in and entry-point rewards."""
    names = set(REWARDS)
    names.update(name for name, target in LAZY_REWARDS.items() if _lazy_available(target))
    names.update(ep.name for ep in _entry_points())
    return sorted(names)


def describe_rewards() -> list[tuple[str, str]]:
    """``(name, summary)`` for every name :func:`available_rewards` lists: the first line of the reward's
    docstring, or why it cannot be imported (a broken plugin is listed, not fatal)."""
    rows = []
    for name in available_rewards():
        try:
            obj = _resolve(name)
            if not (isinstance(obj, Reward) or callable(obj)):
                rows.append((name, f"(not a reward: {type(obj).__name__}, neither a Reward nor callable)"))
                continue
            doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
            rows.append((name, doc[0] if doc else ""))
        except (Exception, SystemExit) as exc:  # noqa: BLE001 (listing must survive any plugin, even one calling exit)
            rows.append((name, f"(cannot import: {' '.join(str(exc).split())[:160]})"))
    return rows


def _import_object(path: str) -> Any:
    """Import ``"pkg.mod:Attr.sub"`` or ``"pkg.mod.Attr"``; ConfigError naming the path otherwise."""
    return import_object(path, "reward")


def _unknown_reward(spec: str) -> ConfigError:
    names = available_rewards()
    close = difflib.get_close_matches(spec, names, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(
        f"unknown reward {spec!r}.{hint} Available rewards: {', '.join(names) or '(none)'}; "
        f"or give a dotted path 'package.module:Class' or an entry point in group {ENTRY_POINT_GROUP!r}."
    )


_WARNED_SHADOWED: set[str] = set()


def _warn_if_shadowed(spec: str) -> None:
    """Warn (once per name) when an installed entry point has a built-in reward's name: the built-in wins."""
    if spec in _WARNED_SHADOWED:
        return
    for ep in _entry_points():
        if ep.name == spec:
            _WARNED_SHADOWED.add(spec)
            logger.warning("entry point %r = %r (group %s) has a built-in reward's name and is not used: the built-in %r is; "
                           "name it by its dotted path %r, or declare it under another name", spec, ep.value, ENTRY_POINT_GROUP,
                           spec, ep.value)


def _resolve(spec: str) -> Any:
    if spec in REWARDS or spec in LAZY_REWARDS:
        _warn_if_shadowed(spec)
    if spec in REWARDS:
        return REWARDS[spec]
    if spec in LAZY_REWARDS:
        obj = _import_object(LAZY_REWARDS[spec])
        return REWARDS.get(spec, obj)  # the module may have registered a factory under the name
    found = find_plugin(spec, ENTRY_POINT_GROUP, "reward")
    if found is None:
        raise _unknown_reward(spec)
    return found


def _is_scoring_function(fn: Callable, name: str, kwargs: dict[str, Any]) -> bool:
    """Whether ``fn`` scores (``fn(images, prompts, metadata, **kwargs)``) or builds a reward (``fn(**kwargs)``).

    Decided by what its signature accepts: a callable that takes three positional arguments plus the
    configured keywords is a scorer (a plain function, a callable object, an ``nn.Module``, a wrapper with
    ``*args, **kwargs``); one that only takes the keywords is a factory, and so is one without required
    positional parameters (``make(model="x")``). ConfigError when it can be neither.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True  # no signature (some builtins): let the call decide
    params = list(sig.parameters.values())
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if not required and not any(p.kind is p.VAR_POSITIONAL for p in params):
        as_scorer = None
    else:
        try:
            sig.bind(None, None, None, **kwargs)
            return True
        except TypeError as exc:
            as_scorer = exc
    try:
        sig.bind(**kwargs)
        return False
    except TypeError as exc:
        why = f"as a scorer f(images, prompts, metadata, **kwargs): {as_scorer}; " if as_scorer else ""
        raise ConfigError(f"reward {name!r} cannot be called with arguments {sorted(kwargs)} ({why}as a factory: {exc})") from None


def _check_arguments(obj: Any, name: str, kwargs: dict[str, Any]) -> bool:
    """ConfigError for ``kwargs`` that ``obj`` cannot take; returns whether ``obj`` is built with them (a class or a
    factory) rather than holding them for every call (a scoring function) or taking none (a Reward instance)."""
    if isinstance(obj, Reward):
        if kwargs:
            raise ConfigError(f"reward {name!r} is an instance; it takes no arguments (got {sorted(kwargs)})")
        return False
    if not (isinstance(obj, type) or not _is_scoring_function(obj, name, kwargs)):
        return False
    try:
        inspect.signature(obj).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"reward {name!r} cannot be built with arguments {sorted(kwargs)}: {exc}") from exc
    except ValueError:
        pass  # no signature available (builtins); let the call decide
    return True


def check_reward_spec(spec: str, **kwargs: Any) -> None:
    """What :func:`load_reward` would refuse about ``spec`` and ``kwargs`` without building the reward (no model
    loads): an unknown name, a failed import, arguments the class or factory does not take.

    Raises:
        ConfigError: as :func:`load_reward` does for those.
    """
    name = spec.strip()
    if not name:
        raise _unknown_reward(spec)
    obj = _resolve(name)
    if not (isinstance(obj, Reward) or callable(obj)):  # what _build refuses: said when the recipe loads
        raise ConfigError(f"reward {name!r} resolved to {type(obj).__name__}, which is neither a Reward nor callable")
    _check_arguments(obj, name, kwargs)


def _build(obj: Any, name: str, kwargs: dict[str, Any]) -> Reward:
    constructed = _check_arguments(obj, name, kwargs)
    if isinstance(obj, Reward):
        return obj
    if constructed:
        try:
            built = obj(**kwargs)
        except FlowalignError:
            raise
        except Exception as exc:  # a bad setting the reward's constructor refuses: one line naming the reward
            raise ConfigError(f"reward {name!r} could not be built with {kwargs}: {type(exc).__name__}: {exc}") from exc
        if isinstance(built, Reward):
            # a name the class (or the instance) gives itself stays; one inherited (a subclass of a registered reward,
            # which register_reward named) would pass the plugin off as its parent in metrics and eval.json
            own = "name" in getattr(built, "__dict__", {}) or "name" in vars(type(built))
            if built.name == Reward.name or not own:
                built.name = name
            return built
        if callable(built):
            return FunctionReward(built, name=name, differentiable=bool(getattr(built, "differentiable", False)))
        raise ConfigError(f"reward {name!r}: {obj!r} returned {type(built).__name__}, not a Reward")
    if callable(obj):
        return FunctionReward(obj, name=name, differentiable=bool(getattr(obj, "differentiable", False)), fn_kwargs=kwargs)
    raise ConfigError(f"reward {name!r} resolved to {type(obj).__name__}, which is neither a Reward nor callable")


def load_reward(spec: Union[str, Reward, Callable], **kwargs: Any) -> Reward:
    """Build a reward from a name, an entry point, a dotted path, a class or a function.

    Args:
        spec: a registered or built-in name (``"brightness"``), an entry-point name in group
            ``flowalign.rewards``, a dotted path (``"package.module:Class"`` or
            ``"package.module.Class"``), or directly a ``Reward`` class / instance / factory /
            scoring function ``f(images, prompts, metadata)``.
        **kwargs: passed to the class or factory (to a scoring function at every call).

    Raises:
        ConfigError: unknown name (the message lists the available rewards and close matches),
            failed import, or arguments the reward does not accept.
    """
    if isinstance(spec, str):
        name = spec.strip()
        if not name:
            raise _unknown_reward(spec)
        return _build(_resolve(name), name, kwargs)
    name = getattr(spec, "name", None)
    if not isinstance(name, str) or not name or name == Reward.name:
        name = getattr(spec, "__name__", type(spec).__name__)
    return _build(spec, name, kwargs)


def reward_name(reward: Any) -> str:
    """The name used in messages and metric keys for ``reward``."""
    return str(getattr(reward, "name", None) or getattr(reward, "__name__", type(reward).__name__))


# ----------------------------------------------------------------------------------------------
# Checked calls and the failure policy
# ----------------------------------------------------------------------------------------------


def check_reward_inputs(images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[Mapping]] = None,
                        name: str = "reward") -> list[dict[str, Any]]:
    """Check the Reward protocol's inputs; return the metadata list (empty dicts when None).

    Raises ``RewardError`` unless ``images`` is a floating tensor ``[B,3,H,W]`` or ``[B,F,3,H,W]``
    with finite values in [0, 1], ``prompts`` holds ``B`` strings and ``metadata`` ``B`` dicts.
    """
    if not isinstance(images, Tensor):
        raise RewardError(f"reward {name!r}: images must be a torch.Tensor, got {type(images).__name__}", reward=name)
    if not images.is_floating_point():
        raise RewardError(f"reward {name!r}: images must be float in [0, 1], got dtype {images.dtype}", reward=name)
    channel_axis = {4: 1, 5: 2}.get(images.dim())
    if channel_axis is None or images.shape[channel_axis] != 3:
        raise RewardError(
            f"reward {name!r}: images must have shape [B,3,H,W] or [B,F,3,H,W], got {list(images.shape)} (an adapter's decode "
            "returns videos frames first, [B,F,3,H,W], not the [B,C,F,H,W] of video latents)", reward=name
        )
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise RewardError(f"reward {name!r}: prompts must be a list of strings", reward=name)
    batch = images.shape[0]
    if len(prompts) != batch:
        raise RewardError(f"reward {name!r}: {len(prompts)} prompts for {batch} images", reward=name)
    if images.numel():
        low, high = images.detach().aminmax()
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high)):  # aminmax propagates NaN
            raise RewardError(f"reward {name!r}: images contain NaN or inf", reward=name)
        if low < 0.0 or high > 1.0:
            raise RewardError(f"reward {name!r}: images must be in [0, 1], got values in [{low:.4g}, {high:.4g}]", reward=name)
    if metadata is None:
        return [{} for _ in range(batch)]
    if len(metadata) != batch:
        raise RewardError(f"reward {name!r}: {len(metadata)} metadata entries for {batch} images", reward=name)
    if not all(isinstance(m, Mapping) for m in metadata):
        raise RewardError(f"reward {name!r}: metadata must be a list of dicts", reward=name)
    # deep copies: a reward that edits a record's nested spec (pops "include") must not change the prompt set's record,
    # which later iterations and the other rewards read
    return [copy.deepcopy(dict(m)) for m in metadata]


class _MalformedOutput(RewardError):
    """A reward returned something other than ``B`` scores (``detail`` says what, without the reward's name)."""

    def __init__(self, detail: str, reward: Optional[str] = None):
        super().__init__(f"reward {reward!r} {detail}" if reward else detail, reward=reward)
        self.detail = detail


_WARNED_FLOAT32_MERGES: set[str] = set()


def float32_merges(scores: Tensor) -> int:
    """How many distinct finite ``scores`` become equal to another when cast to float32 (0 for float32 or
    narrower scores): a reward offset by 1e7 has a float32 spacing of 1 there, so its groups tie."""
    if scores.dtype != torch.float64 or scores.numel() < 2:
        return 0
    finite = scores[torch.isfinite(scores)]
    return int(torch.unique(finite).numel() - torch.unique(finite.float()).numel())


def _warn_float32_merges(scores: Tensor, name: Optional[str]) -> None:
    merged = float32_merges(scores)
    if merged and name not in _WARNED_FLOAT32_MERGES:
        _WARNED_FLOAT32_MERGES.add(name)
        finite = scores[torch.isfinite(scores)]
        scale = float(finite.abs().max())
        logger.warning("reward %r: %d of a batch's distinct float64 scores become equal in float32, which rewards are kept in "
                       "(scores up to %.3g, where float32's spacing is %.3g): subtract a constant or rescale the scores "
                       "(advantages only see differences within a group)", name, merged, scale,
                       float(torch.finfo(torch.float32).eps) * scale)


def _checked_output(value: Any, batch: int, name: Optional[str] = None) -> RewardOutput:
    try:
        out = as_reward_output(value)
    except TypeError as exc:
        raise _MalformedOutput(str(exc)) from exc
    scores = out.scores
    if scores.device.type == "meta":
        raise _MalformedOutput("returned scores on the 'meta' device (shapes without values)")
    if scores.is_complex():
        raise _MalformedOutput(f"returned complex scores ({scores.dtype}); scores must be real numbers")
    if scores.dim() != 1 or scores.shape[0] != batch:
        raise _MalformedOutput(f"returned scores of shape {list(scores.shape)} for {batch} prompts (expected [{batch}])")
    if not scores.is_floating_point():
        scores = scores.float()
    finite = scores.detach()[torch.isfinite(scores.detach())]
    if finite.numel() and float(finite.abs().max()) > torch.finfo(torch.float32).max:  # would read as inf: "non-finite"
        raise _MalformedOutput(f"returned finite scores up to {float(finite.abs().max()):.3g}, beyond float32's range "
                               f"({torch.finfo(torch.float32).max:.3g}), in which rewards are kept: rescale them")
    _warn_float32_merges(scores.detach(), name)
    _check_details(out.details, batch)
    return RewardOutput(scores=scores.to(torch.float32), details=out.details)


# the details evaluation reads (RewardOutput's docstring): one value per sample each
NUMERIC_DETAILS = ("binary", "partial")
LABEL_DETAILS = ("tag", "failure")


def _check_details(details: Any, batch: int) -> None:
    """Refuse details that evaluation would fail on after a whole run: not a dict, or a ``binary`` / ``partial`` /
    ``tag`` / ``failure`` entry without one value per sample (``binary`` 0 or 1, ``partial`` a number, NaN allowed in
    both for a sample the reward could not judge; labels strings).
    Other keys are the reward's own and pass unchecked."""
    if not isinstance(details, Mapping):
        raise _MalformedOutput(f"returned details of type {type(details).__name__} (expected a dict)")
    for key in NUMERIC_DETAILS:
        value = details.get(key)
        if value is None:
            continue
        try:
            values = torch.as_tensor(value.detach() if isinstance(value, Tensor) else value).to("cpu", torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise _MalformedOutput(f"returned details[{key!r}] that are not numbers ({type(exc).__name__}: {exc})") from None
        if values.numel() != batch:
            raise _MalformedOutput(f"returned details[{key!r}] with {values.numel()} values for {batch} prompts")
        # NaN marks a sample the reward could not judge, as the merged details of dropped samples do
        if key == "binary" and not bool(((values == 0) | (values == 1) | values.isnan()).all()):
            raise _MalformedOutput(f"returned details['binary'] with values other than 0, 1 (or NaN): {sorted(set(values.tolist()))[:5]}")
        if key == "partial" and bool(values.isinf().any()):
            raise _MalformedOutput("returned infinite details['partial']")
    for key in LABEL_DETAILS:
        value = details.get(key)
        if value is None:
            continue
        if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != batch or not all(isinstance(v, str) for v in value):
            shown = f"{len(value)} entries" if isinstance(value, Sequence) and not isinstance(value, str) else type(value).__name__
            raise _MalformedOutput(f"returned details[{key!r}] as {shown}; expected {batch} strings, one per prompt")


def check_reward_prompts(reward: Callable, records: Sequence[Any], name: Optional[str] = None, what: str = "prompts") -> None:
    """Call ``reward.check_prompts(prompts, metadata)`` on ``records`` (``PromptRecord`` s, ``{"prompt", ...}``
    dicts or strings) when the reward has that method (plain callables and most rewards do not), naming
    the reward and ``what`` in its ConfigError."""
    from flowalign.prompts import split_records

    check = getattr(reward, "check_prompts", None)
    if check is None or not records:
        return
    prompts, metadata = split_records(records)
    try:
        check(prompts, metadata)
    except ConfigError as exc:
        raise ConfigError(f"reward {name or reward_name(reward)!r} cannot score the {what}: {exc}") from None
    except Exception as exc:  # a plugin's check that raises ValueError, KeyError, ...: the same one-line refusal
        raise ConfigError(f"reward {name or reward_name(reward)!r} cannot score the {what}: {type(exc).__name__}: {exc}") from exc


def _fingerprint(images: Tensor) -> tuple[Optional[int], Optional[Tensor]]:
    """What :func:`_unchanged` compares to tell whether a reward changed ``images`` in place: the
    tensor's version counter (bumped by every in-place torch op through any view; inference tensors
    have none) and a copy of about 4,096 evenly spaced elements (writes that bypass torch, e.g.
    through ``.numpy()``). Cheap at any batch size, on any device and dtype."""
    x = images.detach()
    version = None if x.is_inference() else x._version
    sample = x.view(-1)[:: max(1, x.numel() // 4096)].clone() if x.is_contiguous() and x.numel() else None
    return version, sample


def _unchanged(images: Tensor, before: tuple[Optional[int], Optional[Tensor]]) -> bool:
    version, sample = _fingerprint(images)
    if version != before[0]:
        return False
    if sample is None or before[1] is None:
        return True
    a, b = sample, before[1]
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) if a.is_floating_point() else torch.equal(a, b)


def _quote(prompts: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(p) for p in prompts[:limit])
    return shown + (f" and {len(prompts) - limit} more" if len(prompts) > limit else "")


def call_reward(reward: Callable, images: Tensor, prompts: Sequence[str],
                metadata: Optional[Sequence[Mapping]] = None, on_error: str = "raise", name: Optional[str] = None) -> CheckedRewardOutput:
    """Score a batch with ``reward``, checking inputs and outputs and applying the failure policy.

    When the batched call raises or returns a malformed result, each sample is scored alone to
    find the failing prompt(s). Under ``on_error="raise"`` any failure or non-finite score raises
    ``RewardError`` naming the reward and the prompt(s); under ``"drop"`` those samples get
    ``keep=False`` and a NaN score, and a warning with the count is logged. A ``RewardError``
    raised by the reward itself (e.g. a ``MultiReward`` component under ``"raise"``) is never
    dropped: it propagates. ``name`` is the reward's name in messages (default: its own, ``reward_name``;
    a mixture passes the component's key, a run the entry's label).

    Returns:
        ``CheckedRewardOutput`` with float32 ``scores [B]`` (on the reward's output device),
        ``details``, ``keep [B]`` bool and ``num_dropped``.
    """
    if on_error not in ON_ERROR_POLICIES:
        raise ConfigError(f"on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}")
    name = name or reward_name(reward)
    metadata = check_reward_inputs(images, prompts, metadata, name=name)
    prompts = list(prompts)
    batch = len(prompts)
    before = _fingerprint(images)
    try:
        out = _checked_output(reward(images, prompts, metadata), batch, name)
    except _MalformedOutput as exc:  # from here or from Reward.__call__'s own check
        if on_error == "raise":
            raise RewardError(f"reward {name!r} {exc.detail}; prompts: {_quote(prompts)}", reward=name, prompts=prompts) from None
        out = _score_each(reward, name, images, prompts, metadata, exc, on_error)
    except RewardError:
        raise  # a nested call_reward (MultiReward component) under "raise" already decided
    except Exception as exc:  # noqa: BLE001 - every failure of user code goes through the policy
        out = _score_each(reward, name, images, prompts, metadata, exc, on_error)

    if not _unchanged(images, before):  # the next reward (and the report, the store) would see the changed images
        raise RewardError(f"reward {name!r} modified the images it was given in place; copy them first "
                          f"(images.clone()) or use out-of-place operations", reward=name, prompts=prompts)
    scores = out.scores
    finite = torch.isfinite(scores.detach())
    if on_error == "raise" and not bool(finite.all()):
        bad = [prompts[i] for i in torch.nonzero(~finite).flatten().tolist()]
        raise RewardError(f"reward {name!r} returned non-finite scores for {len(bad)} of {batch} prompts: {_quote(bad)}",
                          reward=name, prompts=bad)
    keep = finite.cpu()
    num_dropped = int(batch - int(keep.sum()))
    if num_dropped:
        dropped = [prompts[i] for i in torch.nonzero(~keep).flatten().tolist()]
        logger.warning("reward %r: dropped %d of %d samples (failed or non-finite score); prompts: %s",
                       name, num_dropped, batch, _quote(dropped))
        scores = torch.where(finite, scores, torch.full_like(scores, float("nan")))
    return CheckedRewardOutput(scores=scores, details=out.details, keep=keep, num_dropped=num_dropped)


def call_reward_batched(reward: Callable, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[Mapping]] = None,
                        on_error: str = "raise", name: Optional[str] = None, batch_size: Optional[int] = None,
                        progress: Optional[Callable[[int], None]] = None) -> CheckedRewardOutput:
    """:func:`call_reward` on chunks of at most ``batch_size`` samples (None: the whole batch in one call), joined.

    A reward model's peak memory follows the images it is given at once; chunking bounds it, and ``progress(n)`` is
    called after each chunk with the ``n`` samples it scored (a bar that counts samples). Each chunk gets the failure
    policy on its own; the joined output has every chunk's scores, keep mask and dropped count, and the details
    :func:`join_details` can join.
    """
    batch = len(prompts)
    if batch_size is None or batch_size >= batch:
        out = call_reward(reward, images, prompts, metadata, on_error=on_error, name=name)
        if progress is not None:
            progress(batch)
        return out
    if batch_size < 1:
        raise ConfigError(f"reward batch_size must be >= 1 or None, got {batch_size}")
    metadata = check_reward_inputs(images, prompts, metadata, name=name or reward_name(reward))  # as one call checks them
    prompts = list(prompts)
    parts: list[CheckedRewardOutput] = []
    for start in range(0, batch, batch_size):
        stop = min(start + batch_size, batch)
        parts.append(call_reward(reward, images[start:stop], prompts[start:stop], metadata[start:stop], on_error=on_error, name=name))
        if progress is not None:
            progress(stop - start)
    device = parts[0].scores.device
    sizes = [len(part.keep) for part in parts]
    return CheckedRewardOutput(scores=torch.cat([part.scores.to(device) for part in parts]),
                               details=join_details([part.details for part in parts], sizes,
                                                    missing=[not bool(part.keep.any()) for part in parts]),
                               keep=torch.cat([part.keep for part in parts]), num_dropped=sum(part.num_dropped for part in parts))


def join_details(parts: Sequence[Mapping[str, Any]], sizes: Sequence[int], missing: Optional[Sequence[bool]] = None) -> dict[str, Any]:
    """The details of consecutive chunks of ``sizes[i]`` samples as one batch's.

    Per key present in every chunk: tensors with one row per sample are concatenated, lists / tuples of one item per
    sample chained, mappings joined key by key, and any other value kept when every chunk has the same (a reward's
    constant, such as a mixture's weights). A key that fits none of these is left out. A chunk marked in ``missing``
    (every sample of it dropped: no details) takes NaN rows (tensors) or None items (lists) in the keys the others
    give, as one call fills its failed samples, so one failed chunk does not take a key from the whole batch.
    """
    missing = list(missing) if missing is not None else [False] * len(parts)
    if all(missing):
        return {}
    if any(missing):
        present = [part for part, gone in zip(parts, missing) if not gone]
        parts = [_filler(present[0], n) if gone else part for part, n, gone in zip(parts, sizes, missing)]
    out: dict[str, Any] = {}
    for key in [k for k in parts[0] if all(k in part for part in parts)]:
        values = [part[key] for part in parts]
        if all(isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == n for v, n in zip(values, sizes)):
            out[key] = torch.cat([v.to(values[0].device) for v in values])
        elif all(isinstance(v, (list, tuple)) and len(v) == n for v, n in zip(values, sizes)):
            out[key] = [x for v in values for x in v]
        elif all(isinstance(v, Mapping) for v in values):
            out[key] = join_details(values, sizes)
        elif not any(isinstance(v, Tensor) for v in values) and all(_same(v, values[0]) for v in values[1:]):
            out[key] = values[0]
    return out


def _filler(like: Mapping[str, Any], n: int) -> dict[str, Any]:
    """Details of ``n`` dropped samples shaped as ``like``'s: NaN rows for per-sample tensors, None for list items,
    the same for constants (left to :func:`join_details`' rules)."""
    out: dict[str, Any] = {}
    for key, value in like.items():
        if isinstance(value, Tensor) and value.dim() >= 1:
            out[key] = torch.full((n, *value.shape[1:]), float("nan"), dtype=torch.float32, device=value.device)
        elif isinstance(value, (list, tuple)):
            out[key] = [None] * n
        elif isinstance(value, Mapping):
            out[key] = _filler(value, n)
        else:
            out[key] = value
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a value whose == is not a truth value (arrays): not a constant
        return False


def _score_each(reward: Callable, name: str, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]],
                batch_error: Exception, on_error: str) -> RewardOutput:
    """Score samples one by one after a failed batched call; NaN for those that fail alone."""
    batch = len(prompts)
    scores: list[Tensor] = []
    details: list[Optional[dict[str, Any]]] = []  # each sample's own details; None where it failed
    errors: list[tuple[int, Exception]] = []
    for i in range(batch):
        if batch == 1:
            error: Optional[Exception] = batch_error
        else:
            try:
                out = _checked_output(reward(images[i:i + 1], prompts[i:i + 1], metadata[i:i + 1]), 1)
                scores.append(out.scores)
                details.append(out.details)
                continue
            except _MalformedOutput as exc:
                error = exc
            except RewardError:
                raise
            except Exception as exc:  # noqa: BLE001
                error = exc
        errors.append((i, error))
        if on_error == "raise":
            break
        scores.append(torch.full((1,), float("nan")))
        details.append(None)
    if on_error == "raise":
        if errors:
            i, error = errors[0]
            raise RewardError(f"reward {name!r} failed on prompt {prompts[i]!r} (sample {i} of {batch}): "
                              + (error.detail if isinstance(error, _MalformedOutput) else f"{type(error).__name__}: {error}"),
                              reward=name, prompts=[prompts[i]]) from error
        raise RewardError(f"reward {name!r} failed on a batch of {batch} prompts although each prompt alone "
                          f"succeeded: {type(batch_error).__name__}: {batch_error}; prompts: {_quote(prompts)}",
                          reward=name, prompts=prompts) from batch_error
    for i, error in errors:
        if isinstance(error, _MalformedOutput):
            logger.warning("reward %r failed on prompt %r: %s", name, prompts[i], error.detail)
        else:
            logger.warning("reward %r failed on prompt %r: %s: %s", name, prompts[i], type(error).__name__, error)
    if not errors:  # every sample scored alone: the run goes on at one call per sample, which it should say
        logger.warning("reward %r failed on a batch of %d but scored each sample alone (%s: %s): scored one by one",
                       name, batch, type(batch_error).__name__, batch_error)
    device = next((s.device for s in scores if not torch.isnan(s).all()), torch.device("cpu"))
    stitched = _stitch_details(details)
    stitched.update({"scored_one_by_one": True, "batch_error": f"{type(batch_error).__name__}: {batch_error}"})
    return RewardOutput(scores=torch.cat([s.to(device) for s in scores]), details=stitched)


def _stitch_details(each: list[Optional[dict[str, Any]]]) -> dict[str, Any]:
    """The per-sample details of one-by-one calls as one batch's: a key every scored sample has, with one
    value per sample (a ``[1, ...]`` tensor or a one-item list), is joined along the batch; failed
    samples (None) get NaN (tensors) or None (lists). Other keys are left out."""
    scored = [d for d in each if d is not None]
    if not scored:
        return {}
    out: dict[str, Any] = {}
    for key in scored[0]:
        values = [d.get(key) for d in scored]
        if all(isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == 1 for v in values):
            like = values[0].detach().float().cpu()
            out[key] = torch.cat([d[key].detach().float().cpu() if d is not None else torch.full_like(like, float("nan")) for d in each])
        elif all(isinstance(v, (list, tuple)) and len(v) == 1 for v in values):
            out[key] = [d[key][0] if d is not None else None for d in each]
    return out


# ----------------------------------------------------------------------------------------------
# Weighted mixtures
# ----------------------------------------------------------------------------------------------


class MultiReward(Reward):
    """A weighted mixture of rewards (DESIGN.md §3, §7).

    ``rewards`` maps a component name to ``(reward, weight)`` or ``(reward, weight, on_error)``;
    ``reward`` is a ``Reward`` or anything ``load_reward`` accepts. Each component is scored
    through ``call_reward`` with its own policy (default: the ``on_error`` argument). A dropped
    component sample is NaN, which makes the mixed score NaN, so call the mixture itself with
    ``call_reward(multi, ..., on_error=multi.on_error)``: ``multi.on_error`` is ``"drop"`` as soon
    as one component drops.

    - ``mode="reward"``: ``scores = sum_i w_i r_i``, the usual mixture of rewards.
    - ``mode="advantage"`` (in a recipe: ``objective.reward_mix: advantage``):
      normalise each component over its group and sum the
      normalised advantages, e.g. ``flowalign.advantages.multi_reward_advantages(
      details["components"], group_ids, weights=details["weights"])`` or ``multi.combine``;
      ``scores`` still holds the weighted reward sum, for logging.

    ``details["components"][name]`` is each component's ``[B]`` scores, ``details["weights"]``
    the weights and ``details["per_reward"][name]`` each component's own details.
    """

    name = "multi"

    def __init__(self, rewards: Mapping[str, tuple[Any, float]], mode: str = "reward", on_error: str = "raise",
                 device: Optional[torch.device | str] = None):
        super().__init__(device)
        if mode not in ("reward", "advantage"):
            raise ConfigError(f"MultiReward mode must be 'reward' or 'advantage', got {mode!r}")
        if on_error not in ON_ERROR_POLICIES:
            raise ConfigError(f"on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}")
        if not rewards:
            raise ConfigError("MultiReward needs at least one reward")
        self.mode = mode
        self.rewards: dict[str, Reward] = {}
        self.weights: dict[str, float] = {}
        self.policies: dict[str, str] = {}
        for key, value in rewards.items():
            if not (isinstance(value, tuple) and len(value) in (2, 3)):
                raise ConfigError(f"MultiReward entry {key!r} must be a (reward, weight[, on_error]) tuple, got {value!r}")
            reward, weight = value[:2]
            policy = value[2] if len(value) == 3 else on_error
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ConfigError(f"MultiReward weight of {key!r} must be a finite number, got {weight!r}")
            if policy not in ON_ERROR_POLICIES:
                raise ConfigError(f"MultiReward on_error of {key!r} must be one of {ON_ERROR_POLICIES}, got {policy!r}")
            self.rewards[key] = reward if isinstance(reward, Reward) else load_reward(reward)
            self.weights[key] = float(weight)
            self.policies[key] = policy
        self.on_error = "drop" if "drop" in self.policies.values() else "raise"
        self.differentiable = all(r.differentiable for r in self.rewards.values())

    @classmethod
    def from_config(cls, config: Union[Mapping[str, Any], Sequence[Any]], mode: str = "reward",
                    on_error: str = "raise") -> "MultiReward":
        """Build from a config's ``rewards``.

        Accepts ``{spec: weight}``, ``{spec: {"weight": w, "on_error": p, **kwargs}}``, or a list of
        entries with ``name``, ``weight``, ``kwargs``, ``on_error`` and ``label`` (mappings or objects such as
        ``flowalign.config.RewardConfig``); an entry is keyed by its ``label`` when it has one (one reward twice,
        e.g. with other kwargs), else by its ``name``.
        """
        rewards: dict[str, tuple[Reward, float, str]] = {}
        if isinstance(config, Mapping):
            for spec, value in config.items():
                if isinstance(value, Mapping):
                    kwargs = dict(value)
                    weight = kwargs.pop("weight", 1.0)
                    policy = kwargs.pop("on_error", on_error)
                else:
                    kwargs, weight, policy = {}, value, on_error
                rewards[spec] = (load_reward(spec, **kwargs), weight, policy)
        else:
            for entry in config:
                get = entry.get if isinstance(entry, Mapping) else (lambda k, d=None, e=entry: getattr(e, k, d))
                name = get("name")
                if not isinstance(name, str) or not name:
                    raise ConfigError(f"MultiReward.from_config: each entry needs a 'name', got {entry!r}")
                key = get("label") or name
                if key in rewards:
                    raise ConfigError(f"MultiReward.from_config: reward {key!r} listed twice; give one of them a 'label'")
                rewards[key] = (load_reward(name, **dict(get("kwargs") or {})), get("weight", 1.0), get("on_error") or on_error)
        return cls(rewards, mode=mode, on_error=on_error)

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        components: dict[str, Tensor] = {}
        per_reward: dict[str, dict[str, Any]] = {}
        for key, reward in self.rewards.items():
            out = call_reward(reward, images, prompts, metadata, on_error=self.policies[key], name=key)
            components[key] = out.scores.to(images.device)  # [B], NaN where dropped
            per_reward[key] = out.details
        details = {"components": components, "weights": dict(self.weights), "mode": self.mode, "per_reward": per_reward}
        return RewardOutput(scores=self.combine(components), details=details)

    def combine(self, per_component: Mapping[str, Tensor]) -> Tensor:
        """``sum_i w_i x_i`` over components (rewards, or their normalised advantages). A weight-0 component counts
        for nothing, its NaN (a sample it dropped) included: it is logged, not mixed."""
        missing = set(self.weights) - set(per_component)
        if missing:
            raise ConfigError(f"MultiReward.combine: missing components {sorted(missing)}")
        total = None
        for key, weight in self.weights.items():
            term = weight * per_component[key] if weight != 0 else torch.zeros_like(per_component[key])
            total = term if total is None else total + term
        return total

    def to(self, device: Union[torch.device, str]) -> "MultiReward":
        for reward in self.rewards.values():
            reward.to(device)
        self.device = torch.device(device)
        return self

    def offload(self) -> "MultiReward":
        for reward in self.rewards.values():
            reward.offload()
        self.device = torch.device("cpu")
        return self
