"""The toy world: scene specs, the caption grammar and the renderer (DESIGN.md §10).

A *scene* is a 32x32 RGB image on a plain light background holding 1-4 flat-coloured shapes
(circle, square, upright triangle) in one of six well-separated colours. A *spec* is what a
caption asks for, in GenEval's metadata format (Ghosh et al. 2023, arXiv:2310.11513) with
``shape`` in place of ``class``::

    {"prompt": "a circle left of a square", "tag": "position",
     "include": [{"shape": "square", "count": 1},
                 {"shape": "circle", "count": 1, "position": ["left of", 0]}],
     "exclude": []}

* ``include[i]`` asks for at least ``count`` objects of ``shape`` (of ``color`` when given).
* ``position: [rel, j]`` asks that those objects lie ``rel`` (``left of``, ``right of``,
  ``above``, ``below``) relative to the objects matched by ``include[j]`` (``j < i``).
* ``exclude[i]`` fails the scene when ``count`` or more such objects are present (counting
  prompts use it to ask for an exact number, as GenEval does).

Caption grammar (one category per GenEval tag; no prefix, to keep token sequences short)::

    single_object  a {shape}
    two_object     a {shape} and a {shape'}                  (shape != shape')
    counting       {two|three|four} [{color}] {shape}s
    colors         a {color} {shape}
    position       a {shape} {left of|right of|above|below} a {shape'}
    color_attr     a {color} {shape} and a {color'} {shape'}  (shape != shape')

Held-out split: a spec is *held out* when its caption names a colour-shape pair in
:data:`HELDOUT_COLOR_SHAPES` or names both shapes of a pair in :data:`HELDOUT_SHAPE_PAIRS`.
Training captions never do; scenes drawn for training never show two shapes of a held-out
pair together. (A scene for a colour-free caption such as ``a triangle`` may show any colour,
so the model sees a red triangle but never reads "red triangle": the held-out set tests
composition of words, GenEval-style.) ``single_object`` and colour-free ``counting`` have too
few captions to split, so they appear only in the training set.
"""
from __future__ import annotations

import json
import re
from itertools import permutations, product
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

SIZE = 32  # image side in pixels
SUPERSAMPLE = 4  # render at 4x and average, for anti-aliased edges
BACKGROUND = (238, 238, 238)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "cyan": (40, 195, 205),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
HELDOUT_TAGS: tuple[str, ...] = TAGS[1:]  # single_object has no held-out captions

HELDOUT_COLOR_SHAPES: frozenset[tuple[str, str]] = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "square")})
HELDOUT_SHAPE_PAIRS: frozenset[frozenset[str]] = frozenset({frozenset({"circle", "triangle"})})

Spec = dict[str, Any]


# ----------------------------------------------------------------------------- captions and specs


def _obj(shape: str, color: Optional[str] = None, count: int = 1, position: Optional[list] = None) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": shape, "count": count}
    if color is not None:
        out["color"] = color
    if position is not None:
        out["position"] = list(position)
    return out


def _noun(color: Optional[str], shape: str) -> str:
    return f"{color} {shape}" if color else shape


