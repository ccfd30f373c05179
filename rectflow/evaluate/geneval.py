"""GenEval-style prompt-following scores on the shapes data (docs/paper.md §6, Table 5), read by a deterministic
detector.

GenEval (Ghosh et al. 2023) runs an object detector on generated images and checks each prompt's requirements. The
shapes data has a known palette and three shapes, so rectflow replaces the learned detector with an exact one:

1. colour segmentation: each pixel takes the nearest PALETTE colour if it lies within `tolerance` (RGB distance,
   0-255 scale) of it, else it is background;
2. connected components (4-connected) of each colour; components smaller than `min_area` (1.2% of the image, half
   the smallest object the data draws: a triangle of side 0.22) are noise;
3. shape from geometry: the fill ratio of the component's bounding box (circle pi/4 ~ 0.785, triangle 0.5,
   square 1.0) and the fraction of its pixels in the top half of the box (0.25 for the apex-up triangle, 0.5 for
   the others), nearest prototype wins;
4. the centroid of each component gives positions; relations use the data's rule (shapes.relation_of: the dominant
   axis of the centroid offset).

Per category, an image is correct when (GenEval's definitions, applied to shapes captions):

    single_object  at least one object of the named shape
    two_object     at least one of each of the two named shapes
    counting       exactly N objects of the named shape
    colors         at least one object of the named shape has the named colour
    position       both named (shape, colour) objects are present and the first (largest match) lies in the named
                   relation to the second (largest match)
    color_attr     at least one object of each named (shape, colour) pair: colours bound to the right shapes

As in GenEval, single_object, two_object and counting ignore colour; the category score is the fraction of correct
images and the overall score is the mean over the six categories.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from rectflow.data.shapes import CATEGORIES, PALETTE, SHAPES, relation_of

# (fill ratio of the bounding box, fraction of pixels in the box's top half) of each shape drawn apex-up.
PROTOTYPES: dict[str, tuple[float, float]] = {"circle": (np.pi / 4, 0.5), "square": (1.0, 0.5), "triangle": (0.5, 0.25)}
assert set(PROTOTYPES) == set(SHAPES), f"detector prototypes {sorted(PROTOTYPES)} != data shapes {sorted(SHAPES)}"


@dataclass
class Detection:
    """One object found in an image; coordinates are fractions of the image side (x right, y down)."""

    shape: str
    color: str
    center: tuple[float, float]
    area: float      # fraction of the image
    fill: float      # fraction of the bounding box covered
    top: float       # fraction of the pixels in the top half of the bounding box


def to_rgb_array(image) -> np.ndarray:
    """PIL image, uint8 HWC array or float CHW tensor in [-1, 1] -> uint8-valued float array [H, W, 3]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image tensor [3, H, W] in [-1, 1], got shape {tuple(image.shape)}")
        array = image.detach().float().cpu().numpy().transpose(1, 2, 0)
        return np.round((np.clip(array, -1, 1) + 1) * 127.5)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB array [H, W, 3], got shape {array.shape}")
    return array.astype(np.float32)


def classify_shape(fill: float, top: float) -> str:
    """The shape whose (fill, top) prototype is nearest."""
    return min(PROTOTYPES, key=lambda s: (fill - PROTOTYPES[s][0]) ** 2 + (top - PROTOTYPES[s][1]) ** 2)


