"""Pack images and captions into WebDataset-style tar shards that `rectflow train --data OUT` streams (and
WebDataset, or any tar reader, reads): OUT/shard-NNNNNN.tar with NNNNNNNN.{jpg,png,webp} + .txt + .json per sample,
OUT/manifest.json (samples, bytes and sha256 per shard), the validation split in OUT/val/, and a preview grid.

A folder keeps its image files byte for byte (JPEG, PNG, WebP; other formats become PNG) with the captions and splits
training would give it (metadata.jsonl or .txt sidecars; train/ and val/ folders or every val-every-th image); broken
files are left out and counted. A built-in data set (shapes, emoji) is rendered at --resolution.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from rectflow.data import get_dataset
from rectflow.data.folder import ImageFolderDataset
from rectflow.data.folder import UnusableImage
from rectflow.data.shards import MANIFEST, ShardSet, dataset_samples, folder_samples, iter_tar, verify, write_shards
from rectflow.images import save_images

BUILT_IN = ("shapes", "emoji")
DEFAULT_COUNT = 10_000  # samples written from the endless shapes stream unless --count says


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a folder of images (captions in metadata.jsonl or .txt sidecars), or a built-in "
                                  "data set: shapes, emoji; with --check, a shard folder to verify")
    p.add_argument("out", nargs="?", help="the shard folder to write")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (each rank x DataLoader worker "
                                                                "streams whole shards: write at least that many)")
    p.add_argument("--val-every", type=int, default=20, help="folders without train/ and val/: every N-th image is "
                                                             "the validation split")
    p.add_argument("--resolution", type=int, default=64, help="built-in data sets: the side of the images")
    p.add_argument("--count", type=int, default=None, help=f"built-in data sets: training samples to write (shapes "
                                                           f"is endless: {DEFAULT_COUNT}; emoji: all)")
    p.add_argument("--seed", type=int, default=0, help="built-in shapes: the seed of the stream")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard folder at OUT")
    p.add_argument("--check", action="store_true", help="verify SOURCE's shards against its manifest (sizes, sha256, "
                                                        "readable samples) instead of writing")


def run(args: argparse.Namespace) -> int:
    if args.check:
        return check(args.source)
    if args.out is None:
        raise ValueError("the shard folder OUT is missing (rectflow shards SOURCE OUT)")
    if args.shard_size < 1:
        raise ValueError(f"--shard-size: expected a positive number of samples, got {args.shard_size}")
    out = Path(args.out).expanduser()
    if (out / MANIFEST).exists() and not args.overwrite:
        raise FileExistsError(f"{out} already holds shards ({MANIFEST}); pass --overwrite to replace them")
    if out.exists() and args.overwrite:
        shutil.rmtree(out)
    summary = {}
    for split, folder in (("train", out), ("val", out / "val")):
        samples, total, extra = _samples(args, split)
        if samples is None:
            continue
        bar = tqdm(samples, total=total, desc=f"{split} shards", unit="img", disable=total is not None and total < 50)
        manifest = write_shards(bar, folder, args.shard_size, source=args.source, extra={"split": split, **extra})
        summary[split] = (manifest["samples"], len(manifest["shards"]), sum(s["bytes"] for s in manifest["shards"]))
    _preview(out)
    for split, (n, shards, size) in summary.items():
        print(f"{split}: {n} samples in {shards} shards ({size / 2**20:.1f} MiB) -> "
              f"{out if split == 'train' else out / 'val'}")
    print(f"train with: rectflow train --data {out}")
    return 0


def _samples(args, split: str):
    """(samples, how many, manifest extras) of a split of the source; (None, 0, {}) when it has none."""
    if args.source in BUILT_IN:
        ds = get_dataset(args.source, args.resolution, split=split, seed=args.seed)
        wanted = args.count if args.count is not None else DEFAULT_COUNT
        n = min(len(ds), wanted)
        return dataset_samples(ds, n), n, {"resolution": args.resolution}
    root = Path(args.source).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder of images (or built-in data set {'/'.join(BUILT_IN)}): {root}")
    try:
        ds = ImageFolderDataset(root, split=split, val_every=args.val_every)
    except ValueError as err:
        if split == "val":
            print(f"rectflow shards: no validation split ({err})", file=sys.stderr)
            return None, 0, {}
        raise
    counts = dict(ds.counts)
    return folder_samples(ds), len(ds.paths), ({"counts": counts} if counts else {})


def _preview(out: Path, n: int = 16) -> None:
    """out/preview.png: the first training samples as the stream decodes them, with their captions."""
    first = ShardSet(str(out), 128).preview(n)
    save_images(torch.stack([it["image"] for it in first]), [it["caption"] for it in first], out / "preview.png",
                {"shards": str(out)}, singles=False)


def check(folder: str) -> int:
    """Verify a shard folder: its files against the manifest, then every sample decoded; 0 when all is sound."""
    problems = []
    for part in [Path(folder)] + ([Path(folder) / "val"] if (Path(folder) / "val" / MANIFEST).is_file() else []):
        problems += verify(part)
        if problems:
            continue
        shards = ShardSet(str(part), 64)
        good = 0
        for url in tqdm(shards.urls, desc=f"decoding {part}", unit="shard"):
            for key, files in iter_tar(url):
                try:
                    shards.decode(key, files)
                    good += 1
                except UnusableImage as err:
                    problems.append(f"{url}: sample {key}: {err}")
        print(f"{part}: {len(shards.urls)} shards match the manifest; {good} of {len(shards)} samples decode")
    for line in problems:
        print(f"rectflow shards: {line}", file=sys.stderr)
    return 1 if problems else 0