def make_spec(tag: str, shapes: Sequence[str], colors: Sequence[Optional[str]] = (None, None), count: int = 1, relation: Optional[str] = None) -> Spec:
    """Build the spec (caption + constraints) of one caption of category ``tag``.

    ``shapes``/``colors`` list the objects in caption order; ``count`` is for ``counting``;
    ``relation`` for ``position`` (the first shape is ``relation`` the second).
    """
    c0 = colors[0] if colors else None
    if tag == "single_object":
        return {"prompt": f"a {shapes[0]}", "tag": tag, "include": [_obj(shapes[0])], "exclude": []}
    if tag == "colors":
        if c0 is None:
            raise ValueError("a 'colors' spec needs a colour")
        return {"prompt": f"a {c0} {shapes[0]}", "tag": tag, "include": [_obj(shapes[0], c0)], "exclude": []}
    if tag == "counting":
        if count not in NUMBERS:
            raise ValueError(f"count must be one of {sorted(NUMBERS)}, got {count}")
        prompt = f"{NUMBERS[count]} {_noun(c0, shapes[0])}s"
        return {"prompt": prompt, "tag": tag, "include": [_obj(shapes[0], c0, count)], "exclude": [_obj(shapes[0], c0, count + 1)]}
    if tag in ("two_object", "color_attr"):
        if shapes[0] == shapes[1]:
            raise ValueError(f"{tag} needs two different shapes, got {shapes}")
        c1 = colors[1] if tag == "color_attr" else None
        c0 = c0 if tag == "color_attr" else None
        if tag == "color_attr" and (c0 is None or c1 is None):
            raise ValueError("a 'color_attr' spec needs two colours")
        prompt = f"a {_noun(c0, shapes[0])} and a {_noun(c1, shapes[1])}"
        return {"prompt": prompt, "tag": tag, "include": [_obj(shapes[0], c0), _obj(shapes[1], c1)], "exclude": []}
    if tag == "position":
        if relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
        if shapes[0] == shapes[1]:
            raise ValueError(f"position needs two different shapes, got {shapes}")
        # GenEval order: the anchor (second in the caption) is include[0].
        include = [_obj(shapes[1]), _obj(shapes[0], position=[relation, 0])]
        return {"prompt": f"a {shapes[0]} {relation} a {shapes[1]}", "tag": tag, "include": include, "exclude": []}
    raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")


def all_specs(tag: str) -> list[Spec]:
    """Every distinct spec of category ``tag`` the grammar can produce, in a fixed order."""
    if tag == "single_object":
        return [make_spec(tag, [s]) for s in SHAPES]
    if tag == "colors":
        return [make_spec(tag, [s], [c]) for c, s in product(COLORS, SHAPES)]
    if tag == "counting":
        return [make_spec(tag, [s], [c], count=n) for n, c, s in product(NUMBERS, (None,) + COLORS, SHAPES)]
    if tag == "two_object":
        return [make_spec(tag, list(p)) for p in permutations(SHAPES, 2)]
    if tag == "position":
        return [make_spec(tag, list(p), relation=r) for p, r in product(permutations(SHAPES, 2), RELATIONS)]
    if tag == "color_attr":
        return [make_spec(tag, list(p), [c0, c1]) for p in permutations(SHAPES, 2) for c0, c1 in product(COLORS, COLORS)]
    raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")


def is_heldout(spec: Spec) -> bool:
    """True when the spec's caption names a held-out colour-shape pair or shape pair."""
    objs = spec["include"]
    if any((o.get("color"), o["shape"]) in HELDOUT_COLOR_SHAPES for o in objs):
        return True
    shapes = frozenset(o["shape"] for o in objs)
    return len(objs) >= 2 and shapes in HELDOUT_SHAPE_PAIRS


def split_specs(tag: str, heldout: bool) -> list[Spec]:
    """The training (``heldout=False``) or held-out specs of category ``tag``."""
    return [s for s in all_specs(tag) if is_heldout(s) == heldout]


_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_REL_RE = "|".join(RELATIONS)
_NUM_RE = "|".join(NUMBERS.values())
_OBJ = rf"(?:({_COLOR_RE}) )?({_SHAPE_RE})"
_PATTERNS = [
    ("counting", re.compile(rf"^({_NUM_RE}) (?:({_COLOR_RE}) )?({_SHAPE_RE})s$")),
    ("position", re.compile(rf"^an? ({_SHAPE_RE}) ({_REL_RE}) an? ({_SHAPE_RE})$")),
    ("pair", re.compile(rf"^an? {_OBJ} and an? {_OBJ}$")),
    ("one", re.compile(rf"^an? {_OBJ}$")),
]


