"""The ``shapes`` verifier: a GenEval-style rule-based reward for the toy world (DESIGN.md §10).

Pipeline per image (32x32, or any size: padded to a square with the background, then resized to 32x32):

1. **Colour segmentation.** Every pixel ``p`` is explained as a blend of the background ``b``
   and a palette colour ``c``: ``alpha = <p - b, c - b> / |c - b|^2`` and residual
   ``|p - b - alpha (c - b)|``. The colour with the smallest residual wins; the pixel is
   foreground when its ``alpha >= 0.5`` and its residual is small. Projecting on the
   background-colour line makes anti-aliased or blurry edges keep their colour.
2. **Connected components** per colour (4-connectivity); components under ``min_area`` pixels
   are dropped as noise, and a component that is no clean shape is split at its necks when
   every part is one (:func:`split_touching`: touching discs of one colour are two discs).
3. **Shape classification** of each component from its mask: an upright triangle has most of
   its mass in the lower half of its bounding box (``asym = (bottom - top) / area`` about 0.5,
   0 for circles and squares); a square fills its box (``fill`` about 1) where a circle fills
   about pi/4 (measured with colour coverage, :func:`soft_fill`, so pixelisation and blur
   matter little).
4. **GenEval rules** (Ghosh et al. 2023, arXiv:2310.11513, ``evaluate``): each ``include``
   entry needs ``count`` matching objects (shape, and colour when given); ``position`` is
   checked between box centres with GenEval's 0.1 size margin; each ``exclude`` entry fails
   the image when ``count`` matching objects are present.

``scores`` are 1/0 (all constraints met) by default; ``details["partial"]`` is the fraction of
constraints met (a coloured request counts twice: the shape, then the coloured shape),
``details["binary"]`` the 1/0 verdict, ``details["tag"]`` the category, ``details["objects"]``
the detected objects, ``details["failure"]`` why a sample fails (:func:`failure_mode`: ``correct``,
``empty``, ``malformed``, ``shape_count``, ``color``, ``position``; the run report tabulates it).
``ShapesReward(score="partial")`` scores the fraction instead and
``score="mix"`` scores ``(1 - w) binary + w partial`` (``w = partial_weight <= 0.5``): a denser
training signal (failed samples that meet more constraints score higher; a count is met or not, so two of "three
circles" earn what none do, and an empty scene meets "fewer than four": ``graded=True`` prices the count) whose ``score >= 0.5`` is still
exactly the binary verdict (a failed sample has ``partial < 1``, so its score is below ``w``),
so an evaluation thresholding at 0.5 (``flowalign.evaluation``) measures binary accuracy.
``ShapesReward(exclusive=True)`` adds "nothing unrequested is drawn" to the partial fraction
(GenEval ignores extra objects; the verdict still does). ``ShapesReward(graded=True)`` gives a
count constraint partial credit ``found / count`` (two of "three green triangles" earn 2/3 of it).
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping, Optional

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from flowalign.errors import ConfigError, RewardError

from .base import Reward, RewardOutput, _quote, register_reward
from .shapes_scenes import BACKGROUND, COLORS, PALETTE, RELATIONS, SHAPES, SIZE, Spec, parse_prompt

POSITION_THRESHOLD = 0.1  # GenEval's margin, as a fraction of the two boxes' sizes
SCORE_MODES = ("binary", "partial", "mix")  # ShapesReward(score=...)
SQUARE_SOFT_FILL = 0.845  # a disc is pi/4 = 0.785 (renders: <= 0.83), a square 1; blurry squares ~0.85-0.93


def segment(image: np.ndarray, alpha_min: float = 0.5, residual_max: float = 70.0) -> np.ndarray:
    """Per-pixel labels of :func:`segment_with_alpha` (colour index, -1 background, -2 unexplained)."""
    return segment_with_alpha(image, alpha_min, residual_max)[0]


def segment_with_alpha(image: np.ndarray, alpha_min: float = 0.5, residual_max: float = 70.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel colour index (into ``PALETTE`` order), ``-1`` for background, ``-2`` for a
    pixel no palette colour explains (neither background nor a colour blend), and the coverage
    ``alpha [H, W, K]`` of each palette colour.

    ``image`` is float ``[H, W, 3]`` in 0..255.
    """
    b = np.asarray(BACKGROUND, np.float32)
    cols = np.asarray(list(PALETTE.values()), np.float32) - b  # [K, 3]
    d = image.astype(np.float32) - b  # [H, W, 3]
    alpha = d @ cols.T / (cols**2).sum(-1)  # [H, W, K]
    resid = np.linalg.norm(d[..., None, :] - alpha[..., None] * cols, axis=-1)  # [H, W, K]
    resid = np.where(alpha > 0, resid, np.inf)
    best = resid.argmin(-1)  # [H, W]
    a = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    r = np.take_along_axis(resid, best[..., None], -1)[..., 0]
    explained = r <= residual_max
    faint = np.linalg.norm(d, axis=-1) <= 0.5 * residual_max
    labels = np.where(explained & (a >= alpha_min), best, -2)
    return np.where((labels == -2) & ((explained & (a < alpha_min)) | faint), -1, labels), alpha


