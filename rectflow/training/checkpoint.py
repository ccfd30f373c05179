"""Training checkpoints: the raw and EMA weights as safetensors (rectflow's weights format, loadable by every
command) and the state needed to continue exactly (optimizer, step, counters, RNG; torch.save, read with
weights_only=True). Where they live and how they are written atomically: rectflow.runs.

Sharded checkpoints (checkpoint_format: sharded, ShardedCheckpoints): every rank writes its own shards of the
weights, the optimizer state and the EMA with torch.distributed.checkpoint, asynchronously by default (staged to CPU
memory, written by a thread while training goes on); the checkpoint is renamed into place once every shard is
written. torch.distributed.checkpoint reshards on load, so they resume on any number of processes, and
rectflow.checkpoints.load_sharded consolidates them for sampling and `rectflow convert`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from rectflow.checkpoints import FORMAT_TAG, TRAIN_CONFIG_KEY, UNCOND_KEY
from rectflow.config import TrainConfig
from rectflow.files import SHARDED_INFO, permit, write_text_atomic
from rectflow.runs import SHARDED_WEIGHTS, STATE, WEIGHT_FILES, begin_checkpoint, finish_checkpoint, write_checkpoint
from rectflow.training import distributed

STATE_VERSION = 1


def weights_metadata(model: torch.nn.Module, cfg: TrainConfig, step: int, kind: str,
                     uncond_prompt: str | None = None) -> dict[str, str]:
    """safetensors metadata: rectflow.checkpoints' file format (model config) plus the run's training config and
    CFG's unconditional prompt (null: zeros; "" for fine-tunes of released models, as their base)."""
    return {"format": FORMAT_TAG, "config": json.dumps(model.config),
            TRAIN_CONFIG_KEY: json.dumps(cfg.to_dict()), "rectflow.step": str(step),
            "rectflow.weights": kind, UNCOND_KEY: json.dumps(uncond_prompt)}


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str], state_dict: dict | None = None) -> None:
    """Write a model's state dict (or the given full one, gathered from shards) as safetensors with metadata."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata=metadata)
    permit(path)  # safetensors writes 0600


def save_checkpoint(run_dir: Path, step: int, model, ema, state: dict, cfg: TrainConfig, lora=None,
                    uncond_prompt: str | None = None, state_dicts: tuple | None = None, adapters=None) -> Path:
    """Write checkpoints/step_N (raw and EMA weights, or a LoRA run's adapters, and the training state) atomically;
    prune to cfg.keep_last. state_dicts / adapters: the full weights gathered from shards."""
    def write(folder: Path) -> None:
        if lora is not None:
            lora.write(folder, weights_metadata(model, cfg, step, "lora", uncond_prompt), adapters)
        else:
            model_sd, ema_sd = state_dicts or (None, None)
            save_weights(model, folder / WEIGHT_FILES["raw"], weights_metadata(model, cfg, step, "raw", uncond_prompt),
                         model_sd)
            save_weights(ema, folder / WEIGHT_FILES["ema"], weights_metadata(ema, cfg, step, "ema", uncond_prompt),
                         ema_sd)
        torch.save(state, folder / STATE)
    return write_checkpoint(run_dir, step, write, cfg.keep_last)


def load_state(ck_dir: Path) -> dict:
    """The training state of a checkpoint (weights_only: never unpickle arbitrary objects)."""
    return torch.load(Path(ck_dir) / STATE, map_location="cpu", weights_only=True)


class ShardedCheckpoints:
    """The sharded checkpoints of a run: model.dcp/ (weights and optimizer state, keyed by parameter name) and
    ema.dcp/ (the EMA), each with a rectflow.json of what a weights file's header would say, beside state.pt."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, ctx):
        self.run_dir, self.cfg, self.ctx = Path(run_dir), cfg, ctx
        self.asynchronous = cfg.checkpoint_async
        self.pending = None  # (futures, temp folder, step) of the save in flight
        # each writer thread's collectives (model.dcp's, ema.dcp's) get a group of their own, apart from training's
        # and from each other's: collectives of one group must come in the same order on every rank
        self.groups = {kind: dist.new_group(backend="gloo") if self.asynchronous and ctx.enabled else None
                       for kind in SHARDED_WEIGHTS}

    def save(self, step: int, model, ema, opt, state: dict, metadata: dict[str, dict]) -> None:
        """Start writing checkpoint `step` (a collective; metadata: per kind, raw and ema); the previous one is
        finished first. Synchronous saves are finished before returning."""
        self.wait()
        tmp = distributed.broadcast_object(str(begin_checkpoint(self.run_dir, step)) if self.ctx.is_main else None,
                                           self.ctx)
        parts = {"raw": {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)},
                 "ema": {"ema": get_model_state_dict(ema)}}
        futures = []
        for kind, key in (("raw", "model"), ("ema", "ema")):
            folder = Path(tmp) / SHARDED_WEIGHTS[kind]
            if self.ctx.is_main:
                folder.mkdir()
                write_text_atomic(folder / SHARDED_INFO, json.dumps({**metadata[kind], "rectflow.dcp_key": key}))
            distributed.barrier(self.ctx)
            options = {"checkpoint_id": str(folder), "no_dist": not self.ctx.enabled}
            if self.asynchronous:
                futures.append(dcp.async_save(parts[kind], process_group=self.groups[kind], **options))
            else:
                dcp.save(parts[kind], **options)
        if self.ctx.is_main:
            torch.save(state, Path(tmp) / STATE)
        self.pending = (futures, Path(tmp), step)
        if not self.asynchronous:
            self.wait()

    def poll(self) -> Path | None:
        """Finish the save in flight once every rank's writers are done (a collective while one is in flight): a
        written checkpoint appears within a step, not only at the next save."""
        if self.pending is None:
            return None
        done = torch.tensor([float(all(getattr(f, "upload_completion", f).done() for f in self.pending[0]))])
        if distributed.all_reduce_sum(done, self.ctx).item() < self.ctx.world_size:
            return None
        return self.wait()

    def wait(self) -> Path | None:
        """Finish the save in flight: every shard written, then (rank 0) renamed into place; returns step_N."""
        if self.pending is None:
            return None
        futures, tmp, step = self.pending
        self.pending = None
        for f in futures:
            getattr(f, "upload_completion", f).result()  # DCP's index is written last, after every rank's shards
        distributed.barrier(self.ctx)
        if self.ctx.is_main:
            return finish_checkpoint(self.run_dir, step, tmp, self.cfg.keep_last)
        return None


def load_sharded_training(ck_dir: Path, model, ema, opt, ctx) -> None:
    """Resume from a sharded checkpoint: weights, optimizer state and EMA into this run's (sharded or plain)
    model, resharded to this run's processes."""
    no_dist, raw = not ctx.enabled, str(Path(ck_dir) / SHARDED_WEIGHTS["raw"])
    target = {"model": get_model_state_dict(model)}
    dcp.load(target, checkpoint_id=raw, no_dist=no_dist)
    set_model_state_dict(model, target["model"])
    # partial: a parameter that never had a gradient (the pre-only block's query norm) has no stored state
    target = {"optimizer": get_optimizer_state_dict(model, opt)}
    dcp.load(target, checkpoint_id=raw, no_dist=no_dist, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_optimizer_state_dict(model, opt, target["optimizer"])
    target = {"ema": get_model_state_dict(ema)}
    dcp.load(target, checkpoint_id=str(Path(ck_dir) / SHARDED_WEIGHTS["ema"]), no_dist=no_dist)
    set_model_state_dict(ema, target["ema"])
