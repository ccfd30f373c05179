"""Noto Color Emoji glyphs captioned with their CLDR names (DESIGN "Built-in data").

The glyphs ship pre-rendered in rectflow/assets/emoji.npz (32x32 RGB on white, made by scripts/build_emoji.py from
the font, OFL: rectflow/assets/NotoColorEmoji-OFL.txt), so the data set works without the font. Every 20th glyph of
the shipped order is the validation split, whatever subset is chosen.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

ASSET = Path(__file__).resolve().parents[1] / "assets" / "emoji.npz"
VAL_EVERY = 20
# subset name -> glyph kinds it keeps (kinds written by scripts/build_emoji.py)
SUBSETS: dict[str, tuple[str, ...]] = {
    "all": ("single", "keycap", "flag", "zwj", "skin_tone"),
    "no_skin_tone": ("single", "keycap", "flag", "zwj"),
    "single": ("single",),
}


def load_glyphs(path: str | Path = ASSET) -> dict[str, np.ndarray]:
    """The arrays of an emoji npz (images [N, S, S, 3] uint8, captions, sequences, kinds, ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"emoji glyph file not found: {path} (rebuild it with scripts/build_emoji.py)")
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    missing = {"images", "captions", "sequences", "kinds"} - set(arrays)
    if missing:
        raise ValueError(f"{path}: missing arrays {sorted(missing)}; expected a file written by scripts/build_emoji.py")
    return arrays


def resize_glyphs(images: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> uint8 [N, 3, R, R], Lanczos-resampled when R != S."""
    if images.shape[1] != resolution:
        images = np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution),
                                                                 Image.Resampling.LANCZOS)) for im in images])
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


class EmojiDataset(torch.utils.data.Dataset):
    """Emoji glyphs at a resolution, captioned with CLDR short names ("grinning face", "flag: France")."""

    def __init__(self, resolution: int = 32, split: str = "train", subset: str = "all", path: str | Path = ASSET):
        if split not in ("train", "val"):
            raise ValueError(f"emoji split must be 'train' or 'val', got {split!r}")
        if subset not in SUBSETS:
            raise ValueError(f"unknown emoji subset {subset!r}; expected one of {sorted(SUBSETS)}")
        arrays = load_glyphs(path)
        stored = arrays["images"].shape[1]
        if resolution > stored:
            log.warning("emoji glyphs are stored at %dx%d; upsampling to %d blurs them "
                        "(scripts/build_emoji.py --size %d renders them sharp)", stored, stored, resolution, resolution)
        index = np.arange(len(arrays["captions"]))
        in_val = index % VAL_EVERY == 0
        keep = np.isin(arrays["kinds"], SUBSETS[subset]) & (in_val if split == "val" else ~in_val)
        self.indices = index[keep]  # positions in the file: stable ids across subsets and resolutions
        self.images = resize_glyphs(arrays["images"][keep], resolution)
        self.captions = [str(c) for c in arrays["captions"][keep]]
        self.sequences = [str(s) for s in arrays["sequences"][keep]]
        self.kinds = [str(k) for k in arrays["kinds"][keep]]
        self.resolution, self.split, self.subset = resolution, split, subset

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        image = self.images[i].float().div(127.5).sub(1.0)
        meta = {"index": int(self.indices[i]), "sequence": self.sequences[i], "kind": self.kinds[i]}
        return {"image": image, "caption": self.captions[i], "meta": meta}