def soft_fill(alpha: np.ndarray, region: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Coverage-weighted fill of a shape's bounding box: ``sum(a) / (w * h)`` with the soft
    width ``w = sum_x max_y a`` and height ``h = sum_y max_x a`` over ``region``, where ``a`` is the
    colour coverage ``alpha`` divided by the object's own colour strength (the 95th percentile of
    ``alpha`` over its ``mask``, when given) and clipped to 0..1.

    Uses the colour coverage instead of a thresholded mask, so it does not depend on how a small
    or blurry shape falls on the pixel grid: about 1 for a square, pi/4 = 0.785 for a disc, 1/2 for
    a triangle. The strength division keeps a faded or over-bright render's fill: without it a
    disc drawn at 90% contrast measured as a square, and a brighter one too.
    """
    a = np.clip(alpha, 0.0, None)
    if mask is not None and mask.any():
        a = a / max(float(np.percentile(a[mask], 95)), 1e-6)
    a = np.where(region, np.clip(a, 0.0, 1.0), 0.0)
    w, h = a.max(axis=0).sum(), a.max(axis=1).sum()
    return float(a.sum() / max(w * h, 1e-6))


def classify_shape(mask: np.ndarray, fill_soft: Optional[float] = None) -> tuple[str, dict[str, float]]:
    """``circle``/``square``/``triangle`` (or ``other``) for a boolean component mask, with its
    features; ``fill_soft`` (:func:`soft_fill`) decides square vs circle when given."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    area = float(len(ys))
    fill = area / (h * w)
    mid = (y0 + y1 - 1) / 2.0
    asym = (float((ys > mid).sum()) - float((ys < mid).sum())) / area
    box = mask[y0:y1, x0:x1]
    corners = int(box[0, 0]) + int(box[0, -1]) + int(box[-1, 0]) + int(box[-1, -1])
    aspect = w / h
    feats = {"fill": fill, "asym": asym, "corners": float(corners), "aspect": aspect, "soft_fill": fill_soft if fill_soft is not None else fill}
    if not 0.6 <= aspect <= 1.67:
        return "other", feats
    if asym > 0.22:
        return ("triangle" if 0.35 <= fill <= 0.8 else "other"), feats
    if fill_soft is not None:
        if fill_soft >= SQUARE_SOFT_FILL:
            return "square", feats
    elif fill >= 0.92 or (fill >= 0.82 and corners >= 3):
        return "square", feats
    return ("circle" if 0.6 <= fill and abs(asym) <= 0.15 else "other"), feats


