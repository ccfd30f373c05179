"""The released SD3 / SD3.5 single-file layout: reading a file's MM-DiT tensors (safetensors, or pickles only when
allowed), reading the config off the keys and shapes as Stability AI's reference code does, and checking a state
dict against a model with errors that name every missing, unexpected and mis-shaped key.

Nothing here builds a model, so both the models (MMDiT.from_single_file) and rectflow.checkpoints can use it.
"""
from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import torch
from safetensors import safe_open

from rectflow.files import check_safetensors

PREFIX = "model.diffusion_model."
OTHER_COMPONENTS = ("first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
FORMAT_TAG = "rectflow.mmdit"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or mis-shaped keys, or an unreadable file."""


def _read_safetensors(path: Path, want=None) -> tuple[dict, dict]:
    """Tensors (only the keys for which want(key) is true, if given) and the metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys() if want is None or want(k)}
    return tensors, metadata


def _read_pickle(path: Path, allow_pickle: bool) -> dict:
    """A state dict from a pickle file, refused unless the caller opted in; loaded with weights_only=True."""
    if not allow_pickle:
        raise CheckpointError(f"{path} is a pickle file ({path.suffix}); unpickling can run code. Convert it to "
                              f"safetensors, or pass allow_pickle=True (--allow-pickle) if you trust it")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:  # hostile, damaged or not a pickle
        raise CheckpointError(f"{path} was refused by torch.load(weights_only=True), which runs no code: "
                              f"{' '.join(str(err).split())[:300]}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-style .ckpt
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return obj


def _model_keys(keys, source) -> dict[str, str]:
    """Map file keys to model keys: strip `model.diffusion_model.` and drop bundled VAE / text encoders."""
    keys = list(keys)
    if any(k.startswith(PREFIX) for k in keys):
        return {k: k[len(PREFIX):] for k in keys if k.startswith(PREFIX)}
    picked = {k: k for k in keys if not k.startswith(OTHER_COMPONENTS)}
    if not picked:
        raise CheckpointError(f"{source} holds no MM-DiT weights (no keys outside {OTHER_COMPONENTS})")
    return picked


def read_released(path, allow_pickle: bool = False) -> tuple[dict, dict]:
    """The MM-DiT state dict (released key names) and the metadata of a single file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raw = _read_pickle(path, allow_pickle)
        names = _model_keys(raw, path)
        return {names[k]: v for k, v in raw.items() if k in names}, {}
    check_safetensors(path)  # a damaged or mis-named file: an error naming it, not safetensors' own
    with safe_open(str(path), framework="pt") as f:
        names = _model_keys(f.keys(), path)
    tensors, metadata = _read_safetensors(path, want=names.__contains__)
    return {names[k]: v for k, v in tensors.items()}, metadata


def _require(sd: dict, key: str, source) -> torch.Tensor:
    """sd[key], or an error saying the config cannot be inferred without it."""
    if key not in sd:
        raise CheckpointError(f"{source}: cannot infer the MM-DiT config: key {key!r} is missing")
    return sd[key]


def infer_config(sd: dict, source="state dict", num_heads: int | None = None, input_size: int | None = None) -> dict:
    """An MMDiT config read off a released-layout state dict's keys and shapes (as the reference code does).

    Heads: from the QK-norm width when present, else num_heads, else the SD3 rule head dim 64. input_size (only used
    to build a fresh position table) defaults to SD3's 1024 px latent side, 128, capped at the table's extent.
    """
    blocks = {int(m.group(1)) for k in sd for m in [re.match(r"joint_blocks\.(\d+)\.", k)] if m}
    if not blocks:
        raise CheckpointError(f"{source}: cannot infer the MM-DiT config: no joint_blocks.N.* keys")
    depth = max(blocks) + 1
    proj = _require(sd, "x_embedder.proj.weight", source)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    final = _require(sd, "final_layer.linear.weight", source)
    ln_q = sd.get("joint_blocks.0.x_block.attn.ln_q.weight")
    qk_norm = None if ln_q is None else "ln" if "joint_blocks.0.x_block.attn.ln_q.bias" in sd else "rms"
    if ln_q is not None:
        num_heads = hidden // ln_q.shape[0]
    elif num_heads is None:
        num_heads = max(hidden // 64, 1)
    pos = sd.get("pos_embed")
    max_size = None
    if pos is not None:
        max_size = math.isqrt(pos.shape[1])
        if max_size * max_size != pos.shape[1]:
            raise CheckpointError(f"{source}: pos_embed has {pos.shape[1]} entries, not a square table")
    elif input_size is None:
        raise CheckpointError(f"{source}: no pos_embed table and no rectflow config in the metadata: "
                              f"cannot tell the position grid")
    if input_size is None:
        input_size = min(128, max_size * patch)
    dual = sorted({int(m.group(1)) for k in sd for m in [re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.", k)] if m})
    fc1 = _require(sd, "joint_blocks.0.x_block.mlp.fc1.weight", source)
    return dict(
        depth=depth, hidden_size=hidden, num_heads=num_heads, patch_size=patch, in_channels=in_channels,
        out_channels=final.shape[0] // (patch * patch),
        context_dim=_require(sd, "context_embedder.weight", source).shape[1],
        pooled_dim=_require(sd, "y_embedder.mlp.0.weight", source).shape[1],
        input_size=input_size, qk_norm=qk_norm, dual_attention_layers=dual, pos_embed_max_size=max_size,
        pos_embed_base_size=input_size, mlp_ratio=fc1.shape[0] / hidden)


def _listing(items: list, limit: int = 12) -> str:
    """A bounded, readable list of keys."""
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def check_state_dict(model: torch.nn.Module, sd: dict, source) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys (expected vs got)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = [f"{k} (expected {expected[k]}, got {tuple(sd[k].shape)})"
                 for k in sorted(set(expected) & set(sd)) if tuple(sd[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys [{len(missing)}]: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys [{len(unexpected)}]: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys [{len(misshaped)}]: {_listing(misshaped)}")
    if problems:
        arch = model.config.get("arch", "mmdit")
        name = "the MM-DiT" if arch == "mmdit" else f"the {arch} model"
        raise CheckpointError(f"{source} does not fit {name} ({model.config['depth']} blocks, hidden "
                              f"{model.config['hidden_size']}): " + "; ".join(problems))


def metadata_config(metadata: dict, source) -> dict | None:
    """The rectflow config stored in a file's metadata, if any."""
    if "config" not in metadata or metadata.get("format") != FORMAT_TAG:
        return None
    try:
        return json.loads(metadata["config"])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{source}: the rectflow config in the metadata is not valid JSON ({err})") from err