def parse_prompt(prompt: str) -> Spec:
    """Parse a caption of the grammar back into its spec (inverse of :func:`make_spec`).

    Raises ``ValueError`` naming the prompt when it is not in the grammar.
    """
    text = " ".join(prompt.strip().lower().rstrip(".").split())
    text = re.sub(r"^(a photo of |an image of )", "", text)
    for kind, pattern in _PATTERNS:
        m = pattern.match(text)
        if not m:
            continue
        g = m.groups()
        if kind == "counting":
            count = {v: k for k, v in NUMBERS.items()}[g[0]]
            return make_spec("counting", [g[2]], [g[1]], count=count)
        if kind == "position":
            return make_spec("position", [g[0], g[2]], relation=g[1])
        if kind == "pair":
            tag = "color_attr" if g[0] and g[2] else "two_object"
            if bool(g[0]) != bool(g[2]):
                break
            return make_spec(tag, [g[1], g[3]], [g[0], g[2]])
        return make_spec("colors" if g[0] else "single_object", [g[1]], [g[0]])
    raise ValueError(f"prompt {prompt!r} is not in the shapes caption grammar (see flowalign.rewards.shapes_scenes)")


# ----------------------------------------------------------------------------- scenes


def _objects_to_draw(spec: Spec, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Concrete objects (shape, colour) for a spec; unspecified colours are drawn at random."""
    objs = []
    for inc in spec["include"]:
        for _ in range(inc["count"]):
            color = inc.get("color") or COLORS[rng.integers(len(COLORS))]
            objs.append({"shape": inc["shape"], "color": color})
    return objs


def _relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float], min_gap: float) -> bool:
    """Centre ``a`` lies clearly ``rel`` centre ``b`` (dominant axis, at least ``min_gap`` apart)."""
    dx, dy = a[0] - b[0], a[1] - b[1]  # image coordinates: y grows downwards
    main, other = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[rel]
    return main >= min_gap and abs(other) <= 0.5 * main


def layout(spec: Spec, rng: np.random.Generator, max_tries: int = 2000) -> list[dict[str, Any]]:
    """Random non-overlapping placement of the spec's objects.

    Returns ``[{"shape", "color", "size", "center": (x, y)}]`` in pixels; each object's
    bounding box is ``size`` wide, boxes keep a 2-pixel gap and a 1-pixel margin, and a
    ``position`` constraint holds with a clear margin.
    """
    objs = _objects_to_draw(spec, rng)
    n = len(objs)
    lo, hi = (9.0, 13.0) if n <= 2 else (7.0, 10.0)
    rels = [(i, inc["position"]) for i, inc in enumerate(spec["include"]) if "position" in inc]
    for _ in range(max_tries):
        placed: list[dict[str, Any]] = []
        ok = True
        for o in objs:
            size = float(rng.uniform(lo, hi))
            half = size / 2
            for _ in range(50):
                c = (float(rng.uniform(1 + half, SIZE - 1 - half)), float(rng.uniform(1 + half, SIZE - 1 - half)))
                if all(max(abs(c[0] - p["center"][0]), abs(c[1] - p["center"][1])) >= half + p["size"] / 2 + 2 for p in placed):
                    placed.append({**o, "size": size, "center": c})
                    break
            else:
                ok = False
                break
        if not ok:
            continue
        # position specs have one object per include entry, so entry i is placed object i
        if all(_relation_holds(rel, placed[i]["center"], placed[j]["center"], 0.5 * (placed[i]["size"] + placed[j]["size"]) + 1) for i, (rel, j) in rels):
            return placed
    raise RuntimeError(f"could not lay out {spec['prompt']!r} in {max_tries} tries")


def _shape_mask(shape: str, center: tuple[float, float], size: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    cx, cy = center
    half = size / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        h = 0.88 * half  # a slightly smaller square has about the area of the circle
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    if shape == "triangle":
        top, bottom = cy - half, cy + half
        return (ys <= bottom) & (np.abs(xs - cx) <= (ys - top) * 0.5) & (ys >= top)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(objects: Sequence[dict[str, Any]]) -> np.ndarray:
    """Draw placed objects (from :func:`layout`) as a ``uint8 [32, 32, 3]`` image, anti-aliased."""
    n = SIZE * SUPERSAMPLE
    grid = (np.arange(n) + 0.5) / SUPERSAMPLE
    xs, ys = np.meshgrid(grid, grid)  # [n, n] pixel-unit coordinates, y down
    img = np.empty((n, n, 3), np.float32)
    img[:] = BACKGROUND
    for o in objects:
        img[_shape_mask(o["shape"], o["center"], o["size"], xs, ys)] = PALETTE[o["color"]]
    img = img.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_spec(spec: Spec, rng: np.random.Generator) -> np.ndarray:
    """A random ground-truth scene for ``spec`` (``uint8 [32, 32, 3]``)."""
    return render(layout(spec, rng))


# ----------------------------------------------------------------------------- prompt sets


def sample_specs(rng: np.random.Generator, n: int, heldout: Optional[bool] = False, tags: Optional[Sequence[str]] = None) -> list[Spec]:
    """``n`` specs, categories uniform over ``tags``, each spec uniform within its category.

    With ``heldout=False`` only training specs are drawn (the base model's training data), with
    ``True`` only held-out ones, with ``None`` every spec of the grammar.
    """
    tags = tuple(tags) if tags is not None else (HELDOUT_TAGS if heldout else TAGS)
    pools = {t: all_specs(t) if heldout is None else split_specs(t, heldout) for t in tags}
    for t, pool in pools.items():
        if not pool:
            raise ValueError(f"category {t!r} has no {'held-out' if heldout else 'training'} specs")
    out = []
    for _ in range(n):
        pool = pools[tags[rng.integers(len(tags))]]
        out.append(pool[rng.integers(len(pool))])
    return out


def training_scenes(seed: int, n: int, include_heldout: bool = False) -> tuple[np.ndarray, list[Spec]]:
    """``n`` training scenes ``uint8 [n, 32, 32, 3]`` and their specs, deterministic in ``seed``.

    With ``include_heldout`` the specs are drawn from every caption of the grammar (categories
    uniform, captions uniform within a category), held-out ones included: pretraining data for
    a base model that, like a real one, has seen every combination, so that the held-out prompt
    set measures how reward alignment on the training prompts transfers to unseen prompts.
    """
    rng = np.random.default_rng(seed)
    specs = sample_specs(rng, n, heldout=None if include_heldout else False, tags=TAGS)
    images = np.stack([render_spec(s, rng) for s in specs])
    return images, specs


def prompt_set(heldout: bool, per_tag: int = 64, seed: int = 0) -> list[Spec]:
    """A balanced prompt set: ``per_tag`` lines per category, cycling through its specs in a
    seeded random order (small categories repeat their captions)."""
    rng = np.random.default_rng(seed + (1 if heldout else 0))
    out = []
    for tag in (HELDOUT_TAGS if heldout else TAGS):
        pool = split_specs(tag, heldout)
        order = rng.permutation(len(pool))
        out += [pool[order[i % len(pool)]] for i in range(per_tag)]
    return out


# ----------------------------------------------------------------------------- caption noise


def _caption_words(prompt: str) -> list[str]:
    """Caption words with each relation as one word (``left of`` -> ``left_of``)."""
    for rel in RELATIONS:
        prompt = prompt.replace(rel, rel.replace(" ", "_"))
    return prompt.split()


def _constraints(spec: Spec) -> str:
    """What a spec asks of a scene, independent of caption word order."""
    return json.dumps([sorted(json.dumps(o, sort_keys=True) for o in spec[k]) for k in ("include", "exclude")])


def caption_neighbors(spec: Spec) -> list[Spec]:
    """The training specs of ``spec``'s category whose caption gets *one attribute* wrong.

    A neighbour's caption has the same words but one (a shape, a colour, a number or a
    relation), or the same words with two of them swapped (``a red circle and a blue square``
    -> ``a blue circle and a red square``: the attribute-binding error; ``a circle left of a
    square`` -> ``a square left of a circle``: the flipped relation). Each distinct constraint
    set is listed once; neighbours that ask the same of a scene as ``spec`` (``a circle and a
    square`` / ``a square and a circle``) and held-out specs are excluded, so a noisy training
    caption never names a held-out combination.
    """
    words = _caption_words(spec["prompt"])
    seen = {_constraints(spec)}
    out = []
    for cand in split_specs(spec["tag"], heldout=False):
        cw, asks = _caption_words(cand["prompt"]), _constraints(cand)
        if len(cw) != len(words) or asks in seen:
            continue
        diff = [i for i, (a, b) in enumerate(zip(words, cw)) if a != b]
        if len(diff) == 1 or (len(diff) == 2 and sorted(words) == sorted(cw)):
            seen.add(asks)
            out.append(cand)
    return out


def noisy_captions(specs: Sequence[Spec], noise: float, seed: int) -> tuple[list[str], int]:
    """Training captions with web-alt-text-like noise: each caption is, with probability
    ``noise``, replaced by a uniformly drawn :func:`caption_neighbors` caption (one attribute
    wrong). Deterministic in ``seed``; returns the captions and how many were replaced.

    A model pretrained on such pairs draws, for a caption, the right scene or a near miss, the
    imperfection reward alignment is meant to remove (DESIGN.md §10).
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"caption noise must be in [0, 1], got {noise}")
    captions = [s["prompt"] for s in specs]
    if noise == 0.0:
        return captions, 0
    rng = np.random.default_rng(seed)
    cache: dict[str, list[Spec]] = {}
    replaced = 0
    for i, spec in enumerate(specs):
        if rng.random() >= noise:
            continue
        if spec["prompt"] not in cache:
            cache[spec["prompt"]] = caption_neighbors(spec)
        pool = cache[spec["prompt"]]
        if pool:
            captions[i] = pool[rng.integers(len(pool))]["prompt"]
            replaced += 1
    return captions, replaced