def detect(image: np.ndarray, min_area: int = 10, max_side: int = 20, min_clean: float = 0.8) -> list[dict[str, Any]]:
    """Objects in one image (float ``[H, W, 3]`` in 0..255), largest first.

    Each object: ``{"shape", "color", "area", "box": (x0, y0, x1, y1), "center": (x, y)}``;
    ``shape`` is ``"other"`` for a blob that is no clean shape: wider or taller than ``max_side`` pixels
    (whatever its shape: an area limit let a triangle twice a disc's width pass; the world draws 7-13 px objects), or
    whose bounding box is less than ``min_clean`` made of itself and background (a shape is
    drawn on a plain background; a smear over noise is not a shape).
    """
    objects, _ = detect_with_masks(image, min_area, max_side, min_clean)
    for obj in objects:
        del obj["mask"]
    return objects


def detect_with_masks(image: np.ndarray, min_area: int = 10, max_side: int = 20, min_clean: float = 0.8) -> tuple[list[dict[str, Any]], np.ndarray]:
    """:func:`detect`'s objects, each with its boolean pixel ``"mask"``, and the per-pixel labels of
    :func:`segment` (colour index, -1 background, -2 unexplained) they were found in.

    Every component is tried as touching objects of one colour (:func:`split_touching`): its parts replace it when
    it has necks and every part is a clean shape of at least ``min_area`` pixels (two discs whose edges meet are two
    discs, as GenEval's instance detector sees them; two squares side by side make a rectangle, which no split can
    tell from one). A component that reads as one clean shape whole is split only into parts of like size
    (:data:`SPLIT_ALIKE`): four discs in a 2x2 block are four circles, not one, while a soft-edged triangle whose tip
    erosion cuts off stays a triangle. Three discs in a pyramid do not fall apart under erosion and still read as
    one triangle."""
    labels, alpha = segment_with_alpha(image)
    names = list(PALETTE)
    objects = []
    for k, color in enumerate(names):
        comp, n = ndimage.label(labels == k)
        for i in range(1, n + 1):
            blob = comp == i
            if int(blob.sum()) < min_area:
                continue
            whole = _describe(blob, blob, k, color, labels, alpha, max_side, min_clean)
            split = split_touching(blob)
            if len(split) > 1:
                parts = [_describe(part, blob, k, color, labels, alpha, max_side, min_clean) for part in split]
                areas = [p["area"] for p in parts]
                # a blob that reads as one shape whole splits only into parts of like size (a 2x2 block of discs reads
                # as one "circle"); a soft-edged triangle's tip can fall off under erosion, and is no second object
                alike = whole["shape"] == "other" or min(areas) >= SPLIT_ALIKE * max(areas)
                if alike and all(p["shape"] != "other" and p["area"] >= min_area for p in parts):
                    objects.extend(parts)
                    continue
            objects.append(whole)
    objects.sort(key=lambda o: -o["area"])
    return objects, labels


#: a component that reads as one clean shape is taken as touching objects only when its parts' areas are at least this
#: fraction of the largest part's (touching copies of one object are alike; a shape's own lobe is not)
SPLIT_ALIKE = 0.6


def split_touching(mask: np.ndarray, max_erosion: int = 2) -> list[np.ndarray]:
    """Split a component at its necks: erode it until it falls apart (at most ``max_erosion`` times, 4-connected),
    then give every pixel to the nearest core. Returns the parts' masks (``[mask]`` when it never falls apart)."""
    for times in range(1, max_erosion + 1):
        core = ndimage.binary_erosion(mask, iterations=times)
        seeds, n = ndimage.label(core)
        if n == 0:
            break
        if n >= 2:
            _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
            owner = np.where(mask, seeds[iy, ix], 0)
            return [owner == j for j in range(1, n + 1)]
    return [mask]


