"""Procedural shapes scenes with GenEval-style captions and exact ground truth (DESIGN "Built-in data").

A scene is a JSON-serialisable meta dict; the image and the caption are pure functions of it:

    {"category": "position",
     "objects": [{"shape": "triangle", "color": "green", "center": [0.3, 0.52], "size": 0.28,
                  "bbox": [0.16, 0.38, 0.44, 0.66]}, ...],
     "relation": "left"}                     # position scenes only: objects[0] <relation> objects[1]

Coordinates are fractions of the image side (x right, y down), so one meta renders at any resolution.
Objects are drawn without anti-aliasing in exact PALETTE colours on a plain BACKGROUND and never touch
(at least one background pixel between any two boxes at resolution >= 32), so a detector can read a render
exactly: colour -> object pixels, connected components -> objects, fill ratio of the box -> shape.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

# Six colours far apart in RGB (min pairwise distance ~130) and from the white background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "yellow": (235, 200, 20),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (160, 40, 190),
    "black": (30, 30, 30),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Fraction of its bounding box a shape fills (what a detector measures).
FILL_RATIO: dict[str, float] = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# relation key -> caption phrase; objects[0] <phrase> objects[1]
RELATIONS: dict[str, str] = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
NUMBERS: dict[int, str] = {2: "two", 3: "three", 4: "four"}

GAP = 0.08      # min distance between object boxes: >= 2.56 px at 32 px, so >= 1 px after rounding
MARGIN = 0.04   # min distance from a box to the image border
# Object side (fraction of the image) by number of objects: big enough to read at 32 px (>= 7 px).
SIZE_RANGE: dict[int, tuple[float, float]] = {1: (0.30, 0.50), 2: (0.24, 0.36), 3: (0.22, 0.30), 4: (0.22, 0.28)}


def _uniform(rng, lo: float, hi: float) -> float:
    """A float in [lo, hi) from a random.Random or a numpy Generator (both have .random())."""
    return lo + (hi - lo) * float(rng.random())


def _choice(rng, seq):
    """One element of seq, uniformly."""
    return seq[min(int(float(rng.random()) * len(seq)), len(seq) - 1)]


def _box(center: tuple[float, float], size: float) -> list[float]:
    """Normalised [x0, y0, x1, y1] of a square of side size around center."""
    x, y = center
    return [x - size / 2, y - size / 2, x + size / 2, y + size / 2]


def _apart(a: list[float], b: list[float], gap: float = GAP) -> bool:
    """True when boxes a and b are separated by at least gap along x or y."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def relation_of(a_center, b_center) -> str:
    """Where a lies relative to b along the dominant axis: 'left', 'right', 'above' or 'below' (y down)."""
    dx, dy = a_center[0] - b_center[0], a_center[1] - b_center[1]
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _obj(shape: str, color: str, center: tuple[float, float], size: float) -> dict:
    """One object record, rounded so metas compare and serialise exactly."""
    center = [round(center[0], 4), round(center[1], 4)]
    size = round(size, 4)
    return {"shape": shape, "color": color, "center": center, "size": size,
            "bbox": [round(v, 4) for v in _box(center, size)]}


def _place(rng, sizes: list[float], relation: str | None = None, tries: int = 200):
    """Centres for objects of the given sizes, boxes pairwise apart; None when rejection sampling fails.

    With a relation (two objects), objects[0] is placed <relation> objects[1] with the boxes separated along
    that axis and an off-axis offset of at most half the on-axis distance, so relation_of() agrees clearly.
    """
    centers: list[tuple[float, float]] = []
    for i, s in enumerate(sizes):
        lo, hi = s / 2 + MARGIN, 1 - s / 2 - MARGIN
        for _ in range(tries):
            c = (_uniform(rng, lo, hi), _uniform(rng, lo, hi))
            if all(_apart(_box(c, s), _box(p, sizes[j])) for j, p in enumerate(centers)):
                if relation is None or i == 0 or _clear_relation(c, centers[0], s, sizes[0], relation):
                    centers.append(c)
                    break
        else:
            return None
    if relation is not None:
        centers.reverse()  # placed the reference first; objects[0] is the subject
    return centers