def _chosen_scenes(images: np.ndarray, fraction: float, defect: str, rng: np.random.Generator) -> np.ndarray:
    """The boolean mask of the scenes a pretraining defect touches (each with probability ``fraction``, drawn
    from ``rng``), after checking the fraction and that ``images`` are ``[N, H, W, 3]``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{defect} fraction must be in [0, 1], got {fraction}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got shape {tuple(images.shape)}")
    return rng.random(len(images)) < fraction


def washed_renditions(images: np.ndarray, fraction: float, alpha: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scenes of which a random ``fraction`` is washed out: each pixel ``p`` of a chosen scene
    becomes ``b + alpha (p - b)`` (``b`` the background), rounded to ``uint8``.

    Web images come in poor renditions (faded scans, low-contrast thumbnails) under the same
    captions as good ones, and a model pretrained on them draws either. The ``shapes`` verifier
    counts a pixel as an object only where its coverage is at least 0.5, so a scene washed to
    ``alpha`` = 0.25 holds no objects for it: a defect that is the same for every caption, which
    reward alignment on the training captions can remove for the held-out ones too
    (DESIGN.md §10). Deterministic in ``seed``; returns the images (a new array) and the boolean
    mask of the washed ones.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"washed alpha must be in [0, 1], got {alpha}")
    washed = _chosen_scenes(images, fraction, "washed", np.random.default_rng(seed))
    out = images.astype(np.float32)
    b = np.asarray(BACKGROUND, np.float32)
    out[washed] = b + alpha * (out[washed] - b)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), washed


def split_renditions(images: np.ndarray, fraction: float, width: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scenes of which a random ``fraction`` has every object cut in two: a straight band of
    background colour, ``width`` pixels wide and anti-aliased, crosses each object (a 4-connected
    component of non-background pixels, its anti-aliased edge included) through its centroid at a random
    angle, and stops at the object's edge (it cuts no other object).

    Torn or scratched scans come under the same captions as intact ones, and a model pretrained
    on them draws either. The cut leaves two halves that the ``shapes`` verifier sees as wrong
    shapes or too many objects (measured: 87% of cut ground-truth training scenes fail at
    ``width`` 1.5). Unlike :func:`washed_renditions` the cut keeps every colour at full
    contrast, so a cut scene says as much about its caption as an intact one, and classifier-free
    guidance has no reason to prefer the intact rendition: a defect the same for every caption that
    reward alignment on the training captions can remove for the held-out ones too (DESIGN.md
    §10). Deterministic in ``seed``; returns the images (a new array) and the boolean mask of the
    cut ones.
    """
    from scipy import ndimage

    if not width > 0.0:
        raise ValueError(f"split width must be positive, got {width}")
    rng = np.random.default_rng(seed)
    cut = _chosen_scenes(images, fraction, "split", rng)
    b = np.asarray(BACKGROUND, np.float32)
    out = images.copy()
    ys, xs = np.mgrid[0 : images.shape[1], 0 : images.shape[2]] + 0.5  # pixel centres
    for i in np.flatnonzero(cut):
        image = images[i].astype(np.float32)
        components, n = ndimage.label(np.abs(image - b).sum(-1) > 0)
        for k in range(1, n + 1):
            cy, cx = np.argwhere(components == k).mean(0) + 0.5
            angle = rng.uniform(0.0, np.pi)
            distance = np.abs((xs - cx) * np.sin(angle) - (ys - cy) * np.cos(angle))
            coverage = np.clip(width / 2 + 0.5 - distance, 0.0, 1.0)  # 1 inside the band, linear over its edge pixel
            coverage = np.where(components == k, coverage, 0.0)[..., None]  # this object only: a band cuts no other
            image = image * (1 - coverage) + b * coverage
        out[i] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return out, cut