def _describe(mask: np.ndarray, blob: np.ndarray, k: int, color: str, labels: np.ndarray, alpha: np.ndarray, max_side: int,
              min_clean: float) -> dict[str, Any]:
    """One object of colour ``k``: ``mask`` is its pixels, ``blob`` the component it is (part of); the rest of the
    blob counts as clean surroundings but not as the object's coverage."""
    area = int(mask.sum())
    region = ndimage.binary_dilation(mask) & (((labels == k) & ~(blob & ~mask)) | (labels == -1))
    shape, feats = classify_shape(mask, soft_fill(alpha[..., k], region, mask))
    ys, xs = np.nonzero(mask)
    window = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    clean = float((blob[window] | (labels[window] == -1)).mean())
    if max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 > max_side or clean < min_clean:
        shape = "other"
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return {"shape": shape, "color": color, "area": area, "box": box, "center": ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), "clean": clean,
            **feats, "mask": mask}


def relative_position(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    """GenEval's relations of ``a`` to ``b`` from box centres (image y grows downwards)."""
    dim_a = np.array([a["box"][2] - a["box"][0], a["box"][3] - a["box"][1]])
    dim_b = np.array([b["box"][2] - b["box"][0], b["box"][3] - b["box"][1]])
    offset = np.array(a["center"]) - np.array(b["center"])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def _matching(objects: list[dict[str, Any]], req: dict[str, Any], use_color: bool = True) -> list[dict[str, Any]]:
    return [o for o in objects if o["shape"] == req["shape"] and (not use_color or "color" not in req or o["color"] == req["color"])]


def unrequested(objects: list[dict[str, Any]], spec: Spec) -> list[dict[str, Any]]:
    """The detected objects that no ``include`` entry asks for (by shape, and colour when it names one);
    ``"other"`` blobs are never requested."""
    return [o for o in objects if not any(_matching([o], req) for req in spec["include"])]


def evaluate(objects: list[dict[str, Any]], spec: Spec, exclusive: bool = False, graded: bool = False) -> tuple[bool, float]:
    """GenEval's rule on detected objects: (all constraints met, fraction met).

    With ``exclusive``, the fraction counts one more constraint, "nothing unrequested is drawn"
    (:func:`unrequested` is empty); the verdict stays GenEval's, which ignores extra objects.
    With ``graded``, a count constraint that is not met earns ``found / count`` instead of 0
    (two of "three green triangles" is 2/3 of that constraint); the verdict is unchanged.
    """
    met: list[float] = []
    groups: list[Optional[list[dict[str, Any]]]] = []
    for req in spec["include"]:
        count = int(req.get("count", 1))
        if "color" in req:
            shaped = min(len(_matching(objects, req, use_color=False)), count)
            met.append(shaped / count if graded else float(shaped >= count))
        found = _matching(objects, req)[:count]
        ok = len(found) >= count
        met.append(len(found) / count if graded else float(ok))
        if "position" in req:
            rel, j = req["position"]
            pos_ok = ok and groups[j] is not None and all(rel in relative_position(o, t) for o in found for t in groups[j])
            met.append(float(pos_ok))
            ok = ok and pos_ok
        groups.append(found if ok else None)
    for req in spec.get("exclude", []):  # "fewer than count of these" (no count: none at all)
        met.append(float(len(_matching(objects, req)) < int(req.get("count", 1))))
    verdict = all(m >= 1.0 for m in met)
    if exclusive:
        met.append(float(not unrequested(objects, spec)))
    return verdict, float(np.mean(met)) if met else 1.0  # a spec without constraints holds


FAILURE_MODES = ("correct", "empty", "malformed", "shape_count", "color", "position")


def _without(spec: Spec, keys: tuple[str, ...]) -> Spec:
    """A copy of ``spec`` whose include entries drop ``keys`` (``color``, ``position``); the
    exclude entries ("fewer than n of the requested kind") stay as they are."""
    return {**spec, "include": [{k: v for k, v in e.items() if k not in keys} for e in spec["include"]]}


def failure_mode(objects: list[dict[str, Any]], spec: Spec, verdict: Optional[bool] = None) -> str:
    """Why a scene fails its spec: the first level of GenEval's rule it breaks.

    * ``"correct"``: every constraint holds (:func:`evaluate`'s verdict).
    * ``"empty"``: no object was detected at all: a blank, washed-out or unexplained scene (a
      collapsed policy shows here first).
    * ``"malformed"``: the shapes and counts are wrong (colours and positions ignored) and a
      shapeless blob (``shape == "other"``) is present: an object was drawn but not cleanly.
    * ``"shape_count"``: the shapes and counts are wrong with clean shapes only (a wrong or
      missing shape, or too many of a counted one).
    * ``"color"``: shapes and counts hold but a requested colour does not.
    * ``"position"``: shapes, counts and colours hold; the relation does not.

    ``objects`` are :func:`detect`'s output (only ``shape``, ``color``, ``box``, ``center`` are read);
    ``verdict`` is :func:`evaluate`'s verdict on them when the caller already has it.
    """
    if evaluate(objects, spec)[0] if verdict is None else verdict:
        return "correct"
    if not objects:
        return "empty"
    if not evaluate(objects, _without(spec, ("color", "position")))[0]:
        return "malformed" if any(o["shape"] == "other" for o in objects) else "shape_count"
    if not evaluate(objects, _without(spec, ("position",)))[0]:
        return "color"
    return "position"


def scene_pixels(images: Tensor) -> np.ndarray:
    """Images ``[B, 3, H, W]`` in [0, 1] as the verifier reads them: float ``[B, 32, 32, 3]`` in
    0..255 (area-resized when another size; a non-square image is first padded to a square with the
    background colour, centred, so that circles and squares keep their aspect)."""
    x = images.detach().float().cpu().clamp(0, 1)
    h, w = x.shape[-2:]
    if h != w:
        side = max(h, w)
        canvas = torch.tensor(BACKGROUND, dtype=x.dtype).div(255.0).view(1, 3, 1, 1).expand(x.shape[0], 3, side, side).clone()
        top, left = (side - h) // 2, (side - w) // 2
        canvas[:, :, top:top + h, left:left + w] = x
        x = canvas
    if x.shape[-2:] != (SIZE, SIZE):
        x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="area")
    return (x.permute(0, 2, 3, 1).numpy() * 255.0).astype(np.float32)


