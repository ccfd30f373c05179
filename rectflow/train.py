"""Train an MM-DiT (or, with `arch`, a baseline of PAPER 4's architecture study) with any formulation:
`rectflow train --data shapes --max-steps 20 --out runs/first`.

The data path (STYLE.md): data set -> (autoencoder latents, text features; both cached) -> the formulation draws t and
noise and builds z_t -> model -> the formulation's per-sample loss -> mean over the global batch. AdamW with warm-up and
an optional cosine decay, an EMA of the weights, bf16 autocast, gradient accumulation and torchrun (DDP).

Exact resume: every random draw of a step (data indices, t, noise, text dropout) comes from generators seeded by
(seed, step, purpose), so step n sees the same inputs whether or not the run was interrupted; a checkpoint stores the
raw and EMA weights (safetensors) and the optimizer, step and counters (torch.save, read with weights_only=True).
Run directory: config.yaml, metrics.jsonl, tb/ (TensorBoard), samples/step_N.png, checkpoints/step_N/ + `latest`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rectflow import distributed
from rectflow.config import (FIELDS, TrainConfig, apply_dict, apply_overrides, field_type, load_config,
                             write_text_atomic)

# fields that may change when a run is resumed (they do not change what the run computes up to its end)
RESUME_CHANGEABLE = {"max_steps", "checkpoint_every", "keep_last", "log_every", "sample_every", "max_bad_steps",
                     "device", "sample_prompts", "sample_steps", "sample_solver", "sample_cfg", "cache_dir"}
ENDLESS = 10**7  # a data set at least this long (shapes) is read in order instead of in shuffled epochs
STATE_VERSION = 1


class TrainingAborted(RuntimeError):
    """Too many non-finite steps in a row; the last checkpoint written is still the last good one."""


# ---------------------------------------------------------------- randomness and data order: pure functions of step


def seed_for(seed: int, step: int, purpose: str, index: int = 0) -> int:
    """A 63-bit seed derived from (seed, step, purpose, index), so no generator state has to be carried."""
    digest = hashlib.sha256(f"{seed}/{step}/{purpose}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator_for(seed: int, step: int, purpose: str, index: int = 0) -> torch.Generator:
    """A CPU generator for one purpose of one step."""
    return torch.Generator().manual_seed(seed_for(seed, step, purpose, index))


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or cosine to min_lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- EMA


def ema_decay_at(update: int, decay: float, warmup: bool) -> float:
    """Decay of the `update`-th EMA update (0-based); with warm-up min(decay, (1 + k) / (10 + k))."""
    return min(decay, (1 + update) / (10 + update)) if warmup else decay


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are copied)."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# ---------------------------------------------------------------- checkpoints


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk, so a crash cannot reorder it after a later rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _weights_metadata(model: torch.nn.Module, cfg: TrainConfig, step: int, kind: str) -> dict[str, str]:
    """safetensors metadata: rectflow.checkpoints' file format (model config) plus the run's training config."""
    from rectflow.checkpoints import FORMAT_TAG
    return {"format": FORMAT_TAG, "config": json.dumps(model.config),
            "rectflow.train_config": json.dumps(cfg.to_dict()), "rectflow.step": str(step),
            "rectflow.weights": kind}


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Write a model's state dict as safetensors (contiguous float copies) with metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)


def save_checkpoint(run_dir: Path, step: int, model, ema, state: dict, cfg: TrainConfig) -> Path:
    """Write checkpoints/step_N atomically (temp dir, then rename), point `latest` at it, prune to keep_last."""
    ck_root = Path(run_dir) / "checkpoints"
    ck_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=ck_root))
    save_weights(model, tmp / "model.safetensors", _weights_metadata(model, cfg, step, "raw"))
    save_weights(ema, tmp / "ema.safetensors", _weights_metadata(ema, cfg, step, "ema"))
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)  # the directory's entries too: after a crash the renamed directory must hold all three files
    final = ck_root / name
    if final.exists():  # left by an earlier attempt at this step (a run resumed from before it)
        os.replace(final, tempfile.mkdtemp(prefix=f".trash-{name}-", dir=ck_root))
    os.replace(tmp, final)
    _fsync(ck_root)  # the rename itself
    # the pointer is written last: until it changes, loading uses the previous checkpoint
    fd, tmp_ptr = tempfile.mkstemp(prefix=".tmp-latest-", dir=ck_root)
    with os.fdopen(fd, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp_ptr, ck_root / "latest")
    _fsync(ck_root)
    _prune(ck_root, cfg.keep_last, keep=name)
    return final


def _complete(d: Path) -> bool:
    """A checkpoint directory with all three files."""
    return all((d / f).is_file() for f in ("model.safetensors", "ema.safetensors", "state.pt"))


def _step_dirs(ck_root: Path) -> list[Path]:
    """Complete step_N directories, oldest first."""
    dirs = [d for d in ck_root.glob("step_*") if d.is_dir() and d.name[5:].isdigit() and _complete(d)]
    return sorted(dirs, key=lambda d: int(d.name[5:]))


def _prune(ck_root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` checkpoints (rename first, so a kill leaves no half-deleted step_N)."""
    old = [d for d in _step_dirs(ck_root)[:-keep_last] if d.name != keep]
    for d in old:
        trash = Path(tempfile.mkdtemp(prefix=f".trash-{d.name}-", dir=ck_root))
        os.replace(d, trash / d.name)
    _clean_temp(ck_root)


