"""Training-data throughput: images/s the trainer's loaders deliver from WebDataset-style shards (rectflow shards;
rectflow.training.stream) with 0, 2 and 4 DataLoader workers, against the same images read from their folder
(rectflow.training.data.Batches, in process and with workers), measured in one command on the same files.

The images: N JPEGs of 640 x 480 (smooth colour fields with noise, ~60 KB each, like photos), decoded, resized and
centre-cropped to --resolution; batches of --batch. Wall time over the timed batches after the first (the loaders'
start-up is reported apart); nothing else runs in the timed loop, so this is the ceiling each loader sets on
training.

    python benchmarks/data_pipeline.py                 # 512 images at 256 px
    python benchmarks/data_pipeline.py --images 2048 --resolution 512
    python benchmarks/data_pipeline.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rectflow.autoencoder import Identity  # noqa: E402
from rectflow.config import TrainConfig  # noqa: E402
from rectflow.data.folder import ImageFolderDataset  # noqa: E402
from rectflow.data.shards import ShardSet, folder_samples, write_shards  # noqa: E402
from rectflow.training.data import Batches  # noqa: E402
from rectflow.training.distributed import Context  # noqa: E402
from rectflow.training.stream import StreamBatches  # noqa: E402


def make_images(folder: Path, n: int) -> None:
    """n photo-like JPEGs with captions."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:480, 0:640] / 640.0
    for i in range(n):
        a, b, c = rng.uniform(0, 255, 3)
        base = np.stack([a * xx + 40 * np.sin(7 * yy + i), b * yy + 60, c * (1 - xx)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=88)
        (folder / f"{i:05d}.txt").write_text(f"photo number {i}")


def time_loader(next_batch, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the rest)."""
    t0 = time.perf_counter()
    next_batch()
    first = time.perf_counter() - t0
    count, t1 = 0, time.perf_counter()
    for _ in range(batches - 1):
        count += len(next_batch())
    return first, count / (time.perf_counter() - t1)


def folder_loader(root: Path, resolution: int, batch: int, workers: int, steps: int):
    cfg = TrainConfig.from_dict({"data": str(root), "resolution": resolution, "batch_size": batch})
    ds = ImageFolderDataset(root, resolution, val_every=10**9)
    b = Batches(ds, cfg, Identity(), torch.device("cpu"), Path(tempfile.mkdtemp()), Context())
    b.start_workers(workers, 0, steps, batch, 1, 0, 1)
    step = iter(range(steps))
    return lambda: b.load(b.indices(next(step)))[0]


def shard_loader(folder: Path, resolution: int, batch: int, workers: int):
    s = StreamBatches(ShardSet(str(folder), resolution, shuffle_buffer=64), Identity(), torch.device("cpu"),
                      Context(), batch, workers)
    s.start(None, 0)
    return lambda: s.next()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--quick", action="store_true", help="64 images at 64 px")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/data_pipeline.json"))
    args = ap.parse_args()
    if args.quick:
        args.images, args.resolution = 64, 64
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="rectflow-data-bench-"))
    make_images(work / "images", args.images)
    ds = ImageFolderDataset(work / "images", args.resolution, val_every=10**9)
    per_shard = max(1, args.images // (2 * max(args.workers + [1])))  # every worker gets shards of its own
    write_shards(folder_samples(ds), work / "shards", per_shard)
    steps = args.images // args.batch
    print(f"# {args.images} JPEGs 640x480 -> {args.resolution} px, batch {args.batch}, {os.cpu_count()} CPU cores")
    print("| source | workers | first batch (s) | img/s |")
    print("|---|---|---|---|")
    rows = []
    for workers in args.workers:
        for source in ("folder", "shards"):
            if source == "folder":
                loader = folder_loader(work / "images", args.resolution, args.batch, workers, steps)
            else:
                loader = shard_loader(work / "shards", args.resolution, args.batch, workers)
            first, rate = time_loader(loader, steps)
            rows.append({"source": source, "workers": workers, "first_s": first, "img_s": rate})
            print(f"| {source} | {workers} | {first:.2f} | {rate:.0f} |", flush=True)
            del loader
    base = next(r["img_s"] for r in rows if r["source"] == "folder" and r["workers"] == 0)
    for r in rows:
        print(f"# {r['source']}, {r['workers']} workers: {r['img_s'] / base:.2f}x the in-process folder")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