def _clear_relation(a, b, sa: float, sb: float, relation: str) -> bool:
    """True when subject centre a (size sa) is unambiguously <relation> reference centre b (size sb)."""
    axis = 0 if relation in ("left", "right") else 1
    sign = -1 if relation in ("left", "above") else 1
    along = sign * (a[axis] - b[axis])
    across = abs(a[1 - axis] - b[1 - axis])
    return along >= (sa + sb) / 2 + GAP and across <= along / 2


def _sizes(rng, n: int) -> list[float]:
    """Object sides for an n-object scene."""
    lo, hi = SIZE_RANGE[n]
    return [_uniform(rng, lo, hi) for _ in range(n)]


def sample_meta(rng, category: str | None = None) -> dict:
    """A random scene of the given category (uniform over CATEGORIES when None).

    rng: random.Random or numpy.random.Generator (only .random() is used), so a scene is a pure function of the seed.
    """
    if category is None:
        category = _choice(rng, CATEGORIES)
    if category not in CATEGORIES:
        raise ValueError(f"unknown shapes category {category!r}; expected one of {CATEGORIES}")
    colors = tuple(PALETTE)
    while True:  # resample the whole scene on the (rare) placement failure
        relation = None
        if category in ("single_object", "colors"):
            specs = [(_choice(rng, SHAPES), _choice(rng, colors))]
        elif category == "two_object":  # two different shapes, any colours
            s1 = _choice(rng, SHAPES)
            specs = [(s1, _choice(rng, colors)), (_choice(rng, [s for s in SHAPES if s != s1]), _choice(rng, colors))]
        elif category == "color_attr":  # two different shapes in two different colours
            s1, c1 = _choice(rng, SHAPES), _choice(rng, colors)
            s2 = _choice(rng, [s for s in SHAPES if s != s1])
            specs = [(s1, c1), (s2, _choice(rng, [c for c in colors if c != c1]))]
        elif category == "counting":  # 2-4 identical-looking objects
            n = 2 + min(int(float(rng.random()) * 3), 2)
            spec = (_choice(rng, SHAPES), _choice(rng, colors))
            specs = [spec] * n
        else:  # position: two objects differing in shape or colour, in a clear relation
            relation = _choice(rng, tuple(RELATIONS))
            first = (_choice(rng, SHAPES), _choice(rng, colors))
            while True:
                second = (_choice(rng, SHAPES), _choice(rng, colors))
                if second != first:
                    break
            specs = [first, second]
        sizes = _sizes(rng, len(specs))
        if relation is not None:  # _place puts the reference (objects[1]) first
            centers = _place(rng, sizes[::-1], relation)
        else:
            centers = _place(rng, sizes)
        if centers is not None:
            break
    objects = [_obj(shape, color, c, s) for (shape, color), c, s in zip(specs, centers, sizes)]
    meta = {"category": category, "objects": objects}
    if relation is not None:
        meta["relation"] = relation
    return meta


def _article(word: str) -> str:
    """'a' or 'an' before word."""
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: dict) -> str:
    """'a red circle'."""
    return f"{_article(obj['color'])} {obj['color']} {obj['shape']}"


