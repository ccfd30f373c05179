"""The training loop: `Trainer(cfg, run_dir).fit()` trains an MM-DiT (or a baseline of the architecture study) with
any formulation of docs/paper.md §1-3 to max_steps, from scratch or from the run's latest checkpoint.

The data path: data set -> (autoencoder latents, text features; both cached, rectflow.training.data) -> the
formulation draws t and noise and builds z_t -> model -> the formulation's per-sample loss -> mean over the global
batch. AdamW with warm-up and an optional cosine decay and an EMA of the weights (rectflow.training.optim), bf16
autocast, gradient accumulation and torchrun (DDP, rectflow.training.distributed).

Exact resume: every random draw of a step (data indices, t, noise, text dropout) comes from generators seeded by
(seed, step, purpose) (rectflow.training.randomness), so step n sees the same inputs whether or not the run was
interrupted; checkpoints (rectflow.training.checkpoint) hold everything else. The run directory's layout:
rectflow.runs.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from rectflow.autoencoder import load_autoencoder
from rectflow.config import TrainConfig
from rectflow.data import get_dataset
from rectflow.devices import native_bf16, resolve_device
from rectflow.evaluate.val_loss import validation_inputs, validation_loss
from rectflow.files import write_text_atomic
from rectflow.flow import Formulation
from rectflow.images import save_images
from rectflow.models.flops import forward_flops, peak_flops
from rectflow.models.layers import compile_blocks
from rectflow.models.mmdit import RECTFLOW_TOKENS
from rectflow.runs import (CONFIG, METRICS, WEIGHT_FILES, check_resumable, checkpoint_root, clean_temp, find_checkpoint,
                           is_sharded)
from rectflow.pipeline import DEFAULTS_FOR_RELEASED, Pipeline, generate
from rectflow.training import distributed
from rectflow.training.checkpoint import (STATE_VERSION, ShardedCheckpoints, load_sharded_training, load_state,
                                          save_checkpoint, weights_metadata)
from rectflow.training.data import (ENDLESS, Batches, TextFeatures, all_captions, data_options, default_prompts,
                                    frozen_text_encoder, is_identity, step_indices)
from rectflow.training.dpo import pair_losses
from rectflow.training.finetune import (LoRATraining, attach_lora, check_fits, init_shapes, init_weights_path,
                                        load_init)
from rectflow.training.model import (block_output, build_model, compute_loss, context_splits, dispersive_loss,
                                     negative_indices, route_blocks, route_indices)
from rectflow.training.parallel import (OPTIMIZER_FORMAT, all_finite, device_mesh, full_model_state,
                                        full_optimizer_state, load_full_optimizer_state, load_full_state, reshard,
                                        shard)
from rectflow.training.prior import PriorPreservation
from rectflow.training.stream import StreamBatches, check_cached
from rectflow.training.optim import ema_decay_at, ema_update, lr_at, make_optimizer
from rectflow.training.randomness import generator_for, rng_states, seed_for, set_rng_states


class TrainingAborted(RuntimeError):
    """Too many non-finite steps in a row; the last checkpoint written is still the last good one."""



class StepProfiler:
    """A torch profiler trace (Chrome format) of `count` steps from step `first` on (profile_steps)."""

    def __init__(self, folder: Path, first: int, count: int, device: torch.device):
        self.folder, self.first, self.last, self.prof = folder, first, first + count - 1, None
        self.device = device
        if not count:
            self.last = -1

    def _maybe_start(self, done: int) -> None:
        if self.prof is None and done + 1 == self.first:
            from torch.profiler import ProfilerActivity, profile  # only profiled runs pay its import
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=activities, record_shapes=True)
            self.prof.__enter__()

    def after_step(self, done: int) -> None:
        """Called with the number of steps done: starts before `first`, stops and writes after `last`."""
        if self.prof is not None and done >= self.last:
            self.close()
            self.last = -1
        elif self.last >= 0:
            self._maybe_start(done)

    def close(self) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.folder.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(self.folder / f"trace_steps_{self.first}-{self.last}.json"))
            self.prof = None


class Trainer:
    """One training run in a run directory; `fit()` trains from the latest checkpoint (or scratch) to max_steps."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, resume: bool = False, from_last_good: bool = False):
        """resume: continue from the run's latest checkpoint; from_last_good: even when the newest one is damaged
        (else that is an error, rectflow.runs.check_resumable)."""
        self.cfg, self.run_dir = cfg.validate(), Path(run_dir)
        self.ctx = distributed.init(resolve_device(cfg.device).type)
        self.device = resolve_device(cfg.device, self.ctx.local_rank if self.ctx.enabled else None)
        self.bf16, self.precision_note = self._autocast_bf16()  # the note is said when training starts (fit)
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
        self.text = TextFeatures(frozen_text_encoder(cfg.text_encoder, self.device), text_cache)
        # null: automatic, per encoder count; DPO compares the two images of a pair under their prompt: no dropout
        self.text_drop = 0.0 if cfg.objective == "dpo" else cfg.effective_text_drop(len(self.text.encoder_names))
        # an init model's patch size (from its header) sets the latent grid and the bucket sides; its weights are
        # loaded after the text encoders are released (_release_encoders), so both are never in memory together
        self.init, self.lora = None, None
        init_path = init_weights_path(cfg.init) if cfg.init else None
        shapes = init_shapes(init_path) if cfg.init else None
        self.patch = shapes["patch_size"] if cfg.init else cfg.patch_size
        side = self._latent_side()
        if cfg.init:
            check_fits(shapes, self.text, self.autoencoder, side, init_path)
        self.latent_shape = (self.autoencoder.channels, side, side)
        self.dataset = self._dataset()
        self.streaming = getattr(self.dataset, "streaming", False)  # shards: read as streams, not indexed
        if cfg.objective == "dpo" and not hasattr(self.dataset, "n_pairs"):
            raise ValueError(f"config key 'data': objective dpo trains on preference pairs, {cfg.data!r} has none "
                             f"(give a preferences .jsonl: rectflow preferences writes one)")
        if self.streaming:
            check_cached(self.dataset, self.autoencoder, cfg.text_encoder, cfg.resolution)
            self.batches = StreamBatches(self.dataset, self.autoencoder, self.device, self.ctx, self.micro,
                                         cfg.workers)
        else:
            self.batches = Batches(self.dataset, cfg, self.autoencoder, self.device, self.cache_dir, self.ctx,
                                   bf16=self.bf16)
        self._saved_streams = None  # a resumed run's stream positions
        if self.finite and not self.text.prepare(all_captions(self.dataset)):
            print(f"rectflow train: the {len(self.dataset)} captions' text features do not fit in memory; encoding "
                  f"them as they come (set cache_dir to keep them on disk)", file=sys.stderr)
        # the processes that draw grids and validate: rank 0, or under FSDP all (the EMA's forward is collective)
        self.evaluates = self.ctx.is_main or (self.ctx.enabled and cfg.parallel != "ddp")
        self.prompts = (cfg.sample_prompts or default_prompts(cfg)) if cfg.sample_every and self.evaluates else []
        self._val = None  # the validation inputs: prepared at the first validation
        self._release_encoders()
        torch.manual_seed(cfg.seed)
        self._build_model(side)
        if cfg.route_fraction:
            route_blocks(cfg, len(self.model.joint_blocks))  # checked before any step
        self.prior = None
        if cfg.class_prompt is not None:  # drawn by the model as loaded: the base (a resume loads its weights later)
            self.prior = PriorPreservation(cfg, init_path, self.latent_shape, self.cache_dir)
            self.model.eval()
            self.prior.prepare(self._pipeline(self.model), self._sample_settings(), self.ctx, self.run_dir, self.bf16)
            self.model.train()
        self._parallelize()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.trainable, cfg, self.model)
        self.sharded = ShardedCheckpoints(self.run_dir, cfg, self.ctx) if cfg.checkpoint_format == "sharded" else None
        self._flops = self._train_flops_per_image()
        self._peak = peak_flops(self.device)
        self.step, self.skipped, self.bad_streak, self.images_seen = 0, 0, 0, 0
        self._writer = None
        if resume:
            self._resume(from_last_good)

    # ---- construction

    def _autocast_bf16(self) -> tuple[bool, str | None]:
        """(bf16 autocast, a note for the user or None): cfg.bf16, except on a CPU that only emulates bf16
        (rectflow.devices.native_bf16), where it runs 3-90x slower than fp32: a run there trains in fp32 and says so.
        A LoRA over bf16 frozen weights and FSDP mixed precision keep bf16 (their bf16 weights need it)."""
        cfg = self.cfg
        bf16_weights = (cfg.lora and cfg.effective_frozen_dtype == "bf16") or cfg.fsdp_mixed_precision
        if not cfg.bf16 or bf16_weights or native_bf16(self.device):
            return cfg.bf16, None
        return False, ("rectflow train: bf16: true, but this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 "
                       "matmuls run 3-90x slower than fp32: training in fp32 (RECTFLOW_CPU_BF16=1 forces bf16)")

    def _latent_side(self) -> int:
        """The latent side of the square resolution (the pixel budget of buckets), checked against the grid."""
        cfg, factor = self.cfg, self.autoencoder.factor
        if cfg.resolution % factor or (cfg.resolution // factor) % self.patch:
            raise ValueError(f"config key 'resolution': {cfg.resolution} px is not a multiple of autoencoder factor "
                             f"{factor} x patch size {self.patch}")
        return cfg.resolution // factor

    def _dataset(self):
        """The training split, in aspect-ratio buckets with sides of whole patches when cfg.buckets."""
        cfg, options = self.cfg, data_options(self.cfg)
        if cfg.buckets:
            options["buckets"] = self.autoencoder.factor * self.patch
        try:
            return get_dataset(cfg.data, cfg.resolution, split="train", seed=cfg.seed, **options)
        except TypeError as err:  # an option the data set does not take
            for key, option in (("buckets", "buckets"), ("instance_prompt", "default_caption")):
                if option in str(err):
                    raise ValueError(f"config key {key!r}: {cfg.data!r} does not take {key} (folders of images "
                                     f"do)") from None
            raise ValueError(f"config key 'data_options': {err}") from None

    def _check_init_tokens(self) -> None:
        """The init model's register tokens and text positions are its own: a config asking for others is refused
        (they are weights of the file, like its depth, not something a fine-tune can switch)."""
        config = getattr(self.model, "config", {})
        for key in RECTFLOW_TOKENS:
            want, have = getattr(self.cfg, key), config.get(key, 0)
            if want and want != have:
                raise ValueError(f"config key {key!r}: {want}, but the init model {self.init.path} has {have}; the "
                                 f"architecture comes from the init weights (leave {key} at 0)")

    def _build_model(self, side: int) -> None:
        """The network (new, or the init weights with a LoRA attached) and its EMA (of the LoRA only)."""
        cfg = self.cfg
        self.init = load_init(cfg.init) if cfg.init else None
        if self.init is None:
            self.model = build_model(cfg, self.autoencoder.channels, side, self.text.context_dim,
                                     self.text.pooled_dim, context_splits(self.text))
        else:
            self.model = self.init.model
            self._check_init_tokens()
            self.model.gradient_checkpointing = cfg.checkpoint_every_block
        self.uncond_prompt = self.init.uncond_prompt if self.init else None
        if cfg.lora:
            attach_lora(self.model, cfg)
        self.model.to(self.device)
        if cfg.compile:
            compile_blocks(self.model)
        # a LoRA run keeps an EMA of its adapters only (LoRATraining, set up in _parallelize)
        self.ema = None if cfg.lora else copy.deepcopy(self.model).eval().requires_grad_(False)

    @property
    def finite(self) -> bool:
        """A data set read by index whose every item can be listed (not endless shapes, not a stream)."""
        return not self.streaming and len(self.dataset) < ENDLESS

    def _parallelize(self) -> None:
        """Wrap the model for several processes (DDP, or FSDP2 sharding of the model and its EMA), then set up the
        LoRA's bookkeeping over the (possibly sharded) adapters."""
        cfg = self.cfg
        self.net = self.model
        self.fsdp = self.ctx.enabled and cfg.parallel in ("fsdp", "hsdp")
        if self.fsdp and cfg.fsdp_cpu_offload and self.device.type != "cuda":
            raise ValueError(f"config key 'fsdp_cpu_offload': offloading keeps the weights on the CPU while a GPU "
                             f"computes; this run computes on {self.device} (set it to false)")
        if self.fsdp:
            mesh = device_mesh(cfg.parallel, self.ctx.world_size, cfg.fsdp_shard_size, self.device.type)
            mixed = self.bf16 if cfg.fsdp_mixed_precision is None else cfg.fsdp_mixed_precision
            shard(self.model, mesh, mixed, cfg.fsdp_cpu_offload)
            if self.ema is not None:
                shard(self.ema, mesh, cpu_offload=cfg.fsdp_cpu_offload)
        elif self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel
            # the last block's context stream only feeds keys and values: its query norm gets no gradient
            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                               if self.device.type == "cuda" else None, find_unused_parameters=True)
        if cfg.lora:
            self.lora = LoRATraining(self.model, self.init.path)

    def _train_flops_per_image(self) -> float | None:
        """Model FLOPs of one image's training step (3x the forward: backward is twice it) for MFU; None for the
        architecture-study baselines."""
        config = self.model.config
        if "arch" in config:
            return None
        side = self.latent_shape[1]
        return 3 * forward_flops(config, side, side, self.text.seq_len)

    def _device_metrics(self, dt: float) -> dict:
        """On a GPU: the step's peak memory (GiB) and, where the device's peak is known, model FLOP utilisation."""
        out = {}
        if self.device.type == "cuda":
            out["mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        if self._flops and self._peak:
            out["mfu"] = self._flops * self.cfg.batch_size / dt / (self._peak * self.ctx.world_size)
        return out

    def _release_encoders(self) -> None:
        """Free the text encoders and the autoencoder's encoder when nothing will need them: every caption of a
        finite data set encoded, its latents cached, and the sample prompts (with CFG's "") and validation inputs
        prepared first (release_encoders; null: for encoders over 100M parameters)."""
        cfg, text = self.cfg, self.text
        wanted = cfg.release_encoders
        if wanted is None:
            wanted = sum(p.numel() for p in text.encoder.encoder.parameters()) > 100e6
        # precomputed shards with text features (rectflow cache) need neither encoder either
        cached = self.streaming and (self.dataset.cached or {}).get("text_encoder") is not None
        captions_ready = cached or (self.finite and all(c in text.table for c in all_captions(self.dataset)))
        latents_ready = cached or self.batches.cache is not None or is_identity(self.autoencoder)
        if not (wanted and captions_ready and latents_ready):
            return
        # every rank conditions on "" (CFG's) and the class prompt; the grid prompts and validation are the evaluators'
        text.prepare(self.prompts + [""] + ([cfg.class_prompt] if cfg.class_prompt else []))
        if self.evaluates and cfg.val_every:
            self.validation_inputs()
        text.release()
        frozen_text_encoder.cache_clear()
        self.autoencoder.release_encoder()

    # ---- persistence

    def _state(self, streams: dict | None) -> dict:
        """Everything besides the weights needed to continue exactly (streams: the shard streams' positions)."""
        return {"version": STATE_VERSION, "step": self.step, "optimizer": self.opt.state_dict(),
                "skipped": self.skipped, "bad_streak": self.bad_streak, "images_seen": self.images_seen,
                "data_position": self.step * self.cfg.batch_size, "world_size": self.ctx.world_size,
                "rng": rng_states(), "config": json.dumps(self.cfg.to_dict()),
                **({"data_streams": streams} if streams is not None else {})}

    def _resume(self, from_last_good: bool) -> None:
        """Load the latest loadable checkpoint of the run directory, if any."""
        ck = check_resumable(self.run_dir, from_last_good)
        if ck is None:
            return
        state = load_state(ck)
        if is_sharded(ck):
            load_sharded_training(ck, self.model, self.ema, self.opt, self.ctx)
        elif self.lora is not None:
            self.lora.load(ck)
        elif self.fsdp:
            load_full_state(self.model, load_file(str(ck / WEIGHT_FILES["raw"])))
            load_full_state(self.ema, load_file(str(ck / WEIGHT_FILES["ema"])))
        else:
            self.model.load_state_dict(load_file(str(ck / WEIGHT_FILES["raw"]), device=str(self.device)))
            self.ema.load_state_dict(load_file(str(ck / WEIGHT_FILES["ema"]), device=str(self.device)))
        if state.get("optimizer_format") == OPTIMIZER_FORMAT:  # written by a sharded run: keyed by parameter name
            load_full_optimizer_state(self.model, self.opt, state["optimizer"])
        elif not is_sharded(ck):  # (a sharded checkpoint's is in its model.dcp, loaded above)
            self.opt.load_state_dict(state["optimizer"])
        self.step, self.skipped = state["step"], state["skipped"]
        self.bad_streak, self.images_seen = state["bad_streak"], state["images_seen"]
        self._saved_streams = state.get("data_streams")
        set_rng_states(state["rng"])
        if self.ctx.is_main:
            print(f"rectflow train: resuming from {ck} (step {self.step})", file=sys.stderr)

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0), unless a weight is not finite: a checkpoint is always good. Under
        FSDP every rank first gathers the full weights, EMA and optimizer state, and streams gather their positions
        (collectives)."""
        streams = self.batches.positions() if self.streaming else None
        if self.sharded is not None:
            return self._save_sharded(streams)
        if not (self.ctx.is_main or self.fsdp):
            return None
        state, state_dicts, adapters = self._state(streams), None, None
        if self.fsdp:
            state.update(optimizer=full_optimizer_state(self.model, self.opt), optimizer_format=OPTIMIZER_FORMAT)
            if self.lora is not None:
                adapters = self.lora.full()
            else:
                state_dicts = (full_model_state(self.model), full_model_state(self.ema))
        if not self.ctx.is_main:
            return None
        if self.lora is not None:
            bad = self.lora.nonfinite(adapters)
        else:
            model_sd, ema_sd = state_dicts or (dict(self.model.named_parameters()), dict(self.ema.named_parameters()))
            bad = next((f"{kind}.{k}" for kind, sd in (("model", model_sd), ("ema", ema_sd)) for k, v in sd.items()
                        if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            print(f"rectflow train: step {self.step}: not writing a checkpoint, {bad} holds non-finite values; the "
                  f"last good checkpoint is {find_checkpoint(self.run_dir) or 'none'}", file=sys.stderr)
            return None
        return save_checkpoint(self.run_dir, self.step, self.model, self.ema, state, self.cfg, self.lora,
                               self.uncond_prompt, state_dicts=state_dicts, adapters=adapters)

    def _save_sharded(self, streams: dict | None) -> None:
        """Start a sharded checkpoint of the current step on every rank (it appears once all shards are written),
        unless a weight is not finite on any rank."""
        bad = torch.tensor([float(not all_finite(m)) for m in (self.model, self.ema)], device=self.device)
        bad = distributed.all_reduce_sum(bad, self.ctx).tolist()
        if any(bad):
            if self.ctx.is_main:
                kind = "model" if bad[0] else "ema"
                print(f"rectflow train: step {self.step}: not writing a checkpoint, the {kind} weights hold non-finite "
                      f"values; the last good checkpoint is {find_checkpoint(self.run_dir) or 'none'}",
                      file=sys.stderr)
            return None
        state = {**self._state(streams), "optimizer": None, "optimizer_format": "dcp"}
        metadata = {kind: weights_metadata(m, self.cfg, self.step, kind, self.uncond_prompt)
                    for kind, m in (("raw", self.model), ("ema", self.ema))}
        self.sharded.save(self.step, self.model, self.ema, self.opt, state, metadata)
        return None

    # ---- one step

    def train_step(self) -> dict:
        """Optimizer step number self.step (0-based) on the global batch of that step; returns its metrics."""
        cfg, step, B, world = self.cfg, self.step, self.cfg.batch_size, self.ctx.world_size
        lr = lr_at(step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        dpo = cfg.objective == "dpo"  # indices: preference pairs (rectflow.training.dpo), else data-set items
        indices, eps_all = (None, None) if self.streaming else (self.batches.indices(step), None)
        if dpo:
            indices = step_indices(cfg.seed, step, B, self.dataset.n_pairs)
        # t and noise of the whole global batch, drawn identically on every rank, each rank uses its slice
        t_all = self.formulation.sample_t(B, generator=generator_for(cfg.seed, step, "t"), shift=cfg.shift)
        if indices is not None:
            g_eps = torch.Generator(self.device).manual_seed(seed_for(cfg.seed, step, "eps"))
            eps_all = torch.randn((B, *self.batches.latent_shape(indices[0])), generator=g_eps, device=self.device)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # prior, DPO won, DPO margin, dispersive
        prior = self.prior.step_inputs(step, B, self.formulation, self.device) if self.prior else None
        data_wait, seen = 0.0, []  # seconds this step waited for its inputs; (slot, sample ids) per micro-batch
        for a in range(cfg.grad_accum):
            lo = (a * world + self.ctx.rank) * self.micro
            sl = slice(lo, lo + self.micro)
            t_data = time.perf_counter()
            x0, captions, eps, ids, features = self._micro_inputs(step, sl, indices, eps_all)
            data_wait += time.perf_counter() - t_data
            seen.append((lo, ids))
            context, pooled = self._conditioning(captions, step, range(lo, lo + self.micro), features)
            with self._grad_sync(last=a == cfg.grad_accum - 1):
                per_sample, total = self._micro_loss(step, lo, x0, captions, context, pooled, eps,
                                                     t_all[sl].to(self.device), prior, sums)
                # sum / B per rank; DDP averages over ranks, hence the world factor
                (total * (world / B)).backward()
            loss_sum += per_sample.detach().double().sum()
        loss = distributed.all_reduce_sum(loss_sum, self.ctx).item() / B
        sums = (distributed.all_reduce_sum(sums, self.ctx) / B).tolist()
        prior_loss = sums[0] if prior is not None else None
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm).item()
        ok = math.isfinite(loss) and math.isfinite(grad_norm)
        if ok:
            self.opt.step()
            self.bad_streak = 0
            if (step + 1) % cfg.ema_every == 0:
                decay = ema_decay_at((step + 1) // cfg.ema_every - 1, cfg.ema_decay, cfg.ema_warmup, cfg.ema_power)
                if self.lora is not None:
                    self.lora.ema_update(decay)
                else:
                    ema_update(self.ema, self.model, decay)
        else:
            self.opt.zero_grad(set_to_none=True)
            self.skipped += 1
            self.bad_streak += 1
        self.step += 1
        self.images_seen += B
        extra = {"data_wait_s": data_wait, **({} if prior_loss is None else {"prior_loss": prior_loss}),
                 **self._data_metrics(seen)}
        if dpo:  # the share of pairs the policy prefers more than the reference does, and the mean margin
            extra.update(dpo_accuracy=sums[1], dpo_margin=sums[2])
        if cfg.dispersive:
            extra["dispersive_loss"] = sums[3]
        return {"step": self.step, "loss": loss if ok else None, "lr": lr, **extra,
                "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                **({} if ok else {"nonfinite": True, "bad_loss": repr(loss), "bad_grad_norm": repr(grad_norm)})}

    def _grad_sync(self, last: bool):
        """Gradients are reduced over the processes on the last micro-step only (FSDP2's switch, DDP's no_sync)."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last or not self.ctx.enabled else self.net.no_sync()

    def _micro_loss(self, step: int, lo: int, x0, captions, context, pooled, eps, t, prior, sums):
        """(per-sample losses, what to backpropagate) of the micro-batch at batch slot lo: the formulation's loss
        with the learning-speed options, or DPO's per pair (x0 holds each pair's preferred and rejected image in
        turn), plus prior preservation's class loss. sums accumulates [class loss, DPO pairs won, DPO margin,
        dispersive loss x samples]."""
        cfg = self.cfg
        if cfg.objective == "dpo":
            per_sample, margin = pair_losses(self.net, self.model, self.formulation, x0[0::2], x0[1::2], context,
                                             pooled, t, eps, self.bf16, cfg.dpo_beta)
            sums[1:3] += torch.stack([(margin > 0).sum(), margin.sum()]).detach().double()
            total = per_sample.sum()
        else:
            with self._middle_output() as seen:
                per_sample = compute_loss(self.net, self.formulation, x0, context, pooled, t, eps, self.bf16,
                                          **self._speedups(step, lo, x0, captions))
            total = per_sample.sum()
            if cfg.dispersive:  # a batch-level term, weighted per sample like the sum above
                disp = dispersive_loss(seen["x"])
                total = total + cfg.dispersive * len(per_sample) * disp
                sums[3] += disp.detach().double() * len(per_sample)
        if prior is not None:  # the class images of this slice, their dropout seeded past the instances'
            sl, B = slice(lo, lo + self.micro), cfg.batch_size
            c_ctx, c_pooled = self._conditioning([cfg.class_prompt] * self.micro, step,
                                                 range(B + lo, B + lo + self.micro))
            class_loss = compute_loss(self.net, self.formulation, prior[0][sl], c_ctx, c_pooled, prior[1][sl],
                                      prior[2][sl], self.bf16)
            total = total + cfg.prior_weight * class_loss.sum()
            sums[0] += class_loss.detach().double().sum()
        return per_sample, total

    def _middle_output(self):
        """The dispersive loss's capture of the middle joint block's image tokens (a no-op context without it)."""
        if not self.cfg.dispersive:
            return contextlib.nullcontext()
        return block_output(self.model.joint_blocks[len(self.model.joint_blocks) // 2])

    def _speedups(self, step: int, lo: int, x0: torch.Tensor, captions: list[str]) -> dict:
        """compute_loss options of the learning-speed settings (docs/training.md "Learning speed"): contrastive flow
        matching's negatives and token routing's kept tokens, seeded by (step, slot) for exact resume."""
        cfg, out = self.cfg, {}
        if cfg.contrastive:
            out.update(negatives=negative_indices(captions), contrastive=cfg.contrastive)
        if cfg.route_fraction:
            start, end = route_blocks(cfg, len(self.model.joint_blocks))
            p = self.model.patch_size
            n_tokens = (x0.shape[-2] // p) * (x0.shape[-1] // p)
            keep = route_indices(n_tokens, cfg.route_fraction, x0.shape[0], generator_for(cfg.seed, step, "route", lo))
            out["route"] = (start, end, keep)
        return out

    def _micro_inputs(self, step: int, sl: slice, indices, eps_all):
        """x0, captions, noise and sample ids of one micro-batch slice of the global batch: by index, or this rank's
        stream's next micro-batch (its noise seeded by its slot)."""
        if self.cfg.objective == "dpo":  # each pair's preferred (item 2p) and rejected (2p + 1) image, in turn
            pairs = indices[sl]
            x0, _ = self.batches.load([i for p in pairs for i in (2 * p, 2 * p + 1)])
            return x0, [self.dataset.captions[2 * p] for p in pairs], eps_all[sl], pairs, None
        if not self.streaming:
            x0, captions = self.batches.load(indices[sl])
            return x0, captions, eps_all[sl], indices[sl], None
        x0, captions, keys, features = self.batches.next()
        g = torch.Generator(self.device).manual_seed(seed_for(self.cfg.seed, step, "eps", sl.start))
        return x0, captions, torch.randn(x0.shape, generator=g, device=self.device), keys, features

    def _data_metrics(self, seen: list) -> dict:
        """The step's sample ids in global batch order (log_samples) and the damaged samples and shards streams
        have skipped so far (collectives under torchrun)."""
        out = {}
        if self.cfg.log_samples:
            parts = sorted(p for rank in distributed.all_gather_objects(seen, self.ctx) for p in rank)
            out["samples"] = [i for _, ids in parts for i in ids]
        if self.streaming:
            bad = torch.tensor(self.batches.bad_counts(), dtype=torch.float64, device=self.device)
            samples, shards = distributed.all_reduce_sum(bad, self.ctx).tolist()
            out.update(data_bad_samples=int(samples), data_bad_shards=int(shards))
        return out

    def _conditioning(self, captions: list[str], step: int, positions, features: tuple | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached text features (or the given precomputed ones) with per-encoder dropout; each sample's dropout draw
        is seeded by its batch slot."""
        context, pooled = self.text.encode(captions) if features is None else features
        if self.text_drop > 0:
            pairs = [self.text.drop(context[i:i + 1], pooled[i:i + 1], self.text_drop,
                                    generator=generator_for(self.cfg.seed, step, "text-drop", pos))
                     for i, pos in enumerate(positions)]
            context, pooled = torch.cat([c for c, _ in pairs]), torch.cat([p for _, p in pairs])
        return context.to(self.device), pooled.to(self.device)

    # ---- logging

    def _open_logs(self):
        """metrics.jsonl (cut back to the resumed step) and the TensorBoard writer (purged likewise)."""
        path = self.run_dir / METRICS
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

    @contextlib.contextmanager
    def _weights(self):
        """The EMA weights as a model (a LoRA run: the model with its EMA adapters swapped in, restored after)."""
        with (self.lora.ema_weights() if self.lora is not None else contextlib.nullcontext(self.ema)) as net:
            try:
                yield net
            finally:
                if self.fsdp:  # a forward without backward leaves the root's parameters gathered
                    reshard(net)

    def validation_inputs(self) -> tuple:
        """(latents, context, pooled) of the validation images, prepared once; () when there is no val split."""
        if self._val is None:
            try:
                ds = get_dataset(self.cfg.data, self.cfg.resolution, split="val", seed=0, **data_options(self.cfg))
                self._val = validation_inputs(ds, self.cfg.val_size, self.text, self.autoencoder, self.device)
            except (ValueError, FileNotFoundError) as err:
                print(f"rectflow train: no validation loss ({err})", file=sys.stderr)
                self._val = ()
        return self._val

    def validation(self) -> dict:
        """The validation loss of the EMA weights at the 8 t levels (rectflow.evaluate.val_loss), on the first
        val_size images of the data set's validation split (square, whatever the buckets); {} without one."""
        if not self.validation_inputs():
            return {}
        with self._weights() as net:
            was_training = net.training
            result = validation_loss(net.eval(), self.formulation, *self._val, seed=self.cfg.seed, bf16=self.bf16)
            net.train(was_training)
        if self._writer is not None:
            for t, loss in zip(result["t"], result["loss"]):
                self._writer.add_scalar(f"val/loss_t{t:.4f}", loss, self.step)
            self._writer.add_scalar("val/loss", result["mean"], self.step)
        return {"val_loss": result["mean"], "val_loss_t": result["loss"]}

    def _sample_settings(self) -> dict:
        """The sampler of the grids (and of prior preservation's class images)."""
        cfg = self.cfg
        settings = {"steps": cfg.sample_steps, "solver": cfg.sample_solver, "cfg_scale": cfg.sample_cfg,
                    "shift": cfg.shift, "seed": cfg.seed}
        if self.uncond_prompt == "":  # a fine-tune of a released model: its sampler settings (docs/paper.md §6)
            settings.update(shift=DEFAULTS_FOR_RELEASED["shift"], schedule=DEFAULTS_FOR_RELEASED["schedule"])
        return settings

    def _pipeline(self, net) -> Pipeline:
        return Pipeline(net, self.formulation, self.text, self.autoencoder, self.cfg.resolution, self.cfg.to_dict(),
                        source=str(self.run_dir), uncond_prompt=self.uncond_prompt)

    def write_samples(self) -> Path | None:
        """A captioned grid of the fixed prompts from the EMA weights, in samples/ and TensorBoard (written by rank
        0; under FSDP every rank draws it, the forward passes being collective)."""
        settings = self._sample_settings()
        with self._weights() as net:
            was_training = net.training
            images = generate(self._pipeline(net.eval()), self.prompts, bf16=self.bf16, **settings)
            net.train(was_training)
        if not self.ctx.is_main:
            return None
        path = self.run_dir / "samples" / f"step_{self.step:08d}.png"
        grid = save_images(images, self.prompts, path, {**settings, "run": str(self.run_dir), "train_step": self.step,
                                                        "weights": "ema"}, singles=False)
        self._writer.add_image("samples", np.asarray(grid), self.step, dataformats="HWC")
        return path

    # ---- the loop

    def fit(self) -> Path:
        """Train to max_steps; returns the run directory."""
        cfg, main = self.cfg, self.ctx.is_main
        if main and self.precision_note:
            print(self.precision_note, file=sys.stderr)
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "checkpoints").mkdir(exist_ok=True)
            clean_temp(checkpoint_root(self.run_dir))
            cfg.save(self.run_dir / CONFIG)
            self._open_logs()
        if self.streaming:
            self.batches.start(self._saved_streams, self.step * cfg.grad_accum)
        elif cfg.objective != "dpo":  # (DPO reads pairs' items, which the step-indexed sampler does not know)
            self.batches.start_workers(cfg.workers, self.step, cfg.max_steps, self.micro, self.ctx.world_size,
                                       self.ctx.rank, cfg.grad_accum)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not main, unit="step", dynamic_ncols=True)
        start, window = time.perf_counter(), []
        # the profiled steps start after one warm-up step
        profiler = StepProfiler(self.run_dir / "profile", self.step + 2, cfg.profile_steps if main else 0,
                                self.device)
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                metrics = self.train_step()
                dt = time.perf_counter() - t0
                done = self.step == cfg.max_steps
                window = (window + [dt])[-cfg.log_every:]
                metrics["img_per_s"] = cfg.batch_size / dt
                metrics["data_wait"] = metrics.pop("data_wait_s") / dt  # the share of the step spent waiting for data
                metrics["time"] = time.perf_counter() - start
                metrics.update(self._device_metrics(dt))
                profiler.after_step(self.step)
                if self.evaluates and cfg.val_every and (self.step % cfg.val_every == 0 or done):
                    metrics.update(self.validation())  # after the timing: img_per_s stays the training speed
                bar.update(1)
                if main:
                    self._log(metrics, bar, window)
                if self.bad_streak >= cfg.max_bad_steps:
                    if self.sharded is not None:
                        self.sharded.wait()
                    last = find_checkpoint(self.run_dir)
                    raise TrainingAborted(
                        f"training aborted at step {self.step}: {self.bad_streak} non-finite losses or gradient norms "
                        f"in a row (max_bad_steps = {cfg.max_bad_steps}); the last good checkpoint is "
                        f"{last if last else 'none (no checkpoint was written)'}. Try a lower lr, qk_norm: rms, "
                        f"grad_clip, or bf16: false.")
                # a skipped step left the weights as they were (good): checkpoint as usual; only an abort does not
                if done or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                    self.save()
                elif self.sharded is not None:
                    self.sharded.poll()
                grid_due = done or (cfg.sample_every and self.step % cfg.sample_every == 0)
                if self.evaluates and cfg.sample_every and self.prompts and grid_due:
                    self.write_samples()
            if self.sharded is not None:
                self.sharded.wait()
        finally:
            profiler.close()
            bar.close()
            self.batches.loader = None  # DataLoader workers end with their iterator
            if self.sharded is not None and not self.ctx.enabled:  # one process: a written save still counts
                self.sharded.wait()
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
        device = {k: f"{metrics[k]:.1f}" if k == "mem_gib" else f"{metrics[k]:.0%}" for k in ("mfu", "mem_gib")
                  if k in metrics}
        bar.set_postfix(loss="nan" if loss is None else f"{loss:.4f}", img_s=f"{img_s:.1f}",
                        data_wait=f"{metrics['data_wait']:.0%}", skipped=self.skipped, **device)


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, from_last_good: bool = False) -> Path:
    """Train (or continue with resume=True) the run in `out`; returns the run directory."""
    trainer = Trainer(cfg, out, resume=resume, from_last_good=from_last_good)
    try:
        return trainer.fit()
    finally:
        distributed.shutdown(trainer.ctx)