class ShapesDetector:
    """Palette segmentation + connected components + shape geometry (module docstring)."""

    def __init__(self, tolerance: float = 60.0, min_area: float = 0.012):
        self.tolerance, self.min_area = tolerance, min_area
        self.names = list(PALETTE)
        self.colors = np.array([PALETTE[n] for n in self.names], dtype=np.float32)

    def segment(self, rgb: np.ndarray) -> np.ndarray:
        """Per-pixel palette index, or -1 where no palette colour is within the tolerance."""
        dist = np.linalg.norm(rgb[:, :, None, :] - self.colors[None, None], axis=-1)
        nearest = dist.argmin(-1)
        return np.where(dist.min(-1) <= self.tolerance, nearest, -1)

    def __call__(self, image) -> list[Detection]:
        """All objects in one image."""
        rgb = to_rgb_array(image)
        h, w = rgb.shape[:2]
        labels = self.segment(rgb)
        found = []
        for index, color in enumerate(self.names):
            components, count = ndimage.label(labels == index)  # default structure: 4-connectivity
            for k, box in enumerate(ndimage.find_objects(components), start=1):
                mask = components[box] == k
                area = int(mask.sum())
                if area < self.min_area * h * w:
                    continue
                found.append(self._describe(mask, box, color, h, w))
        return sorted(found, key=lambda d: (d.center[1], d.center[0]))

    @staticmethod
    def _describe(mask: np.ndarray, box: tuple[slice, slice], color: str, h: int, w: int) -> Detection:
        """Shape, centroid and geometry of one component (mask cropped to its bounding box)."""
        ys, xs = np.nonzero(mask)
        bh, bw = mask.shape
        fill = mask.sum() / (bh * bw)
        top = (ys < bh / 2).sum() / len(ys)  # the middle row of an odd-height box counts as bottom half
        center = ((box[1].start + xs.mean() + 0.5) / w, (box[0].start + ys.mean() + 0.5) / h)
        return Detection(shape=classify_shape(fill, top), color=color, center=center, area=len(ys) / (h * w),
                         fill=float(fill), top=float(top))


def matches(detections: list[Detection], shape: str, color: str | None = None) -> list[Detection]:
    """Detections of a shape (and colour, when given), largest first."""
    hits = [d for d in detections if d.shape == shape and (color is None or d.color == color)]
    return sorted(hits, key=lambda d: -d.area)


def is_correct(meta: dict, detections: list[Detection]) -> bool:
    """Whether an image with these detections satisfies its prompt, by the rule of meta["category"]."""
    category, objects = meta["category"], meta["objects"]
    first = objects[0]
    if category == "single_object":
        return bool(matches(detections, first["shape"]))
    if category == "two_object":
        return all(matches(detections, o["shape"]) for o in objects[:2])
    if category == "counting":
        return len(matches(detections, first["shape"])) == len(objects)
    if category == "colors":
        return bool(matches(detections, first["shape"], first["color"]))
    if category == "color_attr":
        return all(matches(detections, o["shape"], o["color"]) for o in objects[:2])
    if category == "position":
        a, b = (matches(detections, o["shape"], o["color"]) for o in objects[:2])
        return bool(a and b) and relation_of(a[0].center, b[0].center) == meta["relation"]
    raise ValueError(f"unknown GenEval category {category!r}; expected one of {CATEGORIES}")


def exact_match(meta: dict, detections: list[Detection]) -> bool:
    """Detector check on a ground-truth render: the same multiset of (shape, colour) and, if any, the relation."""
    want = sorted((o["shape"], o["color"]) for o in meta["objects"])
    got = sorted((d.shape, d.color) for d in detections)
    if want != got:
        return False
    return "relation" not in meta or is_correct(meta, detections)


def geneval_scores(metas: list[dict], images, detector: ShapesDetector | None = None) -> dict:
    """Per-category accuracy, overall (mean of the categories present) and counts, for images of the given metas."""
    if len(metas) != len(images):
        raise ValueError(f"GenEval scoring needs one meta per image: {len(metas)} metas, {len(images)} images")
    detector = detector or ShapesDetector()
    correct: dict[str, list[bool]] = {}
    for meta, image in zip(metas, images):
        correct.setdefault(meta["category"], []).append(is_correct(meta, detector(image)))
    scores = {c: float(np.mean(correct[c])) for c in CATEGORIES if c in correct}
    scores["overall"] = float(np.mean(list(scores.values())))
    scores["counts"] = {c: len(correct[c]) for c in CATEGORIES if c in correct}
    return scores