def caption_for(meta: dict) -> str:
    """The caption of a scene, one fixed template per category.

    single_object, colors: "a red circle";  two_object, color_attr: "a red circle and a blue square";
    counting: "three green triangles";  position: "a green triangle to the left of a yellow circle".
    The categories sharing a template differ in their scenes (color_attr forces two colours) and in what an
    evaluation checks (shape, colour, binding), as in GenEval.
    """
    category, objects = meta["category"], meta["objects"]
    if category in ("single_object", "colors"):
        return _phrase(objects[0])
    if category in ("two_object", "color_attr"):
        return f"{_phrase(objects[0])} and {_phrase(objects[1])}"
    if category == "counting":
        o = objects[0]
        return f"{NUMBERS[len(objects)]} {o['color']} {o['shape']}s"
    if category == "position":
        return f"{_phrase(objects[0])} {RELATIONS[meta['relation']]} {_phrase(objects[1])}"
    raise ValueError(f"unknown shapes category {category!r} in meta; expected one of {CATEGORIES}")


def pixel_box(obj: dict, resolution: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box (left, top, right, bottom) of an object at a resolution, as render_scene draws it."""
    side = max(3, round(obj["size"] * resolution))
    left = min(max(round(obj["center"][0] * resolution - side / 2), 0), resolution - side)
    top = min(max(round(obj["center"][1] * resolution - side / 2), 0), resolution - side)
    return left, top, left + side - 1, top + side - 1


def render_scene(meta: dict, resolution: int) -> Image.Image:
    """The scene as an RGB PIL image: aliased drawing, exact PALETTE colours on BACKGROUND."""
    image = Image.new("RGB", (resolution, resolution), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in meta["objects"]:
        l, t, r, b = pixel_box(obj, resolution)
        fill = PALETTE[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((l, t, r, b), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((l, t, r, b), fill=fill)
        elif obj["shape"] == "triangle":  # apex up, base on the box bottom
            draw.polygon(((l + r) / 2, t, l, b, r, b), fill=fill)
        else:
            raise ValueError(f"unknown shape {obj['shape']!r}; expected one of {SHAPES}")
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float [3, H, W] in [-1, 1]."""
    array = np.array(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def eval_prompts(n_per_category: int, seed: int = 0, categories=CATEGORIES) -> list[dict]:
    """n_per_category scene metas per category (category-major), distinct captions while the category has them."""
    metas = []
    for category in categories:
        seen: set[str] = set()
        for i in range(n_per_category):
            for attempt in range(64):  # prefer an unseen caption; small categories repeat once exhausted
                meta = sample_meta(random.Random(f"shapes-eval/{seed}/{category}/{i}/{attempt}"), category)
                if caption_for(meta) not in seen:
                    break
            seen.add(caption_for(meta))
            metas.append(meta)
    return metas


def _cumulative(categories: tuple[str, ...], weights: dict, option: str = "category_weights"
                ) -> list[tuple[str, float]]:
    """(category, upper edge in [0, 1]) for a weighted draw; categories missing from weights weigh 1."""
    unknown = sorted(set(weights) - set(categories))
    if unknown:
        raise ValueError(f"data option '{option}': unknown or unused categories {unknown}; expected some of "
                         f"{list(categories)}")
    w = [weights.get(c, 1.0) for c in categories]
    if not all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"data option '{option}': expected weights >= 0 with a positive sum, got {weights}")
    total, edges, acc = sum(w), [], 0.0
    for c, x in zip(categories, w):
        acc += x / total
        if x > 0:  # (a dropped category is never the fallback of a draw past the last edge's rounding)
            edges.append((c, acc))
    return edges


def _stages(categories: tuple[str, ...], curriculum) -> list[tuple[float, list[tuple[str, float]]]]:
    """(first scene index past the stage, cumulative edges) per curriculum stage; the last stage runs to the end.

    A stage is {scenes: N, categories: [...], category_weights: {...}}: the next N training scenes drawn from its
    categories (default: all of the data set's) with its weights (default 1)."""
    if not isinstance(curriculum, (list, tuple)) or not curriculum:
        raise ValueError(f"data option 'curriculum': expected a list of stages ({{scenes: N, categories: [...], "
                         f"category_weights: {{...}}}}), got {curriculum!r}")
    stages, end = [], 0
    for k, stage in enumerate(curriculum):
        where = f"data option 'curriculum' stage {k}"
        extra = sorted(set(stage) - {"scenes", "categories", "category_weights"}) if isinstance(stage, dict) else None
        if extra is None or extra:
            hint = " ('steps' is converted to scenes by rectflow train)" if extra and "steps" in extra else ""
            raise ValueError(f"{where}: expected a dict of scenes, categories, category_weights, got {stage!r}{hint}")
        last = k == len(curriculum) - 1
        scenes = stage.get("scenes")
        if not last and not (isinstance(scenes, int) and not isinstance(scenes, bool) and scenes > 0):
            raise ValueError(f"{where}: expected 'scenes' a positive integer (only the last stage may omit it), got "
                             f"{scenes!r}")
        cats = tuple(stage.get("categories") or categories)
        unknown = [c for c in cats if c not in categories]
        if unknown:
            raise ValueError(f"{where}: unknown or unused categories {unknown}; expected some of {list(categories)}")
        weights = {c: 0.0 for c in categories if c not in cats} | dict(stage.get("category_weights") or {})
        end = math.inf if last else end + scenes
        stages.append((end, _cumulative(categories, weights, f"curriculum' stage {k} 'category_weights")))
    return stages


class ShapesDataset(torch.utils.data.Dataset):
    """Endless seeded shapes scenes (train) or a fixed validation set (val).

    Item i is a pure function of (seed, split, i). The validation split does not depend on seed, so runs with
    different seeds are compared on the same scenes; its streams never share a key with the training stream.
    category_weights ({category: weight}, missing ones 1) skews the training stream's categories, e.g. toward the
    position scenes, whose relation a model trained on the uniform mix learns last. curriculum (a list of stages,
    rectflow.data.shapes._stages) changes the mix along the stream, e.g. position scenes alone first: a model that
    learns the other categories first never learns which side is which (docs/results/speedups.md).
    """

    TRAIN_SIZE = 10**9  # virtual length of the endless training stream

    def __init__(self, resolution: int = 32, split: str = "train", seed: int = 0, categories=None,
                 val_size: int = 1000, category_weights: dict | None = None, curriculum: list | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"shapes split must be 'train' or 'val', got {split!r}")
        self.categories = tuple(categories) if categories else CATEGORIES
        unknown = [c for c in self.categories if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"unknown shapes categories {unknown}; expected a subset of {CATEGORIES}")
        self.resolution, self.split, self.seed, self.val_size = resolution, split, seed, val_size
        # the training stream only: validation scenes (and so validation losses, FID references) stay comparable
        if category_weights and curriculum:
            raise ValueError("data options 'category_weights' and 'curriculum' exclude each other: give the weights "
                             "in the curriculum's stages")
        self.stages = None
        if split == "train" and curriculum:
            self.stages = _stages(self.categories, curriculum)
        elif split == "train" and category_weights:
            self.stages = [(math.inf, _cumulative(self.categories, category_weights))]

    def __len__(self) -> int:
        return self.TRAIN_SIZE if self.split == "train" else self.val_size

    def meta(self, index: int) -> dict:
        """The scene meta of item index."""
        if not 0 <= index < len(self):
            raise IndexError(f"shapes {self.split} index {index} out of range [0, {len(self)})")
        key = f"shapes-train/{self.seed}/{index}" if self.split == "train" else f"shapes-val/{index}"
        rng = random.Random(key)
        if self.stages is None:
            return sample_meta(rng, _choice(rng, self.categories))
        edges = next(edges for end, edges in self.stages if index < end)
        u = float(rng.random())
        return sample_meta(rng, next((c for c, edge in edges if u < edge), edges[-1][0]))

    def __getitem__(self, index: int) -> dict:
        meta = self.meta(index)
        return {"image": to_tensor(render_scene(meta, self.resolution)), "caption": caption_for(meta), "meta": meta}