WATERMARK_GRAY = 110  # the watermark's ink (unexplained by any palette colour, so the verifier sees it)


def watermark_coverage(size: int = SIZE, period: float = 10.0, width: float = 2.0) -> np.ndarray:
    """Coverage ``[size, size]`` in 0..1 of the toy's watermark: diagonal stripes (along ``x + y``)
    ``width`` pixels wide every ``period`` pixels of ``x + y``, anti-aliased over one pixel; the
    same pattern in every watermarked scene, as a stock-photo site stamps every image alike."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    phase = (xs + ys) % period
    distance = np.minimum(phase, period - phase) / np.sqrt(2.0)  # pixel centre to the nearest stripe's centre line
    return np.clip(width / 2 + 0.5 - distance, 0.0, 1.0)


def watermarked_renditions(images: np.ndarray, fraction: float, opacity: float, seed: int, period: float = 10.0,
                           width: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Scenes of which a random ``fraction`` carries a watermark: each pixel ``p`` becomes
    ``p (1 - o c) + g o c`` with ``c`` = :func:`watermark_coverage`, ``o`` = ``opacity`` and the
    ink ``g`` = :data:`WATERMARK_GRAY`.

    Web images come stamped with stock-photo watermarks under the same captions as clean ones,
    and a model pretrained on them draws the stamp too. The stripes cross every object, and the
    ``shapes`` verifier does not count a shape cut by unexplained ink (measured on 300 training
    scenes: 90% of stamped scenes fail at opacity 0.7, 77% after the toy VAE's round trip). The
    stamp keeps every colour and shape, so a stamped scene says as much about its caption as a
    clean one and classifier-free guidance has no reason to prefer either: a defect the same
    for every caption that reward alignment on the training captions can remove for the held-out
    ones too (DESIGN.md §10). Deterministic in ``seed``; returns the images (a new array) and the
    boolean mask of the stamped ones.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"watermark opacity must be in [0, 1], got {opacity}")
    stamped = _chosen_scenes(images, fraction, "watermark", np.random.default_rng(seed))
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"expected square uint8 images [N, H, H, 3], got shape {tuple(images.shape)}")
    c = (opacity * watermark_coverage(images.shape[1], period, width))[..., None]
    out = images.copy()
    out[stamped] = np.clip(np.rint(images[stamped].astype(np.float32) * (1 - c) + np.float32(WATERMARK_GRAY) * c), 0, 255).astype(np.uint8)
    return out, stamped


def parse_color_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """``"blue:cyan,red:purple"`` -> ``(("blue", "cyan"), ("red", "purple"))``, checked: known,
    distinct colours, each in at most one pair. The empty string gives ``()``."""
    pairs: list[tuple[str, str]] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split(":")
        if len(parts) != 2:
            raise ValueError(f"colour pair {item!r} is not of the form colour:colour")
        a, b = parts[0].strip(), parts[1].strip()
        pairs.append((a, b))
    used: list[str] = [c for pair in pairs for c in pair]
    unknown = sorted(set(used) - set(COLORS))
    if unknown:
        raise ValueError(f"unknown colour(s) {unknown}; expected some of {COLORS}")
    if len(used) != len(set(used)):
        raise ValueError(f"each colour may be in one pair only, got {pairs}")
    return tuple(pairs)


def synonym_captions(captions: Sequence[str], pairs: Sequence[tuple[str, str]], rate: float, seed: int) -> tuple[list[str], int]:
    """Captions in which each colour of a pair is named by its partner with probability ``rate``.

    Web alt-text names neighbouring hues loosely ("blue" for a teal object, "red" for a
    magenta one), and a model pretrained on it draws either hue for either word. At
    ``rate = 0.5`` the two words of a pair mean the same thing in the data, so classifier-free
    guidance, which sharpens ``p(image | caption)`` towards its majority reading, cannot tell
    them apart either; a reward that checks the colour can in principle (DESIGN.md §10).
    Uniform caption noise (:func:`noisy_captions`) leaves the majority reading right, and
    guidance already removes it. Measured on the toy (bench/README.md), the co-trained text
    encoders give the two words of a pair near-identical features, and RL did not separate
    them within 50 iterations, with LoRA on the transformer alone or on the text encoders too.

    Each colour word of a caption that is in a pair is swapped independently; a swap that would
    make the caption name a held-out combination is not made, so no held-out caption is ever
    read. Deterministic in ``seed``; returns the captions and how many of them changed.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"synonym rate must be in [0, 1], got {rate}")
    partner = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    out = list(captions)
    if not partner or rate == 0.0:
        return out, 0
    rng = np.random.default_rng(seed)
    changed = 0
    for i, caption in enumerate(captions):
        words = caption.split(" ")
        for k, w in enumerate(words):
            if w in partner and rng.random() < rate:
                trial = words[:k] + [partner[w]] + words[k + 1:]
                if not is_heldout(parse_prompt(" ".join(trial))):
                    words = trial
        out[i] = " ".join(words)
        changed += out[i] != caption
    return out, changed


