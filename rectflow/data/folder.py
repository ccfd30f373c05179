"""A folder of the user's images with captions (DESIGN "Built-in data": folders).

Captions come from a metadata.jsonl (the datasets library's imagefolder convention: one JSON object per line with
"file_name", relative to the jsonl's folder, and "text" or "caption"; any folder of the tree may hold one) or from a
sidecar text file next to the image (photo.png + photo.txt). metadata.jsonl wins when both name an image; images with
neither train with the empty caption (unconditionally) and are counted.

Every image file is decoded once at construction. Unusable files (empty, not an image, truncated or corrupt, too
large) are skipped; unusual ones (CMYK, 16-bit, alpha, palette, grayscale, EXIF-rotated, wrong extension) are
converted to 8-bit RGB, transparency composited on white. Both are counted in one log message and kept in
.skipped / .counts, so a broken file never stops a run.

Splits: a folder with train/ and val/ (or validation/) subfolders uses them; otherwise every val_every-th image in
sorted path order is the validation split and the rest the training split.
"""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from rectflow.data.buckets import MAX_RATIO, bucket_sides, fit_bucket, nearest_bucket

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# PIL format name -> extensions that honestly carry it
FORMAT_EXTENSIONS = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "WEBP": (".webp",), "BMP": (".bmp",),
                     "GIF": (".gif",), "TIFF": (".tif", ".tiff"), "MPO": (".jpg", ".jpeg")}
CAPTION_KEYS = ("text", "caption")
CROPS = ("center", "resize", "pad")
BACKGROUND = (255, 255, 255)  # what transparent pixels become
ORIENTATION = 0x0112  # EXIF tag


class UnusableImage(Exception):
    """A file that cannot be turned into an RGB image; the message is the reason counted in the report."""