SPEC_KEYS = ("include", "exclude", "tag")
INCLUDE_KEYS = ("shape", "color", "count", "position")
EXCLUDE_KEYS = ("shape", "color", "count")


def check_spec(spec: Any) -> None:
    """Raise ``ValueError`` naming what is wrong unless ``spec`` is a ShapesEval spec this verifier can check:
    ``include`` a list of objects ``{"shape", "color"?, "count"?, "position"?}`` (a shape of ``SHAPES``, a colour of
    ``COLORS``, a count >= 1, a position ``[relation, j]`` relative to an earlier entry ``j``), ``exclude`` (optional)
    such objects without a position, ``tag`` (optional) a string. A misspelt key or value would otherwise be ignored
    (``"colour"``: no colour constraint) or never match (``"cirle"``: every sample fails) without a word."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"the spec must be a JSON object, got {type(spec).__name__}")
    for key in spec:  # other keys are the prompt record's own fields; a near miss of ours is a typo that drops a constraint
        near = difflib.get_close_matches(str(key), SPEC_KEYS, n=1, cutoff=0.8)
        if key not in SPEC_KEYS and near:
            raise ValueError(f"unknown key {key!r}; did you mean {near[0]!r}? (a spec takes {list(SPEC_KEYS)})")
    if "include" not in spec:
        raise ValueError("the spec has no 'include' list (GenEval's specs name what to draw; an 'exclude' alone is not one)")
    if not isinstance(spec.get("tag", ""), str):
        raise ValueError(f"'tag' must be a string, got {spec['tag']!r}")
    for part, keys in (("include", INCLUDE_KEYS), ("exclude", EXCLUDE_KEYS)):
        entries = spec.get(part, [])
        if not isinstance(entries, list):
            raise ValueError(f"{part!r} must be a list of objects, got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            where = f"{part}[{i}]"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
            unknown = sorted(set(entry) - set(keys))
            if unknown:
                raise ValueError(f"{where} has unknown key(s) {unknown}; an object takes {list(keys)}")
            if entry.get("shape") not in SHAPES:
                raise ValueError(f"{where}: 'shape' must be one of {list(SHAPES)}, got {entry.get('shape')!r}")
            if "color" in entry and entry["color"] not in COLORS:
                raise ValueError(f"{where}: 'color' must be one of {list(COLORS)}, got {entry['color']!r}")
            count = entry.get("count", 1)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{where}: 'count' must be an integer >= 1, got {count!r}")
            if "position" in entry:
                position = entry["position"]
                if not (isinstance(position, (list, tuple)) and len(position) == 2 and position[0] in RELATIONS
                        and isinstance(position[1], int) and not isinstance(position[1], bool) and 0 <= position[1] < i):
                    raise ValueError(f"{where}: 'position' must be [relation, j] with a relation of {list(RELATIONS)} and j the "
                                     f"index of an earlier include entry, got {position!r}")
    if not spec["include"]:
        raise ValueError("'include' is empty: every image, noise included, would meet the spec")
    for i, entry in enumerate(spec.get("exclude", [])):
        needed = [req for req in spec["include"] if _matching([{"shape": req["shape"], "color": req.get("color")}], entry)]
        most = max((int(req.get("count", 1)) for req in needed), default=0)
        if most >= int(entry.get("count", 1)):
            raise ValueError(f"exclude[{i}] forbids {entry.get('count', 1)} or more of what an include entry asks {most} of: no image "
                             "can meet the spec")


def carries_spec(meta: Optional[Mapping[str, Any]]) -> bool:
    """Whether a prompt's metadata holds a spec (``include`` or ``exclude``, or a near miss of either, which
    :func:`check_spec` then names) rather than leaving the verifier to parse the caption."""
    return bool(meta) and any(key in ("include", "exclude") or difflib.get_close_matches(str(key), ("include", "exclude"), n=1, cutoff=0.8)
                              for key in meta)


def scene_spec(prompt: str, meta: Optional[dict[str, Any]]) -> Spec:
    """The spec a sample is checked against: its metadata when it holds ``include`` (checked by :func:`check_spec`;
    an ``exclude`` without one is refused), else the parsed prompt."""
    if carries_spec(meta):
        check_spec(meta)
        return meta
    return parse_prompt(prompt)


def _caption_tag(prompt: str) -> str:
    """The ShapesEval category of a caption of the grammar; ``"untagged"`` for a prompt outside it whose
    spec came from ``metadata["include"]``."""
    try:
        return parse_prompt(prompt)["tag"]
    except ValueError:
        return "untagged"


@register_reward("shapes")
class ShapesReward(Reward):

    """Rule-based GenEval-style verifier for the toy world's captions (binary score by default).

    The spec comes from ``metadata[i]["include"]`` (and ``"exclude"``, ``"tag"``) when present,
    otherwise the prompt is parsed with the caption grammar
    (:func:`flowalign.rewards.shapes_scenes.parse_prompt`).

    Args:
        device: where the score tensors go.
        min_area: components under this many pixels are noise.
        score: ``"binary"`` (1 when every constraint is met), ``"partial"`` (fraction met) or
            ``"mix"`` (``(1 - partial_weight) binary + partial_weight partial``; thresholded at
            0.5 it is the binary verdict). ``details`` always holds both.
        partial_weight: ``w`` of ``"mix"``, in ``(0, 0.5]``.
        exclusive: the partial fraction also counts "no unrequested object" (a shape, or a
            colour where the prompt names one, that no ``include`` entry asks for; shapeless
            blobs included). GenEval's verdict ignores extra objects, so a policy trained on it
            may learn to add them (every two-shape training caption of the toy world has a square,
            and alignment adds squares to held-out circle+triangle scenes); this prices them while
            ``details["binary"]`` (and ``score >= 0.5`` of ``"mix"``) stays GenEval's verdict.
        graded: a count constraint earns ``found / count`` of its share of the partial fraction
            (two of "three green triangles" scores 2/3 of it) instead of all or nothing.
    """

    # what evaluations, comparisons and checkpoints record of the scoring rules (Reward.version): "2" since 2026-12-06,
    # when touching shapes of one colour were split at the neck, the soft fill divided by the object's own colour
    # strength and the size limit became one side (bench/README.md); evaluations before it record none
    version = "2"

    differentiable = False

    def __init__(self, device: Optional[torch.device | str] = None, min_area: int = 10, score: str = "binary", partial_weight: float = 0.5,
                 exclusive: bool = False, graded: bool = False):
        super().__init__(device)
        if score not in SCORE_MODES:
            raise ConfigError(f"shapes reward score={score!r} is not one of {list(SCORE_MODES)}")
        if not 0.0 < partial_weight <= 0.5:
            raise ConfigError(f"shapes reward partial_weight={partial_weight} must be in (0, 0.5] (so score >= 0.5 stays the binary verdict)")
        self.min_area = min_area
        self.score_mode = score
        self.partial_weight = float(partial_weight)
        self.exclusive = bool(exclusive)
        self.graded = bool(graded)

    def check_prompts(self, prompts, metadata) -> None:
        """Every prompt needs an ``include`` spec in its metadata or a caption of the toy grammar
        (:func:`flowalign.rewards.shapes_scenes.parse_prompt`)."""
        if len(metadata) != len(prompts):
            raise ConfigError(f"shapes reward: {len(metadata)} metadata entries for {len(prompts)} prompts")
        bad, malformed = [], []
        for prompt, meta in zip(prompts, metadata):
            if carries_spec(meta):
                try:
                    check_spec(meta)
                except ValueError as exc:
                    malformed.append(f"{prompt!r}: {exc}")
                continue
            try:
                parse_prompt(prompt)
            except ValueError:
                bad.append(prompt)
        if malformed:
            raise ConfigError(f"{len(malformed)} of {len(prompts)} prompts carry a spec the shapes verifier cannot check; first: "
                              f"{malformed[0]}")
        if bad:
            raise ConfigError(f"{len(bad)} of {len(prompts)} prompts are outside the shapes caption grammar and carry no "
                              f"'include' spec: {_quote(bad)}")

    def score(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        if images.ndim != 4 or images.shape[1] != 3:
            raise RewardError(f"reward {self.name!r} scores images [B, 3, H, W], got shape {list(images.shape)}"
                              + (" (videos: score a frame, or use a reward that reads videos)" if images.ndim == 5 else ""), reward=self.name)
        if len(prompts) != images.shape[0]:
            raise RewardError(f"got {images.shape[0]} images but {len(prompts)} prompts", reward=self.name)
        arr = scene_pixels(images)
        scores, partial, tags, found, failures = [], [], [], [], []
        for i, prompt in enumerate(prompts):
            spec = scene_spec(prompt, metadata[i] if i < len(metadata) else None)
            objects = detect(arr[i], self.min_area)
            ok, frac = evaluate(objects, spec, exclusive=self.exclusive, graded=self.graded)
            scores.append(float(ok))
            partial.append(frac)
            tags.append(spec["tag"] if "tag" in spec else _caption_tag(prompt))
            found.append([{k: o[k] for k in ("shape", "color", "center", "area")} for o in objects])
            failures.append(failure_mode(objects, spec, verdict=ok))
        binary = torch.tensor(scores, dtype=torch.float32, device=self.device)  # [B]
        frac = torch.tensor(partial, dtype=torch.float32, device=self.device)  # [B]
        if self.score_mode == "partial":
            out = frac
        elif self.score_mode == "mix":
            out = (1.0 - self.partial_weight) * binary + self.partial_weight * frac
        else:
            out = binary
        return RewardOutput(scores=out, details={"partial": frac, "binary": binary, "tag": tags, "objects": found, "failure": failures})