def _clean_temp(ck_root: Path) -> None:
    """Remove temp and trash directories left by an interrupted save or prune."""
    for d in ck_root.glob(".t*-*"):
        if d.name.startswith((".tmp-", ".trash-")):
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` points to; else the newest complete step_N; None when there is none."""
    ck_root = Path(run_dir) / "checkpoints"
    pointer = ck_root / "latest"
    if pointer.is_file():
        d = ck_root / pointer.read_text().strip()
        if d.is_dir() and _complete(d):
            return d
    dirs = _step_dirs(ck_root) if ck_root.is_dir() else []
    return dirs[-1] if dirs else None


def load_state(ck_dir: Path) -> dict:
    """The training state of a checkpoint (weights_only: never unpickle arbitrary objects)."""
    return torch.load(Path(ck_dir) / "state.pt", map_location="cpu", weights_only=True)


def _rng_states() -> dict:
    """RNG states of every global generator (the trainer's own draws use step-seeded generators)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def _set_rng_states(states: dict) -> None:
    """Restore what _rng_states saved."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    version, keys, internal = states["python"]
    random.setstate((version, tuple(keys), internal))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


# ---------------------------------------------------------------- conditioning: text features and latents


class TextFeatures:
    """Text features per caption, computed once and cached (PAPER 4 conditioning; rectflow.text.CachedTextEncoder).

    A finite data set's captions are encoded up front, sorted and in fixed chunks, and kept in memory (when they fit
    in table_bytes); any other caption is encoded alone the first time it is seen. Either way a caption's features
    never depend on which batch it first appeared in, which exact resume needs (a batched encode may differ in the
    last bits with the batch's make-up).
    """

    def __init__(self, encoder, cache_dir: Path | None, table_bytes: int = 2**30):
        from rectflow.text import CachedTextEncoder
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

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B,L,Dc], pooled [B,Dp]) for the captions (on the CPU)."""
        pairs = [self.table[c] if c in self.table else tuple(t[0].cpu() for t in self.encoder.encode([c]))
                 for c in captions]
        return torch.stack([c for c, _ in pairs]), torch.stack([p for _, p in pairs])

    def drop(self, context, pooled, p, generator=None):
        """Per-encoder dropout (the wrapped encoder's)."""
        return self.encoder.drop(context, pooled, p, generator=generator)


def all_captions(dataset) -> list[str]:
    """Every caption of a finite data set (its caption list when it has one, else item by item)."""
    captions = getattr(dataset, "captions", None)
    if isinstance(captions, list) and len(captions) == len(dataset):
        return list(captions)
    return [dataset[i]["caption"] for i in range(len(dataset))]


@functools.lru_cache(maxsize=2)
def _frozen_text_encoder(spec: str, device: torch.device):
    """A loaded text encoder, shared by the runs of one process (it is frozen; loading takes seconds)."""
    from rectflow.text import load_text_encoder
    return load_text_encoder(spec).to(device).eval().requires_grad_(False)


class Batches:
    """Loads the inputs of any slice of a step's global batch: latents x0 and captions."""

    def __init__(self, dataset, cfg: TrainConfig, autoencoder, device, cache_dir: Path, ctx):
        self.dataset, self.cfg, self.ae, self.device = dataset, cfg, autoencoder, device
        self.n = len(dataset)
        self.latents = None
        if not _is_identity(autoencoder) and self.n < ENDLESS:
            self.latents = self._cached_latents(cache_dir, ctx)

    def _cached_latents(self, cache_dir: Path, ctx) -> torch.Tensor:
        """All latents of a finite data set, encoded once (rank 0) into cache_dir and read from there."""
        from rectflow.autoencoder import encode_dataset, load_latents
        key = hashlib.sha256(json.dumps([self.cfg.data, self.cfg.data_options, self.cfg.resolution,
                                         self.cfg.autoencoder, self.cfg.seed, self.n]).encode()).hexdigest()[:16]
        path = cache_dir / f"latents-{key}.safetensors"
        if ctx.is_main and not path.is_file():
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
            encode_dataset(self.ae, self.dataset, tmp)
            os.replace(tmp, path)
        distributed.barrier(ctx)
        return load_latents(path)["latents"]

    def load(self, indices: list[int]) -> tuple[torch.Tensor, list[str]]:
        """x0 (latents, on the device) and captions of the given data-set indices."""
        items = [self.dataset[i] for i in indices]
        captions = [it["caption"] for it in items]
        if self.latents is not None:
            return self.latents[indices].to(self.device), captions
        images = torch.stack([it["image"] for it in items]).to(self.device)
        if _is_identity(self.ae):
            return images, captions
        with torch.no_grad():
            return self.ae.encode(images).float(), captions


def _is_identity(autoencoder) -> bool:
    """Pixel-space training: nothing to encode or cache."""
    from rectflow.autoencoder import Identity
    return isinstance(autoencoder, Identity)


# ---------------------------------------------------------------- the model and the loss


def build_model(cfg: TrainConfig, in_channels: int, latent_size: int, context_dim: int, pooled_dim: int,
                context_splits: list[int] | None = None):
    """The network of the config: its MM-DiT (PAPER 4), or a baseline of `cfg.arch` at that MM-DiT's size.

    context_splits: token counts of the context's parts (SD3: [CLIP, T5]), the streams of mmdit3's extra weight set;
    None splits the context into halves (rectflow.models.baselines.MMDiT3).
    """
    from rectflow.models import baselines
    from rectflow.models.mmdit import MMDiT
    kw = {}
    if cfg.hidden is not None:
        kw["hidden_size"] = cfg.hidden
    if cfg.heads is not None:
        kw["num_heads"] = cfg.heads
    # a baseline only needs the MM-DiT's config and parameter count: build that on the meta device (no memory, no
    # init, no random draws, so the baseline's init is the same as if it were built alone)
    with torch.device("meta") if cfg.arch != "mmdit" else contextlib.nullcontext():
        model = MMDiT.from_depth(cfg.depth, patch_size=cfg.patch_size, in_channels=in_channels,
                                 context_dim=context_dim, pooled_dim=pooled_dim, input_size=latent_size,
                                 qk_norm=None if cfg.qk_norm == "none" else cfg.qk_norm, **kw)
    if cfg.arch != "mmdit":
        options = {"context_splits": context_splits} if cfg.arch == "mmdit3" else {}
        model = baselines.from_config(baselines.matched(cfg.arch, model, **options))
    model.gradient_checkpointing = cfg.grad_checkpointing
    warn_patch_bottleneck(cfg.patch_size, in_channels, model.config["hidden_size"])
    return model


def warn_patch_bottleneck(patch: int, channels: int, hidden: int) -> None:
    """Warn when a patch holds more values than the hidden width: the linear patch embedding and output layer then
    have rank `hidden`, so the velocity of the remaining directions is always zero and that part of the initial
    noise stays in every sample (sampling cannot remove it, however long the model trains)."""
    if patch * patch * channels > hidden:
        import warnings
        warnings.warn(f"patch_size {patch} x {patch} x {channels} channels = {patch * patch * channels} values per "
                      f"token exceeds the hidden width {hidden}: samples will keep "
                      f"{1 - hidden / (patch * patch * channels):.0%} of the noise; use a smaller patch_size or a "
                      f"larger hidden", stacklevel=3)


def context_splits(text) -> list[int] | None:
    """Token counts of the distinct sequence ranges of a text encoder's parts, in order (SD3: [CLIP, T5]); None
    when all parts share one range (MiniLM)."""
    spans = sorted({(part.seq.start or 0, part.seq.stop) for part in text.parts.values()})
    if len(spans) < 2 or any(stop is None for _, stop in spans):
        return None
    return [stop - start for start, stop in spans]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW of the config: the fused kernel (all tensors in one pass) where PyTorch has it for the parameters
    (float32 on CPU or CUDA), else PyTorch's default implementation.

    A resumed run keeps the implementation its checkpoint was written with (load_state_dict restores the param
    groups' `fused` flag), so runs checkpointed before the fused kernel was used continue exactly.
    """
    params = list(model.parameters())
    fused = getattr(torch, "_fused_adamw_", None) is not None and all(
        p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.effective_adam_eps,
                             weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))


def compute_loss(model, formulation, x0, context, pooled, t, eps, bf16: bool) -> torch.Tensor:
    """Per-sample loss of the formulation; the network runs under bf16 autocast, the loss maths in float32."""
    def model_fn(z_in, t_in):
        with torch.autocast(z_in.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(z_in, t_in, context, pooled)
        return out.float()
    return formulation.training_loss(model_fn, x0, t=t, eps=eps)


def default_prompts(cfg: TrainConfig, n: int = 8) -> list[str]:
    """Fixed prompts for sample grids: the first distinct captions of the data set's validation split."""
    from rectflow.data import get_dataset
    try:
        ds = get_dataset(cfg.data, cfg.resolution, split="val", seed=0, **cfg.data_options)
    except (ValueError, KeyError, FileNotFoundError):
        ds = get_dataset(cfg.data, cfg.resolution, split="train", seed=0, **cfg.data_options)
    prompts: list[str] = []
    for i in range(min(len(ds), 50 * n)):
        c = ds[i]["caption"]
        if c not in prompts:
            prompts.append(c)
        if len(prompts) == n:
            break
    return prompts


# ---------------------------------------------------------------- the trainer


def resolve_device(spec: str, ctx) -> torch.device:
    """'auto' -> cuda when available; under torchrun each process takes cuda:LOCAL_RANK."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
    return device


class Trainer:
    """One training run in a run directory; `fit()` trains from the latest checkpoint (or scratch) to max_steps."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, resume: bool = False):
        from rectflow.autoencoder import load_autoencoder
        from rectflow.data import get_dataset
        from rectflow.flow import Formulation

        self.cfg, self.run_dir = cfg.validate(), Path(run_dir)
        self.ctx = distributed.init("cuda" if cfg.device.startswith("cuda") or (
            cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.device = resolve_device(cfg.device, self.ctx)
        world = self.ctx.world_size
        if cfg.batch_size % (world * cfg.grad_accum):
            raise ValueError(f"config key 'batch_size': {cfg.batch_size} is not divisible by "
                             f"{world} processes x grad_accum {cfg.grad_accum}")
        self.micro = cfg.batch_size // (world * cfg.grad_accum)
        # text features: in memory, and on disk only in a chosen cache_dir (one small file per caption);
        # latents of finite data sets: in cache_dir, else <run>/cache
        text_cache = Path(cfg.cache_dir) / "text" if cfg.cache_dir else None
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.run_dir / "cache"

        self.formulation = Formulation.from_name(cfg.formulation)
        self.autoencoder = load_autoencoder(cfg.autoencoder).to(self.device).eval()
        self.text = TextFeatures(_frozen_text_encoder(cfg.text_encoder, self.device), text_cache)
        self.text_drop = cfg.effective_text_drop(len(self.text.encoder_names))  # null: automatic, per encoder count
        if cfg.resolution % self.autoencoder.factor or (cfg.resolution // self.autoencoder.factor) % cfg.patch_size:
            raise ValueError(f"config key 'resolution': {cfg.resolution} px is not a multiple of autoencoder factor "
                             f"{self.autoencoder.factor} x patch_size {cfg.patch_size}")
        side = cfg.resolution // self.autoencoder.factor
        self.latent_shape = (self.autoencoder.channels, side, side)
        try:
            self.dataset = get_dataset(cfg.data, cfg.resolution, split="train", seed=cfg.seed, **cfg.data_options)
        except TypeError as err:  # an option the data set does not take
            raise ValueError(f"config key 'data_options': {err}") from None
        self.batches = Batches(self.dataset, cfg, self.autoencoder, self.device, self.cache_dir, self.ctx)
        if len(self.dataset) < ENDLESS and not self.text.prepare(all_captions(self.dataset)):
            print(f"rectflow train: the {len(self.dataset)} captions' text features do not fit in memory; encoding "
                  f"them as they come (set cache_dir to keep them on disk)", file=sys.stderr)

        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, self.autoencoder.channels, side, self.text.context_dim, self.text.pooled_dim,
                                 context_splits(self.text)).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.net = self.model
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel
            # the last block's context stream only feeds keys and values: its query norm gets no gradient
            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                               if self.device.type == "cuda" else None, find_unused_parameters=True)
        self.opt = make_optimizer(self.model, cfg)
        self.step, self.skipped, self.bad_streak, self.images_seen = 0, 0, 0, 0
        self.prompts = (cfg.sample_prompts or default_prompts(cfg)) if cfg.sample_every and self.ctx.is_main else []
        if resume:
            self._resume()
        self._writer = None

    # ---- persistence

    def _state(self) -> dict:
        """Everything besides the weights needed to continue exactly."""
        return {"version": STATE_VERSION, "step": self.step, "optimizer": self.opt.state_dict(),
                "skipped": self.skipped, "bad_streak": self.bad_streak, "images_seen": self.images_seen,
                "data_position": self.step * self.cfg.batch_size, "world_size": self.ctx.world_size,
                "rng": _rng_states(), "config": json.dumps(self.cfg.to_dict())}

    def _resume(self) -> None:
        """Load the latest checkpoint of the run directory, if any."""
        ck = find_checkpoint(self.run_dir)
        if ck is None:
            return
        state = load_state(ck)
        self.model.load_state_dict(load_file(str(ck / "model.safetensors"), device=str(self.device)))
        self.ema.load_state_dict(load_file(str(ck / "ema.safetensors"), device=str(self.device)))
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.skipped = state["step"], state["skipped"]
        self.bad_streak, self.images_seen = state["bad_streak"], state["images_seen"]
        _set_rng_states(state["rng"])
        if self.ctx.is_main:
            print(f"rectflow train: resuming from {ck} (step {self.step})", file=sys.stderr)

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0)."""
        if not self.ctx.is_main:
            return None
        return save_checkpoint(self.run_dir, self.step, self.model, self.ema, self._state(), self.cfg)

    # ---- one step

    def train_step(self) -> dict:
        """Optimizer step number self.step (0-based) on the global batch of that step; returns its metrics."""
        cfg, step, B, world = self.cfg, self.step, self.cfg.batch_size, self.ctx.world_size
        lr = lr_at(step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        indices = step_indices(cfg.seed, step, B, len(self.dataset))
        # t and noise of the whole global batch, drawn identically on every rank, each rank uses its slice
        t_all = self.formulation.sample_t(B, generator=generator_for(cfg.seed, step, "t"), shift=cfg.shift)
        g_eps = torch.Generator(self.device).manual_seed(seed_for(cfg.seed, step, "eps"))
        eps_all = torch.randn((B, *self.latent_shape), generator=g_eps, device=self.device)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for a in range(cfg.grad_accum):
            lo = (a * world + self.ctx.rank) * self.micro
            sl = slice(lo, lo + self.micro)
            x0, captions = self.batches.load(indices[sl])
            context, pooled = self._conditioning(captions, step, range(lo, lo + self.micro))
            last = a == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not self.ctx.enabled else self.net.no_sync()
            with sync:
                per_sample = compute_loss(self.net, self.formulation, x0, context, pooled,
                                          t_all[sl].to(self.device), eps_all[sl], cfg.bf16)
                # sum / B per rank; DDP averages over ranks, hence the world factor
                (per_sample.sum() * (world / B)).backward()
            loss_sum += per_sample.detach().double().sum()
        loss = distributed.all_reduce_sum(loss_sum, self.ctx).item() / B
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        ok = math.isfinite(loss) and math.isfinite(grad_norm)
        if ok:
            self.opt.step()
            self.bad_streak = 0
            if (step + 1) % cfg.ema_every == 0:
                update = (step + 1) // cfg.ema_every - 1
                ema_update(self.ema, self.model, ema_decay_at(update, cfg.ema_decay, cfg.ema_warmup))
        else:
            self.opt.zero_grad(set_to_none=True)
            self.skipped += 1
            self.bad_streak += 1
        self.step += 1
        self.images_seen += B
        return {"step": self.step, "loss": loss if ok else None, "lr": lr,
                "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                **({} if ok else {"nonfinite": True, "bad_loss": repr(loss), "bad_grad_norm": repr(grad_norm)})}

    def _conditioning(self, captions: list[str], step: int, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached text features with per-encoder dropout; each sample's dropout draw is seeded by its batch slot."""
        context, pooled = self.text.encode(captions)
        if self.text_drop > 0:
            pairs = [self.text.drop(context[i:i + 1], pooled[i:i + 1], self.text_drop,
                                    generator=generator_for(self.cfg.seed, step, "text-drop", pos))
                     for i, pos in enumerate(positions)]
            context, pooled = torch.cat([c for c, _ in pairs]), torch.cat([p for _, p in pairs])
        return context.to(self.device), pooled.to(self.device)

    # ---- logging

    def _open_logs(self):
        """metrics.jsonl (cut back to the resumed step) and the TensorBoard writer (purged likewise)."""
        from torch.utils.tensorboard import SummaryWriter
        path = self.run_dir / "metrics.jsonl"
        kept = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if rec.get("step", 0) <= self.step:
                    kept.append(line)
        write_text_atomic(path, "".join(k + "\n" for k in kept))  # a kill now keeps the old lines or the cut ones
        self._metrics = open(path, "a", buffering=1)
        self._writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step + 1 if self.step else None)

    def write_samples(self) -> Path:
        """A captioned grid of the fixed prompts from the EMA weights (rank 0), in samples/ and TensorBoard."""
        from rectflow.sample import Pipeline, generate, save_images
        pipe = Pipeline(self.ema, self.formulation, self.text, self.autoencoder, self.cfg.resolution,
                        self.cfg.to_dict(), source=str(self.run_dir))
        settings = {"steps": self.cfg.sample_steps, "solver": self.cfg.sample_solver, "cfg_scale": self.cfg.sample_cfg,
                    "shift": self.cfg.shift, "seed": self.cfg.seed}
        images = generate(pipe, self.prompts, bf16=self.cfg.bf16, **settings)
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        grid = save_images(images, self.prompts, path, {**settings, "run": str(self.run_dir), "train_step": self.step,
                                                        "weights": "ema"}, singles=False)
        self._writer.add_image("samples", np.asarray(grid), self.step, dataformats="HWC")
        return path

    # ---- the loop

    def fit(self) -> Path:
        """Train to max_steps; returns the run directory."""
        from tqdm import tqdm
        cfg, main = self.cfg, self.ctx.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "checkpoints").mkdir(exist_ok=True)
            _clean_temp(self.run_dir / "checkpoints")
            cfg.save(self.run_dir / "config.yaml")
            self._open_logs()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not main, unit="step", dynamic_ncols=True)
        start, window = time.perf_counter(), []
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                metrics = self.train_step()
                dt = time.perf_counter() - t0
                window = (window + [dt])[-cfg.log_every:]
                metrics["img_per_s"] = cfg.batch_size / dt
                metrics["time"] = time.perf_counter() - start
                bar.update(1)
                if main:
                    self._log(metrics, bar, window)
                if self.bad_streak >= cfg.max_bad_steps:
                    last = find_checkpoint(self.run_dir)
                    raise TrainingAborted(
                        f"training aborted at step {self.step}: {self.bad_streak} non-finite losses or gradient norms "
                        f"in a row (max_bad_steps = {cfg.max_bad_steps}); the last good checkpoint is "
                        f"{last if last else 'none (no checkpoint was written)'}. Try a lower lr, qk_norm: rms, "
                        f"grad_clip, or bf16: false.")
                done = self.step == cfg.max_steps
                # a skipped step left the weights as they were (good): checkpoint as usual; only an abort does not
                if done or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                    self.save()
                if main and cfg.sample_every and self.prompts and (done or self.step % cfg.sample_every == 0):
                    self.write_samples()
        finally:
            bar.close()
            if main and self._writer is not None:
                self._metrics.close()
                self._writer.close()
        return self.run_dir

    def _log(self, metrics: dict, bar, window: list[float]) -> None:
        """One metrics.jsonl line per step; TensorBoard and the progress bar every log_every steps."""
        self._metrics.write(json.dumps(metrics) + "\n")
        if self.step % self.cfg.log_every and self.step != self.cfg.max_steps:
            return
        img_s = self.cfg.batch_size * len(window) / sum(window)
        for key in ("loss", "lr", "grad_norm"):
            if metrics.get(key) is not None:
                self._writer.add_scalar(f"train/{key}", metrics[key], self.step)
        self._writer.add_scalar("train/img_per_s", img_s, self.step)
        self._writer.add_scalar("train/skipped_steps", self.skipped, self.step)
        loss = metrics["loss"]
        bar.set_postfix(loss="nan" if loss is None else f"{loss:.4f}", img_s=f"{img_s:.1f}", skipped=self.skipped)


def train(cfg: TrainConfig, out: str | Path, resume: bool = False) -> Path:
    """Train (or continue with resume=True) the run in `out`; returns the run directory."""
    trainer = Trainer(cfg, out, resume=resume)
    try:
        return trainer.fit()
    finally:
        distributed.shutdown(trainer.ctx)


# ---------------------------------------------------------------- command line


def _flag(name: str) -> str:
    """Field name -> command-line flag."""
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`rectflow train` options: the run, the config file, overrides, and one flag per config field."""
    parser.add_argument("--out", default=None, help="run directory (config.yaml, checkpoints, logs, samples); "
                        "default runs/<date-time>")
    parser.add_argument("--config", default=None, help="YAML file of config fields (see configs/ and "
                        "docs/training.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field (value parsed as YAML; repeatable; applied last); "
                             "data_options.NAME=VALUE sets one data option")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint "
                        "(exactly: the same losses as an uninterrupted run)")
    group = parser.add_argument_group("config fields (defaults shown; see docs/training.md)")
    defaults = TrainConfig()
    for name, f in FIELDS.items():
        tp, nullable = field_type(name)
        base = getattr(tp, "__origin__", tp)
        default = getattr(defaults, name)
        help_text = f"{f.metadata['help']} (default: {default!r})".replace("%", "%%")
        kw = dict(default=argparse.SUPPRESS, help=help_text, dest=f"cfg_{name}")
        if base is bool:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **kw)
        elif base is list:
            group.add_argument(_flag(name), nargs="+", type=float if name == "betas" else str,
                               metavar=name[:-1].upper() if name.endswith("s") else name.upper(), **kw)
        elif base is dict:
            continue  # only through the config file or --set data_options.NAME=VALUE
        else:
            choices = f.metadata.get("choices")
            group.add_argument(_flag(name), type=base, choices=choices, metavar=None if choices else name.upper(), **kw)


def config_from_args(args) -> TrainConfig:
    """Defaults < --config < direct flags < --set; on --resume the run's saved config replaces the defaults, and
    --config, flags and --set act on it as overrides that may only change RESUME_CHANGEABLE fields."""
    saved = Path(args.out) / "config.yaml" if args.out else None
    if args.resume:
        if saved is None or not saved.is_file():
            raise ValueError(f"--resume: no run to continue in {args.out!r} (config.yaml missing)")
        base = load_config(saved)
        start = load_config(args.config, base=base) if args.config else base
    else:
        base = start = load_config(args.config) if args.config else TrainConfig()
    flags = {name[4:]: value for name, value in vars(args).items() if name.startswith("cfg_")}
    cfg = apply_overrides(apply_dict(start, flags, source="command line"), args.overrides).validate()
    if args.resume:
        check_resume_changes(base, cfg, source=f"--resume of {saved}")
    return cfg


def check_resume_changes(old: TrainConfig, new: TrainConfig, source: str = "--resume") -> None:
    """Refuse config changes that would make a resumed run differ from an uninterrupted one."""
    before, after = old.to_dict(), new.to_dict()
    changed = {k for k, v in after.items() if before[k] != v}
    fixed = changed - RESUME_CHANGEABLE
    if fixed:
        detail = "; ".join(f"{k}: {before[k]!r} -> {after[k]!r}" for k in sorted(fixed))
        raise ValueError(f"{source}: cannot change {detail} (that would break exact continuation); changeable: "
                         f"{', '.join(sorted(RESUME_CHANGEABLE))}")
    if "max_steps" in changed and old.lr_schedule == "cosine":
        # the cosine decay reaches min_lr at max_steps: another max_steps changes the learning rate of every step
        raise ValueError(f"{source}: cannot change max_steps ({old.max_steps} -> {new.max_steps}) of a run with "
                         f"lr_schedule 'cosine': the learning rate of every step after warm-up depends on it; "
                         f"start a new run (max_steps may change on resume with lr_schedule 'constant')")


def run(args) -> int:
    """Entry point of `rectflow train`."""
    if args.out is None:
        args.out = time.strftime("runs/%Y%m%d-%H%M%S")
    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"rectflow train: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if not args.resume and find_checkpoint(out) is not None:
        print(f"rectflow train: {out} already holds a run; pass --resume to continue it or choose another --out",
              file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg, out, resume=args.resume)
    except (ValueError, OSError) as err:  # the config names something that cannot be built or found
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        print(f"rectflow train: {err}", file=sys.stderr)
        return 2
    try:
        trainer.fit()
    except TrainingAborted as err:
        print(f"rectflow train: {err}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown(trainer.ctx)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"rectflow train: run written to {out}", file=sys.stderr)
    return 0
