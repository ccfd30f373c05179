"""Training checkpoints: the raw and EMA weights as safetensors (rectflow's weights format, loadable by every
command) and the state needed to continue exactly (optimizer, step, counters, RNG; torch.save, read with
weights_only=True). Where they live and how they are written atomically: rectflow.runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from rectflow.checkpoints import FORMAT_TAG, UNCOND_KEY
from rectflow.config import TrainConfig
from rectflow.runs import STATE, WEIGHT_FILES, write_checkpoint

STATE_VERSION = 1


def weights_metadata(model: torch.nn.Module, cfg: TrainConfig, step: int, kind: str,
                     uncond_prompt: str | None = None) -> dict[str, str]:
    """safetensors metadata: rectflow.checkpoints' file format (model config) plus the run's training config and
    CFG's unconditional prompt (null: zeros; "" for fine-tunes of released models, as their base)."""
    return {"format": FORMAT_TAG, "config": json.dumps(model.config),
            "rectflow.train_config": json.dumps(cfg.to_dict()), "rectflow.step": str(step),
            "rectflow.weights": kind, UNCOND_KEY: json.dumps(uncond_prompt)}


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str], state_dict: dict | None = None) -> None:
    """Write a model's state dict (or the given full one, gathered from shards) as safetensors with metadata."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata=metadata)


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
