"""Aspect-ratio buckets (docs/paper.md §4 "Mixed aspect ratios"): images keep roughly their shape at a fixed pixel
budget instead of being cropped square.

A bucket is a (width, height) with both sides multiples of m = patch size x autoencoder factor (so its latent splits
into whole patches) and width x height <= resolution^2; bucket_sides enumerates them up to a maximum aspect ratio.
An image goes to the bucket nearest its aspect ratio (in log ratio), is resized to cover it and centre-cropped.
Batches are drawn within one bucket (rectflow.training.data.bucket_step_indices).
"""
from __future__ import annotations

import math

from PIL import Image

MAX_RATIO = 2.0  # the widest bucket's aspect ratio by default (SD3's multi-aspect fine-tuning spans ~1:2 to 2:1)


def bucket_sides(resolution: int, multiple: int, max_ratio: float = MAX_RATIO) -> list[tuple[int, int]]:
    """(width, height) buckets of at most resolution^2 pixels, sides multiples of `multiple`, aspect ratio within
    [1 / max_ratio, max_ratio], from the tallest to the widest; the square resolution x resolution is one of them
    when resolution is a multiple."""
    if resolution < multiple:
        raise ValueError(f"resolution {resolution} is smaller than the bucket side multiple {multiple}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    budget = resolution * resolution
    out = set()
    for width in range(multiple, int(resolution * math.sqrt(max_ratio)) + multiple, multiple):
        height = budget // width // multiple * multiple
        if height >= multiple and max(width / height, height / width) <= max_ratio + 1e-9:
            out.add((width, height))
    return sorted(out, key=lambda s: s[0] / s[1])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest the image's (in log ratio; ties: the larger area)."""
    ratio = math.log(width / height)
    return min(range(len(buckets)),
               key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), -buckets[i][0] * buckets[i][1]))


def fit_bucket(image: Image.Image, side: tuple[int, int]) -> Image.Image:
    """The image resized to cover a (width, height) bucket and centre-cropped to it."""
    bw, bh = side
    w, h = image.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return image.crop((left, top, left + bw, top + bh))