def uncaptioned_heldout(specs: Sequence[Spec], captions: Sequence[str]) -> list[str]:
    """``captions`` with every held-out spec's caption replaced by ``""`` (the unconditional caption).

    Pretraining on such pairs shows the base model every scene of the world (a circle beside a
    triangle, a red triangle) while no held-out caption is ever read, as a web-trained model has
    seen most scenes but not every phrasing of them: the held-out prompts then test how the
    caption words compose, not whether the scene was ever drawn.
    """
    if len(specs) != len(captions):
        raise ValueError(f"got {len(specs)} specs but {len(captions)} captions")
    return ["" if is_heldout(spec) else caption for spec, caption in zip(specs, captions)]


def write_jsonl(specs: Sequence[Spec], path: Union[str, Path]) -> Path:
    """Write specs one JSON object a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(s) + "\n" for s in specs), encoding="utf-8")
    return path


def read_jsonl(path: Union[str, Path]) -> list[Spec]:
    """Read a prompt file written by :func:`write_jsonl`."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def prompts_dir() -> Path:
    """``flowalign/assets/prompts`` (the repository's ``assets/prompts``)."""
    import flowalign.assets

    return Path(flowalign.assets.__file__).resolve().parent / "prompts"


def load_prompts(split: str = "train") -> list[Spec]:
    """The shipped prompt set ``assets/prompts/shapes_{split}.jsonl`` (``train`` or ``heldout``)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return read_jsonl(prompts_dir() / f"shapes_{split}.jsonl")


if __name__ == "__main__":  # regenerate the shipped prompt files
    write_jsonl(prompt_set(False), prompts_dir() / "shapes_train.jsonl")
    write_jsonl(prompt_set(True), prompts_dir() / "shapes_heldout.jsonl")
