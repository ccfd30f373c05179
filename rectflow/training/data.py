"""The data pipeline of training: which data-set items each step reads (a pure function of the step), their latents
(encoded once and cached for finite data sets) and their text features (encoded once per caption).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from rectflow.autoencoder import Identity
from rectflow.config import TrainConfig
from rectflow.data import get_dataset
from rectflow.text import CachedTextEncoder, drop_parts, load_text_encoder
from rectflow.training import distributed
from rectflow.training.cache import LatentCache, autoencoder_identity
from rectflow.training.randomness import generator_for


ENDLESS = 10**7  # a data set at least this long (shapes) is read in order instead of in shuffled epochs


def step_indices(seed: int, step: int, batch_size: int, n_items: int) -> list[int]:
    """Data-set indices of the global batch of `step`: shuffled epochs, or plain order for endless data sets."""
    start = step * batch_size
    if n_items >= ENDLESS:
        return [(start + j) % n_items for j in range(batch_size)]
    out, perms = [], {}
    for pos in range(start, start + batch_size):
        epoch, k = divmod(pos, n_items)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_items, generator=generator_for(seed, epoch, "epoch"))
        out.append(int(perms[epoch][k]))
    return out


class TextFeatures:
    """Text features per caption, computed once and cached (docs/paper.md §4, conditioning;
    rectflow.text.CachedTextEncoder).

    A finite data set's captions are encoded up front, sorted and in fixed chunks, and kept in memory (when they fit
    in table_bytes); any other caption is encoded alone the first time it is seen. Either way a caption's features
    never depend on which batch it first appeared in, which exact resume needs (a batched encode may differ in the
    last bits with the batch's make-up).
    """

    def __init__(self, encoder, cache_dir: Path | None, table_bytes: int = 2**30):
        self.encoder = CachedTextEncoder(encoder, cache_dir=cache_dir)
        self.table: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.table_bytes = table_bytes
        for attr in ("context_dim", "pooled_dim", "seq_len", "encoder_names", "parts"):
            setattr(self, attr, getattr(encoder, attr))

    @torch.no_grad()
    def prepare(self, captions: list[str], chunk: int = 64) -> bool:
        """Encode all captions of a finite data set now; False (nothing done) if they would not fit in memory."""
        unique = sorted(set(captions) - set(self.table))
        per_caption = 4 * (self.seq_len * self.context_dim + self.pooled_dim)
        if (len(unique) + len(self.table)) * per_caption > self.table_bytes:
            return False
        for lo in range(0, len(unique), chunk):
            part = unique[lo:lo + chunk]
            context, pooled = self.encoder.encode(part)
            for i, c in enumerate(part):
                self.table[c] = (context[i].cpu(), pooled[i].cpu())
        return True

    def release(self) -> None:
        """Drop the encoder once the table holds every caption the run needs (T5-XXL alone is ~9.5 GB in bf16)."""
        self.encoder = None

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B,L,Dc], pooled [B,Dp]) for the captions (on the CPU)."""
        missing = [c for c in captions if c not in self.table]
        if missing and self.encoder is None:
            raise RuntimeError(f"the text encoder was released, and {missing[0]!r} is not among the precomputed "
                               f"captions (set release_encoders: false)")
        pairs = [self.table[c] if c in self.table else tuple(t[0].cpu() for t in self.encoder.encode([c]))
                 for c in captions]
        return torch.stack([c for c, _ in pairs]), torch.stack([p for _, p in pairs])

    def drop(self, context, pooled, p, generator=None):
        """Per-encoder dropout (rectflow.text.drop_parts over the encoder's parts)."""
        return drop_parts(self.parts, context, pooled, p, generator)


def all_captions(dataset) -> list[str]:
    """Every caption of a finite data set (its caption list when it has one, else item by item)."""
    captions = getattr(dataset, "captions", None)
    if isinstance(captions, list) and len(captions) == len(dataset):
        return list(captions)
    return [dataset[i]["caption"] for i in range(len(dataset))]


@functools.lru_cache(maxsize=2)
def frozen_text_encoder(spec: str, device: torch.device):
    """A loaded text encoder, shared by the runs of one process (it is frozen; loading takes seconds)."""
    return load_text_encoder(spec).to(device).eval().requires_grad_(False)


def bucket_groups(dataset) -> list[list[int]] | None:
    """Data-set indices per aspect-ratio bucket (non-empty buckets only), or None for a data set without buckets."""
    of = getattr(dataset, "bucket_of", None)
    if of is None:
        return None
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(of):
        groups.setdefault(b, []).append(i)
    return [groups[b] for b in sorted(groups)]


@functools.lru_cache(maxsize=4)
def _epoch_batches(seed: int, epoch: int, batch_size: int, groups: tuple[tuple[int, ...], ...]) -> list[list[int]]:
    """The batches of one epoch over buckets: each bucket shuffled and cut into full batches (the last one filled
    from the bucket's start), all of them in a shuffled order."""
    batches = []
    for b, members in enumerate(groups):
        order = torch.randperm(len(members), generator=generator_for(seed, epoch, "bucket", b))
        perm = [members[int(i)] for i in order]
        for lo in range(0, len(perm), batch_size):
            chunk = perm[lo:lo + batch_size]
            batches.append(chunk + [perm[j % len(perm)] for j in range(batch_size - len(chunk))])
    order = torch.randperm(len(batches), generator=generator_for(seed, epoch, "bucket-order"))
    return [batches[int(k)] for k in order]


def bucket_step_indices(seed: int, step: int, batch_size: int, groups: list[list[int]]) -> list[int]:
    """Data-set indices of the global batch of `step`, all from one bucket: a pure function of (seed, step), so a
    resumed run draws the same batches."""
    per_epoch = sum(-(-len(g) // batch_size) for g in groups)
    epoch, k = divmod(step, per_epoch)
    return _epoch_batches(seed, epoch, batch_size, tuple(tuple(g) for g in groups))[k]


class Batches:
    """Loads the inputs of any slice of a step's global batch: latents x0 and captions. Finite data sets are encoded
    once into an fp32 latent cache; endless ones (shapes) every step, under the run's bf16 autocast when it has one
    (the encoder is then ~20% of a small model's step, and bf16 halves that where the CPU or GPU runs it natively)."""

    def __init__(self, dataset, cfg: TrainConfig, autoencoder, device, cache_dir: Path, ctx, bf16: bool = False):
        self.dataset, self.cfg, self.ae, self.device, self.bf16 = dataset, cfg, autoencoder, device, bf16
        self.n = len(dataset)
        self.groups = bucket_groups(dataset)
        self.cache = None
        if not is_identity(autoencoder) and self.n < ENDLESS:
            self.cache = self._cached_latents(cache_dir, ctx)

    def indices(self, step: int) -> list[int]:
        """Data-set indices of the global batch of `step` (within one bucket for bucketed data)."""
        if self.groups is not None:
            return bucket_step_indices(self.cfg.seed, step, self.cfg.batch_size, self.groups)
        return step_indices(self.cfg.seed, step, self.cfg.batch_size, self.n)

    def latent_shape(self, index: int) -> tuple[int, int, int]:
        """(C, h, w) of item `index`'s latent: its bucket's, else the square resolution's."""
        if self.groups is None:
            side = self.cfg.resolution // self.ae.factor
            return (self.ae.channels, side, side)
        w, h = self.dataset.bucket_sides[self.dataset.bucket_of[index]]
        return (self.ae.channels, h // self.ae.factor, w // self.ae.factor)

    def _cached_latents(self, cache_dir: Path, ctx) -> LatentCache:
        """The latent cache of this data set, autoencoder and resolution, (re)built on rank 0 before training."""
        data = self.cfg.data
        if Path(data).expanduser().is_dir():
            data = str(Path(data).expanduser().resolve())
        identity = {"data": data, "data_options": self.cfg.data_options, "resolution": self.cfg.resolution,
                    "buckets": getattr(self.dataset, "bucket_sides", None), "seed": self.cfg.seed,
                    "autoencoder": autoencoder_identity(self.ae), "dtype": "float32", "split": "train"}
        cache = LatentCache(cache_dir, identity, self.n)
        if ctx.is_main:
            cache.build(self._encode)
        distributed.barrier(ctx)
        return cache

    @torch.no_grad()
    def _encode(self, indices: list[int]) -> list[torch.Tensor]:
        """Latents of the items (grouped by shape: buckets differ), in float32 on the CPU."""
        images = [self.dataset[i]["image"] for i in indices]
        out: list = [None] * len(indices)
        by_shape: dict[tuple, list[int]] = {}
        for j, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape), []).append(j)
        for js in by_shape.values():
            z = self.ae.encode(torch.stack([images[j] for j in js]).to(self.device)).float().cpu()
            for j, latent in zip(js, z):
                out[j] = latent
        return out

    def start_workers(self, workers: int, start: int, stop: int, micro: int, world: int, rank: int, accum: int):
        """Decode images in `workers` DataLoader processes ahead of the steps start..stop-1 (uncached data only:
        cached latents are read directly)."""
        self.loader, self.from_workers = None, 0
        if workers > 0 and self.cache is None and start < stop:
            sampler = StepSampler(self, start, stop, micro, world, rank, accum)
            self.loader = iter(torch.utils.data.DataLoader(_Indexed(self.dataset), batch_sampler=sampler,
                                                           num_workers=workers, collate_fn=_collate,
                                                           prefetch_factor=4))

    def _images(self, indices: list[int]) -> tuple[torch.Tensor, list[str]]:
        """Images and captions of the indices: the loader's next batch when it is the one asked for, else read
        here."""
        if getattr(self, "loader", None) is not None:
            got, images, captions = next(self.loader, (None, None, None))
            if got == indices:
                self.from_workers += 1
                return images, captions
            self.loader = None  # out of step (a caller asked for other items): read directly from now on
        items = [self.dataset[i] for i in indices]
        return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]

    def load(self, indices: list[int]) -> tuple[torch.Tensor, list[str]]:
        """x0 (latents, on the device) and captions of the given data-set indices."""
        if self.cache is not None:
            captions = [self._caption(i) for i in indices]
            return self.cache.get(indices).to(self.device), captions
        images, captions = self._images(indices)
        images = images.to(self.device)
        if is_identity(self.ae):
            return images, captions
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.ae.encode(images).float(), captions

    def _caption(self, i: int) -> str:
        """Item i's caption without decoding its image where the data set lists them."""
        captions = getattr(self.dataset, "captions", None)
        if isinstance(captions, list) and len(captions) == self.n:
            return captions[i]
        return self.dataset[i]["caption"]


class _Indexed(torch.utils.data.Dataset):
    """A data set whose items carry their index (so a loader's output can be checked against the step's indices)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return i, item["image"], item["caption"]


def _collate(items):
    indices, images, captions = zip(*items)
    return list(indices), torch.stack(images), list(captions)


class StepSampler(torch.utils.data.Sampler):
    """The index lists one rank loads, in training order from `start`: each step's grad_accum micro-batch slices of
    this rank (rectflow.training.loop.Trainer.train_step's order), so loader workers prefetch exactly what comes
    next and a resumed run starts at its step."""

    def __init__(self, batches: "Batches", start: int, stop: int, micro: int, world: int, rank: int, accum: int):
        self.batches, self.start, self.stop = batches, start, stop
        self.micro, self.world, self.rank, self.accum = micro, world, rank, accum

    def __iter__(self):
        for step in range(self.start, self.stop):
            indices = self.batches.indices(step)
            for a in range(self.accum):
                lo = (a * self.world + self.rank) * self.micro
                yield indices[lo:lo + self.micro]

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum


def is_identity(autoencoder) -> bool:
    """Pixel-space training: nothing to encode or cache."""
    return isinstance(autoencoder, Identity)


def data_options(cfg: TrainConfig) -> dict:
    """The data set's options of a config: data_options, and instance_prompt as the folder's default caption."""
    options = dict(cfg.data_options)
    if cfg.instance_prompt is not None:
        options["default_caption"] = cfg.instance_prompt
    if isinstance(options.get("curriculum"), (list, tuple)):
        options["curriculum"] = [_stage_in_scenes(cfg, stage) for stage in options["curriculum"]]
    return options


def _stage_in_scenes(cfg: TrainConfig, stage):
    """A curriculum stage's length in training scenes (the shapes stream is read in order, batch_size scenes a step):
    'steps: N', or 'fraction: F' of max_steps, become 'scenes'."""
    if not isinstance(stage, dict) or not {"steps", "fraction"} & set(stage):
        return stage
    keys = sorted({"steps", "fraction", "scenes"} & set(stage))
    if len(keys) > 1:
        raise ValueError(f"config key 'data_options': curriculum stage {stage} gives {keys}; expected one of them")
    out = {k: v for k, v in stage.items() if k not in ("steps", "fraction")}
    n = stage.get("steps")
    if "fraction" in stage:
        f = stage["fraction"]
        if not (isinstance(f, (int, float)) and 0 < f < 1):
            raise ValueError(f"config key 'data_options': curriculum stage fraction must be in (0, 1), got {f!r}")
        n = max(1, round(f * cfg.max_steps))
    if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
        raise ValueError(f"config key 'data_options': curriculum stage steps must be a positive integer, got {n!r}")
    out["scenes"] = n * cfg.batch_size
    return out


def default_prompts(cfg: TrainConfig, n: int = 8) -> list[str]:
    """Fixed prompts for sample grids: the first distinct captions of the data set's validation split."""
    try:
        ds = get_dataset(cfg.data, cfg.resolution, split="val", seed=0, **data_options(cfg))
    except (ValueError, KeyError, FileNotFoundError):
        ds = get_dataset(cfg.data, cfg.resolution, split="train", seed=0, **data_options(cfg))
    prompts: list[str] = []
    items = ds.preview(50 * n) if hasattr(ds, "preview") else (ds[i] for i in range(min(len(ds), 50 * n)))
    for item in items:  # a stream of shards is not indexed: its first samples in shard order
        c = item["caption"]
        if c not in prompts:
            prompts.append(c)
        if len(prompts) == n:
            break
    return prompts

