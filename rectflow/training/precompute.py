"""Precompute a data set's latents (and text features) into WebDataset-style shards that `rectflow train --data OUT`
streams without decoding an image or running an encoder: per sample `KEY.latent.npy` (the autoencoder's latent,
float16), `KEY.txt`, and with --text-encoder `KEY.context.npy` / `KEY.pooled.npy`; OUT/manifest.json records the
autoencoder, text encoder and resolution, which training checks against its own.

Under torchrun every rank encodes its share (items i = rank mod world, or whole shards of a shard set) into shards
of its own; rank 0 then gathers them into one manifest. The validation split (where the data set has one) is cached
by rank 0 into OUT/val/.

    rectflow cache --data ~/photos --autoencoder sd3-vae:/models/sd3/vae --resolution 1024 --out data/photos-1024
    torchrun --nproc_per_node 8 -m rectflow.cli cache --data data/photo-shards --autoencoder sd3-vae:DIR \\
        --text-encoder sd3:DIR --resolution 1024 --out data/photos-cached
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from rectflow.autoencoder import load_autoencoder
from rectflow.data import get_dataset
from rectflow.data.shards import CONTEXT, LATENT, MANIFEST, POOLED, ShardSet, npy_member, write_shards
from rectflow.devices import resolve_device
from rectflow.files import write_text_atomic
from rectflow.text import load_text_encoder
from rectflow.training import distributed
from rectflow.training.cache import autoencoder_identity
from rectflow.training.data import ENDLESS

DEFAULT_COUNT = 10_000  # items of the endless shapes stream unless --count says


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="shapes, emoji, a folder of images or shards (as train --data)")
    p.add_argument("--out", required=True, help="the shard folder to write")
    p.add_argument("--autoencoder", required=True, help="the autoencoder spec training will use (e.g. sd3-vae:DIR)")
    p.add_argument("--text-encoder", default=None, help="also cache the text features of this encoder spec (what "
                                                        "training's text_encoder will be)")
    p.add_argument("--resolution", type=int, required=True, help="pixels (square centre crop)")
    p.add_argument("--count", type=int, default=None, help=f"items to cache from an endless data set ({DEFAULT_COUNT})")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--batch", type=int, default=16, help="images encoded at once")
    p.add_argument("--seed", type=int, default=0, help="the shapes stream's seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard folder at --out")


def _items(ds, rank: int, world: int, count: int | None) -> Iterator[dict]:
    """This rank's share of a data set's items: every world-th index, or whole shards of a shard set."""
    if isinstance(ds, ShardSet):
        yield from (item for _, item in ds.usable(range(rank, len(ds.urls), world)))
        return
    n = len(ds) if count is None else min(len(ds), count)
    for i in range(rank, n, world):
        item = ds[i]
        yield {**item, "meta": {**item.get("meta", {}), "key": f"{i:08d}"}}


def _batches(items: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def _encoded(items, ae, text, device, batch: int) -> Iterator[tuple[str, dict, dict]]:
    """(key, members, info) per item: the latent, the caption and the text features."""
    for group in _batches(items, batch):
        latents = ae.encode(torch.stack([it["image"] for it in group]).to(device)).float().cpu()
        captions = [it["caption"] for it in group]
        context = pooled = None
        if text is not None:
            context, pooled = (t.float().cpu() for t in text.encode(captions))
        for j, it in enumerate(group):
            files = {LATENT: npy_member(latents[j].half()), "txt": captions[j].encode()}
            if text is not None:
                files[CONTEXT], files[POOLED] = npy_member(context[j].half()), npy_member(pooled[j].half())
            yield it["meta"]["key"], files, {}


def cache_split(ds, out: Path, args, ae, text, device, ctx, info: dict) -> dict:
    """Encode this rank's share of one split into out/.part-RANK, then (rank 0) gather every part into out."""
    part = out / f".part-{ctx.rank:05d}"
    count = args.count
    if count is None and not isinstance(ds, ShardSet) and len(ds) >= ENDLESS:
        count = DEFAULT_COUNT
    items = _items(ds, ctx.rank, ctx.world_size, count)
    bar = tqdm(_encoded(items, ae, text, device, args.batch), desc=f"caching {out.name}", unit="img",
               disable=not ctx.is_main)
    write_shards(bar, part, args.shard_size, source=args.data, extra={"cache": info})
    distributed.barrier(ctx)
    manifest = None
    if ctx.is_main:
        manifest = _gather_parts(out, ctx.world_size, info, args.data)
    distributed.barrier(ctx)
    return manifest


def _gather_parts(out: Path, world: int, info: dict, source: str) -> dict:
    """Move every rank's shards into out as shard-NNNNNN.tar (rank order) and write the one manifest."""
    shards, total = [], 0
    for rank in range(world):
        part = out / f".part-{rank:05d}"
        for s in json.loads((part / MANIFEST).read_text())["shards"]:
            name = f"shard-{len(shards):06d}.tar"
            (part / s["name"]).replace(out / name)
            shards.append({**s, "name": name})
            total += s["samples"]
        shutil.rmtree(part)
    manifest = {"format": "rectflow.shards/1", "source": source, "samples": total, "shards": shards, "cache": info}
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if (out / MANIFEST).exists() and not args.overwrite:
        raise FileExistsError(f"{out} already holds shards ({MANIFEST}); pass --overwrite to replace them")
    ctx = distributed.init(resolve_device(args.device).type)
    device = resolve_device(args.device, ctx.local_rank if ctx.enabled else None)
    try:
        if ctx.is_main and out.exists() and args.overwrite:
            shutil.rmtree(out)
        distributed.barrier(ctx)
        ae = load_autoencoder(args.autoencoder).to(device).eval()
        text = load_text_encoder(args.text_encoder).to(device).eval() if args.text_encoder else None
        info = {"autoencoder": autoencoder_identity(ae)["spec"], "latent_channels": ae.channels,
                "text_encoder": args.text_encoder, "resolution": args.resolution}
        train = get_dataset(args.data, args.resolution, split="train", seed=args.seed)
        manifest = cache_split(train, out, args, ae, text, device, ctx, info)
        try:
            val = get_dataset(args.data, args.resolution, split="val", seed=args.seed)
        except (ValueError, FileNotFoundError):
            val = None
        if val is not None:
            cache_split(val, out / "val", args, ae, text, device, ctx, info)
        if ctx.is_main:
            print(f"{out}: {manifest['samples']} samples in {len(manifest['shards'])} shards"
                  f"{' (+ val/)' if val is not None else ''}; train with: rectflow train --data {out} "
                  f"--autoencoder {args.autoencoder}" + (f" --text-encoder {args.text_encoder}" if text else ""))
    finally:
        distributed.shutdown(ctx)
    return 0