def _to_8bit(image: Image.Image) -> Image.Image:
    """Single-channel 16/32-bit integer or float image -> 8-bit 'L', scaled by its nominal range."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
    else:  # I;16* is 16-bit; 'I' holds 16-bit PNG/TIFF data unless its values say 8-bit
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0.0) > 255 else 255.0
    return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def _flatten(image: Image.Image) -> Image.Image:
    """Composite an image with alpha over BACKGROUND."""
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Any PIL mode -> 8-bit RGB, and what was converted (None for plain RGB)."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _to_8bit(image).convert("RGB"), "16-bit" if mode != "F" else "float"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return _flatten(image), "alpha"
    if mode == "P":
        return image.convert("RGB"), "palette"
    if mode == "CMYK":
        return image.convert("RGB"), "cmyk"
    if mode in ("L", "1"):
        return image.convert("RGB"), "grayscale"
    try:
        return image.convert("RGB"), mode.lower()
    except (ValueError, OSError) as err:
        raise UnusableImage(f"unsupported mode {mode}") from err


def load_image(path: Path, draft: tuple[int, int] | None = None) -> tuple[Image.Image, list[str]]:
    """Decode path fully into RGB; returns the image and its conversion notes, or raises UnusableImage."""
    if path.stat().st_size == 0:
        raise UnusableImage("empty file")
    return decode_image(path, path.suffix, draft)


def decode_image(source, suffix: str, draft: tuple[int, int] | None = None) -> tuple[Image.Image, list[str]]:
    """load_image of a path or a binary file object (a tar member's bytes) whose name ends in `suffix`."""
    try:
        with Image.open(source) as image:
            notes = []
            if image.format and suffix.lower() not in FORMAT_EXTENSIONS.get(image.format, ()):
                notes.append("wrong extension")
            if draft is not None and image.format == "JPEG":
                image.draft(image.mode, draft)  # decode at a reduced DCT scale, still >= draft
            image.load()
            if image.getexif().get(ORIENTATION, 1) != 1:
                notes.append("exif rotated")
            rgb, note = to_rgb(ImageOps.exif_transpose(image))
            rgb.load()
    except UnidentifiedImageError as err:
        raise UnusableImage("not an image") from err
    except Image.DecompressionBombError as err:
        raise UnusableImage("too large") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise UnusableImage("truncated or corrupt") from err
    return rgb, notes + ([note] if note else [])


def fit(image: Image.Image, resolution: int, crop: str = "center") -> Image.Image:
    """Square resolution x resolution image: centre crop, squash ('resize') or letterbox on white ('pad')."""
    w, h = image.size
    lanczos = Image.Resampling.LANCZOS
    if crop == "resize":
        return image.resize((resolution, resolution), lanczos, reducing_gap=3.0)
    if crop == "center":
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        image = image.resize((nw, nh), lanczos, reducing_gap=3.0)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        return image.crop((left, top, left + resolution, top + resolution))
    if crop == "pad":
        scale = resolution / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (resolution, resolution), BACKGROUND)
        small = image.resize((nw, nh), lanczos, reducing_gap=3.0)
        canvas.paste(small, ((resolution - nw) // 2, (resolution - nh) // 2))
        return canvas
    raise ValueError(f"unknown crop {crop!r}; expected one of {CROPS}")


def mirror_caption(caption: str) -> str:
    """Swap the words left and right (a horizontally flipped image swaps its sides)."""
    swap = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}
    return re.sub(r"\b(left|right|Left|Right|LEFT|RIGHT)\b", lambda m: swap[m.group(1)], caption)


def read_metadata(root: Path) -> tuple[dict[Path, str], Counter]:
    """Captions from every metadata.jsonl under root: {image path: caption}, and the bad lines counted by reason
    (each logged with its file and line number). A byte-order mark is accepted."""
    captions, bad = {}, Counter()
    for jsonl in sorted(root.rglob("metadata.jsonl")):
        text = jsonl.read_bytes().decode("utf-8-sig", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            reason, entry = _metadata_line(line, jsonl.parent)
            if reason is not None:
                bad[f"metadata lines: {reason}"] += 1
                log.warning("%s:%d: skipped: %s", jsonl, n, reason)
                continue
            captions[entry[0]] = entry[1]
    return captions, bad


def _metadata_line(line: str, folder: Path) -> tuple[str | None, tuple[Path, str] | None]:
    """(None, (image path, caption)) for a good metadata.jsonl line, else (reason, None)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return "not valid JSON", None
    if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
        return "expected a JSON object with a file_name string", None
    key = next((k for k in CAPTION_KEYS if k in record), None)
    if key is None:
        return f"no caption (expected one of {', '.join(CAPTION_KEYS)})", None
    if not isinstance(record[key], str):
        return f"caption {key!r} is {type(record[key]).__name__}, not a string", None
    path = (folder / record["file_name"]).resolve()
    if not path.is_file():
        return "names a missing image file", None
    return None, (path, record[key].strip())


def sidecar_caption(path: Path) -> str | None:
    """The caption in path's .txt sidecar, or None."""
    txt = path.with_suffix(".txt")
    return txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None


def split_root(root: Path, split: str) -> tuple[Path, bool]:
    """The folder holding a split's images, and whether it is a dedicated split folder."""
    names = {"train": ("train",), "val": ("val", "validation")}[split]
    if (root / "train").is_dir() and any((root / n).is_dir() for n in ("val", "validation")):
        for name in names:
            if (root / name).is_dir():
                return root / name, True
    return root, False


class ImageFolderDataset(torch.utils.data.Dataset):
    """The usable images of a folder (recursively), fitted to resolution x resolution, with their captions.

    hflip=True adds a mirrored copy of every training image (items n..2n-1) whose caption has left and right
    swapped; off by default because captions say left and right.

    buckets=m: aspect-ratio buckets instead (rectflow.data.buckets): each image goes to the bucket of about
    resolution^2 pixels, sides multiples of m, nearest its aspect ratio (up to max_ratio), and is resized and
    centre-cropped to it; .bucket_sides and .bucket_of (per item) say which. default_caption: the caption of
    images without one (DreamBooth's instance prompt); else they train unconditionally.
    """

    def __init__(self, root: str | Path, resolution: int = 32, split: str = "train", crop: str = "center",
                 hflip: bool = False, val_every: int = 20, buckets: int | None = None,
                 max_ratio: float = MAX_RATIO, default_caption: str = ""):
        if split not in ("train", "val"):
            raise ValueError(f"folder split must be 'train' or 'val', got {split!r}")
        if crop not in CROPS:
            raise ValueError(f"unknown crop {crop!r}; expected one of {CROPS}")
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.resolution, self.split, self.crop = resolution, split, crop
        self.hflip = hflip and split == "train"
        folder, dedicated = split_root(self.root, split)
        files = sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                       key=lambda p: p.relative_to(folder).as_posix())
        if not dedicated:
            files = [p for i, p in enumerate(files) if (i % val_every == val_every - 1) == (split == "val")]
        self.default_caption = default_caption
        self.paths, self.captions, self.sizes, self.skipped, self.counts = [], [], [], [], Counter()
        self._scan(files, folder)
        if not self.paths:
            raise ValueError(self._empty_message(folder, files, dedicated, val_every))
        self.bucket_sides, self.bucket_of = None, None
        if buckets:
            self.bucket_sides = bucket_sides(resolution, int(buckets), max_ratio)
            per_file = [nearest_bucket(w, h, self.bucket_sides) for w, h in self.sizes]
            self.bucket_of = per_file * (2 if self.hflip else 1)

    def _scan(self, files: list[Path], folder: Path) -> None:
        """Decode every file once; keep the usable ones with their captions, count the rest."""
        captions, bad_lines = read_metadata(folder)
        for path in files:
            try:
                image, notes = load_image(path, draft=(self.resolution, self.resolution))
            except UnusableImage as err:
                self.skipped.append((str(path), str(err)))
                self.counts[f"skipped: {err}"] += 1
                continue
            for note in notes:
                self.counts[f"converted: {note}"] += 1
            caption = captions.get(path.resolve())
            if caption is None:
                caption = sidecar_caption(path)
            if caption is None:
                self.counts["no caption" + (" (default caption used)" if self.default_caption else "")] += 1
            self.paths.append(path)
            self.captions.append(self.default_caption if caption is None else caption)
            self.sizes.append(image.size)
        if bad_lines:  # the total, then each reason
            self.counts["bad metadata lines"] = sum(bad_lines.values())
            self.counts.update(bad_lines)
        details = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        level = logging.WARNING if self.skipped or bad_lines else logging.INFO
        log.log(level, "%s (%s): %d usable images of %d files%s", folder, self.split, len(self.paths), len(files),
                f"; {details}" if details else "")

    def _empty_message(self, folder: Path, files: list[Path], dedicated: bool, val_every: int) -> str:
        """Why a split has no usable images, naming the folder and what was found."""
        if not files and self.split == "val" and not dedicated:
            return (f"no validation images in {folder}: with val_every={val_every} every {val_every}th image is "
                    f"held out, and the folder has fewer; add a val/ folder next to train/ or lower val_every")
        if not files:
            return f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}"
        reasons = Counter(reason for _, reason in self.skipped)
        return f"no usable images under {folder}: all {len(files)} image files were skipped ({dict(reasons)})"

    def __len__(self) -> int:
        return len(self.paths) * (2 if self.hflip else 1)

    def _load(self, i: int) -> tuple[Image.Image, int]:
        """Image i fitted to the resolution (or its bucket), and its index: a file that broke after the scan yields
        the next one."""
        for k in range(len(self.paths)):
            path = self.paths[(i + k) % len(self.paths)]
            try:
                image, _ = load_image(path, draft=(self.resolution, self.resolution))
            except (UnusableImage, OSError) as err:
                log.warning("%s became unusable after the scan (%s); using the next image", path, err)
                continue
            j = (i + k) % len(self.paths)
            if self.bucket_of is not None:
                return fit_bucket(image, self.bucket_sides[self.bucket_of[j]]), j
            return fit(image, self.resolution, self.crop), j
        raise RuntimeError(f"no image under {self.root} can be read any more")

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"folder index {index} out of range [0, {len(self)})")
        n = len(self.paths)
        image, i = self._load(index % n)
        caption, flipped = self.captions[i], index >= n
        if flipped:
            image, caption = ImageOps.mirror(image), mirror_caption(caption)
        array = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        meta = {"path": str(self.paths[i].relative_to(self.root)), "flipped": flipped}
        return {"image": array.float().div(127.5).sub(1.0), "caption": caption, "meta": meta}
