"""Training from streamed shards (rectflow.data.shards): each rank reads its own streams, one per DataLoader worker
(one in the main process without workers), and the checkpoint records every stream's position, so a resumed run
continues each stream with its next sample: no sample repeated or skipped.

A run resumed with another layout (processes x workers) cannot continue the old streams; its new streams start the
epoch after the furthest old one, which the resume reports.
"""
from __future__ import annotations

import sys

import torch

from rectflow.data.shards import Position, ShardSet
from rectflow.training import distributed
from rectflow.training.cache import autoencoder_identity
from rectflow.training.data import is_identity


class MicroBatches(torch.utils.data.IterableDataset):
    """Micro-batches of one rank: worker w of W reads stream rank x W + (w + consumed) mod W of world x W and
    yields (images, captions, keys, stream index, position after the batch). A DataLoader takes batches from its
    workers in turn from worker 0, so micro-batch k of the run comes from local stream k mod W, resumed or not."""

    def __init__(self, shards: ShardSet, rank: int, world: int, workers: int, micro: int, positions: dict,
                 consumed: int):
        self.shards, self.rank, self.world, self.workers, self.micro = shards, rank, world, workers, micro
        self.positions, self.consumed = positions, consumed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        index, count = self.rank * self.workers + (w + self.consumed) % self.workers, self.world * self.workers
        stream = self.shards.stream(index, count, self.positions.get(index))
        items = iter(stream)
        while True:
            batch = [next(items) for _ in range(self.micro)]
            x = torch.stack([it["latent"] if "latent" in it else it["image"] for it in batch])
            features = None
            if all("context" in it for it in batch):  # precomputed text features (rectflow cache)
                features = (torch.stack([it["context"] for it in batch]), torch.stack([it["pooled"] for it in batch]))
            yield (x, [it["caption"] for it in batch], [it["meta"]["key"] for it in batch], features, index,
                   stream.position.to_dict())


class StreamBatches:
    """The trainer's inputs from shards: next() gives this rank's next micro-batch (x0 on the device, captions,
    sample keys); positions() what the checkpoint keeps."""

    streaming, cache, groups = True, None, None

    def __init__(self, shards: ShardSet, autoencoder, device, ctx, micro: int, workers: int):
        self.shards, self.ae, self.device, self.ctx, self.micro = shards, autoencoder, device, ctx, micro
        self.workers = max(1, workers)
        self.num_workers = workers
        self.layout = ctx.world_size * self.workers  # streams in the job
        self.local: dict[int, dict] = {}  # this rank's streams: index -> position after its last consumed batch
        self.loader, self.carried = None, (0, 0)

    def start(self, saved: dict | None, consumed: int) -> None:
        """Open this rank's streams at the checkpoint's positions (saved: its "data_streams"; None: fresh), after
        `consumed` micro-batches of this rank (step x grad_accum)."""
        positions, self.carried = {}, (0, 0)
        same = saved and saved.get("fingerprint", self.shards.fingerprint) == self.shards.fingerprint
        if saved and saved.get("layout") == self.layout and same:
            positions = {int(k): Position(**v) for k, v in saved["streams"].items()}
        elif saved:
            old = saved["streams"].values()
            epoch = 1 + max((v["epoch"] for v in old), default=-1)
            positions = {i: Position(epoch=epoch) for i in range(self.layout)}
            if self.ctx.is_main:  # the old streams' damage counts stay in the totals (counted once, on rank 0)
                self.carried = (sum(v["bad_samples"] for v in old), sum(v["bad_shards"] for v in old))
                why = (f"were {saved['layout']} (processes x workers), this run has {self.layout}" if same else
                       "were over other shards (the shard list, seed or shuffle buffer changed)")
                print(f"rectflow train: the checkpoint's data streams {why}: the data continues at the start of "
                      f"epoch {epoch}", file=sys.stderr)
        self.local = {k: v.to_dict() for k, v in positions.items()
                      if self.ctx.rank * self.workers <= k < (self.ctx.rank + 1) * self.workers}
        data = MicroBatches(self.shards, self.ctx.rank, self.ctx.world_size, self.workers, self.micro, positions,
                            consumed)
        if self.num_workers:
            self.loader = iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=self.num_workers,
                                                           prefetch_factor=4, persistent_workers=True))
        else:
            self.loader = iter(data)

    def next(self) -> tuple[torch.Tensor, list[str], list[str], tuple | None]:
        """This rank's next micro-batch: x0 (latents, or pixels) on the device, captions, sample keys, and the
        precomputed (context, pooled) text features of cached shards (else None)."""
        x, captions, keys, features, index, position = next(self.loader)
        self.local[index] = position
        x = x.to(self.device)
        if self.shards.cached is not None or is_identity(self.ae):  # cached shards hold latents already
            return x, captions, keys, features
        with torch.no_grad():
            return self.ae.encode(x).float(), captions, keys, features

    def bad_counts(self) -> tuple[int, int]:
        """(damaged samples, damaged shards) skipped so far by this rank's streams."""
        local = self.local.values()
        return (self.carried[0] + sum(p["bad_samples"] for p in local),
                self.carried[1] + sum(p["bad_shards"] for p in local))

    def positions(self) -> dict:
        """Every stream's position in the job (a collective under torchrun): the checkpoint's "data_streams"."""
        streams = {}
        for part in distributed.all_gather_objects(self.local, self.ctx):
            streams.update({str(k): v for k, v in part.items()})
        return {"layout": self.layout, "fingerprint": self.shards.fingerprint, "streams": streams}


def check_cached(shards: ShardSet, autoencoder, text_encoder: str, resolution: int) -> None:
    """Precomputed shards (rectflow cache) must have been encoded with this run's autoencoder, resolution and (when
    they hold text features) text encoder: a ValueError naming the difference otherwise."""
    info = shards.cached
    if info is None:
        return
    mine = {"autoencoder": autoencoder_identity(autoencoder)["spec"], "resolution": resolution,
            "text_encoder": text_encoder}
    for key, value in mine.items():
        if info.get(key) is not None and info[key] != value:
            raise ValueError(f"{shards.spec}: its samples were precomputed with {key} {info[key]!r}, this run has "
                             f"{value!r}; set {key} to it (or run rectflow cache again)")
