"""Built-in data sets (shapes, emoji) and folders of the user's images, behind one get_dataset().

Every data set is map-style and deterministic: item i is a pure function of (seed, split, i), and items are
{"image": float [3, H, W] in [-1, 1], "caption": str, "meta": JSON-serialisable dict}. Batch them with collate().
"""
from __future__ import annotations

from pathlib import Path

import torch

from .emoji import EmojiDataset
from .folder import ImageFolderDataset
from .shapes import ShapesDataset
from .preferences import PreferencePairs, is_preference_spec
from .shards import ShardItems, ShardSet, is_shard_spec

__all__ = ["get_dataset", "collate", "ShapesDataset", "EmojiDataset", "ImageFolderDataset", "ShardSet", "ShardItems", "PreferencePairs"]


def get_dataset(name: str, resolution: int, split: str = "train", seed: int = 0, **kw) -> torch.utils.data.Dataset:
    """'shapes', 'emoji', a folder path ('folder:PATH' also accepted) or shards (rectflow.data.shards: a shard
    folder, .tar, brace pattern or URL; 'shards:SPEC' also accepted) -> the data set at resolution.

    seed selects the endless shapes training stream; emoji and folders are fixed lists (a loader shuffles them),
    and every validation split is fixed. Keyword options go to the data set: shapes (categories, category_weights, curriculum,
    val_size), emoji (subset, path), folders (crop, hflip, val_every, buckets, max_ratio, default_caption), shards (crop,
    default_caption, shuffle_buffer). A shard set's training split streams (ShardSet); its validation split is the
    shard folder's val/ subfolder, read whole (ShardItems).
    """
    if name == "shapes":
        return ShapesDataset(resolution, split, seed=seed, **kw)
    if name == "emoji":
        return EmojiDataset(resolution, split, **kw)
    if is_preference_spec(name):  # preference pairs for DPO (rectflow.data.preferences)
        return PreferencePairs(name, resolution, split, **kw)
    if is_shard_spec(name):
        if split == "train":
            return ShardSet(name, resolution, seed=seed, **kw)
        val = name.removeprefix("shards:").rstrip("/") + "/val"
        if not Path(val).expanduser().is_dir() and "://" not in val:
            raise FileNotFoundError(f"no validation shards: {val} does not exist (rectflow shards writes one)")
        return ShardItems(val, resolution, **kw)
    path = Path(name[len("folder:"):] if name.startswith("folder:") else name).expanduser()
    if path.is_dir():
        return ImageFolderDataset(path, resolution, split, **kw)
    raise ValueError(f"unknown data set {name!r}: expected 'shapes', 'emoji' or an existing folder of images")


def collate(items: list[dict]) -> dict:
    """Batch items: images stacked to [B, 3, H, W], captions and metas as lists (metas differ in shape)."""
    return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items],
            "meta": [it["meta"] for it in items]}
